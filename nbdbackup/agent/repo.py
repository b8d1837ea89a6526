"""Chunk repository: deduplicated, content-addressed backups (incremental forever).

Role: where the pull agent keeps backups when it is given ``--repo``.  A
snapshot is a `Manifest` (blake3 digest per chunk) plus metadata; a chunk is
stored once, under its digest, however many snapshots or offsets use it.  An
incremental pull reads only dirty ranges from the source, patches them into
the base snapshot's chunks and stores only chunks it has not seen: every
snapshot is complete on its own (incremental forever, no chains to merge),
and deleting one never breaks another.

Layout over an `ObjectStore` (keys are '/'-separated paths)::

    config.json                 {"format": "nbdbackup-repo", "version": 1, "chunk_size": N}
    chunks/<2 hex>/<64 hex>     a chunk's bytes (the digest is blake3 of exactly them)
    snapshots/<name>.json       {"name", "created", "source", "parent", "manifest": {...}, "meta"?: {...}}
    locks/...                   S3 only: lease objects (see `agent.s3store`)

``created`` is when the snapshot was saved (ISO 8601, UTC, in seconds);
``repo prune`` (`agent.retention`) buckets snapshots by it.

All-zero chunks are never stored (their digest is recognised).  Chunks are
written before the snapshot that references them, so an interrupted pull
leaves at worst unreferenced chunks, which `Repository.gc` removes.

`DirStore` keeps the objects as files under a directory (written to a
temporary name, fsynced, renamed; the directories are fsynced before a
snapshot is written, so a crash cannot keep a snapshot and lose its chunks).  Its lock is ``flock`` on ``<dir>/lock``:
pulls take it shared, ``gc``, ``delete`` and ``prune`` exclusive (without
waiting: a busy repository is an error), so ``gc`` never removes the chunks
of a pull in progress, nor ``prune`` its base.  The store interface is small on
purpose (put/put_new/get/exists/list/list_times/delete/delete_many/mtime/lock), so that
`agent.s3store.S3Store` (``s3://BUCKET/PREFIX``) implements it too;
`open_store` picks the store from the repository argument.  ``gc`` never
removes a chunk younger than the store's ``gc_grace`` seconds (0 for a
directory, whose flock is exact; an hour on S3, whose leases can expire
under a stalled holder).  Not yet: compression, encryption.

Invariants: `get_chunk` never returns bytes whose blake3 differs from the
digest asked for (it raises `CorruptChunk`, an ``OSError(EIO)``); a snapshot
is saved only after all its chunks are stored.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
from collections import OrderedDict
from typing import Any, Iterator, Sequence

from ..blockdev.base import BASE_ALLOCATION, HOLE_ZERO, BlockDev, Buffer, BlockSize, Capabilities, Extent
from ..errors import ConfigError
from .manifest import DEFAULT_CHUNK, Manifest, digest, zero_digest

FORMAT = "nbdbackup-repo"
VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


class CorruptChunk(OSError):
    """A stored chunk is missing or does not hash to its name."""

    def __init__(self, hexdigest: str, why: str) -> None:
        super().__init__(errno.EIO, f"chunk {hexdigest}: {why}")
        self.hexdigest = hexdigest


class DirStore:
    """Objects as files under ``root`` (see the module doc)."""

    #: gc keeps unreferenced chunks younger than this (seconds): none here (flock is exact).
    gc_grace = 0.0

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        #: Directories that got new entries since the last `flush` (their
        #: renames are not durable until the directory is fsynced).
        self._dirty_dirs: set[str] = set()

    def _path(self, key: str) -> str:
        assert ".." not in key.split("/") and not key.startswith("/"), key
        return os.path.join(self.root, *key.split("/"))

    def put(self, key: str, data: Buffer) -> None:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}.{id(data)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            mv = memoryview(data).cast("B")
            done = 0
            while done < len(mv):
                done += os.write(fd, mv[done:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        d = os.path.dirname(path)
        while d.startswith(self.root):  # the file's directory and any it had to create
            self._dirty_dirs.add(d)
            if d == self.root:
                break
            d = os.path.dirname(d)

    def put_new(self, key: str, data: Buffer) -> bool:
        """Write ``key`` unless it exists; True if this call wrote it."""
        if self.exists(key):
            return False
        self.put(key, data)
        return True

    def create(self) -> None:
        os.makedirs(self.root, exist_ok=True)

    def check_lock(self) -> None:
        """An flock cannot be lost while held: nothing to check."""

    def flush(self) -> None:
        """Make every `put` so far durable (fsync the directories it changed)."""
        dirs, self._dirty_dirs = self._dirty_dirs, set()
        for d in sorted(dirs, key=len, reverse=True):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def get(self, key: str) -> bytes:
        with open(self._path(key), "rb") as f:
            return f.read()

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, self.root)
            for f in files:
                if ".tmp." not in f:
                    yield f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}"

    def list_times(self, prefix: str) -> Iterator[tuple[str, float]]:
        """``(key, mtime)`` for each key under ``prefix``."""
        for k in self.list(prefix):
            with contextlib.suppress(FileNotFoundError):
                yield k, self.mtime(k)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def delete_many(self, keys) -> None:
        for key in keys:
            self.delete(key)

    def mtime(self, key: str) -> float:
        """When the object was last written (seconds since the epoch)."""
        return os.stat(self._path(key)).st_mtime

    @contextlib.contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"repository {self.root} is busy ({'in use' if exclusive else 'being cleaned'})"
                                  ) from None
            yield
        finally:
            os.close(fd)


#: What `Repository` needs of a store: `DirStore` or `agent.s3store.S3Store`.
Store = Any


def open_store(spec: str, *, endpoint: str | None = None) -> Store:
    """The store of a repository argument: ``s3://BUCKET/PREFIX`` -> `S3Store`,
    a path -> `DirStore`.  ``endpoint`` (``--s3-endpoint``) is for s3:// only."""
    if spec.startswith("s3://"):
        from .s3store import S3Store

        return S3Store(spec, endpoint=endpoint)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", spec):
        raise ConfigError(f"{spec!r}: a repository is a directory or s3://BUCKET/PREFIX")
    if endpoint:
        raise ConfigError("--s3-endpoint is for s3:// repositories")
    return DirStore(spec)


