"""Damaged, foreign or power-lost bitmap files load as inconsistent; good ones load complete.

Each case builds a store with one persistent bitmap ("b", some bits set),
closes it, damages the file, and reloads.  Power loss is simulated by
changing the store's idea of the boot id (the only thing that distinguishes
a power loss from a process death at load time).
"""

from __future__ import annotations

import os

import pytest

from nbdbackup.bitmap.dirty import BitmapError, BitmapRegistry
from nbdbackup.bitmap.store import (
    DATA_OFFSET,
    SLOTS,
    STATE_CLEAN,
    STATE_DIRTY,
    STATE_SYNCED,
    BitmapStore,
    read_header,
)

SIZE = 100 * 65536 + 1000
MARKS = [(0, 1), (65536 * 7 + 5, 200000), (SIZE - 10, 10)]


def make(root: str, *, close: bool = True, sync: bool = False) -> tuple[BitmapStore, BitmapRegistry, str]:
    store = BitmapStore(root)
    reg = BitmapRegistry("exp", SIZE, store)
    bm = reg.add("b", 65536, persistent=True)
    for off, length in MARKS:
        reg.mark(off, length)
    if sync:
        reg.sync()
    path = bm.store_path
    assert path is not None
    if close:
        reg.close()
    return store, reg, path


def reload(root: str, *, boot_id: bytes | None = None, size: int = SIZE) -> BitmapRegistry:
    store = BitmapStore(root)
    if boot_id is not None:
        store.boot_id = boot_id
    return BitmapRegistry("exp", size, store)


def die(store: BitmapStore) -> None:
    """Simulate the death of the process using ``store``: drop its locks,
    write nothing (its mapped pages stay in the page cache, as after kill -9)."""
    for _, lock, _ in store._exports.values():
        os.close(lock)
    store._exports.clear()


def state_of(path: str) -> int:
    with open(path, "rb") as f:
        return read_header(f.read(DATA_OFFSET)).state


def assert_complete(reg: BitmapRegistry) -> None:
    bm = reg.get("b")
    assert not bm.inconsistent, bm.inconsistent_reason
    assert bm.dirty_ranges() == [(0, 65536), (65536 * 7, 4 * 65536), (100 * 65536, 1000)]


def assert_inconsistent(reg: BitmapRegistry, name: str = "b") -> None:
    bms = reg.list()
    assert len(bms) == 1
    bm = bms[0]
    assert bm.inconsistent and bm.inconsistent_reason
    if name:
        assert bm.name == name
    assert not bm.recording
    # Refused for everything but removal.
    with pytest.raises(BitmapError):
        bm.extents(0, 10)
    with pytest.raises(BitmapError):
        reg.clear(bm.name)
    with pytest.raises(BitmapError):
        bm.freeze()
    bm.mark(0, 100)  # silently not recorded
    path = bm.store_path
    reg.remove(bm.name)
    assert not os.path.exists(path)
    assert len(reg) == 0


def test_clean_close_reload(short_tmp) -> None:
    _, _, path = make(short_tmp)
    assert state_of(path) == STATE_CLEAN
    reg = reload(short_tmp, boot_id=b"\x01" * 16)  # even after a reboot
    assert_complete(reg)
    assert state_of(path) == STATE_SYNCED  # open again: in use
    reg.close()


def test_header_states_follow_marks_and_syncs(short_tmp) -> None:
    store, reg, path = make(short_tmp, close=False)
    assert state_of(path) == STATE_DIRTY  # marks happened after the last sync
    reg.sync()
    assert state_of(path) == STATE_SYNCED
    reg.mark(0, 1)  # bit already set: still "set" from the store's view
    assert state_of(path) == STATE_DIRTY
    reg.sync()
    reg.close()
    assert state_of(path) == STATE_CLEAN


def test_process_death_same_boot_is_complete(short_tmp) -> None:
    # Not closed (like kill -9): the header says in-use-dirty, same boot.
    store, reg, path = make(short_tmp, close=False)
    assert state_of(path) == STATE_DIRTY
    die(store)
    reg2 = reload(short_tmp)
    assert_complete(reg2)
    reg2.close()


def test_power_loss_with_unsynced_marks_is_inconsistent(short_tmp) -> None:
    _, reg, path = make(short_tmp, close=False)
    die(reg.store)
    assert_inconsistent(reload(short_tmp, boot_id=b"\x02" * 16))


def test_power_loss_after_sync_is_complete(short_tmp) -> None:
    _, reg, path = make(short_tmp, close=False, sync=True)
    assert state_of(path) == STATE_SYNCED
    die(reg.store)
    reg2 = reload(short_tmp, boot_id=b"\x02" * 16)
    assert_complete(reg2)
    reg2.close()


def test_unknown_boot_id_with_unsynced_marks_is_inconsistent(short_tmp) -> None:
    _, reg, _ = make(short_tmp, close=False)
    die(reg.store)
    assert_inconsistent(reload(short_tmp, boot_id=bytes(16)))


