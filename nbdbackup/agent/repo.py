"""Chunk repository: deduplicated, content-addressed backups (incremental forever).

Role: where the pull agent keeps backups when it is given ``--repo``.  A
snapshot is a `Manifest` (blake3 digest per chunk) plus metadata; a chunk is
stored once, under its digest, however many snapshots or offsets use it.  An
incremental pull reads only dirty ranges from the source, patches them into
the base snapshot's chunks and stores only chunks it has not seen: every
snapshot is complete on its own (incremental forever, no chains to merge),
and deleting one never breaks another.

Layout over an `ObjectStore` (keys are '/'-separated paths), format 2::

    config.json                 {"format": "nbdbackup-repo", "version": 2, "id": "<32 hex>",
                                 "chunk_size": N, "encryption": "none|repokey|keyfile",
                                 "compression": "zstd|zstd:LEVEL|none"}  (plain JSON: read before any
                                key; "zstd" = adaptive: level 3 for a full backup's chunks, 1 for an
                                incremental's, `agent.codec.Compression`)
    keys/repokey                ``repokey`` only: the wrapped master key (`agent.crypto`)
    chunks/<2 hex>/<64 hex>     a chunk, encoded by `agent.codec` (zstd when it pays, AES-256-GCM
                                when encrypted); its name is the chunk's id: blake3 of its
                                plaintext, keyed with the id key when the repository is encrypted
    snapshots/<name>            "NBDS" u8 version u32 meta_len, then two `agent.codec` envelopes:
                                metadata (JSON {"name", "created", "source", "parent", "size",
                                "chunk_size", "root", "meta"?} + its blake3; associated name
                                "snapshots/<name>#meta") and the packed 32-byte chunk ids
                                (zstd-compressed; "snapshots/<name>#digests")
    locks/...                   S3 only: lease objects (see `agent.s3store`)
    damaged/<64 hex>            a chunk that failed its check, moved aside by `Repository.quarantine`
                                (``repo verify --repair``), so the next pull of its data stores it again

A snapshot's ``root`` is the blake3 of its packed ids (`Manifest.root`), so
the two envelopes cannot be mixed between snapshots; `snapshot_info` reads
only the object's first bytes (`get_range`), `load_snapshot` the whole
object in one GET (never a listing).  A 1 TiB disk in 1 MiB chunks (`DEFAULT_REPO_CHUNK`) has
1048576 ids: 32 MiB packed at most (4 MiB chunks: 8 MiB), a few KiB when mostly holes.  In an
encrypted repository everything but config.json, the key blob (itself
wrapped) and the object sizes and times is opaque to the store's operator.

``created`` is when the snapshot was saved (ISO 8601, UTC, in seconds);
``repo prune`` (`agent.retention`) buckets snapshots by it.

All-zero chunks are never stored (their digest is recognised).  Chunks are
written before the snapshot that references them, so an interrupted pull
leaves at worst unreferenced chunks, which `Repository.gc` removes.

`DirStore` keeps the objects as files under a directory (written to a
temporary name, fsynced, renamed; the directories are fsynced before a
snapshot is written, so a crash cannot keep a snapshot and lose its chunks).
Chunks are committed in groups: a chunk's temporary file is written and its
write-back started at once, but fsynced and renamed to its name only at the
next `DirStore.flush` (or when `BATCH_FILES` / `BATCH_BYTES` are pending), all
together -- one journal commit for the group instead of one per chunk.  On
Linux >= 5.8 with little other dirty data on the machine, the group commit is
two ``syncfs`` of the repository's file system instead (one before the renames,
one after: `DirStore._whole_fs_commit`; only on ext2/3/4, XFS, Btrfs, F2FS and
tmpfs, whose syncfs is known to be complete; ``NBDBACKUP_SYNCFS=0`` turns it off).  A
file under a chunk's name is therefore always complete and durable; a crash
leaves at worst temporary files, which `Repository.gc` removes.  Its lock is ``flock`` on ``<dir>/lock``:
pulls take it shared, ``gc``, ``delete`` and ``prune`` exclusive (without
waiting: a busy repository is an error), so ``gc`` never removes the chunks
of a pull in progress, nor ``prune`` its base.  The store interface is small on
purpose (put/put_new/get/get_range/exists/list/list_times/delete/delete_many/mtime/now/lock;
get_range is optional: without it `snapshot_info` reads the whole object; so is
get_into, `DirStore`'s read into a caller's buffer for `Repository.get_chunk_into`), so that
`agent.s3store.S3Store` (``s3://BUCKET/PREFIX``) implements it too;
`open_store` picks the store from the repository argument.  ``gc`` never
removes a chunk younger than the store's ``gc_grace`` seconds (0 for a
directory, whose flock is exact; an hour on S3, whose leases can expire
under a stalled holder).

Invariants: `get_chunk` never returns bytes whose id differs from the id
asked for, nor bytes that fail authentication (it raises `CorruptChunk`, an
``OSError(EIO)``, naming the chunk); a snapshot object that is damaged,
truncated, renamed or from another repository is a `ConfigError` naming
the snapshot; a snapshot is saved only after all its chunks are stored;
chunk ids are computed only by `Repository.chunk_id`/`zero_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import fcntl
import itertools
import json
import os
import re
import struct
import threading
from collections import OrderedDict
from typing import Any, Iterator, Sequence

import blake3

from . import crypto
from ..blockdev.base import BASE_ALLOCATION, HOLE_ZERO, BlockDev, Buffer, BlockSize, Capabilities, Extent
from .. import durable
from ..errors import ConfigError
from .codec import Codec, CodecError, Compression, parse_compression
from .crypto import MasterKey, Passphrase
from .manifest import Manifest, digest, zero_digest

FORMAT = "nbdbackup-repo"
VERSION = 2
CONFIG = "config.json"
REPOKEY = "keys/repokey"
ENCRYPTIONS = ("none", "repokey", "keyfile")
SNAP_MAGIC = b"NBDS"
#: After `SNAP_MAGIC`: format version (u8), length of the metadata envelope (u32, big-endian).
_SNAP_HEAD = struct.Struct(">BI")
#: Largest snapshot metadata (JSON + checksum) accepted.
META_MAX = 64 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
#: Chunk size of new repositories (``repo init --chunk-size``; a repository keeps the one in its
#: config.json).  1 MiB, not the manifests' 4 MiB: a write anywhere in a chunk stores the whole
#: chunk again, so an incremental of scattered 64 KiB-4 MiB changes stores about half as much
#: (restic's content-defined chunks average 1 MiB too); docs/incr.md has the measurements.
DEFAULT_REPO_CHUNK = 1 << 20
#: `Repository.snapshot_infos` reads this many snapshots' metadata at once from a remote store.
INFO_READS = 16
#: `Repository.chunk_ids` finds a snapshot's holes with numpy from this many chunks up.
NUMPY_IDS = 1 << 16
#: `Repository.gc` deletes in batches of this many chunks (one S3 DeleteObjects each) and
#: checks its lock before each (`S3Store.check_lock`).
GC_BATCH = 1000


#: Largest single write of `DirStore.put`: 4 MiB writes into a new file sometimes
#: ran 3-5x slower (and cost 4-6x the CPU, in copy_folio_from_iter_atomic) than
#: four 1 MiB ones (256 encrypted 4 MiB chunks, 8 threads: 0.8-3.8 s vs 0.6-0.7 s);
#: see also `agent.pull.MAX_READ`.
_PUT_MAX = 1 << 20

#: Group commit of chunk files (`DirStore`): at most this many written but not yet durable
#: (fsynced and renamed) at a time, and at most this many bytes in them.
BATCH_FILES = 256
BATCH_BYTES = 256 << 20
#: Group commits by ``syncfs`` where `DirStore._whole_fs_commit` allows it (``NBDBACKUP_SYNCFS=0``:
#: never, fsyncs only) ...
SYNCFS = os.environ.get("NBDBACKUP_SYNCFS", "1") != "0"
#: ... and the most dirty page-cache data besides the group's own for which it does (64 MiB).
SYNCFS_OTHER_DIRTY = 64 << 20
#: Temporary names: unique in this process even when two puts hand the same buffer object.
_tmp_seq = itertools.count()

_tls = threading.local()


def _read_buffer(n: int) -> memoryview:
    """This thread's buffer for stored objects read by `Repository.get_chunk_into`
    (at least ``n`` bytes; grown, never shrunk)."""
    buf = getattr(_tls, "read", None)
    if buf is None or len(buf) < n:
        buf = _tls.read = bytearray(n)
    return memoryview(buf)


class CorruptChunk(OSError):
    """A stored chunk is missing or does not hash to its name."""

    def __init__(self, hexdigest: str, why: str) -> None:
        super().__init__(errno.EIO, f"chunk {hexdigest}: {why}")
        self.hexdigest = hexdigest


class SnapshotExists(ConfigError):
    """`Repository.save_snapshot` with ``new_only``: a snapshot of that name exists."""


class DirStore:
    """Objects as files under ``root`` (see the module doc).

    Chunks (keys under ``chunks/``) are committed in groups when ``batch`` is
    true (the default): `put` writes the temporary file and starts its
    write-back; `flush` (or a full group) fsyncs every pending file, renames
    them to their names, then fsyncs the directories.  Until then a pending
    chunk is readable by this process (`get`, `exists`...) through its
    temporary file, but not by others.  Other keys (snapshots, config, keys)
    are durable under their name when `put` returns, once `flush` has run
    for their directory.
    """

    #: gc keeps unreferenced chunks younger than this (seconds): none here (flock is exact).
    gc_grace = 0.0

    def __init__(self, root: str, *, batch: bool = True) -> None:
        self.root = os.path.abspath(root)
        #: Group commit of chunks on (see the class doc); False: each chunk fsynced and renamed in `put`.
        self.batch = batch
        #: Directories that got new entries since the last `flush` (their
        #: renames are not durable until the directory is fsynced); under ``_lock``.
        self._dirty_dirs: set[str] = set()
        #: Chunks written but not yet committed: key -> (open fd, temporary path, final path,
        #: bytes); under ``_lock`` (puts come from worker threads).
        self._pending: dict[str, tuple[int, str, str, int]] = {}
        #: Bytes in ``_pending``.
        self._pending_bytes = 0
        #: Chunks of the group being committed (out of ``_pending``, not yet renamed): readers
        #: still find them through their temporary files; under ``_lock``.
        self._committing: dict[str, tuple[int, str, str, int]] = {}
        self._lock = threading.Lock()
        #: Held through a whole `_commit` (one group at a time: a `flush` that commits after
        #: another thread's group started waits for its renames) ...
        self._commit_lock = threading.Lock()
        #: ... and through a whole `flush` (two disks of one agent run flush at once: the second
        #: must not write its snapshot before the first's directory fsyncs, which may cover its
        #: chunks, are done).
        self._flush_lock = threading.Lock()
        #: A descriptor of ``root``, opened before the first chunk is written and kept: the
        #: group commit's ``syncfs`` reports the file system's write-back errors since it was
        #: opened (`_whole_fs_commit`); None until then (or when syncfs is not used: off, or
        #: ``root``'s file system is not one whose syncfs is known to be complete).
        self._fs_fd: int | None = None
        #: Whether `_open_fs_fd` looked already (it does once).
        self._fs_checked = False

    def __del__(self) -> None:
        fd, self._fs_fd = getattr(self, "_fs_fd", None), None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _path(self, key: str) -> str:
        assert ".." not in key.split("/") and not key.startswith("/"), key
        return os.path.join(self.root, *key.split("/"))

    def _read_path(self, key: str) -> str:
        """Where ``key``'s bytes are now: its pending temporary file, else its name.
        (A commit may rename the temporary file right after: see `_reading`.)"""
        with self._lock:
            p = self._pending.get(key) or self._committing.get(key)
        return p[1] if p is not None else self._path(key)

    def _reading(self, key: str, fn):
        """``fn(path)`` on ``key``'s current path; if its temporary file was renamed
        meanwhile (FileNotFoundError), on its name."""
        p = self._read_path(key)
        try:
            return fn(p)
        except FileNotFoundError:
            if p == self._path(key):
                raise
            return fn(self._path(key))

    @staticmethod
    def _write_tmp(path: str, mv: memoryview, sync: bool) -> tuple[int, str]:
        """A new temporary file beside ``path`` holding ``mv``, fsynced if ``sync``:
        ``(its open descriptor, its name)``.  On a failure nothing is left behind."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}.{next(_tmp_seq)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            done = 0
            while done < len(mv):  # at most 1 MiB a call: see `_PUT_MAX`
                done += os.write(fd, mv[done : done + _PUT_MAX])
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return fd, tmp

    def put(self, key: str, data: Buffer) -> None:
        path = self._path(key)
        mv = memoryview(data).cast("B")
        batched = self.batch and key.startswith("chunks/")
        if batched and not self._fs_checked and SYNCFS:
            self._open_fs_fd()
        fd, tmp = self._write_tmp(path, mv, sync=not batched)
        if not batched:
            os.close(fd)
            os.replace(tmp, path)
            self._dirtied(path)
            return
        _start_writeback(fd)
        with self._lock:
            dup = key in self._pending or key in self._committing
            if not dup:
                self._pending[key] = (fd, tmp, path, len(mv))
                self._pending_bytes += len(mv)
                full = len(self._pending) >= BATCH_FILES or self._pending_bytes >= BATCH_BYTES
        if dup:  # the same content, written meanwhile by another thread
            os.close(fd)
            os.unlink(tmp)
        elif full:
            self._commit()

    def _dirtied(self, path: str) -> None:
        d = os.path.dirname(path)
        with self._lock:  # (a commit on a worker thread may rename while `flush` takes the set)
            while d.startswith(self.root):  # the file's directory and any it had to create
                self._dirty_dirs.add(d)
                if d == self.root:
                    break
                d = os.path.dirname(d)

    def _open_fs_fd(self) -> None:
        """Open `_fs_fd` (once; before the first chunk's file is written) if ``root`` is on a
        file system whose syncfs is known to be complete (`writeback.SYNCFS_FILE_SYSTEMS`)."""
        from ..blockdev import writeback

        with self._lock:
            if self._fs_checked:
                return
            self._fs_checked = True
            os.makedirs(self.root, exist_ok=True)
            if writeback.fs_type(self.root) in writeback.SYNCFS_FILE_SYSTEMS:
                self._fs_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _whole_fs_commit(self, nbytes: int) -> bool:
        """Whether this group commit makes its files durable with two ``syncfs`` of the
        repository's file system instead of an fsync per file and per directory: only when
        syncfs reports write-back errors (Linux >= 5.8; `_fs_fd` was opened before the
        group's files were written, so none of their errors can pass unseen) and the
        machine holds little dirty data besides the group's own (`SYNCFS_OTHER_DIRTY`:
        syncfs writes back *everything* of the file system, another program's too, and
        waits for it)."""
        if self._fs_fd is None or not SYNCFS:
            return False
        from ..blockdev import writeback

        if not writeback.syncfs_reports_errors():
            return False
        dirty = writeback.dirty_bytes()
        return 0 <= dirty <= nbytes + SYNCFS_OTHER_DIRTY

    def _commit(self) -> None:
        """Make the pending chunks durable and give them their names: fsync them all
        (on threads at once: the file system commits them together), then rename.
        On a failure none of the group is renamed: their temporary files are removed.

        When `_whole_fs_commit` says so, ``syncfs`` instead: one before the renames (every
        file of the group durable, its errors reported), one after (the renames and the
        directories that hold them durable, so those directories need no fsync of their
        own at `flush`).  ~90 chunks in ~80 directories: 2 calls instead of ~170 fsyncs,
        ~13 -> ~4 ms."""
        from ..blockdev import writeback

        with self._commit_lock:
            with self._lock:
                group, nbytes, self._pending, self._pending_bytes = self._pending, self._pending_bytes, {}, 0
                self._committing = dict(group)
            if not group:
                return
            whole_fs = self._whole_fs_commit(nbytes)
            try:
                if whole_fs:
                    writeback.syncfs(self._fs_fd)
                else:
                    _on_threads(os.fsync, [fd for fd, _, _, _ in group.values()])
            except BaseException:
                with self._lock:
                    self._committing = {}
                _drop_files(group)
                raise
            for key, (fd, tmp, path, _) in group.items():
                os.close(fd)
                os.replace(tmp, path)
                self._dirtied(path)
                with self._lock:
                    del self._committing[key]
            if whole_fs:
                with self._lock:  # entries made after this are not covered: left to `flush`
                    dirs, self._dirty_dirs = self._dirty_dirs, set()
                try:
                    writeback.syncfs(self._fs_fd)
                except BaseException:
                    with self._lock:
                        self._dirty_dirs |= dirs
                    raise

    def put_new(self, key: str, data: Buffer) -> bool:
        """Write ``key`` unless it exists; True if this call wrote it.

        A chunk (same key, same bytes: whoever wins wrote the same content) is checked then
        written.  Any other key (a snapshot) is created atomically, like S3's conditional PUT:
        its durable temporary file is hard-linked to the name, which fails if another writer
        (another process) created it since the check; a rename would replace theirs."""
        if self.exists(key):
            return False
        if key.startswith("chunks/"):
            self.put(key, data)
            return True
        path = self._path(key)
        fd, tmp = self._write_tmp(path, memoryview(data).cast("B"), sync=True)
        os.close(fd)
        try:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as e:  # a file system without hard links: check-then-rename, racy
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                if os.path.exists(path):
                    return False
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._dirtied(path)
        return True

    def create(self) -> None:
        """Make the repository's directory and any missing parent, each one's entry durable in
        its parent (an fsync of the parent): the repository's own `flush` fsyncs ``root`` and
        below only, so without this a power loss after ``repo init`` (and after pulls that
        reported success) could lose the whole repository (tests/interop/test_powercut.py)."""
        durable.makedirs_durable(self.root)

    def check_lock(self) -> None:
        """An flock cannot be lost while held: nothing to check."""

    def flush(self) -> None:
        """Make every `put` so far durable under its name: commit the pending
        chunks (`_commit`), then fsync the directories that changed.

        Many directories (an incremental's chunks land in up to 256 ``chunks/xx``)
        are fsynced on threads at once: the file system commits them together
        (one ext4 journal commit instead of one per directory; 0.18 -> 0.02 s
        for ~90 new 1 MiB chunks).  All are done before this returns."""
        with self._flush_lock:
            self._commit()
            with self._lock:
                dirs, self._dirty_dirs = self._dirty_dirs, set()
            _on_threads(_fsync_dir, sorted(dirs, key=len, reverse=True))

    def get(self, key: str) -> bytes:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return self._reading(key, read)

    def get_into(self, key: str, buf) -> int:
        """Read ``key`` into the writable buffer ``buf``; its length, or -1 if
        it is longer than ``buf`` (no allocation: the restore's path)."""
        fd = self._reading(key, lambda p: os.open(p, os.O_RDONLY | os.O_CLOEXEC))
        try:
            mv = memoryview(buf).cast("B")
            size = os.fstat(fd).st_size
            if size > len(mv):
                return -1
            done = 0
            while done < size:
                n = os.preadv(fd, [mv[done:size]], done)
                if n == 0:
                    break
                done += n
            return done
        finally:
            os.close(fd)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """At most ``length`` bytes of ``key`` from ``offset`` (fewer at its end)."""
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return os.pread(f.fileno(), length, offset)

        return self._reading(key, read)

    def exists(self, key: str) -> bool:
        return os.path.exists(self._read_path(key)) or os.path.exists(self._path(key))

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (pending chunks are committed first)."""
        self._commit()
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
        """Remove ``key``.  Anything but a chunk (a snapshot, a lock) is gone for good
        when this returns: its directory is fsynced, so a power loss after a `gc` that
        followed can never bring back a snapshot whose chunks that gc removed (chunk
        unlinks need no such order: a chunk that reappears is only unreferenced)."""
        self.delete_many((key,))

    def delete_many(self, keys) -> None:
        """`delete` of each of ``keys``, the directories of the non-chunks fsynced once at the end
        (not once per key: ``prune`` removing 1000 snapshots paid 1000 directory fsyncs)."""
        self._commit()
        dirs = set()
        for key in keys:
            path = self._path(key)
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            if not key.startswith("chunks/"):
                dirs.add(os.path.dirname(path))
        for d in sorted(dirs):
            _fsync_dir(d)

    def discard_pending(self) -> int:
        """Remove the chunks written but not committed (their temporary files; how many):
        what a writer that stops without recording a snapshot leaves -- a pull that failed
        on a full disk left the disk full, for every repository on it, until a gc.  Nothing
        pending is referenced: a snapshot is saved only after `flush` committed everything
        written before it (a chunk another disk's pull found pending went with that commit)."""
        with self._lock:
            group, self._pending, self._pending_bytes = self._pending, {}, 0
        _drop_files(group)
        return len(group)

    def sweep(self) -> int:
        """Remove temporary files left by writers that died (kill -9, a crash, a full
        disk); how many.  Only under the exclusive lock: no other writer is running."""
        self._commit()
        n = 0
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                if ".tmp." in f:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, f))
                        n += 1
        return n

    def mtime(self, key: str) -> float:
        """When the object was last written (seconds since the epoch)."""
        return self._reading(key, os.stat).st_mtime

    def now(self) -> float:
        """The clock that `mtime` is measured by (a local file system's: this host's)."""
        import time

        return time.time()

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
            try:
                yield
            finally:
                self.discard_pending()  # the session's writes no snapshot recorded
        finally:
            os.close(fd)


