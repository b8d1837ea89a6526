"""Key files written outside the repository are durable (`crypto.write_private`).

A ``keyfile`` repository's key file, or a key exported ``--kdf none`` for unattended agent runs,
lives outside the repository; a power cut right after writing it lost it
(tests/interop/test_powercut_agent.py).  The directory fsyncs are recorded; a temporary directory.
"""

from __future__ import annotations


def test_write_private_makes_the_key_file_name_and_new_directories_durable(tmp_path, monkeypatch):
    """`crypto.write_private` (key files outside the repository): the file's directory is fsynced
    after the rename, and each directory it creates in its parent (a power cut right after
    ``repo key export`` lost the key file before: tests/interop/test_powercut_agent.py)."""
    from nbdbackup import durable
    from nbdbackup.agent import crypto

    synced: list[str] = []
    real = durable.fsync_dir
    monkeypatch.setattr(durable, "fsync_dir", lambda d: (synced.append(str(d)), real(d)))
    key = tmp_path / "a" / "b" / "key"
    crypto.write_private(str(key), b"secret")
    assert key.read_bytes() == b"secret"
    assert synced[-1] == str(tmp_path / "a" / "b"), synced  # the name, after the rename
    assert {str(tmp_path), str(tmp_path / "a")} <= set(synced), synced  # the new directories' entries
