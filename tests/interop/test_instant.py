"""Interop: instant recovery (``serve NAME=restore:REPO#SNAPSHOT,target=SPEC``, QMP ``restore-start``).

A 64 MiB snapshot (random data chunks, zero chunks, chunks half zero) is
stored in a repository (a directory, or the Ceph RGW for a few cases) and
served by a restoring export while its restore job runs, speed-limited so
that the guest meets chunks not restored yet:

- ``nbdcopy`` and ``qemu-img compare`` read through the export the moment
  it listens and see exactly the snapshot (copy-on-read);
- a ``qemu-io`` writer changes about 10% of the disk (unaligned writes,
  write-zeroes, whole chunks) while the restore runs; the export reads as
  the model (snapshot + writes) throughout, and at completion the target
  file equals the model (``qemu-img compare``), for several seeds and speeds;
- the server is killed with SIGKILL (or stopped with SIGTERM) mid-way, restarted with the same
  arguments, resumes where the persistent progress map says (not from zero)
  and still ends with target == model (every write was flushed before the
  kill);
- over QMP: ``restore-start``, pause/resume/set-speed, then a full backup of
  the restored export right away, and the first incremental after the
  restore (the ``bitmap=`` started with the restore) pulled into the
  repository restores to exactly the disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import peers
from qemutools import qemu_io

M = 1 << 20
#: The snapshot's size: 64 MiB in the suite; the issue's 1 GiB by hand with
#: NBDBACKUP_INSTANT_TEST_MIB=1024 (slower speeds then take minutes).
SIZE = int(os.environ.get("NBDBACKUP_INSTANT_TEST_MIB", "64")) * M
CHUNK = 256 * 1024


def make_image(path: Path, seed: int) -> None:
    """Random chunks (60%), zero chunks, and chunks with a zero half."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for i in range(SIZE // CHUNK):
            r = rng.random()
            if r < 0.6:
                f.seek(i * CHUNK)
                f.write(rng.randbytes(CHUNK))
            elif r < 0.75:
                f.seek(i * CHUNK + CHUNK // 2)
                f.write(rng.randbytes(CHUNK // 2))


def store_image(repo: str, name: str, path: Path) -> None:
    """Put ``path`` into repository ``repo`` as snapshot ``name`` (created
    with CHUNK-sized chunks when missing)."""
    from nbdbackup.agent.manifest import Manifest
    from nbdbackup.agent.repo import Repository, open_store
    from nbdbackup.errors import ConfigError

    st = open_store(repo)
    try:
        rep = Repository.open(st)
    except ConfigError:
        rep = Repository.init(st, CHUNK)
    man = Manifest(path.stat().st_size, rep.chunk_size)
    with open(path, "rb") as f:
        for i in range(man.count):
            data = f.read(rep.chunk_size)
            d = rep.chunk_id(data)
            rep.put_chunk(d, data)
            man.chunks[i] = d
    with st.lock(False):
        rep.save_snapshot(name, man)


def writes_for(seed: int, fraction: float = 0.10) -> list[tuple[str, int, int, int]]:
    """(kind, offset, length, pattern) covering about ``fraction`` of the disk."""
    rng = random.Random(seed * 7919)
    out, total = [], 0
    while total < fraction * SIZE:
        kind = rng.choice(["write", "write", "write", "zero", "chunk"])
        if kind == "chunk":  # a whole chunk (owned, never fetched)
            off, n = rng.randrange(SIZE // CHUNK) * CHUNK, CHUNK
            kind = "write"
        else:
            n = rng.randint(1, 96 * 1024)
            off = rng.randrange(SIZE - n)
        out.append((kind, off, n, rng.randrange(1, 256)))
        total += n
    return out


def qemu_io_cmds(ws) -> list[str]:
    cmds = [f"write -z {o} {n}" if k == "zero" else f"write -P {p} {o} {n}" for k, o, n, p in ws]
    return cmds + ["flush"]


def apply(model: bytearray, ws) -> None:
    for k, o, n, p in ws:
        model[o:o + n] = bytes(n) if k == "zero" else bytes([p]) * n


def same(a, b) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)],
                       capture_output=True, timeout=120)
    return r.returncode == 0


def query_jobs(ctl: str) -> dict:
    from nbdbackup.control.client import ControlClient

    async def q():
        async with ControlClient(ctl) as c:
            return {j["id"]: j for j in await c.execute("query-jobs")}

    return asyncio.run(q())


def qmp(ctl: str, name: str, args: dict | None = None):
    from nbdbackup.control.client import ControlClient

    async def q():
        async with ControlClient(ctl) as c:
            return await c.execute(name, args)

    return asyncio.run(q())


def wait_job(ctl: str, job: str, timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while True:
        j = query_jobs(ctl)[job]
        if j["status"] == "concluded":
            return j
        assert time.monotonic() < end, j
        time.sleep(0.1)


def serve(ctl: str, spec: str, extra=()):
    return peers.nbdbackup_serve(f"vm={spec}", extra=("--control", ctl, *extra))


@pytest.fixture
def setup_local(short_tmp):
    def make(seed: int):
        img = short_tmp / f"snap{seed}.raw"
        make_image(img, seed)
        repo = str(short_tmp / "repo")
        store_image(repo, "s0", img)
        return img, repo
    return make


# -- reads through the export equal the snapshot at once -------------------------------------


def test_reads_through_restoring_export_equal_snapshot_at_once(short_tmp, setup_local):
    img, repo = setup_local(1)
    tgt, ctl = short_tmp / "target.raw", str(short_tmp / "ctl.sock")
    with serve(ctl, f"restore:{repo}#s0,target={tgt},speed=2M") as srv:
        t0 = time.monotonic()
        uri = srv.uri_for("vm")
        # qemu-io reads a chunk the job cannot have reached yet (the end of the disk)
        j0 = query_jobs(ctl)["restore-vm"]
        assert j0["status"] == "running" and not j0["complete"]
        with open(img, "rb") as f:
            f.seek(SIZE - CHUNK)
            tail = f.read(CHUNK)
        got = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", f"read -v {SIZE - 4096} 4096", uri],
                             capture_output=True, timeout=60).stdout
        want_hex = tail[-4096:][:16].hex(" ")
        assert want_hex in got.decode("ascii", "replace"), got[:300]
        copy = short_tmp / "copy.raw"
        subprocess.run(["nbdcopy", uri, str(copy)], check=True, timeout=120)
        first_read = time.monotonic() - t0
        assert same(img, copy)
        assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(img), uri],
                              timeout=120).returncode == 0
        j = query_jobs(ctl)["restore-vm"]
        # the whole disk was read long before a 2 MiB/s job could have copied it
        assert first_read < 20, first_read
        assert j["bytes-fetched-on-demand"] > 0
        j = wait_job(ctl, "restore-vm")
        assert "error" not in j and j["complete"]
    assert same(img, tgt)
    # holes stay holes: the target is sparse
    assert os.stat(tgt).st_blocks * 512 < 0.8 * SIZE
    # once complete, a restart serves the target alone: the repository is not needed
    shutil.rmtree(repo)
    with serve(ctl, f"restore:{repo}#s0,target={tgt},speed=2M") as srv:
        assert query_jobs(ctl) == {} and "completed before" in srv.log()
        assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(img),
                               srv.uri_for("vm")], timeout=120).returncode == 0


