"""The fleet caches and a module built without their clients: a build
--without-hiredis (--without-libmemcached) refuses `CardScanCache redis:...`
(`memcache:...`) at start-up, in `httpd -t` and in a real start, with a
message that says how to rebuild it; a build with them accepts the same line.

Which build is under test is read from config.h in CS_BUILDDIR. scripts/test
runs the first case (Debian 12's build has both clients); scripts/compat
builds the module --without-hiredis --without-libmemcached and runs this
file against it for the second."""

import os
import re
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import BUILDDIR, TEST_KEY, Apache, apache_conf  # noqa: E402

REDIS_MSG = ("this mod_cardscan was built without hiredis (configure --without-hiredis): rebuild it with "
             "hiredis (RHEL: dnf install hiredis-devel from EPEL; Debian/Ubuntu: apt-get install "
             "libhiredis-dev) to use CardScanCache redis:...")
MEMCACHE_MSG = ("this mod_cardscan was built without libmemcached (configure --without-libmemcached): "
                "rebuild it with libmemcached")


def built_with(macro):
    """Whether config.h of the build under test defines macro (1)."""
    path = os.path.join(BUILDDIR, "config.h")
    with open(path, encoding="utf-8") as f:  # no config.h: an error, not a guess
        return re.search(r"^#define %s 1$" % re.escape(macro), f.read(), re.M) is not None


class WithoutFleetClientsTest(unittest.TestCase):

    def setUp(self):
        self.servers = []

    def tearDown(self):
        for a in self.servers:
            a.stop()

    def server(self, cache):
        conf = apache_conf(key=TEST_KEY, endpoint="http://127.0.0.1:9/v1",
                           extra="CardScanCache %s\n" % cache)
        a = Apache(global_conf=conf, start=False)
        self.servers.append(a)
        return a

    def check(self, cache, built, message):
        a = self.server(cache)
        out = a.configtest()
        text = out.stdout.decode("utf-8", "replace")
        if built:
            # made, not connected: nothing listens there and -t passes
            self.assertEqual(out.returncode, 0, text)
            self.assertIn("Syntax OK", text)
            self.assertNotIn("built without", text)
            return
        self.assertNotEqual(out.returncode, 0, text)
        self.assertNotIn("Syntax OK", text)
        self.assertIn("AH10601", text)
        self.assertIn("CardScanCache %s: %s" % (cache, message), text)
        with self.assertRaises(RuntimeError) as cm:
            a.start()
        self.assertIn(message, str(cm.exception))

    def test_redis_needs_hiredis(self):
        self.check("redis:127.0.0.1:6379", built_with("HAVE_HIREDIS"), REDIS_MSG)

    def test_memcache_needs_libmemcached(self):
        self.check("memcache:127.0.0.1:11211", built_with("HAVE_LIBMEMCACHED"), MEMCACHE_MSG)


if __name__ == "__main__":
    unittest.main()
