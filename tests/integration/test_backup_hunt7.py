"""Bug hunt 7 (docs/hunt7.md): hunt 3's racing scenario with the backup
options it did not vary, against invariants 1 and 3.

Same world as `test_backup_hunt3` (one in-process server with 2 worker
processes, a 16 MiB sparse file export ``disk`` with the persistent bitmap
``b0``, three writer connections streaming tagged WRITEs / WRITE_ZEROES,
two snapshot readers pipelining reads), with per round, at random:

- ``sync``: none, full, top, incremental, bitmap, or a transaction of a full
  backup + ``block-dirty-bitmap-clear b0``; full and top sometimes with
  ``bitmap=b0`` and bitmap-mode on-success / always, sync=bitmap with
  on-success / always / never;
- ``discard-source`` (rule 9), ``snapshot-trim`` (rule 8: the readers TRIM
  ranges they have read and checked), ``cluster-size`` (16 KiB - 256 KiB,
  around the bitmap's 64 KiB granularity), ``max-chunk``, ``max-workers``,
  speed; for incremental/bitmap sometimes a small ``scratch-limit`` or a
  target failing on some clusters with ``ignore`` / ``report``.

Checks:

- invariant 1: R0 (the snapshot read whole at once) is the disk at the
  start (hunt 3's version check); every later read returns R0's bytes, or
  fails -- once the job was dismissed or the snapshot broke, or because it
  touches a cluster a TRIM was sent for (a read of a cluster whose TRIM
  completed before the read was sent MUST fail: no stale or made-up data);
  a completed full/top target is R0, an incremental/bitmap target is R0 on
  its sync set (but clusters ``ignore`` skipped);
- invariant 3: at quiet points, every granule where the disk differs from
  the backup chain's image is dirty in ``b0`` (registry and file).  The
  chain image follows the bitmap-mode table: after a success with
  on-success/always the sync set's clusters (all of them for full/top)
  take R0's content (but skipped ones); after a failed ``always`` job the
  clusters in the target do; ``never`` and failed ``on-success`` change
  nothing; a full + clear transaction makes R0 the image.

Hunting knobs (not for CI): ``NBDBACKUP_HUNT_SEED``, ``NBDBACKUP_HUNT_ROUNDS``.
"""

from __future__ import annotations

import asyncio
import os
import random

from test_backup_hunt3 import BS, G, NBLK, SIZE, World, _check_r0, _end, _granule_diff, _run_job, _writer, tag
from test_server_batch import TRIM, Raw, req, run
from test_server_workers_bitmaps import file_granules

from nbdbackup.backup.bitmaps import RegistryBitmapSource
from nbdbackup.backup.engine import Engine
from nbdbackup.backup.testing import Fault, FaultDev
from nbdbackup.bitmap.manager import BitmapManager
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.memory import MemoryDev
from nbdbackup.nbd.server import Server


class Job:
    """One round's backup: ``kind`` (sync, or "full+clear"), ``mode`` (the
    bitmap-mode, None without a bitmap), ``cs`` (cluster size, known after
    start), ``r0``, call/return clock ticks, ``dismissed``, ``sync_set``
    (clusters of pump_todo | in_target right after start), ``trim_sent`` /
    ``trim_done`` (clusters a reader sent a TRIM for / whose TRIM replied
    OK)."""

    def __init__(self, jid: str, kind: str, mode: str | None, snap: str, target: str, trim: bool) -> None:
        self.id, self.kind, self.mode, self.snap, self.target = jid, kind, mode, snap, target
        self.sync = kind  # for hunt 3's messages
        self.trim = trim
        self.cs = 0
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


def _pick(rng: random.Random) -> tuple[str, str | None]:
    return rng.choice([
        ("none", None), ("full", None), ("full", "on-success"), ("full", "always"),
        ("top", None), ("top", "on-success"), ("top", "always"),
        ("incremental", "on-success"), ("incremental", "on-success"),
        ("bitmap", "on-success"), ("bitmap", "always"), ("bitmap", "always"), ("bitmap", "never"),
        ("full+clear", None),
    ])


