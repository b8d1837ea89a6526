"""Seeded fuzzing and connection churn against the real `nbdbackup serve` process.

What each fuzz case proves (issue 10): the server process survives; every
fuzzing connection ends -- the server answers and closes, or closes -- within
``CASE_TIMEOUT`` once the fuzzer has said all it will say (no hang); what the
server sends is well-formed (greeting, option replies, and for generated
request streams every reply matches a request, with the right error class);
meanwhile a well-behaved libnbd client on an export the fuzzer never names
keeps reading back its own pattern, and the read-only export's image file is
unchanged at the end.  The churn test opens and drops thousands of connections
at random protocol points, half of them with RST (SO_LINGER 0), and then the
server's open file descriptors return to their baseline.

Knobs (environment):
- ``NBDBACKUP_FUZZ_CASES``: transmission cases (default 6000; the handshake
  test runs ``HANDSHAKE_FACTOR`` times as many, they are cheaper);
- ``NBDBACKUP_FUZZ_SEED``: the seed (default 1); case ``i`` of kind ``k`` uses
  ``random.Random(f"{seed}:{k}:{i}")``, so a failure message names a case
  that replays alone with ``NBDBACKUP_FUZZ_ONLY=i``;
- ``NBDBACKUP_CHURN_CYCLES``: connect/disconnect cycles (default 5000).

The fresh-machine check runs the first quarter of the cases and cycles
(tests/scaled.py: ``NBDBACKUP_HUNT_FACTOR=0.25`` there); the host run all.

Measured on the shared 2-core test machine: 24000 handshake cases in 4-7 s,
6000 transmission cases in 7-14 s, 5000 churn cycles in 1-1.5 s; with
``NBDBACKUP_FUZZ_CASES=40000 NBDBACKUP_CHURN_CYCLES=30000`` 43 s, 94 s and 7 s.

Raw-socket constants and helpers come from `test_server_robustness` (written
from proto.md, independent of nbdbackup.nbd.wire).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

import peers
from scaled import rounds
from test_server_robustness import (
    IHAVEOPT,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
)

nbd = pytest.importorskip("nbd")

CASES = rounds(int(os.environ.get("NBDBACKUP_FUZZ_CASES", "6000")))
#: Handshake cases are cheaper (no transmission): this many per transmission case.
HANDSHAKE_FACTOR = 4
SEED = os.environ.get("NBDBACKUP_FUZZ_SEED", "1")
ONLY = os.environ.get("NBDBACKUP_FUZZ_ONLY")
CHURN = rounds(int(os.environ.get("NBDBACKUP_CHURN_CYCLES", "5000")))
WORKERS = 6
BATCH = 250
#: Seconds a case may take from its last byte sent to the server's close.
CASE_TIMEOUT = 10.0

SIZE = 1 << 20
MAX_PAYLOAD = 32 << 20
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META, OPT_EXTENDED_HEADERS = 8, 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
T_NONE, T_DATA, T_HOLE, T_BLOCK_STATUS, T_ERROR, T_ERROR_OFFSET = 0, 1, 2, 5, 32769, 32770
EINVAL, ENOSPC, EPERM = 22, 28, 1


def case_rng(kind: str, i: int) -> random.Random:
    return random.Random(f"{SEED}:{kind}:{i}")


def case_indexes(factor: int = 1) -> list[int]:
    return [int(ONLY)] if ONLY is not None else list(range(CASES * factor))


# --- the server and the well-behaved client ------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    ro = d / "ro.img"
    ro.write_bytes(random.Random(f"{SEED}:ro").randbytes(SIZE))
    good = d / "good.img"
    good.write_bytes(bytes(SIZE))
    # "fz" comes first: it is the default export ("") the fuzzer may reach.
    with peers.nbdbackup_serve("fz=memory:1M", f"ro=ro:{ro}", f"good-client-only={good}",
                               extra=["--handshake-timeout", "5"]) as srv:
        srv.ro_image = ro
        srv.ro_digest = hashlib.sha256(ro.read_bytes()).hexdigest()
        yield srv


class GoodClient(threading.Thread):
    """A libnbd client writing and reading back its own pattern, all the time.

    Fields: ``ops`` (write+read pairs verified), ``error`` (the first failure,
    or None), ``stop_event``.
    """

    def __init__(self, srv) -> None:
        super().__init__(daemon=True)
        self.srv = srv
        self.ops = 0
        self.error: str | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        rng = random.Random(f"{SEED}:good")
        try:
            h = nbd.NBD()
            h.connect_uri(self.srv.uri_for("good-client-only"))
            while not self.stop_event.is_set():
                off = rng.randrange(0, SIZE // 4096) * 4096
                data = rng.randbytes(4096)
                h.pwrite(data, off)
                got = h.pread(4096, off)
                if got != data:
                    self.error = f"read back different data at {off}"
                    return
                self.ops += 1
                time.sleep(0.002)
            h.shutdown()
        except Exception as e:  # noqa: BLE001 -- reported by the test
            self.error = f"{type(e).__name__}: {e}"

    def check(self) -> None:
        assert self.error is None, f"the well-behaved client failed: {self.error}"
        assert self.is_alive(), "the well-behaved client stopped"


def assert_server_ok(srv, good: GoodClient) -> None:
    assert srv.alive(), f"server died:\n{srv.log()[-3000:]}"
    good.check()
    h = nbd.NBD()
    h.connect_uri(srv.uri_for("ro"))
    off = 123 * 4096
    with open(srv.ro_image, "rb") as f:
        f.seek(off)
        assert h.pread(65536, off) == f.read(65536)
    h.shutdown()


# --- one connection: send everything, then read to the server's close -------------------


def exchange(path: str, chunks: list[bytes], *, half_close: bool = True) -> tuple[bytes, str]:
    """Send ``chunks``, optionally shut down our write side, read until the server
    closes.  Returns (bytes received, how it ended: "eof", "reset" or "timeout")."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CASE_TIMEOUT)
    try:
        s.connect(path)
        out = bytearray()
        try:
            for c in chunks:
                s.sendall(c)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed early: allowed, what it sent is still checked
        except socket.timeout:
            return bytes(out), "timeout"  # the server stopped reading and never closed
        deadline = time.monotonic() + CASE_TIMEOUT
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = s.recv(1 << 20)
            except ConnectionResetError:
                return bytes(out), "reset"
            except socket.timeout:
                return bytes(out), "timeout"
            if not data:
                return bytes(out), "eof"
            out += data
    finally:
        s.close()


