"""Bug hunt 5: the backup agent's workflow killed at chosen moments (docs/hunt5.md).

In process: our server (`daemon.start`, two file exports, persistent bitmaps in
``--state-dir``) on a Unix socket, and `agent.workflow.run` against it.  A
"kill -9" of the agent at a chosen point is `Killed` (a BaseException no
handler of the workflow catches: no rollback, no finish runs; the agent's
sockets close as the process's would).  Writes from another client change the
disks between runs and while a run is in flight.  Then a normal run must
record, for every disk, a snapshot equal to the disk at its start (the
writers are stopped for that run): an incremental that missed a change
would keep the base's bytes there.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random

import pytest

from nbdbackup import daemon
from nbdbackup.agent import workflow
from nbdbackup.agent.repo import Repository, open_store
from nbdbackup.nbd.server import Server

M = 1 << 20
SIZE = 6 * M
CL = 64 * 1024
DISKS = ("d1", "d2")

pytestmark = pytest.mark.timeout(120)


class Killed(BaseException):
    """The agent process died here (kill -9)."""


class Rig:
    """One server (``name``) with file exports ``disks``; ``repo_dir``: a repository
    shared with another rig (None: a new one in ``tmp``)."""

    def __init__(self, tmp, disks: tuple[str, ...] = DISKS, name: str = "srv", repo_dir: str | None = None) -> None:
        self.tmp, self.disks, self.name = tmp, disks, name
        tmp.mkdir(exist_ok=True)
        self.files = {d: tmp / f"{d}.img" for d in disks}
        for p in self.files.values():
            with open(p, "wb") as f:
                f.truncate(SIZE)
        if repo_dir is None:
            repo_dir = str(tmp / "repo")
            Repository.init(open_store(repo_dir), chunk_size=M)
        self.repo_dir = repo_dir
        self.sock = str(tmp / "nbd.sock")
        self.ctl = str(tmp / "ctl.sock")
        self.rng = random.Random(name)

    async def start(self) -> None:
        self.server = Server()
        args = argparse.Namespace(control=self.ctl, state_dir=str(self.tmp / "state"))
        self.app = await daemon.start(self.server, args)
        for d, p in self.files.items():
            await daemon.add_export(self.app, d, os.fspath(p))
        await self.server.start_unix(self.sock)

    async def stop(self) -> None:
        await daemon.stop(self.app)
        await self.server.shutdown()

    async def write(self, n: int = 6) -> None:
        """``n`` random 4 KiB writes to each disk, through the live export (another client)."""
        for d in self.disks:
            dev = self.server.exports[d].dev
            for _ in range(n):
                off = self.rng.randrange(SIZE // 4096) * 4096
                await dev.pwrite(self.rng.randbytes(4096), off)

    def content(self, d: str) -> bytes:
        return self.files[d].read_bytes()

    async def backup(self, **kw):
        repo = Repository.open(open_store(self.repo_dir))
        srv = workflow.Server(control=self.ctl, nbd=f"nbd+unix:///x?socket={self.sock}", disks=list(self.disks),
                              name=self.name)
        opts = workflow.Options(connections=1, workers=2, **kw)
        with repo.store.lock(exclusive=False):
            return await workflow.run([srv], repo.store, repo, opts)

    def restored(self, snap: str) -> bytes:
        repo = Repository.open(open_store(self.repo_dir))
        man = repo.load_snapshot(snap)
        return b"".join(repo.get_chunk(man.chunks[i], man.chunk_range(i)[1]) for i in range(man.count))

    async def checked_run(self, **kw) -> dict[str, workflow.DiskResult]:
        """A run with no writer: every disk ok, its snapshot = the disk now."""
        before = {d: self.content(d) for d in self.disks}
        res = {r.disk: r for r in await self.backup(**kw)}
        for d in self.disks:
            r = res[d]
            assert r.status == "ok", (r.error, r.notes)
            assert self.restored(r.snapshot) == before[d], (d, r.kind, r.reason, r.notes)
        return res


class Death:
    """Kills the agent at one point (``where``, the ``at``-th time it is reached); once
    dead, every later control call, chunk or save of the agent dies too (the process is
    gone).  ``start``: the disks at the backup transaction's instant."""

    def __init__(self, rig: Rig, monkeypatch, where: str, at: int = 1, write_during: bool = True,
                 fail: str | None = None) -> None:
        self.rig, self.where, self.at, self.dead, self.seen = rig, where, at, False, 0
        self.fail = fail  # a disk whose pull fails (an I/O error from the server) at its 2nd chunk
        self.chunks: dict[str, int] = {}
        self.start: dict[str, bytes] = {}
        self.write_during = write_during
        death = self
        real_call = workflow._Control.call

        async def call(ctl, name, args=None):
            death.check()
            if name == "transaction" and any(a["type"] == "backup-start" for a in args["actions"]):
                death.point("before-transaction")
                out = await real_call(ctl, name, args)
                death.start = {d: rig.content(d) for d in rig.disks}
                death.point("after-transaction")
                return out
            death.point(f"before-{name}")
            out = await real_call(ctl, name, args)
            death.point(f"after-{name}")
            return out

        monkeypatch.setattr(workflow._Control, "call", call)
        real_sink = workflow._RepoSink.__call__

        async def sink(s, i, x, data):
            death.check()
            if death.write_during:
                await rig.write(2)
            death.point("chunk")
            n = death.chunks[s.res.disk] = death.chunks.get(s.res.disk, 0) + 1
            if s.res.disk == death.fail and n == 2:
                raise OSError(5, "injected server error")
            return await real_sink(s, i, x, data)

        monkeypatch.setattr(workflow._RepoSink, "__call__", sink)
        # The hook writes through the event loop: chunks go through __call__ (as a remote
        # store's do), not straight from the receiving threads (`_RepoSink.submit`).
        monkeypatch.setattr(workflow._RepoSink, "submit", lambda s, i, data: None)
        real_save = Repository.save_snapshot

        def save(repo, *a, **kw):
            death.check()
            death.point("before-save")
            real_save(repo, *a, **kw)
            death.point("after-save")

        monkeypatch.setattr(Repository, "save_snapshot", save)

    def check(self) -> None:
        if self.dead:
            raise Killed()

    def point(self, name: str) -> None:
        if name == self.where:
            self.seen += 1
            if self.seen == self.at:
                self.dead = True
                raise Killed()

    async def run(self, rig: Rig, **kw) -> list | None:
        try:
            return await rig.backup(**kw)
        except Killed:
            return None
        finally:
            await asyncio.sleep(0.1)  # the other disk's task, if any, reaches a point and dies
            self.dead = False
            self.where = "nowhere"


