"""sync=top through the real server over a qcow2 overlay served by qemu-nbd.

The source is ``top.qcow2`` (an overlay on ``base.qcow2``) served by
``qemu-nbd --allocation-depth``; ``nbdbackup serve`` re-exports it as
``disk=nbd+unix:///?socket=...`` and is driven over its control socket with
`qemu.qmp`.  ``qemu:allocation-depth`` tells which clusters the overlay
itself allocates; a ``top`` backup must copy exactly those:

- with no live writes, ``bytes-copied-by-pump`` == overlay clusters x cluster
  size, the raw target's data extents (SEEK_DATA/SEEK_HOLE) are exactly those
  clusters, and their content equals the overlay's (qemu-io -P);
- with live writes during the job (to overlay clusters, to clusters only the
  backing file holds, and to clusters allocated nowhere), the snapshot export
  still reads the point-in-time image, pattern by pattern (qemu-io -P), and
  as a whole (nbdcopy + blake3 against ``qemu-img convert`` of the overlay
  taken before the job).

Without ``qemu:allocation-depth`` (qemu-nbd without ``-A``) top falls back
to ``base:allocation``: every cluster with data anywhere in the chain.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest
from qemu.qmp import QMPClient

import peers
from peers import wait_concluded
from qemutools import qemu_io


# Expectations count 64 KiB clusters (the default before session 14).
pytestmark = pytest.mark.usefixtures("clusters_of_64k")


KiB = 1024
MiB = 1 << 20
CS = 64 * KiB
SIZE = 4 * MiB

#: written into base.qcow2 (pattern, offset, length)
BASE = [(0x11, 0, MiB), (0x22, MiB, MiB)]
#: written into top.qcow2 with qemu-io (qcow2 allocates whole 64 KiB clusters:
#: a partial write pulls the rest of the cluster up from the backing file).
TOP = [(0x33, 2 * CS, 100 * KiB),         # clusters 2-3 (cluster 3 partly backing data)
       (0x44, MiB + 5 * CS, CS),         # cluster 21, over base data
       (0x55, 3 * MiB, CS),              # cluster 48, where base has nothing
       (0x66, SIZE - 512, 512)]          # last cluster 63, a partial write over nothing
TOP_CLUSTERS = [2, 3, 21, 48, 63]


def point_in_time_checks() -> list[str]:
    """qemu-io read -P commands true of the overlay's image before the backup."""
    return [
        f"read -P 0x11 0 {2 * CS}",
        f"read -P 0x33 {2 * CS} {100 * KiB}",
        f"read -P 0x11 {2 * CS + 100 * KiB} {28 * KiB}",   # rest of cluster 3: from base
        f"read -P 0x11 {4 * CS} {MiB - 4 * CS}",
        f"read -P 0x22 {MiB} {5 * CS}",
        f"read -P 0x44 {MiB + 5 * CS} {CS}",
        f"read -P 0x22 {MiB + 6 * CS} {MiB - 6 * CS}",
        f"read -P 0 {2 * MiB} {MiB}",
        f"read -P 0x55 {3 * MiB} {CS}",
        f"read -P 0 {3 * MiB + CS} {MiB - CS - 512}",
        f"read -P 0x66 {SIZE - 512} 512",
    ]


#: live overwrites during the second job: an overlay cluster, backing-only
#: clusters (whole and partial), an unallocated cluster, a zero-write and a
#: discard over backing data.
LIVE_WRITES = [
    f"write -P 0xa1 {2 * CS} {CS}",
    f"write -P 0xa2 0 {CS}",
    f"write -P 0xa3 {10 * CS + 4096} 4096",
    f"write -P 0xa4 {MiB + 2 * CS} {2 * CS}",
    f"write -P 0xa5 {2 * MiB + 3 * CS} 512",
    f"write -z {MiB + 10 * CS} {CS}",
    f"discard {MiB + 12 * CS} {CS}",
    f"write -P 0xa6 {SIZE - 4096} 4096",
]


