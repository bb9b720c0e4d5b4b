"""Identity and input hardening, property-based tests, one approval for one login, TLS and
proxies, and config file safety (reliability and security issue)."""

import json
import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from asemu import FAIL, SUCCEED, AccessServer
from conftest import API_KEY, PASSWORD, USERS, settings_for
from fake_ivalt import FakeIvalt, Fault
import netfaults

DEADLINE = 3.0


# ----------------------------------------------------------------------------- identity

@pytest.mark.parametrize("username", ["alice", "alice ", " Alice", "ALICE", "EXAMPLE\\alice", "alice@example.com"])
def test_username_variants_resolve_to_one_user(fake, access_server, username):
    result = access_server().login(username)
    assert result.authret["status"] == SUCCEED
    assert fake.log[0].body == {"email": "alice@example.com"}
    assert result.authcred["password"] == PASSWORD  # the secrets check ran with a known password


@pytest.mark.parametrize("username", ["", "   ", None, 12345, "a" * 10000, "ali\x00ce", "alice\r", "alice\nid=x outcome=approved"])
def test_unusable_usernames_fail_without_an_api_call(fake, access_server, username, capfd):
    result = access_server().login(username=username)
    assert result.raised is None
    assert result.authret["status"] == FAIL
    assert result.authret["client_reason"] == "AUTHENTICATION_FAILED"
    assert "invalid_user" in result.authret["reason"]
    assert sum(fake.counts.values()) == 0
    out = capfd.readouterr().out
    assert "outcome=approved" not in out  # a newline in the name cannot forge a log line
    assert all(line.startswith("ivalt-2fa: ") for line in out.splitlines() if line)


# ----------------------------------------------------------------------------- property-based

usernames = st.one_of(st.none(), st.integers(), st.text(max_size=40), st.sampled_from(["alice", "ALICE ", "nobody", "tz"]),
                      st.binary(max_size=10), st.lists(st.text(max_size=3), max_size=2))
anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
                        max_leaves=8)


def dict_or_junk(fixed):
    """Access Server's dicts as they are, with keys missing, replaced by junk, or not a dict at all."""
    return st.one_of(
        st.fixed_dictionaries({}, optional={key: st.one_of(value, anything) for key, value in fixed.items()}),
        anything,
    )


@pytest.fixture(scope="module")
def quick_script(tmp_path_factory):
    """main.py loaded once, against a fake whose users answer at once (property tests are many)."""
    from asemu import load_script
    from conftest import MAIN, write_config

    with FakeIvalt(api_key=API_KEY) as server:
        server.add_user("alice@example.com", "+15551230001", behaviour="approve", after=0.1)
        server.add_user("tz@example.com", "+15551230002", behaviour="timezone", after=0.0)
        config = write_config(tmp_path_factory.mktemp("prop") / "c.py",
                              **settings_for(server.url, "thread", DEADLINE_SECONDS=1, LOG_LEVEL="info"))
        script = load_script(MAIN, env={"IVALT_CONFIG": config, "IVALT_SECRET_KEY": None, "IVALT_API_URL": None})
        yield script, server
        script.ns["shutdown"]()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    authcred=dict_or_junk({"username": usernames, "password": st.just(PASSWORD), "client_ip_addr": st.text(max_size=5)}),
    attributes=dict_or_junk({"vpn_auth": anything, "log_service_name": st.text(max_size=5), "client_info": anything}),
    authret=dict_or_junk({"status": st.sampled_from([SUCCEED, FAIL, None, "SUCCEED", 0]), "proplist": anything,
                          "reason": st.text(max_size=5)}),
    info=dict_or_junk({"auth_method": st.sampled_from(["local", "ldap", "session", "autologin", "saml", None, 7])}),
)
def test_post_auth_never_raises_and_never_lets_in_the_unapproved(quick_script, authcred, attributes, authret, info):
    script, server = quick_script
    before = dict(server.pushes_delivered)
    entry_status = authret.get("status") if isinstance(authret, dict) else None
    untouched = isinstance(info, dict) and info.get("auth_method") in ("session", "autologin")
    result = script.ns["post_auth"](authcred, attributes, authret, info)
    status = result.get("status") if isinstance(result, dict) else "not a dict"
    if status == SUCCEED:
        approved_now = server.pushes_delivered.get("+15551230001", 0) > before.get("+15551230001", 0)
        assert approved_now or (untouched and entry_status == SUCCEED), (authcred, authret, info)
    if not untouched and not isinstance(authret, dict):  # no primary result: nothing to approve
        assert status == FAIL and server.pushes_delivered == before, (authcred, authret, info)
    if not untouched and entry_status == SUCCEED:
        assert status in (SUCCEED, FAIL)
        if status == FAIL:
            assert result["client_reason"] and result["reason"]


