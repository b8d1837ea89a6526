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
import random, subprocess, sys, time
from pathlib import Path

from chaos_rig import Rig

seed = int(sys.argv[1]); rounds = int(sys.argv[2])
rng = random.Random(seed)
rig = Rig(Path(f"/tmp/hunt7/c{seed}"), rng)
rig.start_server()
log = open(rig.tmp / "log.txt", "w")
counts = {}
for rnd in range(rounds):
    act = []
    rig.start_writer(); act.append("writer")
    if rng.random() < 0.5: rig.burst(); act.append("burst")
    a = rig.agent(["--read", rng.choice(["whole", "dirty"])])
    delay = rng.uniform(0.02, 1.5)
    try:
        out, err = a.communicate(timeout=delay); act.append(f"agent-finished rc={a.returncode}")
        if rng.random() < 0.5:
            rig.kill_server(); act.append("serve-kill9-after")
    except subprocess.TimeoutExpired:
        rig.kill_server(); act.append(f"serve-kill9@{delay:.2f}")
        r_ = rng.random()
        if r_ < 0.3:
            a.kill(); act.append("agent-killed")
        elif r_ < 0.5:
            time.sleep(rng.uniform(0, 0.3)); a.kill(); act.append("agent-killed-later")
        a.communicate(); act.append(f"agent rc={a.returncode}")
    rig.stop_writer()
    if rig.server.poll() is not None:
        rig.start_server()
        if rng.random() < 0.2:
            # a second kill while the restarted server opens its state / the next run begins
            a = rig.agent()
            time.sleep(rng.uniform(0.02, 0.6)); rig.kill_server(); a.communicate()
            act.append(f"second-kill agent rc={a.returncode}"); rig.start_server()
    if rng.random() < 0.3: rig.burst(); act.append("burst2")
    rig.stop_writer()
    if rng.random() < 0.5: rig.burst(); act.append("burst3")
    kinds = rig.check(rnd, act, log)
    if kinds is None: break
    for k in kinds: counts[k[1]] = counts.get(k[1], 0) + 1
else:
    print("OK", seed, rounds, counts)
rig.stop_writer(); rig.kill_server()
