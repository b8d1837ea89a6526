"""systemd integration: socket activation (sd_listen_fds) and readiness (sd_notify).

Role: the one place that reads systemd's environment protocol, in pure
stdlib.  The parsing functions (`parse_listen_env`, `parse_notify_socket`,
`parse_watchdog_env`, `format_notify`) take an environment mapping and a pid
and do no I/O, so they are unit-tested directly; `take_listen_fds`,
`listening_socket` and `Notifier` are the thin I/O layer on top.

Socket activation (systemd's sd_listen_fds(3) protocol):
- The passed sockets are fds 3 .. 3+LISTEN_FDS-1, and they are ours only when
  LISTEN_PID is our pid: variables meant for another process (a parent that
  forgot to unset them) are ignored, as sd_listen_fds does.  LISTEN_PID unset
  means no activation.  A malformed LISTEN_PID / LISTEN_FDS / LISTEN_FDNAMES
  (not a number, negative, a name count different from the fd count, a name
  systemd would refuse) is a `ConfigError`: a unit file mistake is reported,
  not guessed around.
- LISTEN_FDNAMES (FileDescriptorName= in the socket unit) maps names to fds;
  without it every fd is named "unknown".  `nbdbackup serve` serves the fd
  named ``CONTROL_FDNAME`` ("control") as the control socket and every other
  fd as an NBD listener.
- `take_listen_fds` unsets LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES (so no
  child process believes the sockets are its own) and sets FD_CLOEXEC on the
  fds (sd_listen_fds(unset=1) semantics).  The sockets belong to systemd:
  their paths are never unlinked by us.

Notification (sd_notify(3)):
- NOTIFY_SOCKET is an absolute path, or an abstract socket name written with
  a leading '@'; anything else (vsock addresses) is ignored with a warning.
- `Notifier` keeps NOTIFY_SOCKET set (we still send STOPPING=1 at shutdown)
  and sends one datagram per `notify` call; a failure to send is logged once,
  never raised: losing a status message must not stop a server.
- WATCHDOG_USEC (with WATCHDOG_PID, when set, equal to our pid) turns on the
  watchdog; `Notifier.watchdog_interval` is half the period, as
  sd_watchdog_enabled(3) recommends.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
from dataclasses import dataclass
from typing import Mapping

from .errors import ConfigError

log = logging.getLogger("nbdbackup.systemd")

#: First passed fd (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
#: The LISTEN_FDNAMES name of the control socket (FileDescriptorName=control).
CONTROL_FDNAME = "control"
#: The name systemd gives an fd when LISTEN_FDNAMES is absent.
UNKNOWN_FDNAME = "unknown"
#: Longest file descriptor name systemd accepts (FDNAME_MAX).
FDNAME_MAX = 255
LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass(frozen=True)
class ListenFd:
    """One passed socket: ``fd`` (3, 4, ...) and ``name`` (its FileDescriptorName=)."""

    fd: int
    name: str


def _parse_int(env: Mapping[str, str], var: str) -> int:
    text = env[var]
    if not text.isdigit() or not text.isascii():
        raise ConfigError(f"systemd socket activation: {var}={text!r} is not a non-negative number")
    return int(text)


def _valid_fdname(name: str) -> bool:
    """systemd's fdname_is_valid: 1..255 printable ASCII characters, no ':'."""
    return 0 < len(name) <= FDNAME_MAX and all(" " <= c <= "~" and c != ":" for c in name)


def parse_listen_env(env: Mapping[str, str], pid: int) -> list[ListenFd]:
    """The sockets systemd passed to process ``pid`` according to ``env`` (no I/O).

    [] when LISTEN_PID is unset or names another process, or LISTEN_FDS is
    unset or 0.  Raises `ConfigError` for malformed values.
    """
    if "LISTEN_PID" not in env:
        return []
    if _parse_int(env, "LISTEN_PID") != pid:
        return []  # meant for another process
    if "LISTEN_FDS" not in env:
        return []
    count = _parse_int(env, "LISTEN_FDS")
    if count > 4096:
        raise ConfigError(f"systemd socket activation: LISTEN_FDS={count} is implausibly large")
    names_text = env.get("LISTEN_FDNAMES")
    if names_text is None:
        names = [UNKNOWN_FDNAME] * count
    else:
        names = names_text.split(":") if names_text else []
        if len(names) != count:
            raise ConfigError(f"systemd socket activation: LISTEN_FDNAMES has {len(names)} name(s) "
                              f"for LISTEN_FDS={count}")
        for name in names:
            if not _valid_fdname(name):
                raise ConfigError(f"systemd socket activation: bad name {name!r} in LISTEN_FDNAMES")
    return [ListenFd(LISTEN_FDS_START + i, name) for i, name in enumerate(names)]


