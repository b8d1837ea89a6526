"""``nbdbackup job list|pause|resume|cancel|dismiss|set-speed|wait``: block jobs over the control socket.

Maps one-to-one onto QMP ``query-jobs``, ``job-pause``, ``job-resume``,
``job-cancel``, ``job-dismiss``, ``job-set-speed`` (see
`nbdbackup.control.schema`).  ``wait ID`` follows the job until it concludes:
it listens to ``JOB_STATUS_CHANGE`` / ``BLOCK_JOB_COMPLETED`` /
``BLOCK_JOB_CANCELLED`` events and polls ``query-jobs`` as a fallback (and for
progress), drawing a progress bar on a TTY.  Exit status: 0 when the job
succeeded, 1 with the job's error when it failed or was cancelled.

Outcome rules of `wait_job` (first that applies):
1. ``query-jobs`` shows the job ``concluded``: failed iff it has ``error``
   (or a completion event carried one);
2. the job vanished (auto-dismissed) after a ``BLOCK_JOB_COMPLETED`` or
   ``BLOCK_JOB_CANCELLED`` event: that event decides;
3. the job vanished with no such event: failure, result unknown.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import TextIO

from ..control import cliutil
from ..control.client import ControlClient
from ..control.schema import CommandError

#: Statuses after which a job does no more work.
FINAL = ("concluded", "null")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("job", help="list and control jobs of a running server",
                       description="List and control the jobs of a running 'nbdbackup serve'.")
    jsub = p.add_subparsers(dest="job_command", metavar="ACTION", required=True)

    q = jsub.add_parser("list", help="list jobs (query-jobs)")
    cliutil.add_control_arguments(q)
    q.set_defaults(func=cmd_list)

    for action, verb in (("pause", "pause"), ("resume", "resume"), ("cancel", "cancel"), ("dismiss", "dismiss")):
        a = jsub.add_parser(action, help=f"{verb} a job (job-{action})")
        a.add_argument("id", metavar="ID", help="job id")
        cliutil.add_control_arguments(a)
        a.set_defaults(func=cmd_simple, qmp=f"job-{action}", verb=action)

    s = jsub.add_parser("set-speed", help="change a job's rate limit (job-set-speed)")
    s.add_argument("id", metavar="ID", help="job id")
    s.add_argument("speed", metavar="SPEED", type=cliutil.size_arg, help="bytes per second (64M, 1G; 0 = unlimited)")
    cliutil.add_control_arguments(s)
    s.set_defaults(func=cmd_set_speed)

    w = jsub.add_parser("wait", help="wait until a job concludes; exit 1 if it failed")
    w.add_argument("id", metavar="ID", help="job id")
    add_wait_arguments(w)
    cliutil.add_control_arguments(w)
    w.set_defaults(func=cmd_wait)


def add_wait_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dismiss", action="store_true", help="dismiss the job once it concluded")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="give up (exit 1) after this long")
    p.add_argument("--poll", type=float, default=1.0, metavar="SECONDS", help=argparse.SUPPRESS)


def cmd_list(args: argparse.Namespace) -> int:
    return cliutil.list_command(args, "query-jobs", lambda j: {**j, "progress": _progress_text(j)},
                                [("id", "ID"), ("type", "TYPE"), ("status", "STATUS"),
                                 ("progress", "PROGRESS"), ("error", "ERROR")])


def cmd_simple(args: argparse.Namespace) -> int:
    result = cliutil.call(args, args.qmp, {"id": args.id})
    past = {"pause": "paused", "resume": "resumed", "cancel": "cancelling", "dismiss": "dismissed"}[args.verb]
    return cliutil.done(args, result, f"job {args.id}: {past}")


def cmd_set_speed(args: argparse.Namespace) -> int:
    result = cliutil.call(args, "job-set-speed", {"id": args.id, "speed": args.speed})
    limit = "unlimited" if args.speed == 0 else f"{cliutil.fmt_size(args.speed)}/s"
    return cliutil.done(args, result, f"job {args.id}: speed {limit}")


def cmd_wait(args: argparse.Namespace) -> int:
    return follow(args, args.id)


def follow(args: argparse.Namespace, job_id: str, start: tuple[str, dict] | None = None) -> int:
    """Wait for JOB_ID as ``job wait`` does.

    START, a ``(command, arguments)`` pair, is run first on the same connection
    (``backup start --wait``), so not even an instantly auto-dismissed job is missed.
    """
    stream = sys.stderr if sys.stderr.isatty() and not args.json else None

    async def body(client: ControlClient) -> dict:
        if start is not None:
            await client.execute(*start)
            if not args.json:
                print(f"job {job_id}: started", flush=True)
        coro = wait_job(client, job_id, progress=stream, poll=args.poll if stream is None else min(args.poll, 0.5))
        try:
            async with asyncio.timeout(args.timeout):
                final = await coro
        except TimeoutError:
            raise CommandError("GenericError", f"timed out waiting for job {job_id}") from None
        if args.dismiss and final.get("status") == "concluded":
            await client.execute("job-dismiss", {"id": job_id})
        return final

    final = cliutil.run(args, body)
    error = final.get("error")
    if args.json:
        cliutil.print_json(final)
    elif error is None:
        print(f"job {job_id}: completed")
    if error is not None:
        raise CommandError("GenericError", f"job {job_id} failed: {error}")
    return 0


async def _find(client: ControlClient, job_id: str) -> dict | None:
    for job in await client.execute("query-jobs"):
        if isinstance(job, dict) and job.get("id") == job_id:
            return job
    return None


async def wait_job(client: ControlClient, job_id: str, *, progress: TextIO | None = None,
                   poll: float = 1.0) -> dict:
    """Follow JOB_ID until it concludes; return its final JobInfo (``error`` iff it failed).

    Raises `CommandError` (DeviceNotActive) if there is no such job at the start
    and no completion event for it is already queued.
    The client must have been connected before the job could conclude unseen:
    events are queued from negotiation on, and the first poll happens after it.
    """
    bar = _ProgressBar(progress, job_id) if progress is not None else None
    outcome: dict | None = None  # data of a BLOCK_JOB_COMPLETED / _CANCELLED event for this job
    info = await _find(client, job_id)
    if info is None:
        # Concluded and auto-dismissed already?  Its events may be queued.
        while (event := await client.next_event(timeout=0)) is not None:
            outcome = _outcome(event, job_id) or outcome
        if outcome is None:
            raise CommandError("DeviceNotActive", f"job '{job_id}' not found")
    last_poll = time.monotonic()
    try:
        while True:
            if info is not None:
                if bar is not None:
                    bar.update(info)
                if info.get("status") == "concluded":
                    # query-jobs is authoritative: ``error`` there iff the job
                    # failed.  (A cancelled fleecing job, sync=none, ended
                    # normally: its BLOCK_JOB_CANCELLED event is no failure.)
                    return dict(info)
            else:
                final = {"id": job_id, "status": "null"}
                if outcome is None:
                    final["error"] = "the job disappeared without reporting its result"
                elif "error" in outcome:
                    final["error"] = outcome["error"]
                return final
            if client.closed:
                raise CommandError("GenericError", "the control connection closed while waiting")
            event = await client.next_event(timeout=max(0.0, poll - (time.monotonic() - last_poll)))
            refresh = event is None or time.monotonic() - last_poll >= poll
            if event is not None:
                data = event.get("data") or {}
                if data.get("id", data.get("device")) == job_id:
                    outcome = _outcome(event, job_id) or outcome
                    refresh = True
            if refresh:
                info = await _find(client, job_id)
                last_poll = time.monotonic()
    finally:
        if bar is not None:
            bar.close()


def _outcome(event: dict, job_id: str) -> dict | None:
    """The data of a completion event for JOB_ID (``error`` set iff it failed), else None."""
    data = event.get("data") or {}
    if data.get("id", data.get("device")) != job_id:
        return None
    if event.get("event") == "BLOCK_JOB_COMPLETED":
        return dict(data)
    if event.get("event") == "BLOCK_JOB_CANCELLED":
        return dict(data, error="cancelled")
    return None


def _progress_text(job: dict) -> str:
    cur, tot = job.get("current-progress"), job.get("total-progress")
    if not isinstance(cur, int) or not isinstance(tot, int):
        return "-"
    pct = f"{100 * cur // tot}%" if tot > 0 else "-"
    return f"{pct} ({cliutil.fmt_size(cur)}/{cliutil.fmt_size(tot)})"


class _ProgressBar:
    """One self-rewriting status line on a TTY: bar, percent, bytes, rate."""

    WIDTH = 30

    def __init__(self, stream: TextIO, job_id: str) -> None:
        self.stream = stream
        self.job_id = job_id
        self.samples: list[tuple[float, int]] = []  # (monotonic time, current-progress), last ~5 s
        self.drawn = False

    def update(self, info: dict) -> None:
        cur = info.get("current-progress") or 0
        tot = info.get("total-progress") or 0
        now = time.monotonic()
        self.samples.append((now, cur))
        while len(self.samples) > 2 and now - self.samples[0][0] > 5:
            self.samples.pop(0)
        t0, c0 = self.samples[0]
        rate = (cur - c0) / (now - t0) if now > t0 else 0.0
        frac = min(1.0, cur / tot) if tot > 0 else 0.0
        filled = int(frac * self.WIDTH)
        line = (f"\r{self.job_id}: {info.get('status', '?'):<9} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                f"{frac * 100:5.1f}%  {cliutil.fmt_size(cur)} / {cliutil.fmt_size(tot)}  "
                f"{cliutil.fmt_size(max(rate, 0))}/s")
        self.stream.write(line + "\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()

