"""Pull vs nbdcopy over a hostile link (hunt 10): rate limit, random loss, delay.

Two private network namespaces joined by a veth pair (tests/interop/netns.py);
``nbdbackup serve`` in the server namespace, the copy in the client one.  The
kernel here has no sch_netem, so:
- rate: ``tc qdisc ... tbf`` on both veth ends;
- loss: iptables ``statistic --mode random`` DROP on the client's veth, both ways;
- delay: a user-space relay in the server namespace (`relay`) that holds every
  chunk it forwards for DELAY ms in each direction (RTT = 2 x DELAY).  The
  relay's own sockets are local, so it models a long fat pipe with an
  unlimited TCP window: what bounds a copy is the data it keeps in flight.

Runs interleaved pairs (pull, nbdcopy, pull, ...), checks each result byte for
byte against the image, prints wall medians/ranges and the copier's CPU
(user+sys of the process, from wait4) per GiB.

    sudo .venv/bin/python bench/hostile_link.py --size 128M --pairs 3 \\
        --case plain --case rate=200mbit --case loss=0.01 --case delay=25
"""

from __future__ import annotations

import argparse
import asyncio
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "interop"))

import netns  # noqa: E402

PY = str(ROOT / ".venv" / "bin" / "python")
PORT = 10809
RELAY_PORT = 10900


def relay_main(listen_port: int, target_port: int, delay: float) -> None:
    """Forward 10.77.0.1:listen_port <-> 127.0.0.1:target_port, every chunk delayed."""

    async def pipe(reader, writer):
        q: asyncio.Queue = asyncio.Queue()

        async def sender():
            while True:
                due, data = await q.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        task = asyncio.create_task(sender())
        while True:
            data = await reader.read(1 << 20)
            q.put_nowait((time.monotonic() + delay, data or None))
            if not data:
                break
        await task

    async def handle(cr, cw):
        sr, sw = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(cr, sw), pipe(sr, cw), return_exceptions=True)

    async def main():
        srv = await asyncio.start_server(handle, netns.SERVER_ADDR, listen_port)
        print("ready", flush=True)
        async with srv:
            await srv.serve_forever()

    asyncio.run(main())


def timed(lk: netns.Link, argv: list[str]) -> tuple[float, float, int]:
    """(wall s, user+sys CPU s, exit status) of ARGV run in the client namespace."""
    t = time.monotonic()
    p = subprocess.Popen(lk.argv("client", argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t
    if p.returncode:
        print("   FAILED:", p.stderr.read().decode(errors="replace")[-500:], flush=True)
    p.stderr.close()
    return wall, ru.ru_utime + ru.ru_stime, p.returncode


def run_case(case: str, size: int, pairs: int, tmp: Path, img: Path, pull_args: list[str] = (),
             tools: tuple[str, str] = ("pull", "nbdcopy")) -> None:
    with netns.link() as lk:
        log = open(tmp / f"serve-{case}.log", "wb")
        lk.popen("server", [PY, "-m", "nbdbackup.cli", "serve", "--listen", f"127.0.0.1:{PORT}",
                            "--listen", f"{lk.server_addr}:{PORT}", "--read-only", f"d={img}"],
                 stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        t = time.monotonic()
        while not lk.run("server", ["ss", "-Htln", f"( sport = :{PORT} )"]).stdout.count("\n") >= 2:
            assert time.monotonic() - t < 30, "serve did not listen"
            time.sleep(0.05)
        port = PORT
        kind, _, arg = case.partition("=")
        if kind == "rate":
            lk.shape(["tbf", "rate", arg, "burst", "256kb", "latency", "50ms"])
        elif kind == "loss":
            lk.lose(float(arg))
        elif kind == "delay":
            r = lk.popen("server", [PY, __file__, "--relay", str(RELAY_PORT), str(PORT), str(float(arg) / 1000)],
                         stdout=subprocess.PIPE)
            assert r.stdout.readline().strip() == b"ready"
            port = RELAY_PORT
        uri = f"nbd://{lk.server_addr}:{port}/d"
        out = tmp / "out.img"
        res: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
        for i in range(pairs):
            for tool in tools if i % 2 == 0 else tools[::-1]:
                out.unlink(missing_ok=True)
                if tool.startswith("pull"):
                    extra = tool.split(":")[1:] or list(pull_args)
                    argv = ["nice", "-n", "19", PY, "-m", "nbdbackup.cli", "pull", "--no-progress", *extra, uri, str(out)]
                else:
                    out.write_bytes(b"")
                    os.truncate(out, size)
                    argv = ["nice", "-n", "19", "nbdcopy", uri, str(out)]
                wall, cpu, rc = timed(lk, argv)
                same = rc == 0 and filecmp.cmp(img, out, shallow=False)
                res[tool].append((wall, cpu))
                print(f"  {case:14} {tool:8} {wall:6.2f} s  cpu {cpu:5.2f} s  {'ok' if same else 'MISMATCH/FAIL'}",
                      flush=True)
        gib = size / (1 << 30)
        line = [f"{case}:"]
        for tool, v in res.items():
            walls = [w for w, _ in v]
            cpus = [c for _, c in v]
            line.append(f"{tool} {statistics.median(walls):.2f} s ({min(walls):.2f}-{max(walls):.2f}), "
                        f"{size / statistics.median(walls) / 1e6:.0f} MB/s, cpu {statistics.median(cpus) / gib:.2f} s/GiB")
        ratio = statistics.median(w for w, _ in res[tools[0]]) / statistics.median(w for w, _ in res[tools[1]])
        line.append(f"{tools[0]}/{tools[1]} wall {ratio:.2f}")
        print("  ".join(line), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--relay":
        relay_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="128M")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--case", action="append", default=[])
    ap.add_argument("--pull-arg", action="append", default=[], help="extra argument of pull (repeatable)")
    ap.add_argument("--tools", default="pull,nbdcopy",
                    help="the pair to interleave: pull, nbdcopy, or pull:ARG:ARG (e.g. pull:--workers=32)")
    a = ap.parse_args()
    size = int(a.size[:-1]) << {"M": 20, "G": 30}[a.size[-1]]
    why = netns.skip_reason()
    if why:
        sys.exit(why)
    with tempfile.TemporaryDirectory(prefix="nbdb-hl-") as d:
        tmp = Path(d)
        img = tmp / "img"
        with open(img, "wb") as f:
            for _ in range(size >> 22):
                f.write(os.urandom(4 << 20))
        for case in a.case or ["plain"]:
            run_case(case, size, a.pairs, tmp, img, a.pull_arg, tuple(a.tools.split(",")))


if __name__ == "__main__":
    main()
