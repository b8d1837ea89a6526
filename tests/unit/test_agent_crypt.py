"""Unit tests of repository format 2: the object codec (`agent.codec`), the keys
(`agent.crypto`), keyed chunk ids and binary snapshot objects (`agent.repo`)."""

from __future__ import annotations

import datetime
import json
import os

import blake3
import pytest

from nbdbackup.agent import crypto
from nbdbackup.agent.codec import AEAD, MAGIC, ZSTD, Codec, CodecError, Compression, parse_compression
from nbdbackup.agent.manifest import Manifest, digest, zero_digest
from nbdbackup.agent.repo import CorruptChunk, DirStore, Repository, SnapshotImage
from nbdbackup.errors import ConfigError

C = 64 * 1024
KEY = bytes(range(32))
FAST = 10  # scrypt N = 2**10 in unit tests (the default 2**17 costs ~0.3 s and 128 MiB per try)


@pytest.mark.parametrize("level", [None, 1, 3, 19])
@pytest.mark.parametrize("key", [None, KEY])
@pytest.mark.parametrize("data", [b"", b"x", b"\x00" * C, os.urandom(C), b"abc" * 5000])
def test_codec_round_trips(level, key, data):
    c = Codec(level=level, key=key)
    blob = c.encode("chunks/ab/cd", data)
    assert blob[0] == MAGIC and bool(blob[1] & AEAD) == (key is not None)
    assert c.decode("chunks/ab/cd", blob, len(data)) == data
    assert c.decode("chunks/ab/cd", memoryview(blob), len(data)) == data  # any buffer


