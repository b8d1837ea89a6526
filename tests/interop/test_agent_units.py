"""Interop: the backup agent's systemd units under systemd's own tools (no running systemd needed).

``systemd-analyze verify`` accepts an instance of nbdbackup-agent@.service and
its timer with no warning (the copies point ExecStart at this checkout's venv,
as tests/interop/test_systemd.py does for the server's units), and
``systemd-sysusers --dry-run`` would create the agent's user.
"""

from __future__ import annotations

import subprocess

import peers

UNITS = peers.REPO / "systemd"


def test_systemd_analyze_verify_accepts_the_agent_units(short_tmp):
    exe = peers.require("systemd-analyze")
    for name in ("nbdbackup-agent@.service", "nbdbackup-agent@.timer"):
        text = (UNITS / name).read_text()
        (short_tmp / name).write_text(text.replace("/opt/nbdbackup/.venv/bin/nbdbackup",
                                                   str(peers.REPO / ".venv" / "bin" / "nbdbackup")))
    r = subprocess.run([exe, "verify", "--man=no", "./nbdbackup-agent@vm1.service", "./nbdbackup-agent@vm1.timer"],
                       cwd=short_tmp, capture_output=True, timeout=120)
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, out
    # Unknown keys and bad values are only warnings: none may appear.
    assert not [line for line in out.splitlines() if "nbdbackup" in line], out


def test_sysusers_file_creates_the_agent_user(short_tmp):
    exe = peers.require("systemd-sysusers")
    r = subprocess.run([exe, "--dry-run", f"--root={short_tmp}", str(UNITS / "nbdbackup-agent.sysusers")],
                       capture_output=True, timeout=60)
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, out
    assert "Creating group 'nbdbackup-agent'" in out and "Creating user 'nbdbackup-agent'" in out, out
    assert "ignoring" not in out.lower(), out
