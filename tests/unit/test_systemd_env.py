"""The systemd environment protocol, parsed without I/O (`nbdbackup.systemd`).

sd_listen_fds(3): LISTEN_PID must be ours, LISTEN_FDS counts fds from 3,
LISTEN_FDNAMES names them; malformed values are errors; the variables are
removed once read.  sd_notify(3): NOTIFY_SOCKET paths and '@' abstract names,
WATCHDOG_USEC/WATCHDOG_PID, the datagram format.
"""

from __future__ import annotations

import pytest

from nbdbackup.errors import ConfigError
from nbdbackup.systemd import (
    ListenFd,
    Notifier,
    format_notify,
    parse_listen_env,
    parse_notify_socket,
    parse_watchdog_env,
    take_listen_fds,
)

PID = 4242


def env(**kw: str) -> dict:
    return dict(kw)


# ------------------------------------------------------------- LISTEN_*


def test_no_listen_pid_means_no_activation():
    assert parse_listen_env({}, PID) == []
    assert parse_listen_env(env(LISTEN_FDS="2"), PID) == []


def test_listen_pid_of_another_process_is_ignored():
    assert parse_listen_env(env(LISTEN_PID=str(PID + 1), LISTEN_FDS="2"), PID) == []
    # even with names that would be wrong for us
    assert parse_listen_env(env(LISTEN_PID="1", LISTEN_FDS="1", LISTEN_FDNAMES="a:b"), PID) == []


def test_listen_fds_count_from_three_named_unknown():
    got = parse_listen_env(env(LISTEN_PID=str(PID), LISTEN_FDS="3"), PID)
    assert got == [ListenFd(3, "unknown"), ListenFd(4, "unknown"), ListenFd(5, "unknown")]


@pytest.mark.parametrize("fds", [None, "0"])
def test_zero_or_unset_listen_fds(fds):
    e = env(LISTEN_PID=str(PID))
    if fds is not None:
        e["LISTEN_FDS"] = fds
        e["LISTEN_FDNAMES"] = ""
    assert parse_listen_env(e, PID) == []


def test_fdnames_map_in_order():
    got = parse_listen_env(env(LISTEN_PID=str(PID), LISTEN_FDS="3",
                               LISTEN_FDNAMES="nbd:control:nbdbackup.socket"), PID)
    assert got == [ListenFd(3, "nbd"), ListenFd(4, "control"), ListenFd(5, "nbdbackup.socket")]


@pytest.mark.parametrize("names", ["nbd", "nbd:control:x", ""])
def test_fdnames_count_must_match(names):
    with pytest.raises(ConfigError, match="LISTEN_FDNAMES"):
        parse_listen_env(env(LISTEN_PID=str(PID), LISTEN_FDS="2", LISTEN_FDNAMES=names), PID)


@pytest.mark.parametrize("name", ["", "tab\tname", "x" * 256, "caf\u00e9"])
def test_fdnames_systemd_would_refuse(name):
    with pytest.raises(ConfigError, match="bad name"):
        parse_listen_env(env(LISTEN_PID=str(PID), LISTEN_FDS="2", LISTEN_FDNAMES=f"ok:{name}"), PID)


def test_longest_valid_fdname():
    got = parse_listen_env(env(LISTEN_PID=str(PID), LISTEN_FDS="1", LISTEN_FDNAMES="n" * 255), PID)
    assert got == [ListenFd(3, "n" * 255)]


@pytest.mark.parametrize("var,value", [
    ("LISTEN_PID", ""), ("LISTEN_PID", "abc"), ("LISTEN_PID", "-1"), ("LISTEN_PID", " 4242"),
    ("LISTEN_PID", "\u0664\u0662"),  # Arabic-Indic digits: str.isdigit() but not a pid
    ("LISTEN_FDS", ""), ("LISTEN_FDS", "two"), ("LISTEN_FDS", "-2"), ("LISTEN_FDS", "1.0"),
    ("LISTEN_FDS", "100000"),
])
def test_malformed_values_are_errors(var, value):
    e = env(LISTEN_PID=str(PID), LISTEN_FDS="1")
    e[var] = value
    with pytest.raises(ConfigError, match=var):
        parse_listen_env(e, PID)


@pytest.mark.parametrize("e", [
    env(LISTEN_PID=str(PID + 1), LISTEN_FDS="1", LISTEN_FDNAMES="x"),  # another process's
    env(LISTEN_PID="junk", LISTEN_FDS="1"),                            # malformed
    env(LISTEN_PID=str(PID), LISTEN_FDS="0"),                          # ours, but nothing passed
])
def test_take_unsets_the_variables_whatever_they_said(e):
    e["OTHER"] = "kept"
    try:
        assert take_listen_fds(e, PID) == []
    except ConfigError:
        pass
    assert e == {"OTHER": "kept"}


# ------------------------------------------------------------- sd_notify


@pytest.mark.parametrize("value,addr", [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@sd-notify/123", "\0sd-notify/123"),
    ("", None),
    ("@", None),
    ("relative/path", None),
    ("vsock:2:1234", None),
])
def test_notify_socket_addresses(value, addr):
    assert parse_notify_socket({"NOTIFY_SOCKET": value}) == addr


def test_no_notify_socket_disables_the_notifier():
    n = Notifier({}, PID)
    assert not n.enabled and n.watchdog_interval is None
    assert n.notify("READY=1") is False


@pytest.mark.parametrize("e,period", [
    ({}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "x"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(PID)}, 0.5),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(PID + 1)}, None),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "junk"}, None),
])
def test_watchdog_env(e, period):
    assert parse_watchdog_env(e, PID) == period


def test_watchdog_pings_at_half_the_period_and_only_with_a_notify_socket():
    e = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000"}
    assert Notifier(e, PID).watchdog_interval == 1.0
    del e["NOTIFY_SOCKET"]
    assert Notifier(e, PID).watchdog_interval is None


def test_format_notify():
    assert format_notify("READY=1", STATUS="serving 2 export(s)", MAINPID=PID) == \
        b"READY=1\nSTATUS=serving 2 export(s)\nMAINPID=4242"
    assert format_notify("STOPPING=1") == b"STOPPING=1"


@pytest.mark.parametrize("fields,named", [(("READY=1\nX=1",), {}), (("READY",), {}), ((), {"STATUS": "a\nb"})])
def test_format_notify_refuses_what_would_break_the_framing(fields, named):
    with pytest.raises(ValueError):
        format_notify(*fields, **named)