def _chunk_key(d: bytes) -> str:
    h = d.hex()
    return f"chunks/{h[:2]}/{h}"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"bad snapshot name {name!r}: letters, digits and . _ @ + - (at most 128)")
    return name


class Repository:
    """A chunk repository over a store (see the module doc)."""

    def __init__(self, store: Store, chunk_size: int) -> None:
        self.store = store
        self.chunk_size = chunk_size

    @classmethod
    def init(cls, store: Store, chunk_size: int = DEFAULT_CHUNK) -> "Repository":
        Manifest(0, chunk_size)  # validates the chunk size
        if store.exists("config.json"):
            raise ConfigError(f"{store.root} already holds a repository")
        store.create()
        store.put("config.json", json.dumps({"format": FORMAT, "version": VERSION,
                                             "chunk_size": chunk_size}).encode())
        return cls(store, chunk_size)

    @classmethod
    def open(cls, store: Store) -> "Repository":
        try:
            cfg = json.loads(store.get("config.json"))
        except FileNotFoundError:
            raise ConfigError(f"{store.root} is not a repository (run 'nbdbackup repo init')") from None
        except ValueError as e:
            raise ConfigError(f"{store.root}/config.json is damaged: {e}") from None
        if cfg.get("format") != FORMAT or cfg.get("version") != VERSION:
            raise ConfigError(f"{store.root}: not an {FORMAT} version {VERSION} repository")
        return cls(store, int(cfg["chunk_size"]))

    # -- chunks ---------------------------------------------------------------

    def chunk_id(self, data: Buffer) -> bytes:
        """The id a chunk holding ``data`` is stored under (callers never hash chunks themselves)."""
        return digest(data)

    def zero_id(self, length: int) -> bytes:
        """The id of an all-zero chunk of ``length`` bytes (never stored)."""
        return zero_digest(length)

    def put_chunk(self, d: bytes, data: Buffer) -> bool:
        """Store ``data`` under digest ``d`` unless known; True if it was new."""
        if d == zero_digest(len(memoryview(data))):
            return False
        key = _chunk_key(d)
        if self.store.exists(key):  # saves the upload of a known chunk
            return False
        return self.store.put_new(key, data)

    def get_chunk(self, d: bytes, length: int) -> bytes:
        """The bytes of chunk ``d`` (``length`` long), checked against ``d``."""
        if d == zero_digest(length):
            return bytes(length)
        try:
            data = self.store.get(_chunk_key(d))
        except FileNotFoundError:
            raise CorruptChunk(d.hex(), "missing") from None
        if len(data) != length or digest(data) != d:
            raise CorruptChunk(d.hex(), "does not match its blake3 digest")
        return data

    # -- snapshots ------------------------------------------------------------

    def save_snapshot(self, name: str, man: Manifest, *, source: str = "", parent: str | None = None,
                      meta: dict | None = None) -> None:
        """Record snapshot ``name`` (its chunks must be stored already).  ``meta``:
        optional JSON-able facts kept under the document's ``"meta"`` key (the
        backup agent's bitmap, base and point in time: `agent.workflow`)."""
        check_name(name)
        if man.chunk_size != self.chunk_size:
            raise ConfigError(f"manifest chunk size {man.chunk_size} != repository's {self.chunk_size}")
        doc = {"name": name, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "source": source, "parent": parent, "manifest": man.to_json()}
        if meta:
            doc["meta"] = meta
        self.store.flush()  # the chunks it names are durable before the snapshot exists
        self.store.check_lock()  # and gc cannot have run meanwhile (an S3 lease may expire)
        self.store.put(f"snapshots/{name}.json", json.dumps(doc, separators=(",", ":")).encode())
        self.store.flush()

    def snapshot_info(self, name: str) -> dict:
        check_name(name)
        try:
            info = json.loads(self.store.get(f"snapshots/{name}.json"))
        except FileNotFoundError:
            raise ConfigError(f"no snapshot {name!r} in {self.store.root}") from None
        except ValueError as e:
            raise ConfigError(f"snapshot {name!r} in {self.store.root} is damaged: {e}") from None
        if not isinstance(info, dict):
            raise ConfigError(f"snapshot {name!r} in {self.store.root} is damaged: not a JSON object")
        return info

    def load_snapshot(self, name: str) -> Manifest:
        return Manifest.from_json(self.snapshot_info(name).get("manifest"), f"snapshot {name}")

    def has_snapshot(self, name: str) -> bool:
        return self.store.exists(f"snapshots/{check_name(name)}.json")

    def snapshots(self) -> list[str]:
        return sorted(k[len("snapshots/"):-len(".json")] for k in self.store.list("snapshots")
                      if k.endswith(".json"))

    def snapshot_time(self, name: str, info: dict | None = None) -> tuple[datetime.datetime, bool]:
        """When the snapshot was written (aware, UTC) and whether that is a guess.

        Its ``created`` field (written by `save_snapshot` since the first
        version; a time without zone is taken as UTC); for a snapshot file
        without a readable one, the file's mtime (second value True).
        """
        info = self.snapshot_info(name) if info is None else info
        created = info.get("created")
        if isinstance(created, str):
            try:
                t = datetime.datetime.fromisoformat(created)
            except ValueError:
                pass
            else:
                return (t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)).astimezone(
                    datetime.timezone.utc), False
        mtime = self.store.mtime(f"snapshots/{name}.json")
        return datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc), True

    def delete_snapshot(self, name: str) -> None:
        if not self.has_snapshot(name):
            raise ConfigError(f"no snapshot {name!r} in {self.store.root}")
        self.store.delete(f"snapshots/{name}.json")

    # -- maintenance ---------------------------------------------------------

    def referenced(self, names: Sequence[str] | None = None) -> set[bytes]:
        """Digests of the stored chunks that the snapshots ``names`` (default: all) use."""
        out: set[bytes] = set()
        for name in self.snapshots() if names is None else names:
            man = self.load_snapshot(name)
            for i, d in enumerate(man.chunks):
                if d != zero_digest(man.chunk_range(i)[1]):
                    out.add(d)
        return out

    def stored(self) -> set[bytes]:
        return {bytes.fromhex(k.rsplit("/", 1)[1]) for k in self.store.list("chunks")}

    def verify(self, names: Sequence[str] | None = None) -> list[tuple[str, int, str]]:
        """Problems as ``(snapshot, chunk index, reason)``; empty when every
        chunk of the snapshots is present and hashes right."""
        problems: list[tuple[str, int, str]] = []
        checked: dict[bytes, str | None] = {}
        for name in names if names is not None else self.snapshots():
            man = self.load_snapshot(name)
            for i, d in enumerate(man.chunks):
                n = man.chunk_range(i)[1]
                if d not in checked:
                    try:
                        self.get_chunk(d, n)
                        checked[d] = None
                    except CorruptChunk as e:
                        checked[d] = e.strerror.split(": ", 1)[1]
                if checked[d] is not None:
                    problems.append((name, i, checked[d]))
        return problems

    def gc(self, grace: float | None = None) -> tuple[int, int]:
        """Remove unreferenced chunks older than ``grace`` seconds (default: the
        store's ``gc_grace``); return (removed, kept).  Caller holds the exclusive lock."""
        import time

        grace = self.store.gc_grace if grace is None else grace
        keep = self.referenced()
        limit = time.time() - grace
        doomed = [key for key, mtime in self.store.list_times("chunks")
                  if bytes.fromhex(key.rsplit("/", 1)[1]) not in keep and not (grace > 0 and mtime > limit)]
        self.store.delete_many(doomed)
        return len(doomed), len(keep)


