"""Unit tests of the QMP byte-level framing and request checking (no I/O).

Expected messages are QEMU's, as observed from qemu-storage-daemon 7.2.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdbackup.control import framing
from nbdbackup.control.framing import JSONSplitter, ParseError, RequestError, check_request


def feed_in_slices(data: bytes, size: int, splitter: JSONSplitter | None = None) -> list:
    splitter = splitter or JSONSplitter()
    out = []
    for i in range(0, len(data), size):
        out.extend(splitter.feed(data[i:i + size]))
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 7, 10, 1000])
def test_split_objects_in_any_slicing(size):
    data = (b'{"execute": "a", "id": 1}\n'
            b'{"execute": "b"}{"execute": "c", "arguments": {"x": [1, {"y": "}"}]}}\r\n'
            b'  {"execute":\n "d",\n "id": "q\\"}{"}\n')
    assert feed_in_slices(data, size) == [
        {"execute": "a", "id": 1},
        {"execute": "b"},
        {"execute": "c", "arguments": {"x": [1, {"y": "}"}]}},
        {"execute": "d", "id": 'q"}{'},
    ]


def test_partial_text_waits_for_more():
    s = JSONSplitter()
    assert s.feed(b'{"execute": "a", ') == []
    assert s.feed(b'"id": "\\') == []
    assert s.feed(b'u00e9"}') == [{"execute": "a", "id": "é"}]


def test_parse_error_then_recovery():
    out = feed_in_slices(b'{"execute": "x" xx}\n{"execute": "y"}', 3)
    assert isinstance(out[0], ParseError) and out[0].desc.startswith("JSON parse error, ")
    assert out[1] == {"execute": "y"}


def test_stray_closing_bracket_is_one_error():
    out = JSONSplitter().feed(b'}{"execute": "y"}')
    assert out == [ParseError("JSON parse error, expecting value"), {"execute": "y"}]


def test_top_level_scalars_are_values():
    out = JSONSplitter().feed(b'5 "abc" true nul [1,2]{"a":1}')
    assert out[:3] == [5, "abc", True]
    assert isinstance(out[3], ParseError)
    assert out[4:] == [[1, 2], {"a": 1}]


def test_scalar_at_end_of_input_waits_for_a_delimiter():
    s = JSONSplitter()
    assert s.feed(b"12") == []
    assert s.feed(b"3\n") == [123]


def test_invalid_utf8_is_a_parse_error():
    out = JSONSplitter().feed(b'{"execute": "\xff\xfe"}{"execute": "ok"}')
    assert isinstance(out[0], ParseError)
    assert out[1] == {"execute": "ok"}


def test_oversized_message_breaks_the_stream():
    s = JSONSplitter(max_message=100)
    out = s.feed(b'{"execute": "' + b"a" * 200 + b'"}{"execute": "b"}')
    assert len(out) == 1 and isinstance(out[0], ParseError) and "exceeds" in out[0].desc
    assert s.broken
    assert s.feed(b'{"execute": "c"}') == []


def test_too_deep_nesting_breaks_the_stream():
    s = JSONSplitter(max_depth=8)
    assert s.feed(b"[" * 8 + b"]" * 8) == [[[[[[[[[]]]]]]]]]
    out = s.feed(b"[" * 9)
    assert out == [ParseError("JSON parse error, too many nested data structures")]
    assert s.broken


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), min_size=1, max_size=5),
       st.integers(1, 13), st.sampled_from(["", " ", "\n", "\r\n", "\t \n"]), st.booleans())
def test_split_roundtrip_property(objects, size, sep, ascii_only):
    data = sep.join(json.dumps(o, ensure_ascii=ascii_only) for o in objects).encode()
    assert feed_in_slices(data, size) == objects


def test_encode_is_one_crlf_terminated_line():
    wire = framing.encode({"return": {"a": "x\ny"}, "id": 1})
    assert wire.endswith(b"\r\n") and wire.count(b"\n") == 1
    assert json.loads(wire) == {"return": {"a": "x\ny"}, "id": 1}
    with pytest.raises(ValueError):
        framing.encode({"x": float("nan")})


# -- request checking ------------------------------------------------------


def test_check_request_ok():
    r = check_request({"execute": "query-jobs", "arguments": {"a": 1}, "id": {"x": [1]}})
    assert (r.name, r.arguments, r.id, r.has_id) == ("query-jobs", {"a": 1}, {"x": [1]}, True)
    r = check_request({"execute": "query-jobs"})
    assert (r.arguments, r.id, r.has_id) == ({}, None, False)
    assert check_request({"execute": "q", "id": None}).has_id


@pytest.mark.parametrize("obj, desc, has_id", [
    ([1, 2], "QMP input must be a JSON object", False),
    ("abc", "QMP input must be a JSON object", False),
    ({"id": 8}, "QMP input lacks member 'execute'", True),
    ({"execute": 5, "id": 9}, "QMP input member 'execute' must be a string", True),
    ({"execute": "q", "arguments": [], "id": 10}, "QMP input member 'arguments' must be an object", True),
    ({"execute": "q", "id": 7, "foo": 1}, "QMP input member 'foo' is unexpected", True),
    ({"exec-oob": "q", "id": 2}, "QMP input member 'exec-oob' is unexpected", True),
    ({"execute": "q", "exec-oob": "q"}, "QMP input member 'exec-oob' is unexpected", False),
])
def test_check_request_errors(obj, desc, has_id):
    with pytest.raises(RequestError) as ei:
        check_request(obj)
    assert ei.value.class_ == "GenericError"
    assert ei.value.desc == desc
    assert ei.value.has_id == has_id
    if has_id:
        assert ei.value.id == obj["id"]


def test_replies_and_events_shapes():
    assert framing.reply_return(None, 3, True) == {"return": {}, "id": 3}
    assert framing.reply_return([1]) == {"return": [1]}
    assert framing.reply_error("GenericError", "boom", None, True) == {
        "id": None, "error": {"class": "GenericError", "desc": "boom"}}
    assert framing.reply_error("CommandNotFound", "x") == {"error": {"class": "CommandNotFound", "desc": "x"}}
    ev = framing.event_message("JOB_STATUS_CHANGE", {"id": "j", "status": "running"}, 1700000000.25)
    assert ev == {"timestamp": {"seconds": 1700000000, "microseconds": 250000},
                  "event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "running"}}
    assert "data" not in framing.event_message("STOP", None, 1.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 17))
def test_arbitrary_bytes_never_raise(data, size):
    """Garbage yields JSON values and ParseErrors only (never an exception), and
    `check_request` answers every value with a Request or a RequestError."""
    s = JSONSplitter(max_message=200, max_depth=16)
    out = feed_in_slices(data, size, s)
    assert all(isinstance(x, ParseError) or x is None or isinstance(x, (dict, list, str, int, float, bool))
               for x in out)
    for x in out:
        if not isinstance(x, ParseError):
            try:
                check_request(x)
            except RequestError:
                pass
