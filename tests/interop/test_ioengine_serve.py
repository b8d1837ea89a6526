"""Interop: ``serve --io-engine`` (and ``NBDBACKUP_IO_ENGINE``) on a file
export, driven by nbdcopy: a random image copied in (with ``--flush``) and
back out must be identical on every engine, and ``GET /metrics`` reports the
engine chosen at start (``nbdbackup_io_engine_info``) and, for io_uring and
threads, that the writes went through it.
"""

from __future__ import annotations

import os
import subprocess

import pytest

import peers
from nbdbackup.blockdev import ioengine

SIZE = 24 << 20


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _engines():
    out = ["threads", "sync"]
    if ioengine.probe_io_uring() is None:
        out.insert(0, "io_uring")
    return out


@pytest.mark.parametrize("how", ["option", "env"])
@pytest.mark.parametrize("engine", _engines())
def test_nbdcopy_through_each_engine(engine, how, short_tmp):
    src, img, back = (str(short_tmp / n) for n in ("src.img", "disk.img", "back.img"))
    with open(src, "wb") as f:
        f.write(os.urandom(SIZE))
    with open(img, "wb") as f:
        f.truncate(SIZE)
    port = peers.free_tcp_port()
    extra = ["--metrics", f"127.0.0.1:{port}"]
    env = None
    if how == "option":
        extra += ["--io-engine", engine]
    else:
        env = {"NBDBACKUP_IO_ENGINE": engine}
    with peers.nbdbackup_serve(f"disk={img}", extra=extra, env=env) as p:
        uri = p.uri_for("disk")
        subprocess.run(["nbdcopy", "--flush", src, uri], check=True, timeout=120, capture_output=True)
        subprocess.run(["nbdcopy", uri, back], check=True, timeout=120, capture_output=True)
        text = _scrape(port)
    with open(src, "rb") as a, open(back, "rb") as b:
        assert a.read() == b.read()
    with open(src, "rb") as a, open(img, "rb") as b:
        assert a.read() == b.read()
    info = [ln for ln in text.splitlines() if ln.startswith("nbdbackup_io_engine_info{")]
    assert len(info) == 1 and f'engine="{engine}"' in info[0], info
    ops = [ln for ln in text.splitlines() if ln.startswith("nbdbackup_io_engine_operations_total ")]
    n = float(ops[0].split()[1])
    if engine == "sync":
        assert n == 0
    else:
        assert n >= SIZE // (32 << 20)  # nbdcopy's writes (and the flush) went through it
