"""Interop: remote control -- the QMP control socket on TCP with mutual TLS.

``nbdbackup serve --control-listen 127.0.0.1:PORT --control-tls-creds DIR
--control-authz 'CN=backup-agent-*' --control-authz-read 'CN=monitor-*'``,
driven by qemu.qmp's ``QMPClient`` over an SSL connection (a third-party QMP
client with a context built by the stdlib, not by our code) and by our CLI
(``--control qmps://...``, ``NBDBACKUP_CONTROL_TLS_CREDS``).

Certificates: the session's ``pki`` (CA, server certificate for localhost /
127.0.0.1) plus client directories made by `certs.make_client`: a full agent,
a read-only monitor, a stranger the CA signed but no pattern admits, and an
impostor whose certificate another CA signed.

Checked, under uvloop and plain asyncio: the full client runs backup-start,
query-jobs, job-cancel, job-dismiss, and the CLI a full backup whose bytes
match; the read-only client queries and receives events, but job-cancel and
backup-start are refused naming the command; the stranger gets the greeting
and then a GenericError naming its subject for every command; an unknown CA,
a missing client certificate, an untrusted server and a wrong server name
fail at TLS; a plain client gets no greeting and the server stays up; serve
refuses every inconsistent --control-listen configuration with one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

import certs
import peers
from nbdbackup.control.remote import client_for

ROOT = Path(__file__).resolve().parents[2]
M = 1 << 20
AUTHZ = ["--control-authz", "CN=backup-agent-*", "--control-authz-read", "CN=monitor-*"]


@pytest.fixture(scope="module")
def clients(pki):
    """Client credential directories: full, read, stranger, impostor, untrusting."""
    base = Path(peers.short_tempdir("nbdctl-"))
    good = pki["server"]
    dirs = {
        "full": certs.make_client(good, base / "full", "backup-agent-1"),
        "read": certs.make_client(good, base / "read", "monitor-1"),
        "stranger": certs.make_client(good, base / "stranger", "intruder"),
        # Signed by another CA, but trusting ours: the server must refuse it.
        "impostor": certs.make_client(pki["rogue"], base / "impostor", "backup-agent-1"),
        # A valid client certificate, but trusting only the other CA: the client must refuse the server.
        "untrusting": certs.make_client(good, base / "untrusting", "backup-agent-2"),
    }
    (base / "impostor" / "ca-cert.pem").write_bytes((Path(good) / "ca-cert.pem").read_bytes())
    (base / "untrusting" / "ca-cert.pem").write_bytes((Path(pki["rogue"]) / "ca-cert.pem").read_bytes())
    yield dirs
    shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def remote_serve(pki, *exports: str, loop: str = "uvloop", extra=()):
    port = peers.free_tcp_port()
    env = {"NBDBACKUP_NO_UVLOOP": "1"} if loop == "asyncio" else None
    args = ["--control-listen", f"127.0.0.1:{port}", "--control-tls-creds", pki["server"], *AUTHZ, *extra]
    with peers.nbdbackup_serve(*(exports or ("disk=memory:8M",)), extra=args, env=env) as p:
        peers.wait_for_tcp(port, p.alive, p.log)
        p.control_port = port
        yield p


def stdlib_context(creds: str, cert: bool = True) -> ssl.SSLContext:
    """What any Python QMP client would build: verify the server, present our certificate."""
    ctx = ssl.create_default_context(cafile=os.path.join(creds, "ca-cert.pem"))
    if cert:
        ctx.load_cert_chain(os.path.join(creds, "client-cert.pem"), os.path.join(creds, "client-key.pem"))
    return ctx


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NBDBACKUP_CONTROL")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "nbdbackup.cli", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, errors="replace", timeout=60)


async def qmp_connect(port: int, ctx: ssl.SSLContext):
    from qemu.qmp import QMPClient

    qmp = QMPClient("test-agent")
    await qmp.connect(("127.0.0.1", port), ssl=ctx)
    return qmp


async def qmp_disconnect(qmp) -> None:
    """qemu.qmp's graceful disconnect flushes with ``set_write_buffer_limits(0, 0)``
    and ``drain()``, which never returns on Python 3.11's asyncio TLS transport
    (it pauses writing at size 0 >= high water 0 and never resumes; reproduced
    against a bare ``asyncio.start_server(ssl=...)``): bound it."""
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(qmp.disconnect(), 1)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_full_and_read_only_clients(pki, clients, short_tmp, loop):
    from qemu.qmp import ExecuteError

    ctl = str(short_tmp / "c.sock")
    with remote_serve(pki, loop=loop, extra=["--control", ctl]) as p:
        port = p.control_port

        async def main():
            agent = await qmp_connect(port, stdlib_context(clients["full"]))
            monitor = await qmp_connect(port, stdlib_context(clients["read"]))
            ours = client_for(f"qmps://127.0.0.1:{port}", clients["read"])  # our client, read-only
            await ours.connect()
            try:
                assert [e["name"] for e in await monitor.execute("query-block-exports")] == ["disk"]
                await agent.execute("backup-start", {"export": "disk", "job-id": "j1", "sync": "none",
                                                     "target": str(short_tmp / "scratch.img"), "snapshot": "pull"})
                jobs = await monitor.execute("query-jobs")
                assert [(j["id"], j["status"]) for j in jobs] == [("j1", "running")]
                for cmd, args in [("job-cancel", {"id": "j1"}),
                                  ("backup-start", {"export": "disk", "job-id": "j2", "sync": "none",
                                                    "target": str(short_tmp / "x.img")})]:
                    with pytest.raises(ExecuteError) as ei:
                        await monitor.execute(cmd, args)
                    assert ei.value.error_class == "GenericError"
                    desc = str(ei.value)
                    assert f"command {cmd} is not allowed" in desc and "CN=monitor-1" in desc \
                        and "read-only" in desc, desc
                assert [j["status"] for j in await monitor.execute("query-jobs")] == ["running"]
                await agent.execute("job-cancel", {"id": "j1"})
                # The read-only client follows the job through events.
                seen = []
                end = time.monotonic() + 20
                while "concluded" not in seen and time.monotonic() < end:
                    ev = await ours.next_event(timeout=5)
                    if ev and ev["event"] == "JOB_STATUS_CHANGE":
                        seen.append(ev["data"]["status"])
                assert "concluded" in seen, seen
                await peers.wait_concluded(agent, "j1")
                await agent.execute("job-dismiss", {"id": "j1"})
                assert await monitor.execute("query-jobs") == []
            finally:
                await ours.close()
                await qmp_disconnect(agent)
                await qmp_disconnect(monitor)
        run(main())
        # The Unix control socket keeps full access, next to the TCP listener.
        r = cli("job", "list", "--json", "--control", ctl)
        assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
        assert p.alive()


def test_cli_over_qmps(pki, clients, short_tmp):
    disk = short_tmp / "disk.raw"
    disk.write_bytes(os.urandom(4 * M))
    target = short_tmp / "full.img"
    with remote_serve(pki, f"disk={disk}") as p:
        addr = f"qmps://127.0.0.1:{p.control_port}"
        full = ["--control", addr, "--control-tls-creds", clients["full"]]
        r = cli("backup", "start", "-e", "disk", "-j", "b1", "--sync", "full", "-t", str(target), "--wait", *full)
        assert r.returncode == 0, r.stderr
        assert target.read_bytes() == disk.read_bytes()
        # Read-only, from the environment: list works, cancel and dismiss are refused.
        env = {"NBDBACKUP_CONTROL": addr, "NBDBACKUP_CONTROL_TLS_CREDS": clients["read"]}
        r = cli("job", "list", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert [(j["id"], j["status"]) for j in json.loads(r.stdout)] == [("b1", "concluded")]
        r = cli("job", "dismiss", "b1", env=env)
        assert r.returncode == 1 and "command job-dismiss is not allowed" in r.stderr and "read-only" in r.stderr, r
        assert r.stderr.count("\n") == 1, r.stderr
        # The server's name: localhost is in the certificate, evil.example is not.
        r = cli("job", "dismiss", "b1", "--control", f"qmps://localhost:{p.control_port}",
                "--control-tls-creds", clients["full"])
        assert r.returncode == 0, r.stderr
        r = cli("job", "list", "--control", f"{addr}?tls-hostname=evil.example", "--control-tls-creds",
                clients["full"])
        assert r.returncode == 1 and "not trusted" in r.stderr and "evil.example" in r.stderr, r.stderr
        # The client refuses a server its CA did not sign.
        r = cli("job", "list", "--control", addr, "--control-tls-creds", clients["untrusting"])
        assert r.returncode == 1 and "not trusted" in r.stderr, r.stderr
        # TCP without credentials, or without a client certificate: refused before connecting.
        r = cli("job", "list", "--control", addr)
        assert r.returncode == 1 and "--control-tls-creds" in r.stderr, r.stderr
        r = cli("job", "list", "--control", addr, "--control-tls-creds", pki["noclient"])
        assert r.returncode == 1 and "client-cert.pem is missing" in r.stderr, r.stderr
        assert p.alive()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_refused_clients(pki, clients, loop):
    from qemu.qmp import QMPClient

    with remote_serve(pki, loop=loop) as p:
        port = p.control_port
        addr = f"qmps://127.0.0.1:{port}"

        # A subject no pattern admits: greeting, then every command refused with the reason.
        async def stranger():
            s = ssl.create_default_context(cafile=os.path.join(clients["stranger"], "ca-cert.pem"))
            s.load_cert_chain(os.path.join(clients["stranger"], "client-cert.pem"),
                              os.path.join(clients["stranger"], "client-key.pem"))
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=s)
            try:
                greeting = json.loads(await reader.readline())
                assert "QMP" in greeting
                for cmd in ("qmp_capabilities", "query-jobs"):
                    writer.write(json.dumps({"execute": cmd, "id": cmd}).encode() + b"\n")
                    reply = json.loads(await reader.readline())
                    assert reply["id"] == cmd and reply["error"]["class"] == "GenericError", reply
                    assert reply["error"]["desc"] == ("client certificate 'CN=intruder' is not allowed by "
                                                      "--control-authz or --control-authz-read"), reply
            finally:
                writer.close()
            qmp = QMPClient("stranger")
            with pytest.raises(Exception) as ei:
                await qmp.connect(("127.0.0.1", port), ssl=stdlib_context(clients["stranger"]))
            # qemu.qmp got the greeting and fails at negotiation (it does not show the reply's desc).
            assert "Negotiation failed" in repr(ei.value), repr(ei.value)
        run(stranger())
        r = cli("job", "list", "--control", addr, "--control-tls-creds", clients["stranger"])
        assert r.returncode == 1 and "certificate 'CN=intruder' is not allowed by --control-authz" in r.stderr, r.stderr

        # Another CA's client certificate, and none at all: refused at TLS, no greeting.
        async def tls_refused(ctx):
            qmp = QMPClient("refused")
            with pytest.raises(Exception) as ei:
                await qmp.connect(("127.0.0.1", port), ssl=ctx)
            # Closed (or a TLS alert) before any greeting.
            assert isinstance(ei.value.__cause__, (EOFError, OSError)), repr(ei.value)
        run(tls_refused(stdlib_context(clients["impostor"])))
        run(tls_refused(stdlib_context(clients["full"], cert=False)))
        r = cli("job", "list", "--control", addr, "--control-tls-creds", clients["impostor"])
        assert r.returncode == 1 and any(m in r.stderr for m in ("TLS failed", "reset", "refuse this client")), \
            r.stderr
        assert r.stderr.count("\n") == 1, r.stderr

        # A plain client gets no greeting: silence, then the connection closes.
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            with pytest.raises(TimeoutError):
                s.recv(1024)
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-jobs"}\n')
            got = b""
            with contextlib.suppress(ConnectionError):
                while chunk := s.recv(4096):
                    got += chunk
            assert b"QMP" not in got and b"return" not in got, got

        # The server is still up, and still serves an admitted client.
        assert p.alive()
        r = cli("job", "list", "--json", "--control", addr, "--control-tls-creds", clients["full"])
        assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
        assert "refused" in p.log() and "CN=intruder" in p.log()


@pytest.mark.parametrize("args,message", [
    (["--control-listen", "127.0.0.1:PORT"], "--control-listen needs --control-tls-creds DIR"),
    (["--control-listen", "127.0.0.1:PORT", "--control-tls-creds", "GOOD"],
     "--control-listen needs --control-authz PATTERN and/or --control-authz-read PATTERN"),
    (["--control-authz", "*", "--control-tls-creds", "GOOD"], "need --control-listen HOST:PORT"),
    (["--control-listen", "127.0.0.1:PORT", "--control-tls-creds", "EMPTY", "--control-authz", "*"],
     "--control-tls-creds: TLS: cannot load"),
    (["--control-listen", "nowhere", "--control-tls-creds", "GOOD", "--control-authz", "*"],
     "bad --control-listen 'nowhere'"),
])
def test_serve_refuses_bad_remote_control(pki, short_tmp, args, message):
    port = str(peers.free_tcp_port())
    subst = {"GOOD": pki["server"], "EMPTY": str(short_tmp)}
    args = [subst.get(a, a).replace("PORT", port) for a in args]
    sock = short_tmp / "s.sock"
    r = subprocess.run([sys.executable, "-m", "nbdbackup.cli", "serve", "--socket", str(sock), *args,
                        "m=memory:1M"], cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=30)
    assert r.returncode == 1, r
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not sock.exists()


def test_control_port_in_use_is_one_line_and_leaves_nothing(pki, short_tmp):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ctl = short_tmp / "c.sock"
        r = subprocess.run([sys.executable, "-m", "nbdbackup.cli", "serve", "--socket", str(short_tmp / "s.sock"),
                            "--control", str(ctl), "--control-listen", f"127.0.0.1:{port}",
                            "--control-tls-creds", pki["server"], "--control-authz", "*", "m=memory:1M"],
                           cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=30)
    assert r.returncode == 1 and f"cannot listen for control on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert not ctl.exists()
