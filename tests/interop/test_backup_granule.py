"""The default copy granule through the real server (docs/cbwsub.md).

A backup started without ``cluster-size`` copies in 4 KiB clusters (on a
disk below 64 GiB, into a target preferring 4 KiB), so a 4 KiB live write
saves its own 4 KiB for the snapshot, not a 64 KiB cluster.  Checked with
real peers:

- qemu-io issues ~300 small writes (4 KiB aligned, 512-byte unaligned, some
  spanning two granules, zero-writes, a discard) on the live export during a
  ``sync=none`` / ``sync=full`` backup; the snapshot export must still equal
  the original (``qemu-img compare`` against the original file), the live
  export must equal the same writes applied locally, a ``full`` target must
  equal the original, and copy-before-write must have copied exactly the
  4 KiB granules the writes touched (``bytes-copied-by-cbw``), no more;
- a target that prefers 64 KiB requests (nbdkit's blocksize-policy filter)
  gets 64 KiB clusters by default, and an explicit ``cluster-size`` is
  honoured as asked.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time

import pytest
from qemu.qmp import QMPClient

import peers
from peers import assert_target_saved, finish_job, run_tool, wait_concluded
from qemutools import qemu_io as qio

KiB = 1024
MiB = 1 << 20
G = 4 * KiB
SIZE = 16 * MiB



def small_writes(seed: int) -> tuple[list[str], set[int]]:
    """qemu-io commands (small writes all over the disk) and the 4 KiB
    granules they touch."""
    rnd = random.Random(seed)
    cmds: list[str] = []
    touched: set[int] = set()
    for i in range(300):
        kind = rnd.random()
        if kind < 0.6:  # an aligned 4 KiB write
            off, n = rnd.randrange(SIZE // G) * G, G
        elif kind < 0.85:  # 512 bytes, unaligned to the granule
            off, n = rnd.randrange(SIZE // 512) * 512, 512
        else:  # 4 KiB straddling two granules
            off, n = rnd.randrange(SIZE // G - 1) * G + 2 * KiB, G
        if i % 50 == 7:
            cmds.append(f"write -z {off} {n}")
        elif i % 50 == 19:
            cmds.append(f"discard {off} {n}")
        else:
            cmds.append(f"write -P {0x40 + i % 64:#x} {off} {n}")
        touched.update(range(off // G, (off + n - 1) // G + 1))
    return cmds, touched


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sync", ["none", "full"])
def test_small_writes_copy_only_their_granules(sync, serve, short_tmp):
    disk = short_tmp / "disk.raw"
    with open(disk, "wb") as f:  # random data everywhere: no zero cluster to skip
        f.write(random.Random(5).randbytes(SIZE))
    orig = short_tmp / "orig.raw"
    shutil.copyfile(disk, orig)
    cmds, touched = small_writes(seed=11)
    expected = short_tmp / "expected.raw"
    shutil.copyfile(disk, expected)
    qio(expected, *cmds)
    target = short_tmp / "target.raw"
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")

    with serve(f"disk={disk}", extra=["--control", ctl]) as peer:
        live_uri, snap_uri = peer.uri_for("disk"), peer.uri_for("snap")

        async def scenario():
            qmp = QMPClient("granule-test")
            await qmp.connect(ctl)
            try:
                assert await qmp.execute("backup-start", {
                    "export": "disk", "job-id": "j", "sync": sync, "target": os.fspath(target),
                    "snapshot": "snap", "speed": 1}) == {}
                job = (await qmp.execute("query-jobs"))[0]
                assert job["cluster-size"] == G, job
                qio(live_uri, *cmds)
                run_tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(orig), snap_uri)
                job = (await qmp.execute("query-jobs"))[0]
                # Exactly the granules written over, each once (the pump, at
                # 1 B/s, copied at most its first cluster before them).
                copied = job["bytes-copied-by-cbw"] + job["bytes-copied-by-pump"]
                assert job["bytes-copied-by-cbw"] <= len(touched) * G <= copied + G, (job, len(touched))
                await finish_job(qmp, "j", sync)
                run_tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(orig), snap_uri)
                await qmp.execute("job-dismiss", {"id": "j"})
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(scenario(), 150))
        run_tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(expected), live_uri)
        # The server's log (serve logs at INFO) names the granule.
        for _ in range(100):
            if "cluster-size 4096 (default)" in peer.log():
                break
            time.sleep(0.05)
        assert "cluster-size 4096 (default)" in peer.log(), peer.log()
    assert_target_saved(orig, target, touched, G, whole=sync == "full")


@pytest.mark.timeout(120)
def test_a_target_preferring_64k_gets_64k_clusters(serve, nbdkit, short_tmp):
    disk = short_tmp / "disk.raw"
    with open(disk, "wb") as f:
        f.write(random.Random(6).randbytes(SIZE))
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    with nbdkit("memory", str(SIZE), "blocksize-preferred=65536", filters=["blocksize-policy"]) as tgt, \
            serve(f"disk={disk}", extra=["--control", ctl]) as peer:

        async def scenario():
            qmp = QMPClient("granule-test")
            await qmp.connect(ctl)
            try:
                for job_id, asked, want in (("a", None, 64 * KiB), ("b", 8 * KiB, 8 * KiB)):
                    args = {"export": "disk", "job-id": job_id, "sync": "full", "target": tgt.uri}
                    if asked is not None:
                        args["cluster-size"] = asked
                    await qmp.execute("backup-start", args)
                    info = await wait_concluded(qmp, job_id)
                    assert "error" not in info and info["cluster-size"] == want, info
                    await qmp.execute("job-dismiss", {"id": job_id})
                    run_tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(disk), tgt.uri)
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(scenario(), 100))
        assert peer.alive()
