"""Pull agent: copy an NBD export (a snapshot export) into a local image, reading only what matters.

Role: the remote side of a pull-mode backup.  Given a source `BlockDev`
(normally an `NBDDev` on the snapshot export, several connections) and a
target (`FileDev`: a raw file or a block device):

- full (``bitmap=None``): the source's ``base:allocation`` says where data
  is; only data is read; holes stay holes in a fresh target file (on a block
  device or a reused file they are zeroed with ``may_trim``);
- incremental (``bitmap="NAME"``): only ranges that
  ``qemu:dirty-bitmap:NAME`` marks dirty are read, and patched into the
  target, which must already hold the previous backup of the same size
  (incremental forever onto one image); dirty holes are punched/zeroed.

Work is done chunk by chunk (`Manifest` chunks, 4 MiB by default): a chunk
that needs nothing is skipped; otherwise its pieces are read concurrently
into one chunk buffer (in incremental mode pre-filled from the target, unless
the dirty ranges cover the whole chunk), its
blake3 digest is taken from that buffer -- what the source held, not what
was written -- and the read pieces are written to the target.  ``workers``
chunks are in flight at once, spread over the source's connections.  Into a
`FileDev` target, hashing and writing are one job per chunk on the
`agent.filewriter.ChunkWriter` threads (the event loop only receives), the
data written with ``O_DIRECT`` where the file system allows it (the chunk
buffers are page-aligned for it) and the rest with write-behind, so the final
flush finds little left to write (docs/pullfast.md).

Receiving: from an `NBDDev` the data reads are received by a blocking thread
per connection (`agent.pullthreads`, docs/pullthreads.md: ``recv_into`` the
chunk buffers, several chunks in flight per connection, replies matched by
cookie; over TLS each thread reads over a connection of its own); each
finished chunk's job then goes to the same writer threads or sink.
``trim_after_read`` and other sources keep the event loop
(``PullStats.receive`` / ``receive_note`` say which ran).

The manifest of the result: digests of worked chunks come from the source;
other chunks are zero digests (full) or come from ``base`` (the previous
pull's manifest, incremental) or, without it, from reading the target.

``trim_after_read``: each worked chunk is TRIMmed on the source once it is
safe in the target (or the sink): a backup's snapshot export started with
``snapshot-trim`` then drops its copy-before-write copies of it and stops
copying there (docs/scratch.md); later reads of those ranges fail.

Invariants: the target is flushed (fdatasync) before `pull` returns; a
failure leaves the target partly updated and raises (the manifest is only
produced on success, so a failed pull is never mistaken for a good one).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
from dataclasses import dataclass

from ..blockdev.base import BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, HOLE_ZERO, BlockDev, Extent
from ..errors import ConfigError
from ..ratelimit import Bucket
from .manifest import DEFAULT_CHUNK, Manifest, digest, zero_digest

log = logging.getLogger(__name__)

#: Largest single read or write (the NBD client splits further at the
#: server's maximum block size).  Not larger: on this kernel (6.x, ext4) a
#: 4 MiB buffered pwrite into a new file sometimes ran 5-10x slower, all of
#: it in copy_folio_from_iter_atomic (bench/pull_bench.py: alternate runs
#: 0.35 vs 1.2 GB/s); 1 MiB pieces never did.
MAX_READ = 1 << 20
#: Chunks a pull keeps in flight unless told, on a short link ...
SHORT_LINK_WORKERS = 8
#: ... and bytes of chunks on a long one (`default_window`): over a 50 ms round trip
#: (bench/hostile_link.py, 512 MiB, interleaved pairs) 8 chunks of 1 MiB -- a repository's
#: default -- moved 71 MB/s and 32 chunks 297 MB/s (4 MiB chunks: 8 225 MB/s, 16 380 MB/s).
#: On a local link the wall is the same but more in flight costs CPU: the agent's ext4
#: incremental 0.461 vs 0.424 s (3 runs), hence the link's round trip decides.
IN_FLIGHT = 32 << 20
#: A round trip at least this long is a long link: 8 chunks of 1 MiB in flight still carry
#: ~2.8 GB/s at 3 ms.  Measured once before the pull with the smallest request there is: the
#: allocation status of the first 4 KiB (no data read: the source's read counts stay exact).
LONG_RTT = 0.003


async def default_window(src: BlockDev, chunk_size: int) -> int:
    """Chunks in flight by default: `SHORT_LINK_WORKERS`, or `IN_FLIGHT` bytes of them
    (at least as many) when ``src`` is a remote export a long round trip away."""
    if getattr(src, "clients", None) and src.size > 0 and BASE_ALLOCATION in src.meta_contexts():
        t = time.monotonic()
        try:
            await src.extents(0, min(4096, src.size), BASE_ALLOCATION)
        except OSError:  # an error reply (the connection stays usable): no measure, the default
            return SHORT_LINK_WORKERS
        if time.monotonic() - t >= LONG_RTT:
            return max(SHORT_LINK_WORKERS, IN_FLIGHT // chunk_size)
    return SHORT_LINK_WORKERS
#: With the threaded receive (`agent.pullthreads`) into a `FileDev`: hash
#: and write each chunk on the thread that received it (True) or on the
#: `ChunkWriter` pool (False); ``NBDBACKUP_PULL_INLINE=0/1`` overrides
#: (A/B, docs/pullthreads.md).
INLINE = os.environ.get("NBDBACKUP_PULL_INLINE", "0") == "1"


@dataclass
class PullStats:
    """What a pull did: bytes read from the source, written to and zeroed in
    the target, chunks worked / skipped, seconds; ``direct_io``: the target's
    aligned data went with ``O_DIRECT`` (`agent.filewriter.FileWriter`: on,
    and never refused); ``receive``: which path received the data reads,
    ``"threads"`` (`agent.pullthreads`: a blocking thread per connection)
    or ``"asyncio"`` (the event loop), and ``receive_note`` why not threads."""

    size: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_trimmed: int = 0
    chunks_worked: int = 0
    chunks_skipped: int = 0
    seconds: float = 0.0
    direct_io: bool = False
    receive: str = "asyncio"
    receive_note: str = ""
    #: Chunks in flight: given, or `default_window`'s choice.
    workers: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Intersection of two sorted lists of disjoint ``(offset, length)`` ranges."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        if e > s:
            out.append((s, e - s))
        if a[i][0] + a[i][1] < b[j][0] + b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _ranges(extents: list[Extent], want) -> list[tuple[int, int]]:
    """``(offset, length)`` of the extents whose flags satisfy ``want``, merged."""
    out: list[tuple[int, int]] = []
    for e in extents:
        if e.length and want(e.flags):
            if out and out[-1][0] + out[-1][1] == e.offset:
                out[-1] = (out[-1][0], out[-1][1] + e.length)
            else:
                out.append((e.offset, e.length))
    return out


def _gaps(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of ``[start, end)`` that sorted, disjoint ``ranges`` leave uncovered."""
    out, pos = [], start
    for o, n in ranges:
        if o > pos:
            out.append((pos, o - pos))
        pos = max(pos, o + n)
    if pos < end:
        out.append((pos, end - pos))
    return out


