"""``nbdbackup bitmap add|remove|clear|enable|disable|merge|list``: dirty bitmaps of an export.

Maps onto QMP ``block-dirty-bitmap-add/-remove/-clear/-enable/-disable/-merge``
and ``query-bitmaps`` (see `nbdbackup.control.schema`).  The export and bitmap
are positional: ``nbdbackup bitmap add EXPORT NAME [--granularity 64K]``,
``nbdbackup bitmap merge EXPORT TARGET SOURCE...``, ``nbdbackup bitmap list EXPORT``.
"""

from __future__ import annotations

import argparse

from ..control import cliutil


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bitmap", help="manage dirty bitmaps on a running server",
                       description="Manage the dirty bitmaps of an export of a running 'nbdbackup serve'.")
    bsub = p.add_subparsers(dest="bitmap_command", metavar="ACTION", required=True)

    a = bsub.add_parser("add", help="create a bitmap (block-dirty-bitmap-add)")
    _export_name(a)
    a.add_argument("--granularity", type=cliutil.size_arg, metavar="N", help="bytes per bit (64K)")
    a.add_argument("--persistent", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the bitmap across server restarts")
    a.add_argument("--disabled", action="store_true", default=None, help="create it not recording writes")
    cliutil.add_control_arguments(a)
    a.set_defaults(func=cmd_add)

    for action, text in (("remove", "delete a bitmap"), ("clear", "reset every bit of a bitmap"),
                         ("enable", "start recording writes"), ("disable", "stop recording writes")):
        s = bsub.add_parser(action, help=f"{text} (block-dirty-bitmap-{action})")
        _export_name(s)
        cliutil.add_control_arguments(s)
        s.set_defaults(func=cmd_simple, qmp=f"block-dirty-bitmap-{action}", verb=action)

    m = bsub.add_parser("merge", help="OR bitmaps into a target (block-dirty-bitmap-merge)")
    m.add_argument("export", metavar="EXPORT", help="export name")
    m.add_argument("target", metavar="TARGET", help="bitmap receiving the bits")
    m.add_argument("bitmaps", metavar="SOURCE", nargs="+", help="bitmaps to merge in")
    cliutil.add_control_arguments(m)
    m.set_defaults(func=cmd_merge)

    q = bsub.add_parser("list", help="list an export's bitmaps (query-bitmaps)")
    q.add_argument("export", metavar="EXPORT", help="export name")
    cliutil.add_control_arguments(q)
    q.set_defaults(func=cmd_list)


def _export_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("export", metavar="EXPORT", help="export name")
    p.add_argument("name", metavar="NAME", help="bitmap name")


def cmd_add(args: argparse.Namespace) -> int:
    arguments = {"export": args.export, "name": args.name}
    for dest, key in (("granularity", "granularity"), ("persistent", "persistent"), ("disabled", "disabled")):
        if getattr(args, dest) is not None:
            arguments[key] = getattr(args, dest)
    result = cliutil.call(args, "block-dirty-bitmap-add", arguments)
    return cliutil.done(args, result, f"bitmap {args.name} added to {args.export}")


def cmd_simple(args: argparse.Namespace) -> int:
    result = cliutil.call(args, args.qmp, {"export": args.export, "name": args.name})
    past = {"remove": "removed", "clear": "cleared", "enable": "enabled", "disable": "disabled"}[args.verb]
    return cliutil.done(args, result, f"bitmap {args.name} of {args.export}: {past}")


def cmd_merge(args: argparse.Namespace) -> int:
    result = cliutil.call(args, "block-dirty-bitmap-merge",
                          {"export": args.export, "target": args.target, "bitmaps": args.bitmaps})
    return cliutil.done(args, result, f"bitmap {args.target} of {args.export}: merged {', '.join(args.bitmaps)}")


def cmd_list(args: argparse.Namespace) -> int:
    bitmaps = cliutil.call(args, "query-bitmaps", {"export": args.export})
    if args.json:
        cliutil.print_json(bitmaps)
        return 0
    rows = []
    for b in bitmaps:
        row = dict(b)
        if isinstance(b.get("granularity"), int):
            row["granularity"] = cliutil.fmt_size(b["granularity"])
        if isinstance(b.get("count"), int):
            row["count"] = cliutil.fmt_size(b["count"])
        rows.append(row)
    cliutil.print_table(rows, [("name", "NAME"), ("granularity", "GRANULARITY"), ("count", "DIRTY"),
                               ("recording", "RECORDING"), ("persistent", "PERSISTENT"), ("busy", "BUSY")])
    return 0
