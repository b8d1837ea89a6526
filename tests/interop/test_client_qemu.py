"""Interop: our NBD client and `NBDDev` against qemu-nbd and qemu-storage-daemon.

What we write through NBD is checked with ``qemu-io`` on the image after the
server is gone; allocation depth over a qcow2 backing chain and dirty
bitmaps (``qemu-nbd -B``) are checked against what the images really hold.
Each test starts its own peer on a Unix socket in a fresh temp dir and kills
it by PID at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
import peers
from qemutools import qemu_io as _qemu_io

from nbdbackup.blockdev.base import ALLOCATION_DEPTH, BASE_ALLOCATION, HOLE_ZERO, Extent
from nbdbackup.blockdev.nbd import NBDDev
from nbdbackup.errors import ConfigError, OptionError
from nbdbackup.nbd.client import connect, list_meta_contexts
from nbdbackup.nbd.wire import TransmissionFlag as TF

K, M = 1 << 10, 1 << 20


@pytest.fixture
def tmp(short_tmp):
    """The shared short temp dir, as a str (these tests join paths with os.path)."""
    return str(short_tmp)


def peer(argv: list[str], sock: str):
    """Start ``argv`` (a server listening on ``sock``); stop it by PID on exit."""
    return peers.started(argv, sock)


@contextlib.contextmanager
def qemu_nbd(tmp: str, image: str, fmt: str, *extra: str, name: str = "disk"):
    sock = os.path.join(tmp, f"qnbd-{time.monotonic_ns()}.sock")
    with peer(["qemu-nbd", "-k", sock, "-f", fmt, "-x", name, "-t", "--shared=8", *extra, image], sock):
        yield f"nbd+unix:///{name}?socket={sock}"


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, errors="replace")
    assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r.stdout


def qemu_io(fmt: str, image: str, *cmds: str) -> str:  # this file's argument order
    return _qemu_io(image, *cmds, fmt=fmt)


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_reads_and_writes_match_qemu_io(tmp, fmt):
    img = os.path.join(tmp, f"disk.{fmt}")
    sh("qemu-img", "create", "-f", fmt, img, "16M")
    qemu_io(fmt, img, "write -P 0x11 0 1M", "write -P 0x22 8M 64k")

    with qemu_nbd(tmp, img, fmt) as uri:
        async def main():
            c = await connect(uri, meta_contexts=[BASE_ALLOCATION])
            try:
                assert c.size == 16 * M and not c.read_only
                assert c.can(TF.SEND_FLUSH) and c.can(TF.SEND_FUA) and c.can(TF.SEND_WRITE_ZEROES)
                assert await c.pread(M, 0) == b"\x11" * M
                assert await c.pread(100, 8 * M - 50) == bytes(50) + b"\x22" * 50
                await c.pwrite(b"\x33" * (2 * M), 2 * M)
                await c.pwrite(b"\x44" * 1000, 5 * M + 3, fua=True)  # unaligned: min block is 1
                await c.zero(0, 64 * K)
                await c.zero(8 * M, 64 * K, no_hole=True)
                await asyncio.gather(*(c.pwrite(bytes([0x50 + i]) * (64 * K), 12 * M + i * 64 * K)
                                       for i in range(16)))
                await c.flush()
                assert await c.pread(64 * K, 0) == bytes(64 * K)
                ext = await c.block_status(0, c.size)
                assert ext[0].offset == 0 and ext[-1].end == c.size
                assert Extent(2 * M, 2 * M, 0) in ext or any(
                    e.offset <= 2 * M and e.end >= 4 * M and e.flags == 0 for e in ext)
            finally:
                await c.disconnect()

        run(main())

    qemu_io(fmt, img,
            "read -P 0 0 64k", "read -P 0x11 64k 960k", "read -P 0x33 2M 2M",
            "read -P 0 5M 3", "read -P 0x44 5242883 1000", "read -P 0 8M 64k",
            *[f"read -P {0x50 + i} {12 * M + i * 64 * K} 64k" for i in range(16)])


def test_allocation_depth_over_backing_chain(tmp):
    base = os.path.join(tmp, "base.qcow2")
    top = os.path.join(tmp, "top.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", base, "4M")
    qemu_io("qcow2", base, "write -P 0xaa 0 1M")
    sh("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io("qcow2", top, "write -P 0xbb 512k 64k", "write -P 0xcc 2M 64k")
    with qemu_nbd(tmp, top, "qcow2", "-A") as uri:
        assert ALLOCATION_DEPTH in run(list_meta_contexts(uri, ["qemu:"]))

        async def main():
            dev = await NBDDev.open(uri)
            try:
                assert ALLOCATION_DEPTH in dev.meta_contexts()
                depth = await dev.extents(0, dev.size, ALLOCATION_DEPTH)
                alloc = await dev.extents(0, dev.size, BASE_ALLOCATION)
                buf = memoryview(bytearray(64 * K))
                await dev.pread(buf, 512 * K)
                return depth, alloc, bytes(buf)
            finally:
                await dev.close()

        depth, alloc, data = run(main())
    assert depth == [
        Extent(0, 512 * K, 2),  # backing only
        Extent(512 * K, 64 * K, 1),  # written in the overlay
        Extent(576 * K, 448 * K, 2),
        Extent(1 * M, 1 * M, 0),  # unallocated in both
        Extent(2 * M, 64 * K, 1),
        Extent(2 * M + 64 * K, 2 * M - 64 * K, 0),
    ]
    assert alloc[0] == Extent(0, 1 * M, 0) and alloc[1] == Extent(1 * M, 1 * M, HOLE_ZERO)
    assert data == b"\xbb" * (64 * K)


def test_dirty_bitmap(tmp):
    img = os.path.join(tmp, "d.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", img, "8M")
    qemu_io("qcow2", img, "write -P 1 0 1M")  # before the bitmap: not recorded
    sh("qemu-img", "bitmap", "--add", img, "b0")
    # qemu-io opens the qcow2 with its persistent enabled bitmap, which records writes
    qemu_io("qcow2", img, "write -P 2 1M 64k", "write -P 3 5M 128k", "write -P 4 5000000 10")
    info = json.loads(sh("qemu-img", "info", "--output=json", img))
    assert [b["name"] for b in info["format-specific"]["data"]["bitmaps"]] == ["b0"]
    with qemu_nbd(tmp, img, "qcow2", "-B", "b0", "-r") as uri:
        async def main():
            c = await connect(uri, meta_contexts=["qemu:dirty-bitmap:"])
            try:
                assert list(c.meta_contexts) == ["qemu:dirty-bitmap:b0"]
                assert c.read_only
                whole = await c.block_status(0, c.size, "qemu:dirty-bitmap:b0")
                part = await c.block_status(1 * M + 100, 200, "qemu:dirty-bitmap:b0")
                with pytest.raises(OSError):
                    await c.block_status(0, c.size, BASE_ALLOCATION)  # not negotiated
                return whole, part
            finally:
                await c.disconnect()

        whole, part = run(main())
    gran = 64 * K
    b5m = 5000000 // gran * gran
    assert whole == [
        Extent(0, 1 * M, 0),
        Extent(1 * M, gran, 1),
        Extent(1 * M + gran, b5m - (1 * M + gran), 0),
        Extent(b5m, gran, 1),
        Extent(b5m + gran, 5 * M - b5m - gran, 0),
        Extent(5 * M, 128 * K, 1),
        Extent(5 * M + 128 * K, 3 * M - 128 * K, 0),
    ]
    assert part == [Extent(1 * M + 100, 200, 1)]


def test_nbddev_multi_conn_and_reexport_chain(tmp):
    img = os.path.join(tmp, "m.raw")
    sh("qemu-img", "create", "-f", "raw", img, "32M")
    with qemu_nbd(tmp, img, "raw") as uri:
        async def main():
            dev = await NBDDev.open(uri, connections=4)
            try:
                assert len(dev.clients) == 4
                caps = dev.capabilities()
                assert caps.can_multi_conn and caps.can_extents and not caps.read_only
                blocks = {i: os.urandom(256 * K) for i in range(64)}
                await asyncio.gather(*(dev.pwrite(b, i * 256 * K) for i, b in blocks.items()))
                await dev.flush()
                bufs = {i: memoryview(bytearray(256 * K)) for i in blocks}
                await asyncio.gather(*(dev.pread(bufs[i], i * 256 * K) for i in blocks))
                assert all(bytes(bufs[i]) == blocks[i] for i in blocks)
                await dev.zero(0, 256 * K, may_trim=True)
                await dev.trim(256 * K, 256 * K)
                return blocks
            finally:
                await dev.close()

        blocks = run(main())
        ro = run(NBDDev.open(uri, read_only=True))
        try:
            assert ro.capabilities().read_only
            with pytest.raises(OSError):
                run(ro.pwrite(b"x", 0))
        finally:
            run(ro.close())
    qemu_io("raw", img, "read -P 0 0 256k", *[f"read -P {blocks[i][0]} {i * 256 * K} 1" for i in range(2, 64)])


def test_unknown_export_is_refused(tmp):
    img = os.path.join(tmp, "u.raw")
    sh("qemu-img", "create", "-f", "raw", img, "1M")
    with qemu_nbd(tmp, img, "raw") as uri:
        with pytest.raises(OptionError):
            run(connect(uri, export="nope"))
        with pytest.raises(ConfigError, match="refused"):
            run(NBDDev.open(uri.replace("/disk?", "/nope?")))


def test_qemu_storage_daemon_export(tmp):
    img = os.path.join(tmp, "q.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", img, "8M")
    sock = os.path.join(tmp, "qsd.sock")
    argv = ["qemu-storage-daemon",
            "--blockdev", f"driver=file,filename={img},node-name=file0",
            "--blockdev", "driver=qcow2,file=file0,node-name=fmt0",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=fmt0,name=vm,writable=on,allocation-depth=on"]
    with peer(argv, sock):
        uri = f"nbd+unix:///vm?socket={sock}"

        async def main():
            dev = await NBDDev.open(uri)
            try:
                assert set(dev.meta_contexts()) >= {BASE_ALLOCATION, ALLOCATION_DEPTH}
                await dev.pwrite(b"\x5a" * (1 * M), 3 * M)
                await dev.flush()
                buf = memoryview(bytearray(2 * M))
                await dev.pread(buf, 2 * M)
                assert bytes(buf) == bytes(M) + b"\x5a" * M
                return await dev.extents(0, dev.size, ALLOCATION_DEPTH)
            finally:
                await dev.close()

        depth = run(main())
    assert depth == [Extent(0, 3 * M, 0), Extent(3 * M, M, 1), Extent(4 * M, 4 * M, 0)]
    qemu_io("qcow2", img, "read -P 0x5a 3M 1M", "read -P 0 0 3M")


def test_info_command_matches_nbdinfo(tmp):
    base = os.path.join(tmp, "ib.qcow2")
    top = os.path.join(tmp, "it.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", base, "4M")
    qemu_io("qcow2", base, "write -P 1 0 1M")
    sh("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    qemu_io("qcow2", top, "write -P 2 2M 64k")
    with qemu_nbd(tmp, top, "qcow2", "-A") as uri:
        cli = [sys.executable, "-m", "nbdbackup.cli", "info"]
        for ctx in (BASE_ALLOCATION, ALLOCATION_DEPTH):
            ours = json.loads(sh(*cli, "--json", "--map", ctx, uri))
            ref = json.loads(sh("nbdinfo", "--json", f"--map={ctx}", uri))
            assert [(e["offset"], e["length"], e["flags"]) for e in ours["map"]["extents"]] == \
                   [(e["offset"], e["length"], e["type"]) for e in ref]
        text = sh(*cli, "--map", ALLOCATION_DEPTH, uri)
        assert text.splitlines()[0].split() == ["0", str(M), "2", "backing", "depth", "2"]
        plain = sh(*cli, uri)
        assert "size: 4194304" in plain and "CAN_MULTI_CONN" in plain and ALLOCATION_DEPTH in plain
        listed = json.loads(sh(*cli, "--list", "--json", uri))
        assert [e["export"] for e in listed["exports"]] == ["disk"]
        r = subprocess.run([*cli, "--map", "qemu:dirty-bitmap:none", uri], capture_output=True, text=True, errors="replace")
        assert r.returncode == 1 and "does not offer" in r.stderr and "Traceback" not in r.stderr
