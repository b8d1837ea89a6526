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



def test_backup_start_with_a_persistent_bitmap_flushes_while_quiesced_before_its_point_in_time(tmp_path):
    """The standalone QMP ``backup-start`` (not in a transaction) with a persistent bitmap: the
    bitmap's successor counts from the job's point in time, so the disk is flushed while its
    writes are held, before the job is committed (`Engine.backup_start` ``durable_point``, the
    daemon asks `BitmapManager.durable_point`); with a bitmap that is not persistent, no flush."""
    from nbdbackup.backup.bitmaps import RegistryBitmapSource
    from nbdbackup.backup.engine import Engine, MemoryExportTable
    from nbdbackup.daemon import register_engine_commands

    mgr, dev = rig(tmp_path)
    table = MemoryExportTable()
    table.add("disk", dev.live, read_only=False)
    engine = Engine(table, bitmaps=RegistryBitmapSource(mgr.lookup))
    mgr.engine = engine
    commands: dict = {}

    class QMP:
        @staticmethod
        def register(name, fn, **_):
            commands[name] = fn

    register_engine_commands(QMP, engine, mgr)
    listed: list[set[str]] = []  # per flush: the jobs query-jobs lists (committed ones)
    recorded = RecordingFileDev.flush

    async def flush_and_list(self):
        await recorded(self)
        listed.append({j["id"] for j in engine.query_jobs()})

    async def go():
        try:
            await mgr.add("disk", "volatile")
            await mgr.add("disk", "p", persistent=True)
            dev.flushes.clear()
            listed.clear()
            await commands["backup-start"]("disk", "j1", "incremental", str(tmp_path / "t1.raw"),
                                           bitmap="volatile")
            await engine.jobs["j1"].wait()
            assert dev.flushes == [], "a bitmap that does not outlive a power loss needs no flush"
            await commands["backup-start"]("disk", "j2", "incremental", str(tmp_path / "t2.raw"),
                                           bitmap="p")
            await engine.jobs["j2"].wait()
            assert len(dev.flushes) >= 2 and dev.flushes[0][0] is False and dev.flushes[-1][0] is True, \
                f"one flush before the writes are held, one while they are: {dev.flushes}"
            assert "j2" not in listed[-1], "the flush comes before the point in time (the commit)"
            for j in ("j1", "j2"):
                await engine.job_dismiss(j)
        finally:
            await dev.live.close()

    import unittest.mock
    with unittest.mock.patch.object(RecordingFileDev, "flush", flush_and_list):
        run(go())