def test_backup_options_racing_writes_reads_trims_and_dismissals(short_tmp):
    seed = int(os.environ.get("NBDBACKUP_HUNT_SEED", "7"))
    rounds = int(os.environ.get("NBDBACKUP_HUNT_ROUNDS", "8"))
    rng = random.Random(seed)
    disk = str(short_tmp / "disk.raw")
    world = World()
    with open(disk, "wb") as f:
        f.truncate(SIZE)
        v = world.next_version
        for b in sorted(rng.sample(range(NBLK), NBLK // 5)):
            world.next_version += 1
            world.sent[v] = (range(b, b + 1), False, 0)
            world.acked[v] = (0, True)
            world.history[b].append(v)
            f.seek(b * BS)
            f.write(tag(b, v))
            v = world.next_version
    stats = {"reads": 0, "errors": 0, "trims": 0, "ok": 0, "failed": 0, "cancelled": 0, "inv3": 0,
             "skipped": 0, "base_lost": 0, "kinds": {}}

    async def main():
        manager = BitmapManager(str(short_tmp / "state"))
        live = manager.wrap("disk", FileDev(disk))
        server = Server(workers=2)
        server.add_export("disk", live)
        path = str(short_tmp / "s")
        await server.start_unix(path)
        engine = Engine(server, lambda *a: None, bitmaps=RegistryBitmapSource(manager.lookup),
                        scratch_dir=str(short_tmp / "state"))
        manager.engine = engine
        await manager.add("disk", "b0", persistent=True)
        with open(disk, "rb") as f:
            base: bytes | None = f.read()
        go, stop = asyncio.Event(), [False]
        go.set()
        idles = [asyncio.Event() for _ in range(3)]
        writers = [asyncio.ensure_future(_writer(k, path, world, random.Random(seed * 100 + k), go,
                                                 idles[k], stop)) for k in range(3)]

        async def quiet() -> bytes:
            go.clear()
            for e in idles:
                await asyncio.wait_for(e.wait(), 60)
            with open(disk, "rb") as f:
                return f.read()

        def check_inv3(now: bytes) -> None:
            if base is None:
                return
            bm = manager.lookup("disk").get("b0")
            have = set()
            for off, ln in bm.dirty_ranges():
                have |= set(range(off // G, (off + ln - 1) // G + 1))
            want = _granule_diff(base, now)
            assert want <= have, f"b0 misses granules {sorted(want - have)[:10]}; rounds: {trace}"
            assert want <= file_granules(bm.store_path)
            stats["inv3"] += 1

        prev: Job | None = None
        trace: list = []
        for rnd in range(rounds):
            kind, mode = _pick(rng)
            sync = "full" if kind == "full+clear" else kind
            jid = f"j{rnd}"
            job = Job(jid, kind, mode, f"snap{rnd}", str(short_tmp / f"t{rnd}.raw"),
                      trim=rng.random() < 0.5)
            stats["kinds"][f"{kind}/{mode}"] = stats["kinds"].get(f"{kind}/{mode}", 0) + 1
            kw: dict = {"snapshot": job.snap, "snapshot_trim": job.trim}
            if sync != "none":
                kw["speed"] = rng.choice([0, 2 << 20, 8 << 20])
                kw["max_workers"] = rng.choice([1, 2, 4, 8])
                kw["max_chunk"] = rng.choice([4096, 64 << 10, 1 << 20, 4 << 20])
            if rng.random() < 0.6:
                kw["cluster_size"] = rng.choice([16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10])
            if sync not in ("none", "full") and rng.random() < 0.5:
                kw["discard_source"] = True
            if mode is not None:
                kw["bitmap"] = "b0"
                if sync != "incremental":
                    kw["bitmap_mode"] = mode
            if sync in ("incremental", "bitmap", "top") and rng.random() < 0.3:
                kw["scratch_limit"] = rng.choice([G, 4 * G])
                kw["on_cbw_error"] = rng.choice(["break-guest-write", "break-snapshot"])
            await asyncio.sleep(rng.random() * 0.05)
            if prev is not None and not prev.dismissed and rng.random() < 0.5:
                await _end(engine, prev, rng, stats)
            job.t_call = world.tick()
            target = job.target if sync != "none" else "scratch:"
            if sync in ("incremental", "bitmap") and rng.random() < 0.4:
                target = FaultDev(MemoryDev(SIZE), owns_inner=True)
                kw["on_target_error"] = rng.choice(["ignore", "ignore", "report"])
            if kind == "full+clear":
                await manager.transaction([
                    {"type": "backup-start", "data": {"export": "disk", "job-id": jid, "sync": "full",
                                                      "target": target, **{k.replace("_", "-"): v
                                                                           for k, v in kw.items()}}},
                    {"type": "block-dirty-bitmap-clear", "data": {"export": "disk", "name": "b0"}}])
            else:
                await engine.backup_start("disk", jid, sync, target, **kw)
            job.t_ret = world.tick()
            j = engine.jobs[jid]
            job.cs = cs = j.state.cluster_size
            if isinstance(j.target, FaultDev):
                todo = [c for c in range(j.state.nclusters) if j.state.pump_todo.get(c)]
                for c in rng.sample(todo, min(len(todo), rng.randint(1, 3))):
                    j.target.faults.append(Fault("write", c * cs, cs))
            for c in range(j.state.nclusters):
                if j.state.pump_todo.get(c) or j.state.in_target.get(c):
                    job.sync_set.add(c)
            c = await Raw.connect(path, job.snap, True)
            step = 1 << 20
            for i in range(SIZE // step):
                c.send(c.read(i + 1, i * step, step))
            got = await asyncio.wait_for(c.replies(SIZE // step), 60)
            await c.close()
            if any(err for err, _ in got.values()):
                assert j.state.broken is not None, "R0 read failed on a healthy snapshot"
                job.r0 = None
                if kind == "full+clear":
                    base = None
                    stats["base_lost"] += 1
            else:
                job.r0 = b"".join(got[i + 1][1] for i in range(SIZE // step))
                _check_r0(world, job)
            readers = []
            rstop = [False]
            if job.r0 is not None:
                readers = [asyncio.ensure_future(_reader(path, job, random.Random(seed * 1000 + rnd * 10 + i),
                                                         engine, rstop, stats)) for i in range(2)]
            outcome = await _run_job(engine, job, rng, stats)
            st = j.state
            if outcome != "ok" and not j._cancel_requested and kind != "none":
                # Nothing but an injected fault or the scratch limit may fail a job.
                assert isinstance(j.target, FaultDev) or "scratch_limit" in kw, (jid, kind, mode, j.error)
            skipped = {cl for cl in job.sync_set if st.ignored.get(cl) and not st.in_target.get(cl)}
            if outcome == "ok" and job.r0 is not None:
                if isinstance(j.target, FaultDev):
                    tb = bytearray(SIZE)
                    j.target.inner.read_sync(memoryview(tb), 0)
                    t = bytes(tb)
                else:
                    with open(job.target, "rb") as f:
                        t = f.read()
                if sync in ("full", "top"):
                    # top: a fresh target reads zeros where the source had no data.
                    assert t == job.r0, f"target of {jid} ({sync}) is not the snapshot"
                else:
                    for cl in job.sync_set - skipped:
                        assert t[cl * cs:(cl + 1) * cs] == job.r0[cl * cs:(cl + 1) * cs], (jid, cl)
            # The backup chain's image (module docstring).
            covered: set[int] | None = None
            if kind == "full+clear":
                if job.r0 is not None:
                    base = job.r0
            elif mode in ("on-success", "always") and outcome == "ok":
                covered = (set(range(st.nclusters)) if sync in ("full", "top") else job.sync_set) - skipped
                stats["skipped"] += len(skipped)
            elif mode == "always" and outcome != "ok":
                covered = {cl for cl in range(st.nclusters) if st.in_target.get(cl)}
            if covered and base is not None:
                if job.r0 is None:
                    base = None  # R0 unknown: the snapshot broke
                    stats["base_lost"] += 1
                else:
                    img = bytearray(base)
                    for cl in covered:
                        img[cl * cs:(cl + 1) * cs] = job.r0[cl * cs:(cl + 1) * cs]
                    base = bytes(img)
            trace.append((jid, kind, mode, outcome, j.error, {k: v for k, v in kw.items() if k != "snapshot"},
                          len(skipped), len(job.trim_done)))
            if rng.random() < 0.5:
                await _end(engine, job, rng, stats)
            rstop[0] = True
            await asyncio.gather(*readers)
            if rng.random() < 0.5 or rnd == rounds - 1:
                now = await quiet()
                check_inv3(now)
                go.set()
            prev = job
        if prev is not None and not prev.dismissed:
            await _end(engine, prev, rng, stats)
        stop[0] = True
        go.set()
        await asyncio.gather(*writers)
        with open(disk, "rb") as f:
            check_inv3(f.read())
        await engine.shutdown()
        await server.shutdown()

    run(main(), timeout=180)
    print("hunt7 stats", seed, stats)
    # No invariant-3 check at all only when the chain image was lost (a snapshot broken before R0 was read).
    assert stats["reads"] > 0 and (stats["inv3"] > 0 or stats["base_lost"]), stats


async def _top_start_held(tmp, monkeypatch, cs: int, clusters: dict, **kw):
    """A 1 MiB file export ``tmp/src.raw`` holding ``clusters`` (index -> fill byte), and a
    ``sync=top`` backup into ``tmp/t.raw`` started with its allocation walk held: returns
    (the LiveDev, the Engine, the start's task, the Event that releases the walk), once the
    walk has begun -- finding 1's window, between the point in time and the walk."""
    from nbdbackup.backup.engine import MemoryExportTable
    from nbdbackup.blockdev.live import LiveDev

    src = tmp / "src.raw"
    with open(src, "wb") as f:
        f.truncate(1 << 20)
        for c, fill in clusters.items():
            f.seek(c * cs)
            f.write(fill * cs)
    live = LiveDev(FileDev(str(src)))
    table = MemoryExportTable()
    table.add("disk", live, read_only=False)
    engine = Engine(table)
    entered, release = asyncio.Event(), asyncio.Event()
    real = live.extents

    async def held(offset, length, context="base:allocation"):
        entered.set()
        await release.wait()
        return await real(offset, length, context)

    monkeypatch.setattr(live, "extents", held)
    start = asyncio.ensure_future(engine.backup_start("disk", "j", "top", str(tmp / "t.raw"),
                                                      cluster_size=cs, snapshot="snap", **kw))
    await asyncio.wait_for(entered.wait(), 10)
    return live, engine, start, release


def test_top_copies_a_cluster_the_guest_deallocated_before_the_top_layer_was_read(short_tmp, monkeypatch):
    """Finding 1 (docs/hunt7.md): sync=top learns the source's allocation
    (``Engine._todo``: an extents walk) AFTER the point in time, while live
    writes already run.  A live WRITE_ZEROES that punched an allocated cluster
    in between was copied-before-write into the scratch (the sync set was not
    known yet), then the walk saw a hole there: the cluster left the sync set
    and its point-in-time data never reached the target (the snapshot export
    still read it from the scratch).  The walk is held here until the punch
    returned."""
    cs = 64 * 1024
    src = short_tmp / "src.raw"

    async def main():
        live, engine, start, release = await _top_start_held(short_tmp, monkeypatch, cs, {0: b"A", 2: b"C"})
        await live.zero(0, cs, may_trim=True)  # the guest discards cluster 0 after the start
        fd = os.open(src, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) >= cs, "the punch did not punch"
        finally:
            os.close(fd)
        release.set()
        await asyncio.wait_for(start, 10)
        job = engine.jobs["j"]
        await asyncio.wait_for(job.wait(), 10)
        assert job.error is None, job.error
        buf = bytearray(cs)
        await job.snapshot.pread(memoryview(buf), 0)
        assert bytes(buf) == b"A" * cs
        with open(short_tmp / "t.raw", "rb") as f:
            t = f.read()
        assert t[2 * cs:3 * cs] == b"C" * cs
        assert t[:cs] == b"A" * cs, "the top target lost a cluster the guest deallocated after the start"
        await engine.job_dismiss("j")
        await live.close()

    run(main(), timeout=30)


def test_discard_source_moves_a_scratch_cluster_and_the_snapshot_reads_it_from_the_target(short_tmp, monkeypatch):
    """Rule 9 (``discard-source``) acts only on clusters the pump moves from
    the scratch to the target: for sync=top, those copied-before-write before
    the allocation walk (finding 1's window), which the racing scenario
    almost never hits.  Held open here: the snapshot must read the moved
    cluster from the target once its scratch copy is punched."""
    cs = 64 * 1024

    async def main():
        live, engine, start, release = await _top_start_held(short_tmp, monkeypatch, cs, {0: b"A"},
                                                             discard_source=True)
        await live.pwrite(b"B" * 4096, 0)  # copy-before-write of cluster 0 into the scratch
        release.set()
        await asyncio.wait_for(start, 10)
        job = engine.jobs["j"]
        await asyncio.wait_for(job.wait(), 10)
        assert job.error is None, job.error
        assert job.state.scratch_bytes_discarded >= cs  # moved, then discarded (rule 9)
        buf = bytearray(cs)
        await job.snapshot.pread(memoryview(buf), 0)
        assert bytes(buf) == b"A" * cs, "the snapshot lost a cluster discard-source moved to the target"
        with open(short_tmp / "t.raw", "rb") as f:
            assert f.read(cs) == b"A" * cs
        await engine.job_dismiss("j")
        await live.close()

    run(main(), timeout=30)
