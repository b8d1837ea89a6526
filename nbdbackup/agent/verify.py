"""Parallel (and sampled) verification of a repository's snapshots.

Role: ``nbdbackup repo verify``.  The snapshots' manifests are loaded one
at a time (read again only to name the chunks of damaged ones); the
distinct stored chunks they reference (zero chunks are never stored) are
the work; each is read and checked with `Repository.get_chunk` (through
the public API only, so the check is whatever the repository's format
makes it: a digest, an authentication tag) on ``workers`` threads, since
the store's reads block.  Every damaged chunk is then named in every
snapshot that uses it, with the chunk's byte range ``(offset, length)``; a
snapshot object that cannot be read is a problem of its own (index -1).

Sampling (``--sample PERCENT``): a uniform random subset of the distinct
chunks, ``ceil(PERCENT% of them)`` (at least one when there are any),
drawn by `sample_ids` from ``random.Random(seed)`` over the ids in sorted
order, so a seed names the sample exactly: the same repository and seed
check the same chunks.  Without ``--seed`` one is drawn and reported.

Invariants: each distinct chunk is read at most once per run; at most
``workers`` chunks are in memory at once (a check keeps no data); a chunk
is reported damaged only for `CorruptChunk` (missing, or fails its
check); any other error (the store unreachable) stops the run.

Repair (``--repair``): each damaged chunk (not a missing one) is moved aside to
``damaged/<id>`` (`Repository.quarantine`, after a second read), so that the next
pull of its data stores it again instead of finding the damaged object by its id;
the report's problems are this run's findings, ``moved`` the ids moved.
"""

from __future__ import annotations

import concurrent.futures
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import ConfigError


@dataclass(frozen=True)
class Problem:
    """Chunk ``index`` of ``snapshot``, at ``(offset, length)`` in its disk, is bad for ``reason``;
    index -1 (offset and length None): the snapshot itself cannot be read."""

    snapshot: str
    index: int
    offset: int | None
    length: int | None
    reason: str

    def to_json(self) -> dict:
        return {"snapshot": self.snapshot, "chunk": self.index, "offset": self.offset, "length": self.length,
                "reason": self.reason}


@dataclass
class VerifyReport:
    """The outcome of `verify`: what was checked and what is bad."""

    snapshots: list[str]
    chunks_referenced: int = 0
    chunks_checked: int = 0
    bytes_checked: int = 0
    sample: float | None = None
    seed: int | None = None
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    #: With ``repair``: ids (hex) of the damaged chunks moved aside (`Repository.quarantine`).
    moved: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_snapshots(self) -> list[str]:
        return sorted({p.snapshot for p in self.problems})

    def to_json(self) -> dict:
        return {"ok": self.ok, "snapshots": self.snapshots, "problems": [p.to_json() for p in self.problems],
                "damaged_snapshots": self.damaged_snapshots, "chunks_referenced": self.chunks_referenced,
                "chunks_checked": self.chunks_checked, "bytes_checked": self.bytes_checked,
                "sample": self.sample, "seed": self.seed, "seconds": round(self.seconds, 3), "moved": self.moved}


def sample_ids(ids, percent: float | None, seed: int | None) -> list[bytes]:
    """The ids to check: all (``percent`` None or >= 100), else a seeded
    uniform sample of ``ceil(percent / 100 * len(ids))`` of them, at least one
    (see the module doc); returned sorted."""
    ordered = sorted(ids)
    if percent is None or percent >= 100 or not ordered:
        return ordered
    if percent <= 0:
        raise ValueError("sample percentage must be > 0")
    k = max(1, math.ceil(len(ordered) * percent / 100))
    return sorted(random.Random(seed).sample(ordered, k))


def verify(repo, names: Sequence[str], *, sample: float | None = None, seed: int | None = None,
           workers: int = 8, progress: Callable[[int, int], None] | None = None,
           repair: bool = False) -> VerifyReport:
    """Check the chunks of snapshots ``names`` of ``repo`` (see the module doc).
    ``repair``: move each damaged (not missing) chunk aside, `Repository.quarantine`."""
    from .repo import CorruptChunk

    t0 = time.monotonic()
    if sample is not None and sample < 100 and seed is None:
        seed = random.SystemRandom().randrange(1 << 32)
    report = VerifyReport(list(names), sample=sample, seed=seed if sample is not None and sample < 100 else None)
    # One snapshot's ids in memory at a time (`Repository.chunk_ids`: holes skipped by numpy); all
    # manifests at once were ~80 MB per snapshot of a 1 TiB disk (1000 snapshots: ~80 GB), and a
    # Python loop per chunk 0.7 s each.  Manifests are read again only to name damaged chunks.
    loaded: list[str] = []
    lengths: dict[bytes, int] = {}
    for name in names:
        try:
            lengths.update(repo.chunk_ids(name))
        except ConfigError as e:  # damaged, missing or undecryptable snapshot object
            report.problems.append(Problem(name, -1, None, None, str(e)))
            continue
        loaded.append(name)
    report.chunks_referenced = len(lengths)
    todo = sample_ids(lengths, sample, seed)
    total = sum(lengths[d] for d in todo)

    def check(d: bytes) -> str | None:
        try:
            repo.get_chunk(d, lengths[d])
        except CorruptChunk as e:
            return e.strerror.split(": ", 1)[-1] if e.strerror else str(e)
        return None

    bad: dict[bytes, str] = {}
    done = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="verify") as pool:
        pending: dict[concurrent.futures.Future, bytes] = {}
        it = iter(todo)
        try:
            while True:
                while len(pending) < 2 * max(1, workers):
                    d = next(it, None)
                    if d is None:
                        break
                    pending[pool.submit(check, d)] = d
                if not pending:
                    break
                finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for f in finished:
                    d = pending.pop(f)
                    why = f.result()  # other errors propagate
                    if why is not None:
                        bad[d] = why
                    done += lengths[d]
                    report.chunks_checked += 1
                    if progress is not None:
                        progress(done, total)
        finally:
            for f in pending:
                f.cancel()
    report.bytes_checked = done
    if repair:
        for d in sorted(bad):
            if bad[d] != "missing" and repo.quarantine(d, lengths[d]):
                report.moved.append(d.hex())
    for name in loaded if bad else ():
        try:
            man = repo.load_snapshot(name)
        except ConfigError as e:
            report.problems.append(Problem(name, -1, None, None, str(e)))
            continue
        for i, d in enumerate(man.chunks):
            if d in bad:
                off, n = man.chunk_range(i)
                report.problems.append(Problem(name, i, off, n, bad[d]))
    report.seconds = time.monotonic() - t0
    return report
