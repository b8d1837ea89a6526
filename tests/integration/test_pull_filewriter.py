"""The pull agent into a real file: `agent.filewriter.ChunkWriter` (threads, O_DIRECT, write-behind).

The model test (tests/unit/test_agent_pull_model.py) pulls into memory; here
the target is a `FileDev`, so chunks are hashed and written on the writer's
threads, with ``O_DIRECT`` (`FileWriter`) or through the page cache and
written back early.  A full pull of a disk with data, zeroed data and holes,
then an incremental one onto the same file, must leave the file equal to the
source byte for byte with the manifest `manifest_of` computes -- direct, and
buffered with a write-behind window smaller than one chunk (every chunk is
waited for and dropped from the page cache at once), the default window, and
write-behind off.  A property test pulls sources whose extents start and end
anywhere (unaligned heads and tails go through the page cache, the rest
direct) into fresh and reused files.  `FileWriter`: what goes where, and an
EINVAL (a buffer O_DIRECT refuses) switches it to the page cache for good.
The write-behind error policy: EIO is a write error, anything else switches
write-behind off.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import tempfile

from typing import Sequence

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdbackup.agent import filewriter
from nbdbackup.agent.pull import manifest_of, pull
from nbdbackup.blockdev import writeback
from nbdbackup.blockdev.base import BASE_ALLOCATION, HOLE_ZERO, BlockDev, Capabilities, Extent, StateFlag
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.memory import MemoryDev

CL = 64 * 1024


def _direct_ok(path: str) -> bool:
    """The file system of ``path`` takes O_DIRECT (the tests say so rather than
    pass vacuously where it does not)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def _disk_bytes(dev: MemoryDev) -> bytes:
    buf = bytearray(dev.size)
    dev.read_sync(memoryview(buf), 0)
    return bytes(buf)


@pytest.mark.parametrize("window,direct", [(0, False), (4096, False), (filewriter.DEFAULT_WINDOW, False),
                                           (filewriter.DEFAULT_WINDOW, True), (4096, True)])
def test_full_then_incremental_pull_into_a_file(tmp_path, window, direct):
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
            man, st = await pull(src, dst, fresh=True, chunk_size=chunk, workers=3, write_behind=window,
                                 direct=direct)
            with open(path, "rb") as f:
                assert f.read() == _disk_bytes(src)
            assert man.chunks == (await manifest_of(src, chunk)).chunks
            assert st.bytes_written == st.bytes_read > 0
            assert st.direct_io == (direct and _direct_ok(path))
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
                                 write_behind=window, direct=direct)
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
    dev = FileDev(path)
    fd = dev.fd
    try:
        w = filewriter.ChunkWriter(filewriter.FileWriter(dev, direct=False), window=4096)
        assert w._pool._max_workers == filewriter.BUFFERED_THREADS
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
        asyncio.run(dev.close())


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


@pytest.mark.parametrize("direct", [False, True])
def test_a_failed_write_stops_the_pull(tmp_path, monkeypatch, direct):
    """A target write error (the file's fd, or the O_DIRECT one, swapped for
    a read-only one under the pull: EBADF) fails the pull; no manifest, the
    other workers stopped.  A direct write's error other than EINVAL is not
    mistaken for "no O_DIRECT here"."""
    size = 64 * CL

    async def main() -> None:
        src = MemoryDev(size)
        src.write_sync(os.urandom(size), 0)
        path = str(tmp_path / "t.raw")
        with open(path, "wb") as f:
            f.truncate(size)
        if direct:
            assert _direct_ok(path)
        dst = FileDev(path)
        fd = dst.fd
        bad = os.open("/dev/null", os.O_RDONLY)  # pwrite: EBADF
        init = filewriter.FileWriter.__init__

        def swap(self, dev, *, direct: bool = True) -> None:
            init(self, dev, direct=direct)
            if self.direct:
                os.close(self.direct_fd)
                self.direct_fd = os.dup(bad)

        if direct:
            monkeypatch.setattr(filewriter.FileWriter, "__init__", swap)
        else:
            dst.fd = bad
        try:
            with pytest.raises(OSError) as ei:
                await pull(src, dst, fresh=True, chunk_size=4 * CL, workers=4, direct=direct)
            assert ei.value.errno == errno.EBADF
        finally:
            os.close(bad)
            dst.fd = fd
            await dst.close()

    asyncio.run(main())


