"""Unit tests of the sans-IO NBD client (`nbd.client_protocol`): no I/O.

Server bytes are built with `nbd.wire` and fed in random 1..10-byte slices
(h11's trick): every parser state must survive being interrupted anywhere.
"""

from __future__ import annotations

import errno
import random
import struct

import pytest

from nbdbackup.errors import ConnectionClosed, LocalProtocolError, OptionError, RemoteProtocolError
from nbdbackup.nbd import wire
from nbdbackup.nbd.client_protocol import (
    DIRECT_MIN,
    MAX_EXPORTS,
    MAX_META_CONTEXTS,
    Handshake,
    HandshakePlan,
    Mode,
    Transmission,
    parse_block_size,
)
from nbdbackup.nbd.wire import Cmd, CmdFlag, HandshakeFlag, Info, Opt, Rep, ReplyFlag, ReplyType, TransmissionFlag

FIXED = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


def slices(data: bytes, rng: random.Random, lo: int = 1, hi: int = 10):
    pos = 0
    while pos < len(data):
        n = rng.randint(lo, hi)
        yield data[pos : pos + n]
        pos += n


def feed(obj, data: bytes, seed: int = 0, lo: int = 1, hi: int = 10) -> None:
    rng = random.Random(seed)
    for piece in slices(data, rng, lo, hi):
        obj.receive_data(piece)


def greeting(flags: int = FIXED) -> bytes:
    return wire.SERVER_GREETING.pack(wire.NBDMAGIC, wire.IHAVEOPT, flags)


def rep(opt: int, r: int, data: bytes = b"") -> bytes:
    return wire.pack_option_reply(opt, r, data)


def info_export(size: int, flags: int) -> bytes:
    return wire.INFO_EXPORT.pack(Info.EXPORT, size, flags)


def meta(cid: int, name: str) -> bytes:
    return wire.META_CONTEXT_ID.pack(cid) + name.encode()


def parse_options(data: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    """Split what the client sent into its flags and (option, payload) list."""
    (cflags,) = wire.CLIENT_FLAGS.unpack_from(data)
    pos, opts = 4, []
    while pos < len(data):
        magic, opt, n = wire.OPTION_HEADER.unpack_from(data, pos)
        assert magic == wire.IHAVEOPT
        pos += wire.OPTION_HEADER.size
        opts.append((opt, data[pos : pos + n]))
        pos += n
    return cflags, opts


def strings(payload: bytes, count_fmt: str = ">I") -> tuple[str, list[str]]:
    """Decode export name + list of u32-prefixed strings (meta context payload)."""
    (n,) = struct.unpack_from(">I", payload)
    name = payload[4 : 4 + n].decode()
    pos = 4 + n
    (k,) = struct.unpack_from(count_fmt, payload, pos)
    pos += struct.calcsize(count_fmt)
    out = []
    for _ in range(k):
        (m,) = struct.unpack_from(">I", payload, pos)
        out.append(payload[pos + 4 : pos + 4 + m].decode())
        pos += 4 + m
    return name, out


GO_FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.CAN_MULTI_CONN


@pytest.mark.parametrize("seed", range(5))
def test_handshake_go_with_meta_contexts(seed):
    hs = Handshake(HandshakePlan(Mode.GO, "disk", ("base:allocation", "qemu:dirty-bitmap:")))
    server = (
        greeting()
        + rep(Opt.STRUCTURED_REPLY, Rep.ACK)
        + rep(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, meta(0, "qemu:dirty-bitmap:a"))
        + rep(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, meta(0, "qemu:dirty-bitmap:b"))
        + rep(Opt.LIST_META_CONTEXT, Rep.ACK)
        + rep(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, meta(7, "base:allocation"))
        + rep(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, meta(9, "qemu:dirty-bitmap:b"))
        + rep(Opt.SET_META_CONTEXT, Rep.ACK)
        + rep(Opt.GO, Rep.INFO, wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 512, 4096, 1 << 20))
        + rep(Opt.GO, Rep.INFO, wire.U16.pack(Info.DESCRIPTION) + b"my disk")
        + rep(Opt.GO, Rep.INFO, struct.pack(">H", 99) + b"unknown info type: ignored")
        + rep(Opt.GO, Rep.INFO, info_export(1 << 30, GO_FLAGS))
        + rep(Opt.GO, Rep.ACK)
    )
    feed(hs, server, seed)
    assert hs.done and not hs.broken
    r = hs.result
    assert r.structured and r.no_zeroes and not r.fallback
    assert r.meta_contexts == {"base:allocation": 7, "qemu:dirty-bitmap:b": 9}
    assert r.export is not None
    assert (r.export.size, r.export.flags, r.export.description) == (1 << 30, GO_FLAGS, "my disk")
    bs = r.export.block_sizes
    assert (bs.minimum, bs.preferred, bs.maximum, bs.advertised) == (512, 4096, 1 << 20, True)

    cflags, opts = parse_options(hs.data_to_send())
    assert cflags == wire.ClientFlag.C_FIXED_NEWSTYLE | wire.ClientFlag.C_NO_ZEROES
    assert [o for o, _ in opts] == [Opt.STRUCTURED_REPLY, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT, Opt.GO]
    assert strings(opts[1][1]) == ("disk", ["qemu:dirty-bitmap:"])
    assert strings(opts[2][1]) == ("disk", ["base:allocation", "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"])
    name, infos = opts[3][1][4:8].decode(), opts[3][1][8:]
    assert name == "disk" and infos == struct.pack(">HH", 1, Info.BLOCK_SIZE)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_handshake_falls_back_to_export_name(no_zeroes):
    flags = HandshakeFlag.FIXED_NEWSTYLE | (HandshakeFlag.NO_ZEROES if no_zeroes else 0)
    hs = Handshake(HandshakePlan(Mode.GO, "x"))
    server = (
        greeting(flags)
        + rep(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, b"old server")
        + rep(Opt.GO, Rep.ERR_UNSUP)
        + wire.EXPORT_NAME_REPLY.pack(4096, TransmissionFlag.HAS_FLAGS)
        + (b"" if no_zeroes else bytes(124))
    )
    feed(hs, server, 1)
    assert hs.done
    assert hs.result.fallback and not hs.result.structured
    assert hs.result.export is not None and hs.result.export.size == 4096
    _, opts = parse_options(hs.data_to_send())
    assert opts[-1] == (Opt.EXPORT_NAME, b"x")


