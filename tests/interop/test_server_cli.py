"""The `nbdbackup serve` command line: errors, signals, listeners.

Contract: ``python -m nbdbackup.cli serve --socket PATH [--listen HOST:PORT]
[--read-only] NAME=SPEC...``; a user error exits non-zero with ONE clear line
on stderr (no traceback); SIGTERM flushes and exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

import peers

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.interop

MiB = 1024 * 1024


def run_serve(sock: str, *exports: str, extra=(), timeout: float = 20) -> subprocess.CompletedProcess:
    argv = peers.nbdbackup_argv(sock, *exports, extra=extra)
    return subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout, cwd=str(peers.REPO))


def error_line(r: subprocess.CompletedProcess) -> str:
    """The single error line of a failed run (asserts there is exactly one, and no traceback)."""
    assert r.returncode != 0, f"expected failure, got 0\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, r.stderr
    return errors[0].lower()


def test_missing_file(short_tmp):
    r = run_serve(str(short_tmp / "s.sock"), f"disk={short_tmp}/nope.img")
    line = error_line(r)
    assert "nope.img" in line and "no such file" in line, line
    assert not (short_tmp / "s.sock").exists()


def test_bad_size(short_tmp):
    line = error_line(run_serve(str(short_tmp / "s.sock"), "mem=memory:12Q"))
    assert "size" in line and "12q" in line, line


@pytest.mark.parametrize("arg", ["noequals", "disk="])
def test_malformed_export_argument(short_tmp, arg):
    line = error_line(run_serve(str(short_tmp / "s.sock"), arg))
    assert "name=spec" in line or "spec" in line, line


def test_empty_name_is_the_default_export(serve):
    with serve("=memory:1M") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)  # nbd+unix:///?socket=... asks for ""
        assert h.get_size() == 1 * MiB
        h.shutdown()


def test_name_given_twice(short_tmp):
    line = error_line(run_serve(str(short_tmp / "s.sock"), "a=memory:1M", "a=memory:2M"))
    assert "'a'" in line or '"a"' in line or " a " in line, line
    assert any(w in line for w in ("twice", "duplicate", "already")), line


def test_nothing_to_listen_on():
    argv = [str(peers.VENV_PYTHON), "-m", "nbdbackup.cli", "serve", "a=memory:1M"]
    r = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=20, cwd=str(peers.REPO))
    line = error_line(r)
    assert "listen" in line or "socket" in line, line


def test_busy_socket_is_refused_and_first_server_unharmed(serve):
    with serve("a=memory:1M") as first:
        r = run_serve(first.socket, "b=memory:1M")
        line = error_line(r)
        assert first.socket in line or "socket" in line, line
        assert any(w in line for w in ("in use", "busy", "already", "another")), line
        # The refused second server must not have removed the first one's socket.
        assert os.path.exists(first.socket)
        h = nbd.NBD()
        h.connect_uri(first.uri_for("a"))
        h.pwrite(b"ok", 0)
        assert h.pread(2, 0) == b"ok"
        h.shutdown()
        assert first.alive()


def test_stale_socket_file_is_replaced(short_tmp):
    """A socket file nobody listens on (a crashed server's) is not 'busy'."""
    path = str(short_tmp / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, no listener
    argv = peers.nbdbackup_argv(path, "a=memory:1M")
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, errors="replace", cwd=str(peers.REPO))
    try:
        peer = peers.Peer(proc=proc, socket=path, dir=str(short_tmp), log_path="/dev/null", argv=argv)
        peers.wait_until_listening(peer)
        h = nbd.NBD()
        h.connect_uri(peers.nbd_uri(path, "a"))
        assert h.get_size() == 1 * MiB
        h.shutdown()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_sigterm_flushes_and_exits_zero(short_tmp, serve):
    image = short_tmp / "disk.img"
    image.write_bytes(bytes(2 * MiB))
    with serve(f"disk={image}") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("disk"))
        h.pwrite(b"\x42" * 65536, 1 * MiB)  # no FUA, no FLUSH
        # A request is still in flight when the signal arrives.
        buf = nbd.Buffer(1 * MiB)
        cookie = h.aio_pread(buf, 0)
        rc = peers.stop(srv, signal.SIGTERM)
        assert rc == 0, srv.log()
        try:
            while not h.aio_command_completed(cookie):
                h.poll(-1)
        except nbd.Error:
            pass  # the server may close before or after answering; it must not hang
        log = srv.log()
    assert "Traceback" not in log, log
    assert image.read_bytes()[1 * MiB:1 * MiB + 65536] == b"\x42" * 65536
    assert not os.path.exists(srv.socket), "socket file left behind after a clean exit"


def test_sigint_exits_cleanly(serve):
    with serve("a=memory:1M") as srv:
        rc = peers.stop(srv, signal.SIGINT)
        assert rc in (0, 130), srv.log()
        assert "Traceback" not in srv.log()


def test_global_read_only(short_tmp, serve):
    image = short_tmp / "disk.img"
    image.write_bytes(b"\x11" * MiB)
    with serve(f"disk={image}", "mem=memory:1M", extra=["--read-only"]) as srv:
        for name in ("disk", "mem"):
            h = nbd.NBD()
            h.set_strict_mode(0)
            h.connect_uri(srv.uri_for(name))
            assert h.is_read_only(), name
            with pytest.raises(nbd.Error) as ei:
                h.pwrite(b"x", 0)
            assert ei.value.errnum == 1, ei.value  # EPERM
            h.shutdown()
    assert image.read_bytes() == b"\x11" * MiB


