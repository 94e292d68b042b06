"""CardScanBackendUser behind every kind of backend module, under both MPMs:
a real CGI script (mod_cgi under prefork, mod_cgid under event), a real
FastCGI responder (mod_proxy_fcgi, as in front of PHP-FPM) and a real HTTP
application (mod_proxy_http). One application serves all three: it keeps its
login in a cookie and names the user in X-CardScan-User.

What is checked, for each backend module:
- the swapped token reply carries nothing of the backend's response (headers
  in r->headers_out or r->err_headers_out, trailers), and a cache in front of
  the application never stores it;
- two user headers, or one id with a comma (what httpd makes of two), are
  refused;
- the user header never reaches a client, on any path (internal redirects,
  ErrorDocument);
- a CORS preflight is answered by the module only where Apache's access
  control lets the request through, never runs anything else, and needs no
  login where the login is what it skips.
"""

import base64
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (USERS, Apache, FastCGIResponder, MockTestCase, PortFileServer, apache_conf,  # noqa: E402
                     jwt_payload, session_dir)

HEADER = "X-CardScan-User"
ORIGIN = "https://app.hospital.org"
EVIL = "https://evil.example"
BACKEND_BODY = "BACKEND-BODY-NOT-FOR-THE-CLIENT"
SECRET = "SECRET PAGE"
PUBLIC_FILE = "PUBLIC FILE"
ERROR_PAGE = "PUBLIC ERROR PAGE"

# The backend's headers on the page that names the user: none of them may
# ride on the token reply (name lower-cased -> value).
BACKEND_HEADERS = [
    ("Access-Control-Allow-Origin", EVIL),
    ("Access-Control-Allow-Credentials", "true"),
    ("Set-Cookie", "backend-session=1; Path=/"),
    ("Content-Encoding", "gzip"),
    ("Cache-Control", "private, max-age=60"),
    ("X-Backend-Debug", "secret-debug-value"),
    ("X-Backend-Build", "portal-1.2.3"),
]

# The application, as one Python module: application(env, body) gives
# (status, [(name, value)], body, [(trailer, value)]); cgi_response() prints
# it as a CGI script does (used by app.cgi and the FastCGI responder); the
# HTTP backend sends it as HTTP/1.1. Every call is appended to HITS.
APP = r'''
import json, os

HITS = %(hits)r
HEADER = %(header)r
USERS = {"s-alice": "alice", "s-bob": "bob"}
BACKEND_HEADERS = %(backend_headers)r


def user_of(env):
    for part in env.get("HTTP_COOKIE", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == "session" and v in USERS:
            return USERS[v]
    return None


def scenario_of(env):
    path = (env.get("SCRIPT_NAME", "") + env.get("PATH_INFO", "")).split("?")[0]
    return path.rstrip("/").rsplit("/", 1)[-1]


def application(env, body):
    scenario = scenario_of(env)
    with open(HITS, "a") as f:
        f.write("%%s %%s\n" %% (env.get("REQUEST_METHOD", "?"), scenario))
    user = user_of(env)
    login = (401, [("Content-Type", "text/plain"), ("Cache-Control", "no-store")], b"please log in", [])
    if scenario in ("token", "trailers"):
        if not user:
            return login
        trailers = [("X-Backend-Trailer", "t"), (HEADER, user)] if scenario == "trailers" else []
        return (200, [(HEADER, user), ("Content-Type", "text/html")] + BACKEND_HEADERS,
                ("%%s for %%s" %% (%(body)r, user)).encode(), trailers)
    if scenario == "cacheable":
        if not user:
            return login
        return (200, [(HEADER, user), ("Content-Type", "text/html"),
                      ("Cache-Control", "public, max-age=300")], b"cacheable", [])
    if scenario == "public-page":
        n = sum(1 for line in open(HITS) if line.split()[-1] == "public-page")
        return (200, [("Content-Type", "text/plain"), ("Cache-Control", "public, max-age=300")],
                ("public page %%d" %% n).encode(), [])
    if scenario == "plain-trailers":
        return (200, [("Content-Type", "text/plain")], b"plain page", [("X-Backend-Trailer", "t")])
    if scenario == "two-users":
        return (200, [(HEADER, "alice"), (HEADER, "bob"), ("Content-Type", "text/plain")], b"two", [])
    if scenario == "comma-user":
        return (200, [(HEADER, "alice, bob"), ("Content-Type", "text/plain")], b"comma", [])
    if scenario == "redirect-local":
        return (200, [("Location", "/public/x.txt"), (HEADER, "alice")], b"", [])
    if scenario == "error500":
        return (500, [(HEADER, "alice"), ("Content-Type", "text/plain")], b"BACKEND ERROR", [])
    if scenario == "secret":
        return (200, [("Content-Type", "text/plain")], %(secret)r.encode(), [])
    if scenario == "env":
        return (200, [("Content-Type", "application/json")], json.dumps(env).encode(), [])
    return (404, [("Content-Type", "text/plain")], b"no such page", [])


def cgi_response(env, body):
    status, headers, data, _ = application(env, body)
    out = "" if status == 200 else "Status: %%d\r\n" %% status
    out += "".join("%%s: %%s\r\n" %% (k, v) for k, v in headers)
    return out.encode("latin-1") + b"\r\n" + data
'''

