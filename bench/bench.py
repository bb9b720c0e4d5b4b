"""Benchmark: the real main.py inside the Access Server emulation, against the fake iVALT API.

Three configurations, side by side, in one run (one process: the emulation's Twisted reactor is
process-global, so they run one after another):

  reference-like   POLL_INTERVAL_SECONDS=5, WAIT_MODE "thread"  (what other integrations do)
  thread (ours)    POLL_INTERVAL_SECONDS=1, WAIT_MODE "thread"  (the defaults)
  deferred (ours)  POLL_INTERVAL_SECONDS=1, WAIT_MODE "deferred"

Scenarios, each with a fresh FakeIvalt and a freshly loaded main.py. The fake serves from a child
process (RemoteFake), as the real API serves from far away: inside Access Server the API's parsing,
logging and threads take none of the server's GIL, heap or garbage collections, and an in-process
fake charged all of that to the reactor being measured (--fake-in-process brings it back):

  1+2  latency    N logins (30) at once, distinct users approving uniformly 2-8 s after their push
                  (same seeded delays for every configuration), budget 10000 req/s:
                  approval-to-grant = LoginResult.completion - fake.answer_due_at(mobile);
                  API requests per login from fake.counts.
  3    burst      200 logins arriving at once (login_many), each approving 5 s after its push,
                  Access Server's 10-thread pool, budget 10000 req/s: granted within 60 s of
                  arrival, p50/p95 arrival-to-result, peak busy pool threads, peak API calls in
                  flight (each holds one of main.py's HTTP threads), worst reactor stall.
  4    budget     the same 200 logins with REQUEST_BUDGET_PER_SECOND=20: busiest 1-second window
                  seen by the fake, and how many were still granted within 60 s.

Scenarios 3 and 4 stop measuring after --cap seconds (75). Logins still queued then (thread mode)
are drained quickly by making every fake user's answer visible at once, so the next
configuration starts on an idle pool; they count as "not granted within 60 s" either way.

Usage:  .venv/bin/python bench/bench.py [--quick] [--json PATH]
Writes bench/out/time_to_result.png (CDF of scenario 3); a full run (the default sizes) also copies
it to docs/time_to_result.png, the README's plot.
Not part of CI: the full run takes about 7 minutes.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from asemu import (  # noqa: E402 - after the sys.path change
    AccessServer,
    LoginTimeout,
    PoolMonitor,
    ReactorHeartbeat,
    load_script,
    wait_pool_idle,
)
from conftest import write_config  # noqa: E402 - the tests' config writer, 0600 like an admin's
from fake_ivalt import FakeIvalt, RemoteFake  # noqa: E402

MAIN = os.path.join(ROOT, "main.py")
OUT = os.path.join(HERE, "out")
DOCS_PNG = os.path.join(ROOT, "docs", "time_to_result.png")
API_KEY = "bench-key-7Hq2Lx"
DOMAIN = "example.com"
HIGH_BUDGET = 10000
LOW_BUDGET = 20
BURST = 5  # RequestGate's burst allowance
HAND_WINDOW = 60.0  # OpenVPN's default TLS hand-window: a later grant is no grant
SEED = 20240601
FAKE_IN_CHILD = [True]  # serve the fake API from a child process (--fake-in-process: from this one)

CONFIGS = [
    ("reference-like", {"POLL_INTERVAL_SECONDS": 5.0, "WAIT_MODE": "thread"}),
    ("thread (ours)", {"POLL_INTERVAL_SECONDS": 1.0, "WAIT_MODE": "thread"}),
    ("deferred (ours)", {"POLL_INTERVAL_SECONDS": 1.0, "WAIT_MODE": "deferred"}),
]


def progress(message):
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), message))
    sys.stderr.flush()


# -------------------------------------------------------------------------------------------------
# statistics
# -------------------------------------------------------------------------------------------------


def percentile(values, q):
    """Linear interpolation between closest ranks (numpy's default); inf stays inf (censored)."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    low, high = int(math.floor(pos)), int(math.ceil(pos))
    if math.isinf(data[high]):
        return math.inf
    return data[low] + (data[high] - data[low]) * (pos - low)


def fmt_s(value, cap=None):
    if value is None:
        return "-"
    if math.isinf(value):
        return ">%.0f s" % cap if cap else "n/a"
    return "%.2f s" % value


# -------------------------------------------------------------------------------------------------
# one configuration, one scenario
# -------------------------------------------------------------------------------------------------


def user(i):
    return "user%03d" % i, "user%03d@%s" % (i, DOMAIN), "+1555%07d" % (1000000 + i)


class FullCollections:
    """CPython's full (generation 2) garbage collections while active: count and longest pause.
    They stop every thread, the reactor's too, for as long as they walk the whole heap."""

    def __init__(self):
        self.pauses = []
        self._started = None

    def _callback(self, phase, info):
        if phase == "start":
            self._started = time.perf_counter()
        elif info.get("generation") == 2 and self._started is not None:
            self.pauses.append((time.perf_counter() - self._started) * 1000.0)

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info):
        gc.callbacks.remove(self._callback)


