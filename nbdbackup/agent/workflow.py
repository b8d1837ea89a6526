"""The backup agent: one consistent, verified, incremental-forever backup of a server's disks.

Role: what ``nbdbackup agent backup`` does, over the control socket (local or
``qmps://``) and NBD (``nbds://``) of one or more ``nbdbackup serve``
servers, into one chunk repository (`agent.repo`).  `agent.decide` makes
the full/incremental decision without I/O; this module does the I/O.

One server's run (`backup_server`)::

    1 reclaim   jobs named PREFIX.* on our disks, left by a run that died
                (kill -9, network cut): cancelled and dismissed (their
                snapshot exports go with them)
    2 decide    per disk, from query-bitmaps and the repository (agent.decide)
    3 one transaction for every disk: merge orphans into the base bitmap,
                disable it, add the new bitmap, backup-start sync=none with a
                snapshot export; all at one instant T (the server applies
                the actions with no await in between)
    4 pull      per disk (at most --parallel at once, over all servers):
                incremental: the dirty set is the base bitmap, frozen at T,
                read from the LIVE export's qemu:dirty-bitmap context; each
                chunk it touches is read whole from the snapshot export
                (``--read whole``, default), or only its dirty ranges are,
                patched into the base snapshot's chunk from the repository
                (``--read dirty``); the other chunks keep the base's ids;
                full: what base:allocation says is data
    5 verify    every chunk the pull produced (``--verify full``, default)
                or a random sample (``sample``) is read again, whole, from
                the snapshot export and hashed: it must equal the manifest's
                digest; each new chunk is read back from the repository
                (``get_chunk`` checks its digest)
    6 record    save_snapshot (meta: bitmap, base, instant, group ...)
    7 finish    cancel + dismiss the job; remove the base bitmap

Failure anywhere before 6 records nothing and rolls the server back at once
when it can (dismiss the job; merge the new bitmap into the base and
re-enable it, or drop the new bitmap of a full); whatever it could not do
(agent killed, server gone) the next run repairs in steps 1-3.  A failure
after 6 (finishing) is only a note: the next run removes the superseded
bitmap and the leftover job.  So no half snapshot is ever recorded, and
every write since the last recorded snapshot is always in a bitmap the next
run reads: never a changed cluster missing from a later incremental.

Interruption (SIGTERM from systemd, SIGINT): the pulls are cancelled and
each started disk is rolled back as on a failure before the agent exits.

Concurrency: one agent per disk at a time (a second agent would reclaim the
first one's job as a leftover); the systemd timer's service cannot overlap
itself.  The repository lock is held shared for steps 4-6 of every server.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import re
import time
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ..blockdev.base import DIRTY_BITMAP_PREFIX
from ..errors import ConfigError, NBDBackupError
from ..ratelimit import Bucket
from .decide import DEFAULT_PREFIX, Decision, decide, own_name, snapshot_of

log = logging.getLogger("nbdbackup.agent")

#: Seconds to wait for a cancelled job to conclude.
JOB_END_TIMEOUT = 30.0
#: Largest single read while verifying.
VERIFY_READ = 1 << 20


@dataclass
class Server:
    """One server to back up.  ``name`` identifies it in snapshot metadata and
    retention groups (default: the control address); ``nbd`` is the base NBD
    URI (export name ignored, e.g. ``nbds://host:10809/?tls-certificates=DIR``)."""

    control: str
    nbd: str
    disks: list[str]
    tls_creds: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.control


@dataclass
class Options:
    """Agent policy.  ``template``: snapshot name template (``{disk}``,
    ``{server}``, ``{time}`` = %Y%m%dT%H%M%SZ, ``{date}``); ``verify``: full,
    sample or off; ``sample``: chunks checked per disk with ``sample``;
    ``io_timeout``: seconds an NBD request may take before the run fails;
    ``read``: what an incremental reads of a chunk the bitmap touches: "whole"
    (all of it, from the snapshot export) or "dirty" (its dirty ranges, the rest
    from the base snapshot in the repository: less from the server, more from
    the repository);
    ``limit``: a `ratelimit.Bucket` every disk's reads from the server are
    charged to (``--limit-rate``: one limit for the whole run), or None;
    ``progress(disk, done, total)``: called as chunks finish (or None)."""

    prefix: str = DEFAULT_PREFIX
    template: str = "{disk}.{time}"
    connections: int = 4
    workers: int | None = None  # None: `pull.default_window` (by the link's round trip)
    verify: str = "full"
    sample: int = 8
    full: bool = False
    granularity: int | None = None
    io_timeout: float = 120.0
    read: str = "whole"
    limit: Bucket | None = None
    progress: Callable[[str, int, int], None] | None = None


@dataclass
class DiskResult:
    """The report of one disk (`to_json` is the ``--json`` shape)."""

    server: str
    disk: str
    status: str = "failed"          # ok | failed
    kind: str | None = None         # full | incremental
    reason: str | None = None
    snapshot: str | None = None
    base: str | None = None
    bitmap: str | None = None       # the bitmap the next incremental counts from
    size: int = 0
    dirty_bytes: int | None = None  # incremental: bytes the frozen bitmap marks
    bytes_read: int = 0             # from the snapshot export by the pull
    server_bytes_read: int | None = None  # the snapshot export's own count (query-export-stats)
    bytes_processed: int = 0        # bytes of the chunks the pull produced
    bytes_stored: int = 0           # bytes of new chunks written to the repository
    compression: str | None = None  # how this run compressed its new chunks ("zstd:1", "none")
    new_chunks: int = 0
    chunks_worked: int = 0
    verify: dict = field(default_factory=dict)
    root: str | None = None
    instant: str | None = None
    group: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def dedup_ratio(self) -> float | None:
        return round(self.bytes_processed / self.bytes_stored, 3) if self.bytes_stored else None

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["dedup_ratio"] = self.dedup_ratio
        d["seconds"] = round(self.seconds, 3)
        return d


class DiskFailed(NBDBackupError):
    """One disk's backup failed (the message says where)."""


def _sanitize(text: str) -> str:
    out = re.sub(r"[^A-Za-z0-9._@+-]", "_", text).lstrip("._@+-")
    return out or "x"


def snapshot_name(template: str, server: Server, disk: str, now: datetime.datetime) -> str:
    """The template filled in; fields made safe for a snapshot name."""
    try:
        name = template.format(disk=_sanitize(disk), server=_sanitize(server.name),
                               time=now.strftime("%Y%m%dT%H%M%SZ"), date=now.strftime("%Y%m%d"))
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"bad --snapshot-name template {template!r}: {e} "
                          f"(fields: {{disk}} {{server}} {{time}} {{date}})") from None
    return _sanitize(name)[:100]


