"""``nbdbackup repo init|info|list|verify|delete|prune|gc|key``: a chunk repository (`agent.repo`).

A repository is a directory or ``s3://BUCKET/PREFIX`` (`agent.s3store`:
credentials, region and endpoint from the usual AWS environment variables
and files, or ``--s3-endpoint URL``).  ``pull --repo REPO --snapshot NAME``
fills it; ``nbdbackup restore`` (`commands.restore`) writes a snapshot
back, ``plugins/restore.py repo=DIR snapshot=NAME`` serves one over NBD.
``verify`` reads every distinct chunk the snapshots use (on ``--workers``
threads; ``--sample PERCENT [--seed N]`` a random part of them,
`agent.verify`) and exits 1 naming the broken ones in every snapshot that
uses them (snapshot, chunk index, byte range ``(offset, length)``); ``delete``
forgets a snapshot; ``prune`` forgets the snapshots a ``--keep-*`` policy
does not keep (`agent.retention`; ``--dry-run`` only shows the plan);
``gc`` removes the chunks no snapshot uses any more (on S3 only those
older than ``--grace`` seconds, default an hour).  ``delete``, ``prune``
and ``gc`` hold the repository lock exclusive and fail at once if a pull
(or verify) holds it shared; ``prune --dry-run`` holds it shared.

``init --encryption repokey|keyfile|none --compression zstd[:LEVEL]|none``
chooses how chunks are stored (`agent.codec`, `agent.crypto`; ``zstd``, the
default, is adaptive: level 3 for a full backup's chunks, 1 for an
incremental's); ``info`` shows those settings from config.json (no key
needed); ``key
export [FILE]`` copies the wrapped key out (no passphrase needed: it is
useless without it), ``key change-passphrase`` rewraps it where it lives.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..blockdev import parse_size
from ..errors import ConfigError
from ..progress import Progress, add_progress_option
from .repoargs import REPO_HELP, add_repo_options, open_repo, open_store_args

#: ``repo init``'s default chunk size (`agent.repo.DEFAULT_REPO_CHUNK`; older repositories keep theirs).
DEFAULT_CHUNK_TEXT = "1M"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repo", help="manage a chunk repository (deduplicated pulled backups)",
                       description="Manage a deduplicating blake3 chunk repository.")
    rsub = p.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    i = rsub.add_parser("init", help="create a repository")
    i.add_argument("dir", metavar="REPO", help=REPO_HELP)
    i.add_argument("--chunk-size", default=DEFAULT_CHUNK_TEXT,
                   help=f"chunk size, a multiple of 4096 (default {DEFAULT_CHUNK_TEXT}); fixed for the repository")
    i.add_argument("--encryption", choices=("repokey", "keyfile", "none"), default="none",
                   help="repokey: the passphrase-wrapped key is kept in the repository; keyfile: in a local "
                        "file (--key-file, default $XDG_CONFIG_HOME/nbdbackup/keys/ID); none (default)")
    i.add_argument("--compression", default="zstd", metavar="zstd[:LEVEL]|none",
                   help="chunk compression: zstd (default) is adaptive: a full backup's chunks at level 3, "
                        "an incremental's (written against a base snapshot) at level 1, ~35%% less CPU for "
                        "~8%% more bytes of the few changed chunks; zstd:LEVEL (1-22) every chunk at LEVEL; "
                        "none. Chunks it does not shrink are stored raw")
    i.add_argument("--kdf", choices=("scrypt", "none"), default="scrypt",
                   help="keyfile only: none writes the key unwrapped to a 0600 key file and asks no passphrase "
                        "(unattended runs without the ~0.3 s scrypt; see docs/incr.md); default scrypt")
    _s3(i)
    i.set_defaults(func=cmd_init)
    inf = rsub.add_parser("info", help="show a repository's settings (chunk size, encryption, compression)",
                          description="Show what config.json says (no passphrase needed) and how many "
                                      "snapshots the repository holds.")
    inf.add_argument("dir", metavar="REPO", help=REPO_HELP)
    _s3(inf)
    inf.add_argument("--json", action="store_true")
    inf.set_defaults(func=cmd_info)
    k = rsub.add_parser("key", help="an encrypted repository's key: export, change-passphrase")
    ksub = k.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    ke = ksub.add_parser("export", help="write the wrapped key (keep it safe: with the passphrase it opens "
                                        "the repository)")
    ke.add_argument("dir", metavar="REPO", help=REPO_HELP)
    ke.add_argument("file", metavar="FILE", nargs="?", help="where to write it (default: stdout)")
    ke.add_argument("--kdf", choices=("scrypt", "none"), default="scrypt",
                    help="none: unlock the repository and write its key UNWRAPPED to FILE (mode 0600), for "
                         "unattended runs with --key-file FILE and no passphrase (docs/incr.md); "
                         "default scrypt: the passphrase-wrapped key as stored")
    _s3(ke)
    ke.set_defaults(func=cmd_key_export)
    kc = ksub.add_parser("change-passphrase", help="rewrap the key under a new passphrase")
    kc.add_argument("dir", metavar="REPO", help=REPO_HELP)
    kc.add_argument("--new-passphrase-file", metavar="FILE",
                    help="the new passphrase: FILE's first line (default: NBDBACKUP_NEW_PASSPHRASE, else a prompt)")
    _s3(kc)
    kc.set_defaults(func=cmd_key_change)
    for name, func, text in (("list", cmd_list, "list snapshots"), ("verify", cmd_verify, "check snapshots' chunks"),
                             ("delete", cmd_delete, "delete a snapshot"), ("gc", cmd_gc, "remove unused chunks")):
        a = rsub.add_parser(name, help=text)
        a.add_argument("dir", metavar="REPO", help=REPO_HELP)
        _s3(a)
        if name == "gc":
            _grace(a)
        if name in ("verify", "delete"):
            a.add_argument("names", metavar="NAME", nargs="*" if name == "verify" else 1)
        if name == "verify":
            _verify_options(a)
        a.add_argument("--json", action="store_true")
        a.set_defaults(func=func)
    pr = rsub.add_parser(
        "prune", help="delete the snapshots a retention policy does not keep",
        description="Keep the snapshots that at least one --keep-* rule selects and delete the others "
                    "(restic 'forget' semantics; hour/day/ISO week/month/year buckets in UTC). "
                    "Refuses to run with no rule.")
    pr.add_argument("dir", metavar="REPO", help=REPO_HELP)
    _s3(pr)
    pr.add_argument("--keep-last", type=_count, default=0, metavar="N",
                    help="the N newest snapshots ('unlimited': all)")
    for rule in ("hourly", "daily", "weekly", "monthly", "yearly"):
        pr.add_argument(f"--keep-{rule}", type=_count, default=0, metavar="N",
                        help=f"the newest snapshot of each of the last N {rule} buckets that have one "
                             f"('unlimited': all)")
    pr.add_argument("--keep-within", type=_duration, metavar="DURATION",
                    help="every snapshot newer than the newest minus DURATION (e.g. 2d3h, 1y6m; m = months)")
    pr.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    pr.add_argument("--gc", action="store_true", help="then remove the chunks no kept snapshot uses")
    _grace(pr)
    pr.add_argument("--json", action="store_true")
    add_progress_option(pr)
    pr.set_defaults(func=cmd_prune)


def _s3(p: argparse.ArgumentParser) -> None:
    add_repo_options(p)


def _grace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grace", type=float, metavar="SECONDS",
                   help="gc keeps unused chunks younger than this (default: 0 for a directory, 3600 on S3)")


def _count(text: str) -> int:
    from ..agent.retention import UNLIMITED

    if text in ("unlimited", "-1"):
        return UNLIMITED
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: give a count >= 0 or 'unlimited'")
    return int(text)


def _duration(text: str):
    from ..agent.retention import Duration
    from ..errors import ConfigError

    try:
        return Duration.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _open(args: argparse.Namespace):
    return open_repo(args, args.dir)


def _emit(args: argparse.Namespace, value, text: str) -> None:
    if getattr(args, "json", False):
        json.dump(value, sys.stdout, indent=2)
        print()
    else:
        print(text)


def cmd_init(args: argparse.Namespace) -> int:
    from ..agent.codec import parse_compression
    from ..agent.repo import Repository
    from .repoargs import passphrase_of

    comp = parse_compression(args.compression)
    repo = Repository.init(open_store_args(args, args.dir), parse_size(args.chunk_size), encryption=args.encryption,
                           compression=comp, passphrase=passphrase_of(args, confirm=True, spec=args.dir),
                           key_file=args.key_file, kdf=args.kdf)
    print(f"repository {args.dir} created ({repo.chunk_size} byte chunks, compression "
          f"{repo.compression.describe()}, "
          f"encryption {args.encryption})")
    if repo.encryption == "keyfile" and args.kdf == "none":
        print(f"key: {repo._key_source[1]} (mode 0600, NO passphrase: whoever reads it reads and writes the "
              "backups) -- without it the backups cannot be read: keep a protected copy elsewhere "
              "('nbdbackup repo key change-passphrase' wraps it under a passphrase)")
    elif repo.encryption == "keyfile":
        print(f"key: {repo._key_source[1]} -- without it and the passphrase the backups cannot be read: "
              "keep a copy elsewhere ('nbdbackup repo key export')")
    elif repo.encryption == "repokey":
        print("the key is in the repository, wrapped by the passphrase: keep a copy elsewhere too "
              "('nbdbackup repo key export')")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """The repository's settings, read from config.json without unlocking the key."""
    from ..agent.repo import Repository

    store = open_store_args(args, args.dir)
    cfg = Repository.config(store)
    comp = cfg["compression"]
    doc = {"repository": args.dir, "id": cfg["id"], "version": cfg["version"], "chunk_size": cfg["chunk_size"],
           "encryption": cfg["encryption"], "compression": comp.name,
           "compression_levels": {"full": comp.level(False), "incremental": comp.level(True)},
           "snapshots": len(Repository.snapshot_names(store))}
    _emit(args, doc, "\n".join((
        f"repository   {args.dir}", f"id           {doc['id']}", f"format       {cfg['version']}",
        f"chunk size   {doc['chunk_size']} bytes", f"encryption   {doc['encryption']}",
        f"compression  {comp.describe()}", f"snapshots    {doc['snapshots']}")))
    return 0


