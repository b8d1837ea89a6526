"""A sparse in-memory block device.

Role: `memory:SIZE` exports and the fast substrate for unit and hypothesis
tests of the backup engine.

Invariants: the disk is a dict of `PAGE`-sized pages; a missing page reads as
zeroes and is reported as a hole (HOLE|ZERO) by `extents`; a page is never
shorter than `PAGE` (the last page may extend past `size`; those bytes are
never read).  Every call completes without awaiting, so a call is atomic with
respect to other tasks: this is a disk with perfect, instant durability.
"""

from __future__ import annotations

from typing import Sequence

from .base import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    HOLE_ZERO,
    BlockDev,
    Buffer,
    Capabilities,
    Extent,
    merge_extents,
)

PAGE = 64 * 1024


class MemoryDev(BlockDev):
    """Sparse RAM disk.

    Fields: ``_size`` (bytes, constant); ``pages`` maps page index -> a
    bytearray of `PAGE` bytes (absent = zeroes); ``read_only``.
    """

    def __init__(self, size: int, *, read_only: bool = False) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self._size = size
        self.pages: dict[int, bytearray] = {}
        self.read_only = read_only

    @property
    def size(self) -> int:
        return self._size

    def capabilities(self) -> Capabilities:
        return Capabilities(read_only=self.read_only, can_fast_zero=True)

    def meta_contexts(self) -> Sequence[str]:
        return (BASE_ALLOCATION, ALLOCATION_DEPTH)

    def _check(self, offset: int, length: int) -> None:
        assert 0 <= offset and 0 <= length and offset + length <= self._size, (offset, length)

    def read_sync(self, buf: memoryview, offset: int) -> None:
        self._check(offset, len(buf))
        pos, end, out = offset, offset + len(buf), 0
        while pos < end:
            idx, start = divmod(pos, PAGE)
            n = min(PAGE - start, end - pos)
            page = self.pages.get(idx)
            if page is None:
                buf[out : out + n] = bytes(n)
            else:
                buf[out : out + n] = page[start : start + n]
            pos += n
            out += n

    def write_sync(self, buf: Buffer, offset: int) -> None:
        mv = memoryview(buf).cast("B")
        self._check(offset, len(mv))
        pos, end, inp = offset, offset + len(mv), 0
        while pos < end:
            idx, start = divmod(pos, PAGE)
            n = min(PAGE - start, end - pos)
            page = self.pages.get(idx)
            if page is None:
                page = self.pages[idx] = bytearray(PAGE)
            page[start : start + n] = mv[inp : inp + n]
            pos += n
            inp += n

    def _pages_in(self, first: int, end: int) -> list[int]:
        """Sorted indexes of the allocated pages in ``[first, end)``, in
        O(min(end - first, allocated pages)): the cost follows the data, not
        the range (a 1 TiB disk has 16 Mi pages)."""
        if end - first <= len(self.pages):
            return [i for i in range(first, end) if i in self.pages]
        return sorted(i for i in self.pages if first <= i < end)

    def zero_sync(self, offset: int, length: int) -> None:
        self._check(offset, length)
        end = offset + length
        # Whole pages [a, b) are dropped; the partial pages at the edges are
        # zeroed in place (a missing one reads as zeros already).
        a, b = -(-offset // PAGE), end // PAGE
        if a >= b:
            self._zero_partial(offset, end)
            return
        self._zero_partial(offset, a * PAGE)
        for i in self._pages_in(a, b):
            del self.pages[i]
        self._zero_partial(b * PAGE, end)

    def _zero_partial(self, pos: int, end: int) -> None:
        while pos < end:
            idx, start = divmod(pos, PAGE)
            n = min(PAGE - start, end - pos)
            if n == PAGE:
                self.pages.pop(idx, None)
            else:
                page = self.pages.get(idx)
                if page is not None:
                    page[start : start + n] = bytes(n)
            pos += n

    async def pread(self, buf: memoryview, offset: int) -> None:
        self.read_sync(buf, offset)

    def pread_now(self, buf: memoryview, offset: int) -> bool:
        self.read_sync(buf, offset)
        return True

    async def pwrite(self, buf: Buffer, offset: int, *, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(1, "read-only device")
        self.write_sync(buf, offset)

    def pwrite_now(self, buf: Buffer, offset: int, fua: bool = False) -> bool:
        if self.read_only:
            return False  # `pwrite` raises EPERM
        self.write_sync(buf, offset)
        return True

    def zero_now(self, offset: int, length: int, *, may_trim: bool = False,
                 fua: bool = False, fast: bool = False) -> bool:
        if self.read_only:
            return False
        self.zero_sync(offset, length)
        return True

    def trim_now(self, offset: int, length: int, *, fua: bool = False) -> bool:
        if self.read_only:
            return False
        self.zero_sync(offset, length)
        return True

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        if self.read_only:
            raise OSError(1, "read-only device")
        self.zero_sync(offset, length)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if self.read_only:
            raise OSError(1, "read-only device")
        self.zero_sync(offset, length)

    async def flush(self) -> None:
        pass

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        return self.extents_now(offset, length, context)

    def extents_now(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        """Extents of ``(offset, length)``: allocated pages are data, the
        rest holes; O(min(pages in the range, allocated pages))."""
        self._check(offset, length)
        if context not in (BASE_ALLOCATION, ALLOCATION_DEPTH):
            raise OSError(22, f"unknown meta context {context!r}")
        if context == ALLOCATION_DEPTH:
            data_flags, hole_flags = 1, 0
        else:
            data_flags, hole_flags = 0, HOLE_ZERO
        out: list[Extent] = []
        pos, end = offset, offset + length
        if length == 0:
            return out
        for i in self._pages_in(offset // PAGE, (end - 1) // PAGE + 1):
            s, e = max(i * PAGE, offset), min((i + 1) * PAGE, end)
            if s > pos:
                out.append(Extent(pos, s - pos, hole_flags))
            out.append(Extent(s, e - s, data_flags))
            pos = e
        if pos < end:
            out.append(Extent(pos, end - pos, hole_flags))
        return merge_extents(out)
