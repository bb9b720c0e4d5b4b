"""The command line, run as a real process: `python main.py check|doctor|install|uninstall`.

main.py reads its settings from a config file named by IVALT_CONFIG (mode 600) and talks to the
fake iVALT API on 127.0.0.1 over plain HTTP (allowed for loopback hosts). Access Server's `sacli`
is a small generated Python script that answers from a JSON spec file and records every argv.
"""

import json
import os
import pty
import re
import select
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from conftest import API_KEY, MAIN, ROOT, settings_for, write_config

OK, BAD, SKIP = "\u2713", "\u2717", "\u2013"
SCRIPT_KEY = "auth.module.post_auth_script"
GLOBAL_TOTP = "vpn.server.google_auth.enable"
PLACEHOLDER = "<ivalt_secret_key>"
DEADLINE = 3  # seconds; settings_for() also sets POLL_INTERVAL_SECONDS=0.25 and CALL_TIMEOUT_SECONDS=2
OFFLINE_URL = "https://api.ivalt.com"  # for commands that never call the API (install, help)

THIS_SCRIPT = object()  # Sacli.configure(script=THIS_SCRIPT): main.py's text as it is now


def main_text():
    """main.py's text, read when needed (not at import: the file may be edited while tests run)."""
    with open(MAIN, encoding="utf-8") as handle:
        return handle.read()

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX command line (sacli, pty)")


# --------------------------------------------------------------------------------------- helpers


def child_env(config=None, **extra):
    env = dict(os.environ)
    # as in an administrator's shell: no test-runner settings (PYTHONUNBUFFERED would hide buffering)
    for name in ("IVALT_SECRET_KEY", "IVALT_API_URL", "IVALT_CONFIG", "PYTHONPATH", "PYTHONUNBUFFERED"):
        env.pop(name, None)
    env["PYTHONIOENCODING"] = "utf-8"  # the checklist marks are ✓ ✗ – whatever the locale
    if config is not None:
        env["IVALT_CONFIG"] = config
    env.update(extra)
    return env


def run_main(*args, config=None, env=None, timeout=60):
    """`python main.py ARGS` from the repository root; (exit status, stdout + stderr, seconds)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "main.py"] + list(args), cwd=ROOT, env=env or child_env(config),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return done.returncode, done.stdout.decode("utf-8"), time.monotonic() - started


def marked(output, mark):
    """The checklist lines that start with `mark`, without it."""
    return [line[len(mark):].strip() for line in output.splitlines() if line.startswith(mark + " ")]


def fix_after(output, title_part):
    """The `fix:` line printed under the first check whose title contains title_part."""
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if title_part in line and index + 1 < len(lines) and lines[index + 1].strip().startswith("fix:"):
            return lines[index + 1].strip()[len("fix:"):].strip()
    raise AssertionError("no fix under %r in:\n%s" % (title_part, output))


@pytest.fixture
def config(tmp_path, fake):
    """config(**overrides) -> path of a mode-600 config file pointing at the fake."""
    count = [0]

    def make(**overrides):
        count[0] += 1
        return write_config(tmp_path / ("ivalt_config_%d.py" % count[0]), **settings_for(fake.url, **overrides))

    return make


@pytest.fixture
def offline_config(tmp_path):
    """A valid config for commands that never call the API."""
    def make(**overrides):
        return write_config(tmp_path / "ivalt_offline.py", **settings_for(OFFLINE_URL, **overrides))

    return make


@pytest.fixture
def refused_url():
    """An http://127.0.0.1 URL whose port is bound but not listening: connections are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield "http://127.0.0.1:%d" % sock.getsockname()[1]
    sock.close()


