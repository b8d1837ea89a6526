"""CLI subcommands; each module exposes ``register(subparsers)`` (see `nbdbackup.cli`)."""

from __future__ import annotations

import asyncio
import os

from ..errors import ConnectionClosed, RemoteProtocolError

#: How an NBD peer or a target fails a command: an error reply, a timeout or any OSError,
#: a closed connection, a protocol violation (`failure_text` words each for one line).
PEER_ERRORS = (OSError, ConnectionClosed, RemoteProtocolError)


def failure_text(e: BaseException) -> str:
    """One of `PEER_ERRORS` as the reason in a one-line error (an OSError's strerror)."""
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


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


#: Default of ``--io-timeout`` (as ``agent backup``'s): a request to an NBD peer that
#: takes longer fails the command instead of waiting for ever on a server that stalls.
IO_TIMEOUT = 120.0


def add_io_timeout_option(p, what: str) -> None:
    """``--io-timeout SECONDS`` for a command that talks to an NBD server (0: no limit)."""
    p.add_argument("--io-timeout", type=float, default=IO_TIMEOUT, metavar="SECONDS",
                   help=f"an NBD request taking longer fails the {what} (default {IO_TIMEOUT:.0f}; 0: wait for ever)")


def io_timeout(args) -> float | None:
    """The request timeout ``--io-timeout`` asks for (None: none)."""
    return args.io_timeout if args.io_timeout and args.io_timeout > 0 else None


def add_limit_rate_option(p, what: str) -> None:
    """``--limit-rate RATE`` (bytes/s; K/M/G suffixes; 0: unlimited) for a command that moves data."""
    p.add_argument("--limit-rate", default="0", metavar="RATE",
                   help=f"at most RATE bytes per second {what} (suffixes K, M, G: 1024-based; "
                        "default 0: no limit)")


def limit_rate(args):
    """The `ratelimit.Bucket` ``--limit-rate`` asks for, or None (no limit)."""
    from ..blockdev import parse_size
    from ..errors import ConfigError
    from ..ratelimit import bucket

    try:
        return bucket(parse_size(args.limit_rate))
    except ConfigError:
        raise ConfigError(f"--limit-rate: expected bytes per second with an optional K/M/G suffix, "
                          f"got {args.limit_rate!r}") from None
