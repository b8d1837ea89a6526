"""Unit tests of what makes an unattended incremental cheap: ``--kdf none`` key files
(`agent.crypto.plain_blob`, `Repository.open` without a passphrase, refused unless private),
the 1 MiB default chunk size of new repositories, conditional snapshot writes
(``save_snapshot(new_only=True)``), ``put_chunk(probe=False)``, and an incremental pull that
does not read the base where the dirty ranges cover a whole chunk."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from nbdbackup.agent import crypto
from nbdbackup.agent.manifest import Manifest
from nbdbackup.agent.pull import pull
from nbdbackup.agent.repo import DEFAULT_REPO_CHUNK, REPOKEY, DirStore, ProbeGate, Repository, SnapshotExists
from nbdbackup.blockdev.memory import MemoryDev
from nbdbackup.errors import ConfigError

C = 64 * 1024
FAST = 10  # scrypt N = 2**10


def no_passphrase():
    raise AssertionError("a --kdf none key must not ask for a passphrase")


def test_keyfile_kdf_none_opens_without_passphrase(tmp_path):
    key = tmp_path / "cfg" / "k.key"
    repo = Repository.init(DirStore(str(tmp_path / "r")), C, encryption="keyfile", kdf="none", key_file=str(key),
                           passphrase=no_passphrase)
    assert os.stat(key).st_mode & 0o777 == 0o600 and not (tmp_path / "r" / "keys").exists()
    doc = json.loads(key.read_bytes())
    assert doc["kdf"] == {"name": "none"} and doc["repository"] == repo.id and "salt" not in json.dumps(doc)
    again = Repository.open(DirStore(str(tmp_path / "r")), key_file=str(key), passphrase=no_passphrase)
    data = b"some data" * 1000
    assert again.chunk_id(data) == repo.chunk_id(data) and again.encryption == "keyfile"
    assert again.codec.encrypted
    d = repo.chunk_id(data)
    assert repo.put_chunk(d, data)
    repo.store.flush()  # another store object (another process) sees committed chunks
    assert again.get_chunk(d, len(data)) == data


def test_export_kdf_none_from_a_scrypt_repokey(tmp_path):
    repo = Repository.init(DirStore(str(tmp_path / "r")), C, encryption="repokey", passphrase="pw", log_n=FAST)
    key = tmp_path / "plain.key"
    crypto.write_private(str(key), repo.plain_key_blob())
    un = Repository.open(DirStore(str(tmp_path / "r")), key_file=str(key), passphrase=no_passphrase)
    assert un.chunk_id(b"x" * 100) == repo.chunk_id(b"x" * 100)
    # The key in the repository stays wrapped: a passphrase is still needed without the file.
    with pytest.raises(ConfigError, match="wrong passphrase"):
        Repository.open(DirStore(str(tmp_path / "r")), passphrase="not it")
    assert crypto.blob_kdf((tmp_path / "r" / "keys" / "repokey").read_bytes(), "k") == "scrypt"
    # change-passphrase on a plain key file wraps it again (scrypt) where it lives.
    un.change_passphrase("new pw", log_n=FAST)
    assert crypto.blob_kdf(key.read_bytes(), "k") == "scrypt" and os.stat(key).st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError, match="wrong passphrase"):
        Repository.open(DirStore(str(tmp_path / "r")), key_file=str(key), passphrase="pw")
    Repository.open(DirStore(str(tmp_path / "r")), key_file=str(key), passphrase="new pw")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o602])
def test_plain_key_refused_when_others_can_access_it(tmp_path, mode):
    key = tmp_path / "k.key"
    Repository.init(DirStore(str(tmp_path / "r")), C, encryption="keyfile", kdf="none", key_file=str(key))
    os.chmod(key, mode)
    with pytest.raises(ConfigError, match=r"group or others .*chmod 600"):
        Repository.open(DirStore(str(tmp_path / "r")), key_file=str(key), passphrase=no_passphrase)
    os.chmod(key, 0o400)  # read-only for its owner is fine
    Repository.open(DirStore(str(tmp_path / "r")), key_file=str(key), passphrase=no_passphrase)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_plain_key_refused_when_owned_by_another_user(tmp_path):
    key = tmp_path / "k.key"
    Repository.init(DirStore(str(tmp_path / "r")), C, encryption="keyfile", kdf="none", key_file=str(key))
    os.chown(key, 12345, 12345)
    with pytest.raises(ConfigError, match="must belong to the user running"):
        Repository.open(DirStore(str(tmp_path / "r")), key_file=str(key), passphrase=no_passphrase)


def test_plain_key_of_another_repository_or_damaged_is_refused(tmp_path):
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    Repository.init(DirStore(str(tmp_path / "r1")), C, encryption="keyfile", kdf="none", key_file=str(k1))
    Repository.init(DirStore(str(tmp_path / "r2")), C, encryption="keyfile", kdf="none", key_file=str(k2))
    with pytest.raises(ConfigError, match="the key of repository"):
        Repository.open(DirStore(str(tmp_path / "r1")), key_file=str(k2), passphrase=no_passphrase)
    doc = json.loads(k1.read_bytes())
    raw = bytearray(__import__("base64").b64decode(doc["data"]))
    raw[5] ^= 1
    doc["data"] = __import__("base64").b64encode(bytes(raw)).decode()
    crypto.write_private(str(k1), json.dumps(doc).encode())
    with pytest.raises(ConfigError, match="damaged key"):
        Repository.open(DirStore(str(tmp_path / "r1")), key_file=str(k1), passphrase=no_passphrase)
    crypto.write_private(str(k1), b"not json")
    with pytest.raises(ConfigError, match="not an nbdbackup-key"):
        Repository.open(DirStore(str(tmp_path / "r1")), key_file=str(k1), passphrase=no_passphrase)
    with pytest.raises(ConfigError, match="cannot read the key"):
        Repository.open(DirStore(str(tmp_path / "r1")), key_file=str(tmp_path / "nope"), passphrase=no_passphrase)


def test_plain_key_never_in_the_store(tmp_path):
    with pytest.raises(ConfigError, match="--kdf none is for --encryption keyfile"):
        Repository.init(DirStore(str(tmp_path / "x")), C, encryption="repokey", kdf="none")
    with pytest.raises(ConfigError, match="kdf 'argon'"):
        Repository.init(DirStore(str(tmp_path / "y")), C, encryption="keyfile", kdf="argon")
    repo = Repository.init(DirStore(str(tmp_path / "r")), C, encryption="repokey", passphrase="pw", log_n=FAST)
    # A store operator (or a mistake) putting an unwrapped key in the repository: refused.
    repo.store.put(REPOKEY, repo.plain_key_blob())
    with pytest.raises(ConfigError, match="without passphrase: refused"):
        Repository.open(DirStore(str(tmp_path / "r")), passphrase="pw")


def test_new_repositories_default_to_1_MiB_chunks(tmp_path):
    from nbdbackup.cli import main

    assert DEFAULT_REPO_CHUNK == 1 << 20
    assert Repository.init(DirStore(str(tmp_path / "a"))).chunk_size == 1 << 20
    assert main(["repo", "init", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_bytes())["chunk_size"] == 1 << 20
    # An older repository keeps its own size.
    Repository.init(DirStore(str(tmp_path / "c")), 4 << 20)
    assert Repository.open(DirStore(str(tmp_path / "c"))).chunk_size == 4 << 20


def test_save_snapshot_new_only_never_overwrites(tmp_path):
    repo = Repository.init(DirStore(str(tmp_path / "r")), C)
    man = Manifest(C, C, [repo.zero_id(C)])
    repo.save_snapshot("s", man, new_only=True)
    with pytest.raises(SnapshotExists, match="meanwhile"):
        repo.save_snapshot("s", man, source="another", new_only=True)
    assert repo.snapshot_info("s")["source"] == ""


def test_put_chunk_without_probe(tmp_path):
    repo = Repository.init(DirStore(str(tmp_path / "r")), C)
    data = os.urandom(C)
    d = repo.chunk_id(data)
    assert repo.put_chunk(d, data, probe=False) is True
    assert repo.put_chunk(d, data, probe=False) is False  # the store's put_new keeps the first copy
    assert repo.get_chunk(d, C) == data


class CountingDev(MemoryDev):
    """A MemoryDev that counts its preads by chunk (the base of an incremental)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.reads: list[tuple[int, int]] = []

    async def pread(self, buf, offset: int) -> None:
        self.reads.append((offset, len(buf)))
        await super().pread(buf, offset)


