"""Making names durable: directory fsyncs for files and directories that must survive a power loss.

Role: the few lines every durable writer needs beyond the file's own fsync -- its name is
durable only once the directory holding it is fsynced, and a directory made now only once its
parent is (POSIX promises no more; ext4's journal often hides the difference, a file system that
honours each fsync alone does not: tests/powerfs.py).  Used by the repository's store
(`agent.repo.DirStore`), key files (`agent.crypto.write_private`) and the instant-restore state.

Invariant: when `makedirs_durable` returns, every directory on the path that it created has its
entry durable in its parent; `fsync_dir` raises what fsync raises (a failed directory fsync is
not something to ignore: the name may not be there after a power loss).
"""

from __future__ import annotations

import os


def fsync_dir(d: str) -> None:
    """fsync the directory ``d`` (the names in it durable)."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(d: str, mode: int = 0o777) -> None:
    """`os.makedirs` (``exist_ok``) of ``d``, each directory it creates fsynced into its parent."""
    made = []
    p = os.path.abspath(d)
    while not os.path.isdir(p) and os.path.dirname(p) != p:
        made.append(p)
        p = os.path.dirname(p)
    os.makedirs(d, mode=mode, exist_ok=True)
    for m in made:  # deepest first; the last one's parent existed before
        fsync_dir(os.path.dirname(m))
