"""A fake iVALT API, served over real HTTP (or HTTPS) on the loopback interface.

It models the API as described in shared/ivalt-api.md: four POST endpoints behind an API
gateway, JSON bodies wrapped in the ``{"data", "error", "debug"}`` envelope, gateway errors
without the envelope, and a user identified only by an E.164 mobile number.

Typical use::

    with FakeIvalt() as fake:
        fake.add_user("alice@example.com", "+15551234567", behaviour="approve", after=1.0)
        # point the client at fake.url with api key "test-key", then inspect
        # fake.counts, fake.pushes_delivered, fake.log ...

The fake serves real sockets (not a mocked transport) so that the client's timeouts,
connection reuse, TLS verification and proxy handling are exercised as they would be in
production.  Everything binds to 127.0.0.1 only.

Each user follows a small script: nothing happens until a push (``/biometric-auth-request``)
reaches the user logic; ``after`` seconds later the user's answer (``behaviour``) becomes
visible to polls, and stays visible (reading it does not consume it) until the next push for
the same mobile, which restarts the script.  This mirrors "known unknown" 1 of the API notes:
an answer is attached to the mobile, not to a request.

Faults (see :class:`Fault`) can be queued per endpoint to imitate gateways, proxies and
networks misbehaving.  A faulted request never reaches the key check or the user logic.

Standard library only; importable by Python 3.8.
"""

import collections
import copy
import http.server
import json
import multiprocessing
import socket
import socketserver
import sys
import threading
import time
import traceback
import uuid
from http import HTTPStatus

__all__ = [
    "BEHAVIOURS",
    "DETAIL_DENIED",
    "DETAIL_GEOFENCE",
    "DETAIL_TIMEZONE",
    "ENDPOINTS",
    "ENDPOINT_PATHS",
    "MSG_AUTH_DONE",
    "MSG_PUSH_SENT",
    "PENDING_STYLES",
    "FakeIvalt",
    "Fault",
    "LoggedRequest",
    "RemoteFake",
]

# URL path -> short endpoint name used by counts, log records and inject().
ENDPOINTS = {
    "/get-user-by-email": "lookup",
    "/biometric-auth-request": "push",
    "/biometric-geo-fence-auth-results": "poll",
    "/biometric-auth-result": "result",
}
# Short endpoint name -> URL path.
ENDPOINT_PATHS = {name: path for path, name in ENDPOINTS.items()}

BEHAVIOURS = ("approve", "timezone", "geofence", "deny401", "deny_detail", "never")
PENDING_STYLES = ("404", "422")

# Texts as captured from (or relied on by clients of) the real API.
MSG_PUSH_SENT = "Biometric Auth Request successfully sent."
MSG_AUTH_DONE = "Biometric Authentication successfully done."
DETAIL_TIMEZONE = "You are not within the timezone."
DETAIL_GEOFENCE = "You are not within the geofencing location."
DETAIL_DENIED = "Denied - User denied biometric authentication."
# The 422 "pending" body is not known from any capture: this wording is invented.
DETAIL_PENDING_422 = "Biometric authentication is pending."


def _mobile_not_found(mobile):
    # Captured wording; the real API uses the same text for "not enrolled" and, on the
    # geo-fence endpoint, for "not answered yet".
    return f"The mobile number provided ({mobile}) was not found."


def _email_not_found(email):
    # Wording from OpenVPN's iVALT tutorial (note: no trailing full stop).
    return f"The email provided ({email}) was not found"


# --------------------------------------------------------------------------- envelope


def _debug():
    now = time.time()
    micros = int((now % 1) * 1000000)
    return {
        # e.g. "2023-11-11T10:48:54.180105Z", as in captured bodies
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{micros:06d}Z",
        "activityId": uuid.uuid4().hex,  # 32 lower-case hex chars
    }


def _ok(data):
    return {"data": data, "error": None, "debug": _debug()}


def _error(status, detail, path, title=None):
    if title is None:
        title = HTTPStatus(status).phrase
    return {
        "data": None,
        "error": {
            "type": f"https://httpstatuses.com/{status}",
            "title": title,
            "status": status,
            "detail": detail,
            "instance": "/services" + path,
        },
        "debug": _debug(),
    }


