"""Benchmark: ``nbdbackup restore`` vs nbdkit + plugins/restore.py + ``qemu-img convert`` / ``nbdcopy``.

Role: the restore side of the repository.  One disk image, the first half
random and the second half zeroes (a hole), is pulled into a repository
(a directory, or ``--repo s3://...`` with the usual AWS variables); then,
in alternating rounds, the snapshot is written to a fresh file in ``--dir``:

- ``ours``: ``nbdbackup restore REPO s0 OUT`` (fdatasync included);
- ``qemu-img``: ``qemu-img convert`` from nbdkit running plugins/restore.py
  on the same snapshot, then ``sync OUT`` (fsync: the same durability);
- ``nbdcopy``: ``nbdcopy --flush --connections=4`` from the same nbdkit;
- with ``--old-plugin PATH`` (e.g. the v0 plugin of another checkout, which
  serialises chunk loads under one lock), ``qemu-img``/``nbdcopy`` from it too.

Each nbdkit is started for its run and stopped after (its chunk cache
starts cold); its start (Python, boto3, the snapshot's manifest) is part of
the time, as ours (Python, boto3, the manifest) is; the copy alone (from
a running nbdkit) is shown too, and compares the plugins.  The destination is deleted and ``sync`` run before each run.
Prints seconds and MB/s per run and the medians.

Usage: .venv/bin/python bench/restore_bench.py [--size 256M] [--rounds 3] [--dir /tmp] [--repo URL | --rgw]
       [--encryption none|repokey] [--workers N] [--buffered]
       [--old-plugin /work/main/plugins/restore.py]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402  (bench/common.py)
from client_read import start_server  # noqa: E402  (same directory)
from nbdbackup.blockdev import parse_size  # noqa: E402

NB = [sys.executable, "-m", "nbdbackup.cli"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp", help="where the image, the repository and the copies live")
    ap.add_argument("--repo", help="a repository URL to use instead of a fresh directory (s3://...: must be empty)")
    ap.add_argument("--rgw", action="store_true",
                    help="start a throw-away Ceph RGW (tests/interop/ceph_rgw.py) and use a bucket on it")
    ap.add_argument("--encryption", default="none", choices=("none", "repokey"),
                    help="repo init --encryption (the passphrase goes in NBDBACKUP_PASSPHRASE)")
    ap.add_argument("--workers", type=int, help="our restore's --workers (default: its own, per store)")
    ap.add_argument("--buffered", action="store_true",
                    help="also run ours with --buffered (page cache instead of O_DIRECT), interleaved")
    ap.add_argument("--old-plugin", help="also measure this (older) restore plugin")
    a = ap.parse_args()
    common.warm_guest_memory()  # before any file is made: docs in bench/common.py
    size = parse_size(a.size)
    with common.Workspace("bench-restore-", parent=a.dir) as ws, common.Procs() as procs:
        d = str(ws.path)
        rgw = None
        if a.rgw:
            sys.path.insert(0, os.path.join(ROOT, "tests", "interop"))
            import ceph_rgw

            rgw = ceph_rgw.start(os.path.join(d, "rgw"))
            os.environ.update(rgw.env(), AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
            a.repo = "s3://bench-restore/vm"
        try:
            return _run(a, size, ws, procs, d)
        finally:
            if rgw is not None:
                rgw.stop()


def _run(a, size: int, ws, procs, d: str) -> int:
    if True:
        image = os.path.join(d, "disk.raw")
        with open(image, "wb") as f:
            f.truncate(size)
        common.make_random_file(image + ".half", size // 2)
        with open(image + ".half", "rb") as src, open(image, "r+b") as dst:
            while blk := src.read(8 << 20):
                dst.write(blk)
        os.unlink(image + ".half")
        repo = a.repo or os.path.join(d, "repo")
        os.environ.update(NBDBACKUP_PASSPHRASE="bench pass", XDG_CONFIG_HOME=os.path.join(d, "config"))
        subprocess.run([*NB, "repo", "init", repo, "--encryption", a.encryption], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        sock = ws.socket("src")
        src = start_server(procs, "nbdkit", image, sock, 4, same_session=False)
        subprocess.run([*NB, "pull", f"nbd+unix:///?socket={sock}", "--repo", repo, "--snapshot", "s0"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        procs.stop(src)
        out = os.path.join(d, "out.raw")
        plugins = {"": os.path.join(ROOT, "plugins", "restore.py")}
        if a.old_plugin:
            plugins["old "] = a.old_plugin
        ours = [*NB, "restore", repo, "s0", out] + ([f"--workers={a.workers}"] if a.workers else [])
        runs: list[tuple[str, str | None, list[str]]] = [("ours", None, ours)]
        if a.buffered:
            runs.append(("ours --buffered", None, [*ours, "--buffered"]))
        for tag, path in plugins.items():
            runs.append((f"{tag}qemu-img", path, ["sh", "-c", 'qemu-img convert -f raw -O raw "$1" "$2" && sync "$2"',
                                                  "sh", "URI", out]))
            runs.append((f"{tag}nbdcopy", path, ["nbdcopy", "--flush", "--connections=4", "URI", out]))
        res: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        copies: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        where = "s3" if repo.startswith("s3://") else "directory"
        print(f"# {size >> 20} MiB snapshot (half random, half zero), {where} repository "
              f"(encryption {a.encryption}), fresh file in {a.dir}; "
              f"load {common.load_average()[0]:.1f}")
        for r in range(a.rounds):
            for name, plugin, cmd in runs:
                if os.path.exists(out):
                    os.unlink(out)
                subprocess.run(["sync"], check=True)
                k = None
                t0 = time.perf_counter()
                if plugin is not None:
                    ksock = ws.socket(f"k{r}-{[n for n, _, _ in runs].index(name)}")
                    k = procs.start("nbdkit-restore", ["nbdkit", "-f", "-U", ksock, "python", plugin,
                                                       f"repo={repo}", "snapshot=s0"],
                                    log_path=os.path.join(d, "nbdkit.log"))
                    common.wait_for_unix(ksock, proc=k)
                    cmd = [c.replace("URI", f"nbd+unix:///?socket={ksock}") for c in cmd]
                copy = common.run_timed(cmd)
                dt = time.perf_counter() - t0
                if k is not None:
                    procs.stop(k)
                res[name].append(dt)
                copies[name].append(copy)
                print(f"round {r + 1}: {name:13s} {dt:6.2f} s  {size / dt / 1e6:7.0f} MB/s"
                      + (f"   (copy alone {copy:.2f} s, {size / copy / 1e6:.0f} MB/s)" if plugin else ""))
        print("median, with start-up: " + ", ".join(f"{n} {size / statistics.median(v) / 1e6:.0f} MB/s "
                                                    f"({statistics.median(v):.2f} s)" for n, v in res.items()))
        print("median, copy alone:    " + ", ".join(f"{n} {size / statistics.median(v) / 1e6:.0f} MB/s "
                                                    f"({statistics.median(v):.2f} s)" for n, v in copies.items()
                                                    if not n.startswith("ours")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
