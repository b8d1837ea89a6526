"""Interop: NBD over TLS (NBD_OPT_STARTTLS, X.509), both directions, real peers.

Certificates are made with the openssl CLI per test session (the ``pki``
fixture, `certs.make_pki`): a CA, a server certificate for localhost /
127.0.0.1 / ::1 and a client certificate, laid out as QEMU's
``tls-creds-x509``, nbdkit's ``--tls-certificates`` and libnbd's
``tls-certificates`` expect (one directory serves all three); a second,
unrelated CA makes the "wrong CA" cases.

Checked:
- our server (``serve --tls-creds``, FORCEDTLS by default) with nbdinfo,
  nbdcopy (byte-exact copy), qemu-io and qemu-img over TLS; plain clients
  are refused with the TLS-required error (qemu: "TLS negotiation required");
- ``--tls on`` serves plain and TLS clients; ``--tls-verify-peer`` refuses a
  client without a certificate and accepts one with;
- our client over TLS against qemu-nbd and nbdkit (data both ways), against
  our own server over TCP with the certificate's IP checked, and re-exported
  through `NBDDev` (``serve local=nbds+unix://...``);
- our client refuses a server whose certificate another CA signed, a wrong
  ``tls-hostname``, and a server without TLS (no downgrade); with
  ``tls-verify-peer=false`` it accepts the unknown CA;
- bad TLS options of ``serve`` fail at start with one clear line.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import peers
from nbdbackup.errors import ConnectionClosed, OptionError
from nbdbackup.nbd.client import connect, connect_blocking
from nbdbackup.nbd.uri import parse_uri

M = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def tls_uri(sock: str, export: str, certs: str, extra: str = "") -> str:
    return f"nbds+unix:///{export}?socket={sock}&tls-certificates={certs}{extra}"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def sh(*argv: str, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=60)
    if ok:
        assert r.returncode == 0, f"{argv}: {r.stderr}"
    return r


def qemu_tls_opts(sock: str, export: str, creds: str) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client",
            "--image-opts", f"driver=nbd,server.type=unix,server.path={sock},export={export},"
                            "tls-creds=tls0,tls-hostname=localhost"]


async def roundtrip(uri: str, offset: int = 3 * M) -> None:
    """Write a block through ``uri`` and read it back on a second TLS connection."""
    data = os.urandom(256 * 1024)
    async with await connect(uri) as c:
        await c.pwrite(data, offset, fua=True)
    async with await connect(uri) as c:
        assert await c.pread(len(data), offset) == data


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_our_server_with_real_tls_clients(pki, short_tmp, loop):
    disk = short_tmp / "disk.raw"
    disk.write_bytes(os.urandom(8 * M))
    env = {"NBDBACKUP_NO_UVLOOP": "1"} if loop == "asyncio" else None
    with peers.nbdbackup_serve(f"d={disk}", extra=["--tls-creds", pki["server"]], env=env) as p:
        uri = tls_uri(p.socket, "d", pki["server"])
        out = sh("nbdinfo", uri).stdout
        assert "with TLS" in out and "export-size: 8388608" in out
        copy = short_tmp / "copy.raw"
        sh("nbdcopy", uri, str(copy))
        assert copy.read_bytes() == disk.read_bytes()
        q = qemu_tls_opts(p.socket, "d", pki["server"])
        r = sh("qemu-io", *q, "-c", "write -P 0x5c 1M 64k", "-c", "read -P 0x5c 1M 64k")
        assert "read 65536/65536" in r.stdout
        assert disk.read_bytes()[M:M + 65536] == b"\x5c" * 65536
        assert "virtual size: 8 MiB" in sh("qemu-img", "info", *q).stdout
        run(roundtrip(uri))
        # Plain clients are refused before they learn anything.
        r = sh("nbdinfo", p.uri_for("d"), ok=False)
        assert r.returncode != 0
        r = sh("qemu-img", "info", "--image-opts", f"driver=nbd,server.type=unix,server.path={p.socket},export=d",
               ok=False)
        assert r.returncode != 0 and "TLS negotiation required" in r.stderr, r.stderr

        async def plain():
            with pytest.raises(OptionError, match="requires TLS"):
                await connect(p.uri_for("d"))
        run(plain())
        assert p.alive()
        assert "TLS" in p.log()


def test_tls_on_serves_plain_and_tls_clients(pki, short_tmp):
    with peers.nbdbackup_serve("m=memory:4M", extra=["--tls-creds", pki["server"], "--tls", "on"]) as p:
        run(roundtrip(tls_uri(p.socket, "m", pki["server"]), M))
        run(roundtrip(p.uri_for("m"), 2 * M))
        assert "with TLS" in sh("nbdinfo", tls_uri(p.socket, "m", pki["server"])).stdout
        assert "without TLS" in sh("nbdinfo", p.uri_for("m")).stdout


def test_verify_peer_requires_a_client_certificate(pki, short_tmp):
    with peers.nbdbackup_serve("m=memory:4M", extra=["--tls-creds", pki["server"], "--tls-verify-peer"]) as p:
        run(roundtrip(tls_uri(p.socket, "m", pki["server"])))  # presents client-cert.pem
        assert sh("nbdinfo", tls_uri(p.socket, "m", pki["server"])).returncode == 0
        assert sh("nbdinfo", tls_uri(p.socket, "m", pki["noclient"]), ok=False).returncode != 0

        async def without_cert():
            with pytest.raises((ConnectionClosed, OptionError)):
                c = await connect(tls_uri(p.socket, "m", pki["noclient"]))
                await c.pread(512, 0)  # TLS 1.3: the refusal may come with the first read
        run(without_cert())
        assert p.alive()


def test_our_client_against_qemu_nbd_and_nbdkit(pki, short_tmp):
    img = short_tmp / "q.raw"
    img.write_bytes(bytes(8 * M))
    creds = pki["server"]
    with peers.qemu_nbd(img, name="q", extra=["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=server",
                                               "--tls-creds", "tls0"]) as q:
        run(roundtrip(tls_uri(q.socket, "q", creds)))  # qemu verifies our client certificate
    with peers.nbdkit("memory", "8M", extra=["--tls=require", f"--tls-certificates={creds}"]) as k:
        uri = tls_uri(k.socket, "", creds)
        run(roundtrip(uri))

        async def plain():
            with pytest.raises(OptionError, match="requires TLS"):
                await connect(k.uri)
        run(plain())


def test_a_refused_export_over_tls_ends_with_opt_abort_and_a_clean_tls_close(pki, short_tmp):
    """proto.md: a client ending option haggling uses a soft disconnect --
    NBD_OPT_ABORT, then TLS shut down, then the close -- on both connect paths
    (asyncio, and the pull threads' blocking one).  nbdkit -v says what it got;
    before hunt 14 it logged "The TLS connection was non-properly terminated"."""
    creds = pki["server"]
    with peers.nbdkit("memory", "1M", "exportname=disk", "exportname-strict=true", filters=["exportname"],
                      extra=["-v", "--tls=require", f"--tls-certificates={creds}"]) as k:
        uri = tls_uri(k.socket, "nope", creds)

        async def refused():
            with pytest.raises(OptionError):
                await connect(uri, connect_timeout=10)
            u = parse_uri(uri)
            with pytest.raises(OptionError):
                await asyncio.to_thread(connect_blocking, u, u.export, timeout=10)
        run(refused())
        deadline = time.monotonic() + 5
        while k.log().count("client sent NBD_OPT_ABORT") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        log = k.log()
        assert log.count("client sent NBD_OPT_ABORT") == 2, log[-2000:]
        assert "non-properly terminated" not in log


def test_nbddev_reexports_a_tls_source(pki, short_tmp):
    creds = pki["server"]
    with peers.nbdkit("pattern", "4M", extra=["--tls=require", f"--tls-certificates={creds}"]) as k:
        with peers.nbdbackup_serve(f"r={tls_uri(k.socket, '', creds)}") as p:
            async def main():
                async with await connect(p.uri_for("r")) as c:
                    assert c.size == 4 * M
                    return bytes(await c.pread(16, 8 * 4096))
            assert run(main()) == (8 * 4096).to_bytes(8, "big") + (8 * 4096 + 8).to_bytes(8, "big")


def test_tcp_hostname_checked(pki, short_tmp):
    port = peers.free_tcp_port()
    creds = pki["server"]
    with peers.nbdbackup_serve("m=memory:4M", extra=["--listen", f"127.0.0.1:{port}", "--tls-creds", creds]) as p:
        peers.wait_for_tcp(port, p.alive, p.log)
        run(roundtrip(f"nbds://127.0.0.1:{port}/m?tls-certificates={creds}", M))  # IP SAN checked

        async def wrong_name():
            with pytest.raises(ConnectionClosed, match="TLS handshake"):
                await connect(f"nbds://127.0.0.1:{port}/m?tls-certificates={creds}&tls-hostname=evil.example")
        run(wrong_name())
        assert "with TLS" in sh("nbdinfo", f"nbds://127.0.0.1:{port}/m?tls-certificates={creds}").stdout


def test_client_refuses_unknown_ca_and_downgrade(pki, short_tmp):
    with peers.nbdbackup_serve("m=memory:4M", extra=["--tls-creds", pki["rogue"]]) as rogue:
        async def unknown_ca():
            with pytest.raises(ConnectionClosed, match="certificate verify failed"):
                await connect(tls_uri(rogue.socket, "m", pki["server"]))
            # Explicitly unverified: accepted.
            await roundtrip(tls_uri(rogue.socket, "m", pki["server"], "&tls-verify-peer=false"))
        run(unknown_ca())
    with peers.nbdbackup_serve("m=memory:4M") as plain:
        async def downgrade():
            with pytest.raises(OptionError, match="refused TLS"):
                await connect(tls_uri(plain.socket, "m", pki["server"]))
        run(downgrade())


@pytest.mark.parametrize("args,message", [
    (["--tls", "require"], "needs --tls-creds"),
    (["--tls-creds", "/nonexistent/pki"], "does not exist"),
    (["--tls-creds", "EMPTY"], "cannot load"),
    (["--tls", "off", "--tls-verify-peer"], "contradicts"),
])
def test_serve_tls_option_errors(short_tmp, args, message):
    args = [str(short_tmp) if a == "EMPTY" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "nbdbackup.cli", "serve", "--socket", str(short_tmp / "s.sock"),
                        *args, "m=memory:1M"], cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=30)
    assert r.returncode == 1, r
    assert message in r.stderr and r.stderr.count("\n") <= 2, r.stderr
    assert not (short_tmp / "s.sock").exists()


# -- access control (nbd.access) ----------------------------------------------------


def test_tls_authz_admits_matching_certificates_only(pki, short_tmp):
    creds = pki["server"]
    with peers.nbdbackup_serve("m=memory:4M", extra=["--tls-creds", creds,
                                                     "--tls-authz", "CN=nbdbackup test client"]) as p:
        run(roundtrip(tls_uri(p.socket, "m", creds)))
        assert sh("nbdinfo", tls_uri(p.socket, "m", pki["noclient"]), ok=False).returncode != 0
    with peers.nbdbackup_serve("m=memory:4M", extra=["--tls-creds", creds, "--tls-authz", "CN=backup-agent-*"]) as p:
        async def refused():
            with pytest.raises(OptionError, match="CN=nbdbackup test client.* is not authorized"):
                await connect(tls_uri(p.socket, "m", creds))
        run(refused())
        r = sh("nbdinfo", tls_uri(p.socket, "m", creds), ok=False)
        assert r.returncode != 0
        assert p.alive() and "is not authorized" in p.log()


def test_unix_socket_user_allowlist(short_tmp):
    me, other = str(os.getuid()), str(os.getuid() + 4242)
    with peers.nbdbackup_serve("m=memory:4M", extra=["--allow-user", me]) as p:
        run(roundtrip(p.uri_for("m")))
    with peers.nbdbackup_serve("m=memory:4M", extra=["--allow-user", other]) as p:
        async def refused():
            with pytest.raises(OptionError, match=f"uid {me} / gid .* is not allowed"):
                await connect(p.uri_for("m"))
        run(refused())
        r = sh("nbdinfo", p.uri_for("m"), ok=False)
        assert r.returncode != 0
        assert p.alive()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])  # (the race shows under asyncio's sslproto)
def test_options_sent_with_the_tls_handshake_are_still_checked(pki, short_tmp, loop):
    """A client may send options in the same flight as its TLS Finished; they
    reach the server before its upgrade completes and must still be refused
    when access control refuses the certificate (raw client, blocking ssl)."""
    import ssl
    import struct as st

    from nbdbackup.nbd import wire
    from nbdbackup.nbd.wire import Opt, Rep

    creds = pki["server"]
    env = {"NBDBACKUP_NO_UVLOOP": "1"} if loop == "asyncio" else None
    with peers.nbdbackup_serve("m=memory:4M", extra=["--tls-creds", creds, "--tls-authz", "CN=nobody"],
                               env=env) as p:
        for _ in range(5):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(p.socket)
            greeting = s.recv(18, socket.MSG_WAITALL)
            assert len(greeting) == 18
            s.sendall(wire.CLIENT_FLAGS.pack(3) + wire.pack_option(Opt.STARTTLS))
            hdr = s.recv(20, socket.MSG_WAITALL)
            assert wire.OPTION_REPLY.unpack(hdr)[2] == Rep.ACK
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(os.path.join(creds, "ca-cert.pem"))
            ctx.load_cert_chain(os.path.join(creds, "client-cert.pem"), os.path.join(creds, "client-key.pem"))
            ctx.check_hostname = False
            t = ctx.wrap_socket(s)
            name = b"m"
            t.sendall(wire.pack_option(Opt.GO, st.pack(">I", len(name)) + name + st.pack(">H", 0)))
            hdr = b""
            while len(hdr) < 20:
                hdr += t.recv(20 - len(hdr))
            _, opt, rep, n = wire.OPTION_REPLY.unpack(hdr)
            assert (opt, rep) == (Opt.GO, Rep.ERR_POLICY), (opt, hex(rep))
            t.close()
        assert p.alive()


def test_pull_and_verify_over_tls(pki, short_tmp):
    creds = pki["server"]
    disk = short_tmp / "disk.raw"
    disk.write_bytes(os.urandom(6 * M) + bytes(2 * M))
    with peers.nbdbackup_serve(f"d={disk}", extra=["--tls-creds", creds]) as p:
        uri = tls_uri(p.socket, "d", creds)
        out, man = short_tmp / "out.raw", short_tmp / "m.json"
        r = subprocess.run([sys.executable, "-m", "nbdbackup.cli", "pull", uri, str(out), "--manifest", str(man)],
                           cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=60)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == disk.read_bytes()
        r = subprocess.run([sys.executable, "-m", "nbdbackup.cli", "verify", uri, "--manifest", str(man)],
                           cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=60)
        assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr


def test_tls_pull_receives_on_threads_over_connections_of_their_own(pki, short_tmp, monkeypatch):
    """A TLS pull reads on blocking threads too (issue 12): each opens a TLS connection of its
    own (asyncio's TLS transport cannot be lent), from our server and from nbdkit, byte-exact;
    NBDBACKUP_PULL_TLS_THREADS=0 falls back and says why.  The asyncio connections, idle
    meanwhile, are kept alive against the server's idle timeout: after a pull that outlasted
    it (a slow sink), the source answers on the same connection; without the keep-alive it
    was closed and had to be reopened."""
    import json

    from nbdbackup.agent import pullthreads
    from nbdbackup.agent.pull import pull
    from nbdbackup.blockdev.nbd import NBDDev

    creds = pki["server"]
    disk = short_tmp / "disk.raw"
    data = os.urandom(20 * M) + bytes(4 * M) + os.urandom(3 * M + 4096)
    disk.write_bytes(data)

    def cli_pull(uri: str, out: Path, **env) -> dict:
        r = subprocess.run([sys.executable, "-m", "nbdbackup.cli", "pull", uri, str(out), "--json"], cwd=ROOT,
                           capture_output=True, text=True, errors="replace", timeout=120, env={**os.environ, **env})
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == data
        return json.loads(r.stdout)

    with peers.nbdbackup_serve(f"d={disk}", extra=["--tls-creds", creds, "--unix-idle-timeout", "1"]) as p:
        uri = tls_uri(p.socket, "d", creds)
        assert cli_pull(uri, short_tmp / "a.raw")["receive"] == "threads"
        st = cli_pull(uri, short_tmp / "b.raw", NBDBACKUP_PULL_TLS_THREADS="0")
        assert st["receive"] == "asyncio" and "TLS" in st["receive_note"]

        async def slow(keepalive: float) -> tuple[bool, bool]:
            """(the source reads after the pull, its connection is the one from before it)."""
            monkeypatch.setattr(pullthreads, "KEEPALIVE", keepalive)

            one_at_a_time = asyncio.Lock()  # the threads hand up to nbuf chunks at once

            async def sink(i, d, chunk):
                async with one_at_a_time:
                    # 6 data chunks: >= 2.1 s, safely past the 1 s idle timeout and the 0.5 s
                    # tick (concurrent sinks made the pull ~1.5 s: a race, one CI failure)
                    await asyncio.sleep(0.35)
                return None

            src = await NBDDev.open(uri, read_only=True, connections=1)
            first = src.clients[0]
            try:
                _, stats = await pull(src, None, chunk_size=4 * M, workers=1, sink=sink)
                assert stats.receive == "threads"
                buf = bytearray(4096)
                await src.pread(buf, 20 * M - 4096)
                return bytes(buf) == data[20 * M - 4096:20 * M], src.clients[0] is first
            finally:
                await src.close()

        assert run(slow(0.2)) == (True, True)  # kept alive: the same connection
        # Without keep-alive the server's idle timeout closed it (the check can fail), and
        # `NBDDev.reopen_lost` replaced it: the source still reads.
        assert run(slow(1000.0)) == (True, False)

    with peers.nbdkit("file", str(disk), extra=["--tls=require", f"--tls-certificates={creds}"]) as k:
        assert cli_pull(tls_uri(k.socket, "", creds), short_tmp / "c.raw")["receive"] == "threads"


@pytest.mark.parametrize("cap", [4, 2])
def test_tls_pull_at_a_per_uid_cap_never_loses_its_connections(pki, short_tmp, cap):
    """A TLS pull's threads open connections of their own: a 2-connection pull holds 4.
    Invariant 2 (hunt 11): the server never closes a connection in transmission to admit
    another, so the pull's idle asyncio connections are never evicted for its threads.  At a
    per-uid cap of 4 the pull copies byte for byte with nothing evicted; at a cap of 2 its
    threads are held, then refused at their handshake timeout ("server busy"), and the pull
    reads on the event loop over its own two connections instead -- byte for byte too -- which
    still read afterwards (before hunt 11 they were evicted, and the pull had to reopen them;
    before session 13 the pull failed)."""
    from nbdbackup.agent.pull import pull
    from nbdbackup.blockdev.nbd import NBDDev

    creds = pki["server"]
    disk = short_tmp / "disk.raw"
    data = os.urandom(12 * M)
    disk.write_bytes(data)
    extra = ["--tls-creds", creds, "--max-connections-per-uid", str(cap), "--handshake-timeout", "2"]
    with peers.nbdbackup_serve(f"d={disk}", extra=extra) as p:
        uri = tls_uri(p.socket, "d", creds)

        async def main() -> tuple[bytes | BaseException, bytes, int]:
            got = bytearray(len(data))

            async def sink(i, d, chunk):
                got[i * 4 * M:i * 4 * M + len(chunk)] = chunk
                return None

            src = await NBDDev.open(uri, read_only=True, connections=2)
            try:
                try:
                    _, stats = await pull(src, None, chunk_size=4 * M, sink=sink)
                    if cap == 4:
                        assert stats.receive == "threads"
                    else:
                        assert stats.receive == "asyncio" and "no TLS connection of its own for 2 of the 2" \
                            in stats.receive_note and "server busy" in stats.receive_note, stats
                    result: bytes | BaseException = bytes(got)
                except Exception as e:  # noqa: BLE001 - checked by the caller
                    result = e
                after = bytearray(8 * 4096)
                await asyncio.gather(*(src.pread(memoryview(after)[k * 4096:(k + 1) * 4096], k * M)
                                       for k in range(8)))  # round robin: both connections
                return result, bytes(after), sum(c.closed for c in src.clients)
            finally:
                await src.close()

        t = time.monotonic()
        got, after, closed = run(main())
        took = time.monotonic() - t
        assert closed == 0 and "evicted" not in p.log(), p.log()
        assert after == b"".join(data[k * M:k * M + 4096] for k in range(8))
        assert got == data
        if cap == 2:
            assert took < 30, took
            assert "refused after waiting 2 s for admission" in p.log()
            assert "--max-connections-per-uid 2" in p.log()


def test_many_concurrent_tls_clients_and_multiconn_nbddev(pki, short_tmp):
    """8 TLS connections (an NBDDev with multi-conn, plus single clients) write disjoint
    random blocks concurrently; everything reads back, over TLS and in the file."""
    import random

    from nbdbackup.blockdev.nbd import NBDDev

    creds = pki["server"]
    disk = short_tmp / "disk.raw"
    disk.write_bytes(bytes(16 * M))
    rng = random.Random(9)
    blocks = {i: rng.randbytes(64 * 1024) for i in rng.sample(range(256), 96)}
    with peers.nbdbackup_serve(f"d={disk}", extra=["--tls-creds", creds]) as p:
        uri = tls_uri(p.socket, "d", creds)

        async def main():
            dev = await NBDDev.open(uri, connections=4)
            clients = [await connect(uri) for _ in range(4)]
            try:
                assert len(dev.clients) == 4
                items = sorted(blocks.items())
                writers = [dev] + clients
                await asyncio.gather(*((writers[k % len(writers)]).pwrite(data, i * 64 * 1024)
                                       for k, (i, data) in enumerate(items)))
                await dev.flush()
                got = await asyncio.gather(*(clients[k % 4].pread(64 * 1024, i * 64 * 1024)
                                             for k, (i, _) in enumerate(items)))
                assert all(bytes(g) == d for g, (_, d) in zip(got, items))
            finally:
                await dev.close()
                for c in clients:
                    await c.disconnect()
        run(main())
    data = disk.read_bytes()
    assert all(data[i * 64 * 1024:(i + 1) * 64 * 1024] == d for i, d in blocks.items())
