"""The one copy state shared by copy-before-write, the snapshot view and the pump.

Role: QEMU's block-copy idea.  Whoever copies a cluster from the source (the
live disk) to the backup target -- the background pump or a copy-before-write
triggered by a live write -- goes through this object, so a cluster is never
copied twice, never skipped, and the snapshot view knows where the
point-in-time content of every cluster lives.

Granularity: clusters of ``cluster_size`` bytes (a power of two); the last
cluster may be shorter (``size`` need not be a multiple).  Cluster ``c`` covers
bytes ``[c*cs, min((c+1)*cs, size))``.

Shared state (all mutated only on the event loop thread; the steps marked
"synchronously" below contain no ``await``, which is what makes them atomic):

- ``done`` (Bitmap): bit c set <=> the point-in-time content of cluster c is
  in the target.  Set once, never cleared while the state lives.  Once set,
  the target's bytes of c never change again (nobody copies a done cluster).
- ``pump_todo`` (Bitmap): clusters the pump still has to copy (set by the
  sync mode at start: full = all, top = allocated in the source's top layer,
  incremental/bitmap = the frozen dirty bitmap, none = empty).  Invariant:
  ``pump_todo & done == 0`` (marking a cluster done clears its todo bit).
- ``inflight`` (`Claims`: disjoint cluster runs -> Future; ``inflight.get(c)``
  is the future of the copy in progress for cluster c, ``c in inflight``
  whether there is one; a run per claim, so a claim costs the same whatever
  its length): the copy in progress for that cluster.  A second copier of the same cluster awaits the future instead of
  copying again.  The future resolves to None on success; on failure it holds
  the error and the cluster is again neither done nor in flight (rule 4), so
  the waiter may retry.
- ``readers`` (dict cluster -> int > 0): snapshot reads currently reading the
  SOURCE for that cluster (absent = 0).  A live write waits for it to drop to
  0 (``_reader_waiters``: cluster -> futures woken when it does).

Rules:
1. copy-before-write (`protect`): before a live write to ``(offset, length)``
   every cluster of the range is made done (copied, or the in-flight copy
   awaited), then the writer waits until no snapshot read is reading the
   source of those clusters.  Every cluster is protected whatever
   ``pump_todo`` says: the snapshot must stay the point-in-time image.
2. snapshot read (`begin_read`/`end_read`): per cluster, if done read the
   target, else register as a reader synchronously (no await between the
   ``done`` test and the ``readers`` increment), read the source, unregister.
   Since rule 1 makes writers wait for readers after the cluster is done, a
   source read never sees a write that started after the snapshot.
3. pump (`claim` + `copy`): claims runs of todo clusters that are neither done
   nor in flight, synchronously marking them in flight.
   A claim may be extended (`extend_claim`) over the following claimable
   clusters; the pump does so over runs the source reports as zeros, which
   it then zeroes in the target in one request (``copy(source_zero=True)``).
   That is exact because of rule 1: a cluster that is not done has not been
   written since the backup started, so what the source says of it -- at
   any moment while it is not done -- is its point-in-time content.
4. a failed (or cancelled) copy leaves its clusters not done and not in
   flight; waiters see the error.
5. cancelling anything leaves this state valid: resuming is just carrying on.
6. retiring (`retire`, when the job is dismissed: the snapshot is gone and
   the target about to close): no new copy is claimed from then on, so a
   live write that was already inside copy-before-write (it started before
   the hook was detached, and waits on another copy or a reader) goes on
   without copying; the copies already in flight are the last, and the
   dismiss waits for them before closing the target.

Progress: ``total`` = bytes of ``pump_todo`` when the job set it up;
``current`` = bytes among those that were copied (by the pump or by CBW) or
skipped by the ``ignore`` error policy (``bytes_ignored``).  Statistics:
``bytes_copied_by_pump``, ``bytes_copied_by_cbw``, ``clusters_skipped_zero``
(clusters found all-zero, or a source hole, written as target.zero).
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import os
from typing import Literal

from ..bitmap.core import Bitmap
from ..blockdev.base import BlockDev, Extent, FilterDev, merge_extents

Copier = Literal["pump", "cbw"]

#: Offloaded copies up to this size run inline on the event loop (see `_copy_offload`).
INLINE_COPY = 1024 * 1024


class CopyError(OSError):
    """A cluster copy failed; ``operation`` is "read" (source) or "write" (target)."""

    def __init__(self, err: int, message: str, operation: str) -> None:
        super().__init__(err, message)
        self.operation = operation

    @classmethod
    def wrap(cls, e: OSError, operation: str) -> "CopyError":
        if isinstance(e, CopyError):
            return e
        return cls(e.errno or errno.EIO, e.strerror or str(e), operation)


_Z1M = bytes(1 << 20)


def is_zero(mv: memoryview) -> bool:
    """All bytes zero?  (``tobytes() ==`` is a memcmp: ~25x faster than
    comparing memoryviews, which unpacks element by element.)"""
    n = len(mv)
    pos = 0
    while pos < n:
        k = min(n - pos, len(_Z1M))
        if mv[pos:pos + k].tobytes() != (_Z1M if k == len(_Z1M) else bytes(k)):
            return False
        pos += k
    return True


def _retrieve(fut: asyncio.Future) -> None:
    # Mark a failed future's exception as retrieved (nobody may wait on it).
    if not fut.cancelled():
        fut.exception()


class Claims:
    """The copies in flight: disjoint cluster runs ``[start, end)``, each with
    the future of the one copy that covers it.

    Fields: ``_starts`` (sorted run starts); ``_runs`` (start -> (end, future)).
    There are as many runs as copies in flight (the pump's workers plus the
    copy-before-writes waiting), so a sorted list is the right size; a run's
    length costs nothing.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._runs: dict[int, tuple[int, asyncio.Future]] = {}

    def add(self, start: int, count: int, fut: asyncio.Future) -> None:
        assert count > 0 and self.next_start(start, start + count) == start + count and start not in self
        bisect.insort(self._starts, start)
        self._runs[start] = (start + count, fut)

    def extend(self, start: int, count: int) -> None:
        """Make the run at ``start`` ``count`` clusters long (not shorter)."""
        end, fut = self._runs[start]
        assert start + count >= end and self.next_start(end, start + count) == start + count
        self._runs[start] = (start + count, fut)

    def remove(self, start: int, fut: asyncio.Future) -> None:
        """Drop the run at ``start`` if it is still ``fut``'s."""
        run = self._runs.get(start)
        if run is not None and run[1] is fut:
            del self._runs[start]
            del self._starts[bisect.bisect_left(self._starts, start)]

    def get(self, c: int, default: asyncio.Future | None = None) -> asyncio.Future | None:
        i = bisect.bisect_right(self._starts, c) - 1
        if i >= 0:
            end, fut = self._runs[self._starts[i]]
            if c < end:
                return fut
        return default

    def __getitem__(self, c: int) -> asyncio.Future:
        fut = self.get(c)
        if fut is None:
            raise KeyError(c)
        return fut

    def __contains__(self, c: int) -> bool:
        return self.get(c) is not None

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        """Clusters in flight."""
        return sum(end - s for s, (end, _) in self._runs.items())

    def values(self) -> list[asyncio.Future]:
        """The futures of the copies in flight (one per copy)."""
        return [fut for _, fut in self._runs.values()]

    def next_start(self, c: int, end: int) -> int:
        """The first run start in ``[c, end)``, else ``end``."""
        i = bisect.bisect_left(self._starts, c)
        return self._starts[i] if i < len(self._starts) and self._starts[i] < end else end


