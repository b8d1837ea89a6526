"""Raw-socket abuse of `nbdbackup serve`: the server must survive every one.

Each case talks to the server over a bare ``socket.socket(AF_UNIX)``, breaks
the protocol in one way, and then checks that (1) the server process is still
alive and (2) a well-behaved libnbd client can still read and write.  Where
the spec says what the server must answer (an option error, an error reply,
closing the connection) that is asserted too.

The wire layout here is written out from proto.md on purpose, independent of
nbdbackup.nbd.wire, so a bug there cannot hide a bug in the server.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest

import peers

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.interop

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 3, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP = (1 << 31) | 1
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
NBD_EINVAL, NBD_EOVERFLOW, NBD_ENOSPC, NBD_ENOMEM = 22, 75, 28, 12
SIZE = 1 << 20


@pytest.fixture(scope="module")
def server():
    with peers.nbdbackup_serve("mem=memory:1M", extra=["--handshake-timeout", "5"]) as srv:
        yield srv


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def closed_by_server(s: socket.socket, timeout: float = 10.0) -> bool:
    """True when the server closes the connection (EOF or reset) within ``timeout``."""
    s.settimeout(timeout)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


class Raw:
    """A bare NBD client connection for hand-made messages."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(path)

    def greeting(self) -> int:
        magic, opt, flags = struct.unpack(">QQH", recv_exact(self.s, 18))
        assert magic == NBDMAGIC and opt == IHAVEOPT
        assert flags & FLAG_FIXED_NEWSTYLE
        return flags

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def client_flags(self, flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> None:
        self.send(struct.pack(">I", flags))

    def option(self, opt: int, data: bytes = b"", length: int | None = None) -> None:
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data) if length is None else length) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", recv_exact(self.s, 20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return opt, rep, recv_exact(self.s, length)

    def go(self, name: str = "mem", structured: bool = False) -> tuple[int, int]:
        """Handshake to transmission with OPT_GO; returns (size, transmission flags)."""
        self.greeting()
        self.client_flags()
        if structured:
            self.option(OPT_STRUCTURED_REPLY)
            assert self.option_reply()[1] == REP_ACK
        n = name.encode()
        self.option(OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
        size = tflags = None
        while True:
            opt, rep, data = self.option_reply()
            assert opt == OPT_GO
            if rep == REP_ACK:
                break
            assert rep == REP_INFO, hex(rep)
            if struct.unpack(">H", data[:2])[0] == 0:
                _, size, tflags = struct.unpack(">HQH", data)
        assert size is not None
        return size, tflags

    def request(self, cmd: int, offset: int, length: int, cookie: int = 1, flags: int = 0,
                magic: int = REQUEST_MAGIC) -> None:
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length))

    def simple_reply(self) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", recv_exact(self.s, 16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        return error, cookie

    def close(self) -> None:
        self.s.close()


def assert_healthy(server) -> None:
    """The server lives and serves a fresh libnbd client correctly."""
    time.sleep(0.05)  # let the server process the abuse
    assert server.alive(), f"server died:\n{server.log()}"
    h = nbd.NBD()
    h.connect_uri(server.uri_for("mem"))
    data = bytes(range(256)) * 16
    h.pwrite(data, 8192)
    assert h.pread(len(data), 8192) == data
    h.flush()
    h.shutdown()


# --- handshake phase ------------------------------------------------------------

def abuse_garbage_client_flags(r: Raw):
    r.greeting()
    r.send(b"\xde\xad\xbe\xef" + b"GARBAGE!" * 64)
    assert closed_by_server(r.s)


def abuse_truncated_client_flags(r: Raw):
    r.greeting()
    r.send(b"\x00\x00")
    r.s.shutdown(socket.SHUT_WR)
    assert closed_by_server(r.s)


def abuse_option_before_flags(r: Raw):
    """An option header where the client flags belong: the flags are bogus."""
    r.greeting()
    r.option(OPT_LIST)
    assert closed_by_server(r.s)


def abuse_truncated_option_header(r: Raw):
    r.greeting()
    r.client_flags()
    r.send(struct.pack(">QII", IHAVEOPT, OPT_LIST, 0)[:11])
    r.s.shutdown(socket.SHUT_WR)
    assert closed_by_server(r.s)


