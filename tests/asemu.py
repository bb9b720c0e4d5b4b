"""Emulation of how OpenVPN Access Server loads and calls a post-auth script.

See /work/shared/access-server.md for the sources behind each point.

What this reproduces (believed faithful):

* Loading. Access Server stores the script's *text* and executes it from a
  string. Here the text is compiled with filename ``"<string>"`` (tracebacks
  show ``File "<string>"``) and exec'd in a fresh globals dict that has no
  ``__file__``, no package and a ``__name__`` that is not ``"__main__"``. The
  compile does not inherit this module's ``__future__`` flags
  (``dont_inherit=True``), so annotations are evaluated the way the target
  interpreter evaluates them (``list[str]`` at module level breaks 3.8).
  Errors at load propagate to the caller.
* Settings. ``env`` is applied to ``os.environ`` for the duration of the exec
  only, then restored: a script must read its settings at load.
* Status constants. A stub ``pyovpn.plugin`` module is put into
  ``sys.modules``; its ``SUCCEED`` and ``FAIL`` are values no script could
  guess (``SUCCEED``'s real value is unknown; ``FAIL`` was seen as 1), so any
  hard-coded constant shows up as a wrong status. ``without_pyovpn()`` makes
  the import fail, for the fallback path.
* Threads. Access Server runs on Twisted. ``SYNCHRONOUS`` true: ``post_auth``
  is called on the reactor thread, and a returned ``Deferred`` is awaited.
  ``SYNCHRONOUS`` false or absent: ``post_auth`` runs via ``deferToThread`` on
  the reactor's thread pool, bounded at Twisted's default of 10 threads (the
  pool also serves DNS look-ups). One reactor runs for the whole test process
  in a daemon thread; it is never stopped or restarted.
* The call. ``post_auth(authcred, attributes, authret, info)`` runs after a
  *successful* primary authentication, so ``authret["status"]`` is already
  ``SUCCEED`` on entry. A returned tuple ``(authret, proplist_save)`` is
  reduced to its first element.

What is unknown, and how this emulation treats it:

* The real ``__name__`` (``"__builtin__"`` here, absent from ``sys.modules``;
  ``exec(text, {})`` would give ``"builtins"``).
* The exact keys Access Server puts into each dict (``password`` in
  ``authcred``, ``log_service_name`` for VPN logins, the full ``proplist``);
  the defaults below are plausible, and tests can pass their own dicts,
  malformed ones included.
* What Access Server does when ``post_auth`` raises, or how long it waits:
  the exception is recorded in ``LoginResult.raised`` (tests should assert it
  is None) and the test thread gives up after ``timeout`` seconds.
* Whether the worker pool really is the reactor's pool of 10 threads.
* A ``Deferred`` returned from a worker thread (SYNCHRONOUS false): behaviour
  unknown, reported as an ``EmulationError`` in ``raised``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from twisted.internet import threads as _twisted_threads
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

# Distinctive status values: not 0, 1, True, False, or any other guessable value.
SUCCEED = 7301
FAIL = 7307

POOL_SIZE = 10  # Twisted's default maximum for the reactor thread pool.
SCRIPT_MODULE_NAME = "__builtin__"  # __name__ seen by the script; unknown in reality.
REACTOR_THREAD_NAME = "asemu-reactor"
DEFAULT_TIMEOUT = 120.0

__all__ = [
    "DEFAULT_TIMEOUT",
    "FAIL",
    "POOL_SIZE",
    "REACTOR_THREAD_NAME",
    "SCRIPT_MODULE_NAME",
    "SUCCEED",
    "AccessServer",
    "EmulationError",
    "LoginResult",
    "LoginTimeout",
    "PoolMonitor",
    "ReactorHeartbeat",
    "Script",
    "get_reactor",
    "install_pyovpn",
    "load_script",
    "pool_stats",
    "wait_pool_idle",
    "without_pyovpn",
]


class EmulationError(Exception):
    """The emulation met something it cannot run (e.g. misuse, unknown behaviour)."""


class LoginTimeout(AssertionError):
    """A login did not produce a result within its timeout."""


# --------------------------------------------------------------------------
# pyovpn stub
# --------------------------------------------------------------------------

_ABSENT: Any = object()
_pyovpn_lock = threading.RLock()
_pyovpn_blocked = 0


def _make_pyovpn() -> dict[str, types.ModuleType]:
    pkg = types.ModuleType("pyovpn")
    pkg.__path__ = []  # a package, so "pyovpn.plugin" is importable
    pkg.__doc__ = "asemu stub of Access Server's pyovpn package"
    plugin = types.ModuleType("pyovpn.plugin")
    plugin.__doc__ = "asemu stub of pyovpn.plugin"
    plugin.SUCCEED = SUCCEED
    plugin.FAIL = FAIL
    pkg.plugin = plugin
    return {"pyovpn": pkg, "pyovpn.plugin": plugin}


def install_pyovpn() -> None:
    """Put the stub ``pyovpn`` and ``pyovpn.plugin`` into ``sys.modules``.

    Called by ``load_script``; the stubs then stay for the process (so imports
    made inside ``post_auth`` work), except inside ``without_pyovpn()``.
    """
    with _pyovpn_lock:
        if _pyovpn_blocked:
            return
        current = sys.modules.get("pyovpn.plugin")
        if getattr(current, "SUCCEED", None) == SUCCEED and getattr(current, "FAIL", None) == FAIL:
            return
        sys.modules.update(_make_pyovpn())


@contextlib.contextmanager
def without_pyovpn() -> Iterator[None]:
    """Make ``import pyovpn`` / ``from pyovpn.plugin import ...`` fail.

    Scripts loaded (and logins run) inside the block see no ``pyovpn``;
    the stubs come back afterwards.
    """
    global _pyovpn_blocked
    with _pyovpn_lock:
        _pyovpn_blocked += 1
        saved = {name: sys.modules.get(name, _ABSENT) for name in ("pyovpn", "pyovpn.plugin")}
        # None in sys.modules makes the import raise ModuleNotFoundError.
        sys.modules["pyovpn"] = None  # type: ignore[assignment]
        sys.modules["pyovpn.plugin"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        with _pyovpn_lock:
            _pyovpn_blocked -= 1
            for name, module in saved.items():
                if module is _ABSENT:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
            if not _pyovpn_blocked:
                install_pyovpn()


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

@contextlib.contextmanager
def _environ(env: Mapping[str, str | None] | None) -> Iterator[None]:
    if not env:
        yield
        return
    saved = {key: os.environ.get(key) for key in env}
    try:
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Script:
    """A loaded post-auth script: its text, namespace and origin."""

    def __init__(self, text: str, ns: dict[str, Any], path: str | None = None,
                 had_pyovpn: bool = True) -> None:
        self.text = text
        self.ns = ns
        self.path = path
        self.had_pyovpn = had_pyovpn

    @property
    def synchronous(self) -> bool:
        """``SYNCHRONOUS`` truthiness, read at call time like Access Server."""
        return bool(self.ns.get("SYNCHRONOUS", False))

    @property
    def post_auth(self) -> Any:
        try:
            return self.ns["post_auth"]
        except KeyError:
            raise EmulationError("the script defines no post_auth") from None

    def __repr__(self) -> str:
        origin = self.path or "<text>"
        return f"<Script {origin} synchronous={self.synchronous}>"


def _read_source(path_or_text: str | os.PathLike[str]) -> tuple[str, str | None]:
    if isinstance(path_or_text, os.PathLike):
        path = os.fspath(path_or_text)
    elif "\n" in path_or_text or not path_or_text.strip():
        return path_or_text, None
    elif os.path.isfile(path_or_text) or path_or_text.endswith(".py"):
        path = path_or_text  # a missing *.py raises FileNotFoundError below
    else:
        return path_or_text, None
    with open(path, encoding="utf-8") as handle:
        return handle.read(), path


def load_script(path_or_text: str | os.PathLike[str],
                env: Mapping[str, str | None] | None = None,
                module_name: str = SCRIPT_MODULE_NAME) -> Script:
    """Load a post-auth script the way Access Server does.

    ``path_or_text``: a path (``os.PathLike``, or a one-line str naming a file
    or ending in ``.py``) whose text is read, or the script text itself.
    ``env``: variables set in ``os.environ`` during the exec only; a value of
    None removes the variable. Exceptions raised by the script propagate.
    """
    text, path = _read_source(path_or_text)
    install_pyovpn()
    with _pyovpn_lock:
        had_pyovpn = not _pyovpn_blocked
    # dont_inherit: this module's `from __future__ import annotations` must not
    # leak into the script and hide annotations that break on Python 3.8.
    code = compile(text, "<string>", "exec", dont_inherit=True)
    ns: dict[str, Any] = {"__name__": module_name, "__doc__": None}
    with _environ(env):
        exec(code, ns)  # noqa: S102 - this is how Access Server runs the script
    return Script(text, ns, path, had_pyovpn)


# --------------------------------------------------------------------------
# Reactor and pool
# --------------------------------------------------------------------------

_reactor_lock = threading.Lock()
_reactor_thread: threading.Thread | None = None


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    # Pool threads inherit daemon-ness from whichever thread creates them,
    # which in Twisted's Team can be the reactor, a worker or a caller of
    # callInThread. Force daemon threads so a stuck worker never blocks exit.
    kwargs["daemon"] = True
    return threading.Thread(*args, **kwargs)


def get_reactor() -> Any:
    """Return the global reactor, started once in a daemon thread."""
    global _reactor_thread
    from twisted.internet import reactor

    with _reactor_lock:
        if _reactor_thread is None:
            if reactor.running:
                raise EmulationError("a reactor is already running outside asemu")
            pool = reactor.getThreadPool()  # created now, started when running
            pool.threadFactory = _daemon_thread
            reactor.suggestThreadPoolSize(POOL_SIZE)
            running = threading.Event()
            reactor.callWhenRunning(running.set)
            _reactor_thread = threading.Thread(
                target=reactor.run, kwargs={"installSignalHandlers": False},
                name=REACTOR_THREAD_NAME, daemon=True)
            _reactor_thread.start()
            if not running.wait(10):
                raise EmulationError("the Twisted reactor did not start")
    return reactor


def _on_reactor_thread() -> bool:
    return threading.current_thread() is _reactor_thread


def _blocking_call(func: Any, *args: Any, **kwargs: Any) -> Any:
    """Run ``func`` on the reactor thread and return its result."""
    reactor = get_reactor()
    if _on_reactor_thread():
        return func(*args, **kwargs)
    return _twisted_threads.blockingCallFromThread(reactor, func, *args, **kwargs)


def pool_stats() -> dict[str, int]:
    """Current state of the reactor's thread pool.

    ``busy``: threads running a work item; ``idle``: started threads waiting
    for work; ``backlog``: work items queued because all ``max`` threads are
    busy; ``max``: the pool limit.

    One snapshot of the pool's team, read without allocating much: the legacy
    attributes (``pool.working``, ``pool.q.qsize()``) build a list and define
    a new class on every read, and PoolMonitor reads a thousand times a second.
    That garbage (cycles of type objects) set off full garbage collections,
    which stop the reactor: the instrument disturbed what it measured.
    """
    pool = get_reactor().getThreadPool()
    team = getattr(pool, "_team", None)
    if team is None:  # a Twisted without the team-based pool
        return {"busy": len(pool.working), "idle": len(pool.waiters),
                "backlog": pool.q.qsize(), "max": pool.max}
    stats = team.statistics()
    return {
        "busy": stats.busyWorkerCount,
        "idle": stats.idleWorkerCount,
        "backlog": stats.backloggedWorkCount,
        "max": pool.max,
    }


def wait_pool_idle(timeout: float = 10.0) -> None:
    """Wait until the pool has no busy thread and no backlog (e.g. after a timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = pool_stats()
        if not stats["busy"] and not stats["backlog"]:
            return
        if time.monotonic() > deadline:
            raise LoginTimeout(f"thread pool still busy after {timeout:.1f}s: {stats!r}")
        time.sleep(0.005)


# --------------------------------------------------------------------------
# Logins
# --------------------------------------------------------------------------

class LoginResult:
    """The outcome of one login.

    ``authret``: what post_auth returned (first element of a tuple), or None
    if it raised. ``raised``: the exception post_auth raised (or its Deferred
    failed with), else None; ``traceback``: its formatted traceback.
    ``elapsed`` = ``completion - arrival`` (monotonic seconds), where arrival
    is when the login reached the reactor; ``started`` is when post_auth was
    entered (``started - arrival`` is time spent queued for a worker).
    ``thread_name``: the thread post_auth was called in.
    """

    def __init__(self) -> None:
        self.authret: Any = None
        self.proplist_save: Any = None
        self.returned: Any = None  # the raw return value
        self.raised: BaseException | None = None
        self.traceback: str | None = None
        self.thread_name: str | None = None
        self.on_reactor_thread = False
        self.returned_deferred = False
        self.synchronous = False
        self.arrival: float | None = None
        self.started: float | None = None
        self.completion: float | None = None
        self.authcred: Any = None
        self.attributes: Any = None
        self.authret_in: Any = None
        self.info: Any = None
        self._done = threading.Event()

    @property
    def elapsed(self) -> float | None:
        if self.arrival is None or self.completion is None:
            return None
        return self.completion - self.arrival

    @property
    def queued(self) -> float | None:
        if self.arrival is None or self.started is None:
            return None
        return self.started - self.arrival

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def status(self) -> Any:
        try:
            return self.authret.get("status")
        except AttributeError:
            return None

    @property
    def succeeded(self) -> bool:
        return self.raised is None and self.status == SUCCEED

    @property
    def failed(self) -> bool:
        return self.raised is None and self.status == FAIL

    def wait(self, timeout: float) -> LoginResult:
        if not self._done.wait(timeout):
            raise LoginTimeout(
                f"login of {_username(self.authcred)!r} got no result from post_auth "
                f"within {timeout:.1f}s (started={self.started is not None}, "
                f"thread={self.thread_name}, pool={pool_stats()!r})")
        return self

    def __repr__(self) -> str:
        elapsed = self.elapsed
        shown = None if elapsed is None else f"{elapsed:.3f}"
        return (f"<LoginResult status={self.status!r} raised={self.raised!r} "
                f"elapsed={shown} thread={self.thread_name!r}>")


def _username(authcred: Any) -> Any:
    try:
        return authcred.get("username")
    except AttributeError:
        return None


class _Outcome:
    """What a post_auth call produced, boxed so Twisted never sees a raw
    Deferred or exception coming back from a worker thread."""

    __slots__ = ("error", "tb", "value")

    def __init__(self, value: Any = None, error: BaseException | None = None,
                 tb: str | None = None) -> None:
        self.value = value
        self.error = error
        self.tb = tb


class AccessServer:
    """Calls a loaded script's ``post_auth`` as Access Server would."""

    def __init__(self, script: Script, pool_size: int = POOL_SIZE) -> None:
        self.script = script
        self.pool_size = pool_size
        self.reactor = get_reactor()
        _blocking_call(self.reactor.suggestThreadPoolSize, pool_size)

    # -- building the four dicts ------------------------------------------

    def build_call(self, username: str = "alice", password: str = "pw", vpn: bool = True,
                   auth_method: str = "local", authret: Any = None, attributes: Any = None,
                   info: Any = None, authcred: Any = None,
                   conn_group: str | None = None) -> LoginResult:
        """A LoginResult with the dicts filled in, not yet dispatched."""
        if authcred is None:
            authcred = {
                "username": username,
                "password": password,
                "client_ip_addr": "203.0.113.7",
                "client_hw_addr": "02:00:5e:00:53:01" if vpn else "",
                "static_response": "",
            }
        if attributes is None:
            if vpn:
                attributes = {
                    "vpn_auth": True,
                    "client_info": {"IV_PLAT": "win", "IV_VER": "3.git::d3f8b18b",
                                    "UV_ASCLI_VER": "3.4.4"},
                    "reauth": False,
                }
            else:
                attributes = {
                    "vpn_auth": False,
                    "log_service_name": "WEB_CLIENT",
                    "client_info": {},
                    "reauth": False,
                }
        if authret is None:
            proplist: dict[str, Any] = {}
            if conn_group is not None:
                proplist["conn_group"] = conn_group
            authret = {
                "status": SUCCEED,  # primary authentication already succeeded
                "reason": "",
                "client_reason": "",
                "proplist": proplist,
                "user": username,
            }
        if info is None:
            info = {"auth_method": auth_method}
            if auth_method == "ldap":
                info["user_dn"] = f"uid={username},ou=people,dc=example,dc=org"
                info["ldap_context"] = object()
        call = LoginResult()
        call.authcred, call.attributes, call.authret_in, call.info = (
            authcred, attributes, authret, info)
        return call

    # -- dispatch (reactor thread only) -----------------------------------

    def _invoke(self, call: LoginResult) -> _Outcome:
        call.thread_name = threading.current_thread().name
        call.on_reactor_thread = _on_reactor_thread()
        call.started = time.monotonic()
        try:
            value = self.script.post_auth(call.authcred, call.attributes, call.authret_in,
                                          call.info)
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to see
            return _Outcome(error=exc, tb=traceback.format_exc())
        return _Outcome(value=value)

    def _finish(self, call: LoginResult, outcome: _Outcome) -> None:
        call.completion = time.monotonic()
        if outcome.error is not None:
            call.raised, call.traceback = outcome.error, outcome.tb
        else:
            value = outcome.value
            call.returned = value
            if isinstance(value, tuple):
                call.authret = value[0] if value else None
                call.proplist_save = value[1] if len(value) > 1 else None
            else:
                call.authret = value
        call._done.set()

    def _fail(self, call: LoginResult, failure: Failure) -> None:
        self._finish(call, _Outcome(error=failure.value, tb=failure.getTraceback()))

    def _dispatch(self, call: LoginResult, arrival: float | None = None) -> None:
        assert _on_reactor_thread(), "dispatch must run on the reactor thread"
        call.arrival = time.monotonic() if arrival is None else arrival
        call.synchronous = self.script.synchronous
        try:
            if call.synchronous:
                self._dispatch_sync(call)
            else:
                self._dispatch_threaded(call)
        except BaseException as exc:  # noqa: BLE001 - emulation bug: surface, don't hang
            self._finish(call, _Outcome(error=exc, tb=traceback.format_exc()))

    def _dispatch_sync(self, call: LoginResult) -> None:
        outcome = self._invoke(call)
        if outcome.error is None and isinstance(outcome.value, Deferred):
            call.returned_deferred = True
            outcome.value.addCallbacks(
                lambda value: self._finish(call, _Outcome(value=value)),
                lambda failure: self._fail(call, failure))
            return
        self._finish(call, outcome)

    def _dispatch_threaded(self, call: LoginResult) -> None:
        def done(outcome: _Outcome) -> None:
            if outcome.error is None and isinstance(outcome.value, Deferred):
                call.returned_deferred = True
                outcome = _Outcome(error=EmulationError(
                    "post_auth returned a Deferred from a worker thread "
                    "(SYNCHRONOUS is false); what Access Server does with that is unknown"))
            self._finish(call, outcome)

        d = _twisted_threads.deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), self._invoke, call)
        d.addCallbacks(done, lambda failure: self._fail(call, failure))

    # -- public -----------------------------------------------------------

    def start_login(self, **kwargs: Any) -> LoginResult:
        """Dispatch one login without waiting; ``.wait(timeout)`` on the result."""
        call = self.build_call(**kwargs)
        self._check_caller()
        self.reactor.callFromThread(self._dispatch, call)
        return call

    def login(self, username: str = "alice", password: str = "pw", vpn: bool = True,
              auth_method: str = "local", authret: Any = None, attributes: Any = None,
              info: Any = None, authcred: Any = None, conn_group: str | None = None,
              timeout: float = DEFAULT_TIMEOUT) -> LoginResult:
        """Run one login and block until post_auth's result, or raise LoginTimeout."""
        call = self.start_login(
            username=username, password=password, vpn=vpn, auth_method=auth_method,
            authret=authret, attributes=attributes, info=info, authcred=authcred,
            conn_group=conn_group)
        return call.wait(timeout)

    def login_many(self, specs: Sequence[Mapping[str, Any] | None],
                   timeout: float = DEFAULT_TIMEOUT, **common: Any) -> list[LoginResult]:
        """Start many logins at once and wait for them all.

        Each spec is a dict of ``login`` keyword arguments (None for the
        defaults), merged over ``common``. All logins arrive together: one
        reactor event records a shared arrival time and dispatches them in
        order. A blocking SYNCHRONOUS script therefore serves them one after
        another, as a blocked reactor would. ``timeout`` bounds the whole batch.
        """
        calls = []
        for spec in specs:
            kwargs = dict(common)
            kwargs.update(spec or {})
            calls.append(self.build_call(**kwargs))
        self._check_caller()

        def arrive() -> None:
            arrival = time.monotonic()
            for call in calls:
                self._dispatch(call, arrival)

        self.reactor.callFromThread(arrive)
        deadline = time.monotonic() + timeout
        for call in calls:
            call.wait(max(0.0, deadline - time.monotonic()))
        return calls

    def _check_caller(self) -> None:
        if _on_reactor_thread():
            raise EmulationError("login() would deadlock when called on the reactor thread")


