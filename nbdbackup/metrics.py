"""``serve --metrics HOST:PORT``: a Prometheus scrape endpoint (plain HTTP, GET /metrics).

Role: the smallest HTTP server that Prometheus (or ``curl``) can scrape:
one request per connection, ``GET /metrics`` answers the text of
`nbd.stats.prometheus_text` for the app's exports, connections and jobs;
other paths get 404 and other methods 405.  Requests are read with a size
limit (8 KiB of head) and a timeout (5 s), so a slow or hostile client only
costs one small task, and at most `MAX_CLIENTS` connections are open at
once: a newcomer beyond that closes the oldest (a scraper sends its request
at once and is answered in milliseconds; what lingers is a staller), so a
flood of connections can neither pin the server's memory and descriptors
nor lock the scraper out for longer than it keeps flooding.  Bind it to
loopback (or put it behind a proxy): it has no authentication, like most
exporters.

Invariant: building the text only reads in-memory state; it never blocks
the event loop on I/O.  ``_open`` (per endpoint: the writers of its open
connections, oldest first) holds at most `MAX_CLIENTS` entries.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from .nbd.stats import prometheus_text

log = logging.getLogger("nbdbackup.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HEAD_LIMIT = 8192
TIMEOUT = 5.0
#: Connections open at once per endpoint; a newcomer beyond closes the oldest.
MAX_CLIENTS = 16


def render(app: Any) -> str:
    jobs = app.engine.query_jobs() if app.engine is not None else []
    from .blockdev import ioengine, nbd

    pool = getattr(app.server, "pool", None)
    return (prometheus_text(app.server.exports.values(), app.server.connections, jobs,
                            getattr(app.server, "budget", None), getattr(app.server, "budget_total", None))
            + ioengine.prometheus_text() + nbd.prometheus_text()
            + (pool.prometheus_text() if pool is not None else ""))


def _response(status: str, body: bytes, ctype: str = "text/plain; charset=utf-8") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + body


async def _handle(app: Any, open_: "OrderedDict[asyncio.StreamWriter, None]",
                  reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while len(open_) >= MAX_CLIENTS:
        oldest, _ = open_.popitem(last=False)
        oldest.transport.abort()  # its handler's read or drain fails, and it ends
    open_[writer] = None
    try:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        except asyncio.LimitOverrunError:
            writer.write(_response("431 Request Header Fields Too Large", b"too large\n"))
            return
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            return
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            writer.write(_response("400 Bad Request", b"bad request line\n"))
        elif parts[0] != "GET":
            writer.write(_response("405 Method Not Allowed", b"GET only\n"))
        elif parts[1].split("?", 1)[0] != "/metrics":
            writer.write(_response("404 Not Found", b"try /metrics\n"))
        else:
            writer.write(_response("200 OK", render(app).encode(), CONTENT_TYPE))
    finally:
        try:
            await asyncio.wait_for(writer.drain(), TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        writer.close()
        open_.pop(writer, None)


async def start(app: Any, host: str, port: int) -> asyncio.base_events.Server:
    open_: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()
    srv = await asyncio.start_server(lambda r, w: _handle(app, open_, r, w), host, port, limit=HEAD_LIMIT)
    log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", port)
    return srv
