"""The task-free write path (`pwrite_now`): taken only when nothing must wait.

Devices (memory, file, filters), `LiveDev` with hooks that can or cannot
finish synchronously, the dirty-bitmap hook (marks before the write), and
copy-before-write (an undone cluster or a snapshot reader forces the async
path, and the snapshot stays point-in-time).  No I/O except `FileDev` on a
temporary file.
"""

from __future__ import annotations

import asyncio

from nbdbackup.backup.cbw import CBWHook
from nbdbackup.backup.copystate import CopyState
from nbdbackup.bitmap.dirty import BitmapRegistry
from nbdbackup.bitmap.hook import BitmapLiveDev, DirtyHook
from nbdbackup.blockdev.base import FilterDev
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.memory import MemoryDev

CS = 64 * 1024
SIZE = 16 * CS


def read(dev: MemoryDev, offset: int, n: int) -> bytes:
    b = bytearray(n)
    dev.read_sync(memoryview(b), offset)
    return bytes(b)


class Waits:
    """A hook whose work is async only (no ``before_write_now``)."""

    def __init__(self, log):
        self.log = log

    async def before_write(self, offset, length):
        await asyncio.sleep(0)
        self.log.append(("before", offset, length))

    async def on_durable(self):
        pass


class Says(Waits):
    """A hook with ``before_write_now`` returning ``self.ok``."""

    def __init__(self, log, ok):
        super().__init__(log)
        self.ok = ok

    def before_write_now(self, offset, length):
        self.log.append(("now", offset, length, self.ok))
        return self.ok

    def after_write(self, offset, length):
        self.log.append(("after", offset, length))


class Writes(FilterDev):
    """A filter that changes writes: never bypassed."""

    async def pwrite(self, buf, offset, *, fua=False):
        await self.inner.pwrite(bytes(buf).upper(), offset, fua=fua)


def test_memory_and_plain_filters_write_now():
    mem = MemoryDev(SIZE)
    for i, dev in enumerate((mem, FilterDev(mem), LiveDev(mem))):
        assert dev.pwrite_now(b"abc%d" % i, 4096 * i)
        assert read(mem, 4096 * i, 4) == b"abc%d" % i
    assert mem.pwrite_now(b"x", 0, fua=True)  # RAM: durable at once
    ro = MemoryDev(SIZE, read_only=True)
    assert not ro.pwrite_now(b"x", 0) and not LiveDev(ro).pwrite_now(b"x", 0)


def test_a_filter_that_changes_writes_is_never_bypassed():
    mem = MemoryDev(SIZE)
    assert not Writes(mem).pwrite_now(b"abc", 0)
    assert not LiveDev(Writes(mem)).pwrite_now(b"abc", 0)
    assert read(mem, 0, 3) == bytes(3)


def test_file_writes_now_only_inline_and_without_fua(tmp_path):
    path = str(tmp_path / "img")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    dev = FileDev(path, inline_limit=8192)
    try:
        assert dev.pwrite_now(b"a" * 8192, 0)
        assert not dev.pwrite_now(b"b" * 8193, 0)  # the pool's job
        assert not dev.pwrite_now(b"c" * 512, 0, fua=True)  # RWF_DSYNC waits for the disk
        with open(path, "rb") as f:
            assert f.read(8193) == b"a" * 8192 + b"\0"
    finally:
        asyncio.run(dev.close())
    ro = FileDev(path, read_only=True)
    try:
        assert not ro.pwrite_now(b"x", 0)
    finally:
        asyncio.run(ro.close())


def test_a_hook_that_must_wait_forces_the_async_path():
    log = []
    mem = MemoryDev(SIZE)
    live = LiveDev(mem)
    live.add_hook(Says(log, True))
    live.add_hook(Waits(log))  # no before_write_now
    assert not live.pwrite_now(b"abc", 0)
    assert read(mem, 0, 3) == bytes(3) and log == []
    asyncio.run(live.pwrite(b"abc", 0))
    assert read(mem, 0, 3) == b"abc"


def test_hooks_asked_in_order_and_any_no_means_nothing_written():
    log = []
    mem = MemoryDev(SIZE)
    live = LiveDev(mem)
    a, b = Says(log, True), Says(log, False)
    live.add_hook(a)
    live.add_hook(b)
    assert not live.pwrite_now(b"abc", 10)
    assert log == [("now", 10, 3, True), ("now", 10, 3, False)]
    assert read(mem, 10, 3) == bytes(3)
    b.ok = True
    log.clear()
    assert live.pwrite_now(b"abc", 10)
    assert log == [("now", 10, 3, True), ("now", 10, 3, True), ("after", 10, 3), ("after", 10, 3)]
    assert read(mem, 10, 3) == b"abc"


def test_fua_with_hooks_takes_the_async_path():
    # on_durable is async: a FUA write with hooks is never task-free.
    log = []
    mem = MemoryDev(SIZE)
    live = LiveDev(mem)
    live.add_hook(Says(log, True))
    assert not live.pwrite_now(b"abc", 0, fua=True)
    assert read(mem, 0, 3) == bytes(3) and log == []
    live.remove_hook(live.hooks[0])
    assert live.pwrite_now(b"abc", 0, fua=True)  # no hooks: the device decides


