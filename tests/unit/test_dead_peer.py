"""Dead-peer detection settings (hunt 10): `sockets.dead_peer_options` and
the defaults of ``serve`` (no idle timeout; keepalive + TCP_USER_TIMEOUT).

The behaviour itself (a vanished peer reset, an idle live one kept) is
tested over real namespaces in tests/interop/test_hostile_network.py."""

from __future__ import annotations

import socket

import pytest

from nbdbackup import sockets
from nbdbackup.cli import build_parser
from nbdbackup.nbd.server import Server


def opts(timeout: float) -> dict[int, int]:
    return {opt: value for _, opt, value in sockets.dead_peer_options(timeout)}


@pytest.mark.parametrize("timeout", [1, 2, 3, 10, 60, 61.5, 600])
def test_options_are_consistent(timeout):
    o = opts(timeout)
    assert o[socket.SO_KEEPALIVE] == 1
    assert o[socket.TCP_USER_TIMEOUT] == int(timeout * 1000)
    idle, intvl, cnt = o[socket.TCP_KEEPIDLE], o[socket.TCP_KEEPINTVL], o[socket.TCP_KEEPCNT]
    assert 1 <= idle < timeout or idle == 1
    # The first probe comes well before the user timeout, and the probes alone
    # (without TCP_USER_TIMEOUT) give up at about the same time.
    assert idle <= max(1, timeout / 4)  # a partition < 3/4 timeout spares an idle connection
    assert timeout <= idle + cnt * intvl <= timeout + intvl + 1


def test_zero_turns_detection_off():
    o = opts(0)
    assert o[socket.SO_KEEPALIVE] == 0 and o[socket.TCP_USER_TIMEOUT] == 0


def test_set_on_a_tcp_socket_and_not_on_unix():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        sockets.set_dead_peer_timeout(s, 6)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 6000
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 1
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as u:
        sockets.set_dead_peer_timeout(u, 6)  # no error, nothing to set
    sockets.set_dead_peer_timeout(None, 6)


def test_serve_defaults_no_idle_timeout_and_dead_peer_detection():
    """Finding 1: a 60 s idle timeout on TCP cut idle VM disks (EIO)."""
    args = build_parser(["serve", "d=x"]).parse_args(["serve", "d=x"])
    assert args.idle_timeout == 0 and args.unix_idle_timeout == 0
    assert args.dead_peer_timeout == sockets.DEAD_PEER_TIMEOUT
    s = Server()
    assert s.idle_timeout == 0 and s.dead_peer_timeout == sockets.DEAD_PEER_TIMEOUT


def test_negative_dead_peer_timeout_is_refused():
    from nbdbackup.errors import ConfigError

    with pytest.raises(ConfigError):
        Server(dead_peer_timeout=-1)


@pytest.mark.parametrize("text,want", [("2.5", 2.5), ("0", 0.0), ("abc", 60.0), ("-1", 60.0), ("inf", 60.0),
                                       ("nan", 60.0)])
def test_environment_override(monkeypatch, text, want):
    """A bad NBDBACKUP_DEAD_PEER_TIMEOUT is ignored (it is read at import, by every command)."""
    monkeypatch.setenv("NBDBACKUP_DEAD_PEER_TIMEOUT", text)
    assert sockets.env_seconds("NBDBACKUP_DEAD_PEER_TIMEOUT", 60.0) == want
