"""The cardscan-session reply contract, end to end: a real apache2 (event and
prefork MPMs) with mod_cardscan in front of the CardScan mock.

Every test reads the mock's own record of what reached it (/_mock/stats), so
"no upstream call", "exactly one user_id" and "the key that was sent" are
checked where they happen, not inferred from the reply."""

import http.client
import os
import sys
import time
import unittest
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (TEST_KEY, Apache, Mock, MockTestCase, apache_conf, auth_location,  # noqa: E402
                     free_port, jwt_payload, rfc3339_utc, session_dir)

# A second sandbox key, accepted by the mock, for the per-<Location> and
# per-vhost key tests.
KEY2 = "sk_test_cardscan_ai_secondkey987654321wxyz"
TOKEN_KEYS = {"Token", "IdentityId", "session_id", "session", "expires_at", "live"}
ERROR_KEYS = {"error", "message"}
# The masked form of TEST_KEY. Apache escapes non-ASCII bytes in its error
# log, so U+2026 appears there either as is or as \xe2\x80\xa6.
MASKED_TEST_KEY = ("sk_test_cardscan_ai_\u2026abcd", "sk_test_cardscan_ai_\\xe2\\x80\\xa6abcd")


def standard_body():
    """The Locations every server of this file has, besides the harness's
    protected /cardscan-session."""
    return "\n".join([
        # the handler with no authentication at all: must fail closed
        '<Location "/open">\n    SetHandler cardscan-session\n</Location>',
        # an id expression that is empty for everyone: must fail closed
        auth_location("/nouser", 'CardScanUserID "%{reqenv:NOPE}"'),
        auth_location("/tenant", 'CardScanUserID "tenant1:%{REMOTE_USER}"'),
        auth_location("/k2", "CardScanAPIKey " + KEY2),
    ])


