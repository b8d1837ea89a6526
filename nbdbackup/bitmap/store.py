"""Persistent dirty bitmaps: one memory-mapped file per bitmap, complete after ``kill -9``.

Role: `BitmapStore` keeps the persistent bitmaps of ``nbdbackup serve
--state-dir DIR``.  Each bitmap's bits live in a ``MAP_SHARED`` memory map of
its file, so `DirtyBitmap.mark` sets bits directly in the page cache.

Layout::

    DIR/e-<sha256(export name)[:40]>/
        export.name          the export's name (informational)
        lock                 flock()ed by the one process using the directory
        <id>.bitmap          one per bitmap (<id>: 32 random hex digits)
        <id>.bitmap.tmp      a rewrite in progress (deleted at load)

File format (little-endian).  Bytes [0, 4096) hold two header slots, A at 0
and B at 2048; each is::

    0   8  magic  b"NBDBKBMP"
    8   4  version (1)
    12  4  CRC32 of the slot's bytes [0, 90 + name_len) with this field zeroed
    16  4  state: 1 clean, 2 in-use-synced, 3 in-use-dirty
    20  4  flags: bit 0 = recording (enabled)
    24  8  disk size (bytes)
    32  8  granularity (bytes)
    40  8  generation: +1 at every atomic rewrite of the file (create = 1)
    48  8  seq: +1 at every in-place state update
    56  8  nbits = ceil(size / granularity)
    64  8  data offset (4096)
    72 16  boot id (/proc/sys/kernel/random/boot_id) of the writer, when in use
    88  2  name length n (<= 1023)
    90  n  name (UTF-8)

and at 4096 the bits: ceil(nbits / 64) little-endian 64-bit words, bit i of
the bitmap = bit i % 64 of word i // 64 (`core` layout).  The header in force
is the valid slot (magic, version, CRC, fields) with the highest seq.  A
rewrite writes slot A only (B zero).  An in-place state update writes the
whole new header into the slot NOT in force and msync()s it, so a torn update
(process killed mid-copy, power lost mid-sector) damages only the slot being
written and the previous state stays in force.

States.  ``clean``: closed after a final sync; nobody has the file open.
``in-use-synced``: open for writing, and every bit set so far is durable.
``in-use-dirty``: open for writing, and bits may have been set since the last
sync.  Transitions: open -> in-use-synced (header written and msync()ed);
first bit set after a sync -> in-use-dirty (header msync()ed BEFORE the bit is
set: `before_set`); `sync` -> msync the map, then in-use-synced (header
msync()ed); clean close -> sync, then clean.

Why an acknowledged write's bit is never lost:

1. The caller marks BEFORE issuing the write to the disk, so when a write is
   acknowledged its bits are already in the mapped pages.
2. Process death (kill -9, crash, OOM kill): the mapped pages are the file's
   page cache; the kernel keeps them and writes them back.  Every bit the
   process set is in the file, whatever the header says; the header's boot
   id equals the current one (no reboot happened), so the load trusts it.
3. Power loss / kernel crash (the boot id changes): only durable bits survive.
   - FLUSH and FUA: the server calls `sync` before answering, which msync()s
     the map (MS_SYNC reaches stable storage, as fdatasync does), so every
     bit of every write acknowledged before that FLUSH/FUA answer is durable
     before the answer is sent.
   - Writes never flushed may still have reached the disk (writeback) while
     their bits did not.  The file can only show ``in-use-synced`` after such
     a loss if no bit was set after the last completed sync, because the
     first bit set after a sync is preceded by a durable ``in-use-dirty``
     header.  So ``in-use-synced`` (any boot) and ``clean`` are complete;
     ``in-use-dirty`` from another boot may miss writes: it is inconsistent.
4. A torn state update leaves the previous state in force (A/B slots).  That
   is the truth: dirty -> synced is written only after the data msync, so
   falling back to dirty is merely conservative; synced -> dirty is torn
   only before `before_set` returned, so no bit was set after it.
5. Metadata changes (create, clear, enable, disable, rename) write a whole
   new file (header + bits), fsync it, rename it over the old one, fsync the
   directory: after any failure there is either the old file or the new one.
   Remove unlinks and fsyncs the directory.
6. Every file's blocks are reserved (`reserve`: posix_fallocate) before it is
   mapped, so setting a bit never makes the file system allocate: a full file
   system fails the create, clear or load with ENOSPC instead of killing the
   server with SIGBUS at some guest's write (tests/interop/test_bitmaps_full_fs.py).

Precisely, `load_all` marks a bitmap **inconsistent** (it is listed, keeps
its file, can only be removed; incremental backups from it are refused) when
its file: is shorter than its header or its bits; has no valid header slot
(bad magic, unknown version, bad CRC, unknown state, invalid name or
granularity, nbits/data offset not matching -- in both slots); was made
for a disk of another size; or is ``in-use-dirty`` with a boot id other than
the current one (or no boot id can be read).

Invariant: an open handle's ``header`` (state, seq, slot) is the header in
force on disk whenever no `_write_header` call is in progress (it returns
only after the msync).
Concurrency: single-threaded (the asyncio loop); one process per export
directory (flock).  `sync` and `before_set` block the loop for an msync.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import secrets
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

from .core import Bitmap, words_for
from .dirty import (
    BitmapError,
    DEFAULT_GRANULARITY,
    DirtyBitmap,
    check_granularity,
    check_name,
)

__all__ = ["BitmapStore", "MAGIC", "VERSION", "STATE_CLEAN", "STATE_SYNCED", "STATE_DIRTY", "read_header"]

MAGIC = b"NBDBKBMP"
VERSION = 1
STATE_CLEAN = 1
STATE_SYNCED = 2
STATE_DIRTY = 3
_STATES = (STATE_CLEAN, STATE_SYNCED, STATE_DIRTY)
FLAG_RECORDING = 1
DATA_OFFSET = 4096
#: magic, version, crc, state, flags, size, granularity, generation, seq,
#: nbits, data_offset, boot_id, name_len
_HDR = struct.Struct("<8sIIIIQQQQQQ16sH")
assert _HDR.size == 90
_CRC_AT = 12
#: The two header slots (A/B): byte offsets, and the room each one has.
SLOTS = (0, 2048)
SLOT_SIZE = 2048
_SUFFIX = ".bitmap"
_TMP = ".tmp"


def current_boot_id() -> bytes:
    """This boot's id (16 bytes), or 16 zero bytes if unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return bytes.fromhex(f.read().strip().replace("-", ""))
    except (OSError, ValueError):
        return bytes(16)