_STUB = r'''#!{python}
"""A stand-in for Access Server's sacli: answers from a JSON spec file, records its argv."""
import json
import sys

SPEC = {spec!r}
LOG = {log!r}
args = sys.argv[1:]
with open(LOG, "a") as handle:
    handle.write(json.dumps(args) + "\n")
with open(SPEC) as handle:
    spec = json.load(handle)
command = args[-1] if args else ""


def option(name):
    return args[args.index(name) + 1]


def save():
    with open(SPEC, "w") as handle:
        json.dump(spec, handle)


if command in spec.get("fail", []):
    sys.stderr.write("stub sacli: %s failed on purpose\n" % command)
    sys.exit(3)
config = spec.setdefault("config", {{}})
if command == "ConfigQuery":
    print(json.dumps(config, indent=2))
elif command == "UserPropGet":
    name = option("--user")
    users = spec.get("users", {{}})
    print(json.dumps({{name: users[name]}} if name in users else {{}}, indent=2))
elif command == "ConfigPut":
    files = [arg.split("=", 1)[1] for arg in args if arg.startswith("--value_file=")]
    if files:
        with open(files[0]) as handle:
            config[option("--key")] = handle.read()
    else:
        config[option("--key")] = option("--value")
    save()
    print("stub sacli: ConfigPut done")
elif command == "ConfigDel":
    config.pop(option("--key"), None)
    save()
    print("stub sacli: ConfigDel done")
elif command == "start":
    print("stub sacli: start done")
else:
    sys.stderr.write("stub sacli: unknown command %r\n" % (args,))
    sys.exit(2)
'''


class Sacli:
    """A generated `sacli` executable in tmp_path, its spec and its argv log."""

    def __init__(self, directory):
        self.path = str(directory / "sacli")
        self.spec_path = str(directory / "sacli_spec.json")
        self.log_path = str(directory / "sacli_calls.log")
        with open(self.path, "w") as handle:
            handle.write(_STUB.format(python=sys.executable, spec=self.spec_path, log=self.log_path))
        os.chmod(self.path, stat.S_IRWXU)
        self.configure()

    def configure(self, totp="false", script=THIS_SCRIPT, users=None, fail=()):
        """totp: the global key's value; script: the loaded script's text (None: none loaded);
        users: name -> prop_google_auth; fail: commands that exit 3."""
        if script is THIS_SCRIPT:
            script = main_text()
        config = {GLOBAL_TOTP: totp, "vpn.server.google_auth.enable_autologin": "false"}
        if script is not None:
            config[SCRIPT_KEY] = script
        spec = {
            "config": config,
            "users": {name: {"prop_google_auth": value} for name, value in (users or {}).items()},
            "fail": list(fail),
        }
        with open(self.spec_path, "w") as handle:
            json.dump(spec, handle)
        if os.path.exists(self.log_path):
            os.remove(self.log_path)

    def calls(self):
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path) as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def changes(self):
        """The calls that change Access Server (everything but the read-only queries)."""
        return [call for call in self.calls() if call[-1] not in ("ConfigQuery", "UserPropGet")]

    def loaded(self):
        with open(self.spec_path) as handle:
            return json.load(handle)["config"].get(SCRIPT_KEY)


@pytest.fixture
def sacli(tmp_path):
    return Sacli(tmp_path)


INSTALL = [["--key", SCRIPT_KEY, "--value_file=" + os.path.abspath(MAIN), "ConfigPut"], ["start"]]
UNINSTALL = [["--key", SCRIPT_KEY, "ConfigDel"], ["start"]]


def shell(sacli_path, arguments):
    return " ".join(shlex.quote(part) for part in [sacli_path] + arguments)


# ------------------------------------------------------------------------------------------ check


def test_check_approved(fake, config):
    code, out, _ = run_main("check", "alice@example.com", config=config())
    assert code == 0, out
    assert re.search(r"^  look up the user +\d+\.\d\ds  mobile \+\*+01$", out, re.M), out
    assert re.search(r"^  send the push +\d+\.\d\ds  sent$", out, re.M), out
    assert "waiting for the user to approve on the phone..." in out  # not a TTY: one line, no countdown
    assert re.search(r"^  poll the result +\d+\.\d\ds  approved$", out, re.M), out
    assert "result: APPROVED" in out
    assert re.search(r"^timing: lookup 1 call \d+\.\d\ds, push 1 call \d+\.\d\ds, poll \d+ calls? \d+\.\d\ds, "
                     r"total \d+\.\d\ds, \d+ API calls$", out, re.M), out
    assert "s left" not in out and "\033[K" not in out
    assert "+15551230001" not in out and "1230001" not in out
    assert API_KEY not in out
    assert "the user would see" not in out
    assert fake.counts["push"] == 1 and fake.pushes_delivered == {"+15551230001": 1}


