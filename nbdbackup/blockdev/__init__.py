"""Block devices: the interface (`base`), implementations and filters.

`open_spec` turns a user-facing SPEC string into a device; it is the one place
the CLI and the control socket parse SPECs:

- ``memory:SIZE`` -- a sparse RAM disk (`memory.MemoryDev`), SIZE like 1G, 64M;
- ``nbd://...``, ``nbd+unix://...`` -- a remote NBD export (`nbd.NBDDev`);
- anything else -- a path to a raw image file or block device (`file.FileDev`).
"""

from __future__ import annotations

import re

from ..errors import ConfigError
from .base import BlockDev, BlockSize, Capabilities, Extent, FilterDev

__all__ = ["BlockDev", "BlockSize", "Capabilities", "Extent", "FilterDev", "open_spec", "parse_size"]

_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str) -> int:
    """Parse '1G', '64M', '4096', '1GiB', '10k' (binary units) into bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtpeKMGTPE]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ConfigError(f"bad size {text!r}: expected a number with an optional K/M/G/T suffix")
    return int(m.group(1)) * _SUFFIX[m.group(2).lower()]


def is_nbd_uri(spec: str) -> bool:
    return spec.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://", "nbd+vsock://"))


async def open_spec(spec: str, *, read_only: bool = False, create_size: int | None = None,
                    replay: bool = False) -> BlockDev:
    """Open SPEC as a block device, raising `ConfigError` with a clear message.

    An NBD URI reconnects when its connection is lost; ``replay`` (exports served
    to clients) keeps the writes a reconnection must write again (`blockdev.nbd`)."""
    if spec.startswith("memory:"):
        from .memory import MemoryDev

        size = parse_size(spec[len("memory:"):])
        return MemoryDev(size, read_only=read_only)
    if is_nbd_uri(spec):
        from .nbd import RECONNECT_DELAY, NBDDev

        return await NBDDev.open(spec, read_only=read_only, reconnect_delay=RECONNECT_DELAY, replay=replay)
    from .file import FileDev

    try:
        return FileDev(spec, read_only=read_only, create_size=create_size)
    except FileNotFoundError:
        raise ConfigError(f"{spec}: no such file (give a raw image path, a block device, memory:SIZE or an NBD URI)") from None
    except IsADirectoryError:
        raise ConfigError(f"{spec}: is a directory") from None
    except PermissionError as e:
        raise ConfigError(f"{spec}: permission denied ({e.strerror})") from None
    except OSError as e:
        raise ConfigError(f"{spec}: {e.strerror or e}") from None
