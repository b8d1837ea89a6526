"""Worker processes for the data path of plain file exports (``serve --workers N``).

Role: one event-loop thread cannot move more bytes than one core copies
(docs/wseq.md); threads lose to the GIL.  With workers, the server process
(the *owner*) keeps accepting, admission, TLS and the handshake; when a
connection enters transmission on an *offloadable* export it hands the
socket (SCM_RIGHTS) and the negotiated state to the least-loaded worker,
which serves it with the same `NBDConnection` code (batches, budget, limits,
idle timeout: one `Server` per worker, without listeners).  Each worker has
its own GIL and core.

Offloadable (`WorkerPool.can_take`): no TLS on the connection, only
``base:allocation`` negotiated, and the export's device is a `FileDev`
(read-only export) or a `LiveDev` over a `FileDev` that says `offload_ok`
(not quiesced, every hook idle or delegable).  A worker opens the file
through ``/proc/self/fd`` of a descriptor the owner passes once per export,
so it writes the same inode; FLUSH (fdatasync) in any process covers every
process's writes to it, and reads see every write through the page cache:
the live export stays an ordinary disk across processes.

Delegated hooks (dirty bitmaps, docs/workers.md "Bitmaps"): when the
export's hooks are delegable, the ``conn`` message carries their bit maps
(descriptors of the bitmaps' files); the worker checks them before each
write (`_DelegatedHook`) and asks the owner to mark what is not set
(``mark`` -> ``marked``, one message per loop iteration) before it writes,
and to sync before it answers a FLUSH/FUA.  The owner stays the only
writer of the bitmaps.

Recall (invariants 1-3): the owner registers `WorkerPool.recall` as the
recaller of every `LiveDev` it offloads (`blockdev.live` "External
writers"), so a quiesce, or a first bitmap being added, first brings every
worker connection of the export back.  Worker side (`_Worker.give_back`):
stop reading, let requests in flight finish, wait until every reply byte
left the transport, then send the socket back with the bytes received and
not consumed, re-serialised (`ServerConnection.unconsumed`), and drop the
transport without shutdown(2).  The owner resumes the connection in
transmission state and feeds it those bytes.  A client that does not read
its replies for `RECALL_TIMEOUT` s during a recall is evicted (it cannot
hold a backup start).

Re-hand-off: once the export is offloadable again (the LiveDev's offload
listener, debounced: `nbd.server.REOFFLOAD_DELAY`), the owner hands the
connections it serves back out the same way, from its side (stop reading,
finish, drain, `unconsumed`, `hand_off`).  `hand_off` checks `can_take`
and counts the external writer with no await in between, so a hook attach
either comes first (the connection stays) or recalls it again.

Owner bookkeeping: the owner's `NBDConnection` stays in its tables as the
*placeholder* of a handed-off connection (``remote`` set), so admission
counts it; workers report every connection's quiet time each tick and the
owner's eviction sends an evict request the worker re-checks (``kept`` when
the connection became active: it is counted again).  A worker that dies
takes its connections with it (clients see EOF); the owner frees their
slots, logs, and starts a new worker.

Control channel: one AF_UNIX SOCK_SEQPACKET socketpair per worker; a
message is one JSON record (``t``: its kind; ``n``: bytes of data that
follow in raw records of at most `CHUNK` bytes), optionally carrying
descriptors (at most `MAX_FDS`).  Owner -> worker: config, export, conn,
recall, evict, remove, shutdown, marked.  Worker -> owner: ready, closed,
returned, recalled, kept, removed, tick, mark.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from typing import Any, Callable

from ..blockdev.base import BASE_ALLOCATION
from ..blockdev.file import FileDev
from ..blockdev.live import LiveDev, bits_all_set
from .protocol import ExportInfo, ServerConnection
from .wire import TransmissionFlag

log = logging.getLogger("nbdbackup.worker")

#: Largest raw data record; a control record is far smaller.
CHUNK = 64 * 1024
_MAXREC = 1024 * 1024
#: A connection that cannot finish its replies this long during a recall is evicted.
RECALL_TIMEOUT = 10.0
#: Environment variable giving the default of ``serve --workers``.
ENV = "NBDBACKUP_WORKERS"
#: Environment variable: ``0`` keeps exports whose write hooks are only
#: delegable (dirty bitmaps) in the server process (`WorkerPool.delegate`).
DELEGATE_ENV = "NBDBACKUP_WORKER_BITMAPS"
#: Most descriptors one control record carries (a connection's socket and
#: the bit maps of its export's delegable hooks: `MAX_MAPS`).
MAX_FDS = 64
MAX_MAPS = MAX_FDS - 1


class Channel:
    """One end of a control socketpair: messages out (queued while the socket
    is full), messages in (to ``on_message(msg, data, fd)``; descriptors
    after the first come in ``msg["_fds"]``), ``on_eof()`` once.  Fields: ``sock``; ``_out`` (records not sent yet, with the
    duplicated descriptor they carry, closed once sent); ``_writing`` (a
    writer callback is registered); ``_partial`` (a message whose data
    records are still arriving: [msg, fd, bytearray]); ``closed``."""

    def __init__(self, sock: socket.socket, on_message: Callable, on_eof: Callable) -> None:
        self.sock = sock
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
            except OSError:
                pass
        self._on_message = on_message
        self._on_eof = on_eof
        self._out: deque[tuple[bytes, list[int]]] = deque()
        self._writing = False
        self._partial: list | None = None
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def send(self, msg: dict, data=b"", fd: int | None = None, extra_fds: tuple = ()) -> None:
        """Queue ``msg`` with ``data``; ``fd`` and ``extra_fds`` (at most
        `MAX_FDS` - 1) are duplicated now and ride on the record."""
        if self.closed:
            return
        msg = dict(msg, n=len(data))
        fds = [os.dup(f) for f in ((fd,) if fd is not None else ()) + tuple(extra_fds)]
        self._out.append((json.dumps(msg).encode(), fds))
        mv = memoryview(data)
        for i in range(0, len(mv), CHUNK):
            self._out.append((bytes(mv[i:i + CHUNK]), []))
        self._pump()

    def _pump(self) -> None:
        while self._out and not self.closed:
            rec, fds = self._out[0]
            try:
                if fds:
                    socket.send_fds(self.sock, [rec], fds)
                else:
                    self.sock.send(rec)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self._loop.add_writer(self.sock.fileno(), self._pump)
                return
            except OSError:
                self.close()
                return
            self._out.popleft()
            for f in fds:
                os.close(f)
        if self._writing and not self.closed:
            self._writing = False
            self._loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        while not self.closed:
            try:
                rec, fds, _flags, _addr = socket.recv_fds(self.sock, _MAXREC, MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                rec, fds = b"", []
            if not rec:
                self.close()
                return
            fd = fds[0] if fds else None
            if self._partial is not None:
                for f in fds:
                    os.close(f)  # (data records carry none)
                self._partial[2] += rec
                if len(self._partial[2]) >= self._partial[0]["n"]:
                    msg, fd, data = self._partial
                    self._partial = None
                    self._deliver(msg, bytes(data), fd)
                continue
            msg = json.loads(rec)
            if len(fds) > 1:
                msg["_fds"] = fds[1:]
            if msg.get("n"):
                self._partial = [msg, fd, bytearray()]
            else:
                self._deliver(msg, b"", fd)

    def _deliver(self, msg: dict, data: bytes, fd: int | None) -> None:
        try:
            self._on_message(msg, data, fd)
        except Exception:
            log.exception("control message %r failed", msg.get("t"))
            for f in ([fd] if fd is not None else []) + msg.get("_fds", []):
                try:
                    os.close(f)
                except OSError:
                    pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._loop.remove_reader(self.sock.fileno())
            if self._writing:
                self._loop.remove_writer(self.sock.fileno())
        except (OSError, ValueError):
            pass
        for _, fds in self._out:
            for f in fds:
                os.close(f)
        self._out.clear()
        self.sock.close()
        self._on_eof()


def _file_of(dev) -> tuple[FileDev | None, LiveDev | None]:
    """The file a worker may serve for ``dev`` and the LiveDev to count it in."""
    if type(dev) is FileDev:
        return dev, None
    if isinstance(dev, LiveDev) and type(dev.inner) is FileDev:
        return dev.inner, dev
    return None, None


# --------------------------------------------------------------------------- #
# Owner side


class _Handle:
    """The owner's view of one worker.  Fields: ``index``; ``proc`` (the
    `subprocess.Popen`); ``chan``; ``conns`` (id -> placeholder
    `NBDConnection`); ``exports`` (export names sent to it); ``quiet`` (id ->
    (quiet seconds reported, the worker's `time.monotonic` when: one
    clock for all processes)); ``waiters`` ((kind, key)
    -> futures resolved by that reply, or at its death); ``alive``."""

    def __init__(self, index: int, proc: subprocess.Popen, chan_sock: socket.socket) -> None:
        self.index = index
        self.proc = proc
        self.chan_sock = chan_sock
        self.chan: Channel | None = None
        self.conns: dict[int, Any] = {}
        self.exports: set[str] = set()
        self.quiet: dict[int, tuple[float, float]] = {}
        self.waiters: dict[tuple, list[asyncio.Future]] = {}
        self.alive = True
        #: Resolved by the worker's "ready" (or its death).
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()

    def expect(self, kind: str, key: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.setdefault((kind, key), []).append(fut)
        return fut

    def resolve(self, kind: str, key: str) -> None:
        for f in self.waiters.pop((kind, key), []):
            if not f.done():
                f.set_result(None)


class WorkerPool:
    """The owner's worker processes (module docstring).

    Fields: ``server`` (the owner's `Server`); ``size``; ``workers`` (the
    `_Handle`s, one per slot, replaced when one dies); ``_next_id`` (the
    next connection id); ``closing`` (shutdown began: no hand-off, no
    restart); ``handed`` / ``returned`` / ``restarts`` (counters for logs,
    metrics and tests; ``handed`` counts every hand-off) and ``rehanded``
    (the hand-offs of connections that were served by the owner in
    transmission: recalled ones going back, `Server._reoffload`); ``delegate``
    (connections of exports whose hooks are delegable, not idle, may go).
    """

    def __init__(self, server, size: int) -> None:
        self.server = server
        self.size = size
        self.workers: list[_Handle] = []
        self._next_id = 1
        self.closing = False
        self.handed = 0
        self.rehanded = 0
        self.returned = 0
        self.restarts = 0
        #: Hand out connections of exports whose hooks are delegable, not
        #: idle (docs/workers.md "Bitmaps"); ``$NBDBACKUP_WORKER_BITMAPS=0``:
        #: no (a write that sets a new bit costs a round trip to this process).
        self.delegate = os.environ.get(DELEGATE_ENV, "1") != "0"

    # -- processes --------------------------------------------------------

    async def start(self, timeout: float = 60.0) -> None:
        """Start the workers and wait until each is ready (imported and
        configured): their start-up is not charged to the first clients."""
        for i in range(self.size):
            self.workers.append(self._spawn(i))
        await asyncio.wait_for(asyncio.gather(*(h.ready for h in self.workers)), timeout)
        log.info("started %d worker process(es): pids %s", self.size,
                 ", ".join(str(h.proc.pid) for h in self.workers))

    def _spawn(self, index: int) -> _Handle:
        from ..blockdev import ioengine

        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env[ioengine.ENV] = ioengine.selected()[0]
        proc = subprocess.Popen([sys.executable, "-m", "nbdbackup.nbd.worker", str(theirs.fileno())],
                                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        h = _Handle(index, proc, mine)
        h.chan = Channel(mine, lambda m, d, fd: self._on_message(h, m, d, fd), lambda: self._on_eof(h))
        s = self.server
        h.chan.send({"t": "config", "index": index, "idle_timeout": s.idle_timeout,
                     "unix_idle_timeout": s.unix_idle_timeout, "max_inflight": s.max_inflight,
                     "dead_peer_timeout": s.dead_peer_timeout,
                     "max_buffer_memory": s.budget.limit, "batch": s.batch,
                     "log_level": logging.getLogger("nbdbackup").getEffectiveLevel()})
        return h

    def _on_eof(self, h: _Handle) -> None:
        h.alive = False
        if not h.ready.done():
            h.ready.set_result(None)
        for key in list(h.waiters):
            h.resolve(*key)
        lost = list(h.conns.values())
        h.conns.clear()
        for c in lost:
            self._drop(c)
        if self.closing:
            return
        rc = h.proc.poll()
        if rc is None:  # its end closed but it lives on: it is of no use any more
            h.proc.kill()
        self.restarts += 1
        self.workers[h.index] = self._spawn(h.index)
        log.error("worker %d (pid %d) died (exit status %s); %d connection(s) lost; started pid %d",
                  h.index, h.proc.pid, rc, len(lost), self.workers[h.index].proc.pid)
        asyncio.get_running_loop().run_in_executor(None, h.proc.wait)  # reap it

    def _drop(self, c) -> None:
        """A handed-off connection ended (in its worker, or with it)."""
        dev = getattr(c, "_ext_live", None)
        if dev is not None:
            c._ext_live = None
            dev.detach_external()
        self.server._forget(c)

    # -- hand-off ---------------------------------------------------------

    def can_take(self, conn) -> bool:
        exp = conn.export
        p = conn.proto
        if (self.closing or exp is None or exp.removed or self.server.stopping or p.tls_active
                or conn._closing or not any(w.alive for w in self.workers)):
            return False
        if any(c != BASE_ALLOCATION for c in p.contexts.values()):
            return False
        f, live = _file_of(exp.dev)
        return f is not None and (live is None or (live.offload_ok() and (self.delegate or not live.delegated())))

    def hand_off(self, conn, rehand: bool = False) -> bool:
        """Send ``conn`` (in transmission, nothing running, every reply sent)
        to the least-loaded worker; True when it went (``conn`` is then a
        placeholder).  ``rehand``: it was served here in transmission
        (recalled, or made while the export was not offloadable; counted in
        ``rehanded``).  Synchronous from the `can_take` check to the
        external count: no hook can be attached in between."""
        if not self.can_take(conn):
            return False
        f, live = _file_of(conn.export.dev)
        # What the worker must check and ask for (blockdev.live "Delegable
        # hooks"): None when every hook is idle.  The same synchronous step
        # as the can_take check and the external count.
        dirty = None
        if live is not None and live.delegated():
            maps = live.delegations()
            if maps is None or len(maps) > MAX_MAPS:
                return False
            dirty = maps
        data = conn.proto.unconsumed()
        t = conn.transport
        sock = t.get_extra_info("socket") if t is not None else None
        if data is None or sock is None:
            return False
        exp = conn.export
        h = min((w for w in self.workers if w.alive), key=lambda w: len(w.conns))
        assert h.chan is not None
        if exp.name not in h.exports:
            h.chan.send({"t": "export", "name": exp.name, "read_only": f.read_only or exp.read_only,
                         "description": exp.description}, fd=f.fd)
            h.exports.add(exp.name)
        info = conn.proto.export
        cid = self._next_id
        self._next_id += 1
        h.chan.send({"t": "conn", "id": cid, "export": exp.name, "size": info.size,
                     "flags": int(info.flags), "block_size": list(info.block_size),
                     "structured": conn.proto.structured, "contexts": sorted(conn.proto.contexts.items()),
                     "max_payload": conn.proto.max_payload, "peer": conn.peer,
                     "last_active": conn._last_active,
                     "dirty": None if dirty is None else [list(m[1:]) for m in dirty]},
                    data, fd=sock.fileno(), extra_fds=tuple(m[0] for m in dirty or ()))
        if h.chan.closed:
            return False
        now = time.monotonic()
        h.quiet[cid] = (conn.quiet(now), now)
        if live is not None:
            live.attach_external()
        conn._ext_live = live
        conn.remote = (h, cid)
        h.conns[cid] = conn
        conn._detach_transport()
        self.handed += 1
        if rehand:
            self.rehanded += 1
        log.info("connection %s: served by worker %d%s", conn.peer, h.index, " again" if rehand else "")
        return True

    # -- requests to workers ----------------------------------------------

    def quiet(self, conn, now: float) -> float:
        h, cid = conn.remote
        q, at = h.quiet.get(cid, (-1.0, now))
        return -1.0 if q < 0 else q + (now - at)

    def evict(self, conn, reason: str, min_quiet: float) -> None:
        """Ask the worker to close ``conn`` if it is still quiet ``min_quiet``
        s (-1: in any case).  Its slot stays taken until the worker answers
        ``closed`` (freed, held connections admitted) or ``kept``, so the
        owner never counts fewer connections than are open."""
        h, cid = conn.remote
        if h.chan is None or not h.alive:
            self.server._forget(conn)
            return
        if not conn._evicting:
            conn._evicting = True
            h.chan.send({"t": "evict", "id": cid, "reason": reason, "min_quiet": min_quiet})

    async def recall(self, exp, timeout: float = RECALL_TIMEOUT + 5) -> None:
        """Bring every connection of ``exp`` back from the workers."""
        futs = []
        for h in self.workers:
            if h.alive and h.chan is not None and any(c.export is exp for c in h.conns.values()):
                futs.append(h.expect("recalled", exp.name))
                h.chan.send({"t": "recall", "export": exp.name})
        if futs:
            try:
                await asyncio.wait_for(asyncio.gather(*futs), timeout)
            except TimeoutError:
                raise OSError(errno.EBUSY, f"worker connections of export {exp.name!r} were not "
                                           f"handed back within {timeout:g} s") from None

    async def remove_export(self, name: str, timeout: float = 30.0) -> None:
        futs = []
        for h in self.workers:
            if h.alive and name in h.exports and h.chan is not None:
                futs.append(h.expect("removed", name))
                h.chan.send({"t": "remove", "export": name})
                h.exports.discard(name)
        if futs:
            await asyncio.wait(futs, timeout=timeout)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Workers drain, flush and close their connections, then exit."""
        self.closing = True
        loop = asyncio.get_running_loop()
        for h in self.workers:
            if h.alive and h.chan is not None:
                h.chan.send({"t": "shutdown", "timeout": timeout})

        def wait(h: _Handle) -> None:
            try:
                h.proc.wait(timeout + 5)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                h.proc.wait()
        await asyncio.gather(*(loop.run_in_executor(None, wait, h) for h in self.workers))
        for h in self.workers:
            if h.chan is not None:
                h.chan.close()

    def prometheus_text(self) -> str:
        """Worker gauges and counters (their request counts are folded into
        the exports' stats every tick)."""
        lines = ["# HELP nbdbackup_server_workers Worker processes serving the data path.",
                 "# TYPE nbdbackup_server_workers gauge",
                 f"nbdbackup_server_workers {sum(1 for h in self.workers if h.alive)}",
                 "# HELP nbdbackup_worker_connections Connections each worker serves.",
                 "# TYPE nbdbackup_worker_connections gauge"]
        lines += [f'nbdbackup_worker_connections{{worker="{h.index}"}} {len(h.conns)}' for h in self.workers]
        for name, help_, v in (("handoffs", "Connections handed to workers.", self.handed),
                               ("rehandoffs", "Connections handed to workers again after being served "
                                              "by the server process (recalled).", self.rehanded),
                               ("recalls", "Connections handed back by workers (recalls).", self.returned),
                               ("restarts", "Workers started again after dying.", self.restarts)):
            lines += [f"# HELP nbdbackup_worker_{name}_total {help_}",
                      f"# TYPE nbdbackup_worker_{name}_total counter",
                      f"nbdbackup_worker_{name}_total {v}"]
        return "\n".join(lines) + "\n"

    # -- messages from workers ---------------------------------------------

    def _mark(self, h: _Handle, msg: dict) -> None:
        """A worker's batch: mark the ranges ``r`` of export ``x`` (its
        writes wait for the answer: mark before write across processes),
        then, with ``s``, make the marks durable (its FLUSH/FUA waits).
        Answered ``marked`` with ``e`` = 0 or an errno.  Never waits: a
        recall in progress waits for these writes."""
        err, text = 0, ""
        try:
            exp = self.server.exports.get(msg["x"])
            live = exp.dev if exp is not None else None
            if not isinstance(live, LiveDev):
                raise OSError(errno.ESHUTDOWN, f"export {msg['x']!r} is gone")
            if msg.get("r"):
                live.external_writes(msg["r"])
            if msg.get("s"):
                live.external_durable()
        except OSError as e:
            err, text = e.errno or errno.EIO, str(e)
            log.error("worker %d: export %r: %s", h.index, msg.get("x"), text)
        except Exception as e:
            log.exception("worker %d: export %r: marking failed", h.index, msg.get("x"))
            err, text = errno.EIO, str(e)
        if h.chan is not None:
            h.chan.send({"t": "marked", "q": msg["q"], "e": err, "m": text})

    def _on_message(self, h: _Handle, msg: dict, data: bytes, fd: int | None) -> None:
        kind = msg["t"]
        if kind == "tick":
            # time.monotonic is CLOCK_MONOTONIC: one clock for every process.
            at = msg["at"]
            h.quiet = {int(k): (q, at) for k, q in msg["quiet"].items()}
            for name, delta in msg.get("stats", {}).items():
                exp = self.server.exports.get(name)
                if exp is not None:
                    st = exp.stats
                    for field, vals in zip(("ops", "bytes", "failed", "time_ns"), delta[:4]):
                        arr = getattr(st, field)
                        for i, v in enumerate(vals):
                            arr[i] += v
                    st.invalid += delta[4]
        elif kind == "closed":
            c = h.conns.pop(msg["id"], None)
            h.quiet.pop(msg["id"], None)
            if c is not None:
                self._drop(c)
        elif kind == "kept":
            c = h.conns.get(msg["id"])
            if c is not None:
                c._evicting = False
        elif kind == "returned":
            c = h.conns.pop(msg["id"], None)
            h.quiet.pop(msg["id"], None)
            if c is None or fd is None:
                if fd is not None:
                    os.close(fd)
                return
            self.returned += 1
            dev = c._ext_live
            c._ext_live = None
            if dev is not None:
                dev.detach_external()
            asyncio.ensure_future(self.server._resume_returned(c, fd, data))
        elif kind == "ready":
            if not h.ready.done():
                h.ready.set_result(None)
        elif kind in ("recalled", "removed"):
            h.resolve(kind, msg["export"])
        elif kind == "mark":
            self._mark(h, msg)
        else:
            log.warning("worker %d: unknown message %r", h.index, kind)