def approves(status, body):
    """The one shape that is an approval: 200, an object whose data is an object with status true or absent."""
    return (status == 200 and isinstance(body, dict) and isinstance(body.get("data"), dict)
            and body["data"].get("status", True) is True and not body.get("error"))


json_bodies = st.one_of(
    anything,
    st.fixed_dictionaries({}, optional={"data": anything, "error": anything, "message": anything}),
    st.fixed_dictionaries({"data": st.fixed_dictionaries({}, optional={
        "status": anything, "details": st.one_of(anything, st.fixed_dictionaries(
            {"mobile_with_country_code": st.one_of(st.just("+15551230001"), anything)}))})}),
    st.fixed_dictionaries({"error": st.fixed_dictionaries({}, optional={"detail": anything, "title": anything})}),
)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(["lookup", "push", "poll"]),
       status=st.sampled_from([200, 200, 200, 201, 301, 400, 401, 403, 404, 410, 422, 429, 500, 503]),
       body=json_bodies)
def test_arbitrary_answers_never_approve_by_accident(endpoint, status, body):
    """Every endpoint answering arbitrary JSON, through the flow on a virtual clock (hundreds of
    cases in a second); the same classification runs under post_auth."""
    from test_unit import Clock, found, sent

    m = _main_ns()
    reply = m["Reply"](status, {"Content-Type": "application/json"}, json.dumps(body).encode())
    pending = m["Reply"](404, {}, b'{"error": {"detail": "The mobile number provided was not found."}}')
    normal = {"lookup": [found(m)], "push": [sent(m)], "poll": [pending]}
    normal[endpoint] = [pending, reply] if endpoint == "poll" else [reply]  # an approval counts after pending
    clock = Clock()
    config = m["_SETTINGS"]
    attempt = m["Attempt"]("alice@example.com", 0.0, 5.0)
    flow = m["verify"](attempt, config, m["RequestGate"](1000), m["WaitingLogins"](), clock)
    value = None
    try:
        while True:
            effect = flow.send(value)
            clock.now += effect.seconds if isinstance(effect, m["Sleep"]) else 0.05
            if isinstance(effect, m["Sleep"]):
                value = None
            else:
                queue = normal[effect.step]
                value = queue.pop(0) if len(queue) > 1 else queue[0]
    except StopIteration as stop:
        verdict = stop.value
    assert attempt.pushes <= 1
    if verdict.outcome == "approved":
        assert endpoint == "poll" and approves(status, body)
    elif endpoint == "poll" and approves(status, body):
        pytest.fail("an approval was not recognised: %r" % (body,))
    assert clock.now <= 5.0 + 0.05


_NS = []


def _main_ns():
    if not _NS:
        from asemu import load_script
        from conftest import MAIN

        _NS.append(load_script(MAIN, env={"IVALT_SECRET_KEY": "k-123456", "IVALT_API_URL": "https://api.ivalt.test",
                                          "IVALT_CONFIG": None}).ns)
    return _NS[0]


@pytest.mark.parametrize("endpoint", ["lookup", "push", "poll"])
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(status=st.sampled_from([200, 400, 401, 403, 404, 422, 500]), body=json_bodies)
def test_arbitrary_answers_through_post_auth(quick_script, endpoint, status, body):
    """The same property through the real post_auth and real HTTP (fewer cases: each takes up to
    the 1-second deadline)."""
    script, server = quick_script
    server.clear_faults()
    server.inject(endpoint, Fault.response(status, json.dumps(body)), times=None)
    try:
        before = server.pushes_delivered.get("+15551230001", 0)
        call = AccessServer(script).build_call(username="alice")
        result = script.ns["post_auth"](call.authcred, call.attributes, dict(call.authret_in), call.info)
    finally:
        server.clear_faults()
    delivered = server.pushes_delivered.get("+15551230001", 0) - before
    assert delivered <= 1
    if result["status"] == SUCCEED:
        # only the real flow: a push that reached alice's phone, and her approval after "pending"
        # (e.g. a faulted lookup that still named her mobile). An approval-shaped poll answer
        # from the very first poll is not taken: it could be left from an earlier push.
        assert delivered == 1 and endpoint != "poll"
    else:
        assert result["status"] == FAIL


