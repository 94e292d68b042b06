"""Hardening against a real apache2: the key in HTTP/2 traces, tokens issued
earlier, Retry-After's range, start-up checks, subrequests, user ids in the
info log, env: keys in children's environments."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import (LIVE_KEY, TEST_KEY, Apache, MockTestCase, apache_conf, auth_location,  # noqa: E402
                     free_port, jwt_payload, rfc3339_utc, session_dir, stop_pid, wait_for)

SANDBOX = "https://sandbox.cardscan.ai/v1"
SECRET_PART = TEST_KEY[len("sk_test_cardscan_ai_"):]
NODE = shutil.which("node") or shutil.which("nodejs")

# An HTTPS upstream that offers HTTP/2 (ALPN h2, then http/1.1), as the real
# API's front end can: node's http2 module. It records each request's
# protocol and whether the key arrived, never the key itself.
H2_SERVER = r"""
const http2 = require("http2"), fs = require("fs");
const [cert, key, portFile, logFile, apiKey] = process.argv.slice(2);
function b64(o) { return Buffer.from(JSON.stringify(o)).toString("base64url"); }
const server = http2.createSecureServer(
    {cert: fs.readFileSync(cert), key: fs.readFileSync(key), allowHTTP1: true},
    (req, res) => {
        const now = Math.floor(Date.now() / 1000);
        const user = new URL(req.url, "https://x").searchParams.get("user_id") || "anonymous";
        fs.appendFileSync(logFile, JSON.stringify({version: req.httpVersion,
            auth_ok: req.headers["authorization"] === "Bearer " + apiKey}) + "\n");
        const token = b64({alg: "RS256", typ: "JWT"}) + "." +
            b64({sub: user, iat: now, exp: now + 900}) + ".c2ln";
        res.writeHead(200, {"content-type": "application/json"});
        res.end(JSON.stringify({Token: token, IdentityId: "us-east-1:h2", session_id: "s"}));
    });
