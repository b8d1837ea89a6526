"""The dirty bitmaps of a running server: per-export registries, QMP commands, ``transaction``.

Role: `BitmapManager` owns one `BitmapRegistry` per writable export (backed
by the `BitmapStore` of ``--state-dir`` when the export's disk is a file),
builds the export's `hook.BitmapLiveDev`, answers the ``block-dirty-bitmap-*``
and ``query-bitmaps`` commands (QEMU's names, ``export`` where QEMU says
``node``) and runs ``transaction``.  `BitmapManager.check_backup` (used by
the daemon's backup-start and by transaction) refuses an inconsistent bitmap
early, with a message that says to take a full backup (the sync x bitmap x
bitmap-mode rules are the engine's).

Fields of `BitmapManager` (asyncio loop only):
- ``store``: the `BitmapStore`, or None without ``--state-dir``;
- ``registries``: export name -> `BitmapRegistry` of every open writable
  export (removed when the export's device closes);
- ``persistable``: export name -> why its bitmaps cannot be persistent
  (None when they can), decided when the export opened;
- ``engine``: the backup `Engine` (set by the daemon; transaction needs it).

Transaction (``actions`` in order; QEMU's three phases):

1. *prepare* (may await): every ``backup-start`` runs
   `Engine.prepare_backup` (checks, opens the target, job in state created);
   bitmap actions are checked against the registries as they will be
   (an ``add`` earlier in the list counts).  Any error: abort every prepared
   backup; nothing else has changed.
   Then the exports are quiesced (writes held, the ones in flight finished),
   and every export that has or gets a persistent bitmap is flushed, once
   before the quiesce and once inside it (`_durable_point_lives`): the point
   in time is durable, so a bitmap counting from it stays complete across a
   power loss.
2. *commit* (synchronous, NO ``await``): bitmap actions are applied and the
   backups committed (bitmap frozen, copy-before-write attached) in action
   order.  With no await, no NBD request runs in between, so every action
   sees the same point in time across all exports.  If one raises, the
   earlier ones are undone (bitmap actions through their undo records in
   reverse order, backups through `PreparedBackup.abort`) and the error is
   returned: all or nothing.  ``block-dirty-bitmap-remove`` is applied last
   (after every other commit) because deleting a persistent bitmap's file
   cannot be undone.
3. *start* (awaits): every committed backup computes its work, publishes
   its snapshot export and starts.

``completion-mode: grouped``: each job's conclusion callback (the engine's
``job.on_end``, which ends the dirty-bitmap lease) is wrapped so that it
waits until every job of the group concluded, and the lease ends with
success only if ALL jobs succeeded; the first failure cancels the other
jobs still running.  So the bitmaps of a group are committed (abdicated)
only if every job succeeded, and otherwise reclaimed: no dirty bit is lost.
(A job that had already reached ``pending`` keeps its own status "success";
only its bitmap is kept, as the group failed.)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import Any, Callable

from ..blockdev.base import BlockDev, FilterDev
from ..errors import ConfigError
from .dirty import BitmapError, BitmapRegistry, DirtyBitmap, check_granularity, check_name
from .hook import BitmapLiveDev

log = logging.getLogger("nbdbackup.bitmap")

__all__ = ["BitmapManager", "register_commands"]


def _innermost(dev: BlockDev) -> BlockDev:
    while isinstance(dev, FilterDev):
        dev = dev.inner
    return dev


class _Group:
    """A ``grouped`` transaction's jobs.  Fields: ``jobs`` (id -> job);
    ``pending`` (ids not yet concluded); ``ok`` (no job failed so far);
    ``done`` (set when ``pending`` is empty)."""

    def __init__(self) -> None:
        self.jobs: dict[str, Any] = {}
        self.pending: set[str] = set()
        self.ok = True
        self.done = asyncio.Event()

    def add(self, job: Any) -> None:
        orig: Callable[[bool], Any] | None = job.on_end
        self.jobs[job.id] = job
        self.pending.add(job.id)

        async def on_end(success: bool) -> None:
            if not success and self.ok:
                self.ok = False
                for other in self.jobs.values():
                    if other is not job and other.id in self.pending:
                        try:
                            other.cancel()
                        except Exception:  # already pending/concluding: it ends anyway
                            pass
            self._conclude(job.id)
            await self.done.wait()
            if orig is not None:
                r = orig(success and self.ok)
                if inspect.isawaitable(r):
                    await r

        job.on_end = on_end

    def drop(self, job_id: str) -> None:
        """A job that will never run (aborted before start) leaves the group as a failure."""
        if job_id in self.pending:
            self.ok = False
            self._conclude(job_id)

    def _conclude(self, job_id: str) -> None:
        self.pending.discard(job_id)
        if not self.pending:
            self.done.set()


class BitmapManager:
    """Dirty bitmaps of every writable export (see the module docstring)."""

    def __init__(self, state_dir: str | None = None) -> None:
        self.store = None
        if state_dir:
            from .store import BitmapStore

            self.store = BitmapStore(state_dir)
        self.registries: dict[str, BitmapRegistry] = {}
        self.persistable: dict[str, str | None] = {}
        #: export name -> its BitmapLiveDev (to recall worker connections
        #: before a first bitmap is added: blockdev.live "External writers").
        self.lives: dict[str, BitmapLiveDev] = {}
        self.engine: Any = None

    # -- exports --------------------------------------------------------------

    def lookup(self, export: str) -> BitmapRegistry | None:
        """The export's registry, or None (read-only or unknown export)."""
        return self.registries.get(export)

    def wrap(self, name: str, dev: BlockDev) -> BitmapLiveDev:
        """The live device of new writable export NAME over ``dev``: a registry
        (persistent bitmaps of a file export load now) and the dirty hook."""
        if name in self.registries:
            raise ConfigError(f"export {name!r} already has dirty bitmaps loaded")
        from ..blockdev.file import FileDev

        inner = _innermost(dev)
        why: str | None = None
        if self.store is None:
            why = "the server has no --state-dir"
        elif not isinstance(inner, FileDev):
            why = f"its disk is not a file ({type(inner).__name__})"
        store = self.store if why is None else None
        try:
            reg = BitmapRegistry(name, dev.size, store)
        except BitmapError as e:
            raise ConfigError(f"export {name!r}: cannot load its dirty bitmaps: {e}") from e
        except OSError as e:
            raise ConfigError(f"export {name!r}: cannot load its dirty bitmaps from "
                              f"{self.store.root}: {e.strerror or e}") from e
        for bm in reg:
            if bm.inconsistent:
                log.warning("export %r: bitmap %r loaded as inconsistent (%s); it can only be removed",
                            name, bm.name, bm.inconsistent_reason)
        self.registries[name] = reg
        self.persistable[name] = why

        def forget() -> None:
            if self.registries.get(name) is reg:
                del self.registries[name]
                self.persistable.pop(name, None)
                self.lives.pop(name, None)

        live = self.lives[name] = BitmapLiveDev(dev, reg, on_close=forget)
        return live

    def check_removable(self, export: str) -> None:
        """block-export-del: refuse while the export has bitmaps that would be lost.

        Persistent bitmaps survive (their files are closed cleanly and load
        again when the export is added back); busy or non-persistent ones
        would be lost silently, so they must be removed first."""
        reg = self.registries.get(export)
        if reg is None:
            return
        for bm in reg:
            if bm.busy:
                raise ConfigError(f"export {export!r} has bitmap {bm.name!r} in use by a job")
        volatile = [bm.name for bm in reg if not bm.persistent]
        if volatile:
            raise ConfigError(f"export {export!r} has non-persistent dirty bitmaps "
                              f"({', '.join(volatile)}) that removing it would lose; "
                              f"remove them first (block-dirty-bitmap-remove)")

    def close_all(self) -> None:
        """Clean close of every registry (normally done by each device's close)."""
        for reg in list(self.registries.values()):
            reg.close()

    def check_backup(self, export: str, sync: str, bitmap: str | None, bitmap_mode: str | None) -> None:
        """Refusal a backup-start gets before the engine prepares anything: an
        inconsistent bitmap (a possibly incomplete one is never used: take a
        full backup).  The sync x bitmap x bitmap-mode rules are the engine's."""
        reg = self.registries.get(export)
        if bitmap is not None and reg is not None and bitmap in reg and reg.get(bitmap).inconsistent:
            bm = reg.get(bitmap)
            why = f" ({bm.inconsistent_reason})" if bm.inconsistent_reason else ""
            raise BitmapError(
                f"Bitmap '{bitmap}' is inconsistent{why}: it may miss writes, so no backup can use it; "
                f"remove it, add a new bitmap and take a full backup")

    def durable_point(self, export: str, bitmap: str | None) -> bool:
        """Whether a backup of ``export`` using ``bitmap`` needs its point in time durable
        (the disk flushed while its writes are held, `Engine.backup_start`): the bitmap is
        persistent, so what it will count from that instant must survive a power loss
        (`_durable_point_lives`)."""
        reg = self.registries.get(export)
        return (bitmap is not None and reg is not None and bitmap in reg
                and reg.get(bitmap).persistent and export in self.lives)

    def _registry(self, export: str) -> BitmapRegistry:
        reg = self.registries.get(export)
        if reg is None:
            if self.engine is not None and self.engine.exports.get(export) is not None:
                raise BitmapError(f"export '{export}' is read-only: it has no dirty bitmaps")
            raise BitmapError(f"Cannot find export '{export}'")
        return reg

    # -- commands ---------------------------------------------------------------

    def _check_add(self, export: str, name: str, granularity: int | None, persistent: bool,
                   pending: set[str] = frozenset()) -> BitmapRegistry:
        reg = self._registry(export)
        check_name(name)
        if name in reg or (export, name) in pending:
            raise BitmapError(f"Bitmap already exists: {name}")
        if granularity is not None:
            check_granularity(granularity)
        if persistent and self.persistable.get(export):
            raise BitmapError(f"Cannot add persistent bitmap '{name}' to export '{export}': "
                              f"{self.persistable[export]}")
        return reg

    def _quiet(self, export: str):
        """Context for a bitmap change of ``export``: its LiveDev quiesced,
        which recalls its worker connections (they check the bitmaps' files
        themselves: `hook` docstring) and keeps new ones from going out until
        the change is done; and no write of this process straddles it."""
        live = self.lives.get(export)
        return live.quiesce() if live is not None else contextlib.nullcontext()

    async def add(self, export: str, name: str, granularity: int | None = None,
                  persistent: bool = False, disabled: bool = False) -> dict:
        self._check_add(export, name, granularity, persistent)
        live = self.lives.get(export) if persistent else None
        if live is not None:  # the point in time durable (`_durable_point_lives`)
            await live.flush()
        async with self._quiet(export):
            if live is not None:
                await live.flush()
            # Checked again: the quiesce awaited.
            reg = self._check_add(export, name, granularity, persistent)
            reg.add(name, granularity, persistent=persistent, disabled=disabled)
        return {}

    async def remove(self, export: str, name: str) -> dict:
        self._registry(export).get(name)
        async with self._quiet(export):
            self._registry(export).remove(name)
        return {}

    async def clear(self, export: str, name: str) -> dict:
        live = self.lives.get(export) if self._registry(export).get(name).persistent else None
        if live is not None:  # the point in time durable (`_durable_point_lives`)
            await live.flush()
        async with self._quiet(export):
            if live is not None:
                await live.flush()
            self._registry(export).clear(name)
        return {}

    async def enable(self, export: str, name: str) -> dict:
        self._registry(export).get(name)
        async with self._quiet(export):
            self._registry(export).enable(name)
        return {}

    async def disable(self, export: str, name: str) -> dict:
        self._registry(export).get(name)
        async with self._quiet(export):
            self._registry(export).disable(name)
        return {}

    async def merge(self, export: str, target: str, bitmaps: list) -> dict:
        self._registry(export).get(target)
        async with self._quiet(export):
            reg = self._registry(export)
            # QMP allows {node, name} sources; this server's schema takes names (same export).
            reg.merge(target, [b if isinstance(b, str) else b["name"] for b in bitmaps])
        return {}

    async def query(self, export: str) -> list:
        return [bm.info() for bm in self._registry(export)]

    # -- transaction --------------------------------------------------------------

    async def transaction(self, actions: list, properties: dict | None = None) -> dict:
        """QMP ``transaction`` (module docstring: prepare, commit, start)."""
        props = properties or {}
        grouped = props.get("completion-mode", props.get("completion_mode", "individual")) == "grouped"
        engine = self.engine
        steps: list[tuple[str, dict, Any]] = []  # (type, data, prepared backup or None)
        added: set[tuple[str, str]] = set()
        try:
            # 1. prepare
            for i, act in enumerate(actions):
                kind, data = act["type"], dict(act.get("data") or {})
                try:
                    prepared = await self._prepare(kind, data, added)
                except Exception as e:
                    raise type(e)(f"transaction action {i} ({kind}): {e}") if isinstance(
                        e, (ConfigError, BitmapError)) else e
                steps.append((kind, data, prepared))
        except BaseException:
            for _, _, p in steps:
                if p is not None:
                    await p.abort()
            raise
        # 2. commit: no await from here to the end of the loop, and no write
        # straddling it on the exports backed up (blockdev.live, "Quiescing").
        from ..blockdev.live import quiesce_all

        try:
            # Exports with a bitmap action are quiesced too: that recalls
            # their worker connections (blockdev.live "External writers",
            # "Delegable hooks": they check the bitmaps' files themselves).
            lives = [p.job.live for _, _, p in steps if p is not None and p.job.live is not None]
            lives += [self.lives[d["export"]] for k, d, _ in steps
                      if k.startswith("block-dirty-bitmap-") and d.get("export") in self.lives]
            durable = self._durable_point_lives(steps)
            for live in durable:  # most of the dirty page cache, before writes are held
                await live.flush()
            quiesced = quiesce_all(lives)
            await quiesced.__aenter__()
        except BaseException:  # writes in flight never finished: nothing was committed
            for _, _, p in steps:
                if p is not None:
                    await p.abort()
            raise
        try:
            try:
                for live in durable:  # the point in time durable (`_durable_point_lives`)
                    await live.flush()
            except BaseException:
                for _, _, p in steps:
                    if p is not None:
                        await p.abort()
                raise
            undo: list[Callable[[], None]] = []
            removals: list[tuple[str, str]] = []
            failed: BaseException | None = None
            for i, (kind, data, prepared) in enumerate(steps):
                try:
                    if prepared is not None:
                        prepared.commit()
                    elif kind == "block-dirty-bitmap-remove":
                        removals.append((data["export"], data["name"]))
                    else:
                        u = self._apply(kind, data)
                        if u is not None:
                            undo.append(u)
                except Exception as e:
                    failed = e
                    fail_msg = f"transaction action {i} ({kind}): {e}"
                    break
            if failed is None:
                try:
                    for export, name in removals:
                        if self._registry(export).get(name).busy:  # inconsistent ones may be removed
                            raise BitmapError(f"Bitmap '{name}' is currently in use by another operation "
                                              f"and cannot be used")
                except Exception as e:
                    failed, fail_msg = e, f"transaction: block-dirty-bitmap-remove: {e}"
            if failed is not None:
                for u in reversed(undo):
                    try:
                        u()
                    except Exception:
                        log.exception("transaction rollback step failed")
                for _, _, p in steps:
                    if p is not None:
                        await p.abort()
                if isinstance(failed, (ConfigError, BitmapError)):
                    raise type(failed)(fail_msg) from failed
                raise failed
            for export, name in removals:
                self._registry(export).remove(name)
        finally:
            await quiesced.__aexit__(None, None, None)
        # 3. start
        backups = [p for _, _, p in steps if p is not None]
        group = _Group() if grouped and backups else None
        if group is not None:
            for p in backups:
                group.add(p.job)
        for n, p in enumerate(backups):
            try:
                await p.start()
            except BaseException:
                # This one and the ones not started never run; started ones are cancelled.
                for q in backups[n:]:
                    await q.abort()
                    if group is not None:
                        group.drop(q.job.id)
                for q in backups[:n]:
                    try:
                        engine.job_cancel(q.job.id)
                    except Exception:
                        pass
                raise
        return {}

    def _durable_point_lives(self, steps: list[tuple[str, dict, Any]]) -> list[BitmapLiveDev]:
        """The live devices to flush (quiesced) before a transaction's point in time T.

        A persistent bitmap added or cleared at T, and a persistent bitmap a backup at T
        freezes (its successor counts from T), claim: "what changed since the disk was as
        it is at T".  After a power loss that claim is only true if the disk's content at
        T was durable: a write made before T and never flushed may be lost, which changes
        the disk back, and no bitmap counts that change -- a bitmap that loads consistent
        (nothing marked since T, or a FLUSH since) then under-reports against the
        snapshot taken at T (tests/interop/test_powercut_agent.py).  So every export of
        the transaction that has a persistent bitmap (or gets one) is flushed once before
        the writes are held (most of the page cache) and once after (the rest)."""
        out: dict[str, BitmapLiveDev] = {}
        for kind, data, _ in steps:
            export = data.get("export")
            live = self.lives.get(export)
            reg = self.registries.get(export)
            if live is None or reg is None or export in out:
                continue
            if ((kind == "block-dirty-bitmap-add" and data.get("persistent"))
                    or any(bm.persistent and not bm.inconsistent for bm in reg)):
                out[export] = live
        return list(out.values())

    async def _prepare(self, kind: str, data: dict, added: set) -> Any:
        """Phase 1 of one action: a PreparedBackup for backup-start, else None (checked)."""
        if kind == "abort":
            raise ConfigError("Transaction aborted using Abort action")
        if kind == "backup-start":
            if self.engine is None:
                raise ConfigError("backups are not available")
            kw = {k.replace("-", "_"): v for k, v in data.items()}
            self.check_backup(kw.get("export"), kw.get("sync"), kw.get("bitmap"), kw.get("bitmap_mode"))
            return await self.engine.prepare_backup(kw.pop("export"), kw.pop("job_id"),
                                                    kw.pop("sync"), kw.pop("target"), **kw)
        export = data["export"]
        if kind == "block-dirty-bitmap-add":
            self._check_add(export, data["name"], data.get("granularity"),
                            bool(data.get("persistent", False)), added)
            added.add((export, data["name"]))
            return None
        reg = self._registry(export)
        names = [data["target"], *data["bitmaps"]] if kind == "block-dirty-bitmap-merge" else [data["name"]]
        for n in names:
            if (export, n) not in added:
                reg.get(n)
        return None

    def _apply(self, kind: str, data: dict) -> Callable[[], None] | None:
        """Phase 2 of one bitmap action (synchronous); returns its undo."""
        export = data["export"]
        reg = self._registry(export)
        if kind == "block-dirty-bitmap-add":
            name = data["name"]
            reg.add(name, data.get("granularity"), persistent=bool(data.get("persistent", False)),
                    disabled=bool(data.get("disabled", False)))
            return lambda: reg.remove(name)
        if kind in ("block-dirty-bitmap-enable", "block-dirty-bitmap-disable"):
            name = data["name"]
            was = reg.get(name)._recording
            (reg.enable if kind.endswith("enable") else reg.disable)(name)
            return lambda: (reg.enable if was else reg.disable)(name)
        if kind in ("block-dirty-bitmap-clear", "block-dirty-bitmap-merge"):
            name = data["name"] if kind.endswith("clear") else data["target"]
            bm = reg.get(name)
            bm._require_usable()
            saved = bm.bits.copy()
            if kind.endswith("clear"):
                reg.clear(name)
            else:
                reg.merge(name, data["bitmaps"])

            def restore() -> None:
                cur = reg.get(name)
                reg.clear(name)
                cur.merge(DirtyBitmap(name, cur.size, cur.granularity, recording=False, bits=saved))

            return restore
        raise ConfigError(f"unknown transaction action {kind!r}")


def register_commands(qmp: Any, manager: BitmapManager) -> None:
    """``block-dirty-bitmap-{add,remove,clear,enable,disable,merge}``,
    ``query-bitmaps``, ``transaction`` (schemas: `control.schema.COMMANDS`)."""
    qmp.register("block-dirty-bitmap-add", manager.add)
    qmp.register("block-dirty-bitmap-remove", manager.remove)
    qmp.register("block-dirty-bitmap-clear", manager.clear)
    qmp.register("block-dirty-bitmap-enable", manager.enable)
    qmp.register("block-dirty-bitmap-disable", manager.disable)
    qmp.register("block-dirty-bitmap-merge", manager.merge)
    qmp.register("query-bitmaps", manager.query)
    qmp.register("transaction", manager.transaction)
