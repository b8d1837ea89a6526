"""The pump's cost follows the data: source zero runs are claimed and zeroed whole.

`Pump` asks the source for its extents a window at a time and turns a claim
that starts in a run the source reports as zeros into one claim over the run
(one target zero request).  These tests pin that it is exact (point-in-time
content, stale target bytes overwritten, done clusters never copied again even
when the zero map is stale) and that it is cheap (requests per GiB), plus the
`Claims` run map that makes a long claim cost as much as a short one.
"""

from __future__ import annotations

import asyncio
import os

from nbdbackup.backup.copystate import Claims, CopyState, reads_zero
from nbdbackup.backup.pump import Pump, RateLimiter
from nbdbackup.backup.testing import FaultDev
from nbdbackup.bitmap.core import Bitmap
from nbdbackup.blockdev.base import FilterDev
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.memory import PAGE, MemoryDev

CS = 64 * 1024
GiB = 1 << 30


def read(dev: MemoryDev, off: int, n: int) -> bytes:
    b = bytearray(n)
    dev.read_sync(memoryview(b), off)
    return bytes(b)


def make(size: int, data_at: list[int], stale: tuple[int, ...] = ()):
    """A sparse source with a random cluster at each of ``data_at``, a target
    holding old bytes (``\xee``) at each of ``stale`` (so not assumed zero)."""
    src = MemoryDev(size)
    blobs = {}
    for off in data_at:
        blobs[off] = os.urandom(CS)
        src.write_sync(blobs[off], off)
    tgt = MemoryDev(size)
    for off in stale:
        tgt.write_sync(b"\xee" * CS, off)
    fsrc, ftgt = FaultDev(src), FaultDev(tgt)
    st = CopyState(fsrc, ftgt, CS)
    st.set_pump_todo(Bitmap(st.nclusters, fill=True))
    return st, src, tgt, fsrc, ftgt, blobs


def pump_of(st: CopyState, chunk_clusters: int = 16) -> Pump:
    async def gate() -> bool:
        return True

    async def on_error(e, start, count) -> str:
        raise e

    return Pump(st, max_workers=4, max_chunk_clusters=chunk_clusters, limiter=RateLimiter(0),
                gate=gate, on_error=on_error)


def test_sparse_full_copy_is_exact_and_costs_requests_per_run_not_per_chunk():
    async def main():
        size = 4 * GiB + 3 * CS + 4096  # a short last cluster, inside a hole
        data_at = [0, 5 * CS, GiB + 7 * CS, 3 * GiB]
        # Stale bytes in the target where the source has holes: must become zeros.
        st, src, tgt, fsrc, ftgt, blobs = make(size, data_at, stale=(CS, 2 * GiB, size - 4096 - CS))
        assert not st.target_zero
        await pump_of(st).run()
        assert st.pump_todo.count() == 0 and st.done.count() == st.nclusters and not st.inflight
        for off, blob in blobs.items():
            assert read(tgt, off, CS) == blob
        for off in (CS, 2 * GiB, size - 4096 - CS):
            assert read(tgt, off, CS) == bytes(CS), off
        assert read(tgt, size - 4096, 4096) == bytes(4096)
        writes = [c for c in ftgt.calls if c[0] == "write"]
        # 4 GiB in 1 MiB chunks was 4096+ requests; now about one per data
        # cluster and one per (at most 1 GiB) zero run between them.
        assert len(writes) <= 20, len(writes)
        assert st.clusters_skipped_zero >= st.nclusters - len(data_at)
        assert st.current == st.total == size
        # Every byte of the target was written exactly once (no overlap, no gap).
        spans = sorted((off, n) for _, off, n in writes)
        pos = 0
        for off, n in spans:
            assert off == pos, (off, pos)
            pos = off + n
        assert pos == size
    asyncio.run(main())


def test_stale_zero_map_never_copies_a_done_cluster_again():
    """The zero map is learned once; a live write afterwards makes its cluster
    done through copy-before-write (point-in-time zeros in the target), then
    changes the source.  The pump's long zero claims must stop at that done
    cluster, never write it again, and leave the point-in-time zeros."""
    async def main():
        size = GiB
        st, src, tgt, fsrc, ftgt, blobs = make(size, [0])
        pump = pump_of(st)
        await pump._learn(0)
        assert pump._zero_run_end(1, 1) == st.nclusters
        hit = 1000 * CS
        await st.protect(hit, CS)  # copy-before-write of a hole: zeros
        src.write_sync(b"\x5a" * CS, hit)  # the live write itself
        n_before = len(ftgt.calls)
        await pump.run()
        after = [(off, n) for op, off, n in ftgt.calls[n_before:] if op == "write"]
        assert all(off + n <= hit or off >= hit + CS for off, n in after), after
        assert read(tgt, hit, CS) == bytes(CS)
        assert read(tgt, 0, CS) == blobs[0]
        # rule 7: the CBW of a source hole copies nothing; it zeroes the (in-set) target cluster
        assert st.done.count() == st.nclusters and st.bytes_copied_by_cbw == 0
        assert st.clusters_zero_in_snapshot == 1
        assert st.bytes_copied_by_pump == size - CS
    asyncio.run(main())