def _export_uri(base: str, export: str) -> str:
    """``base`` (an NBD URI) naming ``export`` instead (shown in metadata without secrets)."""
    from ..nbd.uri import parse_uri

    u = parse_uri(base)
    from dataclasses import replace

    return str(replace(u, export=export))


def _ranges(extents, size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for e in extents:
        if not (e.flags & 1) or e.length <= 0:
            continue
        s, end = max(0, e.offset), min(size, e.offset + e.length)
        if end <= s:
            continue
        if out and out[-1][0] + out[-1][1] >= s:
            o, n = out[-1]
            out[-1] = (o, max(o + n, end) - o)
        else:
            out.append((s, end - s))
    return out


class _Control:
    """A control connection with the few calls the agent makes; reconnects
    once per call if the connection dropped (so a rollback or finish after a
    network blip still happens)."""

    def __init__(self, client, server: Server) -> None:
        self.c = client
        self.server = server

    async def call(self, name: str, args: dict | None = None) -> Any:
        if self.c.closed:
            from ..control.cliutil import connect

            await self.c.close()
            self.c = await connect(self.server.control, self.server.tls_creds)
        return await self.c.execute(name, args)

    async def wait_concluded(self, job_id: str, timeout: float = JOB_END_TIMEOUT) -> dict | None:
        end = time.monotonic() + timeout
        while True:
            jobs = {j["id"]: j for j in await self.call("query-jobs")}
            j = jobs.get(job_id)
            if j is None or j["status"] in ("concluded", "null"):
                return j
            if time.monotonic() > end:
                raise DiskFailed(f"job {job_id} did not end within {timeout:.0f} s (status {j['status']})")
            await asyncio.sleep(0.05)

    async def end_job(self, job_id: str) -> None:
        """Cancel (if needed) and dismiss job ``job_id``; absent is fine."""
        jobs = {j["id"]: j for j in await self.call("query-jobs")}
        j = jobs.get(job_id)
        if j is None:
            return
        if j["status"] not in ("concluded", "null"):
            from ..control.schema import CommandError

            try:
                await self.call("job-cancel", {"id": job_id})
            except CommandError:
                pass  # concluded meanwhile
            j = await self.wait_concluded(job_id)
        if j is not None and j["status"] == "concluded":
            await self.call("job-dismiss", {"id": job_id})

    async def close(self) -> None:
        await self.c.close()


async def _connect(server: Server) -> _Control:
    from ..control.cliutil import connect

    return _Control(await connect(server.control, server.tls_creds), server)


@dataclass
class _DiskRun:
    """One disk between decision and record: ``decision``; ``snapshot``;
    ``own`` (bitmap = job id = snapshot export name); ``result``;
    ``started`` (the transaction committed: there is server state to undo);
    ``base_man`` (an incremental: the future of the base snapshot's manifest,
    loaded on a thread while the transaction runs, see `_warm_up`; None: load it
    in `_pull_disk`)."""

    disk: str
    size: int
    decision: Decision
    snapshot: str
    own: str
    result: DiskResult
    started: bool = False
    base_man: Any = None


async def backup_server(server: Server, store, repo, opts: Options, sem: asyncio.Semaphore,
                        now: datetime.datetime, taken: set[str] | None = None,
                        sink: list[DiskResult] | None = None) -> list[DiskResult]:
    """Back up every disk of ``server`` at one point in time (see the module doc).

    Never raises for a failure of the server or a disk: each `DiskResult`
    says ok or failed and why.  The caller holds the repository lock shared.
    ``taken``: snapshot names already chosen by this run (shared by the
    servers of one run, so two servers never pick the same name).
    ``sink``: gets every `DiskResult` at once, so that a caller whose run is
    cancelled (SIGTERM) can still tell which disks were recorded (status
    ``ok``: set right after step 6) and which were rolled back.
    """
    t0 = time.monotonic()
    results = {d: DiskResult(server.name, d) for d in server.disks}
    if sink is not None:
        sink.extend(results.values())

    def fail_all(msg: str) -> list[DiskResult]:
        for r in results.values():
            if r.status != "ok":
                r.error = r.error or msg
                r.seconds = time.monotonic() - t0
        return list(results.values())

    try:
        ctl = await _connect(server)
    except NBDBackupError as e:
        return fail_all(str(e))
    try:
        runs = await _prepare(server, ctl, repo, opts, now, results, set() if taken is None else taken)
        if runs is None:
            return fail_all("nothing started")
        group = os.urandom(16).hex()  # (as a uuid4's hex; the uuid module costs an import)
        actions: list[dict] = []
        for r in runs:
            actions += r.decision.actions(r.disk, r.own, opts.granularity)
            actions.append({"type": "backup-start", "data": {
                "export": r.disk, "job-id": r.own, "sync": "none", "target": "scratch:",
                "snapshot": r.own, "on-cbw-error": "break-snapshot"}})
        warm = asyncio.ensure_future(asyncio.to_thread(_warm_up, repo, runs))
        try:
            await ctl.call("transaction", {"actions": actions})
        except Exception as e:
            return fail_all(f"the backup transaction failed: {e}")
        finally:
            await warm  # (never raises: a base that fails to load fails its disk in _pull_disk)
        instant = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")
        for r in runs:
            r.started = True
            r.result.instant, r.result.group = instant, group
            r.result.notes += r.decision.notes

        async def one(r: _DiskRun) -> None:
            t = time.monotonic()
            try:
                async with sem:
                    await _pull_disk(server, ctl, store, repo, opts, r)
                r.result.status = "ok"
            except Exception as e:
                r.result.error = _why(e)
                log.warning("%s: backup of %s failed: %s", server.name, r.disk, r.result.error)
                await _rollback(ctl, r)
            except asyncio.CancelledError:  # SIGTERM / SIGINT: roll back, then stop
                r.result.error = "interrupted"
                await asyncio.shield(_rollback(ctl, r))
                raise
            else:
                await _finish(ctl, r)
            finally:
                r.result.seconds = time.monotonic() - t

        await asyncio.gather(*(one(r) for r in runs))
        return list(results.values())
    except Exception as e:
        return fail_all(_why(e))
    finally:
        await ctl.close()


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename + ': ' if e.filename else ''}{e.strerror}"
    return str(e) or type(e).__name__