@dataclass
class Header:
    """A decoded bitmap file header (see the module docstring)."""

    state: int
    recording: bool
    size: int
    granularity: int
    generation: int
    nbits: int
    boot_id: bytes
    name: str
    seq: int = 1
    version: int = VERSION
    data_offset: int = DATA_OFFSET
    #: the slot (0 or 1) this header was read from / last written to
    slot: int = 0

    def pack(self) -> bytes:
        name = self.name.encode("utf-8")
        raw = bytearray(
            _HDR.pack(MAGIC, self.version, 0, self.state, FLAG_RECORDING if self.recording else 0,
                      self.size, self.granularity, self.generation, self.seq, self.nbits,
                      self.data_offset, self.boot_id, len(name))
            + name
        )
        struct.pack_into("<I", raw, _CRC_AT, zlib.crc32(raw))
        return bytes(raw)


def read_header(raw: bytes) -> Header:
    """Decode the file's first 4096 bytes: the valid slot with the highest
    ``seq`` (slot 0 on a tie); raise ValueError saying what is wrong when no
    slot is valid."""
    found: list[Header] = []
    errors: list[str] = []
    for k, at in enumerate(SLOTS):
        try:
            h = read_slot(raw[at : at + SLOT_SIZE])
        except ValueError as e:
            errors.append(f"slot {k}: {e}")
            continue
        h.slot = k
        found.append(h)
    if not found:
        raise ValueError("; ".join(errors))
    return max(found, key=lambda h: (h.seq, -h.slot))


