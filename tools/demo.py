"""A full simulated login for a few scripted users: the real main.py, loaded and called the way
Access Server does it (tests/asemu.py), talking real HTTP to the fake iVALT API (tests/fake_ivalt.py).

    tools/dev demo            # worker-thread mode (the default WAIT_MODE)
    tools/dev demo --deferred # Deferred mode
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from asemu import SUCCEED, AccessServer, load_script  # noqa: E402
from conftest import write_config  # noqa: E402 - the tests' config writer, 0600 like an admin's
from fake_ivalt import FakeIvalt  # noqa: E402

KEY = "demo-secret-key-0001"
USERS = [  # username, e-mail in iVALT, mobile, what the user does (fake_ivalt behaviour), seconds after the push
    ("alice", "alice@example.com", "+15550100001", "approve", 2.0),
    ("bob", "bob@example.com", "+15550100002", "timezone", 1.5),
    ("carol", "carol@example.com", "+15550100003", "geofence", 1.5),
    ("dave", "dave@example.com", "+15550100004", "deny401", 2.5),
    ("erin", "erin@example.com", "+15550100005", "never", 0.0),
    ("mallory", None, None, None, None),  # not enrolled in iVALT
]
DOES = {"approve": "approves", "timezone": "approves outside her time window", "geofence": "approves outside "
        "her geofence", "deny401": "denies", "never": "never answers", None: "is not enrolled"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deferred", action="store_true", help="WAIT_MODE deferred instead of thread")
    parser.add_argument("--deadline", type=float, default=8.0, help="DEADLINE_SECONDS (default 8, production 60)")
    args = parser.parse_args()
    with FakeIvalt(api_key=KEY) as fake, tempfile.TemporaryDirectory() as folder:
        for _, email, mobile, behaviour, after in USERS:
            if email:
                fake.add_user(email, mobile, behaviour=behaviour, after=after)
        config = write_config(os.path.join(folder, "ivalt_config.py"), IVALT_SECRET_KEY=KEY, IVALT_API_URL=fake.url,
                              EMAIL_DOMAIN="example.com", DEADLINE_SECONDS=args.deadline,
                              WAIT_MODE="deferred" if args.deferred else "thread")
        script = load_script(os.path.join(ROOT, "main.py"), env={"IVALT_CONFIG": config})
        server = AccessServer(script)
        print("fake iVALT API at %s; %d logins arrive at once (WAIT_MODE %s, deadline %gs)\n"
              % (fake.url, len(USERS), "deferred" if args.deferred else "thread", args.deadline))
        print("--- what main.py logs (Access Server writes it to /var/log/openvpnas.log) ---")
        started = time.monotonic()
        results = server.login_many([{"username": name} for name, *_ in USERS], timeout=args.deadline + 30)
        print("\n--- outcomes (%.1fs in all) ---" % (time.monotonic() - started))
        print("%-8s %-34s %-7s %6s %6s  %s" % ("user", "on the phone", "status", "time", "pushes",
                                               "client_reason (what the user sees)"))
        for (name, _, mobile, behaviour, _), result in zip(USERS, results):
            status = "SUCCEED" if result.authret.get("status") == SUCCEED else "FAIL"
            print("%-8s %-34s %-7s %5.1fs %6d  %s" % (name, DOES[behaviour], status, result.elapsed,
                                                     fake.pushes_delivered.get(mobile, 0),
                                                     result.authret.get("client_reason") or "-"))
        script.ns["shutdown"]()
        return 0 if results[0].authret.get("status") == SUCCEED else 1


if __name__ == "__main__":
    sys.exit(main())