def cmd_key_export(args: argparse.Namespace) -> int:
    from ..agent.crypto import write_private

    if args.kdf == "none":
        if not args.file:
            raise ConfigError("--kdf none writes the key unwrapped: give a FILE (it is written mode 0600)")
        _, repo = _open(args)  # unlocked: with the passphrase, or an existing key file
        write_private(args.file, repo.plain_key_blob())
        print(f"key of {args.dir} written UNWRAPPED to {args.file} (mode 0600): whoever reads it reads and "
              "writes the backups; use it with --key-file and no passphrase")
        return 0
    # The blob is wrapped: exporting it needs no passphrase.
    blob = _key_blob(open_store_args(args, args.dir), args)
    if args.file:
        write_private(args.file, blob)
        print(f"key of {args.dir} written to {args.file}")
    else:
        sys.stdout.write(blob.decode())
    return 0


def _key_blob(store, args: argparse.Namespace) -> bytes:
    """The wrapped key of the repository in ``store`` (no passphrase needed)."""
    import json as _json

    from ..agent.repo import CONFIG, Repository
    from ..errors import ConfigError

    try:
        cfg = _json.loads(store.get(CONFIG))
        enc, repo_id = cfg["encryption"], cfg["id"]
    except FileNotFoundError:
        raise ConfigError(f"{store.root} is not a repository") from None
    except (ValueError, KeyError, TypeError):
        Repository.open(store)  # says what is wrong (version, damage)
        raise
    if enc == "none":
        raise ConfigError(f"{store.root} is not encrypted: it has no key")
    return Repository._read_key(store, repo_id, enc, args.key_file)[0]