def read_slot(raw: bytes) -> Header:
    """Decode and check one header slot; raise ValueError saying what is wrong."""
    if len(raw) < _HDR.size:
        raise ValueError("file shorter than its header")
    magic, version, crc, state, flags, size, gran, gen, seq, nbits, doff, boot, nlen = _HDR.unpack_from(raw)
    if magic != MAGIC:
        raise ValueError("bad magic")
    if version != VERSION:
        raise ValueError(f"unknown version {version}")
    if _HDR.size + nlen > len(raw) or nlen > 1023:
        raise ValueError("bad name length")
    body = bytearray(raw[: _HDR.size + nlen])
    struct.pack_into("<I", body, _CRC_AT, 0)
    if zlib.crc32(body) != crc:
        raise ValueError("bad header CRC")
    if state not in _STATES:
        raise ValueError(f"unknown state {state}")
    try:
        name = check_name(bytes(raw[_HDR.size : _HDR.size + nlen]).decode("utf-8"))
        check_granularity(gran)
    except (UnicodeDecodeError, BitmapError) as e:
        raise ValueError(str(e)) from e
    if nbits != (size + gran - 1) // gran:
        raise ValueError("nbits does not match size and granularity")
    if doff != DATA_OFFSET:
        raise ValueError("bad data offset")
    return Header(state, bool(flags & FLAG_RECORDING), size, gran, gen, nbits, boot, name, seq)


class _Handle:
    """One open bitmap file (the DirtyBitmap's ``backing``).

    Fields: ``path``; ``fd``; ``mm`` (the whole file, MAP_SHARED); ``header``
    (its ``state`` mirrors the durable header); ``bitmap`` (the DirtyBitmap
    whose ``bits`` live in ``mm``).
    """

    def __init__(self, path: str, fd: int, mm: mmap.mmap, header: Header, bitmap: DirtyBitmap) -> None:
        self.path = path
        self.fd = fd
        self.mm = mm
        self.header = header
        self.bitmap = bitmap

    def _write_header(self, state: int) -> None:
        """Write the new state into the OTHER slot (seq + 1) and msync it.

        A write torn by process death or power loss damages only that slot;
        the reader then falls back to the current one (module docstring).
        """
        h = self.header
        h.state = state
        h.seq += 1
        h.slot ^= 1
        raw = h.pack()
        at = SLOTS[h.slot]
        self.mm[at : at + len(raw)] = raw
        self.mm.flush(0, mmap.PAGESIZE)  # msync(MS_SYNC) of the header page

    def shared_map(self) -> tuple[int, int]:
        """(fd, offset of the bits): what a worker maps read-only."""
        return self.fd, DATA_OFFSET

    def before_set(self) -> None:
        if self.header.state != STATE_DIRTY:
            self._write_header(STATE_DIRTY)

    def sync(self) -> None:
        if self.header.state == STATE_DIRTY:
            self.mm.flush()  # msync(MS_SYNC) of the whole map: every bit durable
            self._write_header(STATE_SYNCED)

    def close(self, clean: bool) -> None:
        """Release the map; with ``clean``: sync, then mark the file clean."""
        if clean:
            self.sync()
            self._write_header(STATE_CLEAN)
        bm = self.bitmap
        bm.bits = bm.bits.copy()  # drop the last view of the map
        bm.backing = None
        try:
            self.mm.close()
        except BufferError:
            pass  # someone still holds the old Bitmap; the map goes with it
        os.close(self.fd)


def reserve(fd: int, size: int) -> None:
    """Give the first ``size`` bytes of the file ``fd`` storage now (its content unchanged).

    The bits are set through a ``MAP_SHARED`` map: a store into a page that is a
    hole makes the file system allocate it at the fault, and when it cannot (a
    full file system, a tmpfs at its size) the kernel answers with SIGBUS, which
    kills the server -- every export and every client with it.  With the blocks
    reserved, a full file system is an ``ENOSPC`` here, where creating, clearing or
    loading the bitmap fails cleanly.  (On copy-on-write file systems -- btrfs,
    ZFS -- an overwrite needs new space too; keep the state directory elsewhere.)
    Where the file system has no fallocate, glibc's posix_fallocate writes the
    holes itself.
    """
    os.posix_fallocate(fd, 0, size)


def _bits_buffer(mm: mmap.mmap, nbits: int) -> memoryview:
    return memoryview(mm)[DATA_OFFSET : DATA_OFFSET + words_for(nbits) * 8]


