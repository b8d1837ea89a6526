"""Unit tests of the hand-off interface of the sans-IO server protocol
(`ServerConnection.resumed`, `ServerConnection.unconsumed`; `nbd.worker`):
no I/O.

A connection is cut at a random point of a random request stream (bytes
received in random slices, some of its events taken, a paced WRITE payload
possibly half received or not yet granted, requests queued as events, a
small WRITE waiting whole in the ring): a `resumed` connection fed
``unconsumed()`` and then the rest of the stream must yield exactly the
events the uncut connection yields.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdbackup.nbd import wire
from nbdbackup.nbd.protocol import Disconnect, ProtocolViolation, Request, ServerConnection, State
from nbdbackup.nbd.wire import Cmd, CmdFlag

from test_server_batch_protocol import EXPORTS, connect, events, req

SIZE = 1 << 20


def stream(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    for cookie in range(1, n + 1):
        kind = rng.random()
        if kind < 0.45:
            ln = rng.choice([512, 4096, 70000, 300000])
            out += req(Cmd.WRITE, rng.randrange(0, SIZE - ln), ln, cookie,
                       int(CmdFlag.FUA) if rng.random() < 0.2 else 0, rng.randbytes(ln))
        elif kind < 0.8:
            ln = rng.choice([512, 4096, 100000])
            out += req(Cmd.READ, rng.randrange(0, SIZE - ln), ln, cookie)
        elif kind < 0.9:
            out += req(Cmd.FLUSH, 0, 0, cookie)
        else:
            out += req(Cmd.READ, SIZE, 4096, cookie)  # invalid: answered with EINVAL
    return bytes(out)


def key(ev) -> tuple:
    if isinstance(ev, Request):
        return ("req", ev.cookie, ev.cmd, ev.flags, ev.offset, ev.length,
                bytes(ev.payload) if ev.payload is not None else None, ev.error)
    return (type(ev).__name__,)


def feed(conn: ServerConnection, data: bytes, rng: random.Random, grant: bool = True,
         take: bool = True) -> list:
    """Receive ``data`` in random slices, granting payload memory (``grant``:
    always; else at random) and taking events (``take``: always; else at
    random, leaving some queued).  Returns the events taken."""
    mv = memoryview(data)
    out: list = []
    while mv:
        buf = conn.get_buffer(-1)
        if not len(buf):  # the ring is full behind a paced payload: grant
            conn.allow_payload(conn.payload_need, None if conn._payload is not None
                               else bytearray(conn.payload_length))
            continue
        n = min(len(buf), len(mv), rng.randint(1, 50000))
        buf[:n] = mv[:n]
        mv = mv[n:]
        conn.buffer_updated(n)
        if conn.payload_blocked and (grant or rng.random() < 0.5):
            conn.allow_payload(conn.payload_need if rng.random() < 0.5 else min(conn.payload_need, 8192),
                               None if conn._payload is not None else bytearray(conn.payload_length))
        if take or rng.random() < 0.3:
            while (ev := conn.next_event()) is not None:
                out.append(ev)
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), structured=st.booleans(), batching=st.booleans())
def test_a_resumed_connection_continues_exactly_where_the_cut_one_stopped(seed, structured, batching):
    rng = random.Random(seed)
    data = stream(rng, rng.randint(1, 30))
    whole = connect(structured=structured, batching=batching)
    want = [key(e) for e in feed(whole, data, random.Random(1)) + events(whole)]

    cut_at = rng.randrange(0, len(data) + 1)
    a = connect(structured=structured, batching=batching)
    got = [key(e) for e in feed(a, data[:cut_at], rng, grant=False, take=False)]
    rest = a.unconsumed()
    assert rest is not None
    b = ServerConnection.resumed(EXPORTS["disk"], structured=structured, contexts=dict(a.contexts),
                                 paced_payloads=True, batching=batching)
    assert b.data_to_send() == b""
    assert b.tflags == a.tflags and b.structured == a.structured and b.state is State.TRANSMISSION
    got += [key(e) for e in feed(b, rest + data[cut_at:], random.Random(2)) + events(b)]
    assert got == want


def test_unconsumed_holds_the_partial_payload_then_the_ring_in_stream_order():
    conn = connect()
    payload = bytes(range(256)) * 1024  # 256 KiB: received into its own buffer when granted
    first = req(Cmd.WRITE, 0, len(payload), 7, 0, payload)
    conn.receive_data(first[:28 + 1000])
    assert conn.payload_blocked
    conn.allow_payload(4096, bytearray(len(payload)))
    assert conn.unconsumed() == first[:28 + 1000]
    buf = conn.get_buffer(-1)
    buf[:3000] = first[28 + 1000:28 + 4000]
    conn.buffer_updated(3000)
    assert conn.unconsumed() == first[:28 + 4000]


def test_queued_events_are_re_sent_and_a_violation_cannot_be():
    conn = connect()
    conn.receive_data(req(Cmd.READ, 0, 512, 1) + req(Cmd.FLUSH, 0, 0, 2))
    assert conn.unconsumed() == req(Cmd.READ, 0, 512, 1) + req(Cmd.FLUSH, 0, 0, 2)
    bad = connect()
    bad.receive_data(req(Cmd.READ, 0, 512, 1, magic=0x1234))
    assert bad.unconsumed() is None  # nothing after a violation may be served elsewhere
    disc = connect()
    disc.receive_data(req(Cmd.DISC, 0, 0, 1))
    assert disc.unconsumed() is None


@pytest.mark.parametrize("structured", [True, False])
def test_a_resumed_connection_answers_with_the_negotiated_reply_style(structured):
    b = ServerConnection.resumed(EXPORTS["disk"], structured=structured, contexts={0: "base:allocation"})
    assert b.reply_ok(5)[:4] == struct.pack(">I", wire.STRUCTURED_REPLY_MAGIC if structured
                                            else wire.SIMPLE_REPLY_MAGIC)
    b.receive_data(req(Cmd.BLOCK_STATUS, 0, 4096, 3))
    (ev,) = [b.next_event()]
    assert isinstance(ev, Request) and (ev.error == 0) == structured


def feed_fast(conn: ServerConnection, data: bytes, rng: random.Random,
              whole: float = 0.5) -> tuple[list, int]:
    """`feed` as `nbd.server` receives: `payload_received` first, then
    `buffer_updated` when it declines; payloads granted in random steps
    (paced: some receives end exactly at a grant).  Returns (events, how
    many receives the fast path took).  ``whole``: how often a receive
    fills all the memory `get_buffer` gave (else 1..50,000 bytes)."""
    mv = memoryview(data)
    out: list = []
    fast = 0
    while mv:
        buf = conn.get_buffer(-1)
        if not len(buf):
            conn.allow_payload(conn.payload_need, None if conn._payload is not None
                               else bytearray(conn.payload_length))
            continue
        n = min(len(buf), len(mv), len(buf) if rng.random() < whole else rng.randint(1, 50000))
        buf[:n] = mv[:n]
        mv = mv[n:]
        if conn.payload_received(n):
            fast += 1
            assert not conn.payload_blocked and not conn.has_events
        else:
            conn.buffer_updated(n)
        if conn.payload_blocked:
            conn.allow_payload(conn.payload_need if rng.random() < 0.5 else min(conn.payload_need, 8192),
                               None if conn._payload is not None else bytearray(conn.payload_length))
        while (ev := conn.next_event()) is not None:
            out.append(ev)
    return out, fast


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), structured=st.booleans(), batching=st.booleans())
def test_the_mid_payload_fast_path_yields_exactly_the_events_of_buffer_updated(seed, structured, batching):
    """`payload_received` (what the server tries first on every receive)
    changes nothing but the bytes counted: the same stream in the same
    slices gives the same events, payloads byte for byte, as plain
    `buffer_updated`; and it declines the receive that completes a payload
    or fills its grant (else the request would never be parsed, or a
    paced payload never granted more)."""
    rng = random.Random(seed)
    data = stream(rng, rng.randint(1, 30))
    plain = connect(structured=structured, batching=batching)
    want = [key(e) for e in feed(plain, data, random.Random(seed + 1)) + events(plain)]
    fast = connect(structured=structured, batching=batching)
    got, _ = feed_fast(fast, data, random.Random(seed + 1))
    assert [key(e) for e in got + events(fast)] == want


def test_the_mid_payload_fast_path_takes_the_middle_receives_of_a_large_write():
    conn = connect()
    payload = random.Random(3).randbytes(300000)
    data = req(Cmd.WRITE, 0, len(payload), 7, 0, payload) + req(Cmd.FLUSH, 0, 0, 8)
    got, fast = feed_fast(conn, data, random.Random(4), whole=0.0)
    assert fast > 0
    assert [key(e) for e in got + events(conn)] == [
        ("req", 7, Cmd.WRITE, 0, 0, len(payload), payload, 0), ("req", 8, Cmd.FLUSH, 0, 0, 0, None, 0)]
