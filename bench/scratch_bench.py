#!/usr/bin/env python3
"""Copy-before-write cost with the scratch (docs/scratch.md), in process.

Role: live 4 KiB random writes through a `LiveDev` over a raw file while a
backup job's pump is stalled (speed 1 B/s), so every first write to a
cluster pays copy-before-write; writes/s per job kind:

- ``none``: fleecing, the target file is the scratch;
- ``full``: every cluster in the sync set, copies go to the target file;
- ``bitmap``: sync set = one cluster, copies go to a scratch file;
- ``nojob``: no backup (the baseline).

And ``fstrim``: one TRIM of the whole disk (75% of it a hole) during a
``full`` job: seconds, and bytes copied (only the data should be).

Rounds alternate between the kinds; medians are printed (and written as
JSON with ``--json FILE``).  Numbers, not tests.  About 20 s with the
defaults on a quiet machine.

Usage: ``bench/scratch_bench.py [--size 256M] [--writes 3000] [--rounds 3] [--dir /var/tmp]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbdbackup.backup.engine import Engine, MemoryExportTable  # noqa: E402
from nbdbackup.bitmap.core import Bitmap  # noqa: E402
from nbdbackup.blockdev.file import FileDev  # noqa: E402
from nbdbackup.blockdev.live import LiveDev  # noqa: E402


class OneCluster:
    """A `BitmapSource` whose frozen set is cluster 0 alone."""

    def begin_backup(self, export, name, mode, cluster_size, nclusters):
        bm = Bitmap(nclusters)
        bm.set(0)
        return type("Lease", (), {"clusters": bm, "context": None, "end": lambda s, ok: None})()


def make_source(path: str, size: int) -> None:
    """Data in 3 of every 4 MiB, a hole in the 4th."""
    with open(path, "wb") as f:
        for m in range(size >> 20):
            if m % 4:
                f.seek(m << 20)
                f.write(os.urandom(1 << 20))
        f.truncate(size)


async def one(kind: str, d: str, size: int, writes: int) -> dict:
    src = os.path.join(d, "src.raw")
    make_source(src, size)
    live = LiveDev(FileDev(src))
    table = MemoryExportTable()
    table.add("disk", live, read_only=False)
    engine = Engine(table, bitmaps=OneCluster(), scratch_dir=d)
    target = os.path.join(d, "t.raw")
    job = None
    if kind != "nojob":
        sync = "full" if kind == "fstrim" else kind
        kw = {"bitmap": "b", "bitmap_mode": "never"} if sync == "bitmap" else {}
        await engine.backup_start("disk", "j", sync, target, speed=1, **kw)
        job = engine.jobs["j"]
    out: dict = {"kind": kind}
    if kind == "fstrim":
        t0 = time.perf_counter()
        await live.trim(0, size)
        out["seconds"] = time.perf_counter() - t0
    else:
        rng = random.Random(1)
        buf = os.urandom(4096)
        t0 = time.perf_counter()
        for _ in range(writes):
            await live.pwrite(buf, rng.randrange(size // 4096) * 4096)
        out["writes_per_s"] = writes / (time.perf_counter() - t0)
    if job is not None:
        q = job.query()
        out.update({k: q.get(k) for k in ("bytes-copied-by-cbw", "clusters-zero-in-snapshot", "scratch-bytes")})
        job.cancel()
        await job.wait()
        await engine.job_dismiss("j")
    await live.close()
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--writes", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp", help="where the images go (a real filesystem, not tmpfs)")
    ap.add_argument("--json", metavar="FILE")
    args, _ = ap.parse_known_args()  # run_all.py may pass options meant for other benches
    size = int(args.size[:-1]) << {"K": 10, "M": 20, "G": 30}[args.size[-1].upper()] \
        if args.size[-1].isalpha() else int(args.size)
    kinds = ["nojob", "none", "full", "bitmap", "fstrim"]
    samples: dict[str, list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="scratch-bench-", dir=args.dir) as d:
        for _ in range(args.rounds):
            for kind in kinds:
                samples[kind].append(asyncio.run(one(kind, d, size, args.writes)))
    report = {}
    for kind, rows in samples.items():
        key = "seconds" if kind == "fstrim" else "writes_per_s"
        med = statistics.median(r[key] for r in rows)
        report[kind] = {"median_" + key: med, "samples": rows}
        extra = {k: v for k, v in rows[-1].items() if k not in ("kind", key)}
        print(f"{kind:8s} {key} median {med:10.3f}  {extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
