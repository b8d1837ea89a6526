"""A TCP client that sends READs and never reads the replies, its receive
window closed (docs/doubts18.md item 2), against a real `nbdbackup serve` on
127.0.0.1.

Its kernel answers the server's zero-window probes, so keepalive never
judges it dead; what ends it is TCP_USER_TIMEOUT (``--dead-peer-timeout``),
which Linux >= 5.11 applies to zero-window probing, or -- when it holds
buffer memory another client waits for -- the memory eviction
(`Server._relieve_memory`).  Checked here, with and without worker
processes and over TLS: another client is served meanwhile, the stalled
connection's server side is gone within a generous bound of the dead-peer
timeout; and an evicted staller's unsent replies are dropped with the
connection (a reset), not left in the kernel in an orphaned FIN-WAIT-1
socket until the dead-peer timeout.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import time

import pytest

import peers

nbd = pytest.importorskip("nbd")

MiB = 1 << 20
IHAVEOPT = 0x49484156454F5054


def recvn(s: socket.socket, n: int) -> bytes:
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        assert c, "server closed the connection during the handshake"
        b += c
    return b


def staller(port: int, pki: dict | None, reads: int = 200) -> socket.socket:
    """Connect with a 4 KiB receive buffer, enter transmission (STARTTLS first when
    ``pki``), send ``reads`` READs of 1 MiB, and return the socket, never read again."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    recvn(s, 18)
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    if pki is not None:
        s.sendall(struct.pack(">QII", IHAVEOPT, 5, 0))  # NBD_OPT_STARTTLS
        _, _, rep, ln = struct.unpack(">QIII", recvn(s, 20))
        recvn(s, ln)
        assert rep == 1, rep  # NBD_REP_ACK
        ctx = ssl.create_default_context(cafile=os.path.join(pki["server"], "ca-cert.pem"))
        ctx.load_cert_chain(os.path.join(pki["server"], "client-cert.pem"),
                            os.path.join(pki["server"], "client-key.pem"))
        s = ctx.wrap_socket(s, server_hostname="localhost")
    s.sendall(struct.pack(">QII", IHAVEOPT, 1, 4) + b"disk")  # NBD_OPT_EXPORT_NAME
    recvn(s, 10)
    reqs = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i % 63) * MiB, MiB) for i in range(reads))
    s.setblocking(False)
    sent, t = 0, time.monotonic()
    while sent < len(reqs) and time.monotonic() - t < 3:
        try:
            sent += s.send(reqs[sent:sent + 65536])
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            time.sleep(0.01)
    return s


def server_side(port: int, client_port: int | None = None) -> list[list[str]]:
    """The server's TCP sockets of ``port`` (``ss`` rows: state, recv-q, send-q, local,
    peer), those to ``client_port`` only when given; listeners excluded."""
    out = subprocess.run(["ss", "-Htn", "state", "all", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    rows = [r for r in rows if r[0] != "LISTEN"]
    if client_port is not None:
        rows = [r for r in rows if r[4].endswith(f":{client_port}")]
    return rows


def good_reads(port: int, pki: dict | None, n: int = 32) -> float:
    """Seconds a libnbd client takes to connect and read ``n`` MiB."""
    h = nbd.NBD()
    t = time.monotonic()
    try:
        if pki is not None:
            h.set_uri_allow_local_file(True)
            h.connect_uri(f"nbds://127.0.0.1:{port}/disk?tls-certificates={pki['server']}")
        else:
            h.connect_uri(f"nbd://127.0.0.1:{port}/disk")
        for i in range(n):
            h.pread(MiB, i * MiB)
        return time.monotonic() - t
    finally:
        h.shutdown()


@pytest.fixture
def disk(short_tmp):
    path = short_tmp / "disk.img"
    with open(path, "wb") as f:
        f.write(os.urandom(64 * MiB))
    return str(path)


def serve_args(port: int, pki: dict | None, *extra: str) -> list[str]:
    args = ["--listen", f"127.0.0.1:{port}", *extra]
    return args + (["--tls-creds", pki["server"]] if pki is not None else [])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [None, "0"], ids=["workers", "no-workers"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_stalled_reader_is_reset_by_the_dead_peer_timeout(disk, tls, workers, request):
    """Slot and memory of a reader with a closed window come back about the
    dead-peer timeout (3 s) after its last acknowledgement; with the
    timeout off (0) it would be kept for ever (measured: still there after
    20 s).  Another client is served meanwhile."""
    pki = request.getfixturevalue("pki") if tls else None
    port = peers.free_tcp_port()
    extra = serve_args(port, pki, "--dead-peer-timeout", "3", *(["--workers", workers] if workers else []))
    with peers.nbdbackup_serve(f"disk={disk}", extra=extra) as srv:
        peers.wait_for_tcp(port, lambda: srv.alive, srv.log)
        t0 = time.monotonic()
        s = staller(port, pki)
        try:
            cport = s.getsockname()[1]
            while True:  # replies queued in the kernel, not taken
                rows = server_side(port, cport)
                if rows and int(rows[0][2]) > 0:
                    break
                assert time.monotonic() - t0 < 3, rows
                time.sleep(0.05)
            assert good_reads(port, pki) < 20
            while server_side(port, cport):
                assert time.monotonic() - t0 < 3 + 12, (server_side(port, cport), srv.log()[-2000:])
                time.sleep(0.1)
            took = time.monotonic() - t0
            print(f"stalled reader reset after {took:.1f} s (dead-peer timeout 3 s)")
        finally:
            s.close()


@pytest.mark.timeout(120)
def test_an_evicted_stalled_reader_leaves_no_orphaned_send_queue(disk):
    """Eight stallers hold the buffer memory (64 MiB) a good client waits for:
    they are evicted one by one (each is granted the memory the previous one
    gave back, then evicted `EVICT_QUIET` s later), the good client is served,
    and no evicted socket stays in the kernel with its unsent replies: before
    doubts18 each stayed in FIN-WAIT-1 with ~6 MiB of send queue until the
    dead-peer timeout (60 s; 24 stallers: 136 MiB of kernel memory)."""
    port = peers.free_tcp_port()
    extra = serve_args(port, None, "--workers", "0", "--max-buffer-memory", "64M")
    with peers.nbdbackup_serve(f"disk={disk}", extra=extra) as srv:
        peers.wait_for_tcp(port, lambda: srv.alive, srv.log)
        stallers = [staller(port, None) for _ in range(8)]
        try:
            took = good_reads(port, None)
            print(f"good client served in {took:.1f} s beside 8 stallers")
            assert took < 30
            assert srv.log().count("and stalls") >= 1, srv.log()[-3000:]
            time.sleep(1.0)
            evicted = [r for r in server_side(port) if r[0] != "ESTAB"]
            assert not evicted, evicted
        finally:
            for s in stallers:
                s.close()
