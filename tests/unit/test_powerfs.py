"""The forgetful file system's model (tests/powerfs.py `Model`), without FUSE: what a power cut
keeps and drops.  (The mounted daemon is checked in tests/interop/test_powercut.py.)"""

from __future__ import annotations

import os

import pytest

from powerfs import PAGE, Model


def content(backing, name: str) -> bytes:
    with open(os.path.join(backing, name), "rb") as f:
        return f.read()


@pytest.fixture
def fs(tmp_path):
    backing = tmp_path / "backing"
    backing.mkdir()
    return Model(str(backing)), str(backing)


def made_durable(m: Model, name: str, data: bytes) -> int:
    fh = m.create("/" + name, 0o644)
    m.write(fh, data, 0)
    m.fsync(fh)
    m.fsyncdir("/")
    return fh


def test_unsynced_write_is_visible_then_lost_at_cut_p0(fs):
    m, backing = fs
    fh = made_durable(m, "f", b"A" * 2 * PAGE)
    m.write(fh, b"B" * 10, PAGE + 5)
    assert m.read(fh, 2 * PAGE, 0) == b"A" * (PAGE + 5) + b"B" * 10 + b"A" * (PAGE - 15)
    assert content(backing, "f") == b"A" * 2 * PAGE  # BACKING holds only the durable
    m.cut(0.0, 1)
    assert content(backing, "f") == b"A" * 2 * PAGE


def test_fsync_makes_a_write_survive(fs):
    m, backing = fs
    fh = made_durable(m, "f", b"A" * PAGE)
    m.write(fh, b"C" * PAGE, PAGE)
    m.fsync(fh)
    m.cut(0.0, 1)
    assert content(backing, "f") == b"A" * PAGE + b"C" * PAGE


def test_cut_keeps_a_seeded_subset_of_pages(fs):
    m, backing = fs
    fh = made_durable(m, "f", bytes(64 * PAGE))
    for i in range(64):
        m.write(fh, bytes([i + 1]) * PAGE, i * PAGE)
    m.cut(0.5, 7)
    got = content(backing, "f")
    kept = [i for i in range(64) if got[i * PAGE:(i + 1) * PAGE] == bytes([i + 1]) * PAGE]
    lost = [i for i in range(64) if got[i * PAGE:(i + 1) * PAGE] == bytes(PAGE)]
    assert len(kept) + len(lost) == 64 and 10 < len(kept) < 54


def test_truncate_then_grow_reads_zeroes_and_is_lost_unsynced(fs):
    m, backing = fs
    fh = made_durable(m, "f", b"A" * 3 * PAGE)
    m.truncate(None, 100, fh)
    m.truncate(None, 3 * PAGE, fh)
    assert m.read(fh, 3 * PAGE, 0) == b"A" * 100 + bytes(3 * PAGE - 100)
    m.cut(0.0, 1)
    assert content(backing, "f") == b"A" * 3 * PAGE


def test_rename_without_fsyncdir_can_vanish(fs):
    m, backing = fs
    fh = made_durable(m, "old", b"x" * 10)
    made_durable(m, "new", b"y" * 10)
    fh2 = m.create("/tmp1", 0o644)
    m.write(fh2, b"z" * 10, 0)
    m.fsync(fh2)  # data durable, its name not
    m.rename("/tmp1", "/new")
    m.unlink("/old")
    assert sorted(os.listdir(backing)) == [".powerfs", "new"]
    m.cut(0.0, 1)
    assert sorted(os.listdir(backing)) == [".powerfs", "new", "old"]
    assert content(backing, "new") == b"y" * 10 and content(backing, "old") == b"x" * 10
    assert os.listdir(os.path.join(backing, ".powerfs")) == []


def test_fsyncdir_makes_rename_and_unlink_durable(fs):
    m, backing = fs
    made_durable(m, "old", b"x")
    fh = m.create("/tmp1", 0o644)
    m.write(fh, b"z", 0)
    m.fsync(fh)
    m.rename("/tmp1", "/new")
    m.unlink("/old")
    m.fsyncdir("/")
    m.cut(0.0, 1)
    assert sorted(os.listdir(backing)) == [".powerfs", "new"] and content(backing, "new") == b"z"


def test_fsyncdir_makes_durable_only_its_own_directory(fs):
    m, backing = fs
    m.mkdir("/a", 0o755)
    m.mkdir("/b", 0o755)
    m.fsyncdir("/")
    fh = m.create("/a/f", 0o644)
    m.fsync(fh)
    m.create("/b/g", 0o644)
    m.fsyncdir("/a")  # /a/f durable; /b/g not: only the operations touching /a
    m.cut(0.0, 1)
    assert os.listdir(os.path.join(backing, "a")) == ["f"] and os.listdir(os.path.join(backing, "b")) == []


def test_undone_mkdir_drops_what_is_inside(fs):
    m, backing = fs
    m.mkdir("/d", 0o755)
    fh = m.create("/d/f", 0o644)
    m.write(fh, b"data", 0)
    m.fsync(fh)
    m.fsyncdir("/d")  # fsynced, and its name in /d too ...
    m.cut(0.0, 1)  # ... but /d's own entry in / never was
    assert os.listdir(backing) == [".powerfs"]


def test_undo_leaves_a_name_that_now_holds_something_else(fs):
    m, backing = fs
    made_durable(m, "f", b"old")
    for i, data in enumerate([b"one", b"two"]):
        fh = m.create(f"/t{i}", 0o644)
        m.write(fh, data, 0)
        m.fsync(fh)
        m.rename(f"/t{i}", "/f")
    m.cut(0.0, 1)  # both renames undone: f is the durable old one, no t0/t1 left
    assert sorted(os.listdir(backing)) == [".powerfs", "f"] and content(backing, "f") == b"old"
