"""Helpers shared by the nbdkit Python plugins in this directory (not a plugin itself).

Imported by a plugin after it puts this directory on ``sys.path``; runs in
nbdkit's embedded Python.  `use_checkout` makes this checkout's ``nbdbackup``
package (and its ``.venv``, for blake3) importable there, so plugins call the
project's code instead of copying it.
"""

from __future__ import annotations

import errno
import glob
import os
import sys

import nbdkit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_checkout(extra: str | None = None) -> None:
    """Append ``extra``, this checkout and its ``.venv`` site-packages to ``sys.path``."""
    venvs = glob.glob(os.path.join(REPO, ".venv", "lib", "python3*", "site-packages"))
    for p in ([extra] if extra else []) + [REPO] + venvs:
        if p and p not in sys.path:
            sys.path.append(p)


def seek_extents(fd: int, size: int, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    """nbdkit ``extents`` of a file from SEEK_DATA/SEEK_HOLE: ``(offset, length, type)``
    for ``[offset, min(offset + count, size))``; holes are HOLE|ZERO."""
    end = min(offset + count, size)
    out = []
    pos = offset
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            data = size  # no data after pos
        if data > pos:
            n = min(data, end) - pos
            out.append((pos, n, nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO))
        else:
            n = min(os.lseek(fd, pos, os.SEEK_HOLE), end) - pos
            out.append((pos, n, 0))
        pos += n
        if flags & nbdkit.FLAG_REQ_ONE:
            break
    return out