# ----------------------------------------------------------------------------- hostile API text

HOSTILE = '<script>alert(1)</script> key=%s mobile +1 (555) 123-0001' % API_KEY


@pytest.mark.parametrize("endpoint, detail", [
    ("lookup", HOSTILE),
    ("push", HOSTILE),
    ("lookup", [{"loc": ["body"], "input": API_KEY, "msg": "<b>bad</b>"}, {"input": "+15551230001"}]),
])
def test_the_user_never_sees_the_apis_own_text(fake, access_server, capfd, endpoint, detail):
    """Not enrolled: the user sees our fixed sentence; the server log gets the API's detail, without
    markup, key or phone number (the API, or whatever answers in its place, can send anything)."""
    fake.inject(endpoint, Fault.response(404, {"data": None, "error": {"status": 404, "detail": detail}}))
    result = access_server().login("alice")
    out = capfd.readouterr().out
    assert result.authret["status"] == FAIL
    assert result.authret["client_reason"] == "The email provided (alice@example.com) was not found"
    reason = result.authret["reason"]
    assert "<" not in reason and ">" not in reason, reason
    assert API_KEY not in reason + out and "555) 123-0001" not in reason + out and "+15551230001" not in reason + out


def test_a_gateway_that_echoes_the_key_does_not_put_it_in_the_reason(fake, access_server, capfd):
    fake.inject("lookup", Fault.response(403, {"message": "Forbidden: invalid key %s" % API_KEY}))
    result = access_server().login("alice")
    assert result.authret["status"] == FAIL and "bad_key" in result.authret["reason"]
    assert API_KEY not in result.authret["reason"] and "[secret]" in result.authret["reason"]


def test_a_key_of_digits_is_removed_before_phone_numbers_are_masked(fake, load_main, capfd):
    key = "ZXk9Q-5551234567-abcd"  # digit masking first would leave "ZXk9Q-" and "-abcd" with the last digits
    fake.api_key = key
    script = load_main(**settings_for(fake.url, IVALT_SECRET_KEY=key))
    fake.inject("lookup", Fault.response(403, {"message": "Forbidden: %s" % key}))
    result = AccessServer(script).login("alice")
    text = result.authret["reason"] + capfd.readouterr().out
    assert "ZXk9Q" not in text and "abcd" not in text, text


@pytest.mark.parametrize("username", ["\udcffalice", "a\udcff", "ali\u200bce"])
def test_an_unwritable_username_still_gets_its_log_lines(fake, access_server, capfd, username):
    result = access_server().login(username=username)
    out = capfd.readouterr().out
    assert result.authret["status"] == FAIL and "invalid_user" in result.authret["reason"]
    assert "login start" in out and "login end" in out and "outcome=invalid_user" in out


def test_a_poll_answer_nested_too_deep_for_the_parser_fails_closed_with_its_end_line(fake, access_server, capfd):
    fake.inject("poll", Fault.response(200, "[" * 50000, "application/json"), times=None)
    result = access_server(DEADLINE_SECONDS=1, CALL_TIMEOUT_SECONDS=1).login("alice")
    out = capfd.readouterr().out
    assert result.authret["status"] == FAIL and "non-JSON body" in result.authret["reason"], result.authret
    assert "outcome=unavailable" in out


def test_logins_paused_by_another_logins_429_say_throttled(fake, access_server):
    fake.inject("lookup", Fault.response(429, {"message": "Too Many Requests"}, headers={"Retry-After": "20"}))
    server = access_server()
    first = server.login("alice")
    second = server.login("tz")  # arrives during the 20 s shared pause, which outlasts its deadline
    assert "throttled" in first.authret["reason"]
    assert second.authret["status"] == FAIL and second.authret["reason"].startswith("iVALT throttled: "), second.authret
    assert second.authret["client_reason"] == "SERVICE_UNAVAILABLE"


# ----------------------------------------------------------------------------- one approval, one login