class ContractTests:
    """The contract; run once per MPM by the subclasses at the bottom."""

    mpm = None

    @classmethod
    def setUpClass(cls):
        cls.mock = Mock(api_keys=(TEST_KEY, KEY2))
        try:
            # one server for the checks that never reach the upstream (or
            # only with user ids no other test uses)
            cls.shared = Apache(mpm=cls.mpm, body=standard_body(),
                                global_conf=apache_conf(endpoint=cls.mock.http_url))
        except BaseException:
            cls.mock.stop()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.shared.stop()
        cls.mock.stop()

    # ------------------------------------------------------------ helpers

    def fresh(self, body=None, global_conf=None, **kw):
        """A server of this test's own: an empty token cache."""
        return self.apache(mpm=self.mpm, body=standard_body() if body is None else body,
                           global_conf=global_conf, **kw)

    def assert_token(self, resp, sub, session_id=True):
        status, hdrs, data, doc = resp
        self.assertEqual(status, 200, data[:300])
        self.assertEqual(hdrs.get("content-type", "").split(";")[0].strip(), "application/json")
        self.assertEqual(hdrs.get("cache-control"), "no-store")
        self.assertIsInstance(doc, dict, data[:300])
        expected = TOKEN_KEYS if session_id else TOKEN_KEYS - {"session_id"}
        self.assertEqual(set(doc), expected)
        for k, v in doc.items():
            self.assertIsInstance(v, str, "%s is not a string" % k)
            self.assertTrue(v, "%s is empty" % k)
        self.assertEqual(doc["session"], doc["Token"])
        self.assertEqual(jwt_payload(doc["Token"])["sub"], sub)
        return doc

    def assert_error(self, resp, status, code):
        st, hdrs, data, doc = resp
        self.assertEqual(st, status, data[:300])
        self.assertEqual(hdrs.get("content-type", "").split(";")[0].strip(), "application/json")
        self.assertEqual(hdrs.get("cache-control"), "no-store")
        self.assertIsInstance(doc, dict, data[:300])
        self.assertEqual(set(doc), ERROR_KEYS)
        self.assertEqual(doc["error"], code)
        self.assertIsInstance(doc["message"], str)
        self.assertTrue(doc["message"])
        self.assert_no_secret(data)
        return doc

    def assert_no_secret(self, data):
        text = data.decode("utf-8", "replace")
        self.assertNotIn("Token", text)
        self.assertNotIn("eyJ", text)  # any base64url JSON object: a JWT part
        self.assertNotIn(TEST_KEY, text)

    def requests_seen(self):
        return self.mock.stats()["requests"]

    # ------------------------------------------------------ reply contract

    def test_reply_contract(self):
        a = self.fresh()
        self.mock.config(lifetime=1234)
        t0 = time.time()
        r = a.request()
        t1 = time.time()
        doc = self.assert_token(r, "alice")
        self.assertRegex(doc["expires_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        exp = rfc3339_utc(doc["expires_at"])
        self.assertGreaterEqual(exp, int(t0) + 1234 - 2)
        self.assertLessEqual(exp, t1 + 1234 + 2)
        self.assertEqual(self.mock.calls(), 1)
        # what reached the API
        req = self.requests_seen()[-1]
        self.assertEqual(req["method"], "GET")
        self.assertEqual(req["path"], "/v1/access-token")
        self.assertEqual(req["user_ids"], ["alice"])
        self.assertEqual(req["headers"].get("authorization"), "Bearer " + TEST_KEY)
        self.assertEqual(req["headers"].get("accept"), "application/json")
        self.assertTrue(req["headers"].get("user-agent", "").startswith("mod_cardscan/"))
        # the cached reply is the same reply
        r2 = a.request()
        self.assertEqual(self.assert_token(r2, "alice"), doc)
        self.assertEqual(self.mock.calls(), 1)
        # no session_id upstream: none in the reply
        self.mock.config(session_id=0)
        self.assert_token(a.request(user="bob"), "bob", session_id=False)
        self.assertEqual(self.mock.calls(), 2)

    # ------------------------------------------------------------ methods

    def test_post_and_head(self):
        a = self.fresh()
        token = self.assert_token(a.request(), "alice")["Token"]
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        js = {"Content-Type": "application/json"}
        for body, hdrs in ((b"a=1&b=2", form), (b'{"a": 1}', js), (b"", form), (b"x" * 100000, form)):
            with self.subTest(body=body[:20]):
                doc = self.assert_token(a.request(method="POST", body=body, headers=hdrs), "alice")
                self.assertEqual(doc["Token"], token)
        # a POST body is consumed, not read as the next request on the connection
        c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
        try:
            smuggled = b"GET /cardscan-session HTTP/1.1\r\nHost: x\r\n\r\n"
            self.assert_token(a.request(method="POST", body=smuggled, headers=form, conn=c), "alice")
            self.assertEqual(self.assert_token(a.request(conn=c), "alice")["Token"], token)
        finally:
            c.close()
        status, hdrs, data, _ = a.request(method="HEAD")
        self.assertEqual(status, 200)
        self.assertEqual(data, b"")
        self.assertEqual(hdrs.get("content-type", "").split(";")[0].strip(), "application/json")
        self.assertEqual(hdrs.get("cache-control"), "no-store")
        self.assertEqual(self.mock.calls(), 1)

    def test_other_methods_405(self):
        for method in ("PUT", "DELETE", "OPTIONS", "PATCH"):
            with self.subTest(method=method):
                body = b'{"user_id": "bob"}' if method in ("PUT", "PATCH") else None
                r = self.shared.request(method=method, body=body)
                self.assert_error(r, 405, "method_not_allowed")
                allow = {m.strip() for m in r[1].get("allow", "").split(",") if m.strip()}
                self.assertEqual(allow, {"GET", "POST"})
        self.assertEqual(self.mock.calls(), 0)

    # ------------------------------------------------------- fail closed

    def test_no_authentication_configured_401(self):
        self.assert_error(self.shared.request("/open", user=None), 401, "unauthenticated")
        # credentials nobody checks do not make a user either
        self.assert_error(self.shared.request("/open", user="alice"), 401, "unauthenticated")
        self.assert_error(self.shared.request("/open", user=None, method="POST", body=b"x=1"),
                          401, "unauthenticated")
        self.assertEqual(self.mock.calls(), 0)

    def test_wrong_password_401(self):
        for user, pw in (("alice", "wrong"), ("alice", ""), ("mallory", "x")):
            with self.subTest(user=user, pw=pw):
                status, hdrs, data, _ = self.shared.request(user=user, password=pw)
                self.assertEqual(status, 401)
                self.assertIn("www-authenticate", hdrs)
                self.assert_no_secret(data)
        status, hdrs, data, _ = self.shared.request(user=None)
        self.assertEqual(status, 401)
        self.assertIn("www-authenticate", hdrs)
        self.assertEqual(self.mock.calls(), 0)

    def test_empty_user_id_403(self):
        self.assert_error(self.shared.request("/nouser"), 403, "no_user_id")
        self.assert_error(self.shared.request("/nouser", user="bob", method="POST", body=b""),
                          403, "no_user_id")
        self.assertEqual(self.mock.calls(), 0)

    # ---------------------------------------------------------- identity

    def test_user_id_encoding(self):
        a = self.fresh()
        for name in ("a&user_id=b", "x y", "\u00fc@h.example"):
            with self.subTest(user=name):
                self.assert_token(a.request(user=name), name)
                req = self.requests_seen()[-1]
                self.assertEqual(req["user_ids"], [name])
                q = req["raw_query"]
                # one parameter, RFC 3986: only unreserved characters and %XX
                self.assertRegex(q, r"^user_id=(?:[A-Za-z0-9._~-]|%[0-9A-Fa-f]{2})+$")
                self.assertEqual(urllib.parse.unquote(q[len("user_id="):], errors="strict"), name)
        self.assertEqual(self.mock.stats()["user_ids"], ["a&user_id=b", "x y", "\u00fc@h.example"])

    def test_identity_cannot_be_spoofed(self):
        a = self.fresh()
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        attempts = [
            dict(path="/cardscan-session?user_id=bob"),
            dict(path="/cardscan-session?user_id=bob&user_id=carol"),
            dict(method="POST", body=b"user_id=bob", headers=form),
            dict(path="/cardscan-session?user_id=bob", method="POST", body=b'{"user_id": "bob"}',
                 headers={"Content-Type": "application/json"}),
            dict(headers={"X-User-Id": "bob"}),
            dict(headers={"X-Remote-User": "bob"}),
            dict(headers={"Remote-User": "bob", "X-Forwarded-User": "bob"}),
        ]
        tokens = set()
        for kw in attempts:
            with self.subTest(**{k: str(v) for k, v in kw.items()}):
                tokens.add(self.assert_token(a.request(**kw), "alice")["Token"])
        self.assertEqual(len(tokens), 1)
        seen = self.requests_seen()
        self.assertEqual([r["user_ids"] for r in seen], [["alice"]])
        self.assertEqual(seen[0]["raw_query"], "user_id=alice")
        # and the other way round
        self.assert_token(a.request("/cardscan-session?user_id=alice", user="bob",
                                    headers={"X-User-Id": "alice"}), "bob")
        self.assertEqual(self.mock.stats()["user_ids"], ["alice", "bob"])

    def test_user_id_expression(self):
        # the shared server: no other test fetches tenant1:* ids
        a = self.shared
        self.assert_token(a.request("/tenant"), "tenant1:alice")
        self.assert_token(a.request("/tenant", user="x y"), "tenant1:x y")
        self.assertEqual(self.mock.stats()["user_ids"], ["tenant1:alice", "tenant1:x y"])

    # ------------------------------------------------------ error mapping

    FAULTS = [("401", "upstream_auth_failed"), ("403", "upstream_auth_failed"),
              ("500", "upstream_error"), ("notjson", "upstream_error"), ("html", "upstream_error"),
              ("notoken", "upstream_error"), ("notjwt", "upstream_error")]

    def test_error_mapping(self):
        # One <Location> per fault, each with its own constant id prefix, so
        # that every case starts with no cached token for its user.
        body = standard_body() + "\n".join(
            auth_location("/f%d" % i, 'CardScanUserID "f%d:%%{REMOTE_USER}"' % i)
            for i in range(len(self.FAULTS)))
        a = self.fresh(body=body)
        for i, (fault, code) in enumerate(self.FAULTS):
            with self.subTest(fault=fault):
                path = "/f%d" % i
                self.mock.reset()
                self.mock.config(fault=fault)
                mark = len(a.log())
                first = a.request(path)
                self.assert_error(first, 502, code)
                self.assertEqual(self.mock.calls(), 1, "no retry expected for fault %s" % fault)
                self.assertTrue(1 <= int(first[1].get("retry-after", "0")) <= 5, first[1])
                # the user's next request at once: the same failure from the
                # user's negative cache, no call
                again = a.request(path)
                self.assert_error(again, 502, code)
                self.assertEqual(again[2], first[2])
                self.assertEqual(self.mock.calls(), 1)
                log = a.log()[mark:]
                self.assertNotIn(TEST_KEY, log)
                if code == "upstream_auth_failed":
                    self.assertTrue(any(m in log for m in MASKED_TEST_KEY),
                                    "the masked key is not named in the log:\n" + log)
                # no token was cached, and other users are not affected
                self.mock.config(fault="none")
                self.assert_token(a.request(path, user="bob"), "f%d:bob" % i)
                self.assertEqual(self.mock.calls(), 2)
        self.assertNotIn(TEST_KEY, a.log())

    # ------------------------------------------------------------- keys

    def test_per_location_keys(self):
        a = self.fresh()
        t1 = self.assert_token(a.request(), "alice")["Token"]
        t2 = self.assert_token(a.request("/k2"), "alice")["Token"]
        self.assertNotEqual(t1, t2)
        seen = self.requests_seen()
        self.assertEqual([r["headers"].get("authorization") for r in seen],
                         ["Bearer " + TEST_KEY, "Bearer " + KEY2])
        # each is cached under its own key
        self.assertEqual(self.assert_token(a.request(), "alice")["Token"], t1)
        self.assertEqual(self.assert_token(a.request("/k2"), "alice")["Token"], t2)
        self.assertEqual(self.mock.calls(), 2)

    def test_vhost_key_merge(self):
        p2, p3 = free_port(), free_port()
        body = standard_body() + """
Listen 127.0.0.1:{p2}
Listen 127.0.0.1:{p3}
# a tenant with its own key; the endpoint comes from the main server
<VirtualHost 127.0.0.1:{p2}>
    ServerName tenant2.example
    CardScanAPIKey {key2}
{own}
</VirtualHost>
# nothing of mod_cardscan: everything from the main server
<VirtualHost 127.0.0.1:{p3}>
    ServerName tenant3.example
</VirtualHost>
""".format(p2=p2, p3=p3, key2=KEY2, own=auth_location("/own", "CardScanAPIKey " + TEST_KEY))
        a = self.fresh(body=body)
        t_main = self.assert_token(a.request(), "alice")["Token"]
        t_vhost = self.assert_token(a.request(port=p2), "alice")["Token"]
        self.assertNotEqual(t_main, t_vhost)
        self.assert_token(a.request("/own", user="bob", port=p2), "bob")
        self.assert_token(a.request(user="carol", port=p3), "carol")
        seen = self.requests_seen()
        self.assertEqual([(r["user_ids"], r["headers"].get("authorization")) for r in seen],
                         [(["alice"], "Bearer " + TEST_KEY), (["alice"], "Bearer " + KEY2),
                          (["bob"], "Bearer " + TEST_KEY), (["carol"], "Bearer " + TEST_KEY)])
        # same key, endpoint and user: the same cache entry, whichever vhost
        self.assertEqual(self.assert_token(a.request(port=p3), "alice")["Token"], t_main)
        self.assertEqual(self.assert_token(a.request("/own", port=p2), "alice")["Token"], t_main)
        self.assertEqual(self.assert_token(a.request(port=p2), "alice")["Token"], t_vhost)
        self.assertEqual(self.mock.calls(), 4)

    # -------------------------------------------------------------- TLS

    def test_https_upstream(self):
        wrong = Mock(cert="wronghost", api_keys=(TEST_KEY,))
        self.addCleanup(wrong.stop)
        sd = session_dir()
        p2, p3 = free_port(), free_port()
        body = standard_body() + """
Listen 127.0.0.1:{p2}
Listen 127.0.0.1:{p3}
<VirtualHost 127.0.0.1:{p2}>
    ServerName other-ca.example
    CardScanCAFile "{sd}/other-ca.pem"
</VirtualHost>
<VirtualHost 127.0.0.1:{p3}>
    ServerName wronghost.example
    CardScanEndpoint {wrong}
</VirtualHost>
""".format(p2=p2, p3=p3, sd=sd, wrong=wrong.https_url)
        conf = apache_conf(endpoint=self.mock.https_url, extra='CardScanCAFile "%s/ca.pem"\n' % sd)
        a = self.fresh(body=body, global_conf=conf)
        self.assert_token(a.request(), "alice")
        stats = self.mock.stats()
        self.assertEqual(stats["calls"], 1)
        self.assertTrue(stats["requests"][-1]["tls"])
        # an unknown CA: no request (and no key) reaches the server
        self.assert_error(a.request(user="bob", port=p2), 502, "upstream_error")
        self.assertEqual(self.mock.calls(), 1)
        # a certificate for another host name
        self.assert_error(a.request(user="bob", port=p3), 502, "upstream_error")
        self.assertEqual(wrong.calls(), 0)
        self.assertNotIn(TEST_KEY, a.log())


class EventContractTest(ContractTests, MockTestCase):
    mpm = "event"


class PreforkContractTest(ContractTests, MockTestCase):
    mpm = "prefork"


if __name__ == "__main__":
    unittest.main()
