"""Bug hunt 4 (docs/hunt4.md): instant recovery over real NBD connections,
against invariants 2 (the live export is an ordinary disk: read-your-writes,
FLUSH/FUA) and 5 (no client harms another).

One in-process server (batch mode or not) serves a restoring export (`build_restore`: a memory
snapshot source with one damaged chunk ``BAD``, whose every read fails with
EIO; a memory target, fresh or not) while its `RestoreJob` runs at a random
speed, error policy report or ignore, a persistent progress map or not, sometimes cancelled mid-way.  Three
connections each own a byte range of the disk whose bounds are NOT chunk
aligned (neighbours share chunks, so fills and owned chunks race across
connections) and pipeline batches of non-overlapping WRITE / FUA WRITE /
WRITE_ZEROES / TRIM / READ / FLUSH requests in it; a batch's replies are
awaited before the next batch.  Model: the snapshot with every
acknowledged write applied; TRIMmed bytes are "unknown" until rewritten.

Checks, per reply:
- a READ returns the model's bytes (unknown bytes excepted); it fails with
  EIO exactly when it touches chunk BAD and BAD was not wholly written by
  the guest (a whole-chunk write owns it: no fetch needed);
- a WRITE / WRITE_ZEROES fails (EIO) exactly when it partly covers chunk
  BAD not owned yet (the fill needs the damaged bytes); nothing else fails;
- at the end (job concluded or cancelled): the whole disk, read through
  the export and in the target, is the model (BAD excepted unless owned).

Hunting knob (not for CI): ``NBDBACKUP_HUNT_ROUNDS``.
The fresh-machine check runs the first quarter of the rounds (tests/scaled.py).
"""

from __future__ import annotations

import asyncio
import os
import random

import scaled
from test_server_batch import FLUSH, READ, TRIM, WRITE, WRITE_ZEROES, Raw, req, run

from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.backup.restorejob import RestoreJob, build_restore, register_job
from nbdbackup.backup.testing import ChunkSnapDev, Fault, FaultDev
from nbdbackup.blockdev.memory import MemoryDev
from nbdbackup.nbd.server import Server

CS = 4096
NCH = 16
SIZE = NCH * CS - 1000  # a short last chunk
EIO = 5
FUA = 1




class Model:
    """``data``: the disk as acknowledged; ``known``: 1 per byte whose
    content is defined (0 after a TRIM); ``owned_bad``: the guest wrote
    chunk ``bad`` whole (so it reads again)."""

    def __init__(self, snap: bytes, bad: int) -> None:
        self.data = bytearray(snap)
        self.known = bytearray(b"\1" * len(snap))
        self.bad = bad
        self.owned_bad = False

    def bad_span(self) -> tuple[int, int]:
        return self.bad * CS, min((self.bad + 1) * CS, SIZE)

    def touches_bad(self, off: int, n: int) -> bool:
        lo, hi = self.bad_span()
        return off < hi and lo < off + n

    def covers_bad(self, off: int, n: int) -> bool:
        lo, hi = self.bad_span()
        return off <= lo and hi <= off + n

    def write_fails(self, off: int, n: int) -> bool:
        return not self.owned_bad and self.touches_bad(off, n) and not self.covers_bad(off, n)

    def read_fails(self, off: int, n: int) -> bool:
        return not self.owned_bad and self.touches_bad(off, n)

    def apply(self, off: int, data: bytes) -> None:
        self.data[off:off + len(data)] = data
        self.known[off:off + len(data)] = b"\1" * len(data)
        if self.covers_bad(off, len(data)):
            self.owned_bad = True

    def check(self, off: int, got: bytes, what: str) -> None:
        want = self.data[off:off + len(got)]
        if got == want:
            return
        for i in range(len(got)):
            if got[i] != want[i] and self.known[off + i]:
                raise AssertionError(f"{what}: byte {off + i} (chunk {(off + i) // CS}) is {got[i]}, "
                                     f"model {want[i]}")


