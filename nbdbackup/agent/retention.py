"""Retention policy: which snapshots a ``--keep-*`` policy keeps, and why (no I/O).

Role: the pure decision behind ``nbdbackup repo prune``.  `plan` takes
``(name, time)`` pairs and a `Policy` and returns one `Decision` per
snapshot, newest first; the caller (``commands/repo.py``) reads the times
from the repository, deletes what is to be removed and runs ``gc``.

Semantics (restic's ``forget``; the facts, not its code):

- Snapshots are ordered newest first: by time, then by name (descending), so
  the result never depends on the input order, even when times tie.
- ``last N`` keeps the N newest snapshots.
- ``hourly/daily/weekly/monthly/yearly N``: walking newest first, the first
  snapshot met in each bucket (hour, day, ISO week Monday..Sunday, month,
  year) is kept, for the first N distinct buckets that hold a snapshot.
  Buckets with no snapshot are not counted (a gap of a week does not use up
  ``daily 7``).  Buckets are taken in **UTC** (restic uses the time zone the
  snapshot was recorded in; UTC makes the result the same on every host and
  across DST changes; the repository records ``created`` in UTC).
- ``within D`` keeps every snapshot strictly newer than ``latest - D``,
  where ``latest`` is the newest snapshot not in the future of ``now`` and D
  is ``NyNmNdNh`` (years, months, days, hours; ``m`` is months) subtracted as
  calendar arithmetic (2026-03-31 minus 1m is 2026-03-03, like Go's
  ``AddDate``).  If every snapshot is in the future, ``within`` keeps them all.
- The rules are ORed and independent: every rule sees every snapshot, and a
  snapshot kept by several rules lists all their reasons.  (Proxmox Backup
  Server differs: it applies the rules in order and a later rule skips the
  buckets an earlier one already covered, so ``last 3 + daily 3`` over daily
  snapshots keeps 6 there, 3 here and in restic.)
- A count of `UNLIMITED` (-1) keeps the newest of every bucket.
- An empty policy (every count 0, no ``within``) is refused with
  `ConfigError`: it would remove every snapshot.
- Not restic >= 0.15's extra "oldest" rule (keeping the oldest snapshot
  when a count is left over): a ``daily`` rule keeps at most one snapshot per
  day here, as in restic 0.14 and PBS.

Invariants (tested with hypothesis in ``tests/unit/test_retention.py``): the
newest snapshot is kept by any non-empty policy; every kept snapshot has at
least one reason, every removed one none; applying the same policy at the
same ``now`` to the kept snapshots keeps all of them.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from ..errors import ConfigError

UTC = datetime.timezone.utc
UNLIMITED = -1

#: Calendar rules in evaluation (and reason) order, each with its bucket
#: label in UTC.  Labels are equal exactly when the bucket is.
BUCKETS: dict[str, Callable[[datetime.datetime], str]] = {
    "hourly": lambda t: t.strftime("%Y-%m-%d %H:00"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "%04d-W%02d" % t.isocalendar()[:2],
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}
RULES = ("last", *BUCKETS)

_DURATION_PART = re.compile(r"(\d+)([ymdh])")


@dataclass(frozen=True)
class Duration:
    """``--keep-within``: years, months, days, hours (all >= 0)."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> "Duration":
        """``2y5m7d3h``, any subset in any order, each unit at most once."""
        parts: dict[str, int] = {}
        pos = 0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos or m.group(2) in parts:
                break
            parts[m.group(2)] = int(m.group(1))
            pos = m.end()
        if not text or pos != len(text):
            raise ConfigError(f"bad duration {text!r}: use numbers with y (years), m (months), d (days), "
                              f"h (hours), e.g. 2d3h or 1y6m")
        return cls(parts.get("y", 0), parts.get("m", 0), parts.get("d", 0), parts.get("h", 0))

    def zero(self) -> bool:
        return not (self.years or self.months or self.days or self.hours)

    def before(self, t: datetime.datetime) -> datetime.datetime | None:
        """``t`` minus this duration (month/day overflow normalised forward,
        like Go's AddDate); None if that is before year 1."""
        m0 = t.month - 1 - self.months
        year = t.year - self.years + m0 // 12
        try:
            first = t.replace(year=year, month=m0 % 12 + 1, day=1)
            return first + datetime.timedelta(days=t.day - 1 - self.days, hours=-self.hours)
        except (ValueError, OverflowError):
            return None

    def __str__(self) -> str:
        return "".join(f"{n}{u}" for n, u in ((self.years, "y"), (self.months, "m"), (self.days, "d"),
                                              (self.hours, "h")) if n) or "0h"


