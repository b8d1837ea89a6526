"""``nbdbackup export list|stats|add|del``: the exports of a running server.

Maps onto QMP ``query-block-exports``, ``query-export-stats``,
``block-export-add`` and ``block-export-del`` (see `nbdbackup.control.schema`).
"""

from __future__ import annotations

import argparse

from ..control import cliutil


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="list, add and remove exports of a running server",
                       description="List, add and remove the NBD exports of a running 'nbdbackup serve'.")
    esub = p.add_subparsers(dest="export_command", metavar="ACTION", required=True)

    q = esub.add_parser("list", help="list exports (query-block-exports)")
    cliutil.add_control_arguments(q)
    q.set_defaults(func=cmd_list)

    st = esub.add_parser("stats", help="request statistics per export (query-export-stats)")
    cliutil.add_control_arguments(st)
    st.set_defaults(func=cmd_stats)

    a = esub.add_parser("add", help="export a disk (block-export-add)")
    a.add_argument("name", metavar="NAME", help="export name clients will ask for")
    a.add_argument("spec", metavar="SPEC", help="a raw file path, memory:SIZE or an NBD URI")
    a.add_argument("--read-only", "-r", action="store_true", default=None, help="refuse writes")
    a.add_argument("--description", "-D", metavar="TEXT",
                   help="description NBD clients see (default: none; the SPEC is never shown to them)")
    cliutil.add_control_arguments(a)
    a.set_defaults(func=cmd_add)

    d = esub.add_parser("del", help="remove an export (block-export-del)")
    d.add_argument("name", metavar="NAME", help="export name")
    d.add_argument("--hard", action="store_true",
                   help="disconnect its clients (default: refuse while any is connected, as QEMU's mode safe)")
    cliutil.add_control_arguments(d)
    d.set_defaults(func=cmd_del)


def cmd_list(args: argparse.Namespace) -> int:
    def row(e: dict) -> dict:
        return {**e, "size": cliutil.fmt_size(e["size"])} if isinstance(e.get("size"), int) else dict(e)

    return cliutil.list_command(args, "query-block-exports", row,
                                [("name", "NAME"), ("spec", "SPEC"), ("size", "SIZE"), ("read-only", "READ-ONLY"),
                                 ("snapshot", "SNAPSHOT")])


def cmd_stats(args: argparse.Namespace) -> int:
    def row(e: dict) -> dict:
        s = e["stats"]
        return {"export": e["export"], "conns": e["connections"],
                "reads": s["rd_operations"], "read": cliutil.fmt_size(s["rd_bytes"]),
                "writes": s["wr_operations"], "written": cliutil.fmt_size(s["wr_bytes"]),
                "flushes": s["flush_operations"],
                "failed": sum(v for k, v in s.items() if k.startswith("failed_")),
                "invalid": s["invalid_operations"]}

    return cliutil.list_command(args, "query-export-stats", row,
                                [("export", "EXPORT"), ("conns", "CONNS"), ("reads", "READS"), ("read", "READ"),
                                 ("writes", "WRITES"), ("written", "WRITTEN"), ("flushes", "FLUSHES"),
                                 ("failed", "FAILED"), ("invalid", "INVALID")])


def cmd_add(args: argparse.Namespace) -> int:
    arguments = {"name": args.name, "spec": args.spec}
    if args.read_only is not None:
        arguments["read-only"] = args.read_only
    if args.description is not None:
        arguments["description"] = args.description
    result = cliutil.call(args, "block-export-add", arguments)
    return cliutil.done(args, result, f"export {args.name} added")


def cmd_del(args: argparse.Namespace) -> int:
    arguments = {"name": args.name}
    if args.hard:
        arguments["mode"] = "hard"
    result = cliutil.call(args, "block-export-del", arguments)
    return cliutil.done(args, result, f"export {args.name} removed")
