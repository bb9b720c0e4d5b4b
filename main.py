"""iVALT biometric two-factor authentication for OpenVPN Access Server (post-auth script).

After Access Server's own login (local, PAM, LDAP, RADIUS, SAML) succeeds, post_auth() sends a
biometric request to the user's phone through the iVALT API and lets the login through only when
the user approves it, within one end-to-end deadline. Every other outcome fails closed.

Load:    ./sacli --key "auth.module.post_auth_script" --value_file=main.py ConfigPut && ./sacli start
Remove:  ./sacli --key "auth.module.post_auth_script" ConfigDel && ./sacli start
Check:   python3 main.py doctor        python3 main.py check alice@example.com

The file's order is its architecture: settings -> outcome vocabulary -> pure classification of
API answers -> the verification flow (a generator that never touches a socket or a clock) ->
drivers (blocking, Twisted Deferred) -> Access Server hook -> command line.
Access Server runs this file's TEXT (it has no path of its own, and __name__ is not "__main__"), so it
stays one file.
"""

import ast
import json
import os
import re
import secrets
import stat
import sys
import threading
import time

try:
    import requests
except ImportError:  # Access Server does not declare it: the script still loads, logins fail closed
    requests = None

try:
    from pyovpn.plugin import FAIL, SUCCEED
except ImportError:  # outside Access Server (command line, tests): never compare against literals
    SUCCEED, FAIL = "SUCCEED", "FAIL"

# =================================================================================================
# Settings. Edit them here, or (better for the key) in a root-only config file: see
# config.example.py. Precedence: these values < config file < IVALT_SECRET_KEY / IVALT_API_URL
# environment variables. Everything is validated once, at load; a bad value fails every login
# closed with a reason that names it.
# =================================================================================================

# Your iVALT secret key. Sent only in the x-api-key header, never logged.
IVALT_SECRET_KEY = "<ivalt_secret_key>"  # noqa: S105 - the placeholder, refused at load

# iVALT API base URL. https:// only (plain http:// is accepted for loopback test servers).
IVALT_API_URL = "https://api.ivalt.com"

# Appended to usernames without "@": with "example.com", user "alice" is alice@example.com in
# iVALT. "" uses the username as it is.
EMAIL_DOMAIN = ""

# True: web-portal logins need iVALT too (the portal hands out VPN profiles). False: VPN only.
REQUIRE_FOR_WEB_LOGIN = True

# Seconds from the start of a login until it is given up. Keep it inside the VPN client's
# 60-second window: a later approval is not a success.
DEADLINE_SECONDS = 60

# Seconds between result polls while the user looks at the phone (0.25 at least).
POLL_INTERVAL_SECONDS = 1.0

# "closed": any failure denies the login. "open": let the login through only when the iVALT
# service cannot be reached (network error, timeout, 5xx, non-JSON) before it confirmed the push:
# never on a denial, time window, geofence, unknown user, bad key or a user who did not answer.
FAIL_MODE = "closed"

# "thread": wait in Access Server's worker thread (SYNCHRONOUS = False), as every integration does.
# "deferred": return a Twisted Deferred (SYNCHRONOUS = True): a user looking at the phone holds
# no thread, so hundreds can wait at once.
WAIT_MODE = "thread"

# Process-wide cap on iVALT API requests per second, however many users are waiting.
REQUEST_BUDGET_PER_SECOND = 25

# Usernames that never need iVALT (e.g. a break-glass admin). Each pass is logged as a bypass.
# Matched exactly as typed (any case, ASCII): "CORP\\admin" and "admin" are two entries.
BYPASS_USERS = []

# Access Server groups (authret proplist conn_group) whose members never need iVALT.
EXEMPT_GROUPS = []

# If not empty, only members of these groups need iVALT; everybody else passes (logged).
ENFORCED_GROUPS = []

# Label sent with the push, so the phone shows where the request comes from.
REQUEST_FROM = "OpenVPN Access Server"

# CA bundle file for the API's TLS certificate; "" uses the bundle that requests ships.
# TLS verification is always on.
CA_BUNDLE = ""

# HTTPS proxy (CONNECT), e.g. "http://proxy.example.com:3128"; "" connects directly.
HTTPS_PROXY = ""

# "info" (start and end line of every login) or "debug" (also a line per API call).
LOG_LEVEL = "info"

# Also send log lines to syslog. They always go to stdout (/var/log/openvpnas.log).
SYSLOG = False

# Longest single API call, in seconds; always also cut to the time left before the deadline.
CALL_TIMEOUT_SECONDS = 10

# Threads that make the API calls (each call holds one only for its duration), so that a call that
# hangs (a DNS lookup, say) never holds a login past its deadline.
HTTP_THREADS = 8

# Config file read at load; the IVALT_CONFIG environment variable names another one.
CONFIG_PATH = "/usr/local/openvpn_as/etc/ivalt_config.py"

# Access Server reads this: False = post_auth runs in a worker thread. Set from WAIT_MODE below.
SYNCHRONOUS = False

__version__ = "1.0.0"

_PLACEHOLDER_KEY = "<ivalt_secret_key>"
_MAX_BODY = 64 * 1024  # iVALT answers are a few hundred bytes; more is a proxy page or an attack
_MAX_USERNAME = 254  # the longest e-mail address there is
_SHARED_BACKOFF_CAP = 30.0  # a hostile Retry-After must not lock every user out for hours
_PATHS = {
    "lookup": "/get-user-by-email",
    "push": "/biometric-auth-request",
    "poll": "/biometric-geo-fence-auth-results",
}


# -------------------------------------------------------------------------------------------------
# Settings loading and validation (runs once, at load; never raises)
# -------------------------------------------------------------------------------------------------


class Settings:
    """Validated settings: typed attributes plus the list of problems found."""

    def __init__(self):
        self.errors = []
        self.config_file = None  # path actually read, or None
        self.config_path = ""  # path looked for (IVALT_CONFIG, or CONFIG_PATH)
        self.config_note = ""  # what happened with the config file, for doctor


def _describe(value):
    if isinstance(value, str):
        return "text %r" % _clean(value, 40)
    try:
        shown = repr(value)
    except ValueError:  # an int of more than 4,300 digits cannot be shown
        shown = "(too long to show)"
    return "%s %s" % (type(value).__name__, _clean(shown, 40))


def _as_text(name, value):
    if not isinstance(value, str):  # a key given the wrong way is still a key: never shown
        shown = type(value).__name__ if name == "IVALT_SECRET_KEY" else _describe(value)
        raise ValueError("%s must be text in quotes, got %s" % (name, shown))
    return value.strip()


def _as_flag(name, value):
    if not isinstance(value, bool):
        raise ValueError("%s must be True or False, got %s" % (name, _describe(value)))
    return value


def _as_number(low, high):
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError("%s must be a number from %s to %s, got %s" % (name, low, high, _describe(value)))
        return float(value)

    return check


def _as_choice(*choices):
    def check(name, value):
        if value not in choices:
            raise ValueError("%s must be one of %s, got %s" % (name, ", ".join(repr(c) for c in choices), _describe(value)))
        return value

    return check


def _as_names(name, value):
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ValueError('%s must be a list of names in quotes, e.g. ["admin"], got %s' % (name, _describe(value)))
    return [item.strip() for item in value if item.strip()]


_SETTING_CHECKS = {
    "IVALT_SECRET_KEY": _as_text,
    "IVALT_API_URL": _as_text,
    "EMAIL_DOMAIN": _as_text,
    "REQUIRE_FOR_WEB_LOGIN": _as_flag,
    "DEADLINE_SECONDS": _as_number(1, 600),
    "POLL_INTERVAL_SECONDS": _as_number(0.25, 30),
    "FAIL_MODE": _as_choice("closed", "open"),
    "WAIT_MODE": _as_choice("thread", "deferred"),
    "REQUEST_BUDGET_PER_SECOND": _as_number(0.1, 100000),
    "BYPASS_USERS": _as_names,
    "EXEMPT_GROUPS": _as_names,
    "ENFORCED_GROUPS": _as_names,
    "REQUEST_FROM": _as_text,
    "CA_BUNDLE": _as_text,
    "HTTPS_PROXY": _as_text,
    "LOG_LEVEL": _as_choice("info", "debug"),
    "SYSLOG": _as_flag,
    "CALL_TIMEOUT_SECONDS": _as_number(1, 120),
    "HTTP_THREADS": _as_number(1, 64),
}

def _is_loopback(host):
    """Only a loopback address may take plain http. A name is not one, however it starts
    ("127.evil.example"): only "localhost", which every resolver keeps on the machine."""
    import ipaddress

    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_config_file(path):
    """{setting: (value, line number)} from a config file, or raise ValueError with a message for
    the admin.

    The file is only parsed, never executed: it holds `NAME = literal` lines and nothing else,
    so a config file cannot run code as root inside Access Server. It must not be writable by
    anybody but its owner, and the owner must be root (or the user running this script), because
    whoever can write it chooses where logins are verified; the same holds for its folder unless
    that has the sticky bit (as /tmp has).
    """
    try:
        # Non-blocking, so that a FIFO put there cannot hang the load; the checks below are made
        # on the file that was opened, not on whatever the name points to a moment later.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ValueError("config file %s cannot be read: %s" % (path, exc.strerror or exc)) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("config file %s is not a regular file" % path)
        _check_owner("config file", path, info, "chmod 600")
        _check_folders(path)
        try:
            text = handle.read(1024 * 1024).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError("config file %s cannot be read: %s" % (path, exc)) from None
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as exc:
        raise ValueError("config file %s has a syntax error at line %s: %s" % (path, exc.lineno, exc.msg)) from None
    except (ValueError, MemoryError, RecursionError) as exc:  # e.g. a number of 5,000 digits, deep nesting
        raise ValueError("config file %s cannot be parsed: %s" % (path, _clean(exc, 100) or type(exc).__name__)) from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(getattr(node, "value", None), ast.Constant):
            continue  # a docstring or a bare comment string
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if not isinstance(target, ast.Name):
            raise ValueError("config file %s line %d: only NAME = value lines are allowed" % (path, node.lineno))
        if target.id not in _SETTING_CHECKS:
            raise ValueError("config file %s line %d: unknown setting %s" % (path, node.lineno, target.id))
        if target.id in values:  # the last one would win unseen: FAIL_MODE = "closed" ... FAIL_MODE = "open"
            raise ValueError("config file %s line %d: %s is set twice (first on line %d)"
                             % (path, node.lineno, target.id, values[target.id][1]))
        try:
            values[target.id] = (ast.literal_eval(node.value), node.lineno)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # {[]: 1} is a TypeError
            raise ValueError(
                "config file %s line %d: %s must be a plain value (text, number, True/False or a list)"
                % (path, node.lineno, target.id)
            ) from None
    return values


