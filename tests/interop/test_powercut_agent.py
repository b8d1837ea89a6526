"""Interop: ``nbdbackup agent backup`` with the server and the repository on two machines that
lose power independently (invariants 3 and 5 together; docs/powercut.md, "powercut2").

Two forgetful file systems (tests/powerfs.py): mount A holds the server's disk image and its
``--state-dir`` (the persistent bitmaps, the copy-before-write scratch files); mount B holds the
repository (repokey, its key exported ``--kdf none`` to a key file on B outside the repository,
which the agent and the restores use).  A libnbd writer (the guest) keeps its connection open
across backups, as a VM does (a disconnect would make the server flush).

Cycles: writes (never flushed), the disk copied as the snapshot's reference (it is quiet), an
``agent backup``, then a power cut around the end of the backup:

    a  B only, right after the agent reported success
    b  A only, right after success (serve restarted as after a reboot: a new boot id)
    c  both
    d  B while the agent pulls (after its point in time): the agent dies with B
    e  A while the agent pulls: the server dies, the agent fails

with p (each unsynced item kept with probability p) rotating over 0, 0.5, 1 (seeded).  The next
cycle's agent decides what it decides (incremental, full, or a refusal with a clear message).
At the end: every snapshot the repository lists restores exactly to the disk as it was at that
snapshot's point in time, ``repo verify`` is clean, and every success reported before a cut of
B is still listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest

import peers
from test_powercut import ROOT, PowerFS, fuse_unavailable, power_off, same, serve_argv_with_boot_id

MiB = 1 << 20
SIZE = 16 * MiB
nb = peers.nbdbackup_cli


class Server:
    """``nbdbackup serve --state-dir A/state --control CTL`` of A/disk.raw under a boot id file."""

    def __init__(self, a: PowerFS, tmp: Path) -> None:
        self.a, self.tmp, self.boots = a, tmp, 0
        self.peer = None
        self.stack: contextlib.ExitStack | None = None
        self.h: nbd.NBD | None = None
        self.boot = tmp / "boot_id"

    def start(self, reboot: bool) -> None:
        if reboot or not self.boot.exists():
            self.boots += 1
            self.boot.write_text(f"{self.boots:08x}-2222-4000-8000-{os.getpid():012x}\n")
        d = peers.short_tempdir()
        self.ctl, self.sock = os.path.join(d, "ctl.sock"), os.path.join(d, "nbd.sock")
        argv = serve_argv_with_boot_id(self.boot, peers.nbdbackup_argv(
            self.sock, f"disk={self.a.mnt / 'disk.raw'}",
            extra=["--state-dir", str(self.a.mnt / "state"), "--control", self.ctl]))
        self.stack = contextlib.ExitStack()
        self.peer = self.stack.enter_context(peers.started(argv, self.sock, cwd=str(ROOT)))
        self.h = nbd.NBD()
        self.h.connect_uri(peers.nbd_uri(self.sock, "disk"))

    def power_off(self) -> None:
        power_off(self.peer)
        self.h = None  # (the connection was open at the cut: no disconnect flush)
        self.stack.close()

    def stop(self) -> None:
        if self.stack is not None:
            with contextlib.suppress(Exception):
                if self.h is not None:
                    self.h.shutdown()
            self.stack.close()

    def jobs(self) -> list[dict]:
        from nbdbackup.control.client import ControlClient

        async def go():
            async with ControlClient(self.ctl) as c:
                return await c.execute("query-jobs")

        return asyncio.run(asyncio.wait_for(go(), 10))

    def write(self, rng: random.Random, count: int) -> None:
        """``count`` writes of 4-32 KiB, no FLUSH, no FUA: the guest's page cache, written back."""
        for _ in range(count):
            n = rng.randrange(1, 9) * 4096
            self.h.pwrite(rng.randbytes(n), rng.randrange(0, (SIZE - n) // 4096) * 4096)


@pytest.mark.timeout(240)
def test_agent_backup_under_independent_power_cuts(short_tmp, monkeypatch):
    why = fuse_unavailable()
    if why:
        pytest.skip(f"FUSE impossible here: {why}")
    for m in ("a", "b"):
        (short_tmp / m).mkdir()
    a, b = PowerFS(short_tmp / "a"), PowerFS(short_tmp / "b")
    (a.backing / "state").mkdir()
    with open(a.backing / "disk.raw", "wb") as f:  # durable before the mounts
        f.write(random.Random(1).randbytes(SIZE))
    a.mount()
    b.mount()
    srv = Server(a, short_tmp)
    try:
        run_cycles(a, b, srv, short_tmp, monkeypatch)
    finally:
        srv.stop()
        a.unmount()
        b.unmount()


def run_cycles(a: PowerFS, b: PowerFS, srv: Server, tmp: Path, monkeypatch) -> None:
    repo, key = b.mnt / "repo", b.mnt / "agent.key"
    monkeypatch.setenv("NBDBACKUP_PASSPHRASE", "correct horse battery staple")
    nb("repo", "init", str(repo), "--chunk-size", "1M", "--encryption", "repokey")
    nb("repo", "key", "export", "--kdf", "none", str(repo), str(key))
    monkeypatch.delenv("NBDBACKUP_PASSPHRASE")
    exported = key.read_bytes()
    b.reboot(0.0, seed=1)  # a cut right after: the repository and the key file outside it survive
    assert key.read_bytes() == exported, "the exported key file was not durable"
    repo_opts = ["--key-file", str(key)]

    def agent_argv() -> list[str]:
        return [sys.executable, "-m", "nbdbackup.cli", "agent", "backup", "--control", srv.ctl,
                "--nbd", peers.nbd_uri(srv.sock, "disk"), "--disk", "disk", "--server-name", "vm1",
                "--repo", str(repo), "--connections", "2", "--json", "--io-timeout", "20", *repo_opts]

    def listed() -> list[str]:
        return [x["name"] for x in json.loads(nb("repo", "list", str(repo), "--json", *repo_opts).stdout)]

    refs: dict[str, Path] = {}
    reported: list[str] = []   # snapshots the agent reported saved
    log: list[str] = []
    rng = random.Random(15)
    srv.start(reboot=False)
    # (scenario, p) per cycle; cycle 0 is the first full backup; the last one has no cut.
    plan = [("-", 0.0), ("a", 0.0), ("b", 0.0), ("c", 0.5), ("d", 1.0), ("e", 0.0),
            ("c", 1.0), ("b", 0.5), ("-", 0.0)]
    for cycle, (scenario, p) in enumerate(plan):
        srv.write(rng, 12)
        ref = tmp / f"ref{cycle}.raw"
        shutil.copyfile(a.mnt / "disk.raw", ref)  # the disk at this run's point in time (quiet)
        before = set(listed())
        if scenario in ("d", "e"):
            # Slow reads, so the cut falls inside the pull (after the transaction's instant).
            proc = subprocess.Popen(agent_argv() + ["--limit-rate", "2M"], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 20
            while not any(j["id"].startswith("nbdbackup-agent.") for j in srv.jobs()):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.05)
            time.sleep(0.3)
            assert proc.poll() is None, "the agent ended before the cut: not mid-pull"
            if scenario == "d":  # the backup host loses power: the agent dies with it
                proc.kill()
                proc.communicate()
                b.reboot(p, seed=rng.randrange(1 << 30))
            else:
                srv.power_off()
                out, err = proc.communicate(timeout=60)
                assert proc.returncode == 1, (out, err)
                a.reboot(p, seed=rng.randrange(1 << 30))
                srv.start(reboot=True)
            log.append(f"{cycle}{scenario} p={p}: killed mid-pull")
            new = set(listed()) - before
            assert not new, f"cycle {cycle}: a snapshot recorded by a run cut mid-pull: {new}"
            continue
        r = subprocess.run(agent_argv(), cwd=ROOT, capture_output=True, timeout=120)
        out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
        rep = json.loads(out) if out.strip() else None
        assert rep is not None and r.returncode == 0, (cycle, scenario, r.returncode, out, err)
        d = rep["disks"][0]
        refs[d["snapshot"]] = ref
        reported.append(d["snapshot"])
        log.append(f"{cycle}{scenario} p={p}: {d['kind']} ({d['reason']})")
        if scenario in ("a", "c"):
            b.reboot(p, seed=rng.randrange(1 << 30))
        if scenario in ("b", "c"):
            srv.power_off()
            a.reboot(p, seed=rng.randrange(1 << 30))
            srv.start(reboot=True)
        assert set(reported) <= set(listed()), f"cycle {cycle}: a snapshot reported saved was lost: {log}"
    assert [x for x in log if "incremental" in x], log  # (the cycles exercise the bitmap path)
    srv.stop()
    out = tmp / "out.raw"
    names = listed()
    wrong = []
    for name in names:
        nb("restore", str(repo), name, str(out), *repo_opts)
        if not same(out, refs[name]):
            wrong.append(name)
    assert not wrong, f"snapshots that do not restore to the disk at their point in time: {wrong}; runs: {log}"
    verify = nb("repo", "verify", str(repo), *repo_opts).stdout.strip()
    assert verify.endswith("0 bad chunk(s)"), verify
    print("\n".join(log))
