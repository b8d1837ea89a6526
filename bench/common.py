"""Shared helpers for the benchmark scripts in bench/.

Role: everything a bench script needs that is not the measurement itself --
temporary workspace, random images, page-cache warming, server processes
started and stopped by PID, readiness waits, timing, medians, ratio tables,
JSON result files and py-spy profile aggregation -- so every bench (servers,
live write with/without backup, snapshot read, pump vs qemu-img convert...)
reports the same way.

Invariants:
- Every process started through `Procs` is stopped by its PID (SIGTERM, then
  SIGKILL after a grace period) when the `Procs` context exits, on error and
  on Ctrl-C alike; nothing is ever killed by name.
- `Workspace` removes its directory (images, sockets, logs) on exit unless
  asked to keep it.
- `Results` holds raw samples (one value per round); medians and ratios are
  derived, never stored in place of the samples.
- Nothing here asserts on speed: numbers are reported, never judged.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
#: The interpreter that runs nbdbackup (the project venv when present).
VENV_PYTHON = str(REPO_DIR / ".venv" / "bin" / "python") \
    if (REPO_DIR / ".venv" / "bin" / "python").exists() else sys.executable

MiB = 1 << 20
GiB = 1 << 30


# --------------------------------------------------------------------------
# sizes and signals

def parse_size(text: str) -> int:
    """'1G', '512M', '64k', '4096' -> bytes (binary units)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def sigterm_as_interrupt() -> None:
    """Make SIGTERM (and SIGINT, even if inherited as ignored, as for a
    background job of a non-interactive shell) raise KeyboardInterrupt so
    `finally` blocks and context exits stop every started process."""
    def _h(signum, frame):
        _interrupted.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _h)
    signal.signal(signal.SIGINT, _h)


#: Signals received (see `sigterm_as_interrupt`); a KeyboardInterrupt raised
#: inside a C library's callback (libnbd completion callbacks) may be
#: swallowed there, so long loops also poll `check_interrupted`.
_interrupted: list[int] = []


