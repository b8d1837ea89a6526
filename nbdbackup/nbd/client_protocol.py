"""Sans-IO NBD client: the handshake and the reply parser (bytes in, events out).

Role: everything the client side must know about the NBD protocol
(NetworkBlockDevice/nbd doc/proto.md) without doing any I/O, in the manner
of h11.  `nbd.client` only moves bytes between a socket and these objects and
matches cookies to futures; unit tests drive them with byte slices.

Two objects:

`Handshake` -- the fixed-newstyle negotiation as a chain of named steps
(``_greeting``, ``_structured_reply``, ``_set_meta_context``, ``_go``, the
``_export_name`` fallback, ``_list``...).  The steps are written as one
generator that yields the number of bytes it needs next and receives exactly
that many; `Handshake.receive_data` feeds it, `Handshake.data_to_send`
collects what it wrote.  When it is finished ``done`` is true and ``result``
holds a `HandshakeResult`.  What to negotiate is a `HandshakePlan`.
With ``plan.tls`` the first option is NBD_OPT_STARTTLS; on its ACK the
handshake stops with ``tls_wanted`` set: the caller runs the TLS handshake
on its transport, then calls `Handshake.tls_started` and feeds decrypted
bytes from then on.  A refusal ends the handshake (no silent downgrade,
proto.md: a client that requires TLS SHOULD terminate).  Any refusal that
ends a handshake queues NBD_OPT_ABORT: the client's only allowed way to end
option haggling is a soft disconnect.

`Transmission` -- the transmission phase.  `request` allocates a cookie and
returns the 28-byte request header; replies are parsed from bytes given to
`receive_data`, or, for zero-copy, through the `get_buffer` /
`buffer_updated` pair shaped after `asyncio.BufferedProtocol`: while the
payload of a READ reply (a simple reply's data or an OFFSET_DATA chunk) is
arriving, `get_buffer` hands out the caller's own buffer at the right
offset, so the kernel copies the data straight into place.  Headers and
small payloads go through an internal buffer and are copied.  Each finished
reply becomes one `Reply` event in ``events``.

Invariants:
- A `RemoteProtocolError` from either object means the peer broke the
  protocol; the object is then unusable (``broken``) and the caller must
  close the connection.  Request failures the server reports (simple reply
  error, structured ERROR/ERROR_OFFSET chunks) are not protocol errors: they
  finish the request with a POSIX errno (`wire.nbd_to_errno`) and the
  connection goes on.
- A structured READ reply is accepted only if its content chunks stay
  inside the request, never overlap an earlier content chunk of the same
  reply, and, on success, their lengths add up to the request length: so a
  successful READ has written every byte of the caller's buffer exactly once
  (proto.md: chunks MUST NOT overlap; a client MAY hard-disconnect).  Without
  the overlap check a reply whose overlapping chunks add up to the length
  left a gap holding whatever the buffer held before -- in a pull, the
  previous chunk's bytes, stored as this one's (hunt 8).  The covered ranges
  are kept only per multi-chunk reply (`_Pending.covered`), as a sorted flat
  list of boundaries.
- An abandoned request (`Transmission.abandon`: its caller was cancelled or
  timed out) never writes into the caller's buffer again; its reply is still
  parsed, then dropped.
"""

from __future__ import annotations

import bisect
import enum
import errno
import os
from dataclasses import dataclass, field
from typing import Generator, Iterable, Sequence

from ..errors import ConnectionClosed, LocalProtocolError, OptionError, RemoteProtocolError
from . import wire
from .wire import (
    ClientFlag,
    Cmd,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)

#: Largest option reply payload we accept (a REP_SERVER holds two strings of
#: at most 4096 bytes; nothing legitimate comes near this).
MAX_OPTION_REPLY = wire.MAX_OPTION_LENGTH
#: Largest non-data structured chunk payload we accept (a BLOCK_STATUS chunk
#: for a huge, fragmented range).
MAX_CHUNK_PAYLOAD = wire.MAX_PAYLOAD
#: Most REP_META_CONTEXT replies we take for one option: a server listing
#: contexts without end (distinct 4000-byte names) grew a pull's memory to 9 GB
#: before the 30 s connect timeout (hunt 8).  Each name is at most
#: `wire.MAX_STRING` bytes (proto.md: strings MUST be no longer than 4096), so
#: a listing holds at most ~64 MiB; qemu and nbdkit list a few.
MAX_META_CONTEXTS = 16384
#: Most REP_SERVER replies we take for OPT_LIST (the same reason; each names
#: one export we then ask OPT_INFO about).
MAX_EXPORTS = 16384
#: Default maximum request size when the server gives no block sizes
#: (proto.md "Block size constraints": clients SHOULD NOT exceed 32 MiB).
DEFAULT_MAX_BLOCK = 32 * 1024 * 1024
#: Largest length field of a request (u32).
MAX_LENGTH = 0xFFFFFFFF


# --------------------------------------------------------------------------
# Handshake
# --------------------------------------------------------------------------


class Mode(enum.Enum):
    """What a handshake is for."""

    GO = "go"  # enter transmission on one export
    LIST = "list"  # OPT_LIST + OPT_INFO per export, then OPT_ABORT
    META = "meta"  # OPT_LIST_META_CONTEXT, then OPT_ABORT


