"""Writers for a local file or block device: O_DIRECT where possible; the pull's chunk jobs with write-behind.

Role: the target side of the pull agent (`agent.pull`, `ChunkWriter`) and
of the restore (`agent.restore`, `FileWriter`).

`FileWriter`: data goes through a second descriptor opened with
``O_DIRECT`` when the file system allows it: the page cache is bypassed, so
the data is copied once (our buffer to the disk) instead of twice, and the
disk writes while we work (a 1 GiB write: ~0.05-0.1 CPU s against 0.2-0.4
with write-behind and 0.5-4.7 without, all of it in
``copy_folio_from_iter_atomic`` and page-cache bookkeeping; docs/restorefast.md,
docs/pullfast.md).  What ``O_DIRECT`` cannot take goes through the page
cache: the unaligned head and tail of a range (a disk whose size is not a
multiple of 4096, an extent that starts mid-page) and everything once a
direct write failed with EINVAL (a file system that refuses it).  The final
fdatasync (`FileDev.flush`, same inode) makes both durable.

`ChunkWriter` (the pull): each worked chunk is one job on a small thread
pool: the chunk's digest is taken, its pieces are written through a
`FileWriter` (both release the GIL on large buffers, so the event loop keeps
receiving the next chunks on the other core).  What went through the page
cache is written back at once (``sync_file_range(SYNC_FILE_RANGE_WRITE)``);
once more than ``window`` bytes were written after it, a chunk's write-back
is waited for (``SYNC_FILE_RANGE_WAIT_BEFORE|WRITE|WAIT_AFTER``) and its
clean pages are dropped (``POSIX_FADV_DONTNEED``).  Chunks written all
direct skip both.

Why write-behind (bench/pull_bench.py, docs/pullcbw.md): without it the 1 MiB
writes ran inline on the loop thread, every page of a 1 GiB pull stayed dirty
until the final ``fdatasync`` (a quarter of the pull's time), and on the
reference VM buffered writes into never-recycled page-cache memory ran at
~1 GB/s of kernel CPU (``copy_folio_from_iter_atomic``) against ~2 GB/s when
a small window of pages is written back and recycled.  nbdcopy does the same
(write-behind + DONTNEED per 256 KiB request).

Invariants: neither writer makes anything durable -- `flush`
(``fdatasync``, done by the caller) does; write-behind is advisory: a
``sync_file_range`` failure other than EIO switches it off (e.g. a file
system that refuses it), EIO is raised like a write error.  A direct write
covers only whole `FileWriter.align` blocks of a page-aligned buffer
(`FileWriter.alloc`), so a page is never written both ways by one range;
ranges of different jobs are disjoint.  Jobs touch disjoint byte ranges (one
chunk each), so they may run in any order.

Fields (`ChunkWriter`): ``out`` (its `FileWriter`, owned: closed by `close`);
``fd`` (``out.fd``, not owned: the `FileDev`'s); ``window`` (bytes of
written chunks whose write-back is not yet waited for); ``_pool`` (its
threads, shut down by `close`); ``_lock`` guards ``_pending`` (FIFO of
``(offset, length)`` of chunks written, not yet waited for) and
``_pending_bytes``; ``_sfr_ok`` (write-behind still on).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from ..blockdev.writeback import (
    SYNC_FILE_RANGE_WAIT_AFTER,
    SYNC_FILE_RANGE_WAIT_BEFORE,
    SYNC_FILE_RANGE_WRITE,
    available,
    sync_file_range,
)

#: Default write-behind window: bytes written whose write-back may still run.
DEFAULT_WINDOW = 64 << 20
#: Writer threads of a `ChunkWriter` whose `FileWriter` writes direct: they
#: mostly wait for the disk, so more of them keep more writes in flight (4
#: against 2, alternating runs of a 1 GiB pull at load 5-10: 0.79-1.22 s
#: against 0.90-1.44 s, docs/pullfast.md); through the page cache 2 (they
#: copy, on 2 cores).
DIRECT_THREADS = 4
BUFFERED_THREADS = 2
#: Largest single write through the page cache (see `agent.pull.MAX_READ`
#: for why not larger).
MAX_WRITE = 1 << 20


class FileWriter:
    """Blocking writes into a `FileDev` (a file or block device), ``O_DIRECT`` where possible.

    See the module doc.  Fields: ``fd`` (the FileDev's descriptor, not
    owned); ``direct_fd`` (owned, -1 when not direct); ``align`` (offset and
    length granularity of direct writes; buffers must be page-aligned:
    `alloc`); ``direct`` (direct writes are on: cleared, for good, by an
    EINVAL); ``max_write`` (largest single write the caller should hand
    over: a whole chunk when direct, `MAX_WRITE` through the page cache).
    """

    def __init__(self, dev, *, direct: bool = True) -> None:
        self.fd = dev.fd
        self.align = max(4096, getattr(dev, "_sector", 512))
        self.direct_fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(dev.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                pass
        self.direct = self.direct_fd >= 0
        self.max_write = 1 << 62 if self.direct else MAX_WRITE

    @staticmethod
    def alloc(size: int) -> memoryview:
        """A page-aligned buffer of ``size`` bytes: private anonymous memory,
        in transparent huge pages where the kernel gives them
        (``MADV_HUGEPAGE``; THP "madvise" mode here).  A direct write from
        2 MiB pages goes to the disk in a few large segments instead of one
        per 4 KiB page (a request holds at most 254 on this virtio disk): 1
        GiB of 4 MiB direct writes took 0.50-0.54 s against 0.72-1.08 s from
        4 KiB pages (docs/pullfast.md).  Shared anonymous memory (shmem)
        gets no huge pages here."""
        m = mmap.mmap(-1, max(1, size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                m.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass  # no THP here: 4 KiB pages
        return memoryview(m)

    def write(self, mv: memoryview, offset: int) -> int:
        """Write all of ``mv`` at ``offset``; blocking.  ``mv`` is a slice of
        an `alloc` buffer, so its address and ``offset`` are equal modulo
        `align` (or direct writes are not used).  Returns the bytes that went
        through the page cache.

        ::

            offset        a1                        a2          offset+len
              |-- head ---|-------- direct ---------|--- tail ---|
              page cache   whole align blocks        page cache
        """
        n = len(mv)
        if self.direct and n >= self.align:
            a1 = -offset % self.align
            a2 = a1 + (n - a1) // self.align * self.align
            if a2 > a1:
                try:
                    _pwrite_all(self.direct_fd, mv[a1:a2], offset + a1)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self.direct = False  # not on this file system: the page cache from now on
                else:
                    _pwrite_sliced(self.fd, mv[:a1], offset)
                    _pwrite_sliced(self.fd, mv[a2:], offset + a2)
                    return n - (a2 - a1)
        _pwrite_sliced(self.fd, mv, offset)
        return n

    def close(self) -> None:
        fd, self.direct_fd = self.direct_fd, -1
        if fd >= 0:
            os.close(fd)


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def _pwrite_sliced(fd: int, mv: memoryview, offset: int) -> None:
    """`_pwrite_all` in writes of at most `MAX_WRITE` (page cache)."""
    for o in range(0, len(mv), MAX_WRITE):
        _pwrite_all(fd, mv[o : o + MAX_WRITE], offset + o)


class ChunkWriter:
    """Hash-and-write jobs for one target file descriptor (see the module doc)."""

    def __init__(self, out: FileWriter, *, window: int = DEFAULT_WINDOW, threads: int | None = None) -> None:
        self.out = out
        self.fd = out.fd
        self.window = window
        if threads is None:
            threads = DIRECT_THREADS if out.direct else BUFFERED_THREADS
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="pull-write")
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[int, int]] = collections.deque()
        self._pending_bytes = 0
        self._sfr_ok = available() and window > 0

    async def write(self, mv: memoryview, base: int, pieces: list[tuple[int, int]],
                    chunk_id: Callable[[memoryview], bytes] | None) -> bytes | None:
        """Write the ``(offset, length)`` pieces of ``mv`` (which holds the
        target from offset ``base``; an `FileWriter.alloc` buffer, or a slice
        of one at a multiple of the page size, for direct writes); return
        ``chunk_id(mv)`` (None without one).  ``mv`` must not change until
        this returns."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._job, mv, base, pieces, chunk_id)

    def submit(self, mv: memoryview, base: int, pieces: list[tuple[int, int]],
               chunk_id: Callable[[memoryview], bytes] | None) -> Future:
        """`write` from a thread: the job on the pool; its `Future`."""
        return self._pool.submit(self._job, mv, base, pieces, chunk_id)

    def job(self, mv: memoryview, base: int, pieces: list[tuple[int, int]],
            chunk_id: Callable[[memoryview], bytes] | None) -> bytes | None:
        """`write` on the calling thread (blocking)."""
        return self._job(mv, base, pieces, chunk_id)

    def _job(self, mv: memoryview, base: int, pieces: list[tuple[int, int]],
             chunk_id: Callable[[memoryview], bytes] | None) -> bytes | None:
        d = chunk_id(mv) if chunk_id is not None else None
        cached = 0
        for p, n in _merged(pieces):  # adjacent pieces: one direct write
            piece = mv[p - base : p - base + n]
            if p < base or len(piece) != n:
                raise ValueError(f"piece ({p}, {n}) is outside the buffer")
            cached += self.out.write(piece, p)
        if cached and self._sfr_ok:
            lo = pieces[0][0]
            hi = pieces[-1][0] + pieces[-1][1]
            self._behind(lo, hi - lo)
        return d

    def _behind(self, offset: int, length: int) -> None:
        """Start write-back of ``[offset, offset+length)``; wait for and drop
        the oldest written ranges beyond the window."""
        try:
            sync_file_range(self.fd, offset, length, SYNC_FILE_RANGE_WRITE)
        except OSError as e:
            self._sfr_failed(e)
            return
        old = []
        with self._lock:
            self._pending.append((offset, length))
            self._pending_bytes += length
            while self._pending_bytes > self.window and self._pending:
                o, n = self._pending.popleft()
                self._pending_bytes -= n
                old.append((o, n))
        for o, n in old:
            try:
                sync_file_range(self.fd, o, n, SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE
                                | SYNC_FILE_RANGE_WAIT_AFTER)
            except OSError as e:
                self._sfr_failed(e)
                return
            os.posix_fadvise(self.fd, o, n, os.POSIX_FADV_DONTNEED)

    def _sfr_failed(self, e: OSError) -> None:
        if e.errno == errno.EIO:
            raise e
        self._sfr_ok = False  # advisory: the final fdatasync still makes it durable

    def close(self) -> None:
        """Stop the threads (jobs in flight finish first); close `out`."""
        self._pool.shutdown(wait=True)
        self.out.close()


def _merged(pieces: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ``(offset, length)`` pieces with adjacent ones joined."""
    out: list[tuple[int, int]] = []
    for p, n in pieces:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((p, n))
    return out
