"""qemu-io for tests, in one place (importable from every test directory).

Role: the tests' expectations about disk content come from QEMU's tools, never
from our own code.  qemu-io exits 0 even when a command fails or a ``-P``
pattern does not match, so its output is checked as well: any "error",
"fail" or "mismatch" fails the test, with qemu-io's output.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def tool(name: str) -> str:
    """Path of a QEMU tool, or fail the test with the install hint."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run scripts/setup (apt-get install qemu-utils)", pytrace=False)
    return path


def qemu_io(target: str | os.PathLike, *commands: str, fmt: str = "raw", read_only: bool = False,
            timeout: float = 120) -> str:
    """Run ``qemu-io -f FMT [-r] -c CMD... TARGET`` (an image path or NBD URI); return its output."""
    argv = [tool("qemu-io"), "-f", fmt] + (["-r"] if read_only else [])
    for c in commands:
        argv += ["-c", c]
    argv.append(os.fspath(target))
    r = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout)
    out = r.stdout + r.stderr
    low = out.lower()
    if r.returncode != 0 or "error" in low or "fail" in low or "mismatch" in low:
        pytest.fail(f"qemu-io {' '.join(commands)} on {target} failed:\n{out}", pytrace=False)
    return out
