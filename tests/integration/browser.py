"""Headless Chromium for the browser tests: the DOM of a page after its
scripts ran (dump_dom), and the text of elements by id (parse). Chromium
runs with a fresh profile each time, with the flags this closed network
needs, in its own process group that is killed when it ends."""

import html.parser
import os
import shutil
import signal
import subprocess
import tempfile

CHROMIUM = "/usr/bin/chromium"


class _ById(html.parser.HTMLParser):
    """Text and attributes of the elements with the given ids."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, ids):
        super().__init__(convert_charrefs=True)
        self.ids = set(ids)
        self.found = {}
        self.open = []  # [id, depth] of elements being captured

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.VOID:
            return
        for o in self.open:
            o[1] += 1
        if attrs.get("id") in self.ids:
            self.found[attrs["id"]] = {"attrs": attrs, "text": ""}
            self.open.append([attrs["id"], 1])

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        for o in self.open:
            o[1] -= 1
        self.open = [o for o in self.open if o[1] > 0]

    def handle_data(self, data):
        for ident, _ in self.open:
            self.found[ident]["text"] += data


def parse(dom, ids=("status", "user", "identity", "expires", "error", "cardscan-widget")):
    p = _ById(ids)
    p.feed(dom)
    p.close()
    return p.found


def dump_dom(url, timeout=90):
    """The DOM of url after its scripts ran, from a fresh headless Chromium."""
    profile = tempfile.mkdtemp(prefix="cs-chromium-")
    err_path = os.path.join(profile, "stderr.log")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--user-data-dir=" + profile, "--virtual-time-budget=5000", "--dump-dom", url]
    env = dict(os.environ, XDG_CONFIG_HOME=profile, XDG_CACHE_HOME=profile, HOME=profile)
    try:
        with open(err_path, "wb") as err:
            # its own process group, so that its helpers can be stopped with it
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True)
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=15)
                raise AssertionError("chromium did not finish in %d s" % timeout)
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # helpers left behind, if any
                except (ProcessLookupError, PermissionError):
                    pass
        if proc.returncode != 0:
            with open(err_path, errors="replace") as f:
                raise AssertionError("chromium exited %d:\n%s" % (proc.returncode, f.read()[-3000:]))
        return out.decode("utf-8", errors="replace")
    finally:
        shutil.rmtree(profile, ignore_errors=True)
