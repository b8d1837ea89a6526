"""Bug hunt 3 (docs/hunt3.md): backups racing live writes and snapshot
reads over real NBD connections, against invariants 1 and 3.

One in-process server (2 worker processes, the default) serves a sparse
file export ``disk`` with the persistent dirty bitmap ``b0``.  Three writer
connections stream pipelined batches of tagged WRITEs and WRITE_ZEROES,
each in its own quarter of the disk (so a block's versions are ordered:
a batch's replies are awaited before the next batch, and the ranges of a
batch do not overlap); the last quarter keeps its initial content (data
and holes).  Every 4 KiB block a WRITE writes holds ``(block, version)``
repeated, so a block's content names the write that put it there.

Rounds, back to back: a backup starts at a random moment of the stream
(``backup-start`` sync none/full/incremental, or a ``transaction`` of a
full backup and ``block-dirty-bitmap-clear b0``), with a file target the
engine creates (copystate rule 11, the task-free ``protect_sync`` copies),
a random speed, sometimes a small ``scratch-limit`` (rule 10: ENOSPC) with
a random ``on-cbw-error``.  Its snapshot is read whole at once (R0) and
then at random while the job runs, is cancelled at a random moment, or
completes, and while it is dismissed -- by two reader connections
pipelining 4 reads each.  Checks:

- invariant 1: R0 is the disk at the start: each block holds the version
  last acknowledged before ``backup-start`` was called, or one sent before
  it returned (nothing later, nothing that failed); every later read of the
  snapshot returns R0's bytes -- or an error once the job was dismissed or
  the snapshot broke (never other bytes); a completed full backup's target
  is R0, an incremental's is R0 on its dirty clusters;
- invariant 3: at quiet points (writers paused), every 64 KiB granule where
  the disk differs from the image of the last bitmap reset point (the R0 of
  the last successful incremental, or of a full + clear transaction,
  whatever its job's outcome) is dirty in ``b0`` -- registry and file.

Hunting knobs (not for CI): ``NBDBACKUP_HUNT_SEED``, ``NBDBACKUP_HUNT_ROUNDS``.
The fresh-machine check runs the first quarter of the rounds (tests/scaled.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import struct

import scaled
from test_server_batch import TRIM, WRITE, WRITE_ZEROES, Raw, req, run
from test_server_workers_bitmaps import file_granules

from nbdbackup.backup.bitmaps import RegistryBitmapSource
from nbdbackup.backup.engine import Engine
from nbdbackup.backup.testing import Fault, FaultDev
from nbdbackup.bitmap.manager import BitmapManager
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.memory import MemoryDev
from nbdbackup.nbd.server import Server

BS = 4096
G = 64 * 1024
SIZE = 16 << 20
NBLK = SIZE // BS
Q = SIZE // 4


def tag(block: int, version: int) -> bytes:
    return struct.pack("<QQ", block + 1, version) * (BS // 16)


def version_of(data: bytes, block: int) -> int | None:
    """The version a block's bytes name: 0 for zeros, None for garbage."""
    if data == bytes(BS):
        return 0
    b, v = struct.unpack("<QQ", data[:16])
    if b != block + 1 or data != tag(block, v):
        return None
    return v


class World:
    """The writers' log.  ``clock`` ticks at every send and reply; per
    version: blocks, zero?, sent-at, acked-at (None: pending), ok."""

    def __init__(self) -> None:
        self.clock = 0
        self.next_version = 1
        self.sent: dict[int, tuple[range, bool, int]] = {}
        self.acked: dict[int, tuple[int, bool]] = {}
        self.history: list[list[int]] = [[0] for _ in range(NBLK)]  # per block, versions in send order
        self.zero_versions: set[int] = {0}

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def candidates(self, block: int, t_call: int, t_ret: int) -> set[int]:
        """Versions block ``block`` may hold at a point in time taken between
        ``t_call`` and ``t_ret`` (module docstring)."""
        out: set[int] = set()
        last = 0
        for v in self.history[block]:
            if v == 0:
                continue
            _, _, sent_at = self.sent[v]
            a = self.acked.get(v)
            if a is not None and a[1] and a[0] < t_call:
                last = v
        out.add(last)
        for v in self.history[block]:
            if v <= last:
                continue
            _, _, sent_at = self.sent[v]
            a = self.acked.get(v)
            if sent_at < t_ret and (a is None or a[1]):
                out.add(v)
        return out


