"""Interop: the README's main job (``python -m nbdbackup.demo``) runs end to end and proves itself.

The demo starts a real server, backs a disk up under live writes, pulls the
snapshot export with the pull agent and verifies every copy with blake3; it
exits 0 only when every proof holds.  A small disk keeps this quick.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_proves_the_backup():
    r = subprocess.run([sys.executable, "-m", "nbdbackup.demo", "--size", "32M", "--speed", "32M"], cwd=ROOT,
                       capture_output=True, text=True, errors="replace", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "RESULT: the backup is the disk exactly as it was at the start" in out
    assert out.count("== start") == 3  # target, snapshot export, pulled copy
    assert "verify pulled copy: OK" in out and "verify push target: OK" in out
    assert "moved on" in out  # live writes landed during the backup
