"""A client that access control refuses, on a server that requires TLS
(docs/doubts18.md item 3).

proto.md, FORCEDTLS: STARTTLS before TLS "MUST reply with NBD_REP_ACK";
every other option "MUST reply with NBD_REP_ERR_TLS_REQD".  But the same
section lets a server "determine the mode in which it operates dependent
upon the session" as long as it is "consistent in its mode of operation
across the lifespan of a single TCP connection", and the termination rules
say a server that does not want a client "MUST ... simply error inbound
options until the client gets the hint".  Our refusal (`protocol.deny`) is
decided before the first option is answered (Unix credentials at accept, a
connection cap before the greeting) or after TLS (the certificate), so a
refused session is consistently in NOTLS mode: STARTTLS gets ERR_POLICY
("MUST respond with NBD_REP_ERR_POLICY (if it does not support TLS for
policy reasons)"), no option ever gets ERR_TLS_REQD ("The server MUST NOT
respond to any option request with NBD_REP_ERR_TLS_REQD"), EXPORT_NAME
closes.  Not ACKing STARTTLS also spares a TLS handshake per refused
connection.  Checked on the wire (raw socket) and with real clients
(qemu-img names the option and prints our reason; libnbd with TLS required
aborts at once, as proto.md says a TLS-only client SHOULD).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess

import pytest

import peers

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
ACK, SERVER, INFO = 1, 2, 3
ERR_POLICY, ERR_TLS_REQD = 2**31 + 2, 2**31 + 5
STARTTLS, LIST, EXPORT_NAME, INFO_OPT, GO, STRUCTURED = 5, 3, 1, 6, 7, 8


def recvn(s: socket.socket, n: int) -> bytes:
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b


def final_reply(s: socket.socket, opt: int) -> tuple[int, bytes]:
    """The final reply to ``opt`` (INFO/SERVER replies skipped): (type, data)."""
    while True:
        magic, o, rep, ln = struct.unpack(">QIII", recvn(s, 20))
        assert magic == REPLY_MAGIC and o == opt, (hex(magic), o, opt)
        data = recvn(s, ln)
        if rep not in (SERVER, INFO):
            return rep, data


@pytest.fixture
def denied_server(short_tmp, pki):
    """`serve` requiring TLS whose Unix socket admits only a user we are not."""
    disk = short_tmp / "d.img"
    with open(disk, "wb") as f:
        f.truncate(4 << 20)
    other = "nobody" if os.getuid() != 65534 else "root"
    with peers.nbdbackup_serve(f"d={disk}", extra=["--tls-creds", pki["server"], "--tls", "require",
                                                   "--allow-user", other]) as srv:
        yield srv


def test_a_refused_client_gets_policy_errors_never_tls_reqd(denied_server):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(denied_server.socket)
    try:
        recvn(s, 18)
        s.sendall(struct.pack(">I", 1))  # FIXED_NEWSTYLE
        name = struct.pack(">I", 1) + b"d" + struct.pack(">H", 0)
        got = {}
        for opt, data in ((STARTTLS, b""), (LIST, b""), (STRUCTURED, b""), (INFO_OPT, name), (GO, name),
                          (STARTTLS, b""), (99, b"")):
            s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
            rep, msg = final_reply(s, opt)
            got.setdefault(opt, []).append(rep)
            assert rep == ERR_POLICY, (opt, hex(rep), msg)
            assert b"access denied" in msg, msg
        assert ERR_TLS_REQD not in sum(got.values(), [])
        # EXPORT_NAME cannot be answered with an error: the session ends.
        s.sendall(struct.pack(">QII", IHAVEOPT, EXPORT_NAME, 1) + b"d")
        with pytest.raises((EOFError, ConnectionResetError)):
            recvn(s, 1)
    finally:
        s.close()


def test_real_clients_see_the_refusal_and_its_reason(denied_server, pki):
    sock = denied_server.socket
    r = subprocess.run(["qemu-img", "info", "--object",
                        f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=client", "--image-opts",
                        f"driver=nbd,server.type=unix,server.path={sock},export=d,tls-creds=tls0,"
                        "tls-hostname=localhost"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "Denied by server for option 5 (starttls)" in r.stderr and "access denied" in r.stderr, r.stderr
    r = subprocess.run(["qemu-img", "info", f"nbd+unix:///d?socket={sock}"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "access denied" in r.stderr and "TLS" not in r.stderr, r.stderr
    # libnbd requiring TLS: STARTTLS refused -> it aborts (proto.md: a client that only wishes
    # to use TLS SHOULD terminate the session); the reason is in its debug log.
    r = subprocess.run(["nbdinfo", f"nbds+unix:///d?socket={sock}&tls-certificates={pki['server']}"],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, LIBNBD_DEBUG="1"))
    assert r.returncode != 0
    assert "server error message: access denied" in r.stderr, r.stderr[-2000:]
    assert "OPT_STARTTLS.CHECK_REPLY -> NEWSTYLE.PREPARE_OPT_ABORT" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in denied_server.log()
