"""Unit tests of `agent.repo`: the directory store, dedup, corruption detection, gc and locks."""

from __future__ import annotations

import asyncio
import os

import pytest

from nbdbackup.agent.manifest import Manifest, digest, zero_digest
from nbdbackup.agent.repo import CorruptChunk, DirStore, Repository, SnapshotImage
from nbdbackup.errors import ConfigError

C = 64 * 1024


def manifest_of(data: bytes, chunk: int = C) -> Manifest:
    m = Manifest(len(data), chunk)
    m.chunks = [digest(data[o:o + n]) for o, n in map(m.chunk_range, range(m.count))]
    return m


def store_image(repo: Repository, name: str, data: bytes, parent: str | None = None) -> Manifest:
    m = manifest_of(data, repo.chunk_size)
    for i, d in enumerate(m.chunks):
        o, n = m.chunk_range(i)
        repo.put_chunk(d, data[o:o + n])
    repo.save_snapshot(name, m, parent=parent)
    return m


def test_init_open_and_refusals(tmp_path):
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    assert Repository.open(st).chunk_size == C
    with pytest.raises(ConfigError, match="already holds"):
        Repository.init(st, C)
    with pytest.raises(ConfigError, match="not a repository"):
        Repository.open(DirStore(str(tmp_path / "nothing")))
    with pytest.raises(ConfigError, match="bad snapshot name"):
        repo.save_snapshot("../x", Manifest(0, C))
    with pytest.raises(ConfigError, match="chunk size"):
        repo.save_snapshot("x", Manifest(0, 2 * C))


def test_dedup_zero_chunks_snapshots_and_image(tmp_path):
    repo = Repository.init(DirStore(str(tmp_path / "r")), C)
    a = b"\x01" * C + bytes(C) + b"\x01" * C + b"\x02" * (C // 2)  # repeated chunk, a zero chunk, short tail
    m = store_image(repo, "s0", a)
    assert len(repo.stored()) == 2  # 0x01 chunk once, tail; no zero chunk
    b = a[: 2 * C] + b"\x03" * C + a[3 * C:]
    store_image(repo, "s1", b, parent="s0")
    assert len(repo.stored()) == 3 and repo.snapshots() == ["s0", "s1"]
    assert repo.load_snapshot("s0").chunks == m.chunks
    assert repo.snapshot_info("s1")["parent"] == "s0"
    img = SnapshotImage(repo, repo.load_snapshot("s1"))
    buf = bytearray(len(b))
    asyncio.run(img.pread(memoryview(buf), 0))
    assert bytes(buf) == b
    ext = asyncio.run(img.extents(0, len(b)))
    assert [(e.offset, e.length, e.flags) for e in ext] == [(0, C, 0), (C, C, 3), (2 * C, 2 * C - C // 2, 0)]
    assert repo.verify() == []


def test_corruption_and_missing_chunks_are_reported(tmp_path):
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    m = store_image(repo, "s0", b"\x05" * C + b"\x06" * C)
    key = f"chunks/{m.chunks[1].hex()[:2]}/{m.chunks[1].hex()}"
    path = os.path.join(st.root, *key.split("/"))
    with open(path, "r+b") as f:
        f.write(b"\x07")
    assert repo.verify() == [("s0", 1, "does not match its blake3 digest")]
    with pytest.raises(CorruptChunk):
        repo.get_chunk(m.chunks[1], C)
    os.unlink(path)
    assert repo.verify(["s0"]) == [("s0", 1, "missing")]
    assert repo.get_chunk(zero_digest(C), C) == bytes(C)


def test_gc_keeps_what_snapshots_use(tmp_path):
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    store_image(repo, "s0", b"\x01" * C + b"\x02" * C)
    store_image(repo, "s1", b"\x01" * C + b"\x03" * C)
    repo.delete_snapshot("s0")
    with st.lock(exclusive=True):
        assert repo.gc() == (1, 2)  # the 0x02 chunk goes; 0x01 (shared) and 0x03 stay
        with pytest.raises(ConfigError, match="busy"):
            with st.lock(exclusive=False):
                pass
    assert repo.verify() == []
    with pytest.raises(ConfigError, match="no snapshot"):
        repo.delete_snapshot("s0")