def cmd_key_change(args: argparse.Namespace) -> int:
    from ..agent.crypto import NEW_PASSPHRASE_ENV, read_passphrase

    _, repo = _open(args)  # unlocked with the current passphrase
    new = read_passphrase(args.new_passphrase_file, env=NEW_PASSPHRASE_ENV, what="new passphrase", confirm=True)
    where = repo.change_passphrase(new)
    print(f"passphrase changed ({where}); copies exported before still open with the old one")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    _, repo = _open(args)
    rows = []
    for name, info in repo.snapshot_infos(repo.snapshots()):
        rows.append({"name": name, "created": info.get("created"), "size": info["size"],
                     "parent": info.get("parent"), "root": info["root"]})
    _emit(args, rows, "\n".join(f"{r['name']}  {r['created']}  {r['size']} bytes  parent={r['parent'] or '-'}  "
                                f"root={r['root'][:16]}" for r in rows) or "(no snapshots)")
    return 0


def _verify_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("--sample", type=_percent, metavar="PERCENT",
                   help="check a random PERCENT of the distinct chunks (default: all)")
    a.add_argument("--seed", type=int, metavar="N", help="with --sample: the random seed (default: drawn, reported)")
    a.add_argument("--workers", type=int, default=8, metavar="N", help="chunks read at once (default 8)")
    a.add_argument("--repair", action="store_true",
                   help="move damaged chunks aside (damaged/ID, kept) so that the next pull of their data "
                        "stores them again (a pull finds a known chunk by its id, without reading it)")
    add_progress_option(a)


