"""Interop: our NBD client (`nbd.client`, `blockdev.nbd.NBDDev`) against nbdkit.

Each test starts its own nbdkit on a Unix socket in a fresh temp dir and
kills it by PID at teardown.  libnbd (Python ``nbd``) serves as the
reference reader where the plugin's data or extents are not known in
closed form.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import struct
import subprocess

import pytest
import peers

from nbdbackup.blockdev.base import BASE_ALLOCATION, HOLE_ZERO, Extent
from nbdbackup.errors import ConnectionClosed
from nbdbackup.nbd.client import connect, list_exports
from nbdbackup.nbd.wire import TransmissionFlag as TF


@contextlib.contextmanager
def nbdkit(*args: str):
    """`peers.nbdkit` spelled as nbdkit's own command line (options, filters,
    plugin, its arguments); yields the export's URI."""
    filters = [a.split("=", 1)[1] for a in args if a.startswith("--filter=")]
    options = [a for a in args if a.startswith("-") and not a.startswith("--filter=")]
    plugin, *rest = [a for a in args if not a.startswith("-")]
    with peers.nbdkit(plugin, *rest, filters=filters, extra=options) as p:
        yield p.uri


def run(coro):
    return asyncio.run(coro)


def libnbd_handle(uri: str, contexts=()):
    import nbd

    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri)
    return h


def libnbd_extents(h, offset: int, length: int, context: str) -> list[Extent]:
    """All extents of (offset, length) as libnbd reports them, merged and clipped."""
    out: list[Extent] = []
    pos, end = offset, offset + length
    while pos < end:
        got: list[tuple[int, int]] = []

        def cb(metacontext, off, entries, err):
            if metacontext == context:
                got.extend(zip(entries[0::2], entries[1::2]))
            return 0

        h.block_status(min(end - pos, 1 << 30), pos, cb)
        at = pos
        for n, f in got:
            s, e = at, min(at + n, end)
            at += n
            if e <= s:
                break
            if out and out[-1].flags == f and out[-1].end == s:
                out[-1] = Extent(out[-1].offset, out[-1].length + e - s, f)
            else:
                out.append(Extent(s, e - s, f))
        pos = min(at, end)
    return out


def test_memory_read_write_zero_trim_extents():
    with nbdkit("memory", "64M") as uri:
        async def main():
            c = await connect(uri, meta_contexts=[BASE_ALLOCATION])
            try:
                assert c.size == 64 << 20
                assert c.can(TF.SEND_TRIM) and c.can(TF.SEND_WRITE_ZEROES) and c.can(TF.CAN_MULTI_CONN)
                assert c.meta_contexts.keys() == {BASE_ALLOCATION}
                data = os.urandom(3 << 20)
                await c.pwrite(data, 1 << 20)
                await c.pwrite(b"tail", c.size - 4, fua=True)
                assert await c.pread(3 << 20, 1 << 20) == data
                assert await c.pread(4, c.size - 4) == b"tail"
                assert await c.pread(10, (1 << 20) - 5) == bytes(5) + data[:5]  # unaligned, across a boundary
                await c.zero(2 << 20, 1 << 20)
                await c.trim(3 << 20, 1 << 20)
                await c.flush()
                await c.cache(0, 1 << 20)
                got = await c.pread(3 << 20, 1 << 20)
                assert got[: 1 << 20] == data[: 1 << 20] and got[1 << 20 :] == bytes(2 << 20)
                ext = await c.block_status(0, c.size)
                # nbdkit memory allocates in 32K pages and reports zeroed/trimmed as holes
                assert ext[0] == Extent(0, 1 << 20, HOLE_ZERO)
                assert ext[1] == Extent(1 << 20, 1 << 20, 0)
                assert ext[2].offset == 2 << 20 and ext[2].flags == HOLE_ZERO
                assert ext[-1].end == c.size and ext[-1].flags == 0  # the 4-byte tail page
                assert all(a.end == b.offset and a.flags != b.flags for a, b in zip(ext, ext[1:]))
                first = await c.block_status(0, c.size, req_one=True)
                assert first == [Extent(0, 1 << 20, HOLE_ZERO)]
            finally:
                await c.disconnect()
            assert c.closed
            with pytest.raises(ConnectionClosed):
                await c.pread(1, 0)

        run(main())


def test_many_requests_in_flight():
    with nbdkit("memory", "64M") as uri:
        async def main():
            c = await connect(uri, max_in_flight=16)
            peak = 0
            stop = False

            async def watch():  # the bound: never more than 16 requests on the wire
                nonlocal peak
                while not stop:
                    peak = max(peak, len(c._tx.pending))
                    await asyncio.sleep(0)

            w = asyncio.create_task(watch())
            try:
                blocks = {i: os.urandom(65536) for i in range(200)}
                await asyncio.gather(*(c.pwrite(b, i * 65536) for i, b in blocks.items()))
                bufs = {i: bytearray(65536) for i in blocks}
                await asyncio.gather(*(c.pread(bufs[i], i * 65536) for i in blocks))
                assert all(bufs[i] == blocks[i] for i in blocks)
            finally:
                stop = True
                await w
                await c.disconnect()
            assert 8 <= peak <= 16, peak


