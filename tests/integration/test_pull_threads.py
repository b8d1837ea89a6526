"""The pull's threaded receive (`agent.pullthreads`) against a scripted NBD server.

Real servers answer in order and do not fail on demand, so the source here
is a small asyncio server on a Unix socket (multi-conn, structured replies,
``base:allocation`` and ``qemu:dirty-bitmap:b0``) serving a byte array with
holes.  Its READ replies can be held back and sent in reverse order, each
split into OFFSET_DATA chunks sent back to front; a READ touching a chosen
offset can get an EIO error chunk or a closed connection.  Checked: the
threaded path ran (``stats.receive``); the result and its manifest equal
the source with reordered replies, into a file (writer pool and inline) and
into a sink (the repository path); an incremental pull from the dirty
bitmap reads only dirty ranges; an error reply fails the pull with EIO
naming the server's message; a disconnect mid-pull fails it with
`ConnectionClosed`; a server that stops answering fails it with
`TimeoutError` given a request timeout, and a cancelled pull ends at once
(the blocked receiving threads are woken); the fallback (``threads=False``, a non-NBD source)
says why.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import shutil
import struct
import tempfile

import blake3
import pytest

from nbdbackup.agent.manifest import digest
from nbdbackup.agent.pull import pull
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.memory import MemoryDev
from nbdbackup.blockdev.nbd import NBDDev
from nbdbackup.errors import ConnectionClosed
from nbdbackup.nbd import wire
from nbdbackup.nbd.wire import Cmd, HandshakeFlag, Info, Opt, Rep, ReplyFlag, ReplyType, TransmissionFlag as TF

MiB = 1 << 20
SIZE = 24 * MiB
CHUNK = 4 * MiB
FLAGS = TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH | TF.CAN_MULTI_CONN
CTX = {"base:allocation": 1, "qemu:dirty-bitmap:b0": 2}


def _str32(data: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from(">I", data, pos)
    return data[pos + 4 : pos + 4 + n].decode(), pos + 4 + n


class Source:
    """The scripted server (see the module doc).

    ``data``; ``alloc`` / ``dirty``: sorted ``(offset, length, flags)``
    extents covering the disk; ``reverse``: hold READs until ``batch``
    arrived (or 50 ms passed) and answer them last first, each in 3
    OFFSET_DATA chunks back to front; ``fail_at`` / ``close_at``: a READ
    containing this offset gets EIO / closes the connection; ``stall_at``: is
    never answered.
    ``reads``: ``(offset, length)`` of every READ; ``reordered``: replies
    sent out of request order.
    """

    def __init__(self, data: bytes, alloc, dirty=None, *, reverse=False, batch=4,
                 fail_at=None, close_at=None, stall_at=None) -> None:
        self.data = data
        self.alloc = alloc
        self.dirty = dirty or [(0, len(data), 0)]
        self.reverse = reverse
        self.batch = batch
        self.fail_at = fail_at
        self.close_at = close_at
        self.stall_at = stall_at
        self.reads: list[tuple[int, int]] = []
        self.reordered = 0
        self.dir = tempfile.mkdtemp(dir="/tmp", prefix="pullthr-")
        self.sock = os.path.join(self.dir, "s.sock")
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> "Source":
        self.server = await asyncio.start_unix_server(self._handle, self.sock)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    async def _handle(self, r, w) -> None:
        self.tasks.append(asyncio.current_task())
        try:
            await self._handshake(r, w)
            await self._serve(r, w)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def _handshake(self, r, w) -> None:
        w.write(wire.SERVER_GREETING.pack(wire.NBDMAGIC, wire.IHAVEOPT,
                                          HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        await r.readexactly(4)
        while True:
            _, opt, n = wire.OPTION_HEADER.unpack(await r.readexactly(16))
            data = await r.readexactly(n)
            if opt == Opt.STRUCTURED_REPLY:
                w.write(wire.pack_option_reply(opt, Rep.ACK))
            elif opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                _, pos = _str32(data, 0)
                (k,) = struct.unpack_from(">I", data, pos)
                pos += 4
                names = []
                for _ in range(k):
                    q, pos = _str32(data, pos)
                    names.append(q)
                for name, cid in CTX.items():
                    if any(name == q or (q.endswith(":") and name.startswith(q)) for q in names):
                        w.write(wire.pack_option_reply(opt, Rep.META_CONTEXT,
                                                       struct.pack(">I", cid) + name.encode()))
                w.write(wire.pack_option_reply(opt, Rep.ACK))
            elif opt == Opt.GO:
                w.write(wire.pack_option_reply(opt, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, len(self.data),
                                                                                    FLAGS)))
                w.write(wire.pack_option_reply(opt, Rep.ACK))
                return
            else:
                w.write(wire.pack_option_reply(opt, Rep.ERR_UNSUP))

    async def _serve(self, r, w) -> None:
        held: list[tuple[int, int, int]] = []
        while True:
            try:
                timeout = 0.05 if held else None
                hdr = await asyncio.wait_for(r.readexactly(28), timeout)
            except asyncio.TimeoutError:
                hdr = None
            if hdr is not None:
                _, flags, cmd, cookie, off, n = wire.REQUEST.unpack(hdr)
                if cmd == Cmd.DISC:
                    return
                if cmd == Cmd.BLOCK_STATUS:
                    w.write(self._block_status(cookie, off, n))
                    continue
                if cmd != Cmd.READ:
                    w.write(wire.pack_simple_reply(cookie, wire.Err.EINVAL))
                    continue
                self.reads.append((off, n))
                if self.close_at is not None and off <= self.close_at < off + n:
                    w.close()
                    return
                if self.stall_at is not None and off <= self.stall_at < off + n:
                    continue  # never answered
                held.append((cookie, off, n))
                if self.reverse and len(held) < self.batch:
                    continue
            if held:
                order = held[::-1] if self.reverse else held
                if len(order) > 1 and self.reverse:
                    self.reordered += len(order) - 1
                for cookie, off, n in order:
                    w.write(self._read_reply(cookie, off, n))
                held = []
                await w.drain()

    def _read_reply(self, cookie: int, off: int, n: int) -> bytes:
        if self.fail_at is not None and off <= self.fail_at < off + n:
            return wire.pack_structured_error(cookie, wire.Err.EIO, "injected media error")
        # Three OFFSET_DATA chunks, last part first (any order is allowed).
        cuts = sorted({0, n, n // 3, 2 * n // 3})
        parts = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a][::-1]
        out = []
        for k, (a, b) in enumerate(parts):
            flags = ReplyFlag.DONE if k == len(parts) - 1 else 0
            out.append(wire.pack_structured_header(cookie, ReplyType.OFFSET_DATA, 8 + b - a, flags)
                       + wire.OFFSET.pack(off + a) + self.data[off + a : off + b])
        return b"".join(out)

    def _block_status(self, cookie: int, off: int, n: int) -> bytes:
        out = []
        for k, (cid, ext) in enumerate(((1, self.alloc), (2, self.dirty))):
            descs = []
            for o, ln, f in ext:
                s, e = max(o, off), min(o + ln, off + n)
                if e > s:
                    descs.append(wire.BLOCK_DESCRIPTOR.pack(e - s, f))
            payload = wire.BLOCK_STATUS_ID.pack(cid) + b"".join(descs)
            out.append(wire.pack_structured_header(cookie, ReplyType.BLOCK_STATUS, len(payload),
                                                   ReplyFlag.DONE if k == 1 else 0) + payload)
        return b"".join(out)


def _disk(seed: int = 1):
    """24 MiB: data, a hole (3 MiB at 5 MiB, unaligned to chunks), zeroes, data, a hole
    (17 MiB + 4 KiB to 19 MiB: a reused chunk buffer must be blanked there), data; its extents."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(SIZE))
    data[5 * MiB : 8 * MiB] = bytes(3 * MiB)
    data[13 * MiB : 14 * MiB] = bytes(MiB)
    data[HOLE2 : 19 * MiB] = bytes(19 * MiB - HOLE2)
    alloc = [(0, 5 * MiB, 0), (5 * MiB, 3 * MiB, 3), (8 * MiB, 5 * MiB, 0), (13 * MiB, MiB, 2),
             (14 * MiB, HOLE2 - 14 * MiB, 0), (HOLE2, 19 * MiB - HOLE2, 3), (19 * MiB, SIZE - 19 * MiB, 0)]
    return bytes(data), alloc


