"""Unit tests of `nbd.access`: certificate subjects as RFC 4514 strings and the policy checks."""

from __future__ import annotations

import os
import socket

import pytest

from nbdbackup.errors import ConfigError
from nbdbackup.nbd.access import AccessPolicy, parse_user, peer_credentials, subject_dn

CERT = {"subject": ((("countryName", "GB"),), (("organizationName", "Example, Ltd"),),
                    (("commonName", "agent1"), ("userId", "7")))}


def test_subject_dn_is_rfc4514_most_specific_first():
    assert subject_dn(CERT) == "CN=agent1+UID=7,O=Example\\, Ltd,C=GB"
    assert subject_dn(None) is None and subject_dn({}) is None


def test_certificate_patterns():
    p = AccessPolicy(tls_authz=("CN=agent?+UID=7,*", "CN=admin,O=Example*"))
    assert p.check_certificate(CERT) is None
    assert "not authorized" in p.check_certificate({"subject": ((("commonName", "agent12"),),)})
    assert "required" in p.check_certificate(None)
    assert AccessPolicy().check_certificate(None) is None  # no patterns: the TLS layer decides


def test_unix_credentials():
    p = AccessPolicy(unix_uids=frozenset({1000}), unix_gids=frozenset({50}))
    assert p.check_unix((1, 1000, 9)) is None and p.check_unix((1, 5, 50)) is None
    assert "uid 5 / gid 9" in p.check_unix((1, 5, 9))
    assert "unknown" in p.check_unix(None)
    assert AccessPolicy().check_unix(None) is None


def test_peer_credentials_of_a_socketpair():
    a, b = socket.socketpair()
    with a, b:
        assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())


def test_parse_user():
    assert parse_user("0") == 0 and parse_user("root") == 0
    with pytest.raises(ConfigError, match="no such user"):
        parse_user("no-such-user-here")
