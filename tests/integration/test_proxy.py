"""CardScanProxy through a real forward proxy: a second apache2 with
mod_proxy, mod_proxy_http and mod_proxy_connect, asking for Basic proxy
authentication (407), in front of the mock over https (CONNECT) and http."""

import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (TEST_KEY, Apache, Mock, auth_location, free_port, jwt_payload,  # noqa: E402
                     session_dir)

PROXY_USER, PROXY_PW = "proxyuser", "proxypw"


def _write(path, text, mode=0o600):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class ProxyTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="cs-proxy-")
        os.chmod(cls.tmp, 0o755)
        cls.mock = Mock()
        cls.servers = []
        try:
            pw = subprocess.run(["openssl", "passwd", "-apr1", PROXY_PW], check=True, timeout=30,
                                stdout=subprocess.PIPE).stdout.decode().strip()
            htpasswd = _write(os.path.join(cls.tmp, "proxy.htpasswd"), "%s:%s\n" % (PROXY_USER, pw), 0o644)
            cls.proxy_log = os.path.join(cls.tmp, "proxy_access.log")
            # the forward proxy: CONNECT only to the mock's https port
            cls.proxy = cls._start(Apache(start=False, modules=("proxy", "proxy_http", "proxy_connect"),
                                          loglevel="proxy_connect:debug",
                                          global_conf=f"""ProxyRequests On
ProxyVia Off
AllowCONNECT {cls.mock.https_port}
<Proxy "*">
    AuthType Basic
    AuthName "proxy"
    AuthBasicProvider file
    AuthUserFile "{htpasswd}"
    Require valid-user
</Proxy>
CustomLog "{cls.proxy_log}" "%u %>s %r"
"""))
            cls.proxy_url = "http://127.0.0.1:%d" % cls.proxy.port
            cls.creds = _write(os.path.join(cls.tmp, "creds"), "%s:%s\n" % (PROXY_USER, PROXY_PW))
            cls.wrong_creds = _write(os.path.join(cls.tmp, "wrong-creds"), "%s:nope\n" % PROXY_USER)
            sd = session_dir()
            cls.p_wrong = free_port()
            body = auth_location("/https", "CardScanEndpoint " + cls.mock.https_url)
            body += ("Listen 127.0.0.1:{p}\n<VirtualHost 127.0.0.1:{p}>\n"
                     "    CardScanProxy {url} file:{creds}\n</VirtualHost>\n").format(
                         p=cls.p_wrong, url=cls.proxy_url, creds=cls.wrong_creds)
            conf = "\n".join(["CardScanAPIKey " + TEST_KEY, "CardScanEndpoint " + cls.mock.http_url,
                              'CardScanCAFile "%s/ca.pem"' % sd, "CardScanTimeout 3",
                              "CardScanCircuitBreaker 0",
                              "CardScanProxy %s file:%s" % (cls.proxy_url, cls.creds), ""])
            # one child: back-to-back calls share its most recently used handle
            cls.a = cls._start(Apache(start=False, body=body, global_conf=conf, loglevel="cardscan:trace4",
                                      servers=1), env=None)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _start(cls, a, env=None):
        cls.servers.append(a)
        a.start(env=env)
        return a

    @classmethod
    def tearDownClass(cls):
        try:
            # clients first: a live CONNECT tunnel would hold up the proxy's stop
            for a in reversed(cls.servers):
                a.stop()
        finally:
            cls.mock.stop()
            shutil.rmtree(cls.tmp, ignore_errors=True)

    def setUp(self):
        self.mock.reset()

    def proxy_lines(self):
        try:
            with open(self.proxy_log) as f:
                return f.read().splitlines()
        except OSError:
            return []

    def _through_proxy(self, user, path):
        """One request via the proxy; returns (new proxy access-log lines, new proxy error log)."""
        before, pmark, mark = len(self.proxy_lines()), len(self.proxy.log()), len(self.a.log())
        st, _, body, doc = self.a.request(path, user=user)
        self.assertEqual(st, 200, body)
        self.assertEqual(jwt_payload(doc["Token"])["sub"], user)
        self.assertEqual(self.mock.calls(), 1)
        log = self.a.log()[mark:]
        # the proxy's credentials are not logged, even by libcurl's trace
        self.assertIn("Proxy-Authorization: <masked>", log)
        self.assertNotIn(PROXY_PW, log)
        self.assertNotIn(base64.b64encode(("%s:%s" % (PROXY_USER, PROXY_PW)).encode()).decode(), log)
        return self.proxy_lines()[before:], self.proxy.log()[pmark:]

    def test_https_through_connect(self):
        lines, plog = self._through_proxy("alice", "/https")
        # a CONNECT is access-logged when its tunnel closes (libcurl keeps it
        # open); mod_proxy_connect logs it when it opens, after the proxy
        # authentication passed
        self.assertRegex(plog, r"AH01019: connecting 127\.0\.0\.1:%d to 127\.0\.0\.1:%d"
                         % (self.mock.https_port, self.mock.https_port))
        self.assertFalse([ln for ln in lines if "access-token" in ln], "TLS was not tunnelled: %s" % lines)
        req = self.mock.stats()["requests"][0]
        self.assertTrue(req["tls"])
        self.assertNotIn("proxy-authorization", req["headers"])

    def test_http_loopback_endpoint_is_called_directly(self):
        """An http:// endpoint is a loopback one: it never goes through
        CardScanProxy, which would see the key in clear."""
        before, mark = len(self.proxy_lines()), len(self.a.log())
        st, _, body, doc = self.a.request("/cardscan-session", user="bob")
        self.assertEqual(st, 200, body)
        self.assertEqual(jwt_payload(doc["Token"])["sub"], "bob")
        self.assertEqual(self.mock.calls(), 1)
        self.assertEqual([ln for ln in self.proxy_lines()[before:] if "access-token" in ln], [])
        self.assertNotIn("Proxy-Authorization", self.a.log()[mark:])
        req = self.mock.stats()["requests"][0]
        self.assertFalse(req["tls"])
        self.assertNotIn("proxy-authorization", req["headers"], "the proxy credentials reached the API")

    def test_wrong_proxy_credentials(self):
        for path in ("/https",):
            with self.subTest(path):
                before = len(self.proxy_lines())
                st, _, body, doc = self.a.request(path, user="carol", port=self.p_wrong)
                self.assertEqual(st, 502, body)
                self.assertEqual(doc["error"], "upstream_error")
                self.assertEqual(self.mock.calls(), 0)
                new = self.proxy_lines()[before:]
                self.assertTrue(new and all(" 407 " in ln for ln in new), new)

    def test_wrong_credentials_never_ride_a_tunnel_of_the_right_ones(self):
        """The wrong-credentials vhost's call runs on the handle whose tunnel
        the right credentials have just opened (one child, the most recently
        used handle first). libcurl 7.61.1 matches a proxy connection by host
        and port only and would reuse that tunnel: the module keeps each
        handle to one proxy and credentials. (Named to run after
        test_https_through_connect, which must open its own tunnel.)"""
        st, _, body, _ = self.a.request("/https", user="a&user_id=b")
        self.assertEqual(st, 200, body)
        self.assertEqual(self.mock.calls(), 1)
        before = len(self.proxy_lines())
        st, _, body, doc = self.a.request("/https", user="\u00fc@h.example", port=self.p_wrong)
        self.assertEqual(st, 502, body)
        self.assertEqual(doc["error"], "upstream_error")
        self.assertEqual(self.mock.calls(), 1)
        new = self.proxy_lines()[before:]
        self.assertTrue([ln for ln in new if " 407 " in ln], new)

    def test_credentials_in_the_proxy_url_refuse_to_start(self):
        for url in ("http://u:p@127.0.0.1:%d" % self.proxy.port, "http://u@127.0.0.1:%d" % self.proxy.port):
            with self.subTest(url):
                a = Apache(start=False, global_conf="CardScanAPIKey %s\nCardScanEndpoint %s\nCardScanProxy %s\n"
                           % (TEST_KEY, self.mock.http_url, url))
                try:
                    r = a.configtest()
                    out = r.stdout.decode(errors="replace")
                    self.assertNotEqual(r.returncode, 0, out)
                    self.assertIn("CardScanProxy", out)
                    with self.assertRaises(RuntimeError):
                        a.start()
                finally:
                    a.stop()

    def test_no_proxy_in_the_environment_does_not_bypass_cardscan_proxy(self):
        """As http_proxy is ignored, so is no_proxy: CardScanProxy alone
        decides. (A proxy-only network would otherwise see direct calls.)"""
        a = Apache(start=False, global_conf="CardScanAPIKey %s\nCardScanEndpoint %s\nCardScanProxy %s file:%s\n"
                   "CardScanCAFile \"%s/ca.pem\"\n"
                   % (TEST_KEY, self.mock.https_url, self.proxy_url, self.creds, session_dir()),
                   loglevel="cardscan:trace4")
        try:
            a.start(env={"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"})
            pmark = len(self.proxy.log())
            st, _, body, _ = a.request(user="x y")
            self.assertEqual(st, 200, body)
            env_lines = [ln[ln.find("libcurl"):] for ln in a.log().splitlines() if "proxy env variable" in ln]
            # the CONNECT is logged by the proxy when it opens the tunnel
            self.assertRegex(self.proxy.log()[pmark:], r"AH01019: connecting 127\.0\.0\.1:%d"
                             % self.mock.https_port,
                             "the call bypassed CardScanProxy (module log: %s)" % env_lines)
        finally:
            a.stop()

    def test_proxy_variables_in_the_environment_are_ignored(self):
        """Without CardScanProxy, http_proxy & co. do not send the key to a proxy."""
        dead = "http://127.0.0.1:%d" % free_port()
        env = {k: dead for k in ("http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")}
        a = Apache(start=False, body=auth_location("/https", "CardScanEndpoint " + self.mock.https_url),
                   global_conf="CardScanAPIKey %s\nCardScanEndpoint %s\nCardScanCAFile \"%s/ca.pem\"\n"
                   % (TEST_KEY, self.mock.http_url, session_dir()))
        try:
            a.start(env=env)
            for path in ("/cardscan-session", "/https"):
                st, _, body, _ = a.request(path)
                self.assertEqual(st, 200, body)
            self.assertEqual(self.mock.calls(), 2)
        finally:
            a.stop()


if __name__ == "__main__":
    unittest.main()
