"""The one asynchronous block-device interface.

Role: every disk nbdbackup serves, reads or writes (a file, memory, a remote
NBD export, and the filters stacked over them: copy-before-write, snapshot
view, dirty tracking) implements `BlockDev`.  The NBD server turns
`Capabilities` into transmission flags and never special-cases a backend
(the shape of nbdkit's plugin callbacks).

Contract for implementations:
- Byte ranges are ``(offset, length)``.  Callers (the NBD server validates at
  the edge) guarantee ``0 <= offset``, ``offset + length <= size`` and
  ``length > 0``; implementations may assert it.
- Failures raise `OSError` with a meaningful ``errno`` (EIO, ENOSPC, EPERM,
  ENOTSUP...).  Nothing else escapes except `asyncio.CancelledError`.
- `pread` fills the caller's buffer completely; `pwrite` must not keep a
  reference to the caller's buffer after it returns (the caller reuses it).
- With ``fua=True`` the data is durable when the call returns; otherwise
  `flush` makes every completed write durable.
- `zero` with ``fast=True`` raises ENOTSUP at once unless zeroing is cheaper
  than writing zeroes (proto.md NBD_CMD_FLAG_FAST_ZERO).
- `extents` returns at least one extent, starting exactly at ``offset``,
  contiguous, each of length > 0, never past ``offset + length``... except
  that it may cover less than ``length`` (the caller asks again).
- Concurrency: any number of calls may be in flight at once; an
  implementation that needs ordering serialises internally.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Sequence

from ..nbd.wire import MAX_PAYLOAD, StateFlag

Buffer = bytes | bytearray | memoryview

BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"


@dataclass(frozen=True, slots=True)
class BlockSize:
    """Block size constraints (proto.md "Block size constraints")."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = MAX_PAYLOAD

    def __post_init__(self) -> None:
        assert self.minimum >= 1 and self.minimum & (self.minimum - 1) == 0
        assert self.preferred >= self.minimum and self.preferred & (self.preferred - 1) == 0
        assert self.maximum >= self.preferred or self.maximum == 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a device can do; queried once per connection (nbdkit's ``can_*``)."""

    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = False
    can_cache: bool = True
    #: FLUSH on one connection makes writes completed on every other
    #: connection durable too (NBD_FLAG_CAN_MULTI_CONN's guarantee).
    can_multi_conn: bool = True
    #: `extents` gives real information (else everything is data).
    can_extents: bool = True
    #: The server may answer a READ from `extents` (a hole that reads as zeros is not
    #: read: `nbd.server` sparse reads).  False for a remote NBD device: that costs it a
    #: round trip, and a remote's ``base:allocation`` may lag its writes -- nbdkit 1.32's
    #: cache filter (writeback) says "hole, zero" for data written and not yet flushed,
    #: so a re-export read zeros where its client had just written (hunt 15).  The same
    #: flag says whether anything may skip reading on the word of this device's
    #: ``base:allocation``: a backup's snapshot export reports what it copied to a target or
    #: scratch without it as data, never asking it (`backup.snapshot`, doubts18 item 1).
    sparse_reads: bool = True
    rotational: bool = False
    block_size: BlockSize = field(default_factory=BlockSize)


@dataclass(frozen=True, slots=True)
class Extent:
    """One extent: ``(offset, length)`` and the context's flags for it.

    For `base:allocation` the flags are `StateFlag` bits, for
    `qemu:allocation-depth` the depth (0 = unallocated), for
    `qemu:dirty-bitmap:NAME` bit 0 = dirty.
    """

    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length


class BlockDev(abc.ABC):
    """An asynchronous block device.  See the module docstring for the contract."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Size in bytes (constant for the device's life)."""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """The device's capabilities; constant for the device's life."""

    def meta_contexts(self) -> Sequence[str]:
        """Meta context names this device answers in `extents`.

        `base:allocation` is always answerable (all data when the device has no
        better knowledge).
        """
        return (BASE_ALLOCATION,)

    @abc.abstractmethod
    async def pread(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with ``len(buf)`` bytes read at ``offset``."""

    @abc.abstractmethod
    async def pwrite(self, buf: Buffer, offset: int, *, fua: bool = False) -> None:
        """Write all of ``buf`` at ``offset``."""

    async def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """Make ``(offset, length)`` read as zeroes.

        Default: write zero buffers (never fast).
        """
        if fast:
            raise OSError(95, "fast zero not supported")  # ENOTSUP
        await write_zeroes_slowly(self, offset, length, fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Advise that ``(offset, length)`` is no longer needed (content undefined)."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable."""

    async def extents(
        self, offset: int, length: int, context: str = BASE_ALLOCATION
    ) -> list[Extent]:
        """Describe ``(offset, length)`` in ``context``.  Default: all data."""
        if context != BASE_ALLOCATION:
            raise OSError(22, f"unknown meta context {context!r}")  # EINVAL
        return [Extent(offset, length, 0)]

    async def cache(self, offset: int, length: int) -> None:
        """Advise that ``(offset, length)`` will be read soon."""

    async def close(self) -> None:
        """Release resources.  Further calls are a bug."""

    # -- optional synchronous fast paths ------------------------------------
    #
    # The server answers a READ without creating a task when the data is at
    # hand (page cache, RAM), and a WRITE when the device can take it at once.
    # A device that cannot tell keeps the defaults: the normal async path is
    # always correct.

    def pread_now(self, buf: memoryview, offset: int) -> bool:
        """Fill ``buf`` now if that cannot block; True when done (else nothing is promised)."""
        return False

    def pwrite_now(self, buf: Buffer, offset: int, fua: bool = False) -> bool:
        """Do `pwrite` now, synchronously, if that cannot block for long.

        True: the write is complete exactly as an awaited `pwrite` with the
        same arguments would be (visible to later reads, covered by a later
        `flush`, durable now if ``fua``).  False: nothing was written (the
        caller awaits `pwrite`).  An `OSError` may leave part of ``buf``
        written, as a failed `pwrite` may.  Same buffer rule as `pwrite`.
        """
        return False

    def pwrite_start(self, buf: Buffer, offset: int, fua: bool, cb) -> bool:
        """Start `pwrite` without a task: True means the write was handed to
        an I/O engine and ``cb(err)`` (0 or an errno) will run later on the
        event loop, never inside this call, once it is complete exactly as an
        awaited `pwrite` would be; until then the caller must keep ``buf``
        alive and unchanged.  False: nothing was started (await `pwrite`)."""
        return False

    def zero_now(self, offset: int, length: int, *, may_trim: bool = False,
                 fua: bool = False, fast: bool = False) -> bool:
        """`zero` done now if that cannot block for long; same promise as `pwrite_now`."""
        return False

    def trim_now(self, offset: int, length: int, *, fua: bool = False) -> bool:
        """`trim` done now if that cannot block for long; same promise as `pwrite_now`."""
        return False

    def extents_now(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent] | None:
        """`extents` computed now if that is cheap and cannot block, else None."""
        return None


_ZERO_CHUNK = bytes(1024 * 1024)


async def write_zeroes_slowly(dev: BlockDev, offset: int, length: int, *, fua: bool) -> None:
    """Write explicit zero buffers over ``(offset, length)``."""
    end = offset + length
    view = memoryview(_ZERO_CHUNK)
    while offset < end:
        n = min(len(_ZERO_CHUNK), end - offset)
        await dev.pwrite(view[:n], offset, fua=fua and offset + n == end)
        offset += n


def is_zero(buf: Buffer) -> bool:
    """True when every byte of ``buf`` is zero (fast path for zero detection)."""
    mv = memoryview(buf).cast("B")
    n = len(mv)
    if n <= len(_ZERO_CHUNK):
        return mv == _ZERO_CHUNK[:n] if n else True
    pos = 0
    while pos < n:
        k = min(len(_ZERO_CHUNK), n - pos)
        if mv[pos : pos + k] != _ZERO_CHUNK[:k]:
            return False
        pos += k
    return True


class FilterDev(BlockDev):
    """A device that forwards every call to ``inner``; filters override what they change.

    Field: ``inner`` -- the device below; owned by the filter (closed with it
    unless ``owns_inner`` is False).  Class attribute ``same_bytes``: True
    when the filter reads and writes exactly ``inner``'s bytes at the same
    offsets (it may delay or fail calls, never transform them), so what
    ``inner`` holds is what the filter reads (`copystate.reads_zero` looks
    through it); False (the default) for anything else.
    """

    same_bytes = False

    def __init__(self, inner: BlockDev, *, owns_inner: bool = True) -> None:
        self.inner = inner
        self.owns_inner = owns_inner

    @property
    def size(self) -> int:
        return self.inner.size

    def capabilities(self) -> Capabilities:
        return self.inner.capabilities()

    def meta_contexts(self) -> Sequence[str]:
        return self.inner.meta_contexts()

    async def pread(self, buf: memoryview, offset: int) -> None:
        await self.inner.pread(buf, offset)

    async def pwrite(self, buf: Buffer, offset: int, *, fua: bool = False) -> None:
        await self.inner.pwrite(buf, offset, fua=fua)

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        await self.inner.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.inner.trim(offset, length, fua=fua)

    async def flush(self) -> None:
        await self.inner.flush()

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        return await self.inner.extents(offset, length, context)

    async def cache(self, offset: int, length: int) -> None:
        await self.inner.cache(offset, length)

    async def close(self) -> None:
        if self.owns_inner:
            await self.inner.close()

    # A filter that changes reads (or extents, writes, zeroes, trims)
    # overrides `pread` (`extents`, `pwrite`, `zero`, `trim`); the
    # synchronous fast paths then must not bypass it, so they forward to the
    # inner device only while the async method is the plain forwarder.

    def pread_now(self, buf: memoryview, offset: int) -> bool:
        if type(self).pread is not FilterDev.pread:
            return False
        return self.inner.pread_now(buf, offset)

    def extents_now(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent] | None:
        if type(self).extents is not FilterDev.extents:
            return None
        return self.inner.extents_now(offset, length, context)

    def pwrite_now(self, buf: Buffer, offset: int, fua: bool = False) -> bool:
        if type(self).pwrite is not FilterDev.pwrite:
            return False
        return self.inner.pwrite_now(buf, offset, fua)

    def pwrite_start(self, buf: Buffer, offset: int, fua: bool, cb) -> bool:
        if type(self).pwrite is not FilterDev.pwrite:
            return False
        return self.inner.pwrite_start(buf, offset, fua, cb)

    def zero_now(self, offset: int, length: int, *, may_trim: bool = False,
                 fua: bool = False, fast: bool = False) -> bool:
        if type(self).zero is not FilterDev.zero:
            return False
        return self.inner.zero_now(offset, length, may_trim=may_trim, fua=fua, fast=fast)

    def trim_now(self, offset: int, length: int, *, fua: bool = False) -> bool:
        if type(self).trim is not FilterDev.trim:
            return False
        return self.inner.trim_now(offset, length, fua=fua)


HOLE_ZERO = int(StateFlag.HOLE | StateFlag.ZERO)


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Merge adjacent extents with equal flags (input sorted and contiguous)."""
    out: list[Extent] = []
    for e in extents:
        if out and out[-1].flags == e.flags and out[-1].end == e.offset:
            out[-1] = Extent(out[-1].offset, out[-1].length + e.length, e.flags)
        else:
            out.append(e)
    return out
