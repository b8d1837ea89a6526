"""The scratch on real files: where the default scratch file goes, that the
engine removes what it created (dismiss, failed start) and keeps what it was
given, and that ``scratch-allocated`` is the file's real allocation
(st_blocks) as copy-before-write fills it and snapshot TRIM empties it."""

from __future__ import annotations

import asyncio
import glob
import os

import pytest

from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.backup.job import JobStatus
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.errors import ConfigError

MiB = 1 << 20
SIZE = 4 * MiB
CS = 64 * 1024


# Expectations count 64 KiB clusters (the default before session 14).
pytestmark = pytest.mark.usefixtures("clusters_of_64k")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def scratches(d) -> list[str]:
    return sorted(glob.glob(os.path.join(os.fspath(d), ".nbdbackup-scratch-*")))


class One:
    """A `BitmapSource` whose frozen set is cluster 0 alone."""

    def begin_backup(self, export, name, mode, cluster_size, nclusters):
        from nbdbackup.bitmap.core import Bitmap

        bm = Bitmap(nclusters)
        bm.set(0)
        return type("Lease", (), {"clusters": bm, "context": None, "end": lambda s, ok: None})()


async def rig(tmp, **engine_kw):
    src = tmp / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(SIZE))
    live = LiveDev(FileDev(os.fspath(src)))
    table = MemoryExportTable()
    table.add("disk", live, read_only=False)
    return live, table, Engine(table, **engine_kw)


def test_default_scratch_beside_the_target_removed_at_dismiss(short_tmp):
    async def main():
        live, table, engine = await rig(short_tmp)
        tdir = short_tmp / "t"
        tdir.mkdir()
        await engine.backup_start("disk", "j", "top", os.fspath(tdir / "t.raw"), snapshot="snap",
                                  speed=1, snapshot_trim=True)
        job = engine.jobs["j"]
        (path,) = scratches(tdir)
        assert os.path.getsize(path) == SIZE and job.query()["scratch"] == path
        assert job.query()["scratch-allocated"] == 0
        job.cancel()
        await job.wait()
        await engine.job_dismiss("j")
        assert scratches(tdir) == []
        await live.close()
    run(main())


