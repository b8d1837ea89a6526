"""Interleaved A/B of ``nbdbackup agent backup`` incrementals: two checkouts (or two settings).

Role: the figures of docs/autolevel.md on a shared, noisy machine, where only
alternating runs compare.  One image (``fs``: ext4 of /usr as in
bench/repo_bench.py, or ``random``) is copied for each side; each side runs its
own ``nbdbackup serve`` (its checkout's code) over its copy and its own
encrypted repository (``repo init --encryption repokey --compression C``, key
unlocked from a ``--kdf none`` key file, ``--verify off``: as repo_bench).
After one full backup each, every round changes ~5% of the disk the same way
on both sides (through each side's server, so its bitmap sees it) and runs one
incremental per side, the side that goes first alternating.  Reported per side:
wall, the agent's own CPU (rusage of the process), the server's CPU during the
run, the bytes the incremental stored; medians and ranges; and per round which
side used less agent CPU.

Usage: .venv/bin/python bench/agent_ab.py [--a DIR] [--b DIR] [--a-compression zstd]
       [--b-compression zstd] [--a-env NAME=VALUE] [--b-env NAME=VALUE] [--size 1G] [--dataset fs]
       [--rounds 10] [--json FILE]
(--a default: this checkout; --b default: /work/main.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import repo_bench as rb  # noqa: E402
import common  # noqa: E402

ROOT = rb.ROOT


class Side:
    """One checkout's server, image copy, repository and key file."""

    def __init__(self, name: str, checkout: str, compression: str, image: str, work: str, procs,
                 extra_env: dict | None = None) -> None:
        self.name, self.checkout, self.work = name, checkout, work
        self.env = dict(os.environ, PYTHONPATH=checkout, NBDBACKUP_PASSPHRASE=rb.PASS, **(extra_env or {}))
        self.image = image
        self.repo = os.path.join(work, f"repo-{name}")
        self.ctl = os.path.join(work, f"ctl-{name}")
        self.sock = os.path.join(work, f"nbd-{name}")
        self.proc = procs.start(f"serve-{name}", [*rb.PY, "serve", f"disk={image}", "--socket", self.sock,
                                                  "--control", self.ctl, "--state-dir",
                                                  os.path.join(work, f"state-{name}")],
                                log_path=os.path.join(work, f"serve-{name}.log"), env=self.env, cwd=checkout)
        common.wait_for_unix(self.ctl, proc=self.proc)
        self.uri = f"nbd+unix:///disk?socket={self.sock}"
        rb.run([*rb.PY, "repo", "init", self.repo, "--encryption", "repokey", "--compression", compression],
               self.env, cwd=checkout)
        self.key = os.path.join(work, f"{name}.key")
        rb.run([*rb.PY, "repo", "key", "export", "--kdf", "none", self.repo, self.key], self.env, cwd=checkout)
        self.env.pop("NBDBACKUP_PASSPHRASE")
        self.rows: list[dict] = []

    def backup(self) -> dict:
        cpu0 = common.proc_tree_cpu_seconds(self.proc.pid)
        stored0 = rb.Store("local", "").bytes_stored(self.repo)
        t0 = time.perf_counter()
        dt, cpu, out = rb.run([*rb.PY, "agent", "backup", "--control", self.ctl, "--nbd",
                               f"nbd+unix:///?socket={self.sock}", "--disk", "disk", "--repo", self.repo,
                               "--verify", "off", "--json", "--progress", "never", "--key-file", self.key],
                              self.env, cwd=self.checkout)
        wall = time.perf_counter() - t0
        (d,) = json.loads(out)["disks"]
        return {"kind": d["kind"], "wall": wall, "agent_cpu": cpu,
                "server_cpu": common.proc_tree_cpu_seconds(self.proc.pid) - cpu0,
                "stored": rb.Store("local", "").bytes_stored(self.repo) - stored0,
                "compression": d.get("compression")}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default=ROOT, metavar="DIR")
    ap.add_argument("--b", default="/work/main", metavar="DIR")
    ap.add_argument("--a-compression", default="zstd")
    ap.add_argument("--b-compression", default="zstd")
    ap.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment variable for side A's server and agent (repeat): A/B of a setting")
    ap.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dataset", default="fs", choices=("fs", "random"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args()
    common.warm_guest_memory()  # before any file is made: docs in bench/common.py
    size = rb.parse_size(a.size)
    for checkout in {a.a, a.b}:
        subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(checkout, "nbdbackup")],
                       stdout=subprocess.DEVNULL)
    with common.Workspace("agent-ab-") as ws, common.Procs() as procs:
        work = str(ws.path)
        image = os.path.join(work, "disk.raw")
        if a.dataset == "random":
            common.make_random_file(image, size)
        else:
            rb.make_fs_image(image, size, work)
        sides = []
        for name, checkout, comp, env in (("A", a.a, a.a_compression, a.a_env), ("B", a.b, a.b_compression, a.b_env)):
            img = os.path.join(work, f"disk-{name}.raw")
            subprocess.run(["cp", "--reflink=auto", "--sparse=always", image, img], check=True)
            sides.append(Side(name, checkout, comp, img, work, procs, dict(kv.split("=", 1) for kv in env)))
        for s in sides:
            full = s.backup()
            print(f"# {s.name} ({s.checkout}, {full['compression']}): full {full['wall']:.2f} s, "
                  f"agent cpu {full['agent_cpu']:.2f} s, stored {full['stored'] / 1e6:.1f} MB", flush=True)
            s.full = full
        wins = 0
        for k in range(a.rounds):
            writes = rb.changes(image, size, a.dataset, seed=100 + k)
            for s in sides:
                asyncio.run(rb.apply_changes(s.uri, writes))
            order = sides if k % 2 == 0 else sides[::-1]
            got = {}
            for s in order:
                subprocess.run(["sync"])
                r = s.backup()
                assert r["kind"] == "incremental", r
                s.rows.append(r)
                got[s.name] = r
            wins += got["A"]["agent_cpu"] < got["B"]["agent_cpu"]
            print(f"round {k + 1:2}: " + "  ".join(
                f"{n} wall {r['wall']:.3f} cpu {r['agent_cpu']:.3f} srv {r['server_cpu']:.2f} "
                f"stored {r['stored'] / 1e6:5.1f} MB ({r['compression']})" for n, r in sorted(got.items())),
                flush=True)
        print(f"# load average now: {os.getloadavg()}")
        out = {"rounds": a.rounds, "dataset": a.dataset, "size": a.size, "a_less_agent_cpu_rounds": wins}
        for s in sides:
            col = {f: [r[f] for r in s.rows] for f in ("wall", "agent_cpu", "server_cpu", "stored")}
            out[s.name] = {"checkout": s.checkout, "compression": s.rows[0]["compression"], "full": s.full,
                           "median": {f: statistics.median(v) for f, v in col.items()},
                           "min": {f: min(v) for f, v in col.items()}, "max": {f: max(v) for f, v in col.items()},
                           "stored_total": s.full["stored"] + sum(col["stored"])}
            print(f"{s.name}: wall {summary(col['wall'])}  agent cpu {summary(col['agent_cpu'])}  "
                  f"server cpu {summary(col['server_cpu'])}  stored/incr {statistics.median(col['stored']) / 1e6:.1f} "
                  f"MB  total {out[s.name]['stored_total'] / 1e6:.1f} MB")
        print(f"A used less agent CPU in {wins} of {a.rounds} rounds")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
