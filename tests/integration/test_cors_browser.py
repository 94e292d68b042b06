"""CORS in a real browser: headless Chromium runs a page on one origin
(http://127.0.0.1:PORT) that fetches /cardscan-session on another
(http://localhost:PORT) with an Authorization header, which makes the
browser send a preflight first. The listed origin reads the Token; a page on
an origin CardScanAllowOrigin does not list (another port) cannot, and its
request never reaches the API. Skipped only when /usr/bin/chromium is
absent (scripts/test installs it)."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Apache, Mock, USERS, apache_conf, free_port  # noqa: E402
from browser import CHROMIUM, dump_dom, parse  # noqa: E402

# A single-page app on its own origin: fetches the endpoint given in the
# query with the user's credentials, shows the outcome in #result.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>cross-origin app</title></head>
<body><div id="result">pending</div>
<script>
const q = new URLSearchParams(location.search);
const show = (text) => { document.getElementById("result").textContent = text; };
fetch(q.get("endpoint"), {
  method: "GET",
  credentials: "include",
  headers: { "Authorization": "Basic " + btoa(q.get("user") + ":" + q.get("pw")), "Accept": "application/json" },
})
  .then((r) => r.json())
  .then((j) => show("token " + (j.Token || "none") + " live " + j.live))
  .catch((e) => show("blocked " + e.name));
</script></body></html>
"""


@unittest.skipUnless(os.path.exists(CHROMIUM), "needs " + CHROMIUM + " (apt-get install chromium)")
class CrossOriginAppInBrowser(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.mock = Mock(tls=False)
        cls.other_port = free_port()
        try:
            cls.httpd = Apache(start=False, access_log=True, global_conf=apache_conf(
                endpoint=cls.mock.http_url, extra="Listen 127.0.0.1:%d\n" % cls.other_port))
            origin = "http://127.0.0.1:%d" % cls.httpd.port
            with open(cls.httpd.conf, "a") as f:
                f.write('<Location "/cardscan-session">\n    CardScanAllowOrigin %s\n</Location>\n' % origin)
            with open(os.path.join(cls.httpd.dir, "app.html"), "w") as f:
                f.write(PAGE)
            os.chmod(os.path.join(cls.httpd.dir, "app.html"), 0o644)
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

    def run_app(self, page_port, user="alice"):
        url = "http://127.0.0.1:%d/app.html?endpoint=%s&user=%s&pw=%s" % (
            page_port, "http://localhost:%d/cardscan-session" % self.httpd.port, user, USERS[user])
        dom = dump_dom(url)
        found = parse(dom, ids=("result",))
        self.assertIn("result", found, dom[-2000:])
        return found["result"]["text"].strip()

    def access_lines(self):
        with open(self.httpd.access_log) as f:
            return [line.split() for line in f if line.strip()]

    def test_listed_origin_reads_the_token(self):
        result = self.run_app(self.httpd.port)
        self.assertRegex(result, r"^token eyJ\S+ live false$",
                         "page: %s\nerror log:\n%s" % (result, self.httpd.log()[-2000:]))
        self.assertEqual(["alice"], self.mock.stats()["user_ids"])
        # the browser did send a preflight, answered without a user
        lines = self.access_lines()
        self.assertIn(["-", "204", "OPTIONS", "/cardscan-session"], [l[1:] for l in lines])
        self.assertIn(["alice", "200", "GET", "/cardscan-session"], [l[1:] for l in lines])

    def test_unlisted_origin_cannot_read_it(self):
        result = self.run_app(self.other_port, user="bob")
        self.assertEqual("blocked TypeError", result)
        self.assertEqual(0, self.mock.calls(), "the API was called for an unlisted origin")


if __name__ == "__main__":
    unittest.main()
