"""The I/O engines on real files, and the server's WRITE/READ/FLUSH/FUA on
each engine (our client <-> our server, in process, a `FileDev` export).

``io_engine`` (parametrised over io_uring, threads, sync) selects the engine
for the test and resets the selection afterwards.  The io_uring cases are
skipped only where `probe_io_uring` says the kernel refuses rings (it says
why); on this project's machines it works.
"""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from nbdbackup.blockdev import ioengine as io
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.nbd.client import connect
from nbdbackup.nbd.server import Server
from nbdbackup.nbd.wire import Cmd

SIZE = 8 << 20
_WHY_NOT = io.probe_io_uring()


@pytest.fixture(params=["io_uring", "threads", "sync"])
def io_engine(request):
    if request.param == "io_uring" and _WHY_NOT:
        pytest.skip(f"io_uring unavailable here: {_WHY_NOT}")
    io.reset()
    io.select(request.param)
    yield request.param
    io.reset()


@pytest.fixture
def image(short_tmp):
    path = str(short_tmp / "disk.img")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


# -- the engines themselves (real kernel, real files) ------------------------

def _engine_kinds():
    return [k for k in ("io_uring", "threads") if k != "io_uring" or not _WHY_NOT]


@pytest.mark.parametrize("kind", _engine_kinds())
def test_engine_roundtrip_many_in_flight_and_eof(kind, image):
    async def main():
        io.reset()
        io.select(kind)
        eng = io.for_loop()
        fd = os.open(image, os.O_RDWR)
        try:
            blocks = [os.urandom(4096) for _ in range(600)]  # more than the ring holds
            await asyncio.gather(*(eng.awrite(fd, bytearray(b), i * 4096) for i, b in enumerate(blocks)))
            big = bytearray(os.urandom(3 << 20))
            await eng.awrite(fd, big, 4 << 20, os.RWF_DSYNC)
            await eng.afsync(fd)
            back = [bytearray(4096) for _ in blocks]
            await asyncio.gather(*(eng.aread(fd, b, i * 4096) for i, b in enumerate(back)))
            assert [bytes(b) for b in back] == blocks
            got = bytearray(3 << 20)
            await eng.aread(fd, got, 4 << 20)
            assert got == big
            # A read crossing EOF: the rest reads as zeroes.
            tail = bytearray(b"x" * 8192)
            await eng.aread(fd, tail, SIZE - 4096)
            assert tail[4096:] == bytes(4096)
            await eng.afallocate(fd, 0x02 | 0x01, 0, 4096)  # punch the first block
            first = bytearray(4096)
            await eng.aread(fd, first, 0)
            assert first == bytes(4096)
        finally:
            os.close(fd)
            io.reset()

    asyncio.run(main())


@pytest.mark.parametrize("kind", _engine_kinds())
def test_engine_errors_are_errnos(kind, image, short_tmp):
    async def main():
        io.reset()
        io.select(kind)
        eng = io.for_loop()
        ro = os.open(image, os.O_RDONLY)
        d = os.open(str(short_tmp), os.O_RDONLY)
        try:
            with pytest.raises(OSError) as ei:
                await eng.awrite(ro, bytearray(4096), 0)  # not open for writing
            assert ei.value.errno == errno.EBADF
            with pytest.raises(OSError) as ei:
                await eng.aread(d, bytearray(4096), 0)
            assert ei.value.errno == errno.EISDIR
            with pytest.raises(OSError) as ei:
                await eng.afallocate(ro, 0, 0, 0)  # length 0
            assert ei.value.errno in (errno.EINVAL, errno.EBADF)
            rw = os.open(image, os.O_RDWR)
            try:
                with pytest.raises(OSError) as ei:
                    await eng.afallocate(rw, 0, 0, 0)
                assert ei.value.errno == errno.EINVAL
            finally:
                os.close(rw)
            closed = os.open(image, os.O_RDONLY)
            os.close(closed)
            with pytest.raises(OSError) as ei:
                await eng.afsync(closed)
            assert ei.value.errno == errno.EBADF
        finally:
            os.close(ro)
            os.close(d)
            io.reset()

    asyncio.run(main())


def test_uring_close_waits_for_the_kernel(image):
    if _WHY_NOT:
        pytest.skip(_WHY_NOT)

    async def main():
        io.reset()
        io.select("io_uring")
        eng = io.for_loop()
        fd = os.open(image, os.O_RDWR)
        try:
            done = []
            for i in range(8):
                eng.write(fd, bytearray(b"z" * (1 << 20)), i << 20, 0, done.append)
            await asyncio.sleep(0)  # submitted, probably not complete
            eng.close()
            assert not eng._inflight
            with pytest.raises(OSError):
                eng.write(fd, bytearray(1), 0, 0, done.append)
        finally:
            os.close(fd)
            io.reset()

    asyncio.run(main())


# -- the server on each engine ------------------------------------------------

async def _serve(short_tmp, dev):
    server = Server()
    exp = server.add_export("disk", dev)
    path = str(short_tmp / "s")
    await server.start_unix(path)
    return server, exp, f"nbd+unix:///disk?socket={path}"