def test_file_writer_direct_heads_and_tails(tmp_path):
    """`FileWriter.write`: the whole 4 KiB blocks of a range go O_DIRECT, its
    unaligned head and tail through the page cache (the return value); a
    buffer O_DIRECT refuses (misaligned: EINVAL) is written through the page
    cache and turns direct writes off for good."""
    path = str(tmp_path / "t.raw")
    size = 64 * 4096 + 100
    with open(path, "wb") as f:
        f.truncate(size)
    assert _direct_ok(path)
    expect = bytearray(size)
    buf = filewriter.FileWriter.alloc(size)
    buf[:] = os.urandom(size)
    dev = FileDev(path)
    w = filewriter.FileWriter(dev)
    try:
        assert w.direct and w.direct_fd >= 0 and w.align == 4096
        cw = filewriter.ChunkWriter(w)  # direct: more threads, they mostly wait for the disk
        assert cw._pool._max_workers == filewriter.DIRECT_THREADS > filewriter.BUFFERED_THREADS
        cw._pool.shutdown()
        # (offset, length, bytes through the page cache)
        for off, n, cached in [(0, 8192, 0), (8192 + 100, 3 * 4096, 100 + 4096 - 100), (5 * 4096 + 1, 4095, 4095),
                               (7 * 4096, 4096 + 7, 7), (12 * 4096 - 10, 4096 + 10, 10), (20 * 4096, 100, 100),
                               (60 * 4096, 4 * 4096 + 100, 100)]:
            assert w.write(buf[off:off + n], off) == cached, (off, n)
            expect[off:off + n] = buf[off:off + n]
            assert w.direct
        # A misaligned buffer: EINVAL from O_DIRECT, then the page cache, for good.
        raw = bytearray(os.urandom(3 * 4096 + 1))
        assert w.write(memoryview(raw)[1:], 30 * 4096) == 3 * 4096
        expect[30 * 4096:33 * 4096] = raw[1:]
        assert not w.direct
        assert w.write(buf[40 * 4096:41 * 4096], 40 * 4096) == 4096
        expect[40 * 4096:41 * 4096] = buf[40 * 4096:41 * 4096]
        with open(path, "rb") as f:
            assert f.read() == expect
    finally:
        w.close()
        asyncio.run(dev.close())
    assert w.direct_fd == -1


def _huge_kb(addr: int) -> int:
    """AnonHugePages (kB) of this process's mapping that holds ``addr``."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError("mapping not found")


def test_alloc_gives_huge_pages_where_the_kernel_has_them():
    """`FileWriter.alloc`: page-aligned, writable, and in transparent huge
    pages when THP is on ("always" or "madvise"): direct writes from them go
    to the disk in large segments (docs/pullfast.md)."""
    import ctypes

    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[never]" in mode:
        pytest.skip(f"THP off here: {mode.strip()}")
    buf = filewriter.FileWriter.alloc(8 << 20)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert addr % 4096 == 0 and len(buf) == 8 << 20
    buf[:] = b"\x5a" * len(buf)  # fault it in
    assert _huge_kb(addr) >= 2048


class ExtentSource(BlockDev):
    """Bytes with a ``base:allocation`` map given as `Extent`s (any offsets:
    not page-aligned as a `MemoryDev`'s are)."""

    def __init__(self, data: bytes, extents: list[Extent]) -> None:
        self.data, self.map = data, extents

    @property
    def size(self) -> int:
        return len(self.data)

    def capabilities(self) -> Capabilities:
        return Capabilities(read_only=True)

    def meta_contexts(self) -> Sequence[str]:
        return (BASE_ALLOCATION,)

    async def pread(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    async def pwrite(self, buf, offset: int, *, fua: bool = False) -> None:
        raise OSError(errno.EROFS, "read-only")

    async def flush(self) -> None:
        pass

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        end = offset + length
        return [Extent(max(e.offset, offset), min(e.end, end) - max(e.offset, offset), e.flags)
                for e in self.map if e.end > offset and e.offset < end]


KINDS = {"data": 0, "zero-data": int(StateFlag.ZERO), "hole": HOLE_ZERO}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(1, 300_000), cuts=st.lists(st.integers(1, 299_999), max_size=12),
       kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=13, max_size=13),
       chunk=st.sampled_from([16384, 65536]), workers=st.integers(1, 3), fresh=st.booleans(),
       seed=st.integers(0, 2**32))
def test_pull_with_unaligned_extents_reproduces_the_source(size, cuts, kinds, chunk, workers, fresh, seed):
    """Extents starting and ending anywhere, a size that is not a multiple of
    4096: the file equals the source (holes and zeroed data read as zeroes;
    into a reused file of garbage they are zeroed), the manifest is the
    blake3 of each chunk of the source, and O_DIRECT stayed on (only aligned
    blocks were handed to it)."""
    rnd = random.Random(seed)
    bounds = sorted({c for c in cuts if c < size} | {0, size})
    data = bytearray()
    extents = []
    for (o, e), kind in zip(zip(bounds, bounds[1:]), kinds):
        extents.append(Extent(o, e - o, KINDS[kind]))
        data += rnd.randbytes(e - o) if kind == "data" else bytes(e - o)
    src = ExtentSource(bytes(data), extents)

    async def main(path: str) -> None:
        with open(path, "wb") as f:
            if fresh:
                f.truncate(size)
            else:
                f.write(rnd.randbytes(size))
        dst = FileDev(path)
        try:
            man, st_ = await pull(src, dst, fresh=fresh, chunk_size=chunk, workers=workers)
        finally:
            await dst.close()
        with open(path, "rb") as f:
            assert f.read() == data
        assert man.chunks == [blake3.blake3(data[o:o + chunk]).digest() for o in range(0, size, chunk)]
        assert st_.bytes_read == sum(e.length for e in extents if e.flags != HOLE_ZERO)
        assert st_.direct_io == _direct_ok(path)

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as d:
        asyncio.run(main(os.path.join(d, "t.raw")))
