"""NBD URI parsing (NetworkBlockDevice/nbd doc/uri.md, as libnbd and QEMU read it).

Role: turn a user's ``nbd://`` / ``nbd+unix://`` string into an `NBDURI`
once, at the edge; everything after works on the parsed form.

Accepted forms::

    nbd://HOST[:PORT][/EXPORT]              TCP, port 10809 by default
    nbd://[IPV6]:PORT/EXPORT                IPv6 literal in brackets
    nbd+unix:///EXPORT?socket=PATH          Unix domain socket
    nbds://...  nbds+unix://...             the same over TLS (NBD_OPT_STARTTLS)

Rules (uri.md "Export name"): the export name is the URI path with exactly
one leading '/' removed and percent-decoding applied, so ``nbd://h`` and
``nbd://h/`` both name the default export "" and ``nbd://h//x`` names "/x".
For ``nbd+unix`` the authority must be empty and ``socket`` is required.
TLS query parameters (libnbd's names): ``tls-certificates=DIR`` (see
`nbd.tls`: ``ca-cert.pem``, optional ``client-cert.pem``/``client-key.pem``),
``tls-verify-peer=false`` (do not verify the server's certificate),
``tls-hostname=NAME`` (the name to check the certificate against; default
the URI host, none for Unix sockets).  TLS-PSK (``tls-psk-file``, a user
name) and vsock are refused with `ConfigError`.  Unknown query parameters are
ignored, as uri.md allows, except ``socket`` on TCP, which is a mistake worth
reporting.

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
    ``socket`` (Unix only, a filesystem path); ``export`` (decoded name);
    ``tls`` (``nbds`` schemes); ``tls_certificates``, ``tls_verify_peer``,
    ``tls_hostname`` (TLS only; see the module doc).
    """

    transport: str
    export: str = ""
    host: str = ""
    port: int = DEFAULT_PORT
    socket: str = ""
    tls: bool = False
    tls_certificates: str = ""
    tls_verify_peer: bool = True
    tls_hostname: str = ""

    def __str__(self) -> str:
        from urllib.parse import quote

        exp = quote(self.export, safe="/")
        s = "s" if self.tls else ""
        query = []
        if self.transport == "unix":
            query.append(f"socket={quote(self.socket, safe='/')}")
        if self.tls_certificates:
            query.append(f"tls-certificates={quote(self.tls_certificates, safe='/')}")
        if self.tls and not self.tls_verify_peer:
            query.append("tls-verify-peer=false")
        if self.tls_hostname:
            query.append(f"tls-hostname={quote(self.tls_hostname)}")
        q = "?" + "&".join(query) if query else ""
        if self.transport == "unix":
            return f"nbd{s}+unix:///{exp}{q}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"nbd{s}://{host}{port}/{exp}{q}"

    @property
    def server_hostname(self) -> str | None:
        """The name the server's certificate must carry (None: not checked)."""
        if self.tls_hostname:
            return self.tls_hostname
        return self.host if self.transport == "tcp" else None


def parse_uri(uri: str) -> NBDURI:
    """Parse ``uri``; raise `ConfigError` naming the problem."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as e:
        raise ConfigError(f"bad NBD URI {uri!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme in ("nbd+vsock", "nbds+vsock"):
        raise ConfigError(f"{uri}: vsock NBD URIs are not supported")
    if scheme not in ("nbd", "nbd+unix", "nbds", "nbds+unix"):
        raise ConfigError(f"bad NBD URI {uri!r}: scheme must be nbd://, nbd+unix://, nbds:// or nbds+unix://")
    tls = scheme.startswith("nbds")
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
    tls_kw = _tls_params(uri, query, tls)

    if scheme.endswith("+unix"):
        if parts.netloc:
            raise ConfigError(f"bad NBD URI {uri!r}: nbd+unix:// takes no host (use nbd+unix:///EXPORT?socket=PATH)")
        if not sockets or not sockets[0]:
            raise ConfigError(f"bad NBD URI {uri!r}: nbd+unix:// needs ?socket=PATH")
        return NBDURI("unix", export=export, socket=sockets[0], **tls_kw)

    if sockets:
        raise ConfigError(f"bad NBD URI {uri!r}: ?socket= needs the nbd+unix:// scheme")
    host = parts.hostname or ""
    if not host:
        raise ConfigError(f"bad NBD URI {uri!r}: missing host")
    if parts.username is not None:
        # uri.md allows a user for TLS-PSK only.
        raise ConfigError(f"bad NBD URI {uri!r}: a user name is for TLS-PSK, which is not supported")
    return NBDURI("tcp", export=export, host=host, port=DEFAULT_PORT if port is None else port, **tls_kw)


def _tls_params(uri: str, query: dict[str, list[str]], tls: bool) -> dict:
    def one(name: str) -> str | None:
        vals = query.get(name)
        if not vals:
            return None
        if len(vals) > 1:
            raise ConfigError(f"bad NBD URI {uri!r}: {name} given twice")
        return vals[0]

    if one("tls-psk-file") is not None:
        raise ConfigError(f"bad NBD URI {uri!r}: TLS-PSK is not supported (X.509 only: tls-certificates=DIR)")
    certs, verify, hostname = one("tls-certificates"), one("tls-verify-peer"), one("tls-hostname")
    if not tls:
        if certs is not None or verify is not None or hostname is not None:
            raise ConfigError(f"bad NBD URI {uri!r}: tls-* parameters need the nbds:// or nbds+unix:// scheme")
        return {}
    if verify is not None and verify.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ConfigError(f"bad NBD URI {uri!r}: tls-verify-peer must be true or false")
    return {"tls": True, "tls_certificates": certs or "",
            "tls_verify_peer": verify is None or verify.lower() in ("true", "1", "yes", "on"),
            "tls_hostname": hostname or ""}
