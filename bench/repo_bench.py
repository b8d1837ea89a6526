"""Benchmark: backing a disk up into a repository -- nbdbackup vs restic vs borg, full and incremental.

Role: issue 11's figures, side by side in one run on the same machine and the
same images.  For each dataset and store:

1. a disk image: ``random`` (incompressible) or ``fs`` (an ext4 file system
   filled with an OS tree from /usr by ``mkfs.ext4 -d``, so it compresses and
   dedups like a real root disk);
2. ``nbdbackup serve`` exports it live; ours is ``nbdbackup agent backup``
   (a snapshot export, a persistent dirty bitmap rotated at that instant, a
   pull into the repository), full the first time; restic
   (``--repository-version 2 --compression auto``) and borg (lz4) back up the
   image file itself;
3. ~5% of the disk is changed through the live export (so our bitmap sees it;
   restic and borg see the changed file), in runs of 64 KiB to 4 MiB: random
   bytes for ``random``, bytes moved from elsewhere in the image for ``fs``
   (same compressibility);
4. incremental: the agent pulls only what the bitmap marks; restic and borg must
   reread the whole image to find the changes (that is the point);
5. restore of the last snapshot to a fresh file, timed until it is durable
   (ours fsyncs; restic and borg are followed by ``sync``): ``nbdbackup
   restore``; ``restic restore``; ``borg extract``.

Every tool runs with encryption on (ours ``--encryption repokey`` if this
checkout has it; restic always; borg ``repokey-blake2``) and compression on,
unless ``--plain``.  Ours runs twice, on two copies of the image given the
same changes, so both key settings are measured in one run (``--tools``):
``nbdbackup`` unlocks with a ``--kdf none`` key file (``repo key export --kdf
none``: no scrypt, what a scheduled run uses, docs/incr.md) and
``nbdbackup-scrypt`` with the passphrase (scrypt N=2^17, ~0.3 s per run, as
restic and borg pay their KDF each run).  ``--chunk-size`` is given to our
``repo init`` (default: its own, 1 MiB since format 2's default change);
``--incrementals N`` repeats change + incremental N times (medians).  On RGW
our agent's S3 API calls per run are reported (``requests``).  Our modules
are byte-compiled first (as an installed package is; with
PYTHONDONTWRITEBYTECODE set every run would compile them, ~40 ms).  Reported per (dataset, store, phase): wall seconds, CPU
seconds (ours: the agent process plus the server's CPU during the phase),
bytes stored in the repository after the phase; ratios ours/other (higher is
better: other's seconds / ours, other's bytes / ours).  Stores: ``local`` (a
directory on the same file system) and ``rgw`` (a one-node Ceph RADOS Gateway
started by this script, from tests/interop/ceph_rgw.py; restic's s3 backend;
borg has none, so it is local only).

Usage: .venv/bin/python bench/repo_bench.py [--size 1G] [--datasets random,fs]
       [--stores local,rgw] [--tools ours,ours-scrypt,restic,borg] [--plain] [--keep]
       [--chunk-size SIZE] [--incrementals N] [--baseline DIR]
``--baseline DIR`` adds ``nbdbackup-base``: another checkout's server and agent on a copy of the
image given the same changes, run in the same rounds (the order of the tools rotates from one
incremental to the next), for an A/B of two versions of ours.
Needs: restic, borg (Debian: restic, borgbackup), qemu-img, nbdkit; the
Ceph packages for rgw (scripts/setup installs them with the test set).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "interop"))

import common  # noqa: E402  (bench/common.py)
from nbdbackup.blockdev import parse_size  # noqa: E402

PASS = "bench-passphrase-not-secret"
CHANGE_UNIT = 64 * 1024
PY = [sys.executable, "-m", "nbdbackup.cli"]


# -- datasets -------------------------------------------------------------------

def make_fs_image(path: str, size: int, work: str) -> None:
    """An ext4 image of ``size`` bytes about 60% full of /usr files (mkfs.ext4 -d)."""
    tree = os.path.join(work, "tree")
    os.makedirs(tree)
    budget, used = int(size * 0.6), 0
    for top in ("/usr/lib", "/usr/share", "/usr/bin"):
        for name in sorted(os.listdir(top)):
            src = os.path.join(top, name)
            if os.path.islink(src):
                continue
            du = subprocess.run(["du", "-sb", src], capture_output=True, text=True)
            try:
                n = int(du.stdout.split()[0])
            except (IndexError, ValueError):
                continue
            if used + n > budget:
                continue
            dst = os.path.join(tree, top.strip("/").replace("/", "_"), name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            r = subprocess.run(["cp", "-al", src, dst], capture_output=True)  # hard links: no copy
            if r.returncode != 0:
                subprocess.run(["cp", "-a", src, dst], check=True)
            used += n
            if used > budget * 0.97:
                break
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", tree, "-E", "lazy_itable_init=0", path, str(size >> 10) + "k"],
                   check=True)
    shutil.rmtree(tree)


def changes(path: str, size: int, kind: str, seed: int = 1) -> list[tuple[int, bytes]]:
    """~5% of the disk as writes: runs of 64 KiB to 4 MiB at random 64 KiB-aligned places (a file
    system's changes come in extents, not in scattered sectors), as (offset, data) pieces of at most
    CHANGE_UNIT bytes."""
    rng = random.Random(seed)
    units = size // CHANGE_UNIT
    chosen: set[int] = set()
    while len(chosen) < max(1, units // 20):
        run_units = 1 << rng.randrange(7)
        start = rng.randrange(max(1, units - run_units + 1))
        chosen.update(range(start, min(units, start + run_units)))
    out = []
    with open(path, "rb") as f:
        for u in sorted(chosen):
            if kind == "random":
                data = os.urandom(CHANGE_UNIT)
            else:
                f.seek(rng.randrange(units) * CHANGE_UNIT)
                data = f.read(CHANGE_UNIT)
            out.append((u * CHANGE_UNIT, data))
    return out


async def apply_changes(uri: str, writes: list[tuple[int, bytes]]) -> None:
    from nbdbackup.nbd.client import connect

    c = await connect(uri)
    try:
        sem = asyncio.Semaphore(16)

        async def one(off: int, data: bytes) -> None:
            async with sem:
                await c.pwrite(data, off)

        await asyncio.gather(*(one(o, d) for o, d in writes))
        await c.flush()
    finally:
        await c.close()


# -- stores ---------------------------------------------------------------------

class Store:
    """Where a tool's repository lives: a local directory or a bucket on the RGW."""

    def __init__(self, kind: str, work: str, rgw=None) -> None:
        self.kind, self.work, self.rgw = kind, work, rgw

    def ours(self, name: str) -> str:
        return os.path.join(self.work, f"repo-{name}") if self.kind == "local" else f"s3://{self._bucket(name)}/r"

    def restic(self, name: str) -> str:
        return (os.path.join(self.work, f"restic-{name}") if self.kind == "local"
                else f"s3:{self.rgw.endpoint}/{self._bucket('restic-' + name)}")

    def _bucket(self, name: str) -> str:
        # one bucket per tool and workspace (the datasets of one run must not share one)
        b = "b" + "".join(ch for ch in name.lower() if ch.isalnum()) + "-" + os.path.basename(self.work)[-8:].lower()
        b = "".join(ch if ch.isalnum() or ch == "-" else "x" for ch in b)
        self.rgw.client().create_bucket(Bucket=b) if not self._exists(b) else None
        return b

    def _exists(self, b: str) -> bool:
        try:
            self.rgw.client().head_bucket(Bucket=b)
            return True
        except Exception:  # noqa: BLE001 - botocore's ClientError, 404
            return False

    def bytes_stored(self, repo: str) -> int:
        if self.kind == "local" or not (repo.startswith("s3://") or repo.startswith("s3:")):
            total = 0
            for d, _, files in os.walk(repo):
                for f in files:
                    try:
                        total += os.lstat(os.path.join(d, f)).st_blocks * 512
                    except FileNotFoundError:
                        pass
            return total
        bucket = repo.split("/")[2] if repo.startswith("s3://") else repo.rstrip("/").split("/")[-1]
        s3, total = self.rgw.client(), 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            total += sum(o["Size"] for o in page.get("Contents", ()))
        return total

    def env(self) -> dict:
        env = dict(os.environ, RESTIC_PASSWORD=PASS, BORG_PASSPHRASE=PASS, NBDBACKUP_PASSPHRASE=PASS,
                   BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
        if self.rgw is not None:
            env.update(self.rgw.env())
        return env


# -- the tools ------------------------------------------------------------------

def run(argv, env, *, cpu: bool = True, cwd: str | None = None) -> tuple[float, float, str]:
    """Run to completion; (wall s, CPU s of it and its children, stdout)."""
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(list(argv), env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=3600, cwd=cwd)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv[:4]))}... exited {r.returncode}: "
                           f"{r.stderr.decode(errors='replace')[-1500:]}")
    return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), r.stdout.decode(errors="replace")


