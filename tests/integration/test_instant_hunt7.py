"""Bug hunt 7 (docs/hunt7.md): a backup started on a RESTORING export
(instant recovery), fuzzed -- hunt 4 checked one fixed set of guest writes
racing its copy-before-write (`test_instant_hunt4`).

Per seed, at random: a memory snapshot (some zero chunks, a short last
chunk) restored onto a file target (fresh, or an existing one holding other
bytes: the copy offload and SEEK_DATA paths must look through the
`RestoreDev`) or a memory one, progress map persistent or not; guest writes
before the backup starts; the `RestoreJob` started or not, at a random
speed, sometimes cancelled; a backup (sync full or none; file or memory
target; cluster size 1-4 chunks or half a chunk; random speed, max-chunk,
max-workers), sometimes cancelled; while it runs, a guest writer
(unaligned writes, WRITE_ZEROES with and without may_trim) and two
snapshot readers.  Checks: every snapshot read returns the disk as it was
at the backup's start (invariant 1); a completed full backup's target is
exactly that; the export reads the model (every acknowledged write applied)
at the end (invariant 2).

Hunting knobs (not for CI): ``NBDBACKUP_HUNT_SEED``, ``NBDBACKUP_HUNT_ROUNDS``.
The fresh-machine check runs the first quarter of the rounds (tests/scaled.py).
"""

from __future__ import annotations

import asyncio
import os
import random

import scaled
from test_server_batch import run

from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.backup.restorejob import RestoreJob, build_restore, register_job
from nbdbackup.backup.testing import ChunkSnapDev
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.memory import MemoryDev

CS = 4096
NCH = 32
SIZE = NCH * CS - 700  # a short last chunk


