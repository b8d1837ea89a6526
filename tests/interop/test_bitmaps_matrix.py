"""bitmap-mode x outcome, and the refused sync/bitmap/bitmap-mode combinations.

Real peers: `nbdbackup serve --control` (one memory export per case),
qemu-io for live writes, nbdkit ``memory`` behind the ``error`` filter as
the backup target (``error-pwrite-rate=1 error-file=F``: every target write
fails once F exists), nbdinfo for the maps, nbdcopy + qemu-img compare.

Matrix: for bitmap-mode never / on-success / always and outcome success /
cancel / target I/O error mid-job: a full backup and a new bitmap in one
transaction; writes A; a ``sync=bitmap`` job (max-workers 1, speed 1 B/s:
it copies its first cluster, then waits); writes B during the job; then the
outcome.  Afterwards the bitmap holds exactly (D = clusters that reached
the target, read back from nbdkit's allocation map):

    ==========  ========  =============
    mode        success   cancel / error
    ==========  ========  =============
    never       A | B     A | B
    on-success  B         A | B
    always      B         B | (A - D)
    ==========  ========  =============

checked with query-bitmaps ``count`` and the live export's dirty map; then a
recovery incremental applied over (full + D) equals the live disk.

Validation: every sync x {no bitmap, unknown bitmap, bitmap} x {no mode,
on-success, never, always}: refused exactly where QEMU refuses (iotest 257's
table), with an error naming the problem; accepted ones start a job.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

import peers
from test_incremental_backup import (CS, MiB, allocated_clusters, apply_clusters, bitmap_info, ctl_path,
                                     dirty_clusters, qio, qmp_connect, refused, run_tool, wait_job, writes_for)

SIZE = 2 * MiB
A = {1, 4, 7, 10, 13}
B = {4, 20}
MODES = ["never", "on-success", "always"]
OUTCOMES = ["success", "cancel", "error"]


def expected_bits(mode: str, outcome: str, done: set[int]) -> set[int]:
    if mode == "never" or (mode == "on-success" and outcome != "success"):
        return A | B
    if outcome == "success":
        return set(B)
    return B | (A - done)


@pytest.mark.timeout(90)
def test_bitmap_mode_outcome_matrix(serve, nbdkit, short_tmp):
    cases = [(m, o) for m in MODES for o in OUTCOMES]
    exports = [f"d{i}=memory:{SIZE}" for i in range(len(cases))]
    ctl = ctl_path()
    with serve(*exports, extra=["--control", ctl]) as peer:

        async def one(qmp, i: int, mode: str, outcome: str) -> None:
            exp, bm = f"d{i}", f"b{i}"
            live = peer.uri_for(exp)
            qio(live, f"write -P 0x5{i} 0 {SIZE}")  # non-zero everywhere: copies allocate
            full = short_tmp / f"full{i}.raw"
            await qmp.execute("transaction", {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"export": exp, "name": bm}},
                {"type": "backup-start", "data": {"export": exp, "job-id": f"f{i}", "sync": "full",
                                                  "target": os.fspath(full)}}]})
            assert "error" not in await wait_job(qmp, f"f{i}")
            await qmp.execute("job-dismiss", {"id": f"f{i}"})
            qio(live, *writes_for(A, 0xa0 + i))
            errfile = short_tmp / f"err{i}"
            with nbdkit("memory", str(SIZE), "error-pwrite-rate=1", f"error-file={errfile}",
                        filters=["error"]) as tgt:
                await qmp.execute("backup-start", {
                    "export": exp, "job-id": f"j{i}", "sync": "bitmap", "bitmap": bm, "bitmap-mode": mode,
                    "target": tgt.uri, "max-workers": 1, "speed": 1})
                qio(live, *writes_for(B, 0xb0 + i))
                if outcome == "cancel":
                    await qmp.execute("job-cancel", {"id": f"j{i}"})
                elif outcome == "error":
                    errfile.touch()
                    await qmp.execute("job-set-speed", {"id": f"j{i}", "speed": 0})
                else:
                    await qmp.execute("job-set-speed", {"id": f"j{i}", "speed": 0})
                info = await wait_job(qmp, f"j{i}")
                if outcome == "success":
                    assert "error" not in info, info
                else:
                    assert "error" in info, info
                    if outcome == "cancel":
                        assert "canceled" in info["error"].lower()
                errfile.unlink(missing_ok=True)
                done = allocated_clusters(tgt.uri)
                part = short_tmp / f"part{i}.raw"
                run_tool(peers.require("nbdcopy"), tgt.uri, os.fspath(part))
                # Dismissed while nbdkit runs: the job's target connection closes first, so
                # nbdkit exits at once on SIGTERM (with a client connected it waits, and is
                # killed after peers.PEER_STOP_TIMEOUT, 2 s a case).
                await qmp.execute("job-dismiss", {"id": f"j{i}"})
            if outcome == "success":
                assert A <= done
            elif mode == "always":
                assert 1 in done and A - done, (done, "the test must exercise a partial copy")
            want = expected_bits(mode, outcome, done)
            info = await bitmap_info(qmp, exp, bm)
            assert not info["busy"] and info["recording"], info
            assert info["count"] == len(want) * CS, (mode, outcome, info, sorted(want))
            assert dirty_clusters(live, bm) == want, (mode, outcome)
            # Recovery: an incremental over (full + what reached the target) is the live disk.
            rec = short_tmp / f"rec{i}.raw"
            await qmp.execute("backup-start", {"export": exp, "job-id": f"r{i}", "sync": "incremental",
                                               "bitmap": bm, "target": os.fspath(rec), "snapshot": f"s{i}"})
            assert "error" not in await wait_job(qmp, f"r{i}")
            assert dirty_clusters(peer.uri_for(f"s{i}"), bm) == want
            await qmp.execute("job-dismiss", {"id": f"r{i}"})
            assert (await bitmap_info(qmp, exp, bm))["count"] == 0
            chain = short_tmp / f"chain{i}.raw"
            shutil.copyfile(full, chain)
            apply_clusters(chain, part, done)
            apply_clusters(chain, rec, want)
            run_tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(chain), live)

        async def scenario():
            qmp = await qmp_connect(ctl)
            try:
                for i, (mode, outcome) in enumerate(cases):
                    await one(qmp, i, mode, outcome)
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(scenario(), 80))


SYNCS = ["full", "top", "none", "bitmap", "incremental"]
BITMAPS = [None, "bitmap404", "b0"]
BMODES = [None, "on-success", "never", "always"]


def qemu_refuses(sync: str, bitmap: str | None, mode: str | None) -> str | tuple | None:
    """A word the error must contain when QEMU refuses the combination (or a
    tuple of words: one of them, when two reasons apply), else None."""
    if bitmap is None:
        if sync in ("bitmap", "incremental"):
            return "bitmap"
        return "bitmap" if mode is not None else None
    if sync == "none":
        return "none"
    if sync == "incremental":
        if mode not in (None, "on-success"):
            return "on-success"
    elif mode is None:
        return "mode"
    useless = mode == "never" and sync in ("full", "top")
    if bitmap == "bitmap404":
        return ("bitmap404", "never") if useless else "bitmap404"
    return "never" if useless else None


@pytest.mark.timeout(60)
def test_validation_matrix(serve):
    ctl = ctl_path()
    with serve(f"disk=memory:{SIZE}", extra=["--control", ctl]) as peer:

        async def scenario():
            qmp = await qmp_connect(ctl)
            try:
                await qmp.execute("block-dirty-bitmap-add", {"export": "disk", "name": "b0"})
                n = 0
                for sync in SYNCS:
                    for bitmap in BITMAPS:
                        for mode in BMODES:
                            n += 1
                            args = {"export": "disk", "job-id": f"v{n}", "sync": sync,
                                    "target": f"memory:{SIZE}", "speed": 1}
                            if sync == "none":
                                args["snapshot"] = f"snap{n}"
                            if bitmap is not None:
                                args["bitmap"] = bitmap
                            if mode is not None:
                                args["bitmap-mode"] = mode
                            word = qemu_refuses(sync, bitmap, mode)
                            if word is None:
                                assert await qmp.execute("backup-start", args) == {}
                                jobs = await qmp.execute("query-jobs")
                                if jobs[0]["status"] != "concluded":  # top of an empty disk: done at once
                                    await qmp.execute("job-cancel", {"id": f"v{n}"})
                                await wait_job(qmp, f"v{n}")
                                await qmp.execute("job-dismiss", {"id": f"v{n}"})
                            else:
                                msg = await refused(qmp, "backup-start", args)
                                words = word if isinstance(word, tuple) else (word,)
                                assert any(w.lower() in msg.lower() for w in words), (sync, bitmap, mode, msg)
                                assert await qmp.execute("query-jobs") == []
                            b0 = await bitmap_info(qmp, "disk", "b0")
                            assert not b0["busy"], (sync, bitmap, mode)
                # Bitmap command refusals, with clear messages.
                bad = [
                    ({"export": "disk", "name": "b0"}, "already exists"),
                    ({"export": "disk", "name": "x", "granularity": 1000}, "power of 2"),
                    ({"export": "disk", "name": "x", "granularity": 256}, "power of 2"),
                    ({"export": "disk", "name": "x", "persistent": True}, "persistent"),
                    ({"export": "nope", "name": "x"}, "nope"),
                    ({"export": "disk", "name": ""}, "empty"),
                ]
                for args, word in bad:
                    assert word in await refused(qmp, "block-dirty-bitmap-add", args)
                assert "not found" in await refused(qmp, "block-dirty-bitmap-remove",
                                                    {"export": "disk", "name": "zz"})
                assert "not found" in await refused(qmp, "block-dirty-bitmap-merge",
                                                    {"export": "disk", "target": "b0", "bitmaps": ["zz"]})
                # A busy bitmap: every change refused, the job unaffected.
                qio(peer.uri_for("disk"), *writes_for(A, 0x33))
                await qmp.execute("backup-start", {"export": "disk", "job-id": "busy", "sync": "bitmap",
                                                   "bitmap": "b0", "bitmap-mode": "on-success",
                                                   "target": f"memory:{SIZE}", "speed": 1})
                for cmd in ("block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
                            "block-dirty-bitmap-disable"):
                    assert "in use" in await refused(qmp, cmd, {"export": "disk", "name": "b0"})
                assert "in use" in await refused(qmp, "backup-start", {
                    "export": "disk", "job-id": "busy2", "sync": "incremental", "bitmap": "b0",
                    "target": f"memory:{SIZE}"})
                await qmp.execute("job-cancel", {"id": "busy"})
                await wait_job(qmp, "busy")
                await qmp.execute("job-dismiss", {"id": "busy"})
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(scenario(), 50))