def abuse_bad_option_magic(r: Raw):
    r.greeting()
    r.client_flags()
    r.send(struct.pack(">QII", 0x1122334455667788, OPT_LIST, 0))
    assert closed_by_server(r.s)


def abuse_oversize_option_length(r: Raw):
    r.greeting()
    r.client_flags()
    r.option(OPT_GO, b"\x00" * 100, length=0xFFFFFFF0)
    # The server must not wait for 4 GiB: it replies with an error and/or closes.
    try:
        head = recv_exact(r.s, 20)
    except (ConnectionError, socket.timeout) as e:
        assert not isinstance(e, socket.timeout), "server waits for a 4 GiB option payload"
        return  # closed: acceptable
    magic, opt, rep, _ = struct.unpack(">QIII", head)
    assert magic == OPT_REPLY_MAGIC and opt == OPT_GO and rep & (1 << 31), (hex(magic), hex(rep))


def abuse_oversize_export_name_option(r: Raw):
    r.greeting()
    r.client_flags()
    r.option(OPT_EXPORT_NAME, b"x" * 100, length=1 << 30)
    assert closed_by_server(r.s)


def abuse_unknown_option_then_abort(r: Raw):
    r.greeting()
    r.client_flags()
    r.option(0x7777, b"abc")
    opt, rep, _ = r.option_reply()
    assert opt == 0x7777 and rep == REP_ERR_UNSUP
    r.option(OPT_LIST)  # still negotiating normally
    names = []
    while True:
        opt, rep, data = r.option_reply()
        if rep == REP_ACK:
            break
        assert rep == REP_SERVER
        n = struct.unpack(">I", data[:4])[0]
        names.append(data[4:4 + n].decode())
    assert names == ["mem"]
    r.option(OPT_ABORT)
    try:
        opt, rep, _ = r.option_reply()  # an ACK is optional
        assert rep == REP_ACK
    except ConnectionError:
        pass


def abuse_go_with_truncated_payload(r: Raw):
    """OPT_GO whose name length points past the option payload."""
    r.greeting()
    r.client_flags()
    r.option(OPT_GO, struct.pack(">I", 1000) + b"mem" + struct.pack(">H", 0))
    opt, rep, _ = r.option_reply()
    assert opt == OPT_GO and rep & (1 << 31), hex(rep)


def abuse_hang_up_during_greeting(r: Raw):
    r.s.recv(5)


def abuse_many_quick_connections(r: Raw):
    r.close()
    for _ in range(50):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(r.path)
        s.close()


# --- transmission phase -----------------------------------------------------------

def abuse_bad_request_magic(r: Raw):
    r.go()
    r.request(CMD_READ, 0, 512, magic=0xDEADBEEF)
    assert closed_by_server(r.s)


def abuse_truncated_request_header(r: Raw):
    r.go()
    r.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1, 0, 512)[:13])
    r.s.shutdown(socket.SHUT_WR)
    assert closed_by_server(r.s)


