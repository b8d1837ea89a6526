"""Unit: the pure parts of restore, verify and progress (no I/O).

- `progress.format_*` and `Progress` with a fake clock: units, percentage,
  rate over the window, ETA, at most one redraw per interval, nothing drawn
  without a stream or in the first interval, `wanted` (TTY, --json, forced).
- `agent.verify.sample_ids`: the size rule (ceil, at least one), determinism
  per seed, different seeds giving different samples, all ids at 100%.
- `agent.restore.segments` / `zero_runs`: zero detection and cutting.
- `agent.restore.ChunkCache` over an in-memory fake repository: one load per
  chunk however many readers, loads of different chunks at once, the LRU
  bound, failures not cached, readahead of the next data chunks.
- `agent.restore.restore` onto a recording MemoryDev: data written, zero
  chunks and zero blocks zeroed (or left on a zero target), the target's
  tail untouched, flushed; at most ``workers`` fetches at once; a damaged
  chunk named with its range, an unreadable store too.
"""

from __future__ import annotations

import argparse
import errno
import io
import threading
import time

import pytest

from nbdbackup import progress
from nbdbackup.agent.manifest import Manifest, digest, zero_digest
from nbdbackup.agent.restore import ChunkCache, data_chunks, segments, zero_runs
from nbdbackup.agent.verify import sample_ids

K, M = 1 << 10, 1 << 20


# -- progress --------------------------------------------------------------------


def test_format_bytes_and_duration():
    assert progress.format_bytes(0) == "0 B"
    assert progress.format_bytes(1023) == "1023 B"
    assert progress.format_bytes(1536) == "1.50 KiB"
    assert progress.format_bytes(64 * M) == "64.0 MiB"
    assert progress.format_bytes(256 * M) == "256 MiB"
    assert progress.format_bytes(3 << 40) == "3.00 TiB"
    assert progress.format_duration(42.4) == "42s"
    assert progress.format_duration(185) == "3m05s"
    assert progress.format_duration(2 * 3600 + 7 * 60 + 30) == "2h07m"


def test_format_line():
    line = progress.format_line("restore", 64 * M, 256 * M, 64 * M, 1.0)
    assert line == "restore  64.0 MiB / 256 MiB   25%  64.0 MiB/s  ETA 3s"
    assert progress.format_line("x", 256 * M, 256 * M, 128 * M, 2.0).endswith("100%  128 MiB/s  in 2s")
    assert progress.format_line("x", 5, None, None, 1.0) == "x  5 B"  # unknown total: no % or ETA
    assert progress.format_line("prune", 2, 4, 1.0, 2.0, unit="snapshots") == \
        "prune  2 / 4 snapshots   50%  1.0 snapshots/s  ETA 2s"
    assert progress.format_line("x", 0, 0, None, 0.0) == "x  0 B / 0 B  100%  in 0s"


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_redraws_at_most_every_interval():
    clock, out = Clock(), io.StringIO()
    p = progress.Progress("restore", 100 * M, stream=out, clock=clock)
    p.update(10 * M)
    assert out.getvalue() == ""  # nothing in the first interval
    for k in range(1, 41):  # 40 updates over 1 s
        clock.t += 0.025
        p.update(10 * M + k * M)
    draws = out.getvalue().count("\r")
    assert 3 <= draws <= 4, out.getvalue()
    p.close()
    text = out.getvalue()
    assert text.endswith("\n") and "50.0 MiB / 100 MiB" in text.rsplit("\r", 1)[1]
    assert "\x1b[K" in text


def test_progress_rate_and_eta_from_recent_window():
    clock, out = Clock(), io.StringIO()
    p = progress.Progress("pull", 1000, stream=out, clock=clock, unit="chunks")
    for _ in range(20):  # 10 units/s for 20 s
        clock.t += 1
        p.update(p._done + 10)
    assert p.rate() == pytest.approx(10.0)
    for _ in range(10):  # then 50 units/s: the 5 s window follows
        clock.t += 1
        p.update(p._done + 50)
    assert p.rate() == pytest.approx(50.0, rel=0.05)
    last = out.getvalue().rsplit("\r", 1)[1]
    assert "700 / 1000 chunks" in last and "ETA 6s" in last, last


