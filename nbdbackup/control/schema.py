"""Control-socket argument schemas: a tiny declarative type system and THE command table.

Role: every QMP command's arguments are checked here, once, at the edge (the
server calls `Struct.check` before any handler runs), with QEMU's wording so
that scripts written against QEMU read familiar errors:

- ``Parameter 'x' is missing``
- ``Parameter 'x' is unexpected``
- ``Invalid parameter type for 'x', expected: integer``  (string, boolean, array, object)
- ``Parameter 'x' expects uint64``                       (integer out of range)
- ``Parameter 'x' does not accept value 'foo'``          (enum)

Nested members are named by path: ``actions[0].data.name``, ``bitmaps[1]``.
(QEMU names enum members inside unions without their path; we always give the
full path.)  JSON ``true``/``false`` is never an integer, ``1.0`` is never an
integer.

Invariants:
- `check` never mutates its input; it returns a fresh, validated copy holding
  only members the schema knows.  Absent optional members stay absent (handlers
  own their defaults, documented below).
- A schema is a value: immutable after construction, shared freely.

Shorthand: `struct({...})` builds a `Struct` from a dict whose keys are member
names, optional ones prefixed with ``*`` (the QAPI convention).

The command table (`COMMANDS`; the server applies it to a handler registered
without an explicit ``args``).  Handlers are ``async def handler(**kwargs)``
with each top-level member name's ``-`` turned into ``_`` (``job-id`` ->
``job_id``); nested objects keep their JSON names.  A handler returning
``None`` replies ``{}``.

==========================  =====================================================  ======================
command                     arguments (``*`` = optional)                           returns
==========================  =====================================================  ======================
backup-start                export: str, job-id: str,                              {}
                            sync: full|top|none|incremental|bitmap,
                            target: str (a SPEC, see blockdev.open_spec),
                            *snapshot: str (name of the snapshot export),
                            *speed: uint64 (bytes/s, 0 = unlimited),
                            *cluster-size: uint64, *compress: bool,
                            *max-workers: uint64, *max-chunk: uint64,
                            *on-source-error / *on-target-error:
                            report|ignore|enospc|stop|auto,
                            *on-cbw-error: break-guest-write|break-snapshot,
                            *cbw-timeout: uint64 (seconds, 0 = none),
                            *auto-dismiss: bool,
                            *bitmap: str,
                            *bitmap-mode: on-success|never|always,
                            *scratch: str (a SPEC; docs/scratch.md),
                            *scratch-limit: uint64 (bytes),
                            *discard-source: bool, *snapshot-trim: bool
query-jobs                  (none)                                                 [JobInfo]
job-pause, job-resume,      id: str                                                {}
job-cancel, job-dismiss
job-set-speed               id: str, speed: uint64                                 {}
query-block-exports         (none)                                                 [ExportInfo]
query-export-stats          (none)                                                 [ExportStats]
block-export-add            name: str, spec: str, *read-only: bool,                {}
                            *description: str (sent to NBD clients; default none)
block-export-del            name: str, *mode: safe|hard                            {}
block-dirty-bitmap-add      export: str, name: str, *granularity: uint64,          {}
                            *persistent: bool, *disabled: bool
block-dirty-bitmap-remove,  export: str, name: str                                 {}
-clear, -enable, -disable
block-dirty-bitmap-merge    export: str, target: str, bitmaps: [str]               {}
query-bitmaps               export: str                                            [BitmapInfo]
transaction                 actions: [{type: ACTION, data: {...}}],                {}
                            *properties: {*completion-mode: individual|grouped}
==========================  =====================================================  ======================

Transaction ACTION is ``abort`` (data ``{}``: always fails, for testing
rollback), ``backup-start`` or one of the ``block-dirty-bitmap-*`` commands
except ``query-bitmaps``; its ``data`` is checked against that command's
arguments above.

Return shapes the CLI relies on (extra members are fine, shown as-is):

- JobInfo: ``{"id": str, "type": "backup", "status": JobStatus,
  "current-progress": int, "total-progress": int, "speed"?: int,
  "error"?: str}``; JobStatus is QEMU's: undefined, created, running, paused,
  ready, standby, waiting, pending, aborting, concluded, null.  ``error`` is
  present exactly when a concluded job failed or was cancelled (QEMU says
  ``Operation canceled`` for the latter).
- ExportInfo: ``{"name": str, "spec"?: str, "description"?: str, "read-only": bool,
  "size"?: int, "snapshot"?: bool}`` (``spec`` is for the local admin only; NBD
  clients see ``description``).
- BitmapInfo: ``{"name": str, "granularity": int, "count": int,
  "recording": bool, "persistent": bool, "busy"?: bool}``.

Events the engine emits (`QMPServer.emit`), QEMU's names and members:

- ``JOB_STATUS_CHANGE`` ``{"id", "status"}`` on every status transition.
- ``BLOCK_JOB_COMPLETED`` ``{"device": job id, "id": job id, "type": "backup",
  "len", "offset", "speed", "error"?}`` when a job finishes (error iff it failed),
  emitted BEFORE its ``JOB_STATUS_CHANGE`` to ``concluded``.
- ``BLOCK_JOB_CANCELLED`` ``{"device", "type", "len", "offset", "speed"}``,
  same position, for a cancelled job.
- QEMU 7.2's order for a cancelled job, which ``nbdbackup job wait`` is tested
  against: JOB_STATUS_CHANGE aborting, BLOCK_JOB_CANCELLED, JOB_STATUS_CHANGE
  concluded (then null once dismissed).  Consumers match BLOCK_JOB_* events by
  ``id``, falling back to ``device``.
- ``BLOCK_JOB_ERROR`` ``{"device", "id", "operation": "read"|"write",
  "action": "ignore"|"report"|"stop"}`` when an I/O error meets an error policy.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import NBDBackupError

UINT64_MAX = (1 << 64) - 1
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


class CommandError(NBDBackupError):
    """A QMP command failed: ``class_`` is the QMP error class, ``desc`` the message.

    Raised by handlers (any class QEMU uses: GenericError, CommandNotFound,
    DeviceNotFound, DeviceNotActive...) and by `ControlClient.execute` when the
    server refused a command.  ``str(e)`` is ``desc``.
    """

    def __init__(self, class_: str, desc: str) -> None:
        super().__init__(desc)
        self.class_ = class_
        self.desc = desc


def _invalid(path: str, expected: str) -> CommandError:
    return CommandError("GenericError", f"Invalid parameter type for '{path}', expected: {expected}")


class Type:
    """A schema type: `check(value, path)` returns the validated value or raises `CommandError`."""

    #: JSON type named in "expected: ..." messages.
    json_name = "value"

    def check(self, value: Any, path: str) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return self.json_name


class _Scalar(Type):
    """A JSON scalar of one Python type (``bool`` is not an ``int`` here: see `_Int`)."""

    def __init__(self, py_type: type, json_name: str, short: str) -> None:
        self.py_type, self.json_name, self.short = py_type, json_name, short

    def check(self, value: Any, path: str) -> Any:
        if not isinstance(value, self.py_type):
            raise _invalid(path, self.json_name)
        return value

    def describe(self) -> str:
        return self.short


class _Any(Type):
    def check(self, value: Any, path: str) -> Any:
        return value

    def describe(self) -> str:
        return "any"


class Int(Type):
    """An integer in ``[minimum, maximum]``; out of range reads "expects LABEL"."""

    json_name = "integer"

    def __init__(self, minimum: int, maximum: int, label: str) -> None:
        assert minimum <= maximum
        self.minimum = minimum
        self.maximum = maximum
        self.label = label

    def check(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _invalid(path, "integer")
        if not self.minimum <= value <= self.maximum:
            raise CommandError("GenericError", f"Parameter '{path}' expects {self.label}")
        return value

    def describe(self) -> str:
        return self.label


class Enum(Type):
    """A string out of a fixed set."""

    json_name = "string"

    def __init__(self, *values: str) -> None:
        assert values and all(isinstance(v, str) for v in values)
        self.values = tuple(values)

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise _invalid(path, "string")
        if value not in self.values:
            raise CommandError("GenericError", f"Parameter '{path}' does not accept value '{value}'")
        return value

    def describe(self) -> str:
        return "|".join(self.values)


class List(Type):
    """A JSON array of one item type."""

    json_name = "array"

    def __init__(self, item: Type) -> None:
        self.item = item

    def check(self, value: Any, path: str) -> list:
        if not isinstance(value, list):
            raise _invalid(path, "array")
        return [self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def describe(self) -> str:
        return f"[{self.item.describe()}]"


class Struct(Type):
    """A JSON object with named members, each required or optional.

    ``members`` maps name -> (type, optional).  At top level (``path == ""``)
    member paths are bare names; below, ``path.name``.
    """

    json_name = "object"

    def __init__(self, members: Mapping[str, tuple[Type, bool]]) -> None:
        self.members = dict(members)

    def check(self, value: Any, path: str = "") -> dict:
        if not isinstance(value, dict):
            raise _invalid(path, "object")
        prefix = f"{path}." if path else ""
        out = {}
        for name, (typ, optional) in self.members.items():
            if name in value:
                out[name] = typ.check(value[name], prefix + name)
            elif not optional:
                raise CommandError("GenericError", f"Parameter '{prefix}{name}' is missing")
        for name in value:
            if name not in self.members:
                raise CommandError("GenericError", f"Parameter '{prefix}{name}' is unexpected")
        return out

    def describe(self) -> str:
        parts = [f"{'*' if opt else ''}{name}: {typ.describe()}" for name, (typ, opt) in self.members.items()]
        return "{" + ", ".join(parts) + "}"


class Union(Type):
    """QEMU's legacy ``{"type": NAME, "data": {...}}`` union (transaction actions)."""

    json_name = "object"

    def __init__(self, variants: Mapping[str, Struct]) -> None:
        self.variants = dict(variants)
        self._tag = Enum(*self.variants)

    def check(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise _invalid(path, "object")
        if "type" not in value:
            raise CommandError("GenericError", f"Parameter '{path}.type' is missing")
        tag = self._tag.check(value["type"], f"{path}.type")
        if "data" not in value:
            raise CommandError("GenericError", f"Parameter '{path}.data' is missing")
        data = self.variants[tag].check(value["data"], f"{path}.data")
        for name in value:
            if name not in ("type", "data"):
                raise CommandError("GenericError", f"Parameter '{path}.{name}' is unexpected")
        return {"type": tag, "data": data}

    def describe(self) -> str:
        return "{type: " + self._tag.describe() + ", data: {...}}"


STR: Type = _Scalar(str, "string", "str")
BOOL: Type = _Scalar(bool, "boolean", "bool")
ANY: Type = _Any()
UINT64 = Int(0, UINT64_MAX, "uint64")
INT64 = Int(INT64_MIN, INT64_MAX, "int64")
UINT32 = Int(0, (1 << 32) - 1, "uint32_t")


def struct(members: Mapping[str, Type]) -> Struct:
    """Build a `Struct` from ``{"name": T, "*optional": T}``."""
    out = {}
    for key, typ in members.items():
        assert isinstance(typ, Type), key
        optional = key.startswith("*")
        out[key[1:] if optional else key] = (typ, optional)
    return Struct(out)


NO_ARGS = struct({})

ERROR_POLICY = Enum("report", "ignore", "enospc", "stop", "auto")
SYNC_MODE = Enum("full", "top", "none", "incremental", "bitmap")
CBW_ERROR_POLICY = Enum("break-guest-write", "break-snapshot")
BITMAP_MODE = Enum("on-success", "never", "always")
JOB_ID = struct({"id": STR})
BITMAP_REF = struct({"export": STR, "name": STR})

BACKUP_START = struct({
    "export": STR,
    "job-id": STR,
    "sync": SYNC_MODE,
    "target": STR,
    "*snapshot": STR,
    "*speed": UINT64,
    "*cluster-size": UINT64,
    "*compress": BOOL,
    "*max-workers": UINT64,
    "*max-chunk": UINT64,
    "*on-source-error": ERROR_POLICY,
    "*on-target-error": ERROR_POLICY,
    "*on-cbw-error": CBW_ERROR_POLICY,
    "*cbw-timeout": UINT64,
    "*auto-dismiss": BOOL,
    "*bitmap": STR,
    "*bitmap-mode": BITMAP_MODE,
    "*scratch": STR,
    "*scratch-limit": UINT64,
    "*discard-source": BOOL,
    "*snapshot-trim": BOOL,
})

BITMAP_ADD = struct({"export": STR, "name": STR, "*granularity": UINT64, "*persistent": BOOL, "*disabled": BOOL})
BITMAP_MERGE = struct({"export": STR, "target": STR, "bitmaps": List(STR)})

#: Transaction action types and the schema of their ``data``.
TRANSACTION_ACTIONS: dict[str, Struct] = {
    "abort": NO_ARGS,
    "backup-start": BACKUP_START,
    "block-dirty-bitmap-add": BITMAP_ADD,
    "block-dirty-bitmap-remove": BITMAP_REF,
    "block-dirty-bitmap-clear": BITMAP_REF,
    "block-dirty-bitmap-enable": BITMAP_REF,
    "block-dirty-bitmap-disable": BITMAP_REF,
    "block-dirty-bitmap-merge": BITMAP_MERGE,
}

TRANSACTION = struct({
    "actions": List(Union(TRANSACTION_ACTIONS)),
    "*properties": struct({"*completion-mode": Enum("individual", "grouped")}),
})

#: THE command table: name -> argument schema (see the module docstring).
COMMANDS: dict[str, Struct] = {
    "backup-start": BACKUP_START,
    "query-jobs": NO_ARGS,
    "job-pause": JOB_ID,
    "job-resume": JOB_ID,
    "job-cancel": JOB_ID,
    "job-dismiss": JOB_ID,
    "job-set-speed": struct({"id": STR, "speed": UINT64}),
    "query-block-exports": NO_ARGS,
    "query-export-stats": NO_ARGS,
    "block-export-add": struct({"name": STR, "spec": STR, "*read-only": BOOL, "*description": STR}),
    "block-export-del": struct({"name": STR, "*mode": Enum("safe", "hard")}),
    "block-dirty-bitmap-add": BITMAP_ADD,
    "block-dirty-bitmap-remove": BITMAP_REF,
    "block-dirty-bitmap-clear": BITMAP_REF,
    "block-dirty-bitmap-enable": BITMAP_REF,
    "block-dirty-bitmap-disable": BITMAP_REF,
    "block-dirty-bitmap-merge": BITMAP_MERGE,
    "query-bitmaps": struct({"export": STR}),
    "transaction": TRANSACTION,
    # Built into the server (`QMPServer` registers them itself).
    "qmp_capabilities": struct({"*enable": List(Enum("oob"))}),
    "query-commands": NO_ARGS,
    "query-version": NO_ARGS,
}


def is_read_only(name: str) -> bool:
    """Whether command NAME only reads state, so a client admitted read-only
    (``serve --control-authz-read``) may run it: ``qmp_capabilities`` and
    every ``query-*`` command (``query-jobs``, ``query-block-exports``,
    ``query-export-stats``, ``query-bitmaps``, ``query-commands``,
    ``query-version``).

    Invariant: a handler registered under a ``query-`` name never changes
    state -- this name rule is the whole of the read-only policy.
    """
    return name == "qmp_capabilities" or name.startswith("query-")
