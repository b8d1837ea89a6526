"""Unit tests of the sans-IO server protocol (no I/O): bytes in small slices, events out."""

from __future__ import annotations

import errno
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdbackup.nbd import wire
from nbdbackup.nbd.protocol import (
    Disconnect,
    ExportInfo,
    HandshakeDone,
    ProtocolViolation,
    Request,
    ServerConnection,
    StartTLS,
    State,
    transmission_flags,
)
from nbdbackup.nbd.wire import Cmd, CmdFlag, Info, Opt, Rep
from nbdbackup.nbd.wire import TransmissionFlag as TF

RW_FLAGS = transmission_flags(read_only=False, can_flush=True, can_fua=True, can_trim=True, can_zero=True,
                              can_fast_zero=False, can_cache=True, can_multi_conn=True)
RO_FLAGS = transmission_flags(read_only=True, can_flush=True, can_fua=True, can_trim=True, can_zero=True,
                              can_fast_zero=False, can_cache=True, can_multi_conn=True)

EXPORTS = {
    "disk": ExportInfo("disk", 1 << 20, RW_FLAGS, description="the disk",
                       meta_contexts=("base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1")),
    "ro": ExportInfo("ro", 4096, RO_FLAGS),
}
#: Exports only the command-flag tests ask for by name (not listed).
FLAG_EXPORTS = {
    "nofua": ExportInfo("nofua", 1 << 20, transmission_flags(
        read_only=False, can_flush=True, can_fua=False, can_trim=True, can_zero=True, can_fast_zero=False,
        can_cache=False, can_multi_conn=True)),
    "fast": ExportInfo("fast", 1 << 20, transmission_flags(
        read_only=False, can_flush=True, can_fua=True, can_trim=False, can_zero=True, can_fast_zero=True,
        can_cache=True, can_multi_conn=True)),
}


def make(tls: str = "off") -> ServerConnection:
    return ServerConnection(lambda n: EXPORTS.get(n) or FLAG_EXPORTS.get(n), lambda: list(EXPORTS.values()),
                            tls=tls)


def feed(conn: ServerConnection, data: bytes, rng: random.Random | None = None) -> None:
    """Feed ``data`` in random 1..10-byte slices (h11's habit)."""
    rng = rng or random.Random(len(data))
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 10)
        conn.receive_data(data[pos:pos + n])
        pos += n


def events(conn: ServerConnection) -> list:
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rep, length = wire.OPTION_REPLY.unpack_from(data, pos)
        assert magic == wire.OPTION_REPLY_MAGIC
        pos += wire.OPTION_REPLY.size
        out.append((opt, rep, data[pos:pos + length]))
        pos += length
    assert pos == len(data)
    return out


def greet(conn: ServerConnection, flags: int = 3) -> None:
    greeting = conn.data_to_send()
    assert greeting == wire.SERVER_GREETING.pack(wire.NBDMAGIC, wire.IHAVEOPT, 3)
    feed(conn, struct.pack(">I", flags))


def go_payload(name: str, infos=(Info.BLOCK_SIZE,)) -> bytes:
    return wire.pack_string(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def meta_payload(name: str, queries: list[str]) -> bytes:
    return wire.pack_string(name) + struct.pack(">I", len(queries)) + b"".join(wire.pack_string(q) for q in queries)


def to_transmission(structured: bool = True, export: str = "disk", contexts=("base:allocation",)) -> ServerConnection:
    conn = make()
    greet(conn)
    msgs = b""
    if structured:
        msgs += wire.pack_option(Opt.STRUCTURED_REPLY)
        if contexts:
            msgs += wire.pack_option(Opt.SET_META_CONTEXT, meta_payload(export, list(contexts)))
    msgs += wire.pack_option(Opt.GO, go_payload(export))
    feed(conn, msgs)
    evs = events(conn)
    assert isinstance(evs[-1], HandshakeDone)
    conn.data_to_send()
    return conn


def test_greeting_and_go_in_tiny_slices():
    conn = make()
    greet(conn)
    feed(conn, wire.pack_option(Opt.GO, go_payload("disk", (Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE))))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], HandshakeDone)
    assert evs[0].export.name == "disk" and not evs[0].structured
    replies = parse_option_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [Rep.INFO] * 4 + [Rep.ACK]
    infos = {struct.unpack(">H", r[2][:2])[0]: r[2] for r in replies[:-1]}
    assert infos[Info.NAME][2:] == b"disk"
    assert infos[Info.DESCRIPTION][2:] == b"the disk"
    _, size, flags = wire.INFO_EXPORT.unpack(infos[Info.EXPORT])
    assert size == 1 << 20 and flags == RW_FLAGS & ~TF.SEND_DF  # no structured replies here
    assert wire.INFO_BLOCK_SIZE.unpack(infos[Info.BLOCK_SIZE])[1:] == (1, 4096, wire.MAX_PAYLOAD)
    assert conn.state is State.TRANSMISSION


