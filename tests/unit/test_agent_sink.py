"""The backup agent's pull sink (`agent.workflow._RepoSink`) and `pull(sink_ids=True)`.

The sink hashes, compresses, encrypts and stores a chunk in one thread job and
returns its id; `pull` then takes the ids from the sink.  Checked here, in memory:
the manifest is the same as with `pull` hashing; a chunk with the base's id at its
index (dirty, same bytes) is not stored; several chunks with the same new bytes
are stored once, also when their jobs run on threads at the same time; a full
backup probes for existing chunks, an incremental does not; an incremental's
chunks are put as incremental (the repository's incremental compression level),
a full backup's not.
"""

from __future__ import annotations

import asyncio
import threading

import blake3
import pytest

from nbdbackup.agent.manifest import Manifest
from nbdbackup.agent.pull import manifest_of, pull
from nbdbackup.agent.workflow import DiskResult, _RepoSink
from nbdbackup.blockdev.memory import MemoryDev

K = 64 * 1024


class FakeRepo:
    """chunk_id = blake3; put_chunk records (id, bytes, probe) in ``puts`` and its
    ``incremental`` in ``kinds``, and is new unless stored before.
    ``gate``: chunk_id waits at this barrier (jobs of several threads meet in it)."""

    def __init__(self, gate: threading.Barrier | None = None) -> None:
        self.puts: list[tuple[bytes, bytes, bool]] = []
        self.kinds: list[bool] = []
        self.gate = gate
        self.ids = 0

    def chunk_id(self, data) -> bytes:
        self.ids += 1
        if self.gate is not None:
            self.gate.wait(5)
        return blake3.blake3(data).digest()

    def put_chunk(self, d: bytes, data, *, probe: bool = True, incremental: bool = False) -> bool:
        self.puts.append((d, bytes(data), probe))
        self.kinds.append(incremental)
        return True


def _disk(size: int, pattern: dict[int, bytes]) -> MemoryDev:
    dev = MemoryDev(size)
    for off, data in pattern.items():
        asyncio.run(dev.pwrite(data, off))
    return dev


def test_pull_takes_the_ids_from_the_sink_and_stores_each_new_chunk_once() -> None:
    size = 6 * K
    # chunks 0, 2 and 4 hold the same bytes; 1 and 3 differ; 5 is a hole (zero: not handed in)
    dev = _disk(size, {0: b"A" * K, K: b"B" * K, 2 * K: b"A" * K, 3 * K: b"C" * K, 4 * K: b"A" * K})
    repo = FakeRepo()
    sink = _RepoSink(repo, None, DiskResult(server="s", disk="d"))

    async def main():
        return await pull(dev, None, chunk_size=K, workers=3, sink=sink, sink_ids=True,
                          chunk_id=lambda b: b"never called", zero_id=lambda n: blake3.blake3(bytes(n)).digest())

    man, stats = asyncio.run(main())
    assert man.chunks == asyncio.run(manifest_of(dev, K)).chunks
    assert sorted(sink.worked) == [0, 1, 2, 3, 4] and stats.chunks_worked == 5
    stored = sorted(data[:1] for _, data, _ in repo.puts)
    assert stored == [b"A", b"B", b"C"]  # A once, though three chunks hold it
    assert all(probe for _, _, probe in repo.puts)  # a full backup: existing chunks are probed
    assert repo.kinds == [False] * 3  # ... and compressed at the full level
    assert set(sink.new) == {d for d, _, _ in repo.puts}


def test_incremental_skips_the_base_chunks_and_does_not_probe() -> None:
    size = 4 * K
    dev = _disk(size, {0: b"A" * K, K: b"B" * K, 2 * K: b"C" * K, 3 * K: b"D" * K})
    base = Manifest(size, K)
    base.chunks = [blake3.blake3(x * K).digest() for x in (b"A", b"X", b"C", b"Y")]
    repo = FakeRepo()
    sink = _RepoSink(repo, base, DiskResult(server="s", disk="d"))

    async def main():
        return await pull(dev, None, dirty=[(0, size)], read_whole=True, base=base, chunk_size=K, workers=2,
                          sink=sink, sink_ids=True)

    man, _ = asyncio.run(main())
    assert man.chunks == asyncio.run(manifest_of(dev, K)).chunks
    # chunks 0 and 2 are dirty but hold the base's bytes: not stored
    assert sorted(data[:1] for _, data, _ in repo.puts) == [b"B", b"D"]
    assert not any(probe for _, _, probe in repo.puts)
    assert repo.kinds == [True, True]  # compressed at the incremental level