class InFlight:
    """Counts the API calls under way (each holds one of main.py's own HTTP threads), keeping the
    peak: wraps the loaded script's ApiClient.perform, which both wait modes call in those threads."""

    def __init__(self, api):
        self.now = self.peak = 0
        self._lock = threading.Lock()
        perform = api.perform

        def counted(*args, **kwargs):
            with self._lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                return perform(*args, **kwargs)
            finally:
                with self._lock:
                    self.now -= 1

        api.perform = counted


class Run:
    """A fresh fake iVALT server and a freshly loaded main.py, for one scenario."""

    def __init__(self, workdir, label, overrides, budget, approvals, log):
        self.label = label
        self.approvals = approvals  # seconds from push to answer, one per user
        self.log = log
        self.fake = RemoteFake(api_key=API_KEY) if FAKE_IN_CHILD[0] else FakeIvalt(api_key=API_KEY).start()
        try:
            self._prepare(workdir, overrides, budget, approvals, log)
        except BaseException:
            self.fake.stop()
            raise

    def _prepare(self, workdir, overrides, budget, approvals, log):
        for i, after in enumerate(approvals):
            _, email, mobile = user(i)
            self.fake.add_user(email, mobile, behaviour="approve", after=after)
        settings = dict(
            IVALT_SECRET_KEY=API_KEY,
            IVALT_API_URL=self.fake.url,
            EMAIL_DOMAIN=DOMAIN,
            DEADLINE_SECONDS=60,
            REQUEST_BUDGET_PER_SECOND=budget,
        )
        settings.update(overrides)
        config = write_config(os.path.join(workdir, "ivalt_config_%d.py" % int(time.monotonic() * 1e6)), **settings)
        env = {"IVALT_CONFIG": config, "IVALT_SECRET_KEY": None, "IVALT_API_URL": None}
        with contextlib.redirect_stdout(log):
            self.script = load_script(MAIN, env=env)
        problems = self.script.ns["_SETTINGS"].errors
        if problems:
            raise SystemExit("main.py refused the benchmark settings: %s" % problems)
        self.server = AccessServer(self.script)
        self.in_flight = InFlight(self.script.ns["_API"])

    def login_all(self, cap):
        """All logins arrive together; wait at most `cap` s. Returns the LoginResults (some may be
        unfinished when the cap ends the wait)."""
        calls = []
        build = self.server.build_call

        def recording_build(**kwargs):
            call = build(**kwargs)
            calls.append(call)
            return call

        self.server.build_call = recording_build  # login_many builds the calls; keep them
        specs = [{"username": user(i)[0]} for i in range(len(self.approvals))]
        try:
            with contextlib.redirect_stdout(self.log):
                self.server.login_many(specs, timeout=cap)
        except LoginTimeout:
            pass
        finally:
            self.server.build_call = build
        return calls

    def drain(self, calls, timeout=120.0):
        """Let unfinished logins end fast, so the next configuration starts on an idle pool: users
        whose push has not reached the fake yet now deny at once (a denial is final; an instant
        approval would be refused, as main.py takes one only after seeing "pending"). Users already
        pushed keep their approval and end within a poll interval. The fake's state is changed
        under its own lock, the one a push takes, so no push slips in between."""
        unfinished = [c for c in calls if not c.done]
        if unfinished:
            self.fake.deny_unpushed()
            with contextlib.redirect_stdout(self.log):
                deadline = time.monotonic() + timeout
                for call in unfinished:
                    try:
                        call.wait(max(0.0, deadline - time.monotonic()))
                    except LoginTimeout:
                        progress("%s: a login did not end %.0f s after the drain" % (self.label, timeout))
        return len(unfinished)

    def close(self):
        with contextlib.redirect_stdout(self.log):
            self.script.ns["shutdown"]()
            try:
                wait_pool_idle(70)
            except LoginTimeout as exc:
                progress("%s: %s; the next configuration may be skewed" % (self.label, exc))
        self.fake.stop()