def test_unknown_client_flags_close():
    conn = make()
    greet(conn, flags=0x80)
    assert isinstance(events(conn)[0], ProtocolViolation)
    assert conn.state is State.CLOSED


def test_unknown_option_gets_unsup_and_negotiation_goes_on():
    conn = make()
    greet(conn)
    feed(conn, wire.pack_option(200, b"xyz") + wire.pack_option(Opt.STARTTLS)
         + wire.pack_option(Opt.EXTENDED_HEADERS) + wire.pack_option(Opt.LIST))
    replies = parse_option_replies(conn.data_to_send())
    assert replies[0][:2] == (200, Rep.ERR_UNSUP)
    assert replies[1][:2] == (Opt.STARTTLS, Rep.ERR_POLICY)  # NOTLS: TLS not configured
    assert replies[2][:2] == (Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP)
    servers = [r for r in replies[3:] if r[1] == Rep.SERVER]
    names = [r[2][4:4 + struct.unpack(">I", r[2][:4])[0]].decode() for r in servers]
    assert names == ["disk", "ro"]
    assert replies[-1][:2] == (Opt.LIST, Rep.ACK)
    assert events(conn) == []


def test_list_with_data_and_starttls_with_data_are_invalid():
    conn = make()
    greet(conn)
    feed(conn, wire.pack_option(Opt.LIST, b"x") + wire.pack_option(Opt.STARTTLS, b"y"))
    replies = parse_option_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [Rep.ERR_INVALID, Rep.ERR_INVALID]


def test_info_unknown_export_and_malformed_payloads():
    conn = make()
    greet(conn)
    feed(conn, wire.pack_option(Opt.INFO, go_payload("nope"))
         + wire.pack_option(Opt.GO, b"\x00\x00\x00\x09ab")  # name longer than payload
         + wire.pack_option(Opt.GO, wire.pack_string("disk") + b"\x00\x02\x00\x03"))  # count mismatch
    replies = parse_option_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [Rep.ERR_UNKNOWN, Rep.ERR_INVALID, Rep.ERR_INVALID]
    assert conn.state is State.OPTION_HEADER


def test_info_does_not_enter_transmission_and_empty_name_is_default():
    conn = make()
    greet(conn)
    feed(conn, wire.pack_option(Opt.INFO, go_payload("")))
    assert events(conn) == []
    replies = parse_option_replies(conn.data_to_send())
    assert replies[-1][1] == Rep.ACK
    feed(conn, wire.pack_option(Opt.GO, go_payload("")))
    ev = events(conn)[0]
    assert isinstance(ev, HandshakeDone) and ev.export.name == "disk"


def test_bad_option_magic_and_oversize_option_close():
    conn = make()
    greet(conn)
    feed(conn, struct.pack(">QII", 0x1234, Opt.LIST, 0))
    assert isinstance(events(conn)[0], ProtocolViolation)
    conn = make()
    greet(conn)
    feed(conn, struct.pack(">QII", wire.IHAVEOPT, Opt.GO, wire.MAX_OPTION_LENGTH + 1))
    assert isinstance(events(conn)[0], ProtocolViolation)


def test_abort_acks_and_disconnects():
    conn = make()
    greet(conn)
    feed(conn, wire.pack_option(Opt.ABORT) + wire.pack_option(Opt.LIST))
    assert isinstance(events(conn)[0], Disconnect)
    replies = parse_option_replies(conn.data_to_send())
    assert replies == [(Opt.ABORT, Rep.ACK, b"")]  # nothing parsed after ABORT


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes):
    conn = make()
    greet(conn, flags=3 if no_zeroes else 1)
    feed(conn, wire.pack_option(Opt.EXPORT_NAME, b"ro"))
    out = conn.data_to_send()
    assert len(out) == (10 if no_zeroes else 134)
    # No structured replies on this path, so no SEND_DF (see test_send_df_only_with_structured_replies).
    assert wire.EXPORT_NAME_REPLY.unpack(out[:10]) == (4096, RO_FLAGS & ~TF.SEND_DF)
    assert isinstance(events(conn)[0], HandshakeDone)


def test_export_name_unknown_closes():
    conn = make()
    greet(conn)
    feed(conn, wire.pack_option(Opt.EXPORT_NAME, b"nope"))
    assert isinstance(events(conn)[0], ProtocolViolation)


def test_meta_contexts_need_structured_replies():
    conn = make()
    greet(conn)
    feed(conn, wire.pack_option(Opt.SET_META_CONTEXT, meta_payload("disk", ["base:allocation"])))
    assert parse_option_replies(conn.data_to_send())[0][1] == Rep.ERR_INVALID


