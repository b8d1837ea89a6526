"""The backup engine end to end on memory devices: CBW, snapshot, pump, jobs, policies."""

from __future__ import annotations

import asyncio
import errno
import random

import pytest

from nbdbackup.backup.engine import Engine, MemoryExportTable, register_commands
from nbdbackup.blockdev.live import LiveDev
from nbdbackup.backup.testing import Fault, FaultDev
from nbdbackup.blockdev.base import BlockSize, Capabilities, FilterDev, HOLE_ZERO
from nbdbackup.blockdev.memory import PAGE, MemoryDev
from nbdbackup.errors import ConfigError

KiB = 1024
CS = 64 * KiB
SIZE = 16 * CS + 12345  # partial last cluster


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def rbytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


class Rig:
    """A live export "disk" (MemoryDev under a FaultDev under a LiveDev), a
    target MemoryDev under a FaultDev, an engine and a byte model of the live
    disk."""

    def __init__(self, size=SIZE, seed=0, pages=None):
        rng = random.Random(seed)
        self.rng = rng
        self.mem = MemoryDev(size)
        if pages is None:
            self.mem.write_sync(rbytes(rng, size), 0)
        else:
            for p in pages:
                n = min(PAGE, size - p * PAGE)
                self.mem.write_sync(rbytes(rng, n), p * PAGE)
        self.orig = self.read(self.mem)
        self.model = bytearray(self.orig)
        self.fsrc = FaultDev(self.mem)
        self.live = LiveDev(self.fsrc)
        self.table = MemoryExportTable()
        self.table.add("disk", self.live, read_only=False)
        self.events: list[tuple[str, dict]] = []
        self.engine = Engine(self.table, lambda n, d: self.events.append((n, d)))
        self.tmem = MemoryDev(size)
        self.ftgt = FaultDev(self.tmem)

    @staticmethod
    def read(dev: MemoryDev, off=0, n=None) -> bytes:
        n = dev.size - off if n is None else n
        b = bytearray(n)
        dev.read_sync(memoryview(b), off)
        return bytes(b)

    async def start(self, sync="full", **kw):
        kw.setdefault("cluster_size", CS)
        kw.setdefault("max_chunk", 2 * CS)
        await self.engine.backup_start("disk", "j", sync, self.ftgt, snapshot="snap", **kw)
        return self.engine.jobs["j"]

    @property
    def snap(self):
        return self.table.get("snap").dev

    async def snap_read(self, off=0, n=None) -> bytes:
        n = self.mem.size - off if n is None else n
        b = bytearray(n)
        await self.snap.pread(memoryview(b), off)
        return bytes(b)

    async def write(self, off, n, byte=None):
        data = bytes([byte]) * n if byte is not None else rbytes(self.rng, n)
        await self.live.pwrite(data, off)
        self.model[off:off + n] = data

    async def zero(self, off, n, may_trim=True):
        await self.live.zero(off, n, may_trim=may_trim)
        self.model[off:off + n] = bytes(n)

    async def trim(self, off, n):
        await self.live.trim(off, n)
        self.model[off:off + n] = bytes(n)  # MemoryDev trims to zeroes

    async def check(self):
        assert await self.snap_read() == self.orig
        assert self.read(self.mem) == bytes(self.model)

    def names(self):
        return [n for n, _ in self.events]

    def statuses(self):
        return [d["status"] for n, d in self.events if n == "JOB_STATUS_CHANGE"]


