"""Pure decisions about a consistency group: is a snapshot due, and which group snapshots to prune.

No I/O: callers pass what the backend listed and the clock's ``now``. A group snapshot is one
name across the group's datasets; its time is the UTC time in the name (what snapsync decided
to take), not the filesystem's creation time, so a replayed or received copy keeps its place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from snapsync.backends.base import SnapshotInfo
from snapsync.plan.naming import parse_snapshot_name
from snapsync.plan.retention import Dated, PrunePlan, RetentionRules, plan_prune
from snapsync.plan.snapshots import SnapshotId


@dataclass(frozen=True)
class GroupSnapshot:
    name: str
    created: datetime
    datasets: tuple[str, ...]


@dataclass(frozen=True)
class GroupListing:
    """A group's snapshots merged across datasets, and everything that is not ours."""

    snapshots: tuple[GroupSnapshot, ...]
    foreign: tuple[SnapshotInfo, ...]

    def newest_before(self, now: datetime) -> GroupSnapshot | None:
        past = [s for s in self.snapshots if s.created <= now]
        return past[-1] if past else None


def group_snapshots(per_dataset: Mapping[str, Iterable[Dated]]) -> tuple[GroupSnapshot, ...]:
    """Per-dataset snapshots merged by name, oldest first: the one place a group's history is assembled,
    for the source, a target's copies and an offsite archive alike."""
    datasets: dict[str, list[str]] = {}
    created: dict[str, datetime] = {}
    for dataset, snaps in per_dataset.items():
        for snap in snaps:
            datasets.setdefault(snap.name, []).append(dataset)
            created[snap.name] = snap.created
    return tuple(
        sorted((GroupSnapshot(n, created[n], tuple(ds)) for n, ds in datasets.items()), key=lambda s: (s.created, s.name))
    )


def merge_listing(prefix: str, listing: Mapping[str, Sequence[SnapshotInfo]]) -> GroupListing:
    """A backend's listing as the group's snapshots, and everything that is not ours (bookmarks too)."""
    ours: dict[str, list[SnapshotId]] = {}
    foreign: list[SnapshotInfo] = []
    for dataset, snaps in listing.items():
        mine = ours[dataset] = []
        for snap in snaps:
            when = parse_snapshot_name(prefix, snap.name) if snap.kind == "snapshot" else None
            if when is None:
                foreign.append(snap)
            else:
                mine.append(SnapshotId(snap.name, when, snap.received_guid or snap.guid))
    return GroupListing(group_snapshots(ours), tuple(foreign))


def is_due(newest: datetime | None, interval: timedelta, now: datetime) -> bool:
    """Due when no snapshot exists yet in the current interval slot.

    Slots are aligned to the Unix epoch (UTC), so a timer that fires a few seconds early or late
    still takes exactly one snapshot per slot; comparing ``now - newest >= interval`` instead would
    skip every other run of an hourly timer that fires at 12:00:03 and then 13:00:01.
    """
    if newest is None:
        return True
    step = interval.total_seconds()
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return (now - epoch).total_seconds() // step > (newest - epoch).total_seconds() // step


def next_due(newest: datetime, interval: timedelta) -> datetime:
    """The first moment :func:`is_due` says yes after ``newest``: the start of the next slot."""
    step = interval.total_seconds()
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + timedelta(seconds=((newest - epoch).total_seconds() // step + 1) * step)


def plan_group_prune(
    listing: GroupListing,
    rules: RetentionRules,
    now: datetime,
    pinned: Mapping[str, Sequence[str]] | None = None,
) -> PrunePlan:
    return plan_prune(listing.snapshots, rules, now, pinned)