def test_list_meta_context_wildcards():
    conn = make()
    greet(conn)
    feed(conn, wire.pack_option(Opt.STRUCTURED_REPLY))
    feed(conn, wire.pack_option(Opt.STRUCTURED_REPLY))  # twice: invalid
    conn_out = parse_option_replies(conn.data_to_send())
    assert [r[1] for r in conn_out] == [Rep.ACK, Rep.ERR_INVALID]

    def listed(queries):
        feed(conn, wire.pack_option(Opt.LIST_META_CONTEXT, meta_payload("disk", queries)))
        reps = parse_option_replies(conn.data_to_send())
        assert reps[-1][1] == Rep.ACK
        return [r[2][4:].decode() for r in reps[:-1]]

    assert listed([]) == ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
    assert listed(["base:"]) == ["base:allocation"]
    assert listed(["qemu:"]) == ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
    assert listed(["qemu:dirty-bitmap:"]) == ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
    assert listed(["qemu:dirty-bitmap:b1", "nope:x"]) == ["qemu:dirty-bitmap:b1"]


def test_set_meta_context_ids_and_go_to_other_export_resets():
    conn = make()
    greet(conn)
    feed(conn, wire.pack_option(Opt.STRUCTURED_REPLY)
         + wire.pack_option(Opt.SET_META_CONTEXT, meta_payload("disk", ["qemu:dirty-bitmap:b1", "base:allocation", "base:"])))
    reps = parse_option_replies(conn.data_to_send())[1:]
    ctx = {struct.unpack(">I", r[2][:4])[0]: r[2][4:].decode() for r in reps if r[1] == Rep.META_CONTEXT}
    assert ctx == {0: "qemu:dirty-bitmap:b1", 1: "base:allocation"}  # "base:" selects nothing in SET
    feed(conn, wire.pack_option(Opt.GO, go_payload("ro")))
    ev = events(conn)[0]
    assert isinstance(ev, HandshakeDone) and ev.contexts == {}


def req(cmd, offset=0, length=0, flags=0, cookie=7, payload=b""):
    return wire.pack_request(cmd, flags, cookie, offset, length) + payload


def test_write_payload_arrives_whole_in_slices():
    conn = to_transmission()
    data = bytes(range(256)) * 64
    feed(conn, req(Cmd.WRITE, 4096, len(data), payload=data) + req(Cmd.FLUSH, cookie=8))
    evs = events(conn)
    assert [type(e) for e in evs] == [Request, Request]
    assert evs[0].cmd == Cmd.WRITE and evs[0].payload == data and evs[0].error == 0
    assert evs[1].cmd == Cmd.FLUSH and evs[1].cookie == 8 and evs[1].error == 0


def test_large_write_payload_received_in_place():
    conn = to_transmission()
    data = random.Random(1).randbytes(1 << 20)
    conn.receive_data(req(Cmd.WRITE, 0, len(data)) + data[:100])
    buf = conn.get_buffer(-1)
    assert len(buf) == len(data) - 100  # the payload's own buffer, not the ring
    buf[:] = data[100:]
    conn.buffer_updated(len(data) - 100)
    ev = events(conn)[0]
    assert ev.payload == data


@pytest.mark.parametrize(
    "message, expected",
    [
        (req(Cmd.READ, (1 << 20) - 10, 20), errno.EINVAL),
        (req(Cmd.WRITE, (1 << 20) - 1, 2, payload=b"ab"), errno.ENOSPC),
        (req(Cmd.WRITE_ZEROES, 1 << 20, 1), errno.ENOSPC),
        (req(Cmd.TRIM, 1 << 20, 1), errno.EINVAL),
        (req(Cmd.WRITE_ZEROES, 0, 1, flags=CmdFlag.FAST_ZERO), errno.EINVAL),  # not advertised here
        (req(Cmd.READ, 0, wire.MAX_PAYLOAD + 1), errno.EINVAL),
        (req(99, 0, 1), errno.EINVAL),
        (req(Cmd.RESIZE, 0, 1), errno.EINVAL),
        (req(Cmd.BLOCK_STATUS, 0, 0), errno.EINVAL),
        (req(Cmd.READ, 0, 1, flags=0x40), errno.EINVAL),
    ],
)
def test_request_validation(message, expected):
    conn = to_transmission()
    feed(conn, message)
    ev = events(conn)[0]
    assert isinstance(ev, Request) and ev.error == expected and ev.message


def test_read_only_export_refuses_writes_with_eperm():
    conn = to_transmission(export="ro")
    feed(conn, req(Cmd.WRITE, 0, 2, payload=b"ab") + req(Cmd.TRIM, 0, 1) + req(Cmd.WRITE_ZEROES, 0, 1)
         + req(Cmd.READ, 0, 1))
    errs = [e.error for e in events(conn)]
    assert errs == [errno.EPERM, errno.EPERM, errno.EPERM, 0]


# --- command flags, rule by rule (proto.md "Command flags", "Transmission flags",
# "Request types"). A flag the spec makes valid MUST be accepted; one a client
# MUST NOT send may be refused, and is refused with EINVAL.

