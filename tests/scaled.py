"""How many rounds a seeded randomised test runs in this run of the suite.

Role: the seeded tests that repeat N rounds (random runs, fuzz cases, hunt
rounds) ask ``rounds(N)`` instead of running N.  On the host (CI and by hand)
``NBDBACKUP_HUNT_FACTOR`` is unset and every test runs all its rounds.  The
fresh-machine check (tests/containers/test_fresh_debian.py) runs the suite
again in a clean container with ``NBDBACKUP_HUNT_FACTOR=0.25``: that run
proves that a stock machine runs every test, while the search for
counter-examples is the host run's job (same CI, every round), exactly as
for the hypothesis tests' examples (scripts/hunt_examples.py).

Invariants:
- never fewer rounds than N unless ``NBDBACKUP_HUNT_FACTOR`` < 1 is set;
- never fewer than ``at_least`` (default 1): a scaled test still runs its
  first rounds with the same seeds, so it fails on what its first rounds find;
- a factor above 1 does not multiply rounds (the tests' timeouts are sized
  for N); longer hunts use each test's own knobs (``NBDBACKUP_HUNT_ROUNDS``,
  ``NBDBACKUP_FUZZ_CASES``, ``NBDBACKUP_TEST_SEED``...).
"""

from __future__ import annotations

import os


def factor() -> float:
    """``NBDBACKUP_HUNT_FACTOR`` when it asks for fewer (< 1), else 1."""
    f = float(os.environ.get("NBDBACKUP_HUNT_FACTOR", "1"))
    assert f > 0, "NBDBACKUP_HUNT_FACTOR must be > 0"
    return min(f, 1.0)


def rounds(n: int, at_least: int = 1) -> int:
    """``n`` scaled by ``factor()``, rounded, and no fewer than ``min(n, at_least)``."""
    return max(min(n, at_least), round(n * factor()))
