"""Unit tests of the control-socket argument schemas and of command dispatch (no I/O).

Error texts are QEMU's (observed from qemu-storage-daemon 7.2), except that
nested enum members are always named by their full path.
"""

from __future__ import annotations

import asyncio
import errno

import pytest

from nbdbackup.control import schema
from nbdbackup.control.framing import Request
from nbdbackup.control.qmp import CommandError, QMPServer
from nbdbackup.control.remote import FULL, Access
from nbdbackup.control.schema import BOOL, STR, UINT64, Enum, List, struct
from nbdbackup.errors import ConfigError


def err(typ, value, path=""):
    with pytest.raises(CommandError) as ei:
        typ.check(value, path)
    assert ei.value.class_ == "GenericError"
    return ei.value.desc


SET_SPEED = schema.COMMANDS["job-set-speed"]


def test_struct_ok_copies_and_keeps_only_known_members():
    args = {"id": "j", "speed": 5}
    out = SET_SPEED.check(args)
    assert out == args and out is not args


@pytest.mark.parametrize("args, desc", [
    ({"id": "x"}, "Parameter 'speed' is missing"),
    ({"id": "x", "speed": "a"}, "Invalid parameter type for 'speed', expected: integer"),
    ({"id": "x", "speed": 1.5}, "Invalid parameter type for 'speed', expected: integer"),
    ({"id": "x", "speed": True}, "Invalid parameter type for 'speed', expected: integer"),
    ({"id": "x", "speed": -1}, "Parameter 'speed' expects uint64"),
    ({"id": "x", "speed": 1 << 64}, "Parameter 'speed' expects uint64"),
    ({"id": "x", "speed": 1, "zz": 1}, "Parameter 'zz' is unexpected"),
    ({"id": 5, "speed": 1}, "Invalid parameter type for 'id', expected: string"),
])
def test_struct_errors(args, desc):
    assert err(SET_SPEED, args) == desc


def test_uint64_bounds_accepted():
    assert SET_SPEED.check({"id": "x", "speed": (1 << 64) - 1})["speed"] == (1 << 64) - 1
    assert SET_SPEED.check({"id": "x", "speed": 0})["speed"] == 0


def test_bool_enum_list():
    add = schema.COMMANDS["block-dirty-bitmap-add"]
    assert err(add, {"export": "e", "name": "b", "persistent": 1}) == \
        "Invalid parameter type for 'persistent', expected: boolean"
    backup = schema.COMMANDS["backup-start"]
    base = {"export": "e", "job-id": "j", "target": "t"}
    assert err(backup, dict(base, sync="fast")) == "Parameter 'sync' does not accept value 'fast'"
    assert err(backup, dict(base, sync=1)) == "Invalid parameter type for 'sync', expected: string"
    merge = schema.COMMANDS["block-dirty-bitmap-merge"]
    assert err(merge, {"export": "e", "target": "b", "bitmaps": "a"}) == \
        "Invalid parameter type for 'bitmaps', expected: array"
    assert err(merge, {"export": "e", "target": "b", "bitmaps": ["a", 5]}) == \
        "Invalid parameter type for 'bitmaps[1]', expected: string"
    assert err(schema.COMMANDS["query-jobs"], []) == "Invalid parameter type for '', expected: object"


def test_backup_start_full_argument_set():
    args = {"export": "e", "job-id": "j", "sync": "incremental", "target": "/t", "snapshot": "snap",
            "speed": 1, "cluster-size": 65536, "compress": False, "max-workers": 4, "max-chunk": 1 << 20,
            "on-source-error": "report", "on-target-error": "stop", "on-cbw-error": "break-snapshot",
            "cbw-timeout": 30, "auto-dismiss": True, "bitmap": "b0", "bitmap-mode": "on-success"}
    assert schema.COMMANDS["backup-start"].check(args) == args


TRANSACTION = schema.COMMANDS["transaction"]