def test_dirty_hook_marks_before_the_write_and_counts_it_dirty():
    reg = BitmapRegistry("disk", SIZE)
    bm = reg.add("b0", CS)
    seen = []

    class Spy(MemoryDev):
        def pwrite_now(self, buf, offset, fua=False):
            # The ordering invariant: the bit is set before any byte lands.
            seen.append([(e.offset, e.length, e.flags) for e in bm.extents(offset, len(buf))])
            return super().pwrite_now(buf, offset, fua)

    spy = Spy(SIZE)
    live = BitmapLiveDev(spy, reg)
    assert isinstance(live.hook, DirtyHook)
    assert live.pwrite_now(b"x" * 4096, 3 * CS + 100)
    assert seen == [[(3 * CS + 100, 4096, 1)]]
    assert [(e.offset, e.length, e.flags) for e in bm.extents(0, SIZE)] == [
        (0, 3 * CS, 0), (3 * CS, CS, 1), (4 * CS, SIZE - 4 * CS, 0)]
    assert read(spy, 3 * CS + 100, 4096) == b"x" * 4096


def _cbw(seed: bytes = b"old!"):
    src = MemoryDev(SIZE)
    src.write_sync(seed * (SIZE // len(seed)), 0)
    tgt = MemoryDev(SIZE)
    st = CopyState(src, tgt, CS)
    live = LiveDev(src)
    live.add_hook(CBWHook(st))
    return src, tgt, st, live


def test_cbw_undone_cluster_takes_the_async_path_and_the_snapshot_stays():
    src, tgt, st, live = _cbw()
    assert not live.pwrite_now(b"N" * 4096, CS + 512)  # cluster 1 not copied yet
    assert read(src, CS, 4) == b"old!" and not st.done.get(1)
    asyncio.run(live.pwrite(b"N" * 4096, CS + 512))  # copies cluster 1 first
    assert st.done.get(1)
    assert read(tgt, CS, CS) == b"old!" * (CS // 4)  # point-in-time content
    assert read(src, CS + 512, 4096) == b"N" * 4096
    # Now the cluster is done: the next write to it needs nothing.
    assert live.pwrite_now(b"M" * 4096, CS)
    assert read(src, CS, 4096) == b"M" * 4096
    assert read(tgt, CS, CS) == b"old!" * (CS // 4)
    # A write over done and undone clusters: async again.
    assert not live.pwrite_now(b"Z" * 4096, 2 * CS - 2048)
    assert read(src, 2 * CS - 2048, 4) == b"old!" and read(src, 2 * CS, 4) == b"old!"


def test_cbw_snapshot_reader_of_a_done_cluster_forces_the_async_path():
    async def main():
        src, tgt, st, live = _cbw()
        segs = st.begin_read(0, CS)  # a snapshot read of cluster 0 (not done: from the source)
        await st.ensure_done(0, CS, "pump")  # the pump copies it meanwhile
        assert st.done.get(0) and st.readers
        assert not live.pwrite_now(b"N" * 512, 0)  # must wait for the reader
        assert read(src, 0, 4) == b"old!"
        st.end_read(segs)
        assert live.pwrite_now(b"N" * 512, 0)
        assert read(src, 0, 4) == b"NNNN" and read(tgt, 0, 4) == b"old!"

    asyncio.run(main())


def test_cbw_retired_or_broken_does_not_block_the_fast_path():
    src, tgt, st, live = _cbw()
    st.retire()
    assert live.pwrite_now(b"N" * 512, 0)
    src, tgt, st, live = _cbw()
    st.broken = OSError(5, "gone")
    assert live.pwrite_now(b"N" * 512, 0)


def test_zero_and_trim_now_follow_the_same_rules():
    log = []
    mem = MemoryDev(SIZE)
    mem.write_sync(b"d" * SIZE, 0)
    live = LiveDev(mem)
    assert live.zero_now(0, 4096) and read(mem, 0, 4096) == bytes(4096)
    assert live.trim_now(4096, 4096) and read(mem, 4096, 4096) == bytes(4096)
    hook = Says(log, False)
    live.add_hook(hook)
    assert not live.zero_now(8192, 4096) and not live.trim_now(8192, 4096)
    assert read(mem, 8192, 4) == b"dddd"
    hook.ok = True
    log.clear()
    assert not live.zero_now(8192, 4096, fua=True)  # on_durable is async
    assert live.zero_now(8192, 4096) and read(mem, 8192, 4) == bytes(4)
    assert log == [("now", 8192, 4096, True), ("after", 8192, 4096)]
    assert not LiveDev(MemoryDev(SIZE, read_only=True)).zero_now(0, 1)


def test_cbw_undone_cluster_zero_and_trim_take_the_async_path():
    src, tgt, st, live = _cbw()
    assert not live.zero_now(0, 4096) and not live.trim_now(0, 4096)
    assert read(src, 0, 4) == b"old!"
    asyncio.run(live.zero(0, 4096))
    assert read(tgt, 0, 4) == b"old!" and read(src, 0, 4) == bytes(4)
    assert live.trim_now(0, 4096)


def test_dirty_hook_marks_zero_now():
    reg = BitmapRegistry("disk", SIZE)
    bm = reg.add("b0", CS)
    live = BitmapLiveDev(MemoryDev(SIZE), reg)
    assert live.zero_now(5 * CS, 10)
    assert [(e.offset, e.length, e.flags) for e in bm.extents(5 * CS, CS)] == [(5 * CS, CS, 1)]


def test_file_zero_and_trim_now(tmp_path):
    path = str(tmp_path / "img")
    with open(path, "wb") as f:
        f.write(b"d" * SIZE)
    dev = FileDev(path)
    try:
        assert dev.zero_now(0, 8192)
        assert dev.trim_now(8192, 8192)
        assert not dev.zero_now(0, 4096, fua=True) and not dev.trim_now(0, 4096, fua=True)
        with open(path, "rb") as f:
            assert f.read(16384) == bytes(16384) and f.read(1) == b"d"
    finally:
        asyncio.run(dev.close())
