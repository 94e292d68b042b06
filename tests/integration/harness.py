"""Integration harness for mod_cardscan: a real apache2 with the module, the
bundled CardScan mock, loopback only. Every process started here is stopped
by its PID; every wait is bounded."""

import atexit
import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse

SRCDIR = os.environ.get("CS_SRCDIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BUILDDIR = os.environ.get("CS_BUILDDIR", SRCDIR)
MODULE = os.environ.get("CS_MODULE", os.path.join(BUILDDIR, ".libs", "mod_cardscan.so"))
MOCK = os.environ.get("CS_MOCK", os.path.join(BUILDDIR, "tests", "cardscan-mock"))
HTTPD = os.environ.get("CS_HTTPD", shutil.which("apache2") or "/usr/sbin/apache2")
MODDIR = os.environ.get("CS_MODDIR", "/usr/lib/apache2/modules")

TEST_KEY = "sk_test_cardscan_ai_mockkey0123456789abcd"
LIVE_KEY = "sk_live_cardscan_ai_mockkey0123456789abcd"
OTHER_KEY = "sk_test_cardscan_ai_otherkey9876543210zz"  # a second tenant
USERS = {"alice": "alice-pw", "bob": "bob-pw", "a&user_id=b": "pw1", "x y": "pw2",
         "\u00fc@h.example": "pw3", "carol": "carol-pw"}

_session_dir = None


def session_dir():
    """One directory for the whole run: certificates and the htpasswd file."""
    global _session_dir
    if _session_dir is None:
        _session_dir = tempfile.mkdtemp(prefix="cs-it-")
        atexit.register(shutil.rmtree, _session_dir, True)
        os.chmod(_session_dir, 0o755)
        _make_certs(_session_dir)
        _make_htpasswd(_session_dir)
    return _session_dir


def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, **kw)


def _make_certs(d):
    def p(name):
        return os.path.join(d, name)
    _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
          "-subj", "/CN=mod_cardscan test CA", "-keyout", p("ca.key"), "-out", p("ca.pem")])
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"), ("wronghost", "DNS:wrong.example")):
        _run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=" + name,
              "-keyout", p(name + ".key"), "-out", p(name + ".csr")])
        ext = p(name + ".ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=%s\n" % san)
        _run(["openssl", "x509", "-req", "-in", p(name + ".csr"), "-CA", p("ca.pem"), "-CAkey", p("ca.key"),
              "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", p(name + ".pem")])
    # a CA that signed nothing here: the "unknown CA" case
    _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
          "-subj", "/CN=other CA", "-keyout", p("other-ca.key"), "-out", p("other-ca.pem")])
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o644)


def _make_htpasswd(d):
    path = os.path.join(d, "htpasswd")
    with open(path, "w", encoding="utf-8") as f:
        for user, pw in USERS.items():
            out = _run(["openssl", "passwd", "-apr1", pw]).stdout.decode().strip()
            f.write("%s:%s\n" % (user, out))
    os.chmod(path, 0o644)


def httpd_env(extra=None):
    """apache2's environment: ours, plus CS_HTTPD_PRELOAD as LD_PRELOAD (the
    sanitizer build preloads libasan into apache2 only), plus extra."""
    env = dict(os.environ)
    if os.environ.get("CS_HTTPD_PRELOAD"):
        env["LD_PRELOAD"] = os.environ["CS_HTTPD_PRELOAD"]
    env.update(extra or {})
    return env