@dataclass(frozen=True, slots=True)
class HandshakePlan:
    """What to negotiate.

    Fields: ``mode``; ``export`` (name, for GO and META); ``meta_contexts``:
    names to select, where a name ending in ':' is a query expanded with
    OPT_LIST_META_CONTEXT first (e.g. ``qemu:dirty-bitmap:``); in META mode,
    the queries to list (empty = everything the server lists by default);
    ``structured``: ask for structured replies; ``block_size``: request
    INFO_BLOCK_SIZE (we always honour the constraints, so we always may).
    """

    mode: Mode = Mode.GO
    export: str = ""
    meta_contexts: Sequence[str] = ()
    structured: bool = True
    block_size: bool = True
    #: GO mode: first list these queries (empty = the server's default list)
    #: into ``listed_meta_contexts`` on the same connection (for ``info``,
    #: which must not need a second connection: qemu-nbd without --persistent
    #: serves only one).  None = do not list.
    list_first: Sequence[str] | None = None
    #: Upgrade to TLS (NBD_OPT_STARTTLS) before any other option.
    tls: bool = False


@dataclass(frozen=True, slots=True)
class BlockSizes:
    """Server block size constraints (INFO_BLOCK_SIZE), or defaults."""

    minimum: int = 1
    preferred: int = 4096
    maximum: int = DEFAULT_MAX_BLOCK
    #: True when the server sent INFO_BLOCK_SIZE.
    advertised: bool = False


@dataclass(slots=True)
class ExportInfo:
    """What the server said about one export.

    ``size`` and ``flags`` come from INFO_EXPORT (or the EXPORT_NAME reply);
    ``None`` until seen.
    """

    name: str
    description: str = ""
    size: int | None = None
    flags: TransmissionFlag | None = None
    block_sizes: BlockSizes = field(default_factory=BlockSizes)


@dataclass(slots=True)
class HandshakeResult:
    """Outcome of a handshake.

    GO: ``export`` is filled, ``structured`` says whether structured replies
    are on, ``meta_contexts`` maps each agreed context name to its id.
    LIST: ``exports``.  META: ``listed_meta_contexts``.
    ``server_flags`` / ``fallback`` (OPT_EXPORT_NAME was used) are for
    diagnostics.
    """

    server_flags: HandshakeFlag = HandshakeFlag(0)
    no_zeroes: bool = False
    structured: bool = False
    export: ExportInfo | None = None
    meta_contexts: dict[str, int] = field(default_factory=dict)
    exports: list[ExportInfo] = field(default_factory=list)
    listed_meta_contexts: list[str] = field(default_factory=list)
    fallback: bool = False
    tls: bool = False


@dataclass(frozen=True, slots=True)
class _OptReply:
    option: int
    rep: int
    data: bytes


_Steps = Generator[int, bytes, None]


def _pack_str32(s: str) -> bytes:
    b = s.encode("utf-8")
    if len(b) > wire.MAX_STRING:
        raise LocalProtocolError(f"string longer than {wire.MAX_STRING} bytes: {s[:40]!r}...")
    return wire.U32.pack(len(b)) + b


def _decode(b: bytes, what: str) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError(f"{what} is not valid UTF-8") from None


def parse_block_size(data: bytes) -> BlockSizes:
    """Validate an INFO_BLOCK_SIZE payload (proto.md "Block size constraints")."""
    if len(data) != wire.INFO_BLOCK_SIZE.size:
        raise RemoteProtocolError(f"INFO_BLOCK_SIZE of {len(data)} bytes")
    _, mn, pref, mx = wire.INFO_BLOCK_SIZE.unpack(data)
    if mn < 1 or mn & (mn - 1) or mn > 64 * 1024:
        raise RemoteProtocolError(f"minimum block size {mn} is not a power of 2 in 1..64K")
    if pref < 1 or pref & (pref - 1):
        raise RemoteProtocolError(f"preferred block size {pref} is not a power of 2")
    if mx < mn:
        raise RemoteProtocolError(f"maximum block size {mx} is below the minimum {mn}")
    # Tolerated deviations: preferred below minimum or above maximum.  A
    # maximum that is not a multiple of the minimum is allowed (proto.md
    # asks only that it be at least the preferred size): `client.Client`
    # rounds it down.
    pref = max(pref, mn)
    return BlockSizes(mn, pref, mx, True)


#: `Handshake._need` while the transport is being upgraded to TLS.
_TLS_UPGRADE = -1


