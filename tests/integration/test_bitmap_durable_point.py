"""A persistent bitmap's point in time is made durable (`BitmapManager._durable_point_lives`).

A persistent bitmap added or cleared at T (or one a backup at T freezes, whose successor counts
from T) says "what changed since the disk was as it is at T".  After a power loss that is only
true if the disk's content at T was durable: an unflushed write from before T can be lost, which
changes the disk back, and nothing counts that change.  So the disk is flushed while the writes
are held, before the bitmap exists (tests/interop/test_powercut_agent.py shows the silent
under-report without it).  Here: a FileDev that records each flush (was the device quiesced?
did the bitmap exist yet?); a file in a temporary directory, no server.
"""

from __future__ import annotations

import asyncio

from nbdbackup.bitmap.manager import BitmapManager
from nbdbackup.blockdev.file import FileDev

SIZE = 1 << 20


class RecordingFileDev(FileDev):
    """Fields: ``manager``/``live`` (set by the test); ``flushes``: per flush, (quiesced, the
    bitmap names present)."""

    manager: BitmapManager
    live = None

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.flushes: list[tuple[bool, set[str]]] = []

    async def flush(self) -> None:
        await super().flush()
        reg = self.manager.lookup("disk")
        self.flushes.append((self.live._gate is not None, {bm.name for bm in reg}))


def rig(tmp_path) -> tuple[BitmapManager, RecordingFileDev]:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(SIZE))
    mgr = BitmapManager(str(tmp_path / "state"))
    dev = RecordingFileDev(str(disk))
    dev.manager = mgr
    dev.live = mgr.wrap("disk", dev)
    return mgr, dev


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_transaction_adding_a_persistent_bitmap_flushes_while_quiesced_before_it_exists(tmp_path):
    mgr, dev = rig(tmp_path)

    async def go():
        try:
            await mgr.transaction([{"type": "block-dirty-bitmap-add",
                                    "data": {"export": "disk", "name": "n", "persistent": True}}])
            assert "n" in {bm.name for bm in mgr.lookup("disk")}
            assert dev.flushes and dev.flushes[-1] == (True, set()), dev.flushes
            # With a persistent bitmap on the export, the next transaction (disable it, add
            # another) flushes too, quiesced, before the new one exists.
            dev.flushes.clear()
            await mgr.transaction([
                {"type": "block-dirty-bitmap-disable", "data": {"export": "disk", "name": "n"}},
                {"type": "block-dirty-bitmap-add", "data": {"export": "disk", "name": "m", "persistent": True}}])
            assert dev.flushes and dev.flushes[-1] == (True, {"n"}), dev.flushes
        finally:
            await dev.live.close()

    run(go())


def test_add_and_clear_commands_flush_while_quiesced_only_for_persistent_bitmaps(tmp_path):
    mgr, dev = rig(tmp_path)

    async def go():
        try:
            await mgr.add("disk", "volatile")
            assert dev.flushes == [], "a non-persistent bitmap does not outlive a power loss: no flush needed"
            await mgr.add("disk", "p", persistent=True)
            assert dev.flushes and dev.flushes[-1] == (True, {"volatile"}), dev.flushes
            dev.flushes.clear()
            await mgr.clear("disk", "p")
            assert dev.flushes and dev.flushes[-1][0] is True, dev.flushes
        finally:
            await dev.live.close()

    run(go())

