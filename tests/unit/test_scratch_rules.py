"""The engine's scratch options on memory devices: validation, where CBW copies
go, TRIM on the snapshot export, scratch-limit under both on-cbw-error
policies, and the query-jobs fields (docs/scratch.md)."""

from __future__ import annotations

import asyncio
import errno
import random

import pytest

from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.backup.testing import FaultDev
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.memory import PAGE, MemoryDev
from nbdbackup.errors import ConfigError

CS = 64 * 1024
SIZE = 8 * PAGE  # 8 clusters of 64 KiB: PAGE == CS


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def read(dev: MemoryDev, off: int = 0, n: int | None = None) -> bytes:
    n = dev.size - off if n is None else n
    b = bytearray(n)
    dev.read_sync(memoryview(b), off)
    return bytes(b)


class Rig:
    """Live "disk" (a MemoryDev: one 64 KiB page per cluster) with data in
    ``pages`` and holes elsewhere, a target and a scratch in memory.  For
    sync=top the sync set is the pages with data; `bitmap_rig` picks any
    set (a fixed fake bitmap), so clusters with data can lie outside it."""

    def __init__(self, pages=(0, 1, 2, 3, 6, 7)):
        rng = random.Random(1)
        self.mem = MemoryDev(SIZE)
        for p in pages:
            self.mem.write_sync(rng.randbytes(PAGE), p * PAGE)
        self.orig = read(self.mem)
        self.live = LiveDev(FaultDev(self.mem))
        self.table = MemoryExportTable()
        self.table.add("disk", self.live, read_only=False)
        self.engine = Engine(self.table)
        self.tmem = MemoryDev(SIZE)
        self.smem = MemoryDev(SIZE)

    async def start(self, sync="top", **kw):
        kw.setdefault("cluster_size", CS)
        await self.engine.backup_start("disk", "j", sync, self.tmem, snapshot="snap", **kw)
        return self.engine.jobs["j"]

    @property
    def snap(self):
        return self.table.get("snap").dev


@pytest.mark.parametrize("sync,kw,msg", [
    ("full", {"scratch": "memory:1M"}, "sync=full takes no scratch"),
    ("none", {"scratch": "memory:1M"}, "sync=none takes no scratch"),
    ("none", {"discard_source": True}, "discard-source"),
    ("full", {"scratch_limit": 4096}, "scratch-limit"),
    ("top", {"scratch_limit": 0}, "scratch-limit"),
    ("top", {"scratch": ""}, "scratch must be"),
    ("top", {"snapshot_trim": "yes"}, "snapshot-trim"),
])
def test_scratch_options_are_validated(sync, kw, msg):
    async def main():
        r = Rig()
        with pytest.raises(ConfigError, match=msg):
            await r.start(sync, **kw)
        assert r.engine.jobs == {}
    run(main())