# -- a writer changes 10% of the disk while the restore runs ------------------------------------


@pytest.mark.parametrize("seed,speed", [(1, "16M"), (2, "48M"), (3, "0")])
def test_writer_during_restore_target_equals_model(short_tmp, setup_local, seed, speed):
    img, repo = setup_local(seed)
    tgt, ctl = short_tmp / "target.raw", str(short_tmp / "ctl.sock")
    model = bytearray(img.read_bytes())
    ws = writes_for(seed)
    with serve(ctl, f"restore:{repo}#s0,target={tgt},speed={speed}") as srv:
        uri = srv.uri_for("vm")
        for k in range(4):
            batch = ws[k::4]
            qemu_io(uri, *qemu_io_cmds(batch))
            apply(model, batch)
        mpath = short_tmp / "model.raw"
        mpath.write_bytes(model)
        assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(mpath), uri],
                              timeout=120).returncode == 0
        j = wait_job(ctl, "restore-vm")
        assert "error" not in j and j["complete"], j
        # At 16 MiB/s the job needs 4 s for the 64 MiB: the writer (which starts at once) surely
        # lands in chunks not yet restored. Faster jobs may finish first (seen in a clean container).
        assert j["bytes-owned-by-guest"] > 0 or speed != "16M", j
    assert same(mpath, tgt)


