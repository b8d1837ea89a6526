"""The backup agent's decision for one disk: full or incremental, and why (no I/O).

Role: given what the server says about the disk's dirty bitmaps
(``query-bitmaps``) and what the repository holds, `decide` says whether the
next backup can be incremental, from which snapshot and bitmap, and which
bitmap actions the backup's ``transaction`` must carry to repair what an
interrupted run left behind.  `agent.workflow` does the I/O.

Naming (the agent recognises its own state by a fixed prefix, default
``nbdbackup-agent``)::

    bitmap  PREFIX.<snapshot>   counts the writes since <snapshot>'s point in time
    job     PREFIX.<snapshot>   the sync=none backup job of the run making <snapshot>
    export  PREFIX.<snapshot>   its snapshot export

A snapshot recorded by the agent carries ``meta.bitmap`` (= ``PREFIX.<its
name>``), ``meta.server`` and ``meta.disk``, so a bitmap is *good* when the
repository holds the snapshot it is named after, that snapshot says it made
this bitmap, of this server's disk, and the sizes agree.  (The server and disk
matter: another server's run cannot see this server's bitmaps, so it may
record a snapshot under the name of an orphan bitmap here -- same disk name,
a name template without ``{server}`` -- and that snapshot holds the other
disk's data, docs/hunt5.md.)

The bitmap life cycle of one run (libvirt's pull-mode flow)::

    before        O = PREFIX.S_old  recording (good)
    transaction   add N = PREFIX.S_new (recording, persistent); disable O;
                  backup-start sync=none (the snapshot export)   -- one instant T
    pull          the dirty set is O (frozen: exactly the writes S_old..T)
    success       record S_new (meta.bitmap = N, base = S_old); dismiss the job; remove O
    failure       nothing recorded: N is an orphan (its snapshot does not exist)

Rules of `decide` (every case leaves no changed cluster uncounted):

- any bitmap of ours ``inconsistent`` -> full (it may miss writes, and it may
  be the one holding the changes of an interrupted run); all of ours removed;
- no good bitmap -> full ("no bitmap of ours" / "the repository lacks
  snapshot S that bitmap B counts from"); all of ours removed;
- the newest good bitmap B (by its snapshot's point in time) is the base;
  older good ones are stale (superseded) and removed;
- a bitmap whose snapshot document cannot be read (damaged) is not good
  either: an orphan, like one whose snapshot is missing;
- orphans (ours, consistent, not good: interrupted runs) are merged into B
  in the same transaction (``block-dirty-bitmap-merge``), then removed: B
  disabled at T_x plus the orphan recording since T_x = every write since
  B's snapshot;
- B not recording and no orphan to merge -> full (writes after it was
  disabled were counted by nobody);
- ``force_full`` -> full ("--full given").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

DEFAULT_PREFIX = "nbdbackup-agent"


def own_name(prefix: str, snapshot: str) -> str:
    """The bitmap, job and snapshot-export name of the run making ``snapshot``."""
    return f"{prefix}.{snapshot}"


def snapshot_of(prefix: str, name: str) -> str | None:
    """The snapshot an agent object ``name`` belongs to, or None if it is not ours."""
    head = prefix + "."
    return name[len(head):] if name.startswith(head) and len(name) > len(head) else None


@dataclass
class Decision:
    """What the next backup of one disk does.

    Fields: ``kind`` ("full" or "incremental"); ``reason`` (one sentence for
    the report); ``base`` / ``base_bitmap`` (incremental: the snapshot the
    dirty set counts from and the bitmap holding it); ``granularity`` (of
    the base bitmap, for the new one; None = server default);
    ``merge`` (orphan bitmaps merged into ``base_bitmap`` in the
    transaction); ``remove`` (our bitmaps removed by the transaction:
    inconsistent, stale, orphans); ``notes`` (what was repaired, for the
    report).
    """

    kind: str
    reason: str
    base: str | None = None
    base_bitmap: str | None = None
    granularity: int | None = None
    merge: list[str] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def actions(self, export: str, new_bitmap: str, granularity: int | None = None) -> list[dict]:
        """The bitmap actions of the backup transaction (backup-start is added by the caller).

        Order: merge orphans into the base, disable the base (its dirty set
        is frozen at the transaction's instant), add the new bitmap
        (recording from that same instant), remove the leftovers (the
        server applies removals last, after every other action).
        """
        acts: list[dict] = []
        if self.kind == "incremental":
            assert self.base_bitmap is not None
            if self.merge:
                acts.append({"type": "block-dirty-bitmap-merge",
                             "data": {"export": export, "target": self.base_bitmap, "bitmaps": list(self.merge)}})
            acts.append({"type": "block-dirty-bitmap-disable", "data": {"export": export, "name": self.base_bitmap}})
        add = {"export": export, "name": new_bitmap, "persistent": True}
        g = granularity if granularity is not None else self.granularity
        if g is not None:
            add["granularity"] = g
        acts.append({"type": "block-dirty-bitmap-add", "data": add})
        for name in self.remove:
            acts.append({"type": "block-dirty-bitmap-remove", "data": {"export": export, "name": name}})
        return acts


def _instant(info: dict) -> str:
    meta = info.get("meta") or {}
    return str(meta.get("instant") or info.get("created") or "")


def decide(bitmaps: list[dict], size: int, prefix: str, snapshot_info: Callable[[str], dict | None], *,
           force_full: bool = False, server: str | None = None, disk: str | None = None) -> Decision:
    """Decide one disk's next backup (see the module doc).

    ``bitmaps``: the disk's ``query-bitmaps`` answer (BitmapInfo dicts);
    ``size``: the disk's size now; ``snapshot_info(name)``: the repository's
    snapshot document, or None if it has no such snapshot, or
    ``{"damaged": why}`` if it cannot be read (its bitmap is then an orphan);
    ``server`` /
    ``disk``: this disk's server name and export (None: not checked), which a
    base snapshot's ``meta.server`` / ``meta.disk`` must name.
    """
    ours = [b for b in bitmaps if snapshot_of(prefix, b["name"]) is not None]
    everything = [b["name"] for b in ours]
    bad = [b for b in ours if b.get("inconsistent")]
    if bad:
        names = ", ".join(b["name"] for b in bad)
        return Decision("full", f"bitmap {names} is inconsistent (the server stopped uncleanly): "
                                f"it may miss writes", remove=everything,
                        notes=[f"removed {n}" for n in everything])
    good: list[tuple[str, dict, dict]] = []
    orphans: list[dict] = []
    why_orphan: dict[str, str] = {}
    for b in ours:
        snap = snapshot_of(prefix, b["name"])
        assert snap is not None
        info = snapshot_info(snap)
        if info is None:
            orphans.append(b)
            why_orphan[b["name"]] = f"the repository lacks snapshot {snap} that bitmap {b['name']} counts from"
            continue
        meta = info.get("meta") or {}
        msize = (info.get("manifest") or {}).get("size")
        if info.get("damaged"):
            orphans.append(b)
            why_orphan[b["name"]] = f"{info['damaged']} (bitmap {b['name']} counts from it)"
        elif meta.get("bitmap") != b["name"]:
            orphans.append(b)
            why_orphan[b["name"]] = f"snapshot {snap} was not made with bitmap {b['name']}"
        elif (server is not None and meta.get("server") != server) or (disk is not None and meta.get("disk") != disk):
            orphans.append(b)
            why_orphan[b["name"]] = (f"snapshot {snap} is of server {meta.get('server')!r} disk {meta.get('disk')!r}, "
                                     f"not {server!r} {disk!r}")
        elif msize != size:
            orphans.append(b)
            why_orphan[b["name"]] = f"the disk is {size} bytes, snapshot {snap} {msize}"
        else:
            good.append((snap, info, b))
    if not good:
        if not ours:
            reason = "no bitmap of ours on the server (first backup, or its bitmaps were removed)"
        else:
            reason = "; ".join(why_orphan[b["name"]] for b in orphans)
        return Decision("full", reason, remove=everything, notes=[f"removed {n}" for n in everything])
    good.sort(key=lambda g: (_instant(g[1]), g[2].get("recording", False)), reverse=True)
    snap, _, base = good[0]
    stale = [g[2]["name"] for g in good[1:]]
    merge = [b["name"] for b in orphans]
    if not base.get("recording", True) and not merge:
        return Decision("full", f"bitmap {base['name']} was left disabled with no successor to merge: "
                                f"writes since then were not counted", remove=everything,
                        notes=[f"removed {n}" for n in everything])
    if force_full:
        return Decision("full", "--full given", remove=everything, notes=[f"removed {n}" for n in everything])
    notes = [f"merged {m} (left by an interrupted run) into {base['name']}" for m in merge]
    notes += [f"removed stale {s}" for s in stale]
    return Decision("incremental", f"bitmap {base['name']} counts the changes since snapshot {snap}",
                    base=snap, base_bitmap=base["name"], granularity=base.get("granularity"),
                    merge=merge, remove=merge + stale, notes=notes)
