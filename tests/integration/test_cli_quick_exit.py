"""`nbdbackup restore` / `agent backup` end the process with ``os._exit`` once their work is
done, durable and reported (``cli._quick_exit``: interpreter teardown cost 0.1-0.3 s of a
0.3 s run) -- only from the command line; ``main(argv)`` returns."""

from __future__ import annotations

import json
import os

from nbdbackup.agent.manifest import Manifest
from nbdbackup.agent.repo import DirStore, Repository

C = 64 * 1024


def store_image(repo: Repository, name: str, data: bytes) -> None:
    m = Manifest(len(data), repo.chunk_size)
    m.chunks = [repo.chunk_id(data[o:o + n]) for o, n in map(m.chunk_range, range(m.count))]
    for i, d in enumerate(m.chunks):
        o, n = m.chunk_range(i)
        repo.put_chunk(d, data[o:o + n])
    repo.save_snapshot(name, m)



def test_restore_quick_exit_only_from_the_command_line(tmp_path, monkeypatch):
    """`restore` ends the process with os._exit once its work is done, durable and
    reported (``cli._quick_exit``) -- but only when run as a command: a caller of
    ``main(argv)`` gets the return code back.  From the command line the JSON report
    must still arrive whole through a pipe, with the right exit code."""
    import subprocess
    import sys

    from nbdbackup import cli

    repo = Repository.init(DirStore(str(tmp_path / "r")), C)
    data = os.urandom(C) + bytes(C) + os.urandom(C // 2)
    store_image(repo, "s0", data)
    called = []
    monkeypatch.setattr(cli, "_quick_exit", lambda rc: called.append(rc))
    assert cli.main(["restore", str(tmp_path / "r"), "s0", str(tmp_path / "a.raw")]) == 0
    assert called == [] and (tmp_path / "a.raw").read_bytes() == data
    # sys.argv-driven: _quick_exit runs (and the output is complete).
    monkeypatch.setattr(sys, "argv", ["nbdbackup", "restore", str(tmp_path / "r"), "s0", str(tmp_path / "b.raw")])
    assert cli.main() == 0 and called == [0]
    r = subprocess.run([sys.executable, "-m", "nbdbackup.cli", "restore", "--json", str(tmp_path / "r"), "s0",
                        str(tmp_path / "c.raw")], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    rep = json.loads(r.stdout)
    assert rep["snapshot"] == "s0" and rep["target"] == str(tmp_path / "c.raw")
    assert (tmp_path / "c.raw").read_bytes() == data
    r = subprocess.run([sys.executable, "-m", "nbdbackup.cli", "restore", "--json", str(tmp_path / "r"), "nope",
                        str(tmp_path / "d.raw")], capture_output=True, timeout=60)
    assert r.returncode == 1 and b"nope" in r.stdout + r.stderr
