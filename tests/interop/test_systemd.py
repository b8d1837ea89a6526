"""`nbdbackup serve` under systemd's protocols, with Debian's own tools.

- Socket activation through ``systemd-socket-activate`` (it binds, waits for
  the first connection, then execs the server with LISTEN_FDS/LISTEN_PID/
  LISTEN_FDNAMES, as systemd does): a Unix socket and a TCP socket served to
  qemu-io, qemu-img and nbdinfo; a socket named ``control`` served as the
  control socket to ``qemu.qmp``; ``--socket``/``--control`` ignored then;
  passed socket files left in place at exit; a datagram socket refused with
  one error line.
- Readiness: the test owns the NOTIFY_SOCKET datagram socket (a path, and an
  abstract name); when READY=1 arrives, every export -- one of them slow to
  open -- and the control socket answer at once; SIGTERM brings STOPPING=1
  and exit 0; WATCHDOG=1 keeps coming at WATCHDOG_USEC/2.
- The shipped units: ``systemd-analyze verify`` accepts them,
  ``systemd-sysusers --dry-run`` would create their user, and the
  service's own ExecStart runs under systemd-socket-activate with both
  socket units' names, reaching READY=1.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

import peers

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
UNITS = peers.REPO / "systemd"
#: Environment systemd-socket-activate passes on (it passes nothing else but PATH, HOME, TERM).
KEEP_ENV = ("PYTHONUNBUFFERED=1",)


def serve_argv(*args: str) -> list[str]:
    py = str(peers.VENV_PYTHON)
    return [py, "-m", "nbdbackup.cli", "serve", *args]


def activate_argv(listens: list[str], fdnames: list[str] | None, command: list[str],
                  env: tuple[str, ...] = ()) -> list[str]:
    argv = [peers.require("systemd-socket-activate")]
    for addr in listens:
        argv += ["-l", addr]
    if fdnames:
        argv.append("--fdname=" + ":".join(fdnames))
    for e in KEEP_ENV + env:
        argv += ["-E", e]
    return argv + command


def spawn(argv: list[str], sock: str = "", env: dict | None = None) -> peers.Peer:
    """``argv`` started with its log in a directory of its own (removed with
    the peer by `peers._running`, so the test's files outlive it)."""
    peer = peers._spawn(argv, peers.short_tempdir("nbdb-log-"), sock, env=env, cwd=str(peers.REPO))
    peer.stop_timeout = peers.STOP_TIMEOUT
    return peer


def qmp_query(path: str, command: str) -> object:
    async def go():
        qmp = QMPClient("test")
        await qmp.connect(path)
        try:
            return await qmp.execute(command)
        finally:
            await qmp.disconnect()

    return asyncio.run(asyncio.wait_for(go(), 30))


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, timeout=timeout)
    assert r.returncode == 0, f"{argv}: {r.stderr.decode(errors='replace')}"
    return r


def list_exports(uri: str) -> list[str]:
    out = run([peers.require("nbdinfo"), "--list", "--json", uri]).stdout.decode()
    return [e["export-name"] for e in json.loads(out)["exports"]]


