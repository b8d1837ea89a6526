"""Adaptive compression (`agent.codec.Compression`): which zstd level a chunk gets.

A repository whose setting is ``zstd`` (no level: the default of ``repo init``)
stores a full backup's chunks at level 3 and an incremental's at level 1; a
``zstd:LEVEL`` repository stores every chunk at LEVEL; ``none`` compresses
nothing.  Checked on the stored bytes themselves: a chunk's zstd frame must be
byte for byte the frame zstandard makes at the expected level (the data is
chosen so that levels 1 and 3 give different frames), and every chunk reads
back whatever level wrote it.
"""

from __future__ import annotations

import json

import pytest
import zstandard

from nbdbackup.agent.codec import (AEAD, AUTO_FULL_LEVEL, AUTO_INCREMENTAL_LEVEL, NONCE, TAG, ZSTD, Codec,
                                   Compression, parse_compression)
from nbdbackup.agent.repo import CONFIG, DirStore, Repository, _chunk_key

C = 256 * 1024  # above codec.PROBE_MIN: the probe runs as for real chunks
KEY = bytes(range(32))


def _text(seed: int) -> bytes:
    """C bytes of file-system-like text (compressible; levels 1 and 3 differ on it)."""
    out = b"".join(b"line %d of %d: value=%x path=/usr/share/%d\n" % (i, seed, i * i % 65521, i % 97)
                   for i in range(C // 20))
    return out[:C]


def _frame(data: bytes, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def test_the_levels_of_each_setting():
    auto = parse_compression("zstd")
    assert auto.adaptive and auto.name == "zstd"
    assert (auto.level(False), auto.level(True)) == (AUTO_FULL_LEVEL, AUTO_INCREMENTAL_LEVEL) == (3, 1)
    assert (auto.level_name(False), auto.level_name(True)) == ("zstd:3", "zstd:1")
    fixed = parse_compression("zstd:3")
    assert not fixed.adaptive and fixed.name == "zstd:3" and fixed.level(False) == fixed.level(True) == 3
    assert parse_compression("zstd:19").level(True) == 19
    off = parse_compression("none")
    assert off.name == "none" and off.level(False) is None and off.level(True) is None
    assert off.level_name(True) == "none"
    for text in ("zstd", "zstd:1", "zstd:3", "zstd:22", "none"):
        assert parse_compression(text).name == text  # config.json round trip
    assert Compression.of(5) == Compression(5, 5) and Compression.of(None) == Compression(None, None)
    assert Compression.of(auto) is auto
    assert "adaptive" in auto.describe() and "fixed" in fixed.describe()


def test_codec_encodes_at_the_level_asked():
    data = _text(1)
    f1, f3 = _frame(data, 1), _frame(data, 3)
    assert f1 != f3  # the data tells the levels apart
    c = Codec(level=3)
    assert c.encode("k", data)[2:] == f3  # the codec's own level
    assert c.encode("k", data, level=1)[2:] == f1
    assert bytes(c.encode_reused("k", data, level=1)[2:]) == f1
    assert bytes(c.encode_reused("k", data)[2:]) == f3
    assert c.encode("k", data, level=None) == bytes((0xB2, 0)) + data  # None: not compressed
    assert c.decode("k", c.encode("k", data, level=1), C) == data


@pytest.mark.parametrize("encryption", ["none", "keyfile"])
def test_adaptive_repository_full_level_3_incremental_level_1(tmp_path, encryption):
    st = DirStore(str(tmp_path / "r"))
    kw = dict(encryption="keyfile", kdf="none", key_file=str(tmp_path / "k")) if encryption != "none" else {}
    repo = Repository.init(st, C, **kw)  # the default setting: adaptive
    assert json.loads(st.get(CONFIG))["compression"] == "zstd"
    repo = Repository.open(st, key_file=kw.get("key_file"))
    assert repo.compression == Compression.auto()
    full, incr = _text(1), _text(2)
    d_full, d_incr = repo.chunk_id(full), repo.chunk_id(incr)
    assert repo.put_chunk(d_full, full)  # a full backup's chunk (the default)
    assert repo.put_chunk(d_incr, incr, incremental=True)
    for d, data, level in ((d_full, full, 3), (d_incr, incr, 1)):
        blob = st.get(_chunk_key(d))
        frame = _frame(data, level)
        if encryption == "none":
            assert blob[1] == ZSTD and blob[2:] == frame
        else:  # same frame inside: the envelope's size says which
            assert blob[1] == ZSTD | AEAD and len(blob) == 2 + NONCE + len(frame) + TAG
            assert repo.codec.decode(_chunk_key(d), blob, C) == data
            other = _frame(data, 4 - level)
            assert len(other) != len(frame)
        assert repo.get_chunk(d, C) == data  # both levels read back, nothing to know


@pytest.mark.parametrize("setting,level", [("zstd:3", 3), ("zstd:1", 1), ("zstd:7", 7)])
def test_fixed_level_is_used_for_incrementals_too(tmp_path, setting, level):
    st = DirStore(str(tmp_path / "r"))
    Repository.init(st, C, compression=parse_compression(setting))
    assert json.loads(st.get(CONFIG))["compression"] == setting
    repo = Repository.open(st)
    for incremental, data in ((False, _text(3)), (True, _text(4))):
        d = repo.chunk_id(data)
        repo.put_chunk(d, data, incremental=incremental)
        assert st.get(_chunk_key(d))[2:] == _frame(data, level)


def test_no_compression_stays_raw_for_incrementals(tmp_path):
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C, compression=None)
    assert json.loads(st.get(CONFIG))["compression"] == "none"
    data = _text(5)
    d = repo.chunk_id(data)
    repo.put_chunk(d, data, incremental=True)
    assert st.get(_chunk_key(d)) == bytes((0xB2, 0)) + data


def test_an_older_fixed_config_keeps_its_level(tmp_path):
    """A repository made before the adaptive setting says "zstd:3": both kinds at 3."""
    st = DirStore(str(tmp_path / "r"))
    Repository.init(st, C, compression=3)
    assert json.loads(st.get(CONFIG))["compression"] == "zstd:3"
    assert Repository.open(st).compression == Compression(3, 3, adaptive=False)
