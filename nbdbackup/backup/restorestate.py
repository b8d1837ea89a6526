"""The restore state: copy-before-write's rules run in reverse (instant recovery).

Role: a restoring export serves a disk while it is copied from a backup (the
*source*, a read-only `BlockDev`: a repository snapshot) to the disk that
will replace it (the *target*).  Three parties touch a chunk: the guest
(reads and writes through the export, `restoredev.RestoreDev`), copy-on-read
(a guest read of a chunk not restored yet) and the background restore job
(the `pump.Pump` of a `restorejob.RestoreJob`).  They all go through this
object, so a chunk is fetched once, never overwrites guest data, and the
guest always sees the snapshot with its own writes applied.

`RestoreState` is a `copystate.CopyState` (same clusters, same ``inflight``
`Claims`, same ``copy``/``claim`` and zero-run handling, so the backup pump
runs unchanged); a *chunk* here is one of its clusters (the repository's
chunk size by default).  Shared state, mutated only on the event loop
thread (steps said to be synchronous contain no ``await``):

- ``done`` (Bitmap, in memory): bit c set <=> the target holds chunk c's
  authoritative content (restored from the source, or owned by a guest
  write), maybe not durable yet.  Set once, never cleared.  Reads of a done
  chunk go to the target; nobody but the guest writes it again.
- ``progress`` (`ProgressMap`, persistent): bit c set <=> chunk c was done
  AND a target flush completed after that.  ``progress <= done`` always.
  It is what a restart trusts: a set bit is never restored again.
- ``pump_todo``: chunks the background job still has to restore
  (``~done`` at start; marking done clears the bit).
- ``inflight`` (`Claims`): the one copy (or owning guest write) in progress
  per chunk; anyone else awaits its future.
- ``foreground``: on-demand fetches in progress (copy-on-read and write
  fills); the background job claims nothing new while it is > 0
  (``fg_idle`` is set when it is 0): on-demand work has priority.

Rules:

1. Guest read of ``(offset, length)`` (`fetch`, then a target read): every
   chunk not done is restored first (claimed and copied now, or the copy in
   flight awaited; copy-on-read), so the data lands in the target once and
   the read is served from the target.  The chunks a read claims are
   claimed one by one, synchronously, and fetched in parallel (a
   repository read is a round trip).
2. Guest write (also WRITE_ZEROES) of ``(offset, length)`` (`begin_write` /
   `end_write`): a partly covered chunk that is not done is restored first
   (rule 1: its unwritten part must hold the snapshot's bytes); chunks the
   write covers entirely are *owned*: claimed (so readers and the job wait),
   written by the guest, then marked done without any fetch.  Owned claims
   are taken in ascending chunk order and nothing else is held while
   waiting, so two overlapping writes cannot deadlock.  A failed write
   releases its claims with the error: the chunks stay not done, a waiter
   restores them itself.
3. Background job: claims runs of ``pump_todo`` chunks that are neither done
   nor in flight and copies them (`copystate` rule 3: source zero runs are
   zeroed in the target in one request, so holes stay holes).  It never
   touches a done chunk, so it never overwrites guest data.
4. TRIM of a chunk not done is dropped (the chunk will hold the snapshot's
   bytes, which TRIM allows); on done chunks it passes to the target.
5. Durability (`make_durable`: FLUSH, FUA, the job's checkpoints and its
   end): synchronously take P = done & ~progress, flush the target, then
   set P in ``progress`` and msync it.  So a progress bit is set only after
   the chunk's restored (or filled) bytes are durable, and an acknowledged
   FLUSH/FUA also made durable the progress bits of every chunk a flushed
   guest write touched: after a crash such a chunk is never restored again
   over the guest's data.  Guest writes never flushed may be lost (NBD
   allows it): their chunk may be restored again from the source.
6. Cancelling leaves the state valid (`copystate` rules 4 and 5).

Restart: a new state over the same target starts with ``done = progress``
(`ProgressMap.open` checks the state belongs to this source and target).
Fresh sparse targets (created by the restore): `assume_zero_target` marks
every chunk the source reports as zero done at once, nothing written.

Progress: ``total`` = bytes not done at start; ``current`` = those since
restored by the job, fetched on demand or owned by guest writes.
Statistics: ``bytes_copied_by_pump`` (the job), ``bytes_fetched`` (copy-on-read
and write fills), ``bytes_owned`` (whole chunks written by the guest).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os

from ..bitmap.core import Bitmap
from ..blockdev.base import BASE_ALLOCATION, BlockDev
from ..durable import fsync_dir, makedirs_durable
from ..errors import ConfigError
from ..nbd.wire import StateFlag
from .copystate import CopyState, _retrieve

_ZERO = int(StateFlag.ZERO)
_STORE_KEY = "nbdbackup-restore-progress"  # the bitmap store's "export" key
_BITMAP_NAME = "restore-progress"
META = "restore.json"
FORMAT = "nbdbackup-restore"
VERSION = 1


class ProgressMap:
    """The persistent progress map of one restore (rule 5), in the crash-safe
    bitmap store (`bitmap.store`: memory-mapped, A/B headers).

    Fields: ``nbits``; ``granularity`` (bytes per bit = the restore chunk);
    ``bitmap`` (the store's `DirtyBitmap`; hold it, not its ``bits``, which
    the store may replace), or a plain one when volatile; ``store``
    (`BitmapStore` or None: a volatile map, e.g. a ``memory:`` target);
    ``state_dir``; ``meta`` (the dict kept in ``state_dir/restore.json``:
    format, version, identity, size, chunk size, complete); ``resumed``
    (the map existed: this is a restart); ``recovered`` (the store found the
    map in use when the machine went down and its bits were taken anyway).

    Why an "in-use-dirty after a reboot" map is still trusted (the dirty
    bitmaps call that inconsistent): progress bits only go from 0 to 1 and
    each is set after its data was durable, so any subset of them that
    survived is true; a bit lost is a chunk restored again, and a bit set
    since the last msync covers no acknowledged FLUSH (`make_durable`
    msyncs before a FLUSH is answered).
    """

    def __init__(self, bitmap, store, state_dir: str | None, meta: dict, *, resumed: bool,
                 recovered: bool = False) -> None:
        self.bitmap = bitmap
        self.store = store
        self.state_dir = state_dir
        self.meta = meta
        self.resumed = resumed
        self.recovered = recovered

    @property
    def bits(self) -> Bitmap:
        return self.bitmap.bits

    @property
    def nbits(self) -> int:
        return self.bitmap.nbits

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @classmethod
    def volatile(cls, size: int, granularity: int) -> "ProgressMap":
        from ..bitmap.dirty import DirtyBitmap

        bm = DirtyBitmap(_BITMAP_NAME, size, granularity)
        return cls(bm, None, None, {"size": size, "chunk-size": granularity}, resumed=False)

    @classmethod
    def open(cls, state_dir: str, size: int, granularity: int, identity: str) -> "ProgressMap":
        """Open (or create) the progress map in ``state_dir`` for a restore of
        ``identity`` (a string naming the source and the target; a map made for
        another one is refused with `ConfigError`)."""
        from ..bitmap.dirty import BitmapError, DirtyBitmap
        from ..bitmap.store import BitmapStore

        makedirs_durable(state_dir)  # its entry durable: a restart without the map would restore over the guest's writes
        meta_path = os.path.join(state_dir, META)
        want = {"format": FORMAT, "version": VERSION, "identity": identity, "size": size,
                "chunk-size": granularity, "complete": False}
        meta = None
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            pass
        except ValueError as e:
            raise ConfigError(f"restore state {meta_path} is damaged: {e}") from None
        if meta is not None:
            for k in ("format", "version", "identity", "size", "chunk-size"):
                if meta.get(k) != want[k]:
                    raise ConfigError(f"restore state {state_dir} belongs to another restore "
                                      f"({k}: {meta.get(k)!r}, not {want[k]!r}); give another state "
                                      f"directory or remove it (and start over with a new target)")
        try:
            store = BitmapStore(state_dir)
            found = store.load_all(_STORE_KEY, size)
        except BitmapError as e:
            raise ConfigError(f"restore state {state_dir}: {e}") from None
        bm = next((b for b in found if b.name == _BITMAP_NAME), None)
        recovered = False
        if bm is not None and bm.inconsistent:
            bits = _read_bits_anyway(bm, granularity, size)
            if bits is None:
                store.close_clean(_STORE_KEY)
                raise ConfigError(f"restore state {state_dir}: the progress map is damaged "
                                  f"({bm.inconsistent_reason}); the target cannot be trusted, start over")
            store.remove(_STORE_KEY, bm)
            bm = DirtyBitmap(_BITMAP_NAME, size, granularity, persistent=True, bits=bits)
            store.create(_STORE_KEY, bm)
            recovered = True
        elif bm is not None and bm.granularity != granularity:
            store.close_clean(_STORE_KEY)
            raise ConfigError(f"restore state {state_dir}: progress map granularity {bm.granularity} "
                              f"!= chunk size {granularity}")
        resumed = bm is not None and meta is not None
        if bm is None:
            if meta is not None and meta.get("complete"):
                store.close_clean(_STORE_KEY)
                raise ConfigError(f"restore state {state_dir}: complete but its progress map is gone")
            bm = DirtyBitmap(_BITMAP_NAME, size, granularity, persistent=True)
            store.create(_STORE_KEY, bm)
        if meta is None:
            meta = want
            if bm.bits.any():  # a map without its meta: not ours to trust
                store.close_clean(_STORE_KEY)
                raise ConfigError(f"restore state {state_dir}: progress map without {META}")
            _write_json(meta_path, meta)
        return cls(bm, store, state_dir, meta, resumed=resumed, recovered=recovered)

    def mark(self, start: int, count: int) -> None:
        """Set bits ``[start, start+count)`` (the store makes its header
        in-use-dirty first); durable at the next `sync`."""
        g = self.bitmap.granularity
        off = start * g
        self.bitmap.mark(off, min((start + count) * g, self.bitmap.size) - off)

    def sync(self) -> None:
        """msync: every bit set so far is durable when this returns."""
        if self.store is not None:
            self.store.sync(_STORE_KEY)

    def set_complete(self) -> None:
        self.sync()
        self.meta["complete"] = True
        if self.state_dir is not None:
            _write_json(os.path.join(self.state_dir, META), self.meta)

    def close(self) -> None:
        if self.store is not None:
            self.store.close_clean(_STORE_KEY)
            self.store = None


def _read_bits_anyway(bm, granularity: int, size: int) -> Bitmap | None:
    """The bits of a map the store loaded as inconsistent only because it
    was in use when the machine went down (see `ProgressMap`); None when the
    file is damaged otherwise."""
    from ..bitmap.core import words_for
    from ..bitmap.store import DATA_OFFSET, read_header

    path = getattr(bm, "store_path", None)
    if path is None or not (bm.inconsistent_reason or "").startswith("in use"):
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read()
        h = read_header(raw[:DATA_OFFSET])
    except (OSError, ValueError):
        return None
    if h.granularity != granularity or h.size != size:
        return None
    n = words_for(h.nbits) * 8
    if len(raw) < DATA_OFFSET + n:
        return None
    return Bitmap.from_bytes(h.nbits, raw[DATA_OFFSET:DATA_OFFSET + (h.nbits + 7) // 8])


def _write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


class RestoreState(CopyState):
    """The shared state of one restore; see the module docstring.

    Fields beyond `CopyState`'s: ``progress`` (`ProgressMap`);
    ``foreground`` / ``fg_idle`` (rule 1's priority); ``bytes_fetched``,
    ``bytes_owned``, ``reads_fetched`` (statistics); ``_durable_task``
    (the `make_durable` in progress, which later callers may join only if
    it started after their writes, so each caller runs its own).
    """

    def __init__(self, source: BlockDev, target: BlockDev, cluster_size: int, progress: ProgressMap) -> None:
        super().__init__(source, target, cluster_size, zero_detect=True, offload=False)
        assert progress.nbits == self.nclusters
        self.progress = progress
        self.done.copy_from(progress.bits)
        self.set_pump_todo(Bitmap(self.nclusters, fill=True))
        self.foreground = 0
        self.fg_idle = asyncio.Event()
        self.fg_idle.set()
        self.bytes_fetched = 0
        self.bytes_owned = 0
        self.reads_fetched = 0

    # -- queries -------------------------------------------------------------

    def all_done(self, offset: int, length: int) -> bool:
        first, end = self.clusters_of(offset, length)
        return self.done.all(first, end - first)

    def all_durable(self, offset: int, length: int) -> bool:
        first, end = self.clusters_of(offset, length)
        return self.progress.bits.all(first, end - first)

    @property
    def complete(self) -> bool:
        """Every chunk is done (reads and writes pass straight to the target)."""
        return not self.pump_todo.any() and self.done.all()

    # -- rule 1: on-demand fetch (copy-on-read) ------------------------------

    async def fetch(self, offset: int, length: int) -> None:
        """Make every chunk of ``(offset, length)`` done now, with priority."""
        if self.all_done(offset, length):
            return
        self.foreground += 1
        self.fg_idle.clear()
        try:
            first, end = self.clusters_of(offset, length)
            while True:
                # Synchronously: claim every free chunk (one claim each, so
                # they are fetched in parallel: a repository read is a
                # round trip), note the copies in flight elsewhere.
                mine: list[tuple[int, int]] = []
                claims: list[tuple[int, asyncio.Future]] = []
                theirs: dict[int, asyncio.Future] = {}
                pos = self.done.next_clear(first, end)
                while pos >= 0:
                    fut = self.inflight.get(pos)
                    if fut is not None:
                        theirs[id(fut)] = fut
                    else:
                        got = self.claim(pos, end, 1)
                        assert got is not None and got[0] == pos
                        mine.append(got)
                        claims.append((pos, self.inflight[pos]))
                    pos = self.done.next_clear(pos + 1, end) if pos + 1 < end else -1
                if not mine and not theirs:
                    return
                try:
                    results = await asyncio.gather(*(self.copy(s, n, "cbw") for s, n in mine),
                                                   *(asyncio.shield(f) for f in theirs.values()),
                                                   return_exceptions=True)
                except BaseException:
                    # Cancelled: gather cancelled our copies, and one cancelled
                    # before its first step never ran the code that releases
                    # its claim (hunt 7: the chunk stayed in flight for ever,
                    # every later read or write of it hung).  By now every copy
                    # has ended (gather finishes only then); release what is left.
                    for start, fut in claims:
                        if not fut.done():
                            self.inflight.remove(start, fut)
                            fut.add_done_callback(_retrieve)
                            fut.set_exception(OSError(errno.ECANCELED, "fetch cancelled"))
                    raise
                for r in results[:len(mine)]:
                    if isinstance(r, BaseException):
                        raise r  # our own fetch failed (the chunk is left not done, rule 4)
                for r in results[len(mine):]:
                    if isinstance(r, BaseException) and not isinstance(r, OSError):
                        raise r
                # another copier's failure: loop, and fetch those chunks ourselves
        finally:
            self.foreground -= 1
            if not self.foreground:
                self.fg_idle.set()

    async def copy(self, start: int, count: int, by, *, source_zero: bool = False) -> None:
        await super().copy(start, count, by, source_zero=source_zero)
        if by != "pump":
            self.bytes_fetched += self.span(start, count)[1]

    # -- rule 2: guest writes --------------------------------------------------

    async def begin_write(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Before a guest write to ``(offset, length)``: fill partly covered
        chunks, own the covered ones.  Returns the owned runs; the caller
        MUST call `end_write` with them."""
        first, end = self.clusters_of(offset, length)
        cs = self.cluster_size
        # Chunks entirely covered: [ffirst, fend).
        ffirst = first if offset % cs == 0 else first + 1
        stop = offset + length
        fend = end if stop % cs == 0 or stop == self.size else end - 1
        partial = [c for c in sorted({first, end - 1}) if not (ffirst <= c < fend) and not self.done.get(c)]
        if partial:  # both ends at once
            for r in await asyncio.gather(*(self.fetch(*self.span(c, 1)) for c in partial),
                                          return_exceptions=True):
                if isinstance(r, BaseException):
                    raise r
        owned: list[tuple[int, int]] = []
        pos = ffirst
        try:
            while pos < fend:
                pos = self.done.next_clear(pos, fend)
                if pos < 0:
                    break
                fut = self.inflight.get(pos)
                if fut is not None:
                    try:
                        await asyncio.shield(fut)
                    except OSError:
                        pass  # its owner failed: look again (we may own it)
                    continue
                got = self.claim(pos, fend, 1 << 30)
                assert got is not None and got[0] == pos
                owned.append(got)
                pos = got[0] + got[1]
        except BaseException:
            self.end_write(owned, False)
            raise
        return owned

    def end_write(self, owned: list[tuple[int, int]], ok: bool) -> None:
        """Synchronously: the guest write of `begin_write` succeeded (``ok``):
        its owned chunks are done; else they are released, not done."""
        for start, count in owned:
            fut = self.inflight[start]
            self.inflight.remove(start, fut)
            if ok:
                todo = self._bytes_in(self.pump_todo, start, count)
                self.done.set(start, count)
                self.pump_todo.clear(start, count)
                self.current += todo
                self.bytes_owned += self.span(start, count)[1]
                fut.set_result(None)
            else:
                fut.add_done_callback(_retrieve)
                fut.set_exception(OSError(errno.EIO, "the guest write owning this chunk failed"))

    # -- rule 5: durability ------------------------------------------------------

    def _pending(self) -> list[tuple[int, int]]:
        """Runs done but not yet in ``progress`` (synchronous)."""
        out = []
        prog = self.progress.bits
        for s, n, v in self.done.runs():
            if not v:
                continue
            for s2, n2, v2 in prog.runs(s, s + n):
                if not v2:
                    out.append((s2, n2))
        return out

    async def make_durable(self) -> None:
        """Flush the target, then record (and msync) the progress of every
        chunk that was done when this was called."""
        pend = self._pending()
        await self.target.flush()
        for s, n in pend:
            self.progress.mark(s, n)
        self.progress.sync()

    # -- fresh targets -----------------------------------------------------------

    async def assume_zero_target(self) -> int:
        """The target reads as zeros everywhere (a sparse file just created):
        mark every chunk the source reports as zero done and durable; returns
        how many."""
        marked = 0
        pos, size, cs = 0, self.size, self.cluster_size
        while pos < size:
            try:
                exts = await self.source.extents(pos, min(size - pos, 1 << 30), BASE_ALLOCATION)
            except OSError:
                break
            if not exts:
                break
            for e in exts:
                e_end = min(e.offset + e.length, size)
                if e.flags & _ZERO and e_end > e.offset:
                    f = (e.offset + cs - 1) // cs
                    last = self.nclusters if e_end == size else e_end // cs
                    if last > f:
                        for s, n, v in self.done.runs(f, last):
                            if not v:
                                self.done.set(s, n)
                                self.pump_todo.clear(s, n)
                                marked += n
                pos = max(pos, e_end)
        self.total = self._bytes_set(self.pump_todo)
        if marked:
            await self.make_durable()
        return marked
