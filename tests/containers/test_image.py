"""The nbdbackup image (Dockerfile) on a real docker daemon.

Contract: the image builds on a Debian 12 base; its entrypoint is the CLI;
it runs as uid 10809 (``nbdbackup``), not root; it holds the runtime only
(no pytest, hypothesis, qemu, nbdkit, libnbd) and adds at most
`MAX_ADDED_MB` to its base; ``serve --socket-mode 0660`` in a bind-mounted
directory lets a host user in group 10809 attach and refuses one who is not;
the image's HEALTHCHECK turns ``healthy``; ``docker stop`` (SIGTERM to
PID 1) stops the server cleanly: exit code 0 within `STOP_WITHIN` seconds,
socket file removed.  A block device (a loop device, root:disk 0660 as udev
leaves them) is refused to the non-root server without ``--group-add disk``
(one error line, exit 1) and served read-write with it.
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

#: What the image may add to its base (python3 ~45 MB, the venv with numpy ~75 MB, ~12 MB of
#: bytecode for what the commands import: docker/precompile.py; 152 MB measured 2026-12-04).
MAX_ADDED_MB = 165
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


def image_python(docker_engine, image, script: str) -> list[bytes]:
    """The lines ``script`` prints when the image's Python runs it (a failure raises)."""
    return docker_engine.run("run", "--rm", "--entrypoint", "python", image.tag, "-c", script).stdout.splitlines()


def test_runtime_only(docker_engine, nbdbackup_image):
    script = (
        "import importlib.util as u, shutil\n"
        "import blake3, numpy, uvloop, nbdbackup.cli\n"
        "print(sorted(m for m in ('pytest', 'hypothesis', 'qemu', 'nbd', 'xdist') if u.find_spec(m)))\n"
        "print(sorted(p for p in ('qemu-img', 'qemu-nbd', 'nbdkit', 'nbdinfo', 'pip') if shutil.which(p)))\n"
    )
    assert image_python(docker_engine, nbdbackup_image, script) == [b"[]", b"[]"]


def test_s3_client_survives_the_trimmed_botocore(docker_engine, nbdbackup_image):
    """The image keeps only botocore's S3/STS/SSO models: an S3 store still opens, and its
    client builds requests (no connection: the endpoint is a closed local port)."""
    script = (
        "import boto3, zstandard, cryptography.hazmat.primitives.ciphers.aead as a\n"
        "c = boto3.client('s3', region_name='us-east-1', endpoint_url='http://127.0.0.1:9',\n"
        "                 aws_access_key_id='k', aws_secret_access_key='s')\n"
        "print(c.generate_presigned_url('get_object', Params={'Bucket': 'b', 'Key': 'k'})[:26])\n"
        "boto3.client('sts', region_name='us-east-1')\n"
        "from nbdbackup.agent.s3store import S3Store\n"
        "print(type(S3Store('s3://b/p', endpoint='http://127.0.0.1:9')).__name__)\n"
    )
    assert image_python(docker_engine, nbdbackup_image, script) == [b"http://127.0.0.1:9/b/k?AWS", b"S3Store"]


