"""`ratelimit.Bucket`: the arithmetic behind the job's ``speed`` and ``--limit-rate`` (explicit clocks, no sleeping)."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdbackup.ratelimit import Bucket, bucket


def test_debt_grows_with_charges_and_a_pause_saves_only_one_burst():
    b = Bucket(1000, burst=0.1)
    assert b.charge(500, now=0.0) == 0.5          # 500 bytes at 1000/s: paid at t=0.5
    assert b.charge(500, now=0.5) == 0.5          # on time: the next 500 are paid at t=1.0
    assert b.debt(now=0.75) == 0.25
    # A long pause: at most `burst` seconds of credit are kept (not 9 s of it).
    assert abs(b.charge(500, now=10.0) - 0.4) < 1e-9
    assert abs(b.debt(now=10.4)) < 1e-9


def test_unlimited_charges_nothing_and_a_new_rate_applies_to_the_next_charge():
    b = Bucket(0)
    assert b.charge(1 << 40, now=0.0) == 0.0 and b.debt(now=0.0) == 0.0
    b.rate = 100
    assert b.charge(100, now=0.0) == 1.0
    assert bucket(0) is None and bucket(None) is None and bucket(5).rate == 5


def test_threads_charging_at_once_lose_no_bytes():
    b = Bucket(1 << 20, burst=0.0)
    n, per = 8, 2000

    def charge():
        for _ in range(per):
            b.charge(512, now=0.0)

    ts = [threading.Thread(target=charge) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert b.debt(now=0.0) == n * per * 512 / (1 << 20)


@settings(max_examples=200, deadline=None)
@given(rate=st.integers(1, 10_000), burst=st.sampled_from([0.0, 0.1, 0.5]),
       steps=st.lists(st.tuples(st.integers(1, 5_000), st.floats(0, 2)), min_size=1, max_size=40))
def test_a_client_that_sleeps_off_its_debt_never_beats_the_rate(rate, burst, steps):
    """The module's invariant: bytes started in any interval <= rate x its length +
    one burst + one transfer (the interval's first), for a client that charges,
    sleeps off the debt, transfers, and sometimes idles."""
    b = Bucket(rate, burst)
    now = 0.0
    starts: list[tuple[float, int]] = []  # (time the transfer starts, bytes)
    for nbytes, idle in steps:
        now += idle
        wait = b.charge(nbytes, now=now)
        now += max(0.0, wait)
        starts.append((now, nbytes))
    for i, (t0, _) in enumerate(starts):
        for j in range(i, len(starts)):
            t1 = starts[j][0]
            moved = sum(n for _, n in starts[i:j + 1])
            assert moved <= rate * (t1 - t0 + burst) + starts[i][1] + 1e-6 * rate, (i, j)
