"""Asyncio NBD client: moves bytes between a socket and `client_protocol`.

Role: `connect` opens one connection to an export (``nbd://`` or
``nbd+unix://``), runs the sans-IO `Handshake`, and returns a `Client` whose
methods send requests and await their replies.  `list_exports` and
`list_meta_contexts` run a handshake that ends with OPT_ABORT.

Design (after qemu.qmp's protocol base):
- One `asyncio.BufferedProtocol` per connection is the only reader: the
  transport receives straight into the buffers `Transmission.get_buffer`
  hands out, so READ payloads land in the caller's memory with no copy.
- Writes are serialised: a request is written whole (header, then payload)
  synchronously, so requests never interleave on the wire.  Small requests
  are corked: those issued in one loop iteration leave in one ``send``
  (`_Conn.write_corked`).  WRITE requests wait for ``resume_writing`` when
  the transport buffer is full.  With asyncio's transports a WRITE payload
  is copied if it cannot be sent at once; other transports (uvloop) may
  keep a reference until sent, which matters only if a WRITE is cancelled
  and its buffer reused before the bytes left.
- Requests in flight are bounded (``max_in_flight``, `_Slots`); each has a
  future in ``_Conn.futures`` keyed by cookie.  An abandoned request (see
  below) keeps its slot until its reply arrives or the connection dies:
  callers that time out against a stuck server cannot pile up requests on
  it without bound.
- Errors: a server error reply raises `OSError(errno)` for that request only;
  a dead connection fails every pending request with `ConnectionClosed`; a
  protocol violation by the server fails them with `RemoteProtocolError` and
  closes the connection.  `asyncio.CancelledError` is never wrapped.  A
  cancelled or timed-out request is abandoned (its reply is parsed and
  dropped; it never writes into the caller's buffer afterwards) and the
  connection stays usable.
- Ending a session (proto.md): a refused option ends the handshake with a
  soft disconnect (NBD_OPT_ABORT, then a graceful close), never a dropped
  connection; an NBD_ESHUTDOWN reply starts a soft disconnect of the
  transmission (new requests fail with `ConnectionClosed`, those in flight
  finish, then CMD_DISC).  Hard disconnects (abort) are for the peer's
  protocol violations and failed transports or TLS handshakes.

TLS (``nbds://``, ``nbds+unix://``; see `nbd.uri` and `nbd.tls`): STARTTLS
is the first option; on its ACK the connection pauses reading, hands its
transport to ``loop.start_tls`` and the handshake goes on over TLS.  A
server that refuses TLS, or a failed TLS handshake, fails the connect (no
downgrade).  A server that requires TLS from a plain client fails it with
a hint to use an ``nbds`` URI.

Block sizes (proto.md "Block size constraints"): requests are split at the
server's maximum (32 MiB when it gives none).  With a minimum above 1,
unaligned READs are widened to aligned bounds through a bounce buffer
(harmless); unaligned WRITE and WRITE_ZEROES fail with EINVAL (a
read-modify-write would race with other writers); TRIM, being advisory, is
shrunk to its aligned interior; BLOCK_STATUS and CACHE are widened.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import logging
import socket
import ssl
import time
from typing import Callable, Sequence

from ..blockdev.base import BASE_ALLOCATION, Buffer, Extent
from ..sockets import set_dead_peer_timeout
from ..errors import ConnectionClosed, LocalProtocolError, NBDBackupError, OptionError, RemoteProtocolError
from . import client_protocol as cp
from .client_protocol import BlockSizes, ExportInfo, Handshake, HandshakePlan, Mode, Reply, Transmission
from .uri import NBDURI, parse_uri
from .tls import client_context
from .wire import Cmd, CmdFlag, Rep, TransmissionFlag

log = logging.getLogger(__name__)

_READ = int(Cmd.READ)

DEFAULT_CONNECT_TIMEOUT = 30.0

#: `Client.block_status` keeps at most this many extents per call before it checks their
#: density (see `MIN_AVG_EXTENT`).
DENSE_EXTENTS = 1 << 16
#: Past `DENSE_EXTENTS`, extents averaging under this many bytes fail the call (EOVERFLOW):
#: a server sending 1-byte extents made a 16 MiB pull hold 16 M of them (3 GB, hunt 8),
#: without bound for larger exports.  A file system's block (4 KiB) is the finest any
#: real server reports in bulk; a fully 4 KiB-fragmented export passes (exactly this average).
MIN_AVG_EXTENT = 4096

__all__ = [
    "Client",
    "connect",
    "list_exports",
    "list_meta_contexts",
    "ExportInfo",
    "BlockSizes",
]


class _Slots:
    """A FIFO counting semaphore whose uncontended acquire costs no coroutine.

    `Client._submit` runs once per request; ``asyncio.Semaphore`` made it
    build and run an extra coroutine each time.  Use: ``if s.free and not
    s.waiters: s.free -= 1`` else ``await s.acquire_slow()``; then always
    `release`.  A released slot goes straight to the oldest live waiter, so
    a newcomer cannot overtake it.

    Fields: ``free`` (slots nobody holds or was handed); ``waiters``
    (futures of waiting tasks, oldest first; cancelled ones are skipped).
    """

    __slots__ = ("free", "waiters")

    def __init__(self, n: int) -> None:
        self.free = n
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire_slow(self) -> None:
        if self.free and not self.waiters:
            self.free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot, then cancelled: pass it on
            raise

    def release(self) -> None:
        waiters = self.waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(None)
                return
        self.free += 1


class _Conn(asyncio.BufferedProtocol):
    """The per-connection asyncio protocol.

    Fields: ``transport``; ``hs`` (the `Handshake`, until done);
    ``hs_done`` (future: the handshake's outcome); ``tx`` (the
    `Transmission`, after the handshake); ``futures`` (cookie -> future of a
    `Reply`); ``closed`` (future set when the connection is lost);
    ``error`` (why the connection is unusable, or None); ``_can_write``
    (event, cleared while the transport pauses writing); ``orphans``
    (cookies of abandoned requests still on the wire, each holding a slot)
    and ``release_slot`` (called once per orphan when its reply arrives or
    the connection is lost; set by `Client`); ``on_shutdown`` (called
    after replies were dispatched once a reply carried NBD_ESHUTDOWN; set
    by `Client`: it starts the soft disconnect); ``tls_context`` /
    ``tls_hostname`` (for the STARTTLS upgrade, None without TLS).
    """

    def __init__(self, hs: Handshake, tls_context: ssl.SSLContext | None = None,
                 tls_hostname: str | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.hs: Handshake | None = hs
        self.hs_done: asyncio.Future[None] = loop.create_future()
        self.tx: Transmission | None = None
        self.futures: dict[int, asyncio.Future[Reply]] = {}
        self.closed: asyncio.Future[None] = loop.create_future()
        self.error: BaseException | None = None
        self._hsbuf = bytearray(64 * 1024)
        self._can_write = asyncio.Event()
        self._can_write.set()
        #: Corked writes (see `write_corked`) and whether a flush is scheduled.
        self._wq: list[bytes] = []
        self._wq_scheduled = False
        self.orphans: set[int] = set()
        self.release_slot: Callable[[], None] = _noop
        self.on_shutdown: Callable[[], None] = _noop
        self.tls_context = tls_context
        self.tls_hostname = tls_hostname
        self._tls_task: asyncio.Task | None = None

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's is not an asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_dead_peer_timeout(sock)  # a vanished server: reset, not a hang
        self._flush_handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.tx is not None:
            return self.tx.get_buffer(sizehint)
        return memoryview(self._hsbuf)

    def buffer_updated(self, nbytes: int) -> None:
        tx = self.tx
        try:
            if tx is None:
                self._handshake_data(bytes(self._hsbuf[:nbytes]))
                return
            tx.buffer_updated(nbytes)
        except (RemoteProtocolError, LocalProtocolError) as e:
            self._fail(e if isinstance(e, RemoteProtocolError) else RemoteProtocolError(str(e)))
            return
        except OptionError as e:  # a refusal: the handshake queued NBD_OPT_ABORT
            self._flush_handshake()
            self._fail(e, soft=True)
            return
        except NBDBackupError as e:
            self._fail(e)
            return
        if tx.events:
            self._dispatch(tx.events)

    def eof_received(self) -> bool | None:
        try:
            if self.tx is not None:
                self.tx.receive_eof()
            elif self.hs is not None:
                self.hs.receive_data(b"")
        except NBDBackupError as e:
            self._fail(e)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            msg = "connection closed by the server" if exc is None else f"connection lost: {exc}"
            self.error = ConnectionClosed(msg)
            if exc is not None:
                self.error.__cause__ = exc
        if not self.hs_done.done():
            self.hs_done.set_exception(_clone(self.error))
        for fut in self.futures.values():
            if not fut.done():
                fut.set_exception(_clone(self.error))
        self.futures.clear()
        orphans = len(self.orphans)
        self.orphans.clear()
        for _ in range(orphans):
            self.release_slot()
        self._can_write.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- writing ------------------------------------------------------------------

    def write_corked(self, data: bytes) -> None:
        """Queue ``data``; everything queued in one loop iteration goes out in one write.

        Many small requests issued together (a burst of READ headers) then
        cost one send() instead of one each; order is kept because every
        write goes through the queue or flushes it first.
        """
        self._wq.append(data)
        if not self._wq_scheduled:
            self._wq_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_wq)

    def write_now(self, *parts: Buffer) -> None:
        """Write ``parts`` at once, after anything queued."""
        self._flush_wq()
        transport = self.transport
        assert transport is not None
        for p in parts:
            transport.write(p)

    def _flush_wq(self) -> None:
        self._wq_scheduled = False
        if not self._wq:
            return
        data = b"".join(self._wq) if len(self._wq) > 1 else self._wq[0]
        self._wq.clear()
        if self.error is None and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- helpers ----------------------------------------------------------------

    def _dispatch(self, events: list[Reply]) -> None:
        futures = self.futures
        for ev in events:
            fut = futures.pop(ev.cookie, None)
            if fut is None or fut.done():  # abandoned
                if ev.cookie in self.orphans:
                    self.orphans.discard(ev.cookie)
                    self.release_slot()
                continue
            if ev.error:
                fut.set_exception(OSError(ev.error, ev.message or errno.errorcode.get(ev.error, "error")))
            else:
                fut.set_result(ev)
        events.clear()
        if self.tx is not None and self.tx.shutdown:
            self.on_shutdown()

    def _flush_handshake(self) -> None:
        assert self.hs is not None and self.transport is not None
        out = self.hs.data_to_send()
        if out:
            self.transport.write(out)

    def _handshake_data(self, data: bytes) -> None:
        hs = self.hs
        assert hs is not None
        hs.receive_data(data)
        self._flush_handshake()
        if hs.tls_wanted and self._tls_task is None:
            assert self.transport is not None
            self.transport.pause_reading()  # what follows is the TLS handshake
            self._tls_task = asyncio.ensure_future(self._start_tls())
        if hs.done and not self.hs_done.done():
            self.hs_done.set_result(None)

    async def _start_tls(self) -> None:
        hs, raw = self.hs, self.transport
        assert hs is not None and raw is not None
        if self.tls_context is None:  # cannot happen: the plan asks for TLS only with a context
            self._fail(LocalProtocolError("STARTTLS accepted without a TLS context"))
            return
        try:
            new = await asyncio.get_running_loop().start_tls(
                raw, self, self.tls_context, server_side=False, server_hostname=self.tls_hostname)
        except (ssl.SSLError, ssl.CertificateError, OSError, ConnectionError) as e:
            err = ConnectionClosed(f"TLS handshake with the server failed: {e}")
            err.__cause__ = e
            self._fail(err)
            return
        if new is None or self.error is not None:
            return
        self.transport = new  # type: ignore[assignment]
        try:
            hs.tls_started()
        except OptionError as e:
            self._flush_handshake()
            self._fail(e, soft=True)
            return
        except NBDBackupError as e:
            self._fail(e)
            return
        self._flush_handshake()
        if hs.done and not self.hs_done.done():
            self.hs_done.set_result(None)

    def _fail(self, err: BaseException, soft: bool = False) -> None:
        """The connection is unusable: remember why and close it -- hard
        (abort: the peer broke the protocol, or the transport failed), or,
        ``soft``, after the bytes already written (NBD_OPT_ABORT after a
        refused option: proto.md allows a client only a soft disconnect
        there; closing an SSL transport also ends its TLS session)."""
        if self.error is None:
            self.error = err
        if not self.hs_done.done():
            self.hs_done.set_exception(_clone(err))
        if self.transport is not None:
            if soft:
                self.transport.close()
            else:
                self.transport.abort()


def _noop() -> None:
    pass


def _clone(err: BaseException) -> BaseException:
    """A fresh exception like ``err`` for each waiter (tracebacks don't pile up)."""
    if isinstance(err, ConnectionClosed):
        new: BaseException = ConnectionClosed(str(err))
    elif isinstance(err, RemoteProtocolError):
        new = RemoteProtocolError(str(err))
    else:
        return err
    new.__cause__ = err.__cause__ if err.__cause__ is not None else None
    return new


def _with_tls(u: NBDURI, plan: HandshakePlan) -> tuple[HandshakePlan, ssl.SSLContext | None]:
    """``plan`` with STARTTLS first and the client's TLS context for an ``nbds`` URI (else as is, None)."""
    if not u.tls:
        return plan, None
    return dataclasses.replace(plan, tls=True), client_context(u.tls_certificates or None,
                                                               verify_peer=u.tls_verify_peer,
                                                               hostname=u.server_hostname)


async def _open(uri: str | NBDURI, plan_export: str | None, make_plan, connect_timeout: float | None) -> tuple[_Conn, NBDURI, Handshake]:
    u = parse_uri(uri) if isinstance(uri, str) else uri
    export = u.export if plan_export is None else plan_export
    plan, tls_ctx = _with_tls(u, make_plan(export))
    hs = Handshake(plan)
    loop = asyncio.get_running_loop()
    conn_holder: list[_Conn] = []

    def factory() -> _Conn:
        c = _Conn(hs, tls_ctx, u.server_hostname if u.tls_verify_peer else None)
        conn_holder.append(c)
        return c

    async def run() -> _Conn:
        if u.transport == "unix":
            _, conn = await loop.create_unix_connection(factory, u.socket)
        else:
            _, conn = await loop.create_connection(factory, u.host, u.port)
        await conn.hs_done
        return conn

    try:
        conn = await asyncio.wait_for(run(), connect_timeout)
    except asyncio.TimeoutError:
        for c in conn_holder:
            if c.transport is not None:
                c.transport.abort()
        raise TimeoutError(f"{u}: connect/handshake timed out after {connect_timeout} s") from None
    except OptionError as e:
        for c in conn_holder:
            # (already closing softly, `_Conn._fail`: an abort would drop the NBD_OPT_ABORT)
            if c.transport is not None and not c.transport.is_closing():
                c.transport.abort()
        if e.reply == Rep.ERR_TLS_REQD and not u.tls:
            raise OptionError(e.option, e.reply, f"{e.message or 'TLS required'} (the server requires TLS: use an nbds:// or "
                              "nbds+unix:// URI with ?tls-certificates=DIR)") from None
        raise
    except BaseException:
        for c in conn_holder:
            if c.transport is not None:
                c.transport.abort()
        raise
    return conn, u, hs


class Client:
    """One connection in the transmission phase.

    Fields (read-only for users): ``uri``; ``export`` (`ExportInfo`:
    ``name``, ``size``, ``flags``, ``block_sizes``, ``description``);
    ``meta_contexts`` (agreed context name -> id); ``listed_meta_contexts``
    (see `connect`); ``structured``; ``fallback`` (OPT_EXPORT_NAME used);
    ``request_timeout``; ``_conn``; ``_tx``; ``_slots`` (bounds requests
    in flight); ``_loop``; ``_max`` (largest READ/WRITE/CACHE length); ``_closing``
    (no new request: `disconnect` was called, or the server answered
    NBD_ESHUTDOWN); ``_shutdown_task`` (the soft disconnect `_server_shutdown`
    started, kept referenced until done).
    """

    def __init__(self, conn: _Conn, uri: NBDURI, hs: Handshake, request_timeout: float | None, max_in_flight: int) -> None:
        res = hs.result
        assert res.export is not None and res.export.size is not None and res.export.flags is not None
        self.uri = uri
        self.export: ExportInfo = res.export
        self.meta_contexts: dict[str, int] = dict(res.meta_contexts)
        self.listed_meta_contexts: list[str] = list(res.listed_meta_contexts)
        self.structured = res.structured
        self.fallback = res.fallback
        self.request_timeout = request_timeout
        self._conn = conn
        self._tx = Transmission(res.structured, res.meta_contexts.values())
        conn.tx = self._tx
        conn.hs = None
        self._slots = _Slots(max_in_flight)
        conn.release_slot = self._slots.release
        conn.on_shutdown = self._server_shutdown
        self._shutdown_task: asyncio.Task | None = None
        self._loop = asyncio.get_running_loop()
        bs = self.export.block_sizes
        self._min = bs.minimum
        # Never more than 32 MiB per request, even if the server allows it.
        mx = min(bs.maximum, cp.DEFAULT_MAX_BLOCK)
        self._max = max(bs.minimum, mx - mx % bs.minimum)
        self._closing = False

    # -- properties -------------------------------------------------------------

    @property
    def size(self) -> int:
        assert self.export.size is not None
        return self.export.size

    @property
    def flags(self) -> TransmissionFlag:
        assert self.export.flags is not None
        return self.export.flags

    @property
    def block_sizes(self) -> BlockSizes:
        return self.export.block_sizes

    def can(self, flag: TransmissionFlag) -> bool:
        return bool(self.flags & flag)

    @property
    def read_only(self) -> bool:
        return self.can(TransmissionFlag.READ_ONLY)

    @property
    def closed(self) -> bool:
        return self._conn.error is not None or self._closing

    def add_lost_callback(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` (on the loop) once the connection is gone, for whatever reason."""
        self._conn.closed.add_done_callback(lambda _: cb())

    # -- core -------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if self._conn.error is not None:
            raise _clone(self._conn.error)
        if self._closing:
            raise ConnectionClosed("the server is shutting down (NBD_ESHUTDOWN)" if self._tx.shutdown
                                   else "client disconnected")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"range ({offset}, {length}) outside the export of {self.size} bytes")

    async def _submit(self, cmd: int, flags: int, offset: int, length: int,
                      buf: memoryview | None = None, payload: Buffer | None = None) -> Reply:
        slots = self._slots
        if slots.free and not slots.waiters:
            slots.free -= 1
        else:
            await slots.acquire_slow()
        release = True
        try:
            conn = self._conn
            if conn.error is not None:
                raise _clone(conn.error)
            if self._tx.shutdown:  # (queued on the slots before the ESHUTDOWN reply)
                raise ConnectionClosed("the server is shutting down (NBD_ESHUTDOWN)")
            if payload is not None and not conn._can_write.is_set():
                await conn._can_write.wait()
                if conn.error is not None:
                    raise _clone(conn.error)
            fut: asyncio.Future[Reply] = self._loop.create_future()
            cookie, hdr = self._tx.request(cmd, flags, offset, length, buf)
            conn.futures[cookie] = fut
            if payload is None:
                conn.write_corked(hdr)
            elif length <= 64 * 1024:
                conn.write_corked(hdr + bytes(payload))
            else:
                conn.write_now(hdr, payload)
            try:
                if self.request_timeout is None:
                    return await fut
                try:
                    return await asyncio.wait_for(fut, self.request_timeout)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"NBD request {Cmd(cmd).name} ({offset}, {length}) timed out "
                                       f"after {self.request_timeout} s") from None
            finally:
                if not fut.done() or fut.cancelled():
                    self._tx.abandon(cookie)
                    fut.cancel()
                    if conn.error is None and cookie in conn.futures:
                        conn.orphans.add(cookie)  # the slot is freed by its reply
                        release = False
        finally:
            if release:
                slots.release()

    def _check_cmd(self, flag: TransmissionFlag, what: str) -> None:
        if not self.can(flag):
            raise OSError(errno.ENOTSUP, f"server does not support {what}")

    def _check_write(self) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, "export is read-only")

    # -- public API ---------------------------------------------------------------

    async def pread(self, buf: Buffer | int, offset: int, flags: int = 0) -> Buffer:
        """Read into ``buf`` (or a new bytearray of ``buf`` bytes) at ``offset``; return it."""
        out: Buffer = bytearray(buf) if isinstance(buf, int) else buf
        mv = memoryview(out)
        if mv.format != "B" or mv.ndim != 1 or not mv.c_contiguous:
            mv = mv.cast("B")  # TypeError unless C-contiguous
        if mv.readonly:
            raise TypeError("pread needs a writable buffer")
        length = len(mv)
        self._check(offset, length)
        if length == 0:
            return out
        m = self._min
        if length <= self._max and m == 1:  # the common case, one request
            await self._submit(_READ, flags, offset, length, mv)
            return out
        if offset % m or length % m:
            # Widen to aligned bounds through a bounce buffer.
            start = offset - offset % m
            end = min(-(-(offset + length) // m) * m, self.size)
            bounce = memoryview(bytearray(end - start))
            await self._pread_aligned(bounce, start, flags)
            mv[:] = bounce[offset - start : offset - start + length]
            return out
        await self._pread_aligned(mv, offset, flags)
        return out

    async def _pread_aligned(self, mv: memoryview, offset: int, flags: int) -> None:
        step = self._max
        length = len(mv)
        if length <= step:
            await self._submit(Cmd.READ, flags, offset, length, mv)
            return
        await asyncio.gather(*(self._submit(Cmd.READ, flags, offset + p, min(step, length - p), mv[p : p + step])
                               for p in range(0, length, step)))

    async def pwrite(self, buf: Buffer, offset: int, fua: bool = False) -> None:
        """Write all of ``buf`` at ``offset`` (FUA: durable on return)."""
        mv = memoryview(buf).cast("B")
        length = len(mv)
        self._check(offset, length)
        self._check_write()
        if length == 0:
            return
        flags = self._fua(fua)
        self._aligned_or_einval(offset, length)
        step = self._max
        if length <= step:
            await self._submit(Cmd.WRITE, flags, offset, length, payload=mv)
            return
        await asyncio.gather(*(self._submit(Cmd.WRITE, flags, offset + p, min(step, length - p), payload=mv[p : p + step])
                               for p in range(0, length, step)))

    def _fua(self, fua: bool) -> int:
        if not fua:
            return 0
        if self.can(TransmissionFlag.SEND_FUA):
            return CmdFlag.FUA
        raise OSError(errno.ENOTSUP, "server does not support FUA")

    def _aligned_or_einval(self, offset: int, length: int) -> None:
        m = self._min
        if offset % m or length % m:
            raise OSError(errno.EINVAL, f"request ({offset}, {length}) not aligned to the server's minimum block size {m}")

    def _big_steps(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Split a range for commands without payload (u32 length limit)."""
        step = cp.MAX_LENGTH - cp.MAX_LENGTH % max(self._min, 1 << 20)
        return [(offset + p, min(step, length - p)) for p in range(0, length, step)]

    async def zero(self, offset: int, length: int, no_hole: bool = False, fast: bool = False, fua: bool = False) -> None:
        """WRITE_ZEROES; ``no_hole``: keep it allocated; ``fast``: fail with ENOTSUP unless cheap."""
        self._check(offset, length)
        self._check_write()
        self._check_cmd(TransmissionFlag.SEND_WRITE_ZEROES, "WRITE_ZEROES")
        if length == 0:
            return
        flags = self._fua(fua)
        if no_hole:
            flags |= CmdFlag.NO_HOLE
        if fast:
            self._check_cmd(TransmissionFlag.SEND_FAST_ZERO, "fast zero")
            flags |= CmdFlag.FAST_ZERO
        self._aligned_or_einval(offset, length)
        await asyncio.gather(*(self._submit(Cmd.WRITE_ZEROES, flags, o, n) for o, n in self._big_steps(offset, length)))

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """TRIM (advisory); an unaligned range is shrunk to its aligned interior."""
        self._check(offset, length)
        self._check_write()
        self._check_cmd(TransmissionFlag.SEND_TRIM, "TRIM")
        m = self._min
        start = -(-offset // m) * m
        end = (offset + length) // m * m
        if end <= start:
            return
        flags = self._fua(fua)
        await asyncio.gather(*(self._submit(Cmd.TRIM, flags, o, n) for o, n in self._big_steps(start, end - start)))

    async def flush(self) -> None:
        self._check(0, 0)
        self._check_cmd(TransmissionFlag.SEND_FLUSH, "FLUSH")
        await self._submit(Cmd.FLUSH, 0, 0, 0)

    async def cache(self, offset: int, length: int) -> None:
        """CACHE (advisory prefetch); widened to aligned bounds."""
        self._check(offset, length)
        self._check_cmd(TransmissionFlag.SEND_CACHE, "CACHE")
        start, end = self._widen(offset, length)
        step = self._max
        await asyncio.gather(*(self._submit(Cmd.CACHE, 0, o, min(step, end - o)) for o in range(start, end, step)))

    def _widen(self, offset: int, length: int) -> tuple[int, int]:
        m = self._min
        return offset - offset % m, min(-(-(offset + length) // m) * m, self.size)

    async def block_status(self, offset: int, length: int, context: str = BASE_ALLOCATION,
                           req_one: bool = False) -> list[Extent]:
        """Extents of ``context`` covering ``(offset, length)``, merged.

        Short replies are continued with further requests; an extent running
        past the range (allowed for the last one) is clipped.  With
        ``req_one`` only the first extent is returned.  Memory is bounded:
        more than `DENSE_EXTENTS` extents averaging under `MIN_AVG_EXTENT`
        bytes raise ``OSError(EOVERFLOW)``.

        ::

            request       [offset ........................ end)
            reply 1       [e1  ][e2    ][e3 ]                        (short)
            reply 2                         [e4        ][e5 .........](long)
            result        [e1  ][e2+e3 ....][e4        ][e5 ....]    (equal flags merged,
                                                                      last clipped)
        """
        self._check(offset, length)
        cid = self.meta_contexts.get(context)
        if cid is None:
            raise OSError(errno.ENOTSUP if not self.meta_contexts else errno.EINVAL,
                          f"meta context {context!r} was not negotiated")
        out: list[Extent] = []
        end = offset + length
        pos = offset
        flags = CmdFlag.REQ_ONE if req_one else 0
        while pos < end:
            start, stop = self._widen(pos, min(end - pos, cp.MAX_LENGTH - cp.MAX_LENGTH % max(self._min, 1 << 20)))
            reply = await self._submit(Cmd.BLOCK_STATUS, flags, start, stop - start)
            assert reply.extents is not None
            descs = reply.extents.get(cid)
            if not descs:
                raise OSError(errno.EIO, f"server sent no extents for {context!r}")
            at = start
            for n, f in descs:
                if n == 0:
                    continue
                e_start, e_end = max(at, pos), min(at + n, end)
                at += n
                if e_end > e_start:
                    if out and out[-1].flags == f and out[-1].end == e_start:
                        out[-1] = Extent(out[-1].offset, out[-1].length + e_end - e_start, f)
                    else:
                        out.append(Extent(e_start, e_end - e_start, f))
                        if len(out) > DENSE_EXTENTS and len(out) * MIN_AVG_EXTENT > e_end - offset:
                            raise OSError(errno.EOVERFLOW,
                                          f"server reported {len(out)} extents of {context!r} in the "
                                          f"{e_end - offset} bytes at {offset} (more than one per "
                                          f"{MIN_AVG_EXTENT} bytes): refusing to track them")
                if at >= end:
                    break
            if at <= pos:
                raise OSError(errno.EIO, f"server made no progress in BLOCK_STATUS at {pos}")
            pos = at
            if req_one:
                break
        return out

    def _server_shutdown(self) -> None:
        """A reply carried NBD_ESHUTDOWN: proto.md says the client MUST
        initiate a soft disconnect.  New requests fail from now on
        (`_check`: ConnectionClosed, so `blockdev.nbd.NBDDev.reopen_lost`
        may replace the connection); the ones in flight finish; then
        CMD_DISC goes out and the connection closes."""
        if not self._closing:
            self._closing = True
            self._shutdown_task = asyncio.ensure_future(self._soft_disconnect())

    async def disconnect(self) -> None:
        """Wait for requests in flight, send CMD_DISC and close."""
        if self._closing:
            await self._conn.closed
            return
        self._closing = True
        await self._soft_disconnect()

    async def _soft_disconnect(self) -> None:
        conn = self._conn
        # New calls are refused from now on (`_check`), but calls already
        # queued on the semaphore still go out: wait until none is left.
        while True:
            pending = [f for f in conn.futures.values() if not f.done()]
            if not pending:
                await asyncio.sleep(0)  # let released semaphore waiters submit
                pending = [f for f in conn.futures.values() if not f.done()]
                if not pending:
                    break
            await asyncio.gather(*pending, return_exceptions=True)
        if conn.error is None and conn.transport is not None:
            try:
                _, hdr = self._tx.request(Cmd.DISC, 0, 0, 0)
                conn.write_now(hdr)
                if conn.transport.can_write_eof():
                    conn.transport.write_eof()
            except (LocalProtocolError, OSError, RuntimeError):
                pass
        await _close_and_wait(conn)

    close = disconnect

    def abort(self) -> None:
        """Drop the connection now: no CMD_DISC, requests in flight fail with
        `ConnectionClosed` (for a caller being cancelled, which cannot wait for them)."""
        self._closing = True
        if self._conn.transport is not None:
            self._conn.transport.abort()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()


async def connect(
    uri: str | NBDURI,
    *,
    export: str | None = None,
    meta_contexts: Sequence[str] = (),
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
    request_timeout: float | None = None,
    max_in_flight: int = 64,
    list_meta_contexts_first: Sequence[str] | None = None,
) -> Client:
    """Connect to ``uri`` and enter transmission on its export.

    ``export`` overrides the URI's export name.  ``meta_contexts``: names to
    select (a name ending in ':' is a query listed first, e.g.
    ``qemu:dirty-bitmap:``); ``Client.meta_contexts`` says what the server
    agreed to.  Raises `OptionError` if the server refuses the export,
    `RemoteProtocolError`, `ConnectionClosed`, `TimeoutError` or `OSError`.
    ``list_meta_contexts_first``: also list these queries (``()`` = the
    server's default list) on this connection, into
    ``Client.listed_meta_contexts``.
    """
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be >= 1")
    metas = tuple(meta_contexts)
    lf = None if list_meta_contexts_first is None else tuple(list_meta_contexts_first)
    conn, u, hs = await _open(uri, export, lambda e: HandshakePlan(Mode.GO, e, metas, list_first=lf),
                              connect_timeout)
    return Client(conn, u, hs, request_timeout, max_in_flight)


def connect_blocking(uri: NBDURI, export: str, *, timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
                     on_socket: Callable[[socket.socket], None] | None = None
                     ) -> tuple[socket.socket, Transmission, cp.HandshakeResult]:
    """One connection to ``export`` of ``uri`` on a blocking socket, for a thread of its own.

    The same sans-IO `Handshake` as `connect` (OPT_GO, no metadata contexts; STARTTLS first
    for an ``nbds`` URI, then ``ssl`` on the socket itself: an ``ssl.SSLSocket`` that
    decrypts in C with the GIL released, which a thread can own -- asyncio's TLS transport
    cannot be handed over).  Returns the socket (blocking, timeout None; the caller owns and
    closes it), a fresh `Transmission` and the handshake's result.  Raises as `connect`;
    ``timeout`` bounds the connect and the whole handshake together (TimeoutError).
    ``on_socket(sock)`` is told each socket as soon as it exists (the plain one, then the TLS
    one), so another thread can shut it down to interrupt a connect that hangs.
    """
    plan, ctx = _with_tls(uri, HandshakePlan(Mode.GO, export, ()))
    hs = Handshake(plan)
    # ``timeout`` bounds the whole connect and handshake (as `connect`'s wait_for), not
    # each receive: a server trickling an endless valid handshake a byte at a time
    # otherwise kept the thread for ever (hunt 8).
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> float | None:
        if deadline is None:
            return None
        rest = deadline - time.monotonic()
        if rest <= 0:
            raise socket.timeout
        return rest

    if uri.transport == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if on_socket is not None:
            on_socket(sock)
        sock.settimeout(timeout)
        try:
            sock.connect(uri.socket)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection((uri.host, uri.port), timeout)
        if on_socket is not None:
            on_socket(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_dead_peer_timeout(sock)
    try:
        while not hs.done:
            out = hs.data_to_send()
            if out:
                sock.sendall(out)
            if hs.tls_wanted:
                assert ctx is not None
                sock = ctx.wrap_socket(sock, server_hostname=uri.server_hostname if uri.tls_verify_peer else None,
                                       do_handshake_on_connect=False)  # takes over the descriptor
                if on_socket is not None:
                    on_socket(sock)
                try:
                    sock.settimeout(left())
                    sock.do_handshake()
                except (ssl.SSLError, ssl.CertificateError) as e:
                    raise ConnectionClosed(f"TLS handshake with the server failed: {e}") from e
                hs.tls_started()
                continue
            if hs.done:
                break
            sock.settimeout(left())
            hs.receive_data(sock.recv(65536))
        out = hs.data_to_send()
        if out:
            sock.sendall(out)
        sock.settimeout(None)
    except socket.timeout:
        sock.close()
        raise TimeoutError(f"{uri}: connect/handshake timed out after {timeout} s") from None
    except OptionError:
        _soft_close(sock, hs.data_to_send())
        raise
    except BaseException:
        sock.close()
        raise
    res = hs.result
    return sock, Transmission(res.structured, res.meta_contexts.values()), res


def _soft_close(sock: socket.socket, out: bytes) -> None:
    """End a refused handshake on a blocking socket with a soft disconnect
    (proto.md): send ``out`` (the NBD_OPT_ABORT the handshake queued), end
    TLS if it runs, close; best effort, a second at most each."""
    try:
        sock.settimeout(1.0)
        if out:
            sock.sendall(out)
        if isinstance(sock, ssl.SSLSocket):
            sock = sock.unwrap()  # close_notify (the peer's answer ends the wait)
    except (OSError, ValueError):
        pass
    finally:
        sock.close()


async def _close_and_wait(conn: _Conn) -> None:
    """Close the transport and wait (5 s at most, then abort) until it is gone."""
    if conn.transport is not None:
        conn.transport.close()
    try:
        await asyncio.wait_for(asyncio.shield(conn.closed), 5)
    except asyncio.TimeoutError:
        if conn.transport is not None:
            conn.transport.abort()


async def list_exports(uri: str | NBDURI, *, connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT) -> list[ExportInfo]:
    """OPT_LIST, then OPT_INFO for each export (size, flags, block sizes, description)."""
    conn, _, hs = await _open(uri, "", lambda e: HandshakePlan(Mode.LIST, e), connect_timeout)
    await _close_and_wait(conn)
    return hs.result.exports


async def list_meta_contexts(uri: str | NBDURI, queries: Sequence[str] = (), *, export: str | None = None,
                             connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT) -> list[str]:
    """OPT_LIST_META_CONTEXT for the URI's export (``queries`` empty = the server's default list)."""
    qs = tuple(queries)
    conn, _, hs = await _open(uri, export, lambda e: HandshakePlan(Mode.META, e, qs), connect_timeout)
    await _close_and_wait(conn)
    return hs.result.listed_meta_contexts
