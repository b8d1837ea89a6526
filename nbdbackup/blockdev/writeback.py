"""Early write-back of page-cache writes: ``sync_file_range(2)`` and a whole-file write-behind.

Role: helpers for writers that fill a file through the page cache faster
than they need it back (the pull agent's target, copy-before-write's
scratch and target, the pump's target).  Write-back is started early and
written pages are dropped once clean, so the final ``fdatasync`` has little
left to do and the writer keeps reusing a bounded set of page-cache pages.

Why the second part matters (bench/pull_bench.py, bench/backup_bench.py,
docs/pullcbw.md): on the reference VM, a buffered write or
``copy_file_range`` into page-cache memory that was not used recently cost
2-7x the CPU of one into recycled pages (a 64 KiB ``copy_file_range`` 22 us
vs 85-150 us; 1 MiB pwrites 1 vs 2 GB/s, all of it in
``copy_folio_from_iter_atomic``), depending on what the page allocator hands
out; with write-behind and ``POSIX_FADV_DONTNEED`` it stays at the low figure.

Invariants: everything here is advisory -- it never changes file content or
what ``fdatasync`` guarantees; ``POSIX_FADV_DONTNEED`` only drops clean
pages.  `WholeFileWriteBehind` runs its calls on one thread of its own, at
most one round at a time, never on the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4

_libc = ctypes.CDLL(None, use_errno=True)  # libc is loaded (find_library("c") runs ldconfig -p)
try:
    _sfr = _libc.sync_file_range
    _sfr.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sfr.restype = ctypes.c_int
except AttributeError:  # not Linux
    _sfr = None


try:
    _syncfs = _libc.syncfs
    _syncfs.argtypes = [ctypes.c_int]
    _syncfs.restype = ctypes.c_int
except AttributeError:  # not Linux (glibc >= 2.14)
    _syncfs = None


def available() -> bool:
    return _sfr is not None


def syncfs_reports_errors() -> bool:
    """Whether ``syncfs(2)`` is here and reports write-back errors: Linux >= 5.8
    returns the errors of the file system's write-back since the descriptor
    given to it was opened (before, it returned 0 whatever failed)."""
    if _syncfs is None:
        return False
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


def syncfs(fd: int) -> None:
    """``syncfs(2)``: write back and commit everything of the file system ``fd`` is on,
    and wait; OSError on failure (see `syncfs_reports_errors`)."""
    if _syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available")
    if _syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


#: File systems whose ``syncfs`` is known to write back and commit everything (their
#: ``statfs`` f_type): ext2/3/4, XFS, Btrfs, F2FS, tmpfs.  Elsewhere it may not be (a FUSE
#: file system whose daemon does not implement FUSE_SYNCFS returns 0 having done nothing;
#: network and 9p/virtio file systems differ): callers fsync instead.
SYNCFS_FILE_SYSTEMS = frozenset({0xEF53, 0x58465342, 0x9123683E, 0xF2F52010, 0x01021994})


class _StatFS(ctypes.Structure):
    # struct statfs begins with f_type (__fsword_t: a C long on Linux); the rest is not read.
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def fs_type(path: str) -> int | None:
    """The ``statfs(2)`` f_type of the file system ``path`` is on; None if unknown."""
    try:
        fn = _libc.statfs
    except AttributeError:
        return None
    buf = _StatFS()
    if fn(os.fsencode(path), ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF


def dirty_bytes() -> int:
    """Dirty and under-write-back page-cache bytes of the whole machine (/proc/meminfo);
    -1 if unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            text = f.read()
    except OSError:
        return -1
    total = found = 0
    for line in text.split(b"\n"):
        if line.startswith((b"Dirty:", b"Writeback:")):
            total += int(line.split()[1]) * 1024
            found += 1
    return total if found == 2 else -1


def sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
    """``sync_file_range(2)`` (length 0: to the end of the file); OSError on failure."""
    if _sfr is None:
        raise OSError(errno.ENOSYS, "sync_file_range is not available")
    if _sfr(fd, offset, length, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class WholeFileWriteBehind:
    """Every ``window`` bytes written (as reported by `add`), start write-back
    of whole files and drop their clean pages, on a thread of its own.

    Fields: ``fds`` (not owned: the caller keeps them open until `idle`
    returned after its last `add`); ``window``; ``rounds`` (rounds run);
    ``_since`` (bytes added since the last round started); ``_running`` (the
    future of the round in progress, or None); ``_pool``; ``_off`` (set
    after a failure: rounds stop, it was only advice).
    """

    def __init__(self, fds: list[int], window: int) -> None:
        self.fds = list(dict.fromkeys(fds))
        self.window = window
        self.rounds = 0
        self._since = 0
        self._running: asyncio.Future | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._off = not self.fds or window <= 0 or not available()

    def add(self, nbytes: int) -> None:
        """``nbytes`` more were written (on the loop; cheap: one addition
        unless a round is due)."""
        if self._off:
            return
        self._since += nbytes
        if self._since < self.window or self._running is not None:
            return
        self._since = 0
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-behind")
        fut = self._running = asyncio.get_running_loop().run_in_executor(self._pool, self._round)
        fut.add_done_callback(self._finished)

    def _round(self) -> None:
        for fd in self.fds:
            sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
            # Drops what earlier rounds wrote back (clean now); dirty pages stay.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def _finished(self, fut: asyncio.Future) -> None:
        self._running = None
        self.rounds += 1
        if not fut.cancelled() and fut.exception() is not None:
            log.debug("write-behind off: %s", fut.exception())
            self._off = True

    async def idle(self) -> None:
        """Stop: no round starts from now on; wait for the one in progress
        (then the caller may close the files)."""
        self._off = True
        if self._running is not None:
            try:
                await asyncio.shield(self._running)
            except OSError:
                pass  # advisory; `_finished` turned it off
        if self._pool is not None:
            self._pool.shutdown(wait=False)