def option(opt: int, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data) if length is None else length) + data


def string(s: bytes) -> bytes:
    return struct.pack(">I", len(s)) + s


def go_data(name: bytes, infos=(3,)) -> bytes:
    return string(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta_data(name: bytes, queries: list[bytes]) -> bytes:
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def request(cmd: int, offset: int, length: int, cookie: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)


# --- handshake fuzzing ------------------------------------------------------------------


def random_name(rng: random.Random) -> bytes:
    return rng.choice([b"fz", b"ro", b"", b"nope", rng.randbytes(rng.randrange(0, 300)),
                       b"x" * rng.choice([4096, 4097, 60000])])


def handshake_messages(rng: random.Random) -> list[bytes]:
    """A valid-looking handshake: client flags and one to six options."""
    msgs = [struct.pack(">I", rng.choice([3] * 9 + [1, 2, 0]))]
    for _ in range(rng.randint(1, 6)):
        name = random_name(rng)
        kind = rng.randrange(12)
        if kind == 0:
            msgs.append(option(OPT_LIST))
        elif kind == 1:
            msgs.append(option(OPT_INFO, go_data(name, [rng.randrange(5) for _ in range(rng.randrange(4))])))
        elif kind == 2:
            msgs.append(option(OPT_GO, go_data(name, [rng.randrange(5) for _ in range(rng.randrange(4))])))
        elif kind == 3:
            msgs.append(option(OPT_STRUCTURED_REPLY))
        elif kind in (4, 5):
            queries = [rng.choice([b"base:allocation", b"base:", b"qemu:", b"", rng.randbytes(20)])
                       for _ in range(rng.randrange(4))]
            msgs.append(option(OPT_SET_META if kind == 4 else OPT_LIST_META, meta_data(name, queries)))
        elif kind == 6:
            msgs.append(option(OPT_STARTTLS))
        elif kind == 7:
            msgs.append(option(OPT_ABORT))
        elif kind == 8:
            msgs.append(option(OPT_EXPORT_NAME, name))
        elif kind == 9:
            msgs.append(option(rng.randrange(1 << 32), rng.randbytes(rng.randrange(0, 200))))
        elif kind == 10:
            msgs.append(option(OPT_EXTENDED_HEADERS))
        else:  # a request as if transmission had begun
            msgs.append(request(rng.randrange(8), rng.randrange(SIZE), rng.randrange(4096), rng.randrange(1 << 64)))
    return msgs


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to three mutations: bit flips, truncation, inserted garbage, a
    length-sized field overwritten (often with a huge value), a repeated slice."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        m = rng.randrange(6)
        if m == 0 and b:
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif m == 1 and b:
            del b[rng.randrange(len(b)):]
        elif m == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 64))
        elif m == 3 and len(b) >= 4:
            i = rng.randrange(len(b) - 3)
            v = rng.choice([0, 1, 0xFFFFFFFF, 0x80000000, 65536, 65537, 4096, 4097, rng.randrange(1 << 32)])
            b[i:i + 4] = struct.pack(">I", v)
        elif m == 4 and b:
            i = rng.randrange(len(b))
            j = rng.randrange(i, min(len(b), i + 64) + 1)
            b[j:j] = b[i:j] * rng.randint(1, 4)
        else:
            b = bytearray(rng.randbytes(rng.randrange(0, 200)))  # garbage
    return bytes(b)


