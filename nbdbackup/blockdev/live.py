"""The live view of a writable export: a filter that runs write hooks.

Role: the NBD server serves EVERY writable export through one `LiveDev`.  A
backup job (copy-before-write, `backup.cbw.CBWHook`) and dirty tracking
(`bitmap.hook`) attach to it as *write hooks*; with no hook attached a call
costs one truthiness test.  It lives in `blockdev`, below both of its users
(as nbdkit keeps its filter mechanism below every filter), so neither package
imports the other for it.

Hook protocol (`WriteHook`):
- ``async before_write(offset, length)`` -- called for every pwrite, zero and
  trim, in hook order, BEFORE the inner device is called.  It may raise
  `OSError`: the live request then fails with that errno and does NOT reach
  the device (later hooks are not called).
- ``async on_durable()`` -- called, in hook order, after the inner FLUSH (or
  the inner FUA write) succeeded and before the request is acknowledged.  The
  dirty-bitmap work uses it to make bitmaps durable together with the data.
- ``after_write(offset, length)`` (optional, synchronous) -- called only when
  the hook object has the attribute ``after_write`` and only after the inner
  device call SUCCEEDED.  Being synchronous it cannot reorder with other
  requests' completions.
- ``before_write_now(offset, length) -> bool`` (optional, synchronous) -- the
  task-free write path (`LiveDev.pwrite_now`): True means "what
  before_write would do for this write is done now, nothing to await";
  False means "await before_write" (anything it already did must be safe to
  do again: before_write follows).  A hook without it always takes the
  async path.

Task-free writes (`pwrite_now`, `zero_now`, `trim_now`, used by the server
for small WRITEs, WRITE_ZEROES and TRIM; `pwrite_start`, a WRITE handed to
the I/O engine with a completion callback): taken
only when every attached hook has ``before_write_now`` and it says True for
this write, the write is not FUA while hooks are attached (``on_durable`` is
async), and the inner device's `pwrite_now` (`zero_now`, `trim_now`) takes
it; hooks are asked in hook order before the inner device is called,
``after_write`` runs after it succeeded, exactly as on the async path.
Otherwise nothing reaches the device and the caller awaits `pwrite` (`zero`,
`trim`), which calls every hook's ``before_write`` as usual.

Invariant (ordering): for every hook H and every write W, H.before_write(W)
has completed before any byte of W reaches the inner device.  This is what
copy-before-write relies on: the old content is safe in the backup target
before the live disk changes.

The hook list is replaced, never mutated in place (``add_hook`` and
``remove_hook`` build a new tuple), so a request iterates over the hooks that
were attached when it started even if the list changes while it awaits.

Quiescing (`quiesce`, `quiesce_all`; QEMU drains nodes around a transaction
for the same reason): an async write that took the hook list before a hook
was attached and is still waiting for the device would land AFTER the
attach without passing the new hook -- a copy-before-write attached at a
point in time would miss it (the snapshot changes under its reader) while
the dirty bitmap frozen at that instant already counted it (the next
incremental would miss it).  Inside ``async with dev.quiesce()`` no async
write is between taking its hook list and finishing its device call: new
ones wait at the gate before taking the list, earlier ones have finished.
Task-free writes never suspend, so they cannot straddle a synchronous
attach; a write handed to the I/O engine (`pwrite_start`) does, so it counts
in ``_writing`` until it completes and is not started while quiesced.  The
engine and ``transaction`` attach backups inside it.

External writers (``serve --workers``, `nbd.worker`): connections of this
export may be served by other processes, writing the same file through their
own descriptor, where no hook of this object can see their writes.  The
server counts them here (`attach_external`, `detach_external`) and registers
a *recaller* (`set_recaller`): an async callable that brings every such
connection back into this process with no write in flight.  `recall` awaits
it until none is left; `quiesce` recalls (after closing its gate) before it
yields, so a hook attached inside it sees every later write; `add_hook`
asserts none is left.  A connection may be handed out only while
`offload_ok`: not quiesced, and every hook attached is *idle* (has an
``idle()`` method saying True: e.g. dirty tracking with no bitmap), so
writes elsewhere cannot be missed by anyone -- or is *delegable* (below).
Whoever makes a hook stop being idle (a bitmap added), or changes what a
delegable hook delegates, must `recall` first, then change it with no
await in between.

Delegable hooks (``serve --workers`` with dirty bitmaps, docs/workers.md
"Bitmaps"): a hook that is not idle may still let other processes write, if
it can say what they must check and do for it.  Such a hook has three
more methods:

- ``delegate() -> list[BitMapSpec] | None`` -- None: not now (the
  connections stay here).  Otherwise the bit maps an external writer checks
  before each write: if every granule the write touches is set in every map,
  this hook needs nothing for it; if not, the external writer must call
  ``external_write`` in this process (through its server) for the ranges
  and wait for it to return before issuing the write.
- ``external_write(offset, length)`` (synchronous) -- what ``before_write``
  does, for a write another process issues after this returns.
- ``external_durable()`` (synchronous) -- what ``on_durable`` does, for a
  FLUSH or FUA write another process made durable; it answers only after
  this returned.

A `BitMapSpec` ``(fd, offset, nbits, shift)`` names a file mapped
MAP_SHARED by the hook's owner: ``nbits`` bits from byte ``offset``, bit i
= bit ``i % 8`` of byte ``offset + i // 8``, covering bytes ``[i << shift,
(i + 1) << shift)`` of the disk (`bits_all_set`).  The owner only ever sets
bits in it while external writers exist; whatever would clear a bit,
replace the file, or change the list (or make ``delegate`` return None)
happens only after `recall` (inside `quiesce`), with no await in between
-- so a bit an external writer saw set stays set until its write is done.

Offloadable again (the way back): whatever may have ended the reason a
connection could not be handed out calls `offload_changed` -- `remove_hook`,
the end of `quiesce`, and a hook that turned idle (the dirty hook when its
registry loses its last bitmap).  It tells the server's *offload listener*
(`set_offload_listener`) when `offload_ok` holds then; the server decides
when and what to hand out again (it debounces and checks `offload_ok` once
more, synchronously, at each hand-off).  A notification is only a hint: a
missed one keeps connections here (slower, never wrong), a spurious one
hands nothing out while `offload_ok` is false.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from typing import AsyncIterator, Iterable, Protocol, runtime_checkable

from .base import BlockDev, Buffer, FilterDev


#: A delegable hook's bit map: (fd, byte offset, nbits, granule shift) (module doc).
BitMapSpec = tuple[int, int, int, int]


def bits_all_set(buf, offset: int, length: int, shift: int) -> bool:
    """Is every granule (``1 << shift`` bytes) touching the byte range
    ``(offset, length)`` set in ``buf`` (a `BitMapSpec`'s bits: bit i = bit
    ``i % 8`` of byte ``i // 8``)?  True for an empty range."""
    if length <= 0:
        return True
    first = offset >> shift
    last = (offset + length - 1) >> shift
    b0, b1 = first >> 3, last >> 3
    if b0 == b1:
        mask = ((2 << (last - first)) - 1) << (first & 7)
        return buf[b0] & mask == mask
    head = 0xFF & (0xFF << (first & 7))
    tail = (2 << (last & 7)) - 1
    if buf[b0] & head != head or buf[b1] & tail != tail:
        return False
    n = b1 - b0 - 1
    return not n or bytes(buf[b0 + 1:b1]) == b"\xff" * n


@runtime_checkable
class WriteHook(Protocol):
    async def before_write(self, offset: int, length: int) -> None: ...

    async def on_durable(self) -> None: ...


class LiveDev(FilterDev):
    """A writable export's device with write hooks.

    Fields: ``inner`` (the real disk, see `FilterDev`); ``_hooks`` (tuple of
    attached hooks, in call order; replaced, never mutated); ``_after`` (the
    subset of ``_hooks`` that have ``after_write``); ``_now`` (the
    ``before_write_now`` of every hook, in hook order, or None when some hook
    has none: then no write is task-free while hooks are attached).
    """

    #: reads and writes are ``inner``'s bytes (hooks only watch them): copy
    #: offload and SEEK_DATA probes may look through (`FilterDev.same_bytes`)
    same_bytes = True

    def __init__(self, inner: BlockDev, *, owns_inner: bool = True) -> None:
        super().__init__(inner, owns_inner=owns_inner)
        self._hooks: tuple[WriteHook, ...] = ()
        self._after: tuple = ()
        self._now: tuple | None = ()
        #: Async writes past their hook list and not finished (see Quiescing).
        self._writing = 0
        #: While quiesced: the Event new async writes wait for; else None.
        self._gate: asyncio.Event | None = None
        #: Set when ``_writing`` drops to 0 while someone waits for it.
        self._drained: asyncio.Event | None = None
        #: Connections of this device served by other processes now (External writers).
        self._external = 0
        #: Async callable bringing them back (registered by the server), or None.
        self._recaller = None
        #: Called with no argument when this device may have become offloadable
        #: again (`offload_changed`; registered by the server), or None.
        self._offload_listener = None

    # -- quiescing ------------------------------------------------------

    async def _wait_gate(self) -> None:
        while self._gate is not None:
            await self._gate.wait()

    def _done_writing(self) -> None:
        self._writing -= 1
        if not self._writing and self._drained is not None:
            self._drained.set()

    @contextlib.asynccontextmanager
    async def quiesce(self, timeout: float = 30.0) -> AsyncIterator[None]:
        """New async writes wait; the ones in flight finish first (module doc).

        Raises OSError(EBUSY) if the writes in flight take longer than ``timeout``.
        """
        await self._wait_gate()  # one quiesce at a time
        gate = self._gate = asyncio.Event()
        try:
            await self.recall()  # no new hand-off while the gate is closed
            if self._writing:
                self._drained = asyncio.Event()
                try:
                    await asyncio.wait_for(self._drained.wait(), timeout)
                except TimeoutError:
                    raise OSError(errno.EBUSY, f"{self._writing} write(s) in flight did not finish "
                                               f"within {timeout:g} s") from None
                finally:
                    self._drained = None
            yield
        finally:
            self._gate = None
            gate.set()
            self.offload_changed()

    # -- external writers -------------------------------------------------

    def set_recaller(self, recaller) -> None:
        """Register the async callable that brings external writers back (None: none)."""
        self._recaller = recaller

    def set_offload_listener(self, listener) -> None:
        """Register the callable told when this device may be offloadable
        again (module doc, "Offloadable again"; None: none)."""
        self._offload_listener = listener

    def offload_changed(self) -> None:
        """Something that kept connections from being handed out may have
        ended (a hook removed or turned idle, a quiesce over): tell the
        listener if `offload_ok` holds now."""
        if self._offload_listener is not None and self.offload_ok():
            self._offload_listener()

    @property
    def external(self) -> int:
        return self._external

    def offload_ok(self) -> bool:
        """A connection may be handed to another process now (module doc)."""
        if self._gate is not None or type(self).pwrite is not LiveDev.pwrite:
            return False
        return self.delegations() is not None

    def delegations(self) -> list[BitMapSpec] | None:
        """What an external writer must check now (module doc, "Delegable
        hooks"): None when some hook is neither idle nor delegable now; else
        the bit maps of every delegable hook that is not idle, and ``[]``
        only when every hook is idle (nothing to check, nothing to ask)."""
        out: list[BitMapSpec] = []
        for h in self._busy_hooks():
            delegate = getattr(h, "delegate", None)
            maps = delegate() if delegate is not None else None
            if maps is None:
                return None
            out.extend(maps)
        return out

    def delegated(self) -> bool:
        """Some hook is not idle (but delegable): external writers must ask
        this process (`external_write`, `external_durable`)."""
        return bool(self._busy_hooks())

    def _busy_hooks(self) -> list:
        """The hooks attached that are not idle (no ``idle()``, or it says False)."""
        return [h for h in self._hooks if not (getattr(h, "idle", None) and h.idle())]

    def external_writes(self, ranges: Iterable[tuple[int, int]]) -> None:
        """For an external writer, before it issues writes of ``ranges``
        (``(offset, length)`` each): every non-idle hook's ``external_write``
        (module doc, "Delegable hooks").  OSError(EIO) when the hooks are not
        all idle or delegable now: such a write must not happen (a recall
        was missed)."""
        if self.delegations() is None:
            raise OSError(errno.EIO, "a write from another process while this export's "
                                     "write hooks cannot be delegated")
        for h in self._busy_hooks():
            for offset, length in ranges:
                h.external_write(offset, length)

    def external_durable(self) -> None:
        """For an external writer's FLUSH or FUA write, after its data is
        durable and before it is acknowledged: every non-idle hook's
        ``external_durable``."""
        for h in self._busy_hooks():
            h.external_durable()

    def attach_external(self) -> None:
        assert self.offload_ok()
        self._external += 1

    def detach_external(self) -> None:
        assert self._external > 0
        self._external -= 1

    async def recall(self) -> None:
        """Bring every external writer back (no write of theirs in flight
        after this returns).  OSError if the recaller could not."""
        while self._external:
            if self._recaller is None:
                raise OSError(errno.EBUSY, "connections served elsewhere and no way to recall them")
            n = self._external
            await self._recaller()
            if self._external >= n:
                raise OSError(errno.EBUSY, f"{self._external} connection(s) served by worker "
                                           f"processes could not be recalled")

    # -- hooks ----------------------------------------------------------

    @property
    def hooks(self) -> tuple[WriteHook, ...]:
        return self._hooks

    def add_hook(self, hook: WriteHook) -> None:
        """Attach ``hook`` after the existing ones (a hook is attached at most once)."""
        assert hook not in self._hooks, "hook attached twice"
        assert not self._external, "hook attached while other processes write (recall first)"
        self._set_hooks(self._hooks + (hook,))

    def remove_hook(self, hook: WriteHook) -> None:
        """Detach ``hook``; no-op if it is not attached."""
        if hook in self._hooks:
            self._set_hooks(tuple(h for h in self._hooks if h is not hook))
            self.offload_changed()

    def _set_hooks(self, hooks: tuple) -> None:
        self._hooks = hooks
        self._after = tuple(h for h in hooks if hasattr(h, "after_write"))
        now = tuple(getattr(h, "before_write_now", None) for h in hooks)
        self._now = None if None in now else now

    async def _before(self, hooks: tuple, offset: int, length: int) -> None:
        for h in hooks:
            await h.before_write(offset, length)

    def _after_write(self, hooks: tuple, offset: int, length: int) -> None:
        for h in hooks:
            if hasattr(h, "after_write"):
                h.after_write(offset, length)

    async def _durable(self, hooks: tuple) -> None:
        for h in hooks:
            await h.on_durable()

    # -- BlockDev ---------------------------------------------------------

    async def _write(self, offset: int, length: int, fua: bool, op) -> None:
        """The async path of every write (WRITE, WRITE_ZEROES, TRIM): wait at
        the quiesce gate, take the hook list, count as writing (see
        Quiescing), hooks before, ``op()`` (the inner device's call), hooks
        after, and for FUA the hooks' durability."""
        if self._gate is not None:
            await self._wait_gate()
        hooks = self._hooks
        self._writing += 1
        try:
            if hooks:
                await self._before(hooks, offset, length)
            await op()
            if hooks:
                self._after_write(hooks, offset, length)
        finally:
            self._done_writing()
        if fua and hooks:
            await self._durable(hooks)

    async def pwrite(self, buf: Buffer, offset: int, *, fua: bool = False) -> None:
        await self._write(offset, memoryview(buf).nbytes, fua, lambda: self.inner.pwrite(buf, offset, fua=fua))

    def pwrite_now(self, buf: Buffer, offset: int, fua: bool = False) -> bool:
        if type(self).pwrite is not LiveDev.pwrite:
            return False  # a subclass changed writes: do not bypass it
        if not self._hooks:
            return self.inner.pwrite_now(buf, offset, fua)
        length = memoryview(buf).nbytes
        if not self._hooks_done_now(offset, length, fua) or not self.inner.pwrite_now(buf, offset, fua):
            return False
        for h in self._after:
            h.after_write(offset, length)
        return True

    def pwrite_start(self, buf: Buffer, offset: int, fua: bool, cb) -> bool:
        """`pwrite_start` of the inner device when every hook is done now
        (as `pwrite_now`) and the device is not quiesced; ``after_write``
        hooks run when the write succeeded.  Unlike the other task-free
        writes it straddles time (the engine completes it later), so it
        counts in ``_writing`` until its callback, exactly like an async
        write past its hook list: `quiesce` waits for it."""
        if type(self).pwrite is not LiveDev.pwrite or self._gate is not None:
            return False
        length = memoryview(buf).nbytes
        hooks = self._hooks
        if hooks and not self._hooks_done_now(offset, length, fua):
            return False
        after = self._after if hooks else ()

        def done(err: int) -> None:
            try:
                if not err:
                    for h in after:
                        h.after_write(offset, length)
            finally:
                self._done_writing()
            cb(err)
        self._writing += 1
        try:
            started = self.inner.pwrite_start(buf, offset, fua, done)
        except BaseException:
            self._writing -= 1
            raise
        if not started:
            self._writing -= 1  # synchronous: no quiesce can have started meanwhile
        return started

    def _hooks_done_now(self, offset: int, length: int, fua: bool) -> bool | None:
        """For the task-free paths: None = no hooks; True = every hook's
        before_write_now said done; False = await the async path."""
        if not self._hooks:
            return None
        now = self._now
        if now is None or fua:
            return False
        for f in now:
            if not f(offset, length):
                return False
        return True

    def _write_now(self, offset: int, length: int, fua: bool, op_now) -> bool:
        """The task-free path of WRITE_ZEROES and TRIM: done iff every hook is
        done now and ``op_now()`` (the inner device's ``*_now``) did it."""
        ok = self._hooks_done_now(offset, length, fua)
        if ok is False or not op_now():
            return False
        if ok:
            for h in self._after:
                h.after_write(offset, length)
        return True

    def zero_now(self, offset: int, length: int, *, may_trim: bool = False,
                 fua: bool = False, fast: bool = False) -> bool:
        if type(self).zero is not LiveDev.zero:
            return False
        return self._write_now(offset, length, fua, lambda: self.inner.zero_now(
            offset, length, may_trim=may_trim, fua=fua, fast=fast))

    def trim_now(self, offset: int, length: int, *, fua: bool = False) -> bool:
        if type(self).trim is not LiveDev.trim:
            return False
        return self._write_now(offset, length, fua, lambda: self.inner.trim_now(offset, length, fua=fua))

    async def zero(self, offset: int, length: int, *, may_trim: bool = False,
                   fua: bool = False, fast: bool = False) -> None:
        await self._write(offset, length, fua,
                          lambda: self.inner.zero(offset, length, may_trim=may_trim, fua=fua, fast=fast))

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._write(offset, length, fua, lambda: self.inner.trim(offset, length, fua=fua))

    async def flush(self) -> None:
        hooks = self._hooks
        await self.inner.flush()
        if hooks:
            await self._durable(hooks)


@contextlib.asynccontextmanager
async def quiesce_all(devs: Iterable[BlockDev], timeout: float = 30.0) -> AsyncIterator[None]:
    """`LiveDev.quiesce` of every `LiveDev` in ``devs`` at once (others are ignored)."""
    lives = list(dict.fromkeys(d for d in devs if isinstance(d, LiveDev)))
    async with contextlib.AsyncExitStack() as stack:
        for d in lives:
            await stack.enter_async_context(d.quiesce(timeout))
        yield
