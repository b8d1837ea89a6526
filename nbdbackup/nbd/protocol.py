"""Sans-IO NBD server protocol: bytes in, events out; replies as bytes.

Role: everything the server knows about the NBD protocol (proto.md) that
does not need I/O: the fixed-newstyle handshake with all its options, request
parsing and validation, and reply encoding.  `nbd.server` only moves bytes
and runs requests against block devices.  Tests feed bytes in tiny slices.

Receiving (zero-copy, shaped like `asyncio.BufferedProtocol`):
``get_buffer(hint)`` returns memory to receive into and
``buffer_updated(n)`` says how much arrived.  Small messages are parsed from
an internal ring buffer; a WRITE payload is received straight into its own
buffer once its header has been parsed, so payload bytes are copied at
most once (only the part that arrived together with headers).
``receive_data(b)`` is the convenience form for tests.

Batches (``batching=True``, what `nbd.server` uses): when one receive
brings many small requests (a client with 32 requests in flight sends them
back to back), the I/O layer takes them in one pass instead of one event
each: ``buffer_updated(n, parse=False)`` only records the bytes,
`peek_batch` returns the complete, valid, small READs and WRITEs (and valid
WRITE_ZEROES and TRIMs, which have no payload) at the front of the ring -- a WRITE's payload stays in the ring and is written to the
device from there -- together with their encoded reply headers, without
consuming anything; `commit_batch` consumes the prefix the I/O layer did,
and `parse` turns whatever is left into events as usual (a request the batch
does not take, an invalid one, a violation: the ordinary path answers it).
With batching a small WRITE (up to `BATCH_MAX`) whose payload has not all
arrived waits, whole, in the ring for its last bytes instead of being
received into a payload buffer; the ring is fixed per connection, so this
pins no more memory than before.

Paced payloads (``paced_payloads=True``, what `nbd.server` uses): the
protocol allocates no payload memory itself.  After a WRITE header it waits
(`payload_blocked`) until the I/O layer grants memory with
`allow_payload` (the first grant brings the buffer), and it receives at most
the granted bytes into it; until the first grant, payload bytes land in the
ring.  The I/O layer charges each grant to its memory budget
(`nbd.budget`) and stops reading while it cannot grant.  Without pacing
(tests, fuzzers) the whole payload buffer is allocated when the header
arrives, as before.

Events (`next_event`): `HandshakeDone`, `Request` (validated: ``error`` is
set when the request must be answered with an error without running it),
`Disconnect` (CMD_DISC or ABORT), `ProtocolViolation` (the peer broke the
protocol: the connection must be closed; nothing after it is parsed),
`StartTLS` (the ACK to NBD_OPT_STARTTLS is in ``data_to_send``: send it in
clear, then run the TLS handshake; every later byte, both ways, goes
through TLS and is fed back here decrypted).

TLS (proto.md "TLS support"), by ``tls`` mode: ``off`` (NOTLS) refuses
STARTTLS with ERR_POLICY; ``on`` (SELECTIVETLS, no TLS-only export) accepts
it; ``require`` (FORCEDTLS) answers every option but STARTTLS and ABORT with
ERR_TLS_REQD until TLS is up, and closes on EXPORT_NAME.  A second STARTTLS,
or one with data, gets ERR_INVALID; bytes pipelined behind STARTTLS (before
the TLS handshake) are a violation.  Negotiated state (structured replies,
meta contexts) does not survive the upgrade.

Sending: handshake replies accumulate in an outgoing buffer drained by
``data_to_send()``; transmission replies are built by the ``reply_*``
methods, which the I/O layer writes whole (a reply is never interleaved with
another).

Invariants:
- Nothing is parsed after `ProtocolViolation`, `Disconnect` or ABORT.
- A Request event with ``error == 0`` is within the export, has only flags
  the negotiated state allows, and (WRITE) carries exactly ``length``
  payload bytes.
- Option data is always consumed whole before the next option is parsed,
  even when the option is refused (proto.md: unknown options get
  ERR_UNSUP and negotiation goes on).
"""

from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass
from enum import Enum, auto
from typing import Callable, Sequence

from . import wire
from .logsafe import clip
from .wire import (
    Cmd,
    CmdFlag,
    HandshakeFlag,
    ClientFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)


# --------------------------------------------------------------------------- #
# What the protocol needs to know about an export (no device, no I/O).


@dataclass(frozen=True)
class ExportInfo:
    """A snapshot of an export's properties, as the handshake advertises them.

    ``meta_contexts``: exact names of the meta contexts this export answers.
    ``block_size``: (minimum, preferred, maximum).
    """

    name: str
    size: int
    flags: TransmissionFlag
    block_size: tuple[int, int, int] = (1, 4096, wire.MAX_PAYLOAD)
    description: str = ""
    meta_contexts: Sequence[str] = ("base:allocation",)


ExportLookup = Callable[[str], "ExportInfo | None"]
ExportLister = Callable[[], "list[ExportInfo]"]


# --------------------------------------------------------------------------- #
# Events


@dataclass
class HandshakeDone:
    """Transmission begins for ``export``; ``contexts`` maps id -> meta context."""

    export: ExportInfo
    structured: bool
    contexts: dict[int, str]


@dataclass
class Request:
    """A transmission request.

    ``payload`` is the WRITE data (a bytearray, or an mmap for a large paced
    payload; owned by the event) or None.
    ``error`` is an errno to answer with instead of running the request
    (0 = valid).  ``message`` explains an error for logs/structured replies.
    """

    cookie: int
    cmd: int
    flags: int  # CmdFlag bits (a plain int: enum construction costs per request)
    offset: int
    length: int
    payload: bytearray | None = None
    error: int = 0
    message: str = ""


@dataclass
class Disconnect:
    """The client asked to disconnect (CMD_DISC, OPT_ABORT)."""

    reason: str


@dataclass
class ProtocolViolation:
    """The client broke the protocol; close the connection after logging ``message``."""

    message: str


