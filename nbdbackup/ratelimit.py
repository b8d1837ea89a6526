"""Byte-rate limits: one token bucket for the backup job's ``speed`` and the agent's ``--limit-rate``.

Role: `Bucket` turns "at most RATE bytes/s" into "wait this long before
moving the next bytes".  The backup pump (`backup.pump.RateLimiter`, QMP
``speed``, changeable while the job runs) and the pull agent and restore
(``--limit-rate``, from several receiving or fetching threads at once) use
the same arithmetic: every transfer is charged when it is decided, and the
debt -- how far the bytes charged so far run ahead of RATE -- is slept off
before the next one starts.

Invariants: over any interval the bytes charged are at most RATE x its
length plus one burst (``burst`` seconds of credit, so a pause does not
save up a flood) plus one transfer (a transfer is never split); rate 0
means unlimited and charges nothing.  `Bucket` is thread-safe (the lock
covers ``_next``) and uses `time.monotonic`, the clock asyncio's loops use.
"""

from __future__ import annotations

import asyncio
import threading
import time

#: Seconds of unused rate a bucket keeps as credit (bursts after a pause).
BURST = 0.1


class Bucket:
    """Fields: ``rate`` (bytes/s, 0 = unlimited; may be changed at any
    time, the next charge uses it); ``burst`` (seconds of credit kept);
    ``_next`` (monotonic time at which everything charged so far is paid
    for); ``_lock`` (guards ``_next``)."""

    def __init__(self, rate: int = 0, burst: float = BURST) -> None:
        assert rate >= 0 and burst >= 0
        self.rate = rate
        self.burst = burst
        self._next = 0.0
        self._lock = threading.Lock()

    def charge(self, nbytes: int, now: float | None = None) -> float:
        """Account ``nbytes`` moved (or about to be); return the seconds to
        wait before the next transfer (<= 0: none)."""
        rate = self.rate
        if not rate:
            return 0.0
        if now is None:
            now = time.monotonic()
        with self._lock:
            self._next = max(self._next, now - self.burst) + nbytes / rate
            return self._next - now

    def debt(self, now: float | None = None) -> float:
        """Seconds until everything charged so far is paid for (<= 0: nothing owed)."""
        if not self.rate:
            return 0.0
        return self._next - (time.monotonic() if now is None else now)

    def take(self, nbytes: int) -> None:
        """Charge ``nbytes`` and sleep off the debt (a blocking thread)."""
        d = self.charge(nbytes)
        if d > 0:
            time.sleep(d)

    async def take_async(self, nbytes: int) -> None:
        """Charge ``nbytes`` and sleep off the debt (a coroutine)."""
        d = self.charge(nbytes)
        if d > 0:
            await asyncio.sleep(d)


def bucket(rate: int | None) -> Bucket | None:
    """A `Bucket` for ``rate`` bytes/s, or None when unlimited (None or 0)."""
    if rate is not None and rate < 0:
        raise ValueError(f"a rate limit must be >= 0, got {rate}")
    return Bucket(rate) if rate else None
