"""Fault matrix, end to end: Access Server's calling convention -> the real post_auth -> real
HTTP -> a fake iVALT API (or a network) that misbehaves.

For each of the three API calls (lookup, push, poll) and each fault, a login must: raise
nothing; FAIL (never SUCCEED) unless the user approved; name the fault class in `reason`; show
the user a short fixed `client_reason`; deliver at most one push; return within the deadline
plus SLACK. A fault that clears within the deadline still ends approved.

FAIL_MODE: each matrix test runs the same login twice at once, with FAIL_MODE "closed" against
the `fake` fixture and with FAIL_MODE "open" against a twin fake given the same fault (at once, so
the file stays quick). "closed" fails every fault; "open" lets the login through only on an
outage (network error, timeout, 5xx, non-JSON) met before iVALT said anything about the login,
and says so loudly in the log; TLS failures, throttling, wrong-shape JSON and every answer from
iVALT (denial, time window, geofence, unknown user, bad key, no answer from the user) still fail.

Network-level faults (refused, DNS, connect timeout, TLS) concern the host. They hit the lookup
when the host is unreachable from the start, and the push or the poll when it goes away in the
middle of a login: there the earlier calls are answered with "Connection: close", so the next
call connects (and resolves the name) again, and a patched resolver sends it to the fault. Every
test runs in both wait modes (the `mode` fixture, behind `access_server` and `fail_modes`).
"""

import re
import socket
import threading

import pytest

import netfaults
from asemu import FAIL, SUCCEED, AccessServer
from conftest import API_KEY, USERS, add_users, settings_for
from fake_ivalt import ENDPOINT_PATHS, FakeIvalt, Fault

DEADLINE = 3.0  # settings_for() default
SLACK = 2.0  # post_auth must return within the deadline plus this, whatever the API does
# A persistent fault runs a login to its deadline: the shortest one allowed keeps the matrix quick.
# The call timeout (also the shortest allowed) is then no longer than the deadline.
FAST_DEADLINE = 1.0
FAST = dict(DEADLINE_SECONDS=FAST_DEADLINE, CALL_TIMEOUT_SECONDS=1)
ALICE_MOBILE = USERS["alice@example.com"][0]
FIXED_CLIENT_REASON = re.compile(r"^[A-Z_]{1,40}$")  # SERVICE_UNAVAILABLE and its kind
ENDPOINTS = ["lookup", "push", "poll"]

HTML_500 = ("<!DOCTYPE html><html><head><title>500 Internal Server Error</title></head><body>"
            "<h1>Internal Server Error</h1><p>Traceback (most recent call last): ...</p></body></html>")
HTML_504 = ("<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
            "<center><h1>504 Gateway Time-out</h1></center>\r\n</body>\r\n</html>\r\n")
SERVICE_UNAVAILABLE_503 = Fault.response(503, {"message": "Service Unavailable"})


def pending_404(mobile=ALICE_MOBILE):
    """The geo-fence endpoint's "not answered yet", as iVALT (and the fake) sends it."""
    return Fault.response(404, {"data": None, "error": {
        "type": "https://httpstatuses.com/404", "title": "Not Found", "status": 404,
        "detail": "The mobile number provided (%s) was not found." % mobile,
        "instance": "/services/biometric-geo-fence-auth-results"}})


# Outages: no usable answer from the service; the same fault class at every endpoint.
OUTAGES = [
    pytest.param(Fault.hang(), "read timeout", id="hang"),
    pytest.param(Fault.close(), "connection closed", id="close"),
    pytest.param(Fault.close_mid(), "connection closed", id="close_mid"),
    pytest.param(Fault.drip(interval=0.2), "read timeout", id="drip"),
    pytest.param(Fault.huge(), "response too large", id="huge_10MB"),
    pytest.param(Fault.response(500, HTML_500, "text/html"), "HTTP 500 (text/html", id="500_html"),
    pytest.param(Fault.response(502, "Bad Gateway", "text/plain"), "HTTP 502 (text/plain", id="502_text"),
    pytest.param(SERVICE_UNAVAILABLE_503, "HTTP 503 (application/json", id="503_json"),
    pytest.param(Fault.response(504, HTML_504, "text/html"), "HTTP 504 (text/html", id="504_html"),
    pytest.param(Fault.response(200, '{"data": {"status": tru', "application/json"),
                 "HTTP 200 with a non-JSON body", id="200_invalid_json"),
]

