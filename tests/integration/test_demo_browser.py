"""End to end in a real browser: the demo portal (demo/portal/) served by
apache2 behind Basic auth, calling /cardscan-session with fetch(), driven by
headless Chromium; the bundled mock stands in for CardScan.

Chromium's --dump-dom is enough: a page opened as http://user:pw@host/ has
its credentials cached for the realm, and the portal's fetch() (which uses
location.origin, so the URL carries no credentials) answers the 401
challenge of /cardscan-session from that cache, as a browser that logged in
does. Skipped only when /usr/bin/chromium is absent (scripts/test installs
it)."""

import datetime
import os
import shutil
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import Apache, Mock, USERS, apache_conf, session_dir  # noqa: E402
from browser import CHROMIUM, dump_dom, parse  # noqa: E402

PORTAL_SRC = os.path.join(harness.SRCDIR, "demo", "portal")
REALM = "portal"  # the harness's /cardscan-session realm: the browser reuses the credentials


@unittest.skipUnless(os.path.exists(CHROMIUM), "needs " + CHROMIUM + " (apt-get install chromium)")
class DemoPortalInBrowser(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.mock = Mock(tls=False)
        sd = session_dir()
        body = f"""
<Location "/portal/">
    AuthType Basic
    AuthName "{REALM}"
    AuthBasicProvider file
    AuthUserFile "{sd}/htpasswd"
    Require valid-user
    DirectoryIndex index.html
</Location>
"""
        try:
            cls.httpd = Apache(body=body, global_conf=apache_conf(endpoint=cls.mock.http_url),
                               modules=("dir",), start=False)
            shutil.copytree(PORTAL_SRC, os.path.join(cls.httpd.dir, "portal"))
            for root, dirs, files in os.walk(os.path.join(cls.httpd.dir, "portal")):
                for n in dirs + files:
                    os.chmod(os.path.join(root, n), 0o755 if n in dirs else 0o644)
            cls.httpd.start()
        except Exception:
            cls.mock.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.httpd.stop()
        cls.mock.stop()

    def setUp(self):
        self.mock.reset()

    def portal(self, user):
        url = "http://%s:%s@127.0.0.1:%d/portal/" % (user, USERS[user], self.httpd.port)
        dom = dump_dom(url)
        found = parse(dom)
        for ident in ("status", "user", "identity", "expires", "error", "cardscan-widget"):
            self.assertIn(ident, found, "#%s missing from the page:\n%s" % (ident, dom[-2000:]))
        return found, dom

    def assert_session_for(self, user):
        found, dom = self.portal(user)
        self.assertEqual("session token received", found["status"]["text"].strip(),
                         "page:\n%s\nerror log:\n%s" % (dom[-2500:], self.httpd.log()[-2000:]))
        self.assertEqual(user, found["user"]["text"].strip())
        identity = found["identity"]["text"].strip()
        self.assertTrue(identity.startswith("us-east-1:"), identity)
        expires_at = found["expires"]["attrs"].get("data-expires-at", "")
        when = datetime.datetime.strptime(expires_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        self.assertGreater(when.timestamp(), time.time())
        self.assertLess(when.timestamp(), time.time() + 900 + 60)
        self.assertNotIn("–", found["expires"]["text"])
        self.assertIn("hidden", found["error"]["attrs"])
        self.assertTrue(found["cardscan-widget"]["attrs"].get("data-session-token", "").startswith("eyJ"))
        # the page shows what the endpoint itself answers for that user
        status, _, _, doc = self.httpd.request(user=user)
        self.assertEqual(200, status)
        self.assertEqual(doc["IdentityId"], identity)
        self.assertIn(user, self.mock.stats()["user_ids"])
        return identity

    def test_alice_then_bob(self):
        alice = self.assert_session_for("alice")
        bob = self.assert_session_for("bob")
        self.assertNotEqual(alice, bob)

    def test_error_reply_is_shown(self):
        # carol has no cached token: the upstream rejects the key
        self.mock.config(fault="401")
        found, dom = self.portal("carol")
        self.assertEqual("failed", found["status"]["text"].strip(), dom[-2500:])
        self.assertNotIn("hidden", found["error"]["attrs"])
        self.assertEqual("upstream_auth_failed", found["error"]["attrs"].get("data-error"))
        self.assertIn("HTTP 502", found["error"]["text"])
        self.assertEqual("–", found["user"]["text"].strip())


if __name__ == "__main__":
    unittest.main()