async def _prepare(server: Server, ctl: _Control, repo, opts: Options, now: datetime.datetime,
                   results: dict[str, DiskResult], taken: set[str]) -> list[_DiskRun] | None:
    """Steps 1-2: reclaim leftovers, check the disks, decide, name the snapshots."""
    disks = set(server.disks)
    for j in await ctl.call("query-jobs"):
        snap = snapshot_of(opts.prefix, str(j.get("id", "")))
        dev = j.get("device") or j.get("export")
        if snap is None or (dev is not None and dev not in disks):
            continue
        await ctl.end_job(j["id"])
        who = dev if dev in results else None
        for r in ([results[who]] if who else results.values()):
            r.notes.append(f"reclaimed job {j['id']} (status {j['status']}) left by an interrupted run")
    exports = {e["name"]: e for e in await ctl.call("query-block-exports")}
    runs: list[_DiskRun] = []
    for disk in server.disks:
        res = results[disk]
        exp = exports.get(disk)
        if exp is None:
            res.error = f"the server has no export {disk!r}"
            continue
        if exp.get("read-only"):
            res.error = f"export {disk!r} is read-only: it has no dirty bitmaps"
            continue
        size = int(exp["size"])
        res.size = size
        bitmaps = await ctl.call("query-bitmaps", {"export": disk})

        def info(name: str) -> dict | None:
            try:
                return repo.snapshot_info(name)  # one ranged GET; a HEAD only when that fails
            except ConfigError as e:
                if repo.has_snapshot(name):
                    # Damaged: its bitmap is no base (decide: an orphan, merged or a full, and
                    # says why).  Raising here failed every disk of the server, --full
                    # included, run after run (docs/hunt5.md).
                    return {"damaged": str(e)}
                return None

        dec = decide(bitmaps, size, opts.prefix, info, force_full=opts.full, server=server.name, disk=disk)
        base_name = snapshot_name(opts.template, server, disk, now)
        existing = {b["name"] for b in bitmaps} | set(exports)
        name, n = base_name, 0
        # (no await from here to taken.add: servers running at once see each other's names)
        while name in taken or own_name(opts.prefix, name) in existing or repo.has_snapshot(name):
            n += 1
            name = f"{base_name}-{n}"
        taken.add(name)
        res.kind, res.reason, res.base = dec.kind, dec.reason, dec.base
        res.snapshot, res.bitmap = name, own_name(opts.prefix, name)
        runs.append(_DiskRun(disk, size, dec, name, own_name(opts.prefix, name), res))
    return runs or None


