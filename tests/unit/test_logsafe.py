"""Unit tests of `nbd.logsafe`: client text in log lines is short, one line, ASCII."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nbdbackup.nbd.logsafe import CLIP, WarningBudget, clip


def test_short_strings_are_quoted_whole():
    assert clip("disk") == "'disk'"
    assert clip(b"disk") == "b'disk'"
    assert clip(bytearray(b"disk")) == clip(memoryview(b"disk")) == "b'disk'"


def test_long_strings_are_cut_with_their_size():
    assert clip("a" * 65536) == "'" + "a" * CLIP + "'...(65536 bytes)"
    assert clip(b"\x00" * 100, 4) == "b'\\x00\\x00\\x00\\x00'...(100 bytes)"
    assert clip("\xe9" * 100, 2) == "'\\xe9\\xe9'...(200 bytes)"  # the size is in UTF-8 bytes


def test_control_and_non_ascii_characters_are_escaped():
    # A newline must not forge a second log line; ESC and bidi overrides must not reach a terminal.
    assert clip("a\nb\x1b[31m\u202e") == "'a\\nb\\x1b[31m\\u202e'"


@given(st.one_of(st.text(), st.binary()), st.integers(1, 200))
def test_always_one_bounded_ascii_line(value, limit):
    out = clip(value, limit)
    assert out.isascii() and out.isprintable()
    assert len(out) <= 10 * limit + 40


def test_warning_budget_counts_after_the_limit_and_summarises_once():
    b = WarningBudget(limit=3)
    assert [b.allow() for _ in range(10)] == [True] * 3 + [False] * 7
    assert b.summary() == "7 more warnings not logged (limit 3 per connection)"
    assert b.summary() is None
    assert WarningBudget().summary() is None
