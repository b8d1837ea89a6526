"""Unix socket paths: replacing a stale socket file, refusing a live one.

Role: the one rule both listeners (the NBD server and the QMP control socket)
follow before binding a Unix socket path.  A socket file whose server died
(``kill -9``, a crash) is left behind; binding again must replace it.  A
socket file some live process still listens on must never be stolen.

Invariant: the path is unlinked only after a connect to it was refused (no
listener); anything that is not a socket is never touched.

Who may connect: a Unix socket is created with the mode the umask leaves
(0755 with umask 022, so only its owner, who alone has write permission, can
connect); `set_socket_access` gives it an explicit mode and group after
bind (``serve --socket-mode 0660 --socket-group GROUP``), so members of a
group can attach, e.g. host users reaching a container's socket through a
volume.  Between bind and chmod the socket has the umask's mode, which with
the usual umasks is no more permissive than the one asked for.

Dead peers (`set_dead_peer_timeout`): a TCP peer whose host vanished (power
loss, cable pulled, a partition: packets silently dropped, no FIN, no RST)
is noticed by TCP itself, not by an application timer, so an idle peer that
is alive keeps its connection for ever.  Idle: keepalive probes, answered by
the peer's kernel whatever its application does.  Sending (a reply, a
request, a payload the peer no longer acknowledges): TCP_USER_TIMEOUT.  One
value sets both consistently: the connection is reset about ``timeout`` s
after the peer last acknowledged anything (Linux: with TCP_USER_TIMEOUT set,
a keepalive failure is also judged by it).  An idle peer cut off for less
than about 5/8 of ``timeout`` keeps its connection (`dead_peer_options`).  A peer that is alive but keeps its
receive window closed (stops reading our replies) for ``timeout`` s is reset
too: since Linux 5.11 TCP_USER_TIMEOUT bounds zero-window probing as well
(as the former idle timeout closed such a quiet connection).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import stat

from .errors import ConfigError


def parse_socket_mode(text: str) -> int:
    """Permission bits from octal text (``0660``, ``660``, ``0o660``)."""
    t = text.strip().lower().removeprefix("0o")
    try:
        mode = int(t, 8)
    except ValueError:
        raise ConfigError(f"bad socket mode {text!r}: expected octal permission bits like 0660") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"bad socket mode {text!r}: expected octal permission bits like 0660")
    return mode


def set_socket_access(path: str, mode: int | None, gid: int | None, what: str = "socket") -> None:
    """Give the bound socket at ``path`` group ``gid`` and then ``mode`` (None: leave as is)."""
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        if mode is not None:
            os.chmod(path, mode)
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot set group/mode: {e.strerror or e}") from None


def prepare_unix_socket(path: str, what: str = "socket") -> None:
    """Remove a stale socket file at ``path``; raise `ConfigError` if it is in use."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{what} {path}: exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # nobody listens: stale
        return
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from None
    finally:
        probe.close()
    raise ConfigError(f"{what} {path}: already in use by a running server")


def env_seconds(name: str, default: float) -> float:
    """The environment variable ``name`` if it is a non-negative number, else ``default``."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value >= 0 and math.isfinite(value) else default


#: Default of ``--dead-peer-timeout`` and of our client sockets: about a
#: minute (the idle timeout's former default) from a vanished peer to its
#: slot and buffers coming back, yet long enough that a route flap or a
#: failover of some seconds does not cut a VM's disk.  Costs one keepalive
#: probe (and its ACK) per idle connection every ``timeout / 4`` s.
#: ``NBDBACKUP_DEAD_PEER_TIMEOUT`` overrides it (tests: a few seconds).
DEAD_PEER_TIMEOUT = env_seconds("NBDBACKUP_DEAD_PEER_TIMEOUT", 60.0)


def dead_peer_options(timeout: float) -> list[tuple[int, int, int]]:
    """(level, option, value) for a dead-peer timeout of ``timeout`` s (0:
    keepalive and the user timeout off, the kernel's defaults).

    First probe after ``timeout / 4`` s of silence, then one every
    ``timeout / 8`` s, so the peer has had several probes when the user
    timeout (``timeout`` s since it last acknowledged anything) resets the
    connection; without TCP_USER_TIMEOUT the probe count gives the same
    bound.  An idle peer's last acknowledgement (of a probe) is at most
    ``timeout / 4`` s old when a partition starts, and the reset comes at
    the first keepalive timer ``timeout`` s after it, before that timer's
    probe; so a partition shorter than ``timeout - idle - intvl`` (5/8 of
    the timeout: 38 s of 60) never costs an idle connection (with
    ``timeout / 2`` as the idle time, a quarter of the timeout could:
    measured, tests/interop/test_hostile_network.py)."""
    if timeout <= 0:
        return [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0), (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 0)]
    idle = max(1, int(timeout // 4))
    intvl = max(1, int(timeout // 8))
    cnt = max(1, math.ceil((timeout - idle) / intvl))
    return [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, intvl),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cnt),
            (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(timeout * 1000)))]


def set_dead_peer_timeout(sock, timeout: float = DEAD_PEER_TIMEOUT) -> None:
    """Apply `dead_peer_options` to a TCP socket (anything else: nothing).
    Best effort: an option the platform lacks is skipped."""
    if sock is None or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return
    for level, opt, value in dead_peer_options(timeout):
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass
