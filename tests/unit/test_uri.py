"""Unit tests of NBD URI parsing (`nbd.uri`), following uri.md as libnbd/QEMU read it."""

from __future__ import annotations

import pytest

from nbdbackup.errors import ConfigError
from nbdbackup.nbd.uri import NBDURI, parse_uri


@pytest.mark.parametrize(
    "uri, expect",
    [
        ("nbd://example.com", NBDURI("tcp", "", "example.com", 10809)),
        ("nbd://example.com/", NBDURI("tcp", "", "example.com", 10809)),
        ("nbd://example.com/disk", NBDURI("tcp", "disk", "example.com", 10809)),
        ("nbd://127.0.0.1:10810/a/b", NBDURI("tcp", "a/b", "127.0.0.1", 10810)),
        ("nbd://h//abs", NBDURI("tcp", "/abs", "h", 10809)),  # one '/' removed only
        ("nbd://h/with%20space%2Fslash", NBDURI("tcp", "with space/slash", "h", 10809)),
        ("nbd://[::1]:1234/e", NBDURI("tcp", "e", "::1", 1234)),
        ("NBD://h/e", NBDURI("tcp", "e", "h", 10809)),
        ("nbd+unix:///?socket=/tmp/s.sock", NBDURI("unix", "", socket="/tmp/s.sock")),
        ("nbd+unix:///exp?socket=/tmp/s.sock", NBDURI("unix", "exp", socket="/tmp/s.sock")),
        ("nbd+unix:///exp?socket=%2Ftmp%2Fa%20b", NBDURI("unix", "exp", socket="/tmp/a b")),
        ("nbd+unix:///e?socket=/s&tls=off", NBDURI("unix", "e", socket="/s")),  # unknown params ignored
        ("nbd+unix:?socket=/s", NBDURI("unix", "", socket="/s")),
        ("nbds://h/e", NBDURI("tcp", "e", "h", 10809, tls=True)),
        ("nbds+unix:///e?socket=/s&tls-certificates=/etc/pki/nbd",
         NBDURI("unix", "e", socket="/s", tls=True, tls_certificates="/etc/pki/nbd")),
        ("nbds://h:1/e?tls-verify-peer=false&tls-hostname=srv.example",
         NBDURI("tcp", "e", "h", 1, tls=True, tls_verify_peer=False, tls_hostname="srv.example")),
    ],
)
def test_parse(uri, expect):
    assert parse_uri(uri) == expect


@pytest.mark.parametrize(
    "uri, match",
    [
        ("http://h/e", "scheme"),
        ("nbds+vsock://1/e", "vsock"),
        ("nbds://h/e?tls-psk-file=/k", "TLS-PSK"),
        ("nbds://alice@h/e", "TLS-PSK"),
        ("nbd://h/e?tls-certificates=/d", "need the nbds"),
        ("nbds://h/e?tls-verify-peer=maybe", "true or false"),
        ("nbd+vsock://1/e", "vsock"),
        ("nbd+unix:///e", "socket=PATH"),
        ("nbd+unix://host/e?socket=/s", "takes no host"),
        ("nbd:///e", "missing host"),
        ("nbd://h/e?socket=/s", "nbd\\+unix"),
        ("nbd://h:99999/e", "bad NBD URI"),
        ("nbd://h:abc/e", "bad NBD URI"),
        ("nbd://user@h/e", "user name"),
        ("nbd://h/e#frag", "fragment"),
        ("nbd+unix:///e?socket=/a&socket=/b", "twice"),
        ("nbd://h/" + "x" * 5000, "longer than"),
    ],
)
def test_reject(uri, match):
    with pytest.raises(ConfigError, match=match):
        parse_uri(uri)


@pytest.mark.parametrize(
    "uri",
    ["nbd://h/e", "nbd://h:1/e%20x", "nbd://[::1]/e", "nbd+unix:///e?socket=/tmp/x.sock", "nbd+unix:///?socket=/s",
     "nbds+unix:///e?socket=/s&tls-certificates=/d", "nbds://h/e?tls-verify-peer=false&tls-hostname=x"],
)
def test_str_round_trips(uri):
    u = parse_uri(uri)
    assert parse_uri(str(u)) == u


def test_server_hostname():
    assert parse_uri("nbds://srv:1/e").server_hostname == "srv"
    assert parse_uri("nbds+unix:///e?socket=/s").server_hostname is None
    assert parse_uri("nbds+unix:///e?socket=/s&tls-hostname=srv").server_hostname == "srv"
