"""Operations: metrics aggregated over all children, server-status figures,
graceful restarts under load, and no leaked segments, semaphores or file
descriptors over 100 graceful restarts."""

import os
import re
import subprocess
import threading
import time
import unittest

from harness import MockTestCase, jwt_payload, wait_for

OPS_LOCATIONS = """
<Location "/cardscan-metrics">
    SetHandler cardscan-metrics
    Require ip 127.0.0.1
</Location>
<Location "/server-status">
    SetHandler server-status
    Require ip 127.0.0.1
</Location>
"""


def metric(text, name):
    m = re.search(r"^%s (\S+)$" % re.escape(name), text, re.M)
    if not m:
        raise AssertionError("metric %s missing from:\n%s" % (name, text))
    return float(m.group(1))


# The server under test runs in an IPC namespace of its own (unshare --ipc,
# as root), so the System V objects counted there are its own, not those of
# other servers on the machine.
OWN_IPC = ["unshare", "--ipc"] if os.geteuid() == 0 else ["unshare", "--ipc", "--user", "--map-root-user"]


def sysv_ids(kind, pid):
    """The System V objects (shm, sem, msg) in the IPC namespace of pid."""
    enter = ["nsenter", "--target", str(pid), "--ipc"]
    if os.geteuid() != 0:
        enter += ["--user", "--preserve-credentials"]
    out = subprocess.run(enter + ["cat", "/proc/sysvipc/" + kind], check=True, stdout=subprocess.PIPE,
                         timeout=10).stdout.decode()
    return len(out.splitlines()) - 1


def settled_sysv_ids(kind, pid):
    """sysv_ids once three reads 0.1 s apart agree (not mid-restart)."""
    reads = []

    def settled():
        reads.append(sysv_ids(kind, pid))
        time.sleep(0.1)
        return len(reads) >= 3 and len(set(reads[-3:])) == 1
    wait_for(settled, 20, "a settled count of System V %s objects" % kind)
    return reads[-1]


def proc_counts(pid):
    with open("/proc/%d/maps" % pid) as f:
        return len(os.listdir("/proc/%d/fd" % pid)), sum(1 for _ in f)


class MetricsTests(MockTestCase):
    def check_metrics(self, mpm):
        # a child serves at most 6 connections, so the 24 requests (a new
        # connection each) are spread over several processes, replaced ones
        # included: the figures must still add up
        spread = {"prefork": "StartServers 4\nMinSpareServers 4\nMaxSpareServers 6\n"
                             "MaxRequestWorkers 32\nMaxConnectionsPerChild 6\n",
                  "event": "StartServers 2\nServerLimit 8\nThreadsPerChild 16\nMinSpareThreads 16\n"
                           "MaxSpareThreads 128\nMaxRequestWorkers 128\nMaxConnectionsPerChild 6\n"}
        a = self.apache(mpm=mpm, body=OPS_LOCATIONS, mpm_conf=spread[mpm], access_log=True)
        for i in range(24):
            status, _, _, doc = a.request(user=("alice", "bob", "carol")[i % 3])
            self.assertEqual(status, 200)
        self.assertEqual(a.request(method="PUT")[0], 405)
        status, headers, body, _ = a.request("/cardscan-metrics", user=None)
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/plain"))
        text = body.decode()
        # the requests were served by several children: the figures are the
        # sum over all of them
        self.assertGreater(len(set(a.access_pids())), 1)
        self.assertEqual(metric(text, 'cardscan_requests_total{outcome="fetched"}'), 3)
        self.assertEqual(metric(text, 'cardscan_requests_total{outcome="hit"}'), 21)
        self.assertEqual(metric(text, 'cardscan_requests_total{outcome="denied"}'), 1)
        self.assertEqual(metric(text, "cardscan_cache_hits_total"), 21)
        self.assertEqual(metric(text, "cardscan_cache_misses_total"), 3)
        self.assertEqual(metric(text, 'cardscan_upstream_requests_total{class="2xx"}'), 3)
        self.assertEqual(metric(text, "cardscan_upstream_duration_seconds_count"), 3)
        self.assertEqual(metric(text, 'cardscan_upstream_duration_seconds_bucket{le="+Inf"}'), 3)
        self.assertEqual(metric(text, "cardscan_circuit_open"), 0)
        self.assertIn("# TYPE cardscan_upstream_duration_seconds histogram", text)
        # mod_status shows the same figures
        status, _, body, _ = a.request("/server-status?auto", user=None)
        self.assertEqual(status, 200)
        self.assertRegex(body.decode(), r'cardscan_cache_hits_total: 21\b')
        status, _, body, _ = a.request("/server-status", user=None)
        self.assertIn("mod_cardscan", body.decode())
        self.assertIn('cardscan_requests_total{outcome=&quot;hit&quot;} 21', body.decode())
        # the metrics survive a graceful restart (the shared memory is kept)
        generation = a.log().count("resuming normal operations")
        a.graceful()
        wait_for(lambda: a.log().count("resuming normal operations") > generation, 20, "graceful restart")
        text = a.request("/cardscan-metrics", user=None)[2].decode()
        self.assertEqual(metric(text, "cardscan_cache_hits_total"), 21)

    def test_metrics_prefork(self):
        self.check_metrics("prefork")

    def test_metrics_event(self):
        self.check_metrics("event")

    def test_metrics_only_get(self):
        a = self.apache(body=OPS_LOCATIONS)
        self.assertEqual(a.request("/cardscan-metrics", user=None, method="POST")[0], 405)


