"""Helpers shared by the nbdkit Python plugins in this directory (not a plugin itself).

Imported by a plugin after it puts this directory on ``sys.path``; runs in
nbdkit's embedded Python, so stdlib and the ``nbdkit`` module only.
"""

from __future__ import annotations

import errno
import os

import nbdkit


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