def _warm_up(repo, runs: list[_DiskRun]) -> None:
    """On a thread while the backup transaction is in flight (the event loop only waits
    for the server's answer then, ~4-13 ms of bitmap and export work): import what the
    pull needs (the NBD client, the pull, a local store's write-back helpers: ~6-8 ms of
    CPU) and load each incremental's base manifest (decrypted and decompressed with the
    GIL released).  Nothing here talks to the server or writes anything: a failed
    transaction just drops it.  A base that cannot be loaded is kept as its exception and
    raised by `_pull_disk` (the disk fails and is rolled back, as before)."""
    from concurrent.futures import Future

    from ..blockdev import nbd  # noqa: F401
    from . import pull  # noqa: F401

    if not getattr(repo.store, "remote", False):
        from ..blockdev import writeback  # noqa: F401
    for r in runs:
        if r.decision.kind == "incremental" and r.decision.base is not None:
            r.base_man = f = Future()
            try:
                f.set_result(repo.load_snapshot(r.decision.base))
            except BaseException as e:  # noqa: BLE001 - handed to _pull_disk
                f.set_exception(e)


_CPU_POOL = None


def _cpu_pool():
    """The process's pool for chunk jobs that are CPU work (hash, compress, encrypt, write
    to the page cache): one thread per CPU this process may use plus one, shared by the disks pulled at once,
    never shut down (idle threads; joined at exit).  asyncio's default pool has cores + 4
    threads; on 2 cores, 6 threads compressing at once cost ~3% more CPU than 3 in
    interleaved runs (switches, GIL hand-overs, colder caches)."""
    global _CPU_POOL
    if _CPU_POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        from .. import cgroup

        # The CPUs this process may use (affinity, a container's quota: ~0.8 ms), not the host's.
        _CPU_POOL = ThreadPoolExecutor(cgroup.cpu_count(cgroup.read_limits()) + 1, thread_name_prefix="nbdbackup-chunk")
    return _CPU_POOL


