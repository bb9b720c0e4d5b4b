"""Shared fixtures: the real main.py loaded the way Access Server loads it, a fake iVALT API
on 127.0.0.1, and both wait modes for every behaviour test."""

import os
import stat

import pytest

from asemu import AccessServer, load_script, wait_pool_idle
from fake_ivalt import FakeIvalt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")
API_KEY = "test-key-QX7yW2"
# A password every emulated login carries unless a test gives another: it must never be printed.
PASSWORD = "Pa55-w0rd-NEVER-LOGGED"

# The fake's users: address -> (mobile, behaviour, seconds from push to answer, pending style)
USERS = {
    "alice@example.com": ("+15551230001", "approve", 0.3, "404"),
    "tz@example.com": ("+15551230002", "timezone", 0.3, "404"),
    "geo@example.com": ("+15551230003", "geofence", 0.3, "404"),
    "deny@example.com": ("+15551230004", "deny401", 0.3, "404"),
    "denyd@example.com": ("+15551230005", "deny_detail", 0.3, "404"),
    "slow@example.com": ("+15551230006", "never", 0.0, "404"),
    "pend422@example.com": ("+15551230007", "approve", 0.6, "422"),
    "brandonqa@access-server.com": ("+15551230008", "approve", 0.3, "404"),
}


def write_config(path, **settings):
    with open(path, "w") as handle:
        handle.write('"""Test configuration."""\n')
        for name, value in settings.items():
            handle.write("%s = %r\n" % (name, value))
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return str(path)


def add_users(fake):
    for email, (mobile, behaviour, after, pending) in USERS.items():
        fake.add_user(email, mobile, behaviour=behaviour, after=after, pending_style=pending)


@pytest.fixture
def fake():
    with FakeIvalt(api_key=API_KEY) as server:
        add_users(server)
        yield server


@pytest.fixture
def load_main(tmp_path):
    """load_main(env=None, **settings): main.py's text exec'd as Access Server does, with the
    settings in a config file named by IVALT_CONFIG (the real loading path)."""
    scripts = []

    def load(env=None, **settings):
        config = write_config(tmp_path / ("ivalt_config_%d.py" % len(scripts)), **settings)
        environ = {"IVALT_CONFIG": config, "IVALT_SECRET_KEY": None, "IVALT_API_URL": None}
        environ.update(env or {})
        script = load_script(MAIN, env=environ)
        scripts.append(script)
        return script

    yield load
    for script in scripts:
        script.ns["shutdown"]()
    wait_pool_idle(10)


@pytest.fixture(params=["thread", "deferred"])
def mode(request):
    return request.param


def settings_for(url, mode="thread", **overrides):
    settings = dict(
        IVALT_SECRET_KEY=API_KEY,
        IVALT_API_URL=url,
        EMAIL_DOMAIN="example.com",
        DEADLINE_SECONDS=3,
        POLL_INTERVAL_SECONDS=0.25,
        WAIT_MODE=mode,
        REQUEST_BUDGET_PER_SECOND=1000,
        CALL_TIMEOUT_SECONDS=2,
        LOG_LEVEL="debug",  # the most talkative level: the secrets check below covers every line
    )
    settings.update(overrides)
    return settings


@pytest.fixture
def access_server(fake, load_main, mode):
    """access_server(**settings) -> an AccessServer running main.py against the fake, in `mode`."""

    def make(url=None, **overrides):
        return AccessServer(load_main(**settings_for(url or fake.url, mode, **overrides)))

    return make


def _secrets():
    return [API_KEY, PASSWORD] + [mobile for mobile, _, _, _ in USERS.values()] + [
        mobile.lstrip("+") for mobile, _, _, _ in USERS.values()]


@pytest.fixture(autouse=True)
def no_secrets_anywhere(capfd, monkeypatch):
    """Every test: no API key, password or full mobile number in any line main.py prints, nor in
    any reason or client_reason an emulated login returns."""
    results = []
    original = AccessServer.build_call

    def build_call(self, **kwargs):
        if kwargs.get("password", "pw") == "pw":  # the emulation's default: use the recognisable one
            kwargs["password"] = PASSWORD
        result = original(self, **kwargs)
        results.append(result)
        return result

    monkeypatch.setattr(AccessServer, "build_call", build_call)
    yield
    out, err = capfd.readouterr()
    for secret in _secrets():
        assert secret not in out and secret not in err, "a secret reached the log: %r" % secret
    for result in results:
        authret = result.authret if isinstance(getattr(result, "authret", None), dict) else {}
        for field in ("reason", "client_reason"):
            for secret in _secrets():
                assert secret not in str(authret.get(field, "")), "%r in %s" % (secret, field)
