"""Unit tests of the pull agent's pure parts: chunk manifests and range arithmetic."""

from __future__ import annotations

import json
import random

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdbackup.agent.manifest import Manifest, digest, zero_digest
from nbdbackup.agent.pull import _intersect, _ranges, _split
from nbdbackup.blockdev.base import Extent
from nbdbackup.errors import ConfigError


def test_geometry_and_root(tmp_path):
    m = Manifest(10 * 4096 + 100, 8192)
    assert m.count == 6 and m.chunk_range(5) == (40960, 100)
    assert list(m.chunks_of(8191, 2)) == [0, 1] and list(m.chunks_of(0, 0)) == []
    data = random.Random(1).randbytes(m.size)
    m.chunks = [digest(data[o:o + n]) for o, n in map(m.chunk_range, range(m.count))]
    assert m.root == blake3.blake3(b"".join(m.chunks)).digest()
    p = tmp_path / "m.json"
    m.save(str(p))
    back = Manifest.load(str(p))
    assert back == m and back.differences(m) == []
    other = Manifest(m.size, m.chunk_size, list(m.chunks))
    other.chunks[3] = zero_digest(8192)
    assert m.differences(other) == [3]
    assert zero_digest(100) == blake3.blake3(bytes(100)).digest()


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(format="x"), "not an"),
    (lambda d: d.update(version=2), "not an"),
    (lambda d: d.update(chunks=d["chunks"][:-1]), "chunk digests for"),
    (lambda d: d["chunks"].__setitem__(0, "zz" * 32), "not hex"),
    (lambda d: d["chunks"].__setitem__(0, "00" * 31), "not 32 bytes"),
    (lambda d: d["chunks"].__setitem__(0, "00" * 32), "root digest does not match"),
    (lambda d: d.update(chunk_size=1000), "multiple of 4096"),
])
def test_load_rejects_damage(tmp_path, mutate, message):
    m = Manifest(3 * 4096, 4096, [digest(bytes([i]) * 4096) for i in range(3)])
    doc = m.to_json()
    mutate(doc)
    p = tmp_path / "m.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=message):
        Manifest.load(str(p))


def test_ranges_merges_matching_extents():
    ext = [Extent(0, 10, 0), Extent(10, 5, 0), Extent(15, 5, 3), Extent(20, 1, 0)]
    assert _ranges(ext, lambda f: f == 0) == [(0, 15), (20, 1)]
    assert _ranges(ext, lambda f: f == 3) == [(15, 5)]


ranges_st = st.lists(st.tuples(st.integers(0, 200), st.integers(1, 30)), max_size=8).map(
    lambda rs: _ranges([Extent(o, n, 0) for o, n in _disjoint(rs)], lambda f: True))


def _disjoint(rs):
    out, pos = [], 0
    for gap, n in rs:
        out.append((pos + gap, n))
        pos += gap + n
    return out


def _bytes_of(rs):
    return {b for o, n in rs for b in range(o, o + n)}


@given(ranges_st, ranges_st)
def test_intersect_is_set_intersection(a, b):
    got = _intersect(a, b)
    assert _bytes_of(got) == _bytes_of(a) & _bytes_of(b)
    assert all(n > 0 for _, n in got) and got == sorted(got)


@given(ranges_st, st.integers(0, 300), st.integers(0, 300))
def test_split_clips(a, s, e):
    s, e = min(s, e), max(s, e)
    assert _bytes_of(_split(a, s, e)) == {x for x in _bytes_of(a) if s <= x < e}
