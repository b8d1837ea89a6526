"""The control CLI (``nbdbackup backup|job|bitmap|export``) run as a subprocess
against an in-test QMPServer with fake engine handlers.

The fake engine records the arguments each handler received, so these tests
check the CLI -> QMP mapping exactly; the real handlers have their own tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sys
from pathlib import Path

import pytest

from nbdbackup.control.qmp import CommandError, QMPServer

pytestmark = pytest.mark.timeout(90)

REPO = str(Path(__file__).resolve().parents[2])


class FakeEngine:
    """Jobs that run for a few steps and emit QEMU's events (unless ``events`` is False)."""

    def __init__(self, server: QMPServer):
        self.server = server
        self.jobs: dict[str, dict] = {}
        self.calls: list[tuple[str, dict]] = []
        self.events = True
        self.tasks: list[asyncio.Task] = []
        self.bitmaps = [{"name": "b0", "granularity": 65536, "count": 1 << 20, "recording": True,
                         "persistent": False}]
        self.exports = [{"name": "vda", "spec": "/images/vda.raw", "read-only": False, "size": 1 << 30}]
        for name in ("job-pause", "job-resume", "job-cancel", "job-dismiss", "job-set-speed",
                     "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
                     "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
                     "block-export-add", "block-export-del"):
            server.register(name, self._recorder(name))
        server.register("backup-start", self.backup_start)
        server.register("query-jobs", self.query_jobs)
        server.register("query-bitmaps", self.query_bitmaps)
        server.register("query-block-exports", self.query_exports)

    def _recorder(self, name):
        async def handler(**kw):
            self.calls.append((name, kw))
            if kw.get("id") == "nope" or kw.get("name") == "nope":
                raise CommandError("DeviceNotActive", "'nope' not found")
            if name == "job-dismiss":
                self.jobs.pop(kw["id"], None)
        return handler

    async def query_jobs(self):
        return [dict(j) for j in self.jobs.values()]

    async def query_bitmaps(self, *, export):
        self.calls.append(("query-bitmaps", {"export": export}))
        return self.bitmaps

    async def query_exports(self):
        return self.exports

    def emit(self, event, data):
        if self.events:
            self.server.emit(event, data)

    async def backup_start(self, **kw):
        self.calls.append(("backup-start", kw))
        jid = kw["job_id"]
        self.jobs[jid] = {"id": jid, "type": "backup", "status": "running",
                          "current-progress": 0, "total-progress": 4 << 20}
        self.emit("JOB_STATUS_CHANGE", {"id": jid, "status": "running"})
        self.tasks.append(asyncio.create_task(self._run(jid, kw["target"], kw.get("auto_dismiss", False))))

    async def _run(self, jid, target, auto_dismiss):
        job = self.jobs[jid]
        # "stuck": a job that does not end while a test waits for it (cancelled at the end).
        steps = {"slow": 12, "stuck": 6000}.get(target, 2)
        for i in range(steps):
            await asyncio.sleep(0.1)
            job["current-progress"] = (i + 1) * job["total-progress"] // steps
        info = {"device": jid, "id": jid, "type": "backup", "len": job["total-progress"],
                "offset": job["current-progress"], "speed": 0}
        if target == "fail":
            job["error"] = "Input/output error"
            info["error"] = "Input/output error"
        self.emit("BLOCK_JOB_COMPLETED", info)
        job["status"] = "concluded"
        self.emit("JOB_STATUS_CHANGE", {"id": jid, "status": "concluded"})
        if auto_dismiss:
            del self.jobs[jid]
            self.emit("JOB_STATUS_CHANGE", {"id": jid, "status": "null"})


async def cli(*argv, env=None, stdin=None):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nbdbackup.cli", *argv, cwd=REPO, env=env or os.environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


def with_server(short_tmp, body):
    async def main():
        server = QMPServer()
        engine = FakeEngine(server)
        path = str(short_tmp / "ctl.sock")
        await server.start(path)
        try:
            await body(engine, path)
        finally:
            for t in engine.tasks:
                t.cancel()
            await server.close()

    asyncio.run(asyncio.wait_for(main(), 80))


