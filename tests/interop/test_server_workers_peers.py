"""``nbdbackup serve --workers 2`` against real peers (`nbd.worker`).

qemu-io, nbdcopy (several connections, spread over both workers) and qemu-img
read and write a file export whose connections are served by worker
processes (the server log names the worker of each); a backup started over
QMP while a libnbd client writes (in a worker) recalls it: the snapshot is
the disk after exactly a prefix of the acknowledged writes (invariant 1),
the live export ends as the model says, and later writes reach the target
only through copy-before-write; once the job is dismissed the connection
goes back to a worker (``/metrics``) and keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import struct
import subprocess
import threading
import time
import urllib.request

import pytest
from qemu.qmp import QMPClient

import peers
from peers import wait_concluded

MiB = 1 << 20
WORKERS = ["--workers", "2"]


def children_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each child process of ``pid`` (the workers)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            for c in f.read().split():
                with open(f"/proc/{c}/stat") as st:
                    fields = st.read().rpartition(")")[2].split()
                out[int(c)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def own_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as st:
        fields = st.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def run(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_qemu_io_nbdcopy_qemu_img_through_workers(serve, short_tmp):
    rng = random.Random(11)
    disk = short_tmp / "disk.raw"
    disk.write_bytes(bytes(64 * MiB))
    src = short_tmp / "src.raw"
    src.write_bytes(rng.randbytes(64 * MiB))
    with serve(f"disk={disk}", extra=WORKERS) as peer:
        uri = peer.uri_for("disk")
        out = run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 1M 3M", "-c", "flush",
                   "-c", "read -P 0x5a 1M 3M", "-c", "read -P 0 0 1M"])
        assert "Pattern verification failed" not in out
        # Another connection (another worker, or the same) sees it.
        out = run(["qemu-io", "-f", "raw", "-r", uri, "-c", "read -P 0x5a 2M 1M"])
        assert "Pattern verification failed" not in out
        cpu0 = children_cpu(peer.pid)
        assert len(cpu0) == 2, cpu0  # the two workers
        own0 = own_cpu(peer.pid)
        for _ in range(4):
            run(["nbdcopy", "--connections=4", str(src), uri])
        back = short_tmp / "back.raw"
        run(["nbdcopy", "--connections=4", uri, str(back)])
        cpu1 = children_cpu(peer.pid)
        own = own_cpu(peer.pid) - own0
        # The workers moved the bytes; the server process only ran handshakes.
        moved = sum(cpu1[p] - cpu0[p] for p in cpu0)
        assert moved >= 0.1 and moved > 3 * own, (cpu0, cpu1, own)
        assert back.read_bytes() == src.read_bytes()
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri])
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    assert disk.read_bytes() == src.read_bytes()
    assert peer.returncode == 0, peer.log()


@pytest.mark.timeout(120)
def test_backup_start_recalls_a_writing_worker_connection(serve, short_tmp):
    nbd = pytest.importorskip("nbd")
    # Blocks far apart on a disk much larger than what the pump copies at
    # once (speed 1): the snapshot of a block must come from copy-before-write.
    block, nblocks, stride = 4096, 256, 256 * 1024
    size = stride * nblocks
    disk = short_tmp / "disk.raw"
    disk.write_bytes(bytes(size))
    target = short_tmp / "t.raw"
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    rng = random.Random(3)
    order = [rng.randrange(nblocks) for _ in range(20000)]
    port = peers.free_tcp_port()
    with serve(f"disk={disk}", extra=WORKERS + ["--control", ctl, "--metrics", f"127.0.0.1:{port}"]) as peer:
        h = nbd.NBD()
        h.connect_uri(peer.uri_for("disk"))
        acked = [0]
        stop = threading.Event()

        def writer():
            # Synchronous writes: a total order; block b holds the number of its last write.
            for i, b in enumerate(order):
                if stop.is_set():
                    break
                h.pwrite(struct.pack(">Q", i + 1) * (block // 8), b * stride)
                acked[0] = i + 1
        t = threading.Thread(target=writer)
        t.start()

        async def scenario() -> tuple[int, int, dict]:
            qmp = QMPClient("workers")
            await qmp.connect(ctl)
            try:
                while acked[0] < 2000:
                    await asyncio.sleep(0.01)
                before = acked[0]
                await qmp.execute("backup-start", {"export": "disk", "job-id": "j", "sync": "full",
                                                   "target": os.fspath(target), "speed": 1})
                after = acked[0]
                while acked[0] < after + 2000 and t.is_alive():
                    await asyncio.sleep(0.01)
                stop.set()
                await asyncio.to_thread(t.join)
                hs = nbd.NBD()
                hs.connect_uri(peer.uri_for("disk@j"))
                snap = b"".join(bytes(hs.pread(block, b * stride)) for b in range(nblocks))
                hs.shutdown()
                await qmp.execute("job-set-speed", {"id": "j", "speed": 0})
                info = await wait_concluded(qmp, "j")
                await qmp.execute("job-dismiss", {"id": "j"})
                return before, after, info, snap
            finally:
                await qmp.disconnect()

        before, after, info, snap = asyncio.run(asyncio.wait_for(scenario(), 90))
        # Job dismissed: the recalled connection goes back to a worker
        # (after the debounce), and keeps serving right there.
        deadline = time.monotonic() + 15
        while "nbdbackup_worker_rehandoffs_total 1" not in scrape(port):
            assert time.monotonic() < deadline, scrape(port)
            time.sleep(0.1)
        text = scrape(port)
        assert sum(int(m) for m in re.findall(r'nbdbackup_worker_connections\{worker="\d+"\} (\d+)', text)) == 1
        for i in range(acked[0], min(acked[0] + 1000, len(order))):
            h.pwrite(struct.pack(">Q", i + 1) * (block // 8), order[i] * stride)
            acked[0] = i + 1
        h.flush()
        final = b"".join(bytes(h.pread(block, b * stride)) for b in range(nblocks))
        h.shutdown()
    seen = [struct.unpack_from(">Q", snap, b * block)[0] for b in range(nblocks)]
    for b in range(nblocks):
        assert snap[b * block:(b + 1) * block] == struct.pack(">Q", seen[b]) * (block // 8)
    k = max(seen)
    # Every write acknowledged before backup-start was sent is in; none
    # acknowledged after it returned; exactly a prefix.
    assert before <= k <= after + 1, (before, k, after)
    last = [0] * nblocks
    for i in range(k):
        last[order[i]] = i + 1
    assert seen == last, "the snapshot is not the disk after exactly a prefix of the writes"
    n = acked[0]
    model = [0] * nblocks
    for i in range(n):
        model[order[i]] = i + 1
    assert [struct.unpack_from(">Q", final, b * block)[0] for b in range(nblocks)] == model
    assert "error" not in info, info
    t = target.read_bytes()
    assert b"".join(t[b * stride:b * stride + block] for b in range(nblocks)) == snap


@pytest.mark.timeout(120)
def test_a_persistent_bitmap_export_is_served_by_workers_and_its_bitmap_is_exact(serve, short_tmp):
    """docs/workers.md "Bitmaps": with a persistent bitmap the libnbd
    writer's connection is still served by a worker (``/metrics``, and the
    workers' CPU), and afterwards ``qemu:dirty-bitmap:b0`` (asked by a
    second libnbd handle: served by the server process) is exactly the
    granules of its writes, zeroes and trims; the bitmap's file says
    in-use-synced after the writer's FLUSH."""
    nbd = pytest.importorskip("nbd")
    from nbdbackup.bitmap.store import DATA_OFFSET, STATE_SYNCED, read_header

    size, g = 256 * MiB, 64 * 1024
    disk = short_tmp / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(size)
    state = short_tmp / "state"
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    port = peers.free_tcp_port()
    rng = random.Random(41)
    with serve(f"disk={disk}", extra=WORKERS + ["--control", ctl, "--state-dir", os.fspath(state),
                                                "--metrics", f"127.0.0.1:{port}"]) as peer:
        async def add():
            qmp = QMPClient("bm")
            await qmp.connect(ctl)
            try:
                await qmp.execute("block-dirty-bitmap-add", {"export": "disk", "name": "b0",
                                                             "persistent": True})
            finally:
                await qmp.disconnect()
        asyncio.run(asyncio.wait_for(add(), 20))
        h = nbd.NBD()
        h.connect_uri(peer.uri_for("disk"))
        text = scrape(port)
        assert sum(int(m) for m in re.findall(r'nbdbackup_worker_connections\{worker="\d+"\} (\d+)', text)) == 1
        cpu0 = children_cpu(peer.pid)
        model: set[int] = set()
        for i in range(3000):
            n = rng.choice([512, 4096, 4096, 3 * g + 512, MiB])
            off = rng.randrange(0, size - n) // 512 * 512
            kind = rng.random()
            if kind < 0.8:
                h.pwrite(bytes([i & 255 | 1]) * n, off, nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0)
            elif kind < 0.9:
                h.zero(n, off)
            else:
                h.trim(n, off)
            model |= set(range(off // g, (off + n - 1) // g + 1))
            if i % 500 == 499:
                h.flush()
        h.flush()
        cpu1 = children_cpu(peer.pid)
        assert sum(cpu1[p] - cpu0.get(p, 0) for p in cpu1) > 0.1, (cpu0, cpu1)
        (path,) = [os.path.join(dp, f) for dp, _, fs in os.walk(state) for f in fs if f.endswith(".bitmap")]
        with open(path, "rb") as f:
            raw = f.read()
        assert read_header(raw[:DATA_OFFSET]).state == STATE_SYNCED
        bits = raw[DATA_OFFSET:]
        assert {i for i in range(size // g) if bits[i >> 3] >> (i & 7) & 1} == model
        q = nbd.NBD()
        q.add_meta_context("qemu:dirty-bitmap:b0")
        q.connect_uri(peer.uri_for("disk"))
        got: set[int] = set()
        pos = 0
        while pos < size:
            ext: list = []

            def cb(meta, offset, entries, err):
                if meta == "qemu:dirty-bitmap:b0":
                    ext.extend(entries)
                return 0
            q.block_status(min(size - pos, 1 << 30), pos, cb)
            for ln, flags in zip(ext[0::2], ext[1::2]):
                if flags & 1:
                    got |= set(range(pos // g, (pos + ln - 1) // g + 1))
                pos += ln
        assert got == model
        q.shutdown()
        h.shutdown()
    assert peer.returncode == 0, peer.log()
