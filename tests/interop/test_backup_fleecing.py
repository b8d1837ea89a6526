"""Fleecing through the real server: `nbdbackup serve --control`, QMP from
qemu.qmp, live overwrites and snapshot checks from qemu-io, nbdcopy and qemu-img.

For each sync mode (full, top, none): a raw image with known patterns is
served; a backup with a snapshot export starts over QMP (slowed to 1 B/s so
the overwrites race the pump); qemu-io overwrites the live export (whole
clusters, partial-left, partial-right, adjacent, spanning, zero-writes,
discards, a former hole, the last bytes); the snapshot export must still show
the original image (qemu-io -P per pattern, then nbdcopy + blake3 of the whole
disk); after completion (none: after cancel) the target equals the original
(`qemu-img compare`; for none only the clusters CBW saved), the live export
equals the same writes applied to a copy of the original by local qemu-io, and
dismissing the job removes the snapshot export.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest
from qemu.qmp import QMPClient

import peers
from peers import assert_target_saved, finish_job, run_tool, wait_concluded
from qemutools import qemu_io


# Expectations count 64 KiB clusters (the default before session 14).
pytestmark = pytest.mark.usefixtures("clusters_of_64k")


KiB = 1024
MiB = 1 << 20
CS = 64 * KiB
SIZE = 4 * MiB
#: (pattern, offset, length) written by qemu-io before serving.
INITIAL = [(0x11, 0, MiB), (0x22, MiB, 512 * KiB), (0x00, 2 * MiB, CS), (0x33, 3 * MiB - CS, CS)]
#: qemu-io commands run on the live export during the backup.
OVERWRITES = [
    f"write -P 0xa1 {CS} {2 * CS}",                 # whole clusters 1-2
    f"write -P 0xa2 {5 * CS} 4096",                 # partial-left of cluster 5
    f"write -P 0xa3 {7 * CS - 4096} 4096",          # partial-right of cluster 6
    f"write -P 0xa4 {8 * CS} {CS}",                 # adjacent clusters 8 ...
    f"write -P 0xa5 {9 * CS} {CS}",                 # ... and 9
    f"write -P 0xa6 {11 * CS - 1000} 2000",         # spanning clusters 10-11
    f"write -z {MiB + CS} {2 * CS}",                # zero-write inside the 0x22 area
    f"discard {MiB + 4 * CS} {CS}",                 # discard inside the 0x22 area
    f"write -P 0xa7 {MiB + 768 * KiB} 4096",        # into a former hole
    f"write -P 0xa8 {SIZE - 512} 512",              # the last bytes
    f"write -P 0xa9 {CS} 100",                      # a cluster CBW already saved
]
#: clusters touched by OVERWRITES (CBW must have saved them).
TOUCHED = sorted({1, 2, 5, 6, 8, 9, 10, 11, 17, 18, 20, 28, 63})


def original_checks() -> list[str]:
    """qemu-io read -P commands that hold for the original image."""
    cmds = [f"read -P {p:#x} {o} {n}" for p, o, n in INITIAL]
    cmds += [f"read -P 0 {MiB + 512 * KiB} {512 * KiB}", f"read -P 0 {2 * MiB + CS} {MiB - 2 * CS}",
             f"read -P 0 {3 * MiB} {MiB}"]
    return cmds


qio = qemu_io  # on an NBD URI; fails the test on any qemu-io error



async def qmp_session(path: str):
    qmp = QMPClient("fleecing-test")
    await qmp.connect(path)
    return qmp


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sync", ["full", "top", "none"])
def test_fleecing(sync, serve, short_tmp, make_image, qemu_io, blake3_file):
    disk = make_image(short_tmp / "disk.raw", SIZE, INITIAL)
    orig = short_tmp / "orig.raw"
    shutil.copyfile(disk, orig)
    expected = short_tmp / "expected.raw"
    shutil.copyfile(disk, expected)
    qemu_io(expected, *OVERWRITES)
    target = short_tmp / "target.raw"
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    nbdcopy = peers.require("nbdcopy")

    with serve(f"disk={disk}", extra=["--control", ctl]) as peer:
        live_uri, snap_uri = peer.uri_for("disk"), peer.uri_for("snap")

        async def scenario():
            qmp = await qmp_session(ctl)
            try:
                assert await qmp.execute("backup-start", {
                    "export": "disk", "job-id": "j", "sync": sync, "target": os.fspath(target),
                    "snapshot": "snap", "speed": 1}) == {}
                qio(snap_uri, *original_checks(), read_only=True)
                qio(live_uri, *OVERWRITES)
                # The snapshot still shows the original, pattern by pattern and as a whole.
                qio(snap_uri, *original_checks(), read_only=True)
                copy = short_tmp / "snap-copy.raw"
                run_tool(nbdcopy, snap_uri, os.fspath(copy))
                assert blake3_file(copy) == blake3_file(orig)
                jobs = await qmp.execute("query-jobs")
                assert jobs[0]["status"] == "running", jobs
                info = await finish_job(qmp, "j", sync)
                if sync != "none":
                    assert info["current-progress"] == info["total-progress"] > 0
                # Concluded, not dismissed: the snapshot export is still there and right.
                qio(snap_uri, *original_checks(), read_only=True)
                await qmp.execute("job-dismiss", {"id": "j"})
                assert await qmp.execute("query-jobs") == []
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(scenario(), 150))

        # The live export is the original plus the overwrites.
        run_tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(expected), live_uri)
        # The snapshot export is gone.
        r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", snap_uri],
                           capture_output=True, text=True, errors="replace", timeout=60)
        assert r.returncode != 0 or "error" in (r.stdout + r.stderr).lower() \
            or "fail" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr

    assert_target_saved(orig, target, TOUCHED, CS, whole=sync in ("full", "top"))


@pytest.mark.timeout(120)
def test_snapshot_copy_races_live_writes(serve, short_tmp, blake3_file):
    """nbdcopy pulls the snapshot while qemu-io rewrites the live disk in parallel."""
    size = 64 * MiB
    disk = short_tmp / "disk.raw"
    with open(disk, "wb") as f:
        f.write(os.urandom(size // 2))
        f.truncate(size)  # second half: a hole
    orig = short_tmp / "orig.raw"
    shutil.copyfile(disk, orig)
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    nbdcopy = peers.require("nbdcopy")
    with serve(f"disk={disk}", extra=["--control", ctl]) as peer:
        live_uri, snap_uri = peer.uri_for("disk"), peer.uri_for("snap")

        async def scenario():
            qmp = await qmp_session(ctl)
            try:
                await qmp.execute("backup-start", {"export": "disk", "job-id": "j", "sync": "none",
                                                   "target": os.fspath(short_tmp / "t.raw"), "snapshot": "snap"})
                writer = await asyncio.create_subprocess_exec(
                    "qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {size}", "-c", f"aio_write -P 0x6b 4096 {MiB}",
                    "-c", "aio_flush", live_uri,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
                reader = await asyncio.create_subprocess_exec(
                    nbdcopy, snap_uri, os.fspath(short_tmp / "copy.raw"),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
                wout, _ = await writer.communicate()
                rout, _ = await reader.communicate()
                assert writer.returncode == 0 and b"error" not in wout.lower(), wout
                assert reader.returncode == 0, rout
                await qmp.execute("job-cancel", {"id": "j"})
                await wait_concluded(qmp, "j")
                await qmp.execute("job-dismiss", {"id": "j"})
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(scenario(), 100))
        qio(live_uri, "read -P 0x5a 0 4096", f"read -P 0x6b 4096 {MiB}",
            f"read -P 0x5a {MiB + 4096} {size - MiB - 4096}", read_only=True)
    assert blake3_file(short_tmp / "copy.raw") == blake3_file(orig)