def test_check_applies_the_email_domain(fake, config):
    code, out, _ = run_main("check", "Alice", config=config())
    assert code == 0, out
    assert "checking alice@example.com against %s" % fake.url in out
    assert fake.log[0].body == {"email": "alice@example.com"}


@pytest.mark.parametrize("user, outcome, client", [
    ("tz", "INVALID_TIMEZONE", "INVALID_TIMEZONE"),
    ("geo", "INVALID_GEOFENCE", "INVALID_GEOFENCE"),
    ("deny", "DENIED", "AUTHENTICATION_FAILED"),
])
def test_check_policy_and_user_answers_exit_1(fake, config, user, outcome, client):
    code, out, _ = run_main("check", user, config=config())
    assert code == 1, out
    assert "result: %s" % outcome in out
    assert "the user would see: %s" % client in out
    assert "timing: " in out
    assert "+1555123000" not in out


def test_check_timezone_shows_the_detail(fake, config):
    code, out, _ = run_main("check", "tz@example.com", config=config())
    assert code == 1
    assert "invalid_timezone" in out and "You are not within the timezone." in out
    assert "result: INVALID_TIMEZONE" in out


def test_check_not_enrolled(fake, config):
    code, out, elapsed = run_main("check", "nobody@example.com", config=config())
    assert code == 1, out
    assert "result: NOT_ENROLLED" in out
    assert "The email provided (nobody@example.com) was not found" in out
    assert re.search(r"^timing: lookup 1 call \d+\.\d\ds, total \d+\.\d\ds, 1 API calls?$", out, re.M), out
    assert fake.counts["push"] == 0 and fake.counts["poll"] == 0


def test_check_user_who_never_answers_times_out_at_the_deadline(fake, config):
    code, out, elapsed = run_main("check", "slow", config=config(DEADLINE_SECONDS=1))
    assert code == 1, out
    assert "result: TIMED_OUT" in out
    assert "the user would see: AUTHENTICATION_FAILED" in out
    assert elapsed < 1 + 5  # deadline, plus interpreter start-up with room for a slow machine


def test_check_bad_key_exits_2(fake, config):
    code, out, _ = run_main("check", "alice", config=config(IVALT_SECRET_KEY="wrong-key-123"))
    assert code == 2, out
    assert "result: BAD_KEY" in out and "refused" in out
    assert "the user would see: SERVICE_MISCONFIGURED" in out
    assert "wrong-key-123" not in out
    assert fake.counts["push"] == 0


def test_check_the_environment_key_overrides_the_config_file(fake, config):
    env = child_env(config(), IVALT_SECRET_KEY="env-key-456")
    code, out, _ = run_main("check", "alice", env=env)
    assert code == 2, out
    assert "result: BAD_KEY" in out
    assert fake.log[0].headers["x-api-key"] == "env-key-456"
    assert "env-key-456" not in out


def test_check_unreachable_host_exits_2(fake, config, refused_url):
    code, out, elapsed = run_main("check", "alice", config=config(IVALT_API_URL=refused_url, DEADLINE_SECONDS=1))
    assert code == 2, out
    assert "result: UNAVAILABLE" in out and "connection refused" in out
    assert "the user would see: SERVICE_UNAVAILABLE" in out
    assert elapsed < 1 + 5


def test_check_config_error_exits_2_without_calling_the_api(fake, config):
    code, out, _ = run_main("check", "alice", config=config(IVALT_SECRET_KEY=PLACEHOLDER))
    assert code == 2, out
    assert "configuration error: IVALT_SECRET_KEY is not configured" in out
    assert "python3 main.py doctor" in out
    assert "result:" not in out
    assert sum(fake.counts.values()) == 0


def test_check_interrupted_exits_2(fake, config):
    proc = subprocess.Popen([sys.executable, "main.py", "check", "slow"], cwd=ROOT, env=child_env(config()),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ends = time.monotonic() + 10
        while not fake.pushes_delivered and time.monotonic() < ends:
            time.sleep(0.05)
        assert fake.pushes_delivered, "the check never sent its push"
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=10)[0].decode("utf-8")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, out
    assert out.rstrip().endswith("interrupted"), out
    assert "Traceback" not in out