def abuse_oversize_write_length(r: Raw):
    """A WRITE claiming a 4 GiB payload: error reply or disconnect, never a 4 GiB buffer."""
    r.go()
    r.request(CMD_WRITE, 0, 0xFFFFFFFF, cookie=7)
    try:
        r.send(b"\x01" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        return  # the server closed at once: acceptable
    try:
        head = recv_exact(r.s, 16)
    except (ConnectionError, socket.timeout) as e:
        assert not isinstance(e, socket.timeout), "server waits for a 4 GiB write payload"
        return  # closed: acceptable
    # An error reply is fine too (then the server must close: it cannot resync).
    magic, error, cookie = struct.unpack(">IIQ", head)
    assert magic == SIMPLE_REPLY_MAGIC and cookie == 7 and error != 0, (hex(magic), error, cookie)
    assert closed_by_server(r.s)


def abuse_write_past_end_with_payload(r: Raw):
    """An out-of-range WRITE: the payload is consumed, an error comes back, the connection lives."""
    r.go()
    r.request(CMD_WRITE, SIZE - 100, 4096, cookie=9)
    r.send(b"\x02" * 4096)
    error, cookie = r.simple_reply()
    assert cookie == 9 and error in (NBD_EINVAL, NBD_ENOSPC), error
    r.request(CMD_READ, 0, 16, cookie=10)
    error, cookie = r.simple_reply()
    assert (error, cookie) == (0, 10)
    recv_exact(r.s, 16)


def abuse_read_too_large(r: Raw):
    """A READ bigger than the export and than any sane limit: an error, not a crash."""
    r.go()
    r.request(CMD_READ, 0, 0xFFFFFFFF, cookie=3)
    try:
        error, cookie = r.simple_reply()
    except ConnectionError:
        return  # closing is acceptable too
    assert cookie == 3 and error in (NBD_EINVAL, NBD_EOVERFLOW, NBD_ENOMEM), error


def abuse_unknown_command(r: Raw):
    r.go()
    r.request(99, 0, 0, cookie=5)
    error, cookie = r.simple_reply()
    assert cookie == 5 and error == NBD_EINVAL
    r.request(CMD_FLUSH, 0, 0, cookie=6)
    assert r.simple_reply() == (0, 6)


def abuse_close_mid_payload(r: Raw):
    r.go()
    r.request(CMD_WRITE, 0, 1 << 20, cookie=11)
    r.send(b"\x03" * 1000)
    r.close()


def abuse_close_before_reading_reply(r: Raw):
    r.go()
    for i in range(8):
        r.request(CMD_READ, 0, SIZE, cookie=100 + i)
    r.close()


def abuse_disc_with_pending_data(r: Raw):
    r.go()
    r.request(CMD_WRITE, 4096, 4096, cookie=12)
    r.send(b"\x04" * 4096)
    r.request(CMD_DISC, 0, 0, cookie=13)
    # The write before DISC completes; then the server closes.
    assert r.simple_reply() == (0, 12)
    assert closed_by_server(r.s)


def abuse_structured_then_garbage(r: Raw):
    r.go(structured=True)
    r.request(CMD_READ, 0, 16, cookie=21)
    magic = struct.unpack(">I", recv_exact(r.s, 4))[0]
    assert magic == STRUCTURED_REPLY_MAGIC
    r.send(b"\xff" * 28)
    assert closed_by_server(r.s)


def abuse_unknown_export_via_export_name(r: Raw):
    """OPT_EXPORT_NAME cannot carry an error reply: an unknown name closes the connection."""
    r.greeting()
    r.client_flags()
    r.option(OPT_EXPORT_NAME, b"no-such-export")
    assert closed_by_server(r.s)


def abuse_go_with_missing_info_requests(r: Raw):
    """OPT_GO announcing 5 info requests but carrying none: ERR_INVALID, keep negotiating."""
    r.greeting()
    r.client_flags()
    r.option(OPT_GO, struct.pack(">I", 3) + b"mem" + struct.pack(">H", 5))
    opt, rep, _ = r.option_reply()
    assert opt == OPT_GO and rep & (1 << 31), hex(rep)
    n = b"mem"
    r.option(OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
    while True:
        opt, rep, _ = r.option_reply()
        assert not rep & (1 << 31), hex(rep)
        if rep == REP_ACK:
            break


def abuse_structured_reply_with_payload(r: Raw):
    r.greeting()
    r.client_flags()
    r.option(OPT_STRUCTURED_REPLY, b"junk")
    opt, rep, _ = r.option_reply()
    assert opt == OPT_STRUCTURED_REPLY and rep & (1 << 31), hex(rep)


def abuse_set_meta_context_before_structured(r: Raw):
    """SET_META_CONTEXT needs structured replies first (proto.md): an error reply."""
    r.greeting()
    r.client_flags()
    n, q = b"mem", b"base:allocation"
    r.option(10, struct.pack(">I", len(n)) + n + struct.pack(">I", 1) + struct.pack(">I", len(q)) + q)
    opt, rep, _ = r.option_reply()
    assert opt == 10 and rep & (1 << 31), hex(rep)


def abuse_export_name_too_long(r: Raw):
    r.greeting()
    r.client_flags()
    name = b"x" * 5000
    r.option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    try:
        opt, rep, _ = r.option_reply()
    except ConnectionError:
        return  # closing is acceptable
    assert rep & (1 << 31), hex(rep)


def abuse_pipelined_burst(r: Raw):
    """500 requests in one send, replies read afterwards: all answered, by cookie."""
    r.go()
    burst = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1000 + i, (i * 512) % SIZE, 512)
                     for i in range(500))
    r.send(burst)
    cookies = set()
    for _ in range(500):
        error, cookie = r.simple_reply()
        assert error == 0
        recv_exact(r.s, 512)
        cookies.add(cookie)
    assert cookies == set(range(1000, 1500))


