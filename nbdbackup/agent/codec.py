"""How a repository object's bytes are stored: zstd compression and AES-256-GCM encryption.

Role: the one place that turns a chunk's (or a snapshot frame's) plaintext
into the bytes a store keeps, and back.  `agent.repo` calls `Codec.encode`
before every write and `Codec.decode` after every read; nothing else knows
the envelope.  Keys come from `agent.crypto`.

Envelope (format version 2)::

    plain:      MAGIC  flags  payload
    encrypted:  MAGIC  flags  nonce(12)  AES-256-GCM(payload) || tag(16)

``MAGIC`` is one byte (0xB2: "nbdbackup object, format 2"); ``flags`` is a
bit set: `ZSTD` (the payload is one zstd frame, content size in its header)
and `AEAD` (encrypted).  ``payload`` is the plaintext itself when
compression does not pay (it saves less than 1/16 of the size) or is off.
An encrypted object's associated data is ``MAGIC flags name``, where
``name`` is the object's key in the store (``chunks/ab/ab12...``,
``snapshots/NAME#meta``): the flags cannot be flipped, and an object copied
or renamed to another key fails authentication, so a store operator cannot
swap one chunk for another.

Invariants: every encrypted object gets a fresh random 96-bit nonce from
the OS (``os.urandom``), never a counter, so concurrent writers on several
hosts cannot reuse one (safe for ~2**32 objects per key: 16 PiB of 4 MiB
chunks); in an encrypted repository `decode` refuses an object without
`AEAD` (a store operator cannot inject plaintext); `decode` never returns
more than ``limit`` bytes (a zstd bomb is an error); every failure is a
`CodecError` whose text says what is wrong.  Compression contexts are
per thread (zstandard's are not thread-safe; both libraries release the
GIL, so chunks are encoded on worker threads in parallel).

Compression levels: a repository's setting (`Compression`, config.json's
``"compression"``) is ``none``, a fixed ``zstd:LEVEL`` or the adaptive
``zstd`` (the default of new repositories): a full backup's chunks at
`AUTO_FULL_LEVEL` (stored once, they are most of the repository), an
incremental's at `AUTO_INCREMENTAL_LEVEL` (a few changed chunks, paid on
every scheduled run; ~8% more bytes for ~35% less CPU on file-system data,
docs/autolevel.md).  Proxmox Backup Server stores its chunks at zstd level 1,
restic's ``auto`` is its fastest level.  Decoding needs no level (a zstd frame
carries its own parameters), so one repository mixes levels freely and a reader
that predates the adaptive setting reads ``zstd`` as level 3.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = 0xB2
#: Flag bits of the envelope's second byte.
ZSTD = 0x01
AEAD = 0x02
NONCE = 12
TAG = 16
#: Compression must save at least 1/PAYS_OFF of the size, else the payload is stored raw.
PAYS_OFF = 16
DEFAULT_LEVEL = 3
#: The compressibility probe (`Codec._worth_trying`): buffers of at least PROBE_MIN
#: bytes; PROBE_SAMPLES pieces of PROBE_PIECE bytes (16 KiB of a chunk) compressed at
#: PROBE_LEVEL.  It costs 0.04 ms per chunk (16 pieces of 4 KiB at the chunk's level 3:
#: 0.16 ms, 6% of compressing a 1 MiB chunk of file-system data that pays anyway) and
#: saves ~0.23 ms per incompressible 1 MiB chunk (zstd's own give-up on random data);
#: on the 648 distinct chunks of bench/repo_bench.py's ext4 image plus random ones it
#: decides as the 4 KiB level-3 probe did, for every chunk.
PROBE_MIN = 128 << 10
PROBE_SAMPLES = 16
PROBE_PIECE = 1024
PROBE_LEVEL = 1


_buffers_ok: bool | None = None


def _arg(b):
    """``b`` as cryptography's AEAD takes it: any buffer since 42-ish, only
    bytes in Debian 12's 38 (which nbdkit's Python may import first)."""
    global _buffers_ok
    if _buffers_ok is None:
        try:
            AESGCM(bytes(32)).encrypt(bytes(NONCE), memoryview(b"x"), None)
            _buffers_ok = True
        except TypeError:
            _buffers_ok = False
    return b if _buffers_ok or isinstance(b, bytes) else bytes(b)


class CodecError(ValueError):
    """An object cannot be decoded (damaged, not ours, or the wrong key)."""


#: The adaptive setting (``zstd``, no level): a full backup's chunks at this level ...
AUTO_FULL_LEVEL = DEFAULT_LEVEL
#: ... and an incremental's (chunks written against a base snapshot) at this one.
AUTO_INCREMENTAL_LEVEL = 1


@dataclass(frozen=True)
class Compression:
    """A repository's compression setting (see the module doc).

    Fields: ``full`` (zstd level of a full backup's chunks and of every object
    that is not an incremental's chunk; None: no compression); ``incremental``
    (zstd level of an incremental's chunks); ``adaptive`` (the setting is
    ``zstd`` with no level: the two levels are `AUTO_FULL_LEVEL` and
    `AUTO_INCREMENTAL_LEVEL`; else both are the one fixed level)."""

    full: int | None
    incremental: int | None
    adaptive: bool = False

    @classmethod
    def fixed(cls, level: int | None) -> "Compression":
        """Every chunk at ``level`` (None: no compression)."""
        return cls(level, level)

    @classmethod
    def auto(cls) -> "Compression":
        return cls(AUTO_FULL_LEVEL, AUTO_INCREMENTAL_LEVEL, adaptive=True)

    @classmethod
    def of(cls, value: "Compression | int | None") -> "Compression":
        """``value`` as a setting: a `Compression` as is, a level (or None) fixed."""
        return value if isinstance(value, Compression) else cls.fixed(value)

    def level(self, incremental: bool) -> int | None:
        """The zstd level of a chunk written by an incremental (True) or a full backup."""
        return self.incremental if incremental else self.full

    def level_name(self, incremental: bool) -> str:
        """`level` as a report shows it: ``zstd:LEVEL`` or ``none``."""
        level = self.level(incremental)
        return "none" if level is None else f"zstd:{level}"

    @property
    def name(self) -> str:
        """The setting as ``repo init --compression`` and config.json spell it."""
        if self.adaptive:
            return "zstd"
        return "none" if self.full is None else f"zstd:{self.full}"

    def describe(self) -> str:
        """The setting for people (``repo info``, ``repo init``)."""
        if self.adaptive:
            return f"zstd (adaptive: level {self.full} for full backups, {self.incremental} for incrementals)"
        return "none" if self.full is None else f"zstd level {self.full} (fixed)"


def parse_compression(text: str) -> Compression:
    """``zstd`` -> adaptive (`Compression.auto`); ``zstd:LEVEL`` -> that level (1..22),
    fixed; ``none`` -> no compression."""
    from ..errors import ConfigError

    if text == "none":
        return Compression.fixed(None)
    name, colon, level = text.partition(":")
    if name != "zstd" or (colon and not (level.isascii() and level.isdigit() and 1 <= int(level) <= 22)):
        raise ConfigError(f"compression {text!r}: give zstd (adaptive), zstd:LEVEL (1-22, fixed) or none")
    return Compression.fixed(int(level)) if colon else Compression.auto()


def compression_name(value: "Compression | int | None") -> str:
    return Compression.of(value).name


#: `Codec.encode`'s default ``level``: the codec's own.
OWN_LEVEL: object = object()


class Codec:
    """Encoder/decoder of repository objects (see the module doc).

    Fields: ``level`` (zstd level of `encode` and `encode_reused` unless the
    call names one, None = no compression); ``encrypted``; ``_aead`` (the
    AES-256-GCM cipher of the repository's encryption key, or None); ``_local``
    (per-thread zstd contexts: the chunks' by level (dict ``c``), the probe's,
    the decompressor; per-thread output and scratch buffers).
    """

    def __init__(self, *, level: int | None = DEFAULT_LEVEL, key: bytes | None = None) -> None:
        if key is not None and len(key) != 32:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self.level = level
        self.encrypted = key is not None
        self._aead = AESGCM(key) if key is not None else None
        self._local = threading.local()

    def _compressor(self, level: int) -> zstandard.ZstdCompressor:
        """This thread's compressor of objects at ``level``."""
        by_level = getattr(self._local, "c", None)
        if by_level is None:
            by_level = self._local.c = {}
        c = by_level.get(level)
        if c is None:
            c = by_level[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
        return c

    def _probe_compressor(self) -> zstandard.ZstdCompressor:
        """This thread's compressor of the probe's samples (its own: the chunks' compressor
        keeps its parameters for the chunks' size)."""
        c = getattr(self._local, "p", None)
        if c is None:
            c = self._local.p = zstandard.ZstdCompressor(level=PROBE_LEVEL)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def _payload(self, mv: memoryview, level: int | None):
        """(payload, flags): ``mv`` compressed at ``level`` (None: not) when that pays
        (`PAYS_OFF`), else ``mv``.

        A buffer of at least `PROBE_MIN` bytes is first probed (`_worth_trying`):
        an incompressible one (random data, already-compressed files) is not
        compressed whole, which costs about as much as hashing and encrypting it."""
        if level is not None and len(mv) and self._worth_trying(mv):
            packed = self._compressor(level).compress(mv)
            if len(packed) <= len(mv) - len(mv) // PAYS_OFF:
                return packed, ZSTD
        return mv, 0

    def _worth_trying(self, mv: memoryview) -> bool:
        """Whether compressing ``mv`` whole may pay: False only when `PROBE_SAMPLES`
        pieces of `PROBE_PIECE` bytes spread evenly over it (every 1/16 of it, so a
        compressible run long enough to pay on its own holds one) do not shrink by
        1/64 together."""
        n = len(mv)
        if n < PROBE_MIN:
            return True
        step = n // PROBE_SAMPLES
        sample = b"".join(mv[k * step : k * step + PROBE_PIECE] for k in range(PROBE_SAMPLES))
        return len(self._probe_compressor().compress(sample)) < len(sample) - len(sample) // 64

    def _level(self, compress: bool, level) -> int | None:
        """The zstd level of one `encode`: ``level`` if given, else the codec's; None
        when ``compress`` is False or compression is off."""
        if not compress:
            return None
        return self.level if level is OWN_LEVEL else level

    def encode(self, name: str, data, *, compress: bool = True, level=OWN_LEVEL) -> bytes:
        """The stored form of ``data`` (any buffer) under key ``name``, compressed
        at ``level`` (default: the codec's `level`; None: not compressed)."""
        mv = memoryview(data).cast("B")
        payload, flags = self._payload(mv, self._level(compress, level))
        if self._aead is None:
            return b"".join((bytes((MAGIC, flags)), payload))
        header = bytes((MAGIC, flags | AEAD))
        nonce = os.urandom(NONCE)
        return b"".join((header, nonce, self._aead.encrypt(nonce, _arg(payload), header + name.encode())))

    def encode_reused(self, name: str, data, *, compress: bool = True, level=OWN_LEVEL) -> memoryview:
        """`encode` into this thread's output buffer (no allocation per object,
        no joining copy): the view returned is valid until the next
        `encode_reused` on this thread (`Repository.put_chunk` writes it at once)."""
        mv = memoryview(data).cast("B")
        payload, flags = self._payload(mv, self._level(compress, level))
        n = len(payload)
        if self._aead is None:
            out = self._out(2 + n)
            out[0], out[1] = MAGIC, flags
            out[2:] = payload
            return out
        if not _encrypt_into_ok():  # cryptography < 45 (Debian 12's)
            return memoryview(self.encode(name, data, compress=compress, level=level))
        out = self._out(2 + NONCE + n + TAG)
        header = bytes((MAGIC, flags | AEAD))
        nonce = os.urandom(NONCE)
        out[:2] = header
        out[2:2 + NONCE] = nonce
        self._aead.encrypt_into(nonce, payload, header + name.encode(), out[2 + NONCE:])
        return out

    def _out(self, n: int) -> memoryview:
        """This thread's output buffer of `encode_reused`, as a view of exactly ``n`` bytes."""
        return self._thread_buffer("out", n)

    def _thread_buffer(self, which: str, n: int) -> memoryview:
        """This thread's buffer ``which`` ("out" or "scratch"), grown to at least ``n``
        bytes (1 MiB at least), as a view of exactly ``n`` bytes."""
        buf = getattr(self._local, which, None)
        if buf is None or len(buf) < n:
            buf = bytearray(max(n, 1 << 20))
            setattr(self._local, which, buf)
        return memoryview(buf)[:n]

    def _flags(self, mv: memoryview) -> int:
        """The flags of the stored object ``mv`` after the checks both decoders make
        first: the header, known flags, encrypted exactly when the repository is,
        long enough for a nonce and a tag; else `CodecError`."""
        if len(mv) < 2 or mv[0] != MAGIC or mv[1] & ~(ZSTD | AEAD):
            raise CodecError("not an nbdbackup format-2 object (bad header)")
        flags = mv[1]
        if flags & AEAD:
            if self._aead is None:
                raise CodecError("encrypted, but the repository is not")
            if len(mv) < 2 + NONCE + TAG:
                raise CodecError("truncated")
        elif self._aead is not None:
            raise CodecError("not encrypted, in an encrypted repository")
        return flags

    def decode(self, name: str, blob, limit: int) -> bytes:
        """The plaintext of the stored object ``blob`` read from key ``name``
        (at most ``limit`` bytes), or `CodecError`."""
        mv = memoryview(blob).cast("B")
        flags = self._flags(mv)
        if flags & AEAD:
            try:
                payload = self._aead.decrypt(bytes(mv[2:2 + NONCE]), _arg(mv[2 + NONCE:]),
                                             bytes(mv[:2]) + name.encode())
            except InvalidTag:
                raise CodecError("fails authentication (damaged, or not this object)") from None
        else:
            payload = mv[2:]
        if flags & ZSTD:
            try:
                size = zstandard.frame_content_size(payload)
                if size < 0 or size > limit:
                    raise CodecError(f"compressed frame of {size} bytes, at most {limit} expected")
                return self._decompressor().decompress(payload, max_output_size=limit)
            except zstandard.ZstdError as e:
                raise CodecError(f"damaged compressed data ({e})") from None
        if len(payload) > limit:
            raise CodecError(f"{len(payload)} bytes, at most {limit} expected")
        return bytes(payload)

    def decode_into(self, name: str, blob, out) -> int:
        """`decode` written into the writable buffer ``out`` (at most
        ``len(out)`` bytes: the limit); returns the plaintext's length.

        The restore's path: no allocation per object.  An encrypted payload is
        decrypted straight into ``out`` (or, when compressed, into a
        per-thread scratch buffer that zstd then decompresses into ``out``).
        On a `CodecError` ``out`` holds garbage (never use it).  Same checks
        and errors as `decode`."""
        mv = memoryview(blob).cast("B")
        dst = memoryview(out).cast("B")
        limit = len(dst)
        flags = self._flags(mv)
        if flags & AEAD:
            n = len(mv) - 2 - NONCE - TAG
            if flags & ZSTD:
                payload = self._scratch(n)
            elif n > limit:
                raise CodecError(f"{n} bytes, at most {limit} expected")
            else:
                payload = dst[:n]
            self._decrypt_into(bytes(mv[2:2 + NONCE]), mv[2 + NONCE:], bytes(mv[:2]) + name.encode(), payload)
        else:
            payload = mv[2:]
            n = len(payload)
            if not flags & ZSTD:
                if n > limit:
                    raise CodecError(f"{n} bytes, at most {limit} expected")
                dst[:n] = payload
                return n
        if not flags & ZSTD:
            return n
        try:
            size = zstandard.frame_content_size(payload)
            if size < 0 or size > limit:
                raise CodecError(f"compressed frame of {size} bytes, at most {limit} expected")
            reader = self._decompressor().stream_reader(payload, read_size=max(1, len(payload)),
                                                        read_across_frames=False)
            got = 0
            while got < size:  # one call in practice
                step = reader.readinto(dst[got:size])
                if not step:
                    break
                got += step
        except zstandard.ZstdError as e:
            raise CodecError(f"damaged compressed data ({e})") from None
        if got != size:
            raise CodecError(f"damaged compressed data ({got} of {size} bytes)")
        return size

    def _scratch(self, n: int) -> memoryview:
        """This thread's scratch buffer of `decode_into`, as a view of exactly ``n`` bytes."""
        return self._thread_buffer("scratch", n)

    def _decrypt_into(self, nonce: bytes, data: memoryview, aad: bytes, out: memoryview) -> None:
        """AES-256-GCM open of ``data`` into ``out`` (``len(data) - TAG`` bytes)."""
        assert self._aead is not None
        try:
            if _into_ok():
                self._aead.decrypt_into(nonce, data, aad, out)
            else:  # cryptography < 45 (Debian 12's): decrypt, then copy
                out[:] = self._aead.decrypt(nonce, _arg(data), aad)
        except InvalidTag:
            raise CodecError("fails authentication (damaged, or not this object)") from None


def _encrypt_into_ok() -> bool:
    """This cryptography's AESGCM has ``encrypt_into`` (45+)."""
    return hasattr(AESGCM, "encrypt_into")


def _into_ok() -> bool:
    """This cryptography's AESGCM has ``decrypt_into`` (45+, with ``encrypt_into``)."""
    return hasattr(AESGCM, "decrypt_into")
