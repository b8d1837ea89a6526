"""Interop: retention (``repo prune``) on a repository filled by real pulls, and restic as the referee.

Six snapshots of a qcow2 disk are pulled from qemu-nbd into a repository,
the disk changing between pulls so that some chunks are used by one
snapshot, some by two, some by all.  Their ``created`` times are then set
in the snapshot files (one has none and falls back to its file's mtime) to
a week and a half of backups.  ``repo prune --dry-run`` shows the plan and
changes no file; the real run removes exactly the planned snapshots;
``repo verify`` passes; every kept snapshot, served by nbdkit with
``plugins/restore.py``, compares equal (qemu-img compare) to the disk at its
pull; ``--gc`` removes exactly the chunks only removed snapshots used.  A
pull in progress (nbdkit behind the delay filter) holds the lock shared:
prune fails at once, naming the repository busy, and removes nothing.

``restic forget --dry-run --json`` over a restic repository with snapshots at
the same times (``restic backup --time``) keeps the same snapshots for the
same policies (restic 0.14, Debian 12: buckets in the zone of the snapshot
time, so every time is given and read in UTC), bucket boundaries included.
Its repository's key is re-wrapped with a cheap scrypt (``cheapen_restic_key``,
as the suite's own repositories use ``NBDBACKUP_SCRYPT_LOG_N``): restic derives
the key in each of the test's 39 commands, ~0.3-1 s of CPU each at the
parameters restic calibrates; retention is what restic referees here.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import peers
from nbdbackup.agent.repo import DirStore, Repository
from qemutools import qemu_io

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = str(ROOT / "plugins" / "restore.py")
UTC = datetime.timezone.utc

#: Snapshot name -> creation time (UTC): Monday of ISO week 45 to Wednesday of week 46.
TIMES = {"s0": datetime.datetime(2026, 11, 2, 10, tzinfo=UTC), "s1": datetime.datetime(2026, 11, 8, 9, tzinfo=UTC),
         "s2": datetime.datetime(2026, 11, 10, 9, tzinfo=UTC), "s3": datetime.datetime(2026, 11, 10, 21, tzinfo=UTC),
         "s4": datetime.datetime(2026, 11, 11, 8, tzinfo=UTC), "s5": datetime.datetime(2026, 11, 11, 20, tzinfo=UTC)}
POLICY = ["--keep-last", "1", "--keep-daily", "2", "--keep-weekly", "2"]
#: What POLICY keeps: s5 (last, daily 11-11, weekly W46), s3 (daily 11-10), s1 (weekly W45).
REASONS = {"s5": ["last 1/1", "daily 2026-11-11", "weekly 2026-W46"], "s3": ["daily 2026-11-10"],
           "s1": ["weekly 2026-W45"], "s4": [], "s2": [], "s0": []}


nb = peers.nbdbackup_cli


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def chunks_of(repo: Path, names) -> set[str]:
    r = Repository.open(DirStore(str(repo)))
    out: set[str] = set()
    for n in names:
        out |= {c.hex() for c in r.load_snapshot(n).chunks}
    return out & {p.name for p in (repo / "chunks").rglob("*") if p.is_file()}  # all-zero chunks are not stored


def test_prune_plan_removes_exactly_the_plan_and_kept_snapshots_restore(short_tmp):
    disk, repo = short_tmp / "disk.qcow2", short_tmp / "repo"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "32M"], check=True)
    qemu_io(disk, "write -P 0x11 0 8M", fmt="qcow2")  # in every snapshot (one chunk: dedup)
    nb("repo", "init", str(repo))
    pits: dict[str, Path] = {}
    for i in range(6):
        # 24M: this snapshot's own chunk; 28M: shared by s0+s1, s2+s3, s4+s5;
        # 16M: s0 and s2 share one (both pruned below), s4 alone, s1/s3/s5 share one.
        qemu_io(disk, f"write -P {0x40 + i} 24M 4M", f"write -P {0x60 + i // 2} 28M 4M",
                f"write -P {0x77 if i in (0, 2) else 0x78 if i == 4 else 0x79} 16M 4M", fmt="qcow2")
        with peers.qemu_nbd(disk, fmt="qcow2", read_only=True) as q:
            nb("pull", q.uri, "--repo", str(repo), "--snapshot", f"s{i}")
        pits[f"s{i}"] = short_tmp / f"pit{i}.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(pits[f"s{i}"])], check=True)
    r = Repository.open(DirStore(str(repo)))
    for name, t in TIMES.items():  # rewrite each snapshot object with this creation time
        path = repo / "snapshots" / name
        doc = r.snapshot_info(name)
        del doc["manifest"]
        if name == "s0":  # as if written without a time: the file's mtime stands in
            del doc["created"]
        else:
            doc["created"] = t.isoformat()
        path.write_bytes(r._snapshot_blob(name, doc, r.load_snapshot(name).packed()))
        if name == "s0":
            os.utime(path, (t.timestamp(), t.timestamp()))
    chunks_before = files(repo / "chunks")
    snaps_before = files(repo / "snapshots")
    kept, gone = ["s5", "s3", "s1"], ["s4", "s2", "s0"]
    only_gone = chunks_of(repo, gone) - chunks_of(repo, kept)
    assert len(only_gone) == 5  # s0/s2/s4's own chunks, the 0x77 one s0 and s2 share, s4's 0x78

    # Dry run: the plan, in both forms; not a byte changes.
    dry = json.loads(nb("repo", "prune", str(repo), *POLICY, "--dry-run", "--gc", "--json").stdout)
    assert [(s["name"], s["action"], s["reasons"]) for s in dry["snapshots"]] == [
        (n, "keep" if REASONS[n] else "remove", REASONS[n]) for n in ("s5", "s4", "s3", "s2", "s1", "s0")]
    assert dry["keep"] == kept and dry["remove"] == gone and dry["removed"] == []
    assert [s["time_from_mtime"] for s in dry["snapshots"]] == [False] * 5 + [True]
    assert dry["snapshots"][-1]["time"] == "2026-11-02T10:00:00+00:00"
    assert dry["gc"]["removed"] == len(only_gone)
    text = nb("repo", "prune", str(repo), *POLICY, "--dry-run").stdout
    assert "\ns5        2026-11-11 20:00:00   keep    last 1/1, daily 2026-11-11, weekly 2026-W46\n" in text, text
    assert "\ns0        2026-11-02 10:00:00*  remove  -\n" in text, text
    assert "would remove 3 of 6 snapshot(s): s4 s2 s0 (dry run: nothing changed)" in text
    assert files(repo / "snapshots") == snaps_before and files(repo / "chunks") == chunks_before

    # The real run removes exactly the plan, and no chunk (no --gc).
    real = json.loads(nb("repo", "prune", str(repo), *POLICY, "--json").stdout)
    assert real["removed"] == gone and real["snapshots"] == dry["snapshots"] and real["gc"] is None
    assert [x["name"] for x in json.loads(nb("repo", "list", str(repo), "--json").stdout)] == sorted(kept)
    assert files(repo / "chunks") == chunks_before
    assert nb("repo", "verify", str(repo)).stdout.strip().endswith("OK: 3 snapshot(s), 0 bad chunk(s)")

    # Pruning again with the same policy keeps everything; --gc frees exactly
    # the chunks only removed snapshots used.
    again = json.loads(nb("repo", "prune", str(repo), *POLICY, "--gc", "--json").stdout)
    assert again["keep"] == kept and again["removed"] == []
    assert again["gc"] == {"removed": len(only_gone), "kept": len(chunks_of(repo, kept))}
    assert set(files(repo / "chunks")) == {k for k in chunks_before if k.rsplit("/", 1)[1] not in only_gone}
    assert nb("repo", "verify", str(repo)).stdout.strip().endswith("OK: 3 snapshot(s), 0 bad chunk(s)")
    for name in kept:
        with peers.nbdkit("python", PLUGIN, f"repo={repo}", f"snapshot={name}") as p:
            r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(pits[name]), p.uri],
                               capture_output=True, text=True, errors="replace", timeout=60)
        assert r.returncode == 0, (name, r.stdout, r.stderr)


def _holds_shared_flock(pid: int, path: Path) -> bool:
    """Whether ``pid`` holds a shared flock on ``path`` (read from /proc/locks: no lock taken to look)."""
    ino = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[3] == "READ" and f[4] == str(pid) and f[5].endswith(f":{ino}"):
            return True
    return False


def test_prune_fails_clearly_while_a_pull_holds_the_lock(short_tmp):
    repo = short_tmp / "repo"
    nb("repo", "init", str(repo))
    with peers.nbdkit("pattern", "8M") as k:
        nb("pull", k.uri, "--repo", str(repo), "--snapshot", "a")
        nb("pull", k.uri, "--repo", str(repo), "--snapshot", "b")
    with peers.nbdkit("pattern", "8M", "rdelay=3", filters=["delay"]) as k:
        pull = subprocess.Popen([sys.executable, "-m", "nbdbackup.cli", "pull", k.uri, "--repo", str(repo),
                                 "--snapshot", "c"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not _holds_shared_flock(pull.pid, repo / "lock"):
                assert pull.poll() is None and time.monotonic() < deadline, pull.communicate()
                time.sleep(0.05)
            t0 = time.monotonic()
            r = nb("repo", "prune", str(repo), "--keep-last", "1", ok=False)
            assert r.returncode == 1 and "is busy (in use)" in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert time.monotonic() - t0 < 20  # fails at once, does not wait for the pull
            assert pull.poll() is None  # the pull was still running: the refusal was the lock's
            dry = json.loads(nb("repo", "prune", str(repo), "--keep-last", "1", "--dry-run", "--json").stdout)
            assert dry["remove"] == ["a"]  # c is not saved yet
        finally:
            out, err = pull.communicate(timeout=120)
        assert pull.returncode == 0, err
    assert sorted(p.stem for p in (repo / "snapshots").iterdir()) == ["a", "b", "c"]
    assert json.loads(nb("repo", "prune", str(repo), "--keep-last", "1", "--json").stdout)["removed"] == ["b", "a"]


# -- restic as the referee ---------------------------------------------------------


def cheapen_restic_key(repo: Path, password: str, log_n: int = 10) -> None:
    """Re-wrap the master key of the restic repository ``repo`` (its one key file)
    with scrypt N=2**log_n, r=8, p=1, so each restic command derives it in
    milliseconds.  restic's key file (doc/design.rst, "Keys, Encryption and
    MAC"): ``data`` = IV (16) || AES-256-CTR(master key JSON) || Poly1305-AES
    MAC (16) under the 64 bytes scrypt makes of the password (AES key, MAC k,
    MAC r); the file is named by the SHA-256 of its content."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    def user_key(salt: bytes, n: int, r: int, p: int) -> tuple[bytes, bytes, bytes]:
        d = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=512 << 20, dklen=64)
        return d[:32], d[32:48], d[48:]

    def mac(k: bytes, r: bytes, iv: bytes, msg: bytes) -> bytes:
        aes = Cipher(algorithms.AES(k), modes.ECB()).encryptor()
        return Poly1305.generate_tag(r + aes.update(iv) + aes.finalize(), msg)

    (old,) = (repo / "keys").iterdir()
    doc = json.loads(old.read_bytes())
    ek, mk, mr = user_key(base64.b64decode(doc["salt"]), doc["N"], doc["r"], doc["p"])
    blob = base64.b64decode(doc["data"])
    iv, ct = blob[:16], blob[16:-16]
    assert mac(mk, mr, iv, ct) == blob[-16:], "restic's key file is not the format this helper knows"
    dec = Cipher(algorithms.AES(ek), modes.CTR(iv)).decryptor()
    master = dec.update(ct) + dec.finalize()
    salt, iv = os.urandom(64), os.urandom(16)
    ek, mk, mr = user_key(salt, 1 << log_n, 8, 1)
    enc = Cipher(algorithms.AES(ek), modes.CTR(iv)).encryptor()
    ct = enc.update(master) + enc.finalize()
    doc.update(N=1 << log_n, r=8, p=1, salt=base64.b64encode(salt).decode(),
               data=base64.b64encode(iv + ct + mac(mk, mr, iv, ct)).decode())
    raw = json.dumps(doc).encode()
    (repo / "keys" / hashlib.sha256(raw).hexdigest()).write_bytes(raw)
    old.unlink()

