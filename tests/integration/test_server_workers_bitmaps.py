"""Worker connections of an export with persistent dirty bitmaps (docs/workers.md "Bitmaps").

An in-process server with real worker processes, a `BitmapManager` with a
state directory, the raw pipelining client of test_server_batch: the
connection of an export with a persistent bitmap is served by a worker,
and every write it acknowledges (WRITE, WRITE_ZEROES, TRIM, FUA, pipelined,
spanning granules) is in the bitmap -- in the registry (what
``qemu:dirty-bitmap`` answers) and in the bitmap's file; a rewrite of set
granules asks the server process nothing; a FLUSH or FUA answered by a
worker leaves the file's header synced; a worker killed -9 mid-stream loses
no acknowledged write's bit; an incremental backup started while a worker
connection streams recalls it and its target and the bitmap afterwards are
exact; a randomized sequence of write phases and bitmap commands keeps the
bitmap exact; a clear while a worker connection rewrites set granules
misses no later write; the whole server killed -9 (a subprocess
``serve``) and restarted: no acknowledged write missing;
``NBDBACKUP_WORKER_BITMAPS=0`` keeps the export here.

How each was shown to fail: with `WorkerPool._mark` answering a worker's
mark request without marking (the ``live.external_writes`` call disabled
in the source, so the subprocess server ran it too) all six fail: the
registry or the file misses acknowledged writes' granules (the FLUSH test:
no in-use-dirty header after a first touch).  With only the sync request
skipped (``external_durable``), the FLUSH/FUA test fails: the header stays
in-use-dirty after the reply.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

from nbdbackup.backup.bitmaps import RegistryBitmapSource
from nbdbackup.backup.engine import Engine
from nbdbackup.bitmap.manager import BitmapManager
from nbdbackup.bitmap.store import DATA_OFFSET, STATE_DIRTY, STATE_SYNCED, BitmapStore, read_header
from nbdbackup.bitmap.dirty import DirtyBitmap
from nbdbackup.blockdev.file import FileDev
from nbdbackup.nbd.server import Server

from test_server_batch import FLUSH, FUA, TRIM, WRITE, WRITE_ZEROES, Raw, req, run
from test_server_workers import (NBLOCKS, STRIDE, Stream, block_values, check_prefix, until)

G = 64 * 1024  # the default granularity
SIZE = 64 << 20


def sparse_file(tmp, size: int = SIZE, name: str = "disk.img") -> str:
    path = tmp / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


async def serve_bitmapped(tmp, size: int = SIZE, **kw):
    """A server with 2 workers whose export ``disk`` has the persistent bitmap ``b0``."""
    manager = BitmapManager(str(tmp / "state"))
    live = manager.wrap("disk", FileDev(sparse_file(tmp, size)))
    server = Server(workers=kw.pop("workers", 2), **kw)
    server.add_export("disk", live)
    await server.start_unix(str(tmp / "s"))
    await manager.add("disk", "b0", persistent=True)
    return manager, live, server, str(tmp / "s")


def granules(offset: int, length: int) -> set[int]:
    return set(range(offset // G, (offset + length - 1) // G + 1))


def registry_granules(manager) -> set[int]:
    bm = manager.lookup("disk").get("b0")
    out = set()
    for off, ln in bm.dirty_ranges():
        out |= granules(off, ln)
    return out


def file_of(manager) -> str:
    return manager.lookup("disk").get("b0").store_path


def file_granules(path: str) -> set[int]:
    """The bits in the bitmap's file, read with plain file I/O (what survives the process)."""
    with open(path, "rb") as f:
        raw = f.read()
    h = read_header(raw[:DATA_OFFSET])
    out = set()
    bits = raw[DATA_OFFSET:]
    for i in range(h.nbits):
        if bits[i >> 3] >> (i & 7) & 1:
            out.add(i)
    return out


def file_state(path: str) -> int:
    with open(path, "rb") as f:
        return read_header(f.read(DATA_OFFSET)).state


def count_marks(server) -> list[int]:
    """Count the mark requests the server process answers (one per batch)."""
    n = [0]
    orig = server.pool._mark

    def counted(h, msg):
        n[0] += 1
        orig(h, msg)
    server.pool._mark = counted
    return n


