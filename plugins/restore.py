"""nbdkit Python plugin: serve a pulled backup read-only, every chunk checked against its blake3 manifest.

Role: the restore side of the pull agent.  ``nbdbackup pull`` leaves a raw
image and a manifest of per-chunk blake3 digests taken from the snapshot;
this plugin exports that image over NBD so that any NBD client (qemu-img
convert, nbdcopy, a VM booting from it, ``nbdbackup serve`` re-exporting
it) restores from it, and it never hands out a byte it has not verified.

Run by nbdkit as a subprocess::

    nbdkit -U SOCK python plugins/restore.py image=BACKUP.raw manifest=BACKUP.json
    nbdkit -U SOCK python plugins/restore.py repo=REPO snapshot=NAME [s3-endpoint=URL] \
        [passphrase-file=FILE] [key-file=PATH]

The second form serves a snapshot of a chunk repository (`agent.repo`; REPO
is a directory or ``s3://BUCKET/PREFIX``, whose credentials, region and
endpoint come from the AWS environment variables nbdkit inherits, or
``s3-endpoint=``; boto3 comes from nbdkit's Python or the checkout's .venv;
an encrypted repository's passphrase from ``passphrase-file=`` or the
``NBDBACKUP_PASSPHRASE`` nbdkit inherits, its key from the repository or
``key-file=``, as for the command line):
every chunk is read from the repository and checked against its digest as
it is loaded, holes come from the all-zero chunks, and a missing or damaged
chunk fails the reads that touch it with EIO.  Chunks load in parallel
(`agent.restore.ChunkCache`): two reads of one chunk share one load,
reads of different chunks load at once on ``workers=N`` threads (default
8), and the last ``cache=N`` chunks loaded (default 16) are kept; the
chunks a read touches load together, and the ``readahead=N`` data chunks
after them (default 2; 0 for random readers) start loading.  At exit
(``cleanup``) the plugin logs how many loads it made and how many ran at
most at once.

Verification: the first read that touches a chunk reads the whole chunk
from the image and hashes it.  A chunk whose digest matches is remembered
as good; one that does not is remembered as bad, logged once with its byte
range, and every read touching it fails with EIO -- a restore from a
damaged backup stops loudly instead of writing damaged data.  Chunks no
read touches are never read.  ``verify=off`` serves without checking.

Serving: read-only, multi-conn (nothing changes), extents from the image's
holes (SEEK_DATA/SEEK_HOLE), thread model parallel.  The image must have the
manifest's size (checked at start, like the manifest's own integrity: a
damaged manifest stops nbdkit with the reason).

The manifest format and its loader are `nbdbackup.agent.manifest` (this
checkout's package, found next to this file); blake3 comes from the
checkout's ``.venv`` when nbdkit's own Python lacks it (``pythonpath=DIR``
adds another directory).

Invariants: chunk states only change under ``_lock`` and only from
unknown to good or bad; a read returns only bytes of chunks found good
(repository mode: bytes `Repository.get_chunk` checked).
"""

from __future__ import annotations

import errno
import os
import sys
import threading

import nbdkit

API_VERSION = 2

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
from _plugincommon import seek_extents, use_checkout  # noqa: E402

#: Configuration (fixed after `config_complete`).
_image: str | None = None
_manifest_path: str | None = None
_repo_dir: str | None = None
_snapshot: str | None = None
_s3_endpoint: str | None = None
#: An encrypted repository's passphrase file and key file (`agent.crypto`).
_passphrase_file: str | None = None
_key_file: str | None = None
#: Repository mode: the snapshot as a read-only image (`agent.repo.SnapshotImage`:
#: its repository and manifest) and, from `get_ready`, the thread-safe chunk
#: loader every read goes through (`agent.restore.ChunkCache`), with its
#: ``workers=``, ``cache=`` and ``readahead=`` sizes.
_snap = None
_cache = None
_sizes = {"workers": 8, "cache": 16, "readahead": 2}
#: Chunks already reported damaged (logged once each).
_reported: set[int] = set()
_verify = True
#: The image (opened in `get_ready`) and the loaded manifest.
_fd = -1
_man = None
#: Guards ``_state``; chunk index -> True (good) / False (bad); absent = not yet checked.
_lock = threading.Lock()
_state: dict[int, bool] = {}
#: One lock per chunk being verified, so two readers do not hash it twice.
_busy: dict[int, threading.Lock] = {}


def config(key: str, value: str) -> None:
    global _image, _manifest_path, _verify, _repo_dir, _snapshot, _s3_endpoint, _passphrase_file, _key_file
    if key in ("workers", "cache", "readahead"):
        if not (value.isascii() and value.isdigit() and int(value) >= (key != "readahead")):
            raise RuntimeError(f"restore: {key} must be a whole number >= {int(key != 'readahead')}")
        _sizes[key] = int(value)
    elif key == "image":
        _image = os.path.abspath(value)
    elif key == "manifest":
        _manifest_path = os.path.abspath(value)
    elif key == "verify":
        if value not in ("on", "off"):
            raise RuntimeError("restore: verify must be on or off")
        _verify = value == "on"
    elif key == "pythonpath":
        use_checkout(os.path.abspath(value))
    elif key == "repo":
        _repo_dir = value if value.startswith("s3://") else os.path.abspath(value)
    elif key == "snapshot":
        _snapshot = value
    elif key == "s3-endpoint":
        _s3_endpoint = value
    elif key == "passphrase-file":
        _passphrase_file = os.path.abspath(value)
    elif key == "key-file":
        _key_file = os.path.abspath(value)
    else:
        raise RuntimeError(f"restore: unknown parameter {key!r} (image=, manifest=, repo=, snapshot=, "
                           "s3-endpoint=, passphrase-file=, key-file=, workers=, cache=, readahead=, verify=, "
                           "pythonpath=)")


