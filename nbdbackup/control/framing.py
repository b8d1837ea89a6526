"""QMP wire framing, without I/O: bytes in, JSON values out; messages in, bytes out.

Role: the sans-IO half of the control socket, shared by the server
(`control.qmp`) and the client (`control.client`).

Framing (QEMU's behaviour, checked against qemu-storage-daemon 7.2):
- Input is a stream of JSON texts, NOT lines: ``{..}{..}`` on one line are two
  messages, one object may span lines, whitespace between texts is ignored.
  `JSONSplitter` finds top-level text boundaries by tracking strings (with
  escapes) and bracket depth, then hands each complete text to `json.loads`.
- A text that does not parse yields one ``JSON parse error, ...`` error and the
  stream carries on after it; a stray ``}`` or ``]`` at top level is such a
  text on its own.
- A text longer than `MAX_MESSAGE` bytes or nested deeper than `MAX_DEPTH`
  poisons the stream (`JSONSplitter.broken`): the owner replies with the error
  and closes the connection (a peer that sends that is not a QMP client).
- Output: one JSON text per message terminated by ``\\r\\n`` (QEMU does the
  same; line-oriented readers such as qemu.qmp rely on it).

Request checking (`check_request`) follows QEMU's order and wording:
non-object -> ``QMP input must be a JSON object``; a member other than
``execute``/``arguments``/``id`` -> ``QMP input member 'x' is unexpected``
(``exec-oob`` included: we never offer the oob capability); ``execute`` not a
string, ``arguments`` not an object -> ``... must be ...``; no ``execute`` ->
``QMP input lacks member 'execute'``.  The request ``id`` may be any JSON
value and is echoed verbatim in the reply (when it could be read).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .schema import CommandError

#: Largest accepted JSON text, bytes.
MAX_MESSAGE = 1 << 20
#: Deepest accepted nesting of objects/arrays (below Python's recursion limit).
MAX_DEPTH = 256

_OPEN = b"{["
_CLOSE = b"}]"
_NOT_WS = re.compile(rb"[^ \t\r\n]")
_SCALAR_DELIM = re.compile(rb'[ \t\r\n{}\[\],:"]')
_STRING_SPECIAL = re.compile(rb'["\\]')
_STRUCT_SPECIAL = re.compile(rb'["{}\[\]]')


@dataclass(frozen=True, slots=True)
class ParseError:
    """One input text that is not valid JSON; ``desc`` is the QMP error message."""

    desc: str


class JSONSplitter:
    """Incremental splitter of a byte stream into top-level JSON values.

    `feed` returns, in stream order, each complete value (any JSON type) or a
    `ParseError`.  State between calls: the partial text ``_buf`` and the
    scanner's position inside it (string/escape flags, bracket depth).
    """

    def __init__(self, *, max_message: int = MAX_MESSAGE, max_depth: int = MAX_DEPTH) -> None:
        self.max_message = max_message
        self.max_depth = max_depth
        #: Set once the stream violated a hard limit; `feed` then returns nothing.
        self.broken = False
        self._buf = bytearray()  # the text being collected ('' between texts)
        self._depth = 0  # open brackets in _buf
        self._in_string = False  # inside a "..." in _buf
        self._escape = False  # previous byte was a backslash inside a string
        self._scalar = False  # collecting a bare top-level scalar (number, keyword)

    def feed(self, data: bytes) -> list[Any]:
        out: list[Any] = []
        if self.broken:
            return out
        buf = self._buf
        i, n = 0, len(data)
        # Jump from one interesting byte to the next (regex), copying the runs
        # in between in bulk: a 1 MiB text costs milliseconds, not a second.
        while i < n:
            if not buf:
                # Between texts: skip whitespace, start a text otherwise.
                m = _NOT_WS.search(data, i)
                if m is None:
                    break
                i = m.end()
                b = data[m.start()]
                if b in _CLOSE:
                    out.append(ParseError("JSON parse error, expecting value"))
                    continue
                buf.append(b)
                if b in _OPEN:
                    self._depth = 1
                elif b == 0x22:  # '"'
                    self._in_string = True
                else:
                    self._scalar = True
            elif self._scalar:
                m = _SCALAR_DELIM.search(data, i)
                if m is None:
                    buf += data[i:]
                    i = n
                else:
                    # The delimiter is scanned again as the start of the next text.
                    buf += data[i:m.start()]
                    i = m.start()
                    out.append(self._finish())
                    continue
            elif self._in_string:
                if self._escape:
                    buf.append(data[i])
                    i += 1
                    self._escape = False
                    continue
                m = _STRING_SPECIAL.search(data, i)
                if m is None:
                    buf += data[i:]
                    i = n
                else:
                    buf += data[i:m.end()]
                    i = m.end()
                    if data[m.start()] == 0x5C:  # backslash: the next byte is escaped
                        self._escape = True
                    else:
                        self._in_string = False
                        if self._depth == 0:
                            out.append(self._finish())
                            continue
            else:
                m = _STRUCT_SPECIAL.search(data, i)
                if m is None:
                    buf += data[i:]
                    i = n
                else:
                    buf += data[i:m.end()]
                    i = m.end()
                    b = data[m.start()]
                    if b == 0x22:
                        self._in_string = True
                    elif b in _OPEN:
                        self._depth += 1
                        if self._depth > self.max_depth:
                            self.broken = True
                            out.append(ParseError("JSON parse error, too many nested data structures"))
                            return out
                    else:
                        self._depth -= 1
                        if self._depth == 0:
                            out.append(self._finish())
                            continue
            if len(buf) > self.max_message:
                self.broken = True
                out.append(ParseError(f"JSON parse error, message exceeds {self.max_message} bytes"))
                return out
        return out

    def _finish(self) -> Any:
        text = bytes(self._buf)
        self._buf.clear()
        self._depth = 0
        self._in_string = self._escape = self._scalar = False
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            return ParseError(f"JSON parse error, {msg}")


def encode(msg: Any) -> bytes:
    """One message on the wire: compact JSON text plus CRLF."""
    return json.dumps(msg, allow_nan=False).encode() + b"\r\n"


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed ``execute`` request.  ``has_id`` tells ``id: null`` from no id."""

    name: str
    arguments: dict
    id: Any = None
    has_id: bool = False