def test_every_module_the_commands_import_is_byte_compiled(docker_engine, nbdbackup_image):
    """The runtime writes no bytecode (PYTHONDONTWRITEBYTECODE; the venv is root's), so a module
    without a .pyc in the image is compiled again by every command (boto3/botocore: ~0.16 s of
    CPU per S3 command). Every module of the venv that the server, the agent and an S3 client
    import must load from its cached bytecode."""
    script = (
        "import sys, boto3, nbdbackup.cli, nbdbackup.agent.workflow, nbdbackup.agent.repo, nbdbackup.agent.s3store\n"
        "import nbdbackup.commands.serve, nbdbackup.nbd.server, nbdbackup.nbd.client\n"
        "boto3.client('s3', region_name='us-east-1', endpoint_url='http://127.0.0.1:9',\n"
        "             aws_access_key_id='k', aws_secret_access_key='s')\n"
        "import importlib.util as u\n"
        "def unchecked(path):  # a .pyc that is used as it is: PEP 552 flags 0b01 (hash-based, unchecked)\n"
        "    try:\n"
        "        return open(u.cache_from_source(path), 'rb').read(8)[4:8] == b'\\x01\\0\\0\\0'\n"
        "    except OSError:\n"
        "        return False\n"
        "venv = [m for m in list(sys.modules.values()) if (getattr(m, '__file__', None) or '').startswith('/opt/nbdbackup/.venv/')\n"
        "        and m.__file__.endswith('.py')]\n"
        "print(len(venv) > 100, sorted(m.__name__ for m in venv if not unchecked(m.__file__)))\n"
    )
    assert image_python(docker_engine, nbdbackup_image, script) == [b"True []"]


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
        docker_engine.run("run", "-d", "--name", name, "--health-interval", "1s", "-v", f"{sockdir}:/run/nbdbackup",
                          nbdbackup_image.tag,
                          "serve", "--socket", "/run/nbdbackup/nbd.sock", "--socket-mode", "0660", "m=memory:16M")
        _wait(lambda: os.path.exists(sock) and peers.can_connect(sock), 30, "the server's socket in the volume")
        # The image's own HEALTHCHECK (only its interval shortened here).
        _wait(lambda: docker_engine.run("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()
              == b"healthy", 30, "HEALTHCHECK healthy")
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


@pytest.fixture
def loop_device(short_tmp):
    """A loop device over an 8 MiB file of random bytes: (device path, backing file, its bytes)."""
    backing = short_tmp / "loop.img"
    data = os.urandom(8 << 20)
    backing.write_bytes(data)
    r = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"no loop device here: {r.stderr.decode(errors='replace').strip()}")
    dev = r.stdout.decode().strip()
    st = os.stat(dev)
    try:
        yield dev, backing, data
    finally:
        subprocess.run(["losetup", "--detach", dev], capture_output=True, timeout=30)
        os.chown(dev, st.st_uid, st.st_gid)
        os.chmod(dev, stat.S_IMODE(st.st_mode))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a loop device")
def test_block_device_with_group_add_disk(docker_engine, nbdbackup_image, short_tmp, loop_device):
    """README: --device /dev/X --group-add disk lets the non-root server serve a block device."""
    dev, backing, data = loop_device
    os.chown(dev, 0, 6)  # Debian's disk group (the image's too), as udev leaves block devices
    os.chmod(dev, 0o660)
    os.chmod(short_tmp, 0o711)
    sockdir = volume_dir(short_tmp, "s")
    sock = str(sockdir / "nbd.sock")
    serve = ["serve", "--socket", "/run/nbdbackup/nbd.sock", f"disk={dev}"]
    common = ["--device", dev, "-v", f"{sockdir}:/run/nbdbackup"]
    # Without the group the non-root server is refused: one clear error line.
    r = docker_engine.run("run", "--rm", *common, nbdbackup_image.tag, *serve, check=False, timeout=60)
    assert r.returncode == 1 and b"ermission denied" in r.stderr and b"Traceback" not in r.stderr, r.stderr
    name = f"nbdbt-{uuid.uuid4().hex[:10]}"
    try:
        docker_engine.run("run", "-d", "--name", name, "--group-add", "disk", *common, nbdbackup_image.tag, *serve)
        _wait(lambda: os.path.exists(sock) and peers.can_connect(sock), 30, "the server's socket")
        uri = peers.nbd_uri(sock, "disk")
        out = short_tmp / "out.img"
        subprocess.run([peers.require("nbdcopy"), uri, str(out)], check=True, capture_output=True, timeout=60)
        assert out.read_bytes() == data
        new = short_tmp / "new.img"
        new.write_bytes(os.urandom(len(data)))
        subprocess.run([peers.require("nbdcopy"), str(new), uri], check=True, capture_output=True, timeout=60)
        docker_engine.run("stop", name, timeout=60)
        assert docker_engine.run("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip() == b"0"
        with open(dev, "rb") as f:  # read back through the device itself
            assert f.read() == new.read_bytes()
    finally:
        docker_engine.run("rm", "-f", name, check=False)
