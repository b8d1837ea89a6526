"""A raw image file or block device as a `BlockDev`.

Role: the live disk of most exports and the usual local backup target.

I/O model: a read is first tried inline on the event-loop thread with
``preadv(..., RWF_NOWAIT)``: a page-cache hit costs microseconds, far less
than a thread hand-off, and the kernel answers EAGAIN instead of blocking
when the data is not cached; only then (or for the rest of a short read) does
the read go to a small thread pool.  Writes up to ``inline_limit`` bytes are
done inline (they land in the page cache); larger ones and every fdatasync go
to the pool, so a slow disk never stalls the event loop for long.  `pwrite_now`
(the server's task-free WRITE path) takes the inline writes without FUA;
`zero_now` and `trim_now` the kernel primitives, without FUA.  Durability: FUA writes use
``RWF_DSYNC``; FLUSH is ``fdatasync``.  TRIM punches holes
(``FALLOC_FL_PUNCH_HOLE``, ``BLKDISCARD`` on block devices); WRITE_ZEROES uses
``FALLOC_FL_PUNCH_HOLE`` when trimming is allowed, else
``FALLOC_FL_ZERO_RANGE``/``BLKZEROOUT``, falling back to writing zeroes unless
the request asked to be fast.  Extents come from SEEK_DATA/SEEK_HOLE.

I/O engine (`blockdev.ioengine`, chosen once per process): with ``io_uring``
or ``threads``, what used to go to the pool (cache-missing reads, writes
above ``engine_inline_max`` bytes, FUA writes, fdatasync) goes to the loop's
engine instead, batched per loop iteration; `pwrite_start` hands a WRITE to
it with a completion callback, so the server needs no task for it.  Writes of
at most ``engine_inline_max`` bytes (default 16 KiB, ``NBDBACKUP_IO_INLINE_MAX``)
stay inline: a 4 KiB pwrite into 4 KiB folios costs the loop ~2.3 us, a
16 KiB one ~5.5 us, about what a hand-off plus its completion costs the loop
in the server (bench/ioengine_bench.py; docs/ioengine.md).
Reads of ``engine_read_min`` bytes or more (default 1 MiB,
``NBDBACKUP_IO_READ_MIN``: the pump's and the pull's chunks) go to the engine
at once, even when cached: the copy out of the page cache then runs beside
the loop.
With ``sync`` (or no running loop) the paths above are unchanged.

Invariant: the file offset is never used (only positional I/O), so any number
of requests may run at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import stat
import struct
import concurrent.futures
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from . import ioengine
from ..durable import fsync_dir
from .base import (
    BASE_ALLOCATION,
    HOLE_ZERO,
    BlockDev,
    BlockSize,
    Buffer,
    Capabilities,
    Extent,
    merge_extents,
    write_zeroes_slowly,
)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKSSZGET = 0x1268

_libc = ctypes.CDLL(None, use_errno=True)  # libc is loaded (find_library("c") runs ldconfig -p)
_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nbdbackup-io")
    return _executor


class FileDev(BlockDev):
    """A raw file or block device.

    Fields: ``path``; ``fd`` (owned, closed by `close`); ``read_only``;
    ``is_block`` (block device, not a regular file); ``_size``;
    ``inline_limit``; ``_nowait`` (RWF_NOWAIT reads work here); ``_punch_ok`` / ``_zero_range_ok`` (cleared the first
    time the filesystem says EOPNOTSUPP, so later calls skip the attempt);
    ``_threads`` (the pool jobs using ``fd`` that have not ended: a job goes on
    in its thread after its awaiting task was cancelled, so `close` waits for
    them -- closing under them would let a reused descriptor number take a
    late write; each job removes itself when done, from its thread);
    ``_engine_ops`` (operations handed to the loop's I/O engine whose
    completion has not run yet: an operation queued in the engine names
    ``fd`` by number until the kernel or a worker is done with it, so `close`
    waits for them too -- hunt 7: a ``pwrite_start`` or a cancelled engine
    write still queued when ``fd`` was closed landed in whatever file took the
    number next); ``_engine_idle`` (an Event `close` waits on, set when
    ``_engine_ops`` drops to 0; None unless `close` waits).
    """

    def __init__(self, path: str, *, read_only: bool = False, inline_limit: int = 1024 * 1024,
                 create_size: int | None = None) -> None:
        self.path = path
        self.read_only = read_only
        self.inline_limit = inline_limit
        self._threads: set[concurrent.futures.Future] = set()
        self._engine_ops = 0
        self._engine_idle: asyncio.Event | None = None
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        created = False
        if create_size is not None and not read_only:
            try:
                self.fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                self.fd = os.open(path, flags, 0o644)
        else:
            self.fd = os.open(path, flags, 0o644)
        try:
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            if not (self.is_block or stat.S_ISREG(st.st_mode)):
                raise OSError(errno.EINVAL, f"{path}: not a regular file or block device")
            if self.is_block:
                buf = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
                self._size = struct.unpack("Q", buf)[0]
            else:
                if create_size is not None and st.st_size == 0 and create_size:
                    os.ftruncate(self.fd, create_size)
                self._size = os.fstat(self.fd).st_size
            if created:
                # The new file's name durable before anything is written to it: a FLUSH
                # makes its data durable, not its directory entry (a power loss would lose
                # the whole file: tests/interop/test_powercut.py, a restore's target).
                fsync_dir(os.path.dirname(os.path.abspath(path)))
        except BaseException:
            os.close(self.fd)
            raise
        self._punch_ok = True
        self._zero_range_ok = True
        #: With an engine: non-FUA writes up to this many bytes stay inline.
        self.engine_inline_max = int(os.environ.get("NBDBACKUP_IO_INLINE_MAX", "16384"))
        #: With an engine: `pread` of at least this many bytes goes straight
        #: to it (no inline RWF_NOWAIT attempt; `pread_now` still tries).
        self.engine_read_min = int(os.environ.get("NBDBACKUP_IO_READ_MIN", str(1024 * 1024)))
        # NBDBACKUP_RWF_NOWAIT=0: behave as on a file system without RWF_NOWAIT
        # reads (overlayfs: every read goes to a thread), e.g. to test that path.
        self._nowait = hasattr(os, "RWF_NOWAIT") and os.environ.get("NBDBACKUP_RWF_NOWAIT", "1") != "0"
        self._sector = 512
        if self.is_block:
            try:
                self._sector = struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4))[0]
            except OSError:
                pass

    @property
    def size(self) -> int:
        return self._size

    def capabilities(self) -> Capabilities:
        ro = self.read_only
        return Capabilities(
            read_only=ro,
            can_flush=not ro,
            can_fua=not ro,
            can_trim=not ro,
            can_zero=not ro,
            can_fast_zero=not ro,
            can_cache=True,
            can_multi_conn=True,  # one fd, fdatasync covers every connection's writes
            can_extents=not self.is_block,
            block_size=BlockSize(1, 4096, 32 * 1024 * 1024),
        )

    def meta_contexts(self) -> Sequence[str]:
        return (BASE_ALLOCATION,)

    # -- plumbing ---------------------------------------------------------

    @staticmethod
    def _engine() -> ioengine.Engine | None:
        """The running loop's I/O engine (None: the sync paths)."""
        return ioengine.for_loop()

    def _engine_start(self, start, *args) -> None:
        """``start(*args, cb)`` (an engine's ``read``/``write``/``fsync``/
        ``fallocate``, the callback last), counted in ``_engine_ops`` until the
        callback ``args[-1]`` has run."""
        *head, cb = args
        self._engine_ops += 1

        def done(err: int) -> None:
            self._engine_ops -= 1
            if not self._engine_ops and self._engine_idle is not None:
                self._engine_idle.set()
            cb(err)

        start(*head, done)

    async def _engine_await(self, start, *args) -> None:
        """`_engine_start` awaited: OSError(errno) on failure; a cancelled
        awaiter returns only once the engine is done with the buffer."""
        fut, cb = ioengine.future_and_callback(asyncio.get_running_loop())
        self._engine_start(start, *args, cb)
        await ioengine._shielded(fut)

    async def _run(self, length: int, fn, *args):
        if length <= self.inline_limit:
            return fn(*args)
        return await self._in_pool(fn, *args)

    async def _in_pool(self, fn, *args):
        """``fn(*args)`` on the pool, counted in ``_threads`` until it ends
        (not until its awaiter stops waiting)."""
        job = _pool().submit(fn, *args)
        self._threads.add(job)
        job.add_done_callback(self._threads.discard)
        return await asyncio.wrap_future(job)

    def _preadv_all(self, buf: memoryview, offset: int) -> None:
        done, n = 0, len(buf)
        while done < n:
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got == 0:
                # Past EOF of a file that shrank under us: read zeroes.
                buf[done:] = bytes(n - done)
                return
            done += got

    def _pwritev_all(self, buf: memoryview, offset: int, flags: int) -> None:
        done, n = 0, len(buf)
        while done < n:
            done += os.pwritev(self.fd, [buf[done:]], offset + done, flags)

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EPERM, "read-only export")

    # -- BlockDev ---------------------------------------------------------

    def pread_now(self, buf: memoryview, offset: int) -> bool:
        """One ``preadv(RWF_NOWAIT)``: done now iff the page cache holds it all."""
        if not self._nowait:
            return False
        try:
            return os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT) == len(buf)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._nowait = False
            return False

    def extents_now(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent] | None:
        if context != BASE_ALLOCATION:
            return None
        return self.extents_sync(offset, length)

    async def pread(self, buf: memoryview, offset: int) -> None:
        n = len(buf)
        if n >= self.engine_read_min:
            eng = self._engine()
            if eng is not None:
                # A large read (pump, pull, copy-before-write batches): the
                # copy out of the page cache runs on the engine's side.
                await self._engine_await(eng.read, self.fd, buf, offset)
                return
        if self._nowait:
            try:
                got = os.preadv(self.fd, [buf], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                got = 0
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False  # e.g. a filesystem without RWF_NOWAIT
                got = 0
            if got == n:
                return
            if got:
                buf, offset = buf[got:], offset + got
        eng = self._engine()
        if eng is not None:
            await self._engine_await(eng.read, self.fd, buf, offset)
            return
        await self._in_pool(self._preadv_all, buf, offset)

    def pwrite_now(self, buf: Buffer, offset: int, fua: bool = False) -> bool:
        """Writes `pwrite` would do inline (up to ``inline_limit`` bytes),
        except FUA ones: ``RWF_DSYNC`` waits for the disk."""
        if fua or self.read_only:
            return False
        mv = memoryview(buf).cast("B")
        limit = self.inline_limit
        if ioengine.selected()[0] != "sync":
            limit = min(limit, self.engine_inline_max)
        if len(mv) > limit:
            return False
        n = os.pwrite(self.fd, mv, offset)  # one call: this is the batch path's per-request cost
        if n < len(mv):
            self._pwritev_all(mv[n:], offset + n, 0)
        return True

    def pwrite_start(self, buf: Buffer, offset: int, fua: bool, cb) -> bool:
        """Hand the write to the loop's I/O engine; ``cb(errno or 0)`` runs on
        the loop once it is complete (durable if ``fua``).  False (nothing
        started) without an engine."""
        if self.read_only:
            return False
        eng = self._engine()
        if eng is None:
            return False
        self._engine_start(eng.write, self.fd, buf, offset, os.RWF_DSYNC if fua else 0, cb)
        return True

    async def pwrite(self, buf: Buffer, offset: int, *, fua: bool = False) -> None:
        self._check_writable()
        mv = memoryview(buf).cast("B")
        eng = self._engine()
        if eng is not None and (fua or len(mv) > min(self.inline_limit, self.engine_inline_max)):
            await self._engine_await(eng.write, self.fd, mv, offset, os.RWF_DSYNC if fua else 0)
            return
        await self._run(len(mv), self._pwritev_all, mv, offset, os.RWF_DSYNC if fua else 0)

    def _zero_sync(self, offset: int, length: int, may_trim: bool, fast: bool) -> bool:
        """Zero with the cheapest kernel primitive; False when none applies."""
        if self.is_block:
            if may_trim:
                # BLKDISCARD does not guarantee zeroes; use BLKZEROOUT.
                pass
            try:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                return True
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY):
                    raise
                return False
        if may_trim and self._punch_ok:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return True
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self._punch_ok = False
        if self._zero_range_ok:
            try:
                fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return True
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self._zero_range_ok = False
        return False

    def zero_now(self, offset: int, length: int, *, may_trim: bool = False,
                 fua: bool = False, fast: bool = False) -> bool:
        """When a kernel primitive zeroes the range (what `zero` tries first,
        inline), without FUA (the flush goes to the pool)."""
        if fua or self.read_only:
            return False
        return self._zero_sync(offset, length, may_trim, fast)

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        self._check_writable()
        if self._zero_sync(offset, length, may_trim, fast):
            if fua:
                await self.flush()
            return
        if fast:
            raise OSError(errno.ENOTSUP, "zeroing cannot be fast here")
        await write_zeroes_slowly(self, offset, length, fua=fua)

    def trim_now(self, offset: int, length: int, *, fua: bool = False) -> bool:
        """`trim` is inline but for FUA's flush."""
        if fua or self.read_only:
            return False
        self._trim_sync(offset, length)
        return True

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_writable()
        self._trim_sync(offset, length)
        if fua:
            await self.flush()

    def _trim_sync(self, offset: int, length: int) -> None:
        try:
            if self.is_block:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            elif self._punch_ok:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            # TRIM is advisory: a filesystem without hole punching ignores it.
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise
            self._punch_ok = False

    async def flush(self) -> None:
        if self.read_only:
            return
        eng = self._engine()
        if eng is not None:
            await self._engine_await(eng.fsync, self.fd)
            return
        await self._in_pool(os.fdatasync, self.fd)

    async def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents_sync(self, offset: int, length: int) -> list[Extent]:
        end = offset + length
        if self.is_block:
            return [Extent(offset, length, 0)]
        out: list[Extent] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data after pos: hole to EOF
                    data = end
                else:
                    return [Extent(offset, length, 0)]
            if data > pos:
                hole_end = min(data, end)
                out.append(Extent(pos, hole_end - pos, HOLE_ZERO))
                pos = hole_end
                continue
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            data_end = min(max(hole, pos + 1), end)
            out.append(Extent(pos, data_end - pos, 0))
            pos = data_end
        return merge_extents(out)

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        if context != BASE_ALLOCATION:
            raise OSError(errno.EINVAL, f"unknown meta context {context!r}")
        return self.extents_sync(offset, length)

    async def close(self) -> None:
        while self._threads or self._engine_ops:  # jobs whose awaiters were cancelled may still use fd
            if self._threads:
                await asyncio.wait([asyncio.wrap_future(j) for j in list(self._threads)])
            if self._engine_ops:
                if self._engine_idle is None:
                    self._engine_idle = asyncio.Event()
                await self._engine_idle.wait()
                self._engine_idle = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
