"""Unit tests of `nbd.budget` (accounting only, no I/O) and of the paced
payload path of `nbd.protocol` that draws on it."""

from __future__ import annotations

import mmap
import random
import struct

import pytest

from nbdbackup.nbd import wire
from nbdbackup.nbd.budget import STEP, Charge, MemoryBudget, new_payload_buffer
from nbdbackup.nbd.protocol import ExportInfo, Request, ServerConnection

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def budget(limit=64 * MiB, reserve=32 * MiB, **kw) -> MemoryBudget:
    return MemoryBudget(limit, reserve, clock=Clock(), **kw)


def test_limit_must_hold_two_largest_requests():
    with pytest.raises(ValueError):
        MemoryBudget(63 * MiB, 32 * MiB)
    MemoryBudget(64 * MiB, 32 * MiB)


def test_ordinary_takes_stop_at_limit_minus_reserve_and_come_back():
    b = budget()
    a, c = Charge("a"), Charge("c")
    assert b.try_take(a, 20 * MiB)
    assert b.try_take(a, 12 * MiB)
    assert not b.try_take(c, 1)  # the ordinary part (32 MiB) is spent; the reserve is not for takes
    assert b.used == 32 * MiB and a.held == 32 * MiB
    b.release(a)
    assert b.used == 0 and a.held == 0
    assert b.try_take(c, 32 * MiB)


def test_grant_order_least_held_first_then_arrival():
    b = budget()
    hog = Charge("hog")
    assert b.try_take(hog, 32 * MiB)
    got = []
    big, small = Charge("big"), Charge("small")
    fin = Charge("fin")
    # The first waiter becomes the finisher (reserve free): granted at once.
    b.wait(fin, 1 * MiB, lambda n: got.append(("fin", n)), whole=32 * MiB)
    assert got == [("fin", 32 * MiB)] and fin.finisher and b.used == 64 * MiB
    b.wait(big, 8 * MiB, lambda n: got.append(("big", n)))
    b.wait(small, 1 * MiB, lambda n: got.append(("small", n)))
    assert len(got) == 1  # the reserve is taken, the ordinary part full: both wait
    b.release(fin)
    # The slot came free: the oldest (big) became the finisher, small still waits.
    assert got[1] == ("big", 8 * MiB) and big.finisher and b.finisher is big
    assert len(got) == 2
    # A new request holding nothing may not overtake small (it holds nothing either).
    assert not b.try_take(Charge("late"), 1)
    b.release(hog)
    assert got[2] == ("small", 1 * MiB)
    assert b.waiting == 0
    b.release(big)
    b.release(small)
    assert b.used == 0


def test_no_deadlock_when_every_payload_holds_part_of_the_budget():
    """Sixteen 32 MiB payloads received step by step in a 64 MiB budget:
    each connection takes a step only when the previous one was filled, and
    waits (holding what it has) when the budget is spent.  The reserve rule
    must let every one of them finish."""
    rng = random.Random(7)
    b = budget()
    n_conns, length = 16, 32 * MiB
    held_steps = {i: 0 for i in range(n_conns)}
    granted = {i: 0 for i in range(n_conns)}
    charges = {i: Charge(i) for i in range(n_conns)}
    waiting: set[int] = set()
    done: set[int] = set()

    def on_grant(i):
        def cb(n):
            waiting.discard(i)
            granted[i] += n
        return cb

    steps = 0
    while len(done) < n_conns:
        steps += 1
        assert steps < 100000, "no progress: deadlock"
        assert b.used <= b.limit
        runnable = [i for i in range(n_conns) if i not in waiting and i not in done]
        assert runnable or b.waiting == 0, "everybody waits"
        if not runnable:
            break
        i = rng.choice(runnable)
        if granted[i] == length:  # whole payload in: the request runs and ends
            b.release(charges[i])
            done.add(i)
            continue
        need = length - granted[i]
        n = min(need, STEP)
        if b.try_take(charges[i], n):
            granted[i] += n
        else:
            waiting.add(i)
            b.wait(charges[i], n, on_grant(i), whole=need)
        held_steps[i] += 1
    assert done == set(range(n_conns))
    assert b.used == 0 and b.waiting == 0