#: Irregular backup times over 14 months (UTC), in pairs across the boundaries
#: of an hour, a day (one at exactly 00:00:00), an ISO week (Sun/Mon), a month,
#: a year, and ISO week 2025-W01 starting on Monday 2024-12-30; several an hour.
RESTIC_TIMES = [datetime.datetime.fromisoformat(t + "+00:00") for t in (
    "2024-10-31 23:45:00", "2024-11-01 00:15:00", "2024-11-03 23:45:00", "2024-11-04 00:15:00",
    "2024-11-04 00:59:59", "2024-11-04 01:00:00", "2024-11-06 12:00:00", "2024-11-06 12:30:00",
    "2024-11-06 13:10:00", "2024-11-21 08:00:00", "2024-12-29 10:00:00", "2024-12-31 23:45:00",
    "2025-01-01 00:15:00", "2025-02-28 10:00:00", "2025-03-01 09:00:00", "2025-06-15 12:00:00",
    "2025-09-30 23:59:59", "2025-10-01 00:00:00", "2025-11-30 12:00:00", "2025-12-01 12:00:00",
    "2025-12-02 06:00:00", "2025-12-02 06:40:00", "2025-12-02 07:05:00", "2025-12-02 09:00:00",
    "2025-12-03 00:00:00", "2025-12-03 00:30:00", "2025-12-03 02:00:00", "2025-12-03 02:10:00")]
