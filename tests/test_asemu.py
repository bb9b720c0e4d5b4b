"""Tests of the Access Server emulation itself, with tiny throwaway scripts."""

import os
import sys
import textwrap
import threading
import time
import traceback

import asemu
import pytest

SLEEP = 0.4


def script(text, **kwargs):
    return asemu.load_script(textwrap.dedent(text), **kwargs)


@pytest.fixture(autouse=True)
def idle_pool():
    asemu.wait_pool_idle()
    yield
    asemu.wait_pool_idle()


ECHO = """
    import threading
    SYNCHRONOUS = {sync}
    SEEN = []
    def post_auth(authcred, attributes, authret, info):
        SEEN.append((authcred, attributes, authret, info))
        return authret
"""


# -- loading -----------------------------------------------------------------

def test_no_file_and_name_is_not_main():
    s = script("""
        import sys
        try:
            __file__
        except NameError:
            HAS_FILE = False
        else:
            HAS_FILE = True
        NAME = __name__
        IN_SYS_MODULES = __name__ in sys.modules
    """)
    assert s.ns["HAS_FILE"] is False
    assert "__file__" not in s.ns
    assert s.ns["NAME"] != "__main__"
    assert s.ns["NAME"] == asemu.SCRIPT_MODULE_NAME
    assert s.ns["IN_SYS_MODULES"] is False


def test_load_error_propagates_with_string_filename():
    with pytest.raises(ZeroDivisionError) as info:
        script("""
            X = 1
            Y = X / 0
        """)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].filename == "<string>"
    assert frames[-1].lineno == 3


def test_syntax_error_reports_string_filename():
    with pytest.raises(SyntaxError) as info:
        script("def broken(:\n")
    assert info.value.filename == "<string>"


def test_future_flags_are_not_inherited():
    # With `from __future__ import annotations` leaking in, this would load.
    if sys.version_info >= (3, 14):
        pytest.skip("annotations are lazy from 3.14")
    with pytest.raises(NameError):
        script("def f(x: no_such_name_anywhere): pass\n")


def test_load_from_path_reads_text(tmp_path):
    path = tmp_path / "post_auth.py"
    path.write_text("VALUE = 42\n", encoding="utf-8")
    s = asemu.load_script(path)
    assert s.ns["VALUE"] == 42
    assert s.path == str(path)
    assert "__file__" not in s.ns
    assert asemu.load_script(str(path)).ns["VALUE"] == 42
    with pytest.raises(FileNotFoundError):
        asemu.load_script(str(tmp_path / "missing.py"))


def test_pyovpn_constants_are_distinctive():
    s = script("""
        from pyovpn.plugin import SUCCEED, FAIL
    """)
    assert s.ns["SUCCEED"] == asemu.SUCCEED
    assert s.ns["FAIL"] == asemu.FAIL
    assert asemu.SUCCEED != asemu.FAIL
    for guess in (0, 1, 2, -1, True, False, None, "SUCCEED", "FAIL"):
        assert guess not in (asemu.SUCCEED, asemu.FAIL)


FALLBACK = """
    try:
        from pyovpn.plugin import SUCCEED, FAIL
        HAVE_PYOVPN = True
    except ImportError:
        SUCCEED, FAIL = "local-succeed", "local-fail"
        HAVE_PYOVPN = False
"""


def test_fallback_when_pyovpn_absent():
    with asemu.without_pyovpn():
        s = script(FALLBACK)
        with pytest.raises(ImportError):
            __import__("pyovpn.plugin")
    assert s.ns["HAVE_PYOVPN"] is False
    assert s.ns["SUCCEED"] == "local-succeed"
    assert not s.had_pyovpn
    again = script(FALLBACK)
    assert again.ns["HAVE_PYOVPN"] is True
    assert again.ns["SUCCEED"] == asemu.SUCCEED


def test_nested_without_pyovpn():
    with asemu.without_pyovpn():
        with asemu.without_pyovpn():
            pass
        assert script(FALLBACK).ns["HAVE_PYOVPN"] is False
    assert script(FALLBACK).ns["HAVE_PYOVPN"] is True


def test_env_applied_at_load_only(monkeypatch):
    monkeypatch.delenv("ASEMU_T_SET", raising=False)
    monkeypatch.setenv("ASEMU_T_GONE", "present-before")
    s = script("""
        import os
        AT_LOAD = os.environ.get("ASEMU_T_SET")
        GONE_AT_LOAD = os.environ.get("ASEMU_T_GONE")
        def post_auth(authcred, attributes, authret, info):
            authret["reason"] = repr((os.environ.get("ASEMU_T_SET"), AT_LOAD))
            return authret
    """, env={"ASEMU_T_SET": "at-load", "ASEMU_T_GONE": None})
    assert s.ns["AT_LOAD"] == "at-load"
    assert s.ns["GONE_AT_LOAD"] is None
    assert "ASEMU_T_SET" not in os.environ
    assert os.environ["ASEMU_T_GONE"] == "present-before"
    result = asemu.AccessServer(s).login()
    assert result.raised is None
    assert result.authret["reason"] == repr((None, "at-load"))