def test_progress_silent_without_stream():
    p = progress.Progress("x", 10, stream=None)
    p.update(5)
    p.add(5)
    p.close()  # nothing to write to, nothing raised


def test_wanted():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    ns = argparse.Namespace
    assert progress.wanted(ns(progress=None, json=False), Tty())
    assert not progress.wanted(ns(progress=None, json=True), Tty())
    assert not progress.wanted(ns(progress=None, json=False), io.StringIO())
    assert progress.wanted(ns(progress=True, json=True), io.StringIO())
    assert not progress.wanted(ns(progress=False, json=False), Tty())


# -- sampling --------------------------------------------------------------------


def test_sample_ids():
    ids = [digest(bytes([i, j])) for i in range(10) for j in range(10)]  # 100 ids
    assert sample_ids(ids, None, None) == sorted(ids)
    assert sample_ids(ids, 100, 7) == sorted(ids)
    a = sample_ids(ids, 10, 1)
    assert len(a) == 10 and set(a) <= set(ids) and a == sorted(a)
    assert sample_ids(list(reversed(ids)), 10, 1) == a  # input order does not matter
    assert sample_ids(ids, 10, 2) != a
    assert len(sample_ids(ids, 0.1, 3)) == 1  # at least one
    assert len(sample_ids(ids, 10.5, 3)) == 11  # ceil
    assert sample_ids([], 10, 3) == []
    with pytest.raises(ValueError):
        sample_ids(ids, 0, 1)
    # Over many seeds every id gets picked: the sample is not stuck on a subset.
    seen = set()
    for seed in range(200):
        seen.update(sample_ids(ids, 5, seed))
    assert seen == set(ids)


# -- restore: zero detection -----------------------------------------------------


def test_segments_and_zero_runs():
    block = 64 * K
    data = bytearray(4 * M)
    data[0] = 1                     # block 0 data
    data[3 * block + 5] = 2         # block 3 data
    data[-1] = 3                    # last block data
    s = segments(data)
    assert s == [(0, block, False), (block, 2 * block, True), (3 * block, block, False),
                 (4 * block, 4 * M - 5 * block, True), (4 * M - block, block, False)]
    assert sum(n for _, n, _ in s) == len(data)
    full = bytes([7]) * (3 * M + 100)  # data runs cut at 1 MiB; a short last block
    s = segments(full)
    assert [n for _, n, z in s] == [M, M, M, 100] and not any(z for *_, z in s)
    assert segments(bytes(4 * M)) == [(0, 4 * M, True)]
    assert segments(b"") == []
    def runs(flags):  # zero_runs takes the data chunks' indexes (O(data), docs/hunt13.md)
        return zero_runs(data_chunks(flags), len(flags))

    assert data_chunks([True, True, False, True, False, False, True]) == [2, 4, 5]
    assert runs([True, True, False, True, False, False, True]) == [(0, 2), (3, 1), (6, 1)]
    assert runs([]) == [] and runs([False]) == [] and runs([True] * 3) == [(0, 3)]
    assert runs([False, True, True, False]) == [(1, 2)]


# -- ChunkCache ------------------------------------------------------------------


class FakeRepo:
    """Chunks in a dict; each load sleeps ``delay`` s and is counted."""

    def __init__(self, chunks: dict[bytes, bytes], delay: float = 0.0):
        self.chunks, self.delay = chunks, delay
        self.loads: dict[bytes, int] = {}
        self.lock = threading.Lock()
        self.bad: set[bytes] = set()
        self.now = self.peak = 0  # get_chunk calls running now / at most at once

    def zero_id(self, n):
        return zero_digest(n)

    def get_chunk(self, d, n):
        with self.lock:
            self.loads[d] = self.loads.get(d, 0) + 1
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(self.delay)
            if d in self.bad:
                raise OSError(errno.EIO, f"chunk {d.hex()}: missing")
            return self.chunks[d]
        finally:
            with self.lock:
                self.now -= 1