class BitmapStore:
    """Persistent bitmaps under ``root`` (see the module docstring).

    Fields: ``root``; ``boot_id`` (this boot's); ``_exports``: export name ->
    (directory, lock fd, {id(DirtyBitmap) -> _Handle}) for open exports;
    ``_loaded``: exports whose files `load_all` has opened.
    ``fsync``: the function used to make files and directories durable
    (tests may count calls).
    """

    def __init__(self, root: str, *, fsync: Callable[[int], None] = os.fsync) -> None:
        self.root = root
        self.boot_id = current_boot_id()
        self.fsync = fsync
        self._exports: dict[str, tuple[str, int, dict[int, _Handle]]] = {}
        self._loaded: set[str] = set()
        os.makedirs(root, exist_ok=True)

    # --- directories --------------------------------------------------------

    def export_dir(self, export: str) -> str:
        key = hashlib.sha256(export.encode("utf-8")).hexdigest()[:40]
        return os.path.join(self.root, f"e-{key}")

    def _fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self.fsync(fd)
        finally:
            os.close(fd)

    def _open_export(self, export: str) -> tuple[str, int, dict[int, _Handle]]:
        if export in self._exports:
            return self._exports[export]
        d = self.export_dir(export)
        new = not os.path.isdir(d)
        os.makedirs(d, exist_ok=True)
        lock = os.open(os.path.join(d, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(lock)
            raise BitmapError(f"bitmap state of export {export!r} is in use by another process") from e
        if new:
            with open(os.path.join(d, "export.name"), "w", encoding="utf-8") as f:
                f.write(export)
            self._fsync_dir(d)
            self._fsync_dir(self.root)
        entry = (d, lock, {})
        self._exports[export] = entry
        return entry

    def _handles(self, export: str) -> dict[int, _Handle]:
        if export not in self._exports:
            raise BitmapError(f"export {export!r} not loaded in the bitmap store")
        return self._exports[export][2]

    # --- loading ------------------------------------------------------------

    def load_all(self, export: str, disk_size: int) -> list[DirtyBitmap]:
        """Open every bitmap of ``export`` (consistent ones for writing, in-use).

        Once per export per store (until `close_clean`)."""
        if export in self._loaded:
            raise BitmapError(f"bitmaps of export {export!r} are already loaded")
        d, _, handles = self._open_export(export)
        self._loaded.add(export)
        out: list[DirtyBitmap] = []
        for fn in sorted(os.listdir(d)):
            path = os.path.join(d, fn)
            if fn.endswith(_SUFFIX + _TMP):
                os.unlink(path)  # an interrupted rewrite; the old file is intact
                continue
            if not fn.endswith(_SUFFIX):
                continue
            out.append(self._load_one(path, disk_size, handles))
        # Names must be unique; a duplicate (not produced by this code) is
        # loaded as inconsistent under a derived name.
        seen: set[str] = set()
        for bm in out:
            if bm.name in seen:
                self._detach(bm, handles)
                bm.name = f"{bm.name}.dup-{id(bm):x}"
                bm.inconsistent = True
            seen.add(bm.name)
        return out

    def _detach(self, bm: DirtyBitmap, handles: dict[int, _Handle]) -> None:
        h = handles.pop(id(bm), None)
        if h is not None:
            h.close(clean=False)
        bm._recording = False

    def _inconsistent(self, path: str, disk_size: int, name: str | None, why: str) -> DirtyBitmap:
        if name is None:
            name = "corrupt-" + os.path.basename(path)[: -len(_SUFFIX)]
        bm = DirtyBitmap(name, disk_size, DEFAULT_GRANULARITY, inconsistent=True, persistent=True)
        bm.inconsistent_reason = why
        bm.store_path = path
        return bm

    def _load_one(self, path: str, disk_size: int, handles: dict[int, _Handle]) -> DirtyBitmap:
        with open(path, "rb") as f:
            raw = f.read(DATA_OFFSET)
            flen = os.fstat(f.fileno()).st_size
        try:
            h = read_header(raw)
        except ValueError as e:
            return self._inconsistent(path, disk_size, None, str(e))
        if h.size != disk_size:
            return self._inconsistent(path, disk_size, h.name,
                                      f"made for a disk of {h.size} bytes, not {disk_size}")
        if flen < DATA_OFFSET + words_for(h.nbits) * 8:
            return self._inconsistent(path, disk_size, h.name, "truncated bits")
        if h.state == STATE_DIRTY and (h.boot_id != self.boot_id or not any(self.boot_id)):
            return self._inconsistent(path, disk_size, h.name,
                                      "in use with unsynced bits when the machine went down")
        fd = os.open(path, os.O_RDWR)
        try:
            reserve(fd, flen)  # a file left sparse (by an older nbdbackup) gets its blocks now
            mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        bits = Bitmap(h.nbits, buffer=_bits_buffer(mm, h.nbits))
        bm = DirtyBitmap(h.name, h.size, h.granularity, recording=h.recording, persistent=True, bits=bits)
        h.boot_id = self.boot_id
        handle = _Handle(path, fd, mm, h, bm)
        # A dirty state from this boot (process death) stays dirty: its bits
        # are complete in the page cache but maybe not durable yet.
        handle._write_header(STATE_DIRTY if h.state == STATE_DIRTY else STATE_SYNCED)
        bm.backing = handle
        bm.store_path = path
        handles[id(bm)] = handle
        return bm

    # --- atomic rewrites ----------------------------------------------------

    def _write_file(self, path: str, header: Header, bits: Bitmap | None) -> None:
        """Write header + bits (None: zeroes) to ``path + .tmp``, fsync, rename over ``path``."""
        tmp = path + _TMP
        nbytes = words_for(header.nbits) * 8
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            header.slot = 0
            raw = header.pack()  # slot 0; slot 1 stays zero (invalid)
            os.pwrite(fd, raw + bytes(DATA_OFFSET - len(raw)), 0)
            if bits is not None and bits.any():
                data = bits.to_bytes()
                os.pwrite(fd, data + bytes(nbytes - len(data)), DATA_OFFSET)
            os.ftruncate(fd, DATA_OFFSET + nbytes)
            reserve(fd, DATA_OFFSET + nbytes)
            self.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, path)
        self._fsync_dir(os.path.dirname(path))

    def _attach(self, path: str, header: Header, bm: DirtyBitmap, handles: dict[int, _Handle]) -> None:
        fd = os.open(path, os.O_RDWR)
        mm = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        old = handles.get(id(bm))
        bm.bits = Bitmap(header.nbits, buffer=_bits_buffer(mm, header.nbits))
        handle = _Handle(path, fd, mm, header, bm)
        bm.backing = handle
        bm.store_path = path
        handles[id(bm)] = handle
        if old is not None:
            old.bitmap = DirtyBitmap("", 0)  # so closing it does not touch bm
            old.close(clean=False)

    def _header_for(self, bm: DirtyBitmap, generation: int) -> Header:
        return Header(STATE_SYNCED, bm._recording, bm.size, bm.granularity, generation,
                      bm.nbits, self.boot_id, bm.name, seq=1)

    def create(self, export: str, bm: DirtyBitmap) -> None:
        """Persist a new bitmap (its current bits) and move its bits into the file's map."""
        d, _, handles = self._open_export(export)
        assert id(bm) not in handles and not bm.inconsistent
        path = os.path.join(d, secrets.token_hex(16) + _SUFFIX)
        header = self._header_for(bm, 1)
        self._write_file(path, header, bm.bits)
        self._attach(path, header, bm, handles)

    def rewrite(self, export: str, bm: DirtyBitmap, *, clear: bool = False) -> None:
        """Atomically rewrite ``bm``'s file with its current metadata (and no bits if ``clear``)."""
        handles = self._handles(export)
        old = handles[id(bm)]
        header = self._header_for(bm, old.header.generation + 1)
        self._write_file(old.path, header, None if clear else bm.bits)
        self._attach(old.path, header, bm, handles)

    def remove(self, export: str, bm: DirtyBitmap) -> None:
        """Delete ``bm``'s file (also for an inconsistent bitmap)."""
        handles = self._handles(export)
        h = handles.pop(id(bm), None)
        path = h.path if h is not None else getattr(bm, "store_path", None)
        if h is not None:
            h.close(clean=False)
        if path is not None:
            os.unlink(path)
            self._fsync_dir(os.path.dirname(path))

    # --- durability ---------------------------------------------------------

    def sync(self, export: str | None = None) -> None:
        """Make every bit set so far durable (before answering FLUSH / FUA)."""
        for name in [export] if export is not None else list(self._exports):
            for h in self._handles(name).values():
                h.sync()

    def close_clean(self, export: str | None = None) -> None:
        """Clean close: sync, mark every file clean, unmap, unlock."""
        for name in [export] if export is not None else list(self._exports):
            if name not in self._exports:
                continue
            _, lock, handles = self._exports.pop(name)
            self._loaded.discard(name)
            for h in handles.values():
                h.close(clean=True)
            handles.clear()
            os.close(lock)