# -- the call ----------------------------------------------------------------

def test_default_dicts():
    s = script(ECHO.format(sync=False))
    server = asemu.AccessServer(s)
    vpn = server.login(username="bob", conn_group="ops")
    web = server.login(vpn=False, auth_method="ldap")
    assert vpn.raised is None and web.raised is None
    authcred, attributes, authret, info = s.ns["SEEN"][0]
    assert authcred["username"] == "bob"
    assert set(authcred) >= {"username", "password", "client_ip_addr", "client_hw_addr",
                             "static_response"}
    assert attributes["vpn_auth"] is True and attributes["reauth"] is False
    assert "IV_PLAT" in attributes["client_info"]
    assert authret["status"] == asemu.SUCCEED
    assert authret["proplist"] == {"conn_group": "ops"}
    assert authret["user"] == "bob"
    assert info == {"auth_method": "local"}
    assert vpn.succeeded
    _, attributes, _, info = s.ns["SEEN"][1]
    assert attributes["vpn_auth"] is False
    assert attributes["log_service_name"] == "WEB_CLIENT"
    assert info["auth_method"] == "ldap" and "user_dn" in info


def test_explicit_dicts_override():
    s = script(ECHO.format(sync=False))
    weird_authcred = {"username": None}
    result = asemu.AccessServer(s).login(authcred=weird_authcred, attributes={}, info={},
                                         authret={"status": asemu.FAIL})
    assert result.raised is None
    seen = s.ns["SEEN"][0]
    assert seen[0] is weird_authcred
    assert seen[1:] == ({}, {"status": asemu.FAIL}, {})
    assert result.failed


def test_tuple_return_takes_first_element():
    s = script("""
        def post_auth(authcred, attributes, authret, info):
            return authret, {"prop_x": "1"}
    """)
    result = asemu.AccessServer(s).login()
    assert result.raised is None
    assert result.authret["status"] == asemu.SUCCEED
    assert result.proplist_save == {"prop_x": "1"}


def test_raising_post_auth_is_reported():
    s = script("""
        def post_auth(authcred, attributes, authret, info):
            raise ValueError("boom")
    """)
    result = asemu.AccessServer(s).login()
    assert isinstance(result.raised, ValueError)
    assert result.authret is None
    assert 'File "<string>", line 3, in post_auth' in result.traceback
    assert not result.succeeded and not result.failed


def test_raising_synchronous_post_auth_is_reported():
    s = script("""
        SYNCHRONOUS = True
        def post_auth(authcred, attributes, authret, info):
            raise KeyError("sync boom")
    """)
    result = asemu.AccessServer(s).login()
    assert isinstance(result.raised, KeyError)
    assert result.on_reactor_thread


def test_timeout_raises_clear_error():
    s = script("""
        import time
        def post_auth(authcred, attributes, authret, info):
            time.sleep(0.5)
            return authret
    """)
    with pytest.raises(asemu.LoginTimeout, match="'alice'.*within 0.1s"):
        asemu.AccessServer(s).login(timeout=0.1)


# -- threads -----------------------------------------------------------------

THREAD = """
    import threading
    {sync_line}
    def post_auth(authcred, attributes, authret, info):
        authret["reason"] = threading.current_thread().name
        return authret
"""


@pytest.mark.parametrize("sync_line", ["SYNCHRONOUS = False", "", "SYNCHRONOUS = 0"])
def test_not_synchronous_runs_in_pool_thread(sync_line):
    s = script(THREAD.format(sync_line=sync_line))
    assert not s.synchronous
    result = asemu.AccessServer(s).login()
    assert result.raised is None
    assert result.thread_name == result.authret["reason"]
    assert result.thread_name != asemu.REACTOR_THREAD_NAME
    assert result.thread_name.startswith("PoolThread-twisted.internet.reactor")
    assert not result.on_reactor_thread


def test_synchronous_runs_on_reactor_thread():
    s = script(THREAD.format(sync_line="SYNCHRONOUS = True"))
    assert s.synchronous
    result = asemu.AccessServer(s).login()
    assert result.raised is None
    assert result.thread_name == asemu.REACTOR_THREAD_NAME == result.authret["reason"]
    assert result.on_reactor_thread and not result.returned_deferred


def test_synchronous_read_at_call_time():
    s = script(THREAD.format(sync_line="SYNCHRONOUS = False"))
    server = asemu.AccessServer(s)
    assert not server.login().on_reactor_thread
    s.ns["SYNCHRONOUS"] = True
    assert server.login().on_reactor_thread


def test_synchronous_deferred_is_awaited():
    s = script("""
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred
        from pyovpn.plugin import FAIL
        SYNCHRONOUS = True
        def post_auth(authcred, attributes, authret, info):
            d = Deferred()
            authret["status"] = FAIL
            reactor.callLater(0.2, d.callback, authret)
            return d
    """)
    result = asemu.AccessServer(s).login()
    assert result.raised is None
    assert result.returned_deferred
    assert result.thread_name == asemu.REACTOR_THREAD_NAME
    assert result.failed
    assert 0.18 <= result.elapsed < 2


