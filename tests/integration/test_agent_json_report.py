import io, json, sys
from nbdbackup import cli
from nbdbackup.agent.repo import DirStore, Repository

def test_agent_json_report_is_one_write(tmp_path, monkeypatch):
    """`agent backup --json` writes its report in one piece: json.dump to an unbuffered stdout
    (PYTHONUNBUFFERED, as in the bench and many service managers) was ~180 write calls."""
    Repository.init(DirStore(str(tmp_path / "r")), 64 * 1024)
    writes = []

    class Out(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    out = Out()
    monkeypatch.setattr(sys, "stdout", out)
    rc = cli.main(["agent", "backup", "--control", str(tmp_path / "no-such-socket"), "--nbd",
                   f"nbd+unix:///?socket={tmp_path / 'no-nbd'}", "--disk", "d", "--repo", str(tmp_path / "r"),
                   "--json", "--progress", "never"])
    rep = json.loads(out.getvalue())
    assert rc != 0 and rep["ok"] is False and rep["disks"][0]["status"] != "ok"
    assert len([w for w in writes if w]) == 1, writes[:5]