def scenario_latency(workdir, label, overrides, approvals, log):
    run = Run(workdir, label, overrides, HIGH_BUDGET, approvals, log)
    try:
        started = time.monotonic()
        calls = run.login_all(cap=300)
        wall = time.monotonic() - started
        latencies, failed = [], 0
        for i, call in enumerate(calls):
            due = run.fake.answer_due_at(user(i)[2])
            if call.succeeded and due is not None:
                latencies.append(call.completion - due)
            else:
                failed += 1
        counts = dict(run.fake.counts)
        n = len(calls)
        return {
            "logins": n,
            "failed": failed,
            "wall_s": wall,
            "latency_median_s": percentile(latencies, 50),
            "latency_p95_s": percentile(latencies, 95),
            "latency_max_s": max(latencies) if latencies else None,
            "requests_per_login": sum(counts.values()) / n,
            "polls_per_login": counts.get("poll", 0) / n,
            "counts": counts,
        }
    finally:
        run.close()


def scenario_burst(workdir, label, overrides, n, budget, cap, log):
    run = Run(workdir, label, overrides, budget, [5.0] * n, log)
    try:
        with PoolMonitor() as monitor, ReactorHeartbeat(0.01) as beat, FullCollections() as collections:
            started = time.monotonic()
            calls = run.login_all(cap=cap)
            measured = time.monotonic() - started
        finished_in_cap = sum(1 for c in calls if c.done)
        times = [c.elapsed if c.done and c.succeeded else math.inf for c in calls]
        granted_60 = sum(1 for t in times if t <= HAND_WINDOW)
        denials = {}  # why logins that ended before the cap were refused (the drain's denials excluded)
        for c in calls:
            if c.done and c.raised is None and not c.succeeded:
                why = str((c.authret or {}).get("reason", "?")).split(" (id=")[0].split(":")[0]
                denials[why] = denials.get(why, 0) + 1
            elif c.done and c.raised is not None:
                denials["raised " + type(c.raised).__name__] = denials.get("raised " + type(c.raised).__name__, 0) + 1
        outcomes = {}  # at the cap
        for c in calls:
            if not c.done:
                key = "unfinished"
            elif c.raised is not None:
                key = "raised"
            elif c.succeeded:
                key = "granted" if c.elapsed <= HAND_WINDOW else "granted_after_60s"
            else:
                key = "denied"
            outcomes[key] = outcomes.get(key, 0) + 1
        max_rate, requests = run.fake.max_rate(1.0), sum(run.fake.counts.values())  # before the drain
        drained = run.drain(calls)
        queued = [c.queued for c in calls if c.queued is not None]
        return {
            "logins": n,
            "budget": budget,
            "cap_s": cap,
            "measured_s": measured,
            "granted_within_60s": granted_60,
            "finished_within_cap": finished_in_cap,
            "drained_after_cap": drained,
            "outcomes": outcomes,
            "denials": denials,
            "p50_s": percentile(times, 50),
            "p95_s": percentile(times, 95),
            "max_queued_s": max(queued) if queued else None,
            "peak_busy_threads": monitor.peak_busy,
            "peak_http_threads": run.in_flight.peak,
            "peak_backlog": monitor.peak_backlog,
            "worst_stall_ms": beat.worst_stall * 1000.0,
            "full_gc_ms": collections.pauses,
            "max_rate_1s": max_rate,
            "requests": requests,
            "times": [t if not math.isinf(t) else None for t in times],
        }
    finally:
        run.close()


# -------------------------------------------------------------------------------------------------
# output
# -------------------------------------------------------------------------------------------------