def test_handshake_export_name_incomplete_without_zeroes():
    """Without NO_ZEROES the 124 zero bytes are part of the reply."""
    hs = Handshake(HandshakePlan(Mode.GO, "x"))
    feed(hs, greeting(0) + wire.EXPORT_NAME_REPLY.pack(4096, 1) + bytes(100))
    assert not hs.done
    feed(hs, bytes(24))
    assert hs.done
    cflags, opts = parse_options(hs.data_to_send())
    assert cflags == 0 and opts == [(Opt.EXPORT_NAME, b"x")]


def test_handshake_go_refused_raises_option_error():
    hs = Handshake(HandshakePlan(Mode.GO, "nope", structured=False))
    with pytest.raises(OptionError) as ei:
        feed(hs, greeting() + rep(Opt.GO, Rep.ERR_UNKNOWN, b"no such export"))
    assert ei.value.reply == Rep.ERR_UNKNOWN and ei.value.message == "no such export"
    assert hs.broken


@pytest.mark.parametrize(
    "server, match",
    [
        (b"X" * 18, "not an NBD server"),
        (wire.SERVER_GREETING.pack(wire.NBDMAGIC, 0x1234, 3), "bad handshake magic"),
        (greeting() + wire.OPTION_REPLY.pack(0xBAD, Opt.STRUCTURED_REPLY, Rep.ACK, 0), "option reply magic"),
        (greeting() + rep(Opt.GO, Rep.ACK), "reply for option"),
        (greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ACK, b"junk"), "ACK for option"),
        (greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ACK) + rep(Opt.GO, Rep.ACK), "without INFO_EXPORT"),
        (greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ACK)
         + rep(Opt.GO, Rep.INFO, wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 3, 4096, 4096)), "power of 2"),
        (greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ACK)
         + rep(Opt.GO, Rep.INFO, info_export(1, 1)) + rep(Opt.GO, Rep.ACK) + b"!", "after the handshake"),
    ],
)
def test_handshake_protocol_violations(server, match):
    hs = Handshake(HandshakePlan(Mode.GO, ""))
    with pytest.raises(RemoteProtocolError, match=match):
        feed(hs, server, 3)
    assert hs.broken


@pytest.mark.parametrize("flood, match", [("long", "meta context name of 4097 bytes"),
                                          ("many", "more than 16384 meta contexts")])
