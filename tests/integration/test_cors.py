"""CardScanAllowOrigin against a real apache2: CORS preflights from listed
origins answered without authentication (even under Require valid-user) and
without calling the API; every reply of the endpoint to a listed origin
readable by it; nothing for other origins, and never "*"."""

import os
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (HTTPD, Apache, MockTestCase, apache_conf, auth_location, httpd_env,  # noqa: E402
                     session_dir)

APP = "https://app.hospital.org"
APP2 = "http://localhost:8080"
EVIL = "https://evil.example"


def preflight(origin, method="GET", req_headers="authorization"):
    h = {"Origin": origin, "Access-Control-Request-Method": method}
    if req_headers:
        h["Access-Control-Request-Headers"] = req_headers
    return h


def cors_headers(hdrs):
    return {k: v for k, v in hdrs.items() if k.startswith("access-control-")}


def token_location(path, require, handler="cardscan-session"):
    """A location serving tokens to a listed origin, with its own Require
    lines (Basic auth configured; the Require decides)."""
    return f"""<Location "{path}">
    AuthType Basic
    AuthName "portal"
    AuthBasicProvider file
    AuthUserFile "{session_dir()}/htpasswd"
    {require}
    SetHandler {handler}
    CardScanAllowOrigin {APP}
</Location>"""


