"""DirtyBitmap against a model of granule sets, including QEMU's bitmap-mode outcomes."""

from __future__ import annotations

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nbdbackup.bitmap.dirty import BitmapError, BitmapRegistry, DirtyBitmap, check_name


def granules(off: int, length: int, g: int) -> set[int]:
    """Granules touched by a byte range (outward rounding)."""
    return set(range(off // g, (off + length + g - 1) // g)) if length else set()


def inside(off: int, length: int, g: int, size: int) -> set[int]:
    """Granules entirely inside a byte range (the short last granule counts
    when the range reaches the end of the disk)."""
    first = (off + g - 1) // g
    end = off + length
    last = (size + g - 1) // g if end >= size else end // g
    return set(range(first, max(first, last)))


def ranges_of(gs: set[int], g: int, size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for i in sorted(gs):
        lo, hi = i * g, min((i + 1) * g, size)
        if out and out[-1][0] + out[-1][1] == lo:
            out[-1] = (out[-1][0], hi - out[-1][0])
        else:
            out.append((lo, hi - lo))
    return out


class DirtyMachine(RuleBasedStateMachine):
    """Model: P (parent granules as stored), and while frozen P0 (at freeze),
    W (written since), K (reported copied).  QEMU's outcome of a job is
    computed from P0, W, K only; our stored parent must match it."""

    @initialize(g=st.sampled_from([512, 1024, 4096]), n=st.integers(0, 40), tail=st.integers(0, 511),
                recording=st.booleans())
    def init(self, g: int, n: int, tail: int, recording: bool) -> None:
        self.size = n * g + tail
        self.g = g
        self.bm = DirtyBitmap("b", self.size, g, recording=recording)
        self.P: set[int] = set()
        self.recording = recording
        self.frozen = False
        self.succ = None

    def _range(self, data) -> tuple[int, int]:
        off = data.draw(st.integers(0, self.size))
        length = data.draw(st.integers(0, self.size - off))
        return off, length

    @rule(data=st.data())
    def mark(self, data) -> None:
        off, length = self._range(data)
        self.bm.mark(off, length)
        gs = granules(off, length, self.g)
        if self.frozen:
            if self.succ_recording:
                self.W |= gs
        elif self.recording:
            self.P |= gs

    @precondition(lambda self: not self.frozen)
    @rule(value=st.booleans())
    def set_recording(self, value: bool) -> None:
        self.bm.recording = value
        self.recording = value

    @precondition(lambda self: not self.frozen)
    @rule(data=st.data())
    def clear(self, data) -> None:
        off, length = self._range(data)
        self.bm.clear(off, length)
        self.P -= inside(off, length, self.g, self.size)

    @precondition(lambda self: not self.frozen)
    @rule(mode=st.sampled_from(["on-success", "never", "always"]))
    def freeze(self, mode: str) -> None:
        self.mode = mode
        self.succ = self.bm.freeze(mode)
        self.frozen = True
        self.succ_recording = self.recording
        self.P0, self.W, self.K = set(self.P), set(), set()
        assert self.bm.busy and not self.bm.recording
        assert self.succ.recording == self.recording
        with pytest.raises(BitmapError):
            self.bm.freeze()
        with pytest.raises(BitmapError):
            self.bm.clear()

    @precondition(lambda self: self.frozen)
    @rule(data=st.data())
    def copied(self, data) -> None:
        off, length = self._range(data)
        self.bm.copied(off, length)
        if self.mode == "always":
            self.K |= inside(off, length, self.g, self.size) - self.W
        # Writes after a copy make the granule dirty again: K only holds
        # granules copied after their last write.

    @precondition(lambda self: self.frozen)
    @rule(success=st.booleans())
    def finish(self, success: bool) -> None:
        self.bm.finish(success)
        mode = self.mode
        if mode != "never" and success:
            self.P = set(self.W)
        elif mode == "always":
            self.P = self.W | (self.P0 - self.K)
        else:
            self.P = self.P0 | self.W
        self.frozen = False
        self.recording = self.succ_recording
        assert not self.bm.busy and self.bm.successor is None

    @precondition(lambda self: self.frozen)
    @rule(which=st.sampled_from(["abdicate", "reclaim"]))
    def direct(self, which: str) -> None:
        getattr(self.bm, which)()
        self.P = set(self.W) if which == "abdicate" else self.P0 | self.W
        self.frozen = False
        self.recording = self.succ_recording

    @rule(data=st.data(), g2=st.sampled_from([512, 2048, 8192]))
    def merge_in(self, data, g2: int) -> None:
        other = DirtyBitmap("o", self.size, g2)
        off, length = self._range(data)
        other.mark(off, length)
        if self.frozen:
            with pytest.raises(BitmapError):
                self.bm.merge(other)
            return
        self.bm.merge(other)
        for lo, n in ranges_of(granules(off, length, g2), g2, self.size):
            self.P |= granules(lo, n, self.g)

    def stored(self) -> set[int]:
        """What the parent must hold: while frozen, the crash record.

        Copied granules (mode always) are forgotten only when the job ends
        (``finish(False)``): until then nothing is cleared, so a crash or a
        `reclaim` never loses a dirty bit.
        """
        if self.frozen:
            return self.W | self.P0
        return self.P

    @invariant()
    def matches(self) -> None:
        want = self.stored()
        bm = self.bm
        assert {i for i in range(bm.nbits) if bm.bits.get(i)} == want
        exp = ranges_of(want, self.g, self.size)
        assert bm.dirty_ranges() == exp
        assert bm.dirty_count() == sum(n for _, n in exp)
        assert bm.recording == (self.recording and not self.frozen)
        if self.size:
            ext = bm.extents(0, self.size)
            assert ext[0].offset == 0 and ext[-1].end == self.size
            assert all(a.end == b.offset for a, b in zip(ext, ext[1:]))
            assert [(e.offset, e.length) for e in ext if e.flags == 1] == exp
            assert bm.next_dirty(0) == (exp[0][0] if exp else -1)
        if self.frozen:
            assert {i for i in range(bm.nbits) if self.succ.bits.get(i)} == self.W


TestDirtyMachine = DirtyMachine.TestCase
TestDirtyMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


def test_extents_clip_to_the_request_and_max_extents() -> None:
    bm = DirtyBitmap("b", 10 * 4096 + 100, 4096)
    bm.mark(4096 + 1, 1)
    bm.mark(3 * 4096, 4096)
    ext = bm.extents(100, 4 * 4096)
    assert [(e.offset, e.length, e.flags) for e in ext] == [
        (100, 4096 - 100, 0), (4096, 4096, 1), (8192, 4096, 0), (12288, 4096, 1), (16384, 100, 0)]
    assert len(bm.extents(0, bm.size, max_extents=2)) == 2
    assert bm.next_dirty(4096 + 10) == 4096 + 10
    assert bm.next_dirty(5 * 4096) == -1


def test_to_clusters() -> None:
    bm = DirtyBitmap("b", 1 << 20, 4096)
    bm.mark(65536 + 5, 10)
    bm.mark(200000, 70000)
    c = bm.to_clusters(65536)
    assert [i for i in range(c.nbits) if c.get(i)] == [1, 3, 4]
    assert bm.to_clusters(4096) == bm.bits


def test_names_and_granularity() -> None:
    with pytest.raises(BitmapError):
        check_name("")
    check_name("x" * 1023)
    with pytest.raises(BitmapError):
        check_name("é" * 512)  # 1024 bytes
    reg = BitmapRegistry("e", 1 << 20)
    reg.add("a")
    with pytest.raises(BitmapError):
        reg.add("a")
    for g in (256, 3000, 128 << 20, True):
        with pytest.raises(BitmapError):
            reg.add("g", g)
    reg.add("g", 512)
    assert [b.name for b in reg.list()] == ["a", "g"]
    with pytest.raises(BitmapError):
        reg.get("zz")


def test_registry_commands_and_busy_refusals() -> None:
    reg = BitmapRegistry("e", 1 << 20)
    a = reg.add("a", 4096)
    b = reg.add("b", 65536, disabled=True)
    reg.mark(0, 10)
    assert a.dirty_ranges() == [(0, 4096)] and b.dirty_count() == 0
    reg.merge("b", ["a"])
    assert b.dirty_ranges() == [(0, 65536)]
    reg.enable("b")
    reg.rename("b", "c")
    assert "c" in reg and "b" not in reg and reg.get("c").recording
    a.freeze()
    for op in (lambda: reg.remove("a"), lambda: reg.clear("a"), lambda: reg.disable("a"),
               lambda: reg.merge("a", ["c"]), lambda: reg.rename("a", "z")):
        with pytest.raises(BitmapError):
            op()
    reg.merge("c", ["a"])  # a busy bitmap may be read
    a.reclaim()
    reg.remove("a")
    assert len(reg) == 1
    assert reg.get("c").info() == {"name": "c", "granularity": 65536, "count": 65536, "recording": True,
                                   "persistent": False, "busy": False, "inconsistent": False}
