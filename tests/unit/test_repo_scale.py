"""The repository at scale (docs/hunt13.md): costs that must not grow with a disk's virtual size
or with the number of snapshots, checked on synthesised repositories (no pull, no NBD).

- gc's mark phase (`Repository.referenced`), `repo verify` and a pull's manifest assembly do no
  Python work per hole chunk (counted: `zero_id` calls);
- `verify` keeps one snapshot's ids in memory at a time, not every manifest (tracemalloc peak);
- a loaded manifest shares one object for all its hole ids;
- gc deletes in batches as its listing goes (never a list of every doomed key) and asks a
  `DirStore` (grace 0) for no modification times (a stat per chunk);
- ``prune --dry-run --gc`` counts what gc would free without a set of every stored chunk.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import tracemalloc

import pytest

from nbdbackup.agent import repo as repomod
from nbdbackup.agent.manifest import Manifest, digest, zero_digest
from nbdbackup.agent.pull import pull
from nbdbackup.agent.repo import DirStore, Repository
from nbdbackup.agent.verify import verify
from nbdbackup.blockdev.memory import MemoryDev

C = 64 * 1024
VIRTUAL = 4 << 30  # 65536 chunks of 64 KiB: mostly holes


def _sparse_repo(path, snapshots: int, data: int = 8, virtual: int = VIRTUAL) -> tuple[Repository, list[bytes]]:
    """A repository of ``snapshots`` snapshots of a ``virtual``-byte disk, each with ``data`` real data
    chunks (one of them new in each snapshot) and holes elsewhere."""
    repo = Repository.init(DirStore(str(path)), C, compression=1)
    count = -(-virtual // C)
    ids = []
    for k in range(data + snapshots):
        d = os.urandom(16) + bytes(C - 16)
        ids.append(repo.chunk_id(d))
        repo.put_chunk(ids[-1], d)
    t0 = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    for s in range(snapshots):
        man = Manifest(virtual, C)
        man.chunks = [repo.zero_id(C)] * count
        for j in range(data):
            man.chunks[j * (count // data)] = ids[s + j]
        repo.save_snapshot(f"s{s:03d}", man, created=t0 + datetime.timedelta(hours=s))
    return repo, ids


class _Counting:
    """Wraps ``repo.zero_id``, counting calls."""

    def __init__(self, repo: Repository) -> None:
        self.calls, self._real = 0, repo.zero_id
        repo.zero_id = self  # type: ignore[method-assign]

    def __call__(self, n: int) -> bytes:
        self.calls += 1
        return self._real(n)


def test_gc_mark_and_verify_do_no_python_step_per_hole(tmp_path):
    repo, ids = _sparse_repo(tmp_path / "r", 3)
    count = _Counting(repo)
    assert repo.referenced() == set(ids[:8 + 2])
    assert count.calls < 100  # a step per chunk: 3 x 65536 calls
    count.calls = 0
    rep = verify(repo, repo.snapshots())
    assert rep.ok and rep.chunks_referenced == 10 and count.calls < 100


def test_verify_holds_one_snapshot_at_a_time(tmp_path):
    """Peak traced memory of verifying 8 snapshots stays near one manifest's: all manifests at once
    (the old way) held 8 x 65536 ids, ~40 MB here; one at a time ~6 MB."""
    repo, _ = _sparse_repo(tmp_path / "r", 8)
    names = repo.snapshots()
    tracemalloc.start()
    try:
        rep = verify(repo, names, workers=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rep.ok and rep.chunks_checked == 8 + 8 - 1
    assert peak < 16 << 20, peak


def test_verify_still_names_every_damaged_chunk_in_every_snapshot(tmp_path):
    repo, ids = _sparse_repo(tmp_path / "r", 3)
    victim = ids[5]  # in all three snapshots
    os.unlink(os.path.join(repo.store.root, "chunks", victim.hex()[:2], victim.hex()))
    rep = verify(repo, repo.snapshots())
    step = VIRTUAL // C // 8  # snapshot s holds ids[s + j] at chunk j * step: ids[5] is j=5, 4, 3
    assert sorted((p.snapshot, p.index, p.reason) for p in rep.problems) == [
        ("s000", 5 * step, "missing"), ("s001", 4 * step, "missing"), ("s002", 3 * step, "missing")]


def test_loaded_manifest_shares_one_object_per_hole_id(tmp_path):
    repo, _ = _sparse_repo(tmp_path / "r", 1)
    man = repo.load_snapshot("s000")
    z = repo.zero_id(C)
    holes = [d for d in man.chunks if d == z]
    assert len(holes) == man.count - 8
    assert len({id(d) for d in holes}) == 1  # 65528 separate 32-byte objects: ~4 MB here, 80 MB per TiB


def test_full_pull_of_a_sparse_disk_does_no_step_per_hole():
    size = 1 << 30
    src = MemoryDev(size)
    asyncio.run(src.pwrite(b"\x07" * C, 3 * C))
    asyncio.run(src.pwrite(b"\x09" * 100, size - 100))  # data in the last chunk
    calls = []

    def zero_id(n: int) -> bytes:
        calls.append(n)
        return zero_digest(n)

    async def sink(i, d, chunk):
        return None

    man, _ = asyncio.run(pull(src, None, chunk_size=C, sink=sink, zero_id=zero_id, fresh=True))
    assert len(calls) < 10, len(calls)  # a step per chunk: 16384 calls
    assert man.chunks[3] == digest(b"\x07" * C) and man.chunks[0] == zero_digest(C)
    assert man.chunks[-1] == digest(bytes(C - 100) + b"\x09" * 100)


def test_incremental_pull_takes_the_base_ids_without_a_step_per_chunk():
    size = 1 << 30
    src = MemoryDev(size)
    asyncio.run(src.pwrite(b"\x05" * C, 7 * C))
    base = Manifest(size, C)
    base.chunks = [zero_digest(C)] * base.count
    base.chunks[9] = digest(b"x" * C)

    async def sink(i, d, chunk):
        return None

    class Listy(list):
        """A manifest's chunk list that counts item reads (a per-chunk loop reads each)."""
        reads = 0

        def __getitem__(self, i):
            Listy.reads += 1
            return super().__getitem__(i)

    base.chunks = Listy(base.chunks)
    man, _ = asyncio.run(pull(src, None, chunk_size=C, sink=sink, base=base, dirty=[(7 * C, C)],
                              read_whole=True))
    assert Listy.reads < 10, Listy.reads
    assert man.chunks[7] == digest(b"\x05" * C) and man.chunks[9] == digest(b"x" * C)
    assert man.chunks[0] == zero_digest(C) and len(man.chunks) == man.count


