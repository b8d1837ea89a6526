"""Bug hunt regressions: worker connections of exports with persistent
dirty bitmaps (docs/hunt.md).

An in-process server with real worker processes (as
test_server_workers_bitmaps); a worker's write is held in flight on purpose
by fault injection (``workerfaults/sitecustomize.py`` first on the workers'
``PYTHONPATH``: a write of one marked length sleeps in the thread pool).

- A client that disconnects (or is evicted) while one of its writes is in
  flight in a worker: the worker must not tell the server process that the
  connection is gone (``closed``: it stops counting it as an external
  writer, so a bitmap change no longer recalls anything) before that write
  has landed.  Otherwise a ``block-dirty-bitmap-clear`` returns first and
  the write changes the disk after it, with no bit: the next incremental
  misses it (invariant 3).  Shown to fail before the fix (the clear
  returned with the write still sleeping; the disk changed afterwards with
  the granules clean).
"""

from __future__ import annotations

import asyncio
import os

from test_server_batch import WRITE, Raw, req, run
from test_server_workers import until
from test_server_workers_bitmaps import G, granules, registry_granules, serve_bitmapped

FAULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workerfaults")
SLOW = 2 * 1024 * 1024 + 4096  # above FileDev.inline_limit: the thread pool
SLEEP = 1.5


def slow_worker_writes(monkeypatch, tmp) -> str:
    """Workers started from now on hold every write of `SLOW` bytes
    `SLEEP` s in flight; returns the directory of its started/done files."""
    d = str(tmp / "faults")
    os.mkdir(d)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([FAULTS] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("NBDBACKUP_TEST_SLOW_WRITE", f"{SLOW}:{SLEEP}:{d}")
    return d


def test_a_clear_after_a_client_left_waits_for_its_write_in_flight(short_tmp, monkeypatch):
    faults = slow_worker_writes(monkeypatch, short_tmp)
    at = 8 << 20

    async def main():
        manager, live, server, path = await serve_bitmapped(short_tmp)
        disk = manager.lookup("disk")
        c = await Raw.connect(path, "disk", True)
        await until(lambda: server.pool.handed == 1)
        # Set the granules (an ask), so the next write needs no ask at all.
        c.send(req(WRITE, 1, at, 3 << 20, b"a" * (3 << 20)))
        assert (await c.replies(1))[1][0] == 0
        assert granules(at, SLOW) <= registry_granules(manager)
        c.send(req(WRITE, 2, at, SLOW, b"b" * SLOW))
        await until(lambda: os.path.exists(os.path.join(faults, "started")))
        await c.close()  # the client leaves; its write is still in flight in the worker
        await until(lambda: live.external == 0 or os.path.exists(os.path.join(faults, "done")))
        await manager.clear("disk", "b0")
        fd = os.open(str(short_tmp / "disk.img"), os.O_RDONLY)
        try:
            at_clear = os.pread(fd, 4096, at)
            await until(lambda: os.path.exists(os.path.join(faults, "done")), timeout=10)
            later = os.pread(fd, 4096, at)
        finally:
            os.close(fd)
        # Either the write landed before the clear returned (then the clear
        # may forget it) or its granules are dirty.
        assert at_clear == later or granules(at, SLOW) <= registry_granules(manager), \
            "a worker write landed after block-dirty-bitmap-clear returned, with no bit"
        assert at_clear == b"b" * 4096  # the clear waited for the write
        assert not disk.get("b0").dirty_count()
        await server.shutdown()

    run(main())
