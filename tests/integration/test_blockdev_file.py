"""`FileDev`'s synchronous fast paths on a real file (RWF_NOWAIT reads, SEEK_DATA extents)."""

from __future__ import annotations

import os

from nbdbackup.blockdev.file import FileDev


def test_file_pread_now_is_a_page_cache_hit(tmp_path):
    path = tmp_path / "f.img"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    with open(path, "rb") as f:
        f.read()  # cached
    dev = FileDev(str(path), read_only=True)
    try:
        buf = bytearray(65536)
        if dev._nowait:  # RWF_NOWAIT supported here
            assert dev.pread_now(memoryview(buf), 65536) and buf == data[65536:131072]
        ext = dev.extents_now(0, 1 << 20)
        assert [(e.offset, e.length, e.flags) for e in ext] == [(0, 1 << 20, 0)]
        assert dev.extents_now(0, 4096, "qemu:allocation-depth") is None
    finally:
        os.close(dev.fd)
