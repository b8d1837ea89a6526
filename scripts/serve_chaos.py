"""Soak loop for ``serve`` killed mid-run (docs/hunt7.md): ``python scripts/serve_chaos.py SEED ROUNDS``.

Like scripts/agent_chaos.py (hunt 5), whose server was only ever killed between agent runs:
here ``kill -9`` of ``nbdbackup serve --state-dir`` lands WHILE an agent run works -- at a
random moment 0.02-1.5 s after the run started (the bitmap transaction, the pull with
``qemu:dirty-bitmap``, the job's end, the bitmap clears/merges/removals of the finish), with
libnbd writers on both disks (they die with the server; restarted after the restart), the
agent itself sometimes killed at the same moment or a little later, sometimes a second kill
of the restarted server.  Then, writers stopped, a normal run must succeed and each disk's
new snapshot must equal the disk file byte for byte (an incremental that missed a change
since the last successful backup differs).  Kinds of the checking runs (full / incremental)
are counted so a soak that only ever did fulls shows.  Files in /tmp/hunt7/cSEED; prints OK
or the first mismatch."""
import json, os, random, subprocess, sys, time, shutil
from pathlib import Path
WT = Path(__file__).resolve().parents[1]; PY = str(WT / ".venv/bin/python")
seed = int(sys.argv[1]); rounds = int(sys.argv[2])
rng = random.Random(seed)
tmp = Path(f"/tmp/hunt7/c{seed}"); shutil.rmtree(tmp, ignore_errors=True); tmp.mkdir(parents=True)
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
counts = {}
for rnd in range(rounds):
    act = []
    start_writer(); act.append("writer")
    if rng.random() < 0.5: burst(); act.append("burst")
    extra = ["--read", rng.choice(["whole", "dirty"])]
    a = subprocess.Popen(agent_argv(extra), cwd=WT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    delay = rng.uniform(0.02, 1.5)
    try:
        out, err = a.communicate(timeout=delay); act.append(f"agent-finished rc={a.returncode}")
        if rng.random() < 0.5:
            server.kill(); server.wait(); act.append("serve-kill9-after")
    except subprocess.TimeoutExpired:
        server.kill(); server.wait(); act.append(f"serve-kill9@{delay:.2f}")
        r_ = rng.random()
        if r_ < 0.3:
            a.kill(); act.append("agent-killed")
        elif r_ < 0.5:
            time.sleep(rng.uniform(0, 0.3)); a.kill(); act.append("agent-killed-later")
        a.communicate(); act.append(f"agent rc={a.returncode}")
    stop_writer()
    if server.poll() is not None:
        start_server()
        if rng.random() < 0.2:
            # a second kill while the restarted server opens its state / the next run begins
            a = subprocess.Popen(agent_argv(), cwd=WT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            time.sleep(rng.uniform(0.02, 0.6)); server.kill(); server.wait(); a.communicate()
            act.append(f"second-kill agent rc={a.returncode}"); start_server()
    if rng.random() < 0.3: burst(); act.append("burst2")
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
    for k in kinds: counts[k[1]] = counts.get(k[1], 0) + 1
    print("ROUND", rnd, act, kinds, file=log, flush=True)
    if bad: break
else:
    print("OK", seed, rounds, counts)
stop_writer(); server.kill(); server.wait()
