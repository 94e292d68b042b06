"""Security properties of mod_cardscan, end to end: the user id comes only
from Apache's authentication, tenants never share tokens, the API key and the
tokens never reach a log (at trace8) or a reply, key-file permissions are
checked, TLS to the API is 1.2 or newer, and plain http only to loopback.

Secrets at rest (sealed socache entries) cannot be observed from outside for
the default shmcb cache; the Redis tests cover them."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import unittest
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import (OTHER_KEY, TEST_KEY, Apache, Mock, auth_location, free_port,  # noqa: E402
                     jwt_payload, port_open, session_dir, stop_pid)

JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# Apache's error log writes bytes outside printable ASCII as \xNN.
MASKED_IN_LOG = re.compile(r"sk_test_cardscan_ai_(?:\u2026|\\xe2\\x80\\xa6)abcd")
SECRET_PART = "mockkey0123456789"  # the part of TEST_KEY the masked form hides
METRICS_LOCATION = '<Location "/metrics">\n    SetHandler cardscan-metrics\n</Location>\n'
# Test-only identity expression: a per-case suffix from a request header gives
# each case an empty cache entry. Never configure a client-chosen id for real.
CASE_USER_ID = 'CardScanUserID "%{REMOTE_USER}-%{HTTP:X-Case}"'


def server_conf(*lines):
    return "\n".join(lines) + "\n"


def vhost(port, *lines):
    return "Listen 127.0.0.1:%d\n<VirtualHost 127.0.0.1:%d>\n%s\n</VirtualHost>\n" % (
        port, port, "\n".join("    " + ln for ln in lines))


class ClassApache(unittest.TestCase):
    """One mock per class; Apache servers stopped by PID at the end."""

    @classmethod
    def setUpClass(cls):
        cls.mock = Mock()
        cls.servers = []

    @classmethod
    def tearDownClass(cls):
        try:
            for a in cls.servers:
                a.stop()
        finally:
            cls.mock.stop()

    @classmethod
    def start_apache(cls, **kw):
        env = kw.pop("env", None)
        a = Apache(start=False, **kw)
        cls.servers.append(a)
        a.start(env=env)
        return a

    def assert_error(self, reply, status, code):
        st, hdrs, body, doc = reply
        self.assertEqual(st, status, body)
        self.assertIsInstance(doc, dict, body)
        self.assertEqual(doc.get("error"), code, body)
        self.assertIsNone(JWT_RE.search(body.decode(errors="replace")))


# ------------------------------------------------------------------ identity

class IdentityTest(ClassApache):
    """The user id comes only from CardScanUserID over the authenticated
    request. The cache is off so that every request reaches the mock and the
    id it carried can be checked."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        body = auth_location("/noid", 'CardScanUserID "%{reqenv:NOPE}"')
        # TEST-ONLY: part of the id from a client header, to make ids of any
        # length and content. A real configuration must never do this.
        body += auth_location("/pad", 'CardScanUserID "%{REMOTE_USER}%{HTTP:X-Pad}"')
        body += ('<Location "/open">\n    Require all granted\n    SetHandler cardscan-session\n'
                 '</Location>\n')
        # a misconfiguration: no authentication, and an id taken from a header
        body += ('<Location "/open-expr">\n    Require all granted\n    SetHandler cardscan-session\n'
                 '    CardScanUserID "%{HTTP:X-User}"\n</Location>\n')
        cls.a = cls.start_apache(body=body, global_conf=server_conf(
            "CardScanAPIKey " + TEST_KEY, "CardScanEndpoint " + cls.mock.http_url, "CardScanCache none"))

    def setUp(self):
        self.mock.reset()

    def test_client_supplied_user_ids_are_ignored(self):
        form = urllib.parse.urlencode({"user_id": "bob"})
        vectors = {
            "query": dict(path="/cardscan-session?user_id=bob"),
            "query-twice": dict(path="/cardscan-session?user_id=bob&user_id=carol"),
            "form": dict(method="POST", body=form,
                         headers={"Content-Type": "application/x-www-form-urlencoded"}),
            "form+query": dict(method="POST", path="/cardscan-session?user_id=bob", body=form,
                               headers={"Content-Type": "application/x-www-form-urlencoded"}),
            "json": dict(method="POST", body=json.dumps({"user_id": "bob"}),
                         headers={"Content-Type": "application/json"}),
            "X-User-Id": dict(headers={"X-User-Id": "bob"}),
            "X-Remote-User": dict(headers={"X-Remote-User": "bob"}),
            "X-Forwarded-User": dict(headers={"X-Forwarded-User": "bob"}),
            "all headers": dict(headers={"X-User-Id": "bob", "X-Remote-User": "bob",
                                         "X-Forwarded-User": "bob", "Remote-User": "bob"}),
        }
        for name, kw in vectors.items():
            with self.subTest(name):
                self.mock.reset()
                st, _, body, doc = self.a.request(user="alice", **kw)
                self.assertEqual(st, 200, body)
                self.assertEqual(jwt_payload(doc["Token"])["sub"], "alice")
                stats = self.mock.stats()
                self.assertEqual(stats["user_ids"], ["alice"])
                self.assertEqual(stats["requests"][0]["raw_query"], "user_id=alice")

    def test_empty_user_id_is_refused_without_a_call(self):
        self.assert_error(self.a.request("/noid"), 403, "no_user_id")
        self.assertEqual(self.mock.calls(), 0)

    def test_unauthenticated_request_is_refused_without_a_call(self):
        self.assert_error(self.a.request("/open", user=None), 401, "unauthenticated")
        self.assertEqual(self.mock.calls(), 0)

    def test_no_authentication_fails_closed_whatever_the_user_id_expression(self):
        # CardScanUserID names a header, and the location has no Apache
        # authentication: still no token for anyone
        self.assert_error(self.a.request("/open-expr", user=None, headers={"X-User": "bob"}),
                          401, "unauthenticated")
        self.assertEqual(self.mock.calls(), 0)

    def test_overlong_user_id_is_refused_without_a_call(self):
        # "alice" + 1100 bytes
        self.assert_error(self.a.request("/pad", headers={"X-Pad": "x" * 1100}), 403, "invalid_user_id")
        self.assertEqual(self.mock.calls(), 0)
        # the limit is 1024 bytes: 1025 refused, 1024 accepted
        self.assert_error(self.a.request("/pad", headers={"X-Pad": "x" * 1020}), 403, "invalid_user_id")
        self.assertEqual(self.mock.calls(), 0)
        st, _, body, doc = self.a.request("/pad", headers={"X-Pad": "x" * 1019})
        self.assertEqual(st, 200, body)
        self.assertEqual(self.mock.stats()["user_ids"], ["alice" + "x" * 1019])

    def test_control_character_in_user_id_is_refused(self):
        self.assert_error(self.a.request("/pad", headers={"X-Pad": "a\tb"}), 403, "invalid_user_id")
        self.assertEqual(self.mock.calls(), 0)


