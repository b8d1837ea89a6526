"""`nbdbackup.systemd` on real file descriptors and datagram sockets.

- `take_listen_fds` in a fresh interpreter given fd 3 the way systemd gives
  it: the LISTEN_* variables are gone from its environment and from a child
  it starts, and fd 3 is close-on-exec (sd_listen_fds(unset=1) semantics).
- `listening_socket` accepts listening Unix/TCP stream sockets and refuses a
  datagram socket, a connected socket and a non-socket.
- `Notifier` delivers to a path and to an abstract name, and a vanished
  NOTIFY_SOCKET costs nothing but a log line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import pytest

from nbdbackup.errors import ConfigError
from nbdbackup.systemd import ListenFd, Notifier, listening_socket

CHILD = r"""
import fcntl, json, os, socket, subprocess, sys
lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
lst.bind(sys.argv[1]); lst.listen()
if lst.fileno() == 3:
    lst.detach()
else:
    os.dup2(lst.fileno(), 3)
    lst.close()
os.set_inheritable(3, True)  # as systemd passes it: no FD_CLOEXEC
assert not fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="control")
from nbdbackup.systemd import take_listen_fds, listening_socket
fds = take_listen_fds()
sock = listening_socket(fds[0])
child_env = subprocess.run(["env"], capture_output=True, text=True, errors="replace").stdout
print(json.dumps({
    "fds": [[f.fd, f.name] for f in fds],
    "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "child": sorted(l.split("=")[0] for l in child_env.splitlines() if l.startswith("LISTEN_")),
    "cloexec": bool(fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
    "family": int(sock.family), "path": sock.getsockname(),
}))
"""


def test_take_listen_fds_unsets_and_closes_on_exec(short_tmp):
    path = str(short_tmp / "a.sock")
    r = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    got = json.loads(r.stdout)
    assert got == {"fds": [[3, "control"]], "left": [], "child": [], "cloexec": True,
                   "family": int(socket.AF_UNIX), "path": path}


def _dup_at(sock: socket.socket) -> ListenFd:
    return ListenFd(os.dup(sock.fileno()), "test")


@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET])
def test_listening_socket_accepts_listeners(short_tmp, family):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(str(short_tmp / "l.sock") if family == socket.AF_UNIX else ("127.0.0.1", 0))
        s.listen()
        got = listening_socket(_dup_at(s))
        with got:
            assert got.family == family and got.type == socket.SOCK_STREAM
            assert got.getsockname() == s.getsockname()


def test_listening_socket_refuses_the_rest(short_tmp):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as d:
        lfd = _dup_at(d)
        with pytest.raises(ConfigError, match="not a stream socket"):
            listening_socket(lfd)
        os.close(lfd.fd)  # refused fds are left open for the caller
    a, b = socket.socketpair()
    with a, b:
        lfd = _dup_at(a)
        with pytest.raises(ConfigError, match="not listening"):
            listening_socket(lfd)
        os.close(lfd.fd)
    r, w = os.pipe()
    try:
        with pytest.raises(ConfigError, match="not a socket"):
            listening_socket(ListenFd(r, "pipe"))
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_delivers(short_tmp, abstract):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        if abstract:
            name = f"nbdbackup-test/{uuid.uuid4().hex}"
            rx.bind("\0" + name)
            value = "@" + name
        else:
            value = str(short_tmp / "notify")
            rx.bind(value)
        rx.settimeout(10)
        n = Notifier({"NOTIFY_SOCKET": value}, os.getpid())
        assert n.notify("READY=1", STATUS="up", MAINPID=123)
        assert n.notify("STOPPING=1")
        n.close()
        assert rx.recv(4096) == b"READY=1\nSTATUS=up\nMAINPID=123"
        assert rx.recv(4096) == b"STOPPING=1"


def test_notifier_survives_a_missing_socket(short_tmp, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(short_tmp / "gone")}, os.getpid())
    assert n.notify("READY=1") is False
    assert n.notify("STOPPING=1") is False
    n.close()
    assert sum("sd_notify" in r.getMessage() for r in caplog.records) == 1
