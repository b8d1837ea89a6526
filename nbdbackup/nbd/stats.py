"""Per-export I/O statistics (QEMU ``query-blockstats`` style) and the Prometheus text form.

Role: every export carries one `ExportStats`; `nbd.server` records each
request it answers (command, bytes, success, time from start to reply
queued).  The control socket's ``query-export-stats`` returns them with
QEMU's field names (``rd_bytes``, ``wr_operations``, ``failed_flush_operations``,
``unmap_total_time_ns`` ...); ``serve --metrics HOST:PORT`` serves them, with
connection and job gauges, as Prometheus text (`prometheus_text`).

Invariants: counters only grow while the export exists; recording costs a
few list increments (it sits on the per-request path); a request refused by
validation (bad range, bad flags) counts in ``invalid_operations`` only.
"""

from __future__ import annotations

from typing import Any, Iterable

from .wire import Cmd

#: Command number -> QEMU's prefix for it (DISC is never recorded).
KIND = {int(Cmd.READ): "rd", int(Cmd.WRITE): "wr", int(Cmd.FLUSH): "flush", int(Cmd.TRIM): "unmap",
        int(Cmd.CACHE): "cache", int(Cmd.WRITE_ZEROES): "zero", int(Cmd.BLOCK_STATUS): "block_status"}
#: Prometheus label value per command.
OP = {int(Cmd.READ): "read", int(Cmd.WRITE): "write", int(Cmd.FLUSH): "flush", int(Cmd.TRIM): "trim",
      int(Cmd.CACHE): "cache", int(Cmd.WRITE_ZEROES): "write_zeroes", int(Cmd.BLOCK_STATUS): "block_status"}
_N = 8


