"""The environment in the reply: "live" follows the API key's mode, as a
string; a test key is noticed once at start-up as not for PHI."""

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import LIVE_KEY, TEST_KEY, MockTestCase, apache_conf, auth_location  # noqa: E402

NOTICE = "not HIPAA compliant and must not see PHI"


class LiveFieldTest(MockTestCase):

    def test_test_key_tokens_say_live_false(self):
        a = self.apache()
        st, _, data, doc = a.request()
        self.assertEqual(200, st, data[:300])
        self.assertEqual("false", doc["live"])
        # a cache hit carries it too
        self.assertEqual("false", a.request()[3]["live"])
        self.assertEqual(1, self.mock.calls())

    def test_live_key_tokens_say_live_true(self):
        a = self.apache(global_conf=apache_conf(key=LIVE_KEY, endpoint=self.mock.http_url))
        st, _, data, doc = a.request()
        self.assertEqual(200, st, data[:300])
        self.assertEqual("true", doc["live"])
        self.assertNotIn(NOTICE, a.log())

    def test_the_key_of_the_location_decides(self):
        a = self.apache(global_conf=apache_conf(key=LIVE_KEY, endpoint=self.mock.http_url),
                        body=auth_location("/sandbox", "CardScanAPIKey " + TEST_KEY))
        self.assertEqual("true", a.request()[3]["live"])
        self.assertEqual("false", a.request(path="/sandbox")[3]["live"])

    def test_sandbox_notice_once_at_start_up(self):
        body = "\n".join(auth_location("/t%d" % i, "CardScanAPIKey " + TEST_KEY) for i in range(3))
        a = self.apache(body=body, loglevel="warn")
        self.assertEqual(1, a.log().count(NOTICE), a.log())
        self.assertIn("[cardscan:notice]", a.log())
        self.assertNotIn(TEST_KEY, a.log())
        for i in range(3):
            self.assertEqual(200, a.request(path="/t%d" % i)[0])
        self.assertEqual(1, a.log().count(NOTICE))


if __name__ == "__main__":
    unittest.main()
