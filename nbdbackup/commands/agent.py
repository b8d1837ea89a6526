"""``nbdbackup agent backup``: the backup agent's command line (logic in `agent.workflow`).

One command, from the backup host, for a consistent, verified,
incremental-forever backup of one or more disks of one or more servers
into a chunk repository, with retention after success; made to run from
cron or a systemd timer (``systemd/nbdbackup-agent@.timer``).

Exit codes (documented in docs/agent.md):

    0  every disk backed up (and retention, if asked, done)
    1  the backup failed (every disk, or before any disk started)
    2  usage error (bad options; nothing was done)
    3  partial: some disks backed up, others failed (see the report)
    4  every disk backed up, but retention/gc failed

The report: one line per disk on stdout, or with ``--json`` one JSON
document (`agent.workflow.DiskResult.to_json` per disk).  Progress lines go to
stderr when it is a terminal (``--progress always|never`` overrides).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from ..control.cliutil import ENV_CONTROL, ENV_CONTROL_TLS_CREDS, fmt_size, size_arg
from ..errors import ConfigError, NBDBackupError
from . import add_limit_rate_option, limit_rate, run_async
from .repoargs import REPO_HELP, add_repo_options, open_repo

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL, EXIT_RETENTION = 0, 1, 2, 3, 4


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="backup agent: consistent incremental backups of remote disks",
                       description="The backup agent (run it from cron or the systemd timer).")
    asub = p.add_subparsers(dest="agent_command", metavar="ACTION", required=True)
    b = asub.add_parser(
        "backup", help="back up disks of a server into a repository (full or incremental, verified)",
        description="Back up every --disk of the server at one point in time into --repo: incremental "
                    "when the server's bitmap and the repository's base snapshot allow it, else full "
                    "(the report says why). Exit codes: 0 ok, 1 failed, 2 usage, 3 partial, "
                    "4 backed up but retention failed.")
    b.add_argument("--control", metavar="PATH|qmps://HOST:PORT",
                   help=f"the server's control socket or --control-listen address (default: ${ENV_CONTROL})")
    b.add_argument("--control-tls-creds", metavar="DIR",
                   help=f"for qmps://: ca-cert.pem, client-cert.pem, client-key.pem "
                        f"(default: ${ENV_CONTROL_TLS_CREDS})")
    b.add_argument("--nbd", metavar="URI", help="the server's NBD address, e.g. "
                   "'nbds://host:10809/?tls-certificates=DIR' (the export name is replaced)")
    b.add_argument("--disk", action="append", default=[], metavar="EXPORT",
                   help="an export (disk) of the server; repeat for several disks at one point in time")
    b.add_argument("--server-name", metavar="NAME",
                   help="name of the server in snapshot metadata and retention groups (default: --control)")
    b.add_argument("--config", metavar="FILE",
                   help='several servers: JSON {"servers": [{"control", "control_tls_creds", "nbd", '
                        '"disks": [...], "name"}]} (instead of --control/--nbd/--disk)')
    b.add_argument("--repo", required=True, metavar="REPO", help=REPO_HELP)
    add_repo_options(b)
    b.add_argument("--snapshot-name", default="{disk}.{time}", metavar="TEMPLATE",
                   help="snapshot names: {disk} {server} {time} (UTC %%Y%%m%%dT%%H%%M%%SZ) {date}; "
                        "default {disk}.{time}")
    b.add_argument("--prefix", default="nbdbackup-agent", metavar="P",
                   help="name prefix of the agent's bitmaps, jobs and snapshot exports on the server "
                        "(default nbdbackup-agent)")
    b.add_argument("--full", action="store_true", help="take a full backup even if an incremental is possible")
    b.add_argument("--verify", choices=("full", "sample", "off"), default="full",
                   help="re-read every chunk the backup produced from the snapshot export (full, default), "
                        "a random sample, or none")
    b.add_argument("--verify-sample", type=int, default=8, metavar="N", help="chunks per disk with --verify sample")
    b.add_argument("--read", choices=("whole", "dirty"), default="whole",
                   help="incremental: read each chunk the dirty bitmap touches whole from the snapshot export "
                        "(whole, default), or only its dirty ranges and the rest from the base snapshot in "
                        "the repository (dirty: less read from the server, e.g. over a slow link)")
    b.add_argument("--granularity", type=size_arg, metavar="SIZE", help="granularity of new bitmaps")
    b.add_argument("--connections", type=int, default=4, help="NBD connections per disk")
    b.add_argument("--workers", type=int, default=None,
                   help="chunks in flight per disk (default 8; over a long link -- a round trip of 3 ms or more -- 32 MiB of chunks)")
    b.add_argument("--parallel", type=int, default=2, metavar="N", help="disks pulled at once (all servers)")
    b.add_argument("--io-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="an NBD request taking longer fails the backup (default 120)")
    add_limit_rate_option(b, "read from the servers (all disks of the run together; the pull and "
                             "--verify's reads)")
    from .repo import _count, _duration

    b.add_argument("--keep-last", type=_count, default=0, metavar="N",
                   help="retention after a successful run, per disk (as 'repo prune'), then gc")
    for rule in ("hourly", "daily", "weekly", "monthly", "yearly"):
        b.add_argument(f"--keep-{rule}", type=_count, default=0, metavar="N")
    b.add_argument("--keep-within", type=_duration, metavar="DURATION")
    b.add_argument("--grace", type=float, metavar="SECONDS", help="gc grace (as 'repo gc')")
    b.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                   help="progress lines on stderr (auto: when it is a terminal)")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.set_defaults(func=run_backup, quick_exit=True)


def _usage(msg: str) -> int:
    print(f"nbdbackup: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _servers(args: argparse.Namespace):
    from ..agent.workflow import Server

    if args.config:
        if args.control or args.nbd or args.disk:
            raise ConfigError("give either --config or --control/--nbd/--disk")
        try:
            with open(args.config) as f:
                doc = json.load(f)
            servers = [Server(control=s["control"], nbd=s["nbd"], disks=list(s["disks"]),
                              tls_creds=s.get("control_tls_creds"), name=s.get("name", ""))
                       for s in doc["servers"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{args.config}: not a usable agent configuration: {e}") from None
    else:
        control = args.control or os.environ.get(ENV_CONTROL)
        if not control:
            raise ConfigError(f"give --control (or set {ENV_CONTROL}) or --config")
        if not args.nbd:
            raise ConfigError("give --nbd URI (the server's NBD address)")
        if not args.disk:
            raise ConfigError("give at least one --disk EXPORT")
        servers = [Server(control=control, nbd=args.nbd, disks=args.disk,
                          tls_creds=args.control_tls_creds or os.environ.get(ENV_CONTROL_TLS_CREDS) or None,
                          name=args.server_name or "")]
    from ..nbd.uri import parse_uri

    for s in servers:
        parse_uri(s.nbd)
        if not s.disks or len(set(s.disks)) != len(s.disks):
            raise ConfigError(f"server {s.name}: give each disk once")
    return servers


def _policy(args: argparse.Namespace):
    if not any(getattr(args, f"keep_{r}") for r in ("last", "hourly", "daily", "weekly", "monthly", "yearly",
                                                   "within")):
        return None  # (a run without retention does not import it)
    from ..agent import retention

    policy = retention.Policy(last=args.keep_last, hourly=args.keep_hourly, daily=args.keep_daily,
                              weekly=args.keep_weekly, monthly=args.keep_monthly, yearly=args.keep_yearly,
                              within=args.keep_within)
    return None if policy.empty() else policy


class _Progress:
    """Progress lines on stderr, at most one per disk per second."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def __call__(self, disk: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last.get(disk, 0.0) < 1.0:
            return
        self.last[disk] = now
        pct = 100.0 * done / total if total else 100.0
        print(f"{disk}: {fmt_size(done)} of {fmt_size(total)} ({pct:.0f}%)", file=sys.stderr, flush=True)


