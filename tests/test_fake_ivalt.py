"""Self-tests of the test infrastructure: the fake iVALT API and the network fault helpers.

They drive the fake with plain ``requests`` so that they also document, from the client's
side, what each behaviour and each fault looks like on the wire.
"""

import json
import re
import socket
import threading
import time

import pytest
import requests
from fake_ivalt import (
    DETAIL_DENIED,
    DETAIL_GEOFENCE,
    DETAIL_TIMEZONE,
    ENDPOINT_PATHS,
    MSG_AUTH_DONE,
    MSG_PUSH_SENT,
    FakeIvalt,
    Fault,
    RemoteFake,
)
from netfaults import (
    Blackhole,
    ConnectProxy,
    make_ca,
    mismatched_context,
    refused_port,
    server_context,
    untrusted_context,
    write_ca_bundle,
)

KEY = "test-key"
ALICE = "alice@example.com"
ALICE_MOBILE = "+15551234567"
PENDING_404 = f"The mobile number provided ({ALICE_MOBILE}) was not found."


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def fake():
    with FakeIvalt(api_key=KEY) as f:
        yield f
    assert f.errors == []  # no bug inside the fake surfaced as an exception


@pytest.fixture
def session():
    s = requests.Session()
    s.trust_env = False  # ignore *_PROXY variables: every request here is loopback only
    yield s
    s.close()


def call(session, fake, endpoint, body, key=KEY, **kwargs):
    """POST ``body`` to the named endpoint ("lookup", "push", "poll", "result")."""
    headers = {} if key is None else {"x-api-key": key}
    kwargs.setdefault("timeout", 5)
    return session.post(fake.url + ENDPOINT_PATHS[endpoint], json=body, headers=headers,
                        **kwargs)


def assert_error(resp, status, detail, title=None):
    """Check an application error: the full envelope with ``data`` null."""
    assert resp.status_code == status
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert set(body) == {"data", "error", "debug"}
    assert body["data"] is None
    error = body["error"]
    assert error["status"] == status
    assert error["detail"] == detail
    assert error["type"] == f"https://httpstatuses.com/{status}"
    assert error["instance"].startswith("/services/")
    if title is not None:
        assert error["title"] == title
    assert_debug(body)
    return body


