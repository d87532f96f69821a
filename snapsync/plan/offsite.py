"""Pure planning for offsite targets (a directory or an S3 bucket holding send streams as objects).

Offsite copies are not filesystems: an incremental stream is only worth something while every
stream before it, back to a full one, is still stored. So the plan works on *chains* — a full
upload and the incrementals that follow it — and every decision keeps them whole:

* :func:`plan_uploads` decides what to upload next and whether each upload starts a new chain
  (``full_every``: a duration or a number of incrementals per full);
* :func:`plan_store_prune` applies the target's retention rules and then keeps every snapshot a
  kept one depends on, so deleting never orphans an incremental; the newest upload of each
  dataset, and with it its whole chain, is always kept.

No I/O and no clock: the caller lists the store (authenticated manifests) and the source.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from snapsync.plan.groups import group_snapshots
from snapsync.plan.retention import PrunePlan, RetentionRules, plan_prune
from snapsync.plan.snapshots import SnapshotId

FullEvery = timedelta | int
"""Start a new chain when the chain's full upload is this old, or after this many incrementals."""

NEWEST = "newest upload (its chain is never deleted)"


@dataclass(frozen=True)
class Stored(SnapshotId):
    """A snapshot whose upload completed: its manifest exists and was authenticated."""

    parent: str | None = None
    """The snapshot this incremental was sent from; None for a full upload."""
    parent_guid: str | None = None


@dataclass(frozen=True)
class PartialUpload:
    """An upload that stopped part way: ``chunks`` complete chunks are stored."""

    name: str
    guid: str
    parent: str | None
    chunks: int


@dataclass(frozen=True)
class Upload:
    name: str
    created: datetime
    guid: str
    parent: str | None
    resume_from: int = 0
    """Chunks already stored by an interrupted upload of the same stream."""

    @property
    def full(self) -> bool:
        return self.parent is None


@dataclass(frozen=True)
class UploadPlan:
    uploads: tuple[Upload, ...]
    discard: tuple[str, ...] = ()
    """Partial uploads that will not be continued; their objects are deleted."""
    base: str | None = None
    """The stored snapshot the first incremental starts from (held on the source)."""
    notes: tuple[str, ...] = ()


def chain(name: str, stored: Mapping[str, Stored]) -> list[Stored] | None:
    """``name`` and its ancestors, full upload first; None when an ancestor is missing or mismatched."""
    out: list[Stored] = []
    current = stored.get(name)
    seen: set[str] = set()
    while current is not None:
        if current.name in seen:
            return None
        seen.add(current.name)
        out.append(current)
        if current.parent is None:
            return out[::-1]
        parent = stored.get(current.parent)
        if parent is None or parent.guid != current.parent_guid:
            return None
        current = parent
    return None


def new_chain_due(full_every: FullEvery, start: datetime, incrementals: int, created: datetime) -> bool:
    if isinstance(full_every, int):
        return incrementals >= full_every
    return created - start >= full_every