def check_handshake_output(out: bytes) -> None:
    """The greeting, then option replies that are well-formed for as long as
    they are option replies (after EXPORT_NAME the stream is transmission)."""
    assert len(out) >= 18, f"no greeting ({len(out)} bytes)"
    magic, ihaveopt, hflags = struct.unpack(">QQH", out[:18])
    assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT) and hflags == 3
    pos = 18
    while len(out) - pos >= 20 and struct.unpack_from(">Q", out, pos)[0] == OPT_REPLY_MAGIC:
        _, opt, rep, length = struct.unpack_from(">QIII", out, pos)
        assert rep in (REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT) or rep & (1 << 31), hex(rep)
        assert length <= 4096 + 8, f"option reply of {length} bytes"
        if rep == REP_ACK:
            assert length == 0
        pos += 20 + length
        assert pos <= len(out), "truncated option reply"


def run_handshake_case(path: str, i: int) -> str | None:
    rng = case_rng("handshake", i)
    msgs = handshake_messages(rng)
    r = rng.random()
    if r < 0.5:  # one option, the others intact: reaches deep into negotiation
        k = rng.randrange(1, len(msgs))
        msgs[k] = mutate(rng, msgs[k])
    elif r < 0.7:  # the options, after valid client flags
        msgs[1:] = [mutate(rng, b"".join(msgs[1:]))]
    elif r < 0.9:
        msgs = [mutate(rng, b"".join(msgs))]
    data = b"".join(msgs)
    # Sent in random pieces so the server parses across receive boundaries.
    chunks, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 3, 7, 64, 4096, len(data)])
        chunks.append(data[pos:pos + n])
        pos += n
    out, end = exchange(path, chunks)
    if end == "timeout":
        return f"handshake case {i}: the server did not close within {CASE_TIMEOUT} s"
    try:
        check_handshake_output(out)
    except AssertionError as e:
        return f"handshake case {i}: {e}"
    return None


# --- transmission fuzzing ----------------------------------------------------------------


@dataclass
class Req:
    cmd: int
    flags: int
    offset: int
    length: int
    cookie: int


@dataclass
class Session:
    """The negotiated state of a transmission case."""

    export: bytes
    structured: bool
    context: bool
    read_only: bool = False
    size: int = 0
    tflags: int = 0
    sent: list[Req] = field(default_factory=list)


def negotiate(rng: random.Random) -> tuple[Session, bytes]:
    s = Session(export=b"ro" if rng.random() < 0.15 else rng.choice([b"fz", b""]),
                structured=rng.random() < 0.7, context=False)
    s.read_only = s.export == b"ro"
    msgs = struct.pack(">I", 3)
    if s.structured:
        msgs += option(OPT_STRUCTURED_REPLY)
        if rng.random() < 0.7:
            msgs += option(OPT_SET_META, meta_data(s.export, [b"base:allocation"]))
            s.context = True
    msgs += option(OPT_GO, go_data(s.export))
    return s, msgs


