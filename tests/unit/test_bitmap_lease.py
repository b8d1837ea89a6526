"""`backup.bitmaps.RegistryBitmapSource`: what the backup engine gets for ``bitmap=NAME``."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from nbdbackup.bitmap.core import Bitmap
from nbdbackup.bitmap.dirty import BitmapRegistry
from nbdbackup.backup.bitmaps import RegistryBitmapSource as RegistrySource
from nbdbackup.errors import NBDBackupError

G = 4096
CS = 65536
SIZE = 10 * CS + 100


def setup() -> tuple[BitmapRegistry, RegistrySource]:
    reg = BitmapRegistry("e", SIZE)
    reg.add("b", G)
    reg.mark(CS + 5, 10)         # cluster 1
    reg.mark(3 * CS, 2 * CS)     # clusters 3, 4
    reg.mark(10 * CS, 1)         # last, short cluster 10
    return reg, RegistrySource(lambda name: reg if name == "e" else None)


def test_clusters_context_and_refusals() -> None:
    reg, src = setup()
    with pytest.raises(NBDBackupError):
        src.begin_backup("nope", "b", "on-success", CS, 11)
    with pytest.raises(NBDBackupError):
        src.begin_backup("e", "nope", "on-success", CS, 11)
    lease = src.begin_backup("e", "b", "on-success", CS, 11)
    assert [i for i in range(11) if lease.clusters.get(i)] == [1, 3, 4, 10]
    with pytest.raises(NBDBackupError):
        src.begin_backup("e", "b", "on-success", CS, 11)  # busy
    reg.mark(0, 1)  # after the freeze: not in the snapshot's context
    name, provider = lease.context
    assert name == "qemu:dirty-bitmap:b"
    ext = asyncio.run(provider(0, 2 * CS))
    assert [(e.offset, e.length, e.flags) for e in ext] == [(0, CS, 0), (CS, G, 1), (CS + G, CS - G, 0)]
    asyncio.run(lease.end(False))
    asyncio.run(lease.end(False))  # idempotent
    b = reg.get("b")
    assert not b.busy and b.get(0) and b.get(CS)


class Target:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    async def flush(self) -> None:
        if self.fail:
            raise OSError(5, "flush failed")


@pytest.mark.parametrize("success,flush_fails", [(True, False), (False, False), (False, True)])
def test_always_mode_keeps_only_uncopied_and_new(success: bool, flush_fails: bool) -> None:
    reg, src = setup()
    lease = src.begin_backup("e", "b", "always", CS, 11)
    done = Bitmap(11)
    done.set(3)  # copied cluster 3 only
    lease.bind(SimpleNamespace(done=done, in_target=done, ignored=Bitmap(11), target=Target(flush_fails),
                               span=lambda s, n: (s * CS, min((s + n) * CS, SIZE) - s * CS)))
    reg.mark(3 * CS + 100, 1)  # written after the freeze
    asyncio.run(lease.end(success))
    b = reg.get("b")
    assert not b.busy
    if success:
        assert b.dirty_ranges() == [(3 * CS, G)]
    elif flush_fails:  # nothing forgotten
        assert b.dirty_ranges() == [(CS, G), (3 * CS, 2 * CS), (10 * CS, 100)]
    else:
        assert b.dirty_ranges() == [(CS, G), (3 * CS, G), (4 * CS, CS), (10 * CS, 100)]
