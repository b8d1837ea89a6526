"""The asyncio NBD server: moves bytes, runs requests against block devices.

Role: owns listeners, connections and the export table.  All protocol logic
is in `nbd.protocol` (sans-IO); this module only feeds it bytes, runs the
`Request` events it yields against the export's `BlockDev`, and writes the
replies it encodes.

Data path (why it is shaped this way): each connection is an
`asyncio.BufferedProtocol`, so the kernel copies received bytes straight into
the protocol's buffer (WRITE payloads land in their own buffer, see
`ServerConnection.get_buffer`).  Every request runs as its own task, so
requests are served concurrently and answered out of order.  A reply is
written with consecutive ``transport.write`` calls and no await between them,
so replies never interleave.  Back-pressure: when the transport's send buffer
is above its high-water mark, or ``max_inflight`` requests run, the
connection neither starts the requests already parsed (they wait, a few
dozen bytes each, in the protocol's queue) nor reads from the socket, until
both drain; memory per connection is therefore bounded by ``max_inflight``
requests of at most ``MAX_PAYLOAD`` bytes, the transport's high-water mark and
one receive buffer -- even for a client that pipelines thousands of requests
and never reads a reply.

TLS (``Server(tls=ServerTLS(...))``): on the protocol's `StartTLS` event the
connection sends the ACK in clear, stops reading, and hands its transport
to ``loop.start_tls``; the TLS layer then feeds decrypted bytes back into the
same protocol object.  Decrypted bytes that arrive before ``start_tls``
returns are held unparsed (`buffer_updated`) until the upgraded transport is
in place and access control has seen the client certificate, so nothing is
parsed, answered or written in clear after the ACK.  A failed
TLS handshake closes the connection; the handshake timeout covers it.

Invariants:
- One bad client never harms another: a protocol violation closes only its
  connection (logged); a device error becomes an NBD error reply.
- CAN_MULTI_CONN is advertised only when the device says a FLUSH on one
  connection covers writes completed on every connection (one device object
  is shared by all connections of an export, so this holds for file and
  memory devices; a remote NBD device passes the remote server's promise on).
- After `remove_export`, requests on connections to it get ESHUTDOWN; after
  `shutdown` begins, new requests get ESHUTDOWN, in-flight ones finish, every
  export is flushed, then connections close.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass, field

from ..blockdev.base import BASE_ALLOCATION, BlockDev
from ..errors import ConfigError
from ..sockets import prepare_unix_socket, set_socket_access
from . import protocol as proto
from .protocol import Disconnect, ExportInfo, HandshakeDone, ProtocolViolation, Request, ServerConnection, StartTLS
from .access import AccessPolicy, peer_credentials
from .logsafe import WarningBudget, clip
from .stats import ExportStats
from .tls import ServerTLS
from .wire import Cmd, CmdFlag, StateFlag

_FUA, _DF, _NO_HOLE, _FAST_ZERO, _REQ_ONE = (int(CmdFlag.FUA), int(CmdFlag.DF), int(CmdFlag.NO_HOLE),
                                            int(CmdFlag.FAST_ZERO), int(CmdFlag.REQ_ONE))
_ZERO = int(StateFlag.ZERO)
_READ = int(Cmd.READ)

#: Decrypted bytes a client may send before our TLS upgrade completes.
_TLS_EARLY_MAX = 1024 * 1024

log = logging.getLogger("nbdbackup.server")

HOLE = int(StateFlag.HOLE)
#: Reads at least this long are split into data/hole chunks on structured
#: connections (one extents query; cheaper than sending zeroes).
SPARSE_READ_MIN = 64 * 1024


@dataclass(eq=False)
class Export:
    """One export.

    Fields: ``name``; ``dev`` (the device served; owned by the export and
    closed when the export is removed, unless ``owns_dev`` is False);
    ``read_only``; ``description``; ``inflight`` (requests running against
    ``dev`` now); ``removed`` (set once `Server.remove_export` began: new
    requests get ESHUTDOWN); ``_idle`` (set whenever ``inflight`` is 0);
    ``stats`` (`ExportStats`: requests answered, per command).
    """

    name: str
    dev: BlockDev
    read_only: bool = False
    description: str = ""
    owns_dev: bool = True
    inflight: int = 0
    removed: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    stats: ExportStats = field(default_factory=ExportStats)

    def __post_init__(self) -> None:
        self._idle.set()
        caps = self.dev.capabilities()
        self.read_only = self.read_only or caps.read_only
        self._flags = proto.transmission_flags(
            read_only=self.read_only,
            can_flush=caps.can_flush,
            can_fua=caps.can_fua,
            can_trim=caps.can_trim,
            can_zero=caps.can_zero,
            can_fast_zero=caps.can_fast_zero,
            can_cache=caps.can_cache,
            can_multi_conn=caps.can_multi_conn,
            rotational=caps.rotational,
        )
        bs = caps.block_size
        self._block_size = (bs.minimum, bs.preferred, bs.maximum)
        self.can_extents = caps.can_extents

    def info(self) -> ExportInfo:
        """What the handshake advertises (meta contexts are read live)."""
        return ExportInfo(
            name=self.name,
            size=self.dev.size,
            flags=self._flags,
            block_size=self._block_size,
            description=self.description,
            meta_contexts=tuple(self.dev.meta_contexts()),
        )

    def begin(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def end(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class Server:
    """An NBD server with a mutable export table.

    Fields: ``exports`` (name -> Export, in insertion order: the first is the
    default export for an empty name); ``connections`` (live
    `NBDConnection`s); ``_servers`` (asyncio listeners); ``_unix_paths``
    (socket files `start_unix` created, unlinked at `shutdown`; sockets
    passed by systemd are not in it); ``stopping`` (set by
    `shutdown`); limits ``max_connections``, ``handshake_timeout``,
    ``max_inflight``; ``read_pool`` (free read buffers by size); ``tls``
    (a `ServerTLS`, mode "off" without one) and ``tls_context`` (built once,
    at construction, so bad credentials fail at start); ``access`` (an
    `AccessPolicy`, checked on Unix connections and after TLS).
    """

    def __init__(self, *, max_connections: int = 256, handshake_timeout: float = 10.0,
                 max_inflight: int = 64, tls: ServerTLS | None = None,
                 access: AccessPolicy | None = None) -> None:
        self.access = access if access is not None else AccessPolicy()
        self.tls = tls if tls is not None else ServerTLS("off")
        self.tls_context: ssl.SSLContext | None = self.tls.context() if self.tls.enabled else None
        self.exports: dict[str, Export] = {}
        self.connections: set[NBDConnection] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._unix_paths: list[str] = []
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.max_inflight = max_inflight
        self.stopping = False
        #: size -> free read buffers, shared by all connections so a new
        #: connection does not fault in a pool of its own.
        self.read_pool: dict[int, list[bytearray]] = {}

    # ----------------------------------------------------------- exports

    def add_export(self, name: str, dev: BlockDev, *, read_only: bool = False,
                   description: str = "", owns_dev: bool = True) -> Export:
        if name in self.exports:
            raise ConfigError(f"export {name!r} already exists")
        if len(name.encode()) > 4096:
            raise ConfigError("export name longer than 4096 bytes")
        exp = Export(name, dev, read_only=read_only, description=description, owns_dev=owns_dev)
        self.exports[name] = exp
        log.info("export %r added: %d bytes%s", name, dev.size, " read-only" if exp.read_only else "")
        return exp

    def get(self, name: str) -> Export | None:
        """The export called ``name``, or None (`ExportTable` protocol)."""
        return self.exports.get(name)

    def require(self, name: str) -> Export:
        exp = self.exports.get(name)
        if exp is None:
            raise ConfigError(f"no export named {name!r}")
        return exp

    def add(self, name: str, dev: BlockDev, read_only: bool = True, description: str = "") -> Export:
        """`ExportTable` protocol form of `add_export` (used by the backup engine)."""
        return self.add_export(name, dev, read_only=read_only, description=description)

    async def remove(self, name: str) -> None:
        await self.remove_export(name)

    async def remove_export(self, name: str) -> None:
        """Remove an export: its connections get ESHUTDOWN from now on."""
        exp = self.require(name)
        exp.removed = True
        del self.exports[name]
        await exp.wait_idle()
        if exp.owns_dev:
            await exp.dev.close()
        log.info("export %r removed", name)

    def _lookup(self, name: str) -> ExportInfo | None:
        exp = self.exports.get(name)
        return exp.info() if exp else None

    def _list(self) -> list[ExportInfo]:
        return [e.info() for e in self.exports.values()]

    def export_for(self, name: str) -> Export | None:
        exp = self.exports.get(name)
        if exp is None and name == "" and self.exports:
            exp = next(iter(self.exports.values()))
        return exp

    # --------------------------------------------------------- listeners

    def _factory(self) -> "NBDConnection":
        return NBDConnection(self)

    async def start_unix(self, path: str, mode: int | None = None, gid: int | None = None) -> None:
        """Listen on the Unix socket ``path``; ``mode``/``gid``: see `sockets.set_socket_access`."""
        prepare_unix_socket(path, "NBD socket")
        srv = await asyncio.get_running_loop().create_unix_server(self._factory, path, backlog=128)
        self._servers.append(srv)
        self._unix_paths.append(path)
        set_socket_access(path, mode, gid, "NBD socket")
        log.info("listening on unix:%s", path)

    async def start_socket(self, sock: socket.socket) -> None:
        """Serve on an already listening stream socket (systemd socket
        activation, `nbdbackup.systemd.listening_socket`): AF_UNIX, AF_INET or
        AF_INET6.  Its path is not ours: `shutdown` closes it but never
        unlinks it.  The event loop calls listen() again: the backlog given
        is SOMAXCONN so systemd's Backlog= (capped by the kernel's
        somaxconn) is not lowered."""
        loop = asyncio.get_running_loop()
        if sock.family == socket.AF_UNIX:
            srv = await loop.create_unix_server(self._factory, sock=sock, backlog=socket.SOMAXCONN)
        else:
            srv = await loop.create_server(self._factory, sock=sock, backlog=socket.SOMAXCONN)
        self._servers.append(srv)
        log.info("listening on passed socket %r", sock.getsockname())

    async def start_tcp(self, host: str, port: int) -> int:
        srv = await asyncio.get_running_loop().create_server(
            self._factory, host, port, backlog=128, reuse_address=True
        )
        self._servers.append(srv)
        bound = srv.sockets[0].getsockname()[1]
        log.info("listening on tcp:%s:%d", host, bound)
        return bound

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish in-flight requests, flush, close everything."""
        if self.stopping:
            return
        self.stopping = True
        for srv in self._servers:
            srv.close()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        conns = list(self.connections)
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.drain_requests()) for c in conns], timeout=timeout)
        for exp in list(self.exports.values()):
            if not exp.read_only:
                try:
                    await exp.dev.flush()
                except OSError as e:
                    log.error("flush of export %r at shutdown failed: %s", exp.name, e)
        for c in conns:
            c.close("server shutting down")
        for srv in self._servers:
            await srv.wait_closed()
        for exp in list(self.exports.values()):
            if exp.owns_dev:
                await exp.dev.close()
        self.exports.clear()


