"""Test doubles for the backup engine: a fault- and delay-injecting filter,
and a memory snapshot that reports holes as a chunk repository does.

Role: unit, hypothesis and integration tests wrap a source or a target in
`FaultDev` to make chosen byte ranges fail with a chosen errno, to slow
calls down (``delay`` seconds, or a random number of ``asyncio.sleep(0)``
yields from ``rng``), or to hold calls on a gate (an `asyncio.Event`) so a
test can freeze a copy mid-flight.  Not used by production code.
"""

from __future__ import annotations

import asyncio
import errno
import random
from dataclasses import dataclass

from ..blockdev.base import BASE_ALLOCATION, BlockDev, Buffer, Extent, FilterDev
from ..blockdev.memory import MemoryDev


@dataclass
class Fault:
    """Fail ``op`` ("read", "write" -- write covers pwrite/zero/trim -- or
    "flush") on requests overlapping ``(offset, length)`` with ``err``;
    ``times`` = how many more failures (None = forever)."""

    op: str
    offset: int = 0
    length: int = 1 << 62
    err: int = errno.EIO
    times: int | None = None


class FaultDev(FilterDev):
    """Fields: ``faults`` (list of `Fault`, editable at any time); ``delay``
    (seconds slept before each call); ``rng`` (when set: each call yields
    ``rng.randint(0, max_yields)`` times); ``gate`` (when set: calls of
    ``gate_ops`` wait for it); ``calls`` (log of (op, offset, length)).
    It never changes bytes (``same_bytes``)."""

    same_bytes = True

    def __init__(self, inner: BlockDev, *, delay: float = 0.0, rng: random.Random | None = None,
                 max_yields: int = 3, owns_inner: bool = False) -> None:
        super().__init__(inner, owns_inner=owns_inner)
        self.faults: list[Fault] = []
        self.delay = delay
        self.rng = rng
        self.max_yields = max_yields
        self.gate: asyncio.Event | None = None
        self.gate_ops: tuple[str, ...] = ("read", "write")
        self.calls: list[tuple[str, int, int]] = []

    async def _enter(self, op: str, offset: int, length: int) -> None:
        self.calls.append((op, offset, length))
        if self.gate is not None and op in self.gate_ops:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.rng is not None:
            for _ in range(self.rng.randint(0, self.max_yields)):
                await asyncio.sleep(0)
        for f in self.faults:
            hit = op == "flush" or (offset < f.offset + f.length and f.offset < offset + length)
            if f.op == op and hit:
                if f.times is not None:
                    if f.times <= 0:
                        continue
                    f.times -= 1
                raise OSError(f.err, f"injected {op} fault at {offset}+{length}")

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self._enter("read", offset, len(buf))
        await self.inner.pread(buf, offset)

    async def pwrite(self, buf: Buffer, offset: int, *, fua: bool = False) -> None:
        await self._enter("write", offset, memoryview(buf).nbytes)
        await self.inner.pwrite(buf, offset, fua=fua)

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        await self._enter("write", offset, length)
        await self.inner.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._enter("write", offset, length)
        await self.inner.trim(offset, length, fua=fua)

    async def flush(self) -> None:
        await self._enter("flush", 0, 0)
        await self.inner.flush()


class ChunkSnapDev(MemoryDev):
    """A snapshot as a repository shows it (restore tests): every all-zero
    chunk of ``chunk_size`` bytes is a hole reading as zeros (flags 3), the
    rest data; runs of the same kind are merged."""

    def __init__(self, size: int, chunk_size: int) -> None:
        super().__init__(size)
        self.chunk_size = chunk_size

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        cs, size = self.chunk_size, self.size
        out: list[Extent] = []
        for c in range(offset // cs, (offset + length - 1) // cs + 1):
            lo, hi = max(offset, c * cs), min(offset + length, (c + 1) * cs, size)
            b = bytearray(min(cs, size - c * cs))
            self.read_sync(memoryview(b), c * cs)
            flags = 3 if not any(b) else 0
            if out and out[-1].flags == flags:
                out[-1] = Extent(out[-1].offset, hi - out[-1].offset, flags)
            else:
                out.append(Extent(lo, hi - lo, flags))
        return out
