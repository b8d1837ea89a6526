"""The background copier of a backup job, and its rate limiter.

Role: `Pump.run` copies every cluster of ``state.pump_todo`` to the target
with up to ``max_workers`` concurrent copies of at most ``max_chunk_clusters``
adjacent clusters each (`copystate` rule 3).  It never copies a cluster
whose content is in the target and never copies a cluster another copier
has in flight (it waits for it).  A todo cluster whose point-in-time content
copy-before-write saved in the scratch (before the sync set was known) is
moved from the scratch; one recorded as zeros is zeroed in the target.

Control points: before claiming each chunk a worker awaits ``gate()`` (the
job's pause point; it returns False when the worker must stop) and the rate
limiter.  A failed copy calls ``on_error(err, start, count)``, which returns
"retry" (the clusters stay in ``pump_todo``), "skip" (already dropped from
``pump_todo`` by the policy) or raises to end the pump (the error propagates
out of `run` after the other workers were cancelled).

Cancelling `run` cancels the workers; copies in flight fail with ECANCELED
and leave the copy state valid (rule 5), so a later `run` resumes for free.

Cost follows the data, not the disk size: the pump asks the source for its
``base:allocation`` extents a window (`ZERO_WINDOW` bytes) at a time, before
claiming there, and a claim that starts in a run of clusters the source
reports as zeros (a hole, or a zero extent) is extended over that run (up to
`ZERO_CLAIM_MAX` bytes) and zeroed in the target with one request instead of
being read chunk by chunk (`copystate` rule 3 says why that is exact).  The
speed limit counts those bytes like any others, as QEMU's block-copy does (a
target's zeroing is not always free: WRITE_ZEROES to an NBD target may write
them), so a limited job over a sparse disk still takes size / speed; without
a limit it takes the time of its data.  A source whose extents fail is copied
the plain way.  When the target reads as zeros already (``state.target_zero``,
`copystate` rule 11: a fresh sparse file), zeroing it writes nothing, so an
unlimited job claims a whole zero run at once (no `ZERO_CLAIM_MAX` cut): a
run costs one claim and no I/O, as holes cost ``qemu-img convert`` nothing.
"""

from __future__ import annotations

import asyncio
import bisect
from typing import Awaitable, Callable

from ..blockdev.base import BASE_ALLOCATION
from ..ratelimit import Bucket
from .copystate import FROM_SOURCE, CopyError, CopyState

#: Bytes of source extents asked for at a time (one query, or a few when the
#: source answers a shorter range, per window).
ZERO_WINDOW = 64 << 30
#: Longest zero run taken as one claim (one WRITE_ZEROES / punch of the target;
#: qemu-nbd and nbdkit accept this much in one request).
ZERO_CLAIM_MAX = 1 << 30
#: Longest range asked in one extents query (NBD block status lengths are 32-bit).
ZERO_QUERY_MAX = 1 << 31


class RateLimiter:
    """The job's ``speed``: a `ratelimit.Bucket` (0 = unlimited) whose debt
    the pump sleeps off between chunks, woken early when the speed changes.

    Fields: ``bucket`` (the byte arithmetic; its ``rate`` is the speed);
    ``_changed`` (event set on speed change, so a new speed applies at once).
    Bursts are bounded by ``slice`` seconds of credit.
    """

    def __init__(self, speed: int = 0, slice: float = 0.1) -> None:
        assert speed >= 0
        self.bucket = Bucket(speed, slice)
        self._changed = asyncio.Event()

    @property
    def speed(self) -> int:
        return self.bucket.rate

    def set_speed(self, speed: int) -> None:
        assert speed >= 0
        self.bucket.rate = speed
        self._changed.set()

    def account(self, nbytes: int) -> None:
        """Record ``nbytes`` transferred."""
        self.bucket.charge(nbytes, asyncio.get_running_loop().time())

    def delay(self) -> float:
        return self.bucket.debt(asyncio.get_running_loop().time())

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
    claim search starts; wraps around so retried clusters are found again);
    ``_zero_runs`` (sorted, disjoint cluster runs ``(start, end)`` the source
    reported as reading zeros); ``_windows`` (window index -> the task asking
    the source for that window's extents; done once learned)."""

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
        self._zero_runs: list[tuple[int, int]] = []
        self._windows: dict[int, asyncio.Future] = {}

    # -- what the source reads as zeros ------------------------------------

    async def _learn(self, cluster: int) -> None:
        """Know the source's zero runs in the window holding ``cluster``."""
        w = (cluster << self.state._shift) // ZERO_WINDOW
        fut = self._windows.get(w)
        if fut is None:
            fut = self._windows[w] = asyncio.ensure_future(self._ask_window(w))
        await asyncio.shield(fut)

    async def _ask_window(self, w: int) -> None:
        st = self.state
        pos, end = w * ZERO_WINDOW, min((w + 1) * ZERO_WINDOW, st.size)
        runs: list[tuple[int, int]] = []
        while pos < end:
            try:
                exts = await st.source_extents(pos, min(end - pos, ZERO_QUERY_MAX), BASE_ALLOCATION)
            except OSError:
                break  # no knowledge: the plain copy is always right
            before = pos
            pos = st.add_zero_runs(runs, exts, pos, end)
            if pos <= before:
                break  # no progress: leave the rest to the plain copy
        self._zero_runs = sorted(self._zero_runs + runs)

    def _zero_run_end(self, start: int, count: int) -> int:
        """End of the known zero run holding all of ``[start, start+count)``, or -1."""
        i = bisect.bisect_right(self._zero_runs, (start, 1 << 62)) - 1
        if i >= 0:
            s, e = self._zero_runs[i]
            if s <= start and start + count <= e:
                return e
        return -1

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
            await self._learn(self.cursor)
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
            zero_end = self._zero_run_end(start, count) if st.kind(start) == FROM_SOURCE else -1
            if zero_end >= 0:
                if st.target_zero and not self.limiter.speed:
                    limit = zero_end  # nothing to write (copystate rule 11): one claim per run
                else:
                    limit = min(zero_end, start + max(count, ZERO_CLAIM_MAX >> st._shift))
                count = st.extend_claim(start, count, limit, todo_only=True)
            # Pre-pay, so that concurrent workers see the debt at once.
            self.limiter.account(st.span(start, count)[1])
            try:
                await st.copy(start, count, "pump", source_zero=zero_end >= 0)
            except CopyError as e:
                action = await self.on_error(e, start, count)
                assert action in ("retry", "skip")
                continue
