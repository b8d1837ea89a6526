"""A seeded chaos soak of the whole system (hunt 16): live writes, backups, pulls and kills at random.

Role: one driver that runs, in a random order fixed by ``--seed`` (what a kill
hits still depends on timing), everything a host does to a disk at once -- a
live writer (libnbd), QMP backups with snapshot exports read by nbdcopy /
qemu-img / ``pull --repo``, ``nbdbackup agent backup`` into an encrypted
repository, ``repo verify/prune/gc`` and ``restore`` -- and faults: ``kill -9``
and SIGTERM of ``serve`` (restarted on the same ``--state-dir``; after some
kills a forged power loss on the bitmap files), ``kill -9`` of its worker
processes, ``kill -9`` / SIGTERM of the agent mid-pull, QMP jobs cancelled, a
client that stops reading.  After every step it checks the invariants against
a model:

1. a snapshot export's content == the model's disk at the backup's start
   (``snap`` checks; also a ``sync full`` target, and a ``sync incremental``
   target on every block written since the previous backup of its bitmap);
2. after a restart the live disk holds, per 4 KiB block, the last FLUSHed/FUA
   value or a value written after it -- nothing else (``crash`` checks);
3. an incremental contains every block written since the last one: the QMP
   bitmap's target (above) and every agent snapshot restored (5); a bitmap left
   inconsistent (forged power loss) must refuse incrementals and make the
   agent's next run a full one;
5. every repository snapshot restores (``nbdbackup restore``) to exactly the
   model's disk at its backup start; ``repo verify`` is clean; after ``prune``
   and ``gc`` every kept snapshot still restores.

The model (`Model`) is deliberately dumb: one digest per 4 KiB block of what the
last acknowledged request left there (``cur``), and per block written since the
last FLUSH the set of digests a crash may leave (``maybe``).  Every write is
4 KiB-aligned and synchronous (one request in flight; a kill's timer thread
may fire mid-request, and that request's blocks may then be old or new) --
except the batches of dims ``aio`` (`Model.settle`, below).
TRIM: the range is read back at once; each block must be old or zeros.
A request never answered goes into a bitmap's must-have set only if the disk
read after the restart shows it landed (``tentative``).

The run ends with a wind-down that makes every run cover the worker path: 2 s
without a job (the writer's connection goes back to a worker), writes, an agent
run; again (this second run must be incremental); again with a QMP incremental;
then ``repo verify`` and a restore of every snapshot left.

Hunt 17's dimensions (``--dims``, each on or off per run; ``random`` draws them
from the seed), with the same checks:

- ``aio``: half the writer's requests go in pipelined batches (libnbd aio, 2-32
  in flight, half of them inside a window of 1-16 blocks so ranges overlap,
  FLUSH and FUA among them); `Model.settle` accepts any order of the requests
  in flight together (old/new per request), credits a FLUSH only with what was
  answered before it was sent, and reads every touched block back;
- ``modes``: QMP ``sync top`` and ``sync bitmap`` (bitmap-mode on-success /
  never / always) and ``full``/``top`` with a bitmap; after every job that used
  the bitmap it is read back (``qemu:dirty-bitmap:soak`` on the live export):
  it marks every block the model says it must; cleared after a success with
  on-success/always; after a failed ``always`` job every block it forgot must
  be in the target with the snapshot's content;
- ``disks2``: a second export ``disk2`` with its own writer and model; the
  agent backs up both disks in one run (one transaction: one instant); crash
  checks read both;
- ``tls``: ``serve --tls-creds --tls on``; the writers, the snapshot readers
  (nbdcopy, qemu-img, ``pull``), the bitmap reader and the agent over TLS
  (X.509); the stalled client stays plain.  (TLS connections are never handed
  to worker processes: docs/workers.md.)
- ``s3``: the repository on a Ceph RGW started for the run
  (tests/interop/ceph_rgw.py); a prune/gc refused "busy" is allowed only
  within a lease's life after an agent's kill -9 (`Soak._lease_busy`).

Usage: ``python bench/soak.py --seed 1 --steps 200 [--size 16M] [--dims random] [--keep]``;
prints one JSON line of counts; exit 1 with the seed, step and the failed check
on the first violation (the log of steps is in the work directory, kept then).
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402  (bench/common.py)
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
BS = 4096
M = 1 << 20
ZERO = hashlib.blake2b(bytes(BS), digest_size=16).digest()
PASS = "soak-passphrase"
PREFIX = "nbdbackup-agent"


class Violation(AssertionError):
    pass


def digests(data: bytes | bytearray | memoryview) -> list[bytes]:
    mv = memoryview(data)
    return [hashlib.blake2b(mv[i:i + BS], digest_size=16).digest() for i in range(0, len(mv), BS)]


def file_digests(path: str | Path) -> list[bytes]:
    return digests(Path(path).read_bytes())


class Model:
    """What the disk must hold.

    - ``cur[b]``: digest of block b as the last acknowledged request left it;
    - ``maybe[b]``: for blocks written since the last FLUSH, every digest a crash
      may leave there (the last durable one and each written since); absent =
      only ``cur[b]``;
    - ``since[name]``: blocks written (or attempted) since bitmap ``name``'s
      last successful backup -- what its next incremental must hold.
    """

    def __init__(self, nblocks: int) -> None:
        self.cur = [ZERO] * nblocks
        self.maybe: dict[int, set[bytes]] = {}
        self.since: dict[str, set[int]] = {}
        #: ``tentative[name]``: blocks of requests never answered -- added to ``since[name]`` by
        #: `crash_check` if the disk changed there (a bitmap may miss a write that never happened)
        self.tentative: dict[str, set[int]] = {}
        #: blocks whose last request's result is unknown (never answered, or a TRIM not read
        #: back) since the last `crash_check` (for its counts)
        self.unanswered: set[int] = set()
        #: (diagnostics) acknowledged unflushed values a crash lost: (block, found, history)
        self.lost_log: list = []
        #: blocks any request was sent to since `touched` was last cleared (a QMP job's start):
        #: a bitmap cleared by a successful backup must be clean everywhere else
        self.touched: set[int] = set()
        #: (diagnostics only) the last events per block: "w"/"W" (FUA) + digest prefix, "a" attempted, "F" flush
        self.hist: dict[int, list[str]] = {}

    def _h(self, b: int, ev: str) -> None:
        h = self.hist.setdefault(b, [])
        h.append(ev)
        del h[:-12]

    def wrote(self, b: int, d: bytes, durable: bool) -> None:
        for s in self.since.values():
            s.add(b)
        self.touched.add(b)
        if durable:
            self.maybe.pop(b, None)
        else:
            self.maybe.setdefault(b, {self.cur[b]}).add(d)
        self.cur[b] = d
        self._h(b, ("W" if durable else "w") + d.hex()[:6])

    def attempted(self, b: int, d: bytes, acked: bool = False) -> None:
        """A request whose reply never came (the server died) -- or, ``acked``, a TRIM whose
        result could not be read back: old or new after a crash.  Not acknowledged, it must be
        in a bitmap only if it reached the disk (`crash_check` decides, from what it finds)."""
        for name, s in self.since.items():
            (s if acked else self.tentative.setdefault(name, set())).add(b)
        self.touched.add(b)
        self.unanswered.add(b)  # (an acknowledged TRIM read back as neither: its result is unknown too)
        self.maybe.setdefault(b, {self.cur[b]}).add(d)
        self._h(b, "a" + d.hex()[:6])

    def flushed(self) -> None:
        self.maybe.clear()

    def settle(self, reqs: list[tuple[int, list, bool]], seen: dict[int, bytes] | None, flushed: bool) -> None:
        """A batch of requests that were in flight together (the pipelined writer).

        ``reqs``: ``(first block, digests, acknowledged)`` per WRITE / WRITE_ZEROES / TRIM, a
        TRIM's digests being None; ``seen``: the touched blocks read back once every request
        was answered (None: the connection died -- `crash_check` settles them later);
        ``flushed``: a FLUSH sent in the batch was acknowledged.  The rules:

        - the server may run requests in flight together in any order, so a block holds the
          value of ANY request of the batch that touches it; the value it had before the
          batch only if a TRIM (old or zeroes) or a request that was not acknowledged (old
          or new) touches it;
        - a crash may leave every one of those, and every value it could leave before (FUA
          is not credited in a batch: a FUA write's value is durable when it is answered,
          but a later request of the batch may overwrite it with a value that is not);
        - a FLUSH in the batch makes durable what was acknowledged before it was sent: every
          block the batch does not touch (the batch was sent after the last one was
          settled); the batch's own blocks keep their crash sets;
        - acknowledged requests go into every bitmap's must-have set; unanswered ones are
          ``tentative`` (as `attempted`).
        """
        cand: dict[int, set[bytes]] = {}
        old_too: set[int] = set()
        for b0, ds, acked in reqs:
            for i, d in enumerate(ds):
                b = b0 + i
                cand.setdefault(b, set()).add(ZERO if d is None else d)
                if d is None or not acked:
                    old_too.add(b)
                if acked:
                    for s in self.since.values():
                        s.add(b)
                else:
                    for name in self.since:
                        self.tentative.setdefault(name, set()).add(b)
                    self.unanswered.add(b)
                self.touched.add(b)
                self._h(b, ("t" if d is None else ("b" if acked else "a") + d.hex()[:6]))
        if flushed:
            for b in [b for b in self.maybe if b not in cand]:
                del self.maybe[b]
        if seen is None:
            self.unanswered |= cand.keys()  # (results unknown until `crash_check` reads them)
        for b, c in cand.items():
            allowed = c | ({self.cur[b]} if b in old_too else set())
            self.maybe[b] = self.maybe.get(b, {self.cur[b]}) | allowed
            if seen is not None:
                if seen[b] not in allowed:
                    raise Violation(f"pipelined batch: block {b} ({b * BS:#x}) reads {seen[b].hex()[:6]}"
                                    f"{' (zeroes)' if seen[b] == ZERO else ''}, no request of the batch wrote it "
                                    f"(allowed {sorted(x.hex()[:6] for x in allowed)}; history {self.hist.get(b)})")
                self.cur[b] = seen[b]

    def crash_check(self, seen: list[bytes]) -> tuple[int, int]:
        """Check (2) against the disk read after a restart; adopt it.  Returns how many
        blocks differ from the last acknowledged value: (an unanswered request's value
        landed, an acknowledged value lost -- only an unflushed one may be)."""
        landed = lost = 0
        for name, blocks in self.tentative.items():
            if name in self.since:
                self.since[name] |= {b for b in blocks if seen[b] != self.cur[b]}
        self.tentative.clear()
        for b, d in enumerate(seen):
            ok = self.maybe.get(b, {self.cur[b]})
            if d not in ok:
                raise Violation(f"crash: block {b} ({b * BS:#x}) holds {d.hex()[:6]}"
                                f"{' (zeroes)' if d == ZERO else ''}, never written there since its last FLUSH "
                                f"(allowed {[x.hex()[:6] for x in ok]}; history {self.hist.get(b)})")
            if d != self.cur[b]:
                if b in self.unanswered:
                    landed += 1
                else:
                    lost += 1
                    self.lost_log.append((b, d.hex()[:6], list(self.hist.get(b, []))))
            self.cur[b] = d
        self.maybe.clear()
        self.unanswered.clear()
        return landed, lost


def compare(what: str, want: list[bytes], got: list[bytes], blocks=None, hist: dict | None = None) -> None:
    """Block digests ``got`` equal ``want`` (on ``blocks`` only, if given); ``hist``: the
    model's per-block history, for the message."""
    if len(got) < len(want) and blocks is None:
        raise Violation(f"{what}: {len(got)} blocks, want {len(want)}")
    bad = [b for b in (range(len(want)) if blocks is None else sorted(blocks)) if got[b] != want[b]]
    if bad:
        detail = [(hex(b * BS), "want", want[b].hex()[:6], "got", "zeroes" if got[b] == ZERO else got[b].hex()[:6],
                   (hist or {}).get(b)) for b in bad[:4]]
        raise Violation(f"{what}: {len(bad)} blocks differ, first {bad[:8]}: {detail}")


