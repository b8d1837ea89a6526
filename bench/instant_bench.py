"""Benchmark: instant recovery vs restoring first (``nbdbackup restore`` / qemu-img + the nbdkit plugin, restic).

Role: the two figures that matter for instant recovery (docs/instant.md):

- **first-read latency of a chunk not restored yet**: a restoring export
  (``serve vm=restore:REPO#s0,target=OUT``) is started; a libnbd client
  reads 4 KiB from chunks the background job has not reached, one at a time,
  (a) with the job held back (``speed=1``: only copy-on-read fetches) and (b)
  while the job restores at full speed (on-demand fetches have priority);
  median / p90 / max in milliseconds.  Also the time from starting the
  server to the first byte read.
- **total restore time** of the whole snapshot into a fresh file, durable:
  our restore job (server start -> job concluded, the target flushed),
  against ``nbdbackup restore REPO SNAP OUT`` when this checkout has it,
  else ``qemu-img convert`` from nbdkit + ``plugins/restore.py`` (the
  restore path before it), and ``restic restore`` of the same image backed
  up into a restic repository.  Each is followed by ``sync`` (in the time);
both repositories are read into the page cache before each run.  Our time
includes starting the server (Python start-up, ~0.5 s).

The image: random data in ``--data`` of its chunks, the rest zero (holes).
Repositories on the local file system under ``--dir``.

Usage: .venv/bin/python bench/instant_bench.py [--size 1G] [--rounds 1] [--reads 20] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402  (bench/common.py)
from nbdbackup.blockdev import parse_size  # noqa: E402

PY = sys.executable


def make_image(path: str, size: int, chunk: int, data: float, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // chunk):
            if rng.random() < data:
                f.seek(i * chunk)
                f.write(rng.randbytes(chunk))


def store_image(repo: str, name: str, path: str, chunk: int) -> None:
    from nbdbackup.agent.manifest import Manifest
    from nbdbackup.agent.repo import Repository, open_store

    st = open_store(repo)
    rep = Repository.init(st, chunk)
    man = Manifest(os.path.getsize(path), rep.chunk_size)
    with open(path, "rb") as f:
        for i in range(man.count):
            d = f.read(rep.chunk_size)
            cid = rep.chunk_id(d)
            rep.put_chunk(cid, d)
            man.chunks[i] = cid
    with st.lock(False):
        rep.save_snapshot(name, man)


def warm(*dirs: str) -> None:
    """Read every file under ``dirs`` (the page cache then holds both
    repositories: every tool starts equally warm, whatever ran before)."""
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                with open(os.path.join(root, f), "rb") as fh:
                    while fh.read(8 << 20):
                        pass


def timed(argv, env=None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {r.returncode}: {r.stderr.decode(errors='replace')[-2000:]}")
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


def query_jobs(ctl: str) -> dict:
    from nbdbackup.control.client import ControlClient

    async def q():
        async with ControlClient(ctl) as c:
            return {j["id"]: j for j in await c.execute("query-jobs")}

    return asyncio.run(q())


def start_restore(procs, ws, repo: str, out: str, speed: str, tag: str):
    sock, ctl = ws.socket(f"n{tag}"), ws.socket(f"c{tag}")
    for p in (sock, ctl):
        if os.path.exists(p):
            os.unlink(p)
    t0 = time.perf_counter()
    p = procs.start("serve", [PY, "-m", "nbdbackup.cli", "serve", "--socket", sock, "--control", ctl,
                              f"vm=restore:{repo}#s0,target={out},speed={speed}"],
                    log_path=str(ws.path / f"serve-{tag}.log"))
    common.wait_for_unix(sock, 30, p)
    common.wait_until(lambda: os.path.exists(ctl), 30, p, "the control socket")
    return p, sock, ctl, t0


def first_reads(procs, ws, repo: str, size: int, chunk: int, speed: str, nreads: int, tag: str) -> dict:
    import nbd

    out = str(ws.path / f"first-{tag}.raw")
    p, sock, ctl, t0 = start_restore(procs, ws, repo, out, speed, tag)
    h = nbd.NBD()
    h.set_export_name("vm")
    h.connect_unix(sock)
    ttfb = None
    lat = []
    rng = random.Random(7)
    # from the last chunk backwards: the job works from the front and has not reached them
    n = size // chunk
    cands = list(range(n - 1, max(n // 2, n - 1 - nreads), -1))
    for c in cands:
        off = c * chunk + rng.randrange(0, chunk - 4096)
        a = time.perf_counter()
        h.pread(4096, off)
        b = time.perf_counter()
        if ttfb is None:
            ttfb = b - t0
        lat.append((b - a) * 1000)
    h.shutdown()
    j = query_jobs(ctl)["restore-vm"]
    procs.stop(p)
    lat.sort()
    return {"speed": speed, "reads": len(lat), "median_ms": statistics.median(lat),
            "p90_ms": lat[int(0.9 * (len(lat) - 1))], "max_ms": lat[-1], "start_to_first_byte_s": ttfb,
            "job_bytes_by_pump_meanwhile": j["bytes-copied-by-pump"]}


def ours_total(procs, ws, repo: str, r: int) -> float:
    out = str(ws.path / f"ours-{r}.raw")
    p, sock, ctl, t0 = start_restore(procs, ws, repo, out, "0", f"t{r}")
    while True:
        j = query_jobs(ctl)["restore-vm"]
        if j["status"] == "concluded":
            break
        time.sleep(0.02)
    dt = time.perf_counter() - t0  # concluded = every chunk written and the target flushed
    assert "error" not in j, j
    procs.stop(p)
    subprocess.run(["sync"], check=True)
    os.unlink(out)
    return dt


def has_restore_command() -> bool:
    r = subprocess.run([PY, "-m", "nbdbackup.cli", "restore", "--help"], capture_output=True)
    return r.returncode == 0


def baseline_cmd(repo: str, out: str) -> tuple[str, list[str]]:
    if has_restore_command():
        return "nbdbackup restore", [PY, "-m", "nbdbackup.cli", "restore", repo, "s0", out]
    plugin = os.path.join(ROOT, "plugins", "restore.py")
    return "qemu-img convert (nbdkit restore.py)", [
        "nbdkit", "-U", "-", "python", plugin, f"repo={repo}", "snapshot=s0", "--run",
        f"qemu-img convert -f raw -O raw -W -m 4 $nbd {out}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--chunk-size", default="4M", help="the repository's chunk size")
    ap.add_argument("--data", type=float, default=0.7, help="fraction of chunks holding data")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--reads", type=int, default=20, help="first reads measured per case")
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    a = ap.parse_args()
    common.warm_guest_memory()  # before any file is made: docs in bench/common.py
    size, chunk = parse_size(a.size), parse_size(a.chunk_size)
    res: dict = {"size": size, "chunk_size": chunk, "data_fraction": a.data, "machine": common.machine_info()}
    with common.Workspace("bench-restore-", parent=a.dir) as ws, common.Procs() as procs:
        img, repo, rrepo = str(ws.path / "disk.raw"), str(ws.path / "repo"), str(ws.path / "restic")
        make_image(img, size, chunk, a.data)
        store_image(repo, "s0", img, chunk)
        env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=rrepo)
        subprocess.run(["restic", "init", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(["restic", "backup", "-q", img], env=env, check=True, capture_output=True)
        print(f"# {size >> 20} MiB image, {chunk >> 10} KiB chunks, {a.data:.0%} data; repositories in {a.dir}")

        res["first_read_job_held"] = first_reads(procs, ws, repo, size, chunk, "1", a.reads, "held")
        res["first_read_job_running"] = first_reads(procs, ws, repo, size, chunk, "0", a.reads, "run")
        for k in ("first_read_job_held", "first_read_job_running"):
            v = res[k]
            print(f"{k:26s} median {v['median_ms']:7.1f} ms  p90 {v['p90_ms']:7.1f} ms  max {v['max_ms']:7.1f} ms"
                  f"  (server start -> first byte {v['start_to_first_byte_s']:.2f} s)")

        name, bcmd = baseline_cmd(repo, str(ws.path / "base.raw"))
        totals: dict[str, list[float]] = {"instant (restore job)": [], name: [], "restic restore": []}
        for r in range(a.rounds):
            warm(repo, rrepo)
            totals["instant (restore job)"].append(ours_total(procs, ws, repo, r))
            out = str(ws.path / "base.raw")
            warm(repo, rrepo)
            totals[name].append(timed(bcmd))
            os.unlink(out)
            rdir = str(ws.path / "restic-out")
            warm(repo, rrepo)
            totals["restic restore"].append(timed(["restic", "restore", "-q", "latest", "--target", rdir], env))
            subprocess.run(["rm", "-rf", rdir], check=True)
        res["total_s"] = {k: statistics.median(v) for k, v in totals.items()}
        for k, v in res["total_s"].items():
            print(f"total restore, {k:40s} {v:7.2f} s  ({size / v / 1e6:6.0f} MB/s)")
        print("(instant recovery: the disk is usable after "
              f"{res['first_read_job_held']['start_to_first_byte_s']:.2f} s instead of after the restore)")
    if a.json:
        print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