# -- kill -9 mid-way, restart, resume ---------------------------------------------------------------


@pytest.mark.parametrize("seed,sig", [(4, signal.SIGKILL), (5, signal.SIGKILL), (6, signal.SIGTERM)])
def test_kill9_midway_restart_resumes(short_tmp, setup_local, seed, sig):
    img, repo = setup_local(seed)
    tgt, ctl = short_tmp / "target.raw", str(short_tmp / "ctl.sock")
    model = bytearray(img.read_bytes())
    ws = writes_for(seed)
    spec = f"restore:{repo}#s0,target={tgt},speed=6M"  # a checkpoint every 5 s: the first at ~45%
    with serve(ctl, spec) as srv:
        qemu_io(srv.uri_for("vm"), *qemu_io_cmds(ws[0::2]))  # acknowledged and flushed
        apply(model, ws[0::2])
        end = time.monotonic() + 60
        while True:
            j = query_jobs(ctl)["restore-vm"]
            if j["chunks-durable"] >= j["chunks-total"] // 3:
                break
            assert j["status"] == "running" and time.monotonic() < end, j
            time.sleep(0.1)
        # SIGKILL: a crash; SIGTERM: the graceful stop (cancels the job, flushes, exits 0)
        assert peers.stop(srv, sig) == (-sig if sig == signal.SIGKILL else 0)
        durable_at_kill = j["chunks-durable"]
    assert durable_at_kill < j["chunks-total"]
    with serve(ctl, spec.replace("speed=6M", "speed=48M")) as srv:
        j = query_jobs(ctl)["restore-vm"]
        # resumed: at least what was durable before the kill is not redone
        assert j["chunks-done"] >= durable_at_kill and "resuming the restore" in srv.log()
        uri = srv.uri_for("vm")
        mpath = short_tmp / "model.raw"
        mpath.write_bytes(model)
        assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(mpath), uri],
                              timeout=120).returncode == 0  # the flushed writes survived the kill
        qemu_io(uri, *qemu_io_cmds(ws[1::2]))
        apply(model, ws[1::2])
        mpath.write_bytes(model)
        j = wait_job(ctl, "restore-vm")
        assert "error" not in j and j["complete"], j
        assert j["total-progress"] < SIZE  # only what was left
    assert same(mpath, tgt)


# -- QMP restore-start, job verbs, a backup right away, the first incremental --------------------------


