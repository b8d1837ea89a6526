"""The server's batch path (`NBDConnection._run_batches`): many small requests
arriving in one receive are run in one pass over the receive ring.

A raw client (the wire layout written out from proto.md, independent of
nbdbackup.nbd.wire) sends hundreds of pipelined requests in ONE write to our
server (in process, Unix socket) and checks every reply against a sequential
model: a READ sees every WRITE sent before it (the batch runs them in order,
and with a memory device, or a cached file, every request here takes a
synchronous path, batched or not), errors carry the right errno and leave
the connection usable, a bad magic closes it after answering what came
before, FUA writes reach the device as FUA, the stats count everything, and a
backup started while batches run sees exactly a prefix of the writes.  Each
test runs with batches on and off (``Server(batch=...)``): same replies.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import struct

import pytest

from nbdbackup.backup.engine import Engine
from nbdbackup.blockdev import ioengine
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.memory import MemoryDev
from nbdbackup.nbd.server import Server

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
OPT_GO, OPT_STRUCTURED_REPLY = 7, 8
REP_ACK, REP_INFO = 1, 3
REP_ERR_POLICY = 0x80000002
READ, WRITE, DISC, FLUSH, TRIM, WRITE_ZEROES = 0, 1, 2, 3, 4, 6
FUA = 1
T_NONE, T_DATA, T_HOLE, T_ERROR = 0, 1, 2, 32769

SIZE = 1 << 20


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def req(cmd: int, cookie: int, offset: int, length: int, data: bytes = b"", flags: int = 0,
        magic: int = REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data


class Raw:
    """A pipelining NBD client: requests are bytes, replies are read in order of arrival."""

    def __init__(self, reader, writer, structured: bool, size: int, flags: int) -> None:
        self.r, self.w = reader, writer
        self.structured, self.size, self.flags = structured, size, flags
        self.read_len: dict[int, int] = {}  # cookie -> length of a READ in flight
        self.read_off: dict[int, int] = {}  # cookie -> its offset (structured chunks carry absolute ones)

    @classmethod
    async def connect(cls, path: str, export: str, structured: bool) -> "Raw":
        r, w = await asyncio.open_unix_connection(path)
        magic, opt, _ = struct.unpack(">QQH", await r.readexactly(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT
        w.write(struct.pack(">I", 3))  # C_FIXED_NEWSTYLE | C_NO_ZEROES
        if structured:
            w.write(struct.pack(">QII", IHAVEOPT, OPT_STRUCTURED_REPLY, 0))
            _, _, rep, n = struct.unpack(">QIII", await r.readexactly(20))
            await r.readexactly(n)
            assert rep == REP_ACK
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        w.write(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        size = tflags = -1
        while True:
            magic, _, rep, n = struct.unpack(">QIII", await r.readexactly(20))
            assert magic == OPT_REPLY_MAGIC
            body = await r.readexactly(n)
            if rep == REP_INFO and struct.unpack(">H", body[:2])[0] == 0:
                size, tflags = struct.unpack(">QH", body[2:12])
            if rep == REP_ACK:
                break
            assert rep < 0x80000000, body
        return cls(r, w, structured, size, tflags)

    @staticmethod
    async def refusal(path: str, export: str = "disk") -> str:
        """Connect and ask for ``export`` with OPT_GO; a refused connection's
        ERR_POLICY text (asserted: greeted, then ERR_POLICY)."""
        r, w = await asyncio.open_unix_connection(path)
        try:
            magic, opt, _ = struct.unpack(">QQH", await r.readexactly(18))
            assert magic == NBDMAGIC and opt == IHAVEOPT
            name = export.encode()
            data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
            w.write(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
            magic, opt, rep, n = struct.unpack(">QIII", await r.readexactly(20))
            text = (await r.readexactly(n)).decode()
            assert (magic, opt, rep) == (OPT_REPLY_MAGIC, OPT_GO, REP_ERR_POLICY), (hex(magic), opt, hex(rep), text)
            return text
        finally:
            w.close()

    def send(self, data: bytes) -> None:
        self.w.write(data)

    def read(self, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
        self.read_len[cookie] = length
        self.read_off[cookie] = offset
        return req(READ, cookie, offset, length, flags=flags)

    async def reply(self) -> tuple[int, int, bytes | None]:
        """(cookie, NBD error, READ data or None) of the next reply."""
        if not self.structured:
            magic, err, cookie = struct.unpack(">IIQ", await self.r.readexactly(16))
            assert magic == SIMPLE_MAGIC
            n = self.read_len.pop(cookie, None)
            data = await self.r.readexactly(n) if n is not None and not err else None
            return cookie, err, data
        buf = None
        err = 0
        while True:
            magic, flags, rtype, cookie, n = struct.unpack(">IHHQI", await self.r.readexactly(20))
            assert magic == STRUCTURED_MAGIC
            body = await self.r.readexactly(n)
            if rtype in (T_DATA, T_HOLE):
                base = self.read_len[cookie]
                if buf is None:
                    buf = bytearray(base)
                start = struct.unpack(">Q", body[:8])[0] - self.read_off[cookie]
                if rtype == T_DATA:
                    buf[start:start + n - 8] = body[8:]
            elif rtype == T_ERROR:
                err = struct.unpack(">I", body[:4])[0]
            else:
                assert rtype == T_NONE
            if flags & 1:
                self.read_len.pop(cookie, None)
                return cookie, err, bytes(buf) if buf is not None and not err else None

    async def replies(self, n: int) -> dict[int, tuple[int, bytes | None]]:
        out = {}
        for _ in range(n):
            cookie, err, data = await self.reply()
            assert cookie not in out
            out[cookie] = (err, data)
        return out

    async def close(self) -> None:
        self.w.write(req(DISC, 0, 0, 0))
        self.w.close()


async def serve(short_tmp, dev, *, batch: bool, name: str = "disk"):
    server = Server(batch=batch)
    exp = server.add_export(name, dev)
    path = str(short_tmp / "s")
    await server.start_unix(path)
    return server, exp, path


async def pipeline_rig(short_tmp, kind: str, fill: bytes, structured: bool, batch: bool):
    """A LiveDev over a ``kind`` device holding ``fill``, served, and a raw client:
    (server, export, client, whether pipelined READs are answered in order)."""
    dev = make_dev(kind, short_tmp, fill)
    ordered = reads_run_now(dev)
    server, exp, path = await serve(short_tmp, LiveDev(dev), batch=batch)
    return server, exp, await Raw.connect(path, "disk", structured), ordered


async def expect_final_state_and_close(server: Server, exp, c, model: bytearray) -> None:
    """The device holds exactly ``model``; then the client and the server go."""
    buf = bytearray(len(model))
    await exp.dev.pread(memoryview(buf), 0)
    assert buf == model
    await c.close()
    await server.shutdown()


def the_conn(server: Server):
    (conn,) = server.connections
    return conn


def reads_run_now(dev) -> bool:
    """Whether this device answers a READ of cached data at once (no task: memory, or a
    file whose file system takes ``RWF_NOWAIT``; overlayfs in a container does not).
    Only then does a READ pipelined behind WRITEs run after them: NBD does not order
    requests in flight, and a READ that must go to a thread may overtake the WRITEs
    before it.  Where it cannot, the tests below check what NBD promises: the final
    state, and every READ's status."""
    if isinstance(dev, MemoryDev):
        return True
    return dev.pread_now(memoryview(bytearray(4096)), 0) and dev.pread_now(memoryview(bytearray(4096)), 0)


