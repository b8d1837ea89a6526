"""Our client ends sessions the way proto.md allows (hunt 14, docs/spec-conformance.md).

"Termination of the session during option haggling": a client that gives up
(a refused option, ERR_SHUTDOWN) MUST use a soft disconnect -- NBD_OPT_ABORT,
then close -- not just drop the connection.  "Terminating the transmission
phase": a client that receives NBD_ESHUTDOWN MUST initiate a soft disconnect
(CMD_DISC once the requests in flight are answered).  A scripted server on a
Unix socket records what the client sends until it closes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile

import pytest

from nbdbackup.errors import ConnectionClosed, OptionError
from nbdbackup.nbd import wire
from nbdbackup.nbd.client import connect, connect_blocking
from nbdbackup.nbd.uri import parse_uri
from nbdbackup.nbd.wire import Cmd, HandshakeFlag, Info, Opt, Rep


async def _options(r: asyncio.StreamReader, w: asyncio.StreamWriter, answer, last: int = -1) -> list[int]:
    """Greet, then read options until EOF or option ``last``, answering each
    with ``answer(opt)``; the options seen."""
    w.write(wire.SERVER_GREETING.pack(wire.NBDMAGIC, wire.IHAVEOPT,
                                      HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
    await r.readexactly(4)
    seen = []
    while True:
        try:
            hdr = await r.readexactly(wire.OPTION_HEADER.size)
        except (asyncio.IncompleteReadError, ConnectionError):
            # (EOF, or a reset: a client closing with our ACK to its ABORT unread -- allowed)
            return seen
        _, opt, n = wire.OPTION_HEADER.unpack(hdr)
        await r.readexactly(n)
        seen.append(opt)
        w.write(answer(opt))
        try:
            await w.drain()
        except ConnectionError:  # the client closed without waiting for our ACK: allowed
            return seen
        if opt == last:
            return seen


def _run(server, client):
    async def main():
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s")
            got: asyncio.Future = asyncio.get_running_loop().create_future()

            async def handle(r, w):
                try:
                    got.set_result(await server(r, w))
                except BaseException as e:  # pragma: no cover - shown by the assert
                    got.set_exception(e)
                finally:
                    w.close()

            srv = await asyncio.start_unix_server(handle, path)
            try:
                await client(f"nbd+unix:///disk?socket={path}")
                return await asyncio.wait_for(got, 10)
            finally:
                srv.close()
                await srv.wait_closed()
    return asyncio.run(main())


@pytest.mark.parametrize("blocking, refusal", [(False, Rep.ERR_UNKNOWN), (False, Rep.ERR_SHUTDOWN),
                                                (False, Rep.ERR_POLICY), (True, Rep.ERR_UNKNOWN)])
def test_a_refused_go_is_followed_by_opt_abort(blocking, refusal):
    """`connect` and `connect_blocking` (the pull threads' connections) alike."""
    def answer(opt):
        if opt == Opt.GO:
            return wire.pack_option_reply(opt, refusal, b"no")
        if opt == Opt.ABORT:
            return wire.pack_option_reply(opt, Rep.ACK)
        return wire.pack_option_reply(opt, Rep.ERR_UNSUP)

    async def client(uri):
        with pytest.raises(OptionError):
            if blocking:
                u = parse_uri(uri)
                await asyncio.to_thread(connect_blocking, u, u.export, timeout=10)
            else:
                await connect(uri, connect_timeout=10)

    seen = _run(lambda r, w: _options(r, w, answer), client)
    assert seen[-2:] == [Opt.GO, Opt.ABORT]


def _go_answer(size: int):
    """Option answers of a server that has one export of ``size`` bytes: GO accepted, the rest unsupported."""
    def answer(opt):
        if opt == Opt.GO:
            return (wire.pack_option_reply(opt, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, size, 1))
                    + wire.pack_option_reply(opt, Rep.ACK))
        return wire.pack_option_reply(opt, Rep.ERR_UNSUP)
    return answer


def test_eshutdown_makes_the_client_finish_in_flight_requests_then_send_disc():
    """Two READs in flight; the first is answered ESHUTDOWN: the second still
    gets its data, new requests fail at once, and the next thing on the wire is
    CMD_DISC, then the close."""
    size = 1 << 20

    async def server(r, w):
        answer = _go_answer(size)
        if (await _options(r, w, answer, last=Opt.GO))[-1:] != [Opt.GO]:
            return ["no GO"]
        reqs = [wire.REQUEST.unpack(await r.readexactly(wire.REQUEST_SIZE)) for _ in range(2)]
        (_, _, _, c1, _, _), (_, _, _, c2, _, n2) = reqs
        w.write(wire.pack_simple_reply(c1, wire.Err.ESHUTDOWN))
        await asyncio.sleep(0.1)  # the client must not send anything but DISC now
        w.write(wire.pack_simple_reply(c2, 0) + b"d" * n2)
        rest = b""
        while chunk := await r.read(4096):
            rest += chunk
        return [wire.REQUEST.unpack_from(rest, i)[2] for i in range(0, len(rest), wire.REQUEST_SIZE)]

    async def client(uri):
        c = await connect(uri, connect_timeout=10)
        a = asyncio.ensure_future(c.pread(4096, 0))
        b = asyncio.ensure_future(c.pread(4096, 4096))
        with pytest.raises(OSError) as ei:
            await a
        assert ei.value.errno == errno.ESHUTDOWN
        with pytest.raises(ConnectionClosed, match="shutting down"):
            await c.pread(4096, 8192)
        assert await b == b"d" * 4096
        await asyncio.wait_for(c._conn.closed, 10)

    assert _run(server, client) == [Cmd.DISC]


def test_requests_queued_for_a_slot_when_eshutdown_arrives_fail_as_closed():
    """With one request slot, a READ waiting for the slot when the reply to
    the one in flight says ESHUTDOWN fails as ConnectionClosed (never goes out)."""
    size = 1 << 20

    async def server(r, w):
        answer = _go_answer(size)
        await _options(r, w, answer, last=Opt.GO)
        _, _, _, c1, _, _ = wire.REQUEST.unpack(await r.readexactly(wire.REQUEST_SIZE))
        await asyncio.sleep(0.1)
        w.write(wire.pack_simple_reply(c1, wire.Err.ESHUTDOWN))
        rest = b""
        while chunk := await r.read(4096):
            rest += chunk
        return [wire.REQUEST.unpack_from(rest, i)[2] for i in range(0, len(rest), wire.REQUEST_SIZE)]

    async def client(uri):
        c = await connect(uri, connect_timeout=10, max_in_flight=1)
        a = asyncio.ensure_future(c.pread(4096, 0))
        b = asyncio.ensure_future(c.pread(4096, 4096))
        with pytest.raises(OSError) as ei:
            await a
        assert ei.value.errno == errno.ESHUTDOWN
        with pytest.raises(ConnectionClosed, match="shutting down"):
            await b
        await asyncio.wait_for(c._conn.closed, 10)

    assert _run(server, client) == [Cmd.DISC]
