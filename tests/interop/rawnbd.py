"""A misbehaving NBD server written from the spec with `struct` alone (hunt 8).

Role: the hostile peer for our client side (`nbd.client`, the pull threads,
`nbdbackup pull` / restore).  It shares no code with our own server or wire
module (`nbdbackup.nbd.*`), so it cannot share their bugs: every header is
packed here from proto.md's layouts.

It serves one export of ``size`` bytes whose content is `pattern` (4 KiB block ``b``
starts with ``b`` as a big-endian u64, then bytes ``(b * 7 + i) & 0xff``: a misplaced block shows), with
structured replies and ``base:allocation`` (all data) when asked, CAN_MULTI_CONN,
and answers READ / BLOCK_STATUS correctly unless ``mode`` says otherwise:

- ``read-overlap``: a READ of 2 x 4 KiB or more is answered with two
  OFFSET_DATA chunks that BOTH cover its first half (the lengths add up to
  the request, proto.md forbids the overlap) -- the second half is never sent;
- ``read-short`` / ``read-long``: an OFFSET_DATA chunk 1 byte short / long
  of the request (DONE set);
- ``read-cookie``: a reply with a cookie never sent;
- ``read-nodone``: the data chunk without NBD_REPLY_FLAG_DONE, then nothing;
- ``read-huge``: a chunk header claiming a 4 GiB - 1 payload;
- ``read-errmsg``: an ERROR chunk whose message length exceeds the chunk;
- ``read-stall``: half of a READ reply, then silence (socket kept open);
- ``read-trickle``: correct READ replies, 512 bytes every 0.05 s (no receive
  ever waits long; a 1 MiB reply takes ~100 s);
- ``read-error``: a proper ERROR chunk (EIO, a message);
- ``bs-beyond``: BLOCK_STATUS extents summing past the request (allowed for the
  last one only when REQ_ONE... we send two past it); ``bs-zero``: extents of
  length 0 only; ``bs-ctx``: an unknown context id; ``bs-endless``: a reply of
  ~1 M tiny extents; ``bs-tiny`` (legal): 1-byte extents alternating data /
  hole, 32 MiB of descriptors per reply; ``bs-frag`` (legal): 4 KiB ones;
- ``size-change``: the second and later connections see an export 1 MiB larger;
- ``meta-flood``: OPT_LIST_META_CONTEXT answered by an endless stream of
  distinct 4000-byte context names;
- ``trickle``: OPT_GO answered by endless (valid, ignorable) REP_INFO replies,
  one byte every 0.1 s: no single receive ever waits long;
- ``hole-overlap``: OFFSET_HOLE over the first half twice (sum = length);
- ``write-close``: the connection is closed on a WRITE, unanswered (a restore
  target going away).

``after`` (count of READ replies -- WRITEs for ``write-close`` -- answered correctly before misbehaving) lets a
pull get going first.  Run as a script: ``python rawnbd.py SOCKET MODE [SIZE]``.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLYMAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_INFO, REP_META = 1, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WZ, CMD_BS = range(8)
T_NONE, T_DATA, T_HOLE, T_BS = 0, 1, 2, 5
T_ERROR = (1 << 15) + 1
DONE = 1
# HAS_FLAGS | SEND_FLUSH | CAN_MULTI_CONN (read-write unless ro)
TFLAGS = 1 | 4 | 256
BASE_ALLOC_ID = 7


def pattern(offset: int, length: int) -> bytes:
    """The export's content over ``(offset, length)``."""
    out = bytearray()
    pos = offset
    while pos < offset + length:
        b, i = divmod(pos, 4096)
        n = min(4096 - i, offset + length - pos)
        block = struct.pack(">Q", b) + (bytes(((b * 7 + k) & 0xFF) for k in range(256)) * 16)[8:]
        out += block[i : i + n]
        pos += n
    return bytes(out)