def plan_uploads(
    source: Sequence[SnapshotId],
    stored: Sequence[Stored],
    partials: Sequence[PartialUpload],
    full_every: FullEvery,
    now: datetime | None = None,
) -> UploadPlan:
    """What to upload for one dataset, oldest first.

    The first upload to an empty store is the newest source snapshot, as a full stream: offsite
    history starts when the target is added (uploading months of history as chains of fulls would
    cost more than it is worth). After that every newer source snapshot is uploaded, incrementally
    from the one before, unless a new chain is due. A stored snapshot is only a base if the source
    still has it with the same identity; otherwise the next upload is full (nothing is deleted).

    Snapshots dated after ``now`` (a clock that was wrong) are neither uploaded nor a base, on
    either side: they would stop every real snapshot from being uploaded until that date.
    """
    notes: list[str] = []
    if now is not None:
        ahead = sorted({s.name for s in source if s.created > now} | {s.name for s in stored if s.created > now})
        if ahead:
            notes.append(f"{', '.join(ahead)} dated after this host's clock: not uploaded and never a base")
        source = [s for s in source if s.created <= now]
    by_name = {s.name: s for s in stored}
    ordered = sorted((s for s in stored if now is None or s.created <= now), key=lambda s: (s.created, s.name))
    src = sorted(source, key=lambda s: (s.created, s.name))
    newest = ordered[-1] if ordered else None
    prev: SnapshotId | None = None
    start: datetime | None = None
    count = 0
    if newest is None:
        candidates = src[-1:]
    else:
        candidates = [s for s in src if s.created > newest.created]
        mine = next((s for s in src if s.name == newest.name), None)
        links = chain(newest.name, by_name)
        if mine is None:
            notes.append(f"{newest.name} (newest stored) is gone from the source; the next upload starts a new chain")
        elif mine.guid != newest.guid:
            notes.append(f"{newest.name} on the source is not the snapshot stored under that name; starting a new chain")
        elif links is None:
            notes.append(f"the chain of {newest.name} is broken in the store; starting a new chain")
        else:
            prev, start, count = mine, links[0].created, len(links) - 1
        if not candidates and src and src[-1].created < newest.created:
            notes.append(f"the store has snapshots newer than the source's newest ({src[-1].name}); nothing to upload")
    base = prev.name if prev is not None else None
    uploads: list[Upload] = []
    for snap in candidates:
        if prev is None or start is None or new_chain_due(full_every, start, count, snap.created):
            parent, start, count = None, snap.created, 0
        else:
            parent, count = prev.name, count + 1
        uploads.append(Upload(snap.name, snap.created, snap.guid, parent))
        prev = snap
    discard = []
    for p in partials:
        first = uploads[0] if uploads else None
        if first is not None and (p.name, p.guid, p.parent) == (first.name, first.guid, first.parent):
            uploads[0] = Upload(first.name, first.created, first.guid, first.parent, resume_from=p.chunks)
        else:
            discard.append(p.name)
    return UploadPlan(tuple(uploads), tuple(sorted(discard)), base, tuple(notes))


@dataclass(frozen=True)
class StorePrunePlan:
    plan: PrunePlan
    """Group-level decisions, with every reason (rules, newest upload, chain dependencies)."""
    delete: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Per dataset, the snapshots whose objects go, newest first (children before their parents)."""
    broken: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Per dataset, stored snapshots whose chain is incomplete: unrestorable, reported, not deleted."""


def plan_store_prune(
    stored: Mapping[str, Sequence[Stored]], rules: RetentionRules, now: datetime
) -> StorePrunePlan:
    """Retention over a group's stored snapshots that never breaks a chain (see module docstring).

    Broken chains (an ancestor missing, e.g. deleted by hand) are kept and reported: snapsync does
    not delete what it cannot reason about.
    """
    by_dataset = {ds: {s.name: s for s in snaps} for ds, snaps in stored.items()}
    group = group_snapshots(stored)
    pinned: dict[str, list[str]] = {}
    broken: dict[str, tuple[str, ...]] = {}
    for ds, snaps in by_dataset.items():
        if snaps:
            newest = max(snaps.values(), key=lambda s: (s.created, s.name))
            _pin(pinned, newest.name, NEWEST)
        bad = tuple(sorted(n for n in snaps if chain(n, snaps) is None))
        if bad:
            broken[ds] = bad
            for n in bad:
                _pin(pinned, n, "chain incomplete in the store (unrestorable; not deleted automatically)")
    first = plan_prune(group, rules, now, pinned)
    # Everything kept, and every ancestor of it in every dataset, to a fixpoint: a name kept as the
    # base of one dataset's snapshot is kept for the whole group, so its own parents in the other
    # datasets must be kept too.
    todo = [d.name for d in first.kept]
    kept = set(todo)
    while todo:
        name = todo.pop()
        for snaps in by_dataset.values():
            current = snaps.get(name)
            if current is not None and current.parent is not None and current.parent in snaps:
                _pin(pinned, current.parent, f"base of {name} (needed to restore it)")
                if current.parent not in kept:
                    kept.add(current.parent)
                    todo.append(current.parent)
    plan = plan_prune(group, rules, now, pinned)
    doomed = {d.name for d in plan.removed}
    delete = {
        ds: tuple(sorted((n for n in snaps if n in doomed), key=lambda n: (snaps[n].created, n), reverse=True))
        for ds, snaps in by_dataset.items()
    }
    return StorePrunePlan(plan, {ds: names for ds, names in delete.items() if names}, broken)


def _pin(pinned: dict[str, list[str]], name: str, reason: str) -> None:
    reasons = pinned.setdefault(name, [])
    if reason not in reasons:
        reasons.append(reason)
