"""A flat bitmap with a summary level: the storage under copy state and dirty tracking.

Role: `Bitmap` is a fixed-size array of ``nbits`` bits (bit i = cluster or
granule i) with range operations (set/clear/count) and searches
(next_set/next_clear/runs) that skip uniform areas quickly.  It knows nothing
about bytes, disks or files; `dirty.DirtyBitmap` gives it a byte-range view and
`store` puts it in a memory-mapped file (through the ``buffer`` argument).

Layout (also the on-disk and `to_bytes` format)::

    bit i  ->  byte i // 8, bit (i % 8) of that byte  (least significant first)

which is the same as: 64-bit little-endian word i // 64, bit i % 64.  The
words are a numpy ``<u8`` array (on any host byte order).

Summary level (the idea of QEMU's HBitmap, reduced to two flags): the words
are grouped in blocks of `BLOCK_WORDS` words (4 KiB, 32768 bits); for each
block ``_nz[b]`` is True iff some bit of the block is set, and ``_full[b]`` is
True iff every word of the block is all ones.  Searches skip blocks the
summary proves uniform, so next_set over a mostly-empty 256 Mi-bit bitmap
looks at 8192 summary flags, not 4 Mi words.

Invariants (checked by `_check` in tests):
- bits at positions >= ``nbits`` in the last word are always 0 (so the
  padding never counts, and `to_bytes` is canonical);
- ``_nz`` and ``_full`` are exact for every block after every public method.
  (The last word of a bitmap whose ``nbits`` is not a multiple of 64 is never
  all ones, so a final partial block is never "full": this costs a scan, never
  a wrong answer.)

Memory: ``ceil(nbits / 64) * 8`` bytes of words plus 2 bytes per 4 KiB block
(256 Mi bits: 32 MiB + 16 KiB).  Operations touch only the words in their range
plus at most two blocks' worth of words to refresh the summary at its edges.

Not thread-safe: callers use it from one thread (the asyncio loop).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["Bitmap", "BLOCK_WORDS", "words_for"]

#: Words per summary block (512 words = 4 KiB = 32768 bits).
BLOCK_WORDS = 512
_BLOCK_SHIFT = 9
_ALL = (1 << 64) - 1
_NP_ALL = np.uint64(_ALL)
#: Largest number of words processed by one numpy call in `count` (bounds
#: temporary memory to a few MiB however large the bitmap).
_CHUNK_WORDS = 1 << 20


def words_for(nbits: int) -> int:
    """Number of 64-bit words holding ``nbits`` bits."""
    return (nbits + 63) >> 6


def _lowbit(w: int) -> int:
    """Index of the least significant set bit of ``w`` (w != 0)."""
    return (w & -w).bit_length() - 1


class Bitmap:
    """``nbits`` bits; see the module docstring for layout and invariants.

    Fields:
    - ``_nbits``: number of bits (constant).
    - ``_w``: numpy ``<u8`` array of ``words_for(nbits)`` words; either owned
      or a view of the caller's ``buffer`` (e.g. an mmap slice), in which case
      every change lands in that buffer at once.
    - ``_nz`` / ``_full``: per-block summary flags (numpy bool arrays), exact.
    """

    __slots__ = ("_nbits", "_w", "_nz", "_full", "__weakref__")

    def __init__(self, nbits: int, *, fill: bool = False, buffer=None) -> None:
        """Create a bitmap of ``nbits`` bits.

        Without ``buffer`` the bits are all ``fill``.  With ``buffer`` (a
        writable buffer of at least ``words_for(nbits) * 8`` bytes, 8-byte
        aligned for speed) the bitmap lives in it: its current content is
        adopted as is when ``fill`` is False (padding bits past ``nbits`` are
        cleared), or every bit is set when ``fill`` is True.
        """
        if not isinstance(nbits, int) or nbits < 0:
            raise ValueError(f"bad bitmap size {nbits!r}")
        self._nbits = nbits
        n = words_for(nbits)
        if buffer is None:
            self._w = np.zeros(n, dtype="<u8")
        else:
            mv = memoryview(buffer).cast("B")
            if mv.readonly:
                raise ValueError("bitmap buffer must be writable")
            if len(mv) < n * 8:
                raise ValueError(f"bitmap buffer too small: {len(mv)} < {n * 8} bytes")
            self._w = np.frombuffer(mv, dtype="<u8", count=n)
        nblocks = (n + BLOCK_WORDS - 1) >> _BLOCK_SHIFT
        self._nz = np.zeros(nblocks, dtype=bool)
        self._full = np.zeros(nblocks, dtype=bool)
        if fill:
            self.set_all()
        elif buffer is not None:
            self._mask_padding()
            self._rebuild_summary()

    # --- properties and helpers ---------------------------------------------

    @property
    def nbits(self) -> int:
        """Number of bits (read-only)."""
        return self._nbits

    def __len__(self) -> int:
        return self._nbits

    def __repr__(self) -> str:
        return f"<Bitmap nbits={self._nbits} set={self.count()}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self._nbits == other._nbits and bool(np.array_equal(self._w, other._w))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def _mask_padding(self) -> None:
        r = self._nbits & 63
        if r:
            last = len(self._w) - 1
            self._w[last] = int(self._w[last]) & ((1 << r) - 1)

    def _rebuild_summary(self) -> None:
        """Recompute ``_nz`` and ``_full`` from the words (O(nwords))."""
        n = len(self._w)
        if n == 0:
            return
        starts = np.arange(0, n, BLOCK_WORDS)
        for lo in range(0, len(starts), _CHUNK_WORDS // BLOCK_WORDS):
            hi = min(lo + _CHUNK_WORDS // BLOCK_WORDS, len(starts))
            wlo = int(starts[lo])
            whi = min(hi * BLOCK_WORDS, n)
            seg = self._w[wlo:whi]
            rel = starts[lo:hi] - wlo
            self._nz[lo:hi] = np.logical_or.reduceat(seg != 0, rel)
            self._full[lo:hi] = np.logical_and.reduceat(seg == _NP_ALL, rel)

    def _refresh_block(self, b: int) -> None:
        seg = self._w[b << _BLOCK_SHIFT : (b + 1) << _BLOCK_SHIFT]
        self._nz[b] = bool(seg.any())
        self._full[b] = bool((seg == _NP_ALL).all())

    def _check_range(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self._nbits:
            raise ValueError(f"bit range ({start}, {count}) outside bitmap of {self._nbits} bits")

    def _check_search(self, start: int, end: int | None) -> int:
        if end is None:
            end = self._nbits
        if start < 0 or end > self._nbits:
            raise ValueError(f"search [{start}, {end}) outside bitmap of {self._nbits} bits")
        return end

    def _check(self) -> None:
        """Assert every invariant (O(nbits); for tests)."""
        r = self._nbits & 63
        if r:
            assert int(self._w[-1]) >> r == 0, "padding bits set"
        nz, full = self._nz.copy(), self._full.copy()
        self._rebuild_summary()
        assert np.array_equal(nz, self._nz), "stale _nz summary"
        assert np.array_equal(full, self._full), "stale _full summary"

    # --- single bits --------------------------------------------------------

    def get(self, i: int) -> bool:
        """Value of bit ``i``."""
        if not 0 <= i < self._nbits:
            raise IndexError(f"bit {i} outside bitmap of {self._nbits} bits")
        return bool((int(self._w[i >> 6]) >> (i & 63)) & 1)

    __getitem__ = get

    # --- range updates ------------------------------------------------------

    def _edge(self, wi: int, mask: int, value: bool) -> None:
        """Set (value) or clear the ``mask`` bits of word ``wi``; keep the summary exact."""
        old = int(self._w[wi])
        new = (old | mask) if value else (old & ~mask)
        if new == old:
            return
        self._w[wi] = new
        b = wi >> _BLOCK_SHIFT
        if value:
            self._nz[b] = True
            if new == _ALL:  # the block may have become full
                self._full[b] = bool(
                    (self._w[b << _BLOCK_SHIFT : (b + 1) << _BLOCK_SHIFT] == _NP_ALL).all()
                )
        else:
            self._full[b] = False
            if new == 0:  # the block may have become empty
                self._nz[b] = bool(self._w[b << _BLOCK_SHIFT : (b + 1) << _BLOCK_SHIFT].any())

    def _fill_words(self, lo: int, hi: int, value: bool) -> None:
        """Fill whole words ``[lo, hi)`` with all ones (value) or zeroes."""
        if lo >= hi:
            return
        self._w[lo:hi] = _NP_ALL if value else 0
        b0 = lo >> _BLOCK_SHIFT
        b1 = (hi - 1) >> _BLOCK_SHIFT
        # Blocks entirely inside [lo, hi) become uniform.
        f0 = b0 if lo == b0 << _BLOCK_SHIFT else b0 + 1
        f1 = b1 if hi == min((b1 + 1) << _BLOCK_SHIFT, len(self._w)) else b1 - 1
        if f0 <= f1:
            self._nz[f0 : f1 + 1] = value
            # A block ending in a partial (padded) word can't be all ones,
            # but that word is never filled whole, so such a block is never
            # "entirely inside" a fill of ones.
            self._full[f0 : f1 + 1] = value
        for b in {b0, b1}:
            if not f0 <= b <= f1:
                self._refresh_block(b)

    def _update(self, start: int, count: int, value: bool) -> None:
        self._check_range(start, count)
        if count == 0:
            return
        end = start + count
        ws = start >> 6
        we = (end - 1) >> 6
        if ws == we:
            self._edge(ws, ((1 << count) - 1) << (start & 63), value)
            return
        # First word: bits start%64..63; last word: bits 0..(end-1)%64.
        first_full = (start & 63) == 0
        last_full = (end & 63) == 0
        lo = ws if first_full else ws + 1
        hi = we + 1 if last_full else we
        if not first_full:
            self._edge(ws, (_ALL << (start & 63)) & _ALL, value)
        self._fill_words(lo, hi, value)
        if not last_full:
            self._edge(we, (1 << (end & 63)) - 1, value)

    def set(self, start: int, count: int = 1) -> None:
        """Set bits ``[start, start + count)``."""
        self._update(start, count, True)

    def clear(self, start: int, count: int = 1) -> None:
        """Clear bits ``[start, start + count)``."""
        self._update(start, count, False)

    def set_all(self) -> None:
        """Set every bit."""
        self._update(0, self._nbits, True)

    def clear_all(self) -> None:
        """Clear every bit."""
        self._w[:] = 0
        self._nz[:] = False
        self._full[:] = False

    # --- queries ------------------------------------------------------------

    def count(self, start: int = 0, count: int | None = None) -> int:
        """Number of set bits in ``[start, start + count)`` (default: to the end)."""
        if count is None:
            count = self._nbits - start
        self._check_range(start, count)
        if count == 0:
            return 0
        end = start + count
        ws = start >> 6
        we = (end - 1) >> 6
        w = self._w
        if ws == we:
            return ((int(w[ws]) >> (start & 63)) & ((1 << count) - 1)).bit_count()
        total = (int(w[ws]) >> (start & 63)).bit_count()
        tail = ((end - 1) & 63) + 1  # bits of the last word inside the range
        total += (int(w[we]) & ((1 << tail) - 1)).bit_count()
        lo, hi = ws + 1, we
        while lo < hi:
            # Skip blocks known empty/full cheaply would complicate this; the
            # popcount itself runs at memory speed.
            step = min(hi, lo + _CHUNK_WORDS)
            total += int(np.bitwise_count(w[lo:step]).sum(dtype=np.int64))
            lo = step
        return total

    def _find_word(self, lo: int, hi: int, nonzero: bool) -> int:
        """First word index in ``[lo, hi)`` that is != 0 (nonzero) or != all ones; -1 if none."""
        w = self._w
        summary = self._nz if nonzero else self._full
        nblocks_hi = (hi + BLOCK_WORDS - 1) >> _BLOCK_SHIFT
        while lo < hi:
            b = lo >> _BLOCK_SHIFT
            # Block b is a candidate when it has a set bit (nonzero search) or
            # is not all ones (clear search).
            if bool(summary[b]) == nonzero:
                bend = min((b + 1) << _BLOCK_SHIFT, hi)
                seg = w[lo:bend]
                idx = np.flatnonzero(seg) if nonzero else np.flatnonzero(seg != _NP_ALL)
                if idx.size:
                    return lo + int(idx[0])
            b += 1
            if b >= nblocks_hi:
                return -1
            sl = summary[b:nblocks_hi]
            k = int(np.argmax(sl)) if nonzero else int(np.argmin(sl))
            if bool(sl[k]) != nonzero:
                return -1
            lo = (b + k) << _BLOCK_SHIFT
        return -1

    def _next(self, start: int, end: int | None, value: bool) -> int:
        end = self._check_search(start, end)
        if start >= end:
            return -1
        ws = start >> 6
        word = int(self._w[ws])
        if not value:
            word = ~word & _ALL
        word &= (_ALL << (start & 63)) & _ALL
        if word:
            pos = (ws << 6) + _lowbit(word)
            return pos if pos < end else -1
        wi = self._find_word(ws + 1, words_for(end), value)
        if wi < 0:
            return -1
        word = int(self._w[wi])
        if not value:
            word = ~word & _ALL
        pos = (wi << 6) + _lowbit(word)
        return pos if pos < end else -1

    def next_set(self, start: int, end: int | None = None) -> int:
        """First set bit in ``[start, end)`` (default end: nbits), or -1."""
        return self._next(start, end, True)

    def next_clear(self, start: int, end: int | None = None) -> int:
        """First clear bit in ``[start, end)`` (default end: nbits), or -1."""
        return self._next(start, end, False)

    def runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bool]]:
        """Maximal runs ``(start, count, value)`` covering ``[start, end)`` in order.

        The first run starts at ``start`` and the last ends at ``end`` (runs
        are clipped to the range, so "maximal" is within the range).  The
        bitmap must not change while the iterator is in use.

        Walks summary blocks: a uniform block extends the current run in O(1);
        a mixed block is unpacked and its transitions found with numpy.
        """
        end = self._check_search(start, end)
        if start >= end:
            return
        run_start, run_value = start, self.get(start)
        pos = start
        block_bits = BLOCK_WORDS * 64
        while pos < end:
            b = pos // block_bits
            bend = min((b + 1) * block_bits, end)
            if self._full[b] or not self._nz[b]:
                value = bool(self._full[b])
                if value != run_value:
                    yield (run_start, pos - run_start, run_value)
                    run_start, run_value = pos, value
                pos = bend
                continue
            w0 = pos >> 6
            bits = np.unpackbits(self._w[w0 : words_for(bend)].view(np.uint8), bitorder="little")
            bits = bits[pos - (w0 << 6) : bend - (w0 << 6)]
            if bool(bits[0]) != run_value:
                yield (run_start, pos - run_start, run_value)
                run_start, run_value = pos, not run_value
            for c in (np.flatnonzero(bits[1:] != bits[:-1]) + (pos + 1)).tolist():
                yield (run_start, c - run_start, run_value)
                run_start, run_value = c, not run_value
            pos = bend
        yield (run_start, end - run_start, run_value)

    def any(self, start: int = 0, count: int | None = None) -> bool:
        """True if some bit of ``[start, start + count)`` is set (False for an empty range)."""
        if count is None:
            count = self._nbits - start
        self._check_range(start, count)
        return self.next_set(start, start + count) >= 0

    def all(self, start: int = 0, count: int | None = None) -> bool:
        """True if every bit of ``[start, start + count)`` is set (True for an empty range)."""
        if count is None:
            count = self._nbits - start
        self._check_range(start, count)
        return self.next_clear(start, start + count) < 0

    # --- whole-bitmap operations -------------------------------------------

    def merge(self, other: "Bitmap") -> None:
        """``self |= other`` (same nbits)."""
        if other._nbits != self._nbits:
            raise ValueError(f"merge of bitmaps of {other._nbits} and {self._nbits} bits")
        np.bitwise_or(self._w, other._w, out=self._w)
        self._nz |= other._nz
        # OR of two non-full blocks may be full: recompute only where needed.
        for b in np.flatnonzero(self._nz & ~self._full):
            self._full[b] = bool(
                (self._w[int(b) << _BLOCK_SHIFT : (int(b) + 1) << _BLOCK_SHIFT] == _NP_ALL).all()
            )

    def copy(self) -> "Bitmap":
        """An independent copy held in memory (even if ``self`` lives in a buffer)."""
        new = Bitmap.__new__(Bitmap)
        new._nbits = self._nbits
        new._w = self._w.copy()
        new._nz = self._nz.copy()
        new._full = self._full.copy()
        return new

    def copy_from(self, other: "Bitmap") -> None:
        """Make ``self`` equal to ``other`` (same nbits), in place (keeps ``self``'s buffer)."""
        if other._nbits != self._nbits:
            raise ValueError(f"copy of a {other._nbits}-bit bitmap into {self._nbits} bits")
        self._w[:] = other._w
        self._nz[:] = other._nz
        self._full[:] = other._full

    @property
    def nbytes(self) -> int:
        """Length of `to_bytes` output: ``ceil(nbits / 8)``."""
        return (self._nbits + 7) >> 3

    def to_bytes(self) -> bytes:
        """The bits as ``ceil(nbits/8)`` bytes, bit i in byte i//8 at bit i%8 (LSB first)."""
        return self._w.tobytes()[: self.nbytes]

    @classmethod
    def from_bytes(cls, nbits: int, data: bytes | bytearray | memoryview) -> "Bitmap":
        """Inverse of `to_bytes`.  ``data`` must be exactly ``ceil(nbits/8)`` bytes;
        bits past ``nbits`` in the last byte are ignored (cleared)."""
        nbytes = (nbits + 7) >> 3
        if len(data) != nbytes:
            raise ValueError(f"{len(data)} bytes for a {nbits}-bit bitmap (want {nbytes})")
        buf = bytearray(words_for(nbits) * 8)
        buf[:nbytes] = data
        bm = cls(nbits)
        bm._w[:] = np.frombuffer(buf, dtype="<u8")
        bm._mask_padding()
        bm._rebuild_summary()
        return bm