HOLE2 = 17 * MiB + 4096
READ = SIZE - 3 * MiB - (19 * MiB - HOLE2)  # bytes of data


def _manifest_of(data: bytes) -> list[bytes]:
    return [digest(memoryview(data)[o : o + CHUNK]) for o in range(0, len(data), CHUNK)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("inline,conns", [(False, 4), (True, 4), (False, 1)])
def test_reordered_replies_into_a_file(tmp_path, inline, conns):
    data, alloc = _disk()

    async def main() -> None:
        async with Source(data, alloc, reverse=True, batch=6) as s:
            src = await NBDDev.open(s.uri, read_only=True, connections=conns)
            path = str(tmp_path / "t.raw")
            with open(path, "wb") as f:
                f.truncate(SIZE)
            dst = FileDev(path)
            try:
                # One connection, 2 workers: 2 chunk buffers, reused (stale bytes must not leak).
                man, st = await pull(src, dst, fresh=True, chunk_size=CHUNK, inline=inline,
                                     workers=8 if conns > 1 else 2)
                # The connections are usable again afterwards (given back to asyncio).
                assert len(await src.clients[0].pread(4096, 0)) == 4096
            finally:
                await dst.close()
                await src.close()
            assert st.receive == "threads", st.receive_note
            assert s.reordered > 0
            # The hole (5-8 MiB) is not read.
            assert not any(o < 8 * MiB and o + n > 5 * MiB for o, n in s.reads)
            with open(path, "rb") as f:
                assert f.read() == data
            assert man.chunks == _manifest_of(data)
            assert st.bytes_read == READ

    run(main())


def test_reordered_replies_into_a_sink():
    """The repository path: ``sink_ids`` (the backup agent's `_RepoSink` way) and digests given."""
    data, alloc = _disk(2)

    async def main() -> None:
        for ids in (True, False):
            got: dict[int, bytes] = {}

            async def sink(i, d, chunk):
                await asyncio.sleep(0.001)
                got[i] = bytes(chunk)
                return blake3.blake3(chunk).digest() if ids else None

            async with Source(data, alloc, reverse=True) as s:
                src = await NBDDev.open(s.uri, read_only=True, connections=3)
                try:
                    man, st = await pull(src, None, chunk_size=CHUNK, sink=sink, sink_ids=ids)
                finally:
                    await src.close()
            assert st.receive == "threads"
            assert man.chunks == _manifest_of(data)
            for i, c in got.items():
                assert c == data[i * CHUNK : (i + 1) * CHUNK]
            assert sorted(got) == [0, 1, 2, 3, 4, 5]  # every chunk has data or zeroes read

    run(main())


def test_dirty_bitmap_pull_reads_only_dirty_ranges(tmp_path):
    data, alloc = _disk(3)
    old = bytearray(data)
    dirty_ranges = [(MiB + 4096, 8192), (9 * MiB, 2 * MiB), (20 * MiB, MiB)]
    for o, n in dirty_ranges:
        old[o : o + n] = os.urandom(n)  # the previous backup differs there
    dirty = []
    pos = 0
    for o, n in dirty_ranges:
        dirty += [(pos, o - pos, 0), (o, n, 1)]
        pos = o + n
    dirty.append((pos, SIZE - pos, 0))

    async def main() -> None:
        path = str(tmp_path / "t.raw")
        with open(path, "wb") as f:
            f.write(old)
        async with Source(data, alloc, dirty, reverse=True, batch=2) as s:
            src = await NBDDev.open(s.uri, read_only=True, connections=2)
            dst = FileDev(path)
            try:
                man, st = await pull(src, dst, bitmap="b0", chunk_size=CHUNK)
            finally:
                await dst.close()
                await src.close()
            assert st.receive == "threads"
            merged: list[tuple[int, int]] = []
            for o, n in sorted(s.reads):  # (requests of at most 1 MiB)
                if merged and sum(merged[-1]) == o:
                    merged[-1] = (merged[-1][0], merged[-1][1] + n)
                else:
                    merged.append((o, n))
            assert merged == dirty_ranges
        with open(path, "rb") as f:
            assert f.read() == data
        assert man.chunks == _manifest_of(data)

    run(main())


def test_an_error_reply_fails_the_pull(tmp_path):
    data, alloc = _disk(4)

    async def main() -> None:
        async with Source(data, alloc, fail_at=17 * MiB + 5) as s:
            src = await NBDDev.open(s.uri, read_only=True, connections=4)
            path = str(tmp_path / "t.raw")
            with open(path, "wb") as f:
                f.truncate(SIZE)
            dst = FileDev(path)
            try:
                with pytest.raises(OSError) as ei:
                    await pull(src, dst, fresh=True, chunk_size=CHUNK)
                assert ei.value.errno == errno.EIO
                assert "injected media error" in str(ei.value)
                # The connection that got the error is still in step.
                assert all(not c.closed for c in src.clients)
            finally:
                await dst.close()
                await src.close()

    run(main())


def test_a_disconnect_mid_pull_fails_it(tmp_path):
    data, alloc = _disk(5)

    async def main() -> None:
        async with Source(data, alloc, close_at=10 * MiB) as s:
            src = await NBDDev.open(s.uri, read_only=True, connections=2)
            path = str(tmp_path / "t.raw")
            with open(path, "wb") as f:
                f.truncate(SIZE)
            dst = FileDev(path)
            try:
                with pytest.raises(ConnectionClosed):
                    await pull(src, dst, fresh=True, chunk_size=CHUNK)
                # Given back broken: later use fails at once instead of hanging.
                assert sum(c.closed for c in src.clients) == 1
            finally:
                await dst.close()
                await src.close()

    run(main())


def test_fallbacks_say_why(tmp_path):
    data, alloc = _disk(6)

    async def main() -> None:
        async with Source(data, alloc) as s:
            src = await NBDDev.open(s.uri, read_only=True, connections=2)
            try:
                man, st = await pull(src, MemoryDev(SIZE), chunk_size=CHUNK, threads=False)
            finally:
                await src.close()
            assert (st.receive, st.receive_note) == ("asyncio", "off")
            assert man.chunks == _manifest_of(data)
        mem = MemoryDev(SIZE)
        mem.write_sync(data, 0)
        _, st = await pull(mem, MemoryDev(SIZE), chunk_size=CHUNK)
        assert st.receive == "asyncio" and "not an NBD export" in st.receive_note

    run(main())


def test_limit_rate_on_the_event_loop_path():
    """``limit`` on the asyncio path (a non-NBD source): the data read takes at least
    its bytes at the rate, less one 0.1 s burst."""
    import time

    from nbdbackup.ratelimit import Bucket

    data, alloc = _disk(6)

    async def main() -> None:
        mem = MemoryDev(SIZE)
        mem.write_sync(data, 0)
        rate = 24 * MiB
        t0 = time.monotonic()
        man, st = await pull(mem, MemoryDev(SIZE), chunk_size=CHUNK, limit=Bucket(rate))
        took = time.monotonic() - t0
        assert st.receive == "asyncio" and man.chunks == _manifest_of(data)
        paced = st.bytes_read / rate - 0.1
        assert paced >= 0.5 and took >= paced, (took, st)

    run(main())


def test_a_stalled_server_times_out_and_a_cancel_wakes_the_threads(tmp_path):
    data, alloc = _disk(7)

    async def main() -> None:
        async with Source(data, alloc, stall_at=9 * MiB) as s:
            path = str(tmp_path / "t.raw")
            with open(path, "wb") as f:
                f.truncate(SIZE)
            # With a request timeout (the backup agent's io_timeout): TimeoutError.
            src = await NBDDev.open(s.uri, read_only=True, connections=2, request_timeout=0.5)
            dst = FileDev(path)
            try:
                with pytest.raises(TimeoutError, match="timed out"):
                    await pull(src, dst, fresh=True, chunk_size=CHUNK)
            finally:
                await dst.close()
                await src.close()
            # Without one: the pull waits; cancelling it returns promptly.
            src = await NBDDev.open(s.uri, read_only=True, connections=2)
            dst = FileDev(path)
            try:
                task = asyncio.ensure_future(pull(src, dst, fresh=True, chunk_size=CHUNK))
                await asyncio.sleep(0.5)
                assert not task.done()
                task.cancel()
                t0 = asyncio.get_running_loop().time()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert asyncio.get_running_loop().time() - t0 < 5
            finally:
                await dst.close()
                await src.close()

    run(main())
