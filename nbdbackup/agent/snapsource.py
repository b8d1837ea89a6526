"""A repository snapshot as an asynchronous device: a restore's source, or an export.

Role: `SnapshotSource` (instant recovery's source) is `repo.SnapshotImage` whose reads run in worker
threads: a chunk read is a blocking store read (a file, or an S3 GET of tens
of milliseconds), which must not stall the event loop that serves the
restoring export.  Each read fetches its chunks with `Repository.get_chunk`
(verified against their id) straight from the store, bypassing the image's
small shared cache (not thread-safe); the restore state fetches a chunk
once anyway.

Fields: those of `SnapshotImage` plus ``_pool`` (its own thread pool of
``threads`` workers, so fetches do not queue behind unrelated executor work).

`ServedSnapshot` is a snapshot served read-only as an export (``serve
NAME=repo:REPO#SNAPSHOT``: file-level restore through nbdfuse or a loop
mount, a read-only disk for a VM, ``qemu-img convert`` to any format).  Its
readers are random and small (a file system's 4 KiB blocks), so reads go
through a `restore.ChunkCache`: each chunk is fetched, checked and decoded
once while it stays among the most recently used (`SERVED_CACHE` bytes of
them, so a repository of big chunks does not pin more memory), loads of
different chunks run at once on its threads, and a read starts loading the
next ``readahead`` data chunks.  The event loop never blocks: a read awaits
its chunks' loads, then copies.  A damaged or missing chunk fails the reads
that touch it with EIO (`repo.CorruptChunk`); everything else reads on.
Fields: those of `SnapshotImage` plus ``cache`` (the `ChunkCache`, owned) and
``on_close`` (callables run once when it closes: the repository lock).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from ..blockdev.base import BASE_ALLOCATION, Extent
from .repo import SnapshotImage
from .restore import ChunkCache


class SnapshotSource(SnapshotImage):
    def __init__(self, repo, man, *, threads: int = 16) -> None:
        super().__init__(repo, man)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="restore-fetch")

    def _read_chunks(self, buf: memoryview, offset: int) -> None:
        man = self.man
        pos, end = offset, offset + len(buf)
        while pos < end:
            i = pos // man.chunk_size
            c_off, c_len = man.chunk_range(i)
            n = min(end, c_off + c_len) - pos
            data = memoryview(self.repo.get_chunk(man.chunks[i], c_len))  # no slice copies
            buf[pos - offset:pos - offset + n] = data[pos - c_off:pos - c_off + n]
            pos += n

    async def pread(self, buf: memoryview, offset: int) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._read_chunks, buf, offset)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


#: Bytes of decoded chunks a `ServedSnapshot` keeps (64 chunks of the default 1 MiB).
SERVED_CACHE = 64 << 20


class ServedSnapshot(SnapshotImage):
    def __init__(self, repo, man, *, cache_bytes: int = SERVED_CACHE, threads: int = 8, readahead: int = 4,
                 on_close: Sequence[Callable[[], None]] = ()) -> None:
        super().__init__(repo, man)
        capacity = max(2 * readahead + 2, cache_bytes // man.chunk_size)
        self.cache = ChunkCache(repo, man, capacity=capacity, workers=threads, readahead=readahead)
        self.on_close = list(on_close)

    async def pread(self, buf: memoryview, offset: int) -> None:
        futs = self.cache.loads_for(offset, len(buf))
        for f in futs.values():
            if not f.done():
                try:
                    await asyncio.wrap_future(f)
                except Exception:  # noqa: BLE001 - `fill` raises it, naming the chunk
                    pass
        self.cache.fill(buf, offset, {i: f.result for i, f in futs.items()})

    def pread_now(self, buf: memoryview, offset: int) -> bool:
        """The server's task-free READ: only when every chunk of the range is
        loaded already (their loads start here either way)."""
        futs = self.cache.loads_for(offset, len(buf))
        for f in futs.values():
            if not f.done() or f.exception() is not None:
                return False
        self.cache.fill(buf, offset, {i: f.result for i, f in futs.items()})
        return True

    def extents_now(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent] | None:
        return self.extents_sync(offset, length) if context == BASE_ALLOCATION else None

    async def cache(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: start loading the range's first chunks (at most half
        the cache's capacity, so it cannot push out what readers use)."""
        idx = self.man.chunks_of(offset, length)
        for i in range(idx.start, min(idx.stop, idx.start + self.cache.capacity // 2)):
            self.cache.prefetch(i)

    async def close(self) -> None:
        self.cache.close()
        calls, self.on_close = self.on_close, []
        for call in calls:
            call()
