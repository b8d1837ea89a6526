"""LiveDev write hooks: order, failure, durability callbacks, no-hook fast path."""

from __future__ import annotations

import asyncio
import errno

import pytest

from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.memory import MemoryDev


class Recorder:
    def __init__(self, log, name, dev=None, fail=None):
        self.log, self.name, self.dev, self.fail = log, name, dev, fail

    async def before_write(self, offset, length):
        await asyncio.sleep(0)
        if self.dev is not None:
            # The ordering invariant: the data has not reached the device yet.
            b = bytearray(1)
            self.dev.read_sync(memoryview(b), offset)
            self.log.append((self.name, "before", offset, length, b[0]))
        else:
            self.log.append((self.name, "before", offset, length))
        if self.fail:
            raise OSError(self.fail, "hook says no")

    async def on_durable(self):
        self.log.append((self.name, "durable"))


class AfterRecorder(Recorder):
    def after_write(self, offset, length):
        self.log.append((self.name, "after", offset, length))


def test_hooks_run_in_order_before_the_device():
    async def main():
        mem = MemoryDev(1 << 20)
        live = LiveDev(mem)
        log = []
        a, b = Recorder(log, "a", mem), AfterRecorder(log, "b", mem)
        live.add_hook(a)
        live.add_hook(b)
        await live.pwrite(b"\x07" * 10, 100)
        assert log == [("a", "before", 100, 10, 0), ("b", "before", 100, 10, 0), ("b", "after", 100, 10)]
        log.clear()
        await live.zero(0, 4096, fua=True)
        assert log[:2] == [("a", "before", 0, 4096, 0), ("b", "before", 0, 4096, 0)]
        assert log[2:] == [("b", "after", 0, 4096), ("a", "durable"), ("b", "durable")]
        log.clear()
        await live.trim(4096, 4096)
        assert [x[:2] for x in log] == [("a", "before"), ("b", "before"), ("b", "after")]
        log.clear()
        await live.flush()
        assert log == [("a", "durable"), ("b", "durable")]
        live.remove_hook(a)
        log.clear()
        await live.pwrite(b"x", 0)
        assert [x[0] for x in log] == ["b", "b"]
    asyncio.run(main())


def test_failing_hook_stops_the_write():
    async def main():
        mem = MemoryDev(1 << 16)
        live = LiveDev(mem)
        log = []
        live.add_hook(Recorder(log, "a", fail=errno.ENOSPC))
        after = AfterRecorder(log, "b")
        live.add_hook(after)
        with pytest.raises(OSError) as ei:
            await live.pwrite(b"\x01" * 4, 0, fua=True)
        assert ei.value.errno == errno.ENOSPC
        assert log == [("a", "before", 0, 4)]  # b never called, no after, no durable
        b = bytearray(4)
        mem.read_sync(memoryview(b), 0)
        assert b == bytes(4)
    asyncio.run(main())


def test_no_hooks_goes_straight_through():
    async def main():
        mem = MemoryDev(1 << 16)
        live = LiveDev(mem)
        assert live.hooks == ()
        await live.pwrite(b"abc", 10)
        b = bytearray(3)
        await live.pread(memoryview(b), 10)
        assert b == b"abc"
        assert live.size == mem.size and live.meta_contexts() == mem.meta_contexts()
    asyncio.run(main())


def test_hook_list_change_during_write_does_not_affect_it():
    async def main():
        mem = MemoryDev(1 << 16)
        live = LiveDev(mem)
        log = []
        a = Recorder(log, "a")
        live.add_hook(a)
        t = asyncio.create_task(live.pwrite(b"x", 0))
        await asyncio.sleep(0)
        live.add_hook(AfterRecorder(log, "late"))
        await t
        assert log == [("a", "before", 0, 1)]
        with pytest.raises(AssertionError):
            live.add_hook(a)
    asyncio.run(main())