server.listen(0, "127.0.0.1", () => {
    fs.writeFileSync(portFile + ".tmp", String(server.address().port));
    fs.renameSync(portFile + ".tmp", portFile);
});
process.on("SIGTERM", () => process.exit(0));
"""


class H2Upstream:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="cs-h2-")
        sd = session_dir()
        script = os.path.join(self.dir, "h2.js")
        with open(script, "w") as f:
            f.write(H2_SERVER)
        port_file = os.path.join(self.dir, "port")
        self.requests_log = os.path.join(self.dir, "requests")
        self.out = open(os.path.join(self.dir, "out"), "w")
        self.proc = subprocess.Popen([NODE, script, os.path.join(sd, "server.pem"), os.path.join(sd, "server.key"),
                                      port_file, self.requests_log, TEST_KEY],
                                     stdout=self.out, stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(port_file) or self.proc.poll() is not None, what="the h2 upstream")
        if self.proc.poll() is not None:
            raise RuntimeError("the h2 upstream exited")
        with open(port_file) as f:
            self.port = int(f.read())
        self.url = "https://127.0.0.1:%d/v1" % self.port

    def requests(self):
        import json
        try:
            with open(self.requests_log) as f:
                return [json.loads(line) for line in f if line.strip()]
        except OSError:
            return []

    def stop(self):
        stop_pid(self.proc)
        self.out.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class HardeningTest(MockTestCase):

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix="cs-hard-")
        os.chmod(self.tmp, 0o755)
        self.addCleanup(shutil.rmtree, self.tmp, True)

    # ------------------------------------------------- 1. key in h2 traces

    @unittest.skipUnless(NODE, "node (Debian: nodejs) is needed for the HTTP/2 upstream")
    def test_key_absent_from_trace8_log_with_an_h2_upstream(self):
        up = H2Upstream()
        self.addCleanup(up.stop)
        # the upstream does speak HTTP/2 when asked
        out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_version}", "--http2",
                              "--cacert", os.path.join(session_dir(), "ca.pem"),
                              up.url + "/access-token?user_id=probe"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        self.assertEqual(out.stdout.decode().strip(), "2", out.stdout)
        a = self.apache(global_conf=apache_conf(endpoint=up.url, extra='CardScanCAFile "%s/ca.pem"\n'
                                                % session_dir()),
                        loglevel="trace8 cardscan:trace8")
        for user in ("alice", "bob"):
            st, hdrs, body, doc = a.request(user=user)
            self.assertEqual(st, 200, body)
            self.assertEqual(jwt_payload(doc["Token"])["sub"], user)
        reqs = up.requests()[1:]  # after curl's probe
        self.assertEqual(len(reqs), 2, reqs)
        self.assertTrue(all(r["auth_ok"] for r in reqs), reqs)
        log = a.log()
        self.assertNotIn(TEST_KEY, log)
        self.assertNotIn(SECRET_PART, log)
        self.assertIn("libcurl: > Authorization: <masked>", log)
        # HTTP/1.1 to the API (docs/operations.md says why)
        self.assertEqual({r["version"] for r in reqs}, {"1.1"}, reqs)

    # ------------------------------------------- 2. a token issued earlier

    def test_token_issued_earlier_is_not_served_past_its_exp(self):
        # iat 3000 s ago, exp in 900 s
        self.mock.config(lifetime=3900, clock_skew=-3000)
        a = self.apache()
        t0 = time.time()
        st, _, body, doc = a.request(user="alice")
        self.assertEqual(st, 200, body)
        claims = jwt_payload(doc["Token"])
        self.assertLess(claims["iat"], t0 - 2900)
        expires = rfc3339_utc(doc["expires_at"])
        self.assertLessEqual(expires, claims["exp"])
        self.assertGreater(expires, t0 + 800)
        # the cached copy says the same
        st, _, _, doc2 = a.request(user="alice")
        self.assertEqual(doc2["Token"], doc["Token"])
        self.assertEqual(doc2["expires_at"], doc["expires_at"])
        self.assertEqual(self.mock.calls(), 1)

    # ------------------------------------------------- 6. Retry-After range

    def test_retry_after_is_clamped_to_an_hour(self):
        a = self.apache(global_conf=apache_conf(endpoint=self.mock.http_url, extra="CardScanCircuitBreaker 0\n"))
        for given, sent, user in (("999999", "3600", "alice"), ("12", "12", "bob")):
            self.mock.config(fault="429", retry_after=given)
            st, hdrs, body, doc = a.request(user=user)
            self.assertEqual(st, 503, body)
            self.assertEqual(doc["error"], "upstream_rate_limited")
            self.assertEqual(hdrs.get("retry-after"), sent)

    # ------------------------------------------------- 7. start-up checks

    def assert_refused(self, global_conf, body="", expect=()):
        a = Apache(global_conf=global_conf, body=body, start=False)
        self.servers.append(a)
        out = a.configtest()
        text = out.stdout.decode("utf-8", "replace")
        self.assertNotEqual(out.returncode, 0, text)
        for e in expect:
            self.assertIn(e, text)
        self.assertNotIn(LIVE_KEY, text)
        self.assertNotIn(TEST_KEY, text)
        with self.assertRaises(RuntimeError):
            a.start()
        return text

    def test_loopback_endpoint_is_a_parsed_address(self):
        for host in ("127.0.0.256", "127.1.2.3.4", "127.", "127.0.0.1.nip.io", "localhost.example"):
            with self.subTest(host=host):
                self.assert_refused(apache_conf(endpoint="http://%s:9/v1" % host),
                                    expect=("CardScanEndpoint", "loopback"))
        a = Apache(global_conf=apache_conf(endpoint="http://127.3.4.5:9/v1"), start=False)
        self.servers.append(a)
        self.assertEqual(a.configtest().returncode, 0)

    def test_timeout_under_a_millisecond_is_refused(self):
        for args in ("0.0005", "5 0.0009", "0.000001"):
            with self.subTest(args=args):
                self.assert_refused(apache_conf(endpoint=self.mock.http_url, extra="CardScanTimeout %s\n" % args),
                                    expect=("CardScanTimeout", "1 ms"))

    def test_proxy_url_without_a_host_is_refused(self):
        for url in ("http://", "https://", "socks5h://", "http://:8080"):
            with self.subTest(url=url):
                self.assert_refused(apache_conf(endpoint=self.mock.http_url, extra="CardScanProxy %s\n" % url),
                                    expect=("CardScanProxy",))

    def test_loopback_endpoint_bypasses_the_proxy(self):
        dead = "http://127.0.0.1:%d" % free_port()
        a = self.apache(global_conf=apache_conf(endpoint=self.mock.http_url,
                                                extra="CardScanProxy %s\nCardScanCircuitBreaker 0\n" % dead),
                        loglevel="cardscan:trace4")
        st, _, body, doc = a.request(user="alice")
        self.assertEqual(st, 200, body)
        self.assertEqual(self.mock.calls(), 1)
        self.assertNotIn("Proxy-Authorization", a.log())

    def test_live_key_against_sandbox_in_files_if_and_nested_sections(self):
        d = self.tmp
        cases = {
            "Files": '<Files "x.php">\n    CardScanAPIKey %s\n</Files>' % LIVE_KEY,
            "If": '<If "%%{REQUEST_URI} =~ m#^/live#">\n    CardScanAPIKey %s\n</If>' % LIVE_KEY,
            "If in Location": '<Location "/x">\n  <If "true">\n    CardScanAPIKey %s\n  </If>\n</Location>'
                              % LIVE_KEY,
            "Files in Directory": '<Directory "%s">\n  <Files "y">\n    CardScanAPIKey %s\n  </Files>\n'
                                  '</Directory>' % (d, LIVE_KEY),
            "If in Files in Directory": '<Directory "%s">\n  <Files "y">\n    <If "true">\n'
                                        '      CardScanAPIKey %s\n    </If>\n  </Files>\n</Directory>' % (d, LIVE_KEY),
            "If in If": '<If "true">\n  <If "true">\n    CardScanAPIKey %s\n  </If>\n</If>' % LIVE_KEY,
            "Files in VirtualHost": '<VirtualHost 127.0.0.1:8>\n  ServerName v.example\n  <Files "z">\n'
                                    '    CardScanAPIKey %s\n  </Files>\n</VirtualHost>' % LIVE_KEY,
            # the endpoint in the nested section, the key above it
            "endpoint in If": '<Location "/y">\n  CardScanAPIKey %s\n  <If "true">\n'
                              '    CardScanEndpoint %s\n  </If>\n</Location>' % (LIVE_KEY, SANDBOX),
        }
        for name, body in cases.items():
            with self.subTest(name):
                conf = apache_conf(endpoint=SANDBOX) if name != "endpoint in If" else \
                    apache_conf(endpoint=self.mock.http_url)
                text = self.assert_refused(conf, body=body, expect=("live key", "sandbox"))
                if name == "If in Files in Directory":  # the message says where
                    self.assertRegex(text, r"section <Directory [^>]+> <Files y> <If> at \S+httpd\.conf:\d+")

    # ---------------------------------------- 8. subrequests and nosniff

    def test_ssi_include_gets_no_token(self):
        docs = os.path.join(self.tmp, "ssi")
        os.mkdir(docs)
        os.chmod(docs, 0o755)
        with open(os.path.join(docs, "page.shtml"), "w") as f:
            f.write('<html><body>before<!--#include virtual="/cardscan-session" -->after</body></html>\n')
        os.chmod(os.path.join(docs, "page.shtml"), 0o644)
        body = """Alias "/ssi" "%s"
