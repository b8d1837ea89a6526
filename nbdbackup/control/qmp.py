"""The control socket: an asyncio QMP server on a Unix socket (and on TCP with TLS).

Role: lets operators and scripts drive nbdbackup exactly as they drive QEMU --
any QMP client (``qemu.qmp.QMPClient``, ``socat``, libvirt-style code) works
unchanged.  The engine registers one handler per command (`QMPServer.register`)
and reports progress with `QMPServer.emit`; the command list, argument schemas,
return shapes and events are documented in `nbdbackup.control.schema`.

Protocol (QEMU's, see `control.framing` for the byte level):
- On connect the server sends the greeting ``{"QMP": {"version": {"qemu":
  {"major", "minor", "micro"}, "package": "nbdbackup X"}, "capabilities": []}}``
  (no capabilities: we never offer ``oob``).
- Until ``qmp_capabilities`` succeeds every other command fails with class
  ``CommandNotFound``, desc ``Expecting capabilities negotiation with
  'qmp_capabilities'``; afterwards ``qmp_capabilities`` itself fails with
  ``CommandNotFound``.  Only negotiated clients receive events.
- ``{"execute": NAME, "arguments": {...}, "id": ANY}`` -> ``{"return": ...,
  "id": ANY}`` or ``{"id": ANY, "error": {"class", "desc"}}``.  Unknown
  commands: ``CommandNotFound`` ``The command NAME has not been found``.
- Malformed input gets a ``GenericError`` reply and the connection carries on
  (except past the hard limits of `framing.JSONSplitter`).
- Events: ``{"timestamp": {"seconds", "microseconds"}, "event": NAME, "data": {...}}``.

Listeners: one Unix socket (`start`, mode 0600, or `start_socket` for a
socket systemd passed) whose clients may run everything, plus any number of
TCP+TLS listeners (`start_tcp`, remote control, see `control.remote`) whose
clients get the `remote.Access` their certificate earns: every command is
first checked against the session's access (`Access.refusal`), so a refused
client gets ``GenericError`` with the reason for every command, and a
read-only one for every command that is not `schema.is_read_only`.

Remote admission: at most `MAX_REMOTE_CLIENTS` TCP connections at once,
counted from the accept (our own accept loop, `_accept_loop`; the loop's
TLS handshake then runs in `_serve_remote`, within `TLS_HANDSHAKE_TIMEOUT` s).  At the cap a new connection evicts the oldest one
that has not earned access (still in its TLS handshake, or admitted as
``none``); when every slot holds an admitted (``full`` / ``read``) session,
the new connection is closed at once.  So peers without an authorized
certificate -- anyone who can reach the port -- can neither exhaust the
process's file descriptors (which the NBD listeners, the Unix control socket
and the exports' files share) nor push out an admitted session.  An admitted
controller whose link died (no FIN, no RST) would hold its slot for ever:
every accepted connection gets TCP keepalive and TCP_USER_TIMEOUT
(``dead_peer_timeout``, `sockets.set_dead_peer_timeout`), so its session
ends about that long after the peer last acknowledged anything.

Local admission: at most `MAX_LOCAL_CLIENTS` sessions on the Unix socket(s)
at once (mode 0600: the operator's own clients, trusted but maybe buggy);
beyond, a new connection gets one ``GenericError`` line saying so and is
closed -- no session is ever pushed out (an event listener holding a session
for hours is legitimate), so a script that leaks connections locks out only
further control clients, never the descriptors NBD clients need.

Concurrency invariants:
- Each client is a `_Session` with three tasks: the reader (parses input,
  answers malformed input, queues requests, at most `MAX_QUEUED` ahead so a
  flooding client is throttled by TCP backpressure), the dispatcher (runs that
  client's commands ONE AT A TIME, in order, so replies come back in request
  order, as QEMU does) and the writer (the only task that writes to the
  socket; replies and events are queued to it and never block their producer).
- Clients are independent: a slow command of one client delays only that
  client's later commands; events are delivered while commands run.
- A client that stops reading is disconnected once `MAX_OUTPUT_BACKLOG`
  messages wait for it; a client that disconnects has its command in flight
  run to completion (handlers are never cancelled by a disconnect -- a
  half-done ``backup-start`` would be worse) and its reply dropped.  Requests
  queued after a read EOF still run (``printf ... | socat`` scripts work);
  after a write failure they are dropped.
- A handler exception never takes the server down: `CommandError` keeps its
  class, other `NBDBackupError` and `OSError` become ``GenericError`` with
  their message, anything else is logged with its traceback and becomes
  ``GenericError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .. import __version__
from ..errors import ConfigError, NBDBackupError
from ..nbd.logsafe import clip
from ..sockets import DEAD_PEER_TIMEOUT, prepare_unix_socket, set_dead_peer_timeout
from . import framing, schema
from .remote import FULL, Access
from .schema import CommandError, Struct

__all__ = ["QMPServer", "CommandError", "Handler"]

log = logging.getLogger(__name__)

#: Requests read ahead of the one running, per client.
MAX_QUEUED = 8
#: Messages waiting to be written to one client before it is dropped as stuck.
MAX_OUTPUT_BACKLOG = 10_000
#: Bytes read per socket read.
READ_CHUNK = 64 * 1024
#: Seconds a TCP client has to complete its TLS handshake.
TLS_HANDSHAKE_TIMEOUT = 10.0
#: Remote (TCP) control connections at once: in the TLS handshake or in a session.
MAX_REMOTE_CLIENTS = 32
#: Sessions on the Unix control socket(s) at once (see "Local admission").
MAX_LOCAL_CLIENTS = 64
#: Admission warnings (evictions, refusals at the cap) logged per `_LOG_PERIOD` s.
_LOG_BUDGET = 10
_LOG_PERIOD = 2.0

Handler = Callable[..., Awaitable[Any]]

_USE_TABLE = object()


def _version_triple(version: str) -> dict:
    parts = [int(p) if p.isdigit() else 0 for p in version.split(".")[:3]]
    parts += [0] * (3 - len(parts))
    return {"major": parts[0], "minor": parts[1], "micro": parts[2]}


@dataclass(frozen=True, slots=True)
class _Command:
    name: str
    handler: Handler
    args: Struct


class QMPServer:
    """A QMP server: a command registry plus a Unix-socket listener and any TCP+TLS ones.

    Typical use (the ``serve`` command)::

        server = QMPServer()
        server.register("query-jobs", engine.query_jobs)   # schema from schema.COMMANDS
        await server.start(path)
        ...
        server.emit("JOB_STATUS_CHANGE", {"id": "j0", "status": "running"})
        ...
        await server.close()
    """

    def __init__(self, *, version: str = __version__, package: str | None = None,
                 dead_peer_timeout: float = DEAD_PEER_TIMEOUT) -> None:
        #: TCP keepalive / user timeout of every accepted remote connection
        #: (`sockets.set_dead_peer_timeout`; ``serve --dead-peer-timeout``).
        self.dead_peer_timeout = dead_peer_timeout
        #: name -> registered command (built-ins included).
        self._commands: dict[str, _Command] = {}
        #: Live client sessions.
        self._sessions: set[_Session] = set()
        self._server: asyncio.base_events.Server | None = None  # the Unix listener
        #: TCP+TLS listeners (`start_tcp`).
        self._tcp_servers: list[_TCPListener] = []
        #: Remote connections holding a slot, oldest first (see "Remote admission").
        self._remote: list[_RemoteSlot] = []
        #: Sessions on the Unix socket(s) (see "Local admission").
        self._local = 0
        #: (start of the current log period, admission warnings logged in it).
        self._admission_log = (0.0, 0)
        self._path: str | None = None
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound
        self.version = {"qemu": _version_triple(version), "package": package or f"nbdbackup {version}"}
        self.register("query-commands", self._query_commands)
        self.register("query-version", self._query_version)

    # -- registry ---------------------------------------------------------

    def register(self, name: str, handler: Handler, *, args: Struct | dict | None | object = _USE_TABLE) -> None:
        """Register ``async def handler(**kwargs)`` for command NAME.

        ``args`` is the argument schema: a `schema.Struct`, a dict for
        `schema.struct`, None for "no arguments"; omitted, the schema comes
        from `schema.COMMANDS` (no arguments if NAME is not in the table).
        Handler keywords are the member names with ``-`` -> ``_``; absent
        optional members are not passed.  Re-registering replaces.
        """
        if name == "qmp_capabilities":
            raise ValueError("qmp_capabilities is built into the server")
        if args is _USE_TABLE:
            args = schema.COMMANDS.get(name, schema.NO_ARGS)
        elif args is None:
            args = schema.NO_ARGS
        elif isinstance(args, dict):
            args = schema.struct(args)
        assert isinstance(args, Struct)
        if not inspect.iscoroutinefunction(handler) and not inspect.iscoroutinefunction(getattr(handler, "__call__", None)):
            raise TypeError(f"handler for {name} must be an async function")
        _check_signature(name, handler, args)
        self._commands[name] = _Command(name, handler, args)

    def unregister(self, name: str) -> None:
        self._commands.pop(name, None)

    @property
    def commands(self) -> list[str]:
        """Names of the commands clients can execute (``qmp_capabilities`` included)."""
        return ["qmp_capabilities", *self._commands]

    async def _query_commands(self) -> list:
        return [{"name": n} for n in self.commands]

    async def _query_version(self) -> dict:
        return self.version

    # -- events -----------------------------------------------------------

    def emit(self, event: str, data: dict | None = None) -> None:
        """Send an event to every negotiated client now (never blocks, never raises).

        Call it from the event loop's thread (from another thread use
        ``loop.call_soon_threadsafe(server.emit, event, data)``).
        """
        try:
            msg = framing.encode(framing.event_message(event, data, time.time()))
        except (TypeError, ValueError):
            log.exception("event %s has data that is not JSON: %r", event, data)
            return
        for session in list(self._sessions):
            if session.negotiated:
                session.send(msg)

    # -- listener ---------------------------------------------------------

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def client_count(self) -> int:
        return len(self._sessions)

    async def start(self, path: str | os.PathLike) -> None:
        """Listen on the Unix socket PATH (mode 0600); a stale socket file is replaced.

        Raises `ConfigError` if PATH is in use by a live server, is not a
        socket, or cannot be bound.
        """
        assert self._server is None, "already started"
        path = os.fspath(path)
        prepare_unix_socket(path, "control socket")
        try:
            self._server = await asyncio.start_unix_server(self._on_connect, path=path)
        except OSError as e:
            raise ConfigError(f"control socket {path}: cannot listen: {e.strerror or e}") from e
        os.chmod(path, 0o600)
        st = os.stat(path)
        self._path = path
        self._inode = (st.st_dev, st.st_ino)
        log.info("control socket listening on %s", path)

    async def start_socket(self, sock: socket.socket) -> None:
        """Listen on an already listening AF_UNIX stream socket (systemd socket
        activation with FileDescriptorName=control).  Its mode and path are
        the socket unit's business: no chmod, and `close` does not unlink it."""
        assert self._server is None, "already started"
        if sock.family != socket.AF_UNIX:
            raise ConfigError("control socket: the passed socket is not a Unix socket")
        self._server = await asyncio.start_unix_server(self._on_connect, sock=sock)
        log.info("control socket listening on passed socket %r", sock.getsockname())

    async def start_tcp(self, host: str, port: int, ssl_context, authorize: Callable[[dict | None], Access]) -> int:
        """Listen on TCP HOST:PORT with TLS from the first byte; returns the bound port.

        ``ssl_context`` must require a client certificate; after the handshake
        ``authorize(peercert)`` gives the session's `Access`.  Raises OSError
        if the address cannot be bound.  May be called several times, with or
        without a Unix listener.
        """
        loop = asyncio.get_running_loop()
        socks = []
        try:
            for family, _, _, _, addr in {i[4]: i for i in await loop.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}.values():
                sock = socket.socket(family, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr[0], port, *addr[2:]))
                sock.listen(128)
                sock.setblocking(False)
                port = port or sock.getsockname()[1]  # port 0: the other addresses take the first one's
        except BaseException:
            for sock in socks:
                sock.close()
            raise
        srv = _TCPListener(socks, [asyncio.create_task(self._accept_loop(sock, ssl_context, authorize))
                                   for sock in socks])
        self._tcp_servers.append(srv)
        bound = socks[0].getsockname()[1] if socks else port
        log.info("control listening on tcp %s:%s (TLS, client certificates required)", host, bound)
        return bound

    async def close(self) -> None:
        """Stop listening, disconnect every client, remove the socket file
        (only one `start` created)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tcp, self._tcp_servers = self._tcp_servers, []
        for srv in tcp:
            srv.close()
        for session in list(self._sessions):
            session.abort()
        tasks = [s.task for s in self._sessions if s.task is not None]
        tasks += [slot.task for slot in self._remote if slot.task is not None and slot.session is None]
        for srv in tcp:
            tasks += srv.tasks
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for srv in [server, *tcp]:
            if srv is not None:
                with contextlib.suppress(Exception):
                    await srv.wait_closed()
        if self._path is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self._path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self._path)
            self._path = None

    async def __aenter__(self) -> "QMPServer":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def _warn_admission(self, msg: str, *args) -> None:
        """An eviction or refusal: at most `_LOG_BUDGET` per `_LOG_PERIOD` s."""
        now = time.monotonic()
        start, n = self._admission_log
        if now - start > _LOG_PERIOD:
            start, n = now, 0
        if n < _LOG_BUDGET:
            log.warning(msg, *args)
        self._admission_log = (start, n + 1)

    def _make_room(self, peer) -> bool:
        """Room for one more remote connection (evicting the oldest one
        without earned access at the cap); False if every slot is admitted."""
        if len(self._remote) < MAX_REMOTE_CLIENTS:
            return True
        victim = next((slot for slot in self._remote if not slot.admitted), None)
        if victim is None:
            self._warn_admission("control client %s refused: %d admitted remote sessions already",
                                 peer, len(self._remote))
            return False
        self._warn_admission("control client %s evicted (not authenticated or not authorized; "
                             "%d remote connections) for a new one from %s", victim.peer, len(self._remote), peer)
        victim.evict()
        self._remote.remove(victim)
        return True

    async def _accept_loop(self, sock: socket.socket, ssl_context,
                           authorize: Callable[[dict | None], Access]) -> None:
        """Accept remote connections on SOCK: a slot each (see "Remote
        admission"), then `_serve_remote`; runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE and the like: try again later
                self._warn_admission("control listener: cannot accept: %s", e.strerror or e)
                await asyncio.sleep(1.0)
                continue
            if not self._make_room(peer):
                conn.close()
                continue
            set_dead_peer_timeout(conn, self.dead_peer_timeout)  # a controller on a dead link: its session ends
            try:
                slot = _RemoteSlot(peer, conn)
            except OSError as e:  # no descriptor for its duplicate (evicted ones are still closing)
                conn.close()
                self._warn_admission("control client %s refused: %s", peer, e.strerror or e)
                await asyncio.sleep(0.05)
                continue
            self._remote.append(slot)
            slot.task = asyncio.create_task(self._serve_remote(slot, ssl_context, authorize))

    async def _serve_remote(self, slot: "_RemoteSlot", ssl_context,
                            authorize: Callable[[dict | None], Access]) -> None:
        """The TLS handshake of one accepted connection, then an ordinary
        session with the access its certificate earned."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            try:
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, slot.sock, ssl=ssl_context, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - SSLError, timeout, reset; an evicted one may end in anything
                if not slot.evicted:
                    log.info("control client %s: TLS handshake failed: %s", slot.peer,
                             clip(str(e) or type(e).__name__, 200))
                return
            if slot.evicted:
                transport.abort()
                return
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await self._on_connect(reader, writer, authorize=authorize, slot=slot)
        finally:
            slot.release()
            if slot in self._remote:
                self._remote.remove(slot)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                          authorize: Callable[[dict | None], Access] | None = None,
                          slot: "_RemoteSlot | None" = None) -> None:
        access = FULL
        if slot is None:
            if self._local >= MAX_LOCAL_CLIENTS:
                self._warn_admission("control client refused on the Unix socket: %d sessions already",
                                     self._local)
                with contextlib.suppress(Exception):
                    writer.write(framing.encode(framing.reply_error(
                        "GenericError", f"too many control connections ({MAX_LOCAL_CLIENTS}); "
                        "close some and retry")))
                    writer.close()
                return
        if authorize is not None:
            access = authorize(writer.get_extra_info("peercert"))
            peer = writer.get_extra_info("peername")
            if access.level == "none":
                log.warning("control client %s refused: %s", peer, access.reason)
            else:
                log.info("control client %s: %s, %s access", peer, access.who, access.level)
        session = _Session(self, reader, writer, access)
        if slot is not None:
            slot.session = session
            slot.admitted = access.level != "none"
        session.task = asyncio.current_task()
        self._sessions.add(session)
        if slot is None:
            self._local += 1
        try:
            await session.run()
        except asyncio.CancelledError:
            pass
        except Exception:  # pragma: no cover - a bug; keep the server up
            log.exception("control client session failed")
        finally:
            self._sessions.discard(session)
            if slot is None:
                self._local -= 1
            session.abort()

    # -- dispatch ---------------------------------------------------------

    async def dispatch(self, session: "_Session", req: framing.Request) -> dict:
        """Run one request for SESSION; returns the reply message."""
        rid, has_id = req.id, req.has_id
        refusal = session.access.refusal(req.name)
        if refusal is not None:
            return framing.reply_error("GenericError", refusal, rid, has_id)
        if req.name == "qmp_capabilities":
            if session.negotiated:
                return framing.reply_error(
                    "CommandNotFound", "Capabilities negotiation is already complete, command ignored", rid, has_id)
            try:
                args = schema.COMMANDS["qmp_capabilities"].check(req.arguments)
            except CommandError as e:
                return framing.reply_error(e.class_, e.desc, rid, has_id)
            for cap in args.get("enable", []):
                return framing.reply_error("GenericError", f"Capability '{cap}' not available", rid, has_id)
            session.negotiated = True
            return framing.reply_return({}, rid, has_id)
        if not session.negotiated:
            return framing.reply_error(
                "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'", rid, has_id)
        cmd = self._commands.get(req.name)
        if cmd is None:
            return framing.reply_error("CommandNotFound", f"The command {req.name} has not been found", rid, has_id)
        try:
            args = cmd.args.check(req.arguments)
            result = await cmd.handler(**{k.replace("-", "_"): v for k, v in args.items()})
            reply = framing.reply_return(result, rid, has_id)
            framing.encode(reply)  # fail here, not in the writer, if not JSON-able
            return reply
        except CommandError as e:
            return framing.reply_error(e.class_, e.desc, rid, has_id)
        except NBDBackupError as e:
            return framing.reply_error("GenericError", str(e) or type(e).__name__, rid, has_id)
        except OSError as e:
            return framing.reply_error("GenericError", _oserror_text(e), rid, has_id)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return framing.reply_error("GenericError", f"command {req.name} was cancelled", rid, has_id)
        except Exception as e:
            log.exception("control command %s failed", req.name)
            return framing.reply_error("GenericError", f"internal error in {req.name}: {e or type(e).__name__}", rid, has_id)


def _oserror_text(e: OSError) -> str:
    if e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if e.errno:
        return os.strerror(e.errno)
    return str(e) or "I/O error"


def _check_signature(name: str, handler: Handler, args: Struct) -> None:
    """Fail at registration, not at first use, if HANDLER cannot take ARGS."""
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for member in args.members:
        kw = member.replace("-", "_")
        p = params.get(kw)
        if p is None or p.kind not in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            raise TypeError(f"handler for {name} does not accept keyword {kw!r}")
    for kw, p in params.items():
        if p.default is inspect.Parameter.empty and p.kind in (
                inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            member = next((m for m in args.members if m.replace("-", "_") == kw), None)
            if member is None or args.members[member][1]:
                raise TypeError(f"handler for {name}: parameter {kw!r} needs a default (optional or unknown member)")


class _TCPListener:
    """A remote control listener: its listening sockets and their accept
    tasks (`QMPServer._accept_loop`); `close` and `wait_closed` as for an
    asyncio server."""

    def __init__(self, socks: list[socket.socket], tasks: list[asyncio.Task]) -> None:
        self.socks = socks
        self.tasks = tasks

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for s in self.socks:
            s.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)


class _RemoteSlot:
    """One remote connection's place in `QMPServer._remote`.  Fields:
    ``peer`` (its address, for logs); ``sock`` (the accepted socket, handed
    to the loop's TLS handshake); ``_shut`` (a duplicate of it, ours alone:
    `evict` shuts the connection down through it at any stage, and a closed
    descriptor number can never be reused under us); ``task`` (its
    `QMPServer._serve_remote`); ``session`` (its `_Session` once the TLS
    handshake is done, else None); ``admitted`` (its certificate earned
    ``full`` or ``read`` access: never evicted); ``evicted``."""

    __slots__ = ("peer", "sock", "_shut", "task", "session", "admitted", "evicted")

    def __init__(self, peer, sock: socket.socket) -> None:
        self.peer = peer
        self.sock = sock
        self._shut: socket.socket | None = sock.dup()
        self.task: asyncio.Task | None = None
        self.session: _Session | None = None
        self.admitted = False
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True
        if self.session is not None:
            self.session.abort()
        if self._shut is not None:
            with contextlib.suppress(OSError):
                self._shut.shutdown(socket.SHUT_RDWR)  # a handshake in progress fails at once

    def release(self) -> None:
        if self._shut is not None:
            self._shut.close()
            self._shut = None


class _Session:
    """One connected client.  Fields:

    - ``negotiated``: ``qmp_capabilities`` succeeded (commands and events allowed);
    - ``access``: what this client may run (`remote.Access`; `remote.FULL` on Unix);
    - ``_requests``: parsed requests waiting for the dispatcher (bounded), None = stop;
    - ``_out``: encoded messages waiting for the writer, None = stop;
    - ``_dead``: the socket failed or was aborted -- nothing more is read,
      run or written;
    - ``task``: the connection task running `run` (cancelled by server close).
    """

    def __init__(self, server: QMPServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 access: Access = FULL) -> None:
        self.server = server
        self.access = access
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.task: asyncio.Task | None = None
        self._requests: asyncio.Queue[framing.Request | None] = asyncio.Queue(MAX_QUEUED)
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._dead = False

    def send(self, data: bytes) -> None:
        if self._dead:
            return
        if self._out.qsize() >= MAX_OUTPUT_BACKLOG:
            log.warning("control client is not reading; disconnecting it")
            self.abort()
            return
        self._out.put_nowait(data)

    def abort(self) -> None:
        if not self._dead:
            self._dead = True
            with contextlib.suppress(AttributeError):
                # asyncio's (3.11) TLS transport, closed twice, has dropped its
                # protocol and raises AttributeError here: it is closed anyway.
                self.writer.transport.abort()
        self._out.put_nowait(None)

    async def run(self) -> None:
        self.send(framing.encode({"QMP": {"version": self.server.version, "capabilities": []}}))
        writer_task = asyncio.create_task(self._write_loop(), name="qmp-writer")
        dispatch_task = asyncio.create_task(self._dispatch_loop(), name="qmp-dispatch")
        try:
            await self._read_loop()
            await self._requests.put(None)
            await dispatch_task
            self._out.put_nowait(None)
            await writer_task
        finally:
            for t in (writer_task, dispatch_task):
                t.cancel()
            await asyncio.gather(writer_task, dispatch_task, return_exceptions=True)
            self.writer.close()

    async def _read_loop(self) -> None:
        splitter = framing.JSONSplitter()
        while not self._dead:
            try:
                data = await self.reader.read(READ_CHUNK)
            except (ConnectionError, OSError):
                return
            if not data:
                return
            for item in splitter.feed(data):
                if isinstance(item, framing.ParseError):
                    self.send(framing.encode(framing.reply_error("GenericError", item.desc)))
                    continue
                try:
                    req = framing.check_request(item)
                except framing.RequestError as e:
                    self.send(framing.encode(framing.reply_error(e.class_, e.desc, e.id, e.has_id)))
                    continue
                await self._requests.put(req)
            if splitter.broken:
                self._out.put_nowait(None)  # the error reply goes out, then we hang up
                return

    async def _dispatch_loop(self) -> None:
        # Runs until the reader's None, even once dead (then dropping requests),
        # so that the reader can never block on a full queue.
        while (req := await self._requests.get()) is not None:
            if self._dead:
                continue
            reply = await self.server.dispatch(self, req)
            self.send(framing.encode(reply))

    async def _write_loop(self) -> None:
        while True:
            data = await self._out.get()
            if data is None or self._dead:
                break
            try:
                self.writer.write(data)
                await self.writer.drain()
            except (ConnectionError, OSError):
                self._dead = True
                break
        with contextlib.suppress(Exception):
            if not self._dead and self.writer.can_write_eof():
                self.writer.write_eof()
