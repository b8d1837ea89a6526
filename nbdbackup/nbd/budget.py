"""The server-wide memory budget for request buffers (no I/O).

Role: every byte of a WRITE payload or a READ reply buffer that the server
holds is charged here first.  `nbd.server` asks for memory, gets it now or
waits in one FIFO queue (and stops reading from that connection meanwhile),
and gives it back when the request ends or its connection dies.  Free
buffers kept for reuse (the pool) are charged too, and are the first thing
dropped when someone needs room.

Why charged in steps: a WRITE header declares up to 32 MiB, but a client may
send the header and then nothing.  `nbd.server` charges a payload only as its
bytes arrive: nothing until the first payload byte is in the receive ring,
then in steps (`STEP` first), each step charged before the socket may fill it
(a large payload is an anonymous mmap whose pages become resident only as
they are written, so resident memory follows what was charged, not what was
declared).

Deadlock hazard and the rule that removes it: if every connection holds part
of a payload and waits for its next step, nobody can finish.  So the budget
is split into an *ordinary* part (``limit - reserve``) and a *reserve* of
``reserve`` bytes (the largest request, 32 MiB):

- an ordinary take succeeds only if the total charged stays within the
  ordinary part, and only when no queued request holds as little as it does;
- queued requests get ordinary memory least-held first (a request holding
  nothing, such as a READ, is never stuck behind partial payloads that wait
  for more), then the one whose owner (connection) holds least in all, in
  arrival order among equals.  The owner rule keeps grants fair across
  connections: a client that reads its replies holds little, so its READ is
  not queued behind the dozens of READs another connection queued earlier,
  which would each keep their memory while their client does not read
  (docs/fairmem.md: 24 stalled readers delayed another client 8-11 s);
- when that request does not fit in the ordinary part and no charge holds
  the reserve, the *oldest* queued request becomes the *finisher*: it is
  granted its whole remaining need (``whole``, at most ``reserve`` bytes) at
  once, so that request can complete without asking for memory again;
- the finisher slot is freed when the finisher's charge is released (its
  request ended).

Invariant: ``used - _reserved`` (everything but the finisher's grant from
the reserve) stays at most ``limit - reserve`` (each ordinary take was
admitted under that bound), so when the slot is free the
oldest waiter's whole need always fits once the pool is dropped; ``used <=
limit`` always.  Hence at any time one request either holds the reserve or
can take it, a request holding it needs nothing more from the budget -- only
its own peer's bytes -- and every queued request in turn becomes the oldest
and is served.  A peer that stalls while holding memory is the server's
to evict (see `nbd.server`: memory-pressure eviction).

Fields of `MemoryBudget`: ``limit`` (bytes), ``reserve`` (bytes kept for the
finisher), ``used`` (charged to live charges plus ``pooled``), ``by_owner``
(owner -> bytes its live charges hold, owners holding nothing absent; sums
to ``used - pooled``), ``pooled``
(bytes of free buffers in ``_pool``), ``pool_max`` (bound on ``pooled``),
``_pool`` ((size, mapped) -> free buffers, most recently returned last;
mapped: mmap-backed, which only payloads take), ``_waiters``
(the queued `_Wait`s in arrival order), ``_finisher`` (the `Charge` holding
the reserve, or None), ``_reserved`` (what the finisher was granted from
the reserve: the ordinary part's bound applies to ``used - _reserved``),
``_reused`` (pool hits since the last `decay`), ``_granting`` (guards
re-entry while callbacks run), ``clock``.
"""

from __future__ import annotations

import mmap
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

#: The first charge of a payload (and the largest payload received into a
#: plain bytearray; larger ones are mmap-backed and filled step by step).
STEP = 256 * 1024


class Charge:
    """The memory of one request (one WRITE payload or one READ reply).

    ``held``: bytes charged; ``finisher``: this charge holds the reserve;
    ``owner``: who asked (the connection; used to cancel its waits).
    """

    __slots__ = ("held", "finisher", "owner")

    def __init__(self, owner: Any = None) -> None:
        self.held = 0
        self.finisher = False
        self.owner = owner

    def __repr__(self) -> str:
        return f"Charge(held={self.held}, finisher={self.finisher})"


