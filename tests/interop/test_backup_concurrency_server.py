"""Concurrency through the real server: writers, snapshot readers and a pump
at random speeds, over many seeded runs.

One ``nbdbackup serve --control`` serves a 64 MiB raw file, either directly
with a file target, or through qemu-nbd with a qemu-nbd target.  Each run (seeded,
so a failure names its seed and replays) starts a ``sync=full`` backup with a
random pump speed, worker count and chunk size, then at the same time:

- WRITERS libnbd clients (one thread each, aio with several requests in
  flight) do random writes of random sizes (and some WRITE_ZEROES and TRIMs)
  on the live export.  Writer ``i`` owns
  the stripes ``k`` with ``k % WRITERS == i`` (``STRIPE`` bytes each), so the
  final live image is known: the test keeps a model (numpy) of every
  acknowledged request; after a TRIM the content is unspecified by the NBD
  spec, so those bytes are "unknown" until written again;
- READERS libnbd clients read random ranges of the snapshot export and
  compare them with the original image kept by the test;
- the test changes the pump's speed at random (``job-set-speed``) over QMP.

After each run: the snapshot export read in full hashes (blake3) to the
original; the job completes without error with all bytes accounted; the
target file equals the original; the live export equals the model; what
the snapshot's ``base:allocation`` calls zero is zero in the original.  The
live image at the end of a run is the next run's original.  Set
``NBDBACKUP_TEST_SEED`` to explore other seeds.

``via=file-incremental`` runs ``sync=incremental`` jobs on a dirty bitmap
instead, so copy-before-write of the (many) clusters outside each round's
dirty set goes to the scratch: the target then holds exactly the dirty
clusters (the snapshot's ``qemu:dirty-bitmap:b`` map, read with nbdinfo)
and zeros elsewhere, while the snapshot still reads the whole original.

Also: disks whose size is no multiple of the cluster (a short last cluster),
and a cancel + dismiss while writers and snapshot readers are running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time

import blake3
import numpy as np
import pytest
from qemu.qmp import QMPClient
from qemu.qmp.qmp_client import ExecuteError

import peers
from peers import wait_concluded

KiB = 1024
MiB = 1 << 20
SIZE = 64 * MiB
STRIPE = MiB
WRITERS = 4
READERS = 3
RUNS = 6
#: override with NBDBACKUP_TEST_SEED=N to explore other interleavings
BASE_SEED = int(os.environ.get("NBDBACKUP_TEST_SEED", "4242"))
#: wall-clock budget of the writers in one run (seconds)
WRITE_TIME = 1.5
READ_CHUNK = 4 * MiB


def initial_image(rng: np.random.Generator) -> np.ndarray:
    """Random data with holes and zero runs (every 8th MiB a hole, a few zero MiBs)."""
    img = rng.integers(0, 256, SIZE, dtype=np.uint8)
    for m in range(0, SIZE // MiB, 8):
        img[m * MiB:(m + 1) * MiB] = 0
    img[5 * MiB:5 * MiB + 300 * KiB] = 0
    return img


def read_all(h) -> np.ndarray:
    out = np.empty(SIZE, dtype=np.uint8)
    for off in range(0, SIZE, READ_CHUNK):
        out[off:off + READ_CHUNK] = np.frombuffer(h.pread(READ_CHUNK, off), dtype=np.uint8)
    return out


def b3(a: np.ndarray | bytes) -> str:
    return blake3.blake3(memoryview(a)).hexdigest()


def connect(uri: str):
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def close(h) -> None:
    try:
        h.shutdown()
    except Exception:
        pass


def zero_extents(uri: str) -> list[tuple[int, int]]:
    """(offset, length) of the extents ``base:allocation`` flags ZERO."""
    import nbd

    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    out: list[tuple[int, int]] = []
    try:
        assert h.can_meta_context("base:allocation")
        pos = 0
        while pos < SIZE:
            got: list[tuple[int, int]] = []

            def cb(meta, off, entries, err):
                if meta == "base:allocation":
                    o = off
                    for i in range(0, len(entries), 2):
                        if entries[i + 1] & 2:
                            out.append((o, entries[i]))
                        got.append((o, entries[i]))
                        o += entries[i]
                return 0

            h.block_status(SIZE - pos, pos, cb)
            assert got and got[0][0] == pos
            pos = got[-1][0] + got[-1][1]
    finally:
        close(h)
    return out


class Writer(threading.Thread):
    """Random requests (libnbd aio, up to ``DEPTH`` in flight, never two
    overlapping ones) on the stripes this writer owns; each acknowledged
    request is applied to the shared model."""

    DEPTH = 8

    def __init__(self, idx: int, uri: str, seed: int, model: np.ndarray, known: np.ndarray,
                 deadline: float) -> None:
        super().__init__(name=f"writer-{idx}")
        self.idx, self.uri, self.rng = idx, uri, random.Random(seed)
        self.model, self.known, self.deadline = model, known, deadline
        self.stripes = [k for k in range(SIZE // STRIPE) if k % WRITERS == idx]
        self.ops = {"write": 0, "zero": 0, "trim": 0}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            h = connect(self.uri)
            try:
                self.loop(h)
            finally:
                close(h)
        except BaseException as e:  # reported by the test
            self.error = e

    def pick(self) -> tuple[str, int, int]:
        rng = self.rng
        length = rng.choice([512, 4096, 65536, rng.randint(1, 256 * KiB), rng.randrange(512, 128 * KiB, 512)])
        off = rng.choice(self.stripes) * STRIPE + rng.randrange(0, STRIPE - length + 1)
        if rng.random() < 0.5:
            off -= off % 512  # mostly sector-aligned, sometimes not
        return rng.choices(["write", "zero", "trim"], [8, 1, 1])[0], off, length

    def loop(self, h) -> None:
        import nbd

        pending: list[tuple[int, str, int, int, bytes | None]] = []
        while True:
            more = time.monotonic() < self.deadline
            while more and len(pending) < self.DEPTH:
                kind, off, length = self.pick()
                if any(off < o + n and o < off + length for _, _, o, n, _ in pending):
                    break  # would overlap a request in flight: wait for some
                data = None
                if kind == "write":
                    data = self.rng.randbytes(length)
                    cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
                elif kind == "zero":
                    cookie = h.aio_zero(length, off)
                else:
                    cookie = h.aio_trim(length, off)
                pending.append((cookie, kind, off, length, data))
            if not pending:
                return
            h.poll(-1)
            still = []
            for req in pending:
                cookie, kind, off, length, data = req
                if not h.aio_command_completed(cookie):  # raises if the request failed
                    still.append(req)
                    continue
                if kind == "write":
                    self.model[off:off + length] = np.frombuffer(data, dtype=np.uint8)
                    self.known[off:off + length] = True
                elif kind == "zero":
                    self.model[off:off + length] = 0
                    self.known[off:off + length] = True
                else:
                    self.known[off:off + length] = False  # unspecified after TRIM (proto.md)
                self.ops[kind] += 1
            pending = still


class Reader(threading.Thread):
    """Random reads of the snapshot export, each compared with the original."""

    def __init__(self, idx: int, uri: str, seed: int, original: np.ndarray, stop: threading.Event) -> None:
        super().__init__(name=f"reader-{idx}")
        self.uri, self.rng, self.original, self.stop = uri, random.Random(seed), original, stop
        self.reads = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            h = connect(self.uri)
            try:
                while not self.stop.is_set():
                    n = self.rng.choice([512, 4096, 65536, self.rng.randint(1, MiB)])
                    off = self.rng.randrange(0, SIZE - n + 1)
                    got = h.pread(n, off)
                    want = self.original[off:off + n].tobytes()
                    if got != want:
                        bad = next(i for i in range(n) if got[i] != want[i])
                        raise AssertionError(f"snapshot read ({off}, {n}) differs at byte {off + bad}")
                    self.reads += 1
            finally:
                close(h)
        except BaseException as e:
            self.error = e


@pytest.mark.timeout(170)
@pytest.mark.parametrize("via,runs", [("file", RUNS), ("nbd", 3), ("file-incremental", 3)])
def test_writers_readers_pump_random_runs(via, runs, serve, qemu_nbd, short_tmp):
    """``via=file``: source and target are local files (copy offload);
    ``via=nbd``: both are qemu-nbd exports (the remote block device);
    ``via=file-incremental``: files, incremental jobs with a scratch."""
    disk = short_tmp / "disk.raw"
    img = initial_image(np.random.default_rng(BASE_SEED))
    with open(disk, "wb") as f:
        for m in range(SIZE // MiB):
            chunk = img[m * MiB:(m + 1) * MiB]
            if chunk.any():
                f.seek(m * MiB)
                f.write(chunk.tobytes())
        f.truncate(SIZE)
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")

    stack = contextlib.ExitStack()
    if via == "nbd":
        tfile = short_tmp / "target.raw"
        with open(tfile, "wb") as f:
            f.truncate(SIZE)
        source = stack.enter_context(qemu_nbd(disk)).uri
        nbd_target = stack.enter_context(qemu_nbd(tfile)).uri
    else:
        source, tfile, nbd_target = os.fspath(disk), None, None
    incremental = via == "file-incremental"
    with stack, serve(f"disk={source}", extra=["--control", ctl]) as peer:
        live_uri = peer.uri_for("disk")

        async def one_run(qmp: QMPClient, run: int, original: np.ndarray) -> np.ndarray:
            seed = BASE_SEED + run
            rng = random.Random(seed)
            job = f"j{run}"
            if tfile is not None:
                # the one NBD target: refill it so a skipped cluster shows
                target = tfile
                with open(tfile, "r+b") as f:
                    f.write(bytes([0xEE]) * SIZE)
            else:
                target = short_tmp / f"target{run}.raw"
            args = {"export": "disk", "job-id": job, "sync": "incremental" if incremental else "full",
                    "target": nbd_target or os.fspath(target),
                    "speed": rng.choice([4, 8, 16, 32]) * MiB,
                    "max-workers": rng.randint(1, 4),
                    "max-chunk": rng.choice([64 * KiB, 256 * KiB, MiB, 4 * MiB])}
            if incremental:
                args["bitmap"] = "b"
            ctx = f"run {run} seed {seed} {args}"
            assert await qmp.execute("backup-start", args) == {}, ctx
            snap_uri = peer.uri_for(f"disk@{job}")
            if incremental:
                from test_incremental_backup import dirty_clusters

                # In the job's clusters (4 KiB by default, docs/cbwsub.md): the
                # bitmap's 64 KiB granules cover whole runs of them.
                cs0 = next(j for j in await qmp.execute("query-jobs") if j["id"] == job)["cluster-size"]
                dirty = await asyncio.to_thread(dirty_clusters, snap_uri, "b", cs0)

            speeds: list[int] = []
            model, known = original.copy(), np.ones(SIZE, dtype=bool)
            deadline = time.monotonic() + WRITE_TIME
            stop = threading.Event()
            writers = [Writer(i, live_uri, seed * 100 + i, model, known, deadline) for i in range(WRITERS)]
            readers = [Reader(i, snap_uri, seed * 100 + 50 + i, original, stop) for i in range(READERS)]
            for t in writers + readers:
                t.start()
            while any(w.is_alive() for w in writers):
                await asyncio.sleep(rng.uniform(0.05, 0.3))
                speed = rng.choice([0, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB])
                try:
                    await qmp.execute("job-set-speed", {"id": job, "speed": speed})
                    speeds.append(speed)
                except ExecuteError:
                    # the pump may finish first (speed 0 = unlimited): then the
                    # job is concluded and its speed can no longer change
                    jobs = {j["id"]: j for j in await qmp.execute("query-jobs")}
                    assert jobs[job]["status"] == "concluded", (ctx, jobs)
            stop.set()
            for t in writers + readers:
                await asyncio.to_thread(t.join, 30)
            for t in writers + readers:
                assert t.error is None, f"{ctx}: {t.name}: {t.error!r}"
            assert all(w.ops["write"] > 0 for w in writers), ctx
            assert all(r.reads > 0 for r in readers), ctx

            # The whole snapshot is still the original.
            h = connect(snap_uri)
            try:
                snap = await asyncio.to_thread(read_all, h)
            finally:
                close(h)
            assert b3(snap) == b3(original), f"{ctx}: snapshot differs"
            # Block status on the snapshot describes the point-in-time image:
            # what it calls zero is zero in the original.
            zext = await asyncio.to_thread(zero_extents, snap_uri)
            for off, n in zext:
                assert not original[off:off + n].any(), f"{ctx}: snapshot extent ({off}, {n}) is not zero"

            try:
                await qmp.execute("job-set-speed", {"id": job, "speed": 0})
            except ExecuteError:
                pass  # already concluded
            info = await wait_concluded(qmp, job)
            assert "error" not in info, (ctx, info)
            if incremental:
                cs = info["cluster-size"]
                assert cs == cs0, (ctx, info)
                assert info["current-progress"] == info["total-progress"] == len(dirty) * cs, (ctx, info)
                assert info["scratch-bytes"] == info["bytes-cbw-to-scratch"], (ctx, info)
                scratch_stats.append(info["bytes-cbw-to-scratch"])
                stats.append((info["bytes-copied-by-pump"], info["bytes-copied-by-cbw"], len(speeds)))
                await qmp.execute("job-dismiss", {"id": job})
                t = np.fromfile(target, dtype=np.uint8)
                want = np.zeros(SIZE, dtype=np.uint8)
                for c in dirty:
                    want[c * cs:(c + 1) * cs] = original[c * cs:(c + 1) * cs]
                assert b3(t) == b3(want), f"{ctx}: target is not exactly the dirty clusters"
                os.unlink(target)
                h = connect(live_uri)
                try:
                    live = await asyncio.to_thread(read_all, h)
                finally:
                    close(h)
                diff = np.flatnonzero((live != model) & known)
                assert diff.size == 0, f"{ctx}: live export differs from the model at {diff[:10]}"
                return live
            assert info["current-progress"] == info["total-progress"] == SIZE, (ctx, info)
            # one copy state: every cluster copied exactly once, by the pump or by CBW,
            # or found zero in the source by CBW and copied nowhere (copystate rule 7)
            assert info["bytes-copied-by-pump"] + info["bytes-copied-by-cbw"] \
                + info["clusters-zero-in-snapshot"] * info["cluster-size"] == SIZE, (ctx, info)
            stats.append((info["bytes-copied-by-pump"], info["bytes-copied-by-cbw"], len(speeds)))
            await qmp.execute("job-dismiss", {"id": job})

            t = np.fromfile(target, dtype=np.uint8)
            assert t.size == SIZE and b3(t) == b3(original), f"{ctx}: target differs from the original"
            if tfile is None:
                os.unlink(target)

            h = connect(live_uri)
            try:
                live = await asyncio.to_thread(read_all, h)
            finally:
                close(h)
            diff = np.flatnonzero((live != model) & known)
            assert diff.size == 0, f"{ctx}: live export differs from the model at {diff[:10]}"
            return live

        async def scenario() -> None:
            qmp = QMPClient("concurrency-test")
            await qmp.connect(ctl)
            try:
                original = img
                if incremental:
                    await qmp.execute("block-dirty-bitmap-add", {"export": "disk", "name": "b"})
                for run in range(runs):
                    original = await one_run(qmp, run, original)
            finally:
                await qmp.disconnect()

        stats: list[tuple[int, int, int]] = []
        scratch_stats: list[int] = []
        asyncio.run(asyncio.wait_for(scenario(), 150))
        if incremental:  # CBW outside the dirty sets really went to the scratch
            assert sum(scratch_stats) > 0, scratch_stats
        # The runs really raced: CBW and the pump both copied, speeds changed.
        assert len(stats) == runs
        assert sum(c for _, c, _ in stats) > 0 and sum(p for p, _, _ in stats) > 0, stats
        assert sum(n for _, _, n in stats) >= runs, stats


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [5 * MiB + 4097, 3 * 64 * KiB + 511])
def test_odd_size_last_cluster(size, serve, short_tmp):
    """A disk whose size is no multiple of the cluster (nor of 512): live
    writes to the short last cluster and across the last boundary are saved by
    CBW; snapshot, target and live export are all right."""
    rng = random.Random(size)
    orig = rng.randbytes(size)
    disk = short_tmp / "disk.raw"
    disk.write_bytes(orig)
    target = short_tmp / "t.raw"
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    cs = 64 * KiB
    last = (size - 1) // cs * cs
    writes = [(size - 1, 1), (size - 700, 700), (last - 100, 300), (last, size - last), (0, 5)]
    with serve(f"disk={disk}", extra=["--control", ctl]) as peer:
        async def scenario() -> dict:
            qmp = QMPClient("odd-size")
            await qmp.connect(ctl)
            try:
                await qmp.execute("backup-start", {"export": "disk", "job-id": "j", "sync": "full",
                                                   "target": os.fspath(target), "speed": 1})
                model = bytearray(orig)
                h = connect(peer.uri_for("disk"))
                try:
                    for off, n in writes:
                        data = rng.randbytes(n)
                        await asyncio.to_thread(h.pwrite, data, off)
                        model[off:off + n] = data
                    with pytest.raises(Exception):
                        h.pwrite(b"x", size)  # beyond the end: refused
                finally:
                    close(h)
                hs = connect(peer.uri_for("disk@j"))
                try:
                    assert hs.get_size() == size
                    assert bytes(await asyncio.to_thread(hs.pread, size, 0)) == orig
                finally:
                    close(hs)
                await qmp.execute("job-set-speed", {"id": "j", "speed": 0})
                info = await wait_concluded(qmp, "j")
                await qmp.execute("job-dismiss", {"id": "j"})
                h = connect(peer.uri_for("disk"))
                try:
                    assert bytes(h.pread(size, 0)) == bytes(model)
                finally:
                    close(h)
                return info
            finally:
                await qmp.disconnect()

        info = asyncio.run(asyncio.wait_for(scenario(), 40))
    assert "error" not in info and info["current-progress"] == info["total-progress"] == size, info
    t = target.read_bytes()
    assert len(t) >= size and t[:size] == orig


@pytest.mark.timeout(90)
def test_cancel_and_dismiss_under_load(serve, short_tmp):
    """Cancel and dismiss a backup while writers and snapshot readers run:
    no reader ever sees wrong data (after dismiss they get errors only), no
    acknowledged write is lost, and writes after the dismiss go straight to
    the disk."""
    rng = np.random.default_rng(7)
    img = initial_image(rng)
    disk = short_tmp / "disk.raw"
    img.tofile(disk)
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    with serve(f"disk={disk}", extra=["--control", ctl]) as peer:
        live_uri, snap_uri = peer.uri_for("disk"), peer.uri_for("disk@j")
        model, known = img.copy(), np.ones(SIZE, dtype=bool)
        dismissed, abort = threading.Event(), threading.Event()
        outcome: dict[str, object] = {"reads": 0, "errors_after": 0}

        def reader(seed: int) -> None:
            r = random.Random(seed)
            h = connect(snap_uri)
            try:
                while not abort.is_set():
                    n = r.choice([4096, 65536, r.randint(1, MiB)])
                    off = r.randrange(0, SIZE - n + 1)
                    was_dismissed = dismissed.is_set()
                    try:
                        got = h.pread(n, off)
                    except Exception as e:
                        assert dismissed.is_set(), f"snapshot read failed before dismiss: {e}"
                        outcome["errors_after"] = int(outcome["errors_after"]) + 1
                        return
                    assert bytes(got) == img[off:off + n].tobytes(), \
                        f"snapshot read ({off}, {n}) wrong (dismissed before: {was_dismissed})"
                    outcome["reads"] = int(outcome["reads"]) + 1
            finally:
                close(h)

        async def scenario() -> None:
            qmp = QMPClient("cancel-load")
            await qmp.connect(ctl)
            try:
                await qmp.execute("backup-start", {"export": "disk", "job-id": "j", "sync": "full",
                                                   "target": os.fspath(short_tmp / "t.raw"), "speed": MiB})
                writers = [Writer(i, live_uri, 70 + i, model, known, time.monotonic() + 2.0)
                           for i in range(WRITERS)]
                for w in writers:
                    w.start()
                readers = [asyncio.create_task(asyncio.to_thread(reader, 90 + i)) for i in range(READERS)]
                await asyncio.sleep(0.5)
                await qmp.execute("job-cancel", {"id": "j"})
                info = await wait_concluded(qmp, "j")
                assert "error" in info and "cancel" in info["error"].lower(), info
                assert info["current-progress"] < SIZE, info
                dismissed.set()
                await qmp.execute("job-dismiss", {"id": "j"})
                assert await qmp.execute("query-jobs") == []
                await asyncio.gather(*readers)
                for w in writers:
                    await asyncio.to_thread(w.join, 30)
                    assert w.error is None, f"{w.name}: {w.error!r}"
            finally:
                abort.set()
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(scenario(), 60))
        assert outcome["errors_after"] == READERS and int(outcome["reads"]) > 0, outcome
        h = connect(live_uri)
        try:
            live = read_all(h)
        finally:
            close(h)
        diff = np.flatnonzero((live != model) & known)
        assert diff.size == 0, f"live export differs from the model at {diff[:10]}"