def _drop_files(group: dict[str, tuple[int, str, str, int]]) -> None:
    """Close and remove the temporary files of uncommitted chunks (`DirStore._pending` entries)."""
    for fd, tmp, _, _ in group.values():
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _on_threads(fn, items: list) -> None:
    """``fn(item)`` for every item, on up to 16 threads when there are more than two
    (the file system commits concurrent fsyncs together); re-raises the first failure."""
    if len(items) <= 2:
        for it in items:
            fn(it)
        return
    list(_fsync_pool().map(fn, items))  # list(): re-raises the first failure


#: The threads of `_on_threads`: 16, made at the first fan-out and kept (idle ones cost
#: nothing; joined at exit).  A pool per call started and joined ~30 threads in an
#: incremental's flush (its chunks' fsyncs, then its directories'): 19 -> 13 ms for 90
#: chunks in 80 directories (docs/incr10.md).
#: ``(pid, pool)``: a child made by fork() has none of its parent's threads, so it makes its own.
_FSYNC_POOL: tuple | None = None
_FSYNC_POOL_LOCK = threading.Lock()


def _fsync_pool():
    global _FSYNC_POOL
    with _FSYNC_POOL_LOCK:
        if _FSYNC_POOL is None or _FSYNC_POOL[0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            _FSYNC_POOL = (os.getpid(), ThreadPoolExecutor(16, thread_name_prefix="nbdbackup-fsync"))
        return _FSYNC_POOL[1]


def _start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to disk now (advisory: the commit's fsync
    then finds little left to write); nothing where sync_file_range is missing."""
    from ..blockdev import writeback

    with contextlib.suppress(OSError):
        writeback.sync_file_range(fd, 0, 0, writeback.SYNC_FILE_RANGE_WRITE)


_fsync_dir = durable.fsync_dir  # (the name this module and its tests use)


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


def _snap_key(name: str) -> str:
    return f"snapshots/{name}"


def _chunk_key(d: bytes) -> str:
    h = d.hex()
    return f"chunks/{h[:2]}/{h}"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(f"bad snapshot name {name!r}: letters, digits and . _ @ + - (at most 128)")
    return name


class ProbeGate:
    """Whether `Repository.put_chunk` asks a remote store if a chunk exists
    before encoding and uploading it.

    A probe (an S3 HEAD: one round trip, ~1 ms of client CPU) pays only when
    it hits: a chunk another snapshot already stored.  A first full backup of
    a disk into an empty repository misses on every chunk.  So: probe while
    probes hit; after `MISSES` misses in a row stop probing, and start again
    as soon as an unprobed conditional PUT finds the chunk already there (the
    store answers 412).  Only performance depends on this: the conditional
    PUT keeps a known chunk's stored copy whether or not it was probed, and
    `put_chunk`'s result ("was new") is right either way.  Stores where a
    probe is a local stat (`DirStore`: no ``remote`` attribute) always probe.

    Fields (under ``_lock``; the pull calls `put_chunk` on worker threads):
    ``misses`` (probes that missed since the last hit); ``probing`` (False
    once ``misses`` reached `MISSES`).
    """

    MISSES = 16

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.misses = 0
        self.probing = True

    def wanted(self) -> bool:
        with self._lock:
            return self.probing

    def saw(self, known: bool) -> None:
        """A probe or an unprobed PUT found the chunk ``known`` (already stored) or new."""
        with self._lock:
            if known:
                self.misses, self.probing = 0, True
            elif self.probing:
                self.misses += 1
                self.probing = self.misses < self.MISSES


class Repository:
    """A chunk repository over a store (see the module doc).

    Fields: ``store``; ``chunk_size``; ``id`` (random hex, names the
    repository in key blobs and key file paths); ``encryption`` (``none``,
    ``repokey``, ``keyfile``); ``compression`` (`agent.codec.Compression`: the
    config's setting, which level a full backup's and an incremental's chunks
    get); ``codec`` (`agent.codec.Codec`: the encryption key, and the level of
    everything but chunks: the full level); ``_master`` (the unwrapped `MasterKey`, None
    when not encrypted); ``_id_key`` (its keyed-blake3 key of chunk ids);
    ``_key_source`` (where the wrapped key was read
    from: ``("store", "keys/repokey")`` or ``("file", PATH)``; None when not
    encrypted); ``_zero`` (cache: length -> id of that many zero bytes);
    ``_whole`` ((name, object, time) of the last snapshot object `snapshot_info`
    read whole, used once by `load_snapshot` within a minute: one GET less);
    ``_probe`` (`ProbeGate`: whether `put_chunk` still asks a remote store first).
    """

    def __init__(self, store: Store, chunk_size: int, *, repo_id: str = "", encryption: str = "none",
                 codec: Codec | None = None, master: MasterKey | None = None,
                 key_source: tuple[str, str] | None = None, compression: Compression | None = None) -> None:
        self.store = store
        self.chunk_size = chunk_size
        self.id = repo_id
        self.encryption = encryption
        self.codec = codec if codec is not None else Codec(level=None)
        self.compression = compression if compression is not None else Compression.fixed(self.codec.level)
        self._id_key = master.id_key if master is not None else None
        self._master = master
        self._key_source = key_source
        self._zero: dict[int, bytes] = {}
        self._whole: tuple[str, bytes, float] | None = None
        self._probe = ProbeGate()

    @classmethod
    def init(cls, store: Store, chunk_size: int = DEFAULT_REPO_CHUNK, *, encryption: str = "none",
             compression: Compression | int | None = Compression.auto(), passphrase: Passphrase = None, key_file: str | None = None,
             log_n: int = crypto.LOG_N, kdf: str = "scrypt") -> "Repository":
        """Create a repository; ``encryption`` ``repokey``/``keyfile`` wraps a new
        master key with ``passphrase`` and keeps it in the store / in ``key_file``
        (default `crypto.default_key_path`).  ``kdf="none"`` (``keyfile`` only):
        the key file holds the key unwrapped, 0600, and no passphrase is asked
        (`crypto.plain_blob`).  ``compression``: a `Compression`, or a fixed zstd
        level (None: none); default the adaptive ``zstd``.  The config is written last."""
        comp = Compression.of(compression)
        Manifest(0, chunk_size)  # validates the chunk size
        if encryption not in ENCRYPTIONS:
            raise ConfigError(f"encryption {encryption!r}: give {', '.join(ENCRYPTIONS)}")
        if store.exists(CONFIG):
            raise ConfigError(f"{store.root} already holds a repository")
        repo_id = os.urandom(16).hex()
        master, source = None, None
        if kdf not in crypto.KDFS:
            raise ConfigError(f"kdf {kdf!r}: give {' or '.join(crypto.KDFS)}")
        if kdf == "none" and encryption != "keyfile":
            raise ConfigError("--kdf none is for --encryption keyfile (a key in the repository is always "
                              "wrapped by a passphrase; 'repo key export --kdf none' writes a local copy)")
        if encryption != "none":
            master = MasterKey.generate()
            if kdf == "none":
                blob = crypto.plain_blob(master, repo_id)
            else:
                secret = passphrase() if callable(passphrase) else passphrase
                if not secret:
                    raise ConfigError("an encrypted repository needs a passphrase")
                blob = crypto.wrap(master, secret, repo_id, log_n=log_n)
            if encryption == "keyfile":
                path = os.path.abspath(key_file or crypto.default_key_path(repo_id))
                if os.path.exists(path):
                    raise ConfigError(f"{path} exists: will not overwrite a key")
                source = ("file", path)
        elif key_file:
            raise ConfigError("--key-file is for encrypted repositories")
        store.create()
        if master is not None:
            if source is None:
                source = ("store", REPOKEY)
                store.put(REPOKEY, blob)
            else:
                crypto.write_private(source[1], blob)
        store.put(CONFIG, json.dumps({"format": FORMAT, "version": VERSION, "id": repo_id,
                                      "chunk_size": chunk_size, "encryption": encryption,
                                      "compression": comp.name}, indent=1).encode())
        store.flush()
        return cls(store, chunk_size, repo_id=repo_id, encryption=encryption, master=master, key_source=source,
                   codec=Codec(level=comp.full, key=master.enc_key if master else None), compression=comp)

    @classmethod
    def open(cls, store: Store, *, passphrase: Passphrase = None, key_file: str | None = None,
             require_encryption: bool = False) -> "Repository":
        """Open (and, when encrypted, unlock) the repository in ``store``.

        ``passphrase`` (a string, or a function asked only when the
        repository is encrypted) unwraps the key read from ``key_file`` if
        given, else from the repository (``repokey``) or the default key
        file (``keyfile``).  ``require_encryption`` (the user named a key or
        passphrase file): a repository whose config says it is not encrypted
        is refused, so a store operator who rewrites config.json cannot make
        such a client write plaintext.  Every failure is a `ConfigError`."""
        cfg = cls.config(store)
        repo_id, chunk_size, enc, comp = cfg["id"], cfg["chunk_size"], cfg["encryption"], cfg["compression"]
        if enc == "none":
            if require_encryption or key_file:
                raise ConfigError(f"{store.root} is not encrypted, but a key or passphrase file was given "
                                  "(its config.json says encryption none)")
            return cls(store, chunk_size, repo_id=repo_id, codec=Codec(level=comp.full), compression=comp)
        blob, source = cls._read_key(store, repo_id, enc, key_file)
        if source[0] == "file" and crypto.blob_kdf(blob, source[1]) == "none":  # checked private by _read_key
            master = crypto.unwrap_plain(blob, repo_id, source[1])
            return cls(store, chunk_size, repo_id=repo_id, encryption=enc, master=master, key_source=source,
                       codec=Codec(level=comp.full, key=master.enc_key), compression=comp)
        try:
            secret = passphrase() if callable(passphrase) else passphrase
        except ConfigError as e:
            raise ConfigError(f"{store.root} is encrypted: {e}") from None
        if not secret:
            raise ConfigError(f"{store.root} is encrypted: a passphrase is needed")
        master = crypto.unwrap(blob, secret, repo_id,
                               source[1] if source[0] == "file" else f"{store.root}/{source[1]}")
        return cls(store, chunk_size, repo_id=repo_id, encryption=enc, master=master, key_source=source,
                   codec=Codec(level=comp.full, key=master.enc_key), compression=comp)

    @staticmethod
    def config(store: Store) -> dict:
        """The repository's config.json, checked: ``id`` (str), ``version``,
        ``chunk_size`` (int), ``encryption``, ``compression`` (a `Compression`).
        Needs no key (``repo info``); every failure is a `ConfigError`."""
        try:
            cfg = json.loads(store.get(CONFIG))
        except FileNotFoundError:
            raise ConfigError(f"{store.root} is not a repository (run 'nbdbackup repo init')") from None
        except ValueError as e:
            raise ConfigError(f"{store.root}/{CONFIG} is damaged: {e}") from None
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            raise ConfigError(f"{store.root}: not an {FORMAT} repository")
        if cfg.get("version") == 1:
            raise ConfigError(f"{store.root}: a format-1 repository (no compression, encryption or binary "
                              f"manifests); this nbdbackup reads format {VERSION} only: create a new one with "
                              "'nbdbackup repo init' and pull into it")
        if cfg.get("version") != VERSION:
            raise ConfigError(f"{store.root}: {FORMAT} version {cfg.get('version')!r}, this nbdbackup reads "
                              f"version {VERSION}")
        try:
            out = {"id": str(cfg["id"]), "version": cfg["version"], "chunk_size": int(cfg["chunk_size"]),
                   "encryption": cfg["encryption"], "compression": parse_compression(cfg["compression"])}
            if out["encryption"] not in ENCRYPTIONS:
                raise ValueError(f"encryption {out['encryption']!r}")
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ConfigError(f"{store.root}/{CONFIG} is damaged: {e}") from None
        return out

    @staticmethod
    def snapshot_names(store: Store) -> list[str]:
        """The names of the snapshots in ``store``, sorted (a listing; no key needed)."""
        return sorted(n for n in (k[len("snapshots/"):] for k in store.list("snapshots")) if _NAME.match(n))

    @staticmethod
    def _read_key(store: Store, repo_id: str, enc: str, key_file: str | None) -> tuple[bytes, tuple[str, str]]:
        """The wrapped key blob and where it came from (see ``_key_source``)."""
        if key_file is None and enc == "repokey":
            try:
                blob = store.get(REPOKEY)
            except FileNotFoundError:
                raise ConfigError(f"{store.root}/{REPOKEY} is missing: give --key-file with an exported "
                                  "copy of the key") from None
            if crypto.blob_kdf(blob, f"{store.root}/{REPOKEY}") == "none":
                raise ConfigError(f"{store.root}/{REPOKEY} is a key without passphrase: refused (a key in the "
                                  "repository must be wrapped; the store's operator could read it)")
            return blob, ("store", REPOKEY)
        path = os.path.abspath(key_file or crypto.default_key_path(repo_id))
        try:
            with open(path, "rb") as f:
                blob = f.read()
                st = os.fstat(f.fileno())
        except OSError as e:
            raise ConfigError(f"cannot read the key of repository {repo_id} at {path}: {e.strerror or e}"
                              + ("" if key_file else " (give --key-file)")) from None
        if crypto.blob_kdf(blob, path) == "none":
            crypto.check_private(st, path)  # of the file read, not of whatever is at path now
        return blob, ("file", path)

    # -- keys -------------------------------------------------------------------

    def key_blob(self) -> bytes:
        """The wrapped key (for ``repo key export``: useless without the passphrase)."""
        if self._key_source is None:
            raise ConfigError(f"{self.store.root} is not encrypted: it has no key")
        kind, where = self._key_source
        if kind == "store":
            return self.store.get(where)
        with open(where, "rb") as f:
            return f.read()

    def plain_key_blob(self) -> bytes:
        """The key unwrapped, as a plain key file (``repo key export --kdf none``; keep it 0600)."""
        if self._master is None:
            raise ConfigError(f"{self.store.root} is not encrypted: it has no key")
        return crypto.plain_blob(self._master, self.id)

    def change_passphrase(self, passphrase: str, *, log_n: int = crypto.LOG_N) -> str:
        """Rewrap the master key under ``passphrase`` where it was read from; return where."""
        if self._master is None or self._key_source is None:
            raise ConfigError(f"{self.store.root} is not encrypted: it has no passphrase")
        blob = crypto.wrap(self._master, passphrase, self.id, log_n=log_n)
        kind, where = self._key_source
        if kind == "store":
            self.store.put(where, blob)
            self.store.flush()
            return f"{self.store.root}/{where}"
        crypto.write_private(where, blob)
        return where

    # -- chunks ---------------------------------------------------------------

    def chunk_id(self, data: Buffer) -> bytes:
        """The id a chunk holding ``data`` is stored under (callers never hash chunks themselves):
        blake3, keyed with the repository's id key when it is encrypted."""
        if self._id_key is None:
            return digest(data)
        return blake3.blake3(data, key=self._id_key).digest()

    def zero_id(self, length: int) -> bytes:
        """The id of an all-zero chunk of ``length`` bytes (never stored)."""
        d = self._zero.get(length)
        if d is None:
            d = self._zero[length] = zero_digest(length) if self._id_key is None else self.chunk_id(bytes(length))
        return d

    def put_chunk(self, d: bytes, data: Buffer, *, probe: bool = True, incremental: bool = False) -> bool:
        """Store ``data`` under id ``d`` unless known; True if it was new.
        Compresses and encrypts: call it on a worker thread.  ``incremental``:
        the chunk is written by an incremental (a pull against a base snapshot),
        compressed at the setting's incremental level (`Compression.level`).  On a remote
        store the existence check is skipped while checks keep missing
        (`ProbeGate`).  ``probe=False``:
        no existence check first (one S3 HEAD less per chunk, for chunks that
        are most likely new, e.g. an incremental's changed ones: a known one is
        encoded and sent, and the conditional PUT keeps the stored copy)."""
        if d == self.zero_id(len(memoryview(data))):
            return False
        key = _chunk_key(d)
        remote = getattr(self.store, "remote", False)
        probed = probe and (not remote or self._probe.wanted())
        if probed:
            known = self.store.exists(key)  # saves the encoding and upload of a known chunk
            if remote:
                self._probe.saw(known)
            if known:
                return False
        new = self.store.put_new(key, self.codec.encode_reused(key, data,
                                                               level=self.compression.level(incremental)))
        if remote and probe and not probed:
            self._probe.saw(not new)
        return new

    def get_chunk(self, d: bytes, length: int) -> bytes:
        """The bytes of chunk ``d`` (``length`` long), decrypted and checked against ``d``."""
        if d == self.zero_id(length):
            return bytes(length)
        key = _chunk_key(d)
        try:
            blob = self.store.get(key)
        except FileNotFoundError:
            raise CorruptChunk(d.hex(), "missing") from None
        try:
            data = self.codec.decode(key, blob, length)
        except CodecError as e:
            raise CorruptChunk(d.hex(), str(e)) from None
        if len(data) != length or self.chunk_id(data) != d:
            raise CorruptChunk(d.hex(), "does not match its blake3 digest")
        return data

    def get_chunk_into(self, d: bytes, out) -> int:
        """`get_chunk` written into the writable buffer ``out`` (``len(out)``:
        the chunk's length; every byte set); returns ``len(out)``.  Same
        checks and `CorruptChunk` errors; on an error ``out`` holds garbage.
        A store with ``get_into`` (`DirStore`) reads into a per-thread buffer:
        no allocation per chunk."""
        dst = memoryview(out).cast("B")
        length = len(dst)
        if d == self.zero_id(length):
            dst[:] = bytes(length)
            return length
        key = _chunk_key(d)
        try:
            get_into = getattr(self.store, "get_into", None)
            if get_into is not None:
                blob = _read_buffer(length + 64)
                n = get_into(key, blob)
                if n < 0:
                    raise CorruptChunk(d.hex(), f"larger than a {length}-byte chunk can be stored")
                blob = blob[:n]
            else:
                blob = self.store.get(key)
        except FileNotFoundError:
            raise CorruptChunk(d.hex(), "missing") from None
        try:
            n = self.codec.decode_into(key, blob, dst)
        except CodecError as e:
            raise CorruptChunk(d.hex(), str(e)) from None
        if n != length or self.chunk_id(dst) != d:
            raise CorruptChunk(d.hex(), "does not match its blake3 digest")
        return length

    def quarantine(self, d: bytes, length: int) -> bool:
        """Move chunk ``d`` (``length`` bytes) aside to ``damaged/<id>`` if it is still damaged
        when read once more (a transient read error moves nothing); True if moved.

        Why: a pull finds a known chunk by its id (dedup) without reading it, so a damaged
        chunk left in place would be referenced by every later backup of that data, a full
        one too.  Once it is aside, the next pull of that data stores it again under its id,
        which heals every snapshot that uses it.  The damaged bytes are kept (copied first,
        durable, then the chunk deleted); gc never removes them.  Missing chunks: nothing to do."""
        try:
            self.get_chunk(d, length)
            return False
        except CorruptChunk as e:
            if e.strerror.endswith(": missing"):
                return False
        key = _chunk_key(d)
        try:
            blob = self.store.get(key)
        except FileNotFoundError:
            return False
        self.store.put(f"damaged/{d.hex()}", blob)
        self.store.flush()
        self.store.delete(key)
        return True

    # -- snapshots ------------------------------------------------------------

    def save_snapshot(self, name: str, man: Manifest, *, source: str = "", parent: str | None = None,
                      created: datetime.datetime | None = None, meta: dict | None = None,
                      new_only: bool = False) -> None:
        """Write snapshot ``name`` (``created``: default now, UTC; given by tests and imports).

        ``new_only``: a snapshot of that name written meanwhile (another agent) is
        `SnapshotExists`, never overwritten (a conditional PUT on S3: no HEAD first).

        ``meta``: optional JSON-able facts kept under the metadata's ``"meta"``
        key (the backup agent's bitmap, base and point in time: `agent.workflow`).
        """
        check_name(name)
        if man.chunk_size != self.chunk_size:
            raise ConfigError(f"manifest chunk size {man.chunk_size} != repository's {self.chunk_size}")
        created = created or datetime.datetime.now(datetime.timezone.utc)
        packed = man.packed()  # (once: 32 MB for a 1 TiB disk)
        doc = {"name": name, "created": created.isoformat(timespec="seconds"), "source": source,
               "parent": parent, "size": man.size, "chunk_size": man.chunk_size, "root": digest(packed).hex()}
        if meta:
            doc["meta"] = meta
        blob = self._snapshot_blob(name, doc, packed)
        del packed
        self.store.flush()  # the chunks it names are durable before the snapshot exists
        self.store.check_lock()  # and gc cannot have run meanwhile (an S3 lease may expire)
        if not new_only:
            self.store.put(_snap_key(name), blob)
        elif not self.store.put_new(_snap_key(name), blob) and not self._is_ours(_snap_key(name), blob):
            raise SnapshotExists(f"snapshot {name} appeared in {self.store.root} meanwhile: not overwritten")
        self.store.flush()

    def _is_ours(self, key: str, blob: bytes) -> bool:
        """Whether ``key`` holds exactly ``blob``: a conditional PUT that found the object present
        may have found its own earlier attempt (a PUT that landed but whose reply was lost, then
        retried: 412). Those bytes are this writer's (anyone else's differ: their own creation
        time, source and, when encrypted, nonce), so the save succeeded; anything else is another's."""
        try:
            return self.store.get(key) == blob
        except FileNotFoundError:
            return False

    def _snapshot_blob(self, name: str, meta: dict, packed: bytes) -> bytes:
        """A snapshot object (see the module doc); ``meta`` is written as given."""
        key = _snap_key(name)
        text = json.dumps(meta, separators=(",", ":")).encode()
        head = self.codec.encode(key + "#meta", text + digest(text), compress=False)
        return b"".join((SNAP_MAGIC, _SNAP_HEAD.pack(VERSION, len(head)), head,
                         self.codec.encode(key + "#digests", packed)))

    def _damaged(self, name: str, why: str) -> ConfigError:
        return ConfigError(f"snapshot {name!r} in {self.store.root} is damaged: {why}")

    def _read_meta(self, name: str, blob: bytes) -> tuple[dict, int] | None:
        """The metadata of snapshot object ``blob`` and where its digests start,
        or None when ``blob`` is only the object's beginning and too short."""
        key = _snap_key(name)
        if len(blob) < len(SNAP_MAGIC) + _SNAP_HEAD.size or not blob.startswith(SNAP_MAGIC):
            raise self._damaged(name, "not a snapshot object")
        version, n = _SNAP_HEAD.unpack_from(blob, len(SNAP_MAGIC))
        start = len(SNAP_MAGIC) + _SNAP_HEAD.size
        if version != VERSION:
            raise self._damaged(name, f"snapshot format {version}")
        if len(blob) < start + n:
            return None
        try:
            text = self.codec.decode(key + "#meta", blob[start:start + n], META_MAX)
        except CodecError as e:
            raise self._damaged(name, f"metadata {e}") from None
        text, check = text[:-32], text[-32:]
        try:
            if digest(text) != check:
                raise ValueError("checksum mismatch")
            meta = json.loads(text)
            if not isinstance(meta, dict) or meta.get("name") != name:
                raise ValueError("metadata of another snapshot")
            for f in ("size", "chunk_size"):
                if not isinstance(meta.get(f), int):
                    raise ValueError(f"no {f}")
        except ValueError as e:
            raise self._damaged(name, f"metadata {e}") from None
        meta["manifest"] = {"size": meta["size"], "chunk_size": meta["chunk_size"], "root": meta.get("root")}
        return meta, start + n

    def _get_snapshot(self, name: str, head: int | None = None) -> bytes:
        check_name(name)
        key = _snap_key(name)
        try:
            if head is not None and hasattr(self.store, "get_range"):
                return self.store.get_range(key, 0, head)
            return self.store.get(key)
        except FileNotFoundError:
            raise ConfigError(f"no snapshot {name!r} in {self.store.root}") from None

    def snapshot_info(self, name: str) -> dict:
        """The metadata of snapshot ``name``: name, created, source, parent, size,
        chunk_size, root (hex) and ``manifest`` (size, chunk_size, root); its
        digests are not read (only the object's first bytes, where the store can)."""
        blob = self._get_snapshot(name, META_MAX + 1024)
        got = self._read_meta(name, blob)
        if got is None:  # metadata longer than guessed
            got = self._read_meta(name, self._get_snapshot(name))
        if got is None:
            raise self._damaged(name, "truncated")
        if len(blob) < META_MAX + 1024:  # that was the whole object (a disk of < ~2000 chunks)
            import time

            self._whole = (name, blob, time.monotonic())
        return got[0]

    def snapshot_infos(self, names: Sequence[str]) -> Iterator[tuple[str, dict]]:
        """``(name, snapshot_info(name))`` for each of ``names``, in order.  On a remote store
        `INFO_READS` are read at once (one round trip each: 1000 snapshots read one after the
        other cost 1000 round trips of wall time for ``repo list`` and ``prune``); the first
        failure is raised when its turn comes, as a loop would."""
        if not getattr(self.store, "remote", False) or len(names) < 2:
            yield from ((n, self.snapshot_info(n)) for n in names)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(INFO_READS, len(names)), thread_name_prefix="snapshot-info") as pool:
            it = pool.map(self.snapshot_info, names)
            try:
                yield from zip(names, it)
            finally:
                it.close()  # (cancels the reads not started)

    def load_snapshot(self, name: str) -> Manifest:
        """The manifest of snapshot ``name`` (one GET, no listing, or none right
        after `snapshot_info` read the whole object: the agent's base), checked."""
        meta, packed = self._load_packed(name)
        common = (self.zero_id(self.chunk_size),) if meta["chunk_size"] == self.chunk_size else ()
        try:
            return Manifest.from_packed(meta["size"], meta["chunk_size"], packed, "digests", common)
        except ConfigError as e:
            raise self._damaged(name, str(e)) from None

    def _load_packed(self, name: str) -> tuple[dict, bytes]:
        """Snapshot ``name``'s metadata and packed ids, checked (geometry, length, root)."""
        import time

        whole, self._whole = self._whole, None
        if whole is not None and whole[0] == name and time.monotonic() - whole[2] < 60:
            blob = whole[1]  # snapshot objects are never rewritten; checked again below
        else:
            blob = self._get_snapshot(name)
        got = self._read_meta(name, blob)
        if got is None:
            raise self._damaged(name, "truncated")
        meta, start = got
        try:
            count = Manifest(meta["size"], meta["chunk_size"], [b""]).count  # (validates the geometry)
        except ConfigError as e:
            raise self._damaged(name, str(e)) from None
        try:
            packed = self.codec.decode(_snap_key(name) + "#digests", blob[start:], 32 * count)
        except CodecError as e:
            raise self._damaged(name, f"digests {e}") from None
        if len(packed) != 32 * count:
            raise self._damaged(name, f"digests: {len(packed)} bytes of digests for {count} chunks")
        if digest(packed).hex() != meta.get("root"):
            raise self._damaged(name, "digests do not match the metadata's root")
        return meta, bytes(packed)

    def chunk_ids(self, name: str) -> dict[bytes, int]:
        """The distinct ids of the stored chunks snapshot ``name`` uses (no zero id), each with its
        chunk's length, without a `Manifest`: holes are found by numpy over the packed ids, so a
        sparse 1 TiB disk's 10^6 ids cost ~30 ms, not a Python object each (gc's mark phase,
        `referenced`; `agent.verify`)."""
        meta, packed = self._load_packed(name)
        size, cs = meta["size"], meta["chunk_size"]
        sel = packed
        if len(packed) >= 32 * NUMPY_IDS:  # (below: numpy's import, ~60 ms, costs more than it saves)
            import numpy as np

            rows = np.frombuffer(packed, dtype=np.uint64).reshape(-1, 4)
            data = (rows != np.frombuffer(self.zero_id(cs), dtype=np.uint64)).any(axis=1)
            if not data.all():
                sel = rows[np.flatnonzero(data)].tobytes()
        out = dict.fromkeys(map(sel.__getitem__, map(slice, range(0, len(sel), 32), range(32, len(sel) + 32, 32))),
                            cs)
        out.pop(self.zero_id(cs), None)
        if size % cs:  # a short last chunk: its own length and zero id (and no full chunk's id)
            last = packed[-32:]
            out.pop(last, None)
            if last != self.zero_id(size % cs):
                out[last] = size % cs
        return out

    def has_snapshot(self, name: str) -> bool:
        return self.store.exists(_snap_key(check_name(name)))

    def snapshots(self) -> list[str]:
        return self.snapshot_names(self.store)

    def snapshot_time(self, name: str, info: dict | None = None) -> tuple[datetime.datetime, bool]:
        """When the snapshot was written (aware, UTC) and whether that is a guess.

        Its ``created`` field (a time without zone is taken as UTC); for a
        snapshot without a readable one, the object's mtime (second value True).
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
        mtime = self.store.mtime(_snap_key(name))
        return datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc), True

    def delete_snapshot(self, name: str) -> None:
        if not self.has_snapshot(name):
            raise ConfigError(f"no snapshot {name!r} in {self.store.root}")
        self._whole = None
        self.store.delete(_snap_key(name))

    def delete_snapshots(self, names: Sequence[str]) -> None:
        """Delete the snapshots ``names`` (listed under the exclusive lock: no existence check
        each) in one `delete_many`: a directory fsync at the end (`DirStore`), DeleteObjects of
        up to 1000 keys (S3), instead of a check and a delete per snapshot."""
        for n in names:
            check_name(n)
        self._whole = None
        self.store.delete_many([_snap_key(n) for n in names])

    # -- maintenance ---------------------------------------------------------

    def referenced(self, names: Sequence[str] | None = None) -> set[bytes]:
        """Ids of the stored chunks that the snapshots ``names`` (default: all) use.

        One snapshot's ids in memory at a time, holes skipped by numpy (`chunk_ids`): a Python
        loop per chunk took 0.7 s per snapshot of a 1 TiB disk, whatever its data (docs/hunt13.md)."""
        out: set[bytes] = set()
        for name in self.snapshots() if names is None else names:
            out.update(self.chunk_ids(name))
        return out

    def stored(self) -> set[bytes]:
        return {bytes.fromhex(k.rsplit("/", 1)[1]) for k in self.store.list("chunks")}

    def unreferenced(self, keep: set[bytes], grace: float = 0.0) -> Iterator[str]:
        """The keys of stored chunks not in ``keep`` and older than ``grace`` seconds (the store's
        clock), as the listing finds them: no set of every stored chunk is built, and a store
        whose grace is 0 (`DirStore`) is not asked for times (a stat per chunk)."""
        limit = self.store.now() - grace if grace > 0 else 0.0
        listing = self.store.list_times("chunks") if grace > 0 else ((k, 0.0) for k in self.store.list("chunks"))
        for key, mtime in listing:
            if bytes.fromhex(key.rsplit("/", 1)[1]) not in keep and not (grace > 0 and mtime > limit):
                yield key

    def verify(self, names: Sequence[str] | None = None) -> list[tuple[str, int, str]]:
        """Problems as ``(snapshot, chunk index, reason)``; empty when every
        chunk of the snapshots is present, authentic and hashes right.  A
        snapshot object that cannot be read is one problem with index -1."""
        problems: list[tuple[str, int, str]] = []
        checked: dict[bytes, str | None] = {}
        for name in names if names is not None else self.snapshots():
            try:
                man = self.load_snapshot(name)
            except ConfigError as e:
                problems.append((name, -1, str(e)))
                continue
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
        grace = self.store.gc_grace if grace is None else grace
        keep = self.referenced()
        # The store's clock (`unreferenced`), not this host's: a gc host whose clock runs ahead of
        # the store by more than the grace would otherwise see a chunk uploaded a moment ago as old.
        # Deleted in batches as the listing goes (a list of every doomed key was ~100 bytes a chunk);
        # the lease checked before each batch: a gc stalled past its S3 lease (a stopped
        # process, an outage) may have let a pull save a snapshot that uses a chunk found in the store
        # (dedup: no upload, so the grace period does not cover it).  `DirStore.check_lock`: nothing.
        removed = 0
        doomed = self.unreferenced(keep, grace)
        while batch := list(itertools.islice(doomed, GC_BATCH)):
            self.store.check_lock()
            self.store.delete_many(batch)
            removed += len(batch)
        sweep = getattr(self.store, "sweep", None)  # DirStore: temporary files of writers that died
        if sweep is not None:
            sweep()
        return removed, len(keep)


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
            f = HOLE_ZERO if self.man.chunks[i] == self.repo.zero_id(c_len) else 0
            if out and out[-1].flags == f and out[-1].end == s:
                out[-1] = Extent(out[-1].offset, out[-1].length + e - s, f)
            else:
                out.append(Extent(s, e - s, f))
        return out


class BaseSnapshot:
    """The base snapshot of an incremental pull into a repository, as the
    target `agent.pull.pull` reads (``pull --repo --base`` and the backup
    agent): whole chunks fetched, decoded and checked on worker threads, so
    the event loop keeps reading the source; a chunk the read covers whole is
    decoded straight into the caller's buffer.

    Fields: ``repo``; ``man`` (the base's manifest).  Only ``size`` and
    ``pread`` are used (the pull hands each chunk's content to its sink).
    """

    def __init__(self, repo: Repository, man: Manifest) -> None:
        self.repo, self.man = repo, man

    @property
    def size(self) -> int:
        return self.man.size

    async def pread(self, buf: memoryview, offset: int) -> None:
        for i in self.man.chunks_of(offset, len(buf)):
            c_off, c_len = self.man.chunk_range(i)
            if c_off >= offset and c_off + c_len <= offset + len(buf):  # a whole chunk: decoded in place
                # (`get_chunk_into`: no allocation nor copy; a third of `get_chunk`'s CPU per 1 MiB)
                await asyncio.to_thread(self.repo.get_chunk_into, self.man.chunks[i],
                                        buf[c_off - offset : c_off - offset + c_len])
                continue
            data = await asyncio.to_thread(self.repo.get_chunk, self.man.chunks[i], c_len)
            s, e = max(offset, c_off), min(offset + len(buf), c_off + c_len)
            buf[s - offset:e - offset] = memoryview(data)[s - c_off:e - c_off]