def test_a_request_holding_nothing_goes_before_partial_payloads():
    b = budget()
    p = {name: Charge(name) for name in ("p0", "p1", "p2", "p3")}
    for name, mib in (("p0", 11), ("p1", 8), ("p2", 6), ("p3", 7)):
        assert b.try_take(p[name], mib * MiB)
    fin = Charge("fin")
    b.wait(fin, 32 * MiB, lambda n: None)  # the ordinary part is full: takes the reserve
    assert fin.finisher
    got = []
    for name in ("p1", "p2", "p3"):
        b.wait(p[name], MiB, lambda n, name=name: got.append(name))
    read = Charge("read")
    b.wait(read, MiB, lambda n: got.append("read"))
    assert got == [] and b.waiting == 4
    assert not b.try_take(Charge("new"), 1)  # queued "read" holds as little: no overtaking
    b.release(p["p0"])  # 11 MiB back
    assert got == ["read", "p2", "p3", "p1"]  # least held first
    assert b.try_take(Charge("new"), 1)


def test_equal_requests_go_to_the_connection_holding_least_first():
    """docs/fairmem.md: a connection that queued many READs and holds memory
    (replies its client does not read) does not get every freed byte before
    a READ of another connection queued after them; owners holding nothing
    alike are served in turn, not one connection's whole queue first."""
    b = budget()
    hog, s_old, fin = Charge("hog"), Charge("s"), Charge("fin")
    assert b.try_take(hog, 28 * MiB) and b.try_take(s_old, 4 * MiB)
    b.wait(fin, 32 * MiB, lambda n: None)
    assert fin.finisher and b.by_owner == {"hog": 28 * MiB, "s": 4 * MiB, "fin": 32 * MiB}
    got = []
    reads = {}
    for name in ("s1", "s2", "s3", "g1", "t1", "t2", "g2"):
        reads[name] = Charge(name[0])
        b.wait(reads[name], MiB, lambda n, name=name: got.append(name))
    assert got == [] and b.waiting == 7
    b.release(hog)  # 28 MiB back: every READ fits
    # g and t hold nothing: served in turn (arrival order among owners holding
    # alike: t2 came before g2), then s, which holds 4 MiB already.
    assert got == ["g1", "t1", "t2", "g2", "s1", "s2", "s3"]
    assert b.by_owner["s"] == 7 * MiB and b.by_owner["g"] == b.by_owner["t"] == 2 * MiB
    for ch in (*reads.values(), s_old, fin):
        b.release(ch)
    assert b.used == 0 and b.by_owner == {}


def test_cancel_drops_the_waits_of_a_dead_connection():
    b = budget()
    hog, fin = Charge("hog"), Charge("fin")
    assert b.try_take(hog, 32 * MiB)
    b.wait(fin, 32 * MiB, lambda n: None)
    assert fin.finisher
    called = []
    dead = Charge("dead")
    b.wait(dead, 4 * MiB, lambda n: called.append(n))
    assert b.waiting == 1
    assert b.cancel("dead") == 1
    assert b.waiting == 0
    b.release(hog)
    assert called == []
    b.release(fin)
    assert b.used == 0


def test_pool_is_charged_bounded_and_dropped_first():
    b = budget(pool_max=8 * MiB)
    c = Charge()
    assert b.try_take(c, 4 * MiB)
    buf = bytearray(4 * MiB)
    b.release(c, buf)
    assert b.pooled == 4 * MiB and b.used == 4 * MiB  # pooled bytes count
    d = Charge()
    assert b.take_pooled(d, 4 * MiB) is buf and d.held == 4 * MiB and b.pooled == 0
    b.release(d, buf)
    e = Charge()
    assert b.try_take(e, 4 * MiB)
    b.release(e, bytearray(4 * MiB))
    f = Charge()
    assert b.try_take(f, 4 * MiB)
    b.release(f, bytearray(4 * MiB))  # over pool_max: dropped, not pooled
    assert b.pooled == 8 * MiB
    # A take that needs the room gets it by dropping pooled buffers.
    g = Charge()
    assert b.try_take(g, 30 * MiB)
    assert b.used <= b.ordinary_limit and b.pooled <= 2 * MiB
    b.release(g)


