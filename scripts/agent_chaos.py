"""Soak loop for the backup agent (docs/hunt5.md): ``python scripts/agent_chaos.py SEED ROUNDS``.

Two 24 MiB file exports of ``nbdbackup serve --state-dir`` (Unix sockets), a repository
with 1 MiB chunks, in /tmp/hunt5/rSEED.  Each round, at random: a libnbd writer
(tests/interop/agent_writer.py loop) on each disk during the round, bursts of
writes, an agent run killed (SIGKILL) after 0.05-1 s or left to finish, ``kill -9``
of the server and a restart (persistent bitmaps), the latest snapshot of d1
deleted.  Then, writers stopped, a normal run must succeed and each disk's new
snapshot must equal the disk file, byte for byte.  Prints OK or the first
mismatch; the round log is rSEED/log.txt.  Runs everything under nice -n 19."""
import random, subprocess, sys
from pathlib import Path

from chaos_rig import DISKS, Rig

seed = int(sys.argv[1]); rounds = int(sys.argv[2])
rng = random.Random(seed)
rig = Rig(Path(f"/tmp/hunt5/r{seed}"), rng)
rig.start_server()
log = open(rig.tmp / "log.txt", "w")
for rnd in range(rounds):
    act = []
    if rng.random() < 0.7: rig.start_writer(); act.append("writer")
    if rng.random() < 0.5: rig.burst(); act.append("burst")
    # a killed run
    a = rig.agent(["--read", rng.choice(["whole", "dirty"])])
    delay = rng.uniform(0.05, 1.0)
    try:
        out, err = a.communicate(timeout=delay); act.append(f"agent-finished rc={a.returncode}")
    except subprocess.TimeoutExpired:
        a.kill(); a.communicate(); act.append(f"agent-killed@{delay:.2f}")
    if rng.random() < 0.3: rig.burst(); act.append("burst2")
    if rng.random() < 0.25:
        rig.kill_server(); rig.stop_writer(); rig.start_server(); act.append("serve-kill9")
    if rng.random() < 0.15:
        repo, snaps = rig.latest(DISKS[0])
        if snaps:
            rig.cli("repo", "delete", str(rig.tmp / "repo"), snaps[-1][1]); act.append(f"deleted {snaps[-1][1]}")
    rig.stop_writer()
    if rng.random() < 0.5: rig.burst(); act.append("burst3")
    if rig.check(rnd, act, log) is None: break
else:
    print("OK", seed, rounds)
rig.stop_writer(); rig.kill_server()