class SnapshotImage(BlockDev):
    """A snapshot of a repository as a read-only `BlockDev` (chunks checked as read).

    Fields: ``repo``; ``man`` (its manifest); ``_cache`` (a few recently read
    chunks, index -> bytes, oldest first).
    """

    CACHE = 8

    def __init__(self, repo: Repository, man: Manifest) -> None:
        self.repo, self.man = repo, man
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    @property
    def size(self) -> int:
        return self.man.size

    def capabilities(self) -> Capabilities:
        return Capabilities(read_only=True, can_extents=True, can_multi_conn=True,
                            block_size=BlockSize(1, 4096, 32 * 1024 * 1024))

    def meta_contexts(self) -> Sequence[str]:
        return (BASE_ALLOCATION,)

    def chunk(self, i: int) -> bytes:
        data = self._cache.get(i)
        if data is None:
            data = self.repo.get_chunk(self.man.chunks[i], self.man.chunk_range(i)[1])
            self._cache[i] = data
            if len(self._cache) > self.CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(i)
        return data

    def read_sync(self, buf: memoryview, offset: int) -> None:
        pos, end = offset, offset + len(buf)
        while pos < end:
            i = pos // self.man.chunk_size
            c_off, c_len = self.man.chunk_range(i)
            n = min(end, c_off + c_len) - pos
            buf[pos - offset : pos - offset + n] = self.chunk(i)[pos - c_off : pos - c_off + n]
            pos += n

    async def pread(self, buf: memoryview, offset: int) -> None:
        self.read_sync(buf, offset)

    async def pwrite(self, buf: Buffer, offset: int, *, fua: bool = False) -> None:
        raise OSError(errno.EROFS, "repository snapshots are read-only")

    async def flush(self) -> None:
        pass

    async def extents(self, offset: int, length: int, context: str = BASE_ALLOCATION) -> list[Extent]:
        return self.extents_sync(offset, length)

    def extents_sync(self, offset: int, length: int) -> list[Extent]:
        """``base:allocation``: all-zero chunks are holes, the rest data."""
        out: list[Extent] = []
        end = offset + length
        for i in self.man.chunks_of(offset, length):
            c_off, c_len = self.man.chunk_range(i)
            s, e = max(offset, c_off), min(end, c_off + c_len)
            f = HOLE_ZERO if self.man.chunks[i] == zero_digest(c_len) else 0
            if out and out[-1].flags == f and out[-1].end == s:
                out[-1] = Extent(out[-1].offset, out[-1].length + e - s, f)
            else:
                out.append(Extent(s, e - s, f))
        return out
