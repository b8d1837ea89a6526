"""A reconnecting `NBDDev` (re-exports, ``nbd://`` backup targets) against our server.

Before: a re-export (``serve p=nbd://...``) whose remote connection was lost
failed every later request with EIO until ``serve`` restarted (hunt 10).  Now
the device reconnects, holds requests for ``reconnect_delay`` seconds, and
writes again every write acknowledged since the last FLUSH before anything
else uses the new connection: a remote that restarted having lost its cache
still ends up holding what our callers were told was written.

The remote's storage here is `VolatileDev`: a memory disk whose writes live
in a cache until FLUSH; `crash()` throws the cache away, as a server host's
power cut or a remote with a write-back cache that was killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os

import pytest

from nbdbackup.blockdev import nbd as nbdmod
from nbdbackup.blockdev.memory import MemoryDev
from nbdbackup.blockdev.nbd import NBDDev
from nbdbackup.nbd.server import Server

from test_server_batch import run

MiB = 1 << 20
SIZE = 4 * MiB


class VolatileDev(MemoryDev):
    """Writes are durable only after FLUSH; `crash` loses the rest.  ``flushes`` counts FLUSHes."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.durable: dict[int, bytearray] = {}
        self.flushes = 0

    def flush(self):
        """Makes durable what was written when the server called it (at once, not when the
        coroutine first runs); answers a little later, so that writes the server takes
        meanwhile are answered first and are not covered -- as a server whose FLUSH
        runs on another thread than its writes."""
        self.flushes += 1
        snap = {k: bytearray(v) for k, v in self.pages.items()}

        async def done() -> None:
            await asyncio.sleep(0.02)
            self.durable = snap

        return done()

    def crash(self) -> None:
        self.pages = {k: bytearray(v) for k, v in self.durable.items()}

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.read_sync(memoryview(buf), offset)
        return bytes(buf)


class Remote:
    """Our server exporting ``vol`` as "d" on the Unix socket ``path``; `crash` kills it the
    way a power cut would (connections gone, unflushed writes lost), `start` starts a new one."""

    def __init__(self, path: str, vol: VolatileDev) -> None:
        self.path, self.vol = path, vol
        self.server: Server | None = None

    async def start(self, vol: VolatileDev | None = None) -> None:
        self.vol = vol or self.vol
        self.server = Server(workers=0)
        self.server.add_export("d", self.vol)
        await self.server.start_unix(self.path)

    async def crash(self) -> None:
        assert self.server is not None
        flush = self.vol.flush
        self.vol.flush = _nothing  # type: ignore[method-assign] - no last flush on the way down
        await self.server.shutdown(timeout=1)
        self.vol.flush = flush  # type: ignore[method-assign]
        self.vol.crash()


async def _nothing() -> None:
    pass


@contextlib.asynccontextmanager
async def remote_and_device(tmp, **open_kw):
    """A `Remote` and an `NBDDev` opened on it with ``open_kw``; both closed at the end."""
    r = Remote(str(tmp / "s"), VolatileDev(SIZE))
    await r.start()
    dev = await NBDDev.open(f"nbd+unix:///d?socket={r.path}", **open_kw)
    try:
        yield r, dev
    finally:
        await dev.close()
        await r.server.shutdown()