class Server:
    """``nbdbackup serve`` on a Unix socket with a control socket and a state dir
    (worker processes: the default).  Started, killed and restarted by PID."""

    def __init__(self, d: Path, disks: dict[str, Path], tls: str | None = None) -> None:
        #: ``disks``: export name -> raw file; ``tls``: a credentials directory (certs.make_pki's
        #: layout): ``--tls-creds DIR --tls on`` -- every client of the soak uses TLS except the
        #: stalled raw client (plain: ``on`` serves both)
        self.d, self.disks, self.tls = d, disks, tls
        self.sock, self.ctl = str(d / "nbd.sock"), str(d / "ctl.sock")
        self.state = d / "state"
        self.state.mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def uri(self, name: str = "disk") -> str:
        if self.tls:
            return f"nbds+unix:///{name}?socket={self.sock}&tls-certificates={self.tls}"
        return f"nbd+unix:///{name}?socket={self.sock}"

    def qemu_opts(self, name: str) -> list[str]:
        """qemu-img's options for export ``name`` (its URIs carry no TLS credentials)."""
        if not self.tls:
            return ["-f", "raw", self.uri(name)]
        return ["--object", f"tls-creds-x509,id=tls0,dir={self.tls},endpoint=client", "--image-opts",
                f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={self.sock},"
                f"file.export={name},file.tls-creds=tls0,file.tls-hostname=localhost"]

    def start(self) -> None:
        for p in (self.sock, self.ctl):
            if os.path.exists(p):
                os.unlink(p)
        log = open(self.d / "serve.log", "ab")
        log.write(f"--- start {self.starts}\n".encode())
        log.flush()
        self.proc = subprocess.Popen([PY, "-m", "nbdbackup.cli", "serve", "--socket", self.sock, "--control",
                                      self.ctl, "--state-dir", str(self.state),
                                      *(["--tls-creds", self.tls, "--tls", "on"] if self.tls else []),
                                      *(f"{n}={p}" for n, p in self.disks.items())],
                                     cwd=ROOT, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        self.starts += 1
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}: see {self.d / 'serve.log'}")
            if os.path.exists(self.ctl) and os.path.exists(self.sock):
                try:
                    self.qmp("query-block-exports")
                    return
                except (OSError, Exception):
                    pass
            time.sleep(0.05)
        raise RuntimeError("serve did not start")

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def qmp(self, cmd: str, args: dict | None = None, timeout: float = 30):
        from nbdbackup.control.client import ControlClient

        async def go():
            async with ControlClient(self.ctl) as c:
                return await c.execute(cmd, args)

        return asyncio.run(asyncio.wait_for(go(), timeout))