class Handshake:
    """Client side of the fixed newstyle handshake (sans-IO).

    Fields: ``plan``; ``result`` (filled in as the steps run); ``done``;
    ``broken`` (a RemoteProtocolError was raised); ``tls_wanted`` (the
    server ACKed STARTTLS: upgrade the transport, then `tls_started`);
    ``_out`` (bytes to send); ``_in`` (received, not yet consumed); ``_need``
    (bytes the generator waits for, or ``_TLS_UPGRADE``); ``_gen`` (the steps);
    ``_fixed`` (the server is fixed-newstyle: options, so NBD_OPT_ABORT, may
    be sent).

    A refusal that ends the handshake (`OptionError`) queues NBD_OPT_ABORT
    in ``_out`` (a soft disconnect, proto.md): the caller sends it, then
    closes the connection gracefully.
    """

    def __init__(self, plan: HandshakePlan) -> None:
        self.plan = plan
        self.result = HandshakeResult()
        self.done = False
        self.broken = False
        self.tls_wanted = False
        self._out = bytearray()
        self._in = bytearray()
        self._fixed = False
        self._gen: _Steps = self._steps()
        self._need = next(self._gen)

    # -- driving ----------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the server; ``b""`` means the server closed."""
        if self.broken:
            raise RemoteProtocolError("handshake already failed")
        if not data:
            if not self.done:
                self.broken = True
                raise ConnectionClosed("server closed the connection during the handshake")
            return
        if self.done:
            if self.plan.mode is not Mode.GO:
                return  # the reply to our OPT_ABORT: not needed
            self.broken = True
            raise RemoteProtocolError("unexpected data from server after the handshake")
        self._in += data
        self._run()

    def tls_started(self) -> None:
        """The transport now runs TLS: go on with the handshake."""
        assert self.tls_wanted and self._need == _TLS_UPGRADE
        self.tls_wanted = False
        self._step(b"")
        self._run()

    def _step(self, chunk: bytes) -> None:
        try:
            self._need = self._gen.send(chunk)
        except StopIteration:
            self.done = True
        except OptionError:
            self.broken = True
            if self._fixed:
                # proto.md "Termination of the session during option
                # haggling": a client that ends the session MUST use a soft
                # disconnect (NBD_OPT_ABORT, then close), and MUST on
                # ERR_SHUTDOWN; only a peer's breach of a MUST (the
                # RemoteProtocolError case) or a failed TLS handshake allows
                # a hard one.  Not waiting for the ACK is allowed.
                self._send_option(Opt.ABORT)
            raise
        except RemoteProtocolError:
            self.broken = True
            raise
        if self._need == _TLS_UPGRADE:
            self.tls_wanted = True

    def _run(self) -> None:
        while not self.done and self._need != _TLS_UPGRADE and len(self._in) >= self._need:
            chunk = bytes(self._in[: self._need])
            del self._in[: self._need]
            self._step(chunk)
        if self._need == _TLS_UPGRADE and self._in:
            self.broken = True
            raise RemoteProtocolError("server sent data after the STARTTLS ACK, before the TLS handshake")
        if self.done and self._in and self.plan.mode is Mode.GO:
            self.broken = True
            raise RemoteProtocolError("unexpected data from server after the handshake")

    # -- steps --------------------------------------------------------------

    def _steps(self) -> _Steps:
        fixed = yield from self._greeting()
        plan = self.plan
        if plan.tls:
            if not fixed:
                raise OptionError(Opt.STARTTLS, Rep.ERR_UNSUP, "the server is not fixed-newstyle, so it has no TLS")
            yield from self._starttls()
        if plan.mode is Mode.GO:
            if not fixed:
                yield from self._export_name()
                return
            if plan.structured:
                yield from self._structured_reply()
            if self.result.structured and plan.list_first is not None:
                self.result.listed_meta_contexts = yield from self._list_meta_context(plan.list_first)
            if self.result.structured and plan.meta_contexts:
                yield from self._set_meta_context()
            yield from self._go()
        elif plan.mode is Mode.LIST:
            if not fixed:
                raise OptionError(Opt.LIST, Rep.ERR_UNSUP, "server is not fixed-newstyle")
            yield from self._list()
            self._abort()
        else:
            if not fixed:
                raise OptionError(Opt.LIST_META_CONTEXT, Rep.ERR_UNSUP, "server is not fixed-newstyle")
            yield from self._structured_reply()
            if not self.result.structured:
                raise OptionError(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, "no structured replies: no meta contexts")
            names = yield from self._list_meta_context(plan.meta_contexts)
            self.result.listed_meta_contexts = names
            self._abort()

    def _greeting(self) -> Generator[int, bytes, bool]:
        data = yield wire.SERVER_GREETING.size
        magic, magic2, flags = wire.SERVER_GREETING.unpack(data)
        if magic != wire.NBDMAGIC:
            raise RemoteProtocolError(f"bad server magic {magic:#x}: not an NBD server")
        if magic2 == wire.OLDSTYLE_MAGIC >> 16:
            # (only the top 48 bits of the oldstyle magic fit here; the
            # layout differs, so report clearly rather than misparse)
            raise RemoteProtocolError("oldstyle NBD servers are not supported")
        if magic2 != wire.IHAVEOPT:
            raise RemoteProtocolError(f"bad handshake magic {magic2:#x} (oldstyle servers are not supported)")
        hflags = HandshakeFlag(flags & 0x3)
        self.result.server_flags = hflags
        cflags = ClientFlag(0)
        fixed = self._fixed = bool(hflags & HandshakeFlag.FIXED_NEWSTYLE)
        if fixed:
            cflags |= ClientFlag.C_FIXED_NEWSTYLE
        if fixed and hflags & HandshakeFlag.NO_ZEROES:
            cflags |= ClientFlag.C_NO_ZEROES
            self.result.no_zeroes = True
        self._out += wire.CLIENT_FLAGS.pack(cflags)
        return fixed

    def _starttls(self) -> Generator[int, bytes, None]:
        self._send_option(Opt.STARTTLS)
        r = yield from self._reply(Opt.STARTTLS)
        if r.rep != Rep.ACK:
            if wire.rep_is_error(r.rep):
                e = self._error(r)
                raise OptionError(Opt.STARTTLS, r.rep, f"the server refused TLS: {e.message or 'no reason given'}")
            raise RemoteProtocolError(f"unexpected reply {r.rep:#x} to OPT_STARTTLS")
        yield _TLS_UPGRADE
        self.result.tls = True

    def _send_option(self, opt: Opt, data: bytes = b"") -> None:
        self._out += wire.pack_option(opt, data)

    def _reply(self, opt: Opt) -> Generator[int, bytes, _OptReply]:
        hdr = yield wire.OPTION_REPLY.size
        magic, ropt, rep, length = wire.OPTION_REPLY.unpack(hdr)
        if magic != wire.OPTION_REPLY_MAGIC:
            raise RemoteProtocolError(f"bad option reply magic {magic:#x}")
        if ropt != opt:
            raise RemoteProtocolError(f"reply for option {ropt} while waiting for option {int(opt)}")
        if length > MAX_OPTION_REPLY:
            raise RemoteProtocolError(f"option reply of {length} bytes is too long")
        data = (yield length) if length else b""
        if rep == Rep.ACK and length:
            raise RemoteProtocolError(f"ACK for option {int(opt)} with a {length}-byte payload")
        return _OptReply(ropt, rep, data)

    def _error(self, r: _OptReply) -> OptionError:
        msg = r.data.decode("utf-8", "replace")
        return OptionError(r.option, r.rep, msg)

    def _structured_reply(self) -> Generator[int, bytes, None]:
        self._send_option(Opt.STRUCTURED_REPLY)
        r = yield from self._reply(Opt.STRUCTURED_REPLY)
        if r.rep == Rep.ACK:
            self.result.structured = True
        elif not wire.rep_is_error(r.rep):
            raise RemoteProtocolError(f"unexpected reply {r.rep:#x} to OPT_STRUCTURED_REPLY")

    def _meta_payload(self, queries: Iterable[str]) -> bytes:
        qs = list(queries)
        return _pack_str32(self.plan.export) + wire.U32.pack(len(qs)) + b"".join(_pack_str32(q) for q in qs)

    def _meta_replies(self, opt: Opt) -> Generator[int, bytes, list[tuple[int, str]] | None]:
        """Collect REP_META_CONTEXT replies until ACK; None if refused."""
        got: list[tuple[int, str]] = []
        while True:
            r = yield from self._reply(opt)
            if r.rep == Rep.ACK:
                return got
            if r.rep == Rep.META_CONTEXT:
                if len(r.data) < 5:
                    raise RemoteProtocolError("short REP_META_CONTEXT")
                if len(r.data) - 4 > wire.MAX_STRING:
                    raise RemoteProtocolError(f"meta context name of {len(r.data) - 4} bytes (at most "
                                              f"{wire.MAX_STRING})")
                if len(got) == MAX_META_CONTEXTS:
                    raise RemoteProtocolError(f"more than {MAX_META_CONTEXTS} meta contexts in one reply")
                (cid,) = wire.META_CONTEXT_ID.unpack_from(r.data)
                got.append((cid, _decode(r.data[4:], "meta context name")))
            elif wire.rep_is_error(r.rep):
                # proto.md: an error may follow META_CONTEXT replies; the
                # client MUST then disregard them (a failed SET selects none).
                return None
            else:
                raise RemoteProtocolError(f"unexpected reply {r.rep:#x} to meta context option")

    def _list_meta_context(self, queries: Sequence[str]) -> Generator[int, bytes, list[str]]:
        self._send_option(Opt.LIST_META_CONTEXT, self._meta_payload(queries))
        got = yield from self._meta_replies(Opt.LIST_META_CONTEXT)
        return [name for _, name in got or []]

    def _set_meta_context(self) -> Generator[int, bytes, None]:
        wanted = [q for q in self.plan.meta_contexts if not q.endswith(":")]
        queries = [q for q in self.plan.meta_contexts if q.endswith(":")]
        if queries:
            listed = yield from self._list_meta_context(queries)
            known = set(wanted)
            for n in listed:  # (a set: up to MAX_META_CONTEXTS names)
                if n not in known:
                    known.add(n)
                    wanted.append(n)
        if not wanted:
            return
        self._send_option(Opt.SET_META_CONTEXT, self._meta_payload(wanted))
        got = yield from self._meta_replies(Opt.SET_META_CONTEXT)
        ids: dict[str, int] = {}
        for cid, name in got or []:
            if name not in wanted:
                raise RemoteProtocolError(f"server selected meta context {name!r} we did not ask for")
            if cid in ids.values():
                raise RemoteProtocolError(f"meta context id {cid} given twice")
            ids[name] = cid
        self.result.meta_contexts = ids

    def _info_payload(self, name: str, infos: Sequence[Info]) -> bytes:
        return _pack_str32(name) + wire.U16.pack(len(infos)) + b"".join(wire.U16.pack(i) for i in infos)

    def _info_replies(self, opt: Opt, info: ExportInfo) -> Generator[int, bytes, _OptReply | None]:
        """Collect REP_INFO into ``info`` until ACK (None) or an error (returned)."""
        while True:
            r = yield from self._reply(opt)
            if r.rep == Rep.ACK:
                if info.size is None:
                    raise RemoteProtocolError("ACK to OPT_GO/OPT_INFO without INFO_EXPORT")
                return None
            if wire.rep_is_error(r.rep):
                return r
            if r.rep != Rep.INFO:
                raise RemoteProtocolError(f"unexpected reply {r.rep:#x} to OPT_GO/OPT_INFO")
            if len(r.data) < 2:
                raise RemoteProtocolError("REP_INFO without a type")
            (itype,) = wire.U16.unpack_from(r.data)
            if itype == Info.EXPORT:
                if len(r.data) != wire.INFO_EXPORT.size:
                    raise RemoteProtocolError(f"INFO_EXPORT of {len(r.data)} bytes")
                _, size, flags = wire.INFO_EXPORT.unpack(r.data)
                info.size, info.flags = size, _tflags(flags)
            elif itype == Info.BLOCK_SIZE:
                info.block_sizes = parse_block_size(r.data)
            elif itype == Info.NAME:
                info.name = _decode(r.data[2:], "export name")
            elif itype == Info.DESCRIPTION:
                info.description = _decode(r.data[2:], "export description")
            # unknown information types are ignored (proto.md)

    def _go(self) -> Generator[int, bytes, None]:
        infos = [Info.BLOCK_SIZE] if self.plan.block_size else []
        self._send_option(Opt.GO, self._info_payload(self.plan.export, infos))
        info = ExportInfo(self.plan.export)
        err = yield from self._info_replies(Opt.GO, info)
        if err is None:
            self.result.export = info
            return
        if err.rep == Rep.ERR_UNSUP:
            # A server older than OPT_GO: fall back (proto.md "OPT_EXPORT_NAME").
            yield from self._export_name()
            return
        raise self._error(err)

    def _export_name(self) -> Generator[int, bytes, None]:
        self.result.fallback = True
        self._out += wire.pack_option(Opt.EXPORT_NAME, self.plan.export.encode("utf-8"))
        data = yield wire.EXPORT_NAME_REPLY.size
        size, flags = wire.EXPORT_NAME_REPLY.unpack(data)
        if not self.result.no_zeroes:
            yield 124
        self.result.export = ExportInfo(self.plan.export, size=size, flags=_tflags(flags))

    def _list(self) -> Generator[int, bytes, None]:
        self._send_option(Opt.LIST)
        names: list[tuple[str, str]] = []
        while True:
            r = yield from self._reply(Opt.LIST)
            if r.rep == Rep.ACK:
                break
            if wire.rep_is_error(r.rep):
                raise self._error(r)
            if r.rep != Rep.SERVER:
                raise RemoteProtocolError(f"unexpected reply {r.rep:#x} to OPT_LIST")
            if len(names) == MAX_EXPORTS:
                raise RemoteProtocolError(f"more than {MAX_EXPORTS} exports listed")
            if len(r.data) < 4:
                raise RemoteProtocolError("short REP_SERVER")
            (n,) = wire.U32.unpack_from(r.data)
            if 4 + n > len(r.data):
                raise RemoteProtocolError("REP_SERVER name overruns the reply")
            names.append((_decode(r.data[4 : 4 + n], "export name"), _decode(r.data[4 + n :], "description")))
        for name, desc in names:
            info = ExportInfo(name, desc)
            infos = [Info.BLOCK_SIZE, Info.DESCRIPTION]
            self._send_option(Opt.INFO, self._info_payload(name, infos))
            err = yield from self._info_replies(Opt.INFO, info)
            if err is not None and err.rep != Rep.ERR_UNSUP:
                raise self._error(err)
            self.result.exports.append(info)

    def _abort(self) -> None:
        # proto.md: the server replies ACK to OPT_ABORT, but a client may close
        # without waiting; we do, so a server that just closes is fine too.
        self._send_option(Opt.ABORT)


