"""CardScanBackendUser against a real apache2 and a real application behind
mod_proxy: a small Python http.server app that keeps its own login in a
session cookie and names the logged-in user in X-CardScan-User. The module
swaps its 200 for that user's token reply; everything else passes through;
the client can never name the user."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import MockTestCase, apache_conf, jwt_payload, stop_pid, wait_for  # noqa: E402

HEADER = "X-CardScan-User"
SECRET_BODY = "BACKEND-PAGE-NOT-FOR-THE-CLIENT"

# The application: session cookie -> user; records the request headers it saw.
APP = r'''
import http.server, json, sys

SESSIONS = {"s-alice": "1234-uuid-alice", "s-bob": "5678-uuid-bob"}
SEEN = []

class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, headers=()):
        data = body.encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def user(self):
        for part in self.headers.get("Cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "session" and v in SESSIONS:
                return SESSIONS[v]
        return None

    def do_GET(self):
        if self.path == "/_seen":
            return self.reply(200, json.dumps(SEEN))
        SEEN.append({"path": self.path, "headers": [[k, v] for k, v in self.headers.items()]})
        user = self.user()
        extra = [("X-App-Internal", "secret-debug-value"), ("Set-Cookie", "tracking=1")]
        if self.path.startswith("/app/token"):
            if not user:
                return self.reply(401, "please log in", [("WWW-Authenticate", 'Cookie realm="portal"')])
            return self.reply(200, "%s for %s" % ("''' + SECRET_BODY + r'''", user), [("''' + HEADER + r'''", user)] + extra)
        if self.path.startswith("/app/login-redirect"):
            return self.reply(302, "to the login page", [("Location", "/login"), ("''' + HEADER + r'''", "1234-uuid-alice")])
        if self.path.startswith("/app/two-users"):
            return self.reply(200, "two", [("''' + HEADER + r'''", "a"), ("''' + HEADER + r'''", "b")])
        if self.path.startswith("/app/long-id"):
            return self.reply(200, "long", [("''' + HEADER + r'''", "x" * 2000)])
        if self.path.startswith("/app/plain"):
            return self.reply(200, "a page without a user", extra)
        return self.reply(404, "no such page")

    do_POST = do_GET
    do_HEAD = do_GET

srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), App)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
import os
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
srv.serve_forever()
'''


class BackendApp:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="cs-app-")
        script = os.path.join(self.dir, "app.py")
        with open(script, "w") as f:
            f.write(APP)
        portfile = os.path.join(self.dir, "port")
        self.proc = subprocess.Popen([sys.executable, script, portfile],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(portfile) or self.proc.poll() is not None, what="the app's port")
        if self.proc.poll() is not None:
            raise RuntimeError("the backend app exited")
        with open(portfile) as f:
            self.port = int(f.read())

    def seen(self):
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            c.request("GET", "/_seen")
            return json.loads(c.getresponse().read().decode())
        finally:
            c.close()

    def stop(self):
        stop_pid(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class BackendUserTest(MockTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        try:
            cls.app = BackendApp()
        except BaseException:
            super().tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.app.stop()
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        body = f"""
<Location "/app/">
    ProxyPass "http://127.0.0.1:{self.app.port}/app/"
    CardScanBackendUser {HEADER}
    CardScanAllowOrigin https://app.hospital.org
