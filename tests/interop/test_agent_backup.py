"""Interop: ``nbdbackup agent backup`` against our server, over TCP + TLS on 127.0.0.1.

The server: ``nbdbackup serve`` with file exports, persistent bitmaps
(``--state-dir``), NBD on TCP with TLS (``--tls on``: the agent speaks
``nbds://``; the test's writer and reference copies use the plain Unix
socket) and remote control (``--control-listen`` with client-certificate
authz).  A guest-like writer (`agent_writer.py`, libnbd in its own process)
changes the disks between runs.  Every recorded snapshot is restored through
nbdkit + plugins/restore.py and ``qemu-img compare``d with a copy of the disk
taken at its point in time: with the writer stopped (``qemu-img convert`` of
the live export), or, while the writer keeps writing, from the snapshot
export itself while the agent is held mid-pull.

A small TCP proxy in the test (`Proxy`) sits between the agent and the NBD
port: it can hold the server's bytes after a budget (the agent stalls
mid-pull, deterministically) and cut every connection.

- five runs (1 full + 4 incremental), each restoring exactly, each reading
  exactly the dirty clusters (the writer's log, the agent's count and the
  server's own ``rd_bytes`` agree);
- faults, each followed by a run that must succeed incrementally and restore
  exactly: kill -9 of the agent mid-pull (leftover job reclaimed, bitmaps
  merged), the server restarted mid-pull (persistent bitmaps), the NBD
  connection cut, the repository refusing writes (``chattr +i`` on its chunk
  directories, then on its snapshot directory): no snapshot recorded by a
  failed run;
- two disks in one transaction while a lockstep writer runs: one instant
  (same group and instant in the metadata, contents consistent);
- a client certificate the control socket's authz does not admit: exit 1 and
  the server's reason;
- two servers from one ``--config``; partial (3) and usage (2) exit codes;
- an ``s3://`` repository on the session's Ceph RGW: full, incremental, and a
  bucket policy denying PutObject on the chunks failing a run (nothing
  recorded, the next run exact);
- a repokey-encrypted repository (``--passphrase-file``), restored exactly;
- adaptive compression (``repo init``'s default ``zstd``): the full backup's new
  chunks are zstd level-3 frames, the incrementals' level-1 frames (checked in
  the stored objects), and every snapshot restores exactly (plugin and
  ``nbdbackup restore``) and passes ``repo verify``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from nbdbackup.agent.repo import ProbeGate

import certs
import peers

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
M = 1 << 20
SIZE = 32 * M
CLUSTER = 64 * 1024
CHUNK = 1 * M

pytestmark = pytest.mark.timeout(300)


# -- a TCP proxy the test controls -------------------------------------------------


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``.  ``limit``: server->client
    bytes (over all connections) forwarded before it holds the rest (None =
    unlimited); ``stalled`` is set while it holds bytes; `cut` aborts every
    connection.  Its asyncio loop runs in a thread of the test process."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = peers.free_tcp_port()
        self.limit: int | None = None
        self.forwarded = 0
        self.stalled = threading.Event()
        self._writers: set = set()
        self._ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start():
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self._ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    async def _handle(self, cr, cw) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cw.transport.abort()
            return
        self._writers |= {cw, uw}

        async def up():
            while data := await cr.read(65536):
                uw.write(data)
                await uw.drain()
            uw.write_eof()

        held: asyncio.Queue = asyncio.Queue()

        async def down_read():
            while data := await ur.read(65536):
                held.put_nowait(data)
            if self.limit is not None:
                cw.transport.abort()  # the server closed while we hold bytes: drop them, close at once
            held.put_nowait(None)

        async def down():
            while (data := await held.get()) is not None:
                while data:
                    room = len(data) if self.limit is None else self.limit - self.forwarded
                    if room <= 0:
                        self.stalled.set()
                        await asyncio.sleep(0.01)
                        continue
                    part, data = data[:room], data[room:]
                    self.forwarded += len(part)
                    cw.write(part)
                    await cw.drain()
            cw.close()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down()), asyncio.ensure_future(down_read())]
        try:
            # Until the server side is done (or either side fails).
            await asyncio.wait(tasks[1:], return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()
            for w in (cw, uw):
                w.transport.abort()
                self._writers.discard(w)

    def hold_after(self, nbytes: int) -> None:
        self.stalled.clear()
        self.limit = self.forwarded + nbytes

    def release(self) -> None:
        self.limit = None

    def cut(self) -> None:
        def abort_all():
            for w in list(self._writers):
                w.transport.abort()

        self.loop.call_soon_threadsafe(abort_all)

    def close(self) -> None:
        self.release()
        self.cut()
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- the rig: server, repository, agent runs, references ----------------------------


class Rig:
    def __init__(self, tmp: Path, pki: dict, agent_creds: str, disks: tuple[str, ...] = ("disk",),
                 passphrase: str | None = None) -> None:
        self.tmp, self.pki, self.creds = tmp, pki, agent_creds
        self.disks = {d: tmp / f"{d}.img" for d in disks}
        for p in self.disks.values():
            with open(p, "wb") as f:
                f.truncate(SIZE)
        self.state = tmp / "state"
        self.state.mkdir()
        self.repo = tmp / "repo"
        #: Encrypted repository: the passphrase, and the agent's options naming its file.
        self.passphrase = passphrase
        self.repo_opts: list[str] = []
        init = []
        if passphrase is not None:
            (tmp / "pass").write_text(passphrase + "\n")
            self.repo_opts = ["--passphrase-file", str(tmp / "pass")]
            init = ["--encryption", "repokey", *self.repo_opts]
        peers.nbdbackup_cli("repo", "init", str(self.repo), "--chunk-size", str(CHUNK), *init)
        self.nbd_port = peers.free_tcp_port()
        self.ctl_port = peers.free_tcp_port()
        self.ctl = str(tmp / "ctl.sock")
        self.proxy: Proxy | None = None
        self.peer = None
        self.refs: dict[str, Path] = {}

    @contextlib.contextmanager
    def serve(self):
        extra = ["--listen", f"127.0.0.1:{self.nbd_port}", "--tls-creds", self.pki["server"], "--tls", "on",
                 "--control", self.ctl, "--state-dir", str(self.state),
                 "--control-listen", f"127.0.0.1:{self.ctl_port}", "--control-tls-creds", self.pki["server"],
                 "--control-authz", "CN=backup-agent-*"]
        with peers.nbdbackup_serve(*(f"{d}={p}" for d, p in self.disks.items()), extra=extra) as p:
            peers.wait_for_tcp(self.ctl_port, p.alive, p.log)
            peers.wait_for_tcp(self.nbd_port, p.alive, p.log)
            self.peer = p
            yield p

    def agent_argv(self, *extra: str, creds: str | None = None, via_proxy: bool = False,
                   disks: tuple[str, ...] | None = None) -> list[str]:
        creds = creds or self.creds
        port = self.proxy.port if via_proxy else self.nbd_port
        argv = [sys.executable, "-m", "nbdbackup.cli", "agent", "backup",
                "--control", f"qmps://127.0.0.1:{self.ctl_port}", "--control-tls-creds", creds,
                "--nbd", f"nbds://127.0.0.1:{port}/?tls-certificates={creds}",
                "--repo", str(self.repo), "--connections", "2", "--json", "--io-timeout", "30", *self.repo_opts]
        for d in disks or tuple(self.disks):
            argv += ["--disk", d]
        return argv + list(extra)

    def agent(self, *extra: str, ok: bool = True, **kw) -> tuple[int, dict | None, str]:
        r = subprocess.run(self.agent_argv(*extra, **kw), cwd=ROOT, capture_output=True, timeout=120)
        out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        report = json.loads(out) if out.strip() else None
        if ok:
            assert r.returncode == 0, (out, err)
        return r.returncode, report, err

    def spawn_agent(self, *extra: str, preexec=None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.agent_argv(*extra, **kw), cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=preexec)

    def burst(self, seed: int, count: int = 12, disk: str = "disk", text: bool = False) -> set[int]:
        """Random clusters written with random data (``text``: compressible lines)."""
        r = subprocess.run([sys.executable, str(HERE / "agent_writer.py"), "burst", self.peer.uri_for(disk),
                            str(seed), str(count), str(CLUSTER), *(["text"] if text else [])],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        return set(json.loads(r.stdout))

    def copy(self, export: str, out: Path) -> None:
        r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", self.peer.uri_for(export), str(out)],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode(errors="replace")

    def reference(self, snap: str, disk: str = "disk") -> None:
        """The disk now (the writer is stopped) is what snapshot ``snap`` must hold."""
        ref = self.tmp / f"ref-{len(self.refs)}-{snap}.raw"
        self.copy(disk, ref)
        self.refs[snap] = ref

    def restores_exactly(self, snap: str) -> None:
        out = self.tmp / f"restored-{snap}.raw"
        r = peers.restore_snapshot(self.repo, snap, out)
        assert r.returncode == 0, r.stderr
        c = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(self.refs[snap]), str(out)],
                           capture_output=True, timeout=60)
        assert c.returncode == 0, (snap, c.stdout.decode(errors="replace"))
        out.unlink()

    def _open_repo(self):
        from nbdbackup.agent.repo import Repository, open_store

        pw = self.passphrase
        return Repository.open(open_store(str(self.repo)), passphrase=None if pw is None else (lambda: pw))

    def snapshots(self) -> list[str]:
        return sorted(self._open_repo().snapshots())

    def info(self, snap: str) -> dict:
        return self._open_repo().snapshot_info(snap)

    def qmp(self, cmd: str, args: dict | None = None):
        from nbdbackup.control.client import ControlClient

        async def go():
            async with ControlClient(self.ctl) as c:
                return await c.execute(cmd, args)

        return asyncio.run(asyncio.wait_for(go(), 30))

    def ours(self, disk: str = "disk") -> list[dict]:
        return [b for b in self.qmp("query-bitmaps", {"export": disk}) if b["name"].startswith("nbdbackup-agent.")]

    def our_jobs(self) -> list[dict]:
        return [j for j in self.qmp("query-jobs") if j["id"].startswith("nbdbackup-agent.")]


@pytest.fixture(scope="module")
def agent_creds(pki):
    base = Path(peers.short_tempdir("nbdagent-"))
    dirs = {"agent": certs.make_client(pki["server"], base / "agent", "backup-agent-1"),
            "stranger": certs.make_client(pki["server"], base / "stranger", "intruder")}
    yield dirs
    import shutil

    shutil.rmtree(base, ignore_errors=True)


def disk_report(report: dict, disk: str = "disk") -> dict:
    (d,) = [x for x in report["disks"] if x["disk"] == disk]
    return d


def check_ok_run(rig: Rig, report: dict, kind: str, dirty: set[int] | None = None, *,
                 others_read: bool = False, read: str = "whole") -> str:
    """One disk's successful run: restores exactly; an incremental reads the chunks the dirty
    clusters touch, whole (``read="whole"``, the default), or exactly the dirty clusters
    (``--read dirty``) (``others_read``: the test also read the snapshot export, so the
    server's count is larger)."""
    d = disk_report(report)
    assert d["status"] == "ok" and d["kind"] == kind, d
    snap = d["snapshot"]
    assert d["verify"]["ok"] and d["verify"]["mode"] == "full", d
    if others_read:
        assert d["server_bytes_read"] > d["bytes_read"], d
    else:
        assert d["server_bytes_read"] == d["bytes_read"], d  # the server counted what the agent says it read
    if kind == "incremental" and read == "dirty":
        # Dirty and data: a dirty cluster's holes (a 4 KiB write into a hole) are zeroes, not read.
        assert d["bytes_read"] == d["dirty_bytes"] if dirty is not None else d["bytes_read"] <= d["dirty_bytes"], d
    elif kind == "incremental":
        # The data of every chunk a dirty cluster touches, those chunks only.
        assert d["bytes_read"] <= d["chunks_worked"] * CHUNK, d
        if dirty is not None:
            assert d["chunks_worked"] == len({c * CLUSTER // CHUNK for c in dirty}), (d, sorted(dirty))
            assert d["bytes_read"] >= d["dirty_bytes"], d  # (the bursts write whole clusters of data)
    if kind == "incremental":
        if dirty is not None:
            assert d["dirty_bytes"] == len(dirty) * CLUSTER, (d, sorted(dirty))
        assert rig.info(snap)["meta"]["base"] == d["base"] == rig.info(snap)["parent"]
    assert rig.info(snap)["meta"]["bitmap"] == d["bitmap"]
    # Steady state on the server: exactly one bitmap of ours, recording, named for this snapshot; no job.
    assert [(b["name"], b["recording"]) for b in rig.ours()] == [(d["bitmap"], True)]
    assert rig.our_jobs() == []
    rig.restores_exactly(snap)
    return snap


def test_five_runs_full_then_incremental(pki, agent_creds, short_tmp):
    rig = Rig(short_tmp, pki, agent_creds["agent"])
    with rig.serve():
        rig.burst(seed=1, count=40)
        rig.proxy = Proxy(rig.nbd_port)
        try:
            rig.reference("pending")
            _, rep, err = rig.agent("--progress", "always")
            assert "disk: " in err and "(100%)" in err, err  # progress lines on stderr
            d = disk_report(rep)
            assert d["kind"] == "full" and "no bitmap of ours" in d["reason"], d
            rig.refs[d["snapshot"]] = rig.refs.pop("pending")
            check_ok_run(rig, rep, "full")
            assert d["bytes_read"] <= 40 * CLUSTER  # only allocated data
            for rnd in range(2, 6):
                if rnd == 5:
                    # The writer keeps writing while the agent pulls; the reference is
                    # copied from the snapshot export while the agent is held mid-pull.
                    w = subprocess.Popen([sys.executable, str(HERE / "agent_writer.py"), "loop",
                                          rig.peer.uri_for("disk"), "7", str(CLUSTER)], stdout=subprocess.PIPE)
                    try:
                        assert w.stdout.readline().strip() == b"ready"
                        time.sleep(0.3)
                        rig.proxy.hold_after(64 * 1024)
                        a = rig.spawn_agent(via_proxy=True)
                        assert rig.proxy.stalled.wait(30), "the agent never pulled"
                        (exp,) = [e["name"] for e in rig.qmp("query-block-exports")
                                  if e["name"].startswith("nbdbackup-agent.")]
                        ref = short_tmp / "ref-live.raw"
                        rig.copy(exp, ref)
                        rig.proxy.release()
                        out, err = a.communicate(timeout=120)
                        assert a.returncode == 0, err.decode(errors="replace")
                    finally:
                        w.kill()
                        w.wait()
                    rep = json.loads(out)
                    rig.refs[disk_report(rep)["snapshot"]] = ref
                    snap = check_ok_run(rig, rep, "incremental", others_read=True)
                    assert disk_report(rep)["dirty_bytes"] > 0
                    continue
                dirty = rig.burst(seed=rnd, count=6 * rnd)
                rig.reference("pending")
                read = "dirty" if rnd % 2 else "whole"  # both ways of reading a touched chunk
                _, rep, _ = rig.agent("--read", read)
                rig.refs[disk_report(rep)["snapshot"]] = rig.refs.pop("pending")
                snap = check_ok_run(rig, rep, "incremental", dirty, read=read)
        finally:
            rig.proxy.close()
        snaps = rig.snapshots()
        assert len(snaps) == 5
        # Every snapshot still restores (incremental forever: none depends on another's chunks being rewritten).
        for s in snaps:
            rig.restores_exactly(s)
        # Retention after a successful run: keep the last 2, then gc.
        rig.burst(seed=99, count=3)
        rig.reference("pending")
        _, rep, _ = rig.agent("--keep-last", "2")
        newest = disk_report(rep)["snapshot"]
        rig.refs[newest] = rig.refs.pop("pending")
        assert len(rep["retention"]["removed"]) == 4 and rep["retention"]["gc"]["removed"] > 0, rep["retention"]
        assert rig.snapshots() == sorted([snap, newest])
        for s in rig.snapshots():
            rig.restores_exactly(s)


def wait_stalled(rig: Rig, a: subprocess.Popen) -> None:
    for _ in range(3000):
        if rig.proxy.stalled.is_set():
            # Held mid-pull: the transaction ran, the snapshot export exists.
            assert [j["id"] for j in rig.our_jobs()], "stalled before the transaction?"
            return
        assert a.poll() is None, a.communicate()
        time.sleep(0.01)
    raise AssertionError("the agent never stalled")


def chattr_works(d: Path) -> bool:
    """Whether ``chattr +i`` works here (it needs CAP_LINUX_IMMUTABLE and a file system with flags)."""
    probe = d / "chattr-probe"
    probe.mkdir()
    try:
        r = subprocess.run(["chattr", "+i", str(probe)], capture_output=True)
        if r.returncode == 0:
            subprocess.run(["chattr", "-i", str(probe)], check=True)
        return r.returncode == 0
    finally:
        probe.rmdir()


def no_big_files() -> None:
    """In the agent's process: no file may grow past 4 KiB (write() then fails with EFBIG;
    SIGXFSZ ignored, so it is an error, not a kill)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def failed_run(rig: Rig, a: subprocess.Popen, before: list[str]) -> dict | None:
    out, err = a.communicate(timeout=120)
    assert a.returncode not in (0, 3), (out, err)
    assert rig.snapshots() == before, "a failed run recorded a snapshot"
    rep = json.loads(out) if out.strip() else None
    assert rep is None or rep["exit_code"] == a.returncode, (rep, a.returncode)
    return rep


def interrupted_run(rig: Rig, seed: int, interrupt) -> tuple[set[int], dict | None, float]:
    """A burst of writes, then an agent run held mid-pull (after its transaction) and
    ``interrupt(agent)``: the run must fail and record nothing.  Returns the clusters the
    burst wrote, the run's report, and the seconds from the interruption to the agent's exit."""
    pending = rig.burst(seed=seed, count=20)
    before = rig.snapshots()
    rig.proxy.hold_after(128 * 1024)
    a = rig.spawn_agent(via_proxy=True)
    wait_stalled(rig, a)
    t = time.monotonic()
    interrupt(a)
    rep = failed_run(rig, a, before)
    took = time.monotonic() - t
    rig.proxy.release()
    return pending, rep, took


def test_faults_leave_a_correct_next_backup(pki, agent_creds, short_tmp):
    rig = Rig(short_tmp, pki, agent_creds["agent"])
    rig.proxy = None
    try:
        with rig.serve():
            rig.proxy = Proxy(rig.nbd_port)
            rig.burst(seed=1, count=40)
            rig.reference("pending")
            _, rep, _ = rig.agent()
            rig.refs[disk_report(rep)["snapshot"]] = rig.refs.pop("pending")
            check_ok_run(rig, rep, "full")
            pending: set[int] = set()

            def next_ok(note: str | None, seed: int) -> None:
                nonlocal pending
                pending |= rig.burst(seed=seed, count=5)
                rig.reference("pending")
                _, rep, _ = rig.agent()
                d = disk_report(rep)
                rig.refs[d["snapshot"]] = rig.refs.pop("pending")
                # Nothing the failed run saw dirty is lost: it is all read again.
                check_ok_run(rig, rep, "incremental", pending)
                if note:
                    assert any(note in n for n in d["notes"]), d["notes"]
                pending = set()

            # 1. kill -9 of the agent mid-pull: its job and snapshot export stay on the server.
            burst, _, _ = interrupted_run(rig, 2, lambda a: a.send_signal(signal.SIGKILL))
            pending |= burst
            assert len(rig.our_jobs()) == 1 and len(rig.ours()) == 2  # leftovers the next run must handle
            next_ok("reclaimed job", seed=3)

            # 2. the NBD connection cut mid-pull: the agent rolls back at once.
            burst, rep, _ = interrupted_run(rig, 4, lambda a: rig.proxy.cut())
            pending |= burst
            assert rep is not None and rep["exit_code"] == 1
            assert any("merged" in n for n in disk_report(rep)["notes"]), rep
            assert rig.our_jobs() == [] and [b["recording"] for b in rig.ours()] == [True]
            next_ok(None, seed=5)

            # 3. the repository refuses writes: chattr +i on the chunk directories where this
            # machine allows it (not in a container without CAP_LINUX_IMMUTABLE, where root
            # ignores permission bits): there the agent runs under RLIMIT_FSIZE instead, so the
            # kernel fails every chunk file write with EFBIG.
            immutable = chattr_works(rig.tmp)
            pending |= rig.burst(seed=6, count=20)
            before = rig.snapshots()
            if immutable:
                dirs = [rig.repo / "chunks", *[p for p in (rig.repo / "chunks").iterdir() if p.is_dir()]]
                subprocess.run(["chattr", "+i", *map(str, dirs)], check=True)
                try:
                    a = rig.spawn_agent()
                    rep = failed_run(rig, a, before)
                finally:
                    subprocess.run(["chattr", "-i", *map(str, dirs)], check=True)
                assert "Operation not permitted" in disk_report(rep)["error"], rep
            else:
                rep = failed_run(rig, rig.spawn_agent(preexec=no_big_files), before)
                assert "File too large" in disk_report(rep)["error"], rep
            next_ok(None, seed=7)

            # 3b. ... or refuses to record the snapshot (every chunk stored, the snapshot not).
            if immutable:
                pending |= rig.burst(seed=8, count=20)
                before = rig.snapshots()
                subprocess.run(["chattr", "+i", str(rig.repo / "snapshots")], check=True)
                try:
                    rep = failed_run(rig, rig.spawn_agent(), before)
                finally:
                    subprocess.run(["chattr", "-i", str(rig.repo / "snapshots")], check=True)
                assert disk_report(rep)["status"] == "failed", rep
                next_ok(None, seed=9)
            else:
                warnings.warn("step 3b (the snapshot directory refusing writes) needs chattr +i, which this "
                              "machine refuses (no CAP_LINUX_IMMUTABLE): not run here")

            # 4. the server restarted (SIGTERM, then the same command) mid-pull.
            burst, _, _ = interrupted_run(rig, 10, lambda a: peers.stop(rig.peer))
            pending |= burst
            assert rig.peer.returncode == 0
        with rig.serve():
            # The persistent bitmaps came back (the base disabled, the new one recording).
            assert sorted(b["recording"] for b in rig.ours()) == [False, True]
            assert rig.our_jobs() == []
            next_ok("merged", seed=11)

            # 5. the server killed (kill -9) mid-pull and started again: the next run is
            # incremental if the bitmaps load complete, full if one loads inconsistent.
            burst, _, _ = interrupted_run(rig, 12, lambda a: peers.stop(rig.peer, signal.SIGKILL))
            pending |= burst
        with rig.serve():
            pending |= rig.burst(seed=13, count=5)
            rig.reference("pending")
            _, rep, _ = rig.agent()
            d = disk_report(rep)
            rig.refs[d["snapshot"]] = rig.refs.pop("pending")
            if d["kind"] == "incremental":
                check_ok_run(rig, rep, "incremental", pending)
            else:
                assert "inconsistent" in d["reason"], d
                check_ok_run(rig, rep, "full")
            pending = set()

            # 6. SIGTERM (systemctl stop, a timeout) mid-pull: the agent rolls back before it exits.
            burst, rep, took = interrupted_run(rig, 14, lambda a: a.send_signal(signal.SIGTERM))
            pending |= burst
            assert took < 10
            assert rep is not None and "interrupted" in rep["error"], rep
            # As a shell reports a command SIGTERM ended (doubts18 item 4), naming the disk.
            assert rep["exit_code"] == 143 and rep["interrupted"] == "SIGTERM", rep
            assert "rolled back" in rep["error"], rep
            assert disk_report(rep)["status"] == "failed" and "SIGTERM" in disk_report(rep)["error"], rep
            assert rig.our_jobs() == [] and [b["recording"] for b in rig.ours()] == [True]
            next_ok(None, seed=15)

            # 7. SIGHUP (the terminal or ssh session it ran in closed): the same rollback (it
            # was killed at once, leaving its job and bitmap for the next run to reclaim).
            burst, rep, _ = interrupted_run(rig, 16, lambda a: a.send_signal(signal.SIGHUP))
            pending |= burst
            assert rep is not None and "interrupted" in rep["error"], rep
            assert rep["exit_code"] == 129 and rep["interrupted"] == "SIGHUP", rep
            assert rig.our_jobs() == [] and [b["recording"] for b in rig.ours()] == [True]
            next_ok(None, seed=17)

            for s in rig.snapshots():
                rig.restores_exactly(s)
            assert len(rig.snapshots()) == (9 if immutable else 8)  # one per successful run
    finally:
        if rig.proxy is not None:
            rig.proxy.close()


def test_two_disks_one_instant_and_authz(pki, agent_creds, short_tmp):
    rig = Rig(short_tmp, pki, agent_creds["agent"], disks=("d1", "d2"))
    with rig.serve():
        # A stranger's certificate (signed by the CA, admitted by no pattern) is refused with the reason.
        rc, rep, err = rig.agent(ok=False, creds=agent_creds["stranger"])
        assert rc == 1 and "CN=intruder" in err and "not allowed by --control-authz" in err, err
        assert rig.snapshots() == []

        w = subprocess.Popen([sys.executable, str(HERE / "agent_writer.py"), "lockstep",
                              rig.peer.uri_for("d1"), rig.peer.uri_for("d2")], stdout=subprocess.PIPE)
        try:
            assert w.stdout.readline().strip() == b"ready"
            time.sleep(0.3)
            reps = []
            for _ in range(2):  # a full pair, then an incremental pair
                _, rep, _ = rig.agent()
                reps.append(rep)
        finally:
            w.kill()
            w.wait()
        for rep, kind in zip(reps, ("full", "incremental")):
            d1, d2 = disk_report(rep, "d1"), disk_report(rep, "d2")
            assert d1["kind"] == d2["kind"] == kind and d1["status"] == d2["status"] == "ok"
            m1, m2 = rig.info(d1["snapshot"])["meta"], rig.info(d2["snapshot"])["meta"]
            assert m1["group"] == m2["group"] and m1["instant"] == m2["instant"]
            seq = []
            for d in (d1, d2):
                out = short_tmp / f"r-{d['snapshot']}.raw"
                r = peers.restore_snapshot(rig.repo, d["snapshot"], out)
                assert r.returncode == 0, r.stderr
                with open(out, "rb") as f:
                    seq.append(struct.unpack("<Q", f.read(8))[0])
            # The writer writes k to d1, then to d2: one instant shows k1 == k2 or k1 == k2 + 1.
            assert seq[1] <= seq[0] <= seq[1] + 1 and seq[0] > 0, seq

        # A disk the server does not have: the other one is still backed up, exit 3 (partial).
        rc, rep, err = rig.agent("--disk", "nosuch", ok=False, disks=("d1",))
        assert rc == 3 and rep["exit_code"] == 3, (rep, err)
        assert disk_report(rep, "d1")["status"] == "ok" and disk_report(rep, "d1")["kind"] == "incremental"
        assert "no export 'nosuch'" in disk_report(rep, "nosuch")["error"]


def test_usage_errors_exit_2(short_tmp):
    for args in (["--repo", str(short_tmp), "--nbd", "nbd://127.0.0.1/", "--disk", "d", "--control", "x",
                  "--verify-sample", "0"],
                 ["--repo", str(short_tmp), "--disk", "d", "--control", "x"],  # no --nbd
                 ["--repo", str(short_tmp), "--nbd", "nbd://127.0.0.1/", "--disk", "d", "--control", "x",
                  "--snapshot-name", "{nope}"],
                 ["--nbd", "nbd://127.0.0.1/"]):  # no --repo: argparse
        r = peers.nbdbackup_cli("agent", "backup", *args, ok=False)
        assert r.returncode == 2 and "error" in r.stderr, (args, r.stderr)


def test_two_servers_from_one_agent(pki, agent_creds, short_tmp):
    """--config with two servers, --parallel 2, one repository: both backed up, names distinct."""
    (short_tmp / "a").mkdir()
    (short_tmp / "b").mkdir()
    creds = agent_creds["agent"]
    r1, r2 = Rig(short_tmp / "a", pki, creds), Rig(short_tmp / "b", pki, creds)
    with r1.serve(), r2.serve():
        r1.burst(seed=1, count=10)
        r2.burst(seed=2, count=10)
        cfg = short_tmp / "agent.json"
        cfg.write_text(json.dumps({"servers": [
            {"name": name, "control": f"qmps://127.0.0.1:{r.ctl_port}", "control_tls_creds": creds,
             "nbd": f"nbds://127.0.0.1:{r.nbd_port}/?tls-certificates={creds}", "disks": ["disk"]}
            for name, r in (("hostA", r1), ("hostB", r2))]}))
        for kind in ("full", "incremental"):
            r1.reference("pending")
            r2.reference("pending")
            sample = ["--verify", "sample", "--verify-sample", "1"] if kind == "incremental" else []
            r = peers.nbdbackup_cli("agent", "backup", "--config", str(cfg), "--repo", str(r1.repo),
                                    "--parallel", "2", "--json", *sample)
            rep = json.loads(r.stdout)
            assert [(d["server"], d["status"], d["kind"]) for d in rep["disks"]] == [
                ("hostA", "ok", kind), ("hostB", "ok", kind)], rep
            for d in rep["disks"]:
                v = d["verify"]
                assert v["ok"] and v["chunks_checked"] == (1 if sample else v["of"]) and v["of"] >= 1, v
            names = [d["snapshot"] for d in rep["disks"]]
            assert len(set(names)) == 2
            for rig, d in zip((r1, r2), rep["disks"]):
                rig.refs[d["snapshot"]] = rig.refs.pop("pending")
                assert r1.info(d["snapshot"])["meta"]["server"] == d["server"]
                rig.repo = r1.repo
                rig.restores_exactly(d["snapshot"])
            r1.burst(seed=3, count=5)
            r2.burst(seed=4, count=5)


def test_s3_repository_and_a_bucket_policy_refusing_writes(pki, agent_creds, short_tmp, s3env, rgw):
    """The same agent into s3://: full, incremental; then a bucket policy denying
    PutObject on the chunks fails a run (nothing recorded), and the next run is exact."""
    rig = Rig(short_tmp, pki, agent_creds["agent"])
    rig.repo = s3env
    peers.nbdbackup_cli("repo", "init", s3env, "--chunk-size", str(CHUNK))
    bucket, prefix = s3env[len("s3://"):].split("/", 1)
    s3 = rgw.client()
    snaps = rig.snapshots
    with rig.serve():
        dirty: set[int] = set()
        for kind, seed in (("full", 1), ("incremental", 2)):
            dirty = rig.burst(seed=seed, count=10)
            rig.reference("pending")
            _, rep, _ = rig.agent()
            rig.refs[disk_report(rep)["snapshot"]] = rig.refs.pop("pending")
            check_ok_run(rig, rep, kind, dirty if kind == "incremental" else None)
        pending = rig.burst(seed=3, count=10)
        before = snaps()
        policy = {"Version": "2012-10-17", "Statement": [{
            "Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
            "Resource": f"arn:aws:s3:::{bucket}/{prefix}/chunks/*"}]}
        s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
        try:
            rc, rep, err = rig.agent(ok=False)
        finally:
            s3.delete_bucket_policy(Bucket=bucket)
        assert rc == 1 and disk_report(rep)["status"] == "failed", (rep, err)
        assert "AccessDenied" in disk_report(rep)["error"] or "denied" in disk_report(rep)["error"].lower(), rep
        assert snaps() == before
        pending |= rig.burst(seed=4, count=5)
        rig.reference("pending")
        _, rep, _ = rig.agent()
        rig.refs[disk_report(rep)["snapshot"]] = rig.refs.pop("pending")
        check_ok_run(rig, rep, "incremental", pending)
        for s in snaps():
            rig.restores_exactly(s)


def test_encrypted_repository(pki, agent_creds, short_tmp, monkeypatch):
    """The agent into a repokey-encrypted repository (--passphrase-file): full, incremental,
    each restored exactly (the restore plugin takes NBDBACKUP_PASSPHRASE from its environment).
    The incremental runs with ``--limit-rate 8M``: its reads from the server -- the pull's
    and the verification's, over TLS on the receiving threads -- take at least their bytes
    at 8 MiB/s (less one 0.1 s burst)."""
    rig = Rig(short_tmp, pki, agent_creds["agent"], passphrase="correct horse battery staple")
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", rig.passphrase)
    with rig.serve():
        for kind, seed in (("full", 1), ("incremental", 2)):
            dirty = rig.burst(seed=seed, count=10)
            rig.reference("pending")
            limit = ("--limit-rate", "8M") if kind == "incremental" else ()
            t0 = time.monotonic()
            _, rep, _ = rig.agent(*limit)
            took = time.monotonic() - t0
            rig.refs[disk_report(rep)["snapshot"]] = rig.refs.pop("pending")
            check_ok_run(rig, rep, kind, dirty if kind == "incremental" else None)
            if limit:
                d = disk_report(rep)
                paced = (d["bytes_read"] + d["verify"]["bytes_read"]) / (8 * M) - 0.1
                assert paced >= 0.8 and took >= paced, (took, d)
    # Without the passphrase the agent cannot open it: exit 1, nothing started.
    monkeypatch.delenv("NBDBACKUP_PASSPHRASE")
    r = subprocess.run([a for a in rig.agent_argv() if a not in rig.repo_opts], cwd=ROOT, capture_output=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and b"passphrase" in r.stderr.lower(), r.stderr


def _chunk_frames(rig: Rig, ids) -> dict[bytes, tuple[bytes, bytes]]:
    """Chunk id -> (its plaintext, the zstd frame stored for it) for the compressed chunks
    among ``ids`` (an encrypted repository: the envelope is opened here)."""
    from nbdbackup.agent.codec import AEAD, NONCE, ZSTD
    from nbdbackup.agent.repo import _chunk_key

    repo = rig._open_repo()
    out = {}
    for d in ids:
        if d == repo.zero_id(CHUNK):
            continue
        key = _chunk_key(d)
        blob = repo.store.get(key)
        assert blob[1] & AEAD
        if not blob[1] & ZSTD:
            continue
        payload = repo.codec._aead.decrypt(blob[2:2 + NONCE], blob[2 + NONCE:], blob[:2] + key.encode())
        out[d] = (repo.get_chunk(d, CHUNK), payload)
    return out


def test_adaptive_compression_full_at_3_incrementals_at_1(pki, agent_creds, short_tmp, monkeypatch):
    """A repokey repository with the default compression (adaptive ``zstd``): the full
    backup's new chunks are stored as zstd level-3 frames, an incremental's (``--read whole``
    and ``--read dirty``) as level-1 frames, byte for byte; the reports say which; every
    snapshot restores exactly (through the plugin and ``nbdbackup restore``) and ``repo
    verify`` passes."""
    import zstandard

    rig = Rig(short_tmp, pki, agent_creds["agent"], passphrase="correct horse battery staple")
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", rig.passphrase)
    info = json.loads(peers.nbdbackup_cli("repo", "info", "--json", str(rig.repo)).stdout)
    assert info["compression"] == "zstd" and info["compression_levels"] == {"full": 3, "incremental": 1}, info
    seen: set[bytes] = set()
    levels = {}
    with rig.serve():
        for kind, seed, read in (("full", 1, "whole"), ("incremental", 2, "whole"), ("incremental", 3, "dirty")):
            dirty = rig.burst(seed=seed, count=40 if kind == "full" else 10, text=True)
            rig.reference("pending")
            _, rep, _ = rig.agent("--read", read)
            d = disk_report(rep)
            rig.refs[d["snapshot"]] = rig.refs.pop("pending")
            check_ok_run(rig, rep, kind, dirty if kind == "incremental" else None, read=read)
            level = 3 if kind == "full" else 1
            assert d["compression"] == f"zstd:{level}", d
            new = [c for c in rig._open_repo().load_snapshot(d["snapshot"]).chunks if c not in seen]
            seen.update(new)
            frames = _chunk_frames(rig, new)
            assert len(frames) >= d["new_chunks"] >= (8 if kind == "full" else 3), (len(frames), d)
            for data, frame in frames.values():
                want = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
                other = zstandard.ZstdCompressor(level=4 - level, write_content_size=True).compress(data)
                assert want != other  # the data tells the two levels apart
                assert frame == want, (kind, read, len(frame), len(want), len(other))
            levels[d["snapshot"]] = level
    r = peers.nbdbackup_cli("repo", "verify", "--json", str(rig.repo))
    assert json.loads(r.stdout)["ok"] is True, r.stdout
    for snap in levels:
        out = short_tmp / f"cli-{snap}.raw"
        peers.nbdbackup_cli("restore", str(rig.repo), snap, str(out))
        c = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(rig.refs[snap]), str(out)],
                           capture_output=True, timeout=60)
        assert c.returncode == 0, (snap, c.stdout.decode(errors="replace"))
        out.unlink()


def test_kdf_none_key_file_for_unattended_runs(pki, agent_creds, short_tmp, monkeypatch):
    """A repokey repository, its key exported ``--kdf none`` (0600): the agent runs with
    ``--key-file`` and no passphrase anywhere (full, incremental, each restored exactly); a key
    file others can read is refused before anything starts (exit 1, nothing recorded)."""
    rig = Rig(short_tmp, pki, agent_creds["agent"], passphrase="correct horse battery staple")
    key = short_tmp / "agent.key"
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", rig.passphrase)
    out = peers.nbdbackup_cli("repo", "key", "export", "--kdf", "none", str(rig.repo), str(key)).stdout
    assert "UNWRAPPED" in out and key.stat().st_mode & 0o777 == 0o600
    rig.repo_opts = ["--key-file", str(key)]  # instead of --passphrase-file
    with rig.serve():
        for kind, seed in (("full", 1), ("incremental", 2)):
            dirty = rig.burst(seed=seed, count=10)
            rig.reference("pending")
            monkeypatch.delenv("NBDBACKUP_PASSPHRASE")  # the agent has no passphrase: the key file suffices
            _, rep, _ = rig.agent()
            monkeypatch.setenv("NBDBACKUP_PASSPHRASE", rig.passphrase)  # for the restore plugin
            rig.refs[disk_report(rep)["snapshot"]] = rig.refs.pop("pending")
            check_ok_run(rig, rep, kind, dirty if kind == "incremental" else None)
        before = rig.snapshots()
        key.chmod(0o644)
        monkeypatch.delenv("NBDBACKUP_PASSPHRASE")
        rc, rep, err = rig.agent(ok=False)
        assert rc == 1 and "must not be accessible by group or others" in err and "chmod 600" in err, (rep, err)
        assert rig.snapshots() == before and rig.our_jobs() == []


def test_s3_incremental_round_trips(pki, agent_creds, short_tmp, s3env):
    """The S3 API calls of an incremental (the agent's ``store_requests``): no HEAD per chunk
    (a conditional PUT each), no HEAD before the snapshot's PUT, one ranged GET for the base's
    metadata: HEADs are the exclusive-lease check, the new name's check and the lease check."""
    rig = Rig(short_tmp, pki, agent_creds["agent"])
    rig.repo = s3env
    peers.nbdbackup_cli("repo", "init", s3env, "--chunk-size", str(CHUNK))
    with rig.serve():
        for kind, seed in (("full", 1), ("incremental", 2)):
            dirty = rig.burst(seed=seed, count=120 if kind == "full" else 10)
            rig.reference("pending")
            _, rep, _ = rig.agent("--verify", "off")
            rig.refs[disk_report(rep)["snapshot"]] = rig.refs.pop("pending")
            d = disk_report(rep)
            assert d["status"] == "ok" and d["kind"] == kind, d
            rig.restores_exactly(d["snapshot"])
            if kind == "full":  # into an empty repository: probes stop after ProbeGate.MISSES misses
                full_calls, full_d = rep["store_requests"], d
        # Probes in flight on the 8 workers when the gate closes add at most 7; 3 HEADs are the leases'
        # and the name's.  Probing every chunk would make new_chunks + 3.
        assert full_d["new_chunks"] > ProbeGate.MISSES + 3 + 7, full_d  # else the next line proves nothing
        assert full_calls.get("HeadObject", 0) <= ProbeGate.MISSES + 3 + 7, (full_calls, full_d)
        calls = rep["store_requests"]
        assert d["new_chunks"] >= 1 and dirty
        assert calls.get("HeadObject", 0) <= 3, calls
        # The lease, one conditional PUT per changed chunk (new unless a rare dedup hit), the snapshot.
        assert calls["PutObject"] <= d["chunks_worked"] + 2 and calls["PutObject"] >= d["new_chunks"] + 2, (calls, d)
        # config.json, the base's metadata (ranged) and digests, at most one base chunk per changed chunk.
        assert calls["GetObject"] <= 3 + d["chunks_worked"], (calls, d)
        assert calls.get("ListObjectsV2", 0) == 0 and calls["DeleteObject"] == 1, calls  # the lease