def _tflags(flags: int) -> TransmissionFlag:
    return TransmissionFlag(flags & 0xFFFF)


# --------------------------------------------------------------------------
# Transmission
# --------------------------------------------------------------------------


class Descriptors:
    """A BLOCK_STATUS chunk's ``(length, flags)`` descriptors, decoded as they
    are iterated: a 32 MiB chunk holds 4 M of them, ~450 MB as a list of
    tuples but 32 MiB as its payload -- the most a server can make us hold
    for one reply, whose consumer (`client.Client.block_status`) merges them
    as it goes and gives up on too many small ones (hunt 8).  Compares equal
    to the list of those tuples."""

    __slots__ = ("_raw",)

    def __init__(self, raw: memoryview) -> None:
        assert len(raw) % wire.BLOCK_DESCRIPTOR.size == 0
        self._raw = raw

    def __len__(self) -> int:
        return len(self._raw) // wire.BLOCK_DESCRIPTOR.size

    def __iter__(self):
        return wire.BLOCK_DESCRIPTOR.iter_unpack(self._raw)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Descriptors):
            return self._raw == other._raw
        return isinstance(other, list) and list(self) == other

    def __repr__(self) -> str:
        return f"Descriptors({list(self)[:8]!r}{'...' if len(self) > 8 else ''})"


