"""Unit tests of `nbdbackup.control.remote` (no I/O): the access decision per
client certificate, the read-only rule, address parsing, and serve's
configuration checks (those that fail before any credentials are loaded)."""

from __future__ import annotations

import pytest

from nbdbackup.control import schema
from nbdbackup.control.remote import FULL, ControlAuthz, TCPAddress, parse_address, server_config
from nbdbackup.errors import ConfigError


def cert(*rdns: tuple[str, str]) -> dict:
    """``getpeercert()``'s shape: subject RDNs, least specific first."""
    return {"subject": tuple(((k, v),) for k, v in rdns)}


AUTHZ = ControlAuthz(full=("CN=backup-agent-*",), read=("CN=monitor-*", "*,O=Ops"))


def test_classify_by_subject():
    full = AUTHZ.classify(cert(("commonName", "backup-agent-7")))
    assert full.level == "full" and full.refusal("job-cancel") is None
    read = AUTHZ.classify(cert(("commonName", "monitor-2")))
    assert read.level == "read"
    # Patterns see the RFC 4514 string, most specific first.
    assert AUTHZ.classify(cert(("organizationName", "Ops"), ("commonName", "bob"))).level == "read"
    # Full wins when both match; matching is case-sensitive.
    both = ControlAuthz(full=("CN=a",), read=("CN=a",)).classify(cert(("commonName", "a")))
    assert both.level == "full"
    assert AUTHZ.classify(cert(("commonName", "Backup-Agent-1"))).level == "none"


def test_refusals_name_the_command_and_the_subject():
    read = AUTHZ.classify(cert(("commonName", "monitor-2")))
    for name in ("qmp_capabilities", "query-jobs", "query-block-exports", "query-export-stats", "query-bitmaps",
                 "query-commands", "query-version"):
        assert read.refusal(name) is None, name
    for name in ("backup-start", "job-cancel", "job-dismiss", "job-set-speed", "block-export-add",
                 "block-dirty-bitmap-clear", "transaction"):
        why = read.refusal(name)
        assert why is not None and f"command {name} is not allowed" in why and "'CN=monitor-2'" in why \
            and "read-only" in why, why
    none = AUTHZ.classify(cert(("commonName", "intruder")))
    assert none.level == "none"
    assert none.refusal("qmp_capabilities") == none.refusal("query-jobs") == (
        "client certificate 'CN=intruder' is not allowed by --control-authz or --control-authz-read")
    assert AUTHZ.classify(None).refusal("query-jobs") == "a client certificate is required"
    assert FULL.refusal("transaction") is None


def test_hostile_subject_is_bounded_and_escaped():
    why = AUTHZ.classify(cert(("commonName", "A" * 5000 + "\n\x1b[31m"))).refusal("query-jobs")
    assert len(why) < 400 and "\n" not in why and "\x1b" not in why


def test_every_query_in_the_table_is_read_only():
    assert {n for n in schema.COMMANDS if schema.is_read_only(n)} == {
        "qmp_capabilities", "query-jobs", "query-block-exports", "query-export-stats", "query-bitmaps",
        "query-commands", "query-version"}


@pytest.mark.parametrize("text,expected", [
    ("/run/ctl.sock", "/run/ctl.sock"),
    ("ctl.sock", "ctl.sock"),
    ("qmps://127.0.0.1:4444", TCPAddress("127.0.0.1", 4444, "127.0.0.1", "qmps://127.0.0.1:4444")),
    ("tcp://backup.example:4444/", TCPAddress("backup.example", 4444, "backup.example", "tcp://backup.example:4444/")),
    ("qmps://[::1]:4444", TCPAddress("::1", 4444, "::1", "qmps://[::1]:4444")),
    ("qmps://10.0.0.5:4444?tls-hostname=backup.example",
     TCPAddress("10.0.0.5", 4444, "backup.example", "qmps://10.0.0.5:4444?tls-hostname=backup.example")),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text,message", [
    ("qmps://127.0.0.1", "expected qmps://HOST:PORT"),
    ("qmps://:4444", "expected qmps://HOST:PORT"),
    ("qmps://h:99999", "expected qmps://HOST:PORT"),
    ("qmps://h:1/path", "expected qmps://HOST:PORT"),
    ("qmps://h:1?tls-certificates=/x", "unknown parameter 'tls-certificates'"),
    ("http://h:1", "unknown scheme 'http'"),
])
def test_parse_address_errors(text, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        parse_address(text)


@pytest.mark.parametrize("listens,creds,full,read,message", [
    ([("127.0.0.1", 1)], None, ["*"], [], "needs --control-tls-creds DIR"),
    ([("127.0.0.1", 1)], "/x", [], [], "needs --control-authz PATTERN and/or --control-authz-read"),
    ([], "/x", [], [], "need --control-listen"),
    ([], None, [], ["CN=a"], "need --control-listen"),
    ([("127.0.0.1", 1)], "/nonexistent/pki", ["*"], [], "--control-tls-creds: .* does not exist"),
])
def test_server_config_errors(listens, creds, full, read, message):
    with pytest.raises(ConfigError, match=message):
        server_config(listens, creds, full, read)


def test_no_remote_control_without_listen():
    assert server_config([], None, [], []) is None