class Writer:
    """The live writer: one libnbd connection, synchronous requests, the model
    updated on each reply.  Reconnects after the server was restarted."""

    def __init__(self, srv: Server, model: Model, rng: random.Random, size: int, export: str = "disk",
                 aio: bool = False) -> None:
        self.srv, self.model, self.rng, self.size = srv, model, rng, size
        #: the export written; ``aio``: half the requests go in pipelined batches (`batch`)
        self.export, self.aio = export, aio
        self.h: nbd.NBD | None = None
        self.stats = {"writes": 0, "zeroes": 0, "trims": 0, "flushes": 0, "fua": 0, "failed": 0,
                      "batches": 0, "batch_reqs": 0, "batch_overlap": 0, "batch_flush": 0, "batch_max_inflight": 0}

    def connect(self) -> None:
        self.h = nbd.NBD()
        self.h.set_uri_allow_local_file(True)  # (tls-certificates=DIR)
        self.h.connect_uri(self.srv.uri(self.export))

    def drop(self) -> None:
        if self.h is not None:
            try:
                self.h.close()
            except Exception:
                pass
        self.h = None

    def _send(self, call, b0: int, ds: list) -> None:
        """Run request ``call`` on blocks ``b0..`` meant to become ``ds``; if it fails,
        the blocks are recorded as attempted (they may hold the old or the new bytes)."""
        try:
            call()
        except nbd.Error:
            for i, d in enumerate(ds):
                self.model.attempted(b0 + i, d)
            raise

    def one(self) -> bool:
        """One random request; False if the connection failed (the server died)."""
        rng, m = self.rng, self.model
        nb = rng.choice([1, 1, 2, 3, 8, 16, 33])
        b0 = rng.randrange(len(m.cur) - nb + 1)
        off, n = b0 * BS, nb * BS
        kind = rng.choices(["write", "zero", "trim", "flush"], [70, 12, 8, 10])[0]
        fua = rng.random() < 0.15
        flags = nbd.CMD_FLAG_FUA if fua and kind != "flush" else 0
        try:
            if kind == "flush":
                self.h.flush()
                m.flushed()
                self.stats["flushes"] += 1
                return True
            if kind == "write":
                data = rng.randbytes(n)
                ds = digests(data)
                self._send(lambda: self.h.pwrite(data, off, flags), b0, ds)
                for i, d in enumerate(ds):
                    m.wrote(b0 + i, d, fua)
            elif kind == "zero":
                self._send(lambda: self.h.zero(n, off, flags), b0, [ZERO] * nb)
                for i in range(nb):
                    m.wrote(b0 + i, ZERO, fua)
            else:
                self._send(lambda: self.h.trim(n, off, flags), b0, [ZERO] * nb)
                try:
                    got = digests(self.h.pread(n, off))
                except nbd.Error:  # the TRIM was acknowledged; its blocks are old or zeroes
                    for i in range(nb):
                        m.attempted(b0 + i, ZERO, acked=True)
                    raise
                for i, d in enumerate(got):
                    if d not in (ZERO, m.cur[b0 + i]):
                        raise Violation(f"trim: block {b0 + i} reads neither old nor zeroes")
                    m.wrote(b0 + i, d, fua)
            self.stats[{"write": "writes", "zero": "zeroes", "trim": "trims"}[kind]] += 1
            self.stats["fua"] += fua
            return True
        except nbd.Error:
            self.stats["failed"] += 1
            self.drop()
            return False

    def batch(self) -> tuple[bool, int]:
        """2-32 requests in flight at once (libnbd aio): WRITE / WRITE_ZEROES / TRIM, 15 % FUA,
        FLUSHes among them; half the batches inside a window of 1-16 blocks (overlapping
        ranges).  Once all are answered, the touched blocks are read back and `Model.settle`
        checks them.  Returns (connection still up, requests sent)."""
        rng, m, h = self.rng, self.model, self.h
        k = rng.choice([2, 4, 8, 16, 32])
        nblocks = len(m.cur)
        win = (0, nblocks)
        if rng.random() < 0.5:
            w = min(nblocks, rng.choice([1, 4, 16]))
            lo = rng.randrange(nblocks - w + 1)
            win = (lo, w)
            self.stats["batch_overlap"] += 1
        reqs, flushes, bufs = [], [], []
        dead = False
        try:
            for _ in range(k):
                kind = rng.choices(["write", "zero", "trim", "flush"], [70, 12, 8, 10])[0]
                if kind == "flush":
                    flushes.append(h.aio_flush())
                    continue
                nb = min(win[1], rng.choice([1, 1, 2, 3, 8, 16, 33]))
                b0 = win[0] + rng.randrange(win[1] - nb + 1)
                off, n = b0 * BS, nb * BS
                flags = nbd.CMD_FLAG_FUA if rng.random() < 0.15 else 0
                self.stats["fua"] += bool(flags)
                if kind == "write":
                    data = rng.randbytes(n)
                    buf = nbd.Buffer.from_bytearray(bytearray(data))
                    bufs.append(buf)  # (valid until answered)
                    reqs.append((b0, digests(data), h.aio_pwrite(buf, off, flags=flags)))
                elif kind == "zero":
                    reqs.append((b0, [ZERO] * nb, h.aio_zero(n, off, flags=flags)))
                else:
                    reqs.append((b0, [None] * nb, h.aio_trim(n, off, flags=flags)))
                self.stats[{"write": "writes", "zero": "zeroes", "trim": "trims"}[kind]] += 1
            self.stats["batch_max_inflight"] = max(self.stats["batch_max_inflight"], h.aio_in_flight())
            while h.aio_in_flight() > 0:
                h.poll(-1)
        except nbd.Error:
            dead = True

        def ok(cookie: int) -> bool:
            try:
                return bool(h.aio_command_completed(cookie))
            except nbd.Error:
                return False

        done = [(b0, ds, ok(c)) for b0, ds, c in reqs]
        flushed = bool(flushes) and all(ok(c) for c in flushes)
        self.stats["batches"] += 1
        self.stats["batch_reqs"] += len(reqs) + len(flushes)
        self.stats["batch_flush"] += flushed
        self.stats["flushes"] += len(flushes)
        seen = None
        if not dead:
            try:
                seen = {}
                for b0, ds, _ in done:
                    for i, d in enumerate(digests(h.pread(len(ds) * BS, b0 * BS))):
                        seen[b0 + i] = d
            except nbd.Error:
                dead, seen = True, None
        self.stats["failed"] += sum(not a for _, _, a in done)
        m.settle(done, seen, flushed)
        if dead:
            self.drop()
        return not dead, len(reqs) + len(flushes)

    def burst(self, count: int) -> None:
        if self.h is None:
            self.connect()
        sent = 0
        while sent < count:
            if self.aio and self.rng.random() < 0.5:
                up, k = self.batch()
                sent += k
            else:
                up = self.one()
                sent += 1
            if not up:
                return