def read_handshake(sock: socket.socket, s: Session) -> None:
    def recv_exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            c = sock.recv(n - len(buf))
            if not c:
                raise ConnectionError("closed during the handshake")
            buf += c
        return buf

    recv_exact(18)
    while True:
        _, opt, rep, length = struct.unpack(">QIII", recv_exact(20))
        data = recv_exact(length)
        assert not rep & (1 << 31), f"option {opt} refused: {data!r}"
        if opt == OPT_GO and rep == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
            _, s.size, s.tflags = struct.unpack(">HQH", data)
        if opt == OPT_GO and rep == REP_ACK:
            return


def random_request(rng: random.Random, cookie: int, budget: list[int]) -> tuple[Req, bytes]:
    cmd = rng.choices([READ, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS, -1],
                      weights=[30, 25, 5, 8, 5, 10, 12, 5])[0]
    if cmd == -1:
        cmd = rng.choice([8, 9, 12, 255, 0xFFFF, rng.randrange(1 << 16)])
    r = rng.random()
    flags = 0 if r < 0.6 else rng.choice([FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, 32]) if r < 0.85 \
        else rng.randrange(64) if r < 0.95 else rng.randrange(1 << 16)
    r = rng.random()
    offset = rng.randrange(0, SIZE // 512) * 512 if r < 0.7 else rng.randrange(SIZE) if r < 0.85 \
        else rng.choice([SIZE - 1, SIZE, SIZE + 4096, (1 << 63), (1 << 64) - 1, (1 << 64) - 512])
    r = rng.random()
    length = rng.choice([512, 4096, 65536]) if r < 0.5 else rng.randrange(0, 131072) if r < 0.8 \
        else rng.choice([0, 1, SIZE, SIZE + 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xFFFFFFFF])
    if cmd == READ and length <= MAX_PAYLOAD and length > budget[0]:
        length = min(budget[0], 4096)
    if cmd == READ and length <= MAX_PAYLOAD:
        budget[0] -= length
    payload = b""
    if cmd == WRITE:
        if length > MAX_PAYLOAD:
            pass  # a huge declared payload, not sent: the server must close
        else:
            length = min(length, 262144)
            payload = rng.randbytes(length)
    if cmd == FLUSH and rng.random() < 0.8:
        offset = length = 0
    req = Req(cmd, flags, offset, length, cookie)
    return req, request(cmd, offset, length, cookie, flags) + payload


def must_fail(s: Session, r: Req) -> bool:
    """Requests proto.md gives the server no way to carry out (independent of nbdbackup)."""
    if r.cmd not in (READ, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS):
        return True
    if r.flags & ~0x1F:  # undefined bits and PAYLOAD_LEN (no extended headers)
        return True
    if r.cmd != FLUSH and r.offset + r.length > s.size:
        return True
    if s.read_only and r.cmd in (WRITE, TRIM, WRITE_ZEROES):
        return True
    if r.cmd == BLOCK_STATUS and not s.context:
        return True
    if r.flags & DF and not s.structured:
        return True
    return False


def must_succeed(s: Session, r: Req) -> bool:
    """Plain valid reads, writes and flushes (FUA included: valid on every command)."""
    if r.flags not in (0, FUA) or r.offset + r.length > s.size or r.length > 262144:
        return False
    if r.cmd == READ:
        return True
    return r.cmd in (WRITE, FLUSH) and not s.read_only


def parse_replies(s: Session, out: bytes, complete: bool) -> None:
    """Check every reply against the request it answers."""
    reqs = {r.cookie: r for r in s.sent}
    final: dict[int, int] = {}  # cookie -> error (0 = success)
    covered: dict[int, int] = {}
    pos = 0
    while pos < len(out):
        assert len(out) - pos >= 4, "truncated reply"
        magic = struct.unpack_from(">I", out, pos)[0]
        if magic == SIMPLE_REPLY_MAGIC:
            assert len(out) - pos >= 16, "truncated simple reply"
            _, err, cookie = struct.unpack_from(">IIQ", out, pos)
            pos += 16
            assert cookie in reqs and cookie not in final, f"reply for unknown or answered cookie {cookie}"
            r = reqs[cookie]
            if s.structured:
                assert err != 0 or r.cmd not in (READ, BLOCK_STATUS), "simple success reply to READ/BLOCK_STATUS"
            if r.cmd == READ and err == 0:
                assert len(out) - pos >= r.length, "truncated READ data"
                pos += r.length
            final[cookie] = err
        elif magic == STRUCTURED_REPLY_MAGIC:
            assert s.structured, "structured reply without negotiation"
            assert len(out) - pos >= 20, "truncated chunk header"
            _, cflags, ctype, cookie, length = struct.unpack_from(">IHHQI", out, pos)
            pos += 20
            assert len(out) - pos >= length, "truncated chunk"
            body = out[pos:pos + length]
            pos += length
            assert cookie in reqs and cookie not in final, f"chunk for unknown or answered cookie {cookie}"
            r = reqs[cookie]
            err = 0
            if ctype in (T_ERROR, T_ERROR_OFFSET):
                err = struct.unpack_from(">I", body)[0]
                assert err != 0
                final.setdefault(-cookie, err)  # remember the error until DONE
            elif ctype == T_DATA:
                assert r.cmd == READ
                off = struct.unpack_from(">Q", body)[0]
                assert r.offset <= off and off + length - 8 <= r.offset + r.length
                covered[cookie] = covered.get(cookie, 0) + length - 8
            elif ctype == T_HOLE:
                assert r.cmd == READ and not r.flags & DF
                off, n = struct.unpack_from(">QI", body)
                assert r.offset <= off and off + n <= r.offset + r.length
                covered[cookie] = covered.get(cookie, 0) + n
            elif ctype == T_BLOCK_STATUS:
                assert r.cmd == BLOCK_STATUS and (length - 4) % 8 == 0 and length >= 12
                if r.flags & REQ_ONE:
                    assert length == 12 and struct.unpack_from(">I", body, 4)[0] <= r.length
            else:
                assert ctype == T_NONE and length == 0, f"chunk type {ctype}"
            if cflags & 1:  # DONE
                err = final.pop(-cookie, 0)
                final[cookie] = err
                if r.cmd == READ and err == 0:
                    assert covered.get(cookie, 0) == r.length, "READ chunks do not cover the request"
        else:
            raise AssertionError(f"bad reply magic {magic:#x} at byte {pos}")
    for cookie, err in final.items():
        if cookie < 0:
            continue
        r = reqs[cookie]
        if must_fail(s, r):
            assert err != 0, f"{r} succeeded"
        if must_succeed(s, r):
            assert err == 0, f"{r} failed with {err}"
    if complete:
        missing = [r for r in s.sent if r.cookie not in final]
        assert not missing, f"no reply to {missing[:3]} (of {len(missing)})"


def run_transmission_case(path: str, i: int) -> str | None:
    rng = case_rng("transmission", i)
    s, hello = negotiate(rng)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CASE_TIMEOUT)
    try:
        sock.connect(path)
        sock.sendall(hello)
        read_handshake(sock, s)
        budget = [1 << 20]  # READ bytes per case, so replies never fill both socket buffers
        stream = bytearray()
        ends = "eof"
        for n in range(rng.randint(1, 40)):
            req, data = random_request(rng, 1000 + n, budget)
            s.sent.append(req)
            stream += data
            if req.cmd == WRITE and req.length > MAX_PAYLOAD:
                ends = "violation"
                break
        else:
            r = rng.random()
            if r < 0.55:
                stream += request(DISC, 0, 0, 999)
                ends = "disc"
            elif r < 0.7:
                stream = bytearray(mutate(rng, bytes(stream)))
                ends = "mutated"
        out = bytearray()
        try:
            sock.sendall(stream)
            if ends != "disc":
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        deadline = time.monotonic() + CASE_TIMEOUT
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(1 << 20)
            except ConnectionResetError:
                break
            except socket.timeout:
                return f"transmission case {i} ({ends}): the server did not close within {CASE_TIMEOUT} s"
            if not data:
                break
            out += data
    except (OSError, AssertionError, ConnectionError) as e:
        return f"transmission case {i}: handshake: {type(e).__name__}: {e}"
    finally:
        sock.close()
    if ends == "mutated":
        return None  # the cookie bookkeeping no longer holds; closing was what counted
    try:
        parse_replies(s, bytes(out), complete=ends == "disc")
    except (AssertionError, struct.error) as e:
        return f"transmission case {i} ({ends}, structured={s.structured}): {e}"
    return None


