"""Unit tests: the pure classification of API answers, the identity rule, the request budget,
and the verification flow driven with a virtual clock (no sockets, no real time). HTTP-level
unit tests stub `requests` with `responses`."""

import json

import pytest
import responses

from asemu import load_script
from conftest import MAIN

API = "https://api.ivalt.test"


@pytest.fixture(scope="module")
def m():
    script = load_script(MAIN, env={"IVALT_SECRET_KEY": "unit-key-123", "IVALT_API_URL": API, "IVALT_CONFIG": None})
    yield script.ns
    script.ns["shutdown"]()


def reply(m, status, body=None, headers=None, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    return m["Reply"](status, dict({"Content-Type": "application/json"}, **(headers or {})), data)


def envelope_error(status, detail, title="Not Found"):
    return {"data": None, "error": {"type": "https://httpstatuses.com/%d" % status, "title": title,
                                    "status": status, "detail": detail}, "debug": {}}


# ----------------------------------------------------------------------------- classification

def test_poll_answers(m):
    classify = m["classify_poll"]
    approved = {"data": {"status": True, "message": "Biometric Authentication successfully done.", "details": {}}}
    assert classify(reply(m, 200, approved)).kind == "approved"
    assert classify(reply(m, 200, {"data": {"message": "no status member"}})).kind == "approved"
    pending = envelope_error(404, "The mobile number provided (+15551234567) was not found.")
    assert classify(reply(m, 404, pending)).kind == "pending"
    assert classify(reply(m, 422, {"error": {"detail": "pending"}})).kind == "pending"
    tz = classify(reply(m, 403, envelope_error(403, "You are not within the timezone.", "Invalid details")))
    assert (tz.kind, tz.final) == ("invalid_timezone", True)
    geo = classify(reply(m, 403, envelope_error(403, "You are not within the geofencing location.", "Invalid details")))
    assert geo.kind == "invalid_geofence"
    assert classify(reply(m, 401, envelope_error(401, "Denied - User denied biometric authentication."))).kind == "denied"
    assert classify(reply(m, 400, envelope_error(400, "Denied - no"))).kind == "denied"
    assert classify(reply(m, 403, {"message": "Forbidden"})).kind == "bad_key"
    assert classify(reply(m, 403, {"message": "Invalid secret key"})).kind == "bad_key"


@pytest.mark.parametrize("body", [
    {"data": None},
    {"data": {"status": False}},
    {"data": {"status": "true"}},
    {"data": {"status": True}, "error": {"detail": "but an error too"}},
    [],
    "approved",
    {},
])
def test_a_200_is_not_an_approval_unless_it_says_so(m, body):
    answer = m["classify_poll"](reply(m, 200, body))
    assert answer.kind != "approved" and not answer.final


@pytest.mark.parametrize("status, body, content_type, kind, fail_open", [
    (500, b"<html><body>Internal Server Error</body></html>", "text/html", "unavailable", True),
    (502, b"Bad Gateway", "text/plain", "unavailable", True),
    (503, b'{"message": "Service Unavailable"}', "application/json", "unavailable", True),
    (504, b"<html>504 Gateway Time-out</html>", "text/html", "unavailable", True),
    (200, b"{not json", "application/json", "unavailable", True),
    (302, b"", "text/html", "unavailable", False),  # the host answered: no outage, never fail-open
    (429, b'{"message": "Too Many Requests"}', "application/json", "throttled", False),
])
def test_outages_are_transient_for_every_endpoint(m, status, body, content_type, kind, fail_open):
    for classify in ("classify_lookup", "classify_push", "classify_poll"):
        answer = m[classify](m["Reply"](status, {"Content-Type": content_type, "Location": "https://evil.example/x"}, body))
        assert (answer.kind, answer.final, answer.fail_open) == (kind, False, fail_open), classify
        assert "<html>" not in answer.detail


def test_lookup_answers(m):
    classify = m["classify_lookup"]
    found = {"data": {"status": True, "details": {"mobile_with_country_code": "+15551234567"}}}
    answer = classify(reply(m, 200, found))
    assert (answer.kind, answer.value) == ("mobile", "+15551234567")
    missing = classify(reply(m, 404, envelope_error(404, "The email provided (a@b.c) was not found")))
    assert (missing.kind, missing.detail) == ("not_enrolled", "The email provided (a@b.c) was not found")
    listed = classify(reply(m, 422, {"error": {"detail": [{"msg": "email invalid"}, "second"]}}))
    assert (listed.kind, listed.detail) == ("not_enrolled", "email invalid; second")
    for shape in ({"data": None}, {"data": {"details": None}}, {"data": {"details": {"mobile_with_country_code": 15551234567}}},
                  {"data": {"details": {"mobile_with_country_code": "call me"}}}):
        assert classify(reply(m, 200, shape)).kind == "unexpected"


def test_push_answers(m):
    classify = m["classify_push"]
    assert classify(reply(m, 200, {"data": {"status": True, "message": "sent"}})).kind == "sent"
    assert classify(reply(m, 200, {"data": {"status": False, "message": "no"}})).kind == "unexpected"
    nodev = classify(reply(m, 404, envelope_error(404, "The mobile number provided (+15551234567) was not found.")))
    assert nodev.kind == "not_enrolled"


def test_retry_after(m):
    parse = m["parse_retry_after"]
    assert parse("7") == 7.0
    assert parse(None) is None and parse("soon") is None
    assert 0 <= parse("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    for odd in ("\u00b2", "\u00b3", "-1", "1e9", "NaN", "9" * 400, "", "Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 99 Foo"):
        value = parse(odd)  # never raises; "²" passes str.isdigit() but not float()
        assert value is None or 0 <= value <= 86400 or odd.startswith("Fri"), (odd, value)


def test_masking_covers_written_phone_numbers_and_secrets_go_first(m):
    assert m["mask_mobile"]("call +1 (555) 123-0001 now") == "call +* (***) ***-**01 now"
    assert m["mask_mobile"]("took 4.12s, port 51234") == "took 4.12s, port 51234"
    m["_SECRETS"].append("ZXk9Q-5551234567-abcd")
    try:
        assert m["_scrub"]("key ZXk9Q-5551234567-abcd") == "key [secret]"
    finally:
        m["_SECRETS"].pop()


def test_a_proxy_password_is_never_shown(m):
    assert m["_safe_url"]("http://admin:s3cretpw@proxy.example:3128") == "http://admin:***@proxy.example:3128"
    assert m["_proxy_password"]("http://admin:s3cretpw@proxy.example:3128") == "s3cretpw"
    assert m["_proxy_password"]("http://proxy.example:3128") is None


@pytest.mark.parametrize("host, loopback", [("localhost", True), ("127.0.0.1", True), ("127.8.9.10", True),
                                            ("[::1]", True), ("127.evil.example", False), ("localhost.evil", False),
                                            ("10.0.0.1", False)])
def test_only_loopback_addresses_may_use_plain_http(m, host, loopback):
    assert m["_is_loopback"](host) is loopback


def test_json_too_deep_to_parse_is_not_json(m):
    answer = m["classify_poll"](m["Reply"](200, {"Content-Type": "application/json"}, b"[" * 50000))
    assert (answer.kind, answer.final) == ("unavailable", False) and "non-JSON" in answer.detail


@pytest.mark.parametrize("exception, kind, sent", [
    ("ConnectTimeout", "connect timeout", False),
    ("ReadTimeout", "read timeout", True),
])
def test_transport_errors(m, exception, kind, sent):
    import requests

    error = m["describe_transport_error"](getattr(requests.exceptions, exception)("x"))
    assert (error.kind, error.sent) == (kind, sent)


# ----------------------------------------------------------------------------- identity

@pytest.mark.parametrize("username", ["alice", "alice ", " Alice", "ALICE", "EXAMPLE\\alice", "alice@example.com",
                                      "Alice@Example.COM"])
def test_username_variants_are_one_identity(m, username):
    assert m["email_from_username"](username, "example.com") == ("alice@example.com", None)


@pytest.mark.parametrize("username", ["", "   ", None, 42, "a" * 10000, "ali\x00ce", "alice\r", "alice\nid=forged",
                                      "al ice", "@", "a@b@c", b"alice", "admin\u200b", "\ufeffalice", "\udcffalice",
                                      "ali\u202ece", "<script>@x", 'a"b', "a`b", "a,b", "a;b"])
def test_unusable_usernames(m, username):
    email, problem = m["email_from_username"](username, "example.com")
    assert email is None and problem


def test_without_email_domain_the_name_is_used_as_is(m):
    assert m["email_from_username"]("bob", "") == ("bob", None)


def test_masking(m):
    assert m["mask_mobile"]("call +15551234567 now") == "call +*********67 now"
    assert m["mask_email"]("alice@example.com") == "al***@example.com"


# ----------------------------------------------------------------------------- request budget

def test_gate_caps_every_window(m):
    gate = m["RequestGate"](20, burst=5)
    starts = [gate.reserve(0.0, 100.0) for _ in range(200)]
    assert starts == sorted(starts)
    for first in range(len(starts)):
        in_window = [s for s in starts if starts[first] <= s < starts[first] + 1.0]
        assert len(in_window) <= 20 + 5
    assert starts[-1] == pytest.approx((200 - 5) / 20.0)


def test_gate_pause_and_latest(m):
    gate = m["RequestGate"](10)
    gate.pause_until(5.0)
    assert gate.reserve(1.0, 10.0) == 5.0
    assert gate.reserve(1.0, 2.0) is None


# ----------------------------------------------------------------------------- flow, virtual clock

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def settings(m, **overrides):
    inline = {"IVALT_SECRET_KEY": "unit-key-123", "IVALT_API_URL": API, "DEADLINE_SECONDS": 60,
              "POLL_INTERVAL_SECONDS": 1.0, "CONFIG_PATH": ""}
    inline.update(overrides)
    merged = dict(m["_SETTINGS"].__dict__)
    loaded = m["load_settings"](dict({k.upper(): v for k, v in merged.items()}, **inline), {})
    assert not loaded.errors, loaded.errors
    return loaded


def simulate(m, answers, latency=0.1, **overrides):
    """Drive verify() with a virtual clock. `answers`: step -> list of Reply (last one repeats).
    Returns (verdict, attempt, calls: list of (time, step))."""
    clock = Clock()
    config = settings(m, **overrides)
    attempt = m["Attempt"]("alice@example.com", 0.0, config.deadline_seconds)
    flow = m["verify"](attempt, config, m["RequestGate"](1000), m["WaitingLogins"](), clock)
    calls, value = [], None
    queues = {step: list(replies) for step, replies in answers.items()}
    try:
        while True:
            effect = flow.send(value)
            if isinstance(effect, m["Sleep"]):
                clock.now += effect.seconds
                value = None
            else:
                assert effect.timeout <= attempt.deadline - clock.now + 1e-9  # bounded by the time left
                calls.append((clock.now, effect.step))
                queue = queues[effect.step]
                value = queue.pop(0) if len(queue) > 1 else queue[0]
                clock.now += latency
    except StopIteration as stop:
        return stop.value, attempt, calls


def found(m):
    return reply(m, 200, {"data": {"details": {"mobile_with_country_code": "+15551234567"}}})


def sent(m):
    return reply(m, 200, {"data": {"status": True}})


def pending(m):
    return reply(m, 404, envelope_error(404, "The mobile number provided (+15551234567) was not found."))


def approved(m):
    return reply(m, 200, {"data": {"status": True}})


def test_flow_polls_every_second_until_approved(m):
    verdict, attempt, calls = simulate(m, {"lookup": [found(m)], "push": [sent(m)],
                                           "poll": [pending(m)] * 5 + [approved(m)]})
    assert verdict.outcome == "approved"
    polls = [t for t, step in calls if step == "poll"]
    assert polls[0] == pytest.approx(0.2)  # right after the push was accepted
    assert [round(b - a, 6) for a, b in zip(polls, polls[1:])] == [1.0] * 5
    assert attempt.pushes == 1 and attempt.calls == 8


def test_flow_times_out_at_the_deadline(m):
    verdict, attempt, calls = simulate(m, {"lookup": [found(m)], "push": [sent(m)], "poll": [pending(m)]},
                                       DEADLINE_SECONDS=10)
    assert verdict.outcome == "timed_out"
    assert calls[-1][0] < 10 and attempt.pushes == 1


def test_flow_outage_clears_within_the_deadline(m):
    outage = reply(m, 503, raw=b"<html>503</html>", headers={"Content-Type": "text/html"})
    verdict, _, _ = simulate(m, {"lookup": [outage, outage, found(m)], "push": [sent(m)],
                                 "poll": [outage, outage, pending(m), approved(m)]})
    assert verdict.outcome == "approved"


def test_flow_never_resends_a_push_that_may_have_arrived(m):
    timeout = m["Reply"](error=m["TransportError"]("read timeout", sent=True))
    verdict, attempt, _ = simulate(m, {"lookup": [found(m)], "push": [timeout, sent(m)], "poll": [pending(m), approved(m)]})
    assert verdict.outcome == "unavailable" and "not sent again" in verdict.detail
    assert attempt.pushes == 1


def test_flow_retries_a_push_that_never_left(m):
    refused = m["Reply"](error=m["TransportError"]("connection refused", sent=False))
    verdict, attempt, _ = simulate(m, {"lookup": [found(m)], "push": [refused, sent(m)], "poll": [pending(m), approved(m)]})
    assert verdict.outcome == "approved" and attempt.pushes == 1  # the first one never reached iVALT


def test_flow_approval_before_pending_is_not_taken_for_this_login(m):
    # iVALT names results by mobile only: an approval already there when polling starts may be
    # left over from an earlier push. It counts only after this request was seen pending.
    verdict, _, calls = simulate(m, {"lookup": [found(m)], "push": [sent(m)], "poll": [approved(m)]},
                                 DEADLINE_SECONDS=5)
    assert verdict.outcome == "unexpected" and "before iVALT reported this request as pending" in verdict.detail
    stale_then_fresh = [approved(m), pending(m), approved(m)]
    verdict, _, _ = simulate(m, {"lookup": [found(m)], "push": [sent(m)], "poll": stale_then_fresh})
    assert verdict.outcome == "approved"


def test_flow_late_approval_is_not_a_success(m):
    # the second poll leaves at 1.65 s with 0.35 s left; its approval comes back at 2.2 s, too late
    verdict, _, _ = simulate(m, {"lookup": [found(m)], "push": [sent(m)], "poll": [pending(m), approved(m)]},
                             latency=0.55, DEADLINE_SECONDS=2, POLL_INTERVAL_SECONDS=0.25)
    assert verdict.outcome == "timed_out" and "after" in verdict.detail


def test_flow_outage_after_pending_is_not_fail_open(m):
    outage = reply(m, 502, raw=b"Bad Gateway", headers={"Content-Type": "text/plain"})
    verdict, _, _ = simulate(m, {"lookup": [found(m)], "push": [sent(m)], "poll": [pending(m), outage]},
                             DEADLINE_SECONDS=5)
    assert verdict.outcome == "unavailable" and not verdict.fail_open_eligible


def test_flow_outage_before_any_answer_is_fail_open_eligible(m):
    outage = reply(m, 502, raw=b"Bad Gateway", headers={"Content-Type": "text/plain"})
    verdict, _, _ = simulate(m, {"lookup": [outage]}, DEADLINE_SECONDS=5)
    assert verdict.outcome == "unavailable" and verdict.fail_open_eligible


def test_flow_throttle_longer_than_the_time_left_ends_now(m):
    throttled = reply(m, 429, {"message": "Too Many Requests"}, headers={"Retry-After": "120"})
    verdict, _, calls = simulate(m, {"lookup": [found(m)], "push": [sent(m)], "poll": [throttled]})
    assert verdict.outcome == "throttled" and len(calls) == 3


def test_flow_throttle_is_honoured(m):
    throttled = reply(m, 429, {"message": "Too Many Requests"}, headers={"Retry-After": "3"})
    verdict, _, calls = simulate(m, {"lookup": [found(m)], "push": [sent(m)], "poll": [throttled, pending(m), approved(m)]})
    polls = [t for t, step in calls if step == "poll"]
    assert verdict.outcome == "approved" and polls[1] - polls[0] >= 3.0


def many_logins(m, users, rate, after=5.0, latency=0.05, deadline=60.0):
    """`users` logins arriving at once and sharing one RequestGate, each user approving `after`
    seconds after their push: a discrete-event simulation of the real flow on a virtual clock.
    Returns ([(verdict, seconds to result)], [times at which requests were sent])."""
    import heapq

    clock = Clock()
    config = settings(m, DEADLINE_SECONDS=deadline)
    gate, waiting = m["RequestGate"](rate), m["WaitingLogins"]()
    flows = [m["verify"](m["Attempt"]("u%d@example.com" % i, 0.0, deadline), config, gate, waiting, clock)
             for i in range(users)]
    pushed, sent_at, results = {}, [], [None] * users
    events = [(0.0, i, i, None) for i in range(users)]  # (time, order, login, what to send it)
    order = users

    def answer(i, step, now):
        mobile = "+1555%07d" % i
        if step == "lookup":
            return reply(m, 200, {"data": {"details": {"mobile_with_country_code": mobile}}})
        if step == "push":
            pushed[i] = now
            return sent(m)
        return approved(m) if now >= pushed[i] + after else pending(m)

    while events:
        clock.now, _, i, value = heapq.heappop(events)
        try:
            effect = flows[i].send(value)
        except StopIteration as stop:
            results[i] = (stop.value, clock.now)
            continue
        order += 1
        if isinstance(effect, m["Sleep"]):
            heapq.heappush(events, (clock.now + effect.seconds, order, i, None))
        else:
            sent_at.append(clock.now)
            heapq.heappush(events, (clock.now + latency, order, i, answer(i, effect.step, clock.now + latency / 2)))
    return results, sent_at


def busiest_second(times):
    times = sorted(times)
    return max(sum(1 for t in times[k:] if t < start + 1.0) for k, start in enumerate(times))


@pytest.mark.parametrize("users, rate", [(200, 20), (50, 5), (30, 1000)])
def test_a_binding_budget_slows_polls_but_every_user_is_still_granted(m, users, rate):
    # The first poll after a push must come before the user can answer, however long the queue:
    # an approval is taken only after this push was seen pending.
    results, sent_at = many_logins(m, users, rate)
    outcomes = [verdict.outcome for verdict, _ in results]
    assert outcomes == ["approved"] * users, sorted(set((v.outcome, v.detail) for v, _ in results))
    assert max(seconds for _, seconds in results) < 60
    assert busiest_second(sent_at) <= rate + 5


def test_one_waiting_login_per_user(m):
    waiting = m["WaitingLogins"]()
    assert waiting.claim("+1555", "first") is None
    assert waiting.claim("+1555", "second") == "first"
    waiting.release("+1555", "second")  # not the holder: no effect
    assert waiting.claim("+1555", "third") == "first"
    waiting.release("+1555", "first")
    assert waiting.claim("+1555", "third") is None


# ----------------------------------------------------------------------------- HTTP, stubbed

@responses.activate
def test_api_client_sends_the_key_only_in_its_header(m):
    responses.add(responses.POST, API + "/get-user-by-email", json={"data": {"details": {"mobile_with_country_code": "+15551234567"}}})
    client = m["ApiClient"](m["_SETTINGS"])
    result = client.perform(m["Call"]("lookup", {"email": "alice@example.com"}, 5.0))
    assert result.status == 200 and result.error is None
    sent_request = responses.calls[0].request
    assert sent_request.headers["x-api-key"] == "unit-key-123"
    assert json.loads(sent_request.body) == {"email": "alice@example.com"}
    assert "unit-key-123" not in sent_request.url and b"unit-key-123" not in sent_request.body


@responses.activate
def test_api_client_turns_exceptions_into_replies(m):
    import requests

    responses.add(responses.POST, API + "/biometric-auth-request", body=requests.exceptions.ConnectionError("Connection refused"))
    result = m["ApiClient"](m["_SETTINGS"]).perform(m["Call"]("push", {"mobile": "+1"}, 5.0))
    assert result.error.kind == "connection refused" and result.error.sent is False


@responses.activate
def test_blocking_driver_runs_the_whole_flow(m):
    responses.add(responses.POST, API + "/get-user-by-email", json={"data": {"details": {"mobile_with_country_code": "+15551234567"}}})
    responses.add(responses.POST, API + "/biometric-auth-request", json={"data": {"status": True}})
    responses.add(responses.POST, API + "/biometric-geo-fence-auth-results", status=404,
                  json=envelope_error(404, "The mobile number provided (+15551234567) was not found."))
    responses.add(responses.POST, API + "/biometric-geo-fence-auth-results", json={"data": {"status": True}})
    import time

    config = settings(m, POLL_INTERVAL_SECONDS=0.25)
    attempt = m["Attempt"]("alice@example.com", time.monotonic(), time.monotonic() + 5)
    flow = m["verify"](attempt, config, m["RequestGate"](1000), m["WaitingLogins"](), time.monotonic)
    verdict = m["run_blocking"](flow, m["ApiClient"](config).perform)
    assert verdict.outcome == "approved"
    assert [c.request.url.rsplit("/", 1)[1] for c in responses.calls] == [
        "get-user-by-email", "biometric-auth-request", "biometric-geo-fence-auth-results", "biometric-geo-fence-auth-results"]


# ----------------------------------------------------------------------------- the deferred driver
# run_deferred on a virtual clock: Twisted's task.Clock as the reactor, futures completed by hand.


class VirtualReactor:
    """task.Clock with callFromThread (it runs on the next advance(), as on the real reactor)."""

    def __init__(self):
        from twisted.internet import task

        self.clock = task.Clock()
        self.callLater = self.clock.callLater

    def callFromThread(self, func, *args):
        self.clock.callLater(0, func, *args)

    def advance(self, seconds):
        self.clock.advance(seconds)

    def pending(self):
        return [call for call in self.clock.getDelayedCalls() if call.active()]


class HandExecutor:
    """submit() only records the call; the test starts and ends each future itself."""

    def __init__(self):
        self.futures = []

    def submit(self, func, call):
        from concurrent.futures import Future

        future = Future()
        future.call = call
        self.futures.append(future)
        return future


def drive(m, flow, hard_stop=30.0, executor=None):
    reactor, executor = VirtualReactor(), executor or HandExecutor()
    fired = []
    deferred = m["run_deferred"](flow, None, executor, hard_stop, lambda: "hard stop", reactor)
    deferred.addCallback(fired.append)
    return reactor, executor, fired


def test_deferred_driver_gives_up_a_call_that_hangs_and_the_flow_goes_on(m):
    """As run_blocking does: a call is given up 0.5 s past its timeout, the flow gets an outage
    for it and goes on; the hung call's late reply, if it ever comes, is ignored."""
    replies = []

    def flow():
        replies.append((yield m["Call"]("lookup", {}, 1.0)))
        replies.append((yield m["Call"]("lookup", {}, 1.0)))
        return "verdict"

    reactor, executor, fired = drive(m, flow())
    reactor.advance(0)
    hung = executor.futures[0]
    hung.set_running_or_notify_cancel()  # its thread is stuck in it: it cannot be cancelled
    reactor.advance(1.49)
    assert replies == [] and len(executor.futures) == 1
    reactor.advance(0.02)
    assert replies[0].error.kind == "call did not finish" and "1.5s" in replies[0].error.detail
    second = executor.futures[1]
    second.set_running_or_notify_cancel()
    second.set_result(m["Reply"](200))
    reactor.advance(0)
    assert replies[1].status == 200 and fired == ["verdict"]
    hung.set_result(m["Reply"](200))  # the stuck call ends after all
    reactor.advance(0)
    assert fired == ["verdict"] and len(replies) == 2 and reactor.pending() == []


def test_deferred_driver_at_the_hard_stop_fires_once_and_cancels_a_queued_call(m):
    closed = []

    def flow():
        try:
            yield m["Call"]("poll", {}, 10.0)
        finally:
            closed.append(True)

    reactor, executor, fired = drive(m, flow(), hard_stop=2.0)
    reactor.advance(0)
    reactor.advance(2.0)
    queued = executor.futures[0]
    assert fired == ["hard stop"] and closed == [True]
    assert queued.cancelled()  # still waiting for an HTTP thread: it will never run
    assert reactor.pending() == []


def test_deferred_driver_ends_the_login_when_a_call_cannot_be_started(m):
    class ShutDown:
        def submit(self, func, call):
            raise RuntimeError("cannot schedule new futures after shutdown")

    def flow():
        yield m["Call"]("lookup", {}, 5.0)

    reactor, _, fired = drive(m, flow(), executor=ShutDown())
    reactor.advance(0)
    assert len(fired) == 1 and fired[0].outcome == "internal_error" and "cannot schedule" in fired[0].detail
    assert reactor.pending() == []


def test_deferred_driver_keeps_the_verdict_when_the_flow_fails_to_close(m, capfd):
    def flow():
        try:
            yield m["Sleep"](0.1)
        finally:
            raise ValueError("cleanup bug")

    reactor, _, fired = drive(m, flow(), hard_stop=0.05)
    reactor.advance(0)
    reactor.advance(0.05)
    assert fired == ["hard stop"] and reactor.pending() == []
    assert "internal error while ending a login" in capfd.readouterr().out


def test_deferred_driver_ends_the_login_when_a_future_is_cancelled_elsewhere(m):
    """A call whose future someone else cancelled is an unfinished call, as in run_blocking."""
    replies = []

    def flow():
        replies.append((yield m["Call"]("poll", {}, 5.0)))
        return "verdict"

    reactor, executor, fired = drive(m, flow())
    reactor.advance(0)
    executor.futures[0].cancel()
    reactor.advance(0)
    assert replies[0].error.kind == "call did not finish" and fired == ["verdict"] and reactor.pending() == []


def test_deferred_driver_hard_stop_holds_even_if_on_timeout_fails(m):
    def flow():
        while True:
            yield m["Sleep"](1.0)

    def broken():
        raise KeyError("push_confirmed")

    reactor, fired = VirtualReactor(), []
    m["run_deferred"](flow(), None, HandExecutor(), 2.0, broken, reactor).addCallback(fired.append)
    reactor.advance(0)
    for _ in range(3):
        reactor.advance(1.0)
    assert len(fired) == 1 and fired[0].outcome == "internal_error" and "push_confirmed" in fired[0].detail
    assert reactor.pending() == []


class ThreadExecutor:
    """A real pool, closed after the test."""

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(2)
        return self.pool

    def __exit__(self, *exc_info):
        self.pool.shutdown(wait=True)


def test_drivers_end_the_login_on_an_effect_that_is_neither_call_nor_sleep(m):
    def flow():
        yield "junk"

    with ThreadExecutor() as pool:
        blocking = m["run_blocking"](flow(), None, executor=pool)
    reactor, _, fired = drive(m, flow())
    reactor.advance(0)
    for verdict in (blocking, fired[0]):
        assert verdict.outcome == "internal_error" and "yielded a str" in verdict.detail
    assert len(fired) == 1 and reactor.pending() == []


def test_drivers_hand_the_flow_the_same_reply_when_perform_raises(m):
    """perform() does not raise by design; if it ever did, both drivers say so the same way."""
    def perform(call):
        raise OSError("perform bug")

    def flow(seen):
        seen.append((yield m["Call"]("lookup", {}, 5.0)))
        return "verdict"

    blocking, deferred = [], []
    with ThreadExecutor() as pool:
        assert m["run_blocking"](flow(blocking), perform, executor=pool) == "verdict"
        reactor, fired = VirtualReactor(), []
        m["run_deferred"](flow(deferred), perform, pool, 30.0, lambda: "hard stop", reactor).addCallback(fired.append)
        reactor.advance(0)
        pool.shutdown(wait=True)  # the call has run
        reactor.advance(0)
    assert fired == ["verdict"]
    assert blocking[0].error.kind == deferred[0].error.kind and blocking[0].error.kind != "call did not finish"