# --------------------------------------------------------------------------- #
# Worker side


class _DelegatedHook:
    """The worker's side of an export's delegable write hooks (`blockdev.live`
    "Delegable hooks"; for dirty bitmaps: `bitmap.hook`), attached to a
    `LiveDev` over the worker's `FileDev` of the export while the owner
    says it has such hooks (`_Worker._set_dirty`).

    A write whose granules are all set in every map needs nothing
    (`before_write_now` says done: the task-free path); otherwise
    `before_write` asks the owner to mark it (`_Worker.ask`: one message per
    loop iteration and export) and returns only after its answer, so the
    write is issued after the mark.  `on_durable` asks the owner to make
    its marks durable before a FLUSH/FUA is answered.  With the owner gone
    nothing is done now and every ask fails (EIO): no write is issued that
    nobody recorded.

    Fields: ``worker``; ``export`` (name); ``maps`` (list of (memoryview
    of the bits, granule shift, the read-only mmap)).
    """

    def __init__(self, worker: "_Worker", export: str) -> None:
        self.worker = worker
        self.export = export
        self.maps: list[tuple[memoryview, int, Any]] = []

    def set_maps(self, specs: list, fds: list[int]) -> None:
        """Map ``fds`` (closed here) read-only by ``specs`` ([offset, nbits,
        shift] each, in order) in place of the previous maps."""
        import mmap

        maps = []
        try:
            for (offset, nbits, shift), fd in zip(specs, fds, strict=True):
                mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
                need = offset + ((nbits + 63) >> 6) * 8
                if len(mm) < need:
                    raise OSError(errno.EINVAL, f"bit map of {len(mm)} bytes, {need} expected")
                maps.append((memoryview(mm)[offset:need], shift, mm))
        finally:
            for fd in fds:
                os.close(fd)
        self.maps = maps  # the old maps go with their last view

    def before_write_now(self, offset: int, length: int) -> bool:
        if self.worker.chan.closed:
            return False
        for buf, shift, _ in self.maps:
            if not bits_all_set(buf, offset, length, shift):
                return False
        return True

    async def before_write(self, offset: int, length: int) -> None:
        if not self.before_write_now(offset, length):
            await self.worker.ask(self.export, (offset, length), False)

    async def on_durable(self) -> None:
        await self.worker.ask(self.export, None, True)