def _check_folders(path):
    """Every folder above the file, as named and as its symlinks resolve: whoever can write one
    (unless it has the sticky bit, as /tmp has) can put another file in its place."""
    seen = set()
    for named in (os.path.abspath(path), os.path.realpath(path)):
        folder = os.path.dirname(named)
        while folder not in seen:
            seen.add(folder)
            try:
                info = os.stat(folder)
            except OSError as exc:
                raise ValueError("config file folder %s cannot be read: %s" % (folder, exc.strerror or exc)) from None
            if not info.st_mode & stat.S_ISVTX:
                _check_owner("config file folder", folder, info, "chmod go-w")
            folder = os.path.dirname(folder)


def _check_owner(what, path, info, fix):
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError("%s %s is writable by group or others: run %s %s" % (what, path, fix, path))
    if info.st_uid not in (0, os.getuid()):
        raise ValueError("%s %s is owned by uid %d, not root: run chown root %s" % (what, path, info.st_uid, path))


def load_settings(inline, environ):
    """Settings from the inline values, the config file and the environment. Never raises: what
    nobody foresaw becomes an error, and every login fails closed on it."""
    try:
        return _load_settings(inline, environ)
    except Exception as exc:  # noqa: BLE001 - the script must load, and then deny, whatever happened
        settings = Settings()
        for name in _SETTING_CHECKS:
            setattr(settings, name.lower(), None)
        settings.key_configured, settings.api_host = False, ""
        settings.errors.append("the settings could not be loaded (%s: %s)" % (type(exc).__name__, _clean(exc, 120)))
        return settings


def _load_settings(inline, environ):
    settings = Settings()
    values = dict((name, inline.get(name)) for name in _SETTING_CHECKS)
    origin = {}  # setting -> where its value comes from, when not from the script itself
    path = environ.get("IVALT_CONFIG") or inline.get("CONFIG_PATH") or ""
    settings.config_path = path
    if path and (environ.get("IVALT_CONFIG") or os.path.exists(path)):
        try:
            for name, (value, line) in _read_config_file(path).items():
                values[name], origin[name] = value, " (line %d of %s)" % (line, path)
            settings.config_file = path
            settings.config_note = "read %s" % path
        except ValueError as exc:
            settings.errors.append(str(exc))
            settings.config_note = str(exc)
    else:
        settings.config_note = "no config file at %s (using the values in the script)" % (path or "(none)")
    for name in ("IVALT_SECRET_KEY", "IVALT_API_URL"):
        if environ.get(name):
            values[name], origin[name] = environ[name], " (from the environment variable %s)" % name
    for name, check in _SETTING_CHECKS.items():
        try:
            setattr(settings, name.lower(), check(name, values[name]))
        except ValueError as exc:
            settings.errors.append(str(exc) + origin.get(name, ""))
            try:  # keep the script's own value, so the rest of the checks can still run
                setattr(settings, name.lower(), check(name, inline.get(name)))
            except ValueError:
                setattr(settings, name.lower(), None)
    _check_relations(settings)
    return settings


def _check_relations(settings):
    """Checks that concern a setting's meaning, not only its type."""
    problems = settings.errors
    key = settings.ivalt_secret_key
    settings.key_configured = bool(key) and key != _PLACEHOLDER_KEY and not (key.startswith("<") and key.endswith(">"))
    if key is not None and not settings.key_configured:
        problems.append("IVALT_SECRET_KEY is not configured (still empty or the placeholder)")
    elif key and not re.match(r"^[\x21-\x7e]+$", key):
        problems.append("IVALT_SECRET_KEY contains spaces or characters that cannot go in an HTTP header")
    url = settings.ivalt_api_url
    if url is not None:
        url = url.rstrip("/")
        settings.ivalt_api_url = url
        match = re.match(r"^(https?)://(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?(/[A-Za-z0-9._~/-]*)?$", url)
        if not match:
            problems.append("IVALT_API_URL %r is not a valid https:// URL" % _clean(_safe_url(url), 80))
        elif match.group(1) == "http" and not _is_loopback(match.group(2)):
            problems.append("IVALT_API_URL must use https:// (plain http:// only for a loopback test server)")
        settings.api_host = match.group(2).strip("[]").lower() if match else ""
    if settings.https_proxy and not re.match(r"^https?://[^\s/]+(:\d{1,5})?/?$", settings.https_proxy):
        problems.append("HTTPS_PROXY %r must look like http://proxy.example.com:3128" % _clean(_safe_url(settings.https_proxy), 80))
    if settings.ca_bundle and not os.path.isfile(settings.ca_bundle):
        problems.append("CA_BUNDLE %s is not a readable file" % _clean(settings.ca_bundle, 200))
    if settings.email_domain and not re.match(r"^[A-Za-z0-9.-]+\.[A-Za-z]{2,}$", settings.email_domain.lstrip("@")):
        problems.append("EMAIL_DOMAIN %r is not a domain name like example.com" % _clean(settings.email_domain, 80))
    elif settings.email_domain:
        settings.email_domain = settings.email_domain.lstrip("@").lower()
    if settings.deadline_seconds is not None and settings.poll_interval_seconds is not None:
        if settings.poll_interval_seconds >= settings.deadline_seconds:
            problems.append("POLL_INTERVAL_SECONDS must be shorter than DEADLINE_SECONDS")
    if settings.http_threads is not None:
        settings.http_threads = int(settings.http_threads)
    for name in settings.bypass_users or []:
        if not name.isascii():
            problems.append("BYPASS_USERS entry %r is not plain ASCII: it would never match" % _clean(name, 40))


# -------------------------------------------------------------------------------------------------
# Text hygiene: everything that reaches a log line or a reason goes through here
# -------------------------------------------------------------------------------------------------

# Control characters (a newline could forge a log line), invisible formatting characters (an id
# that looks like another: zero-width, bidi overrides, BOM, soft hyphen) and lone surrogates (they
# cannot be written out, so the whole log line would be lost).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")
_PHONE = re.compile(r"\+?\d(?:[ ()-]{0,2}\d){6,}")  # also "+1 (555) 123-0001"
_SECRETS = []  # the API key and the proxy password, filled in at load: never in a log line or reason


def _clean(text, limit=200):
    """Printable, bounded text: control characters (a newline could forge a log line) removed."""
    text = _CONTROL.sub("", str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mask_mobile(text):
    """Every phone-number-like run of digits in text, masked but for its last 2 digits."""
    return _PHONE.sub(lambda m: re.sub(r"\d", "*", m.group(0)[:-2]) + m.group(0)[-2:], text)


def _scrub(text):
    """Text for a log line, a reason or the console: no secret, no full phone number. Secrets go
    first: masking digits first could cut a key in two and leave both halves readable."""
    for secret in _SECRETS:
        text = text.replace(secret, "[secret]")
    return mask_mobile(text)


def _proxy_password(url):
    match = re.match(r"^[a-z]+://[^/@:]*:([^/@]*)@", url or "")
    return match.group(1) if match else None


def _safe_url(url):
    """A proxy URL for display: user:password@host shows as user:***@host."""
    return re.sub(r"^([a-z]+://[^/@:]*):[^/@]*@", r"\1:***@", url or "")


def mask_email(email):
    local, _, domain = str(email).partition("@")
    return _clean("%s***%s" % (local[:2], "@" + domain if domain else ""), 80)


# =================================================================================================
# Outcome vocabulary: every login ends in exactly one of these.
# =================================================================================================

APPROVED = "approved"
DENIED = "denied"  # the user said no, or a policy other than time window / geofence refused
TIMED_OUT = "timed_out"  # the user did not answer before the deadline
TIMEZONE = "invalid_timezone"
GEOFENCE = "invalid_geofence"
NOT_ENROLLED = "not_enrolled"
BAD_KEY = "bad_key"  # the API gateway refused our key
UNAVAILABLE = "unavailable"  # outage: network error, timeout, 5xx, non-JSON
THROTTLED = "throttled"
UNEXPECTED = "unexpected"  # the API answered something we cannot interpret
BUSY = "busy"  # another login of the same iVALT user is already waiting
INVALID_USER = "invalid_user"
CONFIG_ERROR = "config_error"
INTERNAL_ERROR = "internal_error"

# What the user sees (client_reason). Short and fixed: never a raw body or internal detail.
_CLIENT_REASON = {
    DENIED: "AUTHENTICATION_FAILED",
    TIMED_OUT: "AUTHENTICATION_FAILED",
    INVALID_USER: "AUTHENTICATION_FAILED",
    TIMEZONE: "INVALID_TIMEZONE",
    GEOFENCE: "INVALID_GEOFENCE",
    BAD_KEY: "SERVICE_MISCONFIGURED",
    CONFIG_ERROR: "SERVICE_MISCONFIGURED",
    UNAVAILABLE: "SERVICE_UNAVAILABLE",
    THROTTLED: "SERVICE_UNAVAILABLE",
    UNEXPECTED: "SERVICE_UNAVAILABLE",
    INTERNAL_ERROR: "SERVICE_UNAVAILABLE",
    BUSY: "LOGIN_ALREADY_IN_PROGRESS",
}

# Outcomes that are the user's or the policy's answer (check command: exit 1); the rest exit 2.
USER_OUTCOMES = (DENIED, TIMED_OUT, TIMEZONE, GEOFENCE, NOT_ENROLLED, BUSY, INVALID_USER)


class Verdict:
    """How one verification ended. `detail` is for the server log, `client_text` for the user."""

    def __init__(self, outcome, detail="", client_text=None, fail_open_eligible=False):
        self.outcome = outcome
        self.detail = detail
        self.client_text = client_text or _CLIENT_REASON.get(outcome, "AUTHENTICATION_FAILED")
        # True only for an outage met before any answer from iVALT about this login
        self.fail_open_eligible = fail_open_eligible

    def __repr__(self):
        return "Verdict(%s, %r)" % (self.outcome, self.detail)


# =================================================================================================
# Pure classification of API answers: (HTTP status, headers, body) -> Answer. No I/O here.
# =================================================================================================

MOBILE = "mobile"  # lookup found the user's mobile
SENT = "sent"  # push accepted
PENDING = "pending"  # the user has not answered yet


class TransportError:
    """A call that got no HTTP answer. `sent` is False only when the request provably never left."""

    def __init__(self, kind, detail="", sent=True, tls=False):
        self.kind = kind
        self.detail = detail
        self.sent = sent
        self.tls = tls


class Reply:
    """What a driver hands back to the flow for one Call."""

    def __init__(self, status=None, headers=None, body=b"", error=None, elapsed=0.0):
        self.status = status
        self.headers = dict((k.lower(), v) for k, v in (headers or {}).items())
        self.body = body
        self.error = error
        self.elapsed = elapsed


class Answer:
    """The meaning of one reply. `final`: the attempt ends now; otherwise it may be retried."""

    def __init__(self, kind, detail="", final=True, value=None, fail_open=False):
        self.kind = kind
        self.detail = detail
        self.final = final
        self.value = value  # the mobile (lookup) or the Retry-After seconds (throttled)
        self.fail_open = fail_open  # an outage that FAIL_MODE "open" may let through

    def __repr__(self):
        return "Answer(%s, %r)" % (self.kind, self.detail)


_NOT_JSON = object()


def _parse_json(body):
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):  # 50,000 "[" is a RecursionError
        return _NOT_JSON


