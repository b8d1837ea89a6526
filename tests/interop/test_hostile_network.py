"""Hostile networks (hunt 10): vanished peers, partitions, slow and lossy links.

Every test runs our server and its peers in two private network namespaces
joined by a veth pair (`netns.link`); a partition drops every packet of the
client's veth silently (iptables DROP both ways: no FIN, no RST), as when a
host dies or a cable is pulled.  Timeouts are short (``--dead-peer-timeout
2``) so the suite stays quick.

- An idle client that is alive (a real qemu-io) keeps its connection for
  several times the dead-peer timeout and then reads its data: the live
  export is an ordinary disk (there is no idle timeout by default).
- A client that vanished is reset by TCP (keepalive while idle,
  TCP_USER_TIMEOUT while a reply is unacknowledged, keepalive again in the
  middle of a WRITE payload) within about the dead-peer timeout, in the
  owner process and in a worker process (the options are set there too);
  the server keeps serving others.
- A server that vanished under a client (``pull`` with no request timeout):
  our client sockets carry the same options, so the pull ends with one
  error line in bounded time, records no snapshot, and the repository
  verifies.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

import netns
import peers

pytestmark = pytest.mark.interop

MiB = 1 << 20
PORT = 10809
DEAD = 2  # --dead-peer-timeout of these tests (s)


@pytest.fixture
def link():
    why = netns.skip_reason()
    if why:
        pytest.skip(why)
    with netns.link() as lk:
        yield lk


def py() -> str:
    return str(peers.VENV_PYTHON) if peers.VENV_PYTHON.exists() else sys.executable


def start_serve(lk: netns.Link, tmp, *exports: str, extra=(), env=None) -> subprocess.Popen:
    """``nbdbackup serve`` on 10.77.0.1:PORT in the server namespace; waits until it listens."""
    log = open(tmp / "serve.log", "wb")
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    p = lk.popen("server", [py(), "-m", "nbdbackup.cli", "-v", "serve", "--listen", f"{lk.server_addr}:{PORT}",
                            *extra, *exports], stdout=log, stderr=subprocess.STDOUT, cwd=str(peers.REPO), env=e)
    deadline = time.monotonic() + 30
    while True:
        out = lk.run("server", ["ss", "-Htln", f"( sport = :{PORT} )"]).stdout
        if out.strip():
            return p
        assert p.poll() is None, (tmp / "serve.log").read_text()
        assert time.monotonic() < deadline, "serve did not listen"
        time.sleep(0.05)


#: A raw NBD client (fixed newstyle, OPT_GO, simple replies) that gets into
#: one state and then prints "ready" and sleeps: ``handshake`` (greeting
#: read, nothing sent), ``idle`` (nothing in
#: flight), ``read`` (a 32 MiB READ whose reply it never reads), ``write``
#: (a 1 MiB WRITE of which it sent 256 KiB).
RAW_CLIENT = textwrap.dedent("""
    import socket, struct, sys, time
    host, port, state = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = socket.create_connection((host, port))
    def recv(n):
        b = b""
        while len(b) < n:
            c = s.recv(n - len(b))
            if not c:
                raise SystemExit("closed")
            b += c
        return b
    recv(18)
    if state == "handshake":
        print("ready", flush=True)
        time.sleep(3600)
    s.sendall(struct.pack(">I", 3))
    name = b"d"
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(name) + 2) + struct.pack(">I", len(name))
              + name + struct.pack(">H", 0))
    while True:
        _, _, rep, n = struct.unpack(">QIII", recv(20))
        recv(n)
        if rep == 1:
            break
        if rep & 0x80000000:
            raise SystemExit(f"option error {rep:#x}")
    if state == "read":
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 32 << 20))
    elif state == "write":
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 1 << 20) + b"x" * (256 << 10))
    print("ready", flush=True)
    time.sleep(3600)
