"""The backup state machine of tests/unit/test_backup_stateful.py on real files.

Same rules and invariants (the snapshot reads as the original image, the live
disk as the model, the target holds exactly the sync set, the scratch only
original content, within its limit), but the live disk, target and scratch
are `FileDev`s in a temp dir, and every live write first tries the
task-free path the server takes (`LiveDev.pwrite_now` / ``zero_now`` /
``trim_now``).  With plain files at both ends that path copies small spans
itself (`CopyState.protect_sync`: ``copy_file_range`` on the loop, no claim,
per-run marks), interleaved with the async copy-before-writes, the pump's
claims and snapshot reads the `FaultDev` wrappers delay -- the paths the
memory machine never reaches.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit"))

import test_backup_stateful as base  # noqa: E402  (the memory machine)

from nbdbackup.blockdev.file import FileDev  # noqa: E402


class SyncFileDev(FileDev):
    """A `FileDev` with the `MemoryDev` test helpers the machine uses."""

    def read_sync(self, buf: memoryview, offset: int) -> None:
        self._preadv_all(buf, offset)

    def write_sync(self, buf, offset: int) -> None:
        self._pwritev_all(memoryview(buf).cast("B"), offset, 0)


class FileBackupMachine(base.BackupMachine):
    @initialize(sync=st.sampled_from(["full", "top", "none", "bitmap"]), seed=st.integers(0, 2**32 - 1),
                workers=st.integers(1, 4), chunk=st.sampled_from([base.CS, 2 * base.CS, 5 * base.CS]),
                pages=st.sets(st.integers(0, 3)), speed=st.sampled_from([0, 1]),
                discard_source=st.booleans(), limit=st.sampled_from([None, None, 2 * base.CS, 5 * base.CS]))
    def setup(self, sync, seed, workers, chunk, pages, speed, discard_source, limit):
        self.dir = tempfile.mkdtemp(prefix="bk-files-")
        n = [0]

        def new_dev(size: int) -> SyncFileDev:
            n[0] += 1
            return SyncFileDev(os.path.join(self.dir, f"f{n[0]}.raw"), create_size=size)

        orig_memdev = base.MemoryDev
        base.MemoryDev = new_dev  # setup builds its three devices through this name
        try:
            super().setup(sync, seed, workers, chunk, pages, speed, discard_source, limit)
        finally:
            base.MemoryDev = orig_memdev
        self.sync_writes = 0

    @rule(data=st.data(), kind=st.sampled_from(["write", "write", "zero", "trim"]),
          spin=st.integers(0, 3))
    def start_write(self, data, kind, spin):
        off = data.draw(st.integers(0, base.SIZE - 1), label="offset")
        n = data.draw(st.integers(1, min(3 * base.CS + 7, base.SIZE - off)), label="length")
        for t, o, k, _ in self.pending:
            if o < off + n and off < o + k:
                self.run(t)
        self._reap()
        buf = self.rng.randbytes(n) if kind == "write" else bytes(n)
        # The server's task-free path first (it may copy-before-write itself).
        if kind == "write":
            now = self.live.pwrite_now(buf, off)
        elif kind == "zero":
            now = self.live.zero_now(off, n)
        else:
            now = self.live.trim_now(off, n)
        if now:
            self.sync_writes += 1
            self.model[off:off + n] = buf
            return
        if kind == "write":
            coro = self.live.pwrite(buf, off)
        elif kind == "zero":
            coro = self.live.zero(off, n)
        else:
            coro = self.live.trim(off, n)
        self.pending.append((self.loop.create_task(coro), off, n, buf))
        self.run(self._spin(spin))
        self._reap()

    # File I/O that goes to threads (fdatasync, cache-missing reads) makes
    # "is a write still pending", "is the job still running" depend on
    # timing, which hypothesis cannot replay: the memory machine's rules
    # with those preconditions become no-ops when they do not apply, and
    # draw the same data whatever the state.

    @rule(data=st.data())
    def await_write(self, data):
        i = data.draw(st.integers(0, 7), label="which")
        if self.pending:
            self.run(self.pending[i % len(self.pending)][0])
            self._reap()

    def _status(self) -> str | None:
        return None if self.job is None else self.job.status.value

    @rule()
    def pause(self):
        if self._status() == "running":
            self.engine.job_pause("j")

    @rule()
    def resume(self):
        if self._status() == "paused":
            self.engine.job_resume("j")

    @rule(speed=st.sampled_from([0, 1]))
    def set_speed(self, speed):
        if self._status() in ("running", "paused"):
            self.engine.job_set_speed("j", speed)

    def teardown(self):
        try:
            super().teardown()
        finally:
            for dev in (getattr(self, "mem", None), getattr(self, "tmem", None), getattr(self, "smem", None)):
                if dev is not None and dev.fd >= 0:
                    try:
                        os.close(dev.fd)
                    except OSError:
                        pass
                    dev.fd = -1
            shutil.rmtree(self.dir, ignore_errors=True)


FileBackupMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("NBDBACKUP_STATEFUL_FILE_EXAMPLES", "80")), stateful_step_count=30,
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestFileBackupMachine = FileBackupMachine.TestCase


def test_the_sync_path_is_taken(tmp_path):
    """Not vacuous: with files at both ends, a small live write into an
    uncopied cluster is copied and written without a task."""
    import asyncio

    from nbdbackup.backup.cbw import CBWHook
    from nbdbackup.backup.copystate import CopyState
    from nbdbackup.blockdev.live import LiveDev

    async def main() -> None:
        cs = 65536
        src = FileDev(str(tmp_path / "s.raw"), create_size=8 * cs)
        # With the io_uring or threads engine (NBDBACKUP_IO_ENGINE) writes over
        # 16 KiB go to the engine, not inline: this test is about the inline path.
        src.engine_inline_max = 1 << 20
        data = random.Random(1).randbytes(8 * cs)
        os.pwrite(src.fd, data[cs:], cs)  # cluster 0 stays a hole
        tgt = FileDev(str(tmp_path / "t.raw"), create_size=8 * cs)
        live = LiveDev(src)
        state = CopyState(live, tgt, cs, scratch=tgt)
        live.add_hook(CBWHook(state))
        # One write over clusters 0-2 (0 a source hole) with cluster 1 done meanwhile.
        assert live.pwrite_now(b"\x01" * 4096, cs + 100)
        assert state.done.get(1) and state.in_scratch.get(1)
        assert live.pwrite_now(b"\x02" * (2 * cs), 100)
        assert [state.done.get(c) for c in range(4)] == [True, True, True, False]
        assert state.zeroed.get(0) and state.in_scratch.get(2) and not state.in_scratch.get(0)
        assert os.pread(tgt.fd, 2 * cs, cs) == data[cs:3 * cs]  # the point-in-time content
        assert state.bytes_copied_by_cbw == 2 * cs and state.clusters_zero_in_snapshot == 1
        assert state.scratch_bytes == 2 * cs
        # A snapshot read in progress on cluster 5: no sync path, the async one waits.
        segs = state.begin_read(5 * cs, 10)
        assert not live.pwrite_now(b"\x03", 5 * cs)
        state.end_read(segs)
        # A copy in flight on cluster 6 (the pump's claim): no sync path either.
        claimed = state.claim(6, 7, 1)
        assert claimed == (6, 1) and not live.pwrite_now(b"\x04", 6 * cs)
        await state.copy(6, 1, "pump")
        assert live.pwrite_now(b"\x04", 6 * cs)
        # The scratch limit is the async path's to report.
        state.scratch_limit = state.scratch_bytes
        assert not live.pwrite_now(b"\x05", 7 * cs) and not state.done.get(7)
        await live.close()
        await tgt.close()

    asyncio.run(main())


import errno  # noqa: E402

import pytest  # noqa: E402


@pytest.mark.parametrize("policy", ["break-guest-write", "break-snapshot"])
def test_a_failure_in_the_middle_of_a_sync_copy(tmp_path, monkeypatch, policy):
    """A write over clusters 0-2 with 1 already done: two runs.  The second
    run's copy_file_range fails (and so does the read/write fallback of the
    async path): the first run stays copied and valid, the second is not
    done, and ``on-cbw-error`` applies as for any copy-before-write error."""
    import asyncio

    from nbdbackup.backup import copystate
    from nbdbackup.backup.cbw import CBWHook
    from nbdbackup.backup.copystate import CopyState
    from nbdbackup.backup.testing import Fault, FaultDev
    from nbdbackup.blockdev.live import LiveDev

    cs = 65536
    real = copystate._copy_range

    def failing(sfd, dfd, offset, length):
        if offset <= 2 * cs < offset + length:
            raise OSError(errno.EIO, "injected copy_file_range failure")
        real(sfd, dfd, offset, length)

    async def main() -> None:
        src = FileDev(str(tmp_path / "s.raw"), create_size=4 * cs)
        data = random.Random(2).randbytes(4 * cs)
        os.pwrite(src.fd, data, 0)
        faulty = FaultDev(src)
        faulty.faults.append(Fault("read", 2 * cs, cs))  # the fallback's read fails too
        tgt = FileDev(str(tmp_path / "t.raw"), create_size=4 * cs)
        live = LiveDev(faulty)
        state = CopyState(live, tgt, cs, scratch=tgt)
        broke: list[OSError] = []
        hook = CBWHook(state, on_cbw_error=policy, on_break=broke.append)
        live.add_hook(hook)
        # (FaultDev's writes are not task-free: ask the hook, as LiveDev.pwrite_now does.)
        assert hook.before_write_now(cs, 10)  # cluster 1 copied first
        monkeypatch.setattr(copystate, "_copy_range", failing)
        new = b"\x02" * (3 * cs)
        assert not hook.before_write_now(0, len(new))  # the sync path gave up after run 1
        assert state.done.get(0) and state.in_scratch.get(0) and not state.done.get(2)
        assert os.pread(tgt.fd, cs, 0) == data[:cs]
        if policy == "break-guest-write":
            with pytest.raises(OSError) as ei:
                await live.pwrite(new, 0)
            assert ei.value.errno == errno.EIO and hook.errors == 1
            assert not state.done.get(2) and state.broken is None and not state.inflight
            # The disk is unchanged over the failed cluster; the snapshot still reads the original.
            assert os.pread(src.fd, cs, 2 * cs) == data[2 * cs:3 * cs]
            faulty.faults.clear()
            monkeypatch.setattr(copystate, "_copy_range", real)
            await live.pwrite(new, 0)  # retried: now copied, then written
            assert state.done.get(2) and os.pread(tgt.fd, cs, 2 * cs) == data[2 * cs:3 * cs]
        else:
            await live.pwrite(new, 0)  # the guest write goes on; the snapshot is broken
            assert state.broken is not None and broke and hook.errors == 1
        assert os.pread(src.fd, 3 * cs, 0) == new
        await live.close()
        await tgt.close()

    asyncio.run(main())