class ExportStats:
    """Counters of one export, indexed by command number.

    Fields: ``ops`` / ``bytes`` / ``failed`` / ``time_ns`` (per command:
    completed requests, their lengths, how many were answered with an error,
    total service time); ``invalid`` (requests refused before running).
    """

    __slots__ = ("ops", "bytes", "failed", "time_ns", "invalid")

    def __init__(self) -> None:
        self.ops = [0] * _N
        self.bytes = [0] * _N
        self.failed = [0] * _N
        self.time_ns = [0] * _N
        self.invalid = 0

    def record(self, cmd: int, length: int, ok: bool, ns: int) -> None:
        self.ops[cmd] += 1
        self.time_ns[cmd] += ns
        if ok:
            self.bytes[cmd] += length
        else:
            self.failed[cmd] += 1

    def record_many(self, cmd: int, n: int, nbytes: int, ns: int) -> None:
        """``n`` successful requests of ``cmd`` answered together (a batch):
        ``nbytes`` in all, ``ns`` of service time in all."""
        self.ops[cmd] += n
        self.time_ns[cmd] += ns
        self.bytes[cmd] += nbytes

    def to_qmp(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for cmd, k in KIND.items():
            if cmd != Cmd.FLUSH:
                out[f"{k}_bytes"] = self.bytes[cmd]
            out[f"{k}_operations"] = self.ops[cmd] - self.failed[cmd]
            out[f"failed_{k}_operations"] = self.failed[cmd]
            out[f"{k}_total_time_ns"] = self.time_ns[cmd]
        out["invalid_operations"] = self.invalid
        return out


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(exports: Iterable[Any], connections: Iterable[Any], jobs: Iterable[dict],
                    budget: Any = None, budget_total: int | None = None) -> str:
    """Prometheus exposition text (format 0.0.4).

    ``exports``: objects with ``name``, ``stats`` (`ExportStats`),
    ``inflight``; ``connections``: objects with ``export`` (an export or
    None); ``jobs``: ``query-jobs`` dictionaries; ``budget``: the server's
    `nbd.budget.MemoryBudget` (``limit``, ``used``, ``pooled``, ``waiting``;
    ``budget_total``: the configured budget of all processes, default ``limit``),
    or None.
    """
    exports = list(exports)
    conns = list(connections)
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, int | float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}")

    def per_op(attr: str, scale: float = 1.0, skip_flush: bool = False) -> list[tuple[str, int | float]]:
        out: list[tuple[str, int | float]] = []
        for e in exports:
            arr = getattr(e.stats, attr)
            for cmd, op in OP.items():
                if skip_flush and cmd == Cmd.FLUSH:
                    continue
                v = arr[cmd] * scale if scale != 1.0 else arr[cmd]
                out.append((f'export="{_label(e.name)}",op="{op}"', v))
        return out

    metric("nbdbackup_export_requests_total", "counter", "NBD requests answered, by export and command.",
           per_op("ops"))
    metric("nbdbackup_export_failed_requests_total", "counter", "NBD requests answered with an error.",
           per_op("failed"))
    metric("nbdbackup_export_bytes_total", "counter", "Bytes of successful requests, by command.",
           per_op("bytes", skip_flush=True))
    metric("nbdbackup_export_request_seconds_total", "counter", "Time spent serving requests, by command.",
           per_op("time_ns", 1e-9))
    metric("nbdbackup_export_invalid_requests_total", "counter", "Requests refused by validation.",
           [(f'export="{_label(e.name)}"', e.stats.invalid) for e in exports])
    metric("nbdbackup_export_inflight_requests", "gauge", "Requests running now.",
           [(f'export="{_label(e.name)}"', e.inflight) for e in exports])
    metric("nbdbackup_export_connections", "gauge", "Connections in the transmission phase, by export.",
           [(f'export="{_label(e.name)}"', sum(1 for c in conns if c.export is e)) for e in exports])
    metric("nbdbackup_connections", "gauge", "Open NBD connections (any phase).", [("", len(conns))])
    if budget is not None:
        metric("nbdbackup_buffer_memory_limit_bytes", "gauge",
               "The request buffer budget (--max-buffer-memory, all processes together).",
               [("", budget_total if budget_total is not None else budget.limit)])
        metric("nbdbackup_buffer_memory_share_bytes", "gauge",
               "This process's share of the budget (the rest goes to the worker processes).",
               [("", budget.limit)])
        metric("nbdbackup_buffer_memory_used_bytes", "gauge",
               "Request buffer memory charged now (payloads, reply buffers, pooled buffers).", [("", budget.used)])
        metric("nbdbackup_buffer_memory_pooled_bytes", "gauge", "Free buffers kept for reuse (part of used).",
               [("", budget.pooled)])
        metric("nbdbackup_buffer_memory_waiting_requests", "gauge",
               "Requests waiting for buffer memory (their connections read nothing meanwhile).",
               [("", budget.waiting)])
    jobs = list(jobs)
    jl = [(j, f'job="{_label(str(j.get("id")))}",type="{_label(str(j.get("type", "")))}"') for j in jobs]
    metric("nbdbackup_job_progress_bytes", "gauge", "A job's current progress.",
           [(lab, j.get("current-progress", 0)) for j, lab in jl])
    metric("nbdbackup_job_total_bytes", "gauge", "A job's total work.",
           [(lab, j.get("total-progress", 0)) for j, lab in jl])
    metric("nbdbackup_job_copied_bytes", "gauge", "Bytes a backup job copied, by who copied them.",
           [(f'{lab},by="pump"', j.get("bytes-copied-by-pump", 0)) for j, lab in jl]
           + [(f'{lab},by="cbw"', j.get("bytes-copied-by-cbw", 0)) for j, lab in jl])
    sl = [(j, lab) for j, lab in jl if "scratch-bytes" in j]
    metric("nbdbackup_job_scratch_bytes", "gauge",
           "Point-in-time bytes a backup job holds in its scratch (copy-before-write outside the sync set).",
           [(lab, j["scratch-bytes"]) for j, lab in sl])
    metric("nbdbackup_job_scratch_allocated_bytes", "gauge",
           "Bytes the job's scratch occupies (st_blocks of a scratch file).",
           [(lab, j.get("scratch-allocated", 0)) for j, lab in sl])
    metric("nbdbackup_job_zero_in_snapshot_clusters", "gauge",
           "Clusters copy-before-write found zero in the source and copied nowhere.",
           [(lab, j.get("clusters-zero-in-snapshot", 0)) for j, lab in jl])
    metric("nbdbackup_job_running", "gauge", "1 while the job is running.",
           [(lab, 1 if j.get("status") == "running" else 0) for j, lab in jl])
    return "\n".join(lines) + "\n"
