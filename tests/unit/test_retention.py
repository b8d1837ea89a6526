"""Unit tests of `agent.retention`: fixed cases from restic's documentation, edge
cases (ISO weeks, time zones, future snapshots, calendar durations) and
hypothesis properties against a set-based model of the rules."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings, strategies as st

from nbdbackup.agent.retention import UNLIMITED, Duration, Policy, kept, plan, removed
from nbdbackup.errors import ConfigError

UTC = datetime.timezone.utc


def T(*a: int, tz: datetime.tzinfo = UTC) -> datetime.datetime:
    return datetime.datetime(*a, tzinfo=tz)


def reasons(decisions) -> dict[str, list[str]]:
    return {d.name: [str(r) for r in d.reasons] for d in decisions}


# -- fixed cases ---------------------------------------------------------------


def test_restic_doc_twelve_sundays_keep_daily_4():
    """doc/060_forget.rst: one backup every Sunday for 12 weeks, ``--keep-daily 4``
    keeps the last four Sundays and removes the other eight."""
    snaps = [(f"s{i:02d}", T(2019, 9, 1, 11) + datetime.timedelta(weeks=i)) for i in range(12)]
    ds = plan(snaps, Policy(daily=4))
    assert kept(ds) == ["s11", "s10", "s09", "s08"]
    assert [d.time.date().isoformat() for d in ds if d.keep] == ["2019-11-17", "2019-11-10", "2019-11-03",
                                                                 "2019-10-27"]
    assert len(removed(ds)) == 8 and all(r == ["daily " + d.time.strftime("%Y-%m-%d")]
                                         for d in ds if d.keep for r in [reasons([d])[d.name]])


def test_restic_doc_hundred_years_of_dailies():
    """doc/060_forget.rst: a backup every day for 100 years, ``--keep-daily 7
    --keep-weekly 5 --keep-monthly 12 --keep-yearly 75``: 7 dailies, the weekly
    rule adds 4 (the 7 dailies hold one Sunday), monthly 12 or 11, yearly 75
    or 74, depending on overlaps.  Ending on Sunday 2026-11-29: monthly adds
    11 (November is a daily) and yearly 73 (2026 is a daily, 2025-12-31 a
    monthly)."""
    end = T(2026, 11, 29, 3)
    snaps = [(f"d{i:05d}", end - datetime.timedelta(days=i)) for i in range(36525)]
    ds = plan(snaps, Policy(daily=7, weekly=5, monthly=12, yearly=75))
    by_rule = {r: [d.name for d in ds for x in d.reasons if x.rule == r] for r in ("daily", "weekly", "monthly",
                                                                                      "yearly")}
    assert {r: len(v) for r, v in by_rule.items()} == {"daily": 7, "weekly": 5, "monthly": 12, "yearly": 75}
    assert by_rule["daily"] == [f"d{i:05d}" for i in range(7)]
    weekly_only = set(by_rule["weekly"]) - set(by_rule["daily"])
    monthly_new = set(by_rule["monthly"]) - set(by_rule["daily"]) - weekly_only
    yearly_new = set(by_rule["yearly"]) - set(by_rule["daily"]) - weekly_only - monthly_new
    assert (len(weekly_only), len(monthly_new), len(yearly_new)) == (4, 11, 73)
    assert len(kept(ds)) == 7 + 4 + 11 + 73
    yearly = [d for d in ds if any(x.rule == "yearly" for x in d.reasons)]
    assert [d.time.strftime("%m-%d") for d in yearly[1:]] == ["12-31"] * 74  # last day of each earlier year


def test_reasons_list_every_rule_and_table_order():
    snaps = [("a", T(2026, 12, 1, 10, 5)), ("b", T(2026, 12, 1, 10, 50)), ("c", T(2026, 12, 1, 11, 0)),
             ("d", T(2026, 11, 30, 23, 59))]
    ds = plan(snaps, Policy(last=2, hourly=2, daily=5, weekly=1, monthly=1, yearly=1))
    assert reasons(ds) == {
        "c": ["last 1/2", "hourly 2026-12-01 11:00", "daily 2026-12-01", "weekly 2026-W49", "monthly 2026-12",
              "yearly 2026"],
        "b": ["last 2/2", "hourly 2026-12-01 10:00"],
        "a": [],
        "d": ["daily 2026-11-30"],  # 2026-11-30 is a Monday: same ISO week; another month, but monthly 1 is used
    }
    assert [d.name for d in ds] == ["c", "b", "a", "d"] and removed(ds) == ["a"]


def test_rules_are_independent_not_sequential_like_pbs():
    """restic: ``last 3 + daily 3`` over daily backups keeps 3 (both rules pick
    the same three); PBS would keep 6 (its daily rule skips covered days)."""
    snaps = [(f"s{i}", T(2026, 12, 10, 12) - datetime.timedelta(days=i)) for i in range(10)]
    assert kept(plan(snaps, Policy(last=3, daily=3))) == ["s0", "s1", "s2"]


def test_iso_week_and_year_boundaries():
    # 2026 has 53 ISO weeks: Thu 2026-12-31 and Fri 2027-01-01 are both 2026-W53.
    snaps = [("thu", T(2026, 12, 31, 12)), ("fri", T(2027, 1, 1, 12)), ("mon", T(2027, 1, 4, 12))]
    assert reasons(plan(snaps, Policy(weekly=5))) == {"mon": ["weekly 2027-W01"], "fri": ["weekly 2026-W53"],
                                                      "thu": []}
    assert kept(plan(snaps, Policy(yearly=5))) == ["mon", "thu"]


def test_buckets_are_utc_whatever_the_zone_of_the_input():
    est = datetime.timezone(datetime.timedelta(hours=-5))
    ds = plan([("late", T(2026, 12, 1, 23, 30, tz=est)), ("early", T(2026, 12, 2, 1, 0))], Policy(daily=5))
    # 23:30-05:00 is 04:30Z on Dec 2: the same UTC day as 01:00Z, and newer.
    assert reasons(ds) == {"late": ["daily 2026-12-02"], "early": []}
    assert ds[0].time.tzinfo == UTC
    with pytest.raises(ValueError, match="naive"):
        plan([("x", datetime.datetime(2026, 1, 1))], Policy(last=1))


def test_keep_within_is_strict_calendar_arithmetic_from_the_newest():
    newest = T(2026, 12, 3, 12)
    edge = T(2024, 6, 26, 9)  # newest - 2y5m7d3h: 2024-07-03 12:00 - 7d - 3h
    snaps = [("new", newest), ("in", edge + datetime.timedelta(seconds=1)), ("edge", edge),
             ("old", T(2020, 1, 1))]
    ds = plan(snaps, Policy(within=Duration.parse("2y5m7d3h")))
    assert reasons(ds) == {"new": ["within 2y5m7d3h"], "in": ["within 2y5m7d3h"], "edge": [], "old": []}


def test_duration_parse_and_month_overflow():
    assert Duration.parse("2y5m7d3h") == Duration(2, 5, 7, 3)
    assert Duration.parse("3h2d") == Duration(days=2, hours=3) and str(Duration.parse("3h2d")) == "2d3h"
    for bad in ("", "1w", "2d2d", "d", "1.5d", "-1d", "1d ", "5"):
        with pytest.raises(ConfigError, match="bad duration"):
            Duration.parse(bad)
    # Like Go's AddDate: March 31 minus one month is "February 31", i.e. March 3.
    assert Duration(months=1).before(T(2026, 3, 31, 8)) == T(2026, 3, 3, 8)
    assert Duration(years=1).before(T(2024, 2, 29)) == T(2023, 3, 1)
    assert Duration(months=14).before(T(2026, 1, 15)) == T(2024, 11, 15)
    assert Duration(years=5000).before(T(2026, 1, 1)) is None


def test_future_snapshots_do_not_move_within_and_are_kept():
    now = T(2026, 12, 3, 12)
    snaps = [("future", T(2027, 6, 1)), ("now", T(2026, 12, 3, 11)), ("yday", T(2026, 12, 2, 10)),
             ("old", T(2026, 11, 1))]
    assert kept(plan(snaps, Policy(within=Duration(days=2)), now=now)) == ["future", "now", "yday"]
    # Without now, the future snapshot is the newest and within counts from it.
    assert kept(plan(snaps, Policy(within=Duration(days=2)))) == ["future"]
    # Everything in the future: within keeps everything.
    assert kept(plan(snaps, Policy(within=Duration(days=2)), now=T(2000, 1, 1))) == ["future", "now", "yday",
                                                                                       "old"]


def test_empty_policy_is_refused_and_counts_checked():
    for p in (Policy(), Policy(within=Duration()), Policy(last=0, daily=0, within=Duration.parse("0d"))):
        with pytest.raises(ConfigError, match="refusing to prune with no --keep"):
            plan([("a", T(2026, 1, 1))], p)
    with pytest.raises(ConfigError, match="count >= 0"):
        Policy(daily=-2)
    with pytest.raises(ValueError, match="repeat"):
        plan([("a", T(2026, 1, 1)), ("a", T(2026, 1, 2))], Policy(last=1))
    assert plan([], Policy(last=1)) == []


def test_unlimited_and_ties():
    snaps = [(n, T(2026, 12, 1, h)) for n, h in (("a", 1), ("b", 1), ("c", 3), ("d", 5))]
    assert kept(plan(snaps, Policy(hourly=UNLIMITED))) == ["d", "c", "b"]  # tie at 01:00: the later name wins
    assert reasons(plan(snaps, Policy(last=UNLIMITED)))["a"] == ["last 4"]
    assert Policy(last=UNLIMITED, within=Duration(days=1)).describe() == "keep last all, within 1d of the newest"


# -- properties ------------------------------------------------------------------

BASE = T(2024, 1, 1)
ZONES = [UTC, datetime.timezone(datetime.timedelta(hours=5, minutes=30)),
         datetime.timezone(datetime.timedelta(hours=-8))]
counts = st.one_of(st.integers(0, 6), st.just(UNLIMITED))
durations = st.builds(Duration, st.integers(0, 2), st.integers(0, 14), st.integers(0, 40), st.integers(0, 72))


@st.composite
def snapshot_lists(draw):
    # Minutes over ~3 years, with a coarse step sometimes so hours/days/weeks collide or not.
    step = draw(st.sampled_from([1, 17, 60, 24 * 60, 7 * 24 * 60]))
    offs = draw(st.lists(st.integers(0, 3 * 365 * 24 * 60 // step), max_size=40))
    return [(f"s{i}", (BASE + datetime.timedelta(minutes=o * step)).astimezone(draw(st.sampled_from(ZONES))))
            for i, o in enumerate(offs)]


policies = st.builds(Policy, counts, counts, counts, counts, counts, counts, st.none() | durations)
nows = st.none() | st.builds(lambda m: BASE + datetime.timedelta(minutes=m), st.integers(-1000, 4 * 365 * 24 * 60))

BUCKET = {"hourly": lambda t: t.strftime("%Y%m%d%H"), "daily": lambda t: t.date(),
          "weekly": lambda t: t.isocalendar()[:2], "monthly": lambda t: (t.year, t.month), "yearly": lambda t: t.year}


def model(snaps, policy: Policy, now) -> set[str]:
    """The rules restated over sets: rule R with count N keeps the newest
    snapshot of each of the N newest R-buckets; within keeps t > latest - D."""
    order = sorted(snaps, key=lambda s: (s[1], s[0]), reverse=True)
    keep: set[str] = set()
    if policy.last:
        keep |= {n for n, _ in order[: None if policy.last == UNLIMITED else policy.last]}
    for rule, key in BUCKET.items():
        n = getattr(policy, rule)
        newest: dict = {}
        for name, t in order:
            newest.setdefault(key(t.astimezone(UTC)), name)
        buckets = sorted(newest, reverse=True)
        keep |= {newest[b] for b in buckets[: None if n == UNLIMITED else n]} if n else set()
    if policy.within is not None and not policy.within.zero():
        past = [t for _, t in order if now is None or t <= now]
        if not past:
            keep |= {n for n, _ in order}
        else:
            edge = policy.within.before(max(past).astimezone(UTC))
            keep |= {n for n, t in order if edge is None or t > edge}
    return keep


@settings(max_examples=400, deadline=None)
@given(snapshot_lists(), policies, nows, st.randoms(use_true_random=False))
def test_properties(snaps, policy, now, rnd):
    if policy.empty():
        with pytest.raises(ConfigError):
            plan(snaps, policy, now=now)
        return
    ds = plan(snaps, policy, now=now)
    order = sorted(snaps, key=lambda s: (s[1].astimezone(UTC), s[0]), reverse=True)
    assert [d.name for d in ds] == [n for n, _ in order]
    keep = set(kept(ds))
    # The same as the set-based restatement of the rules.
    assert keep == model(snaps, policy, now)
    # The newest snapshot is always kept.
    if snaps:
        assert ds[0].keep
    # Reasons: only from enabled rules; each bucket rule keeps at most one per
    # bucket, its newest, and at most N buckets.
    for rule, key in BUCKET.items():
        n = getattr(policy, rule)
        picked = [d for d in ds if any(r.rule == rule for r in d.reasons)]
        assert (n == 0) <= (not picked)
        if n > 0:
            assert len(picked) <= n
        assert len({key(d.time) for d in picked}) == len(picked)
        for d in picked:
            assert d is next(x for x in ds if key(x.time) == key(d.time))
    lasts = [d.name for d in ds if any(r.rule == "last" for r in d.reasons)]
    assert lasts == [n for n, _ in order][: len(lasts)]
    assert len(lasts) == (len(order) if policy.last == UNLIMITED else min(policy.last, len(order)))
    # Independent of the input order.
    shuffled = list(snaps)
    rnd.shuffle(shuffled)
    assert plan(shuffled, policy, now=now) == ds
    # Idempotent: the kept snapshots, pruned again at the same now, all stay.
    again = plan([(d.name, d.time) for d in ds if d.keep], policy, now=now)
    assert all(d.keep for d in again) and [d.name for d in again] == kept(ds)


@settings(max_examples=200, deadline=None)
@given(snapshot_lists(), st.integers(1, 8))
def test_keep_last_n_keeps_exactly_the_n_newest(snaps, n):
    ds = plan(snaps, Policy(last=n))
    newest = [name for name, _ in sorted(snaps, key=lambda s: (s[1], s[0]), reverse=True)][:n]
    assert kept(ds) == newest and len(removed(ds)) == max(0, len(snaps) - n)

