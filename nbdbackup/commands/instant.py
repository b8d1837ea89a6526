"""Repository snapshots as exports: instant recovery (``serve NAME=restore:...``, QMP
``restore-start``) and read-only snapshots (``serve NAME=repo:REPO#SNAPSHOT``).

Role: the edge between the user and the restore engine
(`backup.restorejob`): parse the arguments, open the repository (through
`repoargs`, the one seam), the snapshot (`agent.snapsource.SnapshotSource`)
and the target, build the `RestoreDev`, publish it as a writable export
(through the bitmap manager's `LiveDev`, so dirty bitmaps and backups work
on it), register and start the `RestoreJob`.

SPEC::

    restore:REPO#SNAPSHOT,target=TARGET[,state=DIR][,job=ID][,speed=BYTES/S]
            [,workers=N][,on-error=report|ignore|stop|enospc][,bitmap=NAME]

- TARGET: a SPEC (`blockdev.open_spec`): a raw file (created sparse with the
  snapshot's size when missing), a block device, ``memory:SIZE`` or an NBD URI.
- state: where the persistent progress map lives; default ``TARGET.restore``
  next to a file target; a ``memory:`` target has a volatile one; an NBD
  target needs ``state=``.  Restarting with the same target and state goes on
  where the restore stopped (`backup.restorestate.ProgressMap`).
- job: the job id (default ``restore-NAME``); speed: the job's limit.
- bitmap: add a dirty bitmap NAME (persistent under ``--state-dir``) when the
  restore starts (not on a restart: it exists), before any guest write: it
  then records exactly what the guest changed relative to the snapshot, so
  ``pull --repo R --base SNAPSHOT --bitmap NAME`` is a correct first
  incremental after the restore.

``repo:REPO#SNAPSHOT`` (`add_repo_spec`) serves the snapshot itself,
read-only, straight from the repository (`agent.snapsource.ServedSnapshot`:
chunks checked and cached as read; a damaged one fails its reads with EIO),
with the repository's shared lock (a lease on S3) held while it is exported,
so ``repo delete/prune/gc`` refuse meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
from typing import Any

from ..errors import ConfigError

log = logging.getLogger("nbdbackup.instant")

PREFIX = "restore:"
_KEYS = ("target", "state", "job", "speed", "workers", "on-error", "bitmap")


def parse_restore_spec(spec: str) -> dict[str, str]:
    """``{"repo", "snapshot", "target", ...}`` from a ``restore:`` SPEC."""
    assert spec.startswith(PREFIX)
    body = spec[len(PREFIX):]
    repo, sep, rest = body.rpartition("#")
    if not sep or not repo:
        raise ConfigError(f"bad restore SPEC {spec!r}: expected restore:REPO#SNAPSHOT,target=SPEC")
    parts = rest.split(",")
    out = {"repo": repo, "snapshot": parts[0]}
    for p in parts[1:]:
        k, eq, v = p.partition("=")
        if not eq or k not in _KEYS:
            raise ConfigError(f"bad restore option {p!r}: expected one of {', '.join(k + '=' for k in _KEYS)}")
        if k in out:
            raise ConfigError(f"restore option {k!r} given twice")
        out[k] = v
    if not out["snapshot"]:
        raise ConfigError(f"bad restore SPEC {spec!r}: no snapshot name after '#'")
    if "target" not in out or not out["target"]:
        raise ConfigError(f"restore SPEC {spec!r} needs target=SPEC")
    return out


def _int(name: str, text: Any) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    from ..blockdev import parse_size

    try:
        return parse_size(str(text))
    except ConfigError:
        raise ConfigError(f"restore option {name}: bad number {text!r}") from None


def manifest_identity(man) -> str:
    h = hashlib.sha256()
    h.update(f"{man.size}:{man.chunk_size}:".encode())
    h.update(man.packed())  # (the ids in order: one call, not one per chunk)
    return h.hexdigest()


async def add_restore_export(app: Any, name: str, *, repo: str, snapshot: str, target: str,
                             state: str | None = None, job: str | None = None, speed: Any = 0,
                             workers: Any = 4, on_error: str = "report", bitmap: str | None = None,
                             description: str = "", args: argparse.Namespace | None = None,
                             auto_dismiss: bool = False) -> Any:
    """Publish export ``name`` restoring ``repo#snapshot`` onto ``target``; start
    and return its `RestoreJob`.  Everything is validated before anything is
    published; on failure nothing stays open.  When the state directory says
    this restore completed already, the target is published as a plain live
    export (no repository needed) and None is returned."""
    from ..blockdev import is_nbd_uri
    from ..daemon import check_description

    if name in app.server.exports:
        raise ConfigError(f"export {name!r} already exists")
    check_description(name, description)
    job_id = job or f"restore-{name}"
    if job_id in app.engine.jobs:
        raise ConfigError(f"a job with id {job_id!r} already exists")
    speed = _int("speed", speed)
    workers = _int("workers", workers)
    if not 1 <= workers <= 64:
        raise ConfigError("restore option workers must be in [1, 64]")
    on_error = "report" if on_error == "auto" else on_error
    if on_error not in ("report", "ignore", "stop", "enospc"):
        raise ConfigError(f"bad restore on-error {on_error!r}")
    memory = target.startswith("memory:")
    nbd = is_nbd_uri(target)
    if state is None:
        if nbd:
            raise ConfigError("an NBD restore target needs state=DIR (where the progress map lives)")
        if not memory:
            state = os.path.abspath(target) + ".restore"
    if memory and state is not None:
        raise ConfigError("a memory: restore target cannot have state= (it does not outlive the server)")
    existed = memory is False and (nbd or os.path.lexists(target))
    if not existed and state is not None and os.path.exists(os.path.join(state, "restore.json")):
        raise ConfigError(f"restore target {target} is missing but its restore state {state} exists: "
                          f"remove the state directory to start over")
    ident_target = target if (nbd or memory) else os.path.realpath(target)
    if state is not None and _completed(state, repo, snapshot, ident_target):
        # Restored already: the target is all there is (the repository is not even opened).
        from ..daemon import add_export

        await add_export(app, name, target, False, description)
        log.info("export %r: the restore of %s#%s onto %s completed before; serving the target",
                 name, repo, snapshot, target)
        return None
    store, rep, man, release = _open_locked(args, repo, snapshot)
    try:
        return await _publish(app, name, store, rep, man, repo=repo, snapshot=snapshot, target=target,
                              state=state, job_id=job_id, speed=speed, workers=workers, on_error=on_error,
                              bitmap=bitmap, description=description, auto_dismiss=auto_dismiss,
                              existed=existed, memory=memory, nbd=nbd, ident_target=ident_target,
                              release=release)
    except BaseException:
        release()
        raise


def _open_locked(args: argparse.Namespace | None, repo: str, snapshot: str):
    """``(store, repository, manifest, release)``: ``snapshot`` loaded under the
    repository's shared lock (a lease on S3), held while its chunks may still be
    read -- `repo delete/prune/gc` refuse meanwhile, as during a pull -- until
    ``release()``."""
    from .repoargs import open_repo

    store, rep = open_repo(args if args is not None else argparse.Namespace(), repo)
    lock = contextlib.ExitStack()
    lock.enter_context(store.lock(False))
    try:
        return store, rep, rep.load_snapshot(snapshot), lock.close
    except BaseException:
        lock.close()
        raise


async def _publish(app: Any, name: str, store, rep, man, *, repo: str, snapshot: str, target: str,
                   state: str | None, job_id: str, speed: int, workers: int, on_error: str,
                   bitmap: str | None, description: str, auto_dismiss: bool, existed: bool, memory: bool,
                   nbd: bool, ident_target: str, release) -> Any:
    from ..agent.snapsource import SnapshotSource
    from ..backup.restorejob import RestoreJob, build_restore, register_job
    from ..blockdev import open_spec
    from ..daemon import wrap_live

    source = SnapshotSource(rep, man)
    tdev = None
    dev = None
    try:
        tdev = await open_spec(target, create_size=None if existed else man.size, replay=True)
        identity = f"{store.root}#{snapshot}@{manifest_identity(man)} -> {ident_target}"
        dev = await build_restore(source, tdev, cluster_size=man.chunk_size, state_dir=state,
                                  identity=identity, fresh_target=not existed)
        resumed = dev.state.progress.resumed
        live = None
        try:
            live = wrap_live(dev, False, name, app.bitmaps)
            if bitmap is not None and app.bitmaps is not None:
                reg = app.bitmaps.lookup(name)
                if reg is not None and bitmap not in reg:
                    if resumed:
                        log.warning("export %r: dirty bitmap %r missing on restart; adding it now "
                                    "(it misses the guest writes made before)", name, bitmap)
                    reg.add(bitmap, persistent=reg.store is not None)
            rjob = RestoreJob(job_id, device=name, dev=dev, emit=app.engine.emit, speed=speed,
                              max_workers=workers, on_source_error=on_error, on_target_error=on_error,
                              auto_dismiss=auto_dismiss)
            # the repository lock goes when nothing can read it any more
            rjob.on_end = lambda ok: release() if ok and dev.state.complete else None
            dev.on_close.append(release)
            register_job(app.engine, rjob)
            try:
                app.server.add_export(name, live, read_only=False, description=description)
            except BaseException:
                app.engine.jobs.pop(job_id, None)
                raise
        except BaseException:
            await (live if live is not None else dev).close()
            raise
    except BaseException:
        if dev is None:
            await source.close()
            if tdev is not None:
                await tdev.close()
            if not existed and not memory and not nbd and tdev is not None:
                _unlink_quietly(target)
        raise
    app.specs[name] = f"restore:{repo}#{snapshot},target={target}"
    if resumed:
        st = dev.state
        log.info("export %r: resuming the restore of %s#%s: %d of %d chunks already restored%s", name, repo,
                 snapshot, st.done.count(), st.nclusters,
                 " (progress map recovered after a machine crash)" if st.progress.recovered else "")
    rjob.start()
    return rjob


def _completed(state: str, repo: str, snapshot: str, ident_target: str) -> bool:
    """The state directory records a COMPLETE restore of ``repo#snapshot``
    onto this target.  The repository is not opened: its root is compared
    as its store spells it (`DirStore`: the absolute path; S3: the URL
    without trailing slashes).  A spelling that does not match (say, an S3
    prefix written another way) only means the repository is opened and the
    state's full identity compared (`ProgressMap.open`): a restore of the
    same snapshot name from ANOTHER repository is refused there, never
    served as complete (hunt 4)."""
    import json

    from ..backup.restorestate import META

    try:
        with open(os.path.join(state, META), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    ident = meta.get("identity", "") if isinstance(meta, dict) else ""
    root = repo.rstrip("/") if repo.startswith("s3://") else os.path.abspath(repo)
    return (meta.get("complete") is True and isinstance(ident, str) and ident.startswith(f"{root}#{snapshot}@")
            and ident.endswith(f" -> {ident_target}"))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


async def add_restore_spec(app: Any, name: str, spec: str, read_only: bool = False,
                           description: str = "") -> Any:
    """`daemon.add_export` for a ``restore:`` SPEC (CLI ``NAME=restore:...``, block-export-add)."""
    if read_only:
        raise ConfigError(f"export {name!r}: a restoring export is writable (drop ro: / --read-only)")
    o = parse_restore_spec(spec)
    return await add_restore_export(app, name, repo=o["repo"], snapshot=o["snapshot"], target=o["target"],
                                    state=o.get("state"), job=o.get("job"), speed=o.get("speed", 0),
                                    workers=o.get("workers", 4), on_error=o.get("on-error", "report"),
                                    bitmap=o.get("bitmap"), description=description,
                                    args=getattr(app, "args", None))


REPO_PREFIX = "repo:"


async def add_repo_spec(app: Any, name: str, spec: str, read_only: bool = True,
                        description: str = "") -> None:
    """`daemon.add_export` for a ``repo:REPO#SNAPSHOT`` SPEC: the snapshot as a
    read-only export (``read_only`` is implied)."""
    from ..agent.repo import check_name
    from ..agent.snapsource import ServedSnapshot
    from ..daemon import check_description

    assert spec.startswith(REPO_PREFIX)
    repo, sep, snapshot = spec[len(REPO_PREFIX):].rpartition("#")
    if not sep or not repo or not snapshot:
        raise ConfigError(f"bad repository SPEC {spec!r}: expected repo:REPO#SNAPSHOT")
    if name in app.server.exports:
        raise ConfigError(f"export {name!r} already exists")
    check_description(name, description)
    check_name(snapshot)
    _, rep, man, release = _open_locked(getattr(app, "args", None), repo, snapshot)
    try:
        dev = ServedSnapshot(rep, man, on_close=[release])
    except BaseException:
        release()
        raise
    try:
        app.server.add_export(name, dev, read_only=True, description=description)
    except BaseException:
        await dev.close()
        raise
    app.specs[name] = spec
    log.info("export %r: snapshot %s of %s, read-only (%d bytes, %d chunks of %d)", name, snapshot,
             repo, man.size, man.count, man.chunk_size)


RESTORE_START_ARGS = {
    "export": "STR", "repo": "STR", "snapshot": "STR", "target": "STR", "*job-id": "STR", "*state": "STR",
    "*speed": "UINT64", "*max-workers": "UINT64", "*on-source-error": "ERROR_POLICY",
    "*bitmap": "STR", "*description": "STR", "*auto-dismiss": "BOOL",
}


def register_restore_commands(qmp: Any, app: Any) -> None:
    """QMP ``restore-start`` {export, repo, snapshot, target, *job-id, *state,
    *speed, *max-workers, *on-source-error, *bitmap, *description,
    *auto-dismiss}: the same as ``serve NAME=restore:...``; returns {}."""
    from ..control import schema

    types = {"STR": schema.STR, "UINT64": schema.UINT64, "BOOL": schema.BOOL,
             "ERROR_POLICY": schema.ERROR_POLICY}
    args = schema.struct({k: types[v] for k, v in RESTORE_START_ARGS.items()})

    async def restore_start(export: str, repo: str, snapshot: str, target: str, job_id: str | None = None,
                            state: str | None = None, speed: int = 0, max_workers: int = 4,
                            on_source_error: str = "report", bitmap: str | None = None,
                            description: str = "", auto_dismiss: bool = False) -> dict:
        await add_restore_export(app, export, repo=repo, snapshot=snapshot, target=target, state=state,
                                 job=job_id, speed=speed, workers=max_workers, on_error=on_source_error,
                                 bitmap=bitmap, description=description, args=getattr(app, "args", None),
                                 auto_dismiss=auto_dismiss)
        return {}

    qmp.register("restore-start", restore_start, args=args)
