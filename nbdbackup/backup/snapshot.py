"""The point-in-time snapshot view of a disk under backup (QEMU's snapshot-access).

Role: `SnapshotDev` is the read-only device behind a backup's snapshot export
(fleecing).  It reads each cluster from where its point-in-time content is
(`CopyState.where`: the target, the scratch, nowhere because it is zeros),
else from the live source while registered as a reader, so that
copy-before-write holds the live write back until the read is over
(`copystate` rule 2).  The task-free `pread_now` and `extents_now` run from
split to answer with no await, so nothing can write meanwhile: they
register nothing, and a range nothing has written over yet
(`CopyState.reads_source`) is one request to the source.

TRIM (QEMU's snapshot-access discard, `copystate` rule 8): the region is no
longer needed; its whole clusters are marked trimmed: their scratch copies
are discarded, later live writes there copy nothing (unless the backup
target still needs them), and a later READ of them fails with EACCES (NBD
EPERM; QEMU's snapshot-access fails such reads with EACCES too) -- an error,
never stale or made-up data.  Block status reports them as a hole without
the zero flag (content unspecified).  The export accepts TRIM only when
built with ``trim=True`` (backup-start ``snapshot-trim``): it is then
published writable (no READ_ONLY flag) but WRITE fails with EPERM and
WRITE_ZEROES is not offered; otherwise it is read-only as before.

Invariant: every byte read from a live `SnapshotDev` equals the source's
content at the moment the backup started, whatever live writes run
concurrently.

States: alive; broken (the job's ``on-cbw-error=break-snapshot`` fired: every
call fails with EIO, because the point-in-time content may be lost); closed
(the job was dismissed: every call fails with ESHUTDOWN).

Extents: `base:allocation` describes the point-in-time image (source extents
for not-done clusters, target extents for done ones, merged).  A done
cluster's device is asked only when its answer can be trusted
(``Capabilities.sparse_reads``: a local file, memory); on any other (a
remote NBD target or scratch) a copied segment is reported as data, never
asked: nbdkit 1.32's cache filter in writeback mode says "hole, zero" for
data written and not yet flushed, and a reader that skips zero extents
(nbdcopy, qemu-img convert) would copy zeros for the point-in-time content
(docs/doubts18.md item 1).  Invariant: no segment the engine copied
somewhere is reported ZERO on a device's word unless that device's
allocation is exact; clusters known to be zeros (``zeroed``) are HOLE|ZERO
without asking anyone.  The source's answer is trusted as it is for the
live export (and as QEMU does): a not-done cluster has not been written
since the start -- once a source whose allocation may lag its writes has
been flushed (`CopyState.source_extents`, which the task-free path never
needs: such a remote has no `extents_now`).  Further
contexts (e.g. ``qemu:dirty-bitmap:NAME`` for the job's frozen bitmap) are
plugged in with `add_context(name, provider)`, ``provider(offset, length) ->
awaitable list[Extent]``.
"""

from __future__ import annotations

import errno
from typing import Awaitable, Callable, Sequence

from ..blockdev.base import (
    BASE_ALLOCATION,
    HOLE_ZERO,
    BlockDev,
    BlockSize,
    Buffer,
    Capabilities,
    Extent,
    merge_extents,
)
from ..nbd.wire import StateFlag
from .copystate import CopyState, Where

ExtentProvider = Callable[[int, int], Awaitable[list[Extent]]]