def has_feature(*argv: str) -> bool:
    r = subprocess.run(PY + list(argv) + ["--help"], capture_output=True, text=True, cwd=ROOT)
    return r.returncode == 0


class Ours:
    """``nbdbackup serve`` over the image + pulls of its snapshot export into our repository."""

    name = "nbdbackup"

    def __init__(self, procs, ws, image: str, store: Store, plain: bool, verify: str = "off", *,
                 kdf: str = "none", chunk_size: str | None = None, tag: str = "ours",
                 checkout: str | None = None, compression: str = "zstd") -> None:
        self.store, self.env, self.verify = store, store.env(), verify
        #: Another checkout to run instead of this one (``--baseline``): its server and commands.
        self.cwd = checkout
        if checkout:
            self.env["PYTHONPATH"] = checkout
        self.snapshot = ""
        self.image = image
        self.repo = store.ours(tag)
        self.ctl = ws.socket(f"ctl-{tag}")
        self.sock = ws.socket(f"nbd-{tag}")
        self.work = str(ws.path)
        self.proc = procs.start(f"nbdbackup-{tag}",
                                [*PY, "serve", f"disk={image}", "--socket", self.sock, "--control", self.ctl,
                                 "--state-dir", os.path.join(self.work, f"state-{tag}")],
                                log_path=os.path.join(self.work, f"serve-{tag}.log"), env=self.env, cwd=self.cwd)
        common.wait_for_unix(self.ctl, proc=self.proc)
        self.uri = f"nbd+unix:///disk?socket={self.sock}"
        init = [*PY, "repo", "init", self.repo]
        init_help = subprocess.run(PY + ["repo", "init", "--help"], capture_output=True, text=True,
                                   cwd=self.cwd or ROOT, env=self.env).stdout
        if not plain and "--encryption" in init_help:
            init += ["--encryption", "repokey", "--compression", compression]
            self.encrypted = True
        else:
            self.encrypted = False
        if chunk_size:
            init += ["--chunk-size", chunk_size]
        run(init, self.env, cwd=self.cwd)
        #: How the agent unlocks the key: "none" (a --kdf none key file), "scrypt" (the passphrase),
        #: "-" (not encrypted, or this checkout has no --kdf: then the passphrase).
        self.kdf, self.key_args = "-", []
        if self.encrypted and kdf == "none" and "--kdf" in init_help:
            key = os.path.join(self.work, f"{tag}.key")
            run([*PY, "repo", "key", "export", "--kdf", "none", self.repo, key], self.env, cwd=self.cwd)
            self.kdf, self.key_args = "none", ["--key-file", key]
            self.env = {k: v for k, v in self.env.items() if k != "NBDBACKUP_PASSPHRASE"}  # not needed: prove it
        elif self.encrypted:
            self.kdf = "scrypt"
        self.requests: dict | None = None
        self.round = 0

    def backup(self) -> tuple[float, float]:
        """One ``nbdbackup agent backup`` run: full the first time, then incremental by the bitmap
        the agent rotated (what a user runs; ``--verify off`` like restic and borg, which do not
        re-read what they stored)."""
        self.round += 1
        cpu0 = common.proc_tree_cpu_seconds(self.proc.pid)
        t0 = time.perf_counter()
        argv = [*PY, "agent", "backup", "--control", self.ctl, "--nbd", f"nbd+unix:///?socket={self.sock}",
                "--disk", "disk", "--repo", self.repo, "--verify", self.verify, "--json", "--progress", "never",
                *self.key_args]
        _, cpu, out = run(argv, self.env, cwd=self.cwd)
        report = json.loads(out)
        (d,) = report["disks"]
        self.requests = report.get("store_requests")
        want = "full" if self.round == 1 else "incremental"
        if d.get("kind") != want:
            raise RuntimeError(f"agent run {self.round} was {d.get('kind')}, not {want}: {d.get('reason')}")
        self.snapshot = d["snapshot"]
        return time.perf_counter() - t0, cpu + common.proc_tree_cpu_seconds(self.proc.pid) - cpu0

    def restore(self, out: str) -> tuple[float, float]:
        snap = self.snapshot
        if has_feature("restore"):
            dt, cpu, _ = run([*PY, "restore", self.repo, snap, out, *self.key_args], self.env, cwd=self.cwd)
            return dt, cpu
        raise RuntimeError("this checkout has no 'nbdbackup restore'")

    def bytes_stored(self) -> int:
        return self.store.bytes_stored(self.repo)