@dataclass(slots=True)
class Reply:
    """One finished request.

    ``error`` is a POSIX errno (0 = success) and ``message`` the server's
    text for it; ``extents`` (BLOCK_STATUS only) maps a context id to the
    server's ``(length, flags)`` descriptors (`Descriptors`).
    """

    cookie: int
    error: int = 0
    message: str = ""
    extents: dict[int, Descriptors] | None = None


class _Pending:
    """An in-flight request.

    Fields: ``cmd``, ``offset``, ``length`` as sent; ``buf``: the caller's
    buffer for READ (None once abandoned); ``received``: READ bytes covered
    so far; ``covered``: the content chunks seen so far as sorted, disjoint
    ranges relative to ``offset``, flattened ``[start0, end0, start1, end1,
    ...]`` (None before the first); ``error``/``message``: the first error
    reported; ``extents``.
    """

    __slots__ = ("cmd", "offset", "length", "buf", "received", "covered", "error", "message", "extents")

    def __init__(self, cmd: int, offset: int, length: int, buf: memoryview | None) -> None:
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.buf = buf
        self.received = 0
        self.covered: list[int] | None = None
        self.error = 0
        self.message = ""
        self.extents: dict[int, Descriptors] | None = None


class _St(enum.Enum):
    HEADER = 0  # waiting for a reply header
    FILL = 1  # filling ``_fill`` (payload into a target buffer)
    DATA_OFFSET = 2  # waiting for the 8-byte offset of an OFFSET_DATA chunk