# (fault, text the reason must hold, deadline)
THROTTLES = [
    # Without Retry-After the wait is 2 s: more than the 1 s deadline leaves, so it gives up at once.
    pytest.param(Fault.response(429, {"message": "Too Many Requests"}), "Retry-After not given", FAST_DEADLINE,
                 id="429_no_retry_after"),
    pytest.param(Fault.response(429, {"message": "Limit Exceeded"}, headers={"Retry-After": "1"}),
                 "Retry-After 1 s: the next try, 1s away, would pass the deadline", 2.0, id="429_retry_after_1"),
    pytest.param(Fault.response(429, {"message": "Too Many Requests"}, headers={"Retry-After": "3600"}),
                 "Retry-After 3600 s: the next try, 3600s away", DEADLINE, id="429_retry_after_too_long"),
]

# 200 answers of the wrong shape. "details missing" and "mobile not a string" only concern the
# lookup, whose details carry the mobile: the push's details are null anyway, and a poll's 200
# with data.status true is an approval whatever its details say (ivalt-api.md: "200 alone: C"),
# so at those endpoints such a body is a (faked) answer, not a fault.
DATA_NULL = {"data": None, "error": None}
DETAIL_LIST = {"data": None, "error": {"type": "https://httpstatuses.com/422", "title": "Unprocessable Entity",
                                       "status": 422, "detail": [{"loc": ["body", "email"], "msg": "field required"}]}}
WRONG_SHAPES = {
    "data_null": DATA_NULL,
    "details_missing": {"data": {"status": True, "message": "User details."}, "error": None},
    "mobile_not_a_string": {"data": {"status": True, "message": "User details.",
                                     "details": {"mobile_with_country_code": 15551230001}}, "error": None},
    "error_detail_a_list": DETAIL_LIST,
}
WRONG_SHAPE_DETAIL = {
    "lookup": "the user lookup answered 200 without a usable mobile number",
    "push": "the push answered 200 without a confirmation",
    "poll": "the result poll answered 200 without an approval in it",
}


# -------------------------------------------------------------------------------------------------
# Checks
# -------------------------------------------------------------------------------------------------


def pushes(fake):
    return sum(fake.pushes_delivered.values())


def login_lines(out, result):
    """This login's log lines (two logins may share the captured output)."""
    login_id = re.search(r"\(id=([a-z]+)\)", result.authret["reason"]).group(1)
    lines = [line for line in out.splitlines() if "id=%s" % login_id in line]
    assert lines and "login start" in lines[0], out
    return "\n".join(lines)


def check_failed(result, fake, outcome, details, deadline, client_reason="SERVICE_UNAVAILABLE", out=None):
    """What every faulted login must show. `details`: texts `reason` must hold (stage, fault class)."""
    assert result.raised is None, result.traceback
    authret = result.authret
    assert authret["status"] == FAIL, authret
    reason = authret["reason"]
    assert reason.startswith("iVALT %s: " % outcome), reason
    for text in (details,) if isinstance(details, str) else details:
        assert text in reason, reason
    assert API_KEY not in reason and "\n" not in reason and len(reason) <= 400
    assert FIXED_CLIENT_REASON.match(authret["client_reason"]), authret["client_reason"]
    assert authret["client_reason"] == client_reason, authret
    assert pushes(fake) <= 1, fake.pushes_delivered
    assert result.elapsed <= deadline + SLACK, result
    if out is not None:
        lines = login_lines(out, result)
        assert "FAIL-OPEN" not in lines and lines.count("login end") == 1, lines


def check_failed_open(result, fake, deadline, details, out):
    """FAIL_MODE open let an outage through, and said so loudly."""
    assert result.raised is None, result.traceback
    assert result.authret["status"] == SUCCEED, result.authret
    assert result.authret["reason"].startswith("iVALT unreachable, login allowed by FAIL_MODE open")
    lines = login_lines(out, result)
    warnings = [line for line in lines.splitlines() if "FAIL-OPEN" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], lines
    assert "outcome=failed_open" in lines and "fail_mode=open-applied" in lines, lines
    for text in (details,) if isinstance(details, str) else details:
        assert text in warnings[0], warnings[0]
    assert pushes(fake) <= 1, fake.pushes_delivered
    assert result.elapsed <= deadline + SLACK, result


def check_approved(result, fake, deadline=DEADLINE):
    assert result.raised is None, result.traceback
    assert result.authret["status"] == SUCCEED, result.authret
    assert result.authret["reason"] == "" and result.authret["client_reason"] == ""
    assert pushes(fake) == 1
    assert result.elapsed <= deadline + SLACK, result


