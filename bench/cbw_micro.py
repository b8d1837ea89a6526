"""Micro-benchmark: the server-side cost of copy-before-write per live write, in process (no NBD).

Role: the part of bench/backup_bench.py's ``live-4k-uncopied`` and
``live-seq-first`` rows that is ours alone -- `LiveDev` + `CBWHook` +
`CopyState` over `FileDev`s, as ``backup-start sync=none`` sets them up (the
target file is the scratch) -- without the NBD server, client and socket,
whose noise on a shared 2-core machine hides a few microseconds.  For each
case it times, with and without a backup, one 4 KiB write into each 64 KiB
cluster in random order (32 at once, as the bench's QD) and 1 MiB
sequential writes (16 at once), and prints wall and CPU per op / per GiB
(all threads of this process: write-behind rounds included) and the
with/without ratios.  ``--variants`` runs the same with other environment
settings (e.g. ``NBDBACKUP_WRITE_BEHIND=0``) in child processes,
interleaved round by round.

Usage: .venv/bin/python bench/cbw_micro.py [--size 512M] [--rounds 3] [--dir /tmp] [--settle S]
       [--variants "NBDBACKUP_WRITE_BEHIND=0"]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nbdbackup.backup.cbw import CBWHook  # noqa: E402
from nbdbackup.backup.copystate import CopyState  # noqa: E402
from nbdbackup.blockdev import parse_size  # noqa: E402
from nbdbackup.blockdev.file import FileDev  # noqa: E402
from nbdbackup.blockdev.live import LiveDev  # noqa: E402

CL = 64 * 1024
#: The copy state's cluster size (``CBW_MICRO_CS``, default 64 KiB; the 4 KiB
#: writes stay one per 64 KiB): ``--variants CBW_MICRO_CS=4096`` compares granules.
CS = int(os.environ.get("CBW_MICRO_CS", str(CL)))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime


async def _case(image: str, target: str | None, kind: str, size: int) -> tuple[float, float, int]:
    """(wall s, CPU s, ops) of one timed case; ``target`` None: no backup."""
    live = LiveDev(FileDev(image))
    state = tdev = None
    if target is not None:
        tdev = FileDev(target, create_size=size)
        state = CopyState(live, tdev, CS, scratch=tdev)
        live.add_hook(CBWHook(state))
    if kind == "4k":
        offs = [c * CL for c in range(size // CL)]
        random.shuffle(offs)
        buf, depth = os.urandom(4096), 32
    else:
        offs = list(range(0, size, 1 << 20))
        buf, depth = os.urandom(1 << 20), 16
    it = iter(offs)

    async def worker() -> None:
        for off in it:
            if not live.pwrite_now(buf, off):
                await live.pwrite(buf, off)

    c0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(depth)))
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    if state is not None:
        await state.idle_write_behind()
    await live.close()
    if tdev is not None:
        await tdev.close()
    return dt, cpu, len(offs)


def one_round(d: str, base: str, size: int, settle: float = 0.0) -> dict:
    out = {}
    for kind in ("4k", "seq"):
        for with_backup in (False, True):
            image = os.path.join(d, "live.raw")
            shutil.copyfile(base, image)
            target = os.path.join(d, "target.raw") if with_backup else None
            if target and os.path.exists(target):
                os.unlink(target)
            os.sync()
            if settle:
                # Memory freed before this (the last case's files) may be
                # handed back to the hypervisor meanwhile (free page
                # reporting?), so new page-cache pages can be cold, as for a
                # backup started on a machine that did not just free memory
                # (docs/cbwcpu.md: seen at times, not always).
                time.sleep(settle)
            dt, cpu, n = asyncio.run(_case(image, target, kind, size))
            out[f"{kind}-{'with' if with_backup else 'without'}"] = (dt, cpu, n)
            os.unlink(image)
            if target:
                os.unlink(target)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds to sleep before each timed case (freed memory may go cold meanwhile, docs/cbwcpu.md)")
    ap.add_argument("--variants", nargs="*", default=[], help="VAR=VALUE[,VAR=VALUE] settings to compare")
    ap.add_argument("--child", nargs=2, metavar=("DIR", "BASE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    import common  # bench/common.py: touch fresh guest memory once per boot
    common.warm_guest_memory()
    size = parse_size(a.size)
    if a.child:
        print(json.dumps(one_round(a.child[0], a.child[1], size, a.settle)))
        return 0
    d = tempfile.mkdtemp(prefix="cbw-micro-", dir=a.dir)
    try:
        base = os.path.join(d, "base.raw")
        with open(base, "wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        variants = [("default", {})] + [(v, dict(kv.split("=", 1) for kv in v.split(","))) for v in a.variants]
        res: dict[str, list[dict]] = {name: [] for name, _ in variants}
        for r in range(a.rounds):
            for name, env in variants:
                p = subprocess.run([sys.executable, __file__, "--size", a.size, "--settle", str(a.settle),
                                    "--child", d, base],
                                   env={**os.environ, **env}, capture_output=True, text=True, check=True)
                res[name].append(json.loads(p.stdout))
                row = res[name][-1]
                print(f"round {r + 1} {name}: " + ", ".join(
                    f"{k} {v[1] / v[2] * 1e6:.1f} us/op CPU" if k.startswith("4k") else
                    f"{k} {v[1] / (size / (1 << 30)):.2f} s/GiB CPU" for k, v in row.items()))
        for name, rows in res.items():
            def med(k: str, i: int) -> float:
                return statistics.median(r[k][i] / r[k][2] for r in rows)
            ratio4 = statistics.median(r["4k-without"][0] / r["4k-with"][0] for r in rows)
            ratios = statistics.median(r["seq-without"][0] / r["seq-with"][0] for r in rows)
            print(f"{name}: 4k uncopied with/without {ratio4:.2f}x (CPU {med('4k-with', 1) * 1e6:.1f} vs "
                  f"{med('4k-without', 1) * 1e6:.1f} us/op); seq first {ratios:.2f}x (CPU "
                  f"{med('seq-with', 1) * 1024:.2f} vs {med('seq-without', 1) * 1024:.2f} s/GiB)")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
