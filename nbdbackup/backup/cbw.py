"""The copy-before-write write hook (QEMU's copy-before-write filter).

Role: attached to the live export's `LiveDev` for the life of a backup's
snapshot (from backup start to job dismiss).  Before a live write, zero or
trim reaches the disk, `CBWHook.before_write` saves the old content of every
touched cluster that is not yet done -- into the target when the cluster is
in the job's sync set, else into the scratch; source zeros are recorded, not
copied -- and waits for snapshot reads of those clusters
(`CopyState.protect`, rules 1 and 7).  When there is
nothing to copy or wait for, `CBWHook.before_write_now` says so synchronously
and the write may take the server's task-free path.

Error policy (``on_cbw_error``, as QEMU's copy-before-write ``on-cbw-error``):
- ``break-guest-write``: the live write fails with EIO; the snapshot stays
  valid (nothing changed on the disk).
- ``break-snapshot``: the live write goes on; the snapshot is broken
  (``state.broken`` set, snapshot reads fail with EIO), the job fails
  (``on_break`` callback) and CBW stops copying from then on.
A copy into the scratch beyond ``scratch-limit`` fails with ENOSPC: a CBW
error like any other, so the same policy applies.
``cbw_timeout`` (seconds, None = no limit): a CBW taking longer counts as a
CBW error (ETIMEDOUT); the copy it started is cancelled, which leaves the copy
state valid (rule 5).
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Callable

from .copystate import CopyState

ON_CBW_ERROR = ("break-guest-write", "break-snapshot")


class CBWHook:
    """Fields: ``state``; ``on_cbw_error``; ``cbw_timeout``; ``on_break``
    (called once with the error when the snapshot breaks); ``errors`` (number
    of CBW failures seen)."""

    def __init__(self, state: CopyState, *, on_cbw_error: str = "break-guest-write",
                 cbw_timeout: float | None = None,
                 on_break: Callable[[OSError], None] | None = None) -> None:
        assert on_cbw_error in ON_CBW_ERROR
        self.state = state
        self.on_cbw_error = on_cbw_error
        self.cbw_timeout = cbw_timeout
        self.on_break = on_break
        self.errors = 0
        #: `before_write_now` may copy small spans itself (`CopyState.protect_sync`).
        self.sync_copy = os.environ.get("NBDBACKUP_CBW_SYNC", "1") != "0"

    async def before_write(self, offset: int, length: int) -> None:
        st = self.state
        if st.broken is not None or length == 0:
            return
        try:
            if self.cbw_timeout is None:
                await st.protect(offset, length)
            else:
                await asyncio.wait_for(st.protect(offset, length), self.cbw_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            self.errors += 1
            if isinstance(e, asyncio.TimeoutError) and not isinstance(e, OSError):
                err: OSError = OSError(errno.ETIMEDOUT, f"copy-before-write took longer than {self.cbw_timeout} s")
            else:
                err = e if isinstance(e, OSError) else OSError(errno.EIO, str(e))
            if self.on_cbw_error == "break-guest-write":
                raise OSError(errno.EIO, f"copy-before-write failed: {err}") from err
            if st.broken is None:
                st.broken = err
                if self.on_break is not None:
                    self.on_break(err)

    def before_write_now(self, offset: int, length: int) -> bool:
        """True when `before_write` would have nothing to wait for (the
        task-free write path of `blockdev.live`): every touched cluster is
        already done -- or was copied just now, synchronously
        (`CopyState.protect_sync`: a small span from and to plain files) --
        and no snapshot read reads it.  Else False, and the caller awaits
        `before_write` (which copies, waits and applies ``on_cbw_error``)."""
        st = self.state
        if st.broken is not None or length == 0:
            return True
        return st.protect_now(offset, length) or (self.sync_copy and st.protect_sync(offset, length))

    async def on_durable(self) -> None:
        # The live disk's durability does not depend on the target's.
        return None