def _percent(text: str) -> float:
    try:
        v = float(text.rstrip("%"))
    except ValueError:
        v = -1.0
    if not 0 < v <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: give a percentage in (0, 100]")
    return v


def cmd_verify(args: argparse.Namespace) -> int:
    from ..agent.verify import verify

    if args.seed is not None and args.sample is None:
        raise ConfigError("--seed is for --sample")
    store, repo = _open(args)
    with store.lock(exclusive=False):
        names = args.names or repo.snapshots()
        with Progress.for_args(args, "verify") as prog:
            rep = verify(repo, names, sample=args.sample, seed=args.seed, workers=max(1, args.workers),
                         progress=prog.update, repair=args.repair)
    rows = [p.to_json() for p in rep.problems]
    scope = (f"sample {rep.sample:g}% (seed {rep.seed}): " if rep.seed is not None else "") + \
        f"{rep.chunks_checked} of {rep.chunks_referenced} chunk(s), {rep.bytes_checked} bytes checked " \
        f"in {rep.seconds:.2f} s"
    lines = [f"{p['snapshot']}: chunk {p['chunk']} ({p['offset']}, {p['length']}): {p['reason']}"
             if p["chunk"] >= 0 else p["reason"] for p in rows]
    if rep.problems:
        lines.append(f"damaged snapshot(s): {' '.join(rep.damaged_snapshots)}")
    if rep.moved:
        lines.append(f"moved {len(rep.moved)} damaged chunk(s) to damaged/: the next pull of their data "
                     "stores them again (and heals these snapshots)")
    elif rep.problems and not args.repair and any(p.reason != "missing" for p in rep.problems if p.index >= 0):
        lines.append("new pulls reuse a damaged chunk found by its id: run 'verify --repair' to move them aside")
    lines += [scope, f"{'FAILED' if rep.problems else 'OK'}: {len(names)} snapshot(s), {len(rows)} bad chunk(s)"]
    _emit(args, rep.to_json(), "\n".join(lines))
    return 1 if rep.problems else 0


