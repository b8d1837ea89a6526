"""Dirty tracking of a live export: the write hook and the bitmap-aware live device.

Role: `DirtyHook` is the `blockdev.live.WriteHook` that keeps an export's
`BitmapRegistry` up to date; `BitmapLiveDev` is the `LiveDev` a writable
export is served through when dirty bitmaps are available: it carries the
registry, answers the ``qemu:dirty-bitmap:NAME`` meta contexts of the
export's bitmaps, and closes the registry cleanly when the export closes.

Invariants:
- Mark before write: `DirtyHook.before_write` sets the bits of every
  recording bitmap (`BitmapRegistry.mark`, synchronous) before LiveDev issues
  the write, zero or trim to the disk, so a crash between the two never
  hides a change.  `DirtyHook.before_write_now` does the same mark for the
  task-free write path (`blockdev.live`), always saying "done".  The hook is attached when the export is created, before
  any client can connect, so no write is ever unrecorded.
- Worker processes (``serve --workers``): `DirtyHook` is *delegable*
  (`blockdev.live` "Delegable hooks"): a worker checks the bits of every
  recording persistent bitmap in the file itself (read-only map) and writes
  at once when all its granules are set; otherwise the server process
  marks them (`external_write`, the same `BitmapRegistry.mark`) before the
  worker writes, and `external_durable` syncs the registry before a
  worker's FLUSH/FUA is answered.  The registry refuses any change but
  mark/sync while worker connections exist (``before_change``).
- Durable with the data: `DirtyHook.on_durable` (after a FLUSH, or a FUA
  write, succeeded on the disk and before it is acknowledged) calls
  `BitmapRegistry.sync`, so an acknowledged FLUSH/FUA implies that the bits
  of every write acknowledged before it are durable (`store` docstring).
- `BitmapLiveDev` IS a `LiveDev` (the engine and copy-before-write attach
  to it as to any live export); it adds meta contexts and never changes
  data paths.
- Close order: `BitmapLiveDev.close` runs after the server drained the
  export's requests and flushed it; it closes the registry first (sync,
  files marked clean: `BitmapStore.close_clean`), then the disk.  After
  ``kill -9`` nothing is marked clean and the store's load rules apply.
"""

from __future__ import annotations

import errno
from typing import Callable, Sequence

from ..blockdev.live import LiveDev
from ..blockdev.base import DIRTY_BITMAP_PREFIX, BlockDev, Extent
from .dirty import BitmapError, BitmapRegistry

__all__ = ["DirtyHook", "BitmapLiveDev", "MAX_EXTENTS"]

#: Most extents one ``qemu:dirty-bitmap`` answer holds (a short answer is
#: allowed; clients ask again from where it stopped).
MAX_EXTENTS = 1 << 16


class DirtyHook:
    """The write hook of dirty tracking.  Field: ``registry`` (the export's)."""

    def __init__(self, registry: BitmapRegistry) -> None:
        self.registry = registry

    async def before_write(self, offset: int, length: int) -> None:
        self.registry.mark(offset, length)

    def idle(self) -> bool:
        """No bitmap at all: marking does nothing, so writes this hook does not
        see (a worker process's, `blockdev.live` "External writers") lose
        nothing.  Adding a bitmap recalls them first (`bitmap.manager`)."""
        return not len(self.registry)

    def before_write_now(self, offset: int, length: int) -> bool:
        """The mark is synchronous: done now (the task-free write path)."""
        self.registry.mark(offset, length)
        return True

    async def on_durable(self) -> None:
        self.external_durable()

    # -- delegation to worker processes (blockdev.live "Delegable hooks") --

    def delegate(self) -> list[tuple[int, int, int, int]] | None:
        """The bit maps of every recording bitmap, when all of them are
        persistent (mapped from their files) and none is frozen by a job;
        else None (connections stay in the server process).

        Memory bitmaps have no map another process can read; a frozen
        bitmap's successor is memory-only (and the job's copy-before-write
        keeps connections here anyway).  Inconsistent and disabled bitmaps
        record nothing: nothing to check."""
        maps = []
        for bm in self.registry:
            if bm.inconsistent:
                continue
            if bm.busy:
                return None
            if not bm.recording:
                continue
            spec = bm.shared_map()
            if spec is None:
                return None
            maps.append(spec)
        return maps

    def external_write(self, offset: int, length: int) -> None:
        """A worker's write of ``(offset, length)`` is about to be issued:
        mark it, exactly as for a write of this process."""
        self.registry.mark(offset, length)

    def external_durable(self) -> None:
        try:
            self.registry.sync()
        except BitmapError as e:  # the store lost the export: never ack as durable
            raise OSError(errno.EIO, f"dirty bitmaps could not be made durable: {e}") from e


class BitmapLiveDev(LiveDev):
    """A `LiveDev` whose export has dirty bitmaps.

    Fields (beyond LiveDev's): ``registry`` (the export's `BitmapRegistry`);
    ``hook`` (its `DirtyHook`, attached first); ``on_close`` (called with no
    argument after the registry is closed, so the owner forgets it; or None).
    """

    def __init__(self, inner: BlockDev, registry: BitmapRegistry, *,
                 on_close: Callable[[], None] | None = None) -> None:
        super().__init__(inner)
        self.registry = registry
        self.hook = DirtyHook(registry)
        self.on_close = on_close
        self.add_hook(self.hook)
        # The last bitmap removed: the hook is idle, connections may go back
        # to worker processes (`blockdev.live` "Offloadable again").
        registry.on_empty = self.offload_changed
        # Worker connections check the bitmaps' files themselves: nothing
        # may clear, replace or add a recording bitmap while one exists
        # (`bitmap.manager` recalls them first; this catches a path that did not).
        registry.before_change = self._no_external

    def _no_external(self) -> None:
        if self.external:
            raise BitmapError(f"{self.external} connection(s) served by worker processes "
                              f"were not recalled before a bitmap change")

    def meta_contexts(self) -> Sequence[str]:
        own = [DIRTY_BITMAP_PREFIX + bm.name for bm in self.registry if not bm.inconsistent]
        return tuple(self.inner.meta_contexts()) + tuple(own)

    def extents_now(self, offset: int, length: int, context: str = "base:allocation") -> list[Extent] | None:
        # Only the bitmap contexts are ours; the rest is the inner device's
        # (this keeps the server's synchronous read path open for big reads).
        if context.startswith(DIRTY_BITMAP_PREFIX):
            return None
        return self.inner.extents_now(offset, length, context)

    async def extents(self, offset: int, length: int, context: str = "base:allocation") -> list[Extent]:
        if not context.startswith(DIRTY_BITMAP_PREFIX):
            return await self.inner.extents(offset, length, context)
        name = context[len(DIRTY_BITMAP_PREFIX):]
        try:
            bm = self.registry.get(name)
            return bm.extents(offset, length, max_extents=MAX_EXTENTS)
        except BitmapError as e:  # removed since the client negotiated it, or inconsistent
            raise OSError(errno.EINVAL, str(e)) from e

    async def close(self) -> None:
        try:
            self.registry.close()
        finally:
            if self.on_close is not None:
                self.on_close()
            await super().close()