def assert_debug(body):
    assert re.fullmatch(r"[0-9a-f]{32}", body["debug"]["activityId"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", body["debug"]["timestamp"])


def assert_approved(resp):
    assert resp.status_code == 200
    body = resp.json()
    assert body["error"] is None
    assert body["data"]["status"] is True
    assert body["data"]["message"] == MSG_AUTH_DONE
    assert set(body["data"]["details"]) == {"id", "name", "email", "country_code", "mobile",
                                            "latitude", "longitude", "imei", "address"}
    assert_debug(body)


def push(session, fake, mobile=ALICE_MOBILE):
    resp = call(session, fake, "push", {"mobile": mobile})
    assert resp.status_code == 200
    return resp


# --------------------------------------------------------------------------- user logic


def test_lookup_known_and_unknown(fake, session):
    fake.add_user(ALICE, ALICE_MOBILE, name="Alice Example")
    resp = call(session, fake, "lookup", {"email": ALICE})
    assert resp.status_code == 200
    body = resp.json()
    assert body["error"] is None
    details = body["data"]["details"]
    assert details["mobile_with_country_code"] == ALICE_MOBILE
    assert details["email"] == ALICE
    assert details["name"] == "Alice Example"
    assert set(details) == {"id", "name", "email", "country_code", "mobile",
                            "mobile_with_country_code"}
    assert_debug(body)

    resp = call(session, fake, "lookup", {"email": "bob@example.com"})
    assert_error(resp, 404, "The email provided (bob@example.com) was not found",
                 title="Not Found")
    # Matching is exact: normalising case is the client's job.
    resp = call(session, fake, "lookup", {"email": ALICE.upper()})
    assert resp.status_code == 404


def test_push_unknown_mobile(fake, session):
    resp = call(session, fake, "push", {"mobile": "+15550000000"})
    assert_error(resp, 404, "The mobile number provided (+15550000000) was not found.",
                 title="Not Found")
    assert fake.pushes_delivered == {}


def test_approve_flow_end_to_end(fake, session):
    fake.add_user(ALICE, ALICE_MOBILE, behaviour="approve", after=0.3)
    assert call(session, fake, "lookup", {"email": ALICE}).status_code == 200
    # Before any push the answer is "pending".
    assert_error(call(session, fake, "poll", {"mobile": ALICE_MOBILE}), 404, PENDING_404)
    assert fake.answer_due_at(ALICE_MOBILE) is None

    before = time.monotonic()
    resp = push(session, fake)
    assert resp.json()["data"] == {"status": True, "message": MSG_PUSH_SENT, "details": None}
    due = fake.answer_due_at(ALICE_MOBILE)
    assert before + 0.3 <= due <= time.monotonic() + 0.3

    assert_error(call(session, fake, "poll", {"mobile": ALICE_MOBILE}), 404, PENDING_404)
    time.sleep(max(0.0, due - time.monotonic()) + 0.02)
    assert_approved(call(session, fake, "poll", {"mobile": ALICE_MOBILE}))
    # Reading the answer does not consume it ...
    assert_approved(call(session, fake, "poll", {"mobile": ALICE_MOBILE}))
    # ... but a new push restarts the user's script.
    push(session, fake)
    assert_error(call(session, fake, "poll", {"mobile": ALICE_MOBILE}), 404, PENDING_404)
    assert fake.pushes_delivered == {ALICE_MOBILE: 2}
    assert fake.answer_due_at(ALICE_MOBILE) > due


@pytest.mark.parametrize(("behaviour", "status", "title", "detail"), [
    ("timezone", 403, "Invalid details", DETAIL_TIMEZONE),
    ("geofence", 403, "Invalid details", DETAIL_GEOFENCE),
    ("deny401", 401, None, DETAIL_DENIED),
    ("deny_detail", 403, None, DETAIL_DENIED),
])
def test_poll_negative_answers(fake, session, behaviour, status, title, detail):
    fake.add_user(ALICE, ALICE_MOBILE, behaviour=behaviour, after=0.1)
    push(session, fake)
    assert_error(call(session, fake, "poll", {"mobile": ALICE_MOBILE}), 404, PENDING_404)
    time.sleep(0.12)
    assert_error(call(session, fake, "poll", {"mobile": ALICE_MOBILE}), status, detail,
                 title=title)


def test_never_stays_pending(fake, session):
    fake.add_user(ALICE, ALICE_MOBILE, behaviour="never")
    push(session, fake)
    assert fake.answer_due_at(ALICE_MOBILE) is None
    assert_error(call(session, fake, "poll", {"mobile": ALICE_MOBILE}), 404, PENDING_404)
    assert call(session, fake, "result", {"mobile": ALICE_MOBILE}).status_code == 422


def test_pending_style_422(fake, session):
    fake.add_user(ALICE, ALICE_MOBILE, after=60, pending_style="422")
    push(session, fake)
    resp = call(session, fake, "poll", {"mobile": ALICE_MOBILE})
    assert resp.status_code == 422
    assert resp.json()["error"]["status"] == 422


@pytest.mark.parametrize(("behaviour", "status"), [
    ("approve", 200), ("timezone", 200), ("geofence", 200),  # no policy on this endpoint
    ("deny401", 401), ("deny_detail", 401),
])
def test_result_endpoint(fake, session, behaviour, status):
    fake.add_user(ALICE, ALICE_MOBILE, behaviour=behaviour)
    assert call(session, fake, "result", {"mobile": ALICE_MOBILE}).status_code == 422
    push(session, fake)
    resp = call(session, fake, "result", {"mobile": ALICE_MOBILE})
    if status == 200:
        assert_approved(resp)
    else:
        assert_error(resp, 401, DETAIL_DENIED)
    resp = call(session, fake, "result", {"mobile": "+15550000000"})
    assert resp.status_code == 404


# --------------------------------------------------------------------------- gateway


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_bad_key_is_gateway_403_without_envelope(fake, session, key):
    fake.add_user(ALICE, ALICE_MOBILE)
    resp = call(session, fake, "push", {"mobile": ALICE_MOBILE}, key=key)
    assert resp.status_code == 403
    assert resp.json() == {"message": "Forbidden"}
    assert fake.pushes_delivered == {}  # the user logic was never reached
    assert fake.counts["push"] == 1


def test_gateway_and_request_errors(fake, session):
    resp = session.post(fake.url + "/no-such-path", json={}, headers={"x-api-key": KEY},
                        timeout=5)
    assert resp.status_code == 403
    assert resp.json() == {"message": "Missing Authentication Token"}
    assert fake.counts["other"] == 1

    resp = session.get(fake.url + ENDPOINT_PATHS["lookup"], headers={"x-api-key": KEY},
                       timeout=5)
    assert resp.status_code == 405

    resp = session.post(fake.url + ENDPOINT_PATHS["lookup"], data=b"not json",
                        headers={"x-api-key": KEY}, timeout=5)
    assert resp.status_code == 400
    assert resp.json()["error"]["status"] == 400
    resp = call(session, fake, "lookup", ["a", "list"])
    assert resp.status_code == 400
    resp = call(session, fake, "lookup", {"mail": ALICE})
    assert resp.status_code == 400


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(("fault", "status", "content_type", "text", "header"), [
    (Fault.response(504, "<html><body>Gateway Timeout</body></html>", "text/html"),
     504, "text/html", "<html><body>Gateway Timeout</body></html>", None),
    (Fault.response(502, "Bad Gateway", "text/plain"), 502, "text/plain", "Bad Gateway", None),
    (Fault.response(503, {"message": "Service Unavailable"}), 503, "application/json",
     '{"message": "Service Unavailable"}', None),
    (Fault.response(429, {"message": "Too Many Requests"}, headers={"Retry-After": "3"}),
     429, "application/json", '{"message": "Too Many Requests"}', ("Retry-After", "3")),
    (Fault.response(429, {"message": "Limit Exceeded"}), 429, "application/json",
     '{"message": "Limit Exceeded"}', None),
    (Fault.response(200, b"{not json"), 200, "application/json", "{not json", None),
    (Fault.response(200, {"data": {"status": "yes"}}), 200, "application/json",
     '{"data": {"status": "yes"}}', None),
])
def test_fault_response(fake, session, fault, status, content_type, text, header):
    fake.add_user(ALICE, ALICE_MOBILE)
    fake.inject("poll", fault)
    resp = call(session, fake, "poll", {"mobile": ALICE_MOBILE})
    assert resp.status_code == status
    assert resp.headers["Content-Type"] == content_type
    assert resp.text == text
    if header is None:
        assert "Retry-After" not in resp.headers
    else:
        assert resp.headers[header[0]] == header[1]
    assert fake.log[-1].fault is fault
    assert fake.log[-1].status == status


def test_fault_times_fifo_and_faulted_push_not_delivered(fake, session):
    fake.add_user(ALICE, ALICE_MOBILE)
    fake.inject("push", Fault.response(503, {"message": "a"}), times=2)
    fake.inject("push", Fault.response(502, {"message": "b"}))
    statuses = [call(session, fake, "push", {"mobile": ALICE_MOBILE}).status_code
                for _ in range(4)]
    assert statuses == [503, 503, 502, 200]
    assert fake.counts["push"] == 4  # faulted requests are counted ...
    assert fake.pushes_delivered == {ALICE_MOBILE: 1}  # ... but never delivered

    # Other endpoints are unaffected; times=None lasts until clear_faults().
    fake.inject("lookup", Fault.response(500, "boom", "text/plain"), times=None)
    assert call(session, fake, "poll", {"mobile": ALICE_MOBILE}).status_code == 200
    for _ in range(3):
        assert call(session, fake, "lookup", {"email": ALICE}).status_code == 500
    fake.clear_faults()
    assert call(session, fake, "lookup", {"email": ALICE}).status_code == 200


def test_fault_precedes_key_check(fake, session):
    fake.inject("lookup", Fault.response(504, "timeout", "text/plain"))
    assert call(session, fake, "lookup", {"email": ALICE}, key="bad").status_code == 504
    assert call(session, fake, "lookup", {"email": ALICE}, key="bad").status_code == 403


def test_fault_hang_gives_read_timeout(fake, session):
    fake.inject("push", Fault.hang())
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        call(session, fake, "push", {"mobile": ALICE_MOBILE}, timeout=(2, 0.3))
    assert time.monotonic() - started < 2
    assert fake.log[-1].status is None


def test_fault_hang_with_seconds_then_closes(fake, session):
    fake.inject("push", Fault.hang(0.2))
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError):
        call(session, fake, "push", {"mobile": ALICE_MOBILE}, timeout=(2, 3))
    assert 0.15 < time.monotonic() - started < 2


def test_fault_close_gives_connection_error(fake, session):
    fake.inject("lookup", Fault.close())
    with pytest.raises(requests.exceptions.ConnectionError):
        call(session, fake, "lookup", {"email": ALICE})
    assert fake.log[-1].status is None


def test_fault_close_mid_body(fake, session):
    fake.inject("lookup", Fault.close_mid())
    with pytest.raises((requests.exceptions.ChunkedEncodingError,
                        requests.exceptions.ConnectionError)):
        call(session, fake, "lookup", {"email": ALICE})
    # Streaming shows what arrived: the headers promise 1000 bytes, 20 come.
    fake.inject("lookup", Fault.close_mid())
    resp = call(session, fake, "lookup", {"email": ALICE}, stream=True)
    assert resp.status_code == 200
    assert resp.headers["Content-Length"] == "1000"
    assert len(resp.raw.read(1000, decode_content=False)) == 20
    resp.close()


def test_fault_drip_is_slow_but_never_times_out(fake, session):
    fake.inject("poll", Fault.drip(interval=0.1, total=1000))
    resp = call(session, fake, "poll", {"mobile": ALICE_MOBILE}, stream=True, timeout=(2, 1))
    assert resp.status_code == 200
    assert resp.headers["Content-Length"] == "1000"
    got = b""
    started = time.monotonic()
    while time.monotonic() - started < 0.5:
        got += resp.raw.read(1)  # each byte comes well within the 1 s read timeout
    resp.close()
    assert got.startswith(b'"x')
    assert 2 <= len(got) <= 10


def test_fault_huge_body(fake, session):
    size = 10 * 1024 * 1024
    fake.inject("poll", Fault.huge())
    resp = call(session, fake, "poll", {"mobile": ALICE_MOBILE}, timeout=(2, 10))
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert int(resp.headers["Content-Length"]) == size
    assert len(resp.content) == size
    assert json.loads(resp.content) == "x" * (size - 2)

    # A client that stops reading early and closes is tolerated.
    fake.inject("poll", Fault.huge())
    resp = call(session, fake, "poll", {"mobile": ALICE_MOBILE}, stream=True)
    assert len(resp.raw.read(1000)) == 1000
    resp.close()
    assert call(session, fake, "lookup", {"email": ALICE}).status_code == 404


def test_fault_redirect_not_followed(fake, session):
    fake.inject("lookup", Fault.redirect("http://127.0.0.1:9/elsewhere"))
    resp = call(session, fake, "lookup", {"email": ALICE}, allow_redirects=False)
    assert resp.status_code == 302
    assert resp.headers["Location"] == "http://127.0.0.1:9/elsewhere"
    assert fake.counts["lookup"] == 1


def test_fault_delay_then_normal(fake, session):
    fake.add_user(ALICE, ALICE_MOBILE)
    fake.inject("push", Fault.delay(0.3))
    started = time.monotonic()
    push(session, fake)
    assert time.monotonic() - started >= 0.3
    assert fake.pushes_delivered == {ALICE_MOBILE: 1}  # a delayed push is delivered


def test_deny_unpushed_changes_only_users_not_pushed_yet(fake, session):
    fake.add_user(ALICE, ALICE_MOBILE, behaviour="approve", after=0.2)
    fake.add_user("bob@example.com", "+15551234568", behaviour="approve", after=0.2)
    push(session, fake)
    assert fake.deny_unpushed() == 1
    push(session, fake, "+15551234568")
    assert_error(call(session, fake, "poll", {"mobile": "+15551234568"}), 401, DETAIL_DENIED)
    time.sleep(0.25)
    assert_approved(call(session, fake, "poll", {"mobile": ALICE_MOBILE}))


def test_remote_fake_serves_from_a_child_process(session):
    with RemoteFake(api_key=KEY) as remote:
        remote.add_user(ALICE, ALICE_MOBILE, behaviour="approve", after=0.0)
        assert call(session, remote, "lookup", {"email": ALICE}).status_code == 200
        before = time.monotonic()
        push(session, remote)
        assert before <= remote.answer_due_at(ALICE_MOBILE) <= time.monotonic()  # one clock for both
        assert_approved(call(session, remote, "poll", {"mobile": ALICE_MOBILE}))
        assert remote.counts == {"lookup": 1, "push": 1, "poll": 1, "result": 0, "other": 0}
        assert remote.get("pushes_delivered") == {ALICE_MOBILE: 1}
        assert remote.max_rate(1.0) == 3
        assert remote.deny_unpushed() == 0
        with pytest.raises(RuntimeError, match="ValueError: behaviour must be one of"):
            remote.add_user("x@example.com", "+15550000000", behaviour="nonsense")
        with pytest.raises(AttributeError, match="get\\(name\\)"):
            remote.pushes_delivered  # noqa: B018 - an attribute is read with get(), never as a method
        with pytest.raises(RuntimeError, match="AttributeError"):
            remote.get("no_such_attribute")
        url = remote.url
    remote.stop()  # a second stop is harmless
    with pytest.raises(requests.ConnectionError):
        session.post(url + ENDPOINT_PATHS["lookup"], json={"email": ALICE}, timeout=2)


def test_remote_fake_whose_child_died_says_so_on_every_call():
    remote = RemoteFake(api_key=KEY)
    remote._process.kill()
    remote._process.join(5)
    for _ in range(2):  # the link stays broken: no later call reads an answer meant for another
        with pytest.raises(RuntimeError, match="fake iVALT process is gone"):
            remote.max_rate(1.0)
    remote.stop()
    remote.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        remote.reset_counts()


def test_inject_validates_arguments(fake):
    with pytest.raises(ValueError):
        fake.inject("nope", Fault.close())
    with pytest.raises(TypeError):
        fake.inject("push", "close")
    with pytest.raises(ValueError):
        fake.inject("push", Fault.close(), times=0)
    with pytest.raises(ValueError):
        fake.add_user(ALICE, ALICE_MOBILE, behaviour="maybe")


# --------------------------------------------------------------------------- counters


def test_counts_log_rate_and_reset(fake, session):
    fake.add_user(ALICE, ALICE_MOBILE)
    call(session, fake, "lookup", {"email": ALICE})
    push(session, fake)
    for _ in range(3):
        call(session, fake, "poll", {"mobile": ALICE_MOBILE})
    assert fake.counts == {"lookup": 1, "push": 1, "poll": 3, "result": 0, "other": 0}
    assert fake.pushes_delivered == {ALICE_MOBILE: 1}
    assert [rec.endpoint for rec in fake.log] == ["lookup", "push", "poll", "poll", "poll"]
    rec = fake.log[1]
    assert rec.headers["x-api-key"] == KEY  # names are lower-cased
    assert rec.headers["content-type"] == "application/json"
    assert rec.body == {"mobile": ALICE_MOBILE}
    assert rec.status == 200
    assert fake.max_rate(1.0) == 5
    assert fake.max_rate(1e-9) == 1

    fake.reset_counts()
    assert fake.counts["poll"] == 0
    assert fake.pushes_delivered == {}
    assert fake.log == []
    assert fake.max_rate() == 0
    # Users and their push state survive a reset.
    assert_approved(call(session, fake, "poll", {"mobile": ALICE_MOBILE}))


def test_keep_alive_reuses_one_connection(fake, session):
    fake.add_user(ALICE, ALICE_MOBILE)
    call(session, fake, "lookup", {"email": ALICE})
    call(session, fake, "lookup", {"email": ALICE})
    assert fake.connections == 1
    assert fake.log[0].connection == fake.log[1].connection
    assert fake.log[0].client_port == fake.log[1].client_port
    # Without a session, each request opens its own connection.
    requests.post(fake.url + ENDPOINT_PATHS["lookup"], json={"email": ALICE},
                  headers={"x-api-key": KEY}, timeout=5, proxies={"http": None})
    assert fake.connections == 2


def test_many_simultaneous_clients(fake):
    fake.add_user(ALICE, ALICE_MOBILE)
    clients = 200
    barrier = threading.Barrier(clients)
    results = []

    def client():
        with requests.Session() as s:
            s.trust_env = False
            barrier.wait()
            try:
                results.append(call(s, fake, "lookup", {"email": ALICE}).status_code)
            except requests.RequestException as exc:
                results.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200] * clients
    assert fake.connections == clients


