"""The daemon's bitmap wiring, in process: `daemon.start` + `add_export` + our QMP client.

Checks what the interop tests do not reach directly: the live device of a
writable export is a `BitmapLiveDev` with the dirty hook attached before any
write; its meta contexts list the consistent bitmaps and answer their maps;
FLUSH syncs the store; persistent bitmaps are refused on memory exports and
without ``--state-dir``; read-only exports have no bitmaps; block-export-del
refuses to drop non-persistent bitmaps silently, closes persistent ones
cleanly, and block-export-add loads them again; a clean shutdown leaves
every bitmap file ``clean``.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os

import pytest

from nbdbackup import daemon
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.bitmap.hook import BitmapLiveDev
from nbdbackup.bitmap.store import STATE_CLEAN, read_header
from nbdbackup.control.client import CommandError, ControlClient
from nbdbackup.nbd.server import Server

KiB = 1024
MiB = 1 << 20
G = 64 * KiB


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def build(tmp, state: bool = True):
    server = Server()
    args = argparse.Namespace(control=os.fspath(tmp / "ctl.sock"),
                              state_dir=os.fspath(tmp / "state") if state else None)
    app = await daemon.start(server, args)
    return server, app, args.control


async def shut(server, app):
    await daemon.stop(app)
    await server.shutdown()


def file_states(tmp) -> list[int]:
    out = []
    for p in glob.glob(os.fspath(tmp / "state" / "*" / "*.bitmap")):
        with open(p, "rb") as f:
            out.append(read_header(f.read(4096)).state)
    return out


def test_live_export_hooks_contexts_and_persistence(short_tmp):
    disk = short_tmp / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)

    async def main():
        server, app, ctl = await build(short_tmp)
        try:
            await daemon.add_export(app, "disk", os.fspath(disk))
            await daemon.add_export(app, "mem", "memory:1048576")
            await daemon.add_export(app, "ro", os.fspath(disk), read_only=True)
            dev = server.exports["disk"].dev
            assert isinstance(dev, BitmapLiveDev) and isinstance(dev, LiveDev)
            assert dev.hooks[0] is dev.hook  # attached before anything else, at creation
            async with ControlClient(ctl) as c:
                await c.execute("block-dirty-bitmap-add", {"export": "disk", "name": "p", "persistent": True})
                await c.execute("block-dirty-bitmap-add", {"export": "disk", "name": "v", "granularity": 4096})
                await c.execute("block-dirty-bitmap-add", {"export": "disk", "name": "off", "disabled": True})
                assert "qemu:dirty-bitmap:p" in dev.meta_contexts()
                assert "qemu:dirty-bitmap:v" in dev.meta_contexts()
                await dev.pwrite(b"x" * 100, G + 10)
                await dev.zero(3 * G, G)
                await dev.trim(5 * G - 512, 1024)
                ext = await dev.extents(0, 6 * G, "qemu:dirty-bitmap:p")
                dirty = [(e.offset, e.length) for e in ext if e.flags & 1]
                assert dirty == [(G, G), (3 * G, 3 * G)]
                ext = await dev.extents(0, 2 * G, "qemu:dirty-bitmap:v")
                assert [(e.offset, e.length) for e in ext if e.flags & 1] == [(G, 4096)]
                info = {b["name"]: b for b in await c.execute("query-bitmaps", {"export": "disk"})}
                assert info["p"]["count"] == 4 * G and info["p"]["persistent"]
                assert info["off"]["count"] == 0 and not info["off"]["recording"]
                await dev.flush()
                assert file_states(short_tmp) == [2]  # in-use-synced after FLUSH
                await dev.pwrite(b"y", 0)
                assert file_states(short_tmp) == [3]  # in-use-dirty: a bit set since the sync
                # Refusals.
                for args, word in (({"export": "mem", "name": "q", "persistent": True}, "not a file"),
                                   ({"export": "ro", "name": "q"}, "read-only")):
                    with pytest.raises(CommandError) as ei:
                        await c.execute("block-dirty-bitmap-add", args)
                    assert word in ei.value.desc
                with pytest.raises(CommandError) as ei:
                    await c.execute("block-export-del", {"name": "disk"})
                assert "non-persistent" in ei.value.desc and "v" in ei.value.desc
                await c.execute("block-dirty-bitmap-remove", {"export": "disk", "name": "v"})
                await c.execute("block-dirty-bitmap-remove", {"export": "disk", "name": "off"})
                # Persistent bitmaps survive removing and re-adding the export.
                await c.execute("block-export-del", {"name": "disk"})
                assert file_states(short_tmp) == [STATE_CLEAN]
                assert app.bitmaps.lookup("disk") is None
                with pytest.raises(CommandError):
                    await c.execute("query-bitmaps", {"export": "disk"})
                await c.execute("block-export-add", {"name": "disk", "spec": os.fspath(disk)})
                info = await c.execute("query-bitmaps", {"export": "disk"})
                assert [(b["name"], b["count"], b["inconsistent"]) for b in info] == [("p", 5 * G, False)]
                dev2 = server.exports["disk"].dev
                assert isinstance(dev2, BitmapLiveDev) and dev2 is not dev
                await dev2.pwrite(b"z", 7 * G)
                assert (await c.execute("query-bitmaps", {"export": "disk"}))[0]["count"] == 6 * G
        finally:
            await shut(server, app)
        assert file_states(short_tmp) == [STATE_CLEAN]

    run(main())


def test_no_state_dir(short_tmp):
    async def main():
        server, app, ctl = await build(short_tmp, state=False)
        try:
            await daemon.add_export(app, "mem", "memory:1048576")
            async with ControlClient(ctl) as c:
                with pytest.raises(CommandError) as ei:
                    await c.execute("block-dirty-bitmap-add", {"export": "mem", "name": "q", "persistent": True})
                assert "--state-dir" in ei.value.desc
                await c.execute("block-dirty-bitmap-add", {"export": "mem", "name": "q"})
                with pytest.raises(CommandError) as ei:
                    await c.execute("block-dirty-bitmap-add", {"export": "mem", "name": "q"})
                assert ei.value.desc == "Bitmap already exists: q"
        finally:
            await shut(server, app)

    run(main())
