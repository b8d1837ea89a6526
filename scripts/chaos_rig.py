"""The rig the agent soaks share (scripts/agent_chaos.py, scripts/serve_chaos.py; not CI).

Role: two 24 MiB file exports of ``nbdbackup serve --state-dir`` on Unix sockets, a
repository with 1 MiB chunks, libnbd writers (tests/interop/agent_writer.py), agent runs,
and the check every round ends with: a normal agent run must succeed and each disk's new
snapshot must equal the disk file byte for byte.  Everything runs under ``nice -n 19``
from this checkout's .venv; files live in the directory given.

Fields (`Rig`): ``tmp`` (the directory); ``rng`` (the soak's seeded random.Random);
``server`` (the running ``serve`` Popen, replaced by `start_server`); ``writers`` (the
running writer Popens, or None); ``env`` (of every child).
"""
import json, os, shutil, subprocess, sys, time
from pathlib import Path

WT = Path(__file__).resolve().parents[1]
PY = str(WT / ".venv/bin/python")
M = 1 << 20
SIZE = 24 * M
DISKS = ["d1", "d2"]


class Rig:
    def __init__(self, tmp: Path, rng) -> None:
        self.tmp, self.rng = tmp, rng
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for d in DISKS:
            with open(tmp / f"{d}.img", "wb") as f:
                f.truncate(SIZE)
        (tmp / "state").mkdir()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.sock, self.ctl = tmp / "nbd.sock", tmp / "ctl.sock"
        self.server = None
        self.writers = None
        self.cli("repo", "init", str(tmp / "repo"), "--chunk-size", str(M))

    def cli(self, *a, check=True):
        r = subprocess.run(["nice", "-n", "19", PY, "-m", "nbdbackup.cli", *a], cwd=WT, capture_output=True,
                           text=True, env=self.env, timeout=120)
        if check:
            assert r.returncode == 0, (a, r.stdout, r.stderr)
        return r

    def start_server(self) -> None:
        for p in (self.sock, self.ctl):
            if p.exists():
                p.unlink()
        self.server = subprocess.Popen(
            ["nice", "-n", "19", PY, "-m", "nbdbackup.cli", "serve", "--socket", str(self.sock), "--control",
             str(self.ctl), "--state-dir", str(self.tmp / "state"), *(f"{d}={self.tmp / (d + '.img')}" for d in DISKS)],
            cwd=WT, stdout=open(self.tmp / "serve.log", "a"), stderr=subprocess.STDOUT, env=self.env)
        for _ in range(200):
            if self.sock.exists() and self.ctl.exists():
                return
            time.sleep(0.05)
        raise RuntimeError("serve did not start")

    def kill_server(self) -> None:
        self.server.kill()
        self.server.wait()

    def uri(self, d: str) -> str:
        return f"nbd+unix:///{d}?socket={self.sock}"

    def agent_argv(self, extra=()) -> list[str]:
        a = ["nice", "-n", "19", PY, "-m", "nbdbackup.cli", "agent", "backup", "--control", str(self.ctl),
             "--nbd", f"nbd+unix:///x?socket={self.sock}", "--repo", str(self.tmp / "repo"), "--json",
             "--io-timeout", "20", "--connections", "2"]
        for d in DISKS:
            a += ["--disk", d]
        return a + list(extra)

    def agent(self, extra=()) -> subprocess.Popen:
        return subprocess.Popen(self.agent_argv(extra), cwd=WT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=self.env)

    def start_writer(self) -> None:
        self.writers = [subprocess.Popen([PY, str(WT / "tests/interop/agent_writer.py"), "loop", self.uri(d),
                                          str(self.rng.randrange(1 << 30)), "65536"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for d in DISKS]
        for w in self.writers:
            w.stdout.readline()

    def stop_writer(self) -> None:
        for w in self.writers or ():
            w.kill()
            w.wait()
        self.writers = None

    def burst(self) -> None:
        for d in DISKS:
            subprocess.run([PY, str(WT / "tests/interop/agent_writer.py"), "burst", self.uri(d),
                            str(self.rng.randrange(1 << 30)), str(self.rng.randrange(1, 20)), "65536"],
                           capture_output=True, check=True)

    def latest(self, d: str):
        """(the repository, [(instant, snapshot name)] of disk ``d``, oldest first)."""
        sys.path.insert(0, str(WT))
        from nbdbackup.agent.repo import Repository, open_store
        repo = Repository.open(open_store(str(self.tmp / "repo")))
        snaps = [(repo.snapshot_info(s).get("meta", {}).get("instant", ""), s) for s in repo.snapshots()
                 if repo.snapshot_info(s).get("meta", {}).get("disk") == d]
        snaps.sort()
        return repo, snaps

    @staticmethod
    def content(repo, name: str) -> bytes:
        man = repo.load_snapshot(name)
        out = bytearray()
        for i in range(man.count):
            _, n = man.chunk_range(i)
            out += repo.get_chunk(man.chunks[i], n)
        return bytes(out)

    def check(self, rnd: int, act: list, log):
        """A normal run, then every disk's new snapshot against its file.  Returns the run's
        ``(disk, kind, reason, snapshot)`` list, or None after printing the failure."""
        r = subprocess.run(self.agent_argv(), cwd=WT, capture_output=True, text=True, env=self.env, timeout=120)
        if r.returncode != 0:
            print("ROUND", rnd, act, "verify run failed", r.returncode, r.stdout[-2000:], r.stderr[-2000:],
                  file=log, flush=True)
            print("FAIL run", rnd, act)
            return None
        rep = json.loads(r.stdout) if r.stdout.strip() else None
        disks_rep = rep["disks"] if isinstance(rep, dict) and "disks" in rep else rep
        kinds = [(dr.get("disk"), dr.get("kind"), dr.get("reason"), dr.get("snapshot"))
                 for dr in (disks_rep if isinstance(disks_rep, list) else [])]
        bad = False
        for d in DISKS:
            repo, snaps = self.latest(d)
            named = [k[3] for k in kinds if k[0] == d]
            name = named[0] if named else snaps[-1][1]
            got, want = self.content(repo, name), (self.tmp / f"{d}.img").read_bytes()
            if got != want:
                diff = [i for i in range(0, SIZE, 65536) if got[i:i + 65536] != want[i:i + 65536]]
                print("ROUND", rnd, act, "MISMATCH", d, name, diff[:10], kinds, file=log, flush=True)
                print("MISMATCH", rnd, d, act, kinds)
                bad = True
        print("ROUND", rnd, act, kinds, file=log, flush=True)
        return None if bad else kinds