class TenantIsolationTest(ClassApache):
    """Two API keys (vhosts, and Locations) for the same user: two tokens."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.port2 = free_port()
        body = auth_location("/other-tenant", "CardScanAPIKey " + OTHER_KEY)
        body += vhost(cls.port2, "CardScanAPIKey " + OTHER_KEY)
        cls.a = cls.start_apache(body=body, global_conf=server_conf(
            "CardScanAPIKey " + TEST_KEY, "CardScanEndpoint " + cls.mock.http_url))

    def setUp(self):
        self.mock.reset()

    def _isolated(self, user, first, second):
        """first/second: request kwargs of the two tenants."""
        t1 = self.a.request(user=user, **first)[3]
        t2 = self.a.request(user=user, **second)[3]
        self.assertEqual(jwt_payload(t1["Token"])["sub"], user)
        self.assertEqual(jwt_payload(t2["Token"])["sub"], user)
        self.assertNotEqual(t1["Token"], t2["Token"])
        reqs = self.mock.stats()["requests"]
        self.assertEqual([r["headers"].get("authorization") for r in reqs],
                         ["Bearer " + TEST_KEY, "Bearer " + OTHER_KEY])
        # each tenant's second request gets its own cached token
        self.assertEqual(self.a.request(user=user, **second)[3]["Token"], t2["Token"])
        self.assertEqual(self.a.request(user=user, **first)[3]["Token"], t1["Token"])
        self.assertEqual(self.mock.calls(), 2)

    def test_vhosts_with_different_keys(self):
        self._isolated("alice", {}, {"port": self.port2})

    def test_locations_with_different_keys(self):
        # bob: the vhost test's cache entries are alice's
        self._isolated("bob", {}, {"path": "/other-tenant"})


# ------------------------------------------------------------ secrets in logs

class SecretsInLogsTest(ClassApache):
    """LogLevel trace8 everywhere: the key (literal, file: or env:) never
    appears in the error log, the console, a reply body or header; the masked
    form names it where it must; no token reaches the log; libcurl's verbose
    trace ran (with Authorization masked)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.closed_port = free_port()

    def _run(self, key_spec, env=None):
        mock, sd = self.mock, session_dir()
        mock.reset()
        p_badca = free_port()
        body = METRICS_LOCATION
        body += auth_location("/https", "CardScanEndpoint " + mock.https_url)
        body += auth_location("/refused", "CardScanEndpoint http://127.0.0.1:%d/v1" % self.closed_port)
        body += vhost(p_badca, "CardScanEndpoint " + mock.https_url,
                      'CardScanCAFile "%s/other-ca.pem"' % sd)
        conf = server_conf("CardScanAPIKey " + key_spec, "CardScanEndpoint " + mock.http_url,
                           'CardScanCAFile "%s/ca.pem"' % sd, "CardScanTimeout 1",
                           "CardScanCircuitBreaker 0", CASE_USER_ID)
        a = Apache(start=False, body=body, global_conf=conf, loglevel="trace8 cardscan:trace8",
                   access_log=True)
        replies = []
        try:
            a.start(env=env)

            def get(case, path="/cardscan-session", **kw):
                h = dict(kw.pop("headers", {}))
                h["X-Case"] = case
                r = a.request(path, headers=h, **kw)
                replies.append(r)
                return r

            self.assertEqual(get("ok")[0], 200)                  # fetched
            self.assertEqual(get("ok")[0], 200)                  # cache hit
            self.assertEqual(get("ok-https", "/https")[0], 200)  # over TLS
            self.assertEqual(get("ok", method="HEAD")[0], 200)
            for fault in ("401", "403", "429", "500", "502", "notjson", "truncated", "oversized",
                          "notoken", "notjwt", "badpayload", "nonstring", "expired", "redirect",
                          "reset", "close", "noexp"):
                mock.config(fault=fault)
                st = get("f-" + fault)[0]
                self.assertEqual(st, 200 if fault == "noexp" else 503 if fault == "429" else 502, fault)
            mock.config(fault="401")
            self.assertEqual(get("f-401-https", "/https")[0], 502)
            mock.config(fault="none", latency_ms="1500")
            self.assertEqual(get("timeout")[0], 504)
            mock.config(latency_ms="0")
            self.assertEqual(get("refused", "/refused")[0], 502)
            self.assertEqual(get("badca", port=p_badca)[0], 502)
            self.assertEqual(get("put", method="PUT")[0], 405)
            self.assertEqual(get("nouser", user=None)[0], 401)
            self.assertEqual(get("badpw", password="wrong")[0], 401)
            self.assertEqual(get("metrics", "/metrics", user=None)[0], 200)
            self.assertEqual(get("ok-end")[0], 200)
        finally:
            try:
                if a.proc and a.proc.poll() is None:
                    a.halt()
                console = a.proc.stdout.read().decode(errors="replace") if a.proc else ""
                log = a.log()
            finally:
                a.stop()
        return replies, log, console

    def _check(self, replies, log, console):
        # (plain asserts on purpose: the trace8 log is megabytes long)
        self.assertTrue(log, "empty error log")
        # the trace path ran: libcurl's verbose lines, with the header masked
        self.assertTrue("libcurl: > Authorization: <masked>" in log, "no masked libcurl Authorization line")
        self.assertTrue(re.search(r"libcurl: \* .*(TLSv1\.[23]|SSL connection)", log), "no libcurl TLS trace")
        self.assertTrue(re.search(r"\[[a-z_]+:trace8\]", log), "LogLevel trace8 did not apply")
        for where, text in (("error log", log), ("console", console)):
            self.assertFalse(TEST_KEY in text, "the API key in the " + where)
            self.assertFalse(SECRET_PART in text, "part of the API key in the " + where)
        # the masked form names the key where it must (the upstream rejected it)
        self.assertTrue([ln for ln in log.splitlines()
                         if "rejected the API key" in ln and MASKED_IN_LOG.search(ln) and ":error]" in ln],
                        "no error line naming the masked key")
        tokens = []
        for st, hdrs, body, doc in replies:
            text = body.decode(errors="replace")
            self.assertNotIn(TEST_KEY, text)
            self.assertNotIn(SECRET_PART, text)
            self.assertNotIn(SECRET_PART, repr(hdrs))
            if st == 200 and doc and "Token" in doc:
                tokens.append(doc["Token"])
        self.assertGreaterEqual(len(tokens), 4)
        for t in tokens:
            self.assertFalse(t in log, "a token in the error log")
            for part in t.split(".")[1:]:  # payload and signature (the header is the same for all)
                self.assertFalse(part in log, "part of a token in the error log")
        m = JWT_RE.search(log)
        self.assertIsNone(m, "a JWT in the error log: %s" % (m and log[max(0, m.start() - 300):m.end()]))

    def test_literal_key(self):
        self._check(*self._run(TEST_KEY))

    def test_key_from_file(self):
        fd, path = tempfile.mkstemp(prefix="cs-key-", dir=session_dir())
        try:
            os.write(fd, (TEST_KEY + "\n").encode())
            os.close(fd)
            os.chmod(path, 0o600)
            replies, log, console = self._run("file:" + path)
            self._check(replies, log, console)
            self.assertNotIn("readable by every user", log)
        finally:
            os.unlink(path)

    def test_key_from_environment(self):
        self._check(*self._run("env:CS_TEST_CARDSCAN_KEY", env={"CS_TEST_CARDSCAN_KEY": TEST_KEY}))


