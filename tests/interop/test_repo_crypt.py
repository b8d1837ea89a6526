"""Interop: repository format 2 (compressed, encrypted) with real peers.

- Our server's snapshot exports into an encrypted repository: a fleecing
  job's snapshot is pulled (full), a dirty bitmap created with it drives an
  incremental pull from the next job's snapshot export (``--bitmap --base``);
  both snapshots restore through nbdkit + plugins/restore.py (passphrase
  from ``passphrase-file=``) to exactly the disk at each job's start
  (``qemu-img compare``).
- Damage, with clear errors and nothing else harmed: a flipped byte in a
  snapshot object and a deleted chunk object are named by ``repo verify``
  (exit 1) while the other snapshot still verifies and restores; a wrong
  passphrase stops the command line and the plugin with "wrong passphrase or
  damaged key" and writes nothing; no passphrase in a non-interactive run is
  one clear line.
- Keys on the command line: ``repo key export`` then ``--key-file`` with the
  copy opens a repository whose ``keys/repokey`` is gone;
  ``change-passphrase`` rewraps (old one refused, new one accepted).
- The store operator's view: no plaintext byte of the disk, nor its plain
  blake3 chunk digests, appears in any stored object.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import blake3

import peers
from nbdbackup.control.client import ControlClient
from nbdbackup.nbd.client import connect
from peers import wait_concluded

M = 1 << 20
CS = 64 * 1024
nb = peers.nbdbackup_cli
PASS = "s3cret passphrase"


def stored_bytes(repo: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file())


def restore_with(repo: Path, snap: str, out: Path, *params: str) -> subprocess.CompletedProcess:
    plugin = str(peers.REPO / "plugins" / "restore.py")
    with peers.nbdkit("python", plugin, f"repo={repo}", f"snapshot={snap}", *params) as p:
        return subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", p.uri, str(out)],
                              capture_output=True, text=True, errors="replace", timeout=120)


def plugin_start_fails(short_tmp: Path, repo: Path, snap: str, *params: str) -> str:
    """Run nbdkit + the plugin expecting it to refuse to start; its stderr."""
    plugin = str(peers.REPO / "plugins" / "restore.py")
    r = subprocess.run(["nbdkit", "-f", "-U", str(short_tmp / "k.sock"), "python", plugin, f"repo={repo}",
                        f"snapshot={snap}", *params, "--run", "true"],
                       capture_output=True, text=True, errors="replace", timeout=60)
    assert r.returncode != 0, r
    return r.stderr


def test_encrypted_repository_from_our_snapshot_exports(short_tmp, make_image, monkeypatch):
    monkeypatch.delenv("NBDBACKUP_PASSPHRASE", raising=False)
    pwfile = short_tmp / "pw"
    pwfile.write_text(PASS + "\n")
    size = 32 * M
    secret = (b"SECRET-DISK-CONTENT-" * 52429)[:M]
    disk = make_image(short_tmp / "disk.raw", size, [(0x5A, 0, 8 * M), (0xC3, 20 * M, 3 * M)])
    with open(disk, "r+b") as f:
        f.seek(12 * M)
        f.write(secret)
    repo = short_tmp / "repo"
    nb("repo", "init", str(repo), "--encryption", "repokey", "--passphrase-file", str(pwfile), "--chunk-size", "1M")
    ctl = os.path.join(peers.short_tempdir(), "c.sock")
    pw = ["--passphrase-file", str(pwfile)]
    at0 = disk.read_bytes()
    with peers.nbdbackup_serve(f"disk={disk}", extra=["--control", ctl, "--state-dir", str(short_tmp / "st")]) as p:

        async def scenario() -> tuple[bytes, int]:
            async with ControlClient(ctl) as qmp:
                await qmp.execute("transaction", {"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"export": "disk", "name": "b0"}},
                    {"type": "backup-start", "data": {"export": "disk", "job-id": "f0", "sync": "none",
                                                      "target": f"memory:{size}", "snapshot": "snap0"}}]})
                async with await connect(p.uri_for("disk")) as c:
                    await c.pwrite(b"\x11" * CS, 5 * M)  # after f0 started: in s1 only
                    await c.pwrite(b"\x22" * 4096, 30 * M)
                    st0 = json.loads((await asyncio.to_thread(
                        nb, "pull", p.uri_for("snap0"), "--repo", str(repo), "--snapshot", "s0", "--json",
                        *pw)).stdout)
                    assert st0["bytes_read"] == 12 * M  # data only (8 + 1 + 3 MiB)
                    await qmp.execute("job-cancel", {"id": "f0"})
                    await wait_concluded(qmp, "f0")
                    await qmp.execute("job-dismiss", {"id": "f0"})
                    await qmp.execute("backup-start", {"export": "disk", "job-id": "i1", "sync": "incremental",
                                                       "bitmap": "b0", "target": f"memory:{size}",
                                                       "snapshot": "snap1"})
                    at1 = bytes(await c.pread(size, 0))
                    st1 = json.loads((await asyncio.to_thread(
                        nb, "pull", p.uri_for("snap1"), "--repo", str(repo), "--snapshot", "s1", "--bitmap", "b0",
                        "--base", "s0", "--json", *pw)).stdout)
                    await c.pwrite(b"\xff" * CS, 0)  # after i1 started: in neither
                await wait_concluded(qmp, "i1")
                await qmp.execute("job-dismiss", {"id": "i1"})
                return at1, st1["bytes_read"]

        at1, read1 = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert read1 == CS + CS  # the two dirty 64 KiB clusters only
    (short_tmp / "pit0.raw").write_bytes(at0)
    (short_tmp / "pit1.raw").write_bytes(at1)
    for snap in ("s0", "s1"):
        out = short_tmp / f"restored-{snap}.raw"
        r = restore_with(repo, snap, out, f"passphrase-file={pwfile}")
        assert r.returncode == 0, r.stderr
        subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(out),
                        str(short_tmp / f"pit{snap[1]}.raw")], check=True)
    lst = json.loads(nb("repo", "list", str(repo), "--json", *pw).stdout)
    assert [(x["name"], x["size"], x["parent"]) for x in lst] == [("s0", size, None), ("s1", size, "s0")]
    assert all(x["created"] for x in lst)

    # The store operator's view: neither plaintext nor plain chunk digests.
    everything = stored_bytes(repo)
    assert b"SECRET-DISK" not in everything and b"\x5a" * 64 not in everything
    for o in range(0, size, M):
        assert blake3.blake3(at0[o:o + M]).digest() not in everything
        assert blake3.blake3(at0[o:o + M]).hexdigest().encode() not in everything

    # A wrong passphrase: one clear line from the CLI and from the plugin; nothing written.
    before = {str(q): q.read_bytes() for q in repo.rglob("*") if q.is_file()}
    bad = short_tmp / "bad"
    bad.write_text("not it\n")
    for cmd in (["repo", "list"], ["repo", "verify"], ["repo", "key", "change-passphrase"]):
        r = nb(*cmd, str(repo), "--passphrase-file", str(bad), ok=False)
        assert r.returncode == 1 and "wrong passphrase or damaged key" in r.stderr and "Traceback" not in r.stderr
    r = nb("repo", "list", str(repo), ok=False)  # no passphrase, not on a terminal
    assert r.returncode == 1 and "is encrypted: a passphrase is needed: set NBDBACKUP_PASSPHRASE" in r.stderr
    assert "wrong passphrase or damaged key" in plugin_start_fails(short_tmp, repo, "s0", f"passphrase-file={bad}")
    assert {str(q): q.read_bytes() for q in repo.rglob("*") if q.is_file()} == before

    # Damage: a flipped byte in s0's snapshot object, a deleted chunk only s1 uses.
    snap0 = repo / "snapshots" / "s0"
    good0 = snap0.read_bytes()
    flipped = bytearray(good0)
    flipped[len(flipped) // 2] ^= 0x40
    snap0.write_bytes(flipped)
    r = nb("repo", "verify", str(repo), "--json", *pw, ok=False)
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and [(x["snapshot"], x["chunk"]) for x in doc["problems"]] == [("s0", -1)]
    assert "snapshot 's0'" in doc["problems"][0]["reason"] and "damaged" in doc["problems"][0]["reason"]
    err = plugin_start_fails(short_tmp, repo, "s0", f"passphrase-file={pwfile}")
    assert "snapshot 's0' in" in err and "is damaged" in err
    out = short_tmp / "still-s1.raw"
    assert restore_with(repo, "s1", out, f"passphrase-file={pwfile}").returncode == 0
    assert out.read_bytes() == at1
    snap0.write_bytes(good0)
    from nbdbackup.agent.repo import DirStore, Repository

    api = Repository.open(DirStore(str(repo)), passphrase=PASS)
    m0, m1 = api.load_snapshot("s0"), api.load_snapshot("s1")
    (i,) = [i for i in m1.differences(m0) if m1.chunks[i] not in m0.chunks and m1.chunks[i] != api.zero_id(M)][:1]
    victim = repo / "chunks" / m1.chunks[i].hex()[:2] / m1.chunks[i].hex()
    victim.unlink()
    r = nb("repo", "verify", str(repo), *pw, ok=False)
    assert r.returncode == 1 and f"s1: chunk {i} ({i * M}, {M}): missing" in r.stdout, r.stdout
    assert nb("repo", "verify", str(repo), "s0", *pw).stdout.strip().endswith("OK: 1 snapshot(s), 0 bad chunk(s)")


def test_keys_are_made_at_the_default_scrypt_cost(short_tmp, monkeypatch):
    """The suite makes cheaper keys (``NBDBACKUP_SCRYPT_LOG_N``, tests/interop/conftest.py);
    without the override a key costs N = 2**17 and opens with its passphrase."""
    monkeypatch.delenv("NBDBACKUP_SCRYPT_LOG_N")
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", PASS)
    repo = short_tmp / "repo"
    nb("repo", "init", str(repo), "--encryption", "repokey")
    assert json.loads((repo / "keys" / "repokey").read_text())["kdf"]["n"] == 1 << 17
    assert nb("repo", "list", str(repo)).returncode == 0
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", "not it")
    r = nb("repo", "list", str(repo), ok=False)
    assert r.returncode == 1 and "wrong passphrase or damaged key" in r.stderr


def test_key_export_key_file_and_change_passphrase(short_tmp, monkeypatch):
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", PASS)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(short_tmp / "cfg"))
    repo = short_tmp / "repo"
    nb("repo", "init", str(repo), "--encryption", "repokey")
    with peers.nbdkit("pattern", "8M") as k:
        nb("pull", k.uri, "--repo", str(repo), "--snapshot", "s0")
    monkeypatch.delenv("NBDBACKUP_PASSPHRASE")
    copy = short_tmp / "key-copy"
    assert "written to" in nb("repo", "key", "export", str(repo), str(copy)).stdout  # no passphrase needed
    assert json.loads(copy.read_text())["format"] == "nbdbackup-key" and os.stat(copy).st_mode & 0o777 == 0o600
    assert json.loads(nb("repo", "key", "export", str(repo)).stdout) == json.loads(copy.read_text())
    (repo / "keys" / "repokey").rename(short_tmp / "moved")  # the key in the repository is lost
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", PASS)
    r = nb("repo", "list", str(repo), ok=False)
    assert r.returncode == 1 and "keys/repokey is missing: give --key-file" in r.stderr
    assert nb("repo", "list", str(repo), "--key-file", str(copy)).stdout.startswith("s0 ")
    out = short_tmp / "r.raw"
    r = restore_with(repo, "s0", out, f"key-file={copy}")  # passphrase from the inherited environment
    assert r.returncode == 0, r.stderr
    with peers.nbdkit("pattern", "8M") as k:
        ref = short_tmp / "ref.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", k.uri, str(ref)], check=True)
    assert out.read_bytes() == ref.read_bytes()
    (short_tmp / "moved").rename(repo / "keys" / "repokey")

    monkeypatch.setenv("NBDBACKUP_NEW_PASSPHRASE", "another one")
    assert "passphrase changed" in nb("repo", "key", "change-passphrase", str(repo)).stdout
    r = nb("repo", "list", str(repo), ok=False)
    assert r.returncode == 1 and "wrong passphrase or damaged key" in r.stderr
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", "another one")
    assert nb("repo", "verify", str(repo)).stdout.strip().endswith("OK: 1 snapshot(s), 0 bad chunk(s)")

    # keyfile: the key lives under $XDG_CONFIG_HOME, not in the repository.
    kf = short_tmp / "kf"
    out = nb("repo", "init", str(kf), "--encryption", "keyfile", "--compression", "none").stdout
    (key_path,) = (short_tmp / "cfg" / "nbdbackup" / "keys").iterdir()
    assert str(key_path) in out and not (kf / "keys").exists()
    r = nb("repo", "init", str(short_tmp / "kf2"), "--encryption", "keyfile", "--key-file", str(key_path), ok=False)
    assert r.returncode == 1 and "will not overwrite a key" in r.stderr
    r = nb("repo", "init", str(short_tmp / "c"), "--compression", "lz4", ok=False)
    assert r.returncode == 1 and "give zstd (adaptive), zstd:LEVEL (1-22, fixed) or none" in r.stderr
