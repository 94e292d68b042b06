"""The fleet-cache stores (hiredis, libmemcached) inside Apache: a stalled
cache server, authentication to Redis and a Redis restart, with a real
redis-server and memcached on 127.0.0.1 (issue: a fleet cache that never
stalls a request)."""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

from harness import MockTestCase, port_open, stop_pid, wait_for
from test_fleet import MEMCACHED, REDIS, Memcached, Redis, fleet_conf

USERS = ("alice", "bob", "carol")
# what a request may wait on a stalled cache, beyond its own work (the
# default CardScanCacheTimeout is 0.25 s), and what a loaded machine adds
STALL_BUDGET = 0.5
MARGIN = 0.5
API_LATENCY = 0.1


class AuthRedis(Redis):
    """A redis-server started with extra arguments (requirepass, users)."""

    def __init__(self, *extra):
        self.extra = list(extra)
        super().__init__()

    def start(self):
        self.proc = subprocess.Popen([REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir] + self.extra,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), 10, "redis-server")

    def cli(self, *args):
        """redis-cli with the given arguments (authentication included)."""
        out = subprocess.run(["redis-cli", "-p", str(self.port), "--no-auth-warning"] + list(args),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10)
        return out.stdout.decode()


class Load:
    """Threads requesting tokens for a few users in a loop; each request's
    status and duration are recorded with the time it started."""

    def __init__(self, server, threads=3):
        self.server = server
        self.results = []  # (start, duration, status, user)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def run(self, n):
        i = n
        while not self.stop.is_set() and i < 5000:
            user = USERS[i % len(USERS)]
            t0 = time.monotonic()
            status = self.server.request(user=user, timeout=20)[0]
            self.results.append((t0, time.monotonic() - t0, status, user))
            i += 1

    def count(self):
        return len(self.results)

    def run_for(self, n, what):
        """Waits until n more requests are done."""
        target = self.count() + n
        wait_for(lambda: self.count() >= target, 60, what)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        return self.results


# Test-only: a probe header makes a fresh user id for each probe (never in
# production: the client would pick part of its id).
PROBE_ID = 'CardScanUserID "%{REMOTE_USER}%{HTTP:X-Probe}"\n'
_probes = iter(range(1000000))


def cache_used(server, mock, user="carol"):
    """True when the shared cache serves again: a fresh user's token, stored
    by its first request, is found by a request made after the process's
    own one-second copy of it is gone, with no further call."""
    probe = {"X-Probe": "-probe%d" % next(_probes)}
    server.request(user=user, headers=probe)
    n = mock.calls()
    time.sleep(1.2)  # past the per-process copy (1 s): the next read is the cache's
    server.request(user=user, headers=probe)
    return mock.calls() == n


def secret_file(text):
    d = tempfile.mkdtemp(prefix="cs-cacheauth-")
    path = os.path.join(d, "redis.pw")
    with open(path, "w") as f:
        f.write(text + "\n")
    os.chmod(path, 0o600)
    return d, path