ABUSES = [v for k, v in sorted(globals().items()) if k.startswith("abuse_")]


@pytest.mark.parametrize("client_flags", [FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, FLAG_FIXED_NEWSTYLE, 0],
                         ids=["fixed-nozeroes", "fixed", "plain-newstyle"])
def test_export_name_handshake(server, client_flags):
    """The oldest newstyle path (OPT_EXPORT_NAME), with and without NO_ZEROES padding."""
    r = Raw(server.socket)
    try:
        r.greeting()
        r.client_flags(client_flags)
        r.option(OPT_EXPORT_NAME, b"mem")
        size, tflags = struct.unpack(">QH", recv_exact(r.s, 10))
        assert size == SIZE and tflags & 1  # HAS_FLAGS
        if not client_flags & FLAG_NO_ZEROES:
            assert recv_exact(r.s, 124) == bytes(124)
        # Transmission works with simple replies.
        r.request(CMD_WRITE, 65536, 5, cookie=41)
        r.send(b"hello")
        assert r.simple_reply() == (0, 41)
        r.request(CMD_READ, 65536, 5, cookie=42)
        assert r.simple_reply() == (0, 42)
        assert recv_exact(r.s, 5) == b"hello"
        r.request(CMD_DISC, 0, 0, cookie=43)
        assert closed_by_server(r.s)
    finally:
        r.close()
    assert_healthy(server)


def test_plain_newstyle_client_may_only_send_export_name(server):
    r = Raw(server.socket)
    try:
        r.greeting()
        r.client_flags(0)
        r.option(OPT_LIST)
        assert closed_by_server(r.s)
    finally:
        r.close()
    assert_healthy(server)


@pytest.mark.parametrize("abuse", ABUSES, ids=[f.__name__[len("abuse_"):] for f in ABUSES])
def test_server_survives(server, abuse):
    r = Raw(server.socket)
    r.path = server.socket
    try:
        abuse(r)
    finally:
        r.close()
    assert_healthy(server)


def test_data_written_by_good_clients_survives_abuse(server):
    h = nbd.NBD()
    h.connect_uri(server.uri_for("mem"))
    h.pwrite(b"\x5a" * 65536, 512 * 1024)
    for abuse in (abuse_bad_request_magic, abuse_close_mid_payload, abuse_garbage_client_flags):
        r = Raw(server.socket)
        r.path = server.socket
        try:
            abuse(r)
        finally:
            r.close()
    assert h.pread(65536, 512 * 1024) == b"\x5a" * 65536  # the open connection is unharmed
    h.shutdown()
    assert_healthy(server)



def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_replies_is_bounded():
    """2 GiB of READ replies requested in one burst, none read: memory stays bounded.

    The server's own contract (nbd/server.py docstring): memory per connection
    is bounded by ``max_inflight`` requests plus the transport's high-water mark
    (64 x 1 MiB + 4 MiB here), even when the requests arrive in one segment.
    """
    with peers.nbdbackup_serve("mem=memory:1M") as server:
        assert_healthy(server)
        before = _rss_mib(server.pid)
        r = Raw(server.socket)
        try:
            r.go()
            reqs = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i, 0, SIZE) for i in range(2048))
            r.s.settimeout(5)
            try:
                r.send(reqs)
            except socket.timeout:
                pass  # the server stopped reading: back-pressure works
            peak = before
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                peak = max(peak, _rss_mib(server.pid))
                time.sleep(0.05)
            grown = peak - before
            assert grown < 256, f"server RSS grew by {grown:.0f} MiB for a client that reads nothing"
            assert_healthy(server)  # other clients are served meanwhile
        finally:
            r.close()
        assert_healthy(server)