@dataclass
class StartTLS:
    """Upgrade the connection to TLS now (after sending ``data_to_send()`` in clear)."""


Event = HandshakeDone | Request | Disconnect | ProtocolViolation | StartTLS


class State(Enum):
    CLIENT_FLAGS = auto()
    OPTION_HEADER = auto()
    OPTION_DATA = auto()
    TRANSMISSION = auto()
    PAYLOAD = auto()
    CLOSED = auto()


_RECV_BUF = 256 * 1024
#: At most this much is offered to the kernel per receive into the ring: a
#: large WRITE payload then mostly lands straight in its own buffer instead of
#: being over-read into the ring and copied (small requests still batch).
_RING_READ = 32 * 1024

#: Most descriptors in one BLOCK_STATUS chunk (proto.md: SHOULD NOT exceed 2^20).
MAX_EXTENTS = 1 << 20

#: Largest READ or WRITE a batch takes (`peek_batch`).  A WRITE's payload
#: must sit whole in the ring, so this is well under `_RECV_BUF`.
BATCH_MAX = 64 * 1024

_REQ_MAGIC = wire.REQUEST_MAGIC
_REQ_SIZE = wire.REQUEST_SIZE
_CMD_READ, _CMD_WRITE = int(Cmd.READ), int(Cmd.WRITE)
_CMD_WRITE_ZEROES, _CMD_TRIM = int(Cmd.WRITE_ZEROES), int(Cmd.TRIM)

#: Command flags each command may carry (before checking what was negotiated).
#: proto.md "Command flags": a client MUST NOT set a flag not documented for
#: the command, so the others are refused with EINVAL -- except FUA, which
#: "is valid for all commands": where SEND_FUA was advertised the server MUST
#: accept it on every command, and ignores it where nothing is written (READ,
#: FLUSH, CACHE, BLOCK_STATUS).  PAYLOAD_LEN belongs to extended headers, which
#: this server does not negotiate, so it is refused like any unknown bit.
_ALLOWED_FLAGS = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag.FUA,  # never validated: DISC ends the connection whatever its flags
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}


_ALLOWED_FLAGS_INT = {int(k): int(v) for k, v in _ALLOWED_FLAGS.items()}
_FUA, _DF, _FAST_ZERO = int(CmdFlag.FUA), int(CmdFlag.DF), int(CmdFlag.FAST_ZERO)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_SEND_FUA, _SEND_FAST_ZERO = int(TransmissionFlag.SEND_FUA), int(TransmissionFlag.SEND_FAST_ZERO)
_SEND_DF, _READ_ONLY = int(TransmissionFlag.SEND_DF), int(TransmissionFlag.READ_ONLY)


class _TF:
    """Transmission flag bits as plain ints for the per-request path."""


for _m in TransmissionFlag:
    setattr(_TF, _m.name, int(_m))


def _match_contexts(query: str, available: Sequence[str], *, listing: bool) -> list[str]:
    """Contexts selected by one query (proto.md "Metadata querying").

    For LIST, a namespace-only query (``base:``) or a leaf prefix ending in
    ``:`` (``qemu:dirty-bitmap:``) lists every context under it.  For SET, only
    exact names select a context.
    """
    if not listing:
        return [c for c in available if c == query]
    if query.endswith(":"):
        return [c for c in available if c.startswith(query)]
    return [c for c in available if c == query]