def errors_for(conn: ServerConnection, *messages: bytes) -> list[int]:
    feed(conn, b"".join(messages))
    evs = events(conn)
    assert all(isinstance(e, Request) for e in evs) and len(evs) == len(messages)
    return [e.error for e in evs]


def test_fua_is_accepted_on_every_command_when_send_fua_was_advertised():
    # proto.md "Command flags", NBD_CMD_FLAG_FUA: "valid for all commands, provided
    # NBD_FLAG_SEND_FUA has been negotiated, in which case the server MUST accept all
    # commands with this bit set (even by ignoring the bit)".
    conn = to_transmission()
    assert conn.tflags & TF.SEND_FUA
    fua = CmdFlag.FUA
    assert errors_for(
        conn, req(Cmd.READ, 0, 512, flags=fua), req(Cmd.WRITE, 0, 2, flags=fua, payload=b"ab"),
        req(Cmd.FLUSH, flags=fua), req(Cmd.TRIM, 0, 512, flags=fua), req(Cmd.CACHE, 0, 512, flags=fua),
        req(Cmd.WRITE_ZEROES, 0, 512, flags=fua), req(Cmd.WRITE_ZEROES, 0, 512, flags=fua | CmdFlag.NO_HOLE),
        req(Cmd.BLOCK_STATUS, 0, 512, flags=fua | CmdFlag.REQ_ONE),
        req(Cmd.READ, 0, 512, flags=fua | CmdFlag.DF),
    ) == [0] * 9


def test_fua_without_send_fua_on_a_writable_export_is_einval():
    # proto.md "Command flags": FUA is valid only "provided NBD_FLAG_SEND_FUA has been
    # negotiated"; a server that cannot honour it must not pretend to.
    conn = to_transmission(export="nofua", contexts=())
    assert not conn.tflags & TF.SEND_FUA
    assert errors_for(conn, req(Cmd.WRITE, 0, 2, flags=CmdFlag.FUA, payload=b"ab"),
                      req(Cmd.READ, 0, 512, flags=CmdFlag.FUA)) == [errno.EINVAL, errno.EINVAL]


def test_fua_on_a_read_only_export_is_ignored():
    # proto.md "Command flags": the server MAY ignore FUA where the command writes
    # nothing; on a read-only export nothing is ever written (SEND_FUA is not advertised
    # there, but clients are known to set FUA anyway).
    conn = to_transmission(export="ro", contexts=())
    assert not conn.tflags & TF.SEND_FUA
    assert errors_for(conn, req(Cmd.READ, 0, 512, flags=CmdFlag.FUA),
                      req(Cmd.WRITE, 0, 2, flags=CmdFlag.FUA, payload=b"ab")) == [0, errno.EPERM]


def test_send_df_only_with_structured_replies():
    # proto.md "Transmission flags", NBD_FLAG_SEND_DF: the server "MUST leave this flag
    # clear if structured replies have not been negotiated".
    for structured in (False, True):
        conn = make()
        greet(conn)
        msgs = wire.pack_option(Opt.STRUCTURED_REPLY) if structured else b""
        feed(conn, msgs + wire.pack_option(Opt.INFO, go_payload("disk")) + wire.pack_option(Opt.GO, go_payload("disk")))
        infos = [r[2] for r in parse_option_replies(conn.data_to_send()) if r[1] == Rep.INFO
                 and struct.unpack(">H", r[2][:2])[0] == Info.EXPORT]
        assert len(infos) == 2
        for data in infos:
            assert bool(wire.INFO_EXPORT.unpack(data)[2] & TF.SEND_DF) == structured
        assert bool(conn.tflags & TF.SEND_DF) == structured


def test_df_on_read_needs_send_df():
    # proto.md "Command flags", NBD_CMD_FLAG_DF: valid during NBD_CMD_READ; "MUST NOT
    # be set unless the transmission flags include NBD_FLAG_SEND_DF".
    assert errors_for(to_transmission(), req(Cmd.READ, 0, 512, flags=CmdFlag.DF)) == [0]
    assert errors_for(to_transmission(structured=False), req(Cmd.READ, 0, 512, flags=CmdFlag.DF)) == [errno.EINVAL]


@pytest.mark.parametrize("flag, valid_on", [
    (CmdFlag.NO_HOLE, Cmd.WRITE_ZEROES),
    (CmdFlag.DF, Cmd.READ),
    (CmdFlag.REQ_ONE, Cmd.BLOCK_STATUS),
    (CmdFlag.FAST_ZERO, Cmd.WRITE_ZEROES),
], ids=lambda v: getattr(v, "name", str(v)))
def test_a_flag_on_a_command_that_does_not_define_it_is_einval(flag, valid_on):
    # proto.md "Command flags": "Clients MUST NOT set a command flag bit that is not
    # documented for the particular command"; such a request is refused with EINVAL.
    conn = to_transmission(export="fast")
    commands = [Cmd.READ, Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS]
    msgs = [req(c, 0, 0 if c == Cmd.FLUSH else 512, flags=flag) for c in commands if c != valid_on]
    msgs.append(req(Cmd.WRITE, 0, 2, flags=flag, payload=b"ab"))
    assert errors_for(conn, *msgs) == [errno.EINVAL] * len(msgs)
    # ... and the payload of the refused WRITE was consumed: the next request parses.
    assert errors_for(conn, req(Cmd.READ, 0, 512)) == [0]