# --------------------------------------------------------------------------- faults


class Fault:
    """One way for a request to go wrong.  Build with the class-method constructors.

    ``kind`` names the fault and ``params`` holds its arguments; both are read by the
    request handler.  A Fault is immutable in practice and may be injected many times.
    """

    def __init__(self, kind, **params):
        self.kind = kind
        self.params = params

    def __repr__(self):
        shown = {k: (v if not isinstance(v, bytes) or len(v) < 40 else v[:37] + b"...")
                 for k, v in self.params.items()}
        return "Fault.{}({})".format(self.kind, ", ".join(
            f"{k}={v!r}" for k, v in shown.items()))

    @classmethod
    def response(cls, status, body, content_type="application/json", headers=None):
        """Answer with exactly this status and body (dict/list -> JSON, str -> UTF-8).

        Content-Length is computed from the body unless ``headers`` sets one itself
        (which allows a lying Content-Length).  Covers HTML error pages from a gateway or
        proxy, 429 with or without Retry-After, 200 with invalid JSON or a wrong shape.
        """
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode("utf-8")
        elif isinstance(body, str):
            body = body.encode("utf-8")
        elif not isinstance(body, bytes):
            raise TypeError("body must be bytes, str, dict or list")
        return cls("response", status=int(status), body=body, content_type=content_type,
                   headers=dict(headers or {}))

    @classmethod
    def hang(cls, seconds=None):
        """Read the request and never answer.  After ``seconds`` (or on stop) the
        connection is closed, still without any response."""
        return cls("hang", seconds=seconds)

    @classmethod
    def close(cls):
        """Read the request, then close the connection without sending a single byte."""
        return cls("close")

    @classmethod
    def close_mid(cls):
        """Send a 200 status line and headers announcing Content-Length 1000, then 20 bytes
        of body, then close: a truncated response."""
        return cls("close_mid")

    @classmethod
    def drip(cls, interval=0.2, total=100000):
        """Send 200 headers with Content-Length ``total``, then the body one byte every
        ``interval`` seconds.  Each byte resets a per-read timeout, so only a client with
        an overall deadline escapes.  The body would be a valid JSON string if complete."""
        if total < 2:
            raise ValueError("total must be >= 2")
        return cls("drip", interval=float(interval), total=int(total))

    @classmethod
    def huge(cls, size=10 * 1024 * 1024):
        """Send a 200 application/json body of exactly ``size`` bytes: one valid JSON string
        (so a client without a size cap parses it and then rejects its shape)."""
        if size < 2:
            raise ValueError("size must be >= 2")
        return cls("huge", size=int(size))

    @classmethod
    def redirect(cls, location):
        """Answer 302 Found with this Location."""
        return cls("redirect", location=location)

    @classmethod
    def delay(cls, seconds):
        """Wait ``seconds``, then handle the request normally (key check, user logic)."""
        return cls("delay", seconds=float(seconds))


# --------------------------------------------------------------------------- records


class LoggedRequest:
    """One request as received by the fake (an entry of ``FakeIvalt.log``)."""

    __slots__ = (
        "body",
        "client_port",
        "connection",
        "endpoint",
        "fault",
        "headers",
        "method",
        "path",
        "status",
        "time",
    )

    def __init__(self, time, endpoint, method, path, headers, body, client_port, connection,
                 fault):
        self.time = time                # time.monotonic() when the request was read
        self.endpoint = endpoint        # "lookup" / "push" / "poll" / "result" / "other"
        self.method = method
        self.path = path
        self.headers = headers          # dict, names lower-cased
        self.body = body                # parsed JSON, or None if absent / not JSON
        self.status = None              # status sent; None if no status line was sent
        self.client_port = client_port  # the client's source port
        self.connection = connection    # serial number of the TCP connection (1, 2, ...)
        self.fault = fault              # the Fault applied, or None

    def __repr__(self):
        return "<LoggedRequest {} {} status={} conn={}{}>".format(
            self.endpoint, self.body, self.status, self.connection,
            f" fault={self.fault!r}" if self.fault else "")


