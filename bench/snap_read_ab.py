#!/usr/bin/env python3
"""Snapshot export read, A/B between checkouts, and against the live export and QEMU.

Role: the ``snap-read-idle`` row of backup_bench.py, narrowed to what one
change to the snapshot read path moves: for each side (this checkout, each
``--baseline DIR``, ``qemu`` when asked) a fresh server over a copy of one
random image in the page cache, a ``sync=none`` backup (QEMU: the fleecing
graph), then ``nbdcopy SNAP null:`` and ``nbdcopy LIVE null:`` (the plain
export's read path, the floor), ``--reads`` times each; sides interleave,
order alternating per round.  Printed per run: MB/s and server CPU s/GiB;
at the end medians and ranges per side.

Usage: ``bench/snap_read_ab.py [--size 1G] [--rounds 5] [--reads 2] [--no-live] [--connections N]
[--baseline DIR ...] [--qemu]``.

Invariant: every process started is stopped by PID; the temp dir is removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import backup_bench as bb  # noqa: E402
import common  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reads", type=int, default=2, help="nbdcopy runs per export per session")
    ap.add_argument("--baseline", action="append", default=[], metavar="DIR")
    ap.add_argument("--qemu", action="store_true")
    ap.add_argument("--no-live", action="store_true")
    ap.add_argument("--connections", type=int, default=0, help="nbdcopy --connections (0: its default)")
    args = ap.parse_args()
    common.warm_guest_memory()
    size = common.parse_size(args.size)
    gib = size / common.GiB
    sides: list[tuple[str, list[str], str]] = [("ours", bb.OURS_CMD, str(common.REPO_DIR))]
    for d in args.baseline:
        d = os.path.abspath(d)
        sides.append((f"base:{os.path.basename(d)}",
                      ["env", "-C", d, os.path.join(d, ".venv", "bin", "python"), "-m", "nbdbackup.cli"], d))
    if args.qemu:
        sides.append(("qemu", [], ""))
    res: dict[tuple[str, str], list[tuple[float, float]]] = {}
    ws = Path(tempfile.mkdtemp(prefix="snapab-", dir="/tmp"))
    extra = [f"--connections={args.connections}"] if args.connections else []
    try:
        with common.Procs() as procs:
            base = str(ws / "base.img")
            common.make_random_file(base, size)
            img, tgt = str(ws / "work.img"), str(ws / "tgt.img")
            for rnd in range(args.rounds):
                order = sides if rnd % 2 == 0 else sides[::-1]
                for name, cmd, pypath in order:
                    shutil.copyfile(base, img)
                    common.fsync_file(img)
                    bb.rm(tgt)
                    if name == "qemu":
                        s = bb.start(procs, ws, bb.QEMU, img, fleece_tgt=tgt)
                    else:
                        kind = bb.OURS
                        if pypath != str(common.REPO_DIR):
                            bb.BASELINE_CMD[:], bb.BASELINE_DIR[:] = cmd, [pypath]
                            kind = bb.BASELINE
                        s = bb.start(procs, ws, kind, img)
                        bb.ours_backup(s, "none", tgt)
                    try:
                        exports = [("snap", bb.SNAP)] + ([] if args.no_live else [("live", bb.EXPORT)])
                        for _ in range(args.reads):
                            for what, exp in exports:
                                c0 = s.cpu()
                                dt = common.run_timed(["nbdcopy", *extra, s.uri(exp), "null:"])
                                cpu = s.cpu() - c0
                                res.setdefault((name, what), []).append((size / dt / 1e6, cpu / gib))
                                print(f"round {rnd + 1} {name:14} {what:4} {size / dt / 1e6:8,.0f} MB/s "
                                      f"cpu {cpu / gib:.3f} s/GiB load {os.getloadavg()[0]:.1f}", flush=True)
                    finally:
                        s.close()
                        bb.rm(tgt)
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    print(f"\n{time.strftime('%H:%M UTC', time.gmtime())} commit {common.git_commit()}")
    for (name, what), xs in res.items():
        mb = sorted(x[0] for x in xs)
        cpu = sorted(x[1] for x in xs)
        print(f"{name:14} {what:4} MB/s median {common.median(mb):7,.0f} [{mb[0]:,.0f}-{mb[-1]:,.0f}]  "
              f"cpu s/GiB median {common.median(cpu):.3f} [{cpu[0]:.3f}-{cpu[-1]:.3f}]  n={len(xs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
