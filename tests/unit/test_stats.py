"""Unit tests of `nbd.stats`: QEMU-named counters and the Prometheus text form."""

from __future__ import annotations

from types import SimpleNamespace

from nbdbackup.nbd.stats import ExportStats, prometheus_text
from nbdbackup.nbd.wire import Cmd


def test_record_and_qmp_names():
    s = ExportStats()
    s.record(Cmd.READ, 4096, True, 1000)
    s.record(Cmd.READ, 512, False, 50)
    s.record(Cmd.FLUSH, 0, True, 7)
    s.record(Cmd.TRIM, 65536, True, 3)
    s.invalid += 2
    q = s.to_qmp()
    assert (q["rd_operations"], q["failed_rd_operations"], q["rd_bytes"], q["rd_total_time_ns"]) == (1, 1, 4096, 1050)
    assert q["flush_operations"] == 1 and "flush_bytes" not in q
    assert q["unmap_bytes"] == 65536 and q["invalid_operations"] == 2
    assert q["wr_operations"] == q["zero_operations"] == q["block_status_operations"] == 0


def test_prometheus_text():
    disk = SimpleNamespace(name='dis"k', stats=ExportStats(), inflight=2)
    disk.stats.record(Cmd.WRITE, 1 << 20, True, 2_000_000_000)
    other = SimpleNamespace(name="o", stats=ExportStats(), inflight=0)
    conns = [SimpleNamespace(export=disk), SimpleNamespace(export=disk), SimpleNamespace(export=None)]
    jobs = [{"id": "j1", "type": "backup", "status": "running", "current-progress": 5, "total-progress": 9,
             "bytes-copied-by-pump": 4, "bytes-copied-by-cbw": 1}]
    text = prometheus_text([disk, other], conns, jobs)
    lines = set(text.splitlines())
    assert 'nbdbackup_export_requests_total{export="dis\\"k",op="write"} 1' in lines
    assert 'nbdbackup_export_bytes_total{export="dis\\"k",op="write"} 1048576' in lines
    assert 'nbdbackup_export_request_seconds_total{export="dis\\"k",op="write"} 2.0' in lines
    assert 'nbdbackup_export_connections{export="dis\\"k"} 2' in lines
    assert 'nbdbackup_export_connections{export="o"} 0' in lines
    assert 'nbdbackup_export_inflight_requests{export="dis\\"k"} 2' in lines
    assert "nbdbackup_connections 3" in lines
    assert not any(line.startswith("nbdbackup_buffer_memory") for line in lines)
    budget = SimpleNamespace(limit=64 << 20, used=3 << 20, pooled=1 << 20, waiting=2)
    lines = set(prometheus_text([disk], conns, jobs, budget).splitlines())
    assert f"nbdbackup_buffer_memory_limit_bytes {64 << 20}" in lines
    assert f"nbdbackup_buffer_memory_used_bytes {3 << 20}" in lines
    assert f"nbdbackup_buffer_memory_pooled_bytes {1 << 20}" in lines
    assert "nbdbackup_buffer_memory_waiting_requests 2" in lines
    assert 'nbdbackup_job_copied_bytes{job="j1",type="backup",by="cbw"} 1' in lines
    assert 'nbdbackup_job_running{job="j1",type="backup"} 1' in lines
    assert not any(line.startswith("nbdbackup_export_bytes_total") and 'op="flush"' in line for line in lines)
    # Every sample belongs to a declared metric.
    declared = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    assert all(line.split("{")[0].split()[0] in declared for line in lines if not line.startswith("#"))


def test_prometheus_scratch_gauges():
    jobs = [{"id": "a", "type": "backup", "status": "running", "scratch-bytes": 3 << 16,
             "scratch-allocated": 4 << 16, "clusters-zero-in-snapshot": 7},
            {"id": "b", "type": "backup", "status": "running"}]  # sync=full: no scratch
    lines = set(prometheus_text([], [], jobs).splitlines())
    assert f'nbdbackup_job_scratch_bytes{{job="a",type="backup"}} {3 << 16}' in lines
    assert f'nbdbackup_job_scratch_allocated_bytes{{job="a",type="backup"}} {4 << 16}' in lines
    assert 'nbdbackup_job_zero_in_snapshot_clusters{job="a",type="backup"} 7' in lines
    assert not any(line.startswith("nbdbackup_job_scratch") and 'job="b"' in line for line in lines)
