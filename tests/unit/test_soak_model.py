"""The chaos soak's model (bench/soak.py `Model`, hunt 16): what a crash may leave, what a
bitmap must hold.  Pure bookkeeping on made-up digests; nothing is started."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def soak():
    pytest.importorskip("nbd")
    sys.path.insert(0, str(BENCH))
    try:
        import soak as mod
    finally:
        sys.path.remove(str(BENCH))
    return mod


A, B, C, D = (bytes([i]) * 16 for i in (1, 2, 3, 4))


def test_unflushed_write_may_come_back_old_or_new_flushed_only_new(soak):
    m = soak.Model(4)
    z = soak.ZERO
    m.wrote(0, A, durable=False)
    m.wrote(0, B, durable=False)
    m.wrote(1, A, durable=False)
    m.flushed()
    m.wrote(2, C, durable=False)
    m.wrote(3, D, durable=True)  # FUA
    # Block 0 and 1 were flushed, 3 is FUA: only their last values; block 2: zeroes or C.
    assert m.crash_check([B, A, z, D]) == (0, 1)
    for bad in ([A, A, C, D], [B, z, C, D], [B, A, C, z]):
        m2 = soak.Model(4)
        m2.wrote(0, A, durable=False)
        m2.wrote(0, B, durable=False)
        m2.wrote(1, A, durable=False)
        m2.flushed()
        m2.wrote(2, C, durable=False)
        m2.wrote(3, D, durable=True)
        with pytest.raises(soak.Violation):
            m2.crash_check(bad)


def test_every_value_written_since_the_flush_is_allowed_nothing_else(soak):
    m = soak.Model(1)
    m.wrote(0, A, durable=True)
    m.wrote(0, B, durable=False)
    m.wrote(0, C, durable=False)
    assert m.maybe[0] == {A, B, C}
    with pytest.raises(soak.Violation):
        m.crash_check([D])


def test_unanswered_request_counts_for_a_bitmap_only_if_it_landed(soak):
    m = soak.Model(3)
    m.since["b"] = set()
    m.wrote(0, A, durable=False)  # acknowledged: the bitmap must have it
    m.attempted(1, B)  # never answered, landed
    m.attempted(2, C)  # never answered, did not land
    assert m.since["b"] == {0}
    assert m.crash_check([A, B, soak.ZERO]) == (1, 0)
    assert m.since["b"] == {0, 1}
    assert m.cur == [A, B, soak.ZERO] and not m.maybe and not m.tentative


def test_acknowledged_trim_not_read_back_is_in_the_bitmap(soak):
    m = soak.Model(1)
    m.since["b"] = set()
    m.attempted(0, soak.ZERO, acked=True)
    assert m.since["b"] == {0}


def test_compare_names_the_blocks(soak):
    soak.compare("x", [A, B], [A, B])
    soak.compare("x", [A, B], [C, B], blocks={1})
    with pytest.raises(soak.Violation, match=r"1 blocks differ, first \[0\]"):
        soak.compare("x", [A, B], [C, B])


def test_a_fua_write_over_unflushed_ones_is_the_only_value_left(soak):
    m = soak.Model(1)
    m.wrote(0, A, durable=False)
    m.wrote(0, B, durable=True)  # FUA over the whole block
    assert 0 not in m.maybe
    with pytest.raises(soak.Violation):
        m.crash_check([A])


# -- the pipelined writer's batches (hunt 17: `Model.settle`) ----------------------------


def test_batch_block_holds_any_request_of_the_batch_never_the_old_value(soak):
    # Two acknowledged writes in flight together over block 1: either order is fine, but once
    # both are answered block 1 cannot read its value from before the batch.
    for seen in (B, C):
        m = soak.Model(3)
        m.wrote(1, A, durable=True)
        m.settle([(0, [B, B], True), (1, [C, C], True)], {0: B, 1: seen, 2: C}, flushed=False)
        assert m.cur == [B, seen, C]
    m = soak.Model(3)
    m.wrote(1, A, durable=True)
    with pytest.raises(soak.Violation, match="block 1"):
        m.settle([(0, [B, B], True), (1, [C, C], True)], {0: B, 1: A, 2: C}, flushed=False)
    m = soak.Model(3)
    with pytest.raises(soak.Violation, match="block 2"):
        m.settle([(0, [B, B], True), (1, [C, C], True)], {0: B, 1: B, 2: D}, flushed=False)


def test_batch_trim_or_failed_request_may_leave_the_old_value(soak):
    m = soak.Model(2)
    m.wrote(0, A, durable=True)
    m.wrote(1, A, durable=True)
    # block 0: a TRIM and a write in flight: old, zeroes or the write; block 1: a failed write.
    m.settle([(0, [None], True), (0, [B], True), (1, [C], False)], {0: A, 1: A}, flushed=False)
    assert m.cur == [A, A]
    for seen0 in (soak.ZERO, B):
        m2 = soak.Model(2)
        m2.settle([(0, [None], True), (0, [B], True)], {0: seen0, 1: soak.ZERO}, flushed=False)
        assert m2.cur[0] == seen0


def test_batch_flush_makes_only_earlier_acknowledged_blocks_durable(soak):
    m = soak.Model(3)
    m.wrote(0, A, durable=False)  # acknowledged before the batch was sent
    m.wrote(1, A, durable=False)  # ditto, but the batch writes block 1 again
    m.settle([(1, [B], True), (2, [C], True)], {1: B, 2: C}, flushed=True)
    assert 0 not in m.maybe  # the FLUSH was sent after its write was answered
    assert m.maybe[1] == {soak.ZERO, A, B} and m.maybe[2] == {soak.ZERO, C}
    with pytest.raises(soak.Violation, match="block 0"):
        m.crash_check([soak.ZERO, A, C])
    # (a batch whose FLUSH failed or that had none makes nothing durable)
    m2 = soak.Model(1)
    m2.wrote(0, A, durable=False)
    m2.settle([], {}, flushed=False)
    assert m2.maybe[0] == {soak.ZERO, A}


def test_batch_fua_is_not_credited_when_another_request_shares_the_block(soak):
    # A FUA write answered first may be overwritten by a concurrent unflushed one: a crash may
    # then leave either, or the old value -- settle never shrinks the crash set on FUA.
    m = soak.Model(1)
    m.settle([(0, [A], True), (0, [B], True)], {0: B}, flushed=False)
    assert m.maybe[0] == {soak.ZERO, A, B}
    assert m.crash_check([soak.ZERO]) == (0, 1)


def test_batch_bitmap_sets_and_dead_connection(soak):
    m = soak.Model(4)
    m.since["b"] = set()
    m.wrote(3, D, durable=True)
    # The connection died: block 0's write was answered, block 1's not; nothing read back.
    m.settle([(0, [A], True), (1, [B], False)], None, flushed=False)
    assert m.since["b"] == {0, 3} and m.tentative["b"] == {1}
    assert m.cur[0] == soak.ZERO  # unknown until the crash check reads it
    assert m.crash_check([A, B, soak.ZERO, D]) == (2, 0)  # both landed: results unknown, not lost
    assert m.since["b"] == {0, 1, 3}
    with pytest.raises(soak.Violation):
        m2 = soak.Model(2)
        m2.settle([(0, [A], True)], None, flushed=False)
        m2.crash_check([C, soak.ZERO])