def test_default_scratch_in_the_state_dir_and_measured(short_tmp):
    """A bitmap job (sync set: cluster 0) whose other clusters are overwritten:
    their old content fills the scratch file; TRIM on the snapshot punches it."""
    async def main():
        state = short_tmp / "state"
        state.mkdir()

        live, table, engine = await rig(short_tmp, scratch_dir=os.fspath(state), bitmaps=One())
        await engine.backup_start("disk", "j", "bitmap", os.fspath(short_tmp / "t.raw"), snapshot="snap",
                                  bitmap="b", bitmap_mode="never", speed=1, snapshot_trim=True)
        job = engine.jobs["j"]
        (path,) = scratches(state)
        assert scratches(short_tmp) == []
        await live.pwrite(b"\x55" * MiB, MiB)  # 16 clusters outside the set
        q = job.query()
        assert q["scratch-bytes"] == MiB and q["scratch-allocated"] == os.stat(path).st_blocks * 512 >= MiB
        snap = table.get("snap").dev
        await snap.trim(MiB, MiB // 2)
        q2 = job.query()
        assert q2["scratch-bytes"] == MiB // 2 and q2["scratch-allocated"] <= q["scratch-allocated"] - MiB // 2
        job.set_speed(0)
        await job.wait()
        assert job.error is None
        await engine.job_dismiss("j")
        assert scratches(state) == []
        await live.close()
    run(main())


def test_given_scratch_path_created_and_removed_existing_one_kept(short_tmp):
    async def main():
        live, table, engine = await rig(short_tmp)
        new = short_tmp / "new-scratch.raw"
        await engine.backup_start("disk", "j1", "top", os.fspath(short_tmp / "t1.raw"), scratch=os.fspath(new))
        assert new.exists()
        await engine.jobs["j1"].wait()
        await engine.job_dismiss("j1")
        assert not new.exists()
        old = short_tmp / "old-scratch.raw"
        with open(old, "wb") as f:
            f.truncate(SIZE)
        await engine.backup_start("disk", "j2", "top", os.fspath(short_tmp / "t2.raw"), scratch=os.fspath(old))
        await engine.jobs["j2"].wait()
        await engine.job_dismiss("j2")
        assert old.exists()
        await live.close()
    run(main())


def test_failed_start_leaves_no_scratch_and_scratch_checks(short_tmp):
    async def main():
        live, table, engine = await rig(short_tmp)
        with pytest.raises(ConfigError, match="needs a bitmap"):
            await engine.backup_start("disk", "j", "incremental", os.fspath(short_tmp / "t.raw"))
        with pytest.raises(ConfigError, match="source"):
            await engine.backup_start("disk", "j", "top", os.fspath(short_tmp / "t.raw"),
                                      scratch=os.fspath(short_tmp / "src.raw"))
        small = short_tmp / "small.raw"
        with open(small, "wb") as f:
            f.truncate(SIZE // 2)
        with pytest.raises(ConfigError, match="smaller"):
            await engine.backup_start("disk", "j", "top", os.fspath(short_tmp / "t.raw"), scratch=os.fspath(small))
        with pytest.raises(ConfigError, match="is the target"):
            await engine.backup_start("disk", "j", "top", os.fspath(small), scratch=os.fspath(small))
        assert scratches(short_tmp) == [] and engine.jobs == {}
        await live.close()
    run(main())


def test_a_scratch_or_target_in_use_by_another_job_is_refused(short_tmp):
    async def main():
        live, table, engine = await rig(short_tmp)
        s1 = os.fspath(short_tmp / "s1.raw")
        await engine.backup_start("disk", "j1", "top", os.fspath(short_tmp / "t1.raw"), scratch=s1, speed=1)
        with pytest.raises(ConfigError, match="already the scratch of job 'j1'"):
            await engine.backup_start("disk", "j2", "top", os.fspath(short_tmp / "t2.raw"), scratch=s1)
        with pytest.raises(ConfigError, match="already the scratch of job 'j1'"):
            await engine.backup_start("disk", "j2", "full", s1)
        with pytest.raises(ConfigError, match="already the target of job 'j1'"):
            await engine.backup_start("disk", "j2", "top", os.fspath(short_tmp / "t2.raw"),
                                      scratch=os.fspath(short_tmp / "t1.raw"))
        engine.jobs["j1"].cancel()
        await engine.jobs["j1"].wait()
        await engine.job_dismiss("j1")
        await live.close()
    run(main())


@pytest.mark.parametrize("sync", ["top", "full"])
def test_guest_fstrim_over_free_space_copies_only_data(short_tmp, sync):
    """A TRIM of the whole disk during the job (a guest's fstrim): the free
    space is a hole in the source, so copy-before-write copies only the
    data clusters; the rest is zero in the snapshot (copystate rule 7)."""
    async def main():
        big = 64 * MiB
        src = short_tmp / "big.raw"
        with open(src, "wb") as f:
            f.truncate(big)
            f.write(os.urandom(2 * MiB))
            f.seek(40 * MiB)
            f.write(os.urandom(MiB))
        with open(src, "rb") as f:
            orig = f.read()
        live = LiveDev(FileDev(os.fspath(src)))
        table = MemoryExportTable()
        table.add("disk", live, read_only=False)
        engine = Engine(table)
        await engine.backup_start("disk", "j", sync, os.fspath(short_tmp / "t.raw"), snapshot="snap", speed=1)
        job = engine.jobs["j"]
        await live.trim(0, big)
        q = job.query()
        assert q["bytes-copied-by-cbw"] == 3 * MiB, q
        assert q["clusters-zero-in-snapshot"] == (big - 3 * MiB) // CS, q
        assert q.get("scratch-bytes", 0) == 0, q
        snap = table.get("snap").dev
        buf = bytearray(big)
        await snap.pread(memoryview(buf), 0)
        assert bytes(buf) == orig
        # After the TRIM nothing is left for the pump (every cluster copied or
        # zero), so the job may already have concluded while the 64 MiB read
        # above was in flight (it yields when an I/O engine does it).
        if job.status in (JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED):
            job.set_speed(0)
        await job.wait()
        assert job.error is None
        with open(short_tmp / "t.raw", "rb") as f:
            assert f.read() == orig
        await engine.job_dismiss("j")
        await live.close()
    run(main())


def test_sweep_removes_only_stale_scratch_files(short_tmp):
    async def main():
        state = short_tmp / "state"
        state.mkdir()
        stale = state / ".nbdbackup-scratch-dead.raw"
        stale.write_bytes(b"x")
        other = state / "keep.raw"
        other.write_bytes(b"y")
        live, table, engine = await rig(short_tmp, scratch_dir=os.fspath(state))
        await engine.backup_start("disk", "j", "top", os.fspath(short_tmp / "t.raw"), speed=1)
        mine = [p for p in scratches(state) if p != os.fspath(stale)]
        assert len(mine) == 1
        assert engine.sweep_scratch() == [os.fspath(stale)]  # the live job's file is locked
        assert scratches(state) == mine and other.exists()
        engine.jobs["j"].cancel()
        await engine.jobs["j"].wait()
        await engine.job_dismiss("j")
        assert scratches(state) == []
        await live.close()
    run(main())


@pytest.mark.parametrize("sync", ["none", "bitmap"])
def test_cbw_into_a_file_scratch_uses_copy_offload(short_tmp, sync, monkeypatch):
    """Fleecing into a file target (the target is the scratch), or a scratch
    file: copy-before-write copies with copy_file_range, like the pump."""
    from nbdbackup.backup import copystate

    calls = []
    real = copystate.os.copy_file_range

    def counting(*a, **k):
        calls.append(a[2])
        return real(*a, **k)

    monkeypatch.setattr(copystate.os, "copy_file_range", counting)

    async def main():
        live, table, engine = await rig(short_tmp, bitmaps=One())
        with open(short_tmp / "src.raw", "rb") as f:
            orig = f.read()
        kw = {"bitmap": "b", "bitmap_mode": "never"} if sync == "bitmap" else {}
        await engine.backup_start("disk", "j", sync, os.fspath(short_tmp / "t.raw"), snapshot="snap", speed=1,
                                  **kw)
        job = engine.jobs["j"]
        assert job.state.offload_scratch
        n = len(calls)
        await live.pwrite(b"\x42" * 4096, 3 * MiB + 100)
        assert job.state.in_scratch.get((3 * MiB + 100) // CS) and job.query()["scratch-bytes"] == CS
        assert len(calls) > n
        buf = bytearray(SIZE)
        await table.get("snap").dev.pread(memoryview(buf), 0)
        assert bytes(buf) == orig
        job.cancel()
        await job.wait()
        await engine.job_dismiss("j")
        await live.close()
    run(main())


def test_fleecing_into_a_scratch_target_of_the_servers_own(short_tmp):
    """``target: "scratch:"`` (sync=none): the server makes the scratch file itself in its state
    directory (a remote agent cannot name a path there, and a memory target would pin RAM for
    every cluster the guest writes), copy-before-write saves the old data into it, the snapshot
    reads the point-in-time image, and dismiss removes the file.  Other modes refuse it."""
    async def main():
        state = short_tmp / "state"
        state.mkdir()
        live, table, engine = await rig(short_tmp, scratch_dir=os.fspath(state))
        with pytest.raises(ConfigError, match="is for sync=none"):
            await engine.backup_start("disk", "f", "full", "scratch:")
        assert scratches(state) == []
        size = live.size
        before = bytearray(size)
        await live.pread(memoryview(before), 0)
        await engine.backup_start("disk", "j", "none", "scratch:", snapshot="snap")
        (path,) = scratches(state)
        await live.pwrite(b"\x77" * MiB, 0)
        assert os.stat(path).st_blocks * 512 >= MiB  # the old data went to the file, not to memory
        buf = bytearray(size)
        await table.get("snap").dev.pread(memoryview(buf), 0)
        assert buf == before
        engine.jobs["j"].cancel()
        await engine.jobs["j"].wait()
        await engine.job_dismiss("j")
        assert scratches(state) == [] and not os.path.exists(path)
        await live.close()
    run(main())


def test_scratch_target_without_a_usable_temp_directory(short_tmp, monkeypatch):
    """A read-only root filesystem (``docker run --read-only``) leaves no temporary directory:
    `tempfile.gettempdir` raises.  With a state directory the server's own scratch target never
    needs one (it asked for it anyway, and the agent's backup failed: docs/hunt9.md); without
    one the refusal is one ConfigError naming the fixes."""
    import tempfile

    def no_temp_dir():
        raise FileNotFoundError(2, "No usable temporary directory found in ['/tmp']")

    async def main():
        state = short_tmp / "state"
        state.mkdir()
        live, table, engine = await rig(short_tmp, scratch_dir=os.fspath(state))
        monkeypatch.setattr(tempfile, "gettempdir", no_temp_dir)
        await engine.backup_start("disk", "j", "none", "scratch:", snapshot="snap")
        (path,) = scratches(state)
        engine.jobs["j"].cancel()
        await engine.jobs["j"].wait()
        await engine.job_dismiss("j")
        assert not os.path.exists(path)
        await live.close()

        live, table, engine = await rig(short_tmp)
        with pytest.raises(ConfigError, match=r"no writable temporary directory .*--state-dir"):
            await engine.backup_start("disk", "k", "none", "scratch:", snapshot="snap2")
        await live.close()
    run(main())
