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
        hit = dev.pread_now(memoryview(buf), 65536)
        if hit:
            assert buf == data[65536:131072]
        else:
            # Only a filesystem without RWF_NOWAIT reads (EOPNOTSUPP: overlayfs,
            # tmpfs) may miss a cached page, and the device must then stop trying.
            assert not dev._nowait, "a cached page missed although RWF_NOWAIT works here"
            assert not dev.pread_now(memoryview(buf), 65536)
        ext = dev.extents_now(0, 1 << 20)
        assert [(e.offset, e.length, e.flags) for e in ext] == [(0, 1 << 20, 0)]
        assert dev.extents_now(0, 4096, "qemu:allocation-depth") is None
    finally:
        os.close(dev.fd)
