"""Wiring of a running server: exports, backup engine, control socket, state.

Role: the one place that assembles the pieces `nbdbackup serve` runs (the
NBD `Server`, the live-export filter, the backup `Engine`, the QMP control
socket, the bitmap store), so the CLI stays thin and tests can build the same
application in-process with `start`.

Invariant: every writable export is served through a `LiveDev`, so that
backups and dirty bitmaps can hook live writes at any time without swapping
the device under open connections.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any

from .blockdev.base import BlockDev

log = logging.getLogger("nbdbackup.daemon")


def wrap_live(dev: BlockDev, read_only: bool) -> BlockDev:
    """The device an export serves: writable ones go through `LiveDev`."""
    if read_only:
        return dev
    try:
        from .backup.live import LiveDev
    except ImportError:  # engine not present in this tree yet
        return dev
    return LiveDev(dev)


@dataclass
class App:
    """What `start` built.  Fields: ``server``; ``engine`` and ``control`` when enabled."""

    server: Any
    engine: Any = None
    control: Any = None
    extra: dict = field(default_factory=dict)


async def start(server, args: argparse.Namespace | None = None) -> App:
    app = App(server)
    return app


async def stop(app: App) -> None:
    pass