def test_pread_buffer_kinds():
    """Any writable C-contiguous buffer is filled in place; others are refused before sending."""
    with nbdkit("pattern", "1M") as uri:
        async def main():
            c = await connect(uri)
            try:
                want = b"".join(struct.pack(">Q", o) for o in range(4096, 4096 + 512, 8))
                arr = array.array("I", bytes(512))  # itemsize 4: cast to bytes
                assert await c.pread(arr, 4096) is arr and arr.tobytes() == want
                grid = memoryview(bytearray(512)).cast("B", (16, 32))  # 2-D, contiguous
                await c.pread(grid, 4096)
                assert grid.tobytes() == want
                with pytest.raises(TypeError):
                    await c.pread(memoryview(bytearray(1024))[::2], 4096)  # not contiguous
                with pytest.raises(TypeError):
                    await c.pread(b"x" * 512, 4096)  # read-only
                assert await c.pread(8, 8) == struct.pack(">Q", 8)  # connection still fine
                assert not c._tx.pending
            finally:
                await c.disconnect()

        run(main())

        run(main())


def test_sparse_random_data_and_extents_match_libnbd():
    with nbdkit("sparse-random", "64M", "seed=7", "percent=20", "runlength=65536") as uri:
        h = libnbd_handle(uri, [BASE_ALLOCATION])
        try:
            ref = h.pread(h.get_size(), 0)
            ref_ext = libnbd_extents(h, 0, h.get_size(), BASE_ALLOCATION)
        finally:
            h.shutdown()

        async def main():
            c = await connect(uri, meta_contexts=[BASE_ALLOCATION], max_in_flight=8)
            try:
                buf = bytearray(c.size)
                await c.pread(buf, 0)  # split at the 32M default maximum
                ext = await c.block_status(0, c.size)
                part = await c.block_status(12345, 3 << 20)
                return buf, ext, part
            finally:
                await c.disconnect()

        buf, ext, part = run(main())
        assert buf == ref
        assert ext == ref_ext and len(ext) > 10
        assert part[0].offset == 12345 and part[-1].end == 12345 + (3 << 20)
        for e in ext:  # data extents hold data, holes read as zeroes
            if e.flags & 2:
                assert buf[e.offset : e.end] == bytes(e.length)