def config_complete() -> None:
    global _man, _snap
    use_checkout()
    if _repo_dir is not None or _snapshot is not None:
        if _repo_dir is None or _snapshot is None or _image is not None or _manifest_path is not None:
            raise RuntimeError("restore: give repo=DIR snapshot=NAME, or image= and manifest=, not a mix")
        try:
            from nbdbackup.agent.crypto import read_passphrase
            from nbdbackup.agent.repo import Repository, SnapshotImage, open_store
            from nbdbackup.errors import ConfigError
        except ImportError as e:
            raise RuntimeError(f"restore: cannot import the repository code ({e}); give pythonpath=DIR") from None
        try:
            repo = Repository.open(open_store(_repo_dir, endpoint=_s3_endpoint), key_file=_key_file,
                                   passphrase=lambda: read_passphrase(_passphrase_file, interactive=False),
                                   require_encryption=bool(_key_file or _passphrase_file))
            _man = repo.load_snapshot(_snapshot)
        except (ConfigError, OSError) as e:
            raise RuntimeError(f"restore: {e}") from None
        _snap = SnapshotImage(repo, _man)
        return
    if _image is None or _manifest_path is None:
        raise RuntimeError("restore: image=BACKUP.raw and manifest=BACKUP.json (or repo= and snapshot=) are required")
    try:
        from nbdbackup.agent.manifest import Manifest
        from nbdbackup.errors import ConfigError
    except ImportError as e:
        raise RuntimeError(f"restore: cannot import the manifest code ({e}); give pythonpath=DIR "
                           "with the nbdbackup package and blake3") from None
    try:
        _man = Manifest.load(_manifest_path)
    except ConfigError as e:
        raise RuntimeError(f"restore: {e}") from None
    size = os.stat(_image).st_size
    if size != _man.size:
        raise RuntimeError(f"restore: {_image} is {size} bytes, the manifest describes {_man.size}")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready() -> None:
    global _fd, _cache
    if _snap is None:
        _fd = os.open(_image, os.O_RDONLY)
    else:
        from nbdbackup.agent.restore import ChunkCache

        _cache = ChunkCache(_snap.repo, _man, capacity=_sizes["cache"], workers=_sizes["workers"],
                            readahead=_sizes["readahead"])


def cleanup() -> None:
    if _cache is not None:
        print(f"restore: {_cache.loads} chunk load(s), at most {_cache.max_in_flight} at once",
              file=sys.stderr, flush=True)
        _cache.close()


def _read_exact(buf, offset: int) -> None:
    mv = memoryview(buf)
    done = 0
    while done < len(mv):
        n = os.preadv(_fd, [mv[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"short read at {offset + done}")
        done += n


def _check(i: int) -> bool:
    """Whether chunk ``i`` matches the manifest (hashing it the first time)."""
    with _lock:
        ok = _state.get(i)
        if ok is not None:
            return ok
        busy = _busy.setdefault(i, threading.Lock())
    with busy:
        with _lock:
            ok = _state.get(i)
        if ok is not None:
            return ok
        from nbdbackup.agent.manifest import digest

        off, n = _man.chunk_range(i)
        buf = bytearray(n)
        _read_exact(buf, off)
        ok = digest(buf) == _man.chunks[i]
        with _lock:
            _state[i] = ok
            _busy.pop(i, None)
        if not ok:
            nbdkit.debug(f"restore: chunk {i} ({off}, {n}) fails blake3 verification")
            print(f"restore: {_image}: chunk {i} ({off}, {n}) does not match the manifest; "
                  "reads of it fail with EIO", file=sys.stderr, flush=True)
        return ok


def open(readonly: bool):  # noqa: A001  (nbdkit's name; shadows the builtin here)
    return {}


def get_size(h) -> int:
    return _man.size


def can_write(h) -> bool:
    return False


def can_multi_conn(h) -> bool:
    return True


def can_extents(h) -> bool:
    return True


def can_cache(h):
    return nbdkit.CACHE_NONE


def pread(h, buf, offset: int, flags: int) -> None:
    if _snap is not None:
        try:
            _cache.read_into(buf, offset)
        except OSError as e:  # CorruptChunk: missing or damaged; or the store failed
            i = getattr(e, "chunk_index", offset // _man.chunk_size)
            with _lock:
                first = i not in _reported
                _reported.add(i)
            if first:
                off, n = _man.chunk_range(i)
                print(f"restore: {_repo_dir} snapshot {_snapshot}: chunk {i} ({off}, {n}): {e.strerror}; "
                      "reads of it fail with EIO", file=sys.stderr, flush=True)
            nbdkit.set_error(errno.EIO)
            raise
        return
    if _verify:
        for i in _man.chunks_of(offset, len(buf)):
            if not _check(i):
                off, n = _man.chunk_range(i)
                nbdkit.set_error(errno.EIO)
                raise OSError(errno.EIO, f"chunk {i} ({off}, {n}) of the backup fails blake3 verification")
    _read_exact(buf, offset)


def extents(h, count: int, offset: int, flags: int):
    if _snap is not None:
        out: list[list[int]] = []
        end = min(offset + count, _man.size)
        for i in _man.chunks_of(offset, end - offset):
            c_off, c_len = _man.chunk_range(i)
            s, e = max(offset, c_off), min(end, c_off + c_len)
            t = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO if _cache.is_zero(i) else 0
            if out and out[-1][2] == t:
                out[-1][1] += e - s
            else:
                out.append([s, e - s, t])
        out = [tuple(x) for x in out]
        return out[:1] if flags & nbdkit.FLAG_REQ_ONE else out
    return seek_extents(_fd, _man.size, count, offset, flags)