def test_stop_closes_idle_and_hung_connections(session):
    fake = FakeIvalt().start()
    url = fake.url
    fake.add_user(ALICE, ALICE_MOBILE)
    call(session, fake, "lookup", {"email": ALICE})  # leaves an idle keep-alive connection
    fake.inject("push", Fault.hang())
    outcome = []

    def hung_client():
        try:
            call(requests.Session(), fake, "push", {"mobile": ALICE_MOBILE}, timeout=10)
        except requests.RequestException as exc:
            outcome.append(exc)

    hung = threading.Thread(target=hung_client)
    hung.start()
    deadline = time.monotonic() + 2
    while fake.counts["push"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 1
    hung.join(2)
    assert isinstance(outcome[0], requests.exceptions.ConnectionError)
    assert fake._conns == set()  # every handler thread has finished
    assert fake.errors == []
    # The idle pooled connection was closed and nothing listens any more.
    with pytest.raises(requests.exceptions.ConnectionError):
        session.post(url + ENDPOINT_PATHS["lookup"], json={"email": ALICE}, timeout=2)


# --------------------------------------------------------------------------- TLS / proxy


@pytest.fixture(scope="module")
def ca():
    return make_ca()


@pytest.fixture(scope="module")
def ca_bundle(ca, tmp_path_factory):
    return write_ca_bundle(ca, tmp_path_factory.mktemp("tls") / "ca.pem")


def test_https_trusted(ca, ca_bundle, session):
    with FakeIvalt(ssl_context=server_context(ca)) as fake:
        assert fake.url.startswith("https://localhost:")
        fake.add_user(ALICE, ALICE_MOBILE)
        resp = call(session, fake, "lookup", {"email": ALICE}, verify=ca_bundle)
        assert resp.status_code == 200
        # The certificate also names the IP address.
        resp = session.post(f"https://127.0.0.1:{fake.port}/get-user-by-email",
                            json={"email": ALICE}, headers={"x-api-key": KEY},
                            verify=ca_bundle, timeout=5)
        assert resp.status_code == 200
        assert fake.connections == 2
    assert fake.errors == []


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
@pytest.mark.parametrize("make_context", [
    pytest.param(lambda ca: mismatched_context(ca), id="mismatched-host"),
    pytest.param(lambda ca: untrusted_context(), id="untrusted-ca"),
])
def test_https_bad_certificate(ca, ca_bundle, session, make_context):
    with FakeIvalt(ssl_context=make_context(ca)) as fake:
        with pytest.raises(requests.exceptions.SSLError):
            call(session, fake, "lookup", {"email": ALICE}, verify=ca_bundle)
        assert fake.counts["lookup"] == 0  # the request never got past the handshake
        # The failed handshake did not disturb the server.
        resp = call(session, fake, "lookup", {"email": ALICE}, verify=False)
        assert resp.status_code == 404
    assert fake.errors == []


def test_connect_proxy_tunnels_https(ca, ca_bundle, session):
    with FakeIvalt(ssl_context=server_context(ca)) as fake, ConnectProxy() as proxy:
        fake.add_user(ALICE, ALICE_MOBILE)
        resp = call(session, fake, "lookup", {"email": ALICE}, verify=ca_bundle,
                    proxies={"https": proxy.url})
        assert resp.status_code == 200
        assert proxy.targets == [f"localhost:{fake.port}"]


def test_stop_interrupts_stalled_tls_handshake(ca):
    fake = FakeIvalt(ssl_context=server_context(ca)).start()
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        deadline = time.monotonic() + 2
        while fake.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        fake.stop()  # the handler thread is blocked in the handshake, waiting for us
        assert time.monotonic() - started < 1
        assert sock.recv(10) == b""
    assert fake._conns == set()


def test_connect_proxy_stop_closes_tunnels(ca, ca_bundle, session):
    with FakeIvalt(ssl_context=server_context(ca)) as fake:
        proxy = ConnectProxy().start()
        resp = call(session, fake, "lookup", {"email": ALICE}, verify=ca_bundle,
                    proxies={"https": proxy.url})
        assert resp.status_code == 404  # the tunnel now idles in the session's pool
        started = time.monotonic()
        proxy.stop()
        assert time.monotonic() - started < 1
        assert proxy._socks == set()


def test_connect_proxy_refuses_non_loopback_targets():
    with ConnectProxy() as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
            sock.sendall(b"CONNECT example.invalid:443 HTTP/1.1\r\n"
                         b"Host: example.invalid:443\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 403 ")
        assert proxy.targets == ["example.invalid:443"]


# --------------------------------------------------------------------------- network faults


def test_blackhole_connect_times_out(session):
    with Blackhole() as hole:
        sock = socket.socket()
        sock.settimeout(1)
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            sock.connect(("127.0.0.1", hole.port))
        assert time.monotonic() - started >= 0.9
        sock.close()

        with pytest.raises(requests.exceptions.ConnectTimeout):
            session.post(hole.url + "/get-user-by-email", json={}, timeout=(0.3, 5))


def test_refused_port(session):
    port = refused_port()
    sock = socket.socket()
    sock.settimeout(2)
    with pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))
    sock.close()
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError) as info:
        session.post(f"http://127.0.0.1:{port}/get-user-by-email", json={}, timeout=2)
    assert not isinstance(info.value, requests.exceptions.Timeout)
    assert time.monotonic() - started < 1
