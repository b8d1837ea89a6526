"""Dirty bitmaps: a byte-range view over a `Bitmap`, the successor protocol, a per-export registry.

Role: a `DirtyBitmap` records which granules of a disk were written (the idea
of QEMU's BdrvDirtyBitmap): bit i covers bytes ``[i*granularity,
(i+1)*granularity)`` clipped to ``size``.  The live export calls `mark` for
every write/zero/trim BEFORE issuing it to the disk (the order persistence
relies on, see `store`).  It answers the ``qemu:dirty-bitmap:NAME`` meta
context (`extents`, flag 1 = dirty) and feeds incremental backups.

Successor protocol (what a backup job does with its bitmap, as in QEMU)::

    freeze(mode)  the bitmap becomes busy and stops recording; a new anonymous
                  successor (same granularity, recording iff the parent was)
                  takes new writes; `mark` on the parent forwards to it.
    abdicate()    job succeeded and the bitmap is to be synced: the parent's
                  bits become exactly the successor's; unfreeze.
    reclaim()     job failed / bitmap-mode=never: parent |= successor; unfreeze.
    copied(o, l)  the job has copied ``(o, l)``; with mode ``always`` the
                  granules entirely inside it are remembered, and a failed
                  `finish` forgets those not written since the freeze (no-op
                  for other modes).

`finish(success)` applies QEMU's bitmap-mode table (mode given to `freeze`):

    ==========  ==================  ============================================
    mode        job succeeded       job failed / cancelled
    ==========  ==================  ============================================
    on-success  abdicate            reclaim
    never       reclaim             reclaim
    always      abdicate            successor | granules not reported `copied`
    ==========  ==================  ============================================

Invariant while frozen (the crash record): the parent's own bits are the
union of its bits at freeze time and every granule marked since (a frozen
parent's `mark` sets both the successor and the parent).  So if the process
dies mid-job, what survives in the parent's storage (memory-mapped for
persistent bitmaps) is exactly what `reclaim` would have produced: never
less than the truth (copies reported with `copied` are forgotten only when
the job ends).  Consequence for readers: take the job's copy
manifest (`dirty_ranges`, `to_clusters`) right after `freeze`, before any
``await``; later, the parent's bits also contain post-freeze writes.
`count`/`dirty_count` of a frozen parent include them too.

Fields of `DirtyBitmap` (shared state; single-threaded, asyncio loop only):
- ``name``: str, unique within its registry ("" for an anonymous successor);
- ``size``: disk size in bytes; ``granularity``: bytes per bit, a power of two
  in [`MIN_GRANULARITY`, `MAX_GRANULARITY`];
- ``bits``: the `Bitmap` (``ceil(size/granularity)`` bits); for a persistent
  bitmap it lives in the store's memory map and the store may replace it
  (after an atomic metadata rewrite), so hold the DirtyBitmap, never ``bits``;
- ``recording``: new writes set bits (QEMU: enabled and not frozen);
- ``busy``: frozen by a job (``successor`` is not None);
- ``persistent``: kept by the store across restarts;
- ``inconsistent``: loaded from a file that may miss writes; such a bitmap
  records nothing, answers nothing, and can only be removed;
- ``successor``: the anonymous bitmap recording during a freeze, or None;
- ``sync_mode``: the bitmap-mode given to `freeze` (None when not frozen);
- ``backing``: the store's handle (``before_set()`` is called before any bit
  is set), or None;
- ``store_path``: the file of a persistent bitmap (set by the store), or None;
- ``inconsistent_reason``: why the store loaded it as inconsistent, or None.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol

from ..blockdev.base import Extent
from ..errors import NBDBackupError
from .core import Bitmap

__all__ = [
    "BitmapError",
    "DirtyBitmap",
    "BitmapRegistry",
    "DEFAULT_GRANULARITY",
    "MIN_GRANULARITY",
    "MAX_GRANULARITY",
    "MAX_NAME_BYTES",
    "DIRTY",
    "check_name",
    "check_granularity",
]

MIN_GRANULARITY = 512
MAX_GRANULARITY = 64 * 1024 * 1024
DEFAULT_GRANULARITY = 64 * 1024
#: Longest bitmap name in UTF-8 bytes (QEMU's limit for persistent bitmaps).
MAX_NAME_BYTES = 1023
#: Extent flag of the ``qemu:dirty-bitmap:NAME`` context.
DIRTY = 1

BITMAP_MODES = ("on-success", "never", "always")


class BitmapError(NBDBackupError):
    """A bitmap operation was refused (unknown name, busy, inconsistent, bad argument).

    ``str(e)`` is meant for the user (QEMU's wording where there is one).
    """


class Backing(Protocol):
    """What a `DirtyBitmap` needs from the store that persists it."""

    def before_set(self) -> None:
        """Called before any bit is set (the store records "unsynced marks")."""


def check_name(name: object) -> str:
    """Validate a bitmap name (non-empty str, <= 1023 UTF-8 bytes)."""
    if not isinstance(name, str) or not name:
        raise BitmapError("Bitmap name cannot be empty")
    try:
        n = len(name.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise BitmapError("Bitmap name is not valid UTF-8") from e
    if n > MAX_NAME_BYTES:
        raise BitmapError(f"Bitmap name is too long ({n} > {MAX_NAME_BYTES} bytes)")
    return name


def check_granularity(granularity: object) -> int:
    """Validate a granularity: a power of two in [512, 64 MiB]."""
    if (
        not isinstance(granularity, int)
        or isinstance(granularity, bool)
        or not MIN_GRANULARITY <= granularity <= MAX_GRANULARITY
        or granularity & (granularity - 1)
    ):
        raise BitmapError(
            f"Granularity must be power of 2 between {MIN_GRANULARITY} and {MAX_GRANULARITY}"
        )
    return granularity


class DirtyBitmap:
    """Granule-level dirty tracking of a ``size``-byte disk; see the module docstring."""

    def __init__(
        self,
        name: str,
        size: int,
        granularity: int = DEFAULT_GRANULARITY,
        *,
        recording: bool = True,
        persistent: bool = False,
        inconsistent: bool = False,
        bits: Bitmap | None = None,
    ) -> None:
        if name:
            check_name(name)
        check_granularity(granularity)
        if not isinstance(size, int) or size < 0:
            raise BitmapError(f"bad disk size {size!r}")
        self.name = name
        self.size = size
        self.granularity = granularity
        self._shift = granularity.bit_length() - 1
        nbits = (size + granularity - 1) >> self._shift
        if bits is None:
            bits = Bitmap(nbits)
        elif bits.nbits != nbits:
            raise BitmapError(f"bitmap of {bits.nbits} bits for {nbits} granules")
        self.bits = bits
        self._recording = recording and not inconsistent
        self.persistent = persistent
        self.inconsistent = inconsistent
        self.successor: DirtyBitmap | None = None
        self.sync_mode: str | None = None
        #: Granules a job in mode ``always`` reported copied (applied at finish).
        self._copied: Bitmap | None = None
        self.backing: Backing | None = None
        self.store_path: str | None = None
        self.inconsistent_reason: str | None = None

    def __repr__(self) -> str:
        flags = [
            f for f, on in (("recording", self.recording), ("busy", self.busy),
                            ("persistent", self.persistent), ("inconsistent", self.inconsistent))
            if on
        ]
        return f"<DirtyBitmap {self.name!r} g={self.granularity} {'|'.join(flags)}>"

    # --- state --------------------------------------------------------------

    @property
    def recording(self) -> bool:
        """New writes set bits in this bitmap (False while frozen: the successor records)."""
        return self._recording and self.successor is None

    @recording.setter
    def recording(self, value: bool) -> None:
        self._require_usable()
        self._recording = bool(value)

    @property
    def busy(self) -> bool:
        """Frozen by a job."""
        return self.successor is not None

    @property
    def nbits(self) -> int:
        return self.bits.nbits

    def _require_usable(self) -> None:
        if self.inconsistent:
            raise BitmapError(
                f"Bitmap '{self.name}' is inconsistent and cannot be used; it can only be removed"
            )
        if self.busy:
            raise BitmapError(
                f"Bitmap '{self.name}' is currently in use by another operation and cannot be used"
            )

    def info(self) -> dict:
        """The BitmapInfo shape of query-bitmaps (control/schema.py)."""
        return {
            "name": self.name,
            "granularity": self.granularity,
            "count": self.dirty_count(),
            "recording": self.recording,
            "persistent": self.persistent,
            "busy": self.busy,
            "inconsistent": self.inconsistent,
        }

    # --- byte <-> granule ---------------------------------------------------

    def _check_bytes(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"byte range ({offset}, {length}) outside disk of {self.size} bytes")

    def _outward(self, offset: int, length: int) -> tuple[int, int]:
        """Granules touching ``(offset, length)``: (first, count)."""
        first = offset >> self._shift
        return first, ((offset + length + self.granularity - 1) >> self._shift) - first

    def _inward(self, offset: int, length: int) -> tuple[int, int]:
        """Granules entirely inside ``(offset, length)`` (the last, partial
        granule of the disk counts as inside when the range reaches ``size``)."""
        first = (offset + self.granularity - 1) >> self._shift
        end = offset + length
        last = self.nbits if end >= self.size else end >> self._shift
        return first, max(0, last - first)

    def _set_bits(self, first: int, count: int) -> None:
        if count:
            if self.backing is not None:
                self.backing.before_set()
            self.bits.set(first, count)

    def shared_map(self) -> tuple[int, int, int, int] | None:
        """(fd, byte offset, nbits, granule shift) of the file the bits live
        in (MAP_SHARED; `blockdev.live` "Delegable hooks"), or None for a
        memory bitmap."""
        f = getattr(self.backing, "shared_map", None)
        if f is None:
            return None
        fd, offset = f()
        return fd, offset, self.nbits, self._shift

    # --- recording ----------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Record a write of ``(offset, length)`` (rounded outward to granules).

        No-op when not recording; on a frozen bitmap, forwards to the
        successor and keeps the crash-record union (module docstring).
        Call it BEFORE the write is issued to the disk.
        """
        if length <= 0:
            return
        self._check_bytes(offset, length)
        succ = self.successor
        if succ is not None:
            if succ._recording:
                first, count = self._outward(offset, length)
                succ._set_bits(first, count)
                self._set_bits(first, count)
            return
        if self._recording:
            self._set_bits(*self._outward(offset, length))

    def clear(self, offset: int = 0, length: int | None = None) -> None:
        """Forget ``(offset, length)`` (default: all); only granules entirely inside are cleared."""
        self._require_usable()
        if length is None:
            length = self.size - offset
        self._check_bytes(offset, length)
        if offset == 0 and length == self.size:
            self.bits.clear_all()
        else:
            first, count = self._inward(offset, length)
            self.bits.clear(first, count)

    def merge(self, other: "DirtyBitmap") -> None:
        """``self |= other`` (same disk size; any granularity: converted outward)."""
        self._require_usable()
        if other.inconsistent:
            raise BitmapError(f"Bitmap '{other.name}' is inconsistent and cannot be used")
        if other.size != self.size:
            raise BitmapError("Bitmaps are of different sizes")
        if other.granularity == self.granularity:
            if other.bits.any():
                if self.backing is not None:
                    self.backing.before_set()
                self.bits.merge(other.bits)
            return
        for off, length in other.dirty_ranges():
            self._set_bits(*self._outward(off, length))

    def merge_ranges(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Mark every byte range of ``ranges`` dirty (regardless of recording)."""
        for off, length in ranges:
            if length > 0:
                self._check_bytes(off, length)
                self._set_bits(*self._outward(off, length))

    # --- queries ------------------------------------------------------------

    def get(self, offset: int) -> bool:
        """Is the granule holding byte ``offset`` dirty?"""
        return self.bits.get(offset >> self._shift)

    def dirty_count(self) -> int:
        """Dirty bytes: set granules * granularity, the last granule clipped to ``size``."""
        n = self.bits.count() << self._shift
        if self.nbits and self.bits.get(self.nbits - 1):
            n -= (self.nbits << self._shift) - self.size
        return n

    def _granule_runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """Byte runs ``(offset, length, dirty)`` exactly covering ``(offset, length)``."""
        self._check_bytes(offset, length)
        if length == 0:
            return
        end = offset + length
        first, count = self._outward(offset, length)
        for g, n, value in self.bits.runs(first, first + count):
            lo = max(g << self._shift, offset)
            hi = min((g + n) << self._shift, end)
            yield lo, hi - lo, value

    def extents(self, offset: int, length: int, *, max_extents: int | None = None) -> list[Extent]:
        """``qemu:dirty-bitmap`` extents of ``(offset, length)``: flags 1 = dirty, 0 = clean.

        Contiguous from ``offset``; covers the whole range unless ``max_extents``
        stops it early (the `BlockDev.extents` contract allows a short answer).
        """
        self._require_consistent()
        out: list[Extent] = []
        for lo, n, value in self._granule_runs(offset, length):
            out.append(Extent(lo, n, DIRTY if value else 0))
            if max_extents is not None and len(out) >= max_extents:
                break
        return out

    def next_dirty(self, offset: int) -> int:
        """Smallest dirty byte offset >= ``offset``, or -1."""
        if offset >= self.size:
            return -1
        g = self.bits.next_set(offset >> self._shift)
        return -1 if g < 0 else max(offset, g << self._shift)

    def dirty_ranges(self, offset: int = 0, length: int | None = None) -> list[tuple[int, int]]:
        """Maximal dirty byte ranges inside ``(offset, length)`` (default: whole disk)."""
        if length is None:
            length = self.size - offset
        return [(lo, n) for lo, n, value in self._granule_runs(offset, length) if value]

    def to_clusters(self, cluster_size: int, nclusters: int | None = None) -> Bitmap:
        """The dirty set at another granularity: bit c set iff cluster c
        (``cluster_size`` bytes, a power of two) holds a dirty byte."""
        assert cluster_size > 0 and cluster_size & (cluster_size - 1) == 0
        if nclusters is None:
            nclusters = (self.size + cluster_size - 1) // cluster_size
        out = Bitmap(nclusters)
        if cluster_size == self.granularity:
            out.copy_from(self.bits)
            return out
        for off, length in self.dirty_ranges():
            first = off // cluster_size
            out.set(first, (off + length + cluster_size - 1) // cluster_size - first)
        return out

    def _require_consistent(self) -> None:
        if self.inconsistent:
            raise BitmapError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    # --- successor protocol -------------------------------------------------

    def freeze(self, mode: str = "on-success") -> "DirtyBitmap":
        """Make the bitmap busy for a job with ``bitmap-mode`` ``mode``; return
        the anonymous successor now recording new writes."""
        self._require_usable()
        if mode not in BITMAP_MODES:
            raise BitmapError(f"unknown bitmap mode {mode!r}")
        succ = DirtyBitmap("", self.size, self.granularity, recording=self._recording)
        self.successor = succ
        self.sync_mode = mode
        return succ

    def _unfreeze(self) -> DirtyBitmap:
        succ = self.successor
        if succ is None:
            raise BitmapError(f"Bitmap '{self.name}' is not frozen")
        self.successor = None
        self.sync_mode = None
        self._copied = None
        self._recording = succ._recording
        return succ

    def abdicate(self) -> None:
        """Job done, bitmap synced: the parent's bits become the successor's; unfreeze."""
        succ = self._unfreeze()
        if succ.bits.any() and self.backing is not None:
            self.backing.before_set()
        self.bits.copy_from(succ.bits)

    def reclaim(self) -> None:
        """Job failed or mode never: parent |= successor; unfreeze."""
        succ = self._unfreeze()
        if succ.bits.any():
            if self.backing is not None:
                self.backing.before_set()
            self.bits.merge(succ.bits)  # already a subset (crash-record union): idempotent

    def copied(self, offset: int, length: int) -> None:
        """The job copied ``(offset, length)`` to the target (call it only once
        the data is safely there).

        With bitmap-mode ``always``, the granules entirely inside it are
        remembered (``_copied``) and forgotten from the parent only by
        ``finish(False)`` -- except those written since the freeze (the
        successor's bits).  Nothing is cleared before the job's outcome is
        known, so `reclaim` (forget nothing) stays correct whatever was
        reported.  Other modes: no-op.
        """
        succ = self.successor
        if succ is None:
            raise BitmapError(f"Bitmap '{self.name}' is not frozen")
        self._check_bytes(offset, length)
        if self.sync_mode != "always":
            return
        first, count = self._inward(offset, length)
        if count == 0:
            return
        if self._copied is None:
            self._copied = Bitmap(self.bits.nbits)
        self._copied.set(first, count)

    def _forget_copied(self) -> None:
        """Parent -= copied granules not rewritten since the freeze (mode always, failure)."""
        copied, succ = self._copied, self.successor
        if copied is None or succ is None:
            return
        for start, count, value in copied.runs():
            if not value:
                continue
            self.bits.clear(start, count)
            pos, end = start, start + count
            while pos < end:
                s = succ.bits.next_set(pos, end)
                if s < 0:
                    break
                e = succ.bits.next_clear(s, end)
                e = end if e < 0 else e
                self._set_bits(s, e - s)
                pos = e

    def finish(self, success: bool) -> None:
        """The job ended: apply the freeze's bitmap-mode (table in the module docstring)."""
        mode = self.sync_mode
        if self.successor is None:
            raise BitmapError(f"Bitmap '{self.name}' is not frozen")
        if mode == "never":
            self.reclaim()
        elif success:
            self.abdicate()
        elif mode == "on-success":
            self.reclaim()
        else:  # always, failed: parent = successor | not-yet-copied
            self._forget_copied()
            self._unfreeze()


class BitmapRegistry:
    """The dirty bitmaps of one export (add/remove/get/list, QMP-style commands).

    Fields: ``export`` (export name), ``size`` (disk bytes), ``store`` (a
    `store.BitmapStore` keeping persistent bitmaps, or None), ``_bitmaps``
    (name -> DirtyBitmap, insertion order), ``on_empty`` (called with no
    argument when `remove` took the last bitmap, or None: the export's
    `BitmapLiveDev` learns that its hook is idle again), ``before_change``
    (called before add, remove, clear, enable, disable, rename and merge;
    it may refuse by raising).  Every refused
    operation raises `BitmapError` before changing anything.
    """

    def __init__(self, export: str, size: int, store=None, *, load: bool = True) -> None:
        self.export = export
        self.size = size
        self.store = store
        self._bitmaps: dict[str, DirtyBitmap] = {}
        self.on_empty = None
        #: Called with no argument before any change but mark/sync (it may
        #: raise to refuse it: `hook.BitmapLiveDev`), or None.
        self.before_change = None
        if store is not None and load:
            for bm in store.load_all(export, size):
                self._bitmaps[bm.name] = bm

    def __contains__(self, name: str) -> bool:
        return name in self._bitmaps

    def __iter__(self) -> Iterator[DirtyBitmap]:
        return iter(list(self._bitmaps.values()))

    def __len__(self) -> int:
        return len(self._bitmaps)

    def get(self, name: str) -> DirtyBitmap:
        try:
            return self._bitmaps[name]
        except KeyError:
            raise BitmapError(f"Dirty bitmap '{name}' not found") from None

    def list(self) -> list[DirtyBitmap]:
        return list(self._bitmaps.values())

    def add(
        self,
        name: str,
        granularity: int | None = None,
        *,
        persistent: bool = False,
        disabled: bool = False,
    ) -> DirtyBitmap:
        self.changing()
        check_name(name)
        if name in self._bitmaps:
            raise BitmapError(f"Bitmap already exists: {name}")
        g = DEFAULT_GRANULARITY if granularity is None else check_granularity(granularity)
        if persistent and self.store is None:
            raise BitmapError("Cannot add a persistent bitmap: the server has no --state-dir")
        bm = DirtyBitmap(name, self.size, g, recording=not disabled, persistent=persistent)
        if persistent:
            self.store.create(self.export, bm)
        self._bitmaps[name] = bm
        return bm

    def remove(self, name: str) -> None:
        self.changing()
        bm = self.get(name)
        if bm.busy:
            raise BitmapError(
                f"Bitmap '{name}' is currently in use by another operation and cannot be used"
            )
        if bm.persistent and self.store is not None:
            self.store.remove(self.export, bm)
        del self._bitmaps[name]
        if not self._bitmaps and self.on_empty is not None:
            self.on_empty()

    def _persist_meta(self, bm: DirtyBitmap) -> None:
        if bm.persistent and self.store is not None:
            self.store.rewrite(self.export, bm)

    def clear(self, name: str) -> None:
        self.changing()
        bm = self.get(name)
        bm._require_usable()
        if bm.persistent and self.store is not None:
            self.store.rewrite(self.export, bm, clear=True)
        else:
            bm.clear()

    def enable(self, name: str) -> None:
        self.changing()
        bm = self.get(name)
        bm.recording = True
        self._persist_meta(bm)

    def disable(self, name: str) -> None:
        self.changing()
        bm = self.get(name)
        bm.recording = False
        self._persist_meta(bm)

    def rename(self, old: str, new: str) -> None:
        self.changing()
        bm = self.get(old)
        bm._require_usable()
        check_name(new)
        if new in self._bitmaps:
            raise BitmapError(f"Bitmap already exists: {new}")
        bm.name = new
        try:
            self._persist_meta(bm)
        except BaseException:
            bm.name = old
            raise
        self._bitmaps = {(new if k == old else k): v for k, v in self._bitmaps.items()}

    def merge(self, target: str, sources: Iterable[str]) -> None:
        """``target |= each source`` (QMP block-dirty-bitmap-merge)."""
        self.changing()
        tbm = self.get(target)
        srcs = [self.get(s) for s in sources]
        tbm._require_usable()
        for s in srcs:
            s._require_consistent()
        for s in srcs:
            tbm.merge(s)

    def changing(self) -> None:
        """About to change (not mark/sync): ``before_change`` may refuse."""
        if self.before_change is not None:
            self.before_change()

    def mark(self, offset: int, length: int) -> None:
        """Record a write in every bitmap (the live export's hook; call before the write)."""
        for bm in self._bitmaps.values():
            bm.mark(offset, length)

    def sync(self) -> None:
        """Make every bit set so far durable (call before answering FLUSH or a FUA write)."""
        if self.store is not None:
            self.store.sync(self.export)

    def close(self) -> None:
        """Clean shutdown: persistent bitmaps are synced, marked clean and
        unmapped (the DirtyBitmaps keep working, in memory only)."""
        if self.store is not None:
            self.store.close_clean(self.export)