class RequestError(CommandError):
    """A malformed request; carries the request id when it could be read."""

    def __init__(self, desc: str, id: Any = None, has_id: bool = False) -> None:
        super().__init__("GenericError", desc)
        self.id = id
        self.has_id = has_id


def check_request(obj: Any) -> Request:
    """Check a parsed input value is a QMP ``execute`` request (see module docstring)."""
    if not isinstance(obj, dict):
        raise RequestError("QMP input must be a JSON object")
    has_id = "id" in obj
    rid = obj.get("id")
    for key, value in obj.items():
        if key == "execute":
            if not isinstance(value, str):
                raise RequestError("QMP input member 'execute' must be a string", rid, has_id)
        elif key == "arguments":
            if not isinstance(value, dict):
                raise RequestError("QMP input member 'arguments' must be an object", rid, has_id)
        elif key != "id":
            raise RequestError(f"QMP input member '{key}' is unexpected", rid, has_id)
    if "execute" not in obj:
        raise RequestError("QMP input lacks member 'execute'", rid, has_id)
    return Request(obj["execute"], obj.get("arguments", {}), rid, has_id)


def reply_return(value: Any, rid: Any = None, has_id: bool = False) -> dict:
    msg: dict = {"return": {} if value is None else value}
    if has_id:
        msg["id"] = rid
    return msg


def reply_error(class_: str, desc: str, rid: Any = None, has_id: bool = False) -> dict:
    msg: dict = {}
    if has_id:
        msg["id"] = rid
    msg["error"] = {"class": class_, "desc": desc}
    return msg


def event_message(name: str, data: Any, timestamp: float) -> dict:
    """An asynchronous event; ``data`` is omitted when None (as QEMU does)."""
    seconds = int(timestamp)
    msg: dict = {
        "timestamp": {"seconds": seconds, "microseconds": int((timestamp - seconds) * 1_000_000)},
        "event": name,
    }
    if data is not None:
        msg["data"] = data
    return msg
