#!/usr/bin/env python3
"""NBD server throughput: `nbdbackup serve` against nbdkit, qemu-nbd, qemu-storage-daemon.

Role: serve the SAME raw image (random data, page cache warm) from each
server in turn and measure what a backup client sees:

- ``read-seq``        full sequential read, ``nbdcopy URI null:`` (nbdcopy's
                      default: 4 connections if the server offers multi-conn, else 1)
- ``read-seq-1conn``  the same with ``nbdcopy --connections=1``
- ``write-seq``       full write, ``nbdcopy SRC URI`` (SRC a second random,
                      cached image; no ``--flush``: we time the server path into
                      the page cache, not the disk -- the image is fsync'ed
                      outside the timed section before each write round)
- ``randread-4k``     4 KiB random reads, 32 in flight, one libnbd connection, IOPS
- ``randwrite-4k``    4 KiB random writes, 32 in flight, one libnbd connection, IOPS
                      (the image was written in 8 MiB writes, so the kernel caches
                      it in large folios: each 4 KiB write into a clean large folio
                      costs ext4 ~12 us of kernel time on Linux 6.18, for every
                      server alike, which hides the servers' own cost)
- ``randwrite-4k-alloc`` the same on a second, allocated image that was written
                      in 4 KiB writes and fsync'ed, so it is cached in 4 KiB
                      folios: a 4 KiB pwrite then costs ~1.5 us and the metric
                      measures the servers' own per-request cost
- ``read-seq-tcp``    ``read-seq`` over TCP on 127.0.0.1
- ``randzero-4k``, ``randtrim-4k`` (only with ``--only``: they punch or zero
                      the image every later metric would read) 4 KiB random
                      WRITE_ZEROES (NO_HOLE) / TRIM, 32 in flight, 1 conn, IOPS
- ``write-seq-tcp``   ``write-seq`` over TCP on 127.0.0.1 (where our server
                      splices large WRITE payloads without a copy out of the socket)

Rounds alternate servers (A B C A B C ...) so drift (thermal, page cache,
other load) spreads over all of them; each (round, server) slot starts a
fresh server process, warms the cache, runs every selected metric in a fixed
order, and stops it by PID.  The table shows medians and ratios
nbdbackup/other (> 1.0x: nbdbackup is faster).

Usage: ``bench/servers.py [--size 1G] [--rounds 3] [--only METRIC,...]
[--servers nbdbackup,nbdkit,qemu-nbd,qsd] [--duration 3] [--keep]
[--io-engine io_uring,threads,sync]`` (each engine as its own column, nb-ENGINE)
``--profile DIR`` instead runs only nbdbackup under py-spy for each metric
and prints where its time goes.

Invariant: every process started here is stopped by PID and the temp dir is
removed, on success, error and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import Metric, Procs, Results, Workspace  # noqa: E402

OURS = "nbdbackup"
EXPORT = "disk"

METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("read-seq", "MB/s", description="nbdcopy URI null: (default connections), Unix socket"),
    Metric("read-seq-1conn", "MB/s", description="nbdcopy --connections=1 URI null:, Unix socket"),
    Metric("write-seq", "MB/s", description="nbdcopy SRC URI (no --flush), Unix socket"),
    Metric("randread-4k", "IOPS", description="libnbd aio_pread 4 KiB random, 32 in flight, 1 conn"),
    Metric("randwrite-4k", "IOPS", description="libnbd aio_pwrite 4 KiB random, 32 in flight, 1 conn"),
    Metric("randwrite-4k-alloc", "IOPS",
           description="randwrite-4k on an allocated image cached in 4 KiB folios"),
    Metric("read-seq-tcp", "MB/s", description="nbdcopy URI null: (default connections), TCP 127.0.0.1"),
    Metric("write-seq-tcp", "MB/s", description="nbdcopy SRC URI (no --flush), TCP 127.0.0.1"),
    Metric("randzero-4k", "IOPS", description="libnbd aio_zero 4 KiB NO_HOLE random, 32 in flight, 1 conn"),
    Metric("randtrim-4k", "IOPS", description="libnbd aio_trim 4 KiB random, 32 in flight, 1 conn"),
]}
#: Metrics that change the image for every later one: run only when asked.
OPT_IN_METRICS = {"randzero-4k", "randtrim-4k"}
DEFAULT_METRICS = [m for m in METRICS if m not in OPT_IN_METRICS]
TCP_METRICS = {"read-seq-tcp", "write-seq-tcp"}
WRITE_METRICS = {"write-seq", "write-seq-tcp", "randwrite-4k", "randwrite-4k-alloc", "randzero-4k", "randtrim-4k"}
#: Metrics served from the small-folio image (`make_small_folio_file`).
ALLOC_METRICS = {"randwrite-4k-alloc"}


def make_small_folio_file(path: str, size: int, block: int = 4096) -> None:
    """A new file of random data written ``block`` bytes at a time, then
    fsync'ed (so every block is allocated) and left in the page cache.

    Why: a file written (or read) in large requests is cached in large folios
    on recent kernels (ext4 since 6.16), and a 4 KiB write into a clean large
    folio costs ext4 ~12 us (``ext4_block_write_begin`` walks the folio's
    buffer heads); pages created by 4 KiB writes are 4 KiB folios, where a
    4 KiB pwrite costs ~1.5 us.  (Dropping the cache and re-reading in 4 KiB
    reads gives the same, but reads 1 GiB back from the disk in 4 KiB I/Os.)
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        chunk = 8 * common.MiB
        for base in range(0, size, chunk):
            data = memoryview(os.urandom(min(chunk, size - base)))
            for off in range(0, len(data), block):
                os.pwrite(fd, data[off:off + block], base + off)
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# servers

