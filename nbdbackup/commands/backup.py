"""``nbdbackup backup start``: start a backup job on a running server (QMP ``backup-start``).

Every option maps to one ``backup-start`` argument (see
`nbdbackup.control.schema`); options not given are not sent, so the engine's
defaults apply.  Sizes take suffixes (64K, 1M, 1G).  ``--wait`` then follows
the job like ``nbdbackup job wait`` (exit 1 if it fails).

Checked here, at the edge, because the error is clearer before a round trip:
``--sync incremental|bitmap`` needs ``--bitmap``; ``--bitmap-mode`` needs
``--bitmap``.
"""

from __future__ import annotations

import argparse

from ..control import cliutil
from ..control.schema import BITMAP_MODE, CBW_ERROR_POLICY, ERROR_POLICY, SYNC_MODE
from ..errors import ConfigError
from . import job

#: CLI option dest -> backup-start argument name, in schema order.
_ARGUMENTS = [
    ("export", "export"), ("job_id", "job-id"), ("sync", "sync"), ("target", "target"),
    ("snapshot", "snapshot"), ("speed", "speed"), ("cluster_size", "cluster-size"), ("compress", "compress"),
    ("max_workers", "max-workers"), ("max_chunk", "max-chunk"), ("on_source_error", "on-source-error"),
    ("on_target_error", "on-target-error"), ("on_cbw_error", "on-cbw-error"), ("cbw_timeout", "cbw-timeout"),
    ("auto_dismiss", "auto-dismiss"), ("bitmap", "bitmap"), ("bitmap_mode", "bitmap-mode"),
    ("scratch", "scratch"), ("scratch_limit", "scratch-limit"), ("discard_source", "discard-source"),
    ("snapshot_trim", "snapshot-trim"),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backup", help="start backup jobs on a running server",
                       description="Start backup jobs on a running 'nbdbackup serve'.")
    bsub = p.add_subparsers(dest="backup_command", metavar="ACTION", required=True)
    s = bsub.add_parser("start", help="start a backup job (backup-start)",
                        description="Start a backup job: copy EXPORT's point-in-time snapshot to TARGET.")
    s.add_argument("--export", "-e", required=True, metavar="NAME", help="the export to back up")
    s.add_argument("--job-id", "-j", required=True, metavar="ID", help="id of the new job")
    s.add_argument("--sync", required=True, choices=SYNC_MODE.values, help="what to copy")
    s.add_argument("--target", "-t", required=True, metavar="SPEC",
                   help="where to copy: a raw file path, memory:SIZE or an NBD URI")
    s.add_argument("--snapshot", metavar="NAME", help="name of the snapshot export (default: EXPORT@JOB-ID)")
    s.add_argument("--speed", type=cliutil.size_arg, metavar="BPS", help="rate limit, bytes/s (64M; 0 = unlimited)")
    s.add_argument("--cluster-size", type=cliutil.size_arg, metavar="N", help="copy granularity (default 4K; more for a target preferring larger blocks, and 64K from 1 TiB up: at most 2^24 clusters)")
    s.add_argument("--compress", action=argparse.BooleanOptionalAction, default=None,
                   help="compress the target, if it can")
    s.add_argument("--max-workers", type=cliutil.uint_arg, metavar="N", help="parallel copy requests")
    s.add_argument("--max-chunk", type=cliutil.size_arg, metavar="N", help="largest single copy request")
    s.add_argument("--on-source-error", choices=ERROR_POLICY.values, metavar="POLICY",
                   help="on a read error: " + "|".join(ERROR_POLICY.values))
    s.add_argument("--on-target-error", choices=ERROR_POLICY.values, metavar="POLICY",
                   help="on a write error: " + "|".join(ERROR_POLICY.values))
    s.add_argument("--on-cbw-error", choices=CBW_ERROR_POLICY.values, metavar="POLICY",
                   help="when copy-before-write fails: " + "|".join(CBW_ERROR_POLICY.values))
    s.add_argument("--cbw-timeout", type=cliutil.uint_arg, metavar="S",
                   help="seconds a guest write may wait for copy-before-write (0 = forever)")
    s.add_argument("--auto-dismiss", action=argparse.BooleanOptionalAction, default=None,
                   help="remove the job once it concluded")
    s.add_argument("--bitmap", metavar="NAME", help="dirty bitmap for incremental/bitmap sync")
    s.add_argument("--bitmap-mode", choices=BITMAP_MODE.values, metavar="MODE",
                   help="what to do with the bitmap: " + "|".join(BITMAP_MODE.values))
    s.add_argument("--scratch", metavar="SPEC",
                   help="where copy-before-write saves clusters outside the sync set (top, incremental, "
                        "bitmap; default: a temporary sparse file, removed at dismiss)")
    s.add_argument("--scratch-limit", type=cliutil.size_arg, metavar="N",
                   help="most bytes the scratch may hold; beyond, --on-cbw-error applies")
    s.add_argument("--discard-source", action=argparse.BooleanOptionalAction, default=None,
                   help="discard scratch copies once the background copy moved them to the target")
    s.add_argument("--snapshot-trim", action=argparse.BooleanOptionalAction, default=None,
                   help="let clients TRIM the snapshot export (what they no longer need)")
    s.add_argument("--wait", action="store_true", help="then wait for the job like 'nbdbackup job wait'")
    job.add_wait_arguments(s)
    cliutil.add_control_arguments(s)
    s.set_defaults(func=cmd_start)


def backup_arguments(args: argparse.Namespace) -> dict:
    """The ``backup-start`` arguments for parsed CLI ARGS (validated at the edge)."""
    if args.sync in ("incremental", "bitmap") and not args.bitmap:
        raise ConfigError(f"--sync {args.sync} needs --bitmap")
    if args.bitmap_mode and not args.bitmap:
        raise ConfigError("--bitmap-mode needs --bitmap")
    return {name: getattr(args, dest) for dest, name in _ARGUMENTS if getattr(args, dest) is not None}


def cmd_start(args: argparse.Namespace) -> int:
    arguments = backup_arguments(args)
    if args.wait:
        return job.follow(args, args.job_id, start=("backup-start", arguments))
    result = cliutil.call(args, "backup-start", arguments)
    return cliutil.done(args, result, f"job {args.job_id}: started")