# The CGI script: the application's CGI form. It runs as apache2's User
# (www-data under root), which may not reach the runner's own Python.
CGI_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
CGI = r'''#!%(python)s
import os, sys
sys.path.insert(0, %(dir)r)
import app
n = int(os.environ.get("CONTENT_LENGTH") or 0)
body = sys.stdin.buffer.read(n) if n else b""
sys.stdout.buffer.write(app.cgi_response(dict(os.environ), body))
'''

# The HTTP backend: the application behind http.server (HTTP/1.1; a reply
# with trailers goes chunked).
HTTP_APP = r'''
import http.server, importlib.util, os, signal, sys

spec = importlib.util.spec_from_file_location("app", sys.argv[2])
app = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app)


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        path = self.path.split("?")[0]
        env = {"REQUEST_METHOD": self.command, "SCRIPT_NAME": path,
               "HTTP_COOKIE": self.headers.get("Cookie", "")}
        status, headers, data, trailers = app.application(env, body)
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if trailers:
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", ", ".join(k for k, _ in trailers))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b"%x\r\n%s\r\n0\r\n" % (len(data), data))
                self.wfile.write(b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in trailers))
                self.wfile.write(b"\r\n")
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_HEAD = do_OPTIONS = handle_any


srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
srv.serve_forever()
'''

# The locations of one server: every prefix reaches the same application.
#   app   application login (cookie), CardScanBackendUser, a listed origin
#   capp  the same behind mod_cache (CacheEnable disk)
#   eapp  the same with ProxyErrorOverride On and ErrorDocument 500
#   papp  Basic auth (Require valid-user) in front of the backend, and
#         ErrorDocument 400 pointing inside that protected location
#   dapp, iapp, xapp  Require all denied / ip 10.0.0.1 / expr false
PREFIXES = ("app", "capp", "eapp", "papp", "dapp", "iapp", "xapp")


class Response:
    def __init__(self, status, headers, body, trailers, raw):
        self.status = status
        self.headers = headers      # [(name lower-cased, value)] in order
        self.body = body
        self.trailers = trailers    # [(name lower-cased, value)]
        self.raw = raw

    def all(self, name):
        return [v for k, v in self.headers if k == name.lower()]

    def get(self, name):
        values = self.all(name)
        return values[-1] if values else None

    def names(self):
        return {k for k, _ in self.headers} | {k for k, _ in self.trailers}

    def json(self):
        try:
            return json.loads(self.body.decode())
        except ValueError:
            return None

    def __repr__(self):
        return "<%d %r %r trailers=%r>" % (self.status, self.headers, self.body[:300], self.trailers)


