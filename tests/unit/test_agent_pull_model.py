"""Property test of the pull agent's copy logic, in memory (no I/O).

Hypothesis builds a disk A (data, zero-filled data, holes; sizes that leave
a short last chunk), pulls it fully, changes it into B (writes, zeroed and
trimmed ranges), reports the changed 64 KiB clusters -- plus some unchanged
ones, since a dirty bitmap may over-report -- as ``qemu:dirty-bitmap:b``,
and pulls incrementally onto the first copy.  After each pull the target
must equal the source byte for byte, the manifest must equal one computed
from the source directly (`manifest_of`), and the incremental pull must not
read more than the dirty clusters.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdbackup.agent.pull import manifest_of, pull
from nbdbackup.blockdev.base import BASE_ALLOCATION, BlockDev, Capabilities, Extent
from nbdbackup.blockdev.memory import MemoryDev

CL = 64 * 1024  # bitmap granularity (= MemoryDev's page)


class DirtySource(BlockDev):
    """A MemoryDev plus a ``qemu:dirty-bitmap:b`` context marking ``dirty`` clusters."""

    def __init__(self, mem: MemoryDev, dirty: set[int]) -> None:
        self.mem, self.dirty = mem, dirty

    @property
    def size(self) -> int:
        return self.mem.size

    def capabilities(self) -> Capabilities:
        return self.mem.capabilities()

    def meta_contexts(self) -> Sequence[str]:
        return (BASE_ALLOCATION, "qemu:dirty-bitmap:b")

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.mem.pread(buf, offset)

    async def pwrite(self, buf, offset: int, *, fua: bool = False) -> None:
        raise OSError(30, "read-only")

    async def flush(self) -> None:
        pass

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        if context == BASE_ALLOCATION:
            return await self.mem.extents(offset, length, context)
        out: list[Extent] = []
        end = offset + length
        for c in range(offset // CL, -(-end // CL)):
            s, e = max(offset, c * CL), min(end, (c + 1) * CL)
            f = 1 if c in self.dirty else 0
            if out and out[-1].flags == f and out[-1].end == s:
                out[-1] = Extent(out[-1].offset, out[-1].length + e - s, f)
            else:
                out.append(Extent(s, e - s, f))
        return out


def disk_bytes(dev: MemoryDev) -> bytes:
    buf = bytearray(dev.size)
    dev.read_sync(memoryview(buf), 0)
    return bytes(buf)


change = st.tuples(st.sampled_from(["write", "zero", "trim"]), st.integers(0, 10**9), st.integers(1, 3 * CL),
                   st.integers(0, 255))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(1, 40).map(lambda k: k * 4096 * 3),
       chunk=st.sampled_from([CL, 2 * CL, 4 * CL, 4096 * 4]),
       before=st.lists(change, max_size=8), after=st.lists(change, min_size=1, max_size=8),
       extra=st.sets(st.integers(0, 100), max_size=3))
def test_full_then_incremental_pull_reproduces_the_source(size, chunk, before, after, extra):
    def apply(mem: MemoryDev, ops) -> set[int]:
        touched: set[int] = set()
        for kind, off, n, byte in ops:
            off %= size
            n = min(n, size - off)
            if kind == "write":
                mem.write_sync(bytes([byte]) * n, off)
            else:
                mem.zero_sync(off, n)  # zero and trim both read back as zeroes
            touched.update(range(off // CL, -(-(off + n) // CL)))
        return touched

    async def main() -> None:
        a = MemoryDev(size)
        apply(a, before)
        target = MemoryDev(size)
        # One worker: its one chunk buffer is reused for every chunk, so
        # bytes a chunk does not read must be cleared, never left over.
        man, st_full = await pull(DirtySource(a, set()), target, fresh=True, chunk_size=chunk, workers=1)
        assert disk_bytes(target) == disk_bytes(a)
        assert man.chunks == (await manifest_of(a, chunk)).chunks
        touched = apply(a, after)  # a is now B
        ncl = -(-size // CL)
        dirty = touched | {x % ncl for x in extra}
        man2, st_inc = await pull(DirtySource(a, dirty), target, bitmap="b", chunk_size=chunk, workers=3,
                                  base=man)
        assert disk_bytes(target) == disk_bytes(a)
        assert man2.chunks == (await manifest_of(a, chunk)).chunks
        assert st_inc.bytes_read + st_inc.bytes_zeroed <= len(dirty) * CL
        assert st_full.bytes_zeroed == 0  # a fresh target needs no zeroing
        # The same incremental into a sink reading each touched chunk whole (the backup agent's
        # default): no target read, the chunks the sink gets are B's, the manifest is B's.
        got: dict[int, bytes] = {}

        async def sink(i: int, d: bytes, data: memoryview) -> None:
            got[i] = bytes(data)

        b_bytes = disk_bytes(a)
        man3, st_w = await pull(DirtySource(a, dirty), None, dirty=[(c * CL, min(CL, size - c * CL))
                                                                    for c in sorted(dirty)],
                                read_whole=True, chunk_size=chunk, workers=3, base=man, sink=sink)
        assert man3.chunks == man2.chunks
        touched_chunks = {i for c in dirty for i in man3.chunks_of(c * CL, min(CL, size - c * CL))}
        assert set(got) == touched_chunks and st_w.chunks_worked == len(touched_chunks)
        for i, data in got.items():
            o, n = man3.chunk_range(i)
            assert data == b_bytes[o:o + n]
        assert st_w.bytes_read <= sum(man3.chunk_range(i)[1] for i in touched_chunks)

    asyncio.run(main())


def test_incremental_without_base_manifest_hashes_the_target():
    async def main() -> None:
        a = MemoryDev(8 * CL)
        a.write_sync(b"\x11" * (8 * CL), 0)
        target = MemoryDev(8 * CL)
        await pull(DirtySource(a, set()), target, fresh=True, chunk_size=2 * CL)
        a.write_sync(b"\x22" * 100, 5 * CL + 7)
        man, st_ = await pull(DirtySource(a, {5}), target, bitmap="b", chunk_size=2 * CL)
        assert st_.bytes_read == CL and st_.chunks_worked == 1
        assert man.chunks == (await manifest_of(a, 2 * CL)).chunks
        assert disk_bytes(target) == disk_bytes(a)

    asyncio.run(main())