class _User:
    def __init__(self, uid, email, mobile, behaviour, after, pending_style, name,
                 country_code):
        self.id = uid
        self.email = email
        self.mobile = mobile
        self.behaviour = behaviour
        self.after = float(after)
        self.pending_style = pending_style
        self.name = name
        self.country_code = country_code
        self.push_at = None  # monotonic time of the latest delivered push

    def due_at(self):
        if self.push_at is None or self.behaviour == "never":
            return None
        return self.push_at + self.after

    def answered(self, now):
        due = self.due_at()
        return due is not None and now >= due

    def lookup_details(self):
        return {
            "id": self.id,
            "name": self.name,
            "email": self.email,
            "country_code": self.country_code,
            "mobile": self.mobile[len(self.country_code):],
            "mobile_with_country_code": self.mobile,
        }

    def auth_details(self):
        return {
            "id": self.id,
            "name": self.name,
            "email": self.email,
            "country_code": self.country_code,
            "mobile": self.mobile[len(self.country_code):],
            "latitude": 37.7749,
            "longitude": -122.4194,
            "imei": "356938035643809",
            "address": "1 Example Street, Springfield",
        }


def _guess_country_code(mobile):
    # Only used to fill the "country_code"/"mobile" members, whose real format is a guess.
    if mobile.startswith("+1"):
        return "+1"
    return mobile[:3]


