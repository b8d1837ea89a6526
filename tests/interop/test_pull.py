"""Interop: the pull agent (``nbdbackup pull`` / ``nbdbackup verify``) against real servers.

- nbdkit sparse-random: a full pull equals ``nbdcopy``'s copy byte for
  byte, reads only the data extents and leaves holes sparse; ``verify``
  passes on the copy and on the export, and fails (exit 1, naming the chunk)
  after one byte of the copy is changed.
- qemu-nbd with ``-B`` on a qcow2 bitmap: an incremental pull reads exactly
  the dirty data, zeroes the dirty zeroed range, and yields an image that
  ``qemu-img compare`` finds identical; its manifest (built from the base
  manifest for clean chunks) verifies against the export.
- our own server, end to end: a fleecing job's snapshot export is pulled
  while a writer changes the live disk (the pull equals the disk as it was
  at the job's start); a dirty bitmap created in the same transaction then
  drives an incremental pull from the next job's snapshot export, which
  equals the disk at that job's start and reads only the changed clusters.
- refusals: a missing bitmap, an incremental pull without a previous image,
  a size mismatch, a damaged manifest: one clear line, exit 1.
- the command ends by ``cli._quick_exit`` once the copy is durable and
  reported, only when run from the command line (``main(argv)`` returns).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from pathlib import Path


import peers
from nbdbackup.control.client import ControlClient
from nbdbackup.nbd.client import connect
from peers import wait_concluded
from qemutools import qemu_io

ROOT = Path(__file__).resolve().parents[2]
M = 1 << 20
CS = 64 * 1024


nb = peers.nbdbackup_cli


def pull_json(*args: str) -> dict:
    return json.loads(nb("pull", *args, "--json").stdout)


def test_full_pull_matches_nbdcopy_and_verify_catches_a_flipped_byte(short_tmp):
    with peers.nbdkit("sparse-random", "96M", "seed=11", "percent=25", "runlength=300000") as k:
        ref, got, man = short_tmp / "ref.raw", short_tmp / "got.raw", short_tmp / "m.json"
        subprocess.run(["nbdcopy", k.uri, str(ref)], check=True)
        st = pull_json(k.uri, str(got), "--manifest", str(man), "--chunk-size", "1M")
        assert got.read_bytes() == ref.read_bytes()
        data = sum(e["length"] for e in json.loads(subprocess.run(
            ["nbdinfo", "--map", "--json", k.uri], capture_output=True, text=True, errors="replace", check=True).stdout)
            if e["type"] & 3 != 3)
        assert st["bytes_read"] == data < 96 * M
        assert os.stat(got).st_blocks * 512 < 96 * M * 0.6  # holes stayed holes
        assert nb("verify", str(got), "--manifest", str(man)).stdout.startswith("OK: 96 chunks")
        assert nb("verify", k.uri, "--manifest", str(man)).stdout.startswith("OK")
        assert json.loads(man.read_text())["root"] == st["root"]
        # O_DIRECT by default (on this file system); --buffered: the page cache, the same copy.
        got2 = short_tmp / "got2.raw"
        st2 = pull_json(k.uri, str(got2), "--chunk-size", "1M", "--buffered")
        assert st["direct_io"] and not st2["direct_io"] and st2["root"] == st["root"]
        assert got2.read_bytes() == ref.read_bytes()
    with open(got, "r+b") as f:
        f.seek(37 * M + 5)
        b = f.read(1)
        f.seek(37 * M + 5)
        f.write(bytes([b[0] ^ 1]))
    r = nb("verify", str(got), "--manifest", str(man), ok=False)
    assert r.returncode == 1 and f"chunk 37 ({37 * M}, {M}) differs" in r.stdout, r.stdout


def test_incremental_pull_from_qemu_nbd_bitmap(short_tmp):
    disk = short_tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    qemu_io(disk, "write -P 0x11 0 8M", "write -P 0x22 20M 4M", fmt="qcow2")
    subprocess.run(["qemu-img", "bitmap", "--add", str(disk), "b0"], check=True)
    img, m0, m1 = short_tmp / "img.raw", short_tmp / "m0.json", short_tmp / "m1.json"
    with peers.qemu_nbd(disk, fmt="qcow2", read_only=True) as q:
        pull_json(q.uri, str(img), "--manifest", str(m0))
    qemu_io(disk, "write -P 0x33 1M 64k", "write -z 21M 1M", "write -P 0x44 40M 128k", fmt="qcow2")
    with peers.qemu_nbd(disk, fmt="qcow2", read_only=True, bitmap="b0") as q:
        st = pull_json(q.uri, str(img), "--bitmap", "b0", "--base-manifest", str(m0), "--manifest", str(m1))
        assert (st["bytes_read"], st["bytes_zeroed"]) == (64 * 1024 + 128 * 1024, M)
        assert st["chunks_worked"] == 3
        assert nb("verify", q.uri, "--manifest", str(m1)).returncode == 0
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(img), str(disk)], check=True)
    assert nb("verify", str(img), "--manifest", str(m1)).returncode == 0


def test_pull_snapshot_exports_of_our_server_under_live_writes(short_tmp, make_image):
    size = 32 * M
    disk = make_image(short_tmp / "disk.raw", size, [(0x5A, 0, 12 * M), (0x00, 12 * M, M), (0xC3, 20 * M, 3 * M)])
    original = disk.read_bytes()
    ctl = os.path.join(peers.short_tempdir(), "c.sock")
    img, m0, m1 = short_tmp / "img.raw", short_tmp / "m0.json", short_tmp / "m1.json"
    rng = random.Random(3)
    with peers.nbdbackup_serve(f"disk={disk}", extra=["--control", ctl, "--state-dir", str(short_tmp / "st")]) as p:
        live = p.uri_for("disk")

        async def scenario() -> None:
            async with ControlClient(ctl) as qmp:
                # Job 1 (fleecing) and bitmap b0 start at one instant.
                await qmp.execute("transaction", {"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"export": "disk", "name": "b0"}},
                    {"type": "backup-start", "data": {"export": "disk", "job-id": "f0", "sync": "none",
                                                      "target": f"memory:{size}", "snapshot": "snap0"}}]})
                puller = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "nbdbackup.cli", "pull", p.uri_for("snap0"), str(img),
                    "--manifest", str(m0), "--chunk-size", "1M", "--json", cwd=ROOT,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                changed: set[int] = set()
                async with await connect(live) as c:
                    while puller.returncode is None:  # write while the pull runs
                        cl = rng.randrange(size // CS)
                        await c.pwrite(os.urandom(4096), cl * CS + rng.randrange(CS // 4096) * 4096)
                        changed.add(cl)
                        try:
                            await asyncio.wait_for(puller.wait(), 0.002)
                        except asyncio.TimeoutError:
                            pass
                    out, err = await puller.communicate()
                    assert puller.returncode == 0, err
                    assert len(changed) > 5
                    assert img.read_bytes() == original  # the disk at job f0's start
                    assert nb("verify", p.uri_for("snap0"), "--manifest", str(m0)).returncode == 0
                    await qmp.execute("job-cancel", {"id": "f0"})
                    await wait_concluded(qmp, "f0")
                    await qmp.execute("job-dismiss", {"id": "f0"})
                    # Job 2: incremental over b0; its snapshot export carries the frozen bitmap.
                    await qmp.execute("backup-start", {"export": "disk", "job-id": "i1", "sync": "incremental",
                                                       "bitmap": "b0", "target": f"memory:{size}",
                                                       "snapshot": "snap1"})
                    at_start = bytes(await c.pread(size, 0))
                    st = json.loads((await asyncio.to_thread(
                        nb, "pull", p.uri_for("snap1"), str(img), "--bitmap", "b0", "--base-manifest", str(m0),
                        "--manifest", str(m1), "--chunk-size", "1M", "--json")).stdout)
                    # Reads only the changed clusters (whole 64 KiB clusters: the bitmap's granularity).
                    assert st["bytes_read"] == len(changed) * CS, (st, len(changed))
                    await c.pwrite(b"\xff" * CS, 0)  # after the job started: not in this backup
                assert img.read_bytes() == at_start
                assert nb("verify", p.uri_for("snap1"), "--manifest", str(m1)).returncode == 0
                assert nb("verify", str(img), "--manifest", str(m1)).returncode == 0
                await wait_concluded(qmp, "i1")
                await qmp.execute("job-dismiss", {"id": "i1"})

        asyncio.run(asyncio.wait_for(scenario(), 90))


def test_pull_refusals(short_tmp):
    with peers.nbdkit("memory", "8M") as k:
        r = nb("pull", k.uri, str(short_tmp / "x.raw"), "--bitmap", "b0", ok=False)
        assert r.returncode == 1 and "previous backup" in r.stderr, r.stderr
        (short_tmp / "small.raw").write_bytes(bytes(M))
        r = nb("pull", k.uri, str(short_tmp / "small.raw"), "--bitmap", "b0", ok=False)
        assert r.returncode == 1 and "same size" in r.stderr, r.stderr
        (short_tmp / "same.raw").write_bytes(bytes(8 * M))
        r = nb("pull", k.uri, str(short_tmp / "same.raw"), "--bitmap", "b0", ok=False)
        assert r.returncode == 1 and "qemu:dirty-bitmap:b0" in r.stderr, r.stderr
        man = short_tmp / "m.json"
        nb("pull", k.uri, str(short_tmp / "full.raw"), "--manifest", str(man))
        doc = json.loads(man.read_text())
        doc["chunks"][0] = "00" * 32
        man.write_text(json.dumps(doc))
        r = nb("verify", k.uri, "--manifest", str(man), ok=False)
        assert r.returncode == 1 and "root digest does not match" in r.stderr, r.stderr
        r = nb("verify", str(short_tmp / "small.raw"), "--manifest", str(short_tmp / "nope.json"), ok=False)
        assert r.returncode == 1 and "no such manifest" in r.stderr


def test_pull_ends_by_quick_exit_only_from_the_command_line(short_tmp, monkeypatch):
    """`pull` skips the interpreter's teardown once the copy is durable and reported
    (``cli._quick_exit``: 15-20 ms of a 1 GiB pull, docs/pullrate.md) -- only when run as
    a command: a caller of ``main(argv)`` gets the return code back.  (The JSON report
    arriving whole through a pipe from the real command: the other tests here.)"""
    import gc

    from nbdbackup import cli

    # main() from the command line retunes the collector (cli._collect_for): put it back.
    threshold, enabled = gc.get_threshold(), gc.isenabled()
    try:
        _pull_quick_exit(short_tmp, monkeypatch, cli)
    finally:
        gc.set_threshold(*threshold)
        (gc.enable if enabled else gc.disable)()


def _pull_quick_exit(short_tmp, monkeypatch, cli) -> None:
    with peers.nbdkit("sparse-random", "8M", "seed=3") as k:
        ref = short_tmp / "ref.raw"
        subprocess.run(["nbdcopy", k.uri, str(ref)], check=True)
        called = []
        monkeypatch.setattr(cli, "_quick_exit", lambda rc: called.append(rc))
        assert cli.main(["pull", k.uri, str(short_tmp / "a.raw")]) == 0
        assert called == [] and (short_tmp / "a.raw").read_bytes() == ref.read_bytes()
        monkeypatch.setattr(sys, "argv", ["nbdbackup", "pull", k.uri, str(short_tmp / "b.raw"),
                                          "--manifest", str(short_tmp / "b.json")])
        assert cli.main() == 0 and called == [0]
        assert (short_tmp / "b.raw").read_bytes() == ref.read_bytes()
        assert nb("verify", str(short_tmp / "b.raw"), "--manifest", str(short_tmp / "b.json")).returncode == 0


def test_limit_rate_paces_the_reads_and_its_waits_are_no_timeouts(short_tmp):
    """``--limit-rate 4M`` on 12 MiB of data in 4 MiB chunks: the pull takes >= 2.9 s
    (the first chunk waits 0.9 s: one burst of credit) and copies exactly what
    nbdcopy does.  Each chunk's wait (1 s) leaves the chunks already sent unread for
    longer than ``--io-timeout 1``: that wait is the receiving thread's own, not a
    server that stopped answering."""
    import time

    ref, got = short_tmp / "ref.raw", short_tmp / "got.raw"
    with peers.nbdkit("pattern", "12M") as k:
        subprocess.run(["nbdcopy", k.uri, str(ref)], check=True)
        t0 = time.monotonic()
        st = pull_json(k.uri, str(got), "--chunk-size", "4M", "--connections", "1",
                       "--limit-rate", "4M", "--io-timeout", "1")
        took = time.monotonic() - t0
        assert st["receive"] == "threads" and st["bytes_read"] == 12 * M
        assert took >= 2.9, took
        assert got.read_bytes() == ref.read_bytes()
        r = nb("pull", k.uri, str(short_tmp / "x.raw"), "--limit-rate", "fast", ok=False)
        assert r.returncode == 1 and "--limit-rate" in r.stderr and "'fast'" in r.stderr, r.stderr
        assert not (short_tmp / "x.raw").exists()