async def read(dev: NBDDev, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await dev.pread(memoryview(buf), offset)
    return bytes(buf)


def test_unflushed_writes_are_written_again_after_the_remote_restarted(short_tmp, caplog):
    caplog.set_level(logging.WARNING, logger="nbdbackup.blockdev.nbd")

    async def main():
        async with remote_and_device(short_tmp, reconnect_delay=10, replay=True) as (remote, dev):
            vol = remote.vol
            await dev.pwrite(b"\x11" * 4096, 0)
            await dev.flush()
            await dev.pwrite(b"\x22" * 4096, 4096)  # acknowledged, not flushed
            await dev.zero(8192, 4096)  # a zero over data that is durable
            await dev.pwrite(b"\x33" * 4096, 65536, fua=True)
            vol.durable[0][8192:12288] = b"\x44" * 4096  # (the durable copy had data there)
            await remote.crash()
            assert vol.read(4096, 4096) == bytes(4096)  # the remote lost it
            assert vol.read(8192, 4096) == b"\x44" * 4096
            await remote.start()
            # The read waits for the reconnection, which writes the log again first.
            assert await read(dev, 0, 12288) == b"\x11" * 4096 + b"\x22" * 4096 + bytes(4096)
            assert vol.read(4096, 4096) == b"\x22" * 4096
            assert await read(dev, 65536, 4096) == b"\x33" * 4096
            await dev.flush()
            assert bytes(vol.durable[0][4096:12288]) == b"\x22" * 4096 + bytes(4096)
            assert dev._log == [] and dev._log_bytes == 0  # the FLUSH covered all of it
            text = nbdmod.prometheus_text()  # (serve --metrics)
            remote = f'{{remote="{dev.uri}"}}'
            assert f"nbdbackup_remote_connected{remote} 1\n" in text
            assert f"nbdbackup_remote_reconnects_total{remote} 1\n" in text
            assert f"nbdbackup_remote_replayed_bytes_total{remote} 8192\n" in text  # 0x22 and the FUA 0x33
            assert f"nbdbackup_remote_replay_log_bytes{remote} 0\n" in text

    run(main())
    assert "reconnected" in caplog.text


def test_requests_wait_for_the_delay_then_fail_and_a_later_reconnection_serves_again(short_tmp):
    async def main():
        async with remote_and_device(short_tmp, reconnect_delay=0.5, replay=True) as (remote, dev):
            await dev.pwrite(b"\x55" * 4096, 0)
            await remote.crash()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(OSError) as e:
                await read(dev, 0, 4096)
            assert e.value.errno == errno.EIO and "reconnecting" in str(e.value)
            assert 0.3 < loop.time() - t0 < 3
            assert f'nbdbackup_remote_connected{{remote="{dev.uri}"}} 0\n' in nbdmod.prometheus_text()
            with pytest.raises(OSError) as e:  # past the delay: at once
                await read(dev, 0, 4096)
            assert loop.time() - t0 < 3
            # The device kept trying in the background: once the remote is back, it serves.
            await remote.start()
            while True:
                try:
                    got = await read(dev, 0, 4096)
                    break
                except OSError:
                    assert loop.time() - t0 < 15
                    await asyncio.sleep(0.05)
            assert got == b"\x55" * 4096  # the unflushed write, written again

    run(main())


def test_a_remote_that_comes_back_with_another_disk_is_not_used(short_tmp, caplog):
    caplog.set_level(logging.WARNING, logger="nbdbackup.blockdev.nbd")

    async def main():
        async with remote_and_device(short_tmp, reconnect_delay=0.5, replay=True) as (remote, dev):
            await dev.pwrite(b"\x66" * 4096, 0)
            await remote.crash()
            other = VolatileDev(2 * SIZE)
            await remote.start(other)
            await asyncio.sleep(0.6)
            with pytest.raises(OSError) as e:
                await read(dev, 0, 4096)
            assert e.value.errno == errno.EIO
            assert other.read(0, 4096) == bytes(4096)  # nothing written to the other disk

    run(main())
    assert "the export changed" in caplog.text


def test_a_full_replay_log_flushes_and_stays_bounded(short_tmp, monkeypatch):
    monkeypatch.setattr(nbdmod, "REPLAY_LOG_MAX", 256 * 1024)

    async def main():
        async with remote_and_device(short_tmp, reconnect_delay=10, replay=True) as (remote, dev):
            vol = remote.vol
            chunk = b"\x77" * 65536
            await asyncio.gather(*(dev.pwrite(chunk, k * 65536) for k in range(16)))
            assert vol.flushes >= 1
            assert dev._log_bytes <= nbdmod.REPLAY_LOG_MAX
            for k in range(16, 24):
                await dev.pwrite(chunk, k * 65536)
                assert dev._log_bytes <= nbdmod.REPLAY_LOG_MAX
            await remote.crash()
            await remote.start()
            assert await read(dev, 0, 24 * 65536) == chunk * 24  # flushed or written again

    run(main())


def test_without_a_replay_log_the_next_flush_reports_the_loss_once(short_tmp, caplog):
    """A backup target keeps no log (`open_spec` without ``replay``): it reconnects, but the
    FLUSH after a loss that may have dropped acknowledged writes fails with EIO -- the job
    fails rather than finish with a target missing what the remote lost."""
    caplog.set_level(logging.WARNING, logger="nbdbackup.blockdev.nbd")

    async def main():
        async with remote_and_device(short_tmp, reconnect_delay=10) as (remote, dev):
            await dev.pwrite(b"\x11" * 4096, 0)
            await dev.flush()
            await remote.crash()  # nothing unflushed: a clean reconnection
            await remote.start()
            assert await read(dev, 0, 4096) == b"\x11" * 4096
            await dev.flush()
            await dev.pwrite(b"\x22" * 4096, 4096)  # acknowledged, then lost
            await remote.crash()
            await remote.start()
            assert remote.vol.read(4096, 4096) == bytes(4096)  # no log: the remote lost it
            with pytest.raises(OSError) as e:
                await dev.flush()
            assert e.value.errno == errno.EIO and "may be lost" in str(e.value)
            await dev.flush()  # reported once
            assert dev._log == []

    run(main())
    assert "acknowledged writes may be lost" in caplog.text


def test_a_device_without_reconnection_still_fails_for_good(short_tmp):
    """`pull` opens its source this way (it has `reopen_lost`): unchanged."""
    from nbdbackup.errors import ConnectionClosed

    async def main():
        async with remote_and_device(short_tmp) as (remote, dev):
            await remote.crash()
            await remote.start()
            with pytest.raises(ConnectionClosed):
                await read(dev, 0, 4096)
            assert dev._log == []

    run(main())


@pytest.mark.parametrize("seed", range(4))
def test_random_writes_flushes_and_remote_crashes_lose_nothing_acknowledged(short_tmp, seed, monkeypatch):
    """Batches of concurrent writes (distinct blocks within a batch), zeroes and trims-as-zeroes,
    FLUSHes and remote crashes (losing its cache) at random, with a small replay log so that
    log-full FLUSHes happen too: after every batch the device reads back exactly what was
    acknowledged, and after the last FLUSH the remote's durable copy is exactly that."""
    import random

    monkeypatch.setattr(nbdmod, "REPLAY_LOG_MAX", 48 * 1024)
    rng = random.Random(seed)
    blocks = SIZE // 4096

    async def main():
        async with remote_and_device(short_tmp, reconnect_delay=10, replay=True) as (remote, dev):
            vol = remote.vol
            model = bytearray(SIZE)
            for step in range(40):
                r = rng.random()
                if r < 0.15:
                    await remote.crash()
                    await remote.start()
                elif r < 0.3:
                    await dev.flush()
                else:
                    picks = rng.sample(range(blocks), rng.randint(1, 6))
                    fl = None
                    if rng.random() < 0.5:  # a FLUSH in flight while the batch's writes complete
                        fl = asyncio.ensure_future(dev.flush())
                        await asyncio.sleep(0.005)
                    ops = []
                    for b in picks:
                        off, n = b * 4096, 4096
                        if rng.random() < 0.2:
                            ops.append(dev.zero(off, n, may_trim=rng.random() < 0.5))
                            model[off:off + n] = bytes(n)
                        else:
                            data = bytes([rng.randrange(1, 256)]) * n
                            ops.append(dev.pwrite(data, off, fua=rng.random() < 0.2))
                            model[off:off + n] = data
                    await asyncio.gather(*ops)
                    if fl is not None:
                        await fl
                assert await read(dev, 0, SIZE) == bytes(model), step
            await dev.flush()
            vol.crash()  # only what is durable remains
            assert vol.read(0, SIZE) == bytes(model)

    run(main())


def test_a_request_answered_eshutdown_runs_again_on_the_next_connection(short_tmp):
    """A remote going away may answer requests NBD_ESHUTDOWN (nbdkit and qemu-nbd do on
    SIGTERM) instead of doing them: a reconnecting device runs such a request again once the
    remote is back, rather than failing it (hunt 14's open question).  The remotes here are
    raw servers: the first answers the READ ESHUTDOWN, the second with data."""
    from nbdbackup.nbd import wire
    from nbdbackup.nbd.wire import Opt

    from test_client_soft_disconnect import _go_answer, _options

    path = str(short_tmp / "s")

    async def main():
        answered = asyncio.Event()

        async def first(r, w):
            await _options(r, w, _go_answer(SIZE), last=Opt.GO)
            _, _, _, cookie, _, _ = wire.REQUEST.unpack(await r.readexactly(wire.REQUEST_SIZE))
            w.write(wire.pack_simple_reply(cookie, wire.Err.ESHUTDOWN))
            answered.set()
            while await r.read(4096):  # until the client's CMD_DISC and close
                pass
            w.close()

        async def second(r, w):
            await _options(r, w, _go_answer(SIZE), last=Opt.GO)
            _, _, _, cookie, off, n = wire.REQUEST.unpack(await r.readexactly(wire.REQUEST_SIZE))
            w.write(wire.pack_simple_reply(cookie, 0) + b"r" * n)
            while await r.read(4096):
                pass
            w.close()

        srv = await asyncio.start_unix_server(first, path)
        dev = await NBDDev.open(f"nbd+unix:///disk?socket={path}", reconnect_delay=10, replay=True)
        try:
            pending = asyncio.ensure_future(read(dev, 0, 4096))
            await asyncio.wait_for(answered.wait(), 10)
            srv.close()
            await srv.wait_closed()
            os.unlink(path)
            srv = await asyncio.start_unix_server(second, path)
            assert await asyncio.wait_for(pending, 10) == b"r" * 4096
        finally:
            await dev.close()
            srv.close()
            await srv.wait_closed()

    run(main())


def test_zeroes_and_trims_without_flush_keep_the_replay_log_bounded(short_tmp, monkeypatch):
    """Hunt 15: a zero or a trim held no bytes, so it cost the log nothing: a client
    zeroing or discarding without FLUSH (mkfs, fstrim, qemu-img convert of a sparse
    image) grew it without bound -- memory, and a replay of one round trip per entry
    longer than the delay.  Each entry now counts at least `REPLAY_ENTRY_COST` bytes."""
    monkeypatch.setattr(nbdmod, "REPLAY_LOG_MAX", 64 * 1024)

    async def main():
        async with remote_and_device(short_tmp, reconnect_delay=10, replay=True) as (remote, dev):
            vol = remote.vol
            for k in range(200):
                off = (k % 512) * 4096
                if k % 2:
                    await dev.zero(off, 4096)
                else:
                    await dev.trim(off, 4096)
            assert vol.flushes >= 1
            assert len(dev._log) * nbdmod.REPLAY_ENTRY_COST <= nbdmod.REPLAY_LOG_MAX
            await dev.pwrite(b"\x12" * 512, 0)  # a small write costs a whole entry too
            assert dev._log_bytes <= nbdmod.REPLAY_LOG_MAX

    run(main())


def test_a_remote_back_within_the_delay_serves_the_waiting_requests(short_tmp):
    """Hunt 15: the pause between attempts doubled up to 5 s even while requests were
    waiting, so a remote back within ``reconnect_delay`` could be tried only after it:
    with a 3 s delay, attempts at ~1.55 s and ~3.15 s after the loss, a remote back at
    1.7 s failed the waiting read with EIO.  While requests may wait, attempts now come
    at most `RECONNECT_PAUSE_WAITING` apart."""

    async def main():
        async with remote_and_device(short_tmp, reconnect_delay=3, replay=True) as (remote, dev):
            await dev.pwrite(b"\x21" * 4096, 0)
            loop = asyncio.get_running_loop()
            await remote.crash()
            while dev._down_since is None:
                await asyncio.sleep(0.01)
            pending = asyncio.ensure_future(read(dev, 0, 4096))
            await asyncio.sleep(dev._down_since + 1.7 - loop.time())
            await remote.start()
            assert await pending == b"\x21" * 4096

    run(main())


def test_without_a_replay_log_reads_after_a_lossy_reconnection_fail(short_tmp):
    """Hunt 15: a backup target or scratch (no replay log) is read back -- snapshot reads of
    the clusters copy-before-write put there, the pump moving scratch to target.  After a
    remote lost acknowledged writes, the reconnected device read what the remote kept
    (zeros here): a silently wrong snapshot, or a wrong target the final FLUSH of another
    device would not report.  Every read fails with EIO from then on; a loss with nothing
    unflushed changes nothing."""

    async def main():
        async with remote_and_device(short_tmp, reconnect_delay=10) as (remote, dev):
            await dev.pwrite(b"\x31" * 4096, 0)
            await dev.flush()
            await remote.crash()  # nothing unflushed: reads go on
            await remote.start()
            assert await read(dev, 0, 4096) == b"\x31" * 4096
            await dev.pwrite(b"\x32" * 4096, 4096)  # acknowledged, then lost
            await remote.crash()
            await remote.start()
            for _ in range(2):
                with pytest.raises(OSError) as e:
                    await read(dev, 4096, 4096)
                assert e.value.errno == errno.EIO and "may not be what was written" in str(e.value)
            with pytest.raises(OSError):
                await dev.flush()  # (and the FLUSH reports the loss, once)
            with pytest.raises(OSError):
                await read(dev, 0, 4096)  # still: the device stays unreadable

    run(main())


def test_closing_during_the_replay_drops_the_new_connection(short_tmp):
    """Hunt 15: `close` (``block-export-del``, ``serve`` stopping) cancels the reconnecting
    task; cancelled while writing the log again, it left the new connection open for the
    life of the process (a qemu-nbd, one client by default, then refuses the next one).
    Raw servers: the first acknowledges a WRITE and drops the connection; the second takes
    the replayed WRITE, never answers, and must see the connection close."""
    from nbdbackup.nbd import wire
    from nbdbackup.nbd.wire import Info, Opt, Rep, TransmissionFlag as TFl

    from test_client_soft_disconnect import _options

    path = str(short_tmp / "s")
    flags = int(TFl.HAS_FLAGS | TFl.SEND_FLUSH)

    def answer(opt):
        if opt == Opt.GO:
            return (wire.pack_option_reply(opt, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, SIZE, flags))
                    + wire.pack_option_reply(opt, Rep.ACK))
        return wire.pack_option_reply(opt, Rep.ERR_UNSUP)

    async def main():
        n = 0
        replaying, eof = asyncio.Event(), asyncio.Event()

        async def serve(r, w):
            nonlocal n
            n += 1
            await _options(r, w, answer, last=Opt.GO)
            _, _, _, cookie, _, length = wire.REQUEST.unpack(await r.readexactly(wire.REQUEST_SIZE))
            await r.readexactly(length)
            if n == 1:
                w.write(wire.pack_simple_reply(cookie, 0))
                await w.drain()
                w.close()
                return
            replaying.set()
            while await r.read(4096):
                pass
            eof.set()
            w.close()

        srv = await asyncio.start_unix_server(serve, path)
        dev = await NBDDev.open(f"nbd+unix:///disk?socket={path}", reconnect_delay=10, replay=True)
        try:
            await dev.pwrite(b"\x41" * 4096, 0)
            await asyncio.wait_for(replaying.wait(), 10)
            await dev.close()
            await asyncio.wait_for(eof.wait(), 3)
        finally:
            await dev.close()
            srv.close()
            await srv.wait_closed()

    run(main())


