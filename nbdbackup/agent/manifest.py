"""Chunk manifests: blake3 digests of a disk image, chunk by chunk.

Role: the proof that a copy holds what its source held.  A pull computes
each chunk's digest from the bytes it read from the snapshot export (never
from what it wrote), so `verify` of the target against the manifest proves
target == snapshot, and `verify` of the snapshot URI proves the manifest
describes it.  Chunks are also the unit the planned deduplicating chunk
repository will store.

Format (JSON, one object)::

    {"format": "nbdbackup-manifest", "version": 1, "algorithm": "blake3",
     "size": BYTES, "chunk_size": BYTES, "chunks": ["<64 hex>", ...],
     "root": "<64 hex>"}

Chunk ``i`` covers ``(i * chunk_size, min(chunk_size, size - i * chunk_size))``;
``root`` is the blake3 of the concatenated 32-byte chunk digests, so two
images are equal iff their roots are (with the same size and chunk size).

Invariants: ``len(chunks) == ceil(size / chunk_size)``; a manifest is
written atomically (temporary file, fsync, rename); `load` validates every
field and raises `ConfigError` naming the problem.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field

import blake3

from ..errors import ConfigError

FORMAT = "nbdbackup-manifest"
VERSION = 1
DEFAULT_CHUNK = 4 << 20
#: The largest chunk a manifest (and so a repository) may use.  A pull holds several chunks
#: in memory per connection and a restore one per thread; restic and borg cut at most 8 MiB,
#: Proxmox Backup Server 4 MiB (16 MiB dynamic).  Past this, ``--chunk-size 1T`` was accepted
#: and the first pull died of MemoryError (or of the OOM killer, a little lower).
MAX_CHUNK = 64 << 20

#: `Manifest.packed` joins this many ids at a time.
PACK_RUN = 1 << 12

_zero_cache: dict[int, bytes] = {}


def digest(data) -> bytes:
    """blake3 of ``data`` (any buffer), on the calling thread.

    (blake3's ``max_threads=AUTO`` spins a thread pool per call: with several
    chunks hashed at once on two CPUs that cost 5x the CPU time.  Callers
    get parallelism by hashing chunks on several threads instead.)
    """
    return blake3.blake3(data).digest()


def zero_digest(length: int) -> bytes:
    """Digest of ``length`` zero bytes (cached: every hole chunk has one)."""
    d = _zero_cache.get(length)
    if d is None:
        d = _zero_cache[length] = digest(bytes(length))
    return d


@dataclass
class Manifest:
    """Per-chunk digests of an image of ``size`` bytes (see the module doc)."""

    size: int
    chunk_size: int = DEFAULT_CHUNK
    chunks: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ConfigError(f"bad manifest geometry: size {self.size}")
        if not 0 < self.chunk_size <= MAX_CHUNK or self.chunk_size % 4096:
            raise ConfigError(f"chunk size {self.chunk_size}: give a multiple of 4096 bytes from 4K to "
                              f"{MAX_CHUNK >> 20}M")
        if not self.chunks:
            self.chunks = [b""] * self.count

    @property
    def count(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_range(self, i: int) -> tuple[int, int]:
        off = i * self.chunk_size
        return off, min(self.chunk_size, self.size - off)

    def chunks_of(self, offset: int, length: int) -> range:
        """Indexes of the chunks that ``(offset, length)`` touches."""
        if length <= 0:
            return range(0)
        return range(offset // self.chunk_size, (offset + length - 1) // self.chunk_size + 1)

    @property
    def root(self) -> bytes:
        return digest(self.packed())

    def differences(self, other: "Manifest") -> list[int]:
        """Indexes of chunks whose digests differ (geometry must match)."""
        if (self.size, self.chunk_size) != (other.size, other.chunk_size):
            raise ConfigError(f"manifests differ in geometry: {self.size}/{self.chunk_size} vs "
                              f"{other.size}/{other.chunk_size}")
        return [i for i, (a, b) in enumerate(zip(self.chunks, other.chunks)) if a != b]

    # -- binary form (repository snapshots) -----------------------------------

    def packed(self) -> bytes:
        """The digests as one string of 32-byte values (what `root` hashes; a bytearray).  Every
        digest is checked to be 32 bytes by C code (a generator per chunk was ~0.3 s per 10^6
        chunks).  Joined `PACK_RUN` ids at a time into the result: one ``b"".join`` of all of them
        holds an 80-byte buffer descriptor per item on top of the result (112 MB for a 1 TiB disk's
        32 MB of ids, docs/hunt13.md)."""
        assert not any(map((32).__ne__, map(len, self.chunks))), "manifest incomplete"
        out = bytearray(32 * len(self.chunks))
        for i in range(0, len(self.chunks), PACK_RUN):
            run = self.chunks[i:i + PACK_RUN]
            out[32 * i:32 * (i + len(run))] = b"".join(run)
        return out

    @classmethod
    def from_packed(cls, size: int, chunk_size: int, packed, where: str = "manifest",
                    common: tuple[bytes, ...] = ()) -> "Manifest":
        """The manifest of ``size`` bytes whose digests are ``packed`` (see `packed`).

        ``common``: digests to share, one object each, wherever they occur (the repository's
        zero-chunk id: a 1 TiB disk that is mostly holes has ~10^6 of them, 80 MB as separate
        objects, 8 MB as references to one; docs/hunt13.md).  Built by C-level ``map``s, not a
        Python loop per chunk (0.5 -> 0.2 s for 10^6 chunks)."""
        m = cls(size, chunk_size)
        b = bytes(packed)
        if len(b) != 32 * m.count:
            raise ConfigError(f"{where}: {len(b)} bytes of digests for {m.count} chunks")
        ids = map(b.__getitem__, map(slice, range(0, len(b), 32), range(32, len(b) + 32, 32)))
        if common:
            share = {c: c for c in common}
            a, c = itertools.tee(ids)  # consumed in step: tee holds one item at a time
            m.chunks = list(map(share.get, a, c))  # share.get(d, d): the shared object, else d
        else:
            m.chunks = list(ids)
        return m

    # -- files ----------------------------------------------------------------

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "algorithm": "blake3", "size": self.size,
                "chunk_size": self.chunk_size, "chunks": [c.hex() for c in self.chunks],
                "root": self.root.hex()}

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, separators=(",", ":"))
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Manifest":
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such manifest") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a readable manifest: {e}") from None
        return cls.from_json(raw, path)

    @classmethod
    def from_json(cls, raw: object, path: str = "manifest") -> "Manifest":
        """Validate a decoded manifest document (``path`` names it in errors)."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != VERSION \
                or raw.get("algorithm") != "blake3":
            raise ConfigError(f"{path}: not an {FORMAT} version {VERSION} (blake3) file")
        size, chunk, chunks = raw.get("size"), raw.get("chunk_size"), raw.get("chunks")
        if not isinstance(size, int) or not isinstance(chunk, int) or not isinstance(chunks, list):
            raise ConfigError(f"{path}: size, chunk_size and chunks are required")
        m = cls(size, chunk)
        if len(chunks) != m.count:
            raise ConfigError(f"{path}: {len(chunks)} chunk digests for {m.count} chunks")
        try:
            m.chunks = [bytes.fromhex(c) for c in chunks]
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: a chunk digest is not hex") from None
        if any(len(c) != 32 for c in m.chunks):
            raise ConfigError(f"{path}: a chunk digest is not 32 bytes")
        if raw.get("root") != m.root.hex():
            raise ConfigError(f"{path}: root digest does not match the chunk digests (file damaged?)")
        return m