def qemu_io(uri: str, *cmds: str, read_only: bool = False) -> str:
    argv = [peers.require("qemu-io"), "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        argv += ["-c", c]
    return run(argv + [uri]).stdout.decode(errors="replace")


# ------------------------------------------------------------ activation


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_unix_socket_activation(short_tmp, loop):
    sock = str(short_tmp / "nbd.sock")
    ignored = short_tmp / "ignored.sock"
    env = ("NBDBACKUP_NO_UVLOOP=1",) if loop == "asyncio" else ()
    argv = activate_argv([sock], None, serve_argv("--socket", str(ignored), "disk=memory:64M"), env)
    with peers.started(argv, sock, cwd=str(peers.REPO)) as peer:
        peer.stop_timeout = peers.STOP_TIMEOUT
        uri = peers.nbd_uri(sock, "disk")
        out = qemu_io(uri, "write -P 0xab 1M 2M", "read -P 0xab 1M 2M", "read -P 0 0 1M")
        assert "Pattern verification failed" not in out, out
        assert list_exports(peers.nbd_uri(sock)) == ["disk"]
        r = run([peers.require("qemu-img"), "info", "--output=json", uri])
        assert b'"virtual-size": 67108864' in r.stdout
        pid = peer.pid
        assert peers.stop(peer) == 0, peer.log()
        log = peer.log()
    assert f"Execing {peers.VENV_PYTHON}" in log  # it really was exec'd by systemd-socket-activate ...
    assert f"pid {pid}" in log                     # ... keeping the pid LISTEN_PID names
    assert "ignoring --socket" in log and not ignored.exists()
    # The passed socket is systemd's: still there after we exited.
    assert os.path.exists(sock)


def test_tcp_socket_activation(short_tmp):
    port = peers.free_tcp_port()
    argv = activate_argv([f"127.0.0.1:{port}"], None, serve_argv("disk=memory:16M"))
    peer = spawn(argv)
    with peers._running(peer):
        peers.wait_for_tcp(port, peer.alive, peer.log)
        uri = f"nbd://127.0.0.1:{port}/disk"
        assert "Pattern verification failed" not in qemu_io(uri, "write -P 0x5a 0 4M", "read -P 0x5a 0 4M")
        img = short_tmp / "copy.img"
        run([peers.require("qemu-img"), "convert", "-f", "raw", "-O", "raw", uri, str(img)])
        data = img.read_bytes()
        assert data[:4 * MiB] == b"\x5a" * (4 * MiB) and data[4 * MiB:].count(0) == 12 * MiB
    assert peer.returncode == 0, peer.log()


def test_control_socket_activation(short_tmp):
    nbd, ctl = str(short_tmp / "nbd.sock"), str(short_tmp / "ctl.sock")
    fallback = short_tmp / "fallback-ctl.sock"
    argv = activate_argv([nbd, ctl], ["nbd", "control"],
                         serve_argv("--control", str(fallback), "a=memory:1M", "b=memory:2M"))
    with peers.started(argv, nbd, cwd=str(peers.REPO)) as peer:
        peer.stop_timeout = peers.STOP_TIMEOUT
        exports = qmp_query(ctl, "query-block-exports")
        assert {(e["name"], e["size"]) for e in exports} == {("a", MiB), ("b", 2 * MiB)}
        assert not fallback.exists()
        # The socket unit's mode stays (the server chmods only sockets it creates).
        assert os.stat(ctl).st_mode & 0o777 == os.stat(nbd).st_mode & 0o777
    assert peer.returncode == 0, peer.log()
    assert os.path.exists(ctl) and os.path.exists(nbd)


def test_control_socket_alone_keeps_socket_option(short_tmp):
    """Only a control socket passed: the NBD listener still comes from --socket."""
    nbd, ctl = str(short_tmp / "nbd.sock"), str(short_tmp / "ctl.sock")
    argv = activate_argv([ctl], ["control"], serve_argv("--socket", nbd, "disk=memory:1M"))
    peer = spawn(argv, ctl)
    with peers._running(peer):
        peers.wait_until_listening(peer, ctl, probe=False)
        assert [e["name"] for e in qmp_query(ctl, "query-block-exports")] == ["disk"]
        peers.wait_until_listening(peer, nbd)
        assert list_exports(peers.nbd_uri(nbd)) == ["disk"]
    assert peer.returncode == 0, peer.log()
    assert not os.path.exists(nbd)  # created by us, so removed by us


def test_activated_control_socket_sees_exports_that_open_slowly(short_tmp):
    """A client waiting on an activated control socket is queued before the
    server starts; its first query must already list every export, even one
    whose device takes a second to open (nbdkit delay-open), because the
    exports are published before the control socket is served."""
    nbd, ctl = str(short_tmp / "nbd.sock"), str(short_tmp / "ctl.sock")
    with peers.nbdkit("memory", "4M", "delay-open=1", filters=["delay"]) as slow:
        argv = activate_argv([ctl], ["control"],
                             serve_argv("--socket", nbd, "fast=memory:1M", f"slow={slow.uri}"))
        peer = spawn(argv, ctl)
        with peers._running(peer):
            peers.wait_until_listening(peer, ctl, probe=False)
            names = [e["name"] for e in qmp_query(ctl, "query-block-exports")]
            assert names == ["fast", "slow"], names
        assert peer.returncode == 0, peer.log()


def test_datagram_socket_is_refused_with_one_error_line(short_tmp):
    sock = str(short_tmp / "dgram.sock")
    argv = activate_argv([sock], None, serve_argv("disk=memory:1M"))
    argv.insert(1, "--datagram")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=str(peers.REPO))
    try:
        deadline = time.monotonic() + peers.READY_TIMEOUT
        while not os.path.exists(sock):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"wake up", sock)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.decode(errors="replace")
    assert proc.returncode == 1, text
    errors = [line for line in text.splitlines() if line.startswith("nbdbackup: error:")]
    assert len(errors) == 1 and "not a stream socket" in errors[0], text
    assert "Traceback" not in text