def _snippet(reply):
    kind = _clean(reply.headers.get("content-type", "no content type").split(";")[0], 40)
    text = _clean(_untag(reply.body[:600].decode("utf-8", "replace")), 80)
    return "%s: %s" % (kind, text) if text else kind


def _error_detail(body):
    """error.detail as text (it may be a list of validation errors), or None without an envelope."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None
    detail = error.get("detail")
    if isinstance(detail, list):  # validation errors: their messages, not what they echo back
        detail = "; ".join(item if isinstance(item, str) else str(item.get("msg", "(validation error)"))
                           if isinstance(item, dict) else "(validation error)" for item in detail[:5])
    if not isinstance(detail, str) or not detail.strip():
        detail = error.get("title") if isinstance(error.get("title"), str) else "(no detail given)"
    return _clean(_untag(detail), 200)


def _untag(text):
    """Markup is noise in a log line, and a hazard wherever a reason is shown as HTML."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]*>?", " ", text)).strip()


def parse_retry_after(value):
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), or None."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if re.match(r"^[0-9]{1,10}$", value):  # not str.isdigit(): "²" is a digit to it
        return min(float(value), 86400.0)
    try:
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except Exception:  # noqa: BLE001 - any unreadable date is "not given"
        return None


def _outage_or_gateway(reply):
    """The answers every endpoint shares: no HTTP answer, throttling, redirects, 5xx, non-JSON,
    and the gateway's own refusals (which have no iVALT envelope). None for an application answer."""
    error = reply.error
    if error is not None:
        detail = error.kind + (" (%s)" % error.detail if error.detail else "")
        # A TLS failure may be an attacker in the path: never a reason to fail open, and it will
        # not clear by retrying.
        return Answer(UNAVAILABLE, detail, final=error.tls, fail_open=not error.tls)
    status = reply.status
    if status == 429:
        seconds = parse_retry_after(reply.headers.get("retry-after"))
        return Answer(THROTTLED, "throttled (HTTP 429)", final=False, value=seconds)
    if 300 <= status < 400:
        # Not followed: the key goes to the configured host only. Not an outage either (the host
        # answered): with a mistyped IVALT_API_URL that redirects, FAIL_MODE "open" must not
        # let every login through.
        target = _clean(re.sub(r"^[a-z]+://([^/?#]*).*$", r"\1", reply.headers.get("location", "?")), 80)
        return Answer(UNAVAILABLE, "HTTP %d redirect to %s, not followed" % (status, target), final=False)
    if status >= 500:
        return Answer(UNAVAILABLE, "HTTP %d (%s)" % (status, _snippet(reply)), final=False, fail_open=True)
    body = _parse_json(reply.body)
    if status in (401, 403) and _error_detail(body) is None:
        return Answer(BAD_KEY, "HTTP %d from the API gateway without an iVALT answer (%s): the API key was "
                      "refused" % (status, _snippet(reply)))
    if body is _NOT_JSON:
        return Answer(UNAVAILABLE, "HTTP %d with a non-JSON body (%s)" % (status, _snippet(reply)), final=False,
                      fail_open=True)
    if not isinstance(body, dict):
        return Answer(UNEXPECTED, "HTTP %d with JSON that is not an object" % status, final=False)
    return None


def _data(body):
    data = body.get("data")
    return data if isinstance(data, dict) else None


_MOBILE_SHAPE = re.compile(r"^\+?[0-9]{6,15}$")


def classify_lookup(reply):
    """POST /get-user-by-email -> MOBILE (value = mobile), NOT_ENROLLED, or a shared answer."""
    shared = _outage_or_gateway(reply)
    if shared is not None:
        return shared
    body = _parse_json(reply.body)
    if reply.status == 200:
        details = (_data(body) or {}).get("details")
        mobile = details.get("mobile_with_country_code") if isinstance(details, dict) else None
        if isinstance(mobile, str) and _MOBILE_SHAPE.match(mobile.strip()):
            return Answer(MOBILE, value=mobile.strip())
        return Answer(UNEXPECTED, "the user lookup answered 200 without a usable mobile number", final=False)
    detail = _error_detail(body)
    if detail is not None and reply.status in (400, 404, 422):
        return Answer(NOT_ENROLLED, detail)
    if detail is not None and 400 <= reply.status < 500:
        return Answer(UNEXPECTED, "the user lookup was refused: HTTP %d %s" % (reply.status, detail))
    return Answer(UNEXPECTED, "the user lookup answered HTTP %d without an iVALT answer" % reply.status, final=False)


def classify_push(reply):
    """POST /biometric-auth-request -> SENT, NOT_ENROLLED (no device), or a shared answer."""
    shared = _outage_or_gateway(reply)
    if shared is not None:
        return shared
    body = _parse_json(reply.body)
    if reply.status == 200:
        data = _data(body)
        if data is not None and data.get("status") is False:
            return Answer(UNEXPECTED, "the push was refused: %s" % _clean(data.get("message", "status false"), 120))
        if data is None or body.get("error"):
            # Not the confirmation iVALT sends. It may still have reached the phone, so the flow
            # will not send it again; polling a push that perhaps never went out would only make
            # the user wait for the deadline, so the login ends here.
            return Answer(UNEXPECTED, "the push answered 200 without a confirmation", final=False)
        return Answer(SENT)
    detail = _error_detail(body)
    if detail is not None and reply.status == 404:
        return Answer(NOT_ENROLLED, detail)
    if detail is not None:
        return Answer(UNEXPECTED, "the push was refused: HTTP %d %s" % (reply.status, detail))
    return Answer(UNEXPECTED, "the push answered HTTP %d without an iVALT answer" % reply.status)


def classify_poll(reply):
    """POST /biometric-geo-fence-auth-results -> APPROVED, PENDING, DENIED, TIMEZONE, GEOFENCE, or
    a shared answer. A 403 *with* an iVALT error is a policy answer; without one, a key problem."""
    shared = _outage_or_gateway(reply)
    if shared is not None:
        return shared
    body = _parse_json(reply.body)
    detail = _error_detail(body)
    status = reply.status
    if status == 200:
        data = _data(body)
        if data is not None and not body.get("error") and data.get("status", True) is True:  # error: null on success
            return Answer(APPROVED)
        return Answer(UNEXPECTED, "the result poll answered 200 without an approval in it", final=False)
    if status == 401 or (detail or "").lower().startswith("denied"):
        return Answer(DENIED, "the user denied the request (%s)" % (detail or "HTTP 401"))
    if status == 403:
        lowered = detail.lower()
        if "timezone" in lowered:
            return Answer(TIMEZONE, "approved outside the user's time window (%s)" % detail)
        if "geofenc" in lowered:
            return Answer(GEOFENCE, "approved outside the user's geofence (%s)" % detail)
        return Answer(DENIED, "refused by iVALT policy (%s)" % detail)
    if status == 422 or (status == 404 and detail is not None):
        return Answer(PENDING)  # iVALT says "mobile number not found" until the user answers
    return Answer(UNEXPECTED, "the result poll answered HTTP %d (%s)" % (status, detail or "no iVALT answer"),
                  final=False)


_CLASSIFY = {"lookup": classify_lookup, "push": classify_push, "poll": classify_poll}


# =================================================================================================
# Shared state of one loaded script: the request budget and the one-waiting-login-per-user guard.
# =================================================================================================


class RequestGate:
    """The process-wide request budget (GCRA): at most `rate` requests a second plus a burst, in
    arrival order, and a shared pause after a 429. It only hands out times; callers do the waiting,
    so it serves blocking threads and reactor timers alike."""

    def __init__(self, rate, burst=5):
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._theoretical = 0.0
        self.blocked_until = 0.0
        self._lock = threading.Lock()

    def reserve(self, now, latest):
        """The time at which the caller may send one request, or None if that is after `latest`."""
        with self._lock:
            return self._book(now, latest)

    def reserve_pair(self, now, latest):
        """Times for two requests that must follow each other closely, or None: a push and its
        first poll, which must come before the user can answer however long the queue is (an
        approval counts only once this push was seen pending). The second is None if it would
        fall after `latest`."""
        with self._lock:
            first = self._book(now, latest)
            return None if first is None else (first, self._book(first, latest))

    def _book(self, now, latest):
        start = max(now, self._theoretical - self._tolerance, self.blocked_until)
        if start > latest:
            return None
        self._theoretical = max(self._theoretical, start) + self._interval
        return start

    def pause_until(self, until):
        with self._lock:
            self.blocked_until = max(self.blocked_until, until)


class WaitingLogins:
    """At most one login per iVALT user (mobile) waits for a result at a time.

    The API identifies a result by mobile alone: two logins of one user waiting at once would
    both be let in by one approval, so an attacker who knows the password could ride on the real
    user's approval. Per process only: separate Access Server nodes do not share this."""

    def __init__(self):
        self._holders = {}
        self._lock = threading.Lock()

    def claim(self, mobile, login_id):
        """None when claimed; otherwise the id of the login already waiting."""
        with self._lock:
            holder = self._holders.get(mobile)
            if holder is None:
                self._holders[mobile] = login_id
            return holder

    def release(self, mobile, login_id):
        with self._lock:
            if self._holders.get(mobile) == login_id:
                del self._holders[mobile]


# =================================================================================================
# The verification flow: one generator for both drivers. It yields Call (the driver performs it
# and sends back a Reply) and Sleep (the driver waits and sends back None), reads the time only
# through `clock`, and returns a Verdict.
# =================================================================================================


class Call:
    def __init__(self, step, payload, timeout):
        self.step = step
        self.payload = payload
        self.timeout = timeout


class Sleep:
    def __init__(self, seconds):
        self.seconds = max(0.0, seconds)


class Attempt:
    """One login's verification: identity, deadline and what happened, for logs and the CLI."""

    def __init__(self, email, started, deadline, login_id=None):
        self.email = email
        self.started = started
        self.deadline = deadline
        self.id = login_id or new_login_id()
        self.calls = 0
        self.pushes = 0  # pushes that may have reached the phone (not counting refused or throttled ones)
        self.step = None  # the call under way, or the last one made
        self.first_poll_slot = None  # budget slot booked with the push for the first poll
        self.user_reached = False  # iVALT said "pending" at least once: the question is with the user
        self.push_confirmed = False  # iVALT confirmed the push: no outage after this lets anyone in
        self.throttles = 0  # 429s met: each makes the next wait longer
        self.steps = []  # (step, Answer, seconds) per call, for the debug log and the CLI summary


_ID_LETTERS = "abcdefghjkmnpqrstuvwxyz"  # letters only, so the phone-number mask never touches an id


def new_login_id():
    # One read of the system's random source, not one per letter as secrets.choice makes: each
    # read lets the HTTP threads take the GIL, and with 200 logins dispatched at once on the
    # reactor those reads cost 0.17 s. A correlation id must be unique, not secret, so the
    # slight modulo bias does not matter.
    return "".join(_ID_LETTERS[byte % len(_ID_LETTERS)] for byte in secrets.token_bytes(10))


def verify(attempt, settings, gate, waiting, clock, observe=None):
    """Look the user up, send one push, poll until an answer or the deadline. Returns a Verdict."""
    observe = observe or (lambda attempt, step, answer: None)
    lookup = yield from _ask(attempt, settings, gate, clock, observe, "lookup", {"email": attempt.email})
    if lookup.kind != MOBILE:
        return _verdict_for(lookup, attempt, stage="lookup")
    mobile = lookup.value
    holder = waiting.claim(mobile, attempt.id)
    if holder is not None:
        return Verdict(BUSY, "another login of this user (id=%s) is already waiting for approval" % holder)
    try:
        payload = {"mobile": mobile}
        if settings.request_from:
            payload["requestFrom"] = settings.request_from
        push = yield from _ask(attempt, settings, gate, clock, observe, "push", payload)
        if push.kind != SENT:
            return _verdict_for(push, attempt, stage="push")
        attempt.push_confirmed = True
        return (yield from _poll(attempt, settings, gate, clock, observe, mobile))
    finally:
        waiting.release(mobile, attempt.id)


def _call(attempt, settings, gate, clock, step, payload):
    """Wait for a slot in the shared budget, then one Call. None when the deadline leaves no room.
    A push books its first poll with it (attempt.first_poll_slot); that poll uses the slot."""
    latest = attempt.deadline - 0.05
    booked = attempt.first_poll_slot if step == "poll" else None
    attempt.first_poll_slot = None  # used now, or wasted (the push failed or is sent again)
    while True:
        now = clock()
        if booked is not None:  # keeps its place; waits out a 429 pause that came meanwhile
            slot = max(booked, gate.blocked_until)
        elif step == "push":
            slot, attempt.first_poll_slot = gate.reserve_pair(now, latest) or (None, None)
        else:
            slot = gate.reserve(now, latest)
        if slot is None or slot > latest:
            return None
        if slot > now:
            yield Sleep(slot - now)
            if gate.blocked_until > clock():
                continue  # a 429 arrived while this login waited: queue again behind the pause
        break
    left = attempt.deadline - clock()
    if left <= 0.05:
        return None
    attempt.calls += 1
    attempt.step = step
    reply = yield Call(step, payload, min(settings.call_timeout_seconds, left))
    if step == "push" and reply.status != 429 and (reply.error is None or reply.error.sent):
        attempt.pushes += 1  # this one may have reached the phone
    return reply


def _ask(attempt, settings, gate, clock, observe, step, payload):
    """The lookup or the push, retried on outages while time is left. A push that may have reached
    the phone is never sent again: only one that provably never left (refused, DNS, connect
    timeout) or was throttled is."""
    last = None
    pause = settings.poll_interval_seconds
    while True:
        sent_at = clock()
        reply = yield from _call(attempt, settings, gate, clock, step, payload)
        if reply is None:
            return last or _no_time_left(attempt, gate, step)
        answer = _CLASSIFY[step](reply)
        attempt.steps.append((step, answer, clock() - sent_at))
        observe(attempt, step, answer)
        if answer.kind == THROTTLED:
            stop = _throttle(attempt, gate, clock, answer)
            if stop is not None:
                return stop
            last = answer
            continue
        if answer.final or answer.kind in (MOBILE, SENT):
            return answer
        if step == "push" and (reply.error is None or reply.error.sent):
            answer.final = True
            answer.detail += "; the push may have reached the phone, so it is not sent again"
            return answer
        last = answer
        yield Sleep(min(pause, attempt.deadline - clock()))
        pause = min(pause * 2, 5.0)


def _no_time_left(attempt, gate, step):
    if gate.blocked_until >= attempt.deadline - 0.05:  # another login's 429 paused every login
        return Answer(THROTTLED, "throttled: the pause after an HTTP 429 lasts past the deadline, no %s made" % step)
    return Answer(TIMED_OUT, "no time left for the %s before the deadline" % step)


def _throttle(attempt, gate, clock, answer):
    """Share a 429 with every waiting login. An Answer when the wait would pass the deadline.
    Whatever Retry-After says, each login waits at least 0.5 s, doubling with every 429 it meets
    (up to 4 s): "Retry-After: 0" once made one login send 126 requests."""
    floor = min(0.5 * 2 ** attempt.throttles, 4.0)
    attempt.throttles += 1
    wait = max(answer.value if answer.value is not None else 2.0, floor)
    gate.pause_until(clock() + min(wait, _SHARED_BACKOFF_CAP))
    if clock() + wait >= attempt.deadline:
        return Answer(THROTTLED, "throttled by the API (HTTP 429, Retry-After %s: the next try, %gs away, would "
                      "pass the deadline)" % ("%g s" % answer.value if answer.value is not None else "not given", wait))
    return None


def _poll(attempt, settings, gate, clock, observe, mobile):
    """Poll the result until approved, a definite answer, or the deadline."""
    last_fault = None
    next_poll = clock()  # the first poll right after the push is accepted
    while True:
        if next_poll > clock():
            if next_poll >= attempt.deadline:
                break
            yield Sleep(next_poll - clock())
        sent_at = clock()
        reply = yield from _call(attempt, settings, gate, clock, "poll", {"mobile": mobile})
        if reply is None:
            if last_fault is None and gate.blocked_until >= attempt.deadline - 0.05:
                last_fault = _no_time_left(attempt, gate, "poll")
            break
        answer = classify_poll(reply)
        if answer.kind == APPROVED and not attempt.user_reached:
            # The API names no request, only the mobile: an approval seen before iVALT has called
            # this push pending may be left over from an earlier login. Do not take it for this one.
            answer = Answer(UNEXPECTED, "an approval came before iVALT reported this request as pending (it may be "
                            "left from an earlier request), not accepted", final=False)
        attempt.steps.append(("poll", answer, clock() - sent_at))
        observe(attempt, "poll", answer)
        if answer.kind == APPROVED:
            if clock() > attempt.deadline:
                return Verdict(TIMED_OUT, "the approval arrived after the %gs deadline" % settings.deadline_seconds)
            return Verdict(APPROVED, "approved on the phone")
        if answer.kind == PENDING:
            attempt.user_reached, last_fault = True, None
        elif answer.kind == THROTTLED:
            stop = _throttle(attempt, gate, clock, answer)
            if stop is not None:
                return _verdict_for(stop, attempt, stage="poll")
            last_fault = answer
        elif answer.final:
            return _verdict_for(answer, attempt, stage="poll")
        else:
            last_fault = answer
        next_poll = sent_at + settings.poll_interval_seconds
        if next_poll > attempt.deadline - 0.3 > sent_at + 0.1:
            next_poll = attempt.deadline - 0.3  # one last look just before the deadline
    if last_fault is not None:
        verdict = _verdict_for(last_fault, attempt, stage="poll")
        # iVALT confirmed the push: it was reachable, and the question is with the user, who may
        # have said no. An outage now is no reason to let anyone in, whatever FAIL_MODE says.
        verdict.fail_open_eligible = False
        if verdict.outcome == UNAVAILABLE:
            verdict.detail = "the service stopped answering after the push was sent: " + verdict.detail
        return verdict
    return Verdict(TIMED_OUT, "the user did not answer within %gs" % settings.deadline_seconds)


def _verdict_for(answer, attempt, stage):
    """The Verdict for a non-approving Answer at a given stage."""
    kind = answer.kind
    if kind in (MOBILE, SENT, PENDING):  # cannot end an attempt; here only by a bug
        return Verdict(INTERNAL_ERROR, "the %s ended without an answer" % stage)
    if kind == NOT_ENROLLED:
        # The user sees a text of ours, never the API's own (which could carry anything, HTML included).
        return Verdict(NOT_ENROLLED, "user not enrolled in iVALT: %s" % answer.detail,
                       client_text=_clean("The email provided (%s) was not found" % attempt.email, 160))
    if kind == BAD_KEY:
        return Verdict(BAD_KEY, "%s during the %s" % (answer.detail, stage))
    if kind in (UNAVAILABLE, THROTTLED, UNEXPECTED):
        label = {UNAVAILABLE: "iVALT service unavailable", THROTTLED: "iVALT service throttled",
                 UNEXPECTED: "unexpected iVALT answer"}[kind]
        return Verdict(kind, "%s during the %s: %s" % (label, stage, answer.detail),
                       fail_open_eligible=answer.fail_open)
    return Verdict(kind, answer.detail)


