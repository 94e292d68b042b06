"""Identity pinning (CardScanIdentityPinning): a user's new token whose
IdentityId differs from the one pinned for that user is logged and counted
(alarm, the default), refused with 502 identity_mismatch (enforce), or let
through (off). The mock's identity_salt makes the API hand the same user
another identity, as if it had mixed people up. Tokens live 4 s with
CardScanCacheMinTTL 1, so the next token is fetched after 3 s."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import MockTestCase, apache_conf, auth_location, wait_for  # noqa: E402


class IdentityPinningTest(MockTestCase):

    def server(self, mode, mpm="event"):
        self.mock.config(lifetime=4)
        conf = apache_conf(endpoint=self.mock.http_url,
                           extra="CardScanRefreshAhead off\nCardScanCacheMinTTL 1\n"
                                 + ("CardScanIdentityPinning %s\n" % mode if mode else ""))
        return self.apache(mpm=mpm, global_conf=conf)

    def next_token(self, a, previous):
        """The user's next token, once the cached one is out of service."""
        deadline = time.time() + 10
        while time.time() < deadline:
            reply = a.request()
            if reply[0] != 200 or reply[3]["Token"] != previous:
                return reply
            time.sleep(0.2)
        raise AssertionError("no new token within 10 s")

    def changes(self, a):
        return a.log().count("AH10604")

    def test_alarm_is_the_default_logs_counts_and_serves(self):
        a = self.server(None)
        first = a.request()
        self.assertEqual(first[0], 200)
        self.mock.config(identity_salt=7)
        status, _, _, doc = self.next_token(a, first[3]["Token"])
        self.assertEqual(status, 200)
        self.assertNotEqual(doc["IdentityId"], first[3]["IdentityId"])
        wait_for(lambda: self.changes(a) == 1, 10, "the identity change logged")
        line = [ln for ln in a.log().splitlines() if "AH10604" in ln][0]
        self.assertIn(":error]", line)
        self.assertIn("served (CardScanIdentityPinning alarm)", line)
        # the user id and the identities stay out of the error level line
        self.assertNotIn("alice", line)
        self.assertNotIn(doc["IdentityId"], line)
        # the new identity is pinned: the token after it is no change
        status, _, _, again = self.next_token(a, doc["Token"])
        self.assertEqual(status, 200)
        self.assertEqual(self.changes(a), 1)

    def test_enforce_refuses_another_identity(self):
        a = self.server("enforce")
        first = a.request()
        self.assertEqual(first[0], 200)
        self.mock.config(identity_salt=7)
        status, headers, body, doc = self.next_token(a, first[3]["Token"])
        self.assertEqual(status, 502, body)
        self.assertEqual(doc["error"], "identity_mismatch")
        self.assertNotIn("Token", doc)
        self.assertIn("retry-after", headers)
        self.assertIn("refused (CardScanIdentityPinning enforce)", a.log())
        # while the pin lasts, the other identity stays refused
        time.sleep(5.2)  # the negative cache (5 s) runs out
        self.assertEqual(a.request()[0], 502)
        # the API gives the user's own identity back: served again
        self.mock.config(identity_salt="")
        deadline = time.time() + 10
        while a.request()[0] != 200:
            self.assertLess(time.time(), deadline, "the user's own identity is served again")
            time.sleep(0.5)

    def test_off_never_refuses_nor_logs(self):
        a = self.server("off")
        first = a.request()
        self.mock.config(identity_salt=7)
        status, _, _, doc = self.next_token(a, first[3]["Token"])
        self.assertEqual(status, 200)
        self.assertNotEqual(doc["IdentityId"], first[3]["IdentityId"])
        self.assertEqual(self.changes(a), 0)

    def test_change_is_counted_in_the_metrics_prefork(self):
        a = self.apache(mpm="prefork", global_conf=apache_conf(
            endpoint=self.mock.http_url, extra="CardScanRefreshAhead off\nCardScanCacheMinTTL 1\n"),
            body=auth_location("/m", "SetHandler cardscan-metrics"))
        self.mock.config(lifetime=4)
        first = a.request()
        self.mock.config(identity_salt=3)
        self.next_token(a, first[3]["Token"])
        _, _, body, _ = a.request(path="/m")
        self.assertIn("cardscan_identity_changes_total 1", body.decode())

    def test_directive_values_are_checked(self):
        for bad in ("CardScanIdentityPinning sometimes", "CardScanIdentityPinTTL 10"):
            a = self.apache(start=False, global_conf=apache_conf(endpoint=self.mock.http_url, extra=bad + "\n"))
            out = a.configtest()
            self.assertNotEqual(out.returncode, 0, bad)
            self.assertIn(bad.split()[0], out.stdout.decode())
