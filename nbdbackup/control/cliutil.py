"""Shared plumbing for the CLI commands that talk to the control socket.

Role: keeps ``nbdbackup.commands.{backup,job,bitmap,export}`` thin: the
``--control``/``--json`` options, one-shot command calls, output formatting.

Invariants:
- The control address comes from ``--control`` or else ``$NBDBACKUP_CONTROL``;
  neither is a `ConfigError` (exit 1, one line, no traceback).  It is a Unix
  socket path or ``qmps://HOST:PORT`` (remote control, `control.remote`: TLS
  with the client certificate of ``--control-tls-creds`` or else
  ``$NBDBACKUP_CONTROL_TLS_CREDS``).
- Connection failures become `ConfigError` naming the socket and the likely
  fix; a refused command is a `CommandError` (its ``desc`` is printed).
- ``--json`` output is exactly one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from typing import Any, Awaitable, Callable

from ..blockdev import parse_size
from ..errors import ConfigError, ConnectionClosed, RemoteProtocolError
from .client import ControlClient

ENV_CONTROL = "NBDBACKUP_CONTROL"
ENV_CONTROL_TLS_CREDS = "NBDBACKUP_CONTROL_TLS_CREDS"


def add_control_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", metavar="PATH|qmps://HOST:PORT", default=None,
                   help=f"control socket of 'nbdbackup serve', or its --control-listen address "
                        f"(default: ${ENV_CONTROL})")
    p.add_argument("--control-tls-creds", metavar="DIR", default=None,
                   help="for qmps://: ca-cert.pem, client-cert.pem, client-key.pem "
                        f"(default: ${ENV_CONTROL_TLS_CREDS})")
    p.add_argument("--json", action="store_true", help="print the raw JSON result (for scripts)")


def size_arg(text: str) -> int:
    """argparse ``type=`` for sizes: 4096, 64K, 1M, 1G (binary units)."""
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def uint_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def control_path(args: argparse.Namespace) -> str:
    path = args.control or os.environ.get(ENV_CONTROL)
    if not path:
        raise ConfigError(f"no control socket: give --control PATH or set {ENV_CONTROL}")
    return path


def control_tls_creds(args: argparse.Namespace) -> str | None:
    return getattr(args, "control_tls_creds", None) or os.environ.get(ENV_CONTROL_TLS_CREDS) or None


async def connect(path: str, tls_creds: str | None = None) -> ControlClient:
    """A connected client for the address PATH (socket path or ``qmps://``)."""
    if "://" in path:
        from .remote import client_for  # (TLS contexts, authz: not imported for a local socket's run)

        client = client_for(path, tls_creds)
    else:  # a Unix socket path (what remote.parse_address returns as is): ~2 ms of imports less
        client = ControlClient(path, timeout=10.0)
    try:
        await client.connect()
    except ssl.SSLCertVerificationError as e:
        raise ConfigError(f"control {path}: the server's certificate is not trusted: "
                          f"{e.verify_message or e}") from None
    except ssl.SSLError as e:
        raise ConfigError(f"control {path}: TLS failed (does the server accept this client certificate?): "
                          f"{e.reason or e}") from None
    except FileNotFoundError:
        raise ConfigError(f"control socket {path}: no such file (is 'nbdbackup serve --control {path}' running?)") from None
    except ConnectionRefusedError:
        hint = "is the server running?" if "://" in path else "stale socket? is the server running?"
        raise ConfigError(f"control socket {path}: connection refused ({hint})") from None
    except PermissionError:
        raise ConfigError(f"control socket {path}: permission denied") from None
    except TimeoutError:
        raise ConfigError(f"control socket {path}: timed out waiting for the server") from None
    except (ConnectionClosed, RemoteProtocolError) as e:
        raise ConfigError(str(e)) from None
    except OSError as e:
        raise ConfigError(f"control socket {path}: {e.strerror or e}") from None
    return client


def run(args: argparse.Namespace, body: Callable[[ControlClient], Awaitable[Any]]) -> Any:
    """Connect to the control socket, run ``await body(client)``, disconnect."""
    path = control_path(args)
    creds = control_tls_creds(args)

    async def main() -> Any:
        client = await connect(path, creds)
        try:
            return await body(client)
        except ConnectionClosed as e:
            raise ConfigError(f"control socket {path}: {e}") from None
        finally:
            await client.close()

    return asyncio.run(main())


def call(args: argparse.Namespace, name: str, arguments: dict | None = None) -> Any:
    """Run one control command and return its result."""
    return run(args, lambda c: c.execute(name, arguments))


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def fmt_size(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, 3 significant digits)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """Print ROWS as aligned columns; ``columns`` = [(key, heading)]; missing keys print '-'."""
    cells = [[h for _, h in columns]]
    for row in rows:
        cells.append([_cell(row.get(k)) for k, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def list_command(args: argparse.Namespace, name: str, to_row: Callable[[dict], dict],
                 columns: list[tuple[str, str]]) -> int:
    """Run query ``name``; print its list as JSON (``--json``) or as a table of ``to_row`` rows."""
    items = call(args, name)
    if args.json:
        print_json(items)
    else:
        print_table([to_row(x) for x in items], columns)
    return 0


def done(args: argparse.Namespace, result: Any, message: str) -> int:
    """Report a successful action: the JSON result with --json, else MESSAGE."""
    if args.json:
        print_json(result if result is not None else {})
    else:
        print(message)
    return 0


__all__ = [
    "ENV_CONTROL", "ENV_CONTROL_TLS_CREDS", "add_control_arguments", "control_tls_creds", "size_arg", "uint_arg",
    "control_path", "connect", "run", "call", "print_json", "fmt_size", "print_table", "done",
]