def _spy_writes(eng):
    """Record (length, flags) of every write handed to ``eng``."""
    seen = []
    real = eng.write

    def write(fd, buf, offset, flags, cb):
        seen.append((memoryview(buf).nbytes, flags))
        real(fd, buf, offset, flags, cb)
    eng.write = write
    return seen


def test_server_write_read_flush_fua(io_engine, image, short_tmp):
    async def main():
        dev = FileDev(image)
        server, exp, uri = await _serve(short_tmp, LiveDev(dev))
        eng = io.for_loop()
        seen = _spy_writes(eng) if eng is not None else None
        try:
            async with await connect(uri) as c:
                small = [bytes([i]) * 4096 for i in range(64)]
                await asyncio.gather(*(c.pwrite(b, i * 4096) for i, b in enumerate(small)))
                large = [os.urandom(256 * 1024) for _ in range(8)]
                await asyncio.gather(*(c.pwrite(b, (1 << 20) + i * len(b)) for i, b in enumerate(large)))
                # Read-your-writes: every write above was answered, so every
                # read (fast path or engine) sees it.
                for i, b in enumerate(small):
                    assert await c.pread(4096, i * 4096) == b
                assert await c.pread(2 << 20, 1 << 20) == b"".join(large)
                await c.flush()
                await c.pwrite(b"F" * 65536, 5 << 20, fua=True)
                assert await c.pread(65536, 5 << 20) == b"F" * 65536
                await c.zero(6 << 20, 1 << 20)
                assert await c.pread(1 << 20, 6 << 20) == bytes(1 << 20)
            st = exp.stats
            assert st.ops[Cmd.WRITE] == 64 + 8 + 1 and st.failed[Cmd.WRITE] == 0
            assert exp.inflight == 0
            if seen is not None:
                assert (65536, os.RWF_DSYNC) in seen  # FUA through the engine, RWF_DSYNC
                assert sum(1 for n, _ in seen if n == 256 * 1024) == 8  # large writes offloaded
                assert not any(n == 4096 for n, _ in seen)  # 4 KiB stayed inline
        finally:
            await server.shutdown()
        with open(image, "rb") as f:
            assert f.read(4096) == small[0]
            f.seek(1 << 20)
            assert f.read(2 << 20) == b"".join(large)

    asyncio.run(main())


def test_server_write_then_read_same_range_interleaved(io_engine, image, short_tmp):
    """Writes that overlap, each awaited before the next and before a read
    of the range: every read sees the last completed write, whichever path
    (inline, engine, fast read) each took."""

    async def main():
        server, exp, uri = await _serve(short_tmp, LiveDev(FileDev(image)))
        try:
            async with await connect(uri) as c:
                for rnd in range(20):
                    n = 4096 if rnd % 2 else 192 * 1024
                    data = bytes([rnd]) * n
                    await c.pwrite(data, 8192, fua=rnd % 3 == 0)
                    assert await c.pread(n, 8192) == data
        finally:
            await server.shutdown()

    asyncio.run(main())


def test_server_write_error_is_an_nbd_error(io_engine, image, short_tmp):
    async def main():
        dev = FileDev(image)
        server, exp, uri = await _serve(short_tmp, LiveDev(dev))
        good = dev.fd
        dev.fd = os.open(image, os.O_RDONLY)  # every write now fails with EBADF
        try:
            async with await connect(uri) as c:
                for n in (4096, 512 * 1024):
                    with pytest.raises(OSError) as ei:
                        await c.pwrite(b"e" * n, 0)
                    assert ei.value.errno in (errno.EINVAL, errno.EIO)  # EBADF's NBD code
                # The connection survives the errors.
                assert await c.pread(4096, 0) == bytes(4096)
            assert exp.stats.failed[Cmd.WRITE] == 2 and exp.inflight == 0
        finally:
            os.close(dev.fd)
            dev.fd = good
            await server.shutdown()

    asyncio.run(main())


def test_filedev_large_reads_and_flush_go_to_the_engine(io_engine, image):
    async def main():
        dev = FileDev(image)
        eng = io.for_loop()
        calls = []
        if eng is not None:
            for name in ("read", "fsync"):
                real = getattr(eng, name)

                def spy(*a, _real=real, _name=name):
                    calls.append(_name)
                    _real(*a)
                setattr(eng, name, spy)
        data = os.urandom(2 << 20)
        await dev.pwrite(data, 1 << 20)
        buf = bytearray(2 << 20)
        await dev.pread(memoryview(buf), 1 << 20)
        assert buf == data
        small = bytearray(4096)
        await dev.pread(memoryview(small), 1 << 20)
        assert small == data[:4096]
        await dev.flush()
        nowait = dev._nowait  # False where RWF_NOWAIT is refused (overlayfs, tmpfs): no inline reads there
        await dev.close()
        if eng is not None:
            # the 4 KiB read stayed inline (page cache), unless this file system refuses RWF_NOWAIT
            assert calls == (["read", "fsync"] if nowait else ["read", "read", "fsync"]), calls

    asyncio.run(main())
