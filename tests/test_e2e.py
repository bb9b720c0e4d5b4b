"""End to end: Access Server's calling convention -> the real post_auth -> real HTTP -> the fake
iVALT API. Every test runs in both wait modes (worker thread and Deferred)."""

import pytest

from asemu import FAIL, SUCCEED

DEADLINE = 3.0  # settings_for() default
SLACK = 2.0  # post_auth must return within the deadline plus this, whatever the API does


def pushes(fake, email):
    from conftest import USERS

    return fake.pushes_delivered.get(USERS[email][0], 0)


def test_approved(fake, access_server, mode):
    result = access_server().login("alice")
    assert result.raised is None
    assert result.authret["status"] == SUCCEED
    assert result.authret["reason"] == "" and result.authret["client_reason"] == ""
    assert pushes(fake, "alice@example.com") == 1
    assert 0.3 <= result.elapsed < 0.3 + 0.25 + 0.5  # answer due 0.3 s after the push, 0.25 s polls
    assert result.returned_deferred == (mode == "deferred")
    assert fake.counts["lookup"] == 1 and fake.counts["push"] == 1


def test_approved_with_422_pending(fake, access_server):
    result = access_server().login("pend422")
    assert result.authret["status"] == SUCCEED
    assert pushes(fake, "pend422@example.com") == 1


def test_the_email_domain_makes_the_tutorial_user(fake, access_server):
    result = access_server(EMAIL_DOMAIN="access-server.com").login("brandonqa")
    assert result.authret["status"] == SUCCEED
    assert fake.log[0].body == {"email": "brandonqa@access-server.com"}


def test_not_enrolled(fake, access_server):
    result = access_server().login("nobody")
    assert result.authret["status"] == FAIL
    assert result.authret["client_reason"] == "The email provided (nobody@example.com) was not found"
    assert "not_enrolled" in result.authret["reason"] and "id=" in result.authret["reason"]
    assert fake.counts["push"] == 0
    assert result.elapsed < 1.0


@pytest.mark.parametrize("user, client_reason, outcome", [
    ("tz", "INVALID_TIMEZONE", "invalid_timezone"),
    ("geo", "INVALID_GEOFENCE", "invalid_geofence"),
    ("deny", "AUTHENTICATION_FAILED", "denied"),
    ("denyd", "AUTHENTICATION_FAILED", "denied"),
])
def test_definite_answers_end_at_once(fake, access_server, user, client_reason, outcome):
    result = access_server().login(user)
    assert result.authret["status"] == FAIL
    assert result.authret["client_reason"] == client_reason
    assert outcome in result.authret["reason"]
    assert pushes(fake, user + "@example.com") == 1
    assert result.elapsed < 0.3 + 0.25 + 0.5  # not the deadline: a definite answer ends it


def test_timed_out(fake, access_server):
    result = access_server().login("slow")
    assert result.authret["status"] == FAIL
    assert result.authret["client_reason"] == "AUTHENTICATION_FAILED"
    assert "timed_out" in result.authret["reason"] and "did not answer" in result.authret["reason"]
    assert pushes(fake, "slow@example.com") == 1
    assert DEADLINE - 0.3 <= result.elapsed <= DEADLINE + SLACK
    assert fake.counts["poll"] >= 8  # kept polling every 0.25 s until the deadline
    assert fake.connections == 1  # all on one kept-alive connection: no new handshake per poll


def test_bad_key(fake, access_server):
    result = access_server(IVALT_SECRET_KEY="wrong-key-123").login("alice")
    assert result.authret["status"] == FAIL
    assert result.authret["client_reason"] == "SERVICE_MISCONFIGURED"
    assert "bad_key" in result.authret["reason"] and "key was refused" in result.authret["reason"]
    assert "wrong-key-123" not in result.authret["reason"]
    assert fake.counts["lookup"] == 1 and fake.counts["push"] == 0
    assert result.elapsed < 1.0


