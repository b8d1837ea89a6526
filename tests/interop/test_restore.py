"""Interop: ``nbdbackup restore``, parallel sampled ``repo verify`` and the parallel restore plugin.

Disks are served by qemu-nbd and pulled into a repository (a directory; RGW
for the S3 cases; plain and encrypted (repokey) for the main paths), then:

- restored with ``nbdbackup restore`` into a new file (holes where the disk
  was zero; O_DIRECT writes where the file system allows, and ``--buffered``
  through the page cache), over an existing file full of 0xff (zero chunks zeroed), and
  into a writable qemu-nbd export (an NBD URI: WRITE_ZEROES + FLUSH), each
  checked with ``qemu-img compare``; a too-small NBD target is refused;
- restored onto a loop block device full of 0xff (zero chunks zeroed with
  BLKZEROOUT; skipped with ``--target-is-zero``); skipped without root;
- a deleted chunk and a flipped byte make restore exit 1 naming the
  snapshot's byte range ``(offset, length)``;
- ``repo verify --sample P --seed S`` checks exactly the chunks
  `agent.verify.sample_ids` picks (so it finds the damaged chunk exactly
  when the sample holds it), and the same seed gives the same result;
- the progress line: drawn when stderr is a terminal (a pty; a slow nbdkit
  target makes the run long enough), not with ``--json``, not on a pipe;
- on Ceph RGW: restore compared with qemu-img, verify --sample, and nbdcopy
  with 4 connections from nbdkit + plugins/restore.py: identical, with
  several chunk loads in flight at once (the plugin's exit line).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import peers

ROOT = Path(__file__).resolve().parents[2]
M = 1 << 20
nb = peers.nbdbackup_cli


def same(a: Path, b: Path) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                       capture_output=True, text=True, errors="replace")
    return r.returncode == 0


def make_disk(path: Path, size: int = 64 * M + 12 * 1024) -> Path:
    """Random data with zero gaps: [0, 20M) random, the rest zero except [36M, 38M)
    and [44M, 46M) (two 4M chunks half zero) and a short last chunk: 8 data and 9 zero 4M chunks."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in ((0, 20 * M), (36 * M, 2 * M), (44 * M, 2 * M), (64 * M, 12 * 1024)):
            f.seek(off)
            f.write(os.urandom(n))
    return path


def pull_into(repo: str, disk: Path, snap: str) -> dict:
    with peers.qemu_nbd(disk, read_only=True) as q:
        return json.loads(nb("pull", q.uri, "--repo", repo, "--snapshot", snap, "--json").stdout)


@pytest.fixture
def secret(short_tmp, monkeypatch):
    """A passphrase in the environment (nbdbackup and nbdkit inherit it), a private key directory."""
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", "restore pass")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(short_tmp / "config"))


