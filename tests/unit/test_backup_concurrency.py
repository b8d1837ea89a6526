"""Randomized concurrency: N writers + M snapshot readers + the pump at random speeds.

Each writer owns the clusters ``c % N == i`` (so the live model is exact while
writes run concurrently) and writes, zeroes and trims random sub-ranges of
one owned cluster at a time (partial-left, partial-right, whole).  Readers read random ranges of the snapshot and compare
with the original image at every read.  At the end: target == original
(full), live == model, every counter consistent.  ``bitmap`` runs a job
whose sync set is a random half of the clusters, with a scratch (and
``discard-source`` half the time): the target then holds exactly the set,
the scratch the point-in-time content of every cluster it holds.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.backup.testing import FaultDev
from nbdbackup.bitmap.core import Bitmap
from nbdbackup.blockdev.memory import MemoryDev

CS = 16 * 1024
SIZE = 128 * CS + 777


def read_all(dev: MemoryDev) -> bytes:
    b = bytearray(dev.size)
    dev.read_sync(memoryview(b), 0)
    return bytes(b)


class RandomSet:
    """A `BitmapSource` whose frozen bitmap is a random set of clusters."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.clusters: Bitmap | None = None

    def begin_backup(self, export, name, mode, cluster_size, nclusters):
        bm = Bitmap(nclusters)
        for c in range(nclusters):
            if self.rng.random() < 0.5:
                bm.set(c)
        self.clusters = bm
        return type("Lease", (), {"clusters": bm, "context": None, "end": lambda self, ok: None})()


async def scenario(seed: int, sync: str) -> None:
    rng = random.Random(seed)
    mem = MemoryDev(SIZE)
    mem.write_sync(rng.randbytes(SIZE), 0)
    mem.zero_sync(10 * CS, 20 * CS)
    orig = read_all(mem)
    model = bytearray(orig)
    src = FaultDev(mem, rng=random.Random(seed + 1), max_yields=4)
    live = LiveDev(src)
    table = MemoryExportTable()
    table.add("disk", live, read_only=False)
    events = []
    chosen = RandomSet(random.Random(seed + 3))
    engine = Engine(table, lambda n, d: events.append(n), bitmaps=chosen)
    tmem = MemoryDev(SIZE)
    tgt = FaultDev(tmem, rng=random.Random(seed + 2), max_yields=4)
    smem = MemoryDev(SIZE)
    speed = rng.choice([0, 2 << 20, 8 << 20, 32 << 20])
    extra = {}
    if sync == "bitmap":
        extra = dict(bitmap="b", bitmap_mode="never", discard_source=rng.random() < 0.5,
                     scratch=FaultDev(smem, rng=random.Random(seed + 4), max_yields=4))
    await engine.backup_start("disk", "j", sync, tgt, snapshot="snap", cluster_size=CS,
                              max_workers=rng.randint(1, 6), max_chunk=rng.choice([CS, 3 * CS, 8 * CS]),
                              speed=speed, **extra)
    job = engine.jobs["j"]
    snap = table.get("snap").dev
    nwriters, nreaders = rng.randint(2, 6), rng.randint(1, 4)
    nclusters = job.state.nclusters
    stop = asyncio.Event()
    reads = 0

    async def writer(i: int, wrng: random.Random) -> None:
        mine = [c for c in range(nclusters) if c % nwriters == i]
        for _ in range(25):
            c = wrng.choice(mine)
            lo, hi = c * CS, min((c + 1) * CS, SIZE)
            off = wrng.randrange(lo, hi)
            n = wrng.randint(1, hi - off)
            kind = wrng.random()
            if kind < 0.6:
                data = wrng.randbytes(n)
                await live.pwrite(data, off, fua=wrng.random() < 0.1)
            elif kind < 0.8:
                data = bytes(n)
                await live.zero(off, n, may_trim=wrng.random() < 0.5)
            else:
                data = bytes(n)
                await live.trim(off, n)
            model[off:off + n] = data
            await asyncio.sleep(wrng.random() * 0.002)

    async def reader(rrng: random.Random) -> None:
        nonlocal reads
        while not stop.is_set():
            off = rrng.randrange(SIZE)
            n = rrng.randint(1, min(6 * CS, SIZE - off))
            buf = bytearray(n)
            await snap.pread(memoryview(buf), off)
            assert bytes(buf) == orig[off:off + n], (off, n)
            reads += 1
            await asyncio.sleep(0)

    readers = [asyncio.create_task(reader(random.Random(seed * 100 + k))) for k in range(nreaders)]
    await asyncio.gather(*(writer(i, random.Random(seed * 1000 + i)) for i in range(nwriters)))
    if rng.random() < 0.3 and job.status.value == "running":
        job.pause()
        await asyncio.sleep(0.005)
        job.resume()
    if job.status.value in ("running", "paused"):
        engine.job_set_speed("j", 0)
    if sync == "none":
        job.cancel()
    await job.wait()
    stop.set()
    await asyncio.gather(*readers)
    assert reads > 0
    assert job.status.value == "concluded" and job.error is None
    assert read_all(mem) == bytes(model)
    buf = bytearray(SIZE)
    await snap.pread(memoryview(buf), 0)
    assert bytes(buf) == orig
    st = job.state
    target = read_all(tmem)
    if sync == "full":
        assert target == orig
        assert st.current == st.total == SIZE
        # every byte was copied once, or found zero in the source by CBW (rule 7)
        assert st.bytes_copied_by_pump + st.bytes_copied_by_cbw <= SIZE
        assert st.bytes_copied_by_pump + st.bytes_copied_by_cbw + st.clusters_zero_in_snapshot * CS >= SIZE
    elif sync == "bitmap":
        scratch = read_all(smem)
        assert chosen.clusters is not None
        for c in range(nclusters):
            lo, hi = c * CS, min((c + 1) * CS, SIZE)
            if chosen.clusters.get(c):
                assert target[lo:hi] == orig[lo:hi], c
            else:
                assert target[lo:hi] == bytes(hi - lo), c  # exactly the set
            if st.in_scratch.get(c):
                assert scratch[lo:hi] == orig[lo:hi], c
        short = CS - SIZE % CS if st.in_scratch.get(nclusters - 1) else 0  # the short last cluster
        assert st.scratch_bytes == st.in_scratch.count() * CS - short
        if extra["discard_source"]:
            assert not (st.in_scratch.count() and any(chosen.clusters.get(c) and st.in_scratch.get(c)
                                                      for c in range(nclusters)))
    else:
        for c in range(nclusters):
            lo, hi = c * CS, min((c + 1) * CS, SIZE)
            if st.in_scratch.get(c):  # sync=none: the target is the scratch
                assert target[lo:hi] == orig[lo:hi]
    assert not st.inflight and not st.readers and not st.scratch_readers
    if sync == "bitmap":
        assert st.bytes_cbw_to_scratch > 0, "the scratch was not exercised"
    await engine.job_dismiss("j")
    assert live.hooks == ()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sync", ["full", "none", "bitmap"])
def test_random_concurrency(seed, sync):
    asyncio.run(asyncio.wait_for(scenario(seed, sync), 30))
