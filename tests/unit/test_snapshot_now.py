"""`SnapshotDev.pread_now` / `extents_now`: the server's task-free READ path on a snapshot export.

Not vacuous: on RAM devices the fast path is taken and returns the point-in-time
bytes while live writes change the disk; it registers as a reader only for its
own duration (now: not at all, nothing runs during it); it declines (False / None) exactly where the awaited path must
answer: trimmed clusters, a dismissed job, a broken snapshot, a device without
the bytes at hand.
"""

from __future__ import annotations

import asyncio
import random

from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.backup.testing import FaultDev
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.memory import MemoryDev

CS = 64 * 1024
SIZE = 16 * CS


async def _setup(target=None, **kw):
    mem = MemoryDev(SIZE)
    orig = random.Random(7).randbytes(SIZE)
    mem.write_sync(bytearray(orig[:8 * CS]), 0)  # the second half stays a hole (zeros)
    orig = orig[:8 * CS] + bytes(8 * CS)
    live = LiveDev(mem)
    table = MemoryExportTable()
    table.add("disk", live, read_only=False)
    engine = Engine(table)
    await engine.backup_start("disk", "j", "none", target or MemoryDev(SIZE), snapshot="snap",
                              cluster_size=CS, speed=1, snapshot_trim=True, **kw)
    return engine, live, table.get("snap").dev, orig


def test_fast_read_is_point_in_time_and_unregisters():
    async def main():
        engine, live, snap, orig = await _setup()
        st = engine.jobs["j"].state
        await live.pwrite(b"\xaa" * (3 * CS), CS // 2)       # copied aside first (CBW)
        await live.pwrite(b"\xbb" * CS, 9 * CS)               # over a hole
        for off, n in [(0, SIZE), (CS // 2, 3 * CS), (9 * CS - 5, CS + 10), (15 * CS, CS)]:
            buf = bytearray(n)
            assert snap.pread_now(memoryview(buf), off)
            assert bytes(buf) == orig[off:off + n]
            assert snap.extents_now(off, n) == await snap.extents(off, n)
        assert not st.readers and not st.scratch_readers  # nothing left registered
        engine.job_cancel("j")

    asyncio.run(main())


def test_fast_read_declines_where_the_task_path_must_answer():
    async def main():
        engine, live, snap, orig = await _setup()
        buf = bytearray(CS)
        await snap.trim(2 * CS, CS)                 # trimmed: the task path fails with EACCES
        assert not snap.pread_now(memoryview(buf), 2 * CS)
        assert snap.pread_now(memoryview(buf), 3 * CS)
        engine.jobs["j"].state.broken = "injected"  # broken: EIO from the task path
        assert not snap.pread_now(memoryview(buf), 3 * CS) and snap.extents_now(3 * CS, CS) is None
        engine.jobs["j"].state.broken = None
        snap.close_view()                          # dismissed: ESHUTDOWN from the task path
        assert not snap.pread_now(memoryview(buf), 3 * CS) and snap.extents_now(3 * CS, CS) is None

    asyncio.run(main())


def test_fast_read_declines_when_a_device_cannot_answer_now():
    async def main():
        # A target that never answers at once (FaultDev has no pread_now): copied
        # clusters send the read to the task path, uncopied ones still go fast.
        engine, live, snap, orig = await _setup(target=FaultDev(MemoryDev(SIZE), rng=random.Random(1)))
        await live.pwrite(b"\xcc" * CS, 4 * CS)
        buf = bytearray(CS)
        assert not snap.pread_now(memoryview(buf), 4 * CS)
        await snap.pread(memoryview(buf), 4 * CS)
        assert bytes(buf) == orig[4 * CS:5 * CS]
        assert snap.pread_now(memoryview(buf), 5 * CS) and bytes(buf) == orig[5 * CS:6 * CS]

    asyncio.run(main())


def test_fast_paths_answer_the_point_in_time_layout():
    """`pread_now` and `extents_now` (one source read / the source's own extents
    when no cluster of the range is done or trimmed, `CopyState.reads_source`)
    answer the image of the backup's start on ranges that are untouched,
    copied aside, zeroed in the snapshot (a hole written over) or a mix, while
    the live disk differs there; and register nothing."""
    from nbdbackup.blockdev.base import HOLE_ZERO, Extent, merge_extents

    async def main():
        engine, live, snap, orig = await _setup()
        st = engine.jobs["j"].state
        model = [Extent(0, 8 * CS, 0), Extent(8 * CS, 8 * CS, HOLE_ZERO)]  # data, then a hole

        def want(off, n):
            out = []
            for e in model:
                lo, hi = max(e.offset, off), min(e.end, off + n)
                if lo < hi:
                    out.append(Extent(lo, hi - lo, e.flags))
            return merge_extents(out)

        ranges = [(0, SIZE), (CS // 2, 3 * CS), (9 * CS - 5, CS + 10), (15 * CS, CS), (7 * CS, 3 * CS),
                  (5 * CS + 1, 100), (12 * CS, 2 * CS)]
        for phase in range(2):
            for off, n in ranges:
                buf = bytearray(n)
                assert snap.pread_now(memoryview(buf), off)
                assert bytes(buf) == orig[off:off + n], (phase, off, n)
                assert snap.extents_now(off, n) == want(off, n), (phase, off, n)
            if phase == 0:
                assert st.reads_source(0, 8 * CS) and st.reads_source(8 * CS, 8 * CS)
                await live.pwrite(b"\xaa" * (3 * CS), CS // 2)   # copied aside first (CBW)
                await live.pwrite(b"\xbb" * CS, 9 * CS)           # a hole: zero in the snapshot
                await live.pwrite(b"\xcc" * 100, 12 * CS + 7)    # another
                assert not st.reads_source(0, 8 * CS) and not st.reads_source(9 * CS, 1)
                assert st.reads_source(10 * CS, 2 * CS)  # between them: still the source
        assert not st.readers and not st.scratch_readers
        engine.job_cancel("j")

    asyncio.run(main())