qio = qemu_io


def run_tool(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=60)
    assert r.returncode == 0, f"{' '.join(argv)} failed:\n{r.stdout}{r.stderr}"
    return r.stdout


def runs(clusters: list[int]) -> list[tuple[int, int]]:
    """Adjacent clusters merged into (offset, length) byte ranges."""
    out: list[list[int]] = []
    for c in sorted(clusters):
        if out and out[-1][1] == c * CS:
            out[-1][1] += CS
        else:
            out.append([c * CS, (c + 1) * CS])
    return [(a, b - a) for a, b in out]


def make_chain(short_tmp, make_image):
    """base.qcow2 <- top.qcow2 with BASE and TOP written; returns (top, pit):
    pit is the overlay's image flattened to raw by qemu-img convert."""
    base = make_image(short_tmp / "base.qcow2", SIZE, BASE, fmt="qcow2")
    top = short_tmp / "top.qcow2"
    run_tool("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CS}",
             "-b", os.fspath(base), "-F", "qcow2", os.fspath(top))
    qio(os.fspath(top), *(f"write -P {p:#x} {o} {n}" for p, o, n in TOP), fmt="qcow2")
    pit = short_tmp / "pit.raw"
    run_tool("qemu-img", "convert", "-f", "qcow2", "-O", "raw", os.fspath(top), os.fspath(pit))
    qio(os.fspath(pit), *point_in_time_checks(), read_only=True)
    return top, pit


