"""`nbdbackup serve` against QEMU's tools: qemu-img, qemu-io, qemu-nbd --list.

Each test compares what QEMU sees through our export with what QEMU itself
produces on a local file given the same commands: byte identity is checked
with ``qemu-img compare`` (exit 0 = identical, 1 = different) and cmp.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

import peers

pytestmark = pytest.mark.interop

KiB, MiB = 1024, 1024 * 1024
SIZE = 4 * MiB
#: data at 0-64k and 1M-1.5M, one explicitly written zero block, and the last 4k.
WRITES = [(0xAB, 0, 64 * KiB), (0xCD, 1 * MiB, 512 * KiB), (0x00, 3 * MiB, 4 * KiB),
          (0xEF, SIZE - 4 * KiB, 4 * KiB)]


def run(*argv: str, ok=(0,), timeout: float = 60) -> subprocess.CompletedProcess:
    peers.require(argv[0])
    r = subprocess.run(list(argv), capture_output=True, text=True, errors="replace", timeout=timeout)
    assert r.returncode in ok, f"{' '.join(argv)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def image(short_tmp, make_image):
    return make_image(short_tmp / "disk.img", SIZE, WRITES)


def test_qemu_img_info(image, serve):
    with serve(f"disk={image}", "mem=memory:8M") as srv:
        info = json.loads(run("qemu-img", "info", "--output=json", srv.uri_for("disk")).stdout)
        assert info["virtual-size"] == SIZE
        assert info["format"] == "raw"
        info = json.loads(run("qemu-img", "info", "--output=json", srv.uri_for("mem")).stdout)
        assert info["virtual-size"] == 8 * MiB


def test_qemu_img_convert_and_compare(image, short_tmp, serve):
    out = short_tmp / "out.img"
    with serve(f"disk={image}") as srv:
        uri = srv.uri_for("disk")
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(image))
        # The comparison can fail: change one byte of a copy and expect "differ".
        other = short_tmp / "other.img"
        shutil.copyfile(image, other)
        with open(other, "r+b") as f:
            f.seek(2 * MiB + 7)
            f.write(b"\x01")
        r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(other), ok=(1,))
        assert "differ" in r.stdout.lower() or "mismatch" in r.stdout.lower(), r.stdout
    assert out.read_bytes() == image.read_bytes()


#: qemu-io commands applied both through the export and to a local file.
QEMU_IO_COMMANDS = [
    "write -P 0x11 0 128k",
    "write -f -P 0x22 64k 64k",          # FUA
    "write -P 0x33 1M 1M",
    "discard 1M 256k",
    "write -z 1M 256k",                  # discard's content is undefined: pin it
    "write -z 2M 64k",                   # write zeroes, no unmap
    "write -z -u 2112k 128k",            # write zeroes, may unmap
    "write -z -f 2304k 4k",              # write zeroes + FUA
    "write -P 0x44 3000 17",             # unaligned small writes
    "write -P 0x55 65535 2",
    "write -P 0x66 4194303 1",           # the very last byte
    "write -P 0x77 1000000 70000",       # unaligned, crosses 64k boundaries
    "flush",
]

#: Reads that must show the expected patterns after QEMU_IO_COMMANDS (checked
#: on the local file first, so the expectations themselves are verified).
QEMU_IO_READS = [
    "read -P 0x11 0 3000",
    "read -P 0x44 3000 17",
    "read -P 0x11 3017 62518",
    "read -P 0x55 65535 2",
    "read -P 0x22 65537 65535",
    "read -P 0x77 1000000 70000",
    "read -P 0 1070000 240720",
    "read -P 0x33 1310720 786432",
    "read -P 0 2097152 266240",
    "read -P 0xef 4190208 4095",
    "read -P 0x66 4194303 1",
]


def test_qemu_io_writes_then_compare(short_tmp, make_image, qemu_io, serve):
    served = make_image(short_tmp / "served.img", SIZE, WRITES)
    expected = make_image(short_tmp / "expected.img", SIZE, WRITES)
    qemu_io(expected, *QEMU_IO_COMMANDS)
    qemu_io(expected, *QEMU_IO_READS)
    with serve(f"disk={served}") as srv:
        uri = srv.uri_for("disk")
        qemu_io(uri, *QEMU_IO_COMMANDS)
        qemu_io(uri, *QEMU_IO_READS)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(expected))
    # After a clean shutdown the backing file holds the same bytes.
    assert srv.returncode == 0, srv.log()
    assert served.read_bytes() == expected.read_bytes()


def test_qemu_io_memory_export(serve, qemu_io):
    with serve("mem=memory:1M") as srv:
        uri = srv.uri_for("mem")
        qemu_io(uri, "write -P 0x5a 4096 8192", "write -f -P 0x5b 100 3", "write -z 6000 10")
        qemu_io(uri, "read -P 0 0 100", "read -P 0x5b 100 3", "read -P 0 103 3993",
                "read -P 0x5a 4096 1904", "read -P 0 6000 10", "read -P 0x5a 6010 6278",
                "read -P 0 12288 1036288")


def test_qemu_io_read_only_export_refuses_writes(image, serve):
    with serve(f"ro=ro:{image}") as srv:
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", srv.uri_for("ro")],
                           capture_output=True, text=True, errors="replace", timeout=60)
        out = r.stdout + r.stderr
        # qemu opens a read-only NBD export read-only, or the write fails with EPERM.
        assert r.returncode != 0 or "read-only" in out.lower() or "permission" in out.lower() \
            or "not permitted" in out.lower(), out
        assert "wrote" not in out, out
    assert image.read_bytes()[:4] == b"\xab" * 4


def test_qemu_nbd_list(image, serve):
    with serve(f"disk={image}", "mem=memory:8M", f"ro=ro:{image}") as srv:
        r = run("qemu-nbd", "--list", "-k", srv.socket)
        out = r.stdout
        assert "exports available: 3" in out, out
        for name in ("disk", "mem", "ro"):
            assert f"export: '{name}'" in out, out
        assert f"size:  {SIZE}" in out, out
        assert f"size:  {8 * MiB}" in out, out
