"""``nbdbackup restore REPO SNAPSHOT TARGET``: write a repository snapshot to a disk.

TARGET is a file (created if missing, extended to the snapshot's size if
shorter; a new file gets holes for zero chunks), a block device (zero chunks
zeroed with BLKZEROOUT, or skipped with ``--target-is-zero``) or an NBD URI
(``nbd://``, ``nbd+unix://``, ``nbds://``...: WRITE_ZEROES for zero chunks,
FLUSH at the end).  The work is `agent.restore.restore`: ``--workers``
chunks fetched at once on threads, every chunk checked against its id.

A missing or damaged chunk stops the restore with one line naming the
snapshot's byte range ``(offset, length)`` and exit 1 (the target is then
incomplete).  With ``--keep-going`` every other chunk is restored (and
flushed) and each damaged chunk's byte range is named, one line each (in
``--json``: ``"damaged"``), exit 1: the bytes the restore cannot vouch for.  ``--json`` prints the statistics; progress goes to stderr on a
terminal (`progress`).  The repository is opened through
`commands.repoargs.open_repo` only, and is not locked: a restore only reads
(a gc after ``delete`` of the snapshot being restored makes it fail loudly).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys

from ..agent.restore import DIR_WORKERS, S3_WORKERS
from ..errors import ConfigError
from ..progress import Progress, add_progress_option
from . import PEER_ERRORS, add_io_timeout_option, add_limit_rate_option, failure_text, io_timeout, limit_rate, run_async
from .repoargs import REPO_HELP, add_repo_options, open_repo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore", help="write a repository snapshot to a file, block device or NBD export",
                       description="Write snapshot SNAPSHOT of chunk repository REPO to TARGET, "
                                   "checking every chunk against its id.")
    p.add_argument("repo", metavar="REPO", help=REPO_HELP)
    p.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot's name ('nbdbackup repo list')")
    p.add_argument("target", metavar="TARGET",
                   help="a raw image file (created or extended), a block device, or an NBD URI")
    add_repo_options(p)
    p.add_argument("--workers", type=_positive, default=None, metavar="N",
                   help=f"chunks fetched at once (default {DIR_WORKERS} from a directory, {S3_WORKERS} from S3; "
                        "memory: N chunks)")
    p.add_argument("--buffered", action="store_true",
                   help="write a file or block device through the page cache (default: O_DIRECT where the "
                        "file system allows it)")
    p.add_argument("--connections", type=_positive, default=4, metavar="N",
                   help="NBD connections to an NBD target (if it allows multi-conn; default 4)")
    add_io_timeout_option(p, "restore (an NBD target)")
    p.add_argument("--target-is-zero", action="store_true",
                   help="the target already reads as zeroes: leave zero chunks alone")
    p.add_argument("--keep-going", action="store_true",
                   help="restore past missing or damaged chunks, then name each one's byte range and exit 1 "
                        "(default: stop at the first)")
    add_limit_rate_option(p, "restored (chunk data; zero chunks are free)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    add_progress_option(p)
    p.set_defaults(func=run_restore, quick_exit=True)


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number >= 1")
    return n


def run_restore(args: argparse.Namespace) -> int:
    from ..agent.repo import check_name

    check_name(args.snapshot)
    args.limit = limit_rate(args)  # checked before anything is opened
    _, repo = open_repo(args, args.repo)
    man = repo.load_snapshot(args.snapshot)
    return run_async(_restore(args, repo, man))


async def _open_target(args: argparse.Namespace, size: int):
    """(BlockDev, target_is_zero, kind) for TARGET."""
    from ..blockdev import is_nbd_uri
    from ..blockdev.file import FileDev
    from ..blockdev.nbd import NBDDev

    if is_nbd_uri(args.target):
        dev = await NBDDev.open(args.target, connections=args.connections, request_timeout=io_timeout(args))
        if dev.capabilities().read_only:
            await dev.close()
            raise ConfigError(f"{args.target}: the NBD export is read-only")
        return dev, args.target_is_zero, "nbd"
    path = args.target
    fresh = False
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        kind = "block"
    elif st is None or stat.S_ISREG(st.st_mode):
        kind = "file"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                cur = os.fstat(fd).st_size
                fresh = cur == 0
                if cur < size:
                    os.ftruncate(fd, size)  # new bytes read as zeroes (a hole)
            finally:
                os.close(fd)
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror or e}") from None
    else:
        raise ConfigError(f"{path}: not a regular file, block device or NBD URI")
    try:
        dev = FileDev(path)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    return dev, args.target_is_zero or fresh, kind


async def _restore(args: argparse.Namespace, repo, man) -> int:
    from ..agent.restore import restore

    dst, zero, kind = await _open_target(args, man.size)
    try:
        if dst.size < man.size:
            raise ConfigError(f"{args.target} is {dst.size} bytes, snapshot {args.snapshot!r} is {man.size}")
        with Progress.for_args(args, f"restore {args.snapshot}", man.size) as prog:
            try:
                stats = await restore(repo, man, dst, snapshot=args.snapshot, workers=args.workers,
                                      target_is_zero=zero, progress=prog.update, direct=not args.buffered,
                                      keep_going=args.keep_going, limit=args.limit)
            except PEER_ERRORS as e:
                # the target failed (ENOSPC, EIO, a timeout, the NBD server went away or broke the protocol)
                raise ConfigError(f"{args.target}: {failure_text(e)} (restore stopped: the target is incomplete)"
                                  ) from e
    finally:
        await dst.close()
    out = stats.to_json()
    out.update(snapshot=args.snapshot, target=args.target, target_kind=kind, target_was_zero=zero)
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        mbs = stats.size / stats.seconds / 1e6 if stats.seconds else 0.0
        print(f"restored snapshot {args.snapshot} ({stats.size} bytes) to {args.target}: "
              f"{stats.data_chunks} data chunk(s) written, {stats.zero_chunks} zero chunk(s) "
              f"{'left as holes' if zero else 'zeroed'}, {stats.seconds:.2f} s ({mbs:.0f} MB/s)")
    if stats.damaged:
        print(f"nbdbackup restore: {len(stats.damaged)} chunk(s) of snapshot {args.snapshot!r} could not be "
              f"restored; these byte ranges of {args.target} are NOT the snapshot's:", file=sys.stderr)
        for off, n, i, reason in stats.damaged:
            print(f"  ({off}, {n}) chunk {i}: {reason}", file=sys.stderr)
        return 1
    return 0
