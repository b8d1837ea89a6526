"""Unit tests of `agent.repo`: the directory store, dedup, corruption detection, gc and locks."""

from __future__ import annotations

import asyncio
import datetime
import json
import os

import pytest

from nbdbackup.agent.manifest import Manifest, digest
from nbdbackup.agent.repo import CorruptChunk, DirStore, Repository, SnapshotImage
from nbdbackup.errors import ConfigError

C = 64 * 1024


def manifest_of(data: bytes, chunk: int = C, chunk_id=digest) -> Manifest:
    m = Manifest(len(data), chunk)
    m.chunks = [chunk_id(data[o:o + n]) for o, n in map(m.chunk_range, range(m.count))]
    return m


def store_image(repo: Repository, name: str, data: bytes, parent: str | None = None,
                created: datetime.datetime | None = None) -> Manifest:
    m = manifest_of(data, repo.chunk_size, repo.chunk_id)
    for i, d in enumerate(m.chunks):
        o, n = m.chunk_range(i)
        repo.put_chunk(d, data[o:o + n])
    repo.save_snapshot(name, m, parent=parent, created=created)
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


def flip(path: str, offset: int, mask: int) -> None:
    """XOR the byte at ``offset`` of ``path`` with ``mask`` (in place: the read moves the
    position, so seek back -- writing at offset + 1 left the file unchanged whenever the
    next byte already held the result, 1 time in 256: a CI failure)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


@pytest.mark.parametrize("encryption", ["none", "repokey"])
def test_corruption_and_missing_chunks_are_reported(tmp_path, encryption):
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C, encryption=encryption, compression=None, passphrase="pw", log_n=10)
    m = store_image(repo, "s0", os.urandom(C) + os.urandom(C))
    key = f"chunks/{m.chunks[1].hex()[:2]}/{m.chunks[1].hex()}"
    path = os.path.join(st.root, *key.split("/"))
    flip(path, 100, 1)
    want = "does not match its blake3 digest" if encryption == "none" else \
        "fails authentication (damaged, or not this object)"
    assert repo.verify() == [("s0", 1, want)]
    with pytest.raises(CorruptChunk, match=m.chunks[1].hex()):
        repo.get_chunk(m.chunks[1], C)
    with open(path, "r+b") as f:
        f.write(b"\x07")
    assert repo.verify() == [("s0", 1, "not an nbdbackup format-2 object (bad header)")]
    os.unlink(path)
    assert repo.verify(["s0"]) == [("s0", 1, "missing")]
    assert repo.get_chunk(repo.zero_id(C), C) == bytes(C)


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


def test_gc_grace_is_measured_by_the_store_clock_not_this_host(tmp_path, monkeypatch):
    """An unreferenced chunk uploaded a moment ago (by the store's clock) survives a gc with a grace
    period even when the gc host's clock runs two hours ahead of the store (S3 on another machine:
    LastModified is the store's time)."""
    import time

    class RemoteClock(DirStore):
        gc_grace = 60.0
        real = staticmethod(time.time)

        def now(self):  # the store's clock: the file system's, untouched by the host's skew
            return self.real()

    st = RemoteClock(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    young = b"\x07" * C
    assert repo.put_chunk(repo.chunk_id(young), young)  # referenced by no snapshot
    skewed = time.time() + 7200
    monkeypatch.setattr(time, "time", lambda: skewed)
    with st.lock(exclusive=True):
        assert repo.gc() == (0, 0)
    monkeypatch.undo()
    assert repo.stored() == {repo.chunk_id(young)}
    with st.lock(exclusive=True):
        assert repo.gc(grace=0) == (1, 0)  # without a grace it goes


def test_snapshot_time_from_created_or_file_mtime(tmp_path):
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    store_image(repo, "s0", b"\x01" * C)
    t, guessed = repo.snapshot_time("s0")
    assert not guessed and t.tzinfo == datetime.timezone.utc
    assert before <= t <= datetime.datetime.now(datetime.timezone.utc)
    man = repo.load_snapshot("s0")
    doc = repo.snapshot_info("s0")
    del doc["manifest"]
    path = tmp_path / "r" / "snapshots" / "s0"

    def rewrite(meta: dict) -> None:  # the snapshot object, with this metadata (as an older writer might)
        path.write_bytes(repo._snapshot_blob("s0", meta, man.packed()))

    for created, want in (("2026-12-01T10:00:00", datetime.datetime(2026, 12, 1, 10, tzinfo=datetime.timezone.utc)),
                          ("2026-12-01T10:00:00-05:00",
                           datetime.datetime(2026, 12, 1, 15, tzinfo=datetime.timezone.utc))):
        rewrite(dict(doc, created=created))
        assert repo.snapshot_time("s0") == (want, False)
    for bad in (None, "yesterday", 12):  # older or damaged files: the file's mtime, flagged
        rewrite(dict(doc, created=bad) if bad is not None else {k: v for k, v in doc.items() if k != "created"})
        os.utime(path, (1_700_000_000, 1_700_000_000))
        assert repo.snapshot_time("s0") == (datetime.datetime.fromtimestamp(1_700_000_000, datetime.timezone.utc),
                                            True)
    for damaged in (b"{not json", b"NBDS\x02\x00\x00\x00\x05abc"):  # prune refuses to guess: it names the file
        path.write_bytes(damaged)
        with pytest.raises(ConfigError, match="snapshot 's0' in .* is damaged"):
            repo.snapshot_time("s0")


def test_prune_cli_plan_locks_and_refusals(tmp_path, capsys):
    from nbdbackup.cli import main

    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    t0 = datetime.datetime(2026, 11, 2, 12, tzinfo=datetime.timezone.utc)  # a Monday
    for i in range(6):  # one a day, each with its own chunk and a shared one
        store_image(repo, f"d{i}", bytes([i + 1]) * C + b"\xee" * C, created=t0 + datetime.timedelta(days=i))
    d = str(tmp_path / "r")

    def run(*args: str) -> tuple[int, str, str]:
        rc = main(["repo", "prune", d, *args])
        out, err = capsys.readouterr()
        return rc, out, err

    rc, out, err = run()
    assert rc == 1 and "refusing to prune with no --keep-* rule" in err
    assert run("--keep-daily", "0", "--keep-within", "0h")[0] == 1 and len(repo.snapshots()) == 6
    with pytest.raises(SystemExit):
        main(["repo", "prune", d, "--keep-daily", "-3"])
    capsys.readouterr()

    rc, out, _ = run("--keep-last", "1", "--keep-daily", "3", "--dry-run", "--gc", "--json")
    plan = json.loads(out)
    assert rc == 0 and plan["keep"] == ["d5", "d4", "d3"] and plan["remove"] == ["d2", "d1", "d0"]
    assert plan["removed"] == [] and plan["gc"] == {"removed": 3, "kept": 4}
    assert plan["snapshots"][0] == {"name": "d5", "time": "2026-11-07T12:00:00+00:00", "time_from_mtime": False,
                                    "action": "keep", "reasons": ["last 1/1", "daily 2026-11-07"]}
    assert len(repo.snapshots()) == 6 and len(repo.stored()) == 7

    with st.lock(exclusive=False):  # a pull in progress: the plan can be shown, nothing removed
        assert run("--keep-last", "1", "--dry-run")[0] == 0
        rc, _, err = run("--keep-last", "1")
        assert rc == 1 and "busy" in err and len(repo.snapshots()) == 6

    rc, out, _ = run("--keep-last", "1", "--keep-daily", "3")
    assert rc == 0 and repo.snapshots() == ["d3", "d4", "d5"] and len(repo.stored()) == 7
    lines = out.splitlines()
    assert lines[0] == "policy: keep last 1, daily 3 (buckets in UTC)"
    assert lines[1].split() == ["SNAPSHOT", "TIME", "(UTC)", "ACTION", "REASONS"]
    assert lines[2].split() == ["d5", "2026-11-07", "12:00:00", "keep", "last", "1/1,", "daily", "2026-11-07"]
    assert lines[5].split() == ["d2", "2026-11-04", "12:00:00", "remove", "-"]
    assert "removed 3 of 6 snapshot(s): d2 d1 d0" in out and "run 'nbdbackup repo gc'" in out

    rc, out, _ = run("--keep-weekly", "1", "--gc")  # Mon..Sat: one ISO week
    assert rc == 0 and repo.snapshots() == ["d5"] and "gc: removed 5 unused chunk(s), 2 in use" in out
    assert repo.verify() == []


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_chunks_are_committed_in_groups_named_only_once_durable(tmp_path, monkeypatch):
    """A chunk's file gets its name only at the group commit (flush), after its fsync;
    until then this process reads it from its temporary file; a snapshot write commits first.
    (The fsync path: the syncfs one is `test_whole_fs_group_commit_...`.)"""
    import nbdbackup.agent.repo as repo_mod

    monkeypatch.setattr(repo_mod, "SYNCFS", False)
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    data = os.urandom(C)
    d = repo.chunk_id(data)
    key = f"chunks/{d.hex()[:2]}/{d.hex()}"
    assert repo.put_chunk(d, data)
    named = os.path.join(st.root, *key.split("/"))
    assert not os.path.exists(named) and synced == []  # written, not yet durable nor named
    assert [f for f in _files(st.root) if ".tmp." in f]
    assert st.exists(key) and repo.get_chunk(d, C) == data  # this process sees it
    assert not repo.put_chunk(d, data)  # known: not written twice
    m = Manifest(C, C)
    m.chunks = [d]
    repo.save_snapshot("s0", m)
    assert os.path.exists(named) and not [f for f in _files(st.root) if ".tmp." in f]
    tmp_synced = [p for p in synced if ".tmp." in p and "/chunks/" in p]
    assert len(tmp_synced) == 1  # the chunk's file, fsynced before it was named
    assert synced.index(tmp_synced[0]) < next(i for i, p in enumerate(synced) if "/snapshots/" in p)
    assert repo.verify() == []


def test_group_commit_when_the_batch_is_full(tmp_path, monkeypatch):
    import nbdbackup.agent.repo as repo_mod

    monkeypatch.setattr(repo_mod, "BATCH_FILES", 3)
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    chunks = [os.urandom(C) for _ in range(4)]
    for c in chunks:
        repo.put_chunk(repo.chunk_id(c), c)
    assert len(st._pending) == 1  # three were committed together, the fourth waits
    assert len([f for f in _files(os.path.join(st.root, "chunks")) if ".tmp." not in f]) == 3
    st.flush()
    assert not st._pending and len(repo.stored()) == 4


def test_group_commits_reuse_one_pool_of_fsync_threads(tmp_path, monkeypatch):
    """The fsyncs of a flush (its chunks', then its directories') fan out over one kept pool of
    at most 16 threads, not a pool started and joined per fan-out (~30 threads per incremental);
    a child made by fork() makes its own pool (its parent's threads do not exist there)."""
    import threading

    import nbdbackup.agent.repo as repo_mod

    monkeypatch.setattr(repo_mod, "_FSYNC_POOL", None)
    monkeypatch.setattr(repo_mod, "SYNCFS", False)  # (the fan-outs of the fsync path)
    used: set[int] = set()
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (used.add(threading.get_ident()), real_fsync(fd))[1])
    started = []
    real_start = threading.Thread.start

    def start(self):
        started.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    for _ in range(3):
        for _ in range(40):
            c = os.urandom(C)
            repo.put_chunk(repo.chunk_id(c), c)
        st.flush()
    assert len(repo.stored()) == 120 and not st._pending
    assert 1 < len(started) <= 16 and all(n.startswith("nbdbackup-fsync") for n in started), started
    assert len(used) <= 17  # (the caller's own thread: the config's and small groups' fsyncs)
    pid = os.fork()
    if pid == 0:  # the child: a flush must not wait forever on the parent's (absent) threads
        try:
            c = os.urandom(C)
            repo.put_chunk(repo.chunk_id(c), c)
            for _ in range(3):
                c = os.urandom(C)
                repo.put_chunk(repo.chunk_id(c), c)
            st.flush()
            os._exit(0 if len(repo.stored()) == 124 else 1)
        except BaseException:  # noqa: BLE001
            os._exit(2)
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("a forked child's flush hung on its parent's fsync pool")


def _durability_log(monkeypatch, st, fail_syncfs: int | None = None) -> list[str]:
    """Record, in order, what makes a DirStore's writes durable or named: each syncfs, each
    fsync (of what), each rename and hard link (to what); syncfs number ``fail_syncfs`` fails."""
    import errno as errno_mod

    from nbdbackup.blockdev import writeback

    log: list[str] = []
    real = {n: getattr(os, n) for n in ("fsync", "replace", "link")}
    real_syncfs = writeback.syncfs

    def rel(p) -> str:
        return os.path.relpath(str(p), st.root)

    def syncfs(fd):
        log.append("syncfs")
        if fail_syncfs is not None and log.count("syncfs") == fail_syncfs:
            raise OSError(errno_mod.EIO, "injected write-back error")
        real_syncfs(fd)

    monkeypatch.setattr(writeback, "syncfs", syncfs)
    # ext4, whatever the test's file system is (a container's overlayfs is not on the list; the
    # real syncfs still runs on it): the fs check has its own case below ("fuse").
    monkeypatch.setattr(writeback, "fs_type", lambda path: 0xEF53)
    monkeypatch.setattr(writeback, "dirty_bytes", lambda: 0)  # a quiet machine: syncfs allowed
    monkeypatch.setattr(writeback, "syncfs_reports_errors", lambda: True)
    monkeypatch.setattr(os, "fsync", lambda fd: (log.append("fsync " + rel(os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real["fsync"](fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (log.append("name " + rel(b)), real["replace"](a, b))[1])
    monkeypatch.setattr(os, "link", lambda a, b: (log.append("name " + rel(b)), real["link"](a, b))[1])
    return log


def test_whole_fs_group_commit_names_chunks_between_two_syncfs_before_the_snapshot(tmp_path, monkeypatch):
    """With syncfs (Linux >= 5.8, little other dirty data): the group's files are made durable by
    one syncfs, only then named, the names made durable by a second syncfs, and only then is the
    snapshot that references them written -- no fsync per chunk file or chunk directory."""
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    chunks = [os.urandom(C) for _ in range(5)]
    log = _durability_log(monkeypatch, st)
    m = Manifest(5 * C, C)
    m.chunks = []
    for c in chunks:
        d = repo.chunk_id(c)
        repo.put_chunk(d, c)
        m.chunks.append(d)
    assert log == []  # written, nothing durable or named yet
    repo.save_snapshot("s0", m)
    first, second = (i for i, e in enumerate(log) if e == "syncfs")
    named = [i for i, e in enumerate(log) if e.startswith("name chunks/")]
    snap = next(i for i, e in enumerate(log) if e.startswith("name snapshots/s0"))
    assert len(named) == 5 and first < min(named) and max(named) < second < snap, log
    assert not [e for e in log if e.startswith("fsync") and "chunks" in e], log  # two syncfs did it
    assert Repository.open(DirStore(st.root)).verify() == [] and len(repo.stored()) == 5
    assert st._fs_fd is not None  # (the file system passed as ext4: one of SYNCFS_FILE_SYSTEMS)


@pytest.mark.parametrize("which", [1, 2])
def test_whole_fs_group_commit_failing_saves_no_snapshot(tmp_path, monkeypatch, which):
    """A write-back error reported by the first syncfs: no chunk of the group is named (their
    files removed); by the second: the names may exist but the snapshot is not written."""
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    c = os.urandom(C)
    d = repo.chunk_id(c)
    log = _durability_log(monkeypatch, st, fail_syncfs=which)
    repo.put_chunk(d, c)
    m = Manifest(C, C)
    m.chunks = [d]
    with pytest.raises(OSError, match="injected"):
        repo.save_snapshot("s0", m)
    assert not os.path.exists(os.path.join(st.root, "snapshots", "s0"))
    assert not [e for e in log if "snapshots" in e]
    if which == 1:
        assert not [e for e in log if e.startswith("name chunks/")] and not _files(os.path.join(st.root, "chunks"))


def test_whole_fs_group_commit_only_on_a_quiet_file_system(tmp_path, monkeypatch):
    """syncfs writes back everything of the file system: with more than SYNCFS_OTHER_DIRTY of
    other dirty data on the machine, a kernel whose syncfs does not report errors, a file system
    whose syncfs may do nothing (FUSE), or NBDBACKUP_SYNCFS=0, the group is fsynced file by file
    as before."""
    import nbdbackup.agent.repo as repo_mod
    from nbdbackup.blockdev import writeback

    for setting in ("busy", "old-kernel", "fuse", "off"):
        st = DirStore(str(tmp_path / setting))
        repo = Repository.init(st, C)
        log = _durability_log(monkeypatch, st)
        if setting == "busy":
            monkeypatch.setattr(writeback, "dirty_bytes", lambda: repo_mod.SYNCFS_OTHER_DIRTY + 10 * C)
        elif setting == "old-kernel":
            monkeypatch.setattr(writeback, "syncfs_reports_errors", lambda: False)
        elif setting == "fuse":
            monkeypatch.setattr(writeback, "fs_type", lambda path: 0x65735546)
        else:
            monkeypatch.setattr(repo_mod, "SYNCFS", False)
        for _ in range(2):
            c = os.urandom(C)
            repo.put_chunk(repo.chunk_id(c), c)
        st.flush()
        assert "syncfs" not in log, setting
        assert len([e for e in log if e.startswith("fsync chunks/") and ".tmp." in e]) == 2, (setting, log)
        monkeypatch.undo()


def test_unbatched_store_names_each_chunk_at_once(tmp_path):
    st = DirStore(str(tmp_path / "r"), batch=False)
    repo = Repository.init(st, C)
    c = os.urandom(C)
    repo.put_chunk(repo.chunk_id(c), c)
    assert not st._pending and len(repo.stored()) == 1


def test_gc_removes_temporary_files_of_dead_writers(tmp_path):
    """kill -9 mid-pull leaves temporary chunk files: never named, never read, swept by gc."""
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    store_image(repo, "s0", b"\x01" * C)
    c = os.urandom(C)
    repo.put_chunk(repo.chunk_id(c), c)
    for fd, *_ in st._pending.values():  # as if the process died before committing: its file stays
        os.close(fd)
    st._pending.clear()
    assert [f for f in _files(st.root) if ".tmp." in f]
    fresh = Repository.open(DirStore(st.root))
    assert len(fresh.stored()) == 1 and fresh.verify() == []  # the repository is usable as it is
    with fresh.store.lock(exclusive=True):
        assert fresh.gc() == (0, 1)
    assert not [f for f in _files(st.root) if ".tmp." in f]


@pytest.mark.parametrize("encryption", ["none", "repokey"])
def test_base_snapshot_reads_whole_chunks_in_place_and_pieces(tmp_path, encryption):
    """What an incremental pull reads of its base: whole chunks (decoded into the buffer),
    a zero chunk, pieces across chunk ends; a damaged chunk is an error naming it."""
    from nbdbackup.agent.repo import BaseSnapshot

    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C, encryption=encryption, compression=3, passphrase="pw", log_n=10)
    data = os.urandom(C) + bytes(C) + b"text " * (C // 5) + b"t" * (C % 5) + os.urandom(C // 2)
    m = store_image(repo, "s0", data)
    base = BaseSnapshot(repo, repo.load_snapshot("s0"))
    for off, n in ((0, C), (C, C), (2 * C, C), (3 * C, C // 2), (0, len(data)), (C - 100, 300), (C // 2, 2 * C)):
        buf = bytearray(b"\xee" * n)
        asyncio.run(base.pread(memoryview(buf), off))
        assert bytes(buf) == data[off:off + n], (off, n)
    path = os.path.join(st.root, "chunks", m.chunks[2].hex()[:2], m.chunks[2].hex())
    flip(path, os.path.getsize(path) // 2, 1)  # (a few dozen bytes: it compresses well)
    with pytest.raises(CorruptChunk, match=m.chunks[2].hex()):
        asyncio.run(base.pread(memoryview(bytearray(C)), 2 * C))


def test_a_chunk_stays_readable_while_its_group_is_committed(tmp_path, monkeypatch):
    """Another thread (the second disk's verify) reads a chunk while the first disk's flush
    renames it: through the temporary file before, through its name after, never 'missing'."""
    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    data = os.urandom(C)
    d = repo.chunk_id(data)
    repo.put_chunk(d, data)
    key = f"chunks/{d.hex()[:2]}/{d.hex()}"
    blob = st.get(key)
    seen = []
    real_replace = os.replace

    def replace(a, b):
        if "/chunks/" in str(b):
            seen.append((st.get(key), st.exists(key)))  # committing: the temporary file
            real_replace(a, b)
            seen.append((st.get(key), st.exists(key)))  # renamed, still listed as committing
        else:
            real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    st.flush()
    assert seen == [(blob, True), (blob, True)]
    assert not st._committing and repo.get_chunk(d, C) == data


def test_new_only_snapshot_is_never_overwritten_by_a_racing_writer(tmp_path, monkeypatch):
    """Two agents save one snapshot name at once (bug hunt 2): the other's snapshot lands between
    this writer's existence check and its write.  `save_snapshot(new_only=True)` must refuse
    (`SnapshotExists`) and leave the other's snapshot as it is; `DirStore.put_new` used to be
    exists-then-rename, which replaced it silently."""
    from nbdbackup.agent.repo import SnapshotExists

    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    other = Repository.open(DirStore(st.root))  # another process's view of the same directory
    theirs, ours = b"\x01" * C, b"\x02" * C
    real_exists = DirStore.exists

    def exists(self, key):
        got = real_exists(self, key)
        if self is st and key == "snapshots/x" and not got:  # the other writer lands right now
            store_image(other, "x", theirs)
        return got

    monkeypatch.setattr(DirStore, "exists", exists)
    m = manifest_of(ours)
    repo.put_chunk(m.chunks[0], ours)
    with pytest.raises(SnapshotExists, match="meanwhile"):
        repo.save_snapshot("x", m, new_only=True)
    monkeypatch.setattr(DirStore, "exists", real_exists)
    assert Repository.open(DirStore(st.root)).load_snapshot("x").chunks == manifest_of(theirs).chunks
    assert [f for f in _files(st.root) if ".tmp." in f] == []  # no temporary file left behind
    assert st.put_new("snapshots/y", b"1") and not st.put_new("snapshots/y", b"2")
    assert st.get("snapshots/y") == b"1"


def test_new_only_snapshot_whose_own_put_landed_before_a_retry_is_saved(tmp_path):
    """A conditional PUT of the snapshot that landed but whose reply was lost is retried and
    meets 412 (hunt2's open doubt): that is this writer's own object, not another agent's, so
    the save succeeds instead of a false `SnapshotExists`; a different object still refuses."""
    from nbdbackup.agent.repo import SnapshotExists

    class LostReply(DirStore):
        def put_new(self, key, data):
            made = super().put_new(key, data)
            return made and not key.startswith("snapshots/")  # created, but the reply said 412

    st = LostReply(str(tmp_path / "r"))
    repo = Repository.init(st, C)
    ours = b"\x05" * C
    m = manifest_of(ours)
    repo.put_chunk(m.chunks[0], ours)
    repo.save_snapshot("x", m, new_only=True)
    assert repo.load_snapshot("x").chunks == m.chunks
    with pytest.raises(SnapshotExists, match="meanwhile"):  # another's (its own time, source...)
        repo.save_snapshot("x", m, source="elsewhere", new_only=True)
    assert repo.load_snapshot("x").chunks == m.chunks


@pytest.mark.parametrize("encryption", ["none", "repokey"])
def test_a_damaged_chunk_is_not_reused_by_new_backups_after_verify_repair(tmp_path, encryption):
    """Bug hunt 2: a pull finds a chunk by its id (dedup) without reading it, so once a stored
    chunk is damaged every later backup of that data -- a full one too, which the agent advises
    after a damaged base -- references the damaged object: one flipped byte damages backups
    taken after it.  `verify(repair=True)` moves a chunk that fails its check twice aside
    (``damaged/<id>``, kept); the next backup of that data stores it again, which heals the
    older snapshots too."""
    from nbdbackup.agent.verify import verify

    st = DirStore(str(tmp_path / "r"))
    repo = Repository.init(st, C, encryption=encryption, passphrase="pw", log_n=10)
    data = os.urandom(C) + os.urandom(C)
    m = store_image(repo, "s0", data)
    key = f"chunks/{m.chunks[1].hex()[:2]}/{m.chunks[1].hex()}"
    path = os.path.join(st.root, *key.split("/"))
    flip(path, 40, 4)
    store_image(repo, "s1", data)  # a new full backup of the same data
    assert {(p.snapshot, p.index) for p in verify(repo, ["s0", "s1"]).problems} == {("s0", 1), ("s1", 1)}
    rep = verify(repo, ["s0", "s1"], repair=True)
    assert {(p.snapshot, p.index) for p in rep.problems} == {("s0", 1), ("s1", 1)}
    assert rep.moved == [m.chunks[1].hex()]
    assert not os.path.exists(path) and os.path.exists(os.path.join(st.root, "damaged", m.chunks[1].hex()))
    assert verify(repo, ["s0"]).problems[0].reason == "missing"
    store_image(repo, "s2", data)  # the next backup of that data stores the chunk again
    assert verify(repo, ["s0", "s1", "s2"]).ok  # which heals every snapshot that uses it
    for name in ("s0", "s1", "s2"):
        buf = bytearray(len(data))
        asyncio.run(SnapshotImage(repo, repo.load_snapshot(name)).pread(memoryview(buf), 0))
        assert bytes(buf) == data
    with st.lock(exclusive=True):
        assert repo.gc() == (0, 2)  # the moved copy is not a chunk: gc leaves it to the operator
    assert os.path.exists(os.path.join(st.root, "damaged", m.chunks[1].hex()))


def test_a_deleted_snapshot_is_durably_gone_before_gc_can_follow(tmp_path, monkeypatch):
    """`DirStore.delete` of a snapshot fsyncs its directory (a power loss after the gc
    that followed must not bring the snapshot back without its chunks); a chunk's
    deletion (gc's many unlinks) does not."""
    import nbdbackup.agent.repo as repo_mod

    st = DirStore(str(tmp_path / "r"), batch=False)
    st.put("snapshots/a", b"x")
    st.put("chunks/ab/" + "ab" * 32, b"y")
    synced: list[str] = []
    real = repo_mod._fsync_dir
    monkeypatch.setattr(repo_mod, "_fsync_dir", lambda d: (synced.append(d), real(d)))
    st.delete("chunks/ab/" + "ab" * 32)
    assert synced == []
    st.delete("snapshots/a")
    assert synced == [os.path.join(str(tmp_path / "r"), "snapshots")]
    assert not os.path.exists(os.path.join(str(tmp_path / "r"), "snapshots", "a"))
    st.delete("snapshots/a")  # gone already: nothing to sync
    assert len(synced) == 1


def test_init_makes_the_new_repository_directories_durable_in_their_parents(tmp_path, monkeypatch):
    """A directory's entry is durable only once its parent is fsynced: `repo init` of a new
    ``a/b/r`` fsyncs ``a/b``, ``a`` and ``tmp_path`` (the repository's flush covers ``r`` and
    below only).  tests/interop/test_powercut.py loses the repository on a power cut without."""
    import nbdbackup.agent.repo as repo_mod

    from nbdbackup import durable

    synced: list[str] = []
    real = durable.fsync_dir
    record = lambda d: (synced.append(os.path.abspath(d)), real(d))  # noqa: E731
    monkeypatch.setattr(repo_mod, "_fsync_dir", record)  # the repository's own flush
    monkeypatch.setattr(durable, "fsync_dir", record)  # the directories init makes
    root = tmp_path / "a" / "b" / "r"
    Repository.init(DirStore(str(root)), C)
    for d in (tmp_path, tmp_path / "a", tmp_path / "a" / "b", root):
        assert str(d) in synced, (d, synced)
