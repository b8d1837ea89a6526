"""The backup engine: the control-plane face of `nbdbackup.backup`.

Role: `Engine` validates backup requests at the edge (raising `ConfigError`
with a message a user can act on), builds `BackupJob`s over the server's
exports, publishes their snapshot exports and answers the job commands.
`register_commands` maps QMP command names and kebab-case arguments onto it.

`backup_start` order (why it is safe), in three phases so that a
``transaction`` can run phase 2 of several backups (and bitmap commands) with
no ``await`` in between, i.e. at one point in time:

- `Engine.prepare_backup`: (1) validate everything that can be validated
  without I/O; (2) open the target (created sparse, with the source's size,
  when missing) and check it; build the job (status created).
- `PreparedBackup.commit` (synchronous): (3) freeze the dirty bitmap, if any,
  and attach copy-before-write to the live device -- the point in time of
  the backup is this instant: every later live write first saves old content.
- `PreparedBackup.start`: (4) compute ``pump_todo`` (full: all clusters;
  top: allocated in the source's top layer; incremental/bitmap: the frozen
  dirty bitmap; none: nothing), which may await extents queries -- clusters
  CBW copied meanwhile are done already and left out; (5) publish the
  snapshot export; (6) start the job.
`PreparedBackup.abort` undoes any of this before the job runs; `backup_start`
does all three and aborts on any failure, then returns ``{}``.

The export table (`ExportTable`) is the server's: ``get(name)`` returns an
export-like object with ``.dev`` (a `LiveDev` when writable) and
``.read_only`` (or None when unknown); ``add(name, dev, read_only=True,
description=...)``; ``async remove(name)``.  `MemoryExportTable` is a simple
implementation for tests.

The scratch (``scratch=``, see docs/scratch.md and `copystate` rules 1,
7-10): top, incremental and bitmap jobs save copy-before-write copies of
clusters outside their sync set in a scratch device, so the target holds
exactly the sync set.  Default: a sparse temporary file in ``scratch_dir``
(the server's state directory), else beside a file target, else in the
system's temporary directory -- or ``memory:`` when the target is given as
an open `BlockDev` or a ``memory:`` spec; a scratch file the engine created
is removed at dismiss.  ``sync=full`` has no scratch (every cluster is in
the set); for ``sync=none`` (fleecing) the target IS the scratch.

Dirty bitmaps (sync incremental/bitmap, ``bitmap=``) need a `BitmapSource`
(`bitmaps.RegistryBitmapSource` over the server's per-export
`BitmapRegistry`s); without one those requests are refused.
"""

from __future__ import annotations

import errno
import fcntl
import inspect
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from ..bitmap.core import Bitmap
from ..blockdev.base import ALLOCATION_DEPTH, BASE_ALLOCATION, BlockDev, FilterDev
from ..errors import ConfigError
from .cbw import ON_CBW_ERROR
from .copystate import CopyState
from .job import ERROR_POLICIES, SYNC_MODES, BackupJob, Emit, JobStatus
from ..blockdev.live import LiveDev, quiesce_all
from .snapshot import ExtentProvider

log = logging.getLogger(__name__)

BITMAP_MODES = ("on-success", "never", "always")
#: The default copy granule (``cluster-size`` not given): a live write of
#: 4 KiB copies its own 4 KiB before it lands, not a whole 64 KiB cluster
#: (docs/cbwsub.md: 4 KiB writes into uncopied space 22 vs 42 us of server
#: CPU each).  Raised, never lowered, by `_cluster_size`: to the target's
#: (and scratch's) preferred block size, to every device's minimum, and so
#: that a bitmap has at most `MAX_DEFAULT_CLUSTERS` bits.
#: ``NBDBACKUP_DEFAULT_CLUSTER`` (a power of two >= 512) replaces it (an A/B
#: switch: 65536 is the default of sessions before 14).
DEFAULT_CLUSTER = 4 * 1024
#: The default cluster size keeps each copy-state bitmap (about 7 of one bit
#: per cluster, docs/cbwsub.md) within 2^24 bits = 2 MiB: 4 KiB clusters up to
#: 64 GiB disks, 64 KiB from 1 TiB up.
MAX_DEFAULT_CLUSTERS = 1 << 24
MAX_CLUSTER = 64 * 1024 * 1024
DEFAULT_MAX_CHUNK = 4 * 1024 * 1024
MAX_WORKERS = 64
#: Name prefix of the default scratch files (``.nbdbackup-scratch-XXXX.raw``).
SCRATCH_PREFIX = ".nbdbackup-scratch-"