# =================================================================================================
# Drivers: they perform the flow's Calls and Sleeps. The HTTP client is shared by both.
# =================================================================================================


def _exception_chain(exc):
    seen = []
    while exc is not None and exc not in seen and len(seen) < 10:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__ or next((a for a in getattr(exc, "args", ()) if isinstance(a, BaseException)), None)
    return seen


def describe_transport_error(exc):
    """A TransportError (fault class, short detail, whether the request may have left) for an
    exception from requests / urllib3 / the socket layer."""
    chain = _exception_chain(exc)
    text = " ".join("%s %s" % (type(e).__name__, e) for e in chain)
    names = " ".join(type(e).__name__ for e in chain)
    if "SSLError" in names or "CERTIFICATE_VERIFY_FAILED" in text or "SSL" in names:
        if re.search(r"hostname|doesn't match|does not match|IP address mismatch", text, re.I):
            return TransportError("TLS hostname mismatch", sent=False, tls=True)
        if re.search(r"CERTIFICATE_VERIFY_FAILED|self.signed|unable to get local issuer|certificate verify", text, re.I):
            return TransportError("TLS certificate not trusted", sent=False, tls=True)
        return TransportError("TLS error", _clean(text, 120), sent=False, tls=True)
    if "ProxyError" in names:
        return TransportError("proxy error", _clean(str(chain[-1]), 120), sent=False)
    if re.search(r"NameResolution|Name or service not known|nodename nor servname|Temporary failure in name "
                 r"resolution|No address associated|getaddrinfo failed|Failed to resolve", text):
        return TransportError("DNS lookup failed", sent=False)
    if "ConnectTimeout" in names or ("ConnectTimeoutError" in names):
        return TransportError("connect timeout", sent=False)
    if "ReadTimeout" in names or "timed out" in text or "timeout" in names.lower():
        return TransportError("read timeout", sent=True)
    if "ConnectionRefused" in names or "Connection refused" in text:
        return TransportError("connection refused", sent=False)
    if re.search(r"IncompleteRead|ChunkedEncodingError|ProtocolError|RemoteDisconnected|Connection aborted|"
                 r"Connection reset|BrokenPipe|ConnectionResetError", text + " " + names):
        return TransportError("connection closed", sent=True)
    return TransportError("HTTP client error", _clean(type(exc).__name__, 60), sent=True)


class ApiClient:
    """Performs one Call as a POST to the API. Never raises: faults come back as Reply.error.

    One requests.Session for the whole process, so polls reuse a kept-alive TLS connection.
    Redirects are not followed (the key must go to the configured host only), automatic retries
    are off (a push must never be re-sent behind our back), proxies come only from HTTPS_PROXY,
    and every wait on the socket is cut to the time left."""

    def __init__(self, settings):
        self.settings = settings
        self._session = None
        self._lock = threading.Lock()

    def session(self):
        with self._lock:
            if self._session is None:
                session = requests.Session()
                session.trust_env = False  # no proxy or CA bundle from the environment by surprise
                adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=64, max_retries=0)
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                self._session = session
            return self._session

    def close(self):
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    def perform(self, call, clock=time.monotonic):
        settings = self.settings
        started = clock()
        ends = started + call.timeout
        response = None
        try:
            response = self.session().post(
                settings.ivalt_api_url + _PATHS[call.step],
                json=call.payload,
                headers={
                    "x-api-key": settings.ivalt_secret_key,
                    "Accept": "application/json",
                    "Accept-Encoding": "identity",  # no decompression bombs; bodies are tiny
                    "User-Agent": "ivalt-openvpn-as/%s" % __version__,
                },
                timeout=(min(5.0, call.timeout), call.timeout),
                allow_redirects=False,
                stream=True,
                verify=settings.ca_bundle or True,
                proxies={"https": settings.https_proxy, "http": settings.https_proxy} if settings.https_proxy else {},
            )
            body = _read_body(response, ends, clock)
            if isinstance(body, TransportError):
                return Reply(response.status_code, response.headers, b"", body, clock() - started)
            return Reply(response.status_code, response.headers, body, None, clock() - started)
        except Exception as exc:  # noqa: BLE001 - every fault is an answer to classify, never a crash
            return Reply(error=describe_transport_error(exc), elapsed=clock() - started)
        finally:
            if response is not None:
                response.close()


def _response_socket(response):
    """The socket under a streamed response (urllib3 1.x and 2.x), to cut its timeout; or None."""
    for path in (("raw", "_connection", "sock"), ("raw", "_fp", "fp", "raw", "_sock")):
        obj = response
        for attribute in path:
            obj = getattr(obj, attribute, None)
        if obj is not None and hasattr(obj, "settimeout"):
            return obj
    return None