def cmd_delete(args: argparse.Namespace) -> int:
    store, repo = _open(args)
    with store.lock(exclusive=True):
        repo.delete_snapshot(args.names[0])
    _emit(args, {}, f"snapshot {args.names[0]} deleted (run 'gc' to free its chunks)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    store, repo = _open(args)
    with store.lock(exclusive=True):
        removed, kept = repo.gc(args.grace)
    _emit(args, {"removed": removed, "kept": kept}, f"removed {removed} unused chunk(s), {kept} in use")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    import datetime

    from ..agent import retention

    policy = retention.Policy(last=args.keep_last, hourly=args.keep_hourly, daily=args.keep_daily,
                              weekly=args.keep_weekly, monthly=args.keep_monthly, yearly=args.keep_yearly,
                              within=args.keep_within).check()
    store, repo = _open(args)
    gc: dict | None = None
    with store.lock(exclusive=not args.dry_run):
        times = _snapshot_times(args, repo)
        now = datetime.datetime.now(datetime.timezone.utc)
        decisions = retention.plan([(n, t) for n, (t, _) in times.items()], policy, now=now)
        remove = retention.removed(decisions)
        if args.dry_run:
            if args.gc:  # what gc would free: chunks only the removed snapshots use
                keep = repo.referenced(retention.kept(decisions))
                gc = {"removed": sum(1 for _ in repo.unreferenced(keep)), "kept": len(keep)}
        else:
            with Progress.for_args(args, "prune: deleting", len(remove), unit="snapshots") as prog:
                for k in range(0, len(remove), 100):  # (one batch: one fsync / DeleteObjects)
                    repo.delete_snapshots(remove[k:k + 100])
                    prog.update(min(len(remove), k + 100))
            if args.gc:
                freed, in_use = repo.gc(args.grace)
                gc = {"removed": freed, "kept": in_use}
    guessed = sorted(n for n, (_, g) in times.items() if g)
    doc = {"policy": policy.to_json(), "dry_run": args.dry_run, "now": now.isoformat(timespec="seconds"),
           "snapshots": [{"name": d.name, "time": d.time.isoformat(timespec="seconds"),
                          "time_from_mtime": times[d.name][1], "action": "keep" if d.keep else "remove",
                          "reasons": [str(r) for r in d.reasons]} for d in decisions],
           "keep": retention.kept(decisions), "remove": remove,
           "removed": [] if args.dry_run else remove, "gc": gc}
    _emit(args, doc, _prune_text(policy, decisions, times, remove, guessed, gc, args.dry_run))
    return 0


def _snapshot_times(args: argparse.Namespace, repo) -> dict:
    """name -> (time, guessed) of every snapshot (one read each: progress on a terminal)."""
    names = repo.snapshots()
    out = {}
    with Progress.for_args(args, "prune: reading", len(names), unit="snapshots") as prog:
        for k, (name, info) in enumerate(repo.snapshot_infos(names)):
            out[name] = repo.snapshot_time(name, info)
            prog.update(k + 1)
    return out


def _prune_text(policy, decisions, times, remove, guessed, gc, dry_run: bool) -> str:
    rows = [("SNAPSHOT", "TIME (UTC)", "ACTION", "REASONS")]
    for d in decisions:
        rows.append((d.name, d.time.strftime("%Y-%m-%d %H:%M:%S") + ("*" if times[d.name][1] else ""),
                     "keep" if d.keep else "remove", ", ".join(map(str, d.reasons)) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"policy: {policy.describe()} (buckets in UTC)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    if guessed:
        lines.append("* no 'created' time in the snapshot file: its modification time is used")
    verb = "would remove" if dry_run else "removed"
    lines.append(f"{verb} {len(remove)} of {len(decisions)} snapshot(s)" + (f": {' '.join(remove)}" if remove else "")
                 + (" (dry run: nothing changed)" if dry_run else ""))
    if gc is not None:
        lines.append(f"gc: {'would remove' if dry_run else 'removed'} {gc['removed']} unused chunk(s), "
                     f"{gc['kept']} in use")
    elif remove and not dry_run:
        lines.append("run 'nbdbackup repo gc' (or prune --gc) to free their chunks")
    return "\n".join(lines)
