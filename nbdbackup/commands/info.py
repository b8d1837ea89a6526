"""``nbdbackup info``: describe an NBD export (like ``nbdinfo``).

Role: a thin CLI over `nbd.client`: size, transmission flags by name, block
sizes, meta contexts; ``--map [CONTEXT]`` prints the extents of a context
(``offset length flags description`` per line, the shape of
``nbdinfo --map``); ``--list`` lists the server's exports; ``--json`` prints
one JSON document instead of text.  Connection and protocol failures become
one clear `ConfigError` line (exit 1), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from ..blockdev.base import ALLOCATION_DEPTH, BASE_ALLOCATION, DIRTY_BITMAP_PREFIX
from ..errors import ConfigError, NBDBackupError, OptionError
from ..nbd import client as nbdclient
from ..nbd.client_protocol import ExportInfo
from ..nbd.wire import TransmissionFlag

#: Extents are fetched in pieces this large so output streams on huge disks.
MAP_STEP = 1 << 30


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe an NBD export (size, flags, block sizes, meta contexts, extents)")
    p.add_argument("uri", metavar="URI",
                   help="nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH; "
                        "nbds:// and nbds+unix:// for TLS (?tls-certificates=DIR)")
    p.add_argument("--map", nargs="?", const=BASE_ALLOCATION, metavar="CONTEXT",
                   help="print the extents of CONTEXT (default base:allocation)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--list", action="store_true", help="list the server's exports")
    p.set_defaults(func=run)


def flag_names(flags: int) -> list[str]:
    return [f.name for f in TransmissionFlag if f.name and flags & f]


def describe(context: str, flags: int) -> str:
    """Human text for an extent's flags in ``context``."""
    if context == BASE_ALLOCATION:
        return {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}.get(flags, f"unknown({flags})")
    if context == ALLOCATION_DEPTH:
        return "unallocated" if flags == 0 else "local" if flags == 1 else f"backing depth {flags}"
    if context.startswith(DIRTY_BITMAP_PREFIX):
        return "dirty" if flags & 1 else "clean"
    return ""


def _export_dict(e: ExportInfo, contexts: list[str] | None = None) -> dict[str, Any]:
    bs = e.block_sizes
    d: dict[str, Any] = {
        "export": e.name,
        "description": e.description,
        "size": e.size,
        "flags": flag_names(e.flags or 0),
        "block_size": {"minimum": bs.minimum, "preferred": bs.preferred, "maximum": bs.maximum,
                       "advertised": bs.advertised},
    }
    if contexts is not None:
        d["meta_contexts"] = contexts
    return d


def _print_export(d: dict[str, Any], out=sys.stdout) -> None:
    print(f"export: {d['export']!r}", file=out)
    if d["description"]:
        print(f"  description: {d['description']}", file=out)
    print(f"  size: {d['size']}", file=out)
    print(f"  flags: {' '.join(d['flags'])}", file=out)
    bs = d["block_size"]
    note = "" if bs["advertised"] else " (not advertised; defaults)"
    print(f"  block sizes: minimum {bs['minimum']}, preferred {bs['preferred']}, maximum {bs['maximum']}{note}",
          file=out)
    if "meta_contexts" in d:
        print(f"  meta contexts: {' '.join(d['meta_contexts']) or '(none)'}", file=out)


async def _info(args: argparse.Namespace) -> int:
    if args.list:
        exports = await nbdclient.list_exports(args.uri)
        ds = [_export_dict(e) for e in exports]
        if args.json:
            json.dump({"exports": ds}, sys.stdout, indent=2)
            print()
        else:
            for d in ds:
                _print_export(d)
        return 0
    # One connection only: qemu-nbd without --persistent serves just one.
    wanted = (args.map,) if args.map else ()
    c = await nbdclient.connect(args.uri, meta_contexts=wanted, list_meta_contexts_first=())
    try:
        d = _export_dict(c.export, c.listed_meta_contexts)
        d["structured_replies"] = c.structured
        if args.map and args.map not in c.meta_contexts:
            raise ConfigError(f"{args.uri}: the server does not offer meta context {args.map!r}")
        if not args.map:
            if args.json:
                json.dump(d, sys.stdout, indent=2)
                print()
            else:
                _print_export(d)
            return 0
        extents = []
        for pos in range(0, c.size, MAP_STEP):
            n = min(MAP_STEP, c.size - pos)
            for e in await c.block_status(pos, n, args.map):
                if extents and extents[-1][2] == e.flags and extents[-1][0] + extents[-1][1] == e.offset:
                    extents[-1][1] += e.length
                    continue
                if extents and not args.json:
                    o, ln, f = extents.pop()
                    print(f"{o:>14} {ln:>14} {f:>4}  {describe(args.map, f)}")
                extents.append([e.offset, e.length, e.flags])
        if args.json:
            d["map"] = {"context": args.map,
                        "extents": [{"offset": o, "length": ln, "flags": f, "description": describe(args.map, f)}
                                    for o, ln, f in extents]}
            json.dump(d, sys.stdout, indent=2)
            print()
        else:
            for o, ln, f in extents:
                print(f"{o:>14} {ln:>14} {f:>4}  {describe(args.map, f)}")
        return 0
    finally:
        await c.disconnect()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_info(args))
    except OptionError as e:
        raise ConfigError(f"{args.uri}: server refused: {e.message or e}") from e
    except ConfigError:
        raise
    except NBDBackupError as e:
        raise ConfigError(f"{args.uri}: {e}") from e
    except (OSError, TimeoutError) as e:
        raise ConfigError(f"{args.uri}: {e.strerror or e}" if isinstance(e, OSError) else f"{args.uri}: {e}") from e
