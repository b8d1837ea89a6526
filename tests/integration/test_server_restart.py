"""A graceful shutdown leaves unstarted requests unanswered (hunt 11), in process.

``serve`` restarted by SIGTERM (systemd on upgrade) while a QEMU with
``reconnect-delay`` writes: QEMU resends what was not answered to the next
server, but fails to its guest what was answered with an error.  Before,
requests that arrived after the shutdown began got ESHUTDOWN (qemu-io:
"Cannot send after transport endpoint shutdown"; writes lost).  Now the
server stops reading, answers only what it had started (invariant 2: a
started WRITE completes and is acknowledged, then flushed), and closes.
"""

from __future__ import annotations

import asyncio

from nbdbackup.blockdev.memory import MemoryDev
from nbdbackup.nbd.server import Server

from test_server_batch import FLUSH, READ, WRITE, Raw, req, run

MiB = 1 << 20


class SlowDev(MemoryDev):
    """Every WRITE takes ``delay`` s (never done at once: the task path)."""

    delay = 0.4

    def pwrite_now(self, buf, offset, fua=False) -> bool:
        return False

    async def pwrite(self, buf, offset, *, fua=False) -> None:
        await asyncio.sleep(self.delay)
        await super().pwrite(buf, offset, fua=fua)


def test_requests_after_shutdown_began_are_left_unanswered(short_tmp):
    async def main():
        dev = SlowDev(4 * MiB)
        server = Server(workers=0)
        server.add_export("disk", dev)
        path = str(short_tmp / "s")
        await server.start_unix(path)
        c = await Raw.connect(path, "disk", True)
        c.send(req(WRITE, 1, 0, 4096, b"\x11" * 4096))
        await asyncio.sleep(0.1)  # WRITE 1 runs
        stop = asyncio.create_task(server.shutdown())
        await asyncio.sleep(0.05)
        # Sent after the shutdown began: not started, never answered.
        c.send(req(WRITE, 2, 4096, 4096, b"\x22" * 4096) + c.read(3, 0, 4096) + req(FLUSH, 4, 0, 0))
        replies = {}
        try:
            while True:
                cookie, err, _ = await asyncio.wait_for(c.reply(), 5)
                replies[cookie] = err
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        await stop
        assert replies == {1: 0}, replies  # the started WRITE answered, nothing else
        buf = bytearray(8192)
        await MemoryDev.pread(dev, buf, 0)
        assert bytes(buf[:4096]) == b"\x11" * 4096  # acknowledged: done
        assert bytes(buf[4096:]) == bytes(4096)  # unanswered: not done (the client resends it)

    run(main())