def run_backup(args: argparse.Namespace) -> int:
    from ..agent import workflow

    try:
        servers = _servers(args)
        policy = _policy(args)
        if args.parallel < 1 or args.connections < 1 or (args.workers or 1) < 1 or args.verify_sample < 1:
            raise ConfigError("--parallel, --connections, --workers and --verify-sample must be >= 1")
        show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
        opts = workflow.Options(prefix=args.prefix, template=args.snapshot_name, connections=args.connections,
                                workers=args.workers, verify=args.verify, sample=args.verify_sample,
                                full=args.full, granularity=args.granularity, io_timeout=args.io_timeout,
                                read=args.read, limit=limit_rate(args),
                                progress=_Progress() if show else None)
        # Fail on a bad template now, not per disk.
        import datetime

        workflow.snapshot_name(opts.template, servers[0], servers[0].disks[0],
                               datetime.datetime.now(datetime.timezone.utc))
    except ConfigError as e:
        return _usage(str(e))

    t0 = time.monotonic()
    store, repo = open_repo(args, args.repo)

    seen: list = []  # every disk's result as soon as its server's run starts (workflow.backup_server)
    got: list[int] = []  # the signal that interrupted the run

    def interrupt(sig: int) -> None:
        got.append(sig)
        task.cancel()

    async def main():
        # SIGTERM (systemctl stop, a timeout) or SIGHUP (a closed terminal) cancels the run:
        # started disks are rolled back.
        nonlocal task
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            asyncio.get_running_loop().add_signal_handler(sig, interrupt, sig)
        with store.lock(exclusive=False):
            return await workflow.run(servers, store, repo, opts, parallel=args.parallel, sink=seen)

    task = None
    interrupted: str | None = None
    try:
        results = run_async(main())
    except asyncio.CancelledError:
        results = seen
        signum = got[0] if got else signal.SIGTERM
        interrupted = signal.Signals(signum).name
        for r in results:
            if r.status != "ok":
                r.error = f"interrupted by {interrupted}: not recorded (rolled back where started)"
    ok = [r for r in results if r.status == "ok"]
    code = EXIT_OK if len(ok) == len(results) else EXIT_PARTIAL if ok else EXIT_FAILED
    if interrupted is not None and not (results and code == EXIT_OK):
        code = 128 + signal.Signals[interrupted].value  # as a shell reports a command a signal ended
    retention: dict | None = None
    if interrupted is not None:
        if policy is not None:
            retention = {"skipped": f"interrupted by {interrupted}"}
    elif policy is not None and code == EXIT_OK:
        try:
            retention = workflow.apply_retention(store, repo, policy, results, args.grace)
        except (NBDBackupError, OSError) as e:
            retention = {"error": str(e)}
            code = EXIT_RETENTION
    elif policy is not None:
        retention = {"skipped": "not every disk was backed up"}
    report = {"ok": code == EXIT_OK, "exit_code": code, "repository": args.repo,
              "seconds": round(time.monotonic() - t0, 3), "disks": [r.to_json() for r in results],
              "retention": retention}
    if interrupted is not None:
        report["interrupted"] = interrupted
        report["error"] = _interrupted_text(interrupted, results)
    if getattr(store, "requests", None) is not None:  # S3: API calls of this run, by operation
        report["store_requests"] = dict(sorted(store.requests.items()))
    if args.json:  # one write (with PYTHONUNBUFFERED, json.dump to stdout was ~180 write calls)
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        for r in results:
            print(_line(r))
            for n in r.notes:
                print(f"  note: {n}")
        if retention is not None:
            if "error" in retention:
                print(f"retention FAILED: {retention['error']}")
            elif "skipped" in retention:
                print(f"retention skipped: {retention['skipped']}")
            else:
                gc = retention["gc"]
                print(f"retention: removed {len(retention['removed'])} snapshot(s)"
                      f"{': ' + ' '.join(retention['removed']) if retention['removed'] else ''}; "
                      f"gc removed {gc['removed']} chunk(s), {gc['kept']} in use")
    for r in results:
        if r.status != "ok":
            print(f"nbdbackup: error: {r.server} {r.disk}: {r.error}", file=sys.stderr)
    if interrupted is not None:
        print(f"nbdbackup: {'note' if code == EXIT_OK else 'error'}: {_interrupted_text(interrupted, results)}",
              file=sys.stderr)
    return code