async def _conn_loop(c: Raw, lo: int, hi: int, model: Model, rng: random.Random, rounds: int,
                     log: list) -> None:
    cookie = 0
    for _ in range(rounds):
        # a batch of non-overlapping requests inside [lo, hi)
        cuts = sorted(rng.sample(range(lo + 1, hi), k=min(hi - lo - 1, rng.randint(1, 6))))
        pieces = list(zip([lo] + cuts, cuts + [hi]))
        rng.shuffle(pieces)
        sent = {}
        for a, b in pieces[:rng.randint(1, len(pieces))]:
            cookie += 1
            n = b - a
            kind = rng.choice(["read", "read", "write", "write", "fua", "zero", "trim", "flush"])
            if kind == "read":
                c.send(c.read(cookie, a, n))
            elif kind in ("write", "fua"):
                data = rng.randbytes(n)
                c.send(req(WRITE, cookie, a, n, data, flags=FUA if kind == "fua" else 0))
                sent[cookie] = (kind, a, n, data)
                continue
            elif kind == "zero":
                c.send(req(WRITE_ZEROES, cookie, a, n, flags=rng.choice([0, FUA])))
                sent[cookie] = (kind, a, n, bytes(n))
                continue
            elif kind == "trim":
                c.send(req(TRIM, cookie, a, n))
            else:
                c.send(req(FLUSH, cookie, 0, 0))
            sent[cookie] = (kind, a, n, None)
        for ck, (err, data) in (await c.replies(len(sent))).items():
            kind, a, n, payload = sent[ck]
            log.append((kind, a, n, err))
            if kind == "read":
                if model.read_fails(a, n):
                    assert err == EIO, (kind, a, n, err)
                else:
                    assert err == 0, (kind, a, n, err)
                    model.check(a, data, f"read {a}+{n}")
            elif kind in ("write", "fua", "zero"):
                if model.write_fails(a, n):
                    assert err == EIO, (kind, a, n, err)
                else:
                    assert err == 0, (kind, a, n, err)
                    model.apply(a, payload)
            elif kind == "trim":
                assert err == 0, (kind, a, n, err)
                model.known[a:a + n] = bytes(n)
            else:
                assert err == 0, (kind, err)


