"""Policy settings through the Access Server emulation: bypass users, exempt and enforced groups,
the push label, syslog output, and the one-line-per-outcome log format."""

import re
import sys
import types

import pytest

from asemu import FAIL, SUCCEED


def end_line(out):
    lines = [line for line in out.splitlines() if " login end " in line]
    assert len(lines) == 1, out
    return dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', lines[0]))


def test_bypass_user_passes_without_api_call_and_is_logged(fake, access_server, capfd):
    server = access_server(BYPASS_USERS=["BreakGlass", "ops\\admin"])
    for username in ("breakglass", " BREAKGLASS ", "OPS\\Admin"):
        result = server.login(username)
        assert result.authret["status"] == SUCCEED
        fields = end_line(capfd.readouterr().out)
        assert fields["outcome"] == "bypass" and "BYPASS_USERS" in fields["detail"]
    assert sum(fake.counts.values()) == 0
    assert server.login("tz").authret["status"] == FAIL  # everybody else still needs iVALT


@pytest.mark.parametrize("username", [
    "admin",  # the list names ops\admin: another domain's admin is someone else
    "EVIL\\admin", "attacker\\ADMIN", "evil\\kate",
    "\u212aate",  # KELVIN SIGN + "ate": lower-cases to "kate"
    "\xa0kate\u3000",  # no-break and ideographic spaces around it
    "kate@example.com",  # the e-mail form is not the name on the list
])
def test_bypass_is_an_exact_match_of_what_was_typed(fake, access_server, capfd, username):
    """BYPASS_USERS lets people in without a second factor: no normalising, no look-alikes."""
    result = access_server(BYPASS_USERS=["ops\\admin", "kate"]).login(username)
    assert result.raised is None and result.authret["status"] == FAIL, result.authret
    assert "bypass" not in capfd.readouterr().out


def test_a_bypass_entry_that_could_never_match_is_a_settings_error(fake, access_server):
    result = access_server(BYPASS_USERS=["\u212aate"]).login("kate")
    assert result.authret["status"] == FAIL and "BYPASS_USERS entry" in result.authret["reason"]


def test_exempt_group(fake, access_server, capfd):
    server = access_server(EXEMPT_GROUPS=["Contractors-NoPhone"])
    assert server.login("tz", conn_group="Contractors-NoPhone").authret["status"] == SUCCEED
    assert end_line(capfd.readouterr().out)["outcome"] == "bypass"
    assert server.login("tz", conn_group="Staff").authret["status"] == FAIL
    assert server.login("tz").authret["status"] == FAIL  # no group: enforced
    assert fake.counts["lookup"] == 2


def test_enforced_groups_only(fake, access_server, capfd):
    server = access_server(ENFORCED_GROUPS=["Admins"])
    assert server.login("tz", conn_group="Admins").authret["status"] == FAIL
    capfd.readouterr()
    assert server.login("tz", conn_group="Staff").authret["status"] == SUCCEED
    fields = end_line(capfd.readouterr().out)
    assert fields["outcome"] == "bypass" and "ENFORCED_GROUPS" in fields["detail"]
    assert fake.counts["lookup"] == 1


def test_request_from_label_is_sent_with_the_push(fake, access_server):
    access_server(REQUEST_FROM="ACME VPN").login("alice")
    push = [record for record in fake.log if record.endpoint == "push"][0]
    assert push.body == {"mobile": "+15551230001", "requestFrom": "ACME VPN"}


@pytest.mark.parametrize("user, outcome", [("alice", "approved"), ("tz", "invalid_timezone"), ("nobody", "not_enrolled"),
                                           ("deny", "denied")])
def test_one_key_value_line_per_outcome(fake, access_server, capfd, mode, user, outcome):
    access_server(LOG_LEVEL="info").login(user, auth_method="ldap", vpn=False)
    out = capfd.readouterr().out
    assert sum(" login start " in line for line in out.splitlines()) == 1
    fields = end_line(out)
    assert fields["outcome"] == outcome
    assert fields["method"] == "ldap" and fields["kind"] == "web" and fields["fail_mode"] == "closed"
    assert re.match(r"^[a-z]{10}$", fields["id"]) and fields["user"].endswith("***@example.com")
    assert re.match(r"^\d+\.\d\ds$", fields["duration"]) and int(fields["api_calls"]) >= 1


def test_syslog_gets_the_same_lines(fake, access_server, capfd, monkeypatch):
    sent = []
    fake_syslog = types.ModuleType("syslog")
    fake_syslog.LOG_INFO, fake_syslog.LOG_WARNING = 6, 4
    fake_syslog.syslog = lambda priority, line: sent.append((priority, line))
    monkeypatch.setitem(sys.modules, "syslog", fake_syslog)
    access_server(SYSLOG=True, LOG_LEVEL="info").login("alice")
    stdout_lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("ivalt-2fa: login")]
    assert [line for _, line in sent if " login " in line] == stdout_lines
    assert all(priority == 6 for priority, _ in sent if " login " in _)
