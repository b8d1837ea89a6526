"""kill -9 a process that marks persistent bitmaps; every mark it reported is in the reloaded files.

The child (`CHILD` below, run with the venv's python) loads the store, then
loops: mark a random range in two bitmaps (64 KiB and 4 KiB granularity),
print it AFTER `mark` returned, and now and then sync, rewrite a bitmap's
file atomically (the metadata path), or freeze / end a backup job's use of
the coarse bitmap (successor protocol: a frozen parent's file must keep the
union of old bits and new writes).  The
parent SIGKILLs it at a random moment, reloads the store, and checks that
every printed range is dirty in both bitmaps and that nothing is inconsistent
(process death keeps the page cache, same boot).  A line is counted only when
complete (ends with a newline), so a mark interrupted mid-print is not
claimed.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time


from nbdbackup.bitmap.dirty import BitmapRegistry
from nbdbackup.bitmap.store import BitmapStore

DISK = 3 * 1024**3 + 12345  # not a multiple of any granularity
TRIALS = 24

CHILD = textwrap.dedent(
    """
    import random, sys
    from nbdbackup.bitmap.dirty import BitmapRegistry
    from nbdbackup.bitmap.store import BitmapStore
    root, disk, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rnd = random.Random(seed)
    store = BitmapStore(root)
    reg = BitmapRegistry("exp", disk, store)
    bms = [reg.get("coarse"), reg.get("fine")]
    out = sys.stdout
    coarse = bms[0]
    out.write("ready\\n"); out.flush()
    while True:
        length = rnd.choice([1, 512, 4096, 65536, 1 << 20, rnd.randrange(1, 1 << 22)])
        off = rnd.randrange(0, disk - length + 1)
        reg.mark(off, length)
        out.write(f"{off} {length}\\n"); out.flush()
        r = rnd.random()
        if r < 0.05:
            reg.sync()
        elif r < 0.08 and not coarse.busy:
            store.rewrite("exp", rnd.choice(bms))
        elif r < 0.10:
            # A backup job on "coarse": freeze, later end it.  "A" = the
            # parent now holds only the writes since the freeze.
            if not coarse.busy:
                coarse.freeze(rnd.choice(["on-success", "never"]))
                out.write("F\\n"); out.flush()
            else:
                ok = rnd.random() < 0.5
                abdicated = ok and coarse.sync_mode == "on-success"
                coarse.finish(ok)
                out.write("A\\n" if abdicated else "R\\n"); out.flush()
    """
)


def run_trial(root: str, seed: int, rnd: random.Random) -> list[str]:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, root, str(DISK), str(seed)],
        stdout=subprocess.PIPE,
        env=env,
    )
    buf = b""
    try:
        # Wait for "ready", then let it run a random while before the kill.
        deadline = time.monotonic() + 10
        while b"ready\n" not in buf:
            assert time.monotonic() < deadline, "child did not start"
            r, _, _ = select.select([p.stdout], [], [], 0.1)
            if r:
                chunk = os.read(p.stdout.fileno(), 65536)
                assert chunk, f"child exited early: {p.wait()}"
                buf += chunk
        kill_at = time.monotonic() + rnd.uniform(0.0, 0.25)
        while time.monotonic() < kill_at:
            r, _, _ = select.select([p.stdout], [], [], 0.01)
            if r:
                buf += os.read(p.stdout.fileno(), 65536)
        p.send_signal(signal.SIGKILL)
        p.wait()
        buf += p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    assert p.returncode == -signal.SIGKILL
    text = buf.decode().split("ready\n", 1)[1]
    return text.split("\n")[:-1]  # the last element is an incomplete line or ""


def test_kill9_keeps_every_reported_mark(short_tmp) -> None:
    root = os.path.join(short_tmp, "state")
    store = BitmapStore(root)
    reg = BitmapRegistry("exp", DISK, store)
    reg.add("coarse", 65536, persistent=True)
    reg.add("fine", 4096, persistent=True)
    reg.close()
    rnd = random.Random(1234)
    # Marks each bitmap must hold.  "coarse" drops the marks made before a
    # freeze when its job ends by abdication; a freeze pending when the child
    # dies counts as a failed job (reclaim: nothing dropped).
    want: dict[str, list[tuple[int, int]]] = {"coarse": [], "fine": []}
    jobs = 0
    for trial in range(TRIALS):
        frozen_at: int | None = None
        for line in run_trial(root, trial, rnd):
            if line == "F":
                frozen_at = len(want["coarse"])
                jobs += 1
            elif line in ("A", "R"):
                assert frozen_at is not None
                if line == "A":
                    want["coarse"] = want["coarse"][frozen_at:]
                frozen_at = None
            else:
                off, length = map(int, line.split())
                want["coarse"].append((off, length))
                want["fine"].append((off, length))
        store = BitmapStore(root)
        reg = BitmapRegistry("exp", DISK, store)
        try:
            assert sorted(b.name for b in reg) == ["coarse", "fine"]
            for bm in reg:
                assert not bm.inconsistent, (trial, bm.inconsistent_reason)
                for off, length in want[bm.name]:
                    first = off // bm.granularity
                    last = (off + length - 1) // bm.granularity
                    assert bm.bits.all(first, last - first + 1), (trial, bm.name, off, length)
        finally:
            reg.close()
    assert len(want["fine"]) > 10 * TRIALS, "the child hardly marked anything: the test proves little"
    assert jobs > 0