def test_job_commands(short_tmp):
    async def body(engine, path):
        engine.jobs["j1"] = {"id": "j1", "type": "backup", "status": "running",
                             "current-progress": 1 << 20, "total-progress": 4 << 20}
        rc, out, err = await cli("job", "list", "--control", path, "--json")
        assert (rc, err) == (0, "")
        assert json.loads(out) == [engine.jobs["j1"]]
        # The socket from the environment; a human table.
        rc, out, err = await cli("job", "list", env=dict(os.environ, NBDBACKUP_CONTROL=path))
        assert rc == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["ID", "TYPE", "STATUS", "PROGRESS", "ERROR"]
        assert lines[1].split()[:4] == ["j1", "backup", "running", "25%"]
        rc, out, err = await cli("job", "pause", "j1", "--control", path)
        assert (rc, out.strip()) == (0, "job j1: paused")
        rc, out, err = await cli("job", "set-speed", "j1", "64M", "--control", path, "--json")
        assert rc == 0 and json.loads(out) == {}
        rc, out, err = await cli("job", "pause", "nope", "--control", path)
        assert rc == 1
        assert err.strip() == "nbdbackup: error: 'nope' not found"
        for action in ("resume", "cancel", "dismiss"):
            rc, out, err = await cli("job", action, "j1", "--control", path)
            assert rc == 0, err
        assert engine.calls == [("job-pause", {"id": "j1"}), ("job-set-speed", {"id": "j1", "speed": 64 << 20}),
                                ("job-pause", {"id": "nope"}), ("job-resume", {"id": "j1"}),
                                ("job-cancel", {"id": "j1"}), ("job-dismiss", {"id": "j1"})]

    with_server(short_tmp, body)


def test_backup_start_maps_every_option(short_tmp):
    async def body(engine, path):
        rc, out, err = await cli(
            "backup", "start", "--control", path, "--export", "vda", "--job-id", "b1", "--sync", "incremental",
            "--target", "/backups/vda.raw", "--snapshot", "vda-snap", "--speed", "1M", "--cluster-size", "64K",
            "--compress", "--max-workers", "8", "--max-chunk", "4M", "--on-source-error", "stop",
            "--on-target-error", "enospc", "--on-cbw-error", "break-snapshot", "--cbw-timeout", "30",
            "--no-auto-dismiss", "--bitmap", "b0", "--bitmap-mode", "never", "--scratch", "/var/tmp/s.raw",
            "--scratch-limit", "2G", "--discard-source", "--snapshot-trim")
        assert (rc, err) == (0, ""), err
        assert out.strip() == "job b1: started"
        assert engine.calls[0] == ("backup-start", {
            "export": "vda", "job_id": "b1", "sync": "incremental", "target": "/backups/vda.raw",
            "snapshot": "vda-snap", "speed": 1 << 20, "cluster_size": 65536, "compress": True, "max_workers": 8,
            "max_chunk": 4 << 20, "on_source_error": "stop", "on_target_error": "enospc",
            "on_cbw_error": "break-snapshot", "cbw_timeout": 30, "auto_dismiss": False, "bitmap": "b0",
            "bitmap_mode": "never", "scratch": "/var/tmp/s.raw", "scratch_limit": 2 << 30, "discard_source": True,
            "snapshot_trim": True})
        # Minimal form: nothing optional is sent.
        rc, out, err = await cli("backup", "start", "--control", path, "-e", "vda", "-j", "b2", "--sync", "full",
                                 "-t", "memory:1G")
        assert rc == 0, err
        assert engine.calls[1] == ("backup-start", {"export": "vda", "job_id": "b2", "sync": "full",
                                                    "target": "memory:1G"})
        # Refused at the edge, before any round trip.
        rc, out, err = await cli("backup", "start", "--control", path, "-e", "vda", "-j", "b3",
                                 "--sync", "incremental", "-t", "x")
        assert rc == 1 and "--sync incremental needs --bitmap" in err
        rc, out, err = await cli("backup", "start", "--control", path, "-e", "vda", "-j", "b3",
                                 "--sync", "full", "-t", "x", "--speed", "12Q")
        assert rc == 2 and "bad size" in err
        assert len(engine.calls) == 2

    with_server(short_tmp, body)