# --- the tests ---------------------------------------------------------------------------


def fuzz(server, run_case, kind: str, factor: int = 1) -> None:
    good = GoodClient(server)
    good.start()
    t0 = time.monotonic()
    failures: list[str] = []
    indexes = case_indexes(factor)
    try:
        with ThreadPoolExecutor(WORKERS) as pool:
            for b in range(0, len(indexes), BATCH):
                batch = indexes[b:b + BATCH]
                failures += [f for f in pool.map(lambda i: run_case(server.socket, i), batch) if f]
                assert not failures, f"seed {SEED}: " + "\n".join(failures[:5])
                assert_server_ok(server, good)
    finally:
        good.stop_event.set()
        good.join(10)
    assert good.error is None, f"the well-behaved client failed: {good.error}"
    assert good.ops > 0
    assert hashlib.sha256(server.ro_image.read_bytes()).hexdigest() == server.ro_digest, "ro image changed"
    took = time.monotonic() - t0
    print(f"\n{kind}: {len(indexes)} cases (seed {SEED}) in {took:.1f} s; "
          f"the well-behaved client verified {good.ops} write+read pairs meanwhile")


#: Big runs (the knobs above) need more than pytest's default timeout.
LONG = pytest.mark.timeout(120 + CASES * 0.05)


