"""Faults under the source and the target of a backup, through the real server.

Layout of every case::

    libnbd (live writes) --> nbdbackup serve --control  (export disk)
                               |  source: nbd+unix://  nbdkit --filter=error file disk.raw
                               |          (pread fails while SRC_FLAG exists)
                               `- target: nbd+unix://  nbdkit --filter=error file target.raw
                                          (pwrite fails while TGT_FLAG exists)

The error filter's ``error-pread-file`` / ``error-pwrite-file`` make the
failures switchable: errors happen exactly while the flag file exists, with
the errno the case asks for (EIO or ENOSPC).  The source image has a distinct
non-zero byte per 64 KiB cluster except a few hole clusters; the target file
is pre-filled with 0xEE, so a cluster the job never wrote is recognisable.
With ``max-chunk`` = one cluster, every pump copy is one cluster, so the
clusters an ``ignore`` policy skipped are exactly those still 0xEE.

Checked for each error policy (``report``, ``ignore``, ``stop``, ``enospc``)
on each side, and for ``on-cbw-error`` (``break-guest-write``,
``break-snapshot``, and ``cbw-timeout`` through nbdkit's delay filter): the
job's status, ``error``, counters, its BLOCK_JOB_ERROR / BLOCK_JOB_COMPLETED
events, the target's content, the snapshot export's answers, and -- in every
case -- that every acknowledged live write is in the live export afterwards
(a model of the writes compared with a full read of the export).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import peers
from nbdbackup.control.client import CommandError, ControlClient


# Expectations count 64 KiB clusters (the default before session 14).
pytestmark = pytest.mark.usefixtures("clusters_of_64k")


KiB = 1024
MiB = 1 << 20
CS = 64 * KiB
SIZE = 4 * MiB
NCL = SIZE // CS
HOLES = (10, 11, 40)
FILL = 0xEE


def cluster_byte(c: int) -> int:
    return 0 if c in HOLES else (c % 200) + 1


def source_image() -> bytearray:
    img = bytearray(SIZE)
    for c in range(NCL):
        if c not in HOLES:
            img[c * CS:(c + 1) * CS] = bytes([cluster_byte(c)]) * CS
    return img


@dataclass
class Env:
    """One served disk with switchable faults.  ``model`` is the live image
    the test expects (the original plus every acknowledged live write)."""

    dir: Path
    ctl: str
    live_uri: str
    src_flag: Path
    tgt_flag: Path
    target_uri: str
    target_path: Path
    original: bytes
    model: bytearray
    client: ControlClient | None = None
    events: list[dict] = field(default_factory=list)

    def snap_uri(self, job: str) -> str:
        return self.peer.uri_for(f"disk@{job}")

    # -- QMP ------------------------------------------------------------------

    async def qmp(self, cmd: str, args: dict | None = None):
        assert self.client is not None
        return await self.client.execute(cmd, args)

    async def start(self, job: str, **kw) -> None:
        args = {"export": "disk", "job-id": job, "target": self.target_uri, "max-chunk": CS,
                "max-workers": 1, **kw}
        assert await self.qmp("backup-start", args) == {}

    async def job(self, job: str) -> dict:
        return {j["id"]: j for j in await self.qmp("query-jobs")}[job]

    async def wait_status(self, job: str, *statuses: str, timeout: float = 20) -> dict:
        end = time.monotonic() + timeout
        while True:
            info = await self.job(job)
            if info["status"] in statuses:
                return info
            assert time.monotonic() < end, f"job {job} still {info}"
            await asyncio.sleep(0.02)

    async def drain_events(self) -> list[dict]:
        """Move every event received so far into ``events``; return them all."""
        assert self.client is not None
        while (ev := await self.client.next_event(timeout=0.05)) is not None:
            self.events.append(ev)
        return self.events

    def named(self, name: str) -> list[dict]:
        return [e["data"] for e in self.events if e.get("event") == name]

    # -- live I/O through libnbd (in a thread) ------------------------------------

    async def live_write(self, data: bytes, offset: int) -> OSError | None:
        """Write through the live export; update the model when acknowledged."""
        def do():
            h = connect(self.live_uri)
            try:
                h.pwrite(data, offset)
            finally:
                close(h)
        try:
            await asyncio.to_thread(do)
        except Exception as e:  # nbd.Error
            return OSError(getattr(e, "errnum", None) or 0, str(e))
        self.model[offset:offset + len(data)] = data
        return None

    async def read(self, uri: str, offset: int = 0, length: int = SIZE) -> bytes | OSError:
        def do():
            h = connect(uri)
            try:
                return bytes(h.pread(length, offset))
            finally:
                close(h)
        try:
            return await asyncio.to_thread(do)
        except Exception as e:
            return OSError(getattr(e, "errnum", None) or 0, str(e))

    async def check_live(self) -> None:
        """Every acknowledged live write is there (read with no fault active)."""
        live = await self.read(self.live_uri)
        assert isinstance(live, bytes), live
        if live != bytes(self.model):
            bad = next(i for i in range(SIZE) if live[i] != self.model[i])
            pytest.fail(f"live export differs from the model at byte {bad} (cluster {bad // CS})")

    def target_clusters(self) -> list[bytes]:
        t = self.target_path.read_bytes()
        assert len(t) == SIZE
        return [t[c * CS:(c + 1) * CS] for c in range(NCL)]

    def orig(self, c: int) -> bytes:
        return self.original[c * CS:(c + 1) * CS]


def connect(uri: str):
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def close(h) -> None:
    with contextlib.suppress(Exception):
        h.shutdown()


def make_disks(short_tmp: Path) -> tuple[bytearray, Path, Path]:
    """Write the source image (sparse where it has holes) and the FILL-ed
    target under ``short_tmp``; return (image, disk path, target path)."""
    img = source_image()
    disk = short_tmp / "disk.raw"
    with open(disk, "wb") as f:
        for c in range(NCL):
            if c not in HOLES:
                f.seek(c * CS)
                f.write(img[c * CS:(c + 1) * CS])
        f.truncate(SIZE)
    target = short_tmp / "target.raw"
    target.write_bytes(bytes([FILL]) * SIZE)
    return img, disk, target


@contextlib.contextmanager
def environment(short_tmp: Path, *, src_errno: str = "EIO", tgt_errno: str = "EIO",
                tgt_filters: tuple[str, ...] = (), tgt_args: tuple[str, ...] = ()):
    img, disk, target = make_disks(short_tmp)
    src_flag, tgt_flag = short_tmp / "src.flag", short_tmp / "tgt.flag"
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    with peers.nbdkit("file", os.fspath(disk), "error-pread-rate=1", f"error-pread={src_errno}",
                      f"error-pread-file={src_flag}", filters=["error"]) as src, \
            peers.nbdkit("file", os.fspath(target), "error-pwrite-rate=1", f"error-pwrite={tgt_errno}",
                         f"error-pwrite-file={tgt_flag}", *tgt_args,
                         filters=["error", *tgt_filters]) as tgt, \
            peers.nbdbackup_serve(f"disk={src.uri}", extra=["--control", ctl]) as peer:
        env = Env(short_tmp, ctl, peer.uri_for("disk"), src_flag, tgt_flag, tgt.uri, target,
                  bytes(img), bytearray(img))
        env.peer = peer  # type: ignore[attr-defined]
        yield env


def run(env: Env, scenario, timeout: float = 40) -> None:
    async def main():
        env.client = ControlClient(env.ctl)
        await env.client.connect()
        try:
            await scenario(env)
        finally:
            await env.client.close()
    asyncio.run(asyncio.wait_for(main(), timeout))


# -- report / ignore / stop / enospc ---------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("side", ["source", "target"])
def test_report(side, short_tmp):
    """report: the job fails with the error; BLOCK_JOB_ERROR(report) then
    BLOCK_JOB_COMPLETED with ``error``; live writes (made where CBW can
    succeed) are kept."""
    with environment(short_tmp) as env:
        async def scenario(env: Env) -> None:
            (env.src_flag if side == "source" else env.tgt_flag).touch()
            await env.start("j", sync="full")
            info = await env.wait_status("j", "concluded")
            assert "error" in info and info["current-progress"] < SIZE, info
            await env.drain_events()
            errs = env.named("BLOCK_JOB_ERROR")
            assert errs and errs[0]["action"] == "report", env.events
            assert errs[0]["operation"] == ("read" if side == "source" else "write"), errs
            done = env.named("BLOCK_JOB_COMPLETED")
            assert len(done) == 1 and done[0]["id"] == "j" and "error" in done[0], env.events
            assert not env.named("BLOCK_JOB_CANCELLED")
            # The failed job still guards its snapshot: remove the fault, write live.
            env.src_flag.unlink(missing_ok=True)
            env.tgt_flag.unlink(missing_ok=True)
            assert await env.live_write(b"\xa1" * 4096, 20 * CS + 100) is None
            snap = await env.read(env.snap_uri("j"))
            assert snap == env.original
            await env.qmp("job-dismiss", {"id": "j"})
            await env.check_live()
        run(env, scenario)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("side", ["source", "target"])
def test_ignore(side, short_tmp):
    """ignore: the job completes, BLOCK_JOB_ERROR(ignore), ``bytes-ignored`` is
    exactly the failing clusters, every other cluster is in the target."""
    with environment(short_tmp) as env:
        async def scenario(env: Env) -> None:
            cbw = [5, 6, 33]
            if side == "source":
                # CBW copies some clusters while the source is healthy, then
                # every pump read fails.
                await env.start("j", sync="full", speed=1, **{"on-source-error": "ignore"})
                for c in cbw:
                    assert await env.live_write(bytes([0xB0 + c]) * 512, c * CS + 512) is None
                env.src_flag.touch()
                await env.qmp("job-set-speed", {"id": "j", "speed": 0})
            else:
                # Every target WRITE fails; WRITE_ZEROES (zero clusters) works.
                env.tgt_flag.touch()
                await env.start("j", sync="full", **{"on-target-error": "ignore"})
            info = await env.wait_status("j", "concluded")
            assert "error" not in info, info
            assert info["current-progress"] == info["total-progress"] == SIZE, info
            env.src_flag.unlink(missing_ok=True)
            env.tgt_flag.unlink(missing_ok=True)
            await env.drain_events()
            errs = env.named("BLOCK_JOB_ERROR")
            assert errs and {e["action"] for e in errs} == {"ignore"}, errs
            done = env.named("BLOCK_JOB_COMPLETED")
            assert len(done) == 1 and "error" not in done[0], done
            tc = env.target_clusters()
            ignored = [c for c in range(NCL) if tc[c] == bytes([FILL]) * CS]
            assert info["bytes-ignored"] == len(ignored) * CS > 0, (info, ignored)
            for c in range(NCL):
                if c not in ignored:
                    assert tc[c] == env.orig(c), f"target cluster {c}"
            if side == "source":
                assert not set(cbw) & set(ignored)
                assert info["bytes-copied-by-cbw"] == len(cbw) * CS, info
            else:
                # the failing clusters are exactly those with data
                assert ignored == [c for c in range(NCL) if c not in HOLES], ignored
            # The snapshot still reads the point-in-time image (ignored
            # clusters come from the unchanged source), also after a live
            # write to an ignored cluster, which CBW now saves.
            snap_uri = env.snap_uri("j")
            assert await env.read(snap_uri) == env.original
            c = ignored[len(ignored) // 2]
            assert await env.live_write(b"\xd4" * 1000, c * CS + 10) is None
            assert await env.read(snap_uri) == env.original
            assert env.target_clusters()[c] == env.orig(c)
            await env.qmp("job-dismiss", {"id": "j"})
            await env.check_live()
        run(env, scenario)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("side,policy,err", [
    ("source", "stop", "EIO"), ("target", "stop", "EIO"),
    ("target", "enospc", "ENOSPC"), ("source", "enospc", "ENOSPC")])
def test_stop_then_resume(side, policy, err, short_tmp):
    """stop (and enospc on ENOSPC): the job pauses with the error; a live
    write while paused is protected; after the fault is gone job-resume
    retries and the job completes with a correct target."""
    with environment(short_tmp, src_errno=err, tgt_errno=err) as env:
        async def scenario(env: Env) -> None:
            flag = env.src_flag if side == "source" else env.tgt_flag
            flag.touch()
            await env.start("j", sync="full", **{f"on-{side}-error": policy})
            info = await env.wait_status("j", "paused")
            assert info.get("error"), info
            await env.drain_events()
            errs = env.named("BLOCK_JOB_ERROR")
            assert errs and {e["action"] for e in errs} == {"stop"}, errs
            statuses = [e["status"] for e in env.named("JOB_STATUS_CHANGE")]
            assert "paused" in statuses, statuses
            # still paused a little later: the policy does not retry on its own
            await asyncio.sleep(0.3)
            assert (await env.job("j"))["status"] == "paused"
            # A live write to an uncopied cluster while the copy cannot work:
            # refused (break-guest-write, the default), the disk unchanged.
            e = await env.live_write(b"\xc2" * 4096, 41 * CS + 8192)
            assert isinstance(e, OSError) and e.errno == errno.EIO, e
            flag.unlink()
            assert await env.read(env.live_uri, 41 * CS, CS) == env.orig(41)
            # A live write while paused: CBW saves the old content first.
            assert await env.live_write(b"\xc3" * 8192, 30 * CS - 4096) is None
            await env.qmp("job-resume", {"id": "j"})
            info = await env.wait_status("j", "concluded")
            assert "error" not in info, info
            assert info["current-progress"] == info["total-progress"] == SIZE, info
            assert info["bytes-ignored"] == 0, info
            await env.drain_events()
            done = env.named("BLOCK_JOB_COMPLETED")
            assert len(done) == 1 and "error" not in done[0], done
            assert env.target_path.read_bytes() == env.original
            assert await env.read(env.snap_uri("j")) == env.original
            await env.qmp("job-dismiss", {"id": "j"})
            await env.check_live()
        run(env, scenario)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("side", ["source", "target"])
def test_enospc_reports_eio(side, short_tmp):
    """enospc: an error other than ENOSPC is reported (the job fails)."""
    with environment(short_tmp) as env:
        async def scenario(env: Env) -> None:
            (env.src_flag if side == "source" else env.tgt_flag).touch()
            await env.start("j", sync="full", **{f"on-{side}-error": "enospc"})
            info = await env.wait_status("j", "concluded", "paused")
            assert info["status"] == "concluded" and "error" in info, info
            await env.drain_events()
            errs = env.named("BLOCK_JOB_ERROR")
            assert errs and errs[0]["action"] == "report", errs
            done = env.named("BLOCK_JOB_COMPLETED")
            assert len(done) == 1 and "error" in done[0], done
            env.src_flag.unlink(missing_ok=True)
            env.tgt_flag.unlink(missing_ok=True)
            await env.qmp("job-dismiss", {"id": "j"})
            await env.check_live()
        run(env, scenario)


# -- copy-before-write failures ------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("side", ["target", "source"])
def test_cbw_break_guest_write(side, short_tmp):
    """break-guest-write: while the copy fails, a live write to an uncopied
    cluster fails with EIO and changes nothing; the snapshot stays right and
    the job keeps running; once the fault is gone the same write succeeds."""
    with environment(short_tmp) as env:
        async def scenario(env: Env) -> None:
            await env.start("j", sync="none", **{"on-cbw-error": "break-guest-write"})
            # a cluster copied while healthy
            assert await env.live_write(b"\x71" * CS, 3 * CS) is None
            flag = env.src_flag if side == "source" else env.tgt_flag
            flag.touch()
            e = await env.live_write(b"\x72" * 4096, 7 * CS + 4096)
            assert isinstance(e, OSError) and e.errno == errno.EIO, e
            # A write to an already copied cluster needs no copy: it works.
            assert await env.live_write(b"\x73" * 512, 3 * CS + 512) is None
            flag.unlink()
            live = await env.read(env.live_uri, 7 * CS, CS)
            assert live == env.orig(7), "a failed live write changed the disk"
            snap = await env.read(env.snap_uri("j"))
            assert snap == env.original
            info = await env.job("j")
            assert info["status"] == "running" and not info["snapshot-broken"], info
            assert await env.live_write(b"\x74" * 4096, 7 * CS + 4096) is None
            assert await env.read(env.snap_uri("j")) == env.original
            await env.qmp("job-cancel", {"id": "j"})
            info = await env.wait_status("j", "concluded")
            assert "error" not in info, info  # cancel ends a fleecing job normally
            tc = env.target_clusters()
            assert tc[3] == env.orig(3) and tc[7] == env.orig(7)
            await env.qmp("job-dismiss", {"id": "j"})
            await env.check_live()
        run(env, scenario)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sync,side", [("none", "target"), ("full", "target"), ("none", "source")])
def test_cbw_break_snapshot(sync, side, short_tmp):
    """break-snapshot: the live write goes on; the snapshot export then
    answers EIO (also once the fault is gone); the job fails
    (BLOCK_JOB_COMPLETED with error)."""
    with environment(short_tmp) as env:
        async def scenario(env: Env) -> None:
            kw = {"speed": 1} if sync == "full" else {}
            await env.start("j", sync=sync, **{"on-cbw-error": "break-snapshot"}, **kw)
            snap_uri = env.snap_uri("j")
            assert await env.read(snap_uri, 9 * CS, CS) == env.orig(9)
            flag = env.src_flag if side == "source" else env.tgt_flag
            flag.touch()
            assert await env.live_write(b"\x81" * 4096, 9 * CS) is None
            assert await env.live_write(b"\x82" * CS, 50 * CS) is None
            info = await env.wait_status("j", "concluded")
            assert "error" in info and info["snapshot-broken"], info
            flag.unlink()
            await env.drain_events()
            done = env.named("BLOCK_JOB_COMPLETED")
            assert len(done) == 1 and "error" in done[0], env.events
            for off, n in ((9 * CS, 512), (0, 4096), (60 * CS, CS)):
                r = await env.read(snap_uri, off, n)
                assert isinstance(r, OSError) and r.errno == errno.EIO, (off, r)
            # live writes after the break go straight through
            assert await env.live_write(b"\x83" * 700, 12 * CS + 3) is None
            await env.qmp("job-dismiss", {"id": "j"})
            await env.check_live()
        run(env, scenario)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["break-guest-write", "break-snapshot"])
def test_cbw_timeout(mode, short_tmp):
    """cbw-timeout: a target slower than the timeout counts as a CBW error:
    with break-guest-write the live write fails with EIO and the disk is
    unchanged; with break-snapshot it succeeds and the snapshot breaks."""
    with environment(short_tmp, tgt_filters=("delay",), tgt_args=("delay-write=3",)) as env:
        async def scenario(env: Env) -> None:
            await env.start("j", sync="none", **{"cbw-timeout": 1, "on-cbw-error": mode})
            t0 = time.monotonic()
            e = await env.live_write(b"\x91" * 4096, 2 * CS)
            assert time.monotonic() - t0 < 2.8
            if mode == "break-guest-write":
                assert isinstance(e, OSError) and e.errno == errno.EIO, e
                assert await env.read(env.live_uri, 2 * CS, CS) == env.orig(2)
                assert await env.read(env.snap_uri("j"), 0, 4 * CS) == env.original[:4 * CS]
                assert (await env.job("j"))["status"] == "running"
                await env.qmp("job-cancel", {"id": "j"})
                info = await env.wait_status("j", "concluded")
                assert "error" not in info, info
            else:
                assert e is None
                info = await env.wait_status("j", "concluded")
                assert "error" in info and info["snapshot-broken"], info
                r = await env.read(env.snap_uri("j"), 0, 4096)
                assert isinstance(r, OSError) and r.errno == errno.EIO, r
            await env.qmp("job-dismiss", {"id": "j"})
            await env.check_live()
        run(env, scenario, timeout=40)


def test_resume_refused_while_running(short_tmp):
    """job-resume on a running job is refused with a clear error (no state change)."""
    with environment(short_tmp) as env:
        async def scenario(env: Env) -> None:
            await env.start("j", sync="none")
            with pytest.raises(CommandError):
                await env.qmp("job-resume", {"id": "j"})
            assert (await env.job("j"))["status"] == "running"
            await env.qmp("job-cancel", {"id": "j"})
            await env.wait_status("j", "concluded")
            await env.qmp("job-dismiss", {"id": "j"})
        run(env, scenario)


@pytest.mark.timeout(60)
def test_stop_many_workers_then_cancel(short_tmp):
    """stop with several workers failing at once: one pause; a cancel while
    paused by the error ends the job as cancelled with a partial target;
    the snapshot stays valid until dismiss."""
    with environment(short_tmp) as env:
        async def scenario(env: Env) -> None:
            env.tgt_flag.touch()
            await env.start("j", sync="full", **{"on-target-error": "stop", "max-workers": 4,
                                                 "max-chunk": 4 * CS})
            info = await env.wait_status("j", "paused")
            assert info.get("error"), info
            await asyncio.sleep(0.2)
            await env.drain_events()
            statuses = [e["status"] for e in env.named("JOB_STATUS_CHANGE")]
            assert statuses.count("paused") == 1, statuses
            await env.qmp("job-cancel", {"id": "j"})
            info = await env.wait_status("j", "concluded")
            assert "error" in info and info["current-progress"] < SIZE, info
            await env.drain_events()
            assert len(env.named("BLOCK_JOB_CANCELLED")) == 1, env.events
            assert not env.named("BLOCK_JOB_COMPLETED"), env.events
            env.tgt_flag.unlink()
            assert await env.live_write(b"\xe5" * CS, 20 * CS) is None
            assert await env.read(env.snap_uri("j")) == env.original
            await env.qmp("job-dismiss", {"id": "j"})
            r = await env.read(env.snap_uri("j"), 0, 512)
            assert isinstance(r, OSError), "the snapshot export outlived its job"
            await env.check_live()
        run(env, scenario)


# -- the scratch (docs/scratch.md) ---------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode,limit", [("break-guest-write", False), ("break-snapshot", False),
                                        ("break-guest-write", True), ("break-snapshot", True)])
def test_scratch_faults_and_limit(mode, limit, short_tmp):
    """An incremental job (dirty set: cluster 5) whose scratch is an nbdkit
    export with the error filter: a live write outside the set needs a
    copy into the scratch; a failing scratch write -- or ``scratch-limit``
    reached (ENOSPC) -- is a copy-before-write error and the job's
    ``on-cbw-error`` policy applies.  The target never receives anything
    outside the set."""
    scr_flag = short_tmp / "scr.flag"
    with environment(short_tmp) as env, \
            peers.nbdkit("memory", str(SIZE), "error-pwrite-rate=1", "error-pwrite=EIO",
                         f"error-pwrite-file={scr_flag}", filters=["error"]) as scr:
        async def scenario(env: Env) -> None:
            await env.qmp("block-dirty-bitmap-add", {"export": "disk", "name": "b"})
            assert await env.live_write(b"\x91" * 100, 5 * CS) is None
            orig5 = bytes(env.model[5 * CS:6 * CS])
            snapshot_before = bytes(env.model)
            kw = {"scratch-limit": CS} if limit else {}
            await env.start("j", sync="incremental", bitmap="b", speed=1, scratch=scr.uri,
                            **{"on-cbw-error": mode}, **kw)
            assert await env.live_write(b"\x92" * 4096, 20 * CS) is None  # healthy: into the scratch
            info = await env.job("j")
            assert info["scratch-bytes"] == CS and info["bytes-cbw-to-scratch"] == CS, info
            if not limit:
                scr_flag.touch()
            e = await env.live_write(b"\x93" * 4096, 30 * CS)
            snap_uri = env.snap_uri("j")
            if mode == "break-guest-write":
                assert isinstance(e, OSError) and e.errno == errno.EIO, e
                assert await env.read(env.live_uri, 30 * CS, CS) == env.orig(30)
                info = await env.job("j")
                assert info["status"] == "running" and not info["snapshot-broken"], info
                assert await env.read(snap_uri) == snapshot_before
                scr_flag.unlink(missing_ok=True)
                await env.qmp("job-set-speed", {"id": "j", "speed": 0})
                info = await env.wait_status("j", "concluded")
                assert "error" not in info, info
            else:
                assert e is None
                info = await env.wait_status("j", "concluded")
                assert "error" in info and info["snapshot-broken"], info
                r = await env.read(snap_uri, 0, CS)
                assert isinstance(r, OSError) and r.errno == errno.EIO, r
                scr_flag.unlink(missing_ok=True)
            await env.qmp("job-dismiss", {"id": "j"})
            tc = env.target_clusters()
            if mode == "break-guest-write":
                assert tc[5] == orig5
            for c in range(NCL):  # nothing outside the set reached the target
                if c != 5:
                    assert tc[c] == bytes([FILL]) * CS, c
            await env.check_live()
        run(env, scenario)