def test_check_unusable_username_exits_1(fake, config):
    code, out, _ = run_main("check", "a b@example.com", config=config())
    assert code == 1, out
    assert "cannot check:" in out and "not a usable e-mail address" in out
    assert sum(fake.counts.values()) == 0


def _run_in_a_pty(args, env, timeout=30):
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "main.py"] + list(args), cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    finally:
        os.close(slave)
    chunks = []
    ends = time.monotonic() + timeout
    try:
        while time.monotonic() < ends:
            ready, _, _ = select.select([master], [], [], max(0.0, ends - time.monotonic()))
            if not ready:
                break
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_check_shows_a_live_countdown_in_a_terminal(fake, config):
    fake.add_user("later@example.com", "+15551230009", behaviour="approve", after=1.5)
    code, out = _run_in_a_pty(["check", "later"], child_env(config()))
    assert code == 0, out
    assert "waiting for the phone" in out and "s left" in out
    assert len(re.findall(r"waiting for the phone\.\.\. +[0-3]s left", out)) >= 3, out  # it updates
    assert "\r\033[K" in out  # each update overwrites the line
    assert "waiting for the user to approve on the phone..." not in out  # the pipe-only line
    assert "result: APPROVED" in out and "timing: " in out
    assert "+15551230009" not in out and re.search(r"mobile \+\*+09", out)


# ----------------------------------------------------------------------------------------- doctor


def test_doctor_good_key_without_access_server(fake, config):
    code, out, _ = run_main("doctor", "--sacli", "/nonexistent/sacli", config=config())
    assert code == 0, out
    assert marked(out, BAD) == []
    assert any(line.startswith("API key accepted") for line in marked(out, OK)), out
    assert any(line.startswith("settings valid") for line in marked(out, OK))
    assert any("TLS skipped: plain http:// test URL" in line for line in marked(out, SKIP))
    skipped = marked(out, SKIP)
    assert sum("/nonexistent/sacli not found" in line for line in skipped) == 3, out  # TOTP x2, loaded script
    summary = out.rstrip().splitlines()[-1]  # skipped is not passed: the summary says so, and how to point at sacli
    assert summary.startswith("all checks passed, 4 skipped") and "--sacli PATH" in summary, summary
    assert API_KEY not in out
    assert fake.counts["lookup"] == 1 and fake.counts["push"] == 0 and fake.counts["poll"] == 0
    assert fake.log[0].body == {"email": "doctor-check@ivalt-doctor.invalid"}


def test_doctor_bad_key(fake, config):
    code, out, _ = run_main("doctor", "--sacli", "/nonexistent/sacli", config=config(IVALT_SECRET_KEY="wrong-key-123"))
    assert code == 1, out
    assert any(line.startswith("API key refused") for line in marked(out, BAD)), out
    assert "iVALT dashboard" in fix_after(out, "API key refused")
    assert "1 check failed" in out
    assert "wrong-key-123" not in out


def test_doctor_unreachable_host(fake, config, refused_url):
    code, out, _ = run_main("doctor", "--sacli", "/nonexistent/sacli", config=config(IVALT_API_URL=refused_url))
    assert code == 1, out
    failures = marked(out, BAD)
    assert len(failures) == 1 and "not reachable" in failures[0] and "connection refused" in failures[0], out
    assert "IVALT_API_URL" in fix_after(out, "not reachable")


def test_doctor_refuses_plain_http_to_a_remote_host(fake, config):
    code, out, _ = run_main("doctor", "--sacli", "/nonexistent/sacli",
                            config=config(IVALT_API_URL="http://api.example.com"))
    assert code == 1, out
    failures = marked(out, BAD)
    assert any("IVALT_API_URL" in line and "https" in line for line in failures), out
    assert any(line.startswith("API checks skipped") for line in marked(out, SKIP))
    assert sum(fake.counts.values()) == 0