def test_a_reexport_reads_what_was_written_when_the_remote_allocation_lags(short_tmp):
    """Hunt 15 (found with libnbd -> serve -> nbdkit 1.32 ``--filter=cache cache=writeback``):
    nbdkit's cache filter answers ``base:allocation`` from the file underneath, so data
    written and not yet flushed is "hole, zero" there.  Our server answered READs of 64 KiB
    and more from ``base:allocation`` (sparse reads), so a client of the re-export read
    zeros where it had just written; libnbd on nbdkit directly read the data.  A remote
    device's READs are now always read (`Capabilities.sparse_reads`)."""
    from nbdbackup.blockdev.base import Extent
    from nbdbackup.nbd.client import connect
    from nbdbackup.nbd.wire import StateFlag

    class LaggingAllocation(MemoryDev):
        async def extents(self, offset, length, context="base:allocation"):
            return [Extent(offset, length, int(StateFlag.HOLE | StateFlag.ZERO))]

    async def main():
        remote = Server(workers=0)
        remote.add_export("d", LaggingAllocation(SIZE))
        await remote.start_unix(str(short_tmp / "r"))
        dev = await NBDDev.open(f"nbd+unix:///d?socket={short_tmp / 'r'}", reconnect_delay=10, replay=True)
        front = Server(workers=0)
        front.add_export("p", dev)
        await front.start_unix(str(short_tmp / "f"))
        try:
            c = await connect(f"nbd+unix:///p?socket={short_tmp / 'f'}")
            data = b"\x5a" * (128 * 1024)
            await c.pwrite(data, 65536)
            assert bytes(await c.pread(128 * 1024, 65536)) == data
            await c.disconnect()
        finally:
            await front.shutdown()
            await remote.shutdown()

    run(main())