# --------------------------------------------------------------------------- HTTP server


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # 200 clients may connect at the same instant; the default backlog of 5 would make
    # the kernel drop SYNs and the clients see 1 s+ retransmission delays.
    request_queue_size = 1024

    def __init__(self, fake, address):
        self.fake = fake
        super().__init__(address, _Handler)

    def server_bind(self):
        # HTTPServer.server_bind() calls socket.getfqdn(), which can block on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    def handle_error(self, request, client_address):
        # Network errors are the normal life of a fault-injecting server (clients giving
        # up, TLS handshakes rejected, stop() tearing sockets down): stay quiet.  Anything
        # else is a bug in the fake: keep it for tests to assert on, and print it.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # includes ssl.SSLError, ConnectionError, timeouts
            return
        self.fake.errors.append(exc)
        traceback.print_exc()


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 so that clients keep connections alive; every response therefore carries
    # a correct Content-Length (or closes the connection).
    protocol_version = "HTTP/1.1"
    server_version = "FakeIvalt/1.0"
    sys_version = ""

    def setup(self):
        fake = self.server.fake
        raw = self.request
        self._conn_id = fake._conn_opened(raw)
        # Headers and body go out in separate writes; without TCP_NODELAY, Nagle plus the
        # client's delayed ACK can add ~40 ms to a response on a kept-alive connection.
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if fake.ssl_context is not None:
            # Handshake here, in the per-connection thread, rather than by wrapping the
            # listening socket: a client that stalls the handshake then blocks only itself.
            # wrap_socket() detaches the raw socket object (its fd moves to the wrapper), so
            # the wrapper must be tracked *before* the handshake for stop() to interrupt it.
            raw.settimeout(10)
            fake._conn_closed(raw)
            tls = fake.ssl_context.wrap_socket(raw, server_side=True,
                                               do_handshake_on_connect=False)
            fake._conn_track(tls)
            try:
                tls.do_handshake()
                tls.settimeout(None)
            except BaseException:
                # finish() will not run: untrack and close here.
                fake._conn_closed(tls)
                tls.close()
                raise
            self.request = tls
        super().setup()

    def finish(self):
        try:
            super().finish()
        finally:
            fake = self.server.fake
            fake._conn_closed(self.request)
            if fake.ssl_context is not None:
                # The server only closes the (detached) raw socket; close the TLS wrapper.
                try:
                    self.request.close()
                except OSError:
                    pass

    def log_message(self, format, *args):
        pass

    # Every method goes through _dispatch so that non-POST requests are logged and get 405.
    def do_POST(self):
        self._dispatch()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_POST

    # ---------------------------------------------------------------- request handling

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # skip trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self):
        fake = self.server.fake
        self._rec = None  # the handler object lives as long as the (keep-alive) connection
        path = self.path.split("?", 1)[0]
        endpoint = ENDPOINTS.get(path)
        try:
            raw = self._read_body()
        except ValueError:
            self.close_connection = True
            self._send(400, b"bad framing\n", "text/plain", headers={"Connection": "close"})
            return
        try:
            body = json.loads(raw.decode("utf-8")) if raw else None
        except ValueError:  # includes UnicodeDecodeError and JSONDecodeError
            body = None
        headers = {k.lower(): v for k, v in self.headers.items()}

        fault = fake._take_fault(endpoint) if endpoint else None
        self._rec = fake._record(endpoint or "other", self.command, path, headers, body,
                                 self.client_address[1], self._conn_id, fault)

        if fault is not None:
            if fault.kind != "delay":
                self._apply_fault(fault)
                return
            fake._stop_event.wait(fault.params["seconds"])

        # Order of checks as on AWS API Gateway: route, then key, then the backend.
        if endpoint is None:
            self._json(403, {"message": "Missing Authentication Token"})
            return
        if self.command != "POST":
            self._json(405, {"message": "Method Not Allowed"})
            return
        if headers.get("x-api-key") != fake.api_key:
            self._json(403, {"message": "Forbidden"})
            return
        if not isinstance(body, dict):
            self._json(400, _error(400, "The request body must be a JSON object.", path))
            return
        status, payload = fake._handle(endpoint, path, body)
        self._json(status, payload)

    # ---------------------------------------------------------------- responses

    def _send(self, status, body, content_type, headers=None, content_length=None):
        headers = headers or {}
        self.send_response(status)
        self._rec_status(status)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
        if not any(k.lower() == "content-length" for k in headers):
            self.send_header("Content-Length",
                             str(len(body) if content_length is None else content_length))
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _json(self, status, obj, headers=None):
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json", headers)

    def _rec_status(self, status):
        rec = getattr(self, "_rec", None)
        if rec is not None:
            rec.status = status

    def _apply_fault(self, fault):
        stop = self.server.fake._stop_event
        p = fault.params
        kind = fault.kind
        if kind == "response":
            self._send(p["status"], p["body"], p["content_type"], p["headers"])
        elif kind == "hang":
            self.close_connection = True
            stop.wait(p["seconds"])  # None: until stop()
        elif kind == "close":
            self.close_connection = True  # the server then closes the socket: FIN, no bytes
        elif kind == "close_mid":
            self.close_connection = True
            self._send(200, b'{"data": {"status": ', "application/json",
                       content_length=1000)
        elif kind == "drip":
            self.close_connection = True
            total = p["total"]
            self._send(200, b"", "application/json", content_length=total)
            try:
                for i in range(total):
                    self.wfile.write(b'"' if i in (0, total - 1) else b"x")
                    if stop.wait(p["interval"]):
                        return
            except OSError:
                return  # the client gave up
        elif kind == "huge":
            self.close_connection = True
            size = p["size"]
            self._send(200, b"", "application/json", content_length=size)
            chunk = b"x" * 65536
            try:
                self.wfile.write(b'"')
                left = size - 2
                while left > 0 and not stop.is_set():
                    n = min(left, len(chunk))
                    self.wfile.write(chunk[:n])
                    left -= n
                self.wfile.write(b'"')
            except OSError:
                return  # the client stopped reading early and closed: expected
        elif kind == "redirect":
            self._json(302, {"message": "Found"}, headers={"Location": p["location"]})
        else:  # pragma: no cover - constructors make this unreachable
            raise ValueError(f"unknown fault kind {kind!r}")


# --------------------------------------------------------------------------- the fake