def check_stage(fake, endpoint):
    """The login got as far as `endpoint` and no further; no push was delivered twice."""
    if endpoint == "lookup":
        assert fake.counts["push"] == 0 and fake.counts["poll"] == 0
        assert pushes(fake) == 0
    elif endpoint == "push":
        assert fake.counts["lookup"] == 1 and fake.counts["poll"] == 0
    else:
        assert fake.counts["lookup"] == 1 and fake.counts["push"] == 1 and fake.counts["poll"] >= 1
        assert pushes(fake) == 1


def stage(endpoint, detail):
    return ("during the %s: " % endpoint, detail)


# -------------------------------------------------------------------------------------------------
# Fixtures
# -------------------------------------------------------------------------------------------------


class Twin:
    """One of the two logins of fail_modes(): its fake and its LoginResult."""

    def __init__(self, fake, result):
        self.fake = fake
        self.result = result


@pytest.fixture
def fail_modes(fake, load_main, mode):
    """fail_modes(inject=None, user="alice", url=None, **settings) -> {"closed": Twin, "open": Twin}.

    The same login, run twice at once: FAIL_MODE "closed" against `fake`, FAIL_MODE "open"
    against a twin fake. inject(fake) prepares each fake; `url` replaces both fakes' URLs."""
    twins = []

    def run(inject=None, user="alice", url=None, **overrides):
        other = FakeIvalt(api_key=API_KEY).start()
        twins.append(other)
        add_users(other)
        fakes = {"closed": fake, "open": other}
        started = {}
        for fail_mode, server in fakes.items():
            if inject is not None:
                inject(server)
            script = load_main(**settings_for(url or server.url, mode, FAIL_MODE=fail_mode, **overrides))
            started[fail_mode] = AccessServer(script).start_login(username=user)
        return {fail_mode: Twin(fakes[fail_mode], call.wait(60)) for fail_mode, call in started.items()}

    yield run
    for other in twins:
        other.stop()


@pytest.fixture
def host(tmp_path):
    """host(kind) -> (url, extra settings, the TLS fake or None) for a host-level fault."""
    cleanup = []
    ca = netfaults.make_ca()
    bundle = netfaults.write_ca_bundle(ca, tmp_path / "ca.pem")

    def tls(context):
        server = FakeIvalt(api_key=API_KEY, ssl_context=context).start()
        cleanup.append(server.stop)
        add_users(server)
        return server.url, {"CA_BUNDLE": bundle}, server

    def make(kind):
        if kind == "refused":
            return "http://127.0.0.1:%d" % netfaults.refused_port(), {}, None
        if kind == "dns":
            # https: plain http is only accepted for loopback. DNS fails before any TLS.
            return "https://ivalt-fault-test.invalid", {}, None
        if kind == "blackhole":
            hole = netfaults.Blackhole()
            cleanup.append(hole.close)
            return hole.url, {}, None
        if kind == "tls_trusted":
            return tls(netfaults.server_context(ca))
        if kind == "tls_untrusted":
            return tls(netfaults.untrusted_context())
        if kind == "tls_mismatch":
            return tls(netfaults.mismatched_context(ca))
        raise ValueError(kind)

    yield make
    for close in reversed(cleanup):
        close()


# -------------------------------------------------------------------------------------------------
# Host-level faults: they hit whatever call comes first, the lookup
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, detail", [
    pytest.param("refused", "connection refused", id="refused"),
    pytest.param("dns", "DNS lookup failed", id="dns"),
    pytest.param("blackhole", "connect timeout", id="blackhole"),
])
def test_unreachable_host(fail_modes, host, capfd, kind, detail):
    url, extra, _ = host(kind)
    runs = fail_modes(url=url, **dict(FAST, **extra))
    out = capfd.readouterr().out
    closed, opened = runs["closed"], runs["open"]
    check_failed(closed.result, closed.fake, "unavailable", stage("lookup", detail), FAST_DEADLINE, out=out)
    assert closed.result.elapsed >= FAST_DEADLINE - 0.3  # retried until the deadline
    check_failed_open(opened.result, opened.fake, FAST_DEADLINE, stage("lookup", detail), out)
    assert sum(closed.fake.counts.values()) == 0 and sum(opened.fake.counts.values()) == 0