def test_ro_prefix_only_affects_its_export(short_tmp, serve):
    image = short_tmp / "disk.img"
    image.write_bytes(bytes(MiB))
    with serve(f"ro=ro:{image}", "rw=memory:1M") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("ro"))
        assert h.is_read_only()
        h.shutdown()
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("rw"))
        assert not h.is_read_only()
        h.pwrite(b"w", 0)
        h.shutdown()


def test_listen_tcp_loopback(serve):
    port = peers.free_tcp_port()
    with serve("a=memory:1M", extra=["--listen", f"127.0.0.1:{port}"]) as srv:
        # `serve` opens the Unix socket first: wait for the TCP listener too.
        peers.wait_for_tcp(port, srv.alive, srv.log)
        h = nbd.NBD()
        h.connect_uri(f"nbd://127.0.0.1:{port}/a")
        h.pwrite(b"tcp", 100)
        h.shutdown()
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("a"))  # the Unix socket serves the same export
        assert h.pread(3, 100) == b"tcp"
        h.shutdown()


def test_sigterm_with_idle_and_half_open_clients_exits_promptly(serve):
    """Neither a client stuck in the handshake nor an idle connected one delays exit."""
    with serve("a=memory:1M") as srv:
        half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        half.connect(srv.socket)
        half.recv(18)  # greeting; never answer it
        idle = nbd.NBD()
        idle.connect_uri(srv.uri_for("a"))
        idle.pwrite(b"i", 0)
        t0 = time.monotonic()
        rc = peers.stop(srv, signal.SIGTERM, timeout=8)
        elapsed = time.monotonic() - t0
        half.close()
        assert rc == 0, srv.log()
        assert elapsed < 5, f"exit took {elapsed:.1f}s"


def test_sigterm_with_a_client_stuck_mid_payload(serve):
    """A WRITE whose payload never completes must not block shutdown."""
    with serve("a=memory:1M") as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(srv.socket)
        s.recv(18)
        s.sendall(b"\0\0\0\3")  # FIXED_NEWSTYLE | NO_ZEROES
        s.sendall(b"IHAVEOPT" + (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + b"a")  # OPT_EXPORT_NAME "a"
        s.recv(10)
        s.sendall((0x25609513).to_bytes(4, "big") + b"\0\0" + b"\0\1" + (5).to_bytes(8, "big")
                  + (0).to_bytes(8, "big") + (65536).to_bytes(4, "big") + b"x" * 1000)
        time.sleep(0.1)
        t0 = time.monotonic()
        rc = peers.stop(srv, signal.SIGTERM, timeout=8)
        elapsed = time.monotonic() - t0
        s.close()
        assert rc == 0, srv.log()
        assert elapsed < 5, f"exit took {elapsed:.1f}s"


def test_max_connections(serve):
    """Invariant 2 at the global cap (hunt 11): connections in transmission are
    never evicted for a newcomer, idle or not; the newcomer is held before the
    greeting, then refused at its handshake timeout (libnbd fails at connect,
    the log names the cap).  A connection quiet in the handshake is evicted
    for it (invariant 4: a staller cannot hold a slot against a client)."""
    with serve("a=memory:1M", extra=["--max-connections", "2", "--handshake-timeout", "1.5"]) as srv:
        h1, h2 = nbd.NBD(), nbd.NBD()
        h1.connect_uri(srv.uri_for("a"))
        h2.connect_uri(srv.uri_for("a"))
        time.sleep(0.7)  # both quiet for longer than EVICT_QUIET
        t0 = time.monotonic()
        h3 = nbd.NBD()
        with pytest.raises(nbd.Error):
            h3.connect_uri(srv.uri_for("a"))
        assert 1.0 < time.monotonic() - t0 < 5
        assert h1.pread(1, 0) == b"\0" and h2.pread(1, 0) == b"\0"  # neither was evicted
        assert "refused after waiting 1.5 s for admission" in srv.log()
        assert "--max-connections 2" in srv.log()
        # A connection stalled in the handshake takes h2's slot once h2 leaves ...
        h2.shutdown()
        staller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staller.settimeout(5)
        staller.connect(srv.socket)
        assert len(staller.recv(18)) == 18  # greeted, then silent
        time.sleep(0.7)
        # ... and is evicted for a newcomer: only it, never h1.
        h3 = nbd.NBD()
        h3.connect_uri(srv.uri_for("a"))
        assert h3.pread(1, 0) == b"\0" and h1.pread(1, 0) == b"\0"
        assert staller.recv(1) == b""
        staller.close()
        h3.shutdown()
        h1.shutdown()
        assert "server connection limit reached: connection quiet in the handshake evicted" in srv.log()


def test_handshake_timeout(serve):
    with serve("a=memory:1M", extra=["--handshake-timeout", "0.5"]) as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(srv.socket)
        assert len(s.recv(18)) == 18
        t0 = time.monotonic()
        assert s.recv(1) == b""  # closed by the server
        assert 0.3 < time.monotonic() - t0 < 4
        s.close()
        assert srv.alive()


def test_export_names_with_spaces_and_unicode(serve):
    names = ["with space", "é-ü-漢字", "a/b:c?d"]
    with serve(*(f"{n}=memory:1M" for n in names)) as srv:
        for n in names:
            h = nbd.NBD()
            h.set_export_name(n)
            h.connect_unix(srv.socket)
            assert h.get_size() == 1 * MiB
            h.pwrite(n.encode(), 0)
            h.shutdown()
            h = nbd.NBD()
            h.connect_uri(peers.nbd_uri(srv.socket, n))  # percent-encoded URI
            assert h.pread(len(n.encode()), 0) == n.encode()
            h.shutdown()
