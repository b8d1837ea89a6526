"""``block-export-del`` of an export with clients attached (hunt 11), in process.

QEMU's ``block-export-del`` refuses while clients are connected (mode
``safe``, its default) and closes their connections with mode ``hard``.
Before hunt 11 ours removed the export anyway and left the connections open,
answering ESHUTDOWN to every request: an attached VM's disk failed for good
(invariant 2).  Now: safe refuses with the count, the client keeps working;
hard closes the connection (requests in flight answered first), so a
reconnecting client sees a disconnect, never an error reply; with no client,
safe removes the export.  Connections served by worker processes too.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import pytest

from nbdbackup import daemon
from nbdbackup.control.client import CommandError, ControlClient
from nbdbackup.nbd.server import Server

from test_server_batch import Raw, run


@pytest.mark.parametrize("workers", [0, 2])
def test_export_del_refuses_in_use_and_hard_disconnects(short_tmp, workers):
    disk = short_tmp / "disk.raw"
    disk.write_bytes(b"\x42" * (1 << 20))

    async def main():
        server = Server(workers=workers)
        args = argparse.Namespace(control=os.fspath(short_tmp / "ctl.sock"), state_dir=None)
        app = await daemon.start(server, args)
        try:
            await daemon.add_export(app, "disk", os.fspath(disk))
            await daemon.add_export(app, "spare", "memory:1048576")
            path = os.fspath(short_tmp / "s")
            await server.start_unix(path)
            c = await Raw.connect(path, "disk", True)
            if workers:
                t = asyncio.get_running_loop().time()
                while server.pool.handed < 1:
                    assert asyncio.get_running_loop().time() - t < 10
                    await asyncio.sleep(0.02)
            async with ControlClient(args.control) as q:
                with pytest.raises(CommandError) as ei:
                    await q.execute("block-export-del", {"name": "disk"})
                assert "still in use by 1 connection" in ei.value.desc
                c.send(c.read(1, 0, 4096))
                assert (await c.replies(1))[1] == (0, b"\x42" * 4096)  # still served
                await q.execute("block-export-del", {"name": "spare"})  # nobody attached: removed
                await q.execute("block-export-del", {"name": "disk", "mode": "hard"})
                assert "disk" not in server.exports
                c.send(c.read(2, 0, 4096))
                with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                    await asyncio.wait_for(c.replies(1), 10)  # closed, no ESHUTDOWN reply
        finally:
            await daemon.stop(app)
            await server.shutdown()

    run(main())