def raw_stall(sock_path: str, export: str) -> socket.socket:
    """A client that negotiates (fixed newstyle, NBD_OPT_EXPORT_NAME), sends 32
    READs of 4 MiB and never reads a reply."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    hdr = b""
    while len(hdr) < 18:
        hdr += s.recv(18 - len(hdr))
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    name = export.encode()
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, len(name)) + name)
    got = b""
    while len(got) < 10:
        got += s.recv(10 - len(got))
    for i in range(32):
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i * 4 * M) % (8 * M), 4 * M))
    return s


#: hunt 17's dimensions (``--dims``): ``aio`` the pipelined writer (`Writer.batch`), ``modes``
#: QMP ``sync top`` / ``sync bitmap`` and full/top with a bitmap, ``disks2`` a second export
#: (``disk2``: its own writer; the agent backs up both in one run), ``tls`` every NBD client
#: over TLS (X.509), ``s3`` the repository on a Ceph RGW started for the run.
DIMS = ("aio", "modes", "disks2", "tls", "s3")


def pick_dims(spec: str, seed: int) -> set[str]:
    """``random``: each dimension with probability 1/2 from the seed (its own RNG: the steps'
    sequence does not depend on it); ``none``; ``all``; or a comma list."""
    if spec == "random":
        r = random.Random(seed * 104729 + 17)
        return {x for x in DIMS if r.random() < 0.5}
    if spec in ("none", ""):
        return set()
    if spec == "all":
        return set(DIMS)
    got = set(spec.split(","))
    if not got <= set(DIMS):
        raise SystemExit(f"unknown dims {sorted(got - set(DIMS))}: choose from {', '.join(DIMS)}")
    return got


class Soak:
    def __init__(self, seed: int, size: int, d: Path, log, dims: set[str] = frozenset()) -> None:
        self.rng = random.Random(seed)
        self.seed, self.size, self.d, self.logf = seed, size, d, log
        #: hunt 17's dimensions of this run (`DIMS`)
        self.dims = set(dims)
        #: export name -> its raw file, model and writer (``disk`` always; ``disk2`` with dims disks2)
        self.disks = {n: d / f"{n}.img" for n in (["disk", "disk2"] if "disks2" in dims else ["disk"])}
        for path in self.disks.values():
            with open(path, "wb") as f:
                f.truncate(size)
        self.disk = self.disks["disk"]
        self.models = {n: Model(size // BS) for n in self.disks}
        self.model = self.models["disk"]
        #: dims tls: the credentials directory (server and client certificates), else None
        self.tls = None
        if "tls" in dims:
            sys.path.insert(0, str(ROOT / "tests" / "interop"))
            import certs

            (d / "pki").mkdir(exist_ok=True)
            self.tls = certs.make_pki(d / "pki")["server"]
        self.srv = Server(d, self.disks, self.tls)
        self.writers = {n: Writer(self.srv, self.models[n], random.Random(seed * 7919 + 1 + i), size, n,
                                  aio="aio" in dims) for i, n in enumerate(self.disks)}
        self.w = self.writers["disk"]
        #: dims s3: the running `ceph_rgw.RGW` (stopped at the end of `run`), else None
        self.rgw = None
        if "s3" in dims:
            sys.path.insert(0, str(ROOT / "tests" / "interop"))
            import ceph_rgw

            self.rgw = ceph_rgw.start(str(d / "rgw"), memstore_bytes=1 << 30)
            os.environ.update(self.rgw.env(), AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
            self.rgw.client().create_bucket(Bucket=f"soak{seed}")
            self.repo = f"s3://soak{seed}/backups/soak"
        else:
            self.repo = d / "repo"
        (d / "pass").write_text(PASS + "\n")
        self.popts = ["--passphrase-file", str(d / "pass")]
        try:
            self.cli("repo", "init", str(self.repo), "--chunk-size", str(256 * 1024), "--encryption", "repokey",
                     *self.popts)
        except BaseException:
            if self.rgw is not None:
                self.rgw.stop()  # (`run` stops it otherwise)
            raise
        #: repository snapshot -> model digests at its backup start
        self.snaps: dict[str, list[bytes]] = {}
        #: repository snapshot -> its export (absent: ``disk``)
        self.snap_disk: dict[str, str] = {}
        #: the QMP job in flight: dict(id, sync, want, dirty (blocks to check in the target), target, readers)
        self.job: dict | None = None
        self.jobs_seq = 0
        #: the QMP bitmap "soak" exists on the server (persistent)
        self.have_bitmap = False
        #: the agent run in flight: dict(proc, want (model at its transaction or None yet), before (job ids))
        self.agent: dict | None = None
        self.stall: list[socket.socket] = []
        #: a forged power loss left the agent's bitmaps inconsistent: its next successful run must be full
        self.agent_must_full: set[str] = set()
        #: the kind of the last agent run ("full", "incremental"; None: it failed)
        self.last_agent_kind: str | None = None
        self.agent_seq = 0
        #: time.monotonic() of the last kill -9 of an agent (its S3 lease outlives it: `_lease_busy`)
        self.last_agent_kill9 = -1e9
        self.n = {k: 0 for k in ("steps", "serve_kill9", "serve_term", "agent_kill9", "agent_ok", "agent_failed",
                                 "agent_full", "agent_incr", "agent_full_inconsistent", "qmp_jobs", "qmp_cancel",
                                 "qmp_ok", "qmp_failed", "snap_reads_checked", "snap_reads_failed",
                                 "target_checks", "crash_checks", "crash_unanswered_landed", "crash_unflushed_lost", "restores_checked",
                                 "verify", "prune", "gc", "stalls", "bitmap_inconsistent",
                                 "pulls_checked", "pulls_failed", "agent_kill_too_late",
                                 "agent_term", "qmp_start_max_ms", "qmp_start_slow", "qmp_start_refused", "worker_kill9",
                                 "worker_kill_lost_writer", "power_loss_forged", "incremental_refused",
                                 "agent_multi_ok", "agent_multi_failed", "agent_partial", "qmp_top_ok",
                                 "qmp_bitmap_ok", "qmp_bitmap_failed", "bitmap_checks", "bitmap_cleared_checked",
                                 "always_cleared_blocks", "crash_checks_disk2", "restores_disk2",
                                 "s3_busy_after_kill9")}

    # -- plumbing ------------------------------------------------------------------

    def log(self, msg: str) -> None:
        t = time.time()  # wall clock, as serve.log's timestamps
        self.logf.write(f"{time.strftime('%H:%M:%S', time.gmtime(t))}.{int(t * 1000) % 1000:03d} {msg}\n")
        self.logf.flush()

    def cli(self, *args: str, ok: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run([PY, "-m", "nbdbackup.cli", *args], cwd=ROOT, capture_output=True, text=True,
                           errors="replace", timeout=timeout)
        if ok and r.returncode != 0:
            raise Violation(f"nbdbackup {' '.join(args[:2])} exit {r.returncode}: {r.stderr[-2000:]}")
        return r

    def read_export(self, name: str, out: Path, tool: str) -> subprocess.Popen:
        uri = self.srv.uri(name)
        argv = (["nbdcopy", uri, str(out)] if tool == "nbdcopy"
                else ["qemu-img", "convert", *self.srv.qemu_opts(name), "-O", "raw", str(out)])
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    # -- steps ---------------------------------------------------------------------

    def _pick_writer(self) -> Writer:
        if len(self.writers) == 1:
            return self.w
        return self.writers[self.rng.choice(["disk", "disk", "disk2"])]

    def step_write(self) -> None:
        w = self._pick_writer()
        w.burst(self.rng.randrange(5, 60))

    def step_flush(self) -> None:
        w = self._pick_writer()
        if w.h is None:
            w.connect()
        w.h.flush()
        w.model.flushed()

    def step_qmp_start(self, sync: str | None = None) -> None:
        if self.job is not None:
            return
        modes = "modes" in self.dims
        sync = sync or self.rng.choice(["full", "incremental", "none"] + (["top", "bitmap", "bitmap", "top"] if modes else []))
        self.jobs_seq += 1
        jid = f"soak{self.jobs_seq}"
        target = self.d / f"target-{jid}.raw"
        with open(target, "wb") as f:
            f.truncate(self.size)
        args = {"export": "disk", "job-id": jid, "sync": sync, "target": str(target), "auto-dismiss": False,
                "speed": self.rng.choice([0, 4 * M, 16 * M])}
        if sync in ("incremental", "bitmap") and not self.have_bitmap:
            sync = args["sync"] = "full"
        actions = []
        if sync in ("full", "top") and not self.have_bitmap:
            actions.append({"type": "block-dirty-bitmap-add",
                            "data": {"export": "disk", "name": "soak", "persistent": True}})
        #: the bitmap-mode of a job that uses bitmap "soak" (None: it does not)
        bmode = None
        if sync == "incremental":
            bmode = "on-success"
        elif sync == "bitmap":
            bmode = self.rng.choice(["on-success", "never", "always"])
        elif modes and sync in ("full", "top") and self.have_bitmap and self.rng.random() < 0.4:
            bmode = self.rng.choice(["on-success", "always"])  # (never: refused with full/top, as QEMU)
        if bmode:
            args.update(bitmap="soak", **{"bitmap-mode": bmode})
        actions.append({"type": "backup-start", "data": args})
        t0 = time.monotonic()
        try:
            self.srv.qmp("transaction", {"actions": actions})
            took = time.monotonic() - t0
            self.n["qmp_start_max_ms"] = max(self.n["qmp_start_max_ms"], int(took * 1000))
            self.n["qmp_start_slow"] += took > 5  # (a stalled worker connection holds a recall up to 10 s)
        except Exception as e:  # refused (e.g. the agent's job holds the export): nothing started
            self.log(f"qmp start {jid} {sync} refused: {e}")
            self.n["qmp_start_refused"] += 1
            if "soak" in str(e) and "inconsistent" in str(e):
                self.bitmap_lost()
            return
        if len(actions) == 2:
            self.have_bitmap = True
            self.model.since["soak"] = set()
        want = list(self.model.cur)
        dirty = set(self.model.since.get("soak", ())) if sync in ("incremental", "bitmap") else None
        self.job = {"id": jid, "sync": sync, "want": want, "dirty": dirty, "target": target, "readers": [],
                    "since_at_start": set(self.model.since.get("soak", ())), "bmode": bmode}
        if bmode:
            self.model.since["soak"] = set()  # writes from now; merged back unless the job clears the bitmap
            self.model.touched = set()
        self.n["qmp_jobs"] += 1
        self.log(f"qmp start {jid} {sync} bitmap-mode={bmode}")
        for b in self.model.hist:
            self.model._h(b, f"<{jid}>")
        self.step_snap_read()

    def step_snap_read(self) -> None:
        if self.job is None or len(self.job["readers"]) >= 2:
            return
        tool = self.rng.choice(["nbdcopy", "qemu-img", "pull"])
        if tool == "pull" and any(t == "pull" for _, _, t in self.job["readers"]):
            tool = "nbdcopy"
        out = self.d / f"snapread-{self.job['id']}-{len(self.job['readers'])}.raw"
        if tool == "pull":  # a full pull of the snapshot export into the repository
            out = Path(f"pull.{self.job['id']}")
            p = subprocess.Popen([PY, "-m", "nbdbackup.cli", "pull", self.srv.uri(f"disk@{self.job['id']}"),
                                  "--repo", str(self.repo), *self.popts, "--snapshot", str(out),
                                  "--connections", "2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        else:
            p = self.read_export(f"disk@{self.job['id']}", out, tool)
        self.job["readers"].append((p, out, tool))

    def pulling(self) -> bool:
        return self.job is not None and any(t == "pull" for _, _, t in self.job["readers"])

    def _reap_readers(self, job: dict) -> None:
        for p, out, tool in job["readers"]:
            try:
                rc = p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                rc = p.wait()
            if tool == "pull":
                snap = str(out)
                recorded = snap in self._repo_snaps()
                if rc == 0:
                    if not recorded:
                        raise Violation(f"pull of {job['id']} exit 0 but no snapshot {snap}")
                    self.snaps[snap] = job["want"]
                    self.check_restore(snap)
                    self.n["pulls_checked"] += 1
                elif recorded:
                    raise Violation(f"pull of {job['id']} failed (rc {rc}) but recorded {snap}")
                else:
                    self.n["pulls_failed"] += 1
            elif rc == 0:
                compare(f"snapshot read ({tool}) of {job['id']}", job["want"], file_digests(out), None, self.model.hist)
                self.n["snap_reads_checked"] += 1
            else:
                self.n["snap_reads_failed"] += 1
            if rc != 0:
                self.log(f"reader {tool} rc={rc}: {p.stderr.read().decode(errors='replace')[-300:]}")
            p.stderr.close()
            if tool != "pull":
                out.unlink(missing_ok=True)
        job["readers"] = []

    def _job_info(self) -> dict | None:
        for j in self.srv.qmp("query-jobs"):
            if j["id"] == self.job["id"]:
                return j
        return None

    def _job_failed(self) -> None:
        """The QMP job did not succeed: its bitmap keeps what it had and what came since
        (bitmap-mode on-success or never; ``always``: `_always_failed`, after the job ended)."""
        if self.job["bmode"] in ("on-success", "never") and self.have_bitmap:
            self.model.since["soak"] |= self.job["since_at_start"]

    def read_bitmap(self, name: str = "soak") -> set[int]:
        """The blocks bitmap ``name`` of the live export ``disk`` marks dirty: its
        ``qemu:dirty-bitmap:NAME`` context (a granule dirty = every block in it)."""
        ctx = "qemu:dirty-bitmap:" + name
        h = nbd.NBD()
        try:
            h.add_meta_context(ctx)
            h.set_uri_allow_local_file(True)
            h.connect_uri(self.srv.uri("disk"))
            if not h.can_meta_context(ctx):
                raise Violation(f"the live export does not offer {ctx}")
            dirty: set[int] = set()
            off = 0
            while off < self.size:
                got: list[tuple[int, list[int]]] = []

                def cb(meta, o, entries, err, got=got):
                    if meta == ctx:
                        got.append((o, list(entries)))
                    return 0

                h.block_status(self.size - off, off, cb)
                pos = off
                for o, ents in got:
                    pos = o
                    for i in range(0, len(ents), 2):
                        if ents[i + 1] & 1:
                            dirty.update(range(pos // BS, min(self.size, pos + ents[i]) // BS))
                        pos += ents[i]
                if pos <= off:
                    raise Violation(f"{ctx}: no extent at {off}")
                off = pos
            return dirty
        finally:
            common.nbd_shutdown_quietly(h)

    def check_bitmap(self, job: dict, success: bool) -> None:
        """After a job that used bitmap "soak" (QEMU's bitmap-mode rules): the bitmap marks every
        block of the model's must-have set (never under-reports); after a success with
        on-success / always it was cleared: a granule of the job's start set no request has
        touched since the start is clean."""
        if not self.have_bitmap:
            return
        dirty = self.read_bitmap()
        miss = sorted(self.model.since["soak"] - dirty)
        if miss:
            raise Violation(f"bitmap soak after {job['id']} ({job['sync']}, {job['bmode']}, success={success}) "
                            f"misses {len(miss)} written blocks, first {miss[:8]}: "
                            f"{[(b, self.model.hist.get(b)) for b in miss[:3]]}")
        self.n["bitmap_checks"] += 1
        if success and job["bmode"] in ("on-success", "always"):
            gran = next(b["granularity"] for b in self.srv.qmp("query-bitmaps", {"export": "disk"})
                        if b["name"] == "soak") // BS
            busy = {b // gran for b in self.model.touched}
            stale = sorted(b for b in job["since_at_start"] if b // gran not in busy and b in dirty)
            if stale:
                raise Violation(f"bitmap soak after {job['id']} ({job['sync']}, {job['bmode']}) succeeded "
                                f"but still marks {len(stale)} blocks untouched since its start: {stale[:8]}")
            self.n["bitmap_cleared_checked"] += 1

    def _always_failed(self, job: dict) -> None:
        """A bitmap-mode ``always`` job failed: the bitmap forgot the clusters it copied to the
        target.  Every block of the start set the bitmap no longer marks (and nobody wrote since)
        must hold the snapshot's content in the target; the rest stays must-have."""
        dirty = self.read_bitmap()
        old = job["since_at_start"]
        cleared = {b for b in old if b not in dirty}
        if cleared:
            compare(f"target of {job['id']} (always, failed) on the blocks its bitmap forgot", job["want"],
                    file_digests(job["target"]), cleared, self.model.hist)
            self.n["always_cleared_blocks"] += len(cleared)
        self.model.since["soak"] |= old - cleared
    def step_qmp_finish(self, cancel: bool = False) -> None:
        job = self.job
        if job is None:
            return
        if cancel:
            try:
                self.srv.qmp("job-cancel", {"id": job["id"]})
            except Exception as e:
                self.log(f"cancel {job['id']}: {e}")
            self.n["qmp_cancel"] += 1
        else:
            self._reap_readers(job)
            if job["sync"] == "none":
                self.srv.qmp("job-cancel", {"id": job["id"]})  # sync none runs until cancelled
        end = time.monotonic() + 120
        while (info := self._job_info()) is not None and info["status"] != "concluded":
            if time.monotonic() > end:
                raise Violation(f"job {job['id']} never concluded: {info}")
            time.sleep(0.02)
        self._reap_readers(job)
        if info is None:
            raise Violation(f"job {job['id']} vanished")
        err = info.get("error")
        if err is None and job["sync"] != "none":
            # Succeeded (also a cancel that came too late: a cancelled job reports an error).
            tgt = file_digests(job["target"])
            if job["sync"] in ("full", "top"):  # (top: unallocated blocks read zeroes, as the fresh target)
                compare(f"{job['sync']} target of {job['id']}", job["want"], tgt, None, self.model.hist)
            else:
                compare(f"{job['sync']} target of {job['id']}", job["want"], tgt, job["dirty"], self.model.hist)
            self.n["target_checks"] += 1
            self.n["qmp_ok"] += 1
            self.n["qmp_top_ok"] += job["sync"] == "top"
            self.n["qmp_bitmap_ok"] += job["sync"] == "bitmap"
            if job["bmode"] == "never":
                self.model.since["soak"] |= job["since_at_start"]
        elif job["sync"] != "none":
            self.n["qmp_failed"] += 1
            self.n["qmp_bitmap_failed"] += job["sync"] == "bitmap"
            if job["bmode"] == "always":
                self._always_failed(job)
            else:
                self._job_failed()
        if job["bmode"] and job["sync"] != "none":
            self.check_bitmap(job, err is None)
        self.srv.qmp("job-dismiss", {"id": job["id"]})
        job["target"].unlink(missing_ok=True)
        self.log(f"qmp finish {job['id']} cancel={cancel} error={err}")
        self.job = None

    def bitmap_lost(self) -> None:
        self.n["bitmap_inconsistent"] += 1
        try:
            self.srv.qmp("block-dirty-bitmap-remove", {"export": "disk", "name": "soak"})
        except Exception as e:
            self.log(f"remove soak: {e}")
        self.have_bitmap = False
        self.model.since.pop("soak", None)

    def _agent_jobs(self) -> set[str]:
        return {j["id"] for j in self.srv.qmp("query-jobs") if j["id"].startswith(PREFIX + ".")}

    def _agent_exports(self) -> set[str]:
        """The agent's snapshot exports: published after the transaction's point in time.  (Not
        its job: a job is listed, status "created", while the transaction still waits to quiesce
        -- recalling worker connections -- and writes go on until then.)"""
        return {e["name"] for e in self.srv.qmp("query-block-exports") if e["name"].startswith(PREFIX + ".")}

    def step_agent_start(self, full: bool | None = None) -> None:
        if self.agent is not None:
            return
        self.agent_seq += 1
        bms = [(b["name"], b.get("recording"), b.get("inconsistent")) for b in
               self.srv.qmp("query-bitmaps", {"export": "disk"}) if b["name"].startswith(PREFIX + ".")]
        self.log(f"agent bitmaps before run a{self.agent_seq}: {bms}")
        before = self._agent_exports()
        snaps_before = set(self._repo_snaps())
        argv = [PY, "-m", "nbdbackup.cli", "agent", "backup", "--control", self.srv.ctl, "--nbd", self.srv.uri(""),
                *(x for n in self.disks for x in ("--disk", n)), "--repo", str(self.repo), *self.popts, "--json", "--io-timeout", "30",
                "--connections", str(self.rng.choice([1, 2])), "--read", self.rng.choice(["whole", "dirty"]),
                "--verify", self.rng.choice(["full", "sample", "off"]), "--snapshot-name", "{disk}.a%d" % self.agent_seq]
        if self.rng.random() < 0.1 if full is None else full:
            argv.append("--full")
        p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # No writes until the agent's transaction (its job appears) or its end: the model then is its instant.
        end = time.monotonic() + 60
        want = None
        while time.monotonic() < end:
            if self._agent_exports() - before:  # (one transaction for all disks: one instant)
                want = {n: list(m.cur) for n, m in self.models.items()}
                break
            if p.poll() is not None:
                break
            time.sleep(0.01)
        self.agent = {"proc": p, "want": want, "snaps_before": snaps_before}
        self.log(f"agent start a{self.agent_seq} pid={p.pid} transaction_seen={want is not None} "
                 f"{' '.join(a for a in argv[argv.index('--connections'):] if not a.startswith('{'))}")

    def _repo(self):
        from nbdbackup.agent.repo import Repository, open_store

        return Repository.open(open_store(str(self.repo)), passphrase=lambda: PASS)

    def _repo_snaps(self) -> list[str]:
        return list(self._repo().snapshots())

    def step_agent_finish(self, kill: bool = False) -> None:
        a = self.agent
        if a is None:
            return
        p = a["proc"]
        if kill:
            time.sleep(self.rng.random() * 0.1)  # (a 16 MiB pull takes ~0.1-0.3 s)
            if p.poll() is None:
                sig = self.rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM])
                os.kill(p.pid, sig)
                self.n["agent_kill9" if sig == signal.SIGKILL else "agent_term"] += 1
                if sig == signal.SIGKILL:
                    self.last_agent_kill9 = time.monotonic()
            else:
                self.n["agent_kill_too_late"] += 1
        try:
            out, err = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise Violation(f"agent hung for 180 s; its stderr: {err.decode(errors='replace')[-1500:]!r}")
        new = {s for s in set(self._repo_snaps()) - a["snaps_before"] if s.split(".")[0] in self.disks}
        self.agent = None
        self.log(f"agent end rc={p.returncode} new={sorted(new)} err={err.decode(errors='replace')[-400:]!r}")
        if p.returncode == 0:
            self.n["agent_ok"] += 1
            rep = json.loads(out)
            if sorted(d["disk"] for d in rep["disks"]) != sorted(self.disks):
                raise Violation(f"agent ok but its report names disks {[d['disk'] for d in rep['disks']]}")
            for d in rep["disks"]:
                self.n["agent_" + ("incr" if d["kind"] == "incremental" else "full")] += 1
                if d["kind"] == "full" and "inconsistent" in d.get("reason", ""):
                    self.n["agent_full_inconsistent"] += 1
                self.log(f"agent {d['disk']} {d['kind']} {d.get('reason', '')!r} {d['snapshot']} "
                         f"notes={d.get('notes')}")
            if new != {d["snapshot"] for d in rep["disks"]}:
                raise Violation(f"agent ok but new snapshots {sorted(new)} != {[d['snapshot'] for d in rep['disks']]}")
            kinds = {d["kind"] for d in rep["disks"]}
            self.last_agent_kind = kinds.pop() if len(kinds) == 1 else "mixed"
            self.n["agent_multi_ok"] += len(rep["disks"]) > 1
        else:
            self.n["agent_multi_failed"] += len(self.disks) > 1
            self.n["agent_partial"] += p.returncode == 3
            self.n["agent_failed"] += 1
            self.last_agent_kind = None
        if new and a["want"] is None:
            raise Violation(f"snapshot {sorted(new)} recorded but no transaction was seen")
        for s in new:
            # The first snapshot recorded after a forged power loss (by any run: one stopped by
            # SIGTERM after recording exits 1) must be a full one.
            disk = s.split(".")[0]
            if disk in self.agent_must_full and \
                    (self._repo().snapshot_info(s).get("meta") or {}).get("base") is not None:
                raise Violation(f"snapshot {s} is an incremental after the agent's bitmap was left inconsistent")
            self.agent_must_full.discard(disk)
            self.snaps[s] = a["want"][disk]
            self.snap_disk[s] = disk
            self.check_restore(s)

    def check_restore(self, snap: str) -> None:
        out = self.d / "restored.raw"
        out.unlink(missing_ok=True)
        self.cli("restore", str(self.repo), snap, str(out), *self.popts)
        compare(f"restore of {snap}", self.snaps[snap], file_digests(out), None,
                self.models[self.snap_disk.get(snap, "disk")].hist)
        out.unlink()
        self.n["restores_checked"] += 1
        self.n["restores_disk2"] += self.snap_disk.get(snap) == "disk2"

    def step_restore_any(self) -> None:
        if self.snaps:
            self.check_restore(self.rng.choice(sorted(self.snaps)))

    def step_repo(self) -> None:
        if self.agent is not None or self.pulling():
            return  # (prune/gc alongside a pull are hunt 13's; here the repository is checked at rest)
        op = self.rng.choice(["verify", "prune", "gc"])
        if op == "verify":
            r = self.cli("repo", "verify", str(self.repo), *self.popts, ok=False)
            if r.returncode != 0:
                raise Violation(f"repo verify: {r.stdout[-1000:]} {r.stderr[-1000:]}")
        elif op == "prune":
            keep = self.rng.randrange(1, 4)
            before = set(self._repo_snaps())
            r = self.cli("repo", "prune", str(self.repo), *self.popts, "--keep-last", str(keep), "--gc",
                         "--grace", "0", ok=False)
            if self._lease_busy(r):
                if set(self._repo_snaps()) != before:
                    raise Violation("prune refused (busy) but removed snapshots")
                return
            left = set(self._repo_snaps())
            if not left <= set(self.snaps) or len(left) != min(keep, len(self.snaps)):
                raise Violation(f"prune --keep-last {keep}: left {sorted(left)} of {sorted(self.snaps)}")
            self.snaps = {s: v for s, v in self.snaps.items() if s in left}
            for s in sorted(left):
                self.check_restore(s)
        else:
            if self._lease_busy(self.cli("repo", "gc", str(self.repo), *self.popts, "--grace", "0", ok=False)):
                return
        self.n[op] += 1

    def _lease_busy(self, r: subprocess.CompletedProcess) -> bool:
        """A prune/gc refused because the repository is in use.  Allowed only on S3 within a
        lease's life (60 s past its last renewal, the store's clock; 75 s here) after an agent
        was killed -9: its shared lease outlives it (README, "The lock is made of objects with
        expiry"); a directory's flock dies with its holder.  Any other failure is a violation."""
        if r.returncode == 0:
            return False
        if (self.rgw is not None and "busy (in use)" in r.stderr
                and time.monotonic() - self.last_agent_kill9 < 75):
            self.n["s3_busy_after_kill9"] += 1
            self.log(f"repo {r.args[4]} refused: {r.stderr.strip()[-200:]}")
            return True
        raise Violation(f"nbdbackup {' '.join(r.args[3:5])} exit {r.returncode}: {r.stderr[-2000:]}")

    def step_stall(self) -> None:
        if len(self.stall) < 2 and self.rng.random() < 0.7:
            try:
                self.stall.append(raw_stall(self.srv.sock, "disk"))
                self.n["stalls"] += 1
            except OSError as e:
                self.log(f"stall: {e}")
        elif self.stall:
            self.stall.pop(0).close()

    def _workers(self) -> list[int]:
        """PIDs of serve's worker processes (its children)."""
        try:
            with open(f"/proc/{self.srv.proc.pid}/task/{self.srv.proc.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def step_worker_kill(self) -> None:
        """kill -9 of one worker process (serve starts another) while the writer is mid-burst;
        then (2) on the live disk, without a restart of serve."""
        pids = self._workers()
        if not pids:
            return
        victims = self.rng.sample(pids, self.rng.randrange(1, len(pids) + 1))
        if self.job is None and (self.agent is None or self.agent["proc"].poll() is not None):
            time.sleep(1.5)  # no job: the writer's connection goes back to a worker (REOFFLOAD_DELAY 1 s)
        if self.w.h is None:
            self.w.connect()

        def kill() -> None:
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        t = threading.Timer(self.rng.random() * 0.05, kill)
        t.start()
        self.w.burst(200)
        t.join()
        self.n["worker_kill9"] += len(victims)
        self.n["worker_kill_lost_writer"] += self.w.h is None
        self.log(f"workers {victims} killed; writer {'lost' if self.w.h is None else 'kept'} its connection")
        for m in self.models.values():
            for b in m.hist:
                m._h(b, "<wkill>")
        self.crash_check()

    def crash_check(self) -> None:
        """Check (2) after a crash: reconnect the writers and read every whole live disk."""
        for w in self.writers.values():
            w.drop()
            w.connect()
            seen = [d for off in range(0, self.size, 16 * M)
                    for d in digests(w.h.pread(min(16 * M, self.size - off), off))]
            landed, lost = w.model.crash_check(seen)
            self.n["crash_unanswered_landed"] += landed
            self.n["crash_unflushed_lost"] += lost
            if lost:
                self.log(f"{w.export}: acknowledged unflushed blocks lost: {w.model.lost_log[-lost:][:8]}")
            self.n["crash_checks"] += 1
            self.n["crash_checks_disk2"] += w.export == "disk2"

    def step_serve_fault(self) -> None:
        sig = self.rng.choice([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM])
        job = self.job
        if job is not None:
            # Pin the QMP job's outcome (a paused job cannot succeed behind our back).
            try:
                self.srv.qmp("job-pause", {"id": job["id"]})
            except Exception as e:
                self.log(f"pause {job['id']}: {e}")
            info = self._job_info()
            succeeded = info is not None and info["status"] == "concluded" and info.get("error") is None
            if succeeded and job["sync"] != "none":
                self.step_qmp_finish()
                job = None
        # The fault fires from a timer thread while the writer is mid-burst.
        t = threading.Timer(self.rng.random() * 0.05, self.srv.signal, (sig,))
        if self.w.h is None:
            self.w.connect()
        t.start()
        self.w.burst(400)
        t.join()
        try:
            rc = self.srv.wait(30)
        except subprocess.TimeoutExpired:
            raise Violation(f"serve did not exit on signal {sig}")
        for w in self.writers.values():
            w.drop()
        for s in self.stall:
            s.close()
        self.stall = []
        self.n["serve_kill9" if sig == signal.SIGKILL else "serve_term"] += 1
        self.log(f"serve signal {sig} rc={rc}")
        if sig == signal.SIGTERM and rc != 0:
            raise Violation(f"serve exited {rc} on SIGTERM (a clean stop)")
        for m in self.models.values():
            for b in m.hist:
                m._h(b, f"<kill{int(sig)}>")
        always = None  # a bitmap-mode always job: what its bitmap forgot is known after the restart
        if job is not None:
            self._reap_readers(job)  # they fail (or finished: then they must be right)
            if job["bmode"] == "always":
                always = job
            else:
                job["target"].unlink(missing_ok=True)
                self._job_failed()
            self.job = None
        if self.agent is not None:
            self.step_agent_finish()
        forged = sig == signal.SIGKILL and self.rng.random() < 0.25
        if forged:
            self.forge_power_loss()
        self.srv.start()
        # (2): read the whole live disk through the restarted server.
        self.crash_check()
        if always is not None:
            if not forged and self.have_bitmap:
                self._always_failed(always)
            always["target"].unlink(missing_ok=True)
        allbms = {n: {b["name"]: b for b in self.srv.qmp("query-bitmaps", {"export": n})} for n in self.disks}
        bms = allbms["disk"]
        if forged:
            for n, bm in allbms.items():
                if not all(b.get("inconsistent") for b in bm.values()):
                    raise Violation(f"bitmaps of {n} left in use by another boot load consistent: {bm}")
                if any(name.startswith(PREFIX + ".") for name in bm):
                    self.agent_must_full.add(n)
        if self.have_bitmap:
            if "soak" not in bms:
                raise Violation("the persistent bitmap vanished after a restart")
            if bms["soak"].get("inconsistent"):
                # (3): an incremental from it is refused, never silently incomplete.
                try:
                    self.srv.qmp("backup-start", {"export": "disk", "job-id": "refused", "sync": "incremental",
                                                  "bitmap": "soak", "target": f"memory:{self.size}"})
                except Exception as e:
                    if "inconsistent" not in str(e):
                        raise Violation(f"incremental from an inconsistent bitmap refused for another reason: {e}")
                    self.n["incremental_refused"] += 1
                else:
                    raise Violation("an incremental from an inconsistent bitmap was accepted")
                self.bitmap_lost()

    def forge_power_loss(self) -> None:
        """Every bitmap file as a power loss leaves it: in-use-dirty, written by another boot
        (as test_bitmaps_crash's `forge_foreign_boot`).  Such bitmaps must load inconsistent:
        QMP incrementals refused, the agent's next run a full one."""
        from nbdbackup.bitmap.store import SLOTS, STATE_DIRTY, current_boot_id, read_header

        # Another boot's id: this boot's inverted.  (Not the file's own id inverted, as
        # test_bitmaps_crash does once: a second forge would turn a foreign id back into this
        # boot's -- a kill -9 in this boot, which loads consistent by design.)
        me = current_boot_id()
        foreign = bytes(b ^ 0xFF for b in me) if any(me) else b"\x01" * 16
        n = 0
        for path in self.srv.state.glob("*/*.bitmap"):
            with open(path, "r+b") as f:
                h = read_header(f.read(4096))
                h.state = STATE_DIRTY
                h.boot_id = foreign
                f.seek(SLOTS[h.slot])
                f.write(h.pack())
                n += 1
        self.n["power_loss_forged"] += 1
        self.log(f"forged a power loss on {n} bitmap file(s)")

    STEPS = [("write", 40), ("flush", 4), ("qmp_start", 8), ("snap_read", 4), ("qmp_finish", 6),
             ("qmp_cancel", 3), ("agent_start", 8), ("agent_finish", 6), ("agent_kill", 5),
             ("serve_fault", 5), ("worker_kill", 3), ("stall", 3), ("repo", 4), ("restore_any", 2)]

    def run(self, steps: int, deadline: float) -> None:
        self.srv.start()
        self.w.connect()
        # With dims modes, QMP jobs twice as often (most of them then use the bitmap).
        steps_w = [(n, w * 2 if "modes" in self.dims and n in ("qmp_start", "qmp_finish") else w)
                   for n, w in self.STEPS]
        names, weights = zip(*steps_w)
        try:
            for i in range(steps):
                if time.monotonic() > deadline:
                    break
                name = self.rng.choices(names, weights)[0]
                self.n["steps"] += 1
                self.log(f"step {i} {name}")
                faulthandler.dump_traceback_later(300, exit=True)
                if name == "qmp_cancel":
                    self.step_qmp_finish(cancel=True)
                elif name == "agent_kill":
                    # Mid-run: start one (unless one runs), kill it 0-0.1 s after its transaction.
                    self.step_agent_start()
                    self.step_agent_finish(kill=True)
                else:
                    getattr(self, "step_" + name)()
            # Wind down: finish everything; then writes on a worker connection (handed out again
            # REOFFLOAD_DELAY = 1 s after the last job), an agent run, the same again and a QMP
            # incremental read while writes go on; every snapshot restores.
            self.step_qmp_finish()
            self.step_agent_finish()
            while self.stall:
                self.stall.pop().close()
            for what in ("agent", "agent", "qmp"):
                time.sleep(2)
                self.w.burst(40)
                if what == "agent":
                    self.step_agent_start(full=False)
                    self.step_write()
                    self.step_agent_finish()
                    if self.last_agent_kind is None:
                        raise Violation("the agent failed with no fault")
                else:
                    # No fault since the first of the two agent runs: the second must have been
                    # incremental (a full one would hide a bitmap that misses writes from check 3).
                    if self.last_agent_kind != "incremental":
                        raise Violation(f"the agent's second run in a row without faults was "
                                        f"{self.last_agent_kind}")
                    # (dims modes: as often sync=bitmap, any bitmap-mode -- its target is checked
                    # on the same blocks, and the bitmap read back)
                    self.step_qmp_start("bitmap" if "modes" in self.dims and self.rng.random() < 0.5
                                        else "incremental")
                    self.step_write()
                    self.step_snap_read()
                    self.step_write()
                    self.step_qmp_finish()
            self.cli("repo", "verify", str(self.repo), *self.popts)
            self.n["verify"] += 1
            for s in sorted(self.snaps):
                self.check_restore(s)
        finally:
            faulthandler.cancel_dump_traceback_later()
            for s in self.stall:
                s.close()
            if self.agent is not None:
                self.agent["proc"].kill()
                self.agent["proc"].wait()
            for w in self.writers.values():
                w.drop()
            if self.srv.proc and self.srv.proc.poll() is None:
                self.srv.signal(signal.SIGTERM)
                try:
                    self.srv.wait(30)
                except subprocess.TimeoutExpired:
                    self.srv.signal(signal.SIGKILL)
                    self.srv.wait()
            if self.rgw is not None:
                self.rgw.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--time", type=float, default=3600, help="stop taking steps after this many seconds")
    ap.add_argument("--size", default="16M")
    ap.add_argument("--dir", help="work directory (default: a new one under /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--dims", default="none",
                    help=f"hunt 17's dimensions: random (each 1/2, from the seed), none, all, or a comma list "
                         f"of {', '.join(DIMS)} (default none: hunt 16's mix)")
    a = ap.parse_args(argv)
    dims = pick_dims(a.dims, a.seed)
    # The repository's key is wrapped with scrypt N=2**12, as in the test suite (same code path,
    # ~1/70 of the cost each command that opens the repository pays); set it to 17 for the default.
    os.environ.setdefault("NBDBACKUP_SCRYPT_LOG_N", "12")
    size = int(a.size[:-1]) * M if a.size.upper().endswith("M") else int(a.size)
    d = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix=f"soak{a.seed}-", dir="/tmp"))
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(d / "steps.log", "w") as log:
        s = Soak(a.seed, size, d, log, dims)
        try:
            s.run(a.steps, t0 + a.time)
        except Violation as e:
            print(json.dumps({"seed": a.seed, "dims": sorted(dims), "violation": str(e), "step": s.n["steps"],
                              "dir": str(d), "counts": s.n, "writer": s.w.stats}), flush=True)
            return 1
    print(json.dumps({"seed": a.seed, "dims": sorted(dims), "ok": True, "seconds": round(time.monotonic() - t0, 1), "counts": s.n,
                      "writer": s.w.stats, **({"writer2": s.writers["disk2"].stats} if "disk2" in s.writers else {}),
                      "snapshots_left": len(s.snaps)}), flush=True)
    if not a.keep:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