@pytest.mark.parametrize("kind, detail", [
    pytest.param("tls_untrusted", "TLS certificate not trusted", id="tls_untrusted"),
    pytest.param("tls_mismatch", "TLS hostname mismatch", id="tls_mismatch"),
])
def test_tls_failure_never_fails_open(fail_modes, host, capfd, kind, detail):
    """A TLS failure may be an attacker in the path: never a reason to let anyone in."""
    url, extra, tls_fake = host(kind)
    runs = fail_modes(url=url, **dict(FAST, **extra))
    out = capfd.readouterr().out
    for run in runs.values():
        check_failed(run.result, run.fake, "unavailable", stage("lookup", detail), FAST_DEADLINE, out=out)
        assert run.result.elapsed < 0.8  # it will not clear by retrying: it ends at once
    assert tls_fake.log == []  # the handshake failed: no request, so no key, went out


def test_tls_control_trusted_certificate_is_approved(fake, access_server, host):
    """The TLS failures above have their own cause: with a good certificate the same setup works."""
    url, extra, tls_fake = host("tls_trusted")
    result = access_server(url=url, **extra).login("alice")
    check_approved(result, tls_fake)
    assert [record.endpoint for record in tls_fake.log][:2] == ["lookup", "push"]


def test_dns_lookup_that_hangs_still_ends_by_the_deadline(fail_modes, monkeypatch, capfd):
    """requests cannot bound getaddrinfo (a resolver that does not answer takes 5 s a try, per
    name server): post_auth must return by the deadline all the same, in both wait modes, and
    the hang is an outage like any other for FAIL_MODE."""
    release = threading.Event()
    resolve = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host == "hanging-dns.example":
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        runs = fail_modes(url="https://hanging-dns.example", **FAST)
    finally:
        release.set()
    out = capfd.readouterr().out
    closed, opened = runs["closed"], runs["open"]
    check_failed(closed.result, closed.fake, "unavailable", stage("lookup", "did not finish"), FAST_DEADLINE, out=out)
    check_failed_open(opened.result, opened.fake, FAST_DEADLINE, stage("lookup", "did not finish"), out)


def test_call_that_hangs_is_given_up_and_the_login_goes_on(fake, access_server, monkeypatch):
    """A call that requests cannot bound (here the first DNS lookup never answers) is given up
    CALL_TIMEOUT + 0.5 s in, like an outage, and the flow goes on (the lookup is retried): in both
    wait modes the login ends approved, well before the deadline. The hung lookup holds only one
    of the script's HTTP threads, until it is released."""
    release, hung = threading.Event(), []
    resolve = socket.getaddrinfo

    def first_hangs(host, *args, **kwargs):
        if host == "localhost" and not hung:
            hung.append(host)
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", first_hangs)
    try:
        result = access_server(url="http://localhost:%d" % fake.port, DEADLINE_SECONDS=8,
                               CALL_TIMEOUT_SECONDS=1).login(username="alice")
    finally:
        release.set()
    check_approved(result, fake, deadline=8)
    assert hung == ["localhost"]
    assert fake.counts["lookup"] == 1 and fake.counts["push"] == 1  # the hung lookup never reached iVALT
    assert 1.5 <= result.elapsed < 5.0, result  # given up at 1.5 s, not held to the deadline


# -------------------------------------------------------------------------------------------------
# Host-level faults in the middle of a login: the host goes away after the lookup, or after the push
# -------------------------------------------------------------------------------------------------

SWITCH_HOST = "ivalt-switch.test"  # resolved by Switch only: never by real DNS


class Switch:
    """A resolver for SWITCH_HOST, per URL port (one per fail mode): the first `healthy`
    resolutions give the healthy TLS fake, later ones the fault's address, or an error for "dns"."""

    def __init__(self, monkeypatch):
        self.routes = {}  # URL port -> [healthy resolutions left, healthy port, fault, fault port]
        self._lock = threading.Lock()
        self._resolve = socket.getaddrinfo
        monkeypatch.setattr(socket, "getaddrinfo", self.getaddrinfo)

    def route(self, url_port, healthy, fault, fault_port):
        self.routes[url_port] = [healthy, url_port, fault, fault_port]

    def getaddrinfo(self, host, port, *args, **kwargs):
        if host != SWITCH_HOST:
            return self._resolve(host, port, *args, **kwargs)
        with self._lock:
            route = self.routes[int(port)]
            route[0] -= 1
            healthy = route[0] >= 0
        if healthy:
            return self._resolve("127.0.0.1", route[1], *args, **kwargs)
        if route[2] == "dns":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self._resolve("127.0.0.1", route[3], *args, **kwargs)


