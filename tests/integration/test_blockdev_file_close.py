"""`FileDev.close` waits for its pool jobs that outlived their awaiters.

A large write (above ``inline_limit``) runs on the thread pool; cancelling
the task awaiting it does not stop the thread.  Closing the descriptor under
it would let the number be reused by another open file, which the late
``pwritev`` would then write into (docs/hunt3.md, left open there)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from nbdbackup.blockdev.file import FileDev


def test_close_waits_for_a_cancelled_writes_thread(tmp_path):
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.truncate(4 << 20)

    async def main():
        dev = FileDev(path, inline_limit=4096)
        started, release = threading.Event(), threading.Event()
        seen: list[bool] = []
        real = dev._pwritev_all

        def slow(*args):
            started.set()
            release.wait(5)
            # the descriptor must still be ours when the late write happens
            seen.append(dev.fd >= 0)
            return real(*args)

        dev._pwritev_all = slow
        task = asyncio.ensure_future(dev.pwrite(b"x" * 65536, 0))
        while not started.is_set():
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(dev.close())
        await asyncio.sleep(0.05)
        assert not closing.done()  # waits for the job still running
        release.set()
        await asyncio.wait_for(closing, 5)
        assert seen == [True]
        assert dev.fd == -1
        assert task.cancelled()

    asyncio.run(main())
    with open(path, "rb") as f:
        assert f.read(65536) == b"x" * 65536  # the late write landed in its own file


@pytest.mark.parametrize("what", ["pwrite_start", "cancelled pwrite"])
@pytest.mark.parametrize("kind", ["io_uring", "threads"])
def test_close_waits_for_engine_operations_still_queued(kind, what, tmp_path):
    """Hunt 7 (docs/hunt7.md): the same for operations handed to the loop's
    I/O engine (``serve --io-engine io_uring|threads``).  A WRITE handed over
    by `pwrite_start` (the server's engine path) and a large `pwrite` whose
    awaiting task was cancelled sit in the engine's queue until the next
    submission, naming the descriptor by number; `close` closed it at once,
    and the file opened next under the same number received both writes."""
    from nbdbackup.blockdev import ioengine as io

    why_not = io.probe_io_uring()
    if kind == "io_uring" and why_not:
        pytest.skip(f"io_uring unavailable here: {why_not}")
    a, b = str(tmp_path / "a.raw"), str(tmp_path / "b.raw")
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(1 << 20)

    async def main():
        io.reset()
        io.select(kind)
        try:
            dev = FileDev(a)
            done: list[int] = []
            if what == "pwrite_start":
                assert dev.pwrite_start(b"X" * 65536, 0, False, done.append)
                task = asyncio.ensure_future(asyncio.sleep(0))
            else:
                done.append(0)
                task = asyncio.ensure_future(dev.pwrite(b"Y" * 65536, 65536))
                await asyncio.sleep(0)
                task.cancel()
            await dev.close()
            fd = os.open(b, os.O_RDWR)  # most likely the number just freed
            try:
                for _ in range(50):
                    if done and task.done():
                        break
                    await asyncio.sleep(0.01)
            finally:
                os.close(fd)
            assert done == [0]
        finally:
            io.reset()

    asyncio.run(main())
    with open(b, "rb") as f:
        assert f.read(131072) == bytes(131072), "a write of a closed FileDev landed in another file"
    with open(a, "rb") as f:
        got = f.read(131072)
    if what == "pwrite_start":
        assert got[:65536] == b"X" * 65536
    else:
        assert got[65536:] in (b"Y" * 65536, bytes(65536))  # the cancelled write may or may not have run
