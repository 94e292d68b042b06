"""mod_cardscan's token cache, end to end: shared by the child processes of a
real apache2, expiry and refresh, single flight, eviction, and the reuse of
upstream connections. Upstream calls are counted by the CardScan mock."""

import http.client
import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (MockTestCase, apache_conf, auth_location, jwt_payload,  # noqa: E402
                     rfc3339_utc, run_concurrently, session_dir, wait_for)

# Tests that need more distinct user ids than the six htpasswd users derive
# the id from the authenticated user AND a request header. A real deployment
# must never let the client choose any part of its id like this; here it is a
# way to mint many ids (cache capacity, connection reuse), and the user part
# still comes from Apache's authentication.
SHARD_ID = 'CardScanUserID "%{REMOTE_USER}-%{HTTP:X-Test-Shard}"'


def shard_location(path="/shard", extra=""):
    return auth_location(path, SHARD_ID + "\n    " + extra)


class CacheTest(MockTestCase):

    # ------------------------------------------------------------ helpers

    def token_of(self, resp, sub):
        status, _, data, doc = resp
        self.assertEqual(status, 200, data[:300])
        self.assertEqual(jwt_payload(doc["Token"])["sub"], sub)
        self.assertEqual(doc["session"], doc["Token"])
        return doc

    def get_shard(self, a, shard, path="/shard", user="alice", conn=None):
        return a.request(path, user=user, headers={"X-Test-Shard": str(shard)}, conn=conn)

    def wait_children(self, a, n):
        wait_for(lambda: len(a.child_pids()) >= n, 20, "%d apache2 children" % n)

    # ----------------------------------------------- shared across children

    # A child serves at most 12 connections and is then replaced, so 40
    # connections are served by at least 4 processes whatever the scheduler
    # does (and the replacements, forked later, must see the cache too).
    SPREAD = {
        "prefork": "StartServers 4\nMinSpareServers 4\nMaxSpareServers 6\nMaxRequestWorkers 32\n"
                   "MaxConnectionsPerChild 12\n",
        "event": "StartServers 4\nServerLimit 8\nThreadsPerChild 16\nMinSpareThreads 16\n"
                 "MaxSpareThreads 128\nMaxRequestWorkers 128\nMaxConnectionsPerChild 12\n",
    }
    SPREAD["worker"] = SPREAD["event"]

    def _shared_across_children(self, mpm):
        a = self.apache(mpm=mpm, mpm_conf=self.SPREAD[mpm], access_log=True)
        self.wait_children(a, 4)
        tokens = set()
        for _ in range(40):  # a new connection each time
            tokens.add(self.token_of(a.request(), "alice")["Token"])
        self.assertEqual(len(tokens), 1)
        self.assertEqual(self.mock.calls(), 1)
        pids = set(a.access_pids())
        self.assertGreaterEqual(len(pids), 3, "40 requests served by %d processes only" % len(pids))
        self.assertNotIn(a.proc.pid, pids)
        bob = self.token_of(a.request(user="bob"), "bob")["Token"]
        self.assertNotIn(bob, tokens)
        for _ in range(10):
            self.assertEqual(self.token_of(a.request(user="bob"), "bob")["Token"], bob)
        self.assertEqual(self.mock.stats()["user_ids"], ["alice", "bob"])

    def test_shared_across_children_prefork(self):
        self._shared_across_children("prefork")

    def test_shared_across_children_event(self):
        self._shared_across_children("event")

    def test_shared_across_children_worker(self):
        self._shared_across_children("worker")

    # ------------------------------------------------- expiry and refresh

    def _until_new_token(self, a, old, user="alice", limit=10.0):
        """Polls (bounded) until the reply carries another token; returns
        (monotonic time of that reply, its document)."""
        def new_token():
            doc = self.token_of(a.request(user=user), user)
            return (time.monotonic(), doc) if doc["Token"] != old else None
        return wait_for(new_token, limit, "a refreshed token")

    # These two pin the serving time alone: refresh ahead (its own tests in
    # test_serving.py) would bring the new token earlier.
    def test_expiry_and_refresh(self):
        self.mock.config(lifetime=4)
        a = self.apache(global_conf=apache_conf(endpoint=self.mock.http_url,
                                                extra="CardScanCacheMinTTL 1\nCardScanRefreshAhead off\n"))
        first = self.token_of(a.request(), "alice")
        t0 = time.monotonic()  # just after receipt
        self.assertEqual(self.token_of(a.request(), "alice"), first)
        self.assertEqual(self.mock.calls(), 1)
        # served while at least 1 s of its 4 s is left: refreshed after ~3 s
        t1, second = self._until_new_token(a, first["Token"])
        self.assertGreaterEqual(t1 - t0, 2.0)
        self.assertLessEqual(t1 - t0, 4.5)
        self.assertEqual(self.mock.calls(), 2)
        self.assertGreaterEqual(rfc3339_utc(second["expires_at"]), rfc3339_utc(first["expires_at"]) + 2)
        # and the new one is cached in turn
        self.assertEqual(self.token_of(a.request(), "alice")["Token"], second["Token"])
        self.assertEqual(self.mock.calls(), 2)

    def test_min_ttl_capped_at_half_lifetime(self):
        self.mock.config(lifetime=4)
        a = self.apache(global_conf=apache_conf(endpoint=self.mock.http_url,
                                                extra="CardScanCacheMinTTL 60\nCardScanRefreshAhead off\n"))
        first = self.token_of(a.request(), "alice")
        t0 = time.monotonic()  # just after receipt
        # MinTTL 60 > a 4 s lifetime: capped at 2 s, so the token is served
        # from the cache for about 2 s rather than never
        self.assertEqual(self.token_of(a.request(), "alice")["Token"], first["Token"])
        self.assertEqual(self.mock.calls(), 1)
        t1, _ = self._until_new_token(a, first["Token"])
        self.assertGreaterEqual(t1 - t0, 1.0)
        self.assertLessEqual(t1 - t0, 3.3)  # not served until expiry (4 s)
        self.assertEqual(self.mock.calls(), 2)

    # ----------------------------------------------------- exp and iat

    def test_noexp_served_not_cached(self):
        a = self.apache()
        self.mock.config(fault="noexp")
        tokens = set()
        for _ in range(3):
            doc = self.token_of(a.request(), "alice")
            self.assertNotIn("expires_at", doc)
            self.assertEqual(set(doc), {"Token", "IdentityId", "session_id", "session", "live"})
            tokens.add(doc["Token"])
        self.assertEqual(len(tokens), 3)
        self.assertEqual(self.mock.calls(), 3)

    def test_noiat_cached(self):
        a = self.apache()
        self.mock.config(fault="noiat")
        t0 = time.time()
        doc = self.token_of(a.request(), "alice")
        self.assertNotIn("iat", jwt_payload(doc["Token"]))
        # lifetime = exp - now
        self.assertAlmostEqual(rfc3339_utc(doc["expires_at"]), t0 + 900, delta=5)
        for _ in range(3):
            self.assertEqual(self.token_of(a.request(), "alice"), doc)
        self.assertEqual(self.mock.calls(), 1)

    def test_clock_skew(self):
        a = self.apache()
        # upstream clock an hour ahead: iat and exp are in our future; the
        # lifetime is still exp - iat from the local time of receipt
        self.mock.config(clock_skew=3600, lifetime=900)
        t0 = time.time()
        doc = self.token_of(a.request(), "alice")
        self.assertAlmostEqual(rfc3339_utc(doc["expires_at"]), t0 + 900, delta=5)
        self.assertEqual(self.token_of(a.request(), "alice"), doc)
        self.assertEqual(self.mock.calls(), 1)
        # iat = now - 1 h, exp = now + 1 h (an upstream clock an hour behind,
        # or a token issued an hour ago): the earlier of receipt + (exp - iat)
        # and exp, so never served past exp by the local clock
        self.mock.config(clock_skew=-3600, lifetime=7200)
        t0 = time.time()
        doc = self.token_of(a.request(user="bob"), "bob")
        payload = jwt_payload(doc["Token"])
        self.assertAlmostEqual(payload["exp"], t0 + 3600, delta=5)
        self.assertAlmostEqual(rfc3339_utc(doc["expires_at"]), t0 + 3600, delta=5)
        self.assertLessEqual(rfc3339_utc(doc["expires_at"]), payload["exp"])
        self.assertEqual(self.token_of(a.request(user="bob"), "bob"), doc)
        self.assertEqual(self.mock.calls(), 2)
        # An exp already past on the local clock is refused, as the spec
        # says ("JWT already expired (exp <= local now)"): upstream an hour
        # behind with a 15-minute token.
        self.mock.config(clock_skew=-3600, lifetime=900)
        st, _, data, doc = a.request(user="carol")
        self.assertEqual((st, doc and doc.get("error")), (502, "upstream_error"), data[:300])
        self.mock.config(clock_skew=0)
        # an expired token: refused, not cached
        self.mock.config(fault="expired")
        st, _, data, doc = a.request(user="x y")
        self.assertEqual((st, doc and doc.get("error")), (502, "upstream_error"), data[:300])
        self.assertNotIn(b"eyJ", data)
        self.assertEqual(self.mock.calls(), 4)
        # and remembered as the user's failure for a few seconds: another
        # user gets a token
        self.mock.config(fault="none")
        st, _, data, _ = a.request(user="x y")
        self.assertEqual(st, 502, data[:300])
        self.assertEqual(self.mock.calls(), 4)
        self.token_of(a.request(user="\u00fc@h.example"), "\u00fc@h.example")
        self.assertEqual(self.mock.calls(), 5)

    # ------------------------------------------------------ cache modes

    def test_cache_none(self):
        a = self.apache(global_conf=apache_conf(endpoint=self.mock.http_url, extra="CardScanCache none\n"))
        tokens = {self.token_of(a.request(), "alice")["Token"] for _ in range(4)}
        self.assertEqual(len(tokens), 4)
        self.assertEqual(self.mock.calls(), 4)

    def test_cache_full(self):
        # 64 KiB of shmcb holds a few dozen ~1.5 KB entries: 200 ids evict
        a = self.apache(global_conf=apache_conf(endpoint=self.mock.http_url,
                                                extra='CardScanCache "shmcb:cs-tiny(65536)"\n'),
                        body=shard_location())
        n = 200
        c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=30)
        try:
            for rnd in range(2):
                for i in range(n):
                    self.token_of(self.get_shard(a, i, conn=c), "alice-%d" % i)
                calls = self.mock.calls()
                if rnd == 0:
                    self.assertEqual(calls, n)
            # a second round over the same ids: evicted ones were fetched
            # again (and still answered for the right id)
            self.assertGreater(calls, n, "nothing was evicted: the cache is not full")
            self.assertLessEqual(calls, 2 * n)
            # the cache still works when full: the latest id is a hit
            before = self.mock.calls()
            self.token_of(self.get_shard(a, n - 1, conn=c), "alice-%d" % (n - 1))
            self.assertEqual(self.mock.calls(), before)
        finally:
            c.close()
        ids = self.mock.stats()["user_ids"]
        self.assertEqual(set(ids), {"alice-%d" % i for i in range(n)})

    # ------------------------------------------------------ single flight

    def _single_flight(self, mpm):
        a = self.apache(mpm=mpm, servers=4)
        self.wait_children(a, 4)
        self.mock.config(latency_ms=300)
        docs = run_concurrently(lambda: self.token_of(a.request(), "alice"), [()] * 20)
        self.assertEqual(len({d["Token"] for d in docs}), 1)
        self.assertEqual(self.mock.calls(), 1)
        # two cold users at once: one call each
        users = ["bob", "carol"] * 10
        docs = run_concurrently(lambda u: (u, self.token_of(a.request(user=u), u)["Token"]),
                                [(u,) for u in users])
        self.assertEqual(len({t for u, t in docs if u == "bob"}), 1)
        self.assertEqual(len({t for u, t in docs if u == "carol"}), 1)
        self.assertEqual(sorted(self.mock.stats()["user_ids"]), ["alice", "bob", "carol"])

    def test_single_flight_prefork(self):
        self._single_flight("prefork")

    def test_single_flight_event(self):
        self._single_flight("event")

    def test_single_flight_worker(self):
        self._single_flight("worker")

    def _single_flight_failure(self, mpm, servers):
        a = self.apache(mpm=mpm, servers=servers)
        # every request must be inside a child while the one call is running
        self.wait_children(a, servers)
        self.mock.config(fault="500", latency_ms=1000)

        def one():
            st, _, data, doc = a.request()
            return st, doc and doc.get("error"), data

        results = run_concurrently(one, [()] * 10)
        for st, code, data in results:
            self.assertEqual((st, code), (502, "upstream_error"), data[:300])
            self.assertNotIn(b"eyJ", data)
        self.assertEqual(self.mock.calls(), 1)
        # the user's requests just after get the same failure, without a
        # call; another user is served
        self.mock.config(fault="none", latency_ms=0)
        st, hdrs, data, _ = a.request()
        self.assertEqual(st, 502, data[:300])
        self.assertTrue(1 <= int(hdrs.get("retry-after", "0")) <= 5, hdrs)
        self.assertEqual(self.mock.calls(), 1)
        self.token_of(a.request(user="bob"), "bob")
        self.assertEqual(self.mock.calls(), 2)

    def test_single_flight_failure_prefork(self):
        self._single_flight_failure("prefork", 10)

    def test_single_flight_failure_event(self):
        self._single_flight_failure("event", 2)

    def test_single_flight_failure_worker(self):
        self._single_flight_failure("worker", 2)

    # ---------------------------------------------------- connection reuse

    def test_connection_reuse(self):
        one_child = ("StartServers 1\nServerLimit 1\nThreadsPerChild 16\nMinSpareThreads 1\n"
                     "MaxSpareThreads 16\nMaxRequestWorkers 16\nMaxConnectionsPerChild 0\n")
        conf = apache_conf(endpoint=self.mock.http_url, extra='CardScanCAFile "%s/ca.pem"\n' % session_dir())
        body = shard_location() + shard_location("/shard-tls", "CardScanEndpoint " + self.mock.https_url)
        a = self.apache(mpm="event", mpm_conf=one_child, global_conf=conf, body=body)
        self.wait_children(a, 1)
        self.assertEqual(len(a.child_pids()), 1)
        for i in range(20):  # 20 misses, each on a new client connection
            self.token_of(self.get_shard(a, i), "alice-%d" % i)
        stats = self.mock.stats()
        self.assertEqual(stats["calls"], 20)
        self.assertLessEqual(stats["connections"], 3)
        self.mock.reset()
        for i in range(20):
            self.token_of(self.get_shard(a, i, path="/shard-tls"), "alice-%d" % i)
        stats = self.mock.stats()
        self.assertEqual(stats["calls"], 20)
        self.assertTrue(all(r["tls"] for r in stats["requests"]))
        self.assertLessEqual(stats["tls_connections"], 3)


if __name__ == "__main__":
    unittest.main()