# (point, which time it is reached, --read): before / after the transaction, mid-pull (the
# first chunk of the run, the 4th: the other disk's), before / after recording the first
# and the second disk, while finishing (job cancel and dismiss, base bitmap removal).
POINTS = [(w, at, "whole") for w, at in [
    ("before-transaction", 1), ("after-transaction", 1), ("chunk", 1), ("chunk", 4),
    ("before-save", 1), ("after-save", 1), ("after-save", 2),
    ("before-job-cancel", 1), ("after-job-dismiss", 1), ("after-job-dismiss", 2),
    ("before-block-dirty-bitmap-remove", 1), ("after-block-dirty-bitmap-remove", 1)]]
POINTS += [(w, at, "dirty") for w, at in [("after-transaction", 1), ("chunk", 1), ("after-save", 1)]]


@pytest.mark.parametrize("where,at,read", POINTS)
def test_agent_killed_then_next_runs_are_exact(short_tmp, monkeypatch, where, at, read):
    rig = Rig(short_tmp)

    async def main():
        await rig.start()
        try:
            await rig.write(20)
            await rig.checked_run(read=read)
            await rig.write()
            done = set(Repository.open(open_store(rig.repo_dir)).snapshots())
            death = Death(rig, monkeypatch, where, at)
            await death.run(rig, read=read)
            assert death.seen >= at, f"{where} #{at} never reached"
            repo = Repository.open(open_store(rig.repo_dir))
            # whatever the killed run recorded is the disks at its start
            for name in repo.snapshots():
                info = repo.snapshot_info(name)
                if name not in done:
                    d = info["meta"]["disk"]
                    assert rig.restored(name) == death.start[d], (where, name)
            await rig.write()
            await rig.checked_run(read=read)
            await rig.write()
            res = await rig.checked_run(read=read)
            for r in res.values():
                assert r.kind == "incremental", (r.reason, r.notes)
        finally:
            await rig.stop()

    asyncio.run(main())


# A server error mid-pull on d2 (d1 succeeds), the agent killed (or not) while it rolls d2 back.
FAIL_POINTS = [("nowhere", 1), ("before-job-cancel", 1), ("after-job-dismiss", 1),
               ("before-transaction", 2), ("after-transaction", 2)]


@pytest.mark.parametrize("where,at", FAIL_POINTS)
def test_one_disk_fails_mid_pull_and_the_rollback_is_killed(short_tmp, monkeypatch, where, at):
    rig = Rig(short_tmp)

    async def main():
        await rig.start()
        try:
            await rig.write(20)
            await rig.checked_run()
            await rig.write()
            death = Death(rig, monkeypatch, where, at, fail="d2")
            res = await death.run(rig)
            assert death.seen >= at or where == "nowhere", f"{where} #{at} never reached"
            if res is not None:
                by = {r.disk: r for r in res}
                assert by["d2"].status == "failed" and "injected" in by["d2"].error
            await rig.write()
            await rig.checked_run()
            await rig.write()
            for r in (await rig.checked_run()).values():
                assert r.kind == "incremental", (r.reason, r.notes)
        finally:
            await rig.stop()

    asyncio.run(main())


