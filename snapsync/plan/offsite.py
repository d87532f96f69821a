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
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from snapsync.plan.groups import group_snapshots
from snapsync.plan.retention import PERIODS, PrunePlan, RetentionRules, boundary_level, plan_prune
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
    level: int = 0
    """0 for a full; else how long a period it starts (:func:`~snapsync.plan.retention.boundary_level`)."""
    bases: tuple[str, ...] = ()
    """What the source must keep once this upload is stored: the bases of the uploads to come."""

    @property
    def full(self) -> bool:
        return self.parent is None


@dataclass(frozen=True)
class UploadPlan:
    uploads: tuple[Upload, ...]
    discard: tuple[str, ...] = ()
    """Partial uploads that will not be continued; their objects are deleted."""
    bases: tuple[str, ...] = ()
    """The stored snapshots the uploads to come may start from (held on the source)."""
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


LEVELS = len(PERIODS)
"""Levels of an incremental: 1 starts a month (or a year), 2 a week, 3 a day, 4 an hour, 5 is within one."""


def level_between(earlier: datetime, later: datetime, timezone: str) -> int:
    """The level of an upload made at ``later`` after one at ``earlier``. A year is not a level of its
    own: its first upload is also a month's, and a base kept for a year would pin a year of changes
    on the source (a btrfs snapshot, held)."""
    return max(1, boundary_level(earlier, later, timezone) - 1)


@dataclass
class _Line:
    """The uploads so far, oldest first, with their levels: where each next one starts from."""

    entries: list[tuple[SnapshotId, int]] = field(default_factory=list)

    def add(self, snap: SnapshotId, level: int) -> None:
        self.entries.append((snap, level))

    def base(self, level: int) -> SnapshotId | None:
        """The newest upload of ``level`` or a longer period: it outlives the one about to be made."""
        return next((s for s, lv in reversed(self.entries) if lv <= level), None)

    def bases(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b.name for level in range(1, LEVELS + 1) if (b := self.base(level)) is not None))

    def since_full(self) -> tuple[datetime, int] | None:
        for index in range(len(self.entries) - 1, -1, -1):
            if self.entries[index][1] == 0:
                return self.entries[index][0].created, len(self.entries) - 1 - index
        return None


def plan_uploads(
    source: Sequence[SnapshotId],
    stored: Sequence[Stored],
    partials: Sequence[PartialUpload],
    full_every: FullEvery,
    now: datetime | None = None,
    timezone: str = "UTC",
    levelled: bool = True,
) -> UploadPlan:
    """What to upload for one dataset, oldest first, and what each starts from.

    The first upload to an empty store is the newest source snapshot, as a full stream: offsite
    history starts when the target is added (uploading months of history as chains of fulls would
    cost more than it is worth). After that every newer source snapshot is uploaded, and each is sent
    from the newest upload that starts a period at least as long as its own (levelled chains, as
    dump(8) levels were): the first upload of a month from the month before's, the first of a day
    from the day before's, one within a day from the one before it. So retention, which keeps the
    first snapshot of each period, can drop a day's later uploads without any kept one depending on
    them, and a year costs one full plus what changed between the snapshots kept, not a full per
    chain. A new full starts when ``full_every`` says so. A restore replays at most one stream per
    level-1 period since the full and one per shorter period inside it (:func:`chain`). Not
    ``levelled``, each upload starts from the one before (one chain per full, as before levels).

    A stored snapshot is only a base if the source still has it with the same identity and its
    chain is whole; otherwise the newest stored one that is, or else a full (nothing is deleted).

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
    mine = {s.name: s for s in src}
    def step(earlier: datetime, later: datetime) -> int:
        return level_between(earlier, later, timezone) if levelled else LEVELS

    line, usable = _Line(), _Line()
    for index, s in enumerate(ordered):
        level = 0 if s.parent is None or index == 0 else step(ordered[index - 1].created, s.created)
        line.add(s, level)
        if (m := mine.get(s.name)) is not None and m.guid == s.guid and chain(s.name, by_name) is not None:
            usable.add(s, level)
    newest = ordered[-1] if ordered else None
    if newest is None:
        candidates = src[-1:]
    else:
        candidates = [s for s in src if s.created > newest.created]
        if candidates and not usable.entries:
            mine_newest = mine.get(newest.name)
            if mine_newest is None:
                notes.append(f"{newest.name} (newest stored) is gone from the source; the next upload starts a new chain")
            elif mine_newest.guid != newest.guid:
                notes.append(f"{newest.name} on the source is not the snapshot stored under that name; starting a new chain")
            else:
                notes.append(f"the chain of {newest.name} is broken in the store; starting a new chain")
        if not candidates and src and src[-1].created < newest.created:
            notes.append(f"the store has snapshots newer than the source's newest ({src[-1].name}); nothing to upload")
    uploads: list[Upload] = []
    before = usable.bases()
    for snap in candidates:
        last = line.entries[-1][0] if line.entries else None
        level = 0 if last is None else step(last.created, snap.created)
        full = line.since_full()
        base = (usable.base(level) or usable.base(LEVELS)) if level else None
        if base is not None and base is not usable.base(level):
            notes.append(f"{snap.name}: its level's base is not on the source any more; sent from {base.name}")
        if base is None or full is None or new_chain_due(full_every, full[0], full[1], snap.created):
            level, base = 0, None
        line.add(snap, level)
        usable.add(snap, level)
        uploads.append(Upload(snap.name, snap.created, snap.guid, base.name if base else None, level=level, bases=usable.bases()))
    discard = []
    for p in partials:
        first = uploads[0] if uploads else None
        if first is not None and (p.name, p.guid, p.parent) == (first.name, first.guid, first.parent):
            uploads[0] = replace(first, resume_from=p.chunks)
        else:
            discard.append(p.name)
    return UploadPlan(tuple(uploads), tuple(sorted(discard)), before, tuple(notes))


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
