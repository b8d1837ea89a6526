"""Interop: hostile clients against NBD over TLS and remote control (hunt 6).

Raw sockets and Python's ``ssl`` play the hostile clients (the NBD wire is
written out here from proto.md); a real peer (nbdinfo, libnbd) plays the
well-behaved one that must keep getting in.  See docs/hunt6.md.

- Stalled TLS handshakes (STARTTLS acknowledged, a ClientHello, then
  nothing) at the per-uid cap: they are quiet like a stalled plain
  handshake, so a good TLS client is admitted within about a second, not
  after the stallers' handshake timeout.
- Remote control (``--control-listen``): hundreds of TCP connections that
  never finish a TLS handshake (anyone who can reach the port) against a
  server with a small file-descriptor limit: the NBD socket, the Unix
  control socket, an admitted remote session and a new authorized remote
  client all keep working (before: every connection took a descriptor until
  its 10 s handshake timeout, and the process ran out of them).
- Remote control sessions end without an error on the loop (asyncio).
- Closed TLS connections are freed when they close, not at the next full
  garbage collection (in process, with the collector off): the TLS layer
  keeps bound methods of the connection, a cycle that held about 20 MiB per
  closed connection of a client that had stopped reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import socket
import ssl
import struct
import subprocess
import time
import weakref

import pytest

import certs
import peers
from test_server_robustness import _rss_mib, recv_exact
from test_tls import tls_uri

from nbdbackup.nbd.wire import IHAVEOPT, NBDMAGIC, Opt, Rep

OPT_STARTTLS, REP_ACK = int(Opt.STARTTLS), int(Rep.ACK)

pytestmark = pytest.mark.interop


def client_hello() -> bytes:
    """The first flight of a TLS client (a ClientHello), from a memory BIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def starttls(path: str, timeout: float = 5.0) -> socket.socket:
    """A Unix connection past the greeting and the STARTTLS ACK."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    magic, opt, _ = struct.unpack(">QQH", recv_exact(s, 18))
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0))
    _, ropt, rep, n = struct.unpack(">QIII", recv_exact(s, 20))
    assert (ropt, rep, n) == (OPT_STARTTLS, REP_ACK, 0)
    return s


def closed_by_server(s: socket.socket, timeout: float) -> bool:
    """Whether the server closed ``s`` within ``timeout`` s (TLS bytes it
    sent meanwhile are read and dropped)."""
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            s.settimeout(max(0.01, end - time.monotonic()))
            if s.recv(65536) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        pass
    return False


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_stalled_tls_handshakes_do_not_lock_out_a_good_client(pki, short_tmp, loop):
    """4 connections (the per-uid cap) send STARTTLS and a ClientHello, then
    nothing.  nbdinfo over TLS from the same peer (uid) must get in within a
    few seconds: a stalled TLS handshake is quiet and evictable like a stalled
    plain one.  (Before: never quiet while upgrading, so nbdinfo was held
    until the stallers' handshake timeout, 30 s here.)"""
    creds = pki["server"]
    env = {"NBDBACKUP_NO_UVLOOP": "1"} if loop == "asyncio" else None
    extra = ["--tls-creds", creds, "--max-connections-per-uid", "4", "--handshake-timeout", "30"]
    with peers.nbdbackup_serve("m=memory:4M", extra=extra, env=env) as p:
        time.sleep(0.3)  # the readiness probe's connection is gone
        hello = client_hello()
        stallers = [starttls(p.socket) for _ in range(4)]
        for s in stallers:
            s.sendall(hello)
        time.sleep(0.6)  # past EVICT_QUIET
        t = time.monotonic()
        try:
            r = subprocess.run(["nbdinfo", "--size", tls_uri(p.socket, "m", creds)], capture_output=True,
                               text=True, timeout=8)
        except subprocess.TimeoutExpired:
            pytest.fail("nbdinfo over TLS was locked out by 4 stalled TLS handshakes")
        took = time.monotonic() - t
        assert r.returncode == 0 and r.stdout.strip() == str(4 << 20), r.stderr
        assert took < 4.0, took
        # The oldest staller made room; the others are still held open.
        states = [closed_by_server(s, 0.3) for s in stallers]
        assert states[0] and not all(states), states
        for s in stallers:
            s.close()
        assert p.alive() and "connection quiet in the handshake evicted" in p.log()


def _qmp_tls(port: int, creds: str) -> ssl.SSLSocket:
    """An admitted remote control session: TLS, greeting, capabilities."""
    ctx = ssl.create_default_context(cafile=os.path.join(creds, "ca-cert.pem"))
    ctx.load_cert_chain(os.path.join(creds, "client-cert.pem"), os.path.join(creds, "client-key.pem"))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    t = ctx.wrap_socket(raw, server_hostname="localhost")
    f = t.makefile("rb")
    assert "QMP" in json.loads(f.readline())
    t.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert json.loads(f.readline()) == {"return": {}}
    t._h6_file = f  # type: ignore[attr-defined]
    return t


def _qmp_call(t: ssl.SSLSocket, name: str) -> dict:
    t.sendall(json.dumps({"execute": name}).encode() + b"\n")
    return json.loads(t._h6_file.readline())  # type: ignore[attr-defined]


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_unauthenticated_control_connections_cannot_exhaust_the_server(pki, short_tmp, loop):
    creds = pki["server"]
    agent = certs.make_client(creds, short_tmp / "agent", "backup-agent-1")
    port = peers.free_tcp_port()
    ctl = str(short_tmp / "c.sock")
    env = {"NBDBACKUP_NO_UVLOOP": "1"} if loop == "asyncio" else None
    extra = ["--control", ctl, "--control-listen", f"127.0.0.1:{port}", "--control-tls-creds", creds,
             "--control-authz", "CN=backup-agent-*"]
    with peers.nbdbackup_serve("m=memory:4M", extra=extra, env=env) as p:
        peers.wait_for_tcp(port, p.alive, p.log)
        # A small descriptor limit stands in for systemd's default soft 1024.
        resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (160, 160))
        admitted = _qmp_tls(port, agent)
        hostile = []
        for i in range(300):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i % 100}", 0))  # many peers: no per-address rule helps
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            hostile.append(s)
        try:
            time.sleep(2.0)
            fds = len(os.listdir(f"/proc/{p.pid}/fd"))
            r = subprocess.run(["nbdinfo", "--size", p.uri_for("m")], capture_output=True, text=True, timeout=10)
            assert r.returncode == 0 and r.stdout.strip() == str(4 << 20), (fds, r.stderr)
            # The admitted session was not evicted; a new authorized client gets in.
            assert "return" in _qmp_call(admitted, "query-version")
            fresh = _qmp_tls(port, agent)
            assert "return" in _qmp_call(fresh, "query-block-exports")
            fresh.close()
            local = socket.socket(socket.AF_UNIX)
            local.settimeout(10)
            local.connect(ctl)
            assert "QMP" in json.loads(local.makefile("rb").readline())
            local.close()
            assert fds < 100, fds  # 32 remote slots plus the server's own
        finally:
            for s in hostile:
                s.close()
            admitted.close()
        assert p.alive() and "evicted (not authenticated or not authorized" in p.log()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_closed_tls_connections_are_freed_at_once(pki, loop):
    """With the garbage collector off, every server-side connection object of
    TLS clients that have gone must be freed by reference counting: a
    well-behaved client, and one that stopped reading pipelined 1 MiB READs
    (closed by the idle timeout)."""
    from nbdbackup.blockdev.memory import MemoryDev
    from nbdbackup.nbd.client import connect
    from nbdbackup.nbd.server import Server
    from nbdbackup.nbd.tls import ServerTLS

    creds = pki["server"]

    def non_reader(port: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0))
        recv_exact(s, 20)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(os.path.join(creds, "ca-cert.pem"))
        ctx.check_hostname = False
        t = ctx.wrap_socket(s)
        t.sendall(struct.pack(">QII", IHAVEOPT, 1, 1) + b"m")  # NBD_OPT_EXPORT_NAME
        got = b""
        while len(got) < 10:
            got += t.recv(10 - len(got))
        t.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, 1 << 20) for i in range(16)))
        return t

    async def main():
        srv = Server(tls=ServerTLS("require", creds), idle_timeout=1.0, workers=0)
        srv.add_export("m", MemoryDev(4 << 20))
        port = await srv.start_tcp("127.0.0.1", 0)
        refs = []
        try:
            async with await connect(f"nbds://127.0.0.1:{port}/m?tls-certificates={creds}") as c:
                refs += [weakref.ref(x) for x in srv.connections]
                assert len(await c.pread(4096, 0)) == 4096
            held = await asyncio.to_thread(non_reader, port)
            await asyncio.sleep(0.3)
            refs += [weakref.ref(x) for x in srv.connections]
            deadline = time.monotonic() + 10
            while srv.connections:  # the idle timeout closes the non-reader
                assert time.monotonic() < deadline, "the non-reading TLS client was not closed"
                await asyncio.sleep(0.1)
            held.close()
            await asyncio.sleep(0.3)
            alive = [r() for r in refs if r() is not None]
            assert len(refs) >= 2 and not alive, f"{len(alive)} of {len(refs)} closed connections still alive"
        finally:
            await srv.shutdown()

    kw = {}
    if loop == "uvloop":
        import uvloop

        kw["loop_factory"] = uvloop.new_event_loop
    gc.collect()
    gc.disable()
    try:
        with asyncio.Runner(**kw) as runner:
            runner.run(asyncio.wait_for(main(), 60))
    finally:
        gc.enable()


