"""A write in flight when a backup takes its point in time (`blockdev.live` "Quiescing").

A write that took the live device's hook list before copy-before-write was
attached, and is still in the device (a large write on the file thread pool),
would land after the point in time without passing copy-before-write: the
snapshot would change under its reader, and the dirty bitmap frozen at that
instant (which already counted the write) would make the next incremental
miss it.  `backup-start` and `transaction` therefore wait for such writes
(and hold new ones) around their synchronous commit.  Memory devices, no I/O.
"""

from __future__ import annotations

import asyncio

import pytest

from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.backup.testing import FaultDev
from nbdbackup.bitmap.manager import BitmapManager
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.memory import MemoryDev

CS = 64 * 1024
SIZE = 8 * CS


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def read(dev, off: int, n: int):
    async def go():
        buf = bytearray(n)
        await dev.pread(memoryview(buf), off)
        return bytes(buf)
    return go()


class Hook:
    def __init__(self) -> None:
        self.seen: list[int] = []

    async def before_write(self, offset: int, length: int) -> None:
        self.seen.append(offset)

    async def on_durable(self) -> None:
        pass


def test_quiesce_waits_for_writes_in_flight_and_holds_new_ones():
    async def main():
        slow = FaultDev(MemoryDev(SIZE))
        slow.gate = asyncio.Event()
        slow.gate_ops = ("write",)
        live = LiveDev(slow)
        w1 = asyncio.create_task(live.pwrite(b"\x01" * CS, 0))  # held in the device
        await asyncio.sleep(0.01)
        entered = asyncio.Event()
        hook = Hook()

        async def attach():
            async with live.quiesce():
                entered.set()
                live.add_hook(hook)  # the point in time
                await asyncio.sleep(0.02)

        q = asyncio.create_task(attach())
        await asyncio.sleep(0.02)
        assert not entered.is_set()  # w1 is still in flight
        slow.gate.set()
        await entered.wait()
        assert w1.done()
        w2 = asyncio.create_task(live.pwrite(b"\x02" * CS, CS))  # arrives while quiesced: waits
        await asyncio.sleep(0.005)
        assert not w2.done() and hook.seen == []
        await q
        await w2
        assert hook.seen == [CS]  # it took the hook list after the attach

    run(main())


def test_quiesce_times_out_with_ebusy():
    async def main():
        slow = FaultDev(MemoryDev(SIZE))
        slow.gate = asyncio.Event()
        slow.gate_ops = ("write",)
        live = LiveDev(slow)
        w = asyncio.create_task(live.zero(0, CS))
        await asyncio.sleep(0.01)
        with pytest.raises(OSError) as e:
            async with live.quiesce(timeout=0.05):
                pass
        assert "in flight" in str(e.value)
        # The gate is open again: writes go on.
        slow.gate.set()
        await w
        await asyncio.wait_for(live.trim(0, CS), 1)

    run(main())


@pytest.mark.parametrize("via", ["backup-start", "transaction"])
def test_a_write_in_flight_at_the_point_in_time_is_before_it(via):
    """Without the quiesce the backup starts at once; the held write then lands
    without copy-before-write and the snapshot export changes under its reader."""

    async def main():
        mem = MemoryDev(SIZE)
        mem.write_sync(b"\x11" * SIZE, 0)
        slow = FaultDev(mem)
        slow.gate = asyncio.Event()
        slow.gate_ops = ("write",)
        table = MemoryExportTable()
        mgr = BitmapManager()
        live = mgr.wrap("disk", slow)
        table.add("disk", live, read_only=False)
        engine = Engine(table, lambda n, d: None)
        mgr.engine = engine
        await mgr.add("disk", "b0")
        w = asyncio.create_task(live.pwrite(b"\x22" * CS, 2 * CS))  # marked in b0, held in the device
        await asyncio.sleep(0.01)
        if via == "backup-start":
            start = asyncio.create_task(engine.backup_start("disk", "j", "none", "memory:%d" % SIZE,
                                                            snapshot="s"))
        else:
            start = asyncio.create_task(mgr.transaction([
                {"type": "block-dirty-bitmap-disable", "data": {"export": "disk", "name": "b0"}},
                {"type": "block-dirty-bitmap-add", "data": {"export": "disk", "name": "b1"}},
                {"type": "backup-start", "data": {"export": "disk", "job-id": "j", "sync": "none",
                                                  "target": "memory:%d" % SIZE, "snapshot": "s"}}]))
        await asyncio.sleep(0.05)
        assert not start.done(), "the backup took its point in time with a write in flight"
        slow.gate.set()
        await w
        await start
        snap = engine.jobs["j"].snapshot
        first = await read(snap, 2 * CS, CS)
        assert first == b"\x22" * CS  # the write is before the point in time ...
        await live.pwrite(b"\x33" * CS, 2 * CS)  # ... and a later one is copied before it lands
        assert await read(snap, 2 * CS, CS) == first
        if via == "transaction":
            reg = mgr.lookup("disk")
            assert reg.get("b0").dirty_count() == CS and reg.get("b1").dirty_count() == CS

    run(main())


# -- "Offloadable again" (blockdev.live): the signal that sends connections back to workers


def test_offload_listener_hears_a_hook_removed_a_quiesce_over_and_the_last_bitmap_removed():
    async def main():
        live = LiveDev(MemoryDev(SIZE))
        heard: list[bool] = []
        live.set_offload_listener(lambda: heard.append(live.offload_ok()))
        hook = Hook()  # not idle (no idle()): blocks offloading while attached
        live.add_hook(hook)
        live.remove_hook(hook)
        assert heard == [True]
        live.remove_hook(hook)  # not attached: nothing changed, nothing said
        assert heard == [True]
        async with live.quiesce():
            assert not live.offload_ok()
            assert heard == [True]
        assert heard == [True, True]
        # A quiesce that attaches a hook ends not offloadable: no signal.
        async with live.quiesce():
            live.add_hook(hook)
        assert heard == [True, True]
        # Removing one hook while another non-idle one stays: no signal.
        other = Hook()
        live.add_hook(other)
        live.remove_hook(hook)
        assert heard == [True, True]
        live.remove_hook(other)
        assert heard == [True, True, True]

        # The dirty hook turns idle when its registry loses its last bitmap.
        manager = BitmapManager(None)
        blive = manager.wrap("disk", MemoryDev(SIZE))
        said: list[bool] = []
        blive.set_offload_listener(lambda: said.append(blive.offload_ok()))
        await manager.add("disk", "a")
        await manager.add("disk", "b")
        await manager.remove("disk", "a")
        assert said == []  # "b" is left: the hook is not idle
        await manager.remove("disk", "b")
        assert said == [True]
    run(main())