def test_doctor_placeholder_key(fake, config):
    code, out, _ = run_main("doctor", "--sacli", "/nonexistent/sacli", config=config(IVALT_SECRET_KEY=PLACEHOLDER))
    assert code == 1, out
    assert any(line.startswith("IVALT_SECRET_KEY is not configured") for line in marked(out, BAD)), out
    assert "IVALT_SECRET_KEY" in fix_after(out, "IVALT_SECRET_KEY is not configured")
    assert any(line.startswith("API checks skipped") for line in marked(out, SKIP))
    assert sum(fake.counts.values()) == 0


def test_doctor_config_file_writable_by_others(fake, config):
    path = config()
    os.chmod(path, 0o666)
    code, out, _ = run_main("doctor", "--sacli", "/nonexistent/sacli", config=path)
    assert code == 1, out
    failures = marked(out, BAD)
    assert any("writable by group or others" in line and "chmod 600 %s" % path in line for line in failures), out
    assert "mode 600" in fix_after(out, "writable by group or others")
    assert sum(fake.counts.values()) == 0  # the key in that file is not trusted, so not used


def test_doctor_refused_config_file_does_not_send_the_key_elsewhere(fake, config):
    """The key is in the refused file: the fix is to repair the file, not to put the key somewhere else."""
    path = config()
    os.chmod(path, 0o660)
    code, out, _ = run_main("doctor", "--sacli", "/nonexistent/sacli", config=path)
    assert code == 1, out
    assert fix_after(out, "IVALT_SECRET_KEY is not configured") == "fix the config file first (see above): its values were not read"
    assert "/usr/local/openvpn_as/etc" not in out


@pytest.mark.parametrize("line, fix", [
    ("DEADLNE_SECONDS = 30", "correct that line"),
    ("DEADLINE_SECONDS = 60 +", "correct that line"),
])
def test_doctor_names_the_fix_for_each_config_file_error(fake, config, line, fix):
    path = config()
    with open(path, "a") as handle:
        handle.write(line + "\n")
    code, out, _ = run_main("doctor", "--sacli", "/nonexistent/sacli", config=path)
    assert code == 1, out
    assert fix_after(out, "config file %s" % path).startswith(fix), out


def test_doctor_a_value_of_the_wrong_type_names_the_setting_and_the_line(fake, config):
    path = config(DEADLINE_SECONDS="60")
    code, out, _ = run_main("doctor", "--sacli", "/nonexistent/sacli", config=path)
    assert code == 1, out
    line = [n for n, text in enumerate(open(path).read().splitlines(), 1) if text.startswith("DEADLINE_SECONDS")][0]
    assert "DEADLINE_SECONDS must be a number from 1 to 600, got text '60' (line %d of %s)" % (line, path) in out, out


def test_doctor_survives_a_sacli_that_prints_garbage(fake, config, tmp_path):
    garbage = tmp_path / "sacli"
    garbage.write_bytes(b"#!/bin/sh\nprintf '\\377\\376{'\n")
    os.chmod(str(garbage), stat.S_IRWXU)
    code, out, _ = run_main("doctor", "--sacli", str(garbage), config=config())
    assert code == 1 and "Traceback" not in out, out
    assert any("could not read the configuration" in line for line in marked(out, BAD)), out


def test_doctor_survives_a_loaded_script_that_is_not_text(fake, config, sacli):
    sacli.configure(script=5)
    code, out, _ = run_main("doctor", "--sacli", sacli.path, config=config())
    assert code == 1 and "Traceback" not in out, out
    assert any("not the script's text" in line for line in marked(out, BAD)), out


def test_check_on_an_ascii_terminal_has_no_traceback(fake, config):
    env = child_env(config(), PYTHONIOENCODING="ascii")
    code, out, _ = run_main("check", "caf\u00e9", env=env)
    assert code in (1, 2) and "Traceback" not in out, out


def test_doctor_never_shows_the_proxy_password(fake, config):
    code, out, _ = run_main("doctor", "--sacli", "/nonexistent/sacli",
                            config=config(HTTPS_PROXY="http://admin:s3cretpw@127.0.0.1:9"))
    assert "s3cretpw" not in out and "admin:***@127.0.0.1:9" in out, out


def test_doctor_checklist_marks_fall_back_to_ascii(fake, config):
    env = child_env(config(), PYTHONIOENCODING="ascii")
    code, out, _ = run_main("doctor", "--sacli", "/nonexistent/sacli", env=env)
    assert code == 0, out
    assert re.search(r"^OK   API key accepted", out, re.M), out
    assert re.search(r"^SKIP loaded script check skipped", out, re.M), out
    assert OK not in out and SKIP not in out


