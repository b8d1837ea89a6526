"""NBD wire format: constants and stateless pack/unpack helpers.

Role: the single place where the layout of every NBD message is written down
(NetworkBlockDevice/nbd doc/proto.md).  Both the server and the client build
on it; nothing here does I/O or keeps state.

Conventions: names are the spec's minus the ``NBD_`` prefix, grouped in
`IntEnum`/`IntFlag` classes; all integers are big-endian ("network byte
order"); byte ranges are ``(offset, length)``.

Invariant: `errno_to_nbd` / `nbd_to_errno` are the only translation between
POSIX errno (the internal error currency) and NBD error values.
"""

from __future__ import annotations

import errno
import struct
from enum import IntEnum, IntFlag

# --- Handshake magics (proto.md "Handshake") ---------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253
OPTION_REPLY_MAGIC = 0x3E889045565A9

# --- Transmission magics (proto.md "Transmission") ---------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

DEFAULT_PORT = 10809

#: Our own limits: the largest payload we accept or send (WRITE payload, READ
#: length), and the largest option payload during the handshake.
MAX_PAYLOAD = 32 * 1024 * 1024
MAX_OPTION_LENGTH = 64 * 1024
#: Strings (export names, descriptions, messages) MUST be <= 4096 bytes.
MAX_STRING = 4096


class HandshakeFlag(IntFlag):
    """Server flags sent after NBDMAGIC/IHAVEOPT (16 bits)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """Client flags (32 bits), answering `HandshakeFlag`."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    """Per-export transmission flags (16 bits)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


class Opt(IntEnum):
    """Option types sent by the client during the handshake."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(IntEnum):
    """Option reply types."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10

    @property
    def is_error(self) -> bool:
        return bool(self & _REP_ERR)


def rep_is_error(rep: int) -> bool:
    """True for any option reply type with the error bit (known or not)."""
    return bool(rep & _REP_ERR)


class Info(IntEnum):
    """Information types in OPT_INFO/OPT_GO requests and REP_INFO replies."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    """Request types in the transmission phase."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(IntFlag):
    """Request flags (16 bits)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


_REPLY_TYPE_ERR = 1 << 15


class ReplyType(IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = _REPLY_TYPE_ERR | 1
    ERROR_OFFSET = _REPLY_TYPE_ERR | 2


def reply_type_is_error(t: int) -> bool:
    return bool(t & _REPLY_TYPE_ERR)


class StateFlag(IntFlag):
    """`base:allocation` extent flags (proto.md "base:allocation")."""

    HOLE = 1 << 0
    ZERO = 1 << 1


#: `qemu:allocation-depth`: 0 = unallocated, N = allocated at depth N.
#: `qemu:dirty-bitmap:NAME`: bit 0 set = dirty.
DIRTY = 1


class Err(IntEnum):
    """NBD error values (proto.md "Error values")."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


_ERRNO_TO_NBD = {
    errno.EPERM: Err.EPERM,
    errno.EACCES: Err.EPERM,
    errno.EROFS: Err.EPERM,
    errno.EIO: Err.EIO,
    errno.ENOMEM: Err.ENOMEM,
    errno.EINVAL: Err.EINVAL,
    errno.ENOSPC: Err.ENOSPC,
    errno.EDQUOT: Err.ENOSPC,
    errno.EFBIG: Err.ENOSPC,
    errno.EOVERFLOW: Err.EOVERFLOW,
    errno.ENOTSUP: Err.ENOTSUP,
    errno.EOPNOTSUPP: Err.ENOTSUP,
    errno.ESHUTDOWN: Err.ESHUTDOWN,
}

_NBD_TO_ERRNO = {
    Err.EPERM: errno.EPERM,
    Err.EIO: errno.EIO,
    Err.ENOMEM: errno.ENOMEM,
    Err.EINVAL: errno.EINVAL,
    Err.ENOSPC: errno.ENOSPC,
    Err.EOVERFLOW: errno.EOVERFLOW,
    Err.ENOTSUP: errno.ENOTSUP,
    Err.ESHUTDOWN: errno.ESHUTDOWN,
}