def test_remote_control_sessions_end_without_errors(pki):
    """Remote control sessions that end (client closes) leave no error on
    the loop: on asyncio's TLS transport `_Session.abort` after close used to
    raise AttributeError in every session's task ("Task exception was never
    retrieved" once collected).  (asyncio only: uvloop's transport never
    raised there.)"""
    from nbdbackup.control.qmp import QMPServer
    from nbdbackup.control.remote import ControlAuthz
    from nbdbackup.nbd.tls import ServerTLS

    creds = pki["server"]
    errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        q = QMPServer()
        port = await q.start_tcp("127.0.0.1", 0, ServerTLS("require", creds, verify_peer=True).context(),
                                 ControlAuthz(full=("*",)).classify)
        ctx = ssl.create_default_context(cafile=os.path.join(creds, "ca-cert.pem"))
        ctx.load_cert_chain(os.path.join(creds, "client-cert.pem"), os.path.join(creds, "client-key.pem"))
        try:
            for _ in range(3):
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
                assert b"QMP" in await r.readline()
                w.write(b'{"execute": "qmp_capabilities"}\n')
                assert json.loads(await r.readline()) == {"return": {}}
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
            deadline = time.monotonic() + 5
            while q.client_count:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
            gc.collect()  # a failed task reports its exception when collected
            await asyncio.sleep(0.1)
        finally:
            await q.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert not errors, [str(e.get("exception") or e.get("message")) for e in errors]


