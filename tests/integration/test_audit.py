"""The audit log documented in conf/cardscan.conf, through a real CustomLog:
the request notes cardscan-outcome and cardscan-upstream-ms say who got a
token, when, and whether it came from the cache or from the API."""

import os
import re
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import MockTestCase, apache_conf, auth_location, run_concurrently, wait_for  # noqa: E402

LINE = re.compile(r'^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}) (\S+) "(.*)" (\d{3}) (\S+) (\S+)$')


def documented_audit_log(log_dir):
    """The LogFormat and CustomLog lines of conf/cardscan.conf, uncommented,
    logging into log_dir."""
    lines = []
    with open(os.path.join(harness.SRCDIR, "conf", "cardscan.conf")) as f:
        for line in f:
            line = line.strip()
            if line.startswith(("#LogFormat", "#CustomLog")) and "cardscan_audit" in line:
                lines.append(line[1:].replace("${APACHE_LOG_DIR}", log_dir))
    assert len(lines) == 2, lines
    return "\n".join(lines) + "\n"


class AuditLogTest(MockTestCase):

    def setUp(self):
        super().setUp()
        self.log_dir = None
        conf = apache_conf(endpoint=self.mock.http_url, extra="CardScanCircuitBreaker 2 30\n")
        a = self.apache(start=False, global_conf=conf,
                        body=auth_location("/nouser", 'CardScanUserID "%{reqenv:NOPE}"'))
        self.log_dir = a.dir
        with open(a.conf, "a") as f:
            f.write(documented_audit_log(a.dir))
        a.start()
        self.httpd = a
        self.audit = os.path.join(a.dir, "cardscan-audit.log")

    def entries(self, n):
        """The audit log's lines once it has n of them (mod_log_config writes
        after the reply)."""
        def read():
            try:
                with open(self.audit) as f:
                    return [l.rstrip("\n") for l in f if l.strip()]
            except OSError:
                return []
        wait_for(lambda: len(read()) >= n, 10, "%d audit lines" % n)
        out = []
        for line in read():
            m = LINE.match(line)
            self.assertIsNotNone(m, line)
            out.append(m.groups())
        return out

    def test_who_when_and_whether_from_the_cache(self):
        t0 = time.time()
        expected = [(dict(user="alice"), 200), (dict(user="alice"), 200),
                    (dict(user="x y", method="POST"), 200), (dict(path="/nouser"), 403),
                    (dict(method="PUT", body=b"x"), 405)]
        for i, (kw, status) in enumerate(expected):
            self.assertEqual(status, self.httpd.request(**kw)[0])
            self.entries(i + 1)  # one line per request, in order
        # not the endpoint's doing: Apache's login challenge is not audited
        self.assertEqual(401, self.httpd.request(user=None)[0])
        self.assertEqual(404, self.httpd.request(path="/nothing-here", user=None)[0])
        self.assertEqual(200, self.httpd.request(user="bob")[0])
        lines = self.entries(6)
        self.assertEqual(6, len(lines), lines)
        (when, addr, user, status, outcome, ms) = lines[0]
        stamp = time.mktime(time.strptime(when[:19], "%Y-%m-%dT%H:%M:%S"))
        self.assertLess(abs(stamp - t0), 120)
        self.assertEqual(("127.0.0.1", "alice", "200", "fetched"), (addr, user, status, outcome))
        self.assertRegex(ms, r"^\d+$")
        self.assertEqual(("alice", "200", "hit", "-"), lines[1][2:])
        self.assertEqual(("x y", "200", "fetched"), lines[2][2:5])
        self.assertEqual(("alice", "403", "denied", "-"), lines[3][2:])
        self.assertEqual(("alice", "405", "denied", "-"), lines[4][2:])
        self.assertEqual(("bob", "200", "fetched"), lines[5][2:5])
        self.assertEqual(3, self.mock.calls())

    def test_upstream_time_is_the_calls(self):
        self.mock.config(latency_ms=300)
        self.assertEqual(200, self.httpd.request(user="bob")[0])
        (_, _, user, status, outcome, ms), = self.entries(1)
        self.assertEqual(("bob", "200", "fetched"), (user, status, outcome))
        self.assertGreaterEqual(int(ms), 300)
        self.assertLess(int(ms), 30000)

    def test_errors_and_the_open_breaker(self):
        self.mock.config(fault="500")
        for i, (user, status) in enumerate((("alice", 502), ("bob", 502), ("carol", 503))):
            self.assertEqual(status, self.httpd.request(user=user)[0])
            lines = self.entries(i + 1)
        self.assertEqual(("alice", "502", "error"), lines[0][2:5])
        self.assertRegex(lines[0][5], r"^\d+$")
        self.assertEqual(("bob", "502", "error"), lines[1][2:5])
        self.assertEqual(("carol", "503", "unavailable", "-"), lines[2][2:])

    def test_concurrent_requests_wait_for_one_call(self):
        self.mock.config(latency_ms=800)
        results = run_concurrently(lambda: self.httpd.request(user="carol")[0], [()] * 6)
        self.assertEqual([200] * 6, results)
        lines = self.entries(6)
        outcomes = sorted(l[4] for l in lines)
        self.assertEqual(1, outcomes.count("fetched"), outcomes)
        self.assertLessEqual(set(outcomes), {"fetched", "waited", "hit"})
        self.assertIn("waited", outcomes)
        for l in lines:
            self.assertEqual(l[4] == "fetched", l[5] != "-", l)
        self.assertEqual(1, self.mock.calls())


if __name__ == "__main__":
    unittest.main()
