"""A small asyncio QMP client for the control socket (used by the CLI).

Role: connect, check the greeting, negotiate capabilities, then run commands
and collect events.  No dependency on qemu.qmp; it speaks to QEMU itself too.
A Unix socket path, or a (host, port) pair with an ``ssl`` context for remote
control (`control.remote.client_for` builds one from ``qmps://HOST:PORT``).

    async with ControlClient(path) as c:
        jobs = await c.execute("query-jobs")
        async for event in c.events():
            ...

Invariants:
- One reader task owns the socket's read side; replies are matched to
  requests by ``id`` through a dict of futures (ids are this client's own
  integers, so any reply with an unknown id is a server bug and is logged).
- Events are queued from the moment negotiation completes, so a caller that
  queries state and then waits for events misses nothing in between.
- When the connection ends, every pending `execute` fails with
  `ConnectionClosed` and `events()` stops; `asyncio.CancelledError` is never
  wrapped.
- `execute` raises `CommandError` (``class_``, ``desc``) when the server
  refuses the command; the connection stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import ssl as _ssl
from typing import Any, AsyncIterator

from ..errors import ConnectionClosed, RemoteProtocolError
from ..nbd.logsafe import clip
from ..sockets import set_dead_peer_timeout
from . import framing
from .schema import CommandError

__all__ = ["ControlClient", "CommandError"]

log = logging.getLogger(__name__)

_EOF = object()


class ControlClient:
    """A QMP client on a Unix socket or TCP (optionally TLS).  Fields:

    - ``path``: the address as messages name it (the socket path, or ``name``
      / ``HOST:PORT`` for TCP);
    - ``greeting``: the server's greeting object (``{"QMP": ...}``), once connected;
    - ``_pending``: request id -> future of its reply message;
    - ``_events``: events not yet consumed (the `_EOF` marker ends the stream);
    - ``_closed``: the connection is gone (set by the reader).
    """

    def __init__(self, address: str | os.PathLike | tuple[str, int], *, timeout: float | None = 10.0,
                 ssl: _ssl.SSLContext | None = None, server_hostname: str | None = None,
                 name: str | None = None) -> None:
        #: A (host, port) pair for TCP, else None.
        self._tcp: tuple[str, int] | None = None
        if isinstance(address, tuple):
            self._tcp = (address[0], int(address[1]))
            self.path = name or f"{address[0]}:{address[1]}"
        else:
            self.path = name or os.fspath(address)
        #: TLS context (TCP only) and the name the server certificate must carry.
        self.ssl = ssl
        self.server_hostname = server_hostname
        #: Seconds allowed for connect + greeting + negotiation (None = forever).
        self.timeout = timeout
        self.greeting: dict | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._splitter = framing.JSONSplitter()
        self._backlog: list[Any] = []  # parsed messages not yet handled (connect phase)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._events: asyncio.Queue = asyncio.Queue()
        self._reader_task: asyncio.Task | None = None
        self._closed = False

    async def __aenter__(self) -> "ControlClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, read the greeting, negotiate.  Raises OSError or `RemoteProtocolError`."""
        async with asyncio.timeout(self.timeout):
            if self._tcp is None:
                self._reader, self._writer = await asyncio.open_unix_connection(self.path)
            elif self.ssl is not None:
                self._reader, self._writer = await asyncio.open_connection(
                    *self._tcp, ssl=self.ssl, server_hostname=self.server_hostname or self._tcp[0])
            else:
                self._reader, self._writer = await asyncio.open_connection(*self._tcp)
            if self._tcp is not None:
                set_dead_peer_timeout(self._writer.get_extra_info("socket"))
            try:
                greeting = await self._recv()
                if isinstance(greeting, dict) and isinstance(greeting.get("error"), dict):
                    # A refusal instead of a greeting (our server at its session cap).
                    raise ConnectionClosed(
                        f"{self.path}: the server refused the session: {clip(str(greeting['error'].get('desc')), 200)}")
                if not isinstance(greeting, dict) or not isinstance(greeting.get("QMP"), dict):
                    raise RemoteProtocolError(f"{self.path}: not a QMP server (greeting {greeting!r:.200})")
                self.greeting = greeting
                self._writer.write(framing.encode({"execute": "qmp_capabilities", "id": 0}))
                reply = await self._recv()
                # Events are not expected here, but tolerated.  So is a second greeting:
                # QEMU 7.2's monitor (qemu-storage-daemon) can send its greeting twice
                # when the client connects while the chardev is being set up (seen under
                # load: the reply to qmp_capabilities was another greeting, then the reply).
                while isinstance(reply, dict) and ("event" in reply or isinstance(reply.get("QMP"), dict)):
                    reply = await self._recv()
                if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
                    # E.g. remote control refusing this client certificate: say why.
                    raise RemoteProtocolError(f"{self.path}: capabilities negotiation refused: "
                                              f"{str(reply['error'].get('desc'))[:400]}")
                if not isinstance(reply, dict) or "return" not in reply:
                    raise RemoteProtocolError(f"{self.path}: capabilities negotiation failed: {reply!r:.200}")
            except BaseException:
                self._writer.close()
                self._closed = True
                raise
        self._reader_task = asyncio.create_task(self._read_loop(), name="qmp-client-reader")

    async def _recv(self) -> Any:
        """Next message during the connect phase (before the reader task runs)."""
        assert self._reader is not None
        while not self._backlog:
            data = await self._reader.read(65536)
            if not data:
                if self.greeting is None and self.ssl is not None:
                    # TLS 1.3: a server refusing our certificate closes after the handshake.
                    raise ConnectionClosed(f"{self.path}: connection closed by the server before its greeting "
                                           "(did it refuse this client certificate? see its log)")
                raise ConnectionClosed(f"{self.path}: connection closed by the server")
            self._backlog.extend(self._splitter.feed(data))
        msg = self._backlog.pop(0)
        if isinstance(msg, framing.ParseError):
            raise RemoteProtocolError(f"{self.path}: server sent bad JSON: {msg.desc}")
        return msg

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reason = "connection closed by the server"
        try:
            backlog, self._backlog = self._backlog, []
            for msg in backlog:
                self._route(msg)
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                for msg in self._splitter.feed(data):
                    self._route(msg)
                if self._splitter.broken:
                    reason = "server sent an oversized or too deeply nested message"
                    break
        except (ConnectionError, OSError) as e:
            reason = f"connection failed: {e}"
        finally:
            self._closed = True
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionClosed(f"{self.path}: {reason}"))
            self._pending.clear()
            self._events.put_nowait(_EOF)

    def _route(self, msg: Any) -> None:
        if isinstance(msg, framing.ParseError) or not isinstance(msg, dict):
            log.warning("control server sent an unexpected message: %r", msg)
            return
        if "event" in msg:
            self._events.put_nowait(msg)
            return
        fut = self._pending.pop(msg.get("id"), None) if isinstance(msg.get("id"), int) else None
        if fut is None:
            log.warning("control server sent a reply nobody waits for: %r", msg)
            return
        if not fut.done():
            fut.set_result(msg)

    async def execute(self, name: str, arguments: dict | None = None) -> Any:
        """Run command NAME; return its ``return`` value or raise `CommandError`."""
        if self._closed or self._writer is None:
            raise ConnectionClosed(f"{self.path}: not connected")
        rid = next(self._ids)
        msg: dict = {"execute": name, "id": rid}
        if arguments:
            msg["arguments"] = arguments
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._writer.write(framing.encode(msg))
            await self._writer.drain()
            reply = await fut
        except (ConnectionError, OSError) as e:
            raise ConnectionClosed(f"{self.path}: connection failed: {e}") from e
        finally:
            self._pending.pop(rid, None)
        if "error" in reply:
            err = reply["error"]
            raise CommandError(str(err.get("class", "GenericError")), str(err.get("desc", "")))
        return reply.get("return")

    async def next_event(self, timeout: float | None = None) -> dict | None:
        """The next event, or None on timeout or once the connection is closed."""
        if self._events.empty() and self._closed and self._reader_task is None:
            return None
        try:
            async with asyncio.timeout(timeout):
                event = await self._events.get()
        except TimeoutError:
            return None
        if event is _EOF:
            self._events.put_nowait(_EOF)  # stay at the end for later callers
            return None
        return event

    async def events(self) -> AsyncIterator[dict]:
        """Every event from negotiation on, until the connection closes."""
        while (event := await self.next_event()) is not None:
            yield event

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        self._closed = True
