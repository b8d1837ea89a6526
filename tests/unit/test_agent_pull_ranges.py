"""``pull(dirty=RANGES)`` (the backup agent's incremental, dirty set read elsewhere) equals
``pull(bitmap=NAME)`` over the same dirty clusters: same target bytes, same manifest, same
bytes read -- and with SINK and a read-only base it stores the same chunks.  In memory, no I/O."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdbackup.agent.pull import manifest_of, pull
from nbdbackup.blockdev.memory import MemoryDev
from test_agent_pull_model import CL, DirtySource, disk_bytes


def ranges(dirty: set[int], size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for c in sorted(dirty):
        o, n = c * CL, min(CL, size - c * CL)
        if out and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((o, n))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ncl=st.integers(1, 24), chunk=st.sampled_from([CL, 2 * CL, 4 * CL]),
       writes=st.lists(st.tuples(st.integers(0, 23), st.integers(0, 255), st.booleans()), max_size=10),
       extra=st.sets(st.integers(0, 23), max_size=3))
def test_dirty_ranges_equal_the_bitmap_context(ncl, chunk, writes, extra):
    size = ncl * CL

    async def main() -> None:
        a = MemoryDev(size)
        a.write_sync(b"\x01" * size, 0)
        t1, t2 = MemoryDev(size), MemoryDev(size)
        base, _ = await pull(DirtySource(a, set()), t1, fresh=True, chunk_size=chunk)
        await pull(DirtySource(a, set()), t2, fresh=True, chunk_size=chunk)
        dirty = {x % ncl for x in extra}
        for c, byte, zero in writes:
            c %= ncl
            if zero:
                a.zero_sync(c * CL, CL)
            else:
                a.write_sync(bytes([byte]) * 100, c * CL + 7)
            dirty.add(c)
        m1, s1 = await pull(DirtySource(a, dirty), t1, bitmap="b", chunk_size=chunk, base=base)
        m2, s2 = await pull(a, t2, dirty=ranges(dirty, size), chunk_size=chunk, base=base)
        assert disk_bytes(t1) == disk_bytes(t2) == disk_bytes(a)
        assert m1.chunks == m2.chunks == (await manifest_of(a, chunk)).chunks
        assert s1.bytes_read == s2.bytes_read and s1.chunks_worked == s2.chunks_worked
        # The agent's form: the base is only read, chunks go to a sink.
        stored: dict[int, bytes] = {}

        async def sink(i, d, data):
            stored[i] = d

        m3, s3 = await pull(a, t2, dirty=ranges(dirty, size), chunk_size=chunk, base=base, sink=sink)
        assert m3.chunks == m1.chunks and s3.bytes_read == s1.bytes_read
        assert sorted(stored) == sorted({o // chunk for o, n in ranges(dirty, size)
                                         for o in range(o, o + n, CL)})

    asyncio.run(main())
