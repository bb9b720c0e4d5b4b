"""Configuration for the iVALT post-auth script (main.py).

Copy to /usr/local/openvpn_as/etc/ivalt_config.py, the path Access Server's copy of main.py
reads (CONFIG_PATH at the top of main.py changes it; the IVALT_CONFIG environment variable names
another file, for the command line and tests), then:

    chown root:root /usr/local/openvpn_as/etc/ivalt_config.py
    chmod 600 /usr/local/openvpn_as/etc/ivalt_config.py

Values here override the ones at the top of main.py; the environment variables
IVALT_SECRET_KEY and IVALT_API_URL override both. The file is parsed, never executed: only
`NAME = value` lines with plain values (text in quotes, numbers, True/False, lists) are allowed,
and the script refuses it (every login fails closed) if it, or a folder above it, is writable by
group or others or owned by a user other than root. Check it with: python3 main.py doctor
"""

# Your iVALT secret key (from the iVALT dashboard). Sent only in the x-api-key header, never logged.
IVALT_SECRET_KEY = "<ivalt_secret_key>"

# iVALT API base URL. https:// only (plain http:// is accepted for loopback test servers).
IVALT_API_URL = "https://api.ivalt.com"

# Appended to usernames without "@": with "example.com", Access Server user "alice" is looked up
# in iVALT as alice@example.com. "" uses the username as it is. Usernames are always trimmed,
# lower-cased, and lose a "DOMAIN\" prefix.
EMAIL_DOMAIN = ""

# True: web-portal logins (which hand out VPN profiles) need iVALT too. False: VPN logins only.
REQUIRE_FOR_WEB_LOGIN = True

# Seconds from the start of a login until it is given up (1 to 600). The VPN client waits about
# 60 s; an approval that comes later is not a success.
DEADLINE_SECONDS = 60

# Seconds between result polls while the user looks at the phone (0.25 to 30).
POLL_INTERVAL_SECONDS = 1.0

# "closed": every failure denies the login. "open": a login passes WITHOUT the second factor when
# the iVALT service cannot be reached (network error, timeout, HTTP 5xx, non-JSON answer) before
# iVALT confirmed this login's push. Never on a denial, time window, geofence, unknown user, bad
# key, throttling, redirect, TLS failure, or a user who did not answer. Every such pass is logged
# as "FAIL-OPEN".
FAIL_MODE = "closed"

# "thread": wait in Access Server's worker thread (SYNCHRONOUS = False), as other integrations do.
# "deferred": return a Twisted Deferred (SYNCHRONOUS = True): a user looking at the phone holds no
# thread, so hundreds of users can wait at once without stalling other logins.
WAIT_MODE = "thread"

# Cap on iVALT API requests per second for the whole Access Server process (plus a burst of 5).
# With many users waiting at once, each is polled less often instead of the API throttling us.
REQUEST_BUDGET_PER_SECOND = 25

# Usernames that never need iVALT, e.g. a break-glass administrator. Each pass is logged.
# Matched exactly as the user types it (trimmed, any case, ASCII only), with no DOMAIN\ stripping
# and no EMAIL_DOMAIN: list each form, e.g. ["breakglass", "CORP\\breakglass"].
BYPASS_USERS = []

# Access Server groups (the user's conn_group) whose members never need iVALT.
EXEMPT_GROUPS = []

# If not empty, only members of these groups need iVALT; everybody else passes (logged).
ENFORCED_GROUPS = []

# Label sent with the push (requestFrom), so the phone shows where the request comes from.
REQUEST_FROM = "OpenVPN Access Server"

# CA bundle file for the API's TLS certificate (e.g. behind a TLS-inspecting proxy);
# "" uses the bundle that requests ships. Verification is always on.
CA_BUNDLE = ""

# HTTPS proxy, e.g. "http://proxy.example.com:3128" (HTTP CONNECT; the API's certificate is
# still checked against the API host). "" connects directly; the environment's proxy variables
# are ignored.
HTTPS_PROXY = ""

# "info": a start and an end line for every login. "debug": also a line per API call.
LOG_LEVEL = "info"

# Also write log lines to syslog (they always go to stdout, i.e. /var/log/openvpnas.log).
SYSLOG = False

# Longest single API call in seconds (1 to 120); always also cut to the time left.
CALL_TIMEOUT_SECONDS = 10

# Threads that make the API calls (1 to 64). Each call holds one only while it runs, and a call
# that hangs (a DNS lookup, say) is given up at the deadline whatever it is doing.
HTTP_THREADS = 8
