#!/usr/bin/env python3
"""Backup engine: nbdbackup's copy-before-write, snapshot export and pump, side by side with QEMU.

Role: the measurements of issue 4, in ONE run, on a random image in the page
cache (a file under ``--dir``, /tmp by default; dirty pages are written back
before each timed section, outside it):

1. Live write throughput during a backup, as the ratio with/without a backup
   (``sync=none``: nothing but copy-before-write copies), for both servers:
   a. ``live-seq-first``   1 MiB sequential writes over every cluster, 16 in
                           flight, one libnbd connection (every cluster is
                           uncopied: each write pays a CBW copy first);
   b. ``live-4k-uncopied`` one 4 KiB write into each 64 KiB cluster (offsets
                           k*64K, random order), 32 in flight, one connection;
   c. ``live-seq-copied``  a. repeated on the same range (every cluster is
                           already copied: no CBW work is left).
   b. stops issuing writes after ``--max-seconds`` (default 4 s), then
   reports IOPS over the writes done, not over all clusters (so a slow
   server does not blow the run time).
2. Snapshot export sequential read, ``nbdcopy SNAP_URI null:`` (default
   connections), nbdbackup vs QEMU, on the same files:
   - ``snap-read-idle``  the snapshot right after the backup started, nothing
                         else running (nbdbackup ``sync=none``; QEMU the
                         snapshot-access node of the fleecing graph);
   - ``snap-read-pump``  while the backup copies everything in the background
                         (nbdbackup ``sync=full``, no speed limit; QEMU a
                         ``blockdev-backup sync=full`` job whose source is the
                         snapshot-access node, copying to a second file).
3. ``pump-full`` 1 GiB full backup into a fresh sparse file, time from the
   start command to the job's ``concluded`` status: nbdbackup
   ``backup-start sync=full`` vs QEMU ``blockdev-backup sync=full`` (plain
   source node -> file node) vs ``qemu-img convert -f raw -O raw IMG TGT``.
4. ``pump-sparse`` the same three on a sparse raw image (``--sparse-size``,
   default 1 TiB) holding ``--sparse-data`` (default 1 GiB) of random data in
   4 MiB pieces spread over it: the cost must follow the data, not the disk
   size.  Reported as MB/s of the disk's virtual size; server CPU per GiB of
   data.  Targets are checked with ``qemu-img compare`` (cmp would read the
   holes).  QEMU's ``blockdev-backup`` is left out here: it writes a source
   hole as ``write-zeroes`` without MAY_UNMAP, which a raw file node turns
   into allocated blocks, so the target grows to the full virtual size
   (measured: ENOSPC after 74 GB of a 1 TiB run); ``qemu-img convert`` keeps
   holes and is the comparison.  Plain ``qemu-img convert`` opens its target
   ``cache=unsafe``: it never flushes, its copy ends in the page cache (and
   this bench deletes the file before the kernel writes it back: the disk
   never sees it), while our job's ``concluded`` means the target was
   flushed (fdatasync, the disk wrote every byte).  Not the same work: the
   bench times both ``qemu-img convert`` and ``qemu-img convert -t
   writeback`` (one fdatasync at the end, the same durability; order
   alternating per round) and the goal column applies to the latter
   (``qemu-img-sync``; docs/sparsefull.md, docs/snapsparse.md).  QEMU 7.2's
   ``blockdev-backup`` (pump-full) does not flush its target before
   ``concluded`` either: that row favours QEMU.  qemu-img's CPU is its
   process's user+sys; its process start (4-80 ms here, load 8) is inside its time, our
   server's start is not (it serves before and after the job).

Configurations (each side's defaults unless said):
- nbdbackup: ``serve --socket S --control C disk=IMG``; the backup is started
  over the control socket with ``backup-start`` (64 KiB clusters, 4 workers,
  4 MiB chunks; target a path to a file that does not exist yet).
- QEMU: qemu-storage-daemon, file nodes ``cache.direct=off,aio=threads``.
  "Without a backup": the live NBD export on the plain raw ``src`` node.
  "With a backup" (QEMU's image fleecing, tests/qemu-iotests/tests/image-fleecing):
  ``copy-before-write`` node ``cbw`` (file=src, target=a raw file node on a
  fresh sparse file: 64 KiB block-copy clusters), ``snapshot-access`` node
  over it; the live export (writable) on ``cbw``, the snapshot export on the
  snapshot-access node.  The graph is built at start-up, so the point in
  time is the daemon's start; timing starts once it listens, as for nbdbackup
  once ``backup-start`` returned.

Timing "start to concluded": the start command, then the JOB_STATUS_CHANGE
event ``concluded`` (``QMP.wait_concluded``; query-jobs only as a safety net
every 0.5 s), for both servers -- no tight query-jobs poll loading the
server being measured.

Method: rounds alternate the order of the two servers; each (round, server)
gets a fresh copy of the base image; each session starts a fresh server
process and a fresh sparse target, and is stopped by PID.  Medians over the
rounds; ratios with/without are paired per round (median of per-round
ratios).  Server CPU time (user+sys, all threads) is recorded next to each
figure; ``cpu-ratio`` is the with/without ratio computed from server CPU per
unit of work (without / with): on a shared machine it is steadier than the
wall-clock ratio.

Usage: ``bench/backup_bench.py [--size 1G] [--rounds 3] [--only live,snap,pump]
[--servers qemu,nbdbackup] [--dir /tmp] [--max-seconds 4] [--keep] [--no-json]
[--markdown] [--baseline DIR]``; ``--baseline DIR`` also runs
another checkout's nbdbackup (DIR/.venv) in the pump groups, interleaved with
ours (order alternating per round; ``baseline`` rows in the table);
``--ours-cmd CMD`` runs nbdbackup through another command (an experiment
wrapper); ``--profile DIR`` runs only nbdbackup's "with a backup"
sessions (1 round) under py-spy and prints where its time goes per measurement.
A/B of the session-5 changes (docs/pullcbw.md): the server inherits the
environment, so ``NBDBACKUP_CBW_SYNC=0`` (no synchronous copy-before-write in
the task-free write path: ``live-4k-uncopied``, ``live-seq-first``) and
``NBDBACKUP_WRITE_BEHIND=0`` (no write-behind of the pump's copies:
``pump-full``) give the previous behaviour; ``--ours-cmd "env -C /work/main
/work/main/.venv/bin/python -m nbdbackup.cli"`` runs another checkout.
In-process, without NBD: bench/cbw_micro.py.

Invariant: every process started here is stopped by PID and the temp dir
(images, sockets, logs) is removed, on success, error and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Metric, Procs, Results  # noqa: E402

OURS = "nbdbackup"
QEMU = "qemu"
QEMU_IMG = "qemu-img"
#: ``qemu-img convert -t writeback``: flushes the target at the end (fdatasync),
#: as our job does before "concluded"; the default (cache=unsafe) never flushes.
QEMU_IMG_SYNC = "qemu-img-sync"
#: Another checkout's nbdbackup (``--baseline DIR``), pump groups only.
BASELINE = "baseline"
BASELINE_CMD: list[str] = []
BASELINE_DIR: list[str] = []
EXPORT = "disk"
SNAP = "snap"
CLUSTER = 64 * 1024
OURS_CMD = [common.VENV_PYTHON, "-m", "nbdbackup.cli"]
#: ``--cluster-size N``: backup-start's ``cluster-size`` for our backups (empty: the server's default).
OURS_CLUSTER: list[int] = []

LIVE = ("live-seq-first", "live-4k-uncopied", "live-seq-copied")
GOALS = {"live-seq-first": 0.5, "live-4k-uncopied": 0.4, "live-seq-copied": 1.0,
         "snap-read-idle": 1.0, "snap-read-pump": 1.0, "pump-full": 1.0, "pump-sparse": 1.0}
QEMU72_ISSUE = {"live-seq-first": 0.36, "live-4k-uncopied": 0.26, "live-seq-copied": 1.0}


def build_metrics() -> dict[str, Metric]:
    ms = []
    for name, unit, what in (("live-seq-first", "MB/s", "1 MiB seq writes, 16 in flight, uncopied clusters"),
                             ("live-4k-uncopied", "IOPS", "4 KiB write per uncopied 64 KiB cluster, 32 in flight"),
                             ("live-seq-copied", "MB/s", "1 MiB seq writes, 16 in flight, clusters already copied")):
        ms.append(Metric(f"{name}:without", unit, description=f"{what}; no backup"))
        ms.append(Metric(f"{name}:with", unit, description=f"{what}; during a sync=none backup"))
        ms.append(Metric(f"{name}:ratio", "x", description="with/without, paired per round"))
        ms.append(Metric(f"{name}:cpu-ratio", "x", description="server CPU per unit without / with, "
                         "paired per round (the throughput ratio a CPU-bound server would reach)"))
        cpu_unit = "cpu-us/op" if unit == "IOPS" else "cpu-s/GiB"
        ms.append(Metric(f"{name}:cpu-without", cpu_unit, higher_is_better=False,
                         description="server CPU per unit of work, no backup"))
        ms.append(Metric(f"{name}:cpu-with", cpu_unit, higher_is_better=False,
                         description="server CPU per unit of work, during the backup"))
    ms += [Metric("snap-read-idle", "MB/s", description="nbdcopy SNAP null:, nothing else running"),
           Metric("snap-read-idle:cpu", "cpu-s/GiB", higher_is_better=False),
           Metric("snap-read-pump", "MB/s", description="nbdcopy SNAP null: while a full backup pump runs"),
           Metric("snap-read-pump:cpu", "cpu-s/GiB", higher_is_better=False),
           Metric("pump-full", "MB/s", description="full backup of the image: start to concluded"),
           Metric("pump-full:cpu", "cpu-s/GiB", higher_is_better=False),
           Metric("pump-sparse", "MB/s", description="full backup of a sparse image (virtual size / time)"),
           Metric("pump-sparse:cpu", "cpu-s/GiB", higher_is_better=False,
                  description="server CPU per GiB of data in the sparse image")]
    return {m.name: m for m in ms}


METRICS = build_metrics()


# --------------------------------------------------------------------------
# QMP (both servers speak it; qemu.qmp drives both)

class QMP:
    """A synchronous face over `qemu.qmp.QMPClient`, on a private event loop."""

    def __init__(self, path: str) -> None:
        from qemu.qmp import QMPClient

        self.loop = asyncio.new_event_loop()
        self.client = QMPClient("bench")
        self.loop.run_until_complete(self.client.connect(path))

    def __call__(self, cmd: str, args: dict | None = None):
        return self.loop.run_until_complete(self.client.execute(cmd, args or {}))

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.client.disconnect())
        finally:
            self.loop.close()

    def wait_concluded(self, job_id: str, timeout: float = 300.0, poll: float = 0.5) -> dict:
        """Wait until ``job_id`` is concluded; returns its JobInfo.

        Waits for the JOB_STATUS_CHANGE event (both servers send it) rather
        than polling query-jobs every few ms: a tight poll costs the measured
        server CPU (100-200 query-jobs per second-long job) and up to a poll
        interval of latency.  query-jobs is asked first (the job may have
        concluded before the listener existed) and again every ``poll``
        seconds without a matching event (a safety net)."""
        from qemu.qmp import EventListener

        async def wait() -> dict:
            listener = EventListener(names="JOB_STATUS_CHANGE")
            deadline = time.monotonic() + timeout
            with self.client.listen(listener):
                while True:
                    for j in await self.client.execute("query-jobs"):
                        if j["id"] == job_id and j["status"] == "concluded":
                            return j
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"job {job_id} did not conclude in {timeout} s")
                    try:
                        while True:
                            ev = await asyncio.wait_for(listener.get(), poll)
                            data = ev.get("data", {})
                            if data.get("id") == job_id and data.get("status") == "concluded":
                                break
                    except asyncio.TimeoutError:
                        pass

        return self.loop.run_until_complete(wait())


# --------------------------------------------------------------------------
# servers

class Session:
    """One started server: its process, NBD URIs, QMP connection."""

    def __init__(self, procs: Procs, proc: common.Proc, nbd_sock: str, qmp_sock: str) -> None:
        self.procs = procs
        self.proc = proc
        self.nbd_sock = nbd_sock
        common.wait_for_unix(nbd_sock, proc=proc)
        common.wait_for_unix(qmp_sock, proc=proc)
        self.qmp = QMP(qmp_sock)

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.nbd_sock}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return common.proc_tree_cpu_seconds(self.pid)

    def close(self) -> None:
        try:
            self.qmp.close()
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        self.procs.stop(self.proc)


def _file_node(name: str, path: str) -> str:
    return f"driver=file,node-name={name},filename={path},cache.direct=off,aio=threads"


def qsd_argv(ws: Path, img: str, fleece_tgt: str | None = None, backup_tgt: str | None = None) -> list[str]:
    """qemu-storage-daemon: plain live export, or the fleecing graph when
    ``fleece_tgt``; ``backup_tgt`` adds a file node ``bk`` for blockdev-backup."""
    argv = ["qemu-storage-daemon",
            "--blockdev", _file_node("src-file", img),
            "--blockdev", "driver=raw,node-name=src,file=src-file"]
    live = "src"
    if fleece_tgt:
        argv += ["--blockdev", _file_node("tgt", fleece_tgt),
                 "--blockdev", "driver=copy-before-write,node-name=cbw,file=src,target=tgt",
                 "--blockdev", "driver=snapshot-access,node-name=snap-access,file=cbw"]
        live = "cbw"
    if backup_tgt:
        argv += ["--blockdev", _file_node("bk", backup_tgt)]
    argv += ["--nbd-server", f"addr.type=unix,addr.path={ws / 'nbd.sock'}",
             "--export", f"type=nbd,id=live,node-name={live},name={EXPORT},writable=on"]
    if fleece_tgt:
        argv += ["--export", f"type=nbd,id=snapx,node-name=snap-access,name={SNAP}"]
    argv += ["--chardev", f"socket,id=qmp0,path={ws / 'qmp.sock'},server=on,wait=off",
             "--monitor", "chardev=qmp0,mode=control"]
    return argv


def start(procs: Procs, ws: Path, server: str, img: str, fleece_tgt: str | None = None,
          backup_tgt: str | None = None) -> Session:
    for s in ("nbd.sock", "qmp.sock"):
        with_path = ws / s
        if with_path.exists():
            with_path.unlink()
    env = dict(os.environ, PYTHONPATH=str(common.REPO_DIR))
    if server == BASELINE:
        env["PYTHONPATH"] = BASELINE_DIR[0]
        argv = [*BASELINE_CMD, "serve", "--socket", str(ws / "nbd.sock"), "--control", str(ws / "qmp.sock"),
                f"{EXPORT}={img}"]
    elif server == OURS:
        argv = [*OURS_CMD, "serve", "--socket", str(ws / "nbd.sock"), "--control", str(ws / "qmp.sock"),
                f"{EXPORT}={img}"]
    else:
        if fleece_tgt:
            make_sparse(fleece_tgt, os.path.getsize(img))
        if backup_tgt:
            make_sparse(backup_tgt, os.path.getsize(img))
        argv = qsd_argv(ws, img, fleece_tgt, backup_tgt)
    p = procs.start(server, argv, log_path=ws / f"{server}.log", env=env)
    return Session(procs, p, str(ws / "nbd.sock"), str(ws / "qmp.sock"))


def make_sparse(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def rm(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def ours_backup(s: Session, sync: str, target: str, snapshot: str | None = SNAP, job: str = "j") -> None:
    args = {"export": EXPORT, "job-id": job, "sync": sync, "target": target}
    if OURS_CLUSTER:
        args["cluster-size"] = OURS_CLUSTER[0]
    if snapshot:
        args["snapshot"] = snapshot
    s.qmp("backup-start", args)


# --------------------------------------------------------------------------
# workloads

def nbd_write(uri: str, offsets: list[int], length: int, qd: int, seed: int = 1,
              max_seconds: float | None = None) -> tuple[float, int]:
    """Write ``length`` bytes at each offset, in order, ``qd`` in flight, one
    libnbd connection.  Returns (wall seconds from the first request to the
    last reply, writes done); no new write is issued after ``max_seconds``."""
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        data = bytearray(random.Random(seed).randbytes(length))
        buf = nbd.Buffer.from_bytearray(data)
        errors = [0]

        def cb(err):
            if err.value:
                errors[0] += 1
            return 1  # auto-retire

        n, i = len(offsets), 0
        t0 = time.perf_counter()
        deadline = t0 + max_seconds if max_seconds else None
        while i < n or h.aio_in_flight() > 0:
            while i < n and h.aio_in_flight() < qd:
                h.aio_pwrite(buf, offsets[i], completion=cb)
                i += 1
            h.poll(-1)
            if deadline is not None and i < n and time.perf_counter() > deadline:
                n = i  # time is up: drain what is in flight
        dt = time.perf_counter() - t0
        if errors[0]:
            raise RuntimeError(f"{errors[0]} of {n} writes failed")
        return dt, n
    finally:
        common.nbd_shutdown_quietly(h)


def seq_offsets(size: int, block: int = 1 << 20) -> list[int]:
    return list(range(0, size, block))


def cluster_offsets(size: int, seed: int) -> list[int]:
    offs = list(range(0, size, CLUSTER))
    random.Random(seed).shuffle(offs)
    return offs


def nbdcopy_read(uri: str) -> float:
    return common.run_timed(["nbdcopy", uri, "null:"])


# --------------------------------------------------------------------------
# one round of one server

class Bench:
    def __init__(self, args, ws: Path, procs: Procs, base: str) -> None:
        self.args = args
        self.ws = ws
        self.procs = procs
        self.base = base
        self.size = args.size
        self.res = Results("backup")
        for m in METRICS.values():
            self.res.add_metric(m)
        self.spy_dir: Path | None = Path(args.profile) if args.profile else None
        self.spy_outputs: list[tuple[str, Path, float]] = []
        #: server -> writes done per live-4k-uncopied run (capped by --max-seconds)
        self.counts: dict[str, list[int]] = {}

    # -- helpers ---------------------------------------------------------

    def log(self, rnd: int, server: str, what: str, value: float, unit: str, cpu: float | None = None,
            cpu_unit: str = "") -> None:
        c = f"  server cpu {cpu:8.2f} {cpu_unit}" if cpu is not None else ""
        print(f"  round {rnd + 1} {server:9} {what:26} {value:10,.1f} {unit:5}{c}"
              f"  load {os.getloadavg()[0]:.1f}", flush=True)

    def timed(self, s: Session, label: str, fn):
        """Run ``fn()`` (returns seconds) and the server CPU it cost; under
        --profile, with py-spy attached for the duration.  Dirty pages of the
        image and targets are written back first (outside the timing), so
        every measurement starts from the same page-cache state."""
        for name in ("work.img", "tgt.img", "bk.img"):
            if (self.ws / name).exists():
                common.fsync_file(self.ws / name)
        spy = None
        if self.spy_dir is not None:
            out = self.spy_dir / f"{label}.txt"
            rm(str(out))
            spy = self.procs.start("py-spy", [common.PY_SPY, "record", "--pid", str(s.pid), "-r", "200",
                                              "-f", "raw", "-o", str(out), "--nonblocking"],
                                   log_path=str(out) + ".log")
            time.sleep(0.5)  # let py-spy attach
        c0 = s.cpu()
        dt = fn()
        cpu = s.cpu() - c0
        if spy is not None:
            # SIGINT makes py-spy write its output and exit.
            os.kill(spy.pid, signal.SIGINT)
            try:
                spy.popen.wait(20)
            except subprocess.TimeoutExpired:
                pass
            self.procs.stop(spy)
            self.spy_outputs.append((label, self.spy_dir / f"{label}.txt", cpu))
        return dt, cpu

    def record(self, metric: str, server: str, value: float) -> None:
        self.res.add(metric, server, value)

    # -- 1. live writes ----------------------------------------------------

    def live(self, rnd: int, server: str, img: str) -> None:
        size = self.size
        seq = seq_offsets(size)
        gib = size / common.GiB
        nclusters = size // CLUSTER
        got: dict[tuple[str, str], tuple[float, float]] = {}
        tgt = str(self.ws / "tgt.img")
        for mode in ("without", "with"):
            if self.spy_dir is not None and mode == "without":
                continue
            # session 1: a, c
            rm(tgt)
            fleece = tgt if (server == QEMU and mode == "with") else None
            s = start(self.procs, self.ws, server, img, fleece_tgt=fleece)
            try:
                if mode == "with" and server == OURS:
                    ours_backup(s, "none", tgt)
                for name in ("live-seq-first", "live-seq-copied"):
                    (dt, _), cpu = self.timed(s, f"{name}-{mode}",
                                              lambda: nbd_write(s.uri(EXPORT), seq, 1 << 20, 16))
                    got[(name, mode)] = (size / dt / 1e6, cpu / gib)
                    self.log(rnd, server, f"{name}:{mode}", size / dt / 1e6, "MB/s", cpu / gib, "cpu-s/GiB")
                if mode == "with":
                    self._check_job_ok(s, server)
                if mode == "without":
                    # no copy state to consume: b. on the same server
                    self._live_4k(rnd, server, s, mode, nclusters, got)
            finally:
                s.close()
            if mode == "with":
                # session 2: b. on a fresh backup (every cluster uncopied again)
                rm(tgt)
                s = start(self.procs, self.ws, server, img, fleece_tgt=fleece)
                try:
                    if server == OURS:
                        ours_backup(s, "none", tgt)
                    self._live_4k(rnd, server, s, mode, nclusters, got)
                    self._check_job_ok(s, server)
                finally:
                    s.close()
            rm(tgt)
        if self.spy_dir is not None:
            return
        for name in LIVE:
            (w, cw), (wo, cwo) = got[(name, "with")], got[(name, "without")]
            self.record(f"{name}:with", server, w)
            self.record(f"{name}:without", server, wo)
            self.record(f"{name}:ratio", server, w / wo)
            self.record(f"{name}:cpu-ratio", server, cwo / cw)
            self.record(f"{name}:cpu-with", server, cw)
            self.record(f"{name}:cpu-without", server, cwo)

    def _live_4k(self, rnd, server, s: Session, mode: str, nclusters: int, got: dict) -> None:
        offs = cluster_offsets(self.size, seed=rnd)
        (dt, n), cpu = self.timed(s, f"live-4k-uncopied-{mode}",
                                  lambda: nbd_write(s.uri(EXPORT), offs, 4096, 32,
                                                    max_seconds=self.args.max_seconds))
        iops = n / dt
        got[("live-4k-uncopied", mode)] = (iops, cpu / n * 1e6)
        self.counts.setdefault(server, []).append(n)
        self.log(rnd, server, f"live-4k-uncopied:{mode}", iops, "IOPS", cpu / n * 1e6, "cpu-us/op")

    def _check_job_ok(self, s: Session, server: str) -> None:
        if server != OURS:
            return
        for j in s.qmp("query-jobs"):
            if j.get("error") or j["status"] not in ("running", "ready", "concluded"):
                raise RuntimeError(f"backup job in trouble: {j}")

    # -- 2. snapshot reads ----------------------------------------------------

    def snap_idle(self, rnd: int, server: str, img: str) -> None:
        """The snapshot right after the backup started (every cluster read
        from the source), nothing else running."""
        tgt = str(self.ws / "tgt.img")
        rm(tgt)
        gib = self.size / common.GiB
        s = start(self.procs, self.ws, server, img, fleece_tgt=tgt if server == QEMU else None)
        try:
            if server == OURS:
                ours_backup(s, "none", tgt)
            dt, cpu = self.timed(s, "snap-read-idle", lambda: nbdcopy_read(s.uri(SNAP)))
        finally:
            s.close()
            rm(tgt)
        self.record("snap-read-idle", server, self.size / dt / 1e6)
        self.record("snap-read-idle:cpu", server, cpu / gib)
        self.log(rnd, server, "snap-read-idle", self.size / dt / 1e6, "MB/s", cpu / gib, "cpu-s/GiB")

    def snap_pump(self, rnd: int, server: str, img: str) -> None:
        tgt, bk = str(self.ws / "tgt.img"), str(self.ws / "bk.img")
        rm(tgt, bk)
        gib = self.size / common.GiB
        if server == OURS:
            s = start(self.procs, self.ws, server, img)
        else:
            s = start(self.procs, self.ws, server, img, fleece_tgt=tgt, backup_tgt=bk)
        try:
            def run() -> float:
                if server == OURS:
                    ours_backup(s, "full", tgt)
                else:
                    s.qmp("blockdev-backup", {"job-id": "j", "device": "snap-access", "target": "bk",
                                              "sync": "full", "auto-dismiss": False})
                return nbdcopy_read(s.uri(SNAP))
            dt, cpu = self.timed(s, "snap-read-pump", run)
            progress = [(j["current-progress"], j["total-progress"]) for j in s.qmp("query-jobs")]
            s.qmp.wait_concluded("j")
            self.record("snap-read-pump", server, self.size / dt / 1e6)
            self.record("snap-read-pump:cpu", server, cpu / gib)
            self.log(rnd, server, "snap-read-pump", self.size / dt / 1e6, "MB/s", cpu / gib, "cpu-s/GiB")
            self.res.meta.setdefault("snap_pump_progress_after_read", {}).setdefault(server, []).append(progress)
        finally:
            s.close()
            rm(tgt, bk)

    # -- 3. pump -------------------------------------------------------------

    def pump(self, rnd: int, server: str, img: str, metric: str = "pump-full") -> None:
        """A full backup of ``img``, start to concluded; ``metric`` pump-full or pump-sparse."""
        bk = str(self.ws / "bk.img")
        rm(bk)
        size = os.path.getsize(img)
        gib = (self.args.sparse_data if metric == "pump-sparse" else size) / common.GiB
        s = start(self.procs, self.ws, server, img, backup_tgt=bk if server == QEMU else None)
        try:
            def run() -> float:
                t0 = time.perf_counter()
                if server in (OURS, BASELINE):
                    ours_backup(s, "full", bk, snapshot=None)
                else:
                    s.qmp("blockdev-backup", {"job-id": "j", "device": "src", "target": "bk",
                                              "sync": "full", "auto-dismiss": False})
                j = s.qmp.wait_concluded("j")
                dt = time.perf_counter() - t0
                if j.get("error"):
                    raise RuntimeError(f"backup failed: {j}")
                return dt
            dt, cpu = self.timed(s, metric, run)
            if rnd == 0 and self.spy_dir is None:
                self._check_same(img, bk, f"{server} backup target")
            if server == OURS and rnd == 0:
                self.res.meta.setdefault("ours_pump_job", s.qmp("query-jobs"))
            s.qmp("job-dismiss", {"id": "j"})
        finally:
            s.close()
            rm(bk)
        self.record(metric, server, size / dt / 1e6)
        self.record(f"{metric}:cpu", server, cpu / gib)
        self.log(rnd, server, metric, size / dt / 1e6, "MB/s", cpu / gib, "cpu-s/GiB")

    def qemu_img(self, rnd: int, img: str, metric: str = "pump-full") -> None:
        """``qemu-img convert`` of ``img`` into a fresh file, twice: plain
        (target ``cache=unsafe``: never flushed, its copy ends in the page
        cache and this bench deletes it before it is written back) and ``-t
        writeback`` (one fdatasync at the end: the same durability as our
        job's ``concluded``, the comparison the goal applies to).  The two
        alternate order per round (the first one after a backup pays for
        page-cache pages that are not warm)."""
        bk = str(self.ws / "bk.img")
        size = os.path.getsize(img)
        gib = (self.args.sparse_data if metric == "pump-sparse" else size) / common.GiB
        runs = [(QEMU_IMG, [], "convert"), (QEMU_IMG_SYNC, ["-t", "writeback"], "convert -t wb")]
        if rnd % 2:
            runs.reverse()
        for who, opts, what in runs:
            rm(bk)
            common.fsync_file(img)
            try:
                dt, cpu = common.run_timed_cpu(["qemu-img", "convert", *opts, "-f", "raw", "-O", "raw", img, bk])
                if rnd == 0:
                    self._check_same(img, bk, f"qemu-img {what} target")
            finally:
                rm(bk)
            self.record(metric, who, size / dt / 1e6)
            self.record(f"{metric}:cpu", who, cpu / gib)
            self.log(rnd, who, f"{metric} ({what})", size / dt / 1e6, "MB/s", cpu / gib, "cpu-s/GiB")

    @staticmethod
    def _check_same(a: str, b: str, what: str) -> None:
        r = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", a, b])
        if r.returncode != 0:
            raise RuntimeError(f"{what} differs from the source image (qemu-img compare exit {r.returncode})")

    def make_sparse_image(self) -> str:
        """The pump-sparse source: --sparse-size bytes, --sparse-data of random 4 MiB pieces."""
        path = str(self.ws / "sparse.img")
        size, piece = self.args.sparse_size, 4 * common.MiB
        n = max(1, self.args.sparse_data // piece)
        stride = size // n
        blob = os.urandom(piece)
        with open(path, "wb") as f:
            f.truncate(size)
            for i in range(n):
                off = i * stride + ((i * 7919 * common.MiB) % max(1, stride - piece))
                os.pwrite(f.fileno(), blob, off & ~(common.MiB - 1))
        common.fsync_file(path)
        return path

    # -- driver --------------------------------------------------------------

    def run(self) -> Results:
        a = self.args
        self.res.meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "commit": common.git_commit(), "machine": common.machine_info(),
            "size": a.size, "rounds": a.rounds, "only": sorted(a.only), "dir": str(self.ws),
            "versions": {"qemu-storage-daemon": common.tool_version(["qemu-storage-daemon", "--version"]),
                         "qemu-img": common.tool_version(["qemu-img", "--version"]),
                         "nbdcopy": common.tool_version(["nbdcopy", "--version"])},
            "qsd_argv_fleecing": qsd_argv(Path("WS"), "IMG", "TGT"),
            "ours_cmd": OURS_CMD, "ours_cluster_size": OURS_CLUSTER[0] if OURS_CLUSTER else None,
            "loadavg_start": os.getloadavg(), "loadavg_rounds": [],
        }
        img = str(self.ws / "work.img")
        sparse = self.make_sparse_image() if "sparse" in a.only else None
        servers = [OURS] if self.spy_dir is not None else a.servers
        for rnd in range(a.rounds):
            order = servers if rnd % 2 == 0 else servers[::-1]
            for server in order:
                shutil.copyfile(self.base, img)  # fresh copy per (round, server)
                if "live" in a.only:
                    self.live(rnd, server, img)
                if "snap" in a.only:
                    self.snap_idle(rnd, server, img)
                    self.snap_pump(rnd, server, img)
                pumps = [OURS, BASELINE] if a.baseline else [OURS]
                if server == OURS and rnd % 2:
                    pumps.reverse()  # ours and the baseline alternate too
                if "pump" in a.only:
                    for who in (pumps if server == OURS else [server]):
                        self.pump(rnd, who, img)
                if sparse is not None and server == OURS:
                    for who in pumps:
                        self.pump(rnd, who, sparse, "pump-sparse")
            if "pump" in a.only and self.spy_dir is None and QEMU in a.servers:
                self.qemu_img(rnd, img)
            if sparse is not None and self.spy_dir is None:
                self.qemu_img(rnd, sparse, "pump-sparse")
            self.res.meta["loadavg_rounds"].append(os.getloadavg())
        rm(img)
        if sparse is not None:
            rm(sparse)
        self.res.meta["live_4k_writes_done"] = self.counts
        self.res.meta["loadavg_end"] = os.getloadavg()
        return self.res


# --------------------------------------------------------------------------
# report

def _f(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "x":
        return f"{v:.2f}x"
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def report(res: Results, markdown: bool = False) -> str:
    """Two tables: live-write ratios side by side, then nbdbackup vs QEMU."""
    med = res.med
    rows1 = []
    for name in LIVE:
        if f"{name}:ratio" not in res.samples:
            continue
        unit = METRICS[f"{name}:with"].unit
        rq, ro = med(f"{name}:ratio", QEMU), med(f"{name}:ratio", OURS)
        rows1.append([name, unit,
                      _f(med(f"{name}:without", QEMU)), _f(med(f"{name}:with", QEMU)), _f(rq, "x"),
                      _f(med(f"{name}:without", OURS)), _f(med(f"{name}:with", OURS)), _f(ro, "x"),
                      f">= {GOALS[name]:.1f}x", f"{QEMU72_ISSUE[name]:.2f}x",
                      _f(med(f"{name}:cpu-ratio", QEMU), "x"), _f(med(f"{name}:cpu-ratio", OURS), "x"),
                      _f(med(f"{name}:cpu-with", OURS)) + " / " + _f(med(f"{name}:cpu-without", OURS))])
    head1 = ["live writes", "unit", "qemu w/o", "qemu with", "qemu ratio", "ours w/o", "ours with",
             "ours ratio", "goal", "issue qemu", "qemu cpu-ratio", "ours cpu-ratio", "ours cpu with/w/o"]
    rows2 = []
    for name, others in (("snap-read-idle", [QEMU]), ("snap-read-pump", [QEMU]),
                         ("pump-full", [QEMU, QEMU_IMG, QEMU_IMG_SYNC, BASELINE]),
                         ("pump-sparse", [QEMU_IMG, QEMU_IMG_SYNC, BASELINE])):
        if name not in res.samples:
            continue
        for o in others:
            if med(name, o) is None:
                continue
            r = res.ratio(name, OURS, o)
            # Plain qemu-img never flushes (its copy is not durable when it
            # exits, ours is when the job concludes): not the same work, so
            # the goal applies to `-t writeback` (module docstring, 4.).
            goal = "- (no flush)" if o == QEMU_IMG else f">= {GOALS[name]:.1f}x"
            rows2.append([name, "MB/s", _f(med(name, OURS)), o, _f(med(name, o)), _f(r, "x"),
                          goal, _f(med(f"{name}:cpu", OURS)) + " / " + _f(med(f"{name}:cpu", o))])
    head2 = ["throughput", "unit", "nbdbackup", "vs", "other", "ratio", "goal", "cpu-s/GiB ours/other"]
    out = []
    for head, rows in ((head1, rows1), (head2, rows2)):
        if not rows:
            continue
        if markdown:
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join("---" for _ in head) + "|")
            out += ["| " + " | ".join(r) + " |" for r in rows]
        else:
            w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
            out.append("  ".join(h.ljust(k) for h, k in zip(head, w)))
            out.append("  ".join("-" * k for k in w))
            out += ["  ".join(str(x).ljust(k) for x, k in zip(r, w)) for r in rows]
        out.append("")
    return "\n".join(out)


def print_profiles(outputs: list[tuple[str, Path, float]], top: int) -> None:
    for label, path, cpu in outputs:
        print(f"=== {label}: server used {cpu:.2f} CPU-s -> {path}")
        if path.exists():
            agg = common.aggregate_collapsed(path, strip_prefix=str(common.REPO_DIR) + "/")
            print(common.format_profile(agg, top=top))
        else:
            print("  (no py-spy output)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3; median reported)")
    ap.add_argument("--only", default="live,snap,pump,sparse",
                    help="comma-separated groups: live,snap,pump,sparse")
    ap.add_argument("--sparse-size", default="1T", help="pump-sparse: virtual size of the image (default 1T)")
    ap.add_argument("--sparse-data", default="1G", help="pump-sparse: data in it (default 1G)")
    ap.add_argument("--dir", default="/tmp",
                    help="where the images live (default /tmp; see the README about tmpfs)")
    ap.add_argument("--max-seconds", type=float, default=4.0,
                    help="live-4k-uncopied: stop issuing writes after this many seconds (default 4)")
    ap.add_argument("--servers", default=f"{QEMU},{OURS}", help=f"comma-separated: {QEMU},{OURS}")
    ap.add_argument("--ours-cmd", metavar="CMD",
                    help="command (split on spaces) replacing 'python -m nbdbackup.cli' (an experiment)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="pump groups: also run another checkout's nbdbackup (DIR/.venv), interleaved with ours")
    ap.add_argument("--qemu-img-sync", action="store_true",
                    help="(default now, kept for old command lines) pump groups: 'qemu-img convert -t "
                         "writeback' is always timed next to the plain one")
    ap.add_argument("--cluster-size", metavar="N",
                    help="backup-start's cluster-size for nbdbackup's backups (default: the server's own); "
                         "QEMU keeps its 64 KiB")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--no-json", action="store_true", help="do not write bench/results/*.json")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    ap.add_argument("--profile", metavar="DIR", help="only nbdbackup, under py-spy; print profiles")
    ap.add_argument("--top", type=int, default=25, help="with --profile: frames shown")
    args = ap.parse_args(argv)
    common.warm_guest_memory()  # before any file is made: docs in bench/common.py
    args.size = common.parse_size(args.size)
    args.sparse_size = common.parse_size(args.sparse_size)
    args.sparse_data = common.parse_size(args.sparse_data)
    if args.ours_cmd:
        OURS_CMD[:] = args.ours_cmd.split()
    if args.cluster_size:
        OURS_CLUSTER[:] = [common.parse_size(args.cluster_size)]
    if args.baseline:
        base = os.path.abspath(args.baseline)
        BASELINE_DIR[:] = [base]
        BASELINE_CMD[:] = ["env", "-C", base, os.path.join(base, ".venv", "bin", "python"), "-m", "nbdbackup.cli"]
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    if not args.only <= {"live", "snap", "pump", "sparse"}:
        ap.error("--only takes live, snap, pump, sparse")
    args.servers = [x.strip() for x in args.servers.split(",") if x.strip()]
    if not args.servers or not set(args.servers) <= {QEMU, OURS}:
        ap.error(f"--servers takes {QEMU}, {OURS}")
    if args.size % (1 << 20):
        ap.error("--size must be a multiple of 1 MiB")
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        if args.rounds == 3:
            args.rounds = 1

    common.sigterm_as_interrupt()
    ws = Path(tempfile.mkdtemp(prefix="bkbench-", dir=args.dir))
    t_start = time.perf_counter()
    try:
        with Procs() as procs:
            base = str(ws / "base.img")
            print(f"making a {args.size / common.MiB:.0f} MiB random image in {ws}", flush=True)
            common.make_random_file(base, args.size)
            bench = Bench(args, ws, procs, base)
            res = bench.run()
    except KeyboardInterrupt:
        print("interrupted; servers stopped, temp files removed", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {ws}", file=sys.stderr)
        else:
            shutil.rmtree(ws, ignore_errors=True)
    res.meta["wall_seconds"] = time.perf_counter() - t_start
    if args.profile:
        print_profiles(bench.spy_outputs, args.top)
        return 0
    print()
    la = res.meta["loadavg_start"], res.meta["loadavg_end"]
    print(f"backup bench: {args.size / common.MiB:.0f} MiB image in {args.dir}, {args.rounds} rounds, "
          f"median; {res.meta['date']}; load avg start {la[0][0]:.1f} end {la[1][0]:.1f}; "
          f"{res.meta['wall_seconds']:.0f} s; commit {res.meta['commit']}")
    print(report(res))
    if args.markdown:
        print(report(res, markdown=True))
    if not args.no_json:
        print(f"results: {common.write_json(res, OURS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