async def one_round(tmp, seed: int, stats: dict) -> None:
    rng = random.Random(seed)
    snap = ChunkSnapDev(SIZE, CS)
    zeros = set(rng.sample(range(NCH), 6))
    for ch in range(NCH):
        if ch not in zeros:
            snap.write_sync(rng.randbytes(min(CS, SIZE - ch * CS)), ch * CS)
    model = bytearray(SIZE)
    snap.read_sync(memoryview(model), 0)
    if rng.random() < 0.6:
        tpath = tmp / f"rt{seed}.raw"
        if rng.random() < 0.5:
            tpath.write_bytes(bytes([0x5A]) * SIZE)
            fresh = False
        else:
            with open(tpath, "wb") as f:
                f.truncate(SIZE)
            fresh = True
        tdev = FileDev(str(tpath))
        kind = "file"
    else:
        tdev = MemoryDev(SIZE)
        fresh = rng.random() < 0.5
        if not fresh:
            tdev.write_sync(rng.randbytes(SIZE), 0)
        kind = "memory"
    state_dir = str(tmp / f"st{seed}") if rng.random() < 0.5 else None
    dev = await build_restore(snap, tdev, cluster_size=CS, state_dir=state_dir, identity="h7",
                              fresh_target=fresh)
    table = MemoryExportTable()
    live = LiveDev(dev)
    table.add("disk", live, read_only=False)
    engine = Engine(table)
    rjob = RestoreJob("r", device="disk", dev=dev, emit=lambda n, d: None, max_workers=rng.randint(1, 4),
                      speed=rng.choice([0, 16 << 10, 64 << 10, 256 << 10]))
    register_job(engine, rjob)

    async def guest_write(wrng: random.Random) -> None:
        off = wrng.randrange(0, SIZE - 1)
        n = min(wrng.choice([1, 100, CS - 1, CS, CS + 1, 3 * CS + 17]), SIZE - off)
        r = wrng.random()
        if r < 0.2:
            await live.zero(off, n, may_trim=wrng.random() < 0.5)
            model[off:off + n] = bytes(n)
        else:
            data = wrng.randbytes(n)
            await live.pwrite(data, off, fua=r > 0.9)
            model[off:off + n] = data

    try:
        if rng.random() < 0.7:
            rjob.start()
        for _ in range(rng.randint(0, 5)):
            await guest_write(rng)
        sync = rng.choice(["full", "full", "none"])
        cs = rng.choice([CS // 2, CS, 2 * CS, 4 * CS])
        bkind = rng.choice(["file", "memory"]) if sync == "full" else "scratch"
        if bkind == "file":
            btarget = str(tmp / f"b{seed}.raw")
        elif bkind == "memory":
            btarget = MemoryDev(SIZE)
        else:
            btarget = "scratch:"
        kw = {"cluster_size": cs, "snapshot": "snap"}
        if sync == "full":
            kw.update(speed=rng.choice([0, 32 << 10, 128 << 10]), max_chunk=rng.choice([cs, 4 * cs, 1 << 20]),
                      max_workers=rng.choice([1, 2, 4]))
        await engine.backup_start("disk", "j", sync, btarget, **kw)
        r0 = bytes(model)  # no guest write ran since the last one was acknowledged
        job = engine.jobs["j"]
        stop = [False]

        async def writer() -> None:
            wrng = random.Random(rng.random())
            while not stop[0]:
                await guest_write(wrng)
                stats["writes"] += 1
                await asyncio.sleep(wrng.random() * 0.003)

        async def reader() -> None:
            rrng = random.Random(rng.random())
            while not stop[0]:
                off = rrng.randrange(0, SIZE - 1)
                n = min(rrng.choice([1, 511, CS, 2 * CS + 3, 9 * CS]), SIZE - off)
                buf = bytearray(n)
                await job.snapshot.pread(memoryview(buf), off)
                assert bytes(buf) == r0[off:off + n], f"seed {seed}: snapshot changed at {off}+{n}"
                stats["reads"] += 1
                await asyncio.sleep(0)

        tasks = [asyncio.ensure_future(writer()), asyncio.ensure_future(reader()), asyncio.ensure_future(reader())]
        await asyncio.sleep(rng.random() * 0.2)
        if rng.random() < 0.2 and rjob.status.value not in ("concluded", "null"):
            try:
                rjob.cancel()
            except Exception:
                pass
        if sync == "none" or rng.random() < 0.2:
            try:
                job.cancel()
            except Exception:
                pass
        await asyncio.wait_for(job.wait(), 30)
        await asyncio.sleep(rng.random() * 0.05)  # the snapshot stays readable after the end
        stop[0] = True
        await asyncio.gather(*tasks)
        if sync == "full" and job.error is None:
            assert not job._cancel_requested or True
            got = bytearray(SIZE)
            if bkind == "file":
                got = bytearray((tmp / f"b{seed}.raw").read_bytes())
            else:
                btarget.read_sync(memoryview(got), 0)
            bad = [c for c in range(0, SIZE, CS) if got[c:c + CS] != r0[c:c + CS]]
            assert not bad, f"seed {seed} ({kind} restore target, cs {cs}): backup differs at chunks " \
                            f"{[c // CS for c in bad]}"
            stats["full_ok"] += 1
        elif job.error is not None and not job._cancel_requested:
            raise AssertionError(f"seed {seed}: backup failed: {job.error}")
        await engine.job_dismiss("j")
        now = bytearray(SIZE)
        await live.pread(memoryview(now), 0)
        assert now == model, f"seed {seed}: the export does not read its writes"
        stats["rounds"] += 1
    finally:
        if rjob.status.value not in ("concluded", "null"):
            try:
                rjob.cancel()
            except Exception:
                pass
        try:
            await asyncio.wait_for(rjob.wait(), 30)
        except Exception:
            pass
        await live.close()


def test_backup_of_a_restoring_export_fuzzed(short_tmp):
    rounds = int(os.environ.get("NBDBACKUP_HUNT_ROUNDS", "0")) or scaled.rounds(25)
    base = int(os.environ.get("NBDBACKUP_HUNT_SEED", "0"))
    stats = {"rounds": 0, "writes": 0, "reads": 0, "full_ok": 0}
    for seed in range(base, base + rounds):
        run(one_round(short_tmp, seed, stats), timeout=60)
    print("hunt7 restore stats", stats)


def test_a_read_cancelled_while_its_fetch_starts_releases_the_chunks_it_claimed(short_tmp):
    """Finding 3 (docs/hunt7.md), found by the fuzz above: an on-demand fetch
    (`RestoreState.fetch`) claims the chunks it will copy synchronously, then
    hands one ``copy`` coroutine per chunk to ``asyncio.gather``.  A caller
    cancelled right then (a backup job cancelled while its pump reads the
    restoring source -- how the fuzz hit it --, a copy-before-write cut by
    ``cbw-timeout``) cancelled those tasks before they ran a line: ``copy`` never reached the code that
    releases a failed claim, so the chunks stayed "in flight" for ever and
    every later read or write of them -- by any client -- hung."""

    async def main():
        snap = ChunkSnapDev(SIZE, CS)
        snap.write_sync(b"S" * (3 * CS), 0)
        dev = await build_restore(snap, MemoryDev(SIZE), cluster_size=CS, state_dir=None, identity="h7",
                                  fresh_target=True)
        try:
            buf = bytearray(2 * CS)
            task = asyncio.ensure_future(dev.pread(memoryview(buf), 0))
            await asyncio.sleep(0)  # the fetch has claimed chunks 0-1 and started its gather
            assert dev.state.inflight.get(0) is not None
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            got = bytearray(2 * CS)
            await asyncio.wait_for(dev.pread(memoryview(got), 0), 5)  # hung before the fix
            assert got == b"S" * (2 * CS)
            await asyncio.wait_for(dev.pwrite(b"W" * 100, CS + 10), 5)
        finally:
            await dev.close()

    run(main(), timeout=30)
