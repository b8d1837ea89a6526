"""The background restore job of an instant-recovery export.

Role: `RestoreJob` is a `job.BackupJob` whose copy state is a
`restorestate.RestoreState`: same lifecycle and verbs (query-jobs progress,
speed limit, pause/resume/cancel, JOB_STATUS_CHANGE and
BLOCK_JOB_COMPLETED/CANCELLED events with ``type: "restore"``, error
policies report/ignore/stop/enospc), same `pump.Pump` restoring every chunk
of ``pump_todo`` (source zero runs are zeroed in one request).  What
differs:

- no copy-before-write and no snapshot export: the export's device is the
  `restoredev.RestoreDev` over the target, built by `build_restore`;
- the pump's workers claim nothing new while an on-demand fetch runs
  (``state.fg_idle``): guest reads have priority;
- every `CHECKPOINT_BYTES` restored (or `CHECKPOINT_SECONDS`), and at the
  end, `RestoreState.make_durable` records the progress persistently, so a
  restart redoes little;
- success = every chunk done and durable, then the progress map is marked
  complete: the export is from then on an ordinary live export of the target;
- cancel leaves the export serving (chunks not restored are fetched on
  demand); dismiss removes the job only: the target belongs to the export.

This module knows nothing of repositories or the CLI: the source is any
read-only `BlockDev` (`agent.snapsource.SnapshotSource` for a repository
snapshot).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..blockdev.base import BlockDev
from ..errors import ConfigError
from .job import BackupJob, JobFailure, JobStatus as S
from .restoredev import RestoreDev
from .restorestate import ProgressMap, RestoreState

log = logging.getLogger(__name__)

CHECKPOINT_BYTES = 256 << 20
CHECKPOINT_SECONDS = 5.0


async def build_restore(source: BlockDev, target: BlockDev, *, cluster_size: int,
                        state_dir: str | None, identity: str, fresh_target: bool) -> RestoreDev:
    """The device of a restoring export: ``source`` read through onto ``target``.

    ``state_dir``: where the persistent progress map lives (None: volatile, a
    restart starts over -- only for targets that do not outlive the process);
    ``identity`` names source and target (a state made for another is
    refused); ``fresh_target``: the target was just created sparse, so the
    source's zero chunks need no write.  On failure nothing is closed.
    """
    if target.capabilities().read_only:
        raise ConfigError("the restore target is read-only")
    if target.size < source.size:
        raise ConfigError(f"the restore target ({target.size} bytes) is smaller than the snapshot "
                          f"({source.size} bytes)")
    size = source.size
    if state_dir is None:
        progress = ProgressMap.volatile(size, cluster_size)
    else:
        progress = ProgressMap.open(state_dir, size, cluster_size, identity)
    try:
        state = RestoreState(source, target, cluster_size, progress)
        if fresh_target and not progress.resumed:
            await state.assume_zero_target()
    except BaseException:
        progress.close()
        raise
    return RestoreDev(state, on_close=[progress.close])


class RestoreJob(BackupJob):
    """Fields beyond `BackupJob`'s: ``dev`` (the export's `RestoreDev`);
    ``_since_checkpoint`` (bytes done since the last durable checkpoint);
    ``_last_checkpoint`` (loop time of it); ``_checkpointing`` (one at a time)."""

    def __init__(self, job_id: str, *, device: str, dev: RestoreDev, emit, speed: int = 0,
                 max_workers: int = 4, on_source_error: str = "report", on_target_error: str = "report",
                 auto_dismiss: bool = False, on_dismiss=None) -> None:
        st = dev.state
        super().__init__(job_id, device=device, sync="full", state=st, live=None, target=st.target,
                         emit=emit, speed=speed, max_workers=max_workers, max_chunk=st.cluster_size,
                         on_source_error=on_source_error, on_target_error=on_target_error,
                         auto_dismiss=auto_dismiss, on_dismiss=on_dismiss)
        self.dev = dev
        self._since_checkpoint = st.current
        self._last_checkpoint = 0.0
        self._checkpointing = False

    @property
    def rstate(self) -> RestoreState:
        return self.dev.state

    def _progress_event(self) -> dict:
        return {**super()._progress_event(), "type": "restore"}

    async def _gate(self) -> bool:
        st = self.rstate
        while True:
            if not await super()._gate():
                return False
            if st.fg_idle.is_set():
                break
            await st.fg_idle.wait()  # on-demand fetches first
        await self._maybe_checkpoint()
        return True

    async def _maybe_checkpoint(self) -> None:
        st = self.rstate
        now = asyncio.get_running_loop().time()
        if self._checkpointing or (st.current - self._since_checkpoint < CHECKPOINT_BYTES
                                   and now - self._last_checkpoint < CHECKPOINT_SECONDS):
            return
        self._checkpointing = True
        try:
            self._since_checkpoint, self._last_checkpoint = st.current, now
            await st.make_durable()
        except OSError as e:
            log.warning("restore job %s: checkpoint failed: %s", self.id, e.strerror or e)
        finally:
            self._checkpointing = False

    async def _flush_target(self) -> None:
        st = self.rstate
        try:
            await st.make_durable()
        except OSError as e:
            self._emit("BLOCK_JOB_ERROR", {"device": self.id, "id": self.id,
                                           "operation": "write", "action": "report"})
            raise JobFailure(OSError(e.errno, f"flushing the target failed: {e.strerror or e}")) from e
        if st.complete and st.progress.bits.all():
            st.progress.set_complete()
        elif not self._pump_failed:
            # The ignore policy skipped chunks: they stay on demand.
            log.warning("restore job %s: finished with %d chunks not restored (error policy ignore)",
                        self.id, st.nclusters - st.done.count())

    async def _conclude_cancelled(self) -> None:
        st = self.rstate
        self.error = (f"Operation canceled (the restore is incomplete: {st.current} of {st.total} bytes "
                      f"restored; the export keeps fetching the rest on demand)")
        self._set(S.ABORTING)
        await self._end(False)
        self._emit("BLOCK_JOB_CANCELLED", self._progress_event())
        self._set(S.CONCLUDED)

    async def dismiss(self) -> None:
        """Concluded -> null; the export (and its target) stays."""
        self._verb("be dismissed", (S.CONCLUDED,))
        self._set(S.NULL)
        if self._on_dismiss is not None:
            await self._on_dismiss(self)

    def query(self) -> dict:
        st = self.rstate
        info: dict[str, Any] = super().query()
        info.update({
            "type": "restore",
            "complete": st.complete,
            "bytes-fetched-on-demand": st.bytes_fetched,
            "bytes-owned-by-guest": st.bytes_owned,
            "chunks-done": st.done.count(),
            "chunks-durable": st.progress.bits.count(),
            "chunks-total": st.nclusters,
        })
        for k in ("bytes-copied-by-cbw", "snapshot-broken"):
            info.pop(k, None)
        return info


def register_job(engine: Any, job: RestoreJob) -> None:
    """Put ``job`` in the engine's job table (query-jobs and the job verbs
    reach it there); dismiss takes it out."""
    if job.id in engine.jobs:
        raise ConfigError(f"a job with id {job.id!r} already exists")
    engine.jobs[job.id] = job

    async def forget(j: RestoreJob) -> None:
        if engine.jobs.get(j.id) is j:
            del engine.jobs[j.id]

    job._on_dismiss = forget
