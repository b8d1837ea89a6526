"""Unit tests of the protocol's batch interface (`ServerConnection.peek_batch`,
`commit_batch`, small WRITEs waiting whole in the ring): no I/O.

The batch must take exactly what the ordinary parser would turn into valid
READ/WRITE events, in order, with the same fields and payloads, and stop at
the first request it does not take, which the ordinary parser then answers
(errors included).  A hypothesis test checks this against `_validate` for
random request streams.
"""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdbackup.nbd import wire
from nbdbackup.nbd.protocol import (
    BATCH_MAX,
    ExportInfo,
    HandshakeDone,
    ProtocolViolation,
    Request,
    ServerConnection,
    State,
    transmission_flags,
)
from nbdbackup.nbd.wire import Cmd, CmdFlag, Info, Opt

SIZE = 1 << 20
RW = transmission_flags(read_only=False, can_flush=True, can_fua=True, can_trim=True, can_zero=True,
                        can_fast_zero=False, can_cache=True, can_multi_conn=True)
RO = transmission_flags(read_only=True, can_flush=True, can_fua=True, can_trim=True, can_zero=True,
                        can_fast_zero=False, can_cache=True, can_multi_conn=True)
NOFUA = transmission_flags(read_only=False, can_flush=True, can_fua=False, can_trim=True, can_zero=True,
                           can_fast_zero=False, can_cache=True, can_multi_conn=True)
EXPORTS = {
    "disk": ExportInfo("disk", SIZE, RW),
    "ro": ExportInfo("ro", SIZE, RO),
    "nofua": ExportInfo("nofua", SIZE, NOFUA),
    "aligned": ExportInfo("aligned", SIZE, RW, block_size=(512, 4096, wire.MAX_PAYLOAD)),
}


def req(cmd, offset, length, cookie=1, flags=0, payload=b"", magic=wire.REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + payload


def connect(export: str = "disk", structured: bool = True, batching: bool = True) -> ServerConnection:
    conn = ServerConnection(EXPORTS.get, lambda: list(EXPORTS.values()), paced_payloads=True,
                            batching=batching)
    conn.data_to_send()
    msgs = struct.pack(">I", 3)
    if structured:
        msgs += wire.pack_option(Opt.STRUCTURED_REPLY)
    name = export.encode()
    msgs += wire.pack_option(Opt.GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, Info.BLOCK_SIZE))
    conn.receive_data(msgs)
    ev = conn.next_event()
    assert isinstance(ev, HandshakeDone)
    conn.data_to_send()
    return conn


def put(conn: ServerConnection, data: bytes, rng: random.Random, parse: bool = False) -> list:
    """Receive ``data`` in random slices: as the batch path does (``parse``
    False: nothing is consumed, so it must fit in the ring), or parsed, with
    paced payloads granted as the server would; the events (parsed)."""
    mv = memoryview(data)
    out: list = []
    while mv:
        buf = conn.get_buffer(-1)
        assert len(buf), "the ring is full"
        n = min(len(buf), len(mv), rng.randint(1, 9000))
        buf[:n] = mv[:n]
        mv = mv[n:]
        conn.buffer_updated(n, parse=parse)
        if parse:
            out += events(conn)
    return out


def events(conn: ServerConnection) -> list:
    """Every event, granting paced WRITE payloads their memory as the server would."""
    out = []
    while True:
        while (ev := conn.next_event()) is not None:
            out.append(ev)
        if not conn.payload_blocked:
            return out
        conn.allow_payload(conn.payload_need, bytearray(conn.payload_length))


def test_pipelined_reads_and_writes_are_taken_in_order_with_payloads_and_replies():
    rng = random.Random(1)
    for structured in (True, False):
        conn = connect(structured=structured)
        msg = bytearray()
        want = []
        for cookie in range(40):
            n = rng.choice([512, 4096, 8192])
            off = rng.randrange(0, SIZE - n)
            if cookie % 3:
                data = rng.randbytes(n)
                flags = CmdFlag.FUA if cookie % 5 == 0 else 0
                msg += req(Cmd.WRITE, off, n, cookie, flags, data)
                want.append((Cmd.WRITE, int(flags), cookie, off, n, data))
            else:
                msg += req(Cmd.READ, off, n, cookie)
                want.append((Cmd.READ, 0, cookie, off, n, None))
        put(conn, bytes(msg), rng)
        items, reply_bytes, read_bytes = conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)
        assert len(items) == len(want)
        ring = conn.ring
        total = 0
        for item, (cmd, fua, cookie, off, n, data) in zip(items, want):
            icmd, ifua, icookie, ioff, ilen, ppos, nxt, hdr = item
            assert (icmd, ifua, icookie, ioff, ilen) == (cmd, fua, cookie, off, n)
            if cmd == Cmd.WRITE:
                assert bytes(ring[ppos:ppos + n]) == data
                assert hdr == conn.reply_ok(cookie)
                total += len(hdr)
            else:
                assert hdr == conn.read_header(cookie, off, n)
                total += len(hdr) + n
        assert reply_bytes == total
        assert read_bytes == sum(w[4] for w in want if w[0] == Cmd.READ)
        # Nothing was consumed until the commit.
        assert conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0] == items
        conn.commit_batch(items[-1][6])
        conn.parse()
        assert events(conn) == [] and conn.state is State.TRANSMISSION
        assert conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0] == []


