"""Interop: our client against our own server (``nbdbackup serve``), and `NBDDev` re-exported.

The server runs as a subprocess (``python -m nbdbackup.cli serve``) on a Unix
socket in a temp dir and is killed by PID at teardown.  The re-export test
chains qemu-nbd -> ``nbdbackup serve NAME=nbd+unix://...`` (an `NBDDev`) ->
our client and nbdinfo, and checks data, allocation depth and writes
end to end with qemu-io.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import peers

from nbdbackup.blockdev.base import ALLOCATION_DEPTH, BASE_ALLOCATION, HOLE_ZERO, Extent
from nbdbackup.blockdev.nbd import NBDDev
from nbdbackup.nbd.client import connect, list_exports, list_meta_contexts
from nbdbackup.nbd.wire import TransmissionFlag as TF

K, M = 1 << 10, 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "nbdbackup", "nbd", "server.py")),
                                reason="nbdbackup/nbd/server.py is not there yet")


@pytest.fixture
def tmp(short_tmp):
    """The shared short temp dir, as a str (these tests join paths with os.path)."""
    return str(short_tmp)


def peer(argv: list[str], sock: str):
    """Start ``argv`` (a server listening on ``sock``); stop it by PID on exit."""
    return peers.started(argv, sock, cwd=ROOT)


def serve(tmp: str, *exports: str):
    sock = os.path.join(tmp, "ours.sock")
    return peer([sys.executable, "-m", "nbdbackup.cli", "serve", "--socket", sock, *exports], sock), sock


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, errors="replace")
    assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r.stdout


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_against_our_server_memory(tmp):
    cm, sock = serve(tmp, "mem=memory:64M")
    with cm:
        uri = f"nbd+unix:///mem?socket={sock}"

        async def main():
            assert [e.name for e in await list_exports(uri)] == ["mem"]
            assert BASE_ALLOCATION in await list_meta_contexts(uri)
            c = await connect(uri, meta_contexts=[BASE_ALLOCATION, ALLOCATION_DEPTH])
            try:
                assert c.structured and c.size == 64 * M
                assert set(c.meta_contexts) == {BASE_ALLOCATION, ALLOCATION_DEPTH}
                data = os.urandom(5 * M)
                await c.pwrite(data, 1 * M + 7)
                assert await c.pread(5 * M, 1 * M + 7) == data
                await asyncio.gather(*(c.pwrite(bytes([i]) * (64 * K), 32 * M + i * 64 * K) for i in range(32)))
                got = await asyncio.gather(*(c.pread(64 * K, 32 * M + i * 64 * K) for i in range(32)))
                assert all(g == bytes([i]) * (64 * K) for i, g in enumerate(got))
                if c.can(TF.SEND_WRITE_ZEROES):
                    await c.zero(2 * M, 1 * M)
                    assert await c.pread(1 * M, 2 * M) == bytes(M)
                await c.flush()
                ext = await c.block_status(0, c.size)
                assert ext[0] == Extent(0, 1 * M, HOLE_ZERO)
                assert ext[-1].end == c.size
                depth = await c.block_status(0, 4 * M, ALLOCATION_DEPTH)
                assert depth[0] == Extent(0, 1 * M, 0)
            finally:
                await c.disconnect()

            dev = await NBDDev.open(uri, connections=4)
            try:
                n = len(dev.clients)
                assert n == (4 if dev.capabilities().can_multi_conn else 1)
                bufs = [memoryview(bytearray(M)) for _ in range(8)]
                # (3M+7, 3M): past the zeroed (2M, 1M), data[2M:5M]
                await asyncio.gather(*(dev.pread(b, 3 * M + 7 + i * M) for i, b in enumerate(bufs[:3])))
                assert b"".join(bytes(b) for b in bufs[:3]) == data[2 * M : 5 * M]
            finally:
                await dev.close()

        run(main())


def test_reexport_of_qemu_nbd_through_nbddev(tmp):
    base = os.path.join(tmp, "b.qcow2")
    top = os.path.join(tmp, "t.qcow2")
    sh("qemu-img", "create", "-f", "qcow2", base, "8M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 2M", base)
    sh("qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x62 1M 64k", top)
    qsock = os.path.join(tmp, "q.sock")
    with peer(["qemu-nbd", "-k", qsock, "-f", "qcow2", "-x", "inner", "-t", "--shared=8", "-A", top], qsock):
        cm, sock = serve(tmp, f"outer=nbd+unix:///inner?socket={qsock}")
        with cm:
            uri = f"nbd+unix:///outer?socket={sock}"

            async def main():
                c = await connect(uri, meta_contexts=[BASE_ALLOCATION, ALLOCATION_DEPTH])
                try:
                    assert c.size == 8 * M
                    assert await c.pread(64 * K, 1 * M) == b"\x62" * (64 * K)
                    assert await c.pread(10, 2 * M - 5) == b"\x61" * 5 + bytes(5)
                    await c.pwrite(b"\x63" * (128 * K), 4 * M)
                    await c.flush()
                    # the server passes the inner device's contexts through
                    assert ALLOCATION_DEPTH in c.meta_contexts
                    return await c.block_status(0, c.size, ALLOCATION_DEPTH)
                finally:
                    await c.disconnect()

            depth = run(main())
            assert depth == [Extent(0, 1 * M, 2), Extent(1 * M, 64 * K, 1), Extent(1 * M + 64 * K, 1 * M - 64 * K, 2),
                             Extent(2 * M, 2 * M, 0), Extent(4 * M, 128 * K, 1), Extent(4 * M + 128 * K, 4 * M - 128 * K, 0)]
            ref = json.loads(sh("nbdinfo", "--json", "--map", uri))
            assert [(e["offset"], e["length"]) for e in ref if e["type"] == 0][:1] == [(0, 2 * M)]
    sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x63 4M 128k", "-c", "read -P 0x62 1M 64k", top)
