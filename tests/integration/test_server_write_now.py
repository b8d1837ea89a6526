"""The server's task-free WRITE path, through our client against our server
(in process, on a Unix socket).

Checks that a small WRITE takes the synchronous path only when the device
allows it, that it is as visible (read-your-writes), counted (stats) and
flushed as a WRITE on the task path, that a hook that must wait sends every
write through the task path, and that removing the export waits for writes
on either path.
"""

from __future__ import annotations

import asyncio

from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.memory import MemoryDev
from nbdbackup.nbd.client import connect
from nbdbackup.nbd.server import Server
from nbdbackup.nbd.wire import Cmd

SIZE = 1 << 20


class Counting(MemoryDev):
    """Counts which path each write took and each flush."""

    def __init__(self, size):
        super().__init__(size)
        self.now = self.slow = self.flushes = 0

    def pwrite_now(self, buf, offset, fua=False):
        if not super().pwrite_now(buf, offset, fua):
            return False
        self.now += 1
        return True

    def zero_now(self, offset, length, **kw):
        self.now += 1
        return super().zero_now(offset, length, **kw)

    def trim_now(self, offset, length, **kw):
        self.now += 1
        return super().trim_now(offset, length, **kw)

    async def pwrite(self, buf, offset, *, fua=False):
        self.slow += 1
        await super().pwrite(buf, offset, fua=fua)

    async def flush(self):
        self.flushes += 1


class Slow:
    """A hook that must wait (like copy-before-write of an uncopied cluster)."""

    def __init__(self):
        self.calls = 0

    async def before_write(self, offset, length):
        self.calls += 1
        await asyncio.sleep(0.001)

    async def on_durable(self):
        pass

    def before_write_now(self, offset, length):
        return False


async def _serve(short_tmp, dev):
    server = Server()
    exp = server.add_export("disk", dev)
    path = str(short_tmp / "s")
    await server.start_unix(path)
    return server, exp, f"nbd+unix:///disk?socket={path}"


def test_small_writes_are_task_free_visible_counted_and_flushed(short_tmp):
    async def main():
        mem = Counting(SIZE)
        server, exp, uri = await _serve(short_tmp, LiveDev(mem))
        try:
            async with await connect(uri) as c:
                blocks = [bytes([i]) * 4096 for i in range(64)]
                await asyncio.gather(*(c.pwrite(b, i * 4096) for i, b in enumerate(blocks)))
                assert mem.now == 64 and mem.slow == 0
                for i, b in enumerate(blocks):
                    assert await c.pread(4096, i * 4096) == b
                await c.flush()
                assert mem.flushes == 1
                await c.pwrite(b"f" * 512, 0, fua=True)  # MemoryDev: FUA is free, still task-free
                assert mem.now == 65
                await c.zero(4096, 4096)
                await c.trim(8192, 4096)
                assert mem.now == 67 and mem.slow == 0
                assert await c.pread(3 * 4096, 4096) == bytes(8192) + blocks[3]
            st = exp.stats
            assert st.ops[Cmd.WRITE] == 65 and st.failed[Cmd.WRITE] == 0
            assert st.bytes[Cmd.WRITE] == 64 * 4096 + 512
            assert st.ops[Cmd.WRITE_ZEROES] == 1 and st.ops[Cmd.TRIM] == 1
            assert exp.inflight == 0
        finally:
            await server.shutdown()

    asyncio.run(main())


def test_a_hook_that_must_wait_sends_writes_through_tasks(short_tmp):
    async def main():
        mem = Counting(SIZE)
        live = LiveDev(mem)
        hook = Slow()
        live.add_hook(hook)
        server, exp, uri = await _serve(short_tmp, live)
        try:
            async with await connect(uri) as c:
                await asyncio.gather(*(c.pwrite(b"s" * 4096, i * 4096) for i in range(16)))
                assert mem.now == 0 and mem.slow == 16 and hook.calls == 16
                assert await c.pread(4096, 15 * 4096) == b"s" * 4096
                live.remove_hook(hook)
                await c.pwrite(b"t" * 4096, 0)
                assert mem.now == 1 and hook.calls == 16
            assert exp.stats.ops[Cmd.WRITE] == 17
        finally:
            await server.shutdown()

    asyncio.run(main())


def test_remove_export_waits_for_writes_then_refuses(short_tmp):
    async def main():
        mem = Counting(SIZE)
        live = LiveDev(mem)
        hook = Slow()
        live.add_hook(hook)
        server, exp, uri = await _serve(short_tmp, live)
        try:
            async with await connect(uri) as c:
                slow = [asyncio.ensure_future(c.pwrite(b"r" * 4096, i * 4096)) for i in range(8)]
                await asyncio.sleep(0)
                while exp.inflight == 0 and not all(f.done() for f in slow):
                    await asyncio.sleep(0.0005)
                await server.remove_export("disk")  # waits for the task-path writes
                assert exp.inflight == 0
                results = await asyncio.gather(*slow, return_exceptions=True)
                done = [r for r in results if r is None]
                for i, r in enumerate(results):
                    if r is None:
                        assert mem.pages[0][i * 4096:(i + 1) * 4096] == b"r" * 4096
                assert done  # at least the ones running when removal began finished
                live.remove_hook(hook)
                try:
                    await c.pwrite(b"x" * 4096, 0)
                except OSError as e:
                    assert "shut" in str(e).lower() or e.errno is not None
                else:
                    raise AssertionError("a write after remove_export succeeded")
                assert mem.now == 0
        finally:
            await server.shutdown()

    asyncio.run(main())
