"""Interop: backup -> pull -> restore through ``plugins/restore.py`` run by real nbdkit.

- A disk with data and holes is pulled (``nbdbackup pull`` + manifest), the
  backup is served by nbdkit with the restore plugin, and ``qemu-img
  convert`` from it yields a disk ``qemu-img compare`` finds identical; the
  export is read-only and maps the backup's holes.
- One flipped byte in the backup: reads touching that chunk fail with EIO
  (our client, qemu-img convert fails), reads of every other chunk still
  succeed, and the plugin says which chunk; with ``verify=off`` the damaged
  byte is served (so the check is what stopped it).
- A manifest of another size, or a damaged manifest, stops nbdkit at start
  with the reason.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import peers
from nbdbackup.nbd.client import connect

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = str(ROOT / "plugins" / "restore.py")
M = 1 << 20


@pytest.fixture
def backup(short_tmp, make_image):
    """(original disk, pulled backup image, its manifest)."""
    disk = make_image(short_tmp / "disk.raw", 32 * M, [(0x21, 0, 5 * M), (0x43, 9 * M, 2 * M), (0x00, 20 * M, M)])
    img, man = short_tmp / "backup.raw", short_tmp / "backup.json"
    with peers.nbdkit("file", str(disk)) as src:
        r = subprocess.run([sys.executable, "-m", "nbdbackup.cli", "pull", src.uri, str(img), "--manifest", str(man)],
                           cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=60)
        assert r.returncode == 0, r.stderr
    return disk, img, man


def restore_server(img: Path, man: Path, *extra: str):
    return peers.nbdkit("python", PLUGIN, f"image={img}", f"manifest={man}", *extra)


def test_restore_roundtrip(backup, short_tmp):
    disk, img, man = backup
    with restore_server(img, man) as p:
        info = subprocess.run(["nbdinfo", "--json", p.uri], capture_output=True, text=True, errors="replace", check=True).stdout
        exp = json.loads(info)["exports"][0]
        assert exp["is_read_only"] is True and exp["export-size"] == 32 * M
        holes = [e for e in json.loads(subprocess.run(["nbdinfo", "--map", "--json", p.uri], capture_output=True,
                                                        text=True, errors="replace", check=True).stdout) if e["type"] == 3]
        assert any(e["offset"] <= 12 * M and e["offset"] + e["length"] >= 19 * M for e in holes), holes
        out = short_tmp / "restored.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", p.uri, str(out)], check=True, timeout=60)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(disk), str(out)], check=True)


def test_damaged_chunk_fails_with_eio_and_only_that_chunk(backup, short_tmp):
    _, img, man = backup
    with open(img, "r+b") as f:  # chunk 2 (8..12 MiB): inside the 0x43 data
        f.seek(9 * M + 77)
        f.write(b"\x99")
    with restore_server(img, man) as p:
        async def main():
            async with await connect(p.uri) as c:
                with pytest.raises(OSError) as ei:
                    await c.pread(4096, 10 * M)
                assert ei.value.errno == errno.EIO
                with pytest.raises(OSError):  # a read that only starts in the chunk
                    await c.pread(2 * M, 7 * M)
                assert await c.pread(4096, 4 * M) == b"\x21" * 4096
                assert await c.pread(4096, 12 * M) == bytes(4096)  # next chunk: fine
        asyncio.run(asyncio.wait_for(main(), 30))
        r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", p.uri, str(short_tmp / "x.raw")],
                           capture_output=True, text=True, errors="replace", timeout=60)
        assert r.returncode != 0 and "Input/output error" in r.stderr
        assert f"chunk 2 ({8 * M}, {4 * M}) does not match the manifest" in p.log()
    with restore_server(img, man, "verify=off") as p:
        async def unverified():
            async with await connect(p.uri) as c:
                return bytes(await c.pread(1, 9 * M + 77))
        assert asyncio.run(asyncio.wait_for(unverified(), 30)) == b"\x99"


def test_bad_manifest_stops_nbdkit(backup, short_tmp):
    _, img, man = backup
    doc = json.loads(man.read_text())
    bad = short_tmp / "bad.json"
    doc["root"] = "00" * 32
    bad.write_text(json.dumps(doc))
    other = short_tmp / "small.raw"
    other.write_bytes(bytes(M))
    for image, manifest, reason in ((img, bad, "root digest does not match"), (other, man, "the manifest describes")):
        r = subprocess.run([peers.require("nbdkit"), "-U", str(short_tmp / "s.sock"), "python", PLUGIN,
                            f"image={image}", f"manifest={manifest}", "--run", "true"],
                           capture_output=True, text=True, errors="replace", timeout=30)
        assert r.returncode != 0 and reason in r.stderr, r.stderr
    assert os.path.exists(img)
