"""Refresh ahead under load, against a real apache2 and the bundled mock: a
refresh runs in a background thread after its request has ended, so it must
not read anything the request owned (the request pool, and with it the
per-directory configuration httpd merges per request). Many users, short
tokens and API latency keep refreshes in flight while the same threads and
processes serve other requests, which reuse the ended requests' memory."""

import http.client
import os
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import MockTestCase, auth_location  # noqa: E402
from test_faults import METRICS_LOCATION, metrics  # noqa: E402

# Test-only: the id is the authenticated user plus a request header, to mint
# many users (never do this in production: the client picks part of its id).
# A <Location> of its own: httpd merges its configuration per request.
USER_ID = 'CardScanUserID "%{REMOTE_USER}-%{HTTP:X-Test-User}"'


class RefreshUnderLoadTest(MockTestCase):
    """6 s tokens (served 3 s, refreshed from 2.25 s), 200 ms of API
    latency, 24 users each asking every 0.1 s for 12 s, each request
    followed by a static file on the same keep-alive connection."""

    LIFETIME, LATENCY_MS, USERS, PERIOD, DURATION = 6, 200, 24, 0.1, 12.0

    def _user(self, a, uid, out):
        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
        statuses = []
        end = time.monotonic() + self.DURATION
        try:
            while time.monotonic() < end:
                t0 = time.monotonic()
                for attempt in (1, 2):
                    try:
                        st = a.request("/load", headers={"X-Test-User": uid}, conn=conn)[0]
                        a.request("/static.txt", user=None, conn=conn)
                        break
                    except (OSError, http.client.HTTPException) as e:
                        # the event MPM closes idle keep-alive connections
                        # when its workers are all busy: like any HTTP
                        # client, send again once on a new connection (a
                        # crash fails the test through the error log)
                        st = type(e).__name__
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
                statuses.append(st)
                time.sleep(max(0.0, self.PERIOD - (time.monotonic() - t0)))
        finally:
            conn.close()
        out[uid] = statuses

    def _run(self, mpm):
        self.mock.config(lifetime=self.LIFETIME, latency_ms=self.LATENCY_MS)
        body = auth_location("/load", USER_ID) + METRICS_LOCATION
        a = self.apache(mpm=mpm, body=body, servers=self.USERS + 4 if mpm == "prefork" else 2,
                        mpm_conf="StartServers 28\nMinSpareServers 28\nMaxSpareServers 30\n"
                                 "MaxRequestWorkers 40\n" if mpm == "prefork" else None)
        with open(os.path.join(a.dir, "static.txt"), "w") as f:
            f.write("x" * 1500)
        out = {}
        threads = [threading.Thread(target=self._user, args=(a, "u%d" % i, out), daemon=True)
                   for i in range(self.USERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.DURATION + 60)
        self.assertEqual(len(out), self.USERS, "a user loop did not finish")
        bad = {u: [s for s in st if s != 200] for u, st in out.items() if set(st) != {200}}
        self.assertEqual(bad, {}, "replies other than 200")
        # every refresh called the configured endpoint with the configured key
        log = a.log()
        broken = [line for line in log.splitlines()
                  if "exit signal" in line or "AH10520" in line or "AH10517" in line or "AH10532" in line
                  or "AH10511" in line]
        self.assertEqual(broken[:5], [], "%d lines in the error log" % len(broken))
        m = metrics(a)
        self.assertGreaterEqual(m['cardscan_refreshes_total{result="ok"}'], self.USERS)
        self.assertEqual(m.get('cardscan_refreshes_total{result="failed"}', 0), 0)

    def test_refresh_threads_outlive_their_requests_event(self):
        self._run("event")

    def test_refresh_threads_outlive_their_requests_prefork(self):
        self._run("prefork")


if __name__ == "__main__":
    unittest.main()
