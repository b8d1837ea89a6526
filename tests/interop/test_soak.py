"""Interop: a short seeded run of the chaos soak (bench/soak.py, hunt 16).

``nbdbackup serve --state-dir`` (worker processes on) with a libnbd writer
(writes, WRITE_ZEROES, TRIM, FLUSH, FUA against a model), QMP backups whose
snapshot exports nbdcopy / qemu-img / ``pull --repo`` read while the writer
goes on, ``agent backup`` into an encrypted repository, ``repo
verify/prune/gc``, ``restore``, and faults: kill -9 and SIGTERM of ``serve``
(restarted on its state directory), kill -9 of the agent, job cancels, a
client that stops reading.  The soak checks invariants 1, 2, 3 and 5 after
every step (its docstring); here one fixed seed (48), 30 steps (~20-30 s), and
the counters prove each kind of step and check really ran.  Hunt 17's
dimensions ``aio`` (a pipelined writer: requests in flight together, FLUSH
among them), ``modes`` (QMP ``sync top`` / ``sync bitmap`` with bitmap-modes,
the bitmap read back) and ``disks2`` (two exports, the agent backs up both in
one run) are on; not ``tls`` (TLS connections are never handed to worker
processes, so the worker path would go unchecked) nor ``s3`` (a Ceph RGW takes
seconds to start; tests/interop/test_repo_s3.py has it).  Longer runs by hand:
``python bench/soak.py --seed N --steps 500 --dims random`` (docs/hunt16.md,
docs/hunt17.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import peers

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def test_seeded_soak_holds_every_invariant(short_tmp):
    for tool in ("nbdcopy", "qemu-img"):
        peers.require(tool)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--seed", "48", "--steps", "30",
                        "--dims", "aio,modes,disks2", "--dir", str(short_tmp / "soak")],
                       cwd=ROOT, capture_output=True, text=True, timeout=110)
    out = r.stdout.strip().splitlines()
    assert r.returncode == 0 and out, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads(out[-1])
    assert res.get("ok"), res
    n = res["counts"]
    # Each check ran: (1) snapshot reads, (2) restarts after kill -9 / SIGTERM, (3)+(5) agent
    # snapshots restored (incrementals among them), a QMP target compared.
    for key in ("snap_reads_checked", "crash_checks", "serve_kill9", "agent_incr", "restores_checked",
                "target_checks", "verify",
                # hunt 17: a QMP job's bitmap read back; both disks backed up in one agent run, the
                # second disk's snapshots restored and its live disk checked after a restart
                "bitmap_checks", "agent_multi_ok", "restores_disk2", "crash_checks_disk2"):
        assert n[key] >= 1, (key, n)
    assert n["qmp_top_ok"] + n["qmp_bitmap_ok"] >= 1, n
    w = res["writer"]
    assert w["writes"] > 100 and w["flushes"] > 5, w
    assert w["batches"] > 10 and w["batch_max_inflight"] >= 8 and w["batch_flush"] >= 1, w