class KeyFilePermissionsTest(ClassApache):
    def _start_with_key_file(self, mode):
        fd, path = tempfile.mkstemp(prefix="cs-key-", dir=session_dir())
        os.write(fd, (TEST_KEY + "\n").encode())
        os.close(fd)
        os.chmod(path, mode)
        self.addCleanup(os.unlink, path)
        a = self.start_apache(global_conf=server_conf("CardScanAPIKey file:" + path,
                                                      "CardScanEndpoint " + self.mock.http_url))
        st, _, body, _ = a.request()
        self.assertEqual(st, 200, body)
        return a, path

    def test_world_readable_key_file_warns_at_startup(self):
        a, path = self._start_with_key_file(0o644)
        lines = [ln for ln in a.log().splitlines() if path in ln]
        self.assertTrue(lines, "no start-up line names %s:\n%s" % (path, a.log()))
        self.assertTrue(any(":warn]" in ln and "readable by every user" in ln for ln in lines), lines)
        self.assertNotIn(TEST_KEY, a.log())

    def test_private_key_file_does_not_warn(self):
        a, path = self._start_with_key_file(0o600)
        self.assertNotIn(path, a.log())
        self.assertNotIn("readable by every user", a.log())


# ----------------------------------------------------------------- transport

# An OpenSSL configuration that lets the system accept TLS 1.0 and 1.1
# (Debian's OpenSSL refuses them on its own): given to the test server and to
# apache2 (so to libcurl), only the module's own minimum refuses them then.
LEGACY_TLS_CNF = """openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1
CipherString = DEFAULT:@SECLEVEL=0
"""


