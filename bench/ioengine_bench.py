#!/usr/bin/env python3
"""What each I/O engine costs the event-loop thread, per operation.

Role: the figure behind `blockdev.ioengine`'s choices, isolated from NBD:
on one event loop, keep ``--qd`` writes (or reads) of ``--bs`` bytes in
flight against a file in the page cache for ``--ops`` operations, through
each engine's callback API (what the server's task-free WRITE path uses),
and through a plain inline ``os.pwrite``/``os.preadv`` on the loop thread
(the ``sync`` engine's small-I/O path).  Rounds alternate the engines.

Printed per engine (median over rounds): operations per second (wall),
loop-thread CPU per operation (``time.thread_time``: what the engine costs
the thread that parses and answers NBD requests), and process CPU per
operation (``time.process_time``: every thread, io_uring's io-wq workers
included, as they are threads of this process).  Loop-thread CPU is the
figure that is least disturbed by neighbours on a shared machine; wall
rates are not.

Usage: .venv/bin/python bench/ioengine_bench.py [--bs 4K,64K,1M] [--ops 20000]
[--qd 32] [--rounds 3] [--read] [--engines inline,io_uring,threads] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nbdbackup.blockdev import ioengine as io  # noqa: E402
from nbdbackup.blockdev import parse_size  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from servers import make_small_folio_file  # noqa: E402  (same directory)


def run_one(engine: str, path: str, bs: int, ops: int, qd: int, read: bool, span: int) -> tuple[float, float, float]:
    """(ops/s, loop-thread CPU us/op, process CPU us/op)."""
    async def main():
        fd = os.open(path, os.O_RDWR)
        bufs = [bytearray(os.urandom(bs)) for _ in range(qd)]
        nblocks = span // bs
        state = {"issued": 0, "done": 0}
        finished = asyncio.get_running_loop().create_future()
        try:
            if engine == "inline":
                t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
                for i in range(ops):
                    off = (i * 7919 % nblocks) * bs
                    if read:
                        os.preadv(fd, [bufs[i % qd]], off)
                    else:
                        os.pwrite(fd, bufs[i % qd], off)
                    if i % 64 == 0:
                        await asyncio.sleep(0)
                return ops / (time.perf_counter() - t0), (time.thread_time() - c0) / ops * 1e6, \
                    (time.process_time() - p0) / ops * 1e6
            io.reset()
            io.select(engine)
            eng = io.for_loop()

            def issue(slot: int) -> None:
                i = state["issued"]
                state["issued"] = i + 1
                off = (i * 7919 % nblocks) * bs
                if read:
                    eng.read(fd, bufs[slot], off, lambda err, s=slot: done(err, s))
                else:
                    eng.write(fd, bufs[slot], off, 0, lambda err, s=slot: done(err, s))

            def done(err: int, slot: int) -> None:
                if err:
                    finished.set_exception(OSError(err, os.strerror(err)))
                    return
                state["done"] += 1
                if state["issued"] < ops:
                    issue(slot)
                elif state["done"] == ops and not finished.done():
                    finished.set_result(None)

            t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
            for s in range(qd):
                issue(s)
            await finished
            return ops / (time.perf_counter() - t0), (time.thread_time() - c0) / ops * 1e6, \
                (time.process_time() - p0) / ops * 1e6
        finally:
            os.close(fd)
            io.reset()

    return asyncio.run(main())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bs", default="4K,64K,1M", help="block sizes (comma-separated)")
    ap.add_argument("--ops", type=int, default=20000, help="operations per 4 KiB run (scaled down for larger blocks)")
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--read", action="store_true", help="reads instead of writes")
    ap.add_argument("--engines", default="inline,io_uring,threads")
    ap.add_argument("--dir", default="/tmp")
    args = ap.parse_args()
    import common  # bench/common.py: touch fresh guest memory once per boot
    common.warm_guest_memory()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "io_uring" in engines and io.probe_io_uring():
        print(f"io_uring unavailable: {io.probe_io_uring()}; skipped")
        engines.remove("io_uring")
    span = 256 << 20
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="ioengine-bench-") as d:
        path = os.path.join(d, "f")
        # Allocated, written in 4 KiB writes and fsync'ed, so it is cached in
        # 4 KiB folios (see bench/servers.py randwrite-4k-alloc: a 4 KiB write
        # into a clean large folio costs ext4 ~12 us and hides the engines).
        make_small_folio_file(path, span)
        print(f"{'read' if args.read else 'write'} QD {args.qd}, 256 MiB file in the page cache (4 KiB folios); "
              f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"{'bs':>6} {'engine':>9} {'ops/s':>10} {'loop us/op':>11} {'proc us/op':>11}")
        for bs_text in args.bs.split(","):
            bs = parse_size(bs_text)
            ops = max(500, args.ops * 4096 // bs)
            res: dict[str, list[tuple[float, float, float]]] = {e: [] for e in engines}
            for _ in range(args.rounds):
                for e in engines:
                    res[e].append(run_one(e, path, bs, ops, args.qd, args.read, span))
            for e in engines:
                rate = statistics.median(r[0] for r in res[e])
                loop = statistics.median(r[1] for r in res[e])
                proc = statistics.median(r[2] for r in res[e])
                print(f"{bs_text:>6} {e:>9} {rate:10,.0f} {loop:11.2f} {proc:11.2f}")
        print(f"load at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