@pytest.mark.parametrize("args, desc", [
    ({"actions": [{"type": "foo", "data": {}}]}, "Parameter 'actions[0].type' does not accept value 'foo'"),
    ({"actions": [{"type": "block-dirty-bitmap-add", "data": {"export": 1}}]},
     "Invalid parameter type for 'actions[0].data.export', expected: string"),
    ({"actions": [{"type": "block-dirty-bitmap-add", "data": {"export": "n"}}]},
     "Parameter 'actions[0].data.name' is missing"),
    ({"actions": [{"type": "block-dirty-bitmap-add"}]}, "Parameter 'actions[0].data' is missing"),
    ({"actions": [{"data": {}}]}, "Parameter 'actions[0].type' is missing"),
    ({"actions": [{"type": "abort", "data": {}, "x": 1}]}, "Parameter 'actions[0].x' is unexpected"),
    ({"actions": [{"type": "block-dirty-bitmap-add", "data": {"export": "n", "name": "b", "x": 1}}]},
     "Parameter 'actions[0].data.x' is unexpected"),
    ({"actions": [5]}, "Invalid parameter type for 'actions[0]', expected: object"),
    ({"actions": [], "properties": {"completion-mode": "x"}},
     "Parameter 'properties.completion-mode' does not accept value 'x'"),
])
def test_transaction_errors(args, desc):
    assert err(TRANSACTION, args) == desc


def test_transaction_ok():
    args = {"actions": [{"type": "abort", "data": {}},
                        {"type": "block-dirty-bitmap-merge", "data": {"export": "e", "target": "t", "bitmaps": []}}],
            "properties": {"completion-mode": "grouped"}}
    assert TRANSACTION.check(args) == args


def test_every_command_member_has_a_type_and_struct_shorthand():
    s = struct({"a": STR, "*b": List(Enum("x", "y")), "*c": BOOL, "d": UINT64})
    assert s.members["a"] == (STR, False) and s.members["b"][1] is True
    assert s.describe() == "{a: str, *b: [x|y], *c: bool, d: uint64}"
    for name, st in schema.COMMANDS.items():
        assert isinstance(st, schema.Struct), name


# -- dispatch (no sockets: a fake session) ----------------------------------


class FakeSession:
    def __init__(self, negotiated=True, access=FULL):
        self.negotiated = negotiated
        self.access = access


def dispatch(server, name, arguments=None, *, session=None, rid=1):
    session = session or FakeSession()
    return asyncio.run(server.dispatch(session, Request(name, arguments or {}, rid, True)))


def test_access_checked_before_everything_else():
    """A read-only session runs query-* (and negotiates); anything else is refused
    before its arguments are even checked; a refused session negotiates nothing."""
    server = QMPServer()
    ran = []

    async def job_cancel(id: str) -> dict:
        ran.append(id)
        return {}
    server.register("job-cancel", job_cancel)
    read = FakeSession(negotiated=False, access=Access("read", "client certificate 'CN=m'"))
    assert dispatch(server, "qmp_capabilities", session=read) == {"return": {}, "id": 1}
    assert dispatch(server, "query-version", session=read)["return"]["package"].startswith("nbdbackup")
    for args in ({"id": "j1"}, {"bogus": 1}):
        err = dispatch(server, "job-cancel", args, session=read)["error"]
        assert err["class"] == "GenericError" and err["desc"].startswith("command job-cancel is not allowed: "
                                                                         "client certificate 'CN=m' is admitted read-only")
    assert ran == []
    refused = FakeSession(negotiated=False, access=Access("none", "x", "no way"))
    for name in ("qmp_capabilities", "query-version", "job-cancel", "nonexistent"):
        assert dispatch(server, name, session=refused)["error"] == {"class": "GenericError", "desc": "no way"}
    assert not refused.negotiated
    assert dispatch(server, "job-cancel", {"id": "j2"})["return"] == {} and ran == ["j2"]


