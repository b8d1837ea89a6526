"""Findings of a hostile-client trial (issue 10) against the real `nbdbackup serve`.

- Command flags: FUA is valid on every command (proto.md "Command flags"),
  sent here by libnbd with its client-side checks off, and by qemu-io on
  writes; SEND_DF is advertised only with structured replies.
- The export list shows no server-side path unless the operator sets a
  description (`nbdinfo --list --json`, snapshot exports included).
- Client text in the log is clipped and a connection's warnings are capped,
  measured in bytes of the server's stderr.

Raw-socket helpers come from `test_server_robustness` (written from proto.md,
independent of nbdbackup.nbd.wire).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest

import peers
from qemutools import qemu_io
from test_server_robustness import (
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    OPT_EXPORT_NAME,
    OPT_GO,
    Raw,
    closed_by_server,
    recv_exact,
)

nbd = pytest.importorskip("nbd")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEND_FUA, SEND_DF = 1 << 3, 1 << 7
KiB, MiB = 1024, 1 << 20


def handle(uri: str, *, strict: bool = False, structured: bool = True) -> "nbd.NBD":
    h = nbd.NBD()
    if not strict:
        h.set_strict_mode(0)  # let libnbd send what its own checks would refuse
    h.set_request_structured_replies(structured)
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def test_fua_is_accepted_on_every_command(short_tmp, make_image):
    img = make_image(short_tmp / "disk.img", 4 * MiB, [(0x11, 0, 1 * MiB)])
    with peers.nbdbackup_serve(f"disk={img}", f"ro=ro:{img}") as srv:
        h = handle(srv.uri_for("disk"))
        assert h.can_fua()
        fua = nbd.CMD_FLAG_FUA
        assert h.pread(4 * KiB, 0, fua) == b"\x11" * 4 * KiB
        assert h.pread(4 * KiB, 0, fua | nbd.CMD_FLAG_DF) == b"\x11" * 4 * KiB
        h.pwrite(b"\x22" * 4 * KiB, 8 * KiB, fua)
        h.flush(fua)
        h.cache(64 * KiB, 0, fua)
        h.trim(4 * KiB, 2 * MiB, fua)
        h.zero(4 * KiB, 16 * KiB, fua | nbd.CMD_FLAG_NO_HOLE)
        seen = []
        h.block_status(1 * MiB, 0, lambda ctx, off, ents, err: seen.append(ents) or 0,
                       fua | nbd.CMD_FLAG_REQ_ONE)
        assert len(seen) == 1 and len(seen[0]) == 2  # REQ_ONE: one (length, flags) pair
        assert h.pread(4 * KiB, 8 * KiB) == b"\x22" * 4 * KiB
        assert h.pread(4 * KiB, 16 * KiB) == bytes(4 * KiB)
        # A flag no command defines like this is still refused, and the connection goes on.
        with pytest.raises(nbd.Error) as e:
            h.pread(4 * KiB, 0, nbd.CMD_FLAG_REQ_ONE)
        assert e.value.errno == "EINVAL"
        assert h.pread(4 * KiB, 0) == b"\x11" * 4 * KiB
        h.shutdown()

        # Read-only export: nothing is written there, FUA is ignored.
        h = handle(srv.uri_for("ro"))
        assert h.pread(4 * KiB, 0, nbd.CMD_FLAG_FUA) == b"\x11" * 4 * KiB
        h.shutdown()
        assert srv.alive()


def test_qemu_io_fua_writes_and_zeroes(short_tmp, make_image):
    img = make_image(short_tmp / "disk.img", 4 * MiB)
    with peers.nbdbackup_serve(f"disk={img}") as srv:
        qemu_io(srv.uri_for("disk"), "write -f -P 0x5a 0 64k", "write -z -f 64k 64k",
                "read -P 0x5a 0 64k", "read -P 0 64k 64k")
    with open(img, "rb") as f:
        assert f.read(64 * KiB) == b"\x5a" * 64 * KiB


def test_send_df_only_with_structured_replies(short_tmp):
    """proto.md "Transmission flags": SEND_DF MUST be clear without structured replies."""
    with peers.nbdbackup_serve("mem=memory:1M") as srv:
        for structured in (False, True):
            r = Raw(srv.socket)
            try:
                _, tflags = r.go("mem", structured=structured)
                assert bool(tflags & SEND_DF) == structured
                assert tflags & SEND_FUA
            finally:
                r.close()
        r = Raw(srv.socket)
        try:
            r.greeting()
            r.client_flags()
            r.option(OPT_EXPORT_NAME, b"mem")
            _, tflags = struct.unpack(">QH", recv_exact(r.s, 10))
            assert not tflags & SEND_DF
        finally:
            r.close()
        # libnbd agrees: no DF without structured replies, so a DF read is refused.
        h = handle(srv.uri_for("mem"), structured=False)
        assert not h.can_df()
        with pytest.raises(nbd.Error) as e:
            h.pread(512, 0, nbd.CMD_FLAG_DF)
        assert e.value.errno == "EINVAL"
        h.shutdown()


# --- descriptions --------------------------------------------------------------------


def cli(*args: str, control: str) -> str:
    p = subprocess.run([sys.executable, "-m", "nbdbackup.cli", *args, "--control", control],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p.stdout


def nbdinfo_list(uri: str) -> dict:
    p = subprocess.run([peers.require("nbdinfo"), "--list", "--json", uri], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    return {e["export-name"]: e for e in json.loads(p.stdout)["exports"]}


def test_export_list_shows_no_server_path_unless_configured(short_tmp, make_image):
    img = make_image(short_tmp / "disk.img", 4 * MiB)
    other = make_image(short_tmp / "other.img", 1 * MiB)
    ctl = str(short_tmp / "c.sock")
    with peers.nbdkit("memory", "1M") as kit, peers.nbdbackup_serve(
            f"disk={img}", f"ro=ro:{img}", "mem=memory:1M", f"remote={kit.uri}",
            f"named={img}", "--description", "named=Finance database, a,b=c",
            extra=["--control", ctl]) as srv:
        cli("export", "add", "added", str(other), control=ctl)
        cli("export", "add", "added2", str(other), "--description", "added by QMP", control=ctl)
        cli("backup", "start", "-e", "disk", "-j", "j1", "--sync", "none", "-t", str(short_tmp / "scratch.img"),
            "--snapshot", "fleece", control=ctl)
        exports = nbdinfo_list(srv.uri_for(""))
        assert set(exports) == {"disk", "ro", "mem", "remote", "named", "added", "added2", "fleece"}
        # What the server sent (nbdinfo adds the URI it connected to: ours, not the server's).
        raw = json.dumps({n: {k: v for k, v in e.items() if k != "uri"} for n, e in exports.items()})
        for secret in (str(short_tmp), "memory:", kit.socket, "nbd+unix", "/"):
            assert secret not in raw, (secret, raw)
        descriptions = {n: e.get("description", "") for n, e in exports.items()}
        assert descriptions["named"] == "Finance database, a,b=c"
        assert descriptions["added2"] == "added by QMP"
        for name in ("disk", "ro", "mem", "remote", "added"):
            assert descriptions[name] == "", (name, descriptions[name])
        # The local admin still sees every SPEC on the control socket.
        listed = {e["name"]: e for e in json.loads(cli("export", "list", "--json", control=ctl))}
        assert listed["disk"]["spec"] == str(img) and listed["named"]["description"] == "Finance database, a,b=c"
        cli("job", "cancel", "j1", control=ctl)


def test_description_option_errors(short_tmp):
    sock = str(short_tmp / "s.sock")
    for extra, message in ((["--description", "nope=x"], b"not an export given"),
                           (["--description", "mem"], b"expected NAME=TEXT"),
                           (["--description", "mem=" + "x" * 5000], b"longer than 4096 bytes")):
        p = subprocess.run(peers.nbdbackup_argv(sock, "mem=memory:1M", extra=extra), capture_output=True,
                           timeout=60, cwd=REPO)
        assert p.returncode == 1 and message in p.stderr, p.stderr


# --- log flooding --------------------------------------------------------------------


def test_huge_client_strings_do_not_flood_the_log():
    """64 KiB unknown export names, 200 times: the log grows by a few hundred bytes each.

    Before clipping, each of these connections wrote one warning of more than
    64 KiB (13 MB for this test).
    """
    with peers.nbdbackup_serve("mem=memory:1M") as srv:
        before = os.path.getsize(srv.log_path)
        name = (b"\x1b[31m\n" + b"A" * 65530)[:64 * KiB - 16]
        n = 200
        t = time.monotonic()
        for _ in range(n):
            r = Raw(srv.socket)
            try:
                r.greeting()
                r.client_flags(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
                r.option(OPT_EXPORT_NAME, name)
                assert closed_by_server(r.s)
            finally:
                r.close()
        took = time.monotonic() - t
        # Many refused GO/INFO with 4 KiB names on one connection: answered, not logged whole.
        r = Raw(srv.socket)
        try:
            r.greeting()
            r.client_flags()
            big = b"B" * 4096
            for _ in range(500):
                r.option(OPT_GO, struct.pack(">I", len(big)) + big + struct.pack(">H", 0))
                opt, rep, _ = r.option_reply()
                assert opt == OPT_GO and rep & (1 << 31)
        finally:
            r.close()
        assert peers.can_connect(srv.socket) and srv.alive()
        grown = os.path.getsize(srv.log_path) - before
        log = srv.log()
        lines = [ln for ln in log.splitlines() if "EXPORT_NAME for unknown export" in ln]
        # One clipped warning per connection while the admission log budget
        # lasts (handshake-phase warnings share it since hunt 6: 20 per 2 s).
        assert 1 <= len(lines) <= min(n, 20 * (took / 2 + 2)), (len(lines), took, log[-2000:])
        assert all(len(ln) < 400 for ln in lines)
        assert "\x1b" not in log and "AAAA" * 20 not in log
        assert "...(65520 bytes)" in lines[0]
        assert grown < 400 * n, f"{grown} bytes of log for {n} hostile connections"
        print(f"log grew {grown} bytes for {n} connections with 64 KiB names + 500 refused GO")


def test_warnings_of_one_connection_are_capped_and_summarised():
    """A client that makes the device fail 500 times logs 10 warnings and one summary."""
    with peers.nbdkit("memory", "1M", "error-pread-rate=1", "error=EIO", filters=["error"]) as kit, \
            peers.nbdbackup_serve(f"bad={kit.uri}") as srv:
        before = os.path.getsize(srv.log_path)
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("bad"))
        for _ in range(500):
            with pytest.raises(nbd.Error):
                h.pread(512, 0)
        h.shutdown()
        for _ in range(100):  # the summary is written when the server sees the close
            if "more warnings not logged" in srv.log():
                break
            time.sleep(0.05)
        log = srv.log()
        failures = [ln for ln in log.splitlines() if "READ at (0, 512) failed" in ln]
        assert len(failures) == 10, log[-3000:]
        assert "490 more warnings not logged (limit 10 per connection)" in log
        assert os.path.getsize(srv.log_path) - before < 10_000