def raw_request(port, method, path, headers=(), body=b"", raw_tail=None, timeout=20):
    """One HTTP/1.1 request on its own connection (Connection: close), read
    to the end: status, every header (duplicates kept), the body (chunked
    decoded) and the trailers, which http.client drops. raw_tail: bytes sent
    after the header block instead of body (a broken chunked body, say)."""
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1:%d" % port, "Connection: close"]
    lines += ["%s: %s" % kv for kv in headers]
    if raw_tail is None and body:
        lines.append("Content-Length: %d" % len(body))
    req = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + (raw_tail if raw_tail is not None else body)
    s = socket.create_connection(("127.0.0.1", port), timeout)
    data = b""
    try:
        s.sendall(req)
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    head_lines = head.decode("latin-1").split("\r\n")
    status = int(head_lines[0].split()[1])
    hdrs = []
    for line in head_lines[1:]:
        k, _, v = line.partition(":")
        hdrs.append((k.strip().lower(), v.strip()))
    trailers = []
    te = [v.lower() for k, v in hdrs if k == "transfer-encoding"]
    if method == "HEAD" or status in (204, 304):
        body_out = b""
    elif te and "chunked" in te[-1]:
        body_out = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            body_out += rest[:size]
            rest = rest[size + 2:]
        for line in rest.decode("latin-1").split("\r\n"):
            if line:
                k, _, v = line.partition(":")
                trailers.append((k.strip().lower(), v.strip()))
    else:
        cl = [v for k, v in hdrs if k == "content-length"]
        body_out = rest[:int(cl[-1])] if cl else rest
    return Response(status, hdrs, body_out, trailers, data)


def basic(user="alice"):
    cred = ("%s:%s" % (user, USERS[user])).encode()
    return ("Authorization", "Basic " + base64.b64encode(cred).decode())


def preflight(origin=ORIGIN):
    return [("Origin", origin), ("Access-Control-Request-Method", "GET"),
            ("Access-Control-Request-Headers", "authorization")]


