"""Copy-before-write copies counted by the write-behind (``NBDBACKUP_CBW_WRITE_BEHIND``).

The write-behind (`blockdev.writeback.WholeFileWriteBehind`) is advice: it
starts write-back of the scratch and target files and drops their clean
pages, on a thread, while copy-before-write keeps copying into them on the
loop.  With ``NBDBACKUP_CBW_WRITE_BEHIND`` set (N > 1: copies of at least N
bytes; 1: every copy; 0 or unset: none, the default) CBW's copies (the
task-free `protect_sync` path and the async `copy` path) count towards its
window, so rounds run during a backup that only copies before writes
(``sync=none``).  These tests check that rounds run
exactly when the setting says, and that the snapshot keeps reading the
backup-start content and the scratch holds exactly it while rounds drop
pages under racing live writes and snapshot reads.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from nbdbackup.backup.cbw import CBWHook
from nbdbackup.backup.copystate import CopyState
from nbdbackup.backup.snapshot import SnapshotDev
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.live import LiveDev

CS = 65536
N = 64  # clusters
SPAN = 8 * CS  # a "sequential" write: one copy of 512 KiB
MIN = 256 * 1024  # NBDBACKUP_CBW_WRITE_BEHIND=MIN: copies of 256 KiB or more count


async def _run(tmp_path, *, async_path: bool, span: int) -> tuple[CopyState, bytes, bytes]:
    """Live writes over every cluster (4 KiB into each, or ``span`` bytes at
    span-aligned offsets), two writers and two snapshot readers racing."""
    src = FileDev(str(tmp_path / "s.raw"), create_size=N * CS)
    src.engine_inline_max = 1 << 20  # the inline write path, whatever NBDBACKUP_IO_ENGINE says
    data = random.Random(3).randbytes(N * CS)
    os.pwrite(src.fd, data, 0)
    tgt = FileDev(str(tmp_path / "t.raw"), create_size=N * CS)
    live = LiveDev(src)
    state = CopyState(live, tgt, CS, scratch=tgt, write_behind=2 * CS)
    hook = CBWHook(state)
    # sync_copy off: every live write into an uncopied cluster takes
    # LiveDev.pwrite -> CBWHook.before_write -> CopyState.copy.
    hook.sync_copy = not async_path
    live.add_hook(hook)
    snap = SnapshotDev(state)
    rnd = random.Random(4)
    step = CS if span <= CS else span
    order = list(range(0, N * CS, step))
    rnd.shuffle(order)
    new = bytearray(data)

    async def writer(offs: list[int]) -> None:
        for base in offs:
            off = base + (rnd.randrange(CS - span) if span < CS else 0)
            buf = rnd.randbytes(span)
            new[off:off + span] = buf
            if not live.pwrite_now(buf, off):
                await live.pwrite(buf, off)
            await asyncio.sleep(0)

    async def reader() -> None:
        for _ in range(40):
            off = rnd.randrange(N) * CS
            got = bytearray(2 * CS if off + 2 * CS <= N * CS else CS)
            await snap.pread(memoryview(got), off)
            assert bytes(got) == data[off:off + len(got)], "snapshot read returned new data"
            await asyncio.sleep(0)

    half = len(order) // 2
    await asyncio.gather(writer(order[:half]), writer(order[half:]), reader(), reader())
    await state.idle_write_behind()
    whole = bytearray(N * CS)
    await snap.pread(memoryview(whole), 0)
    assert os.pread(src.fd, N * CS, 0) == bytes(new)  # the live disk: every write landed
    scratch = os.pread(tgt.fd, N * CS, 0)
    await live.close()
    await tgt.close()
    return state, bytes(whole), scratch


@pytest.mark.parametrize("async_path", [False, True], ids=["sync-path", "async-path"])
@pytest.mark.parametrize("setting, span, rounds", [
    (str(MIN), SPAN, True),  # a sequential write's copies count
    (str(MIN), 4096, False),  # a lone 64 KiB cluster's copy does not
    ("1", 4096, True),       # every copy counts
    ("0", SPAN, False),      # none does (only the pump's)
    (None, SPAN, False),     # the default: none
], ids=["min-seq", "min-4k", "all-4k", "off-seq", "default-seq"])
def test_cbw_copies_and_write_behind_rounds(tmp_path, monkeypatch, async_path, setting, span, rounds):
    assert SPAN >= MIN > CS
    if setting is None:
        monkeypatch.delenv("NBDBACKUP_CBW_WRITE_BEHIND", raising=False)
    else:
        monkeypatch.setenv("NBDBACKUP_CBW_WRITE_BEHIND", setting)
    state, whole, scratch = asyncio.run(_run(tmp_path, async_path=async_path, span=span))
    if rounds:
        assert state.write_behind.rounds >= 1, "CBW copies did not start a write-behind round"
    else:
        assert state.write_behind.rounds == 0
    assert state.bytes_copied_by_cbw == N * CS and state.done.all(0, N) and state.in_scratch.all(0, N)
    original = random.Random(3).randbytes(N * CS)
    assert whole == original  # the snapshot: the backup-start content ...
    assert scratch == original  # ... held by the scratch, every cluster
