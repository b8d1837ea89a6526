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
"""

from __future__ import annotations

import contextlib
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