def legacy_tls_env():
    path = os.path.join(session_dir(), "legacy-tls.cnf")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(LEGACY_TLS_CNF)
        os.chmod(path, 0o644)
    return {"OPENSSL_CONF": path}


def _s_server(version_flag, port):
    sd = session_dir()
    return subprocess.Popen(
        ["openssl", "s_server", version_flag, "-cipher", "DEFAULT:@SECLEVEL=0",
         "-cert", os.path.join(sd, "server.pem"), "-key", os.path.join(sd, "server.key"),
         "-accept", "127.0.0.1:%d" % port, "-www", "-quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, **legacy_tls_env()))


def _curl_version(port, flags):
    """The TLS version curl (libcurl, as the module uses it) negotiates with
    the server under the legacy configuration, or None."""
    r = subprocess.run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}"] + flags +
                       ["https://127.0.0.1:%d/" % port], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=20, env=dict(os.environ, **legacy_tls_env()))
    return r.returncode == 0 and r.stdout == b"200"


class TransportTest(ClassApache):
    def test_tls_below_1_2_is_refused(self):
        servers = {v: (free_port(), None) for v in ("-tls1", "-tls1_1", "-tls1_2")}
        servers = {v: (p, _s_server(v, p)) for v, (p, _) in servers.items()}
        try:
            harness.wait_for(lambda: all(port_open(p) for p, _ in servers.values()), 10, "openssl s_server")
            # the system (OpenSSL and libcurl under this configuration) accepts
            # TLS 1.0 and 1.1: what refuses them below is the module
            for v, flags in (("-tls1", ["--tlsv1.0", "--tls-max", "1.0"]), ("-tls1_1", ["--tlsv1.1", "--tls-max", "1.1"])):
                self.assertTrue(_curl_version(servers[v][0], flags), "the test's OpenSSL configuration "
                                "does not let curl speak %s: the test would not test the module" % v)
            sd = session_dir()
            ports = {v: free_port() for v in servers}
            body = "".join(vhost(ports[v], "CardScanEndpoint https://127.0.0.1:%d/v1" % servers[v][0])
                           for v in servers)
            a = self.start_apache(body=body, env=legacy_tls_env(), global_conf=server_conf(
                "CardScanAPIKey " + TEST_KEY, 'CardScanCAFile "%s/ca.pem"' % sd, "CardScanTimeout 3"))
            for v in ("-tls1", "-tls1_1"):
                with self.subTest(v):
                    mark = len(a.log())
                    self.assert_error(a.request(port=ports[v]), 502, "upstream_error")
                    log = a.log()[mark:]
                    self.assertRegex(log, r"(?i)\[cardscan:error\].*(ssl|tls)", "no log line about TLS:\n" + log)
                    self.assertNotIn("not a JSON object", log, "the module spoke %s with the server" % v)
            # control: the same server at TLS 1.2 gets past the handshake (and
            # then fails on its HTML status page, not on TLS)
            mark = len(a.log())
            self.assert_error(a.request(port=ports["-tls1_2"]), 502, "upstream_error")
            self.assertIn("not a JSON object", a.log()[mark:])
        finally:
            for _, p in servers.values():
                stop_pid(p, signal.SIGTERM, 10)

    def test_plain_http_to_localhost_by_name(self):
        a = self.start_apache(global_conf=server_conf(
            "CardScanAPIKey " + TEST_KEY, "CardScanEndpoint http://localhost:%d/v1" % self.mock.http_port))
        self.mock.reset()
        st, _, body, doc = a.request()
        self.assertEqual(st, 200, body)
        self.assertEqual(jwt_payload(doc["Token"])["sub"], "alice")
        self.assertEqual(self.mock.calls(), 1)
        self.assertEqual(self.mock.stats()["requests"][0]["tls"], False)


if __name__ == "__main__":
    unittest.main()
