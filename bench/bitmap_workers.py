#!/usr/bin/env python3
"""Random 4 KiB writes to an export with a persistent dirty bitmap: served by
the server process (before, the baseline checkout) or by worker processes
(after, this checkout), in steady state and at first touch.

Each (round, config, mode) slot starts a fresh ``nbdbackup serve --socket S
--workers N --state-dir D disk=IMG`` on the same allocated image (written in
4 KiB writes and fsync'ed: 4 KiB folios, so a pwrite costs ~1.5 us and the
metric measures the server's own per-request cost, as servers.py's
``randwrite-4k-alloc``), with one persistent bitmap ``b0`` made in ``D``
beforehand, and drives it with one libnbd connection, 32 writes in flight
(0.3 s warm-up, then ``--duration`` s; ``--conns N``: N connections at
once, one client process each).  Rounds alternate the configs.

Modes:
- ``steady``: b0 has 64 KiB granules, every bit set beforehand: no write
  sets a new bit (a VM rewriting the areas it keeps writing);
- ``first64``: b0 has 64 KiB granules (the default), empty; random 4 KiB
  writes as in ``steady``: at first nearly every write sets a new bit (the
  worker asks the server process to mark it first), fewer and fewer as
  the granules fill (a VM right after a backup cleared its bitmap);
- ``first``: b0 has 4 KiB granules, empty; the writes go to distinct 4 KiB
  blocks in random order (a permutation of the image), so every write
  sets a new bit: the worst case for workers;
- ``none``: no bitmap (the plain-worker reference).

Figures: IOPS, and the server's CPU (its whole process tree: workers
included) per request, warm-up included, and the part of it spent in the
server process itself (where a bitmap export's writes ran before).

Usage: ``bench/bitmap_workers.py [--baseline /work/main] [--size 1G]
[--rounds 3] [--duration 2] [--modes steady,first,none] [--configs ...]``.
Invariant: every process started here is stopped by PID; the temp dir is removed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from common import Procs, Workspace  # noqa: E402
from servers import make_small_folio_file  # noqa: E402

from nbdbackup.bitmap.dirty import DirtyBitmap  # noqa: E402
from nbdbackup.bitmap.store import BitmapStore  # noqa: E402

BLOCK = 4096


def make_state(state: str, size: int, granularity: int, fill: bool) -> None:
    shutil.rmtree(state, ignore_errors=True)
    store = BitmapStore(state)
    store.load_all("disk", size)
    bm = DirtyBitmap("b0", size, granularity)
    if fill:
        bm.bits.set(0, bm.nbits)
    store.create("disk", bm)
    store.close_clean()


def drive(uri: str, offsets: list[int], duration: float, qd: int = 32) -> tuple[float, int]:
    """(IOPS over the timed phase, requests completed in all) writing ``offsets`` in order."""
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(BLOCK)))
        done, errors = [0], [0]

        def cb(err):
            done[0] += 1
            if err.value:
                errors[0] += 1
            return 1

        i, n = 0, len(offsets)
        for phase in (0.3, duration):
            start = done[0]
            t0 = time.perf_counter()
            end = t0 + phase
            while True:
                while h.aio_in_flight() < qd:
                    if i >= n:
                        raise RuntimeError("ran out of distinct offsets: a larger --size")
                    h.aio_pwrite(buf, offsets[i], completion=cb)
                    i += 1
                h.poll(-1)
                if time.perf_counter() >= end:
                    break
            elapsed = time.perf_counter() - t0
            ops = done[0] - start
        while h.aio_in_flight() > 0:
            h.poll(-1)
        if errors[0]:
            raise RuntimeError(f"{errors[0]} writes failed")
        return ops / elapsed, done[0]
    finally:
        common.nbd_shutdown_quietly(h)


def drive_many(uri: str, offsets: list[int], duration: float, conns: int) -> tuple[float, int]:
    """`drive` over ``conns`` connections at once (one client process each,
    disjoint slices of ``offsets``): (summed IOPS, summed requests)."""
    if conns == 1:
        return drive(uri, offsets, duration)
    import multiprocessing

    step = len(offsets) // conns
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(conns)
    try:
        res = pool.starmap(drive, [(uri, offsets[i * step:(i + 1) * step], duration) for i in range(conns)])
    finally:
        pool.close()
        pool.join()
    return sum(r[0] for r in res), sum(r[1] for r in res)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="/work/main", help="checkout of the 'before' code")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--modes", default="steady,first64,first,none")
    ap.add_argument("--conns", type=int, default=1, help="client connections at once (default 1)")
    ap.add_argument("--configs", default="base-w0,base-w2,new-w0,new-w2",
                    help="CHECKOUT-wN[:VAR=VALUE...]: base (the baseline) or new (this checkout) with "
                         "N workers (and environment variables)")
    args = ap.parse_args(argv)
    common.warm_guest_memory()  # before any file is made: docs in bench/common.py
    common.sigterm_as_interrupt()
    size = common.parse_size(args.size)
    nblocks = size // BLOCK
    modes = args.modes.split(",")
    configs = args.configs.split(",")
    here = str(Path(__file__).resolve().parent.parent)
    roots = {"base": os.path.abspath(args.baseline), "new": here}
    rng = random.Random(1)
    steady_offsets = [rng.randrange(nblocks) * BLOCK for _ in range(1 << 20)]
    first_offsets = [b * BLOCK for b in range(nblocks)]
    rng.shuffle(first_offsets)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    print(f"load at start: {os.getloadavg()}", flush=True)
    with Workspace("nbdbmw-") as ws, Procs() as procs:
        img = str(ws.path / "disk.img")
        make_small_folio_file(img, size)
        state = str(ws.path / "state")
        for rnd in range(args.rounds):
            for mode in modes:
                for cfg in configs:
                    name, *assigns = cfg.split(":")
                    which, w = name.split("-w")
                    root = roots[which]
                    py = os.path.join(root, ".venv", "bin", "python")
                    if not os.path.exists(py):
                        py = sys.executable
                    extra = []
                    if mode != "none":
                        make_state(state, size, BLOCK if mode == "first" else 65536, mode == "steady")
                        extra = ["--state-dir", state]
                    sock = ws.socket(f"{len(results)}")
                    if os.path.exists(sock):
                        os.unlink(sock)
                    # (cwd too: ``python -m`` puts it first on sys.path)
                    env = dict(os.environ, PYTHONPATH=root, NBDBACKUP_WORKERS=w)
                    env.update(a.split("=", 1) for a in assigns)
                    p = procs.start(name, [py, "-m", "nbdbackup.cli", "serve", "--socket", sock,
                                          "--workers", w, *extra, f"disk={img}"],
                                    log_path=ws.path / f"{name}.log", env=env, cwd=root)
                    common.wait_for_unix(sock, proc=p)
                    time.sleep(0.3)
                    uri = f"nbd+unix:///disk?socket={sock}"
                    c0 = common.proc_tree_cpu_seconds(p.pid)
                    o0 = common.proc_cpu_seconds(p.pid)
                    iops, n = drive_many(uri, steady_offsets if mode != "first" else first_offsets,
                                         args.duration, args.conns)
                    c1 = common.proc_tree_cpu_seconds(p.pid)
                    o1 = common.proc_cpu_seconds(p.pid)
                    procs.stop(p)
                    cpu_us = (c1 - c0) / n * 1e6
                    own_us = (o1 - o0) / n * 1e6
                    results.setdefault((mode, cfg), []).append((iops, cpu_us, own_us))
                    print(f"round {rnd} {mode:6} {cfg:8} {iops:9.0f} IOPS {cpu_us:6.2f} cpu-us/op "
                          f"(server process {own_us:5.2f}; load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\nmedians of {args.rounds} rounds (load at end: {os.getloadavg()}):")
    print(f"{'mode':7} {'config':8} {'IOPS':>9} {'cpu-us/op':>10} {'of which server process':>24}")
    for (mode, cfg), vals in results.items():
        print(f"{mode:7} {cfg:8} {common.median(v[0] for v in vals):9.0f} "
              f"{common.median(v[1] for v in vals):10.2f} {common.median(v[2] for v in vals):24.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