async def _writer(k: int, path: str, world: World, rng: random.Random, go: asyncio.Event,
                  idle: asyncio.Event, stop: list) -> None:
    c = await Raw.connect(path, "disk", True)
    first, end = k * Q // BS, (k + 1) * Q // BS
    cookie = 0
    try:
        while not stop[0]:
            if not go.is_set():
                idle.set()
                await go.wait()
                continue
            idle.clear()
            used: set[int] = set()
            batch = bytearray()
            vers: dict[int, int] = {}
            for _ in range(rng.randint(1, 8)):
                n = rng.choice([1, 1, 2, 3, 16, 17])
                b0 = rng.randrange(first, end - n)
                if used & set(range(b0, b0 + n)):
                    continue
                used |= set(range(b0, b0 + n))
                zero = rng.random() < 0.15
                v = world.next_version
                world.next_version += 1
                cookie += 1
                vers[cookie] = v
                world.sent[v] = (range(b0, b0 + n), zero, world.tick())
                for b in range(b0, b0 + n):
                    world.history[b].append(v)
                if zero:
                    world.zero_versions.add(v)
                    batch += req(WRITE_ZEROES, cookie, b0 * BS, n * BS)
                else:
                    batch += req(WRITE, cookie, b0 * BS, n * BS, b"".join(tag(b, v) for b in range(b0, b0 + n)))
            c.send(bytes(batch))
            got = await asyncio.wait_for(c.replies(len(vers)), 60)
            for ck, (err, _) in got.items():
                world.acked[vers[ck]] = (world.tick(), err == 0)
            await asyncio.sleep(rng.random() * 0.004)
    finally:
        idle.set()
        await c.close()


class Job:
    """One round's backup: ``kind`` (the sync mode, or "full+clear": a full
    backup and ``block-dirty-bitmap-clear b0`` in one transaction), ``sync``
    (the mode the job runs), ``mode`` (hunt 7's bitmap-mode, None without a
    bitmap), ``cs`` (cluster size, known after start), ``r0`` (the snapshot
    read whole at once; None when that read failed), call/return clock
    ticks, ``dismissed``, ``sync_set`` (clusters of pump_todo | in_target
    right after start), ``trim`` (hunt 7: the readers TRIM ranges they have
    read and checked), ``trim_sent`` / ``trim_done`` (clusters a reader sent
    a TRIM for / whose TRIM replied OK)."""

    def __init__(self, jid: str, kind: str, snap: str, target: str, mode: str | None = None,
                 trim: bool = False) -> None:
        self.id, self.kind, self.mode, self.snap, self.target = jid, kind, mode, snap, target
        self.sync = "full" if kind == "full+clear" else kind
        self.trim = trim
        self.cs = G
        self.r0: bytes | None = None
        self.t_call = self.t_ret = 0
        self.dismissed = False
        self.sync_set: set[int] = set()
        self.trim_sent: set[int] = set()
        self.trim_done: set[int] = set()