@dataclass(eq=False)
class _Wait:
    """A queued request for ``n`` bytes (``whole``: the request's whole
    remaining need, granted instead of ``n`` if it becomes the finisher)."""

    charge: Charge
    n: int
    whole: int
    callback: Callable[[int], None]
    since: float = field(default=0.0)


def new_payload_buffer(length: int):
    """A buffer for a payload of ``length`` bytes: a bytearray up to `STEP`,
    else an anonymous private mmap (no page is resident until written)."""
    if length <= STEP:
        return bytearray(length)
    return mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def discard_buffer(buf) -> None:
    """Give a buffer's memory back now where possible (mmap: unmap it)."""
    if isinstance(buf, mmap.mmap):
        try:
            buf.close()
        except BufferError:  # a view still exists: the unmap happens when it dies
            pass


class MemoryBudget:
    """Server-wide accounting of buffer memory (see the module docstring)."""

    def __init__(self, limit: int, reserve: int, *, pool_max: int | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        if reserve <= 0 or limit < 2 * reserve:
            raise ValueError(f"memory budget {limit} must be at least twice the largest request ({reserve})")
        import time

        self.limit = limit
        self.reserve = reserve
        self.pool_max = limit // 4 if pool_max is None else pool_max
        self.used = 0
        self.by_owner: dict[Any, int] = {}
        self.pooled = 0
        self._pool: dict[tuple[int, bool], list] = {}
        self._waiters: deque[_Wait] = deque()
        self._finisher: Charge | None = None
        self._reserved = 0
        self._reused = 0
        self._granting = False
        self.clock = clock or time.monotonic

    # ------------------------------------------------------------ queries

    @property
    def ordinary_limit(self) -> int:
        return self.limit - self.reserve

    @property
    def waiting(self) -> int:
        """Requests queued for memory."""
        return len(self._waiters)

    def oldest_wait(self) -> float:
        """Seconds the queue's head has waited (0 when nobody waits)."""
        return self.clock() - self._waiters[0].since if self._waiters else 0.0

    @property
    def finisher(self) -> Charge | None:
        return self._finisher

    # ------------------------------------------------------------- taking

    def _charge(self, charge: Charge, n: int) -> None:
        """``n`` more bytes held by ``charge`` (already counted in ``used``)."""
        charge.held += n
        owner = charge.owner
        self.by_owner[owner] = self.by_owner.get(owner, 0) + n

    def _room(self, n: int, bound: int) -> bool:
        """True when ``n`` more bytes fit under ``bound`` besides what the
        finisher holds from the reserve, dropping pooled buffers if needed."""
        if self.used - self._reserved + n <= bound:
            return True
        while self.pooled and self.used - self._reserved + n > bound:
            self._drop_one()
        return self.used - self._reserved + n <= bound

    def _queued_ahead(self, charge: Charge) -> bool:
        """A queued request would be served before ``charge`` (holds no more)."""
        held = charge.held
        return any(w.charge.held <= held for w in self._waiters)

    def try_take(self, charge: Charge, n: int) -> bool:
        """Charge ``n`` bytes now if they fit in the ordinary part and no
        queued request comes first."""
        if (self._waiters and self._queued_ahead(charge)) or not self._room(n, self.ordinary_limit):
            return False
        self.used += n
        charge.held += n  # (`_charge` inlined: the per-request path)
        by_owner = self.by_owner
        by_owner[charge.owner] = by_owner.get(charge.owner, 0) + n
        return True

    def take_pooled(self, charge: Charge, n: int, *, mapped: bool = False):
        """A free pooled buffer of exactly ``n`` bytes, charged to ``charge``
        (its bytes move from the pool to the charge), or None.  ``mapped``:
        an mmap (payloads) rather than a bytearray (READ replies: transports
        write only bytes-like objects)."""
        if self._waiters and self._queued_ahead(charge):
            return None
        key = (n, mapped)
        free = self._pool.get(key)
        if not free:
            return None
        buf = free.pop()
        if not free:
            del self._pool[key]
        self.pooled -= n
        charge.held += n  # (`_charge` inlined: the per-request path)
        by_owner = self.by_owner
        by_owner[charge.owner] = by_owner.get(charge.owner, 0) + n
        self._reused += 1
        return buf

    def wait(self, charge: Charge, n: int, callback: Callable[[int], None], *,
             whole: int | None = None) -> None:
        """Queue for ``n`` bytes; ``callback(granted)`` runs when they are
        charged (``granted`` is ``whole`` when granted from the reserve)."""
        whole = n if whole is None else whole
        assert 0 < n <= whole <= self.reserve, (n, whole, self.reserve)
        self._waiters.append(_Wait(charge, n, whole, callback, self.clock()))
        self._grant()

    def cancel(self, owner: Any) -> int:
        """Drop every queued wait of ``owner`` (its connection died); how many."""
        before = len(self._waiters)
        if before:
            self._waiters = deque(w for w in self._waiters if w.charge.owner is not owner)
            self._grant()
        return before - len(self._waiters)

    # ---------------------------------------------------------- releasing

    def release(self, charge: Charge, buf=None) -> None:
        """The request of ``charge`` ended: its bytes come back.  ``buf`` (its
        whole, complete buffer) may be kept in the pool; else it is dropped."""
        n = charge.held
        charge.held = 0
        self.used -= n
        if n:
            by_owner = self.by_owner
            left = by_owner.get(charge.owner, 0) - n
            if left > 0:
                by_owner[charge.owner] = left
            else:
                by_owner.pop(charge.owner, None)
        if charge.finisher:
            charge.finisher = False
            if self._finisher is charge:
                self._finisher = None
                self._reserved = 0
        if buf is not None:
            size = len(buf)
            if (size >= 16 * 1024 and not self._waiters and self.pooled + size <= self.pool_max
                    and self.used - self._reserved + size <= self.ordinary_limit):
                self._pool.setdefault((size, isinstance(buf, mmap.mmap)), []).append(buf)
                self.pooled += size
                self.used += size
            else:
                discard_buffer(buf)
        self._grant()

    def _drop_one(self) -> None:
        key = next(iter(self._pool))
        size = key[0]
        free = self._pool[key]
        buf = free.pop(0)
        if not free:
            del self._pool[key]
        self.pooled -= size
        self.used -= size
        discard_buffer(buf)

    def drop_pool(self) -> int:
        """Free every pooled buffer; the bytes freed."""
        freed = self.pooled
        while self.pooled:
            self._drop_one()
        if freed:
            self._grant()
        return freed

    def decay(self) -> int:
        """Called periodically: drop the pool when it was not used since the
        last call (RSS falls after a burst); the bytes freed."""
        reused, self._reused = self._reused, 0
        return 0 if reused else self.drop_pool()

    # ------------------------------------------------------------ granting

    def _grant(self) -> None:
        if self._granting:
            return
        self._granting = True
        try:
            by_owner = self.by_owner
            while self._waiters:
                # Least held first, then the least-holding owner, oldest among
                # equals (min keeps the first).
                w = min(self._waiters, key=lambda w: (w.charge.held, by_owner.get(w.charge.owner, 0)))
                if self._room(w.n, self.ordinary_limit):
                    granted = w.n
                elif self._finisher is None:
                    w = self._waiters[0]  # the reserve goes to the oldest
                    if not self._room(w.whole, self.limit):
                        break  # (cannot happen: see the invariant)
                    granted = w.whole
                    w.charge.finisher = True
                    self._finisher = w.charge
                    self._reserved = granted
                else:
                    break
                self._waiters.remove(w)
                self.used += granted
                self._charge(w.charge, granted)
                w.callback(granted)
        finally:
            self._granting = False
