"""A repository snapshot as an asynchronous source (instant recovery).

Role: `SnapshotSource` is `repo.SnapshotImage` whose reads run in worker
threads: a chunk read is a blocking store read (a file, or an S3 GET of tens
of milliseconds), which must not stall the event loop that serves the
restoring export.  Each read fetches its chunks with `Repository.get_chunk`
(verified against their id) straight from the store, bypassing the image's
small shared cache (not thread-safe); the restore state fetches a chunk
once anyway.

Fields: those of `SnapshotImage` plus ``_pool`` (its own thread pool of
``threads`` workers, so fetches do not queue behind unrelated executor work).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from .repo import SnapshotImage


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