class _RepoSink:
    """The agent's pull sink: stores each worked chunk in the repository.

    Called by `pull` (``sink_ids=True``) as ``await sink(i, None, chunk)``; returns
    the chunk's id.  Hashing, compressing, encrypting and writing a chunk are one
    job on a worker thread (`store`): one hand-off to a thread and back per chunk
    instead of two (fewer wake-ups and GIL hand-overs: ~5% of an incremental's CPU).

    ``pool``: the executor of the jobs (`_cpu_pool` for a local store: the jobs are
    CPU work); None: asyncio's default pool (a remote store, whose jobs wait on the
    network).

    Fields (shared by the worker threads; each update is one atomic dict/set
    operation under the GIL, but ``res.bytes_processed``, under ``_count_lock``):
    ``worked`` (indexes of the chunks handed in);
    ``new`` (id -> length of the chunks this run stored as new); ``seen`` (id ->
    the first chunk of this run that had it: a second chunk with the same bytes is
    not stored again).  A chunk whose id equals the base snapshot's chunk at the
    same index (dirty, but the same bytes) is not stored.
    """

    def __init__(self, repo, base_man, res: DiskResult, pool=None) -> None:
        self.repo, self.base_man, self.res, self.pool = repo, base_man, res, pool
        self.worked: set[int] = set()
        self.new: dict[bytes, int] = {}
        self.seen: dict[bytes, int] = {}
        #: Guards ``res.bytes_processed`` (a read-modify-write) when `submit` runs on threads.
        self._count_lock = threading.Lock()

    def store(self, i: int, data) -> tuple[bytes, bool]:
        """On a worker thread: chunk ``i``'s id, and whether this call stored it as new."""
        d = self.repo.chunk_id(data)
        if self.base_man is not None and self.base_man.chunks[i] == d:  # dirty, but the same bytes
            return d, False
        if self.seen.setdefault(d, i) != i:  # (one atomic step) another chunk of this run has these bytes
            return d, False
        # An incremental's changed chunks are new but for rare dedup hits: no existence probe;
        # they are compressed at the repository's incremental level (Compression.level).
        incremental = self.base_man is not None
        return d, self.repo.put_chunk(d, data, probe=not incremental, incremental=incremental)

    def submit(self, i: int, data: memoryview):
        """From any thread (the pull's receiving threads): chunk ``i``'s job on ``pool``, a
        `concurrent.futures.Future` of its id; None without a pool of our own (a remote
        store's jobs go through `__call__` on the event loop, as before)."""
        if self.pool is None:
            return None
        self.worked.add(i)
        with self._count_lock:
            self.res.bytes_processed += len(data)
        return self.pool.submit(self._store_and_count, i, data)

    def _store_and_count(self, i: int, data) -> bytes:
        d, is_new = self.store(i, data)
        if is_new:
            self.new[d] = len(data)
        return d

    async def __call__(self, i: int, _: None, data: memoryview) -> bytes:
        self.worked.add(i)
        with self._count_lock:
            self.res.bytes_processed += len(data)
        if self.pool is None:
            d, is_new = await asyncio.to_thread(self.store, i, data)
        else:
            d, is_new = await asyncio.get_running_loop().run_in_executor(self.pool, self.store, i, data)
        if is_new:
            self.new[d] = len(data)
        return d