def errno_to_nbd(e: int | None) -> Err:
    """Map a POSIX errno to the NBD error sent on the wire.

    Unknown errnos become EIO, as the spec recommends for errors it does not
    name; 0/None is a bug in the caller (a failed request must have a cause).
    """
    assert e, "a failed request needs an errno"
    return _ERRNO_TO_NBD.get(e, Err.EIO)


def nbd_to_errno(err: int) -> int:
    """Map an NBD error received from a server to a POSIX errno.

    Unknown values are treated as EINVAL (proto.md: a client SHOULD treat an
    unexpected error value as if it were EINVAL).
    """
    return _NBD_TO_ERRNO.get(err, errno.EINVAL)  # type: ignore[call-overload]


# --- Structs -------------------------------------------------------------------

#: S: NBDMAGIC, IHAVEOPT, handshake flags
SERVER_GREETING = struct.Struct(">QQH")
#: C: client flags
CLIENT_FLAGS = struct.Struct(">I")
#: C: IHAVEOPT, option, length (then `length` bytes of data)
OPTION_HEADER = struct.Struct(">QII")
#: S: reply magic, option, reply type, length (then data)
OPTION_REPLY = struct.Struct(">QIII")
#: REP_INFO INFO_EXPORT: type, size, transmission flags
INFO_EXPORT = struct.Struct(">HQH")
#: REP_INFO INFO_BLOCK_SIZE: type, minimum, preferred, maximum
INFO_BLOCK_SIZE = struct.Struct(">HIII")
#: OPT_EXPORT_NAME reply: size, transmission flags (then 124 zero bytes
#: unless NO_ZEROES was negotiated)
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: REP_META_CONTEXT: context id (then the name)
META_CONTEXT_ID = struct.Struct(">I")
#: C: magic, command flags, type, cookie, offset, length
REQUEST = struct.Struct(">IHHQQI")
#: S: magic, error, cookie
SIMPLE_REPLY = struct.Struct(">IIQ")
#: S: magic, flags, type, cookie, length
STRUCTURED_REPLY = struct.Struct(">IHHQI")
#: OFFSET_DATA/OFFSET_HOLE prefix: offset (OFFSET_HOLE: then hole size u32)
OFFSET_HOLE = struct.Struct(">QI")
OFFSET = struct.Struct(">Q")
#: BLOCK_STATUS chunk: context id, then descriptors of (length u32, flags u32)
BLOCK_STATUS_ID = struct.Struct(">I")
BLOCK_DESCRIPTOR = struct.Struct(">II")
#: ERROR chunk: error u32, message length u16 (then message)
ERROR_CHUNK = struct.Struct(">IH")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

REQUEST_SIZE = REQUEST.size  # 28
SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size  # 16
STRUCTURED_REPLY_SIZE = STRUCTURED_REPLY.size  # 20


def pack_request(cmd: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def pack_simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def pack_structured_header(
    cookie: int, rtype: int, length: int, flags: int = ReplyFlag.DONE
) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)


def pack_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def pack_option_reply(option: int, rep: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, rep, len(data)) + data


def pack_structured_error(cookie: int, err: int, message: str = "", flags: int = ReplyFlag.DONE) -> bytes:
    msg = message.encode("utf-8")[:MAX_STRING]
    payload = ERROR_CHUNK.pack(err, len(msg)) + msg
    return pack_structured_header(cookie, ReplyType.ERROR, len(payload), flags) + payload


def pack_string(s: str | bytes) -> bytes:
    """A u32 length followed by the bytes, as used inside option payloads."""
    b = s.encode("utf-8") if isinstance(s, str) else s
    return U32.pack(len(b)) + b


def feed_buffered(proto, data: bytes, stop=None) -> None:
    """Copy ``data`` into a sans-IO object through its ``get_buffer`` /
    ``buffer_updated`` pair (the `asyncio.BufferedProtocol` shape both our
    protocol objects have); ``stop()`` true ends it early (a closed state)."""
    mv = memoryview(data)
    while mv and not (stop is not None and stop()):
        buf = proto.get_buffer(len(mv))
        n = min(len(buf), len(mv))
        buf[:n] = mv[:n]
        mv = mv[n:]
        proto.buffer_updated(n)