def test_the_same_new_bytes_on_two_threads_at_once_are_stored_once() -> None:
    repo = FakeRepo(gate=threading.Barrier(2))  # both jobs have hashed before either decides
    sink = _RepoSink(repo, None, DiskResult(server="s", disk="d"))
    data = memoryview(b"Z" * K)
    out: list = []
    ts = [threading.Thread(target=lambda i=i: out.append(sink.store(i, data))) for i in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(repo.puts) == 1
    assert sorted(new for _, new in out) == [False, True]
    assert {d for d, _ in out} == {blake3.blake3(data).digest()}


def test_jobs_run_on_the_pool_given() -> None:
    """A local store's sink runs its jobs on the CPU pool (one thread per core + 1), not on
    asyncio's default pool; without a pool, on the default one."""
    from nbdbackup.agent.workflow import _cpu_pool
    import os

    names: list[str] = []

    class Repo(FakeRepo):
        def chunk_id(self, data) -> bytes:
            names.append(threading.current_thread().name)
            return super().chunk_id(data)

    pool = _cpu_pool()
    assert pool is _cpu_pool() and pool._max_workers == (os.cpu_count() or 2) + 1
    for given, prefix in ((pool, "nbdbackup-chunk"), (None, "asyncio")):
        names.clear()
        sink = _RepoSink(Repo(), None, DiskResult(server="s", disk="d"), pool=given)
        asyncio.run(sink(0, None, memoryview(b"q" * K)))
        assert names and names[0].startswith(prefix), names


def test_warm_up_loads_the_bases_and_keeps_a_failure_for_its_disk() -> None:
    """`_warm_up` (run on a thread during the backup transaction) loads each incremental's
    base manifest into a future; a base that fails to load is kept as its exception (raised
    later by that disk's pull, which then fails and rolls back), never raised here; a full
    backup's run gets no future."""
    from nbdbackup.agent.decide import Decision
    from nbdbackup.agent.workflow import _DiskRun, _warm_up
    from nbdbackup.errors import ConfigError

    good = Manifest(4 * K, K)

    class Repo:
        class store:
            remote = False

        def load_snapshot(self, name: str):
            if name == "bad":
                raise ConfigError("snapshot 'bad' is damaged")
            return good

    def run(kind: str, base: str | None) -> _DiskRun:
        dec = Decision(kind, "test", base=base, base_bitmap="b" if base else None)
        return _DiskRun(f"d-{base}", 4 * K, dec, "s", "own", DiskResult(server="s", disk="d"))

    runs = [run("incremental", "ok"), run("incremental", "bad"), run("full", None)]
    _warm_up(Repo(), runs)
    assert runs[0].base_man.result() is good
    with pytest.raises(ConfigError, match="damaged"):
        runs[1].base_man.result()
    assert runs[2].base_man is None


def test_discard_closes_an_opened_device_and_cancels_one_opening() -> None:
    from nbdbackup.agent.workflow import _discard

    closed: list[str] = []

    class Dev:
        async def close(self) -> None:
            closed.append("closed")

    async def opens_at_once():
        return Dev()

    async def never_opens():
        await asyncio.sleep(3600)

    async def main():
        done = asyncio.ensure_future(opens_at_once())
        await asyncio.sleep(0)
        await _discard(done)
        slow = asyncio.ensure_future(never_opens())
        await asyncio.sleep(0)
        await _discard(slow)
        assert slow.cancelled()

    asyncio.run(main())
    assert closed == ["closed"]