def test_every_write_from_a_worker_connection_is_in_the_bitmap(short_tmp):
    rng = random.Random(21)

    async def main():
        manager, live, server, path = await serve_bitmapped(short_tmp)
        marks = count_marks(server)
        c = await Raw.connect(path, "disk", True)
        await until(lambda: server.pool.handed == 1)
        assert live.external == 1 and server.pool.returned == 0
        # One pipelined batch: every kind of write, some spanning granules.
        ops = [(WRITE, G - 2048, 4096, 0),           # two granules
               (WRITE, 5 * G + 100, 3 * G, 0),       # four granules, unaligned
               (WRITE, 40 * G, 2 << 20, 0),          # 32 granules: several bytes of bits
               (WRITE_ZEROES, 100 * G + 512, 4096, 0),
               (TRIM, 200 * G, 2 * G, 0),
               (WRITE, 300 * G + 7 * 512, 512, FUA)]
        ops += [(WRITE, rng.randrange(SIZE // 4096) * 4096, 4096, 0) for _ in range(40)]
        model: set[int] = set()
        batch = bytearray()
        for i, (cmd, off, ln, fl) in enumerate(ops):
            batch += req(cmd, i, off, ln, rng.randbytes(ln) if cmd == WRITE else b"", flags=fl)
            model |= granules(off, ln)
        c.send(bytes(batch))
        got = await c.replies(len(ops))
        assert all(err == 0 for err, _ in got.values())
        assert registry_granules(manager) == model
        assert file_granules(file_of(manager)) == model
        # One message per loop iteration (the 2 MiB payload arrives in pieces).
        assert 1 <= marks[0] <= 10, marks[0]
        # Steady state: the same granules again ask nothing of the server process.
        before = marks[0]
        batch = bytearray()
        for i, (cmd, off, ln, fl) in enumerate(ops):
            if not fl:
                batch += req(cmd, 1000 + i, off, ln, bytes(ln) if cmd == WRITE else b"")
        c.send(bytes(batch))
        got = await c.replies(len(ops) - 1)
        assert all(err == 0 for err, _ in got.values())
        assert marks[0] == before and server.pool.returned == 0 and live.external == 1
        assert registry_granules(manager) == model
        await c.close()
        await server.shutdown()

    run(main())


def test_flush_and_fua_from_a_worker_make_the_bits_durable(short_tmp):
    """After a worker's FLUSH (FUA) reply the file's header in force says
    in-use-synced and the bits are in the file (the server process msync()ed
    the map, then wrote the synced header, before the worker answered)."""
    async def main():
        manager, live, server, path = await serve_bitmapped(short_tmp)
        bpath = file_of(manager)
        c = await Raw.connect(path, "disk", True)
        await until(lambda: server.pool.handed == 1)
        for k, (off, fl) in enumerate([(3 * G, 0), (9 * G + 4096, FUA), (17 * G, 0), (17 * G, FUA)]):
            c.send(req(WRITE, 1, off, 4096, b"w" * 4096, flags=fl))
            assert (await c.replies(1))[1][0] == 0
            if not fl:
                if k == 0:
                    assert file_state(bpath) == STATE_DIRTY  # a first touch: marked, not yet synced
                c.send(req(FLUSH, 2, 0, 0))
                assert (await c.replies(1))[2][0] == 0
            assert file_state(bpath) == STATE_SYNCED, k
            assert granules(off, 4096) <= file_granules(bpath)
        assert server.pool.returned == 0
        await c.close()
        await server.shutdown()

    run(main())


class Writer:
    """Pipelined 4 KiB writes at random 4 KiB blocks of a ``size``-byte disk,
    ``depth`` in flight, until the connection dies; ``acked``: offsets of
    every write whose reply arrived, ``failed``: (offset, errno) of those
    answered with an error."""

    def __init__(self, c: Raw, size: int, seed: int, depth: int = 16) -> None:
        self.c, self.size, self.rng, self.depth = c, size, random.Random(seed), depth
        self.acked: list[int] = []
        self.failed: list[tuple[int, int]] = []
        self.sent: dict[int, int] = {}

    async def run(self) -> None:
        c, i = self.c, 0
        try:
            while True:
                chunk = bytearray()
                for _ in range(self.depth):
                    off = self.rng.randrange(self.size // 4096) * 4096
                    self.sent[i] = off
                    chunk += req(WRITE, i, off, 4096, b"k" * 4096)
                    i += 1
                c.send(bytes(chunk))
                for _ in range(self.depth):
                    cookie, err, _ = await c.reply()
                    if err == 0:
                        self.acked.append(self.sent[cookie])
                    else:
                        self.failed.append((self.sent[cookie], err))
        except (asyncio.IncompleteReadError, ConnectionError):
            return


def test_a_worker_killed_mid_stream_loses_no_acknowledged_bit(short_tmp):
    size = 1 << 30  # 16384 granules: nearly every write is a first touch

    async def main():
        manager, live, server, path = await serve_bitmapped(short_tmp, size)
        c = await Raw.connect(path, "disk", True)
        await until(lambda: server.pool.handed == 1)
        w = Writer(c, size, 5)
        t = asyncio.create_task(w.run())
        await until(lambda: len(w.acked) >= 3000)
        (h,) = [h for h in server.pool.workers if h.conns]
        os.kill(h.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(t, 10)
        assert len(w.acked) >= 3000
        want = set()
        for off in w.acked:
            want |= granules(off, 4096)
        assert want <= registry_granules(manager)
        assert want <= file_granules(file_of(manager))
        await until(lambda: server.pool.restarts == 1)
        await server.shutdown()

    run(main())


def test_an_incremental_backup_while_a_worker_connection_streams_is_exact(short_tmp):
    """b0 records from the start; a client in a worker writes without pause;
    an incremental backup from b0 starts (recall), completes and is
    dismissed (the connection goes back to a worker), more writes follow.
    The target holds exactly the disk after the first k writes on every
    block written before the freeze (zero elsewhere), and b0 afterwards is
    exactly the blocks written after it."""
    size = STRIDE * NBLOCKS

    async def main():
        manager, live, server, path = await serve_bitmapped(short_tmp, size)
        server.reoffload_delay = 0.3
        engine = Engine(server, lambda *a: None, bitmaps=RegistryBitmapSource(manager.lookup))
        manager.engine = engine
        pool = server.pool
        s = Stream(await Raw.connect(path, "disk", True), 23)
        await until(lambda: pool.handed == 1)
        t = asyncio.create_task(s.run())
        await s.until_more(400)
        before = s.acked
        target = str(short_tmp / "inc.raw")
        await engine.backup_start("disk", "j", "incremental", target, bitmap="b0", snapshot="snap")
        sent = len(s.order)
        assert pool.returned == 1 and live.external == 0
        k = await check_prefix(s, engine.jobs["j"].snapshot, before, sent)
        await engine.jobs["j"].wait()
        assert engine.jobs["j"].query()["status"] == "concluded"
        await engine.job_dismiss("j")
        await until(lambda: pool.rehanded == 1)
        await s.until_more(400)
        s.stop = True
        await t
        assert live.external == 1
        # The target: every block written in the first k writes, as it was then.
        tdev = FileDev(target, read_only=True)
        assert await block_values(tdev) == s.prefix(k)
        await tdev.close()
        # b0 now: exactly the blocks written after the freeze.
        assert registry_granules(manager) == {s.order[i] * STRIDE // G for i in range(k, len(s.order))}
        assert file_granules(file_of(manager)) == registry_granules(manager)
        assert await block_values(live) == s.final()
        await s.c.close()
        await server.shutdown()

    run(main())


def test_randomized_write_phases_and_bitmap_commands_keep_the_bitmaps_exact(short_tmp):
    """Phases of pipelined writes from two worker connections (random kinds,
    sizes, offsets; some FLUSH) alternate with random bitmap commands
    (clear, add a second persistent bitmap, disable/enable, remove it,
    merge): after every phase each bitmap is exactly its model."""
    rng = random.Random(31)
    size = 16 << 20

    async def main():
        manager, live, server, path = await serve_bitmapped(short_tmp, size)
        server.reoffload_delay = 0.05
        conns = [await Raw.connect(path, "disk", True) for _ in range(2)]
        await until(lambda: server.pool.handed == 2)
        models: dict[str, set[int]] = {"b0": set()}
        recording = {"b0": True}
        cookie = 0
        for phase in range(30):
            await until(lambda: live.external == 2)  # both in workers again after a command
            waits = []
            for c in conns:
                batch, n = bytearray(), rng.randrange(1, 40)
                for _ in range(n):
                    cookie += 1
                    cmd = rng.choice([WRITE, WRITE, WRITE, WRITE_ZEROES, TRIM, FLUSH])
                    if cmd == FLUSH:
                        batch += req(FLUSH, cookie, 0, 0)
                        continue
                    ln = rng.choice([512, 4096, G, 3 * G + 512, 1 << 20])
                    off = rng.randrange(0, size - ln) // 512 * 512
                    batch += req(cmd, cookie, off, ln, bytes(ln) if cmd == WRITE else b"")
                    for name, on in recording.items():
                        if on:
                            models[name] |= granules(off, ln)
                c.send(bytes(batch))
                waits.append((c, n))
            for c, n in waits:
                got = await c.replies(n)
                assert all(err == 0 for err, _ in got.values())
            reg = manager.lookup("disk")
            for name, model in models.items():
                bm = reg.get(name)
                have = set()
                for off, ln in bm.dirty_ranges():
                    have |= granules(off, ln)
                assert have == model, (phase, name)
                assert file_granules(bm.store_path) == model, (phase, name)
            action = rng.choice(["none", "none", "clear", "add", "toggle", "remove", "merge"])
            if action == "clear":
                name = rng.choice(sorted(models))
                await manager.clear("disk", name)
                models[name] = set()
            elif action == "add" and "b1" not in models:
                await manager.add("disk", "b1", persistent=True)
                models["b1"], recording["b1"] = set(), True
            elif action == "toggle" and "b1" in models:
                await (manager.disable if recording["b1"] else manager.enable)("disk", "b1")
                recording["b1"] = not recording["b1"]
            elif action == "remove" and "b1" in models:
                await manager.remove("disk", "b1")
                del models["b1"], recording["b1"]
            elif action == "merge" and "b1" in models:
                await manager.merge("disk", "b0", ["b1"])
                models["b0"] |= models["b1"]
        for c in conns:
            await c.close()
        await server.shutdown()

    run(main(), timeout=120)


def test_kill9_of_the_server_loses_no_acknowledged_bit(short_tmp):
    """``nbdbackup serve --workers 2 --state-dir`` (a subprocess) with a
    persistent bitmap made beforehand: the client's connection is served by
    a worker; the server is killed -9 mid-stream (its workers see their
    channel close and stop); restarted on the same state directory, the
    bitmap loads consistent and holds every acknowledged write.  The client
    sees its connection close, never an error reply (hunt 11: the worker
    answered EIO to writes whose mark it could no longer ask for; QEMU with
    reconnect-delay passed that to its guest instead of resending them)."""
    size = 1 << 30
    disk = sparse_file(short_tmp, size)
    state = str(short_tmp / "state")
    store = BitmapStore(state)
    store.load_all("disk", size)
    store.create("disk", DirtyBitmap("b0", size, G))
    store.close_clean()
    sock = str(short_tmp / "srv")
    env = dict(os.environ, NBDBACKUP_WORKERS="2")

    def start() -> subprocess.Popen:
        if os.path.exists(sock):
            os.unlink(sock)
        return subprocess.Popen([sys.executable, "-m", "nbdbackup.cli", "-v", "serve", "--socket", sock,
                                 "--workers", "2", "--state-dir", state, f"disk={disk}"],
                                env=env, stderr=subprocess.PIPE, text=True)

    proc = start()
    try:
        t0 = time.monotonic()
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() - t0 < 30, "server did not start"
            time.sleep(0.05)

        async def stream() -> list[int]:
            c = await Raw.connect(sock, "disk", True)
            w = Writer(c, size, 8)
            t = asyncio.create_task(w.run())
            while len(w.acked) < 3000:
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(t, 15)
            return w.acked, w.failed

        acked, failed = run(stream())
        assert not failed, f"{len(failed)} writes answered with an error, e.g. {failed[:3]}"
        proc.wait(10)
        err = proc.stderr.read()
        assert "served by worker" in err, err[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(acked) >= 3000
    # The workers exit when the server process's end of their channel closes.
    time.sleep(0.5)
    proc = start()
    try:
        t0 = time.monotonic()
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() - t0 < 30, "server did not restart"
            time.sleep(0.05)
        # (loaded: the restarted server holds the directory's lock; read the file directly)
        (path,) = [os.path.join(dp, f) for dp, _, fs in os.walk(state) for f in fs if f.endswith(".bitmap")]
        with open(path, "rb") as f:
            assert read_header(f.read(DATA_OFFSET)).state in (STATE_DIRTY, STATE_SYNCED)
        want = set()
        for off in acked:
            want |= granules(off, 4096)
        missing = want - file_granules(path)
        assert not missing, f"{len(missing)} of {len(want)} acknowledged granules missing"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_with_delegation_off_a_bitmap_export_stays_in_the_server_process(short_tmp):
    """``NBDBACKUP_WORKER_BITMAPS=0`` (`WorkerPool.delegate`): the old
    behaviour, the export's connections are served here; once its last
    bitmap is removed they go to a worker."""
    async def main():
        manager, live, server, path = await serve_bitmapped(short_tmp)
        server.pool.delegate = False
        server.reoffload_delay = 0.1
        c = await Raw.connect(path, "disk", True)
        c.send(req(WRITE, 1, 3 * G, 4096, b"d" * 4096))
        assert (await c.replies(1))[1][0] == 0
        assert server.pool.handed == 0 and registry_granules(manager) == {3}
        await manager.remove("disk", "b0")
        await until(lambda: server.pool.rehanded == 1)
        await c.close()
        await server.shutdown()

    run(main())


def test_a_clear_while_a_worker_connection_rewrites_set_granules_misses_nothing(short_tmp):
    """The race the recall prevents: a worker connection keeps rewriting
    granules whose bits are set (no ask: the worker checks its map), and
    ``block-dirty-bitmap-clear`` runs meanwhile (a rewrite: a new file).
    Every write sent after the clear returned is in the bitmap afterwards
    (and in its file), and granules written only before it are not.  With
    the quiesce in `BitmapManager.clear` and the registry's guard removed it
    fails (the worker kept checking the replaced file's set bits)."""
    rng = random.Random(43)
    hot = [rng.randrange(SIZE // G) for _ in range(24)]
    old_only = sorted(set(range(SIZE // G)) - set(hot))[:8]

    async def main():
        manager, live, server, path = await serve_bitmapped(short_tmp)
        server.reoffload_delay = 0.1
        c = await Raw.connect(path, "disk", True)
        await until(lambda: server.pool.handed == 1)
        batch = bytearray()
        for i, g in enumerate(hot + old_only):
            batch += req(WRITE, i, g * G + 512, 4096, b"o" * 4096)
        c.send(bytes(batch))
        assert all(e == 0 for e, _ in (await c.replies(len(hot) + len(old_only))).values())
        sent: list[int] = []
        state = {"cleared_at": None, "stop": False}

        async def stream():
            while not state["stop"]:
                chunk = bytearray()
                for _ in range(16):
                    g = rng.choice(hot)
                    chunk += req(WRITE, 1000 + len(sent), g * G + rng.randrange(0, G - 4096), 4096, b"n" * 4096)
                    sent.append(g)
                c.send(bytes(chunk))
                for _ in range(16):
                    _, err, _ = await c.reply()
                    assert err == 0
        t = asyncio.create_task(stream())
        await until(lambda: len(sent) > 2000)
        await manager.clear("disk", "b0")
        state["cleared_at"] = len(sent)
        # Recalled by the clear, then back in a worker, still rewriting.
        await until(lambda: server.pool.rehanded >= server.pool.returned)
        assert live.external == 1
        n = len(sent)
        await until(lambda: len(sent) > n + 3000)
        state["stop"] = True
        await t
        want = set(sent[state["cleared_at"]:])
        have = registry_granules(manager)
        assert want <= have, sorted(want - have)
        assert want <= file_granules(file_of(manager))
        assert not set(old_only) & have  # the clear did clear
        await c.close()
        await server.shutdown()

    run(main())


def test_the_worker_device_follows_the_bitmaps_coming_and_going(short_tmp):
    """Remove the only bitmap (the connection comes back and goes out with
    no maps: the worker serves the bare file), add one again (back and out
    with the new file's map): every write after the add is in it."""
    async def main():
        manager, live, server, path = await serve_bitmapped(short_tmp)
        server.reoffload_delay = 0.05
        pool = server.pool
        c = await Raw.connect(path, "disk", True)
        await until(lambda: pool.handed == 1)
        await manager.remove("disk", "b0")
        await until(lambda: pool.rehanded == 1)
        (h,) = [h for h in pool.workers if h.conns]
        c.send(req(WRITE, 1, 5 * G, 4096, b"a" * 4096))
        assert (await c.replies(1))[1][0] == 0
        await manager.add("disk", "b1", persistent=True)
        await until(lambda: pool.rehanded == 2)
        batch = b"".join(req(WRITE, 10 + i, g * G, 4096, b"b" * 4096) for i, g in enumerate((7, 9, 300)))
        c.send(batch)
        assert all(e == 0 for e, _ in (await c.replies(3)).values())
        bm = manager.lookup("disk").get("b1")
        assert [off // G for off, _ in bm.dirty_ranges()] == [7, 9, 300]
        assert file_granules(bm.store_path) == {7, 9, 300}
        await c.close()
        await server.shutdown()

    run(main())
