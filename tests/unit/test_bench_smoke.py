"""Smoke test of the bench/ harness: it imports, and its pure parts compute right.

No timing and no speed assertion here (speed targets are not tests): only the
bookkeeping -- sizes, medians, ratios (including lower-is-better metrics),
the table and JSON shapes, py-spy stack aggregation, server command lines --
on made-up numbers.  Nothing is started, nothing is written.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        mods = {n: importlib.import_module(n) for n in ("common", "servers", "run_all")}
    finally:
        sys.path.remove(str(BENCH))
    return mods


def test_parse_size(bench):
    ps = bench["common"].parse_size
    assert ps("1G") == 1 << 30
    assert ps("512M") == 512 << 20
    assert ps("64KiB") == 64 << 10
    assert ps("4096") == 4096
    assert ps("1.5k") == 1536


def _fake_results(common):
    r = common.Results("fake")
    r.add_metric(common.Metric("read", "MB/s"))
    r.add_metric(common.Metric("latency", "s", higher_is_better=False))
    for v in (100.0, 300.0, 200.0):
        r.add("read", "ours", v)
    for v in (400.0, 400.0, 100.0):
        r.add("read", "peer", v)
    r.add("latency", "ours", 2.0)
    r.add("latency", "peer", 1.0)
    r.add_error("read", "peer", "boom")
    return r


def test_median_and_ratios(bench):
    common = bench["common"]
    r = _fake_results(common)
    assert r.med("read", "ours") == 200.0
    assert r.med("read", "peer") == 400.0
    assert r.ratio("read", "ours", "peer") == pytest.approx(0.5)
    # lower is better: ours takes twice as long -> 0.5x
    assert r.ratio("latency", "ours", "peer") == pytest.approx(0.5)
    assert r.ratio("read", "ours", "absent") is None
    assert r.med("read", "absent") is None


def test_table_and_json(bench):
    common = bench["common"]
    r = _fake_results(common)
    text = common.format_table(r, ["ours", "peer"], "ours")
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "unit", "ours", "peer", "ours/peer"]
    read_row = next(line for line in lines if line.startswith("read"))
    assert read_row.split() == ["read", "MB/s", "200", "400", "0.50x"]
    md = common.format_table(r, ["ours", "peer"], "ours", markdown=True)
    assert md.splitlines()[0].startswith("| metric | unit | ours | peer | ours/peer |")
    j = json.loads(json.dumps(r.to_json("ours")))
    assert j["metrics"]["read"]["samples"]["ours"] == [100.0, 300.0, 200.0]
    assert j["metrics"]["read"]["median"]["peer"] == 400.0
    assert j["metrics"]["read"]["ratio"]["ours/peer"] == pytest.approx(0.5)
    assert j["metrics"]["read"]["errors"] == {"peer": ["boom"]}
    assert j["metrics"]["latency"]["higher_is_better"] is False


def test_profile_aggregation(bench):
    common = bench["common"]
    text = ("main;loop;read 6\n"
            "main;loop;write 3\n"
            "main;rec;rec 1\n"
            "garbage line\n")
    agg = common.aggregate_collapsed_text(text)
    assert agg["total"] == 10
    assert agg["self"] == {"read": 6, "write": 3, "rec": 1}
    assert agg["inclusive"]["main"] == 10
    assert agg["inclusive"]["loop"] == 9
    assert agg["inclusive"]["rec"] == 1  # recursion counted once per stack
    out = common.format_profile(agg, top=2)
    assert "60.0%  read" in out
    lines = ("main (a.py:1);f (a.py:10) 2\n"
             "main (a.py:1);f (a.py:12) 3\n")
    by_line = common.aggregate_collapsed_text(lines)
    assert by_line["self"] == {"f (a.py:10)": 2, "f (a.py:12)": 3}
    by_fn = common.aggregate_collapsed_text(lines, by_function=True)
    assert by_fn["self"] == {"f (a.py)": 5}
    assert by_fn["inclusive"]["main (a.py)"] == 5


def test_server_command_lines(bench, tmp_path):
    servers, common = bench["servers"], bench["common"]
    ws = common.Workspace()
    ws.path = tmp_path
    for name in servers.SERVERS:
        argv, ep = servers.server_argv(name, "/img", ws, None)
        assert ep.unix and ep.uri == f"nbd+unix:///disk?socket={ep.unix}"
        assert "/img" in " ".join(argv)
        argv, ep = servers.server_argv(name, "/img", ws, 12345)
        assert ep.tcp == ("127.0.0.1", 12345) and ep.uri == "nbd://127.0.0.1:12345/disk"
        assert "12345" in " ".join(argv)
    with pytest.raises(ValueError):
        servers.server_argv("nope", "/img", ws, None)
    assert set(servers.DEFAULT_METRICS) <= set(servers.METRICS)


def test_run_all_finds_benches(bench):
    names = [p.stem for p in bench["run_all"].bench_scripts()]
    assert "servers" in names
    assert "common" not in names and "run_all" not in names
