"""``nbdbackup repo init|list|verify|delete|gc``: a chunk repository on disk (`agent.repo`).

``pull --repo DIR --snapshot NAME`` fills it; ``plugins/restore.py
repo=DIR snapshot=NAME`` serves a snapshot back over NBD.  ``verify`` reads
every chunk the snapshots use and exits 1 naming the broken ones; ``delete``
forgets a snapshot; ``gc`` removes the chunks no snapshot uses any more.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..blockdev import parse_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repo", help="manage a chunk repository (deduplicated pulled backups)",
                       description="Manage a deduplicating blake3 chunk repository.")
    rsub = p.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    i = rsub.add_parser("init", help="create a repository")
    i.add_argument("dir", metavar="DIR")
    i.add_argument("--chunk-size", default="4M")
    i.set_defaults(func=cmd_init)
    for name, func, text in (("list", cmd_list, "list snapshots"), ("verify", cmd_verify, "check snapshots' chunks"),
                             ("delete", cmd_delete, "delete a snapshot"), ("gc", cmd_gc, "remove unused chunks")):
        a = rsub.add_parser(name, help=text)
        a.add_argument("dir", metavar="DIR")
        if name in ("verify", "delete"):
            a.add_argument("names", metavar="NAME", nargs="*" if name == "verify" else 1)
        a.add_argument("--json", action="store_true")
        a.set_defaults(func=func)


def _open(path: str):
    from ..agent.repo import DirStore, Repository

    store = DirStore(path)
    return store, Repository.open(store)


def _emit(args: argparse.Namespace, value, text: str) -> None:
    if getattr(args, "json", False):
        json.dump(value, sys.stdout, indent=2)
        print()
    else:
        print(text)


def cmd_init(args: argparse.Namespace) -> int:
    from ..agent.repo import DirStore, Repository

    repo = Repository.init(DirStore(args.dir), parse_size(args.chunk_size))
    print(f"repository {args.dir} created ({repo.chunk_size} byte chunks)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    _, repo = _open(args.dir)
    rows = []
    for name in repo.snapshots():
        info = repo.snapshot_info(name)
        rows.append({"name": name, "created": info.get("created"), "size": info["manifest"]["size"],
                     "parent": info.get("parent"), "root": info["manifest"]["root"]})
    _emit(args, rows, "\n".join(f"{r['name']}  {r['created']}  {r['size']} bytes  parent={r['parent'] or '-'}  "
                                f"root={r['root'][:16]}" for r in rows) or "(no snapshots)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store, repo = _open(args.dir)
    with store.lock(exclusive=False):
        names = args.names or repo.snapshots()
        problems = repo.verify(names)
    _emit(args, {"ok": not problems, "snapshots": names,
                 "problems": [{"snapshot": s, "chunk": i, "reason": r} for s, i, r in problems]},
          "\n".join([f"{s}: chunk {i}: {r}" for s, i, r in problems]
                    + [f"{'FAILED' if problems else 'OK'}: {len(names)} snapshot(s), {len(problems)} bad chunk(s)"]))
    return 1 if problems else 0


def cmd_delete(args: argparse.Namespace) -> int:
    store, repo = _open(args.dir)
    with store.lock(exclusive=True):
        repo.delete_snapshot(args.names[0])
    _emit(args, {}, f"snapshot {args.names[0]} deleted (run 'gc' to free its chunks)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    store, repo = _open(args.dir)
    with store.lock(exclusive=True):
        removed, kept = repo.gc()
    _emit(args, {"removed": removed, "kept": kept}, f"removed {removed} unused chunk(s), {kept} in use")
    return 0
