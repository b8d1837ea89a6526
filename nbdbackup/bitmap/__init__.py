"""Dirty bitmaps: dirty tracking that outlives jobs, with a crash-safe on-disk format.

Modules:
- `core`: `Bitmap`, a flat bit array with a summary level (copy state and
  dirty tracking both build on it);
- `dirty`: `DirtyBitmap` (byte-range view, successor protocol, bitmap modes)
  and `BitmapRegistry` (the bitmaps of one export);
- `store`: `BitmapStore`, persistent bitmaps in memory-mapped files that stay
  complete after ``kill -9`` (the argument is in its docstring);
- `hook`: `DirtyHook` (marks before every live write, syncs before every
  FLUSH/FUA acknowledgement) and `BitmapLiveDev` (a live export's device with
  its bitmaps' ``qemu:dirty-bitmap:NAME`` contexts);
- `manager`: `BitmapManager`, the bitmaps of a running server (per-export
  registries, QMP commands, ``transaction``).
"""

from .core import Bitmap
from .dirty import BitmapError, BitmapRegistry, DirtyBitmap

__all__ = ["Bitmap", "BitmapError", "BitmapRegistry", "DirtyBitmap"]