class FakeIvalt:
    """The fake API.  See the module docstring.

    Public state, safe to read from tests while the server runs:

    - ``counts``: endpoint name -> requests received, faulted ones included
      (requests to unknown paths are counted under "other");
    - ``pushes_delivered``: mobile -> pushes that reached the user logic;
    - ``log``: list of :class:`LoggedRequest`, in arrival order;
    - ``connections``: TCP connections accepted so far;
    - ``errors``: unexpected (non-network) exceptions raised inside the fake.
    """

    def __init__(self, api_key="test-key", ssl_context=None, host="127.0.0.1"):
        self.api_key = api_key
        self.ssl_context = ssl_context
        self.host = host
        self.errors = []
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._users_by_email = {}
        self._users_by_mobile = {}
        # endpoint -> FIFO of [fault, remaining uses or None for "forever"]
        self._faults = {name: collections.deque() for name in ENDPOINT_PATHS}
        self._next_id = 1000
        self._conns = set()
        self._server = None
        self._thread = None
        self.reset_counts()

    # ---------------------------------------------------------------- lifecycle

    def start(self):
        """Bind an ephemeral port and serve in a daemon thread.  Returns self."""
        if self._server is not None:
            raise RuntimeError("already started")
        self._stop_event = threading.Event()
        self._server = _Server(self, (self.host, 0))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"FakeIvalt:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait=2.0):
        """Stop serving and close every client connection, including idle keep-alive ones
        and those held by hang/drip faults.  Waits up to ``wait`` s for handler threads."""
        server = self._server
        if server is None:
            return
        self._stop_event.set()  # wakes hang / drip / delay faults
        server.shutdown()  # ends serve_forever(): no new connections are accepted
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            # shutdown() (not close()) is what unblocks a thread sitting in recv()/send()
            # on this socket.  socket.socket.shutdown also works on an SSLSocket without
            # touching its TLS state, which another thread may be using.
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self._lock:
                if not self._conns:
                    break
            time.sleep(0.01)
        self._thread.join(wait)
        self._server = None
        self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def port(self):
        if self._server is None:
            raise RuntimeError("not started")
        return self._server.server_address[1]

    @property
    def url(self):
        """Base URL without trailing slash.  With TLS the host is "localhost" so that
        certificates can be issued for a name."""
        if self.ssl_context is not None:
            return f"https://localhost:{self.port}"
        return f"http://{self.host}:{self.port}"

    # ---------------------------------------------------------------- users

    def add_user(self, email, mobile, behaviour="approve", after=0.0, pending_style="404",
                 name=None, country_code=None):
        """Enrol a user.  ``email`` is matched exactly as given (the client is expected to
        normalise); ``mobile`` is the E.164 string.  ``after``: seconds between a push and
        the answer becoming visible.  ``pending_style``: how the geo-fence endpoint says
        "not answered yet" ("404" as observed, or "422")."""
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour must be one of {BEHAVIOURS}")
        if pending_style not in PENDING_STYLES:
            raise ValueError(f"pending_style must be one of {PENDING_STYLES}")
        if name is None:
            name = email.split("@", 1)[0].replace(".", " ").title()
        if country_code is None:
            country_code = _guess_country_code(mobile)
        with self._lock:
            old = self._users_by_email.pop(email, None)
            if old is not None:
                self._users_by_mobile.pop(old.mobile, None)
            self._next_id += 1
            user = _User(self._next_id, email, mobile, behaviour, after, pending_style, name,
                         country_code)
            self._users_by_email[email] = user
            self._users_by_mobile[mobile] = user

    def deny_unpushed(self):
        """Every user no push has reached yet now denies at once (a denial is final).  Done
        under the lock a push takes, so no push slips in between.  Returns how many changed."""
        changed = 0
        with self._lock:
            for user in self._users_by_mobile.values():
                if user.push_at is None:
                    user.behaviour, user.after = "deny401", 0.0
                    changed += 1
        return changed

    def answer_due_at(self, mobile):
        """time.monotonic() at which the current answer for ``mobile`` became (or becomes)
        visible; None before any push or for behaviour "never"."""
        with self._lock:
            user = self._users_by_mobile.get(mobile)
            return user.due_at() if user else None

    # ---------------------------------------------------------------- faults

    def inject(self, endpoint, fault, times=1):
        """Queue ``fault`` for the next ``times`` requests of ``endpoint`` ("lookup",
        "push", "poll", "result"); times=None applies it until clear_faults().  Queued
        faults are used first-in first-out, so a forever fault hides later ones."""
        if endpoint not in self._faults:
            raise ValueError(f"endpoint must be one of {sorted(self._faults)}")
        if not isinstance(fault, Fault):
            raise TypeError("fault must be a Fault")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        with self._lock:
            self._faults[endpoint].append([fault, times])

    def clear_faults(self, endpoint=None):
        with self._lock:
            for name, queue in self._faults.items():
                if endpoint is None or name == endpoint:
                    queue.clear()

    def _take_fault(self, endpoint):
        with self._lock:
            queue = self._faults[endpoint]
            if not queue:
                return None
            entry = queue[0]
            if entry[1] is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    queue.popleft()
            return entry[0]

    # ---------------------------------------------------------------- counters

    def reset_counts(self):
        """Zero counts, pushes_delivered, log and connections (users and their push
        state are kept)."""
        with self._lock:
            self.counts = {name: 0 for name in ENDPOINT_PATHS}
            self.counts["other"] = 0
            self.pushes_delivered = {}
            self.log = []
            self.connections = 0

    def max_rate(self, window=1.0):
        """Highest number of requests received within any interval of ``window`` s."""
        with self._lock:
            times = sorted(rec.time for rec in self.log)
        best = 0
        first = 0
        for i, t in enumerate(times):
            while times[first] <= t - window:
                first += 1
            best = max(best, i - first + 1)
        return best

    def _record(self, endpoint, method, path, headers, body, client_port, conn_id, fault):
        rec = LoggedRequest(time.monotonic(), endpoint, method, path, headers, body,
                            client_port, conn_id, fault)
        with self._lock:
            self.counts[endpoint] = self.counts.get(endpoint, 0) + 1
            self.log.append(rec)
        return rec

    def _conn_opened(self, sock):
        with self._lock:
            self.connections += 1
            serial = self.connections
        self._conn_track(sock)
        return serial

    def _conn_track(self, sock):
        with self._lock:
            self._conns.add(sock)
        if self._stop_event.is_set():
            # Added just as stop() ran, possibly after it swept the tracked sockets.
            # (stop() sets the event before taking its snapshot, so no socket escapes.)
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def _conn_closed(self, sock):
        with self._lock:
            self._conns.discard(sock)

    # ---------------------------------------------------------------- user logic

    def _handle(self, endpoint, path, body):
        field = "email" if endpoint == "lookup" else "mobile"
        value = body.get(field)
        if not isinstance(value, str) or not value:
            return 400, _error(400, f'"{field}" is required.', path)

        now = time.monotonic()
        with self._lock:
            if endpoint == "lookup":
                user = self._users_by_email.get(value)
                if user is None:
                    return 404, _error(404, _email_not_found(value), path)
                return 200, _ok({"status": True, "message": "User details.",
                                 "details": user.lookup_details()})

            user = self._users_by_mobile.get(value)
            if user is None:
                return 404, _error(404, _mobile_not_found(value), path)

            if endpoint == "push":
                user.push_at = now  # a new push restarts the user's script
                self.pushes_delivered[value] = self.pushes_delivered.get(value, 0) + 1
                return 200, _ok({"status": True, "message": MSG_PUSH_SENT, "details": None})

            answered = user.answered(now)
            behaviour = user.behaviour
            approved = _ok({"status": True, "message": MSG_AUTH_DONE,
                            "details": user.auth_details()})

            if endpoint == "result":  # no policy checks on this endpoint
                if not answered:
                    return 422, _error(422, DETAIL_PENDING_422, path)
                if behaviour in ("deny401", "deny_detail"):
                    return 401, _error(401, DETAIL_DENIED, path)
                return 200, approved

            # endpoint == "poll": /biometric-geo-fence-auth-results
            if not answered:
                if user.pending_style == "422":
                    return 422, _error(422, DETAIL_PENDING_422, path)
                return 404, _error(404, _mobile_not_found(value), path)
            if behaviour == "approve":
                return 200, approved
            if behaviour == "timezone":
                return 403, _error(403, DETAIL_TIMEZONE, path, title="Invalid details")
            if behaviour == "geofence":
                return 403, _error(403, DETAIL_GEOFENCE, path, title="Invalid details")
            if behaviour == "deny401":
                return 401, _error(401, DETAIL_DENIED, path)
            # "deny_detail": a denial reported the way policy failures are (a guess).
            return 403, _error(403, DETAIL_DENIED, path, title="Forbidden")


