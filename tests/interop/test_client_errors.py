"""The asyncio client's failure behaviour, against scripted misbehaving servers.

Real peers do not misbehave on demand, so these servers are small asyncio
scripts on a Unix socket in a temp dir: a correct fixed-newstyle handshake,
then whatever the test needs (silence, garbage, a closed socket, a late
reply).  Checked: a dead connection fails every pending request with
`ConnectionClosed`; a protocol violation fails them with
`RemoteProtocolError` and closes the connection; timeouts on connect and per
request; a timed-out or cancelled READ never writes into the caller's buffer
later; `CancelledError` is not wrapped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile

import pytest

from nbdbackup.errors import ConnectionClosed, RemoteProtocolError
from nbdbackup.nbd import wire
from nbdbackup.nbd.client import connect
from nbdbackup.nbd.wire import Cmd, HandshakeFlag, Info, Opt, Rep, ReplyType, TransmissionFlag

SIZE = 1 << 20
FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH


async def handshake(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Serve a minimal fixed-newstyle handshake ending in OPT_GO."""
    w.write(wire.SERVER_GREETING.pack(wire.NBDMAGIC, wire.IHAVEOPT,
                                      HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
    await r.readexactly(4)
    while True:
        _, opt, n = wire.OPTION_HEADER.unpack(await r.readexactly(16))
        await r.readexactly(n)
        if opt == Opt.STRUCTURED_REPLY:
            w.write(wire.pack_option_reply(opt, Rep.ACK))
        elif opt == Opt.GO:
            w.write(wire.pack_option_reply(opt, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, SIZE, FLAGS)))
            w.write(wire.pack_option_reply(opt, Rep.ACK))
            return
        else:
            w.write(wire.pack_option_reply(opt, Rep.ERR_UNSUP))


async def read_request(r: asyncio.StreamReader) -> tuple[int, int, int, int]:
    _, flags, cmd, cookie, offset, length = wire.REQUEST.unpack(await r.readexactly(28))
    if cmd == Cmd.WRITE:
        await r.readexactly(length)
    return cmd, cookie, offset, length


def data_reply(cookie: int, offset: int, data: bytes) -> bytes:
    return wire.pack_structured_header(cookie, ReplyType.OFFSET_DATA, 8 + len(data)) + wire.OFFSET.pack(offset) + data


class Fake:
    """Run ``script(reader, writer)`` for each connection on a temp Unix socket."""

    def __init__(self, script, greet: bool = True) -> None:
        self.script = script
        self.greet = greet
        self.dir = tempfile.mkdtemp(dir="/tmp", prefix="nbdc-fake-")
        self.sock = os.path.join(self.dir, "s.sock")
        self.uri = f"nbd+unix:///?socket={self.sock}"
        self.server: asyncio.AbstractServer | None = None
        self.tasks: list[asyncio.Task] = []

    async def _handle(self, r, w) -> None:
        self.tasks.append(asyncio.current_task())
        try:
            if self.greet:
                await handshake(r, w)
            await self.script(r, w)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def __aenter__(self) -> "Fake":
        self.server = await asyncio.start_unix_server(self._handle, self.sock)
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.server is not None
        self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_dead_connection_fails_every_pending_request():
    async def script(r, w):
        for _ in range(3):
            await read_request(r)
        w.transport.abort()  # the server dies with 3 requests pending

    async def main():
        async with Fake(script) as f:
            c = await connect(f.uri)
            results = await asyncio.gather(c.pread(512, 0), c.pread(512, 512), c.flush(), return_exceptions=True)
            assert all(isinstance(e, ConnectionClosed) for e in results), results
            assert len({str(e) for e in results}) == 1  # one clear error
            assert c.closed
            with pytest.raises(ConnectionClosed):
                await c.pread(512, 0)
            await c.disconnect()  # harmless on a dead connection

    run(main())


@pytest.mark.parametrize("garbage", [
    b"\x00" * 16,  # bad magic
    wire.pack_simple_reply(12345),  # unknown cookie
    wire.pack_structured_header(1, 99, 0),  # unknown chunk type
])
def test_protocol_violation_fails_pending_and_closes(garbage):
    async def script(r, w):
        await read_request(r)
        await read_request(r)
        w.write(garbage)
        await r.read()  # until the client hangs up

    async def main():
        async with Fake(script) as f:
            c = await connect(f.uri)
            results = await asyncio.gather(c.pread(512, 0), c.flush(), return_exceptions=True)
            assert all(isinstance(e, RemoteProtocolError) for e in results), results
            await asyncio.sleep(0)
            assert c.closed
            with pytest.raises((ConnectionClosed, RemoteProtocolError)):
                await c.flush()

    run(main())


def test_request_timeout_abandons_and_keeps_connection():

    async def main():
        late = asyncio.Event()

        async def script(r, w):
            cmd, slow_cookie, off, n = await read_request(r)  # the READ: answered late
            cmd2, cookie2, _, _ = await read_request(r)  # the FLUSH: answered at once
            w.write(wire.pack_simple_reply(cookie2))
            await late.wait()
            w.write(data_reply(slow_cookie, off, b"\xee" * n))  # arrives after the timeout
            cmd3, cookie3, off3, n3 = await read_request(r)
            w.write(data_reply(cookie3, off3, b"\x77" * n3))
            await r.read()

        async with Fake(script) as f:
            c = await connect(f.uri, request_timeout=0.3)
            buf = bytearray(b"\x55" * 4096)
            t = asyncio.ensure_future(c.pread(buf, 0))
            await asyncio.sleep(0.05)
            await c.flush()  # other requests proceed meanwhile
            with pytest.raises(TimeoutError):
                await t
            late.set()
            assert await c.pread(100, 0) == b"\x77" * 100  # same connection, still in sync
            assert buf == b"\x55" * 4096  # the late reply was dropped, not written
            await c.disconnect()

    run(main())


def test_abandoned_requests_keep_their_slots_until_answered():
    """Timed-out requests still occupy the server: the bound counts them until
    their replies arrive, and a lost connection frees them (nobody hangs)."""

    async def main():
        answer = asyncio.Event()
        hang_up = asyncio.Event()

        async def script(r, w):
            reqs = [await read_request(r) for _ in range(2)]
            await answer.wait()
            for _, cookie, off, n in reqs:  # late replies to the two timed-out READs
                w.write(data_reply(cookie, off, b"\xee" * n))
            _, cookie, off, n = await read_request(r)
            w.write(data_reply(cookie, off, b"\x01" * n))
            await hang_up.wait()
            reqs = [await read_request(r) for _ in range(2)]  # never answered
            await r.read(1)

        async with Fake(script) as f:
            c = await connect(f.uri, max_in_flight=2, request_timeout=0.2)
            for res in await asyncio.gather(c.pread(512, 0), c.pread(512, 512), return_exceptions=True):
                assert isinstance(res, TimeoutError)
            assert c._slots.free == 0  # both still on the wire
            third = asyncio.ensure_future(c.pread(512, 1024))
            await asyncio.sleep(0.05)
            assert not third.done()  # waits for a slot, does not exceed the bound
            answer.set()
            assert await third == b"\x01" * 512
            assert c._slots.free == 2 and not c._conn.orphans
            hang_up.set()
            for res in await asyncio.gather(c.pread(512, 0), c.pread(512, 512), return_exceptions=True):
                assert isinstance(res, TimeoutError)
            fourth = asyncio.ensure_future(c.pread(512, 0))
            await asyncio.sleep(0.05)
            assert not fourth.done()
            c._conn.transport.abort()  # the connection dies: orphans free their slots
            with pytest.raises(ConnectionClosed):
                await fourth
            assert c._slots.free == 2 and not c._conn.orphans

    run(main())


def test_cancelled_read_is_not_wrapped_and_connection_survives():
    async def main():
        go = asyncio.Event()

        async def script(r, w):
            _, c1, o1, n1 = await read_request(r)
            await go.wait()
            w.write(data_reply(c1, o1, b"\xee" * n1))
            _, c2, o2, n2 = await read_request(r)
            w.write(data_reply(c2, o2, b"\x01" * n2))
            await r.read()

        async with Fake(script) as f:
            c = await connect(f.uri)
            buf = bytearray(64 * 1024)
            t = asyncio.ensure_future(c.pread(buf, 0))
            await asyncio.sleep(0.05)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            go.set()
            assert await c.pread(10, 0) == b"\x01" * 10
            assert buf == bytes(64 * 1024)
            await c.disconnect()

    run(main())


def test_connect_timeout_when_server_is_silent():
    async def silent(r, w):
        await r.read()

    async def main():
        async with Fake(silent, greet=False) as f:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                await connect(f.uri, connect_timeout=0.3)
            assert loop.time() - t0 < 2

    run(main())


def test_server_closing_during_handshake():
    async def rude(r, w):
        w.write(wire.SERVER_GREETING.pack(wire.NBDMAGIC, wire.IHAVEOPT, 3))
        await r.readexactly(4)
        # closes instead of answering the first option

    async def main():
        async with Fake(rude, greet=False) as f:
            with pytest.raises(ConnectionClosed):
                await connect(f.uri, connect_timeout=5)

    run(main())


def test_server_error_reply_keeps_connection_and_write_backpressure():
    """A big burst of writes (transport pauses) all complete; an error reply affects one request."""
    async def script(r, w):
        while True:
            cmd, cookie, off, n = await read_request(r)
            if cmd == Cmd.DISC:
                return
            err = wire.Err.ENOSPC if off == 4096 else 0
            w.write(wire.pack_simple_reply(cookie, err))
            await w.drain()

    async def main():
        async with Fake(script) as f:
            c = await connect(f.uri, max_in_flight=256)
            res = await asyncio.gather(*(c.pwrite(b"x" * 4096, i * 4096) for i in range(256)),
                                       return_exceptions=True)
            errs = [i for i, e in enumerate(res) if isinstance(e, OSError)]
            assert errs == [1] and res[1].errno == 28
            await c.flush()
            await c.disconnect()

    run(main())