def test_a_second_login_of_the_same_user_fails_while_the_first_waits(fake, access_server, mode):
    fake.add_user("carol@example.com", "+15551239999", behaviour="approve", after=1.0)
    server = access_server()
    first = server.start_login(username="carol")
    while fake.pushes_delivered.get("+15551239999", 0) == 0:  # the first login is waiting now
        threading.Event().wait(0.02)
    second = server.login(username="Carol ")
    first.wait(10)
    assert first.authret["status"] == SUCCEED
    assert second.authret["status"] == FAIL
    assert second.authret["client_reason"] == "LOGIN_ALREADY_IN_PROGRESS"
    assert "already waiting" in second.authret["reason"]
    assert second.elapsed < 0.5  # at once, not after the first one
    assert fake.pushes_delivered["+15551239999"] == 1  # the second login sent no push
    third = server.login(username="carol")  # once the first is done, the user can log in again
    assert third.authret["status"] == SUCCEED


# ----------------------------------------------------------------------------- TLS and proxies

@pytest.fixture(scope="module")
def ca():
    return netfaults.make_ca()


def https_fake(context):
    server = FakeIvalt(api_key=API_KEY, ssl_context=context).start()
    for email, (mobile, behaviour, after, pending) in USERS.items():
        server.add_user(email, mobile, behaviour=behaviour, after=after, pending_style=pending)
    return server


def test_https_with_a_ca_bundle(ca, tmp_path, load_main, mode):
    bundle = netfaults.write_ca_bundle(ca, tmp_path / "ca.pem")
    server = https_fake(netfaults.server_context(ca))
    try:
        script = load_main(**settings_for(server.url, mode, CA_BUNDLE=bundle))
        result = AccessServer(script).login("alice")
        assert result.authret["status"] == SUCCEED
        assert server.counts["poll"] >= 2 and server.connections == 1  # one TLS handshake for the whole login
    finally:
        server.stop()


@pytest.mark.parametrize("context, fault", [(netfaults.untrusted_context, "TLS certificate not trusted"),
                                            ("mismatch", "TLS hostname mismatch")])
def test_tls_is_always_verified(ca, tmp_path, load_main, mode, context, fault):
    bundle = netfaults.write_ca_bundle(ca, tmp_path / "ca.pem")
    server = https_fake(netfaults.mismatched_context(ca) if context == "mismatch" else context())
    try:
        script = load_main(**settings_for(server.url, mode, CA_BUNDLE=bundle, FAIL_MODE="open"))
        result = AccessServer(script).login("alice")
        assert result.authret["status"] == FAIL  # even in fail-open mode: it may be an attacker
        assert fault in result.authret["reason"]
        assert result.authret["client_reason"] == "SERVICE_UNAVAILABLE"
        assert result.elapsed < 1.5  # a TLS failure does not clear by waiting
        assert server.counts["lookup"] == 0  # the request (and the key) never reached it
    finally:
        server.stop()


def test_proxy_tunnel_checks_the_api_host_not_the_proxy(ca, tmp_path, load_main, mode):
    bundle = netfaults.write_ca_bundle(ca, tmp_path / "ca.pem")
    # The certificate names only "localhost"; the proxy is reached as 127.0.0.1. A client that
    # checked the certificate against the proxy's name would fail here.
    server = https_fake(netfaults.tls_context(ca, ("localhost",)))
    try:
        with netfaults.ConnectProxy() as proxy:
            script = load_main(**settings_for(server.url, mode, CA_BUNDLE=bundle, HTTPS_PROXY=proxy.url))
            result = AccessServer(script).login("alice")
            assert result.authret["status"] == SUCCEED
            assert proxy.targets and set(proxy.targets) == {"localhost:%d" % server.port}
            assert fake_saw_key_only_in_header(server)
    finally:
        server.stop()


def test_proxy_tunnel_still_refuses_a_wrong_certificate(ca, tmp_path, load_main, mode):
    bundle = netfaults.write_ca_bundle(ca, tmp_path / "ca.pem")
    server = https_fake(netfaults.mismatched_context(ca))
    try:
        with netfaults.ConnectProxy() as proxy:
            script = load_main(**settings_for(server.url, mode, CA_BUNDLE=bundle, HTTPS_PROXY=proxy.url))
            result = AccessServer(script).login("alice")
            assert result.authret["status"] == FAIL and "TLS hostname mismatch" in result.authret["reason"]
    finally:
        server.stop()