class _Worker:
    """The worker process: a `Server` without listeners, fed connections by
    the owner.  Fields: ``chan``; ``server`` (made by the ``config``
    message, None before); ``ids`` (connection -> the owner's id for it,
    until it is closed or handed back); ``_stats`` (export name -> counters
    already reported); ``done`` (set at shutdown or when the owner is
    gone); ``_tick`` (the report timer); ``hooks`` (export name -> its
    `_DelegatedHook`); ``_batch`` (export name -> [ranges, sync, future]:
    asks not sent yet); ``_asked`` (message number -> future answered by
    ``marked``); ``_seq``; ``_settling`` (connections ended with requests
    running -> the task sending their ``closed`` when those finished).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.chan = Channel(sock, self._on_message, self._on_eof)
        self.server = None
        self.ids: dict[Any, int] = {}
        self._stats: dict[str, list] = {}
        self.done = asyncio.Event()
        self._tick: asyncio.TimerHandle | None = None
        self.hooks: dict[str, _DelegatedHook] = {}
        self._batch: dict[str, list] = {}
        self._asked: dict[int, asyncio.Future] = {}
        self._seq = 0
        #: Connections that ended with requests still running -> the task
        #: that sends their ``closed`` once those finished (`_closed`).
        self._settling: dict[Any, asyncio.Future] = {}

    def _on_eof(self) -> None:
        # The owner is gone: nobody can account for our clients any more,
        # nor mark their writes: every ask fails (and none is done now).
        # First the connections close unanswered (their unsent replies
        # dropped): a client that reconnects (QEMU's reconnect-delay, to the
        # restarted server) sends again what was not answered; an EIO reply
        # for a write whose mark could not be asked for reached its guest.
        if self.server is not None:
            for c in list(self.server.connections):
                c.evict("the server process is gone: closed, unanswered requests left to the client to retry")
        self.done.set()
        gone = OSError(errno.EIO, "the server process is gone")
        futs = list(self._asked.values()) + [b[2] for b in self._batch.values()]
        self._asked.clear()
        self._batch.clear()
        for f in futs:
            if not f.done():
                f.set_exception(gone)
                f.exception()  # retrieved: an ask nobody awaits any more is no error

    async def ask(self, export: str, rng: tuple[int, int] | None, sync: bool) -> None:
        """Ask the owner to mark ``rng`` (and with ``sync`` to make the marks
        durable) for ``export``; return when it answered.  Asks of one loop
        iteration go in one message per export."""
        if self.chan.closed:
            raise OSError(errno.EIO, "the server process is gone")
        b = self._batch.get(export)
        if b is None:
            if not self._batch:
                asyncio.get_running_loop().call_soon(self._send_asks)
            b = self._batch[export] = [[], False, asyncio.get_running_loop().create_future()]
        if rng is not None:
            b[0].append(rng)
        if sync:
            b[1] = True
        await asyncio.shield(b[2])

    def _send_asks(self) -> None:
        batches, self._batch = self._batch, {}
        for export, (ranges, sync, fut) in batches.items():
            if self.chan.closed:
                # Closed while an earlier batch of this call was sent: `_on_eof`
                # has failed every ask it could see, not this one.
                if not fut.done():
                    fut.set_exception(OSError(errno.EIO, "the server process is gone"))
                    fut.exception()
                continue
            self._seq += 1
            self._asked[self._seq] = fut
            self.chan.send({"t": "mark", "x": export, "q": self._seq, "r": ranges, "s": sync})

    def _marked(self, msg: dict) -> None:
        fut = self._asked.pop(msg["q"], None)
        if fut is None or fut.done():
            return
        if msg["e"]:
            fut.set_exception(OSError(msg["e"], msg.get("m") or os.strerror(msg["e"])))
            fut.exception()  # retrieved (its writers see it through their shields)
        else:
            fut.set_result(None)

    def _set_dirty(self, name: str, dirty: list | None, fds: list[int]) -> None:
        """The owner's word, with a connection of ``name``, on its delegable
        hooks (None: every hook idle).  The export's device here is its
        `FileDev` while every hook is idle, and a `LiveDev` over it with the
        `_DelegatedHook` while not: swapped here, which is safe because
        whatever changes the owner's hooks recalls every connection of the
        export first (none is served here when the word changes; each
        request takes ``exp.dev`` once)."""
        exp = self.server.exports.get(name) if self.server is not None else None
        if exp is None or dirty is None:
            for fd in fds:
                os.close(fd)
            if dirty is not None:
                raise OSError(errno.EINVAL, f"export {name!r}: bit maps for an unknown export")
            if exp is not None and isinstance(exp.dev, LiveDev):
                exp.dev = exp.dev.inner  # (the LiveDev is dropped, not closed: it owns the file)
                self.hooks.pop(name, None)
            return
        if exp.read_only or not isinstance(exp.dev, (FileDev, LiveDev)):
            for fd in fds:
                os.close(fd)
            raise OSError(errno.EINVAL, f"export {name!r}: bit maps for a read-only export")
        hook = self.hooks.get(name)
        if hook is None:
            hook = self.hooks[name] = _DelegatedHook(self, name)
        hook.set_maps(dirty, fds)
        if not isinstance(exp.dev, LiveDev):
            live = LiveDev(exp.dev)
            live.add_hook(hook)
            exp.dev = live

    def _closed(self, conn) -> None:
        """``conn`` ended here (client gone, evicted, idle): tell the owner
        -- but only once no request of it runs any more.  A write still in
        flight (a task awaiting the thread pool, an engine write) changes
        the disk later; the owner stops counting the connection as an
        external writer at ``closed``, after which a bitmap change or a
        backup start recalls nothing: the write must have landed by then
        (invariants 3 and 1, docs/hunt.md)."""
        cid = self.ids.pop(conn, None)
        if cid is None:
            return
        if conn.tasks:
            self._settling[conn] = asyncio.ensure_future(self._settle(conn, cid))
        else:
            self.chan.send({"t": "closed", "id": cid})

    async def _settle(self, conn, cid: int) -> None:
        try:
            await conn.drain_requests()
        finally:
            self._settling.pop(conn, None)
            self.chan.send({"t": "closed", "id": cid})

    def _tick_report(self) -> None:
        from .server import TICK

        self._tick = asyncio.get_running_loop().call_later(TICK, self._tick_report)
        if self.server is None:
            return
        now = time.monotonic()
        quiet = {str(cid): c.quiet(now) for c, cid in self.ids.items()}
        stats = {}
        for name, exp in self.server.exports.items():
            st = exp.stats
            cur = [list(st.ops), list(st.bytes), list(st.failed), list(st.time_ns), st.invalid]
            old = self._stats.get(name)
            if old is None:
                old = [[0] * len(cur[0])] * 4 + [0]
            delta = [[a - b for a, b in zip(cur[i], old[i])] for i in range(4)] + [cur[4] - old[4]]
            if any(any(d) for d in delta[:4]) or delta[4]:
                stats[name] = delta
            self._stats[name] = cur
        self.chan.send({"t": "tick", "at": now, "quiet": quiet, "stats": stats})

    def _on_message(self, msg: dict, data: bytes, fd: int | None) -> None:
        kind = msg["t"]
        if kind == "config":
            from .server import Server

            from .. import logqueue

            # Through a queue and a writer thread: a stderr nobody reads must not stop us.
            logqueue.install(msg["log_level"], f"%(asctime)s worker {msg['index']} %(levelname)s %(name)s: %(message)s")
            self.server = Server(idle_timeout=msg["idle_timeout"], unix_idle_timeout=msg["unix_idle_timeout"],
                                 max_inflight=msg["max_inflight"], max_buffer_memory=msg["max_buffer_memory"],
                                 batch=msg["batch"], dead_peer_timeout=msg["dead_peer_timeout"])
            self.server.on_forget = self._closed
            self._tick_report()
            self.chan.send({"t": "ready"})
        elif kind == "export":
            assert fd is not None
            try:
                dev = FileDev(f"/proc/self/fd/{fd}", read_only=msg["read_only"])
            finally:
                os.close(fd)
            self.server.add_export(msg["name"], dev, read_only=msg["read_only"], description=msg["description"])
        elif kind == "conn":
            fds = msg.pop("_fds", [])
            try:
                # Before the connection is served (synchronously: in order
                # with the owner's recall messages).
                self._set_dirty(msg["export"], msg.get("dirty"), fds)
            except BaseException:
                self.chan.send({"t": "closed", "id": msg["id"]})
                raise  # (`Channel._deliver` closes the socket's fd)
            asyncio.ensure_future(self._take(msg, data, fd))
        elif kind == "marked":
            self._marked(msg)
        elif kind == "recall":
            asyncio.ensure_future(self._recall(msg["export"]))
        elif kind == "evict":
            for c, cid in list(self.ids.items()):
                if cid == msg["id"]:
                    if msg["min_quiet"] < 0 or c.quiet(time.monotonic()) >= msg["min_quiet"]:
                        c.evict(msg["reason"])
                    else:
                        self.chan.send({"t": "kept", "id": cid})
        elif kind == "remove":
            asyncio.ensure_future(self._remove(msg["export"]))
        elif kind == "shutdown":
            asyncio.ensure_future(self._shutdown(msg.get("timeout", 30.0)))

    async def _take(self, msg: dict, data: bytes, fd: int | None) -> None:
        from .server import NBDConnection

        assert fd is not None
        sock = socket.socket(fileno=fd)
        server = self.server
        exp = server.exports.get(msg["export"])
        if exp is None or server.stopping:
            sock.close()  # the owner's slot is freed by "closed"
            self.chan.send({"t": "closed", "id": msg["id"]})
            return
        info = ExportInfo(name=msg["export"], size=msg["size"], flags=TransmissionFlag(msg["flags"]),
                          block_size=tuple(msg["block_size"]), meta_contexts=(BASE_ALLOCATION,))
        proto = ServerConnection.resumed(info, structured=msg["structured"],
                                         contexts={int(k): v for k, v in msg["contexts"]},
                                         max_payload=msg["max_payload"], paced_payloads=True,
                                         batching=server.batch)
        conn = NBDConnection(server, resume=(proto, data))
        conn.export = exp  # (set again when the transport is made; a recall may come first)
        self.ids[conn] = msg["id"]
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, sock=sock)
        except OSError as e:
            log.warning("connection %s: cannot take it over: %s", msg.get("peer"), e)
            sock.close()
            self._closed(conn)
            return
        # Quiet since the client's last byte to the owner, not since the hand-off
        # (eviction picks the longest-quiet connection across processes).
        if not data:
            conn._last_active = min(conn._last_active, msg["last_active"])

    async def _recall(self, name: str) -> None:
        conns = [c for c in self.ids if c.export is not None and c.export.name == name]
        if conns:
            await asyncio.gather(*(self.give_back(c) for c in conns), return_exceptions=True)
        # Connections that ended with writes in flight (some just now: a
        # give-back that failed evicts): their ``closed`` goes out first.
        settling = [f for c, f in self._settling.items() if c.export is not None and c.export.name == name]
        if settling:
            await asyncio.gather(*settling, return_exceptions=True)
        self.chan.send({"t": "recalled", "export": name})

    async def give_back(self, conn) -> None:
        """Module docstring, "Recall": the socket goes back to the owner with
        no request in flight and every reply sent."""
        deadline = time.monotonic() + RECALL_TIMEOUT
        while conn.transport is None and not conn._closing:  # still being taken over
            if time.monotonic() > deadline:
                return
            await asyncio.sleep(0.002)
        conn._handing = True
        conn._update_reading()
        if not await conn.drain_for_hand_off(deadline - time.monotonic()):
            if not conn._closing:  # (if it ended meanwhile, "closed" was sent)
                conn.evict("did not finish its requests and read its replies during a recall")
            return
        t = conn.transport
        data = conn.proto.unconsumed()
        sock = t.get_extra_info("socket") if t is not None else None
        if data is None or sock is None:
            conn.evict("cannot be handed back (unconsumed state)")
            return
        cid = self.ids.pop(conn)
        self.chan.send({"t": "returned", "id": cid}, data, fd=sock.fileno())
        self.server._forget(conn, notify=False)
        conn._detach_transport()

    async def _remove(self, name: str) -> None:
        try:
            await self.server.remove_export(name)
        except Exception as e:
            log.warning("removing export %r: %s", name, e)
        self.hooks.pop(name, None)
        self.chan.send({"t": "removed", "export": name})

    async def _shutdown(self, timeout: float) -> None:
        if self.server is not None:
            await self.server.shutdown(timeout)
        self.done.set()


async def _main(fd: int) -> int:
    w = _Worker(socket.socket(fileno=fd))
    await w.done.wait()
    if w._tick is not None:
        w._tick.cancel()
    if w.server is not None and not w.server.stopping:
        await w.server.shutdown(5.0)
    return 0


#: Most workers the default starts (each costs a Python process, ~30 MB).
DEFAULT_MAX = 8


def default_workers(cpus: int | None = None) -> int:
    """``serve --workers`` default: ``$NBDBACKUP_WORKERS``, else one per
    CPU this process may run on (at most `DEFAULT_MAX`) when there are at
    least 2, else 0 (measured: docs/workers.md).  ``cpus``: that count when
    the caller knows better (``serve`` passes `cgroup.cpu_count`, which
    also obeys a cgroup CPU quota); default the affinity mask."""
    v = os.environ.get(ENV)
    if v:
        try:
            return int(v)
        except ValueError:
            raise ValueError(f"{ENV}={v!r} is not a number") from None
    if cpus is None:
        from ..cgroup import Limits, cpu_count

        cpus = cpu_count(Limits())  # the affinity mask alone
    return min(cpus, DEFAULT_MAX) if cpus >= 2 else 0


if __name__ == "__main__":
    from ..commands import run_async

    import signal

    # Ctrl-C and a terminal's hangup reach the whole process group, and systemd's
    # stop SIGTERMs the whole cgroup: the owner stops us (shutdown: drain, flush,
    # close), or we stop when its end of the channel closes.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(run_async(_main(int(sys.argv[1]))))