def test_source_without_extents_is_copied_the_plain_way():
    async def main():
        size = 64 * CS
        st, src, tgt, fsrc, ftgt, blobs = make(size, [3 * CS])

        async def no_extents(offset, length, context="base:allocation"):
            raise OSError(95, "no block status here")

        fsrc.extents = no_extents
        await pump_of(st, chunk_clusters=4).run()
        assert read(tgt, 3 * CS, CS) == blobs[3 * CS]
        assert len([c for c in fsrc.calls if c[0] == "read"]) == 16  # 64 clusters / 4
    asyncio.run(main())


def test_claims_run_map():
    async def main():
        loop = asyncio.get_running_loop()
        a, b = loop.create_future(), loop.create_future()
        c = Claims()
        assert not c and c.get(5) is None and c.next_start(0, 100) == 100
        c.add(10, 5, a)
        c.add(20, 1, b)
        assert c and 10 in c and 14 in c and 15 not in c and 9 not in c
        assert c.get(12) is a and c[20] is b and c.get(21) is None
        assert c.next_start(0, 100) == 10 and c.next_start(11, 100) == 20 and c.next_start(21, 100) == 100
        assert c.next_start(11, 18) == 18
        c.extend(10, 10)  # up to 20, where b starts
        assert 19 in c and c.get(19) is a and len(c) == 11
        assert sorted(map(id, c.values())) == sorted([id(a), id(b)])
        c.remove(10, b)  # not b's run: kept
        assert 10 in c
        c.remove(10, a)
        assert 10 not in c and 19 not in c and 20 in c
        c.remove(20, b)
        assert not c and len(c) == 0
    asyncio.run(main())


# -- a target that reads as zeros (copystate rule 11) ---------------------------