def _read_body(response, ends, clock):
    """The body, read under the call's own deadline and size cap (a slow drip or a 10 MB page
    must not hold the login), or a TransportError."""
    raw = response.raw
    read1 = getattr(raw, "read1", None) or getattr(getattr(raw, "_fp", None), "read1", None)
    sock = _response_socket(response)
    chunks, size = [], 0
    while True:
        left = ends - clock()
        if left <= 0:
            return TransportError("read timeout", "the body did not arrive in time", sent=True)
        if sock is not None:
            try:
                sock.settimeout(left)
            except OSError:
                pass
        chunk = read1(16384) if read1 is not None else raw.read(16384)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > _MAX_BODY:
            return TransportError("response too large", "more than %d KiB" % (_MAX_BODY // 1024), sent=True)
        chunks.append(chunk)


_CALL_GRACE = 0.5  # seconds past a call's own timeout before a driver gives up waiting for it


def _close(flow):
    """End the flow (its `finally` clauses run). The login's verdict is already decided: a flow
    that fails even to close is logged, and does not take the verdict with it."""
    try:
        flow.close()
    except Exception as exc:  # noqa: BLE001 - a bug in the flow's cleanup
        _log("warning", "internal error while ending a login", detail=_clean(repr(exc), 160))


def _reply_of(future):
    """The Reply of a finished call. perform() does not raise; if it did, that is a transport error.
    exception() before result(): result() would raise it, and its traceback would tie the
    caller's frame and the future into a reference cycle."""
    failure = future.exception()
    return future.result() if failure is None else Reply(error=describe_transport_error(failure))


def _internal_error(text):
    """The verdict of a bug (in the flow, a driver or Twisted): the login fails closed, and says why."""
    return Verdict(INTERNAL_ERROR, "internal error: %s" % _clean(text, 160))


def _unfinished(call):
    """What a driver hands the flow for a call it gave up waiting for: an outage like any other."""
    return Reply(error=TransportError("call did not finish", "within %.1fs (a DNS lookup that hangs?)"
                                      % (call.timeout + _CALL_GRACE)))


def run_blocking(flow, perform, sleep=time.sleep, executor=None):
    """Drive the flow in the calling thread (Access Server worker thread, command line). With an
    `executor`, each call runs there and is given up _CALL_GRACE after its timeout: requests
    cannot bound a DNS lookup, and the worker thread must not outlive the deadline."""
    value = None
    try:
        while True:
            try:
                effect = flow.send(value)
                future = None
                if isinstance(effect, Call):
                    if executor is not None:
                        future = executor.submit(perform, effect)
                elif not isinstance(effect, Sleep):
                    raise TypeError("the flow yielded a %s" % type(effect).__name__)
            except StopIteration:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug in the flow still ends the login, closed and logged
                return _internal_error(repr(exc))
            if isinstance(effect, Sleep):
                sleep(effect.seconds)
                value = None
            elif future is None:
                value = perform(effect)
            else:
                try:
                    future.exception(timeout=effect.timeout + _CALL_GRACE)  # waits; raises if not done
                except Exception:  # noqa: BLE001 - not done in time: no answer to this call
                    future.cancel()  # if it is still queued behind other logins' calls, it never runs
                    value = _unfinished(effect)
                else:
                    value = _reply_of(future)
    except StopIteration as stop:
        return stop.value
    finally:
        _close(flow)


def run_deferred(flow, perform, executor, hard_stop, on_timeout, reactor=None):
    """Drive the flow from the Twisted reactor: waits are reactor timers and each API call runs
    briefly in `executor`, so a waiting user holds no thread and the reactor never blocks. As in
    run_blocking, a call is given up _CALL_GRACE after its timeout and the flow goes on; and
    `hard_stop` seconds from now the Deferred fires with on_timeout() whatever a call is doing."""
    return _ReactorDriver(flow, perform, executor, hard_stop, on_timeout, reactor).result


class _ReactorDriver:
    """run_deferred's state for one login. When the login ends it drops its timers and its flow,
    so nothing it built is left in a reference cycle: refcounting frees each login at once,
    instead of leaving hundreds of them to Access Server's garbage collector, whose full
    collections stop the reactor."""

    def __init__(self, flow, perform, executor, hard_stop, on_timeout, reactor=None):
        from twisted.internet.defer import Deferred

        if reactor is None:
            from twisted.internet import reactor
        self.reactor, self.flow, self.perform, self.executor = reactor, flow, perform, executor
        self.on_timeout = on_timeout
        self.result = Deferred()
        self.done = False
        self.pending = self.call = None  # the future of the call the flow waits for, and that call
        self.watchdog = reactor.callLater(max(0.0, hard_stop), self.expire)
        # The flow starts on the next reactor turn, not inside post_auth: when many logins arrive
        # in one turn, the first ones' API calls would otherwise already compete (requests works
        # under the same GIL) with the reactor while it is still dispatching the others.
        self.timer = reactor.callLater(0, self.advance, None)

    def expire(self):
        self.watchdog = None  # it has fired
        if self.done:
            return
        try:
            verdict = self.on_timeout()
        except Exception as exc:  # noqa: BLE001 - the hard stop must end the login whatever
            verdict = _internal_error(repr(exc))
        self.finish(verdict)

    def finish(self, verdict):
        if self.done:
            return
        self.done = True
        for timer in (self.timer, self.watchdog):
            if timer is not None and timer.active():
                timer.cancel()
        if self.pending is not None:
            self.pending.cancel()  # still queued behind other logins' calls: it never runs
        self.timer = self.watchdog = self.pending = self.call = None
        flow, self.flow, self.perform, self.executor, self.on_timeout = self.flow, None, None, None, None
        _close(flow)
        self.result.callback(verdict)

    def advance(self, value):
        self.timer = None
        if self.done:
            return
        try:  # everything that can fail in here ends the login, closed: nothing escapes to the reactor
            effect = self.flow.send(value)
            if isinstance(effect, Sleep):
                self.timer = self.reactor.callLater(effect.seconds, self.advance, None)
            elif isinstance(effect, Call):
                self.pending, self.call = self.executor.submit(self.perform, effect), effect
                self.timer = self.reactor.callLater(max(0.0, effect.timeout + _CALL_GRACE), self.give_up,
                                                    self.pending)
                self.pending.add_done_callback(self.reply_arrived)
            else:
                raise TypeError("the flow yielded a %s" % type(effect).__name__)
        except StopIteration as stop:
            self.finish(stop.value)
        except Exception as exc:  # noqa: BLE001 - a bug in the flow still ends the login, closed
            self.finish(_internal_error(repr(exc)))

    def reply_arrived(self, future):  # in the HTTP thread
        self.reactor.callFromThread(self.replied, future)

    def replied(self, future):
        if future is not self.pending:  # given up, or the login has ended
            return
        call, self.pending, self.call = self.call, None, None
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.advance(_unfinished(call) if future.cancelled() else _reply_of(future))

    def give_up(self, future):
        self.timer = None  # it has fired
        if future is not self.pending:
            return
        call, self.pending, self.call = self.call, None, None
        future.cancel()
        self.advance(_unfinished(call))


# =================================================================================================
# Access Server hook
# =================================================================================================


def _log(level, message, **fields):
    """One log line: `ivalt-2fa: message key=value ...`, scrubbed of secrets and phone numbers."""
    if level == "debug" and _SETTINGS.log_level != "debug":
        return
    parts = [message]
    for key, value in fields.items():
        text = _clean(value, 300)
        if text == "" or re.search(r'[\s"=]', text):
            text = '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')
        parts.append("%s=%s" % (key, text))
    line = _scrub(" ".join(parts))
    text = "ivalt-2fa: %s%s\n" % ("WARNING " if level == "warning" else "", line)
    try:
        # One write per line: print()'s separate newline lets threads interleave their lines.
        try:
            sys.stdout.write(text)
        except UnicodeEncodeError:  # an ASCII-only stdout must not lose the line
            sys.stdout.write(text.encode("ascii", "backslashreplace").decode("ascii"))
        sys.stdout.flush()
        if _SETTINGS.syslog:
            import syslog

            syslog.syslog(syslog.LOG_WARNING if level == "warning" else syslog.LOG_INFO, "ivalt-2fa: " + line)
    except Exception:  # noqa: BLE001, S110 - a closed stdout must not turn a login into a traceback
        pass


def email_from_username(username, email_domain):
    """The one identity used everywhere: (email, None) or (None, why it is unusable)."""
    if not isinstance(username, str):
        return None, "the username is not text (%s)" % type(username).__name__
    if len(username) > _MAX_USERNAME + 64:
        return None, "the username is %d characters long" % len(username)
    if _CONTROL.search(username):
        return None, "the username contains control characters"
    name = username.strip()
    if "\\" in name:
        name = name.rsplit("\\", 1)[1].strip()  # DOMAIN\alice
    name = name.lower()
    if not name:
        return None, "the username is empty"
    if "@" not in name and email_domain:
        name = "%s@%s" % (name, email_domain)
    if (len(name) > _MAX_USERNAME or re.search(r'[\s<>"`,;()\[\]]', name) or name.count("@") > 1
            or name.startswith("@") or name.endswith("@")):
        return None, "the username %r is not a usable e-mail address" % _clean(name, 80)
    return name, None


def bypass_name(username):
    """The form in which a username is compared with BYPASS_USERS, or None: exactly as typed
    (but for surrounding spaces and case), ASCII only. The list lets people in without a second
    factor, so no normalising here: "EVIL\\admin", or a look-alike such as "\u212aate" (a Kelvin
    sign for the K), must not pass for "admin" or "kate"."""
    if not isinstance(username, str) or not username.isascii():
        return None
    return username.strip(" \t").lower() or None


def _exempt(username, group, settings):
    """Why this login needs no iVALT (a policy bypass), or None."""
    if bypass_name(username) in _BYPASS_NAMES:
        return "user in BYPASS_USERS"
    if isinstance(group, str) and group in settings.exempt_groups:
        return "group %s in EXEMPT_GROUPS" % group
    if settings.enforced_groups and not (isinstance(group, str) and group in settings.enforced_groups):
        return "group %s not in ENFORCED_GROUPS" % (group if isinstance(group, str) else "(none)")
    return None


def post_auth(authcred, attributes, authret, info):
    """Access Server's hook, called after every successful primary login. Never raises."""
    started = time.monotonic()
    try:
        return _post_auth(authcred, attributes, authret, info, started)
    except Exception as exc:  # noqa: BLE001 - fail closed, whatever went wrong
        _log("warning", "internal error, login denied", error=repr(exc))
        failed = {"status": FAIL, "reason": "iVALT: internal error (%s), login denied" % _clean(type(exc).__name__, 60),
                  "client_reason": _CLIENT_REASON[INTERNAL_ERROR]}
        try:  # into Access Server's own dict, keeping its other keys, if that dict lets us
            authret.update(failed)
            failed = authret
        except Exception:  # noqa: BLE001, S110 - not a dict, or a hostile one: a fresh one says FAIL
            pass
        return _deliver(failed)


def _deliver(authret):
    if SYNCHRONOUS:
        from twisted.internet.defer import succeed

        return succeed(authret)
    return authret


def _post_auth(authcred, attributes, authret, info, started):
    authcred = authcred if isinstance(authcred, dict) else {}
    attributes = attributes if isinstance(attributes, dict) else {}
    info = info if isinstance(info, dict) else {}
    method = _clean(info.get("auth_method", "unknown"), 20)
    if method in ("session", "autologin"):  # token re-authentication, certificate-only profile
        _log("debug", "not a fresh login, no second factor asked", method=method)
        return _deliver(authret)
    primary_known = isinstance(authret, dict)
    if not primary_known:
        authret = {}  # filled in below as a FAIL: there is no primary result to add a factor to
    elif authret.get("status") != SUCCEED:
        return _deliver(authret)  # the primary login failed: nothing to add, nobody to push
    kind = "vpn" if attributes.get("vpn_auth") else "web"
    login_id = new_login_id()
    username = authcred.get("username")
    email, problem = email_from_username(username, _SETTINGS.email_domain)
    user_label = mask_email(email) if email else "(invalid)"
    context = {"id": login_id, "user": user_label, "method": method, "kind": kind, "started": started}
    # Broken settings deny every login before any policy is looked at: a setting that failed its
    # check has no trustworthy value (REQUIRE_FOR_WEB_LOGIN = "no" must not skip web logins).
    if kind == "web" and _SETTINGS.require_for_web_login is False and primary_known and not _SETTINGS.errors:
        _log("info", "login end", id=login_id, outcome="skipped", user=user_label, method=method, kind=kind,
             why="web login and REQUIRE_FOR_WEB_LOGIN is False")
        return _deliver(authret)
    _log("info", "login start", id=login_id, user=user_label, method=method, kind=kind)
    if not primary_known:
        return _deliver(_conclude(authret, Verdict(INTERNAL_ERROR, "Access Server passed no authret dict, so the "
                                                   "primary login's result is unknown"), context, None))
    if _SETTINGS.errors:
        return _deliver(_conclude(authret, Verdict(CONFIG_ERROR, "configuration error: %s" % "; ".join(_SETTINGS.errors)),
                                  context, None))
    if requests is None:
        return _deliver(_conclude(authret, Verdict(CONFIG_ERROR, "the Python module 'requests' is missing: install it "
                                                   "with 'python3 -m pip install requests' or the python3-requests "
                                                   "package, then restart Access Server"), context, None))
    if problem:
        return _deliver(_conclude(authret, Verdict(INVALID_USER, problem), context, None))
    proplist = authret.get("proplist")
    bypass = _exempt(username, proplist.get("conn_group") if isinstance(proplist, dict) else None, _SETTINGS)
    if bypass:
        return _deliver(_conclude(authret, Verdict(APPROVED, "bypass: " + bypass), context, None, bypass=True))
    attempt = Attempt(email, started, started + _SETTINGS.deadline_seconds, login_id)
    flow = verify(attempt, _SETTINGS, _GATE, _WAITING, time.monotonic, _debug_step)
    if SYNCHRONOUS:
        deferred = run_deferred(
            flow, _API.perform, _executor(), attempt.deadline + 1.5 - time.monotonic(),
            lambda: Verdict(UNAVAILABLE, "iVALT service unavailable during the %s: call did not finish by the "
                            "deadline" % (attempt.step or "lookup"), fail_open_eligible=not attempt.push_confirmed),
        )
        deferred.addCallback(lambda verdict: _conclude(authret, verdict, context, attempt))
        deferred.addErrback(lambda failure: _conclude(authret, _internal_error(failure.getErrorMessage()), context, attempt))
        return deferred
    return _conclude(authret, run_blocking(flow, _API.perform, executor=_executor()), context, attempt)


def _debug_step(attempt, step, answer):
    _log("debug", "api call", id=attempt.id, step=step, answer=answer.kind, detail=answer.detail,
         elapsed="%.2fs" % attempt.steps[-1][2])


def _conclude(authret, verdict, context, attempt, bypass=False):
    """Write the verdict into authret (other keys untouched) and log the login's one end line."""
    fail_mode = _SETTINGS.fail_mode or "closed"
    fail_open = verdict.fail_open_eligible and fail_mode == "open" and verdict.outcome == UNAVAILABLE
    outcome = "bypass" if bypass else ("failed_open" if fail_open else verdict.outcome)
    if verdict.outcome == APPROVED or fail_open:
        authret["status"] = SUCCEED
        if fail_open:
            authret["reason"] = "iVALT unreachable, login allowed by FAIL_MODE open (id=%s)" % context["id"]
            _log("warning", "FAIL-OPEN: login allowed WITHOUT the second factor because iVALT could not be "
                 "reached", id=context["id"], user=context["user"], detail=verdict.detail)
    else:
        authret["status"] = FAIL
        authret["reason"] = _scrub(_clean("iVALT %s: %s (id=%s)" % (verdict.outcome, verdict.detail, context["id"]), 400))
        authret["client_reason"] = _scrub(_clean(verdict.client_text, 160))
    _log("info", "login end", id=context["id"], outcome=outcome, user=context["user"], method=context["method"],
         kind=context["kind"], duration="%.2fs" % (time.monotonic() - context["started"]),
         api_calls=attempt.calls if attempt else 0, pushes=attempt.pushes if attempt else 0,
         fail_mode=("open-applied" if fail_open else fail_mode),
         detail=verdict.detail)
    return authret


# -------------------------------------------------------------------------------------------------
# Load: settings, shared state. Cheap and never raising; the HTTP session is made on first use.
# -------------------------------------------------------------------------------------------------

_SETTINGS = load_settings(dict(globals()), os.environ)
if _SETTINGS.wait_mode == "deferred":
    try:
        import twisted.internet.defer  # noqa: F401 - present inside Access Server

        SYNCHRONOUS = True
    except ImportError:
        _SETTINGS.errors.append("WAIT_MODE is 'deferred' but Twisted cannot be imported")
_SECRETS.extend(secret for secret in (_SETTINGS.ivalt_secret_key, _proxy_password(_SETTINGS.https_proxy))
                if secret and len(secret) >= 4)
_GATE = RequestGate(_SETTINGS.request_budget_per_second or 25.0)
_WAITING = WaitingLogins()
_API = ApiClient(_SETTINGS)
_BYPASS_NAMES = set(bypass_name(name) for name in (_SETTINGS.bypass_users or [])) - {None}
_EXECUTOR = []
_EXECUTOR_LOCK = threading.Lock()


def _executor():
    """Threads for API calls in deferred mode: our own small pool, so calls never queue behind (or
    starve) Access Server's worker pool."""
    with _EXECUTOR_LOCK:
        if not _EXECUTOR:
            from concurrent.futures import ThreadPoolExecutor

            _EXECUTOR.append(ThreadPoolExecutor(max_workers=_SETTINGS.http_threads or 8, thread_name_prefix="ivalt-http"))
        return _EXECUTOR[0]


def shutdown():
    """Release threads and connections (tests and the command line; Access Server never unloads)."""
    with _EXECUTOR_LOCK:
        while _EXECUTOR:
            _EXECUTOR.pop().shutdown(wait=False)
    _API.close()


if _SETTINGS.errors and __name__ != "__main__":  # the command line reports them itself
    for _problem in _SETTINGS.errors:
        _log("warning", "configuration error, every login will be denied until it is fixed", problem=_problem)


# =================================================================================================
# Command line: python3 main.py check EMAIL | doctor | install | uninstall   (--help on each)
# =================================================================================================

_SACLI = "/usr/local/openvpn_as/scripts/sacli"
_SCRIPT_KEY = "auth.module.post_auth_script"


def _marks(stream):
    try:
        "\u2713\u2717\u2013".encode(getattr(stream, "encoding", None) or "ascii")
        return {True: "\u2713", False: "\u2717", None: "\u2013"}
    except (UnicodeEncodeError, LookupError):
        return {True: "OK  ", False: "FAIL", None: "SKIP"}


def _cmd_check(args, out):
    """Run the real flow for one e-mail address, showing each step; exit 0/1/2."""
    if _SETTINGS.errors or requests is None:
        for problem in _SETTINGS.errors or ["the Python module 'requests' is missing: python3 -m pip install requests"]:
            out.write("configuration error: %s\n" % _scrub(problem))
        out.write("run 'python3 main.py doctor' for the full checklist\n")
        return 2
    email, problem = email_from_username(args.email, _SETTINGS.email_domain)
    if problem:
        out.write("cannot check: %s\n" % problem)
        return 1
    tty = hasattr(out, "isatty") and out.isatty()
    started = time.monotonic()
    attempt = Attempt(email, started, started + _SETTINGS.deadline_seconds)
    out.write("checking %s against %s (deadline %gs, login id %s)\n"
              % (email, _SETTINGS.ivalt_api_url, _SETTINGS.deadline_seconds, attempt.id))
    labels = {"lookup": "look up the user", "push": "send the push", "poll": "poll the result"}
    shown = {"poll": 0}

    def observe(attempt, step, answer):
        if step == "poll" and answer.kind == PENDING:
            shown["poll"] += 1
            if shown["poll"] == 1 and not tty:
                out.write("  waiting for the user to approve on the phone...\n")
            return
        what = answer.kind + (" " + answer.value if answer.kind == MOBILE else "") + (
            ": " + answer.detail if answer.detail else "")
        if tty:
            out.write("\r\033[K")
        out.write("  %-17s %5.2fs  %s\n" % (labels[step], attempt.steps[-1][2], _scrub(_clean(what, 200))))
        out.flush()

    def sleep(seconds):
        if not tty:
            time.sleep(seconds)
            return
        until = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            if now >= until:
                return
            out.write("\r\033[K  waiting for the phone... %2ds left" % max(0, attempt.deadline - now))
            out.flush()
            time.sleep(min(0.2, until - now))

    verdict = run_blocking(verify(attempt, _SETTINGS, _GATE, _WAITING, time.monotonic, observe), _API.perform, sleep,
                           _executor())
    if tty:
        out.write("\r\033[K")
    total = time.monotonic() - started
    out.write("result: %s%s\n" % (verdict.outcome.upper(), " - " + _scrub(_clean(verdict.detail, 300)) if verdict.detail else ""))
    if verdict.outcome != APPROVED:
        out.write("the user would see: %s\n" % _scrub(verdict.client_text))
    out.write("timing: ")
    for step in ("lookup", "push", "poll"):
        times = [seconds for name, _, seconds in attempt.steps if name == step]
        if times:
            out.write("%s %d call%s %.2fs, " % (step, len(times), "" if len(times) == 1 else "s", sum(times)))
    out.write("total %.2fs, %d API call%s\n" % (total, attempt.calls, "" if attempt.calls == 1 else "s"))
    if verdict.outcome == APPROVED:
        return 0
    return 1 if verdict.outcome in USER_OUTCOMES else 2


def _sacli(sacli, *arguments):
    """Run sacli; (parsed JSON or text, None) or (None, error text)."""
    import subprocess

    try:
        done = subprocess.run([sacli] + list(arguments), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=60, encoding="utf-8", errors="replace")
    except (OSError, subprocess.SubprocessError) as exc:
        return None, "cannot run %s: %s" % (sacli, exc)
    if done.returncode != 0:
        return None, "%s %s failed (exit %d): %s" % (sacli, " ".join(arguments), done.returncode,
                                                     _clean(done.stderr.strip() or done.stdout.strip(), 200))
    try:
        return json.loads(done.stdout), None
    except ValueError:
        return done.stdout, None


def _is_true(value):
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def _totp_checks(sacli, users):
    """[(ok, title, fix)] for Access Server's built-in TOTP: globally, for __DEFAULT__, for `users`."""
    if not os.path.exists(sacli):
        why = "skipped: %s not found (not an Access Server machine?)" % sacli
        return [(None, "built-in TOTP off globally: " + why, ""),
                (None, "built-in TOTP off for %s: %s" % (", ".join(["__DEFAULT__"] + list(users)), why), "")]
    results = []
    config, error = _sacli(sacli, "ConfigQuery")
    if error or not isinstance(config, dict):
        results.append((False, "built-in TOTP off globally: could not read the configuration (%s)" % (error or "not JSON"),
                        "run '%s ConfigQuery' by hand" % sacli))
    elif _is_true(config.get("vpn.server.google_auth.enable", "false")):
        results.append((False, "built-in TOTP is ON globally (vpn.server.google_auth.enable)",
                        "%s --key vpn.server.google_auth.enable --value false ConfigPut && %s start" % (sacli, sacli)))
    else:
        results.append((True, "built-in TOTP off globally (vpn.server.google_auth.enable)", ""))
    for name in ["__DEFAULT__"] + list(users):
        props, error = _sacli(sacli, "--user", name, "UserPropGet")
        value = props.get(name, {}).get("prop_google_auth") if isinstance(props, dict) and isinstance(props.get(name), dict) else None
        if error:
            results.append((False, "built-in TOTP for %s: could not read its properties (%s)" % (name, error), ""))
        elif _is_true(value):
            results.append((False, "built-in TOTP is ON for %s (prop_google_auth)" % name,
                            "%s --user %s --key prop_google_auth --value false UserPropPut && %s start" % (sacli, name, sacli)))
        else:
            results.append((True, "built-in TOTP off for %s (prop_google_auth %s)" % (name, "not set" if value is None else value), ""))
    return results


def _read_script(path):
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8"), None
    except (OSError, UnicodeDecodeError) as exc:
        return None, str(exc)


def _cmd_doctor(args, out):
    """A checklist, each line a mark and, when it fails, the fix. Exit 1 if any check fails."""
    marks = _marks(out)
    results = []

    def report(ok, title, fix=""):
        results.append(ok)
        out.write("%s %s\n" % (marks[ok], _scrub(title)))
        if fix and ok is False:
            out.write("    fix: %s\n" % _scrub(fix))

    bad_config = [p for p in _SETTINGS.errors if p.startswith("config file")]
    report(not bad_config, _SETTINGS.config_note if not bad_config else bad_config[0],
           _config_file_fix(bad_config[0]) if bad_config else "")
    others = [p for p in _SETTINGS.errors if not p.startswith("config file")]
    for problem in others:
        if bad_config:  # the script's own values stood in for the file's: fix the file first
            fix = "fix the config file first (see above): its values were not read"
        elif problem.startswith("IVALT_SECRET_KEY is not configured"):
            fix = "put IVALT_SECRET_KEY = \"...\" in the config file %s (mode 600) or in main.py" % (
                _SETTINGS.config_path or CONFIG_PATH)
        else:
            fix = "correct it where the message says (config file, main.py or environment), then load the script again"
        report(False, problem, fix)
    if not others:
        report(True, "settings valid (WAIT_MODE %s, FAIL_MODE %s, deadline %gs, poll every %gs, budget %g req/s)"
               % (_SETTINGS.wait_mode, _SETTINGS.fail_mode, _SETTINGS.deadline_seconds, _SETTINGS.poll_interval_seconds,
                  _SETTINGS.request_budget_per_second))
    if requests is None:
        report(False, "Python module 'requests' is missing", "python3 -m pip install requests (or apt/dnf install python3-requests)")
    else:
        report(True, "Python module 'requests' %s" % getattr(requests, "__version__", "?"))
    usable = requests is not None and getattr(_SETTINGS, "key_configured", False) and _SETTINGS.api_host and not any(
        p.startswith("IVALT_API_URL") or p.startswith("HTTPS_PROXY") or p.startswith("CA_BUNDLE") for p in _SETTINGS.errors)
    if not usable:
        report(None, "API checks skipped: fix the settings above first")
    else:
        _api_checks(report)
    for ok, title, fix in _totp_checks(args.sacli, args.user):
        report(ok, title, fix)
    _loaded_script_check(args, report)
    failed, skipped = results.count(False), results.count(None)
    summary = "all checks passed" if not failed else "%d check%s failed" % (failed, "" if failed == 1 else "s")
    if skipped:
        summary += ", %d skipped" % skipped
        if not os.path.exists(args.sacli):
            summary += " (on the Access Server machine, give --sacli PATH if sacli is not at %s)" % args.sacli
    out.write("\n%s\n" % summary)
    return 1 if failed else 0


def _config_file_fix(problem):
    if "writable by group or others" in problem or "owned by uid" in problem:
        return "%s: the file and its folder must be owned by root and writable by their owner only (mode 600 " \
               "for the file)" % problem.split("run ", 1)[-1]
    if "cannot be read" in problem or "not a regular file" in problem:
        return "create it from config.example.py (owned by root, mode 600), or unset IVALT_CONFIG"
    return "correct that line: only NAME = value lines with plain values (config.example.py shows each setting)"


def _api_checks(report):
    import socket

    host = _SETTINGS.api_host
    if _SETTINGS.https_proxy:
        report(None, "DNS of %s: skipped, the proxy %s resolves it" % (host, _safe_url(_SETTINGS.https_proxy)))
    else:
        try:
            addresses = sorted(set(entry[4][0] for entry in socket.getaddrinfo(host, None)))
            report(True, "%s resolves to %s" % (host, ", ".join(addresses[:3])))
        except (OSError, UnicodeError) as exc:
            report(False, "%s does not resolve (%s)" % (host, exc), "check /etc/resolv.conf and IVALT_API_URL")
            return
    # One harmless authenticated call: the lookup of an address that cannot exist tells a refused
    # key (gateway 403) apart from an accepted one (the API's own "not found").
    reply = _API.perform(Call("lookup", {"email": "doctor-check@ivalt-doctor.invalid"}, _SETTINGS.call_timeout_seconds))
    answer = classify_lookup(reply)
    https = _SETTINGS.ivalt_api_url.startswith("https://")
    if reply.error is not None and reply.error.tls:
        report(False, "TLS verification of %s failed: %s" % (host, reply.error.kind),
               "check CA_BUNDLE, a TLS-inspecting proxy, and the server clock")
        return
    if reply.error is not None:
        report(False, "iVALT API not reachable: %s" % answer.detail,
               "check the firewall (outbound 443), HTTPS_PROXY and IVALT_API_URL")
        return
    report(True if https else None, "TLS certificate of %s verified" % host if https else "TLS skipped: plain http:// test URL")
    if answer.kind == BAD_KEY:
        report(False, "API key refused: %s" % answer.detail, "copy the secret key again from the iVALT dashboard")
    elif answer.kind in (NOT_ENROLLED, MOBILE):
        report(True, "API key accepted (a test lookup got iVALT's own answer in %.2fs)" % reply.elapsed)
    else:
        report(False, "iVALT API answered unexpectedly: %s" % answer.detail, "try again; if it persists, contact iVALT")


def _loaded_script_check(args, report):
    if not os.path.exists(args.sacli):
        report(None, "loaded script check skipped: %s not found" % args.sacli)
        return
    config, error = _sacli(args.sacli, "ConfigQuery")
    loaded = config.get(_SCRIPT_KEY) if isinstance(config, dict) else None
    mine, read_error = _read_script(args.script)
    if not error and loaded is not None and not isinstance(loaded, str):
        error = "sacli ConfigQuery gave %s for %s, not the script's text" % (type(loaded).__name__, _SCRIPT_KEY)
    if error:
        report(False, "could not read the loaded script: %s" % error)
    elif not loaded:
        report(False, "no post-auth script is loaded in Access Server", "python3 main.py install")
    elif read_error:
        report(False, "cannot read %s to compare: %s" % (args.script, read_error))
    elif loaded.strip() == mine.strip():
        report(True, "the script loaded in Access Server is this file (%s)" % args.script)
    else:
        report(False, "the script loaded in Access Server differs from %s" % args.script,
               "python3 main.py install   (Access Server keeps its own copy: edits need loading again)")


def _run_commands(commands, dry_run, out):
    import shlex
    import subprocess

    for command in commands:
        out.write("%s%s\n" % ("" if dry_run else "running: ", " ".join(shlex.quote(part) for part in command)))
        out.flush()  # before the child writes to the same terminal or pipe
        if dry_run:
            continue
        try:
            done = subprocess.run(command, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            out.write("failed: %s\n" % exc)
            return 1
        if done.returncode != 0:
            out.write("failed with exit status %d\n" % done.returncode)
            return 1
    return 0


def _cmd_install(args, out):
    script = os.path.abspath(args.script)
    if _read_script(script)[0] is None:
        out.write("cannot read %s\n" % script)
        return 1
    refusals = []  # (why, [details], what to do)
    if _SETTINGS.errors:
        refusals.append(("with these settings every login would be denied", _SETTINGS.errors,
                         "fix them (python3 main.py doctor)"))
    if os.path.exists(args.sacli):
        totp_on = [title for ok, title, _ in _totp_checks(args.sacli, []) if ok is False]
        if totp_on:
            refusals.append(("Access Server's built-in TOTP may be on (it must be off with an external second "
                             "factor)", totp_on, "turn it off (python3 main.py doctor shows how)"))
    elif not args.dry_run:
        out.write("%s not found: is this the Access Server machine? (--sacli PATH)\n" % args.sacli)
        return 1
    shell_config = os.environ.get("IVALT_CONFIG")
    if shell_config and os.path.realpath(shell_config) != os.path.realpath(CONFIG_PATH):
        out.write("note: this shell has IVALT_CONFIG=%s, but Access Server reads %s unless its own environment "
                  "sets IVALT_CONFIG too\n" % (shell_config, CONFIG_PATH))
    refused = bool(refusals) and not args.force
    if refused:
        for why, details, fix in refusals:
            out.write("%s: %s:\n" % ("a real install would refuse" if args.dry_run else "refusing to install", why))
            for detail in details:
                out.write("  - %s\n" % _scrub(detail))
            out.write("%s, or use --force\n" % fix)
        if not args.dry_run:
            return 1
    done = _run_commands([[args.sacli, "--key", _SCRIPT_KEY, "--value_file=" + script, "ConfigPut"],
                          [args.sacli, "start"]], args.dry_run, out)
    return 1 if refused else done


def _cmd_uninstall(args, out):
    if not os.path.exists(args.sacli) and not args.dry_run:
        out.write("%s not found: is this the Access Server machine? (--sacli PATH)\n" % args.sacli)
        return 1
    return _run_commands([[args.sacli, "--key", _SCRIPT_KEY, "ConfigDel"], [args.sacli, "start"]], args.dry_run, out)


def cli(argv, out=None):
    import argparse

    out = out or sys.stdout
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="main.py", formatter_class=formatter,
        description="iVALT two-factor authentication for OpenVPN Access Server (post-auth script %s)." % __version__,
        epilog="examples:\n  python3 main.py doctor\n  python3 main.py check alice@example.com\n"
               "  python3 main.py install --dry-run\n  python3 main.py uninstall")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check", formatter_class=formatter, help="run one real verification for an e-mail address",
                                description="Look the user up, send one push and wait for the answer, as a login would.\n"
                                            "Exit status: 0 approved, 1 denied or failed, 2 configuration or service error.",
                                epilog="examples:\n  python3 main.py check alice@example.com\n"
                                       "  IVALT_CONFIG=/root/ivalt.py python3 main.py check alice")
    check.add_argument("email", help="e-mail address or Access Server username (EMAIL_DOMAIN applies)")
    doctor = commands.add_parser("doctor", formatter_class=formatter, help="check settings, API, key and Access Server",
                                 description="A checklist of everything this script needs; exit status 1 if any check fails.",
                                 epilog="examples:\n  python3 main.py doctor\n  python3 main.py doctor --user alice --user Sales")
    doctor.add_argument("--user", action="append", default=[], help="also check built-in TOTP for this user or group")
    install = commands.add_parser("install", formatter_class=formatter, help="load this script into Access Server",
                                  description="Runs sacli ConfigPut and sacli start. Refuses while built-in TOTP is on "
                                              "or the settings are invalid.",
                                  epilog="examples:\n  python3 main.py install --dry-run\n  python3 main.py install")
    install.add_argument("--force", action="store_true", help="install even if built-in TOTP is on or settings are invalid")
    uninstall = commands.add_parser("uninstall", formatter_class=formatter, help="remove the script from Access Server",
                                    description="Runs sacli ConfigDel and sacli start.",
                                    epilog="examples:\n  python3 main.py uninstall --dry-run\n  python3 main.py uninstall")
    for command in (doctor, install, uninstall):
        command.add_argument("--sacli", default=_SACLI, help="path to sacli (default %(default)s)")
    for command in (doctor, install):
        command.add_argument("--script", default=sys.argv[0], help="this script's path (default %(default)s)")
    for command in (install, uninstall):
        command.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = parser.parse_args(argv)
    handlers = {"check": _cmd_check, "doctor": _cmd_doctor, "install": _cmd_install, "uninstall": _cmd_uninstall}
    if args.command not in handlers:
        parser.print_help(out)
        return 2
    if out is sys.stdout and hasattr(out, "reconfigure"):
        out.reconfigure(errors="backslashreplace")  # "check café" on an ASCII terminal
    try:
        return handlers[args.command](args, out)
    except KeyboardInterrupt:
        out.write("\ninterrupted\n")
        return 2
    except BrokenPipeError:  # e.g. `main.py doctor | head`: no traceback, as the Python docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # noqa: BLE001 - an administrator gets a sentence, not a traceback
        out.write("\ninternal error: %s: %s\n(please report it; python3 main.py doctor checks the setup)\n"
                  % (type(exc).__name__, _scrub(_clean(exc, 200))))
        return 2
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