def _default_granule() -> int:
    """`DEFAULT_CLUSTER`, or ``NBDBACKUP_DEFAULT_CLUSTER`` when set to a power of two >= 512."""
    v = os.environ.get("NBDBACKUP_DEFAULT_CLUSTER")
    if v:
        try:
            n = int(v)
        except ValueError:
            raise ConfigError(f"NBDBACKUP_DEFAULT_CLUSTER must be a power of two >= 512, got {v!r}") from None
        if n < 512 or not _is_pow2(n) or n > MAX_CLUSTER:
            raise ConfigError(f"NBDBACKUP_DEFAULT_CLUSTER must be a power of two >= 512, got {v!r}")
        return n
    return DEFAULT_CLUSTER


class ExportTable(Protocol):
    def get(self, name: str) -> Any | None: ...

    def add(self, name: str, dev: BlockDev, read_only: bool = True, description: str = "") -> Any: ...

    async def remove(self, name: str) -> None: ...


@dataclass
class SimpleExport:
    name: str
    dev: BlockDev
    read_only: bool
    description: str = ""


class MemoryExportTable:
    """A dict of `SimpleExport`s implementing `ExportTable` (tests, embedding)."""

    def __init__(self) -> None:
        self.exports: dict[str, SimpleExport] = {}

    def get(self, name: str) -> SimpleExport | None:
        return self.exports.get(name)

    def add(self, name: str, dev: BlockDev, read_only: bool = True, description: str = "") -> SimpleExport:
        if name in self.exports:
            raise ConfigError(f"export {name!r} already exists")
        e = self.exports[name] = SimpleExport(name, dev, read_only, description)
        return e

    async def remove(self, name: str) -> None:
        self.exports.pop(name, None)


class BitmapLease(Protocol):
    """A dirty bitmap frozen for one backup (see `BitmapSource`)."""

    #: the frozen bitmap's dirty clusters, at the job's cluster size
    clusters: Bitmap
    #: optional meta context to add to the snapshot export: (name, provider)
    context: tuple[str, ExtentProvider] | None

    def end(self, success: bool) -> Any:
        """The job concluded: apply bitmap_mode (reclaim / abdicate); may be async."""


class BitmapSource(Protocol):
    def begin_backup(self, export: str, name: str, mode: str, cluster_size: int,
                     nclusters: int) -> BitmapLease:
        """Freeze bitmap ``name`` of ``export``; raise ConfigError if unknown/busy."""


def _innermost(dev: BlockDev) -> BlockDev:
    while isinstance(dev, FilterDev):
        dev = dev.inner
    return dev


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{name} must be an integer {rng}, got {value!r}")
    return value


