"""Interop: real power losses of the data (tests/powerfs.py), not just ``kill -9``.

A ``kill -9`` keeps the page cache: a FLUSH that never reached stable storage, a missing fsync of
a chunk or of a directory, a bitmap mark made durable after the data it guards all pass such
tests.  Here the product's files live on the forgetful FUSE file system of tests/powerfs.py,
whose backing directory holds only what was made durable; a power cut keeps a seeded random part
(probability ``p``) of the rest.  Each test: the product's processes are killed with SIGKILL,
then the power is cut, then the file system is mounted again from its backing directory.

- invariant 2 (`test_serve_flush_and_fua_survive_power_cut`): ``nbdbackup serve`` (worker
  processes on, the default) of a raw image; a libnbd writer: writes, some FUA, FLUSHes between
  rounds; after the cut every block acknowledged before a completed FLUSH, and every FUA write,
  holds its data (or a later write's); the others hold old or new data.
- invariant 3 (`test_persistent_bitmap_after_power_cut`): ``serve --state-dir`` with a
  persistent bitmap, writes with no FLUSH (one trial of three: then a FLUSH), cut; restarted as
  after a reboot (a new boot id, bind-mounted over /proc/sys/kernel/random/boot_id in a private
  mount namespace): the bitmap marks every block whose durable content changed, or loads
  inconsistent and the incremental is refused (the flushed trial must load consistent).
- invariant 5 (`test_repo_pull_power_cut`): ``pull --repo`` into a directory repository; a cut
  right after it reported success keeps the snapshot (restores exactly, verify clean); a cut
  mid-pull leaves a repository where the next pull, verify, gc work and every snapshot reported
  saved restores.  The repository's ``syncfs`` group commit is not used on FUSE (its f_type is
  not in `writeback.SYNCFS_FILE_SYSTEMS`), so this covers the per-file and per-directory fsyncs.

Skipped (with the reason) only when FUSE cannot work here: no /dev/fuse, or it cannot be opened
(a container without it), or no ``fusermount``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes.util
import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest

import peers

ROOT = Path(__file__).resolve().parents[2]
POWERFS = ROOT / "tests" / "powerfs.py"
MiB = 1 << 20
BLOCK = 4096
nb = peers.nbdbackup_cli


def fuse_unavailable() -> str | None:
    """Why FUSE cannot be mounted here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (a container without the FUSE device)"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as e:
        return f"/dev/fuse cannot be opened: {e}"
    if not unmount_argv():
        return "no fusermount, fusermount3 or root's umount"
    return None


def unmount_argv() -> list[str]:
    """The lazy unmount of a FUSE mount: fuse's or fuse3's fusermount, else (root) umount
    -l -- a stock Debian 12 has neither fusermount unless the fuse/fuse3 package is there."""
    for tool in ("fusermount", "fusermount3"):
        if shutil.which(tool):
            return [tool, "-uz"]
    return ["umount", "-l"] if os.geteuid() == 0 and shutil.which("umount") else []


