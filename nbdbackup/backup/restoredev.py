"""The device of a restoring export: the target, read through to the backup.

Role: `RestoreDev` is the writable device an instant-recovery export serves
(under the export's `LiveDev`, so dirty bitmaps and backups hook it like any
live disk).  It applies `restorestate`'s rules to every request:

- READ / CACHE: chunks not restored yet are fetched now (copy-on-read, rule
  1), then the target is read;
- WRITE / WRITE_ZEROES: partly covered chunks are filled from the source
  first, covered ones owned (rule 2); with FUA, the progress map is made
  durable too (rule 5) before the request is answered;
- TRIM: passed to the target only over done chunks (rule 4);
- FLUSH: `RestoreState.make_durable` (target flush, then progress msync);
- BLOCK_STATUS (``base:allocation``): done chunks as the target says,
  others as the source says (zero chunks are holes), never "hole" for data
  that is only in the backup.

Once every chunk is done (`RestoreState.complete`) every call goes straight
to the target, task-free fast paths included: the export is then an
ordinary live export of the target.

Fields: ``inner`` (the target, owned), ``state`` (`RestoreState`),
``source`` (owned: closed with the device), ``on_close`` (callables run
after the target closed, e.g. closing the progress map).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

from ..blockdev.base import BASE_ALLOCATION, Buffer, Capabilities, Extent, FilterDev, merge_extents
from .restorestate import RestoreState


class RestoreDev(FilterDev):
    def __init__(self, state: RestoreState, *, on_close: Sequence[Callable[[], None]] = ()) -> None:
        super().__init__(state.target, owns_inner=True)
        self.state = state
        self.source = state.source
        self.on_close = list(on_close)

    @property
    def size(self) -> int:
        return self.state.size

    def capabilities(self) -> Capabilities:
        caps = self.inner.capabilities()
        return replace(caps, read_only=False, can_extents=True, can_fast_zero=False)

    def meta_contexts(self) -> Sequence[str]:
        return (BASE_ALLOCATION,)

    # -- reads ---------------------------------------------------------------

    async def pread(self, buf: memoryview, offset: int) -> None:
        st = self.state
        if not st.all_done(offset, len(buf)):
            st.reads_fetched += 1
            await st.fetch(offset, len(buf))
        await self.inner.pread(buf, offset)

    async def cache(self, offset: int, length: int) -> None:
        await self.state.fetch(offset, length)

    # -- writes --------------------------------------------------------------

    async def _write(self, offset: int, length: int, fua: bool, call) -> None:
        st = self.state
        if st.all_done(offset, length):
            await call()
        else:
            owned = await st.begin_write(offset, length)
            try:
                await call()
            except BaseException:
                st.end_write(owned, False)
                raise
            st.end_write(owned, True)
        if fua and not st.all_durable(offset, length):
            await st.make_durable()

    async def pwrite(self, buf: Buffer, offset: int, *, fua: bool = False) -> None:
        await self._write(offset, memoryview(buf).nbytes, fua,
                          lambda: self.inner.pwrite(buf, offset, fua=fua))

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        await self._write(offset, length, fua,
                          lambda: self.inner.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast))

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        st = self.state
        first, end = st.clusters_of(offset, length)
        stop = offset + length
        for s, n, done in list(st.done.runs(first, end)):
            if done:
                lo, ln = st.span(s, n)
                a, b = max(lo, offset), min(lo + ln, stop)
                await self.inner.trim(a, b - a)
        if fua:
            await st.make_durable()

    async def flush(self) -> None:
        await self.state.make_durable()

    # -- block status ----------------------------------------------------------

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        st = self.state
        if context != BASE_ALLOCATION:
            raise OSError(22, f"unknown meta context {context!r}")  # EINVAL
        if st.complete:
            return await self.inner.extents(offset, length, context)
        first, end = st.clusters_of(offset, length)
        stop = offset + length
        out: list[Extent] = []
        for s, n, done in list(st.done.runs(first, end)):
            lo, ln = st.span(s, n)
            pos, run_end = max(lo, offset), min(lo + ln, stop)
            dev = self.inner if done else self.source
            while pos < run_end:
                exts = await dev.extents(pos, run_end - pos, context)
                progressed = False
                for e in exts:
                    e_end = min(e.end, run_end)
                    if e.offset != pos or e_end <= pos:
                        break
                    out.append(Extent(pos, e_end - pos, e.flags))
                    pos, progressed = e_end, True
                    if pos >= run_end:
                        break
                if not progressed:  # no usable answer: data is always a safe one
                    out.append(Extent(pos, run_end - pos, 0))
                    pos = run_end
        return merge_extents(out)

    # -- fast paths: only once restored ---------------------------------------

    def pread_now(self, buf: memoryview, offset: int) -> bool:
        return self.state.all_done(offset, len(buf)) and self.inner.pread_now(buf, offset)

    def pwrite_now(self, buf: Buffer, offset: int, fua: bool = False) -> bool:
        return (not fua and self.state.all_done(offset, memoryview(buf).nbytes)
                and self.inner.pwrite_now(buf, offset, fua))

    def zero_now(self, offset: int, length: int, *, may_trim: bool = False,
                 fua: bool = False, fast: bool = False) -> bool:
        return (not fua and self.state.all_done(offset, length)
                and self.inner.zero_now(offset, length, may_trim=may_trim, fua=fua, fast=fast))

    def trim_now(self, offset: int, length: int, *, fua: bool = False) -> bool:
        return not fua and self.state.complete and self.inner.trim_now(offset, length, fua=fua)

    def extents_now(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent] | None:
        return self.inner.extents_now(offset, length, context) if self.state.complete else None

    async def close(self) -> None:
        try:
            await super().close()
            await self.source.close()
        finally:
            for cb in self.on_close:
                cb()