#: Internal receive buffer size: headers and small payloads land here.
RBUF_SIZE = 256 * 1024
#: At most this much is received into the internal buffer at once: enough
#: for many small replies, small enough that a header read does not pull in
#: (and so force a copy of) most of a large READ payload behind it.
RECV_WINDOW = 16 * 1024
#: Targets at least this large are filled directly by the transport
#: (`get_buffer` returns them); smaller ones are copied from the internal
#: buffer, which saves event-loop rounds for tiny payloads.
DIRECT_MIN = 16 * 1024

_SIMPLE = wire.SIMPLE_REPLY_MAGIC
_STRUCT = wire.STRUCTURED_REPLY_MAGIC
_MAGIC = wire.U32
_SIMPLE_HDR = wire.SIMPLE_REPLY
_STRUCT_HDR = wire.STRUCTURED_REPLY
# Plain ints for the receive path: ``int & IntFlag`` runs enum code in
# Python (about 0.3 us each), comparisons with IntEnum members cost a class
# attribute lookup; these are per reply.
_DONE = int(ReplyFlag.DONE)
_T_NONE = int(ReplyType.NONE)
_T_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_T_OFFSET_HOLE = int(ReplyType.OFFSET_HOLE)
_T_BLOCK_STATUS = int(ReplyType.BLOCK_STATUS)
_T_ERROR_OFFSET = int(ReplyType.ERROR_OFFSET)
_C_READ = int(Cmd.READ)
_C_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_C_DISC = int(Cmd.DISC)
_ESHUTDOWN = errno.ESHUTDOWN
_HEADER = _St.HEADER
_FILL = _St.FILL
_DATA_OFFSET = _St.DATA_OFFSET


