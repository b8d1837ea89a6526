"""Copy-before-write copies counted by the write-behind (default; ``NBDBACKUP_CBW_WRITE_BEHIND=0``: not).

The write-behind (`blockdev.writeback.WholeFileWriteBehind`) is advice: it
starts write-back of the scratch and target files and drops their clean
pages, on a thread, while copy-before-write keeps copying into them on the
loop.  By default CBW's copies (the task-free `protect_sync` path and
the async `copy` path) count towards its window, so rounds run during a
backup that only copies before writes (``sync=none``).  These tests check
that rounds really run then (and not with the switch at 0), and that the
snapshot keeps reading the backup-start content and the scratch holds
exactly it while rounds drop pages under live writes and snapshot reads.
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


async def _run(tmp_path, *, async_path: bool) -> tuple[CopyState, bytes, bytes]:
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
    order = list(range(N))
    rnd.shuffle(order)
    new = bytearray(data)

    async def writer(cs: list[int]) -> None:
        for c in cs:
            off = c * CS + rnd.randrange(CS - 4096)
            buf = rnd.randbytes(4096)
            new[off:off + 4096] = buf
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

    await asyncio.gather(writer(order[:N // 2]), writer(order[N // 2:]), reader(), reader())
    await state.idle_write_behind()
    whole = bytearray(N * CS)
    await snap.pread(memoryview(whole), 0)
    assert os.pread(src.fd, N * CS, 0) == bytes(new)  # the live disk: every write landed
    scratch = os.pread(tgt.fd, N * CS, 0)
    await live.close()
    await tgt.close()
    return state, bytes(whole), scratch


@pytest.mark.parametrize("async_path", [False, True], ids=["sync-path", "async-path"])
def test_cbw_copies_drive_write_behind_rounds(tmp_path, monkeypatch, async_path):
    monkeypatch.delenv("NBDBACKUP_CBW_WRITE_BEHIND", raising=False)  # the default: on
    state, whole, scratch = asyncio.run(_run(tmp_path, async_path=async_path))
    assert state.cbw_write_behind
    assert state.write_behind.rounds >= 1, "CBW copies did not start a write-behind round"
    assert state.bytes_copied_by_cbw == N * CS and state.done.all(0, N) and state.in_scratch.all(0, N)
    original = random.Random(3).randbytes(N * CS)
    assert whole == original  # the snapshot: the backup-start content ...
    assert scratch == original  # ... held by the scratch, every cluster


def test_switched_off_cbw_copies_start_no_round(tmp_path, monkeypatch):
    monkeypatch.setenv("NBDBACKUP_CBW_WRITE_BEHIND", "0")
    state, whole, _ = asyncio.run(_run(tmp_path, async_path=False))
    assert not state.cbw_write_behind and state.write_behind.rounds == 0
    assert whole == random.Random(3).randbytes(N * CS)
