"""Real NBD peers for interop tests, as context managers.

Role: start qemu-nbd, nbdkit, qemu-storage-daemon and our own
``nbdbackup serve`` on temporary Unix sockets, wait until each accepts
connections, and stop it at the end -- by PID, never by name.

Invariants:
- Every socket lives in a fresh directory made by ``tempfile.mkdtemp(dir="/tmp")``
  (short, so the path stays below the 108-byte ``sun_path`` limit); the
  directory is removed at teardown.
- A peer that is not installed, or that exits or does not listen within
  ``READY_TIMEOUT``, makes the test FAIL (``pytest.fail``) with the install
  hint or the peer's own stderr: the README's set-up installs every peer, so a
  missing one is a broken machine, not a reason to skip.
- Each peer's stderr goes to a log file in its directory (a pipe could fill up
  and block the peer); ``Peer.log()`` reads it.
- Teardown sends SIGTERM, waits ``STOP_TIMEOUT``, then SIGKILL; the exit code
  is kept in ``Peer.returncode``.

Public API (all yield a `Peer`):
    qemu_nbd(image, fmt="raw", read_only=False, bitmap=None, extra=(), name="")
    nbdkit(plugin, *args, filters=(), extra=())
    qemu_storage_daemon(args)                      # Peer.qmp(cmd, **arguments)
    nbdbackup_serve(*export_args, extra=(), env=None)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
#: The interpreter that runs ``nbdbackup serve``: the project's venv.
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
READY_TIMEOUT = 15.0
#: Grace time after SIGTERM before SIGKILL: ours must exit promptly after
#: flushing; third-party peers (nbdkit waits for connected clients) get less.
STOP_TIMEOUT = 10.0
PEER_STOP_TIMEOUT = 2.0
#: Linux ``sun_path`` is 108 bytes including the terminating NUL.
SUN_PATH_MAX = 107

INSTALL_HINT = {
    "qemu-nbd": "qemu-utils",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-storage-daemon": "qemu-system-common",
    "nbdkit": "nbdkit (and nbdkit-plugin-python for the python plugin)",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdsh": "libnbd-bin",
    "systemd-socket-activate": "systemd",
    "systemd-analyze": "systemd",
    "systemd-sysusers": "systemd",
}


def require(program: str) -> str:
    """Absolute path of ``program``, or fail the test with the install hint."""
    path = shutil.which(program)
    if path is None:
        pkg = INSTALL_HINT.get(program, program)
        pytest.fail(
            f"{program} is not installed: run scripts/setup (apt-get install {pkg})",
            pytrace=False,
        )
    return path


def nbd_uri(socket_path: str | os.PathLike, name: str = "") -> str:
    """``nbd+unix:///NAME?socket=PATH`` with NAME percent-encoded."""
    return f"nbd+unix:///{urllib.parse.quote(name, safe='')}?socket={os.fspath(socket_path)}"


@dataclass
class Peer:
    """A running peer.

    Fields: ``proc`` (the child; its PID is the only handle used to stop it),
    ``socket`` (the NBD Unix socket path, or the QMP socket for
    qemu-storage-daemon), ``dir`` (the private temporary directory),
    ``log_path`` (its stderr), ``argv`` (for messages), ``qmp_socket``
    (qemu-storage-daemon only), ``returncode`` (set at teardown).
    """

    proc: subprocess.Popen
    socket: str
    dir: str
    log_path: str
    argv: list[str]
    qmp_socket: str | None = None
    returncode: int | None = None
    stop_timeout: float = PEER_STOP_TIMEOUT

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def uri(self) -> str:
        """URI of the default ("") export."""
        return nbd_uri(self.socket)

    def uri_for(self, name: str) -> str:
        return nbd_uri(self.socket, name)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qmp(self, command: str, **arguments) -> object:
        """Run one QMP command on qemu-storage-daemon; return its ``return`` value.

        Opens a fresh monitor connection each time (the monitor serves one
        client at a time); a QMP error fails the test with its description.
        """
        assert self.qmp_socket, "not a qemu-storage-daemon peer"
        # The monitor may still be dropping the previous client (a probe, the
        # last call) and close this one before its greeting: connect again.
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(self.qmp_socket)
            if s.recv(1, socket.MSG_PEEK):
                break
            s.close()
            time.sleep(0.05)
        else:
            raise ConnectionError(f"{self.qmp_socket}: the QMP monitor sends no greeting")
        with s:
            f = s.makefile("rwb")

            def recv() -> dict:
                while True:
                    line = f.readline()
                    if not line:
                        raise ConnectionError("QMP monitor closed the connection")
                    msg = json.loads(line)
                    if "event" not in msg:
                        return msg

            def send(cmd: str, args: dict | None = None) -> object:
                req: dict = {"execute": cmd}
                if args:
                    req["arguments"] = args
                f.write(json.dumps(req).encode() + b"\n")
                f.flush()
                reply = recv()
                if "error" in reply:
                    pytest.fail(f"QMP {cmd} {args}: {reply['error'].get('desc')}", pytrace=False)
                return reply.get("return")

            greeting = recv()
            assert "QMP" in greeting, greeting
            send("qmp_capabilities")
            return send(command, arguments)