def test_qmp_restore_start_verbs_backup_and_first_incremental(short_tmp, setup_local):
    img, repo = setup_local(6)
    tgt, ctl = short_tmp / "target.raw", str(short_tmp / "ctl.sock")
    state = short_tmp / "state"
    model = bytearray(img.read_bytes())
    ws = writes_for(6, 0.05)
    with peers.nbdbackup_serve("scratch=memory:1M", extra=("--control", ctl, "--state-dir", str(state))) as srv:
        assert qmp(ctl, "restore-start", {"export": "vm", "repo": repo, "snapshot": "s0", "target": str(tgt),
                                          "job-id": "r1", "speed": 1 * M, "bitmap": "since-s0"}) == {}
        qmp(ctl, "job-pause", {"id": "r1"})
        time.sleep(0.3)
        p1 = query_jobs(ctl)["r1"]
        time.sleep(0.5)
        p2 = query_jobs(ctl)["r1"]
        assert p1["status"] == p2["status"] == "paused"
        assert p2["bytes-copied-by-pump"] - p1["bytes-copied-by-pump"] <= CHUNK * 4  # workers stopped
        uri = srv.uri_for("vm")
        qemu_io(uri, *qemu_io_cmds(ws))  # the guest works while the job is paused
        apply(model, ws)
        qmp(ctl, "job-resume", {"id": "r1"})
        qmp(ctl, "job-set-speed", {"id": "r1", "speed": 0})
        j = wait_job(ctl, "r1")
        assert "error" not in j and j["complete"] and j["type"] == "restore", j
        bm = {b["name"]: b for b in qmp(ctl, "query-bitmaps", {"export": "vm"})}
        assert bm["since-s0"]["count"] > 0 and bm["since-s0"]["persistent"]
        # a full backup of the restored export, right away
        bk = short_tmp / "backup.raw"
        qmp(ctl, "backup-start", {"export": "vm", "job-id": "b1", "sync": "full", "target": str(bk)})
        jb = wait_job(ctl, "b1")
        assert "error" not in jb, jb
        mpath = short_tmp / "model.raw"
        mpath.write_bytes(model)
        assert same(mpath, bk)
        # the first incremental after the restore: only what the guest changed
        pulled = json.loads(peers.nbdbackup_cli("pull", uri, "--repo", repo, "--snapshot", "s1", "--base", "s0",
                                                "--bitmap", "since-s0", "--json").stdout)
        assert pulled["bytes_read"] <= bm["since-s0"]["count"] * 1 + 2 * M
        qmp(ctl, "job-dismiss", {"id": "r1"})
        assert "r1" not in query_jobs(ctl)
    out = short_tmp / "s1.raw"
    r = peers.restore_snapshot(repo, "s1", out)
    assert r.returncode == 0, r.stderr
    assert same(mpath, out)
    assert same(mpath, tgt)


def test_bad_specs_are_refused_before_listening(short_tmp, setup_local):
    img, repo = setup_local(7)
    for spec, msg in ((f"restore:{repo}#nope,target={short_tmp / 't'}", "no snapshot"),
                      (f"restore:{repo}#s0", "needs target"),
                      (f"restore:{repo}#s0,target={short_tmp / 't'},colour=red", "bad restore option"),
                      (f"restore:{short_tmp / 'norepo'}#s0,target={short_tmp / 't'}", "not a repository")):
        r = peers.nbdbackup_cli("serve", "--socket", str(short_tmp / "x.sock"), f"vm={spec}", ok=False)
        assert r.returncode == 1 and msg in r.stderr, (spec, r.stderr)
        assert "Traceback" not in r.stderr
    # a state directory made for another snapshot is refused
    store_image(repo, "s9", img)
    tgt = short_tmp / "t2.raw"
    ctl = str(short_tmp / "c.sock")
    with serve(ctl, f"restore:{repo}#s0,target={tgt}"):
        wait_job(ctl, "restore-vm")
    r = peers.nbdbackup_cli("serve", "--socket", str(short_tmp / "x.sock"),
                            f"vm=restore:{repo}#s9,target={tgt}", ok=False)
    assert r.returncode == 1 and "another restore" in r.stderr, r.stderr
    # hunt 4: ... and so is one made for the same snapshot NAME in another repository (the
    # completed state must not make the target pass for repo2's s0 unseen)
    img2, repo2 = short_tmp / "other.raw", str(short_tmp / "repo2")
    make_image(img2, 8)
    store_image(repo2, "s0", img2)
    try:
        r = peers.nbdbackup_cli("serve", "--socket", str(short_tmp / "x.sock"),
                                f"vm=restore:{repo2}#s0,target={tgt}", ok=False, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve took the target restored from {repo}#s0 for a completed restore of {repo2}#s0")
    assert r.returncode == 1 and "another restore" in r.stderr, r.stderr
    # a target gone while its state stayed would read as zeros where the state says "restored"
    os.unlink(tgt)
    r = peers.nbdbackup_cli("serve", "--socket", str(short_tmp / "x.sock"),
                            f"vm=restore:{repo}#s0,target={tgt}", ok=False)
    assert r.returncode == 1 and "is missing but its restore state" in r.stderr, r.stderr
    assert not tgt.exists()


# -- the object store ------------------------------------------------------------------------------




@pytest.mark.parametrize("kill", [False, True])
def test_restore_from_rgw_reads_writes_kill(short_tmp, s3env, kill):
    seed = 8
    img = short_tmp / "snap.raw"
    make_image(img, seed)
    store_image(s3env, "s0", img)
    tgt, ctl = short_tmp / "target.raw", str(short_tmp / "ctl.sock")
    model = bytearray(img.read_bytes())
    ws = writes_for(seed)
    spec = f"restore:{s3env}#s0,target={tgt},speed={'4M' if kill else '16M'}"
    mpath = short_tmp / "model.raw"
    with serve(ctl, spec) as srv:
        uri = srv.uri_for("vm")
        if not kill:  # (reading it all restores it all: the kill case must not)
            assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(img), uri],
                                  timeout=120).returncode == 0
        # the writes meet chunks not fetched yet (the job runs at 16 MiB/s)
        qemu_io(uri, *qemu_io_cmds(ws))
        apply(model, ws)
        mpath.write_bytes(model)
        if kill:
            assert not query_jobs(ctl)["restore-vm"]["complete"]
            peers.stop(srv, signal.SIGKILL)
        else:
            j = wait_job(ctl, "restore-vm")
            assert "error" not in j and j["complete"], j
    if kill:
        with serve(ctl, spec) as srv:
            assert "resuming the restore" in srv.log()
            assert subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(mpath),
                                   srv.uri_for("vm")], timeout=120).returncode == 0
            j = wait_job(ctl, "restore-vm")
            assert "error" not in j and j["complete"], j
    assert same(mpath, tgt)


