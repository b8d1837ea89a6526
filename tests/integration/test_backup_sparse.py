"""A full backup of a big sparse disk with live writes racing the pump.

Invariant 1 on the fast sparse path (`copystate` rules 1, 3 and 11): the
pump learns the source's zero runs in bulk, claims a whole run at once and,
into a target that reads as zeros, writes nothing for it; live writes that
land anywhere meanwhile (into data not yet copied, into holes, zeroing data)
must still leave the target equal to the disk at backup start.  The disks
are 1 TiB (memory) and 256 GiB (a sparse file): the test also fails (times
out) if any step costs in proportion to the virtual size.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from nbdbackup.backup.engine import Engine, MemoryExportTable
from nbdbackup.blockdev.file import FileDev
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.blockdev.memory import PAGE, MemoryDev

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CS = 64 * KiB


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def pieces_for(size: int, n: int, rng: random.Random) -> dict[int, bytes]:
    """``n`` random pieces (offset -> bytes, 4 KiB-aligned, up to 384 KiB) spread over ``size``."""
    out: dict[int, bytes] = {}
    stride = size // n
    for i in range(n):
        off = (i * stride + rng.randrange(0, stride - MiB)) & ~4095
        out[off] = rng.randbytes(rng.choice([4 * KiB, 100 * KiB, 384 * KiB]))
    return out


async def race(live: LiveDev, job, size: int, pieces: dict[int, bytes], rng: random.Random) -> int:
    """Write, zero and trim the live disk while the job runs; returns how
    many of those requests were made while the job was still running."""
    offs = sorted(pieces)
    during = 0
    for i in range(400):
        k = rng.random()
        if k < 0.4:  # overwrite inside a piece (maybe not copied yet)
            off = rng.choice(offs) + rng.randrange(0, 4096)
            await live.pwrite(rng.randbytes(rng.choice([512, 8 * KiB, 200 * KiB])), off)
        elif k < 0.7:  # write into a hole
            off = rng.randrange(0, size - MiB) & ~511
            await live.pwrite(b"\xab" * rng.choice([512, 64 * KiB, 300 * KiB]), off)
        elif k < 0.85:  # zero a piece
            off = rng.choice(offs)
            await live.zero(off, len(pieces[off]), may_trim=True)
        else:  # trim around a piece
            off = rng.choice(offs) & ~(CS - 1)
            await live.trim(off, 2 * CS)
        if job.status.value == "running":
            during += 1
        await asyncio.sleep(0)
    return during


@pytest.mark.parametrize("target_kind", ["zero", "stale"])
def test_full_backup_of_1tib_sparse_memory_disk_with_racing_writes(target_kind):
    async def main():
        rng = random.Random(12)
        size = TiB
        mem = MemoryDev(size)
        pieces = pieces_for(size, 48, rng)
        for off, data in pieces.items():
            mem.write_sync(data, off)
        orig = {i: bytes(p) for i, p in mem.pages.items()}
        tgt = MemoryDev(size)
        if target_kind == "stale":
            # Old bytes where the source has holes: the target is not assumed
            # zero (rule 11), the pump must zero over them.
            for i in range(20):
                tgt.write_sync(b"\xee" * 5000, rng.randrange(0, size - MiB))
        live = LiveDev(mem)
        table = MemoryExportTable()
        table.add("disk", live, read_only=False)
        engine = Engine(table, lambda n, d: None)
        await engine.backup_start("disk", "j", "full", tgt, snapshot="snap")
        job = engine.jobs["j"]
        assert job.state.target_zero == (target_kind == "zero")
        during = await race(live, job, size, pieces, rng)
        await job.wait()
        info = engine.query_jobs()[0]
        assert info["status"] == "concluded" and "error" not in info, info
        assert during >= 5, during  # the writes really raced the pump
        assert info["bytes-copied-by-cbw"] > 0 or info["clusters-zero-in-snapshot"] > 0, info
        # The target is the disk at backup start: every page, data or not.
        for i in set(tgt.pages) | set(orig):
            got = bytes(tgt.pages[i]) if i in tgt.pages else bytes(PAGE)
            assert got == orig.get(i, bytes(PAGE)), f"page {i} (offset {i * PAGE}) differs"
        await engine.job_dismiss("j")
        await live.close()
    run(main())


def test_full_backup_of_256gib_sparse_file_with_racing_writes(short_tmp):
    async def main():
        rng = random.Random(7)
        size = 256 * GiB
        src_path, tgt_path = str(short_tmp / "src.raw"), str(short_tmp / "tgt.raw")
        pieces = pieces_for(size, 40, rng)
        with open(src_path, "wb") as f:
            f.truncate(size)
            for off, data in pieces.items():
                os.pwrite(f.fileno(), data, off)

        def expected(off: int, n: int) -> bytes:
            b = bytearray(n)
            for p, data in pieces.items():
                lo, hi = max(p, off), min(p + len(data), off + n)
                if lo < hi:
                    b[lo - off:hi - off] = data[lo - p:hi - p]
            return bytes(b)

        live = LiveDev(FileDev(src_path))
        table = MemoryExportTable()
        table.add("disk", live, read_only=False)
        engine = Engine(table, lambda n, d: None)
        await engine.backup_start("disk", "j", "full", tgt_path, snapshot="snap")
        job = engine.jobs["j"]
        assert job.state.target_zero  # a file the engine created
        during = await race(live, job, size, pieces, rng)
        await job.wait()
        info = engine.query_jobs()[0]
        assert info["status"] == "concluded" and "error" not in info, info
        assert during >= 5, during
        await engine.job_dismiss("j")
        await live.close()
        # Every piece is there, and every data extent of the target holds the
        # start-time bytes (zeros outside the pieces): holes read zeros.
        fd = os.open(tgt_path, os.O_RDONLY)
        try:
            assert os.fstat(fd).st_size == size
            for off, data in pieces.items():
                assert os.pread(fd, len(data), off) == data, off
            pos, allocated = 0, 0
            while pos < size:
                try:
                    d = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                h = os.lseek(fd, d, os.SEEK_HOLE)
                allocated += h - d
                for q in range(d, h, 4 * MiB):
                    n = min(4 * MiB, h - q)
                    assert os.pread(fd, n, q) == expected(q, n), q
                pos = h
            # Cost follows the data: the target is about as big as the pieces.
            assert allocated <= sum(len(d) for d in pieces.values()) + 2 * CS * len(pieces) + 64 * MiB
        finally:
            os.close(fd)
    run(main())
