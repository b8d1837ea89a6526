"""Hypothesis state machine: a local chunk repository under random sequences of pulls
(full and incremental compression levels, shared and zero chunks, a short last chunk),
pulls killed before their snapshot (chunks left committed or as temporary files of a
dead writer), deletes, prunes (keep-last) and gc (bug hunt 2, docs/hunt2.md).

Model: name -> the disk image each saved snapshot was pulled from.

Invariants after every step (invariant 5): every snapshot the model holds is listed,
restores (`SnapshotImage`, `Repository.get_chunk`) to exactly its image, and `verify`
is clean; after a gc, the stored chunks are exactly those the snapshots use (nothing
referenced lost, nothing unreferenced kept) and no temporary file is left.
"""

from __future__ import annotations

import asyncio
import os

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nbdbackup.agent.manifest import Manifest
from nbdbackup.agent.repo import DirStore, Repository, SnapshotImage

C = 4096
COUNT = 5
SIZE = COUNT * C - 1000  # a short last chunk
#: A small pool of chunk contents, so snapshots share chunks (dedup) and some are zero.
POOL = [bytes(C), b"\x01" * C, os.urandom(C), os.urandom(C), (b"ab" * C)[:C], os.urandom(C)]

images = st.lists(st.integers(0, len(POOL) - 1), min_size=COUNT, max_size=COUNT).map(
    lambda ix: b"".join(POOL[i] for i in ix)[:SIZE])


class RepoMachine(RuleBasedStateMachine):
    @initialize(encryption=st.sampled_from(["none", "repokey"]))
    def setup(self, encryption):
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix="hunt2-")
        self.root = os.path.join(self.tmp.name, "r")
        self.repo = Repository.init(DirStore(self.root), C, encryption=encryption, passphrase="pw", log_n=10)
        self.model: dict[str, bytes] = {}
        self.n = 0

    def teardown(self):
        if hasattr(self, "tmp"):
            self.tmp.cleanup()

    def fresh(self) -> Repository:
        """The repository as the next process (a new agent, a CLI command) opens it."""
        return Repository.open(DirStore(self.root), passphrase="pw")

    def _chunks(self, repo: Repository, data: bytes, incremental: bool) -> Manifest:
        m = Manifest(len(data), C)
        m.chunks = [repo.chunk_id(data[o:o + n]) for o, n in map(m.chunk_range, range(m.count))]
        for i, d in enumerate(m.chunks):
            o, n = m.chunk_range(i)
            repo.put_chunk(d, data[o:o + n], incremental=incremental)
        return m

    @rule(data=images, incremental=st.booleans())
    def pull(self, data, incremental):
        repo = self.fresh()
        with repo.store.lock(exclusive=False):
            m = self._chunks(repo, data, incremental)
            name = f"s{self.n}"
            repo.save_snapshot(name, m, new_only=True)
        self.n += 1
        self.model[name] = data

    @rule(data=images, commit=st.booleans())
    def killed_pull(self, data, commit):
        """A pull that dies before its snapshot: its chunks committed (a group was full) or
        left as temporary files (the process died before its group commit)."""
        repo = self.fresh()
        self._chunks(repo, data, False)
        if commit:
            repo.store._commit()
        else:  # what kill -9 leaves: the open files' data, never renamed
            for fd, _, _, _ in repo.store._pending.values():
                os.close(fd)
            repo.store._pending.clear()

    @rule(pick=st.integers(0, 1 << 16))
    def delete(self, pick):
        if not self.model:
            return
        name = sorted(self.model)[pick % len(self.model)]
        repo = self.fresh()
        with repo.store.lock(exclusive=True):
            repo.delete_snapshot(name)
        del self.model[name]

    @rule(keep=st.integers(1, 3), then_gc=st.booleans())
    def prune(self, keep, then_gc):
        repo = self.fresh()
        with repo.store.lock(exclusive=True):
            names = sorted(self.model, key=lambda s: int(s[1:]))
            for name in names[:-keep]:
                repo.delete_snapshot(name)
                del self.model[name]
            if then_gc:
                repo.gc()
                self._after_gc(repo)

    @rule()
    def gc(self):
        repo = self.fresh()
        with repo.store.lock(exclusive=True):
            repo.gc()
        self._after_gc(self.fresh())

    def _after_gc(self, repo: Repository) -> None:
        assert repo.stored() == repo.referenced()
        assert not [f for _, _, fs in os.walk(self.root) for f in fs if ".tmp." in f]

    @invariant()
    def every_snapshot_restores_exactly(self):
        if not hasattr(self, "repo"):
            return
        repo = self.fresh()
        assert sorted(repo.snapshots()) == sorted(self.model)
        for name, data in self.model.items():
            img = SnapshotImage(repo, repo.load_snapshot(name))
            buf = bytearray(len(data))
            asyncio.run(img.pread(memoryview(buf), 0))
            assert bytes(buf) == data, name
        assert repo.verify() == []


RepoMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=12, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_repo_state_machine = RepoMachine.TestCase