# ---------------------------------------------------------------------------- in a child process


def _serve_remote(conn, api_key):
    """The child's side of RemoteFake: one FakeIvalt, driven by (name, args, kwargs) messages."""
    fake = FakeIvalt(api_key=api_key).start()
    conn.send(("ok", fake.url))
    try:
        while True:
            name, args, kwargs = conn.recv()
            if name == "_exit":
                break
            try:
                if name == "_get":
                    with fake._lock:  # a snapshot: the server's threads change these
                        value = copy.deepcopy(getattr(fake, args[0]))
                else:
                    value = getattr(fake, name)(*args, **kwargs)
                conn.send(("ok", value))
            except Exception as exc:  # noqa: BLE001 - the parent raises it
                conn.send(("error", "%s: %s" % (type(exc).__name__, exc)))
    finally:
        fake.stop()
        conn.close()


class RemoteFake:
    """A FakeIvalt served from a child process, as the real API is served from far away.

    Inside Access Server the API's own work (parsing, logging, its threads) takes none of
    the server's CPU time, GIL or heap; an in-process fake would charge all of that to the
    reactor being measured.  The benchmark uses this.  The methods in METHODS are called over
    a pipe; ``get(name)`` reads a public attribute (a copy taken under the fake's lock);
    ``counts`` is ``get("counts")``.  Times are time.monotonic(), the same clock in both
    processes on Linux.  A child that dies or does not answer in time breaks the link: that
    call and every later one raise RuntimeError, so no answer is ever read as another's.
    """

    METHODS = ("add_user", "answer_due_at", "max_rate", "deny_unpushed", "inject", "clear_faults", "reset_counts")

    def __init__(self, api_key="test-key", timeout=20.0):
        context = multiprocessing.get_context("spawn")  # never fork a process running threads
        self._conn, child_conn = context.Pipe()
        self._lock = threading.Lock()
        self._timeout = timeout
        self._broken = None  # why the link is no longer usable
        self._process = context.Process(target=_serve_remote, args=(child_conn, api_key),
                                        name="fake-ivalt", daemon=True)
        self._process.start()
        child_conn.close()
        try:
            with self._lock:
                self.url = self._reply("start")
        except BaseException:
            self.stop()
            raise

    def _reply(self, what):
        """The answer to the message just sent (the caller holds the lock)."""
        try:
            if not self._conn.poll(self._timeout):
                raise RuntimeError("did not answer %s within %.0f s" % (what, self._timeout))
            status, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._broken = "the fake iVALT process is gone (exit code %s): %s" % (
                self._process.exitcode, type(exc).__name__)
            raise RuntimeError(self._broken) from None
        except RuntimeError as exc:
            self._broken = "the fake iVALT process %s" % exc
            raise RuntimeError(self._broken) from None
        if status != "ok":
            raise RuntimeError("the fake iVALT process: %s" % value)
        return value

    def _call(self, name, *args, **kwargs):
        with self._lock:
            if self._broken:
                raise RuntimeError(self._broken)
            try:
                self._conn.send((name, args, kwargs))
            except OSError as exc:
                self._broken = "the fake iVALT process is gone: %s" % type(exc).__name__
                raise RuntimeError(self._broken) from None
            return self._reply(name)

    def get(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._call("_get", name)

    @property
    def counts(self):
        return self.get("counts")

    def __getattr__(self, name):
        if name not in RemoteFake.METHODS:
            raise AttributeError("RemoteFake has no %r (methods: %s; attributes: get(name))"
                                 % (name, ", ".join(RemoteFake.METHODS)))
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)

    def stop(self):
        with self._lock:
            if self._process is None:
                return
            if not self._broken:  # a broken link may not be read: do not wait for the child
                try:
                    self._conn.send(("_exit", (), {}))
                    self._process.join(10)
                except OSError:
                    pass
            self._broken = "the fake iVALT process was stopped"
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(5)
            self._conn.close()
            self._process = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()