@pytest.mark.parametrize("encryption", ["none", "repokey"])
def test_restore_file_and_nbd_targets(short_tmp, secret, encryption):
    disk, repo = make_disk(short_tmp / "disk.raw"), str(short_tmp / "repo")
    nb("repo", "init", repo, "--encryption", encryption, "--chunk-size", "4M")  # the layout above
    pull_into(repo, disk, "s0")

    # A new file: identical, sparse (holes for the zero chunks and the zero half chunk).
    out = short_tmp / "new.raw"
    st = json.loads(nb("restore", repo, "s0", str(out), "--json", "--workers", "3").stdout)
    assert same(disk, out)
    assert st["target_was_zero"] and st["zero_chunks"] == 9 and st["data_chunks"] == 8
    assert st["bytes_written"] == 24 * M + 12 * 1024 and st["bytes_zeroed"] == 0
    assert os.stat(out).st_blocks * 512 < 26 * M  # 24 MiB of data, the rest holes
    assert st["workers"] == 3 and st["direct_io"] == _direct_ok(short_tmp)  # O_DIRECT where the fs allows
    # Through the page cache (--buffered), and with the default workers (a directory's): the same.
    out2 = short_tmp / "buffered.raw"
    st = json.loads(nb("restore", repo, "s0", str(out2), "--json", "--buffered").stdout)
    assert same(disk, out2) and not st["direct_io"] and st["workers"] == 4

    # Over an existing file of junk: zero chunks and zero blocks are zeroed (punched).
    junk = short_tmp / "junk.raw"
    junk.write_bytes(b"\xff" * (disk.stat().st_size))
    st = json.loads(nb("restore", repo, "s0", str(junk), "--json").stdout)
    assert not st["target_was_zero"] and st["bytes_zeroed"] == 40 * M
    assert same(disk, junk)

    # A shorter existing file is extended to the snapshot's size.
    short = short_tmp / "short.raw"
    short.write_bytes(b"\xee" * M)
    nb("restore", repo, "s0", str(short))
    assert short.stat().st_size == disk.stat().st_size and same(disk, short)

    # An NBD URI: a writable qemu-nbd export pre-filled with junk.
    target = short_tmp / "target.raw"
    target.write_bytes(b"\xab" * (disk.stat().st_size))
    with peers.qemu_nbd(target) as q:
        st = json.loads(nb("restore", repo, "s0", q.uri, "--json").stdout)
    assert st["target_kind"] == "nbd" and not st["target_was_zero"]
    assert same(disk, target)

    # Too small an NBD target is refused before anything is written.
    small = short_tmp / "small.raw"
    small.write_bytes(b"\xcd" * (8 * M))
    with peers.qemu_nbd(small) as q:
        r = nb("restore", repo, "s0", q.uri, ok=False)
    assert r.returncode == 1 and "8388608 bytes" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert small.read_bytes() == b"\xcd" * (8 * M)

    r = nb("restore", repo, "nope", str(short_tmp / "x.raw"), ok=False)
    assert r.returncode == 1 and "no snapshot 'nope'" in r.stderr


