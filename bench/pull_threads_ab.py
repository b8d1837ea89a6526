"""Benchmark: the pull's threaded receive against the event-loop receive, in one process.

Role: an A/B of `agent.pullthreads` without interpreter start-up or
process noise: one nbdkit (``file`` plugin, random image in the page cache,
Unix socket) and one Python process; each round pulls the export into a
fresh sparse file once per variant (order alternating per round), with the
blake3 manifest, ``sync`` before each pull; on uvloop when it is
installed, as the CLI (``NBDBACKUP_NO_UVLOOP=1``: asyncio's own loop).  Prints per pull the seconds
and this process's CPU seconds (all its threads), then medians and the
per-round ratio (asyncio seconds / variant seconds: above 1 the variant is
faster).

Variants: ``asyncio`` (``threads=False``), ``threads`` (writer pool),
``inline`` (hash + write on the receiving thread); ``--nbuf N`` chunk
buffers per receiving thread.

Usage: .venv/bin/python bench/pull_threads_ab.py [--size 1G] [--rounds 6] [--connections 4]
       [--variants asyncio,threads,inline] [--nbuf N] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from client_read import random_nbdkit_export  # noqa: E402
from nbdbackup.agent.pull import pull  # noqa: E402
from nbdbackup.blockdev import parse_size  # noqa: E402
from nbdbackup.blockdev.file import FileDev  # noqa: E402
from nbdbackup.blockdev.nbd import NBDDev  # noqa: E402
from nbdbackup.commands import run_async  # noqa: E402  (uvloop when installed, as the CLI)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def timed_pull(uri: str, out: str, size: int, conns: int, **kw):
    """One in-process pull of ``uri`` into a fresh sparse ``out`` (after a
    ``sync``): ``(wall s, CPU s of this process, PullStats)``; ``kw`` go to
    `pull` (also used by pull_knobs_ab.py)."""
    if os.path.exists(out):
        os.unlink(out)
    subprocess.run(["sync"], check=True)
    c0, t0 = _cpu(), time.monotonic()
    src = await NBDDev.open(uri, read_only=True, connections=conns)
    with open(out, "wb") as f:
        f.truncate(size)
    dst = FileDev(out)
    try:
        _, st = await pull(src, dst, fresh=True, **kw)
    finally:
        await dst.close()
        await src.close()
    return time.monotonic() - t0, _cpu() - c0, st


async def one(uri: str, out: str, size: int, conns: int, variant: str) -> tuple[float, float, str]:
    dt, cpu, st = await timed_pull(uri, out, size, conns, threads=variant != "asyncio",
                                   inline=variant == "inline" if variant != "asyncio" else None)
    return dt, cpu, st.receive


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--variants", default="asyncio,threads,inline")
    ap.add_argument("--nbuf", type=int, default=0, help="chunk buffers per receiving thread (0: default)")
    ap.add_argument("--dir", default="/tmp")
    a = ap.parse_args()
    import common  # bench/common.py: touch fresh guest memory once per boot
    common.warm_guest_memory()
    if a.nbuf:
        os.environ["NBDBACKUP_PULL_NBUF"] = str(a.nbuf)
    variants = a.variants.split(",")
    size = parse_size(a.size)
    gib = size / (1 << 30)
    with random_nbdkit_export("bench-pullab-", a.dir, size, a.connections) as (ws, procs, image, uri):
        d = str(ws.path)
        out = os.path.join(d, "copy.raw")
        res: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for r in range(a.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                dt, cpu, ran = run_async(one(uri, out, size, a.connections, v))
                res[v].append((dt, cpu))
                print(f"round {r + 1}: {v:8s} {dt:6.3f} s  {size / dt / 1e6:6.0f} MB/s  CPU {cpu / gib:.2f} s/GiB"
                      f"  ({ran})", flush=True)
        for v in variants:
            dts = [x for x, _ in res[v]]
            cpus = [c / gib for _, c in res[v]]
            line = (f"{v:8s} median {statistics.median(dts):.3f} s (range {min(dts):.3f}-{max(dts):.3f}), "
                    f"CPU {statistics.median(cpus):.2f} s/GiB (range {min(cpus):.2f}-{max(cpus):.2f})")
            if v != variants[0]:
                ratios = [b[0] / x[0] for b, x in zip(res[variants[0]], res[v])]
                wins = sum(q > 1 for q in ratios)
                line += (f"; {variants[0]}/{v} per round median {statistics.median(ratios):.2f}x "
                         f"(range {min(ratios):.2f}-{max(ratios):.2f}, {v} faster in {wins} of {len(ratios)})")
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
