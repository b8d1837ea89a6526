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

- ``done`` (Bitmap): bit c set <=> the live source may be written over
  cluster c: its point-in-time content is saved somewhere (see "location"
  below) or no longer needed (a TRIM on the snapshot, rule 8).  Set once,
  never cleared while the state lives.  Once the content of c is saved,
  its bytes there never change again (nobody copies a done cluster).
- location of a done cluster (QEMU keeps the fleecing image and the backup
  target apart; we keep three places and a "nowhere"):
  - ``in_target`` (Bitmap): the point-in-time content is in the target;
  - ``in_scratch`` (Bitmap): it is in the scratch (``scratch``: a separate
    device, or the target itself for ``sync=none``, whose target IS the
    fleecing image);
  - ``zeroed`` (Bitmap): it reads as zeros and is stored nowhere ("zero in
    the snapshot", rule 7);
  - ``trimmed`` (Bitmap): a client TRIMmed the snapshot there (rule 8): it
    reads with EACCES; a trimmed cluster outside ``pump_todo`` is done and
    may be stored nowhere.
  ``in_scratch``, ``zeroed``, ``in_target`` are subsets of ``done``;
  ``in_scratch & zeroed == 0``.  Snapshot reads pick, per cluster: trimmed
  -> EACCES; zeroed -> zeros; in_scratch -> scratch; in_target -> target;
  not done -> source.
- ``pump_todo`` (Bitmap): clusters the target still has to receive (the sync
  set, set by the sync mode at start: full = all, top = allocated in the
  source's top layer, incremental/bitmap = the frozen dirty bitmap, none =
  empty).  Invariant: ``pump_todo & done`` is a subset of ``in_scratch |
  zeroed`` -- a done cluster still to do has its content in the scratch
  (copied there before the sync set was known) or is zeros, and the pump
  moves it from there (or zeroes the target); a cluster whose content is in
  the target leaves ``pump_todo``.
- ``ignored`` (Bitmap): clusters the ``ignore`` error policy dropped from
  ``pump_todo`` (`ignore`): the target may lack them even when the job
  succeeds -- unless ``in_target`` says a copy-before-write put them
  there afterwards -- so a dirty bitmap the job abdicates keeps them
  (`bitmaps.RegistryLease.end`).
- ``inflight`` (`Claims`: disjoint cluster runs -> Future; ``inflight.get(c)``
  is the future of the copy in progress for cluster c, ``c in inflight``
  whether there is one; a run per claim, so a claim costs the same whatever
  its length): the copy in progress for that cluster.  A second copier of the same cluster awaits the future instead of
  copying again.  The future resolves to None on success; on failure it holds
  the error and the cluster is again neither done nor in flight (rule 4), so
  the waiter may retry.
- ``readers`` (`Readers`: the cluster runs of the snapshot reads currently
  reading the SOURCE; ``c in readers`` when one covers cluster c).  A live
  write waits until no run covers its clusters.  ``scratch_readers``: the
  same for reads from the scratch; a discard of scratch clusters (rules 8,
  9) waits for them.

Rules:
1. copy-before-write (`protect`): before a live write to ``(offset, length)``
   every cluster of the range is made done (copied, or the in-flight copy
   awaited), then the writer waits until no snapshot read is reading the
   source of those clusters.  Every cluster is protected whatever
   ``pump_todo`` says: the snapshot must stay the point-in-time image.
   WHERE the copy goes: a cluster in ``pump_todo`` (in the sync set) to the
   target; any other to the scratch (when the job has no scratch -- sync
   full -- to the target).  So the target receives exactly the sync set.
2. snapshot read (`begin_read`/`end_read`): per cluster, if done read its
   location, else register as a reader synchronously (no await between the
   ``done`` test and the ``readers`` increment), read the source, unregister.
   Since rule 1 makes writers wait for readers after the cluster is done, a
   source read never sees a write that started after the snapshot.  A read
   with no await from the ``done`` test to its last byte (the snapshot's
   task-free path) needs no registration: no writer runs meanwhile.
3. pump (`claim` + `copy`): claims runs of todo clusters that are not in
   flight and all of one kind (not done: from the source; in the scratch:
   scratch -> target; zeroed: zero the target), synchronously marking them
   in flight.
   A claim may be extended (`extend_claim`) over the following claimable
   clusters; the pump does so over runs the source reports as zeros, which
   it then zeroes in the target in one request (``copy(source_zero=True)``).
   That is exact because of rule 1: a cluster that is not done has not been
   written since the backup started, so what the source says of it -- at
   any moment while it is not done -- is its point-in-time content.
4. a failed (or cancelled) copy leaves its clusters as they were (not done
   if they were not) and not in flight; waiters see the error.
5. cancelling anything leaves this state valid: resuming is just carrying on.
6. retiring (`retire`, when the job is dismissed: the snapshot is gone and
   the target about to close): no new copy is claimed from then on, so a
   live write that was already inside copy-before-write (it started before
   the hook was detached, and waits on another copy or a reader) goes on
   without copying; the copies already in flight are the last, and the
   dismiss waits for them before closing the target.
7. zero in the snapshot: copy-before-write holds its claim (the clusters
   are in flight, so no live write can reach them) and asks the source for
   its extents there; whole clusters the source reports as ZERO, and
   clusters whose read content is all zeros, are recorded ``zeroed`` and
   copied nowhere -- exact by rule 3's reasoning (not done => unchanged
   since the start).  A zeroed cluster still in ``pump_todo`` is zeroed in
   the target by the pump.