def test_the_batch_stops_at_the_first_request_it_does_not_take_and_parse_answers_the_rest():
    # (request, export, errno the ordinary path answers, or "taken" (structured, simple))
    cases = [
        (req(Cmd.READ, SIZE - 100, 200, 9), "disk", 22),                      # past the end: EINVAL
        (req(Cmd.WRITE, SIZE - 100, 200, 9, payload=bytes(200)), "disk", 28),  # past the end: ENOSPC
        (req(Cmd.WRITE, 0, 512, 9, 0x20, bytes(512)), "disk", 22),           # a flag WRITE may not carry
        (req(Cmd.WRITE, 0, 512, 9, CmdFlag.FUA, bytes(512)), "nofua", 22),    # FUA not advertised
        (req(Cmd.READ, 0, 512, 9, CmdFlag.DF), "disk", (True, 22)),           # DF needs structured replies
        (req(Cmd.READ, 0, 512, 9, CmdFlag.FUA), "ro", (True, True)),          # FUA ignored on read-only
        (req(Cmd.WRITE, 0, 512, 9, payload=bytes(512)), "ro", 1),             # read-only: EPERM
        (req(Cmd.READ, 100, 512, 9), "aligned", 22),                          # misaligned
        (req(Cmd.READ, 512, 512, 9), "aligned", (True, True)),                # aligned
        (req(Cmd.FLUSH, 0, 0, 9), "disk", 0),                                 # another command
        (req(Cmd.READ, 0, 0, 9), "disk", 0),                                  # zero length
        (req(Cmd.READ, 0, BATCH_MAX + 512, 9), "disk", 0),                    # too long for a batch
    ]
    for bad, export, outcome in cases:
        for structured in (True, False):
            conn = connect(export, structured)
            before = req(Cmd.READ, 0, 512, 1) + req(Cmd.READ, 512, 512, 2)
            after = req(Cmd.READ, 1024, 512, 3)
            put(conn, before + bad + after, random.Random(2))
            items = conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0]
            err = outcome[0 if structured else 1] if isinstance(outcome, tuple) else outcome
            if err is True:
                assert [i[2] for i in items] == [1, 2, 9, 3], (bad, export, structured)
                continue
            assert [i[2] for i in items] == [1, 2], (bad, export, structured)
            conn.commit_batch(items[-1][6])
            conn.parse()
            evs = events(conn)
            assert [e.cookie for e in evs] == [9, 3]
            assert evs[0].error == err, (bad, export, structured)
            assert evs[1].error == 0


def test_a_bad_magic_ends_the_batch_and_is_a_violation():
    conn = connect()
    put(conn, req(Cmd.READ, 0, 512, 1) + req(Cmd.READ, 0, 512, 2, magic=0x1234) + req(Cmd.READ, 0, 512, 3),
        random.Random(3))
    items = conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0]
    assert [i[2] for i in items] == [1]
    conn.commit_batch(items[0][6])
    conn.parse()
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], ProtocolViolation)
    assert conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0] == []


def test_reply_max_bounds_a_batch_and_read_write_max_are_honoured():
    conn = connect()
    put(conn, b"".join(req(Cmd.READ, 0, 4096, c) for c in range(100)), random.Random(4))
    items, reply_bytes, _ = conn.peek_batch(BATCH_MAX, BATCH_MAX, 64 * 1024)
    assert 15 <= len(items) <= 16 and reply_bytes >= 64 * 1024
    assert conn.peek_batch(4095, BATCH_MAX, 1 << 30)[0] == []
    conn2 = connect()
    put(conn2, req(Cmd.WRITE, 0, 8192, 1, payload=bytes(8192)), random.Random(5))
    assert conn2.peek_batch(BATCH_MAX, 4096, 1 << 30)[0] == []