async def one_round(tmp, seed: int) -> None:
    rng = random.Random(seed)
    snap = ChunkSnapDev(SIZE, CS)
    zeros = set(rng.sample(range(NCH), 3))
    for ch in range(NCH):
        if ch not in zeros:
            snap.write_sync(rng.randbytes(min(CS, SIZE - ch * CS)), ch * CS)
    orig = bytearray(SIZE)
    snap.read_sync(memoryview(orig), 0)
    bad = rng.choice([ch for ch in range(NCH) if ch not in zeros])
    src = FaultDev(snap, rng=random.Random(rng.random()), max_yields=4)
    src.faults.append(Fault("read", bad * CS, CS))
    tgt_mem = MemoryDev(SIZE)
    if rng.random() < 0.5:
        tgt_mem.write_sync(rng.randbytes(SIZE), 0)  # an existing target holding garbage
        fresh = False
    else:
        fresh = True
    tgt = FaultDev(tgt_mem, rng=random.Random(rng.random()), max_yields=3)
    state_dir = str(tmp / f"st{seed}") if rng.random() < 0.5 else None  # a persistent progress map
    dev = await build_restore(src, tgt, cluster_size=CS, state_dir=state_dir, identity="h4",
                              fresh_target=fresh)
    engine = Engine(MemoryExportTable())
    policy = rng.choice(["report", "ignore"])
    job = RestoreJob("r", device="disk", dev=dev, emit=lambda n, d: None,
                     max_workers=rng.randint(1, 4), on_source_error=policy,
                     speed=rng.choice([0, 64 << 10, 256 << 10]))
    register_job(engine, job)
    server = Server(batch=rng.random() < 0.5)
    server.add_export("disk", dev, read_only=False)
    path = str(tmp / f"s{seed}")
    await server.start_unix(path)
    model = Model(bytes(orig), bad)
    log: list = []
    try:
        started = rng.random() < 0.7
        if started:
            job.start()
        conns = [await Raw.connect(path, "disk", rng.random() < 0.5) for _ in range(3)]
        b1 = rng.randrange(CS, SIZE // 2)
        b2 = rng.randrange(SIZE // 2, SIZE - CS)
        bounds = [0, b1, b2, SIZE]
        tasks = [asyncio.ensure_future(_conn_loop(c, bounds[k], bounds[k + 1], model,
                                                  random.Random(rng.random()), 6, log))
                 for k, c in enumerate(conns)]
        if started and rng.random() < 0.3:
            await asyncio.sleep(rng.random() * 0.01)
            try:
                job.cancel()
            except Exception:  # concluded already
                pass
        await asyncio.gather(*tasks)
        # the end: read the whole disk through one connection, chunk by chunk
        c = conns[0]
        for ch in range(NCH):
            a, n = ch * CS, min(CS, SIZE - ch * CS)
            c.send(c.read(1000 + ch, a, n))
            (err, data), = (await c.replies(1)).values()
            if model.read_fails(a, n):
                assert err == EIO, (ch, err)
            else:
                assert err == 0, (ch, err)
                model.check(a, data, f"final read of chunk {ch}")
        st = dev.state
        for ch in range(NCH):
            if st.progress.bits.get(ch):
                assert st.done.get(ch), ch  # progress <= done
            if st.done.get(ch):
                a, n = ch * CS, min(CS, SIZE - ch * CS)
                got = bytearray(n)
                tgt_mem.read_sync(memoryview(got), a)
                model.check(a, bytes(got), f"target chunk {ch}")
        for c in conns:
            await c.close()
    finally:
        await server.shutdown()
        await dev.close()


def test_restoring_export_three_connections_racing_the_job(short_tmp):
    rounds = int(os.environ.get("NBDBACKUP_HUNT_ROUNDS", "0")) or scaled.rounds(12)
    base = int(os.environ.get("NBDBACKUP_HUNT_SEED", "0"))
    for seed in range(base, base + rounds):
        run(one_round(short_tmp, seed), timeout=60)


# -- a backup of a restoring export, file to file ------------------------------------------------


def test_backup_of_restoring_export_with_file_target_reads_through_the_restore(short_tmp):
    """Found by hunt 4: copy offload (copy_file_range, SEEK_DATA) looked for
    the innermost FILE under the backup's source and walked through the
    `RestoreDev` down to its target file: a backup started on a restoring
    export copied the target's holes and garbage for every chunk not
    restored yet, instead of the snapshot's bytes (invariant 1: a backup
    reads what the export serves)."""
    from nbdbackup.blockdev.file import FileDev
    from nbdbackup.blockdev.live import LiveDev

    async def main():
        rng = random.Random(4)
        snap = ChunkSnapDev(SIZE, CS)
        for ch in range(NCH):
            if ch % 3:
                snap.write_sync(rng.randbytes(min(CS, SIZE - ch * CS)), ch * CS)
        orig = bytearray(SIZE)
        snap.read_sync(memoryview(orig), 0)
        tpath = short_tmp / "restore-target.raw"
        with open(tpath, "wb") as f:  # an existing target holding other bytes
            f.write(bytes([0x5A]) * SIZE)
        dev = await build_restore(snap, FileDev(str(tpath)), cluster_size=CS,
                                  state_dir=str(short_tmp / "rst"), identity="b", fresh_target=False)
        table = MemoryExportTable()
        live = LiveDev(dev)
        table.add("disk", live, read_only=False)
        engine = Engine(table)
        bpath = short_tmp / "backup.raw"
        # the restore job is not started: every chunk is still in the repository only
        await engine.backup_start("disk", "j", "full", str(bpath), speed=CS * 4)
        # guest writes racing the backup's copy-before-write: whole chunks, partial, unaligned
        model = bytearray(orig)
        for off, n in ((5 * CS, CS), (7 * CS + 100, 300), (9 * CS - 10, CS + 20), (SIZE - 500, 500)):
            data = rng.randbytes(n)
            await live.pwrite(data, off)
            model[off:off + n] = data
        await engine.jobs["j"].wait()
        now = bytearray(SIZE)
        await live.pread(memoryview(now), 0)
        assert now == model  # read-your-writes through the restoring export
        info = engine.query_jobs()[0]
        assert "error" not in info, info
        got = bpath.read_bytes()
        bad = [ch for ch in range(NCH) if got[ch * CS:(ch + 1) * CS] != orig[ch * CS:(ch + 1) * CS]]
        assert not bad, f"chunks of the backup that are not the snapshot's: {bad}"
        await engine.job_dismiss("j")
        await live.close()

    run(main())
