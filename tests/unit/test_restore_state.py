"""The instant-recovery state rules (`backup.restorestate`, `restoredev`, `restorejob`).

Memory devices only (no I/O but the progress map's files under tmp_path).
`CrashDev` models a disk with a volatile write cache: writes land in an
overlay that FLUSH (or FUA) makes durable and `crash` throws away, so
"a flushed guest write survives a crash" and "a chunk marked durable is
really in the target" can be checked exactly.

The hypothesis machine interleaves guest reads, writes (partial and
whole-chunk, plain/FUA/zero/trim), flushes, background restore steps,
pause/resume and crashes; invariants: the export reads as the model
(snapshot + guest writes); progress bits are a subset of done bits and
every durable chunk of the target that is marked durable holds the model's
bytes; after a crash and a restart every flushed write is still there; at
the end the target equals the model.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.backup.restorejob import RestoreJob, build_restore, register_job
from nbdbackup.backup.restorestate import ProgressMap
from nbdbackup.backup.testing import ChunkSnapDev, Fault, FaultDev
from nbdbackup.blockdev.base import BASE_ALLOCATION, BlockDev, Capabilities
from nbdbackup.blockdev.memory import MemoryDev
from nbdbackup.errors import ConfigError

#: what the state machine exercised (crash restarts, owned chunks...), for a look after a run
STATS: dict[str, int] = {}
CS = 4096
NCH = 12
SIZE = NCH * CS - 1000  # a short last chunk


class CrashDev(BlockDev):
    """A disk with a volatile write cache.  Fields: ``durable`` (bytearray:
    what survives a crash); ``cache`` (list of (offset, bytes) not yet
    durable, in order); ``flushes``."""

    def __init__(self, size: int) -> None:
        self.durable = bytearray(size)
        self.cache: list[tuple[int, bytes]] = []
        self.flushes = 0

    @property
    def size(self) -> int:
        return len(self.durable)

    def capabilities(self) -> Capabilities:
        return Capabilities(can_extents=False)

    def view(self) -> bytearray:
        b = bytearray(self.durable)
        for off, data in self.cache:
            b[off:off + len(data)] = data
        return b

    async def pread(self, buf: memoryview, offset: int) -> None:
        await asyncio.sleep(0)
        buf[:] = self.view()[offset:offset + len(buf)]

    async def pwrite(self, buf, offset: int, *, fua: bool = False) -> None:
        await asyncio.sleep(0)
        self.cache.append((offset, bytes(buf)))
        if fua:
            await self.flush()

    async def zero(self, offset, length, *, may_trim=False, fua=False, fast=False) -> None:
        if fast:
            raise OSError(errno.ENOTSUP, "no fast zero")
        await self.pwrite(bytes(length), offset, fua=fua)

    async def trim(self, offset, length, *, fua=False) -> None:
        await self.pwrite(bytes(length), offset, fua=fua)

    async def flush(self) -> None:
        await asyncio.sleep(0)
        self.durable[:] = self.view()
        self.cache.clear()
        self.flushes += 1

    def crash(self) -> None:
        self.cache.clear()




def snapshot_image(seed: int, zero_chunks: set[int]) -> MemoryDev:
    rng = random.Random(seed)
    mem = ChunkSnapDev(SIZE, CS)
    for c in range(NCH):
        if c not in zero_chunks:
            n = min(CS, SIZE - c * CS)
            mem.write_sync(rng.randbytes(n), c * CS)
    return mem


def read(dev: BlockDev, loop, offset=0, length=None) -> bytes:
    length = dev.size - offset if length is None else length
    b = bytearray(length)
    loop.run_until_complete(dev.pread(memoryview(b), offset))
    return bytes(b)


class CountingDev(FaultDev):
    def chunks_read(self) -> list[int]:
        return [o // CS for op, o, n in self.calls if op == "read"]


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def test_copy_on_read_fetches_each_chunk_once(loop, tmp_path):
    snap = snapshot_image(1, {3})
    src = CountingDev(snap)
    tgt = MemoryDev(SIZE)
    dev = loop.run_until_complete(build_restore(src, tgt, cluster_size=CS, state_dir=str(tmp_path / "st"),
                                                identity="t", fresh_target=True))
    orig = read(snap, loop)

    async def go():
        bufs = [bytearray(100) for _ in range(5)]
        # five concurrent reads of chunk 5, one of 4+5
        await asyncio.gather(*(dev.pread(memoryview(b), 5 * CS + 10) for b in bufs),
                             dev.pread(memoryview(bytearray(CS)), 4 * CS + 100))
        return bufs

    bufs = loop.run_until_complete(go())
    assert all(bytes(b) == orig[5 * CS + 10:5 * CS + 110] for b in bufs)
    assert sorted(src.chunks_read()) == [4, 5]  # chunk 5 once despite six readers
    assert read(tgt, loop, 4 * CS, 2 * CS) == orig[4 * CS:6 * CS]  # copied on read
    # the zero chunk was never read: the fresh target already reads zeros
    assert read(dev, loop, 3 * CS, CS) == bytes(CS) and 3 not in src.chunks_read()
    assert dev.state.done.get(3) and dev.state.progress.bits.get(3)
    loop.run_until_complete(dev.close())


def test_partial_write_fills_whole_write_owns(loop, tmp_path):
    snap = snapshot_image(2, set())
    src = CountingDev(snap)
    tgt = MemoryDev(SIZE)
    dev = loop.run_until_complete(build_restore(src, tgt, cluster_size=CS, state_dir=None,
                                                identity="t", fresh_target=True))
    orig = bytearray(read(snap, loop))
    # covers the end of chunk 1, all of 2 and 3, the start of chunk 4
    data = bytes(range(256)) * 10 + b"x" * (2 * CS + 1000 - 2560)
    off = 2 * CS - 500
    loop.run_until_complete(dev.pwrite(data[:2 * CS + 1000], off))
    orig[off:off + 2 * CS + 1000] = data[:2 * CS + 1000]
    assert sorted(src.chunks_read()) == [1, 4]  # filled; 2 and 3 owned, never fetched
    st_ = dev.state
    assert st_.bytes_owned == 2 * CS
    assert [st_.done.get(c) for c in range(6)] == [False, True, True, True, True, False]
    # the last, short chunk written whole up to the end of the disk: owned
    last = (NCH - 1) * CS
    loop.run_until_complete(dev.pwrite(b"z" * (SIZE - last), last))
    orig[last:] = b"z" * (SIZE - last)
    assert NCH - 1 not in src.chunks_read()
    assert read(dev, loop) == bytes(orig)
    assert sorted(src.chunks_read()) == [c for c in range(NCH) if c not in (2, 3, NCH - 1)]
    loop.run_until_complete(dev.close())


def test_job_completes_with_writes_and_becomes_plain(loop, tmp_path):
    snap = snapshot_image(3, {0, 7})
    src = FaultDev(snap, rng=random.Random(1))
    tgt = MemoryDev(SIZE)
    dev = loop.run_until_complete(build_restore(src, tgt, cluster_size=CS, state_dir=str(tmp_path / "s"),
                                                identity="x", fresh_target=False))
    table = MemoryExportTable()
    eng = Engine(table)
    events = []
    job = RestoreJob("r", device="disk", dev=dev, emit=lambda n, d: events.append((n, d)), max_workers=2)
    register_job(eng, job)
    model = bytearray(read(snap, loop))

    async def go():
        job.start()
        await asyncio.sleep(0)
        await dev.pwrite(b"A" * 3000, 6 * CS + 7)
        model[6 * CS + 7:6 * CS + 3007] = b"A" * 3000
        await job.wait()

    loop.run_until_complete(go())
    assert job.status.value == "concluded" and job.error is None
    q = eng.query_jobs()[0]
    assert q["type"] == "restore" and q["complete"] and q["current-progress"] == q["total-progress"]
    assert read(tgt, loop) == bytes(model)
    assert dev.state.progress.complete and dev.state.progress.bits.all()
    assert [n for n, _ in events if n != "JOB_STATUS_CHANGE"] == ["BLOCK_JOB_COMPLETED"]
    assert events[-2][1]["type"] == "restore"
    # complete: the fast paths go straight to the target
    assert dev.pread_now(memoryview(bytearray(10)), 0) in (True, False)
    assert dev.pwrite_now(b"q", 5)
    loop.run_until_complete(eng.job_dismiss("r"))
    assert "r" not in eng.jobs
    loop.run_until_complete(dev.close())


def test_restart_resumes_and_refuses_other_identity(loop, tmp_path):
    snap = snapshot_image(4, set())
    tgt = MemoryDev(SIZE)
    sd = str(tmp_path / "state")
    dev = loop.run_until_complete(build_restore(FaultDev(snap), tgt, cluster_size=CS, state_dir=sd,
                                                identity="A", fresh_target=False))
    read(dev, loop, 2 * CS, 3 * CS)  # chunks 2..4 restored on read
    loop.run_until_complete(dev.flush())
    dev.inner = MemoryDev(1)  # keep tgt open: close only the progress map
    dev.owns_inner = False
    loop.run_until_complete(dev.close())
    with pytest.raises(ConfigError, match="another restore"):
        loop.run_until_complete(build_restore(FaultDev(snap), tgt, cluster_size=CS, state_dir=sd,
                                              identity="B", fresh_target=False))
    src = CountingDev(snap)
    dev2 = loop.run_until_complete(build_restore(src, tgt, cluster_size=CS, state_dir=sd,
                                                 identity="A", fresh_target=False))
    assert dev2.state.progress.resumed
    assert [c for c in range(NCH) if dev2.state.done.get(c)] == [2, 3, 4]
    assert read(dev2, loop) == read(snap, loop)
    assert 2 not in src.chunks_read() and 3 not in src.chunks_read()
    loop.run_until_complete(dev2.close())


def test_inconsistent_map_after_reboot_is_recovered(loop, tmp_path):
    """A map left in-use-dirty by another boot: its bits are still true (set
    only after the data was durable), so the restart uses them."""
    from nbdbackup.bitmap import store as bstore

    snap = snapshot_image(5, set())
    tgt = MemoryDev(SIZE)
    sd = str(tmp_path / "state")
    dev = loop.run_until_complete(build_restore(FaultDev(snap), tgt, cluster_size=CS, state_dir=sd,
                                                identity="A", fresh_target=False))
    read(dev, loop, 0, CS)
    loop.run_until_complete(dev.state.make_durable())
    read(dev, loop, 5 * CS, 1)
    loop.run_until_complete(dev.state.make_durable())
    # simulate the machine going down while in use: drop the handles unclean,
    # and pretend the file was written under another boot
    st = dev.state.progress.store
    _, lock, handles = st._exports.pop("nbdbackup-restore-progress")
    for h in list(handles.values()):
        h.header.boot_id = b"\x01" * 16
        h._write_header(bstore.STATE_DIRTY)
        h.close(clean=False)
    os.close(lock)
    orig = bstore.current_boot_id
    bstore.current_boot_id = lambda: b"\x02" * 16
    try:
        dev2 = loop.run_until_complete(build_restore(FaultDev(snap), tgt, cluster_size=CS, state_dir=sd,
                                                     identity="A", fresh_target=False))
    finally:
        bstore.current_boot_id = orig
    assert dev2.state.progress.recovered
    assert [c for c in range(NCH) if dev2.state.done.get(c)] == [0, 5]
    loop.run_until_complete(dev2.close())


def test_fua_write_makes_progress_durable(loop, tmp_path):
    snap = snapshot_image(6, set())
    tgt = CrashDev(SIZE)
    dev = loop.run_until_complete(build_restore(FaultDev(snap), tgt, cluster_size=CS, state_dir=None,
                                                identity="A", fresh_target=False))
    loop.run_until_complete(dev.pwrite(b"F" * 10, 3 * CS + 5, fua=True))
    assert dev.state.progress.bits.get(3)
    assert tgt.durable[3 * CS + 5:3 * CS + 15] == b"F" * 10
    loop.run_until_complete(dev.pwrite(b"G" * 10, 4 * CS + 5))  # no FUA: not durable yet
    assert dev.state.done.get(4) and not dev.state.progress.bits.get(4)
    loop.run_until_complete(dev.flush())
    assert dev.state.progress.bits.get(4) and tgt.durable[4 * CS + 5:4 * CS + 15] == b"G" * 10


def test_failed_write_releases_claim_and_reader_restores(loop, tmp_path):
    snap = snapshot_image(7, set())
    tmem = MemoryDev(SIZE)
    tgt = FaultDev(tmem)
    tgt.faults.append(Fault("write", 2 * CS, CS, errno.ENOSPC, times=1))
    dev = loop.run_until_complete(build_restore(FaultDev(snap), tgt, cluster_size=CS, state_dir=None,
                                                identity="A", fresh_target=False))
    with pytest.raises(OSError) as ei:
        loop.run_until_complete(dev.pwrite(b"w" * CS, 2 * CS))
    assert ei.value.errno == errno.ENOSPC
    assert not dev.state.done.get(2) and 2 not in dev.state.inflight
    assert read(dev, loop, 2 * CS, CS) == read(snap, loop, 2 * CS, CS)


def test_extents_never_report_unrestored_data_as_hole(loop):
    snap = snapshot_image(8, {1, 2, 9})
    tgt = MemoryDev(SIZE)  # all holes
    dev = loop.run_until_complete(build_restore(FaultDev(snap), tgt, cluster_size=CS, state_dir=None,
                                                identity="A", fresh_target=False))
    read(dev, loop, 4 * CS, 1)  # chunk 4 restored
    exts = loop.run_until_complete(dev.extents(0, SIZE, BASE_ALLOCATION))
    assert exts[0].offset == 0 and sum(e.length for e in exts) == SIZE
    for c in range(NCH):
        e = next(e for e in exts if e.offset <= c * CS < e.end)
        if c in (1, 2, 9):
            assert e.flags & 2, c  # zero chunks of the snapshot: holes
        else:
            assert not e.flags & 2, c  # data (in the backup or restored)


def test_trim_of_unrestored_chunk_is_dropped(loop):
    snap = snapshot_image(9, set())
    tgt = MemoryDev(SIZE)
    dev = loop.run_until_complete(build_restore(FaultDev(snap), tgt, cluster_size=CS, state_dir=None,
                                                identity="A", fresh_target=False))
    loop.run_until_complete(dev.trim(0, 3 * CS))
    assert read(dev, loop, 0, 3 * CS) == read(snap, loop, 0, 3 * CS)


# -- hypothesis: interleavings ----------------------------------------------------


class RestoreMachine(RuleBasedStateMachine):
    """Guest I/O against a restoring device while its job runs, with crashes."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.pending: list[tuple[asyncio.Task, int, int, bytes, bool]] = []
        self.job = None
        self.dev = None
        self.bg: list[asyncio.Task] = []  # background flushes

    @initialize(seed=st.integers(0, 2**32 - 1), zeros=st.sets(st.integers(0, NCH - 1), max_size=4),
                workers=st.integers(1, 3), fresh=st.booleans(), paused=st.booleans())
    def setup(self, seed, zeros, workers, fresh, paused):
        import tempfile

        self.rng = random.Random(seed)
        self.snap = snapshot_image(seed, zeros)
        self.orig = read(self.snap, self.loop)
        self.model = bytearray(self.orig)
        self.flushed_model = bytearray(self.orig)  # what must survive a crash
        self.unflushed: list[tuple[int, bytes]] = []
        self.tgt = CrashDev(SIZE)
        self.tmp = tempfile.mkdtemp(prefix="nbdb-restore-")
        self.workers = workers
        self.fresh = fresh
        self.crashes = 0
        self.start_paused = paused  # the job waits for a resume: guest I/O meets unrestored chunks
        self._open()

    def _open(self):
        src = FaultDev(self.snap, rng=random.Random(self.rng.random()), max_yields=4)
        tgt = FaultDev(self.tgt, rng=random.Random(self.rng.random()), max_yields=3)
        self.dev = self.run(build_restore(src, tgt, cluster_size=CS, state_dir=self.tmp, identity="h",
                                          fresh_target=self.fresh and not self.crashes))
        self.engine = Engine(MemoryExportTable())
        self.job = RestoreJob("r", device="d", dev=self.dev, emit=lambda n, d: None,
                              max_workers=self.workers)
        register_job(self.engine, self.job)

        async def start():
            self.job.start()
            if self.start_paused:
                self.job.pause()

        self.run(start())

    def run(self, coro):
        return self.loop.run_until_complete(asyncio.wait_for(coro, 10))

    async def _spin(self, n):
        for _ in range(n):
            await asyncio.sleep(0)

    def _reap(self):
        still = []
        for t, off, n, data, fua in self.pending:
            if t.done():
                t.result()
                self.model[off:off + n] = data
                if fua:
                    self.flushed_model[off:off + n] = data
                else:
                    self.unflushed.append((off, data))
            else:
                still.append((t, off, n, data, fua))
        self.pending = still

    def _wait_overlaps(self, off, n):
        for t, o, k, _, _ in self.pending:
            if o < off + n and off < o + k:
                self.run(t)
        self._reap()

    @rule(data=st.data(), kind=st.sampled_from(["write", "write", "zero", "whole"]),
          fua=st.booleans(), spin=st.integers(0, 4))
    def start_write(self, data, kind, fua, spin):
        if kind == "whole":
            c = data.draw(st.integers(0, NCH - 1), label="chunk")
            off = c * CS
            n = min(data.draw(st.integers(1, 2), label="chunks") * CS, SIZE - off)
        else:
            off = data.draw(st.integers(0, SIZE - 1), label="offset")
            n = data.draw(st.integers(1, min(2 * CS + 9, SIZE - off)), label="length")
        self._wait_overlaps(off, n)
        if kind == "zero":
            buf = bytes(n)
            coro = self.dev.zero(off, n, may_trim=True, fua=fua)
        else:
            buf = self.rng.randbytes(n)
            coro = self.dev.pwrite(buf, off, fua=fua)
        self.pending.append((self.loop.create_task(coro), off, n, buf, fua))
        self.run(self._spin(spin))
        self._reap()

    @rule(data=st.data())
    def guest_read(self, data):
        off = data.draw(st.integers(0, SIZE - 1), label="offset")
        n = data.draw(st.integers(1, min(3 * CS, SIZE - off)), label="length")
        self._wait_overlaps(off, n)
        assert read(self.dev, self.loop, off, n) == bytes(self.model[off:off + n])

    @rule()
    def flush(self):
        for t, *_ in list(self.pending):
            self.run(t)
        self._reap()
        self.run(self.dev.flush())
        self.flushed_model = bytearray(self.model)
        self.unflushed.clear()

    @rule(spin=st.integers(0, 6))
    def start_flush(self, spin):
        """A FLUSH left running while other steps go on (no model change: it
        makes durable at least what the model calls flushed)."""
        self.bg.append(self.loop.create_task(self.dev.flush()))
        self.run(self._spin(spin))

    @rule(spin=st.integers(1, 40))
    def background(self, spin):
        self.run(self._spin(spin))
        self._reap()

    @precondition(lambda self: self.job is not None and self.job.status.value == "running")
    @rule()
    def pause(self):
        self.engine.job_pause("r")

    @precondition(lambda self: self.job is not None and self.job.status.value == "paused")
    @rule()
    def resume(self):
        self.engine.job_resume("r")

    @precondition(lambda self: self.crashes < 2)
    @rule()
    def crash(self):
        """kill -9 / power loss: the target's cache is lost, the progress map
        keeps what it had; unflushed guest writes may vanish (so the model
        keeps only flushed ones, and the region of unflushed ones is then
        whatever the restart makes of it: snapshot bytes)."""
        for t, *_ in list(self.pending):
            self.run(t)
        self._reap()
        for t in self.bg:
            self.run(t)
        self.bg.clear()
        st_ = self.dev.state
        # every chunk marked durable really is in the durable target
        for c in range(NCH):
            if st_.progress.bits.get(c):
                lo, ln = st_.span(c, 1)
                assert self.tgt.durable[lo:lo + ln] == self.flushed_model[lo:lo + ln] or any(
                    o < lo + ln and lo < o + len(d) for o, d in self.unflushed), c
        self.job._task.cancel()
        self.run(asyncio.gather(self.job._task, return_exceptions=True))
        self.tgt.crash()
        st_.progress.close()
        self.crashes += 1
        STATS["crashes"] = STATS.get("crashes", 0) + 1
        STATS["durable chunks at crash"] = STATS.get("durable chunks at crash", 0) + st_.progress.bits.count()
        STATS["unflushed writes lost"] = STATS.get("unflushed writes lost", 0) + len(self.unflushed)
        # what a restart shows: flushed writes, and for chunks with unflushed
        # writes either snapshot or written bytes; keep it exact by
        # re-deriving those chunks from what the restarted device reads
        touched = set()
        for o, d in self.unflushed:
            touched.update(range(o // CS, (o + len(d) - 1) // CS + 1))
        self._open()
        self.model = bytearray(self.flushed_model)
        for c in touched:
            lo, ln = self.dev.state.span(c, 1)
            got = read(self.dev, self.loop, lo, ln)
            chunk_model = bytearray(self.orig[lo:lo + ln])
            want_flushed = self.flushed_model[lo:lo + ln]
            # bytes not covered by any flushed write may be either value
            for i in range(ln):
                if got[i] not in (want_flushed[i],) and not any(
                        o <= lo + i < o + len(d) for o, d in self.unflushed):
                    raise AssertionError(f"chunk {c} byte {i}: flushed content lost")
            self.model[lo:lo + ln] = got
            del chunk_model
        self.flushed_model = bytearray(self.model)
        self.unflushed.clear()

    @invariant()
    def durable_progress_is_true(self):
        """At any moment (copies, flushes and writes in flight): a chunk whose
        progress bit is set holds, in the DURABLE target, the flushed model --
        except under writes not flushed or still in flight (either value)."""
        if self.dev is None:
            return
        st_ = self.dev.state
        excl = [(o, len(d)) for o, d in self.unflushed] + [(o, n) for _, o, n, _, _ in self.pending]
        for c in range(NCH):
            if not st_.progress.bits.get(c):
                continue
            lo, ln = st_.span(c, 1)
            dur, want = self.tgt.durable[lo:lo + ln], self.flushed_model[lo:lo + ln]
            if dur == want:
                continue
            for i in range(ln):
                if dur[i] != want[i]:
                    assert any(o <= lo + i < o + n for o, n in excl), (c, i)

    @invariant()
    def progress_within_done(self):
        if self.dev is None:
            return
        st_ = self.dev.state
        for c in range(NCH):
            if st_.progress.bits.get(c):
                assert st_.done.get(c)

    @invariant()
    def export_reads_model(self):
        if self.dev is None:
            return
        for t, *_ in list(self.pending):
            self.run(t)
        self._reap()
        # without side effects (a read would restore everything): done chunks
        # from the target, the others from the snapshot
        st_ = self.dev.state
        view = self.tgt.view()
        seen = bytearray(SIZE)
        for c in range(NCH):
            lo, ln = st_.span(c, 1)
            seen[lo:lo + ln] = view[lo:lo + ln] if st_.done.get(c) else self.orig[lo:lo + ln]
        assert bytes(seen) == bytes(self.model)

    def teardown(self):
        try:
            if self.job is None:
                return
            for t, *_ in self.pending:
                self.run(t)
            self._reap()
            for t in self.bg:
                self.run(t)
            if self.job.status.value == "paused":
                self.engine.job_resume("r")
            self.run(self.job.wait())
            assert self.job.status.value == "concluded" and self.job.error is None, self.job.error
            assert self.dev.state.complete and self.dev.state.progress.bits.all()
            for k in ("bytes_owned", "bytes_fetched", "bytes_copied_by_pump"):
                STATS[k] = STATS.get(k, 0) + getattr(self.dev.state, k)
            assert bytes(self.tgt.view()) == bytes(self.model)
            self.run(self.dev.flush())  # writes made after the job's end
            assert bytes(self.tgt.durable) == bytes(self.model)
            self.dev.state.progress.close()
        finally:
            self.loop.close()
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)


TestRestoreMachine = RestoreMachine.TestCase
TestRestoreMachine.settings = settings(max_examples=250, stateful_step_count=30, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("seed", range(5))
def test_overlapping_concurrent_writes_and_reads_never_deadlock(loop, seed):
    """Owned claims are taken in ascending order: many overlapping writes,
    partial and whole-chunk, racing reads and the job, all finish; after
    them every chunk is done exactly once and nothing stays in flight."""
    rng = random.Random(seed)
    snap = snapshot_image(seed, {2})
    src = FaultDev(snap, rng=random.Random(seed + 1), max_yields=5)
    tgt = FaultDev(MemoryDev(SIZE), rng=random.Random(seed + 2), max_yields=5)
    dev = loop.run_until_complete(build_restore(src, tgt, cluster_size=CS, state_dir=None,
                                                identity="A", fresh_target=False))
    job = RestoreJob("r", device="d", dev=dev, emit=lambda n, d: None, max_workers=3)
    register_job(Engine(MemoryExportTable()), job)

    async def go():
        job.start()
        ops = []
        for _ in range(60):
            off = rng.randrange(SIZE - 1)
            n = rng.randint(1, min(3 * CS, SIZE - off))
            if rng.random() < 0.3:
                off = rng.randrange(NCH - 1) * CS
                n = min(rng.randint(1, 3) * CS, SIZE - off)
            if rng.random() < 0.3:
                ops.append(dev.pread(memoryview(bytearray(n)), off))
            else:
                ops.append(dev.pwrite(rng.randbytes(n), off, fua=rng.random() < 0.2))
        await asyncio.wait_for(asyncio.gather(*ops), 20)
        await asyncio.wait_for(job.wait(), 20)

    loop.run_until_complete(go())
    st_ = dev.state
    assert job.status.value == "concluded" and job.error is None
    assert st_.complete and not st_.inflight and st_.progress.bits.all()
    fetched = [c for op, o, n in src.calls if op == "read" for c in range(o // CS, (o + n - 1) // CS + 1)]
    assert len(fetched) == len(set(fetched))  # no chunk came from the source twice


@pytest.mark.parametrize("policy", ["report", "ignore", "stop"])
def test_error_policies_on_a_bad_chunk(loop, policy):
    """A chunk the source cannot read (a damaged repository chunk): the job's
    policy applies to its own copies; the export keeps serving the rest, and
    a guest read of the bad chunk fails with EIO (never wrong data)."""
    snap = snapshot_image(11, set())
    src = FaultDev(snap)
    src.faults.append(Fault("read", 5 * CS, CS, errno.EIO))
    tgt = MemoryDev(SIZE)
    dev = loop.run_until_complete(build_restore(src, tgt, cluster_size=CS, state_dir=None,
                                                identity="A", fresh_target=False))
    eng = Engine(MemoryExportTable())
    events = []
    job = RestoreJob("r", device="d", dev=dev, emit=lambda n, d: events.append((n, d)), max_workers=2,
                     on_source_error=policy)
    register_job(eng, job)
    orig = read(snap, loop)

    async def go():
        job.start()
        if policy == "stop":
            for _ in range(2000):
                await asyncio.sleep(0)
                if job.status.value == "paused":
                    break
            assert job.status.value == "paused" and "read error" in job.error
            src.faults.clear()  # the chunk is readable again (say, repaired)
            eng.job_resume("r")
        await asyncio.wait_for(job.wait(), 10)

    loop.run_until_complete(go())
    assert ("BLOCK_JOB_ERROR", {"device": "r", "id": "r", "operation": "read", "action": policy}) in events
    q = eng.query_jobs()[0]
    if policy == "report":
        assert q["status"] == "concluded" and "error" in q and not q["complete"]
    elif policy == "ignore":
        assert "error" not in q and not q["complete"] and q["bytes-ignored"] == CS
        assert not dev.state.progress.complete
    else:
        assert "error" not in q and q["complete"]
    assert read(dev, loop, 0, 5 * CS) == orig[:5 * CS]  # the rest is served
    if policy != "stop":
        with pytest.raises(OSError) as ei:
            read(dev, loop, 5 * CS, 10)
        assert ei.value.errno == errno.EIO
    else:
        assert read(dev, loop) == orig


def test_cancel_keeps_serving_on_demand(loop):
    snap = snapshot_image(12, set())
    src = FaultDev(snap, delay=0.001)
    tgt = MemoryDev(SIZE)
    dev = loop.run_until_complete(build_restore(src, tgt, cluster_size=CS, state_dir=None,
                                                identity="A", fresh_target=False))
    eng = Engine(MemoryExportTable())
    events = []
    job = RestoreJob("r", device="d", dev=dev, emit=lambda n, d: events.append(n), max_workers=1)
    register_job(eng, job)

    async def go():
        job.start()
        await asyncio.sleep(0.003)
        eng.job_cancel("r")
        await job.wait()

    loop.run_until_complete(go())
    q = eng.query_jobs()[0]
    assert q["status"] == "concluded" and "Operation canceled" in q["error"] and not q["complete"]
    assert "BLOCK_JOB_CANCELLED" in events and not dev.state.inflight
    assert read(dev, loop) == read(snap, loop)  # the rest fetched on demand
    assert dev.state.complete  # ... which restored it all
    loop.run_until_complete(eng.job_dismiss("r"))
    assert not eng.jobs