class CountingTarget(MemoryDev):
    """A plain `MemoryDev` (so `reads_zero` recognises it) counting zero requests."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.zeros: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []

    async def zero(self, offset, length, *, may_trim=False, fua=False, fast=False):
        self.zeros.append((offset, length))
        await super().zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def pwrite(self, buf, offset, *, fua=False):
        self.writes.append((offset, len(buf)))
        await super().pwrite(buf, offset, fua=fua)


def test_reads_zero_probe(tmp_path):
    async def main():
        m = MemoryDev(GiB)
        assert reads_zero(m, GiB)
        m.write_sync(b"\x01", GiB - 1)
        assert not reads_zero(m, GiB)
        assert reads_zero(m, GiB - PAGE)  # data only past the source's size
        assert reads_zero(FaultDev(MemoryDev(GiB)), GiB)  # keeps bytes as they are
        assert not reads_zero(FilterDev(MemoryDev(GiB)), GiB)  # a filter may transform: unknown
        path = str(tmp_path / "t.raw")
        f = FileDev(path, create_size=GiB)
        try:
            assert reads_zero(f, GiB)
            await f.pwrite(b"\x02" * 4096, GiB // 2)
            assert not reads_zero(f, GiB)
            assert reads_zero(f, GiB // 4)
        finally:
            await f.close()
    asyncio.run(main())


def test_zero_target_sparse_full_copy_writes_only_data_one_claim_per_run():
    """Into a target that reads as zeros, source holes cost no request and a
    zero run is one claim however long (no 1 GiB cut); the copy is exact."""
    async def main():
        size = 8 * GiB + 3 * CS + 4096
        data_at = [0, 5 * CS, GiB + 7 * CS, 3 * GiB, 7 * GiB + CS]
        src = MemoryDev(size)
        blobs = {}
        for off in data_at:
            blobs[off] = os.urandom(CS)
            src.write_sync(blobs[off], off)
        tgt = CountingTarget(size)
        st = CopyState(src, tgt, CS)
        assert st.target_zero
        st.set_pump_todo(Bitmap(st.nclusters, fill=True))
        pump = pump_of(st)
        copies = []
        orig = st.copy

        async def counted(start, count, by, **kw):
            copies.append((start, count, kw.get("source_zero", False)))
            return await orig(start, count, by, **kw)

        st.copy = counted
        await pump.run()
        assert st.done.count() == st.nclusters and st.pump_todo.count() == 0 and not st.inflight
        assert tgt.zeros == [], tgt.zeros[:5]
        assert sorted(tgt.writes) == [(off, CS) for off in data_at]
        for off, blob in blobs.items():
            assert read(tgt, off, CS) == blob
        assert set(tgt.pages) == {off // PAGE for off in data_at}
        # A chunk (16 clusters) at each data cluster, then ONE claim over the
        # whole zero run up to the next data cluster (not 1 GiB pieces).
        firsts = sorted({off // CS for off in data_at} - {5})  # cluster 5 is in the chunk at 0
        assert [(s, c) for s, c, z in copies if not z] == [(f, 16) for f in firsts]
        assert [(s, s + c) for s, c, z in copies if z] == [
            (f + 16, nxt) for f, nxt in zip(firsts, firsts[1:] + [st.nclusters])]
        assert st.current == st.total == size
        assert st.clusters_skipped_zero == st.nclusters - len(data_at)
    asyncio.run(main())


def test_zero_target_with_a_speed_limit_keeps_the_1gib_cut():
    """A limited job still pays its zero runs in <= 1 GiB claims (pacing),
    but writes nothing for them."""
    async def main():
        size = 3 * GiB
        src = MemoryDev(size)
        src.write_sync(b"\x01" * CS, 0)
        tgt = CountingTarget(size)
        st = CopyState(src, tgt, CS)
        st.set_pump_todo(Bitmap(st.nclusters, fill=True))
        pump = pump_of(st)
        pump.limiter = RateLimiter(1 << 50)  # limited, but never sleeps
        copies = []
        orig = st.copy

        async def counted(start, count, by, **kw):
            copies.append(count)
            return await orig(start, count, by, **kw)

        st.copy = counted
        await pump.run()
        assert tgt.zeros == [] and tgt.writes == [(0, CS)]
        assert max(copies) <= GiB // CS and len(copies) >= 4
    asyncio.run(main())


def test_target_with_stale_bytes_is_not_assumed_zero():
    async def main():
        size = GiB
        src = MemoryDev(size)
        tgt = CountingTarget(size)
        tgt.write_sync(b"\xee" * CS, 100 * CS)
        st = CopyState(src, tgt, CS)
        assert not st.target_zero
        st.set_pump_todo(Bitmap(st.nclusters, fill=True))
        await pump_of(st).run()
        assert tgt.zeros and read(tgt, 100 * CS, CS) == bytes(CS)
    asyncio.run(main())


class CountingPages(dict):
    """A page dict that counts lookups (a cost probe for `MemoryDev`)."""

    lookups = 0

    def __contains__(self, k):
        CountingPages.lookups += 1
        return super().__contains__(k)

    def get(self, k, default=None):
        CountingPages.lookups += 1
        return super().get(k, default)

    def pop(self, k, *default):
        CountingPages.lookups += 1
        return super().pop(k, *default)


def test_memory_dev_extents_and_zero_cost_follows_the_pages():
    """A 64 GiB memory disk (1 Mi pages) with 3 pages: extents and a whole-disk
    zero look at the allocated pages, not at every page of the range."""
    size = 64 * GiB
    m = MemoryDev(size)
    m.pages = CountingPages()
    for off in (PAGE, 10 * GiB, size - PAGE):
        m.write_sync(b"\x07" * PAGE, off)
    CountingPages.lookups = 0
    ex = m.extents_now(0, size)
    assert [(e.offset, e.length, e.flags) for e in ex] == [
        (0, PAGE, 3), (PAGE, PAGE, 0), (2 * PAGE, 10 * GiB - 2 * PAGE, 3), (10 * GiB, PAGE, 0),
        (10 * GiB + PAGE, size - 2 * PAGE - 10 * GiB, 3), (size - PAGE, PAGE, 0)]
    ex = m.extents_now(PAGE + 5, 10 * GiB, "qemu:allocation-depth")
    assert [(e.offset, e.length, e.flags) for e in ex] == [
        (PAGE + 5, PAGE - 5, 1), (2 * PAGE, 10 * GiB - 2 * PAGE, 0), (10 * GiB, PAGE, 1),
        (10 * GiB + PAGE, 5, 0)]
    m.zero_sync(100, size - 200)  # keeps the partial edge pages, drops the rest
    assert CountingPages.lookups < 100, CountingPages.lookups
    assert sorted(m.pages) == [size // PAGE - 1]  # the partly zeroed last page stays
    assert read(m, size - PAGE, PAGE) == bytes(PAGE - 100) + b"\x07" * 100
    ex = m.extents_now(0, size)
    assert [(e.offset, e.length, e.flags) for e in ex] == [(0, size - PAGE, 3), (size - PAGE, PAGE, 0)]