def test_pattern_plugin():
    with nbdkit("pattern", "1G") as uri:
        async def main():
            c = await connect(uri)
            try:
                assert c.read_only or not c.can(TF.SEND_TRIM)
                got = await c.pread(1 << 20, (1 << 29) + 8)
                odd = await c.pread(13, 5)
                return got, odd
            finally:
                await c.disconnect()

        got, odd = run(main())
        base = (1 << 29) + 8
        assert got == b"".join(struct.pack(">Q", base + 8 * i) for i in range((1 << 20) // 8))
        assert odd == b"".join(struct.pack(">Q", o) for o in range(0, 24, 8))[5:18]


def test_error_filter_read_error_then_connection_still_usable(short_tmp):
    inject = os.path.join(short_tmp, "inject")
    with nbdkit("--filter=error", "memory", "16M", "error-pread=EIO", "error-pread-rate=1",
                f"error-pread-file={inject}", "error-pwrite=ENOSPC", "error-pwrite-rate=1",
                f"error-pwrite-file={inject}") as uri:
        async def main():
            c = await connect(uri)
            try:
                await c.pwrite(b"x" * 4096, 0)
                open(inject, "w").close()
                with pytest.raises(OSError) as ei:
                    await c.pread(4096, 0)
                assert ei.value.errno == errno.EIO
                with pytest.raises(OSError) as ei:
                    await c.pwrite(b"y" * 4096, 0)
                assert ei.value.errno == errno.ENOSPC
                # many failing requests at once, all reported, none lost
                res = await asyncio.gather(*(c.pread(512, i * 512) for i in range(20)), return_exceptions=True)
                assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in res)
                os.unlink(inject)
                assert await c.pread(4096, 0) == b"x" * 4096  # same connection
            finally:
                await c.disconnect()

        run(main())


def test_blocksize_policy_minimum_and_maximum_are_honoured():
    """With blocksize-error-policy=error nbdkit rejects any violation with EINVAL."""
    with nbdkit("--filter=blocksize-policy", "memory", "16M", "blocksize-minimum=4096",
                "blocksize-preferred=16384", "blocksize-maximum=65536", "blocksize-error-policy=error") as uri:
        async def main():
            c = await connect(uri, meta_contexts=[BASE_ALLOCATION])
            try:
                bs = c.block_sizes
                assert (bs.minimum, bs.preferred, bs.maximum, bs.advertised) == (4096, 16384, 65536, True)
                data = os.urandom(1 << 20)
                await c.pwrite(data, 0)  # split into 16 x 64K
                assert await c.pread(1 << 20, 0) == data  # split into 16 x 64K
                assert await c.pread(100, 4000) == data[4000:4100]  # widened to 4K bounds
                assert await c.pread(70000, 1) == data[1:70001]  # widened and split
                with pytest.raises(OSError) as ei:
                    await c.pwrite(b"z" * 100, 10)  # we refuse unaligned writes ourselves
                assert ei.value.errno == errno.EINVAL
                with pytest.raises(OSError) as ei:
                    await c.zero(4096, 100)
                assert ei.value.errno == errno.EINVAL
                await c.trim(100, 8192)  # shrunk to (4096, 4096): accepted
                await c.zero(8192, 2 << 20)  # larger than maximum: no payload, fine
                ext = await c.block_status(1, 10000)
                assert ext[0].offset == 1 and ext[-1].end == 10001
            finally:
                await c.disconnect()

        run(main())


def test_small_maximum_splits_reads():
    with nbdkit("--filter=blocksize-policy", "pattern", "16M", "blocksize-maximum=64K",
                "blocksize-error-policy=error") as uri:
        async def main():
            c = await connect(uri)
            try:
                return c.block_sizes, await c.pread(1 << 20, 1 << 20)
            finally:
                await c.disconnect()

        bs, got = run(main())
        assert bs.maximum == 65536 and bs.advertised
        assert got == b"".join(struct.pack(">Q", (1 << 20) + 8 * i) for i in range((1 << 20) // 8))


def test_list_exports_and_descriptions():
    with nbdkit("--filter=exportname", "memory", "1M", "exportname=a", "exportname=b",
                "exportdesc=fixed:hello", "exportname-list=explicit") as uri:
        exports = run(list_exports(uri))
        assert [e.name for e in exports] == ["a", "b"]
        assert all(e.size == 1 << 20 and e.description == "hello" for e in exports)


def test_tcp_loopback():
    port = peers.free_tcp_port()
    proc = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "pattern", "1M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        peers.wait_for_tcp(port, lambda: proc.poll() is None, lambda: proc.stderr.read().decode())

        async def main():
            c = await connect(f"nbd://127.0.0.1:{port}")
            try:
                return await c.pread(16, 8)
            finally:
                await c.disconnect()

        assert run(main()) == struct.pack(">QQ", 8, 16)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("args, fallback", [
    (["--no-sr"], False),  # OPT_GO, simple replies only
    (["--no-sr", "--mask-handshake=0"], True),  # not fixed newstyle: OPT_EXPORT_NAME + 124 zeroes
])
def test_old_servers_simple_replies_and_export_name(args, fallback):
    with nbdkit(*args, "memory", "4M") as uri:
        async def main():
            c = await connect(uri, meta_contexts=[BASE_ALLOCATION])
            try:
                assert not c.structured and c.fallback is fallback
                assert c.meta_contexts == {}
                data = os.urandom(300000)
                await c.pwrite(data, 12345)
                got = await asyncio.gather(*(c.pread(1000, 12345 + i * 1000) for i in range(300)))
                assert b"".join(got) == data
                with pytest.raises(OSError):
                    await c.block_status(0, 4096)
            finally:
                await c.disconnect()

        run(main())


def test_nbddev_capabilities_and_block_sizes():
    with nbdkit("--filter=blocksize-policy", "--filter=nozero", "memory", "16M", "blocksize-minimum=4096",
                "blocksize-preferred=8K", "blocksize-maximum=12K", "blocksize-error-policy=error") as uri:
        from nbdbackup.blockdev.base import BlockSize
        from nbdbackup.blockdev.nbd import NBDDev

        async def main():
            dev = await NBDDev.open(uri, connections=3)
            try:
                caps = dev.capabilities()
                assert caps.block_size == BlockSize(4096, 8192, 12288)  # max not a power of 2
                assert caps.can_multi_conn and len(dev.clients) == 3
                assert caps.can_trim and caps.can_flush and not caps.can_fast_zero
                assert dev.meta_contexts() == (BASE_ALLOCATION,)
                data = os.urandom(64 * 1024)
                await dev.pwrite(data, 4096)
                await dev.zero(4096, 8192)  # no WRITE_ZEROES on the server: emulated with writes
                with pytest.raises(OSError) as ei:
                    await dev.zero(4096, 8192, fast=True)
                assert ei.value.errno == errno.ENOTSUP
                buf = memoryview(bytearray(64 * 1024))
                await dev.pread(buf, 4096)
                assert bytes(buf) == bytes(8192) + data[8192:]
            finally:
                await dev.close()

        run(main())


def test_disconnect_lets_queued_requests_finish_then_refuses_new_ones():
    with nbdkit("memory", "1M") as uri:
        async def main():
            c = await connect(uri, max_in_flight=2)
            tasks = [asyncio.ensure_future(c.pread(4096, i * 4096)) for i in range(50)]
            await asyncio.sleep(0)  # all 50 started: 2 in flight, 48 queued on the semaphore
            await c.disconnect()
            res = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(r == bytes(4096) for r in res), [r for r in res if not isinstance(r, bytearray)][:3]
            with pytest.raises(ConnectionClosed):
                await c.pread(1, 0)

        run(main())