def test_doctor_everything_off_and_this_script_loaded(fake, config, sacli):
    code, out, _ = run_main("doctor", "--sacli", sacli.path, "--user", "alice", "--user", "Sales", config=config())
    assert code == 0, out
    assert marked(out, BAD) == [] and marked(out, SKIP) == [line for line in marked(out, SKIP) if "TLS" in line]
    passed = marked(out, OK)
    assert "built-in TOTP off globally (vpn.server.google_auth.enable)" in passed
    for name in ("__DEFAULT__", "alice", "Sales"):
        assert any(line.startswith("built-in TOTP off for %s" % name) for line in passed), out
    assert "the script loaded in Access Server is this file (main.py)" in passed
    assert "all checks passed" in out
    calls = sacli.calls()
    assert ["ConfigQuery"] in calls
    for name in ("__DEFAULT__", "alice", "Sales"):
        assert ["--user", name, "UserPropGet"] in calls
    assert sacli.changes() == []  # doctor only reads


def test_doctor_global_totp_on(fake, config, sacli):
    sacli.configure(totp="true")
    code, out, _ = run_main("doctor", "--sacli", sacli.path, config=config())
    assert code == 1, out
    assert "built-in TOTP is ON globally (vpn.server.google_auth.enable)" in marked(out, BAD)
    assert fix_after(out, "ON globally") == "%s --key vpn.server.google_auth.enable --value false ConfigPut && %s start" % (
        sacli.path, sacli.path)
    assert "1 check failed" in out


def test_doctor_default_totp_on(fake, config, sacli):
    sacli.configure(users={"__DEFAULT__": "true"})
    code, out, _ = run_main("doctor", "--sacli", sacli.path, config=config())
    assert code == 1, out
    assert "built-in TOTP is ON for __DEFAULT__ (prop_google_auth)" in marked(out, BAD)
    assert "--user __DEFAULT__ --key prop_google_auth --value false UserPropPut" in fix_after(out, "ON for __DEFAULT__")


def test_doctor_totp_on_for_a_named_user(fake, config, sacli):
    sacli.configure(users={"__DEFAULT__": "false", "alice": "true", "bob": "false"})
    code, out, _ = run_main("doctor", "--sacli", sacli.path, "--user", "alice", "--user", "bob", config=config())
    assert code == 1, out
    assert marked(out, BAD) == ["built-in TOTP is ON for alice (prop_google_auth)"], out
    assert "--user alice --key prop_google_auth --value false UserPropPut" in fix_after(out, "ON for alice")
    passed = marked(out, OK)
    assert "built-in TOTP off for __DEFAULT__ (prop_google_auth false)" in passed
    assert "built-in TOTP off for bob (prop_google_auth false)" in passed
    assert ["--user", "alice", "UserPropGet"] in sacli.calls()


def test_doctor_loaded_script_differs(fake, config, sacli):
    sacli.configure(script=main_text().replace("__version__ = ", "__version__ = '0.9' or "))
    code, out, _ = run_main("doctor", "--sacli", sacli.path, config=config())
    assert code == 1, out
    failures = marked(out, BAD)
    assert len(failures) == 1 and "differs" in failures[0], out
    assert "python3 main.py install" in fix_after(out, "differs")


def test_doctor_no_script_loaded(fake, config, sacli):
    sacli.configure(script=None)
    code, out, _ = run_main("doctor", "--sacli", sacli.path, config=config())
    assert code == 1, out
    assert marked(out, BAD) == ["no post-auth script is loaded in Access Server"], out
    assert fix_after(out, "no post-auth script") == "python3 main.py install"


def test_doctor_sacli_failing(fake, config, sacli):
    sacli.configure(fail=["ConfigQuery"])
    code, out, _ = run_main("doctor", "--sacli", sacli.path, config=config())
    assert code == 1, out
    failures = marked(out, BAD)
    assert any(line.startswith("built-in TOTP off globally: could not read the configuration") for line in failures)
    assert any(line.startswith("could not read the loaded script") for line in failures), out
    assert "failed on purpose" in out