def test_codec_compresses_only_when_it_pays():
    c = Codec(level=3)
    assert c.encode("k", b"\x01" * C)[1] == ZSTD and len(c.encode("k", b"\x01" * C)) < 100
    rnd = os.urandom(C)
    blob = c.encode("k", rnd)
    assert blob[1] == 0 and blob[2:] == rnd  # incompressible: stored raw
    # Saving less than 1/16 does not pay: 1/20 of the data compressible -> raw.
    mostly = os.urandom(C - C // 20) + bytes(C // 20)
    assert c.encode("k", mostly)[1] == 0
    assert Codec(level=None).encode("k", b"\x01" * C)[1] == 0
    assert parse_compression("zstd") == Compression(3, 1, adaptive=True)
    assert parse_compression("zstd:19") == Compression(19, 19) and parse_compression("none") == Compression(None, None)
    for bad in ("zstd:0", "zstd:23", "lz4", "zstd:x", "", "zstd:"):
        with pytest.raises(ConfigError, match="compression"):
            parse_compression(bad)


def test_codec_probe_of_large_buffers():
    """A buffer of at least PROBE_MIN bytes is probed first: random data is stored raw
    without compressing it whole; a compressible run that pays on its own anywhere in
    it (here 1/8 of it, at an odd place), or text throughout, is compressed."""
    from nbdbackup.agent import codec as codec_mod

    n = 1 << 20
    c = Codec(level=3)
    calls = []
    real = c._compressor

    def counting(level):
        calls.append(1)
        return real(level)

    c._compressor = counting
    rnd = os.urandom(n)
    assert not c._worth_trying(memoryview(rnd))
    blob = c.encode("k", rnd)
    assert blob[1] == 0 and blob[2:] == rnd and not calls  # the chunk's compressor never ran
    run = bytearray(rnd)
    run[n // 3 : n // 3 + n // 8] = bytes(n // 8)
    assert c._worth_trying(memoryview(run))
    blob = c.encode("k", run)
    assert blob[1] == ZSTD and len(blob) < n - n // 16 and c.decode("k", blob, n) == run
    words = b" ".join(b"%d %x block/%d" % (i, i * 7919, i % 97) for i in range(200000))[:n]
    assert c.encode("k", words)[1] == ZSTD
    assert len(words) >= codec_mod.PROBE_MIN


def test_codec_nonces_are_unique():
    c = Codec(level=None, key=KEY)
    blobs = [c.encode("k", b"same") for _ in range(2000)]
    assert len({b[2:14] for b in blobs}) == 2000 and len(set(blobs)) == 2000


def test_codec_detects_tampering_and_swaps():
    c = Codec(level=3, key=KEY)
    data = b"hello world " * 1000
    blob = c.encode("chunks/aa/11", data)
    for i in range(0, len(blob), max(1, len(blob) // 50)):  # any flipped bit anywhere
        bad = bytearray(blob)
        bad[i] ^= 0x10
        with pytest.raises(CodecError):
            c.decode("chunks/aa/11", bytes(bad), len(data))
    with pytest.raises(CodecError, match="fails authentication"):
        c.decode("chunks/aa/22", blob, len(data))  # the same object under another name
    with pytest.raises(CodecError, match="fails authentication"):
        Codec(level=3, key=bytes(32)).decode("chunks/aa/11", blob, len(data))  # another key
    with pytest.raises(CodecError, match="not encrypted, in an encrypted"):
        c.decode("k", Codec(level=3).encode("k", data), len(data))  # a plaintext object injected
    with pytest.raises(CodecError, match="encrypted, but"):
        Codec(level=3).decode("k", blob, len(data))
    with pytest.raises(CodecError, match="at most"):
        c.decode("chunks/aa/11", blob, len(data) - 1)  # more than asked for (a zstd bomb)
    with pytest.raises(CodecError, match="truncated"):
        c.decode("k", blob[:20], len(data))
    plain = Codec(level=3).encode("k", data)
    with pytest.raises(CodecError, match="damaged compressed data"):
        Codec(level=3).decode("k", plain[:-5], len(data))


def test_key_wrap_unwrap_and_wrong_passphrase():
    m = crypto.MasterKey.generate()
    blob = crypto.wrap(m, "correct horse", "r1", log_n=FAST)
    doc = json.loads(blob)
    assert doc["kdf"] == {"name": "scrypt", "n": 1 << FAST, "r": 8, "p": 1, "salt": doc["kdf"]["salt"]}
    assert m.enc_key.hex() not in blob.decode() and "MasterKey(...)" == repr(m)
    assert crypto.unwrap(blob, "correct horse", "r1") == m
    with pytest.raises(ConfigError, match="wrong passphrase or damaged key"):
        crypto.unwrap(blob, "Correct horse", "r1")
    with pytest.raises(ConfigError, match="the key of repository r1, not of r2"):
        crypto.unwrap(blob, "correct horse", "r2")
    forged = json.dumps(dict(doc, repository="r2")).encode()  # relabelled: the associated data differs
    with pytest.raises(ConfigError, match="wrong passphrase or damaged key"):
        crypto.unwrap(forged, "correct horse", "r2")
    for damaged in (b"", b"{}", blob[:-30], json.dumps(dict(doc, kdf=dict(doc["kdf"], n=3))).encode()):
        with pytest.raises(ConfigError, match="wrong passphrase or damaged key"):
            crypto.unwrap(damaged, "correct horse", "r1")
    assert crypto.wrap(m, "correct horse", "r1", log_n=FAST) != blob  # fresh salt and nonce
    with pytest.raises(ConfigError, match="empty"):
        crypto.wrap(m, "", "r1", log_n=FAST)


def test_read_passphrase_sources(tmp_path, monkeypatch):
    monkeypatch.delenv(crypto.PASSPHRASE_ENV, raising=False)
    f = tmp_path / "pw"
    f.write_bytes(b"from file\nsecond line\n")
    assert crypto.read_passphrase(str(f)) == "from file"
    monkeypatch.setenv(crypto.PASSPHRASE_ENV, "from env")
    assert crypto.read_passphrase(None) == "from env" and crypto.read_passphrase(str(f)) == "from file"
    monkeypatch.delenv(crypto.PASSPHRASE_ENV)
    with pytest.raises(ConfigError, match="a passphrase is needed: set NBDBACKUP_PASSPHRASE"):
        crypto.read_passphrase(None, interactive=False)
    f.write_bytes(b"\n")
    with pytest.raises(ConfigError, match="empty"):
        crypto.read_passphrase(str(f))
    with pytest.raises(ConfigError, match="cannot read"):
        crypto.read_passphrase(str(tmp_path / "nope"))


def _repo(tmp_path, encryption="repokey", **kw) -> Repository:
    return Repository.init(DirStore(str(tmp_path / "r")), C, encryption=encryption, passphrase="pw", log_n=FAST,
                           **kw)


def test_keyed_ids_differ_from_plain_blake3(tmp_path):
    enc = _repo(tmp_path)
    plain = Repository.init(DirStore(str(tmp_path / "p")), C)
    data = b"known content" * 100
    assert plain.chunk_id(data) == digest(data) == blake3.blake3(data).digest()
    assert enc.chunk_id(data) != digest(data) and len(enc.chunk_id(data)) == 32
    assert enc.chunk_id(data) == blake3.blake3(data, key=enc._id_key).digest()
    assert enc.zero_id(C) == enc.chunk_id(bytes(C)) != zero_digest(C) and plain.zero_id(C) == zero_digest(C)
    other = Repository.init(DirStore(str(tmp_path / "o")), C, encryption="repokey", passphrase="pw", log_n=FAST)
    assert other.chunk_id(data) != enc.chunk_id(data)  # each repository its own id key
    # Reopened with the passphrase: the same ids (dedup across pulls).
    again = Repository.open(DirStore(str(tmp_path / "r")), passphrase=lambda: "pw")
    assert again.chunk_id(data) == enc.chunk_id(data)


def test_encrypted_repository_round_trip_and_opacity(tmp_path):
    repo = _repo(tmp_path)
    secret = b"TOP-SECRET-PAYLOAD " * 4000
    data = secret[:C] + bytes(C) + os.urandom(C // 2)
    m = Manifest(len(data), C)
    m.chunks = [repo.chunk_id(data[o:o + n]) for o, n in map(m.chunk_range, range(m.count))]
    for i, d in enumerate(m.chunks):
        o, n = m.chunk_range(i)
        repo.put_chunk(d, data[o:o + n])
    repo.save_snapshot("secret-name-s0", m, source="nbd://host/secret-export")
    root = tmp_path / "r"
    everything = b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "config.json")
    for needle in (b"TOP-SECRET", b"secret-export", m.chunks[0], digest(data[:C])):
        assert needle not in everything
    # Two chunks (no zero chunk).  (Files only: the two share a directory 1 time in 256.)
    assert len([p for p in (root / "chunks").rglob("*") if p.is_file()]) == 2
    back = Repository.open(DirStore(str(root)), passphrase="pw")
    assert back.load_snapshot("secret-name-s0") == m
    info = back.snapshot_info("secret-name-s0")
    assert info["source"] == "nbd://host/secret-export" and info["size"] == len(data) and info["parent"] is None
    buf = bytearray(len(data))
    SnapshotImage(back, m).read_sync(memoryview(buf), 0)
    assert bytes(buf) == data
    assert [e.flags for e in SnapshotImage(back, m).extents_sync(0, len(data))] == [0, 3, 0]
    with pytest.raises(ConfigError, match="wrong passphrase or damaged key"):
        Repository.open(DirStore(str(root)), passphrase="nope")
    with pytest.raises(ConfigError, match="is encrypted: a passphrase is needed"):
        Repository.open(DirStore(str(root)))


def test_snapshot_objects_tamper_swap_and_truncation(tmp_path):
    for enc in ("none", "repokey"):
        repo = _repo(tmp_path / enc, encryption=enc)
        for name, byte in (("a", 1), ("b", 2)):
            d = bytes([byte]) * C
            m = Manifest(C, C, [repo.chunk_id(d)])
            repo.put_chunk(m.chunks[0], d)
            repo.save_snapshot(name, m)
        snaps = tmp_path / enc / "r" / "snapshots"
        good = (snaps / "a").read_bytes()
        for i in range(len(good)):
            bad = bytearray(good)
            bad[i] ^= 0x01
            (snaps / "a").write_bytes(bad)
            with pytest.raises(ConfigError, match="snapshot 'a' in .* is damaged"):
                repo.load_snapshot("a")
        (snaps / "a").write_bytes(good[:-3])
        with pytest.raises(ConfigError, match="snapshot 'a' in .* is damaged"):
            repo.load_snapshot("a")
        (snaps / "a").write_bytes((snaps / "b").read_bytes())  # b's object under a's name
        with pytest.raises(ConfigError, match="snapshot 'a' in .* is damaged"):
            repo.load_snapshot("a")
        (snaps / "a").write_bytes(good)
        assert repo.verify() == []
        (snaps / "b").write_bytes(good[:10])
        problems = repo.verify()
        assert len(problems) == 1 and problems[0][:2] == ("b", -1) and "damaged" in problems[0][2]
        (snaps / "b").unlink()
        assert repo.snapshots() == ["a"]


def test_keyfile_repository_export_and_change_passphrase(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    repo = _repo(tmp_path, encryption="keyfile")
    path = crypto.default_key_path(repo.id)
    assert path.startswith(str(tmp_path / "xdg")) and os.stat(path).st_mode & 0o777 == 0o600
    assert not (tmp_path / "r" / "keys").exists()  # the key is not in the repository
    st = DirStore(str(tmp_path / "r"))
    assert Repository.open(st, passphrase="pw").id == repo.id
    exported = repo.key_blob()
    (tmp_path / "copy").write_bytes(exported)
    os.rename(path, path + ".moved")
    with pytest.raises(ConfigError, match="cannot read the key of repository .*give --key-file"):
        Repository.open(st, passphrase="pw")
    assert Repository.open(st, passphrase="pw", key_file=str(tmp_path / "copy")).id == repo.id
    os.rename(path + ".moved", path)
    before = open(path, "rb").read()
    with pytest.raises(ConfigError, match="wrong passphrase"):
        Repository.open(st, passphrase="bad")
    assert open(path, "rb").read() == before  # nothing written
    Repository.open(st, passphrase="pw").change_passphrase("new", log_n=FAST)
    with pytest.raises(ConfigError, match="wrong passphrase"):
        Repository.open(st, passphrase="pw")
    assert Repository.open(st, passphrase="new").chunk_id(b"x") == repo.chunk_id(b"x")
    # The exported copy still opens with the old passphrase; another repository's key does not.
    assert Repository.open(st, passphrase="pw", key_file=str(tmp_path / "copy")).chunk_id(b"x") == repo.chunk_id(b"x")
    other = _repo(tmp_path / "o", encryption="repokey")
    (tmp_path / "other").write_bytes(other.key_blob())
    with pytest.raises(ConfigError, match="the key of repository"):
        Repository.open(st, passphrase="pw", key_file=str(tmp_path / "other"))


def test_format_1_and_config_checks(tmp_path):
    st = DirStore(str(tmp_path / "r"))
    st.create()
    st.put("config.json", json.dumps({"format": "nbdbackup-repo", "version": 1, "chunk_size": C}).encode())
    with pytest.raises(ConfigError, match="a format-1 repository .* create a new one"):
        Repository.open(st)
    st.put("config.json", json.dumps({"format": "nbdbackup-repo", "version": 2, "chunk_size": C}).encode())
    with pytest.raises(ConfigError, match="config.json is damaged"):
        Repository.open(st)
    with pytest.raises(ConfigError, match="encryption 'rot13'"):
        Repository.init(DirStore(str(tmp_path / "x")), C, encryption="rot13")
    with pytest.raises(ConfigError, match="needs a passphrase"):
        Repository.init(DirStore(str(tmp_path / "y")), C, encryption="repokey")


def test_manifest_pack_unpack_and_one_tib_snapshot_size(tmp_path):
    m = Manifest(10 * C + 5, C)
    m.chunks = [os.urandom(32) for _ in range(m.count)]
    p = m.packed()
    assert len(p) == 32 * m.count and Manifest.from_packed(m.size, C, p) == m
    with pytest.raises(ConfigError, match="bytes of digests"):
        Manifest.from_packed(m.size, C, p[:-1])
    # A 1 TiB disk in 4 MiB chunks: 262144 ids.  Sparse (all holes but 1000 chunks): a few KiB;
    # fully random: the packed 8 MiB (ids do not compress), still "a few MB".
    for enc in ("none", "repokey"):
        repo = Repository.init(DirStore(str(tmp_path / enc)), 4 << 20, encryption=enc, passphrase="pw", log_n=FAST)
        big = Manifest(1 << 40, 4 << 20)
        z = repo.zero_id(4 << 20)
        big.chunks = [z] * big.count
        for i in range(0, big.count, big.count // 1000):
            big.chunks[i] = os.urandom(32)
        repo.save_snapshot("tib", big, created=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc))
        size = (tmp_path / enc / "snapshots" / "tib").stat().st_size
        assert size < 64 * 1024, size
        assert repo.load_snapshot("tib") == big
        assert repo.snapshot_info("tib")["created"] == "2026-01-01T00:00:00+00:00"
        big.chunks = [os.urandom(32) for _ in range(big.count)]
        repo.save_snapshot("tib-random", big)
        assert (tmp_path / enc / "snapshots" / "tib-random").stat().st_size < 8 * 1024 * 1024 + 1024


def test_get_chunk_of_an_encrypted_repository_checks_the_id(tmp_path):
    repo = _repo(tmp_path, compression=None)
    a, b = b"\x01" * C, b"\x02" * C
    da, db = repo.chunk_id(a), repo.chunk_id(b)
    repo.put_chunk(da, a)
    repo.put_chunk(db, b)
    repo.store.flush()  # the chunk files get their names
    root = tmp_path / "r" / "chunks"
    pa, pb = root / da.hex()[:2] / da.hex(), root / db.hex()[:2] / db.hex()
    pa.write_bytes(pb.read_bytes())  # the store swaps two chunks
    with pytest.raises(CorruptChunk, match="fails authentication"):
        repo.get_chunk(da, C)
    assert repo.get_chunk(db, C) == b


class NoListing(DirStore):
    """A store on which listing fails: what a restore must never need."""

    def list(self, prefix):
        raise AssertionError(f"listed {prefix!r}")

    list_times = list


def test_restore_path_never_lists_the_store(tmp_path):
    repo = _repo(tmp_path)
    data = os.urandom(C) + bytes(C)
    m = Manifest(len(data), C, [repo.chunk_id(data[:C]), repo.zero_id(C)])
    repo.put_chunk(m.chunks[0], data[:C])
    repo.save_snapshot("s0", m)
    r = Repository.open(NoListing(str(tmp_path / "r")), passphrase="pw")
    img = SnapshotImage(r, r.load_snapshot("s0"))
    buf = bytearray(len(data))
    img.read_sync(memoryview(buf), 0)
    assert bytes(buf) == data and r.snapshot_info("s0")["size"] == len(data) and r.has_snapshot("s0")


def test_a_downgraded_config_is_refused_when_a_key_was_expected(tmp_path):
    repo = _repo(tmp_path)
    st = DirStore(str(tmp_path / "r"))
    cfg = json.loads(st.get("config.json"))
    st.put("config.json", json.dumps(dict(cfg, encryption="none")).encode())  # the store's operator lies
    with pytest.raises(ConfigError, match="not encrypted, but a key or passphrase file was given"):
        Repository.open(st, passphrase="pw", require_encryption=True)
    with pytest.raises(ConfigError, match="not encrypted, but"):
        Repository.open(st, passphrase="pw", key_file=str(tmp_path / "k"))
    # Without the requirement it opens as plain, and its encrypted chunks fail loudly instead of being trusted.
    plain = Repository.open(st)
    d = repo.chunk_id(b"\x01" * C)
    repo.put_chunk(d, b"\x01" * C)
    repo.store.flush()  # visible to another store object (another process) once committed
    with pytest.raises(CorruptChunk, match="encrypted, but the repository is not"):
        plain.get_chunk(d, C)


@pytest.mark.parametrize("text,want", [("12", 12), ("10", 10), ("20", 20), ("9", 17), ("21", 17), ("x", 17), ("", 17)])
def test_scrypt_cost_override_takes_only_sane_values(monkeypatch, text, want):
    """``NBDBACKUP_SCRYPT_LOG_N`` (the suite's cheaper keys) is read at import; nonsense keeps the default."""
    monkeypatch.setenv("NBDBACKUP_SCRYPT_LOG_N", text)
    assert crypto._env_log_n() == want
