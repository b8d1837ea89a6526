"""Restore: write a repository snapshot back to a disk (file, block device, NBD export).

Role: the inverse of ``pull --repo``.  `restore` reads a snapshot's chunks
from a `Repository` (through its public API only: `Repository.get_chunk_into`
or, on a repository-like without it, `get_chunk`, which check every chunk
against its id, and `Repository.zero_id`) and writes
them to a target `BlockDev`: a `FileDev` (regular file or block device) or an
`NBDDev` (any NBD server).  `ChunkCache` is the same read path for readers
that want byte ranges rather than a whole copy (the nbdkit plugin
``plugins/restore.py``).

Zero chunks (id == ``repo.zero_id(length)``) are never fetched: on a target
known to read as zeroes (a fresh sparse file, ``--target-is-zero``) they are
skipped, leaving holes; otherwise they are zeroed with ``may_trim``
(FileDev: ``FALLOC_FL_PUNCH_HOLE`` on a file, ``BLKZEROOUT`` on a block
device; NBDDev: WRITE_ZEROES without NO_HOLE), adjacent ones merged into one
request.  Inside a data chunk, runs of zero blocks (`ZERO_BLOCK` bytes) are
treated the same way (holes on a zero target), so a restored file is as
sparse as the disk was.

Parallelism and memory: the store's reads are blocking (a file read, a
boto3 GET), so chunks are fetched on a private pool of ``workers`` threads
(default per store: `default_workers`); ``workers`` coroutines each take the
next chunk, fetch it, write it, and only then take another.  Each coroutine
owns one page-aligned chunk buffer, reused: the chunk is read, decrypted,
decompressed and checked into it without allocating (`get_chunk_into`), so
at most ``workers`` chunk buffers (plus a read and a scratch buffer per
thread) are in memory at once.  On a `FileDev` target the pool thread also
writes the chunk's data (`agent.filewriter.FileWriter`: ``O_DIRECT`` where the file system
allows it, one fdatasync at the end); on other targets (NBD) the coroutine
writes it.  Zero runs inside a chunk are found with memcmp (`_zero_flags`).

Failure: a chunk that is missing or does not match its id (`CorruptChunk`)
stops the restore with `DamagedChunk`, which names the snapshot, the chunk
and its byte range ``(offset, length)`` in the disk; a store that cannot be
read stops it with an `NBDBackupError` naming the same; the target is then
incomplete (not flushed).  With ``keep_going`` a damaged or missing chunk
does not stop it: every other chunk is restored and flushed, the damaged
chunks' ranges are left as the target had them (a new file: a hole), and
`RestoreStats.damaged` lists each one -- the exact bytes the restore cannot
vouch for (a store that cannot be read still stops it: that is no verdict on
the data, and a retry may pass).  Errors of the target propagate as `OSError`.  On success the target is flushed before
`restore` returns.

Invariants: every byte written was checked by `get_chunk`; each chunk's range
is written (or zeroed, or known zero) exactly once; a `ChunkCache` loads a
chunk at most once at a time however many readers want it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import operator
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from ..blockdev.base import BlockDev
from ..errors import NBDBackupError
from ..ratelimit import Bucket
from .filewriter import MAX_WRITE, FileWriter
from .manifest import Manifest

#: Granularity of zero detection inside a data chunk.
ZERO_BLOCK = 64 << 10
#: Largest single zero request (NBD lengths are 32-bit).
MAX_ZERO = 1 << 30

_ZEROS = bytes(ZERO_BLOCK)


class DamagedChunk(NBDBackupError):
    """A chunk of the snapshot being restored is missing or damaged.

    Fields: ``snapshot``, ``index``, ``offset``, ``length`` (its byte range in
    the disk) and ``reason`` (the repository's words)."""

    def __init__(self, snapshot: str, index: int, offset: int, length: int, reason: str) -> None:
        self.snapshot, self.index, self.offset, self.length, self.reason = snapshot, index, offset, length, reason
        super().__init__(f"snapshot {snapshot!r}: chunk {index} at ({offset}, {length}) is unreadable: {reason} "
                         "(restore stopped: the target is incomplete)")


@dataclass
class RestoreStats:
    """What a restore did (bytes and chunks; ``seconds`` wall time; ``workers``
    chunks in flight; ``direct_io``: data written with ``O_DIRECT``)."""

    size: int = 0
    chunks: int = 0
    data_chunks: int = 0
    zero_chunks: int = 0
    bytes_fetched: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = 0
    seconds: float = 0.0
    workers: int = 0
    direct_io: bool = False
    #: With ``keep_going``: the chunks not restored, ``(offset, length, index, reason)`` by offset.
    damaged: list = field(default_factory=list)

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        out["damaged"] = [{"offset": o, "length": n, "chunk": i, "reason": r} for o, n, i, r in self.damaged]
        return out


def hole_flags(repo, man: Manifest) -> list[bool]:
    """Per chunk of ``man``: whether it is a hole (its id is the zero id of its length).  By C
    code (a `map` over the ids): a Python step per chunk was ~0.5 s per TiB of virtual size, paid
    by every restore and every open of the restore plugin (docs/hunt13.md)."""
    flags = list(map(repo.zero_id(man.chunk_size).__eq__, man.chunks))
    if man.size % man.chunk_size:
        flags[-1] = man.chunks[-1] == repo.zero_id(man.size % man.chunk_size)
    return flags


def data_chunks(flags: list[bool]) -> list[int]:
    """The indexes whose flag is False (the data chunks of `hole_flags`), by C code."""
    return list(itertools.compress(range(len(flags)), map(operator.not_, flags)))


def zero_runs(data: list[int], count: int) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of hole chunks: the gaps between the sorted data chunk
    indexes ``data`` in ``range(count)`` (O(data chunks), not O(chunks))."""
    out: list[tuple[int, int]] = []
    prev = -1
    for i in itertools.chain(data, (count,)):
        if i > prev + 1:
            out.append((prev + 1, i - prev - 1))
        prev = i
    return out


def segments(data, block: int = ZERO_BLOCK, max_data: int = MAX_WRITE) -> list[tuple[int, int, bool]]:
    """Split a chunk into ``(offset, length, is_zero)`` runs, in order.

    Zero runs are whole ``block``-sized blocks of zeroes (merged; the last
    block may be short); data runs are cut at ``max_data`` bytes.  The runs
    cover ``data`` exactly.
    """
    mv = memoryview(data).cast("B")
    n = len(mv)
    zeros = _ZEROS if block == ZERO_BLOCK else bytes(block)
    out: list[tuple[int, int, bool]] = []
    flags = _zero_flags(mv, block, zeros)
    for pos in range(0, n, block):
        ln = min(block, n - pos)
        z = flags[pos // block]
        if out and out[-1][2] == z and (z or out[-1][1] + ln <= max_data):
            out[-1] = (out[-1][0], out[-1][1] + ln, z)
        else:
            out.append((pos, ln, z))
    return out


_memcmp = None


def _zero_flags(mv: memoryview, block: int, zeros: bytes) -> list[bool]:
    """For each ``block``-sized piece of ``mv`` (the last may be short): all zero?

    memcmp through ctypes when ``mv`` is writable (ctypes needs that to take
    its address; the restore's buffers are): about 20x faster than
    comparing memoryviews (which CPython does byte by byte, holding the GIL:
    7 ms for a zero 4 MiB chunk), and it releases the GIL."""
    global _memcmp
    n = len(mv)
    if n and not mv.readonly and mv.contiguous:
        if _memcmp is None:
            import ctypes

            fn = ctypes.CDLL(None).memcmp
            fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t], ctypes.c_int
            _memcmp = (ctypes, fn)
        ctypes, fn = _memcmp
        base = ctypes.addressof(ctypes.c_char.from_buffer(mv))
        return [fn(base + pos, zeros, min(block, n - pos)) == 0 for pos in range(0, n, block)]
    return [mv[pos : pos + block] == zeros[: min(block, n - pos)] for pos in range(0, n, block)]


#: Default ``workers`` per store kind (``restore --workers``): chunks in flight.
#: A directory: enough to keep 2-4 cores and the disk busy; S3: more, to hide
#: each GET's latency (measured on Ceph RGW: 16 beat 8 and 32).
DIR_WORKERS = 4
S3_WORKERS = 16


def default_workers(store) -> int:
    """How many chunks to fetch at once from ``store`` by default."""
    from .s3store import S3Store

    return S3_WORKERS if isinstance(store, S3Store) else DIR_WORKERS


async def restore(repo, man: Manifest, dst: BlockDev, *, snapshot: str = "", workers: int | None = None,
                  target_is_zero: bool = False, progress: Callable[[int, int], None] | None = None,
                  direct: bool = True, keep_going: bool = False, limit: Bucket | None = None) -> RestoreStats:
    """Write snapshot ``man`` of ``repo`` into ``dst`` (see the module doc).

    ``workers``: chunks in flight (default `default_workers` of the store).
    ``target_is_zero``: ``dst`` already reads as zeroes (holes are left).
    ``progress(done_bytes, total_bytes)`` is called as chunks finish.
    ``direct``: write a `FileDev` target with ``O_DIRECT`` where possible
    (`FileWriter`); False: through the page cache.
    ``keep_going``: restore past damaged chunks, listed in ``stats.damaged`` (module doc).
    ``limit``: each data chunk's length is charged to this `ratelimit.Bucket`
    (``--limit-rate``) before it is fetched; zero chunks are free.
    """
    t0 = time.monotonic()
    if workers is None:
        workers = default_workers(repo.store)
    workers = max(1, workers)
    if dst.size < man.size:
        raise NBDBackupError(f"the target is {dst.size} bytes, snapshot {snapshot!r} is {man.size}")
    stats = RestoreStats(size=man.size, chunks=man.count, workers=workers)
    data_idx = data_chunks(hole_flags(repo, man))
    stats.data_chunks, stats.zero_chunks = len(data_idx), man.count - len(data_idx)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, man.size)

    # Zero chunks first: a few cheap requests (or none).
    for first, count in zero_runs(data_idx, man.count):
        off = man.chunk_range(first)[0]
        end = sum(man.chunk_range(first + count - 1))
        if target_is_zero:
            stats.bytes_skipped += end - off
        else:
            for o in range(off, end, MAX_ZERO):
                await dst.zero(o, min(MAX_ZERO, end - o), may_trim=True)
            stats.bytes_zeroed += end - off
        advance(end - off)

    queue = iter(data_idx)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="restore-fetch")
    loop = asyncio.get_running_loop()
    from ..blockdev.file import FileDev

    writer = FileWriter(dst, direct=direct) if isinstance(dst, FileDev) else None
    max_data = writer.max_write if writer is not None else MAX_WRITE
    get_into = getattr(repo, "get_chunk_into", None)

    def fetch(i: int, buf: memoryview) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
        """On a pool thread: chunk ``i`` into ``buf``, checked; with a `FileWriter`
        its data written too.  Returns (data runs not written yet, zero runs),
        as ``(offset in the chunk, length)``; None for a damaged chunk skipped
        (``keep_going``: recorded in ``stats.damaged``)."""
        off, n = man.chunk_range(i)
        mv = buf[:n]
        try:
            if get_into is not None:
                get_into(man.chunks[i], mv)
            else:  # a repository-like without it (tests' fakes)
                mv[:] = repo.get_chunk(man.chunks[i], n)
        except OSError as e:
            from .repo import CorruptChunk

            if not isinstance(e, CorruptChunk):  # the store failed (unreachable, permissions)
                raise NBDBackupError(f"snapshot {snapshot!r}: chunk {i} at ({off}, {n}): cannot read it: "
                                     f"{e.strerror or e}") from e
            reason = e.strerror.split(": ", 1)[-1] if e.strerror else str(e)
            if keep_going:
                stats.damaged.append((off, n, i, reason))  # list.append: atomic across the pool's threads
                return None
            raise DamagedChunk(snapshot, i, off, n, reason) from None
        data: list[tuple[int, int]] = []
        zeros: list[tuple[int, int]] = []
        for s, ln, z in segments(mv, max_data=max_data):
            if z:
                zeros.append((s, ln))
            elif writer is not None:
                writer.write(mv[s : s + ln], off + s)  # errors: OSError, the target's
            else:
                data.append((s, ln))
        return data, zeros

    async def worker() -> None:
        buf = None
        for i in queue:
            if buf is None:  # one buffer per worker, reused (page-aligned for O_DIRECT)
                buf = FileWriter.alloc(man.chunk_size)
            off, n = man.chunk_range(i)
            if limit is not None:
                await limit.take_async(n)
            got = await loop.run_in_executor(pool, fetch, i, buf)
            if got is None:  # damaged, skipped (keep_going)
                advance(n)
                continue
            data, zeros = got
            stats.bytes_fetched += n
            writes = [dst.pwrite(buf[s : s + ln], off + s) for s, ln in data]
            for s, ln in zeros:
                if target_is_zero:
                    stats.bytes_skipped += ln
                else:
                    writes.append(dst.zero(off + s, ln, may_trim=True))
                    stats.bytes_zeroed += ln
            stats.bytes_written += n - sum(ln for _, ln in zeros)
            await asyncio.gather(*writes)
            advance(n)

    tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
    try:
        finished, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        # the threads may still be writing: wait for them before the writer's fd goes
        pool.shutdown(wait=True, cancel_futures=True)
        if writer is not None:
            stats.direct_io = writer.direct and writer.direct_fd >= 0
            writer.close()
    await dst.flush()
    stats.damaged.sort()
    stats.seconds = time.monotonic() - t0
    return stats


class ChunkCache:
    """Thread-safe, per-chunk loading of a snapshot's chunks, for random readers.

    Two readers of one chunk share one load (an in-flight future); loads of
    different chunks run at once on ``workers`` threads; up to ``capacity``
    loaded chunks are kept (least recently used dropped first).  A failed
    load is not kept: the next reader tries again (and fails again on a
    damaged chunk, or succeeds after a passing store error).  A read also
    starts loading the ``readahead`` data chunks after the last one it
    touches (a sequential reader -- nbdcopy, qemu-img -- then finds them
    loaded or loading: nbdkit serves a connection with a bounded number of
    threads, so without it a reader of small requests waits for one chunk at
    a time).

    Fields: ``repo``; ``man``; ``capacity``; ``readahead``; ``_pool`` (the loader threads);
    ``_lock`` (guards the rest); ``_loaded`` (index -> bytes, LRU order);
    ``_loading`` (index -> future of a load in flight); ``loads`` (loads
    started); ``in_flight`` / ``max_in_flight`` (loads running now / at most
    at once, for tests and the plugin's closing log line).
    """

    def __init__(self, repo, man: Manifest, *, capacity: int = 16, workers: int = 8, readahead: int = 2) -> None:
        self.repo, self.man, self.capacity = repo, man, max(1, capacity)
        self.readahead = max(0, min(readahead, self.capacity // 2))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers),
                                                           thread_name_prefix="chunk-load")
        self._lock = threading.Lock()
        self._loaded: OrderedDict[int, bytes] = OrderedDict()
        self._loading: dict[int, concurrent.futures.Future] = {}
        self._zero = hole_flags(repo, man)
        self.loads = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def is_zero(self, i: int) -> bool:
        return self._zero[i]

    def _load(self, i: int) -> bytes:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self.repo.get_chunk(self.man.chunks[i], self.man.chunk_range(i)[1])
        finally:
            with self._lock:
                self.in_flight -= 1

    def _done(self, i: int, fut: concurrent.futures.Future) -> None:
        with self._lock:
            self._loading.pop(i, None)
            if fut.cancelled() or fut.exception() is not None:
                return
            self._loaded[i] = fut.result()
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)

    def future(self, i: int) -> concurrent.futures.Future:
        """A future of chunk ``i``'s bytes: already done if cached, shared if loading."""
        with self._lock:
            data = self._loaded.get(i)
            if data is not None:
                self._loaded.move_to_end(i)
                fut: concurrent.futures.Future = concurrent.futures.Future()
                fut.set_result(data)
                return fut
            fut = self._loading.get(i)
            if fut is not None:
                return fut
            self.loads += 1
            fut = self._loading[i] = self._pool.submit(self._load, i)
        # Outside the lock: a callback added to a finished future runs at once, here.
        fut.add_done_callback(lambda f, i=i: self._done(i, f))
        return fut

    def get(self, i: int) -> bytes:
        return self.future(i).result()

    def prefetch(self, i: int) -> None:
        """Start loading data chunk ``i`` unless it is loaded, loading or out of range."""
        if i >= self.man.count or self._zero[i]:
            return
        with self._lock:
            if i in self._loaded or i in self._loading:
                return
            self.loads += 1
            fut = self._loading[i] = self._pool.submit(self._load, i)
        fut.add_done_callback(lambda f, i=i: self._done(i, f))

    def read_into(self, buf, offset: int) -> None:
        """Fill ``buf`` with the snapshot's bytes at ``offset``; the chunks it
        touches load in parallel (and the next `readahead` start loading).
        A chunk that fails raises its error (`CorruptChunk`: an
        ``OSError(EIO)``) with ``chunk_index`` set to the chunk's index."""
        mv = memoryview(buf).cast("B")
        futs = self.loads_for(offset, len(mv))
        self.fill(mv, offset, {i: f.result for i, f in futs.items()})

    def loads_for(self, offset: int, length: int) -> dict[int, concurrent.futures.Future]:
        """The loads (futures) of the data chunks ``(offset, length)`` touches,
        started where needed; the next `readahead` data chunks start loading."""
        idx = self.man.chunks_of(offset, length)
        futs = {i: self.future(i) for i in idx if not self._zero[i]}
        for j in range(idx.stop, idx.stop + self.readahead) if len(idx) else ():
            self.prefetch(j)
        return futs

    def fill(self, buf, offset: int, futs: dict) -> None:
        """Copy the snapshot's bytes at ``offset`` into ``buf`` from ``futs``
        (`loads_for`'s, index -> a callable returning the chunk's bytes);
        zero chunks are zeroes.  A failed load raises as `read_into` says."""
        mv = memoryview(buf).cast("B")
        end = offset + len(mv)
        for i in self.man.chunks_of(offset, len(mv)):
            c_off, c_len = self.man.chunk_range(i)
            s, e = max(offset, c_off), min(end, c_off + c_len)
            dst = mv[s - offset : e - offset]
            if self._zero[i]:
                _fill_zero(dst)
            else:
                try:
                    data = futs[i]()
                except OSError as err:
                    err.chunk_index = i  # type: ignore[attr-defined]
                    raise
                dst[:] = memoryview(data)[s - c_off : e - c_off]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _fill_zero(mv: memoryview) -> None:
    for p in range(0, len(mv), ZERO_BLOCK):
        n = min(ZERO_BLOCK, len(mv) - p)
        mv[p : p + n] = _ZEROS[:n]
