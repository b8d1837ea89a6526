"""Remote control: the QMP control socket over TCP, always with mutual TLS.

Role: everything that differs between the local control socket (a 0600 Unix
socket: whoever can open it may do everything) and remote control
(``serve --control-listen HOST:PORT``): the validated server configuration,
the per-client access decision, and the client-side address form.

Server side (`server_config`, `ControlAuthz`):
- TLS from the first byte (no STARTTLS: QMP has none; QEMU's QMP over TLS is
  a TLS socket chardev, the same idea).  The context comes from
  `nbd.tls.ServerTLS` with ``verify_peer``: ``--control-tls-creds DIR`` holds
  ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem`` (the NBD layout),
  and every client must present a certificate that CA signed.
- Without credentials, or without at least one ``--control-authz`` /
  ``--control-authz-read`` pattern, TCP control refuses to start (one error
  line): there is no plain-TCP mode, and "any certificate of the CA" must be
  said explicitly (``--control-authz '*'``), since the CA often also signs the
  NBD clients' certificates.
- After the handshake the client certificate's subject (RFC 4514, as
  ``--tls-authz`` sees it: `nbd.access.subject_dn`, `subject_matches`) gives
  the session's `Access`: ``full`` (matches a ``--control-authz`` pattern:
  every command), ``read`` (matches only a ``--control-authz-read`` pattern:
  `schema.is_read_only` commands, events too), or ``none``.
- A ``none`` client still gets the greeting, then every command, including
  ``qmp_capabilities``, is answered ``GenericError`` with the reason (its
  subject and the options that did not admit it), so it learns why rather
  than seeing a closed socket; it never negotiates, so it never receives an
  event.  A ``read`` client's other commands get ``GenericError`` naming the
  command and the client's read-only admission.

Client side (`parse_address`, `client_for`): ``qmps://HOST:PORT`` (``tcp://``
is the same, and is TLS too; ``[::1]`` for IPv6) with ``?tls-hostname=NAME``
to check the server certificate against NAME instead of HOST; anything else
is a Unix socket path.  TCP needs a credentials directory with
``ca-cert.pem``, ``client-cert.pem`` and ``client-key.pem``
(`nbd.tls.client_context`); the server's name is always checked.

Invariant: the Unix control socket (and a systemd-passed one) is `FULL`:
today's behaviour, unchanged.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from dataclasses import dataclass

from ..errors import ConfigError
from ..nbd.access import subject_dn, subject_matches
from ..nbd.logsafe import clip
from .schema import is_read_only

__all__ = ["Access", "FULL", "ControlAuthz", "RemoteControl", "server_config", "TCPAddress",
           "parse_address", "client_for", "SCHEMES"]

#: URL schemes of a remote control address (both mean TLS).
SCHEMES = ("qmps", "tcp")


@dataclass(frozen=True, slots=True)
class Access:
    """What one control client may do.

    Fields: ``level`` (``"full"``, ``"read"`` or ``"none"``); ``who`` (how
    replies and logs name the client); ``reason`` (``none`` only: why every
    command is refused).
    """

    level: str
    who: str
    reason: str = ""

    def refusal(self, command: str) -> str | None:
        """Why this client may not run COMMAND, or None if it may."""
        if self.level == "full":
            return None
        if self.level == "read":
            if is_read_only(command):
                return None
            return (f"command {command} is not allowed: {self.who} is admitted read-only "
                    "(--control-authz-read: query-* commands only)")
        return self.reason or f"{self.who} is not allowed"


#: The Unix control socket's clients: everything (the socket is 0600).
FULL = Access("full", "local client")


@dataclass(frozen=True)
class ControlAuthz:
    """Subject patterns of remote control: ``full`` (``--control-authz``)
    and ``read`` (``--control-authz-read``), RFC 4514 globs."""

    full: tuple[str, ...] = ()
    read: tuple[str, ...] = ()

    def classify(self, cert: dict | None) -> Access:
        """The `Access` of a client presenting CERT (``getpeercert()``); never raises."""
        dn = subject_dn(cert)
        if dn is None:
            return Access("none", "a client without a certificate", "a client certificate is required")
        # The subject is the client's text (CA-signed, but still): escaped and bounded.
        who = f"client certificate {clip(dn, 256)}"
        if subject_matches(dn, self.full):
            return Access("full", who)
        if subject_matches(dn, self.read):
            return Access("read", who)
        return Access("none", who, f"{who} is not allowed by --control-authz or --control-authz-read")


@dataclass(frozen=True)
class RemoteControl:
    """Validated ``--control-listen`` configuration.

    Fields: ``listens`` ((host, port) pairs); ``ssl`` (the server context:
    TLS 1.2+, client certificate required); ``authz`` (the patterns).
    """

    listens: tuple[tuple[str, int], ...]
    ssl: ssl.SSLContext
    authz: ControlAuthz


def server_config(listens: list[tuple[str, int]], creds_dir: str | None, full: list[str],
                  read: list[str]) -> RemoteControl | None:
    """The remote control configuration of ``serve``'s options (None without
    ``--control-listen``); raises `ConfigError` with one line for every
    inconsistency, and for credentials that do not load."""
    from ..nbd.tls import ServerTLS

    if not listens:
        if creds_dir or full or read:
            raise ConfigError("--control-tls-creds/--control-authz/--control-authz-read "
                              "need --control-listen HOST:PORT")
        return None
    if not creds_dir:
        raise ConfigError("--control-listen needs --control-tls-creds DIR: remote control is TLS-only, "
                          "with client certificates")
    if not full and not read:
        raise ConfigError("--control-listen needs --control-authz PATTERN and/or --control-authz-read PATTERN "
                          "(client certificate subjects; '*' admits every certificate the CA signed)")
    try:
        ctx = ServerTLS("require", creds_dir, verify_peer=True).context()
    except ConfigError as e:
        raise ConfigError(f"--control-tls-creds: {e}") from None
    return RemoteControl(tuple(listens), ctx, ControlAuthz(tuple(full), tuple(read)))


@dataclass(frozen=True)
class TCPAddress:
    """A parsed ``qmps://HOST:PORT[?tls-hostname=NAME]``.

    Fields: ``host``, ``port``; ``tls_hostname`` (the name the server
    certificate must carry: NAME, else HOST); ``text`` (as given, for messages).
    """

    host: str
    port: int
    tls_hostname: str
    text: str


def parse_address(text: str) -> str | TCPAddress:
    """A control address: a `TCPAddress` for ``qmps://``/``tcp://``, else the
    Unix socket path itself.  `ConfigError` for a malformed URL."""
    scheme, sep, _ = text.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        if sep and "/" not in scheme:
            raise ConfigError(f"control address {text!r}: unknown scheme {scheme!r} "
                              f"(use a socket path or qmps://HOST:PORT)")
        return text
    u = urllib.parse.urlsplit(text)
    try:
        port = u.port
    except ValueError:
        port = None
    if not u.hostname or port is None or u.path not in ("", "/"):
        raise ConfigError(f"control address {text!r}: expected qmps://HOST:PORT")
    query = urllib.parse.parse_qs(u.query, keep_blank_values=True)
    unknown = set(query) - {"tls-hostname"}
    if unknown:
        raise ConfigError(f"control address {text!r}: unknown parameter {sorted(unknown)[0]!r} "
                          "(only tls-hostname)")
    name = query.get("tls-hostname", [u.hostname])[-1] or u.hostname
    return TCPAddress(u.hostname, port, name, text)


def client_context(creds_dir: str | None, address: TCPAddress) -> ssl.SSLContext:
    """The client context for ADDRESS: the server verified against
    ``ca-cert.pem`` and its name checked; ``client-cert.pem`` presented (the
    server always requires one, so its absence is an error here)."""
    from ..nbd.tls import client_context as tls_client_context

    if not creds_dir:
        raise ConfigError(f"control address {address.text}: remote control is TLS with client certificates: "
                          "give --control-tls-creds DIR or set NBDBACKUP_CONTROL_TLS_CREDS")
    for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        if not os.path.exists(os.path.join(creds_dir, name)):
            raise ConfigError(f"--control-tls-creds {creds_dir}: {name} is missing (remote control needs "
                              "ca-cert.pem, client-cert.pem and client-key.pem)")
    return tls_client_context(creds_dir, hostname=address.tls_hostname)


def client_for(text: str, creds_dir: str | None = None, *, timeout: float | None = 10.0):
    """A (not yet connected) `ControlClient` for the address TEXT."""
    from .client import ControlClient

    address = parse_address(text)
    if isinstance(address, str):
        return ControlClient(address, timeout=timeout)
    return ControlClient((address.host, address.port), timeout=timeout, ssl=client_context(creds_dir, address),
                         server_hostname=address.tls_hostname, name=address.text)
