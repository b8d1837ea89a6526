"""The pull agent into a real file: `agent.filewriter.ChunkWriter` (threads, write-behind).

The model test (tests/unit/test_agent_pull_model.py) pulls into memory; here
the target is a `FileDev`, so chunks are hashed and written on the writer's
threads and written back early.  A full pull of a disk with data, zeroed
data and holes, then an incremental one onto the same file, must leave the
file equal to the source byte for byte with the manifest `manifest_of`
computes -- with a write-behind window smaller than one chunk (every chunk
is waited for and dropped from the page cache at once), the default window,
and write-behind off.  The write-behind error policy: EIO is a write error,
anything else switches write-behind off.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random

import pytest

from nbdbackup.agent import filewriter
from nbdbackup.agent.pull import manifest_of, pull
from nbdbackup.blockdev import writeback
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.memory import MemoryDev

CL = 64 * 1024


def _disk_bytes(dev: MemoryDev) -> bytes:
    buf = bytearray(dev.size)
    dev.read_sync(memoryview(buf), 0)
    return bytes(buf)


@pytest.mark.parametrize("window", [0, 4096, filewriter.DEFAULT_WINDOW])
def test_full_then_incremental_pull_into_a_file(tmp_path, window):
    rnd = random.Random(window)
    size = 37 * CL + 12288  # a short last chunk
    chunk = 4 * CL

    async def main() -> None:
        src = MemoryDev(size)
        for _ in range(12):
            off = rnd.randrange(size)
            n = min(rnd.randrange(1, 3 * CL), size - off)
            src.write_sync(rnd.randbytes(n), off)
        src.write_sync(bytes(2 * CL), 5 * CL)  # allocated zeroes
        path = str(tmp_path / "t.raw")
        with open(path, "wb") as f:
            f.truncate(size)
        dst = FileDev(path)
        try:
            man, st = await pull(src, dst, fresh=True, chunk_size=chunk, workers=3, write_behind=window)
            with open(path, "rb") as f:
                assert f.read() == _disk_bytes(src)
            assert man.chunks == (await manifest_of(src, chunk)).chunks
            assert st.bytes_written == st.bytes_read > 0
            # Change some ranges (data and zeroes) and pull them incrementally.
            dirty = []
            for c in sorted(rnd.sample(range(-(-size // CL)), 6)):
                off, n = c * CL, min(CL, size - c * CL)
                if c % 2:
                    src.write_sync(rnd.randbytes(n), off)
                else:
                    src.zero_sync(off, n)
                dirty.append((off, n))
            man2, _ = await pull(src, dst, dirty=dirty, chunk_size=chunk, workers=3, base=man,
                                 write_behind=window)
            with open(path, "rb") as f:
                assert f.read() == _disk_bytes(src)
            assert man2.chunks == (await manifest_of(src, chunk)).chunks
        finally:
            await dst.close()

    asyncio.run(main())


def test_write_behind_errors(tmp_path):
    path = str(tmp_path / "t.raw")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    fd = os.open(path, os.O_RDWR)
    try:
        w = filewriter.ChunkWriter(fd, window=4096)
        with pytest.raises(OSError) as ei:
            w._sfr_failed(OSError(errno.EIO, "I/O error"))
        assert ei.value.errno == errno.EIO and w._sfr_ok
        w._sfr_failed(OSError(errno.EINVAL, "not here"))
        assert not w._sfr_ok  # advisory: off, the data is still written
        data = os.urandom(3 * 4096)
        assert w._job(memoryview(data), 8192, [(8192, 4096), (16384, 4096)], lambda b: bytes(b[:4])) == data[:4]
        got = os.pread(fd, 3 * 4096, 8192)
        assert got[:4096] == data[:4096] and got[4096:8192] == bytes(4096) and got[8192:] == data[8192:]
        with pytest.raises(ValueError):
            w._job(memoryview(data), 8192, [(16384, 8192)], None)
        w.close()
        # What the kernel refuses (a negative offset) is an OSError with its errno.
        with pytest.raises(OSError) as ei:
            writeback.sync_file_range(fd, -1, 1, writeback.SYNC_FILE_RANGE_WRITE)
        assert ei.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_whole_file_write_behind(tmp_path):
    """`WholeFileWriteBehind`: a round per window of bytes added, on its
    thread, one at a time; the content is untouched; `idle` waits for the
    round in progress and stops further ones; a failing round turns it off."""
    path = str(tmp_path / "t.raw")
    data = os.urandom(1 << 20)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    async def main() -> None:
        wb = writeback.WholeFileWriteBehind([fd, fd], 256 << 10)
        assert wb.fds == [fd]
        for i in range(4):
            os.pwrite(fd, data[i << 18:(i + 1) << 18], i << 18)
            wb.add(1 << 18)
            await asyncio.sleep(0.05)
        await wb.idle()
        assert wb.rounds >= 1
        wb.add(1 << 30)
        assert wb._running is None  # idle: no more rounds
        bad = writeback.WholeFileWriteBehind([10**6], 1)  # not an open fd: EBADF in the round
        bad.add(1)
        await bad.idle()
        assert bad._off
        assert writeback.WholeFileWriteBehind([fd], 0)._off  # window 0: off

    try:
        asyncio.run(main())
        with open(path, "rb") as f:
            assert f.read() == data
    finally:
        os.close(fd)


def test_a_failed_write_stops_the_pull(tmp_path):
    """A target write error (the file's fd closed under the pull: EBADF)
    fails the pull; no manifest, the other workers stopped."""
    size = 64 * CL

    async def main() -> None:
        src = MemoryDev(size)
        src.write_sync(os.urandom(size), 0)
        path = str(tmp_path / "t.raw")
        with open(path, "wb") as f:
            f.truncate(size)
        dst = FileDev(path)
        fd = dst.fd
        dst.fd = os.open("/dev/null", os.O_RDONLY)  # pwritev: EBADF
        try:
            with pytest.raises(OSError) as ei:
                await pull(src, dst, fresh=True, chunk_size=4 * CL, workers=4)
            assert ei.value.errno == errno.EBADF
        finally:
            os.close(dst.fd)
            dst.fd = fd
            await dst.close()

    asyncio.run(main())
