"""`nbdbackup serve` re-exporting another server's export (SPEC = an NBD URI).

The upstream peers are nbdkit (pattern, sparse-random, memory; error and delay
filters), qemu-nbd (a qcow2 image with a persistent dirty bitmap) and
qemu-storage-daemon (an NBD export added over QMP).  What a client sees
through nbdbackup must equal what it sees at the source: data (blake3),
allocation map, dirty bitmap, and errors.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import subprocess

import pytest

import peers

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.interop

KiB, MiB = 1024, 1024 * 1024


def run(*argv: str, timeout: float = 60) -> str:
    peers.require(argv[0])
    r = subprocess.run(list(argv), capture_output=True, text=True, errors="replace", timeout=timeout)
    assert r.returncode == 0, f"{' '.join(argv)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def nbd_map(uri: str, context: str = "base:allocation") -> list[tuple[int, int, int]]:
    entries = json.loads(run("nbdinfo", f"--map={context}", "--json", uri))
    out: list[tuple[int, int, int]] = []
    for e in entries:
        if out and out[-1][2] == e["type"] and out[-1][0] + out[-1][1] == e["offset"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], e["type"])
        else:
            out.append((e["offset"], e["length"], e["type"]))
    return out


def test_reexport_nbdkit_pattern():
    with peers.nbdkit("pattern", "8M") as up, peers.nbdbackup_serve(f"p=ro:{up.uri}") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("p"))
        assert h.get_size() == 8 * MiB and h.is_read_only()
        for off in (0, 4096 + 8, 8 * MiB - 64):
            data = h.pread(64, off)
            words = struct.unpack(">8Q", data)
            assert words == tuple(range(off, off + 64, 8)), (off, words)
        h.shutdown()


def test_reexport_nbdkit_sparse_random_data_and_map(short_tmp, blake3_file):
    a, b = short_tmp / "a.img", short_tmp / "b.img"
    with peers.nbdkit("sparse-random", "32M", "seed=42") as up, \
            peers.nbdbackup_serve(f"s={up.uri}") as srv:
        run("nbdcopy", up.uri, str(a))
        run("nbdcopy", "--connections=4", srv.uri_for("s"), str(b))
        assert nbd_map(srv.uri_for("s")) == nbd_map(up.uri)
    assert blake3_file(a) == blake3_file(b)


def test_reexport_writes_reach_upstream():
    with peers.nbdkit("memory", "4M") as up, peers.nbdbackup_serve(f"m={up.uri}") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("m"))
        h.pwrite(b"\x31" * 5000, 1234, nbd.CMD_FLAG_FUA)
        h.zero(64 * KiB, 1 * MiB)
        h.flush()
        h.shutdown()
        u = nbd.NBD()
        u.connect_uri(up.uri)
        assert u.pread(5000, 1234) == b"\x31" * 5000
        assert u.pread(64 * KiB, 1 * MiB) == bytes(64 * KiB)
        u.shutdown()


def test_upstream_read_errors_become_eio():
    with peers.nbdkit("memory", "1M", "error-pread=EIO", "error-pread-rate=1",
                      filters=["error"]) as up, peers.nbdbackup_serve(f"e={up.uri}") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("e"))
        with pytest.raises(nbd.Error) as ei:
            h.pread(4096, 0)
        assert ei.value.errnum == errno.EIO, ei.value
        h.pwrite(b"w" * 512, 0)  # writes still work, the connection lives
        h.shutdown()
        assert srv.alive(), srv.log()


def test_slow_upstream_many_requests_in_flight():
    """A 20 ms upstream delay: 64 concurrent reads must overlap, not queue one by one."""
    import time

    with peers.nbdkit("pattern", "4M", "rdelay=20ms", filters=["delay"]) as up, \
            peers.nbdbackup_serve(f"d=ro:{up.uri}") as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("d"))
        t0 = time.monotonic()
        bufs = [(nbd.Buffer(4096), i * 4096) for i in range(64)]
        cookies = [h.aio_pread(buf, off) for buf, off in bufs]
        for c in cookies:
            while not h.aio_command_completed(c):
                h.poll(-1)
        elapsed = time.monotonic() - t0
        for buf, off in bufs:
            assert struct.unpack(">Q", bytes(buf.to_bytearray()[:8]))[0] == off
        h.shutdown()
    assert elapsed < 64 * 0.020 / 2, f"requests were serialised: {elapsed:.2f}s"


def test_reexport_qemu_nbd_dirty_bitmap(short_tmp):
    img = short_tmp / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 64k 64k", "-c", "write -P 2 1M 128k",
                    str(img)], check=True, capture_output=True)
    ctx = "qemu:dirty-bitmap:b0"
    with peers.qemu_nbd(img, fmt="qcow2", read_only=True, bitmap="b0") as up, \
            peers.nbdbackup_serve(f"q=ro:{up.uri}") as srv:
        expected = nbd_map(up.uri, ctx)
        assert expected == [(0, 64 * KiB, 0), (64 * KiB, 64 * KiB, 1), (128 * KiB, 896 * KiB, 0),
                            (1 * MiB, 128 * KiB, 1), (1152 * KiB, 4 * MiB - 1152 * KiB, 0)]
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_uri(srv.uri_for("q"))
        got = []
        h.add_meta_context("qemu:dirty-bitmap:")
        h.opt_list_meta_context(lambda name: got.append(name) or 0)
        h.opt_abort()
        assert ctx in got, f"nbdbackup does not pass on the upstream bitmap context: {got}"
        assert nbd_map(srv.uri_for("q"), ctx) == expected
        assert nbd_map(srv.uri_for("q")) == nbd_map(up.uri)


def test_reexport_qemu_storage_daemon_export(short_tmp, make_image):
    img = make_image(short_tmp / "d.img", 2 * MiB, [(0x61, 0, 64 * KiB)])
    with peers.qemu_storage_daemon(["--blockdev", f"driver=file,filename={img},node-name=file0"]) as qsd:
        sock = peers.nbd_socket_path(qsd)
        qsd.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
        qsd.qmp("block-export-add", type="nbd", id="e0", **{"node-name": "file0"}, name="d", writable=True)
        with peers.nbdbackup_serve(f"d={peers.nbd_uri(sock, 'd')}") as srv:
            h = nbd.NBD()
            h.connect_uri(srv.uri_for("d"))
            assert h.pread(4, 0) == b"aaaa"
            h.pwrite(b"\x62" * 4096, 1 * MiB)
            h.flush()
            h.shutdown()
        exports = qsd.qmp("query-block-exports")
        assert [e["id"] for e in exports] == ["e0"]
    with open(img, "rb") as f:
        f.seek(1 * MiB)
        assert f.read(4096) == b"\x62" * 4096


def test_reexport_writes_again_what_a_killed_upstream_lost(short_tmp):
    """The upstream is nbdkit with a write-back cache filter (unflushed writes live in
    the filter's cache, gone with the process): kill -9 it under a re-export, start it
    again on the same socket.  Before, every later request through the re-export failed
    with EIO until ``serve`` restarted; now the re-export reconnects and writes again
    what was acknowledged since the last FLUSH, so a client reads its writes and its
    FLUSH makes them durable in the upstream's file."""
    exe = peers.require("nbdkit")
    img = short_tmp / "up.img"
    img.write_bytes(bytes(4 * MiB))
    d = peers.short_tempdir()
    sock = peers._socket_path(d, "up.sock")
    argv = [exe, "-U", sock, "-f", "--exit-with-parent", "--filter=cache", "file", str(img), "cache=writeback"]
    ups = [peers._spawn(argv, d, sock)]
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, d, True)
        stack.callback(lambda: [peers._stop(p) for p in ups])  # after the re-export's shutdown
        up = ups[0]
        peers.wait_until_listening(up)
        port = peers.free_tcp_port()
        srv = stack.enter_context(peers.nbdbackup_serve(f"p=nbd+unix:///?socket={sock}",
                                                        extra=["--metrics", f"127.0.0.1:{port}"]))
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("p"))
        h.pwrite(b"\x11" * 64 * KiB, 0)
        h.flush()
        h.pwrite(b"\x22" * 64 * KiB, 64 * KiB)  # acknowledged, in nbdkit's cache only
        up.proc.kill()
        up.proc.wait()
        assert img.read_bytes()[64 * KiB:128 * KiB] == bytes(64 * KiB)  # really lost
        os.unlink(sock)
        up2 = peers._spawn(argv, d, sock)
        ups.append(up2)
        peers.wait_until_listening(up2)
        assert h.pread(128 * KiB, 0) == b"\x11" * 64 * KiB + b"\x22" * 64 * KiB
        h.flush()
        assert img.read_bytes()[:128 * KiB] == b"\x11" * 64 * KiB + b"\x22" * 64 * KiB
        h.shutdown()
        assert "reconnected" in srv.log(), srv.log()
        from test_metrics import scrape

        got = {k: v for k, v in scrape(port).items() if k.startswith("nbdbackup_remote_")}
        remote = f'{{remote="nbd+unix:///?socket={sock}"}}'
        assert got == {f"nbdbackup_remote_connected{remote}": 1, f"nbdbackup_remote_reconnects_total{remote}": 1,
                       f"nbdbackup_remote_replayed_bytes_total{remote}": 64 * KiB,
                       f"nbdbackup_remote_replay_log_bytes{remote}": 0}, got
