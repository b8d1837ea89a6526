"""`nbdbackup serve` driven command by command through libnbd's Python API.

One server per module with four exports:
- ``disk``: a 4 MiB sparse file, data at 0-64k (0xab) and 1M-1.5M (0xcd);
- ``mem``:  ``memory:8M`` (zeroing can be fast);
- ``ro``:   ``ro:`` a copy of the sparse file;
- ``shm``:  a file on tmpfs (/dev/shm), where zeroing WITHOUT hole punching
  (NO_HOLE) cannot be fast: tmpfs has no FALLOC_FL_ZERO_RANGE.

Error cases run with libnbd's strict mode off, so the requests really reach
the server instead of being refused by the client library.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

import pytest

import peers

try:
    import nbd
except ImportError:  # pragma: no cover - a broken machine must fail loudly
    nbd = None

pytestmark = pytest.mark.interop

KiB, MiB = 1024, 1024 * 1024
DISK_SIZE = 4 * MiB
HOLE_ZERO = 3


@pytest.fixture(scope="module")
def server(make_image):
    if nbd is None:
        pytest.fail("python3-libnbd is not importable: run scripts/setup", pytrace=False)

    d = Path(tempfile.mkdtemp(prefix="nbdt-", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="nbdt-", dir="/dev/shm"))
    try:
        writes = [(0xAB, 0, 64 * KiB), (0xCD, 1 * MiB, 512 * KiB)]
        disk = make_image(d / "disk.img", DISK_SIZE, writes)
        ro = make_image(d / "ro.img", DISK_SIZE, writes)
        shm_img = shm / "shm.img"
        with open(shm_img, "wb") as f:
            f.truncate(1 * MiB)
        with peers.nbdbackup_serve(f"disk={disk}", "mem=memory:8M", f"ro=ro:{ro}",
                                   f"shm={shm_img}", extra=["--description", "mem=scratch RAM disk"]) as srv:
            srv.paths = {"disk": disk, "ro": ro, "shm": shm_img}
            yield srv
    finally:
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


@pytest.fixture
def connect(server):
    handles = []

    def _connect(name: str, *, strict: int | None = None, contexts=("base:allocation",)):
        h = nbd.NBD()
        for c in contexts:
            h.add_meta_context(c)
        if strict is not None:
            h.set_strict_mode(strict)
        h.connect_uri(server.uri_for(name))
        handles.append(h)
        return h

    yield _connect
    for h in handles:
        try:
            h.shutdown()
        except nbd.Error:
            pass
    assert server.alive(), f"server died:\n{server.log()}"


def expect_error(err: int, fn, *args, **kwargs) -> "nbd.Error":
    with pytest.raises(nbd.Error) as ei:
        fn(*args, **kwargs)
    assert ei.value.errnum == err, f"expected {errno.errorcode[err]}, got {ei.value}"
    return ei.value


def extents_of(h, length: int, offset: int, flags: int = 0, context: str = "base:allocation"):
    """block_status as a list of (offset, length, flags) for ``context``."""
    got: list[tuple[int, int, int]] = []

    def cb(metacontext, off, entries, err):
        if metacontext != context:
            return 0
        assert off == offset
        pos = off
        for i in range(0, len(entries), 2):
            got.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(length, offset, cb, flags)
    return got


def merge(extents):
    out = []
    for off, length, fl in extents:
        if out and out[-1][2] == fl and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, fl)
        else:
            out.append((off, length, fl))
    return out


# --- flags and negotiation ------------------------------------------------------

def test_transmission_flags(connect):
    disk = connect("disk")
    assert disk.get_size() == DISK_SIZE
    assert not disk.is_read_only()
    for name in ("can_flush", "can_fua", "can_trim", "can_zero", "can_cache", "can_multi_conn"):
        assert getattr(disk, name)(), name
    assert disk.can_meta_context("base:allocation")
    ro = connect("ro")
    assert ro.is_read_only()
    assert not ro.can_trim() and not ro.can_zero()
    mem = connect("mem")
    assert mem.get_size() == 8 * MiB
    assert mem.can_fast_zero() and mem.can_zero() and mem.can_trim()


def test_block_size_constraints(connect):
    for name in ("disk", "mem", "ro"):
        h = connect(name)
        mn, pref, mx = (h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM))
        assert (mn, pref, mx) != (0, 0, 0), f"{name}: server sent no INFO_BLOCK_SIZE"
        assert mn >= 1 and mn & (mn - 1) == 0
        assert pref >= mn and pref & (pref - 1) == 0
        assert mx >= pref
        assert mx >= 1 * MiB  # nbdcopy and qemu use >= 1M requests


def test_opt_list_and_opt_info(server):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(server.uri)
    names = []
    h.opt_list(lambda name, desc: names.append(name) or 0)
    assert sorted(names) == ["disk", "mem", "ro", "shm"]
    h.set_full_info(True)
    h.set_export_name("mem")
    h.opt_info()
    assert h.get_size() == 8 * MiB
    assert h.get_canonical_export_name() == "mem"
    # The description set with --description (NBD_INFO_DESCRIPTION); the others have none.
    assert h.get_export_description() == "scratch RAM disk"
    h.set_export_name("no-such-export")
    with pytest.raises(nbd.Error):
        h.opt_info()
    # The failed OPT_INFO leaves the negotiation usable.
    h.set_export_name("ro")
    h.opt_info()
    assert h.get_size() == DISK_SIZE and h.is_read_only()
    h.set_export_name("disk")
    h.opt_go()
    assert h.pread(4, 0) == b"\xab" * 4
    h.shutdown()


def test_opt_list_meta_context(server):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(server.uri)
    h.set_export_name("disk")
    got = []
    h.add_meta_context("base:")
    n = h.opt_list_meta_context(lambda name: got.append(name) or 0)
    assert got == ["base:allocation"] and n == 1
    # An empty query lists every context of the export.
    h.clear_meta_contexts()
    got.clear()
    h.opt_list_meta_context(lambda name: got.append(name) or 0)
    assert "base:allocation" in got
    # An unknown namespace matches nothing (not an error).
    h.add_meta_context("nosuch:thing")
    got.clear()
    assert h.opt_list_meta_context(lambda name: got.append(name) or 0) == 0 and got == []
    h.opt_abort()


def test_unknown_export_is_refused(server):
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(server.uri_for("no-such-export"))


# --- commands --------------------------------------------------------------------

def test_pread_pwrite_fua_flush(connect):
    h = connect("mem")
    h.pwrite(b"\x01" * 4096, 0)
    h.pwrite(b"\x02" * 100, 4000, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(4000, 0) == b"\x01" * 4000
    assert h.pread(100, 4000) == b"\x02" * 100
    assert h.pread(100, 4100) == bytes(100)
    # A second connection sees the data (one export, one device).
    h2 = connect("mem")
    assert h2.pread(4100, 0) == b"\x01" * 4000 + b"\x02" * 100
    big = bytes(range(256)) * (4 * MiB // 256)
    h.pwrite(big, 2 * MiB)
    assert h2.pread(len(big), 2 * MiB) == big


def test_pread_structured_reports_holes(connect):
    h = connect("disk")
    chunks = []

    def cb(buf, offset, status, err):
        chunks.append((offset, len(buf), status, bytes(buf)))
        return 0

    h.pread_structured(2 * MiB, 0, cb)
    chunks.sort()
    # The chunks tile the request exactly, with the right content.
    pos = 0
    for off, length, status, data in chunks:
        assert off == pos, chunks
        assert status in (nbd.READ_DATA, nbd.READ_HOLE)
        if status == nbd.READ_HOLE:
            assert data == bytes(length)
        pos += length
    assert pos == 2 * MiB
    content = b"".join(c[3] for c in chunks)
    assert content == b"\xab" * (64 * KiB) + bytes(1 * MiB - 64 * KiB) + b"\xcd" * (512 * KiB) + bytes(512 * KiB)
    holes = [(off, length) for off, length, status, _ in chunks if status == nbd.READ_HOLE]
    assert holes, "no OFFSET_HOLE chunk for a read over a sparse file's holes"
    for off, length in holes:
        assert (64 * KiB <= off and off + length <= 1 * MiB) or (1536 * KiB <= off), holes


def test_block_status(connect):
    h = connect("disk")
    whole = merge(extents_of(h, DISK_SIZE, 0))
    assert whole == [(0, 64 * KiB, 0), (64 * KiB, 1 * MiB - 64 * KiB, HOLE_ZERO),
                     (1 * MiB, 512 * KiB, 0), (1536 * KiB, DISK_SIZE - 1536 * KiB, HOLE_ZERO)]
    # REQ_ONE: exactly one extent, starting at the offset, not past the request.
    one = extents_of(h, DISK_SIZE, 0, nbd.CMD_FLAG_REQ_ONE)
    assert len(one) == 1 and one[0][0] == 0 and one[0][2] == 0 and 0 < one[0][1] <= 64 * KiB
    one = extents_of(h, 2 * MiB, 128 * KiB, nbd.CMD_FLAG_REQ_ONE)
    assert len(one) == 1 and one[0][2] == HOLE_ZERO and 0 < one[0][1] <= 1 * MiB - 128 * KiB
    # A request in the middle: extents start at its offset, never past its end.
    mid = extents_of(h, 100 * KiB, 1 * MiB - 50 * KiB)
    assert merge(mid) == [(1 * MiB - 50 * KiB, 50 * KiB, HOLE_ZERO), (1 * MiB, 50 * KiB, 0)]


def test_trim_and_zero_flags(connect):
    h = connect("mem")
    h.pwrite(b"\x07" * (256 * KiB), 1 * MiB)
    h.trim(64 * KiB, 1 * MiB)
    data = h.pread(64 * KiB, 1 * MiB)
    assert data in (b"\x07" * (64 * KiB), bytes(64 * KiB))  # TRIM content is undefined
    h.zero(64 * KiB, 1 * MiB + 64 * KiB)  # may punch a hole
    assert h.pread(64 * KiB, 1 * MiB + 64 * KiB) == bytes(64 * KiB)
    assert merge(extents_of(h, 64 * KiB, 1 * MiB + 64 * KiB)) == [(1 * MiB + 64 * KiB, 64 * KiB, HOLE_ZERO)]
    h.zero(64 * KiB, 1 * MiB + 128 * KiB, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(64 * KiB, 1 * MiB + 128 * KiB) == bytes(64 * KiB)
    h.zero(64 * KiB, 1 * MiB + 192 * KiB, nbd.CMD_FLAG_FAST_ZERO)  # memory: zeroing is fast
    h.zero(100, 1 * MiB + 10, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)  # unaligned
    assert h.pread(256 * KiB, 1 * MiB) == bytes(256 * KiB)
    assert h.pread(10, 1 * MiB + 256 * KiB) == b"\x00" * 10  # past the written range
    h.trim(4096, 0, nbd.CMD_FLAG_FUA)


def test_file_zero_and_trim(connect, server):
    h = connect("disk")
    h.pwrite(b"\x09" * (128 * KiB), 2 * MiB)
    h.zero(64 * KiB, 2 * MiB)
    h.zero(64 * KiB, 2 * MiB + 64 * KiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
    assert h.pread(128 * KiB, 2 * MiB) == bytes(128 * KiB)
    h.pwrite(b"\x09" * (64 * KiB), 3 * MiB)
    h.trim(64 * KiB, 3 * MiB)
    assert h.pread(64 * KiB, 3 * MiB) in (b"\x09" * (64 * KiB), bytes(64 * KiB))
    h.flush()
    with open(server.paths["disk"], "rb") as f:
        f.seek(2 * MiB)
        assert f.read(128 * KiB) == bytes(128 * KiB)


def test_fast_zero_refused_when_zeroing_cannot_be_fast(connect):
    h = connect("shm")
    h.pwrite(b"\x05" * 8192, 0)
    if not h.can_fast_zero():
        pytest.fail("shm export does not advertise FAST_ZERO; pick another case")
    e = expect_error(errno.ENOTSUP, h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert "zero" in str(e).lower() or e.errnum == errno.ENOTSUP
    # A failed fast zero must not have changed anything...
    assert h.pread(8192, 0) == b"\x05" * 8192
    # ...and the same request without FAST_ZERO succeeds (the slow way).
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(8192, 0) == bytes(4096) + b"\x05" * 4096
    # With hole punching allowed, tmpfs can zero fast.
    h.zero(4096, 4096, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(8192, 0) == bytes(8192)


def test_cache(connect):
    h = connect("disk")
    assert h.can_cache()
    h.cache(1 * MiB, 0)
    h.cache(DISK_SIZE, 0)
    connect("mem").cache(4096, 4096)


# --- error cases (strict mode off: the requests reach the server) -----------------

def test_read_past_end_is_einval(connect):
    h = connect("disk", strict=0)
    expect_error(errno.EINVAL, h.pread, 10, DISK_SIZE)
    expect_error(errno.EINVAL, h.pread, 4096, DISK_SIZE - 100)
    expect_error(errno.EINVAL, h.pread, 1, 1 << 62)
    # The connection is still fine.
    assert h.pread(4, 0) == b"\xab" * 4


def test_write_past_end_fails(connect):
    h = connect("mem", strict=0)
    size = 8 * MiB
    for fn, args in [(h.pwrite, (b"x" * 10, size - 5)), (h.zero, (10, size - 5)), (h.trim, (4096, size))]:
        with pytest.raises(nbd.Error) as ei:
            fn(*args)
        assert ei.value.errnum in (errno.ENOSPC, errno.EINVAL), ei.value
    assert h.pread(5, size - 5) == bytes(5)
    h.pwrite(b"y", size - 1)


def test_write_on_read_only_export_is_eperm(connect, server):
    h = connect("ro", strict=0)
    before = server.paths["ro"].read_bytes()[:8192]
    expect_error(errno.EPERM, h.pwrite, b"z" * 4096, 0)
    # FUA, TRIM and WRITE_ZEROES are not advertised on a read-only export, so
    # EINVAL (flag/command not negotiated) is as right as EPERM.
    for fn, args in [(h.pwrite, (b"z" * 4096, 0, nbd.CMD_FLAG_FUA)), (h.zero, (4096, 0)),
                     (h.trim, (4096, 0))]:
        with pytest.raises(nbd.Error) as ei:
            fn(*args)
        assert ei.value.errnum in (errno.EPERM, errno.EINVAL), ei.value
    assert h.pread(8192, 0) == before
    assert server.paths["ro"].read_bytes()[:8192] == before


def test_block_status_past_end_and_zero_length(connect):
    h = connect("disk", strict=0)
    with pytest.raises(nbd.Error) as ei:
        extents_of(h, 4096, DISK_SIZE)
    assert ei.value.errnum == errno.EINVAL
    assert h.pread(2, 0) == b"\xab\xab"


def test_df_read_is_one_data_chunk(connect):
    h = connect("disk")
    assert h.can_df(), "structured replies negotiated but SEND_DF not advertised"
    chunks = []
    h.pread_structured(2 * MiB, 0, lambda buf, off, status, err: chunks.append((off, len(buf), status)) or 0,
                       nbd.CMD_FLAG_DF)
    assert chunks == [(0, 2 * MiB, nbd.READ_DATA)]


def test_simple_replies_without_structured(server):
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.add_meta_context("base:allocation")
    h.connect_uri(server.uri_for("disk"))
    assert not h.get_structured_replies_negotiated()
    assert not h.can_meta_context("base:allocation")  # contexts need structured replies
    assert h.pread(4, 0) == b"\xab" * 4
    assert h.pread(4, 64 * KiB) == bytes(4)
    h.set_strict_mode(0)
    expect_error(errno.EINVAL, h.pread, 8, DISK_SIZE - 4)  # simple error reply
    assert h.pread(4, 1 * MiB) == b"\xcd" * 4
    h.shutdown()


def test_two_meta_contexts_at_once(connect):
    h = connect("mem", contexts=("base:allocation", "qemu:allocation-depth"))
    assert h.can_meta_context("base:allocation") and h.can_meta_context("qemu:allocation-depth")
    h.pwrite(b"\x01" * (64 * KiB), 7 * MiB)  # 6M..8M is untouched by earlier tests
    seen = {}

    def cb(metacontext, off, entries, err):
        seen[metacontext] = list(entries)
        return 0

    h.block_status(192 * KiB, 7 * MiB - 64 * KiB, cb)
    assert set(seen) == {"base:allocation", "qemu:allocation-depth"}
    assert seen["base:allocation"] == [64 * KiB, HOLE_ZERO, 64 * KiB, 0, 64 * KiB, HOLE_ZERO]
    assert seen["qemu:allocation-depth"] == [64 * KiB, 0, 64 * KiB, 1, 64 * KiB, 0]


def test_max_size_requests(connect):
    h = connect("mem")
    mx = h.get_block_size(nbd.SIZE_MAXIMUM)
    n = min(mx, 8 * MiB)
    data = bytes([7]) * n
    h.pwrite(data, 0)
    assert h.pread(n, 0) == data
    h.zero(8 * MiB, 0)  # WRITE_ZEROES is not limited by the payload maximum
    assert h.pread(n, 0) == bytes(n)
