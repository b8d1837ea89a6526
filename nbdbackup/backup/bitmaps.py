"""Dirty bitmaps as a backup's source of work: the `BitmapSource` adapter.

Role: connects `nbdbackup.bitmap.dirty.BitmapRegistry` (one per export) to
the engine for ``sync=incremental|bitmap`` and for ``bitmap``/``bitmap-mode``
with full/top.  `RegistryBitmapSource.begin_backup` freezes the named bitmap
(QEMU's successor protocol) and takes, synchronously, right after the freeze:
- ``clusters``: the frozen dirty set at the job's cluster size (pump_todo);
- ``context``: ``qemu:dirty-bitmap:NAME`` for the snapshot export, answered
  from a private copy of the frozen bits (later writes do not show).
The engine calls `begin_backup` and attaches copy-before-write with no await
in between, so the bitmap's freeze and the snapshot's point in time are the
same instant.

End (`BitmapLease.end`, awaited by the job when it concludes): the bitmap's
``finish(success)`` applies the mode given at ``freeze(mode)`` (bitmap-mode
table in `bitmap.dirty`).  For
``always`` after a failure the clusters already copied to the target
(``in_target``) are first reported
with ``copied`` -- but only if a target flush succeeds (the data must be safe
on the target before the bitmap forgets it); otherwise nothing is forgotten,
which is never less than the truth.  A job that succeeded with clusters
its ``ignore`` error policy skipped (``CopyState.ignored``, not in the
target) keeps them dirty: they are merged into the successor before it
replaces the bitmap, as if written since the start -- the target lacks
their content, so the next incremental must copy them.
"""

from __future__ import annotations

from typing import Callable

from ..bitmap.dirty import BitmapRegistry, DirtyBitmap
from ..blockdev.base import DIRTY_BITMAP_PREFIX, Extent
from ..errors import ConfigError
from .copystate import CopyState


class RegistryLease:
    """Fields: ``bitmap`` (the frozen DirtyBitmap); ``mode``; ``clusters``;
    ``context`` ((name, provider)); ``state`` (the job's CopyState, set by
    the engine through `bind`; used by mode ``always``); ``_ended``."""

    def __init__(self, bitmap: DirtyBitmap, mode: str, cluster_size: int, nclusters: int) -> None:
        self.bitmap = bitmap
        self.mode = mode
        bitmap.freeze(mode)
        # Before any await: the frozen content (see bitmap.dirty "Consequence for readers").
        self.clusters = bitmap.to_clusters(cluster_size, nclusters)
        frozen = DirtyBitmap("frozen", bitmap.size, bitmap.granularity, bits=bitmap.bits.copy())

        async def provider(offset: int, length: int) -> list[Extent]:
            return frozen.extents(offset, length)

        self.context = (DIRTY_BITMAP_PREFIX + bitmap.name, provider)
        self.state: CopyState | None = None
        self._ended = False

    def bind(self, state: CopyState | None) -> None:
        """The job's copy state (None: nothing the job copied counts, e.g. an aborted start)."""
        self.state = state

    async def end(self, success: bool) -> None:
        if self._ended:
            return
        self._ended = True
        succ = self.bitmap.successor
        if success and self.mode != "never" and self.state is not None and succ is not None:
            # Abdicating: the bitmap becomes the successor.  Clusters the
            # ``ignore`` policy skipped are not in the target: keep them.
            st = self.state
            skipped = st.ignored.copy()
            for start, count, there in st.in_target.runs():
                if there:
                    skipped.clear(start, count)
            succ.merge_ranges(st.span(s, n) for s, n, v in skipped.runs() if v)
        if self.mode == "always" and not success and self.state is not None:
            st = self.state
            # What the flush covers: a copy-before-write may still write the
            # target while it runs (docs/hunt3.md); its copy is not flushed.
            landed = st.in_target.copy()
            try:
                await st.target.flush()
            except OSError:
                pass  # not safe on the target: forget nothing
            else:
                # In the target -- not merely done: a scratch copy (clusters
                # outside the sync set) or a trimmed cluster is no backup.
                for start, count, there in landed.runs():
                    if there:
                        self.bitmap.copied(*st.span(start, count))
        self.bitmap.finish(success)


class RegistryBitmapSource:
    """`BitmapSource` over per-export registries: ``lookup(export)`` returns the
    export's `BitmapRegistry` or None."""

    def __init__(self, lookup: Callable[[str], BitmapRegistry | None]) -> None:
        self.lookup = lookup

    def begin_backup(self, export: str, name: str, mode: str, cluster_size: int,
                     nclusters: int) -> RegistryLease:
        reg = self.lookup(export)
        if reg is None:
            raise ConfigError(f"export {export!r} has no dirty bitmaps")
        bm = reg.get(name)  # BitmapError if unknown
        if bm.inconsistent:
            why = f" ({bm.inconsistent_reason})" if bm.inconsistent_reason else ""
            raise ConfigError(
                f"Bitmap '{name}' is inconsistent{why}: it may miss writes, so no backup can use it; "
                f"remove it, add a new bitmap and take a full backup")
        bm._require_usable()  # busy: QEMU's wording
        reg.changing()  # a freeze: no worker connection may be checking this bitmap
        return RegistryLease(bm, mode, cluster_size, nclusters)
