"""Shared test helpers and fixtures for every test directory.

Role: make test images with known content (through qemu-img / qemu-io, so the
expected content never depends on our own code) and hash files.

Fixtures:
- ``short_tmp``: a fresh directory directly under /tmp (Unix socket paths
  must stay < 108 bytes; pytest's tmp_path is too deep).  Removed afterwards.
- ``make_image``: the `make_image` function below.
- ``blake3_file``: the `blake3_file` function below.
- ``qemu_io``: `qemutools.qemu_io` (interop tests may import `qemutools` directly).

The plain functions are importable too (``import conftest`` is not reliable
with several conftest.py files, so tests use the fixtures).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable

import pytest
from qemutools import qemu_io, tool

#: (pattern byte, offset, length) -- one ``qemu-io write -P`` command.
Write = tuple[int, int, int]


_tool = tool


def make_image(path: str | os.PathLike, size: int, writes: Iterable[Write] = (),
               fmt: str = "raw") -> Path:
    """Create a sparse image of ``size`` bytes and write patterns into it.

    ``writes`` are ``(pattern, offset, length)``; pattern 0 writes real zero
    bytes (allocated data, not a hole).
    """
    path = Path(path)
    subprocess.run([_tool("qemu-img"), "create", "-q", "-f", fmt, os.fspath(path), str(size)],
                   check=True, timeout=60)
    cmds = [f"write -P {pat:#x} {off} {length}" for pat, off, length in writes]
    if cmds:
        qemu_io(path, *cmds, fmt=fmt)
    return path


def blake3_file(path: str | os.PathLike, chunk: int = 4 << 20) -> str:
    """Hex blake3 digest of a file's bytes."""
    import blake3

    h = blake3.blake3()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@pytest.fixture
def short_tmp() -> Iterable[Path]:
    d = tempfile.mkdtemp(prefix="nbdt-", dir="/tmp")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def clusters_of_64k(monkeypatch):
    """For tests whose expectations count 64 KiB clusters (the default cluster
    size before session 14): backup jobs started without a cluster-size get
    64 KiB, also in servers the test starts (they inherit the environment).
    Use it file-wide: ``pytestmark = pytest.mark.usefixtures("clusters_of_64k")``.
    The 4 KiB default itself: test_backup_engine.py, test_backup_granule.py,
    test_backup_concurrency_server.py."""
    monkeypatch.setenv("NBDBACKUP_DEFAULT_CLUSTER", str(64 * 1024))


@pytest.fixture(name="make_image", scope="session")
def make_image_fixture():
    return make_image


@pytest.fixture(name="blake3_file", scope="session")
def blake3_file_fixture():
    return blake3_file


@pytest.fixture(name="qemu_io", scope="session")
def qemu_io_fixture():
    return qemu_io
