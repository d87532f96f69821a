"""Pure replication planning: which sends bring one target dataset up to date with its source.

No I/O and no clock: the caller lists both sides, maps the source's snapshots onto
:class:`~snapsync.plan.snapshots.SnapshotId` and the target's copies onto :class:`TargetSnapshot`,
and executes the returned steps. Snapshots are matched by identity (btrfs uuid / received_uuid, ZFS
guid), never by name: a renamed copy is still a base, and a same-named snapshot with another
identity is not. Both sides pass only snapsync's own snapshots (filtered by prefix), oldest first;
anything else on the target is not ours to delete.

A conflict is returned instead of steps whenever going on would destroy data on the target; the
plan never falls back to a full send over existing copies.

A snapshot dated after ``now`` (taken while the clock was wrong) is never sent, never a base and
never the newest: until the clock passes it, it would stop every later snapshot from being sent.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from snapsync.plan.snapshots import SnapshotId


@dataclass(frozen=True)
class TargetSnapshot:
    """A snapshot on the target. ``source_guid`` is the identity of the source snapshot it copies.

    ``complete`` is False for a garbled btrfs receive (not read-only or no received_uuid); ZFS
    reports an interrupted receive as a resume token instead. ``writable_changed`` means the copy
    was modified after it arrived (btrfs ``ro=false``, ZFS as the caller judges): it is then
    neither a base nor a partial, but user data that only an explicit rollback may destroy.
    """

    name: str
    source_guid: str | None
    complete: bool = True
    writable_changed: bool = False

    @property
    def partial(self) -> bool:
        return not self.complete and not self.writable_changed

    @property
    def usable_base(self) -> bool:
        return self.complete and not self.writable_changed and self.source_guid is not None


@dataclass(frozen=True)
class DeletePartial:
    name: str


@dataclass(frozen=True)
class DropFutureCopy:
    """Delete the target's copy of a source snapshot dated after the clock.

    The source keeps the original; the copy would otherwise stand after the base (a ZFS receive
    then refuses the next incremental) and stop the target's pruning until the clock passes it.
    """

    name: str


@dataclass(frozen=True)
class Resume:
    token: str


@dataclass(frozen=True)
class SendFull:
    snapshot: SnapshotId


@dataclass(frozen=True)
class SendIncremental:
    base: SnapshotId
    snapshot: SnapshotId


@dataclass(frozen=True)
class RollbackTarget:
    """Roll the target back to its copy of the base, destroying everything newer there."""

    to: str
    destroys: tuple[str, ...]


Step = DeletePartial | DropFutureCopy | Resume | SendFull | SendIncremental | RollbackTarget


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "(none)"


@dataclass(frozen=True)
class Diverged:
    """The target has snapshots newer than the common base that the source does not have."""

    base: str
    target_only: tuple[str, ...]
    source_only_after_base: tuple[str, ...]

    def message(self) -> str:
        return (
            f"target diverged after the common base {self.base!r}: it holds {_names(self.target_only)}, "
            f"which the source lacks (a rollback on the source, or the target was modified). "
            f"Replicating {_names(self.source_only_after_base)} would destroy them. Copy them away if "
            f'they matter, then set on_diverged = "rollback" or delete them on the target.'
        )


@dataclass(frozen=True)
class NoCommonBase:
    """The target holds copies of ours, but none is a copy of anything the source still has."""

    target_snapshots: tuple[str, ...]

    def message(self) -> str:
        return (
            f"target holds {_names(self.target_snapshots)} but none of them is a copy of a snapshot "
            f"or bookmark the source still has (the base was pruned, made writable, or the target "
            f"belongs to another source). A full send would replace them; refusing. Delete the "
            f"target's copies (or point at an empty target) to start over with a full send."
        )


Conflict = Diverged | NoCommonBase


@dataclass(frozen=True)
class ReplicationPlan:
    """Steps in execution order; empty steps with no conflict means up to date.

    ``needs_replan`` is set after a :class:`Resume`: what remains depends on how far the resumed
    receive gets, so the caller executes it, lists the target again and plans anew.
    """

    steps: tuple[Step, ...]
    base: str | None
    conflict: Conflict | None = None
    needs_replan: bool = False
    future: tuple[str, ...] = ()
    """Source snapshots dated after ``now``: left out of the plan, reported so the clock gets fixed."""


def _find_base(
    source: Sequence[SnapshotId], target: Sequence[TargetSnapshot]
) -> tuple[int, TargetSnapshot] | None:
    copies = {t.source_guid: t for t in target if t.usable_base}
    best: int | None = None
    for index, snap in enumerate(source):
        shadowed = best is not None and source[best].guid == snap.guid and source[best].kind == "snapshot"
        if snap.guid in copies and not shadowed:
            best = index
    return None if best is None else (best, copies[source[best].guid])


def common_base(
    source: Sequence[SnapshotId], target: Sequence[TargetSnapshot]
) -> tuple[SnapshotId, TargetSnapshot] | None:
    """The newest source entry with a complete, unmodified copy on the target, and that copy.

    A snapshot is preferred over its own bookmark (same guid): it can be pinned and sent from alike.
    """
    found = _find_base(source, target)
    return None if found is None else (source[found[0]], found[1])


def _chain(base: SnapshotId | None, sendable: Sequence[SnapshotId]) -> list[Step]:
    """Every snapshot in order, each from the previous, so the target keeps the whole history."""
    steps: list[Step] = []
    previous = base
    for snap in sendable:
        steps.append(SendFull(snap) if previous is None else SendIncremental(previous, snap))
        previous = snap
    return steps


def plan_replication(
    source: Sequence[SnapshotId],
    target: Sequence[TargetSnapshot],
    resume_token: str | None = None,
    on_diverged: Literal["refuse", "rollback"] = "refuse",
    *,
    now: datetime | None = None,
    sent_before: Collection[str] = (),
) -> ReplicationPlan:
    """Plan one dataset's replication; see the module docstring for what counts as a conflict.

    Without a base and with nothing of ours on the target, the oldest source snapshot goes first
    as a full send and the rest follow incrementally, so the target's own retention sees the same
    history as the source instead of only the newest state.

    ``sent_before`` names snapshots the source knows it sent to this target and has lost since (a
    hold left on a snapshot deleted by hand): the target's copies up to the newest of them are that
    history, not a divergence, and the chain continues from the newest snapshot both still share.
    """
    future = tuple(s.name for s in source if now is not None and s.created > now)
    dropped: list[Step] = []
    if future:
        future_guids = {s.guid for s in source if s.name in future}
        source = [s for s in source if s.name not in future]
        dropped = [DropFutureCopy(t.name) for t in target if t.source_guid in future_guids and t.usable_base]
        target = [t for t in target if t.source_guid not in future_guids or not t.usable_base]
    found = _find_base(source, target)
    base_name = source[found[0]].name if found else None
    if resume_token is not None:
        return ReplicationPlan((Resume(resume_token),), base_name, needs_replan=True, future=future)

    steps: list[Step] = [*dropped, *(DeletePartial(t.name) for t in target if t.partial)]
    kept = [t for t in target if not t.partial]
    if found is None:
        if kept:
            return ReplicationPlan((), None, NoCommonBase(tuple(t.name for t in kept)), future=future)
        chain = _chain(None, [s for s in source if s.kind == "snapshot"])
        return ReplicationPlan(tuple(steps + chain), None, future=future)

    index, base_copy = found
    base = source[index]
    sendable = [s for s in source[index + 1 :] if s.kind == "snapshot"]
    last_copy = max(i for i, t in enumerate(kept) if t is base_copy)
    known = [i for i, t in enumerate(kept) if t.name in sent_before and t.usable_base]
    target_only = tuple(t.name for t in kept[max([last_copy, *known]) + 1 :])
    if target_only:
        if on_diverged == "refuse":
            conflict = Diverged(base.name, target_only, tuple(s.name for s in sendable))
            return ReplicationPlan((), base.name, conflict, future=future)
        steps.append(RollbackTarget(base_copy.name, target_only))
    return ReplicationPlan(tuple(steps + _chain(base, sendable)), base.name, future=future)


def replication_pins(
    source: Sequence[SnapshotId], target: Sequence[TargetSnapshot], target_name: str
) -> dict[str, list[str]]:
    """``pinned`` for the source's plan_prune: pruning the base would force a full re-send.

    A bookmark base needs no pin: prune never lists bookmarks, and the bookmark already survives.
    """
    found = common_base(source, target)
    if found is None or found[0].kind != "snapshot":
        return {}
    return {found[0].name: [f"replication base for {target_name}"]}


def target_pins(
    source: Sequence[SnapshotId], target: Sequence[TargetSnapshot], source_name: str
) -> dict[str, list[str]]:
    """``pinned`` for the target's plan_prune, keyed by the target's name for the base copy."""
    found = common_base(source, target)
    if found is None:
        return {}
    return {found[1].name: [f"replication base from {source_name}"]}