@pytest.mark.timeout(60)
def test_top_without_allocation_depth_uses_base_allocation(serve, qemu_nbd, short_tmp, make_image):
    """Without ``qemu:allocation-depth`` (qemu-nbd without -A) top falls back to
    ``base:allocation``: every cluster with data anywhere in the chain."""
    top, pit = make_chain(short_tmp, make_image)
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    with qemu_nbd(top, fmt="qcow2") as q:
        out = run_tool(peers.require("nbdinfo"), "--map", q.uri)
        data = []
        for line in out.splitlines():
            off, length, flags = (int(x) for x in line.split()[:3])
            if not flags & 1:
                data += range(off // CS, (off + length + CS - 1) // CS)
        assert set(TOP_CLUSTERS) < set(data), out
        with serve(f"disk={q.uri}", extra=["--control", ctl]):
            async def scenario() -> dict:
                qmp = QMPClient("top-test")
                await qmp.connect(ctl)
                try:
                    await qmp.execute("backup-start", {"export": "disk", "job-id": "j", "sync": "top",
                                                       "target": os.fspath(short_tmp / "t.raw")})
                    info = await wait_concluded(qmp, "j")
                    await qmp.execute("job-dismiss", {"id": "j"})
                    return info
                finally:
                    await qmp.disconnect()

            info = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert "error" not in info, info
    assert info["bytes-copied-by-pump"] == len(data) * CS, (info, data)
    t, p = (short_tmp / "t.raw").read_bytes(), pit.read_bytes()
    for c in range(SIZE // CS):
        assert t[c * CS:(c + 1) * CS] == (p[c * CS:(c + 1) * CS] if c in data else bytes(CS)), c


@pytest.mark.timeout(120)
def test_top_copies_only_overlay_clusters(serve, qemu_nbd, short_tmp, make_image, blake3_file):
    top, pit = make_chain(short_tmp, make_image)
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    nbdinfo, nbdcopy = peers.require("nbdinfo"), peers.require("nbdcopy")

    with qemu_nbd(top, fmt="qcow2", extra=["--allocation-depth"]) as q:
        # qemu-nbd offers qemu:allocation-depth and it names exactly our clusters.
        out = run_tool(nbdinfo, "--map=qemu:allocation-depth", q.uri)
        local = []
        for line in out.splitlines():
            off, length, depth = (int(x) for x in line.split()[:3])
            if depth == 1:
                local += range(off // CS, (off + length) // CS)
        assert local == TOP_CLUSTERS, out

        with serve(f"disk={q.uri}", extra=["--control", ctl]) as peer:
            live_uri = peer.uri_for("disk")

            async def scenario() -> None:
                qmp = QMPClient("top-test")
                await qmp.connect(ctl)
                try:
                    # 1. No live writes: the pump copies the overlay's clusters only.
                    t1 = short_tmp / "t1.raw"
                    assert await qmp.execute("backup-start", {
                        "export": "disk", "job-id": "j1", "sync": "top",
                        "target": os.fspath(t1)}) == {}
                    info = await wait_concluded(qmp, "j1")
                    assert "error" not in info, info
                    assert info["cluster-size"] == CS, info
                    assert info["bytes-copied-by-pump"] == len(TOP_CLUSTERS) * CS, info
                    assert info["bytes-copied-by-cbw"] == 0, info
                    assert info["current-progress"] == info["total-progress"] == len(TOP_CLUSTERS) * CS, info
                    assert peers.data_extents(os.fspath(t1)) == runs(TOP_CLUSTERS)
                    with open(t1, "rb") as ft, open(pit, "rb") as fp:
                        t, p = ft.read(), fp.read()
                    assert len(t) == SIZE
                    for c in range(SIZE // CS):
                        want = p[c * CS:(c + 1) * CS] if c in TOP_CLUSTERS else bytes(CS)
                        assert t[c * CS:(c + 1) * CS] == want, f"target cluster {c}"
                    await qmp.execute("job-dismiss", {"id": "j1"})

                    # 2. Live writes while a slow top job runs: the snapshot
                    #    (default name disk@j2) stays the point-in-time image.
                    t2 = short_tmp / "t2.raw"
                    await qmp.execute("backup-start", {
                        "export": "disk", "job-id": "j2", "sync": "top",
                        "target": os.fspath(t2), "speed": 1})
                    snap_uri = peer.uri_for("disk@j2")
                    await asyncio.to_thread(qio, live_uri, *LIVE_WRITES)
                    await asyncio.to_thread(qio, live_uri, "read -P 0xa2 0 65536",
                                            f"read -P 0xa4 {MiB + 2 * CS} {2 * CS}", read_only=True)
                    await asyncio.to_thread(qio, snap_uri, *point_in_time_checks(), read_only=True)
                    copy = short_tmp / "snap.raw"
                    await asyncio.to_thread(run_tool, nbdcopy, snap_uri, os.fspath(copy))
                    assert blake3_file(copy) == blake3_file(pit)
                    await qmp.execute("job-set-speed", {"id": "j2", "speed": 0})
                    info = await wait_concluded(qmp, "j2")
                    assert "error" not in info, info
                    # CBW saved the backing-only clusters that were overwritten.
                    assert info["bytes-copied-by-cbw"] > 0, info
                    await asyncio.to_thread(qio, snap_uri, *point_in_time_checks(), read_only=True)
                    # The target holds the overlay clusters as they were.
                    with open(t2, "rb") as ft, open(pit, "rb") as fp:
                        t, p = ft.read(), fp.read()
                    for c in TOP_CLUSTERS:
                        assert t[c * CS:(c + 1) * CS] == p[c * CS:(c + 1) * CS], f"target cluster {c}"
                    await qmp.execute("job-dismiss", {"id": "j2"})
                finally:
                    await qmp.disconnect()

            asyncio.run(asyncio.wait_for(scenario(), 100))

    # The live writes reached the overlay (through our server, through qemu-nbd).
    qio(os.fspath(top), "read -P 0xa1 131072 65536", "read -P 0xa2 0 65536",
        f"read -P 0xa3 {10 * CS + 4096} 4096", f"read -P 0x11 {10 * CS} 4096",
        f"read -P 0 {MiB + 10 * CS} {CS}", f"read -P 0xa6 {SIZE - 4096} 4096",
        read_only=True, fmt="qcow2")