def plot(results, path, cap):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    # reference-like and thread (ours) can coincide (both wait for one of the 10 pool threads):
    # the first is drawn wide and pale underneath so that both stay visible.
    for (label, _), color, width, alpha in zip(CONFIGS, ("tab:red", "tab:orange", "tab:blue"), (6, 2, 2),
                                               (0.35, 1, 1)):
        data = results[label]["burst"]
        times = sorted(t for t in data["times"] if t is not None)
        n = data["logins"]
        xs = [0.0] + [t for t in times for _ in (0, 1)] + [cap]
        ys = [0.0]
        for k in range(1, len(times) + 1):
            ys += [(k - 1) / n, k / n]
        ys += [len(times) / n]
        ax.plot(xs, ys, color=color, lw=width, alpha=alpha,
                label="%s (%d/%d within 60 s)" % (label, data["granted_within_60s"], n))
    ax.axvline(HAND_WINDOW, color="grey", ls="--", lw=1)
    ax.text(HAND_WINDOW + 0.5, 0.03, "60 s client hand-window", color="grey", fontsize=8, rotation=90, va="bottom")
    ax.axvline(7.0, color="green", ls=":", lw=1)
    ax.text(7.5, 0.03, "target p95 7 s", color="green", fontsize=8, rotation=90, va="bottom")
    n = results[CONFIGS[0][0]]["burst"]["logins"]
    ax.set_title("%d logins arriving at once, each approved 5 s after its push\n"
                 "(Access Server pool of 10 threads, budget %d req/s)" % (n, HIGH_BUDGET), fontsize=10)
    ax.set_xlabel("time from arrival to SUCCEED (s)")
    ax.set_ylabel("fraction of logins granted")
    ax.set_xlim(0, cap)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.45, 0.92), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def refused(data):
    """Count of logins refused before the cap, with the commonest reason."""
    total = sum(data["denials"].values())
    if not total:
        return "0"
    why, count = max(data["denials"].items(), key=lambda item: item[1])
    return "%d (%s%s)" % (total, why[:40], "" if count == total else ", ...")


def table(results, args):
    labels = [label for label, _ in CONFIGS]
    ref = results[labels[0]]["latency"]["latency_median_s"]
    rows = []

    def row(name, fn):
        rows.append([name] + [fn(results[label]) for label in labels])

    def section(name):
        rows.append([name] + [""] * len(labels))

    n_lat = results[labels[0]]["latency"]["logins"]
    n = results[labels[0]]["burst"]["logins"]
    cap = args.cap
    row("poll interval / wait mode", lambda r: "%gs / %s" % (r["settings"]["POLL_INTERVAL_SECONDS"], r["settings"]["WAIT_MODE"]))
    section("1. approval -> grant (%d logins, approvals 2-8 s)" % n_lat)
    row("  median", lambda r: fmt_s(r["latency"]["latency_median_s"]))
    row("  p95", lambda r: fmt_s(r["latency"]["latency_p95_s"]))
    row("  max", lambda r: fmt_s(r["latency"]["latency_max_s"]))
    row("  reference median / this median", lambda r: "%.1fx" % (ref / r["latency"]["latency_median_s"]))
    row("  failed logins", lambda r: str(r["latency"]["failed"]))
    section("2. API requests per login")
    row("  total (lookup+push+polls)", lambda r: "%.2f" % r["latency"]["requests_per_login"])
    row("  polls", lambda r: "%.2f" % r["latency"]["polls_per_login"])
    section("3. %d at once, approve 5 s, budget %d/s" % (n, HIGH_BUDGET))
    row("  granted within 60 s", lambda r: "%d / %d" % (r["burst"]["granted_within_60s"], n))
    row("  arrival -> result p50", lambda r: fmt_s(r["burst"]["p50_s"], cap))
    row("  arrival -> result p95", lambda r: fmt_s(r["burst"]["p95_s"], cap))
    row("  longest queued for a thread", lambda r: fmt_s(r["burst"]["max_queued_s"]))
    row("  peak busy pool threads", lambda r: "%d / 10" % r["burst"]["peak_busy_threads"])
    row("  peak API calls in flight (HTTP threads)", lambda r: "%d" % r["burst"]["peak_http_threads"])
    row("  peak pool backlog", lambda r: str(r["burst"]["peak_backlog"]))
    row("  worst reactor stall", lambda r: "%.1f ms" % r["burst"]["worst_stall_ms"])
    row("  CPython full GCs meanwhile (longest)", lambda r: "%d (%.1f ms)" % (
        len(r["burst"]["full_gc_ms"]), max(r["burst"]["full_gc_ms"] or [0.0])))
    row("  refused before the cap", lambda r: refused(r["burst"]))
    row("  unfinished at %gs cap" % cap, lambda r: str(r["burst"]["drained_after_cap"]))
    section("4. same, budget %d/s (+burst %d)" % (LOW_BUDGET, BURST))
    row("  busiest 1 s window", lambda r: "%d req" % r["budget"]["max_rate_1s"])
    row("  granted within 60 s", lambda r: "%d / %d" % (r["budget"]["granted_within_60s"], n))
    row("  arrival -> result p50", lambda r: fmt_s(r["budget"]["p50_s"], cap))
    row("  arrival -> result p95", lambda r: fmt_s(r["budget"]["p95_s"], cap))
    row("  refused before the cap", lambda r: refused(r["budget"]))
    row("  unfinished at %gs cap" % cap, lambda r: str(r["budget"]["drained_after_cap"]))
    row("scenario wall time (1 / 3 / 4)", lambda r: "%.0f / %.0f / %.0f s" % (
        r["latency"]["wall_s"], r["burst"]["measured_s"], r["budget"]["measured_s"]))

    head = ["", *labels]
    widths = [max(len(str(line[i])) for line in rows + [head]) for i in range(len(head))]
    out = []
    out.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    out.append("  ".join("-" * w for w in widths))
    for line in rows:
        out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(out)