class Restic:
    name = "restic"

    def __init__(self, image: str, store: Store, plain: bool) -> None:
        self.image, self.store, self.env = image, store, store.env()
        self.repo = store.restic("r")
        self.env["RESTIC_REPOSITORY"] = self.repo
        self.comp = "off" if plain else "auto"
        run(["restic", "init", "--repository-version", "2"], self.env)

    def backup(self) -> tuple[float, float]:
        dt, cpu, _ = run(["restic", "backup", "--compression", self.comp, self.image], self.env)
        return dt, cpu

    def restore(self, out_dir: str) -> tuple[float, float]:
        dt, cpu, _ = run(["restic", "restore", "latest", "--target", out_dir], self.env)
        return dt, cpu

    def bytes_stored(self) -> int:
        return self.store.bytes_stored(self.repo)


class Borg:
    name = "borg"

    def __init__(self, image: str, store: Store, plain: bool) -> None:
        self.image, self.env = image, store.env()
        self.repo = os.path.join(store.work, "borg-r")
        self.comp = "none" if plain else "lz4"
        run(["borg", "init", "--encryption", "none" if plain else "repokey-blake2", self.repo], self.env)
        self.round = 0

    def backup(self) -> tuple[float, float]:
        self.round += 1
        dt, cpu, _ = run(["borg", "create", "--compression", self.comp, f"{self.repo}::a{self.round}", self.image],
                         self.env)
        return dt, cpu

    def restore(self, out_dir: str) -> tuple[float, float]:
        argv = ["borg", "extract", f"{self.repo}::a{self.round}"]
        import resource

        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(argv, env=self.env, cwd=out_dir, capture_output=True)
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode:
            raise RuntimeError(f"borg extract: {r.stderr.decode(errors='replace')[-1500:]}")
        return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)

    def bytes_stored(self) -> int:
        return Store("local", "").bytes_stored(self.repo)


