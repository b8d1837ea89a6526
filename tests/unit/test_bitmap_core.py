"""Bitmap against a plain Python model (a list of bools), driven by hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbdbackup.bitmap.core import BLOCK_WORDS, Bitmap

BLOCK_BITS = BLOCK_WORDS * 64


class Model:
    """The reference: a Python int used as a bit set (bit i = bit i)."""

    def __init__(self, nbits: int, fill: bool) -> None:
        self.n = nbits
        self.v = (1 << nbits) - 1 if fill else 0

    def update(self, start: int, count: int, value: bool) -> None:
        mask = ((1 << count) - 1) << start
        self.v = self.v | mask if value else self.v & ~mask

    def get(self, i: int) -> bool:
        return bool(self.v >> i & 1)

    def window(self, start: int, end: int, value: bool) -> int:
        x = self.v if value else ~self.v
        return (x >> start) & ((1 << max(end - start, 0)) - 1)

    def next(self, start: int, end: int, value: bool) -> int:
        x = self.window(start, end, value)
        return start + (x & -x).bit_length() - 1 if x else -1

    def count(self, start: int, end: int) -> int:
        return self.window(start, end, True).bit_count()

    def runs(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        out = []
        pos = start
        while pos < end:
            value = self.get(pos)
            nxt = self.next(pos, end, not value)
            nxt = end if nxt < 0 else nxt
            out.append((pos, nxt - pos, value))
            pos = nxt
        return out


# Sizes around word and summary-block boundaries; the large ones span several
# summary blocks so block skipping is exercised.
SIZES = [0, 1, 63, 64, 65, 200, BLOCK_BITS - 1, BLOCK_BITS, 2 * BLOCK_BITS + 70, 3 * BLOCK_BITS]


class BitmapMachine(RuleBasedStateMachine):
    """Random operations; after each, the bitmap matches a list of bools."""

    @initialize(nbits=st.sampled_from(SIZES), fill=st.booleans())
    def init(self, nbits: int, fill: bool) -> None:
        self.bm = Bitmap(nbits, fill=fill)
        self.model = Model(nbits, fill)

    def _pos(self, data, lo: int) -> int:
        """A position in [lo, n], often next to a word or block boundary."""
        n = self.model.n
        near = st.builds(
            lambda unit, k, d: min(max(lo, unit * k + d), n),
            st.sampled_from([64, BLOCK_BITS]),
            st.integers(0, n // 64 + 1),
            st.integers(-2, 2),
        )
        return data.draw(st.one_of(st.integers(lo, n), near))

    def _range(self, data):
        start = self._pos(data, 0)
        end = self._pos(data, start)
        return start, end - start

    @rule(data=st.data(), value=st.booleans())
    def update(self, data, value: bool) -> None:
        start, count = self._range(data)
        (self.bm.set if value else self.bm.clear)(start, count)
        self.model.update(start, count, value)

    @rule(value=st.booleans())
    def whole(self, value: bool) -> None:
        if value:
            self.bm.set_all()
        else:
            self.bm.clear_all()
        self.model = Model(self.model.n, value)

    @precondition(lambda self: self.model.n > 0)
    @rule(data=st.data())
    def get(self, data) -> None:
        i = min(self._pos(data, 0), self.model.n - 1)
        assert self.bm.get(i) == self.model.get(i)

    @rule(data=st.data())
    def searches(self, data) -> None:
        start, count = self._range(data)
        end, n, m = start + count, self.model.n, self.model
        assert self.bm.next_set(start, end) == m.next(start, end, True)
        assert self.bm.next_clear(start, end) == m.next(start, end, False)
        assert self.bm.next_set(start) == m.next(start, n, True)
        assert self.bm.next_clear(start) == m.next(start, n, False)
        assert self.bm.count(start, count) == m.count(start, end)
        assert self.bm.any(start, count) == (m.count(start, end) > 0)
        assert self.bm.all(start, count) == (m.count(start, end) == count)

    @rule(data=st.data())
    def runs(self, data) -> None:
        start, count = self._range(data)
        assert list(self.bm.runs(start, start + count)) == self.model.runs(start, start + count)

    @rule(data=st.data())
    def merge(self, data) -> None:
        other = Bitmap(self.model.n)
        for _ in range(data.draw(st.integers(0, 3))):
            start, count = self._range(data)
            other.set(start, count)
            self.model.update(start, count, True)
        self.bm.merge(other)

    @rule()
    def roundtrip(self) -> None:
        data = self.bm.to_bytes()
        n = self.model.n
        assert len(data) == (n + 7) // 8
        assert int.from_bytes(data, "little") == self.model.v
        again = Bitmap.from_bytes(n, data)
        assert again == self.bm
        again._check()
        copy = self.bm.copy()
        assert copy == self.bm
        if n:
            copy.clear(0) if self.model.get(0) else copy.set(0)
            assert copy != self.bm, "copy shares storage"

    @invariant()
    def consistent(self) -> None:
        self.bm._check()
        assert self.bm.count() == self.model.v.bit_count()


TestBitmapMachine = BitmapMachine.TestCase
TestBitmapMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


def test_byte_order_is_lsb_first() -> None:
    bm = Bitmap(20)
    bm.set(0)
    bm.set(9)
    bm.set(19)
    assert bm.to_bytes() == bytes([0b0000_0001, 0b0000_0010, 0b0000_1000])
    assert Bitmap.from_bytes(20, b"\x80\x00\xff").next_set(0) == 7
    # Padding bits beyond nbits are ignored on input.
    assert Bitmap.from_bytes(20, b"\x00\x00\xff").count() == 4


def test_buffer_adopts_content_and_writes_through() -> None:
    buf = bytearray(16)
    buf[0] = 0b101
    buf[15] = 0xFF  # bits 120..127: bits 120..99? padding past nbits=100 must be cleared
    bm = Bitmap(100, buffer=buf)
    assert [bm.get(i) for i in range(4)] == [True, False, True, False]
    assert bm.count() == 2
    assert buf[15] == 0
    bm.set(64, 3)
    assert buf[8] == 0b111
    bm._check()
    filled = Bitmap(100, buffer=buf, fill=True)
    assert filled.count() == 100 and buf[:12] == b"\xff" * 12


def test_buffer_must_be_writable_and_large_enough() -> None:
    with pytest.raises(ValueError):
        Bitmap(64, buffer=bytes(8))
    with pytest.raises(ValueError):
        Bitmap(65, buffer=bytearray(8))


def test_range_validation() -> None:
    bm = Bitmap(10)
    with pytest.raises(ValueError):
        bm.set(5, 6)
    with pytest.raises(ValueError):
        bm.clear(-1)
    with pytest.raises(IndexError):
        bm.get(10)
    with pytest.raises(ValueError):
        bm.next_set(0, 11)
    with pytest.raises(ValueError):
        bm.merge(Bitmap(11))
    assert bm.next_set(10) == -1 and bm.next_clear(10) == -1
    assert list(bm.runs(10)) == []


def test_enumerate_scattered_bits() -> None:
    """next_set/next_clear walk every isolated bit across blocks, in order."""
    n = 5 * BLOCK_BITS + 77
    positions = sorted({(i * 7919) % n for i in range(300)} | {0, 63, 64, BLOCK_BITS, n - 1})
    bm = Bitmap(n)
    for p in positions:
        bm.set(p)
    found, pos = [], 0
    while (pos := bm.next_set(pos)) >= 0:
        found.append(pos)
        pos += 1
    assert found == positions
    bm = Bitmap(n, fill=True)
    for p in positions:
        bm.clear(p)
    found, pos = [], 0
    while (pos := bm.next_clear(pos)) >= 0:
        found.append(pos)
        pos += 1
    assert found == positions
    bm._check()


def test_large_sparse_search_skips_blocks() -> None:
    # 64 Mi bits: next_set across a nearly empty bitmap must be fast and right.
    n = 64 * 1024 * 1024
    bm = Bitmap(n)
    bm.set(n - 3)
    bm.set(12345678, 5)
    assert bm.next_set(0) == 12345678
    assert bm.next_set(12345683) == n - 3
    assert list(bm.runs(12345670, 12345690)) == [
        (12345670, 8, False), (12345678, 5, True), (12345683, 7, False)]
    bm.set_all()
    bm.clear(n - 1)
    assert bm.next_clear(0) == n - 1
    assert bm.count() == n - 1
    bm._check()