def test_a_small_write_waits_whole_in_the_ring_and_a_large_one_goes_to_its_buffer():
    conn = connect()
    data = bytes(range(256)) * 256  # 64 KiB: the largest batched WRITE
    msg = req(Cmd.WRITE, 0, len(data), 1, payload=data)
    # 8928 READs put the WRITE's header at 249,984 in the 256 KiB ring, with
    # only 12 KiB after it: the ring must move it to the front to take it whole.
    stream = b"".join(req(Cmd.READ, 0, 512, 100 + i) for i in range(8928)) + msg[:1000]
    pos, evs = 0, []
    while pos < len(stream):  # whole receives, as the kernel would fill them
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(stream) - pos)
        buf[:n] = stream[pos:pos + n]
        pos += n
        conn.buffer_updated(n)
        evs += events(conn)
    assert len(evs) == 8928 and conn.state is State.TRANSMISSION and conn.payload_length == 0
    buf = conn.get_buffer(-1)
    assert len(buf) >= len(msg) - 1000  # room for the rest, in the ring
    put(conn, msg[1000:], random.Random(8), parse=False)
    items = conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0]
    assert [i[2] for i in items] == [1] and bytes(conn.ring[items[0][5]:items[0][5] + len(data)]) == data
    conn.commit_batch(items[0][6])
    put(conn, msg[:1000], random.Random(7), parse=True)
    put(conn, msg[1000:], random.Random(8), parse=False)
    items = conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0]
    assert [i[2] for i in items] == [1] and bytes(conn.ring[items[0][5]:items[0][5] + len(data)]) == data
    # One byte more than a batch takes: the ordinary payload path.
    conn = connect()
    big = bytes(BATCH_MAX + 512)
    conn.receive_data(req(Cmd.WRITE, 0, len(big), 2) + big[:100])
    assert conn.state is State.PAYLOAD and conn.payload_length == len(big)


def test_without_batching_a_small_write_takes_the_payload_path():
    conn = connect(batching=False)
    conn.receive_data(req(Cmd.WRITE, 0, 4096, 1) + bytes(100))
    assert conn.state is State.PAYLOAD


# -------------------------------------------------------- against _validate

_cmds = st.sampled_from([Cmd.READ, Cmd.READ, Cmd.WRITE, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, 77])
_lengths = st.sampled_from([0, 1, 512, 513, 4096, BATCH_MAX - 1, BATCH_MAX, BATCH_MAX + 1])
_offsets = st.sampled_from([0, 1, 512, 4096, SIZE - 4096, SIZE - 512, SIZE - 1, SIZE, 1 << 40])
_flags = st.sampled_from([0, 0, 0, int(CmdFlag.FUA), int(CmdFlag.DF), int(CmdFlag.FUA | CmdFlag.DF), 0x20, 0x8000,
                          int(CmdFlag.NO_HOLE), int(CmdFlag.NO_HOLE | CmdFlag.FUA), int(CmdFlag.FAST_ZERO)])
_request = st.tuples(_cmds, _flags, _offsets, _lengths)


@settings(max_examples=300, deadline=None)
@given(reqs=st.lists(_request, min_size=1, max_size=12),
       export=st.sampled_from(sorted(EXPORTS)), structured=st.booleans(), cut=st.integers(0, 50),
       seed=st.integers(0, 1000))
