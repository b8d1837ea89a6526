"""Delegable write hooks (`blockdev.live` "Delegable hooks", `bitmap.hook.DirtyHook`).

`bits_all_set` against a brute-force model (hypothesis: random bit arrays,
ranges, shifts); `LiveDev.offload_ok` / `delegations` / `external_writes`
with idle, delegable and plain hooks; `DirtyHook.delegate`: memory bitmaps
and frozen bitmaps are not delegable, disabled and inconsistent ones need
no map, a persistent one gives its file's map, whose bits are the bitmap's;
the registry refuses every change but mark/sync while worker connections
exist, and so does a backup's freeze.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os

import pytest
from hypothesis import given, settings, strategies as st

from nbdbackup.backup.bitmaps import RegistryBitmapSource
from nbdbackup.bitmap.dirty import BitmapError, BitmapRegistry
from nbdbackup.bitmap.hook import BitmapLiveDev
from nbdbackup.bitmap.store import BitmapStore
from nbdbackup.blockdev.live import LiveDev, bits_all_set
from nbdbackup.blockdev.memory import MemoryDev


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 12), st.data())
def test_bits_all_set_matches_a_bit_by_bit_model(raw, shift, data):
    nbits = len(raw) * 8
    size = nbits << shift
    offset = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(0, size - offset))
    if length == 0:
        assert bits_all_set(raw, offset, length, shift)
        return
    first, last = offset >> shift, (offset + length - 1) >> shift
    want = all(raw[i >> 3] >> (i & 7) & 1 for i in range(first, last + 1))
    assert bits_all_set(raw, offset, length, shift) == want
    assert bits_all_set(memoryview(raw), offset, length, shift) == want


def test_bits_all_set_on_full_and_one_hole():
    raw = bytearray(b"\xff" * 16)
    assert bits_all_set(raw, 0, 128 * 512, 9)
    for hole in (0, 7, 8, 63, 64, 127):
        raw2 = bytearray(raw)
        raw2[hole >> 3] &= ~(1 << (hole & 7))
        assert not bits_all_set(raw2, 0, 128 * 512, 9), hole
        assert bits_all_set(raw2, (hole + 1) * 512, (127 - hole) * 512, 9) or hole == 127


class Idle:
    def __init__(self):
        self.on = True

    async def before_write(self, o, n): ...

    async def on_durable(self): ...

    def idle(self):
        return self.on


class Delegable(Idle):
    def __init__(self, maps):
        super().__init__()
        self.on = False
        self.maps = maps
        self.writes = []
        self.durable = 0

    def delegate(self):
        return self.maps

    def external_write(self, o, n):
        self.writes.append((o, n))

    def external_durable(self):
        self.durable += 1


class Plain:
    async def before_write(self, o, n): ...

    async def on_durable(self): ...


def test_offload_ok_and_delegations():
    live = LiveDev(MemoryDev(1 << 20))
    assert live.offload_ok() and live.delegations() == [] and not live.delegated()
    idle = Idle()
    live.add_hook(idle)
    assert live.offload_ok() and live.delegations() == [] and not live.delegated()
    d = Delegable([(3, 4096, 16, 16)])
    live.add_hook(d)
    assert live.offload_ok() and live.delegations() == [(3, 4096, 16, 16)] and live.delegated()
    live.external_writes([(0, 10), (100, 5)])
    live.external_durable()
    assert d.writes == [(0, 10), (100, 5)] and d.durable == 1
    d.maps = None  # not delegable now: no hand-off, and an external write is refused
    assert not live.offload_ok() and live.delegations() is None
    with pytest.raises(OSError) as e:
        live.external_writes([(0, 1)])
    assert e.value.errno == errno.EIO and d.writes == [(0, 10), (100, 5)]
    d.maps = []
    assert live.offload_ok() and live.delegations() == [] and live.delegated()
    p = Plain()
    live.add_hook(p)
    assert not live.offload_ok()
    live.remove_hook(p)
    idle.on = False  # an idle hook that is no longer idle and cannot be delegated
    assert not live.offload_ok()


def test_dirty_hook_delegates_persistent_recording_bitmaps_only(short_tmp):
    size = 8 << 20
    store = BitmapStore(str(short_tmp / "state"))
    reg = BitmapRegistry("disk", size, store)
    live = BitmapLiveDev(MemoryDev(size), reg)
    hook = live.hook
    assert hook.idle() and live.offload_ok() and not live.delegated()
    reg.add("p", 65536, persistent=True)
    (spec,) = hook.delegate()
    fd, off, nbits, shift = spec
    assert (nbits, shift) == (128, 16) and live.offload_ok() and live.delegated()
    # The map another process reads is the bitmap's own bits.
    mm = mmap.mmap(os.dup(fd), 0, mmap.MAP_SHARED, mmap.PROT_READ)
    bits = memoryview(mm)[off:off + 16]
    assert not bits_all_set(bits, 65536 * 5, 100, shift)
    live.external_writes([(65536 * 5 + 10, 100)])
    assert bits_all_set(bits, 65536 * 5, 100, shift)
    assert reg.get("p").dirty_ranges() == [(65536 * 5, 65536)]
    reg.add("d", persistent=True, disabled=True)
    assert len(hook.delegate()) == 1  # a disabled bitmap records nothing: nothing to check
    reg.add("m")  # a memory bitmap: no map another process can read
    assert hook.delegate() is None and not live.offload_ok()
    reg.remove("m")
    assert live.offload_ok()
    # A frozen bitmap (a job): not delegable.
    succ = reg.get("p").freeze("on-success")
    assert succ is not None and hook.delegate() is None
    reg.get("p").finish(True)
    assert hook.delegate() is not None
    del bits
    mm.close()
    reg.close()


def test_no_bitmap_change_nor_freeze_while_worker_connections_exist(short_tmp):
    size = 8 << 20
    store = BitmapStore(str(short_tmp / "state"))
    reg = BitmapRegistry("disk", size, store)
    live = BitmapLiveDev(MemoryDev(size), reg)
    reg.add("p", persistent=True)
    reg.add("q", persistent=True)
    live.attach_external()  # a connection in a worker
    for change in (lambda: reg.add("r", persistent=True), lambda: reg.remove("q"),
                   lambda: reg.clear("p"), lambda: reg.disable("p"), lambda: reg.enable("p"),
                   lambda: reg.rename("q", "s"), lambda: reg.merge("p", ["q"]),
                   lambda: RegistryBitmapSource(lambda e: reg).begin_backup("disk", "p", "on-success",
                                                                            65536, 128)):
        with pytest.raises(BitmapError, match="not recalled"):
            change()
    assert sorted(b.name for b in reg) == ["p", "q"] and not reg.get("p").busy
    reg.mark(0, 1)  # marking and syncing are what workers ask for
    reg.sync()
    live.detach_external()
    reg.clear("p")
    reg.close()
    asyncio.run(live.inner.close())
