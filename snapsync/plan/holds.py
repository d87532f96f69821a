"""Hold tags: which party a hold on a source snapshot belongs to.

A hold pins the snapshot a target or a pulling host still needs as its incremental base, so
pruning keeps it. The tag says whose it is: ``target:<target>`` for a push target of this host,
``pull:<host>.<pull>`` for another host pulling from this one. Every tag is made and read here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from snapsync.policy.durations import format_duration

TARGET = "target:"
PULL = "pull:"


def target_tag(target: str) -> str:
    return f"{TARGET}{target}"


def pull_tag(host: str, pull: str) -> str:
    return f"{PULL}{host}.{pull}"


def is_target_tag(tag: str) -> bool:
    return tag.startswith(TARGET)


def is_pull_tag(tag: str) -> bool:
    return tag.startswith(PULL)


SAFETY = "safety:"


def safety_tag(snapshot: str) -> str:
    """A rollback's hold on the safety snapshot it took, until ``snapsync release``."""
    return f"{SAFETY}{snapshot}"


def is_safety_tag(tag: str) -> bool:
    return tag.startswith(SAFETY)


def tag_subject(tag: str) -> str:
    """Whom a tag names: the target, ``<host>.<pull>``, or the safety snapshot."""
    return tag.partition(":")[2]


@dataclass(frozen=True)
class Held:
    """One of our snapshots or bookmarks as the leftover rules see it: when, what, who holds it."""

    name: str
    created: datetime
    kind: Literal["snapshot", "bookmark"]
    holds: tuple[str, ...] = ()


@dataclass(frozen=True)
class Leftovers:
    """What no holder needs any more on one dataset, and why each of the rest is kept.

    Every hold and bookmark snapsync makes has a way out here: a target's hold goes with the target
    (the runner releases it), a pulling host's hold when it has not fetched for ``hold_expiry``
    although there was something to fetch, a bookmark once every holder holds something newer and
    it is older than ``hold_expiry`` (until then a target removed by mistake can come back from it).
    """

    release: dict[str, str] = field(default_factory=dict)
    """Pull tags to release, with the reason."""
    drop_bookmarks: dict[str, str] = field(default_factory=dict)
    """Bookmarks to destroy, with the reason."""
    kept_bookmarks: dict[str, str] = field(default_factory=dict)
    """Bookmarks that stay, with the holder that may still need each."""


def leftovers(
    entries: Sequence[Held],
    holders: Iterable[str],
    lost: Mapping[str, datetime | None],
    now: datetime,
    hold_expiry: timedelta | None,
) -> Leftovers:
    """Decide, from one dataset's listing alone, which holds and bookmarks have outlived their use.

    ``holders`` are the tags of the targets the group lists; pull tags count while they hold
    something. ``lost`` are holds recorded on snapshots that are gone (deleted by hand): such a
    holder's base is unknown until it replicates again, so every bookmark stays for it.
    """
    result = Leftovers()
    snapshots = [e for e in entries if e.kind == "snapshot" and e.created <= now]
    newest_held: dict[str, datetime] = {}
    for e in snapshots:
        for tag in e.holds:
            newest_held[tag] = max(newest_held.get(tag, e.created), e.created)
    for tag, held in sorted(newest_held.items()):
        if not is_pull_tag(tag) or hold_expiry is None:
            continue
        missed = [e for e in snapshots if held < e.created <= now - hold_expiry]
        if missed:
            result.release[tag] = (
                f"{tag_subject(tag)} has not pulled for {format_duration(hold_expiry)} although {missed[0].name} was there "
                f"to fetch (hold_expiry)"
            )
    needing = {*holders, *(t for t in newest_held if is_pull_tag(t) and t not in result.release)}
    bookmarks = [e for e in entries if e.kind == "bookmark"]
    for b in bookmarks:
        why = _bookmark_needed_by(b, needing, newest_held, lost)
        if why is None and hold_expiry is not None and b.created > now - hold_expiry:
            why = f"no holder needs it; a target added back within {format_duration(hold_expiry)} resumes from it (hold_expiry)"
        if why is None:
            result.drop_bookmarks[b.name] = (
                "every target and pulling host holds a newer snapshot" if needing
                else "no target or pulling host of this group needs it"
            )
        else:
            result.kept_bookmarks[b.name] = why
    return result


def _bookmark_needed_by(
    bookmark: Held, needing: Iterable[str], newest_held: Mapping[str, datetime], lost: Mapping[str, datetime | None]
) -> str | None:
    for tag in sorted(needing):
        if tag in lost:
            return f"{tag_subject(tag)}'s base was deleted by hand; kept until it replicates again"
        held = newest_held.get(tag)
        if held is None:
            return f"{tag_subject(tag)} holds nothing here yet; it may resume from it"
        if held <= bookmark.created:
            return f"incremental base for {tag_subject(tag)}"
    return None


def lost_hold_pins(
    entries: Sequence[Held], lost: Mapping[str, datetime | None], pinned_for: Mapping[str, str]
) -> dict[str, list[str]]:
    """Pins while a holder's held snapshot is gone: every older snapshot of ours may be its real base.

    ``lost`` maps a tag to when its newest vanished snapshot was taken (None: unknown, pin all).
    Only the holder's next replication can tell which snapshot both sides share (and move the hold
    there), so until then pruning keeps them all rather than guess and force a full send.
    """
    pins: dict[str, list[str]] = {}
    for tag, limit in sorted(lost.items()):
        if tag not in pinned_for:
            continue
        for e in entries:
            if e.kind == "snapshot" and (limit is None or e.created < limit):
                pins.setdefault(e.name, []).append(pinned_for[tag])
    return pins