async def _pull_disk(server: Server, ctl: _Control, store, repo, opts: Options, r: _DiskRun) -> None:
    """Steps 4-6 for one disk: pull, verify, record."""
    from ..blockdev.nbd import NBDDev
    from .pull import pull
    from .repo import BaseSnapshot, CorruptChunk, SnapshotExists

    res, dec = r.result, r.decision
    snap_uri = _export_uri(server.nbd, r.own)
    dirty: list[tuple[int, int]] | None = None
    base_man = None
    if dec.kind == "incremental":
        assert dec.base is not None and dec.base_bitmap is not None
        base_man = r.base_man.result() if r.base_man is not None else repo.load_snapshot(dec.base)

        async def dirty_set() -> list[tuple[int, int]]:
            """The frozen base bitmap's dirty ranges, from the live export."""
            live = await NBDDev.open(server.nbd, export=r.disk, read_only=True, connections=1,
                                     request_timeout=opts.io_timeout)
            try:
                ctx = DIRTY_BITMAP_PREFIX + dec.base_bitmap
                if ctx not in live.meta_contexts():
                    raise DiskFailed(f"the live export {r.disk!r} does not offer {ctx}")
                return _ranges(await live.extents(0, r.size, ctx), r.size)
            finally:
                await live.close()

        # Both after the transaction (instant T): the snapshot export's connections are opened
        # while the live export answers for the dirty set.
        opening = asyncio.ensure_future(NBDDev.open(server.nbd, export=r.own, read_only=True,
                                                    connections=opts.connections,
                                                    request_timeout=opts.io_timeout))
        try:
            dirty = await dirty_set()
        except BaseException:
            await _discard(opening)
            raise
        src = await opening
        res.dirty_bytes = sum(n for _, n in dirty)
    else:
        src = await NBDDev.open(server.nbd, export=r.own, read_only=True, connections=opts.connections,
                                request_timeout=opts.io_timeout)
    try:
        if src.size != r.size:
            raise DiskFailed(f"snapshot export {r.own} is {src.size} bytes, the disk {r.size}")
        remote = getattr(repo.store, "remote", False)
        sink = _RepoSink(repo, base_man, res, pool=None if remote else _cpu_pool())
        res.compression = repo.compression.level_name(base_man is not None)

        def progress(done: int, total: int) -> None:
            if opts.progress is not None:
                opts.progress(r.disk, done, total)

        whole = opts.read == "whole"
        dst = BaseSnapshot(repo, base_man) if base_man is not None and not whole else None
        try:
            man, stats = await pull(src, dst, dirty=dirty, read_whole=whole and dirty is not None,
                                    chunk_size=repo.chunk_size, workers=opts.workers,
                                    base=base_man, sink=sink, progress=progress,
                                    chunk_id=repo.chunk_id, zero_id=repo.zero_id, sink_ids=True,
                                    limit=opts.limit)
        except CorruptChunk as e:  # only the base snapshot's chunks are read from the repository
            raise DiskFailed(f"the base snapshot {dec.base} is damaged ({e.strerror}): "
                             f"run once with --full") from e
        res.bytes_read, res.chunks_worked = stats.bytes_read, stats.chunks_worked
        res.new_chunks, res.bytes_stored = len(sink.new), sum(sink.new.values())
        res.server_bytes_read = await _export_rd_bytes(ctl, r.own)
        res.verify = await _verify(src, repo, man, sorted(sink.worked), sink.new, opts, stats.workers)
    finally:
        await src.close()
    res.root = man.root.hex()
    meta = {"agent": 1, "server": server.name, "disk": r.disk, "kind": dec.kind, "reason": dec.reason,
            "bitmap": r.own, "base": dec.base, "base_bitmap": dec.base_bitmap, "instant": res.instant,
            "group": res.group, "dirty_bytes": res.dirty_bytes, "bytes_read": res.bytes_read,
            "verify": res.verify.get("mode")}
    try:  # another agent took the name meanwhile: never overwrite (a conditional write)
        repo.save_snapshot(r.snapshot, man, source=snap_uri, parent=dec.base, meta=meta, new_only=True)
    except SnapshotExists:
        raise DiskFailed(f"snapshot {r.snapshot} appeared in the repository during the backup") from None


