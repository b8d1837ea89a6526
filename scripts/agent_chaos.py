"""Soak loop for the backup agent (docs/hunt5.md): ``python scripts/agent_chaos.py SEED ROUNDS``.

Two 24 MiB file exports of ``nbdbackup serve --state-dir`` (Unix sockets), a repository
with 1 MiB chunks, in /tmp/hunt5/rSEED.  Each round, at random: a libnbd writer
(tests/interop/agent_writer.py loop) on each disk during the round, bursts of
writes, an agent run killed (SIGKILL) after 0.05-1 s or left to finish, ``kill -9``
of the server and a restart (persistent bitmaps), the latest snapshot of d1
deleted.  Then, writers stopped, a normal run must succeed and each disk's new
snapshot must equal the disk file, byte for byte.  Prints OK or the first
mismatch; the round log is rSEED/log.txt.  Runs everything under nice -n 19."""
import json, os, random, subprocess, sys, time, shutil
from pathlib import Path
WT = Path(__file__).resolve().parents[1]; PY = str(WT / ".venv/bin/python")
seed = int(sys.argv[1]); rounds = int(sys.argv[2])
rng = random.Random(seed)
tmp = Path(f"/tmp/hunt5/r{seed}"); shutil.rmtree(tmp, ignore_errors=True); tmp.mkdir(parents=True)
M = 1 << 20; SIZE = 24 * M
DISKS = ["d1", "d2"]
for d in DISKS:
    with open(tmp / f"{d}.img", "wb") as f: f.truncate(SIZE)
(tmp / "state").mkdir()
env = dict(os.environ, PYTHONUNBUFFERED="1")
def cli(*a, check=True):
    r = subprocess.run(["nice", "-n", "19", PY, "-m", "nbdbackup.cli", *a], cwd=WT, capture_output=True, text=True, env=env, timeout=120)
    if check: assert r.returncode == 0, (a, r.stdout, r.stderr)
    return r
cli("repo", "init", str(tmp / "repo"), "--chunk-size", str(M))
sock = tmp / "nbd.sock"; ctl = tmp / "ctl.sock"
server = None
def start_server():
    global server
    for p in (sock, ctl):
        if p.exists(): p.unlink()
    server = subprocess.Popen(["nice", "-n", "19", PY, "-m", "nbdbackup.cli", "serve", "--socket", str(sock), "--control", str(ctl),
                               "--state-dir", str(tmp / "state"), *(f"{d}={tmp / (d + '.img')}" for d in DISKS)],
                              cwd=WT, stdout=open(tmp / "serve.log", "a"), stderr=subprocess.STDOUT, env=env)
    for _ in range(200):
        if sock.exists() and ctl.exists(): return
        time.sleep(0.05)
    raise RuntimeError("serve did not start")
def uri(d): return f"nbd+unix:///{d}?socket={sock}"
def agent_argv(extra=()):
    a = ["nice", "-n", "19", PY, "-m", "nbdbackup.cli", "agent", "backup", "--control", str(ctl), "--nbd", f"nbd+unix:///x?socket={sock}",
         "--repo", str(tmp / "repo"), "--json", "--io-timeout", "20", "--connections", "2"]
    for d in DISKS: a += ["--disk", d]
    return a + list(extra)
writer = None
def start_writer():
    global writer
    writer = [subprocess.Popen([PY, str(WT / "tests/interop/agent_writer.py"), "loop", uri(d), str(rng.randrange(1 << 30)), "65536"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for d in DISKS]
    for w in writer: w.stdout.readline()
def stop_writer():
    global writer
    if writer:
        for w in writer: w.kill(); w.wait()
    writer = None
def burst():
    for d in DISKS:
        subprocess.run([PY, str(WT / "tests/interop/agent_writer.py"), "burst", uri(d), str(rng.randrange(1 << 30)), str(rng.randrange(1, 20)), "65536"], capture_output=True, check=True)
def latest(d):
    sys.path.insert(0, str(WT))
    from nbdbackup.agent.repo import Repository, open_store
    repo = Repository.open(open_store(str(tmp / "repo")))
    snaps = [(repo.snapshot_info(s).get("meta", {}).get("instant", ""), s) for s in repo.snapshots() if repo.snapshot_info(s).get("meta", {}).get("disk") == d]
    snaps.sort()
    return repo, snaps
def content(repo, name):
    man = repo.load_snapshot(name)
    out = bytearray()
    for i in range(man.count):
        off, n = man.chunk_range(i)
        out += repo.get_chunk(man.chunks[i], n)
    return bytes(out)
start_server()
log = open(tmp / "log.txt", "w")
for rnd in range(rounds):
    act = []
    if rng.random() < 0.7: start_writer(); act.append("writer")
    if rng.random() < 0.5: burst(); act.append("burst")
    # a killed run
    extra = ["--read", rng.choice(["whole", "dirty"])]
    a = subprocess.Popen(agent_argv(extra), cwd=WT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    delay = rng.uniform(0.05, 1.0)
    try:
        out, err = a.communicate(timeout=delay); act.append(f"agent-finished rc={a.returncode}")
    except subprocess.TimeoutExpired:
        a.kill(); a.communicate(); act.append(f"agent-killed@{delay:.2f}")
    if rng.random() < 0.3: burst(); act.append("burst2")
    if rng.random() < 0.25:
        server.kill(); server.wait(); stop_writer(); start_server(); act.append("serve-kill9")
    if rng.random() < 0.15:
        repo, snaps = latest(DISKS[0])
        if snaps:
            cli("repo", "delete", str(tmp / "repo"), snaps[-1][1]); act.append(f"deleted {snaps[-1][1]}")
    stop_writer()
    if rng.random() < 0.5: burst(); act.append("burst3")
    r = subprocess.run(agent_argv(), cwd=WT, capture_output=True, text=True, env=env, timeout=120)
    rep = json.loads(r.stdout) if r.stdout.strip() else None
    kinds = []
    if r.returncode != 0:
        print("ROUND", rnd, act, "verify run failed", r.returncode, r.stdout[-2000:], r.stderr[-2000:], file=log, flush=True)
        print("FAIL run", rnd, act); break
    bad = False
    disks_rep = rep["disks"] if isinstance(rep, dict) and "disks" in rep else rep
    for dr in (disks_rep if isinstance(disks_rep, list) else []):
        kinds.append((dr.get("disk"), dr.get("kind"), dr.get("reason"), dr.get("snapshot")))
    for d in DISKS:
        repo, snaps = latest(d)
        snapname = [k[3] for k in kinds if k[0] == d]
        name = snapname[0] if snapname else snaps[-1][1]
        got = content(repo, name)
        want = (tmp / f"{d}.img").read_bytes()
        if got != want:
            diff = [i for i in range(0, SIZE, 65536) if got[i:i+65536] != want[i:i+65536]]
            print("ROUND", rnd, act, "MISMATCH", d, name, diff[:10], kinds, file=log, flush=True)
            print("MISMATCH", rnd, d, act, kinds); bad = True
    print("ROUND", rnd, act, kinds, file=log, flush=True)
    if bad: break
else:
    print("OK", seed, rounds)
stop_writer(); server.kill(); server.wait()