def port_open(port, host="127.0.0.1"):
    """Whether something accepts connections on host:port."""
    try:
        socket.create_connection((host, port), 0.2).close()
        return True
    except OSError:
        return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=15.0, what="condition"):
    """Polls predicate until it returns something true (returned) or the
    timeout passes (AssertionError naming what)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))


def wait_until(moment, what="a moment"):
    """Waits until time.monotonic() reaches moment (a deadline the behaviour
    under test is defined by, such as a TTL: not a guess at how long
    something takes; for that, use wait_for on a condition)."""
    wait_for(lambda: time.monotonic() >= moment, max(0.0, moment - time.monotonic()) + 5, what)


def stop_pid(proc_or_pid, sig=signal.SIGTERM, timeout=15.0):
    pid = proc_or_pid.pid if hasattr(proc_or_pid, "pid") else proc_or_pid
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    if hasattr(proc_or_pid, "wait"):
        try:
            proc_or_pid.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            proc_or_pid.wait(5)


class Mock:
    """The bundled CardScan API mock, HTTP and HTTPS on 127.0.0.1."""

    def __init__(self, tls=True, lifetime=900, api_keys=(TEST_KEY, LIVE_KEY, OTHER_KEY), cert="server"):
        self.dir = tempfile.mkdtemp(prefix="cs-mock-")
        sd = session_dir()
        portfile = os.path.join(self.dir, "ports")
        cmd = [MOCK, "--port-file", portfile, "--lifetime", str(lifetime)]
        for k in api_keys:
            cmd += ["--api-key", k]
        if tls:
            cmd += ["--https-port", "0", "--cert", os.path.join(sd, cert + ".pem"),
                    "--key", os.path.join(sd, cert + ".key")]
        self.log = open(os.path.join(self.dir, "mock.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        _live_mocks.append(self)
        wait_for(lambda: os.path.exists(portfile) or self.proc.poll() is not None, what="mock ports")
        if self.proc.poll() is not None:
            raise RuntimeError("the mock exited: see " + self.log.name)
        with open(portfile) as f:
            ports = dict(line.strip().split("=") for line in f if "=" in line)
        self.http_port = int(ports["http"])
        self.https_port = int(ports.get("https", 0))

    @property
    def http_url(self):
        return "http://127.0.0.1:%d/v1" % self.http_port

    @property
    def https_url(self):
        return "https://127.0.0.1:%d/v1" % self.https_port

    def _get(self, path):
        c = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return json.loads(r.read().decode())
        finally:
            c.close()

    def stats(self):
        return self._get("/_mock/stats")

    def calls(self):
        return self.stats()["calls"]

    def _set(self, path):
        """A setting request: the mock must accept it (a misspelt fault name
        or setting fails the test instead of running it without the fault)."""
        doc = self._get(path)
        if not (isinstance(doc, dict) and doc.get("ok") is True):
            raise AssertionError("the mock refused %s: %r" % (path, doc))
        return doc

    def config(self, **kw):
        return self._set("/_mock/config?" + urllib.parse.urlencode(kw))

    def reset(self):
        return self._set("/_mock/reset")

    def stop(self):
        if self in _live_mocks:
            _live_mocks.remove(self)
        if self.proc.returncode is None:
            stop_pid(self.proc)
        self.log.close()
        rc = self.proc.returncode
        if rc != 0:  # it exits 0 on SIGTERM: anything else is a crash
            raise AssertionError("the mock exited with status %s; its log: %s" % (rc, self.log.name))
        shutil.rmtree(self.dir, ignore_errors=True)


class PortFileServer:
    """A loopback server started by the tests: `python3 script PORTFILE args...`
    binds 127.0.0.1 on a port of its choice and writes it to PORTFILE when it
    accepts connections (bounded wait). Stopped by its PID (stop())."""

    def __init__(self, script, *args, prefix="cs-srv-"):
        self.dir = tempfile.mkdtemp(prefix=prefix)
        portfile = os.path.join(self.dir, "port")
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        import sys
        self.proc = subprocess.Popen([sys.executable, script, portfile] + list(args),
                                     stdout=self.log, stderr=subprocess.STDOUT)
        _live_mocks.append(self)
        try:
            wait_for(lambda: os.path.exists(portfile) or self.proc.poll() is not None, 20,
                     "%s to listen" % os.path.basename(script))
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited; its log: %s" % (script, self.log.name))
            with open(portfile) as f:
                self.port = int(f.read())
        except BaseException:
            self.stop()
            raise

    def stop(self):
        if self in _live_mocks:
            _live_mocks.remove(self)
        stop_pid(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class FastCGIResponder(PortFileServer):
    """tests/integration/fcgi_responder.py serving app_path's
    cgi_response(env, stdin) over FastCGI on 127.0.0.1 (a stand-in for
    PHP-FPM behind mod_proxy_fcgi)."""

    def __init__(self, app_path):
        super().__init__(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fcgi_responder.py"),
                         app_path, prefix="cs-fcgi-")


# A line of an error log that says a process crashed: httpd's report of a
# child killed by a signal (AH00052 "exit signal Segmentation fault"), glibc's
# and the sanitizers' reports. Any of them fails the test that saw it.
CRASH_RE = re.compile(r"exit signal|Segmentation fault|Aborted|Bus error|core dumped|stack smashing|"
                      r"double free|free\(\): invalid|malloc\(\): |AddressSanitizer|LeakSanitizer|"
                      r"UndefinedBehaviorSanitizer|ThreadSanitizer|runtime error:")

# Every Apache of the run that is not stopped yet, whoever made it: the check
# after each test (below) looks at all their error logs.
_live_servers = []
_server_serial = [0]
_live_mocks = []

BASE_MODULES = ["authn_core", "authn_file", "authz_core", "authz_user", "authz_host", "auth_basic",
                "socache_shmcb", "env", "setenvif", "mime", "status"]
# Built into Debian's apache2, a module to load in a plain httpd build
# (scripts/compat's httpd 2.4.37, RHEL's httpd): loaded when CS_HTTPD does
# not have it built in (httpd -l).
CORE_MODULES = ["unixd", "log_config"]
_builtin = []


def builtin_modules():
    """The modules compiled into CS_HTTPD (its `-l`), as names without
    mod_ and .c: "so", "unixd", "log_config", ..."""
    if not _builtin:
        out = subprocess.run([HTTPD, "-l"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env=httpd_env(), timeout=30).stdout.decode(errors="replace")
        names = [m.group(1) for m in re.finditer(r"^\s*(?:mod_)?(\w+)\.c\s*$", out, re.M)]
        if "so" not in names:
            raise RuntimeError("%s -l does not list mod_so (it cannot load modules):\n%s" % (HTTPD, out))
        _builtin.extend(names)
    return _builtin


def load_lines(modules):
    """LoadModule lines for modules (names without mod_), after the core
    modules this httpd does not have built in; a module it has built in is
    not loaded again."""
    builtin = builtin_modules()
    wanted = [m for m in CORE_MODULES if m not in builtin] + [m for m in modules if m not in builtin]
    return "\n".join("LoadModule %s_module %s/mod_%s.so" % (m, MODDIR, m)
                     for i, m in enumerate(wanted) if m not in wanted[:i])


class Apache:
    """A real apache2 in a temp dir, with mod_cardscan and Basic auth users."""

    def __init__(self, mpm="event", body="", global_conf="", loglevel="cardscan:debug",
                 modules=(), servers=4, start=True, mpm_conf=None, access_log=False, launcher=()):
        """mpm_conf: replaces the MPM tuning lines (StartServers...) entirely.
        access_log: log "%P %u %>s %m %U" per request to self.access_log.
        launcher: a command prefix for apache2 (e.g. DROP_DAC)."""
        self.mpm = mpm
        self.launcher = list(launcher)
        self._crash_mark = 0
        self._stopped = False
        _server_serial[0] += 1
        self.serial = _server_serial[0]
        _live_servers.append(self)
        self.dir = tempfile.mkdtemp(prefix="cs-httpd-")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.conf = os.path.join(self.dir, "httpd.conf")
        self.error_log = os.path.join(self.dir, "error.log")
        self.pidfile = os.path.join(self.dir, "httpd.pid")
        self.access_log = os.path.join(self.dir, "access.log")
        if access_log:
            global_conf = 'CustomLog "%s" "%%P %%u %%>s %%m %%U"\n%s' % (self.access_log, global_conf)
        sd = session_dir()
        loads = load_lines(["mpm_" + mpm] + BASE_MODULES + list(modules))
        if mpm_conf is not None:
            pass
        elif mpm == "prefork":
            mpm_conf = ("StartServers %d\nMinSpareServers %d\nMaxSpareServers %d\n"
                        "MaxRequestWorkers 32\nMaxConnectionsPerChild 0\n") % (servers, servers, servers + 2)
        else:
            mpm_conf = ("StartServers %d\nServerLimit 8\nThreadsPerChild 16\nMinSpareThreads 16\n"
                        "MaxSpareThreads 128\nMaxRequestWorkers 128\n") % min(servers, 8)
        user = "User www-data\nGroup www-data\n" if os.geteuid() == 0 else ""
        text = f"""ServerRoot "{self.dir}"
