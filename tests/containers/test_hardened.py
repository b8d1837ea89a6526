"""The image in hardened and limited deployments (docs/hunt9.md).

Contract:
- ``docker kill`` (SIGKILL to the server, workers included) with persistent
  dirty bitmaps on a volume, then ``docker start``: the next agent run is an
  incremental whose snapshot equals the disk at the restart (every write the
  killed server took, flushed or not, is in the bitmap: invariant 3), never
  one that misses writes.
- Under a cgroup memory limit the server's defaults follow it: with
  ``--memory 256m`` and one CPU, 24 stalled 32 MiB WRITEs from one client do
  not get it OOM-killed (they did with the host's defaults: 256 MiB of
  buffers on top of the interpreter), and a good client still works;
  ``--cpus 1`` starts no worker process (one per host CPU before).
- ``--read-only --cap-drop ALL --security-opt no-new-privileges --user
  12345:0`` (OpenShift's random uid in group 0) with named volumes made from
  the image: serve with a state directory, a backup, ``agent backup`` and a
  pull work.
- A seccomp profile that blocks io_uring (newer engines' default): ``serve``
  starts on the plain path and says io_uring is unavailable; asking for
  ``--io-engine io_uring`` is refused at start with one error line.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest

import peers
from test_image import UID, _wait

MiB = 1 << 20
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown volume directories")


def _dirs(parent, *names):
    out = []
    for n in names:
        d = parent / n
        d.mkdir()
        os.chown(d, UID, UID)
        out.append(d)
    return out


def _name(kind: str) -> str:
    return f"nbdh9-{kind}-{uuid.uuid4().hex[:8]}"


def _state(engine, name: str) -> dict:
    return json.loads(engine.run("inspect", "-f", "{{json .State}}", name).stdout)


def _serving(sock: str) -> bool:
    return os.path.exists(sock) and peers.can_connect(sock)


def _qemu_io(uri: str, *cmds: str) -> None:
    argv = [peers.require("qemu-io"), "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    r = subprocess.run([*argv, uri], capture_output=True, timeout=60)
    assert r.returncode == 0 and b"error" not in r.stdout.lower(), (r.stdout, r.stderr)


def test_kill9_then_start_keeps_the_bitmap_complete(docker_engine, nbdbackup_image, short_tmp):
    os.chmod(short_tmp, 0o711)
    data, run, backup = _dirs(short_tmp, "d", "r", "b")
    disk = data / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    os.chown(disk, UID, UID)
    sock = str(run / "nbd.sock")
    uri = peers.nbd_uri(sock, "disk")
    name = _name("k9")
    img = nbdbackup_image.tag
    agent = ["run", "--rm", "-v", f"{run}:/run/nbdbackup", "-v", f"{backup}:/backup", img]
    agent_backup = [*agent, "agent", "backup", "--control", "/run/nbdbackup/control.sock", "--nbd",
                    "nbd+unix:///?socket=/run/nbdbackup/nbd.sock", "--disk", "disk", "--repo", "/backup/repo", "--json"]
    try:
        docker_engine.run("run", "-d", "--name", name, "-v", f"{data}:/data", "-v", f"{run}:/run/nbdbackup", img,
                          "serve", "--socket", "/run/nbdbackup/nbd.sock", "--socket-mode", "0660",
                          "--control", "/run/nbdbackup/control.sock", "--state-dir", "/data/state", "disk=/data/disk.img")
        _wait(lambda: _serving(sock), 30, "the server's socket")
        docker_engine.run(*agent, "repo", "init", "/backup/repo")
        _qemu_io(uri, "write -P 0x11 0 8M", "flush")
        r1 = json.loads(docker_engine.run(*agent_backup, "--snapshot-name", "s1", timeout=120).stdout)
        assert r1["disks"][0]["kind"] == "full", r1
        # After the snapshot: a flushed write, an unflushed one, a FUA one, a zeroed range.
        _qemu_io(uri, "write -P 0x22 16M 1M", "flush")
        _qemu_io(uri, "write -P 0x33 32M 64k", "write -P 0x44 40M 4k -f", "write -z 4M 128k")
        docker_engine.run("kill", name)  # SIGKILL: no flush, no clean close of the bitmaps
        st = _state(docker_engine, name)
        assert not st["Running"] and st["ExitCode"] == 137, st
        docker_engine.run("start", name)
        _wait(lambda: _serving(sock), 30, "the restarted server's socket")
        expect = disk.read_bytes()
        r2 = json.loads(docker_engine.run(*agent_backup, "--snapshot-name", "s2", timeout=120).stdout)
        d2 = r2["disks"][0]
        # The bitmap survived SIGKILL complete (same boot: its pages were in the page cache),
        # so the run is incremental; had it been unprovable, a full with its reason.
        assert d2["kind"] == "incremental", d2
        docker_engine.run(*agent, "restore", "/backup/repo", "s2", "/backup/s2.img", timeout=120)
        got = (backup / "s2.img").read_bytes()
        assert len(got) == len(expect)
        assert got == expect, "the incremental after kill -9 misses writes"
    finally:
        docker_engine.run("rm", "-f", "-v", name, check=False)


def _stallers(sock: str, n: int):
    """``n`` connections, each a 32 MiB WRITE of which 31.5 MiB are sent, then silence
    (tests/interop/hostile.py in its own process); returns the Popen (close stdin to end it)."""
    hostile = os.path.join(os.path.dirname(peers.__file__), "hostile.py")
    return subprocess.Popen([os.sys.executable, hostile, "--unix", sock, "--export", "disk", "--payload", str(n),
                             "--payload-size", str(32 * MiB), "--payload-sent", str(31 * MiB + MiB // 2),
                             "--greeting-timeout", "5"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def test_memory_limit_sizes_the_defaults_and_stalled_writes_do_not_oom(docker_engine, nbdbackup_image, short_tmp):
    os.chmod(short_tmp, 0o711)
    data, run = _dirs(short_tmp, "d", "r")
    disk = data / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(256 * MiB)
    os.chown(disk, UID, UID)
    sock = str(run / "nbd.sock")
    img = nbdbackup_image.tag
    serve = ["-v", "serve", "--socket", "/run/nbdbackup/nbd.sock", "--socket-mode", "0660",
             "--max-connections-per-peer", "100", "disk=/data/disk.img"]
    name, cpus = _name("mem"), _name("cpu")
    try:
        # --cpus 1: a CPU quota, the affinity mask still shows every host CPU.
        docker_engine.run("run", "-d", "--name", cpus, "--cpus", "1", img, *serve[:2], "--socket", "/tmp/x.sock",
                          "m=memory:1M")
        logs = _wait(lambda: (lambda t: t if b"serving 1 export" in t else None)(
            docker_engine.run("logs", cpus).stderr), 30, "the --cpus 1 server")
        assert b"CPU quota 1 (cgroup" in logs and b", 0 worker process(es)" in logs, logs

        docker_engine.run("run", "-d", "--name", name, "--memory", "256m", "--memory-swap", "256m",
                          "--cpuset-cpus", "0", "-v", f"{data}:/data", "-v", f"{run}:/run/nbdbackup", img, *serve)
        _wait(lambda: _serving(sock), 30, "the server's socket")
        logs = docker_engine.run("logs", name).stderr
        assert b"memory 256 MiB (cgroup" in logs and b"request buffers 128 MiB (default)" in logs, logs
        proc = _stallers(sock, 24)  # 24 x 31.5 MiB declared-and-sent: far beyond any default budget
        try:
            time.sleep(4)  # they send, the server charges, sheds; an OOM kill happens here if at all
            st = _state(docker_engine, name)
            assert st["Running"] and not st["OOMKilled"], (st, docker_engine.run("logs", name).stderr[-2000:])
            uri = peers.nbd_uri(sock, "disk")
            _qemu_io(uri, "write -P 0x5a 1M 1M", "read -P 0x5a 1M 1M")  # a good client is served meanwhile
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)
        st = _state(docker_engine, name)
        assert st["Running"] and not st["OOMKilled"], st
    finally:
        docker_engine.run("rm", "-f", "-v", name, cpus, check=False)


def test_read_only_root_no_caps_arbitrary_uid(docker_engine, nbdbackup_image):
    img = nbdbackup_image.tag
    tag = uuid.uuid4().hex[:8]
    vols = {f"nbdh9-data-{tag}": "/data", f"nbdh9-run-{tag}": "/run/nbdbackup", f"nbdh9-bk-{tag}": "/backup"}
    mounts = [a for v, p in vols.items() for a in ("-v", f"{v}:{p}")]
    hard = ["--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--user", "12345:0", *mounts]
    name = _name("ro")

    def run(*argv, check=True):
        r = docker_engine.run("run", "--rm", *hard, img, *argv, check=check, timeout=120)
        return r.stdout.decode() + r.stderr.decode()

    try:
        r = docker_engine.run("run", "--rm", *hard, "--entrypoint", "truncate", img, "-s", "16M", "/data/disk.img",
                              check=False)
        assert r.returncode == 0, r.stderr  # the image's volume directories are group-0 writable
        docker_engine.run("run", "-d", "--name", name, *hard, img, "serve", "--socket", "/run/nbdbackup/nbd.sock",
                          "--control", "/run/nbdbackup/control.sock", "--state-dir", "/data/state",
                          "disk=/data/disk.img")
        ctl = ["--control", "/run/nbdbackup/control.sock"]
        _wait(lambda: b"serving 1 export" in docker_engine.run("logs", name).stderr
              or not _state(docker_engine, name)["Running"], 30, "serve")
        assert _state(docker_engine, name)["Running"], docker_engine.run("logs", name).stderr[-2000:]
        run("bitmap", "add", "disk", "daily", "--persistent", *ctl)
        out = run("backup", "start", "-e", "disk", "-j", "b1", "--sync", "full", "--bitmap", "daily",
                  "--bitmap-mode", "on-success", "-t", "/data/full.img", "--wait", *ctl)
        assert "completed" in out, out
        run("job", "dismiss", "b1", *ctl)
        run("repo", "init", "/backup/repo")
        # The agent's snapshot target is a scratch file the server makes in its state directory.
        out = run("agent", "backup", *ctl, "--nbd", "nbd+unix:///?socket=/run/nbdbackup/nbd.sock", "--disk", "disk",
                  "--repo", "/backup/repo", check=False)
        assert "disk: full" in out and "FAILED" not in out, out
        out = run("pull", "nbd+unix:///disk?socket=/run/nbdbackup/nbd.sock", "--repo", "/backup/repo",
                  "--snapshot", "p1")
        assert "snapshot p1" in out, out
        assert "p1" in run("repo", "list", "/backup/repo")
    finally:
        docker_engine.run("rm", "-f", "-v", name, check=False)
        docker_engine.run("volume", "rm", *vols, check=False)


def _seccomp_blocking_io_uring(path) -> str:
    path.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["io_uring_setup", "io_uring_enter", "io_uring_register"],
         "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}))
    return f"seccomp={path}"


def test_io_uring_blocked_by_seccomp(docker_engine, nbdbackup_image, short_tmp):
    profile = _seccomp_blocking_io_uring(short_tmp / "seccomp.json")
    img = nbdbackup_image.tag
    r = docker_engine.run("run", "--rm", "--security-opt", profile, img, "serve", "--io-engine", "io_uring",
                          "--socket", "/tmp/x.sock", "m=memory:1M", check=False, timeout=60)
    assert r.returncode == 1, r
    err = r.stderr.decode()
    assert err.startswith("nbdbackup: error: --io-engine: io_uring unavailable: io_uring_setup: EPERM"), err
    assert "seccomp profile blocks it" in err and len(err.splitlines()) == 1, err
    # The default (auto) starts on the plain path and says why io_uring is not used; it serves.
    script = ("nbdbackup -v serve --socket /tmp/x.sock m=memory:1M & pid=$!; "
              "for i in $(seq 100); do nbdbackup info --list 'nbd+unix:///?socket=/tmp/x.sock' >/dev/null 2>&1 "
              "&& break; sleep 0.1; done; nbdbackup info --json 'nbd+unix:///m?socket=/tmp/x.sock'; "
              "kill $pid; wait $pid")
    name = _name("iou")
    try:
        r = docker_engine.run("run", "--rm", "--name", name, "--security-opt", profile, "--entrypoint", "/bin/sh",
                              img, "-c", script, timeout=60)
    finally:  # (a timeout leaves the container running)
        docker_engine.run("rm", "-f", "-v", name, check=False)
    assert json.loads(r.stdout)["size"] == MiB, r
    assert b"I/O engine: sync (auto: plain path (measured fastest); io_uring unavailable: io_uring_setup: EPERM" \
        in r.stderr, r.stderr