def fake_saw_key_only_in_header(server):
    return all(r.headers.get("x-api-key") == API_KEY and API_KEY not in str(r.body) for r in server.log)


def test_environment_proxy_variables_are_ignored(fake, access_server, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:%d" % netfaults.refused_port())
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:%d" % netfaults.refused_port())
    assert access_server().login("alice").authret["status"] == SUCCEED


# ----------------------------------------------------------------------------- config file safety

def login_with_config(load_main, text, mode="thread", chmod=0o600, env=None):
    script = load_main(**settings_for("http://127.0.0.1:9", mode))
    path = script.ns["_SETTINGS"].config_file
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, chmod)
    from asemu import load_script
    from conftest import MAIN

    environ = {"IVALT_CONFIG": path, "IVALT_SECRET_KEY": None, "IVALT_API_URL": None}
    environ.update(env or {})
    reloaded = load_script(MAIN, env=environ)
    try:
        return AccessServer(reloaded).login("alice"), reloaded.ns["_SETTINGS"]
    finally:
        reloaded.ns["shutdown"]()


GOOD = 'IVALT_SECRET_KEY = "%s"\nIVALT_API_URL = "http://127.0.0.1:9"\n' % API_KEY


@pytest.mark.parametrize("text, chmod, expected", [
    (GOOD, 0o620, "writable by group or others"),
    (GOOD, 0o602, "writable by group or others"),
    (GOOD + "DEADLINE_SECONDS = 60 +\n", 0o600, "syntax error at line 3"),
    (GOOD + 'DEADLINE_SECONDS = "60"\n', 0o600, "DEADLINE_SECONDS must be a number"),
    (GOOD + 'POLL_INTERVAL_SECONDS = "1"\n', 0o600, "POLL_INTERVAL_SECONDS must be a number"),
    (GOOD + "FAIL_MODE = 'sometimes'\n", 0o600, "FAIL_MODE must be one of"),
    (GOOD + "import os\n", 0o600, "only NAME = value lines"),
    (GOOD + "DEADLINE_SECONDS = __import__('os').getpid()\n", 0o600, "must be a plain value"),
    (GOOD + "DEADLNE_SECONDS = 30\n", 0o600, "unknown setting DEADLNE_SECONDS"),
    (GOOD + "BYPASS_USERS = 'admin'\n", 0o600, "BYPASS_USERS must be a list"),
    (GOOD + "REQUIRE_FOR_WEB_LOGIN = 'no'\n", 0o600, "REQUIRE_FOR_WEB_LOGIN must be True or False"),
    ('IVALT_SECRET_KEY = "<ivalt_secret_key>"\n', 0o600, "IVALT_SECRET_KEY is not configured"),
    ('IVALT_SECRET_KEY = 98765432\nIVALT_API_URL = "http://127.0.0.1:9"\n', 0o600,
     "IVALT_SECRET_KEY must be text in quotes, got int (line 1"),
    ('IVALT_SECRET_KEY = "%s"\nIVALT_API_URL = "https://user:pw-s3cret@api.ivalt.com"\n' % API_KEY, 0o600,
     "'https://user:***@api.ivalt.com' is not a valid"),
    ('IVALT_SECRET_KEY = ""\n', 0o600, "IVALT_SECRET_KEY is not configured"),
    ('IVALT_SECRET_KEY = "%s"\nIVALT_API_URL = "http://api.ivalt.com"\n' % API_KEY, 0o600, "must use https://"),
    ('IVALT_SECRET_KEY = "%s"\nIVALT_API_URL = "http://127.evil.example"\n' % API_KEY, 0o600, "must use https://"),
    (GOOD + 'FAIL_MODE = "closed"\nFAIL_MODE = "open"\n', 0o600, "line 4: FAIL_MODE is set twice (first on line 3)"),
    (GOOD + "BYPASS_USERS = {[]: 1}\n", 0o600, "BYPASS_USERS must be a plain value"),
    (GOOD + "EXEMPT_GROUPS = {[1]}\n", 0o600, "EXEMPT_GROUPS must be a plain value"),
    (GOOD + "DEADLINE_SECONDS = " + "-" * 100000 + "1\n", 0o600, "config file"),
    (GOOD + "HTTP_THREADS = 0x" + "f" * 5000 + "\n", 0o600, "HTTP_THREADS must be a number from 1 to 64"),
    (GOOD + "BYPASS_USERS = " + "[" * 5000 + "]" * 5000 + "\n", 0o600, "config file"),
    (GOOD + 'CA_BUNDLE = "/nonexistent/ca.pem"\n', 0o600, "CA_BUNDLE /nonexistent/ca.pem is not a readable file"),
])
def test_bad_config_fails_every_login_closed_with_a_clear_reason(load_main, capfd, text, chmod, expected):
    result, loaded = login_with_config(load_main, text, chmod=chmod)
    out = capfd.readouterr().out
    assert "98765432" not in out + result.authret["reason"] and "pw-s3cret" not in out + result.authret["reason"]
    assert result.raised is None
    assert result.authret["status"] == FAIL
    assert result.authret["client_reason"] == "SERVICE_MISCONFIGURED"
    assert "config_error" in result.authret["reason"] and expected in result.authret["reason"]
    assert any(expected in problem for problem in loaded.errors)