def make_dev(kind: str, short_tmp, fill: bytes):
    if kind == "memory":
        dev = MemoryDev(SIZE)
        dev.write_sync(fill, 0)
        return dev
    path = short_tmp / "disk.img"
    path.write_bytes(fill)
    return FileDev(str(path))


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "nobatch"])
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("kind", ["memory", "file"])
def test_pipelined_writes_and_reads_see_each_other_in_order(short_tmp, kind, structured, batch):
    rng = random.Random(f"{kind}{structured}{batch}")
    fill = rng.randbytes(SIZE)

    async def main():
        server, exp, c, ordered = await pipeline_rig(short_tmp, kind, fill, structured, batch)
        model = bytearray(fill)
        expect: dict[int, bytes | None] = {}
        out = bytearray()
        lengths = [512, 4096, 4096, 4096, 8192, 65536 - 512, 65536, 70000]
        # With an I/O engine a file WRITE over 16 KiB completes later, from the
        # engine (NBD does not order requests in flight): keep the model exact.
        wmax = 16384 if kind == "file" and ioengine.selected()[0] != "sync" else SIZE
        for cookie in range(1, 801):
            n = rng.choice(lengths)
            off = rng.randrange(0, 256 * 1024 // 512) * 512  # a hot range: many overlaps
            if rng.random() < 0.55:
                n = min(n, wmax)
                data = rng.randbytes(n)
                out += req(WRITE, cookie, off, n, data)
                model[off:off + n] = data
                expect[cookie] = None
            else:
                n = min(n, 65536 - 512) if structured else n  # longer structured READs may go sparse (a task)
                out += c.read(cookie, off, n)
                expect[cookie] = bytes(model[off:off + n])
        c.send(bytes(out))  # ONE write: the server receives them back to back
        got = await c.replies(len(expect))
        for cookie, want in expect.items():
            err, data = got[cookie]
            assert err == 0, cookie
            assert data == want or not ordered, f"request {cookie}: READ does not see the WRITEs sent before it"
        conn = the_conn(server)
        if not batch:
            assert conn.batched == 0
        elif ordered:
            assert conn.batches > 0 and conn.batched > len(expect) // 2, (conn.batches, conn.batched)
        st = exp.stats
        nw = sum(1 for v in expect.values() if v is None)
        assert st.ops[WRITE] == nw and st.failed[WRITE] == 0
        assert st.ops[READ] == len(expect) - nw
        assert st.bytes[READ] == sum(len(v) for v in expect.values() if v is not None)
        await expect_final_state_and_close(server, exp, c, model)

    run(main())


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "nobatch"])
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_bad_requests_inside_a_batch_get_their_errno_and_the_rest_runs(short_tmp, structured, batch):
    async def main():
        server, exp, path = await serve(short_tmp, LiveDev(MemoryDev(SIZE)), batch=batch)
        c = await Raw.connect(path, "disk", structured)
        a, b = b"\xaa" * 4096, b"\xbb" * 4096
        out = req(WRITE, 1, 0, 4096, a)
        out += req(WRITE, 2, SIZE - 2048, 4096, b)           # past the end: ENOSPC, nothing written
        out += c.read(3, SIZE - 512, 1024)                    # past the end: EINVAL
        out += req(WRITE, 4, 4096, 4096, b, flags=1 << 5)     # a flag WRITE may not carry: EINVAL
        out += c.read(5, 0, 4096)                             # sees write 1
        out += req(WRITE, 6, 4096, 4096, b)
        out += c.read(7, 0, 8192)                             # sees writes 1 and 6
        out += req(12345, 8, 0, 0)                            # an unknown command: EINVAL
        out += req(WRITE, 9, 0, 4096, b)
        out += c.read(10, 0, 4096)
        c.send(out)
        got = await c.replies(10)
        assert got[1] == (0, None) and got[6] == (0, None) and got[9] == (0, None)
        assert got[2][0] == errno.ENOSPC and got[3][0] == errno.EINVAL
        assert got[4][0] == errno.EINVAL and got[8][0] == errno.EINVAL
        assert got[5] == (0, a) and got[7] == (0, a + b) and got[10] == (0, b)
        tail = bytearray(2048)
        await exp.dev.pread(memoryview(tail), SIZE - 2048)
        assert tail == bytes(2048)  # the refused WRITE wrote nothing
        assert exp.stats.invalid == 4
        # The connection is still usable.
        c.send(c.read(11, 4096, 4096))
        assert await c.replies(1) == {11: (0, b)}
        await c.close()
        await server.shutdown()

    run(main())


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "nobatch"])
def test_a_bad_magic_mid_batch_answers_what_came_before_then_closes(short_tmp, batch):
    async def main():
        server, exp, path = await serve(short_tmp, LiveDev(MemoryDev(SIZE)), batch=batch)
        c = await Raw.connect(path, "disk", False)
        out = bytearray()
        for i in range(20):
            out += req(WRITE, i, i * 4096, 4096, bytes([i]) * 4096)
        out += req(WRITE, 100, 0, 4096, b"\xff" * 4096, magic=0x12345678)
        for i in range(20, 40):
            out += req(WRITE, i, i * 4096, 4096, bytes([i]) * 4096)
        c.send(bytes(out))
        got = await c.replies(20)
        assert got == {i: (0, None) for i in range(20)}
        try:  # closed, nothing more answered (a reset when our unread requests were dropped)
            assert await asyncio.wait_for(c.r.read(100), 10) == b""
        except ConnectionResetError:
            pass
        buf = bytearray(40 * 4096)
        await exp.dev.pread(memoryview(buf), 0)
        assert buf[:20 * 4096] == b"".join(bytes([i]) * 4096 for i in range(20))
        assert buf[20 * 4096:] == bytes(20 * 4096)
        await server.shutdown()

    run(main())


