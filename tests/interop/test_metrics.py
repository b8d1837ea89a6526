"""Interop: request statistics over the control socket and the Prometheus endpoint.

A server with a memory export and an export re-serving nbdkit behind the
error filter (every read fails) takes a known mix of requests from our
client; ``query-export-stats`` (and ``nbdbackup export stats --json``) and
``GET /metrics`` must count exactly those: operations, bytes, failures,
requests refused by validation, connections.  nbdcopy then reads the whole
export (--no-extents) and the read bytes grow by exactly its size.  Bad HTTP gets 404/405.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import peers
from nbdbackup.control.client import ControlClient
from nbdbackup.nbd.client import connect

ROOT = Path(__file__).resolve().parents[2]
K, M = 1 << 10, 1 << 20


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_stats_and_metrics_count_exactly(short_tmp):
    port = peers.free_tcp_port()
    ctl = os.path.join(peers.short_tempdir(), "c.sock")
    with peers.nbdkit("memory", "8M", "error-pread-rate=1", filters=["error"]) as bad, \
            peers.nbdbackup_serve("m=memory:16M", f"e={bad.uri}",
                                  extra=["--control", ctl, "--metrics", f"127.0.0.1:{port}",
                                         "--max-buffer-memory", "96M"]) as p:
        async def traffic():
            async with await connect(p.uri_for("m")) as c, await connect(p.uri_for("e")) as ce:
                for i in range(3):
                    await c.pwrite(os.urandom(64 * K), i * 64 * K)
                for i in range(2):
                    await c.pread(128 * K, i * 128 * K)
                await c.flush()
                await c.trim(M, 4 * K)
                await c.zero(2 * M, 8 * K)
                with pytest.raises(OSError):
                    await ce.pread(4 * K, 0)
                async with ControlClient(ctl) as qmp:
                    return await qmp.execute("query-export-stats")

        stats = {e["export"]: e for e in asyncio.run(asyncio.wait_for(traffic(), 30))}
        m = stats["m"]["stats"]
        assert (m["wr_operations"], m["wr_bytes"]) == (3, 192 * K)
        assert (m["rd_operations"], m["rd_bytes"]) == (2, 256 * K)
        assert m["flush_operations"] == 1 and (m["unmap_operations"], m["unmap_bytes"]) == (1, 4 * K)
        assert (m["zero_operations"], m["zero_bytes"]) == (1, 8 * K)
        assert sum(v for k, v in m.items() if k.startswith("failed_")) == 0
        assert m["wr_total_time_ns"] > 0
        e = stats["e"]["stats"]
        assert (e["failed_rd_operations"], e["rd_operations"], e["rd_bytes"]) == (1, 0, 0)

        # A request the protocol layer refuses (beyond the end), by raw socket: invalid, not failed.
        from nbdbackup.nbd import wire
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(p.socket)
            s.recv(18, socket.MSG_WAITALL)
            s.sendall(wire.CLIENT_FLAGS.pack(3) + wire.pack_option(wire.Opt.EXPORT_NAME, b"m"))
            s.recv(10, socket.MSG_WAITALL)  # size + flags (NO_ZEROES)
            s.sendall(wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, wire.Cmd.READ, 1, 16 * M - 512, 1024))
            _, err, _ = wire.SIMPLE_REPLY.unpack(s.recv(16, socket.MSG_WAITALL))
            assert err != 0
            metrics = scrape(port)
        assert metrics['nbdbackup_export_invalid_requests_total{export="m"}'] == 1
        assert metrics['nbdbackup_export_requests_total{export="m",op="write"}'] == 3
        assert metrics['nbdbackup_export_bytes_total{export="m",op="read"}'] == 256 * K
        assert metrics['nbdbackup_export_failed_requests_total{export="e",op="read"}'] == 1
        assert metrics['nbdbackup_export_connections{export="m"}'] == 1  # the raw socket, still open
        assert metrics["nbdbackup_buffer_memory_limit_bytes"] == 96 * M
        # Split with the worker processes, never below twice the largest request.
        assert 64 * M <= metrics["nbdbackup_buffer_memory_share_bytes"] <= 96 * M
        assert 0 <= metrics["nbdbackup_buffer_memory_pooled_bytes"] <= metrics["nbdbackup_buffer_memory_used_bytes"]
        assert metrics["nbdbackup_buffer_memory_used_bytes"] <= 96 * M
        assert metrics["nbdbackup_buffer_memory_waiting_requests"] == 0

        subprocess.run(["nbdcopy", "--no-extents", p.uri_for("m"), "null:"], check=True, timeout=60)
        after = scrape(port)
        assert after['nbdbackup_export_bytes_total{export="m",op="read"}'] == 256 * K + 16 * M
        r = subprocess.run([sys.executable, "-m", "nbdbackup.cli", "export", "stats", "--json", "--control", ctl],
                           cwd=ROOT, capture_output=True, text=True, errors="replace", timeout=30, check=True)
        cli = {x["export"]: x["stats"] for x in json.loads(r.stdout)}
        assert cli["m"]["rd_bytes"] == 256 * K + 16 * M

        for path, code in (("/nope", 404),):
            with pytest.raises(urllib.error.HTTPError) as ei:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
            assert ei.value.code == code
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(req, timeout=10)
        assert ei.value.code == 405
        assert p.alive()


def test_a_flood_of_idle_connections_neither_piles_up_nor_locks_out_a_scrape():
    """Invariant 4 on the metrics port: 300 connections that never send a request
    hold at most `metrics.MAX_CLIENTS` descriptors of the server (each newcomer
    closes the oldest), a scrape made during the flood is answered at once, and
    the NBD side never notices."""
    from nbdbackup.metrics import MAX_CLIENTS

    port = peers.free_tcp_port()
    with peers.nbdbackup_serve("m=memory:1M", extra=["--metrics", f"127.0.0.1:{port}"]) as p:
        scrape(port)
        base = len(os.listdir(f"/proc/{p.pid}/fd"))
        socks = []
        try:
            for _ in range(300):
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            assert "nbdbackup_worker_restarts_total" in scrape(port)  # answered amid the flood
            held = len(os.listdir(f"/proc/{p.pid}/fd")) - base
            assert held <= MAX_CLIENTS, held
            time.sleep(0.3)
            closed = 0
            for s in socks:
                s.setblocking(False)
                try:
                    closed += s.recv(1) == b""
                except ConnectionResetError:
                    closed += 1
                except BlockingIOError:
                    pass  # still open
            assert closed >= len(socks) - MAX_CLIENTS, closed
        finally:
            for s in socks:
                s.close()
        r = subprocess.run(["nbdinfo", "--size", p.uri_for("m")], capture_output=True, text=True, timeout=30)
        assert r.stdout.strip() == str(M), r.stderr