def test_scratch_smaller_than_the_source_is_refused():
    async def main():
        r = Rig()
        with pytest.raises(ConfigError, match="smaller"):
            await r.start("top", scratch=MemoryDev(SIZE // 2))
    run(main())


def test_top_job_target_gets_the_set_scratch_the_rest_and_trim_frees_it():
    async def main():
        r = Rig(pages=(0, 1, 2, 3))
        job = await r.start("top", scratch=r.smem, snapshot_trim=True, speed=1)
        caps = r.snap.capabilities()
        assert not caps.read_only and caps.can_trim and not caps.can_zero
        # Live writes while the pump stalls: cluster 1 is in the set, 4 and 5
        # are holes (zero in the snapshot), nothing else was allocated.
        await r.live.pwrite(b"A" * CS, 1 * CS)
        await r.live.pwrite(b"B" * (2 * CS), 4 * CS)
        q = job.query()
        assert q["clusters-zero-in-snapshot"] == 2 and q["bytes-copied-by-cbw"] == CS
        assert q["scratch-bytes"] == 0 and q["scratch"] == "memory"
        job.set_speed(0)
        await job.wait()
        assert job.error is None
        assert read(r.tmem, 0, 4 * CS) == r.orig[:4 * CS] and read(r.tmem, 4 * CS) == bytes(4 * CS)
        snap = bytearray(SIZE)
        await r.snap.pread(memoryview(snap), 0)
        assert bytes(snap) == r.orig
        await r.engine.job_dismiss("j")
    run(main())


def test_writes_to_holes_are_zero_in_the_snapshot_and_trim_reads_eacces():
    async def main():
        r = Rig(pages=(0, 1, 2, 3))
        job = await r.start("top", scratch=r.smem, snapshot_trim=True, speed=1)
        await r.live.pwrite(b"C" * CS, 6 * CS)  # hole at start: zero, copied nowhere
        await r.live.pwrite(b"D" * CS, 6 * CS)  # done now: no second CBW
        assert job.state.zeroed.get(6) and job.query()["bytes-copied-by-cbw"] == 0
        job.set_speed(0)
        await job.wait()
        await r.snap.trim(6 * CS, CS)
        with pytest.raises(OSError) as ei:
            await r.snap.pread(memoryview(bytearray(10)), 6 * CS)
        assert ei.value.errno == errno.EACCES
        ext = await r.snap.extents(5 * CS, 3 * CS)
        assert [(e.offset, e.length, e.flags) for e in ext] == [(5 * CS, CS, 3), (6 * CS, CS, 1), (7 * CS, CS, 3)]
        assert job.query()["bytes-trimmed"] == CS
        await r.engine.job_dismiss("j")
    run(main())


class SetSource:
    """A `BitmapSource` freezing a fixed set of clusters."""

    def __init__(self, clusters):
        self.clusters = clusters

    def begin_backup(self, export, name, mode, cluster_size, nclusters):
        from nbdbackup.bitmap.core import Bitmap

        bm = Bitmap(nclusters)
        for c in self.clusters:
            bm.set(c)
        return type("Lease", (), {"clusters": bm, "context": None, "end": lambda self, ok: None})()


def bitmap_rig(clusters=(0, 1)):
    r = Rig(pages=range(8))
    r.engine.bitmaps = SetSource(clusters)
    return r


def test_bitmap_job_scratch_usage_trim_and_no_copy_after_trim():
    async def main():
        r = bitmap_rig()
        job = await r.start("bitmap", bitmap="b", bitmap_mode="never", scratch=r.smem,
                            snapshot_trim=True, speed=1)
        await r.live.pwrite(b"E" * (3 * CS), 3 * CS)  # 3, 4, 5: outside the set
        q = job.query()
        assert q["scratch-bytes"] == q["scratch-allocated"] == 3 * CS and q["bytes-cbw-to-scratch"] == 3 * CS
        assert read(r.smem, 3 * CS, 3 * CS) == r.orig[3 * CS:6 * CS]
        await r.snap.trim(3 * CS, 2 * CS)
        q = job.query()
        assert q["scratch-bytes"] == CS and q["scratch-bytes-discarded"] == 2 * CS
        assert read(r.smem, 3 * CS, 2 * CS) == bytes(2 * CS)  # punched
        before = q["bytes-copied-by-cbw"]
        await r.live.pwrite(b"F" * (2 * CS), 3 * CS)  # trimmed: costs no copy
        assert job.query()["bytes-copied-by-cbw"] == before
        job.set_speed(0)
        await job.wait()
        assert job.error is None
        assert read(r.tmem, 0, 2 * CS) == r.orig[:2 * CS] and read(r.tmem, 2 * CS) == bytes(SIZE - 2 * CS)
        await r.engine.job_dismiss("j")
    run(main())


@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
def test_scratch_limit_applies_the_cbw_error_policy(policy):
    async def main():
        r = bitmap_rig()
        job = await r.start("bitmap", bitmap="b", bitmap_mode="never", scratch=r.smem,
                            scratch_limit=2 * CS, on_cbw_error=policy, speed=1)
        await r.live.pwrite(b"G" * (2 * CS), 3 * CS)  # fits exactly
        if policy == "break-guest-write":
            with pytest.raises(OSError) as ei:
                await r.live.pwrite(b"H" * 10, 6 * CS)
            assert ei.value.errno == errno.EIO
            assert read(r.mem, 6 * CS, 10) == r.orig[6 * CS:6 * CS + 10]  # not written
            assert job.query()["scratch-bytes"] == 2 * CS and not job.query()["snapshot-broken"]
            await r.live.pwrite(b"I" * CS, 0)  # in the set: to the target, no limit
            job.set_speed(0)
            await job.wait()
            assert job.error is None
        else:
            await r.live.pwrite(b"H" * 10, 6 * CS)  # the write goes on, the snapshot breaks
            assert read(r.mem, 6 * CS, 10) == b"H" * 10
            await job.wait()
            assert job.query()["snapshot-broken"] and "copy-before-write" in job.error
            with pytest.raises(OSError) as ei:
                await r.snap.pread(memoryview(bytearray(10)), 0)
            assert ei.value.errno == errno.EIO
        await r.engine.job_dismiss("j")
    run(main())


def test_discard_source_empties_the_scratch_of_moved_clusters():
    """CBW before the set is known (between commit and start) lands in the
    scratch; the pump moves in-set clusters to the target and, with
    discard-source, punches them from the scratch."""
    async def main():
        r = bitmap_rig(clusters=(0, 1, 2))
        prepared = await r.engine.prepare_backup("disk", "j", "bitmap", r.tmem, snapshot="snap",
                                                 cluster_size=CS, bitmap="b", bitmap_mode="never",
                                                 scratch=r.smem, discard_source=True)
        prepared.commit()
        await r.live.pwrite(b"J" * (2 * CS), CS)  # clusters 1, 2 (in the set) before start
        await r.live.pwrite(b"K" * CS, 5 * CS)  # cluster 5 (not)
        job = prepared.job
        assert job.state.scratch_bytes == 3 * CS
        await prepared.start()
        await job.wait()
        assert job.error is None
        assert read(r.tmem, 0, 3 * CS) == r.orig[:3 * CS]
        q = job.query()
        assert q["scratch-bytes"] == CS and q["scratch-bytes-discarded"] == 2 * CS
        assert read(r.smem, CS, 2 * CS) == bytes(2 * CS) and read(r.smem, 5 * CS, CS) == r.orig[5 * CS:6 * CS]
        snap = bytearray(SIZE)
        await r.snap.pread(memoryview(snap), 0)
        assert bytes(snap) == r.orig
        await r.engine.job_dismiss("j")
    run(main())


def test_fleecing_target_is_the_scratch():
    async def main():
        r = Rig()
        job = await r.start("none", snapshot_trim=True, scratch_limit=4 * CS)
        await r.live.pwrite(b"L" * CS, 0)
        q = job.query()
        assert q["scratch"] == "target" and q["scratch-bytes"] == CS
        assert read(r.tmem, 0, CS) == r.orig[:CS]
        await r.snap.trim(0, CS)
        assert read(r.tmem, 0, CS) == bytes(CS) and job.query()["scratch-bytes"] == 0
        job.cancel()
        await job.wait()
        await r.engine.job_dismiss("j")
    run(main())