@LONG
def test_fuzz_handshake(server):
    fuzz(server, run_handshake_case, "handshake", HANDSHAKE_FACTOR)


@LONG
def test_fuzz_transmission(server):
    fuzz(server, run_transmission_case, "transmission")


def test_must_fail_oracle_is_not_vacuous():
    """The oracle used above can fail: it rejects a success for a request past the end."""
    s = Session(export=b"fz", structured=False, context=False, size=SIZE, sent=[Req(READ, 0, SIZE, 4096, 1)])
    with pytest.raises(AssertionError):
        parse_replies(s, struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 1) + bytes(4096), complete=True)
    s.sent = [Req(READ, 0, 0, 4096, 1)]
    with pytest.raises(AssertionError):
        parse_replies(s, struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, EINVAL, 1), complete=True)
    with pytest.raises(AssertionError):
        parse_replies(s, b"", complete=True)


# --- churn -------------------------------------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def churn_cycle(path: str, i: int) -> None:
    rng = case_rng("churn", i)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CASE_TIMEOUT)
    try:
        s.connect(path)
        stage = rng.randrange(8)
        if stage >= 1:
            s.recv(18)
        if stage >= 2:
            s.sendall(struct.pack(">I", 3))
        if stage == 3:
            s.sendall(option(OPT_GO, go_data(b"fz"))[:rng.randrange(1, 20)])  # inside an option header
        if stage >= 4:
            s.sendall(option(OPT_STRUCTURED_REPLY) + option(OPT_GO, go_data(b"fz")))
        if stage >= 5:
            deadline = time.monotonic() + CASE_TIMEOUT
            got = b""
            while struct.pack(">QII", OPT_REPLY_MAGIC, OPT_GO, REP_ACK) not in got:
                got += s.recv(4096)
                assert time.monotonic() < deadline
        if stage == 5:
            s.sendall(request(READ, 0, 512, 1)[:rng.randrange(1, 28)])  # inside a request header
        elif stage == 6:
            s.sendall(request(WRITE, 0, 65536, 1) + bytes(rng.randrange(65536)))  # inside a payload
        elif stage == 7:
            s.sendall(b"".join(request(READ, 0, 262144, n) for n in range(16)))  # replies in flight
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        if rng.random() < 0.5:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        s.close()


@pytest.mark.timeout(120 + CHURN * 0.01)
def test_connection_churn_leaks_no_descriptors():
    with peers.nbdbackup_serve("fz=memory:1M") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("fz"))
        h.shutdown()
        time.sleep(0.3)
        baseline = fd_count(srv.pid)
        t0 = time.monotonic()
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(lambda i: churn_cycle(srv.socket, i), range(CHURN)))
        took = time.monotonic() - t0
        deadline = time.monotonic() + 15
        while fd_count(srv.pid) > baseline and time.monotonic() < deadline:
            time.sleep(0.1)
        now = fd_count(srv.pid)
        assert now <= baseline, f"{now - baseline} descriptors leaked after {CHURN} cycles"
        assert srv.alive()
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("fz"))
        h.pwrite(b"\x33" * 4096, 0)
        assert h.pread(4096, 0) == b"\x33" * 4096
        h.shutdown()
        print(f"\nchurn: {CHURN} cycles in {took:.1f} s; descriptors {baseline} -> {now}")
