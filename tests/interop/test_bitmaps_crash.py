"""Persistent dirty bitmaps across ``kill -9``, power loss and clean restarts of `nbdbackup serve`.

A raw file export with ``--state-dir``; a full backup and a persistent
bitmap in one transaction; then many trials: a libnbd writer (random
writes, some FUA, FLUSH every few writes; it records which writes were
acknowledged) runs while the server is killed with SIGKILL at a random
moment (every third trial in the middle of an incremental backup job, its
bitmap frozen); the server restarts on the same state directory.  After each
restart the bitmap must be either consistent and cover every acknowledged
write, or ``inconsistent`` with incrementals refused -- never silently
incomplete.  At the end: a clean stop (SIGTERM) and restart keeps the bitmap
intact, and the incremental over everything written across all the crashes,
applied to the full backup, equals the live disk (so the bitmap also
covered writes that reached the disk without being acknowledged).

Simulated power loss: a bitmap file left ``in-use-dirty`` by a writer of
another boot (its header rewritten with a foreign boot id) loads as
``inconsistent``; an incremental from it is refused with an error saying to
take a full backup; it can only be removed.
"""

from __future__ import annotations

import asyncio
import glob
import os
import random
import shutil
import signal
import threading
import time

import nbd
import pytest

import peers
from nbdbackup.bitmap.store import SLOTS, STATE_DIRTY, read_header
from test_incremental_backup import (CS, MiB, apply_clusters, bitmap_info, ctl_path, dirty_clusters, inconsistent_and_refused,
                                     qmp_connect, refused, run_tool, wait_job)

SIZE = 8 * MiB
TRIALS = 12
BUDGET = 18.0  # seconds for all the trials