def _innermost(dev: BlockDev) -> BlockDev:
    while isinstance(dev, FilterDev):
        dev = dev.inner
    return dev


class CopyState:
    """Copy state for one backup; see the module docstring.

    Other fields: ``source`` (read for not-done clusters; the live export's
    device: reads pass through its hooks untouched), ``target``, ``size``,
    ``cluster_size``, ``nclusters``, ``zero_detect`` (write all-zero clusters
    as target.zero(may_trim=True)), ``offload`` (try ``os.copy_file_range``
    when both ends are plain files; turned off at the first failure),
    ``broken`` (an OSError once the snapshot is broken: CBW stops copying,
    snapshot reads fail with EIO); ``retired`` (rule 6: set once, at dismiss).
    """

    def __init__(self, source: BlockDev, target: BlockDev, cluster_size: int, *,
                 zero_detect: bool = True, offload: bool = True) -> None:
        assert cluster_size >= 512 and cluster_size & (cluster_size - 1) == 0
        assert target.size >= source.size
        self.source = source
        self.target = target
        self.size = source.size
        self.cluster_size = cluster_size
        self._shift = cluster_size.bit_length() - 1
        self.nclusters = (self.size + cluster_size - 1) >> self._shift
        self.done = Bitmap(self.nclusters)
        self.pump_todo = Bitmap(self.nclusters)
        self.inflight = Claims()
        self.readers: dict[int, int] = {}
        self._reader_waiters: dict[int, list[asyncio.Future]] = {}
        self.zero_detect = zero_detect
        self.offload = offload and self._offload_files() is not None
        self.broken: OSError | None = None
        self.retired = False
        self.total = 0
        self.current = 0
        self.bytes_copied_by_pump = 0
        self.bytes_copied_by_cbw = 0
        self.bytes_ignored = 0
        self.clusters_skipped_zero = 0

    # -- geometry ---------------------------------------------------------

    def clusters_of(self, offset: int, length: int) -> tuple[int, int]:
        """``(first, end)``: the clusters touching ``(offset, length)``."""
        assert length > 0 and offset + length <= self.size, (offset, length, self.size)
        return offset >> self._shift, ((offset + length - 1) >> self._shift) + 1

    def span(self, first: int, count: int) -> tuple[int, int]:
        """Byte range ``(offset, length)`` of clusters ``[first, first+count)``."""
        off = first << self._shift
        return off, min((first + count) << self._shift, self.size) - off

    def set_pump_todo(self, todo: Bitmap | None) -> None:
        """Set ``pump_todo`` (None = nothing) minus done clusters; sets ``total``."""
        if todo is None:
            self.pump_todo.clear_all()
        else:
            assert todo.nbits == self.nclusters
            self.pump_todo.copy_from(todo)
            for start, count, value in self.done.runs():
                if value:
                    self.pump_todo.clear(start, count)
        self.total = self._bytes_set(self.pump_todo)
        self.current = 0

    def _bytes_set(self, bm: Bitmap) -> int:
        n = bm.count() << self._shift
        if self.nclusters and bm.get(self.nclusters - 1):
            n -= (self.nclusters << self._shift) - self.size
        return n

    # -- claiming and copying (rules 1, 3, 4) -------------------------------

    def claim(self, first: int, end: int, max_clusters: int,
              todo_only: bool = False) -> tuple[int, int] | None:
        """Synchronously claim the first run of clusters in ``[first, end)``
        that are not done and not in flight (and in ``pump_todo`` when
        ``todo_only``), at most ``max_clusters`` long.  Returns ``(start,
        count)`` or None.  The caller MUST then call `copy` on it.
        """
        src = self.pump_todo if todo_only else None
        c = first
        while c < end:
            c = src.next_set(c, end) if src is not None else self.done.next_clear(c, end)
            if c < 0:
                return None
            if c in self.inflight:
                c += 1
                continue
            stop = min(end, c + max_clusters)
            e = self.done.next_set(c, stop)
            stop = stop if e < 0 else e
            if src is not None:
                e = src.next_clear(c, stop)
                stop = stop if e < 0 else e
            stop = self.inflight.next_start(c + 1, stop)
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_retrieve)
            self.inflight.add(c, stop - c, fut)
            return c, stop - c
        return None

    def extend_claim(self, start: int, count: int, end: int, todo_only: bool = False) -> int:
        """Synchronously extend the claim ``[start, start+count)`` over the
        clusters that follow it, up to ``end``, while they are not done, not in
        flight (and in ``pump_todo`` when ``todo_only``); returns the new count.
        The extended claim is one claim: one `copy` call covers it."""
        c = start + count
        if c >= end:
            return count
        e = self.done.next_set(c, end)
        stop = end if e < 0 else e
        if todo_only:
            e = self.pump_todo.next_clear(c, stop)
            stop = stop if e < 0 else e
        stop = self.inflight.next_start(c, stop)
        if stop > c:
            self.inflight.extend(start, stop - start)
        return max(stop, c) - start

    async def copy(self, start: int, count: int, by: Copier, *, source_zero: bool = False) -> None:
        """Copy claimed clusters ``[start, start+count)``; raises `CopyError`.

        ``source_zero``: the caller knows every cluster of the claim reads as
        zeros in the source (a hole or zero extent the source reported while
        they were not done: their source content is then still the
        point-in-time content, see rule 1), so the target's span is zeroed at
        once and nothing is read.

        On success they are done (and out of ``pump_todo``); on any failure,
        cancellation included, they are neither done nor in flight and the
        future holds the error (rule 4).
        """
        fut = self.inflight[start]
        try:
            if source_zero:
                try:
                    await self._zero_target(*self.span(start, count))
                except OSError as e:
                    raise CopyError.wrap(e, "write") from e
                self.clusters_skipped_zero += count
            else:
                await self._copy_bytes(*self.span(start, count))
        except BaseException as e:
            self.inflight.remove(start, fut)
            if not fut.done():
                if isinstance(e, OSError):
                    fut.set_exception(e)
                else:
                    fut.set_exception(OSError(errno.ECANCELED, "copy cancelled"))
            if isinstance(e, OSError) and not isinstance(e, CopyError):
                raise CopyError.wrap(e, "read") from e
            raise
        nbytes = self.span(start, count)[1]
        todo_bytes = self._bytes_in(self.pump_todo, start, count)
        self.done.set(start, count)
        self.pump_todo.clear(start, count)
        self.current += todo_bytes
        if by == "pump":
            self.bytes_copied_by_pump += nbytes
        else:
            self.bytes_copied_by_cbw += nbytes
        self.inflight.remove(start, fut)
        fut.set_result(None)

    def _bytes_in(self, bm: Bitmap, start: int, count: int) -> int:
        total = 0
        for s, n, v in bm.runs(start, start + count):
            if v:
                total += self.span(s, n)[1]
        return total

    def ignore(self, start: int, count: int) -> None:
        """The ``ignore`` error policy: drop clusters from ``pump_todo`` (not done)."""
        n = self._bytes_in(self.pump_todo, start, count)
        self.pump_todo.clear(start, count)
        self.current += n
        self.bytes_ignored += n

    async def ensure_done(self, offset: int, length: int, by: Copier = "cbw",
                          max_clusters: int = 1 << 30) -> None:
        """Make every cluster of ``(offset, length)`` done (rule 1, first half).

        Awaits copies in flight; a failed one is retried by us (if our own copy
        fails too, its `CopyError` propagates).
        """
        first, end = self.clusters_of(offset, length)
        pos = first
        while True:
            if self.retired:
                return  # rule 6: nothing needs the old content any more
            pos = self.done.next_clear(pos, end)
            if pos < 0:
                return
            fut = self.inflight.get(pos)
            if fut is not None:
                try:
                    await asyncio.shield(fut)
                except OSError:
                    pass  # the owner failed: loop, and copy it ourselves
                continue
            claimed = self.claim(pos, end, max_clusters)
            assert claimed is not None and claimed[0] == pos
            await self.copy(*claimed, by)

    async def wait_no_readers(self, offset: int, length: int) -> None:
        """Wait until no snapshot read reads the source of ``(offset, length)``."""
        if not self.readers:
            return
        first, end = self.clusters_of(offset, length)
        loop = asyncio.get_running_loop()
        for c in range(first, end):
            while self.readers.get(c):
                fut = loop.create_future()
                self._reader_waiters.setdefault(c, []).append(fut)
                await fut

    def retire(self) -> None:
        """Rule 6: claim nothing more (the snapshot is gone)."""
        self.retired = True

    def protect_now(self, offset: int, length: int) -> bool:
        """Rule 1 when it needs no wait: True when the live write to
        ``(offset, length)`` may go on now (retired, or every cluster of the
        range is done and no snapshot read reads its source); False: await
        `protect`.  Synchronous, changes nothing."""
        if self.retired:
            return True
        first, end = self.clusters_of(offset, length)
        if not self.done.all(first, end - first):
            return False
        readers = self.readers
        if readers:
            for c in range(first, end):
                if c in readers:
                    return False
        return True

    async def protect(self, offset: int, length: int) -> None:
        """Rule 1: the live write to ``(offset, length)`` may go on when this returns."""
        if self.retired:
            return
        first, end = self.clusters_of(offset, length)
        if not self.done.all(first, end - first):
            await self.ensure_done(offset, length, "cbw")
        if self.readers:
            await self.wait_no_readers(offset, length)

    # -- snapshot reads (rule 2) -----------------------------------------

    def begin_read(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Synchronously split ``(offset, length)`` into segments ``(offset,
        length, from_target)`` and register as a reader of every not-done
        cluster.  The caller MUST call `end_read` with the result.
        """
        first, end = self.clusters_of(offset, length)
        stop = offset + length
        segs = []
        for s, n, is_done in self.done.runs(first, end):
            lo, ln = self.span(s, n)
            lo2, hi2 = max(lo, offset), min(lo + ln, stop)
            if not is_done:
                for c in range(s, s + n):
                    self.readers[c] = self.readers.get(c, 0) + 1
            segs.append((lo2, hi2 - lo2, is_done))
        return segs

    def end_read(self, segs: list[tuple[int, int, bool]]) -> None:
        for off, ln, from_target in segs:
            if from_target:
                continue
            first, end = self.clusters_of(off, ln)
            for c in range(first, end):
                k = self.readers[c] - 1
                if k:
                    self.readers[c] = k
                    continue
                del self.readers[c]
                for w in self._reader_waiters.pop(c, ()):
                    if not w.done():
                        w.set_result(None)

    # -- the copy itself ----------------------------------------------------

    def _offload_files(self):
        from ..blockdev.file import FileDev

        s, t = _innermost(self.source), _innermost(self.target)
        if isinstance(s, FileDev) and isinstance(t, FileDev) and not s.is_block and not t.is_block:
            return s, t
        return None

    async def _copy_bytes(self, offset: int, length: int) -> None:
        if self.offload:
            files = self._offload_files()
            if files is not None:
                try:
                    await self._copy_offload(files[0], files[1], offset, length)
                    return
                except OSError:
                    self.offload = False  # fall back to read/write, for good
        buf = bytearray(length)
        mv = memoryview(buf)
        try:
            await self.source.pread(mv, offset)
        except OSError as e:
            raise CopyError.wrap(e, "read") from e
        try:
            if not self.zero_detect:
                await self.target.pwrite(mv, offset)
                return
            cs = self.cluster_size
            pos = 0
            while pos < length:
                # A run of clusters that are all zero, or all not zero.
                zero = is_zero(mv[pos:pos + cs])
                end = min(pos + cs, length)
                while end < length and is_zero(mv[end:end + cs]) == zero:
                    end = min(end + cs, length)
                if zero:
                    await self._zero_target(offset + pos, end - pos)
                    self.clusters_skipped_zero += (end - pos + cs - 1) // cs
                else:
                    await self.target.pwrite(mv[pos:end], offset + pos)
                pos = end
        except OSError as e:
            raise CopyError.wrap(e, "write") from e

    async def _zero_target(self, offset: int, length: int) -> None:
        try:
            await self.target.zero(offset, length, may_trim=True)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            await self.target.pwrite(bytes(length), offset)

    async def _copy_offload(self, src, dst, offset: int, length: int) -> None:
        """copy_file_range for data extents, target.zero for source holes.

        Copies up to `INLINE_COPY` bytes (copy-before-write's usual size) run
        inline: a thread hand-off cost more than the page-cache copy itself.
        They probe holes with one SEEK_DATA only (SEEK_HOLE can be slow: tmpfs
        scans the cached file), so a range that is all hole stays a hole in
        the target; a partly-hole range is copied whole (same content).
        Larger copies (the pump's chunks) skip every hole and run in a worker
        thread.
        """
        if length <= INLINE_COPY:
            try:
                data = os.lseek(src.fd, offset, os.SEEK_DATA)
            except OSError as e:
                data = offset + length if e.errno == errno.ENXIO else offset
            if data >= offset + length:
                await self._zero_target(offset, length)
                self.clusters_skipped_zero += (length + self.cluster_size - 1) // self.cluster_size
                return
            _copy_range(src.fd, dst.fd, offset, length)
            return
        loop = asyncio.get_running_loop()
        exts: list[Extent] = merge_extents(src.extents_sync(offset, length))
        for e in exts:
            if e.flags & 2:  # ZERO: a hole in the source
                await self._zero_target(e.offset, e.length)
                self.clusters_skipped_zero += e.length // self.cluster_size
                continue
            await loop.run_in_executor(None, _copy_range, src.fd, dst.fd, e.offset, e.length)


def _copy_range(sfd: int, dfd: int, offset: int, length: int) -> None:
    pos, end = offset, offset + length
    while pos < end:
        n = os.copy_file_range(sfd, dfd, end - pos, pos, pos)
        if n <= 0:
            raise OSError(errno.EIO, "copy_file_range made no progress")
        pos += n