def _clusters(cs: int, off: int, ln: int) -> set[int]:
    return set(range(off // cs, (off + ln - 1) // cs + 1))


def _whole_clusters(cs: int, off: int, ln: int) -> set[int]:
    first = (off + cs - 1) // cs
    end = SIZE // cs if off + ln >= SIZE else (off + ln) // cs
    return set(range(first, end))


async def _reader(path: str, job: Job, rng: random.Random, engine: Engine, stop: list, stats: dict) -> None:
    try:
        c = await Raw.connect(path, job.snap, True)
    except (OSError, asyncio.IncompleteReadError, AssertionError):
        assert job.dismissed or job.id not in engine.jobs or engine.jobs[job.id].state.broken is not None
        return
    cookie = 0
    cs = job.cs
    try:
        while not stop[0]:
            reqs = {}
            batch = bytearray()
            for _ in range(4):
                cookie += 1
                off = rng.randrange(0, NBLK) * BS
                ln = min(rng.choice([BS, 3 * BS, G, 5 * G + BS]), SIZE - off)
                reqs[cookie] = (off, ln, bool(_clusters(cs, off, ln) & job.trim_done))
                batch += c.read(cookie, off, ln)
            was_alive = not job.dismissed and engine.jobs.get(job.id) is not None \
                and engine.jobs[job.id].state.broken is None
            try:
                c.send(bytes(batch))
                got = await asyncio.wait_for(c.replies(4), 60)
            except (OSError, asyncio.IncompleteReadError, ConnectionError):
                assert job.dismissed, "snapshot connection lost before dismiss"
                return
            good = []
            for ck, (err, data) in got.items():
                off, ln, must_fail = reqs[ck]
                if err:
                    broken = job.id in engine.jobs and engine.jobs[job.id].state.broken is not None
                    trimmed = bool(_clusters(cs, off, ln) & job.trim_sent)
                    assert job.dismissed or broken or not was_alive or trimmed, (err, off, ln)
                    stats["errors"] += 1
                    continue
                assert not must_fail, f"{job.id}: a read of TRIMmed clusters at {off}+{ln} succeeded"
                assert data == job.r0[off:off + ln], f"snapshot of {job.id} changed at {off}+{ln}"
                stats["reads"] += 1
                good.append((off, ln))
            if job.trim and good and rng.random() < 0.3:
                off, ln = rng.choice(good)
                whole = _whole_clusters(cs, off, ln)
                job.trim_sent |= whole
                cookie += 1
                c.send(req(TRIM, cookie, off, ln))
                try:
                    got = await asyncio.wait_for(c.replies(1), 60)
                except (OSError, asyncio.IncompleteReadError, ConnectionError):
                    assert job.dismissed, "snapshot connection lost before dismiss"
                    return
                err = got[cookie][0]
                if err:
                    broken = job.id in engine.jobs and engine.jobs[job.id].state.broken is not None
                    assert job.dismissed or broken or not was_alive, ("trim", err, off, ln)
                else:
                    job.trim_done |= whole
                    stats["trims"] += 1
    finally:
        try:
            await c.close()
        except Exception:
            pass


def _check_r0(world: World, job: Job) -> None:
    r0 = job.r0
    for b in range(NBLK):
        v = version_of(r0[b * BS:(b + 1) * BS], b)
        cands = world.candidates(b, job.t_call, job.t_ret)
        if v == 0:
            ok = bool(cands & world.zero_versions)
        else:
            ok = v in cands and v not in world.zero_versions
        assert ok, f"job {job.id} ({job.kind}): block {b} reads version {v}, allowed {sorted(cands)}"


def _granule_diff(a: bytes, b: bytes) -> set[int]:
    return {g for g in range(SIZE // G) if a[g * G:(g + 1) * G] != b[g * G:(g + 1) * G]}


class Racing:
    """The racing world hunts 3 and 7 share (module docstring), one per test.

    ``rng`` (the scenario's generator: it first picks the initial data, then
    the test's rounds), ``disk`` (the export's file), ``world`` (the writers'
    log); after `start`: ``manager``, ``server``, ``path`` (its socket),
    ``engine``, three ``writers`` and ``base`` -- the backup chain's image
    that ``b0`` is checked against (`check_inv3`): the initial image (b0 was
    empty then), updated by the test after each round, None once unknown."""

    def __init__(self, tmp, seed: int) -> None:
        self.tmp, self.seed = tmp, seed
        self.rng = random.Random(seed)
        self.disk = str(tmp / "disk.raw")
        self.world = world = World()
        # Initial content: tagged data in some blocks, holes elsewhere.
        with open(self.disk, "wb") as f:
            f.truncate(SIZE)
            v = world.next_version
            for b in sorted(self.rng.sample(range(NBLK), NBLK // 5)):
                world.next_version += 1
                world.sent[v] = (range(b, b + 1), False, 0)
                world.acked[v] = (0, True)
                world.history[b].append(v)
                f.seek(b * BS)
                f.write(tag(b, v))
                v = world.next_version
        self.base: bytes | None = None

    async def start(self) -> None:
        tmp = self.tmp
        self.manager = BitmapManager(str(tmp / "state"))
        live = self.manager.wrap("disk", FileDev(self.disk))
        self.server = Server(workers=2)
        self.server.add_export("disk", live)
        self.path = str(tmp / "s")
        await self.server.start_unix(self.path)
        self.engine = Engine(self.server, lambda *a: None, bitmaps=RegistryBitmapSource(self.manager.lookup),
                             scratch_dir=str(tmp / "state"))
        self.manager.engine = self.engine
        await self.manager.add("disk", "b0", persistent=True)
        with open(self.disk, "rb") as f:
            self.base = f.read()
        self.go, self.stop = asyncio.Event(), [False]
        self.go.set()
        self.idles = [asyncio.Event() for _ in range(3)]
        self.writers = [asyncio.ensure_future(_writer(k, self.path, self.world, random.Random(self.seed * 100 + k),
                                                      self.go, self.idles[k], self.stop)) for k in range(3)]

    async def quiet(self) -> bytes:
        """Pause the writers; the disk's content (`resume` lets them go on)."""
        self.go.clear()
        for e in self.idles:
            await asyncio.wait_for(e.wait(), 60)
        with open(self.disk, "rb") as f:
            return f.read()

    def resume(self) -> None:
        self.go.set()

    def check_inv3(self, now: bytes, stats: dict, why=lambda missing, now: "") -> None:
        """Invariant 3: every granule where ``now`` differs from ``base`` is
        dirty in b0, registry and file (nothing to check while ``base`` is
        unknown).  ``why(missing granules, now)`` adds to the failure message."""
        if self.base is None:
            return
        bm = self.manager.lookup("disk").get("b0")
        have = set()
        for off, ln in bm.dirty_ranges():
            have |= set(range(off // G, (off + ln - 1) // G + 1))
        want = _granule_diff(self.base, now)
        assert want <= have, f"b0 misses granules {sorted(want - have)[:10]}; {why(want - have, now)}"
        assert want <= file_granules(bm.store_path)
        stats["inv3"] += 1

    async def backup_start(self, job: Job, target, kw: dict) -> object:
        """Start ``job`` (a transaction with the bitmap clear for "full+clear"),
        with its call/return ticks; its sync set and cluster size; the job."""
        job.t_call = self.world.tick()
        if job.kind == "full+clear":
            await self.manager.transaction([
                {"type": "backup-start", "data": {"export": "disk", "job-id": job.id, "sync": "full",
                                                  "target": target, **{k.replace("_", "-"): v
                                                                       for k, v in kw.items()}}},
                {"type": "block-dirty-bitmap-clear", "data": {"export": "disk", "name": "b0"}}])
        else:
            await self.engine.backup_start("disk", job.id, job.sync, target, **kw)
        job.t_ret = self.world.tick()
        j = self.engine.jobs[job.id]
        job.cs = j.state.cluster_size
        for c in range(j.state.nclusters):
            if j.state.pump_todo.get(c) or j.state.in_target.get(c):
                job.sync_set.add(c)
        return j

    def add_target_faults(self, j) -> None:
        """A FaultDev target fails writes on 1-3 clusters still to copy."""
        cs = j.state.cluster_size
        todo = [c for c in range(j.state.nclusters) if j.state.pump_todo.get(c)]
        for c in self.rng.sample(todo, min(len(todo), self.rng.randint(1, 3))):
            j.target.faults.append(Fault("write", c * cs, cs))

    async def read_r0(self, job: Job, j) -> None:
        """R0: the whole snapshot read at once into ``job.r0`` and checked
        against the writers' log; None when a read failed, which only a
        broken snapshot may do."""
        c = await Raw.connect(self.path, job.snap, True)
        step = 1 << 20
        for i in range(SIZE // step):
            c.send(c.read(i + 1, i * step, step))
        got = await asyncio.wait_for(c.replies(SIZE // step), 60)
        await c.close()
        if any(err for err, _ in got.values()):
            assert j.state.broken is not None, "R0 read failed on a healthy snapshot"
            job.r0 = None
        else:
            job.r0 = b"".join(got[i + 1][1] for i in range(SIZE // step))
            _check_r0(self.world, job)

    def readers(self, job: Job, rnd: int, stats: dict) -> tuple[list, list]:
        """Two snapshot readers (none without R0) and their stop flag."""
        rstop = [False]
        if job.r0 is None:
            return [], rstop
        return [asyncio.ensure_future(_reader(self.path, job, random.Random(self.seed * 1000 + rnd * 10 + i),
                                              self.engine, rstop, stats)) for i in range(2)], rstop

    def target_bytes(self, j, job: Job) -> bytes:
        if isinstance(j.target, FaultDev):
            tb = bytearray(SIZE)
            j.target.inner.read_sync(memoryview(tb), 0)
            return bytes(tb)
        with open(job.target, "rb") as f:
            return f.read()

    async def end_round(self, job: Job, readers: list, rstop: list, stats: dict, last: bool, why) -> None:
        """The round's end: maybe dismiss the job while its readers read,
        stop them, and at random (always after the last round) check
        invariant 3 at a quiet point."""
        if self.rng.random() < 0.5:
            await _end(self.engine, job, self.rng, stats)
        rstop[0] = True
        await asyncio.gather(*readers)
        if self.rng.random() < 0.5 or last:
            self.check_inv3(await self.quiet(), stats, why)
            self.resume()

    async def finish(self, prev: Job | None, stats: dict, why) -> None:
        """End the last job, stop the writers, check invariant 3 once more, shut down."""
        if prev is not None and not prev.dismissed:
            await _end(self.engine, prev, self.rng, stats)
        self.stop[0] = True
        self.go.set()
        await asyncio.gather(*self.writers)
        with open(self.disk, "rb") as f:
            self.check_inv3(f.read(), stats, why)
        await self.engine.shutdown()
        await self.server.shutdown()


def test_backups_racing_writes_reads_cancels_and_dismissals(short_tmp):
    seed = int(os.environ.get("NBDBACKUP_HUNT_SEED", "7"))
    rounds = int(os.environ.get("NBDBACKUP_HUNT_ROUNDS", "0")) or scaled.rounds(8)
    rig = Racing(short_tmp, seed)
    rng = rig.rng
    stats = {"reads": 0, "errors": 0, "trims": 0, "ok": 0, "failed": 0, "cancelled": 0, "inv3": 0,
             "skipped": 0}

    async def main():
        await rig.start()
        trace: list = []  # per round, for failure messages
        incs: dict = {}  # job id -> (job, R0, the chain image before it): incrementals, for diagnosis

        def why(missing: set[int], now: bytes) -> str:
            diag = []
            for g in sorted(missing)[:5]:
                d = {"g": g}
                for name, (jj, r0, before) in incs.items():
                    sl = slice(g * G, (g + 1) * G)
                    d[name] = (g in jj.dirty_at_start, jj.state.ignored.get(g), jj.state.in_target.get(g),
                               jj.state.in_scratch.get(g), jj.state.done.get(g),
                               None if r0 is None else r0[sl] == before[sl], now[sl] == (r0 or b"")[sl])
                diag.append(d)
            return f"rounds: {trace}; {diag}"

        prev: Job | None = None
        for rnd in range(rounds):
            kind = rng.choice(["none", "full", "incremental", "incremental", "full+clear"])
            job = Job(f"j{rnd}", kind, f"snap{rnd}", str(short_tmp / f"t{rnd}.raw"))
            kw: dict = {"speed": rng.choice([0, 2 << 20, 8 << 20]), "snapshot": job.snap}
            if kind == "incremental" and rng.random() < 0.5:
                kw["scratch_limit"] = rng.choice([G, 4 * G])
                kw["on_cbw_error"] = rng.choice(["break-guest-write", "break-snapshot"])
            if kind == "none":
                kw.pop("speed")
            await asyncio.sleep(rng.random() * 0.05)
            if prev is not None and not prev.dismissed and rng.random() < 0.5:
                # The previous job's end and dismissal race this start.
                await _end(rig.engine, prev, rng, stats)
            target = job.target if kind != "none" else "scratch:"
            if kind == "incremental":
                kw["bitmap"] = "b0"
                if rng.random() < 0.4:
                    # A target whose writes fail on some clusters: the pump's
                    # chunks there fail, ``ignore`` skips them, ``report``
                    # fails the job.
                    # (A memory disk: between two files the copy offload
                    # would bypass the filter.)
                    target = FaultDev(MemoryDev(SIZE), owns_inner=True)
                    kw["on_target_error"] = rng.choice(["ignore", "ignore", "report"])
            j = await rig.backup_start(job, target, kw)
            if isinstance(j.target, FaultDev):  # faults on clusters still to copy
                rig.add_target_faults(j)
            await rig.read_r0(job, j)
            if job.r0 is None and kind == "full+clear":
                rig.base = None  # the reset image is unknown
            readers, rstop = rig.readers(job, rnd, stats)
            outcome = await _run_job(rig.engine, job, rng, stats)
            if outcome == "ok" and job.r0 is not None:
                t = rig.target_bytes(j, job)
                if job.sync == "full":
                    assert t == job.r0, f"target of {job.id} is not the snapshot"
                elif kind == "incremental":
                    cs = j.state.cluster_size
                    for cl in job.sync_set:
                        if j.state.ignored.get(cl) and not j.state.in_target.get(cl):
                            continue  # skipped by the ignore policy
                        assert t[cl * cs:(cl + 1) * cs] == job.r0[cl * cs:(cl + 1) * cs], (job.id, cl)
            if kind == "full+clear" and job.r0 is not None:
                rig.base = job.r0
            if kind == "incremental" and rig.base is not None:
                j.dirty_at_start = job.sync_set
                incs[job.id] = (j, job.r0, rig.base)
            if kind == "incremental" and outcome == "ok":
                # The backup chain's image: the old one with the clusters
                # this job copied (its sync set, but those the ignore policy
                # skipped) as in R0.
                st_ = j.state
                if rig.base is not None and job.r0 is not None:
                    img = bytearray(rig.base)
                    cs = st_.cluster_size
                    for cl in job.sync_set:
                        if st_.ignored.get(cl) and not st_.in_target.get(cl):
                            stats["skipped"] += 1
                            continue
                        img[cl * cs:(cl + 1) * cs] = job.r0[cl * cs:(cl + 1) * cs]
                    rig.base = bytes(img)
                else:
                    # R0 unknown: the snapshot broke (copy-before-write
                    # failed) after the job had already completed.
                    rig.base = None
            trace.append((job.id, kind, outcome, j.error, kw.get("on_target_error"), kw.get("scratch_limit"),
                          j.state.ignored.count(), j.state.bytes_ignored))
            await rig.end_round(job, readers, rstop, stats, rnd == rounds - 1, why)
            prev = job
        await rig.finish(prev, stats, why)

    run(main(), timeout=180)
    print("hunt3 stats", seed, stats)
    assert stats["reads"] > 0 and stats["inv3"] > 0, stats


async def _run_job(engine: Engine, job: Job, rng: random.Random, stats: dict) -> str:
    """Let the job run a while; cancel it (always for sync none) or wait for it."""
    j = engine.jobs[job.id]
    await asyncio.sleep(rng.random() * 0.3)
    if job.sync == "none" or rng.random() < 0.4:
        try:
            j.cancel()
        except Exception:
            pass
    await asyncio.wait_for(j.wait(), 60)
    if j.error is None and job.sync != "none":
        stats["ok"] += 1
        return "ok"
    stats["cancelled" if j._cancel_requested else "failed"] += 1
    return "ended"


async def _end(engine: Engine, job: Job, rng: random.Random, stats: dict) -> None:
    j = engine.jobs.get(job.id)
    if j is None or job.dismissed:
        return
    if j.status.value not in ("concluded", "null"):
        try:
            j.cancel()
        except Exception:
            pass
        await asyncio.wait_for(j.wait(), 60)
    job.dismissed = True
    if j.status.value == "concluded":
        await engine.job_dismiss(job.id)


def test_a_cancelled_pump_copy_in_a_thread_cannot_overwrite_the_snapshot(short_tmp, monkeypatch):
    """Finding (docs/hunt3.md): the pump copies a large chunk between plain
    files with ``copy_file_range`` in a worker thread.  A job cancelled
    mid-copy released the chunk's claim at once -- while the thread kept
    copying the LIVE source into the target.  A live write then
    copied-before-write a cluster of that chunk into the target (done,
    in_target) and changed the source; the late thread copied the new bytes
    over the saved ones: the snapshot (valid until dismiss) read data
    written after the start (invariant 1).  The thread is held here until
    the live write returned."""
    import threading

    from nbdbackup.backup import copystate
    from nbdbackup.backup.engine import MemoryExportTable
    from nbdbackup.blockdev.live import LiveDev

    cs, size = 64 * 1024, 8 << 20
    orig = random.Random(5).randbytes(size)
    src = short_tmp / "src.raw"
    src.write_bytes(orig)
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()
    real = copystate._copy_range

    def held(sfd, dfd, offset, length):
        if length > copystate.INLINE_COPY and not release.is_set():
            entered.set()
            release.wait(10)
            try:
                return real(sfd, dfd, offset, length)
            finally:
                finished.set()
        return real(sfd, dfd, offset, length)

    monkeypatch.setattr(copystate, "_copy_range", held)

    async def main():
        live = LiveDev(FileDev(str(src)))
        table = MemoryExportTable()
        table.add("disk", live, read_only=False)
        engine = Engine(table)
        await engine.backup_start("disk", "j", "full", str(short_tmp / "t.raw"), snapshot="snap",
                                  cluster_size=cs, max_chunk=4 << 20, max_workers=1)
        job = engine.jobs["j"]
        while not entered.is_set():
            await asyncio.sleep(0.01)
        job.cancel()
        await asyncio.sleep(0.05)  # the cancellation reaches the pump's copy
        # A cluster of the chunk: copy-before-write, then the live write.
        w = asyncio.ensure_future(live.pwrite(b"B" * 4096, cs))
        await asyncio.sleep(0.2)
        release.set()
        await asyncio.wait_for(w, 10)
        await asyncio.wait_for(job.wait(), 10)
        assert job.status.value == "concluded"
        while not finished.is_set():
            await asyncio.sleep(0.01)
        buf = bytearray(cs)
        await job.snapshot.pread(memoryview(buf), cs)
        assert bytes(buf) == orig[cs:2 * cs], "the snapshot reads a write made after the backup start"
        await engine.job_dismiss("j")
        await live.close()

    run(main(), timeout=30)
