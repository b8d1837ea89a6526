"""``pull(trim_after_read=True)`` on a backup's snapshot (memory devices):
each worked chunk is TRIMmed on the source after it is in the target, the
scratch it held is released, and a read-only source is refused."""

from __future__ import annotations

import asyncio

import pytest

from nbdbackup.agent.pull import pull
from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.bitmap.core import Bitmap
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.memory import PAGE, MemoryDev
from nbdbackup.errors import ConfigError

SIZE = 16 * PAGE
CHUNK = 4 * PAGE


class FirstCluster:
    def begin_backup(self, export, name, mode, cluster_size, nclusters):
        bm = Bitmap(nclusters)
        bm.set(0)
        return type("Lease", (), {"clusters": bm, "context": None, "end": lambda s, ok: None})()


def test_pull_trims_what_it_read_and_frees_the_scratch():
    async def main():
        mem = MemoryDev(SIZE)
        mem.write_sync(bytes([7]) * (12 * PAGE), 0)  # last 4 pages: a hole
        orig = bytearray(SIZE)
        mem.read_sync(memoryview(orig), 0)
        live = LiveDev(mem)
        table = MemoryExportTable()
        table.add("disk", live, read_only=False)
        engine = Engine(table, bitmaps=FirstCluster())
        scratch = MemoryDev(SIZE)
        await engine.backup_start("disk", "j", "bitmap", MemoryDev(SIZE), snapshot="snap", bitmap="b",
                                  bitmap_mode="never", cluster_size=PAGE, scratch=scratch, snapshot_trim=True,
                                  speed=1)
        job = engine.jobs["j"]
        await live.pwrite(b"\x01" * (8 * PAGE), 2 * PAGE)  # 8 pages into the scratch
        assert job.query()["scratch-bytes"] == 8 * PAGE
        out = MemoryDev(SIZE)
        man, stats = await pull(table.get("snap").dev, out, chunk_size=CHUNK, trim_after_read=True)
        got = bytearray(SIZE)
        out.read_sync(memoryview(got), 0)
        assert got == orig
        assert stats.bytes_trimmed == SIZE  # every worked chunk (the hole one is zeroed in the target)
        q = job.query()
        assert q["scratch-bytes"] == 0 and q["bytes-trimmed"] == SIZE
        cbw = q["bytes-copied-by-cbw"]
        await live.pwrite(b"\x02" * (11 * PAGE), 0)
        assert job.query()["bytes-copied-by-cbw"] == cbw  # trimmed, or (cluster 0) already in the target
        with pytest.raises(ConfigError, match="TRIM"):
            await pull(MemoryDev(SIZE, read_only=True), MemoryDev(SIZE), trim_after_read=True)
        job.set_speed(0)
        await job.wait()
        await engine.job_dismiss("j")
    asyncio.run(asyncio.wait_for(main(), 20))