@dataclass
class Endpoint:
    """Where a started server listens: the NBD URI and how to wait for it."""
    uri: str
    unix: str | None = None
    tcp: tuple[str, int] | None = None


#: Command prefix that runs nbdbackup's CLI; ``--ours-cmd`` replaces it (e.g. a
#: wrapper script that patches an experiment in, or another checkout).
OURS_CMD = [common.VENV_PYTHON, "-m", "nbdbackup.cli"]
#: Extra nbdbackup variants, ``--variant NAME=CMD``: NAME -> command prefix,
#: served exactly like nbdbackup (to compare an experiment side by side).
VARIANTS: dict[str, list[str]] = {}


def server_argv(name: str, img: str, ws: Workspace, tcp_port: int | None) -> tuple[list[str], Endpoint]:
    """argv and endpoint for one server; Unix socket unless ``tcp_port``.

    Configurations (chosen to be each server's sensible default for a
    writable raw file export through the page cache):
    - nbdbackup: ``serve --socket S disk=IMG`` (uvloop when installed).
    - nbdkit: ``file`` plugin, foreground, default 16 threads, default cache.
    - qemu-nbd: ``-f raw --cache=writeback --aio=threads --shared=16 -t``.
    - qsd: qemu-storage-daemon, file node (cache.direct=off, aio=threads) +
      raw node, NBD export writable=on (multi-conn left at its default).
    """
    sock = ws.socket(name)
    host = "127.0.0.1"
    ep = (Endpoint(f"nbd://{host}:{tcp_port}/{EXPORT}", tcp=(host, tcp_port)) if tcp_port
          else Endpoint(f"nbd+unix:///{EXPORT}?socket={sock}", unix=sock))
    if name == "nbdbackup" or name in VARIANTS:
        where = ["--listen", f"{host}:{tcp_port}"] if tcp_port else ["--socket", sock]
        return [*VARIANTS.get(name, OURS_CMD), "serve", *where, f"{EXPORT}={img}"], ep
    if name == "nbdkit":
        where = ["-i", host, "-p", str(tcp_port)] if tcp_port else ["-U", sock]
        return ["nbdkit", *where, "-f", "file", img], ep
    if name == "qemu-nbd":
        where = ["-b", host, "-p", str(tcp_port)] if tcp_port else ["-k", sock]
        return ["qemu-nbd", *where, "-f", "raw", "-x", EXPORT, "--shared=16", "-t",
                "--cache=writeback", "--aio=threads", img], ep
    if name == "qsd":
        addr = (f"addr.type=inet,addr.host={host},addr.port={tcp_port}" if tcp_port
                else f"addr.type=unix,addr.path={sock}")
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={img},cache.direct=off,aio=threads",
                "--blockdev", "driver=raw,node-name=disk0,file=file0",
                "--nbd-server", addr,
                "--export", f"type=nbd,id=exp0,node-name=disk0,name={EXPORT},writable=on"], ep
    raise ValueError(f"unknown server {name!r}")