CLOSE = {"Connection": "close"}  # the next call must connect again
LOOKUP_THEN_CLOSE = Fault.response(200, {"data": {"status": True, "message": "User details.", "details": {
    "mobile_with_country_code": ALICE_MOBILE}}, "error": None}, headers=CLOSE)
PUSH_THEN_CLOSE = Fault.response(200, {"data": {"status": True, "message": "Biometric Auth Request successfully sent.",
                                                "details": None}, "error": None}, headers=CLOSE)
MIDWAY = [  # (fault, text the reason must hold, whether FAIL_MODE open lets it through)
    pytest.param("refused", "connection refused", True, id="refused"),
    pytest.param("dns", "DNS lookup failed", True, id="dns"),
    pytest.param("blackhole", "connect timeout", True, id="blackhole"),
    pytest.param("tls_untrusted", "TLS certificate not trusted", False, id="tls_untrusted"),
    pytest.param("tls_mismatch", "TLS hostname mismatch", False, id="tls_mismatch"),
]


@pytest.mark.parametrize("endpoint", ["push", "poll"])
@pytest.mark.parametrize("fault, detail, opens", MIDWAY)
def test_host_goes_away_in_the_middle_of_a_login(load_main, mode, tmp_path, monkeypatch, capfd, endpoint, fault,
                                                 detail, opens):
    switch = Switch(monkeypatch)
    ca = netfaults.make_ca()
    bundle = netfaults.write_ca_bundle(ca, tmp_path / "ca.pem")
    cleanup, started, fakes = [], {}, {}
    try:
        for fail_mode in ("closed", "open"):
            fake = FakeIvalt(api_key=API_KEY, ssl_context=netfaults.tls_context(ca, (SWITCH_HOST,))).start()
            cleanup.append(fake.stop)
            add_users(fake)
            fake.inject("lookup", LOOKUP_THEN_CLOSE)
            if endpoint == "poll":
                fake.inject("push", PUSH_THEN_CLOSE)
            if fault == "refused":
                target = netfaults.refused_port()
            elif fault == "blackhole":
                hole = netfaults.Blackhole()
                cleanup.append(hole.close)
                target = hole.port
            elif fault.startswith("tls"):
                context = (netfaults.untrusted_context() if fault == "tls_untrusted"
                           else netfaults.mismatched_context(ca))
                bad = FakeIvalt(api_key=API_KEY, ssl_context=context).start()
                cleanup.append(bad.stop)
                target = bad.port
            else:
                target = None
            switch.route(fake.port, 1 if endpoint == "push" else 2, fault, target)
            url = "https://%s:%d" % (SWITCH_HOST, fake.port)
            script = load_main(**settings_for(url, mode, FAIL_MODE=fail_mode, CA_BUNDLE=bundle, **FAST))
            started[fail_mode], fakes[fail_mode] = AccessServer(script).start_login(username="alice"), fake
        results = {fail_mode: call.wait(60) for fail_mode, call in started.items()}
    finally:
        for close in reversed(cleanup):
            close()
    out = capfd.readouterr().out
    for fail_mode, result in results.items():
        fake = fakes[fail_mode]
        assert fake.counts["lookup"] == 1 and fake.counts["push"] == (1 if endpoint == "poll" else 0)
        assert fake.counts["poll"] == 0  # the faulted call never reached iVALT
        if fail_mode == "open" and opens and endpoint == "push":  # after a confirmed push: never
            check_failed_open(result, fake, FAST_DEADLINE, stage(endpoint, detail), out)
        else:
            check_failed(result, fake, "unavailable", stage(endpoint, detail), FAST_DEADLINE, out=out)
        if fault.startswith("tls"):
            assert result.elapsed < 0.8  # it will not clear by retrying: it ends at once
        else:
            assert result.elapsed >= FAST_DEADLINE - 0.3  # retried until the deadline


