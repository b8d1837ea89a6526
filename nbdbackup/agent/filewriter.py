"""Chunk writer for a local file or block device: hashing and writing off the loop, with write-behind.

Role: the pull agent's target path (`agent.pull`).  Each worked chunk is one
job on a small thread pool: the chunk's digest is taken, its pieces are
written with ``pwritev`` (both release the GIL on large buffers, so the
event loop keeps receiving the next chunks on the other core), and the
kernel is told to start writing the chunk back at once
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``).  Once more than ``window``
bytes were written after it, a chunk's write-back is waited for
(``SYNC_FILE_RANGE_WAIT_BEFORE|WRITE|WAIT_AFTER``) and its clean pages are
dropped (``POSIX_FADV_DONTNEED``).

Why (bench/pull_bench.py, docs/pullcbw.md): without it the 1 MiB writes ran
inline on the loop thread, every page of a 1 GiB pull stayed dirty until the
final ``fdatasync`` (a quarter of the pull's time), and on the reference VM
buffered writes into never-recycled page-cache memory ran at ~1 GB/s of
kernel CPU (``copy_folio_from_iter_atomic``) against ~2 GB/s when a small
window of pages is written back and recycled.  nbdcopy does the same
(write-behind + DONTNEED per 256 KiB request).

Invariants: write-behind is advisory -- `flush` (``fdatasync``, done by the
caller) is still what makes the target durable; a ``sync_file_range``
failure other than EIO switches write-behind off (e.g. a file system that
refuses it), EIO is raised like a write error.  Jobs touch disjoint byte
ranges (one chunk each), so they may run in any order.

Fields: ``fd`` (not owned: the `FileDev`'s); ``window`` (bytes of written
chunks whose write-back is not yet waited for); ``_pool`` (its threads,
shut down by `close`); ``_lock`` guards ``_pending`` (FIFO of
``(offset, length)`` of chunks written, not yet waited for) and
``_pending_bytes``; ``_sfr_ok`` (write-behind still on).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor
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


class ChunkWriter:
    """Hash-and-write jobs for one target file descriptor (see the module doc)."""

    def __init__(self, fd: int, *, window: int = DEFAULT_WINDOW, threads: int = 2) -> None:
        self.fd = fd
        self.window = window
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="pull-write")
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[int, int]] = collections.deque()
        self._pending_bytes = 0
        self._sfr_ok = available() and window > 0

    async def write(self, mv: memoryview, base: int, pieces: list[tuple[int, int]],
                    chunk_id: Callable[[memoryview], bytes] | None) -> bytes | None:
        """Write the ``(offset, length)`` pieces of ``mv`` (which holds the
        target from offset ``base``); return ``chunk_id(mv)`` (None without
        one).  ``mv`` must not change until this returns."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._job, mv, base, pieces, chunk_id)

    def _job(self, mv: memoryview, base: int, pieces: list[tuple[int, int]],
             chunk_id: Callable[[memoryview], bytes] | None) -> bytes | None:
        d = chunk_id(mv) if chunk_id is not None else None
        fd = self.fd
        for p, n in pieces:
            piece = mv[p - base : p - base + n]
            if len(piece) != n:
                raise ValueError(f"piece ({p}, {n}) is outside the buffer")
            done = 0
            while done < n:
                done += os.pwritev(fd, [piece[done:]], p + done)
        if pieces and self._sfr_ok:
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
        """Stop the threads (jobs in flight finish first)."""
        self._pool.shutdown(wait=True)
