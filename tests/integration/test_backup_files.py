"""The backup engine on real files: copy offload, sparse targets, target checks.

The source image is written by qemu-io (so the expected content does not
depend on our code); the target is compared with blake3 and `qemu-img compare`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess

import pytest

from nbdbackup.backup import copystate
from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.file import FileDev
from nbdbackup.errors import ConfigError

MiB = 1 << 20
SIZE = 8 * MiB
WRITES = [(0x11, 0, MiB), (0x22, 3 * MiB, 64 * 1024), (0x00, 4 * MiB, 128 * 1024), (0x33, SIZE - 4096, 4096)]


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def backup(src_path, target, *, sync="full", during=None, **kw):
    dev = FileDev(os.fspath(src_path))
    table = MemoryExportTable()
    live = LiveDev(dev)
    table.add("disk", live, read_only=False)
    events = []
    engine = Engine(table, lambda n, d: events.append((n, d)))
    await engine.backup_start("disk", "j", sync, os.fspath(target), snapshot="snap", **kw)
    job = engine.jobs["j"]
    if during is not None:
        await during(live, table.get("snap").dev)
    await job.wait()
    info = engine.query_jobs()[0]
    await engine.job_dismiss("j")
    await live.close()
    return job, info, events


@pytest.mark.parametrize("offload", [True, False])
def test_full_backup_to_new_sparse_file(short_tmp, make_image, blake3_file, qemu_io, offload, monkeypatch):
    src = make_image(short_tmp / "src.raw", SIZE, WRITES)
    orig = short_tmp / "orig.raw"
    subprocess.run(["cp", "--sparse=always", src, orig], check=True)
    tgt = short_tmp / "tgt.raw"
    if not offload:
        def broken(*a, **k):
            raise OSError(errno.EXDEV, "no copy offload here")
        monkeypatch.setattr(copystate.os, "copy_file_range", broken)

    async def during(live, snap):
        # Overwrite data and holes while the pump runs; the snapshot must not move.
        await live.pwrite(b"\x99" * 5000, 3 * MiB - 100)
        await live.zero(0, 64 * 1024, may_trim=True)
        await live.pwrite(b"\x77" * 4096, 6 * MiB)  # was a hole
        buf = bytearray(SIZE)
        await snap.pread(memoryview(buf), 0)
        with open(orig, "rb") as f:
            assert bytes(buf) == f.read()

    job, info, events = run(backup(src, tgt, during=during, max_workers=2, speed=0))
    assert info["status"] == "concluded" and "error" not in info, info
    assert os.path.getsize(tgt) == SIZE
    assert blake3_file(tgt) == blake3_file(orig)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(orig), os.fspath(tgt)],
                   check=True)
    # Holes stay holes: far less than the whole disk is allocated.
    assert allocated(tgt) < 2 * MiB, allocated(tgt)
    assert job.state.offload is offload
    qemu_io(src, "read -P 0x99 3145628 5000", "read -P 0x77 6291456 4096", "read -P 0 0 65536")


def test_top_backup_copies_only_allocated(short_tmp, make_image, blake3_file):
    src = make_image(short_tmp / "src.raw", SIZE, WRITES)
    tgt = short_tmp / "tgt.raw"
    job, info, _ = run(backup(src, tgt, sync="top"))
    assert info["status"] == "concluded" and "error" not in info
    # Data extents of the source, in the default 4 KiB clusters: exactly the data.
    assert info["cluster-size"] == 4096
    assert info["total-progress"] == MiB + 64 * 1024 + 128 * 1024 + 4096
    assert blake3_file(tgt) == blake3_file(src)
    # In 64 KiB clusters: 1 MiB + 64K + 128K + 64K (the last 4K's cluster).
    tgt.unlink()
    job, info, _ = run(backup(src, tgt, sync="top", cluster_size=64 * 1024))
    assert info["status"] == "concluded" and "error" not in info
    assert info["total-progress"] == MiB + 64 * 1024 + 128 * 1024 + 64 * 1024
    assert blake3_file(tgt) == blake3_file(src)


def test_target_checks(short_tmp, make_image):
    src = make_image(short_tmp / "src.raw", SIZE, WRITES)
    os.link(src, short_tmp / "hardlink.raw")
    small = make_image(short_tmp / "small.raw", SIZE // 2)

    async def main():
        dev = FileDev(os.fspath(src))
        table = MemoryExportTable()
        table.add("disk", LiveDev(dev), read_only=False)
        engine = Engine(table)
        for target, match in ((src, "own disk"), (short_tmp / "hardlink.raw", "same file"),
                              (small, "smaller"), (short_tmp / "nodir" / "x.raw", "no such file")):
            with pytest.raises(ConfigError, match=match):
                await engine.backup_start("disk", "j", "full", os.fspath(target), snapshot="s")
            assert engine.jobs == {} and table.get("s") is None
        await dev.close()
    run(main())


def test_busy_target_and_no_litter(short_tmp, make_image):
    src = make_image(short_tmp / "src.raw", SIZE, WRITES)

    async def main():
        dev = FileDev(os.fspath(src))
        table = MemoryExportTable()
        table.add("disk", LiveDev(dev), read_only=False)
        engine = Engine(table)
        tgt = short_tmp / "t.raw"
        await engine.backup_start("disk", "a", "none", os.fspath(tgt), snapshot="s")
        os.link(tgt, short_tmp / "t2.raw")
        for other in (tgt, short_tmp / "t2.raw"):
            with pytest.raises(ConfigError, match="already the target of job 'a'"):
                await engine.backup_start("disk", "b", "full", os.fspath(other))
        # A target created for a refused backup is removed again.
        new = short_tmp / "new.raw"
        with pytest.raises(ConfigError, match="cluster-size"):
            await engine.backup_start("disk", "b", "full", os.fspath(new), cluster_size=1000)
        assert not new.exists()
        assert engine.export_in_use("disk") == "a" and engine.export_in_use("s") == "a"
        assert engine.export_in_use("x") is None
        await engine.shutdown()
        await dev.close()
    run(main())


def test_cbw_keeps_source_holes_sparse_in_a_file_target(short_tmp):
    """A copy-before-write of a cluster that is a hole in the source leaves a hole
    in the target (zero detection), while a data cluster is copied."""
    src_path, tgt_path = short_tmp / "s.img", short_tmp / "t.img"
    with open(src_path, "wb") as f:
        f.truncate(8 << 20)
        f.write(os.urandom(65536))
    with open(tgt_path, "wb") as f:
        f.truncate(8 << 20)

    async def main():
        src, tgt = FileDev(str(src_path)), FileDev(str(tgt_path))
        st = copystate.CopyState(src, tgt, 65536)
        assert st.offload
        await st.protect(2 << 20, 4096)  # inside a source hole
        await st.protect(0, 4096)  # inside data
        data = [(e.offset, e.length) for e in tgt.extents_sync(0, 8 << 20) if not e.flags]
        assert data == [(0, 65536)]
        # rule 7: the source hole is found by SEEK_DATA and zeroed, not copied
        assert st.clusters_zero_in_snapshot == 1 and st.done.get(32) and st.done.get(0)
        buf = bytearray(65536)
        await tgt.pread(memoryview(buf), 0)
        with open(src_path, "rb") as f:
            assert bytes(buf) == f.read(65536)
        await src.close()
        await tgt.close()

    run(main())


def test_cbw_of_a_source_hole_into_a_zero_target_is_synchronous_and_writes_nothing(short_tmp):
    """Copy-before-write of a source hole bound for a target that reads as
    zeros (a fresh sparse file, copystate rule 11) is done on the task-free
    path (`protect_sync`): the cluster is in the target already, nothing is
    written; a target with old data there still gets the async path, which
    zeroes it."""
    src_path = short_tmp / "s.img"
    with open(src_path, "wb") as f:
        f.truncate(8 << 20)
        f.write(os.urandom(65536))

    async def main(stale: bool):
        tgt_path = short_tmp / f"t{int(stale)}.img"
        with open(tgt_path, "wb") as f:
            f.truncate(8 << 20)
            if stale:
                os.pwrite(f.fileno(), b"\xee" * 65536, 2 << 20)
        src, tgt = FileDev(str(src_path)), FileDev(str(tgt_path))
        st = copystate.CopyState(src, tgt, 65536)
        st.set_pump_todo(copystate.Bitmap(st.nclusters, fill=True))
        assert st.target_zero is not stale
        ok = st.protect_sync(2 << 20, 4096)  # inside a source hole
        if not stale:
            assert ok and st.done.get(32) and st.in_target.get(32) and not st.pump_todo.get(32)
            assert st.current == 65536 and st.clusters_zero_in_snapshot == 1
            assert [e for e in tgt.extents_sync(0, 8 << 20) if not e.flags] == []
        else:
            assert not ok and not st.done.get(32)
            await st.protect(2 << 20, 4096)
            buf = bytearray(65536)
            await tgt.pread(memoryview(buf), 2 << 20)
            assert bytes(buf) == bytes(65536)
        await src.close()
        await tgt.close()

    run(main(False))
    run(main(True))
