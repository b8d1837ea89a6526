"""Interop: the nbdkit fault plugin (``plugins/faults.py``) run by real nbdkit.

First the plugin as a disk: every command through our client lands in the
file exactly as a plain file export would, and extents follow the file's
holes.  Then its rules: a fault fires only for requests overlapping its
range, after ``skip`` matches and at most ``count`` times, with the errno
asked for, leaving the disk unchanged; rules change while a client stays
connected; a delay stalls one request while others on the same connection
pass it; a malformed rules file stops nbdkit at start with the reason.
Last, what the plugin is for: backup error policies with faults on exactly
known clusters (``ignore`` skips those and only those; ``stop`` pauses at
the one failing read and a resume completes a correct backup).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

import peers
from nbdbackup.blockdev.base import HOLE_ZERO, Extent
from nbdbackup.nbd.client import connect
from test_backup_faults import CS, FILL, NCL, SIZE, Env, make_disks, run

PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "plugins", "faults.py")
M = 1 << 20


def set_rules(path: Path, rules: list[dict] | None) -> None:
    """Replace the rules file atomically (None: remove it)."""
    if rules is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rules))
    os.replace(tmp, path)


def faults(disk: Path, rules: Path, log: Path, *extra: str):
    return peers.nbdkit("python", PLUGIN, f"file={disk}", f"rules={rules}", f"log={log}", *extra)


def log_lines(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def arun(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_serves_the_file_like_a_disk(short_tmp):
    disk = short_tmp / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(8 * M)
    with faults(disk, short_tmp / "rules.json", short_tmp / "log") as p:
        async def main():
            c = await connect(p.uri, meta_contexts=["base:allocation"])
            try:
                assert c.size == 8 * M and not c.read_only
                data = os.urandom(3 * M)
                await c.pwrite(data, M)
                await c.pwrite(b"fua!", 6 * M, fua=True)
                await c.zero(2 * M, M)  # may trim: a hole
                await c.zero(3 * M, 4096, no_hole=True)
                await c.trim(M, 4096)
                await c.flush()
                await c.cache(0, M)
                assert await c.pread(4096, M) == bytes(4096)  # TRIM punched a hole (ext4, tmpfs)
                assert await c.pread(M, 2 * M) == bytes(M)
                assert await c.pread(4096, 3 * M) == bytes(4096)
                assert await c.pread(M - 4096, 3 * M + 4096) == data[2 * M + 4096:]
                ext = await c.block_status(0, c.size)
                assert ext[0] == Extent(0, M + 4096, HOLE_ZERO)  # up to the end of the TRIM
                assert any(e.offset <= 2 * M and e.end >= 3 * M and e.flags == HOLE_ZERO for e in ext), ext
                assert ext[-1].flags == HOLE_ZERO and ext[-1].end == 8 * M
                return bytes(await c.pread(c.size, 0))
            finally:
                await c.disconnect()

        seen = arun(main())
    assert seen == disk.read_bytes()
    assert seen[6 * M:6 * M + 4] == b"fua!"


def test_range_skip_count_and_errno(short_tmp):
    disk = short_tmp / "disk.raw"
    disk.write_bytes(b"\x11" * (4 * M))
    rules, log = short_tmp / "rules.json", short_tmp / "log"
    set_rules(rules, [{"op": "pwrite", "offset": CS, "length": CS, "error": "ENOSPC", "skip": 1, "count": 2},
                      {"op": "pread", "offset": 3 * M, "error": "EIO"}])
    with faults(disk, rules, log) as p:
        async def main():
            c = await connect(p.uri)
            try:
                outcomes = []
                for i in range(5):
                    try:
                        await c.pwrite(bytes([0x20 + i]) * 512, CS + 100)
                        outcomes.append("ok")
                    except OSError as e:
                        outcomes.append(errno.errorcode[e.errno])
                    await c.pwrite(b"\x33" * 512, 0)  # never overlaps: never fails
                assert outcomes == ["ok", "ENOSPC", "ENOSPC", "ok", "ok"]
                # The failed writes changed nothing: the last good one (i=4) is there.
                assert await c.pread(512, CS + 100) == b"\x24" * 512
                assert await c.pread(16, CS - 16) == b"\x11" * 16  # just before the range
                for off, n in ((3 * M, 1), (3 * M - 10, 11), (4 * M - 512, 512)):
                    with pytest.raises(OSError) as ei:
                        await c.pread(n, off)
                    assert ei.value.errno == errno.EIO
                assert await c.pread(10, 3 * M - 10) == b"\x11" * 10  # ends where the range starts
            finally:
                await c.disconnect()

        arun(main())
    lines = log_lines(log)
    assert [(x["rule"], x["op"], x["error"]) for x in lines] == \
        [(0, "pwrite", "ENOSPC")] * 2 + [(1, "pread", "EIO")] * 3


def test_rules_change_while_connected(short_tmp):
    disk = short_tmp / "disk.raw"
    disk.write_bytes(bytes(M))
    rules = short_tmp / "rules.json"
    with faults(disk, rules, short_tmp / "log") as p:
        async def main():
            c = await connect(p.uri)

            async def flush_errno() -> int:
                try:
                    await c.flush()
                    return 0
                except OSError as e:
                    return e.errno

            try:
                assert await flush_errno() == 0  # no rules file: no faults
                set_rules(rules, [{"op": "flush", "error": "EIO"}])
                assert await flush_errno() == errno.EIO
                set_rules(rules, [{"op": "flush", "error": "ENOSPC", "count": 1}])
                assert [await flush_errno() for _ in range(3)] == [errno.ENOSPC, 0, 0]
                (short_tmp / "rules.json").write_text('[{"op": "flush", "error": ')  # torn write
                assert await flush_errno() == 0  # the previous rules stay
                set_rules(rules, None)
                assert await flush_errno() == 0
            finally:
                await c.disconnect()

        arun(main())


def test_delay_stalls_one_request_while_others_pass(short_tmp):
    disk = short_tmp / "disk.raw"
    disk.write_bytes(b"\x5a" * M)
    rules = short_tmp / "rules.json"
    set_rules(rules, [{"op": "pread", "offset": 0, "length": 4096, "delay": 0.6}])
    with faults(disk, rules, short_tmp / "log") as p:
        async def main():
            c = await connect(p.uri)
            try:
                order = []

                async def read(off: int) -> None:
                    assert await c.pread(512, off) == b"\x5a" * 512
                    order.append(off)

                t0 = time.monotonic()
                slow = asyncio.ensure_future(read(0))
                await asyncio.sleep(0.05)
                await asyncio.gather(*(read(o) for o in range(8192, 8192 + 10 * 4096, 4096)))
                fast_done = time.monotonic() - t0
                await slow
                slow_done = time.monotonic() - t0
                assert order[-1] == 0 and len(order) == 11
                assert fast_done < 0.5 <= 0.6 <= slow_done + 0.01, (fast_done, slow_done)
            finally:
                await c.disconnect()

        arun(main())


@pytest.mark.parametrize("text,reason", [
    ('{"op": "pread"}', "JSON list"),
    ('[{"op": "read"}]', "is not one of"),
    ('[{"op": "pread", "error": "EWHAT"}]', "not an errno name"),
    ('[{"op": "pread", "count": -1}]', "bad count"),
    ('[{"op": "pread", "colour": 1}]', "unknown fields"),
])
def test_bad_rules_stop_nbdkit_at_start(short_tmp, text, reason):
    disk = short_tmp / "disk.raw"
    disk.write_bytes(bytes(4096))
    rules = short_tmp / "rules.json"
    rules.write_text(text)
    r = subprocess.run([peers.require("nbdkit"), "-U", str(short_tmp / "s.sock"), "python", PLUGIN,
                        f"file={disk}", f"rules={rules}", "--run", "true"],
                       capture_output=True, text=True, errors="replace", timeout=30)
    assert r.returncode != 0
    assert reason in r.stderr and "rule" in r.stderr, r.stderr


# -- backup error policies on exactly known clusters ------------------------------


@contextlib.contextmanager
def fault_env(short_tmp: Path, src_rules: list[dict], tgt_rules: list[dict]):
    """An `Env` (see test_backup_faults) whose source and target are served by the plugin."""
    img, disk, target = make_disks(short_tmp)
    sr, tr = short_tmp / "src-rules.json", short_tmp / "tgt-rules.json"
    set_rules(sr, src_rules)
    set_rules(tr, tgt_rules)
    ctl = os.path.join(peers.short_tempdir(), "ctl.sock")
    with faults(disk, sr, short_tmp / "src.log") as src, \
            faults(target, tr, short_tmp / "tgt.log") as tgt, \
            peers.nbdbackup_serve(f"disk={src.uri}", extra=["--control", ctl]) as peer:
        # The error-filter flag files of Env are unused here: the rules decide.
        env = Env(short_tmp, ctl, peer.uri_for("disk"), short_tmp / "unused-src.flag",
                  short_tmp / "unused-tgt.flag", tgt.uri, target, bytes(img), bytearray(img))
        env.peer = peer  # type: ignore[attr-defined]
        yield env


@pytest.mark.timeout(90)
def test_ignore_skips_exactly_the_failing_clusters(short_tmp):
    bad = [9, 20]
    rules = [{"op": "pwrite", "offset": c * CS, "length": CS, "error": "EIO"} for c in bad]
    with fault_env(short_tmp, [], rules) as env:
        async def scenario(env: Env) -> None:
            await env.start("j", sync="full", **{"on-target-error": "ignore"})
            info = await env.wait_status("j", "concluded")
            assert "error" not in info and info["bytes-ignored"] == len(bad) * CS, info
            tc = env.target_clusters()
            for c in range(NCL):
                assert tc[c] == (bytes([FILL]) * CS if c in bad else env.orig(c)), f"cluster {c}"
            assert await env.read(env.snap_uri("j")) == env.original
            await env.qmp("job-dismiss", {"id": "j"})
        run(env, scenario, timeout=60)
    fired = {x["offset"] // CS for x in log_lines(short_tmp / "tgt.log")}
    assert fired == set(bad)


@pytest.mark.timeout(90)
def test_stop_pauses_at_the_one_bad_read_and_resume_completes(short_tmp):
    with fault_env(short_tmp, [{"op": "pread", "offset": 12 * CS + 100, "length": 1, "error": "EIO",
                                "count": 1}], []) as env:
        async def scenario(env: Env) -> None:
            await env.start("j", sync="full", **{"on-source-error": "stop"})
            info = await env.wait_status("j", "paused")
            await env.drain_events()
            errs = env.named("BLOCK_JOB_ERROR")
            assert [e["action"] for e in errs] == ["stop"], errs
            await env.qmp("job-resume", {"id": "j"})
            info = await env.wait_status("j", "concluded")
            assert "error" not in info and info["current-progress"] == SIZE, info
            assert [env.target_clusters()[c] == env.orig(c) for c in range(NCL)] == [True] * NCL
            await env.qmp("job-dismiss", {"id": "j"})
        run(env, scenario, timeout=60)
    lines = log_lines(short_tmp / "src.log")
    assert len(lines) == 1 and lines[0]["offset"] <= 12 * CS + 100 < lines[0]["offset"] + lines[0]["length"]
