"""Loopback-only network fault helpers for tests.

Everything here binds or connects to 127.0.0.1 (or "localhost", which resolves to it)
only; nothing ever touches another address.

- :func:`refused_port`: a port where a connect() is refused at once.
- :class:`Blackhole`: a port where a connect() hangs (no SYN-ACK, no RST).
- TLS helpers built on ``trustme``: a throw-away CA and server contexts that are trusted,
  issued for the wrong host name, or issued by a CA the client does not trust.
- :class:`ConnectProxy`: a small HTTP CONNECT proxy that tunnels to loopback targets and
  records what it was asked for.

Standard library plus trustme; importable by Python 3.8.
"""

import ipaddress
import selectors
import socket
import socketserver
import ssl
import threading
import time

import trustme

__all__ = [
    "Blackhole",
    "ConnectProxy",
    "make_ca",
    "mismatched_context",
    "refused_port",
    "server_context",
    "tls_context",
    "untrusted_context",
    "write_ca_bundle",
]

LOOPBACK = "127.0.0.1"

# --------------------------------------------------------------------------- refused

# Sockets kept bound (never listening) for the life of the process.  A socket that is bound
# but not listening makes the kernel answer SYNs to its port with RST (connection refused),
# and holding the binding stops anything else - e.g. a fake server started later, or an
# ephemeral client port - from taking the port between refused_port() and its use.
_reserved = []


def refused_port():
    """Return a port on 127.0.0.1 where connecting is refused (ECONNREFUSED)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    _reserved.append(sock)
    return sock.getsockname()[1]


# --------------------------------------------------------------------------- blackhole


class Blackhole:
    """A loopback port where TCP connects hang until the client's own timeout.

    How: a listening socket with backlog 0 that is never accept()ed.  Once its accept
    queue is full (Linux admits backlog + 1 = 1 connection), the kernel silently drops
    further SYNs (with tcp_abort_on_overflow=0, the default) instead of refusing them,
    so the client retransmits SYNs and its connect() times out - which is what a
    firewalled or unreachable host looks like.  Every 127.x address that is not listening
    answers with RST instead, so this is the only loopback-only way short of firewall
    rules.  Verified on this project's machines (Linux 6.x, syncookies=1): a connect with
    a 1 s timeout raises socket.timeout after 1 s.

    The constructor fills the queue and checks that a probe connect times out; it raises
    RuntimeError if the kernel refuses or accepts instead, so a test never silently
    relies on a broken blackhole.
    """

    def __init__(self, probe_timeout=0.2):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._fillers = []
        try:
            self._fill(probe_timeout)
        except BaseException:
            self.close()
            raise

    def _fill(self, probe_timeout):
        # Connect until one attempt times out: the connections that succeeded sit in the
        # accept queue and must stay open for as long as the blackhole is used.
        for _ in range(16):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(probe_timeout)
            try:
                sock.connect((LOOPBACK, self.port))
            except OSError as exc:
                sock.close()
                # (socket.timeout is an alias of TimeoutError only from Python 3.10 on.)
                if isinstance(exc, socket.timeout):
                    return  # verified: this port now swallows SYNs
                raise RuntimeError(
                    f"Blackhole: connect to a full accept queue failed with {exc!r} instead of "
                    "hanging (tcp_abort_on_overflow set?)")
            self._fillers.append(sock)
        raise RuntimeError("Blackhole: could not make connects to 127.0.0.1 hang "
                           f"({len(self._fillers)} connects were accepted)")

    def close(self):
        for sock in self._fillers:
            sock.close()
        self._fillers = []
        self._listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# --------------------------------------------------------------------------- TLS


def make_ca():
    """A fresh throw-away certificate authority (trustme.CA)."""
    return trustme.CA()


def tls_context(ca, hostnames=("localhost", "127.0.0.1")):
    """A server-side SSLContext whose certificate ``ca`` issued for ``hostnames``
    (names and/or IP addresses)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*hostnames).configure_cert(ctx)
    return ctx


def server_context(ca):
    """Trusted and matching: valid for "localhost" and "127.0.0.1"."""
    return tls_context(ca, ("localhost", "127.0.0.1"))


def mismatched_context(ca):
    """Issued by the trusted ``ca`` but only for "wrong.example": host name check fails."""
    return tls_context(ca, ("wrong.example",))


def untrusted_context():
    """Matching names but issued by another, unknown CA: chain verification fails."""
    return tls_context(make_ca(), ("localhost", "127.0.0.1"))