def test_job_wait_outcomes(short_tmp):
    async def body(engine, path):
        async def start(jid, target, *extra):
            rc, out, err = await cli("backup", "start", "--control", path, "-e", "vda", "-j", jid,
                                     "--sync", "full", "-t", target, *extra)
            assert rc == 0, err

        # Success, followed through events.
        await start("ok", "/t")
        rc, out, err = await cli("job", "wait", "ok", "--control", path)
        assert (rc, out.strip(), err) == (0, "job ok: completed", "")
        # Failure: exit 1 with the job's error; --json still prints the final state.
        await start("bad", "fail")
        rc, out, err = await cli("job", "wait", "bad", "--control", path, "--json")
        assert rc == 1
        assert json.loads(out)["error"] == "Input/output error"
        assert err.strip() == "nbdbackup: error: job bad failed: Input/output error"
        # --dismiss removes the concluded job.
        rc, out, err = await cli("job", "wait", "ok", "--dismiss", "--control", path)
        assert rc == 0 and "ok" not in engine.jobs
        # No such job.
        rc, out, err = await cli("job", "wait", "ghost", "--control", path)
        assert rc == 1 and "job 'ghost' not found" in err
        # No events at all: polling alone finds the outcome.
        engine.events = False
        await start("quiet", "fail")
        rc, out, err = await cli("job", "wait", "quiet", "--control", path, "--poll", "0.1")
        assert rc == 1 and "job quiet failed: Input/output error" in err
        # Timeout.
        engine.events = True
        await start("long", "stuck")  # ("slow" ended before a CLI started under load could time out)
        rc, out, err = await cli("job", "wait", "long", "--control", path, "--timeout", "0.3")
        assert rc == 1 and "timed out waiting for job long" in err

    with_server(short_tmp, body)


def test_backup_start_wait_with_auto_dismiss(short_tmp):
    """The job vanishes on conclusion: the completion event alone tells the outcome."""
    async def body(engine, path):
        rc, out, err = await cli("backup", "start", "--control", path, "-e", "vda", "-j", "a1", "--sync", "full",
                                 "-t", "/t", "--auto-dismiss", "--wait")
        assert rc == 0, err
        assert out.splitlines() == ["job a1: started", "job a1: completed"]
        assert "a1" not in engine.jobs
        rc, out, err = await cli("backup", "start", "--control", path, "-e", "vda", "-j", "a2", "--sync", "full",
                                 "-t", "fail", "--auto-dismiss", "--wait")
        assert rc == 1 and "job a2 failed: Input/output error" in err

    with_server(short_tmp, body)


def test_job_wait_progress_bar_on_a_tty(short_tmp):
    async def body(engine, path):
        rc, out, err = await cli("backup", "start", "--control", path, "-e", "vda", "-j", "p1", "--sync", "full",
                                 "-t", "slow")
        assert rc == 0, err
        master, slave = pty.openpty()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nbdbackup.cli", "job", "wait", "p1", "--control", path, cwd=REPO,
                stdout=asyncio.subprocess.PIPE, stderr=slave, stdin=asyncio.subprocess.DEVNULL)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            os.close(slave)
            slave = -1
            tty = b""
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                tty += chunk
        finally:
            if slave >= 0:
                os.close(slave)
            os.close(master)
        assert proc.returncode == 0
        assert out.decode().strip() == "job p1: completed"
        text = tty.decode()
        assert text.count("\r") >= 2, text  # redrawn in place
        assert "p1: running" in text and "100.0%" in text and "4 MiB / 4 MiB" in text
        assert text.endswith("\r\n") or text.endswith("\n")

    with_server(short_tmp, body)