class Transmission:
    """Client side of the transmission phase (sans-IO).

    Fields: ``structured`` (structured replies negotiated); ``context_ids``
    (ids the server agreed to); ``pending`` (cookie -> `_Pending`);
    ``events`` (finished `Reply` objects, the caller drains it);
    ``broken``; ``_next_cookie``; ``_disconnected`` (CMD_DISC sent);
    ``shutdown``: a reply carried NBD_ESHUTDOWN -- proto.md: the client
    MUST then initiate a soft disconnect, so no request but CMD_DISC is
    accepted any more (the caller waits for those in flight, then sends
    CMD_DISC and closes: `nbd.client.Client`).

    Receive state: ``_rbuf[_rpos:_rend]`` holds received, unparsed bytes;
    ``_state``; in FILL, ``_fill[_fill_pos:]`` is the part of the target
    still to fill and ``_fill_done`` runs when it is full; ``_chunk`` is the
    header of the structured chunk being read (flags, type, cookie, length)
    and ``_req`` its request.
    """

    def __init__(self, structured: bool, context_ids: Iterable[int] = ()) -> None:
        self.structured = structured
        self.context_ids = frozenset(context_ids)
        self.pending: dict[int, _Pending] = {}
        self.events: list[Reply] = []
        self.broken = False
        self._next_cookie = 1
        self._disconnected = False
        self.shutdown = False
        self._rbuf = bytearray(RBUF_SIZE)
        self._rmv = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        self._state = _HEADER
        self._fill: memoryview | None = None
        self._fill_pos = 0
        self._fill_done = self._noop
        #: True when ``_fill`` is (a slice of) the caller's buffer.
        self._fill_is_user = False
        #: The target of the fill that just finished (a chunk payload).
        self._last_fill: memoryview = memoryview(b"")
        self._chunk: tuple[int, int, int, int] = (0, 0, 0, 0)
        self._req: _Pending | None = None

    # -- sending ------------------------------------------------------------

    def request(self, cmd: int, flags: int, offset: int, length: int, buf: memoryview | None = None) -> tuple[int, bytes]:
        """Register a request; return its cookie and its header to send.

        ``buf`` (READ only): the memory to fill, ``len(buf) == length``.  For
        WRITE the caller sends ``length`` payload bytes right after the header.
        """
        if self._disconnected:
            raise LocalProtocolError("request after NBD_CMD_DISC")
        if self.shutdown and cmd != _C_DISC:
            raise LocalProtocolError("the server is shutting down (NBD_ESHUTDOWN): only NBD_CMD_DISC may follow")
        if self.broken:
            raise LocalProtocolError("request on a broken connection")
        if not (0 <= offset < 1 << 64 and 0 <= length <= MAX_LENGTH and 0 <= flags < 1 << 16):
            raise LocalProtocolError(f"request out of range: offset={offset} length={length} flags={flags:#x}")
        if cmd == _C_READ:
            assert buf is not None and len(buf) == length and buf.format == "B" and buf.ndim == 1
        else:
            assert buf is None
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        if cmd == _C_DISC:
            self._disconnected = True
        else:
            self.pending[cookie] = _Pending(cmd, offset, length, buf)
        return cookie, wire.REQUEST.pack(wire.REQUEST_MAGIC, flags, cmd, cookie, offset, length)

    def abandon(self, cookie: int) -> None:
        """Stop writing into the caller's buffer for ``cookie`` (see module doc)."""
        req = self.pending.get(cookie)
        if req is None or req.buf is None:
            return
        if self._fill is not None and self._req is req and self._fill_is_user:
            rest = len(self._fill) - self._fill_pos
            self._fill = memoryview(bytearray(rest))
            self._fill_pos = 0
            self._fill_is_user = False
        req.buf = None

    # -- receiving ------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes should go (BufferedProtocol.get_buffer)."""
        if self._fill is not None and self._rpos == self._rend:
            rest = len(self._fill) - self._fill_pos
            if rest >= DIRECT_MIN:
                return self._fill[self._fill_pos :]
        if self._rpos == self._rend:
            self._rpos = self._rend = 0
        elif RBUF_SIZE - self._rend < RECV_WINDOW:
            n = self._rend - self._rpos
            self._rmv[:n] = self._rmv[self._rpos : self._rend]
            self._rpos, self._rend = 0, n
        return self._rmv[self._rend : self._rend + RECV_WINDOW]

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` were written into the last `get_buffer` result."""
        if self.broken:
            raise RemoteProtocolError("connection already failed")
        try:
            if self._fill is not None and self._rpos == self._rend and len(self._fill) - self._fill_pos >= DIRECT_MIN:
                # Direct fill (this must mirror the choice in get_buffer).
                self._fill_pos += nbytes
                if self._fill_pos == len(self._fill):
                    self._finish_fill()
                return
            self._rend += nbytes
            self._parse()
        except RemoteProtocolError:
            self.broken = True
            raise

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes (a copying convenience over the buffer pair)."""
        wire.feed_buffered(self, data)

    def receive_eof(self) -> None:
        """The server closed; a partial reply in the buffer is a violation."""
        if self._rpos != self._rend or self._state is not _HEADER:
            self.broken = True
            raise RemoteProtocolError("server closed the connection in the middle of a reply")

    # -- parser ---------------------------------------------------------------

    @staticmethod
    def _noop() -> None:
        pass

    def _start_fill(self, target: memoryview, done, user: bool) -> None:
        self._state = _FILL
        self._fill = target
        self._fill_pos = 0
        self._fill_done = done
        self._fill_is_user = user

    def _finish_fill(self) -> None:
        assert self._fill is not None
        self._last_fill = self._fill
        self._fill = None
        self._fill_is_user = False
        self._state = _HEADER
        self._fill_done()

    def _parse(self) -> None:
        rmv = self._rmv
        while True:
            avail = self._rend - self._rpos
            st = self._state
            if st is _FILL:
                fill = self._fill
                assert fill is not None
                want = len(fill) - self._fill_pos
                n = min(avail, want)
                if n:
                    p = self._rpos
                    fill[self._fill_pos : self._fill_pos + n] = rmv[p : p + n]
                    self._rpos = p + n
                    self._fill_pos += n
                if n == want:
                    self._finish_fill()
                    continue
                return
            if st is _HEADER:
                if avail < 4:
                    return
                (magic,) = _MAGIC.unpack_from(rmv, self._rpos)
                if magic == _STRUCT:
                    if avail < 20:
                        return
                    _, flags, rtype, cookie, length = _STRUCT_HDR.unpack_from(rmv, self._rpos)
                    self._rpos += 20
                    self._on_chunk(flags, rtype, cookie, length)
                elif magic == _SIMPLE:
                    if avail < 16:
                        return
                    _, err, cookie = _SIMPLE_HDR.unpack_from(rmv, self._rpos)
                    self._rpos += 16
                    self._on_simple(err, cookie)
                else:
                    raise RemoteProtocolError(f"bad reply magic {magic:#x}")
                continue
            # DATA_OFFSET
            if avail < 8:
                return
            (offset,) = wire.OFFSET.unpack_from(rmv, self._rpos)
            self._rpos += 8
            self._on_data_offset(offset)

    def _lookup(self, cookie: int) -> _Pending:
        req = self.pending.get(cookie)
        if req is None:
            raise RemoteProtocolError(f"reply for unknown cookie {cookie:#x}")
        return req

    def _complete(self, cookie: int, req: _Pending) -> None:
        del self.pending[cookie]
        if req.error == _ESHUTDOWN:
            self.shutdown = True
        self.events.append(Reply(cookie, req.error, req.message, req.extents))

    def _on_simple(self, err: int, cookie: int) -> None:
        req = self._lookup(cookie)
        if err:
            req.error = wire.nbd_to_errno(err)
            req.message = f"{os.strerror(req.error)} (server error {err})"
            self._complete(cookie, req)
            return
        if req.cmd == _C_READ and req.length:
            # proto.md: with structured replies a successful READ MUST use a
            # structured reply; we still accept the simple form's payload.
            self._req = req
            if req.buf is not None:
                self._start_fill(req.buf, lambda: self._complete(cookie, req), True)
            else:
                self._start_fill(memoryview(bytearray(req.length)), lambda: self._complete(cookie, req), False)
            return
        if req.cmd == _C_BLOCK_STATUS:
            raise RemoteProtocolError("simple success reply to BLOCK_STATUS")
        self._complete(cookie, req)

    def _on_chunk(self, flags: int, rtype: int, cookie: int, length: int) -> None:
        if not self.structured:
            raise RemoteProtocolError("structured reply without negotiation")
        req = self._lookup(cookie)
        self._chunk = (flags, rtype, cookie, length)
        self._req = req
        if rtype == _T_OFFSET_DATA:
            if req.cmd != _C_READ:
                raise RemoteProtocolError(f"OFFSET_DATA chunk for command {req.cmd}")
            if length <= 8:
                raise RemoteProtocolError(f"OFFSET_DATA chunk of {length} bytes")
            self._state = _DATA_OFFSET
            return
        if rtype == _T_NONE:
            if length:
                raise RemoteProtocolError("NONE chunk with a payload")
            if not flags & _DONE:
                raise RemoteProtocolError("NONE chunk without the DONE flag")
            self._chunk_end(req)
            return
        if rtype == _T_OFFSET_HOLE:
            if req.cmd != _C_READ:
                raise RemoteProtocolError(f"OFFSET_HOLE chunk for command {req.cmd}")
            if length != wire.OFFSET_HOLE.size:
                raise RemoteProtocolError(f"OFFSET_HOLE chunk of {length} bytes")
        elif rtype == _T_BLOCK_STATUS:
            if req.cmd != _C_BLOCK_STATUS:
                raise RemoteProtocolError(f"BLOCK_STATUS chunk for command {req.cmd}")
            if length < 12 or (length - 4) % 8:
                raise RemoteProtocolError(f"BLOCK_STATUS chunk of {length} bytes")
        elif wire.reply_type_is_error(rtype):
            if length < wire.ERROR_CHUNK.size:
                raise RemoteProtocolError(f"error chunk of {length} bytes")
        else:
            # proto.md: a client MUST treat an unknown non-error type as a
            # protocol violation.
            raise RemoteProtocolError(f"unknown structured reply type {rtype}")
        if length > MAX_CHUNK_PAYLOAD:
            raise RemoteProtocolError(f"chunk payload of {length} bytes is too long")
        self._start_fill(memoryview(bytearray(length)), self._on_payload, False)

    def _check_range(self, req: _Pending, offset: int, length: int) -> int:
        start = offset - req.offset
        if start < 0 or start + length > req.length:
            raise RemoteProtocolError(
                f"chunk ({offset}, {length}) outside the request ({req.offset}, {req.length})"
            )
        return start

    def _cover(self, req: _Pending, offset: int, length: int) -> int:
        """Record content chunk ``(offset, length)`` of ``req``; return its start in the request.

        Raises `RemoteProtocolError` if it leaves the request or overlaps an
        earlier content chunk (proto.md "Structured replies": MUST NOT)::

            covered   [s0    e0)      [s1   e1)
            chunk           [start    end)          bisect_right(start) is odd
                                                    (inside), or end > s1: overlap
        """
        start = self._check_range(req, offset, length)
        end = start + length
        cov = req.covered
        if cov is None:
            req.covered = [start, end]
        else:
            i = bisect.bisect_right(cov, start)
            if i & 1 or (i < len(cov) and end > cov[i]):
                raise RemoteProtocolError(
                    f"chunk ({offset}, {length}) overlaps an earlier chunk of the reply to "
                    f"({req.offset}, {req.length})"
                )
            cov[i:i] = (start, end)
        req.received += length
        return start

    def _on_data_offset(self, offset: int) -> None:
        flags, _, cookie, length = self._chunk
        req = self._req
        assert req is not None
        n = length - 8
        start = self._cover(req, offset, n)
        done = self._data_done
        if req.buf is not None:
            self._start_fill(req.buf[start : start + n], done, True)
        else:
            self._start_fill(memoryview(bytearray(n)), done, False)

    def _data_done(self) -> None:
        req = self._req
        assert req is not None
        self._chunk_end(req)

    def _on_payload(self) -> None:
        payload = self._last_fill
        flags, rtype, cookie, length = self._chunk
        req = self._req
        assert req is not None
        if rtype == _T_OFFSET_HOLE:
            offset, n = wire.OFFSET_HOLE.unpack(payload)
            if n == 0:
                raise RemoteProtocolError("OFFSET_HOLE of length 0")
            start = self._cover(req, offset, n)
            if req.buf is not None:
                req.buf[start : start + n] = bytes(n)
        elif rtype == _T_BLOCK_STATUS:
            (cid,) = wire.BLOCK_STATUS_ID.unpack_from(payload)
            if cid not in self.context_ids:
                raise RemoteProtocolError(f"BLOCK_STATUS for unknown context id {cid}")
            if req.extents is None:
                req.extents = {}
            if cid in req.extents:
                raise RemoteProtocolError(f"two BLOCK_STATUS chunks for context id {cid}")
            req.extents[cid] = Descriptors(memoryview(payload)[4:])
        else:
            err, mlen = wire.ERROR_CHUNK.unpack_from(payload)
            if mlen > length - 6:
                raise RemoteProtocolError("error message overruns the chunk")
            if err == 0:
                raise RemoteProtocolError("error chunk with error value 0")
            if rtype == _T_ERROR_OFFSET:
                if length != 6 + mlen + 8:
                    raise RemoteProtocolError("malformed ERROR_OFFSET chunk")
                (eoff,) = wire.OFFSET.unpack_from(payload, 6 + mlen)
                if req.cmd == _C_READ:
                    self._check_range(req, eoff, 1)
            if not req.error:
                req.error = wire.nbd_to_errno(err)
                req.message = bytes(payload[6 : 6 + mlen]).decode("utf-8", "replace")
        self._chunk_end(req)

    def _chunk_end(self, req: _Pending) -> None:
        flags, rtype, cookie, length = self._chunk
        if not flags & _DONE:
            return
        if not req.error:
            if req.cmd == _C_READ and req.received != req.length:
                raise RemoteProtocolError(f"READ reply covers {req.received} of {req.length} bytes")
            if req.cmd == _C_BLOCK_STATUS and not req.extents:
                raise RemoteProtocolError("successful BLOCK_STATUS reply without extents")
        self._complete(cookie, req)