def test_failed_tls_handshakes_cannot_flood_the_log(pki, short_tmp):
    """300 connections that fail their TLS handshake one after another (an
    HTTP request after the STARTTLS ACK): the warnings of connections still
    negotiating share the server's admission budget (20 per 2 s), so the log
    gets a few dozen of them, not one per connection."""
    creds = pki["server"]
    with peers.nbdbackup_serve("m=memory:4M", extra=["--tls-creds", creds]) as p:
        t = time.monotonic()
        for _ in range(300):
            s = starttls(p.socket)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            closed_by_server(s, 5)
            s.close()
        took = time.monotonic() - t
        r = subprocess.run(["nbdinfo", "--size", tls_uri(p.socket, "m", creds)], capture_output=True, text=True,
                           timeout=10)
        assert r.returncode == 0, r.stderr
        n = p.log().count("TLS handshake failed")
        assert p.alive() and 1 <= n <= 20 * (took / 2 + 2), (n, took)


def test_memory_of_a_wave_of_stalled_tls_handshakes_goes_back(pki):
    """240 connections stall in the TLS handshake (~0.4 MiB of TLS state
    each) until the handshake timeout closes them.  The server must give
    that memory back once they are gone (a heap trim after a wave of closed
    connections); before, glibc kept the freed heap: +28 MiB after one such
    round, growing towards the round's peak with every further round
    (docs/hunt6.md, "Left")."""
    creds = pki["server"]
    extra = ["--tls-creds", creds, "--max-connections-per-peer", "250", "--max-connections", "260",
             "--handshake-timeout", "1"]
    with peers.nbdbackup_serve("m=memory:4M", extra=extra) as p:
        time.sleep(0.5)  # the readiness probe's connection is gone
        pid = p.proc.pid
        start = _rss_mib(pid)
        hello = client_hello()
        stallers = []
        for _ in range(240):
            s = starttls(p.socket)
            s.sendall(hello)
            stallers.append(s)
        peak = _rss_mib(pid)
        for s in stallers:
            closed_by_server(s, 3)  # the handshake timeout
            s.close()
        time.sleep(2.0)  # the trim follows the wave's last close by HEAP_TRIM_QUIET (1 s)
        after = _rss_mib(pid)
        assert peak > start + 40, (start, peak)  # the wave did cost memory
        assert after < start + 12, f"RSS {start:.1f} MiB at start, {peak:.1f} during, {after:.1f} after"
        r = subprocess.run(["nbdinfo", "--size", tls_uri(p.socket, "m", creds)], capture_output=True, text=True,
                           timeout=10)
        assert r.returncode == 0 and p.alive(), r.stderr