def _recv(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise EOFError
        buf += got
    return bytes(buf)


def _opt_reply(opt: int, rep: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", REPLYMAGIC, opt, rep, len(data)) + data


def _chunk(flags: int, rtype: int, cookie: int, payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">IHHQI", STRUCT_MAGIC, flags, rtype, cookie,
                       len(payload) if length is None else length) + payload


class Server:
    """Serve ``mode`` on a Unix socket at ``path`` from a thread per connection."""

    def __init__(self, path: str, mode: str = "ok", size: int = 16 << 20, after: int = 0,
                 multi_conn: bool = True) -> None:
        self.path, self.mode, self.size, self.after = path, mode, size, after
        self.flags = TFLAGS if multi_conn else TFLAGS & ~256
        self.lock = threading.Lock()
        self.conns = 0
        self.reads = 0  # READ requests answered so far (all connections)
        self.requests = 0
        self.writes = 0  # WRITE requests received so far (all connections)
        self.stalled = threading.Event()
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(path)
        self.lsock.listen(16)
        self.socks: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._stop = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.lsock.close()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            self.socks.append(s)
            with self.lock:
                self.conns += 1
                k = self.conns
            threading.Thread(target=self._serve, args=(s, k), daemon=True).start()

    # -- handshake --------------------------------------------------------------

    def _handshake(self, s: socket.socket, k: int) -> tuple[int, bool, bool] | None:
        size = self.size + (1 << 20 if self.mode == "size-change" and k > 1 else 0)
        s.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1 | 2))
        (cflags,) = struct.unpack(">I", _recv(s, 4))
        structured = meta = False
        while True:
            magic, opt, n = struct.unpack(">QII", _recv(s, 16))
            data = _recv(s, n)
            if opt == OPT_STRUCTURED_REPLY:
                structured = True
                s.sendall(_opt_reply(opt, REP_ACK))
            elif opt in (OPT_SET_META, OPT_LIST_META):
                (nl,) = struct.unpack_from(">I", data)
                pos = 4 + nl
                (nq,) = struct.unpack_from(">I", data, pos)
                pos += 4
                names = []
                for _ in range(nq):
                    (ql,) = struct.unpack_from(">I", data, pos)
                    names.append(data[pos + 4 : pos + 4 + ql].decode())
                    pos += 4 + ql
                if self.mode == "meta-flood" and opt == OPT_LIST_META:
                    k = 0
                    while not self._stop:  # an endless list of distinct 4000-byte names
                        k += 1
                        s.sendall(_opt_reply(opt, REP_META, struct.pack(">I", 0)
                                             + b"qemu:dirty-bitmap:%010d" % k + b"x" * 3972))
                    return None
                if (not names or "base:allocation" in names) and structured:
                    if opt == OPT_SET_META:
                        meta = True
                    s.sendall(_opt_reply(opt, REP_META, struct.pack(">I", BASE_ALLOC_ID if opt == OPT_SET_META else 0)
                                         + b"base:allocation"))
                s.sendall(_opt_reply(opt, REP_ACK))
            elif opt == OPT_GO and self.mode == "trickle":
                info = _opt_reply(opt, REP_INFO, struct.pack(">H", 99) + b"unknown info, ignored")
                while not self._stop:  # valid, endless, one byte every 0.1 s
                    for b in info:
                        if self._stop:
                            return None
                        s.sendall(bytes([b]))
                        time.sleep(0.1)
                return None
            elif opt in (OPT_GO, OPT_INFO):
                s.sendall(_opt_reply(opt, REP_INFO, struct.pack(">HQH", 0, size, self.flags)))
                s.sendall(_opt_reply(opt, REP_ACK))
                if opt == OPT_GO:
                    return size, structured, meta
            elif opt == OPT_ABORT:
                s.sendall(_opt_reply(opt, REP_ACK))
                return None
            else:
                s.sendall(_opt_reply(opt, REP_ERR_UNSUP))

    # -- transmission -----------------------------------------------------------

    def _serve(self, s: socket.socket, k: int) -> None:
        try:
            hs = self._handshake(s, k)
            if hs is None:
                return
            size, structured, meta = hs
            while True:
                magic, flags, cmd, cookie, off, n = struct.unpack(">IHHQQI", _recv(s, 28))
                if magic != REQ_MAGIC:
                    return
                with self.lock:
                    self.requests += 1
                if cmd == CMD_DISC:
                    return
                if cmd == CMD_WRITE:
                    _recv(s, n)
                    with self.lock:
                        self.writes += 1
                        bad = self.writes > self.after
                    if self.mode == "write-close" and bad:
                        return  # the target goes away mid-restore, the write unanswered
                if cmd == CMD_READ:
                    with self.lock:
                        self.reads += 1
                        bad = self.reads > self.after
                    out = self._read(cookie, off, n, structured, bad)
                    if self.mode == "read-trickle" and bad:
                        for k in range(0, len(out), 512):  # the reply, 512 bytes every 0.05 s
                            if self._stop:
                                return
                            s.sendall(out[k : k + 512])
                            time.sleep(0.05)
                        continue
                    if out is None:
                        self.stalled.set()
                        while not self._stop:  # stall: keep the socket open, say nothing more
                            try:
                                if not s.recv(65536):
                                    return
                            except OSError:
                                return
                        return
                    s.sendall(out)
                elif cmd == CMD_BS:
                    s.sendall(self._bs(cookie, off, n))
                else:
                    s.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, 0, cookie))
        except (EOFError, OSError):
            pass
        finally:
            try:
                s.close()
            except OSError:
                pass

    def _read(self, cookie: int, off: int, n: int, structured: bool, bad: bool) -> bytes | None:
        data = pattern(off, n)
        mode = self.mode if bad else "ok"
        if not structured:
            return struct.pack(">IIQ", SIMPLE_MAGIC, 0, cookie) + data
        if mode == "read-overlap" and n >= 8192:
            h = n // 2
            return (_chunk(0, T_DATA, cookie, struct.pack(">Q", off) + data[:h])
                    + _chunk(DONE, T_DATA, cookie, struct.pack(">Q", off) + data[:n - h]))
        if mode == "hole-overlap" and n >= 8192:
            h = n // 2
            return (_chunk(0, T_HOLE, cookie, struct.pack(">QI", off, h))
                    + _chunk(DONE, T_HOLE, cookie, struct.pack(">QI", off, n - h)))
        if mode == "read-short":
            return _chunk(DONE, T_DATA, cookie, struct.pack(">Q", off) + data[:-1])
        if mode == "read-long":
            return _chunk(DONE, T_DATA, cookie, struct.pack(">Q", off) + data + b"\0")
        if mode == "read-cookie":
            return _chunk(DONE, T_DATA, cookie ^ 0x5A5A0000, struct.pack(">Q", off) + data)
        if mode == "read-nodone":
            return _chunk(0, T_DATA, cookie, struct.pack(">Q", off) + data)
        if mode == "read-huge":
            return _chunk(DONE, T_DATA, cookie, struct.pack(">Q", off) + data, length=0xFFFFFFFF)
        if mode == "read-errmsg":
            return _chunk(DONE, T_ERROR, cookie, struct.pack(">IH", 5, 0xFFFF) + b"x" * 10)
        if mode == "read-error":
            return _chunk(DONE, T_ERROR, cookie, struct.pack(">IH", 5, 12) + b"disk on fire")
        if mode == "read-stall":
            return None
        return _chunk(DONE, T_DATA, cookie, struct.pack(">Q", off) + data)

    def _bs(self, cookie: int, off: int, n: int) -> bytes:
        mode = self.mode
        if mode == "bs-beyond":
            descs = struct.pack(">II", n, 0) + struct.pack(">II", 1 << 20, 0) + struct.pack(">II", 1 << 20, 0)
        elif mode == "bs-zero":
            descs = struct.pack(">II", 0, 0) * 4
        elif mode == "bs-tiny":  # legal: 1-byte extents, alternating data / hole+zero, up to 32 MiB of them
            descs = struct.pack(">IIII", 1, 0, 1, 3) * min(n // 2, (32 << 20) // 16 - 1)
        elif mode == "bs-frag":  # legal: 4 KiB extents, alternating data / hole+zero
            descs = b"".join(struct.pack(">II", 4096, 3 * (i & 1)) for i in range(max(1, n // 4096)))
        elif mode == "bs-endless":
            descs = struct.pack(">II", 512, 0) * min(n // 512, 1 << 20)
        else:
            descs = struct.pack(">II", n, 0)
        cid = 99 if mode == "bs-ctx" else BASE_ALLOC_ID
        return _chunk(DONE, T_BS, cookie, struct.pack(">I", cid) + descs)


if __name__ == "__main__":
    srv = Server(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 16 << 20)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.close()
