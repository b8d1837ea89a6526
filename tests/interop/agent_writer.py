"""A guest-like writer for the backup agent tests: a separate process writing a live export with libnbd.

Usage (``python agent_writer.py MODE URI [URI2] ...``):

- ``burst URI SEED COUNT CLUSTER [text]``: write COUNT random clusters (CLUSTER
  bytes, aligned) with random data (``text``: compressible, file-like lines
  instead), then print the sorted distinct cluster indexes as JSON and exit.
  Deterministic for a seed.
- ``loop URI SEED CLUSTER``: write random clusters until SIGTERM/SIGKILL.
- ``lockstep URI1 URI2``: for k = 1, 2, ...: write k (8 bytes, little endian) at
  offset 0 of URI1, then of URI2, until killed; a disk pair taken at one point in
  time always shows k1 == k2 or k1 == k2 + 1.

Every write is acknowledged before the next (a guest's synchronous writes).
"""

from __future__ import annotations

import json
import random
import struct
import sys
import time

import nbd


def _open(uri: str) -> "nbd.NBD":
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def _text(rng: random.Random, n: int) -> bytes:
    """``n`` bytes of file-like lines (compressible about 3-4x, as a file system's files)."""
    words = [b"usr", b"share", b"lib", b"python3", b"config", b"value", b"=", b"#", b"/", b"0x", b"true"]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(words) + b"%x" % rng.randrange(1 << 16) for _ in range(rng.randrange(3, 12)))
        out += b"\n"
    return bytes(out[:n])


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "burst":
        uri, seed, count, cluster = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        text = argv[5:] == ["text"]
        rng = random.Random(seed)
        h = _open(uri)
        n = h.get_size() // cluster
        done = set()
        for _ in range(count):
            i = rng.randrange(n)
            h.pwrite(_text(rng, cluster) if text else rng.randbytes(cluster), i * cluster)
            done.add(i)
        h.flush()
        h.shutdown()
        print(json.dumps(sorted(done)), flush=True)
    elif mode == "loop":
        uri, seed, cluster = argv[1], int(argv[2]), int(argv[3])
        rng = random.Random(seed)
        h = _open(uri)
        n = h.get_size() // cluster
        print("ready", flush=True)
        while True:
            h.pwrite(rng.randbytes(4096), rng.randrange(n) * cluster + rng.randrange(cluster // 4096) * 4096)
            time.sleep(0.002)
    elif mode == "lockstep":
        h1, h2 = _open(argv[1]), _open(argv[2])
        print("ready", flush=True)
        k = 0
        while True:
            k += 1
            h1.pwrite(struct.pack("<Q", k), 0)
            h2.pwrite(struct.pack("<Q", k), 0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