@pytest.mark.parametrize("method", ["session", "autologin"])
def test_session_and_autologin_are_not_fresh_logins(fake, access_server, method):
    server = access_server()
    result = server.login("alice", auth_method=method)
    assert result.authret == result.authret_in
    assert result.authret["status"] == SUCCEED
    assert sum(fake.counts.values()) == 0


def test_web_login_needs_ivalt_by_default(fake, access_server):
    result = access_server().login("tz", vpn=False)
    assert result.authret["status"] == FAIL
    assert result.authret["client_reason"] == "INVALID_TIMEZONE"


def test_web_login_can_be_left_to_the_primary_login(fake, access_server):
    server = access_server(REQUIRE_FOR_WEB_LOGIN=False)
    web = server.login("tz", vpn=False)
    assert web.authret["status"] == SUCCEED and sum(fake.counts.values()) == 0
    vpn = server.login("tz", vpn=True)
    assert vpn.authret["status"] == FAIL and vpn.authret["client_reason"] == "INVALID_TIMEZONE"


def test_failed_primary_login_is_left_alone(fake, access_server):
    result = access_server().login("alice", authret={"status": FAIL, "reason": "bad password"})
    assert result.authret == {"status": FAIL, "reason": "bad password"}
    assert sum(fake.counts.values()) == 0


@pytest.mark.parametrize("authret", [0, "SUCCEED", ["status", SUCCEED]])
def test_without_an_authret_dict_nobody_is_let_in(fake, access_server, authret):
    """No dict means no primary result: an approval must not stand in for the password."""
    result = access_server().login("alice", authret=authret)
    assert result.raised is None
    assert result.authret["status"] == FAIL
    assert result.authret["client_reason"] == "SERVICE_UNAVAILABLE"
    assert "primary login's result is unknown" in result.authret["reason"]
    assert sum(fake.counts.values()) == 0


def test_other_authret_keys_are_left_alone(fake, access_server):
    server = access_server()
    call = server.build_call(username="tz", conn_group="Sales")
    authret = dict(call.authret_in, user="tz", custom="kept")
    result = server.login("tz", authret=authret)
    assert result.authret["custom"] == "kept" and result.authret["proplist"] == {"conn_group": "Sales"}
    assert result.authret["user"] == "tz"


def test_key_sent_only_in_its_header(fake, access_server):
    access_server().login("alice")
    for record in fake.log:
        assert record.headers["x-api-key"] == "test-key-QX7yW2"
        assert "test-key-QX7yW2" not in str(record.body)
    assert fake.log[1].body["mobile"] == "+15551230001" and fake.log[1].body["requestFrom"]


def test_finished_logins_leave_nothing_for_the_garbage_collector(fake, access_server, mode):
    """A login's state (flow, timers, answers) is freed by refcounting as soon as it ends. Left in
    reference cycles, 200 waiting logins' state would pile up for Access Server's full garbage
    collections, which stop every thread, the reactor's too, for tens of milliseconds."""
    import gc

    server = access_server()
    server.login("alice")  # warm: imports and caches made on first use are not per login
    ns = server.script.ns
    own_types = tuple(v for v in ns.values() if isinstance(v, type) and v.__module__ == ns["__name__"])

    def from_main(obj):
        if isinstance(obj, own_types):
            return True
        if type(obj).__name__ in ("function", "generator", "frame"):
            glob = getattr(obj, "__globals__", None) or getattr(getattr(obj, "gi_frame", None), "f_globals", None) \
                or getattr(obj, "f_globals", None)
            return glob is ns
        return False

    gc.collect()
    gc.disable()
    try:
        outcomes = [server.login(name).authret["status"] for name in ("alice", "tz", "deny", "nobody", "alice")]
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [obj for obj in gc.garbage if from_main(obj)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert outcomes == [SUCCEED, FAIL, FAIL, FAIL, SUCCEED]
    assert left == [], "main.py objects freed only by the garbage collector: %r" % left[:10]