def test_handshake_bounds_a_meta_context_listing(flood, match):
    """A server listing contexts without end (hunt 8: 9 GB in 30 s) or with names past
    proto.md's 4096-byte string limit is a protocol violation, at once."""
    hs = Handshake(HandshakePlan(Mode.GO, "disk", ("qemu:dirty-bitmap:",)))
    feed(hs, greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ACK), 1)
    if flood == "long":
        stream = rep(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, meta(0, "qemu:dirty-bitmap:" + "x" * 4079))
    else:
        stream = b"".join(rep(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, meta(0, f"qemu:dirty-bitmap:{k}"))
                          for k in range(MAX_META_CONTEXTS + 1))
    with pytest.raises(RemoteProtocolError, match=match):
        hs.receive_data(stream)
    assert hs.broken


def test_handshake_takes_a_listing_at_the_bounds():
    hs = Handshake(HandshakePlan(Mode.GO, "disk", ("qemu:dirty-bitmap:",)))
    names = [f"qemu:dirty-bitmap:{k}" for k in range(MAX_META_CONTEXTS - 1)] + ["qemu:dirty-bitmap:" + "y" * 4078]
    server = (greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ACK)
              + b"".join(rep(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, meta(0, n)) for n in names)
              + rep(Opt.LIST_META_CONTEXT, Rep.ACK)
              + rep(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, meta(5, names[-1]))
              + rep(Opt.SET_META_CONTEXT, Rep.ACK)
              + rep(Opt.GO, Rep.INFO, info_export(1 << 20, GO_FLAGS)) + rep(Opt.GO, Rep.ACK))
    hs.receive_data(server)
    assert hs.done and hs.result.meta_contexts == {names[-1]: 5}


def test_handshake_eof_is_a_protocol_error():
    hs = Handshake(HandshakePlan(Mode.GO, ""))
    feed(hs, greeting()[:10])
    with pytest.raises(ConnectionClosed, match="closed"):
        hs.receive_data(b"")


def test_handshake_list_exports():
    hs = Handshake(HandshakePlan(Mode.LIST))
    server = (
        greeting()
        + rep(Opt.LIST, Rep.SERVER, wire.pack_string("a") + b"first")
        + rep(Opt.LIST, Rep.SERVER, wire.pack_string("b"))
        + rep(Opt.LIST, Rep.ACK)
        + rep(Opt.INFO, Rep.INFO, info_export(100, 3))
        + rep(Opt.INFO, Rep.ACK)
        + rep(Opt.INFO, Rep.INFO, info_export(200, 1))
        + rep(Opt.INFO, Rep.ACK)
        + rep(Opt.ABORT, Rep.ACK)  # ignored: we do not wait for it
    )
    feed(hs, server, 4)
    assert hs.done
    ex = hs.result.exports
    assert [(e.name, e.description, e.size, int(e.flags)) for e in ex] == [("a", "first", 100, 3), ("b", "", 200, 1)]
    _, opts = parse_options(hs.data_to_send())
    assert [o for o, _ in opts] == [Opt.LIST, Opt.INFO, Opt.INFO, Opt.ABORT]


def test_handshake_bounds_an_export_listing():
    hs = Handshake(HandshakePlan(Mode.LIST))
    stream = greeting() + b"".join(rep(Opt.LIST, Rep.SERVER, wire.pack_string(f"e{k}"))
                                   for k in range(MAX_EXPORTS + 1))
    with pytest.raises(RemoteProtocolError, match="more than 16384 exports listed"):
        hs.receive_data(stream)


def test_handshake_list_meta_contexts():
    hs = Handshake(HandshakePlan(Mode.META, "e", ()))
    feed(hs, greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ACK)
         + rep(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, meta(0, "base:allocation"))
         + rep(Opt.LIST_META_CONTEXT, Rep.ACK))
    assert hs.done and hs.result.listed_meta_contexts == ["base:allocation"]


# --------------------------------------------------------------------------
# Transmission
# --------------------------------------------------------------------------


def chunk(cookie: int, rtype: int, payload: bytes, done: bool = False) -> bytes:
    return wire.pack_structured_header(cookie, rtype, len(payload), ReplyFlag.DONE if done else 0) + payload


def data_chunk(cookie: int, offset: int, data: bytes, done: bool = False) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_DATA, wire.OFFSET.pack(offset) + data, done)


def hole_chunk(cookie: int, offset: int, n: int, done: bool = False) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_HOLE, wire.OFFSET_HOLE.pack(offset, n), done)


def none_chunk(cookie: int) -> bytes:
    return chunk(cookie, ReplyType.NONE, b"", True)


