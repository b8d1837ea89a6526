"""CopyState rules 1-5 on memory devices, with gates to freeze copies mid-flight."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from nbdbackup.backup.copystate import CopyError, CopyState
from nbdbackup.backup.testing import Fault, FaultDev
from nbdbackup.bitmap.core import Bitmap
from nbdbackup.blockdev.memory import MemoryDev

CS = 4096
SIZE = 10 * CS + 1000  # last cluster is partial


def run(coro):
    return asyncio.run(coro)


def make(size=SIZE, cs=CS):
    src = MemoryDev(size)
    data = bytes(os.urandom(size))
    src.write_sync(data, 0)
    fsrc = FaultDev(src)
    tgt = MemoryDev(size)
    ftgt = FaultDev(tgt)
    st = CopyState(fsrc, ftgt, cs)
    return st, src, fsrc, tgt, ftgt, data


def read(dev: MemoryDev, off=0, n=None):
    n = dev.size - off if n is None else n
    b = bytearray(n)
    dev.read_sync(memoryview(b), off)
    return bytes(b)


def test_geometry_partial_last_cluster():
    async def main():
        st, *_ = make()
        assert st.nclusters == 11
        assert st.clusters_of(0, 1) == (0, 1)
        assert st.clusters_of(CS - 1, 2) == (0, 2)
        assert st.clusters_of(SIZE - 1, 1) == (10, 11)
        assert st.span(10, 1) == (10 * CS, 1000)
        st.set_pump_todo(Bitmap(11, fill=True))
        assert st.total == SIZE
    run(main())


def test_protect_copies_each_cluster_once_and_marks_done():
    async def main():
        st, src, fsrc, tgt, ftgt, data = make()
        await st.protect(CS + 10, 2 * CS)  # touches clusters 1, 2, 3
        assert [st.done.get(i) for i in range(5)] == [False, True, True, True, False]
        assert read(tgt, CS, 3 * CS) == data[CS:4 * CS]
        n_reads = len([c for c in fsrc.calls if c[0] == "read"])
        await st.protect(CS, CS)  # done already: no copy
        assert len([c for c in fsrc.calls if c[0] == "read"]) == n_reads
        assert st.bytes_copied_by_cbw == 3 * CS
        assert not st.inflight
    run(main())


def test_second_copier_waits_for_inflight_copy():
    async def main():
        st, src, fsrc, tgt, ftgt, data = make()
        ftgt.gate = asyncio.Event()
        t1 = asyncio.create_task(st.protect(0, CS))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert 0 in st.inflight
        t2 = asyncio.create_task(st.protect(100, 10))
        await asyncio.sleep(0.01)
        assert not t1.done() and not t2.done()
        ftgt.gate.set()
        await asyncio.gather(t1, t2)
        assert [c[0] for c in fsrc.calls].count("read") == 1  # copied once
        assert st.done.get(0) and not st.inflight
    run(main())


def test_failed_copy_leaves_cluster_not_done_not_inflight_and_waiter_retries():
    async def main():
        st, src, fsrc, tgt, ftgt, data = make()
        ftgt.gate = asyncio.Event()
        ftgt.faults.append(Fault("write", 0, CS, errno.ENOSPC, times=1))
        owner = asyncio.create_task(st.protect(0, CS))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        waiter = asyncio.create_task(st.protect(0, CS))
        await asyncio.sleep(0)
        ftgt.gate.set()
        with pytest.raises(CopyError) as ei:
            await owner
        assert ei.value.errno == errno.ENOSPC and ei.value.operation == "write"
        await waiter  # retried on its own after the owner failed
        assert st.done.get(0) and not st.inflight
        assert read(tgt, 0, CS) == data[:CS]
    run(main())


def test_read_error_is_classified_as_read():
    async def main():
        st, src, fsrc, tgt, ftgt, data = make()
        fsrc.faults.append(Fault("read", 2 * CS, 1))
        with pytest.raises(CopyError) as ei:
            await st.protect(2 * CS, CS)
        assert ei.value.operation == "read" and ei.value.errno == errno.EIO
        assert not st.done.get(2) and 2 not in st.inflight
    run(main())


def test_cancelled_copy_leaves_state_valid():
    async def main():
        st, src, fsrc, tgt, ftgt, data = make()
        ftgt.gate = asyncio.Event()
        t = asyncio.create_task(st.protect(0, 3 * CS))
        await asyncio.sleep(0.01)
        assert st.inflight
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert not st.inflight and not st.done.any()
        ftgt.gate.set()
        await st.protect(0, 3 * CS)  # resume is free
        assert st.done.all(0, 3)
    run(main())


def test_writer_waits_for_snapshot_readers():
    async def main():
        st, src, fsrc, tgt, ftgt, data = make()
        segs = st.begin_read(CS + 5, 10)  # reader on cluster 1 (source)
        assert segs == [(CS + 5, 10, "source")] and st.readers.counts == {1: 1}
        w = asyncio.create_task(st.protect(CS, CS))
        await asyncio.sleep(0.01)
        assert st.done.get(1)  # copied already ...
        assert not w.done()  # ... but held back until the reader leaves
        st.end_read(segs)
        await asyncio.wait_for(w, 1)
        assert not st.readers
    run(main())


def test_begin_read_splits_done_and_not_done_partial_clusters():
    async def main():
        st, src, fsrc, tgt, ftgt, data = make()
        await st.protect(CS, CS)  # cluster 1 done
        segs = st.begin_read(100, 3 * CS)  # clusters 0 (partial), 1, 2, 3 (partial)
        assert segs == [(100, CS - 100, "source"), (CS, CS, "target"), (2 * CS, CS + 100, "source")]
        assert st.readers.counts == {0: 1, 2: 1, 3: 1}
        st.end_read(segs)
        assert st.readers.counts == {}
        segs = st.begin_read(SIZE - 10, 10)
        assert segs == [(SIZE - 10, 10, "source")]
        st.end_read(segs)
    run(main())


def test_pump_claim_skips_done_and_inflight_and_counts_progress():
    async def main():
        st, src, fsrc, tgt, ftgt, data = make()
        todo = Bitmap(st.nclusters)
        todo.set(0, 6)
        st.set_pump_todo(todo)
        assert st.total == 6 * CS
        await st.protect(2 * CS, 1)  # CBW copies cluster 2 (in todo)
        assert st.current == CS and not st.pump_todo.get(2)
        await st.protect(8 * CS, 1)  # not in todo: no progress
        assert st.current == CS and st.bytes_copied_by_cbw == 2 * CS
        got = st.claim(0, st.nclusters, 8, todo_only=True)
        assert got == (0, 2)  # stops at done cluster 2
        got2 = st.claim(0, st.nclusters, 2, todo_only=True)
        assert got2 == (3, 2)  # skips in-flight 0, 1; max 2
        await st.copy(*got, "pump")
        await st.copy(*got2, "pump")
        got3 = st.claim(0, st.nclusters, 8, todo_only=True)
        assert got3 == (5, 1)
        await st.copy(*got3, "pump")
        assert st.claim(0, st.nclusters, 8, todo_only=True) is None
        assert st.current == st.total == 6 * CS
        assert st.bytes_copied_by_pump == 5 * CS
        assert read(tgt, 0, 6 * CS) == data[:6 * CS]
        assert read(tgt, 8 * CS, CS) == data[8 * CS:9 * CS]
        assert read(tgt, 6 * CS, CS) == bytes(CS)  # never copied
    run(main())


def test_zero_clusters_become_target_zero():
    async def main():
        src = MemoryDev(8 * CS)
        src.write_sync(b"a" * CS, 0)
        src.write_sync(b"b" * CS, 3 * CS)
        tgt = MemoryDev(8 * CS)
        tgt.write_sync(b"\xff" * 8 * CS, 0)  # stale content must be overwritten
        ftgt = FaultDev(tgt)
        st = CopyState(src, ftgt, CS)
        await st.protect(0, 8 * CS)
        assert read(tgt) == read(src)
        assert st.clusters_skipped_zero == 6
        ops = [c[0] for c in ftgt.calls]
        assert ops.count("write") == 4  # a, zero run, b, zero run
    run(main())


def test_ignore_drops_todo_without_done():
    async def main():
        st, *_ = make()
        st.set_pump_todo(Bitmap(st.nclusters, fill=True))
        st.ignore(10, 1)
        assert st.bytes_ignored == 1000 and st.current == 1000
        assert not st.pump_todo.get(10) and not st.done.get(10)
    run(main())


def test_retired_state_claims_nothing_more_but_lets_inflight_copies_finish():
    """Rule 6 (dismiss): a write already inside copy-before-write, waiting on
    another copy, must not start a copy of its own once the state is retired
    (the target is about to close); the copy in flight finishes."""
    async def main():
        st, src, fsrc, tgt, ftgt, data = make()
        ftgt.gate = asyncio.Event()
        t1 = asyncio.create_task(st.protect(0, CS))  # claims cluster 0, held at the target
        await asyncio.sleep(0.01)
        t2 = asyncio.create_task(st.protect(0, 2 * CS))  # waits on cluster 0, then wants 1
        await asyncio.sleep(0.01)
        assert 0 in st.inflight and 1 not in st.inflight
        st.retire()
        ftgt.gate.set()
        await asyncio.wait_for(asyncio.gather(t1, t2), 5)
        assert st.done.get(0) and not st.done.get(1) and not st.inflight
        assert [c for c in ftgt.calls if c[0] == "write" and c[1] >= CS] == []
        await st.protect(5 * CS, CS)  # later writes pass through untouched
        assert not st.done.get(5)
    run(main())


# -- the scratch (rules 1, 3, 7-10) ----------------------------------------------


def make_scratch(**kw):
    """A state with a scratch; the source has data in clusters 0-9 and a
    hole at clusters 16-31 (MemoryDev pages are 64 KiB = 16 clusters)."""
    size = 48 * CS
    src = MemoryDev(size)
    data = bytearray(os.urandom(size))
    data[16 * CS:32 * CS] = bytes(16 * CS)
    src.write_sync(bytes(data[:16 * CS]), 0)
    src.write_sync(bytes(data[32 * CS:]), 32 * CS)
    fsrc, tgt, scr = FaultDev(src), MemoryDev(size), MemoryDev(size)
    fscr = FaultDev(scr)
    st = CopyState(fsrc, FaultDev(tgt), CS, scratch=fscr, **kw)
    return st, src, fsrc, tgt, scr, fscr, bytes(data)


def test_cbw_outside_the_set_goes_to_the_scratch_inside_to_the_target():
    async def main():
        st, src, fsrc, tgt, scr, fscr, data = make_scratch()
        todo = Bitmap(st.nclusters)
        todo.set(0, 4)
        st.set_pump_todo(todo)
        await st.protect(2 * CS, 4 * CS)  # clusters 2, 3 (in the set), 4, 5 (not)
        assert read(tgt, 2 * CS, 2 * CS) == data[2 * CS:4 * CS] and read(tgt, 4 * CS, 2 * CS) == bytes(2 * CS)
        assert read(scr, 4 * CS, 2 * CS) == data[4 * CS:6 * CS] and read(scr, 2 * CS, 2 * CS) == bytes(2 * CS)
        assert st.in_target.get(2) and st.in_target.get(3) and st.in_scratch.get(4) and st.in_scratch.get(5)
        assert st.scratch_bytes == st.bytes_cbw_to_scratch == 2 * CS and st.current == 2 * CS
        for seg in st.begin_read(2 * CS, 4 * CS):
            assert seg[2] == ("target" if seg[0] < 4 * CS else "scratch")
    run(main())


def test_cbw_of_a_source_hole_copies_nothing():
    """Rule 7: the source reports clusters 16-31 as a hole: no read, no write."""
    async def main():
        st, src, fsrc, tgt, scr, fscr, data = make_scratch()
        st.set_pump_todo(None)
        n = len(fsrc.calls)
        await st.protect(15 * CS, 10 * CS)  # cluster 15 has data, 16-24 are a hole
        reads = [c for c in fsrc.calls[n:] if c[0] == "read"]
        assert reads == [("read", 15 * CS, CS)]
        assert [c[1:] for c in fscr.calls if c[0] == "write"] == [(15 * CS, CS)]
        assert all(st.zeroed.get(c) for c in range(16, 25)) and not st.zeroed.get(15)
        assert st.clusters_zero_in_snapshot == 9 and st.bytes_copied_by_cbw == CS
        src.write_sync(b"x" * 10 * CS, 15 * CS)  # the live write lands
        segs = st.begin_read(15 * CS, 10 * CS)
        st.end_read(segs)
        assert [w for _, _, w in segs] == ["scratch", "zero"]
    run(main())


def test_cbw_before_the_set_is_known_then_the_pump_moves_it_and_discards():
    """A CBW between the point in time and set_pump_todo goes to the scratch;
    the pump moves in-set clusters to the target; discard-source punches them."""
    async def main():
        st, src, fsrc, tgt, scr, fscr, data = make_scratch(discard_source=True)
        await st.protect(0, 3 * CS)  # set unknown yet: all to the scratch
        await st.protect(20 * CS, CS)  # a hole: zeroed
        assert st.scratch_bytes == 3 * CS
        todo = Bitmap(st.nclusters)
        todo.set(1, 2)  # clusters 1, 2 in the set
        todo.set(20)
        st.set_pump_todo(todo)
        assert st.pump_todo.get(1) and st.pump_todo.get(2) and st.pump_todo.get(20)
        assert st.kind(1) == "scratch" and st.kind(20) == "zero"
        got = st.claim(0, st.nclusters, 8, todo_only=True)
        assert got == (1, 2)
        await st.copy(*got, "pump")
        got = st.claim(0, st.nclusters, 8, todo_only=True)
        assert got == (20, 1)
        await st.copy(*got, "pump")
        assert st.claim(0, st.nclusters, 8, todo_only=True) is None
        assert read(tgt, CS, 2 * CS) == data[CS:3 * CS] and read(tgt, 0, CS) == bytes(CS)
        assert st.in_scratch.get(0) and not st.in_scratch.get(1) and not st.in_scratch.get(2)
        assert st.scratch_bytes == CS and st.scratch_bytes_discarded == 2 * CS
        assert ("write", CS, 2 * CS) in fscr.calls  # the punch (trim counts as a write)
        assert st.current == st.total == 3 * CS
    run(main())


def test_trim_on_the_snapshot_frees_the_scratch_and_ends_cbw_there():
    async def main():
        st, src, fsrc, tgt, scr, fscr, data = make_scratch()
        todo = Bitmap(st.nclusters)
        todo.set(5)
        st.set_pump_todo(todo)
        await st.protect(2 * CS, 2 * CS)  # 2, 3 -> scratch
        assert st.scratch_bytes == 2 * CS
        await st.trim_snapshot(2 * CS + 1, 6 * CS)  # whole clusters 3-7; 2 only partly
        assert [st.trimmed.get(c) for c in range(2, 9)] == [False, True, True, True, True, True, False]
        assert st.scratch_bytes == CS and st.in_scratch.get(2) and not st.in_scratch.get(3)
        assert st.bytes_trimmed == 5 * CS
        assert st.done.get(4) and st.done.get(7) and not st.done.get(5)  # 5 is in the set: kept
        n = st.bytes_copied_by_cbw
        await st.protect(4 * CS, 2 * CS)  # 4: nothing to copy; 5: in the set -> target
        assert st.bytes_copied_by_cbw == n + CS and read(tgt, 5 * CS, CS) == data[5 * CS:6 * CS]
        with pytest.raises(OSError) as ei:
            st.begin_read(3 * CS, 10)
        assert ei.value.errno == errno.EACCES and not st.readers and not st.scratch_readers
        segs = st.begin_read(2 * CS, CS)
        st.end_read(segs)
        assert segs == [(2 * CS, CS, "scratch")]
    run(main())


def test_scratch_limit_fails_the_copy_with_enospc_and_keeps_the_state():
    async def main():
        st, src, fsrc, tgt, scr, fscr, data = make_scratch(scratch_limit=2 * CS)
        st.set_pump_todo(None)
        await st.protect(0, 2 * CS)
        with pytest.raises(CopyError) as ei:
            await st.protect(2 * CS, CS)
        assert ei.value.errno == errno.ENOSPC and ei.value.operation == "write"
        assert not st.done.get(2) and not st.inflight and st.scratch_bytes == 2 * CS
        await st.protect(20 * CS, 4 * CS)  # zeros cost no scratch: allowed
        await st.trim_snapshot(0, CS)
        await st.protect(2 * CS, CS)  # room again
        assert st.scratch_bytes == 2 * CS and st.done.get(2)
    run(main())


def test_failed_scratch_write_releases_its_reservation():
    async def main():
        st, src, fsrc, tgt, scr, fscr, data = make_scratch()
        st.set_pump_todo(None)
        fscr.faults.append(Fault("write", times=1))
        with pytest.raises(CopyError):
            await st.protect(0, 3 * CS)
        assert st.scratch_bytes == 0 and not st.done.any() and not st.in_scratch.any()
        await st.protect(0, 3 * CS)
        assert st.scratch_bytes == 3 * CS and read(scr, 0, 3 * CS) == data[:3 * CS]
    run(main())


def _segments_by_cluster(st: CopyState, offset: int, length: int, allow_trimmed: bool):
    """The reference split of `CopyState.segments`: `where` of every cluster, runs merged."""
    first, end = st.clusters_of(offset, length)
    runs: list[list] = []
    for c in range(first, end):
        w = st.where(c)
        if w == "trimmed" and not allow_trimmed:
            raise OSError(errno.EACCES, "trimmed")
        if runs and runs[-1][2] == w:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1, w])
    out = []
    for c, e, w in runs:
        lo, ln = st.span(c, e - c)
        lo2, hi2 = max(lo, offset), min(lo + ln, offset + length)
        out.append((lo2, hi2 - lo2, w))
    return out


def test_segments_equal_a_walk_of_every_cluster():
    """`segments` finds a source run by bitmap searches: on random states of the five bitmaps
    (sparse and dense, long and short runs) and random ranges (partial clusters, the partial
    last cluster) it gives exactly the segments of a per-cluster walk, raises EACCES for the
    same trimmed ranges, and `begin_read` registers the source and scratch clusters of them;
    `reads_source` is True exactly when that walk gives one "source" segment (a trimmed
    cluster that is not done -- still in the sync set -- included)."""
    import random

    rng = random.Random(5)
    n_clusters = 300
    size = n_clusters * CS - 100
    for trial in range(200):
        st = CopyState(MemoryDev(size), MemoryDev(size), CS)
        density = rng.choice((0.0, 0.01, 0.1, 0.5))
        run_len = rng.choice((1, 3, 17, 70))
        for bm in (st.done, st.zeroed, st.in_scratch, st.in_target, st.trimmed):
            if bm is st.trimmed and trial % 3:
                continue  # most states without trims (a snapshot export's usual state)
            c = 0
            while c < n_clusters:
                if rng.random() < density:
                    k = min(rng.randrange(1, run_len + 1), n_clusters - c)
                    bm.set(c, k)
                    c += k
                c += rng.randrange(1, run_len + 1)
        for _ in range(20):
            off = rng.randrange(size)
            ln = rng.randrange(1, size - off + 1)
            for allow in (True, False):
                try:
                    want = _segments_by_cluster(st, off, ln, allow)
                except OSError:
                    with pytest.raises(OSError) as e:
                        st.segments(off, ln, allow_trimmed=allow)
                    assert e.value.errno == errno.EACCES
                    continue
                assert st.segments(off, ln, allow_trimmed=allow) == want, (trial, off, ln)
            # `reads_source` (the snapshot's task-free reads): exactly "one source segment".
            assert st.reads_source(off, ln) == (
                _segments_by_cluster(st, off, ln, True) == [(off, ln, "source")]), (trial, off, ln)
        segs = st.begin_read(0, size, allow_trimmed=True)
        for o, n, w in segs:
            first, end = st.clusters_of(o, n)
            for c in range(first, end):
                assert (c in st.readers) == (w == "source") and (c in st.scratch_readers) == (w == "scratch")
        st.end_read(segs)
        assert not st.readers and not st.scratch_readers
    assert st.segments(0, size, allow_trimmed=True)  # (the loop ran)


def test_block_status_of_an_untouched_snapshot_does_not_walk_its_clusters():
    """A snapshot export nothing has written to yet (every cluster read from the source) is
    split into one segment with a handful of `where` calls, whatever its size (it was one
    call per cluster: ~16k for 1 GiB of 64 KiB clusters, 9-90 ms of a block status), and
    `SnapshotDev.extents` answers it without registering a reader."""
    from nbdbackup.backup.snapshot import SnapshotDev

    n = 1 << 16
    st = CopyState(MemoryDev(n * CS), MemoryDev(n * CS), CS)
    calls = []
    real = st.where
    st.where = lambda c: calls.append(c) or real(c)
    assert st.segments(0, n * CS, allow_trimmed=True) == [(0, n * CS, "source")]
    assert len(calls) <= 2, len(calls)
    st.done.set(n // 2, 3)  # copied clusters: walked, the source runs around them are not
    st.in_scratch.set(n // 2, 3)
    calls.clear()
    assert [w for _, _, w in st.segments(0, n * CS)] == ["source", "scratch", "source"]
    assert len(calls) <= 8, len(calls)
    added = []
    st.readers.add = lambda *a: added.append(a)
    dev = SnapshotDev(st)
    ext = run(dev.extents(0, n * CS))
    assert ext and sum(e.length for e in ext) == n * CS and not added
