"""`nbdbackup serve` against libnbd's tools: nbdinfo (--list, --map, --json) and nbdcopy."""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

import peers

pytestmark = pytest.mark.interop

KiB, MiB = 1024, 1024 * 1024
HOLE_ZERO = 3  # base:allocation HOLE|ZERO


def run(*argv: str, timeout: float = 60) -> str:
    peers.require(argv[0])
    r = subprocess.run(list(argv), capture_output=True, text=True, errors="replace", timeout=timeout)
    assert r.returncode == 0, f"{' '.join(argv)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def merged_map(entries: list[dict]) -> list[tuple[int, int, int]]:
    """nbdinfo --map --json entries as (offset, length, type), adjacent equal types merged."""
    out: list[tuple[int, int, int]] = []
    for e in entries:
        off, length, typ = e["offset"], e["length"], e["type"]
        if out and out[-1][2] == typ and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, typ)
        else:
            out.append((off, length, typ))
    return out


@pytest.fixture
def sparse_image(short_tmp, make_image):
    """4 MiB sparse file: data at 0-64k and 1M-1.5M, holes elsewhere."""
    return make_image(short_tmp / "sparse.img", 4 * MiB, [(0xAB, 0, 64 * KiB), (0xCD, 1 * MiB, 512 * KiB)])


def test_nbdinfo_list_shows_every_export_with_size(sparse_image, serve):
    with serve(f"disk={sparse_image}", "mem=memory:8M", f"ro=ro:{sparse_image}") as srv:
        info = json.loads(run("nbdinfo", "--list", "--json", srv.uri))
        sizes = {e["export-name"]: e["export-size"] for e in info["exports"]}
        assert sizes == {"disk": 4 * MiB, "mem": 8 * MiB, "ro": 4 * MiB}
        ro = next(e for e in info["exports"] if e["export-name"] == "ro")
        assert ro["is_read_only"] is True
        text = run("nbdinfo", "--list", srv.uri)
        for name in ("disk", "mem", "ro"):
            assert f'export="{name}":' in text, text


def test_nbdinfo_map_shows_holes_and_data_exactly(sparse_image, serve):
    with serve(f"disk={sparse_image}") as srv:
        entries = json.loads(run("nbdinfo", "--map", "--json", srv.uri_for("disk")))
    assert merged_map(entries) == [
        (0, 64 * KiB, 0),
        (64 * KiB, 1 * MiB - 64 * KiB, HOLE_ZERO),
        (1 * MiB, 512 * KiB, 0),
        (1536 * KiB, 4 * MiB - 1536 * KiB, HOLE_ZERO),
    ]


def test_nbdinfo_map_memory_export_after_writes(serve):
    with serve("mem=memory:4M") as srv:
        uri = srv.uri_for("mem")
        # nbdsh is `#!/usr/bin/env python3`: run its module with Debian's python.
        run("/usr/bin/python3", "-m", "nbd", "-u", uri, "-c", "h.pwrite(b'x' * 65536, 2 * 1048576)")
        entries = json.loads(run("nbdinfo", "--map", "--json", uri))
    assert merged_map(entries) == [
        (0, 2 * MiB, HOLE_ZERO),
        (2 * MiB, 64 * KiB, 0),
        (2 * MiB + 64 * KiB, 2 * MiB - 64 * KiB, HOLE_ZERO),
    ]


def test_nbdinfo_json_flags(sparse_image, serve):
    with serve(f"disk={sparse_image}", f"ro=ro:{sparse_image}", "mem=memory:1M") as srv:
        disk = json.loads(run("nbdinfo", "--json", srv.uri_for("disk")))
        ro = json.loads(run("nbdinfo", "--json", srv.uri_for("ro")))
    d = disk["exports"][0]
    assert d["export-size"] == 4 * MiB
    assert d["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache"):
        assert d[flag] is True, (flag, d)
    assert "base:allocation" in d.get("contexts", []), d
    r = ro["exports"][0]
    assert r["is_read_only"] is True
    assert r["can_trim"] is False and r["can_zero"] is False, r


def _random_image(path, size: int, seed: int) -> None:
    """Random data with some zero runs (so nbdcopy's zero detection is exercised)."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        pos = 0
        while pos < size:
            n = min(size - pos, rnd.choice([4 * KiB, 64 * KiB, 256 * KiB, 1 * MiB]))
            f.write(bytes(n) if rnd.random() < 0.3 else rnd.randbytes(n))
            pos += n


def test_nbdcopy_from_export(sparse_image, short_tmp, serve, blake3_file):
    out = short_tmp / "copy.img"
    with serve(f"disk={sparse_image}") as srv:
        run("nbdcopy", srv.uri_for("disk"), str(out))
    assert blake3_file(out) == blake3_file(sparse_image)


@pytest.mark.parametrize("connections", [1, 4])
def test_nbdcopy_to_export_and_back(short_tmp, serve, blake3_file, connections):
    size = 16 * MiB
    src = short_tmp / "src.img"
    _random_image(src, size, seed=connections)
    target = short_tmp / "target.img"
    with open(target, "wb") as f:
        f.truncate(size)
        f.seek(5 * MiB)
        f.write(b"\xff" * MiB)  # stale data that must be overwritten (with zeroes, maybe)
    back = short_tmp / "back.img"
    with serve(f"disk={target}") as srv:
        uri = srv.uri_for("disk")
        info = json.loads(run("nbdinfo", "--json", uri))
        assert info["exports"][0]["can_multi_conn"] is True
        run("nbdcopy", f"--connections={connections}", "--requests=16", str(src), uri)
        run("nbdcopy", f"--connections={connections}", uri, str(back))
    assert srv.returncode == 0, srv.log()
    want = blake3_file(src)
    assert blake3_file(back) == want
    assert blake3_file(target) == want
    assert os.path.getsize(target) == size


def test_nbdcopy_memory_to_memory_between_exports(serve, short_tmp, blake3_file):
    src = short_tmp / "src.img"
    _random_image(src, 8 * MiB, seed=7)
    back = short_tmp / "back.img"
    with serve("a=memory:8M", "b=memory:8M") as srv:
        run("nbdcopy", "--connections=4", str(src), srv.uri_for("a"))
        run("nbdcopy", "--connections=4", srv.uri_for("a"), srv.uri_for("b"))
        run("nbdcopy", srv.uri_for("b"), str(back))
    assert blake3_file(back) == blake3_file(src)
