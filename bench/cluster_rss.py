#!/usr/bin/env python3
"""Server memory of a backup's copy state, by cluster size (docs/cbwsub.md).

Role: start ``serve`` on a sparse image of ``--size`` (default 1 TiB), read
the server's VmRSS, start a backup (``sync`` and ``cluster-size`` per case;
an explicit size, or the server's default when the case says ``default``),
read VmRSS and VmHWM again, cancel, stop.  The copy state holds about 7
bitmaps of one bit per cluster (done, in_target, in_scratch, zeroed,
trimmed, pump_todo, ignored) plus, for incremental/full, the frozen set:
1 TiB at 4 KiB is 2^28 bits = 32 MiB each.  Pages of a bitmap never set stay
unbacked (numpy zeros), so ``sync=full`` (pump_todo all ones) is the case
that shows the most.

Usage: ``bench/cluster_rss.py [--size 1T] [--cases full:default,full:4k,...]``.
Invariant: every process started here is stopped by PID; the temp dir is removed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import backup_bench as bb  # noqa: E402
import common  # noqa: E402
from common import Procs  # noqa: E402


def rss_kib(pid: int) -> tuple[int, int]:
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                vals[k] = int(v.split()[0])
    return vals["VmRSS"], vals["VmHWM"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1T")
    ap.add_argument("--cases", default="none:default,full:default,none:4k,full:4k,full:16k,full:64k")
    ap.add_argument("--dir", default="/tmp")
    args = ap.parse_args()
    size = common.parse_size(args.size)
    ws = Path(tempfile.mkdtemp(prefix="rss-", dir=args.dir))
    try:
        with Procs() as procs:
            img = str(ws / "img")
            bb.make_sparse(img, size)
            for case in args.cases.split(","):
                sync, cs = case.split(":")
                s = bb.start(procs, ws, bb.OURS, img)
                try:
                    time.sleep(0.3)
                    before = rss_kib(s.pid)[0]
                    a = {"export": bb.EXPORT, "job-id": "j", "sync": sync, "target": str(ws / "tgt"),
                         "snapshot": bb.SNAP, "speed": 1}
                    if cs != "default":
                        a["cluster-size"] = common.parse_size(cs)
                    s.qmp("backup-start", a)
                    time.sleep(0.5)
                    after, hwm = rss_kib(s.pid)
                    jobs = s.qmp("query-jobs")
                    cluster = jobs[0].get("cluster-size") if jobs else None
                    print(f"{args.size} sync={sync:5s} cluster-size {cs:8s} (job says {cluster}): "
                          f"RSS {before / 1024:6.1f} -> {after / 1024:6.1f} MiB, peak {hwm / 1024:6.1f} MiB",
                          flush=True)
                    s.qmp("job-cancel", {"id": "j"})
                finally:
                    s.close()
                bb.rm(str(ws / "tgt"))
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
