"""Start-up checks: apache2 refuses, with a message that says what is wrong,
configurations that would leak or misuse the API key, both in `apache2 -t`
and in a real start; good configurations pass."""

import os
import sys
import tempfile
import shutil
import signal
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (DROP_DAC, LIVE_KEY, TEST_KEY, Apache, MockTestCase, apache_conf, jwt_payload,  # noqa: E402
                     session_dir, stop_pid)

SANDBOX = "https://sandbox.cardscan.ai/v1"
LIVE = "https://api.cardscan.ai/v1"
UNSET_ENV = "CS_IT_SURELY_UNSET_CARDSCAN_KEY"


class StartupTest(MockTestCase):

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix="cs-startup-")
        os.chmod(self.tmp, 0o755)
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def server(self, global_conf, body="", launcher=()):
        a = Apache(global_conf=global_conf, body=body, start=False, launcher=launcher)
        self.servers.append(a)  # stopped (and removed) by tearDown
        return a

    def key_file(self, content, mode):
        path = os.path.join(self.tmp, "key-%o" % mode)
        with open(path, "w") as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def assert_refused(self, global_conf, body="", expect=(), secrets=(), launcher=()):
        """apache2 -t and a real start both fail and print every text of
        expect; no secret of secrets appears in what they print."""
        a = self.server(global_conf, body, launcher)
        out = a.configtest()
        text = out.stdout.decode("utf-8", "replace")
        self.assertNotEqual(out.returncode, 0, text)
        self.assertNotIn("Syntax OK", text)
        for e in expect:
            self.assertIn(e, text)
        with self.assertRaises(RuntimeError) as cm:
            a.start()
        started = str(cm.exception)
        for e in expect:
            self.assertIn(e, started)
        for s in secrets:
            self.assertNotIn(s, text)
            self.assertNotIn(s, started)
        return text

    def assert_accepted(self, global_conf, body=""):
        a = self.server(global_conf, body)
        out = a.configtest()
        text = out.stdout.decode("utf-8", "replace")
        self.assertEqual(out.returncode, 0, text)
        self.assertIn("Syntax OK", text)
        return a, text

    # ---------------------------------------------------------- refused

    def test_malformed_keys(self):
        cases = [
            ("pk_live_0123456789abcdefghij", "does not start with sk_test_cardscan_ai_"),
            ("sk_test_cardscan_ai_abc", "too short"),
            ('"sk_test_cardscan_ai_0123 456789abcd"', "contains a character"),
            ("sk_test_cardscan_ai_0123456789abcd!", "contains a character"),
        ]
        for key, message in cases:
            with self.subTest(key=key):
                secret = key.strip('"')
                self.assert_refused(apache_conf(key=key, endpoint=self.mock.http_url),
                                    expect=("CardScanAPIKey", message),
                                    secrets=(secret,) if len(secret) > 24 else ())

    def test_plain_http_to_remote_host(self):
        self.assert_refused(apache_conf(endpoint="http://example.com/v1"),
                            expect=("CardScanEndpoint", "http:// is allowed only to a loopback host"))
        self.assert_refused(apache_conf(), body='<Location "/cardscan-session">\n'
                            '    CardScanEndpoint http://10.1.2.3/v1\n</Location>',
                            expect=("CardScanEndpoint", "loopback"))

    def test_live_key_against_sandbox_server_level(self):
        self.assert_refused(apache_conf(key=LIVE_KEY, endpoint=SANDBOX),
                            expect=("live key", "sandbox", "sk_live_cardscan_ai_"), secrets=(LIVE_KEY,))

    def test_live_key_against_sandbox_in_location(self):
        # the pair meets only after merging: key in the Location, endpoint above
        self.assert_refused(apache_conf(key=TEST_KEY, endpoint=SANDBOX),
                            body='<Location "/live">\n    CardScanAPIKey %s\n</Location>' % LIVE_KEY,
                            expect=("live key", "sandbox"), secrets=(LIVE_KEY,))
        # both in the Location
        self.assert_refused(apache_conf(endpoint=self.mock.http_url),
                            body='<Location "/live">\n    CardScanAPIKey %s\n    CardScanEndpoint %s\n'
                                 '</Location>' % (LIVE_KEY, SANDBOX),
                            expect=("live key", "sandbox"), secrets=(LIVE_KEY,))
        # a virtual host's key against the main server's endpoint
        self.assert_refused(apache_conf(key=TEST_KEY, endpoint=SANDBOX),
                            body='<VirtualHost 127.0.0.1:8>\n    ServerName v.example\n'
                                 '    CardScanAPIKey %s\n</VirtualHost>' % LIVE_KEY,
                            expect=("live key", "sandbox"), secrets=(LIVE_KEY,))

    def test_test_key_against_live_api(self):
        self.assert_refused(apache_conf(key=TEST_KEY, endpoint=LIVE),
                            expect=("test key", "live API", "sk_test_cardscan_ai_"), secrets=(TEST_KEY,))

    def test_key_file_missing_or_unreadable(self):
        missing = os.path.join(self.tmp, "no-such-key")
        self.assert_refused(apache_conf(key="file:" + missing, endpoint=self.mock.http_url),
                            expect=("CardScanAPIKey", "cannot read the API key file", missing))
        self.assert_refused(apache_conf(key="file:" + self.tmp, endpoint=self.mock.http_url),
                            expect=("CardScanAPIKey", "not a regular file"))
        # root reads a mode-000 file anyway: as root, apache2 runs without the
        # capabilities that override file modes (as a non-root user would)
        path = self.key_file(TEST_KEY + "\n", 0o000)
        self.assert_refused(apache_conf(key="file:" + path, endpoint=self.mock.http_url),
                            expect=("CardScanAPIKey", "cannot read the API key file", "Permission denied"),
                            launcher=DROP_DAC if os.geteuid() == 0 else ())

    def test_env_key_unset(self):
        self.assertNotIn(UNSET_ENV, os.environ)
        self.assert_refused(apache_conf(key="env:" + UNSET_ENV, endpoint=self.mock.http_url),
                            expect=("CardScanAPIKey", UNSET_ENV, "not set"))

    def test_unknown_cache_provider(self):
        self.assert_refused(apache_conf(endpoint=self.mock.http_url, extra="CardScanCache nosuch\n"),
                            expect=("CardScanCache", "nosuch"))

    # --------------------------------------------------------- accepted

    def test_good_config_starts(self):
        conf = apache_conf(endpoint=self.mock.http_url, extra="\n".join([
            'CardScanUserID "%{REMOTE_USER}"',
            "CardScanTimeout 2.5 1",
            'CardScanCAFile "%s/ca.pem"' % session_dir(),
            "CardScanCache shmcb",
            "CardScanCacheMinTTL 30",
            "CardScanProxy none",
        ]) + "\n")
        a, _ = self.assert_accepted(conf)
        a.start()
        doc = a.request()[3]
        self.assertEqual(jwt_payload(doc["Token"])["sub"], "alice")
        self.assertEqual(self.mock.calls(), 1)

    def test_env_key(self):
        name = "CS_IT_KEY_%d" % os.getpid()
        os.environ[name] = TEST_KEY
        self.addCleanup(os.environ.pop, name, None)
        a, _ = self.assert_accepted(apache_conf(key="env:" + name, endpoint=self.mock.http_url))
        a.start()
        self.assertEqual(a.request()[0], 200)
        self.assertEqual(self.mock.stats()["requests"][-1]["headers"]["authorization"], "Bearer " + TEST_KEY)

    def test_key_file_permissions(self):
        private = self.key_file(TEST_KEY + "\n", 0o600)
        _, text = self.assert_accepted(apache_conf(key="file:" + private, endpoint=self.mock.http_url))
        self.assertNotIn("readable by every user", text)
        self.assertNotIn(TEST_KEY, text)

        shared = self.key_file("  " + TEST_KEY + "\n\n", 0o644)
        conf = apache_conf(key="file:" + shared, endpoint=self.mock.http_url)
        _, text = self.assert_accepted(conf)
        self.assertIn("readable by every user", text)
        self.assertIn(shared, text)
        self.assertNotIn(TEST_KEY, text)
        # a warning, not a refusal: it starts and serves with the file's key
        a = self.server(conf)
        a.start()
        self.assertEqual(a.request()[0], 200)
        self.assertEqual(self.mock.stats()["requests"][-1]["headers"]["authorization"], "Bearer " + TEST_KEY)
        a.halt()
        started = a.proc.stdout.read().decode("utf-8", "replace") + a.log()
        self.assertIn("readable by every user", started)
        self.assertNotIn(TEST_KEY, started)


if __name__ == "__main__":
    unittest.main()