<Directory "%s">
    Require all granted
    Options +Includes
    AddOutputFilter INCLUDES .shtml
</Directory>
""" % (docs, docs)
        a = self.apache(body=body, modules=("include", "alias"), loglevel="cardscan:info")
        st, _, data, _ = a.request("/ssi/page.shtml", user="alice")
        text = data.decode(errors="replace")
        self.assertEqual(st, 200, text)
        self.assertIn("before", text)
        self.assertIn("after", text)
        self.assertNotIn("Token", text)
        self.assertNotIn("eyJ", text)
        self.assertEqual(self.mock.calls(), 0)
        self.assertIn("refusing a subrequest", a.log())
        # the endpoint itself still answers
        st, _, _, doc = a.request(user="alice")
        self.assertEqual(st, 200)
        self.assertEqual(self.mock.calls(), 1)

    def test_every_reply_is_nosniff(self):
        body = auth_location("/empty", 'CardScanUserID "%{reqenv:CS_NO_SUCH_VAR}"')
        body += '<Location "/open">\n    SetHandler cardscan-session\n</Location>\n'
        a = self.apache(body=body, global_conf=apache_conf(endpoint=self.mock.http_url,
                                                           extra="CardScanCircuitBreaker 0\n"))
        replies = [a.request(user="alice"), a.request(user="alice", method="HEAD"),
                   a.request(user="alice", method="DELETE"), a.request("/open", user=None),
                   a.request("/empty", user="alice")]
        self.mock.config(fault="500")
        replies.append(a.request(user="bob"))
        self.assertEqual([r[0] for r in replies], [200, 200, 405, 401, 403, 502])
        for st, hdrs, _, _ in replies:
            self.assertEqual(hdrs.get("x-content-type-options"), "nosniff", (st, hdrs))

    # ----------------------------------------- 9. user ids in the info log

    def test_no_user_id_in_the_info_log(self):
        """Every refusal and error path at LogLevel info: the log names no
        user (user ids are personal data; trace4 and above only)."""
        users = ("alice", "bob", "carol", "\u00fc@h.example")
        body = auth_location("/empty", 'CardScanUserID "%{reqenv:CS_NO_SUCH_VAR}"')
        body += auth_location("/padded", 'CardScanUserID "%{REMOTE_USER}%{HTTP:X-Pad}"')
        body += '<Location "/open">\n    SetHandler cardscan-session\n</Location>\n'
        body += auth_location("/refused", "CardScanEndpoint http://127.0.0.1:%d/v1" % free_port())
        # no cache: every request reaches the path it is meant for
        conf = apache_conf(endpoint=self.mock.http_url,
                           extra="CardScanTimeout 1\nCardScanCircuitBreaker 2 30\nCardScanCache none\n")
        a = self.apache(body=body, global_conf=conf, loglevel="info")
        n = [0]

        def get(path="/cardscan-session", **kw):
            kw.setdefault("user", users[n[0] % len(users)])
            n[0] += 1
            return a.request(path, **kw)[0]

        self.assertEqual(get(), 200)                              # fetched
        self.assertEqual(get(method="DELETE"), 405)
        self.assertEqual(get("/open", user=None), 401)
        self.assertEqual(get("/empty", user="carol"), 403)
        self.assertEqual(get("/padded", user="bob", headers={"X-Pad": "p" * 2000}), 403)
        self.assertEqual(get("/refused"), 502)                    # connect failure, retried
        for fault in ("401", "403", "429", "notjwt", "notjson", "expired", "redirect",
                      "oversized", "html"):
            self.mock.config(fault=fault, fault_count=1)
            self.assertIn(get(), (502, 503), fault)
        self.mock.config(fault="none", latency_ms=2000)
        self.assertEqual(get(user="bob"), 504)                    # timeout
        self.mock.config(latency_ms=0, fault="500")
        self.assertEqual(get(user="carol"), 502)                  # opens the breaker
        for user in users:                                        # breaker open
            self.assertIn(get(user=user), (502, 503))
        log = a.log()
        self.assertIn(":info]", log)
        self.assertIn("AH10530", log)                             # the empty-id path ran
        for name in ("alice", "bob", "carol", "h.example", "\\xc3\\xbc", "\u00fc"):
            self.assertNotIn(name, log, "a user id in the info log")

    # ------------------------------------------- 12. env: keys are removed

    def test_env_key_is_not_inherited_by_piped_loggers(self):
        dump = os.path.join(self.tmp, "logger-env")
        var = "CS_IT_HARDENING_KEY"
        conf = apache_conf(key="env:" + var, endpoint=self.mock.http_url)
        conf += "CustomLog \"|/bin/sh -c 'env > %s.tmp; mv %s.tmp %s; exec cat > /dev/null'\" common\n" % (
            dump, dump, dump)
        a = self.apache(global_conf=conf, start=False)
        a.start(env={var: TEST_KEY})
        st, _, body, _ = a.request(user="alice")
        self.assertEqual(st, 200, body)
        wait_for(lambda: os.path.exists(dump), 15, "the piped logger's environment")
        with open(dump) as f:
            env = f.read()
        self.assertIn("PATH=", env)
        self.assertNotIn(var, env)
        self.assertNotIn(SECRET_PART, env)
        # a graceful restart reads the configuration again: the key is kept
        generation = a.log().count("resuming normal operations")
        a.graceful()
        wait_for(lambda: a.log().count("resuming normal operations") > generation, 30, "the graceful restart")
        st, _, body, _ = a.request(user="bob")
        self.assertEqual(st, 200, body)
        self.assertNotIn("not set", a.log())


if __name__ == "__main__":
    unittest.main()
