"""Access control for NBD connections: who may negotiate at all.

Role: one policy, checked by `nbd.server` at two moments and turned into
`ServerConnection.deny` (every option but ABORT then gets ERR_POLICY with the
reason, so a refused client learns why instead of seeing a dropped socket):

- Unix socket connections, when the policy lists users or groups: the
  peer's credentials (SO_PEERCRED) must match one of ``unix_uids`` or
  ``unix_gids``.  TCP connections are not subject to this (use TLS).
- TLS connections, when the policy lists ``tls_authz`` patterns: after the
  TLS handshake the client certificate's subject, written as an RFC 4514
  string (most specific first: ``CN=client,O=Example,C=GB``, as QEMU's
  ``authz`` objects see it), must match one of the glob patterns
  (``fnmatch``, case-sensitive).  A server with patterns always requires a
  client certificate (verify-peer), since without one there is nothing to
  match.

Invariant: an empty policy allows everything; checks never raise, they
return the reason for a refusal or None.
"""

from __future__ import annotations

import fnmatch
import grp
import pwd
import socket
import struct
from dataclasses import dataclass, field

from ..errors import ConfigError
from .logsafe import clip

#: Short names for the attributes Python's ssl spells out.
_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "localityName": "L",
          "stateOrProvinceName": "ST", "countryName": "C", "domainComponent": "DC", "userId": "UID",
          "streetAddress": "STREET"}


def subject_dn(cert: dict | None) -> str | None:
    """RFC 4514 form of ``ssl.SSLSocket.getpeercert()``'s subject, or None."""
    if not cert or "subject" not in cert:
        return None
    rdns = []
    for rdn in reversed(cert["subject"]):
        parts = []
        for key, value in rdn:
            v = value.replace("\\", "\\\\").replace(",", "\\,").replace("+", "\\+")
            parts.append(f"{_SHORT.get(key, key)}={v}")
        rdns.append("+".join(parts))
    return ",".join(rdns)


def subject_matches(dn: str, patterns) -> bool:
    """Whether the RFC 4514 subject DN matches one of the glob PATTERNS
    (``fnmatch``, case-sensitive) -- the one rule ``--tls-authz`` and the
    control socket's ``--control-authz``/``--control-authz-read`` share."""
    return any(fnmatch.fnmatchcase(dn, pat) for pat in patterns)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a Unix socket's peer, or None when unavailable."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    return struct.unpack("3i", raw)


def _parse_id(text: str, lookup, field: str, what: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return getattr(lookup(text), field)
    except KeyError:
        raise ConfigError(f"no such {what} {text!r}") from None


def parse_user(text: str) -> int:
    """A uid from a number or a user name."""
    return _parse_id(text, pwd.getpwnam, "pw_uid", "user")


def parse_group(text: str) -> int:
    """A gid from a number or a group name."""
    return _parse_id(text, grp.getgrnam, "gr_gid", "group")


@dataclass(frozen=True)
class AccessPolicy:
    """Fields: ``unix_uids`` / ``unix_gids`` (allowed Unix peers; both empty =
    any); ``tls_authz`` (glob patterns for client certificate subjects;
    empty = any certificate the TLS layer accepted)."""

    unix_uids: frozenset[int] = field(default_factory=frozenset)
    unix_gids: frozenset[int] = field(default_factory=frozenset)
    tls_authz: tuple[str, ...] = ()

    @property
    def limits_unix(self) -> bool:
        return bool(self.unix_uids or self.unix_gids)

    def check_unix(self, creds: tuple[int, int, int] | None) -> str | None:
        if not self.limits_unix:
            return None
        if creds is None:
            return "the peer's credentials are unknown, and this server admits only listed users"
        _, uid, gid = creds
        if uid in self.unix_uids or gid in self.unix_gids:
            return None
        return f"uid {uid} / gid {gid} is not allowed on this socket"

    def check_certificate(self, cert: dict | None) -> str | None:
        if not self.tls_authz:
            return None
        dn = subject_dn(cert)
        if dn is None:
            return "a client certificate is required"
        if subject_matches(dn, self.tls_authz):
            return None
        # The subject comes from the client (CA-signed, so longer than the usual
        # clip allows, but still its text): escaped and bounded for the log.
        return f"client certificate {clip(dn, 256)} is not authorized"