# -------------------------------------------------------------------------------- install/uninstall


def test_install_runs_configput_then_start(offline_config, sacli):
    sacli.configure(script=None)
    code, out, _ = run_main("install", "--sacli", sacli.path, config=offline_config())
    assert code == 0, out
    assert sacli.changes() == INSTALL
    assert sacli.calls()[-2:] == INSTALL
    assert "running: %s" % shell(sacli.path, INSTALL[0]) in out
    assert "running: %s" % shell(sacli.path, INSTALL[1]) in out
    assert sacli.loaded() == main_text()  # the stub read the file it was given


def test_install_then_doctor_sees_this_script(fake, config, sacli):
    sacli.configure(script=None)
    path = config()
    assert run_main("install", "--sacli", sacli.path, config=path)[0] == 0
    code, out, _ = run_main("doctor", "--sacli", sacli.path, config=path)
    assert code == 0, out
    assert "the script loaded in Access Server is this file (main.py)" in marked(out, OK)


@pytest.mark.parametrize("totp, users", [("true", {}), ("false", {"__DEFAULT__": "true"})])
def test_install_refuses_while_totp_is_on(offline_config, sacli, totp, users):
    sacli.configure(totp=totp, users=users, script=None)
    code, out, _ = run_main("install", "--sacli", sacli.path, config=offline_config())
    assert code == 1, out
    assert "refusing to install: Access Server's built-in TOTP may be on" in out
    assert "--force" in out
    assert sacli.changes() == []
    assert sacli.loaded() is None


def test_install_force_overrides_totp(offline_config, sacli):
    sacli.configure(totp="true", script=None)
    code, out, _ = run_main("install", "--force", "--sacli", sacli.path, config=offline_config())
    assert code == 0, out
    assert sacli.changes() == INSTALL


def test_install_refuses_invalid_settings(offline_config, sacli):
    code, out, _ = run_main("install", "--sacli", sacli.path, config=offline_config(IVALT_SECRET_KEY=PLACEHOLDER))
    assert code == 1, out
    assert "refusing to install: with these settings every login would be denied" in out
    assert "  - IVALT_SECRET_KEY is not configured" in out
    assert sacli.changes() == []


def test_install_force_overrides_invalid_settings(offline_config, sacli):
    code, out, _ = run_main("install", "--force", "--sacli", sacli.path,
                            config=offline_config(IVALT_SECRET_KEY=PLACEHOLDER))
    assert code == 0, out
    assert sacli.changes() == INSTALL


def test_install_dry_run_prints_the_commands_and_changes_nothing(offline_config, sacli):
    code, out, _ = run_main("install", "--dry-run", "--sacli", sacli.path, config=offline_config())
    assert code == 0, out
    lines = out.splitlines()
    assert lines[-2:] == [shell(sacli.path, INSTALL[0]), shell(sacli.path, INSTALL[1])], out
    assert "running:" not in out
    assert sacli.changes() == []


def test_install_dry_run_still_prints_the_commands_and_says_what_a_real_install_would_refuse(offline_config, sacli):
    sacli.configure(totp="true", script=None)
    code, out, _ = run_main("install", "--dry-run", "--sacli", sacli.path, config=offline_config(IVALT_SECRET_KEY=PLACEHOLDER))
    assert code == 1, out  # the dry run found what would stop a real one
    assert "a real install would refuse: with these settings every login would be denied:" in out
    assert "  - IVALT_SECRET_KEY is not configured" in out
    assert "a real install would refuse: Access Server's built-in TOTP may be on" in out
    assert out.splitlines()[-2:] == [shell(sacli.path, INSTALL[0]), shell(sacli.path, INSTALL[1])], out
    assert sacli.changes() == []


def test_install_notes_that_access_server_does_not_see_the_shells_config(offline_config, sacli):
    path = offline_config()
    code, out, _ = run_main("install", "--dry-run", "--sacli", sacli.path, config=path)
    assert code == 0, out
    assert "note: this shell has IVALT_CONFIG=%s, but Access Server reads /usr/local/openvpn_as/etc/ivalt_config.py" % path in out