RESTIC_POLICIES = [
    ["--keep-daily", "4"],
    ["--keep-last", "2", "--keep-hourly", "3", "--keep-weekly", "3"],
    ["--keep-daily", "3", "--keep-weekly", "4", "--keep-monthly", "6", "--keep-yearly", "2"],
    ["--keep-within", "3d2h"],
    ["--keep-within", "1m5d", "--keep-monthly", "3"],
    ["--keep-hourly", "100"],  # every bucket of each kind (restic 0.14 has no 'unlimited')
    ["--keep-daily", "100"],
    ["--keep-weekly", "100"],
    ["--keep-monthly", "100", "--keep-yearly", "100"],
]


@pytest.mark.timeout(400)  # 28 restic backups and 9 forgets (each derived the key in ~1 s before cheapen_restic_key)
def test_same_decisions_as_restic_forget(short_tmp):
    restic = peers.require("restic")
    env = dict(os.environ, RESTIC_REPOSITORY=str(short_tmp / "restic"), RESTIC_PASSWORD="test", TZ="UTC",
               RESTIC_CACHE_DIR=str(short_tmp / "cache"))

    def run(*args: str) -> str:
        r = subprocess.run([restic, *args], env=env,
                           capture_output=True, text=True, errors="replace", timeout=120)
        assert r.returncode == 0, (args, r.stderr)
        return r.stdout

    run("init")
    cheapen_restic_key(short_tmp / "restic", env["RESTIC_PASSWORD"])
    src = short_tmp / "src"
    src.mkdir()
    (src / "f").write_text("x")
    repo = short_tmp / "repo"
    nb("repo", "init", str(repo))
    with peers.nbdkit("memory", "1M") as k:
        nb("pull", k.uri, "--repo", str(repo), "--snapshot", "proto")
    r = Repository.open(DirStore(str(repo)))
    proto = r.load_snapshot("proto")
    r.delete_snapshot("proto")
    # restic's backups run 4 at a time (restic's backup lock is shared), ours are recorded meanwhile.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        done = [pool.submit(run, "backup", "--quiet", "--host", "h", "--time", t.strftime("%Y-%m-%d %H:%M:%S"),
                            str(src)) for t in RESTIC_TIMES]
        for i, t in enumerate(RESTIC_TIMES):
            r.save_snapshot(f"n{i:02d}", proto, created=t)
        for f in done:
            f.result()
    ids = {}
    for sn in json.loads(run("snapshots", "--json")):
        t = datetime.datetime.fromisoformat(sn["time"][:19]).replace(tzinfo=UTC)
        ids[sn["id"]] = f"n{RESTIC_TIMES.index(t):02d}"
    assert len(ids) == len(RESTIC_TIMES)
    for policy in RESTIC_POLICIES:
        groups = json.loads(run("forget", "--dry-run", "--json", *policy))
        assert len(groups) == 1
        restic_keep = sorted(ids[s["id"]] for s in groups[0]["keep"])
        ours = json.loads(nb("repo", "prune", str(repo), *policy, "--dry-run", "--json").stdout)
        assert sorted(ours["keep"]) == restic_keep, (policy, ours["keep"], restic_keep)
        assert 1 < len(restic_keep) < len(RESTIC_TIMES), (policy, restic_keep)  # keeps some, removes some