def error_chunk(cookie: int, err: int, msg: bytes = b"", done: bool = True, offset: int | None = None) -> bytes:
    if offset is None:
        return chunk(cookie, ReplyType.ERROR, wire.ERROR_CHUNK.pack(err, len(msg)) + msg, done)
    return chunk(cookie, ReplyType.ERROR_OFFSET, wire.ERROR_CHUNK.pack(err, len(msg)) + msg + wire.OFFSET.pack(offset), done)


def read_req(tx: Transmission, offset: int, length: int, fill: int = 0x55) -> tuple[int, bytearray]:
    buf = bytearray([fill]) * length
    cookie, hdr = tx.request(Cmd.READ, 0, offset, length, memoryview(buf))
    magic, flags, cmd, c2, off, n = wire.REQUEST.unpack(hdr)
    assert (magic, cmd, c2, off, n) == (wire.REQUEST_MAGIC, Cmd.READ, cookie, offset, length)
    return cookie, buf


@pytest.mark.parametrize("seed", range(4))
def test_simple_read_reply(seed):
    tx = Transmission(structured=False)
    c1, b1 = read_req(tx, 0, 20)
    c2, b2 = read_req(tx, 100, 30)
    payload2 = bytes(range(30))
    feed(tx, wire.pack_simple_reply(c2) + payload2 + wire.pack_simple_reply(c1, wire.Err.EIO), seed)
    assert [(e.cookie, e.error) for e in tx.events] == [(c2, 0), (c1, errno.EIO)]
    assert b2 == payload2 and b1 == bytearray([0x55]) * 20  # an error fills nothing
    assert not tx.pending


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("big", [False, True])
def test_structured_read_assembles_data_and_holes(seed, big):
    """Chunks out of order land in place; holes are zero-filled; big ones go direct."""
    rng = random.Random(seed)
    unit = DIRECT_MIN * 2 if big else 7
    length = unit * 6
    tx = Transmission(structured=True)
    cookie, buf = read_req(tx, 1000, length)
    expect = bytearray(length)
    pieces = []
    for i in range(6):
        off = i * unit
        if i % 3 == 1:
            pieces.append(hole_chunk(cookie, 1000 + off, unit))
        else:
            d = rng.randbytes(unit)
            expect[off : off + unit] = d
            pieces.append(data_chunk(cookie, 1000 + off, d))
    rng.shuffle(pieces)
    stream = b"".join(pieces) + none_chunk(cookie)
    feed(tx, stream, seed, 1, 10 if not big else 5000)
    assert [(e.cookie, e.error) for e in tx.events] == [(cookie, 0)]
    assert buf == expect


def test_direct_fill_uses_the_callers_buffer():
    """While a big OFFSET_DATA payload arrives, get_buffer returns the caller's memory."""
    tx = Transmission(structured=True)
    length = 4 * DIRECT_MIN
    cookie, buf = read_req(tx, 0, length)
    head = wire.pack_structured_header(cookie, ReplyType.OFFSET_DATA, 8 + length, ReplyFlag.DONE) + wire.OFFSET.pack(0)
    tx.receive_data(head + b"\x01" * 100)
    target = tx.get_buffer(-1)
    assert len(target) == length - 100
    assert target.obj is buf  # no intermediate copy
    target[:] = b"\x02" * len(target)
    tx.buffer_updated(len(target))
    assert tx.events and tx.events[0].error == 0
    assert buf == b"\x01" * 100 + b"\x02" * (length - 100)


@pytest.mark.parametrize("seed", range(3))
def test_error_chunk_keeps_connection(seed):
    tx = Transmission(structured=True)
    c1, b1 = read_req(tx, 0, 16)
    c2, b2 = read_req(tx, 16, 16)
    stream = (
        data_chunk(c1, 0, b"a" * 8)
        + error_chunk(c1, wire.Err.EIO, b"disk on fire", done=False, offset=8)
        + hole_chunk(c1, 8, 8, done=True)  # later chunks after an error are still parsed
        + data_chunk(c2, 16, b"b" * 16, done=True)
    )
    feed(tx, stream, seed)
    ev = {e.cookie: e for e in tx.events}
    assert ev[c1].error == errno.EIO and ev[c1].message == "disk on fire"
    assert ev[c2].error == 0 and b2 == b"b" * 16
    assert not tx.broken


def test_unknown_error_value_maps_to_einval_and_unknown_error_type_is_an_error():
    tx = Transmission(structured=True)
    cookie, _ = tx.request(Cmd.FLUSH, 0, 0, 0)
    feed(tx, chunk(cookie, 0x8000 | 77, wire.ERROR_CHUNK.pack(9999, 0), done=True))
    assert tx.events[0].error == errno.EINVAL


