"""Unix socket paths: replacing a stale socket file, refusing a live one.

Role: the one rule both listeners (the NBD server and the QMP control socket)
follow before binding a Unix socket path.  A socket file whose server died
(``kill -9``, a crash) is left behind; binding again must replace it.  A
socket file some live process still listens on must never be stolen.

Invariant: the path is unlinked only after a connect to it was refused (no
listener); anything that is not a socket is never touched.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from .errors import ConfigError


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