def test_gc_deletes_as_it_lists_and_stats_nothing_on_a_dir_store(tmp_path, monkeypatch):
    repo, ids = _sparse_repo(tmp_path / "r", 1)
    st = repo.store
    for g in range(50):  # unreferenced objects
        key = repomod._chunk_key(g.to_bytes(4, "big") + bytes(28))
        os.makedirs(os.path.dirname(st._path(key)), exist_ok=True)
        open(st._path(key), "wb").close()
    listed = []
    real_list = st.list

    def counting_list(prefix):
        for k in real_list(prefix):
            listed.append(k)
            yield k

    at_first_delete = []
    real_delete_many = st.delete_many

    def delete_many(keys):
        at_first_delete.append(len(listed))
        real_delete_many(keys)

    def no_stat(*a, **k):
        raise AssertionError("gc asked a grace-0 DirStore for modification times")

    monkeypatch.setattr(st, "list", counting_list)
    monkeypatch.setattr(st, "delete_many", delete_many)
    monkeypatch.setattr(st, "mtime", no_stat)
    monkeypatch.setattr(st, "list_times", no_stat)
    monkeypatch.setattr(repomod, "GC_BATCH", 10)
    with st.lock(exclusive=True):
        removed, kept = repo.gc()
    assert (removed, kept) == (50 + 1, 8)  # ids[8] was stored but is in no snapshot
    assert len(at_first_delete) == 6 and at_first_delete[0] < len(listed)  # not after the whole listing
    assert sorted(os.path.basename(k) for k in real_list("chunks")) == sorted(d.hex() for d in ids[:8])


