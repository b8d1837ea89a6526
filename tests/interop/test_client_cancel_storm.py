"""Interop: many concurrent READs against nbdkit, a random share cancelled or timed out.

The client's promises under churn, checked with a real server (nbdkit's
pattern plugin: every 8-byte word holds its own offset, so any misplaced
byte shows), sometimes behind the delay filter so requests are cancelled
while queued for a slot, on the wire, or half received:

- a READ that completes holds exactly the export's bytes;
- a READ that was cancelled (or timed out) is not written after its caller
  saw the cancellation: its buffer, captured at that moment, is unchanged
  once every reply has arrived;
- the in-flight bound holds throughout, and afterwards every slot is free,
  no request is pending and the connection still reads correctly.

Seeds are fixed so a failure replays.
"""

from __future__ import annotations

import asyncio
import random
import struct

import pytest
import peers

from nbdbackup.nbd.client import connect

SIZE = 64 << 20
MAX_IN_FLIGHT = 8


def pattern(offset: int, length: int) -> bytes:
    start = offset - offset % 8
    words = b"".join(struct.pack(">Q", o) for o in range(start, offset + length + 8, 8))
    return words[offset - start : offset - start + length]


async def storm(uri: str, seed: int, n: int, timeout: float | None) -> dict[str, int]:
    rng = random.Random(seed)
    c = await connect(uri, max_in_flight=MAX_IN_FLIGHT, request_timeout=timeout)
    peak = 0
    watching = True

    async def watch() -> None:
        nonlocal peak
        while watching:
            peak = max(peak, len(c._tx.pending))
            await asyncio.sleep(0)

    jobs = []
    for _ in range(n):
        length = rng.choice([512, 4096, 65536, 1 << 20, 3 << 20])
        offset = rng.randrange(0, SIZE - length)
        buf = bytearray(b"\xa5" * length)
        jobs.append((offset, length, buf))

    frozen: dict[int, bytes] = {}  # job index -> buffer as seen when the cancellation arrived
    outcome = {"ok": 0, "cancelled": 0, "timed_out": 0}

    async def one(i: int) -> None:
        offset, length, buf = jobs[i]
        try:
            await c.pread(buf, offset)
        except asyncio.CancelledError:
            frozen[i] = bytes(buf)
            outcome["cancelled"] += 1
            raise
        except TimeoutError:
            frozen[i] = bytes(buf)
            outcome["timed_out"] += 1
            return
        outcome["ok"] += 1

    w = asyncio.create_task(watch())
    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    for t in rng.sample(tasks, n // 3):
        await asyncio.sleep(rng.random() * 0.004)
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Let every abandoned reply arrive (and be dropped) before comparing.
    for _ in range(500):
        if not c._tx.pending:
            break
        await asyncio.sleep(0.01)
    watching = False
    await w
    try:
        assert not c._tx.pending
        assert peak <= MAX_IN_FLIGHT
        assert c._slots.free == MAX_IN_FLIGHT and not c._slots.waiters
        for i, (offset, length, buf) in enumerate(jobs):
            if i in frozen:
                assert bytes(buf) == frozen[i], f"job {i} ({offset}, {length}) written after it was abandoned"
            else:
                assert bytes(buf) == pattern(offset, length), f"job {i} ({offset}, {length}) wrong data"
        c.request_timeout = None  # the check below is about the connection, not the machine's load
        assert await c.pread(4096, 8192) == pattern(8192, 4096)  # still usable
    finally:
        await c.disconnect()
    return outcome


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cancel_storm_fast_server(seed):
    with peers.nbdkit("pattern", str(SIZE)) as p:
        out = asyncio.run(asyncio.wait_for(storm(p.uri, seed, 150, None), 120))
    assert out["cancelled"] and out["ok"]


@pytest.mark.parametrize("seed", [4, 5])
def test_cancel_storm_slow_server_with_timeouts(seed):
    with peers.nbdkit("pattern", str(SIZE), "rdelay=3ms", filters=["delay"]) as p:
        out = asyncio.run(asyncio.wait_for(storm(p.uri, seed, 120, 0.02), 120))
    assert out["ok"] and (out["cancelled"] or out["timed_out"])
