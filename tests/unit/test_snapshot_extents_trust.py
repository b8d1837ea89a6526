"""The snapshot's block status asks a copy's device only when its allocation is exact.

A device whose ``Capabilities.sparse_reads`` is False (a remote NBD target or
scratch: its ``base:allocation`` may lag its writes, docs/doubts18.md item 1)
is never asked about the clusters copied there: they are data.  A device that
may be trusted (a file, memory) is asked, so a sparse copy stays sparse, and
clusters known to be zeros stay HOLE|ZERO without asking anyone.  Both the
task-free `extents_now` and the awaited `extents` follow the rule.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest

from nbdbackup.backup.copystate import CopyState
from nbdbackup.backup.snapshot import SnapshotDev
from nbdbackup.blockdev.base import BASE_ALLOCATION, HOLE_ZERO, Capabilities, Extent, FilterDev
from nbdbackup.blockdev.memory import MemoryDev

CS = 4096
N = 16


class LyingDev(FilterDev):
    """Memory that calls everything "hole, zero" (as nbdkit's writeback cache does for
    data not yet flushed); ``exact`` is what it claims in ``sparse_reads``."""

    same_bytes = True

    def __init__(self, inner: MemoryDev, exact: bool) -> None:
        super().__init__(inner)
        self.exact = exact
        self.asked = 0

    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.inner.capabilities(), sparse_reads=self.exact)

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        self.asked += 1
        return [Extent(offset, length, HOLE_ZERO)]


class SlowSource(FilterDev):
    """A source with no task-free block status: the snapshot takes its awaited path."""

    same_bytes = True

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        return await self.inner.extents(offset, length, context)


def zero_bytes(extents: list[Extent]) -> int:
    return sum(e.length for e in extents if e.flags & 2)


@pytest.mark.parametrize("slow_source", [False, True])
@pytest.mark.parametrize("kind", ["target", "scratch"])
@pytest.mark.parametrize("exact", [False, True])
def test_copied_clusters_on_an_inexact_device_are_data(kind, exact, slow_source):
    async def main():
        mem = MemoryDev(N * CS)
        mem.write_sync(os.urandom(N * CS), 0)
        src = SlowSource(mem) if slow_source else mem
        lying = LyingDev(MemoryDev(N * CS), exact)
        if kind == "target":
            st = CopyState(src, lying, CS)
        else:
            st = CopyState(src, MemoryDev(N * CS), CS, scratch=lying)
        await st.protect(2 * CS, 4 * CS)  # clusters 2-5 copied (to the target, or the scratch)
        assert {st.where(c) for c in range(2, 6)} == {kind}
        st.done.set(8, 2)  # clusters 8-9: known zeros, stored nowhere
        st.zeroed.set(8, 2)
        snap = SnapshotDev(st)
        now = snap.extents_now(0, N * CS)
        assert (now is None) == (exact or slow_source)
        awaited = await snap.extents(0, N * CS)
        for got in (awaited,) if now is None else (now, awaited):
            if exact:  # the device is asked, and believed
                assert zero_bytes(got) == 6 * CS
            else:  # copied: data; known zeros: still HOLE|ZERO
                assert zero_bytes(got) == 2 * CS
                assert [e for e in got if e.offset <= 2 * CS < e.end][0].flags == 0
        assert (lying.asked > 0) == exact
    asyncio.run(main())


class LaggingSource(FilterDev):
    """A source whose allocation lags its writes (``sparse_reads`` False): records the
    order of its FLUSHes and extents queries.  (Not ``same_bytes``: the FLUSH goes to the
    device below the live export's filters, `copystate._innermost`, here this one.)"""

    same_bytes = False

    def __init__(self, inner: MemoryDev, exact: bool) -> None:
        super().__init__(inner)
        self.exact = exact
        self.calls: list[str] = []

    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.inner.capabilities(), sparse_reads=self.exact)

    async def flush(self) -> None:
        self.calls.append("flush")
        await asyncio.sleep(0.01)
        self.calls.append("flushed")

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        self.calls.append("extents")
        return [Extent(offset, length, 0)]


@pytest.mark.parametrize("exact", [False, True])
def test_a_lagging_source_is_flushed_once_before_its_allocation_is_trusted(exact):
    """`CopyState.source_extents`: one FLUSH, completed before the first answer, shared
    by concurrent askers (CBW, the pump, the snapshot); none for an exact source."""
    async def main():
        src = LaggingSource(MemoryDev(N * CS), exact)
        st = CopyState(src, MemoryDev(N * CS), CS)
        await asyncio.gather(*(st.source_extents(i * CS, CS) for i in range(4)))
        await st.source_extents(0, N * CS)
        if exact:
            assert src.calls == ["extents"] * 5
        else:
            assert src.calls == ["flush", "flushed"] + ["extents"] * 5
        # The snapshot's block status of source clusters goes through it too.
        src.calls.clear()
        await SnapshotDev(st).extents(0, N * CS)
        assert src.calls == ["extents"]
    asyncio.run(main())
