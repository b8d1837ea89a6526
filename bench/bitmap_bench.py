"""Bitmap figures at the largest supported scale: 16 TiB disk, 64 KiB granules (256 Mi bits).

Run: ``.venv/bin/python bench/bitmap_bench.py [--seed N]``.  Prints:

- memory: bytes held by the words and the summary, and the process's RSS growth;
- mark: time for 1e5 `DirtyBitmap.mark` calls of random ranges (1 B .. 8 MiB);
- extents: time to list every dirty range (`dirty_ranges`) when sparse
  (0.1 % of granules dirty, isolated) and dense (~50 % dirty, runs of 1-256
  granules), and `runs()` over the whole dense bitmap;
- next_set: time to walk every set bit of a 99.99 %-empty bitmap with
  `next_set`, and a single next_set from 0 when only the last bit is set;
- persistent: the same mark loop against a memory-mapped `BitmapStore` file
  and the cost of `sync` (msync) after it.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nbdbackup.bitmap.core import Bitmap  # noqa: E402
from nbdbackup.bitmap.dirty import BitmapRegistry, DirtyBitmap  # noqa: E402
from nbdbackup.bitmap.store import BitmapStore  # noqa: E402

DISK = 16 * 1024**4
G = 64 * 1024
NBITS = DISK // G


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(label: str, fn, *, per: int | None = None):
    t = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t
    extra = f"  ({dt / per * 1e6:.2f} us each)" if per else ""
    print(f"{label:<58} {dt * 1e3:10.1f} ms{extra}")
    return result


def mark_loop(bm: DirtyBitmap, rnd: random.Random, n: int) -> None:
    for _ in range(n):
        length = rnd.randrange(1, 8 << 20)
        bm.mark(rnd.randrange(0, DISK - length), length)


def walk_next_set(b: Bitmap) -> int:
    n, pos = 0, 0
    while (pos := b.next_set(pos)) >= 0:
        n += 1
        pos += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    import common  # bench/common.py: touch fresh guest memory once per boot
    common.warm_guest_memory()
    rnd = random.Random(args.seed)
    print(f"bitmap: {NBITS} bits ({DISK >> 40} TiB @ {G >> 10} KiB)")

    rss0 = rss_mib()
    bm = timed("create DirtyBitmap", lambda: DirtyBitmap("b", DISK, G))
    bits = bm.bits
    held = bits._w.nbytes + bits._nz.nbytes + bits._full.nbytes
    bits.set_all()
    bits.clear_all()  # touch every page so RSS shows the real cost
    print(f"{'memory: words + summary':<58} {held / 2**20:10.3f} MiB")
    print(f"{'memory: RSS growth':<58} {rss_mib() - rss0:10.1f} MiB")

    timed("mark 1e5 random ranges (1 B .. 8 MiB)", lambda: mark_loop(bm, rnd, 100_000), per=100_000)
    print(f"{'  -> dirty granules':<58} {bm.bits.count():10d}")

    bm.clear()
    for _ in range(NBITS // 1000):
        bits.set(rnd.randrange(NBITS))
    r = timed("dirty_ranges, sparse (0.1 % granules, isolated)", bm.dirty_ranges)
    print(f"{'  -> ranges':<58} {len(r):10d}")
    timed("count() whole bitmap", bits.count)

    bm.clear()
    pos = 0
    while pos < NBITS:
        n = rnd.randrange(1, 257)
        bits.set(pos, min(n, NBITS - pos))
        pos += n + rnd.randrange(1, 257)
    r = timed("dirty_ranges, dense (~50 %, runs of 1..256 granules)", bm.dirty_ranges)
    print(f"{'  -> ranges':<58} {len(r):10d}")
    timed("runs() over the whole dense bitmap", lambda: sum(1 for _ in bits.runs()))
    timed("extents(0, 1 TiB) dense", lambda: bm.extents(0, 1 << 40))

    bm.clear()
    for _ in range(NBITS // 10000):
        bits.set(rnd.randrange(NBITS))
    n = timed("next_set walk, 99.99 % empty (every set bit)", lambda: walk_next_set(bits))
    print(f"{'  -> set bits':<58} {n:10d}")
    bm.clear()
    bits.set(NBITS - 1)
    timed("next_set(0) with only the last bit set", lambda: bits.next_set(0))
    bits.set_all()
    bits.clear(NBITS - 1)
    timed("next_clear(0) with only the last bit clear", lambda: bits.next_clear(0))
    del bm, bits

    with tempfile.TemporaryDirectory() as d:
        store = BitmapStore(d)
        reg = BitmapRegistry("exp", DISK, store)
        pbm = timed("persistent: create 16 TiB bitmap file (fsync + rename)",
                    lambda: reg.add("p", G, persistent=True))
        timed("persistent: mark 1e5 random ranges", lambda: mark_loop(pbm, rnd, 100_000), per=100_000)
        timed("persistent: sync (msync of the map) after the marks", reg.sync)
        pbm.mark(0, 1)
        timed("persistent: sync after one mark", reg.sync)
        timed("persistent: sync with nothing marked", reg.sync)
        timed("persistent: clear (atomic rewrite of the file)", lambda: reg.clear("p"))
        reg.close()
    print(f"{'max RSS':<58} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:10.1f} MiB")


if __name__ == "__main__":
    main()