# --------------------------------------------------------------------------
# Observability
# --------------------------------------------------------------------------

class PoolMonitor:
    """Samples the reactor pool from a background thread and keeps the peaks.

    Sampling (default every 1 ms) can miss very short bursts; it is meant for
    work that lasts tens of milliseconds or more.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak_busy = 0
        self.peak_backlog = 0
        self.peak_threads = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        stats = pool_stats()
        self.samples += 1
        self.peak_busy = max(self.peak_busy, stats["busy"])
        self.peak_backlog = max(self.peak_backlog, stats["backlog"])
        self.peak_threads = max(self.peak_threads, stats["busy"] + stats["idle"])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> PoolMonitor:
        get_reactor()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="asemu-pool-monitor",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> PoolMonitor:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()
        return self

    def __enter__(self):  # -> PoolMonitor
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ReactorHeartbeat:
    """A LoopingCall on the reactor that records the worst lateness.

    ``worst_stall`` is the largest gap between consecutive ticks beyond
    ``interval`` (seconds), including the gap up to ``stop()``: how long the
    reactor thread was unable to run anything else.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.worst_stall = 0.0
        self.ticks = 0
        self._last: float | None = None
        self._loop: LoopingCall | None = None

    def _tick(self) -> None:
        now = time.monotonic()
        if self._last is not None:
            self.worst_stall = max(self.worst_stall, now - self._last - self.interval)
        self._last = now
        self.ticks += 1

    def _start(self) -> None:
        self._loop = LoopingCall(self._tick)
        self._loop.start(self.interval, now=True)

    def _stop(self) -> None:
        self._tick()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def start(self) -> ReactorHeartbeat:
        self.worst_stall, self.ticks, self._last = 0.0, 0, None
        _blocking_call(self._start)
        return self

    def stop(self) -> ReactorHeartbeat:
        _blocking_call(self._stop)
        return self

    def __enter__(self):  # -> ReactorHeartbeat
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