def _split(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of ``ranges`` inside ``[start, end)``."""
    return _intersect(ranges, [(start, end - start)])


def _pieces(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of ``ranges`` inside ``[start, end)``, cut into requests of at most `MAX_READ`."""
    return [(p, min(MAX_READ, o + n - p)) for o, n in _split(ranges, start, end) for p in range(o, o + n, MAX_READ)]


async def _read_into(dev: BlockDev, mv: memoryview, base: int, pieces: list[tuple[int, int]]) -> None:
    """Read every piece of ``dev`` into ``mv`` (which holds ``dev`` from offset ``base``)."""
    await asyncio.gather(*(dev.pread(mv[p - base : p - base + n], p) for p, n in pieces))


def _blank(mv: memoryview, base: int, ranges: list[tuple[int, int]], zeros: bytes) -> None:
    for o, n in ranges:
        mv[o - base : o - base + n] = zeros[:n]


async def _hash(mv: memoryview, chunk_id=digest) -> bytes:
    """``chunk_id`` (blake3) of a chunk; large ones on a worker thread (the loop keeps serving)."""
    return await asyncio.to_thread(chunk_id, mv) if len(mv) >= 1 << 20 else chunk_id(mv)


async def pull(src: BlockDev, dst: BlockDev | None, *, bitmap: str | None = None, fresh: bool = False,
               chunk_size: int = DEFAULT_CHUNK, workers: int | None = None, base: Manifest | None = None,
               sink=None, progress=None, chunk_id=digest, zero_id=zero_digest,
               dirty: list[tuple[int, int]] | None = None,
               read_whole: bool = False,
               trim_after_read: bool = False,
               write_behind: int | None = None, direct: bool = True,
               sink_ids: bool = False, threads: bool | None = None,
               inline: bool | None = None, limit: Bucket | None = None) -> tuple[Manifest, PullStats]:
    """Copy ``src`` into ``dst`` (see the module doc); return the manifest and stats.

    ``dirty``: incremental with the dirty ranges given (sorted, disjoint
    ``(offset, length)``) instead of read from ``src``'s bitmap context (the
    backup agent reads them from a frozen bitmap of the live export).
    ``read_whole`` (incremental into a ``sink``): each chunk the dirty ranges
    touch is read whole from ``src`` (a snapshot export holds all of it),
    in requests of up to `MAX_READ`, instead of reading only its dirty
    ranges and patching them into ``dst``'s copy; ``dst`` is not read and may
    be None.

    ``fresh``: ``dst`` is a new, all-hole file (holes need no zeroing).
    ``sink(i, digest, chunk)`` (a coroutine function): instead of writing to
    ``dst``, hand each worked chunk's full content to it (a chunk
    repository); ``dst`` is then only read, as the previous backup of an
    incremental pull, and may be None for a full one.
    ``sink_ids``: the sink names each chunk itself: it is called as
    ``sink(i, None, chunk)`` and returns the chunk's id (the backup agent
    hashes a chunk in the same thread job that compresses, encrypts and
    stores it: one hand-off to a thread per chunk instead of two);
    ``chunk_id`` is then not called for worked chunks.  Such a sink may also have
    ``submit(i, chunk)``, callable from any thread, returning a
    `concurrent.futures.Future` of the id or None: the threaded receive then hands
    it each chunk straight from the receiving thread (no trip through the event
    loop and back: two thread wake-ups per chunk instead of four).
    ``progress(done_bytes, total_bytes)`` is called as chunks finish.
    ``chunk_id(data)`` / ``zero_id(length)``: how the manifest names a
    chunk (default plain blake3; a repository's `Repository.chunk_id` /
    `zero_id`, keyed when it is encrypted).
    ``trim_after_read``: TRIM each worked chunk on ``src`` afterwards (the
    target's copy is written, not yet flushed: the snapshot's copy is not
    needed to redo it, since a failed pull is redone from a new snapshot).
    ``write_behind``: with a `FileDev` target, chunks are hashed and written
    on `ChunkWriter` threads, and at most this many written bytes are left
    to write back at a time (0: no write-behind; all dirty until the flush; None:
    `agent.filewriter.DEFAULT_WINDOW`).  ``direct``: with a `FileDev`
    target, write with ``O_DIRECT`` where possible (`FileWriter`; the
    write-behind window then only covers what goes through the page cache).
    ``threads``: receive the data reads on a blocking thread per NBD
    connection (`agent.pullthreads`; None: where it applies, see
    `pullthreads.unsuitable`; False: on the event loop); ``stats.receive``
    says which ran.  ``inline``: with threads and a `FileDev` target, hash
    and write each chunk on its receiving thread instead of the writer
    pool (None: `INLINE`).  ``limit``: the source's data reads are charged
    to this `ratelimit.Bucket` (``--limit-rate``) before each chunk's reads
    are sent, and its debt slept off first (holes and zeros are free).
    """
    if workers is None:
        workers = await default_window(src, chunk_size)
    t0 = time.monotonic()
    size = src.size
    if dirty is not None and bitmap is not None:
        raise ConfigError("give a bitmap name or dirty ranges, not both")
    incremental = bitmap is not None or dirty is not None
    if sink_ids and sink is None:
        raise ConfigError("sink_ids is for a pull into a sink")
    if read_whole and (sink is None or not incremental):
        raise ConfigError("read_whole is for an incremental pull into a sink")
    if dst is None and (sink is None or (incremental and not read_whole)):
        raise ConfigError("a pull without a target needs a sink and no bitmap")
    if dst is not None and not read_whole and (dst.size < size or (incremental and dst.size != size)):
        raise ConfigError(f"target is {dst.size} bytes, the source {size}"
                          + (" (an incremental pull needs the previous backup, same size)" if incremental else ""))
    man = Manifest(size, chunk_size)
    if base is not None and (base.size, base.chunk_size) != (size, chunk_size):
        raise ConfigError(f"base manifest is for {base.size} bytes in {base.chunk_size}-byte chunks, "
                          f"this pull is {size} in {chunk_size}")
    if trim_after_read:
        caps = src.capabilities()
        if caps.read_only or not caps.can_trim:
            raise ConfigError("the source does not accept TRIM (a snapshot export takes it when the "
                              "backup was started with snapshot-trim)")
    alloc = await src.extents(0, size, BASE_ALLOCATION) if size else []
    data = _ranges(alloc, lambda f: (f & HOLE_ZERO) != HOLE_ZERO)
    zero = _ranges(alloc, lambda f: (f & HOLE_ZERO) == HOLE_ZERO)
    if not incremental:
        wanted_data, wanted_zero = data, ([] if fresh or sink is not None else zero)
        work = sorted({i for o, n in data for i in man.chunks_of(o, n)}
                      | {i for o, n in wanted_zero for i in man.chunks_of(o, n)})
    else:
        if dirty is None:
            assert bitmap is not None
            ctx = DIRTY_BITMAP_PREFIX + bitmap
            if ctx not in src.meta_contexts():
                raise ConfigError(f"the source offers no {ctx!r} "
                                  f"(offered: {', '.join(src.meta_contexts()) or 'none'})")
            dirty = _ranges(await src.extents(0, size, ctx), lambda f: f & 1)
        work = sorted({i for o, n in dirty for i in man.chunks_of(o, n)})
        if read_whole:  # every touched chunk whole: as a full pull reads it
            wanted_data, wanted_zero = data, []
        else:
            wanted_data, wanted_zero = _intersect(dirty, data), _intersect(dirty, zero)
    stats = PullStats(size=size, workers=workers)
    work_set = set(work)
    queue = iter(work)
    done_bytes = 0

    zero_chunk = bytes(chunk_size)

    async def do_chunk(i: int, whole: memoryview) -> None:
        nonlocal done_bytes
        c_off, c_len = man.chunk_range(i)
        c_end = c_off + c_len
        mv = whole[:c_len]
        pieces = _pieces(wanted_data, c_off, c_end)
        zeros = _split(wanted_zero, c_off, c_end)
        # The previous backup, patched below; not read when the dirty ranges cover the whole
        # chunk (from a repository that saves a chunk fetch, decrypt and check).
        patch = incremental and not read_whole
        if patch and _gaps(sorted(pieces + zeros), c_off, c_end):
            await dst.pread(mv, c_off)
        if limit is not None:
            await limit.take_async(sum(n for _, n in pieces))
        await _read_into(src, mv, c_off, pieces)
        # The chunk buffer is reused: every byte not read must be set.
        _blank(mv, c_off, zeros if patch else _gaps(pieces, c_off, c_end), zero_chunk)
        if sink is not None and sink_ids:
            man.chunks[i] = await sink(i, None, mv)
        elif sink is not None:
            man.chunks[i] = d = await _hash(mv, chunk_id)
            await sink(i, d, mv)
        elif writer is not None:
            # One job on the writer's threads: hash, pwritev, start write-back.
            if zeros:
                await asyncio.gather(*(dst.zero(o, n, may_trim=True) for o, n in zeros))
            man.chunks[i] = await writer.write(mv, c_off, pieces, chunk_id)
        else:
            assert dst is not None
            # Hash and write at once: both only read the chunk buffer.
            hashed = asyncio.ensure_future(_hash(mv, chunk_id))
            try:
                await asyncio.gather(*(dst.pwrite(mv[p - c_off : p - c_off + n], p) for p, n in pieces),
                                     *(dst.zero(o, n, may_trim=True) for o, n in zeros))
            finally:
                man.chunks[i] = await hashed
        if trim_after_read:
            await src.trim(c_off, c_len)
            stats.bytes_trimmed += c_len
        stats.bytes_read += sum(n for _, n in pieces)
        if sink is None:
            stats.bytes_written += sum(n for _, n in pieces)
            stats.bytes_zeroed += sum(n for _, n in zeros)
        done_bytes += c_len
        if progress is not None:
            progress(done_bytes, len(work) * chunk_size)

    async def worker() -> None:
        # One buffer per worker, reused; page-aligned for O_DIRECT writes.
        whole = FileWriter.alloc(chunk_size) if writer is not None else memoryview(bytearray(chunk_size))
        for i in queue:
            await do_chunk(i, whole)

    # A local file or block device: hashing and writing on threads, O_DIRECT or write-behind.
    writer = None
    if sink is None:  # (not imported for a repository's pull)
        from ..blockdev.file import FileDev
        from .filewriter import DEFAULT_WINDOW, ChunkWriter, FileWriter

        if isinstance(dst, FileDev) and not dst.read_only:
            writer = ChunkWriter(FileWriter(dst, direct=direct),
                                 window=DEFAULT_WINDOW if write_behind is None else write_behind)
    from . import pullthreads

    if threads is False:
        why = "off"
    elif trim_after_read:
        why = "trim_after_read (TRIMs go through the asyncio client)"
    else:
        why = pullthreads.unsuitable(src, MAX_READ)
    if why is not None and threads:
        raise ConfigError(f"threaded receive not possible: {why}")
    stats.receive_note = why or ""
    fallback = False  # the threads could not start (`pullthreads.Unavailable`): the event loop reads
    if why is None:
        stats.receive = "threads"
        loop = asyncio.get_running_loop()
        lock = threading.Lock()
        patch = incremental and not read_whole
        in_line = INLINE if inline is None else inline
        total = len(work) * chunk_size

        def blocking(coro):
            return asyncio.run_coroutine_threadsafe(coro, loop).result()

        direct = getattr(sink, "submit", None) if sink is not None and sink_ids else None

        def t_start(i: int, whole: memoryview):
            c_off, c_len = man.chunk_range(i)
            mv = whole[:c_len]
            pieces = _pieces(wanted_data, c_off, c_off + c_len)
            zeros = _split(wanted_zero, c_off, c_off + c_len)
            if patch and _gaps(sorted(pieces + zeros), c_off, c_off + c_len):
                blocking(dst.pread(mv, c_off))
            if limit is not None:
                limit.take(sum(n for _, n in pieces))
            return c_off, mv, pieces, (pieces, zeros)

        def t_finish(i: int, c_off: int, mv: memoryview, state):
            pieces, zeros = state
            _blank(mv, c_off, zeros if patch else _gaps(pieces, c_off, c_off + len(mv)), zero_chunk)
            if sink is not None and sink_ids:
                fut = direct(i, mv) if direct is not None else None
                return fut if fut is not None else asyncio.run_coroutine_threadsafe(sink(i, None, mv), loop)
            if sink is not None:
                d = chunk_id(mv)
                return asyncio.run_coroutine_threadsafe(_then(sink(i, d, mv), d), loop)
            if writer is not None:
                if zeros:
                    blocking(_all(dst.zero(o, n, may_trim=True) for o, n in zeros))
                if in_line:
                    return writer.job(mv, c_off, pieces, chunk_id)
                return writer.submit(mv, c_off, pieces, chunk_id)
            return asyncio.run_coroutine_threadsafe(_write_hash(dst, mv, c_off, pieces, zeros, chunk_id), loop)

        def t_complete(i: int, value, state) -> None:
            nonlocal done_bytes
            pieces, zeros = state
            man.chunks[i] = value
            with lock:
                stats.bytes_read += sum(n for _, n in pieces)
                if sink is None:
                    stats.bytes_written += sum(n for _, n in pieces)
                    stats.bytes_zeroed += sum(n for _, n in zeros)
                done_bytes += man.chunk_range(i)[1]
                done = done_bytes
            if progress is not None:
                loop.call_soon_threadsafe(progress, done, total)

        nbuf = int(os.environ.get("NBDBACKUP_PULL_NBUF", 0)) or max(2, -(-workers // len(src.clients)))
        alloc = (lambda: FileWriter.alloc(chunk_size)) if writer is not None else \
            (lambda: memoryview(bytearray(chunk_size)))
        try:
            await pullthreads.run(src.clients, queue, alloc=alloc, nbuf=nbuf, start=t_start,
                                  finish=t_finish, complete=t_complete,
                                  timeout=src.clients[0].request_timeout, max_read=MAX_READ)
            if any(c.uri.tls for c in src.clients):
                # The threads read over TLS connections of their own; the idle asyncio ones may
                # have been closed meanwhile (a server's --idle-timeout): the caller (the agent's
                # verification) reads on after the pull.
                try:
                    await src.reopen_lost()
                except Exception as e:  # noqa: BLE001 - the pull is done; later use fails loudly
                    log.warning("could not reopen NBD connections lost during the pull: %s", e)
        except pullthreads.Unavailable as e:
            if threads:
                raise ConfigError(f"threaded receive not possible: {e}") from None
            fallback = True
            stats.receive, stats.receive_note = "asyncio", str(e)
            log.info("pull: receiving on the event loop: %s", e)
        finally:
            if writer is not None and not fallback:
                stats.direct_io = writer.out.direct
                await asyncio.to_thread(writer.close)
    if why is not None or fallback:  # the event loop receives
        if writer is None:
            await asyncio.gather(*(worker() for _ in range(max(1, workers))))
        else:
            tasks = [asyncio.ensure_future(worker()) for _ in range(max(1, workers))]
            try:
                await asyncio.gather(*tasks)
            finally:
                # On failure the other workers stop before the writer's threads do.
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                stats.direct_io = writer.out.direct
                await asyncio.to_thread(writer.close)
    stats.chunks_worked = len(work)
    stats.chunks_skipped = man.count - len(work)
    # Digests of the chunks not read from the source: the zero id (full) or the base's (incremental),
    # laid down by C code and the worked chunks' copied over -- O(work), not a Python step per chunk of
    # the disk (a sparse 1 TiB disk: 10^6 steps, ~0.5 s, per pull; docs/hunt13.md).
    if not incremental or base is not None:
        if not incremental:
            fill = [zero_id(chunk_size)] * man.count
            if size % chunk_size:
                fill[-1] = zero_id(size % chunk_size)
        else:
            fill = list(base.chunks)
        for i in work:
            fill[i] = man.chunks[i]
        man.chunks = fill
    else:  # incremental onto an image without a base manifest: the target's chunks, hashed
        assert dst is not None
        for i in range(man.count):
            if i not in work_set:
                off, n = man.chunk_range(i)
                buf = bytearray(n)
                await dst.pread(memoryview(buf), off)
                man.chunks[i] = chunk_id(buf)
    if sink is None:
        assert dst is not None
        await dst.flush()
    stats.seconds = time.monotonic() - t0
    return man, stats


async def _then(coro, value):
    """Await ``coro``, return ``value``."""
    await coro
    return value


async def _all(coros) -> None:
    await asyncio.gather(*coros)


async def _write_hash(dst: BlockDev, mv: memoryview, c_off: int, pieces, zeros, chunk_id) -> bytes:
    """A chunk into a target that is not a `FileDev` (hash and writes at once)."""
    hashed = asyncio.ensure_future(_hash(mv, chunk_id))
    try:
        await asyncio.gather(*(dst.pwrite(mv[p - c_off : p - c_off + n], p) for p, n in pieces),
                             *(dst.zero(o, n, may_trim=True) for o, n in zeros))
    finally:
        d = await hashed
    return d


async def manifest_of(dev: BlockDev, chunk_size: int = DEFAULT_CHUNK, workers: int = 8) -> Manifest:
    """The manifest of ``dev``'s current content (holes hashed without reading)."""
    size = dev.size
    man = Manifest(size, chunk_size)
    try:
        alloc = await dev.extents(0, size, BASE_ALLOCATION) if size else []
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        alloc = [Extent(0, size, 0)]
    data = _ranges(alloc, lambda f: (f & HOLE_ZERO) != HOLE_ZERO)
    queue = iter(range(man.count))

    zero_chunk = bytes(chunk_size)

    async def worker() -> None:
        whole = memoryview(bytearray(chunk_size))  # one buffer per worker, reused
        for i in queue:
            off, n = man.chunk_range(i)
            pieces = _pieces(data, off, off + n)
            if not pieces:
                man.chunks[i] = zero_digest(n)
                continue
            mv = whole[:n]
            await _read_into(dev, mv, off, pieces)
            _blank(mv, off, _gaps(pieces, off, off + n), zero_chunk)
            man.chunks[i] = await _hash(mv)

    await asyncio.gather(*(worker() for _ in range(max(1, workers))))
    return man
