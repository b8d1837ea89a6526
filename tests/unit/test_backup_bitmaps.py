"""Incremental/bitmap backups through a `BitmapSource` (dirty-bitmap successor protocol).

Through `backup.bitmaps.RegistryBitmapSource`, the engine's adapter.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from nbdbackup.backup.bitmaps import RegistryBitmapSource
from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.bitmap.dirty import BitmapError, BitmapRegistry
from nbdbackup.blockdev.memory import MemoryDev
from nbdbackup.errors import ConfigError

CS = 64 * 1024


# Expectations count 64 KiB clusters (the default before session 14).
pytestmark = pytest.mark.usefixtures("clusters_of_64k")
SIZE = 16 * CS


class MarkHook:
    """What the dirty-tracking work attaches to the LiveDev: mark before writing."""

    def __init__(self, reg):
        self.reg = reg

    async def before_write(self, offset, length):
        self.reg.mark(offset, length)

    async def on_durable(self):
        pass


SOURCES = ["backup"]


def make_source(kind, lookup):
    assert kind == "backup"
    return RegistryBitmapSource(lookup)


def setup(seed=0, kind="backup"):
    rng = random.Random(seed)
    mem = MemoryDev(SIZE)
    mem.write_sync(rng.randbytes(SIZE), 0)
    orig = bytearray(SIZE)
    mem.read_sync(memoryview(orig), 0)
    live = LiveDev(mem)
    reg = BitmapRegistry("disk", SIZE)
    live.add_hook(MarkHook(reg))
    table = MemoryExportTable()
    table.add("disk", live, read_only=False)
    events = []
    engine = Engine(table, lambda n, d: events.append((n, d)),
                    bitmaps=make_source(kind, lambda e: reg if e == "disk" else None))
    return mem, bytes(orig), live, reg, table, engine, events


def read(dev):
    b = bytearray(dev.size)
    dev.read_sync(memoryview(b), 0)
    return bytes(b)


@pytest.mark.parametrize("kind", SOURCES)
def test_incremental_copies_dirty_clusters_and_abdicates(kind):
    async def main():
        mem, orig, live, reg, table, engine, _ = setup(kind=kind)
        bm = reg.add("b", granularity=CS)
        bm.mark(2 * CS + 5, 10)
        bm.mark(7 * CS, 2 * CS)
        tmem = MemoryDev(SIZE)
        await engine.backup_start("disk", "j", "incremental", tmem, snapshot="snap", bitmap="b")
        job = engine.jobs["j"]
        assert bm.busy and job.state.total == 3 * CS
        snap = table.get("snap").dev
        assert "qemu:dirty-bitmap:b" in snap.meta_contexts()
        await live.pwrite(b"x" * 10, 12 * CS)  # after the freeze: the successor's
        ext = await snap.extents(0, SIZE, "qemu:dirty-bitmap:b")
        assert [(e.offset, e.length) for e in ext if e.flags & 1] == [(2 * CS, CS), (7 * CS, 2 * CS)]
        await job.wait()
        assert job.error is None and not bm.busy
        assert bm.dirty_ranges() == [(12 * CS, CS)]  # abdicated: only post-freeze writes
        tgt = read(tmem)
        for c in range(16):
            # 12 (not dirty) was saved by CBW in the scratch, not the target.
            want = orig[c * CS:(c + 1) * CS] if c in (2, 7, 8) else bytes(CS)
            assert tgt[c * CS:(c + 1) * CS] == want, c
        assert job.state.in_scratch.get(12) and job.state.bytes_cbw_to_scratch == CS
        buf = bytearray(SIZE)
        await snap.pread(memoryview(buf), 0)
        assert bytes(buf) == orig
        await engine.job_dismiss("j")
    asyncio.run(main())


@pytest.mark.parametrize("mode,left", [("on-success", [(2 * CS, CS), (7 * CS, 2 * CS), (12 * CS, CS)]),
                                       ("always", [(7 * CS, 2 * CS), (12 * CS, CS)])])
@pytest.mark.parametrize("kind", SOURCES)
def test_cancelled_bitmap_backup_reclaims(mode, left, kind):
    async def main():
        mem, orig, live, reg, table, engine, _ = setup(kind=kind)
        bm = reg.add("b", granularity=CS)
        bm.mark(2 * CS, CS)
        bm.mark(7 * CS, 2 * CS)
        tgt = MemoryDev(SIZE)
        await engine.backup_start("disk", "j", "bitmap", tgt, snapshot="snap", bitmap="b",
                                  bitmap_mode=mode, max_chunk=CS, max_workers=1, speed=1)
        job = engine.jobs["j"]
        # The first chunk (cluster 2) is copied, then the limiter stalls (1 B/s).
        for _ in range(2500):
            if job.state.done.get(2):
                break
            await asyncio.sleep(0.002)
        assert job.state.done.get(2) and not job.state.done.get(7)
        await live.pwrite(b"y", 12 * CS)
        job.cancel()
        await job.wait()
        assert not bm.busy
        assert bm.dirty_ranges() == left
    asyncio.run(main())


@pytest.mark.parametrize("kind", SOURCES)
def test_bitmap_errors(kind):
    async def main():
        mem, orig, live, reg, table, engine, _ = setup(kind=kind)
        with pytest.raises((BitmapError, ConfigError), match="not found"):
            await engine.backup_start("disk", "j", "incremental", MemoryDev(SIZE), snapshot="s", bitmap="nope")
        bm = reg.add("b")
        await engine.backup_start("disk", "j", "incremental", MemoryDev(SIZE), snapshot="s", bitmap="b")
        with pytest.raises((BitmapError, ConfigError), match="in use"):
            await engine.backup_start("disk", "k", "incremental", MemoryDev(SIZE), snapshot="s2", bitmap="b")
        assert engine.jobs.keys() == {"j"} and table.get("s2") is None
        with pytest.raises(ConfigError, match="bitmap-mode"):
            await engine.backup_start("disk", "k", "full", MemoryDev(SIZE), snapshot="s2", bitmap="b")
        await engine.shutdown()
        assert not bm.busy
    asyncio.run(main())


@pytest.mark.parametrize("sync,mode", [("incremental", None), ("bitmap", "on-success"),
                                       ("bitmap", "always"), ("full", "on-success")])
@pytest.mark.parametrize("side", ["source", "target"])
def test_a_successful_backup_keeps_the_clusters_it_ignored_dirty(sync, mode, side):
    """Hunt 3 (docs/hunt3.md): error policy ``ignore`` skips a failing
    cluster and the job still succeeds -- but the target then lacks that
    cluster's content, so the bitmap must keep it dirty: abdicating it
    (bitmap = writes since the start) would make every later incremental
    miss that change for good (invariant 3).  A cluster the job did copy
    is forgotten as usual, a write after the start stays dirty."""
    from nbdbackup.backup.testing import Fault, FaultDev

    async def main():
        mem, orig, live, reg, table, engine, events = setup(seed=3)
        bm = reg.add("b", granularity=CS)
        for c in (2, 5, 9):
            bm.mark(c * CS, CS)
        tmem = MemoryDev(SIZE)
        target = FaultDev(tmem)
        kw = {"bitmap": "b"} if mode is None else {"bitmap": "b", "bitmap_mode": mode}
        if side == "source":
            src = FaultDev(mem)
            live.inner = src  # the pump reads through the fault filter
            src.faults.append(Fault("read", 5 * CS, 1))
            kw["on_source_error"] = "ignore"
        else:
            target.faults.append(Fault("write", 5 * CS, 1))
            kw["on_target_error"] = "ignore"
        await engine.backup_start("disk", "j", sync, target, max_chunk=CS, **kw)
        job = engine.jobs["j"]
        await live.pwrite(b"x" * 10, 12 * CS)  # a write after the start
        await job.wait()
        assert job.status.value == "concluded" and job.error is None
        assert job.state.bytes_ignored == CS
        acts = [d["action"] for n, d in events if n == "BLOCK_JOB_ERROR"]
        assert acts and set(acts) == {"ignore"}
        assert not bm.busy
        dirty = {off // CS for off, _ in bm.dirty_ranges() for off in range(off, off + _, CS)}
        assert 5 in dirty, f"cluster 5 was skipped (not in the target) but the bitmap forgot it: {sorted(dirty)}"
        assert 12 in dirty
        assert not {2, 9} & dirty  # copied: forgotten
        await engine.job_dismiss("j")
    asyncio.run(main())


def test_an_aborted_transaction_forgets_no_dirty_bit_of_a_bitmap_mode_always_backup():
    """Hunt 3 (docs/hunt3.md): a transaction whose backup B (sync full, a
    4 KiB-granule bitmap, bitmap-mode always) was committed -- copy-before-
    write attached -- but never started (another action's start failed,
    here a duplicate snapshot name) is aborted.  A live write while the
    first backup's start awaited copied a whole cluster into B's target
    (``in_target``).  The abort must forget nothing: B never ran, and the
    target it created is deleted; treating the abort as a failed ``always``
    job cleared every granule of that cluster not rewritten since."""
    from nbdbackup.backup.engine import MemoryExportTable
    from nbdbackup.bitmap.manager import BitmapManager
    from nbdbackup.blockdev.base import FilterDev

    wrote, box = [], {}

    class SlowExtents(FilterDev):
        async def extents(self, offset, length, context="base:allocation"):
            if not wrote:  # A's start asks: both backups are committed; a live write
                wrote.append(asyncio.ensure_future(box["live"].pwrite(b"w" * 100, 3 * CS + 8192)))
                await asyncio.sleep(0.05)
            return await self.inner.extents(offset, length, context)

    async def main(tmp):
        mem = MemoryDev(SIZE)
        mem.write_sync(random.Random(1).randbytes(SIZE), 0)
        manager = BitmapManager(None)
        live = box["live"] = manager.wrap("disk", SlowExtents(mem))
        table = MemoryExportTable()
        table.add("disk", live, read_only=False)
        engine = Engine(table, bitmaps=RegistryBitmapSource(manager.lookup))
        manager.engine = engine
        await manager.add("disk", "b", granularity=4096)
        bm = manager.lookup("disk").get("b")
        bm.merge_ranges([(0, SIZE)])  # everything dirty (nothing backed up yet)
        target = os.path.join(tmp, "t.raw")

        with pytest.raises(ConfigError):
            await manager.transaction([
                {"type": "backup-start", "data": {"export": "disk", "job-id": "a", "sync": "top",
                                                  "target": "memory:%d" % SIZE, "snapshot": "s"}},
                {"type": "backup-start", "data": {"export": "disk", "job-id": "b", "sync": "full",
                                                  "target": target, "snapshot": "s", "bitmap": "b",
                                                  "bitmap-mode": "always"}}])
        await wrote[0]  # the live write succeeded
        assert not os.path.exists(target)  # the aborted backup's target is gone
        assert not bm.busy
        missing = [g for g in range(SIZE // 4096) if not bm.get(g * 4096)]
        assert not missing, f"granules forgotten by an aborted backup: {missing[:10]}"
        for j in list(engine.jobs.values()):
            await j.wait()
        await engine.shutdown()

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(tmp))


def test_an_aborted_backup_lets_its_copy_before_write_in_flight_finish_first():
    """Hunt 3 (docs/hunt3.md): the same aborted transaction, with B's
    copy-before-write still in flight (a slow target) when B is aborted:
    the abort closed the target under it, and the LIVE write failed (EIO,
    from EBADF).  Like a dismiss, the abort lets the copies in flight end
    first (copystate rule 6)."""
    import tempfile

    from nbdbackup.backup.engine import MemoryExportTable
    from nbdbackup.backup.testing import FaultDev
    from nbdbackup.bitmap.manager import BitmapManager
    from nbdbackup.blockdev.base import FilterDev
    from nbdbackup.blockdev.file import FileDev

    wrote, box = [], {}

    class WriteOnExtents(FilterDev):
        async def extents(self, offset, length, context="base:allocation"):
            if not wrote:  # A's start asks: both backups are committed; a live write
                wrote.append(asyncio.ensure_future(box["live"].pwrite(b"w" * 100, 3 * CS + 8192)))
                await asyncio.sleep(0.01)  # the write is in B's copy-before-write now
            return await self.inner.extents(offset, length, context)

    async def main(tmp):
        mem = MemoryDev(SIZE)
        mem.write_sync(random.Random(1).randbytes(SIZE), 0)
        manager = BitmapManager(None)
        live = box["live"] = manager.wrap("disk", WriteOnExtents(mem))
        table = MemoryExportTable()
        table.add("disk", live, read_only=False)
        engine = Engine(table, bitmaps=RegistryBitmapSource(manager.lookup))
        manager.engine = engine
        target = FaultDev(FileDev(os.path.join(tmp, "t.raw"), create_size=SIZE), delay=0.2, owns_inner=True)
        with pytest.raises(ConfigError):
            await manager.transaction([
                {"type": "backup-start", "data": {"export": "disk", "job-id": "a", "sync": "top",
                                                  "target": "memory:%d" % SIZE, "snapshot": "s"}},
                {"type": "backup-start", "data": {"export": "disk", "job-id": "b", "sync": "full",
                                                  "target": target, "snapshot": "s"}}])
        await wrote[0]  # the live write succeeded
        got = bytearray(100)
        await live.pread(memoryview(got), 3 * CS + 8192)
        assert got == b"w" * 100
        for j in list(engine.jobs.values()):
            await j.wait()
        await engine.shutdown()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(tmp))


def test_a_failed_always_backup_forgets_only_what_its_flush_covered():
    """Hunt 3 (docs/hunt3.md): bitmap-mode ``always``, the job fails; the
    lease flushes the target, then forgets the granules of every cluster in
    the target.  A copy-before-write that put a cluster there WHILE that
    flush ran is not covered by it: its granules (but the one the live
    write dirtied) were forgotten with their data not yet safe."""
    from nbdbackup.backup.testing import Fault, FaultDev

    async def main():
        mem, orig, live, reg, table, engine, events = setup(seed=4)
        bm = reg.add("b", granularity=4096)
        bm.merge_ranges([(0, SIZE)])
        target = FaultDev(MemoryDev(SIZE))
        target.faults.append(Fault("write", 0, CS))  # the first pump copy fails: the job fails
        target.gate_ops = ("flush",)
        target.gate = asyncio.Event()
        await engine.backup_start("disk", "j", "bitmap", target, bitmap="b", bitmap_mode="always",
                                  max_chunk=CS, max_workers=1)
        job = engine.jobs["j"]
        while not any(op == "flush" for op, _, _ in target.calls):
            await asyncio.sleep(0.01)
        assert job.status.value == "aborting"
        await live.pwrite(b"w" * 100, 12 * CS)  # copy-before-write of cluster 12 into the target
        assert job.state.in_target.get(12)
        target.gate.set()
        await job.wait()
        assert job.error is not None
        missing = [g for g in range(SIZE // 4096) if not bm.get(g * 4096)]
        assert not missing, f"granules forgotten though their copy was not flushed: {missing[:10]}"
        await engine.job_dismiss("j")
    asyncio.run(main())