# ------------------------------------------------------------ notification


class NotifySocket:
    """The receiving end of NOTIFY_SOCKET: a datagram socket the test owns.

    Fields: ``sock``; ``env_value`` (what to put in NOTIFY_SOCKET: the path,
    or '@name' for an abstract socket); ``messages`` (every datagram so far,
    as {field: value} dicts)."""

    def __init__(self, d: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"nbdbackup-test/{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = str(d / "notify.sock")
            self.sock.bind(path)
            self.env_value = path
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, peer, timeout: float = 30.0) -> dict[str, str]:
        """The next datagram carrying ``key``; fail if the server exits first."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {key} within {timeout} s; got {self.messages}\n{peer.log()}", pytrace=False)
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                if not peer.alive():
                    pytest.fail(f"server exited before {key}; got {self.messages}\n{peer.log()}", pytrace=False)
                continue
            msg = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.messages.append(msg)
            if key in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, short_tmp):
    ns = NotifySocket(short_tmp, request.param == "abstract")
    yield ns
    ns.close()


def spawn_serve(args: list[str], env: dict[str, str]) -> peers.Peer:
    return spawn(serve_argv(*args), env=dict(os.environ, PYTHONUNBUFFERED="1", **env))


def test_ready_means_everything_answers(short_tmp, notify_socket, make_image):
    d = short_tmp
    sock, ctl = str(d / "nbd.sock"), str(d / "ctl.sock")
    image = make_image(d / "disk.img", 8 * MiB, [(0x11, 0, MiB)])
    # A remote export whose open takes a second: READY=1 must wait for it.
    with peers.nbdkit("memory", "4M", "delay-open=1", filters=["delay"]) as slow:
        peer = spawn_serve(["--socket", sock, "--control", ctl, f"disk={image}", "scratch=memory:1M",
                               f"remote={slow.uri}"], {"NOTIFY_SOCKET": notify_socket.env_value})
        with peers._running(peer):
            ready = notify_socket.wait_for("READY", peer)
            # At this very moment, with no retry: the export table and both sockets.
            assert sorted(list_exports(peers.nbd_uri(sock))) == ["disk", "remote", "scratch"]
            assert {e["name"] for e in qmp_query(ctl, "query-block-exports")} == {"disk", "remote", "scratch"}
            assert ready["READY"] == "1"
            assert ready["MAINPID"] == str(peer.pid)
            assert "3 export(s)" in ready["STATUS"] and f"unix:{sock}" in ready["STATUS"]
            assert "Pattern verification failed" not in qemu_io(peers.nbd_uri(sock, "disk"), "read -P 0x11 0 1M")
            os.kill(peer.pid, signal.SIGTERM)
            stopping = notify_socket.wait_for("STOPPING", peer)
            assert stopping["STOPPING"] == "1" and "stopping" in stopping["STATUS"]
            assert peer.proc.wait(peers.STOP_TIMEOUT) == 0, peer.log()
    assert [m for m in notify_socket.messages if "READY" in m] == [ready]


def test_no_ready_when_start_fails(short_tmp, notify_socket):
    peer = spawn_serve(["--socket", str(short_tmp / "s.sock"), f"disk={short_tmp}/missing.img"],
                       {"NOTIFY_SOCKET": notify_socket.env_value})
    with peers._running(peer):
        assert peer.proc.wait(60) == 1
    notify_socket.sock.settimeout(0.2)
    with pytest.raises(socket.timeout):
        notify_socket.sock.recv(4096)


def test_watchdog_pings(short_tmp, notify_socket):
    peer = spawn_serve(["--socket", str(short_tmp / "s.sock"), "disk=memory:1M"],
                       {"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "200000"})
    with peers._running(peer):
        notify_socket.wait_for("READY", peer)
        start = time.monotonic()
        for _ in range(3):
            notify_socket.wait_for("WATCHDOG", peer, timeout=10)
        # 3 pings at 0.1 s intervals; generous bound for a loaded machine.
        assert time.monotonic() - start < 5
    assert peer.returncode == 0, peer.log()


# ------------------------------------------------------------ the shipped units


def test_systemd_analyze_verify_accepts_the_units(short_tmp):
    """``systemd-analyze verify`` needs no running systemd.  ExecStart's program
    must exist, so the copies point at this checkout's venv instead of
    /opt/nbdbackup; nothing else changes."""
    exe = peers.require("systemd-analyze")
    names = ["nbdbackup.service", "nbdbackup.socket", "nbdbackup-control.socket"]
    for name in names:
        text = (UNITS / name).read_text()
        (short_tmp / name).write_text(text.replace("/opt/nbdbackup/.venv/bin/nbdbackup",
                                                   str(peers.REPO / ".venv" / "bin" / "nbdbackup")))
    r = subprocess.run([exe, "verify", "--man=no", *[str(short_tmp / n) for n in names]],
                       capture_output=True, timeout=120)
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, out
    # Unknown keys and bad values are only warnings: none may appear.
    assert not [line for line in out.splitlines() if "nbdbackup" in line], out


def test_sysusers_file_creates_the_user(short_tmp):
    """``systemd-sysusers --dry-run`` on an empty root: it would create the user
    and group the service runs as (nothing is written)."""
    exe = peers.require("systemd-sysusers")
    r = subprocess.run([exe, "--dry-run", f"--root={short_tmp}", str(UNITS / "nbdbackup.sysusers")],
                       capture_output=True, timeout=60)
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 0, out
    assert "Creating group 'nbdbackup'" in out and "Creating user 'nbdbackup'" in out, out
    assert "ignoring" not in out.lower(), out
    assert not (short_tmp / "etc").exists()


def _unit_value(name: str, key: str) -> list[str]:
    return [line.split("=", 1)[1].strip() for line in (UNITS / name).read_text().splitlines()
            if line.startswith(key + "=")]


def test_the_units_command_line_under_socket_activation(short_tmp, make_image):
    """ExecStart of nbdbackup.service, with /run and /var/lib moved into a temp
    dir and /etc/default/nbdbackup's variables set, run the way the two socket
    units would start it: both sockets passed with their FileDescriptorName."""
    d = short_tmp
    run_dir, state = d / "run", d / "lib"
    (run_dir / "nbdbackup").mkdir(parents=True)
    image = make_image(d / "disk.img", 4 * MiB, [(0x42, 0, MiB)])
    environ = {"NBDBACKUP_EXPORTS": f"disk={image}", "NBDBACKUP_OPTS": "--read-only"}
    cmd = _unit_value("nbdbackup.service", "ExecStart")[0].replace("%t", str(run_dir)).replace("%S", str(state))
    argv = []
    for word in shlex.split(cmd):
        m = re.fullmatch(r"\$(\w+)", word)
        argv += environ[m.group(1)].split() if m else [word]
    argv[0] = str(peers.REPO / ".venv" / "bin" / "nbdbackup")
    nbd = str(run_dir / "nbdbackup" / "nbd.sock")
    ctl = _unit_value("nbdbackup-control.socket", "ListenStream")[0].replace("/run", str(run_dir))
    names = [_unit_value("nbdbackup.socket", "FileDescriptorName")[0],
             _unit_value("nbdbackup-control.socket", "FileDescriptorName")[0]]
    ns = NotifySocket(d, abstract=True)
    try:
        full = activate_argv([nbd, ctl], names, argv, (f"NOTIFY_SOCKET={ns.env_value}",))
        peer = spawn(full, nbd)
        with peers._running(peer):
            peers.wait_until_listening(peer, nbd, probe=False)
            socket.socket(socket.AF_UNIX).connect(nbd)  # the first connection starts the service
            ready = ns.wait_for("READY", peer)
            assert ready["MAINPID"] == str(peer.pid)
            assert "Pattern verification failed" not in qemu_io(peers.nbd_uri(nbd, "disk"), "read -P 0x42 0 1M",
                                                            read_only=True)
            [exp] = qmp_query(ctl, "query-block-exports")
            assert exp["name"] == "disk" and exp["read-only"] is True
            os.kill(peer.pid, signal.SIGTERM)
            ns.wait_for("STOPPING", peer)
            assert peer.proc.wait(peers.STOP_TIMEOUT) == 0, peer.log()
    finally:
        ns.close()
    assert (state / "nbdbackup" / "bitmaps").is_dir()  # --state-dir %S/nbdbackup/bitmaps was used
