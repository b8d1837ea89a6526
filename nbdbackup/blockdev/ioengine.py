"""I/O engines: positional file I/O whose copying runs off the event loop.

Role: the file device (`blockdev.file`) hands its reads, writes, fsyncs and
fallocates to an engine; the loop thread only parses and answers, the kernel
(io_uring) or worker threads copy the bytes.  One engine per event loop
(`for_loop`), of the kind chosen once per process (`select`):

- ``io_uring``: the kernel ABI through ``syscall()`` and ctypes (no
  compiled code of ours, no liburing): one ring, SQ/CQ rings and the SQE
  array mmap'd, an eventfd registered with ``IORING_REGISTER_EVENTFD``
  read by ``loop.add_reader``.  (Not ``IORING_REGISTER_EVENTFD_ASYNC``: it
  does not signal completions the kernel posts through task work on our
  thread, e.g. an io-wq read of a directory failing with EISDIR, and such
  an operation would wait forever.)  Submissions made during one loop iteration are
  queued and sent with ONE ``io_uring_enter`` (`_flush`, scheduled by
  ``call_soon`` once per batch); completions that the kernel finished inline
  are reaped right after that call, the others when the eventfd fires.
  Operations of ``async_min`` bytes or more (default 16 KiB,
  ``NBDBACKUP_IO_ASYNC_MIN``) carry ``IOSQE_ASYNC``, so their copy runs on
  the kernel's io-wq threads (the other core) instead of inside
  ``io_uring_enter`` on the loop thread (a 32 KiB buffered write without it
  is copied inline: 7 us of the loop's time).
- ``threads``: the batch of one loop iteration is handed to a small thread
  pool in groups of about `GROUP_BYTES` (one hand-off per group, not per
  request; ``os.preadv``/``pwritev``/``fdatasync`` release the GIL), and each
  group comes back with one ``call_soon_threadsafe``.
- ``sync``: no engine (`for_loop` returns None): the device's own path
  (inline small I/O, a thread per large one).

`select` resolves ``auto`` (the default; ``NBDBACKUP_IO_ENGINE`` or
``serve --io-engine`` override it) to the plain path (``sync``), which
measured fastest on a quiet machine (docs/ioengine.md), and records whether
io_uring would work: not when ``/proc/sys/kernel/io_uring_disabled`` says 2
(or 1 and we are not allowed), or ``io_uring_setup`` fails (ENOSYS: old
kernel; EPERM: seccomp in a container; ENOMEM: locked-memory limit).  `selected` says what
was chosen and why (``serve --verbose``, the metrics info gauge).

Interface (every method is called on the loop thread; ``cb(err)`` is called
on the loop thread, later, never inside the call, with 0 or an errno):
``read(fd, buf, offset, cb)`` fills ``buf`` completely (zeroes past EOF);
``write(fd, buf, offset, flags, cb)`` writes all of ``buf`` (``flags``:
``os.RWF_DSYNC`` for FUA); ``fsync(fd, cb)`` is ``fdatasync``;
``fallocate(fd, mode, offset, length, cb)``.  ``aread``/``awrite``/
``afsync``/``afallocate`` are the awaitable forms.

Invariants:
- A buffer handed to an engine is referenced (and, for io_uring, exported
  through a ctypes object, so it cannot be resized or closed) until its
  completion callback has run; the caller must not change it meanwhile.
- Short reads and writes are resubmitted for the rest (reads hitting EOF are
  zero-filled, as `FileDev` does); EINTR/EAGAIN are retried; any other
  failure completes the operation with its errno (negative CQE ``res``).
- Operations are independent: no ordering between two operations in flight
  (as with the thread pool before); a caller that needs order waits for the
  first completion (the NBD server replies only after completion, so a client
  that waits for a reply sees the write in every later read, on any path).
- At most ``cq_entries`` operations are in the kernel at once (no CQ
  overflow); the rest wait in ``_pending`` in submission order.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import struct
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

ENGINES = ("auto", "io_uring", "threads", "sync")
ENV = "NBDBACKUP_IO_ENGINE"

Callback = Callable[[int], None]

# -- kernel ABI (include/uapi/linux/io_uring.h; numbers are the same on every arch) --
_NR_SETUP, _NR_ENTER, _NR_REGISTER = 425, 426, 427
_OP_NOP, _OP_FSYNC, _OP_FALLOCATE, _OP_READ, _OP_WRITE = 0, 3, 17, 22, 23
_IOSQE_ASYNC = 1 << 4
_FSYNC_DATASYNC = 1
_SETUP_CLAMP = 1 << 4
_SETUP_SUBMIT_ALL = 1 << 7
_SETUP_SINGLE_ISSUER = 1 << 12
_SETUP_DEFER_TASKRUN = 1 << 13
_FEAT_SINGLE_MMAP = 1 << 0
_FEAT_NODROP = 1 << 1
_ENTER_GETEVENTS = 1
_REGISTER_EVENTFD_ASYNC = 7
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000

#: struct io_uring_params: 7 u32 + 3 u32 reserved, then io_sqring_offsets and
#: io_cqring_offsets (8 u32 + u64 each).
_PARAMS = struct.Struct("<10I 8IQ 8IQ")
#: struct io_uring_sqe (64 bytes): opcode, flags, ioprio, fd, off, addr, len,
#: op flags (rw_flags/fsync_flags), user_data, buf_index, personality,
#: splice_fd_in, addr3, pad.
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")
assert _SQE.size == 64
#: struct io_uring_cqe: user_data, res, flags.
_CQE = struct.Struct("<QiI")
_U32 = struct.Struct("<I")

_libc = ctypes.CDLL(None, use_errno=True)  # libc is loaded (find_library("c") runs ldconfig -p)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _sys(*args) -> int:
    r = _syscall(*args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


#: Bytes per thread-pool hand-off group (small requests go together, large
#: ones each get a worker).
GROUP_BYTES = 1024 * 1024


class _Op:
    """One operation until its callback: kind (an _OP_ code), fd, the
    remaining ``mv`` (memoryview, None for fsync/fallocate) at ``offset``,
    ``flags`` (RWF_* or fallocate mode), ``length`` (fallocate), ``cb``,
    ``keep`` (the ctypes export pinning ``mv``), ``err`` (threads engine)."""

    __slots__ = ("kind", "fd", "mv", "offset", "flags", "length", "cb", "keep", "err")

    def __init__(self, kind, fd, mv, offset, flags, length, cb):
        self.kind, self.fd, self.mv, self.offset = kind, fd, mv, offset
        self.flags, self.length, self.cb = flags, length, cb
        self.keep = None
        self.err = 0


def _as_mv(buf) -> memoryview:
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class Engine:
    """Common part: callback API, awaitable wrappers, per-batch flush."""

    name = "?"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        #: The loop whose thread calls us and runs the callbacks.
        self.loop = loop
        #: Operations queued this iteration (not yet in the kernel / pool).
        self._pending: deque[_Op] = deque()
        #: `_flush` is scheduled.
        self._flush_scheduled = False
        #: Counters for metrics: operations submitted, completed, batches flushed.
        self.submitted = 0
        self.batches = 0
        self.closed = False

    # -- callback API -----------------------------------------------------

    def read(self, fd: int, buf, offset: int, cb: Callback) -> None:
        mv = _as_mv(buf)
        if not len(mv):
            self.loop.call_soon(cb, 0)
            return
        self._queue(_Op(_OP_READ, fd, mv, offset, 0, 0, cb))

    def write(self, fd: int, buf, offset: int, flags: int, cb: Callback) -> None:
        mv = _as_mv(buf)
        if not len(mv):
            self.loop.call_soon(cb, 0)
            return
        self._queue(_Op(_OP_WRITE, fd, mv, offset, flags, 0, cb))

    def fsync(self, fd: int, cb: Callback) -> None:
        self._queue(_Op(_OP_FSYNC, fd, None, 0, 0, 0, cb))

    def fallocate(self, fd: int, mode: int, offset: int, length: int, cb: Callback) -> None:
        self._queue(_Op(_OP_FALLOCATE, fd, None, offset, mode, length, cb))

    def _queue(self, op: _Op) -> None:
        if self.closed:
            raise OSError(errno.ESHUTDOWN, "I/O engine closed")
        self._pending.append(op)
        self.submitted += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        raise NotImplementedError

    # -- awaitable API ------------------------------------------------------

    def _future(self) -> tuple[asyncio.Future, Callback]:
        return future_and_callback(self.loop)

    async def aread(self, fd: int, buf, offset: int) -> None:
        fut, cb = self._future()
        self.read(fd, buf, offset, cb)
        await _shielded(fut)

    async def awrite(self, fd: int, buf, offset: int, flags: int = 0) -> None:
        fut, cb = self._future()
        self.write(fd, buf, offset, flags, cb)
        await _shielded(fut)

    async def afsync(self, fd: int) -> None:
        fut, cb = self._future()
        self.fsync(fd, cb)
        await _shielded(fut)

    async def afallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        fut, cb = self._future()
        self.fallocate(fd, mode, offset, length, cb)
        await _shielded(fut)

    def close(self) -> None:
        self.closed = True

    def info(self) -> dict:
        return {"engine": self.name, "submitted": self.submitted, "batches": self.batches}


def future_and_callback(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Future, Callback]:
    """A future and the engine callback that settles it: ``OSError(err)`` for a
    non-zero errno, else None (a second call is ignored)."""
    fut = loop.create_future()

    def done(err: int) -> None:
        if fut.done():
            return
        if err:
            fut.set_exception(OSError(err, os.strerror(err)))
        else:
            fut.set_result(None)
    return fut, done


async def _shielded(fut: asyncio.Future) -> None:
    """Await ``fut``; a cancelled caller still returns only once the kernel
    or the worker is done with the buffer (the caller may reuse it after)."""
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        if not fut.done():
            try:
                await fut
            except BaseException:
                pass
        raise


def _complete(op: _Op, err: int) -> None:
    cb, op.cb, op.mv, op.keep = op.cb, None, None, None
    cb(err)


# ------------------------------------------------------------------ threads

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=int(os.environ.get("NBDBACKUP_IO_THREADS", "3")),
                                       thread_name_prefix="nbdbackup-ioengine")
        return _pool


def _run_op(op: _Op) -> None:
    """Worker side: the whole operation, synchronously; errno into ``op.err``."""
    try:
        k = op.kind
        if k == _OP_WRITE:
            mv, off = op.mv, op.offset
            while len(mv):
                n = os.pwritev(op.fd, [mv], off, op.flags) if op.flags else os.pwrite(op.fd, mv, off)
                mv, off = mv[n:], off + n
        elif k == _OP_READ:
            mv, off = op.mv, op.offset
            while len(mv):
                n = os.preadv(op.fd, [mv], off)
                if n == 0:
                    mv[:] = bytes(len(mv))
                    break
                mv, off = mv[n:], off + n
        elif k == _OP_FSYNC:
            os.fdatasync(op.fd)
        elif k == _OP_FALLOCATE:
            from .file import fallocate
            fallocate(op.fd, op.flags, op.offset, op.length)
    except OSError as e:
        op.err = e.errno or errno.EIO
    except Exception:  # a bug; never lose the completion
        op.err = errno.EIO


class ThreadEngine(Engine):
    """Batched hand-off to a small thread pool (see the module docstring)."""

    name = "threads"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._pool = _thread_pool()

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending = self._pending
        group: list[_Op] = []
        nbytes = 0
        while pending:
            op = pending.popleft()
            group.append(op)
            nbytes += len(op.mv) if op.mv is not None else GROUP_BYTES
            if nbytes >= GROUP_BYTES:
                self._hand_off(group)
                group, nbytes = [], 0
        if group:
            self._hand_off(group)

    def _hand_off(self, group: list[_Op]) -> None:
        self.batches += 1
        self._pool.submit(self._work, group)

    def _work(self, group: list[_Op]) -> None:
        for op in group:
            _run_op(op)
        try:
            self.loop.call_soon_threadsafe(self._done, group)
        except RuntimeError:  # the loop was closed under us: nobody waits
            pass

    @staticmethod
    def _done(group: list[_Op]) -> None:
        for op in group:
            _complete(op, op.err)


# ------------------------------------------------------------------ io_uring

class Ring:
    """One io_uring instance: setup, the mmap'd rings, SQE/CQE access.

    Fields: ``fd`` (the ring), ``sq_entries``/``cq_entries``; the SQ ring
    offsets (``_sq_head``, ``_sq_tail``, ``_sq_mask``), ``_sq_tail_local``
    (the next SQE slot we fill; published by `submit`), ``_sqes`` (SQE array
    mapping), ``_cq`` mapping with ``_cq_head``/``_cq_tail``/``_cq_mask``/
    ``_cqes`` offsets.  x86-64 and other TSO machines order our plain mmap
    stores as the kernel needs (SQE bytes before the tail, CQE reads before
    the head); the ring is refused elsewhere (`probe`).
    """

    def __init__(self, entries: int = 256, flags: int = _SETUP_CLAMP | _SETUP_SUBMIT_ALL,
                 defer_taskrun: bool = False) -> None:
        params = bytearray(_PARAMS.size)
        pbuf = (ctypes.c_char * len(params)).from_buffer(params)
        tries = [flags]
        if defer_taskrun:
            tries.insert(0, flags | _SETUP_SINGLE_ISSUER | _SETUP_DEFER_TASKRUN)
        if flags & _SETUP_SUBMIT_ALL:
            tries.append(flags & ~_SETUP_SUBMIT_ALL)  # kernels before 5.18
        for i, f in enumerate(tries):
            params[:] = bytes(len(params))
            _U32.pack_into(params, 8, f)  # io_uring_params.flags
            try:
                fd = _sys(ctypes.c_long(_NR_SETUP), ctypes.c_uint(entries), pbuf)
            except OSError as e:
                if e.errno != errno.EINVAL or i == len(tries) - 1:
                    raise
                continue
            self.setup_flags = f
            break
        del pbuf
        self.fd = fd
        try:
            p = _PARAMS.unpack(params)
            sq_entries, cq_entries, _flags, _cpu, _idle, features = p[:6]
            sq_head, sq_tail, sq_mask, _sq_ent, _sq_flags, _dropped, sq_array = p[10:17]
            cq_head, cq_tail, cq_mask, _cq_ent, _overflow, cqes = p[19:25]
            self.sq_entries, self.cq_entries, self.features = sq_entries, cq_entries, features
            sq_size = sq_array + sq_entries * 4
            cq_size = cqes + cq_entries * _CQE.size
            if features & _FEAT_SINGLE_MMAP:
                size = max(sq_size, cq_size)
                self._sq = self._cq = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                                mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_SQ_RING)
            else:
                self._sq = mmap.mmap(fd, sq_size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                     mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_SQ_RING)
                self._cq = mmap.mmap(fd, cq_size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                     mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_CQ_RING)
            self._sqes = mmap.mmap(fd, sq_entries * _SQE.size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=_OFF_SQES)
        except BaseException:
            os.close(fd)
            raise
        self._sq_head, self._sq_tail, self._sq_mask = sq_head, sq_tail, sq_mask
        self._cq_head, self._cq_tail, self._cq_mask, self._cqes = cq_head, cq_tail, cq_mask, cqes
        self._sq_mask_v = _U32.unpack_from(self._sq, sq_mask)[0]
        self._cq_mask_v = _U32.unpack_from(self._cq, cq_mask)[0]
        # Identity SQ index array: slot i holds SQE i, so only the tail moves.
        for i in range(sq_entries):
            _U32.pack_into(self._sq, sq_array + 4 * i, i)
        self._sq_tail_local = _U32.unpack_from(self._sq, sq_tail)[0]
        self.eventfd = -1

    def sq_space(self) -> int:
        head = _U32.unpack_from(self._sq, self._sq_head)[0]
        return self.sq_entries - ((self._sq_tail_local - head) & 0xFFFFFFFF)

    def prep(self, opcode: int, sqe_flags: int, fd: int, off: int, addr: int, length: int,
             op_flags: int, user_data: int) -> None:
        """Fill the next SQE (not yet visible to the kernel)."""
        t = self._sq_tail_local
        _SQE.pack_into(self._sqes, (t & self._sq_mask_v) * 64, opcode, sqe_flags, 0, fd,
                       off & 0xFFFFFFFFFFFFFFFF, addr, length, op_flags, user_data, 0, 0, 0, 0, 0)
        self._sq_tail_local = (t + 1) & 0xFFFFFFFF

    def submit(self, n: int, wait: int = 0) -> int:
        """Publish the prepared SQEs and enter the kernel once; returns the
        number the kernel consumed."""
        _U32.pack_into(self._sq, self._sq_tail, self._sq_tail_local)
        flags = _ENTER_GETEVENTS if wait else 0
        return _sys(ctypes.c_long(_NR_ENTER), ctypes.c_uint(self.fd), ctypes.c_uint(n),
                    ctypes.c_uint(wait), ctypes.c_uint(flags), None, ctypes.c_size_t(0))

    def get_events(self) -> None:
        """Enter with GETEVENTS and no wait (runs deferred task work)."""
        _sys(ctypes.c_long(_NR_ENTER), ctypes.c_uint(self.fd), ctypes.c_uint(0),
             ctypes.c_uint(0), ctypes.c_uint(_ENTER_GETEVENTS), None, ctypes.c_size_t(0))

    def reap(self) -> list[tuple[int, int]]:
        """Every completion posted so far: [(user_data, res)]; frees the slots."""
        cq = self._cq
        head = _U32.unpack_from(cq, self._cq_head)[0]
        tail = _U32.unpack_from(cq, self._cq_tail)[0]
        if head == tail:
            return []
        out = []
        mask, base, unpack = self._cq_mask_v, self._cqes, _CQE.unpack_from
        while head != tail:
            ud, res, _f = unpack(cq, base + (head & mask) * 16)
            out.append((ud, res))
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(cq, self._cq_head, head)
        return out

    def register_eventfd(self, efd: int, async_only: bool = False) -> None:
        arg = ctypes.c_int(efd)
        _sys(ctypes.c_long(_NR_REGISTER), ctypes.c_uint(self.fd),
             ctypes.c_uint(_REGISTER_EVENTFD_ASYNC if async_only else 4), ctypes.byref(arg), ctypes.c_uint(1))
        self.eventfd = efd

    def close(self) -> None:
        for m in {id(self._sq): self._sq, id(self._cq): self._cq, id(self._sqes): self._sqes}.values():
            try:
                m.close()
            except (BufferError, ValueError):
                pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _address(mv: memoryview) -> tuple[object, int]:
    """(keep-alive object, address) of a buffer's first byte; a read-only
    buffer is copied first (only writes pass those)."""
    try:
        c = ctypes.c_char.from_buffer(mv)
    except TypeError:
        copy = bytearray(mv)
        c = ctypes.c_char.from_buffer(copy)
        return (c, copy), ctypes.addressof(c)
    return c, ctypes.addressof(c)


class UringEngine(Engine):
    """io_uring (see the module docstring).

    Fields: ``ring``; ``efd`` (eventfd, non-blocking, on the loop's reader
    list); ``_inflight`` (user_data -> `_Op` in the kernel); ``_next_ud``;
    ``async_min`` (operations of at least this many bytes get IOSQE_ASYNC;
    fsync and fallocate always do: they block)."""

    name = "io_uring"

    def __init__(self, loop: asyncio.AbstractEventLoop, entries: int = 256) -> None:
        super().__init__(loop)
        #: IORING_SETUP_DEFER_TASKRUN (``NBDBACKUP_IO_URING_DEFER=1``):
        #: completions of io-wq work are posted only when we enter the kernel
        #: (`_on_eventfd`), never by interrupting the loop thread.  Off by
        #: default: measured, it cost the loop 0.5 us more per 4 KiB write and
        #: 3-5 us more per 1 MiB write (bench/ioengine_bench.py, docs/ioengine.md).
        self.ring = Ring(entries, defer_taskrun=os.environ.get("NBDBACKUP_IO_URING_DEFER", "0") == "1")
        self.defer = bool(self.ring.setup_flags & _SETUP_DEFER_TASKRUN)
        try:
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.ring.register_eventfd(self.efd)
        except BaseException:
            self.ring.close()
            raise
        self._inflight: dict[int, _Op] = {}
        self._next_ud = 1
        #: SQEs published to the kernel but not consumed yet (a busy enter).
        self._unsubmitted = 0
        self.async_min = int(os.environ.get("NBDBACKUP_IO_ASYNC_MIN", str(16 * 1024)))
        self._limit = min(self.ring.cq_entries, 2 * self.ring.sq_entries)
        loop.add_reader(self.efd, self._on_eventfd)

    def _flush(self) -> None:
        self._flush_scheduled = False
        ring, pending, inflight = self.ring, self._pending, self._inflight
        while True:
            space = min(ring.sq_space(), self._limit - len(inflight))
            n = 0
            while pending and n < space:
                op = pending.popleft()
                ud = self._next_ud
                self._next_ud = ud + 1
                k = op.kind
                if k == _OP_READ or k == _OP_WRITE:
                    mv = op.mv
                    if op.keep is None:
                        keep, addr = _address(mv)
                        op.keep = (keep, addr)
                    addr = op.keep[1]
                    length = len(mv)
                    ring.prep(k, _IOSQE_ASYNC if length >= self.async_min else 0, op.fd, op.offset,
                              addr, length, op.flags, ud)
                elif k == _OP_FSYNC:
                    ring.prep(k, _IOSQE_ASYNC, op.fd, 0, 0, 0, _FSYNC_DATASYNC, ud)
                else:  # fallocate: addr = length, len = mode
                    ring.prep(k, _IOSQE_ASYNC, op.fd, op.offset, op.length, op.flags, 0, ud)
                inflight[ud] = op
                n += 1
            total = n + self._unsubmitted
            if not total:
                break
            self.batches += 1
            try:
                got = ring.submit(total)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EBUSY, errno.EINTR):
                    # Nothing consumed (kernel short of memory, or busy
                    # with completions): the published SQEs wait in the
                    # ring; enter again soon.
                    self._unsubmitted = total
                    self._retry_later()
                    break
                self._fail_all(e.errno or errno.EIO)
                return
            self._unsubmitted = total - got
            if self._unsubmitted:
                self._retry_later()
                break
            if not pending or space <= 0:
                break  # the rest waits for completions (`_reap` flushes again)
        self._reap()

    def _fail_all(self, err: int) -> None:
        """The ring itself failed: every operation fails with ``err``
        (nothing may wait forever)."""
        ops = list(self._inflight.values()) + list(self._pending)
        self._inflight.clear()
        self._pending.clear()
        self._unsubmitted = 0
        for op in ops:
            _complete(op, err)

    def _retry_later(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_later(0.001, self._flush)

    def _on_eventfd(self) -> None:
        try:
            os.read(self.efd, 8)
        except BlockingIOError:
            pass
        if self.defer:
            try:
                self.ring.get_events()  # runs the deferred completions
            except OSError as e:
                if e.errno not in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    raise
        self._reap()

    def _reap(self) -> None:
        inflight = self._inflight
        again = False
        for ud, res in self.ring.reap():
            op = inflight.pop(ud, None)
            if op is None:
                continue
            if res < 0:
                if res in (-errno.EAGAIN, -errno.EINTR):
                    again = True
                    self._pending.appendleft(op)
                    continue
                _complete(op, -res)
                continue
            k = op.kind
            if (k == _OP_READ or k == _OP_WRITE) and res < len(op.mv):
                if res == 0:
                    if k == _OP_READ:  # EOF of a file that shrank: zeroes, as FileDev
                        op.mv[:] = bytes(len(op.mv))
                        _complete(op, 0)
                    else:
                        _complete(op, errno.EIO)
                    continue
                op.mv = op.mv[res:]
                op.offset += res
                op.keep = (op.keep[0], op.keep[1] + res)
                self._pending.appendleft(op)
                again = True
                continue
            _complete(op, 0)
        if (again or self._pending) and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def close(self) -> None:
        """Wait for what the kernel holds (its buffers must outlive it), then
        free the ring."""
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.efd)
        except Exception:
            pass
        while self._inflight:
            try:
                self.ring.submit(0, wait=1)
            except OSError as e:
                if e.errno != errno.EINTR:
                    break
            self._reap_closing()
        self.ring.close()
        os.close(self.efd)

    def _reap_closing(self) -> None:
        for ud, res in self.ring.reap():
            op = self._inflight.pop(ud, None)
            if op is not None:
                op.cb, op.mv, op.keep = None, None, None

    def info(self) -> dict:
        d = super().info()
        d.update(sq_entries=self.ring.sq_entries, cq_entries=self.ring.cq_entries, defer_taskrun=self.defer,
                 async_min=self.async_min, inflight=len(self._inflight))
        return d


# ------------------------------------------------------------------ selection

#: (engine name, why) once `select` ran.
_selected: tuple[str, str] | None = None
#: The engine of each loop (id(loop) -> Engine); entries of closed loops are
#: dropped when the next engine is made.
_engines: dict[int, Engine] = {}


def probe_io_uring() -> str | None:
    """None when io_uring works here, else why not."""
    if struct.calcsize("P") != 8 or os.uname().machine not in ("x86_64", "amd64", "i686", "s390x"):
        return f"not enabled on {os.uname().machine} (memory ordering of the rings)"
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            disabled = f.read().strip()
        if disabled == "2":
            return "kernel.io_uring_disabled=2"
    except OSError:
        pass
    try:
        ring = Ring(4)
    except OSError as e:
        hint = ""
        if e.errno in (errno.EPERM, errno.ENOSYS):
            # docker >= 25, podman and containerd block io_uring in their default profiles
            hint = "; a seccomp profile blocks it, as container engines' defaults do: use the default engine or threads"
        return f"io_uring_setup: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror}{hint})"
    try:
        ring.prep(_OP_NOP, 0, -1, 0, 0, 0, 0, 1)
        ring.submit(1, wait=1)
        got = ring.reap()
        if got != [(1, 0)]:
            return f"io_uring NOP completed as {got!r}"
    except OSError as e:
        return f"io_uring_enter: {errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"
    finally:
        ring.close()
    return None


def select(name: str | None = None) -> tuple[str, str]:
    """Choose the process's engine once: ``name`` (or ``$NBDBACKUP_IO_ENGINE``,
    or auto).  Returns (engine, why).  ``io_uring`` asked for explicitly but
    unavailable raises OSError (ENOTSUP)."""
    global _selected
    want = (name or os.environ.get(ENV) or "auto").strip().lower().replace("-", "_")
    if want == "iouring":
        want = "io_uring"
    if want not in ENGINES:
        raise ValueError(f"unknown I/O engine {want!r} (choose from {', '.join(ENGINES)})")
    if want == "io_uring":
        why = probe_io_uring()
        if why is not None:
            raise OSError(errno.ENOTSUP, f"io_uring unavailable: {why}")
        _selected = ("io_uring", "requested")
    elif want == "auto":
        # Measured on a quiet 2-core machine (docs/ioengine.md, bench/servers.py --io-engine): neither
        # engine beat the plain path (write-seq 0.54x / 0.49x nbdkit against 0.58x, random 4 KiB
        # writes equal, CPU per byte higher), so auto keeps the plain path and says whether
        # io_uring would be available for --io-engine io_uring.
        why = probe_io_uring()
        _selected = ("sync", "auto: plain path (measured fastest); io_uring available" if why is None
                     else f"auto: plain path (measured fastest); io_uring unavailable: {why}")
    else:
        _selected = (want, "requested")
    return _selected


def selected() -> tuple[str, str]:
    """The process's engine and why (selecting with defaults if nobody did)."""
    return _selected if _selected is not None else select()


