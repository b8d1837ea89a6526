"""`nbdbackup.cgroup` and ``serve``'s defaults sized to it (no I/O but a fake /proc + /sys tree).

The layouts are the ones seen in real containers: docker 20.10 on a v1/v2
hybrid host (this machine: each v1 controller mounted with the container's
cgroup as its root), cgroup v2 with a private cgroup namespace (docker on
v2), and v2 without one (a systemd unit: the limit may sit on an ancestor).
"""

from __future__ import annotations

import argparse
import os

import pytest

from nbdbackup import cgroup
from nbdbackup.commands import serve

MiB = 1 << 20
CID = "/docker/c7779efb7b76"


def tree(tmp_path, files: dict[str, str]) -> str:
    for path, text in files.items():
        p = tmp_path / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(tmp_path)


def v1_docker(tmp_path, limit: str = "268435456", quota: str = "100000", period: str = "100000") -> str:
    """docker 20.10, cgroupfs driver, hybrid host (as `docker run --memory 256m --cpus 1` here)."""
    return tree(tmp_path, {
        "/proc/self/cgroup": f"4:memory:{CID}\n1:cpu:{CID}\n2:cpuacct:{CID}\n0::{CID}\n",
        "/proc/self/mountinfo": (
            "31 23 0:28 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
            f"32 31 0:29 {CID} /sys/fs/cgroup/cpu ro,nosuid - cgroup cgroup rw,cpu\n"
            f"35 31 0:31 {CID} /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory\n"
            f"40 31 0:36 {CID} /sys/fs/cgroup/unified ro,nosuid - cgroup2 cgroup2 rw\n"),
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": limit + "\n",
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us": quota + "\n",
        "/sys/fs/cgroup/cpu/cpu.cfs_period_us": period + "\n",
        "/sys/fs/cgroup/unified/cgroup.procs": "1\n",
    })


def test_v1_container_limits(tmp_path):
    lim = cgroup.read_limits(v1_docker(tmp_path))
    assert lim.memory == 256 * MiB and lim.memory_source == "cgroup v1 /sys/fs/cgroup/memory/memory.limit_in_bytes"
    assert lim.cpus == 1.0 and "cpu.cfs_quota_us" in lim.cpu_source
    assert "memory 256 MiB" in lim.describe() and "CPU quota 1 (" in lim.describe()


def test_v1_unlimited_is_no_limit(tmp_path):
    lim = cgroup.read_limits(v1_docker(tmp_path, limit="9223372036854771712", quota="-1"))
    assert lim == cgroup.Limits()
    assert lim.describe() == "no memory limit, no CPU quota"


def test_v2_namespaced_container(tmp_path):
    root = tree(tmp_path, {
        "/proc/self/cgroup": "0::/\n",
        "/proc/self/mountinfo": "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        "/sys/fs/cgroup/memory.max": "134217728\n",
        "/sys/fs/cgroup/cpu.max": "150000 100000\n",
    })
    lim = cgroup.read_limits(root)
    assert (lim.memory, lim.cpus) == (128 * MiB, 1.5)
    assert lim.memory_source == "cgroup v2 /sys/fs/cgroup/memory.max"


def test_v2_the_smallest_limit_of_the_ancestors_counts(tmp_path):
    """A systemd unit in a slice: the slice's MemoryMax binds the unit too."""
    root = tree(tmp_path, {
        "/proc/self/cgroup": "0::/backup.slice/nbdbackup.service\n",
        "/proc/self/mountinfo": "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        "/sys/fs/cgroup/backup.slice/nbdbackup.service/memory.max": "1073741824\n",
        "/sys/fs/cgroup/backup.slice/nbdbackup.service/cpu.max": "400000 100000\n",
        "/sys/fs/cgroup/memory.max": "max\n",  # (the root has none)
        "/sys/fs/cgroup/backup.slice/memory.max": "536870912\n",
        "/sys/fs/cgroup/backup.slice/cpu.max": "200000 100000\n",
    })
    lim = cgroup.read_limits(root)
    assert lim.memory == 512 * MiB and lim.memory_source.endswith("backup.slice/memory.max")
    assert lim.cpus == 2.0


def test_nothing_readable_is_no_limit(tmp_path):
    assert cgroup.read_limits(str(tmp_path)) == cgroup.Limits()


@pytest.mark.parametrize("quota,affinity,want", [(None, 2, 2), (1.0, 2, 1), (1.5, 4, 2), (0.5, 2, 1), (8.0, 2, 2)])
def test_cpu_count_obeys_the_quota_rounded_up(monkeypatch, quota, affinity, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(affinity)))
    assert cgroup.cpu_count(cgroup.Limits(cpus=quota)) == want


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(max_buffer_memory=kw.get("budget"), workers=kw.get("workers"))


@pytest.mark.parametrize("memory,cpus,want_budget,want_workers", [
    (None, None, 256 * MiB, 2),        # no limits: unchanged (2 CPUs here)
    (256 * MiB, None, 128 * MiB, 1),   # half the limit; 128 MiB = 2 shares of 64: owner + 1 worker
    (128 * MiB, None, 64 * MiB, 0),    # the floor, no worker
    (100 * MiB, None, 64 * MiB, 0),    # never below twice the largest request
    (4096 * MiB, None, 256 * MiB, 2),  # a large limit changes nothing
    (None, 1.0, 256 * MiB, 0),         # --cpus 1: one CPU, no worker
])
def test_serve_defaults_follow_the_cgroup(monkeypatch, memory, cpus, want_budget, want_workers):
    monkeypatch.delenv("NBDBACKUP_WORKERS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    budget, workers = serve.resource_defaults(args(), cgroup.Limits(memory=memory, cpus=cpus))
    assert (budget, workers) == (want_budget, want_workers)


def test_explicit_options_win_and_a_risky_budget_is_warned(monkeypatch, caplog):
    monkeypatch.delenv("NBDBACKUP_WORKERS", raising=False)
    lim = cgroup.Limits(memory=256 * MiB, memory_source="test")
    with caplog.at_level("INFO", logger="nbdbackup.serve"):
        assert serve.resource_defaults(args(budget="256M", workers=3), lim) == (256 * MiB, 3)
    assert any("can get the server OOM-killed" in r.getMessage() for r in caplog.records)
    assert any("limits: memory 256 MiB (test)" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("NBDBACKUP_WORKERS", "2")
    assert serve.resource_defaults(args(), lim) == (128 * MiB, 2)  # the environment is explicit too


def test_agent_chunk_pool_follows_the_cgroup(monkeypatch):
    """The agent's chunk threads: one per CPU the process may use, plus one (it took the host's
    CPU count: a `--cpus 1` container on a 64-core host compressed on 65 threads)."""
    from nbdbackup.agent import workflow

    monkeypatch.setattr(workflow, "_CPU_POOL", None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    monkeypatch.setattr(cgroup, "read_limits", lambda root="/": cgroup.Limits(cpus=1.0))
    pool = workflow._cpu_pool()
    try:
        assert pool._max_workers == 2
    finally:
        pool.shutdown()
