"""TLS for NBD (proto.md "TLS support"): credentials and `ssl` contexts.

Role: turn a credentials directory into the `ssl.SSLContext` the server or
the client hands to ``loop.start_tls`` after NBD_OPT_STARTTLS.  The protocol
side (STARTTLS handling, FORCEDTLS refusals) lives in `protocol` and
`client_protocol`; this module only knows about certificates.

Credentials directory (the layout of QEMU's ``tls-creds-x509``, nbdkit's
``--tls-certificates`` and libnbd's ``tls-certificates``, so one directory
serves all of them):

==================  ==========================================================
ca-cert.pem         the CA that signed the peer's certificate (verification)
server-cert.pem     the server's certificate chain (server side)
server-key.pem      its private key (server side)
client-cert.pem     the client's certificate (client side, optional: sent
client-key.pem      when present; a server with ``verify_peer`` requires it)
==================  ==========================================================

Only X.509 is supported: Python's `ssl` has no TLS-PSK before 3.13.  TLS 1.2
is the minimum (proto.md: implementations MUST support 1.2 and SHOULD NOT
offer older versions by default).

Server modes (proto.md): ``off`` (NOTLS: STARTTLS is refused with
ERR_POLICY), ``on`` (SELECTIVETLS with no TLS-only export: a client may
upgrade), ``require`` (FORCEDTLS: every option but STARTTLS and ABORT gets
ERR_TLS_REQD until the upgrade; the default when credentials are given).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from ..errors import ConfigError

MODES = ("off", "on", "require")


def _path(creds_dir: str, name: str) -> str:
    return os.path.join(creds_dir, name)


def _check_dir(creds_dir: str) -> None:
    if not os.path.isdir(creds_dir):
        raise ConfigError(f"TLS credentials directory {creds_dir!r} does not exist")


@dataclass(frozen=True)
class ServerTLS:
    """Server TLS configuration.

    Fields: ``mode`` (one of `MODES`); ``creds_dir``; ``verify_peer``
    (require a client certificate signed by ``ca-cert.pem``).
    """

    mode: str
    creds_dir: str = ""
    verify_peer: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"TLS mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.mode != "off" and not self.creds_dir:
            raise ConfigError(f"TLS mode {self.mode!r} needs a credentials directory")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def context(self) -> ssl.SSLContext:
        """A server context; raises `ConfigError` naming a missing or bad file."""
        _check_dir(self.creds_dir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cert, key = _path(self.creds_dir, "server-cert.pem"), _path(self.creds_dir, "server-key.pem")
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"TLS: cannot load {cert} / {key}: {e}") from None
        if self.verify_peer:
            ca = _path(self.creds_dir, "ca-cert.pem")
            try:
                ctx.load_verify_locations(cafile=ca)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"TLS: cannot load {ca} (needed to verify clients): {e}") from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def client_context(creds_dir: str | None, *, verify_peer: bool = True,
                   hostname: str | None = None) -> ssl.SSLContext:
    """A client context.

    The server's certificate is verified against ``creds_dir/ca-cert.pem``
    (or the system's CAs without a directory) unless ``verify_peer`` is
    false; its name is checked only when ``hostname`` is given (Unix sockets
    have none unless the URI says ``tls-hostname``).  ``client-cert.pem`` and
    ``client-key.pem`` are presented when the directory has them.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if creds_dir:
        _check_dir(creds_dir)
    if verify_peer:
        ca = _path(creds_dir, "ca-cert.pem") if creds_dir else None
        try:
            if ca and os.path.exists(ca):
                ctx.load_verify_locations(cafile=ca)
            else:
                ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"TLS: cannot load {ca}: {e}") from None
        ctx.check_hostname = bool(hostname)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if creds_dir:
        cert, key = _path(creds_dir, "client-cert.pem"), _path(creds_dir, "client-key.pem")
        if os.path.exists(cert):
            try:
                ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"TLS: cannot load {cert} / {key}: {e}") from None
    return ctx