def test_prune_dry_run_gc_counts_without_a_set_of_every_stored_chunk(tmp_path, monkeypatch, capsys):
    from nbdbackup.cli import main

    repo, _ = _sparse_repo(tmp_path / "r", 4)

    def no_stored(self):
        raise AssertionError("a set of every stored chunk")

    monkeypatch.setattr(Repository, "stored", no_stored)
    assert main(["repo", "prune", "--dry-run", "--gc", "--keep-last", "1", "--json", str(tmp_path / "r")]) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["gc"] == {"removed": 4, "kept": 8}  # s003 keeps ids[3:11]; ids[0:3] and ids[11] go


@pytest.mark.parametrize("numpy_ids", [1, 1 << 30])
@pytest.mark.parametrize("virtual", [VIRTUAL, VIRTUAL - C + 4096])
def test_chunk_ids_match_the_manifest(tmp_path, monkeypatch, virtual, numpy_ids):
    """`Repository.chunk_ids` (numpy over the packed ids, or not) == the manifest's non-zero ids with
    their lengths, a short last chunk (data or a hole) included."""
    monkeypatch.setattr(repomod, "NUMPY_IDS", numpy_ids)
    repo, _ = _sparse_repo(tmp_path / "r", 2, virtual=virtual)
    for tail in (b"\x01" * (virtual % C or C), bytes(virtual % C or C)):
        man = repo.load_snapshot("s001")
        man.chunks[-1] = repo.chunk_id(tail)
        repo.put_chunk(man.chunks[-1], tail)
        repo.save_snapshot("t", man)
        want = {d: man.chunk_range(i)[1] for i, d in enumerate(man.chunks)
                if d != repo.zero_id(man.chunk_range(i)[1])}
        assert repo.chunk_ids("t") == want


def test_snapshot_infos_reads_a_remote_stores_snapshots_at_once_in_order(tmp_path, monkeypatch):
    """``repo list``, ``prune`` and the agent's retention read every snapshot's metadata: on a
    remote store (one round trip each) several at once, the answers in order, a failure raised."""
    import threading
    import time

    from nbdbackup.errors import ConfigError

    repo, _ = _sparse_repo(tmp_path / "r", 12, virtual=1 << 20)
    repo.store.remote = True  # as S3Store
    real = repo.snapshot_info
    lock, now, most = threading.Lock(), [0], [0]

    def slow_info(name):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.02)  # a round trip
        with lock:
            now[0] -= 1
        if name == "s010":
            raise ConfigError("damaged")
        return real(name)

    monkeypatch.setattr(repo, "snapshot_info", slow_info)
    names = repo.snapshots()
    got = []
    with pytest.raises(ConfigError, match="damaged"):
        for name, info in repo.snapshot_infos(names):
            got.append((name, info["name"]))
    assert got == [(n, n) for n in names[:10]]
    assert most[0] > 4, most[0]  # one at a time: 1


def test_prune_deletes_snapshots_in_batches_with_one_directory_fsync(tmp_path, monkeypatch, capsys):
    """Removing 28 of 30 snapshots: the snapshots directory is fsynced once, after the unlinks (the
    removals durable before any gc that follows), not once per snapshot; the right ones are gone."""
    from nbdbackup.cli import main

    repo, _ = _sparse_repo(tmp_path / "r", 30, virtual=1 << 20)
    synced = []
    real = repomod._fsync_dir

    def fsync_dir(d):
        synced.append((d, sorted(os.listdir(d))))
        real(d)

    monkeypatch.setattr(repomod, "_fsync_dir", fsync_dir)
    assert main(["repo", "prune", "--keep-last", "2", str(tmp_path / "r")]) == 0
    snaps = os.path.join(repo.store.root, "snapshots")
    assert [s for d, s in synced if d == snaps] == [["s028", "s029"]]
    assert repo.snapshots() == ["s028", "s029"]


def test_packing_a_manifests_ids_costs_about_their_size():
    """`Manifest.packed` (saving a snapshot, its root): ~32 bytes per id of memory, not the ~112 of one
    ``b"".join`` over every id (an 80-byte buffer descriptor each), 112 MB for a 1 TiB disk."""
    n = 1 << 19
    m = Manifest(n * C, C)
    m.chunks = [os.urandom(32) for _ in range(64)] * (n // 64)
    tracemalloc.start()
    try:
        packed = m.packed()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert packed == b"".join(m.chunks) and m.root == digest(packed)
    assert peak < 40 * n, peak  # one join of all: ~112 * n