def _direct_ok(d: Path) -> bool:
    """Whether files in ``d`` can be opened with O_DIRECT (not on every file system)."""
    try:
        fd = os.open(d / "direct-probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


def _ids(repo: Path, snap: str) -> list[bytes]:
    """The chunk ids of a snapshot of a directory repository, through the API."""
    from nbdbackup.agent.repo import DirStore, Repository

    return Repository.open(DirStore(str(repo))).load_snapshot(snap).chunks


def _chunk_path(repo: Path, snap: str, i: int) -> Path:
    h = _ids(repo, snap)[i].hex()
    return repo / "chunks" / h[:2] / h


def test_restore_names_damaged_and_missing_chunks(short_tmp):
    disk, repo = make_disk(short_tmp / "disk.raw"), short_tmp / "repo"
    nb("repo", "init", str(repo), "--chunk-size", "4M")  # chunk 2 at 8 MiB
    pull_into(str(repo), disk, "s0")
    victim = _chunk_path(repo, "s0", 2)
    data = bytearray(victim.read_bytes())
    data[12345] ^= 1
    victim.write_bytes(data)
    r = nb("restore", str(repo), "s0", str(short_tmp / "a.raw"), ok=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"snapshot 's0': chunk 2 at ({8 * M}, {4 * M})" in r.stderr and "does not match" in r.stderr, r.stderr

    victim.write_bytes(bytes(data[:12345]) + bytes([data[12345] ^ 1]) + bytes(data[12346:]))  # repaired
    gone = _chunk_path(repo, "s0", 16)  # the short last chunk
    gone.unlink()
    r = nb("restore", str(repo), "s0", str(short_tmp / "b.raw"), ok=False)
    assert r.returncode == 1 and f"chunk 16 at ({64 * M}, {12 * 1024})" in r.stderr and "missing" in r.stderr, r.stderr
    r = nb("repo", "verify", str(repo), "--json", ok=False)
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["damaged_snapshots"] == ["s0"]
    assert doc["problems"] == [{"snapshot": "s0", "chunk": 16, "offset": 64 * M, "length": 12 * 1024,
                                "reason": "missing"}]

    # --keep-going: every other chunk restored, each damaged range named (exit 1); here a flipped
    # byte in chunk 2 and the missing chunk 16, both left as holes in the new file.
    victim.write_bytes(data)  # still the flipped bytes
    r = nb("restore", str(repo), "s0", str(short_tmp / "k.raw"), "--keep-going", "--json", ok=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert [(d["offset"], d["length"], d["chunk"]) for d in doc["damaged"]] == [(8 * M, 4 * M, 2),
                                                                                 (64 * M, 12 * 1024, 16)]
    assert "missing" in doc["damaged"][1]["reason"] and "NOT the snapshot's" in r.stderr
    assert f"({8 * M}, {4 * M}) chunk 2" in r.stderr and f"({64 * M}, {12 * 1024}) chunk 16" in r.stderr
    got, want = (short_tmp / "k.raw").read_bytes(), disk.read_bytes()
    assert len(got) == len(want)
    holes = [(8 * M, 4 * M), (64 * M, 12 * 1024)]
    pos = 0
    for off, n in holes:
        assert got[pos:off] == want[pos:off] and got[off:off + n] == bytes(n)
        pos = off + n
    assert got[pos:] == want[pos:]
    victim.write_bytes(bytes(data[:12345]) + bytes([data[12345] ^ 1]) + bytes(data[12346:]))  # repaired

    # A store that cannot be read (here: a directory where the chunk file was) is one line too.
    gone.mkdir()
    r = nb("restore", str(repo), "s0", str(short_tmp / "c.raw"), ok=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"chunk 16 at ({64 * M}, {12 * 1024}): cannot read it: Is a directory" in r.stderr, r.stderr
    gone.rmdir()


def test_verify_sample_is_seeded(short_tmp):
    from nbdbackup.agent.verify import sample_ids

    disk, repo = short_tmp / "disk.raw", short_tmp / "repo"
    disk.write_bytes(os.urandom(8 * M))
    nb("repo", "init", str(repo), "--chunk-size", "64K")  # 128 distinct chunks
    pull_into(str(repo), disk, "s0")
    pull_into(str(repo), disk, "s1")  # same chunks: two snapshots name each
    victim = _chunk_path(repo, "s0", 77)
    data = bytearray(victim.read_bytes())
    data[0] ^= 0x80
    victim.write_bytes(data)
    ids = _ids(repo, "s0")
    bad = bytes.fromhex(victim.name)
    hit = next(s for s in range(1000) if bad in sample_ids(ids, 10, s))
    miss = next(s for s in range(1000) if bad not in sample_ids(ids, 10, s))
    for seed, ok in ((hit, False), (miss, True), (hit, False)):
        r = nb("repo", "verify", str(repo), "--sample", "10", "--seed", str(seed), "--json", ok=False)
        doc = json.loads(r.stdout)
        assert r.returncode == (0 if ok else 1) and doc["ok"] is ok, (seed, r.stdout)
        assert doc["chunks_checked"] == 13 and doc["chunks_referenced"] == 128 and doc["seed"] == seed
        if not ok:
            assert [(p["snapshot"], p["chunk"], p["offset"], p["length"]) for p in doc["problems"]] == \
                [("s0", 77, 77 * 64 * 1024, 64 * 1024), ("s1", 77, 77 * 64 * 1024, 64 * 1024)]
            assert doc["damaged_snapshots"] == ["s0", "s1"]
    r = nb("repo", "verify", str(repo), ok=False)  # all: found, text names both snapshots and ranges
    assert r.returncode == 1 and f"s1: chunk 77 ({77 * 64 * 1024}, 65536)" in r.stdout
    assert "damaged snapshot(s): s0 s1" in r.stdout
    assert r.stdout.strip().endswith("FAILED: 2 snapshot(s), 2 bad chunk(s)")
    r = nb("repo", "verify", str(repo), "--sample", "0", ok=False)
    assert r.returncode == 2 and "percentage" in r.stderr
    # --json output is never mixed with progress, even when forced (progress goes to stderr).
    r = nb("repo", "verify", str(repo), "--json", "--progress", ok=False)
    assert json.loads(r.stdout)["chunks_checked"] == 128




@pytest.mark.parametrize("encryption", ["none", "repokey"])
def test_restore_and_plugin_on_rgw(short_tmp, s3env, secret, encryption):
    disk = make_disk(short_tmp / "disk.raw")
    nb("repo", "init", s3env, "--chunk-size", "1M", "--encryption", encryption)  # 65 chunks: parallel loads
    pull_into(s3env, disk, "s0")
    out = short_tmp / "out.raw"
    st = json.loads(nb("restore", s3env, "s0", str(out), "--json").stdout)
    assert same(disk, out) and st["zero_chunks"] == 40  # the zero MiBs
    assert st["workers"] == 16  # the default from S3: more GETs in flight than from a directory
    doc = json.loads(nb("repo", "verify", s3env, "--sample", "50", "--seed", "1", "--json").stdout)
    assert doc["ok"] and doc["chunks_checked"] == 13  # ceil(50% of 25 distinct chunks)

    # nbdcopy, 4 connections x 16 requests, from the plugin: identical, and loads overlapped.
    plugin = str(ROOT / "plugins" / "restore.py")
    copy = short_tmp / "copy.raw"
    with peers.nbdkit("python", plugin, f"repo={s3env}", "snapshot=s0", "cache=8",
                      "readahead=0") as k:  # concurrency from the requests alone
        r = subprocess.run(["nbdcopy", "--connections=4", "--requests=16", "--request-size=262144",
                            k.uri, str(copy)], capture_output=True, text=True, errors="replace", timeout=300)
        assert r.returncode == 0, r.stderr
        peers.stop(k, timeout=10)  # cleanup() logs the counts; the log goes with the peer's directory
        log = k.log()
    m = re.search(r"restore: (\d+) chunk load\(s\), at most (\d+) at once", log)
    assert m, log
    loads, peak = int(m.group(1)), int(m.group(2))
    assert peak >= 2, log  # the v0 plugin loaded one chunk at a time (under one lock)
    assert 25 <= loads <= 2 * 25, log  # each distinct data chunk about once
    assert same(disk, copy)


def _losetup(backing: Path) -> str:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs root and losetup")
    r = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"no loop device: {r.stderr.decode(errors='replace').strip()}")
    return r.stdout.decode().strip()


def test_restore_block_device(short_tmp):
    disk, repo = make_disk(short_tmp / "disk.raw"), str(short_tmp / "repo")
    size = disk.stat().st_size
    nb("repo", "init", repo)
    pull_into(repo, disk, "s0")
    backing = short_tmp / "backing.raw"
    backing.write_bytes(b"\xff" * (size + 4 * M))  # a larger device: the tail is left alone
    dev = _losetup(backing)
    try:
        st = json.loads(nb("restore", repo, "s0", dev, "--json").stdout)
        assert st["target_kind"] == "block" and not st["target_was_zero"] and st["bytes_zeroed"] == 40 * M
        with open(dev, "rb") as f:
            got = f.read(size + 4 * M)
        assert got[:size] == disk.read_bytes() and got[size:] == b"\xff" * (4 * M)
        # --target-is-zero: zero chunks are not touched (here: they keep the junk, proving it).
        with open(dev, "r+b") as f:
            f.write(b"\xff" * size)
        st = json.loads(nb("restore", repo, "s0", dev, "--target-is-zero", "--json").stdout)
        assert st["target_was_zero"] and st["bytes_zeroed"] == 0 and st["bytes_skipped"] == 40 * M
        with open(dev, "rb") as f:
            got = f.read(size)
        assert got[:20 * M] == disk.read_bytes()[:20 * M] and got[20 * M:24 * M] == b"\xff" * (4 * M)
    finally:
        subprocess.run(["losetup", "--detach", dev], capture_output=True, timeout=30)


def _run_with_tty_stderr(*args: str) -> tuple[int, str, str]:
    """Run ``nbdbackup ARGS`` with stderr on a pseudo-terminal; (exit code, stdout, stderr)."""
    import pty
    import sys

    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "nbdbackup.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    err = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        err += data
    out = p.stdout.read()
    rc = p.wait(timeout=120)
    os.close(master)
    return rc, out.decode(errors="replace"), err.decode(errors="replace")


def test_progress_only_on_a_terminal_and_never_with_json(short_tmp):
    disk, repo = make_disk(short_tmp / "disk.raw"), str(short_tmp / "repo")
    nb("repo", "init", repo, "--chunk-size", "4M")  # 8 chunks: a restore long enough to show progress
    pull_into(repo, disk, "s0")
    # A slow NBD target (100 ms per write) makes the restore last well over the first quarter second.
    with peers.nbdkit("memory", str(disk.stat().st_size), "wdelay=100ms", filters=["delay"]) as k:
        rc, out, err = _run_with_tty_stderr("restore", repo, "s0", k.uri, "--workers", "2")
        assert rc == 0 and out.startswith("restored snapshot s0"), (out, err)
        assert "\rrestore s0  " in err and "100%" in err and "\x1b[K" in err and err.endswith("\n"), repr(err)
        rc, out, err = _run_with_tty_stderr("restore", repo, "s0", k.uri, "--workers", "2", "--json")
        assert rc == 0 and json.loads(out)["data_chunks"] == 8 and err == "", repr(err)
        r = nb("restore", repo, "s0", k.uri, "--workers", "2")  # stderr a pipe: nothing drawn
        assert r.stderr == ""


@pytest.mark.parametrize("target", ["tmpfs-file", "nbd"])
def test_restore_target_full_is_one_line(short_tmp, target):
    """A target that runs out of space: a file on a full 4 MiB tmpfs (where this machine lets
    us mount one: root, and not a container without CAP_SYS_ADMIN), and an NBD export that
    answers every write with ENOSPC (nbdkit's error filter; runs everywhere)."""
    disk, repo = make_disk(short_tmp / "disk.raw"), str(short_tmp / "repo")
    nb("repo", "init", repo)
    pull_into(repo, disk, "s0")
    if target == "nbd":
        with peers.nbdkit("memory", str(disk.stat().st_size), "error=ENOSPC", "error-pwrite-rate=100%",
                          "error-zero-rate=100%", filters=["error"]) as full:
            r = nb("restore", repo, "s0", full.uri, ok=False)
    else:
        small = short_tmp / "small"
        small.mkdir()
        m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(small)], capture_output=True)
        if m.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {m.stderr.decode(errors='replace').strip()}")
        try:
            r = nb("restore", repo, "s0", str(small / "o.raw"), ok=False)
        finally:
            subprocess.run(["umount", str(small)], check=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "No space left on device" in r.stderr, r.stderr
    assert r.stderr.rstrip().endswith("(restore stopped: the target is incomplete)"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_restore_limit_rate(short_tmp):
    """``restore --limit-rate 4M``: 4 MiB of chunk data take >= 0.9 s (one 0.1 s burst of
    credit), the zero chunks nothing; the copy is exact."""
    import time

    disk, repo, out = short_tmp / "disk.raw", short_tmp / "repo", short_tmp / "out.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * M)
        f.write(os.urandom(4 * M))
    nb("repo", "init", str(repo), "--chunk-size", "1M")
    pull_into(str(repo), disk, "s0")
    t0 = time.monotonic()
    st = json.loads(nb("restore", str(repo), "s0", str(out), "--limit-rate", "4M", "--json").stdout)
    took = time.monotonic() - t0
    assert st["bytes_fetched"] == 4 * M and took >= 0.9, (took, st)
    assert same(disk, out)