@pytest.mark.parametrize("folder_mode, refused", [(0o777, True), (0o770, True), (0o1777, False), (0o755, False)])
def test_config_in_a_folder_others_can_write_is_refused(fake, tmp_path, folder_mode, refused):
    """Whoever can write the folder can swap the file for one of their own (unless sticky)."""
    from asemu import load_script
    from conftest import MAIN, write_config

    folder = tmp_path / "etc"
    folder.mkdir()
    path = write_config(folder / "ivalt_config.py", **settings_for(fake.url))
    os.chmod(str(folder), folder_mode)
    script = load_script(MAIN, env={"IVALT_CONFIG": path, "IVALT_SECRET_KEY": None, "IVALT_API_URL": None})
    try:
        result = AccessServer(script).login("alice")
    finally:
        script.ns["shutdown"]()
        os.chmod(str(folder), 0o700)
    if refused:
        assert result.authret["status"] == FAIL and result.authret["client_reason"] == "SERVICE_MISCONFIGURED"
        assert "config file folder %s is writable by group or others" % folder in result.authret["reason"]
        assert sum(fake.counts.values()) == 0
    else:
        assert result.authret["status"] == SUCCEED


def test_a_symlink_or_a_subfolder_does_not_hide_a_folder_others_can_write(fake, tmp_path):
    from asemu import load_script
    from conftest import MAIN, write_config

    safe, open_to_all = tmp_path / "safe", tmp_path / "open"
    safe.mkdir()
    open_to_all.mkdir()
    (open_to_all / "sub").mkdir()
    real = write_config(safe / "ivalt_config.py", **settings_for(fake.url))
    os.symlink(real, str(open_to_all / "link.py"))
    nested = write_config(open_to_all / "sub" / "ivalt_config.py", **settings_for(fake.url))
    os.chmod(str(open_to_all), 0o777)
    try:
        for path in (str(open_to_all / "link.py"), nested):
            script = load_script(MAIN, env={"IVALT_CONFIG": path, "IVALT_SECRET_KEY": None, "IVALT_API_URL": None})
            script.ns["shutdown"]()
            assert any("config file folder %s is writable by group or others" % open_to_all in problem
                       for problem in script.ns["_SETTINGS"].errors), (path, script.ns["_SETTINGS"].errors)
    finally:
        os.chmod(str(open_to_all), 0o700)


def test_an_invalid_inline_setting_never_skips_the_second_factor(fake):
    """A setting that failed its check has no trustworthy value: REQUIRE_FOR_WEB_LOGIN = "no" at the
    top of main.py once made web logins pass without iVALT."""
    from asemu import load_script
    from conftest import MAIN

    text = open(MAIN).read().replace("REQUIRE_FOR_WEB_LOGIN = True", 'REQUIRE_FOR_WEB_LOGIN = "no"', 1)
    script = load_script(text, env={"IVALT_SECRET_KEY": API_KEY, "IVALT_API_URL": fake.url, "IVALT_CONFIG": None})
    try:
        for vpn in (False, True):
            result = AccessServer(script).login("alice", vpn=vpn)
            assert result.authret["status"] == FAIL and "REQUIRE_FOR_WEB_LOGIN must be True or False" in result.authret["reason"]
    finally:
        script.ns["shutdown"]()
    assert sum(fake.counts.values()) == 0