ServerName 127.0.0.1
Listen 127.0.0.1:{self.port}
PidFile "{self.pidfile}"
ErrorLog "{self.error_log}"
LogLevel warn {loglevel}
DefaultRuntimeDir "{self.dir}"
Mutex default:{self.dir}
{user}{loads}
LoadModule cardscan_module {MODULE}
TypesConfig /etc/mime.types
KeepAlive On
GracefulShutdownTimeout 5
{mpm_conf}
{global_conf}
DocumentRoot "{self.dir}"
<Directory "{self.dir}">
    Require all granted
</Directory>
<Location "/cardscan-session">
    AuthType Basic
    AuthName "portal"
    AuthBasicProvider file
    AuthUserFile "{sd}/htpasswd"
    Require valid-user
    SetHandler cardscan-session
</Location>
{body}
"""
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write(text)
        self.proc = None
        if start:
            self.start()

    def configtest(self):
        return subprocess.run(self.launcher + [HTTPD, "-t", "-f", self.conf],
                              env=httpd_env(getattr(self, "env", None)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=60)

    def start(self, env=None):
        """env: extra variables for apache2's environment (e.g. for
        CardScanAPIKey env:NAME); kept for later restarts of this server."""
        if env is not None:
            self.env = dict(env)
        # A session of its own: on shutdown prefork signals its whole process
        # group (killpg), which would otherwise include the test runner.
        self.proc = subprocess.Popen(self.launcher + [HTTPD, "-f", self.conf, "-DFOREGROUND"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=httpd_env(getattr(self, "env", None)))

        def up():
            if self.proc.poll() is not None:
                return True
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return os.path.exists(self.pidfile)
            except OSError:
                return False
        wait_for(up, 20, "apache2 to listen")
        if self.proc.poll() is not None:
            raise RuntimeError("apache2 did not start:\n%s\n%s" % (self.proc.stdout.read().decode(errors="replace"),
                                                                   self.log()))

    def graceful(self):
        os.kill(self.proc.pid, signal.SIGUSR1)

    def generation(self):
        """How many times this server has (re)started its children so far."""
        return self.log().count("resuming normal operations")

    def graceful_and_wait(self, timeout=30):
        """A graceful restart, waited for: returns when the new generation
        is serving (the log says so)."""
        before = self.generation()
        self.graceful()
        wait_for(lambda: self.generation() > before, timeout, "a graceful restart")

    def crash_lines(self):
        """Crash reports (CRASH_RE) written to the error log since the last
        call; each is reported once."""
        text = self.log()
        end = text.rfind("\n") + 1  # whole lines only: the last may be half written
        if self._stopped or not self.running():
            end = len(text)
        new = text[self._crash_mark:end]
        self._crash_mark = max(self._crash_mark, end)
        return [ln for ln in new.splitlines() if CRASH_RE.search(ln)]

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def halt(self):
        """Stops apache2's processes, as stop() does, without its checks
        (for a test that reads apache2's console output first)."""
        try:
            self._halt()
        finally:
            self._stop_orphans()

    def _stop_orphans(self):
        """Processes of this server that outlived its parent are stopped by
        their PIDs. (A prefork parent told to stop while it restarts may
        exit without signalling the children it has just made.)"""
        conf = ("-f\0%s" % self.conf).encode()
        for name in os.listdir("/proc"):
            if not name.isdigit() or self.proc and int(name) == self.proc.pid:
                continue
            try:
                with open("/proc/%s/cmdline" % name, "rb") as f:
                    if conf not in f.read():
                        continue
                sys.stderr.write("apache2 process %s outlived its parent: killed\n" % name)
                os.kill(int(name), signal.SIGKILL)
            except OSError:
                pass

    def _halt(self):
        if self.running() and self.mpm in ("event", "worker"):
            # graceful-stop first, as apachectl graceful-stop does: the
            # threaded MPMs' ungraceful stop (SIGTERM) closes the workers'
            # sockets from the child's main thread, which races with the
            # workers and crashes about one event child in a hundred in
            # httpd 2.4 (apr_os_sock_get under close_worker_sockets, no
            # module in the stack), whatever the modules. It costs about a
            # second per server; GracefulShutdownTimeout bounds it. Once
            # the children are gone, SIGTERM ends the parent at once.
            try:
                os.kill(self.proc.pid, signal.SIGWINCH)
                wait_for(lambda: not self.running() or not self.child_pids(), 30,
                         "apache2's children to stop gracefully")
            except ProcessLookupError:
                pass
        if self.running():
            stop_pid(self.proc, signal.SIGTERM, 30)

    def stop(self):
        """Stops apache2 (its children first exit) and fails (AssertionError)
        when any process of it crashed; the directory is kept then."""
        if self._stopped:
            return
        self._stopped = True
        if self in _live_servers:
            _live_servers.remove(self)
        self.halt()
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        crashes = self.crash_lines()
        if crashes:
            raise AssertionError("a process of apache2 crashed (logs kept in %s):\n%s"
                                 % (self.dir, "\n".join(crashes[:20])))
        if os.environ.get("CS_KEEP_LOGS"):
            return
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self):
        try:
            with open(self.error_log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def child_pids(self):
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], stdout=subprocess.PIPE,
                             timeout=10).stdout.decode()
        return [int(x) for x in out.split()]

    def request(self, path="/cardscan-session", user="alice", password=None, method="GET", body=None,
                headers=None, conn=None, timeout=30, port=None):
        """One request; returns (status, headers dict lower-cased, body bytes, json or None).
        port: another port of this server (a Listen of a <VirtualHost>)."""
        h = dict(headers or {})
        if user is not None:
            pw = password if password is not None else USERS[user]
            cred = ("%s:%s" % (user, pw)).encode("utf-8")
            h["Authorization"] = "Basic " + base64.b64encode(cred).decode()
        own = conn is None
        c = conn or http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
            try:
                doc = json.loads(data.decode()) if data else None
            except ValueError:
                doc = None
            return r.status, hdrs, data, doc
        finally:
            if own:
                c.close()

    def access_pids(self):
        """PIDs that served the requests logged so far (needs access_log=True)."""
        try:
            with open(self.access_log, encoding="utf-8", errors="replace") as f:
                return [int(line.split()[0]) for line in f if line.strip()]
        except OSError:
            return []

    def wait_log(self, text, timeout=10.0):
        """Waits (bounded) until the error log contains text; returns the log."""
        wait_for(lambda: text in self.log(), timeout, "%r in the error log" % text)
        return self.log()