SERVERS = ["nbdbackup", "nbdkit", "qemu-nbd", "qsd"]
DEFAULT_SERVERS = ["nbdbackup", "nbdkit", "qemu-nbd", "qsd"]


def start_server(procs: Procs, name: str, img: str, ws: Workspace, tcp_port: int | None = None):
    argv, ep = server_argv(name, img, ws, tcp_port)
    if ep.unix and os.path.exists(ep.unix):
        os.unlink(ep.unix)
    env = dict(os.environ, PYTHONPATH=str(common.REPO_DIR))
    p = procs.start(name, argv, log_path=ws.path / f"{name}.log", env=env)
    if ep.unix:
        common.wait_for_unix(ep.unix, proc=p)
    else:
        common.wait_for_tcp(*ep.tcp, proc=p)
    return p, ep


def server_info(uri: str) -> dict:
    """Selected nbdinfo --json fields (what each server advertises)."""
    try:
        r = subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True, timeout=30)
        exp = json.loads(r.stdout)["exports"][0]
        keys = ("can_multi_conn", "can_flush", "can_fua", "can_zero", "can_trim", "can_cache",
                "block_size_preferred", "block_size_maximum")
        return {k: exp.get(k) for k in keys} | {"protocol": json.loads(r.stdout).get("protocol")}
    except (OSError, ValueError, KeyError, IndexError, subprocess.SubprocessError) as e:
        return {"error": str(e)}


# --------------------------------------------------------------------------
# measurements

def nbdcopy_read(uri: str, size: int, connections: int | None = None) -> float:
    argv = ["nbdcopy"] + ([f"--connections={connections}"] if connections else []) + [uri, "null:"]
    return size / common.run_timed(argv) / 1e6


def nbdcopy_write(src: str, uri: str, size: int) -> float:
    return size / common.run_timed(["nbdcopy", src, uri]) / 1e6


def rand_io(uri: str, size: int, write: bool, qd: int = 32, duration: float = 3.0,
            block: int = 4096, seed: int = 1, op: str = "") -> tuple[float, int]:
    """(IOPS, requests completed incl. warm-up) of 4 KiB random reads or writes with ``qd`` requests in flight.

    One libnbd handle; the loop keeps ``qd`` commands queued and calls
    ``poll(-1)``; completion callbacks count and auto-retire commands.
    A 0.3 s warm-up precedes the timed ``duration``.
    """
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        rng = random.Random(seed)
        nblocks = size // block
        offsets = [rng.randrange(nblocks) * block for _ in range(1 << 16)]
        mask = len(offsets) - 1
        buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(block))) if write else nbd.Buffer(block)
        done = [0]
        errors = [0]

        def cb(err):
            done[0] += 1
            if err.value:
                errors[0] += 1
            return 1  # auto-retire

        issue = h.aio_pwrite if write else h.aio_pread
        if op == "zero":
            def issue(_buf, off, completion):
                return h.aio_zero(block, off, completion=completion, flags=nbd.CMD_FLAG_NO_HOLE)
        elif op == "trim":
            def issue(_buf, off, completion):
                return h.aio_trim(block, off, completion=completion)
        i = polls = 0
        for phase_len in (0.3, duration):
            start_done = done[0]
            t0 = time.perf_counter()
            end = t0 + phase_len
            while True:
                while h.aio_in_flight() < qd:
                    issue(buf, offsets[i & mask], completion=cb)
                    i += 1
                h.poll(-1)
                if time.perf_counter() >= end:
                    break
                polls += 1
                if polls & 255 == 0:
                    common.check_interrupted()
            elapsed = time.perf_counter() - t0
            ops = done[0] - start_done
        while h.aio_in_flight() > 0:
            h.poll(-1)
        common.check_interrupted()
        if errors[0]:
            raise RuntimeError(f"{errors[0]} requests failed")
        return ops / elapsed, done[0]
    finally:
        common.nbd_shutdown_quietly(h)


