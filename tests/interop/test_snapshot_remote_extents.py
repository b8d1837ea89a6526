"""The snapshot export's block status over a remote target (docs/doubts18.md item 1).

nbdkit's cache filter in ``cache=writeback`` mode (1.32) answers
``base:allocation`` from the plugin underneath, so data written and not yet
flushed reads back right but is reported "hole, zero".  A backup whose
copy-before-write copies go to such a remote (the target of ``sync none`` /
``sync full``) used to pass that answer on in the snapshot export's block
status, and nbdcopy -- which writes zeros for zero extents without reading
them -- then copied zeros instead of the point-in-time data.

Here: ``serve disk=FILE`` (random data), a backup whose target is
``nbd+unix://`` nbdkit ``--filter=cache cache=writeback`` (no
``--filter=noextents``), the whole live disk overwritten by qemu-io, so that
every cluster's point-in-time content is in the remote target; then nbdcopy
and ``qemu-img compare`` (exact) read the snapshot export and must see the
original, and ``nbdinfo --map`` must not call any copied byte ZERO.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest
from qemu.qmp import QMPClient

import peers
from peers import run_tool, wait_concluded

MiB = 1 << 20
SIZE = 8 * MiB


def map_zero_bytes(uri: str) -> int:
    """Bytes ``nbdinfo --map`` reports with the ZERO flag (bit 1)."""
    out = run_tool(peers.require("nbdinfo"), "--map", uri)
    total = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and int(parts[2]) & 2:
            total += int(parts[1])
    return total


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sync", ["none", "full"])
def test_snapshot_over_a_writeback_cached_nbdkit_target_reads_the_point_in_time(sync, serve, short_tmp,
                                                                               qemu_io, blake3_file):
    disk = short_tmp / "disk.raw"
    with open(disk, "wb") as f:
        f.write(os.urandom(SIZE))
    orig = short_tmp / "orig.raw"
    shutil.copyfile(disk, orig)
    target = short_tmp / "target.raw"
    with open(target, "wb") as f:
        f.truncate(SIZE)
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    nbdcopy = peers.require("nbdcopy")
    copy = short_tmp / "snap-copy.raw"

    with peers.nbdkit("file", os.fspath(target), "cache=writeback", filters=["cache"]) as kit, \
            serve(f"disk={disk}", extra=["--control", ctl]) as peer:
        live_uri, snap_uri = peer.uri_for("disk"), peer.uri_for("snap")

        async def scenario():
            qmp = QMPClient("doubts18")
            await qmp.connect(ctl)
            try:
                assert await qmp.execute("backup-start", {
                    "export": "disk", "job-id": "j", "sync": sync, "target": kit.uri,
                    "snapshot": "snap", "speed": 1}) == {}
                # Every cluster's point-in-time content goes to the remote target (CBW).
                qemu_io(live_uri, f"write -P 0x5a 0 {SIZE}")
                info = (await qmp.execute("query-jobs"))[0]
                assert info["status"] == "running", info
                # What the remote itself says of what it holds (the premise of the test):
                # nbdkit's writeback cache calls most of the copied, unflushed data zero.
                remote_zero = map_zero_bytes(kit.uri)
                # Readers that skip zero extents read the point-in-time image.
                run_tool(nbdcopy, snap_uri, os.fspath(copy))
                assert blake3_file(copy) == blake3_file(orig), f"remote says {remote_zero} bytes zero"
                run_tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(orig), snap_uri)
                # The snapshot export calls nothing zero: every byte is copied data.
                assert map_zero_bytes(snap_uri) == 0
                await qmp.execute("job-cancel", {"id": "j"})
                await wait_concluded(qmp, "j")
                await qmp.execute("job-dismiss", {"id": "j"})
                return remote_zero
            finally:
                await qmp.disconnect()

        remote_zero = asyncio.run(asyncio.wait_for(scenario(), 150))
    # The premise held: without it this test would prove nothing about trusting the remote.
    assert remote_zero > 0


@pytest.mark.timeout(180)
def test_backup_of_a_reexported_writeback_cached_nbdkit_source_keeps_unflushed_data(serve, short_tmp, blake3_file):
    """The source side: ``serve p=nbd+unix://(nbdkit cache=writeback)``, data written
    through ``serve`` and not flushed -- nbdkit then calls it "hole, zero" (and ``qemu-img
    convert`` straight from nbdkit copies zeros: the premise).  A ``sync full`` backup
    skipped every such cluster as zeros (``clusters-skipped-zero``) and its snapshot
    export called them zero: the source is now flushed once before its allocation is
    trusted (`CopyState.source_extents`), and target and snapshot hold the data."""
    import nbd

    size = 8 * MiB
    src = short_tmp / "src.raw"
    with open(src, "wb") as f:
        f.truncate(size)
    data = os.urandom(size)
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    target = short_tmp / "target.raw"
    with peers.nbdkit("file", os.fspath(src), "cache=writeback", filters=["cache"]) as kit, \
            serve(f"p={kit.uri}", extra=["--control", ctl]) as peer:
        h = nbd.NBD()
        h.connect_uri(peer.uri_for("p"))
        for off in range(0, size, MiB):
            h.pwrite(data[off:off + MiB], off)
        h.shutdown()  # no FLUSH
        premise = map_zero_bytes(kit.uri)
        snap_copy = short_tmp / "snap.raw"

        async def scenario():
            qmp = QMPClient("doubts18")
            await qmp.connect(ctl)
            try:
                assert await qmp.execute("backup-start", {
                    "export": "p", "job-id": "j", "sync": "full", "target": os.fspath(target),
                    "snapshot": "snap", "speed": 1}) == {}
                zero_in_snapshot = map_zero_bytes(peer.uri_for("snap"))
                run_tool(peers.require("nbdcopy"), peer.uri_for("snap"), os.fspath(snap_copy))
                await qmp.execute("job-set-speed", {"id": "j", "speed": 0})
                info = await wait_concluded(qmp, "j")
                await qmp.execute("job-dismiss", {"id": "j"})
                return zero_in_snapshot, info
            finally:
                await qmp.disconnect()

        zero_in_snapshot, info = asyncio.run(asyncio.wait_for(scenario(), 150))
    assert premise == size, premise  # nbdkit called all the unflushed data zero
    assert zero_in_snapshot == 0
    assert "error" not in info and info.get("clusters-skipped-zero", 0) == 0, info
    with open(target, "rb") as f:
        assert f.read() == data
    with open(snap_copy, "rb") as f:
        assert f.read() == data
