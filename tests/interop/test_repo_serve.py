"""Interop: ``serve NAME=repo:REPO#SNAPSHOT`` -- a repository snapshot as a read-only export.

An ext4 image (made with ``mkfs.ext4 -d`` from a directory of files) is pulled
into an encrypted repository (repokey), then served straight from it:

- ``qemu-img compare`` finds the export identical to the image; ``nbdinfo``
  sees it read-only with holes where the chunks are zero; qemu-io cannot
  write; nbdcopy with 4 connections copies it exactly;
- file-level restore, as a PBS or restic user does it: ``nbdfuse`` exposes the
  export as a file, a read-only loop mount of it shows the files, byte for
  byte (in a private mount namespace; skipped only where FUSE or loop devices
  cannot exist, e.g. an unprivileged container);
- ``repo gc`` refuses while the snapshot is served (the shared lock);
- a flipped byte in one stored chunk: reads touching that chunk fail with EIO,
  the rest of the disk reads on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import peers

M = 1 << 20
nb = peers.nbdbackup_cli
PASS = "served snapshots"


@pytest.fixture
def secret(short_tmp, monkeypatch):
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", PASS)


def make_fs(short_tmp: Path) -> tuple[Path, Path]:
    """A 64 MiB ext4 image holding ``files/`` (random and text files); (image, files dir)."""
    files = short_tmp / "files"
    (files / "etc").mkdir(parents=True)
    (files / "random.bin").write_bytes(os.urandom(3 * M + 12345))
    (files / "etc" / "hello.txt").write_text("restored, one file at a time\n" * 1000)
    img = short_tmp / "fs.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(files), str(img), "64M"], check=True,
                   capture_output=True, timeout=60)
    return img, files


def pull(img: Path, repo: Path, snap: str) -> None:
    with peers.nbdbackup_serve(f"d={img}", extra=["--read-only"]) as src:
        nb("pull", src.uri_for("d"), "--repo", str(repo), "--snapshot", snap)


def test_a_snapshot_served_from_the_repository(short_tmp, secret):
    img, files = make_fs(short_tmp)
    repo = short_tmp / "repo"
    nb("repo", "init", str(repo), "--encryption", "repokey", "--chunk-size", "1M")
    pull(img, repo, "s0")
    with peers.nbdbackup_serve(f"fs=repo:{repo}#s0") as p:
        uri = p.uri_for("fs")
        r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), uri],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        info = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, check=True,
                              timeout=30).stdout
        assert '"is_read_only": true' in info, info
        holes = subprocess.run(["nbdinfo", "--map", "--totals", uri], capture_output=True, text=True,
                               check=True, timeout=30).stdout
        assert "hole,zero" in holes, holes
        w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", uri], capture_output=True, text=True,
                           timeout=30)
        assert "Permission denied" in w.stdout + w.stderr, w
        copy = short_tmp / "copy.img"
        subprocess.run(["nbdcopy", "--connections=4", uri, str(copy)], check=True, timeout=60)
        assert copy.read_bytes() == img.read_bytes()
        gc = nb("repo", "gc", str(repo), ok=False)
        assert gc.returncode == 1 and "busy" in gc.stderr, gc
        _files_through_nbdfuse(short_tmp, uri, files)
    assert "busy" not in nb("repo", "gc", str(repo)).stderr  # the lock went with the export


def _files_through_nbdfuse(short_tmp: Path, uri: str, files: Path) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or shutil.which("nbdfuse") is None:
        pytest.skip("file-level restore needs root, /dev/fuse and nbdfuse (libnbd-bin)")
    fuse, mnt = short_tmp / "fuse", short_tmp / "mnt"
    fuse.mkdir()
    mnt.mkdir()
    script = r"""
set -e
nbdfuse -r "$1" "$2" & pid=$!
for i in $(seq 100); do [ -e "$1/nbd" ] && break; sleep 0.1; done
mount -o loop,ro,noload "$1/nbd" "$3" || { echo "NOMOUNT"; umount "$1"; wait $pid; exit 3; }
cmp "$3/random.bin" "$4/random.bin"
cmp "$3/etc/hello.txt" "$4/etc/hello.txt"
ls "$3"
umount "$3"
umount "$1"
wait $pid
"""
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                        str(fuse), uri, str(mnt), str(files)], capture_output=True, text=True, timeout=120)
    if r.returncode == 3 and "NOMOUNT" in r.stdout:
        pytest.skip(f"no loop mount here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "random.bin" in r.stdout and "etc" in r.stdout, r.stdout


def test_a_damaged_chunk_fails_only_its_reads(short_tmp, secret):
    from nbdbackup.agent.repo import DirStore, Repository

    disk = short_tmp / "disk.raw"
    disk.write_bytes(os.urandom(8 * M))
    repo = short_tmp / "repo"
    nb("repo", "init", str(repo), "--encryption", "repokey", "--chunk-size", "1M")
    pull(disk, repo, "s0")
    ids = Repository.open(DirStore(str(repo)), passphrase=PASS).load_snapshot("s0").chunks
    h = ids[5].hex()
    victim = repo / "chunks" / h[:2] / h
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(data)
    with peers.nbdbackup_serve(f"d=repo:{repo}#s0") as p:
        uri = p.uri_for("d")
        bad = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", f"read {5 * M + 4096} 4k", uri],
                             capture_output=True, text=True, timeout=30)
        assert "Input/output error" in bad.stdout + bad.stderr, bad
        good = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", f"read -v {4 * M} 16", "-c", f"read {6 * M} 1M", uri],
                              capture_output=True, text=True, timeout=30)
        assert good.returncode == 0 and "error" not in (good.stdout + good.stderr).lower(), good
        assert bytes.fromhex("".join(good.stdout.split("\n")[0].split(":")[1].split()[:16])) == \
            disk.read_bytes()[4 * M:4 * M + 16]
        assert f"READ at ({5 * M + 4096}, 4096) failed" in p.log() and "fails authentication" in p.log(), p.log()
