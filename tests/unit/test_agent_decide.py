"""The backup agent's full/incremental decision (`agent.decide`), no I/O.

Every state a run can leave behind (killed before, during or after the
transaction, after recording, a server that lost a bitmap or loaded one as
inconsistent, a pruned base) maps to a decision that never drops a write:
checked case by case, and by a model in which writes land in recording
bitmaps and the decision's dirty set must cover every write since its base.
"""

from __future__ import annotations

import random

import pytest

from nbdbackup.agent.decide import decide, own_name, snapshot_of

P = "nbdbackup-agent"
SIZE = 1 << 20


def bm(snap: str, recording: bool = True, inconsistent: bool = False, prefix: str = P) -> dict:
    return {"name": own_name(prefix, snap), "granularity": 65536, "count": 0, "recording": recording,
            "persistent": True, "busy": False, "inconsistent": inconsistent}


def repo(*snaps: str, size: int = SIZE, bitmap_of=None):
    docs = {s: {"name": s, "created": f"2026-12-0{i + 1}T00:00:00+00:00",
                "manifest": {"size": size},
                "meta": {"bitmap": (bitmap_of or {}).get(s, own_name(P, s)),
                         "instant": f"2026-12-0{i + 1}T00:00:00.000000+00:00"}}
            for i, s in enumerate(snaps)}
    return docs.get


def test_names():
    assert own_name(P, "disk.1") == "nbdbackup-agent.disk.1"
    assert snapshot_of(P, "nbdbackup-agent.disk.1") == "disk.1"
    assert snapshot_of(P, "nbdbackup-agent.") is None
    assert snapshot_of(P, "other") is None


def test_first_backup_is_full_and_ignores_foreign_bitmaps():
    d = decide([{"name": "daily", "recording": True}], SIZE, P, repo())
    assert d.kind == "full" and "no bitmap of ours" in d.reason and d.remove == []
    acts = d.actions("disk", own_name(P, "s1"))
    assert acts == [{"type": "block-dirty-bitmap-add",
                     "data": {"export": "disk", "name": own_name(P, "s1"), "persistent": True}}]


def test_steady_state_is_incremental_with_disable_then_add():
    d = decide([bm("s1")], SIZE, P, repo("s1"))
    assert (d.kind, d.base, d.base_bitmap) == ("incremental", "s1", own_name(P, "s1"))
    assert "since snapshot s1" in d.reason
    acts = d.actions("disk", own_name(P, "s2"))
    assert [a["type"] for a in acts] == ["block-dirty-bitmap-disable", "block-dirty-bitmap-add"]
    assert acts[1]["data"]["granularity"] == 65536  # the new bitmap keeps the base's granularity


def test_missing_base_snapshot_is_full():
    d = decide([bm("s1")], SIZE, P, repo())
    assert d.kind == "full" and "lacks snapshot s1" in d.reason and d.remove == [own_name(P, "s1")]


def test_inconsistent_is_full_and_removes_all_ours():
    d = decide([bm("s1"), bm("s2", inconsistent=True)], SIZE, P, repo("s1"))
    assert d.kind == "full" and "inconsistent" in d.reason
    assert sorted(d.remove) == sorted([own_name(P, "s1"), own_name(P, "s2")])


def test_interrupted_run_orphan_is_merged_into_the_base():
    # Killed after the transaction: base disabled, the new bitmap recording, no snapshot s2.
    d = decide([bm("s1", recording=False), bm("s2")], SIZE, P, repo("s1"))
    assert d.kind == "incremental" and d.base == "s1"
    assert d.merge == [own_name(P, "s2")] and d.remove == [own_name(P, "s2")]
    types = [a["type"] for a in d.actions("disk", own_name(P, "s3"))]
    assert types == ["block-dirty-bitmap-merge", "block-dirty-bitmap-disable", "block-dirty-bitmap-add",
                     "block-dirty-bitmap-remove"]


def test_killed_after_recording_uses_the_newer_bitmap():
    d = decide([bm("s1", recording=False), bm("s2")], SIZE, P, repo("s1", "s2"))
    assert (d.kind, d.base) == ("incremental", "s2") and d.remove == [own_name(P, "s1")] and d.merge == []


def test_disabled_base_without_successor_is_full():
    d = decide([bm("s1", recording=False)], SIZE, P, repo("s1"))
    assert d.kind == "full" and "disabled" in d.reason


def test_size_change_and_foreign_snapshot_are_full():
    assert decide([bm("s1")], 2 * SIZE, P, repo("s1")).kind == "full"
    d = decide([bm("s1")], SIZE, P, repo("s1", bitmap_of={"s1": "someone-else"}))
    assert d.kind == "full" and "not made with bitmap" in d.reason


