"""Many libnbd clients, many requests in flight each, one `nbdbackup serve` export.

Eight clients (one thread and one libnbd handle each) own disjoint regions of
a file export.  Each client runs rounds of random aio writes (sizes from 1
byte to 256 KiB, unaligned too, plus FUA and write-zeroes) with up to 32
requests in flight, on non-overlapping slots within a round (the order of
overlapping in-flight writes is undefined by the protocol), interleaved with
aio reads of slots not being written, checked against the client's model.
At the end the whole image, read back through the server and from the file
after a clean shutdown, must match the concatenated models (blake3).
"""

from __future__ import annotations

import random
import threading

import blake3
import pytest


nbd = pytest.importorskip("nbd")

pytestmark = pytest.mark.interop

KiB, MiB = 1024, 1024 * 1024
CLIENTS = 8
REGION = 4 * MiB
SLOT = 256 * KiB
ROUNDS = 24
IN_FLIGHT = 32


def client_run(uri: str, index: int, model: bytearray, errors: list) -> None:
    try:
        rnd = random.Random(1000 + index)
        base = index * REGION
        h = nbd.NBD()
        h.connect_uri(uri)
        nslots = REGION // SLOT
        for _ in range(ROUNDS):
            slots = rnd.sample(range(nslots), k=nslots)
            write_slots, read_slots = slots[:IN_FLIGHT // 2], slots[IN_FLIGHT // 2:IN_FLIGHT]
            pending = []  # (cookie, kind, offset, expected bytes or None, buffer)
            for slot in write_slots:
                length = rnd.choice([1, 17, 512, 4096, 65536, 100_000, SLOT])
                start = slot * SLOT + rnd.randrange(0, SLOT - length + 1)
                kind = rnd.random()
                if kind < 0.15:
                    cookie = h.aio_zero(length, base + start,
                                        flags=nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0)
                    model[start:start + length] = bytes(length)
                else:
                    data = rnd.randbytes(length)
                    flags = nbd.CMD_FLAG_FUA if kind > 0.9 else 0
                    cookie = h.aio_pwrite(data, base + start, flags=flags)
                    model[start:start + length] = data
                pending.append((cookie, None, None))
            for slot in read_slots:
                buf = nbd.Buffer(SLOT)
                cookie = h.aio_pread(buf, base + slot * SLOT)
                pending.append((cookie, buf, bytes(model[slot * SLOT:(slot + 1) * SLOT])))
            assert h.aio_in_flight() > 1, "requests were not in flight together"
            for cookie, buf, want in pending:
                while not h.aio_command_completed(cookie):
                    h.poll(-1)
                if buf is not None:
                    got = buf.to_bytearray()
                    assert got == want, f"client {index}: read mismatch"
        h.flush()
        # Final check of the whole region through this connection.
        for off in range(0, REGION, 1 * MiB):
            assert h.pread(1 * MiB, base + off) == model[off:off + 1 * MiB], f"client {index} at {off}"
        h.shutdown()
    except BaseException as e:  # reported by the main thread
        errors.append((index, repr(e)))


def test_eight_clients_random_aio(short_tmp, serve, blake3_file):
    size = CLIENTS * REGION
    image = short_tmp / "disk.img"
    rnd = random.Random(7)
    initial = bytearray(rnd.randbytes(size))
    image.write_bytes(initial)
    models = [bytearray(initial[i * REGION:(i + 1) * REGION]) for i in range(CLIENTS)]
    errors: list = []
    with serve(f"disk={image}") as srv:
        uri = srv.uri_for("disk")
        threads = [threading.Thread(target=client_run, args=(uri, i, models[i], errors))
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert not errors, errors
        expected = blake3.blake3(b"".join(models)).hexdigest()
        h = nbd.NBD()
        h.connect_uri(uri)
        got = blake3.blake3()
        for off in range(0, size, 4 * MiB):
            got.update(h.pread(4 * MiB, off))
        h.shutdown()
        assert got.hexdigest() == expected
        assert srv.alive(), srv.log()
    assert srv.returncode == 0, srv.log()
    assert blake3_file(image) == expected


def test_many_connections_at_once(serve):
    """64 simultaneous connections to a memory export, each writes then reads its block."""
    with serve("mem=memory:4M") as srv:
        handles = []
        for i in range(64):
            h = nbd.NBD()
            h.connect_uri(srv.uri_for("mem"))
            handles.append(h)
        cookies = [h.aio_pwrite(bytes([i]) * 4096, i * 65536) for i, h in enumerate(handles)]
        for h, c in zip(handles, cookies):
            while not h.aio_command_completed(c):
                h.poll(-1)
        for i, h in enumerate(handles):
            j = (i + 1) % 64  # read a block another connection wrote
            assert h.pread(4096, j * 65536) == bytes([j]) * 4096
        for h in handles:
            h.shutdown()
        assert srv.alive(), srv.log()