async def _discard(opening: asyncio.Future) -> None:
    """Cancel the device being opened by ``opening``, or close it if it opened."""
    if not opening.done():
        opening.cancel()
    try:
        dev = await opening
    except BaseException:  # noqa: BLE001 - cancelled or failed: nothing to close
        return
    await dev.close()


async def _export_rd_bytes(ctl: _Control, export: str) -> int | None:
    try:
        for e in await ctl.call("query-export-stats"):
            if e.get("export") == export:
                return int(e["stats"]["rd_bytes"])
    except Exception:  # a statistic only
        return None
    return None


async def _verify(src, repo, man, worked: list[int], new: dict[bytes, int], opts: Options, workers: int) -> dict:
    """Step 5: re-read chunks whole from the snapshot export; read new chunks back."""
    if opts.verify == "off":
        return {"mode": "off"}
    pick = worked if opts.verify == "full" else sorted(random.sample(worked, min(opts.sample, len(worked))))
    bad: list[int] = []
    read = 0
    lim = asyncio.Semaphore(max(1, workers))  # the pull's window

    async def check(i: int) -> None:
        nonlocal read
        off, n = man.chunk_range(i)
        buf = bytearray(n)
        mv = memoryview(buf)
        async with lim:
            if opts.limit is not None:
                await opts.limit.take_async(n)
            await asyncio.gather(*(src.pread(mv[p:p + min(VERIFY_READ, n - p)], off + p)
                                   for p in range(0, n, VERIFY_READ)))
            read += n
            if await asyncio.to_thread(repo.chunk_id, buf) != man.chunks[i]:
                bad.append(i)
                return
            d = man.chunks[i]
            if d in new:
                await asyncio.to_thread(repo.get_chunk, d, n)  # CorruptChunk if the store lost it

    await asyncio.gather(*(check(i) for i in pick))
    if bad:
        ranges = ", ".join(f"{man.chunk_range(i)}" for i in sorted(bad)[:5])
        raise DiskFailed(f"verification failed: {len(bad)} chunk(s) differ from the snapshot export: {ranges}")
    return {"mode": opts.verify, "chunks_checked": len(pick), "of": len(worked), "bytes_read": read, "ok": True}


