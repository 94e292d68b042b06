"""A child's life and death, against a real apache2 and the bundled mock:
a child that died while calling for a user does not make that user wait
for its lock to expire."""

import os
import signal
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import MockTestCase, apache_conf, wait_for  # noqa: E402

# Test-only: the id is the authenticated user plus a request header, to mint
# many users (never do this in production: the client picks part of its id).
USER_ID = 'CardScanUserID "%{REMOTE_USER}-%{HTTP:X-Test-User}"'

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone as far as we care (its parent reaps it)
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def socket_inodes(pid):
    inodes = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def child_connected_to(a, port):
    """The child of a with an established TCP connection to 127.0.0.1:port
    (the mock), or None."""
    conns = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                        conns.add(fields[9])
        except OSError:
            continue
    for pid in a.child_pids():
        if socket_inodes(pid) & conns:
            return pid
    return None


class DeadHolderTest(MockTestCase):
    """prefork, CardScanTimeout 8, the API answering in 3 s: the child
    calling for a user is killed (SIGKILL) while it holds the user's lock;
    the user's next request takes the dead holder's lock over at once on
    this server instead of waiting for it to expire."""

    LATENCY_MS = 3000

    def test_a_dead_holders_lock_is_taken_over_at_once(self):
        self.mock.config(latency_ms=self.LATENCY_MS)
        a = self.apache(mpm="prefork", servers=4,
                        global_conf=apache_conf(endpoint=self.mock.http_url, extra="CardScanTimeout 8\n"))
        first = {}

        def ask():
            try:
                first["status"] = a.request(user="alice", timeout=20)[0]
            except OSError as e:  # its child is killed: the connection drops
                first["error"] = e
        t = threading.Thread(target=ask, daemon=True)
        t.start()
        wait_for(lambda: self.mock.calls() >= 1, 10, "the call for alice to reach the API")
        pid = wait_for(lambda: child_connected_to(a, self.mock.http_port), 5, "the child calling")
        os.kill(pid, signal.SIGKILL)  # httpd logs no crash for a SIGKILL
        wait_for(lambda: not alive(pid), 5, "the killed child to go")
        t.join(20)
        self.assertIn("error", first, "the killed child answered")
        t0 = time.monotonic()
        status = a.request(user="alice", timeout=20)[0]
        took = time.monotonic() - t0
        self.assertEqual(status, 200)
        self.assertEqual(self.mock.calls(), 2)
        self.assertLess(took, self.LATENCY_MS / 1000.0 + 2.5,
                        "the request after the lock holder died took %.1f s" % took)


if __name__ == "__main__":
    unittest.main()