class RestartTests(MockTestCase):
    def test_graceful_restarts_under_load_lose_no_request(self):
        for mpm in ("event", "prefork"):
            with self.subTest(mpm=mpm):
                self.mock.reset()
                a = self.apache(mpm=mpm, body=OPS_LOCATIONS, servers=2)
                results = []
                stop = threading.Event()

                def load(user):
                    n = 0
                    while not stop.is_set() and n < 3000:
                        status, _, _, doc = a.request(user=user)
                        ok = status == 200 and jwt_payload(doc["Token"])["sub"] == user
                        results.append(ok or (status, doc))
                        n += 1

                threads = [threading.Thread(target=load, args=(u,)) for u in ("alice", "bob", "carol")]
                for t in threads:
                    t.start()
                try:
                    for i in range(5):
                        generation = a.log().count("resuming normal operations")
                        before = len(results)
                        a.graceful()
                        wait_for(lambda: a.log().count("resuming normal operations") > generation, 30,
                                 "graceful restart")
                        wait_for(lambda: len(results) > before + 10, 30, "requests after the restart")
                finally:
                    stop.set()
                    for t in threads:
                        t.join(60)
                self.assertGreater(len(results), 50)
                self.assertEqual([r for r in results if r is not True], [])

    def test_100_graceful_restarts_leak_nothing(self):
        # the module's mutexes as System V semaphores, so that a leaked mutex
        # is a leaked semaphore this test counts
        a = self.apache(mpm="event", body=OPS_LOCATIONS + "Mutex sysvsem cardscan-cache cardscan-flight\n",
                        servers=1, launcher=OWN_IPC)
        self.assertEqual(a.request()[0], 200)
        pid = a.proc.pid
        self.assertGreater(sysv_ids("sem", pid), 0, "the server's semaphores are not seen")

        # a few restarts first: allocations made once per process settle
        for _ in range(3):
            a.graceful_and_wait()
        shm, sem = settled_sysv_ids("shm", pid), settled_sysv_ids("sem", pid)
        fds, maps = proc_counts(pid)
        for _ in range(100):
            a.graceful_and_wait()
        self.assertEqual(a.request()[0], 200)
        self.assertEqual(settled_sysv_ids("shm", pid), shm, "System V shared memory segments leaked")
        self.assertEqual(settled_sysv_ids("sem", pid), sem, "System V semaphores leaked")
        fds2, maps2 = proc_counts(pid)
        self.assertLessEqual(fds2, fds, "file descriptors leaked by the parent")
        # anonymous shared memory (metrics, mutexes, shmcb) is a mapping; the
        # sanitizers' allocator (CS_HTTPD_PRELOAD) maps memory of its own as
        # it goes, so allow it a few (a leak per restart would be 100)
        slack = 16 if os.environ.get("CS_HTTPD_PRELOAD") else 2
        self.assertLessEqual(maps2, maps + slack, "mappings leaked by the parent")


if __name__ == "__main__":
    unittest.main()