@pytest.mark.parametrize("seed", range(3))
def test_block_status_reply(seed):
    tx = Transmission(structured=True, context_ids=[1, 2])
    cookie, hdr = tx.request(Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, 1 << 20)
    descs1 = wire.BLOCK_STATUS_ID.pack(1) + wire.BLOCK_DESCRIPTOR.pack(4096, 3) + wire.BLOCK_DESCRIPTOR.pack(8192, 0)
    descs2 = wire.BLOCK_STATUS_ID.pack(2) + wire.BLOCK_DESCRIPTOR.pack(1 << 20, 1)
    feed(tx, chunk(cookie, ReplyType.BLOCK_STATUS, descs1) + chunk(cookie, ReplyType.BLOCK_STATUS, descs2, True), seed)
    (ev,) = tx.events
    assert ev.extents == {1: [(4096, 3), (8192, 0)], 2: [(1 << 20, 1)]}


def test_write_and_simple_replies_in_structured_mode():
    tx = Transmission(structured=True)
    c1, _ = tx.request(Cmd.WRITE, CmdFlag.FUA, 0, 512)
    c2, _ = tx.request(Cmd.TRIM, 0, 0, 512)
    feed(tx, wire.pack_simple_reply(c2, wire.Err.EPERM) + none_chunk(c1))
    assert [(e.cookie, e.error) for e in tx.events] == [(c2, errno.EPERM), (c1, 0)]


def test_abandoned_read_never_touches_the_buffer():
    tx = Transmission(structured=True)
    length = 4 * DIRECT_MIN
    cookie, buf = read_req(tx, 0, length, fill=0x55)
    head = wire.pack_structured_header(cookie, ReplyType.OFFSET_DATA, 8 + length, ReplyFlag.DONE) + wire.OFFSET.pack(0)
    tx.receive_data(head + b"\x01" * 10)
    assert buf[:10] == b"\x01" * 10
    tx.abandon(cookie)  # the caller gave up mid-payload
    tx.receive_data(b"\x02" * (length - 10))
    assert buf[10:] == b"\x55" * (length - 10)
    assert [e.cookie for e in tx.events] == [cookie]  # still parsed to the end
    c2, b2 = read_req(tx, 0, 4)
    tx.receive_data(data_chunk(c2, 0, b"zzzz", True))
    assert b2 == b"zzzz"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda c: wire.pack_simple_reply(c + 1), "unknown cookie"),
        (lambda c: b"\xde\xad\xbe\xef" + bytes(16), "bad reply magic"),
        (lambda c: data_chunk(c, 0, b"x" * 8, True), "covers 8 of 16"),
        (lambda c: data_chunk(c, 10, b"x" * 16, True), "outside the request"),
        (lambda c: hole_chunk(c, 0, 0, True), "length 0"),
        (lambda c: chunk(c, 42, b"", True), "unknown structured reply type"),
        (lambda c: chunk(c, ReplyType.NONE, b"", False), "without the DONE flag"),
        (lambda c: chunk(c, ReplyType.BLOCK_STATUS, bytes(12), True), "BLOCK_STATUS chunk for command"),
        (lambda c: error_chunk(c, 0), "error value 0"),
        (lambda c: chunk(c, ReplyType.ERROR, wire.ERROR_CHUNK.pack(5, 10) + b"abc", True), "overruns"),
    ],
)
def test_reply_protocol_violations(make, match):
    tx = Transmission(structured=True)
    cookie, _ = read_req(tx, 0, 16)
    with pytest.raises(RemoteProtocolError, match=match):
        feed(tx, make(cookie), 7)
    assert tx.broken
    with pytest.raises(LocalProtocolError):
        tx.request(Cmd.FLUSH, 0, 0, 0)


@pytest.mark.parametrize(
    "chunks",
    [
        # Each adds up to the 16-byte request but leaves a gap (proto.md: content chunks
        # MUST NOT overlap); before hunt 8 the gap kept the buffer's old bytes.
        [(0, "d", 8), (0, "d", 8)],  # the same range twice
        [(0, "d", 8), (4, "d", 8)],  # starts inside an earlier chunk
        [(8, "d", 8), (4, "d", 8)],  # ends inside an earlier chunk (out of order)
        [(4, "h", 4), (0, "d", 12)],  # encloses an earlier hole
        [(0, "d", 4), (12, "d", 4), (2, "h", 8)],  # between two, overlapping the first
        [(0, "d", 4), (12, "d", 4), (6, "d", 8)],  # between two, overlapping the second
    ],
)
def test_overlapping_content_chunks_are_a_violation(chunks):
    tx = Transmission(structured=True)
    cookie, buf = read_req(tx, 100, 16)
    stream = b"".join(data_chunk(cookie, 100 + o, b"x" * n) if kind == "d" else hole_chunk(cookie, 100 + o, n)
                      for o, kind, n in chunks) + none_chunk(cookie)
    with pytest.raises(RemoteProtocolError, match="overlaps an earlier chunk"):
        feed(tx, stream, 3)
    assert tx.broken and not tx.events