@dataclass(frozen=True)
class Policy:
    """Counts per rule (0: rule off, `UNLIMITED`: every bucket) and ``within``."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None

    def __post_init__(self) -> None:
        for rule in RULES:
            n = getattr(self, rule)
            if not isinstance(n, int) or n < UNLIMITED:
                raise ConfigError(f"--keep-{rule} {n!r}: give a count >= 0 or 'unlimited'")

    def empty(self) -> bool:
        return all(getattr(self, r) == 0 for r in RULES) and (self.within is None or self.within.zero())

    def check(self) -> "Policy":
        """Self, or `ConfigError` if empty (it would remove every snapshot)."""
        if self.empty():
            raise ConfigError("refusing to prune with no --keep-* rule: that would remove every snapshot "
                              "(give at least one of --keep-last/-hourly/-daily/-weekly/-monthly/-yearly N "
                              "or --keep-within D)")
        return self

    def describe(self) -> str:
        out = [f"{r} {'all' if n == UNLIMITED else n}" for r in RULES if (n := getattr(self, r))]
        if self.within is not None and not self.within.zero():
            out.append(f"within {self.within} of the newest")
        return "keep " + ", ".join(out) if out else "keep nothing"

    def to_json(self) -> dict:
        doc: dict = {r: getattr(self, r) for r in RULES}
        doc["within"] = None if self.within is None or self.within.zero() else str(self.within)
        return doc


@dataclass(frozen=True)
class Reason:
    """One rule keeping a snapshot: ``rule`` (``last``, ``hourly`` ..
    ``yearly``, ``within``) and ``what``: the bucket label (``2026-12-01``),
    the rank for ``last`` (``2/3``) or the duration for ``within``."""

    rule: str
    what: str

    def __str__(self) -> str:
        return f"{self.rule} {self.what}"


@dataclass(frozen=True)
class Decision:
    """The fate of one snapshot: kept iff ``reasons`` is not empty."""

    name: str
    time: datetime.datetime
    reasons: tuple[Reason, ...] = field(default=())

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def _utc(t: datetime.datetime) -> datetime.datetime:
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t}: give snapshot times with a time zone")
    return t.astimezone(UTC)


def plan(snapshots: Iterable[tuple[str, datetime.datetime]], policy: Policy,
         now: datetime.datetime | None = None) -> list[Decision]:
    """One `Decision` per snapshot, newest first (see the module doc).

    ``now`` (aware; default: no snapshot counts as future) only matters to
    ``within``.  Raises `ConfigError` on an empty policy, ValueError on a
    repeated name or a naive time.
    """
    policy.check()
    snaps = sorted(((_utc(t), name) for name, t in snapshots), reverse=True)
    names = [name for _, name in snaps]
    if len(set(names)) != len(names):
        raise ValueError("snapshot names repeat")
    now_utc = _utc(now) if now is not None else None

    threshold: datetime.datetime | None = None
    within = policy.within if policy.within is not None and not policy.within.zero() else None
    if within is not None:
        latest = next((t for t, _ in snaps if now_utc is None or t <= now_utc), None)
        threshold = within.before(latest) if latest is not None else None

    left = {r: getattr(policy, r) for r in RULES}
    seen: dict[str, str | None] = {r: None for r in RULES}
    out: list[Decision] = []
    for i, (t, name) in enumerate(snaps):
        reasons: list[Reason] = []
        if within is not None and (threshold is None or t > threshold):
            reasons.append(Reason("within", str(within)))
        for rule in RULES:
            if left[rule] == 0:
                continue
            if rule == "last":
                label = f"{i + 1}/{policy.last}" if policy.last != UNLIMITED else str(i + 1)
                bucket = str(i)
            else:
                label = bucket = BUCKETS[rule](t)
            if bucket != seen[rule]:
                seen[rule] = bucket
                if left[rule] > 0:
                    left[rule] -= 1
                reasons.append(Reason(rule, label))
        out.append(Decision(name, t, tuple(reasons)))
    return out


def kept(decisions: Sequence[Decision]) -> list[str]:
    return [d.name for d in decisions if d.keep]


def removed(decisions: Sequence[Decision]) -> list[str]:
    return [d.name for d in decisions if not d.keep]
