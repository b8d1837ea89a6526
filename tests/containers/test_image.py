"""The nbdbackup image (Dockerfile) on a real docker daemon.

Contract: the image builds on a Debian 12 base; its entrypoint is the CLI;
it runs as uid 10809 (``nbdbackup``), not root; it holds the runtime only
(no pytest, hypothesis, qemu, nbdkit, libnbd) and adds at most
`MAX_ADDED_MB` to its base; ``serve --socket-mode 0660`` in a bind-mounted
directory lets a host user in group 10809 attach and refuses one who is not;
``docker stop`` (SIGTERM to PID 1) stops the server cleanly: exit code 0
within `STOP_WITHIN` seconds, socket file removed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
import uuid

import pytest

import peers

#: What the image may add to its base (python3 ~45 MB, the venv with numpy ~75 MB).
MAX_ADDED_MB = 150
#: ``docker stop`` of an idle server: ~0.3 s measured; generous for a shared machine.
STOP_WITHIN = 5.0
UID = 10809
NOBODY = 65534


def test_help_runs(docker_engine, nbdbackup_image):
    r = docker_engine.run("run", "--rm", nbdbackup_image.tag, "--help")
    assert b"usage: nbdbackup" in r.stdout and b"serve" in r.stdout


def test_runs_as_non_root(docker_engine, nbdbackup_image):
    r = docker_engine.run("run", "--rm", "--entrypoint", "id", nbdbackup_image.tag)
    assert r.stdout.split()[:2] == [f"uid={UID}(nbdbackup)".encode(), f"gid={UID}(nbdbackup)".encode()], r.stdout


def test_size(docker_engine, nbdbackup_image, record_property):
    added = (nbdbackup_image.size - nbdbackup_image.base_size) / 1e6
    record_property("image_size_bytes", nbdbackup_image.size)
    print(f"image {nbdbackup_image.tag}: {nbdbackup_image.size / 1e6:.1f} MB "
          f"(base {nbdbackup_image.base_size / 1e6:.1f} MB + {added:.1f} MB)")
    assert 0 < added <= MAX_ADDED_MB


def test_runtime_only(docker_engine, nbdbackup_image):
    script = (
        "import importlib.util as u, shutil\n"
        "import blake3, numpy, uvloop, nbdbackup.cli\n"
        "print(sorted(m for m in ('pytest', 'hypothesis', 'qemu', 'nbd', 'xdist') if u.find_spec(m)))\n"
        "print(sorted(p for p in ('qemu-img', 'qemu-nbd', 'nbdkit', 'nbdinfo', 'pip') if shutil.which(p)))\n"
    )
    r = docker_engine.run("run", "--rm", "--entrypoint", "python", nbdbackup_image.tag, "-c", script)
    assert r.stdout.splitlines() == [b"[]", b"[]"], r.stdout


def _wait(cond, timeout: float, what: str, poll: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def volume_dir(parent, name: str):
    """A host directory for a container volume: owned by the image's user, group-accessible."""
    d = parent / name
    d.mkdir()
    os.chown(d, UID, UID)
    os.chmod(d, 0o770)
    return d


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the volume and run nbdinfo as nobody")
def test_socket_group_access_and_sigterm(docker_engine, nbdbackup_image, short_tmp):
    os.chmod(short_tmp, 0o711)
    sockdir = volume_dir(short_tmp, "s")
    sock = str(sockdir / "nbd.sock")
    name = f"nbdbt-{uuid.uuid4().hex[:10]}"
    nbdinfo, setpriv = peers.require("nbdinfo"), peers.require("setpriv")
    try:
        docker_engine.run("run", "-d", "--name", name, "-v", f"{sockdir}:/run/nbdbackup", nbdbackup_image.tag,
                          "serve", "--socket", "/run/nbdbackup/nbd.sock", "--socket-mode", "0660", "m=memory:16M")
        _wait(lambda: os.path.exists(sock) and peers.can_connect(sock), 30, "the server's socket in the volume")
        st = os.stat(sock)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, UID, UID)
        uri = peers.nbd_uri(sock, "m")
        as_nobody = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}"]
        ok = subprocess.run([*as_nobody, f"--groups={UID}", nbdinfo, "--size", uri], capture_output=True, timeout=30)
        assert ok.returncode == 0 and ok.stdout.strip() == str(16 << 20).encode(), ok.stderr
        no = subprocess.run([*as_nobody, "--clear-groups", nbdinfo, "--size", uri], capture_output=True, timeout=30)
        assert no.returncode != 0 and b"ermission denied" in no.stderr, no.stderr

        t0 = time.monotonic()
        docker_engine.run("stop", "-t", "30", name, timeout=60)
        elapsed = time.monotonic() - t0
        code = docker_engine.run("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        logs = docker_engine.run("logs", name).stderr
        assert code == b"0", logs
        assert elapsed < STOP_WITHIN, f"docker stop took {elapsed:.1f} s"
        assert not os.path.exists(sock)
    finally:
        docker_engine.run("rm", "-f", name, check=False)
        shutil.rmtree(sockdir, ignore_errors=True)
