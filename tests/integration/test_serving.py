"""The serving path over time and under other people's trouble, against a real
apache2 and the bundled mock: refresh ahead of expiry (no client waits, one
call per user per lifetime, only active users), the cache carried over
graceful restarts, single flight per user (never across users), the
per-user negative cache and a breaker that one user cannot open."""

import http.client
import os
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (OTHER_KEY, TEST_KEY, Apache, MockTestCase, Mock, apache_conf,  # noqa: E402
                     auth_location, jwt_payload, run_concurrently, wait_for)
from test_faults import METRICS_LOCATION, metrics  # noqa: E402

# Test-only: the id is the authenticated user plus a request header, to mint
# many users (never do this in production: the client picks part of its id).
SHARD_ID = 'CardScanUserID "%{REMOTE_USER}-%{HTTP:X-Test-Shard}"'


def shard_location(path="/shard", extra=""):
    return auth_location(path, SHARD_ID + "\n    " + extra)


# A request that waited for the API takes its 400 ms latency at least. The
# sanitizer build runs several times slower: there, anything below that
# latency still shows that no request waited for a call.
WAIT_LIMIT = 0.38 if os.environ.get("CS_HTTPD_PRELOAD") else 0.25


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def calls_for(mock, user_id):
    return mock.stats()["user_ids"].count(user_id)


