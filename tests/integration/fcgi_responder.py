"""A FastCGI responder in the Python standard library, for the integration
tests (mod_proxy_fcgi in front of it, as in front of PHP-FPM).

    python3 fcgi_responder.py PORTFILE APP.py

Listens on 127.0.0.1, on a port the kernel picks, written to PORTFILE once
it accepts connections. APP.py defines cgi_response(env, stdin) -> bytes:
what a CGI script would print (header lines, an empty line, the body),
which goes back in FCGI_STDOUT records, as PHP-FPM answers. Connections may
carry several requests (FCGI_KEEP_CONN), one at a time. Stopped by SIGTERM.
"""

import importlib.util
import os
import signal
import socket
import socketserver
import struct
import sys

FCGI_BEGIN_REQUEST, FCGI_ABORT_REQUEST, FCGI_END_REQUEST = 1, 2, 3
FCGI_PARAMS, FCGI_STDIN, FCGI_STDOUT = 4, 5, 6
FCGI_GET_VALUES, FCGI_GET_VALUES_RESULT, FCGI_UNKNOWN_TYPE = 9, 10, 11
FCGI_KEEP_CONN = 1


def load_app(path):
    spec = importlib.util.spec_from_file_location("fcgi_app", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def record(rtype, req_id, content=b""):
    pad = -len(content) % 8
    return struct.pack("!BBHHBB", 1, rtype, req_id, len(content), pad, 0) + content + b"\0" * pad


def parse_pairs(data):
    """FastCGI name-value pairs (lengths of 1 byte, or 4 with the high bit)."""
    env, i = {}, 0

    def length():
        nonlocal i
        if data[i] & 0x80:
            n = struct.unpack("!I", data[i:i + 4])[0] & 0x7FFFFFFF
            i += 4
        else:
            n = data[i]
            i += 1
        return n
    while i < len(data):
        nlen = length()
        vlen = length()
        name = data[i:i + nlen].decode("latin-1")
        i += nlen
        env[name] = data[i:i + vlen].decode("latin-1")
        i += vlen
    return env


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        sock.settimeout(60)
        params, stdin, keep = b"", b"", False
        while True:
            head = read_exact(sock, 8)
            if head is None:
                return
            _, rtype, req_id, clen, plen, _ = struct.unpack("!BBHHBB", head)
            content = read_exact(sock, clen) if clen else b""
            if plen:
                read_exact(sock, plen)
            if content is None:
                return
            if rtype == FCGI_BEGIN_REQUEST:
                keep = bool(content[2] & FCGI_KEEP_CONN)
                params, stdin = b"", b""
            elif rtype == FCGI_PARAMS:
                params += content
            elif rtype == FCGI_STDIN and clen:
                stdin += content
            elif rtype == FCGI_STDIN:
                out = self.server.app.cgi_response(parse_pairs(params), stdin)
                msg = b""
                for i in range(0, len(out), 32768):
                    msg += record(FCGI_STDOUT, req_id, out[i:i + 32768])
                msg += record(FCGI_STDOUT, req_id)
                msg += record(FCGI_END_REQUEST, req_id, struct.pack("!IB3x", 0, 0))
                sock.sendall(msg)
                if not keep:
                    return
            elif rtype == FCGI_ABORT_REQUEST:
                sock.sendall(record(FCGI_END_REQUEST, req_id, struct.pack("!IB3x", 0, 0)))
                if not keep:
                    return
            elif rtype == FCGI_GET_VALUES:
                sock.sendall(record(FCGI_GET_VALUES_RESULT, 0))
            else:
                sock.sendall(record(FCGI_UNKNOWN_TYPE, 0, struct.pack("!B7x", rtype)))


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main(portfile, app_path):
    srv = Server(("127.0.0.1", 0), Handler)
    srv.app = load_app(app_path)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    with open(portfile + ".tmp", "w") as f:
        f.write(str(srv.server_address[1]))
    os.rename(portfile + ".tmp", portfile)
    srv.serve_forever()


if __name__ == "__main__":
    socket.setdefaulttimeout(60)
    main(sys.argv[1], sys.argv[2])