def test_decay_drops_an_unused_pool():
    b = budget()
    c = Charge()
    assert b.try_take(c, MiB)
    b.release(c, bytearray(MiB))
    assert b.pooled == MiB
    assert b.take_pooled(Charge(), MiB) is not None  # used since the last decay
    b.used -= MiB  # (charge dropped without release: keep the books simple)
    c2 = Charge()
    assert b.try_take(c2, MiB)
    b.release(c2, bytearray(MiB))
    assert b.decay() == 0 and b.pooled == MiB  # it was used: kept
    assert b.decay() == MiB and b.pooled == 0  # idle for a whole period: dropped


def test_oldest_wait_reports_the_head():
    b = budget()
    assert b.try_take(Charge(), 32 * MiB)
    assert b.try_take is not None
    fin = Charge()
    b.wait(fin, 32 * MiB, lambda n: None)
    b.clock.t = 5.0
    b.wait(Charge(), MiB, lambda n: None)
    b.clock.t = 7.5
    assert b.oldest_wait() == pytest.approx(2.5)


def test_large_payload_buffers_are_lazily_resident_mmaps():
    assert isinstance(new_payload_buffer(STEP), bytearray)
    big = new_payload_buffer(STEP + 1)
    assert isinstance(big, mmap.mmap) and len(big) == STEP + 1


# ------------------------------------------------------------ paced protocol

INFO = ExportInfo("d", 64 * MiB, wire.TransmissionFlag.HAS_FLAGS, (1, 4096, wire.MAX_PAYLOAD))


def transmitting() -> ServerConnection:
    c = ServerConnection(lambda n: INFO if n == "d" else None, lambda: [INFO], paced_payloads=True)
    c.receive_data(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    c.receive_data(struct.pack(">QII", wire.IHAVEOPT, 1, 1) + b"d")  # EXPORT_NAME
    c.data_to_send()
    ev = c.next_event()
    assert type(ev).__name__ == "HandshakeDone"
    return c


def write_header(length: int, offset: int = 0, cookie: int = 1) -> bytes:
    return struct.pack(">IHHQQI", wire.REQUEST_MAGIC, 0, 1, cookie, offset, length)


def test_paced_payload_takes_nothing_until_bytes_arrive_then_only_what_was_granted():
    c = transmitting()
    c.receive_data(write_header(8 * MiB))
    assert c.payload_length == 8 * MiB and c.payload_need == 8 * MiB
    assert not c.payload_blocked  # header only: no memory needed yet
    c.receive_data(b"x" * 1000)  # lands in the ring
    assert c.payload_blocked and c.next_event() is None
    buf = new_payload_buffer(8 * MiB)
    c.allow_payload(STEP, buf)
    assert not c.payload_blocked
    mv = c.get_buffer(-1)
    assert len(mv) == STEP - 1000  # never more than granted
    mv[:] = b"y" * len(mv)
    c.buffer_updated(len(mv))
    assert c.payload_blocked and c.payload_need == 8 * MiB - STEP
    c.allow_payload(c.payload_need)
    rest = 8 * MiB - STEP
    while rest:
        mv = c.get_buffer(-1)
        n = min(len(mv), rest)
        mv[:n] = b"z" * n
        c.buffer_updated(n)
        rest -= n
    ev = c.next_event()
    assert isinstance(ev, Request) and ev.payload is buf and ev.error == 0
    assert bytes(buf[:1000]) == b"x" * 1000 and buf[STEP - 1] == ord("y") and buf[STEP] == ord("z")


def test_unpaced_protocol_allocates_as_before():
    c = ServerConnection(lambda n: INFO, lambda: [INFO])
    c.receive_data(struct.pack(">I", 3) + struct.pack(">QII", wire.IHAVEOPT, 1, 1) + b"d")
    c.next_event()
    c.receive_data(write_header(4) + b"abcd")
    ev = c.next_event()
    assert isinstance(ev, Request) and bytes(ev.payload) == b"abcd"


def test_read_replies_never_get_a_pooled_mmap():
    """Transports write only bytes-like objects: a pooled payload mmap of the
    same size must not be handed to a READ."""
    b = budget()
    c = Charge()
    assert b.try_take(c, 2 * MiB)
    mm = new_payload_buffer(2 * MiB)
    b.release(c, mm)
    assert b.take_pooled(Charge(), 2 * MiB) is None
    got = b.take_pooled(Charge(), 2 * MiB, mapped=True)
    assert got is mm