class FuaLog(MemoryDev):
    """Records how each write reached the device: (offset, fua, path)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.log: list[tuple[int, bool, str]] = []
        self.flushes = 0

    def pwrite_now(self, buf, offset, fua=False):
        if fua:
            return False  # like a file: a durable write must wait for the disk
        self.log.append((offset, False, "now"))
        return super().pwrite_now(buf, offset, fua)

    async def pwrite(self, buf, offset, *, fua=False):
        await asyncio.sleep(0)
        self.log.append((offset, fua, "task"))
        await super().pwrite(buf, offset, fua=fua)

    async def flush(self):
        self.flushes += 1


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "nobatch"])
def test_fua_inside_a_batch_reaches_the_device_as_fua(short_tmp, batch):
    async def main():
        dev = FuaLog(SIZE)
        server, exp, path = await serve(short_tmp, LiveDev(dev), batch=batch)
        c = await Raw.connect(path, "disk", True)
        assert c.flags & (1 << 3)  # SEND_FUA
        out = bytearray()
        fua_offsets = set()
        for i in range(60):
            flags = FUA if i % 7 == 3 else 0
            if flags:
                fua_offsets.add(i * 4096)
            out += req(WRITE, i, i * 4096, 4096, bytes([i + 1]) * 4096, flags=flags)
        out += req(FLUSH, 99, 0, 0)
        c.send(bytes(out))
        got = await c.replies(61)
        assert all(v == (0, None) for v in got.values())
        by_off = {off: (fua, how) for off, fua, how in dev.log}
        assert len(dev.log) == 60
        for off, (fua, how) in by_off.items():
            if off in fua_offsets:
                assert fua and how == "task", off
            else:
                assert not fua and how == "now", off
        assert dev.flushes == 1
        if batch:
            assert the_conn(server).batched >= 60 - len(fua_offsets) - 8
        await c.close()
        await server.shutdown()

    run(main())


async def stream_writes_across(c: "Raw", order: list[int], stride: int, block: int, during) -> None:
    """Send WRITE i (i = 0..len(order)-1) of ``block`` bytes, each holding the
    sequence number i + 1, to block ``order[i]`` (at ``order[i] * stride``),
    pipelined 50 at a time; once a third of them were answered, await
    ``during()`` (e.g. a backup start) while the rest stream on; return when
    every write was answered (all must succeed)."""
    nwrites = len(order)
    started = asyncio.Event()

    async def writer():
        for i0 in range(0, nwrites, 50):
            chunk = bytearray()
            for i in range(i0, min(i0 + 50, nwrites)):
                chunk += req(WRITE, i, order[i] * stride, block, struct.pack(">Q", i + 1) * (block // 8))
            c.send(bytes(chunk))
            await c.w.drain()
            if i0 % 500 == 0:
                await asyncio.sleep(0)

    async def reader():
        for n in range(1, nwrites + 1):
            cookie, err, _ = await c.reply()
            assert err == 0
            if n == nwrites // 3:
                started.set()

    w = asyncio.create_task(writer())
    rd = asyncio.create_task(reader())
    await started.wait()
    await during()
    await w
    await rd


def check_prefix(snap_blocks: bytes, live_blocks: bytes, order: list[int], block: int) -> int:
    """The snapshot (``snap_blocks``, block b at b * block) must be the disk after
    exactly the first k writes of `stream_writes_across` for some 0 < k < all,
    and the live disk the disk after all of them; returns k."""
    nblocks, nwrites = len(snap_blocks) // block, len(order)
    seen = [struct.unpack_from(">Q", snap_blocks, b * block)[0] for b in range(nblocks)]
    for b in range(nblocks):
        assert snap_blocks[b * block:(b + 1) * block] == struct.pack(">Q", seen[b]) * (block // 8)
    # The k the snapshot stands for: the latest write it contains.
    k = max(seen)
    assert 0 < k < nwrites
    last = [0] * nblocks
    for i in range(k):
        last[order[i]] = i + 1
    assert seen == last, "the snapshot is not the disk after exactly a prefix of the writes"
    final = [0] * nblocks
    for i, b in enumerate(order):
        final[b] = i + 1
    assert [struct.unpack_from(">Q", live_blocks, b * block)[0] for b in range(nblocks)] == final
    return k


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "nobatch"])
def test_a_backup_started_while_batches_run_sees_exactly_a_prefix(short_tmp, batch):
    """Writes stream in, pipelined, while a backup takes its point in time:
    its snapshot must equal the disk after exactly the first k writes, for
    some k (every block holds the sequence number of its last write)."""
    block, nblocks, nwrites = 4096, 64, 6000
    size = block * nblocks

    async def main():
        live = LiveDev(MemoryDev(size))
        server, exp, path = await serve(short_tmp, live, batch=batch)
        engine = Engine(server, lambda *a: None)
        c = await Raw.connect(path, "disk", True)
        rng = random.Random(7)
        order = [rng.randrange(nblocks) for _ in range(nwrites)]
        await stream_writes_across(c, order, block, block, lambda: engine.backup_start(
            "disk", "j", "none", "memory:%d" % size, snapshot="snap"))
        buf, live_buf = bytearray(size), bytearray(size)
        await engine.jobs["j"].snapshot.pread(memoryview(buf), 0)
        await live.pread(memoryview(live_buf), 0)
        check_prefix(buf, live_buf, order, block)
        if batch:
            assert the_conn(server).batched > nwrites // 3
        await engine.shutdown()
        await c.close()
        await server.shutdown()

    run(main())


def test_small_write_split_across_receives_waits_whole_in_the_ring(short_tmp):
    """A small WRITE whose payload arrives in pieces is still batched (its
    bytes wait in the ring), and a byte-by-byte client is answered right."""

    async def main():
        server, exp, path = await serve(short_tmp, LiveDev(MemoryDev(SIZE)), batch=True)
        c = await Raw.connect(path, "disk", False)
        data = os.urandom(8192)
        msg = req(WRITE, 1, 8192, 8192, data) + c.read(2, 8192, 8192)
        for i in range(0, len(msg), 997):
            c.send(msg[i:i + 997])
            await c.w.drain()
            await asyncio.sleep(0.001)
        got = await c.replies(2)
        assert got == {1: (0, None), 2: (0, data)}
        assert the_conn(server).batched == 2
        await c.close()
        await server.shutdown()

    run(main())


# ------------------------------------------------ random batches vs a model

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HSIZE = 256 * 1024
_ops = st.tuples(
    st.sampled_from(["write", "write", "read", "read", "zero", "trim", "flush", "write-fua", "bad-flag"]),
    st.integers(0, HSIZE // 512),   # offset in 512-byte units (the last ones run past the end)
    st.sampled_from([1, 512, 4096, 8192, 65536 - 512, 65536, 70000]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_ops, min_size=1, max_size=120), structured=st.booleans(), seed=st.integers(0, 1 << 16))
def test_random_pipelined_batches_match_a_sequential_model(short_tmp, ops, structured, seed):
    rng = random.Random(seed)

    async def main():
        server, exp, path = await serve(short_tmp, LiveDev(MemoryDev(HSIZE)), batch=True)
        c = await Raw.connect(path, "disk", structured)
        model = bytearray(HSIZE)
        expect: dict[int, tuple[int, bytes | None]] = {}
        out = bytearray()
        for cookie, (kind, unit, n) in enumerate(ops):
            off = unit * 512
            if kind == "read" and structured:
                n = min(n, 65536 - 512)  # longer structured READs may be sent sparse from a task
            past = off + n > HSIZE
            if kind in ("write", "write-fua", "bad-flag"):
                data = rng.randbytes(n)
                flags = FUA if kind == "write-fua" else 0x20 if kind == "bad-flag" else 0
                out += req(WRITE, cookie, off, n, data, flags=flags)
                if kind == "bad-flag":
                    expect[cookie] = (errno.EINVAL, None)
                elif past:
                    expect[cookie] = (errno.ENOSPC, None)
                else:
                    model[off:off + n] = data
                    expect[cookie] = (0, None)
            elif kind == "read":
                out += c.read(cookie, off, n)
                expect[cookie] = (errno.EINVAL, None) if past else (0, bytes(model[off:off + n]))
            elif kind in ("zero", "trim"):
                out += req(WRITE_ZEROES if kind == "zero" else TRIM, cookie, off, n)
                if past:
                    expect[cookie] = (errno.ENOSPC if kind == "zero" else errno.EINVAL, None)
                else:
                    model[off:off + n] = bytes(n)
                    expect[cookie] = (0, None)
            else:
                out += req(FLUSH, cookie, 0, 0)
                expect[cookie] = (0, None)
        # Random receive boundaries: the batch sees whatever has arrived.
        pos = 0
        while pos < len(out):
            step = rng.choice([len(out), 1 << 16, 4096, 1000, 28])
            c.send(bytes(out[pos:pos + step]))
            pos += step
            if rng.random() < 0.3:
                await c.w.drain()
                await asyncio.sleep(0)
        got = await c.replies(len(expect))
        assert got == expect
        await expect_final_state_and_close(server, exp, c, model)

    run(main())


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "nobatch"])
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("kind", ["memory", "file"])
def test_pipelined_write_zeroes_and_trims_run_in_batches_in_order(short_tmp, kind, structured, batch):
    """WRITE_ZEROES (with and without NO_HOLE) and TRIM are taken by the
    batch like WRITEs: in order with the WRITEs and READs around them, their
    effect seen by the READs after them, counted in the stats and in the
    connection's ``batched``."""
    rng = random.Random(f"zt{kind}{structured}{batch}")
    fill = rng.randbytes(SIZE)
    NO_HOLE = 2

    async def main():
        server, exp, c, ordered = await pipeline_rig(short_tmp, kind, fill, structured, batch)
        model = bytearray(fill)
        expect: dict[int, bytes | None] = {}
        counts = {WRITE: 0, WRITE_ZEROES: 0, TRIM: 0}
        out = bytearray()
        for cookie in range(1, 601):
            n = rng.choice([512, 4096, 8192, 16384])
            off = rng.randrange(0, 128 * 1024 // 512) * 512
            r = rng.random()
            if r < 0.3:
                data = rng.randbytes(n)
                out += req(WRITE, cookie, off, n, data)
                model[off:off + n] = data
                counts[WRITE] += 1
                expect[cookie] = None
            elif r < 0.55:
                # A TRIM reads back as zeroes on both devices here (file: punched hole).
                cmd = rng.choice([WRITE_ZEROES, TRIM])
                out += req(cmd, cookie, off, n, flags=NO_HOLE if cmd == WRITE_ZEROES and rng.random() < 0.5 else 0)
                model[off:off + n] = bytes(n)
                counts[cmd] += 1
                expect[cookie] = None
            else:
                out += c.read(cookie, off, n)
                expect[cookie] = bytes(model[off:off + n])
        c.send(bytes(out))
        got = await c.replies(len(expect))
        for cookie, want in expect.items():
            err, data = got[cookie]
            assert err == 0, cookie
            assert data == want or not ordered, f"request {cookie}: READ does not see what was sent before it"
        conn = the_conn(server)
        st = exp.stats
        for cmd, n in counts.items():
            assert st.ops[cmd] == n and st.failed[cmd] == 0, cmd
        assert st.bytes[WRITE_ZEROES] + st.bytes[TRIM] > 0
        if not batch:
            assert conn.batched == 0
        elif ordered:
            # Nearly everything ran in batches, zeroes and trims included.
            assert conn.batched > 0.9 * len(expect), (conn.batched, len(expect))
        await expect_final_state_and_close(server, exp, c, model)

    run(main())
