"""Interop: kill -9 of ``nbdbackup pull --repo`` mid-pull, on a directory and on Ceph RGW.

A repository (a plain directory; an encrypted one on RGW) holds snapshot s1.  A pull of new content (s2) is slowed down
by nbdkit's delay filter and killed with SIGKILL once some of its chunks are
stored; the test checks that the kill did land mid-pull (new chunks stored,
no snapshot s2 recorded).  Then, on the damaged-by-crash repository:

- the next pull (same name s2, other content) works;
- ``repo verify`` says OK;
- on S3 the dead pull's lease still blocks ``gc``/``prune`` (exclusive) until
  it expires, with a clear "busy" error; the test then expires it (rewrites
  its ttl to 1 s, what 60 s of waiting would do);
- every recorded snapshot restores exactly (``nbdbackup restore`` and
  ``qemu-img compare``);
- ``repo prune --keep-last 1 --gc`` removes s1 and frees s1's chunks and the
  killed pull's leftovers (every chunk not used by s2), nothing else; s2
  still restores exactly, a second gc removes nothing, verify says OK.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import peers

ROOT = Path(__file__).resolve().parents[2]
M = 1 << 20
CHUNKS = 48  # 1 MiB chunks of a 48 MiB disk
nb = peers.nbdbackup_cli


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)]).returncode == 0


def new_content(disk: Path, keep: Path) -> None:
    disk.write_bytes(os.urandom(CHUNKS * M))
    shutil.copyfile(disk, keep)


@pytest.mark.parametrize("kind,encryption", [("dir", "none"), ("rgw", "repokey")])
def test_kill_9_mid_pull_then_pull_verify_prune_gc_restore(kind, encryption, short_tmp, request, monkeypatch):
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", "crash pass")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(short_tmp / "config"))
    if kind == "rgw":
        url = request.getfixturevalue("s3env")
        from nbdbackup.agent.s3store import S3Store

        s3 = S3Store(url)

        def chunk_keys() -> set[str]:
            return {k.rsplit("/", 1)[1] for k in s3.list("chunks")}
        gc_grace = ["--grace", "0"]  # S3's default grace (an hour) would keep the fresh leftovers
    else:
        url = str(short_tmp / "repo")

        def chunk_keys() -> set[str]:
            return {f.name for f in (Path(url) / "chunks").rglob("*") if f.is_file() and ".tmp." not in f.name}
        gc_grace = []

    def temporary() -> list[Path]:
        """Chunk files written but not committed (a directory's group commit names them at the
        snapshot's flush: a pull killed before leaves them unnamed)."""
        return [] if kind == "rgw" else [f for f in (Path(url) / "chunks").rglob("*.tmp.*")]

    disk = short_tmp / "disk.raw"
    pit1, pit2, pit3 = (short_tmp / f"pit{i}.raw" for i in (1, 2, 3))
    nb("repo", "init", url, "--chunk-size", "1M", "--encryption", encryption)
    new_content(disk, pit1)
    with peers.qemu_nbd(disk, read_only=True) as q:
        nb("pull", q.uri, "--repo", url, "--snapshot", "s1")
    s1_chunks = chunk_keys()
    assert len(s1_chunks) == CHUNKS

    # The pull to kill: 100 ms per read, 2 chunks at a time (about 2.5 s for all 48).
    new_content(disk, pit2)
    with peers.nbdkit("file", str(disk), "rdelay=100ms", filters=["delay"]) as k:
        p = subprocess.Popen([sys.executable, "-m", "nbdbackup.cli", "pull", k.uri, "--repo", url,
                              "--snapshot", "s2", "--workers", "2", "--connections", "1"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while len(chunk_keys()) + len(temporary()) < CHUNKS + 4 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        _, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL, (p.returncode, err)
    leftovers = chunk_keys() - s1_chunks
    dead = temporary()
    # Killed mid-pull: some chunks stored (on S3 under their names; in a directory as temporary
    # files of the group that was never committed: no chunk of it is named)...
    assert 4 <= len(leftovers) + len(dead) < CHUNKS, (len(leftovers), len(dead))
    assert kind == "rgw" or not leftovers
    assert [x["name"] for x in json.loads(nb("repo", "list", url, "--json").stdout)] == ["s1"]  # ...no snapshot

    # The next pull (other content again) works, under the same name.
    new_content(disk, pit3)
    with peers.qemu_nbd(disk, read_only=True) as q:
        st = json.loads(nb("pull", q.uri, "--repo", url, "--snapshot", "s2", "--json").stdout)
    assert st["new_chunks"] == CHUNKS
    assert nb("repo", "verify", url).stdout.strip().endswith("OK: 2 snapshot(s), 0 bad chunk(s)")

    if kind == "rgw":
        # The dead pull's shared lease is still live: exclusive commands refuse, clearly.
        (lease,) = s3.list("locks")
        r = nb("repo", "gc", url, *gc_grace, ok=False)
        assert r.returncode == 1 and "busy" in r.stderr and "Traceback" not in r.stderr, r.stderr
        s3.put(lease, json.dumps({"ttl": 1}).encode())  # as if its 60 s had passed
        time.sleep(2.5)

    for snap, pit in (("s1", pit1), ("s2", pit3)):
        out = short_tmp / f"r-{snap}.raw"
        nb("restore", url, snap, str(out))
        assert same(out, pit), snap

    doc = json.loads(nb("repo", "prune", url, "--keep-last", "1", "--gc", *gc_grace, "--json").stdout)
    assert doc["removed"] == ["s1"]
    s2_chunks = chunk_keys()
    assert doc["gc"]["removed"] == len(s1_chunks) + len(leftovers) and len(s2_chunks) == CHUNKS
    assert not (s2_chunks & (s1_chunks | leftovers))
    assert json.loads(nb("repo", "gc", url, *gc_grace, "--json").stdout)["removed"] == 0
    out = short_tmp / "r-s2-after.raw"
    nb("restore", url, "s2", str(out))
    assert same(out, pit3)
    assert nb("repo", "verify", url).stdout.strip().endswith("OK: 1 snapshot(s), 0 bad chunk(s)")
    if kind == "dir":
        # What the kill left as temporary files was never listed as chunks; gc removed them.
        assert dead and temporary() == []
