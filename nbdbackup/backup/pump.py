"""The background copier of a backup job, and its rate limiter.

Role: `Pump.run` copies every cluster of ``state.pump_todo`` to the target
with up to ``max_workers`` concurrent copies of at most ``max_chunk_clusters``
adjacent clusters each (`copystate` rule 3).  It never copies a done cluster
and never copies a cluster another copier has in flight (it waits for it).

Control points: before claiming each chunk a worker awaits ``gate()`` (the
job's pause point; it returns False when the worker must stop) and the rate
limiter.  A failed copy calls ``on_error(err, start, count)``, which returns
"retry" (the clusters stay in ``pump_todo``), "skip" (already dropped from
``pump_todo`` by the policy) or raises to end the pump (the error propagates
out of `run` after the other workers were cancelled).

Cancelling `run` cancels the workers; copies in flight fail with ECANCELED
and leave the copy state valid (rule 5), so a later `run` resumes for free.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from .copystate import CopyError, CopyState


class RateLimiter:
    """A token bucket in bytes/s (0 = unlimited) that sleeps between chunks.

    Fields: ``speed`` (bytes/s; change with `set_speed`, which wakes
    sleepers so a new speed applies at once); ``_next`` (loop time at which
    the bytes accounted so far are "paid"); ``_changed`` (event set on speed
    change).  Bursts are bounded by ``slice`` seconds of credit.
    """

    def __init__(self, speed: int = 0, slice: float = 0.1) -> None:
        assert speed >= 0
        self.speed = speed
        self.slice = slice
        self._next = 0.0
        self._changed = asyncio.Event()

    def set_speed(self, speed: int) -> None:
        assert speed >= 0
        self.speed = speed
        self._changed.set()

    def account(self, nbytes: int) -> None:
        """Record ``nbytes`` transferred."""
        if self.speed:
            now = asyncio.get_running_loop().time()
            self._next = max(self._next, now - self.slice) + nbytes / self.speed

    def delay(self) -> float:
        if not self.speed:
            return 0.0
        return self._next - asyncio.get_running_loop().time()

    async def wait(self) -> None:
        """Sleep until the bytes accounted so far fit in the speed."""
        while True:
            d = self.delay()
            if d <= 0:
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), d)
            except asyncio.TimeoutError:
                return
            # Speed changed: recompute the debt at the new speed.
            if self.speed == 0:
                return


ErrorHandler = Callable[[CopyError, int, int], Awaitable[str]]


class Pump:
    """Fields: ``state``; ``max_workers``; ``max_chunk_clusters``;
    ``limiter``; ``gate``; ``on_error``; ``cursor`` (cluster where the next
    claim search starts; wraps around so retried clusters are found again)."""

    def __init__(self, state: CopyState, *, max_workers: int, max_chunk_clusters: int,
                 limiter: RateLimiter, gate: Callable[[], Awaitable[bool]],
                 on_error: ErrorHandler) -> None:
        assert max_workers >= 1 and max_chunk_clusters >= 1
        self.state = state
        self.max_workers = max_workers
        self.max_chunk_clusters = max_chunk_clusters
        self.limiter = limiter
        self.gate = gate
        self.on_error = on_error
        self.cursor = 0

    def _claim(self) -> tuple[int, int] | None:
        st = self.state
        n = st.nclusters
        for lo, hi in ((self.cursor, n), (0, self.cursor)):
            got = st.claim(lo, hi, self.max_chunk_clusters, todo_only=True)
            if got is not None:
                self.cursor = got[0] + got[1]
                if self.cursor >= n:
                    self.cursor = 0
                return got
        return None

    async def run(self) -> None:
        """Copy until ``pump_todo`` is empty (or a worker is told to stop)."""
        if not self.state.pump_todo.any():
            return
        async with asyncio.TaskGroup() as tg:
            for _ in range(min(self.max_workers, max(1, self.state.pump_todo.count()))):
                tg.create_task(self._worker())

    async def _worker(self) -> None:
        st = self.state
        while True:
            if not await self.gate():
                return
            await self.limiter.wait()
            if not await self.gate():
                return
            got = self._claim()
            if got is None:
                c = st.pump_todo.next_set(0)
                if c < 0:
                    return
                # Everything left is in flight elsewhere (another worker, or
                # CBW): wait for one of those copies, then look again.
                fut = st.inflight.get(c)
                assert fut is not None, "todo cluster neither claimable nor in flight"
                try:
                    await asyncio.shield(fut)
                except OSError:
                    pass
                continue
            start, count = got
            # Pre-pay, so that concurrent workers see the debt at once.
            self.limiter.account(st.span(start, count)[1])
            try:
                await st.copy(start, count, "pump")
            except CopyError as e:
                action = await self.on_error(e, start, count)
                assert action in ("retry", "skip")
                continue