def nbd_shutdown_quietly(h) -> None:
    """End a libnbd handle's connection (NBD_CMD_DISC), ignoring a connection already gone
    (a bench's ``finally``: the server may have died or closed it first)."""
    import nbd

    try:
        h.shutdown()
    except nbd.Error:
        pass


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a stop signal arrived (even if swallowed)."""
    if _interrupted:
        raise KeyboardInterrupt(f"signal {_interrupted[0]}")


# --------------------------------------------------------------------------
# workspace and images

def _meminfo_kib(field_name: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise KeyError(field_name)


def warm_guest_memory(margin: int = GiB, quiet: bool = False) -> float | None:
    """Touch every free page of RAM once, so no figure pays the hypervisor's first touch.

    On the VMs this bench runs on, a page of guest memory that was never used since boot
    costs the hypervisor a fault the first time the kernel hands it out: writing a new
    1 GiB file into the page cache took 1.3-2.8 s of system time on fresh memory and
    0.2 s once that memory had been used once (measured 2026-12-04, scripts in
    bench/README.md). Every bench that writes new files (a backup's scratch and
    target, a pull's image, a repository) otherwise measures whichever side first
    reached fresh memory -- the bimodal with/without ratios of earlier runs. Freed
    memory usually stays backed, but not always (a DAMON ``pageout`` scheme runs on this
    VM and the balloon device reports free pages: memory warmed at 20:04 was cold again
    after a pause, docs/cbwcpu.md, bench/README.md), so
    every bench process warms once at its start (~5 s when memory is already warm, ~1.6 s
    per cold GiB). ``NBDBACKUP_BENCH_NO_WARM=1`` skips it (to measure the cold case on
    purpose). Touches MemFree minus ``margin`` of anonymous memory, one byte per page,
    then releases it. Returns the seconds spent, None if skipped.
    """
    global _warmed
    if os.environ.get("NBDBACKUP_BENCH_NO_WARM") == "1" or _warmed:
        return None
    _warmed = True
    import mmap
    size = max(0, _meminfo_kib("MemFree") * 1024 - margin) & ~(GiB - 1)
    t0 = time.perf_counter()
    done = 0
    with contextlib.suppress(OSError, ValueError):
        # One mapping held while it is touched: freed pieces would be handed out again.
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) if size else None
        if m is not None:
            for off in range(0, size, mmap.PAGESIZE):
                m[off] = 1
            done = size
            m.close()
    took = time.perf_counter() - t0
    if not quiet:
        print(f"warmed guest memory: touched {done / GiB:.0f} GiB in {took:.1f} s "
              f"(first touch of a page is slow on this VM)", file=sys.stderr)
    return took


#: `warm_guest_memory` ran in this process.
_warmed = False


class Workspace:
    """A fresh temp dir directly under /tmp (short paths for Unix sockets).

    ``with Workspace("nbdbench-") as ws: ws.path / "img"``; removed on exit
    unless ``keep`` is true.
    """

    def __init__(self, prefix: str = "nbdbench-", keep: bool = False, parent: str = "/tmp"):
        self.prefix = prefix
        self.keep = keep
        self.parent = parent
        self.path: Path = Path()

    def __enter__(self) -> "Workspace":
        warm_guest_memory()
        self.path = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.parent))
        return self

    def __exit__(self, *exc) -> None:
        if self.keep:
            print(f"kept workspace {self.path}", file=sys.stderr)
        else:
            shutil.rmtree(self.path, ignore_errors=True)

    def socket(self, name: str) -> str:
        return str(self.path / f"{name}.sock")


def make_random_file(path: str | os.PathLike, size: int, chunk: int = 8 * MiB) -> Path:
    """Write ``size`` bytes of incompressible random data (non-zero, so no
    server or client can take a zero/sparse shortcut)."""
    path = Path(path)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
    return path


def warm_cache(path: str | os.PathLike, chunk: int = 8 * MiB) -> None:
    """Read a file end to end so it sits in the page cache (``cat > /dev/null``)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        while f.readinto(buf):
            pass


def fsync_file(path: str | os.PathLike) -> None:
    """Write back a file's dirty pages (outside any timed section), so every
    round starts from the same page-cache state."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# processes

def free_tcp_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on loopback (racy by nature; fine for benches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ProcessDied(RuntimeError):
    pass


@dataclass
class Proc:
    """One started process: its Popen, a name for messages, its log file."""
    name: str
    popen: subprocess.Popen
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


class Procs:
    """Registry of processes started by a bench; stops them all by PID on exit.

    Children are started in their own session so a terminal Ctrl-C reaches
    only the bench, which then stops them in order (SIGTERM, grace, SIGKILL).
    """

    def __init__(self, grace: float = 5.0):
        self.grace = grace
        self._procs: list[Proc] = []

    def __enter__(self) -> "Procs":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], log_path: str | os.PathLike | None = None,
              env: dict | None = None, new_session: bool = True, cwd: str | None = None) -> Proc:
        """``new_session=False`` keeps the child in the bench's session (and
        scheduler autogroup): only for measuring that arrangement.  ``cwd``: where
        it runs (another checkout's ``python -m nbdbackup.cli``)."""
        log_f = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log_f,
                                     stderr=subprocess.STDOUT, start_new_session=new_session,
                                     env=env, cwd=cwd)
        finally:
            if log_path:
                log_f.close()
        p = Proc(name, popen, Path(log_path) if log_path else None)
        self._procs.append(p)
        return p

    def stop(self, p: Proc) -> int | None:
        """SIGTERM the PID, wait ``grace`` s, then SIGKILL; returns the exit code."""
        if p.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.popen.wait(self.grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.popen.wait()
        if p in self._procs:
            self._procs.remove(p)
        return p.popen.returncode

    def stop_all(self) -> None:
        for p in reversed(list(self._procs)):
            try:
                self.stop(p)
            except BaseException:  # keep stopping the others even on a 2nd Ctrl-C
                with contextlib.suppress(Exception):
                    os.kill(p.pid, signal.SIGKILL)


def wait_until(pred: Callable[[], bool], timeout: float, proc: Proc | None = None,
               what: str = "condition") -> None:
    """Poll ``pred`` until true; fail early with the log if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        if proc is not None and not proc.alive():
            raise ProcessDied(f"{proc.name} exited with {proc.popen.returncode} before {what}:\n"
                              f"{proc.log_tail()}")
        if time.monotonic() > deadline:
            tail = proc.log_tail() if proc else ""
            raise TimeoutError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.02)


def _can_connect(family: int, addr) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.connect(addr)
            return True
        except OSError:
            return False


def wait_for_unix(path: str, timeout: float = 15.0, proc: Proc | None = None) -> None:
    wait_until(lambda: os.path.exists(path) and _can_connect(socket.AF_UNIX, path),
               timeout, proc, f"Unix socket {path}")


def wait_for_tcp(host: str, port: int, timeout: float = 15.0, proc: Proc | None = None) -> None:
    wait_until(lambda: _can_connect(socket.AF_INET, (host, port)), timeout, proc,
               f"TCP {host}:{port}")


def proc_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds used so far by process ``pid`` (all its threads).

    Under contention (other jobs on the same cores) wall-clock throughput is
    noisy, but CPU spent per byte or per request is a stable cost measure.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime/stime are fields 14/15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid``, its live descendants (e.g. ``serve --workers``
    processes) and the children it already reaped: a server's whole cost."""
    total = 0.0
    todo = [pid]
    tck = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        total += (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tck
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return total


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def run_timed(argv: Sequence[str], timeout: float = 600.0) -> float:
    """Run a command to completion; wall seconds.  Raises on non-zero exit."""
    t0 = time.perf_counter()
    r = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {r.returncode}: {r.stderr.decode(errors='replace')[-2000:]}")
    return dt


def run_timed_cpu(argv: Sequence[str], timeout: float = 600.0) -> tuple[float, float]:
    """Like `run_timed`, plus the command's CPU seconds (user+sys, its children included)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    dt = run_timed(argv, timeout)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def tool_version(argv: Sequence[str]) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "-C", str(REPO_DIR), "log", "-1", "--format=%h %s"],
                           capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "nbdbackup"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + (" (+uncommitted changes in nbdbackup/)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict:
    warm_guest_memory()
    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release()}
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    return info


# --------------------------------------------------------------------------
# results

def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Metric:
    """A measured quantity: name, unit, and whether bigger is better."""
    name: str
    unit: str                 # "MB/s", "IOPS", "s", ...
    higher_is_better: bool = True
    description: str = ""


@dataclass
class Results:
    """Raw samples: ``samples[metric][server] = [value per round]``.

    ``meta`` is free-form (commit, machine, configs) and goes into the JSON.
    """
    bench: str
    metrics: dict[str, Metric] = field(default_factory=dict)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def add_metric(self, m: Metric) -> None:
        self.metrics.setdefault(m.name, m)

    def add(self, metric: str, server: str, value: float) -> None:
        self.samples.setdefault(metric, {}).setdefault(server, []).append(value)

    def add_error(self, metric: str, server: str, msg: str) -> None:
        self.errors.setdefault(metric, {}).setdefault(server, []).append(msg)

    def med(self, metric: str, server: str) -> float | None:
        xs = self.samples.get(metric, {}).get(server)
        return median(xs) if xs else None

    def ratio(self, metric: str, ours: str, other: str) -> float | None:
        """ours/other on the "higher is better" scale (>1.0 means ours is better)."""
        a, b = self.med(metric, ours), self.med(metric, other)
        if a is None or b is None or a == 0 or b == 0:
            return None
        m = self.metrics.get(metric)
        return a / b if (m is None or m.higher_is_better) else b / a

    def to_json(self, ours: str | None = None) -> dict:
        servers = sorted({s for d in self.samples.values() for s in d})
        out = {"bench": self.bench, "meta": self.meta, "metrics": {}}
        for name, d in self.samples.items():
            m = self.metrics.get(name, Metric(name, ""))
            entry = {"unit": m.unit, "higher_is_better": m.higher_is_better,
                     "description": m.description,
                     "samples": d, "median": {s: median(v) for s, v in d.items()}}
            if ours is not None:
                entry["ratio"] = {f"{ours}/{s}": self.ratio(name, ours, s)
                                  for s in servers if s != ours and s in d}
            if name in self.errors:
                entry["errors"] = self.errors[name]
            out["metrics"][name] = entry
        return out


def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "IOPS":
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if v < 10 else f"{v:.1f}"


def format_table(res: Results, servers: Sequence[str], ours: str | None = None,
                 markdown: bool = False) -> str:
    """Median per (metric, server) plus ratios ours/other, as text or markdown."""
    others = [s for s in servers if s != ours] if ours in servers else []
    head = ["metric", "unit"] + list(servers) + [f"{ours}/{o}" for o in others]
    rows = []
    for name in res.samples:
        m = res.metrics.get(name, Metric(name, ""))
        row = [name, m.unit] + [_fmt(res.med(name, s), m.unit) for s in servers]
        for o in others:
            r = res.ratio(name, ours, o)
            row.append("-" if r is None else f"{r:.2f}x")
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt_row = lambda r: "  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w)  # noqa: E731
                                  for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt_row(head), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in rows])


def write_json(res: Results, ours: str | None = None, directory: Path = RESULTS_DIR) -> Path:
    """bench/results/<bench>-<UTC timestamp>.json; returns the path."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"{res.bench}-{stamp}.json"
    path.write_text(json.dumps(res.to_json(ours), indent=2, sort_keys=False) + "\n")
    return path


# --------------------------------------------------------------------------
# profiling (py-spy raw/collapsed output)

PY_SPY = str(REPO_DIR / ".venv" / "bin" / "py-spy")


def py_spy_start(procs: Procs, pid: int, duration: float, out: str | os.PathLike,
                 rate: int = 250, native: bool = False) -> Proc:
    """Start ``py-spy record`` (raw collapsed stacks) on ``pid`` for ``duration`` s."""
    argv = [PY_SPY, "record", "--pid", str(pid), "-d", str(max(1, int(round(duration)))),
            "-r", str(rate), "-f", "raw", "-o", str(out), "--nonblocking"]
    if native:
        argv.append("--native")
    return procs.start("py-spy", argv, log_path=str(out) + ".log")


def aggregate_collapsed(path: str | os.PathLike, strip_prefix: str = "",
                        by_function: bool = False) -> dict:
    """`aggregate_collapsed_text` of a py-spy ``-f raw`` output file."""
    return aggregate_collapsed_text(Path(path).read_text(errors="replace"), strip_prefix, by_function)


_LINE_NO = re.compile(r":\d+\)$")


def aggregate_collapsed_text(text: str, strip_prefix: str = "", by_function: bool = False) -> dict:
    """Self and inclusive sample counts per frame from collapsed stacks.

    Each line is ``frame;frame;...;leaf COUNT``; a frame is counted once per
    stack for inclusive time (recursion is not double-counted).  py-spy
    frames read ``func (file.py:LINE)``; ``by_function`` drops the line so
    all lines of a function add up.  Returns
    ``{"total": N, "self": {frame: n}, "inclusive": {frame: n}}``.
    """
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n_i = int(n)
        total += n_i
        frames = [f.replace(strip_prefix, "") for f in stack.split(";")]
        if by_function:
            frames = [_LINE_NO.sub(")", f) for f in frames]
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + n_i
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n_i
    return {"total": total, "self": self_c, "inclusive": incl}


def format_profile(agg: dict, top: int = 25) -> str:
    total = agg["total"] or 1
    out = [f"{agg['total']} samples"]
    for title, key in (("self", "self"), ("inclusive", "inclusive")):
        out.append(f"-- top {top} by {title} time")
        for f, n in sorted(agg[key].items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"{100.0 * n / total:6.1f}%  {f}")
    return "\n".join(out)


@contextlib.contextmanager
def timer() -> Iterator[Callable[[], float]]:
    """``with timer() as t: ...; t()`` -> elapsed seconds (frozen at exit)."""
    t0 = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - t0
    end.append(time.perf_counter())
