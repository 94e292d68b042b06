"""A fleet of two Apache servers sharing the token cache on a real Redis and a
real memcached on 127.0.0.1 (issue: fleet cache)."""

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import unittest

from harness import (MockTestCase, run_concurrently, OTHER_KEY, TEST_KEY, apache_conf, free_port, jwt_payload, port_open,
                     stop_pid, wait_for)

REDIS = shutil.which("redis-server")
MEMCACHED = shutil.which("memcached")



def token_key(redis):
    """The Redis key of the (only) user's token entry: store ids end in
    the entry kind's tag, T (hex 54) for a token."""
    keys = [k for k in redis.keys() if k.endswith(b"54")]
    assert len(keys) == 1, keys
    return keys[0]

class Redis:
    def __init__(self, port=None):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="cs-redis-")
        self.start()

    def start(self):
        self.proc = subprocess.Popen([REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), 10, "redis-server")

    def stop(self):
        stop_pid(self.proc)

    def command(self, *args):
        """A RESP request; returns the raw reply bytes (enough for tests)."""
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        with socket.create_connection(("127.0.0.1", self.port), 5) as s:
            s.sendall(out)
            data = b""
            s.settimeout(2)
            while True:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    break
                if not chunk:
                    break
                data += chunk
                if self._complete(data):
                    break
            return data

    @staticmethod
    def _complete(data):
        # good enough for the replies used here: a bulk string, an array of
        # bulk strings, a simple string or an integer
        try:
            Redis._parse(data, 0)
            return True
        except (IndexError, ValueError):
            return False

    @staticmethod
    def _parse(data, i):
        end = data.index(b"\r\n", i)
        kind, head = data[i:i + 1], data[i + 1:end]
        if kind in (b"+", b"-", b":"):
            return head, end + 2
        if kind == b"$":
            n = int(head)
            if n < 0:
                return None, end + 2
            if len(data) < end + 2 + n + 2:
                raise IndexError
            return data[end + 2:end + 2 + n], end + 2 + n + 2
        if kind == b"*":
            items, j = [], end + 2
            for _ in range(int(head)):
                item, j = Redis._parse(data, j)
                items.append(item)
            return items, j
        raise ValueError(kind)

    def value(self, *args):
        return self._parse(self.command(*args), 0)[0]

    def keys(self):
        return self.value("KEYS", "*") or []

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Memcached:
    def __init__(self):
        self.port = free_port()
        cmd = [MEMCACHED, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), 10, "memcached")

    def close(self):
        stop_pid(self.proc)


def fleet_conf(mock, cache, key=TEST_KEY, extra=""):
    return apache_conf(key=key, endpoint=mock.http_url, extra="CardScanCache %s\n%s" % (cache, extra))