async def wait_status(job, *statuses, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while job.status.value not in statuses:
        assert loop.time() < end, f"job stuck in {job.status.value}, wanted {statuses}"
        await asyncio.sleep(0.001)


# -- overwrites during a backup ------------------------------------------------

OVERWRITES = [
    ("whole cluster", lambda r: r.write(2 * CS, CS)),
    ("partial left", lambda r: r.write(3 * CS, 100)),
    ("partial right", lambda r: r.write(5 * CS - 100, 100)),
    ("spanning two", lambda r: r.write(6 * CS - 10, 20)),
    ("adjacent 1", lambda r: r.write(8 * CS, CS)),
    ("adjacent 2", lambda r: r.write(9 * CS, CS)),
    ("zero partial", lambda r: r.zero(10 * CS + 7, 1000)),
    ("zero whole", lambda r: r.zero(11 * CS, 2 * CS)),
    ("trim", lambda r: r.trim(13 * CS, CS)),
    ("last partial cluster", lambda r: r.write(SIZE - 5, 5)),
    ("rewrite done cluster", lambda r: r.write(2 * CS + 1, 10)),
]


@pytest.mark.parametrize("sync", ["full", "top", "none"])
def test_overwrites_keep_snapshot_point_in_time(sync):
    async def main():
        r = Rig()
        job = await r.start(sync)
        if sync != "none":
            job.pause()
        await r.check()
        for name, op in OVERWRITES:
            await op(r)
            await r.check()
        st = job.state
        assert st.bytes_copied_by_cbw == 11 * CS + (SIZE - 16 * CS)  # clusters 2,3,4,5,6,8,9,10,11,12,13 + last
        if sync == "none":
            assert st.total == 0 and job.status.value == "running"
            job.cancel()
        else:
            job.resume()
        await job.wait()
        await r.check()
        assert job.status.value == "concluded"
        if sync != "none":
            assert r.read(r.tmem) == r.orig
            assert st.current == st.total == SIZE
            assert st.bytes_copied_by_pump + st.bytes_copied_by_cbw == SIZE
            assert job.error is None
            assert r.names()[-2] == "BLOCK_JOB_COMPLETED"
            assert r.statuses() == ["created", "running", "paused", "running", "waiting", "pending", "concluded"]
        else:
            assert job.error is None  # fleecing ends by cancel, normally
            assert r.names()[-2] == "BLOCK_JOB_CANCELLED"
            assert r.statuses() == ["created", "running", "aborting", "concluded"]
        # The snapshot stays until dismiss, and stays right.
        await r.write(0, 3 * CS)
        await r.check()
        await r.engine.job_dismiss("j")
        assert r.table.get("snap") is None and r.live.hooks == ()
        assert r.engine.jobs == {}
        with pytest.raises(OSError) as ei:
            await job.snapshot.pread(memoryview(bytearray(10)), 0)
        assert ei.value.errno == errno.ESHUTDOWN
        assert r.statuses()[-1] == "null"
    run(main())


def test_snapshot_reads_during_pump_and_writes_are_point_in_time():
    async def main():
        r = Rig(seed=3)
        r.fsrc.rng = random.Random(1)
        r.ftgt.rng = random.Random(2)
        job = await r.start("full", max_workers=3)
        rng = random.Random(4)
        tasks = []
        for _ in range(40):
            off = rng.randrange(SIZE)
            n = rng.randint(1, min(3 * CS, SIZE - off))
            tasks.append(asyncio.create_task(r.write(off, n)))
            roff = rng.randrange(SIZE)
            rn = rng.randint(1, min(4 * CS, SIZE - roff))
            got = await r.snap_read(roff, rn)
            assert got == r.orig[roff:roff + rn]
        await asyncio.gather(*tasks)
        await job.wait()
        assert r.read(r.tmem) == r.orig
        # Overlapping live writes ran concurrently: the model may not know which
        # one landed last, so only the snapshot and the target are checked here.
        assert await r.snap_read() == r.orig
    run(main())


# -- pump counts per sync mode ---------------------------------------------------

def test_top_copies_only_allocated_clusters():
    async def main():
        r = Rig(size=16 * CS, pages=[0, 3, 4, 9])
        assert PAGE == CS
        job = await r.start("top")
        assert job.state.total == 4 * CS
        await job.wait()
        st = job.state
        assert st.bytes_copied_by_pump == 4 * CS and st.current == 4 * CS
        for c in range(16):
            assert st.done.get(c) == (c in (0, 3, 4, 9))
        assert r.read(r.tmem) == r.orig  # holes are zero in both
        assert set(r.tmem.pages) == {0, 3, 4, 9}
    run(main())


def test_top_falls_back_to_base_allocation():
    class NoDepth(FilterDev):
        def meta_contexts(self):
            return ("base:allocation",)

    async def main():
        r = Rig(size=8 * CS, pages=[1, 6])
        r.live.inner = NoDepth(r.fsrc, owns_inner=False)
        job = await r.start("top")
        assert job.state.total == 2 * CS
        await job.wait()
        assert [job.state.done.get(c) for c in range(8)] == [c in (1, 6) for c in range(8)]
    run(main())


def test_full_zero_detection_keeps_target_sparse():
    async def main():
        r = Rig(size=8 * CS, pages=[2])
        job = await r.start("full")
        await job.wait()
        assert job.state.clusters_skipped_zero == 7
        assert set(r.tmem.pages) == {2}
        assert r.read(r.tmem) == r.orig
    run(main())


def test_none_has_no_pump_and_cbw_still_protects():
    async def main():
        r = Rig()
        job = await r.start("none")
        await asyncio.sleep(0.01)
        assert job.state.bytes_copied_by_pump == 0 and job.status.value == "running"
        await r.write(CS, 10)
        await r.check()
        assert job.state.bytes_copied_by_cbw == CS
        info = r.engine.query_jobs()[0]
        assert info["total-progress"] == 0 and info["status"] == "running"
    run(main())


# -- error policies -----------------------------------------------------------------

@pytest.mark.parametrize("op", ["read", "write"])
def test_error_report_fails_the_job(op):
    async def main():
        r = Rig()
        dev = r.fsrc if op == "read" else r.ftgt
        dev.faults.append(Fault(op, 5 * CS, 1))
        job = await r.start("full", max_workers=1)
        await job.wait()
        assert job.status.value == "concluded" and job.error
        err = [d for n, d in r.events if n == "BLOCK_JOB_ERROR"]
        assert err == [{"device": "j", "id": "j", "operation": op, "action": "report"}]
        done = [d for n, d in r.events if n == "BLOCK_JOB_COMPLETED"]
        assert len(done) == 1 and "error" in done[0]
        assert r.statuses()[-2:] == ["aborting", "concluded"]
        assert not job.state.done.get(5)
        # The snapshot stays valid: CBW copies cluster 5 itself when the fault is gone.
        dev.faults.clear()
        await r.write(5 * CS, 10)
        await r.check()
    run(main())


def test_error_ignore_skips_cluster():
    async def main():
        r = Rig()
        r.fsrc.faults.append(Fault("read", 5 * CS, 1))
        job = await r.start("full", on_source_error="ignore", max_chunk=CS)
        await job.wait()
        assert job.status.value == "concluded" and job.error is None
        st = job.state
        assert st.bytes_ignored == CS and not st.done.get(5)
        assert st.current == st.total
        assert r.read(r.tmem, 0, 5 * CS) == r.orig[:5 * CS]
        assert r.read(r.tmem, 6 * CS) == r.orig[6 * CS:]
        acts = [d["action"] for n, d in r.events if n == "BLOCK_JOB_ERROR"]
        assert acts == ["ignore"]
    run(main())


@pytest.mark.parametrize("policy,err", [("stop", errno.EIO), ("enospc", errno.ENOSPC)])
def test_error_stop_pauses_and_resume_retries(policy, err):
    async def main():
        r = Rig()
        r.ftgt.faults.append(Fault("write", 7 * CS, 1, err))
        job = await r.start("full", on_target_error=policy, max_workers=2)
        await wait_status(job, "paused")
        assert job.error and "write" in job.error
        assert r.engine.query_jobs()[0]["error"] == job.error
        acts = [d["action"] for n, d in r.events if n == "BLOCK_JOB_ERROR"]
        assert acts and set(acts) == {"stop"}
        await asyncio.sleep(0.02)
        assert job.status.value == "paused" and not job.state.done.get(7)
        r.ftgt.faults.clear()
        r.engine.job_resume("j")
        await job.wait()
        assert job.status.value == "concluded" and job.error is None
        assert r.read(r.tmem) == r.orig
    run(main())


def test_enospc_policy_reports_other_errors():
    async def main():
        r = Rig()
        r.ftgt.faults.append(Fault("write", 7 * CS, 1, errno.EIO))
        job = await r.start("full", on_target_error="enospc")
        await job.wait()
        assert job.error
        assert [d["action"] for n, d in r.events if n == "BLOCK_JOB_ERROR"] == ["report"]
    run(main())


def test_completion_needs_a_successful_target_flush():
    async def main():
        r = Rig()
        r.ftgt.faults.append(Fault("flush"))
        job = await r.start("full")
        await job.wait()
        assert job.error and "flush" in job.error
        assert "waiting" not in r.statuses()
    run(main())


# -- CBW error policies ------------------------------------------------------------

def test_cbw_break_guest_write():
    async def main():
        r = Rig()
        job = await r.start("full")
        job.pause()
        r.ftgt.faults.append(Fault("write", 4 * CS, CS))
        with pytest.raises(OSError) as ei:
            await r.live.pwrite(b"x" * 10, 4 * CS + 5)
        assert ei.value.errno == errno.EIO
        await r.check()  # nothing written, snapshot intact
        assert job.hook.errors == 1 and job.status.value == "paused"
        r.ftgt.faults.clear()
        await r.write(4 * CS + 5, 10)
        await r.check()
    run(main())


def test_cbw_break_snapshot():
    async def main():
        r = Rig()
        job = await r.start("full", on_cbw_error="break-snapshot")
        job.pause()
        r.ftgt.faults.append(Fault("write", 4 * CS, CS))
        await r.write(4 * CS + 5, 10)  # the live write goes on
        assert r.read(r.mem) == bytes(r.model)
        with pytest.raises(OSError) as ei:
            await r.snap_read(0, 10)
        assert ei.value.errno == errno.EIO
        await job.wait()
        assert job.status.value == "concluded" and "snapshot broken" in job.error
        assert r.engine.query_jobs()[0]["snapshot-broken"] is True
        n = job.state.bytes_copied_by_cbw
        await r.write(9 * CS, 10)  # CBW no longer copies
        assert job.state.bytes_copied_by_cbw == n
    run(main())


def test_cbw_timeout_counts_as_cbw_error():
    async def main():
        r = Rig()
        job = await r.start("full", cbw_timeout=0.05)
        job.pause()
        r.ftgt.gate = asyncio.Event()
        with pytest.raises(OSError) as ei:
            await r.live.pwrite(b"x", 3 * CS)
        assert ei.value.errno == errno.EIO
        assert not job.state.inflight  # the timed-out copy was cancelled cleanly
        r.ftgt.gate.set()
        await r.write(3 * CS, 1)
        await r.check()
    run(main())


# -- speed, pause, resume, cancel ------------------------------------------------------

def test_speed_limit_and_change():
    async def main():
        r = Rig(size=32 * CS)
        loop = asyncio.get_running_loop()
        job = await r.start("full", speed=20 * CS, max_chunk=CS)  # 20 clusters/s
        await asyncio.sleep(0.25)
        cur = job.state.current
        assert 2 * CS <= cur <= 10 * CS, cur
        with pytest.raises(ConfigError):
            r.engine.job_set_speed("j", -1)
        t0 = loop.time()
        r.engine.job_set_speed("j", 0)
        await job.wait()
        assert loop.time() - t0 < 1.0
        assert r.engine.query_jobs()[0]["speed"] == 0
        assert r.read(r.tmem) == r.orig
    run(main())


def test_pause_stops_progress_resume_finishes():
    async def main():
        r = Rig(size=32 * CS)
        job = await r.start("full", speed=40 * CS, max_chunk=CS)
        await asyncio.sleep(0.05)
        r.engine.job_pause("j")
        assert job.status.value == "paused"
        await asyncio.sleep(0.05)
        cur = job.state.current
        await asyncio.sleep(0.15)
        assert job.state.current == cur < job.state.total
        with pytest.raises(ConfigError):
            await r.engine.job_dismiss("j")
        r.engine.job_set_speed("j", 0)
        r.engine.job_resume("j")
        with pytest.raises(ConfigError):
            r.engine.job_resume("j")
        await job.wait()
        assert job.error is None and r.read(r.tmem) == r.orig
    run(main())


@pytest.mark.parametrize("paused", [False, True])
def test_cancel_full_leaves_partial_target_and_dismiss_removes_snapshot(paused):
    async def main():
        r = Rig(size=32 * CS)
        job = await r.start("full", speed=20 * CS, max_chunk=CS)
        await asyncio.sleep(0.05)
        if paused:
            r.engine.job_pause("j")
        r.engine.job_cancel("j")
        await job.wait()
        assert job.status.value == "concluded"
        assert job.error and job.error.startswith("Operation canceled")
        assert 0 < job.state.current < job.state.total
        assert [n for n in r.names() if n.startswith("BLOCK_JOB")] == ["BLOCK_JOB_CANCELLED"]
        assert r.statuses()[-2:] == ["aborting", "concluded"]
        if paused:
            assert r.statuses()[-4:-2] == ["paused", "running"]
        assert not job.state.inflight
        await r.write(CS * 30, 10)  # snapshot still protected until dismiss
        await r.check()
        with pytest.raises(ConfigError):
            r.engine.job_cancel("j")
        await r.engine.job_dismiss("j")
        assert r.table.get("snap") is None and r.live.hooks == ()
        with pytest.raises(ConfigError):
            await r.engine.job_dismiss("j")
    run(main())


def test_auto_dismiss():
    async def main():
        r = Rig()
        job = await r.start("full", auto_dismiss=True)
        await job.wait()
        assert r.engine.jobs == {} and r.table.get("snap") is None
        assert r.statuses()[-2:] == ["concluded", "null"]
    run(main())


def test_shutdown_cancels_and_dismisses():
    async def main():
        r = Rig()
        await r.start("none")
        await r.engine.shutdown()
        assert r.engine.jobs == {} and r.table.get("snap") is None and r.live.hooks == ()
    run(main())


# -- snapshot extents ------------------------------------------------------------------

def test_snapshot_extents_describe_point_in_time():
    async def main():
        r = Rig(size=8 * CS, pages=[1, 2, 5])
        job = await r.start("none")
        await r.write(3 * CS, CS)  # was a hole: the snapshot still says hole
        await r.zero(1 * CS, CS)  # was data: snapshot still data
        ext = await r.snap.extents(0, 8 * CS)
        holes = [(e.offset, e.length) for e in ext if e.flags == HOLE_ZERO]
        data = [(e.offset, e.length) for e in ext if e.flags == 0]
        assert data == [(CS, 2 * CS), (5 * CS, CS)], ext
        assert holes == [(0, CS), (3 * CS, 2 * CS), (6 * CS, 2 * CS)], ext
        assert r.snap.meta_contexts() == ("base:allocation",)

        async def provider(off, n):
            return []
        r.snap.add_context("qemu:dirty-bitmap:b", provider)
        assert "qemu:dirty-bitmap:b" in r.snap.meta_contexts()
        with pytest.raises(OSError):
            await r.snap.extents(0, 10, "qemu:dirty-bitmap:nope")
        with pytest.raises(OSError) as ei:
            await r.snap.pwrite(b"x", 0)
        assert ei.value.errno == errno.EPERM
        assert r.snap.capabilities().read_only
        job.cancel()
    run(main())


# -- cluster size and validation --------------------------------------------------------

class BigBlocks(FilterDev):
    def __init__(self, inner, minimum=512, preferred=128 * KiB):
        super().__init__(inner, owns_inner=False)
        self.bs = BlockSize(minimum, preferred, 32 << 20)

    def capabilities(self):
        return Capabilities(block_size=self.bs)


def test_cluster_size_rules():
    async def main():
        r = Rig()
        await r.engine.backup_start("disk", "a", "none", MemoryDev(SIZE), snapshot="s1")
        assert r.engine.jobs["a"].state.cluster_size == 4 * KiB  # DEFAULT_CLUSTER (docs/cbwsub.md)
        await r.engine.backup_start("disk", "b", "none", BigBlocks(MemoryDev(SIZE)), snapshot="s2")
        assert r.engine.jobs["b"].state.cluster_size == 128 * KiB
        for bad in (1000, 256, 0, -4096, True, "65536"):
            with pytest.raises(ConfigError, match="cluster-size"):
                await r.engine.backup_start("disk", "c", "none", MemoryDev(SIZE), snapshot="s3", cluster_size=bad)
        with pytest.raises(ConfigError, match="minimum block size"):
            await r.engine.backup_start("disk", "c", "none", BigBlocks(MemoryDev(SIZE), 4096, 4096),
                                        snapshot="s3", cluster_size=2048)
        with pytest.raises(ConfigError, match="largest request"):
            await r.engine.backup_start("disk", "c", "none", MemoryDev(SIZE), snapshot="s3",
                                        cluster_size=64 << 20)
        await r.engine.backup_start("disk", "c", "none", MemoryDev(SIZE), snapshot="s3", cluster_size=512,
                                    max_chunk=100_000)
        assert r.engine.jobs["c"].pump.max_chunk_clusters == 195  # rounded down to whole clusters
        assert r.engine.jobs["c"].state.cluster_size == 512
        assert r.live.hooks and len(r.live.hooks) == 3
        await r.engine.shutdown()
    run(main())


def test_validation_errors():
    async def main():
        r = Rig()
        e = r.engine

        async def bad(match, *args, **kw):
            kw.setdefault("snapshot", "s")
            with pytest.raises(ConfigError, match=match):
                await e.backup_start(*args, **kw)
            assert r.live.hooks == () and e.jobs == {} and r.table.get("s") is None

        await bad("unknown export", "nope", "j", "full", MemoryDev(SIZE))
        await bad("bad sync", "disk", "j", "mirror", MemoryDev(SIZE))
        await bad("smaller", "disk", "j", "full", MemoryDev(SIZE - 1))
        await bad("own disk", "disk", "j", "full", r.mem)
        await bad("own disk", "disk", "j", "full", r.live)
        await bad("compression", "disk", "j", "full", MemoryDev(SIZE), compress=True)
        await bad("speed", "disk", "j", "full", MemoryDev(SIZE), speed=-1)
        await bad("needs a bitmap", "disk", "j", "incremental", MemoryDev(SIZE))
        await bad("cannot take a bitmap", "disk", "j", "none", MemoryDev(SIZE), bitmap="b")
        await bad("not available", "disk", "j", "bitmap", MemoryDev(SIZE), bitmap="b", bitmap_mode="always")
        await bad("must be given", "disk", "j", "bitmap", MemoryDev(SIZE), bitmap="b")
        await bad("no meaningful effect", "disk", "j", "full", MemoryDev(SIZE), bitmap="b", bitmap_mode="never")
        await bad("no meaningful effect", "disk", "j", "top", MemoryDev(SIZE), bitmap="b", bitmap_mode="never")
        await bad("bitmap-mode needs", "disk", "j", "full", MemoryDev(SIZE), bitmap_mode="never")
        await bad("on-source-error", "disk", "j", "full", MemoryDev(SIZE), on_source_error="explode")
        await bad("on-cbw-error", "disk", "j", "full", MemoryDev(SIZE), on_cbw_error="x")
        await bad("cbw-timeout", "disk", "j", "full", MemoryDev(SIZE), cbw_timeout=-1)
        await bad("max-workers", "disk", "j", "full", MemoryDev(SIZE), max_workers=0)
        await bad("already exists", "disk", "j", "full", MemoryDev(SIZE), snapshot="disk")
        ro = MemoryDev(SIZE)
        ro.read_only = True
        await bad("read-only", "disk", "j", "full", ro)
        await e.backup_start("disk", "j", "none", MemoryDev(SIZE), snapshot="s")
        with pytest.raises(ConfigError, match="already exists"):
            await e.backup_start("disk", "j", "none", MemoryDev(SIZE), snapshot="s2")
        with pytest.raises(ConfigError, match="no job"):
            e.job_pause("zzz")
        await e.shutdown()
    run(main())


def test_snapshot_export_name_defaults_to_export_at_job_id():
    async def main():
        r = Rig()
        await r.engine.backup_start("disk", "j7", "none", MemoryDev(SIZE))
        snap = r.table.get("disk@j7")
        assert snap is not None and snap.read_only
        assert snap.dev is r.engine.jobs["j7"].snapshot
        r.engine.job_cancel("j7")
        await wait_status(r.engine.jobs["j7"], "concluded")
        assert r.table.get("disk@j7") is not None  # stays until dismiss
        await r.engine.job_dismiss("j7")
        assert r.table.get("disk@j7") is None
        await r.engine.shutdown()
    run(main())


def test_read_only_export_backup_without_live_dev():
    async def main():
        mem = MemoryDev(4 * CS)
        mem.write_sync(b"q" * 4 * CS, 0)
        mem.read_only = True
        table = MemoryExportTable()
        table.add("ro", mem, read_only=True)
        e = Engine(table)
        tgt = MemoryDev(4 * CS)
        await e.backup_start("ro", "j", "full", tgt, snapshot="snap")
        await e.jobs["j"].wait()
        assert Rig.read(tgt) == b"q" * 4 * CS
        await e.shutdown()
    run(main())


# -- QMP mapping ---------------------------------------------------------------------------

class FakeSession:
    """A negotiated local session (the Unix control socket's full access)."""
    negotiated = True

    def __init__(self) -> None:
        from nbdbackup.control.remote import FULL

        self.access = FULL


async def qmp_call(server, name, args=None):
    from nbdbackup.control.framing import Request

    reply = await server.dispatch(FakeSession(), Request(name, args or {}, 1, True))
    if "error" in reply:
        raise ConfigError(reply["error"]["desc"])
    return reply["return"]


def test_register_commands_on_the_qmp_server():
    from nbdbackup.control.qmp import QMPServer

    async def main():
        r = Rig(size=32 * CS)
        q = QMPServer()
        register_commands(q, r.engine)
        assert {"backup-start", "query-jobs", "job-pause", "job-resume", "job-cancel", "job-dismiss",
                "job-set-speed", "block-job-set-speed"} <= set(q.commands)
        # A path target is opened with open_spec: use memory:SIZE (no I/O).
        assert await qmp_call(q, "backup-start", {
            "export": "disk", "job-id": "j", "sync": "full", "target": f"memory:{32 * CS}",
            "snapshot": "snap", "speed": 10 * CS, "on-source-error": "stop", "max-chunk": CS,
            "cluster-size": CS, "cbw-timeout": 0, "on-target-error": "auto"}) == {}
        job = r.engine.jobs["j"]
        assert job.on_source_error == "stop" and job.on_target_error == "report"
        assert job.speed == 10 * CS and job.hook.cbw_timeout is None
        jobs = await qmp_call(q, "query-jobs")
        assert jobs[0]["id"] == "j" and jobs[0]["type"] == "backup" and jobs[0]["status"] == "running"
        await qmp_call(q, "job-pause", {"id": "j"})
        assert job.status.value == "paused"
        await qmp_call(q, "block-job-set-speed", {"device": "j", "speed": 5})
        assert job.speed == 5
        await qmp_call(q, "job-set-speed", {"id": "j", "speed": 0})
        await qmp_call(q, "job-resume", {"id": "j"})
        await job.wait()
        assert job.error is None
        with pytest.raises(ConfigError, match="cannot be cancelled"):
            await qmp_call(q, "job-cancel", {"id": "j"})
        await qmp_call(q, "job-dismiss", {"id": "j"})
        assert r.engine.jobs == {} and r.table.get("snap") is None
        with pytest.raises(ConfigError, match="unexpected"):
            await qmp_call(q, "backup-start", {"export": "disk", "job-id": "k", "sync": "full",
                                               "target": "memory:1M", "bogus": 1})
        with pytest.raises(ConfigError, match="missing"):
            await qmp_call(q, "backup-start", {"export": "disk"})
        with pytest.raises(ConfigError, match="smaller"):
            await qmp_call(q, "backup-start", {"export": "disk", "job-id": "k", "sync": "full",
                                               "target": "memory:64K"})
        with pytest.raises(ConfigError, match="no job"):
            await qmp_call(q, "job-cancel", {"id": "nope"})
    run(main())


# -- two-phase start (transactions) ----------------------------------------------------------

def test_prepare_commit_start_and_abort():
    async def main():
        r = Rig()
        e = r.engine
        p1 = await e.prepare_backup("disk", "a", "full", MemoryDev(SIZE), snapshot="sa", cluster_size=CS)
        p2 = await e.prepare_backup("disk", "b", "none", MemoryDev(SIZE), snapshot="sb", cluster_size=CS)
        # Prepared (status created, the ids taken) but not listed before their point in
        # time, nor reachable by the job verbs (doubts18 item 5: as in QEMU's transactions).
        assert e.query_jobs() == []
        assert {j.id: j.status.value for j in e.jobs.values()} == {"a": "created", "b": "created"}
        with pytest.raises(ConfigError, match="no job with id"):
            e.job_cancel("a")
        assert r.live.hooks == ()  # nothing touches the live disk before commit
        with pytest.raises(ConfigError, match="already exists .it is being started"):
            await e.prepare_backup("disk", "a", "full", MemoryDev(SIZE))
        p1.commit()
        p2.commit()  # same instant: no await in between
        assert {j["id"]: j["status"] for j in e.query_jobs()} == {"a": "created", "b": "created"}
        await r.write(0, 10)  # both snapshots must keep the old data
        await p1.start()
        await p2.start()
        for name in ("sa", "sb"):
            b = bytearray(SIZE)
            await r.table.get(name).dev.pread(memoryview(b), 0)
            assert bytes(b) == r.orig
        # Abort before start: no job, no hook, no export, target closed.
        closed = []
        tgt = MemoryDev(SIZE)

        async def close():
            closed.append(True)
        tgt.close = close
        p3 = await e.prepare_backup("disk", "c", "full", tgt, snapshot="sc", cluster_size=CS)
        p3.commit()
        assert len(r.live.hooks) == 3
        await p3.abort()
        assert "c" not in e.jobs and len(r.live.hooks) == 2 and r.table.get("sc") is None and closed
        assert ("JOB_STATUS_CHANGE", {"id": "c", "status": "null"}) in r.events
        await e.shutdown()
        assert r.live.hooks == ()
    run(main())


def test_default_cluster_size_policy(monkeypatch):
    """The default copy granule (docs/cbwsub.md): 4 KiB, raised to the
    target's and the scratch's preferred block size, to every device's
    minimum, and so that a bitmap has at most 2^24 bits; an explicit size
    is honoured as asked."""
    monkeypatch.delenv("NBDBACKUP_DEFAULT_CLUSTER", raising=False)
    cs = Engine._cluster_size
    m = MemoryDev(SIZE)
    GiB = 1 << 30
    assert cs(m, None, size=GiB) == 4 * KiB
    assert cs(m, None, size=64 * GiB) == 4 * KiB  # 2^24 clusters exactly
    assert cs(m, None, size=64 * GiB + 1) == 8 * KiB
    assert cs(m, None, size=100 * GiB) == 8 * KiB
    assert cs(m, None, size=1 << 40) == 64 * KiB
    assert cs(m, None, size=(1 << 40) + 1) == 128 * KiB
    assert cs(m, None, size=1 << 60) == 64 << 20  # MAX_CLUSTER
    assert cs(m, 4 * KiB, size=1 << 40) == 4 * KiB  # asked: honoured
    # A target preferring (or requiring) more gets it.
    assert cs(BigBlocks(m, preferred=64 * KiB), None, size=GiB) == 64 * KiB
    assert cs(BigBlocks(m, minimum=8 * KiB, preferred=8 * KiB), None, size=GiB) == 8 * KiB
    # The source's minimum counts, its preferred size does not; a separate
    # scratch's both do.
    assert cs(m, None, size=GiB, source=BigBlocks(m, minimum=16 * KiB, preferred=16 * KiB)) == 16 * KiB
    assert cs(m, None, size=GiB, source=BigBlocks(m, preferred=128 * KiB)) == 4 * KiB
    assert cs(m, None, size=GiB, scratch=BigBlocks(m, preferred=32 * KiB)) == 32 * KiB
    # The A/B switch.
    monkeypatch.setenv("NBDBACKUP_DEFAULT_CLUSTER", "65536")
    assert cs(m, None, size=GiB) == 64 * KiB
    assert cs(m, 4 * KiB, size=GiB) == 4 * KiB
    for bad in ("1000", "256", "x"):
        monkeypatch.setenv("NBDBACKUP_DEFAULT_CLUSTER", bad)
        with pytest.raises(ConfigError, match="NBDBACKUP_DEFAULT_CLUSTER"):
            cs(m, None, size=GiB)