</Location>
"""
        self.httpd = self.apache(body=body, modules=("proxy", "proxy_http"))

    def get(self, path="/app/token", cookie=None, headers=None, method="GET"):
        h = dict(headers or {})
        if cookie:
            h["Cookie"] = "session=" + cookie
        return self.httpd.request(path=path, user=None, headers=h, method=method)

    def assert_swapped(self, resp, sub):
        st, hdrs, data, doc = resp
        self.assertEqual(200, st, data[:300])
        self.assertEqual("application/json", hdrs.get("content-type", "").split(";")[0])
        self.assertEqual("no-store", hdrs.get("cache-control"))
        self.assertEqual(sub, jwt_payload(doc["Token"])["sub"])
        self.assertEqual(doc["Token"], doc["session"])
        self.assertEqual("false", doc["live"])
        self.assertNotIn(SECRET_BODY.encode(), data)
        self.assertNotIn(HEADER.lower(), hdrs)
        # the backend's other headers went with its body
        self.assertNotIn("x-app-internal", hdrs)
        self.assertNotIn("set-cookie", hdrs)
        self.assertEqual(str(len(data)), hdrs.get("content-length"))
        return doc

    def test_login_cookie_gets_that_users_token(self):
        self.assert_swapped(self.get(cookie="s-alice"), "1234-uuid-alice")
        self.assert_swapped(self.get(cookie="s-bob"), "5678-uuid-bob")
        self.assertEqual(["1234-uuid-alice", "5678-uuid-bob"], self.mock.stats()["user_ids"])

    def test_second_request_is_a_cache_hit(self):
        first = self.assert_swapped(self.get(cookie="s-alice"), "1234-uuid-alice")
        second = self.assert_swapped(self.get(cookie="s-alice", method="POST"), "1234-uuid-alice")
        self.assertEqual(first["Token"], second["Token"])
        self.assertEqual(1, self.mock.calls())

    def test_no_cookie_passes_the_apps_401_through(self):
        st, hdrs, data, _ = self.get()
        self.assertEqual(401, st)
        self.assertEqual(b"please log in", data)
        self.assertEqual('Cookie realm="portal"', hdrs.get("www-authenticate"))
        self.assertEqual("text/html", hdrs.get("content-type"))
        self.assertEqual(0, self.mock.calls())

    def test_other_responses_pass_untouched_without_the_header(self):
        st, hdrs, data, _ = self.get(path="/app/login-redirect")
        self.assertEqual(302, st)
        self.assertEqual("/login", hdrs.get("location"))
        self.assertEqual(b"to the login page", data)
        self.assertNotIn(HEADER.lower(), hdrs)
        st, hdrs, data, _ = self.get(path="/app/plain", cookie="s-alice")
        self.assertEqual(200, st)
        self.assertEqual(b"a page without a user", data)
        self.assertEqual("secret-debug-value", hdrs.get("x-app-internal"))
        self.assertEqual(0, self.mock.calls())

    def test_client_sent_header_changes_nothing_and_never_reaches_the_app(self):
        forged = {HEADER: "9999-uuid-mallory", "X_CardScan_User": "9999-uuid-mallory"}
        st, _, data, _ = self.get(headers=forged)
        self.assertEqual(401, st)
        self.assertEqual(b"please log in", data)
        self.assert_swapped(self.get(cookie="s-alice", headers=forged), "1234-uuid-alice")
        self.assertEqual(["1234-uuid-alice"], self.mock.stats()["user_ids"])
        seen = [r for r in self.app.seen() if r["path"].startswith("/app/token")]
        self.assertGreaterEqual(len(seen), 2)
        for r in seen:
            names = [k.lower().replace("_", "-") for k, _ in r["headers"]]
            self.assertNotIn(HEADER.lower(), names, r)
            self.assertNotIn("9999-uuid-mallory", json.dumps(r))

    def test_user_id_checks_and_errors_are_the_handlers(self):
        st, _, data, doc = self.get(path="/app/long-id")
        self.assertEqual(403, st)
        self.assertEqual("invalid_user_id", doc["error"])
        st, _, data, doc = self.get(path="/app/two-users")
        self.assertEqual(403, st)
        self.assertEqual("invalid_user_id", doc["error"])
        self.assertNotIn(b"two", data)
        self.assertEqual(0, self.mock.calls())
        self.mock.config(fault="401")
        st, _, data, doc = self.get(cookie="s-bob")
        self.assertEqual(502, st)
        self.assertEqual("upstream_auth_failed", doc["error"])
        self.assertNotIn(SECRET_BODY.encode(), data)

    def test_head_gets_the_headers_only(self):
        st, hdrs, data, _ = self.get(cookie="s-alice", method="HEAD")
        self.assertEqual(200, st)
        self.assertEqual(b"", data)
        self.assertEqual("application/json", hdrs.get("content-type", "").split(";")[0])
        self.assertNotIn(HEADER.lower(), hdrs)

    def test_cors_on_the_swapped_reply_only(self):
        origin = {"Origin": "https://app.hospital.org"}
        st, hdrs, _, _ = self.get(cookie="s-alice", headers=origin)
        self.assertEqual(200, st)
        self.assertEqual("https://app.hospital.org", hdrs.get("access-control-allow-origin"))
        self.assertEqual("true", hdrs.get("access-control-allow-credentials"))
        # the app's own pages stay same-origin
        st, hdrs, _, _ = self.get(path="/app/plain", cookie="s-alice", headers=origin)
        self.assertNotIn("access-control-allow-origin", hdrs)
        # the preflight is answered here; the app never sees it
        n = len(self.app.seen())
        st, hdrs, _, _ = self.get(method="OPTIONS", headers=dict(origin, **{
            "Access-Control-Request-Method": "GET"}))
        self.assertEqual(204, st)
        self.assertEqual(n, len(self.app.seen()))


if __name__ == "__main__":
    unittest.main()
