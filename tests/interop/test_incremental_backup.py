"""Incremental backups end to end through the real server and real peers.

`nbdbackup serve --control --state-dir` with a raw file export; QMP from
qemu.qmp; live writes from qemu-io; the dirty map of the snapshot export
read with ``nbdinfo --map=qemu:dirty-bitmap:NAME --json``; images compared
with ``qemu-img compare``.

- three rounds: full backup + new persistent bitmap in one ``transaction``,
  then incrementals: the snapshot's dirty map is exactly the written
  clusters, the job copies exactly dirty clusters x cluster size, and the
  full image with every incremental's dirty ranges applied equals the
  point-in-time image; writes during a job land in the next incremental;
- the live export lists its bitmaps (LIST wildcard ``qemu:dirty-bitmap:``)
  and ``nbdinfo --map`` on it shows the live dirty ranges;
- ``transaction``: all or nothing (a failing action undoes earlier ones);
  grouped completion over two exports with one failing target: neither
  bitmap is committed (individual mode: only the failed one is kept).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.qmp_client import ExecuteError

import peers
from peers import wait_concluded as wait_job
from qemutools import qemu_io


# Expectations count 64 KiB clusters (the default before session 14).
pytestmark = pytest.mark.usefixtures("clusters_of_64k")


KiB = 1024
MiB = 1 << 20
CS = 64 * KiB


# -- helpers (also imported by the other bitmap test files) --------------------


qio = qemu_io  # (imported by the other bitmap test files)


def run_tool(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=60)
    assert r.returncode == 0, f"{' '.join(argv)} failed:\n{r.stdout}{r.stderr}"
    return r.stdout


def nbdinfo_map(uri: str, context: str) -> list[dict]:
    return json.loads(run_tool(peers.require("nbdinfo"), "--json", f"--map={context}", uri))


def dirty_clusters(uri: str, bitmap: str, cs: int = CS) -> set[int]:
    """Clusters the export's ``qemu:dirty-bitmap:BITMAP`` context reports dirty."""
    out: set[int] = set()
    for e in nbdinfo_map(uri, f"qemu:dirty-bitmap:{bitmap}"):
        if e["type"] & 1:
            out.update(range(e["offset"] // cs, (e["offset"] + e["length"] + cs - 1) // cs))
    return out


def allocated_clusters(uri: str, cs: int = CS) -> set[int]:
    """Clusters holding data in the export's base:allocation (nbdkit memory: written ones)."""
    out: set[int] = set()
    for e in nbdinfo_map(uri, "base:allocation"):
        if not e["type"] & 1:
            out.update(range(e["offset"] // cs, (e["offset"] + e["length"] + cs - 1) // cs))
    return out


def writes_for(clusters, pattern: int, cs: int = CS) -> list[str]:
    """qemu-io commands touching each cluster (a partial write in its middle)."""
    return [f"write -P {pattern:#x} {c * cs + 512 * (c % 7)} {4096 + 512 * (c % 5)}" for c in sorted(clusters)]


def apply_clusters(image, source, clusters, cs: int = CS) -> None:
    """Copy ``clusters`` from file ``source`` over file ``image``."""
    with open(source, "rb") as s, open(image, "r+b") as d:
        for c in sorted(clusters):
            s.seek(c * cs)
            d.seek(c * cs)
            d.write(s.read(cs))


async def qmp_connect(path: str) -> QMPClient:
    qmp = QMPClient("bitmap-test")
    await qmp.connect(path)
    return qmp


async def bitmap_info(qmp: QMPClient, export: str, name: str) -> dict:
    for b in await qmp.execute("query-bitmaps", {"export": export}):
        if b["name"] == name:
            return b
    raise AssertionError(f"no bitmap {name!r} on {export!r}")


async def refused(qmp: QMPClient, cmd: str, args: dict) -> str:
    """Run a command that must fail; return its error text."""
    try:
        r = await qmp.execute(cmd, args)
    except ExecuteError as e:
        return str(e)
    raise AssertionError(f"{cmd} {args} was accepted: {r}")


async def inconsistent_and_refused(qmp: QMPClient, export: str, bitmap: str, size: int) -> tuple[bool, dict]:
    """(whether ``bitmap`` loaded inconsistent, its query-bitmaps entry); an inconsistent one
    must refuse an incremental backup-start with a message that says to take a full backup."""
    info = await bitmap_info(qmp, export, bitmap)
    if info["inconsistent"]:
        msg = await refused(qmp, "backup-start", {
            "export": export, "job-id": "x", "sync": "incremental", "bitmap": bitmap,
            "target": f"memory:{size}"})
        assert "full backup" in msg, msg
    return info["inconsistent"], info


def list_contexts(uri: str, query: str) -> list[str]:
    """NBD_OPT_LIST_META_CONTEXT with one query (libnbd)."""
    import nbd

    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(uri)
    try:
        h.add_meta_context(query)
        found: list[str] = []
        h.opt_list_meta_context(lambda name: found.append(name) or 0)
        return sorted(found)
    finally:
        h.opt_abort()


def ctl_path() -> str:
    return os.path.join(peers.short_tempdir(), "ctl.sock")


# -- tests ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_three_incremental_rounds(serve, short_tmp, make_image):
    size = 4 * MiB
    nclusters = size // CS
    disk = make_image(short_tmp / "disk.raw", size, [(0x11, 0, size // 2), (0x22, size // 2, size // 4)])
    full = short_tmp / "full.raw"
    chain = short_tmp / "chain.raw"
    state = short_tmp / "state"
    ctl = ctl_path()
    rng = random.Random(5)

    with serve(f"disk={disk}", extra=["--control", ctl, "--state-dir", os.fspath(state)]) as peer:
        live, snap = peer.uri_for("disk"), peer.uri_for("snap")

        async def scenario():
            qmp = await qmp_connect(ctl)
            try:
                # Full backup and a new bitmap at one point in time.
                assert await qmp.execute("transaction", {"actions": [
                    {"type": "block-dirty-bitmap-add",
                     "data": {"export": "disk", "name": "b0", "persistent": True}},
                    {"type": "backup-start", "data": {"export": "disk", "job-id": "full", "sync": "full",
                                                      "target": os.fspath(full)}},
                ]}) == {}
                info = await wait_job(qmp, "full")
                assert "error" not in info, info
                await qmp.execute("job-dismiss", {"id": "full"})
                b0 = await bitmap_info(qmp, "disk", "b0")
                assert b0 == {"name": "b0", "granularity": CS, "count": 0, "recording": True,
                              "busy": False, "persistent": True, "inconsistent": False}
                shutil.copyfile(full, chain)

                # The live export offers its bitmap (LIST wildcard) and maps it.
                lst = run_tool(peers.require("nbdinfo"), "--list", "--content", "--json", peer.uri)
                assert "qemu:dirty-bitmap:b0" in lst
                assert list_contexts(live, "qemu:dirty-bitmap:") == ["qemu:dirty-bitmap:b0"]
                assert dirty_clusters(live, "b0") == set()

                carried: set[int] = set()  # written during the previous job
                for rnd in range(3):
                    written = set(rng.sample(range(nclusters), 6 + rnd)) | ({nclusters - 1} if rnd == 1 else set())
                    qio(live, *writes_for(written, 0x40 + rnd))
                    expect = written | carried
                    assert dirty_clusters(live, "b0") == expect
                    assert (await bitmap_info(qmp, "disk", "b0"))["count"] == len(expect) * CS
                    pit = short_tmp / f"pit{rnd}.raw"
                    run_tool(peers.require("nbdcopy"), live, os.fspath(pit))
                    inc = short_tmp / f"inc{rnd}.raw"
                    await qmp.execute("backup-start", {
                        "export": "disk", "job-id": f"inc{rnd}", "sync": "incremental", "bitmap": "b0",
                        "target": os.fspath(inc), "snapshot": "snap", "speed": 1})
                    assert (await bitmap_info(qmp, "disk", "b0"))["busy"] is True
                    # The snapshot's frozen map is exactly the dirty clusters.
                    assert dirty_clusters(snap, "b0") == expect
                    # Writes during the job go to the successor: next round.
                    carried = {rng.randrange(nclusters)} if rnd < 2 else set()
                    if carried:
                        qio(live, *writes_for(carried, 0x70 + rnd))
                    await qmp.execute("job-set-speed", {"id": f"inc{rnd}", "speed": 0})
                    info = await wait_job(qmp, f"inc{rnd}")
                    assert "error" not in info, info
                    # Progress counts exactly the dirty clusters; copy-before-write also saves
                    # the clusters written during the job (the snapshot export shows the whole
                    # point-in-time image), dirty or not -- those outside the dirty set into
                    # the scratch, not the target -- and nothing else is copied.
                    assert info["current-progress"] == info["total-progress"] == len(expect) * CS, info
                    assert info["bytes-copied-by-pump"] + info["bytes-copied-by-cbw"] \
                        == len(expect | carried) * CS, info
                    assert info["bytes-copied-by-pump"] >= len(expect - carried) * CS, info
                    # (a cluster that was a hole is zero in the snapshot: copied nowhere)
                    assert info["bytes-cbw-to-scratch"] <= len(carried - expect) * CS, info
                    apply_clusters(chain, inc, dirty_clusters(snap, "b0"))
                    await qmp.execute("job-dismiss", {"id": f"inc{rnd}"})
                    b0 = await bitmap_info(qmp, "disk", "b0")
                    assert not b0["busy"] and b0["count"] == len(carried) * CS, b0
                    run_tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(pit), os.fspath(chain))
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(scenario(), 50))


@pytest.mark.timeout(60)
def test_transaction_all_or_nothing(serve, short_tmp):
    size = 2 * MiB
    ctl = ctl_path()
    with serve(f"disk=memory:{size}", extra=["--control", ctl]) as peer:
        live = peer.uri_for("disk")

        async def scenario():
            qmp = await qmp_connect(ctl)
            try:
                await qmp.execute("block-dirty-bitmap-add", {"export": "disk", "name": "b"})
                qio(live, *writes_for({2, 5}, 0x61))
                names = lambda: qmp.execute("query-bitmaps", {"export": "disk"})  # noqa: E731
                # Refused while preparing (abort action; a target that cannot be opened).
                msg = await refused(qmp, "transaction", {"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"export": "disk", "name": "x"}},
                    {"type": "abort", "data": {}}]})
                assert "abort" in msg.lower()
                target = short_tmp / "no" / "such" / "dir.raw"
                msg = await refused(qmp, "transaction", {"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"export": "disk", "name": "x"}},
                    {"type": "block-dirty-bitmap-clear", "data": {"export": "disk", "name": "b"}},
                    {"type": "backup-start", "data": {"export": "disk", "job-id": "j", "sync": "full",
                                                      "target": os.fspath(target)}}]})
                assert [b["name"] for b in await names()] == ["b"]
                assert dirty_clusters(live, "b") == {2, 5}
                # Refused at the point in time (the backup's bitmap does not exist): the
                # add, the clear and the merge before it are undone, the prepared job is gone.
                await qmp.execute("block-dirty-bitmap-add", {"export": "disk", "name": "c"})
                qio(live, *writes_for({9}, 0x62))
                tgt = short_tmp / "t.raw"
                msg = await refused(qmp, "transaction", {"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"export": "disk", "name": "x"}},
                    {"type": "block-dirty-bitmap-clear", "data": {"export": "disk", "name": "b"}},
                    {"type": "block-dirty-bitmap-merge",
                     "data": {"export": "disk", "target": "c", "bitmaps": ["b"]}},
                    {"type": "block-dirty-bitmap-remove", "data": {"export": "disk", "name": "c"}},
                    {"type": "backup-start", "data": {"export": "disk", "job-id": "j", "sync": "incremental",
                                                      "bitmap": "missing", "target": os.fspath(tgt)}}]})
                assert "missing" in msg, msg
                assert [b["name"] for b in await names()] == ["b", "c"]
                assert dirty_clusters(live, "b") == {2, 5, 9}
                assert dirty_clusters(live, "c") == {9}
                assert await qmp.execute("query-jobs") == []
                assert not tgt.exists()
                # The same without the bad action: everything applies at one instant.
                await qmp.execute("transaction", {"actions": [
                    {"type": "backup-start", "data": {"export": "disk", "job-id": "j", "sync": "incremental",
                                                      "bitmap": "b", "target": os.fspath(tgt), "snapshot": "s"}},
                    {"type": "block-dirty-bitmap-add", "data": {"export": "disk", "name": "x"}},
                    {"type": "block-dirty-bitmap-remove", "data": {"export": "disk", "name": "c"}}]})
                assert "error" not in await wait_job(qmp, "j")
                assert dirty_clusters(peer.uri_for("s"), "b") == {2, 5, 9}
                await qmp.execute("job-dismiss", {"id": "j"})
                assert [(b["name"], b["count"]) for b in await names()] == [("b", 0), ("x", 0)]
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(scenario(), 50))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["grouped", "individual"])
def test_transaction_two_exports_one_target_fails(mode, serve, nbdkit, short_tmp):
    """grouped: neither bitmap is committed; individual: only the failed job's bitmap is kept."""
    size = 2 * MiB
    ctl = ctl_path()
    a1, a2 = {0, 3, 6, 9, 12, 15}, {1, 2, 30}
    errfile = short_tmp / "err"
    errfile.touch()
    with serve(f"d1=memory:{size}", f"d2=memory:{size}", extra=["--control", ctl]) as peer, \
            nbdkit("memory", str(size), "error-pwrite-rate=1", f"error-file={errfile}",
                   filters=["error"]) as bad:

        async def scenario():
            qmp = await qmp_connect(ctl)
            try:
                for exp, bm, dirty in (("d1", "b1", a1), ("d2", "b2", a2)):
                    await qmp.execute("block-dirty-bitmap-add", {"export": exp, "name": bm})
                    qio(peer.uri_for(exp), *writes_for(dirty, 0x44))
                await qmp.execute("transaction", {
                    "actions": [
                        {"type": "backup-start", "data": {"export": "d1", "job-id": "j1", "sync": "incremental",
                                                          "bitmap": "b1", "target": os.fspath(short_tmp / "t1.raw")}},
                        {"type": "backup-start", "data": {"export": "d2", "job-id": "j2", "sync": "incremental",
                                                          "bitmap": "b2", "target": bad.uri}}],
                    "properties": {"completion-mode": mode}})
                j1, j2 = await wait_job(qmp, "j1"), await wait_job(qmp, "j2")
                assert "error" in j2, j2
                if mode == "individual":
                    assert "error" not in j1, j1
                for j in ("j1", "j2"):
                    await qmp.execute("job-dismiss", {"id": j})
                b1, b2 = await bitmap_info(qmp, "d1", "b1"), await bitmap_info(qmp, "d2", "b2")
                assert not b1["busy"] and not b2["busy"]
                assert b2["count"] == len(a2) * CS
                assert dirty_clusters(peer.uri_for("d2"), "b2") == a2
                want1 = a1 if mode == "grouped" else set()
                assert b1["count"] == len(want1) * CS, (mode, b1, j1)
                assert dirty_clusters(peer.uri_for("d1"), "b1") == want1
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(scenario(), 50))
