"""``nbdbackup pull`` and ``nbdbackup verify``: the pull agent's command line.

``pull URI TARGET [--bitmap NAME] [--connections N] [--chunk-size SIZE]
[--manifest OUT] [--base-manifest IN] [--write-behind SIZE] [--buffered] [--json]`` copies an export (usually
a snapshot export, ``<export>@<job-id>``) into TARGET (a raw file, created
sparse, or a block device), reading only allocated data; with ``--bitmap``
only what ``qemu:dirty-bitmap:NAME`` marks dirty is read and patched into
TARGET, which holds the previous backup.  ``--manifest`` writes the blake3
chunk manifest of the result (see `agent.manifest`).

``verify SOURCE --manifest FILE`` recomputes the manifest of SOURCE (a file,
a block device or an NBD URI) and exits 1 naming the chunks that differ.

Failures (unreachable server, missing bitmap, wrong target size, bad
manifest) are one `ConfigError` line and exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import stat
import sys

from ..blockdev import parse_size
from ..errors import ConfigError
from . import (PEER_ERRORS, add_io_timeout_option, add_limit_rate_option, failure_text, io_timeout, limit_rate,
               run_async)
from ..progress import Progress, add_progress_option
from .repoargs import add_repo_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="copy an export (a snapshot) into a local image, full or incremental",
                       description="Copy an NBD export into a local raw image, reading only what matters.")
    p.add_argument("uri", metavar="URI", help="the export to copy (nbd://, nbd+unix://, nbds://, nbds+unix://)")
    p.add_argument("target", metavar="TARGET", nargs="?",
                   help="raw image file (created or replaced) or block device; omit with --repo")
    p.add_argument("--bitmap", metavar="NAME",
                   help="incremental: copy only what qemu:dirty-bitmap:NAME marks dirty into TARGET, "
                        "which holds the previous backup")
    p.add_argument("--connections", type=int, default=4, help="NBD connections (if the server allows multi-conn)")
    p.add_argument("--workers", type=int, default=None,
                   help="chunks in flight (default 8; over a long link -- a round trip of 3 ms or more -- 32 MiB of chunks, at least 8)")
    p.add_argument("--chunk-size", default="4M", help="manifest chunk size (default 4M)")
    p.add_argument("--manifest", metavar="OUT", help="write the blake3 chunk manifest of the result here")
    p.add_argument("--base-manifest", metavar="IN", help="incremental: the previous pull's manifest")
    p.add_argument("--repo", metavar="REPO", help="store into this chunk repository (a directory or "
                                                  "s3://BUCKET/PREFIX) instead of TARGET (see 'nbdbackup repo')")
    add_repo_options(p)
    p.add_argument("--snapshot", metavar="NAME", help="with --repo: the new snapshot's name")
    p.add_argument("--base", metavar="NAME", help="with --repo --bitmap: the snapshot the bitmap counts from")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--trim-after-read", action="store_true",
                   help="TRIM each chunk on the source once copied (a backup snapshot started with "
                        "snapshot-trim then frees its scratch and stops copying there)")
    p.add_argument("--write-behind", default="64M", metavar="SIZE",
                   help="into a file or block device: start writing chunks back at once and keep at most "
                        "SIZE written but not yet on disk (default 64M; 0: all left to the final flush)")
    p.add_argument("--buffered", action="store_true",
                   help="write a file or block device through the page cache (default: O_DIRECT where the "
                        "file system allows it)")
    add_io_timeout_option(p, "pull")
    add_limit_rate_option(p, "read from the export (data only; holes are free)")
    add_progress_option(p)
    # Done, durable (fdatasync / the repository's own flushes, the manifest fsynced) and
    # reported when run_pull returns: the interpreter's teardown is skipped (cli._quick_exit;
    # ~20 ms of a ~0.75 s 1 GiB pull, docs/pullrate.md).
    p.set_defaults(func=run_pull, quick_exit=True)

    v = sub.add_parser("verify", help="check an image or export against a blake3 chunk manifest",
                       description="Recompute the blake3 chunk manifest of SOURCE and compare.")
    v.add_argument("source", metavar="SOURCE", help="raw image file, block device or NBD URI")
    v.add_argument("--manifest", required=True, metavar="FILE")
    v.add_argument("--connections", type=int, default=4)
    v.add_argument("--json", action="store_true")
    add_io_timeout_option(v, "check")
    v.set_defaults(func=run_verify)


def run_pull(args: argparse.Namespace) -> int:
    chunk = parse_size(args.chunk_size)
    args.limit = limit_rate(args)  # checked before anything connects
    if args.base_manifest and not args.bitmap:
        raise ConfigError("--base-manifest is for incremental pulls (--bitmap NAME)")
    if args.repo:
        if args.target or args.manifest or args.base_manifest:
            raise ConfigError("--repo stores snapshots: give no TARGET, --manifest or --base-manifest")
        if not args.snapshot:
            raise ConfigError("--repo needs --snapshot NAME")
        if bool(args.bitmap) != bool(args.base):
            raise ConfigError("an incremental pull into a repository needs both --bitmap and --base")
        return run_async(_pull_repo(args))
    if not args.target:
        raise ConfigError("give TARGET (a file or block device) or --repo DIR --snapshot NAME")
    if args.snapshot or args.base:
        raise ConfigError("--snapshot and --base are for --repo")
    if args.s3_endpoint:
        raise ConfigError("--s3-endpoint is for --repo s3://...")
    return run_async(_pull(args, chunk))


async def _pull_repo(args: argparse.Namespace) -> int:
    from ..agent.pull import pull
    from ..agent.repo import BaseSnapshot, check_name
    from .repoargs import open_repo

    store, repo = open_repo(args, args.repo)
    check_name(args.snapshot)
    with store.lock(exclusive=False):
        if repo.has_snapshot(args.snapshot):
            raise ConfigError(f"snapshot {args.snapshot!r} already exists in {args.repo}")
        base = repo.load_snapshot(args.base) if args.base else None
        src = await _open_source(args)
        new_chunks = 0
        seen: set[bytes] = set()  # stored (or found) by this pull: skip the same digest at once

        async def store_chunk(i: int, d: bytes, data: memoryview) -> None:
            nonlocal new_chunks
            if d in seen:
                return
            seen.add(d)
            added = await asyncio.to_thread(repo.put_chunk, d, data, incremental=base is not None)
            new_chunks += added

        try:
            if base is not None and base.size != src.size:
                raise ConfigError(f"snapshot {args.base!r} is {base.size} bytes, the source {src.size}")
            with Progress.for_args(args, f"pull {args.snapshot}") as prog, _stopped("no snapshot was recorded"):
                man, stats = await pull(src, BaseSnapshot(repo, base) if base else None, bitmap=args.bitmap,
                                        chunk_size=repo.chunk_size, workers=args.workers, base=base,
                                        sink=store_chunk, chunk_id=repo.chunk_id, zero_id=repo.zero_id,
                                        progress=prog.update, trim_after_read=args.trim_after_read,
                                        limit=args.limit)
        finally:
            await src.close()
        # new_only: another pull may have saved this name since the check above (several writers
        # at once); never overwrite its backup (SnapshotExists: a ConfigError, one line).
        repo.save_snapshot(args.snapshot, man, source=args.uri, parent=args.base, new_only=True)
    out = stats.to_json()
    out.update(root=man.root.hex(), snapshot=args.snapshot, new_chunks=new_chunks,
               compression=repo.compression.level_name(base is not None))
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print(f"snapshot {args.snapshot}: read {stats.bytes_read} of {stats.size} bytes, "
              f"{stats.chunks_worked} chunks worked, {new_chunks} new in the repository, {stats.seconds:.2f} s")
        print(f"blake3 root {out['root']}")
    return 0


async def _open_source(args: argparse.Namespace):
    from ..blockdev.nbd import NBDDev

    try:
        return await NBDDev.open(args.uri, read_only=not args.trim_after_read, connections=args.connections,
                                 request_timeout=io_timeout(args))
    except OSError as e:  # an extra connection failed or disagreed about the export
        msg = e.strerror or str(e)
        raise ConfigError(msg if "://" in msg else f"{args.uri}: {msg}") from e


@contextlib.contextmanager
def _stopped(consequence: str, what: str = "pull"):
    """A failed pull or check (the server's error reply, timeout, closed connection or
    protocol violation, the target's or repository's OSError) is one `ConfigError` line
    saying what it left, not a traceback."""
    try:
        yield
    except PEER_ERRORS as e:
        raise ConfigError(f"{what} stopped: {failure_text(e)}; {consequence}") from e


async def _pull(args: argparse.Namespace, chunk: int) -> int:
    from ..agent.manifest import Manifest
    from ..agent.pull import pull
    from ..blockdev.file import FileDev

    base = Manifest.load(args.base_manifest) if args.base_manifest else None
    src = await _open_source(args)
    try:
        fresh = False
        path = args.target
        is_block = os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode)
        if args.bitmap:
            if not os.path.exists(path):
                raise ConfigError(f"{path}: no such file: an incremental pull patches the previous backup")
        elif not is_block:
            # A full pull starts from an empty sparse file.
            with open(path, "wb") as f:
                f.truncate(src.size)
            fresh = True
        try:
            dst = FileDev(path)
        except OSError as e:
            raise ConfigError(f"{path}: {e.strerror or e}") from None
        try:
            with Progress.for_args(args, "pull") as prog, _stopped(f"{path} is incomplete"):
                man, stats = await pull(src, dst, bitmap=args.bitmap, fresh=fresh, chunk_size=chunk,
                                        workers=args.workers, base=base, progress=prog.update,
                                        trim_after_read=args.trim_after_read,
                                        write_behind=parse_size(args.write_behind),
                                        direct=not args.buffered, limit=args.limit)
        finally:
            await dst.close()
    finally:
        await src.close()
    if args.manifest:
        man.save(args.manifest)
    out = stats.to_json()
    out["root"] = man.root.hex()
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        mbs = stats.bytes_read / stats.seconds / 1e6 if stats.seconds else 0.0
        print(f"pulled {stats.size} bytes: read {stats.bytes_read}, zeroed {stats.bytes_zeroed}, "
              f"{stats.chunks_worked} of {stats.chunks_worked + stats.chunks_skipped} chunks, "
              f"{stats.seconds:.2f} s ({mbs:.0f} MB/s read)")
        print(f"blake3 root {out['root']}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    return run_async(_verify(args))


async def _verify(args: argparse.Namespace) -> int:
    from ..agent.manifest import Manifest
    from ..agent.pull import manifest_of
    from ..blockdev import is_nbd_uri, open_spec
    from ..blockdev.nbd import NBDDev

    want = Manifest.load(args.manifest)
    if is_nbd_uri(args.source):
        dev = await NBDDev.open(args.source, read_only=True, connections=args.connections,
                                request_timeout=io_timeout(args))
    else:
        dev = await open_spec(args.source, read_only=True)
    try:
        if dev.size != want.size:
            raise ConfigError(f"{args.source} is {dev.size} bytes; the manifest describes {want.size}")
        with _stopped("nothing was compared", "verify"):
            got = await manifest_of(dev, want.chunk_size)
    finally:
        await dev.close()
    bad = want.differences(got)
    if args.json:
        json.dump({"ok": not bad, "root": got.root.hex(), "expected_root": want.root.hex(),
                   "bad_chunks": [{"index": i, "offset": want.chunk_range(i)[0], "length": want.chunk_range(i)[1]}
                                  for i in bad]}, sys.stdout, indent=2)
        print()
    elif bad:
        for i in bad[:20]:
            off, n = want.chunk_range(i)
            print(f"chunk {i} ({off}, {n}) differs")
        if len(bad) > 20:
            print(f"... and {len(bad) - 20} more")
        print(f"FAILED: {len(bad)} of {want.count} chunks differ")
    else:
        print(f"OK: {want.count} chunks, blake3 root {got.root.hex()}")
    return 1 if bad else 0