def test_a_fifo_as_config_file_is_refused_without_hanging(tmp_path):
    from asemu import load_script
    from conftest import MAIN

    path = str(tmp_path / "ivalt_config.py")
    os.mkfifo(path, 0o600)
    script = load_script(MAIN, env={"IVALT_CONFIG": path, "IVALT_SECRET_KEY": API_KEY, "IVALT_API_URL": "http://127.0.0.1:9"})
    script.ns["shutdown"]()
    assert any("is not a regular file" in problem for problem in script.ns["_SETTINGS"].errors)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the file to another user")
def test_config_owned_by_another_user_is_refused(load_main):
    script = load_main(**settings_for("http://127.0.0.1:9"))
    os.chown(script.ns["_SETTINGS"].config_file, 4242, 4242)
    from asemu import load_script
    from conftest import MAIN

    reloaded = load_script(MAIN, env={"IVALT_CONFIG": script.ns["_SETTINGS"].config_file})
    result = AccessServer(reloaded).login("alice")
    reloaded.ns["shutdown"]()
    assert result.authret["status"] == FAIL and "owned by uid 4242" in result.authret["reason"]


def test_a_missing_named_config_file_fails_closed(load_main):
    from asemu import load_script
    from conftest import MAIN

    script = load_script(MAIN, env={"IVALT_CONFIG": "/nonexistent/ivalt.py", "IVALT_SECRET_KEY": API_KEY,
                                    "IVALT_API_URL": "http://127.0.0.1:9"})
    result = AccessServer(script).login("alice")
    script.ns["shutdown"]()
    assert result.authret["status"] == FAIL and "cannot be read" in result.authret["reason"]


def test_environment_overrides_key_and_url(fake, load_main):
    result, loaded = login_with_config(load_main, 'IVALT_SECRET_KEY = "wrong"\nIVALT_API_URL = "https://x.invalid"\n'
                                       'EMAIL_DOMAIN = "example.com"\nDEADLINE_SECONDS = 3\n',
                                       env={"IVALT_SECRET_KEY": API_KEY, "IVALT_API_URL": fake.url})
    assert not loaded.errors and result.authret["status"] == SUCCEED


def test_config_example_documents_every_setting_and_parses():
    from conftest import ROOT

    m = _main_ns()
    path = os.path.join(ROOT, "config.example.py")
    values = m["_read_config_file"](path) if os.stat(path).st_mode & 0o022 == 0 else None
    text = open(path).read()
    for name in m["_SETTING_CHECKS"]:
        assert "\n%s = " % name in text, "config.example.py does not document %s" % name
    if values is not None:
        assert set(values) == set(m["_SETTING_CHECKS"])


def test_missing_requests_fails_closed_with_install_hint(tmp_path):
    from asemu import load_script
    from conftest import MAIN

    blocker = tmp_path / "requests.py"
    blocker.write_text("raise ImportError('requests is not installed here')\n")
    import sys

    saved = {name: module for name, module in sys.modules.items() if name == "requests" or name.startswith("requests.")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(tmp_path))
    try:
        script = load_script(MAIN, env={"IVALT_SECRET_KEY": API_KEY, "IVALT_API_URL": "http://127.0.0.1:9",
                                        "IVALT_CONFIG": None})
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("requests", None)
        sys.modules.update(saved)
    assert script.ns["requests"] is None
    result = AccessServer(script).login("alice")
    assert result.authret["status"] == FAIL and "pip install requests" in result.authret["reason"]


def test_without_pyovpn_the_script_uses_its_own_constants():
    from asemu import load_script, without_pyovpn
    from conftest import MAIN

    with without_pyovpn():
        script = load_script(MAIN, env={"IVALT_SECRET_KEY": API_KEY, "IVALT_CONFIG": None})
    assert (script.ns["SUCCEED"], script.ns["FAIL"]) == ("SUCCEED", "FAIL")
    loaded = load_script(MAIN, env={"IVALT_SECRET_KEY": API_KEY, "IVALT_CONFIG": None})
    assert (loaded.ns["SUCCEED"], loaded.ns["FAIL"]) == (SUCCEED, FAIL)
    assert "__file__" not in loaded.ns and loaded.ns["SYNCHRONOUS"] is False