def test_batch_takes_exactly_the_valid_small_reads_and_writes_the_parser_would(reqs, export, structured, cut,
                                                                               seed):
    # (and every valid WRITE_ZEROES and TRIM: no payload, any length)
    msg = bytearray()
    for cookie, (cmd, flags, off, n) in enumerate(reqs):
        payload = bytes([cookie % 251]) * n if cmd == Cmd.WRITE else b""
        if len(msg) + 28 + len(payload) > 200 * 1024:
            break  # all of it must fit in the ring unparsed
        msg += req(cmd, off, n, cookie, flags, payload)
    msg = bytes(msg[:len(msg) - cut])  # the last request may be incomplete
    ordinary = connect(export, structured, batching=False)
    evs = put(ordinary, msg, random.Random(seed), parse=True)
    batcher = connect(export, structured, batching=True)
    put(batcher, msg, random.Random(seed))
    items = batcher.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0]
    reqs_ev = [e for e in evs if isinstance(e, Request)]
    assert len(items) <= len(reqs_ev)
    for item, ev in zip(items, reqs_ev):
        cmd, fua, cookie, off, n, ppos, nxt, hdr = item
        assert ev.error == 0, (item, ev)
        flags = ev.flags if cmd == Cmd.WRITE_ZEROES else ev.flags & CmdFlag.FUA
        assert (cmd, cookie, off, n, fua) == (ev.cmd, ev.cookie, ev.offset, ev.length, flags)
        if cmd == Cmd.WRITE:
            assert bytes(batcher.ring[ppos:ppos + n]) == bytes(ev.payload)
    if len(items) < len(reqs_ev):
        nxt_ev = reqs_ev[len(items)]
        # The first request not taken is one the batch must not take.
        assert (nxt_ev.error or nxt_ev.cmd not in (Cmd.READ, Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM)
                or not nxt_ev.length or (nxt_ev.cmd in (Cmd.READ, Cmd.WRITE) and nxt_ev.length > BATCH_MAX)
                # (peek_batch asks every request to be aligned; _validate only READ/WRITE)
                or (export == "aligned" and (nxt_ev.offset % 512 or nxt_ev.length % 512))), nxt_ev
    # After the commit, the ordinary parse answers the rest exactly as before.
    if items:
        batcher.commit_batch(items[-1][6])
    batcher.parse()
    rest = events(batcher)
    got = [(e.cookie, e.cmd, e.error) if isinstance(e, Request) else type(e).__name__ for e in rest]
    want = [(e.cookie, e.cmd, e.error) if isinstance(e, Request) else type(e).__name__
            for e in evs if not (isinstance(e, Request) and e.cookie in {i[2] for i in items})]
    assert got == want


def test_one_at_a_time_leaves_the_requests_behind_an_event_in_the_ring():
    conn = connect()
    msg = (req(Cmd.FLUSH, 0, 0, 1) + req(Cmd.READ, 0, 512, 2) + req(Cmd.WRITE, 0, 512, 3, payload=bytes(512))
           + req(Cmd.CACHE, 0, 512, 4) + req(Cmd.READ, 0, 512, 5))
    put(conn, msg, random.Random(9))
    assert conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0] == []  # FLUSH first: nothing to batch
    conn.one_at_a_time = True
    conn.parse()
    assert [e.cookie for e in events(conn)] == [1]
    items = conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0]
    assert [i[2] for i in items] == [2, 3]
    conn.commit_batch(items[-1][6])
    conn.parse()
    assert conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0] == []  # the CACHE event waits
    assert [e.cookie for e in events(conn)] == [4]
    assert [i[2] for i in conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0]] == [5]
    conn.one_at_a_time = False
    conn.parse()
    assert [e.cookie for e in events(conn)] == [5]


def test_write_zeroes_and_trim_are_batched_with_their_flags_only_where_advertised():
    msg = (req(Cmd.WRITE_ZEROES, 0, 1 << 19, 1, CmdFlag.NO_HOLE) + req(Cmd.TRIM, 4096, 4096, 2, CmdFlag.FUA)
           + req(Cmd.WRITE_ZEROES, 0, 512, 3, CmdFlag.FUA) + req(Cmd.READ, 0, 512, 4))
    for structured in (True, False):
        conn = connect("disk", structured)
        put(conn, msg, random.Random(3))
        items, out, _ = conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)
        assert [(i[0], i[1], i[2], i[3], i[4], i[5]) for i in items] == [
            (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE, 1, 0, 1 << 19, 0), (Cmd.TRIM, CmdFlag.FUA, 2, 4096, 4096, 0),
            (Cmd.WRITE_ZEROES, CmdFlag.FUA, 3, 0, 512, 0), (Cmd.READ, 0, 4, 0, 512, 0)]
        assert items[0][7] == conn.reply_ok(1) and items[1][7] == conn.reply_ok(2)
    # Not taken: FAST_ZERO not advertised, FUA not advertised, read-only export, past the end.
    for bad, export in ((req(Cmd.WRITE_ZEROES, 0, 512, 9, CmdFlag.FAST_ZERO), "disk"),
                        (req(Cmd.TRIM, 0, 512, 9, CmdFlag.FUA), "nofua"),
                        (req(Cmd.TRIM, 0, 512, 9), "ro"), (req(Cmd.WRITE_ZEROES, 0, 512, 9), "ro"),
                        (req(Cmd.WRITE_ZEROES, SIZE - 512, 1024, 9), "disk")):
        conn = connect(export)
        put(conn, req(Cmd.READ, 0, 512, 1) + bad, random.Random(4))
        assert [i[2] for i in conn.peek_batch(BATCH_MAX, BATCH_MAX, 1 << 30)[0]] == [1], (bad, export)