def _check_servers_after_test(first_serial):
    """After each test: servers it made and did not stop are stopped, and a
    crash in the error log of any server still running (a class's shared
    server included) fails the test it happened in."""
    problems = []
    for a in list(_live_servers):
        if a.serial > first_serial:
            try:
                a.stop()
            except AssertionError as e:
                problems.append(str(e))
    for a in list(_live_servers):
        crashes = a.crash_lines()
        if crashes:
            problems.append("a process of apache2 crashed (error log %s):\n%s"
                            % (a.error_log, "\n".join(crashes[:20])))
    if problems:
        raise AssertionError("\n".join(problems))


_unittest_run = unittest.TestCase.run


def _run_with_crash_check(self, result=None):
    # A cleanup registered first runs last, after tearDown and the test's own
    # cleanups, and a failure there fails this test (Python >= 3.11).
    self.addCleanup(_check_servers_after_test, _server_serial[0])
    return _unittest_run(self, result)


unittest.TestCase.run = _run_with_crash_check


@atexit.register
def _stop_leftovers():
    """Servers and mocks a test class did not stop (its tearDownClass failed
    half-way, say) are stopped when the run ends."""
    for x in list(_live_servers) + list(_live_mocks):
        try:
            x.stop()
        except AssertionError as e:
            print(e)