def test_incremental_does_not_read_the_base_of_wholly_dirty_chunks():
    size, chunk = 8 * C, 2 * C

    async def main():
        src = MemoryDev(size)
        src.write_sync(os.urandom(size), 0)
        base = CountingDev(size)  # the previous backup: what src holds now
        buf = bytearray(size)
        await src.pread(memoryview(buf), 0)
        base.write_sync(bytes(buf), 0)
        man0, _ = await pull(src, None, chunk_size=chunk, sink=_null_sink)
        src.write_sync(os.urandom(2 * C), 2 * C)  # chunk 1, wholly
        src.write_sync(os.urandom(C // 2), 6 * C + 100)  # part of chunk 3
        dirty = [(2 * C, 2 * C), (6 * C, C)]
        base.reads.clear()
        stored = {}

        async def sink(i, d, data):
            stored[i] = bytes(data)

        man, stats = await pull(src, base, dirty=dirty, chunk_size=chunk, base=man0, sink=sink)
        assert sorted(stored) == [1, 3]
        assert [o // chunk for o, _ in base.reads] == [3]  # chunk 1 was not read from the base
        whole = bytearray(size)
        await src.pread(memoryview(whole), 0)
        assert stored[1] == bytes(whole[2 * C:4 * C]) and stored[3] == bytes(whole[6 * C:8 * C])
        assert man.chunks[0] == man0.chunks[0] and man.chunks[1] != man0.chunks[1]

    asyncio.run(main())


async def _null_sink(i, d, data):
    pass


class CountingStore(DirStore):
    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def get(self, key: str) -> bytes:
        self.reads.append(key)
        return super().get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self.reads.append(key + "#range")
        return super().get_range(key, offset, length)


def test_load_snapshot_after_snapshot_info_reads_once(tmp_path):
    st = CountingStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    data = os.urandom(C)
    man = Manifest(3 * C, C, [repo.chunk_id(data), repo.zero_id(C), repo.chunk_id(data)])
    repo.save_snapshot("s", man)
    st.reads.clear()
    assert repo.snapshot_info("s")["size"] == 3 * C
    assert repo.load_snapshot("s").chunks == man.chunks
    assert st.reads == ["snapshots/s#range"]  # the ranged read held the whole object
    assert repo.load_snapshot("s").chunks == man.chunks and st.reads[-1] == "snapshots/s"  # used once
    repo.snapshot_info("s")
    repo.delete_snapshot("s")
    with pytest.raises(ConfigError, match="no snapshot"):
        repo.load_snapshot("s")  # never from the cache once deleted


def test_cli_registers_only_the_command_asked_for():
    import argparse

    from nbdbackup.cli import COMMAND_MODULES, build_parser

    def commands(p: argparse.ArgumentParser) -> set[str]:
        (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        return set(sub.choices)

    assert commands(build_parser(["agent", "backup", "--repo", "r"])) == {"agent"}
    assert commands(build_parser(["-v", "repo", "list", "r"])) == {"repo"}
    everything = commands(build_parser())
    assert set(COMMAND_MODULES) <= everything and "verify" in everything
    for argv in (["--help"], ["verify", "x"], ["nosuch"], [], ["-v"]):
        assert commands(build_parser(argv)) == everything, argv
    for name in COMMAND_MODULES:  # every module registers the command it is named after
        assert name in commands(build_parser([name])), name


class _RemoteDir:
    """A DirStore seen as remote (``remote = True``) that counts existence checks:
    the `ProbeGate` logic of `Repository.put_chunk` without a network."""

    remote = True

    def __init__(self, inner):
        self._inner = inner
        self.exists_calls = 0

    def exists(self, key):
        self.exists_calls += 1
        return self._inner.exists(key)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_probe_gate_stops_after_misses_and_resumes_on_a_hit(tmp_path):
    from nbdbackup.agent.repo import ProbeGate

    g = ProbeGate()
    for _ in range(ProbeGate.MISSES - 1):
        g.saw(False)
    assert g.wanted()
    g.saw(False)
    assert not g.wanted()
    g.saw(False)  # an unprobed new chunk keeps it off
    assert not g.wanted()
    g.saw(True)  # a conditional PUT found it stored: probe again
    assert g.wanted() and g.misses == 0


def test_put_chunk_on_a_remote_store_stops_probing_new_chunks(tmp_path):
    inner = DirStore(str(tmp_path / "r"))
    Repository.init(inner, 4096)
    store = _RemoteDir(inner)
    repo = Repository.open(store)
    datas = [os.urandom(4096) for _ in range(40)]
    for data in datas:  # a first full backup: every chunk is new
        assert repo.put_chunk(repo.chunk_id(data), data) is True
    assert store.exists_calls == ProbeGate.MISSES
    # The same chunks again (a second full): the first unprobed PUT finds its chunk stored,
    # probing resumes, and every later one is a probe hit (no encode, no upload).
    for data in datas:
        assert repo.put_chunk(repo.chunk_id(data), data) is False
    assert store.exists_calls == ProbeGate.MISSES + len(datas) - 1
    assert repo._probe.probing
    # A local DirStore always probes.
    local = Repository.open(inner)
    calls = []
    orig = inner.exists
    inner.exists = lambda k: calls.append(k) or orig(k)
    for data in datas[:20]:
        assert local.put_chunk(local.chunk_id(data), data) is False
    assert len(calls) == 20
