"""The memory and CPU limits of this process's cgroup (v1 or v2), read once at start.

Role: ``serve`` sizes its defaults to what it may use, not to the host: in a
container started with ``--memory 256m --cpus 1`` (or a systemd unit with
``MemoryMax=``/``CPUQuota=``) `os.cpu_count`, `os.sched_getaffinity` and
the default request-buffer budget all describe the host, and a burst of
large WRITEs could make the kernel OOM-kill the server (measured:
docs/hunt9.md).  `read_limits` reads the limits; `buffer_default` and
`workers_for_memory` are the policy ``serve`` applies (`commands.serve`).

Where the files are: ``/proc/self/cgroup`` names this process's cgroup per
hierarchy (``0::PATH`` for v2; ``N:ctrl,ctrl:PATH`` for v1) and
``/proc/self/mountinfo`` where each hierarchy is mounted and which part of
it (the mount's root: a container sees its own cgroup as ``/``).  The
limit in force is the smallest one of the cgroup and every ancestor up to
the mount point, so all of them are read.

Files read (nothing is written):
- v2: ``memory.max`` (``max`` = none); ``cpu.max`` (``QUOTA PERIOD`` or
  ``max PERIOD``).
- v1: ``memory.limit_in_bytes`` (>= 2**60 = none: the kernel's "unlimited"
  is 2**63 rounded down to a page); ``cpu.cfs_quota_us`` (-1 = none) and
  ``cpu.cfs_period_us``.

Invariants: reading never raises (a missing or unreadable file is "no
limit"); every path is taken below ``root`` (tests pass a fake tree).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

#: v1's "no limit" is PAGE_COUNTER_MAX pages (~2**63 bytes); anything this large is none.
_V1_UNLIMITED = 1 << 60
MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Fields: ``memory`` (bytes, or None: no limit found); ``memory_source``
    (the file that set it, e.g. ``cgroup v2 /sys/fs/cgroup/memory.max``);
    ``cpus`` (quota / period, e.g. 1.5, or None); ``cpu_source``."""

    memory: int | None = None
    memory_source: str = ""
    cpus: float | None = None
    cpu_source: str = ""

    def describe(self) -> str:
        mem = f"memory {self.memory // MiB} MiB ({self.memory_source})" if self.memory else "no memory limit"
        cpu = f"CPU quota {self.cpus:g} ({self.cpu_source})" if self.cpus else "no CPU quota"
        return f"{mem}, {cpu}"


def _read(root: str, path: str) -> str | None:
    try:
        with open(os.path.join(root, path.lstrip("/")), encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _mounts(root: str) -> list[tuple[str, str, str, set[str]]]:
    """[(fstype, mount root, mount point, super options)] of cgroup mounts."""
    out = []
    for line in (_read(root, "/proc/self/mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f, r = left.split(), right.split()
        if len(f) < 5 or len(r) < 3 or r[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((r[0], f[3], f[4], set(r[2].split(","))))
    return out


def _dirs(root: str, controller: str) -> list[tuple[int, list[str]]]:
    """For each hierarchy that has ``controller``: (version, [the cgroup's
    directory, its parent, ... up to the mount point])."""
    paths: dict[str, str] = {}  # "v2" or a v1 controller -> cgroup path
    for line in (_read(root, "/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            paths["v2"] = parts[2]
        else:
            for c in parts[1].split(","):
                paths[c] = parts[2]
    out = []
    for fstype, mroot, mpoint, opts in _mounts(root):
        if fstype == "cgroup2":
            version, cg = 2, paths.get("v2")
        elif controller in opts:
            version, cg = 1, paths.get(controller)
        else:
            continue
        if cg is None:
            continue
        rel = os.path.relpath(cg, mroot) if (cg + "/").startswith(mroot.rstrip("/") + "/") else "."
        d = os.path.normpath(os.path.join(mpoint, rel))
        chain = [d]
        while d != mpoint and d.startswith(mpoint.rstrip("/") + "/"):
            d = os.path.dirname(d)
            chain.append(d)
        out.append((version, chain))
    return out


def _memory(root: str) -> tuple[int | None, str]:
    best: tuple[int | None, str] = (None, "")
    for version, chain in _dirs(root, "memory"):
        name = "memory.max" if version == 2 else "memory.limit_in_bytes"
        for d in chain:
            text = (_read(root, os.path.join(d, name)) or "").strip()
            if not text.isdigit():
                continue  # "max", missing, unreadable
            n = int(text)
            if version == 1 and n >= _V1_UNLIMITED:
                continue
            if best[0] is None or n < best[0]:
                best = (n, f"cgroup v{version} {os.path.join(d, name)}")
    return best


def _cpus(root: str) -> tuple[float | None, str]:
    best: tuple[float | None, str] = (None, "")
    for version, chain in _dirs(root, "cpu"):
        for d in chain:
            if version == 2:
                src = os.path.join(d, "cpu.max")
                words = (_read(root, src) or "").split()
                quota, period = (words + ["", ""])[:2]
            else:
                src = os.path.join(d, "cpu.cfs_quota_us")
                quota = (_read(root, src) or "").strip()
                period = (_read(root, os.path.join(d, "cpu.cfs_period_us")) or "").strip()
            if not (quota.isdigit() and period.isdigit()) or int(period) == 0 or int(quota) == 0:
                continue  # "max", -1, missing
            n = int(quota) / int(period)
            if best[0] is None or n < best[0]:
                best = (n, f"cgroup v{version} {src}")
    return best


def read_limits(root: str = "/") -> Limits:
    """The memory and CPU limits in force for this process (see the module docstring)."""
    mem, msrc = _memory(root)
    cpus, csrc = _cpus(root)
    return Limits(mem, msrc, cpus, csrc)


def cpu_count(limits: Limits) -> int:
    """CPUs this process may use: its affinity mask, and at most the quota
    rounded up (a quota of 1.5 CPUs still lets two processes run)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    if limits.cpus is not None:
        n = min(n, max(1, math.ceil(limits.cpus - 1e-9)))
    return n


#: What the request buffers may take of a memory limit: the rest is for the
#: interpreter (~21 MiB, ~13 MiB per worker process), the per-connection
#: receive rings (256 KiB each) and the page cache.
BUFFER_FRACTION = 0.5


def buffer_default(limits: Limits, default: int, minimum: int) -> int:
    """``--max-buffer-memory`` default: ``default`` without a memory limit,
    else half the limit, never above ``default`` nor below ``minimum``
    (twice the largest request: the budget cannot work with less)."""
    if limits.memory is None:
        return default
    return max(minimum, min(default, int(limits.memory * BUFFER_FRACTION)))


def workers_for_memory(budget: int, per_process_min: int) -> int:
    """Most worker processes a ``budget`` of buffer memory allows when every
    process (owner and workers) gets its own share of at least ``per_process_min``
    (`nbd.server.budget_share`): more would exceed the budget."""
    return max(0, budget // per_process_min - 1)