def test_repository_locked_while_restoring(short_tmp, setup_local):
    """gc/delete/prune refuse while the snapshot's chunks may still be read;
    the lock goes when the restore completes."""
    img, repo = setup_local(9)
    tgt, ctl = short_tmp / "target.raw", str(short_tmp / "ctl.sock")
    with serve(ctl, f"restore:{repo}#s0,target={tgt},speed=1M") as srv:
        r = peers.nbdbackup_cli("repo", "gc", repo, ok=False)
        assert r.returncode != 0 and "busy" in r.stderr, r.stderr
        subprocess.run(["nbdcopy", srv.uri_for("vm"), "null:"], check=True, timeout=120)  # restores all
        j = wait_job(ctl, "restore-vm")
        assert j["complete"], j
        peers.nbdbackup_cli("repo", "gc", repo)
    assert same(img, tgt)


def test_restore_onto_qemu_nbd_qcow2_target(short_tmp, setup_local):
    """The target is a remote NBD export (qemu-nbd serving a qcow2): the
    restore goes over NBD, holes are zeroed with WRITE_ZEROES, and the qcow2
    ends equal to the model."""
    img, repo = setup_local(10)
    q = short_tmp / "target.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), str(SIZE)], check=True)
    ctl = str(short_tmp / "ctl.sock")
    model = bytearray(img.read_bytes())
    ws = writes_for(10, 0.05)
    with peers.qemu_nbd(q, fmt="qcow2") as t:
        spec = f"restore:{repo}#s0,target={t.uri},state={short_tmp / 'state'},speed=32M"
        with serve(ctl, spec) as srv:
            qemu_io(srv.uri_for("vm"), *qemu_io_cmds(ws))
            apply(model, ws)
            j = wait_job(ctl, "restore-vm")
            assert "error" not in j and j["complete"], j
    mpath = short_tmp / "model.raw"
    mpath.write_bytes(model)
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(mpath), str(q)], timeout=120)
    assert r.returncode == 0
    # zero chunks stayed unallocated in the qcow2 (WRITE_ZEROES, not data)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(q)], capture_output=True,
                                     check=True).stdout)
    assert info["actual-size"] < 0.9 * SIZE
