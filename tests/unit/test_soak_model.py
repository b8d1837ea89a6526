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
