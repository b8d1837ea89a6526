"""A backup job: QEMU's job state machine around the pump, CBW and snapshot.

Role: `BackupJob` owns one backup of one export: the shared `CopyState`, the
`CBWHook` attached to the live device, the `SnapshotDev`, the `Pump` and the
target.  The `engine` creates it, validates arguments and publishes the
snapshot export; the job runs, reports and cleans up.

Lifecycle (QEMU's JobStatus and transition table, minus ready/standby, which a
backup never uses)::

    created -> running <-> paused
    running -> waiting -> pending -> concluded -> (dismiss) null
    created/running/waiting/pending -> aborting -> concluded      (failure, cancel)

A paused job is resumed (paused -> running) before it can abort, as in QEMU.
Every transition emits JOB_STATUS_CHANGE {id, status}.

Ending semantics (QEMU's):
- success (pump finished AND ``target.flush()`` succeeded): running ->
  waiting -> pending, BLOCK_JOB_COMPLETED {device, id, len, offset, speed,
  type} without ``error``, concluded.
- failure (error policy ``report``, flush failure, CBW ``break-snapshot``):
  aborting, BLOCK_JOB_COMPLETED with ``error``, concluded; `query` shows the
  error.
- cancel: aborting, BLOCK_JOB_CANCELLED {device, id, len, offset, speed,
  type}, concluded.  A cancelled full/top/incremental job leaves a PARTIAL
  target: `query` says so in ``error`` ("Operation canceled (...)", QEMU's
  wording plus the byte counts).  For
  ``sync=none`` (fleecing) cancel is the normal way to end the job: the same
  event is sent (QEMU sends BLOCK_JOB_CANCELLED too) but no error is recorded.
- Copy-before-write keeps protecting the snapshot after the job concluded
  (whatever the outcome, unless the snapshot broke): the snapshot export stays
  valid until dismiss.  Dismiss detaches CBW, closes the snapshot view (calls
  fail with ESHUTDOWN), removes the export (engine callback) and closes the
  target and the scratch (a scratch file the engine created is removed).

Pausing: ``pause()`` moves to paused at once; pump workers stop at their next
chunk boundary (copies in flight finish).  CBW keeps running while paused.
Error policy ``stop`` pauses the same way with ``error`` recorded; ``resume``
retries the failed clusters.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
from enum import Enum
from typing import Any, Awaitable, Callable

from ..blockdev.base import BlockDev
from ..errors import ConfigError
from .cbw import CBWHook
from .copystate import CopyError, CopyState
from ..blockdev.live import LiveDev
from .pump import Pump, RateLimiter
from .snapshot import SnapshotDev

log = logging.getLogger(__name__)

SYNC_MODES = ("full", "top", "none", "incremental", "bitmap")
ERROR_POLICIES = ("report", "ignore", "stop", "enospc")

Emit = Callable[[str, dict], Any]


class JobStatus(str, Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


S = JobStatus
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.CREATED: frozenset({S.RUNNING, S.ABORTING, S.NULL}),
    S.RUNNING: frozenset({S.PAUSED, S.WAITING, S.ABORTING}),
    S.PAUSED: frozenset({S.RUNNING}),
    S.WAITING: frozenset({S.PENDING, S.ABORTING}),
    S.PENDING: frozenset({S.CONCLUDED, S.ABORTING}),
    S.ABORTING: frozenset({S.CONCLUDED}),
    S.CONCLUDED: frozenset({S.NULL}),
    S.NULL: frozenset(),
}


class JobFailure(Exception):
    """Ends the job with ``error`` (an OSError or text)."""

    def __init__(self, error: BaseException | str) -> None:
        super().__init__(str(error))
        self.error = error


class BackupJob:
    """One backup job.  Fields:

    - ``id``, ``device`` (the export name), ``sync``;
    - ``state`` (`CopyState`), ``live`` (the export's `LiveDev`, or None for a
      read-only export: nothing can write, so no CBW), ``hook`` (`CBWHook`),
      ``snapshot`` (`SnapshotDev`, always built; published by the engine if
      a snapshot export name was given), ``target`` (owned: closed on dismiss);
    - ``limiter`` (`RateLimiter`, ``speed``), ``pump``;
    - policies ``on_source_error``, ``on_target_error``; ``auto_dismiss``;
    - ``status``; ``error`` (text or None: the failure, the ``stop`` error
      while paused by it, or the partial-target note of a cancel);
    - ``_user_paused``, ``_error_paused``, ``_unpaused`` (event set while
      neither); ``_cancel_requested``; ``_failure`` (a JobFailure set by CBW
      break-snapshot before cancelling the task); ``_task``;
    - ``committed`` (listed by ``query-jobs`` and reachable by the job verbs;
      False from a backup's prepare until its commit, its point in time:
      `Engine.query_jobs`, docs/doubts18.md item 5);
    - ``scratch_path`` (a scratch file the engine created: removed when the
      scratch is closed at dismiss, or None; the scratch device itself is
      ``state.scratch``, owned by the job unless it is the target);
    - ``_on_dismiss`` (async engine callback: remove the export and the job),
      ``on_end`` (public: ``callable(success: bool)`` returning None or an
      awaitable, called once when the job concludes, before its completion
      event; the dirty-bitmap lease sets it, and a grouped transaction
      wraps it so that the group's bitmaps commit only if every job
      succeeded), ``emit``.
    """

    def __init__(self, job_id: str, *, device: str, sync: str, state: CopyState,
                 live: LiveDev | None, target: BlockDev, emit: Emit,
                 speed: int = 0, max_workers: int = 4, max_chunk: int = 1 << 20,
                 on_source_error: str = "report", on_target_error: str = "report",
                 on_cbw_error: str = "break-guest-write", cbw_timeout: float | None = None,
                 auto_dismiss: bool = False,
                 on_dismiss: Callable[["BackupJob"], Awaitable[None]] | None = None,
                 on_end: Callable[[bool], Any] | None = None, snapshot_trim: bool = False) -> None:
        assert sync in SYNC_MODES
        assert on_source_error in ERROR_POLICIES and on_target_error in ERROR_POLICIES
        self.id = job_id
        self.device = device
        self.sync = sync
        self.state = state
        self.live = live
        self.target = target
        self.emit_cb = emit
        self.limiter = RateLimiter(speed)
        self.max_workers = max_workers
        self.max_chunk = max_chunk
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.auto_dismiss = auto_dismiss
        self.hook = CBWHook(state, on_cbw_error=on_cbw_error, cbw_timeout=cbw_timeout,
                            on_break=self._on_cbw_break)
        self.snapshot = SnapshotDev(state, trim=snapshot_trim)
        self.committed = True
        self.scratch_path: str | None = None
        self.pump = Pump(state, max_workers=max_workers,
                         max_chunk_clusters=max(1, max_chunk // state.cluster_size),
                         limiter=self.limiter, gate=self._gate, on_error=self._on_copy_error)
        self.status = S.CREATED
        self.error: str | None = None
        self._user_paused = False
        self._error_paused = False
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._cancel_requested = False
        self._failure: JobFailure | None = None
        self._pump_failed = False  # a copy error was reported: workers claim no more
        self._task: asyncio.Task | None = None
        self._started = False  # _run began (before that, cancel only sets flags)
        self._on_dismiss = on_dismiss
        self.on_end = on_end
        self._attached = False
        self._emit("JOB_STATUS_CHANGE", {"id": self.id, "status": self.status.value})

    # -- plumbing ---------------------------------------------------------

    @property
    def speed(self) -> int:
        return self.limiter.speed

    def _emit(self, name: str, data: dict) -> None:
        try:
            r = self.emit_cb(name, data)
            if inspect.isawaitable(r):
                asyncio.ensure_future(r)
        except Exception:  # an event sink must not break the job
            log.exception("event %s dropped", name)

    def _set(self, status: JobStatus) -> None:
        assert status in TRANSITIONS[self.status], f"job {self.id}: {self.status.value} -> {status.value}"
        self.status = status
        self._emit("JOB_STATUS_CHANGE", {"id": self.id, "status": status.value})

    def _verb(self, verb: str, allowed: tuple[JobStatus, ...]) -> None:
        if self.status not in allowed:
            raise ConfigError(f"job {self.id!r} in state {self.status.value!r} cannot {verb}")

    def _progress_event(self) -> dict:
        return {"device": self.id, "id": self.id, "len": self.state.total,
                "offset": self.state.current, "speed": self.speed, "type": "backup"}

    # -- lifecycle --------------------------------------------------------

    def attach(self) -> None:
        """Attach CBW to the live device: from now on the snapshot is point-in-time."""
        if self.live is not None and not self._attached:
            self.live.add_hook(self.hook)
        self._attached = True

    def detach(self) -> None:
        if self.live is not None and self._attached:
            self.live.remove_hook(self.hook)
        self._attached = False

    def start(self) -> None:
        assert self._task is None and self.status is S.CREATED
        self._set(S.RUNNING)
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"backup-job-{self.id}")

    async def wait(self) -> None:
        """Wait until the job concluded (or was dismissed)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        self._started = True
        try:
            try:
                if self._cancel_requested or self._failure is not None:
                    # cancel()/a CBW break came before this task first ran.
                    raise asyncio.CancelledError
                if self.sync == "none":
                    await asyncio.get_running_loop().create_future()  # until cancelled
                else:
                    await self.pump.run()
                    await self._wait_unpaused()
                    self._check_failure()
                    await self._flush_target()
                    await self._wait_unpaused()
                    self._check_failure()
            except BaseExceptionGroup as eg:
                raise _unwrap(eg) from None
        except asyncio.CancelledError:
            if not self._cancel_requested and self._failure is None:
                raise  # not ours (loop shutdown): propagate
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()
            if self._failure is not None:
                await self._conclude_failed(self._failure)
            else:
                await self._conclude_cancelled()
        except JobFailure as f:
            await self._conclude_failed(f)
        except Exception as e:  # a bug: fail the job loudly rather than hang it
            log.exception("backup job %s crashed", self.id)
            await self._conclude_failed(JobFailure(f"internal error: {e!r}"))
        else:
            self._set(S.WAITING)
            self._set(S.PENDING)
            await self._end(True)
            self._emit("BLOCK_JOB_COMPLETED", self._progress_event())
            self._set(S.CONCLUDED)
        if self.auto_dismiss:
            await self.dismiss()

    async def _wait_unpaused(self) -> None:
        # A job paused while its last copies (or the final flush) finished
        # stays paused: it completes only once resumed (as in QEMU, a job
        # leaves "paused" only for "running").
        while not self._unpaused.is_set():
            await self._unpaused.wait()

    def _check_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _flush_target(self) -> None:
        try:
            await self.target.flush()
        except OSError as e:
            self._emit("BLOCK_JOB_ERROR", {"device": self.id, "id": self.id,
                                           "operation": "write", "action": "report"})
            raise JobFailure(OSError(e.errno, f"flushing the target failed: {e.strerror or e}")) from e

    async def _end(self, success: bool) -> None:
        if self.on_end is not None:
            try:
                r = self.on_end(success)
                if inspect.isawaitable(r):
                    await r
            except Exception:
                log.exception("job %s: end callback failed", self.id)

    async def _conclude_failed(self, f: JobFailure) -> None:
        err = f.error
        self.error = (err.strerror or str(err)) if isinstance(err, OSError) else str(err)
        self._set(S.ABORTING)
        await self._end(False)
        self._emit("BLOCK_JOB_COMPLETED", {**self._progress_event(), "error": self.error})
        self._set(S.CONCLUDED)

    async def _conclude_cancelled(self) -> None:
        if self.sync != "none":
            self.error = (f"Operation canceled (the target is incomplete: "
                          f"{self.state.current} of {self.state.total} bytes copied)")
        else:
            self.error = None
        self._set(S.ABORTING)
        await self._end(False)
        self._emit("BLOCK_JOB_CANCELLED", self._progress_event())
        self._set(S.CONCLUDED)

    # -- pause points and error policies -------------------------------------

    async def _gate(self) -> bool:
        while not self._unpaused.is_set():
            await self._unpaused.wait()
        return not (self._cancel_requested or self._pump_failed)

    def _pause_now(self) -> None:
        self._unpaused.clear()
        if self.status is S.RUNNING:
            self._set(S.PAUSED)

    def _resume_now(self) -> None:
        if self.status is S.PAUSED:
            self._set(S.RUNNING)
        self._unpaused.set()

    async def _on_copy_error(self, err: CopyError, start: int, count: int) -> str:
        if self._pump_failed:
            raise JobFailure(err)  # another worker reported already
        policy = self.on_source_error if err.operation == "read" else self.on_target_error
        action = policy
        if policy == "enospc":
            action = "stop" if err.errno == errno.ENOSPC else "report"
        self._emit("BLOCK_JOB_ERROR", {"device": self.id, "id": self.id,
                                       "operation": err.operation, "action": action})
        if action == "report":
            self._pump_failed = True
            raise JobFailure(err)
        if action == "ignore":
            self.state.ignore(start, count)
            return "skip"
        # stop: pause with the error recorded until resume() (or cancel).
        self.error = f"{err.operation} error: {err.strerror or err}"
        self._error_paused = True
        self._pause_now()
        await self._gate()
        return "retry"

    def _on_cbw_break(self, err: OSError) -> None:
        self._failure = JobFailure(OSError(err.errno, f"snapshot broken by copy-before-write error: {err.strerror or err}"))
        if self._task is not None and not self._task.done() and self.status not in (S.ABORTING, S.CONCLUDED, S.NULL):
            self._unpaused.set()
            if self.status is S.PAUSED:
                self._set(S.RUNNING)
            if self._started:
                self._task.cancel()

    # -- verbs (QMP commands) -------------------------------------------------

    def pause(self) -> None:
        self._verb("be paused", (S.RUNNING, S.PAUSED))
        self._user_paused = True
        self._pause_now()

    def resume(self) -> None:
        self._verb("be resumed", (S.PAUSED,))
        self._user_paused = False
        if self._error_paused:
            self._error_paused = False
            self.error = None
        self._resume_now()

    def set_speed(self, speed: int) -> None:
        if not isinstance(speed, int) or isinstance(speed, bool) or speed < 0:
            raise ConfigError(f"speed must be an integer >= 0 (bytes/s), got {speed!r}")
        self._verb("change speed", (S.CREATED, S.RUNNING, S.PAUSED))
        self.limiter.set_speed(speed)

    def cancel(self) -> None:
        self._verb("be cancelled", (S.CREATED, S.RUNNING, S.PAUSED, S.WAITING, S.PENDING))
        if self._cancel_requested:
            return
        self._cancel_requested = True
        if self.status is S.PAUSED:
            self._user_paused = self._error_paused = False
            self._resume_now()
        self._unpaused.set()
        if self._task is not None and self._started:
            self._task.cancel()

    async def dismiss(self) -> None:
        """Concluded -> null: detach CBW, close the snapshot, drop the export, close the target."""
        self._verb("be dismissed", (S.CONCLUDED,))
        await self.stop_copies()
        await self.state.idle_write_behind()
        self._set(S.NULL)
        try:
            if self._on_dismiss is not None:
                await self._on_dismiss(self)
        finally:
            try:
                await self.target.close()
            except OSError:
                log.exception("job %s: closing the target failed", self.id)
            await self.close_scratch()

    async def stop_copies(self) -> None:
        """Detach copy-before-write and close the snapshot view; writes already
        inside copy-before-write claim nothing more (rule 6) and the copies in
        flight, the last ones, have finished when this returns -- so the target
        may go away (`dismiss`, and an aborted start in `engine`)."""
        self.detach()
        self.snapshot.close_view()
        self.state.retire()
        while self.state.inflight:
            await asyncio.gather(*(asyncio.shield(f) for f in self.state.inflight.values()),
                                 return_exceptions=True)

    async def close_scratch(self) -> None:
        """Close the scratch (unless it is the target) and remove the file the
        engine created for it.  Idempotent."""
        sdev = self.state.scratch
        if sdev is not None and sdev is not self.target:
            try:
                await sdev.close()
            except OSError:
                log.exception("job %s: closing the scratch failed", self.id)
        path, self.scratch_path = self.scratch_path, None
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass

    def scratch_allocated(self) -> int | None:
        """Bytes the scratch occupies on its filesystem (st_blocks x 512) when
        it is a local file, else None."""
        from ..blockdev.base import FilterDev

        dev = self.state.scratch
        while isinstance(dev, FilterDev):
            dev = dev.inner
        fd = getattr(dev, "fd", None)
        if not isinstance(fd, int) or fd < 0 or getattr(dev, "is_block", False):
            return None
        try:
            return os.fstat(fd).st_blocks * 512
        except OSError:
            return None

    def query(self) -> dict:
        st = self.state
        info: dict[str, Any] = {
            "id": self.id, "type": "backup", "status": self.status.value,
            "current-progress": st.current, "total-progress": st.total,
            "device": self.device, "sync": self.sync, "speed": self.speed,
            "cluster-size": st.cluster_size,
            "bytes-copied-by-pump": st.bytes_copied_by_pump,
            "bytes-copied-by-cbw": st.bytes_copied_by_cbw,
            "bytes-ignored": st.bytes_ignored,
            "clusters-skipped-zero": st.clusters_skipped_zero,
            "clusters-zero-in-snapshot": st.clusters_zero_in_snapshot,
            "snapshot-broken": st.broken is not None,
            "bytes-trimmed": st.bytes_trimmed,
        }
        if st.scratch is not None:
            info["scratch"] = "target" if st.scratch is self.target else (
                self.scratch_path or getattr(st.scratch, "path", None) or getattr(st.scratch, "spec", None)
                or "memory")
            info["scratch-bytes"] = st.scratch_bytes
            alloc = self.scratch_allocated()
            info["scratch-allocated"] = st.scratch_bytes if alloc is None else alloc
            info["bytes-cbw-to-scratch"] = st.bytes_cbw_to_scratch
            info["scratch-bytes-discarded"] = st.scratch_bytes_discarded
            if st.scratch_limit is not None:
                info["scratch-limit"] = st.scratch_limit
        if self.error is not None:
            info["error"] = self.error
        return info


def _unwrap(eg: BaseExceptionGroup) -> BaseException:
    """The most meaningful exception of a TaskGroup failure."""
    flat: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                flat.append(e)

    walk(eg)
    for kind in (JobFailure, asyncio.CancelledError):
        for e in flat:
            if isinstance(e, kind):
                return e
    return flat[0] if flat else eg