def verdicts(results, n, repeats=()):
    """[(passed, text)] for every target. `repeats`: (stall, full GCs, longest) of every deferred
    burst run, the table's included; the stall target holds for the worst of them."""
    checks = []
    ref = results["reference-like"]["latency"]
    for label in ("thread (ours)", "deferred (ours)"):
        lat = results[label]["latency"]
        ratio = ref["latency_median_s"] / lat["latency_median_s"]
        checks.append((ratio >= 4 and lat["latency_median_s"] <= 0.6 and lat["latency_p95_s"] <= 1.1 and not lat["failed"],
                       "%s latency: median %.2f s (<= 0.6), p95 %.2f s (<= 1.1), %.1fx lower than reference-like (>= 4x)"
                       % (label, lat["latency_median_s"], lat["latency_p95_s"], ratio)))
    burst = results["deferred (ours)"]["burst"]
    checks.append((burst["granted_within_60s"] == n, "deferred burst: %d / %d granted within 60 s (all)" % (burst["granted_within_60s"], n)))
    checks.append((burst["p95_s"] <= 7.0, "deferred burst: p95 arrival -> result %s (<= 7 s = approval 5 s + 2 s)" % fmt_s(burst["p95_s"], 0)))
    busy = burst["peak_busy_threads"] + burst["peak_http_threads"]
    checks.append((busy <= 10, "deferred burst: peak busy threads %d (<= 10): %d of Access Server's pool + %d of main.py's "
                   "HTTP threads" % (busy, burst["peak_busy_threads"], burst["peak_http_threads"])))
    stall = max([burst["worst_stall_ms"]] + [run[0] for run in repeats])
    checks.append((stall <= 50, "deferred burst: worst reactor stall %.1f ms (<= 50), the worst of %d run(s)"
                   % (stall, max(1, len(repeats)))))
    for label, _ in CONFIGS:
        rate = results[label]["budget"]["max_rate_1s"]
        checks.append((rate <= LOW_BUDGET + BURST, "%s budget %d/s: busiest 1 s window %d requests (<= %d)"
                       % (label, LOW_BUDGET, rate, LOW_BUDGET + BURST)))
    budget = results["deferred (ours)"]["budget"]
    checks.append((budget["granted_within_60s"] == n, "deferred budget %d/s: %d / %d granted within 60 s (all)"
                   % (LOW_BUDGET, budget["granted_within_60s"], n)))
    return checks