def short_tempdir(prefix: str = "nbdb-") -> str:
    """A fresh private directory directly under /tmp (short socket paths)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def _socket_path(d: str, name: str) -> str:
    path = os.path.join(d, name)
    assert len(path.encode()) <= SUN_PATH_MAX, f"socket path too long: {path}"
    return path


def can_connect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
        return True


def unix_listening(path: str) -> bool | None:
    """Whether a socket bound to ``path`` is listening, read from /proc/net/unix
    (its ``__SO_ACCEPTCON`` flag) without connecting to it; None where that file
    cannot be read.  For peers whose readiness must not be probed by a connection."""
    try:
        with open("/proc/net/unix") as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                    return True
    except OSError:
        return None
    return False


def free_tcp_port() -> int:
    """An unused TCP port on 127.0.0.1 (racy by nature: only our own tests compete)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_tcp(port: int, alive: Callable[[], bool], log: Callable[[], str] = lambda: "",
                 timeout: float = READY_TIMEOUT) -> None:
    """Wait until 127.0.0.1:``port`` accepts connections; fail if ``alive()``
    turns false first (with ``log()`` in the message) or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if not alive():
                pytest.fail(f"server exited before listening on TCP {port}:\n{log()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"nothing listens on TCP {port} after {timeout} s:\n{log()}", pytrace=False)
            time.sleep(0.02)


def wait_until_listening(peer: Peer, path: str | None = None, *, probe: bool = True,
                         timeout: float = READY_TIMEOUT) -> None:
    """Wait until ``path`` (default: the peer's socket) accepts connections.

    With ``probe=False`` nothing connects: the socket file must exist and
    be listening by /proc/net/unix (`unix_listening`; existence alone where
    that cannot be read) -- for peers that treat a probing client as their
    one and only client, and for qemu-storage-daemon's QMP monitor, which
    now and then closed the NEXT connection without a greeting when a probe
    had just connected and left (seen in CI under load).
    Fails the test if the peer exits first or the time runs out.
    """
    path = path or peer.socket
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if not peer.alive():
            pytest.fail(
                f"{peer.argv[0]} exited with status {peer.proc.returncode} before listening on {path}\n"
                f"command: {' '.join(peer.argv)}\nstderr:\n{peer.log()}",
                pytrace=False,
            )
        if os.path.exists(path) and (can_connect(path) if probe else unix_listening(path) is not False):
            return
        if time.monotonic() > deadline:
            _stop(peer)
            pytest.fail(
                f"{peer.argv[0]} did not listen on {path} within {timeout}s\n"
                f"command: {' '.join(peer.argv)}\nstderr:\n{peer.log()}",
                pytrace=False,
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _stop(peer: Peer, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
    """Stop the peer by PID: ``sig``, then SIGKILL after ``timeout``."""
    proc = peer.proc
    if timeout is None:
        timeout = peer.stop_timeout
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    peer.returncode = proc.returncode
    return proc.returncode


def _spawn(argv: Sequence[str], d: str, sock: str, *, env: dict | None = None,
           cwd: str | None = None) -> Peer:
    log_path = os.path.join(d, "stderr.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=cwd,
        )
    return Peer(proc=proc, socket=sock, dir=d, log_path=log_path, argv=list(argv))


@contextlib.contextmanager
def _running(peer: Peer) -> Iterator[Peer]:
    try:
        yield peer
    finally:
        _stop(peer)
        shutil.rmtree(peer.dir, ignore_errors=True)


@contextlib.contextmanager
def started(argv: Sequence[str], sock: str, *, cwd: str | None = None,
            timeout: float = READY_TIMEOUT) -> Iterator[Peer]:
    """Run ``argv``, a server listening on the Unix socket ``sock`` (a path the
    caller chose); yield once it accepts connections; stop it by PID at the end.

    Its output goes to a log in a fresh temp dir, quoted if it fails to start.
    """
    peer = _spawn(argv, short_tempdir("nbdb-log-"), sock, cwd=cwd)
    with _running(peer):
        wait_until_listening(peer, timeout=timeout)
        yield peer


@contextlib.contextmanager
def qemu_nbd(image: str | os.PathLike, fmt: str = "raw", read_only: bool = False,
             bitmap: str | None = None, extra: Sequence[str] = (), name: str = "") -> Iterator[Peer]:
    """qemu-nbd serving ``image`` on a Unix socket (persistent, 8 clients).

    ``bitmap`` exports the image's persistent dirty bitmap of that name
    (``qemu:dirty-bitmap:NAME``).  The export is named ``name`` ("" default).
    """
    exe = require("qemu-nbd")
    d = short_tempdir()
    sock = _socket_path(d, "nbd.sock")
    argv = [exe, "--socket", sock, "--format", fmt, "--persistent", "--shared", "8"]
    if name:
        argv += ["--export-name", name]
    if read_only:
        argv.append("--read-only")
    if bitmap:
        argv += ["--bitmap", bitmap]
    argv += list(extra)
    argv.append(os.fspath(image))
    peer = _spawn(argv, d, sock)
    with _running(peer):
        wait_until_listening(peer)
        yield peer


@contextlib.contextmanager
def nbdkit(plugin: str, *args: str, filters: Sequence[str] = (),
           extra: Sequence[str] = ()) -> Iterator[Peer]:
    """nbdkit running ``plugin`` with ``args`` behind ``filters`` (outermost first).

    Examples: ``nbdkit("memory", "64M")``, ``nbdkit("sparse-random", "1G")``,
    ``nbdkit("pattern", "16M")``, ``nbdkit("python", "/path/plugin.py")``,
    ``nbdkit("memory", "64M", "error-pread-rate=0.1", filters=["error"])``
    (filters: error, blocksize, delay, ...).
    """
    exe = require("nbdkit")
    d = short_tempdir()
    sock = _socket_path(d, "nbd.sock")
    argv = [exe, "-U", sock, "-f", "--exit-with-parent"]
    argv += [f"--filter={f}" for f in filters]
    argv += list(extra)
    argv += [plugin, *args]
    peer = _spawn(argv, d, sock)
    with _running(peer):
        wait_until_listening(peer)
        yield peer


@contextlib.contextmanager
def qemu_storage_daemon(args: Sequence[str]) -> Iterator[Peer]:
    """qemu-storage-daemon with a QMP monitor socket, plus ``args``.

    ``Peer.socket`` and ``Peer.qmp_socket`` are the QMP socket; an NBD export
    started in ``args`` or through ``Peer.qmp("nbd-server-start", ...)``
    should put its socket in ``Peer.dir`` (use `nbd_socket_path(peer)`).
    """
    exe = require("qemu-storage-daemon")
    d = short_tempdir()
    qmp = _socket_path(d, "qmp.sock")
    argv = [exe, "--chardev", f"socket,id=qmp0,path={qmp},server=on,wait=off",
            "--monitor", "chardev=qmp0", *args]
    peer = _spawn(argv, d, qmp)
    peer.qmp_socket = qmp
    with _running(peer):
        wait_until_listening(peer, probe=False)  # a probe could cost the next client its monitor
        yield peer


def nbd_socket_path(peer: Peer, name: str = "nbd.sock") -> str:
    """A socket path inside the peer's private directory."""
    return _socket_path(peer.dir, name)


def nbdbackup_argv(socket_path: str, *export_args: str, extra: Sequence[str] = ()) -> list[str]:
    """The command line of ``nbdbackup serve`` (the CLI contract of issue 2)."""
    py = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    return [py, "-m", "nbdbackup.cli", "serve", "--socket", socket_path, *extra, *export_args]


@contextlib.contextmanager
def nbdbackup_serve(*export_args: str, extra: Sequence[str] = (),
                    env: dict | None = None) -> Iterator[Peer]:
    """``nbdbackup serve --socket SOCK [extra...] NAME=SPEC...`` as a subprocess.

    Yields once the socket accepts connections; ``Peer.uri_for(name)`` gives
    each export's URI.  Teardown sends SIGTERM (the graceful path) and records
    the exit status in ``Peer.returncode``.
    """
    d = short_tempdir()
    sock = _socket_path(d, "nbd.sock")
    argv = nbdbackup_argv(sock, *export_args, extra=extra)
    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    peer = _spawn(argv, d, sock, env=full_env, cwd=str(REPO))
    peer.stop_timeout = STOP_TIMEOUT
    with _running(peer):
        wait_until_listening(peer)
        yield peer


def stop(peer: Peer, sig: int = signal.SIGTERM, timeout: float | None = None) -> int:
    """Stop ``peer`` now (by PID) and return its exit status."""
    return _stop(peer, sig, timeout)


def run_tool(*argv: str, timeout: float = 120) -> str:
    """Run a peer's command line; fail the test with its output unless it exits 0."""
    r = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout)
    assert r.returncode == 0, f"{' '.join(argv)} failed:\n{r.stdout}{r.stderr}"
    return r.stdout


