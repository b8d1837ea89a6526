"""Worker processes (`nbd.worker`, ``Server(workers=N)``): connections to a
plain file export are handed, socket and state, to worker processes.

A raw pipelining client (test_server_batch's `Raw`) against an in-process
server with real worker processes: connections land in workers (each its
own process) and read their own and each other's writes; requests pipelined
behind the handshake (received by the owner before the hand-off, a large
WRITE's payload half received) are answered right; a backup started while a
worker connection streams writes recalls it and snapshots exactly a prefix
(invariant 1); a worker killed -9 takes only its clients with it, their
slots come back and a new worker serves the next client; a quiet connection
in a worker is never evicted for a newcomer at a cap; a first dirty bitmap recalls.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import time

import pytest

from nbdbackup.backup.engine import Engine
from nbdbackup.bitmap.manager import BitmapManager
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.nbd.server import Server

from test_server_batch import FLUSH, IHAVEOPT, OPT_GO, OPT_STRUCTURED_REPLY, READ, WRITE, Raw, req, run
from test_server_batch import check_prefix as check_blocks_prefix, stream_writes_across

SIZE = 4 << 20


def file_export(short_tmp, fill: bytes | None = None, name: str = "disk.img") -> FileDev:
    path = short_tmp / name
    path.write_bytes(fill if fill is not None else bytes(SIZE))
    return FileDev(str(path))


async def serve(short_tmp, dev, **kw):
    server = Server(workers=kw.pop("workers", 2), **kw)
    exp = server.add_export("disk", dev)
    path = str(short_tmp / "s")
    await server.start_unix(path)
    return server, exp, path


async def until(cond, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        await asyncio.sleep(0.02)


def worker_of(server: Server, conn_count: int = 1) -> list:
    """The worker handles holding connections, in pool order."""
    return [h for h in server.pool.workers if h.conns]


def test_connections_in_two_workers_read_each_others_writes(short_tmp):
    async def main():
        server, exp, path = await serve(short_tmp, LiveDev(file_export(short_tmp)))
        a = await Raw.connect(path, "disk", True)
        b = await Raw.connect(path, "disk", False)
        await until(lambda: server.pool.handed == 2)
        # Least loaded first: one connection in each worker, both counted here.
        assert [len(h.conns) for h in server.pool.workers] == [1, 1]
        assert len(server.connections) == 2 and all(c.remote is not None for c in server.connections)
        pids = {h.proc.pid for h in server.pool.workers}
        assert os.getpid() not in pids and len(pids) == 2
        rng = random.Random(3)
        for i in range(20):
            w, r = (a, b) if i % 2 else (b, a)
            data = rng.randbytes(rng.choice([4096, 65536, 300000]))
            off = rng.randrange(0, SIZE - len(data))
            w.send(req(WRITE, 1, off, len(data), data) + req(FLUSH, 2, 0, 0))
            got = await w.replies(2)
            assert got[1][0] == 0 and got[2][0] == 0
            r.send(r.read(3, off, len(data)))
            (err, back), = (await r.replies(1)).values()
            assert err == 0 and back == data
        # FLUSH in a worker is fdatasync of the same file: the owner's device sees the data too.
        buf = bytearray(len(data))
        await exp.dev.pread(memoryview(buf), off)
        assert buf == data
        # The workers' request counts reach the owner's stats (each tick).
        await until(lambda: exp.stats.ops[WRITE] == 20 and exp.stats.ops[READ] == 20
                    and exp.stats.ops[FLUSH] == 20)
        text = server.pool.prometheus_text()
        assert "nbdbackup_server_workers 2" in text and "nbdbackup_worker_handoffs_total 2" in text
        await a.close()
        await b.close()
        await until(lambda: not server.connections)
        await server.shutdown()

    run(main())


def test_requests_pipelined_behind_the_handshake_go_with_the_socket(short_tmp):
    """The client sends its options, GO and a burst of requests (a 3 MiB WRITE
    among them) in ONE write before reading anything: the owner receives part
    of them before the hand-off, the worker must answer all of them."""
    rng = random.Random(5)
    fill = rng.randbytes(SIZE)

    async def main():
        server, exp, path = await serve(short_tmp, LiveDev(file_export(short_tmp, fill)))
        r, w = await asyncio.open_unix_connection(path)
        await r.readexactly(18)
        name = b"disk"
        go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        msg = bytearray(struct.pack(">I", 3))
        msg += struct.pack(">QII", IHAVEOPT, OPT_STRUCTURED_REPLY, 0)
        msg += struct.pack(">QII", IHAVEOPT, OPT_GO, len(go)) + go
        model = bytearray(fill)
        c = Raw(r, w, True, SIZE, 0)
        n = 0
        for i in range(60):
            ln = 3 << 20 if i == 7 else rng.choice([512, 4096, 70000])
            off = rng.randrange(0, SIZE - ln)
            if i % 2 == 0:
                data = rng.randbytes(ln)
                msg += req(WRITE, 1000 + i, off, ln, data)
                model[off:off + ln] = data
            else:
                msg += c.read(1000 + i, off, ln)
            n += 1
        expect = bytes(model)
        w.write(bytes(msg))
        # Option replies (structured ACK, then GO's INFOs and ACK).
        while True:
            _, opt, rep, ln = struct.unpack(">QIII", await r.readexactly(20))
            await r.readexactly(ln)
            if opt == OPT_GO and rep == 1:
                break
        got = await c.replies(n)
        assert all(err == 0 for err, _ in got.values())
        assert server.pool.handed == 1
        # Writes before each read in the stream: NBD does not order requests in
        # flight, so check the final state, then a read after everything.
        c.send(c.read(1, 0, SIZE))
        (err, back), = (await c.replies(1)).values()
        assert err == 0 and back == expect
        await c.close()
        await until(lambda: not server.connections)
        await server.shutdown()

    run(main())


async def blocks_at(dev, nblocks: int, block: int, stride: int) -> bytearray:
    """Block b of ``dev`` (``block`` bytes at b * ``stride``) for every b, back to back."""
    buf = bytearray(block * nblocks)
    for b in range(nblocks):
        await dev.pread(memoryview(buf)[b * block:(b + 1) * block], b * stride)
    return buf


def test_a_backup_started_while_a_worker_connection_writes_sees_exactly_a_prefix(short_tmp):
    """test_server_batch's backup-start test with the client in a worker: the
    backup start recalls it (every write it acknowledged is on disk, none in
    flight), then the copy-before-write hook sees every later write."""
    # Blocks far apart: the snapshot of a block must come from copy-before-write
    # (a small disk is copied whole by the backup's first pump step).
    block, nblocks, nwrites, stride = 4096, 64, 6000, 1 << 20
    size = stride * nblocks

    async def main():
        live = LiveDev(file_export(short_tmp, bytes(size)))
        server, exp, path = await serve(short_tmp, live)
        engine = Engine(server, lambda *a: None)
        c = await Raw.connect(path, "disk", True)
        await until(lambda: server.pool.handed == 1)
        rng = random.Random(7)
        order = [rng.randrange(nblocks) for _ in range(nwrites)]

        async def start_backup():
            await engine.backup_start("disk", "j", "none", "memory:%d" % size, snapshot="snap")
            assert server.pool.returned == 1 and live.external == 0
            assert all(c_.remote is None for c_ in server.connections)

        await stream_writes_across(c, order, stride, block, start_backup)
        check_blocks_prefix(await blocks_at(engine.jobs["j"].snapshot, nblocks, block, stride),
                     await blocks_at(live, nblocks, block, stride), order, block)
        # While the backup's hook is attached, a new connection stays here.
        c2 = await Raw.connect(path, "disk", True)
        await asyncio.sleep(0.1)
        assert server.pool.handed == 1
        await engine.shutdown()
        await c.close()
        await c2.close()
        await server.shutdown()

    run(main())


def test_a_worker_killed_takes_only_its_clients_and_is_replaced(short_tmp):
    async def main():
        server, exp, path = await serve(short_tmp, LiveDev(file_export(short_tmp)), max_connections=2)
        a = await Raw.connect(path, "disk", True)
        b = await Raw.connect(path, "disk", True)
        await until(lambda: server.pool.handed == 2)
        victim = server.pool.workers[0]
        (conn_a,) = victim.conns.values()
        os.kill(victim.proc.pid, signal.SIGKILL)
        # Its client sees EOF; the other one keeps working.
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            a.send(a.read(1, 0, 4096))
            await a.replies(1)
        b.send(b.read(2, 0, 4096))
        assert (await b.replies(1))[2][0] == 0
        await until(lambda: server.pool.restarts == 1 and len(server.connections) == 1)
        assert conn_a not in server.connections
        # The slot is free (max_connections=2) and the new worker serves.
        c = await Raw.connect(path, "disk", True)
        await until(lambda: server.pool.handed == 3)
        c.send(req(WRITE, 5, 0, 4096, b"x" * 4096) + c.read(6, 0, 4096))
        got = await c.replies(2)
        assert got[5][0] == 0 and got[6] == (0, b"x" * 4096)
        assert server.pool.workers[0] is not victim and server.pool.workers[0].proc.poll() is None
        await b.close()
        await c.close()
        await server.shutdown()
        assert all(h.proc.poll() is not None for h in server.pool.workers)

    run(main())


def test_a_quiet_connection_in_a_worker_is_never_evicted_at_the_per_uid_cap(short_tmp):
    """Invariant 2 (hunt 11): a connection in transmission is a disk, quiet or
    not; one served by a worker is never evicted for a newcomer at the cap
    (before, the owner asked its worker to close it, and the client's next
    request failed).  The newcomer is held, then refused at its handshake
    timeout (told why: ERR_POLICY); once the first leaves, its slot admits the next at once."""
    async def main():
        server, exp, path = await serve(short_tmp, LiveDev(file_export(short_tmp)), max_connections_per_uid=1,
                                        max_connections=4, handshake_timeout=1.0)
        a = await Raw.connect(path, "disk", True)
        await until(lambda: server.pool.handed == 1)
        await asyncio.sleep(1.5)  # quiet for more than EVICT_QUIET, reported by a tick
        t = time.monotonic()
        assert "refused after waiting 1 s for admission: 1 connections from this uid" in await Raw.refusal(path)
        assert time.monotonic() - t >= 0.9
        a.send(a.read(1, 0, 4096))
        assert (await a.replies(1))[1][0] == 0
        assert not any(c._evicting for c in server.connections)
        await a.close()
        await until(lambda: not server.connections)
        b = await Raw.connect(path, "disk", True)
        b.send(b.read(2, 0, 4096))
        assert (await b.replies(1))[2][0] == 0
        await b.close()
        await server.shutdown()

    run(main())


def test_a_busy_connection_in_a_worker_is_not_evicted(short_tmp):
    """A busy connection in a worker stays too (the newcomer waits, then is refused)."""
    async def main():
        server, exp, path = await serve(short_tmp, LiveDev(file_export(short_tmp)), max_connections_per_uid=1,
                                        max_connections=4, handshake_timeout=1.0)
        a = await Raw.connect(path, "disk", True)
        await until(lambda: server.pool.handed == 1)
        stop = False

        async def busy():
            i = 0
            while not stop:
                a.send(a.read(i, 0, 4096))
                await a.replies(1)
                i += 1
        t = asyncio.create_task(busy())
        await asyncio.sleep(0.6)
        assert "refused after waiting 1 s for admission" in await Raw.refusal(path)
        stop = True
        await t
        a.send(a.read(99, 0, 4096))
        assert (await a.replies(1))[99][0] == 0
        await a.close()
        await server.shutdown()

    run(main())


def test_a_first_dirty_bitmap_recalls_worker_connections(short_tmp):
    """With no bitmap the dirty hook is idle and connections go to workers;
    adding one brings them back first, so it counts every later write."""
    async def main():
        manager = BitmapManager(None)
        live = manager.wrap("disk", file_export(short_tmp))
        server, exp, path = await serve(short_tmp, live)
        c = await Raw.connect(path, "disk", True)
        await until(lambda: server.pool.handed == 1)
        await manager.add("disk", "b0")
        assert live.external == 0 and server.pool.returned == 1
        c.send(req(WRITE, 1, 65536, 4096, b"y" * 4096))
        assert (await c.replies(1))[1][0] == 0
        assert manager.lookup("disk").get("b0").dirty_ranges() == [(65536, 65536)]  # one granule
        await c.close()
        await server.shutdown()

    run(main())


def test_removing_an_export_reaches_its_worker_connections(short_tmp):
    """block-export-del: a connection in a worker gets ESHUTDOWN like one here,
    and the worker drops its copy of the export (a later one may reuse the name)."""
    async def main():
        server, exp, path = await serve(short_tmp, LiveDev(file_export(short_tmp)))
        c = await Raw.connect(path, "disk", False)
        await until(lambda: server.pool.handed == 1)
        (h,) = worker_of(server)
        assert "disk" in h.exports
        await server.remove_export("disk")
        assert "disk" not in h.exports
        c.send(c.read(1, 0, 4096))
        (err, _), = (await c.replies(1)).values()
        assert err == 108  # NBD_ESHUTDOWN
        server.add_export("disk", LiveDev(file_export(short_tmp, b"z" * SIZE, "other.img")))
        d = await Raw.connect(path, "disk", False)
        await until(lambda: server.pool.handed == 2)
        d.send(d.read(2, 0, 4096))
        assert (await d.replies(1))[2] == (0, b"z" * 4096)
        await c.close()
        await d.close()
        await server.shutdown()

    run(main())


# -- going back to a worker after a backup (docs/workers.md "Re-hand-off")

BLOCK, NBLOCKS, STRIDE = 4096, 64, 1 << 20


class Stream:
    """One client writing continuously: pipelined chunks of ``depth``
    sequence-numbered 4 KiB writes to blocks 1 MiB apart (write i puts i + 1
    in its block), and after each chunk a read of the block written last,
    which must hold that write (read-your-writes wherever the connection is
    served).  Fields: ``c`` (the `Raw` client); ``order`` (block of each
    write sent); ``acked`` (writes acknowledged); ``reads``; ``stop``."""

    def __init__(self, c: Raw, seed: int, depth: int = 16) -> None:
        self.c, self.rng, self.depth = c, random.Random(seed), depth
        self.order: list[int] = []
        self.acked = 0
        self.reads = 0
        self.stop = False

    async def run(self) -> None:
        c = self.c
        while not self.stop:
            chunk = bytearray()
            for _ in range(self.depth):
                i = len(self.order)
                b = self.rng.randrange(NBLOCKS)
                self.order.append(b)
                chunk += req(WRITE, i, b * STRIDE, BLOCK, struct.pack(">Q", i + 1) * (BLOCK // 8))
            c.send(bytes(chunk))
            for _ in range(self.depth):
                _, err, _ = await c.reply()
                assert err == 0
            self.acked = len(self.order)
            b = self.order[-1]
            c.send(c.read(1 << 40, b * STRIDE, BLOCK))
            cookie, err, data = await c.reply()
            assert cookie == 1 << 40 and err == 0
            assert data == struct.pack(">Q", len(self.order)) * (BLOCK // 8), "read-your-writes broken"
            self.reads += 1

    async def until_more(self, n: int = 200) -> None:
        start = self.acked
        await until(lambda: self.acked >= start + n)

    def final(self) -> list[int]:
        last = [0] * NBLOCKS
        for i, b in enumerate(self.order):
            last[b] = i + 1
        return last

    def prefix(self, k: int) -> list[int]:
        last = [0] * NBLOCKS
        for i in range(k):
            last[self.order[i]] = i + 1
        return last


async def block_values(dev) -> list[int]:
    buf = await blocks_at(dev, NBLOCKS, BLOCK, STRIDE)
    vals = [struct.unpack_from(">Q", buf, b * BLOCK)[0] for b in range(NBLOCKS)]
    for b in range(NBLOCKS):
        assert buf[b * BLOCK:(b + 1) * BLOCK] == struct.pack(">Q", vals[b]) * (BLOCK // 8)
    return vals


async def check_prefix(stream: Stream, snap, at_least: int, at_most: int) -> int:
    """The snapshot is the disk after exactly the first k writes, for a k
    between what was acknowledged before the backup start and what was sent
    when it returned."""
    seen = await block_values(snap)
    k = max(seen)
    assert at_least <= k <= at_most, (at_least, k, at_most)
    assert seen == stream.prefix(k), "the snapshot is not the disk after exactly a prefix of the writes"
    return k


async def backup_serve(short_tmp, **kw):
    live = LiveDev(file_export(short_tmp, bytes(STRIDE * NBLOCKS)))
    server, exp, path = await serve(short_tmp, live, **kw)
    server.reoffload_delay = 0.3
    return live, server, exp, path, Engine(server, lambda *a: None)


def test_a_recalled_connection_goes_back_to_a_worker_after_the_backup(short_tmp):
    """A client writes without pause while a backup starts (recall), runs,
    concludes and is dismissed: the connection is handed to a worker again,
    read-your-writes holds all along, and a second backup started after the
    re-hand-off recalls it again and snapshots exactly a prefix."""
    async def main():
        live, server, exp, path, engine = await backup_serve(short_tmp)
        pool = server.pool
        s = Stream(await Raw.connect(path, "disk", True), 11)
        await until(lambda: pool.handed == 1)
        t = asyncio.create_task(s.run())
        await s.until_more()
        # Backup 1 (full, to memory): the recall brings the connection here.
        before = s.acked
        await engine.backup_start("disk", "j1", "full", "memory:%d" % (STRIDE * NBLOCKS), snapshot="snap1")
        sent = len(s.order)
        assert pool.returned == 1 and live.external == 0
        (conn,) = server.connections
        assert conn.remote is None
        await check_prefix(s, engine.jobs["j1"].snapshot, before, sent)
        await s.until_more()
        await engine.jobs["j1"].wait()
        await s.until_more()  # concluded, not dismissed: the hook stays, so does the connection
        assert pool.rehanded == 0 and conn.remote is None
        await engine.job_dismiss("j1")
        # Offloadable again: after the debounce the connection goes, mid-stream.
        await until(lambda: pool.rehanded == 1)
        assert pool.handed == 2 and live.external == 1
        (conn,) = server.connections
        assert conn.remote is not None and sum(len(h.conns) for h in pool.workers) == 1
        assert "nbdbackup_worker_rehandoffs_total 1" in pool.prometheus_text()
        await s.until_more()
        # Backup 2 after the re-hand-off: recalled again, exactly a prefix.
        before = s.acked
        await engine.backup_start("disk", "j2", "none", "memory:%d" % (STRIDE * NBLOCKS), snapshot="snap2")
        sent = len(s.order)
        assert pool.returned == 2 and live.external == 0
        await s.until_more()
        s.stop = True
        await t
        await check_prefix(s, engine.jobs["j2"].snapshot, before, sent)
        # Every write of the whole sequence is on the live disk.
        assert await block_values(live) == s.final()
        assert s.reads > 10
        await engine.shutdown()
        await until(lambda: pool.rehanded == 2)  # and back again once j2 is gone
        c = s.c
        c.send(c.read(7, 0, STRIDE * 2))
        (err, data), = (await c.replies(1)).values()
        assert err == 0 and data[:BLOCK] == struct.pack(">Q", s.final()[0]) * (BLOCK // 8)
        await c.close()
        await server.shutdown()

    run(main())


@pytest.mark.parametrize("when", ["during-the-hand-off", "just-after"])
def test_a_backup_started_while_a_connection_goes_back_to_a_worker(short_tmp, when):
    """The race: a backup starts while a re-hand-off is in progress.
    "during-the-hand-off": the connection has drained and waits (an injected
    pause) right before `hand_off` -- the hook attach wins, the connection
    stays here.  "just-after": the socket was just sent, the worker may not
    have taken it yet -- the backup's recall brings it back.  Either way no
    write reaches the file from a worker after the hook is attached: the
    snapshot is exactly a prefix."""
    async def main():
        live, server, exp, path, engine = await backup_serve(short_tmp)
        pool = server.pool
        s = Stream(await Raw.connect(path, "disk", True), 13)
        await until(lambda: pool.handed == 1)
        t = asyncio.create_task(s.run())
        await s.until_more()
        await engine.backup_start("disk", "j1", "none", "memory:%d" % (STRIDE * NBLOCKS), snapshot="snap1")
        assert pool.returned == 1
        await s.until_more()
        if when == "during-the-hand-off":
            server.rehand_pause = 2.0  # ample for the backup start below, on a loaded machine
        await engine.shutdown()  # cancels and dismisses j1: offloadable again
        (conn,) = server.connections
        if when == "during-the-hand-off":
            await until(lambda: conn._handing and not conn.tasks)
            await asyncio.sleep(0.05)
        else:
            while pool.rehanded == 0:
                await asyncio.sleep(0)
        before = s.acked
        await engine.backup_start("disk", "j2", "none", "memory:%d" % (STRIDE * NBLOCKS), snapshot="snap2")
        sent = len(s.order)
        assert live.external == 0
        if when == "during-the-hand-off":
            assert pool.rehanded == 0 and pool.returned == 1
        else:
            assert pool.rehanded == 1 and pool.returned == 2
        (conn,) = server.connections
        await until(lambda: not conn._handing)  # the pause is over: hand_off said no
        await s.until_more()
        s.stop = True
        await t
        await check_prefix(s, engine.jobs["j2"].snapshot, before, sent)
        assert await block_values(live) == s.final()
        # The connection is still here (the hook stays attached).
        (conn,) = server.connections
        assert conn.remote is None and pool.rehanded == (0 if when == "during-the-hand-off" else 1)
        await engine.shutdown()
        await s.c.close()
        await server.shutdown()

    run(main())


def test_a_flapping_quiesce_does_not_move_connections_back_and_forth(short_tmp):
    """Offloadable for less than the debounce delay between quiesces: the
    connection stays here; once it stays offloadable, it goes (once)."""
    async def main():
        live, server, exp, path, engine = await backup_serve(short_tmp)
        pool = server.pool
        server.reoffload_delay = 0.8
        c = await Raw.connect(path, "disk", True)
        await until(lambda: pool.handed == 1)
        for _ in range(8):
            async with live.quiesce():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.15)
        assert pool.returned == 1 and pool.rehanded == 0
        await until(lambda: pool.rehanded == 1)
        await asyncio.sleep(1.0)
        assert pool.rehanded == 1 and pool.returned == 1
        c.send(req(WRITE, 1, 0, 4096, b"q" * 4096) + c.read(2, 0, 4096))
        got = await c.replies(2)
        assert got[1][0] == 0 and got[2] == (0, b"q" * 4096)
        await c.close()
        await server.shutdown()

    run(main())


def test_a_connection_made_while_a_bitmap_exists_goes_to_a_worker_when_it_is_removed(short_tmp):
    """Not only recalled connections: one made while the export was not
    offloadable (a dirty bitmap) goes once the last bitmap is removed."""
    async def main():
        manager = BitmapManager(None)
        live = manager.wrap("disk", file_export(short_tmp))
        server, exp, path = await serve(short_tmp, live)
        server.reoffload_delay = 0.1
        await manager.add("disk", "b0")
        plain = await Raw.connect(path, "disk", True)
        await asyncio.sleep(0.2)
        assert server.pool.handed == 0
        await manager.remove("disk", "b0")  # the dirty hook is idle again
        await until(lambda: server.pool.rehanded == 1)
        plain.send(plain.read(1, 0, 4096))
        assert (await plain.replies(1))[1][0] == 0
        await plain.close()
        await server.shutdown()

    run(main())


def test_a_write_half_received_when_the_re_hand_off_begins_goes_with_the_socket(short_tmp):
    """The owner stops a connection it serves mid-request: a 3 MiB WRITE
    whose payload is half received goes to the worker (`unconsumed`),
    which takes the rest from the client and writes it all."""
    rng = random.Random(17)

    async def main():
        live, server, exp, path, engine = await backup_serve(short_tmp)
        pool = server.pool
        c = await Raw.connect(path, "disk", True)
        await until(lambda: pool.handed == 1)
        await engine.backup_start("disk", "j1", "none", "memory:%d" % (STRIDE * NBLOCKS), snapshot="snap1")
        assert pool.returned == 1
        (conn,) = server.connections
        big = rng.randbytes(3 << 20)
        msg = req(WRITE, 1, STRIDE, len(big), big)
        half = len(msg) // 2
        c.send(msg[:half])
        await c.w.drain()
        await asyncio.sleep(0.1)
        server.rehand_pause = 0.3  # room to look at it before it goes
        await engine.shutdown()
        await until(lambda: conn._handing)
        await asyncio.sleep(0.1)
        assert conn.proto.unconsumed()[:28] == msg[:28] and pool.rehanded == 0
        await until(lambda: pool.rehanded == 1)
        assert conn.remote is not None and live.external == 1
        c.send(msg[half:])  # only the worker can read this
        got = await c.replies(1)
        assert got[1][0] == 0
        c.send(c.read(3, STRIDE, len(big)))
        got = await c.replies(1)
        assert got[3] == (0, big)
        await c.close()
        await server.shutdown()

    run(main())


def test_a_connection_whose_client_reads_no_replies_stays_until_it_drains(short_tmp):
    """A re-hand-off waits for every reply byte to leave (`drain_for_hand_off`):
    a client that pipelines 16 MiB of READs and reads none of the replies
    keeps its connection here when the drain times out (the bytes queued in
    the transport would be lost with the socket), and later reads every
    reply intact."""
    rng = random.Random(5)
    fill = rng.randbytes(SIZE)

    async def main():
        manager = BitmapManager(None)
        live = manager.wrap("disk", file_export(short_tmp, fill))
        server, exp, path = await serve(short_tmp, live)
        server.reoffload_delay = 0.1
        server.hand_off_drain = 0.3
        pool = server.pool
        await manager.add("disk", "b0")  # not offloadable: served here
        c = await Raw.connect(path, "disk", True)
        (conn,) = server.connections
        n, length = 16, 1 << 20
        for i in range(n):
            c.send(c.read(i + 1, (i % 4) * length, length))
        await c.w.drain()
        await until(lambda: conn.transport.get_write_buffer_size() > 0)
        await manager.remove("disk", "b0")  # offloadable: a re-hand-off is tried
        await until(lambda: conn._handing)
        await until(lambda: not conn._handing)  # given up after hand_off_drain
        await asyncio.sleep(0.3)
        assert pool.rehanded == 0 and conn.remote is None and not conn._closing
        got = await c.replies(n)
        for i in range(n):
            off = (i % 4) * length
            assert got[i + 1] == (0, fill[off:off + length]), i
        c.send(c.read(99, 4096, 4096))
        assert (await c.replies(1))[99] == (0, fill[4096:8192])
        await c.close()
        await server.shutdown()

    run(main())


def test_a_placeholder_frees_its_receive_ring(short_tmp):
    """A connection handed to a worker leaves a placeholder here that only
    admission counts: its 256 KiB receive ring is freed (hunt 11: 300 idle
    VM disks in workers cost 526-529 KiB each, the ring twice; 266-270 KiB
    after).  The connection still works, and comes back on a recall."""
    async def main():
        server, exp, path = await serve(short_tmp, LiveDev(file_export(short_tmp)))
        a = await Raw.connect(path, "disk", True)
        await until(lambda: server.pool.handed == 1)
        (ph,) = server.connections
        assert ph.remote is not None and len(ph.proto._buf) == 0
        a.send(a.read(1, 0, 4096))
        assert (await a.replies(1))[1][0] == 0
        await server._recall(exp)  # served here again, with a ring of its own
        (back,) = server.connections
        assert back.remote is None and len(back.proto._buf) > 0
        a.send(a.read(2, 0, 4096))
        assert (await a.replies(1))[2][0] == 0
        await a.close()
        await server.shutdown()

    run(main())