class SnapshotDev(BlockDev):
    """Read-only point-in-time view.

    Fields: ``state`` (the job's `CopyState`); ``trim_ok`` (TRIM accepted,
    see the module docstring); ``_contexts`` (extra meta context name ->
    provider); ``_closed`` (set by `close_view`); ``_ask`` (per `Where`
    kind with a device: True when that device's ``base:allocation`` is
    asked for the segments there, False when they are reported as data --
    see "Extents" in the module docstring; fixed at creation, as the
    job's devices are).
    """

    def __init__(self, state: CopyState, *, trim: bool = False) -> None:
        self.state = state
        self.trim_ok = trim
        self._contexts: dict[str, ExtentProvider] = {}
        self._closed = False
        self._ask: dict[Where, bool] = {"source": True}
        for where in ("target", "scratch"):
            dev = state.device(where)
            self._ask[where] = dev is not None and dev.capabilities().sparse_reads

    @property
    def size(self) -> int:
        return self.state.size

    def capabilities(self) -> Capabilities:
        st = self.state
        sizes = [d.capabilities().block_size for d in (st.source, st.target, st.scratch) if d is not None]
        minimum = max(b.minimum for b in sizes)
        return Capabilities(
            read_only=not self.trim_ok, can_flush=False, can_fua=False, can_trim=self.trim_ok, can_zero=False,
            can_fast_zero=False, can_cache=False, can_multi_conn=True, can_extents=True,
            block_size=BlockSize(minimum, max(minimum, *(b.preferred for b in sizes)),
                                 min(b.maximum for b in sizes)),
        )

    def meta_contexts(self) -> Sequence[str]:
        return (BASE_ALLOCATION, *self._contexts)

    def add_context(self, name: str, provider: ExtentProvider) -> None:
        """Answer meta context ``name`` with ``provider`` (e.g. the frozen dirty bitmap)."""
        self._contexts[name] = provider

    def close_view(self) -> None:
        """The job was dismissed: every later call fails with ESHUTDOWN."""
        self._closed = True

    def _check(self) -> None:
        if self._closed:
            raise OSError(errno.ESHUTDOWN, "the backup job of this snapshot was dismissed")
        if self.state.broken is not None:
            raise OSError(errno.EIO, f"snapshot broken by a copy-before-write error: {self.state.broken}")

    async def pread(self, buf: memoryview, offset: int) -> None:
        self._check()
        n = len(buf)
        if n == 0:
            return
        st = self.state
        segs = st.begin_read(offset, n)
        try:
            for off, ln, where in segs:
                dev = st.device(where)
                part = buf[off - offset: off - offset + ln]
                if dev is None:  # "zero"
                    part[:] = bytes(ln)
                else:
                    await dev.pread(part, off)
        finally:
            st.end_read(segs)
        # A break during the read may have let a live write through: recheck.
        self._check()

    def pread_now(self, buf: memoryview, offset: int) -> bool:
        """`pread` without a task when every segment's device has its bytes at
        hand (`BlockDev.pread_now`: the page cache): the server's READ fast
        path.  False: the caller awaits `pread`, which reads everything again
        (a partly filled ``buf`` is overwritten).

        Registers no reader (rule 2), as `extents_now`: from the split into
        segments to the last byte copied nothing else runs on the loop (no
        await), so no copy-before-write can make a cluster done and let a
        live write change its source bytes in between; a live write already
        under way (in an I/O engine, a thread) has made its clusters done
        before it started (rule 1), so they are not read from the source
        here.  A range nothing has written over yet (`CopyState.reads_source`)
        is one read of the source, with no segment list."""
        n = len(buf)
        st = self.state
        if self._closed or st.broken is not None or n == 0:
            return False
        if st.reads_source(offset, n):
            return st.source.pread_now(buf, offset)
        try:
            segs = st.segments(offset, n)
        except OSError:
            return False  # trimmed: `pread` reports it
        for off, ln, where in segs:
            dev = st.device(where)
            part = buf[off - offset: off - offset + ln]
            if dev is None:  # "zero"
                part[:] = bytes(ln)
            elif not dev.pread_now(part, off):
                return False
        return True

    async def pwrite(self, buf: Buffer, offset: int, *, fua: bool = False) -> None:
        self._check()
        raise OSError(errno.EPERM, "the snapshot export is read-only")

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        self._check()
        raise OSError(errno.EPERM, "the snapshot export is read-only")

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check()
        if not self.trim_ok:
            raise OSError(errno.EPERM, "the snapshot export is read-only")
        await self.state.trim_snapshot(offset, length)

    async def flush(self) -> None:
        self._check()

    async def cache(self, offset: int, length: int) -> None:
        self._check()

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        self._check()
        if context == BASE_ALLOCATION:
            got = self.extents_now(offset, length, context)  # every device answers at once: no task
            if got is not None:
                return got
        if context != BASE_ALLOCATION:
            provider = self._contexts.get(context)
            if provider is None:
                raise OSError(errno.EINVAL, f"unknown meta context {context!r}")
            return await provider(offset, length)
        st = self.state
        segs = st.begin_read(offset, length, allow_trimmed=True)
        out: list[Extent] = []
        try:
            for off, ln, where in segs:
                dev = st.device(where)
                if dev is None:
                    # zeros stored nowhere; trimmed: unallocated, content unspecified
                    out.append(Extent(off, ln, HOLE_ZERO if where == "zero" else int(StateFlag.HOLE)))
                    continue
                if not self._ask[where]:
                    out.append(Extent(off, ln, 0))  # copied there; its allocation is not to be trusted
                    continue
                pos, end = off, off + ln
                ask = st.source_extents if where == "source" else dev.extents  # (a lagging source: flushed first)
                while pos < end:
                    pos = _clip(await ask(pos, end - pos, BASE_ALLOCATION), pos, end, out)
        finally:
            st.end_read(segs)
        self._check()
        return merge_extents(out)

    def extents_now(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent] | None:
        """`extents` of ``base:allocation`` without a task when every device
        answers at once (`BlockDev.extents_now`), else None (the server's
        READ fast path asks it before a structured read; `extents` tries it
        first).  Nothing can run between the split into segments and the
        answer here (no await), so no cluster is registered as read
        (`CopyState.segments`): a copy-before-write cannot change what a
        segment's device says before it has said it."""
        if context != BASE_ALLOCATION or self._closed or self.state.broken is not None:
            return None
        st = self.state
        out: list[Extent] = []
        if st.reads_source(offset, length):
            # All from the source: its own answer when it covers the range exactly.
            got = st.source.extents_now(offset, length, BASE_ALLOCATION)
            if got is None:
                return None
            if got and got[0].offset == offset and got[-1].end == offset + length:
                return got if len(got) == 1 else merge_extents(got)
            segs: list[tuple[int, int, Where]] = [(offset, length, "source")]
        else:
            segs = st.segments(offset, length, allow_trimmed=True)
        for off, ln, where in segs:
            dev = st.device(where)
            if dev is None:
                out.append(Extent(off, ln, HOLE_ZERO if where == "zero" else int(StateFlag.HOLE)))
                continue
            if not self._ask[where]:
                out.append(Extent(off, ln, 0))  # copied there; its allocation is not to be trusted
                continue
            pos, end = off, off + ln
            while pos < end:
                got = dev.extents_now(pos, end - pos, BASE_ALLOCATION)
                if got is None:
                    return None
                pos = _clip(got, pos, end, out)
        return out if len(out) == 1 else merge_extents(out)

    async def close(self) -> None:
        self._closed = True


def _clip(got: list[Extent], pos: int, end: int, out: list[Extent]) -> int:
    """Append the part of ``got`` (a device's extents from ``pos``) inside
    ``[pos, end)`` to ``out``; the new position.  A device that said nothing
    useful about ``pos`` counts as data up to ``end``."""
    before = pos
    for e in got:
        e_end = min(e.end, end)
        if e_end > pos and e.offset <= pos:
            out.append(Extent(pos, e_end - pos, e.flags))
            pos = e_end
    if pos == before:
        out.append(Extent(pos, end - pos, 0))
        pos = end
    return pos
