"""Benchmark: sequential read of a whole export, our client vs ``nbdcopy ... null:``.

Role: measure `nbd.client` read throughput against libnbd's nbdcopy under the
same conditions: one server (nbdkit file plugin, or qemu-nbd) over a Unix
socket, a file of random data in the page cache, N connections, M requests
in flight per connection (nbdcopy's --requests is per connection), the same
request size (nbdcopy's default, 256 KiB).  Rounds alternate (nbdcopy, ours,
nbdcopy, ours...) so drift hits both alike.  Prints MB/s per round, the best
and median of each, and the ratio ours/nbdcopy; also the client's CPU time
(user+sys) per run, which stays meaningful on a loaded machine where wall
clock throughput mostly measures the neighbours; and the server's CPU time
per run (read from /proc), since a client that drains sockets late makes
the server work harder.  The server runs in a session of its own (see
`start_server`).

Our reader: N `Client` connections; N*M tasks, each bound to one connection,
take the next offset from a shared counter and read it into their own
reusable buffer (data discarded, like ``null:``).

Usage: .venv/bin/python bench/client_read.py [--size 1G] [--connections 4]
       [--requests 64] [--request-size 256K] [--rounds 3] [--server nbdkit|qemu-nbd]
       [--loop asyncio|uvloop] [--profile] [--same-session]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402  (bench/common.py)
from nbdbackup.blockdev import parse_size  # noqa: E402
from nbdbackup.nbd.client import connect  # noqa: E402


def start_server(procs: common.Procs, kind: str, image: str, sock: str, connections: int,
                 same_session: bool) -> common.Proc:
    """Start the server; by default in a session of its own, as a daemon runs.

    The session matters here: with ``kernel.sched_autogroup_enabled=1`` the
    scheduler shares CPU time between sessions first and between threads
    second.  In one session nbdkit's 16 threads per connection outnumber a
    one-thread client and get most of a loaded CPU, so the result measures
    the thread count as much as the client (``--same-session`` shows it).
    """
    if kind == "nbdkit":
        argv = ["nbdkit", "-f", "-U", sock, "file", image]
    else:
        argv = ["qemu-nbd", "-k", sock, "-f", "raw", "-t", f"--shared={max(connections, 1) + 1}", image]
    proc = procs.start(kind, argv, new_session=not same_session)
    common.wait_for_unix(sock, proc=proc)
    return proc


def random_image(path: str, size: int) -> None:
    """Random data (no zero shortcuts), in the page cache."""
    common.make_random_file(path, size)
    common.warm_cache(path)


@contextlib.contextmanager
def random_nbdkit_export(prefix: str, parent: str, size: int, connections: int):
    """A workspace under ``parent`` holding a random image of ``size`` bytes (in
    the page cache) served by nbdkit's file plugin on a Unix socket, in a session
    of its own: yields ``(ws, procs, image, uri)``; everything is stopped and
    removed on exit.  The pull benches' common set-up."""
    with common.Workspace(prefix, parent=parent) as ws, common.Procs() as procs:
        image = os.path.join(str(ws.path), "disk.raw")
        random_image(image, size)
        sock = ws.socket("s")
        start_server(procs, "nbdkit", image, sock, connections, same_session=False)
        yield ws, procs, image, f"nbd+unix:///?socket={sock}"


def run_nbdcopy(uri: str, conns: int, reqs: int, rsize: int) -> tuple[float, float]:
    """Return (wall seconds, CPU seconds of nbdcopy)."""
    return common.run_timed_cpu(["nbdcopy", f"--connections={conns}", f"--requests={reqs}",
                                 f"--request-size={rsize}", uri, "null:"])