def assert_target_saved(orig: str | os.PathLike, target: str | os.PathLike, blocks: Iterable[int],
                        size: int, *, whole: bool) -> None:
    """After a backup of an image whose point-in-time copy is ``orig``: the
    target equals it everywhere (``whole``: qemu-img compare), or at least on
    the ``blocks`` of ``size`` bytes that copy-before-write had to save."""
    if whole:
        run_tool("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", os.fspath(orig), os.fspath(target))
        return
    with open(orig, "rb") as f:
        o = f.read()
    with open(target, "rb") as f:
        t = f.read()
    for b in blocks:
        assert t[b * size:(b + 1) * size] == o[b * size:(b + 1) * size], \
            f"block {b} ({size} bytes at {b * size:#x}) not saved by CBW"


async def wait_concluded(qmp, job_id: str, timeout: float = 60, poll: float = 0.02) -> dict:
    """Poll ``query-jobs`` over a QMP client (``qemu.qmp.QMPClient`` or our
    ``ControlClient``: anything with ``await execute(name)``) until JOB_ID is
    ``concluded``; return its JobInfo.  Fails the test after ``timeout`` s."""
    import asyncio
    import time

    end = time.monotonic() + timeout
    while True:
        jobs = {j["id"]: j for j in await qmp.execute("query-jobs")}
        if jobs[job_id]["status"] == "concluded":
            return jobs[job_id]
        assert time.monotonic() < end, f"job still {jobs[job_id]}"
        await asyncio.sleep(poll)