# -- the run --------------------------------------------------------------------

def one(res: common.Results, dataset: str, store_kind: str, a, rgw) -> None:
    size = parse_size(a.size)
    with common.Workspace("bench-repo-", keep=a.keep) as ws, common.Procs() as procs:
        work = str(ws.path)
        image = os.path.join(work, "disk.raw")
        t0 = time.perf_counter()
        if dataset == "random":
            common.make_random_file(image, size)
        else:
            make_fs_image(image, size, work)
        print(f"# {dataset} {size >> 20} MiB image made in {time.perf_counter() - t0:.1f} s; store {store_kind}",
              flush=True)
        store = Store(store_kind, work, rgw)
        tools = []
        for t in a.tools:
            if t in ("ours", "ours-scrypt", "ours-base"):
                img = image
                if t != "ours" and "ours" in a.tools:  # its own copy: the same changes go to both
                    img = os.path.join(work, f"disk-{t}.raw")
                    subprocess.run(["cp", "--reflink=auto", "--sparse=always", image, img], check=True)
                o = Ours(procs, ws, img, store, a.plain, a.verify, kdf="scrypt" if t == "ours-scrypt" else "none",
                         chunk_size=a.chunk_size, tag=t.replace("-", ""),
                         checkout=a.baseline if t == "ours-base" else None, compression=a.compression)
                if t != "ours":
                    o.name = {"ours-scrypt": "nbdbackup-scrypt", "ours-base": "nbdbackup-base"}[t]
                res.meta.setdefault("kdf", {})[o.name] = o.kdf
                print(f"# {o.name}: key unlocked with kdf {o.kdf}", flush=True)
                tools.append(o)
            elif t == "restic":
                tools.append(Restic(image, store, a.plain))
            elif t == "borg" and store_kind == "local":
                tools.append(Borg(image, store, a.plain))
        tag = f"{dataset}/{store_kind}"

        def record(phase: str, tool, dt: float, cpu: float, stored: int | None) -> None:
            for metric, unit, v in ((f"{tag} {phase} time", "s", dt), (f"{tag} {phase} cpu", "s", cpu)):
                res.add_metric(common.Metric(metric, unit, higher_is_better=False))
                res.add(metric, tool.name, v)
            if stored is not None:
                m = f"{tag} {phase} stored"
                res.add_metric(common.Metric(m, "MB", higher_is_better=False))
                res.add(m, tool.name, stored / 1e6)
            reqs = getattr(tool, "requests", None) if phase != "restore" else None
            if reqs:
                m = f"{tag} {phase} requests"
                res.add_metric(common.Metric(m, "calls", higher_is_better=False))
                res.add(m, tool.name, sum(reqs.values()))
            print(f"  {tool.name:16} {phase:12} {dt:7.2f} s  cpu {cpu:7.2f} s"
                  + (f"  stored {stored / 1e6:9.1f} MB" if stored is not None else "")
                  + (f"  S3 calls {sum(reqs.values())} {reqs}" if reqs else ""), flush=True)

        for tool in tools:
            subprocess.run(["sync"])
            dt, cpu = tool.backup()
            record("full", tool, dt, cpu, tool.bytes_stored())
        for k in range(a.incrementals):
            writes = changes(image, size, dataset, seed=1 + k)
            ours = [t for t in tools if isinstance(t, Ours)]
            for o in ours:  # through each server, so its bitmap sees them (same bytes for every copy)
                asyncio.run(apply_changes(o.uri, writes))
            if not any(o.image == image for o in ours):
                with open(image, "r+b") as f:
                    for off, data in writes:
                        f.seek(off)
                        f.write(data)
            for tool in tools[k % len(tools):] + tools[:k % len(tools)]:  # rotated: no tool always first
                subprocess.run(["sync"])
                dt, cpu = tool.backup()
                record("incremental", tool, dt, cpu, tool.bytes_stored())
        for tool in tools:
            out_dir = os.path.join(work, f"restore-{tool.name}")
            os.makedirs(out_dir)
            out = os.path.join(out_dir, "disk.raw")
            subprocess.run(["sync"])
            try:
                dt, cpu = tool.restore(out if isinstance(tool, Ours) else out_dir)
                # durable, as ours is (it fsyncs the target; restic and borg leave it to writeback)
                t_sync = time.perf_counter()
                subprocess.run(["sync"])
                dt += time.perf_counter() - t_sync
            except RuntimeError as e:
                print(f"  {tool.name:10} restore      skipped: {e}", flush=True)
                res.add_error(f"{tag} restore time", tool.name, str(e))
                continue
            got = out if isinstance(tool, Ours) else _find_file(out_dir, "disk.raw")
            same = subprocess.run(["cmp", "-s", got, tool.image if isinstance(tool, Ours) else image]).returncode == 0
            record("restore", tool, dt, cpu, None)
            if not same:
                print(f"  {tool.name}: RESTORED IMAGE DIFFERS", flush=True)
                res.add_error(f"{tag} restore time", tool.name, "restored image differs")
            shutil.rmtree(out_dir)