async def read_all(uri: str, conns: int, reqs: int, rsize: int) -> float:
    # Timed from before the first connect to after the last disconnect, as
    # nbdcopy's run is (which also pays for its exec, about 3 ms more here).
    t = time.perf_counter()
    clients = [await connect(uri, max_in_flight=reqs) for _ in range(conns)]
    size = clients[0].size
    next_off = 0

    async def worker(c) -> None:
        nonlocal next_off
        buf = bytearray(rsize)
        mv = memoryview(buf)
        while next_off < size:
            off = next_off
            next_off += rsize
            n = min(rsize, size - off)
            await c.pread(mv if n == rsize else mv[:n], off)

    await asyncio.gather(*(worker(clients[i % conns]) for i in range(conns * reqs)))
    for c in clients:
        await c.disconnect()
    return time.perf_counter() - t


def run_ours(uri: str, conns: int, reqs: int, rsize: int, loop: str, profile: bool = False) -> tuple[float, float]:
    """Return (wall seconds, CPU seconds of this process)."""
    t0 = time.process_time()
    dt = _run_ours(uri, conns, reqs, rsize, loop, profile)
    return dt, time.process_time() - t0


def _run_ours(uri: str, conns: int, reqs: int, rsize: int, loop: str, profile: bool) -> float:
    coro = read_all(uri, conns, reqs, rsize)
    if loop == "uvloop":
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    if profile:
        import cProfile
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        dt = runner(coro)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(15)
        return dt
    return runner(coro)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--request-size", default="256K")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--server", choices=["nbdkit", "qemu-nbd"], default="nbdkit")
    # uvloop is what nbdbackup's own commands run on (see commands/serve.py).
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    ap.add_argument("--profile", action="store_true", help="cProfile one extra run of our client")
    ap.add_argument("--same-session", action="store_true",
                    help="run the server in the benchmark's own session (see start_server)")
    a = ap.parse_args()
    common.warm_guest_memory()  # before any file is made: docs in bench/common.py
    size, rsize = parse_size(a.size), parse_size(a.request_size)
    with common.Workspace("bench-client-") as ws, common.Procs() as procs:
        image = str(ws.path / "disk.raw")
        random_image(image, size)
        sock = ws.socket("s")
        proc = start_server(procs, a.server, image, sock, a.connections, a.same_session)
        uri = f"nbd+unix:///?socket={sock}"
        mb = size / 1e6
        theirs, ours, cpu_theirs, cpu_ours = [], [], [], []
        print(f"# {a.server}, {size >> 20} MiB, {a.connections} connections x {a.requests} requests, "
              f"{rsize >> 10} KiB requests, loop={a.loop}, server in "
              f"{'the same session' if a.same_session else 'its own session'}")
        for r in range(a.rounds):
            s0 = common.proc_tree_cpu_seconds(proc.pid)
            dt, cpu = run_nbdcopy(uri, a.connections, a.requests, rsize)
            s1 = common.proc_tree_cpu_seconds(proc.pid)
            theirs.append(mb / dt)
            cpu_theirs.append(cpu)
            print(f"round {r + 1}: nbdcopy {mb / dt:8.0f} MB/s  (client CPU {cpu:.2f} s, server CPU {s1 - s0:.2f} s)")
            dt, cpu = run_ours(uri, a.connections, a.requests, rsize, a.loop)
            s2 = common.proc_tree_cpu_seconds(proc.pid)
            ours.append(mb / dt)
            cpu_ours.append(cpu)
            print(f"round {r + 1}: ours    {mb / dt:8.0f} MB/s  (client CPU {cpu:.2f} s, server CPU {s2 - s1:.2f} s)")
        print(f"nbdcopy: best {max(theirs):.0f} MB/s, median {statistics.median(theirs):.0f} MB/s")
        print(f"ours:    best {max(ours):.0f} MB/s, median {statistics.median(ours):.0f} MB/s")
        print(f"ratio ours/nbdcopy: best {max(ours) / max(theirs):.2f}x, "
              f"median {statistics.median(ours) / statistics.median(theirs):.2f}x")
        print(f"client CPU seconds (median): nbdcopy {statistics.median(cpu_theirs):.2f} s, "
              f"ours {statistics.median(cpu_ours):.2f} s  (load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs)")
        if a.profile:
            run_ours(uri, a.connections, a.requests, rsize, a.loop, profile=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