def _interrupted_text(sig: str, results) -> str:
    """What an interrupted run says: which disks were recorded before the signal, which
    were rolled back (docs/agent.md "Exit codes")."""
    done = [f"{r.server} {r.disk}" for r in results if r.status == "ok"]
    back = [f"{r.server} {r.disk}" for r in results if r.status != "ok"]
    if results and not back:
        return (f"interrupted by {sig} after every disk was recorded ({', '.join(done)}); "
                "the next run finishes the clean-up (job, superseded bitmap)")
    text = f"interrupted by {sig}: "
    if done:
        text += f"recorded: {', '.join(done)}; "
    return text + f"not recorded (rolled back where started): {', '.join(back) or 'none started'}"


def _line(r) -> str:
    head = f"{r.server} {r.disk}:"
    if r.status != "ok":
        what = f" ({r.kind}: {r.reason})" if r.kind else ""
        return f"{head} FAILED{what}: {r.error}"
    dd = f", dedup {r.dedup_ratio:.2f}x" if r.dedup_ratio else ""
    return (f"{head} {r.kind} ({r.reason}) -> snapshot {r.snapshot}: read {fmt_size(r.bytes_read)}, "
            f"stored {fmt_size(r.bytes_stored)} in {r.new_chunks} new chunk(s){dd}, "
            f"verified {r.verify.get('mode')}, {r.seconds:.1f} s")
