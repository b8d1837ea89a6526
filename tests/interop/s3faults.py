"""A fault-injecting HTTP proxy in front of a real S3 store (hunt 8).

Role: the broken S3 endpoint for `agent.s3store` (its raw signed GET/PUT and
boto3).  It forwards every request verbatim (method, path, headers -- the
SigV4 signature covers the Host header, which stays the proxy's, so the store
accepts it -- and body) to ``upstream`` and relays the answer, except where
a rule matches.  Written with ``http.server`` and ``http.client`` only.

A rule is ``(method, key_substring, fault, count)``: the next ``count``
requests whose method (``"*"``: any) and path match get ``fault`` instead of (or on top of)
the store's answer:

- ``"503"`` / ``"500"``: that status with an S3 XML error, nothing forwarded;
- ``"412-dropped"`` (PUT): 412 PreconditionFailed, the PUT never forwarded
  (the store says "already there" for a chunk it does not hold);
- ``"404-head"`` / ``"200-head"`` (HEAD): a wrong existence answer;
- ``"flip"`` (GET): the store's 200 with one body byte changed, same length;
- ``"truncate"`` (GET): the store's headers (its Content-Length), half the
  body, then the connection closed;
- ``"stall"`` (GET): the store's headers, then silence until the proxy closes;
- ``"garbage"``: a 200 with a body that is not XML (for LIST / the lease calls);
- ``"reset"``: the connection closed with no answer (the store gone mid-run).

``counts`` says how many requests of each method went through, ``faults``
how many faults were injected.
"""

from __future__ import annotations

import http.client
import http.server
import socketserver
import threading
from urllib.parse import urlsplit

ERR = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code><Message>injected</Message>'
       b"</Error>")


class Proxy:
    def __init__(self, upstream: str) -> None:
        u = urlsplit(upstream)
        self.up_host, self.up_port = u.hostname, u.port or 80
        self.rules: list[list] = []
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.faults = 0
        self.stop = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _any

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(self, method: str, key: str, fault: str, count: int = 1) -> None:
        with self.lock:
            self.rules.append([method, key, fault, count])

    def _match(self, method: str, path: str) -> str | None:
        with self.lock:
            self.counts[method] = self.counts.get(method, 0) + 1
            for r in self.rules:
                if r[3] > 0 and r[0] in (method, "*") and r[1] in path:
                    r[3] -= 1
                    self.faults += 1
                    return r[2]
        return None

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        fault = self._match(h.command, h.path)
        if fault == "reset":
            h.close_connection = True
            h.connection.shutdown(2)  # socket.SHUT_RDWR: no answer at all
            return
        if fault in ("503", "500", "412-dropped", "404-head", "garbage"):
            status = {"503": 503, "500": 500, "412-dropped": 412, "404-head": 404, "garbage": 200}[fault]
            code = {503: b"SlowDown", 500: b"InternalError", 412: b"PreconditionFailed", 404: b"NoSuchKey"}
            payload = b"<<this is not xml" if fault == "garbage" else ERR % code.get(status, b"x")
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(0 if h.command == "HEAD" else len(payload)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(payload)
            return
        c = http.client.HTTPConnection(self.up_host, self.up_port, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items()}
            c.request(h.command, h.path, body=body if n else None, headers=headers)
            r = c.getresponse()
            data = r.read()
        finally:
            c.close()
        if fault == "200-head" and h.command == "HEAD":
            h.send_response(200)
            h.send_header("Content-Length", "0")
            h.send_header("Last-Modified", "Fri, 04 Dec 2026 00:00:00 GMT")
            h.send_header("ETag", '"00000000000000000000000000000000"')
            h.end_headers()
            return
        if fault == "flip" and r.status == 200 and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:] if len(data) < 64 else data[:40] + bytes([data[40] ^ 1]) + data[41:]
        h.send_response(r.status)
        for k, v in r.getheaders():
            if k.lower() not in ("transfer-encoding", "connection"):
                h.send_header(k, v)
        if "content-length" not in {k.lower() for k, _ in r.getheaders()}:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if fault == "truncate" and r.status == 200:
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        if fault == "stall" and r.status == 200:
            h.wfile.flush()
            self.stop.wait(600)
            h.close_connection = True
            return
        h.wfile.write(data)