# -------------------------------------------------------------------------------------------------
# Per-endpoint faults that persist (times=None): nothing clears before the deadline
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("fault, detail", OUTAGES)
def test_persistent_outage(fail_modes, capfd, endpoint, fault, detail):
    runs = fail_modes(lambda fake: fake.inject(endpoint, fault, times=None), **FAST)
    out = capfd.readouterr().out
    closed, opened = runs["closed"], runs["open"]
    check_failed(closed.result, closed.fake, "unavailable", stage(endpoint, detail), FAST_DEADLINE, out=out)
    if endpoint == "poll":  # iVALT confirmed the push: reachable, and the user asked; no fail-open
        check_failed(opened.result, opened.fake, "unavailable", stage(endpoint, detail), FAST_DEADLINE, out=out)
        assert "after the push was sent" in opened.result.authret["reason"]
    else:
        check_failed_open(opened.result, opened.fake, FAST_DEADLINE, stage(endpoint, detail), out)
    for run in runs.values():
        check_stage(run.fake, endpoint)
    if endpoint == "push":  # it may have reached the phone: never sent twice
        assert closed.fake.counts["push"] == 1 and opened.fake.counts["push"] == 1
        assert "not sent again" in closed.result.authret["reason"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("fault, detail, deadline", THROTTLES)
def test_persistent_throttling(fail_modes, capfd, endpoint, fault, detail, deadline):
    runs = fail_modes(lambda fake: fake.inject(endpoint, fault, times=None), DEADLINE_SECONDS=deadline)
    out = capfd.readouterr().out
    retry_after = fault.params["headers"].get("Retry-After")
    for run in runs.values():  # throttling is an answer, not an outage: closed in both modes
        check_failed(run.result, run.fake, "throttled", stage(endpoint, "throttled by the API (HTTP 429"),
                     deadline, out=out)
        assert detail in run.result.authret["reason"]
        check_stage(run.fake, endpoint)
        calls = [record.time for record in run.fake.log if record.endpoint == endpoint]
        if retry_after == "1":  # waited as told before asking again, then gave up: 1 s > time left
            assert len(calls) == 2 and calls[1] - calls[0] >= 0.9, calls
        else:  # the wait is longer than the time left: give up at once, do not wait it out
            assert len(calls) == 1 and run.result.elapsed < 0.8, (calls, run.result)


@pytest.mark.parametrize("endpoint, shape", [
    ("lookup", "data_null"),
    ("lookup", "details_missing"),
    ("lookup", "mobile_not_a_string"),
    ("lookup", "error_detail_a_list"),
    ("push", "data_null"),
    ("push", "error_detail_a_list"),
    ("poll", "data_null"),
    ("poll", "error_detail_a_list"),
])
def test_persistent_wrong_shape(fail_modes, capfd, endpoint, shape):
    runs = fail_modes(lambda fake: fake.inject(endpoint, Fault.response(200, WRONG_SHAPES[shape]), times=None),
                      **FAST)
    out = capfd.readouterr().out
    for run in runs.values():  # an answer we cannot read is not an outage: closed in both modes
        check_failed(run.result, run.fake, "unexpected", stage(endpoint, WRONG_SHAPE_DETAIL[endpoint]),
                     FAST_DEADLINE, out=out)
        check_stage(run.fake, endpoint)
        assert run.fake.counts["push"] <= 1


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_redirect_to_another_host_is_not_followed(fake, access_server, capfd, endpoint):
    with FakeIvalt(api_key=API_KEY) as other:
        add_users(other)
        fake.inject(endpoint, Fault.redirect(other.url + ENDPOINT_PATHS[endpoint]), times=None)
        result = access_server(**FAST).login("alice")
        check_failed(result, fake, "unavailable",
                     stage(endpoint, "HTTP 302 redirect to 127.0.0.1:%d, not followed" % other.port),
                     FAST_DEADLINE, out=capfd.readouterr().out)
        check_stage(fake, endpoint)
        assert other.log == [] and other.connections == 0  # the key never went to the other host


def test_redirect_never_fails_open(fake, access_server, capfd):
    """The host answered, so a redirect is no outage: with a mistyped IVALT_API_URL that
    redirects, FAIL_MODE open must not let every login through."""
    with FakeIvalt(api_key=API_KEY) as other:
        fake.inject("lookup", Fault.redirect(other.url + ENDPOINT_PATHS["lookup"]), times=None)
        result = access_server(FAIL_MODE="open", **FAST).login("alice")
        out = capfd.readouterr().out
        assert other.log == []
        assert result.raised is None and result.authret["status"] == FAIL, result.authret
        assert "FAIL-OPEN" not in out


# -------------------------------------------------------------------------------------------------
# Faults that clear within the deadline still end approved
# -------------------------------------------------------------------------------------------------

# (fault, how many times, seconds from the push to the approval for the poll stage). An approval
# counts only once this push was seen pending (main.py: a result is named by the mobile alone), so
# at the poll the user answers late enough for a pending answer after the fault has cleared.
CLEARING = [
    pytest.param(SERVICE_UNAVAILABLE_503, 2, 0.75, id="503_json_x2"),
    pytest.param(Fault.response(504, HTML_504, "text/html"), 2, 0.75, id="504_html_x2"),
    pytest.param(Fault.close(), 2, 0.75, id="close_x2"),
    pytest.param(Fault.close_mid(), 1, 0.75, id="close_mid_x1"),
    pytest.param(Fault.response(200, "<html>not json</html>", "text/html"), 1, 0.75, id="200_html_x1"),
    pytest.param(Fault.response(200, DATA_NULL), 1, 0.75, id="200_data_null_x1"),
    # Two 429s cost 0.5 + 1 s whatever Retry-After says: the user answers after that, so that the
    # poll sees "pending" first.
    pytest.param(Fault.response(429, {"message": "Too Many Requests"}, headers={"Retry-After": "0"}), 2, 2.0,
                 id="429_retry_after_0_x2"),
    pytest.param(Fault.hang(), 1, 1.5, id="hang_x1"),
    pytest.param(Fault.drip(interval=0.2), 1, 1.5, id="drip_x1"),
    pytest.param(Fault.huge(), 1, 0.75, id="huge_x1"),
]


@pytest.mark.parametrize("endpoint", ["lookup", "poll"])
@pytest.mark.parametrize("fault, times, after", CLEARING)
def test_fault_that_clears_ends_approved(fake, access_server, endpoint, fault, times, after):
    # At the lookup the fault is over before any poll: the user may answer at once.
    fake.add_user("later@example.com", "+15551230099", behaviour="approve", after=after if endpoint == "poll" else 0.1)
    fake.inject(endpoint, fault, times=times)
    result = access_server(CALL_TIMEOUT_SECONDS=1).login("later")
    check_approved(result, fake)
    assert fake.counts["push"] == 1
    assert fake.counts[endpoint] >= times + 1
    if endpoint == "poll":
        statuses = [record.status for record in fake.log if record.endpoint == "poll"]
        assert statuses[:times] == [fault.params.get("status")] * times or fault.kind != "response", statuses
        assert 404 in statuses[times:] and statuses[-1] == 200, statuses


def test_outage_that_hides_the_pending_phase_never_ends_approved(fake, access_server, capfd):
    """The poll fails until after the user approved: the approval, never seen pending first, may be
    left from an earlier login and is not taken. Not an outage either: no fail-open."""
    fake.inject("poll", SERVICE_UNAVAILABLE_503, times=3)  # polls at 0, 0.25, 0.5; approved at 0.3
    result = access_server(FAIL_MODE="open", **FAST).login("alice")
    check_failed(result, fake, "unexpected", ("during the poll: ", "not accepted"), FAST_DEADLINE,
                 out=capfd.readouterr().out)
    assert 200 in [record.status for record in fake.log if record.endpoint == "poll"]


def test_issue_example_two_503_then_pending_then_approved(fake, access_server):
    fake.add_user("later@example.com", "+15551230099", behaviour="approve", after=1.0)
    fake.inject("poll", SERVICE_UNAVAILABLE_503, times=2)
    result = access_server().login("later")
    check_approved(result, fake)
    statuses = [record.status for record in fake.log if record.endpoint == "poll"]
    assert statuses[:3] == [503, 503, 404] and statuses[-1] == 200, statuses
    assert set(statuses[2:-1]) == {404}


def test_redirect_that_clears_ends_approved(fake, access_server):
    with FakeIvalt(api_key=API_KEY) as other:
        fake.inject("lookup", Fault.redirect(other.url + ENDPOINT_PATHS["lookup"]), times=2)
        result = access_server().login("alice")
        check_approved(result, fake)
        assert other.log == []


def test_retry_after_zero_does_not_make_a_storm(fake, access_server):
    """A gateway that says "Retry-After: 0" to every push: each login backs off all the same."""
    fake.inject("push", Fault.response(429, {"message": "Too Many Requests"}, headers={"Retry-After": "0"}), times=None)
    result = access_server(DEADLINE_SECONDS=8, REQUEST_BUDGET_PER_SECOND=25).login("alice")
    check_failed(result, fake, "throttled", stage("push", "throttled by the API (HTTP 429"), 8.0)
    assert fake.counts["push"] <= 5, fake.counts  # 0, 0.5, 1.5, 3.5, 7.5 s: not 25 a second
    assert pushes(fake) == 0


def test_throttled_push_is_sent_again_once_the_throttling_clears(fake, access_server):
    """A 429 comes from the gateway: the push never reached iVALT, so sending it again is safe."""
    fake.inject("push", Fault.response(429, {"message": "Too Many Requests"}, headers={"Retry-After": "0"}), times=2)
    result = access_server().login("alice")
    check_approved(result, fake)
    assert fake.counts["push"] == 3


@pytest.mark.parametrize("fault", [
    pytest.param(SERVICE_UNAVAILABLE_503, id="503_json"),
    pytest.param(Fault.response(504, HTML_504, "text/html"), id="504_html"),
    pytest.param(Fault.close(), id="close"),
    pytest.param(Fault.hang(), id="hang"),
])
def test_push_that_may_have_reached_the_phone_is_not_sent_again(fake, access_server, fault):
    """Even a push fault that would clear ends the login: sending the push again could put a
    second prompt on the phone (field report 3)."""
    fake.inject("push", fault, times=1)
    result = access_server(CALL_TIMEOUT_SECONDS=1).login("alice")
    check_failed(result, fake, "unavailable", "the push may have reached the phone, so it is not sent again",
                 DEADLINE)
    assert fake.counts["push"] == 1 and fake.counts["poll"] == 0


# -------------------------------------------------------------------------------------------------
# FAIL_MODE beyond the matrix: the default, and answers that never fail open
# -------------------------------------------------------------------------------------------------


def test_fail_mode_is_closed_by_default(fake, access_server, capfd):
    fake.inject("lookup", SERVICE_UNAVAILABLE_503, times=None)
    result = access_server(**FAST).login("alice")
    out = capfd.readouterr().out
    check_failed(result, fake, "unavailable", "HTTP 503", FAST_DEADLINE, out=out)
    assert "fail_mode=closed" in out


@pytest.mark.parametrize("user, outcome, client_reason", [
    pytest.param("deny", "denied", "AUTHENTICATION_FAILED", id="denied_401"),
    pytest.param("denyd", "denied", "AUTHENTICATION_FAILED", id="denied_detail"),
    pytest.param("tz", "invalid_timezone", "INVALID_TIMEZONE", id="timezone"),
    pytest.param("geo", "invalid_geofence", "INVALID_GEOFENCE", id="geofence"),
    pytest.param("slow", "timed_out", "AUTHENTICATION_FAILED", id="user_timeout"),
    pytest.param("nobody", "not_enrolled", "The email provided (nobody@example.com) was not found",
                 id="not_enrolled"),
])
def test_fail_open_never_on_an_answer(fake, access_server, capfd, user, outcome, client_reason):
    result = access_server(FAIL_MODE="open", **FAST).login(user)
    out = capfd.readouterr().out
    assert result.raised is None, result.traceback
    assert result.authret["status"] == FAIL, result.authret
    assert result.authret["reason"].startswith("iVALT %s: " % outcome), result.authret
    assert result.authret["client_reason"] == client_reason
    assert "FAIL-OPEN" not in out and "fail_mode=open " in out
    assert pushes(fake) <= 1 and result.elapsed <= FAST_DEADLINE + SLACK


def test_fail_open_never_for_a_bad_key(fake, access_server, capfd):
    result = access_server(FAIL_MODE="open", IVALT_SECRET_KEY="wrong-key-123").login("alice")
    out = capfd.readouterr().out
    assert result.raised is None and result.authret["status"] == FAIL, result.authret
    assert result.authret["reason"].startswith("iVALT bad_key: ")
    assert result.authret["client_reason"] == "SERVICE_MISCONFIGURED"
    assert "FAIL-OPEN" not in out and "wrong-key-123" not in out


@pytest.mark.parametrize("fault, detail", [
    pytest.param(SERVICE_UNAVAILABLE_503, "HTTP 503", id="503_json"),
    pytest.param(Fault.close(), "connection closed", id="close"),
    pytest.param(Fault.hang(), "read timeout", id="hang"),
])
def test_fail_open_never_once_the_push_was_sent(fake, access_server, capfd, fault, detail):
    """iVALT confirmed the push and said "pending": the question is with the user, who may have
    said no. An outage from then on is no reason to let anyone in."""
    fake.inject("poll", pending_404(), times=2)
    fake.inject("poll", fault, times=None)
    result = access_server(FAIL_MODE="open", **FAST).login("alice")
    check_failed(result, fake, "unavailable", ("the service stopped answering after the push was sent", detail),
                 FAST_DEADLINE, out=capfd.readouterr().out)
    statuses = [record.status for record in fake.log if record.endpoint == "poll"]
    assert statuses[:2] == [404, 404], statuses
