"""Hostile NBD clients, run as their own process by the interop tests.

``python hostile.py (--tcp HOST:PORT | --unix PATH) --export NAME
[--idle N] [--handshake N] [--payload N] [--payload-size BYTES]
[--payload-sent BYTES] [--greeting-timeout S]``

Opens every connection at once and plays one script per kind:

- ``idle``: the handshake (NBD_OPT_EXPORT_NAME), then nothing;
- ``handshake``: the client flags and half an option header, then nothing;
- ``payload``: the handshake, a WRITE header declaring ``--payload-size``
  bytes and only ``--payload-sent`` of them, then nothing.

When every script has finished (or waited ``--greeting-timeout`` s for the
greeting), one JSON line goes to stdout: ``ok`` (per kind, scripts
completed), ``refused`` (closed by the server before or during the script),
``held`` (no greeting yet: the server holds them for admission).  The
connections then stay open until stdin closes; a second JSON line tells
how many of the completed ones the server closed meanwhile
(``closed_by_server``, and per kind ``closed_by_kind``) and how many are
still open.

A separate process so that its sockets do not count against the test's
file-descriptor limit; it raises its own soft RLIMIT_NOFILE.  The wire
layout is written out from proto.md, independent of nbdbackup.nbd.wire.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import struct
import sys

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
OPT_EXPORT_NAME = 1
CMD_WRITE = 1


async def _connect(args):
    if args.unix:
        return await asyncio.open_unix_connection(args.unix)
    host, _, port = args.tcp.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def one(kind: str, args, held: list) -> tuple[str, object]:
    """Play one script; (outcome, writer)."""
    try:
        reader, writer = await _connect(args)
    except OSError:
        return "refused", None
    try:
        try:
            greeting = await asyncio.wait_for(reader.readexactly(18), args.greeting_timeout)
        except asyncio.TimeoutError:
            held.append(writer)
            return "held", (reader, writer)
        magic, opt, _flags = struct.unpack(">QQH", greeting)
        assert magic == NBDMAGIC and opt == IHAVEOPT
        writer.write(struct.pack(">I", 3))  # C_FIXED_NEWSTYLE | C_NO_ZEROES
        if kind == "handshake":
            writer.write(struct.pack(">Q", IHAVEOPT))  # half an option header
            await writer.drain()
            return "ok", (reader, writer)
        name = args.export.encode()
        writer.write(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(10), 10)  # size, transmission flags
        if kind == "payload":
            writer.write(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, args.payload_size))
            writer.write(b"\xa5" * args.payload_sent)
            try:  # the server may stop reading (memory back-pressure): that is fine
                await asyncio.wait_for(writer.drain(), args.greeting_timeout)
            except asyncio.TimeoutError:
                pass
        return "ok", (reader, writer)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        writer.close()
        return "refused", None


def closed(reader) -> bool:
    """True when the server closed this connection (the loop kept reading it)."""
    return reader.at_eof() or reader.exception() is not None


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tcp")
    ap.add_argument("--unix")
    ap.add_argument("--export", default="")
    ap.add_argument("--idle", type=int, default=0)
    ap.add_argument("--handshake", type=int, default=0)
    ap.add_argument("--payload", type=int, default=0)
    ap.add_argument("--payload-size", type=int, default=32 * 1024 * 1024)
    ap.add_argument("--payload-sent", type=int, default=4096)
    ap.add_argument("--greeting-timeout", type=float, default=3.0)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    kinds = ["idle"] * args.idle + ["handshake"] * args.handshake + ["payload"] * args.payload
    held: list = []
    results = await asyncio.gather(*(one(k, args, held) for k in kinds))
    ok: dict[str, int] = {}
    conns = []
    for kind, (outcome, rw) in zip(kinds, results):
        if outcome == "ok":
            ok[kind] = ok.get(kind, 0) + 1
            conns.append(rw)
    report = {"ok": ok, "refused": sum(1 for o, _ in results if o == "refused"), "held": len(held)}
    print(json.dumps(report), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    ok_kinds = [kind for kind, (outcome, _) in zip(kinds, results) if outcome == "ok"]
    by_kind: dict[str, int] = {}
    for kind, (r, _) in zip(ok_kinds, conns):
        if closed(r):
            by_kind[kind] = by_kind.get(kind, 0) + 1
    n_closed = sum(by_kind.values())
    print(json.dumps({"closed_by_server": n_closed, "still_open": len(conns) - n_closed,
                      "closed_by_kind": by_kind}), flush=True)
    for _, w in conns:
        w.close()
    for w in held:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