def measure(metric: str, uri: str, size: int, src: str, img: str, duration: float) -> tuple[float, float]:
    """(value in the metric's unit, work done: bytes for MB/s metrics, requests for IOPS)."""
    if metric in ("read-seq", "read-seq-tcp"):
        return nbdcopy_read(uri, size), size
    if metric == "read-seq-1conn":
        return nbdcopy_read(uri, size, connections=1), size
    if metric in ("write-seq", "write-seq-tcp"):
        return nbdcopy_write(src, uri, size), size
    if metric == "randread-4k":
        return rand_io(uri, size, write=False, duration=duration)
    if metric in ("randwrite-4k", "randwrite-4k-alloc"):
        return rand_io(uri, size, write=True, duration=duration)
    if metric in ("randzero-4k", "randtrim-4k"):
        return rand_io(uri, size, write=True, duration=duration, op=metric[4:8])
    raise ValueError(metric)


def cpu_metric(metric: str) -> Metric:
    """The server-CPU-cost companion of a metric (lower is better)."""
    m = METRICS[metric]
    if m.unit == "IOPS":
        return Metric(f"{metric}:cpu", "cpu-us/op", higher_is_better=False,
                      description=f"server user+sys CPU per request during {metric} (incl. warm-up)")
    return Metric(f"{metric}:cpu", "cpu-s/GiB", higher_is_better=False,
                  description=f"server user+sys CPU seconds per GiB moved during {metric}")


def cpu_value(metric: str, cpu_s: float, work: float) -> float:
    if METRICS[metric].unit == "IOPS":
        return cpu_s / work * 1e6 if work else float("nan")
    return cpu_s / (work / common.GiB)


# --------------------------------------------------------------------------
# driver

def run_bench(args, ws: Workspace, procs: Procs, img: str, src: str, alloc_img: str | None) -> Results:
    res = Results("servers")
    for m in args.metrics:
        res.add_metric(METRICS[m])
    for m in args.metrics:
        res.add_metric(cpu_metric(m))
    res.meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "commit": common.git_commit(), "machine": common.machine_info(),
        "size": args.size, "rounds": args.rounds, "duration": args.duration,
        "servers": args.servers, "metrics": args.metrics,
        "versions": {"nbdkit": common.tool_version(["nbdkit", "--version"]),
                     "qemu-nbd": common.tool_version(["qemu-nbd", "--version"]),
                     "nbdcopy": common.tool_version(["nbdcopy", "--version"])},
        "argv": {s: server_argv(s, "IMG", ws, None)[0] for s in args.servers},
        "advertised": {},
        "loadavg_start": os.getloadavg(),
    }
    unix_metrics = [m for m in args.metrics if m not in TCP_METRICS and m not in ALLOC_METRICS]
    tcp_metrics = [m for m in args.metrics if m in TCP_METRICS]
    alloc_metrics = [m for m in args.metrics if m in ALLOC_METRICS]
    groups = (("unix", img, unix_metrics), ("tcp", img, tcp_metrics), ("unix", alloc_img, alloc_metrics))
    for rnd in range(args.rounds):
        for srv in args.servers:
            for transport, image, metrics in groups:
                if not metrics:
                    continue
                assert image is not None
                common.warm_cache(image)
                common.warm_cache(src)
                port = common.free_tcp_port() if transport == "tcp" else None
                p, ep = start_server(procs, srv, image, ws, port)
                try:
                    if rnd == 0 and transport == "unix" and image == img:
                        res.meta["advertised"][srv] = server_info(ep.uri)
                    for m in metrics:
                        if m in WRITE_METRICS:
                            common.fsync_file(image)  # same clean page-cache state for everyone
                        try:
                            cpu0 = common.proc_tree_cpu_seconds(p.pid)
                            v, work = measure(m, ep.uri, args.size, src, image, args.duration)
                            cpu = common.proc_tree_cpu_seconds(p.pid) - cpu0
                        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                            res.add_error(m, srv, str(e)[:500])
                            print(f"  round {rnd + 1} {srv:10} {m:18} ERROR {e}", file=sys.stderr)
                            continue
                        res.add(m, srv, v)
                        c = cpu_value(m, cpu, work)
                        res.add(f"{m}:cpu", srv, c)
                        print(f"  round {rnd + 1} {srv:10} {m:18} {v:12,.1f} {METRICS[m].unit:5}"
                              f"  server cpu {c:8.2f} {cpu_metric(m).unit}"
                              f"  load {os.getloadavg()[0]:.1f}", flush=True)
                finally:
                    procs.stop(p)
    res.meta["loadavg_end"] = os.getloadavg()
    return res


