"""The asyncio NBD server: moves bytes, runs requests against block devices.

Role: owns listeners, connections and the export table.  All protocol logic
is in `nbd.protocol` (sans-IO); this module only feeds it bytes, runs the
`Request` events it yields against the export's `BlockDev`, and writes the
replies it encodes.

Data path (why it is shaped this way): each connection is an
`asyncio.BufferedProtocol`, so the kernel copies received bytes straight into
the protocol's buffer (WRITE payloads land in their own buffer, see
`ServerConnection.get_buffer`).  Every request runs as its own task, so
requests are served concurrently and answered out of order, except those
the device can finish at once without blocking: a READ the page cache or
RAM can answer (`BlockDev.pread_now`), and a small WRITE (or a
WRITE_ZEROES, TRIM) the device does synchronously with no write hook needing
to wait (`BlockDev.pwrite_now`, `zero_now`, `trim_now`; `blockdev.live`),
are done and answered in `_start`, with the same reply, stats and memory
release as on the task path.  A WRITE the device can hand to its I/O engine
(`BlockDev.pwrite_start`, `blockdev.ioengine`) is started there too and
answered from the engine's completion callback, again without a task.  A reply is
written with consecutive ``transport.write`` calls and no await between them,
so replies never interleave.

Batches (`NBDConnection._run_batches`; on unless ``Server(batch=False)`` or
``NBDBACKUP_SERVER_BATCH=0``): a client with many requests in flight sends
them back to back, so one receive often brings dozens of small READs and
WRITEs.  Those are run in one loop over the receive ring
(`ServerConnection.peek_batch`): no event, task, payload buffer or budget
step per request; a WRITE's payload goes to `BlockDev.pwrite_now` straight
from the ring, a READ is `BlockDev.pread_now` straight into the batch's
reply buffer, a WRITE_ZEROES or TRIM is `zero_now` / `trim_now`, and the replies of the whole batch leave in ONE
``transport.write``.  Each request is run exactly as its task-free path
would (`_write_now`, `_read_now`) and in order, so a READ after a WRITE in
the batch sees it.  A request the device cannot do now (a FUA the device
must wait for, a hook that must wait, a page-cache miss, an error) is handed
to the ordinary path (`_start`, its payload copied out of the ring) and the
batch goes on; one the batch does not take (another command, an invalid or
large request, a bad magic) ends the batch: it is parsed and started the
ordinary way, then batching resumes behind it (the protocol parses one
request at a time meanwhile, ``one_at_a_time``).  When a request cannot even
be started now (``max_inflight``, memory, the send buffer full), everything
left is parsed into events as before.  The batch's READ data is charged
to the budget (released once sent, as `_put_buf`); one batch's replies are
bounded by `BATCH_REPLY_MAX`, and batches stop while the transport is above
its high-water mark.  Nothing in a batch awaits, so quiescing and backup
start see it whole or not at all, like the task-free paths.

Back-pressure: when the transport's send buffer
is above its high-water mark, or ``max_inflight`` requests run, the
connection neither starts the requests already parsed (they wait, a few
dozen bytes each, in the protocol's queue) nor reads from the socket, until
both drain.

Memory (`nbd.budget`): every WRITE payload and READ reply buffer is charged
to one server-wide `MemoryBudget` (``max_buffer_memory``) before it exists.
A payload is charged as its bytes arrive: nothing for a bare header, then in
steps granted before the socket may fill them (`STEP`, then doubling up to
`STEP_MAX`, so the charge stays under twice what arrived); large payloads
are mmap-backed so only received pages are resident.  A READ charges its
length before its buffer is allocated and keeps the charge until the
transport has sent the reply (``_pending_bufs``, released by byte count
sent).  When the budget is spent the connection stops reading (payload) or
its request task waits (READ); the grant order and the reserve rule of
`nbd.budget` guarantee that one request can always complete.  Charges come
back when a request ends or its connection dies; pooled free buffers are
charged too and dropped when unused for 2-4 s (`MemoryBudget.decay`),
so RSS falls after a burst.  Outside the budget, per connection: the 256 KiB
receive ring (given back after `RING_IDLE` s quiet, reallocated on the next
receive: an idle VM disk costs a few KiB), the transport's send buffer up to its 4 MiB high-water mark
(past it no new request starts), and small replies.

Admission (`Server._admit`) and timers (`Server._housekeeping`, every
`TICK` s): a connection is *quiet* when nothing of it runs (no request task,
no parsed request waiting, not waiting for memory) and it has neither sent
a byte nor had a reply byte drain for a while.  Caps: ``max_connections``
in all, ``max_connections_per_peer`` per IP address on TCP and
``max_connections_per_uid`` per uid on Unix sockets (by default the global
cap: on a libvirt or Proxmox host every QEMU connects as the same uid).  A
connection in transmission (export chosen) is never closed to admit another:
for a VM it is its live disk, and an idle disk is quiet (closing it gave the
VM EIO on its next request; qemu-nbd and qemu-storage-daemon leave newcomers
waiting at their limits instead).  At a cap, only a connection still in the
handshake (plain or TLS) and quiet for at least `EVICT_QUIET` s may be
closed for the newcomer: at the per-peer cap one of the peer's own, at the
global cap the longest-quiet one of the peer with the most connections.
With no such connection the newcomer is held before the greeting (up to
`ADMIT_QUEUE` of them, oldest first) until a slot frees or such a
connection appears, at most until its handshake timeout; then it is refused:
greeted, every option answered ERR_POLICY naming the cap and how many
connections hold it (qemu and libnbd print it: "server busy: refused after
waiting 10 s for admission: ..."), closed after `REFUSE_LINGER` s at the latest, and logged.
It stays in the queue (counted, never admitted) until it is gone, so the
queue still bounds what refusals cost.  Beyond that queue a newcomer is
refused at once (closed before the greeting).  So what one peer can take is bounded by its cap, stalled
handshakes cannot hold slots against a newcomer, and slots of vanished
peers come back through their TCP timeouts.  A connection in transmission
that stays quiet for ``idle_timeout`` s (TCP; ``unix_idle_timeout`` on Unix
sockets; both 0 = never by default: an idle VM disk is a legitimate client)
is closed, as is one still in the handshake after ``handshake_timeout`` s.
A TCP peer that vanished (host down, partition: no FIN, no RST) is noticed
by TCP keepalive and TCP_USER_TIMEOUT, set on every admitted TCP connection
from ``dead_peer_timeout`` (`sockets.set_dead_peer_timeout`; the options stay
with the socket when it is handed to a worker or upgraded to TLS): its
connection is reset about that long after the peer last acknowledged
anything, its slot and buffers come back, while an idle peer that is alive
(its kernel answers the probes) keeps its connection.  When a request has waited `EVICT_QUIET` s for
memory, every connection that holds budget and has been quiet that long is
closed (a payload granted memory and not sent, replies not read: an idle
disk holds none and is never one; an evicted TCP connection the kernel
still holds unsent bytes for is reset, not closed gracefully, so they are
freed now rather than probing a closed window until the dead-peer timeout:
`_reset_if_unsent`).  A connection whose requests all wait for memory
while reply bytes of it sit unsent in its transport counts as quiet (it is
not reading; `NBDConnection.quiet`) from the tick its replies began to queue
or last drained, above its high-water mark or below it: with the budget's
owner-fair grants (`nbd.budget`: a READ of a connection holding little goes
before one of a connection holding more) many stalled readers share the
budget out below their high-water marks, and all of them are evicted in the
same pass (docs/fairmem.md: 24 stalled readers used to be evicted one per
`EVICT_QUIET` s, delaying another peer's client 8-11 s).  If the
oldest request has waited `MEMORY_STALL` s and unfinished payloads waiting
for more hold half the ordinary budget, they are shed, oldest payload first
(`Server._relieve_memory`).  So idle,
stalled-handshake and stalled-payload clients cannot lock a well-behaved
client of another peer out.

TLS (``Server(tls=ServerTLS(...))``): on the protocol's `StartTLS` event the
connection sends the ACK in clear, stops reading, and hands its transport
to ``loop.start_tls``; the TLS layer then feeds decrypted bytes back into the
same protocol object.  Decrypted bytes that arrive before ``start_tls``
returns are held unparsed (`buffer_updated`) until the upgraded transport is
in place and access control has seen the client certificate, so nothing is
parsed, answered or written in clear after the ACK.  A failed
TLS handshake closes the connection; the handshake timeout covers it.
During the TLS handshake the connection counts as quiet from its STARTTLS
on (its handshake bytes go to the TLS layer, not to us), so at a cap a
stalled TLS handshake is evicted like a stalled plain one.

Worker processes (``Server(workers=N)``, `nbd.worker`): a connection that
enters transmission on a plain file export is handed, socket and state, to
a worker process serving it with this same code; its `NBDConnection` here
stays as a placeholder (``remote``) that admission counts.  Write hooks
recall such connections first (`blockdev.live` "External writers").  When
the export's `LiveDev` says it is offloadable again (its offload listener:
hooks removed or idle, quiesce over) and stays so `REOFFLOAD_DELAY` s, the
connections served here that could go (recalled ones, ones made while a
backup was attached) are handed out again at a request boundary
(`Server._reoffload`, `NBDConnection._hand_off`).

Invariants:
- One bad client never harms another: a protocol violation closes only its
  connection (logged); a device error becomes an NBD error reply.
- CAN_MULTI_CONN is advertised only when the device says a FLUSH on one
  connection covers writes completed on every connection (one device object
  is shared by all connections of an export, so this holds for file and
  memory devices; a remote NBD device passes the remote server's promise on).
- After `remove_export`, requests on connections to it get ESHUTDOWN.  After
  `shutdown` begins no request is started any more: connections stop
  reading, requests received and not started stay unanswered, in-flight ones
  finish and are answered, every export is flushed, then connections close.
  A client that reconnects (QEMU with ``reconnect-delay``, across a restart
  of ``serve``) sends the unanswered ones again to the next server; an
  ESHUTDOWN reply instead made QEMU fail them to its guest (hunt 11).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import ssl
import struct
import termios
import time
from collections import deque
from dataclasses import dataclass, field

from ..blockdev.base import BASE_ALLOCATION, BlockDev
from ..blockdev.live import LiveDev
from ..errors import ConfigError
from ..sockets import DEAD_PEER_TIMEOUT, prepare_unix_socket, set_socket_access, set_dead_peer_timeout
from . import protocol as proto
from .budget import STEP, Charge, MemoryBudget, new_payload_buffer
from .protocol import (MAX_EXTENTS, Disconnect, ExportInfo, HandshakeDone, ProtocolViolation, Request,
                       ServerConnection, StartTLS)
from .access import AccessPolicy, peer_credentials
from .logsafe import WarningBudget, clip
from .stats import ExportStats
from .tls import ServerTLS
from .wire import MAX_PAYLOAD, Cmd, CmdFlag, StateFlag

_FUA, _DF, _NO_HOLE, _FAST_ZERO, _REQ_ONE = (int(CmdFlag.FUA), int(CmdFlag.DF), int(CmdFlag.NO_HOLE),
                                            int(CmdFlag.FAST_ZERO), int(CmdFlag.REQ_ONE))
_ZERO = int(StateFlag.ZERO)
_READ, _WRITE = int(Cmd.READ), int(Cmd.WRITE)
_WRITE_ZEROES, _TRIM = int(Cmd.WRITE_ZEROES), int(Cmd.TRIM)
#: Commands `NBDConnection._write_now` may run without a task.
_NOW_CMDS = frozenset((_WRITE, int(Cmd.WRITE_ZEROES), int(Cmd.TRIM)))

#: Batches on unless ``NBDBACKUP_SERVER_BATCH=0`` (A/B measurements, tests of the ordinary path).
BATCH_DEFAULT = os.environ.get("NBDBACKUP_SERVER_BATCH", "1") != "0"
#: Replies (READ data included) of one batch at most (then the next batch).
BATCH_REPLY_MAX = 256 * 1024

#: Decrypted bytes a client may send before our TLS upgrade completes.
_TLS_EARLY_MAX = 1024 * 1024

log = logging.getLogger("nbdbackup.server")

#: Seconds between housekeeping passes (idle timeouts, memory-pressure
#: eviction, pool decay).
TICK = 0.5
#: A connection still in the handshake must have been quiet this long to be
#: evicted for a newcomer; one holding budget, to be closed under memory pressure.
EVICT_QUIET = 0.5
#: A request waiting this long for memory makes the server shed unfinished
#: payloads that wait for more (see `Server._relieve_memory`).
MEMORY_STALL = 1.0
DEFAULT_BUFFER_MEMORY = 256 * 1024 * 1024
#: Largest single charge step of a payload (see `NBDConnection._pump_payload`).
STEP_MAX = 8 * 1024 * 1024
#: Connections held for admission at a cap (beyond: refused at once).
ADMIT_QUEUE = 64
#: Seconds a held connection refused at its handshake timeout has to read
#: why (the greeting, then ERR_POLICY for its options) before it is closed.
REFUSE_LINGER = 2.0
#: A connection in transmission quiet this long gives its empty receive ring
#: back (`ServerConnection.release_ring`): a host's idle VM disks cost ~7 KiB
#: each instead of ~263 KiB; the next receive allocates a new ring.
RING_IDLE = 5.0
#: An export must stay offloadable this long (no new offload signal) before
#: the connections served here go back to worker processes: a hook that
#: comes and goes does not move connections back and forth.
REOFFLOAD_DELAY = 1.0
#: Seconds a hand-off to a worker waits for the connection to drain (no
#: request running, every reply byte sent): a client that does not read its
#: replies keeps its connection here rather than lose the queued bytes.
HAND_OFF_DRAIN = 5.0
#: After this many connections went away, the heap is trimmed (`_trim_heap`)
#: once none has gone for `HEAP_TRIM_QUIET` s, or `HEAP_TRIM_INTERVAL` s
#: after the wave began, whichever comes first (`Server._arm_trim`).
HEAP_TRIM_CLOSES = 64
HEAP_TRIM_QUIET = 1.0
HEAP_TRIM_INTERVAL = 5.0


def _trim_heap() -> bool | None:
    """Give free heap memory back to the OS (glibc ``malloc_trim(0)``).

    Connections allocate many blocks below the mmap threshold (TLS state and
    records above all: ~0.4 MiB per stalled TLS handshake), which glibc
    keeps after they are freed: rounds of 240 stalled handshakes left a
    real server at 69, 85, 100 ... 179 MiB (start 41), approaching the
    peak of a round, with nothing alive (docs/hunt6.md).  A trim after a
    wave of closed connections returns it.  Returns whether memory was
    released, None where there is no glibc ``malloc_trim``.
    """
    try:
        import ctypes

        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return None


def _freeze_malloc_threshold() -> None:
    """Keep glibc's mmap threshold at its default (128 KiB).

    glibc raises the threshold to the size of any mmap-backed block that is
    freed (up to 32 MiB); after one 32 MiB buffer was freed, later large
    buffers came from the heap and stayed resident after being freed.  Any
    explicit M_MMAP_THRESHOLD turns that adjustment off, so large buffers
    stay mmap-backed and go back to the OS when freed.
    """
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass

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
        #: READs may be answered from base:allocation (`SPARSE_READ_MIN`; `Capabilities.sparse_reads`)
        self.sparse_reads = caps.can_extents and caps.sparse_reads

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


def budget_share(total: int, workers: int) -> int:
    """Each process's share of ``--max-buffer-memory`` when ``workers`` worker
    processes serve beside the owner: an equal part, never less than twice the
    largest request (`MemoryBudget` keeps one request's worth in reserve)."""
    return max(2 * MAX_PAYLOAD, total // (workers + 1))


class Server:
    """An NBD server with a mutable export table.

    Fields: ``exports`` (name -> Export, in insertion order: the first is the
    default export for an empty name); ``connections`` (live
    `NBDConnection`s); ``_servers`` (asyncio listeners); ``_unix_paths``
    (socket files `start_unix` created, unlinked at `shutdown`; sockets
    passed by systemd are not in it); ``stopping`` (set by
    `shutdown`); limits ``max_connections``, ``max_connections_per_peer``
    (TCP, per IP address), ``max_connections_per_uid`` (Unix sockets, per
    uid), ``handshake_timeout``, ``idle_timeout`` (TCP), ``unix_idle_timeout``,
    ``dead_peer_timeout`` (TCP keepalive and user timeout, 0: the kernel's
    defaults), ``max_inflight``; ``batch`` (small requests run in batches, see the
    module docstring); ``budget`` (the `MemoryBudget` of every request
    buffer); ``_by_peer`` (peer key -> its live connections, see
    `NBDConnection.peer_key`); ``_waiting`` (connections accepted at a cap,
    held before the greeting until they can be admitted, at most
    `ADMIT_QUEUE`); ``_tick`` (the housekeeping timer); ``_admission_log``
    (a `WarningBudget` for refusals and evictions, renewed every 2 s); ``tls``
    (a `ServerTLS`, mode "off" without one) and ``tls_context`` (built once,
    at construction, so bad credentials fail at start); ``access`` (an
    `AccessPolicy`, checked on Unix connections and after TLS);
    ``workers`` (worker processes asked for) and ``pool`` (their
    `nbd.worker.WorkerPool` once started by the first listener, else None);
    ``on_forget`` (called with each connection the server forgets, or None:
    a worker process reports it to its owner); ``reoffload_delay`` (see
    `REOFFLOAD_DELAY`) and ``_reoffload_timers`` (export name -> the timer
    that hands its connections out again, while one is armed);
    ``rehand_pause`` (seconds a re-hand-off waits between the connection's
    drain and the hand-off: 0 but in race tests); ``hand_off_drain``
    (`HAND_OFF_DRAIN`: how long a hand-off waits for the connection's
    requests to finish and its replies to leave before it gives up and
    serves the connection here); ``_closed_since_trim`` (connections
    forgotten since the last heap trim), ``_trim_timer`` (the armed
    `_trim_later` call, or None) and ``_trim_deadline`` (monotonic time it
    may be pushed back to at the latest): see `HEAP_TRIM_CLOSES`.
    """

    def __init__(self, *, max_connections: int = 1024, handshake_timeout: float = 10.0,
                 max_inflight: int = 64, tls: ServerTLS | None = None,
                 access: AccessPolicy | None = None, max_connections_per_peer: int = 64,
                 idle_timeout: float = 0.0, unix_idle_timeout: float = 0.0,
                 max_buffer_memory: int = DEFAULT_BUFFER_MEMORY, batch: bool | None = None,
                 workers: int = 0, dead_peer_timeout: float = DEAD_PEER_TIMEOUT,
                 max_connections_per_uid: int | None = None) -> None:
        if max_connections_per_uid is None:
            max_connections_per_uid = max_connections
        if min(max_connections, max_connections_per_peer, max_connections_per_uid) < 1:
            raise ConfigError("connection limits must be at least 1")
        if max_buffer_memory < 2 * MAX_PAYLOAD:
            raise ConfigError(f"buffer memory must be at least {2 * MAX_PAYLOAD >> 20} MiB "
                              f"(twice the largest request)")
        if min(handshake_timeout, idle_timeout, unix_idle_timeout, dead_peer_timeout) < 0:
            raise ConfigError("timeouts must not be negative")
        if workers < 0:
            raise ConfigError("the number of workers must not be negative")
        self.workers = workers
        self.pool = None
        self.on_forget = None
        self.reoffload_delay = REOFFLOAD_DELAY
        self._reoffload_timers: dict[str, asyncio.TimerHandle] = {}
        self.rehand_pause = 0.0
        self.hand_off_drain = HAND_OFF_DRAIN
        self.access = access if access is not None else AccessPolicy()
        self.tls = tls if tls is not None else ServerTLS("off")
        self.tls_context: ssl.SSLContext | None = self.tls.context() if self.tls.enabled else None
        self.exports: dict[str, Export] = {}
        self.connections: set[NBDConnection] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._unix_paths: list[str] = []
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.max_connections_per_uid = max_connections_per_uid
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.unix_idle_timeout = unix_idle_timeout
        self.dead_peer_timeout = dead_peer_timeout
        self.max_inflight = max_inflight
        self.batch = BATCH_DEFAULT if batch is None else batch
        self.stopping = False
        #: With workers the budget is split: the owner and every worker get an
        #: equal share, at least twice the largest request (so the processes
        #: together hold at most max(max_buffer_memory, (workers + 1) x 64 MiB)).
        self.budget = MemoryBudget(budget_share(max_buffer_memory, workers), MAX_PAYLOAD)
        #: ``--max-buffer-memory`` as configured (all processes together, see above).
        self.budget_total = max_buffer_memory
        self._by_peer: dict[object, set[NBDConnection]] = {}
        self._waiting: deque[NBDConnection] = deque()
        self._tick: asyncio.TimerHandle | None = None
        self._ticks = 0
        #: Refusals and evictions logged per 2 s (a connection flood must not
        #: flood the log); the rest are counted and summarised.
        self._admission_log = WarningBudget(20)
        self._closed_since_trim = 0
        self._trim_timer: asyncio.TimerHandle | None = None
        self._trim_deadline = 0.0
        _freeze_malloc_threshold()

    # ----------------------------------------------------------- exports

    def add_export(self, name: str, dev: BlockDev, *, read_only: bool = False,
                   description: str = "", owns_dev: bool = True) -> Export:
        if name in self.exports:
            raise ConfigError(f"export {name!r} already exists")
        if len(name.encode()) > 4096:
            raise ConfigError("export name longer than 4096 bytes")
        exp = Export(name, dev, read_only=read_only, description=description, owns_dev=owns_dev)
        self.exports[name] = exp
        if self.workers and isinstance(dev, LiveDev):
            dev.set_recaller(lambda: self._recall(exp))
            dev.set_offload_listener(lambda: self._offloadable(exp))
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

    async def remove_export(self, name: str, disconnect: bool = False) -> None:
        """Remove an export: its connections get ESHUTDOWN from now on; with
        ``disconnect``, once their requests in flight have finished, they
        are closed (QMP ``block-export-del`` mode ``hard``)."""
        exp = self.require(name)
        exp.removed = True
        del self.exports[name]
        if self.pool is not None:
            await self.pool.remove_export(name)
        await exp.wait_idle()
        if disconnect:
            for c in [c for c in self.connections if c.export is exp]:
                c.close(f"export {name!r} removed (block-export-del mode hard)")
        if exp.owns_dev:
            await exp.dev.close()
        log.info("export %r removed", name)

    async def _recall(self, exp: Export) -> None:
        """The recaller of ``exp``'s LiveDev: its worker connections come back."""
        if self.pool is not None:
            await self.pool.recall(exp)

    def _offloadable(self, exp: Export) -> None:
        """The offload listener of ``exp``'s LiveDev: it may be offloadable
        again.  (Re)arm the timer: connections go out only once no signal
        came for `reoffload_delay` s (debounce) and it still is then."""
        if self.pool is None or self.stopping or exp.removed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a hook removed outside the loop (teardown): nothing to move
            return
        old = self._reoffload_timers.pop(exp.name, None)
        if old is not None:
            old.cancel()
        self._reoffload_timers[exp.name] = loop.call_later(self.reoffload_delay, self._reoffload, exp)

    def _reoffload(self, exp: Export) -> None:
        """Hand every connection of ``exp`` served here that may go (not
        handing or closing, in transmission, `WorkerPool.can_take`: which
        checks `LiveDev.offload_ok`) back to a worker, each at its next
        request boundary (`NBDConnection._begin_handoff`)."""
        self._reoffload_timers.pop(exp.name, None)
        pool = self.pool
        if pool is None or self.stopping or exp.removed or self.exports.get(exp.name) is not exp:
            return
        for c in list(self.connections):
            if (c.remote is None and c.export is exp and c.transport is not None and not c._handing
                    and not c._closing and not c._tls_upgrading and c.proto.in_transmission
                    and pool.can_take(c)):
                c._begin_handoff(rehand=True)

    async def start_workers(self) -> None:
        """Start the worker processes (once; the listeners do it)."""
        if self.workers and self.pool is None and not self.stopping:
            from .worker import WorkerPool

            self.pool = WorkerPool(self, self.workers)
            await self.pool.start()

    async def _resume_returned(self, old: "NBDConnection", fd: int, data: bytes) -> None:
        """A worker gave ``old``'s socket back (a recall): serve it here, in
        transmission, from the bytes it had not consumed."""
        sock = socket.socket(fileno=fd)
        p = old.proto
        proto_ = ServerConnection.resumed(p.export, structured=p.structured, contexts=dict(p.contexts),
                                          max_payload=p.max_payload, paced_payloads=True, batching=self.batch)
        new = NBDConnection(self, resume=(proto_, data), replaces=old)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: new, sock=sock)
        except OSError as e:
            log.warning("connection %s: cannot resume it: %s", old.peer, e)
            sock.close()
            self._forget(old)

    def _swap(self, old: "NBDConnection", new: "NBDConnection") -> None:
        """``new`` takes ``old``'s place in the tables (no admission)."""
        self._forget(old, notify=False)
        self._register(new)

    def _register(self, conn: "NBDConnection") -> None:
        """Count ``conn`` in the connection tables (admitted or taken over)."""
        self.connections.add(conn)
        self._by_peer.setdefault(conn.peer_key, set()).add(conn)
        self._start_tick()

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

    # --------------------------------------------------------- admission

    def _admit(self, conn: "NBDConnection") -> str | None:
        """Make room for ``conn`` (evicting a quiet connection still in the
        handshake if a cap is reached) and register it; the reason it is
        refused, or None.  Never closes a connection in transmission."""
        if self.stopping:
            return "server stopping"
        mine = self._by_peer.get(conn.peer_key, set())
        victim, which = None, ""
        unix = conn.peer_key is not None and conn.peer_key[0] == "uid"
        cap = self.max_connections_per_uid if unix else self.max_connections_per_peer
        if len(mine) >= cap and cap < self.max_connections:  # (else the global cap says it)
            victim, which = self._victim(mine), "peer"
            if victim is None:
                flag = "--max-connections-per-uid" if unix else "--max-connections-per-peer"
                return (f"{len(mine)} connections from this {'uid' if unix else 'address'} already, "
                        f"none of them evictable ({flag} {cap})")
        elif len(self.connections) >= self.max_connections:
            victim, which = self._victim(self.connections), "server"
            if victim is None:
                return (f"{len(self.connections)} connections already, none of them evictable "
                        f"(--max-connections {self.max_connections})")
        if victim is not None:
            victim.evict(f"{which} connection limit reached: connection quiet in the handshake "
                         f"evicted for a new one from {conn.peer}")
        self._register(conn)
        return None

    def warn_admission(self, msg: str, *args) -> None:
        """A refusal or eviction: logged while this period's budget lasts."""
        if self._admission_log.allow():
            log.warning(msg, *args)

    def _enqueue(self, conn: "NBDConnection") -> bool:
        """Hold ``conn`` until it can be admitted; False when the queue is full."""
        if self.stopping or len(self._waiting) >= ADMIT_QUEUE:
            return False
        self._waiting.append(conn)
        self._start_tick()
        return True

    def _admit_waiting(self) -> None:
        """Admit held connections, oldest first, wherever room can be made."""
        for conn in list(self._waiting):
            if conn._closing:
                self._waiting.remove(conn)
                continue
            if conn.refusing:
                continue
            why = self._admit(conn)
            if why is None:
                self._waiting.remove(conn)
                conn._admitted()
            else:
                conn.held_why = why

    def _victim(self, among) -> "NBDConnection | None":
        """The connection to evict for a newcomer: still in the handshake
        (never one in transmission: an idle disk is quiet too, see the
        module docstring), quiet for at least `EVICT_QUIET` s, from the peer
        holding the most connections, quiet the longest.  A placeholder of a
        worker connection is always in transmission: never a victim."""
        now = time.monotonic()
        best, best_key = None, None
        for c in among:
            if c.remote is not None or c.proto.in_transmission:
                continue
            q = c.quiet(now)
            if q < EVICT_QUIET:
                continue
            key = (len(self._by_peer.get(c.peer_key, ())), q)
            if best_key is None or key > best_key:
                best, best_key = c, key
        return best

    def _forget(self, conn: "NBDConnection", notify: bool = True) -> None:
        if notify and self.on_forget is not None:
            self.on_forget(conn)
        self._closed_since_trim += 1
        if self._closed_since_trim >= HEAP_TRIM_CLOSES and not self.stopping:
            self._arm_trim()
        if not conn.admitted:
            try:
                self._waiting.remove(conn)
            except ValueError:
                pass
            return
        if conn in self.connections and self._waiting:
            asyncio.get_running_loop().call_soon(self._admit_waiting)
        self.connections.discard(conn)
        peers = self._by_peer.get(conn.peer_key)
        if peers is not None:
            peers.discard(conn)
            if not peers:
                del self._by_peer[conn.peer_key]

    def _relieve_memory(self, now: float) -> None:
        """A request has waited `EVICT_QUIET` s for memory.  Close every
        connection that holds budget and has been quiet that long (granted
        payload memory it does not fill, replies it does not read).  If the
        oldest request has waited `MEMORY_STALL` s and at least half the
        ordinary budget is held by partial payloads that themselves wait for
        more (only one of them at a time can finish through the reserve;
        legitimate load instead holds memory in running requests, which give
        it back), shed those, oldest payload first, until half the ordinary
        budget is freed.
        """
        budget = self.budget
        for c in list(self.connections):
            held = c.held_memory()
            if held and c.quiet(now) >= EVICT_QUIET:
                c.evict(f"holds {held} bytes of buffer memory that others wait for, and stalls")
        if not budget.waiting or budget.oldest_wait() < MEMORY_STALL:
            return
        partial = sorted((c for c in self.connections if c.partial_payload_waiting()),
                         key=lambda c: c.payload_since)
        goal = budget.ordinary_limit // 2
        if sum(c.held_memory() for c in partial) < goal:
            return
        freed = 0
        for c in partial:
            if freed >= goal:
                break
            held = c.held_memory()
            c.evict(f"buffer memory exhausted for {MEMORY_STALL:g} s: shedding the oldest unfinished "
                    f"WRITE payload ({held} bytes held, started {now - c.payload_since:.1f} s ago)")
            freed += held

    def _arm_trim(self) -> None:
        """Trim `HEAP_TRIM_QUIET` s after the wave's last close (each close
        pushes it back), but no later than `HEAP_TRIM_INTERVAL` s after the
        wave reached `HEAP_TRIM_CLOSES` closes."""
        now = time.monotonic()
        if self._trim_timer is None:
            self._trim_deadline = now + HEAP_TRIM_INTERVAL
        else:
            self._trim_timer.cancel()
        at = min(now + HEAP_TRIM_QUIET, self._trim_deadline)
        self._trim_timer = asyncio.get_running_loop().call_later(at - now, self._trim_later)

    def _trim_later(self) -> None:
        """A wave of connections went away (`HEAP_TRIM_CLOSES`): trim the heap."""
        self._trim_timer = None
        self._closed_since_trim = 0
        t = time.monotonic()
        released = _trim_heap()
        log.debug("heap trimmed after closed connections (%s) in %.1f ms", released, 1000 * (time.monotonic() - t))

    def _start_tick(self) -> None:
        if self._tick is None and not self.stopping:
            self._tick = asyncio.get_running_loop().call_later(TICK, self._housekeeping)

    def _housekeeping(self) -> None:
        """Every `TICK` s while connections exist: idle timeouts, memory
        that replies have released, memory-pressure eviction, pool decay."""
        self._tick = None
        now = time.monotonic()
        for c in list(self.connections):
            c.housekeeping(now)
        if self._waiting:
            self._admit_waiting()
        budget = self.budget
        if budget.waiting and budget.oldest_wait() >= EVICT_QUIET:
            self._relieve_memory(now)
        self._ticks += 1
        if self._ticks % 4 == 0:
            budget.decay()
            dropped = self._admission_log.summary()
            if dropped:
                log.warning("admission: %s", dropped.replace("per connection", "per 2 s"))
            self._admission_log.logged = 0
        if self.connections or budget.pooled or self._waiting:
            self._start_tick()

    # --------------------------------------------------------- listeners

    def _factory(self) -> "NBDConnection":
        return NBDConnection(self)

    async def start_unix(self, path: str, mode: int | None = None, gid: int | None = None) -> None:
        """Listen on the Unix socket ``path``; ``mode``/``gid``: see `sockets.set_socket_access`."""
        prepare_unix_socket(path, "NBD socket")
        await self.start_workers()
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
        await self.start_workers()
        if sock.family == socket.AF_UNIX:
            srv = await loop.create_unix_server(self._factory, sock=sock, backlog=socket.SOMAXCONN)
        else:
            srv = await loop.create_server(self._factory, sock=sock, backlog=socket.SOMAXCONN)
        self._servers.append(srv)
        log.info("listening on passed socket %r", sock.getsockname())

    async def start_tcp(self, host: str, port: int) -> int:
        await self.start_workers()
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
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None
        for t in self._reoffload_timers.values():
            t.cancel()
        self._reoffload_timers.clear()
        for c in list(self._waiting):
            c.evict("server shutting down")
        for srv in self._servers:
            srv.close()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        if self.pool is not None:
            # Workers drain, flush and close theirs (and exit) first.
            await self.pool.shutdown(timeout)
        conns = [c for c in self.connections if c.remote is None]
        for c in conns:
            c._update_reading()  # stops: nothing new is read or started (see the module docstring)
        for c in self.connections - set(conns):
            self._forget(c, notify=False)
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


def _reset_if_unsent(transport) -> None:
    """Before an eviction closes a TCP connection: if the kernel still holds
    bytes for it that the peer has not taken (a client that stopped reading,
    its receive window closed), make the close a reset (SO_LINGER 0), which
    frees them now.  A plain close would leave the socket orphaned in
    FIN-WAIT-1 with its send queue (~6 MiB on loopback) probing the closed
    window until the dead-peer timeout (60 s) -- kernel memory a client
    could pile up by letting itself be evicted again and again (doubts18
    item 2).  A connection with nothing unsent closes gracefully as before."""
    sock = transport.get_extra_info("socket")
    if sock is None or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        unsent = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        if unsent > 0 or transport.get_write_buffer_size() > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (OSError, ValueError):
        pass


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
    Admission and memory: ``peer_key`` (what per-peer limits count: the IP
    address on TCP, the uid on Unix sockets); ``is_unix``; ``admitted``
    (False while it waits in ``Server._waiting``); ``held_why`` (why it
    waits, logged and told to the client if it is refused); ``refusing``
    (refused while held: greeted and denied, closed within `REFUSE_LINGER`
    s; still in ``_waiting``, never admitted); ``_creds`` (SO_PEERCRED
    on Unix sockets); ``_last_active``
    (`time.monotonic` of the last byte received or reply byte drained; the
    loop's clock has only millisecond resolution under uvloop);
    ``_tx_total`` (bytes handed to the transport so far), ``_tx_seen`` and
    ``_tx_backlog`` (of those, bytes sent and still queued as of the last
    tick: queued replies that drain show a client reading);
    ``_charge`` (the `Charge` of the payload being received);
    ``_payload_charges`` (id of a received payload -> its Charge, until its
    request task takes it);
    ``_mem_wait`` (reading paused until the budget grants the next payload
    step); ``payload_since`` (`time.monotonic` when the current payload's
    first byte arrived); ``_mem_futures`` (READ tasks waiting for memory);
    ``_pending_bufs`` ((end of the reply in ``_tx_total`` terms, buffer,
    Charge) of READ replies the transport may still hold); ``batched``
    (requests answered by `_run_batches` so far, and ``batches`` how many
    batches: for tests and diagnosis).
    Worker processes (`nbd.worker`): ``_resume`` ((resumed `ServerConnection`,
    bytes to feed it) for a connection taken over in transmission, else
    None) and ``_replaces`` (the placeholder it replaces in the tables, or
    None); ``_handing`` (the socket is being handed over: nothing is read
    or started); ``remote`` ((worker handle, id) once handed off: this
    object is then a placeholder); ``_ext_live`` (the LiveDev counting it
    as an external writer, or None); ``_detached`` (the transport was
    dropped because another process has the socket: its loss is no close).
    """

    def __init__(self, server: Server, resume: tuple | None = None,
                 replaces: "NBDConnection | None" = None) -> None:
        self.server = server
        if resume is not None:
            self.proto = resume[0]
        else:
            self.proto = ServerConnection(server._lookup, server._list, tls=server.tls.mode,
                                          paced_payloads=True, batching=server.batch)
        self._resume = resume
        self._replaces = replaces
        self._handing = False
        self.remote: tuple | None = None
        #: A placeholder whose worker was asked to evict it: it keeps its slot
        #: (and is no victim again) until the worker says "closed" or "kept".
        self._evicting = False
        self._ext_live = None
        self._detached = False
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
        self._budget = server.budget
        self._pending_bufs: deque[tuple[int, object, Charge]] = deque()
        self._tx_total = 0
        self._tx_seen = 0
        self._tx_backlog = 0
        self._writev = False
        self.peer_key: object = None
        self.is_unix = False
        self.admitted = False
        #: Why admission holds it (`Server._admit`'s last answer), for the refusal.
        self.held_why = ""
        #: Refused at its handshake timeout: telling the client why (`_refuse`).
        self.refusing = False
        self._creds: tuple[int, int, int] | None = None
        self._last_active = 0.0
        self._charge: Charge | None = None
        self._payload_charges: dict[int, Charge] = {}
        self._mem_wait = False
        self._mem_futures: set[asyncio.Future] = set()
        self.payload_since = 0.0
        self.batched = 0
        self.batches = 0

    # ------------------------------------------------------ asyncio hooks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._last_active = time.monotonic()
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        sock = transport.get_extra_info("socket")
        creds = None
        if sock is not None and sock.family == socket.AF_UNIX:
            self.is_unix = True
            creds = peer_credentials(sock)
            if creds is not None:
                self.peer = f"unix pid {creds[0]} uid {creds[1]}"
            self.peer_key = ("uid", creds[1] if creds is not None else None)
        else:
            self.peer_key = ("ip", peer[0] if isinstance(peer, tuple) else None)
        self._creds = creds
        if self._resume is not None:
            self._resumed()
            return
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self.server.handshake_timeout, self._handshake_timeout
        )
        why = self.server._admit(self)
        if why is None:
            self._admitted()
        elif self.server._enqueue(self):
            # Held before the greeting until a quiet connection can be
            # evicted or a slot frees (`Server._admit_waiting`), at most
            # until the handshake timeout.
            log.info("connection from %s waits for admission: %s", self.peer, why)
            self.held_why = why
            transport.pause_reading()
            self._reading_paused = True
        else:
            self.server.warn_admission("connection from %s refused: %s", self.peer, why)
            self._closing = True
            if self._handshake_timer:
                self._handshake_timer.cancel()
            transport.abort()

    def _resumed(self) -> None:
        """A connection taken over in transmission (`nbd.worker`): no
        admission (its slot is counted where the handshake ran, or it takes
        the place of ``_replaces``), no greeting; feed the bytes the
        previous holder received and did not consume."""
        server = self.server
        self.admitted = True
        proto_, data = self._resume
        self._resume = None
        self.export = server.export_for(proto_.export.name)
        if self._replaces is not None:
            self.peer = self._replaces.peer
            server._swap(self._replaces, self)
            self._replaces = None
        else:
            server._register(self)
        self._tune()
        if data:
            self._feed(data)
        self._process_events()
        self._update_reading()

    def _detach_transport(self) -> None:
        """Another process has the socket now: drop ours without shutdown(2)
        (closing one descriptor of a socket another process holds sends
        nothing), releasing every charge."""
        self._detached = True
        self._handing = False
        self._closing = True
        if self._handshake_timer:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._release_memory()
        t = self.transport
        if t is not None:
            t.abort()
        # Its 256 KiB receive ring went with the state: 300 idle VM disks in
        # workers cost 522 KiB each before (the ring here and there), 263 after.
        self.proto.release_ring(force=True)

    def _begin_handoff(self, rehand: bool = False) -> None:
        self._handing = True
        self._update_reading()
        asyncio.ensure_future(self._hand_off(rehand))

    async def _hand_off(self, rehand: bool = False) -> None:
        """Stop at a request boundary, then hand the socket to a worker
        (`nbd.worker.WorkerPool.hand_off`); if it cannot go, serve it here
        as usual.  After the handshake (``rehand`` False) that is: the GO
        reply has left.  A re-hand-off (``rehand``: a connection served
        here in transmission, `Server._reoffload`) is the worker's
        give-back on this side: reading is paused (``_handing``: what
        arrives is parsed, not started), every request in flight finishes
        and every reply byte leaves, then `hand_off` re-serialises what was
        received and not consumed.  `hand_off` checks `offload_ok` again
        with no await before the socket goes: a hook attached meanwhile (a
        backup start, a first bitmap) wins, and the connection stays here.
        While it waits, a lost offloadability ends the wait at once."""
        pool = self.server.pool
        stop = (lambda: pool is None or not pool.can_take(self)) if rehand else None
        drained = await self.drain_for_hand_off(self.server.hand_off_drain, stop)
        if self._closing or self.transport is None:
            return
        if drained and rehand and self.server.rehand_pause:
            await asyncio.sleep(self.server.rehand_pause)  # tests: a hook attach races with us
            if self._closing or self.transport is None:
                return
        # Only a drained connection goes: a reply still queued would be lost.
        if drained and pool is not None and not self.tasks and pool.hand_off(self, rehand=rehand):
            return
        self._handing = False
        self._process_events()
        self._update_reading()

    async def drain_for_hand_off(self, timeout: float, stop=None) -> bool:
        """With reading paused (``_handing``): wait until no request of this
        connection runs and every reply byte has left its transport.  True
        when so; False when the connection closed or lost its transport,
        ``timeout`` s passed, or ``stop()`` said to give up (the callers, a
        hand-off here and a give-back in a worker, tell these apart)."""
        deadline = time.monotonic() + timeout
        while not self._closing:
            self._flush_wbuf()
            t = self.transport
            if t is None:
                return False
            if not self.tasks and not t.get_write_buffer_size():
                return True
            if time.monotonic() > deadline or (stop is not None and stop()):
                return False
            if self.tasks:
                await asyncio.wait(list(self.tasks), timeout=0.05)
            else:
                await asyncio.sleep(0.002)
        return False

    def _admitted(self) -> None:
        """Admission granted: tune the socket, check access, send the greeting."""
        transport = self.transport
        assert transport is not None
        self.admitted = True
        self._tune()
        if self.is_unix and self.server.access.limits_unix:
            why = self.server.access.check_unix(self._creds)
            if why is not None:
                self._warn("connection %s refused: %s", self.peer, why)
                self.proto.deny(why)
        self._last_active = time.monotonic()
        self._flush_handshake()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _tune(self) -> None:
        """Write-buffer limits and socket options of an admitted connection."""
        transport = self.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        transport.set_write_buffer_limits(high=4 * 1024 * 1024, low=1024 * 1024)
        # uvloop's writelines is one writev; asyncio's (3.11) joins, i.e. copies.
        self._writev = type(transport).__module__.startswith("uvloop")
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
            set_dead_peer_timeout(sock, self.server.dead_peer_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._detached:
            return  # another process serves it now
        self.server._forget(self)
        if self._handshake_timer:
            self._handshake_timer.cancel()
        self._closing = True
        self._release_memory()
        self.proto.close()
        for f in self._drain_waiters:
            if not f.done():
                f.set_result(None)
        # Over TLS the transport and its SSL protocol keep bound methods of
        # this object after the loss (asyncio and uvloop alike): a reference
        # cycle that only a full garbage collection frees, with everything
        # the closed connection and its TLS layer held -- about 20 MiB each
        # for clients that stopped reading (hunt 6).  Nothing uses the
        # transport after this.
        self.transport = None
        self._tls_stage = memoryview(b"")
        log.info("connection %s closed (%s%s)", self.peer,
                 f"export {self.export.name!r}" if self.export else "during handshake",
                 f", {self.batched} requests in {self.batches} batches" if self.batches else "")
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
        self._last_active = time.monotonic()
        p = self.proto
        if p.payload_received(nbytes):
            # The middle of a large WRITE's payload: no event, not blocked,
            # so `_pump_payload` and `_process_events` below would do nothing
            # new (events held back before wait for what releases them).
            return
        if self._handing:
            p.buffer_updated(nbytes)  # parsed, not started (`unconsumed` re-sends it)
            self._pump_payload()
            return
        if p.batching and p.batchable and self.export is not None:
            p.buffer_updated(nbytes, parse=False)
            # Batches, and between them the one request a batch stopped at,
            # the ordinary way; then batching resumes behind it.
            p.one_at_a_time = True
            idle = 0
            try:
                while not self._closing:
                    # Two passes in a row with nothing to batch (a stream of
                    # large requests): parse the rest at once, as before.
                    idle = 0 if self._run_batches() else idle + 1
                    if idle == 2:
                        break
                    p.parse()
                    self._pump_payload()
                    if not p.has_events:
                        break
                    self._process_events()
                    if not p.batchable:
                        break
            finally:
                p.one_at_a_time = False
            p.parse()
        else:
            p.buffer_updated(nbytes)
        self._pump_payload()
        self._process_events()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def pause_writing(self) -> None:
        self._paused_writing = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        self._free_sent()
        if self.proto.has_events and not self._closing:
            self._process_events()
        self._update_reading()

    # ----------------------------------------------------------- helpers

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or self._closing or self._tls_upgrading:
            return
        want_pause = (self._paused_writing or len(self.tasks) >= self.server.max_inflight
                      or self.proto.has_events or self._mem_wait or self._handing
                      or self.server.stopping)
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            t.pause_reading()
        elif not want_pause and self._reading_paused:
            self._reading_paused = False
            # Time spent paused by us does not count as the client's silence.
            self._last_active = time.monotonic()
            t.resume_reading()

    def _warn(self, msg: str, *args) -> None:
        """A warning caused by this client: logged while its `WarningBudget`
        lasts, then only counted (a client must not be able to flood the log).
        Client-supplied text in ``args`` must already be `clip`-ped.
        Before transmission (handshake, TLS, access refusals) a client can
        open connection after connection, each with a fresh budget: those
        warnings also share the server's admission budget (`warn_admission`:
        20 per 2 s, the rest counted in one line)."""
        if not self._warnings.allow():
            return
        if self.proto.in_transmission:
            log.warning(msg, *args)
        else:
            self.server.warn_admission(msg, *args)

    def _handshake_timeout(self) -> None:
        self._handshake_timer = None
        if self.refusing and not self._closing:
            self.evict("refused, and still connected after it was told why")
        elif not self.admitted and not self._closing:
            self._refuse(f"refused after waiting {self.server.handshake_timeout:g} s for admission: "
                         f"{self.held_why}")
        elif not self.proto.in_transmission and not self._closing:
            self._warn("connection %s: handshake timed out", self.peer)
            self.close("handshake timeout")

    def _refuse(self, why: str) -> None:
        """A held connection's handshake timeout: greet it and answer every
        option ERR_POLICY with ``why`` (the client reports the cap instead of
        an EOF before the greeting), then close it within `REFUSE_LINGER` s."""
        self.server.warn_admission("connection %s %s", self.peer, why)
        self.refusing = True
        self.proto.deny(why, "server busy")
        self._flush_handshake()
        self._handshake_timer = asyncio.get_running_loop().call_later(REFUSE_LINGER, self._handshake_timeout)
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _flush_handshake(self) -> None:
        data = self.proto.data_to_send()
        if data and self.transport and not self._closing:
            self.transport.write(data)
            self._tx_total += len(data)

    def close(self, reason: str) -> None:
        if self.remote is not None:
            self.server.pool.evict(self, reason, -1.0)
            return
        if self._closing:
            return
        self._closing = True
        self.server._forget(self)
        self.proto.close()
        if self.transport:
            self.transport.close()

    def evict(self, reason: str) -> None:
        """Close now, dropping unsent replies (admission, timeouts, memory)."""
        if self.remote is not None:
            # The worker re-checks: still quiet long enough, else "kept".
            self.server.warn_admission("connection %s (in a worker) closed: %s", self.peer, reason)
            self.server.pool.evict(self, reason, EVICT_QUIET)
            return
        if self._closing:
            return
        self.server.warn_admission("connection %s closed: %s", self.peer, reason)
        self._closing = True
        self.server._forget(self)
        self._release_memory()
        self.proto.close()
        if self.transport:
            _reset_if_unsent(self.transport)
            self.transport.abort()

    # ------------------------------------------------ admission and memory

    def quiet(self, now: float) -> float:
        """Seconds this connection has been quiet (see the module docstring),
        or -1 while something of it runs or waits on the server.  Parsed
        requests held back because the client does not read its replies
        (send buffer above the high-water mark) do not count as running.
        A placeholder: what its worker reported, aged.  Requests that wait
        for buffer memory while the client does not read its replies (the
        memory they wait for is held, in part, by those very replies) do not
        count as running either: such a connection would otherwise never be
        quiet, never time out and never give its memory back.  That holds
        whenever reply bytes of it are unsent (`_replies_unsent`), not only
        above the high-water mark (docs/fairmem.md); ``_pending_bufs`` is
        current here as `housekeeping` ran `_free_sent` just before."""
        if self.remote is not None:
            return self.server.pool.quiet(self, now)
        if self._closing or self._mem_wait:
            return -1.0
        if self._tls_upgrading:
            # In the TLS handshake (raw bytes go to the TLS layer, not to us):
            # quiet since the STARTTLS option arrived.  A real handshake takes
            # a few round trips; a stalled one must be evictable like a
            # stalled plain handshake, or it holds its slot until the
            # handshake timeout (hunt 6).
            return now - self._last_active
        stalled = bool(self.tasks) and len(self._mem_futures) >= len(self.tasks) and self._replies_unsent()
        if self.tasks and not stalled:
            return -1.0
        if self.proto.has_events and not (self._paused_writing or stalled):
            return -1.0
        return now - self._last_active

    def _replies_unsent(self) -> bool:
        """Reply bytes wait in the transport (the client has not taken them
        yet): above the high-water mark, or below it with replies that hold
        budget.  Many such connections can share the budget out below their
        high-water marks (docs/fairmem.md), so "paused" alone is not the test."""
        return self._paused_writing or bool(self._pending_bufs)

    def partial_payload_waiting(self) -> bool:
        """Holds part of a WRITE payload and waits for memory for the rest."""
        return self._mem_wait and self._charge is not None and self._charge.held > 0

    def held_memory(self) -> int:
        """Budget bytes held by this connection's payloads and queued replies."""
        n = sum(c.held for c in self._payload_charges.values())
        return n + sum(ch.held for _, _, ch in self._pending_bufs)

    def housekeeping(self, now: float) -> None:
        """Per tick: notice drained replies, release their memory, idle timeout."""
        t = self.transport
        if t is None or self._closing or self.remote is not None:
            return  # (a worker times its own connections out)
        backlog = t.get_write_buffer_size()
        sent = self._tx_total - backlog
        if sent > self._tx_seen and self._tx_backlog:  # the client read queued replies
            self._last_active = now
        elif backlog and not self._tx_backlog:
            # Replies began to queue: judge the client's reading from now on, not
            # from its last request (a busy reader's backlog drains by the next tick).
            self._last_active = now
        self._tx_seen, self._tx_backlog = sent, backlog
        self._free_sent()
        timeout = self.server.unix_idle_timeout if self.is_unix else self.server.idle_timeout
        if self.proto.in_transmission:
            q = self.quiet(now)
            if timeout > 0 and q >= timeout:
                self.evict(f"idle for {q:.0f} s (idle timeout {timeout:g} s)")
            elif q >= RING_IDLE and not self._handing:
                self.proto.release_ring()

    def _release_memory(self) -> None:
        """The connection is gone: every charge not owned by a running task comes back."""
        budget = self._budget
        budget.cancel(self)
        self._mem_wait = False
        for f in self._mem_futures:
            if not f.done():
                f.set_exception(OSError(errno.ESHUTDOWN, "connection closed"))
        self._mem_futures.clear()
        while True:
            ev = self.proto.next_event()
            if ev is None:
                break
            if isinstance(ev, Request) and ev.payload is not None:
                ch = self._payload_charges.pop(id(ev.payload), None)
                if ch is not None:
                    budget.release(ch)
        for ch in self._payload_charges.values():
            budget.release(ch)  # the payload being received
        self._payload_charges.clear()
        self._charge = None
        while self._pending_bufs:
            _, _, ch = self._pending_bufs.popleft()
            budget.release(ch)

    def _pump_payload(self) -> None:
        """Grant the payload being received the memory it needs next (the
        first `STEP`, then as much again as was granted, at most `STEP_MAX`;
        all of it at once from the pool), or queue for it and stop reading."""
        p = self.proto
        budget = self._budget
        while p.payload_blocked and not self._mem_wait and not self._closing:
            length, need = p.payload_length, p.payload_need
            if need == length:  # the first grant of a new payload
                self.payload_since = time.monotonic()
                ch = self._charge = Charge(self)
                buf = budget.take_pooled(ch, length, mapped=length > STEP)
                if buf is not None:
                    self._payload_charges[id(buf)] = ch
                    p.allow_payload(length, buf)
                    continue
                n = min(length, STEP)
            else:
                ch = self._charge
                assert ch is not None
                # Steps double what was granted (fewer waits for a large
                # payload), so the charge stays under twice what arrived.
                n = min(need, max(STEP, min(length - need, STEP_MAX)))
            if budget.try_take(ch, n):
                self._grant_payload(n)
                continue
            self._mem_wait = True
            self._update_reading()
            budget.wait(ch, n, self._payload_granted, whole=need)
            return

    def _grant_payload(self, n: int) -> None:
        p = self.proto
        buf = None
        if p.payload_need == p.payload_length:
            buf = new_payload_buffer(p.payload_length)
            assert self._charge is not None
            self._payload_charges[id(buf)] = self._charge
        p.allow_payload(n, buf)

    def _payload_granted(self, n: int) -> None:
        """Budget callback: the queued payload step was charged."""
        self._mem_wait = False
        if self._closing:
            return
        self._last_active = time.monotonic()  # the wait was ours
        self._grant_payload(n)
        self._pump_payload()
        self._process_events()
        self._update_reading()

    async def _reserve(self, n: int, *, buffer: bool = True) -> tuple[Charge, bytearray | None]:
        """Charge ``n`` bytes for a READ reply and allocate its buffer (if
        ``buffer``), waiting in the budget's FIFO when it is spent."""
        self._free_sent()
        budget = self._budget
        ch = Charge(self)
        buf = budget.take_pooled(ch, n) if buffer else None
        if buf is not None:
            return ch, buf
        if n and not budget.try_take(ch, n):
            fut = asyncio.get_running_loop().create_future()
            self._mem_futures.add(fut)

            def granted(_n: int) -> None:
                if not fut.done():
                    fut.set_result(None)
            try:
                budget.wait(ch, n, granted)
                await fut
            except BaseException:
                budget.cancel(ch)
                budget.release(ch)
                raise
            finally:
                self._mem_futures.discard(fut)
        return ch, bytearray(n) if buffer else None

    def _free_sent(self) -> None:
        """Release the READ buffers whose reply bytes have left the transport."""
        pending = self._pending_bufs
        if not pending or self.transport is None:
            return
        sent = self._tx_total - self.transport.get_write_buffer_size()
        budget = self._budget
        while pending and pending[0][0] <= sent:
            _, buf, ch = pending.popleft()
            budget.release(ch, buf)

    def _process_events(self) -> None:
        if self._handing:
            return  # the queued requests go with the socket
        proto_ = self.proto
        stopping = self.server.stopping  # (set only by `Server.shutdown`, never from inside this loop)
        while True:
            # Bound: at most max_inflight requests run; the rest stay parsed
            # (small) in the protocol's queue until a task finishes, and the
            # socket stays paused meanwhile (`_update_reading`).
            if len(self.tasks) >= self.server.max_inflight or self._paused_writing:
                break
            if stopping and proto_.in_transmission:
                break  # unanswered: a reconnecting client sends it again (`Server.shutdown`)
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
                pool = self.server.pool
                if pool is not None and pool.can_take(self):
                    self._flush_handshake()
                    self._begin_handoff()
                    return
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
        self._last_active = time.monotonic()  # the handshake finished: not quiet
        log.info("connection %s: TLS %s, %s", self.peer, new.get_extra_info("ssl_object").version(),
                 new.get_extra_info("cipher", ("?",))[0])
        why = self.server.access.check_certificate(new.get_extra_info("peercert"))
        if why is not None:
            self._warn("connection %s refused: %s", self.peer, why)
            self.proto.deny(why)
        self._tls_stage = memoryview(b"")
        if self._tls_early:
            early, self._tls_early = bytes(self._tls_early), bytearray()
            self._feed(early)
        self._flush_handshake()
        self._process_events()
        self._update_reading()

    def _feed(self, data: bytes) -> None:
        """Feed bytes that did not come through `get_buffer` (TLS early data)."""
        mv = memoryview(data)
        while mv and not self._closing:
            buf = self.proto.get_buffer(len(mv))
            if not len(buf):  # a paced payload waits for memory and the ring is full
                self.evict("too much data during the TLS upgrade")
                return
            n = min(len(buf), len(mv))
            buf[:n] = mv[:n]
            mv = mv[n:]
            self.proto.buffer_updated(n)
            self._pump_payload()

    async def _close_when_idle(self, reason: str) -> None:
        await self.drain_requests()
        self.close(reason)

    async def drain_requests(self) -> None:
        while self.tasks:
            await asyncio.wait(list(self.tasks))

    def _start(self, req: Request) -> None:
        cmd = req.cmd
        if cmd == _READ:
            if self._read_now(req):
                return
        elif cmd in _NOW_CMDS and self._write_now(req):
            return
        ch = self._payload_charges.pop(id(req.payload), None) if req.payload is not None else None
        task = asyncio.ensure_future(self._handle(req, ch))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        self._update_reading()

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if self.proto.has_events and not self._closing:
            self._process_events()
        self._update_reading()

    def _run_batches(self) -> bool:
        """Run the small READs and WRITEs (and the WRITE_ZEROES and TRIMs)
        waiting whole in the receive ring,
        a batch at a time (see the module docstring), until the ring holds
        no more, or the transport is above its high-water mark.  A request
        the device cannot do now is handed to the ordinary path
        (`_hand_over`) and the batch goes on; when even that cannot be done
        now (``max_inflight``, memory), the batch stops there.  The caller
        (`buffer_updated`) runs the request a batch stopped at the ordinary
        way, then batches again; what is left when nothing more can run is
        parsed into events as usual.  True when it ran (or handed over) any
        request."""
        p = self.proto
        exp = self.export
        t = self.transport
        if exp is None or exp.removed or self.server.stopping or t is None:
            return False
        dev = exp.dev
        budget = self._budget
        # Same limits as the task-free paths: a structured READ long enough
        # to be sent sparse needs its extents (`_read_now`), so it is not taken.
        read_max = SPARSE_READ_MIN - 1 if p.structured and exp.sparse_reads else MAX_PAYLOAD
        ran = False
        while not self._paused_writing and not self._closing:
            items, out_len, read_len = p.peek_batch(read_max, proto.BATCH_MAX, BATCH_REPLY_MAX)
            if not items:
                return ran
            t0 = time.perf_counter_ns()
            ch = None
            if read_len:
                self._free_sent()
                ch = Charge(self)
                if not budget.try_take(ch, read_len):
                    # No memory now: the READs (and what follows them) wait on the ordinary path.
                    ch = None
                    k = next(i for i, it in enumerate(items) if it[0] == _READ)
                    if not k:
                        return ran
                    del items[k:]
                    out_len = sum(len(it[7]) for it in items)
            out = bytearray(out_len)
            mv = memoryview(out)
            ring = p.ring
            o = nw = bw = nr = br = handed = 0
            zt = [0, 0, 0, 0]  # WRITE_ZEROES requests, bytes; TRIM requests, bytes
            next_pos = -1
            for cmd, fua, cookie, offset, length, ppos, nxt, hdr in items:
                h = len(hdr)
                try:
                    if cmd == _WRITE:
                        done = dev.pwrite_now(ring[ppos:ppos + length], offset, fua)
                    elif cmd == _READ:
                        done = dev.pread_now(mv[o + h:o + h + length], offset)
                    elif cmd == _WRITE_ZEROES:  # ``fua``: all its flags (`peek_batch`)
                        done = dev.zero_now(offset, length, may_trim=not fua & _NO_HOLE,
                                            fua=bool(fua & _FUA), fast=bool(fua & _FAST_ZERO))
                    else:
                        done = dev.trim_now(offset, length, fua=bool(fua))
                except Exception:
                    # As on the task-free paths: the ordinary path runs it
                    # again and reports its error (or the bug).
                    done = False
                if done:
                    mv[o:o + h] = hdr
                    if cmd == _WRITE:
                        o += h
                        nw += 1
                        bw += length
                    elif cmd == _READ:
                        o += h + length
                        nr += 1
                        br += length
                    else:
                        o += h
                        k = 0 if cmd == _WRITE_ZEROES else 2
                        zt[k] += 1
                        zt[k + 1] += length
                elif self._hand_over(cmd, fua, cookie, offset, length, ring, ppos):
                    handed += 1
                else:
                    break
                next_pos = nxt
            mv.release()
            if next_pos < 0:
                if ch is not None:
                    budget.release(ch)
                return ran
            ran = True
            p.commit_batch(next_pos)
            if o < out_len:
                del out[o:]
            nzt = zt[0] + zt[2]
            if o:
                ns = time.perf_counter_ns() - t0
                stats = exp.stats
                total = nw + nr + nzt
                if nw:
                    stats.record_many(_WRITE, nw, bw, ns * nw // total)
                if nr:
                    stats.record_many(_READ, nr, br, ns * nr // total)
                if zt[0]:
                    stats.record_many(_WRITE_ZEROES, zt[0], zt[1], ns * zt[0] // total)
                if zt[2]:
                    stats.record_many(_TRIM, zt[2], zt[3], ns * zt[2] // total)
                if not self._closing and not t.is_closing():
                    t.write(out)
                    self._tx_total += o
            if ch is not None:
                self._put_buf(None, ch)
            self.batched += nw + nr + nzt
            self.batches += 1
            if nw + nr + nzt + handed < len(items):
                return ran
        return ran

    def _hand_over(self, cmd: int, fua: int, cookie: int, offset: int, length: int,
                   ring: memoryview, ppos: int) -> bool:
        """A batched request the device cannot do now (a FUA write, a hook
        that must wait, a page-cache miss, an error) goes to `_start` as if
        it had been parsed the ordinary way: a WRITE's payload is copied out
        of the ring into a buffer charged to the budget.  False (nothing
        done) when that cannot happen now: ``max_inflight`` requests run, or
        the payload's memory is not available at once."""
        if len(self.tasks) >= self.server.max_inflight:
            return False
        payload = None
        if cmd == _WRITE:
            ch = Charge(self)
            if not self._budget.try_take(ch, length):
                return False
            payload = bytearray(ring[ppos:ppos + length])
            self._payload_charges[id(payload)] = ch
        self._start(Request(cookie, cmd, fua, offset, length, payload))
        return True

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
        if (p.structured and not req.flags & _DF and exp.sparse_reads
                and length >= SPARSE_READ_MIN):
            extents = dev.extents_now(offset, length, BASE_ALLOCATION)
            if extents is None or sum(e.length for e in extents) < length or any(
                    e.flags & HOLE and e.flags & _ZERO for e in extents):
                return False
        t0 = time.perf_counter_ns()
        self._free_sent()
        budget = self._budget
        ch = Charge(self)
        buf = budget.take_pooled(ch, length)
        if buf is None:
            if not budget.try_take(ch, length):
                return False  # the task path waits for memory
            buf = bytearray(length)
        try:
            done = dev.pread_now(memoryview(buf), offset)
        except OSError:
            done = False  # the task path reports the error properly
        if not done:
            budget.release(ch, buf)
            return False
        self._write(p.read_header(req.cookie, offset, length), buf)
        self._put_buf(buf, ch)
        exp.stats.record(_READ, length, True, time.perf_counter_ns() - t0)
        return True

    def _write_now(self, req: Request) -> bool:
        """Run a valid WRITE, WRITE_ZEROES or TRIM at once, without a task,
        when the device can do it synchronously (`BlockDev.pwrite_now`: a
        small non-FUA write to the page cache or RAM; `zero_now`,
        `trim_now`: a kernel primitive, no FUA; and every write hook done
        without waiting).

        Same effects as the task path: the data is written before the reply
        is queued (so a later FLUSH covers it and later reads see it), the
        stats count it, the payload's charge goes back.  No ``exp.begin``/
        ``end``: nothing here awaits, so no idle wait can see it half done.
        False: nothing was sent and the request still owns its payload
        charge; the task path runs it (and reports any error).
        """
        exp = self.export
        if req.error or exp is None or exp.removed or self.server.stopping or req.length == 0:
            return False
        payload = req.payload
        cmd, flags = req.cmd, req.flags
        fua = bool(flags & _FUA)
        dev = exp.dev
        t0 = time.perf_counter_ns()
        try:
            if cmd == _WRITE:
                assert payload is not None
                done = dev.pwrite_now(payload, req.offset, fua)
                if not done:
                    return self._write_start(req, exp, dev, fua, t0)
            elif cmd == Cmd.WRITE_ZEROES:
                done = dev.zero_now(req.offset, req.length, may_trim=not flags & _NO_HOLE, fua=fua,
                                    fast=bool(flags & _FAST_ZERO))
            else:
                done = dev.trim_now(req.offset, req.length, fua=fua)
            if not done:
                return False
        except Exception:
            # Doing it again is harmless (same bytes, same place); the task
            # path reports the error (or the bug) the usual way.
            return False
        if payload is not None:
            ch = self._payload_charges.pop(id(payload), None)
            if ch is not None:
                self._budget.release(ch, payload)
        self._write(self.proto.reply_ok(req.cookie))
        exp.stats.record(cmd, req.length, True, time.perf_counter_ns() - t0)
        return True

    def _write_start(self, req: Request, exp: Export, dev: BlockDev, fua: bool, t0: int) -> bool:
        """Hand a WRITE to the device's I/O engine (`BlockDev.pwrite_start`)
        with a completion callback instead of a task: the loop thread goes on
        parsing while the kernel or a worker copies the payload.

        Same effects as the task path: the reply (OK or the errno) is queued
        only once the write is complete, the stats count it, the export is
        busy (``exp.begin``/``end``) meanwhile, and a future in ``tasks``
        stands for the request, so ``max_inflight``, `quiet` and
        `drain_requests` see it.  The payload's charge is taken out of
        ``_payload_charges`` (as a task takes it), so a connection that dies
        meanwhile cannot recycle the buffer under the kernel; it comes back
        at completion.  False: nothing started.
        """
        payload = req.payload
        ch = self._payload_charges.pop(id(payload), None)
        fut = asyncio.get_running_loop().create_future()
        cookie, cmd, length, offset = req.cookie, req.cmd, req.length, req.offset

        def done(err: int) -> None:
            if ch is not None:
                self._budget.release(ch, payload)
            if err:
                if err not in (errno.ENOSPC, errno.EINVAL, errno.EPERM, errno.ENOTSUP, errno.ESHUTDOWN):
                    self._warn("export %r: %s at (%d, %d) failed: %s", exp.name,
                               _cmd_name(cmd), offset, length, os.strerror(err))
                self._write(self.proto.reply_error(cookie, err, os.strerror(err)))
            else:
                self._write(self.proto.reply_ok(cookie))
            exp.stats.record(cmd, length, not err, time.perf_counter_ns() - t0)
            exp.end()
            fut.set_result(None)
            self.tasks.discard(fut)  # type: ignore[arg-type]
            if self.proto.has_events and not self._closing:
                self._process_events()
            self._update_reading()

        try:
            started = dev.pwrite_start(payload, offset, fua, done)
        except Exception:
            started = False
        if not started:
            if ch is not None:
                self._payload_charges[id(payload)] = ch
            return False
        exp.begin()
        self.tasks.add(fut)  # type: ignore[arg-type]
        self._update_reading()
        return True

    def _put_buf(self, buf, ch: Charge) -> None:
        """A READ reply's buffer was written: release its charge once the
        transport no longer holds its bytes.

        Zero-filling a fresh buffer for every read cost a third of the read
        path, so released buffers go to the budget's pool.  A transport that
        could not send everything at once may keep a reference to the
        caller's buffer (uvloop, Python >= 3.12), or a copy of it (asyncio
        3.11): either way the memory is alive until those bytes are sent, so
        the buffer waits in ``_pending_bufs`` until ``_tx_total`` minus the
        write-buffer size has passed its end (`_free_sent`).
        """
        t = self.transport
        if t is not None and not self._closing and t.get_write_buffer_size():
            self._pending_bufs.append((self._tx_total, buf, ch))
        else:
            self._budget.release(ch, buf if buf is not None and len(buf) >= 16 * 1024 else None)

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
        self._tx_total += sum(len(p) for p in parts)

    def _flush_wbuf(self) -> None:
        if not self._wbuf:
            return
        data = self._wbuf[0] if len(self._wbuf) == 1 else b"".join(self._wbuf)
        self._wbuf.clear()
        t = self.transport
        if t is not None and not self._closing and not t.is_closing():
            t.write(data)
            self._tx_total += len(data)

    # ---------------------------------------------------------- requests

    async def _handle(self, req: Request, ch: Charge | None) -> None:
        try:
            await self._handle_request(req)
        finally:
            if ch is not None:
                # The payload buffer goes back (to the pool when whole).
                self._budget.release(ch, req.payload)

    async def _handle_request(self, req: Request) -> None:
        p = self.proto
        exp = self.export
        if req.error:
            if exp is not None:
                exp.stats.invalid += 1
            self._write(p.reply_error(req.cookie, req.error, req.message))
            return
        if exp is None or exp.removed:
            # (Started before a `shutdown` began: it runs, the export stays open until the drain.)
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
        if (p.structured and not req.flags & _DF and exp.sparse_reads
                and length >= SPARSE_READ_MIN):
            extents = await _extents_covering(dev, offset, length, BASE_ALLOCATION)
            if any(e.flags & HOLE and e.flags & _ZERO for e in extents):
                await self._sparse_read(req, dev, extents)
                return
        ch, buf = await self._reserve(length)
        try:
            await dev.pread(memoryview(buf), offset)
        except BaseException:
            self._budget.release(ch, buf)
            raise
        self._write(p.read_header(req.cookie, offset, length), buf)
        self._put_buf(buf, ch)

    async def _sparse_read(self, req: Request, dev: BlockDev, extents) -> None:
        """Structured read: OFFSET_HOLE for zero holes, OFFSET_DATA for the rest."""
        p = self.proto
        chunks: list = []
        data = sum(e.length for e in extents if not (e.flags & HOLE and e.flags & _ZERO))
        ch, _ = await self._reserve(data, buffer=False)
        try:
            for e in extents:
                if e.flags & HOLE and e.flags & _ZERO:
                    chunks.append((e.offset, e.length, None))
                else:
                    buf = bytearray(e.length)
                    await dev.pread(memoryview(buf), e.offset)
                    chunks.append((e.offset, e.length, buf))
        except BaseException:
            self._budget.release(ch)
            raise
        parts = []
        for i, (off, n, buf) in enumerate(chunks):
            last = i == len(chunks) - 1
            if buf is None:
                parts.append(p.read_hole(req.cookie, off, n, done=last))
            else:
                parts.append(p.read_header(req.cookie, off, n, done=last))
                parts.append(buf)
        self._write(*parts)
        self._put_buf(None, ch)

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
                if one or len(descs) == MAX_EXTENTS:  # (the rest: the client asks again)
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
