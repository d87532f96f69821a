"""A snapshot as every plan sees it: its name, when snapsync took it, its identity, snapshot or bookmark.

Backends, receivers and offsite manifests each report more (where a snapshot lives, its holds, its
chunks); the plans take only this, converted where a listing is read, so one rule decides what is
ours and what a snapshot's identity is, here, on a target and in an archive.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from snapsync.backends.base import SnapshotInfo
from snapsync.plan.naming import parse_snapshot_name


@dataclass(frozen=True)
class SnapshotId:
    """One of snapsync's snapshots, or a ZFS bookmark: usable as an incremental base, never sent itself."""

    name: str
    created: datetime
    """The time in the name (what snapsync decided to take), not the filesystem's creation time, so a
    received or restored copy keeps its place."""
    guid: str
    """What a send stream of it carries, and so what its copies carry: replication matches on this."""
    kind: Literal["snapshot", "bookmark"] = field(default="snapshot", kw_only=True)


def our_snapshots(prefix: str, snaps: Iterable[SnapshotInfo]) -> list[SnapshotId]:
    """Our snapshots (and bookmarks), oldest first by the time in their name.

    The identity is what ``btrfs send`` writes into the stream: the snapshot's own uuid, or the
    uuid it was received as, when it arrived by receive itself (a restored or cascaded copy).
    """
    mine = [
        SnapshotId(s.name, when, s.received_guid or s.guid, kind=s.kind)
        for s in snaps
        if (when := parse_snapshot_name(prefix, s.name)) is not None
    ]
    return sorted(mine, key=lambda s: (s.created, s.name))
