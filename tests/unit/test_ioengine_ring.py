"""Bookkeeping of the io_uring engine (`blockdev.ioengine.UringEngine`)
without a kernel ring: a scripted fake `Ring` records the SQEs prepared and
returns the completions a test chooses (short writes, short reads, EAGAIN,
errors), so every branch of `_flush`/`_reap` is driven deterministically.
The real ring is exercised in tests/integration/test_ioengine.py.  Also:
`LiveDev.quiesce` waits for a write handed to an engine (`pwrite_start`).
"""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from nbdbackup.blockdev import ioengine as io
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.memory import MemoryDev


class FakeRing:
    """Records prepared SQEs; `complete` queues CQEs for the next reap."""

    def __init__(self, sq_entries: int = 4, cq_entries: int = 8) -> None:
        self.sq_entries, self.cq_entries = sq_entries, cq_entries
        self.prepared: list[tuple] = []
        self.unsubmitted = 0
        self.submits: list[int] = []
        self.cqes: list[tuple[int, int]] = []
        self.fail_next_submit: int | None = None

    def sq_space(self) -> int:
        return self.sq_entries - self.unsubmitted

    def prep(self, opcode, sqe_flags, fd, off, addr, length, op_flags, user_data) -> None:
        self.prepared.append((opcode, sqe_flags, fd, off, addr, length, op_flags, user_data))
        self.unsubmitted += 1

    def submit(self, n: int, wait: int = 0) -> int:
        if self.fail_next_submit is not None:
            e, self.fail_next_submit = self.fail_next_submit, None
            self.unsubmitted = 0
            raise OSError(e, os.strerror(e))
        self.submits.append(n)
        self.unsubmitted = 0
        return n

    def reap(self):
        out, self.cqes = self.cqes, []
        return out

    def complete(self, ud: int, res: int) -> None:
        self.cqes.append((ud, res))


def make_engine(loop, ring=None) -> io.UringEngine:
    eng = object.__new__(io.UringEngine)
    io.Engine.__init__(eng, loop)
    eng.ring = ring or FakeRing()
    eng._inflight = {}
    eng._next_ud = 1
    eng._unsubmitted = 0
    eng.async_min = 64 * 1024
    eng._limit = min(eng.ring.cq_entries, 2 * eng.ring.sq_entries)
    eng.efd = -1
    return eng


def run(coro_fn):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro_fn(loop))
    finally:
        loop.close()


