"""The backup engine's view of dirty bitmaps: `RegistrySource` implements `backup.engine.BitmapSource`.

Role: for a backup with ``bitmap=NAME`` the engine calls
`RegistrySource.begin_backup`, which freezes the export's bitmap (successor
protocol, `dirty`) with the requested bitmap-mode and returns a `Lease`:

- ``clusters``: the frozen bitmap's dirty set at the job's cluster size,
  taken synchronously right after the freeze (so it is exactly the
  point-in-time dirty set);
- ``context``: ``("qemu:dirty-bitmap:NAME", provider)`` answering the
  snapshot export's meta context from a frozen copy of the bits at the
  bitmap's own granularity;
- ``bind(state)``: the engine hands over the job's `CopyState`; its ``done``
  clusters are what reached the target;
- ``end(success)`` (a coroutine; the job awaits it): for bitmap-mode
  ``always`` after a failure, flushes the target and, only if that worked
  (the data must be durable on the target before the bitmap forgets it),
  reports every done cluster as `DirtyBitmap.copied`; then
  `DirtyBitmap.finish` applies the mode.  Idempotent: a second call does
  nothing.

Invariant: between `begin_backup` and `end` the bitmap is busy (frozen).
"""

from __future__ import annotations

from typing import Callable

from ..blockdev.base import DIRTY_BITMAP_PREFIX, Extent
from ..errors import ConfigError
from .core import Bitmap
from .dirty import BITMAP_MODES, BitmapError, BitmapRegistry, DirtyBitmap

__all__ = ["Lease", "RegistrySource"]


class Lease:
    """One frozen bitmap for one job.  Fields: ``bitmap`` (the frozen
    DirtyBitmap), ``clusters``, ``context``, ``state`` (the bound CopyState or
    None), ``ended``."""

    def __init__(self, bitmap: DirtyBitmap, cluster_size: int, nclusters: int) -> None:
        self.bitmap = bitmap
        self.cluster_size = cluster_size
        self.clusters: Bitmap = bitmap.to_clusters(cluster_size, nclusters)
        frozen = DirtyBitmap(bitmap.name, bitmap.size, bitmap.granularity,
                             recording=False, bits=bitmap.bits.copy())

        async def provider(offset: int, length: int) -> list[Extent]:
            return frozen.extents(offset, length)

        self.context = (DIRTY_BITMAP_PREFIX + bitmap.name, provider)
        self.state = None
        self.ended = False

    def bind(self, state) -> None:
        """Remember the job's CopyState (its ``done`` bitmap and ``cluster_range``)."""
        self.state = state

    async def end(self, success: bool) -> None:
        if self.ended:
            return
        self.ended = True
        bm = self.bitmap
        try:
            if bm.sync_mode == "always" and not success and self.state is not None:
                await self.state.target.flush()
                done = self.state.done
                cs = self.cluster_size
                for start, count, value in done.runs():
                    if value:
                        off = start * cs
                        bm.copied(off, min((start + count) * cs, bm.size) - off)
        except OSError:
            pass  # not durable on the target: forget nothing (never less than the truth)
        finally:
            bm.finish(success)


class RegistrySource:
    """`BitmapSource` over per-export registries: ``lookup(export)`` returns
    the export's `BitmapRegistry` or None."""

    def __init__(self, lookup: Callable[[str], BitmapRegistry | None]) -> None:
        self.lookup = lookup

    def begin_backup(self, export: str, name: str, mode: str, cluster_size: int,
                     nclusters: int) -> Lease:
        if mode not in BITMAP_MODES:
            raise ConfigError(f"unknown bitmap-mode {mode!r}")
        reg = self.lookup(export)
        if reg is None:
            raise ConfigError(f"export {export!r} has no dirty bitmaps")
        try:
            bm = reg.get(name)
            bm.freeze(mode)
        except BitmapError as e:
            raise ConfigError(str(e)) from e
        try:
            return Lease(bm, cluster_size, nclusters)
        except BaseException:
            bm.reclaim()
            raise
