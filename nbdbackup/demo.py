"""The demo: a point-in-time backup of a disk that keeps taking writes.

Role: the README's main-job command (``./scripts/demo``).  It runs the real
thing end to end, with nothing mocked:

1. makes a demo disk (a raw file full of varied data) and records its blake3;
2. starts ``nbdbackup serve`` (a subprocess) with a live export and a control
   socket;
3. starts a backup (``backup-start``, sync full, rate-limited so the run is
   watchable) while a writer keeps overwriting random ranges of the live
   export over NBD;
4. shows the pump's progress from ``query-jobs``;
5. proves at the end, with blake3, that the target and the snapshot export
   equal the disk as it was when the backup started, while the live disk moved
   on;
6. pulls the snapshot export with the pull agent (``nbdbackup pull``, as a
   remote agent would) and checks the pulled copy and the push target against
   the pull's blake3 chunk manifest (``nbdbackup verify``).

Exit status 0 only when every proof holds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import blake3

from .blockdev import parse_size
from .control.client import ControlClient
from .nbd.client import connect

CHUNK = 4 * 1024 * 1024


def _say(msg: str) -> None:
    print(msg, flush=True)


def make_disk(path: str, size: int, seed: int) -> str:
    """Write a disk of varied content (random, repeated and zero regions); return its blake3."""
    rng = random.Random(seed)
    h = blake3.blake3()
    with open(path, "wb") as f:
        pos = 0
        while pos < size:
            n = min(CHUNK, size - pos)
            kind = rng.random()
            if kind < 0.15:
                data = bytes(n)  # zeros: the pump turns these into holes
            elif kind < 0.35:
                data = bytes([rng.randrange(256)]) * n
            else:
                data = rng.randbytes(n)
            f.write(data)
            h.update(data)
            pos += n
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def file_digest(path: str) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


async def export_digest(uri: str) -> str:
    h = blake3.blake3()
    async with await connect(uri) as c:
        buf = bytearray(CHUNK)
        pos = 0
        while pos < c.size:
            n = min(CHUNK, c.size - pos)
            mv = memoryview(buf)[:n]
            await c.pread(mv, pos)
            h.update(mv)
            pos += n
    return h.hexdigest()


async def writer(uri: str, stop: asyncio.Event, stats: dict) -> None:
    """Overwrite random ranges of the live export until told to stop."""
    rng = random.Random(7)
    async with await connect(uri) as c:
        size = c.size
        while not stop.is_set():
            length = rng.choice([4096, 65536, 512 * 1024, 1 << 20])
            offset = rng.randrange(0, size - length) // 512 * 512
            await c.pwrite(rng.randbytes(length), offset)
            stats["writes"] += 1
            stats["bytes"] += length
            await asyncio.sleep(0.002)
        await c.flush()


def _bar(done: int, total: int, width: int = 40) -> str:
    frac = done / total if total else 1.0
    fill = int(frac * width)
    return "[" + "#" * fill + "." * (width - fill) + f"] {frac * 100:5.1f}%"


async def pull_and_verify(work: str, snap_uri: str, target: str, original: str) -> bool:
    """Step 6: pull the snapshot export like a remote agent, then verify copies against the manifest."""
    pulled = os.path.join(work, "pulled.img")
    manifest = os.path.join(work, "pulled.json")
    _say("5. pull agent: nbdbackup pull of the snapshot export (reads only allocated data)")

    async def cli(*argv: str) -> tuple[int, str]:
        p = await asyncio.create_subprocess_exec(sys.executable, "-m", "nbdbackup.cli", *argv,
                                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await p.communicate()
        return p.returncode or 0, out.decode().strip()

    rc, out = await cli("pull", snap_uri, pulled, "--manifest", manifest)
    for line in out.splitlines():
        _say(f"   {line}")
    if rc != 0:
        return False
    ok = file_digest(pulled) == original
    _say(f"   pulled copy {'== start' if ok else '!= start  FAIL'}")
    for what, path in (("pulled copy", pulled), ("push target", target)):
        rc, out = await cli("verify", path, "--manifest", manifest)
        _say(f"   verify {what}: {out.splitlines()[-1] if out else rc}")
        ok = ok and rc == 0
    return ok


async def run(args: argparse.Namespace) -> int:
    work = tempfile.mkdtemp(prefix="nbdbackup-demo-", dir="/tmp")
    disk = os.path.join(work, "disk.img")
    target = os.path.join(work, "backup.img")
    sock = os.path.join(work, "nbd.sock")
    ctl = os.path.join(work, "control.sock")
    size = parse_size(args.size)
    speed = parse_size(args.speed)
    proc = None
    try:
        _say(f"1. demo disk: {disk} ({size >> 20} MiB of random, repeated and zero data)")
        original = make_disk(disk, size, seed=1)
        _say(f"   blake3 at start: {original}")

        _say("2. nbdbackup serve: live export 'disk' + control socket")
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbdbackup.cli", "serve", "--socket", sock, "--control", ctl, f"disk={disk}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if not args.verbose else None,
        )
        for _ in range(200):
            if os.path.exists(sock) and os.path.exists(ctl):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
            await asyncio.sleep(0.05)
        live_uri = f"nbd+unix:///disk?socket={sock}"
        snap_uri = f"nbd+unix:///disk@demo?socket={sock}"

        async with ControlClient(ctl) as qmp:
            _say(f"3. backup-start sync=full target={target} speed={speed >> 20} MiB/s, "
                 "while a writer overwrites the live disk")
            t0 = time.monotonic()
            await qmp.execute("backup-start", {
                "export": "disk", "job-id": "demo", "sync": "full", "target": target,
                "snapshot": "disk@demo", "speed": speed,
            })
            stop = asyncio.Event()
            stats = {"writes": 0, "bytes": 0}
            wtask = asyncio.create_task(writer(live_uri, stop, stats))
            status = "running"
            job: dict = {}
            while True:
                jobs = await qmp.execute("query-jobs")
                job = next(j for j in jobs if j["id"] == "demo")
                status = job["status"]
                line = (f"\r   {_bar(job['current-progress'], job['total-progress'])} "
                        f"{job['current-progress'] >> 20}/{job['total-progress'] >> 20} MiB  "
                        f"live writes: {stats['writes']}  status: {status}   ")
                sys.stdout.write(line if sys.stdout.isatty() else "")
                sys.stdout.flush()
                if status in ("concluded", "null"):
                    break
                if wtask.done():
                    wtask.result()
                await asyncio.sleep(0.2)
            stop.set()
            await wtask
            elapsed = time.monotonic() - t0
            if sys.stdout.isatty():
                sys.stdout.write("\n")
            _say(f"   job {status} in {elapsed:.1f} s: copied by pump {job.get('bytes-copied-by-pump', '?')} B, "
                 f"by copy-before-write {job.get('bytes-copied-by-cbw', '?')} B; "
                 f"{stats['writes']} live writes ({stats['bytes'] >> 20} MiB) meanwhile")
            if job.get("error"):
                _say(f"   job failed: {job['error']}")
                return 1

            _say("4. proofs (blake3)")
            target_digest = file_digest(target)
            snap_digest = await export_digest(snap_uri)
            live_digest = await export_digest(live_uri)
            ok_target = target_digest == original
            ok_snap = snap_digest == original
            moved = live_digest != original
            _say(f"   target   {target_digest}  {'== start' if ok_target else '!= start  FAIL'}")
            _say(f"   snapshot {snap_digest}  {'== start' if ok_snap else '!= start  FAIL'}")
            _say(f"   live     {live_digest}  {'moved on' if moved else 'unchanged (no write landed?)'}")
            ok_pull = await pull_and_verify(work, snap_uri, target, original)
            await qmp.execute("job-dismiss", {"id": "demo"})
        ok = ok_target and ok_snap and moved and ok_pull
        _say("RESULT: " + ("the backup is the disk exactly as it was at the start" if ok else "FAILED"))
        return 0 if ok else 1
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if args.keep:
            _say(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nbdbackup-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="256M", help="demo disk size (default 256M)")
    p.add_argument("--speed", default="64M", help="backup speed limit in bytes/s (default 64M)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("-v", "--verbose", action="store_true", help="show the server's log")
    args = p.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