class CorsTest(MockTestCase):
    MPM = "event"

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        sd = session_dir()
        body = "\n".join([
            # Apache's access control refuses these whatever the login
            token_location("/denied", "Require all denied"),
            token_location("/ipdenied", "Require ip 10.0.0.1"),
            token_location("/exprfalse", "Require expr false"),
            # the handler's name in another case: core lowercases it
            token_location("/mixedcase", "Require valid-user", handler="CardScan-Session"),
            # the harness's /cardscan-session, with origins of its own
            '<Location "/cardscan-session">\n    CardScanAllowOrigin %s %s\n</Location>' % (APP, APP2),
            auth_location("/nouser", 'CardScanUserID "%{reqenv:NOPE}"\n    CardScanAllowOrigin ' + APP),
            # origins given at server level reach this one by inheritance
            auth_location("/inherited"),
            # a protected page that does not serve tokens: no bypass here
            f"""<Location "/private">
    AuthType Basic
    AuthName "portal"
    AuthBasicProvider file
    AuthUserFile "{sd}/htpasswd"
    Require valid-user
</Location>""",
        ])
        try:
            cls.httpd = Apache(mpm=cls.MPM, body=body, access_log=True, global_conf=apache_conf(
                endpoint=cls.mock.http_url, extra="CardScanAllowOrigin %s\n" % APP2))
        except BaseException:
            cls.mock.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.httpd.stop()
        super().tearDownClass()

    def assert_no_star(self, hdrs):
        for k, v in hdrs.items():
            self.assertNotIn("*", v if k.startswith("access-control-") else "", k)

    # ------------------------------------------------------------ preflight

    def test_preflight_from_listed_origin_needs_no_authentication(self):
        st, hdrs, data, _ = self.httpd.request(method="OPTIONS", user=None, headers=preflight(APP))
        self.assertEqual(204, st, data[:300])
        self.assertEqual(APP, hdrs.get("access-control-allow-origin"))
        self.assertEqual("true", hdrs.get("access-control-allow-credentials"))
        methods = {m.strip() for m in hdrs.get("access-control-allow-methods", "").split(",")}
        self.assertLessEqual({"GET", "POST"}, methods)
        allowed = {h.strip().lower() for h in hdrs.get("access-control-allow-headers", "").split(",")}
        self.assertLessEqual({"authorization", "content-type", "accept"}, allowed)
        self.assertGreater(int(hdrs.get("access-control-max-age", "0")), 0)
        self.assertIn("Origin", [v.strip() for v in hdrs.get("vary", "").split(",")])
        self.assertNotIn("www-authenticate", hdrs)
        self.assertEqual(b"", data)
        self.assert_no_star(hdrs)
        self.assertEqual(0, self.mock.calls(), "a preflight called the API")

    def test_preflight_for_post_and_for_every_listed_origin(self):
        for origin in (APP, APP2):
            st, hdrs, _, _ = self.httpd.request(method="OPTIONS", user=None,
                                                headers=preflight(origin, "POST", "content-type, authorization"))
            self.assertEqual(204, st, origin)
            self.assertEqual(origin, hdrs.get("access-control-allow-origin"))
        # no Access-Control-Request-Headers: no Allow-Headers needed
        st, hdrs, _, _ = self.httpd.request(method="OPTIONS", user=None, headers=preflight(APP, req_headers=None))
        self.assertEqual(204, st)
        self.assertEqual(0, self.mock.calls())

    def test_preflight_from_unlisted_origin_gets_the_login_challenge(self):
        for origin in (EVIL, "null", APP + ".evil.example", APP.replace("https", "http"), APP + ":8443"):
            st, hdrs, _, _ = self.httpd.request(method="OPTIONS", user=None, headers=preflight(origin))
            self.assertEqual(401, st, origin)
            self.assertEqual({}, cors_headers(hdrs), origin)
        self.assertEqual(0, self.mock.calls())

    def test_only_genuine_preflights_skip_authentication(self):
        # OPTIONS without Access-Control-Request-Method is no preflight
        st, hdrs, _, _ = self.httpd.request(method="OPTIONS", user=None, headers={"Origin": APP})
        self.assertEqual(401, st)
        # a preflight-looking GET is a GET: it needs the login
        st, _, _, _ = self.httpd.request(method="GET", user=None, headers=preflight(APP))
        self.assertEqual(401, st)
        # with the login, an OPTIONS that is no preflight is refused by the endpoint
        st, hdrs, _, doc = self.httpd.request(method="OPTIONS", headers={"Origin": APP})
        self.assertEqual(405, st)
        self.assertEqual("method_not_allowed", doc["error"])
        self.assertEqual(APP, hdrs.get("access-control-allow-origin"))
        self.assertEqual(0, self.mock.calls())

    def test_no_bypass_where_no_token_is_served(self):
        # CardScanAllowOrigin applies server-wide, but /private serves no tokens
        st, hdrs, _, _ = self.httpd.request(path="/private", method="OPTIONS", user=None, headers=preflight(APP2))
        self.assertEqual(401, st)
        self.assertEqual({}, cors_headers(hdrs))

    def test_server_level_origins_are_inherited(self):
        st, hdrs, _, _ = self.httpd.request(path="/inherited", method="OPTIONS", user=None,
                                            headers=preflight(APP2))
        self.assertEqual(204, st)
        self.assertEqual(APP2, hdrs.get("access-control-allow-origin"))
        # the Location's own list replaces the server's
        st, hdrs, _, _ = self.httpd.request(path="/nouser", method="OPTIONS", user=None, headers=preflight(APP2))
        self.assertEqual(401, st)

    def test_preflight_is_refused_where_access_control_denies_the_location(self):
        # the preflight skips the login, never Apache's access control
        for path in ("/denied", "/ipdenied", "/exprfalse"):
            with self.subTest(path=path):
                st, hdrs, data, _ = self.httpd.request(path=path, method="OPTIONS", user=None,
                                                       headers=preflight(APP))
                self.assertEqual(403, st, (hdrs, data[:300]))
                self.assertNotIn("access-control-allow-methods", hdrs)
                # a logged-in GET is denied too
                st, _, data, _ = self.httpd.request(path=path, headers={"Origin": APP})
                self.assertEqual(403, st, data[:300])
                self.assertNotIn(b"Token", data)
        self.assertEqual(0, self.mock.calls())

    def test_mixed_case_handler_name_serves_preflights_and_tokens(self):
        # SetHandler CardScan-Session: handler names are case-insensitive
        st, hdrs, data, doc = self.httpd.request(path="/mixedcase", headers={"Origin": APP})
        self.assertEqual(200, st, data[:300])
        self.assertTrue(doc["Token"].startswith("eyJ"))
        self.assertEqual(APP, hdrs.get("access-control-allow-origin"))
        calls = self.mock.calls()
        st, hdrs, data, _ = self.httpd.request(path="/mixedcase", method="OPTIONS", user=None,
                                               headers=preflight(APP))
        self.assertEqual(204, st, (hdrs, data[:300]))
        self.assertEqual(APP, hdrs.get("access-control-allow-origin"))
        self.assertEqual("true", hdrs.get("access-control-allow-credentials"))
        self.assertEqual(calls, self.mock.calls())
        # without the login: Apache's challenge, readable by the app
        st, hdrs, _, _ = self.httpd.request(path="/mixedcase", user=None, headers={"Origin": APP})
        self.assertEqual(401, st)
        self.assertEqual(APP, hdrs.get("access-control-allow-origin"))

    # -------------------------------------------------------------- replies

    def test_token_reply_to_listed_origin_is_readable(self):
        st, hdrs, data, doc = self.httpd.request(headers={"Origin": APP})
        self.assertEqual(200, st, data[:300])
        # alice's token may be cached by an earlier test of the class
        calls = self.mock.calls()
        self.assertLessEqual(calls, 1)
        self.assertTrue(doc["Token"].startswith("eyJ"))
        self.assertEqual(APP, hdrs.get("access-control-allow-origin"))
        self.assertEqual("true", hdrs.get("access-control-allow-credentials"))
        self.assertIn("Origin", [v.strip() for v in hdrs.get("vary", "").split(",")])
        self.assert_no_star(hdrs)
        # a cache hit too
        st, hdrs, _, _ = self.httpd.request(headers={"Origin": APP})
        self.assertEqual(200, st)
        self.assertEqual(APP, hdrs.get("access-control-allow-origin"))
        self.assertEqual(calls, self.mock.calls())

    def test_error_replies_to_listed_origin_are_readable(self):
        # the endpoint's own JSON error
        st, hdrs, _, doc = self.httpd.request(path="/nouser", headers={"Origin": APP})
        self.assertEqual(403, st)
        self.assertEqual("no_user_id", doc["error"])
        self.assertEqual(APP, hdrs.get("access-control-allow-origin"))
        self.assertEqual("true", hdrs.get("access-control-allow-credentials"))
        # an upstream failure
        self.mock.config(fault="500")
        st, hdrs, _, doc = self.httpd.request(user="carol", headers={"Origin": APP})
        self.assertEqual(502, st)
        self.assertEqual("upstream_error", doc["error"])
        self.assertEqual(APP, hdrs.get("access-control-allow-origin"))
        self.assertEqual("true", hdrs.get("access-control-allow-credentials"))
        # Apache's own login challenge, so that the app can tell it apart
        st, hdrs, _, _ = self.httpd.request(user=None, headers={"Origin": APP})
        self.assertEqual(401, st)
        self.assertEqual(APP, hdrs.get("access-control-allow-origin"))

    def test_unlisted_origins_get_no_cors_headers(self):
        for origin in (EVIL, "null", None):
            h = {"Origin": origin} if origin else {}
            st, hdrs, _, doc = self.httpd.request(user="bob", headers=h)
            self.assertEqual(200, st)
            self.assertTrue(doc["Token"])
            self.assertEqual({}, cors_headers(hdrs), origin)
        st, hdrs, _, _ = self.httpd.request(path="/nouser", headers={"Origin": EVIL})
        self.assertEqual(403, st)
        self.assertEqual({}, cors_headers(hdrs))


class CorsPreforkTest(CorsTest):
    """The same under prefork."""
    MPM = "prefork"


class CorsConfigTest(unittest.TestCase):

    def refused(self, line, expect):
        a = Apache(start=False, global_conf=apache_conf(extra=line + "\n"))
        try:
            # with the environment of a started server (the sanitizer build's preload)
            out = subprocess.run([HTTPD, "-t", "-f", a.conf], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 timeout=60, env=httpd_env())
            self.assertNotEqual(0, out.returncode, line)
            self.assertIn(expect, out.stdout.decode(errors="replace"))
        finally:
            a.stop()

    def test_wildcards_and_paths_are_refused(self):
        self.refused("CardScanAllowOrigin *", "CardScanAllowOrigin")
        self.refused("CardScanAllowOrigin https://*.hospital.org", "wildcards are not allowed")
        self.refused("CardScanAllowOrigin https://app.hospital.org/", "trailing slash")
        self.refused("CardScanAllowOrigin app.hospital.org", "scheme://host")


if __name__ == "__main__":
    unittest.main()