class NBDConnection(asyncio.BufferedProtocol):
    """One client connection.

    Fields: ``server``; ``proto`` (the sans-IO state); ``transport``;
    ``export`` (after the handshake); ``tasks`` (request tasks running);
    ``peer`` (for logs); ``_paused_writing`` (transport above high water);
    ``_reading_paused``; ``_closing``; ``_idle`` (set when no task runs);
    ``_handshake_timer``; ``_tls_upgrading`` (between the STARTTLS ACK and
    the upgraded transport: received bytes are held, reading is left alone);
    ``_warnings`` (a `WarningBudget`: the warnings this connection may still
    log; the rest are counted and summarised when it closes).
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.proto = ServerConnection(server._lookup, server._list, tls=server.tls.mode)
        self._tls_upgrading = False
        #: Decrypted bytes that arrived before the upgrade finished (see `buffer_updated`).
        self._tls_early = bytearray()
        #: Receive buffer for those bytes (allocated at STARTTLS only).
        self._tls_stage = memoryview(b"")
        self.transport: asyncio.Transport | None = None
        self.export: Export | None = None
        self.tasks: set[asyncio.Task] = set()
        self.peer = "?"
        self._warnings = WarningBudget()
        #: Small replies waiting to go out in one write at the end of this
        #: loop iteration (``_flush_soon`` scheduled while non-empty).
        self._wbuf: list[bytes] = []
        self._paused_writing = False
        self._reading_paused = False
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._drain_waiters: list[asyncio.Future] = []
        #: Free read buffers, shared by the server's connections (see `_get_buf`).
        self._pool = server.read_pool
        #: Buffers written while the send buffer was not empty.
        self._pending_bufs: list[bytearray] = []
        self._writev = False

    # ------------------------------------------------------ asyncio hooks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if self.server.stopping or len(self.server.connections) >= self.server.max_connections:
            log.warning("connection from %s refused: %s", self.peer,
                        "server stopping" if self.server.stopping else "too many connections")
            transport.abort()
            return
        self.server.connections.add(self)
        transport.set_write_buffer_limits(high=4 * 1024 * 1024, low=1024 * 1024)
        # uvloop's writelines is one writev; asyncio's (3.11) joins, i.e. copies.
        self._writev = type(transport).__module__.startswith("uvloop")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # The default buffers (~208 KiB on Unix sockets) are smaller than
            # one 256 KiB request or reply: every large reply became a partial
            # send plus an epoll round trip (and read buffers could not be
            # recycled), every large WRITE payload several receives.
            # Measured: +15-70% on reads; -19% CPU per GiB written.
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
                except OSError:
                    pass
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if sock is not None and sock.family == socket.AF_UNIX and self.server.access.limits_unix:
            creds = peer_credentials(sock)
            why = self.server.access.check_unix(creds)
            if creds is not None:
                self.peer = f"unix pid {creds[0]} uid {creds[1]}"
            if why is not None:
                self._warn("connection %s refused: %s", self.peer, why)
                self.proto.deny(why)
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self.server.handshake_timeout, self._handshake_timeout
        )
        self._flush_handshake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._handshake_timer:
            self._handshake_timer.cancel()
        self._closing = True
        self.proto.close()
        for f in self._drain_waiters:
            if not f.done():
                f.set_result(None)
        log.info("connection %s closed (%s)", self.peer,
                 f"export {self.export.name!r}" if self.export else "during handshake")
        dropped = self._warnings.summary()
        if dropped:
            log.warning("connection %s: %s", self.peer, dropped)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._tls_upgrading:
            return self._tls_stage  # decrypted bytes before the upgrade is complete
        return self.proto.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._tls_upgrading:
            # Kept unparsed until the TLS transport is in place and the
            # client certificate has passed access control.
            self._tls_early += self._tls_stage[:nbytes]
            if len(self._tls_early) > _TLS_EARLY_MAX:
                self._warn("connection %s: too much data during the TLS upgrade; closing", self.peer)
                self.close("flood during the TLS upgrade")
            return
        self.proto.buffer_updated(nbytes)
        self._process_events()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def pause_writing(self) -> None:
        self._paused_writing = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self.proto.has_events and not self._closing:
            self._process_events()
        self._update_reading()

    # ----------------------------------------------------------- helpers

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or self._closing or self._tls_upgrading:
            return
        want_pause = (self._paused_writing or len(self.tasks) >= self.server.max_inflight
                      or self.proto.has_events)
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            t.pause_reading()
        elif not want_pause and self._reading_paused:
            self._reading_paused = False
            t.resume_reading()

    def _warn(self, msg: str, *args) -> None:
        """A warning caused by this client: logged while its `WarningBudget`
        lasts, then only counted (a client must not be able to flood the log).
        Client-supplied text in ``args`` must already be `clip`-ped."""
        if self._warnings.allow():
            log.warning(msg, *args)

    def _handshake_timeout(self) -> None:
        if not self.proto.in_transmission and not self._closing:
            self._warn("connection %s: handshake timed out", self.peer)
            self.close("handshake timeout")

    def _flush_handshake(self) -> None:
        data = self.proto.data_to_send()
        if data and self.transport and not self._closing:
            self.transport.write(data)

    def close(self, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self.proto.close()
        if self.transport:
            self.transport.close()

    def _process_events(self) -> None:
        proto_ = self.proto
        while True:
            # Bound: at most max_inflight requests run; the rest stay parsed
            # (small) in the protocol's queue until a task finishes, and the
            # socket stays paused meanwhile (`_update_reading`).
            if len(self.tasks) >= self.server.max_inflight or self._paused_writing:
                break
            ev = proto_.next_event()
            if ev is None:
                break
            if isinstance(ev, Request):
                self._start(ev)
            elif isinstance(ev, HandshakeDone):
                if self._handshake_timer:
                    self._handshake_timer.cancel()
                    self._handshake_timer = None
                self._flush_handshake()
                self.export = self.server.export_for(ev.export.name)
                log.info("connection %s: export %r, %s replies, contexts %s%s", self.peer, ev.export.name,
                         "structured" if ev.structured else "simple", list(ev.contexts.values()) or "none",
                         ", TLS" if self.proto.tls_active else "")
            elif isinstance(ev, StartTLS):
                self._flush_handshake()  # the ACK, in clear
                assert self.transport is not None
                self.transport.pause_reading()  # the ClientHello is for the TLS layer
                self._tls_stage = memoryview(bytearray(64 * 1024))
                self._tls_upgrading = True
                asyncio.ensure_future(self._start_tls())
                return
            elif isinstance(ev, Disconnect):
                self._flush_handshake()
                asyncio.ensure_future(self._close_when_idle(ev.reason))
                break
            elif isinstance(ev, ProtocolViolation):
                self._flush_handshake()
                # Client strings inside the message were clipped where it was made.
                self._warn("connection %s: protocol error: %s; closing", self.peer, ev.message)
                asyncio.ensure_future(self._close_when_idle(ev.message))
                break
        self._flush_handshake()

    async def _start_tls(self) -> None:
        raw = self.transport
        assert raw is not None and self.server.tls_context is not None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(raw, self, self.server.tls_context, server_side=True,
                                       ssl_handshake_timeout=self.server.handshake_timeout)
        except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as e:
            self._warn("connection %s: TLS handshake failed: %s; closing", self.peer, clip(str(e), 200))
            self._tls_upgrading = False
            self._closing = True
            self.proto.close()
            raw.abort()
            return
        if new is None or self._closing:
            return
        self.transport = new  # type: ignore[assignment]
        new.set_write_buffer_limits(high=4 * 1024 * 1024, low=1024 * 1024)
        self._writev = type(new).__module__.startswith("uvloop")
        self._reading_paused = False
        self._tls_upgrading = False
        log.info("connection %s: TLS %s, %s", self.peer, new.get_extra_info("ssl_object").version(),
                 new.get_extra_info("cipher", ("?",))[0])
        why = self.server.access.check_certificate(new.get_extra_info("peercert"))
        if why is not None:
            self._warn("connection %s refused: %s", self.peer, why)
            self.proto.deny(why)
        self._tls_stage = memoryview(b"")
        if self._tls_early:
            early, self._tls_early = bytes(self._tls_early), bytearray()
            self.proto.receive_data(early)
        self._flush_handshake()
        self._process_events()
        self._update_reading()

    async def _close_when_idle(self, reason: str) -> None:
        await self.drain_requests()
        self.close(reason)

    async def drain_requests(self) -> None:
        while self.tasks:
            await asyncio.wait(list(self.tasks))

    def _start(self, req: Request) -> None:
        if req.cmd == Cmd.READ and self._read_now(req):
            return
        task = asyncio.ensure_future(self._handle(req))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        self._update_reading()

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if self.proto.has_events and not self._closing:
            self._process_events()
        self._update_reading()

    def _read_now(self, req: Request) -> bool:
        """Answer a valid READ at once, without a task, when the device has
        the data at hand (`BlockDev.pread_now`: page cache, RAM).

        Same replies as `_read`: a structured read that may contain holes
        (`extents_now` says so, or cannot say) takes the normal path, which
        sends OFFSET_HOLE chunks.  False: nothing was sent; use the task path.
        """
        exp = self.export
        if req.error or exp is None or exp.removed or self.server.stopping or req.length == 0:
            return False
        dev = exp.dev
        offset, length = req.offset, req.length
        p = self.proto
        if (p.structured and not req.flags & _DF and exp.can_extents
                and length >= SPARSE_READ_MIN):
            extents = dev.extents_now(offset, length, BASE_ALLOCATION)
            if extents is None or sum(e.length for e in extents) < length or any(
                    e.flags & HOLE and e.flags & _ZERO for e in extents):
                return False
        t0 = time.perf_counter_ns()
        buf = self._get_buf(length)
        try:
            done = dev.pread_now(memoryview(buf), offset)
        except OSError:
            done = False  # the task path reports the error properly
        if not done:
            if len(buf) >= 16 * 1024:
                self._free_buf(buf)
            return False
        self._write(p.read_header(req.cookie, offset, length), buf)
        self._put_buf(buf)
        exp.stats.record(_READ, length, True, time.perf_counter_ns() - t0)
        return True

    def _get_buf(self, n: int) -> bytearray:
        if self._pending_bufs and self.transport is not None and not self.transport.get_write_buffer_size():
            for b in self._pending_bufs:
                self._free_buf(b)
            self._pending_bufs.clear()
        free = self._pool.get(n)
        if free:
            return free.pop()
        return bytearray(n)

    def _put_buf(self, buf: bytearray) -> None:
        """Recycle a read buffer once no transport can still hold it.

        Zero-filling a fresh buffer for every read cost a third of the read
        path.  A transport that could not send everything at once may keep a
        reference to the caller's buffer (uvloop, Python >= 3.12), so a buffer
        written while the send buffer was not empty waits in
        ``_pending_bufs`` until the send buffer is empty again, i.e. until
        every byte of it went to the kernel.
        """
        if len(buf) < 16 * 1024 or self.transport is None:
            return
        if self.transport.get_write_buffer_size():
            if len(self._pending_bufs) < 64:
                self._pending_bufs.append(buf)
        else:
            self._free_buf(buf)

    def _free_buf(self, buf: bytearray) -> None:
        free = self._pool.setdefault(len(buf), [])
        if len(free) < 64:
            free.append(buf)

    def _write(self, *parts) -> None:
        """Queue one whole reply.  Small replies are batched into one send."""
        t = self.transport
        if t is None or self._closing or t.is_closing():
            return
        # Batch small replies (parts under 16 KiB are never recycled buffers,
        # see `_put_buf`, so holding them until the flush is safe).
        if all(len(p) < 16 * 1024 for p in parts):
            if not self._wbuf:
                asyncio.get_running_loop().call_soon(self._flush_wbuf)
            self._wbuf.extend(parts)
            return
        self._flush_wbuf()
        if self._writev:
            t.writelines(parts)
        else:
            for p in parts:
                t.write(p)

    def _flush_wbuf(self) -> None:
        if not self._wbuf:
            return
        data = self._wbuf[0] if len(self._wbuf) == 1 else b"".join(self._wbuf)
        self._wbuf.clear()
        t = self.transport
        if t is not None and not self._closing and not t.is_closing():
            t.write(data)

    # ---------------------------------------------------------- requests

    async def _handle(self, req: Request) -> None:
        p = self.proto
        exp = self.export
        if req.error:
            if exp is not None:
                exp.stats.invalid += 1
            self._write(p.reply_error(req.cookie, req.error, req.message))
            return
        if exp is None or exp.removed or self.server.stopping:
            self._write(p.reply_error(req.cookie, errno.ESHUTDOWN, "export is shutting down"))
            return
        exp.begin()
        t0 = time.perf_counter_ns()
        ok = False
        try:
            await self._run(req, exp)
            ok = True
        except OSError as e:
            err = e.errno or errno.EIO
            if err not in (errno.ENOSPC, errno.EINVAL, errno.EPERM, errno.ENOTSUP, errno.ESHUTDOWN):
                self._warn("export %r: %s at (%d, %d) failed: %s", exp.name,
                           _cmd_name(req.cmd), req.offset, req.length, e)
            self._write(p.reply_error(req.cookie, err, e.strerror or str(e)))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: answer EIO, keep serving
            if self._warnings.allow():
                log.exception("export %r: internal error in %s", exp.name, _cmd_name(req.cmd))
            self._write(p.reply_error(req.cookie, errno.EIO, f"internal error: {e}"))
        finally:
            exp.stats.record(req.cmd, req.length, ok, time.perf_counter_ns() - t0)
            exp.end()
            if req.payload is not None:
                self.proto.release(req.payload)

    async def _run(self, req: Request, exp: Export) -> None:
        p = self.proto
        dev = exp.dev
        cmd = req.cmd
        fua = bool(req.flags & _FUA)
        if cmd == Cmd.READ:
            await self._read(req, exp)
            return
        if req.length == 0 and cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM, Cmd.CACHE):
            if fua:
                await dev.flush()
            self._write(p.reply_ok(req.cookie))
            return
        if cmd == Cmd.WRITE:
            assert req.payload is not None
            await dev.pwrite(req.payload, req.offset, fua=fua)
        elif cmd == Cmd.FLUSH:
            await dev.flush()
        elif cmd == Cmd.WRITE_ZEROES:
            await dev.zero(req.offset, req.length, may_trim=not req.flags & _NO_HOLE,
                           fua=fua, fast=bool(req.flags & _FAST_ZERO))
        elif cmd == Cmd.TRIM:
            await dev.trim(req.offset, req.length, fua=fua)
        elif cmd == Cmd.CACHE:
            await dev.cache(req.offset, req.length)
        elif cmd == Cmd.BLOCK_STATUS:
            await self._block_status(req, exp)
            return
        else:  # validated by the protocol layer
            raise OSError(errno.EINVAL, f"command {cmd} not supported")
        self._write(p.reply_ok(req.cookie))

    async def _read(self, req: Request, exp: Export) -> None:
        p = self.proto
        dev = exp.dev
        offset, length = req.offset, req.length
        if length == 0:
            self._write(p.reply_ok(req.cookie))
            return
        if (p.structured and not req.flags & _DF and exp.can_extents
                and length >= SPARSE_READ_MIN):
            extents = await _extents_covering(dev, offset, length, BASE_ALLOCATION)
            if any(e.flags & HOLE and e.flags & _ZERO for e in extents):
                await self._sparse_read(req, dev, extents)
                return
        buf = self._get_buf(length)
        try:
            await dev.pread(memoryview(buf), offset)
        except BaseException:
            self._put_buf(buf)
            raise
        self._write(p.read_header(req.cookie, offset, length), buf)
        self._put_buf(buf)

    async def _sparse_read(self, req: Request, dev: BlockDev, extents) -> None:
        """Structured read: OFFSET_HOLE for zero holes, OFFSET_DATA for the rest."""
        p = self.proto
        chunks: list = []
        for e in extents:
            if e.flags & HOLE and e.flags & _ZERO:
                chunks.append((e.offset, e.length, None))
            else:
                buf = bytearray(e.length)
                await dev.pread(memoryview(buf), e.offset)
                chunks.append((e.offset, e.length, buf))
        parts = []
        for i, (off, n, buf) in enumerate(chunks):
            last = i == len(chunks) - 1
            if buf is None:
                parts.append(p.read_hole(req.cookie, off, n, done=last))
            else:
                parts.append(p.read_header(req.cookie, off, n, done=last))
                parts.append(buf)
        self._write(*parts)

    async def _block_status(self, req: Request, exp: Export) -> None:
        p = self.proto
        one = bool(req.flags & _REQ_ONE)
        chunks = []
        for cid, ctx in self.proto.contexts.items():
            extents = await exp.dev.extents(req.offset, req.length, ctx)
            descs: list[tuple[int, int]] = []
            end = req.offset + req.length
            for e in extents:
                n = min(e.end, end) - e.offset
                if n <= 0:
                    break
                descs.append((n, e.flags))
                if one:
                    break
            if not descs:
                raise OSError(errno.EIO, f"device returned no extents for {ctx}")
            chunks.append((cid, descs))
        self._write(p.reply_block_status(req.cookie, chunks))


async def _extents_covering(dev: BlockDev, offset: int, length: int, ctx: str):
    """Extents covering all of ``(offset, length)`` (asking again after short answers)."""
    out = []
    end = offset + length
    pos = offset
    while pos < end:
        got = await dev.extents(pos, end - pos, ctx)
        if not got:
            raise OSError(errno.EIO, "device returned no extents")
        for e in got:
            if e.offset >= end:
                break
            if e.end > end:
                e = type(e)(e.offset, end - e.offset, e.flags)
            out.append(e)
            pos = e.end
    return out


def _cmd_name(cmd: int) -> str:
    try:
        return Cmd(cmd).name
    except ValueError:
        return f"command {cmd}"
