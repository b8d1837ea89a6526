"""Acceptance of the scratch (issue 13, docs/scratch.md) with real peers.

- ``top`` over a qcow2 overlay behind qemu-nbd, with live writes to clusters
  outside the overlay while the job runs: the raw target's data clusters
  (SEEK_DATA/SEEK_HOLE) are exactly the overlay's; the backing file with the
  target's data clusters written into an overlay equals the point-in-time
  image (``qemu-img compare``); the snapshot export reads the whole
  point-in-time image before, during and after the job (``nbdcopy``).
- Three incremental rounds with live writes during each job, inside and
  outside the round's dirty set: every target's data clusters lie inside
  the dirty set (``nbdinfo --map=qemu:dirty-bitmap:b`` of the snapshot),
  and the previous image with the target's dirty clusters applied equals
  the point-in-time image (``qemu-img compare``).
- A pull client that TRIMs what it has read (``nbdbackup pull
  --trim-after-read`` against a snapshot started with ``snapshot-trim``):
  the scratch file's allocated bytes (st_blocks) fall, live writes to the
  trimmed regions then copy nothing (``bytes-copied-by-cbw`` unchanged),
  the ``/metrics`` scratch gauges follow,
  reads of them fail with EPERM (libnbd), and the pulled image is the
  point-in-time image.
"""

from __future__ import annotations

import asyncio
import glob
import os
import random
import shutil

import pytest
from qemu.qmp import QMPClient

import peers
from peers import wait_concluded
from qemutools import qemu_io
from peers import data_extents
from test_backup_top_qcow2 import CS, LIVE_WRITES, TOP_CLUSTERS, make_chain, run_tool, runs
from test_incremental_backup import apply_clusters, dirty_clusters, writes_for
from test_metrics import scrape


# Expectations count 64 KiB clusters (the default before session 14).
pytestmark = pytest.mark.usefixtures("clusters_of_64k")


MiB = 1 << 20


def scratch_files(d) -> list[str]:
    return sorted(glob.glob(os.path.join(os.fspath(d), ".nbdbackup-scratch-*")))


def data_clusters(path, cs: int = CS) -> set[int]:
    out: set[int] = set()
    for off, n in data_extents(os.fspath(path)):
        out.update(range(off // cs, (off + n + cs - 1) // cs))
    return out


def overlay_from_raw(base, raw, out, fmt_base: str = "qcow2") -> None:
    """``out``: a qcow2 overlay on ``base`` holding the data extents of the
    sparse ``raw`` file (what "backing + target" means for a top backup)."""
    import nbd

    run_tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}",
             "-b", os.fspath(base), "-F", fmt_base, os.fspath(out))
    with peers.qemu_nbd(out, fmt="qcow2") as q:
        h = nbd.NBD()
        h.connect_uri(q.uri)
        try:
            with open(raw, "rb") as f:
                for off, n in data_extents(os.fspath(raw)):
                    f.seek(off)
                    h.pwrite(f.read(n), off)
            h.flush()
        finally:
            h.shutdown()


@pytest.mark.timeout(120)
def test_top_target_is_exactly_the_overlay(serve, qemu_nbd, short_tmp, make_image, blake3_file):
    top, pit = make_chain(short_tmp, make_image)
    base = short_tmp / "base.qcow2"
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    nbdcopy = peers.require("nbdcopy")
    tdir = short_tmp / "targets"
    tdir.mkdir()
    target = tdir / "t.raw"

    with qemu_nbd(top, fmt="qcow2", extra=["--allocation-depth"]) as q, \
            serve(f"disk={q.uri}", extra=["--control", ctl]) as peer:
        live_uri = peer.uri_for("disk")

        async def snapshot_is_pit(uri: str, name: str) -> None:
            copy = short_tmp / name
            await asyncio.to_thread(run_tool, nbdcopy, uri, os.fspath(copy))
            assert blake3_file(copy) == blake3_file(pit), name
            copy.unlink()

        async def scenario() -> dict:
            qmp = QMPClient("scratch-top")
            await qmp.connect(ctl)
            try:
                await qmp.execute("backup-start", {"export": "disk", "job-id": "j", "sync": "top",
                                                   "target": os.fspath(target), "speed": 1})
                snap_uri = peer.uri_for("disk@j")
                (scratch,) = scratch_files(tdir)  # default: beside the target
                await snapshot_is_pit(snap_uri, "before.raw")
                await asyncio.to_thread(qemu_io, live_uri, *LIVE_WRITES)
                await snapshot_is_pit(snap_uri, "during.raw")
                info = {j["id"]: j for j in await qmp.execute("query-jobs")}["j"]
                assert info["bytes-cbw-to-scratch"] > 0 and info["scratch"] == scratch, info
                assert info["scratch-allocated"] == os.stat(scratch).st_blocks * 512 > 0, info
                await qmp.execute("job-set-speed", {"id": "j", "speed": 0})
                info = await wait_concluded(qmp, "j")
                assert "error" not in info, info
                await snapshot_is_pit(snap_uri, "after.raw")
                await qmp.execute("job-dismiss", {"id": "j"})
                assert scratch_files(tdir) == []  # removed at dismiss
                return info
            finally:
                await qmp.disconnect()

        info = asyncio.run(asyncio.wait_for(scenario(), 100))
    # The target holds exactly the overlay's clusters...
    assert data_extents(os.fspath(target)) == runs(TOP_CLUSTERS), (data_extents(os.fspath(target)), info)
    assert info["current-progress"] == info["total-progress"] == len(TOP_CLUSTERS) * CS, info
    # ... and backing + target is the point-in-time image.
    rebuilt = short_tmp / "rebuilt.qcow2"
    overlay_from_raw(base, target, rebuilt)
    run_tool("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", os.fspath(rebuilt), os.fspath(pit))


