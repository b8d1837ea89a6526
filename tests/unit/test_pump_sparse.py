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

from nbdbackup.backup.copystate import Claims, CopyState
from nbdbackup.backup.pump import Pump, RateLimiter
from nbdbackup.backup.testing import FaultDev
from nbdbackup.bitmap.core import Bitmap
from nbdbackup.blockdev.memory import MemoryDev

CS = 64 * 1024
GiB = 1 << 30


def read(dev: MemoryDev, off: int, n: int) -> bytes:
    b = bytearray(n)
    dev.read_sync(memoryview(b), off)
    return bytes(b)


def make(size: int, data_at: list[int]):
    src = MemoryDev(size)
    blobs = {}
    for off in data_at:
        blobs[off] = os.urandom(CS)
        src.write_sync(blobs[off], off)
    tgt = MemoryDev(size)
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
        st, src, tgt, fsrc, ftgt, blobs = make(size, data_at)
        # Stale bytes in the target where the source has holes: must become zeros.
        stale = b"\xee" * CS
        for off in (CS, 2 * GiB, size - 4096 - CS):
            tgt.write_sync(stale, off)
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
