"""Benchmark: ``nbdbackup pull`` vs ``nbdcopy --flush`` copying an export into a fresh local file.

Role: the pull agent's speed, side by side with libnbd's nbdcopy under the
same conditions: one nbdkit (``file`` plugin, its own session) serving a
random image from the page cache over a Unix socket; both tools write a new
sparse file on the same file system and make it durable (nbdcopy
``--flush``, our pull fdatasyncs); the same connections (``--connections``).
Our pull also computes the blake3 chunk manifest (``--manifest``): the
price of the proof is part of the figure.  Rounds alternate and the
destination file is deleted and ``sync`` run before each run, so neither
tool pays for the other's writeback; with ``--baseline`` ours and the
baseline swap places every other round (the slot right after nbdcopy is
the slower one), so use an even number of rounds.

Prints seconds and MB/s per run, medians and the ratio ours/nbdcopy
(higher is better), plus each tool's CPU seconds.

``--baseline DIR``: also run the pull of another checkout (DIR/.venv/bin/python
in DIR, e.g. main) in the same rounds, interleaved, for an A/B of a change;
its ratio to nbdcopy and ours/baseline are printed too.  ``--write-behind 0``
runs ours without write-behind (agent/filewriter.py) to show what it buys;
``--buffered`` runs ours through the page cache instead of O_DIRECT;
``--env NAME=VALUE`` sets a variable for ours only (with ``--baseline`` of
the same checkout: an A/B of a switch such as ``NBDBACKUP_PULL_THREADS=0``).

Byte code: with ``PYTHONDONTWRITEBYTECODE=1`` a checkout without
``__pycache__`` compiles its modules on every run (~25 ms here); ours is
compiled once before the rounds, a baseline without ``__pycache__`` gets a
warning (the bench does not write into another checkout).

Usage: .venv/bin/python bench/pull_bench.py [--size 1G] [--rounds 3] [--connections 4] [--dir /tmp]
       [--baseline /work/main] [--write-behind SIZE] [--buffered] [--env NAME=VALUE]
"""

from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402  (bench/common.py)
from client_read import random_nbdkit_export  # noqa: E402  (same directory)
from nbdbackup.blockdev import parse_size  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--dir", default="/tmp", help="where the image and the copies live")
    ap.add_argument("--chunk-size", default="4M", help="our pull's chunk size")
    ap.add_argument("--baseline", metavar="DIR", help="also time the pull of this checkout (its .venv), interleaved")
    ap.add_argument("--write-behind", metavar="SIZE", help="ours: the write-behind window (0: off)")
    ap.add_argument("--buffered", action="store_true", help="ours: through the page cache, not O_DIRECT")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="ours only: run with this environment variable (repeatable; e.g. "
                         "NBDBACKUP_PULL_THREADS=0 against --baseline of the same checkout)")
    a = ap.parse_args()
    common.warm_guest_memory()  # before any file is made: docs in bench/common.py
    compileall.compile_dir(os.path.join(ROOT, "nbdbackup"), quiet=1)
    if a.baseline and not os.path.isdir(os.path.join(a.baseline, "nbdbackup", "__pycache__")):
        print(f"# warning: {a.baseline} has no __pycache__: its runs include compiling it", file=sys.stderr)
    size = parse_size(a.size)
    with random_nbdkit_export("bench-pull-", a.dir, size, a.connections) as (ws, procs, image, uri):
        d = str(ws.path)
        out = os.path.join(d, "copy.raw")
        pull_args = ["-m", "nbdbackup.cli", "pull", uri, out, f"--connections={a.connections}",
                     "--manifest", os.path.join(d, "m.json"), f"--chunk-size={a.chunk_size}"]
        ours_cmd = (["env"] + a.env if a.env else []) + [sys.executable] + pull_args
        if a.write_behind is not None:
            ours_cmd.append(f"--write-behind={a.write_behind}")
        if a.buffered:
            ours_cmd.append("--buffered")
        theirs_cmd = ["nbdcopy", "--flush", f"--connections={a.connections}", uri, out]
        runs: list[tuple[str, list[str]]] = [("nbdcopy", theirs_cmd), ("ours", ours_cmd)]
        if a.baseline:
            base = os.path.abspath(a.baseline)
            # env -C: "python -m" imports the package of its working directory first.
            runs.append(("baseline", ["env", "-C", base, os.path.join(base, ".venv", "bin", "python")] + pull_args))
        res: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in runs}
        print(f"# nbdkit file, {size >> 20} MiB, {a.connections} connections, fresh file in {a.dir}"
              + (f"; baseline {a.baseline}" if a.baseline else ""))
        gib = size / (1 << 30)
        for r in range(a.rounds):
            # nbdcopy first; ours and the baseline swap places every other round: the run
            # right after nbdcopy's is slower (same checkout in both slots, 1 GiB, 7 rounds:
            # 0.96x, 2 of 7; docs/pullrate.md).
            order = runs if r % 2 == 0 else runs[:1] + runs[1:][::-1]
            for name, cmd in order:
                if os.path.exists(out):
                    os.unlink(out)
                subprocess.run(["sync"], check=True)
                dt, cpu = common.run_timed_cpu(cmd)
                res[name].append((dt, cpu))
                print(f"round {r + 1}: {name:8s} {dt:6.2f} s  {size / dt / 1e6:7.0f} MB/s  "
                      f"(CPU {cpu:.2f} s, {cpu / gib:.2f} s/GiB)")
        med = {k: statistics.median(dt for dt, _ in v) for k, v in res.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in res.items()}
        print(f"median: nbdcopy {size / med['nbdcopy'] / 1e6:.0f} MB/s, ours {size / med['ours'] / 1e6:.0f} MB/s; "
              f"ratio ours/nbdcopy {med['nbdcopy'] / med['ours']:.2f}x; CPU nbdcopy {cpu['nbdcopy'] / gib:.2f} s/GiB, "
              f"ours {cpu['ours'] / gib:.2f} s/GiB (includes the blake3 manifest)")
        if a.baseline:
            print(f"baseline: {size / med['baseline'] / 1e6:.0f} MB/s, ratio baseline/nbdcopy "
                  f"{med['nbdcopy'] / med['baseline']:.2f}x, CPU {cpu['baseline'] / gib:.2f} s/GiB; "
                  f"ours/baseline {med['baseline'] / med['ours']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
