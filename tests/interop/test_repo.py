"""Interop: pull into a chunk repository, incremental forever, and restore through nbdkit.

A qcow2 disk served by qemu-nbd is pulled into a repository (snapshot s0);
a bitmap recorded later writes (one of them a zero write) and qemu-nbd
``-B`` serves it for an incremental pull (s1, base s0) that reads only the
dirty data and stores only the changed chunks.  Each snapshot, served by
nbdkit with ``plugins/restore.py repo=... snapshot=...``, converts with
qemu-img to exactly the disk as it was at its pull.  Then: a damaged chunk
is named by ``repo verify`` (exit 1) and fails the reads of it with EIO
while other reads work; deleting s0 and ``gc`` frees only s0's own chunks
and s1 still restores.  All of it plain (no compression, no encryption),
compressed and encrypted with the key in the repository, and with a key
file (`test_repo_crypt.py` has the rest of format 2's checks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import peers
from nbdbackup.agent.repo import DirStore, Repository
from qemutools import qemu_io

ROOT = Path(__file__).resolve().parents[2]
M = 1 << 20


nb = peers.nbdbackup_cli


restore = peers.restore_snapshot


def chunk_files(repo: Path) -> set[str]:
    return {f.name for f in (repo / "chunks").rglob("*") if f.is_file()}


@pytest.mark.parametrize("encryption,compression", [("none", "none"), ("repokey", "zstd:3"), ("keyfile", "zstd:19")])
def test_repository_full_incremental_restore_verify_gc(short_tmp, monkeypatch, encryption, compression):
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", "interop pass")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(short_tmp / "config"))
    disk, repo = short_tmp / "disk.qcow2", short_tmp / "repo"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    qemu_io(disk, "write -P 0x11 0 8M", "write -P 0x22 20M 4M", "write -P 0x5e 48M 1M", fmt="qcow2")
    subprocess.run(["qemu-img", "bitmap", "--add", str(disk), "b0"], check=True)
    nb("repo", "init", str(repo), "--encryption", encryption, "--compression", compression,
       "--chunk-size", "4M")  # the chunk counts below are of 4 MiB chunks
    api = Repository.open(DirStore(str(repo)), passphrase="interop pass")
    with peers.qemu_nbd(disk, fmt="qcow2", read_only=True) as q:
        st0 = json.loads(nb("pull", q.uri, "--repo", str(repo), "--snapshot", "s0", "--json").stdout)
    assert st0["bytes_read"] == 13 * M and st0["new_chunks"] == 3  # 0x11 x2 dedups to one chunk
    pit0 = short_tmp / "pit0.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(pit0)], check=True)
    s0_chunks = chunk_files(repo)

    qemu_io(disk, "write -P 0x33 1M 64k", "write -z 21M 1M", "write -P 0x44 40M 128k", fmt="qcow2")
    with peers.qemu_nbd(disk, fmt="qcow2", read_only=True, bitmap="b0") as q:
        st1 = json.loads(nb("pull", q.uri, "--repo", str(repo), "--snapshot", "s1", "--bitmap", "b0",
                            "--base", "s0", "--json").stdout)
    assert st1["bytes_read"] == 64 * 1024 + 128 * 1024 and st1["new_chunks"] == 3
    pit1 = short_tmp / "pit1.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(pit1)], check=True)
    lst = json.loads(nb("repo", "list", str(repo), "--json").stdout)
    assert [(x["name"], x["parent"]) for x in lst] == [("s0", None), ("s1", "s0")]

    for snap, pit in (("s0", pit0), ("s1", pit1)):
        out = short_tmp / f"restored-{snap}.raw"
        r = restore(repo, snap, out)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == pit.read_bytes(), snap
    assert nb("repo", "verify", str(repo)).stdout.strip().endswith("OK: 2 snapshot(s), 0 bad chunk(s)")

    # Damage the chunk only s0 uses at 20..24 MiB (s1 rewrote part of it).
    h = api.load_snapshot("s0").chunks[5].hex()
    victim = repo / "chunks" / h[:2] / h
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(data)
    r = nb("repo", "verify", str(repo), "--json", ok=False)
    assert r.returncode == 1
    reason = "does not match its blake3 digest" if encryption == "none" else \
        "fails authentication (damaged, or not this object)"
    assert json.loads(r.stdout)["problems"] == [{"snapshot": "s0", "chunk": 5, "offset": 20 * M, "length": 4 * M,
                                                 "reason": reason}]
    r = restore(repo, "s0", short_tmp / "bad.raw")
    assert r.returncode != 0 and "Input/output error" in r.stderr
    assert restore(repo, "s1", short_tmp / "ok.raw").returncode == 0

    # Forget s0, collect: only chunks s0 alone used go; s1 is intact.
    nb("repo", "delete", str(repo), "s0")
    gc = json.loads(nb("repo", "gc", str(repo), "--json").stdout)
    in_use = {c.hex() for c in api.load_snapshot("s1").chunks} & (s0_chunks | chunk_files(repo))
    assert chunk_files(repo) == in_use and gc["removed"] == len(s0_chunks) + 3 - len(in_use)
    out = short_tmp / "after-gc.raw"
    assert restore(repo, "s1", out).returncode == 0 and out.read_bytes() == pit1.read_bytes()
    assert not os.path.exists(victim)


def _text(seed: int, n: int) -> bytes:
    """``n`` bytes of file-like lines (compressible; zstd levels 1 and 3 differ on them)."""
    import random

    rng = random.Random(seed)
    words = [b"usr", b"share", b"lib", b"python3", b"config", b"value", b"=", b"#", b"/", b"0x"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) + b"%x" % rng.randrange(1 << 16) for _ in range(8)) + b"\n"
    return bytes(out[:n])


def test_pull_into_adaptive_repository_full_at_3_incremental_at_1(short_tmp):
    """``pull --repo`` into a repository with the default compression (adaptive ``zstd``): the
    full pull's chunks are stored as zstd level-3 frames, the incremental's (``--base``) as
    level-1 frames, byte for byte; the JSON reports say which; both restore exactly and
    ``repo verify`` passes."""
    import zstandard

    disk, repo = short_tmp / "disk.qcow2", short_tmp / "repo"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    for i, (off, n) in enumerate(((0, 4 * M), (8 * M, 2 * M))):
        (short_tmp / f"t{i}").write_bytes(_text(i, n))
    qemu_io(disk, f"write -s {short_tmp / 't0'} 0 4M", fmt="qcow2")
    subprocess.run(["qemu-img", "bitmap", "--add", str(disk), "b0"], check=True)
    nb("repo", "init", str(repo), "--chunk-size", "1M")  # default compression: adaptive
    api = Repository.open(DirStore(str(repo)))
    pits, have = {}, set()
    for snap, extra in (("s0", []), ("s1", ["--bitmap", "b0", "--base", "s0"])):
        if snap == "s1":
            qemu_io(disk, f"write -s {short_tmp / 't1'} 8M 2M", fmt="qcow2")
        with peers.qemu_nbd(disk, fmt="qcow2", read_only=True, bitmap="b0" if extra else None) as q:
            st = json.loads(nb("pull", q.uri, "--repo", str(repo), "--snapshot", snap, *extra, "--json").stdout)
        level = 1 if extra else 3
        assert st["compression"] == f"zstd:{level}" and st["new_chunks"] >= 2, st
        pits[snap] = short_tmp / f"{snap}.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(pits[snap])], check=True)
        man = api.load_snapshot(snap)
        new = {d for d in man.chunks if d != api.zero_id(M)} - have
        assert len(new) == st["new_chunks"], (len(new), st)
        have |= new
        for d in new:
            data = api.get_chunk(d, M)
            frame = (repo / "chunks" / d.hex()[:2] / d.hex()).read_bytes()[2:]
            want = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
            assert want != zstandard.ZstdCompressor(level=4 - level, write_content_size=True).compress(data)
            assert frame == want, (snap, len(frame), len(want))
    for snap, pit in pits.items():
        out = short_tmp / f"restored-{snap}.raw"
        r = restore(repo, snap, out)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == pit.read_bytes(), snap
    assert nb("repo", "verify", str(repo)).stdout.strip().endswith("OK: 2 snapshot(s), 0 bad chunk(s)")


def test_repository_pull_refusals(short_tmp):
    repo = short_tmp / "repo"
    r = nb("pull", "nbd+unix:///?socket=/nonexistent", "--repo", str(repo), "--snapshot", "x", ok=False)
    assert r.returncode == 1 and "not a repository" in r.stderr
    nb("repo", "init", str(repo))
    with peers.nbdkit("memory", "8M") as k:
        nb("pull", k.uri, "--repo", str(repo), "--snapshot", "s0")
        for args, msg in ((["--snapshot", "s0"], "already exists"),
                          (["--snapshot", "s1", "--bitmap", "b0"], "needs both --bitmap and --base"),
                          (["--snapshot", "s1", "--bitmap", "b0", "--base", "nope"], "no snapshot 'nope'"),
                          (["--snapshot", "../s"], "bad snapshot name"),
                          ([], "needs --snapshot")):
            r = nb("pull", k.uri, "--repo", str(repo), *args, ok=False)
            assert r.returncode == 1 and msg in r.stderr, (args, r.stderr)
        r = nb("pull", k.uri, ok=False)
        assert r.returncode == 1 and "give TARGET" in r.stderr
    assert nb("repo", "list", str(repo)).stdout.startswith("s0 ")


def test_closed_stdout_exits_141_without_traceback(short_tmp):
    """``nbdbackup repo list DIR | head -0``: the reader is gone before we print."""
    repo = short_tmp / "repo"
    nb("repo", "init", str(repo))
    p = subprocess.Popen([sys.executable, "-m", "nbdbackup.cli", "repo", "list", str(repo)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and "Traceback" not in err, err
