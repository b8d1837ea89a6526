"""Interop: a short seeded run of the chaos soak (bench/soak.py, hunt 16).

``nbdbackup serve --state-dir`` (worker processes on) with a libnbd writer
(writes, WRITE_ZEROES, TRIM, FLUSH, FUA against a model), QMP backups whose
snapshot exports nbdcopy / qemu-img / ``pull --repo`` read while the writer
goes on, ``agent backup`` into an encrypted repository, ``repo
verify/prune/gc``, ``restore``, and faults: kill -9 and SIGTERM of ``serve``
(restarted on its state directory), kill -9 of the agent, job cancels, a
client that stops reading.  The soak checks invariants 1, 2, 3 and 5 after
every step (its docstring); here one fixed seed (43), 30 steps (~13 s), and the
counters prove each kind of step and check really ran.  Longer runs by hand:
``python bench/soak.py --seed N --steps 500`` (docs/hunt16.md).
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
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--seed", "43", "--steps", "30",
                        "--dir", str(short_tmp / "soak")],
                       cwd=ROOT, capture_output=True, text=True, timeout=110)
    out = r.stdout.strip().splitlines()
    assert r.returncode == 0 and out, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads(out[-1])
    assert res.get("ok"), res
    n = res["counts"]
    # Each check ran: (1) snapshot reads, (2) restarts after kill -9 / SIGTERM, (3)+(5) agent
    # snapshots restored (incrementals among them), a QMP target compared.
    for key in ("snap_reads_checked", "crash_checks", "serve_kill9", "agent_incr", "restores_checked",
                "target_checks", "verify"):
        assert n[key] >= 1, (key, n)
    assert res["writer"]["writes"] > 100 and res["writer"]["flushes"] > 5, res["writer"]
