"""The project's exception hierarchy.

Invariants:
- Every exception this package raises on purpose derives from `NBDBackupError`,
  except I/O failures of a block device, which are plain `OSError` with an
  `errno` (errno is the internal error currency; `nbd.wire.errno_to_nbd` maps
  it to the wire in exactly one place).
- `LocalProtocolError`: we were about to break the protocol (a bug, or a
  request the caller should not make).  `RemoteProtocolError`: the peer broke
  it; the connection that saw it is closed, nothing else is harmed.
- A root cause is wrapped (``raise X from e``), never swallowed.
"""

from __future__ import annotations

import os


class NBDBackupError(Exception):
    """Root of every error nbdbackup raises on purpose."""


class ConfigError(NBDBackupError):
    """Bad user input at the edge (CLI argument, control command argument)."""


class ProtocolError(NBDBackupError):
    """A violation of the NBD protocol."""


class LocalProtocolError(ProtocolError):
    """We were asked to do something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the connection ends."""


class ConnectionClosed(NBDBackupError):
    """The connection is gone; every pending request fails with this."""


class OptionError(NBDBackupError):
    """The server refused an option during the handshake (client side).

    `reply` is the NBD option reply type (an `nbd.wire.Rep` ERR_* value) and
    `message` the server's text, if any.
    """

    def __init__(self, option: int, reply: int, message: str = "") -> None:
        self.option = option
        self.reply = reply
        self.message = message
        super().__init__(f"option {option} refused with reply {reply:#x}: {message}")


def permission_hint(path: str | None) -> str:
    """What to say after "Permission denied" on ``path``: who we run as and
    the usual fix (an arbitrary container uid, OpenShift-style, is in group
    0; the image makes its directories group-0 writable, a volume or host
    directory of your own must be too: README "Containers")."""
    uid, gid = os.getuid(), os.getgid()
    where = f" {path}" if path else ""
    return (f"running as uid {uid} gid {gid}, which cannot write{where}: make it writable by that uid or "
            f"group (e.g. chown {uid}:{gid} or chgrp {gid} + chmod g+rwX; a container's --user UID:0 "
            f"needs group 0, see README 'Containers')")
