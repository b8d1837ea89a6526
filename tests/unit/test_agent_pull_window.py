"""`agent.pull.default_window`: 8 chunks in flight on a short link, `IN_FLIGHT` bytes of them
when the source is a remote export a long round trip away (one 4 KiB block status timed)."""

from __future__ import annotations

import asyncio

import pytest

from nbdbackup.agent import pull


class _Remote:
    """What `default_window` looks at of an NBD source: ``clients``, ``size``,
    ``meta_contexts``, ``extents`` (one request, no data: read counts stay exact)."""

    def __init__(self, rtt: float, size: int = 1 << 30) -> None:
        self.clients, self.size, self.rtt, self.reads = [object()], size, rtt, 0

    def meta_contexts(self) -> list[str]:
        return ["base:allocation"]

    async def extents(self, offset: int, length: int, context: str) -> list:
        assert (offset, context) == (0, "base:allocation") and length <= 4096
        self.reads += 1
        await asyncio.sleep(self.rtt)
        return []


class _Local:
    size = 1 << 30

    async def extents(self, offset: int, length: int, context: str) -> list:  # pragma: no cover
        raise AssertionError("a local source needs no probe")


@pytest.mark.parametrize("rtt,chunk,want", [
    (0.0, 1 << 20, 8), (0.0, 4 << 20, 8),            # a short link: 8, whatever the chunk size
    (0.02, 1 << 20, 32), (0.02, 4 << 20, 8),         # a long one: 32 MiB of chunks, at least 8
    (0.02, 64 << 10, 512),
])
def test_the_round_trip_decides(rtt, chunk, want):
    src = _Remote(rtt)
    assert asyncio.run(pull.default_window(src, chunk)) == want
    assert src.reads == 1


def test_a_local_source_is_not_probed():
    assert asyncio.run(pull.default_window(_Local(), 1 << 20)) == 8


def test_an_error_reply_to_the_probe_is_no_measure():
    class _Refusing(_Remote):
        async def extents(self, offset, length, context):
            raise OSError(22, "Invalid argument")

    assert asyncio.run(pull.default_window(_Refusing(0.02), 1 << 20)) == 8
