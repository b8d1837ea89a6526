"""A server whose state directory's file system is full: persistent bitmaps, and
the agent's copy-before-write scratch.

Role: the bits of a persistent bitmap are set through a ``MAP_SHARED`` map of
its file (`bitmap.store`).  When that file had holes, the first bit set in a
hole page made the file system allocate at the page fault, and on a full file
system the kernel answered with SIGBUS: the whole server died (every export,
every client) -- on ``bitmap add`` of a bitmap larger than the free space, and
on an ordinary guest write once the state directory had filled up after the
bitmap was made.  Invariants checked: a bitmap that does not fit is a clean
error and the server lives on; once made, a bitmap records every write however
full its file system gets (invariant 3, and 4: nobody's write crashes the server).

The agent's snapshot keeps its copy-before-write data in a ``scratch:`` file in
the same directory.  With the engine's default policy (QEMU's
``break-guest-write``) a full scratch failed the GUEST's writes with EIO for as
long as the backup ran; the agent now asks for ``break-snapshot`` (as Proxmox
VE's fleecing does): the guest's writes go on, the backup fails and says why,
and the next run is correct (invariant 2 over the backup's own needs).

The state directory is a small file system mounted in a private mount namespace
(``unshare --mount``) in which the server runs, so nothing outside sees it and it
goes when the server does: a 1 MiB tmpfs (whose read faults on a shared map
allocate too, so the big bitmap died at ``bitmap add``) and an 8 MiB ext4 on a
loop device (where the holes stayed holes until a guest write faulted them in).
That needs CAP_SYS_ADMIN (root here; an unprivileged container cannot): the test
skips where the namespace or the mount cannot be made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

import peers

pytestmark = pytest.mark.interop

GiB = 1 << 30


#: The state directory's file system, as shell: mount it on $1 (in the private namespace).
MOUNTS = {
    "tmpfs": "mount -t tmpfs -o size=1M tmpfs \"$1\"",
    "ext4": "mkfs.ext4 -q -F \"$1.img\" 8M && mount -o loop \"$1.img\" \"$1\"",
}


def _mount_works(fs: str, where: str) -> str | None:
    os.makedirs(where)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", MOUNTS[fs], "sh", where],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else r.stderr.strip() or f"exit {r.returncode}"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbdbackup.cli", *args], cwd=peers.REPO, capture_output=True,
                          text=True, errors="replace", timeout=60)


@pytest.mark.parametrize("fs", ["tmpfs", "ext4"])
def test_a_full_state_directory_is_an_error_never_a_crash(tmp_path, fs):
    why = _mount_works(fs, str(tmp_path / "probe"))
    if why:
        pytest.skip(f"cannot mount a {fs} in a private mount namespace here ({why})")
    d = peers.short_tempdir()
    state, sock, ctl, trigger = (os.path.join(d, n) for n in ("state", "n.sock", "c.sock", "fill-now"))
    os.mkdir(state)
    small, big = tmp_path / "small.img", tmp_path / "big.img"
    # small: 16 KiB of bits at 64 KiB granularity, fits; big: 16 MiB of bits, fits in neither.
    for path, size in ((small, 8 * GiB), (big, 8192 * GiB)):
        with open(path, "wb") as f:
            f.truncate(size)
    serve = shlex.join(peers.nbdbackup_argv(sock, f"small={small}", f"big={big}", extra=[
        "--workers", "0", "--control", ctl, "--state-dir", state]))
    # When the test says so, a filler takes every byte left (`head` ends on ENOSPC).
    filler = (f"(for i in $(seq 600); do [ -e {trigger} ] && break; sleep 0.1; done; "
              f"head -c 64M /dev/zero > {state}/filler) &")
    script = f"{MOUNTS[fs]} && {filler} exec {serve}"
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", state]
    with peers.started(argv, sock, cwd=str(peers.REPO)) as p:
        try:
            r = _cli("bitmap", "add", "--control", ctl, "small", "b0", "--persistent")
            assert r.returncode == 0, r.stderr
            # A bitmap the file system cannot hold: one clear error, the server lives on.
            r = _cli("bitmap", "add", "--control", ctl, "big", "b1", "--persistent")
            assert r.returncode == 1 and "no space left" in r.stderr.lower(), (r.stderr, p.log())
            assert p.proc.poll() is None, p.log()
            # Fill what is left, then write all over the small disk: into each 4 KiB page of
            # its bits (one page covers 2 GiB), several times.
            open(trigger, "w").close()
            time.sleep(1.0)
            offsets = [i * (GiB // 4) + 65536 for i in range(32)]
            cmds = [a for off in offsets for a in ("-c", f"write -P 7 {off} 4k")]
            r = subprocess.run(["qemu-io", "-f", "raw", *cmds, p.uri_for("small")], capture_output=True,
                               text=True, timeout=60)
            with contextlib.suppress(subprocess.TimeoutExpired):  # a SIGBUS's core dump takes a moment
                pytest.fail(f"the server died (exit {p.proc.wait(timeout=2.0)})\n{r.stderr}\n{p.log()}")
            assert r.returncode == 0 and r.stdout.count("wrote 4096/4096") == len(offsets), (r.stdout, r.stderr)
            # Every write is in the bitmap.
            r = subprocess.run(["nbdinfo", "--json", "--map=qemu:dirty-bitmap:b0", p.uri_for("small")],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            dirty = [(e["offset"], e["length"]) for e in json.loads(r.stdout) if e["type"] & 1]
            for off in offsets:
                assert any(o <= off < o + n for o, n in dirty), (off, dirty)
            assert sum(n for _o, n in dirty) == len(offsets) * 65536
        finally:
            open(trigger, "w").close()  # the filler ends either way


def _qmp(path: str):
    """A raw QMP session on the control socket: (socket, its line reader)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(path)
    f = s.makefile("rb")
    assert "QMP" in json.loads(f.readline())
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert json.loads(f.readline()) == {"return": {}}
    return s, f


