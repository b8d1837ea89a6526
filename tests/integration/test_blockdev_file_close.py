"""`FileDev.close` waits for its pool jobs that outlived their awaiters.

A large write (above ``inline_limit``) runs on the thread pool; cancelling
the task awaiting it does not stop the thread.  Closing the descriptor under
it would let the number be reused by another open file, which the late
``pwritev`` would then write into (docs/hunt3.md, left open there)."""

from __future__ import annotations

import asyncio
import os
import threading

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