def test_no_hole_on_write_zeroes_is_accepted_even_without_send_trim():
    # proto.md "Command flags", NBD_CMD_FLAG_NO_HOLE: "The client MAY send
    # NBD_CMD_FLAG_NO_HOLE even if NBD_FLAG_SEND_TRIM was not set"; the server "MUST
    # support the use of this flag if it advertises NBD_FLAG_SEND_WRITE_ZEROES".
    conn = to_transmission(export="fast", contexts=())
    assert not conn.tflags & TF.SEND_TRIM and conn.tflags & TF.SEND_WRITE_ZEROES
    assert errors_for(conn, req(Cmd.WRITE_ZEROES, 0, 512, flags=CmdFlag.NO_HOLE)) == [0]


def test_fast_zero_needs_send_fast_zero():
    # proto.md "Request types", NBD_CMD_WRITE_ZEROES: without NBD_FLAG_SEND_FAST_ZERO
    # the server "SHOULD fail with NBD_EINVAL if the NBD_CMD_FLAG_FAST_ZERO flag was set".
    flags = CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE
    assert errors_for(to_transmission(), req(Cmd.WRITE_ZEROES, 0, 512, flags=flags)) == [errno.EINVAL]
    assert errors_for(to_transmission(export="fast", contexts=()),
                      req(Cmd.WRITE_ZEROES, 0, 512, flags=flags)) == [0]


def test_req_one_on_block_status_is_accepted():
    # proto.md "Command flags", NBD_CMD_FLAG_REQ_ONE: valid during NBD_CMD_BLOCK_STATUS.
    conn = to_transmission()
    assert errors_for(conn, req(Cmd.BLOCK_STATUS, 0, 512, flags=CmdFlag.REQ_ONE)) == [0]


def test_payload_len_without_extended_headers_is_einval():
    # proto.md "Command flags": bit 5, NBD_CMD_FLAG_PAYLOAD_LEN, belongs to the
    # EXTENDED_HEADERS extension, which this server does not negotiate (OPT_EXTENDED_HEADERS
    # gets ERR_UNSUP), so no command may carry it.  A WRITE's payload is still consumed.
    conn = to_transmission()
    assert errors_for(conn, req(Cmd.WRITE, 0, 2, flags=CmdFlag.PAYLOAD_LEN, payload=b"ab"),
                      req(Cmd.READ, 0, 512, flags=CmdFlag.PAYLOAD_LEN), req(Cmd.READ, 0, 512)) == [
        errno.EINVAL, errno.EINVAL, 0]


@pytest.mark.parametrize("bit", range(6, 16))
def test_undefined_flag_bits_are_einval(bit):
    # proto.md "Command flags" defines bits 0-5 only; a client MUST NOT set the others.
    conn = to_transmission()
    assert errors_for(conn, req(Cmd.READ, 0, 512, flags=1 << bit),
                      req(Cmd.WRITE, 0, 2, flags=1 << bit, payload=b"ab")) == [errno.EINVAL] * 2


def test_cache_without_send_cache_is_einval_and_flags_on_cache_are_checked():
    # proto.md "Request types", NBD_CMD_CACHE: a server MAY answer EINVAL to a command it
    # did not advertise; "if it advertised the command, the server MUST reject any command
    # flags it does not recognize" (FUA it recognises: valid for all commands).
    conn = to_transmission(export="nofua", contexts=())
    assert errors_for(conn, req(Cmd.CACHE, 0, 512)) == [errno.EINVAL]
    conn = to_transmission()
    assert errors_for(conn, req(Cmd.CACHE, 0, 512, flags=CmdFlag.FUA), req(Cmd.CACHE, 0, 512, flags=CmdFlag.DF),
                      req(Cmd.CACHE, 0, 512, flags=1 << 9)) == [0, errno.EINVAL, errno.EINVAL]


def test_flush_with_fua_and_flush_with_nonzero_offset():
    # proto.md "Request types", NBD_CMD_FLUSH: offset and length "are reserved, and MUST
    # be set to all-zero" by the client; the server is lenient and flushes anyway.
    conn = to_transmission()
    assert errors_for(conn, req(Cmd.FLUSH, flags=CmdFlag.FUA), req(Cmd.FLUSH, 4096, 512)) == [0, 0]


def test_block_status_needs_a_context_and_df_needs_structured():
    conn = to_transmission(contexts=())
    feed(conn, req(Cmd.BLOCK_STATUS, 0, 512))
    assert events(conn)[0].error == errno.EINVAL
    conn = to_transmission(structured=False)
    feed(conn, req(Cmd.READ, 0, 512, flags=CmdFlag.DF))
    assert events(conn)[0].error == errno.EINVAL
    conn = to_transmission()
    feed(conn, req(Cmd.BLOCK_STATUS, 0, 512, flags=CmdFlag.REQ_ONE))
    assert events(conn)[0].error == 0


