"""Unit tests for `nbd.client._Slots`, the in-flight bound of `Client`.

It replaced ``asyncio.Semaphore`` on the per-request path, so it must keep
its guarantees: never more holders than slots, FIFO hand-over, and no slot
lost or duplicated when a waiter is cancelled before or after being handed
one.
"""

from __future__ import annotations

import asyncio

from nbdbackup.nbd.client import _Slots


async def _acquire(s: _Slots) -> None:
    if s.free and not s.waiters:
        s.free -= 1
    else:
        await s.acquire_slow()


def test_bound_and_fifo_handover() -> None:
    async def main() -> None:
        s = _Slots(2)
        await _acquire(s)
        await _acquire(s)
        assert s.free == 0
        order: list[int] = []

        async def waiter(i: int) -> None:
            await _acquire(s)
            order.append(i)

        tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert order == [] and len(s.waiters) == 3
        s.release()
        await asyncio.sleep(0)
        assert order == [0]
        # A newcomer must not overtake the two still waiting.
        late = asyncio.create_task(waiter(99))
        s.release()
        s.release()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == [0, 1, 2]
        assert s.free == 0 and not late.done()
        s.release()
        await late
        assert order == [0, 1, 2, 99]
        await asyncio.gather(*tasks)

    asyncio.run(main())


async def _held_with_two_waiters() -> tuple[_Slots, asyncio.Task, asyncio.Task]:
    """One slot, held; tasks ``a`` then ``b`` queued for it."""
    s = _Slots(1)
    await _acquire(s)
    a = asyncio.create_task(_acquire(s))
    b = asyncio.create_task(_acquire(s))
    await asyncio.sleep(0)
    return s, a, b


def test_cancelled_waiter_loses_nothing() -> None:
    async def main() -> None:
        s, a, b = await _held_with_two_waiters()
        a.cancel()  # cancelled while waiting: must not take the next slot
        await asyncio.sleep(0)
        s.release()
        await b
        assert s.free == 0
        s.release()
        assert s.free == 1

    asyncio.run(main())


def test_waiter_cancelled_after_handover_passes_slot_on() -> None:
    async def main() -> None:
        s, a, b = await _held_with_two_waiters()
        s.release()  # handed to a ...
        a.cancel()  # ... which is cancelled before it runs
        await asyncio.gather(a, return_exceptions=True)
        assert a.cancelled()
        await asyncio.wait_for(b, 1)  # b got the slot a could not use
        assert s.free == 0 and not s.waiters
        s.release()
        assert s.free == 1

    asyncio.run(main())