def for_loop(loop: asyncio.AbstractEventLoop | None = None) -> Engine | None:
    """The running loop's engine, made on first use; None for ``sync``."""
    name = selected()[0]
    if name == "sync":
        return None
    if loop is None:
        loop = asyncio.get_running_loop()
    eng = _engines.get(id(loop))
    if eng is not None and eng.loop is loop and not eng.closed:
        return eng
    for k, e in list(_engines.items()):
        if e.loop.is_closed() or e.closed:
            _engines.pop(k, None)
            if not e.closed:
                _close_dead(e)
    eng = UringEngine(loop) if name == "io_uring" else ThreadEngine(loop)
    _engines[id(loop)] = eng
    return eng


def _close_dead(e: Engine) -> None:
    """Free the kernel resources of an engine whose loop is gone."""
    e.closed = True
    if isinstance(e, UringEngine):
        if e._inflight:
            return  # its buffers may still be in use: leak rather than corrupt
        e.ring.close()
        try:
            os.close(e.efd)
        except OSError:
            pass


def reset() -> None:
    """Forget the selection and close idle engines (tests)."""
    global _selected
    for k, e in list(_engines.items()):
        _engines.pop(k, None)
        if e.loop.is_closed():
            _close_dead(e)
        elif not e.closed:
            try:
                e.close()
            except Exception:
                pass
    _selected = None


def prometheus_text() -> str:
    """The ``nbdbackup_io_engine_info`` gauge (1, labelled with the engine
    and why it was chosen) and the engines' operation counters."""
    name, why = selected()
    why = why.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
    ops = sum(e.submitted for e in _engines.values())
    batches = sum(e.batches for e in _engines.values())
    return ("# HELP nbdbackup_io_engine_info The I/O engine chosen at start (serve --io-engine).\n"
            "# TYPE nbdbackup_io_engine_info gauge\n"
            f'nbdbackup_io_engine_info{{engine="{name}",reason="{why}"}} 1\n'
            "# HELP nbdbackup_io_engine_operations_total Operations handed to the I/O engine.\n"
            "# TYPE nbdbackup_io_engine_operations_total counter\n"
            f"nbdbackup_io_engine_operations_total {ops}\n"
            "# HELP nbdbackup_io_engine_batches_total Submissions (io_uring_enter calls or pool hand-offs).\n"
            "# TYPE nbdbackup_io_engine_batches_total counter\n"
            f"nbdbackup_io_engine_batches_total {batches}\n")