@unittest.skipUnless(REDIS and MEMCACHED, "redis-server and memcached are installed by scripts/test")
class StalledCacheTests(MockTestCase):
    """A cache server that accepts connections but never answers (SIGSTOP):
    no request fails, none waits beyond the deadline, and the cache is used
    again once the server answers (SIGCONT), without a restart."""

    def stall_under_load(self, cache, proc):
        self.mock.config(latency_ms=int(API_LATENCY * 1000))
        a = self.apache(global_conf=fleet_conf(self.mock, cache, extra=PROBE_ID), servers=2)
        for user in USERS:
            self.assertEqual(a.request(user=user)[0], 200)
        calls = self.mock.calls()
        load = Load(a, threads=6)
        try:
            load.run_for(30, "load with the cache")
            # served from the cache: no call
            self.assertEqual(self.mock.calls(), calls)
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                stalled_at = time.monotonic()
                # the cache is left alone: once the processes' one-second
                # copies are gone, requests call the API
                wait_for(lambda: self.mock.calls() > calls, 20, "requests to call the API")
                load.run_for(40, "load with the cache stalled")
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            continued_at = time.monotonic()
            wait_for(lambda: cache_used(a, self.mock), 40, "the cache to be used again")
            load.run_for(20, "load after SIGCONT")
        finally:
            results = load.finish()
        self.assertEqual([r for r in results if r[2] != 200], [])
        during = [r for r in results if stalled_at <= r[0] + r[1] and r[0] <= continued_at]
        self.assertTrue(during)
        slowest = max(r[1] for r in results)
        self.assertLess(slowest, STALL_BUDGET + API_LATENCY + MARGIN,
                        "a request waited %.3f s on a stalled cache" % slowest)
        # only the requests that met the stall first waited on it: the
        # back-off spares the ones that follow
        waited = [r for r in during if r[1] > 0.2 + API_LATENCY]
        self.assertLess(len(waited), len(during) // 2, waited)
        log = a.log()
        self.assertIn("within the deadline", log)
        # the requests that met the stall together count as one failure:
        # the pause stays short, and the cache comes back soon after SIGCONT
        pauses = [int(m) for m in re.findall(r"directly for the next (\d+) s", log)]
        self.assertTrue(pauses)
        self.assertLessEqual(max(pauses), 8, pauses)
        return a

    def test_cache_timeout_is_the_deadline(self):
        redis = Redis()
        self.addCleanup(redis.close)
        a = self.apache(global_conf=fleet_conf(self.mock, "redis:127.0.0.1:%d" % redis.port,
                                               extra="CardScanCacheTimeout 1.2\n"), servers=1)
        self.assertEqual(a.request(user="alice")[0], 200)
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            self.assertEqual(a.request(user="bob")[0], 200)
            first = time.monotonic() - t0
            t0 = time.monotonic()
            self.assertEqual(a.request(user="carol")[0], 200)
            second = time.monotonic() - t0
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        # the first request met the stall and waited the deadline it was
        # given, not the default; the next one did not wait at all
        self.assertGreaterEqual(first, 1.1)
        self.assertLess(first, 1.2 + 2 * MARGIN + API_LATENCY)
        self.assertLess(second, 0.5)
        self.assertIn("1200 ms per operation", a.log())

    def test_redis_stopped_then_continued(self):
        redis = Redis()
        self.addCleanup(redis.close)
        self.stall_under_load("redis:127.0.0.1:%d" % redis.port, redis.proc)
        self.assertTrue(redis.keys())

    def test_memcached_stopped_then_continued(self):
        memcached = Memcached()
        self.addCleanup(memcached.close)
        self.stall_under_load("memcache:127.0.0.1:%d" % memcached.port, memcached.proc)


@unittest.skipUnless(REDIS, "redis-server is installed by scripts/test")
class RedisAuthTests(MockTestCase):
    def test_requirepass_from_a_file(self):
        redis = AuthRedis("--requirepass", "Req-pass-0123")
        self.addCleanup(redis.close)
        d, path = secret_file("Req-pass-0123")
        self.addCleanup(shutil.rmtree, d, True)
        a = self.apache(global_conf=fleet_conf(self.mock, "redis:127.0.0.1:%d" % redis.port,
                                               extra="CardScanCacheAuth file:%s\n" % path))
        tokens = {a.request(user="alice")[3]["Token"] for _ in range(4)}
        self.assertEqual(len(tokens), 1)
        self.assertEqual(self.mock.calls(), 1)
        self.assertIn("cardscan:", redis.cli("-a", "Req-pass-0123", "KEYS", "*"))
        self.assertNotIn("Req-pass-0123", a.log())
        self.assertNotIn("token cache failed", a.log())

    def test_acl_user_and_a_database_number(self):
        redis = AuthRedis("--user", "default", "off", "--user", "cardscan", "on", ">Acl-pass-4567",
                          "~cardscan:*", "+@all")
        self.addCleanup(redis.close)
        a = self.apache(global_conf=fleet_conf(self.mock, "redis:127.0.0.1:%d/2" % redis.port,
                                               extra="CardScanCacheAuth cardscan Acl-pass-4567\n"))
        tokens = {a.request(user="bob")[3]["Token"] for _ in range(4)}
        self.assertEqual(len(tokens), 1)
        self.assertEqual(self.mock.calls(), 1)
        auth = ["--user", "cardscan", "--pass", "Acl-pass-4567"]
        self.assertIn("cardscan:", redis.cli(*auth, "-n", "2", "KEYS", "*"))
        self.assertNotIn("cardscan:", redis.cli(*auth, "-n", "0", "KEYS", "*"))
        self.assertNotIn("Acl-pass-4567", a.log())

    def test_wrong_password_is_named_once_and_requests_go_on(self):
        redis = AuthRedis("--requirepass", "Right-pass-89")
        self.addCleanup(redis.close)
        a = self.apache(global_conf=fleet_conf(self.mock, "redis:127.0.0.1:%d" % redis.port,
                                               extra="CardScanCacheAuth env:CS_TEST_CACHE_PW\n"),
                        servers=2, start=False)
        a.start(env={"CS_TEST_CACHE_PW": "Wrong-pass-12"})
        deadline = time.monotonic() + 8  # several back-off periods
        n = 0
        while time.monotonic() < deadline:
            status, _, _, doc = a.request(user=USERS[n % 3])
            self.assertEqual(status, 200, doc)
            n += 1
            time.sleep(0.05)
        # every request was served, through the API
        self.assertGreaterEqual(self.mock.calls(), n - 3)
        log = a.log()
        named = [l for l in log.splitlines() if "WRONGPASS" in l and ":error]" in l]
        self.assertEqual(len(named), 1, "\n".join(named))
        self.assertIn("requirepass", named[0])
        self.assertNotIn("Wrong-pass-12", log)
        self.assertNotIn("Right-pass-89", log)

    def test_directive_checks(self):
        redis = "CardScanCache redis:127.0.0.1:6379\n"
        for extra, says in (("CardScanCacheTimeout 0\n", "CardScanCacheTimeout"),
                            ("CardScanCacheTimeout 11\n", "CardScanCacheTimeout"),
                            ("CardScanCacheTimeout soon\n", "CardScanCacheTimeout"),
                            ("CardScanCacheAuth env:CS_TEST_NO_SUCH_VAR\n", "CS_TEST_NO_SUCH_VAR"),
                            ("CardScanCacheAuth file:/nonexistent/redis.pw\n", "/nonexistent/redis.pw"),
                            ("CardScanCacheAuth user pw extra\n", "CardScanCacheAuth"),
                            ("CardScanCacheAuth '' pw\n", "username")):
            a = self.apache(global_conf=fleet_conf(self.mock, "none", extra=redis + extra), start=False)
            out = a.configtest()
            self.assertNotEqual(out.returncode, 0, extra)
            self.assertIn(says, out.stdout.decode(), extra)
        # server config only
        a = self.apache(global_conf=fleet_conf(self.mock, "none"), start=False,
                        body="<VirtualHost *:80>\nCardScanCacheTimeout 1\n</VirtualHost>\n")
        self.assertNotEqual(a.configtest().returncode, 0)
        # memcached takes no password
        a = self.apache(global_conf=fleet_conf(self.mock, "memcache:127.0.0.1:11211",
                                               extra="CardScanCacheAuth pw\n"), start=False)
        out = a.configtest()
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("memcached takes no password", out.stdout.decode() + a.log())
        self.assertNotIn("pw\n", out.stdout.decode())

    def test_bad_cache_specs_stop_the_start(self):
        for spec, says in (("redis:127.0.0.1:0", "port number"), ("memcache:127.0.0.1:11211/1", "database"),
                           ("redis:host,,other", "empty item")):
            a = self.apache(global_conf=fleet_conf(self.mock, spec), start=False)
            out = a.configtest()
            self.assertNotEqual(out.returncode, 0, spec)
            self.assertIn(says, out.stdout.decode() + a.log(), spec)


@unittest.skipUnless(REDIS, "redis-server is installed by scripts/test")
class RedisRestartTests(MockTestCase):
    def test_restart_mid_run_then_cache_used_again(self):
        redis = Redis()
        self.addCleanup(redis.close)
        a = self.apache(global_conf=fleet_conf(self.mock, "redis:127.0.0.1:%d" % redis.port, extra=PROBE_ID),
                        servers=2)
        load = Load(a)
        try:
            load.run_for(20, "load")
            redis.stop()
            load.run_for(20, "load without redis")
            redis.start()
            wait_for(lambda: cache_used(a, self.mock), 40, "the cache to be used again")
            load.run_for(20, "load after the restart")
        finally:
            results = load.finish()
        self.assertEqual([r for r in results if r[2] != 200], [])
        self.assertTrue(redis.keys())


if __name__ == "__main__":
    unittest.main()