# apache2 as root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH: root then
# reads only what file modes allow it, like any user (Apache(launcher=...)).
DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search"]


def jwt_payload(token):
    part = token.split(".")[1]
    part += "=" * (-len(part) % 4)
    return json.loads(base64.urlsafe_b64decode(part))


def apache_conf(key=TEST_KEY, endpoint=None, extra=""):
    """Server-level mod_cardscan lines."""
    lines = ["CardScanAPIKey %s" % key]
    if endpoint:
        lines.append("CardScanEndpoint %s" % endpoint)
    return "\n".join(lines) + "\n" + extra


class MockTestCase(unittest.TestCase):
    """A mock per class; subclasses start Apache as they need."""

    @classmethod
    def setUpClass(cls):
        cls.mock = Mock()

    @classmethod
    def tearDownClass(cls):
        cls.mock.stop()

    def setUp(self):
        self.mock.reset()
        self.servers = []

    def tearDown(self):
        for a in self.servers:
            a.stop()

    def apache(self, mpm="event", body="", global_conf=None, **kw):
        if global_conf is None:
            global_conf = apache_conf(endpoint=self.mock.http_url)
        a = Apache(mpm=mpm, body=body, global_conf=global_conf, **kw)
        self.servers.append(a)
        return a


def auth_location(path, directives=""):
    """A <Location> protected by the harness's Basic-auth users, running the
    cardscan-session handler, with extra mod_cardscan directives."""
    return """<Location "%s">
    AuthType Basic
    AuthName "portal"
    AuthBasicProvider file
    AuthUserFile "%s/htpasswd"
    Require valid-user
    SetHandler cardscan-session
    %s
</Location>
""" % (path, session_dir(), directives)


def run_concurrently(fn, args_list, timeout=60.0):
    """Calls fn(*args) for every args in args_list, each in its own thread,
    released together by a barrier; returns the results in order (an
    exception raised by a call is re-raised here). Bounded by timeout."""
    import threading
    n = len(args_list)
    barrier = threading.Barrier(n)
    results = [None] * n
    errors = [None] * n

    def worker(i, args):
        try:
            barrier.wait(timeout)
            results[i] = fn(*args)
        except BaseException as e:  # reported to the caller below
            errors[i] = e
    threads = [threading.Thread(target=worker, args=(i, a), daemon=True) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise AssertionError("concurrent calls still running after %.0f s" % timeout)
    for e in errors:
        if e is not None:
            raise e
    return results


def rfc3339_utc(text):
    """Epoch seconds of a strict RFC 3339 UTC timestamp YYYY-MM-DDTHH:MM:SSZ
    (ValueError otherwise)."""
    import calendar
    import re
    if not isinstance(text, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", text):
        raise ValueError("not RFC 3339 UTC: %r" % (text,))
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))
