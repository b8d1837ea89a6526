"""NBD URI parsing (NetworkBlockDevice/nbd doc/uri.md, as libnbd and QEMU read it).

Role: turn a user's ``nbd://`` / ``nbd+unix://`` string into an `NBDURI`
once, at the edge; everything after works on the parsed form.

Accepted forms::

    nbd://HOST[:PORT][/EXPORT]              TCP, port 10809 by default
    nbd://[IPV6]:PORT/EXPORT                IPv6 literal in brackets
    nbd+unix:///EXPORT?socket=PATH          Unix domain socket

Rules (uri.md "Export name"): the export name is the URI path with exactly
one leading '/' removed and percent-decoding applied, so ``nbd://h`` and
``nbd://h/`` both name the default export "" and ``nbd://h//x`` names "/x".
For ``nbd+unix`` the authority must be empty and ``socket`` is required.
TLS (``nbds``) and vsock are recognised but refused with `ConfigError`: this
client speaks plain NBD only.  Unknown query parameters are ignored, as
uri.md allows, except ``socket`` on TCP, which is a mistake worth reporting.

Invariant: an `NBDURI` is always complete: ``transport == "unix"`` implies a
non-empty ``socket``; ``transport == "tcp"`` implies a non-empty ``host``.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ConfigError
from .wire import DEFAULT_PORT, MAX_STRING


@dataclass(frozen=True, slots=True)
class NBDURI:
    """A parsed NBD URI.

    Fields: ``transport`` ("tcp" or "unix"); ``host``/``port`` (TCP only);
    ``socket`` (Unix only, a filesystem path); ``export`` (decoded name).
    """

    transport: str
    export: str = ""
    host: str = ""
    port: int = DEFAULT_PORT
    socket: str = ""

    def __str__(self) -> str:
        from urllib.parse import quote

        exp = quote(self.export, safe="/")
        if self.transport == "unix":
            return f"nbd+unix:///{exp}?socket={quote(self.socket, safe='/')}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"nbd://{host}{port}/{exp}"


def parse_uri(uri: str) -> NBDURI:
    """Parse ``uri``; raise `ConfigError` naming the problem."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"bad NBD URI {uri!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix", "nbds+vsock"):
        raise ConfigError(f"{uri}: TLS NBD URIs are not supported")
    if scheme == "nbd+vsock":
        raise ConfigError(f"{uri}: vsock NBD URIs are not supported")
    if scheme not in ("nbd", "nbd+unix"):
        raise ConfigError(f"bad NBD URI {uri!r}: scheme must be nbd:// or nbd+unix://")
    if parts.fragment:
        raise ConfigError(f"bad NBD URI {uri!r}: fragments are not allowed")
    path = parts.path
    if path and not path.startswith("/"):
        raise ConfigError(f"bad NBD URI {uri!r}: path must start with '/'")
    export = unquote(path[1:], errors="strict")
    if len(export.encode()) > MAX_STRING:
        raise ConfigError(f"bad NBD URI {uri!r}: export name longer than {MAX_STRING} bytes")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    except ValueError as e:  # pragma: no cover - parse_qs is lenient
        raise ConfigError(f"bad NBD URI {uri!r}: {e}") from None
    sockets = query.get("socket", [])
    if len(sockets) > 1:
        raise ConfigError(f"bad NBD URI {uri!r}: socket given twice")

    if scheme == "nbd+unix":
        if parts.netloc:
            raise ConfigError(f"bad NBD URI {uri!r}: nbd+unix:// takes no host (use nbd+unix:///EXPORT?socket=PATH)")
        if not sockets or not sockets[0]:
            raise ConfigError(f"bad NBD URI {uri!r}: nbd+unix:// needs ?socket=PATH")
        return NBDURI("unix", export=export, socket=sockets[0])

    if sockets:
        raise ConfigError(f"bad NBD URI {uri!r}: ?socket= needs the nbd+unix:// scheme")
    host = parts.hostname or ""
    if not host:
        raise ConfigError(f"bad NBD URI {uri!r}: missing host")
    if parts.username is not None:
        # uri.md allows a user for TLS PSK only; without TLS it means nothing.
        raise ConfigError(f"bad NBD URI {uri!r}: a user name needs TLS, which is not supported")
    return NBDURI("tcp", export=export, host=host, port=DEFAULT_PORT if port is None else port)
