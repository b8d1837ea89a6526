"""Benchmark aid: in-process A/B of the threaded pull's environment knobs.

Role: one nbdkit (``file`` plugin, random image in the page cache, Unix
socket), one Python process on uvloop (as the CLI); each round pulls the
export into a fresh sparse file once per variant (order rotating), with
the blake3 manifest, ``sync`` before each pull.  A variant is a set of
environment variables (``NAME=VALUE,NAME=VALUE``; ``base``: none), set
around its pull: only knobs read per pull take effect (``NBDBACKUP_PULL_NBUF``,
``NBDBACKUP_PULL_THREADS``; not those read at import, e.g.
``NBDBACKUP_PULL_INLINE``).  Prints the seconds and this process's CPU per pull, the
medians, and per variant the per-round ratio against the first (above 1:
faster).

Usage: .venv/bin/python bench/pull_knobs_ab.py [--size 1G] [--rounds 6] base NBDBACKUP_PULL_NBUF=3 ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from client_read import random_nbdkit_export  # noqa: E402
from pull_threads_ab import timed_pull  # noqa: E402  (same directory)
from nbdbackup.blockdev import parse_size  # noqa: E402
from nbdbackup.commands import run_async  # noqa: E402


def _env(v: str) -> dict[str, str]:
    return {} if v == "base" else dict(kv.split("=", 1) for kv in v.split(","))


async def one(uri: str, out: str, size: int, conns: int) -> tuple[float, float]:
    dt, cpu, _ = await timed_pull(uri, out, size, conns,
                                  chunk_size=parse_size(os.environ.get("BENCH_CHUNK", "4M")))
    return dt, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("variants", nargs="+")
    a = ap.parse_args()
    import common  # bench/common.py: touch fresh guest memory once per boot
    common.warm_guest_memory()
    size = parse_size(a.size)
    gib = size / (1 << 30)
    vs = a.variants
    with random_nbdkit_export("bench-pullknobs-", a.dir, size, a.connections) as (ws, procs, image, uri):
        d = str(ws.path)
        out = os.path.join(d, "copy.raw")
        res: dict[str, list[tuple[float, float]]] = {v: [] for v in vs}
        for r in range(a.rounds):
            for v in vs[r % len(vs):] + vs[:r % len(vs)]:
                env = _env(v)
                old = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                try:
                    dt, cpu = run_async(one(uri, out, size, a.connections))
                finally:
                    for k, x in old.items():
                        if x is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = x
                res[v].append((dt, cpu))
                print(f"round {r + 1}: {v:40s} {dt:6.3f} s  {size / dt / 1e6:6.0f} MB/s  CPU {cpu / gib:.2f} s/GiB",
                      flush=True)
        for v in vs:
            dts = [x for x, _ in res[v]]
            cpus = [c / gib for _, c in res[v]]
            line = (f"{v:40s} median {statistics.median(dts):.3f} s ({min(dts):.3f}-{max(dts):.3f}), "
                    f"CPU {statistics.median(cpus):.2f} s/GiB")
            if v != vs[0]:
                q = [b[0] / x[0] for b, x in zip(res[vs[0]], res[v])]
                line += (f"; {vs[0]}/this {statistics.median(q):.2f}x ({min(q):.2f}-{max(q):.2f}, "
                         f"faster in {sum(x > 1 for x in q)} of {len(q)})")
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