def test_adjacent_content_chunks_in_any_order_are_accepted():
    tx = Transmission(structured=True)
    cookie, buf = read_req(tx, 100, 16)
    stream = (data_chunk(cookie, 108, b"c" * 4) + hole_chunk(cookie, 104, 4) + data_chunk(cookie, 112, b"d" * 4)
              + data_chunk(cookie, 100, b"a" * 4) + none_chunk(cookie))
    feed(tx, stream, 5)
    assert [(e.cookie, e.error) for e in tx.events] == [(cookie, 0)]
    assert buf == b"a" * 4 + bytes(4) + b"c" * 4 + b"d" * 4


def test_structured_chunk_without_negotiation_is_a_violation():
    tx = Transmission(structured=False)
    cookie, _ = read_req(tx, 0, 4)
    with pytest.raises(RemoteProtocolError, match="without negotiation"):
        tx.receive_data(data_chunk(cookie, 0, b"abcd", True))


def test_block_status_for_unknown_context_is_a_violation():
    tx = Transmission(structured=True, context_ids=[1])
    cookie, _ = tx.request(Cmd.BLOCK_STATUS, 0, 0, 4096)
    with pytest.raises(RemoteProtocolError, match="unknown context id 5"):
        tx.receive_data(chunk(cookie, ReplyType.BLOCK_STATUS, wire.BLOCK_STATUS_ID.pack(5) + bytes(8), True))


def test_eof_mid_reply():
    tx = Transmission(structured=True)
    cookie, _ = read_req(tx, 0, 16)
    tx.receive_eof()  # nothing pending on the wire: fine
    tx.receive_data(data_chunk(cookie, 0, b"x" * 16, True)[:25])
    with pytest.raises(RemoteProtocolError, match="middle of a reply"):
        tx.receive_eof()


def test_no_request_after_disc():
    tx = Transmission(structured=True)
    tx.request(Cmd.DISC, 0, 0, 0)
    assert not tx.pending
    with pytest.raises(LocalProtocolError):
        tx.request(Cmd.FLUSH, 0, 0, 0)


def test_cookies_are_unique_among_pending():
    tx = Transmission(structured=True)
    cookies = {tx.request(Cmd.FLUSH, 0, 0, 0)[0] for _ in range(1000)}
    assert len(cookies) == 1000 == len(tx.pending)


def test_handshake_go_lists_contexts_first_on_the_same_connection():
    hs = Handshake(HandshakePlan(Mode.GO, "e", ("base:allocation",), list_first=()))
    feed(hs, greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ACK)
         + rep(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, meta(0, "base:allocation"))
         + rep(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, meta(0, "qemu:allocation-depth"))
         + rep(Opt.LIST_META_CONTEXT, Rep.ACK)
         + rep(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, meta(1, "base:allocation"))
         + rep(Opt.SET_META_CONTEXT, Rep.ACK)
         + rep(Opt.GO, Rep.INFO, info_export(512, 1)) + rep(Opt.GO, Rep.ACK), 5)
    assert hs.done
    assert hs.result.listed_meta_contexts == ["base:allocation", "qemu:allocation-depth"]
    assert hs.result.meta_contexts == {"base:allocation": 1}
    _, opts = parse_options(hs.data_to_send())
    assert [o for o, _ in opts] == [Opt.STRUCTURED_REPLY, Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT, Opt.GO]
    assert strings(opts[1][1]) == ("e", [])


def test_server_selecting_an_unrequested_context_is_a_violation():
    hs = Handshake(HandshakePlan(Mode.GO, "e", ("base:allocation",)))
    with pytest.raises(RemoteProtocolError, match="did not ask for"):
        feed(hs, greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ACK)
             + rep(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, meta(1, "qemu:allocation-depth"))
             + rep(Opt.SET_META_CONTEXT, Rep.ACK))


# --------------------------------------------------------------------------
# Fuzz: whatever a server sends, the only exceptions are ours.
# --------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_HS_PREFIX = greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ACK)


