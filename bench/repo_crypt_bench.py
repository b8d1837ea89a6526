"""Benchmark: ``pull --repo`` into a local repository, plain vs compressed vs compressed + encrypted.

Role: the price of repository format 2's chunk encoding (`agent.codec`).
One nbdkit (``file`` plugin, its own session) serves a random image from
the page cache; for each repository configuration a fresh repository is
created and the image pulled into it twice (full, then unchanged: the
second run only hashes and finds every chunk known), then restored to
``null:`` through nbdkit + plugins/restore.py with ``nbdcopy``.  Prints
wall and CPU seconds (the pull process and its children, nbdkit's for the
restore) and bytes stored.  Random data does not compress: zstd's cost here
is the probe that finds it does not pay.

Usage: .venv/bin/python bench/repo_crypt_bench.py [--size 256M] [--rounds 1] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402  (bench/common.py)
from client_read import random_nbdkit_export  # noqa: E402  (same directory)
from nbdbackup.blockdev import parse_size  # noqa: E402

CONFIGS = (("plain", ["--encryption", "none", "--compression", "none"]),
           ("zstd:3", ["--encryption", "none", "--compression", "zstd:3"]),
           ("zstd:3+aes", ["--encryption", "repokey", "--compression", "zstd:3"]))


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--dir", default="/tmp")
    a = ap.parse_args()
    common.warm_guest_memory()  # before any file is made: docs in bench/common.py
    size = parse_size(a.size)
    os.environ["NBDBACKUP_PASSPHRASE"] = "bench passphrase"
    with random_nbdkit_export("bench-repo-", a.dir, size, a.connections) as (ws, procs, image, uri):
        d = str(ws.path)
        print(f"# nbdkit file, {size >> 20} MiB random, {a.connections} connections, repository in {a.dir}")
        res: dict[str, list[tuple[float, ...]]] = {n: [] for n, _ in CONFIGS}
        for r in range(a.rounds):
            for name, opts in CONFIGS:
                repo = os.path.join(d, f"repo-{name}-{r}")
                cli = [sys.executable, "-m", "nbdbackup.cli"]
                subprocess.run([*cli, "repo", "init", repo, *opts], check=True, stdout=subprocess.DEVNULL)
                subprocess.run(["sync"], check=True)
                full = common.run_timed_cpu([*cli, "pull", uri, "--repo", repo, "--snapshot", "s0",
                                             f"--connections={a.connections}"])
                again = common.run_timed_cpu([*cli, "pull", uri, "--repo", repo, "--snapshot", "s1",
                                              f"--connections={a.connections}"])
                plugin = os.path.join(ROOT, "plugins", "restore.py")
                rest = common.run_timed_cpu(["nbdkit", "-U", "-", "python", plugin, f"repo={repo}", "snapshot=s0",
                                             "--run", "nbdcopy $uri null:"])
                stored = du(repo)
                res[name].append((*full, *again, *rest, stored))
                print(f"round {r + 1}: {name:11s} full {full[0]:5.2f} s (CPU {full[1]:5.2f})  "
                      f"unchanged {again[0]:5.2f} s (CPU {again[1]:5.2f})  "
                      f"restore {rest[0]:5.2f} s (CPU {rest[1]:5.2f})  stored {stored / 2**20:7.1f} MiB",
                      flush=True)
        for name, rows in res.items():
            med = [statistics.median(col) for col in zip(*rows)]
            print(f"median {name:11s} full {med[0]:.2f} s / CPU {med[1]:.2f} s, unchanged {med[2]:.2f} s / "
                  f"CPU {med[3]:.2f} s, restore {med[4]:.2f} s / CPU {med[5]:.2f} s, "
                  f"{size / med[0] / 1e6:.0f} MB/s full")
    return 0


if __name__ == "__main__":
    sys.exit(main())