def test_bitmap_and_export_commands(short_tmp):
    async def body(engine, path):
        ok = [
            (["bitmap", "add", "vda", "b1", "--granularity", "64K", "--persistent"],
             ("block-dirty-bitmap-add", {"export": "vda", "name": "b1", "granularity": 65536, "persistent": True})),
            (["bitmap", "add", "vda", "b2", "--disabled", "--no-persistent"],
             ("block-dirty-bitmap-add", {"export": "vda", "name": "b2", "persistent": False, "disabled": True})),
            (["bitmap", "remove", "vda", "b1"], ("block-dirty-bitmap-remove", {"export": "vda", "name": "b1"})),
            (["bitmap", "clear", "vda", "b1"], ("block-dirty-bitmap-clear", {"export": "vda", "name": "b1"})),
            (["bitmap", "enable", "vda", "b1"], ("block-dirty-bitmap-enable", {"export": "vda", "name": "b1"})),
            (["bitmap", "disable", "vda", "b1"], ("block-dirty-bitmap-disable", {"export": "vda", "name": "b1"})),
            (["bitmap", "merge", "vda", "t", "a", "b"],
             ("block-dirty-bitmap-merge", {"export": "vda", "target": "t", "bitmaps": ["a", "b"]})),
            (["export", "add", "snap", "memory:1M", "--read-only"],
             ("block-export-add", {"name": "snap", "spec": "memory:1M", "read_only": True})),
            (["export", "add", "disk", "/x.raw"], ("block-export-add", {"name": "disk", "spec": "/x.raw"})),
            (["export", "del", "snap"], ("block-export-del", {"name": "snap"})),
        ]
        for argv, call in ok:
            engine.calls.clear()
            rc, out, err = await cli(*argv, "--control", path)
            assert (rc, err) == (0, ""), (argv, err)
            assert engine.calls == [call], argv
        rc, out, err = await cli("bitmap", "list", "vda", "--control", path, "--json")
        assert rc == 0 and json.loads(out) == engine.bitmaps
        rc, out, err = await cli("bitmap", "list", "vda", "--control", path)
        assert rc == 0 and out.splitlines()[1].split()[:3] == ["b0", "64", "KiB"]
        rc, out, err = await cli("export", "list", "--control", path, "--json")
        assert rc == 0 and json.loads(out) == engine.exports
        rc, out, err = await cli("export", "list", "--control", path)
        assert rc == 0 and "/images/vda.raw" in out and "1 GiB" in out
        rc, out, err = await cli("export", "del", "nope", "--control", path)
        assert rc == 1 and err.strip() == "nbdbackup: error: 'nope' not found"

    with_server(short_tmp, body)


def test_cli_without_a_server(short_tmp):
    async def main():
        missing = str(short_tmp / "missing.sock")
        rc, out, err = await cli("job", "list", "--control", missing)
        assert rc == 1 and "no such file" in err and "Traceback" not in err
        env = {k: v for k, v in os.environ.items() if k != "NBDBACKUP_CONTROL"}
        rc, out, err = await cli("export", "list", env=env)
        assert rc == 1 and "give --control PATH or set NBDBACKUP_CONTROL" in err

    asyncio.run(main())


@pytest.mark.interop
def test_job_commands_against_qemu_storage_daemon(short_tmp, make_image):
    """The job commands speak QEMU's QMP: drive real QEMU backup jobs with them."""
    import subprocess

    import peers

    src, dst = short_tmp / "src.raw", short_tmp / "dst.raw"
    make_image(src, 4 << 20, [(0x5A, 0, 4 << 20)])
    make_image(dst, 4 << 20)

    def nb(*argv):
        r = subprocess.run([sys.executable, "-m", "nbdbackup.cli", *argv, "--control", qsd.qmp_socket],
                           cwd=REPO, capture_output=True, text=True, errors="replace", timeout=60)
        return r.returncode, r.stdout, r.stderr

    args = ["--blockdev", f"driver=file,filename={src},node-name=src",
            "--blockdev", f"driver=file,filename={dst},node-name=dst"]
    with peers.qemu_storage_daemon(args) as qsd:
        qsd.qmp("blockdev-backup", **{"job-id": "j1", "device": "src", "target": "dst", "sync": "full",
                                      "speed": 1 << 20, "auto-dismiss": False})
        rc, out, err = nb("job", "list", "--json")
        assert rc == 0, err
        [job] = json.loads(out)
        assert (job["id"], job["type"], job["status"]) == ("j1", "backup", "running")
        assert nb("job", "pause", "j1")[0] == 0
        assert json.loads(nb("job", "list", "--json")[1])[0]["status"] in ("paused", "standby")
        assert nb("job", "resume", "j1")[0] == 0
        qsd.qmp("block-job-set-speed", device="j1", speed=0)
        rc, out, err = nb("job", "wait", "j1", "--dismiss")
        assert (rc, out.strip()) == (0, "job j1: completed"), err
        assert json.loads(nb("job", "list", "--json")[1]) == []
        assert dst.read_bytes() == src.read_bytes()
        # A cancelled job: wait exits 1 with QEMU's error.
        qsd.qmp("blockdev-backup", **{"job-id": "j2", "device": "src", "target": "dst", "sync": "full",
                                      "speed": 1 << 20, "auto-dismiss": False})
        assert nb("job", "cancel", "j2")[0] == 0
        rc, out, err = nb("job", "wait", "j2", "--json")
        assert rc == 1 and json.loads(out)["status"] == "concluded"
        assert "job j2 failed: Operation canceled" in err
        rc, out, err = nb("job", "pause", "nope")
        assert rc == 1 and err.startswith("nbdbackup: error: ") and "Traceback" not in err
