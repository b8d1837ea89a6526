"""Admission at the connection caps and memory-pressure eviction (hunt 11), in process.

Invariant 2 (the live export is an ordinary disk): a connection in
transmission -- a VM's disk, idle or busy -- is never closed to admit another
connection, and an idle one that holds no buffer memory is never closed to
relieve memory.  Invariant 4 (no client can harm another): a connection quiet
in the handshake is evicted for a newcomer, and a stalled payload that holds
the memory another client waits for is still shed.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time

import pytest

from nbdbackup.blockdev.memory import MemoryDev
from nbdbackup.nbd.server import REFUSE_LINGER, Server

from test_server_batch import IHAVEOPT, OPT_GO, OPT_REPLY_MAGIC, REP_ERR_POLICY, WRITE, Raw, req, run

MiB = 1 << 20


async def serve(short_tmp, size: int = 4 * MiB, **kw):
    server = Server(workers=0, **kw)
    server.add_export("disk", MemoryDev(size))
    path = str(short_tmp / "s")
    await server.start_unix(path)
    return server, path


async def read_ok(c: Raw, cookie: int) -> None:
    c.send(c.read(cookie, 0, 4096))
    assert (await c.replies(1))[cookie][0] == 0


@pytest.mark.parametrize("caps", [dict(max_connections=2), dict(max_connections=8, max_connections_per_uid=2)],
                         ids=["global", "per-uid"])
def test_idle_disks_are_never_evicted_for_a_newcomer(short_tmp, caps, caplog):
    async def main():
        server, path = await serve(short_tmp, handshake_timeout=1.0, **caps)
        a = await Raw.connect(path, "disk", True)
        b = await Raw.connect(path, "disk", True)
        await asyncio.sleep(0.8)  # both quiet past EVICT_QUIET
        t = time.monotonic()
        r, w = await asyncio.open_unix_connection(path)
        assert len(await r.readexactly(18)) == 18  # held without a greeting until its timeout ...
        assert time.monotonic() - t >= 0.9
        # ... then greeted and told why: every option gets ERR_POLICY with the cap.
        name = b"disk"
        w.write(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, len(name) + 6)
                + struct.pack(">I", len(name)) + name + b"\0\0")
        magic, opt, rep, n = struct.unpack(">QIII", await r.readexactly(20))
        text = (await r.readexactly(n)).decode()
        assert (magic, opt, rep) == (OPT_REPLY_MAGIC, OPT_GO, REP_ERR_POLICY), (hex(magic), opt, hex(rep))
        flag = "--max-connections-per-uid 2" if "max_connections_per_uid" in caps else "--max-connections 2"
        assert text.startswith("server busy: refused after waiting 1 s for admission: 2 connections ")
        assert text.endswith(f"none of them evictable ({flag})"), text
        t = time.monotonic()
        await read_ok(a, 1)
        await read_ok(b, 2)
        # A slot freed while the refused one lingers goes to the next newcomer (greeted at
        # once), never to the refused one.
        await b.close()
        await asyncio.sleep(0.1)
        r2, w2 = await asyncio.open_unix_connection(path)
        assert len(await asyncio.wait_for(r2.readexactly(18), 0.5)) == 18
        w2.close()
        # The refused one does not stay: closed within REFUSE_LINGER.
        assert await asyncio.wait_for(r.read(1), 5) == b""
        assert time.monotonic() - t < REFUSE_LINGER + 0.5
        w.close()
        # A connection quiet in the handshake is evicted for a newcomer.
        r, w = await asyncio.open_unix_connection(path)
        assert len(await r.readexactly(18)) == 18
        await asyncio.sleep(0.7)
        c = await asyncio.wait_for(Raw.connect(path, "disk", True), 5)
        assert await r.read(1) == b""
        await read_ok(c, 3)
        await read_ok(a, 4)
        await a.close()
        await c.close()
        await server.shutdown()

    with caplog.at_level(logging.INFO, logger="nbdbackup.server"):
        run(main())
    text = caplog.text
    assert "refused after waiting 1 s for admission: 2 connections" in text
    assert "connection quiet in the handshake evicted for a new one" in text


def test_memory_relief_sheds_stalled_payloads_never_an_idle_disk(short_tmp, caplog):
    """Two payloads that hold the whole budget (the ordinary part and the
    reserve) and stall are shed when another client's WRITE waits for memory;
    an idle connection holding nothing is quiet as long, and stays."""
    async def main():
        server, path = await serve(short_tmp, size=128 * MiB, max_buffer_memory=64 * MiB)
        idle = await Raw.connect(path, "disk", True)
        stallers = []
        for k in range(2):
            s = await Raw.connect(path, "disk", True)
            s.send(req(WRITE, 1, k * 32 * MiB, 32 * MiB) + b"\xa5" * (30 * MiB))
            stallers.append(s)
            await asyncio.sleep(0.3)
        writer = await Raw.connect(path, "disk", True)
        data = b"\x5a" * (32 * MiB)
        writer.send(req(WRITE, 2, 64 * MiB, len(data), data))
        got = await asyncio.wait_for(writer.replies(1), 15)
        assert got[2][0] == 0
        for s in stallers:
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await asyncio.wait_for(s.replies(1), 5)
        await read_ok(idle, 3)
        await idle.close()
        await writer.close()
        await server.shutdown()

    with caplog.at_level(logging.INFO, logger="nbdbackup.server"):
        run(main())
    closed = [r.getMessage() for r in caplog.records if " closed: " in r.getMessage()]
    assert len(closed) == 2 and all("buffer memory" in m for m in closed), closed


def test_an_idle_disk_gives_its_receive_ring_back(short_tmp, monkeypatch):
    """A connection quiet for `RING_IDLE` s frees its 256 KiB receive ring
    (300 idle libnbd connections: +266-270 KiB RSS each before, +7-10 KiB
    after, docs/hunt11.md); its next requests are served as before."""
    from nbdbackup.nbd import server as srv

    monkeypatch.setattr(srv, "RING_IDLE", 0.6)

    async def main():
        server, path = await serve(short_tmp)
        idle = await Raw.connect(path, "disk", True)
        busy = await Raw.connect(path, "disk", True)
        a, b = sorted(server.connections, key=lambda c: c._last_active)
        assert len(a.proto._buf) > 0
        for i in range(8):  # busy keeps its ring
            await read_ok(busy, 100 + i)
            await asyncio.sleep(0.2)
        assert len(a.proto._buf) == 0 and len(b.proto._buf) > 0
        idle.send(req(WRITE, 1, 8192, 4096, b"\x77" * 4096))
        assert (await idle.replies(1))[1][0] == 0
        idle.send(idle.read(2, 8192, 4096))
        assert (await idle.replies(1))[2] == (0, b"\x77" * 4096)
        await idle.close()
        await busy.close()
        await server.shutdown()

    run(main())