class PowerFS:
    """tests/powerfs.py mounted at ``mnt`` over ``backing`` (both under ``root``), as a process."""

    def __init__(self, root: Path) -> None:
        self.backing = root / "backing"
        self.mnt = root / "mnt"
        self.backing.mkdir()
        self.mnt.mkdir()
        self.proc: subprocess.Popen | None = None
        self.log = root / "powerfs.log"

    def mount(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(POWERFS), str(self.backing), str(self.mnt)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not os.path.ismount(self.mnt):
            assert self.proc.poll() is None, f"powerfs did not mount: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"powerfs did not mount in 15 s: {self.log.read_text()}"
            time.sleep(0.02)

    def cut(self, p: float, seed: int) -> None:
        """The power cut: keep each unsynced write with probability ``p``; then unmount."""
        try:
            with open(self.mnt / ".powerfs-ctl", "w") as f:
                f.write(f"cut {p} {seed}")
        except OSError:
            pass  # the daemon ended while answering (ENOTCONN)
        assert self.proc.wait(30) == 0, self.log.read_text()
        subprocess.run([*unmount_argv(), str(self.mnt)], check=True, timeout=30)
        self.proc = None

    def reboot(self, p: float, seed: int) -> None:
        self.cut(p, seed)
        self.mount()

    def unmount(self) -> None:
        if self.proc is not None:
            subprocess.run([*unmount_argv(), str(self.mnt)], timeout=30)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture
def powerfs(short_tmp):
    why = fuse_unavailable()
    if why:
        pytest.skip(f"FUSE impossible here: {why}")
    if ctypes.util.find_library("fuse") is None:
        # mfusepy takes libfuse 2 first and tests/powerfs.py uses its mount options
        pytest.fail("libfuse.so.2 missing: install libfuse2 (scripts/setup does)")
    fs = PowerFS(short_tmp)
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        q = todo.pop()
        out.append(q)
        todo.extend(children.get(q, []))
    return out


def power_off(peer) -> None:
    """The machine stops: ``peer``'s process and its worker processes frozen at once (SIGSTOP),
    then SIGKILLed, so no survivor flushes or closes anything after the others died."""
    pids = descendants(peer.proc.pid)
    for q in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(q, signal.SIGSTOP)
    for q in descendants(peer.proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(q, signal.SIGKILL)
    peers.stop(peer, signal.SIGKILL)


def tag(gen: int, block: int) -> bytes:
    """The content of ``block`` written by generation ``gen`` (0: the initial image)."""
    return struct.pack("<QQ", gen, block) * (BLOCK // 16)


def blocks_of(path: Path, nblocks: int) -> list[bytes]:
    with open(path, "rb") as f:
        return [f.read(BLOCK) for _ in range(nblocks)]


# -- the mounted file system itself ---------------------------------------------------------------------


def test_mounted_powerfs_mmap_fallocate_o_direct(powerfs):
    """What the product uses works through the mount (the bitmap store's shared ``mmap`` +
    ``msync``, ``posix_fallocate``; the file device's punch hole), and what is not modelled
    fails loudly (``O_DIRECT``: EINVAL).  Only what was synced survives a cut with p = 0."""
    import ctypes
    import errno
    import mmap

    path = powerfs.mnt / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 4 * BLOCK)
        mm = mmap.mmap(fd, 4 * BLOCK)
        mm[0:5] = b"synce"
        mm.flush()  # msync(MS_SYNC): the kernel writes the page back, then fsyncs
        mm[BLOCK:BLOCK + 5] = b"lost1"  # never written back
        mm.close()
        os.pwrite(fd, b"lost2", 2 * BLOCK)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.fallocate64(fd, 3, 0, BLOCK) == 0, os.strerror(ctypes.get_errno())  # punch, keep size
        assert os.pread(fd, 5, 0) == bytes(5) and os.pread(fd, 5, 2 * BLOCK) == b"lost2"
        dfd = os.open(powerfs.mnt, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as e:
        os.open(path, os.O_RDWR | os.O_DIRECT)
    assert e.value.errno == errno.EINVAL
    powerfs.reboot(0.0, seed=3)
    data = (powerfs.mnt / "f").read_bytes()
    assert len(data) == 4 * BLOCK and data[:5] == b"synce" and data[BLOCK:] == bytes(3 * BLOCK)


# -- invariant 2: FLUSH and FUA are durable ---------------------------------------------------------


def write_rounds(h: nbd.NBD, nblocks: int, rng: random.Random, mode: str) -> tuple[list[int], list[set[int]]]:
    """Writes of 4-64 KiB in 5 rounds.  ``mode`` "flush": no FUA, a FLUSH after each round but
    the last; "fua": 1 in 4 writes with FUA, no FLUSH.  The last 10 writes have neither.

    (The two are apart because any sync covers the whole file -- fdatasync does, and a FUSE
    fsync carries no range -- so a FUA write would also make durable what a FLUSH that does not
    sync left behind, and the other way round.)

    Returns, per block, the generation that must have survived (``committed``: the last one
    written before a completed FLUSH, or by an acknowledged FUA write), and the generations
    written after it (``later``: any of them may also have reached the disk)."""
    committed = [0] * nblocks
    later: list[set[int]] = [set() for _ in range(nblocks)]
    gen = 0
    rounds = 5
    for r in range(rounds):
        count = rng.randrange(20, 40)
        for i in range(count):
            gen += 1
            n = rng.randrange(1, 17)
            first = rng.randrange(0, nblocks - n)
            fua = mode == "fua" and rng.random() < 0.25 and not (r == rounds - 1 and i >= count - 10)
            h.pwrite(b"".join(tag(gen, b) for b in range(first, first + n)), first * BLOCK,
                     nbd.CMD_FLAG_FUA if fua else 0)
            for b in range(first, first + n):
                if fua:
                    committed[b], later[b] = gen, set()
                else:
                    later[b].add(gen)
        if mode == "flush" and r < rounds - 1:
            h.flush()
            for b in range(nblocks):
                if later[b]:
                    committed[b] = max(later[b])
                    later[b] = set()
    return committed, later


def check_blocks(got: list[bytes], committed: list[int], later: list[set[int]]) -> int:
    """Assert every block holds its committed generation or a later one; return how many hold
    an older content than the newest written (what the cut dropped)."""
    bad, dropped = [], 0
    for b, data in enumerate(got):
        allowed = {committed[b]} | later[b]
        gen = struct.unpack_from("<Q", data)[0] if data == tag(struct.unpack_from("<Q", data)[0], b) else None
        if gen not in allowed:
            bad.append((b, gen, committed[b], sorted(later[b])))
        elif later[b] and gen != max(later[b]):
            dropped += 1
    assert not bad, f"{len(bad)} block(s) lost acknowledged durable data (block, found, committed, later): {bad[:8]}"
    return dropped


@pytest.mark.timeout(120)
@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("mode", ["flush", "fua"])
def test_serve_flush_and_fua_survive_power_cut(powerfs, p, mode):
    nblocks = 16 * MiB // BLOCK
    disk = powerfs.backing / "disk.raw"
    with open(disk, "wb") as f:  # made before the mount: durable
        for b in range(nblocks):
            f.write(tag(0, b))
    rng = random.Random(int(p * 100) + 7)
    with peers.nbdbackup_serve(f"disk={powerfs.mnt / 'disk.raw'}") as peer:
        h = nbd.NBD()
        h.connect_uri(peer.uri_for("disk"))
        committed, later = write_rounds(h, nblocks, rng, mode)
        # Killed with the connection open (a disconnect would make the server flush).
        power_off(peer)
        del h
    powerfs.reboot(p, seed=rng.randrange(1 << 30))
    dropped = check_blocks(blocks_of(disk, nblocks), committed, later)
    if p == 0.0:
        assert dropped > 0, "the cut dropped no unsynced write: the test would not see a FLUSH/FUA that is not durable"
    # Restarted on the rebooted file system, the export reads the same.
    with peers.nbdbackup_serve(f"disk={powerfs.mnt / 'disk.raw'}") as peer:
        h = nbd.NBD()
        h.connect_uri(peer.uri_for("disk"))
        try:
            got = [h.pread(BLOCK, b * BLOCK) for b in range(nblocks)]
        finally:
            h.shutdown()
    assert got == blocks_of(disk, nblocks)


# -- invariant 3: a persistent bitmap never under-reports after a power loss ------------------------


def serve_argv_with_boot_id(boot_file: Path, argv: list[str]) -> list[str]:
    """``argv`` in a private mount namespace whose /proc/sys/kernel/random/boot_id is ``boot_file``."""
    return ["unshare", "-m", "sh", "-c",
            'mount --bind "$0" /proc/sys/kernel/random/boot_id && exec "$@"', str(boot_file), *argv]


@pytest.mark.timeout(120)
def test_persistent_bitmap_after_power_cut(powerfs, short_tmp):
    from test_incremental_backup import bitmap_info, ctl_path, dirty_clusters, inconsistent_and_refused, qmp_connect

    size = 16 * MiB
    disk = powerfs.backing / "disk.raw"
    disk.write_bytes(os.urandom(size))
    original = short_tmp / "orig.raw"
    shutil.copyfile(disk, original)
    state = powerfs.mnt / "state"

    def serve_on_boot(boot: Path) -> tuple[str, str, list[str]]:
        """(control socket, NBD socket, argv) of `serve` with its state on powerfs, seeing the
        boot id in ``boot``."""
        ctl = ctl_path()
        sock = os.path.join(peers.short_tempdir(), "nbd.sock")
        return ctl, sock, serve_argv_with_boot_id(boot, peers.nbdbackup_argv(
            sock, f"disk={powerfs.mnt / 'disk.raw'}", extra=["--state-dir", str(state), "--control", ctl]))

    for trial, p in enumerate([0.5, 0.0, 0.7]):
        boot = short_tmp / f"boot{trial}"
        boot.write_text(f"{trial:08x}-0000-4000-8000-{os.getpid():012x}\n")
        ctl, sock, argv = serve_on_boot(boot)
        with peers.started(argv, sock, cwd=str(ROOT)) as peer:
            uri = peers.nbd_uri(sock, "disk")

            async def add():
                qmp = await qmp_connect(ctl)
                try:
                    for b in await qmp.execute("query-bitmaps", {"export": "disk"}):
                        await qmp.execute("block-dirty-bitmap-remove", {"export": "disk", "name": b["name"]})
                    await qmp.execute("block-dirty-bitmap-add", {"export": "disk", "name": "b", "persistent": True})
                    return (await bitmap_info(qmp, "disk", "b"))["granularity"]
                finally:
                    await qmp.disconnect()

            gran = asyncio.run(asyncio.wait_for(add(), 20))
            # The durable content when the bitmap was created (the disk's file is synced first).
            fd = os.open(powerfs.mnt / "disk.raw", os.O_RDWR)
            os.fsync(fd)
            os.close(fd)
            shutil.copyfile(powerfs.mnt / "disk.raw", original)
            rng = random.Random(trial)
            h = nbd.NBD()
            h.connect_uri(uri)
            for _ in range(60):
                n = rng.randrange(1, 9) * BLOCK
                h.pwrite(os.urandom(n), rng.randrange(0, (size - n) // BLOCK) * BLOCK)
            if trial == 1:
                h.flush()  # this trial: every mark durable, the header in-use-synced: loads consistent
            power_off(peer)
            del h
        powerfs.reboot(p, seed=1000 + trial)
        with open(original, "rb") as a, open(disk, "rb") as b:
            changed = {i for i in range(size // gran) if a.read(gran) != b.read(gran)}
        # Restart as after a reboot: another boot id.
        boot.write_text(f"{trial:08x}-1111-4000-8000-{os.getpid():012x}\n")
        ctl, sock, argv = serve_on_boot(boot)
        with peers.started(argv, sock, cwd=str(ROOT)) as peer:
            async def check():
                qmp = await qmp_connect(ctl)
                try:
                    return (await inconsistent_and_refused(qmp, "disk", "b", size))[0]
                finally:
                    await qmp.disconnect()

            inconsistent = asyncio.run(asyncio.wait_for(check(), 20))
            if not inconsistent:
                have = dirty_clusters(peers.nbd_uri(sock, "disk"), "b", gran)
                missing = changed - have
                assert not missing, (f"trial {trial} (p={p}): blocks changed on disk but not in the bitmap "
                                     f"after a power cut: {sorted(missing)[:10]}")
        assert changed, f"trial {trial}: the cut kept no write: the test would see nothing"
        assert trial != 1 or not inconsistent, "flushed before the cut: the bitmap must load consistent"


# -- invariant 5: what the repository reported saved survives -------------------------------------------


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)]).returncode == 0


@pytest.mark.timeout(180)
def test_repo_pull_power_cut(powerfs, short_tmp):
    chunks = 16
    repo = str(powerfs.mnt / "repo")
    disks = {name: short_tmp / f"{name}.raw" for name in ("s1", "s2", "s3")}
    for path in disks.values():
        path.write_bytes(os.urandom(chunks * MiB))
    nb("repo", "init", repo, "--chunk-size", "1M", "--encryption", "none")
    with peers.qemu_nbd(disks["s1"], read_only=True) as q:
        nb("pull", q.uri, "--repo", repo, "--snapshot", "s1")
    # A power cut right after success (nothing more kept than what was synced).
    powerfs.reboot(0.0, seed=1)
    assert nb("repo", "verify", repo).stdout.strip().endswith("OK: 1 snapshot(s), 0 bad chunk(s)")
    out = short_tmp / "out.raw"
    nb("restore", repo, "s1", str(out))
    assert same(out, disks["s1"])

    # A power cut mid-pull (the pull killed first: the machine stops).
    rng = random.Random(5)
    chunk_dir = powerfs.backing / "repo" / "chunks"
    s1_entries = len(list(chunk_dir.rglob("*")))
    with peers.nbdkit("file", str(disks["s2"]), "rdelay=150ms", filters=["delay"]) as k:
        proc = subprocess.Popen([sys.executable, "-m", "nbdbackup.cli", "pull", k.uri, "--repo", repo,
                                 "--snapshot", "s2", "--workers", "2"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Cut once s2's first chunks are being written (BACKING shows a new name at once).
        deadline = time.monotonic() + 20
        while len(list(chunk_dir.rglob("*"))) <= s1_entries + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()
        assert proc.wait() == -signal.SIGKILL, "the pull ended before the cut: not mid-pull"
    powerfs.reboot(rng.random(), seed=rng.randrange(1 << 30))
    with peers.qemu_nbd(disks["s3"], read_only=True) as q:
        nb("pull", q.uri, "--repo", repo, "--snapshot", "s3")
    verify = nb("repo", "verify", repo).stdout.strip()
    assert verify.endswith("0 bad chunk(s)"), verify
    nb("repo", "gc", repo)
    import json
    names = [x["name"] for x in json.loads(nb("repo", "list", repo, "--json").stdout)]
    assert {"s1", "s3"} <= set(names) and "s2" not in names, names
    # Right after the next pull's success, another cut: everything reported saved restores.
    powerfs.reboot(0.0, seed=2)
    for name in names:
        nb("restore", repo, name, str(out))
        assert same(out, disks[name]), name
    assert nb("repo", "verify", repo).stdout.strip().endswith("0 bad chunk(s)")


# -- invariant 2 on a restoring export: the guest's flushed writes outlive the restore's state -----


@pytest.mark.timeout(120)
@pytest.mark.parametrize("state", ["next-to-target", "elsewhere"])
def test_restoring_export_keeps_flushed_guest_writes_after_power_cut(powerfs, short_tmp, state):
    """Instant recovery (docs/instant.md): a restoring export's target and its default progress
    map (``TARGET.restore``, a directory the restore makes) on powerfs.  The guest writes and
    FLUSHes while the background job is held back; the machine loses power; `serve` restarts
    the restore from the same state: every flushed guest write is still read, none overwritten
    by the backup's data.  (The map's directory entry must be durable in its parent, or the
    restart finds no map and restores the backup over the guest's writes; and the target file the
    restore creates must have its own name durable, or a power cut loses the whole disk: with
    ``state=`` elsewhere nothing else fsyncs the target's directory.)"""
    chunks = 8
    disk = short_tmp / "vm.raw"
    disk.write_bytes(os.urandom(chunks * MiB))
    repo = str(short_tmp / "repo")
    nb("repo", "init", repo, "--chunk-size", "1M", "--encryption", "none")
    with peers.qemu_nbd(disk, read_only=True) as q:
        nb("pull", q.uri, "--repo", repo, "--snapshot", "s1")
    target = powerfs.mnt / "vm-restored.raw"
    spec = f"vm=restore:{repo}#s1,target={target},speed=1"  # the job copies (almost) nothing
    if state == "elsewhere":
        (powerfs.backing / "states").mkdir()  # made before the mount: durable
        spec += f",state={powerfs.mnt / 'states' / 'vm'}"
    guest = {b: hashlib.sha256(b"guest %d" % b).digest() * (BLOCK // 32) for b in (3, 300, 1030, 2047)}
    with peers.nbdbackup_serve(spec) as peer:
        h = nbd.NBD()
        h.connect_uri(peer.uri_for("vm"))
        for b, data in guest.items():
            h.pwrite(data, b * BLOCK)
        h.flush()
        power_off(peer)  # with the connection open
        del h
    powerfs.reboot(0.0, seed=3)
    with peers.nbdbackup_serve(spec) as peer:
        h = nbd.NBD()
        h.connect_uri(peer.uri_for("vm"))
        try:
            got = {b: h.pread(BLOCK, b * BLOCK) for b in guest}
            other = h.pread(BLOCK, 5 * BLOCK)
        finally:
            h.shutdown()
    with open(disk, "rb") as f:
        f.seek(5 * BLOCK)
        assert other == f.read(BLOCK), "an untouched block reads the backup's data"
    lost = sorted(b for b in guest if got[b] != guest[b])
    assert not lost, f"flushed guest writes lost or overwritten by the restore after a power cut: blocks {lost}"