def test_bad_request_magic_and_oversize_write_close():
    conn = to_transmission()
    feed(conn, struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 1))
    assert isinstance(events(conn)[0], ProtocolViolation)
    conn = to_transmission()
    feed(conn, req(Cmd.WRITE, 0, wire.MAX_PAYLOAD + 1) + req(Cmd.READ, 0, 1))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], ProtocolViolation)


def test_disc_stops_parsing():
    conn = to_transmission()
    feed(conn, req(Cmd.DISC) + req(Cmd.READ, 0, 1))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], Disconnect)


def test_replies_encoding():
    conn = to_transmission()
    assert conn.reply_ok(5) == wire.STRUCTURED_REPLY.pack(wire.STRUCTURED_REPLY_MAGIC, 1, 0, 5, 0)
    err = conn.reply_error(5, errno.ENOSPC, "full")
    magic, flags, rtype, cookie, length = wire.STRUCTURED_REPLY.unpack_from(err)
    assert (rtype, cookie, flags) == (wire.ReplyType.ERROR, 5, 1)
    assert wire.ERROR_CHUNK.unpack_from(err, 20) == (wire.Err.ENOSPC, 4) and err.endswith(b"full")
    bs = conn.reply_block_status(9, [(0, [(4096, 3), (512, 0)]), (1, [(4608, 1)])])
    first = wire.STRUCTURED_REPLY.unpack_from(bs)
    assert first[1] == 0 and first[2] == wire.ReplyType.BLOCK_STATUS and first[4] == 4 + 16
    second = wire.STRUCTURED_REPLY.unpack_from(bs, 20 + 20)
    assert second[1] == 1  # DONE on the last chunk only
    simple = to_transmission(structured=False)
    assert simple.reply_error(3, errno.EROFS) == wire.pack_simple_reply(3, wire.Err.EPERM)
    assert simple.read_header(3, 0, 10) == wire.pack_simple_reply(3, 0)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=2**32 - 1))
def test_garbage_never_raises(garbage, seed):
    """Any bytes at any point: the protocol yields events, never raises."""
    for phase in ("flags", "options", "transmission"):
        if phase == "flags":
            conn = make()
            conn.data_to_send()
        elif phase == "options":
            conn = make()
            greet(conn)
        else:
            conn = to_transmission()
        feed(conn, garbage, random.Random(seed))
        for ev in events(conn):
            assert isinstance(ev, (HandshakeDone, Request, Disconnect, ProtocolViolation))
        conn.data_to_send()


# -- TLS (proto.md "TLS support") -------------------------------------------------


def test_forcedtls_refuses_options_until_starttls_then_resets_state():
    conn = make("require")
    greet(conn)
    feed(conn, wire.pack_option(Opt.LIST) + wire.pack_option(Opt.STRUCTURED_REPLY)
         + wire.pack_option(Opt.GO, go_payload("disk")) + wire.pack_option(200)
         + wire.pack_option(Opt.STARTTLS))
    replies = parse_option_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [Rep.ERR_TLS_REQD] * 4 + [Rep.ACK]
    assert replies[-1][0] == Opt.STARTTLS
    assert [type(e) for e in events(conn)] == [StartTLS]
    assert conn.tls_active
    # (decrypted bytes from here on)
    feed(conn, wire.pack_option(Opt.STARTTLS) + wire.pack_option(Opt.STRUCTURED_REPLY)
         + wire.pack_option(Opt.GO, go_payload("disk")))
    replies = parse_option_replies(conn.data_to_send())
    assert replies[0][:2] == (Opt.STARTTLS, Rep.ERR_INVALID)  # already active
    assert replies[1][:2] == (Opt.STRUCTURED_REPLY, Rep.ACK)
    assert replies[-1][:2] == (Opt.GO, Rep.ACK)
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], HandshakeDone) and evs[0].structured


def test_state_negotiated_in_clear_does_not_survive_starttls():
    conn = make("on")
    greet(conn)
    feed(conn, wire.pack_option(Opt.STRUCTURED_REPLY) + wire.pack_option(Opt.STARTTLS))
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [Rep.ACK, Rep.ACK]
    assert [type(e) for e in events(conn)] == [StartTLS]
    feed(conn, wire.pack_option(Opt.GO, go_payload("disk")))
    evs = events(conn)
    assert isinstance(evs[0], HandshakeDone) and not evs[0].structured


def test_selective_tls_allows_clear_text():
    conn = make("on")
    greet(conn)
    feed(conn, wire.pack_option(Opt.GO, go_payload("disk")))
    assert parse_option_replies(conn.data_to_send())[-1][1] == Rep.ACK
    assert isinstance(events(conn)[0], HandshakeDone) and not conn.tls_active


