"""Soak: 2,000 logins with mixed outcomes through the emulation; threads, open file descriptors
and sockets must not grow between the first and the last hundred. Deselect with -m 'not soak'."""

import os
import threading

import pytest

from asemu import FAIL, SUCCEED, AccessServer, wait_pool_idle
from conftest import settings_for
from fake_ivalt import Fault

pytestmark = pytest.mark.soak

MIX = [  # kind of user, expected status ("soak-503" meets one 503 per batch, which clears)
    ("approve", SUCCEED), ("tz", FAIL), ("geo", FAIL), ("deny", FAIL), ("nobody", FAIL),
    ("approve", SUCCEED), ("503", SUCCEED), ("", FAIL),
]
BATCH = 40  # logins at once; login i of a batch is user number i, so no two wait for one user


def resources():
    fds = os.listdir("/proc/self/fd")
    sockets = 0
    for fd in fds:
        try:
            sockets += os.readlink("/proc/self/fd/" + fd).startswith("socket:")
        except OSError:
            pass
    return {"threads": threading.active_count(), "fds": len(fds), "sockets": sockets}


def test_two_thousand_logins_leak_nothing(fake, load_main, mode):
    kinds = (("approve", "approve"), ("tz", "timezone"), ("geo", "geofence"), ("deny", "deny401"), ("503", "approve"))
    for slot in range(BATCH):
        for number, (name, behaviour) in enumerate(kinds):
            fake.add_user("soak%d-%s@example.com" % (slot, name), "+1555%03d%04d" % (number, slot), behaviour=behaviour, after=0.3)
    server = AccessServer(load_main(**settings_for(fake.url, mode, DEADLINE_SECONDS=1, LOG_LEVEL="info")))
    samples = []
    done = 0
    while done < 2000:
        specs = [{"username": "soak%d-%s" % (i, MIX[(done + i) % len(MIX)][0]) if MIX[(done + i) % len(MIX)][0] else ""}
                 for i in range(BATCH)]
        fake.inject("poll", Fault.response(503, "<html>busy</html>", "text/html"), times=1)
        results = server.login_many(specs, timeout=60)
        for i, result in enumerate(results):
            assert result.raised is None
            expected = MIX[(done + i) % len(MIX)][1]
            if expected is not None:
                assert result.authret["status"] == expected, specs[i]
        done += BATCH
        if done in (120, 2000):
            wait_pool_idle(10)
            samples.append(resources())
        fake.log.clear()
    first, last = samples
    print("resources after 120 logins: %s; after 2000: %s" % (first, last))
    assert last["threads"] <= first["threads"] + 2, samples
    assert last["fds"] <= first["fds"] + 5, samples
    assert last["sockets"] <= first["sockets"] + 5, samples