class ServerConnection:
    """The server side of one NBD connection, without I/O.

    Fields (all private to this object; the I/O layer reads only the public
    properties):
    - ``_state``: where parsing is (see `State`).
    - ``_buf``/``_start``/``_end``: receive ring; valid bytes are
      ``_buf[_start:_end]``.
    - ``_out``: handshake bytes waiting to be sent.
    - ``_events``: parsed events waiting for `next_event`.
    - ``_opt``/``_opt_len``: the option whose data is being received.
    - ``_pending``/``_payload``/``_payload_filled``: the WRITE request whose
      payload is being received, its buffer (None until the first grant when
      paced) and how much has arrived; ``_payload_allowed``: how much of it
      may be received (granted memory; the declared length when not paced);
      ``_into_payload``: the last `get_buffer` returned payload memory.
    - ``paced``: payload memory comes from `allow_payload` (see the module
      docstring).
    - ``no_zeroes``, ``structured``, ``fixed``: negotiated handshake state.
    - ``tls_mode`` ("off", "on", "require"; fixed); ``tls_active`` (STARTTLS
      was accepted: everything after it runs over TLS).
    - ``_denied``: the text every option gets once this client is refused (see `deny`), or None.
    - ``_meta_export``/``_meta``: the export named by the last
      SET_META_CONTEXT and the contexts it selected (ids are indexes).
    - ``export``: the export of the transmission phase; ``tflags``: the
      transmission flags it was advertised with (requests are checked
      against these, see `_advertised`).
    - ``batching``: small WRITEs wait whole in the ring for `peek_batch`
      (see the module docstring); ``_head_need``: bytes the request at the
      ring's front needs in all (header and payload) while it waits so, else
      0; ``_ring_read``: how much one receive into the ring may bring (all of
      the ring after small requests; `_RING_READ` after a large WRITE, whose
      payload should land in its own buffer).
    - ``one_at_a_time``: set by the I/O layer between batches: parsing
      stops at the start of a request while an event waits, so the requests
      after one the batch could not take stay in the ring for the next batch.
    - ``_fast``: what `peek_batch` accepts without `_validate`, fixed when
      transmission starts: (export size, minimum block size, READ flags
      allowed, WRITE flags allowed or -1 on a read-only export,
      WRITE_ZEROES flags allowed or -1 (read-only or not advertised), TRIM
      flags allowed or -1).
    """

    def release_ring(self, force: bool = False) -> bool:
        """Free the receive ring when it holds nothing (True if so); the next
        `get_buffer` allocates a new one.  For an idle connection (a VM's disk
        doing no I/O: 256 KiB each, mmap-backed, so it goes back to the OS)
        and for a connection now served by another process (its socket and
        this state went there: nothing is fed here again; ``force``)."""
        if not force and (self._start != self._end or self._state is State.PAYLOAD or self._head_need):
            return False
        if self._buf:
            self._buf = bytearray()
            self._view = memoryview(self._buf)
        self._start = self._end = 0
        return True

    def __init__(self, lookup: ExportLookup, lister: ExportLister, *, max_payload: int = wire.MAX_PAYLOAD,
                 tls: str = "off", paced_payloads: bool = False, batching: bool = False) -> None:
        assert tls in ("off", "on", "require")
        self.tls_mode = tls
        self.tls_active = False
        self._denied: str | None = None
        self._lookup = lookup
        self._lister = lister
        self.max_payload = max_payload
        self._state = State.CLIENT_FLAGS
        self._buf = bytearray(_RECV_BUF)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._opt = 0
        self._opt_len = 0
        self._pending: Request | None = None
        self._payload = None  # bytearray or mmap
        self._payload_filled = 0
        self._payload_allowed = 0
        self._into_payload = False
        self.paced = paced_payloads
        self.batching = batching
        self.one_at_a_time = False
        self._head_need = 0
        self._ring_read = _RING_READ
        self._fast: tuple[int, int, int, int, int, int] = (0, 1, 0, -1, -1, -1)
        self.no_zeroes = False
        self.fixed = False
        self.structured = False
        self._meta_export: str | None = None
        self._meta: list[str] = []
        self.export: ExportInfo | None = None
        self.tflags = 0
        self.contexts: dict[int, str] = {}
        self._out += wire.SERVER_GREETING.pack(
            wire.NBDMAGIC, wire.IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        )

    @classmethod
    def resumed(cls, info: ExportInfo, *, structured: bool, contexts: dict[int, str],
                max_payload: int = wire.MAX_PAYLOAD, paced_payloads: bool = False,
                batching: bool = False) -> "ServerConnection":
        """A connection already in transmission for ``info`` (another process
        ran the handshake and handed the socket over, `nbd.worker`): the same
        state `_start_transmission` leaves, with no greeting to send and no
        `HandshakeDone` event.  ``contexts`` are the meta contexts negotiated
        (id -> name).  Feed it the bytes the previous owner received but did
        not consume (its `unconsumed`)."""
        c = cls(lambda _n: None, lambda: [], max_payload=max_payload, tls="off",
                paced_payloads=paced_payloads, batching=batching)
        c._out.clear()
        c.fixed = True
        c.structured = structured
        c._meta_export = info.name if contexts else None
        c._meta = [contexts[i] for i in sorted(contexts)]
        c._start_transmission(info)
        c.contexts = dict(contexts)
        c._events.clear()
        return c

    def unconsumed(self) -> bytes | None:
        """Every byte received and not yet consumed by a request that ran,
        re-serialised as the client sent it: the parsed requests still queued
        as events (header, and a WRITE's payload), the WRITE whose payload is
        being received (header and the part that arrived), then the ring's
        leftovers -- in stream order.  A `resumed` connection fed these bytes
        is where this one is.  None when a queued event cannot be re-sent
        (a protocol violation, a TLS or handshake event): the caller keeps
        the connection.  Call only in transmission, with nothing started
        from the queue meanwhile."""
        if not self.in_transmission:
            return None
        out = bytearray()
        pack = wire.REQUEST.pack
        for ev in self._events:
            if isinstance(ev, Request):
                out += pack(_REQ_MAGIC, ev.flags, ev.cmd, ev.cookie, ev.offset, ev.length)
                if ev.cmd == _CMD_WRITE and ev.payload is not None:
                    out += ev.payload
            elif isinstance(ev, Disconnect):
                out += pack(_REQ_MAGIC, 0, int(Cmd.DISC), 0, 0, 0)
            else:
                return None
        if self._state is State.PAYLOAD and self._pending is not None:
            req = self._pending
            out += pack(_REQ_MAGIC, req.flags, req.cmd, req.cookie, req.offset, req.length)
            if self._payload is not None and self._payload_filled:
                out += memoryview(self._payload)[:self._payload_filled]
        out += self._view[self._start:self._end]
        return bytes(out)

    # ---------------------------------------------------------------- state

    @property
    def state(self) -> State:
        return self._state

    @property
    def in_transmission(self) -> bool:
        return self._state in (State.TRANSMISSION, State.PAYLOAD)

    def data_to_send(self) -> bytes:
        """Handshake bytes to send now (empty when none)."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def has_events(self) -> bool:
        """Parsed events are waiting (the I/O layer may hold them back)."""
        return bool(self._events)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def close(self) -> None:
        self._state = State.CLOSED

    # ------------------------------------------------------------- receiving

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Memory to receive the next bytes into (never empty)."""
        if self._state is State.PAYLOAD and self._payload_filled < self._payload_allowed:
            self._into_payload = True
            assert self._payload is not None
            return memoryview(self._payload)[self._payload_filled:self._payload_allowed]
        # (A paced payload without granted memory: bytes wait in the ring.)
        self._into_payload = False
        if self._start == self._end:
            self._start = self._end = 0
            if not self._buf:  # released while idle (`release_ring`)
                self._buf = bytearray(_RECV_BUF)
                self._view = memoryview(self._buf)
        elif len(self._buf) - self._end < 4096 or len(self._buf) - self._start < self._head_need:
            # Compact: move the unparsed tail to the front (a small WRITE
            # waiting for the rest of its payload then fits whole).
            n = self._end - self._start
            self._buf[0:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        return self._view[self._end:self._end + max(self._ring_read, self._head_need)]

    def buffer_updated(self, nbytes: int, *, parse: bool = True) -> None:
        """``nbytes`` arrived in the memory `get_buffer` gave.  ``parse=False``
        (ring bytes only, see `batchable`): they are only recorded, for
        `peek_batch`; `parse` must follow."""
        if self._into_payload:
            self._into_payload = False
            self._payload_filled += nbytes
            assert self._payload is not None
            if self._payload_filled == len(self._payload):
                self._finish_payload()
            self._parse()
            return
        self._end += nbytes
        if parse:
            self._parse()

    def payload_received(self, nbytes: int) -> bool:
        """The fast form of `buffer_updated` for the middle of a payload:
        when ``nbytes`` arrived in the payload memory `get_buffer` gave and
        neither complete the payload nor fill what was granted of it, record
        them and return True -- exactly what `buffer_updated` would do then
        (no event, nothing to parse: the ring is empty, not blocked).  Else
        False, nothing done: call `buffer_updated`.  A large WRITE arrives
        in several receives (a Unix socket's sender holds at most its send
        buffer, ~208 KiB here, so a 256 KiB payload takes ~3); the receives
        between the first and the last take this path."""
        if (self._into_payload and self._payload_filled + nbytes < self._payload_allowed
                and self._start == self._end):
            self._into_payload = False
            self._payload_filled += nbytes
            return True
        return False

    def parse(self) -> None:
        """Turn the complete messages in the ring into events (after a batch)."""
        self._parse()

    def receive_data(self, data: bytes) -> None:
        """Feed ``data`` (any slicing) -- for tests and simple callers."""
        wire.feed_buffered(self, data, stop=lambda: self._state is State.CLOSED)

    def _avail(self) -> int:
        return self._end - self._start

    def _take(self, n: int) -> memoryview:
        mv = self._view[self._start:self._start + n]
        self._start += n
        return mv

    def _violation(self, message: str) -> None:
        self._events.append(ProtocolViolation(message))
        self._state = State.CLOSED

    def _parse(self) -> None:
        while True:
            st = self._state
            if st is State.CLIENT_FLAGS:
                if self._avail() < 4:
                    return
                self._client_flags(wire.CLIENT_FLAGS.unpack(self._take(4))[0])
            elif st is State.OPTION_HEADER:
                if self._avail() < wire.OPTION_HEADER.size:
                    return
                magic, opt, length = wire.OPTION_HEADER.unpack(self._take(wire.OPTION_HEADER.size))
                if magic != wire.IHAVEOPT:
                    self._violation(f"bad option magic {magic:#x}")
                    return
                if length > wire.MAX_OPTION_LENGTH:
                    self._violation(f"option {opt} data too long ({length} bytes)")
                    return
                self._opt, self._opt_len = opt, length
                self._state = State.OPTION_DATA
            elif st is State.OPTION_DATA:
                if self._avail() < self._opt_len:
                    if self._opt_len > len(self._buf):  # cannot happen with the limit above
                        self._violation("option too long")
                    return
                data = bytes(self._take(self._opt_len))
                self._state = State.OPTION_HEADER
                self._option(self._opt, data)
            elif st is State.TRANSMISSION:
                avail = self._end - self._start
                if avail < _REQ_SIZE or (self.one_at_a_time and self._events):
                    return
                if self.batching:
                    head = wire.REQUEST.unpack_from(self._buf, self._start)
                    length = head[5]
                    if head[2] == _CMD_WRITE and head[0] == _REQ_MAGIC and length <= BATCH_MAX:
                        if avail < _REQ_SIZE + length:
                            # Wait whole in the ring for the batch path.
                            self._head_need = _REQ_SIZE + length
                            return
                        self._ring_read = _RECV_BUF
                    elif head[2] == _CMD_WRITE:
                        self._ring_read = _RING_READ
                    else:
                        self._ring_read = _RECV_BUF
                    self._head_need = 0
                self._request(*wire.REQUEST.unpack(self._take(_REQ_SIZE)))
            elif st is State.PAYLOAD:
                # Copy what already sits in the ring, then receive directly.
                n = min(self._avail(), self._payload_allowed - self._payload_filled)
                if n:
                    assert self._payload is not None
                    self._payload[self._payload_filled:self._payload_filled + n] = self._take(n)
                    self._payload_filled += n
                if self._payload is not None and self._payload_filled == len(self._payload):
                    self._finish_payload()
                    continue
                return  # more bytes, or (paced) more memory, needed
            else:
                return

    # ------------------------------------------------------------ handshake

    def _client_flags(self, flags: int) -> None:
        known = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
        # int masks: ~ on an IntFlag only inverts within its defined members.
        if flags & ~known:
            # proto.md: a server MUST close if it sees unknown client flags.
            self._violation(f"unknown client flags {flags:#x}")
            return
        self.fixed = bool(flags & ClientFlag.C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self._state = State.OPTION_HEADER

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out += wire.pack_option_reply(opt, rep, data)

    def _error(self, opt: int, rep: Rep, message: str) -> None:
        self._reply(opt, rep, message.encode("utf-8")[: wire.MAX_STRING])

    def deny(self, reason: str, what: str = "access denied") -> None:
        """Refuse this client (access control; ``what="server busy"`` at a
        connection cap): from now on every option but ABORT gets ERR_POLICY
        with ``what: reason`` (EXPORT_NAME, which cannot be refused, closes
        the connection)."""
        self._denied = f"{what}: {reason}"

    def _option(self, opt: int, data: bytes) -> None:
        if self._denied is not None and opt != Opt.ABORT:
            if opt == Opt.EXPORT_NAME or not self.fixed:
                self._violation(self._denied)
            else:
                self._error(opt, Rep.ERR_POLICY, self._denied)
            return
        tls_missing = self.tls_mode == "require" and not self.tls_active
        if opt == Opt.EXPORT_NAME:
            if tls_missing:
                # proto.md FORCEDTLS: EXPORT_NAME cannot be refused, so close.
                self._violation("TLS is required, but the client chose an export without NBD_OPT_STARTTLS")
                return
            self._opt_export_name(data)
        elif not self.fixed:
            # Non-fixed newstyle clients may only send EXPORT_NAME (and ABORT).
            if opt == Opt.ABORT:
                self._events.append(Disconnect("client sent ABORT"))
                self._state = State.CLOSED
            else:
                self._violation(f"option {opt} from a client without fixed newstyle")
        elif opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            self._events.append(Disconnect("client sent ABORT"))
            self._state = State.CLOSED
        elif opt == Opt.STARTTLS:
            self._opt_starttls(data)
        elif tls_missing:
            self._error(opt, Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
        elif opt == Opt.LIST:
            if data:
                self._error(opt, Rep.ERR_INVALID, "LIST takes no data")
                return
            for e in self._lister():
                self._reply(opt, Rep.SERVER, wire.pack_string(e.name) + e.description.encode())
            self._reply(opt, Rep.ACK)
        elif opt in (Opt.INFO, Opt.GO):
            self._opt_info_go(opt, data)
        elif opt == Opt.STRUCTURED_REPLY:
            if data:
                self._error(opt, Rep.ERR_INVALID, "STRUCTURED_REPLY takes no data")
            elif self.structured:
                self._error(opt, Rep.ERR_INVALID, "structured replies already negotiated")
            else:
                self.structured = True
                self._reply(opt, Rep.ACK)
        elif opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._opt_meta_context(opt, data)
        else:
            self._error(opt, Rep.ERR_UNSUP, f"option {opt} is not supported")

    def _opt_starttls(self, data: bytes) -> None:
        opt = Opt.STARTTLS
        if data:
            self._error(opt, Rep.ERR_INVALID, "STARTTLS takes no data")
        elif self.tls_mode == "off":
            self._error(opt, Rep.ERR_POLICY, "TLS is not configured on this server")
        elif self.tls_active:
            self._error(opt, Rep.ERR_INVALID, "TLS is already active")
        elif self._avail():
            # The client must wait for our ACK before its TLS handshake.
            self._violation("data sent after NBD_OPT_STARTTLS before the TLS handshake")
        else:
            self._reply(opt, Rep.ACK)
            self.tls_active = True
            # Nothing negotiated in clear carries over into TLS.
            self.structured = False
            self._meta_export = None
            self._meta = []
            self._events.append(StartTLS())

    def _resolve(self, name: str) -> ExportInfo | None:
        info = self._lookup(name)
        if info is None and name == "":
            exports = self._lister()
            info = exports[0] if exports else None
        return info

    def _opt_export_name(self, data: bytes) -> None:
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            self._violation("export name is not UTF-8")
            return
        info = self._resolve(name)
        if info is None:
            # No error reply exists for EXPORT_NAME: the server must close.
            self._violation(f"EXPORT_NAME for unknown export {clip(name)}")
            return
        self._out += wire.EXPORT_NAME_REPLY.pack(info.size, self._advertised(info))
        if not self.no_zeroes:
            self._out += bytes(124)
        self._start_transmission(info)

    def _opt_info_go(self, opt: int, data: bytes) -> None:
        if len(data) < 4:
            self._error(opt, Rep.ERR_INVALID, "truncated INFO/GO request")
            return
        nlen = wire.U32.unpack_from(data, 0)[0]
        if nlen > wire.MAX_STRING or 4 + nlen + 2 > len(data):
            self._error(opt, Rep.ERR_INVALID, "bad export name length")
            return
        try:
            name = data[4:4 + nlen].decode("utf-8")
        except UnicodeDecodeError:
            self._error(opt, Rep.ERR_INVALID, "export name is not UTF-8")
            return
        pos = 4 + nlen
        nreq = wire.U16.unpack_from(data, pos)[0]
        pos += 2
        if len(data) != pos + 2 * nreq:
            self._error(opt, Rep.ERR_INVALID, "information request count does not match length")
            return
        requests = {wire.U16.unpack_from(data, pos + 2 * i)[0] for i in range(nreq)}
        info = self._resolve(name)
        if info is None:
            self._error(opt, Rep.ERR_UNKNOWN, f"unknown export {clip(name)}")
            return
        minimum, preferred, maximum = info.block_size
        block_size = wire.INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)
        if minimum > 1 and Info.BLOCK_SIZE not in requests and opt == Opt.GO:
            # proto.md: such a server SHOULD send INFO_BLOCK_SIZE first (the
            # client then knows the constraints to acknowledge).
            self._reply(opt, Rep.INFO, block_size)
            self._error(opt, Rep.ERR_BLOCK_SIZE_REQD, f"export needs {minimum}-byte aligned requests")
            return
        if Info.NAME in requests:
            self._reply(opt, Rep.INFO, wire.U16.pack(Info.NAME) + info.name.encode())
        if Info.DESCRIPTION in requests and info.description:
            self._reply(opt, Rep.INFO, wire.U16.pack(Info.DESCRIPTION) + info.description.encode())
        # Always tell clients the constraints (QEMU and nbdkit do the same).
        self._reply(opt, Rep.INFO, block_size)
        self._reply(opt, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, info.size, self._advertised(info)))
        self._reply(opt, Rep.ACK)
        if opt == Opt.GO:
            self._start_transmission(info)

    def _parse_meta_request(self, data: bytes) -> tuple[str, list[str]] | str:
        """(export name, queries) or an error message."""
        if len(data) < 8:
            return "truncated meta context request"
        nlen = wire.U32.unpack_from(data, 0)[0]
        if nlen > wire.MAX_STRING or 4 + nlen + 4 > len(data):
            return "bad export name length"
        try:
            name = data[4:4 + nlen].decode("utf-8")
        except UnicodeDecodeError:
            return "export name is not UTF-8"
        pos = 4 + nlen
        count = wire.U32.unpack_from(data, pos)[0]
        pos += 4
        queries = []
        for _ in range(count):
            if pos + 4 > len(data):
                return "truncated query list"
            qlen = wire.U32.unpack_from(data, pos)[0]
            pos += 4
            if qlen > wire.MAX_STRING or pos + qlen > len(data):
                return "bad query length"
            try:
                queries.append(data[pos:pos + qlen].decode("utf-8"))
            except UnicodeDecodeError:
                return "query is not UTF-8"
            pos += qlen
        if pos != len(data):
            return "trailing bytes after the query list"
        return name, queries

    def _opt_meta_context(self, opt: int, data: bytes) -> None:
        listing = opt == Opt.LIST_META_CONTEXT
        if not listing:
            # proto.md: SET_META_CONTEXT replaces every context selected
            # before "including when this command fails".
            self._meta_export = None
            self._meta = []
        if not self.structured:
            self._error(opt, Rep.ERR_INVALID, "negotiate STRUCTURED_REPLY first")
            return
        parsed = self._parse_meta_request(data)
        if isinstance(parsed, str):
            self._error(opt, Rep.ERR_INVALID, parsed)
            return
        name, queries = parsed
        info = self._resolve(name)
        if info is None:
            self._error(opt, Rep.ERR_UNKNOWN, f"unknown export {clip(name)}")
            return
        available = list(info.meta_contexts)
        if listing and not queries:
            selected = available
        else:
            selected = []
            for q in queries:
                for c in _match_contexts(q, available, listing=listing):
                    if c not in selected:
                        selected.append(c)
        if not listing:
            self._meta_export = name
            self._meta = selected
        for i, ctx in enumerate(selected):
            cid = i if not listing else 0
            self._reply(opt, Rep.META_CONTEXT, wire.META_CONTEXT_ID.pack(cid) + ctx.encode())
        self._reply(opt, Rep.ACK)

    def _advertised(self, info: ExportInfo) -> int:
        """The transmission flags sent for ``info`` on this connection.

        proto.md "Transmission flags": the server MUST leave SEND_DF clear if
        structured replies have not been negotiated.
        """
        flags = int(info.flags)
        return flags if self.structured else flags & ~_SEND_DF

    def _start_transmission(self, info: ExportInfo) -> None:
        self.export = info
        self.tflags = self._advertised(info)
        if self._meta_export is not None and self._resolve(self._meta_export) == info:
            self.contexts = dict(enumerate(self._meta))
        else:
            self.contexts = {}
        self._state = State.TRANSMISSION
        tf = self.tflags
        rflags = (_FUA if tf & (_SEND_FUA | _READ_ONLY) else 0) | (_DF if tf & _SEND_DF else 0)
        wflags = -1 if tf & _READ_ONLY else (_FUA if tf & _SEND_FUA else 0)
        zflags = (-1 if wflags < 0 or not tf & _TF.SEND_WRITE_ZEROES
                  else wflags | _NO_HOLE | (_FAST_ZERO if tf & _SEND_FAST_ZERO else 0))
        trflags = -1 if wflags < 0 or not tf & _TF.SEND_TRIM else wflags
        self._fast = (info.size, max(1, info.block_size[0]), rflags, wflags, zflags, trflags)
        self._events.append(HandshakeDone(info, self.structured, dict(self.contexts)))

    # --------------------------------------------------------- transmission

    def _request(self, magic: int, flags: int, cmd: int, cookie: int, offset: int, length: int) -> None:
        if magic != wire.REQUEST_MAGIC:
            self._violation(f"bad request magic {magic:#x}")
            return
        req = Request(cookie, cmd, flags, offset, length)
        if cmd == Cmd.WRITE:
            if length > self.max_payload:
                # We cannot skip an oversize payload safely: end the connection.
                self._violation(f"WRITE payload of {length} bytes exceeds {self.max_payload}")
                return
            self._pending = req
            self._payload_filled = 0
            self._state = State.PAYLOAD
            if length == 0 or not self.paced:
                self._payload = bytearray(length)
                self._payload_allowed = length
            else:
                self._payload = None
                self._payload_allowed = 0
            if length == 0:
                self._finish_payload()
            return
        if cmd == Cmd.DISC:
            self._events.append(Disconnect("client sent DISC"))
            self._state = State.CLOSED
            return
        self._validate(req)
        self._events.append(req)

    def _finish_payload(self) -> None:
        req = self._pending
        assert req is not None and self._payload is not None
        req.payload = self._payload
        self._pending = None
        self._payload = None
        self._payload_allowed = self._payload_filled = 0
        self._state = State.TRANSMISSION
        self._validate(req)
        self._events.append(req)

    def _validate(self, req: Request) -> None:
        """Set ``req.error`` per proto.md's request rules (nbdkit's validate_request)."""
        info = self.export
        assert info is not None
        tflags = self.tflags
        cmd = req.cmd

        def fail(err: int, msg: str) -> None:
            req.error, req.message = err, msg

        allowed = _ALLOWED_FLAGS_INT.get(cmd)
        if allowed is None:
            return fail(errno.EINVAL, f"unknown or unsupported command {cmd}")
        c = cmd
        flags = req.flags
        if flags & ~allowed:
            return fail(errno.EINVAL, f"flags {flags:#x} not allowed on command {cmd}")
        # A read-only export writes nothing, so FUA means nothing there and is
        # ignored like on READ, advertised or not (existing clients set it).
        if flags & _FUA and not tflags & (_SEND_FUA | _READ_ONLY):
            return fail(errno.EINVAL, "FUA was not advertised")
        if flags & _DF and not tflags & _SEND_DF:
            return fail(errno.EINVAL, "DF was not advertised (it needs structured replies)")
        if flags & _FAST_ZERO and not tflags & _SEND_FAST_ZERO:
            return fail(errno.EINVAL, "FAST_ZERO was not advertised")
        ro = bool(tflags & _TF.READ_ONLY)
        size = info.size
        end = req.offset + req.length
        writes = c in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM)
        if c == Cmd.FLUSH:
            if not tflags & _TF.SEND_FLUSH:
                return fail(errno.EINVAL, "FLUSH was not advertised")
            return
        if writes and ro:
            return fail(errno.EPERM, "export is read-only")
        if c == Cmd.TRIM and not tflags & _TF.SEND_TRIM:
            return fail(errno.EINVAL, "TRIM was not advertised")
        if c == Cmd.WRITE_ZEROES and not tflags & _TF.SEND_WRITE_ZEROES:
            return fail(errno.EINVAL, "WRITE_ZEROES was not advertised")
        if c == Cmd.CACHE and not tflags & _TF.SEND_CACHE:
            return fail(errno.EINVAL, "CACHE was not advertised")
        if c == Cmd.BLOCK_STATUS:
            if not self.structured or not self.contexts:
                return fail(errno.EINVAL, "BLOCK_STATUS needs a negotiated meta context")
            if req.length == 0:
                return fail(errno.EINVAL, "BLOCK_STATUS of zero length")
        if c == Cmd.READ and req.length > self.max_payload:
            return fail(errno.EINVAL, f"READ of {req.length} bytes exceeds {self.max_payload}")
        if end > size:
            if c in (Cmd.WRITE, Cmd.WRITE_ZEROES):
                return fail(errno.ENOSPC, f"request ends at {end}, past the export size {size}")
            return fail(errno.EINVAL, f"request ends at {end}, past the export size {size}")
        minimum = info.block_size[0]
        if minimum > 1 and c in (Cmd.READ, Cmd.WRITE) and (req.offset % minimum or req.length % minimum):
            return fail(errno.EINVAL, f"request not aligned to {minimum} bytes")

    # ------------------------------------------------------------- batches

    @property
    def batchable(self) -> bool:
        """Bytes received now go to the ring and may be taken by `peek_batch`
        (transmission, no payload being received, no event waiting: a batch
        never overtakes a request parsed before it)."""
        return self._state is State.TRANSMISSION and not self._events

    @property
    def ring(self) -> memoryview:
        """The receive ring; `peek_batch` gives WRITE payload positions in it.
        Valid until the next `get_buffer` (which may move the unparsed tail)."""
        return self._view

    def peek_batch(self, read_max: int, write_max: int, reply_max: int) -> tuple[list[tuple], int, int]:
        """The requests at the front of the ring that a batch may run, without
        consuming them: ``(items, reply_bytes, read_bytes)``.

        Taken, in order, while each is a complete READ of at most
        ``read_max`` bytes, WRITE of at most ``write_max`` (payload whole
        in the ring), WRITE_ZEROES or TRIM (any length: no payload) that
        `_validate` would pass: non-zero length, within the export, aligned
        to its minimum block size, flags allowed by what was negotiated.  The first request that is anything else ends the
        batch (the ordinary path answers it, errors included), as does
        reaching ``reply_max`` bytes of replies.

        Each item is ``(cmd, fua, cookie, offset, length, payload_pos,
        next_pos, header)`` (``fua``: the request's FUA flag bit, the only
        flag a taken READ, WRITE or TRIM may carry that matters to running
        it -- DF changes nothing on a READ that is sent whole; for a
        WRITE_ZEROES all its flags: FUA, NO_HOLE, FAST_ZERO);
        ``payload_pos`` is where a WRITE's payload starts in
        `ring`; ``next_pos`` where the next request starts (`commit_batch`
        takes it); ``header`` the encoded reply for a WRITE, WRITE_ZEROES
        or TRIM done (``payload_pos`` 0 for the last two), or the
        reply header to send before a READ's ``length`` data bytes (simple or
        structured as negotiated).  ``reply_bytes`` is the total length of
        the replies, data included; ``read_bytes`` that of the READ data.
        """
        items: list[tuple] = []
        if self._state is not State.TRANSMISSION or self._events:
            return items, 0, 0
        size, align, rflags, wflags, zflags, trflags = self._fast
        read_max = min(read_max, self.max_payload, BATCH_MAX)
        write_max = min(write_max, self.max_payload, BATCH_MAX)
        buf = self._buf
        pos, end = self._start, self._end
        unpack = wire.REQUEST.unpack_from
        append = items.append
        structured = self.structured
        if structured:
            pack, pack_off = wire.STRUCTURED_REPLY.pack, wire.OFFSET.pack
            smagic = wire.STRUCTURED_REPLY_MAGIC
            done, t_none, t_data = int(ReplyFlag.DONE), int(ReplyType.NONE), int(ReplyType.OFFSET_DATA)
            ok_len, rd_len = wire.STRUCTURED_REPLY_SIZE, wire.STRUCTURED_REPLY_SIZE + 8
        else:
            pack = wire.SIMPLE_REPLY.pack
            smagic = wire.SIMPLE_REPLY_MAGIC
            ok_len = rd_len = wire.SIMPLE_REPLY_SIZE
        out = rbytes = 0
        while end - pos >= _REQ_SIZE and out < reply_max:
            magic, flags, cmd, cookie, offset, length = unpack(buf, pos)
            if (magic != _REQ_MAGIC or not length or offset + length > size
                    or (align > 1 and (offset % align or length % align))):
                break
            if cmd == _CMD_WRITE:
                nxt = pos + _REQ_SIZE + length
                if wflags < 0 or flags & ~wflags or length > write_max or nxt > end:
                    break
                hdr = pack(smagic, done, t_none, cookie, 0) if structured else pack(smagic, 0, cookie)
                append((_CMD_WRITE, flags & _FUA, cookie, offset, length, pos + _REQ_SIZE, nxt, hdr))
                out += ok_len
            elif cmd == _CMD_READ:
                if flags & ~rflags or length > read_max:
                    break
                if structured:
                    hdr = pack(smagic, done, t_data, cookie, 8 + length) + pack_off(offset)
                else:
                    hdr = pack(smagic, 0, cookie)
                nxt = pos + _REQ_SIZE
                append((_CMD_READ, flags & _FUA, cookie, offset, length, 0, nxt, hdr))
                out += rd_len + length
                rbytes += length
            elif cmd == _CMD_WRITE_ZEROES or cmd == _CMD_TRIM:
                allowed = zflags if cmd == _CMD_WRITE_ZEROES else trflags
                if allowed < 0 or flags & ~allowed:
                    break
                hdr = pack(smagic, done, t_none, cookie, 0) if structured else pack(smagic, 0, cookie)
                nxt = pos + _REQ_SIZE
                append((cmd, flags if cmd == _CMD_WRITE_ZEROES else flags & _FUA,
                        cookie, offset, length, 0, nxt, hdr))
                out += ok_len
            else:
                break
            pos = nxt
        return items, out, rbytes

    def commit_batch(self, next_pos: int) -> None:
        """The requests of a `peek_batch` up to ``next_pos`` (an item's
        ``next_pos``) were run and answered: consume them."""
        assert self._start <= next_pos <= self._end and self._state is State.TRANSMISSION
        if next_pos != self._start:
            self._start = next_pos
            self._head_need = 0
            self._ring_read = _RECV_BUF

    # ------------------------------------------------------- paced payloads

    @property
    def payload_length(self) -> int:
        """Declared length of the WRITE payload being received (0 when none)."""
        return self._pending.length if self._state is State.PAYLOAD and self._pending else 0

    @property
    def payload_need(self) -> int:
        """Bytes of the current payload not granted yet (0 when none)."""
        if self._state is not State.PAYLOAD or self._pending is None:
            return 0
        return self._pending.length - self._payload_allowed

    @property
    def payload_blocked(self) -> bool:
        """A paced payload can take no more bytes until `allow_payload`:
        every granted byte has arrived and (first grant) payload bytes are
        waiting in the ring, or (later grants) always."""
        if self._state is not State.PAYLOAD or self._payload_filled < self._payload_allowed:
            return False
        if self.payload_need == 0:
            return False
        return self._payload is not None or self._avail() > 0

    def allow_payload(self, n: int, buffer=None) -> None:
        """Grant ``n`` more bytes of the current payload; the first grant
        brings ``buffer`` (len == the declared length; its untouched part
        should cost nothing, e.g. an anonymous mmap).  Parses what the grant
        unblocks."""
        assert self._state is State.PAYLOAD and self._pending is not None and 0 < n <= self.payload_need
        if self._payload is None:
            assert buffer is not None and len(buffer) == self._pending.length
            self._payload = buffer
        self._payload_allowed += n
        self._parse()

    # --------------------------------------------------------------- replies

    def reply_ok(self, cookie: int) -> bytes:
        if self.structured:
            return wire.pack_structured_header(cookie, ReplyType.NONE, 0, ReplyFlag.DONE)
        return wire.pack_simple_reply(cookie, 0)

    def reply_error(self, cookie: int, err: int, message: str = "") -> bytes:
        nbd_err = wire.errno_to_nbd(err)
        if self.structured:
            return wire.pack_structured_error(cookie, nbd_err, message)
        return wire.pack_simple_reply(cookie, nbd_err)

    def read_header(self, cookie: int, offset: int, length: int, *, done: bool = True) -> bytes:
        """Header before ``length`` bytes of READ data at ``offset``."""
        if self.structured:
            return wire.pack_structured_header(
                cookie, ReplyType.OFFSET_DATA, 8 + length, ReplyFlag.DONE if done else 0
            ) + wire.OFFSET.pack(offset)
        return wire.pack_simple_reply(cookie, 0)

    def read_hole(self, cookie: int, offset: int, length: int, *, done: bool = False) -> bytes:
        assert self.structured
        return wire.pack_structured_header(
            cookie, ReplyType.OFFSET_HOLE, 12, ReplyFlag.DONE if done else 0
        ) + wire.OFFSET_HOLE.pack(offset, length)

    def reply_block_status(self, cookie: int, chunks: list[tuple[int, list[tuple[int, int]]]]) -> bytes:
        """One BLOCK_STATUS chunk per (context id, [(length, flags), ...]); DONE on the last.

        At most `MAX_EXTENTS` descriptors go into a chunk, the first ones
        (proto.md: a server SHOULD NOT send more than 2^20, and MAY answer a
        shorter range; more than 4 M would exceed the 32 MiB maximum payload,
        a MUST NOT).  The client asks again for the rest."""
        assert self.structured and chunks
        out = bytearray()
        for i, (cid, descs) in enumerate(chunks):
            body = bytearray(wire.BLOCK_STATUS_ID.pack(cid))
            for length, flags in descs[:MAX_EXTENTS]:
                body += wire.BLOCK_DESCRIPTOR.pack(length, flags)
            last = i == len(chunks) - 1
            out += wire.pack_structured_header(
                cookie, ReplyType.BLOCK_STATUS, len(body), ReplyFlag.DONE if last else 0
            )
            out += body
        return bytes(out)


def transmission_flags(
    *,
    read_only: bool,
    can_flush: bool,
    can_fua: bool,
    can_trim: bool,
    can_zero: bool,
    can_fast_zero: bool,
    can_cache: bool,
    can_multi_conn: bool,
    rotational: bool = False,
) -> TransmissionFlag:
    """Turn capabilities into transmission flags (the one place this happens)."""
    f = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_DF
    if read_only:
        f |= TransmissionFlag.READ_ONLY
    if can_flush and not read_only:
        f |= TransmissionFlag.SEND_FLUSH
    if can_fua and not read_only:
        f |= TransmissionFlag.SEND_FUA
    if can_trim and not read_only:
        f |= TransmissionFlag.SEND_TRIM
    if not read_only:
        # WRITE_ZEROES is always possible: a device without a cheap primitive
        # writes zero buffers.
        f |= TransmissionFlag.SEND_WRITE_ZEROES
        if can_fast_zero:
            f |= TransmissionFlag.SEND_FAST_ZERO
    if can_cache:
        f |= TransmissionFlag.SEND_CACHE
    if can_multi_conn:
        f |= TransmissionFlag.CAN_MULTI_CONN
    if rotational:
        f |= TransmissionFlag.ROTATIONAL
    return f