def _write(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class BackendCase:
    """The tests of every backend module: one apache2 (MPM MPM) per class in
    front of one backend. A concrete class mixes it with MockTestCase and
    sets BACKEND ("cgi", "fcgi" or "http") and MPM."""

    BACKEND = None
    MPM = None

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.backend = None
        try:
            cls.dir = tempfile.mkdtemp(prefix="cs-backends-")
            os.chmod(cls.dir, 0o755)
            cls.hits = _write(os.path.join(cls.dir, "hits"), "", 0o666)
            cls.app_path = _write(os.path.join(cls.dir, "app.py"), APP % {
                "hits": cls.hits, "header": HEADER, "backend_headers": BACKEND_HEADERS,
                "body": BACKEND_BODY, "secret": SECRET})
            os.makedirs(os.path.join(cls.dir, "public"))
            _write(os.path.join(cls.dir, "public", "x.txt"), PUBLIC_FILE)
            _write(os.path.join(cls.dir, "public", "err.html"), ERROR_PAGE)
            cache = os.path.join(cls.dir, "cache")
            os.makedirs(cache)
            os.chmod(cache, 0o777)  # apache2's children (www-data) write it
            modules = ["alias", "cache", "cache_disk"]
            if cls.BACKEND == "cgi":
                modules.append("cgi" if cls.MPM == "prefork" else "cgid")
                cgi = _write(os.path.join(cls.dir, "app.cgi"),
                             CGI % {"python": CGI_PYTHON, "dir": cls.dir}, 0o755)
                routes = "\n".join('ScriptAlias "/%s/" "%s/"' % (p, cgi) for p in PREFIXES)
            else:
                if cls.BACKEND == "fcgi":
                    cls.backend = FastCGIResponder(cls.app_path)
                    scheme = "fcgi"
                else:
                    script = _write(os.path.join(cls.dir, "http_app.py"), HTTP_APP)
                    cls.backend = PortFileServer(script, cls.app_path, prefix="cs-httpapp-")
                    scheme = "http"
                modules += ["proxy", "proxy_" + scheme]
                routes = "\n".join('ProxyPass "/%s/" "%s://127.0.0.1:%d/%s/"' % (p, scheme, cls.backend.port, p)
                                   for p in PREFIXES)
            cls.httpd = Apache(mpm=cls.MPM, modules=modules, body=cls.conf(routes), access_log=True,
                               global_conf=apache_conf(endpoint=cls.mock.http_url))
        except BaseException:
            cls._cleanup()
            raise

    @classmethod
    def conf(cls, routes):
        sd = session_dir()
        user = "CardScanBackendUser %s\n    CardScanAllowOrigin %s" % (HEADER, ORIGIN)
        basic_auth = ('AuthType Basic\n    AuthName "portal"\n    AuthBasicProvider file\n'
                      '    AuthUserFile "%s/htpasswd"\n    Require valid-user' % sd)
        return f"""
{routes}
Alias "/public/" "{cls.dir}/public/"
<Directory "{cls.dir}">
    Options +ExecCGI
    Require all granted
</Directory>
CacheRoot "{cls.dir}/cache"
CacheEnable disk "/capp/"
<Location "/app/">
    {user}
</Location>
<Location "/capp/">
    {user}
</Location>
<Location "/eapp/">
    {user}
    <IfModule proxy_module>
        ProxyErrorOverride On
    </IfModule>
    ErrorDocument 500 /public/err.html
</Location>
<Location "/papp/">
    {basic_auth}
    {user}
    ErrorDocument 400 /papp/secret
</Location>
<Location "/dapp/">
    {user}
    Require all denied
</Location>
<Location "/iapp/">
    {user}
    Require ip 10.0.0.1
</Location>
<Location "/xapp/">
    {user}
    Require expr false
</Location>
"""

    @classmethod
    def _cleanup(cls):
        problems = []
        for thing in ("httpd", "backend"):
            x = getattr(cls, thing, None)
            if x is not None:
                try:
                    x.stop()
                except AssertionError as e:  # a crash: reported after the rest is stopped
                    problems.append(str(e))
        shutil.rmtree(getattr(cls, "dir", "/nonexistent"), ignore_errors=True)
        cls.mock.stop()
        if problems:
            raise AssertionError("\n".join(problems))

    @classmethod
    def tearDownClass(cls):
        cls._cleanup()

    def tearDown(self):
        super().tearDown()
        # the harness checks every live server's error log after each test as
        # well; this names the backend in the message
        crashes = self.httpd.crash_lines()
        self.assertEqual([], crashes, "apache2 crashed behind %s/%s" % (self.BACKEND, self.MPM))

    # ---------------------------------------------------------------- helpers

    def req(self, path, method="GET", cookie=None, headers=(), **kw):
        h = list(headers)
        if cookie:
            h.append(("Cookie", "session=" + cookie))
        return raw_request(self.httpd.port, method, path, h, **kw)

    def backend_hits(self, scenario=None):
        with open(self.hits) as f:
            lines = [ln.split() for ln in f if ln.strip()]
        return [ln for ln in lines if scenario is None or ln[-1] == scenario]

    def assert_no_user_header(self, r):
        self.assertNotIn(HEADER.lower(), r.names(), r)
        self.assertNotIn(HEADER.lower().replace("-", "_"), r.names(), r)

    def assert_no_token(self, r):
        self.assertNotIn(b'"Token"', r.body, r)
        self.assertNotIn(b"eyJ", r.body, r)

    def assert_token_reply(self, r, user, origin=None):
        """A token reply of the module's own, with nothing of the backend's."""
        self.assertEqual(200, r.status, r)
        doc = r.json()
        self.assertIsNotNone(doc, r)
        self.assertEqual(user, jwt_payload(doc["Token"])["sub"])
        self.assertNotIn(BACKEND_BODY.encode(), r.body)
        self.assertEqual(["application/json"], [v.split(";")[0] for v in r.all("content-type")], r)
        self.assertEqual(["no-store"], r.all("cache-control"), r)
        self.assertEqual(["nosniff"], r.all("x-content-type-options"), r)
        self.assertEqual([], r.all("set-cookie"), r)
        self.assertEqual([], r.all("content-encoding"), r)
        self.assertEqual([], [k for k in r.names() if k.startswith("x-backend-")], r)
        self.assert_no_user_header(r)
        if origin:
            self.assertEqual([origin], r.all("access-control-allow-origin"), r)
            self.assertEqual(["true"], r.all("access-control-allow-credentials"), r)
        else:
            self.assertEqual([], [k for k in r.names() if k.startswith("access-control-")], r)
        self.assertEqual([], r.trailers, r)
        return doc

    # ----------------------------------------------- the swap, and the setup

    def test_logged_in_user_gets_a_token_reply(self):
        r = self.req("/app/secret")  # the backend is reachable and says what it says
        self.assertEqual(200, r.status, r)
        self.assertEqual(SECRET.encode(), r.body)
        r = self.req("/app/token")
        self.assertEqual(401, r.status, r)
        self.assertEqual(b"please log in", r.body)
        self.assertEqual(0, self.mock.calls())
        r = self.req("/app/token", cookie="s-alice")
        self.assertEqual(200, r.status, r)
        self.assertEqual("alice", jwt_payload(r.json()["Token"])["sub"])
        self.assertNotIn(BACKEND_BODY.encode(), r.body)

    # ------------------------------------- 1. backend headers on the swap

    def test_swapped_reply_carries_none_of_the_backends_headers(self):
        self.assert_token_reply(self.req("/app/token", cookie="s-alice"), "alice")
        self.assert_token_reply(self.req("/app/token", cookie="s-bob", headers=[("Origin", ORIGIN)]),
                                "bob", origin=ORIGIN)
        self.assert_token_reply(self.req("/app/token", cookie="s-alice", headers=[("Origin", EVIL)]), "alice")
        # a cache hit of the module's is the same reply
        self.assert_token_reply(self.req("/app/token", cookie="s-alice", method="POST"), "alice")

    def test_cache_in_front_never_serves_a_token_to_someone_else(self):
        # the cache works: a public page is stored and served from it
        first = self.req("/capp/public-page")
        second = self.req("/capp/public-page")
        self.assertEqual((200, 200), (first.status, second.status), (first, second))
        self.assertEqual(first.body, second.body)
        self.assertEqual(1, len(self.backend_hits("public-page")), "mod_cache is not caching /capp/")
        # alice's token reply, although the application said "public, max-age=300"
        alice = self.req("/capp/cacheable", cookie="s-alice")
        self.assertEqual(200, alice.status, alice)
        token = alice.json()["Token"]
        self.assertEqual("alice", jwt_payload(token)["sub"])
        # nobody logged in: the application's answer, never alice's token
        for extra in ([], [("Origin", ORIGIN)]):
            anon = self.req("/capp/cacheable", headers=extra)
            self.assertNotIn(token.encode(), anon.body, anon)
            self.assert_no_token(anon)
            self.assertEqual(401, anon.status, anon)
            self.assertEqual(b"please log in", anon.body)
        # bob gets his own
        bob = self.req("/capp/cacheable", cookie="s-bob")
        self.assertEqual(200, bob.status, bob)
        self.assertEqual("bob", jwt_payload(bob.json()["Token"])["sub"])
        # the token replies said no-store, and nothing else
        self.assertEqual(["no-store"], alice.all("cache-control"), alice)
        self.assertEqual(["no-store"], bob.all("cache-control"), bob)

    # ---------------------------------------------------- 2. one user only

    def test_two_user_headers_are_refused(self):
        r = self.req("/app/two-users")
        self.assertEqual(403, r.status, r)
        self.assertEqual("invalid_user_id", (r.json() or {}).get("error"), r)
        self.assert_no_token(r)
        self.assert_no_user_header(r)
        self.assertNotIn(b"two", r.body)
        self.assertEqual(0, self.mock.calls(), self.mock.stats().get("user_ids"))

    def test_user_id_with_a_comma_is_refused(self):
        r = self.req("/app/comma-user")
        self.assertEqual(403, r.status, r)
        self.assertEqual("invalid_user_id", (r.json() or {}).get("error"), r)
        self.assert_no_token(r)
        self.assert_no_user_header(r)
        self.assertEqual(0, self.mock.calls(), self.mock.stats().get("user_ids"))

    # ----------------------------------- 3. the header never reaches a client

    def test_error_reply_passes_without_the_user_header(self):
        r = self.req("/app/error500")
        self.assertEqual(500, r.status, r)
        self.assert_no_user_header(r)
        self.assert_no_token(r)
        self.assertEqual(0, self.mock.calls())

    # ------------------------------------------------------ 4. preflights

    def test_preflight_with_a_broken_body_never_runs_the_protected_page(self):
        # the preflight itself is let through without a login; its broken
        # chunked body makes it a 400, and ErrorDocument 400 points inside
        # the protected location
        before = len(self.backend_hits())
        r = self.req("/papp/token", method="OPTIONS", headers=preflight() + [("Transfer-Encoding", "chunked")],
                     raw_tail=b"zz-not-a-chunk-size\r\ngarbage\r\n\r\n")
        ran = self.backend_hits()[before:]
        self.assertNotIn(SECRET.encode(), r.raw, "the backend ran %r for a preflight: %r" % (ran, r))
        self.assertNotEqual(200, r.status, r)
        self.assertEqual([], ran, "the backend ran for a preflight")
        self.assert_no_token(r)
        self.assertEqual(0, self.mock.calls())

    def test_preflight_is_refused_where_access_is_denied(self):
        before = len(self.backend_hits())
        for prefix in ("dapp", "iapp", "xapp"):
            with self.subTest(location=prefix):
                r = self.req("/%s/token" % prefix, method="OPTIONS", headers=preflight())
                self.assertEqual(403, r.status, r)
                self.assertNotIn("access-control-allow-methods", r.names(), r)
                # and a GET with the login cookie is denied too
                r = self.req("/%s/token" % prefix, cookie="s-alice")
                self.assertEqual(403, r.status, r)
                self.assert_no_token(r)
        self.assertEqual([], self.backend_hits()[before:])
        self.assertEqual(0, self.mock.calls())

    def test_preflight_needs_no_login_under_basic_auth(self):
        r = self.req("/papp/token", method="OPTIONS", headers=preflight())
        self.assertEqual(204, r.status, r)
        self.assertEqual([ORIGIN], r.all("access-control-allow-origin"), r)
        self.assertEqual(["true"], r.all("access-control-allow-credentials"), r)
        self.assertIn("GET", r.get("access-control-allow-methods") or "", r)
        self.assertNotIn("www-authenticate", r.names())
        # an unlisted origin gets Apache's login challenge
        r = self.req("/papp/token", method="OPTIONS", headers=preflight(EVIL))
        self.assertEqual(401, r.status, r)
        # the login still guards everything else: no login, a login
        r = self.req("/papp/token", cookie="s-alice")
        self.assertEqual(401, r.status, r)
        self.assert_no_token(r)
        r = self.req("/papp/token", cookie="s-alice", headers=[basic("alice")])
        self.assertEqual(200, r.status, r)
        self.assertEqual("alice", jwt_payload(r.json()["Token"])["sub"])

    def test_preflight_reaches_neither_the_api_nor_the_backend(self):
        before = len(self.backend_hits())
        for path in ("/app/token", "/app/secret", "/papp/token", "/papp/secret"):
            with self.subTest(path=path):
                r = self.req(path, method="OPTIONS", cookie="s-alice", headers=preflight())
                self.assertEqual(204, r.status, r)
                self.assertEqual(b"", r.body)
                self.assertNotIn(SECRET.encode(), r.raw)
                self.assert_no_user_header(r)
                # with a body (a well-formed one): still nothing behind it
                r = self.req(path, method="OPTIONS", cookie="s-alice", headers=preflight(), body=b"x=1")
                self.assertEqual(204, r.status, r)
                self.assertNotIn(SECRET.encode(), r.raw)
        self.assertEqual([], self.backend_hits()[before:], "a preflight reached the backend")
        self.assertEqual(0, self.mock.calls(), "a preflight called the API")


class CgiMixin:
    """Items of mod_cgi and mod_cgid: a script's "Location: /local/path"
    with status 200 is an internal redirect (RFC 3875 6.2.2). mod_proxy_fcgi
    of httpd 2.4 does no such redirect (the 200 is swapped for a token reply
    like any other); mod_proxy_scgi does (ProxySCGIInternalRedirect, on by
    default), but no SCGI backend is run here."""

    def test_local_location_redirect_never_leaks_the_user_header(self):
        # Location: /public/x.txt with status 200: mod_cgi(d) redirects
        # internally to the public file, outside CardScanBackendUser
        for method in ("GET", "HEAD"):
            with self.subTest(method=method):
                r = self.req("/app/redirect-local", method=method, cookie="s-alice")
                self.assert_no_user_header(r)
                self.assert_no_token(r)
                if method == "GET":
                    self.assertEqual(200, r.status, r)
                    self.assertEqual(PUBLIC_FILE.encode(), r.body, r)


class ProxiedMixin:
    """Items that need mod_proxy (ProxyErrorOverride)."""

    def test_error_document_never_leaks_the_user_header(self):
        # ProxyErrorOverride On + ErrorDocument 500 /public/err.html: the
        # backend's 500 names a user; the client gets the public error page
        r = self.req("/eapp/error500", cookie="s-alice")
        self.assertEqual(500, r.status, r)
        self.assertEqual(ERROR_PAGE.encode(), r.body, r)
        self.assertNotIn(b"BACKEND ERROR", r.body)
        self.assert_no_user_header(r)
        self.assert_no_token(r)
        r = self.req("/eapp/error500", method="HEAD", cookie="s-alice")
        self.assert_no_user_header(r)
        self.assertEqual(0, self.mock.calls())


class HttpTrailersMixin:
    """HTTP/1.1 trailers: only a proxied HTTP backend can send them."""

    def test_swapped_reply_carries_none_of_the_backends_trailers(self):
        # httpd 2.4's mod_proxy_http does not pass a backend's trailers on
        # to the client at all (checked on 2.4.71); this guards the swapped
        # reply on an httpd that does (r->trailers_out)
        r = self.req("/app/trailers", cookie="s-alice")
        self.assert_token_reply(r, "alice")
        self.assertEqual([], r.trailers, r)
        self.assertNotIn(b"X-Backend-Trailer", r.raw, r)
        self.assertNotIn(HEADER.encode(), r.raw, r)


class CgiPreforkTest(CgiMixin, BackendCase, MockTestCase):
    BACKEND, MPM = "cgi", "prefork"     # mod_cgi


class CgidEventTest(CgiMixin, BackendCase, MockTestCase):
    BACKEND, MPM = "cgi", "event"       # mod_cgid


class FcgiEventTest(ProxiedMixin, BackendCase, MockTestCase):
    BACKEND, MPM = "fcgi", "event"


class FcgiPreforkTest(ProxiedMixin, BackendCase, MockTestCase):
    BACKEND, MPM = "fcgi", "prefork"


class HttpEventTest(ProxiedMixin, HttpTrailersMixin, BackendCase, MockTestCase):
    BACKEND, MPM = "http", "event"


class HttpPreforkTest(ProxiedMixin, HttpTrailersMixin, BackendCase, MockTestCase):
    BACKEND, MPM = "http", "prefork"


if __name__ == "__main__":
    unittest.main()