def test_forcedtls_export_name_without_tls_closes():
    conn = make("require")
    greet(conn)
    feed(conn, wire.pack_option(Opt.EXPORT_NAME, b"disk"))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], ProtocolViolation) and "TLS" in evs[0].message
    assert conn.state is State.CLOSED


def test_forcedtls_abort_is_allowed():
    conn = make("require")
    greet(conn)
    feed(conn, wire.pack_option(Opt.ABORT))
    assert parse_option_replies(conn.data_to_send())[0][1] == Rep.ACK
    assert isinstance(events(conn)[0], Disconnect)


def test_bytes_pipelined_after_starttls_are_a_violation():
    conn = make("require")
    greet(conn)
    conn.receive_data(wire.pack_option(Opt.STARTTLS) + b"\x16\x03\x01")  # a ClientHello too early
    evs = events(conn)
    assert [type(e) for e in evs] == [ProtocolViolation]
    assert conn.state is State.CLOSED
    assert parse_option_replies(conn.data_to_send()) == []  # no ACK: nothing to upgrade


def test_denied_client_gets_policy_errors_but_may_abort():
    conn = make("on")
    greet(conn)
    conn.deny("uid 7 is not allowed")
    feed(conn, wire.pack_option(Opt.LIST) + wire.pack_option(Opt.STARTTLS) + wire.pack_option(Opt.GO, go_payload("disk"))
         + wire.pack_option(Opt.ABORT))
    replies = parse_option_replies(conn.data_to_send())
    assert [r[1] for r in replies] == [Rep.ERR_POLICY] * 3 + [Rep.ACK]
    assert all(b"uid 7 is not allowed" in r[2] for r in replies[:3])
    assert [type(e) for e in events(conn)] == [Disconnect]


def test_denied_client_choosing_an_export_is_closed():
    conn = make()
    greet(conn)
    conn.deny("no")
    feed(conn, wire.pack_option(Opt.EXPORT_NAME, b"disk"))
    evs = events(conn)
    assert len(evs) == 1 and isinstance(evs[0], ProtocolViolation) and "access denied" in evs[0].message


def test_release_ring_only_when_empty_and_the_next_receive_gets_a_new_one():
    """An idle connection gives its 256 KiB receive ring back (hunt 11); a
    request in pieces keeps it; the next receive allocates a ring again."""
    conn = to_transmission()
    read = wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, Cmd.READ, 7, 0, 512)
    feed(conn, read[:10])  # half a request header waits in the ring
    assert not conn.release_ring() and len(conn._buf) > 0
    feed(conn, read[10:])
    (req,) = events(conn)
    assert isinstance(req, Request) and req.cookie == 7
    assert conn.release_ring() and len(conn._buf) == 0
    assert len(conn.get_buffer()) > 0  # a new ring
    write = wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, Cmd.WRITE, 8, 0, 8)
    feed(conn, write + b"12345678")
    (req,) = events(conn)
    assert req.cookie == 8 and bytes(req.payload) == b"12345678"
    assert conn.release_ring(force=True) and len(conn._buf) == 0


# -- hunt 14: proto.md requirements walked one by one (docs/spec-conformance.md) ---------


def test_a_failed_set_meta_context_still_replaces_the_selection():
    """proto.md SET_META_CONTEXT: it replaces every context selected before,
    "including when this command fails" -- BLOCK_STATUS is then refused."""
    for bad in (meta_payload("disk", ["base:allocation"])[:-3],   # truncated: ERR_INVALID
                meta_payload("nope", ["base:allocation"])):       # unknown export: ERR_UNKNOWN
        conn = make()
        greet(conn)
        feed(conn, wire.pack_option(Opt.STRUCTURED_REPLY)
             + wire.pack_option(Opt.SET_META_CONTEXT, meta_payload("disk", ["base:allocation"]))
             + wire.pack_option(Opt.SET_META_CONTEXT, bad)
             + wire.pack_option(Opt.GO, go_payload("disk")))
        reps = [r[1] for r in parse_option_replies(conn.data_to_send())]
        assert reps[1:3] == [Rep.META_CONTEXT, Rep.ACK] and wire.rep_is_error(reps[3])
        ev = events(conn)[-1]
        assert isinstance(ev, HandshakeDone) and ev.contexts == {}
        feed(conn, req(Cmd.BLOCK_STATUS, 0, 4096))
        assert events(conn)[0].error == errno.EINVAL


