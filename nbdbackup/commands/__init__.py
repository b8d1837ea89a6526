"""CLI subcommands; each module exposes ``register(subparsers)`` (see `nbdbackup.cli`)."""

from __future__ import annotations

import asyncio
import os


def run_async(coro):
    """Run ``coro`` to completion on uvloop when it is installed (set
    ``NBDBACKUP_NO_UVLOOP=1`` for asyncio's own loop); return its result."""
    kw = {}
    if not os.environ.get("NBDBACKUP_NO_UVLOOP"):
        try:
            import uvloop

            kw["loop_factory"] = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(**kw) as runner:
        return runner.run(coro)