def test_synchronous_deferred_errback_is_reported():
    s = script("""
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred
        SYNCHRONOUS = True
        def post_auth(authcred, attributes, authret, info):
            d = Deferred()
            reactor.callLater(0.01, d.errback, RuntimeError("late failure"))
            return d
    """)
    result = asemu.AccessServer(s).login()
    assert isinstance(result.raised, RuntimeError)
    assert result.returned_deferred and result.authret is None


def test_deferred_from_worker_thread_is_flagged():
    s = script("""
        from twisted.internet.defer import succeed
        def post_auth(authcred, attributes, authret, info):
            return succeed(authret)
    """)
    result = asemu.AccessServer(s).login()
    assert isinstance(result.raised, asemu.EmulationError)
    assert result.returned_deferred


SLEEPER = """
    import time
    SYNCHRONOUS = {sync}
    def post_auth(authcred, attributes, authret, info):
        time.sleep({sleep})
        return authret
"""


def test_blocking_synchronous_script_stalls_reactor():
    server = asemu.AccessServer(script(SLEEPER.format(sync=True, sleep=0.3)))
    with asemu.ReactorHeartbeat(0.01) as beat:
        time.sleep(0.05)
        result = server.login()
        time.sleep(0.05)
    assert result.raised is None and result.on_reactor_thread
    assert beat.worst_stall >= 0.25
    assert beat.ticks >= 5


def test_blocking_worker_script_does_not_stall_reactor():
    server = asemu.AccessServer(script(SLEEPER.format(sync=False, sleep=0.3)))
    with asemu.ReactorHeartbeat(0.01) as beat:
        time.sleep(0.05)
        result = server.login()
        time.sleep(0.05)
    assert result.raised is None and not result.on_reactor_thread
    assert result.elapsed >= 0.3
    assert beat.worst_stall < 0.1
    assert beat.ticks >= 25


def test_pool_is_bounded_at_ten_and_queues():
    assert asemu.POOL_SIZE == 10
    server = asemu.AccessServer(script(SLEEPER.format(sync=False, sleep=SLEEP)))
    assert asemu.pool_stats()["max"] == 10
    with asemu.PoolMonitor() as monitor:
        results = server.login_many([{"username": f"u{i}"} for i in range(12)])
    assert all(r.raised is None and r.succeeded for r in results)
    assert monitor.peak_busy == 10
    assert monitor.peak_backlog == 2
    assert monitor.peak_threads == 10
    assert len({r.arrival for r in results}) == 1  # simultaneous arrivals
    elapsed = sorted(r.elapsed for r in results)
    assert all(SLEEP <= e < 1.5 * SLEEP for e in elapsed[:10]), elapsed
    assert all(2 * SLEEP <= e < 3 * SLEEP for e in elapsed[10:]), elapsed
    queued = sorted(r.queued for r in results)
    assert queued[9] < 0.1 and queued[10] >= SLEEP * 0.9
    assert len({r.thread_name for r in results}) == 10


def test_pool_stats_reads_the_pool_without_making_garbage():
    """PoolMonitor reads a thousand times a second during a benchmark: each read must not leave
    cyclic garbage (Twisted's legacy ``pool.q`` defines a class per read) that sets off the full
    garbage collections the benchmark's reactor-stall figure would then include."""
    import gc

    pool = asemu.get_reactor().getThreadPool()
    assert asemu.pool_stats() == {"busy": len(pool.working), "idle": len(pool.waiters),
                                  "backlog": pool.q.qsize(), "max": pool.max}
    gc.collect()
    gc.disable()
    try:
        for _ in range(200):
            asemu.pool_stats()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        made = [obj for obj in gc.garbage if isinstance(obj, type)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert made == []


def test_pool_size_can_be_changed_and_restored():
    server = asemu.AccessServer(script(SLEEPER.format(sync=False, sleep=0.2)), pool_size=2)
    try:
        with asemu.PoolMonitor() as monitor:
            results = server.login_many([None] * 3)
        assert monitor.peak_busy == 2
        assert max(r.elapsed for r in results) >= 0.4
    finally:
        asemu.AccessServer(server.script)
    assert asemu.pool_stats()["max"] == asemu.POOL_SIZE


def test_synchronous_login_many_serialises_on_reactor():
    server = asemu.AccessServer(script(SLEEPER.format(sync=True, sleep=0.1)))
    results = server.login_many([None] * 3)
    elapsed = sorted(r.elapsed for r in results)
    for k, e in enumerate(elapsed, start=1):
        assert 0.1 * k <= e < 0.1 * k + 0.08, elapsed
    assert all(r.on_reactor_thread for r in results)


def test_pool_threads_are_daemon():
    asemu.AccessServer(script(ECHO.format(sync=False))).login()
    pool = asemu.get_reactor().getThreadPool()
    alive = [t for t in pool.threads if t.is_alive()]
    assert alive and all(t.daemon for t in alive)
    assert asemu.get_reactor().running
    assert [t.name for t in threading.enumerate()].count(asemu.REACTOR_THREAD_NAME) == 1