def _find_file(d: str, name: str) -> str:
    for root, _, files in os.walk(d):
        if name in files:
            return os.path.join(root, name)
    raise FileNotFoundError(f"{name} under {d}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--datasets", default="random,fs")
    ap.add_argument("--stores", default="local,rgw")
    ap.add_argument("--tools", default="ours,ours-scrypt,restic,borg",
                    help="ours (key unlocked from a --kdf none key file), ours-scrypt (from the passphrase), "
                         "restic, borg")
    ap.add_argument("--chunk-size", metavar="SIZE", help="our repo init --chunk-size (default: repo init's)")
    ap.add_argument("--compression", default="zstd", metavar="zstd[:LEVEL]",
                    help="our repo init --compression when encrypted (default zstd: adaptive, level 3 for "
                         "full backups and 1 for incrementals; a checkout without the adaptive setting reads "
                         "it as zstd:3)")
    ap.add_argument("--baseline", metavar="DIR",
                    help="another checkout (e.g. a 'git worktree' of main): tool ours-base runs its server and "
                         "commands (this interpreter, cwd and PYTHONPATH DIR), interleaved with ours, on a copy "
                         "of the image given the same changes (A/B)")
    ap.add_argument("--incrementals", type=int, default=1, metavar="N",
                    help="change ~5%% and back up incrementally N times (medians; bytes stored after each)")
    ap.add_argument("--plain", action="store_true", help="no encryption, no compression (all tools)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--verify", default="off", choices=["off", "sample", "full"],
                    help="our agent's --verify (restic and borg do not re-read what they store)")
    ap.add_argument("--no-json", action="store_true")
    a = ap.parse_args()
    common.warm_guest_memory()  # before any file is made: docs in bench/common.py
    common.sigterm_as_interrupt()
    a.tools = a.tools.split(",")
    if "ours-base" in a.tools and not a.baseline:
        ap.error("--tools ours-base needs --baseline DIR")
    if a.baseline and "ours-base" not in a.tools:
        a.tools.append("ours-base")
    for t in ("restic", "borg"):
        if t in a.tools and shutil.which(t) is None:
            # A comparison tool that is not installed is left out, said loudly (the
            # results name only the tools that ran); `apt-get install restic borgbackup`.
            print(f"# {t}: not installed (not on PATH): left out of this run", file=sys.stderr, flush=True)
            a.tools.remove(t)
    res = common.Results("repo")
    # Byte-compile our modules once, as an installed package is (PYTHONDONTWRITEBYTECODE, set in some
    # environments, would otherwise make every agent run compile them again: ~40 ms each).
    for checkout in (ROOT, a.baseline):
        if checkout:
            subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(checkout, "nbdbackup")],
                           stdout=subprocess.DEVNULL)
    res.meta.update(commit=common.git_commit(), machine=common.machine_info(), size=a.size, plain=a.plain,
                    chunk_size=a.chunk_size or "repo init default", incrementals=a.incrementals,
                    compression=a.compression,
                    versions={"restic": common.tool_version(["restic", "version"]),
                              "borg": common.tool_version(["borg", "--version"])})
    rgw = None
    stores = a.stores.split(",")
    try:
        if "rgw" in stores:
            import ceph_rgw

            rgw_dir = os.path.join("/tmp", f"bench-rgw-{os.getpid()}")
            os.makedirs(rgw_dir)
            rgw = ceph_rgw.start(rgw_dir, memstore_bytes=max(8 << 30, 6 * parse_size(a.size)))
        for dataset in a.datasets.split(","):
            for store in stores:
                one(res, dataset, store, a, rgw)
    finally:
        if rgw is not None:
            rgw.stop()
            shutil.rmtree(rgw.dir, ignore_errors=True)
    tools = [{"ours": "nbdbackup", "ours-scrypt": "nbdbackup-scrypt", "ours-base": "nbdbackup-base"}.get(t, t)
             for t in a.tools]
    print()
    print(common.format_table(res, tools, ours="nbdbackup"))
    if not a.no_json:
        print(f"\nresults: {common.write_json(res, ours='nbdbackup')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
