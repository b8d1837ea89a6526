"""Benchmark aid: where the threaded pull's pipeline waits (per-stage timeline).

Role: one in-process pull (1 GiB random image, nbdkit ``file`` plugin, Unix
socket, 4 connections, blake3 manifest, fresh file) with the stages timed
by wrapping them (`agent.pullthreads`, `agent.filewriter`): per receiving
thread the seconds inside ``recv_into`` (waiting for nbdkit + the copy),
inside ``sendall``, waiting for a free chunk buffer (a hash+write job not
done), and the rest (Python); per writer job the hash and the write
seconds; sampled every ~2 ms: the disk's writes in flight
(``/sys/block/DEV/inflight``) and the jobs in flight on the writer pool.
The wrappers cost a little CPU (a few us per call), so the absolute time is
a bit above an unwrapped pull; the split is what this is for.

Environment knobs of the pull (``NBDBACKUP_PULL_NBUF`` ...) apply as usual.

Usage: .venv/bin/python bench/pull_timeline.py [--size 1G] [--rounds 2] [--connections 4] [--dev vda]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from client_read import random_nbdkit_export  # noqa: E402
from nbdbackup.agent import filewriter, pullthreads  # noqa: E402
from nbdbackup.agent.pull import pull  # noqa: E402
from nbdbackup.blockdev import parse_size  # noqa: E402
from nbdbackup.blockdev.file import FileDev  # noqa: E402
from nbdbackup.blockdev.nbd import NBDDev  # noqa: E402
from nbdbackup.commands import run_async  # noqa: E402

T = collections.defaultdict(float)  # (thread name, stage) -> seconds
N = collections.Counter()
jobs_in_flight = 0
samples: list[tuple[int, int]] = []
FIRST: list[float] = []  # write start times
LAST: list[float] = []  # write end times
BODY: list[float] = []  # pull body start
RECVS: list = []  # (start, end, bytes, thread)
SENDS: list[float] = []  # READ header batches sent
SUBMITS: list[float] = []  # chunks handed to the writers  # (disk writes in flight, jobs in flight)
now = time.perf_counter


class _Sock:
    def __init__(self, s):
        self._s = s

    def recv_into(self, buf):
        t = now()
        n = self._s.recv_into(buf)
        RECVS.append((t, now(), n, threading.current_thread().name))
        T[(threading.current_thread().name, "recv")] += now() - t
        N[(threading.current_thread().name, "recv")] += 1
        return n

    def sendall(self, b):
        t = now()
        SENDS.append(t)
        self._s.sendall(b)
        T[(threading.current_thread().name, "send")] += now() - t

    def __getattr__(self, k):
        return getattr(self._s, k)


_orig_init = pullthreads._Lent.__init__


def _init(self, client, timeout):
    _orig_init(self, client, timeout)
    self.sock = _Sock(self.sock)


class _TimedFuture(Future):
    def exception(self, timeout=None):
        t = now()
        try:
            return super().exception(timeout)
        finally:
            T[(threading.current_thread().name, "wait-buffer")] += now() - t


_orig_submit = filewriter.ChunkWriter.submit


def _submit(self, mv, base, pieces, chunk_id):
    global jobs_in_flight
    SUBMITS.append(now())
    f2 = _TimedFuture()
    jobs_in_flight += 1

    def done(f):
        global jobs_in_flight
        jobs_in_flight -= 1
        e = f.exception()
        f2.set_exception(e) if e is not None else f2.set_result(f.result())

    _orig_submit(self, mv, base, pieces, chunk_id).add_done_callback(done)
    return f2


_orig_write = filewriter.FileWriter.write


def _write(self, mv, offset):
    t = now()
    FIRST.append(t)
    try:
        return _orig_write(self, mv, offset)
    finally:
        LAST.append(now())
        T[("writers", "write")] += now() - t
        N[("writers", "write")] += 1


def _timed_id(chunk_id):
    def f(mv):
        t = now()
        try:
            return chunk_id(mv)
        finally:
            T[("writers", "hash")] += now() - t
    return f


_orig_job = filewriter.ChunkWriter._job


def _job(self, mv, base, pieces, chunk_id):
    t = now()
    try:
        return _orig_job(self, mv, base, pieces, _timed_id(chunk_id) if chunk_id else None)
    finally:
        T[("writers", "job")] += now() - t


def _busy(starts, ends) -> float:
    """Seconds with at least one write in flight (writes as [start, end) pairs, same order)."""
    ev = sorted([(t, 1) for t in starts] + [(t, -1) for t in ends])
    busy, depth, since = 0.0, 0, 0.0
    for t, d in ev:
        if depth == 0 and d > 0:
            since = t
        depth += d
        if depth == 0:
            busy += t - since
    return busy


def _sampler(dev: str, stop: threading.Event) -> None:
    path = f"/sys/block/{dev}/inflight"
    while not stop.is_set():
        try:
            with open(path) as f:
                w = int(f.read().split()[1])
        except OSError:
            w = -1
        samples.append((w, jobs_in_flight))
        time.sleep(0.002)


async def one(uri, out, size, conns):
    if os.path.exists(out):
        os.unlink(out)
    subprocess.run(["sync"], check=True)
    t0 = now()
    src = await NBDDev.open(uri, read_only=True, connections=conns)
    with open(out, "wb") as f:
        f.truncate(size)
    dst = FileDev(out)
    t1 = now()
    BODY.append(t1)
    try:
        _, st = await pull(src, dst, fresh=True)
    finally:
        t2 = now()
        await dst.close()
        await src.close()
    return t1 - t0, t2 - t1, st


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--dev", default="vda")
    ap.add_argument("--dir", default="/tmp")
    a = ap.parse_args()
    import common  # bench/common.py: touch fresh guest memory once per boot
    common.warm_guest_memory()
    pullthreads._Lent.__init__ = _init
    filewriter.ChunkWriter.submit = _submit
    filewriter.FileWriter.write = _write
    filewriter.ChunkWriter._job = _job
    size = parse_size(a.size)
    with random_nbdkit_export("bench-pulltl-", a.dir, size, a.connections) as (ws, procs, image, uri):
        d = str(ws.path)
        out = os.path.join(d, "copy.raw")
        for r in range(a.rounds):
            T.clear()
            N.clear()
            samples.clear()
            FIRST.clear()
            LAST.clear()
            BODY.clear()
            SENDS.clear()
            RECVS.clear()
            SUBMITS.clear()
            stop = threading.Event()
            th = threading.Thread(target=_sampler, args=(a.dev, stop), daemon=True)
            th.start()
            t_open, body, st = run_async(one(uri, out, size, a.connections))
            stop.set()
            th.join()
            print(f"round {r + 1}: open {t_open:.3f} s, pull body {body:.3f} s "
                  f"({size / body / 1e6:.0f} MB/s), receive {st.receive}")
            b0 = BODY[0]
            print(f"  sends at {', '.join(f'{t - b0:.3f}' for t in sorted(SENDS)[:10])}; "
                  f"first submits at {', '.join(f'{t - b0:.3f}' for t in sorted(SUBMITS)[:10])}")
            if os.environ.get("TL_RECVS"):
                for t, e, n, th in sorted(RECVS)[:int(os.environ["TL_RECVS"])]:
                    print(f"    recv {th} {t - b0:.4f}-{e - b0:.4f} {n}")
            print(f"  first write starts at {min(FIRST) - BODY[0]:.3f} s, last ends at {max(LAST) - BODY[0]:.3f} s; "
                  f"writing (any write in flight) {_busy(FIRST, LAST):.3f} s")
            for k in sorted({k[0] for k in T if k[0].startswith("pull-recv")}):
                rv, sd, wb = T[(k, "recv")], T[(k, "send")], T[(k, "wait-buffer")]
                print(f"  {k}: recv {rv:.3f} s ({N[(k, 'recv')]} calls), send {sd:.3f}, "
                      f"wait for a free buffer {wb:.3f}, other {body - rv - sd - wb:.3f}")
            print(f"  writers: jobs {T[('writers', 'job')]:.3f} s, hash {T[('writers', 'hash')]:.3f}, "
                  f"write {T[('writers', 'write')]:.3f} ({N[('writers', 'write')]} writes)")
            if samples:
                disk = [w for w, _ in samples if w >= 0]
                jobs = [j for _, j in samples]
                hist = collections.Counter(disk)
                print(f"  samples {len(samples)}: disk writes in flight mean {sum(disk) / max(1, len(disk)):.2f} "
                      f"(0: {hist[0] / max(1, len(disk)):.0%}), jobs in flight mean {sum(jobs) / len(jobs):.2f} "
                      f"(0: {jobs.count(0) / len(jobs):.0%}); disk hist {sorted(hist.items())[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