def test_force_full():
    d = decide([bm("s1")], SIZE, P, repo("s1"), force_full=True)
    assert d.kind == "full" and d.reason == "--full given" and d.remove == [own_name(P, "s1")]


def test_other_prefix_is_not_ours():
    d = decide([bm("s1", prefix="other")], SIZE, P, repo("s1"))
    assert d.kind == "full" and d.remove == []


# -- a model: a random sequence of runs that fail at random steps -------------------


class Model:
    """Server bitmaps (name -> {"bits": set, "recording"}), the repository's
    snapshots (name -> (instant index, disk content)), the disk itself."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.bitmaps: dict[str, dict] = {}
        self.snaps: dict[str, dict] = {}
        self.disk: dict[int, int] = {}
        self.clock = 0
        self.n = 0

    def write(self) -> None:
        c = self.rng.randrange(16)
        self.clock += 1
        self.disk[c] = self.clock
        for b in self.bitmaps.values():
            if b["recording"]:
                b["bits"].add(c)

    def infos(self) -> list[dict]:
        return [{"name": n, "recording": b["recording"], "granularity": 65536, "inconsistent": False}
                for n, b in self.bitmaps.items()]

    def info(self, name: str) -> dict | None:
        s = self.snaps.get(name)
        return None if s is None else {"manifest": {"size": SIZE},
                                       "meta": {"bitmap": own_name(P, name), "instant": f"{s['at']:08d}"}}

    def run(self, fail_at: str | None) -> None:
        self.n += 1
        name = f"s{self.n}"
        new = own_name(P, name)
        d = decide(self.infos(), SIZE, P, self.info)
        # transaction (atomic)
        if d.kind == "incremental":
            base = self.bitmaps[d.base_bitmap]
            for m in d.merge:
                base["bits"] |= self.bitmaps[m]["bits"]
            base["recording"] = False
            dirty = set(base["bits"])
        for r in d.remove:
            self.bitmaps.pop(r, None)
        self.bitmaps[new] = {"bits": set(), "recording": True}
        self.clock += 1
        at = self.clock
        image = dict(self.disk)  # the snapshot export
        if d.kind == "incremental":
            prev = dict(self.snaps[d.base]["content"])
            for c in dirty:
                if c in image:
                    prev[c] = image[c]
            content = prev
        else:
            content = dict(image)
        for _ in range(self.rng.randrange(3)):
            self.write()  # writes during the pull
        if fail_at == "pull":
            if self.rng.random() < 0.5:  # the agent rolled back; else it was killed
                if d.kind == "incremental":
                    base["bits"] |= self.bitmaps[new]["bits"]
                    base["recording"] = True
                self.bitmaps.pop(new)
            return
        assert content == image, "the backup differs from the disk at its instant"
        self.snaps[name] = {"at": at, "content": content}
        if fail_at == "finish":
            return
        if d.kind == "incremental":
            self.bitmaps.pop(d.base_bitmap)


@pytest.mark.parametrize("seed", range(40))
def test_model_never_loses_a_write(seed):
    rng = random.Random(seed)
    m = Model(rng)
    for _ in range(30):
        for _ in range(rng.randrange(4)):
            m.write()
        if rng.random() < 0.1 and m.snaps:  # retention removed an old snapshot
            m.snaps.pop(rng.choice(sorted(m.snaps)))
        m.run(rng.choice([None, None, "pull", "finish"]))


def test_a_snapshot_of_another_server_or_disk_is_no_base():
    """(hunt5) Another server's run recorded a snapshot under the name of an orphan
    bitmap of ours (it cannot see our bitmaps): it is not our base, the orphan is merged."""
    docs = {"s1": {"manifest": {"size": SIZE}, "meta": {"bitmap": own_name(P, "s1"), "server": "B", "disk": "vda",
                                                         "instant": "2026-12-01T00:00:00.000000+00:00"}},
            "s2": {"manifest": {"size": SIZE}, "meta": {"bitmap": own_name(P, "s2"), "server": "A", "disk": "vda",
                                                         "instant": "2026-12-02T00:00:00.000000+00:00"}}}
    for server, disk in (("B", "vda"), ("B", None)):
        d = decide([bm("s1", recording=False), bm("s2")], SIZE, P, docs.get, server=server, disk=disk)
        assert (d.kind, d.base, d.merge) == ("incremental", "s1", [own_name(P, "s2")]), d
    d = decide([bm("s2")], SIZE, P, docs.get, server="B", disk="vda")
    assert d.kind == "full" and "is of server 'A' disk 'vda'" in d.reason, d.reason
    d = decide([bm("s1")], SIZE, P, docs.get, server="B", disk="vdb")
    assert d.kind == "full" and "not 'B' 'vdb'" in d.reason, d.reason
    # without the check (the caller does not say), the old behaviour
    assert decide([bm("s2")], SIZE, P, docs.get).kind == "incremental"