@pytest.mark.timeout(120)
def test_three_incremental_rounds_targets_inside_the_dirty_set(serve, short_tmp, make_image):
    size = 4 * MiB
    nclusters = size // CS
    disk = make_image(short_tmp / "disk.raw", size, [(0x11, 0, size // 2), (0x22, size // 2, size // 4)])
    full, chain = short_tmp / "full.raw", short_tmp / "chain.raw"
    state = short_tmp / "state"
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    rng = random.Random(13)
    nbdcopy = peers.require("nbdcopy")

    with serve(f"disk={disk}", extra=["--control", ctl, "--state-dir", os.fspath(state)]) as peer:
        live, snap = peer.uri_for("disk"), peer.uri_for("snap")

        async def scenario() -> list[dict]:
            qmp = QMPClient("scratch-inc")
            await qmp.connect(ctl)
            infos = []
            try:
                assert await qmp.execute("transaction", {"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"export": "disk", "name": "b"}},
                    {"type": "backup-start", "data": {"export": "disk", "job-id": "full", "sync": "full",
                                                      "target": os.fspath(full)}}]}) == {}
                assert "error" not in await wait_concluded(qmp, "full")
                await qmp.execute("job-dismiss", {"id": "full"})
                shutil.copyfile(full, chain)
                for rnd in range(3):
                    written = set(rng.sample(range(nclusters), 5 + rnd))
                    qemu_io(live, *writes_for(written, 0x40 + rnd))
                    pit = short_tmp / f"pit{rnd}.raw"
                    run_tool(nbdcopy, live, os.fspath(pit))
                    inc = short_tmp / f"inc{rnd}.raw"
                    await qmp.execute("backup-start", {
                        "export": "disk", "job-id": f"inc{rnd}", "sync": "incremental", "bitmap": "b",
                        "target": os.fspath(inc), "snapshot": "snap", "speed": 1})
                    dirty = dirty_clusters(snap, "b")
                    assert dirty >= written
                    # Live writes during the job: some inside the set, more outside.
                    outside = set(rng.sample(sorted(set(range(nclusters)) - dirty), 6))
                    inside = set(rng.sample(sorted(dirty), 2))
                    qemu_io(live, *writes_for(outside | inside, 0x70 + rnd))
                    assert scratch_files(state), "the default scratch lives in the state directory"
                    await qmp.execute("job-set-speed", {"id": f"inc{rnd}", "speed": 0})
                    info = await wait_concluded(qmp, f"inc{rnd}")
                    assert "error" not in info, info
                    assert info["current-progress"] == info["total-progress"] == len(dirty) * CS, info
                    # Their old content went to the scratch, except clusters that were
                    # zeros (a hole): recorded zero in the snapshot, copied nowhere.
                    old = pit.read_bytes()
                    holes = {c for c in outside if old[c * CS:(c + 1) * CS] == bytes(CS)}
                    assert info["bytes-cbw-to-scratch"] == len(outside - holes) * CS, (info, holes)
                    assert info["clusters-zero-in-snapshot"] == len(holes), (info, holes)
                    # The target's data clusters all lie inside the round's dirty set.
                    assert data_clusters(inc) <= dirty, (sorted(data_clusters(inc) - dirty), rnd)
                    apply_clusters(chain, inc, dirty)
                    await qmp.execute("job-dismiss", {"id": f"inc{rnd}"})
                    assert scratch_files(state) == []
                    run_tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(pit), os.fspath(chain))
                    infos.append(info)
                return infos
            finally:
                await qmp.disconnect()

        infos = asyncio.run(asyncio.wait_for(scenario(), 100))
    assert len(infos) == 3


@pytest.mark.timeout(120)
def test_pull_with_trim_shrinks_the_scratch(serve, short_tmp, make_image, libnbd):
    size = 8 * MiB
    disk = make_image(short_tmp / "disk.raw", size, [(0x31, 0, size)])
    state = short_tmp / "state"
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    pit = short_tmp / "pit.raw"
    shutil.copyfile(disk, pit)
    port = peers.free_tcp_port()
    gauge = 'nbdbackup_job_scratch_allocated_bytes{job="j",type="backup"}'

    with serve(f"disk={disk}", extra=["--control", ctl, "--state-dir", os.fspath(state),
                                      "--metrics", f"127.0.0.1:{port}"]) as peer:
        live = peer.uri_for("disk")

        async def scenario() -> dict:
            qmp = QMPClient("scratch-pull")
            await qmp.connect(ctl)
            try:
                await qmp.execute("block-dirty-bitmap-add", {"export": "disk", "name": "b"})
                qemu_io(live, *writes_for({0, 1}, 0x41))  # the dirty set: clusters 0, 1
                await asyncio.to_thread(run_tool, peers.require("nbdcopy"), live, os.fspath(pit))
                await qmp.execute("backup-start", {
                    "export": "disk", "job-id": "j", "sync": "incremental", "bitmap": "b",
                    "target": os.fspath(short_tmp / "inc.raw"), "snapshot": "snap", "speed": 1,
                    "snapshot-trim": True})
                (scratch,) = scratch_files(state)
                # 4 MiB of live writes outside the set: their old content fills the scratch.
                qemu_io(live, f"write -P 0x55 {MiB} {4 * MiB}")
                jobs = {j["id"]: j for j in await qmp.execute("query-jobs")}
                before = jobs["j"]
                blocks_before = os.stat(scratch).st_blocks * 512
                assert before["scratch-bytes"] == 4 * MiB and blocks_before >= 4 * MiB, before
                metrics = await asyncio.to_thread(scrape, port)
                assert metrics[gauge] == blocks_before, metrics
                assert metrics['nbdbackup_job_scratch_bytes{job="j",type="backup"}'] == 4 * MiB
                # The pull client reads the whole snapshot and TRIMs what it has read.
                out = short_tmp / "pulled.raw"
                r = await asyncio.to_thread(peers.nbdbackup_cli, "pull", "--trim-after-read", "--json",
                                            peer.uri_for("snap"), os.fspath(out))
                assert '"bytes_trimmed": %d' % size in r.stdout, r.stdout
                run_tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(pit), os.fspath(out))
                blocks_after = os.stat(scratch).st_blocks * 512
                after = {j["id"]: j for j in await qmp.execute("query-jobs")}["j"]
                assert blocks_after <= blocks_before - 4 * MiB, (blocks_before, blocks_after)
                assert after["scratch-bytes"] == 0 and after["scratch-allocated"] == blocks_after, after
                assert after["bytes-trimmed"] == size, after
                assert (await asyncio.to_thread(scrape, port))[gauge] == blocks_after
                # Live writes to trimmed regions now cost no copy.
                qemu_io(live, f"write -P 0x66 {5 * MiB} {2 * MiB}", "write -P 0x67 0 4096")
                later = {j["id"]: j for j in await qmp.execute("query-jobs")}["j"]
                assert later["bytes-copied-by-cbw"] == after["bytes-copied-by-cbw"], (after, later)
                assert later["scratch-bytes"] == 0 and os.stat(scratch).st_blocks * 512 == blocks_after
                # Reading a trimmed region is refused (EACCES: NBD EPERM).
                h = libnbd(peer.uri_for("snap"))
                with pytest.raises(Exception) as ei:
                    h.pread(4096, 2 * MiB)
                assert getattr(ei.value, "errnum", None) == 1, ei.value  # EPERM
                # The backup itself is unaffected: the set still reaches the target.
                await qmp.execute("job-set-speed", {"id": "j", "speed": 0})
                info = await wait_concluded(qmp, "j")
                assert "error" not in info, info
                await qmp.execute("job-dismiss", {"id": "j"})
                return info
            finally:
                await qmp.disconnect()

        info = asyncio.run(asyncio.wait_for(scenario(), 100))
    inc = short_tmp / "inc.raw"
    assert data_clusters(inc) == {0, 1}
    with open(inc, "rb") as f, open(pit, "rb") as p:
        assert f.read(2 * CS) == p.read(2 * CS)
    assert info["current-progress"] == 2 * CS
