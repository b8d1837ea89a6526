"""What `agent backup` says and returns when a signal interrupts it (doubts18 item 4).

In process (a repository in tmp_path, a real signal).  The run (`workflow.run`) is replaced by one that records some disks, then
gets a real SIGTERM/SIGHUP of this process (the CLI's handler cancels it):
exit 128 + signal unless every disk was recorded first (then 0: the backup
exists, the next run finishes the clean-up), and the report names the
recorded disks and the rolled-back ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from nbdbackup import cli
from nbdbackup.agent import workflow


def fake_run(recorded: set[str]):
    async def run(servers, store, repo, opts, parallel=2, sink=None):
        for s in servers:
            for d in s.disks:
                r = workflow.DiskResult(s.name, d)
                if d in recorded:
                    r.status, r.snapshot = "ok", f"{d}.snap"
                sink.append(r)
        os.kill(os.getpid(), signal.SIGTERM if "hup" not in recorded else signal.SIGHUP)
        await asyncio.sleep(30)
        raise AssertionError("the signal did not interrupt the run")
    return run


@pytest.mark.parametrize("recorded, sig, code", [
    (set(), "SIGTERM", 143),
    ({"a"}, "SIGTERM", 143),
    ({"a", "b"}, "SIGTERM", 0),
    ({"hup"}, "SIGHUP", 129),
])
def test_an_interrupted_run_names_what_was_recorded(tmp_path, monkeypatch, capsys, recorded, sig, code):
    repo = tmp_path / "repo"
    assert cli.main(["repo", "init", str(repo)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(workflow, "run", fake_run(recorded))
    got = cli.main(["agent", "backup", "--repo", str(repo), "--control", str(tmp_path / "ctl.sock"),
                    "--nbd", f"nbd+unix:///?socket={tmp_path}/nbd.sock", "--disk", "a", "--disk", "b",
                    "--json", "--progress", "never"])
    out, err = capsys.readouterr()
    assert got == code, (out, err)
    rep = json.loads(out)
    assert rep["exit_code"] == code and rep["interrupted"] == sig
    status = {d["disk"]: d["status"] for d in rep["disks"]}
    assert status == {d: "ok" if d in recorded else "failed" for d in ("a", "b")}
    if code == 0:
        assert "after every disk was recorded" in rep["error"] and "note:" in err
    else:
        assert f"interrupted by {sig}" in rep["error"] and "rolled back" in rep["error"]
        assert ("recorded:" in rep["error"]) == bool(recorded & {"a", "b"})
        assert all(f"interrupted by {sig}" in d["error"] for d in rep["disks"] if d["status"] != "ok")