async def settle(loop, n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_one_enter_per_loop_iteration_and_async_flag_for_large_ops():
    async def main(loop):
        eng = make_engine(loop, FakeRing(sq_entries=64, cq_entries=128))
        done = []
        bufs = [bytearray(4096) for _ in range(10)] + [bytearray(128 * 1024)]
        for i, b in enumerate(bufs):
            eng.write(3, b, i * 4096, 0, done.append)
        eng.fsync(3, done.append)
        assert eng.ring.prepared == []  # nothing before the loop iterates
        await settle(loop, 1)
        assert eng.ring.submits == [12] and eng.batches == 1
        p = eng.ring.prepared
        assert [x[0] for x in p] == [io._OP_WRITE] * 11 + [io._OP_FSYNC]
        assert [x[1] & io._IOSQE_ASYNC for x in p] == [0] * 10 + [io._IOSQE_ASYNC] * 2
        assert p[-1][6] == io._FSYNC_DATASYNC
        assert p[3][3] == 3 * 4096 and p[3][5] == 4096
        for x in p:
            eng.ring.complete(x[7], x[5] if x[0] == io._OP_WRITE else 0)
        eng._reap()
        assert done == [0] * 12 and eng._inflight == {}

    run(main)


def test_short_write_resubmits_the_rest_at_the_right_address_and_offset():
    async def main(loop):
        eng = make_engine(loop)
        buf = bytearray(10000)
        done = []
        eng.write(5, buf, 1000, 2, done.append)
        await settle(loop, 1)
        (op, _f, fd, off, addr, length, flags, ud), = eng.ring.prepared
        assert (fd, off, length, flags) == (5, 1000, 10000, 2)
        eng.ring.complete(ud, 4096)
        eng._reap()
        assert done == []
        await settle(loop, 1)
        op2 = eng.ring.prepared[1]
        assert op2[3] == 1000 + 4096 and op2[4] == addr + 4096 and op2[5] == 10000 - 4096
        assert op2[6] == 2  # RWF_DSYNC kept for the rest
        eng.ring.complete(op2[7], 10000 - 4096)
        eng._reap()
        assert done == [0]

    run(main)


def test_short_read_then_eof_fills_zeroes():
    async def main(loop):
        eng = make_engine(loop)
        buf = bytearray(b"x" * 8192)
        done = []
        eng.read(5, buf, 0, done.append)
        await settle(loop, 1)
        ud = eng.ring.prepared[0][7]
        eng.ring.complete(ud, 6000)
        eng._reap()
        await settle(loop, 1)
        second = eng.ring.prepared[1]
        assert second[3] == 6000 and second[5] == 8192 - 6000
        eng.ring.complete(second[7], 0)
        eng._reap()
        assert done == [0]
        assert buf[:6000] == b"x" * 6000 and buf[6000:] == bytes(8192 - 6000)

    run(main)


@pytest.mark.parametrize("res,expect", [(-errno.EBADF, errno.EBADF), (-errno.EINVAL, errno.EINVAL),
                                        (-errno.ENOSPC, errno.ENOSPC), (-errno.EIO, errno.EIO)])
def test_errors_complete_with_their_errno(res, expect):
    async def main(loop):
        eng = make_engine(loop)
        done = []
        eng.write(5, bytearray(512), 0, 0, done.append)
        await settle(loop, 1)
        eng.ring.complete(eng.ring.prepared[0][7], res)
        eng._reap()
        assert done == [expect]

    run(main)


def test_eagain_and_eintr_are_retried_and_a_zero_write_is_eio():
    async def main(loop):
        eng = make_engine(loop)
        done = []
        eng.write(5, bytearray(512), 0, 0, done.append)
        await settle(loop, 1)
        eng.ring.complete(eng.ring.prepared[0][7], -errno.EAGAIN)
        eng._reap()
        await settle(loop, 1)
        eng.ring.complete(eng.ring.prepared[1][7], -errno.EINTR)
        eng._reap()
        await settle(loop, 1)
        eng.ring.complete(eng.ring.prepared[2][7], 0)
        eng._reap()
        assert done == [errno.EIO] and len(eng.ring.prepared) == 3

    run(main)


def test_inflight_is_bounded_by_the_completion_queue():
    async def main(loop):
        eng = make_engine(loop, FakeRing(sq_entries=4, cq_entries=8))
        done = []
        for i in range(20):
            eng.write(5, bytearray(512), i * 512, 0, done.append)
        await settle(loop, 1)
        assert len(eng._inflight) == 8 and len(eng._pending) == 12
        assert eng.ring.submits == [4, 4]  # the SQ holds 4 at a time
        for x in list(eng.ring.prepared):
            eng.ring.complete(x[7], 512)
        eng._reap()
        await settle(loop, 1)
        assert len(eng._inflight) == 8 and len(done) == 8
        while eng._inflight:
            for ud in list(eng._inflight):
                eng.ring.complete(ud, 512)
            eng._reap()
            await settle(loop, 1)
        assert done == [0] * 20 and not eng._pending

    run(main)


def test_busy_kernel_enters_again_with_the_published_sqes():
    async def main(loop):
        eng = make_engine(loop)
        ring = eng.ring
        ring.fail_next_submit = errno.EBUSY
        done = []
        eng.write(5, bytearray(512), 0, 0, done.append)
        await settle(loop, 1)
        assert ring.submits == [] and eng._unsubmitted == 1 and len(eng._inflight) == 1
        await asyncio.sleep(0.02)
        assert ring.submits == [1] and len(ring.prepared) == 1  # not prepared twice
        ring.complete(ring.prepared[0][7], 512)
        eng._reap()
        assert done == [0]

    run(main)


def test_a_broken_ring_fails_every_operation():
    async def main(loop):
        eng = make_engine(loop)
        eng.ring.fail_next_submit = errno.EBADF
        done = []
        for i in range(6):
            eng.write(5, bytearray(512), i * 512, 0, done.append)
        await settle(loop, 1)
        assert sorted(done) == [errno.EBADF] * 6 and not eng._inflight and not eng._pending

    run(main)


def test_buffer_is_pinned_until_completion():
    async def main(loop):
        eng = make_engine(loop)
        buf = bytearray(4096)
        done = []
        eng.write(5, buf, 0, 0, done.append)
        await settle(loop, 1)
        with pytest.raises(BufferError):
            buf.extend(b"x")  # exported to the kernel: cannot move
        eng.ring.complete(eng.ring.prepared[0][7], 4096)
        eng._reap()
        buf.extend(b"x")  # released
        assert done == [0]

    run(main)


def test_read_only_buffers_are_copied_for_writes():
    async def main(loop):
        eng = make_engine(loop)
        done = []
        eng.write(5, b"abc" * 100, 0, 0, done.append)
        await settle(loop, 1)
        assert eng.ring.prepared[0][5] == 300
        eng.ring.complete(eng.ring.prepared[0][7], 300)
        eng._reap()
        assert done == [0]

    run(main)


def test_select_names_and_errors(monkeypatch):
    try:
        assert io.select("sync") == ("sync", "requested")
        assert io.for_loop(asyncio.new_event_loop()) is None
        assert io.select("threads")[0] == "threads"
        with pytest.raises(ValueError):
            io.select("bogus")
        monkeypatch.setattr(io, "probe_io_uring", lambda: "io_uring_setup: EPERM (seccomp)")
        with pytest.raises(OSError) as ei:
            io.select("io_uring")
        assert ei.value.errno == errno.ENOTSUP
        name, why = io.select("auto")
        assert name == "sync" and "io_uring unavailable" in why and "EPERM" in why
        monkeypatch.setenv(io.ENV, "sync")
        assert io.select()[0] == "sync"
        text = io.prometheus_text()
        assert 'nbdbackup_io_engine_info{engine="sync",reason="requested"} 1' in text
    finally:
        io.reset()


class HeldEngineDev(MemoryDev):
    """A memory device whose `pwrite_start` holds each write (as an engine
    with the write in the kernel) until `release` completes them."""

    def __init__(self, size):
        super().__init__(size)
        self.held = []

    def pwrite_now(self, buf, offset, fua=False):
        return False

    def pwrite_start(self, buf, offset, fua, cb):
        self.held.append((bytes(buf), offset, cb))
        return True

    def release(self):
        held, self.held = self.held, []
        for data, off, cb in held:
            assert MemoryDev.pwrite_now(self, data, off)
            cb(0)


def test_quiesce_waits_for_engine_writes_and_holds_new_ones():
    async def main():
        inner = HeldEngineDev(1 << 20)
        live = LiveDev(inner)
        done = []
        assert live.pwrite_start(b"a" * 4096, 0, False, done.append)
        assert live._writing == 1
        entered = asyncio.Event()

        async def attach():
            async with live.quiesce(timeout=5):
                entered.set()
                # While quiesced, no engine write starts (the async path waits at the gate).
                assert not live.pwrite_start(b"b" * 4096, 4096, False, done.append)

        t = asyncio.ensure_future(attach())
        await asyncio.sleep(0.02)
        assert not entered.is_set()  # waits for the engine write in flight
        inner.release()
        await asyncio.wait_for(t, 5)
        assert entered.is_set() and done == [0] and live._writing == 0
        assert live.pwrite_start(b"c" * 4096, 8192, False, done.append)  # gate open again
        inner.release()
        assert done == [0, 0] and live._writing == 0

    asyncio.run(main())
