"""Hypothesis state machine: random interleavings of live writes, snapshot reads,
the pump, pause/resume and speed changes, on memory devices.

Invariants after every step: the snapshot export reads as the original image
(except clusters TRIMmed on the snapshot, which fail with EACCES); the live
disk reads as the model (bytes under writes still in flight are not
compared: they may or may not have landed).  At the end: the target holds
exactly the sync set (full: everything; top: the allocated pages; bitmap: a
random set) with the original content and zeros elsewhere; every cluster
the scratch holds has its original content there (none: the target is the
scratch).  Jobs with a scratch run with ``discard-source`` on or off, and
some with a ``scratch-limit`` (break-guest-write: a live write that would
pass it fails with EIO and changes nothing; the scratch never holds more).

Live writes started by `start_write` never overlap another write in flight
(an overlapping one first waits for those), so the model is exact.
"""

from __future__ import annotations

import asyncio
import errno
import random

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.backup.testing import FaultDev
from nbdbackup.bitmap.core import Bitmap
from nbdbackup.blockdev.memory import PAGE, MemoryDev

CS = 4096
SIZE = 3 * PAGE + 5 * CS + 1234  # partial last cluster; 4 allocation pages


class RandomSet:
    """A `BitmapSource` whose frozen bitmap is a random set of clusters."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def begin_backup(self, export, name, mode, cluster_size, nclusters):
        bm = Bitmap(nclusters)
        for c in range(nclusters):
            if self.rng.random() < 0.5:
                bm.set(c)
        return type("Lease", (), {"clusters": bm, "context": None, "end": lambda self, ok: None})()


def read_all(dev: MemoryDev) -> bytes:
    b = bytearray(dev.size)
    dev.read_sync(memoryview(b), 0)
    return bytes(b)


class BackupMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.pending: list[tuple[asyncio.Task, int, int, bytes]] = []
        self.job = None

    @initialize(sync=st.sampled_from(["full", "top", "none", "bitmap"]), seed=st.integers(0, 2**32 - 1),
                workers=st.integers(1, 4), chunk=st.sampled_from([CS, 2 * CS, 5 * CS]),
                pages=st.sets(st.integers(0, 3)), speed=st.sampled_from([0, 1]),
                discard_source=st.booleans(), limit=st.sampled_from([None, None, 2 * CS, 5 * CS]))
    def setup(self, sync, seed, workers, chunk, pages, speed, discard_source, limit):
        rng = random.Random(seed)
        self.rng = rng
        self.sync = sync
        self.discard_source = discard_source and sync in ("top", "bitmap")
        self.mem = MemoryDev(SIZE)
        for p in pages:  # allocated pages with data, some zero clusters inside
            n = min(PAGE, SIZE - p * PAGE)
            data = bytearray(rng.randbytes(n))
            data[CS:2 * CS] = bytes(CS)
            self.mem.write_sync(data, p * PAGE)
        self.orig = read_all(self.mem)
        self.model = bytearray(self.orig)
        self.src = FaultDev(self.mem, rng=random.Random(seed + 1), max_yields=6)
        self.live = LiveDev(self.src)
        self.table = MemoryExportTable()
        self.table.add("disk", self.live, read_only=False)
        self.engine = Engine(self.table, bitmaps=RandomSet(random.Random(seed + 3)))
        self.tmem = MemoryDev(SIZE)
        self.tgt = FaultDev(self.tmem, rng=random.Random(seed + 2))
        self.smem = self.tmem if sync == "none" else MemoryDev(SIZE)
        extra: dict = {}
        if sync in ("top", "bitmap"):
            extra = dict(scratch=FaultDev(self.smem, rng=random.Random(seed + 4)), discard_source=discard_source)
        if sync != "full" and limit is not None:
            # break-guest-write: a write whose copy would pass the limit fails
            # with EIO and changes nothing (the model is not updated).
            extra["scratch_limit"] = limit
        self.limit = extra.get("scratch_limit")
        if sync == "bitmap":
            extra.update(bitmap="b", bitmap_mode="never")
        self.run(self.engine.backup_start("disk", "j", sync, self.tgt, snapshot="snap",
                                          cluster_size=CS, max_workers=workers, max_chunk=chunk,
                                          speed=speed, snapshot_trim=True, **extra))
        self.job = self.engine.jobs["j"]
        self.snap = self.table.get("snap").dev
        st_ = self.job.state
        self.sync_set = st_.pump_todo.copy()  # plus what the pump already copied
        self.sync_set.merge(st_.in_target)
        self.trimmed: set[int] = set()
        self.nclusters = st_.nclusters

    # -- plumbing ---------------------------------------------------------

    def run(self, coro):
        return self.loop.run_until_complete(asyncio.wait_for(coro, 10))

    async def _spin(self, n: int) -> None:
        for _ in range(n):
            await asyncio.sleep(0)

    def _reap(self) -> None:
        still = []
        for t, off, n, data in self.pending:
            if t.done():
                e = t.exception()
                if e is not None:  # only the scratch limit may fail a live write
                    assert self.limit is not None and isinstance(e, OSError) and e.errno == errno.EIO, e
                    assert "scratch-limit" in str(e), e
                    continue
                self.model[off:off + n] = data
            else:
                still.append((t, off, n, data))
        self.pending = still

    # -- rules --------------------------------------------------------------

    @rule(data=st.data(), kind=st.sampled_from(["write", "write", "zero", "trim"]),
          spin=st.integers(0, 3))
    def start_write(self, data, kind, spin):
        off = data.draw(st.integers(0, SIZE - 1), label="offset")
        n = data.draw(st.integers(1, min(3 * CS + 7, SIZE - off)), label="length")
        # Never two overlapping writes in flight: wait for those first.
        for t, o, k, _ in self.pending:
            if o < off + n and off < o + k:
                self.run(t)
        self._reap()
        if kind == "write":
            buf = self.rng.randbytes(n)
            coro = self.live.pwrite(buf, off)
        elif kind == "zero":
            buf = bytes(n)
            coro = self.live.zero(off, n, may_trim=self.rng.random() < 0.5)
        else:
            buf = bytes(n)  # MemoryDev trims to zeroes
            coro = self.live.trim(off, n)
        task = self.loop.create_task(coro)
        self.pending.append((task, off, n, buf))
        self.run(self._spin(spin))
        self._reap()

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def await_write(self, data):
        i = data.draw(st.integers(0, len(self.pending) - 1))
        self.run(self.pending[i][0])
        self._reap()

    def _hits_trimmed(self, off: int, n: int) -> bool:
        return any(c in self.trimmed for c in range(off // CS, (off + n - 1) // CS + 1))

    def _snap_read(self, off: int, n: int) -> None:
        """Read the snapshot: the original bytes, or EACCES over a trimmed cluster."""
        buf = bytearray(n)
        if self._hits_trimmed(off, n):
            assert not self.snap.pread_now(memoryview(buf), off)  # the task path reports EACCES
            try:
                self.run(self.snap.pread(memoryview(buf), off))
            except OSError as e:
                assert e.errno == errno.EACCES, e
            else:
                raise AssertionError("a read of a trimmed cluster succeeded")
            return
        # The server's task-free READ path first (devices with the bytes at hand).
        if self.snap.pread_now(memoryview(buf), off):
            assert bytes(buf) == self.orig[off:off + n]
            buf = bytearray(n)
        self.run(self.snap.pread(memoryview(buf), off))
        assert bytes(buf) == self.orig[off:off + n]
        # Block status without a task (taken before anything else runs): it
        # covers the range, and what it calls zero reads as zero.
        now = self.snap.extents_now(off, n)
        if now is not None:
            assert now[0].offset == off and sum(e.length for e in now) == n
            for e in now:
                if e.flags & 2:
                    assert self.orig[e.offset:e.offset + e.length] == bytes(e.length)

    @rule(data=st.data())
    def snapshot_read(self, data):
        off = data.draw(st.integers(0, SIZE - 1), label="offset")
        n = data.draw(st.integers(1, min(4 * CS + 3, SIZE - off)), label="length")
        self._snap_read(off, n)
        self._reap()

    @rule(data=st.data())
    def snapshot_trim(self, data):
        """TRIM on the snapshot (rule 8): whole clusters inside the range are dropped."""
        off = data.draw(st.integers(0, SIZE - 1), label="offset")
        n = data.draw(st.integers(1, min(3 * CS + 7, SIZE - off)), label="length")
        self.run(self.snap.trim(off, n))
        first = (off + CS - 1) // CS
        end = self.nclusters if off + n == SIZE else (off + n) // CS
        self.trimmed.update(range(first, end))
        st_ = self.job.state
        for c in range(first, end):
            assert st_.trimmed.get(c)
            if not st_.pump_todo.get(c):
                assert st_.done.get(c) and not st_.in_scratch.get(c)
        self._reap()

    @rule(data=st.data(), lead=st.integers(0, 6), writer_first=st.booleans())
    def read_racing_write(self, data, lead, writer_first):
        """A snapshot read and an overlapping live write started together."""
        off = data.draw(st.integers(0, SIZE - 1), label="offset")
        n = data.draw(st.integers(1, min(2 * CS, SIZE - off)), label="length")
        woff = data.draw(st.integers(max(0, off - CS), min(SIZE - 1, off + n)), label="write offset")
        wn = data.draw(st.integers(1, min(CS + 5, SIZE - woff)), label="write length")
        for t, o, k, _ in self.pending:
            if o < woff + wn and woff < o + k:
                self.run(t)
        self._reap()
        if self._hits_trimmed(off, n):
            return
        buf = bytearray(n)
        wbuf = self.rng.randbytes(wn)

        def start_reader():
            return self.loop.create_task(self.snap.pread(memoryview(buf), off))

        def start_writer():
            self.pending.append((self.loop.create_task(self.live.pwrite(wbuf, woff)), woff, wn, wbuf))

        if writer_first:  # the reader arrives while the writer's CBW is under way
            start_writer()
            self.run(self._spin(lead))
            reader = start_reader()
        else:
            reader = start_reader()
            self.run(self._spin(lead))
            start_writer()
        self.run(reader)
        assert bytes(buf) == self.orig[off:off + n]
        self._reap()

    @rule(spin=st.integers(1, 30))
    def pump_steps(self, spin):
        self.run(self._spin(spin))
        self._reap()

    @precondition(lambda self: self.job is not None and self.job.status.value == "running")
    @rule()
    def pause(self):
        self.engine.job_pause("j")

    @precondition(lambda self: self.job is not None and self.job.status.value == "paused")
    @rule()
    def resume(self):
        self.engine.job_resume("j")

    @precondition(lambda self: self.job is not None and self.job.status.value in ("running", "paused"))
    @rule(speed=st.sampled_from([0, 1]))
    def set_speed(self, speed):
        # Only 0 (unlimited) and 1 B/s (the pump stalls until the next change):
        # a real-time rate would make the interleaving depend on the wall
        # clock, which hypothesis cannot replay.  Rates are tested in
        # test_backup_engine.py.
        self.engine.job_set_speed("j", speed)

    # -- invariants -----------------------------------------------------------

    @invariant()
    def scratch_within_limit(self):
        if self.job is not None and self.limit is not None:
            assert self.job.state.scratch_bytes <= self.limit

    @invariant()
    def snapshot_is_original(self):
        if self.job is None:
            return
        self.assert_snapshot()

    def assert_snapshot(self):
        c = 0
        while c < self.nclusters:  # runs of untrimmed clusters read whole
            e = c
            while e < self.nclusters and e not in self.trimmed:
                e += 1
            if e > c:
                lo, hi = c * CS, min(e * CS, SIZE)
                self._snap_read(lo, hi - lo)
            c = e + 1
        for c in list(self.trimmed)[:3]:
            self._snap_read(c * CS, min(CS, SIZE - c * CS))

    @invariant()
    def live_matches_model(self):
        if self.job is None:
            return
        self._reap()
        inflight = [(off, n) for _, off, n, _ in self.pending]
        buf = bytearray(SIZE)
        self.run(self.live.pread(memoryview(buf), 0))
        self._reap()  # writes that completed meanwhile are in the model now
        got, want = bytearray(buf), bytearray(self.model)
        for off, n in inflight:  # in flight during the read: either value is fine
            got[off:off + n] = bytes(n)
            want[off:off + n] = bytes(n)
        assert got == want

    def teardown(self):
        try:
            if self.job is None:
                return
            if self.pending:  # wait without raising: `_reap` judges each outcome (a limit may fail one)
                self.run(asyncio.wait([t for t, *_ in self.pending]))
            self._reap()
            job = self.job
            if job.status.value == "paused":
                self.engine.job_resume("j")
            if job.status.value in ("running", "paused"):
                self.engine.job_set_speed("j", 0)
            if self.sync == "none":
                self.engine.job_cancel("j")
            self.run(job.wait())
            assert job.status.value == "concluded" and job.error is None, job.error
            self.assert_snapshot()
            assert read_all(self.mem) == bytes(self.model)
            st_ = job.state
            target = read_all(self.tmem)
            scratch = read_all(self.smem)
            if self.sync == "full":
                assert target == self.orig
                assert st_.current == st_.total == SIZE
            held = 0
            for c in range(st_.nclusters):
                lo, hi = c * CS, min((c + 1) * CS, SIZE)
                if self.sync != "none":  # the target holds exactly the sync set
                    want = self.orig[lo:hi] if self.sync_set.get(c) else bytes(hi - lo)
                    assert target[lo:hi] == want, c
                    assert st_.in_target.get(c) == self.sync_set.get(c), c
                if self.sync == "top" and self.orig[lo:hi] != bytes(hi - lo):
                    assert self.sync_set.get(c)  # allocated at start => in the set
                if st_.in_scratch.get(c):
                    held += hi - lo
                    assert scratch[lo:hi] == self.orig[lo:hi], c
                    assert c not in self.trimmed or (self.sync_set.get(c) and self.sync != "none")
                    if self.discard_source and self.sync != "none":
                        assert not self.sync_set.get(c), c  # moved to the target, then discarded
                if st_.zeroed.get(c):
                    assert self.orig[lo:hi] == bytes(hi - lo), c
            assert st_.scratch_bytes == held
            assert st_.pump_todo.count() == 0 and not st_.inflight and not st_.readers
            self.run(self.engine.job_dismiss("j"))
            assert self.live.hooks == () and self.table.get("snap") is None
        finally:
            self.loop.close()


BackupMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestBackupMachine = BackupMachine.TestCase
