"""Chaos soak of a fleet (bench/soak, two minutes), and a live check of the
alerting rules through a real Prometheus."""

import http.client
import importlib.machinery
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse

from harness import SRCDIR, BUILDDIR, Apache, Mock, apache_conf, free_port, wait_for

REDIS = shutil.which("redis-server")
PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
SOAK_SEED = int(os.environ.get("CS_SOAK_SEED", "7"))
SOAK_MINUTES = float(os.environ.get("CS_SOAK_MINUTES", "2"))
# Under the sanitizers (CS_HTTPD_PRELOAD) every apache2 process is several
# times larger and slower: half the users, so that prefork's children (one per
# keep-alive connection) fit in memory.
SOAK_USERS = int(os.environ.get("CS_SOAK_USERS", "150" if os.environ.get("CS_HTTPD_PRELOAD") else "300"))


def load_soak():
    path = os.path.join(SRCDIR, "bench", "soak")
    loader = importlib.machinery.SourceFileLoader("cs_bench_soak", path)
    spec = importlib.util.spec_from_loader("cs_bench_soak", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


class Tee(io.TextIOBase):
    """The soak's lines go to the test's output and are kept for the failure message."""

    def __init__(self):
        self.lines = []

    def write(self, s):
        sys.stdout.write(s)
        self.lines.append(s)
        return len(s)


@unittest.skipUnless(REDIS, "needs redis-server (apt-get install redis-server)")
class SoakTests(unittest.TestCase):
    def test_two_minute_chaos_soak(self):
        """300 users on event + prefork sharing Redis, every fault of
        bench/soak at least once (seed CS_SOAK_SEED): no invariant breached."""
        soak = load_soak()
        out = Tee()
        start = time.monotonic()
        res = soak.run_soak(minutes=SOAK_MINUTES, seed=SOAK_SEED, users=SOAK_USERS, builddir=BUILDDIR, out=out)
        print("soak took %.0f s" % (time.monotonic() - start))
        self.assertGreater(res["requests"], 10 * SOAK_USERS)
        self.assertTrue(all(res["faults"].get(k) for k in (
            "api5xx", "api429", "latency", "reset", "redis_stop", "redis_restart", "graceful",
            "hard_restart", "kill9", "key_rotation", "identity", "burst")), res["faults"])
        self.assertTrue(res["ok"], "breaches:\n" + "\n".join("%s: %s" % b for b in res["breach_list"][:30]))


@unittest.skipUnless(PROMETHEUS, "needs prometheus (apt-get install prometheus)")
class PrometheusAlertTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="cs-prom-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.mock = Mock(tls=False)
        self.addCleanup(self.mock.stop)
        metrics = '<Location "/cardscan-metrics">\n    SetHandler cardscan-metrics\n</Location>\n'
        conf = apache_conf(endpoint=self.mock.http_url, extra="CardScanCircuitBreaker 5 10\nCardScanTimeout 2 1\n")
        self.servers = [Apache(mpm=m, body=metrics, global_conf=conf, servers=2) for m in ("event", "prefork")]
        for a in self.servers:
            self.addCleanup(a.stop)

    def start_prometheus(self):
        # the rules operators install (docs/operations.md), as shipped
        rules = os.path.join(SRCDIR, "conf", "prometheus", "cardscan-alerts.yml")
        self.rules = rules
        cfg = os.path.join(self.dir, "prometheus.yml")
        targets = ", ".join('"127.0.0.1:%d"' % a.port for a in self.servers)
        with open(cfg, "w") as f:
            f.write("""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - "%s"
scrape_configs:
  - job_name: cardscan
    metrics_path: /cardscan-metrics
    static_configs:
      - targets: [%s]
""" % (rules, targets))
        self.prom_port = free_port()
        self.prom_log = open(os.path.join(self.dir, "prometheus.log"), "w")
        self.prom = subprocess.Popen([PROMETHEUS, "--config.file", cfg, "--storage.tsdb.path",
                                      os.path.join(self.dir, "data"),
                                      "--web.listen-address=127.0.0.1:%d" % self.prom_port],
                                     stdout=self.prom_log, stderr=subprocess.STDOUT)

        def stop():
            self.prom.terminate()
            try:
                self.prom.wait(20)
            except subprocess.TimeoutExpired:
                self.prom.kill()
                self.prom.wait(5)
            self.prom_log.close()
        self.addCleanup(stop)
        wait_for(lambda: self.api("/-/ready", raw=True) == 200, 30, "prometheus to be ready")

    def api(self, path, raw=False):
        c = http.client.HTTPConnection("127.0.0.1", self.prom_port, timeout=5)
        try:
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
            return r.status if raw else json.loads(body.decode())
        except (OSError, ValueError, http.client.HTTPException):
            return None
        finally:
            c.close()

    def firing(self, name):
        doc = self.api("/api/v1/alerts") or {}
        return [a for a in doc.get("data", {}).get("alerts", [])
                if a["labels"].get("alertname") == name and a["state"] == "firing"]

    def rule_text(self, name):
        """The named alert's block in the rules file ("" if none)."""
        with open(self.rules) as f:
            m = re.search(r"alert:\s*%s\b(.*?)(?=\n\s*-\s*alert:|\Z)" % name, f.read(), re.S)
        return m.group(1) if m else ""

    def rule_for_seconds(self, name):
        """The `for:` of the named alert, in seconds (0 if none)."""
        f = re.search(r"\bfor:\s*(\d+)([smh])", self.rule_text(name))
        return int(f.group(1)) * UNIT_SECONDS[f.group(2)] if f else 0

    def rule_window_seconds(self, name):
        """The longest range ([3m]) in the named alert's expression, in seconds."""
        ranges = re.findall(r"\[(\d+)([smh])\]", self.rule_text(name))
        return max([int(n) * UNIT_SECONDS[u] for n, u in ranges] or [0])

    def test_breaker_open_alert_fires_during_an_outage_and_clears_after(self):
        self.start_prometheus()
        pending = self.rule_for_seconds("CardScanBreakerOpen")
        # an opening stays in the expression for its range after the last one
        window = self.rule_window_seconds("CardScanBreakerOpen")
        # both targets up and scraped
        wait_for(lambda: len([r for r in (self.api("/api/v1/query?query=" + urllib.parse.quote("up == 1")) or {})
                              .get("data", {}).get("result", [])]) == 2, 30, "both servers scraped")
        self.assertEqual(self.firing("CardScanBreakerOpen"), [])
        self.mock.config(fault="503")   # every API call fails
        users = ("alice", "bob", "carol")
        fired_at = None
        deadline = time.monotonic() + 40 + pending
        i = 0
        while time.monotonic() < deadline and fired_at is None:
            for a in self.servers:
                a.request(user=users[i % 3])
            i += 1
            if i % 5 == 0 and self.firing("CardScanBreakerOpen"):
                fired_at = time.monotonic()
            time.sleep(0.1)
        self.assertIsNotNone(fired_at, "CardScanBreakerOpen did not fire within %d s of the outage (rules: %s)"
                             % (40 + pending, self.rules))
        instances = {a["labels"].get("instance") for a in self.firing("CardScanBreakerOpen")}
        self.assertTrue(instances, instances)
        # the outage ends: the breaker's period passes, a probe succeeds, the gauge drops, the alert clears
        self.mock.config(fault="none")

        def cleared():
            for a in self.servers:
                a.request(user="alice")
            return not self.firing("CardScanBreakerOpen")
        wait_for(cleared, window + 60, "CardScanBreakerOpen to clear after the outage")
        for a in self.servers:
            self.assertEqual(a.request(user="bob")[0], 200)


if __name__ == "__main__":
    unittest.main()