def test_a_full_scratch_fails_the_backup_not_the_guest(tmp_path):
    why = _mount_works("ext4", str(tmp_path / "probe"))
    if why:
        pytest.skip(f"cannot mount an ext4 in a private mount namespace here ({why})")
    d = peers.short_tempdir()
    state, sock, ctl = (os.path.join(d, n) for n in ("state", "n.sock", "c.sock"))
    os.mkdir(state)
    disk, repo = tmp_path / "disk.img", tmp_path / "repo"
    disk.write_bytes(os.urandom(64 << 20))
    assert _cli("repo", "init", str(repo), "--encryption", "none").returncode == 0
    serve = shlex.join(peers.nbdbackup_argv(sock, f"disk={disk}", extra=[
        "--workers", "0", "--control", ctl, "--state-dir", state]))
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{MOUNTS['ext4']} && exec {serve}",
            "sh", state]
    agent = [sys.executable, "-m", "nbdbackup.cli", "agent", "backup", "--control", ctl,
             "--nbd", f"nbd+unix:///?socket={sock}", "--disk", "disk", "--repo", str(repo), "--json"]
    with peers.started(argv, sock, cwd=str(peers.REPO)) as p:
        q, qf = _qmp(ctl)
        a = subprocess.Popen(agent, cwd=peers.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # Hold the agent as soon as its snapshot export exists (it is mid-pull or before it).
            for _ in range(3000):
                q.sendall(b'{"execute": "query-block-exports"}\n')
                reply = json.loads(qf.readline())
                while "event" in reply:
                    reply = json.loads(qf.readline())
                if any(e["id"].startswith("nbdbackup-agent.") for e in reply["return"]):
                    break
                assert a.poll() is None, a.communicate()
                time.sleep(0.005)
            else:
                raise AssertionError("the agent never made its snapshot export")
            a.send_signal(signal.SIGSTOP)
            # The guest rewrites the whole disk: 64 MiB of copy-before-write into 8 MiB.
            r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 64M", p.uri_for("disk")],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and "wrote 67108864/67108864" in r.stdout, (r.stdout, r.stderr, p.log())
        finally:
            a.send_signal(signal.SIGCONT)
            out, err = a.communicate(timeout=120)
            q.close()
        assert a.returncode == 1, (out, err)
        assert "no space left on device" in err.lower() and "copy-before-write" in err, err
        assert _cli("repo", "list", str(repo), "--json").stdout.count('"name"') == 0
        # The guest's data is all there, and the next run (its scratch gone, room again) backs it up.
        assert disk.read_bytes() == b"\x07" * (64 << 20)
        r = subprocess.run(agent, cwd=peers.REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (r.stdout, r.stderr, p.log())
        snap = json.loads(r.stdout)["disks"][0]["snapshot"]
        out_img = tmp_path / "restored.img"
        r = _cli("restore", str(repo), snap, str(out_img))
        assert r.returncode == 0, r.stderr
        assert out_img.read_bytes() == disk.read_bytes()


def test_a_pull_that_fills_the_repository_disk_leaves_it_as_it_was(tmp_path):
    """A pull into a local repository whose file system fills up: one clear error, no
    snapshot, ``repo verify`` clean -- and the chunks it had written but not committed are
    gone with it.  They were left as temporary files (the disk stayed full, for every
    repository on it, until someone ran a gc), so the next pull failed too."""
    why = _mount_works("ext4", str(tmp_path / "probe"))
    if why:
        pytest.skip(f"cannot mount an ext4 in a private mount namespace here ({why})")
    big, small = tmp_path / "big.img", tmp_path / "small.img"
    big.write_bytes(os.urandom(64 << 20))
    small.write_bytes(os.urandom(4 << 20))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    nb = shlex.join([sys.executable, "-m", "nbdbackup.cli"])
    with peers.nbdbackup_serve(f"big={big}", f"small={small}", extra=["--workers", "0"]) as p:
        repo = f"{mnt}/repo"
        script = f"""{MOUNTS['ext4'].replace('8M', '24M')} || exit 99
cd {shlex.quote(str(peers.REPO))} && {nb} repo init {repo} --encryption none --compression none >/dev/null || exit 98
{nb} pull {shlex.quote(p.uri_for('big'))} --repo {repo} --snapshot s1; echo "@@ pull $?"
echo "@@ used $(du -sk {repo} | cut -f1)"
{nb} repo verify {repo}; echo "@@ verify $?"
{nb} pull {shlex.quote(p.uri_for('small'))} --repo {repo} --snapshot s2 >/dev/null; echo "@@ pull2 $?"
{nb} restore {repo} s2 {tmp_path}/s2.img; echo "@@ restore $?"
"""
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(mnt)],
                           capture_output=True, text=True, errors="replace", timeout=300)
    out = r.stdout + r.stderr
    marks = {w[1]: w[2] if len(w) > 2 else "" for w in (line.split() for line in r.stdout.splitlines())
             if w[:1] == ["@@"]}
    assert marks.get("pull") == "1" and "no space left on device" in out.lower() and "Traceback" not in out, out
    assert int(marks["used"]) < 2048, out  # KiB: config, keys, lock -- no 20 MiB of orphans
    assert marks.get("verify") == "0" and marks.get("pull2") == "0" and marks.get("restore") == "0", out
    assert (tmp_path / "s2.img").read_bytes() == small.read_bytes()