def test_block_size_reqd_comes_after_the_constraints_and_never_when_they_were_asked():
    """proto.md INFO/GO: ERR_BLOCK_SIZE_REQD MUST NOT answer a GO that asked
    for INFO_BLOCK_SIZE, and SHOULD follow an INFO_BLOCK_SIZE reply; INFO
    (no commitment) is answered."""
    aligned = ExportInfo("a", 1 << 20, RW_FLAGS, block_size=(4096, 4096, 1 << 20))
    conn = ServerConnection(lambda n: aligned if n == "a" else None, lambda: [aligned])
    greet(conn)
    feed(conn, wire.pack_option(Opt.INFO, go_payload("a", ())) + wire.pack_option(Opt.GO, go_payload("a", ())))
    reps = parse_option_replies(conn.data_to_send())
    assert [r[1] for r in reps] == [Rep.INFO, Rep.INFO, Rep.ACK, Rep.INFO, Rep.ERR_BLOCK_SIZE_REQD]
    assert wire.INFO_BLOCK_SIZE.unpack(reps[3][2])[1:] == (4096, 4096, 1 << 20)
    feed(conn, wire.pack_option(Opt.GO, go_payload("a")))
    assert [r[1] for r in parse_option_replies(conn.data_to_send())] == [Rep.INFO, Rep.INFO, Rep.ACK]
    assert isinstance(events(conn)[-1], HandshakeDone)


def test_block_status_chunks_hold_at_most_max_extents_descriptors(monkeypatch):
    """proto.md BLOCK_STATUS: a server SHOULD NOT send more than 2^20
    descriptors in a chunk (and MAY answer less than asked)."""
    from nbdbackup.nbd import protocol
    assert protocol.MAX_EXTENTS == 1 << 20
    monkeypatch.setattr(protocol, "MAX_EXTENTS", 3)
    conn = to_transmission(contexts=("base:allocation", "qemu:dirty-bitmap:b0"))
    out = conn.reply_block_status(7, [(0, [(512, 0)] * 5), (1, [(4096, 1)])])
    _, flags, rtype, cookie, length = wire.STRUCTURED_REPLY.unpack_from(out)
    assert (flags, rtype, length) == (0, wire.ReplyType.BLOCK_STATUS, 4 + 3 * 8)
    second = out[wire.STRUCTURED_REPLY_SIZE + length:]
    assert wire.STRUCTURED_REPLY.unpack_from(second)[1:] == (wire.ReplyFlag.DONE, wire.ReplyType.BLOCK_STATUS, 7, 12)


def test_a_non_fixed_newstyle_client_may_send_only_export_name_or_abort():
    """proto.md: in non-fixed newstyle EXPORT_NAME is the only valid option
    (no option reply exists there, so anything else ends the session)."""
    conn = make()
    greet(conn, flags=0)
    feed(conn, wire.pack_option(Opt.LIST))
    assert isinstance(events(conn)[0], ProtocolViolation) and conn.data_to_send() == b""
    conn = make()
    greet(conn, flags=0)
    feed(conn, wire.pack_option(Opt.ABORT))
    assert isinstance(events(conn)[0], Disconnect) and conn.data_to_send() == b""  # no ACK format to use
    conn = make()
    greet(conn, flags=0)
    feed(conn, wire.pack_option(Opt.EXPORT_NAME, b"disk"))
    assert len(conn.data_to_send()) == 134 and isinstance(events(conn)[0], HandshakeDone)


def test_requests_off_the_advertised_minimum_block_size_are_einval():
    """proto.md "Size constraints": the server SHOULD answer EINVAL to a READ
    or WRITE not aligned to the minimum it advertised (the device may not
    be able to do it: a re-exported 4 KiB-sector NBD source)."""
    aligned = ExportInfo("a", 1 << 20, RW_FLAGS, block_size=(512, 4096, 1 << 20))
    conn = ServerConnection(lambda n: aligned if n == "a" else None, lambda: [aligned])
    greet(conn)
    feed(conn, wire.pack_option(Opt.GO, go_payload("a")))
    assert isinstance(events(conn)[-1], HandshakeDone)
    feed(conn, req(Cmd.READ, 256, 512, cookie=1) + req(Cmd.WRITE, 0, 100, cookie=2, payload=bytes(100))
         + req(Cmd.READ, 512, 1024, cookie=3))
    assert [(e.cookie, e.error) for e in events(conn)] == [(1, errno.EINVAL), (2, errno.EINVAL), (3, 0)]


def test_zero_length_requests_are_answered_not_a_reason_to_disconnect():
    """proto.md READ/WRITE/TRIM/WRITE_ZEROES: a length of 0 is unspecified,
    but the server SHOULD NOT disconnect (BLOCK_STATUS: EINVAL, see
    test_request_validation); the server loop answers these with success."""
    conn = to_transmission()
    feed(conn, req(Cmd.READ, 4096, 0, cookie=1) + req(Cmd.WRITE, 4096, 0, cookie=2)
         + req(Cmd.TRIM, 4096, 0, cookie=3) + req(Cmd.WRITE_ZEROES, 4096, 0, cookie=4) + req(Cmd.FLUSH, cookie=5))
    evs = events(conn)
    assert [(type(e), e.cookie, e.error) for e in evs] == [(Request, c, 0) for c in range(1, 6)]
    assert evs[1].payload == b""