""")


def make_image(path, size=64 * MiB):
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(os.urandom(4 * MiB))


@pytest.mark.parametrize("state,workers", [("handshake", 0), ("idle", 0), ("idle", 1), ("read", 0), ("read", 1),
                                           ("write", 0)])
def test_vanished_client_is_reset_within_dead_peer_timeout(link, short_tmp, state, workers):
    """Before hunt 10: no keepalive and no idle timeout -> the connection of
    a vanished client stayed ESTABLISHED (slot, receive ring, a 32 MiB READ's
    reply) until the kernel's ~15-minute retransmission limit, or for ever
    while idle.  Now TCP resets it about DEAD s after the last ACK, also in a
    worker process, and other clients are served meanwhile."""
    img = short_tmp / "d.img"
    make_image(img)
    srv = start_serve(link, short_tmp, f"d={img}",  # (a long handshake timeout: keepalive must do it)
                      extra=["--dead-peer-timeout", str(DEAD), "--workers", str(workers), "--handshake-timeout", "60"])
    cli = link.popen("client", [py(), "-c", RAW_CLIENT, link.server_addr, str(PORT), state],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert cli.stdout.readline().strip() == "ready", cli.stderr.read()
    link.wait_established("server", PORT, lambda n: n == 1, 10)
    if workers:
        deadline = time.monotonic() + 10  # handed to the worker (it logs as "worker 0")
        while "worker 0" not in (short_tmp / "serve.log").read_text():
            assert time.monotonic() < deadline, (short_tmp / "serve.log").read_text()
            time.sleep(0.05)
    time.sleep(0.5)  # the READ's reply fills the windows
    link.partition()
    took = link.wait_established("server", PORT, lambda n: n == 0, 4 * DEAD + 4)
    # Another client (from the server's own namespace) is served all along.
    r = link.run("server", ["qemu-io", "-f", "raw", "-c", "read -v 0 16", f"nbd://{link.server_addr}:{PORT}/d"])
    assert "read 16/16" in r.stdout, r
    assert srv.poll() is None
    assert "closed" in (short_tmp / "serve.log").read_text() or state == "handshake"
    print(f"{state} workers={workers}: reset after {took:.1f} s")


def test_idle_alive_client_keeps_its_connection(link, short_tmp):
    """Finding 1: a QEMU idle for longer than the old 60 s idle timeout had
    its disk closed under it (the next read: EIO).  Now there is no idle
    timeout by default and keepalive is answered by an alive peer's kernel:
    qemu-io idle for 4 x the dead-peer timeout (the first keepalive probe
    goes after DEAD/4 s) still reads what it wrote, on the same connection."""
    img = short_tmp / "d.img"
    make_image(img, 16 * MiB)
    srv = start_serve(link, short_tmp, f"d={img}", extra=["--dead-peer-timeout", str(DEAD), "--workers", "1"])
    r = link.run("client", ["qemu-io", "-f", "raw", "-c", "write -P 5 0 4k", "-c", f"sleep {4 * DEAD * 1000}",
                            "-c", "read -P 5 0 4k", f"nbd://{link.server_addr}:{PORT}/d"], timeout=60, check=False)
    assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, r
    assert "read 4096/4096" in r.stdout, r
    assert srv.poll() is None
    log = (short_tmp / "serve.log").read_text()
    # One connection, closed only when qemu-io exited (none closed and made again).
    assert len(re.findall(r"connection [0-9.:]+: export 'd'", log)) == 1, log
    closed = re.findall(r"(\d\d:\d\d:\d\d),\d+ .*connection [0-9.:]+ closed", log)
    assert len(closed) == 1, log


@pytest.mark.parametrize("job", ["pull", "pull-tls", "restore"])
def test_client_of_vanished_server_fails_in_bounded_time(link, short_tmp, ns_pki, job):
    """The server's host vanishes mid-pull (plain: the receive threads read
    over sockets lent by the asyncio connections; TLS: over blocking
    connections of their own) or mid-restore to an NBD target, with
    ``--io-timeout 0`` (no request timeout), so only our client sockets'
    keepalive / user timeout bounds it: before hunt 10 the job hung (~15
    minutes of retransmissions).  Now one error line within a few seconds;
    a pull records no snapshot and the repository verifies."""
    img = short_tmp / "d.img"
    make_image(img, 48 * MiB)
    with open(img, "r+b") as f:  # all data: the job must move every byte
        for i in range(12):
            f.seek(i * 4 * MiB)
            f.write(os.urandom(4 * MiB))
    repo = short_tmp / "repo"
    peers.nbdbackup_cli("repo", "init", str(repo), "--encryption", "none")
    tls = ["--tls-creds", ns_pki] if job == "pull-tls" else []
    uri = (f"nbds://{link.server_addr}:{PORT}/d?tls-certificates={ns_pki}" if tls
           else f"nbd://{link.server_addr}:{PORT}/d")
    env = dict(os.environ, NBDBACKUP_DEAD_PEER_TIMEOUT=str(DEAD))
    if job == "restore":
        with peers.nbdbackup_serve(f"d={img}", extra=["--read-only"]) as local:
            peers.nbdbackup_cli("pull", local.uri_for("d"), "--repo", str(repo), "--snapshot", "s0")
        target = short_tmp / "t.img"
        target.write_bytes(b"")
        os.truncate(target, 48 * MiB)
        start_serve(link, short_tmp, f"d={target}")
        argv = ["restore", "--io-timeout", "0", str(repo), "s0", uri]
        link.shape(["tbf", "rate", "40mbit", "burst", "64kb", "latency", "100ms"], sides=("client",))
    else:
        start_serve(link, short_tmp, f"d={img}", extra=tls)
        argv = ["pull", "--io-timeout", "0", uri, "--repo", str(repo), "--snapshot", "s1"]
        # ~10 s for 48 MiB: time to partition mid-pull.
        link.shape(["tbf", "rate", "40mbit", "burst", "64kb", "latency", "100ms"], sides=("server",))
    t0 = time.monotonic()
    proc = link.popen("client", [py(), "-m", "nbdbackup.cli", *argv],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(peers.REPO), env=env)
    time.sleep(3)
    assert proc.poll() is None, proc.communicate()
    link.partition()
    t1 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=6 * DEAD + 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{job} still running {time.monotonic() - t1:.0f} s after the partition: {err[-2000:]}")
    print(f"{job} ended {time.monotonic() - t1:.1f} s after the partition ({t1 - t0:.1f} s in): {err.strip()}")
    assert proc.returncode != 0
    assert err.strip() and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 2, err
    if job != "restore":
        # The cause is named: the kernel timed the connection out (over TLS the SSLSocket sees an
        # end of stream; the TCP state tells it from a server closing: `pullthreads._lost`).
        assert "timed out" in err, err
        snaps = peers.nbdbackup_cli("repo", "list", str(repo)).stdout
        assert "s1" not in snaps, snaps
    peers.nbdbackup_cli("repo", "verify", str(repo))


@pytest.fixture(scope="module")
def ns_pki():
    """A CA, a server certificate for the server namespace's address, and a
    client certificate (CN=backup-agent-1), all in one directory."""
    import shutil
    from pathlib import Path

    import certs

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (scripts/setup installs it)")
    d = Path(peers.short_tempdir("nbdnsk-"))
    certs.make_ca(d, "hunt10 CA")
    certs.make_cert(d, "server", "server", f"subjectAltName=IP:{netns.SERVER_ADDR}\nextendedKeyUsage=serverAuth\n")
    certs.make_cert(d, "client", "backup-agent-1", "extendedKeyUsage=clientAuth\n")
    yield str(d)
    shutil.rmtree(d, ignore_errors=True)


def test_vanished_tls_client_is_reset(link, short_tmp, ns_pki):
    """A TLS client (nbdsh) idle in transmission vanishes: the options set
    before STARTTLS stay with the socket under the TLS transport."""
    img = short_tmp / "d.img"
    make_image(img, 16 * MiB)
    start_serve(link, short_tmp, f"d={img}", extra=["--dead-peer-timeout", str(DEAD), "--tls-creds", ns_pki])
    uri = f"nbds://{link.server_addr}:{PORT}/d?tls-certificates={ns_pki}"
    cli = link.popen("client", [py(), "-m", "nbd", "-c", f"import time; h.set_uri_allow_local_file(True); "
                                f"h.connect_uri({uri!r}); print(len(h.pread(16, 0)) == 16, flush=True); "
                                "time.sleep(3600)"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert cli.stdout.readline().strip() == "True", cli.stderr.read()
    link.wait_established("server", PORT, lambda n: n == 1, 10)
    assert "TLS" in (short_tmp / "serve.log").read_text()
    link.partition()
    took = link.wait_established("server", PORT, lambda n: n == 0, 4 * DEAD + 4)
    print(f"TLS idle: reset after {took:.1f} s")


#: A remote controller: mutual TLS, greeting, qmp_capabilities, optionally a
#: snapshot backup job "j1" of export "d" (sync none: it runs until
#: cancelled), "ready", then silence.
CONTROLLER = textwrap.dedent("""
    import json, socket, ssl, sys, time
    host, port, creds, target = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ctx = ssl.create_default_context(cafile=creds + "/ca-cert.pem")
    ctx.load_cert_chain(creds + "/client-cert.pem", creds + "/client-key.pem")
    s = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname=host)
    f = s.makefile("rwb")
    assert b"QMP" in f.readline()
    f.write(b'{"execute": "qmp_capabilities"}\\n'); f.flush()
    assert b"return" in f.readline()
    if target:
        f.write(json.dumps({"execute": "backup-start", "arguments": {
            "export": "d", "job-id": "j1", "sync": "none", "target": target, "snapshot": "pull"}}).encode() + b"\\n"); f.flush()
        reply = f.readline()
        while b'"event"' in reply:  # JOB_STATUS_CHANGE events come first
            reply = f.readline()
        assert b"return" in reply, reply
    print("ready", flush=True)
    time.sleep(3600)