def test_install_dry_run_without_sacli(offline_config):
    code, out, _ = run_main("install", "--dry-run", "--sacli", "/nonexistent/sacli", config=offline_config())
    assert code == 0, out
    assert out.splitlines()[-2:] == [shell("/nonexistent/sacli", INSTALL[0]), shell("/nonexistent/sacli", INSTALL[1])]


def test_install_script_option_sets_the_value_file(offline_config, sacli, tmp_path):
    other = tmp_path / "copy of main.py"
    other.write_text(main_text())
    code, out, _ = run_main("install", "--dry-run", "--sacli", sacli.path, "--script", str(other),
                            config=offline_config())
    assert code == 0, out
    assert shlex.split(out.splitlines()[-2]) == [sacli.path, "--key", SCRIPT_KEY, "--value_file=%s" % other, "ConfigPut"]


def test_install_without_sacli(offline_config):
    code, out, _ = run_main("install", "--sacli", "/nonexistent/sacli", config=offline_config())
    assert code == 1, out
    assert "/nonexistent/sacli not found" in out and "--sacli PATH" in out


def test_install_reports_a_failing_sacli(offline_config, sacli):
    sacli.configure(fail=["ConfigPut"])
    code, out, _ = run_main("install", "--sacli", sacli.path, config=offline_config())
    assert code == 1, out
    assert "failed with exit status 3" in out
    assert [call for call in sacli.changes() if call == ["start"]] == []  # no restart after a failed put


def test_install_output_is_in_order_through_a_pipe(offline_config, sacli):
    sacli.configure(script=None)
    code, out, _ = run_main("install", "--sacli", sacli.path, config=offline_config())
    assert code == 0, out
    assert out.index("running: %s" % shell(sacli.path, INSTALL[0])) < out.index("stub sacli: ConfigPut done"), out
    assert out.index("stub sacli: ConfigPut done") < out.index("running: %s" % shell(sacli.path, INSTALL[1])), out


def test_uninstall_runs_configdel_then_start(offline_config, sacli):
    code, out, _ = run_main("uninstall", "--sacli", sacli.path, config=offline_config())
    assert code == 0, out
    assert sacli.calls() == UNINSTALL
    assert sacli.loaded() is None
    assert "running: %s" % shell(sacli.path, UNINSTALL[0]) in out


def test_uninstall_dry_run(offline_config, sacli):
    code, out, _ = run_main("uninstall", "--dry-run", "--sacli", sacli.path, config=offline_config())
    assert code == 0, out
    assert out.splitlines()[-2:] == [shell(sacli.path, UNINSTALL[0]), shell(sacli.path, UNINSTALL[1])]
    assert sacli.calls() == []


def test_uninstall_without_sacli(offline_config):
    code, out, _ = run_main("uninstall", "--sacli", "/nonexistent/sacli", config=offline_config())
    assert code == 1, out
    assert "/nonexistent/sacli not found" in out


# ------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command, example", [
    ([], "python3 main.py install --dry-run"),
    (["check"], "python3 main.py check alice@example.com"),
    (["doctor"], "python3 main.py doctor --user alice --user Sales"),
    (["install"], "python3 main.py install --dry-run"),
    (["uninstall"], "python3 main.py uninstall --dry-run"),
])
def test_help_shows_examples(offline_config, command, example):
    code, out, _ = run_main(*(command + ["--help"]), config=offline_config())
    assert code == 0, out
    assert out.startswith("usage: main.py")
    assert "examples:" in out and example in out


def test_help_works_with_a_broken_config(tmp_path):
    code, out, _ = run_main("--help", config=str(tmp_path / "missing.py"))
    assert code == 0, out
    assert "examples:" in out


def test_no_command_prints_help_and_exits_2(offline_config):
    code, out, _ = run_main(config=offline_config())
    assert code == 2, out
    assert "usage: main.py" in out and "examples:" in out


def test_doctor_into_a_closed_pipe_has_no_traceback(offline_config):
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has already exited: every write gets EPIPE
    try:
        done = subprocess.run([sys.executable, "main.py", "doctor", "--sacli", "/nonexistent"], cwd=ROOT,
                              env=dict(os.environ, IVALT_CONFIG=offline_config()), stdout=write_end,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
