"""A backup job is listed in ``query-jobs`` only once its point in time is
taken (docs/doubts18.md item 5).

``backup-start`` prepares the job, then quiesces the export -- recalling its
connections from the worker processes, which waits up to `RECALL_TIMEOUT`
(10 s) for a client that does not read its replies -- and only then commits
the point in time.  Before doubts18 the job was listed ``created`` during
that wait (hunt 16 took that listing for the instant); QEMU runs a
transaction under its big lock, so no ``query-jobs`` sees its jobs before
they start.  Here: `serve` with worker processes, a client on a worker that
sent READs and reads nothing, ``backup-start`` on one QMP connection while
another polls ``query-jobs``: nothing is listed until the start answers
(after the recall's eviction), and the start is not made slower.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from qemu.qmp import QMPClient

import peers
from test_stalled_reader import staller

MiB = 1 << 20


@pytest.mark.timeout(120)
def test_a_backup_being_started_is_not_listed_before_its_point_in_time(short_tmp):
    disk = short_tmp / "disk.img"
    with open(disk, "wb") as f:
        f.write(os.urandom(64 * MiB))
    port = peers.free_tcp_port()
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    with peers.nbdbackup_serve(f"disk={disk}", extra=["--listen", f"127.0.0.1:{port}", "--control", ctl,
                                                     "--workers", "2"]) as srv:
        peers.wait_for_tcp(port, lambda: srv.alive, srv.log)
        s = staller(port, None, reads=64)
        try:
            # (In transmission on a plain file export: served by a worker; `polls` below
            # shows that the start waited for its recall.)
            async def scenario():
                starter, watcher = QMPClient("start"), QMPClient("watch")
                await starter.connect(ctl)
                await watcher.connect(ctl)
                try:
                    t0 = time.monotonic()
                    start = asyncio.ensure_future(starter.execute("backup-start", {
                        "export": "disk", "job-id": "j", "sync": "none",
                        "target": os.fspath(short_tmp / "t.raw"), "snapshot": "snap"}))
                    listed_before = []
                    polls = 0
                    while not start.done():
                        jobs = await watcher.execute("query-jobs")
                        polls += 1
                        if jobs and not start.done():
                            listed_before.append(jobs)
                        await asyncio.sleep(0.05)
                    assert await start == {}
                    took = time.monotonic() - t0
                    jobs = await watcher.execute("query-jobs")
                    await watcher.execute("job-cancel", {"id": "j"})
                    await peers.wait_concluded(watcher, "j")
                    await watcher.execute("job-dismiss", {"id": "j"})
                    return took, polls, listed_before, jobs
                finally:
                    await starter.disconnect()
                    await watcher.disconnect()

            took, polls, listed_before, jobs = asyncio.run(asyncio.wait_for(scenario(), 90))
        finally:
            s.close()
    print(f"backup-start answered after {took:.2f} s; {polls} polls of query-jobs meanwhile")
    assert polls >= 5, polls  # the start did wait (for the recall), and the watcher polled meanwhile
    assert listed_before == [], listed_before[:3]
    assert [(j["id"], j["status"]) for j in jobs] == [("j", "running")], jobs
    assert took < 10 + 5  # the recall's timeout, not longer