def test_negotiation_rules():
    server = QMPServer()
    s = FakeSession(negotiated=False)
    assert dispatch(server, "query-version", session=s) == {"id": 1, "error": {
        "class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    assert dispatch(server, "qmp_capabilities", {"enable": ["oob"]}, session=s)["error"]["desc"] == \
        "Capability 'oob' not available"
    assert dispatch(server, "qmp_capabilities", {"enable": "oob"}, session=s)["error"]["desc"] == \
        "Invalid parameter type for 'enable', expected: array"
    assert not s.negotiated
    assert dispatch(server, "qmp_capabilities", session=s) == {"return": {}, "id": 1}
    assert s.negotiated
    assert dispatch(server, "qmp_capabilities", session=s)["error"] == {
        "class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}


def test_builtin_commands_and_unknown_command():
    server = QMPServer(version="1.22.3")
    assert dispatch(server, "query-version")["return"] == {
        "qemu": {"major": 1, "minor": 22, "micro": 3}, "package": "nbdbackup 1.22.3"}
    names = [c["name"] for c in dispatch(server, "query-commands")["return"]]
    assert {"qmp_capabilities", "query-commands", "query-version"} <= set(names)
    assert "quit" not in names
    assert dispatch(server, "quit")["error"] == {"class": "CommandNotFound", "desc": "The command quit has not been found"}


def test_handler_gets_underscored_keywords_and_only_given_optionals():
    server = QMPServer()
    seen = {}

    async def backup_start(*, export, job_id, sync, target, speed=None, auto_dismiss=True, **rest):
        seen.update(export=export, job_id=job_id, sync=sync, target=target, speed=speed,
                    auto_dismiss=auto_dismiss, rest=rest)

    server.register("backup-start", backup_start)
    reply = dispatch(server, "backup-start", {"export": "e", "job-id": "j", "sync": "full", "target": "t",
                                               "cluster-size": 4096})
    assert reply == {"return": {}, "id": 1}
    assert seen == {"export": "e", "job_id": "j", "sync": "full", "target": "t", "speed": None,
                    "auto_dismiss": True, "rest": {"cluster_size": 4096}}
    # Validation happens before the handler: it is not called.
    seen.clear()
    assert dispatch(server, "backup-start", {"export": "e"})["error"]["desc"] == "Parameter 'job-id' is missing"
    assert seen == {}


def test_handler_errors_become_replies():
    server = QMPServer()

    async def h_cmd(*, id):
        raise CommandError("DeviceNotActive", f"Block job '{id}' not found")

    async def h_cfg(*, id):
        raise ConfigError("bad thing")

    async def h_os(*, id):
        raise OSError(errno.ENOSPC, "No space left on device", "/x")

    async def h_bug(*, id):
        raise KeyError("oops")

    async def h_nonjson(*, id):
        return {"x": object()}

    server.register("job-pause", h_cmd)
    server.register("job-resume", h_cfg)
    server.register("job-cancel", h_os)
    server.register("job-dismiss", h_bug)
    server.register("query-jobs", h_nonjson, args={"id": STR})
    assert dispatch(server, "job-pause", {"id": "x"})["error"] == {
        "class": "DeviceNotActive", "desc": "Block job 'x' not found"}
    assert dispatch(server, "job-resume", {"id": "x"})["error"] == {"class": "GenericError", "desc": "bad thing"}
    assert dispatch(server, "job-cancel", {"id": "x"})["error"] == {
        "class": "GenericError", "desc": "/x: No space left on device"}
    e = dispatch(server, "job-dismiss", {"id": "x"})["error"]
    assert e["class"] == "GenericError" and "oops" in e["desc"]
    e = dispatch(server, "query-jobs", {"id": "x"})["error"]
    assert e["class"] == "GenericError"


def test_register_checks_handler_signature():
    server = QMPServer()

    async def missing(*, id):
        pass

    async def needs_default(*, id, speed, extra):
        pass

    def not_async(*, id, speed):
        pass

    with pytest.raises(TypeError, match="speed"):
        server.register("job-set-speed", missing)
    with pytest.raises(TypeError, match="extra"):
        server.register("job-set-speed", needs_default)
    with pytest.raises(TypeError, match="async"):
        server.register("job-set-speed", not_async)
    with pytest.raises(ValueError):
        server.register("qmp_capabilities", missing)


def test_register_with_explicit_schema_and_unknown_name():
    server = QMPServer()

    async def anything(**kw):
        return kw

    server.register("x-echo", anything, args={"a": STR, "*b-c": UINT64})
    assert dispatch(server, "x-echo", {"a": "1", "b-c": 2})["return"] == {"a": "1", "b_c": 2}
    server.register("x-none", anything)  # not in the table: no arguments
    assert dispatch(server, "x-none", {"a": 1})["error"]["desc"] == "Parameter 'a' is unexpected"
