"""The synchronous read fast paths (`pread_now`, `extents_now`) never bypass a filter."""

from __future__ import annotations

from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.base import BASE_ALLOCATION, HOLE_ZERO, FilterDev
from nbdbackup.blockdev.memory import MemoryDev


class Upper(FilterDev):
    """A filter that changes what reads return."""

    async def pread(self, buf, offset):
        await self.inner.pread(buf, offset)
        buf[:] = bytes(buf).upper()


class NoHoles(FilterDev):
    async def extents(self, offset, length, context=BASE_ALLOCATION):
        return await super().extents(offset, length, context)


def test_memory_and_plain_filters_read_now():
    mem = MemoryDev(1 << 20)
    mem.write_sync(b"abc", 4096)
    for dev in (mem, FilterDev(mem), LiveDev(mem)):
        buf = bytearray(3)
        assert dev.pread_now(memoryview(buf), 4096) and buf == b"abc"
        ext = dev.extents_now(0, 1 << 20)
        assert ext is not None and [(e.offset, e.length, e.flags) for e in ext] == [
            (0, 65536, 0), (65536, (1 << 20) - 65536, HOLE_ZERO)]


def test_a_filter_that_changes_reads_is_never_bypassed():
    mem = MemoryDev(1 << 20)
    mem.write_sync(b"abc", 0)
    buf = bytearray(3)
    assert not Upper(mem).pread_now(memoryview(buf), 0)
    assert not LiveDev(Upper(mem)).pread_now(memoryview(buf), 0)  # nor from above
    assert NoHoles(mem).extents_now(0, 4096) is None