def replot(path, cap):
    """Draw the plot again from a --json file of an earlier run (same figures, new drawing)."""
    with open(path) as handle:
        plot(json.load(handle)["results"], DOCS_PNG, cap)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 10 latency logins, 40 burst logins")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    parser.add_argument("--latency-logins", type=int, default=None, help="logins for scenario 1 (default 30, quick 10)")
    parser.add_argument("--logins", type=int, default=None, help="logins for scenarios 3 and 4 (default 200, quick 40)")
    parser.add_argument("--cap", type=float, default=75.0, help="wall-time cap per burst scenario (default 75 s)")
    parser.add_argument("--stall-repeats", type=int, default=5,
                        help="run the deferred burst this many more times for the stall distribution (default 5)")
    parser.add_argument("--fake-in-process", action="store_true",
                        help="serve the fake API from this process instead of a child process (for comparison)")
    parser.add_argument("--replot", metavar="JSON", help="only draw docs/time_to_result.png again from a --json file")
    args = parser.parse_args(argv)
    if args.replot:
        replot(args.replot, args.cap)
        return 0
    FAKE_IN_CHILD[0] = not args.fake_in_process
    n_lat = args.latency_logins or (10 if args.quick else 30)
    n = args.logins or (40 if args.quick else 200)
    rng = random.Random(SEED)
    approvals = [rng.uniform(2.0, 8.0) for _ in range(n_lat)]

    os.makedirs(OUT, exist_ok=True)
    log_path = os.path.join(OUT, "main.log")
    results = {}
    begun = time.monotonic()
    with open(log_path, "w") as log, tempfile.TemporaryDirectory(prefix="ivalt-bench-") as workdir:
        for label, overrides in CONFIGS:
            results[label] = {"settings": overrides}
            progress("%s: latency, %d logins" % (label, n_lat))
            results[label]["latency"] = scenario_latency(workdir, label, overrides, approvals, log)
            progress("%s: burst, %d logins, budget %d/s" % (label, n, HIGH_BUDGET))
            results[label]["burst"] = scenario_burst(workdir, label, overrides, n, HIGH_BUDGET, args.cap, log)
            progress("%s: burst, %d logins, budget %d/s" % (label, n, LOW_BUDGET))
            results[label]["budget"] = scenario_burst(workdir, label, overrides, n, LOW_BUDGET, args.cap, log)
        # One burst is one sample of the stall, and a full GC landing in it decides it: repeat it.
        label, overrides = CONFIGS[2]
        first = results[label]["burst"]
        repeats = [(first["worst_stall_ms"], len(first["full_gc_ms"]), max(first["full_gc_ms"] or [0.0]))]
        for i in range(args.stall_repeats):
            progress("%s: burst again for the stall, %d of %d" % (label, i + 1, args.stall_repeats))
            again = scenario_burst(workdir, label, overrides, n, HIGH_BUDGET, args.cap, log)
            repeats.append((again["worst_stall_ms"], len(again["full_gc_ms"]), max(again["full_gc_ms"] or [0.0])))
    total = time.monotonic() - begun

    png = os.path.join(OUT, "time_to_result.png")
    plot(results, png, args.cap)
    full = not args.quick and (n_lat, n, args.cap) == (30, 200, 75.0)
    if full:  # only a full run stands for the README's figures
        os.makedirs(os.path.dirname(DOCS_PNG), exist_ok=True)
        shutil.copyfile(png, DOCS_PNG)

    print("iVALT post-auth benchmark: main.py %s, Python %s, %d logins (latency) / %d logins (burst), fake API %s%s"
          % (load_version(), sys.version.split()[0], n_lat, n,
             "in this process" if args.fake_in_process else "in a child process", "  [--quick]" if args.quick else ""))
    print()
    print(table(results, args))
    print()
    if len(repeats) > 1:
        stalls = sorted(stall for stall, _, _ in repeats)
        without_gc = [stall for stall, count, _ in repeats if not count]
        with_gc = ["%.1f ms (stall %.1f ms)" % (longest, stall) for stall, count, longest in repeats if count]
        print("deferred burst, %d runs (the table's and %d more): worst reactor stall min %.1f / median %.1f / max "
              "%.1f ms; %d of the runs had no full GC (their worst: %s); longest full GC of the others: %s"
              % (len(repeats), len(repeats) - 1, stalls[0], statistics.median(stalls), stalls[-1], len(without_gc),
                 "%.1f ms" % max(without_gc) if without_gc else "-", ", ".join(with_gc) or "-"))
        print()
    checks = verdicts(results, n, repeats)
    for passed, text in checks:
        print("%s  %s" % ("PASS" if passed else "FAIL", text))
    print()
    print("total %.0f s; plot %s%s; main.py log %s" % (
        total, os.path.relpath(png, ROOT), " (copied to %s)" % os.path.relpath(DOCS_PNG, ROOT) if full else "",
        os.path.relpath(log_path, ROOT)))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(finite({"quick": args.quick, "seed": SEED, "approvals_s": approvals, "total_s": total,
                              "deferred_burst_runs": [{"worst_stall_ms": s, "full_gcs": c, "longest_full_gc_ms": g} for s, c, g in repeats],
                              "results": results, "checks": [{"passed": p, "target": t} for p, t in checks]}),
                      handle, indent=2)
    return 0 if all(p for p, _ in checks) else 1


def finite(value):
    """JSON has no infinity: a censored time (not granted before the cap) becomes null."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def load_version():
    with open(MAIN) as handle:
        for line in handle:
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "?"


if __name__ == "__main__":
    sys.exit(main())