class RefreshAheadTest(MockTestCase):
    """A 16 s token (served 8 s: the minimum TTL is capped at half its
    life; refreshed from 6 s on), 400 ms of API latency, one user asking
    every 0.2 s over one keep-alive connection for 40 s."""

    LIFETIME, LATENCY_MS, PERIOD, DURATION = 16, 400, 0.2, 40.0

    def _active_user(self, a, user, out):
        conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
        times, tokens, statuses = [], set(), []
        end = time.monotonic() + self.DURATION
        try:
            while time.monotonic() < end:
                t0 = time.monotonic()
                st, _, data, doc = a.request(user=user, conn=conn)
                times.append(time.monotonic() - t0)
                statuses.append(st)
                if st == 200:
                    tokens.add(doc["Token"])
                time.sleep(max(0.0, self.PERIOD - (time.monotonic() - t0)))
        finally:
            conn.close()
        out[user] = (times, tokens, statuses)

    def test_no_request_waits_across_expiries_event_and_prefork(self):
        self.mock.config(lifetime=self.LIFETIME, latency_ms=self.LATENCY_MS)
        body = METRICS_LOCATION
        ev = self.apache(mpm="event", body=body)
        pf = self.apache(mpm="prefork", body=body, servers=4)
        # a user who asks once, on each server, and then leaves
        for a, user in ((ev, "carol"), (pf, "x y")):
            st, _, data, _ = a.request(user=user)
            self.assertEqual(st, 200, data[:300])
        out = {}
        threads = [threading.Thread(target=self._active_user, args=(a, u, out), daemon=True)
                   for a, u in ((ev, "alice"), (pf, "bob"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.DURATION + 60)
        self.assertEqual(set(out), {"alice", "bob"}, "an active-user loop did not finish")
        for a, user, once in ((ev, "alice", "carol"), (pf, "bob", "x y")):
            times, tokens, statuses = out[user]
            with self.subTest(mpm=a.mpm):
                self.assertEqual(set(statuses), {200})
                slow = [round(t, 3) for t in times[1:] if t > WAIT_LIMIT]
                self.assertEqual(slow, [], "requests after the first that waited (s), of %d" % len(times))
                calls = calls_for(self.mock, user)
                self.assertLessEqual(calls, 7, "API calls of the active user in %.0f s" % self.DURATION)
                # several lifetimes were crossed: several tokens were served
                self.assertGreaterEqual(len(tokens), 4)
                self.assertEqual(calls_for(self.mock, once), 1, "a user who left was refreshed")
                m = metrics(a)
                self.assertGreaterEqual(m['cardscan_refreshes_total{result="ok"}'], 4)
                self.assertGreaterEqual(m['cardscan_requests_total{outcome="refreshed"}'], 4)

    def test_failed_refresh_keeps_the_token_and_retries_later(self):
        # served 10 s and refreshed from 7.5 s; exp is a whole second, so
        # the lifetime from receipt (exp - now) may be up to 1 s shorter:
        # served at least 9.5 s, refreshed from 7.2 s at the latest
        self.mock.config(lifetime=20)
        a = self.apache(body=METRICS_LOCATION)
        t0 = time.monotonic()
        first = a.request()[3]["Token"]
        self.mock.config(fault="500", fault_user="alice")
        time.sleep(max(0.0, t0 + 7.7 - time.monotonic()))
        mark = len(a.log())
        # inside the refresh window, with every refresh failing: the current
        # token is served until it leaves its serving time (9.5-10 s)
        served = []
        while time.monotonic() < t0 + 9.2:
            st, _, data, doc = a.request()
            self.assertEqual(st, 200, data[:300])
            served.append(doc["Token"])
            time.sleep(0.1)
        self.assertEqual(set(served), {first})
        # one refresh call for the user in those 2 s (then none for 5 s)
        self.assertEqual(calls_for(self.mock, "alice"), 2)
        wait_for(lambda: metrics(a)['cardscan_refreshes_total{result="failed"}'] >= 1, 10, "a failed refresh")
        self.assertEqual(metrics(a)['cardscan_refreshes_total{result="failed"}'], 1)
        log = a.log()[mark:]
        self.assertEqual(log.count("AH10532"), 1, log)
        self.assertIn("current token stays in service", log)
        # another user is unaffected
        st, _, data, _ = a.request(user="bob")
        self.assertEqual(st, 200, data[:300])

    def test_refresh_ahead_off(self):
        self.mock.config(lifetime=16)
        a = self.apache(body=METRICS_LOCATION, global_conf=apache_conf(
            endpoint=self.mock.http_url, extra="CardScanRefreshAhead off\n"))
        t0 = time.monotonic()
        first = a.request()[3]["Token"]
        time.sleep(max(0.0, t0 + 7.0 - time.monotonic()))
        self.assertEqual(a.request()[3]["Token"], first)
        time.sleep(0.5)
        self.assertEqual(calls_for(self.mock, "alice"), 1, "refreshed although CardScanRefreshAhead off")
        self.assertEqual(metrics(a)['cardscan_requests_total{outcome="refreshed"}'], 0)

    def test_refresh_directive_is_checked(self):
        for bad in ("maybe", "0", "51", "25%%x", "-1"):
            a = Apache(start=False, global_conf=apache_conf(
                endpoint=self.mock.http_url, extra="CardScanRefreshAhead %s\n" % bad))
            try:
                r = a.configtest()
                self.assertNotEqual(r.returncode, 0, bad)
                self.assertIn(b"CardScanRefreshAhead", r.stdout)
            finally:
                a.stop()
        a = Apache(start=False, global_conf=apache_conf(
            endpoint=self.mock.http_url, extra="CardScanRefreshAhead 10%\n"))
        try:
            self.assertEqual(a.configtest().returncode, 0)
        finally:
            a.stop()


class RestartSurvivalTest(MockTestCase):
    """Every valid entry is served after graceful restarts, with no call;
    a restart that changes the key, endpoint or cache secret never serves
    an entry the new configuration would not have stored."""

    USERS = 200

    def warm(self, a, path="/shard"):
        for i in range(self.USERS):
            st, _, data, _ = a.request(path, headers={"X-Test-Shard": str(i)})
            self.assertEqual(st, 200, data[:300])

    def check_all(self, a, path="/shard"):
        tokens = {}
        for i in range(self.USERS):
            st, _, data, doc = a.request(path, headers={"X-Test-Shard": str(i)})
            self.assertEqual(st, 200, data[:300])
            self.assertEqual(jwt_payload(doc["Token"])["sub"], "alice-%d" % i)
            tokens[i] = doc["Token"]
        return tokens

    def graceful(self, a, n):
        """The n-th graceful restart of a, done once its new generation
        has carried the cache over."""
        a.graceful()
        wait_for(lambda: a.log().count("AH10533") >= n, 30, "restart %d to carry the cache" % n)
        wait_for(lambda: a.request(user=None, path="/metrics")[0] == 200, 30, "the new generation")

    def _survives(self, mpm):
        a = self.apache(mpm=mpm, body=shard_location() + METRICS_LOCATION)
        self.warm(a)
        before = self.check_all(a)
        self.assertEqual(self.mock.calls(), self.USERS)
        self.graceful(a, 1)
        self.assertEqual(self.check_all(a), before)
        self.assertEqual(self.mock.calls(), self.USERS, "API calls after one graceful restart")
        # three more in a row, under load
        stop, errors, done = threading.Event(), [], [0]

        def load():
            i = 0
            while not stop.is_set():
                try:
                    st, _, _, _ = a.request("/shard", headers={"X-Test-Shard": str(i % self.USERS)})
                    if st != 200:
                        errors.append(st)
                    done[0] += 1
                except OSError as e:  # a connection lost in a restart is a failure too
                    errors.append(repr(e))
                i += 1
        threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for n in (2, 3, 4):
                self.graceful(a, n)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        self.assertEqual(errors, [])
        self.assertGreater(done[0], 0)
        self.assertEqual(self.check_all(a), before)
        self.assertEqual(self.mock.calls(), self.USERS, "API calls after three more graceful restarts")

    def test_survives_graceful_event(self):
        self._survives("event")

    def test_survives_graceful_worker(self):
        self._survives("worker")

    def test_survives_graceful_prefork(self):
        self._survives("prefork")

    def _rewrite(self, a, old, new):
        with open(a.conf) as f:
            text = f.read()
        self.assertIn(old, text)
        with open(a.conf, "w") as f:
            f.write(text.replace(old, new))

    def test_entries_carried_to_no_cache_are_freed(self):
        """shmcb, then CardScanCache none, then shmcb again: what the first
        generation carried out is freed by the second (which has no shmcb
        to take it), never stored by the third."""
        a = self.apache(body=shard_location(), global_conf=apache_conf(
            endpoint=self.mock.http_url, extra="CardScanCache shmcb\n"))
        self.USERS = 5
        self.warm(a)
        self._rewrite(a, "CardScanCache shmcb\n", "CardScanCache none\n")
        a.graceful_and_wait()
        self._rewrite(a, "CardScanCache none\n", "CardScanCache shmcb\n")
        a.graceful_and_wait()
        self.assertEqual(a.request("/shard", headers={"X-Test-Shard": "0"})[0], 200)
        self.assertNotIn("AH10533", a.log(), "entries of a shmcb two generations ago were stored again")

    def test_changed_configuration_never_serves_old_entries(self):
        secret = os.path.join(self.mock.dir, "cache-secret")
        write_file(secret, "first cache secret, 32 bytes ok\n")
        os.chmod(secret, 0o644)
        conf = apache_conf(endpoint=self.mock.http_url, extra='CardScanCacheSecret file:%s\n' % secret)
        a = self.apache(body=shard_location() + METRICS_LOCATION, global_conf=conf)
        self.USERS = 20
        self.warm(a)
        calls = self.mock.calls()
        n = 0
        for what, change in (
                ("the API key", lambda: self._rewrite(a, "CardScanAPIKey " + TEST_KEY,
                                                     "CardScanAPIKey " + OTHER_KEY)),
                ("the endpoint", lambda: self._rewrite(a, "CardScanEndpoint " + self.mock.http_url,
                                                      "CardScanEndpoint " +
                                                      self.mock.http_url.replace("127.0.0.1", "localhost"))),
                ("the cache secret", lambda: write_file(secret, "second cache secret, 32 bytes\n"))):
            with self.subTest(what):
                change()
                n += 1
                self.graceful(a, n)
                self.check_all(a)
                self.assertEqual(self.mock.calls(), calls + self.USERS,
                                 "entries stored before changing %s were served" % what)
                calls = self.mock.calls()
        # the key change reached the API: the last calls used the new key
        self.assertIn(OTHER_KEY[-4:], self.mock.stats()["requests"][-1]["headers"]["authorization"])


class IsolationTest(unittest.TestCase):
    """One user's call never delays another user's request; with no cache
    there is no lock; a waiter whose wait brings no result calls itself."""

    @classmethod
    def setUpClass(cls):
        cls.slow, cls.fast = Mock(), Mock()

    @classmethod
    def tearDownClass(cls):
        cls.slow.stop()
        cls.fast.stop()

    def setUp(self):
        self.slow.reset()
        self.fast.reset()
        self.servers = []

    def tearDown(self):
        for a in self.servers:
            a.stop()

    def start(self, extra="", body=""):
        conf = apache_conf(endpoint=self.fast.http_url, extra=extra)
        a = Apache(global_conf=conf, body=body + METRICS_LOCATION, mpm_conf=(
            "StartServers 2\nServerLimit 4\nThreadsPerChild 64\nMinSpareThreads 64\n"
            "MaxSpareThreads 256\nMaxRequestWorkers 256\n"))
        self.servers.append(a)
        return a

    def test_slow_tenant_does_not_delay_others(self):
        self.slow.config(latency_ms=3000)
        a = self.start(body=shard_location("/slow", "CardScanEndpoint " + self.slow.http_url) +
                       shard_location("/fast"))
        waiting = [None]

        def slow_user(i):
            return a.request("/slow", headers={"X-Test-Shard": "s%d" % i}, timeout=30)[0]
        t = threading.Thread(target=lambda: waiting.__setitem__(
            0, run_concurrently(slow_user, [(i,) for i in range(60)], timeout=60)), daemon=True)
        t.start()
        wait_for(lambda: self.slow.calls() >= 40, 20, "the slow tenant's calls to be in flight")
        worst = 0.0
        for i in range(20):
            t0 = time.monotonic()
            st, _, data, _ = a.request("/fast", headers={"X-Test-Shard": "f%d" % i})
            worst = max(worst, time.monotonic() - t0)
            self.assertEqual(st, 200, data[:300])
        self.assertLess(worst, 1.0, "a user of the fast endpoint waited %.2f s for the slow one" % worst)
        t.join(60)
        self.assertEqual(set(waiting[0]), {200})
        self.assertEqual(self.slow.calls(), 60)

    def test_no_cache_no_lock(self):
        self.fast.config(latency_ms=500)
        a = self.start(extra="CardScanCache none\n")
        results = run_concurrently(lambda: a.request()[0], [()] * 5)
        self.assertEqual(results, [200] * 5)
        self.assertEqual(self.fast.calls(), 5)
        self.assertEqual(metrics(a)["cardscan_singleflight_waits_total"], 0)

    def test_waiter_without_a_result_calls_itself(self):
        # a token without exp is served but never cached: the requests that
        # waited for it find nothing, and each makes its own call in turn
        self.fast.config(fault="noexp", latency_ms=300)
        a = self.start()
        t0 = time.monotonic()
        results = run_concurrently(lambda: a.request()[0], [()] * 5)
        elapsed = time.monotonic() - t0
        self.assertEqual(results, [200] * 5)
        self.assertEqual(self.fast.calls(), 5)
        # one after the other as the lock comes free (5 x 0.3 s), not after
        # waiting out CardScanTimeout (5 s)
        self.assertLess(elapsed, 4.0)
        m = metrics(a)
        self.assertGreaterEqual(m["cardscan_singleflight_waits_total"], 1)
        self.assertEqual(m['cardscan_requests_total{outcome="fetched"}'], 5)

    def test_waited_outcome(self):
        self.fast.config(latency_ms=500)
        a = self.start()
        results = run_concurrently(lambda: a.request()[0], [()] * 6)
        self.assertEqual(results, [200] * 6)
        self.assertEqual(self.fast.calls(), 1)
        m = metrics(a)
        self.assertEqual(m['cardscan_requests_total{outcome="fetched"}'], 1)
        self.assertEqual(m['cardscan_requests_total{outcome="waited"}'], 5)

    def test_late_failure_never_replaces_a_token(self):
        # Two virtual hosts share the cache (same key and endpoint) with
        # different deadlines. The patient one calls first and stores a
        # token after 1.5 s; the impatient one waits its 1 s, calls itself
        # and times out after the token was stored. Its failure must not
        # replace the token.
        from harness import free_port
        p2 = free_port()
        body = ("Listen 127.0.0.1:%d\n<VirtualHost 127.0.0.1:%d>\n    CardScanTimeout 1\n"
                "</VirtualHost>\n" % (p2, p2))
        self.fast.config(latency_ms=1500)
        a = self.start(extra="CardScanTimeout 5\n", body=body)
        out = {}
        t = threading.Thread(target=lambda: out.__setitem__("patient", a.request()), daemon=True)
        t.start()
        wait_for(lambda: self.fast.calls() >= 1, 10, "the first call")
        late = a.request(port=p2)
        t.join(30)
        self.assertEqual(out["patient"][0], 200)
        self.assertEqual(late[0], 504, late[2][:300])
        self.assertEqual(self.fast.calls(), 2)
        # both servers now serve the token, without a call
        for port in (a.port, p2):
            st, _, data, doc = a.request(port=port)
            self.assertEqual(st, 200, data[:300])
            self.assertEqual(doc["Token"], out["patient"][3]["Token"])
        self.assertEqual(self.fast.calls(), 2)


class OneFailingUserTest(MockTestCase):
    """CardScan fails for one user id only: that user gets quick errors from
    a short negative cache, every other user is served, and the breaker
    (default 5 failures in 10 s) stays closed."""

    def test_one_user_cannot_open_the_breaker(self):
        a = self.apache(body=METRICS_LOCATION)
        self.mock.config(fault="500", fault_user="alice")
        for _ in range(12):
            st, hdrs, data, doc = a.request()
            self.assertEqual((st, doc["error"]), (502, "upstream_error"), data[:300])
            self.assertTrue(1 <= int(hdrs["retry-after"]) <= 5, hdrs)
        self.assertEqual(calls_for(self.mock, "alice"), 1, "API calls of 12 quick tries")
        for user in ("bob", "carol", "x y"):
            st, _, data, _ = a.request(user=user)
            self.assertEqual(st, 200, data[:300])
        self.assertEqual(metrics(a)["cardscan_circuit_open"], 0)
        # after the negative cache's few seconds, one more call for alice
        time.sleep(5.2)
        self.assertEqual(a.request()[0], 502)
        self.assertEqual(calls_for(self.mock, "alice"), 2)
        self.assertEqual(metrics(a)["cardscan_circuit_open"], 0)

    def test_retried_failures_of_one_user_do_not_open_it(self):
        # a 502 is retried once: one request of alice is two failures in a
        # row, as many as this breaker's threshold, but of one user only
        a = self.apache(body=METRICS_LOCATION, global_conf=apache_conf(
            endpoint=self.mock.http_url, extra="CardScanCircuitBreaker 2 10\n"))
        self.mock.config(fault="502", fault_user="alice")
        self.assertEqual(a.request()[0], 502)
        self.assertEqual(calls_for(self.mock, "alice"), 2)
        self.assertEqual(metrics(a)["cardscan_circuit_open"], 0)
        st, _, data, _ = a.request(user="bob")
        self.assertEqual(st, 200, data[:300])
        # failures in a row of two distinct users open it
        self.mock.config(fault="502", fault_user="")
        self.assertEqual(a.request(user="carol")[0], 502)
        self.assertEqual(metrics(a)["cardscan_circuit_open"], 0)
        self.assertEqual(a.request(user="x y")[0], 502)
        self.assertEqual(metrics(a)["cardscan_circuit_open"], 1)
        st, _, data, doc = a.request(user="\u00fc@h.example")
        self.assertEqual((st, doc["error"]), (503, "upstream_unavailable"), data[:300])


if __name__ == "__main__":
    unittest.main()
