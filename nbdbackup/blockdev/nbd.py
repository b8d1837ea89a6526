"""A remote NBD export as a `BlockDev` (``nbd://``, ``nbd+unix://`` SPECs).

Role: lets nbdbackup read from, write to and re-export any NBD server (qemu-nbd,
nbdkit, qemu-storage-daemon, ourselves) through the one `BlockDev` interface.

Connections: `NBDDev.open` opens one connection; with ``connections=N`` and a
server that offers CAN_MULTI_CONN it opens N and spreads requests over them
round-robin (without CAN_MULTI_CONN several connections could see each
other's writes out of order and FLUSH would not cover them, so we keep one).

Meta contexts: every connection selects the contexts the server offers among
`base:allocation`, `qemu:allocation-depth` and all ``qemu:dirty-bitmap:*``
(found with the ``qemu:dirty-bitmap:`` query); `meta_contexts` lists what the
server agreed to (`base:allocation` is always answerable: all data when the
server has no such context).

Capabilities map one to one from the transmission flags; WRITE_ZEROES without
server support is emulated with writes (never "fast"); CACHE without server
support is a no-op.  Block sizes are the server's (minimum, preferred,
maximum clamped to `wire.MAX_PAYLOAD`); see `nbd.client` for what happens to
unaligned requests.

Reconnection (``reconnect_delay`` not None: the devices `open_spec` opens, i.e.
re-exports ``serve NAME=nbd://...`` and ``nbd://`` backup targets; one connection):
a lost connection is replaced in the background (attempts with a growing pause,
for as long as the device is open); requests wait up to ``reconnect_delay``
seconds from the loss for the new connection and are rerun on it, later ones fail
with EIO until it is back.  The new connection must reach an export of the same
size and flags.  Without CAN_MULTI_CONN -- and even with it, when the server
restarted -- a FLUSH on a new connection does not cover writes the server
acknowledged on the lost one (they may have been in a cache that died with it), so
a re-export (``replay``) keeps every write acknowledged since the last FLUSH that
covered it (the *replay log*, at most `REPLAY_LOG_MAX` bytes: a write that takes it
past that returns once a FLUSH brought it back under) and writes them again, in the
order they were acknowledged, on the new connection before any other request uses
it.  So what the server holds after a reconnection is what our callers were told
was written: read-your-writes, and FLUSH still covers every completed write
(invariant 2 through a re-export).  Other writers (backup targets: a copy and
page faults per write would cost the pump ~35% more CPU) keep no log: the first
FLUSH after a loss that may have dropped acknowledged writes fails with EIO, once
(as Linux reports lost write-back), and the backup job fails instead of leaving a
target with holes in it; and every READ after such a loss fails with EIO (a target
or scratch is read back: snapshot reads of copied clusters, the pump moving scratch
to target -- reading what the remote kept would be a silently wrong snapshot).

Invariant: all connections reached the same export with the same size and
flags (checked at open and at every reconnection).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import weakref
from typing import Awaitable, Callable, Sequence, TypeVar

from ..errors import ConfigError, ConnectionClosed, OptionError, RemoteProtocolError
from ..nbd.client import Client, connect
from ..nbd.uri import NBDURI, parse_uri
from ..nbd.wire import MAX_PAYLOAD, TransmissionFlag as TF
from ..sockets import env_seconds
from .base import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    BlockDev,
    BlockSize,
    Buffer,
    Capabilities,
    Extent,
    write_zeroes_slowly,
)

log = logging.getLogger(__name__)

#: What NBDDev asks every server for.
WANTED_CONTEXTS = (BASE_ALLOCATION, ALLOCATION_DEPTH, DIRTY_BITMAP_PREFIX)

#: How long `open_spec`'s devices hold requests after a lost connection (seconds;
#: QEMU's nbd driver calls it ``reconnect-delay``): long enough for a remote server's
#: restart, short enough that a dead one fails a VM's I/O soon.
#: ``NBDBACKUP_RECONNECT_DELAY`` overrides it (tests: shorter).
RECONNECT_DELAY = env_seconds("NBDBACKUP_RECONNECT_DELAY", 10.0)
#: Bytes of acknowledged, not yet flushed writes a reconnecting device keeps.
REPLAY_LOG_MAX = 64 << 20
#: What one entry of the log counts against `REPLAY_LOG_MAX` at least: a zero or a trim
#: holds no data, a small write little, but each costs memory and a round trip of the
#: replay (without it a client zeroing without FLUSH grew the log without bound; hunt 15).
#: 16 KiB: at most 4096 entries.
REPLAY_ENTRY_COST = 16 << 10
#: Handshake timeout of one reconnection attempt, and the longest pause between two.
RECONNECT_CONNECT_TIMEOUT = 5.0
RECONNECT_PAUSE_MAX = 5.0
#: The longest pause between two attempts while requests may still wait (within
#: ``reconnect_delay`` of the loss): a remote back within the delay serves them (hunt 15:
#: with pauses doubling to 5 s, one back at 1.7 s of a 3 s delay was tried at 3.15 s).
RECONNECT_PAUSE_WAITING = 0.25

_T = TypeVar("_T")

#: The open reconnecting devices, for `prometheus_text` (weak: closing one is enough).
_reconnecting: "weakref.WeakSet[NBDDev]" = weakref.WeakSet()


def _cost(item: bytes | int) -> int:
    """What a replay log entry (a write's bytes, or a zero's or trim's length) counts."""
    return max(len(item), REPLAY_ENTRY_COST) if isinstance(item, bytes) else REPLAY_ENTRY_COST


class NBDDev(BlockDev):
    """A remote export over one or more NBD connections.

    Fields: ``uri`` (parsed); ``spec`` (the URI string as given, for
    messages and "is this the same disk" checks); ``clients`` (connections, all to the same
    export); ``_rr`` (round-robin iterator over them); ``_read_only``
    (forced by the caller or by the server); ``_caps``; ``_connect_kw`` (what `open`
    connected with, for `reopen_lost` and reconnection; None when constructed directly).

    Reconnection state (see the module docstring; unused when ``reconnect_delay`` is
    None): ``reconnect_delay``; ``_down_since`` (loop time the connection was lost,
    None while connected); ``_up`` (set while connected); ``_task`` (the reconnecting
    task); ``_log`` (the replay log: ``(seq, kind, offset, data or length)`` of every
    write acknowledged since the last FLUSH that covers it, in acknowledgement order;
    kind ``"w"`` write, ``"z"`` zero keeping allocation, ``"h"`` zero that may punch,
    ``"t"`` trim); ``_seq`` (sequence number of the last logged write);
    ``_log_bytes`` (what ``_log`` counts: `_cost` of each entry); ``_log_flush`` (a FLUSH started because
    the log is full, which writers wait for); ``replay`` (keep the log; else only
    count: ``_seq`` then counts acknowledged writes, ``_flushed`` is the ``_seq`` a
    completed FLUSH covered, ``_lost_writes`` says a loss may have dropped some and
    the next FLUSH must fail; ``_unreadable``: set with it and never cleared, every later
    read fails with EIO: a backup target or scratch is read back -- snapshot reads of
    the clusters copied before a write, the pump moving scratch to target -- and the
    remote may have lost what they would read, hunt 15); ``reconnects`` and ``replayed``
    (counters: reconnections made, bytes written again); ``_closing``.
    """

    def __init__(self, uri: NBDURI, clients: list[Client], *, read_only: bool = False, spec: str | None = None) -> None:
        assert clients
        self.uri = uri
        self.spec = spec if spec is not None else str(uri)
        self.clients = clients
        self._rr = itertools.cycle(clients)
        self._connect_kw: dict | None = None
        self.reconnect_delay: float | None = None
        self._down_since: float | None = None
        self._up = asyncio.Event()
        self._up.set()
        self._task: asyncio.Task | None = None
        self._log: list[tuple[int, str, int, bytes | int]] = []
        self._seq = 0
        self._log_bytes = 0
        self._log_flush: asyncio.Future | None = None
        self.replay = False
        self._flushed = 0
        self._lost_writes = False
        self._unreadable = False
        self.reconnects = 0
        self.replayed = 0
        self._closing = False
        c = clients[0]
        self._read_only = read_only or c.read_only
        bs = c.block_sizes
        mx = min(bs.maximum, MAX_PAYLOAD)
        mx -= mx % bs.minimum
        pref = max(bs.preferred, bs.minimum)
        while pref > mx:  # keep it a power of 2 (minimum <= maximum, both checked)
            pref >>= 1
        self._caps = Capabilities(
            read_only=self._read_only,
            can_flush=c.can(TF.SEND_FLUSH),
            can_fua=c.can(TF.SEND_FUA),
            can_trim=c.can(TF.SEND_TRIM),
            can_zero=True,
            can_fast_zero=c.can(TF.SEND_WRITE_ZEROES) and c.can(TF.SEND_FAST_ZERO),
            can_cache=True,
            can_multi_conn=c.can(TF.CAN_MULTI_CONN),
            can_extents=BASE_ALLOCATION in c.meta_contexts,
            sparse_reads=False,
            rotational=c.can(TF.ROTATIONAL),
            block_size=BlockSize(bs.minimum, pref, mx),
        )

    @classmethod
    async def open(
        cls,
        uri: str | NBDURI,
        *,
        read_only: bool = False,
        connections: int | None = None,
        export: str | None = None,
        meta_contexts: Sequence[str] = WANTED_CONTEXTS,
        connect_timeout: float | None = 30.0,
        request_timeout: float | None = None,
        max_in_flight: int = 64,
        reconnect_delay: float | None = None,
        replay: bool = False,
    ) -> "NBDDev":
        """Connect; ``connections`` (default 1) is honoured only with CAN_MULTI_CONN.

        ``reconnect_delay``: None, a lost connection stays lost (its requests fail
        with `ConnectionClosed`; see `reopen_lost`); a number of seconds: reconnect
        (module docstring; one connection only); ``replay``: keep a replay log
        (else a FLUSH after a loss of acknowledged writes fails).

        Raises `ConfigError` for a bad URI, a server that cannot be reached
        or that refuses the export (the first connection); failures of the
        extra connections raise what `connect` raises.
        """
        u = parse_uri(uri) if isinstance(uri, str) else uri
        n = 1 if connections is None else connections
        if n < 1:
            raise ConfigError("connections must be >= 1")
        assert reconnect_delay is None or n == 1, "a reconnecting device has one connection"
        kw = dict(export=export, meta_contexts=meta_contexts, connect_timeout=connect_timeout,
                  request_timeout=request_timeout, max_in_flight=max_in_flight)
        try:
            first = await connect(u, **kw)  # type: ignore[arg-type]
        except OptionError as e:
            raise ConfigError(f"{u}: server refused the export: {e.message or e}") from e
        except (OSError, TimeoutError, ConnectionClosed, RemoteProtocolError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"{u}: cannot connect: {why}") from e
        clients = [first]
        try:
            if n > 1 and first.can(TF.CAN_MULTI_CONN):
                more = await asyncio.gather(*(connect(u, **kw) for _ in range(n - 1)))  # type: ignore[arg-type]
                clients += more
                for c in more:
                    if (c.size, c.flags, c.meta_contexts) != (first.size, first.flags, first.meta_contexts):
                        raise OSError(errno.EIO, f"{u}: connections disagree about the export")
        except BaseException:
            await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)
            raise
        dev = cls(u, clients, read_only=read_only, spec=uri if isinstance(uri, str) else None)
        dev._connect_kw = kw
        if reconnect_delay is not None:
            dev.reconnect_delay = reconnect_delay
            dev.replay = replay
            dev._watch(first)
            _reconnecting.add(dev)
        return dev

    async def reopen_lost(self) -> int:
        """Replace connections the server closed (an idle timeout, an eviction at its
        connection cap: a TLS pull's receive threads open connections of their own,
        `agent.pullthreads`) with new ones to the same export; returns how many.  Each new
        one must agree with the first about the export, as in `open`."""
        if self._connect_kw is None:
            return 0
        lost = [k for k, c in enumerate(self.clients) if c.closed]
        if not lost:
            return 0
        new = await asyncio.gather(*(connect(self.uri, **self._connect_kw) for _ in lost))  # type: ignore[arg-type]
        ref = next((c for c in self.clients if not c.closed), new[0])
        for c in new:
            if (c.size, c.flags, c.meta_contexts) != (ref.size, ref.flags, ref.meta_contexts):
                await asyncio.gather(*(x.disconnect() for x in new), return_exceptions=True)
                raise OSError(errno.EIO, f"{self.uri}: a new connection disagrees about the export")
        for k, c in zip(lost, new):
            self.clients[k] = c
        self._rr = itertools.cycle(self.clients)
        return len(lost)

    # -- BlockDev ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.clients[0].size

    def capabilities(self) -> Capabilities:
        return self._caps

    def meta_contexts(self) -> Sequence[str]:
        agreed = list(self.clients[0].meta_contexts)
        if BASE_ALLOCATION not in agreed:
            agreed.insert(0, BASE_ALLOCATION)
        return tuple(agreed)

    def _next(self) -> Client:
        return next(self._rr)

    def _writable(self) -> None:
        if self._read_only:
            raise OSError(errno.EPERM, "read-only device")

    # -- reconnection -------------------------------------------------------------

    def _watch(self, c: Client) -> None:
        """Start reconnecting as soon as ``c``'s connection is lost (not only at the next request)."""
        c.add_lost_callback(lambda: self._lost(c))

    def _lost(self, c: Client) -> None:
        if self._closing or c is not self.clients[0] or self._task is not None:
            return
        self._down_since = asyncio.get_running_loop().time()
        self._up.clear()
        if not self.replay and self._seq > self._flushed:
            self._lost_writes = True  # acknowledged, maybe only in a cache that is gone
            self._unreadable = True
        self._task = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        assert self._connect_kw is not None
        kw = dict(self._connect_kw)
        ct = kw.get("connect_timeout")
        kw["connect_timeout"] = RECONNECT_CONNECT_TIMEOUT if ct is None else min(ct, RECONNECT_CONNECT_TIMEOUT)
        ref = self.clients[0]
        pause, told = 0.05, None
        if self.replay:
            log.warning("%s: connection lost; reconnecting (%d unflushed writes to write again)",
                        self.spec, len(self._log))
        else:
            log.warning("%s: connection lost; reconnecting%s", self.spec,
                        " (acknowledged writes may be lost: the next FLUSH fails)" if self._lost_writes else "")
        while not self._closing:
            why = None
            try:
                c = await connect(self.uri, **kw)  # type: ignore[arg-type]
            except Exception as e:  # whatever it is, the next attempt may do better
                why = f"cannot connect: {e}"
            else:
                if (c.size, c.flags) != (ref.size, ref.flags):
                    why = (f"the export changed (size {c.size}, flags {int(c.flags):#x}; "
                           f"was {ref.size}, {int(ref.flags):#x})")
                else:
                    try:
                        await self._replay(c)
                    except Exception as e:
                        why = f"writing {len(self._log)} unflushed writes again failed: {e}"
                    except BaseException:  # cancelled (`close`): never leave it open (hunt 15)
                        c.abort()
                        raise
                if why is None and not self._closing:
                    self.clients[0] = c
                    self._rr = itertools.cycle(self.clients)
                    self._watch(c)
                    self._task = None
                    self._down_since = None
                    self._up.set()
                    self.reconnects += 1
                    log.warning("%s: reconnected", self.spec)
                    return
                await asyncio.gather(c.disconnect(), return_exceptions=True)
            if why is not None and why != told:
                log.warning("%s: %s; trying again", self.spec, why)
                told = why
            loop = asyncio.get_running_loop()
            waiting = (self._down_since is not None and self.reconnect_delay is not None
                       and loop.time() < self._down_since + self.reconnect_delay)
            await asyncio.sleep(min(pause, RECONNECT_PAUSE_WAITING) if waiting else pause)
            pause = min(pause * 2, RECONNECT_PAUSE_MAX)

    async def _replay(self, c: Client) -> None:
        """Write the replay log again on ``c`` (not yet visible to requests)."""
        for _, kind, off, item in list(self._log):
            if kind == "w":
                assert isinstance(item, bytes)
                await c.pwrite(item, off)
                self.replayed += len(item)
            elif kind == "t":
                assert isinstance(item, int)
                await c.trim(off, item)
            else:
                assert isinstance(item, int)
                await c.zero(off, item, no_hole=kind == "z")

    async def _client(self) -> Client:
        """A connected client; while reconnecting, wait for one up to ``reconnect_delay``
        seconds from the loss, then fail with EIO."""
        if self.reconnect_delay is None:
            return self._next()
        c = self.clients[0]
        if c.closed:
            self._lost(c)
        if not self._up.is_set():
            assert self._down_since is not None
            left = self._down_since + self.reconnect_delay - asyncio.get_running_loop().time()
            if left > 0:
                try:
                    await asyncio.wait_for(self._up.wait(), left)
                except asyncio.TimeoutError:
                    pass
            if not self._up.is_set():
                raise OSError(errno.EIO, f"{self.spec}: not connected (reconnecting)")
            c = self.clients[0]
        return c

    async def _do(self, fn: Callable[[Client], Awaitable[_T]]) -> _T:
        """Run ``fn`` on a connected client; on a reconnecting device, a request whose
        connection is lost under it, or that the server answered NBD_ESHUTDOWN (it is
        going away; the client then disconnects), runs again on the next connection (or
        fails with EIO)."""
        while True:
            c = await self._client()
            try:
                return await fn(c)
            except (ConnectionClosed, OSError) as e:
                if (self.reconnect_delay is None or self._closing
                        or isinstance(e, OSError) and e.errno != errno.ESHUTDOWN):
                    raise
                self._lost(c)

    async def _logged(self, kind: str, offset: int, item: bytes | int) -> None:
        """Record an acknowledged write in the replay log; a full log flushes first."""
        if self.reconnect_delay is None or not self._caps.can_flush:
            return  # without FLUSH the server promises nothing more after an acknowledgement
        self._seq += 1
        if not self.replay:
            return
        self._log.append((self._seq, kind, offset, item))
        self._log_bytes += _cost(item)
        while self._log_bytes > REPLAY_LOG_MAX:  # one FLUSH at a time, shared by the writers waiting
            if self._log_flush is None:
                self._log_flush = asyncio.ensure_future(self._flush_log())
            await asyncio.shield(self._log_flush)

    async def _flush_log(self) -> None:
        try:
            await self._flush()
        finally:
            self._log_flush = None

    async def _flush(self) -> None:
        """FLUSH; then drop the writes it covers (those logged before it was sent) from the log."""
        seq = self._seq
        await self._do(lambda c: c.flush())
        self._flushed = max(self._flushed, seq)
        if self._lost_writes:
            self._lost_writes = False
            raise OSError(errno.EIO, f"{self.spec}: the connection was lost with writes acknowledged "
                                     "but not flushed: they may be lost")
        if self._log and self._log[0][0] <= seq:
            keep = [e for e in self._log if e[0] > seq]
            self._log = keep
            self._log_bytes = sum(_cost(e[3]) for e in keep)

    # -- I/O ----------------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int) -> None:
        self._check_readable()
        await self._do(lambda c: c.pread(buf, offset))
        self._check_readable()  # (lost while it ran: rerun on a remote that may lack writes)

    def _check_readable(self) -> None:
        if self._unreadable:
            raise OSError(errno.EIO, f"{self.spec}: the connection was lost with writes acknowledged "
                                     "but not flushed: what it reads may not be what was written")

    async def pwrite(self, buf: Buffer, offset: int, *, fua: bool = False) -> None:
        self._writable()
        if self.replay and self._caps.can_flush:  # (what `_logged` keeps)
            buf = bytes(buf)  # the caller may reuse its buffer; the replay log keeps these bytes

        async def run(c: Client) -> None:
            await c.pwrite(buf, offset, fua=fua and c.can(TF.SEND_FUA))
            if fua and not c.can(TF.SEND_FUA) and c.can(TF.SEND_FLUSH):
                await c.flush()

        await self._do(run)
        await self._logged("w", offset, buf)  # type: ignore[arg-type]

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        self._writable()
        if not self.clients[0].can(TF.SEND_WRITE_ZEROES):
            if fast:
                raise OSError(errno.ENOTSUP, "fast zero not supported")
            await write_zeroes_slowly(self, offset, length, fua=fua)
            return
        if fast and not self.clients[0].can(TF.SEND_FAST_ZERO):
            raise OSError(errno.ENOTSUP, "fast zero not supported")

        async def run(c: Client) -> None:
            await c.zero(offset, length, no_hole=not may_trim, fast=fast, fua=fua and c.can(TF.SEND_FUA))
            if fua and not c.can(TF.SEND_FUA) and c.can(TF.SEND_FLUSH):
                await c.flush()

        await self._do(run)
        await self._logged("h" if may_trim else "z", offset, length)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._writable()
        if not self.clients[0].can(TF.SEND_TRIM):
            return
        await self._do(lambda c: c.trim(offset, length, fua=fua and c.can(TF.SEND_FUA)))
        await self._logged("t", offset, length)

    async def flush(self) -> None:
        if not self.clients[0].can(TF.SEND_FLUSH):
            return
        if self._caps.can_multi_conn or len(self.clients) == 1:
            await self._flush()
        else:  # pragma: no cover - we never open several without multi-conn
            await asyncio.gather(*(x.flush() for x in self.clients))

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        async def run(c: Client) -> list[Extent]:
            if context not in c.meta_contexts:
                if context == BASE_ALLOCATION:
                    return [Extent(offset, length, 0)]
                raise OSError(errno.EINVAL, f"unknown meta context {context!r}")
            return await c.block_status(offset, length, context)

        return await self._do(run)

    async def cache(self, offset: int, length: int) -> None:
        async def run(c: Client) -> None:
            if c.can(TF.SEND_CACHE):
                await c.cache(offset, length)

        await self._do(run)

    async def close(self) -> None:
        self._closing = True
        _reconnecting.discard(self)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await asyncio.gather(*(c.disconnect() for c in self.clients), return_exceptions=True)


def prometheus_text() -> str:
    """Gauges and counters of the open reconnecting devices (re-exports, ``nbd://`` targets),
    labelled with the remote's URI: connected or not, reconnections, bytes written again,
    bytes in the replay log; empty when there are none."""
    devs = sorted(_reconnecting, key=lambda d: str(d.uri))
    if not devs:
        return ""
    out = []
    for name, kind, help_, get in (
            ("nbdbackup_remote_connected", "gauge", "1 while the connection to the remote NBD server is up.",
             lambda d: int(d._up.is_set())),
            ("nbdbackup_remote_reconnects_total", "counter", "Reconnections to the remote NBD server.",
             lambda d: d.reconnects),
            ("nbdbackup_remote_replayed_bytes_total", "counter",
             "Bytes of acknowledged, unflushed writes written again after a reconnection.", lambda d: d.replayed),
            ("nbdbackup_remote_replay_log_bytes", "gauge",
             "What the replay log of acknowledged, unflushed writes counts against its bound (bytes).",
             lambda d: d._log_bytes)):
        out.append(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n")
        for d in devs:
            remote = str(d.uri).replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
            out.append(f'{name}{{remote="{remote}"}} {get(d)}\n')
    return "".join(out)