def make(nchunks: int, chunk: int = 4096, delay: float = 0.0):
    man = Manifest(nchunks * chunk, chunk)
    store = {}
    for i in range(nchunks):
        data = bytes([i + 1]) * chunk if i % 4 != 3 else bytes(chunk)  # every 4th chunk is zero
        man.chunks[i] = digest(data)
        if i % 4 != 3:
            store[man.chunks[i]] = data
    return man, FakeRepo(store, delay)


def test_chunk_cache_loads_once_and_in_parallel():
    man, repo = make(8, delay=0.3)
    cache = ChunkCache(repo, man, capacity=16, workers=8, readahead=0)
    bufs = [bytearray(4096) for _ in range(8)]
    # Four readers of chunk 0 and one of each of chunks 1, 2, 4, 5 at once.
    jobs = [(bufs[k], 0) for k in range(4)] + [(bufs[4 + k], i * 4096) for k, i in enumerate((1, 2, 4, 5))]
    t0 = time.monotonic()
    threads = [threading.Thread(target=cache.read_into, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    assert all(bytes(bufs[k]) == bytes([1]) * 4096 for k in range(4))
    assert [bufs[4 + k][0] for k in range(4)] == [2, 3, 5, 6]
    assert repo.loads[man.chunks[0]] == 1 and cache.loads == 5
    assert cache.max_in_flight >= 2 and took < 5 * 0.3  # not one after another (1.5 s)
    # A read spanning chunks 2..4 (4 is zero, never loaded) comes from the cache.
    buf = bytearray(3 * 4096)
    cache.read_into(buf, 2 * 4096)
    assert buf == bytes([3]) * 4096 + bytes(4096) + bytes([5]) * 4096
    assert cache.loads == 5 and man.chunks[3] not in repo.loads
    cache.close()


def test_chunk_cache_lru_and_failures():
    man, repo = make(8)
    cache = ChunkCache(repo, man, capacity=2, workers=2, readahead=0)
    for i in (0, 1, 2, 0):
        cache.get(i)
    assert repo.loads[man.chunks[0]] == 2  # 0 was evicted by 1 and 2
    cache.get(2)
    assert repo.loads[man.chunks[2]] == 1  # 2 stayed
    repo.bad.add(man.chunks[5])
    buf = bytearray(4096)
    for _ in range(2):
        with pytest.raises(OSError) as e:
            cache.read_into(buf, 5 * 4096 + 10)
        assert e.value.errno == errno.EIO and e.value.chunk_index == 5
    assert repo.loads[man.chunks[5]] == 2  # a failure is not cached
    cache.close()


def test_chunk_cache_readahead():
    man, repo = make(8, delay=0.05)
    cache = ChunkCache(repo, man, capacity=8, workers=4, readahead=2)
    buf = bytearray(100)
    cache.read_into(buf, 4096 + 7)  # chunk 1: chunks 2 and 3 (zero: skipped) are read ahead
    deadline = time.monotonic() + 5
    while cache.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.loads == 2 and set(repo.loads) == {man.chunks[1], man.chunks[2]}
    cache.read_into(buf, 2 * 4096)  # loaded ahead: no new load for it; 4 is read ahead
    time.sleep(0.2)
    assert repo.loads[man.chunks[2]] == 1 and man.chunks[4] in repo.loads and man.chunks[3] not in repo.loads
    cache.read_into(bytearray(4096), 7 * 4096)  # the last chunk: nothing past the end
    cache.close()


# -- restore() over a MemoryDev ----------------------------------------------------


class RecordingDev:
    """A MemoryDev that records calls and the peak number of chunks being written."""

    def __init__(self, size: int, fill: int = 0xAA):
        from nbdbackup.blockdev.memory import MemoryDev

        self.mem = MemoryDev(size)
        if fill:
            self.mem.write_sync(bytes([fill]) * size, 0)
        self.size = size
        self.writes: list[tuple[int, int]] = []
        self.zeroes: list[tuple[int, int]] = []
        self.flushed = False

    async def pwrite(self, buf, offset, *, fua=False):
        self.writes.append((offset, len(buf)))
        await self.mem.pwrite(buf, offset)

    async def zero(self, offset, length, *, may_trim=False, fua=False, fast=False):
        assert may_trim
        self.zeroes.append((offset, length))
        await self.mem.zero(offset, length, may_trim=True)

    async def flush(self):
        self.flushed = True


def test_restore_writes_data_zeroes_holes_and_flushes():
    import asyncio

    from nbdbackup.agent.restore import restore

    man, repo = make(8, chunk=256 * K)  # chunks 3 and 7 are zero
    data = bytearray(repo.chunks[man.chunks[1]])
    data[64 * K : 192 * K] = bytes(128 * K)  # chunk 1: a zero middle (two 64K blocks)
    man.chunks[1] = digest(data)
    repo.chunks[man.chunks[1]] = bytes(data)
    want = b"".join(repo.chunks.get(d, bytes(256 * K)) for d in man.chunks)

    dev = RecordingDev(man.size + 4096)  # a larger target: its tail is left alone
    st = asyncio.run(restore(repo, man, dev, workers=3))
    got = bytearray(man.size + 4096)
    dev.mem.read_sync(memoryview(got), 0)
    assert bytes(got[: man.size]) == want and got[man.size :] == b"\xaa" * 4096 and dev.flushed
    assert sorted(dev.zeroes) == [(256 * K + 64 * K, 128 * K), (3 * 256 * K, 256 * K), (7 * 256 * K, 256 * K)]
    assert (st.data_chunks, st.zero_chunks, st.bytes_zeroed, st.bytes_skipped) == (6, 2, 640 * K, 0)
    assert st.bytes_written == 6 * 256 * K - 128 * K and st.bytes_fetched == 6 * 256 * K

    dev = RecordingDev(man.size, fill=0)  # a zero target: holes are left, nothing zeroed
    st = asyncio.run(restore(repo, man, dev, workers=3, target_is_zero=True))
    got = bytearray(man.size)
    dev.mem.read_sync(memoryview(got), 0)
    assert bytes(got) == want and dev.zeroes == [] and st.bytes_skipped == 640 * K


def test_restore_bounded_and_names_the_bad_range():
    import asyncio

    from nbdbackup.agent.restore import DamagedChunk, restore
    from nbdbackup.agent.repo import CorruptChunk
    from nbdbackup.errors import NBDBackupError

    man, repo = make(16, chunk=64 * K, delay=0.02)
    st = asyncio.run(restore(repo, man, RecordingDev(man.size), workers=3))
    assert st.data_chunks == 12 and 2 <= repo.peak <= 3  # in parallel, never more than `workers` at once

    class Damaged(FakeRepo):
        def get_chunk(self, d, n):
            if d == man.chunks[9]:
                raise CorruptChunk(d.hex(), "does not match its blake3 digest")
            return super().get_chunk(d, n)

    bad = Damaged(repo.chunks)
    dev = RecordingDev(man.size)
    with pytest.raises(DamagedChunk) as e:
        asyncio.run(restore(bad, man, dev, snapshot="s7", workers=4))
    assert (e.value.snapshot, e.value.index, e.value.offset, e.value.length) == ("s7", 9, 9 * 64 * K, 64 * K)
    assert "chunk 9 at (589824, 65536)" in str(e.value) and not dev.flushed

    # keep_going: every other chunk restored and flushed, each damaged range named, left untouched.
    bad2 = Damaged(repo.chunks)
    bad2.bad.add(man.chunks[2])  # a second one, not a CorruptChunk from the repository's check
    dev = RecordingDev(man.size)
    with pytest.raises(NBDBackupError, match="chunk 2 at"):  # EIO from the store: still a stop
        asyncio.run(restore(bad2, man, dev, snapshot="s7", workers=4, keep_going=True))

    class Missing(Damaged):
        def get_chunk(self, d, n):
            if d == man.chunks[2]:
                raise CorruptChunk(d.hex(), "missing")
            return super().get_chunk(d, n)

    dev = RecordingDev(man.size)
    st = asyncio.run(restore(Missing(repo.chunks), man, dev, snapshot="s7", workers=4, keep_going=True))
    C = 64 * K
    assert st.damaged == [(2 * C, C, 2, "missing"), (9 * C, C, 9, "does not match its blake3 digest")]
    assert st.to_json()["damaged"][1] == {"offset": 9 * C, "length": C, "chunk": 9,
                                          "reason": "does not match its blake3 digest"}
    assert dev.flushed
    got = bytearray(man.size)
    dev.mem.read_sync(memoryview(got), 0)
    for i in range(16):
        want = b"\xaa" * C if i in (2, 9) else repo.get_chunk(man.chunks[i], C) if i % 4 != 3 else bytes(C)
        assert bytes(got[i * C:(i + 1) * C]) == want, i

    class Broken(FakeRepo):
        def get_chunk(self, d, n):
            raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(NBDBackupError, match=r"chunk 0 at \(0, 65536\): cannot read it: Permission denied"):
        asyncio.run(restore(Broken(repo.chunks), man, RecordingDev(man.size), snapshot="s7", workers=1))


# -- ServedSnapshot (serve NAME=repo:REPO#SNAPSHOT) ------------------------------


def test_served_snapshot_random_concurrent_reads_under_eviction():
    """64 reads at once at random offsets and lengths (crossing chunks, zero chunks
    included) through a cache of only 6 chunks: every read returns the snapshot's
    bytes; the task-free path answers only from loaded chunks; a damaged chunk fails
    exactly the reads that touch it with EIO, and only those."""
    import asyncio
    import random

    from nbdbackup.agent.snapsource import ServedSnapshot

    rng = random.Random(7)
    man = Manifest(24 * 4096, 4096)
    chunks = [rng.randbytes(4096) if i % 4 != 3 else bytes(4096) for i in range(24)]  # every 4th zero
    for i, data in enumerate(chunks):
        man.chunks[i] = digest(data)
    repo = FakeRepo({d: c for d, c in zip(man.chunks, chunks)}, delay=0.002)
    image = b"".join(chunks)
    repo.bad.add(man.chunks[10])

    async def main():
        dev = ServedSnapshot(repo, man, cache_bytes=6 * 4096, threads=4, readahead=2)
        assert dev.cache.capacity == 6

        async def one():
            off = rng.randrange(0, len(image) - 1)
            n = rng.randrange(1, min(3 * 4096, len(image) - off) + 1)
            buf = memoryview(bytearray(n))
            touches_bad = off < 11 * 4096 and off + n > 10 * 4096
            try:
                if not dev.pread_now(buf, off):
                    await dev.pread(buf, off)
            except OSError as e:
                assert touches_bad and e.errno == errno.EIO and e.chunk_index == 10, (off, n, e)
                return "eio"
            assert not touches_bad and bytes(buf) == image[off:off + n], (off, n)
            return "ok"

        got = []
        for _ in range(10):
            got += await asyncio.gather(*(one() for _ in range(64)))
        assert got.count("eio") > 0 and got.count("ok") > 500
        # The task-free path never answers from a chunk that is not loaded.
        fresh = ServedSnapshot(repo, man, cache_bytes=6 * 4096, threads=4, readahead=0)
        assert not fresh.pread_now(memoryview(bytearray(4096)), 0)
        await asyncio.sleep(0.05)  # the load pread_now started is done now
        buf = memoryview(bytearray(4096))
        assert fresh.pread_now(buf, 0) and bytes(buf) == image[:4096]
        assert dev.extents_now(0, len(image)) == dev.extents_sync(0, len(image))
        await fresh.close()
        await dev.close()

    asyncio.run(main())