@settings(max_examples=300, deadline=None)
@given(tail=st.binary(max_size=200), cut=st.integers(0, 60))
def test_fuzz_handshake_raises_only_protocol_errors(tail, cut):
    hs = Handshake(HandshakePlan(Mode.GO, "e", ("base:allocation", "qemu:dirty-bitmap:")))
    try:
        feed(hs, _HS_PREFIX[: len(_HS_PREFIX) - cut] + tail)
    except (RemoteProtocolError, OptionError):
        assert hs.broken




@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.builds(lambda c, o, d: data_chunk(c, o, d, False), st.integers(0, 3), st.integers(0, 80), st.binary(max_size=40)),
            st.builds(lambda c, o, n: hole_chunk(c, o, n, False), st.integers(0, 3), st.integers(0, 80), st.integers(0, 80)),
            st.builds(lambda c, e, m: error_chunk(c, e, m, False), st.integers(0, 3), st.integers(0, 200), st.binary(max_size=10)),
            st.builds(lambda c: none_chunk(c), st.integers(0, 3)),
            st.builds(lambda c, e: wire.pack_simple_reply(c, e), st.integers(0, 3), st.integers(0, 30)),
            st.binary(max_size=30),
        ),
        max_size=8,
    )
)
def test_fuzz_replies_raise_only_protocol_errors(pieces):
    tx = Transmission(structured=True, context_ids=[1])
    bufs = []
    for _ in range(3):
        c, b = read_req(tx, 0, 64)
        bufs.append(b)
    tx.request(Cmd.BLOCK_STATUS, 0, 0, 4096)
    try:
        feed(tx, b"".join(pieces), 11)
    except RemoteProtocolError:
        assert tx.broken
    for ev in tx.events:
        assert ev.error >= 0
    assert all(len(b) == 64 for b in bufs)


# -- STARTTLS ---------------------------------------------------------------------


def test_handshake_starttls_first_then_continues_after_upgrade():
    hs = Handshake(HandshakePlan(Mode.GO, "disk", structured=True, tls=True))
    feed(hs, greeting() + rep(Opt.STARTTLS, Rep.ACK))
    assert hs.tls_wanted and not hs.done
    _, opts = parse_options(hs.data_to_send())
    assert opts == [(Opt.STARTTLS, b"")]  # nothing else goes out in clear
    hs.tls_started()
    assert not hs.tls_wanted
    # (from here on the bytes are what TLS decrypted)
    out = hs.data_to_send()
    assert wire.OPTION_HEADER.unpack_from(out)[1] == Opt.STRUCTURED_REPLY
    feed(hs, rep(Opt.STRUCTURED_REPLY, Rep.ACK) + rep(Opt.GO, Rep.INFO, info_export(4096, GO_FLAGS))
         + rep(Opt.GO, Rep.ACK))
    assert hs.done and hs.result.tls and hs.result.structured


@pytest.mark.parametrize("reply", [Rep.ERR_UNSUP, Rep.ERR_POLICY])
def test_handshake_starttls_refused_is_fatal(reply):
    hs = Handshake(HandshakePlan(Mode.GO, "disk", tls=True))
    with pytest.raises(OptionError, match="refused TLS") as ei:
        feed(hs, greeting() + rep(Opt.STARTTLS, reply, b"no TLS here"))
    assert ei.value.reply == reply and hs.broken and not hs.tls_wanted


def test_handshake_data_after_starttls_ack_is_a_violation():
    hs = Handshake(HandshakePlan(Mode.LIST, tls=True))
    with pytest.raises(RemoteProtocolError, match="after the STARTTLS ACK"):
        hs.receive_data(greeting() + rep(Opt.STARTTLS, Rep.ACK) + b"\x16\x03")


def test_handshake_tls_needs_fixed_newstyle():
    hs = Handshake(HandshakePlan(Mode.GO, "disk", tls=True))
    with pytest.raises(OptionError, match="not fixed-newstyle"):
        feed(hs, greeting(0))


# -- hunt 14: proto.md "Termination of the session during option haggling" --------