class Writer(threading.Thread):
    """Random writes over libnbd until the connection dies; ``acked``: clusters
    of every write whose reply arrived."""

    def __init__(self, uri: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.rng = random.Random(seed)
        self.acked: set[int] = set()
        self.count = 0
        self.connected = threading.Event()

    def run(self) -> None:
        h = nbd.NBD()
        try:
            h.connect_uri(self.uri)
            self.connected.set()
            while True:
                n = self.rng.choice([512, 4096, 3 * 4096, CS + 4096])
                off = self.rng.randrange(0, SIZE - n) // 512 * 512
                buf = bytes([self.rng.randrange(1, 256)]) * n
                flags = nbd.CMD_FLAG_FUA if self.rng.random() < 0.2 else 0
                h.pwrite(buf, off, flags)
                self.acked.update(range(off // CS, (off + n - 1) // CS + 1))
                self.count += 1
                if self.count % 5 == 0:
                    h.flush()
        except nbd.Error:
            pass  # the server died
        finally:
            self.connected.set()
            try:
                h.close()
            except Exception:
                pass


def forge_foreign_boot(state_dir) -> None:
    """Make every bitmap file look left in-use-dirty by another boot (power loss)."""
    for path in glob.glob(os.path.join(state_dir, "*", "*.bitmap")):
        with open(path, "r+b") as f:
            raw = f.read(4096)
            h = read_header(raw)
            h.state = STATE_DIRTY
            h.boot_id = bytes(b ^ 0xFF for b in h.boot_id) if any(h.boot_id) else b"\x01" * 16
            f.seek(SLOTS[h.slot])
            f.write(h.pack())


@pytest.mark.timeout(90)
def test_kill9_then_clean_restart(serve, short_tmp, make_image):
    disk = make_image(short_tmp / "disk.raw", SIZE, [(0x11, 0, SIZE // 2)])
    state = os.fspath(short_tmp / "state")
    full = short_tmp / "full.raw"
    extra = ["--state-dir", state]

    def start():
        ctl = ctl_path()
        return ctl, serve(f"disk={disk}", extra=["--control", ctl, *extra])

    ctl, cm = start()
    with cm:
        async def setup():
            qmp = await qmp_connect(ctl)
            try:
                await qmp.execute("transaction", {"actions": [
                    {"type": "block-dirty-bitmap-add", "data": {"export": "disk", "name": "b", "persistent": True}},
                    {"type": "backup-start", "data": {"export": "disk", "job-id": "f", "sync": "full",
                                                      "target": os.fspath(full)}}]})
                assert "error" not in await wait_job(qmp, "f")
                await qmp.execute("job-dismiss", {"id": "f"})
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(setup(), 20))

    rng = random.Random(9)
    acked_all: set[int] = set()
    deadline = time.monotonic() + BUDGET
    trials = writes = 0
    while trials < TRIALS and time.monotonic() < deadline:
        ctl, cm = start()
        with cm as peer:
            async def check():
                qmp = await qmp_connect(ctl)
                try:
                    inconsistent, info = await inconsistent_and_refused(qmp, "disk", "b", SIZE)
                    if inconsistent:
                        return False
                    assert info["persistent"] and info["recording"] and not info["busy"], info
                    if trials % 3 == 2:
                        # Die in the middle of an incremental: the frozen bitmap must lose nothing.
                        await qmp.execute("backup-start", {
                            "export": "disk", "job-id": "mid", "sync": "incremental", "bitmap": "b",
                            "target": os.fspath(short_tmp / f"mid{trials}.raw"), "speed": 1})
                        assert (await bitmap_info(qmp, "disk", "b"))["busy"]
                    return True
                finally:
                    await qmp.disconnect()

            consistent = asyncio.run(asyncio.wait_for(check(), 10))
            assert consistent, "same boot, kill -9: the memory-mapped bitmap must load consistent"
            have = dirty_clusters(peer.uri_for("disk"), "b")
            missing = acked_all - have
            assert not missing, f"trial {trials}: acknowledged writes missing from the bitmap: {sorted(missing)}"
            w = Writer(peer.uri_for("disk"), rng.randrange(1 << 30))
            w.start()
            w.connected.wait(5)
            time.sleep(rng.uniform(0.02, 0.25))
            peers.stop(peer, signal.SIGKILL)
            w.join(10)
            assert not w.is_alive()
            acked_all |= w.acked
            writes += w.count
            trials += 1
    assert trials >= 5 and writes > 0, (trials, writes)

    # Restart after the last crash, then a clean stop and restart: intact and complete.
    ctl, cm = start()
    with cm as peer:
        before = dirty_clusters(peer.uri_for("disk"), "b")
        assert acked_all <= before
    assert peer.returncode == 0, peer.log()
    ctl, cm = start()
    with cm as peer:
        live = peer.uri_for("disk")
        assert dirty_clusters(live, "b") == before

        async def incremental():
            qmp = await qmp_connect(ctl)
            try:
                info = await bitmap_info(qmp, "disk", "b")
                assert not info["inconsistent"] and info["count"] == len(before) * CS, info
                inc = short_tmp / "inc.raw"
                await qmp.execute("backup-start", {"export": "disk", "job-id": "i", "sync": "incremental",
                                                   "bitmap": "b", "target": os.fspath(inc), "snapshot": "s"})
                assert "error" not in await wait_job(qmp, "i")
                assert dirty_clusters(peer.uri_for("s"), "b") == before
                await qmp.execute("job-dismiss", {"id": "i"})
                return inc
            finally:
                await qmp.disconnect()

        inc = asyncio.run(asyncio.wait_for(incremental(), 20))
        chain = short_tmp / "chain.raw"
        shutil.copyfile(full, chain)
        apply_clusters(chain, inc, before)
        run_tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(chain), live)

        # Writes after the incremental, then a kill -9 and a forged foreign boot id.
        run_tool("qemu-io", "-f", "raw", "-c", f"write -P 0x77 {3 * CS} 512", live)
        peers.stop(peer, signal.SIGKILL)
    forge_foreign_boot(state)
    ctl, cm = start()
    with cm as peer:
        async def inconsistent():
            qmp = await qmp_connect(ctl)
            try:
                info = await bitmap_info(qmp, "disk", "b")
                assert info["inconsistent"] and not info["recording"], info
                msg = await refused(qmp, "backup-start", {"export": "disk", "job-id": "x", "sync": "incremental",
                                                          "bitmap": "b", "target": f"memory:{SIZE}"})
                assert "inconsistent" in msg and "full backup" in msg, msg
                for cmd in ("block-dirty-bitmap-clear", "block-dirty-bitmap-enable"):
                    assert "inconsistent" in await refused(qmp, cmd, {"export": "disk", "name": "b"})
                lst = run_tool(peers.require("nbdinfo"), "--list", "--content", "--json", peer.uri)
                assert "qemu:dirty-bitmap:b" not in lst  # never offered as a usable map
                await qmp.execute("block-dirty-bitmap-remove", {"export": "disk", "name": "b"})
                assert await qmp.execute("query-bitmaps", {"export": "disk"}) == []
            finally:
                await qmp.disconnect()

        asyncio.run(asyncio.wait_for(inconsistent(), 20))