class Engine:
    """Fields: ``exports`` (`ExportTable`); ``emit`` (event callback
    ``emit(name, data)``); ``bitmaps`` (`BitmapSource` or None); ``jobs``
    (job id -> `BackupJob`, until dismissed); ``scratch_dir`` (directory for
    default scratch files, or None; the daemon sets its ``--state-dir``)."""

    def __init__(self, exports: ExportTable, emit: Emit | None = None,
                 bitmaps: BitmapSource | None = None, scratch_dir: str | None = None) -> None:
        self.exports = exports
        self.emit = emit or (lambda name, data: None)
        self.bitmaps = bitmaps
        self.jobs: dict[str, BackupJob] = {}
        self.scratch_dir = scratch_dir

    # -- backup-start -------------------------------------------------------

    async def backup_start(self, export: str, job_id: str, sync: str, target: str | BlockDev,
                           durable_point: bool = False, **kw: Any) -> dict:
        """Start a backup of ``export`` to ``target`` (QMP ``backup-start``).

        `prepare_backup` (every check, every await that can fail), then
        `PreparedBackup.commit` (the point in time) and `PreparedBackup.start`;
        any failure undoes everything.  Returns ``{}`` once the snapshot export
        (if ``snapshot``) is published and the job is running.

        ``durable_point`` (the caller's decision: the job's bitmap is persistent,
        `bitmap.manager.BitmapManager.durable_point`): the disk is flushed once
        before its writes are held and once while they are, before the commit, so
        the content at the point in time -- what the snapshot shows and the
        bitmap counts from -- survives a power loss (docs/powercut.md).
        """
        prepared = await self.prepare_backup(export, job_id, sync, target, **kw)
        live = prepared.job.live if durable_point else None
        try:
            if live is not None:
                await live.flush()  # most of the dirty page cache, before writes are held
            # No write may straddle the point in time (blockdev.live, "Quiescing").
            async with quiesce_all([prepared.job.live] if prepared.job.live is not None else []):
                if live is not None:
                    await live.flush()
                prepared.commit()
            await prepared.start()
        except BaseException:
            await prepared.abort()
            raise
        return {}

    async def prepare_backup(self, export: str, job_id: str, sync: str, target: str | BlockDev,
                           snapshot: str | None = None, speed: int = 0,
                           cluster_size: int | None = None, compress: bool = False,
                           max_workers: int = 4, max_chunk: int = DEFAULT_MAX_CHUNK,
                           on_source_error: str = "report", on_target_error: str = "report",
                           on_cbw_error: str = "break-guest-write",
                           cbw_timeout: float | None = None, auto_dismiss: bool = False,
                           bitmap: str | None = None, bitmap_mode: str | None = None,
                           scratch: str | BlockDev | None = None, scratch_limit: int | None = None,
                           discard_source: bool = False, snapshot_trim: bool = False) -> "PreparedBackup":
        """Phase 1 of a backup: validate, open the target, build the job (status
        created, visible in query-jobs); nothing touches the live disk yet.

        ``target``: a SPEC (`blockdev.open_spec`; a missing file is created
        sparse with the source's size) or an open `BlockDev`; either way the
        job owns it from here on (closed at dismiss, or at once on failure).
        ``max_chunk`` is rounded down to whole clusters and capped by both
        ends' maximum request size.  The caller must then either
        `PreparedBackup.commit` + ``await start()``, or ``await abort()``.
        """
        # 1. validation without I/O
        if not isinstance(job_id, str) or not job_id:
            raise ConfigError("job-id must be a non-empty string")
        if job_id in self.jobs:
            starting = not self.jobs[job_id].committed
            raise ConfigError(f"a job with id {job_id!r} already exists"
                              + (" (it is being started)" if starting else ""))
        exp = self.exports.get(export)
        if exp is None:
            raise ConfigError(f"unknown export {export!r}")
        if sync not in SYNC_MODES:
            raise ConfigError(f"bad sync mode {sync!r}: expected one of {', '.join(SYNC_MODES)}")
        _check_int("speed", speed, 0)
        _check_int("max-workers", max_workers, 1, MAX_WORKERS)
        _check_int("max-chunk", max_chunk, 512)
        # QEMU's "auto" (inherit the backend's policy) means "report" here.
        on_source_error = "report" if on_source_error == "auto" else on_source_error
        on_target_error = "report" if on_target_error == "auto" else on_target_error
        for name, val in (("on-source-error", on_source_error), ("on-target-error", on_target_error)):
            if val not in ERROR_POLICIES:
                raise ConfigError(f"bad {name} {val!r}: expected one of {', '.join(ERROR_POLICIES)}")
        if on_cbw_error not in ON_CBW_ERROR:
            raise ConfigError(f"bad on-cbw-error {on_cbw_error!r}: expected one of {', '.join(ON_CBW_ERROR)}")
        if cbw_timeout is not None and (isinstance(cbw_timeout, bool) or not isinstance(cbw_timeout, (int, float))
                                        or cbw_timeout < 0):
            raise ConfigError(f"cbw-timeout must be a number of seconds >= 0 (0 = no limit), got {cbw_timeout!r}")
        if cbw_timeout == 0:
            cbw_timeout = None
        if sync in ("incremental", "bitmap") and bitmap is None:
            raise ConfigError(f"sync={sync} needs a bitmap")
        if sync == "none" and bitmap is not None:
            raise ConfigError("sync=none cannot take a bitmap")
        if bitmap_mode is not None and bitmap is None:
            raise ConfigError("bitmap-mode needs a bitmap")
        if bitmap_mode is not None and bitmap_mode not in BITMAP_MODES:
            raise ConfigError(f"bad bitmap-mode {bitmap_mode!r}: expected one of {', '.join(BITMAP_MODES)}")
        if sync == "incremental" and bitmap_mode not in (None, "on-success"):
            raise ConfigError("sync=incremental requires bitmap-mode on-success")
        if sync in ("full", "top") and bitmap is not None and bitmap_mode is None:
            raise ConfigError(f"sync={sync} with a bitmap needs bitmap-mode")
        if sync == "bitmap" and bitmap is not None and bitmap_mode is None:
            raise ConfigError("Bitmap sync mode must be given when providing a bitmap")
        if bitmap_mode == "never" and sync in ("full", "top"):
            raise ConfigError(f"Bitmap sync mode 'never' has no meaningful effect when combined "
                              f"with sync mode '{sync}'")
        if bitmap is not None and self.bitmaps is None:
            raise ConfigError("dirty bitmaps are not available on this server")
        _check_scratch_args(sync, scratch, scratch_limit, discard_source, snapshot_trim)
        if snapshot is None:
            # Every backup publishes its point-in-time view (issue 4's default name).
            snapshot = f"{export}@{job_id}"
        if snapshot is not None:
            if not isinstance(snapshot, str) or not snapshot:
                raise ConfigError("snapshot must be a non-empty export name")
            if self.exports.get(snapshot) is not None:
                raise ConfigError(f"export {snapshot!r} already exists")
        src: BlockDev = exp.dev
        live = src if isinstance(src, LiveDev) else None
        ro = getattr(exp, "read_only", None)
        if live is None and not (ro or src.capabilities().read_only):
            raise ConfigError(f"export {export!r} is writable but not served through a LiveDev")
        size = src.size
        created: str | None = None
        own_scratch_target = target == SCRATCH_TARGET
        if own_scratch_target and sync != "none":
            raise ConfigError(f"target {SCRATCH_TARGET!r} (a scratch file the server makes) is for sync=none; "
                              f"a sync={sync} target keeps the backup, so name it")
        if isinstance(target, str) and not own_scratch_target:
            self._check_not_source(src, target)
            self._check_not_busy_target(target)
        if isinstance(scratch, str):
            self._check_not_source(src, scratch)
            self._check_not_busy_target(scratch)
            if isinstance(target, str) and _same_file(scratch, target):
                raise ConfigError(f"scratch {scratch!r} is the target")

        # 2. open the target
        sdev: BlockDev | None = None
        scratch_created: str | None = None
        if own_scratch_target:
            # A sparse file in the state directory (else the temp directory), removed at dismiss.
            # (The temp directory is looked up only without a state directory:
            # a read-only root with --state-dir on a volume has none, docs/hunt9.md.)
            where = self.scratch_dir if self.scratch_dir is not None else _temp_dir()
            tdev, scratch_created = await self._open_scratch(job_id, None, os.path.join(where, "-"), size)
        elif isinstance(target, str):
            from ..blockdev import is_nbd_uri, open_spec

            if not (is_nbd_uri(target) or target.startswith("memory:") or os.path.lexists(target)):
                created = target
            tdev = await open_spec(target, create_size=size)
        else:
            tdev = target
        try:
            if sync == "none":
                sdev = tdev  # fleecing: the target is the scratch
            elif sync != "full":
                sdev, scratch_created = await self._open_scratch(job_id, scratch, target, size)
                self._check_scratch(src, tdev, sdev, scratch)
            self._check_target(src, tdev, target, compress)
            cs = self._cluster_size(tdev, cluster_size, size=src.size, source=src,
                                    scratch=sdev if sdev is not tdev else None)
            # One copy request must fit both ends' maximum request size.
            limit = min(src.capabilities().block_size.maximum, tdev.capabilities().block_size.maximum)
            if cs > limit:
                raise ConfigError(f"cluster-size {cs} is larger than the largest request the source "
                                  f"or target accepts ({limit} bytes)")
            max_chunk = max(cs, min(max_chunk, limit) // cs * cs)
            if job_id in self.jobs:  # another prepare got there during our await
                raise ConfigError(f"a job with id {job_id!r} already exists")
            # serve's log: the copy granule (query-jobs says it too).
            log.info("backup %s of %s: sync=%s, cluster-size %d (%s)", job_id, export, sync, cs,
                     "asked" if cluster_size is not None else "default")
            # The target is probed for "reads as zeros" (copystate rule 11):
            # one SEEK_DATA, true for a file created here.
            state = CopyState(src, tdev, cs, scratch=sdev, discard_source=discard_source,
                              scratch_limit=scratch_limit)
            job = BackupJob(job_id, device=export, sync=sync, state=state, live=live, target=tdev,
                            emit=self.emit, speed=speed, max_workers=max_workers, max_chunk=max_chunk,
                            on_source_error=on_source_error, on_target_error=on_target_error,
                            on_cbw_error=on_cbw_error, cbw_timeout=cbw_timeout,
                            auto_dismiss=auto_dismiss, on_dismiss=self._dismissed,
                            snapshot_trim=snapshot_trim)
            job.scratch_path = scratch_created
        except BaseException:
            await tdev.close()
            _unlink_quietly(created)
            if sdev is not None and sdev is not tdev:
                await sdev.close()
            _unlink_quietly(scratch_created)
            raise
        job.snapshot_name = snapshot  # type: ignore[attr-defined]
        job.target_spec = (target if isinstance(target, str) and not own_scratch_target  # type: ignore[attr-defined]
                           else None)
        job.scratch_spec = (scratch if isinstance(scratch, str)  # type: ignore[attr-defined]
                            else job.scratch_path)
        # Listed (query-jobs) and reachable by the job verbs only from its commit on: the
        # id is taken now, the job is seen once its point in time is (`PreparedBackup.commit`).
        job.committed = False
        self.jobs[job_id] = job
        return PreparedBackup(self, job, export=export, bitmap=bitmap,
                              bitmap_mode=bitmap_mode or "on-success", created=created)

    async def _open_scratch(self, job_id: str, scratch: str | BlockDev | None, target: str | BlockDev,
                            size: int) -> tuple[BlockDev, str | None]:
        """Open the job's scratch: ``(device, path we created or None)``."""
        from ..blockdev import is_nbd_uri, open_spec

        if isinstance(scratch, BlockDev):
            return scratch, None
        if scratch is None:
            if not isinstance(target, str) or target.startswith("memory:"):
                from ..blockdev.memory import MemoryDev

                return MemoryDev(size), None
            if self.scratch_dir is not None:
                where = self.scratch_dir
            elif not is_nbd_uri(target):
                where = os.path.dirname(os.path.abspath(target))
            else:
                where = _temp_dir()
            try:
                fd, path = tempfile.mkstemp(prefix=SCRATCH_PREFIX, suffix=".raw", dir=where)
            except OSError as e:
                raise ConfigError(f"cannot create a scratch file in {where}: {e.strerror or e}") from None
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            try:
                dev = await open_spec(path)
            except BaseException:
                _unlink_quietly(path)
                raise
            # Held while the job lives: `sweep_scratch` removes only unlocked ones.
            fcntl.flock(getattr(_innermost(dev), "fd"), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return dev, path
        created = None
        if not (is_nbd_uri(scratch) or scratch.startswith("memory:") or os.path.lexists(scratch)):
            created = scratch
        try:
            return await open_spec(scratch, create_size=size), created
        except BaseException:
            _unlink_quietly(created)
            raise

    def sweep_scratch(self) -> list[str]:
        """Remove default scratch files a crashed server left in ``scratch_dir``
        (those no live job holds locked); returns their paths."""
        gone: list[str] = []
        if self.scratch_dir is None:
            return gone
        try:
            names = os.listdir(self.scratch_dir)
        except OSError:
            return gone
        for name in names:
            if not (name.startswith(SCRATCH_PREFIX) and name.endswith(".raw")):
                continue
            path = os.path.join(self.scratch_dir, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # in use
            finally:
                os.close(fd)
            _unlink_quietly(path)
            gone.append(path)
        return gone

    @staticmethod
    def _check_scratch(src: BlockDev, tdev: BlockDev, sdev: BlockDev, scratch: Any) -> None:
        if _innermost(sdev) is _innermost(src):
            raise ConfigError("the scratch is the source export's own disk")
        if sdev is tdev or _innermost(sdev) is _innermost(tdev):
            raise ConfigError("the scratch is the target")
        if sdev.capabilities().read_only:
            raise ConfigError(f"scratch {scratch!r} is read-only")
        if sdev.size < src.size:
            raise ConfigError(f"scratch {scratch!r} is smaller ({sdev.size} bytes) than the source "
                              f"({src.size} bytes)")

    def _check_not_busy_target(self, target: str) -> None:
        """Two jobs writing one target would corrupt both backups."""
        from ..blockdev import is_nbd_uri

        for job in self.jobs.values():
            for what, other in (("target", getattr(job, "target_spec", None)),
                                ("scratch", getattr(job, "scratch_spec", None))):
                if other is None or other.startswith("memory:"):
                    continue
                same = other == target
                if not same and not is_nbd_uri(target) and not is_nbd_uri(other):
                    try:
                        a, b = os.stat(other), os.stat(target)
                        same = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
                    except OSError:
                        same = os.path.abspath(other) == os.path.abspath(target)
                if same:
                    raise ConfigError(f"{target!r} is already the {what} of job {job.id!r}")

    def _check_not_source(self, src: BlockDev, target: str) -> None:
        from ..blockdev import is_nbd_uri

        inner = _innermost(src)
        if is_nbd_uri(target):
            for attr in ("uri", "spec"):
                val = getattr(inner, attr, None)
                if isinstance(val, str) and val == target:
                    raise ConfigError(f"target {target!r} is the source export's own disk")
            return
        path = getattr(inner, "path", None)
        fd = getattr(inner, "fd", None)
        if path is not None and os.path.abspath(path) == os.path.abspath(target):
            raise ConfigError(f"target {target!r} is the source export's own disk")
        try:
            st = os.stat(target)
        except OSError:
            return
        if isinstance(fd, int) and fd >= 0:
            sst = os.fstat(fd)
            if (sst.st_dev, sst.st_ino) == (st.st_dev, st.st_ino):
                raise ConfigError(f"target {target!r} is the source export's own disk (same file)")

    @staticmethod
    def _check_target(src: BlockDev, tdev: BlockDev, target: Any, compress: bool) -> None:
        if tdev is src or _innermost(tdev) is _innermost(src):
            raise ConfigError("the target is the source export's own disk")
        caps = tdev.capabilities()
        if caps.read_only:
            raise ConfigError(f"target {target!r} is read-only")
        if tdev.size < src.size:
            raise ConfigError(f"target {target!r} is smaller ({tdev.size} bytes) than the source ({src.size} bytes)")
        if compress and not getattr(caps, "can_compress", False):
            raise ConfigError(f"target {target!r} does not support compression (compress=true refused)")

    @staticmethod
    def _cluster_size(tdev: BlockDev, cluster_size: int | None, *, size: int = 0,
                      source: BlockDev | None = None, scratch: BlockDev | None = None) -> int:
        """The job's cluster size.  Given (``cluster_size``): honoured as
        asked once checked (a power of two >= 512, at most `MAX_CLUSTER`, not
        below the target's minimum block size).  Else the default:
        `_default_granule` (`DEFAULT_CLUSTER`, 4 KiB) raised to the target's
        and a separate scratch's preferred block size (an NBD target
        advertising 64 KiB as preferred gets 64 KiB copies), to the minimum block
        size of the target, source and scratch, and to ``size /
        MAX_DEFAULT_CLUSTERS`` rounded up to a power of two (bitmaps stay
        small: 64 KiB from 1 TiB up); capped at `MAX_CLUSTER`."""
        bs = tdev.capabilities().block_size
        if cluster_size is None:
            cs = max(_default_granule(), bs.preferred, bs.minimum)
            for d in (source, scratch):
                if d is not None:
                    dbs = d.capabilities().block_size
                    cs = max(cs, dbs.minimum, dbs.preferred if d is scratch else 0)
            cs = max(cs, -(-size // MAX_DEFAULT_CLUSTERS))
            if not _is_pow2(cs):
                cs = 1 << cs.bit_length()
            return min(cs, MAX_CLUSTER)
        if isinstance(cluster_size, bool) or not isinstance(cluster_size, int) or not _is_pow2(cluster_size) \
                or cluster_size < 512:
            raise ConfigError(f"cluster-size must be a power of two >= 512, got {cluster_size!r}")
        if cluster_size > MAX_CLUSTER:
            raise ConfigError(f"cluster-size {cluster_size} is larger than the limit {MAX_CLUSTER}")
        if cluster_size < bs.minimum:
            raise ConfigError(f"cluster-size {cluster_size} is smaller than the target's minimum block size {bs.minimum}")
        return cluster_size

    async def _todo(self, sync: str, state: CopyState, lease: "BitmapLease | None") -> Bitmap | None:
        n = state.nclusters
        if sync == "none":
            return None
        if sync in ("incremental", "bitmap"):
            assert lease is not None
            return lease.clusters
        if sync == "full":
            return Bitmap(n, fill=True)
        # top: the source's top layer, as at the start
        src = state.source
        todo = Bitmap(n)
        if not src.capabilities().can_extents:
            todo.set_all()
            return todo
        ctx = ALLOCATION_DEPTH if ALLOCATION_DEPTH in src.meta_contexts() else BASE_ALLOCATION
        pos, size, cs = 0, state.size, state.cluster_size
        while pos < size:
            exts = await state.source_extents(pos, min(size - pos, 1 << 30), ctx)
            if not exts:
                raise OSError(errno.EIO, "source returned no extents")
            for e in exts:
                end = min(e.end, size)
                if end <= pos:
                    continue
                top = (e.flags == 1) if ctx == ALLOCATION_DEPTH else not (e.flags & 1)
                if top:
                    first, last = pos // cs, (end - 1) // cs
                    todo.set(first, last - first + 1)
                pos = end
        # The walk runs after the point in time, with live writes going on (hunt 7):
        # for a cluster not done it reads the allocation at the start (rule 3's
        # reasoning), but a cluster copied-before-write before the walk reached it
        # may have been rewritten since -- a WRITE_ZEROES that punched it reads as
        # a hole now.  Its point-in-time content is in the scratch (or zeros):
        # every such cluster joins the sync set, so the target gets exactly the
        # snapshot's content there (at worst a few clusters more than the top
        # layer held: content of the backing, or zeros, never other bytes).
        # No await between here and `set_pump_todo`, so no copy can slip in.
        for bm in (state.in_scratch, state.zeroed):
            for start, count, value in bm.runs():
                if value:
                    todo.set(start, count)
        return todo

    # -- job verbs --------------------------------------------------------------

    def _job(self, job_id: str) -> BackupJob:
        job = self.jobs.get(job_id)
        if job is None or not job.committed:
            raise ConfigError(f"no job with id {job_id!r}")
        return job

    async def _dismissed(self, job: BackupJob) -> None:
        self.jobs.pop(job.id, None)
        name = getattr(job, "snapshot_name", None)
        if name is not None and self.exports.get(name) is not None:
            await self.exports.remove(name)

    def export_in_use(self, name: str) -> str | None:
        """Id of a job (not yet dismissed) backing up export ``name`` or serving
        it as its snapshot, else None (the server refuses to remove such an export)."""
        for job in self.jobs.values():
            if job.device == name or getattr(job, "snapshot_name", None) == name:
                return job.id
        return None

    def query_jobs(self) -> list[dict]:
        """Every job whose point in time is taken.  A backup being started
        (prepared, its export's connections being recalled and quiesced: up
        to `RECALL_TIMEOUT` s) is not listed yet, as in QEMU, where a
        ``transaction`` runs under the big lock and no ``query-jobs`` sees
        its jobs before they start: a listed backup job always has its
        point in time (docs/doubts18.md item 5).  Its JOB_STATUS_CHANGE
        ``created`` event is sent at prepare, as QEMU's is."""
        return [j.query() for j in self.jobs.values() if j.committed]

    def job_pause(self, job_id: str) -> dict:
        self._job(job_id).pause()
        return {}

    def job_resume(self, job_id: str) -> dict:
        self._job(job_id).resume()
        return {}

    def job_cancel(self, job_id: str) -> dict:
        self._job(job_id).cancel()
        return {}

    async def job_dismiss(self, job_id: str) -> dict:
        await self._job(job_id).dismiss()
        return {}

    def job_set_speed(self, job_id: str, speed: int) -> dict:
        self._job(job_id).set_speed(speed)
        return {}

    async def shutdown(self) -> None:
        """Cancel every job, wait for it, dismiss it."""
        for job in list(self.jobs.values()):
            if job.status not in (JobStatus.CONCLUDED, JobStatus.NULL):
                try:
                    job.cancel()
                except ConfigError:
                    pass
        for job in list(self.jobs.values()):
            await job.wait()
            if job.status is JobStatus.CONCLUDED:
                await job.dismiss()


#: ``backup-start`` target meaning "a scratch file of the server's own" (sync=none only): a sparse
#: file in the state directory (else the temp directory), locked while the job lives and removed
#: at dismiss -- what a remote pull agent wants, as it cannot name a path on the server.
SCRATCH_TARGET = "scratch:"


def _check_scratch_args(sync: str, scratch: Any, scratch_limit: Any, discard_source: Any,
                        snapshot_trim: Any) -> None:
    """Validate the scratch options (no I/O); see docs/scratch.md."""
    if scratch is not None and not isinstance(scratch, BlockDev) and (not isinstance(scratch, str) or not scratch):
        raise ConfigError("scratch must be a non-empty SPEC (file path, NBD URI or memory:SIZE)")
    if scratch is not None and sync in ("full", "none"):
        why = ("every cluster is in the sync set, so nothing goes to a scratch" if sync == "full"
               else "the target itself is the scratch (fleecing)")
        raise ConfigError(f"sync={sync} takes no scratch: {why}")
    if scratch_limit is not None:
        _check_int("scratch-limit", scratch_limit, 1)
        if sync == "full":
            raise ConfigError("sync=full uses no scratch: scratch-limit has no meaning")
    for name, val in (("discard-source", discard_source), ("snapshot-trim", snapshot_trim)):
        if not isinstance(val, bool):
            raise ConfigError(f"{name} must be a boolean, got {val!r}")
    if discard_source and sync == "none":
        raise ConfigError("sync=none has no background copy: discard-source has no meaning "
                          "(TRIM the snapshot export instead)")


def _same_file(a: str, b: str) -> bool:
    from ..blockdev import is_nbd_uri

    if is_nbd_uri(a) or is_nbd_uri(b):
        return a == b
    try:
        x, y = os.stat(a), os.stat(b)
        return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _temp_dir() -> str:
    """The temporary directory for a scratch file, or a `ConfigError` naming
    the fixes (`tempfile.gettempdir` raises FileNotFoundError when none is
    writable, as under a container's read-only root filesystem)."""
    try:
        return tempfile.gettempdir()
    except OSError:
        raise ConfigError("no writable temporary directory for the scratch file (a read-only root "
                          "filesystem?): give serve --state-dir DIR on a writable volume, name the "
                          "job's scratch (--scratch PATH), or mount a tmpfs on /tmp") from None


def _unlink_quietly(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)  # we created it for this backup: leave no litter
        except OSError:
            pass


class PreparedBackup:
    """A backup between `Engine.prepare_backup` and its start (two-phase, for
    ``transaction``: prepare every action, commit them all with no ``await``
    in between -- one point in time across exports and bitmap operations --
    then start them, or abort them all).

    Fields: ``engine``, ``job`` (status created), ``export``, ``bitmap`` /
    ``bitmap_mode``, ``lease`` (after commit, when a bitmap is used),
    ``created`` (target path we created, removed on abort), ``committed``,
    ``published`` (snapshot export added), ``started``.
    """

    def __init__(self, engine: Engine, job: BackupJob, *, export: str, bitmap: str | None,
                 bitmap_mode: str, created: str | None) -> None:
        self.engine = engine
        self.job = job
        self.export = export
        self.bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.created = created
        self.lease: BitmapLease | None = None
        self.committed = False
        self.published = False
        self.started = False

    def commit(self) -> None:
        """Synchronously take the point in time: freeze the bitmap, attach CBW."""
        assert not self.committed
        job = self.job
        if self.bitmap is not None:
            assert self.engine.bitmaps is not None
            self.lease = self.engine.bitmaps.begin_backup(
                self.export, self.bitmap, self.bitmap_mode, job.state.cluster_size, job.state.nclusters)
            if hasattr(self.lease, "bind"):
                self.lease.bind(job.state)
            job.on_end = self.lease.end
        job.attach()
        self.committed = True
        job.committed = True  # listed from now on (`Engine.query_jobs`)

    async def start(self) -> None:
        """Compute what the pump copies, publish the snapshot export, run the job."""
        assert self.committed and not self.started
        job, eng = self.job, self.engine
        job.state.set_pump_todo(await eng._todo(job.sync, job.state, self.lease))
        if self.lease is not None and self.lease.context is not None:
            job.snapshot.add_context(*self.lease.context)
        name = getattr(job, "snapshot_name", None)
        if name is not None:
            # Read-only unless clients may TRIM it (snapshot-trim; WRITE still fails: EPERM).
            eng.exports.add(name, job.snapshot, read_only=not job.snapshot.trim_ok,
                            description=f"point-in-time snapshot of {self.export} (backup job {job.id})")
            self.published = True
        job.start()
        self.started = True

    async def abort(self) -> None:
        """Undo everything (before `start` returned): no job, no export, no hook."""
        job, eng = self.job, self.engine
        if self.started:
            return  # a running job is cancelled through the job verbs instead
        # As at dismiss: the copies in flight end before the target closes
        # (else a write inside copy-before-write failed with EBADF).
        await job.stop_copies()
        if eng.jobs.get(job.id) is job:
            del eng.jobs[job.id]
        name = getattr(job, "snapshot_name", None)
        if self.published and name is not None:
            await eng.exports.remove(name)
            self.published = False
        if self.lease is not None:
            if hasattr(self.lease, "bind"):
                # The job never ran and its target is no backup (a target
                # created here is deleted below): a bitmap-mode ``always``
                # lease must not forget what copy-before-write put there.
                self.lease.bind(None)
            r = self.lease.end(False)
            if inspect.isawaitable(r):
                await r
            self.lease = None
            if job.live is not None:
                # The hook went before the bitmap was unfrozen: say it now
                # (blockdev.live "Offloadable again"; a frozen bitmap keeps
                # connections from worker processes).
                job.live.offload_changed()
        if job.status is JobStatus.CREATED:
            job._set(JobStatus.NULL)
        await job.state.idle_write_behind()
        await job.target.close()
        _unlink_quietly(self.created)
        await job.close_scratch()


# -- QMP mapping ----------------------------------------------------------------


def register_commands(qmp: Any, engine: Engine) -> None:
    """Register the job commands on ``qmp`` (a `nbdbackup.control.qmp.QMPServer`).

    Argument schemas come from `nbdbackup.control.schema.COMMANDS` (the server
    checks them and passes kebab-case members as snake_case keywords):
    ``backup-start``, ``query-jobs``, ``job-pause``, ``job-resume``,
    ``job-cancel``, ``job-dismiss``, ``job-set-speed`` {id, speed}; plus QEMU's
    ``block-job-set-speed`` {device, speed} (device = the job id).
    """

    async def backup_start(export: str, job_id: str, sync: str, target: str, **kw: Any) -> dict:
        return await engine.backup_start(export, job_id, sync, target, **kw)

    async def query_jobs() -> list:
        return engine.query_jobs()

    async def job_pause(id: str) -> dict:
        return engine.job_pause(id)

    async def job_resume(id: str) -> dict:
        return engine.job_resume(id)

    async def job_cancel(id: str) -> dict:
        return engine.job_cancel(id)

    async def job_dismiss(id: str) -> dict:
        return await engine.job_dismiss(id)

    async def job_set_speed(id: str, speed: int) -> dict:
        return engine.job_set_speed(id, speed)

    async def block_job_set_speed(device: str, speed: int) -> dict:
        return engine.job_set_speed(device, speed)

    qmp.register("backup-start", backup_start)
    qmp.register("query-jobs", query_jobs)
    qmp.register("job-pause", job_pause)
    qmp.register("job-resume", job_resume)
    qmp.register("job-cancel", job_cancel)
    qmp.register("job-dismiss", job_dismiss)
    qmp.register("job-set-speed", job_set_speed)
    from ..control import schema

    qmp.register("block-job-set-speed", block_job_set_speed,
                 args=schema.struct({"device": schema.STR, "speed": schema.UINT64}))


__all__: Sequence[str] = ("Engine", "ExportTable", "MemoryExportTable", "register_commands",
                          "BitmapSource", "BitmapLease")