def test_base_deleted_or_server_restarted_between_runs(short_tmp):
    rig = Rig(short_tmp)

    async def main():
        await rig.start()
        try:
            await rig.write(20)
            res = await rig.checked_run()
            await rig.write()
            repo = Repository.open(open_store(rig.repo_dir))
            repo.delete_snapshot(res["d1"].snapshot)  # d1's base gone: full, and says why
            res = await rig.checked_run()
            assert res["d1"].kind == "full" and "lacks snapshot" in res["d1"].reason, res["d1"].reason
            assert res["d2"].kind == "incremental"
            await rig.write()
            await rig.stop()
            await rig.start()  # a clean restart: the persistent bitmaps carry on
            await rig.write()
            for r in (await rig.checked_run()).values():
                assert r.kind == "incremental", (r.reason, r.notes)
        finally:
            await rig.stop()

    asyncio.run(main())


def test_chunks_go_from_the_receiving_threads_straight_to_the_chunk_pool(short_tmp, monkeypatch):
    """A local repository's chunks are handed to the CPU pool by the pull's receiving threads
    (`_RepoSink.submit`), not through the event loop (`__call__`: two thread wake-ups more per
    chunk); full and incremental runs stay exact and count what they processed."""
    rig = Rig(short_tmp)
    via_loop = []
    real_call = workflow._RepoSink.__call__

    async def call(s, i, x, data):
        via_loop.append(i)
        return await real_call(s, i, x, data)

    monkeypatch.setattr(workflow._RepoSink, "__call__", call)

    async def main():
        await rig.start()
        try:
            await rig.write(20)
            for kind in ("full", "incremental"):
                res = await rig.checked_run()
                for r in res.values():
                    assert r.kind == kind and r.new_chunks > 0, (r.kind, r.reason)
                    assert r.bytes_processed == r.chunks_worked * M, (r.bytes_processed, r.chunks_worked)
                await rig.write()
        finally:
            await rig.stop()

    asyncio.run(main())
    assert via_loop == []


def test_a_bitmap_named_after_another_servers_snapshot_is_not_a_base(short_tmp, monkeypatch):
    """Two servers with a disk of the same name (``vda``) back up into one repository
    with a daily name template.  B's run is killed after its transaction: its new
    bitmap PREFIX.vda.D-2 stays on B (an orphan, as designed).  Later that day A's run
    picks the free name vda.D-2 (A cannot see B's bitmaps) and records it, with
    meta.bitmap = PREFIX.vda.D-2.  B's next run must not take A's snapshot for the base
    of its orphan bitmap: that incremental would be A's disk plus B's changes."""
    a = Rig(short_tmp / "a", ("vda",), "A")
    b = Rig(short_tmp / "b", ("vda",), "B", repo_dir=a.repo_dir)
    daily = {"template": "{disk}.{date}"}

    async def main():
        await a.start()
        await b.start()
        try:
            await a.write(20)
            await a.checked_run(**daily)
            await b.write(20)
            rb0 = (await b.checked_run(**daily))["vda"]
            await b.write()
            death = Death(b, monkeypatch, "after-transaction", write_during=False)
            await death.run(b, **daily)
            assert death.seen == 1
            monkeypatch.undo()
            await a.write()
            ra = (await a.checked_run(**daily))["vda"]
            assert f"nbdbackup-agent.{ra.snapshot}" in [x["name"] for x in await b_bitmaps()]  # B's orphan
            await b.write()
            rb = (await b.checked_run(**daily))["vda"]
            # B's orphan is merged into B's own base, as after any interrupted run
            assert (rb.kind, rb.base) == ("incremental", rb0.snapshot), (rb.kind, rb.reason)
            await b.write()
            await b.checked_run(**daily)
        finally:
            await a.stop()
            await b.stop()

    async def b_bitmaps():
        from nbdbackup.control.client import ControlClient

        async with ControlClient(b.ctl) as c:
            return await c.execute("query-bitmaps", {"export": "vda"})

    asyncio.run(main())


@pytest.mark.parametrize("full", [False, True])
def test_a_damaged_base_snapshot_document_falls_back_to_a_full(short_tmp, full):
    """(hunt5 finding 2) The snapshot document of d1's base is damaged (bit rot, a
    torn copy): the run failed for EVERY disk of the server, --full included, run
    after run.  Now d1's bitmap is unusable (the report says why: a full), d2 goes on."""
    rig = Rig(short_tmp)

    async def main():
        await rig.start()
        try:
            await rig.write(20)
            res = await rig.checked_run()
            p = short_tmp / "repo" / "snapshots" / res["d1"].snapshot
            blob = bytearray(p.read_bytes())
            blob[40] ^= 0xFF  # inside the metadata: its checksum no longer matches
            p.write_bytes(bytes(blob))
            await rig.write()
            res = await rig.checked_run(full=full)
            assert res["d1"].kind == "full", res["d1"].reason
            if not full:
                assert "damaged" in res["d1"].reason, res["d1"].reason
            assert res["d2"].kind == ("full" if full else "incremental"), res["d2"].reason
            await rig.write()
            for r in (await rig.checked_run()).values():
                assert r.kind == "incremental", (r.reason, r.notes)
        finally:
            await rig.stop()

    asyncio.run(main())