async def finish_job(qmp, job_id: str, sync: str) -> dict:
    """End a backup job the test throttled: a ``sync=none`` job is cancelled
    (it never ends by itself), any other runs on at full speed; wait until it
    is concluded, without error; return its JobInfo."""
    if sync == "none":
        await qmp.execute("job-cancel", {"id": job_id})
    else:
        await qmp.execute("job-set-speed", {"id": job_id, "speed": 0})
    info = await wait_concluded(qmp, job_id)
    assert "error" not in info, info
    return info


def data_extents(path: str) -> list[tuple[int, int]]:
    """(offset, length) of the data regions of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    out = []
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h - d))
            pos = h
    return out


def nbdbackup_cli(*args: str, ok: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``nbdbackup ARGS...`` (this checkout, this venv) to completion; text
    output (undecodable bytes replaced).  With ``ok`` the exit code must be 0."""
    r = subprocess.run([sys.executable, "-m", "nbdbackup.cli", *args], cwd=REPO, capture_output=True, text=True,
                       errors="replace", timeout=timeout)
    if ok:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def restore_snapshot(repo: str | os.PathLike, snap: str, out: str | os.PathLike,
                     timeout: float = 120) -> subprocess.CompletedProcess:
    """Copy repository snapshot ``snap`` to the raw file ``out`` through nbdkit +
    plugins/restore.py and ``qemu-img convert`` (the restore path a user takes)."""
    plugin = str(REPO / "plugins" / "restore.py")
    with nbdkit("python", plugin, f"repo={repo}", f"snapshot={snap}") as p:
        return subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", p.uri, os.fspath(out)],
                              capture_output=True, text=True, errors="replace", timeout=timeout)
