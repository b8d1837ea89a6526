"""The restore's and the full backup's fast paths: decoding into buffers, O_DIRECT writes, probes.

- `Codec.decode_into` gives what `Codec.decode` gives, with the same refusals;
  `Codec.encode_reused` what `Codec.encode` gives; the compressibility probe
  skips random data and never a chunk with a compressible run long enough to pay;
- `Repository.get_chunk_into` on a directory store: the same bytes and the same
  `CorruptChunk` errors as `get_chunk` (flipped byte, missing, oversized object);
- the memcmp zero test (`_zero_flags`, writable buffers) agrees with the
  plain comparison (read-only buffers);
- `restore` into a `FileDev` (a file in tmp_path), with O_DIRECT and without,
  also of a disk whose size is not a multiple of 4096: identical; a damaged
  chunk still names its byte range; the default workers per store kind.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from nbdbackup.agent import restore as restore_mod
from nbdbackup.agent.codec import PAYS_OFF, ZSTD, Codec, CodecError
from nbdbackup.agent.manifest import Manifest
from nbdbackup.agent.repo import CorruptChunk, DirStore, Repository
from nbdbackup.agent.restore import DIR_WORKERS, S3_WORKERS, DamagedChunk, default_workers, restore, segments

K = 1024
M = 1 << 20
KEY = bytes(range(32))


def _datas() -> list[bytes]:
    return [os.urandom(300 * K), b"text " * 60000, b"", bytes(M), os.urandom(3 * M // 4) + bytes(M // 4), b"x"]


@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("level", [None, 3])
def test_decode_into_and_encode_reused_match_the_plain_paths(key, level):
    c = Codec(level=level, key=key)
    for data in _datas():
        blob = c.encode("chunks/aa/11", data)
        reused = bytes(c.encode_reused("chunks/aa/11", data))
        assert len(reused) == len(blob) and reused[:2] == blob[:2]
        for b in (blob, reused):
            out = bytearray(len(data) + 7)
            n = c.decode_into("chunks/aa/11", b, out)
            assert n == len(data) and bytes(out[:n]) == data == c.decode("chunks/aa/11", b, len(data))
        if data:  # one byte too little room: refused, as decode's limit
            with pytest.raises(CodecError, match="at most"):
                c.decode_into("chunks/aa/11", blob, bytearray(len(data) - 1))


def test_decode_into_refusals():
    c = Codec(level=3, key=KEY)
    data = b"abc" * 100000
    blob = bytearray(c.encode("chunks/aa/11", data))
    out = bytearray(len(data))
    with pytest.raises(CodecError, match="fails authentication"):
        c.decode_into("chunks/aa/12", blob, out)  # another name
    blob[-1] ^= 1
    with pytest.raises(CodecError, match="fails authentication"):
        c.decode_into("chunks/aa/11", blob, out)
    with pytest.raises(CodecError, match="not encrypted"):
        c.decode_into("k", Codec(level=3).encode("k", data), out)  # plaintext injected
    with pytest.raises(CodecError, match="not the repository|is not"):
        Codec(level=3).decode_into("k", bytes(blob), out)
    with pytest.raises(CodecError, match="bad header"):
        c.decode_into("k", b"\x00\x01xyz", out)
    with pytest.raises(CodecError, match="truncated"):
        c.decode_into("k", bytes(blob[:20]), out)


def test_probe_skips_random_data_but_not_a_paying_run():
    c = Codec(level=3)
    assert c.encode_reused("k", os.urandom(4 * M))[1] == 0  # stored raw
    # A zero run of 1/16 of the chunk + 4 KiB anywhere: it holds a sampled piece, and it pays.
    for start in (0, 123 * 4096, 4 * M - (M // 4 + 4096)):
        data = bytearray(os.urandom(4 * M))
        run = 4 * M // PAYS_OFF + 4096
        data[start : start + run] = bytes(run)
        blob = c.encode("k", data)
        assert blob[1] == ZSTD and c.decode("k", blob, len(data)) == data, start


def test_zero_flags_memcmp_agrees_with_compare():
    blk = 64 * K
    parts = [os.urandom(blk), bytes(blk), bytes(blk), b"\x00" * (blk - 1) + b"\x01", bytes(1000)]
    data = b"".join(parts)
    writable = bytearray(data)
    assert segments(writable) == segments(data)  # memcmp (writable) vs memoryview comparison (bytes)
    assert [z for _, _, z in segments(writable, max_data=1 << 62)] == [False, True, False, True]
    assert restore_mod._zero_flags(memoryview(writable), blk, bytes(blk)) == [False, True, True, False, True]


def _repo(tmp_path, encryption="repokey", chunk=256 * K) -> Repository:
    return Repository.init(DirStore(str(tmp_path / "repo")), chunk, encryption=encryption, compression=3,
                           passphrase="pw", log_n=10)


def _put_disk(repo: Repository, data: bytes) -> Manifest:
    man = Manifest(len(data), repo.chunk_size)
    for i in range(man.count):
        off, n = man.chunk_range(i)
        piece = data[off : off + n]
        man.chunks[i] = repo.chunk_id(piece)
        repo.put_chunk(man.chunks[i], piece)
    repo.store.flush()  # chunk files named (the tests damage them)
    return man


def _disk(size: int) -> bytes:
    """Random, text and zero chunks, a zero 64 KiB block inside a data chunk, a short tail."""
    d = bytearray(os.urandom(size))
    d[256 * K : 512 * K] = bytes(256 * K)  # a zero chunk
    d[512 * K : 768 * K] = (b"compressible " * 30000)[: 256 * K]
    d[832 * K : 896 * K] = bytes(64 * K)  # a zero block in a data chunk
    return bytes(d)


@pytest.mark.parametrize("encryption", ["none", "repokey"])
def test_get_chunk_into_same_bytes_and_errors(tmp_path, encryption):
    repo = _repo(tmp_path, encryption)
    data = _disk(1 * M)
    man = _put_disk(repo, data)
    for i in range(man.count):
        off, n = man.chunk_range(i)
        out = bytearray(b"\xee" * n)
        assert repo.get_chunk_into(man.chunks[i], out) == n
        assert bytes(out) == data[off : off + n] == repo.get_chunk(man.chunks[i], n)
    d = man.chunks[0]
    path = tmp_path / "repo" / "chunks" / d.hex()[:2] / d.hex()
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x40
    path.write_bytes(blob)
    with pytest.raises(CorruptChunk) as e1:
        repo.get_chunk(d, 256 * K)
    with pytest.raises(CorruptChunk) as e2:
        repo.get_chunk_into(d, bytearray(256 * K))
    assert str(e1.value) == str(e2.value) and e2.value.hexdigest == d.hex()
    path.write_bytes(bytes(blob) * 2)  # larger than any stored form of the chunk
    with pytest.raises(CorruptChunk, match="larger than"):
        repo.get_chunk_into(d, bytearray(256 * K))
    path.unlink()
    with pytest.raises(CorruptChunk, match="missing"):
        repo.get_chunk_into(d, bytearray(256 * K))


def _restore_file(repo, man, path, **kw):
    from nbdbackup.blockdev.file import FileDev

    async def run():
        with open(path, "wb") as f:
            f.truncate(man.size)
        dev = FileDev(str(path))
        try:
            return await restore(repo, man, dev, snapshot="s1", target_is_zero=True, **kw)
        finally:
            await dev.close()

    return asyncio.run(run())


def _direct_possible(d) -> bool:
    try:
        fd = os.open(str(d / "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("size", [4 * M, 4 * M - 1000])  # the second: a tail O_DIRECT cannot write
def test_restore_to_a_file_direct_and_buffered(tmp_path, size):
    repo = _repo(tmp_path)
    data = _disk(size)
    man = _put_disk(repo, data)
    for direct in (True, False):
        out = tmp_path / f"out-{direct}.raw"
        st = _restore_file(repo, man, out, direct=direct, workers=3)
        assert out.read_bytes() == data
        assert st.direct_io == (direct and _direct_possible(tmp_path)) and st.workers == 3
        assert st.zero_chunks == 1 and st.bytes_skipped == 256 * K + 64 * K
        assert st.bytes_written == size - 256 * K - 64 * K
        assert os.stat(out).st_blocks * 512 <= size - 256 * K  # holes left for the zero chunk


def test_restore_to_a_file_names_the_damaged_range(tmp_path):
    repo = _repo(tmp_path)
    data = _disk(2 * M)
    man = _put_disk(repo, data)
    d = man.chunks[5]
    path = tmp_path / "repo" / "chunks" / d.hex()[:2] / d.hex()
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 1
    path.write_bytes(blob)
    with pytest.raises(DamagedChunk) as e:
        _restore_file(repo, man, tmp_path / "out.raw", workers=2)
    assert (e.value.snapshot, e.value.index, e.value.offset, e.value.length) == ("s1", 5, 5 * 256 * K, 256 * K)
    assert "chunk 5 at (1310720, 262144)" in str(e.value) and "fails authentication" in str(e.value)


def test_default_workers_per_store(tmp_path):
    from nbdbackup.agent.s3store import S3Store

    repo = _repo(tmp_path, "none")
    assert default_workers(repo.store) == DIR_WORKERS
    assert default_workers(S3Store("s3://bucket/prefix", endpoint="http://127.0.0.1:9")) == S3_WORKERS  # no I/O
    man = _put_disk(repo, _disk(M))
    assert _restore_file(repo, man, tmp_path / "out.raw").workers == DIR_WORKERS