@pytest.mark.parametrize("plan, server", [
    (HandshakePlan(Mode.GO, "nope", structured=False), rep(Opt.GO, Rep.ERR_UNKNOWN, b"no such export")),
    (HandshakePlan(Mode.GO, "d", structured=False), rep(Opt.GO, Rep.ERR_SHUTDOWN, b"stopping")),
    (HandshakePlan(Mode.GO, "d", tls=True), rep(Opt.STARTTLS, Rep.ERR_POLICY, b"no TLS here")),
    (HandshakePlan(Mode.LIST), rep(Opt.LIST, Rep.ERR_POLICY, b"denied")),
])
def test_a_refusal_ends_the_handshake_with_a_soft_disconnect(plan, server):
    """A client ending option haggling MUST use NBD_OPT_ABORT (and MUST on
    ERR_SHUTDOWN); a hard disconnect is only for a peer's breach of a MUST or
    a failed TLS handshake."""
    hs = Handshake(plan)
    sent = hs.data_to_send()
    with pytest.raises(OptionError):
        feed(hs, greeting() + (rep(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP) if plan.structured and not plan.tls
                               and plan.mode is Mode.GO else b"") + server)
    sent += hs.data_to_send()
    _, opts = parse_options(sent)
    assert opts[-1] == (Opt.ABORT, b"")


def test_a_protocol_violation_or_a_non_fixed_server_gets_no_abort():
    hs = Handshake(HandshakePlan(Mode.GO, "d", structured=False))
    with pytest.raises(RemoteProtocolError):
        feed(hs, greeting() + rep(Opt.GO, 0x77))  # not an error, not INFO/ACK
    assert Opt.ABORT not in [o for o, _ in parse_options(hs.data_to_send())[1]]
    hs = Handshake(HandshakePlan(Mode.LIST))
    with pytest.raises(OptionError):
        feed(hs, greeting(0))  # no options at all on a non-fixed server
    assert hs.data_to_send() == wire.CLIENT_FLAGS.pack(0)


def test_eshutdown_allows_only_disc_afterwards():
    """proto.md: a client receiving NBD_ESHUTDOWN MUST initiate a soft disconnect."""
    tx = Transmission(structured=True)
    c1, _ = tx.request(Cmd.FLUSH, 0, 0, 0)
    c2, _ = tx.request(Cmd.FLUSH, 0, 0, 0)
    tx.receive_data(wire.pack_structured_error(c1, wire.Err.ESHUTDOWN, "bye"))
    assert tx.shutdown and tx.events[0].error == errno.ESHUTDOWN
    with pytest.raises(LocalProtocolError, match="ESHUTDOWN"):
        tx.request(Cmd.READ, 0, 0, 1, memoryview(bytearray(1)))
    tx.receive_data(wire.pack_simple_reply(c2, 0))  # the one in flight still completes
    assert tx.events[1].error == 0
    tx.request(Cmd.DISC, 0, 0, 0)
    other = Transmission(structured=False)
    c, _ = other.request(Cmd.FLUSH, 0, 0, 0)
    other.receive_data(wire.pack_simple_reply(c, wire.Err.EIO))
    assert not other.shutdown


def test_an_error_after_meta_context_replies_is_disregarded_not_a_violation():
    """proto.md LIST/SET_META_CONTEXT: replies are META_CONTEXTs "followed by
    either a final ACK on success or by an error"; on an error the client
    MUST disregard the contexts sent -- a failed SET selects none."""
    hs = Handshake(HandshakePlan(Mode.GO, "disk", ("base:allocation",)))
    feed(hs, greeting() + rep(Opt.STRUCTURED_REPLY, Rep.ACK)
         + rep(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, meta(1, "base:allocation"))
         + rep(Opt.SET_META_CONTEXT, Rep.ERR_TOO_BIG, b"too many")
         + rep(Opt.GO, Rep.INFO, info_export(4096, GO_FLAGS)) + rep(Opt.GO, Rep.ACK))
    assert hs.done and not hs.broken and hs.result.meta_contexts == {}


def test_a_maximum_block_size_that_is_no_multiple_of_the_minimum_is_accepted():
    """proto.md: the maximum payload MAY be other than a power of 2 (at least
    the preferred size); nothing asks for a multiple of the minimum."""
    bs = parse_block_size(wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 512, 4096, 1000 * 1000))
    assert (bs.minimum, bs.maximum) == (512, 1000 * 1000)
    with pytest.raises(RemoteProtocolError, match="below the minimum"):
        parse_block_size(wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, 4096, 4096, 512))


def test_an_oldstyle_server_is_refused_clearly():
    """proto.md: oldstyle negotiation is not supported by us (a server SHOULD
    NOT offer it on the newstyle port); its greeting is recognised, not misparsed."""
    hs = Handshake(HandshakePlan(Mode.GO, ""))
    oldstyle = struct.pack(">QQQI", wire.NBDMAGIC, 0x00420281861253, 1 << 20, 1) + bytes(124)
    with pytest.raises(RemoteProtocolError, match="oldstyle"):
        feed(hs, oldstyle)
    assert hs.data_to_send() == b""  # not even client flags