def write_ca_bundle(ca, path):
    """Write ``ca``'s certificate (PEM) to ``path`` for the client's ``verify=``;
    returns the path as a str."""
    ca.cert_pem.write_to_path(str(path))
    return str(path)


# --------------------------------------------------------------------------- CONNECT proxy


def _loopback_target(host):
    """The IP to connect to for a CONNECT host, or None if it is not loopback.

    Host names other than "localhost" are refused without any DNS lookup."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return LOOPBACK
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    return str(addr) if addr.is_loopback else None


class _ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, proxy):
        self.proxy = proxy
        super().__init__((LOOPBACK, 0), _ProxyHandler)

    def handle_error(self, request, client_address):
        pass  # clients and targets hanging up are routine


class _ProxyHandler(socketserver.BaseRequestHandler):
    def handle(self):
        proxy = self.server.proxy
        client = self.request
        proxy._track(client)
        upstream = None
        try:
            if proxy._stopping.is_set():
                return  # accepted while stop() ran, possibly after its sweep
            head, rest = self._read_head(client)
            if head is None:
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) != 3 or parts[0].upper() != "CONNECT":
                self._reply(client, 405, "Method Not Allowed (CONNECT only)")
                return
            target = parts[1]
            proxy._add_target(target)
            host, _, port = target.rpartition(":")
            address = _loopback_target(host)
            if address is None or not port.isdigit():
                self._reply(client, 403, "Forbidden (loopback targets only)")
                return
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            upstream = socket.socket(family, socket.SOCK_STREAM)
            proxy._track(upstream)
            upstream.settimeout(5)
            try:
                upstream.connect((address, int(port)))
            except OSError:
                self._reply(client, 502, "Bad Gateway")
                return
            upstream.settimeout(None)
            self._reply(client, 200, "Connection established")
            if rest:
                upstream.sendall(rest)
            self._pump(client, upstream)
        finally:
            proxy._untrack(client)
            if upstream is not None:
                proxy._untrack(upstream)
                upstream.close()

    @staticmethod
    def _read_head(sock):
        # Read up to the blank line ending the CONNECT request; anything after it already
        # belongs to the tunnel (a client may pipeline its TLS ClientHello).
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk or len(data) > 65536:
                return None, b""
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        return head, rest

    @staticmethod
    def _reply(sock, status, reason):
        sock.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\n\r\n".encode("latin-1"))

    @staticmethod
    def _pump(a, b):
        # Copy bytes both ways until both directions hit EOF (half-closes are passed on)
        # or either side errors.
        peer = {a: b, b: a}
        open_dirs = {a, b}
        with selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ)
            sel.register(b, selectors.EVENT_READ)
            while open_dirs:
                for key, _ in sel.select():
                    src = key.fileobj
                    try:
                        data = src.recv(65536)
                    except OSError:
                        return
                    if data:
                        try:
                            peer[src].sendall(data)
                        except OSError:
                            return
                        continue
                    sel.unregister(src)
                    open_dirs.discard(src)
                    try:
                        peer[src].shutdown(socket.SHUT_WR)
                    except OSError:
                        pass


class ConnectProxy:
    """A threaded HTTP CONNECT proxy on 127.0.0.1 tunnelling only to loopback targets.

    ``targets`` lists every CONNECT target ("host:port") asked for, in order, including
    refused ones.  Non-loopback targets get 403 (host names other than "localhost" are not
    even resolved); other methods get 405: plain-HTTP proxying is not supported.
    """

    def __init__(self):
        self.targets = []
        self._lock = threading.Lock()
        self._socks = set()
        self._stopping = threading.Event()
        self._server = None
        self._thread = None

    def start(self):
        if self._server is not None:
            raise RuntimeError("already started")
        self._stopping.clear()
        self._server = _ProxyServer(self)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="ConnectProxy", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait=2.0):
        """Stop accepting and tear down every open tunnel (both ends)."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self._lock:
                if not self._socks:
                    break
            time.sleep(0.01)
        self._thread.join(wait)
        self._server = None
        self._thread = None

    @property
    def port(self):
        return self._server.server_address[1]

    @property
    def url(self):
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def _add_target(self, target):
        with self._lock:
            self.targets.append(target)

    def _track(self, sock):
        with self._lock:
            self._socks.add(sock)

    def _untrack(self, sock):
        with self._lock:
            self._socks.discard(sock)
