"""Interop: several writers at once on one repository (bug hunt 2, docs/hunt2.md).

Two ``nbdbackup pull --repo`` of different disks under the SAME snapshot name at once,
on a directory and on Ceph RGW.  Both pass the "snapshot exists?" check at their start;
the slow one (nbdkit's delay filter) is held by SIGSTOP once it stores its first chunk
until the other has saved, then finishes last.  Invariant 5: a pull that reports
success has its backup in the repository.  So the slow pull must refuse to overwrite
the snapshot the fast one saved meanwhile (a clear one-line error, exit 1), and the
snapshot must restore to the fast pull's disk.  Before the fix the slow pull
overwrote it silently and reported success: the fast pull's backup was gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import peers

ROOT = Path(__file__).resolve().parents[2]
M = 1 << 20
nb = peers.nbdbackup_cli


@pytest.mark.parametrize("kind", ["dir", "rgw"])
def test_two_pulls_of_one_snapshot_name_never_overwrite(kind, short_tmp, request):
    url = request.getfixturevalue("s3env") if kind == "rgw" else str(short_tmp / "repo")
    nb("repo", "init", url, "--chunk-size", "1M")
    if kind == "rgw":
        from nbdbackup.agent.s3store import S3Store

        s3 = S3Store(url)

        def chunks() -> int:
            return len(list(s3.list("chunks")))
    else:
        def chunks() -> int:  # named or still temporary (group commit)
            return sum(1 for f in (Path(url) / "chunks").rglob("*") if f.is_file()) \
                if (Path(url) / "chunks").exists() else 0
    slow_disk, fast_disk = short_tmp / "slow.raw", short_tmp / "fast.raw"
    slow_disk.write_bytes(os.urandom(8 * M))
    fast_disk.write_bytes(os.urandom(8 * M))
    with peers.nbdkit("file", str(slow_disk), "rdelay=50ms", filters=["delay"]) as slow:
        p = subprocess.Popen([sys.executable, "-m", "nbdbackup.cli", "pull", slow.uri, "--repo", url,
                              "--snapshot", "x", "--workers", "1", "--connections", "1"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while chunks() < 1 and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(p.pid, signal.SIGSTOP)  # past its start-of-pull check, held until the other is saved
            assert p.poll() is None and chunks() < 8
            with peers.qemu_nbd(fast_disk, read_only=True) as fast:
                nb("pull", fast.uri, "--repo", url, "--snapshot", "x")
            os.kill(p.pid, signal.SIGCONT)
            _, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert p.returncode == 1 and "Traceback" not in err, err
    assert "x" in err and "meanwhile" in err, err
    out = short_tmp / "x.raw"
    nb("restore", url, "x", str(out))
    assert out.read_bytes() == fast_disk.read_bytes()
    assert nb("repo", "verify", url).stdout.strip().endswith("OK: 1 snapshot(s), 0 bad chunk(s)")


def test_s3_gc_stalled_past_its_lease_deletes_nothing_a_new_snapshot_uses(s3env, monkeypatch):
    """A gc whose process stalls (SIGSTOP, a long outage) between computing what to delete and
    deleting it loses its lease; a pull may then run, find an unreferenced old chunk by its id
    (dedup: no upload, so the grace period does not cover it) and save a snapshot using it.
    On resuming the gc must notice its lost lease (`S3Store.check_lock`) and delete nothing;
    before the fix it deleted the chunk and the new snapshot was damaged."""
    from nbdbackup.agent.manifest import Manifest
    from nbdbackup.agent.repo import Repository
    from nbdbackup.agent.s3store import S3Store
    from nbdbackup.errors import ConfigError

    C = 64 * 1024
    gs = S3Store(s3env, lease_ttl=2.0)
    repo = Repository.init(gs, C)
    data = os.urandom(C)

    def man_of(repo) -> Manifest:
        m = Manifest(C, C)
        m.chunks = [repo.chunk_id(data)]
        return m

    assert repo.put_chunk(man_of(repo).chunks[0], data)
    repo.save_snapshot("old", man_of(repo))
    repo.delete_snapshot("old")  # the chunk is now unreferenced (and old: grace 0 below)

    puller = Repository.open(S3Store(s3env))
    stalled = []
    real_list_times = S3Store.list_times

    def list_times(self, prefix):
        out = list(real_list_times(self, prefix))
        if self is gs and prefix == "chunks" and not stalled:  # gc has listed; now its process "stops" for > ttl ...
            stalled.append(1)
            time.sleep(3.5)
            with puller.store.lock(exclusive=False):  # ... and a pull runs meanwhile (lease expired)
                assert not puller.put_chunk(puller.chunk_id(data), data)  # found: not uploaded
                puller.save_snapshot("new", man_of(puller))
        return iter(out)

    with monkeypatch.context() as mp:
        mp.setattr(S3Store, "list_times", list_times)
        mp.setattr(S3Store, "_renew", lambda self, key, stop: stop.wait())  # a stopped process renews nothing
        with pytest.raises(ConfigError, match="lease"):
            with gs.lock(exclusive=True):
                repo.gc(grace=0)
    assert stalled
    check = Repository.open(S3Store(s3env))
    assert check.verify() == []
    assert check.get_chunk(check.load_snapshot("new").chunks[0], C) == data


@pytest.mark.parametrize("body", [b"\x00garbage{", b'{"ttl": null}'])
def test_s3_damaged_lease_objects_expire_like_any_lease(s3env, body):
    """A lease object whose body cannot be read (damaged, truncated, foreign) is someone's lease
    of unknown ttl: live until its LastModified plus our ttl, then expired and replaced.  Before
    the fix a damaged ``locks/exclusive`` was "gone" to pulls (they ran beside whatever gc held
    it) yet blocked every gc/prune forever ("busy (being cleaned)"), a null ttl was a traceback,
    and a damaged shared lease was never removed."""
    from nbdbackup.agent.s3store import S3Store
    from nbdbackup.errors import ConfigError

    nb("repo", "init", s3env)
    a = S3Store(s3env, lease_ttl=4.0)  # RGW's LastModified has 1 s steps: margins of >= 2 s below
    a.put("locks/exclusive", body)
    a.put("locks/shared-damaged", body)
    with pytest.raises(ConfigError, match="busy"):
        with a.lock(exclusive=False):  # a pull: refused while the unreadable lease may be live
            pass
    with pytest.raises(ConfigError, match="busy"):
        with a.lock(exclusive=True):
            pass
    assert set(a.list("locks")) == {"locks/exclusive", "locks/shared-damaged"}
    time.sleep(5.5)
    with a.lock(exclusive=True):  # both expired: the exclusive one replaced, the shared one removed
        assert set(a.list("locks")) == {"locks/exclusive"}
    assert list(a.list("locks")) == []


@pytest.mark.parametrize("kind", ["dir", "rgw"])
def test_verify_repair_then_the_next_pull_heals_a_flipped_byte(kind, short_tmp, request):
    """A flipped byte in a stored chunk: verify names every snapshot using it with the chunk's
    byte range -- including a full backup taken after the damage, which found the damaged
    chunk by its id (dedup) -- and hints at ``--repair``; ``verify --repair`` moves it aside
    (kept under damaged/), and the next pull of the same data stores it again: every snapshot
    then verifies clean and restores exactly.  Before: no way out, every later backup of that
    data referenced the damaged chunk."""
    url = request.getfixturevalue("s3env") if kind == "rgw" else str(short_tmp / "repo")
    nb("repo", "init", url, "--chunk-size", "1M")
    disk = short_tmp / "disk.raw"
    disk.write_bytes(os.urandom(4 * M))
    with peers.qemu_nbd(disk, read_only=True) as q:
        nb("pull", q.uri, "--repo", url, "--snapshot", "s1")
        if kind == "rgw":
            from nbdbackup.agent.s3store import S3Store

            s3 = S3Store(url)
            key = sorted(s3.list("chunks"))[0]
            blob = bytearray(s3.get(key))
            blob[len(blob) // 2] ^= 1
            s3.put(key, bytes(blob))
        else:
            path = sorted((Path(url) / "chunks").rglob("*"))[-1]
            blob = bytearray(path.read_bytes())
            blob[len(blob) // 2] ^= 1
            path.write_bytes(bytes(blob))
        nb("pull", q.uri, "--repo", url, "--snapshot", "s2")  # a full backup after the damage
        r = nb("repo", "verify", url, ok=False)
        assert r.returncode == 1 and "damaged snapshot(s): s1 s2" in r.stdout and "--repair" in r.stdout, r.stdout
        assert "Traceback" not in r.stderr
        rep = json.loads(nb("repo", "verify", url, "--repair", "--json", ok=False).stdout)
        assert len(rep["moved"]) == 1 and {(p["snapshot"], p["length"]) for p in rep["problems"]} == {
            ("s1", M), ("s2", M)}
        nb("pull", q.uri, "--repo", url, "--snapshot", "s3")
    assert nb("repo", "verify", url).stdout.strip().endswith("OK: 3 snapshot(s), 0 bad chunk(s)")
    for snap in ("s1", "s2", "s3"):
        out = short_tmp / f"{snap}.raw"
        nb("restore", url, snap, str(out))
        assert out.read_bytes() == disk.read_bytes(), snap