def run_profile(args, ws: Workspace, procs: Procs, img: str, src: str, alloc_img: str | None) -> None:
    """py-spy on nbdbackup while each metric runs in a loop for --duration s."""
    outdir = Path(args.profile)
    outdir.mkdir(parents=True, exist_ok=True)
    for m in args.metrics:
        image = alloc_img if m in ALLOC_METRICS else img
        assert image is not None
        common.warm_cache(image)
        port = common.free_tcp_port() if m in TCP_METRICS else None
        p, ep = start_server(procs, OURS, image, ws, port)
        try:
            out = outdir / f"{m}.txt"
            spy = common.py_spy_start(procs, p.pid, args.duration, out, native=args.native)
            perf = None
            if shutil.which("perf"):
                perf = procs.start("perf", ["perf", "stat", "-p", str(p.pid), "-e",
                                            "task-clock,context-switches,cpu-migrations,page-faults",
                                            "--", "sleep", str(args.duration)],
                                   log_path=outdir / f"{m}.perf-stat.txt")
            time.sleep(0.3)
            n = 0
            cpu0, t0 = common.proc_tree_cpu_seconds(p.pid), time.perf_counter()
            while spy.alive():
                measure(m, ep.uri, args.size, src, image, min(args.duration, 2.0))
                n += 1
            util = (common.proc_tree_cpu_seconds(p.pid) - cpu0) / (time.perf_counter() - t0)
            procs.stop(spy)
            if perf is not None:
                perf.popen.wait(args.duration + 10)
                procs.stop(perf)
        finally:
            procs.stop(p)
        print(f"=== {m} ({n} runs while sampling; server used {util:.2f} CPUs) -> {out}")
        if perf is not None and perf.log_path and perf.log_path.exists():
            print(perf.log_tail(14))
        if out.exists():
            for by_function in (True, False):
                print(f"--- by {'function' if by_function else 'line'}")
                agg = common.aggregate_collapsed(out, by_function=by_function)
                print(common.format_profile(agg, top=args.top))