@unittest.skipUnless(REDIS and MEMCACHED, "needs redis-server and memcached (apt-get install redis-server memcached)")
class FleetTests(MockTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.redis = Redis()
        cls.memcached = Memcached()

    @classmethod
    def tearDownClass(cls):
        cls.redis.close()
        cls.memcached.close()
        super().tearDownClass()

    def setUp(self):
        super().setUp()
        self.redis.command("FLUSHALL")

    def two_servers(self, cache, mpms=("event", "prefork"), **kw):
        # no socache_redis/socache_memcache: mod_cardscan has its own clients
        return [self.apache(mpm=mpm, global_conf=fleet_conf(self.mock, cache, **kw))
                for mpm in mpms]

    def alternate(self, servers, user="alice", rounds=6):
        tokens = set()
        for i in range(rounds):
            status, _, _, doc = servers[i % len(servers)].request(user=user)
            self.assertEqual(status, 200, doc)
            tokens.add(doc["Token"])
        return tokens

    def test_redis_one_token_one_call_across_servers(self):
        servers = self.two_servers("redis:127.0.0.1:%d" % self.redis.port)
        tokens = self.alternate(servers)
        self.assertEqual(len(tokens), 1)
        self.assertEqual(self.mock.calls(), 1)
        self.assertEqual(jwt_payload(tokens.pop())["sub"], "alice")
        # bob is his own entry
        self.assertEqual(len(self.alternate(servers, user="bob")), 1)
        self.assertEqual(self.mock.calls(), 2)

    def test_memcached_one_token_one_call_across_servers(self):
        # the worker MPM here, event and prefork in the Redis test
        servers = self.two_servers("memcache:127.0.0.1:%d" % self.memcached.port,
                                   mpms=("worker", "prefork"))
        tokens = self.alternate(servers, user="carol")
        self.assertEqual(len(tokens), 1)
        self.assertEqual(self.mock.calls(), 1)

    def test_redis_values_reveal_nothing(self):
        servers = self.two_servers("redis:127.0.0.1:%d" % self.redis.port, mpms=("event",))
        status, _, _, doc = servers[0].request(user="alice")
        self.assertEqual(status, 200)
        keys = self.redis.keys()
        # the user's token and identity pin (store ids end in the kind's tag)
        self.assertEqual(sorted(k[-2:] for k in keys), [b"50", b"54"], keys)
        token = doc["Token"].encode()
        for key in keys:
            value = self.redis.value("GET", key)
            self.assertTrue(value)
            for secret in (token, token.split(b".")[1], token.split(b".")[2][:40], b"alice", TEST_KEY.encode(),
                           doc["IdentityId"].encode(), doc["session_id"].encode()):
                self.assertNotIn(secret, value)
                self.assertNotIn(secret, key)

    def test_tampered_entry_is_a_miss_and_logged(self):
        # the tampered entry is read by the second server: the first keeps a
        # process-local copy of what it just served for a second
        servers = self.two_servers("redis:127.0.0.1:%d" % self.redis.port)
        first = servers[0].request(user="alice")[3]["Token"]
        key = token_key(self.redis)
        value = bytearray(self.redis.value("GET", key))
        value[len(value) // 2] ^= 0x01
        self.redis.command("SET", key, bytes(value))
        status, _, _, doc = servers[1].request(user="alice")
        self.assertEqual(status, 200)
        self.assertNotEqual(doc["Token"], first)
        self.assertEqual(jwt_payload(doc["Token"])["sub"], "alice")
        self.assertEqual(self.mock.calls(), 2)
        self.assertIn("ignoring a cache entry", servers[1].log())

    def test_failed_refresh_never_takes_over_another_servers_lock(self):
        """A refresh that failed keeps its user's lock a while longer (no
        process retries at once), but only a lock that is still its own:
        when its lock expired during the call and another server took it,
        that server's lock stays."""
        self.mock.config(lifetime=20)
        a = self.apache(mpm="event", global_conf=fleet_conf(self.mock, "redis:127.0.0.1:%d" % self.redis.port))
        t0 = time.monotonic()
        self.assertEqual(a.request(user="alice")[0], 200)
        # every later call for alice: 1.5 s, then a 500
        self.mock.config(fault="500", fault_user="alice", latency_ms=1500)
        # inside the refresh window (from 7.5 s of a 20 s token served 10 s)
        time.sleep(max(0.0, t0 + 8.0 - time.monotonic()))
        mark = len(a.log())
        self.assertEqual(a.request(user="alice")[0], 200)

        def lock_key():
            keys = [k for k in self.redis.keys() if k.endswith(b"4c")]  # 'L'
            return keys[0] if keys else None
        wait_for(lock_key, 5, "the refresh's lock in Redis")
        key = lock_key()
        # the owner is this host's process: host/pid/counter/time
        self.assertEqual(self.redis.value("GET", key).count(b"/"), 3)
        # the refresh's lock is taken by a process of another server (as
        # after its expiry) while the call is still out
        other = b"web9.example/4242/1/1700000000000000"
        self.assertEqual(self.redis.value("SET", key, other, "PX", "60000"), b"OK")
        wait_for(lambda: "AH10532" in a.log()[mark:], 10, "the failed refresh (AH10532)")
        self.assertEqual(self.redis.value("GET", key), other,
                         "a failed refresh put its own lock over another server's")

    def test_garbage_entry_starts_the_back_off(self):
        """A cache server that answers with something that is no entry at
        all is a failing one: the back-off starts (AH10527)."""
        servers = self.two_servers("redis:127.0.0.1:%d" % self.redis.port)
        servers[0].request(user="alice")
        self.redis.command("SET", token_key(self.redis), b"not an entry at all")
        status, _, _, doc = servers[1].request(user="alice")
        self.assertEqual(status, 200)
        self.assertEqual(jwt_payload(doc["Token"])["sub"], "alice")
        log = servers[1].log()
        self.assertIn("AH10527", log)
        self.assertIn("not a mod_cardscan entry", log)

    def test_tenants_with_different_keys_share_nothing(self):
        cache = "redis:127.0.0.1:%d" % self.redis.port
        a = self.apache(global_conf=fleet_conf(self.mock, cache))
        b = self.apache(global_conf=fleet_conf(self.mock, cache, key=OTHER_KEY))
        ta = a.request()[3]["Token"]
        tb = b.request()[3]["Token"]
        self.assertNotEqual(ta, tb)
        self.assertEqual(self.mock.calls(), 2)
        self.assertEqual(len([k for k in self.redis.keys() if k.endswith(b"54")]), 2)
        self.assertEqual(a.request()[3]["Token"], ta)
        self.assertEqual(b.request()[3]["Token"], tb)

    def test_explicit_fleet_secret(self):
        d = tempfile.mkdtemp(prefix="cs-secret-")
        self.addCleanup(shutil.rmtree, d, True)
        for name, text in (("s1", "fleet-secret-0123456789abcdef"), ("s2", "another-secret-0123456789abcdef")):
            with open(os.path.join(d, name), "w") as f:
                f.write(text + "\n")
        cache = "redis:127.0.0.1:%d" % self.redis.port
        s1 = "CardScanCacheSecret file:%s/s1\n" % d
        a = self.apache(global_conf=fleet_conf(self.mock, cache, extra=s1))
        b = self.apache(global_conf=fleet_conf(self.mock, cache, extra=s1))
        c = self.apache(global_conf=fleet_conf(self.mock, cache, extra="CardScanCacheSecret file:%s/s2\n" % d))
        t = a.request()[3]["Token"]
        self.assertEqual(b.request()[3]["Token"], t)
        self.assertEqual(self.mock.calls(), 1)
        # a server with another secret cannot open the entry: a miss, not an error
        status, _, _, doc = c.request()
        self.assertEqual(status, 200)
        self.assertNotEqual(doc["Token"], t)
        self.assertEqual(self.mock.calls(), 2)

    # Test-only ids: the authenticated user plus a request header, to mint
    # 16 users (never in production: the client would pick part of its id).
    STORM_ID = 'CardScanUserID "%{REMOTE_USER}-%{HTTP:X-Storm}"'

    def _storm_over_three_servers(self, cache):
        """A cold storm over 3 servers (event, worker, prefork) sharing the
        cache: 16 users, 6 concurrent requests each, 300 ms of API latency.
        The user's lock in the shared cache makes it one call per user."""
        self.mock.config(latency_ms=300)
        # a generous cache deadline: this test is about the lock, and on a
        # loaded machine a 0.25 s deadline can pass (then the request calls
        # without the lock, by design: see test_store.py)
        extra = self.STORM_ID + "\nCardScanCacheTimeout 3\n"
        servers = [self.apache(mpm=mpm, global_conf=fleet_conf(self.mock, cache, extra=extra))
                   for mpm in ("event", "worker", "prefork")]
        jobs = [(servers[(u + i) % 3], "u%d" % u) for u in range(16) for i in range(6)]

        def hit(server, shard):
            return shard, server.request(headers={"X-Storm": shard}, timeout=30)
        results = run_concurrently(hit, jobs, timeout=90)
        tokens = {}
        for shard, (status, _, data, doc) in results:
            self.assertEqual(status, 200, data[:300])
            self.assertEqual(jwt_payload(doc["Token"])["sub"], "alice-" + shard)
            tokens.setdefault(shard, set()).add(doc["Token"])
        calls = self.mock.stats()["user_ids"]
        self.assertEqual(sorted(calls), sorted("alice-u%d" % u for u in range(16)),
                         "API calls of a cold storm over three servers")
        self.assertEqual({len(t) for t in tokens.values()}, {1}, "one token per user, fleet-wide")

    def test_cold_start_storm_over_three_servers_redis(self):
        self._storm_over_three_servers("redis:127.0.0.1:%d" % self.redis.port)

    def test_cold_start_storm_over_three_servers_memcached(self):
        self._storm_over_three_servers("memcache:127.0.0.1:%d" % self.memcached.port)


@unittest.skipUnless(REDIS, "needs redis-server (apt-get install redis-server)")
class RedisOutageTests(MockTestCase):
    """Redis down, slow or restarted: requests still succeed through the API,
    the log is not flooded, and the cache is used again without a restart."""

    def setUp(self):
        super().setUp()
        self.redis = Redis()
        self.addCleanup(self.redis.close)

    def test_redis_down_then_back(self):
        a = self.apache(global_conf=fleet_conf(self.mock, "redis:127.0.0.1:%d" % self.redis.port),
                        servers=2)
        self.assertEqual(a.request()[0], 200)
        self.assertEqual(self.mock.calls(), 1)
        self.redis.stop()
        for i in range(30):
            status, _, _, doc = a.request(user=("alice", "bob")[i % 2])
            self.assertEqual(status, 200, doc)
        # without a cache, each request called the API
        self.assertGreaterEqual(self.mock.calls(), 30)
        log = a.log().splitlines()
        warnings = [l for l in log if "token cache failed" in l and ":warn]" in l]
        self.assertGreaterEqual(len(warnings), 1)
        # the cache is left alone for a while after a failure, so
        # mod_cardscan does not log once per request
        noisy = [l for l in log if "token cache failed" in l]
        self.assertLessEqual(len(noisy), 4 * len(a.child_pids()) + 4, "\n".join(noisy))
        self.redis.start()
        before = self.mock.calls()

        def cached_again():
            a.request(user="carol")
            n = self.mock.calls()
            a.request(user="carol")
            return self.mock.calls() == n
        wait_for(cached_again, 30, "the cache to be used again")
        self.assertGreater(self.mock.calls(), before)
        self.assertTrue(self.redis.keys())

    def test_redis_restart_mid_run_loses_no_request(self):
        a = self.apache(global_conf=fleet_conf(self.mock, "redis:127.0.0.1:%d" % self.redis.port),
                        servers=2)
        statuses = []
        stop = threading.Event()

        def load():
            users = ("alice", "bob", "carol")
            i = 0
            while not stop.is_set() and i < 2000:
                statuses.append(a.request(user=users[i % 3])[0])
                i += 1

        t = threading.Thread(target=load)
        t.start()
        wait_for(lambda: len(statuses) > 20, 20, "load")
        self.redis.stop()
        n = len(statuses)
        wait_for(lambda: len(statuses) > n + 20, 20, "load without redis")
        self.redis.start()
        n = len(statuses)
        wait_for(lambda: len(statuses) > n + 20, 20, "load after restart")
        stop.set()
        t.join(30)
        self.assertGreater(len(statuses), 60)
        self.assertEqual([s for s in statuses if s != 200], [])


if __name__ == "__main__":
    unittest.main()