8. TRIM on the snapshot (`trim_snapshot`, QEMU's snapshot-access discard):
   the whole clusters of the range are marked ``trimmed`` once no copy of
   theirs is in flight.  Those outside ``pump_todo`` also become done (later
   live writes there copy nothing) and their scratch copies are discarded
   (punched, once no scratch read is using them).  Clusters still in
   ``pump_todo`` keep being protected and copied: the backup needs them;
   only the snapshot's access to them ends.
9. ``discard_source`` (QEMU's backup ``discard-source``, whose source is the
   fleecing snapshot): when the pump has moved a cluster from the scratch
   to the target, the scratch copy is discarded (the target's copy serves
   the snapshot from then on).
10. ``scratch_limit``: a copy into the scratch that would make
   ``scratch_bytes`` exceed it fails with ENOSPC (a copy-before-write error:
   the job's ``on-cbw-error`` policy applies).
11. zero target (``target_zero``, QEMU's ``has_zero_init``, what lets
   ``qemu-img convert`` skip holes): when the target read as zeros over
   ``[0, size)`` as the state was made (a file the engine just created, a
   regular file that is one hole, an empty memory disk), zeroing a target
   span (`_zero_target`: a source hole, a zeroed cluster, an all-zero
   cluster) writes nothing.  Exact because only copies write the target
   (the engine refuses a target another job uses), a copy writes only the
   clusters it claimed, and whatever it writes there -- even a copy that
   failed half-way -- is those clusters' point-in-time content: so a
   cluster's target bytes are zeros or that content, and zeroing a cluster
   whose content is zeros has nothing to change.

Progress: ``total`` = bytes of ``pump_todo`` when the job set it up;
``current`` = bytes among those that reached the target (by the pump or by
CBW) or were skipped by the ``ignore`` error policy (``bytes_ignored``).
Statistics: ``bytes_copied_by_pump``, ``bytes_copied_by_cbw`` (to the target
or the scratch), ``bytes_cbw_to_scratch``, ``clusters_skipped_zero``
(clusters found all-zero, or a source hole, written as target.zero),
``clusters_zero_in_snapshot`` (rule 7: recorded zero, copied nowhere),
``bytes_trimmed`` (rule 8: snapshot bytes released by TRIM),
``scratch_bytes`` (bytes of point-in-time content held in the scratch,
copies being written included), ``scratch_bytes_discarded`` (released by
rules 8 and 9).
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import os
from typing import Literal

from ..bitmap.core import Bitmap
from ..blockdev.base import BASE_ALLOCATION, BlockDev, Extent, FilterDev, merge_extents
from ..blockdev.file import FileDev
from ..blockdev.writeback import WholeFileWriteBehind
from ..nbd.wire import StateFlag

Copier = Literal["pump", "cbw"]

#: Offloaded copies up to this size run inline on the event loop (see `_copy_offload`).
INLINE_COPY = 1024 * 1024
#: Largest buffer of one copy into the scratch (a big TRIM is copied piecewise).
SCRATCH_PIECE = 4 * 1024 * 1024


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
    """The device whose bytes ``dev`` reads, at the same offsets: looks only
    through filters that keep bytes as they are (``same_bytes``: a `LiveDev`
    does, a restoring export's `restoredev.RestoreDev` does not -- its chunks
    not restored yet are in the repository, not in its target file).  Copy
    offload, SEEK_DATA probes and task-free source reads use the file found
    here, so looking through a RestoreDev copied the restore target's holes
    and stale bytes into a backup (hunt 4)."""
    while isinstance(dev, FilterDev) and dev.same_bytes:
        dev = dev.inner
    return dev


def reads_zero(dev: BlockDev, size: int) -> bool:
    """True when ``dev`` certainly reads as zeros over ``[0, size)`` now
    (rule 11), in O(1) or O(allocated pages): a plain regular file with no
    data before ``size`` (one SEEK_DATA; a file system without SEEK_DATA
    reports data everywhere: False), or a `MemoryDev` with no page there --
    seen through filters that keep bytes as they are (``same_bytes``), not
    through any other (it may transform what it stores)."""
    from ..blockdev.memory import PAGE, MemoryDev

    while isinstance(dev, FilterDev) and dev.same_bytes:
        dev = dev.inner
    if isinstance(dev, FileDev):
        if dev.is_block or dev.fd < 0:
            return False
        try:
            return os.lseek(dev.fd, 0, os.SEEK_DATA) >= size
        except OSError as e:
            return e.errno == errno.ENXIO  # no data at all
    if isinstance(dev, MemoryDev):
        last = (size + PAGE - 1) // PAGE
        return not any(i < last for i in dev.pages)
    return False


class Readers:
    """Snapshot reads in progress, as cluster runs, and waiters for them to end.

    Fields: ``_runs`` (``(first, end)`` -> number of reads in progress
    registered over exactly that run of clusters, > 0; a run's length costs
    nothing, so a 2 MiB read of 4 KiB clusters is one entry, not 512);
    ``_waiters`` (``(first, end, future)`` of each `wait` call, woken when
    a run overlapping ``[first, end)`` ends; the waiter then looks again).
    There are as many runs as reads in flight (tens), so the overlap tests
    scan them.
    """

    def __init__(self) -> None:
        self._runs: dict[tuple[int, int], int] = {}
        self._waiters: list[tuple[int, int, asyncio.Future]] = []

    def __bool__(self) -> bool:
        return bool(self._runs)

    def __contains__(self, c: int) -> bool:
        return self.overlaps(c, c + 1)

    def overlaps(self, first: int, end: int) -> bool:
        """Does a read in progress cover a cluster of ``[first, end)``?"""
        for a, b in self._runs:
            if a < end and first < b:
                return True
        return False

    @property
    def counts(self) -> dict[int, int]:
        """cluster -> reads in progress (> 0): a view for tests and debugging."""
        out: dict[int, int] = {}
        for (a, b), k in self._runs.items():
            for c in range(a, b):
                out[c] = out.get(c, 0) + k
        return out

    def add(self, first: int, end: int) -> None:
        key = (first, end)
        self._runs[key] = self._runs.get(key, 0) + 1

    def remove(self, first: int, end: int) -> None:
        key = (first, end)
        k = self._runs[key] - 1
        if k:
            self._runs[key] = k
            return
        del self._runs[key]
        if self._waiters:
            keep = []
            for w in self._waiters:
                a, b, fut = w
                if a < end and first < b:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    keep.append(w)
            self._waiters = keep

    async def wait(self, first: int, end: int) -> None:
        """Until no read of clusters ``[first, end)`` is in progress."""
        if not self._runs:
            return
        loop = asyncio.get_running_loop()
        while self.overlaps(first, end):
            fut = loop.create_future()
            self._waiters.append((first, end, fut))
            await fut


_ZERO = int(StateFlag.ZERO)


def _or_end(found: int, end: int) -> int:
    """A bitmap search's result (-1: none) as a position in ``[.., end]``."""
    return end if found < 0 else found


#: Claim kinds (rule 3): where a claimed cluster's content comes from.
FROM_SOURCE, FROM_SCRATCH, FROM_ZERO = "source", "scratch", "zero"
#: Segment locations of `CopyState.begin_read`.
Where = Literal["source", "target", "scratch", "zero", "trimmed"]


class CopyState:
    """Copy state for one backup; see the module docstring.

    Other fields: ``source`` (read for not-done clusters; the live export's
    device: reads pass through its hooks untouched), ``target``,
    ``scratch`` (where copy-before-write saves clusters outside the sync
    set: a device of its own, the target itself (sync=none), or None: no
    scratch, everything goes to the target (sync=full)), ``size``,
    ``cluster_size``, ``nclusters``, ``zero_detect`` (write all-zero clusters
    as target.zero(may_trim=True); record them zeroed instead of writing the
    scratch), ``offload`` (try ``os.copy_file_range``
    when both ends are plain files; turned off at the first failure),
    ``broken`` (an OSError once the snapshot is broken: CBW stops copying,
    snapshot reads fail with EIO); ``retired`` (rule 6: set once, at dismiss);
    ``discard_source`` (rule 9); ``scratch_limit`` (rule 10; None = none);
    ``cbw_extents`` (rule 7: ask the source's extents before a CBW copy;
    on when the source can answer them); ``target_zero`` (rule 11: the
    target read as zeros when the state was made: zeroing it is a no-op).
    """

    def __init__(self, source: BlockDev, target: BlockDev, cluster_size: int, *,
                 zero_detect: bool = True, offload: bool = True, scratch: BlockDev | None = None,
                 discard_source: bool = False, scratch_limit: int | None = None,
                 write_behind: int | None = None, target_zero: bool | None = None) -> None:
        """``target_zero``: True when the caller knows the target reads as
        zeros (it just created it), None to probe it (`reads_zero`; False
        when unknown), False to never assume it (rule 11)."""
        assert cluster_size >= 512 and cluster_size & (cluster_size - 1) == 0
        assert target.size >= source.size
        assert scratch is None or scratch.size >= source.size
        self.source = source
        self.target = target
        self.scratch = scratch
        self.size = source.size
        self.cluster_size = cluster_size
        self._shift = cluster_size.bit_length() - 1
        self.nclusters = (self.size + cluster_size - 1) >> self._shift
        n = self.nclusters
        self.done = Bitmap(n)
        self.in_target = Bitmap(n)
        self.in_scratch = Bitmap(n)
        self.zeroed = Bitmap(n)
        self.trimmed = Bitmap(n)
        self.pump_todo = Bitmap(n)
        self.ignored = Bitmap(n)
        self.inflight = Claims()
        self.readers = Readers()
        self.scratch_readers = Readers()
        self.zero_detect = zero_detect
        self.offload = offload and self._offload_files() is not None
        self.offload_scratch = offload and scratch is not None and self._offload_files(scratch) is not None
        self.discard_source = discard_source
        self.scratch_limit = scratch_limit
        self.cbw_extents = source.capabilities().can_extents
        #: The source's allocation answers may lag its writes (``Capabilities.sparse_reads``
        #: False: a remote NBD source): `source_extents` flushes it once before trusting them.
        self._source_exact = source.capabilities().sparse_reads
        #: That one FLUSH of the source (started by the first `source_extents`), or None.
        self._source_flushed: asyncio.Future | None = None
        self.target_zero = reads_zero(target, self.size) if target_zero is None else target_zero
        from ..blockdev.file import FileDev

        inner = _innermost(source)
        #: the source's plain file, for SEEK_DATA probes (rule 7), or None
        self._source_file = inner if isinstance(inner, FileDev) and not inner.is_block else None
        #: offset the last probe found data at (a hint for `_copy_offload`;
        #: -1 = none).  Only a hint: a stale one makes the offload copy a
        #: hole as data -- the same bytes.
        self._data_at = -1
        #: Write-behind on the target's and scratch's files (blockdev.writeback):
        #: every ``write_behind`` bytes the pump copied (default 64 MiB,
        #: NBDBACKUP_WRITE_BEHIND; 0: off), start their write-back and drop
        #: their clean pages, on a thread (pump-full 2-4x less CPU per GiB;
        #: copy-before-write's copies count only when
        #: ``cbw_write_behind`` says so, below).  `idle_write_behind` before
        #: closing them.
        if write_behind is None:
            write_behind = int(os.environ.get("NBDBACKUP_WRITE_BEHIND", str(64 << 20)))
        fds = [d.fd for d in (_innermost(target), _innermost(scratch) if scratch is not None else None)
               if isinstance(d, FileDev) and not d.read_only]
        self.write_behind = WholeFileWriteBehind(fds, write_behind)
        #: copy-before-write's copies of at least this many bytes count for
        #: the write-behind too; None (default): none do.  NBDBACKUP_CBW_WRITE_BEHIND:
        #: 0 = none (default), 1 = every copy, N > 1 = copies of N bytes or
        #: more (262144: a sequential write's).  Off by default: it keeps
        #: the copies in recycled pages, which wins only while this VM's
        #: fresh memory is cold (first sequential write 0.89 vs 0.66-2.67
        #: s/GiB), and costs the write-back inside the write's time when
        #: memory is warm (0.77 vs 0.65 s/GiB; 4 KiB writes 60 vs 46
        #: us/op when every copy counts), docs/cbwcpu.md.
        cwb = int(os.environ.get("NBDBACKUP_CBW_WRITE_BEHIND", "0"))
        self.cbw_write_behind: int | None = None if cwb <= 0 else (0 if cwb == 1 else cwb)
        #: `protect_sync`'s (target, scratch) file pairs of `_offload_files`, once known.
        self._sync_files: tuple | None = None
        self.broken: OSError | None = None
        self.retired = False
        self.total = 0
        self.current = 0
        self.bytes_copied_by_pump = 0
        self.bytes_copied_by_cbw = 0
        self.bytes_cbw_to_scratch = 0
        self.bytes_ignored = 0
        self.clusters_skipped_zero = 0
        self.clusters_zero_in_snapshot = 0
        self.bytes_trimmed = 0
        self.scratch_bytes = 0
        self.scratch_bytes_discarded = 0

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
        """Set ``pump_todo`` (None = nothing) minus clusters whose content is
        already in the target (or done and stored nowhere); sets ``total``."""
        if todo is None:
            self.pump_todo.clear_all()
        else:
            assert todo.nbits == self.nclusters
            self.pump_todo.copy_from(todo)
            # done & ~(in_scratch | zeroed): nothing left for the pump there.
            moved = self.done.copy()
            for bm in (self.in_scratch, self.zeroed):
                for start, count, value in bm.runs():
                    if value:
                        moved.clear(start, count)
            for start, count, value in moved.runs():
                if value:
                    self.pump_todo.clear(start, count)
        self.total = self._bytes_set(self.pump_todo)
        self.current = 0

    def _bytes_set(self, bm: Bitmap) -> int:
        n = bm.count() << self._shift
        if self.nclusters and bm.get(self.nclusters - 1):
            n -= (self.nclusters << self._shift) - self.size
        return n

    # -- claiming and copying (rules 1, 3, 4, 7) ------------------------------

    def kind(self, c: int) -> str | None:
        """Where a claim of cluster ``c`` copies from (rule 3): FROM_SOURCE
        (not done), FROM_SCRATCH / FROM_ZERO (done, still to do), or None
        (nothing to copy)."""
        if not self.done.get(c):
            return FROM_SOURCE
        if self.pump_todo.get(c):
            if self.in_scratch.get(c):
                return FROM_SCRATCH
            if self.zeroed.get(c):
                return FROM_ZERO
        return None

    def claim(self, first: int, end: int, max_clusters: int,
              todo_only: bool = False) -> tuple[int, int] | None:
        """Synchronously claim the first run of clusters in ``[first, end)``
        that are not in flight and not done (with ``todo_only``: in
        ``pump_todo`` and all of one `kind`), at most ``max_clusters`` long.
        Returns ``(start, count)`` or None.  The caller MUST then call `copy`
        on it.
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
            k = self.kind(c)
            if k is None:  # done and in the target: cannot be in pump_todo
                raise AssertionError(f"cluster {c} in pump_todo but already in the target")
            if k == FROM_SOURCE:
                e = self.done.next_set(c, stop)
            else:
                e = (self.in_scratch if k == FROM_SCRATCH else self.zeroed).next_clear(c, stop)
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
        """Synchronously extend the claim ``[start, start+count)`` (of not-done
        clusters) over the clusters that follow it, up to ``end``, while they
        are not done, not in flight (and in ``pump_todo`` when ``todo_only``);
        returns the new count.  The extended claim is one claim: one `copy`
        call covers it."""
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

        ``source_zero`` (not-done clusters only): the caller knows every
        cluster of the claim reads as zeros in the source (a hole or zero
        extent the source reported while they were not done: their source
        content is then still the point-in-time content, see rule 1), so the
        target's span is zeroed at once and nothing is read.

        On success they are done, at their location (rule 1), and out of
        ``pump_todo`` if they reached the target; on any failure,
        cancellation included, nothing changed but the claim is gone, and the
        future holds the error (rule 4).
        """
        fut = self.inflight[start]
        kind = self.kind(start)
        # Synchronous bit updates to apply on success: (bitmap, start, count).
        marks: list[tuple[Bitmap, int, int]] = []
        reserved = [0]  # scratch bytes reserved by this copy (rule 10)
        try:
            if kind == FROM_SCRATCH:
                await self._move_from_scratch(start, count)
                marks.append((self.in_target, start, count))
            elif kind == FROM_ZERO or source_zero:
                try:
                    await self._zero_target(*self.span(start, count))
                except OSError as e:
                    raise CopyError.wrap(e, "write") from e
                self.clusters_skipped_zero += count
                marks.append((self.in_target, start, count))
            elif by == "pump" or (self.scratch is None and not self.cbw_extents):
                await self._copy_bytes(*self.span(start, count))
                marks.append((self.in_target, start, count))
            else:
                await self._cbw_copy(start, count, marks, reserved)
        except BaseException as e:
            self.scratch_bytes -= reserved[0]
            self.inflight.remove(start, fut)
            if not fut.done():
                if isinstance(e, OSError):
                    fut.set_exception(e)
                else:
                    fut.set_exception(OSError(errno.ECANCELED, "copy cancelled"))
            if isinstance(e, OSError) and not isinstance(e, CopyError):
                raise CopyError.wrap(e, "read") from e
            raise
        # Success: apply the location marks, then done (synchronously).
        nbytes = self.span(start, count)[1]
        for bm, s, n in marks:
            if bm is not None:
                bm.set(s, n)
        to_target = 0
        todo = self.pump_todo
        for bm, s, n in marks:
            if bm is self.in_target and todo.any(s, n):
                to_target += self._bytes_in(todo, s, n)
                todo.clear(s, n)
        self.done.set(start, count)
        self.current += to_target
        if by == "pump":
            self.bytes_copied_by_pump += nbytes
        else:
            # Rule 7: source zeros (None marks) and read zeros recorded
            # ``zeroed`` cost no copy; counted apart.
            nocopy = [(s, n) for bm, s, n in marks if bm is None or bm is self.zeroed]
            self.clusters_zero_in_snapshot += sum(n for _, n in nocopy)
            self.bytes_copied_by_cbw += nbytes - sum(self.span(s, n)[1] for s, n in nocopy)
        self.inflight.remove(start, fut)
        fut.set_result(None)
        if by == "pump" or (self.cbw_write_behind is not None and nbytes >= self.cbw_write_behind):
            self.write_behind.add(nbytes)
        if kind == FROM_SCRATCH:
            # Rule 9 (and rule 8 for clusters trimmed while still to do).
            if self.discard_source:
                await self._discard_scratch(start, count)
            else:
                for s, n, v in list(self.trimmed.runs(start, start + count)):
                    if v:
                        await self._discard_scratch(s, n)

    async def _cbw_copy(self, start: int, count: int, marks: list, reserved: list[int]) -> None:
        """Copy-before-write of not-done clusters (rules 1 and 7): in-set
        clusters go to the target, the others to the scratch; whole clusters
        the source reports as zeros are read from nowhere: zeroed in the
        target (in-set) or recorded ``zeroed`` (others).  Appends the
        location marks to ``marks`` (a source-zero run as ``(None, s, n)``
        too, for the statistics); adds the scratch bytes reserved to
        ``reserved[0]`` (rule 10; the caller releases them on failure)."""
        end = start + count
        zero_runs: list[tuple[int, int]] = []
        if self.cbw_extents:
            try:
                zero_runs = await self._source_zero_runs(start, end)
            except OSError:
                zero_runs = []  # no knowledge: copy
        pos = start
        for zs, zn in zero_runs + [(end, 0)]:
            # [pos, zs): clusters to copy; then [zs, zs+zn): source zeros.
            for lo, hi, zero in ((pos, zs, False), (zs, zs + zn, True)):
                c = lo
                while c < hi:
                    to_target = self.scratch is None or self.pump_todo.get(c)
                    if self.scratch is None:
                        e = hi
                    else:
                        e = (self.pump_todo.next_clear if to_target else self.pump_todo.next_set)(c, hi)
                        e = hi if e < 0 else e
                    if zero:
                        if to_target:
                            try:
                                await self._zero_target(*self.span(c, e - c))
                            except OSError as err:
                                raise CopyError.wrap(err, "write") from err
                            marks.append((None, c, e - c))
                            marks.append((self.in_target, c, e - c))
                        else:
                            marks.append((self.zeroed, c, e - c))
                    elif to_target:
                        await self._copy_bytes(*self.span(c, e - c))
                        marks.append((self.in_target, c, e - c))
                    else:
                        await self._copy_to_scratch(c, e - c, marks, reserved)
                    c = e
            pos = zs + zn

    async def source_extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        """The source's extents, as trusted by rules 3 and 7 (a ZERO or hole
        there is not read) and by the snapshot's block status.

        A source whose allocation may lag its writes (``sparse_reads`` False:
        nbdkit 1.32's cache filter in writeback mode answers from the plugin
        underneath, so data written and not yet flushed is "hole, zero") is
        FLUSHed once, the first time, before it is asked.  That makes its
        answers exact for every cluster that is not done: such a cluster has
        not been written since the point in time (rule 1), and every write
        before it had completed when the FLUSH started (quiescing), so the
        FLUSH wrote it back.  Measured (doubts18 item 1): 16 MiB written
        through ``serve`` to such an nbdkit and not flushed, then a ``sync
        full`` backup: all 16 MiB skipped as zeros and wrong in the target
        without the FLUSH, none with it.  A FLUSH that fails raises OSError
        here (and again later): callers then copy without skipping, or fail."""
        if not self._source_exact:
            if self._source_flushed is None:
                # The device below the live export's hooks: nothing else needs this FLUSH.
                self._source_flushed = asyncio.ensure_future(_innermost(self.source).flush())
            await asyncio.shield(self._source_flushed)
        return await self.source.extents(offset, length, context)

    async def _source_zero_runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """Whole-cluster runs of ``[start, end)`` the source reports as ZERO.

        A plain-file source is probed as the copy offload does: a small range
        (up to `INLINE_COPY`) with one SEEK_DATA (SEEK_HOLE can be slow):
        only its leading hole counts, zero clusters after it are caught when
        their content is read; a larger one (a big TRIM) is walked whole."""
        off, length = self.span(start, end - start)
        stop = off + length
        runs: list[tuple[int, int]] = []
        pos = off
        shift = self._shift
        inner = self._source_file
        if inner is not None and length <= INLINE_COPY:
            try:
                data = os.lseek(inner.fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    return []
                data = stop
            last = end if data >= stop else data >> shift
            if data == off:
                self._data_at = off  # the copy offload need not probe again
            return [(start, last - start)] if last > start else []
        while pos < stop:
            if inner is not None:
                exts = inner.extents_sync(pos, stop - pos)
            else:
                exts = await self.source_extents(pos, min(stop - pos, 1 << 31), BASE_ALLOCATION)
            before = pos
            pos = self.add_zero_runs(runs, exts, pos, stop)
            if pos <= before:
                break
        return [(a, b - a) for a, b in runs]

    def add_zero_runs(self, runs: list[tuple[int, int]], exts: list[Extent], pos: int, stop: int) -> int:
        """Append to ``runs`` (cluster runs ``(first, end)``, the first merged
        with the last run when they touch) the whole clusters of ``[pos,
        stop)`` that ``exts`` (the source's extents from ``pos``) report as
        ZERO; the disk's last cluster, maybe short, counts whole when a zero
        extent reaches the disk's end.  Returns how far ``exts`` reached
        (at most ``stop``; ``pos`` when they say nothing)."""
        cs, shift = self.cluster_size, self._shift
        lo = pos
        for e in exts:
            e_end = min(e.offset + e.length, stop)
            if e.flags & _ZERO and e_end > e.offset:
                first = (max(e.offset, lo) + cs - 1) >> shift
                last = self.nclusters if e_end == self.size else e_end >> shift
                if last > first:
                    if runs and runs[-1][1] == first:
                        runs[-1] = (runs[-1][0], last)
                    else:
                        runs.append((first, last))
            pos = max(pos, e_end)
        return pos

    async def _copy_to_scratch(self, start: int, count: int, marks: list, reserved: list[int]) -> None:
        """Read clusters from the source; all-zero ones are recorded zeroed,
        the others written to the scratch (rule 10 checked first, the bytes
        reserved in ``scratch_bytes`` and added to ``reserved[0]``), in
        pieces of at most `SCRATCH_PIECE` bytes (one buffer each)."""
        step = max(1, SCRATCH_PIECE >> self._shift)
        for s in range(start, start + count, step):
            await self._copy_piece_to_scratch(s, min(step, start + count - s), marks, reserved)

    async def _copy_piece_to_scratch(self, start: int, count: int, marks: list, reserved: list[int]) -> None:
        assert self.scratch is not None
        off, length = self.span(start, count)
        if self.offload_scratch:
            # Plain files at both ends (fleecing into a file target, a scratch
            # file): copy_file_range, as for the target.  Every cluster of the
            # span counts as held (zeros inside are not looked for).
            files = self._offload_files(self.scratch)
            if files is not None:
                self._reserve_scratch(length, reserved)
                try:
                    await self._copy_offload(files[0], files[1], off, length, zero=self._zero_scratch)
                except OSError:
                    self.offload_scratch = False  # read/write from now on
                    self.scratch_bytes -= length
                    reserved[0] -= length
                else:
                    marks.append((self.in_scratch, start, count))
                    self.bytes_cbw_to_scratch += length
                    return
        buf = bytearray(length)
        mv = memoryview(buf)
        try:
            await self.source.pread(mv, off)
        except OSError as e:
            raise CopyError.wrap(e, "read") from e
        cs = self.cluster_size
        pieces: list[tuple[int, int]] = []  # (pos, end) within buf, non-zero
        pos = 0
        while pos < length:
            zero = self.zero_detect and is_zero(mv[pos:pos + cs])
            e = min(pos + cs, length)
            while e < length and (self.zero_detect and is_zero(mv[e:e + cs])) == zero:
                e = min(e + cs, length)
            c0, c1 = start + pos // cs, start + (e + cs - 1) // cs
            if zero:
                marks.append((self.zeroed, c0, c1 - c0))
            else:
                pieces.append((pos, e))
                marks.append((self.in_scratch, c0, c1 - c0))
            pos = e
        need = sum(e - p for p, e in pieces)
        self._reserve_scratch(need, reserved)
        try:
            for p, e in pieces:
                await self.scratch.pwrite(mv[p:e], off + p)
        except OSError as e:
            raise CopyError.wrap(e, "write") from e
        self.bytes_cbw_to_scratch += need

    def _reserve_scratch(self, need: int, reserved: list[int]) -> None:
        """Rule 10: count ``need`` more bytes in the scratch, or fail with ENOSPC."""
        if self.scratch_limit is not None and self.scratch_bytes + need > self.scratch_limit:
            raise CopyError(errno.ENOSPC, f"scratch-limit {self.scratch_limit} bytes would be exceeded "
                            f"({self.scratch_bytes} held, {need} more needed)", "write")
        self.scratch_bytes += need
        reserved[0] += need

    async def _zero_scratch(self, offset: int, length: int) -> None:
        assert self.scratch is not None
        try:
            await self.scratch.zero(offset, length, may_trim=True)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            await self.scratch.pwrite(bytes(length), offset)

    async def _move_from_scratch(self, start: int, count: int) -> None:
        """The pump's copy of in-set clusters held in the scratch (rule 3)."""
        assert self.scratch is not None
        first, end = start, start + count
        off, length = self.span(start, count)
        buf = bytearray(length)
        self.scratch_readers.add(first, end)
        try:
            await self.scratch.pread(memoryview(buf), off)
        except OSError as e:
            raise CopyError.wrap(e, "read") from e
        finally:
            self.scratch_readers.remove(first, end)
        await self._write_target(memoryview(buf), off)

    async def _discard_scratch(self, start: int, count: int) -> None:
        """Rules 8 and 9: drop the scratch copies of clusters ``[start,
        start+count)`` (clear ``in_scratch`` now, punch once no scratch read
        uses them).  Best effort: a scratch that cannot punch keeps the bytes."""
        runs = [(s, n) for s, n, v in self.in_scratch.runs(start, start + count) if v]
        if not runs:
            return
        for s, n in runs:
            self.in_scratch.clear(s, n)
            nb = self.span(s, n)[1]
            self.scratch_bytes -= nb
            self.scratch_bytes_discarded += nb
        assert self.scratch is not None
        for s, n in runs:
            await self.scratch_readers.wait(s, s + n)
            try:
                await self.scratch.trim(*self.span(s, n))
            except OSError:
                pass  # advisory, like TRIM itself

    def _landed_in_target(self, todo: Bitmap, start: int, count: int) -> None:
        """Clusters ``[start, start + count)`` hold their snapshot bytes in the
        target now (copied, or rule 11's zeros): mark them, and take them off
        the pump's ``todo`` with their bytes counted as progress."""
        self.in_target.set(start, count)
        if todo.any(start, count):
            self.current += self._bytes_in(todo, start, count)
            todo.clear(start, count)

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
        self.ignored.set(start, count)
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
        if self.readers:
            await self.readers.wait(*self.clusters_of(offset, length))

    def retire(self) -> None:
        """Rule 6: claim nothing more (the snapshot is gone)."""
        self.retired = True

    async def idle_write_behind(self) -> None:
        """No write-behind round from now on; the one running is over when
        this returns (the target and scratch may then be closed)."""
        await self.write_behind.idle()

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
        return not (readers and readers.overlaps(first, end))

    def protect_sync(self, offset: int, length: int) -> bool:
        """Rule 1 done synchronously when that is cheap: True when the live
        write to ``(offset, length)`` may go on now, its not-done clusters
        copied here without an ``await`` -- so no claim is needed: nobody
        can see them between "not done" and "done".  False (nothing done,
        or only some runs): await `protect`, which copies the rest, waits
        for copies in flight and readers and applies the error policy.

        Only the common copy-before-write takes this path: a span of at
        most `INLINE_COPY` bytes (what `_copy_offload` already copies inline
        on the loop), none of it in flight or read by a snapshot read, from
        a plain source file into plain files with ``copy_file_range``
        (offload on), the scratch reservation within ``scratch_limit``.  It
        marks exactly what `copy` + `_cbw_copy` would: source holes found by
        the same one SEEK_DATA probe (rule 7) are ``zeroed`` when bound for
        the scratch, ``in_target`` with nothing written when bound for a
        target that reads as zeros (rule 11; any other target falls back:
        it needs a target write), the rest ``in_scratch`` / ``in_target``, per run,
        each run only after its copy succeeded (rule 4: a failed run stays
        not done; the destination bytes of a not-done cluster are never
        read).  Never raises OSError."""
        if self.retired:
            return True
        first, end = self.clusters_of(offset, length)
        done = self.done
        c = done.next_clear(first, end)
        if c < 0:
            return not self.readers or self.protect_now(offset, length)
        src = self._source_file
        span_off, span_len = self.span(c, end - c)
        if src is None or span_len > INLINE_COPY:
            return False
        inflight = self.inflight
        if inflight and (c in inflight or inflight.next_start(c + 1, end) < end):
            return False
        readers = self.readers
        if readers and readers.overlaps(first, end):
            return False
        scratch = self.scratch
        todo = self.pump_todo
        if self._sync_files is None:
            self._sync_files = (self._offload_files(), self._offload_files(scratch) if scratch is not None else None)
        files_t = self._sync_files[0] if self.offload else None
        files_s = self._sync_files[1] if self.offload_scratch else None
        # Rule 7's probe: one SEEK_DATA at the first not-done cluster.
        zero_end = c
        if self.cbw_extents:
            try:
                data = os.lseek(src.fd, span_off, os.SEEK_DATA)
            except OSError as e:
                data = span_off + span_len if e.errno == errno.ENXIO else span_off
            if data > span_off:
                zero_end = min(end, data >> self._shift) if data < span_off + span_len else end
        try:
            while c >= 0 and c < end:
                e = done.next_set(c, end)
                e = end if e < 0 else e
                # [c, e): not done; cut where the destination or zero-ness changes.
                to_target = scratch is None or todo.get(c)
                if scratch is not None:
                    t = (todo.next_clear if to_target else todo.next_set)(c, e)
                    e = e if t < 0 else t
                zero = c < zero_end
                if zero:
                    e = min(e, zero_end)
                off, n = self.span(c, e - c)
                if zero:
                    if to_target:
                        if not self.target_zero:
                            return False  # needs a target write: the async path
                        # Rule 11: the target reads zeros there already.
                        self._landed_in_target(todo, c, e - c)
                    else:
                        self.zeroed.set(c, e - c)
                    self.clusters_zero_in_snapshot += e - c
                else:
                    files = files_t if to_target else files_s
                    if files is None:
                        return False
                    if not to_target:
                        if self.scratch_limit is not None and self.scratch_bytes + n > self.scratch_limit:
                            return False  # rule 10's ENOSPC comes from the async path
                    _copy_range(files[0].fd, files[1].fd, off, n)
                    if to_target:
                        self._landed_in_target(todo, c, e - c)
                    else:
                        self.in_scratch.set(c, e - c)
                        self.scratch_bytes += n
                        self.bytes_cbw_to_scratch += n
                    self.bytes_copied_by_cbw += n
                    if self.cbw_write_behind is not None and n >= self.cbw_write_behind:
                        self.write_behind.add(n)
                done.set(c, e - c)
                c = done.next_clear(e, end) if e < end else -1
        except OSError:
            return False  # this run stays not done; the async path retries and reports
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

    # -- TRIM on the snapshot (rule 8) ------------------------------------------

    def whole_clusters(self, offset: int, length: int) -> tuple[int, int]:
        """``(first, end)``: the clusters lying wholly inside ``(offset,
        length)`` (the disk's short last cluster counts when the range
        reaches the end); ``end <= first`` when there is none."""
        cs = self.cluster_size
        first = (offset + cs - 1) >> self._shift
        stop = offset + length
        end = self.nclusters if stop >= self.size else stop >> self._shift
        return first, end

    async def trim_snapshot(self, offset: int, length: int) -> None:
        """Rule 8: the snapshot's ``(offset, length)`` is no longer needed."""
        first, end = self.whole_clusters(offset, length)
        if end <= first or self.retired:
            return
        # Copies in flight there finish first (their content lands, then goes).
        while True:
            fut = self.inflight.get(first)
            if fut is None:
                c = self.inflight.next_start(first, end)
                fut = self.inflight.get(c) if c < end else None
            if fut is None:
                break
            try:
                await asyncio.shield(fut)
            except OSError:
                pass
        # Synchronously: mark trimmed; clusters the backup does not need
        # become done (stored nowhere) and lose their scratch copies.
        newly = 0
        for s, n, v in self.trimmed.runs(first, end):
            if not v:
                newly += self.span(s, n)[1]
        self.trimmed.set(first, end - first)
        self.bytes_trimmed += newly
        free: list[tuple[int, int]] = []
        for s, n, todo in self.pump_todo.runs(first, end):
            if todo:
                continue
            self.done.set(s, n)
            free.append((s, n))
        if self.scratch is not None:
            for s, n in free:
                await self._discard_scratch(s, n)

    # -- snapshot reads (rule 2) -----------------------------------------

    def where(self, c: int) -> Where:
        """Where the snapshot reads cluster ``c`` from (module docstring)."""
        if self.trimmed.get(c):
            return "trimmed"
        if not self.done.get(c):
            return "source"
        if self.zeroed.get(c):
            return "zero"
        if self.in_scratch.get(c):
            return "scratch"
        if self.in_target.get(c):
            return "target"
        return "trimmed"  # done and stored nowhere: only a trim does that

    def reads_source(self, offset: int, length: int) -> bool:
        """True when the snapshot reads every byte of ``(offset, length)``
        from the source now: no cluster of it is done or trimmed (`where`
        says "source" for each) -- a snapshot nothing has written over yet,
        the snapshot export's common case.  Two bitmap searches, nothing
        registered: `segments` would return the one segment ``(offset,
        length, "source")``."""
        first, end = self.clusters_of(offset, length)
        return self.done.next_set(first, end) < 0 and self.trimmed.next_set(first, end) < 0

    def segments(self, offset: int, length: int, *,
                 allow_trimmed: bool = False) -> list[tuple[int, int, Where]]:
        """``(offset, length)`` split into maximal segments ``(offset, length,
        where)`` (`where`), registering nothing: for a caller that uses them
        with no await in between (`begin_read` registers).  A trimmed
        cluster raises EACCES unless ``allow_trimmed``.

        A run of clusters the snapshot reads from the source (not done, not
        trimmed: every cluster of a backup nothing has written to yet) is found
        with two bitmap searches, not cluster by cluster (a block status of a
        whole 1 GiB snapshot export was ~16k calls of `where`, 5-15 ms);
        other runs are walked per cluster: the segments are exactly those of a
        walk of every cluster."""
        first, end = self.clusters_of(offset, length)
        stop = offset + length
        segs: list[tuple[int, int, Where]] = []
        c = first
        while c < end:
            w = self.where(c)
            e = self._where_end(c, end, w)
            if w == "trimmed" and not allow_trimmed:
                raise OSError(errno.EACCES, "this part of the snapshot was discarded (TRIM)")
            lo, ln = self.span(c, e - c)
            lo2, hi2 = max(lo, offset), min(lo + ln, stop)
            segs.append((lo2, hi2 - lo2, w))
            c = e
        return segs

    def _where_end(self, c: int, end: int, w: Where) -> int:
        """The first cluster of ``(c, end]`` where `where` no longer says
        ``w`` (given ``where(c) == w``), by bitmap searches: a run of 512
        copied 4 KiB clusters costs a few searches, not 512 calls of `where`.
        Each kind ends at the first change of one of the bitmaps `where`
        tests before reaching it."""
        def first_set(bm: Bitmap) -> int:
            return _or_end(bm.next_set(c, end), end)

        def first_clear(bm: Bitmap) -> int:
            return _or_end(bm.next_clear(c, end), end)

        if w == "source":  # not trimmed, not done
            return min(first_set(self.trimmed), first_set(self.done))
        if w == "trimmed":  # trimmed, or done and stored nowhere: rare, walked
            e = c + 1
            while e < end and self.where(e) == w:
                e += 1
            return e
        # not trimmed, done, then: zeroed; not zeroed and in_scratch; neither and in_target
        e = min(first_set(self.trimmed), first_clear(self.done))
        if w == "zero":
            return min(e, first_clear(self.zeroed))
        e = min(e, first_set(self.zeroed))
        if w == "scratch":
            return min(e, first_clear(self.in_scratch))
        return min(e, first_set(self.in_scratch), first_clear(self.in_target))

    def begin_read(self, offset: int, length: int, *,
                   allow_trimmed: bool = False) -> list[tuple[int, int, Where]]:
        """Synchronously split ``(offset, length)`` into segments ``(offset,
        length, where)`` (`segments`) and register as a reader of every cluster
        read from the source or the scratch.  A trimmed cluster raises EACCES
        (nothing registered) unless ``allow_trimmed`` (block status).  The
        caller MUST call `end_read` with the result.
        """
        segs = self.segments(offset, length, allow_trimmed=allow_trimmed)
        for off, ln, w in segs:
            if w == "source":
                self.readers.add(*self.clusters_of(off, ln))
            elif w == "scratch":
                self.scratch_readers.add(*self.clusters_of(off, ln))
        return segs

    def end_read(self, segs: list[tuple[int, int, Where]]) -> None:
        for off, ln, w in segs:
            if w == "source":
                self.readers.remove(*self.clusters_of(off, ln))
            elif w == "scratch":
                self.scratch_readers.remove(*self.clusters_of(off, ln))

    def device(self, where: Where) -> BlockDev | None:
        """The device holding segments of kind ``where`` (None: zero/trimmed)."""
        if where == "source":
            return self.source
        if where == "target":
            return self.target
        if where == "scratch":
            return self.scratch
        return None

    # -- the copy itself ----------------------------------------------------

    def _offload_files(self, dst: BlockDev | None = None):
        """(source, destination) `FileDev`s when both are plain files (the
        destination: ``dst``, default the target), else None."""
        from ..blockdev.file import FileDev

        s, t = _innermost(self.source), _innermost(self.target if dst is None else dst)
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
        await self._write_target(mv, offset)

    async def _write_target(self, mv: memoryview, offset: int) -> None:
        """Write ``mv`` to the target at ``offset``, all-zero clusters as
        target.zero (with ``zero_detect``)."""
        length = len(mv)
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
        if self.target_zero:
            return  # rule 11: those bytes read as zeros already
        try:
            await self.target.zero(offset, length, may_trim=True)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            await self.target.pwrite(bytes(length), offset)

    async def _copy_offload(self, src, dst, offset: int, length: int, zero=None) -> None:
        """copy_file_range for data extents, target.zero for source holes.

        Copies up to `INLINE_COPY` bytes (copy-before-write's usual size) run
        inline: a thread hand-off cost more than the page-cache copy itself.
        They probe holes with one SEEK_DATA only (SEEK_HOLE can be slow: tmpfs
        scans the cached file), so a range that is all hole stays a hole in
        the target; a partly-hole range is copied whole (same content).
        Larger copies (the pump's chunks) skip every hole and run in a worker
        thread.  ``zero(offset, length)`` zeroes the destination's holes
        (default: `_zero_target`).
        """
        zero = self._zero_target if zero is None else zero
        if length <= INLINE_COPY:
            if self._data_at == offset:  # the zero probe just found data here
                data = offset
            else:
                try:
                    data = os.lseek(src.fd, offset, os.SEEK_DATA)
                except OSError as e:
                    data = offset + length if e.errno == errno.ENXIO else offset
            self._data_at = -1
            if data >= offset + length:
                await zero(offset, length)
                self.clusters_skipped_zero += (length + self.cluster_size - 1) // self.cluster_size
                return
            _copy_range(src.fd, dst.fd, offset, length)
            return
        loop = asyncio.get_running_loop()
        exts: list[Extent] = merge_extents(src.extents_sync(offset, length))
        for e in exts:
            if e.flags & 2:  # ZERO: a hole in the source
                await zero(e.offset, e.length)
                self.clusters_skipped_zero += e.length // self.cluster_size
                continue
            # The thread reads the LIVE source: a cancelled copy must not
            # release its claim (rule 4) before the thread is done, or a
            # later copy-before-write saves a cluster the thread then
            # overwrites with what a live write put there (docs/hunt3.md).
            await _await_thread(loop.run_in_executor(None, _copy_range, src.fd, dst.fd, e.offset, e.length))


async def _await_thread(fut: asyncio.Future) -> None:
    """Await a thread's future; when cancelled, still wait until the thread
    has finished (it cannot be stopped), then raise the cancellation."""
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            try:
                await asyncio.wait([fut])
            except asyncio.CancelledError:
                pass
        if not fut.cancelled():
            fut.exception()  # retrieved: the cancellation is what we report
        raise


def _copy_range(sfd: int, dfd: int, offset: int, length: int) -> None:
    pos, end = offset, offset + length
    while pos < end:
        n = os.copy_file_range(sfd, dfd, end - pos, pos, pos)
        if n <= 0:
            raise OSError(errno.EIO, "copy_file_range made no progress")
        pos += n
