#!/usr/bin/env python3
"""Per-request cost of the snapshot export's task-free READ path, in process, no NBD.

Role: what the server pays per READ on a snapshot export beyond the live
export's, without the socket and client noise of a shared machine (the
``snap-read-idle`` row's other costs are the page-cache copy and the send,
identical for both exports).  A 256 MiB random file in the page cache, a
``sync=none`` backup with a snapshot (`Engine`, `LiveDev` over `FileDev`),
then for each request size the best of ``--repeat`` passes over the file
of: ``FileDev.pread_now``, the live export's ``pread_now``, the snapshot's
``pread_now``, and the ``extents_now`` both exports answer before every
structured READ of 64 KiB or more (`nbd.server._read_now`).  Printed: us
per call; then the per-call overhead of each export's layers alone (the
copy stubbed out: steadier than the copy on a shared machine).  Run it from a checkout (``cd DIR && DIR/.venv/bin/python
/path/to/snap_read_micro.py``) to compare checkouts: it imports the
``nbdbackup`` of the current directory.

Invariant: the temp dir is removed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, os.getcwd())

import common  # noqa: E402


async def run(ws: str, size: int, repeat: int) -> None:
    from nbdbackup.backup.engine import Engine, MemoryExportTable
    from nbdbackup.blockdev.file import FileDev
    from nbdbackup.blockdev.live import LiveDev

    img = os.path.join(ws, "img")
    common.make_random_file(img, size)
    common.warm_cache(img)
    src = FileDev(img)
    live = LiveDev(src)
    table = MemoryExportTable()
    table.add("disk", live, read_only=False)
    engine = Engine(table)
    await engine.backup_start("disk", "j", "none", os.path.join(ws, "tgt"), snapshot="snap")
    snap = table.get("snap").dev
    for length in (256 << 10, 1 << 20):
        buf = memoryview(bytearray(length))
        cases = (("file pread_now", src.pread_now), ("live pread_now", live.pread_now),
                 ("snap pread_now", snap.pread_now),
                 ("live extents_now", lambda b, o: live.extents_now(o, len(b))),
                 ("snap extents_now", lambda b, o: snap.extents_now(o, len(b))))
        for name, fn in cases:
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                for off in range(0, size, length):
                    if not fn(buf, off):
                        raise RuntimeError(f"{name} declined at {off} (page cache?)")
                best = min(best, time.perf_counter() - t0)
            print(f"{length >> 10:5} KiB  {name:17} {best / (size // length) * 1e6:8.2f} us/call", flush=True)
    # The same without the page-cache copy (FileDev.pread_now stubbed): the
    # per-call overhead of each layer alone, steadier than the copy.
    src.pread_now = lambda buf, offset: True  # type: ignore[method-assign]
    for length in (256 << 10, 1 << 20):
        buf = memoryview(bytearray(length))
        for name, dev in (("live", live), ("snap", snap)):
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                for off in range(0, size, length):
                    dev.pread_now(buf, off)
                    dev.extents_now(off, length)
                best = min(best, time.perf_counter() - t0)
            print(f"{length >> 10:5} KiB  {name} pread_now+extents_now, no copy {best / (size // length) * 1e6:6.2f} "
                  f"us/call", flush=True)
    engine.job_cancel("j")


def main() -> int:
    common.warm_guest_memory()
    size = common.parse_size(sys.argv[1]) if len(sys.argv) > 1 else 256 << 20
    ws = tempfile.mkdtemp(prefix="snapmicro-", dir="/tmp")
    try:
        asyncio.run(run(ws, size, repeat=9))
    finally:
        shutil.rmtree(ws, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
