"""Many stalled readers must not delay another peer's client for long
(invariant 4; docs/fairmem.md).

24 raw TCP clients from 127.0.0.1 each send 200 READs of 1 MiB with a 4 KiB
receive buffer and never read a reply; `serve --max-buffer-memory 64M`
(with and without worker processes).  Together they exhaust the reply
memory, and the server evicts them (`Server._relieve_memory`).  Before
fairmem it evicted one staller per `EVICT_QUIET` s: the memory an eviction
freed went to the next staller's queued READ, which made that staller
"active" again for another `EVICT_QUIET` s; a libnbd client from 127.0.0.2
(another peer) was served after 8-11 s.  Now it must be served within 3 s.
"""

from __future__ import annotations

import socket
import time

import pytest

import peers
from test_stalled_reader import MiB, disk, serve_args, staller  # noqa: F401  (disk: a fixture)

nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.interop

STALLERS = 24


def good_reads_from(port: int, source: str, n: int = 32) -> float:
    """Seconds a libnbd client on a socket bound to ``source`` takes to connect and read ``n`` MiB."""
    t = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    h = nbd.NBD()
    try:
        h.set_export_name("disk")
        h.connect_socket(s.detach())
        for i in range(n):
            h.pread(MiB, i * MiB)
        return time.monotonic() - t
    finally:
        h.shutdown()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [None, "0"], ids=["workers", "no-workers"])
def test_many_stalled_readers_do_not_delay_another_peer(disk, workers, capsys):
    port = peers.free_tcp_port()
    extra = serve_args(port, None, "--max-buffer-memory", "64M", *(["--workers", workers] if workers else []))
    with peers.nbdbackup_serve(f"disk={disk}", extra=extra) as srv:
        peers.wait_for_tcp(port, lambda: srv.alive, srv.log)
        stallers = []
        try:
            for _ in range(STALLERS):
                stallers.append(staller(port, None))
            took = good_reads_from(port, "127.0.0.2")
            with capsys.disabled():
                print(f"\n[{'no-workers' if workers else 'workers'}] good client served in {took:.2f} s beside "
                      f"{STALLERS} stallers; evictions logged: {srv.log().count('and stalls')}")
            assert took < 4.0, srv.log()[-3000:]
        finally:
            for s in stallers:
                s.close()