def variant_ratios(res: Results, variants: list[str], others: list[str]) -> str:
    """Each variant (e.g. each I/O engine) against each other server: ratio of
    medians on a higher-is-better scale (CPU rows: lower CPU gives > 1)."""
    head = ["metric"] + [f"{v}/{o}" for v in variants for o in others]
    rows = [head]
    for name in res.samples:
        row = [name]
        for v in variants:
            for o in others:
                r = res.ratio(name, v, o)
                row.append("-" if r is None else f"{r:.2f}x")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per server (default 3; median reported)")
    ap.add_argument("--only", default=",".join(DEFAULT_METRICS),
                    help="comma-separated metrics: " + ",".join(METRICS))
    ap.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                    help="comma-separated servers: " + ",".join(SERVERS))
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per random-I/O run (default 3)")
    ap.add_argument("--ours-cmd", metavar="CMD",
                    help="command (split on spaces) replacing 'python -m nbdbackup.cli' for nbdbackup")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=CMD",
                    help="also run nbdbackup through CMD under the name NAME (repeatable; "
                         "add NAME to --servers or it is appended).  'python -m' puts the current "
                         "directory first on sys.path, so another checkout needs its own directory: "
                         "'main=env -C /work/main PYTHONPATH=/work/main /work/main/.venv/bin/python "
                         "-m nbdbackup.cli'; the batch path off: "
                         "'nobatch=env NBDBACKUP_SERVER_BATCH=0 .venv/bin/python -m nbdbackup.cli'")
    ap.add_argument("--io-engine", metavar="ENGINE,...",
                    help="also serve nbdbackup with each I/O engine (io_uring, threads, sync, auto) as "
                         "variant nb-ENGINE (NBDBACKUP_IO_ENGINE=ENGINE); with --profile: the engine profiled")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (images, logs)")
    ap.add_argument("--no-json", action="store_true", help="do not write bench/results/*.json")
    ap.add_argument("--profile", metavar="DIR", help="profile nbdbackup with py-spy instead of comparing")
    ap.add_argument("--native", action="store_true", help="with --profile: include native frames")
    ap.add_argument("--top", type=int, default=25, help="with --profile: frames shown")
    args = ap.parse_args(argv)
    common.warm_guest_memory()  # before any file is made: docs in bench/common.py
    args.size = common.parse_size(args.size)
    if args.ours_cmd:
        OURS_CMD[:] = args.ours_cmd.split()
    args.metrics = [m.strip() for m in args.only.split(",") if m.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for m in args.metrics:
        if m not in METRICS:
            ap.error(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
    for v in args.variant:
        name, sep, cmd = v.partition("=")
        if not sep or not name or not cmd or name in SERVERS:
            ap.error(f"bad --variant {v!r}: expected NAME=CMD with a new NAME")
        VARIANTS[name] = cmd.split()
        if name not in args.servers:
            args.servers.append(name)
    engines = [e.strip() for e in (args.io_engine or "").split(",") if e.strip()]
    if args.profile and engines:
        if len(engines) != 1:
            ap.error("--profile takes one --io-engine")
        os.environ["NBDBACKUP_IO_ENGINE"] = engines[0]
    elif engines:
        for e in engines:
            name = f"nb-{e}"
            VARIANTS[name] = ["env", f"NBDBACKUP_IO_ENGINE={e}", *OURS_CMD]
            if name not in args.servers:
                args.servers.append(name)
    for s in args.servers:
        if s not in SERVERS and s not in VARIANTS:
            ap.error(f"unknown server {s!r}; choose from {', '.join(SERVERS)}")
    if args.size % 4096:
        ap.error("--size must be a multiple of 4096")

    common.sigterm_as_interrupt()
    try:
        with Workspace("nbdbench-", keep=args.keep) as ws, Procs() as procs:
            img, src = str(ws.path / "disk.img"), str(ws.path / "src.img")
            print(f"making {args.size / common.MiB:.0f} MiB random images in {ws.path}", flush=True)
            common.make_random_file(img, args.size)
            common.make_random_file(src, args.size)
            common.warm_cache(img)
            common.warm_cache(src)
            alloc_img = None
            if ALLOC_METRICS.intersection(args.metrics):
                alloc_img = str(ws.path / "alloc.img")
                make_small_folio_file(alloc_img, args.size)
            if args.profile:
                run_profile(args, ws, procs, img, src, alloc_img)
                return 0
            res = run_bench(args, ws, procs, img, src, alloc_img)
    except KeyboardInterrupt:
        print("interrupted; servers stopped, temp files removed", file=sys.stderr)
        return 130
    print()
    print(f"servers bench: {args.size / common.MiB:.0f} MiB image, {args.rounds} rounds, median; "
          f"commit {res.meta['commit']}")
    print(common.format_table(res, args.servers, OURS))
    variants = [s for s in args.servers if s in VARIANTS]
    others = [s for s in args.servers if s not in VARIANTS and s != OURS]
    if variants and others:
        print()
        print(variant_ratios(res, variants, others))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.no_json:
        print(f"results: {common.write_json(res, OURS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