@pytest.mark.parametrize("cut", [0, 10, 89, 100, 3000, DATA_OFFSET, DATA_OFFSET + 8])
def test_truncated_file(short_tmp, cut: int) -> None:
    _, _, path = make(short_tmp)
    os.truncate(path, cut)
    assert_inconsistent(reload(short_tmp), name="" if cut < 91 else "b")


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


HEADER_BYTES = [0, 7, 8, 12, 16, 20, 24, 33, 40, 48, 56, 64, 72, 80, 88, 90]


@pytest.mark.parametrize("offset", HEADER_BYTES)
def test_flipped_byte_in_both_slots(short_tmp, offset: int) -> None:
    _, _, path = make(short_tmp)
    for at in SLOTS:
        flip(path, at + offset)
    # The CRC catches it (or the magic check does first).
    assert_inconsistent(reload(short_tmp), name="")


def newest_slot(path: str) -> int:
    with open(path, "rb") as f:
        return read_header(f.read(DATA_OFFSET)).slot


@pytest.mark.parametrize("synced", [False, True])
@pytest.mark.parametrize("offset", [12, 16, 64, 90])
def test_torn_state_update_falls_back_to_the_other_slot(short_tmp, synced: bool, offset: int) -> None:
    """An in-place state update torn by a crash (here: the newest slot
    damaged) leaves the previous state, which is the truth: the update was
    not complete, so nothing that relied on it happened."""
    store, reg, path = make(short_tmp, close=False, sync=synced)
    # Newest: synced (after sync) or dirty (after the marks).  Tear it.
    want = STATE_SYNCED if synced else STATE_DIRTY
    assert state_of(path) == want
    die(store)
    flip(path, SLOTS[newest_slot(path)] + offset)
    older = state_of(path)
    assert older != want  # fell back to the previous slot
    # After a reboot: the older slot is "dirty" when the torn update was the
    # sync's -> inconsistent; "synced" when it was the first mark's -> complete.
    reg2 = reload(short_tmp, boot_id=b"\x03" * 16)
    if older == STATE_DIRTY:
        assert_inconsistent(reg2)
    else:
        # The marks in make() happened after the (torn) dirty update in this
        # simulation, which real code never does (bits are set only after the
        # dirty state is durable); so only check the bitmap loads.
        assert not reg2.get("b").inconsistent
        reg2.close()


def rewrite_header(path: str, **changes) -> None:
    with open(path, "r+b") as f:
        h = read_header(f.read(DATA_OFFSET))
        for k, v in changes.items():
            setattr(h, k, v)
        for at in SLOTS:
            f.seek(at)
            f.write(h.pack())


def test_unknown_version_with_valid_crc(short_tmp) -> None:
    _, _, path = make(short_tmp)
    rewrite_header(path, version=2)
    assert_inconsistent(reload(short_tmp), name="")


def test_unknown_state_with_valid_crc(short_tmp) -> None:
    _, _, path = make(short_tmp)
    rewrite_header(path, state=9)
    assert_inconsistent(reload(short_tmp), name="")


def test_other_disk_size(short_tmp) -> None:
    make(short_tmp)
    assert_inconsistent(reload(short_tmp, size=SIZE + 65536))


def test_interrupted_rewrite_leaves_old_file(short_tmp) -> None:
    _, _, path = make(short_tmp)
    with open(path + ".tmp", "wb") as f:
        f.write(b"half a file")
    reg = reload(short_tmp)
    assert_complete(reg)
    assert not os.path.exists(path + ".tmp")
    reg.close()


def test_metadata_changes_survive_and_are_atomic(short_tmp) -> None:
    calls: list[int] = []
    store = BitmapStore(short_tmp, fsync=lambda fd: (calls.append(fd), os.fsync(fd)))
    reg = BitmapRegistry("exp", SIZE, store)
    reg.add("b", 65536, persistent=True)
    reg.add("mem", 65536)  # not persistent: not in the store
    for off, length in MARKS:
        reg.mark(off, length)
    n = len(calls)
    reg.disable("b")
    assert len(calls) >= n + 2, "rewrite must fsync the file and the directory"
    reg.mark(65536 * 50, 1)  # not recording: ignored
    reg.rename("b", "c")
    reg.close()
    reg = reload(short_tmp)
    assert [b.name for b in reg] == ["c"]
    c = reg.get("c")
    assert not c.recording
    assert c.dirty_count() == 65536 + 4 * 65536 + 1000
    reg.enable("c")
    reg.clear("c")
    reg.mark(65536 * 3, 10)
    reg.close()
    reg = reload(short_tmp)
    assert reg.get("c").dirty_ranges() == [(65536 * 3, 65536)] and reg.get("c").recording
    reg.remove("c")
    reg.close()
    assert len(reload(short_tmp)) == 0


def test_one_process_per_export(short_tmp) -> None:
    store, reg, _ = make(short_tmp, close=False)
    with pytest.raises(BitmapError):
        reload(short_tmp)
    reg.close()
    reload(short_tmp).close()


def test_persistent_needs_store() -> None:
    reg = BitmapRegistry("exp", SIZE)
    with pytest.raises(BitmapError):
        reg.add("p", persistent=True)