async def _rollback(ctl: _Control, r: _DiskRun) -> None:
    """A disk failed before its snapshot was recorded: undo its server state now
    (whatever fails here the next run repairs)."""
    res, dec = r.result, r.decision
    if not r.started:
        return
    try:
        await ctl.end_job(r.own)
        res.notes.append(f"dismissed job {r.own}")
    except Exception as e:
        res.notes.append(f"could not dismiss job {r.own} ({_why(e)}): the next run will")
        return
    try:
        if dec.kind == "incremental":
            assert dec.base_bitmap is not None
            await ctl.call("transaction", {"actions": [
                {"type": "block-dirty-bitmap-merge",
                 "data": {"export": r.disk, "target": dec.base_bitmap, "bitmaps": [r.own]}},
                {"type": "block-dirty-bitmap-enable", "data": {"export": r.disk, "name": dec.base_bitmap}},
                {"type": "block-dirty-bitmap-remove", "data": {"export": r.disk, "name": r.own}}]})
            res.notes.append(f"merged {r.own} back into {dec.base_bitmap} (the next run counts from {dec.base})")
        else:
            await ctl.call("block-dirty-bitmap-remove", {"export": r.disk, "name": r.own})
            res.notes.append(f"removed {r.own} (the next run is full)")
    except Exception as e:
        res.notes.append(f"could not roll the bitmaps back ({_why(e)}): the next run will")


async def _finish(ctl: _Control, r: _DiskRun) -> None:
    """Step 7 (the snapshot is recorded): failures here are notes, the next run tidies up."""
    res, dec = r.result, r.decision
    try:
        await ctl.end_job(r.own)
    except Exception as e:
        res.notes.append(f"could not dismiss job {r.own} ({_why(e)}): the next run will")
    if dec.kind == "incremental":
        try:
            await ctl.call("block-dirty-bitmap-remove", {"export": r.disk, "name": dec.base_bitmap})
        except Exception as e:
            res.notes.append(f"could not remove {dec.base_bitmap} ({_why(e)}): the next run will")


async def run(servers: list[Server], store, repo, opts: Options, parallel: int = 2,
              sink: list[DiskResult] | None = None) -> list[DiskResult]:
    """Back up every server (concurrently; at most ``parallel`` disks pulled at once).
    ``sink``: see `backup_server`."""
    if opts.verify not in ("full", "sample", "off"):
        raise ConfigError(f"--verify {opts.verify!r}: full, sample or off")
    if opts.read not in ("whole", "dirty"):
        raise ConfigError(f"--read {opts.read!r}: whole or dirty")
    now = datetime.datetime.now(datetime.timezone.utc)
    sem = asyncio.Semaphore(max(1, parallel))
    taken: set[str] = set()
    groups = await asyncio.gather(*(backup_server(s, store, repo, opts, sem, now, taken, sink) for s in servers))
    return [r for g in groups for r in g]


def apply_retention(store, repo, policy, results: list[DiskResult], grace: float | None = None) -> dict:
    """Prune each backed-up disk's agent snapshots by ``policy`` (groups: server
    + disk from the snapshots' metadata), then gc.  Takes the exclusive lock."""
    from . import retention

    wanted = {(r.server, r.disk) for r in results if r.status == "ok"}
    out: dict = {"policy": policy.to_json(), "removed": [], "gc": None}
    with store.lock(exclusive=True):
        groups: dict[tuple[str, str], list] = {}
        for name, info in repo.snapshot_infos(repo.snapshots()):
            meta = info.get("meta") or {}
            key = (meta.get("server"), meta.get("disk"))
            if meta.get("agent") and key in wanted:
                groups.setdefault(key, []).append((name, repo.snapshot_time(name, info)[0]))
        now = datetime.datetime.now(datetime.timezone.utc)
        for key, snaps in sorted(groups.items()):
            doomed = retention.removed(retention.plan(snaps, policy, now=now))
            repo.delete_snapshots(doomed)
            out["removed"] += doomed
        freed, in_use = repo.gc(grace)
        out["gc"] = {"removed": freed, "kept": in_use}
    return out