""")


def test_vanished_controller_session_ends(link, short_tmp, ns_pki):
    """A remote controller (``--control-listen`` with TLS) on a link that
    died: before hunt 10 its session (one of `MAX_REMOTE_CLIENTS` = 32) was
    held for ever; now TCP resets it within the dead-peer timeout.  The
    backup job it started is still running afterwards (checked on the local
    control socket): a session's end is not a job's."""
    img = short_tmp / "d.img"
    make_image(img, 16 * MiB)
    cport = PORT + 1
    ctl = str(short_tmp / "ctl.sock")
    target = short_tmp / "scratch.img"
    start_serve(link, short_tmp, f"d={img}",
                extra=["--dead-peer-timeout", str(DEAD), "--control-listen", f"{link.server_addr}:{cport}",
                       "--control-tls-creds", ns_pki, "--control-authz", "CN=backup-agent-*", "--control", ctl])
    cli = link.popen("client", [py(), "-c", CONTROLLER, link.server_addr, str(cport), ns_pki, str(target)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert cli.stdout.readline().strip() == "ready", cli.stderr.read()
    link.wait_established("server", cport, lambda n: n == 1, 10)
    link.partition()
    took = link.wait_established("server", cport, lambda n: n == 0, 4 * DEAD + 4)
    print(f"controller: reset after {took:.1f} s")
    time.sleep(0.5)
    jobs = json.loads(peers.nbdbackup_cli("job", "list", "--json", "--control", ctl).stdout)
    assert [(j["id"], j["status"]) for j in jobs] == [("j1", "running")], jobs


def test_alive_client_survives_silence_and_a_short_partition(link, short_tmp):
    """Keepalive judges the peer's kernel, not its application: a client
    idle for the dead-peer timeout keeps its connection, and so does one
    cut off for 0.4 x the timeout (a route flap) at the worst moment: the
    keepalive must not be tighter than that (with the first probe after
    timeout / 2 s of silence it was: the last ACK can be that old when the
    cut begins, and the reset comes before the probe of the timer that
    finds it ``timeout`` s old).  (Not so a client that keeps its receive
    window closed -- stops reading a reply -- that long: Linux >= 5.11
    applies TCP_USER_TIMEOUT to zero-window probing too; see docs/hunt10.md.)"""
    img = short_tmp / "d.img"
    make_image(img)
    dead = 2 * DEAD  # room for a partition shorter than it
    start_serve(link, short_tmp, f"d={img}", extra=["--dead-peer-timeout", str(dead), "--workers", "0"])
    cli = link.popen("client", [py(), "-c", RAW_CLIENT, link.server_addr, str(PORT), "idle"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert cli.stdout.readline().strip() == "ready", cli.stderr.read()
    link.wait_established("server", PORT, lambda n: n == 1, 10)
    time.sleep(dead)  # (qemu-io stays idle 4 x the timeout in its own test)
    assert link.established("server", PORT) == 1
    # Cut at the worst moment: just before the next keepalive ACK would come
    # (the last one is then as old as it gets, the keepalive's idle time).
    t0, prev, top, cycle = time.monotonic(), 0.0, 0.0, None
    while time.monotonic() - t0 < dead:
        age = link.last_ack("server", PORT)
        if cycle is None and age < prev:
            cycle = top  # one full cycle seen: its oldest age
        elif cycle is not None and age >= cycle - 0.05:
            break
        top, prev = max(top, age), age
        time.sleep(0.01)
    assert cycle is not None, "no keepalive ACK seen"
    link.partition()
    time.sleep(0.4 * dead)  # < timeout - keepidle - keepintvl = 2 s (4 s: 1 + 1)
    link.heal()
    time.sleep(dead + 1)
    assert link.established("server", PORT) == 1, (short_tmp / "serve.log").read_text()
    assert cli.poll() is None


def test_export_of_a_vanished_remote_fails_requests_in_bounded_time_then_reconnects(link, short_tmp):
    """``serve p=nbd://REMOTE/d`` (a re-export, no request timeout) whose
    remote's host vanishes: before hunt 10 a read of the re-export waited for
    the kernel's retransmission limit (~15 minutes) while the client sat on
    it; now our client socket's user timeout ends the connection within a few
    seconds, the read fails with EIO after the reconnect delay, and the
    re-exporting server stays up.  Once the link heals the re-export
    reconnects by itself (before session 12 it failed every request until
    ``serve`` restarted)."""
    img = short_tmp / "d.img"
    make_image(img, 16 * MiB)
    start_serve(link, short_tmp, f"d={img}")
    ppath = 10811
    log = open(short_tmp / "proxy.log", "wb")
    proxy = link.popen("client", [py(), "-m", "nbdbackup.cli", "-v", "serve", "--listen", f"127.0.0.1:{ppath}",
                                  f"p=nbd://{link.server_addr}:{PORT}/d"],
                       stdout=log, stderr=subprocess.STDOUT, cwd=str(peers.REPO),
                       env=dict(os.environ, NBDBACKUP_DEAD_PEER_TIMEOUT=str(DEAD),
                                NBDBACKUP_RECONNECT_DELAY=str(DEAD)))
    deadline = time.monotonic() + 30
    while not link.run("client", ["ss", "-Htln", f"( sport = :{ppath} )"]).stdout.strip():
        assert proxy.poll() is None and time.monotonic() < deadline, (short_tmp / "proxy.log").read_text()
        time.sleep(0.05)
    uri = f"nbd://127.0.0.1:{ppath}/p"
    r = link.run("client", ["qemu-io", "-f", "raw", "-c", "read 0 64k", uri], check=False)
    assert "read 65536/65536" in r.stdout, r
    link.partition()
    t0 = time.monotonic()
    r = link.run("client", ["qemu-io", "-f", "raw", "-c", "read 4M 64k", uri], check=False, timeout=6 * DEAD + 10)
    took = time.monotonic() - t0
    print(f"re-export read after the remote vanished: {took:.1f} s: {(r.stdout + r.stderr).strip()}")
    assert "read failed" in r.stdout + r.stderr, r
    assert proxy.poll() is None, (short_tmp / "proxy.log").read_text()
    link.heal()
    deadline = time.monotonic() + 30
    while True:
        r = link.run("client", ["qemu-io", "-f", "raw", "-c", "read 4M 64k", uri], check=False, timeout=30)
        if "read 65536/65536" in r.stdout:
            break
        assert time.monotonic() < deadline, (r, (short_tmp / "proxy.log").read_text())
        time.sleep(0.5)
    print(f"re-export read again {time.monotonic() - t0:.1f} s after the cut")
    assert "reconnected" in (short_tmp / "proxy.log").read_text()