def take_listen_fds(environ: dict | None = None, pid: int | None = None) -> list[ListenFd]:
    """`parse_listen_env` on ``environ`` (default os.environ) for our pid, then
    unset the LISTEN_* variables and set FD_CLOEXEC on every passed fd.

    The variables are unset even when they were malformed or meant for another
    process, so nothing we start inherits them.  An fd that is not open is a
    `ConfigError`.
    """
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    try:
        fds = parse_listen_env(environ, pid)
    finally:
        for var in LISTEN_VARS:
            environ.pop(var, None)
    for lfd in fds:
        try:
            flags = fcntl.fcntl(lfd.fd, fcntl.F_GETFD)
            fcntl.fcntl(lfd.fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"systemd socket activation: fd {lfd.fd} ({lfd.name}): {e.strerror}") from None
    return fds


def listening_socket(lfd: ListenFd) -> socket.socket:
    """A `socket.socket` owning the passed fd, checked to be a listening stream
    socket of family AF_UNIX, AF_INET or AF_INET6 (`ConfigError` otherwise:
    e.g. a datagram socket, or Accept=yes, which passes connected sockets)."""
    what = f"systemd socket activation: fd {lfd.fd} ({lfd.name})"
    try:
        sock = socket.socket(fileno=lfd.fd)  # family, type and protocol from getsockopt
    except OSError as e:
        raise ConfigError(f"{what}: not a socket: {e.strerror}") from None
    try:
        if sock.family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
            raise ConfigError(f"{what}: unsupported address family {sock.family!r}")
        if sock.type != socket.SOCK_STREAM:
            raise ConfigError(f"{what}: not a stream socket (ListenStream= is needed)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError(f"{what}: not listening (Accept=yes is not supported)")
    except BaseException:
        sock.detach()  # leave the fd alone: the caller reports, nothing is half-closed
        raise
    return sock


def describe(sock: socket.socket) -> str:
    """``unix:PATH`` / ``tcp:HOST:PORT`` for logs and STATUS=."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes):
            name = "@" + name[1:].decode(errors="replace") if name[:1] == b"\0" else name.decode(errors="replace")
        return f"unix:{name or '(unnamed)'}"
    host, port = name[0], name[1]
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


# ------------------------------------------------------------------ sd_notify


def parse_notify_socket(env: Mapping[str, str]) -> str | None:
    """The address to sendto() for NOTIFY_SOCKET, or None (unset, or a kind we
    do not speak).  '@name' is the abstract socket "\\0name"."""
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("/"):
        return addr
    if addr.startswith("@") and len(addr) > 1:
        return "\0" + addr[1:]
    return None


def parse_watchdog_env(env: Mapping[str, str], pid: int) -> float | None:
    """The watchdog period in seconds, or None when off (unset, 0, malformed,
    or WATCHDOG_PID names another process)."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or not usec.isascii() or int(usec) == 0:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid is not None and (not wpid.isdigit() or int(wpid) != pid):
        return None
    return int(usec) / 1e6


def format_notify(*fields: str, **named: object) -> bytes:
    """One sd_notify datagram: ``"READY=1"`` strings and ``STATUS="..."``
    keywords, newline-separated.  A value may not contain a newline."""
    lines = list(fields) + [f"{k}={v}" for k, v in named.items()]
    for line in lines:
        if "\n" in line or "=" not in line:
            raise ValueError(f"bad sd_notify field {line!r}")
    return "\n".join(lines).encode()


class Notifier:
    """Sends sd_notify datagrams to NOTIFY_SOCKET (a no-op without it).

    Fields: ``address`` (sendto() address, None = disabled); ``watchdog_interval``
    (seconds between WATCHDOG=1, half of WATCHDOG_USEC; None = off);
    ``_sock`` (the AF_UNIX datagram socket, opened on first use);
    ``_warned`` (a send failure was logged already).
    """

    def __init__(self, env: Mapping[str, str] | None = None, pid: int | None = None) -> None:
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        self.address = parse_notify_socket(env)
        if env.get("NOTIFY_SOCKET") and self.address is None:
            log.warning("NOTIFY_SOCKET=%s is not a path or an '@' abstract name: not notifying",
                        env["NOTIFY_SOCKET"])
        period = parse_watchdog_env(env, pid) if self.address else None
        self.watchdog_interval = period / 2 if period else None
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str, **named: object) -> bool:
        """Send one datagram (see `format_notify`); True if it was sent."""
        if self.address is None:
            return False
        data = format_notify(*fields, **named)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self.address)
        except OSError as e:
            if not self._warned:
                log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET", "?"), e)
                self._warned = True
            return False
        return True

    async def watchdog(self) -> None:
        """Send WATCHDOG=1 every `watchdog_interval` seconds until cancelled
        (returns at once when the watchdog is off).  Running on the event loop,
        it stops pinging exactly when the loop stops making progress."""
        if self.watchdog_interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
