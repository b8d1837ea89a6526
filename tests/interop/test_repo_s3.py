"""Interop: the chunk repository on S3 (`agent.s3store`) against a real Ceph RADOS Gateway.

The ``rgw`` fixture (`ceph_rgw`) runs radosgw over a one-node memstore
cluster.  First the store on its own: put/get/exists/list (past one
1000-key listing page)/delete/mtime, the conditional PUT that never rewrites
a chunk, and the lease locks (exclusive refused while a shared lease is
live and the reverse, a live lease kept alive by renewal, an expired one
ignored and removed, a lost lease refusing the snapshot save).  Then the
product path, mirroring test_repo.py: a full pull from qemu-nbd into
``s3://bucket/prefix``, an incremental one through qemu-nbd ``-B``, ``repo
verify``, restores through nbdkit + plugins/restore.py compared with
``qemu-img compare`` (plain and encrypted), a damaged chunk object named by verify with its byte
range, ``gc`` honouring its grace period, and two pulls into one bucket at
once that both restore exactly.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import peers
from qemutools import qemu_io

ROOT = Path(__file__).resolve().parents[2]
M = 1 << 20




def store(url: str, **kw):
    from nbdbackup.agent.s3store import S3Store

    return S3Store(url, **kw)


nb = peers.nbdbackup_cli


restore = peers.restore_snapshot


def same(a: Path, b: Path, fmt_b: str = "raw") -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt_b, str(a), str(b)]).returncode == 0


# -- the store -------------------------------------------------------------------


def test_s3store_objects(s3env):
    from nbdbackup.errors import ConfigError

    s = store(s3env)
    s.put("config.json", b"{}")
    assert s.get("config.json") == b"{}" and s.exists("config.json") and not s.exists("nope")
    with pytest.raises(FileNotFoundError):
        s.get("nope")
    assert abs(s.mtime("config.json") - time.time()) < 60
    assert s.put_new("chunks/ab/abcd", b"first") is True
    assert s.put_new("chunks/ab/abcd", b"second") is False  # 412: already there, not rewritten
    assert s.get("chunks/ab/abcd") == b"first"
    s.delete("chunks/ab/abcd")
    s.delete("chunks/ab/abcd")  # deleting a missing key is fine
    assert not s.exists("chunks/ab/abcd")

    keys = {f"chunks/{i % 7:02x}/{i:08x}" for i in range(1100)}  # > one 1000-key listing page
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda k: s.put(k, b"x"), keys))
    assert set(s.list("chunks")) == keys
    assert list(s.list("snapshots")) == []
    assert set(s.list("")) == keys | {"config.json"}
    s.delete_many(sorted(keys) + ["chunks/00/gone-already"])  # two DeleteObjects requests
    assert list(s.list("")) == ["config.json"]
    # The prefix isolates repositories in one bucket.
    other = store(s3env.rsplit("/", 1)[0] + "/vm2")
    assert list(other.list("chunks")) == [] and not other.exists("config.json")
    with pytest.raises(ConfigError, match="s3://BUCKET/PREFIX"):
        store("s3:///nobucket")


def test_s3store_leases(s3env):
    from nbdbackup.errors import ConfigError

    nb("repo", "init", s3env)
    a, b = store(s3env, lease_ttl=6), store(s3env, lease_ttl=6)
    with a.lock(exclusive=False):
        with b.lock(exclusive=False):  # shared + shared
            pass
        with pytest.raises(ConfigError, match="busy"):
            with b.lock(exclusive=True):
                pass
        assert not b.exists("locks/exclusive")  # the refused exclusive lease was withdrawn
        time.sleep(8)  # longer than the ttl: renewal (every 2 s) keeps the lease live
        with pytest.raises(ConfigError, match="busy"):
            with b.lock(exclusive=True):
                pass
        a.check_lock()
    assert list(a.list("locks")) == []  # released
    with a.lock(exclusive=True):
        with pytest.raises(ConfigError, match="being cleaned"):
            with b.lock(exclusive=False):
                pass
        with pytest.raises(ConfigError, match="being cleaned"):
            with b.lock(exclusive=True):
                pass
        # The command line meets the same lock: a pull (shared) is refused while gc holds it.
        r = nb("pull", "nbd+unix:///?socket=/nonexistent", "--repo", s3env, "--snapshot", "x", ok=False)
        assert r.returncode == 1 and "busy (being cleaned)" in r.stderr, r.stderr
    assert list(a.list("locks")) == []

    # A holder that died leaves leases behind; once expired they are ignored and removed.
    # (ttl 4: with 1 s, a loaded machine could let them expire before the first check.)
    a.put("locks/shared-dead", json.dumps({"ttl": 4}).encode())
    a.put("locks/exclusive", json.dumps({"ttl": 4}).encode())
    with pytest.raises(ConfigError, match="busy"):
        with b.lock(exclusive=True):
            pass
    time.sleep(6)
    with b.lock(exclusive=True):
        assert set(b.list("locks")) == {"locks/exclusive"}
    assert list(b.list("locks")) == []

    # A lease that vanishes under its holder (expired and removed elsewhere) is noticed:
    # the snapshot save refuses.
    with a.lock(exclusive=False):
        (lease,) = a.list("locks")
        a.delete(lease)
        with pytest.raises(ConfigError, match="vanished"):
            a.check_lock()  # checks the lease now, without waiting for the renewal thread
    # One taken over by another process after it expired (its ETag changes) is noticed too.
    with a.lock(exclusive=False):
        (lease,) = a.list("locks")
        a.put(lease, json.dumps({"ttl": 6, "nonce": "someone else"}).encode())
        with pytest.raises(ConfigError, match="taken over"):
            a.check_lock()


# -- the repository through the command line ------------------------------------


@pytest.mark.parametrize("encryption", ["none", "repokey"])
def test_s3_repository_full_incremental_restore_verify_gc(s3env, short_tmp, monkeypatch, encryption):
    from nbdbackup.agent.repo import Repository

    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", "s3 pass")
    url = f"s3://n-{uuid.uuid4().hex[:16]}/vm1"  # a bucket that does not exist yet: repo init makes it
    disk = short_tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    qemu_io(disk, "write -P 0x11 0 8M", "write -P 0x22 20M 4M", "write -P 0x5e 48M 1M", fmt="qcow2")
    subprocess.run(["qemu-img", "bitmap", "--add", str(disk), "b0"], check=True)
    nb("repo", "init", url, "--encryption", encryption, "--chunk-size", "4M")  # the chunk counts below
    assert "already holds a repository" in nb("repo", "init", url, ok=False).stderr
    with peers.qemu_nbd(disk, fmt="qcow2", read_only=True) as q:
        st0 = json.loads(nb("pull", q.uri, "--repo", url, "--snapshot", "s0", "--json").stdout)
    assert st0["bytes_read"] == 13 * M and st0["new_chunks"] == 3
    pit0 = short_tmp / "pit0.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(pit0)], check=True)

    qemu_io(disk, "write -P 0x33 1M 64k", "write -z 21M 1M", "write -P 0x44 40M 128k", fmt="qcow2")
    with peers.qemu_nbd(disk, fmt="qcow2", read_only=True, bitmap="b0") as q:
        st1 = json.loads(nb("pull", q.uri, "--repo", url, "--snapshot", "s1", "--bitmap", "b0",
                            "--base", "s0", "--json").stdout)
    assert st1["bytes_read"] == 64 * 1024 + 128 * 1024 and st1["new_chunks"] == 3
    lst = json.loads(nb("repo", "list", url, "--json").stdout)
    assert [(x["name"], x["parent"]) for x in lst] == [("s0", None), ("s1", "s0")]

    for snap, want in (("s0", pit0), ("s1", disk)):
        out = short_tmp / f"restored-{snap}.raw"
        r = restore(url, snap, out)
        assert r.returncode == 0, r.stderr
        assert same(out, want, "raw" if want == pit0 else "qcow2"), snap
    assert nb("repo", "verify", url).stdout.strip().endswith("OK: 2 snapshot(s), 0 bad chunk(s)")

    # Overwrite the chunk object only s0 uses (20..24 MiB) with other bytes.
    s = store(url)
    api = Repository.open(s, passphrase="s3 pass")
    h = api.load_snapshot("s0").chunks[5].hex()
    s.put(f"chunks/{h[:2]}/{h}", b"\x5a" * (4 * M))
    r = nb("repo", "verify", url, "--json", ok=False)
    assert r.returncode == 1
    assert json.loads(r.stdout)["problems"] == [{"snapshot": "s0", "chunk": 5, "offset": 20 * M, "length": 4 * M,
                                                 "reason": "not an nbdbackup format-2 object (bad header)"}]
    assert "s0: chunk 5 (20971520, 4194304): not an nbdbackup" in nb("repo", "verify", url, ok=False).stdout
    r = restore(url, "s0", short_tmp / "bad.raw")
    assert r.returncode != 0 and "Input/output error" in r.stderr

    # A flipped byte in s1's snapshot object: verify names the snapshot; put back, it verifies again.
    good = s.get("snapshots/s1")
    s.put("snapshots/s1", good[:40] + bytes([good[40] ^ 1]) + good[41:])
    r = nb("repo", "verify", url, "s1", "--json", ok=False)
    (p,) = json.loads(r.stdout)["problems"]
    assert r.returncode == 1 and p["snapshot"] == "s1" and p["chunk"] == -1 and "is damaged" in p["reason"]
    s.put("snapshots/s1", good)

    # Forget s0: with the default grace (an hour on S3) gc keeps its fresh chunks; --grace 0 frees them.
    nb("repo", "delete", url, "s0")
    s1_chunks = {c.hex() for c in api.load_snapshot("s1").chunks}
    before = {k.rsplit("/", 1)[1] for k in s.list("chunks")}
    assert json.loads(nb("repo", "gc", url, "--json").stdout)["removed"] == 0
    gc = json.loads(nb("repo", "gc", url, "--grace", "0", "--json").stdout)
    after = {k.rsplit("/", 1)[1] for k in s.list("chunks")}
    assert after == before & s1_chunks and gc["removed"] == len(before - s1_chunks) > 0
    out = short_tmp / "after-gc.raw"
    assert restore(url, "s1", out).returncode == 0 and same(out, disk, "qcow2")


def test_s3_gc_grace_keeps_young_unreferenced_chunks(s3env):
    from nbdbackup.agent.repo import Repository

    s = store(s3env)
    repo = Repository.init(s, 64 * 1024)
    old, young = b"\x01" * 100, b"\x02" * 100
    from nbdbackup.agent.manifest import digest

    assert repo.put_chunk(digest(old), old)
    time.sleep(4)
    assert repo.put_chunk(digest(young), young)
    assert abs(s.now() - time.time()) < 5  # the store's clock (its Date header), here on this host
    with s.lock(exclusive=True):
        removed, kept = repo.gc(grace=2)  # old is ~4 s old, young ~0 s: margins of 2 s both ways
    assert (removed, kept) == (1, 0)
    assert repo.stored() == {digest(young)}


def test_s3_two_pulls_into_one_bucket_at_once(s3env, short_tmp):
    """Two pulls run together into one repository; their sources share most chunks, so
    both race to write the same chunk objects (conditional PUTs).  Both restore exactly."""
    url = s3env
    nb("repo", "init", url, "--chunk-size", "1M")
    disks = []
    for n, pat in enumerate((0x61, 0x62)):
        d = short_tmp / f"d{n}.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d), "48M"], check=True)
        shared = [f"write -P {0x10 + i:#x} {i}M 1M" for i in range(16)]  # 16 distinct chunks in both
        own = [f"write -P {pat + 0x10 * i:#x} {40 + i}M 1M" for i in range(3)]  # 3 distinct in each only
        qemu_io(d, *shared, *own, fmt="raw")
        disks.append(d)
    with peers.qemu_nbd(disks[0], read_only=True) as q0, peers.qemu_nbd(disks[1], read_only=True) as q1:
        procs = [subprocess.Popen([sys.executable, "-m", "nbdbackup.cli", "pull", q.uri, "--repo", url,
                                   "--snapshot", f"p{n}", "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
                 for n, q in enumerate((q0, q1))]
        outs = [p.communicate(timeout=180) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e.decode(errors="replace")
    new = [json.loads(o)["new_chunks"] for o, _ in outs]
    assert sum(new) == 16 + 2 * 3  # each shared chunk written once (by either pull), plus 3 own each
    assert len(list(store(url).list("chunks"))) == 16 + 2 * 3
    for n, d in enumerate(disks):
        out = short_tmp / f"r{n}.raw"
        r = restore(url, f"p{n}", out)
        assert r.returncode == 0, r.stderr
        assert same(out, d)
    assert nb("repo", "verify", url).stdout.strip().endswith("OK: 2 snapshot(s), 0 bad chunk(s)")
    # prune over S3: keep the newest snapshot, free what only the other used (--grace 0: all are fresh).
    doc = json.loads(nb("repo", "prune", url, "--keep-last", "1", "--gc", "--grace", "0", "--json").stdout)
    (gone,) = doc["removed"]
    assert doc["gc"]["removed"] == 3 and len(list(store(url).list("chunks"))) == 16 + 3
    kept = ({"p0", "p1"} - {gone}).pop()
    out = short_tmp / "kept.raw"
    assert restore(url, kept, out).returncode == 0 and same(out, disks[int(kept[1])])


def test_s3store_with_debians_older_botocore(s3env):
    """nbdkit's embedded Python finds Debian's python3-boto3 (1.26, botocore 1.29: no IfNoneMatch
    parameter) before the .venv's: the conditional PUT then adds the header by hand."""
    py = "/usr/bin/python3"
    probe = subprocess.run([py, "-c", "import botocore; print(botocore.__version__)"], capture_output=True,
                           text=True, errors="replace")
    if probe.returncode != 0:
        pytest.skip("Debian's python3-boto3 is not installed (only the .venv's boto3 is used then)")
    script = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from nbdbackup.agent.s3store import S3Store\n"
        "s = S3Store(sys.argv[1])\n"
        "out = [s._native_if_none_match, s.put_new('chunks/aa/x', b'1'), s.put_new('chunks/aa/x', b'2'),\n"
        "       s.get('chunks/aa/x').decode()]\n"
        "with s.lock(exclusive=True):\n"
        "    s.put('snapshots/plain.json', b'{}')  # an unconditional PUT meanwhile stays unconditional\n"
        "    s.put('snapshots/plain.json', b'{}')\n"
        "    out.append(sorted(s.list('locks')))\n"
        "print(json.dumps(out))\n")
    r = subprocess.run([py, "-c", script, s3env], capture_output=True, text=True, errors="replace", timeout=60)
    assert r.returncode == 0, r.stderr
    native, created, again, body, locks = json.loads(r.stdout)
    assert (created, again, body, locks) == (True, False, "1", ["locks/exclusive"])
    if probe.stdout.startswith("1.29."):
        assert native is False


def test_s3_unreachable_endpoint_is_one_line(short_tmp, monkeypatch):
    port = peers.free_tcp_port()  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    t = time.monotonic()
    r = nb("repo", "list", "s3://nobucket/p", "--s3-endpoint", f"http://127.0.0.1:{port}", ok=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("nbdbackup: error: s3://nobucket/p: get config.json:"), r.stderr
    assert time.monotonic() - t < 60
    r = nb("repo", "list", "ftp://x/y", ok=False)
    assert r.returncode == 1 and "a directory or s3://BUCKET/PREFIX" in r.stderr


def test_s3_gc_during_a_third_pull_loses_nothing(s3env, short_tmp):
    """Issue 11: two pulls of different disks into one bucket at once, then a gc (and a prune)
    while a third pull is running.  The cleaners must not remove a chunk the running pull relies
    on: on S3 they see the pull's live lease and refuse at once with a clear error (the pull is
    not disturbed); after it, gc runs, and every snapshot restores exactly."""
    url = s3env
    nb("repo", "init", url, "--chunk-size", "1M")
    disks = []
    for n in range(3):
        d = short_tmp / f"d{n}.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d), "24M"], check=True)
        # 8 chunks common to all three, 4 of each disk's own
        qemu_io(d, *[f"write -P {0x10 + i:#x} {i}M 1M" for i in range(8)],
                *[f"write -P {0x80 + 0x10 * n + i:#x} {12 + i}M 1M" for i in range(4)], fmt="raw")
        disks.append(d)
    with peers.qemu_nbd(disks[0], read_only=True) as q0, peers.qemu_nbd(disks[1], read_only=True) as q1:
        procs = [subprocess.Popen([sys.executable, "-m", "nbdbackup.cli", "pull", q.uri, "--repo", url,
                                   "--snapshot", f"p{n}", "--json"], cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for n, q in enumerate((q0, q1))]
        outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e.decode(errors="replace") for _, e in outs]
    nb("repo", "delete", url, "p1")  # p1's own chunks are now garbage, old enough for --grace 0
    # The third pull's source is paused (nbdkit's pause filter: its requests wait) until the
    # cleaners have run, so they run while it is under way, however slow this machine is;
    # its disk shares p1's chunks: exactly the ones a gc would like to delete.
    qemu_io(disks[2], *[f"write -P {0x80 + 0x10 + i:#x} {12 + i}M 1M" for i in range(4)], fmt="raw")
    ctl = os.path.join(peers.short_tempdir(), "pause.sock")
    with peers.nbdkit("file", str(disks[2]), f"pause-control={ctl}", filters=["pause"]) as slow, \
            socket.socket(socket.AF_UNIX) as pause:
        pause.settimeout(30)
        pause.connect(ctl)
        pause.sendall(b"p")
        assert pause.recv(1) == b"P"
        third = subprocess.Popen([sys.executable, "-m", "nbdbackup.cli", "pull", slow.uri, "--repo", url,
                                  "--snapshot", "p2", "--json", "--workers", "2", "--connections", "1"],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not any(k.startswith("locks/shared-") for k in store(url).list("locks")):
            assert third.poll() is None and time.monotonic() < deadline, "the third pull took no lease"
            time.sleep(0.05)
        for argv in (("repo", "gc", url, "--grace", "0"),
                     ("repo", "prune", url, "--keep-last", "1", "--gc", "--grace", "0")):
            r = nb(*argv, ok=False)
            assert r.returncode == 1 and "busy (in use)" in r.stderr, (argv, r.returncode, r.stderr)
        assert third.poll() is None, "the cleaners ran after the pull, not during it"
        pause.sendall(b"r")
        assert pause.recv(1) == b"R"
        out, err = third.communicate(timeout=180)
    assert third.returncode == 0, err.decode(errors="replace")
    doc = nb("repo", "gc", url, "--grace", "0", "--json").stdout
    assert json.loads(doc)["removed"] == 0  # p1's own chunks are p2's now
    for n, d in ((0, disks[0]), (2, disks[2])):
        o = short_tmp / f"r{n}.raw"
        r = restore(url, f"p{n}", o)
        assert r.returncode == 0, r.stderr
        assert same(o, d)
    assert nb("repo", "verify", url).stdout.strip().endswith("OK: 2 snapshot(s), 0 bad chunk(s)")


def test_s3store_get_into_raw_signed_get(s3env, monkeypatch):
    """`get_into` (a restore's read): the raw signed GET gives what boto3's get gives, -1 for a
    buffer too small, FileNotFoundError for a missing key (through boto3), counts its calls;
    with NBDBACKUP_S3_RAW_GET=0 it goes through boto3 and gives the same."""
    for raw in ("1", "0"):
        monkeypatch.setenv("NBDBACKUP_S3_RAW_GET", raw)
        s = store(s3env + f"-getinto{raw}")
        assert (s._raw is not None) == (raw == "1")
        blob = os.urandom(300_001)
        s.put("chunks/aa/x y+z", blob)  # a key needing quoting
        buf = bytearray(400_000)
        if raw == "1":  # signed right (else the raw path would give None and boto3 would answer)
            assert s._raw.get_into(s.bucket, s._key("chunks/aa/x y+z"), memoryview(buf)) == len(blob)
        before = s.requests["GetObject"]
        assert s.get_into("chunks/aa/x y+z", buf) == len(blob) and bytes(buf[:len(blob)]) == blob
        assert s.requests["GetObject"] == before + 1
        assert s.get_into("chunks/aa/x y+z", bytearray(1000)) == -1
        with pytest.raises(FileNotFoundError):
            s.get_into("chunks/aa/missing", buf)
        with concurrent.futures.ThreadPoolExecutor(8) as ex:  # one connection per thread, reused
            assert all(n == len(blob) for n in ex.map(lambda _: s.get_into("chunks/aa/x y+z", bytearray(len(blob))),
                                                      range(32)))


def test_s3store_raw_get_turns_off_after_failures(s3env, monkeypatch):
    """A raw GET that keeps failing (here: a TLS client against the plain-http RGW, as a CA only
    botocore's config names would) falls back to boto3 each time and turns itself off."""
    monkeypatch.setenv("NBDBACKUP_S3_RAW_GET", "1")
    s = store(s3env + "-rawoff")
    s.put("chunks/aa/k", b"data")
    s._raw.scheme = "https"  # handshakes fail
    buf = bytearray(16)
    for _ in range(5):
        assert s.get_into("chunks/aa/k", buf) == 4 and bytes(buf[:4]) == b"data"
    assert s._raw.failures == s._raw.MAX_FAILURES


def test_s3store_put_new_raw_signed_put(s3env, monkeypatch):
    """`put_new` (every chunk and snapshot): the raw signed conditional PUT creates (True),
    says "already there" on a second PUT (412: False) without overwriting, is rejected by the
    store when the body does not match its signed SHA-256 (None: boto3 then writes it), and
    with NBDBACKUP_S3_RAW_PUT=0 boto3 does the same."""
    for raw in ("1", "0"):
        monkeypatch.setenv("NBDBACKUP_S3_RAW_PUT", raw)
        s = store(s3env + f"-putnew{raw}")
        blob = os.urandom(1 << 20)
        if raw == "1":  # signed right (else the raw path would give None and boto3 would answer)
            assert s._raw.put_new(s.bucket, s._key("chunks/aa/direct"), memoryview(blob)) is True
            assert s._raw.put_new(s.bucket, s._key("chunks/aa/direct"), memoryview(b"other")) is False
            assert s.get("chunks/aa/direct") == blob
        before = s.requests["PutObject"]
        assert s.put_new("chunks/aa/x y+z", blob) is True  # a key needing quoting
        assert s.put_new("chunks/aa/x y+z", b"not the same") is False
        assert s.requests["PutObject"] == before + 2
        assert s.get("chunks/aa/x y+z") == blob
        with concurrent.futures.ThreadPoolExecutor(8) as ex:  # one connection per thread, reused
            made = list(ex.map(lambda i: s.put_new(f"chunks/bb/{i % 8}", blob[:1000 + i % 8]), range(32)))
        assert made.count(True) == 8
        assert all(s.get(f"chunks/bb/{i}") == blob[:1000 + i] for i in range(8))
    # A body that does not match the signed digest: the store refuses it, nothing is written.
    s = store(s3env + "-putnew1")
    real = s._raw._headers

    def lying(path, method="GET", payload="UNSIGNED-PAYLOAD", extra=None):
        return real(path, method, "0" * 64 if method == "PUT" else payload, extra)

    monkeypatch.setattr(s._raw, "_headers", lying)
    assert s._raw.put_new(s.bucket, s._key("chunks/cc/bad"), memoryview(blob)) is None
    assert not s.exists("chunks/cc/bad")
