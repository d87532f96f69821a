"""What a group's copies cost on each of its targets (``list --sizes``), as each target's filesystem counts them.

The figures come from the target itself (``serve``'s ``sizes``), never from the size of what was
sent: a copy received incrementally shares its blocks with the copies before it there, and only the
target's filesystem knows how many are shared. An offsite archive is not asked: its sizes are its
uploads', which ``verify`` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from snapsync.errors import SnapsyncError

if TYPE_CHECKING:
    from snapsync.policy.loader import Group, Policy


@dataclass(frozen=True)
class Held:
    target: str
    dataset: str
    copies: dict[str, dict[str, int]]
    """Copy name -> figure -> bytes, as in :class:`~snapsync.backends.base.SnapshotSizes`."""
    note: str | None = None
    error: str | None = None

    @property
    def total(self) -> tuple[int, bool] | None:
        """All copies together, and whether that counts each block once: ZFS ``written`` summed does (a
        block is born in exactly one copy's interval); btrfs ``exclusive`` summed leaves out the blocks
        copies share, so it is a floor."""
        figures = list(self.copies.values())
        if not figures:
            return None
        if all("written" in f for f in figures):
            return sum(f["written"] for f in figures), True
        if all("exclusive" in f for f in figures):
            return sum(f["exclusive"] for f in figures), False
        return None

    def to_json(self) -> dict[str, object]:
        total = self.total
        return {"target": self.target, "dataset": self.dataset, "copies": self.copies, "note": self.note, "error": self.error,
                "total": total[0] if total else None, "total_exact": total[1] if total else None}


def held_on_targets(policy: Policy, group: Group, down: Mapping[str, str] | None = None) -> list[Held]:
    """One entry per dataset per ssh or local target of ``group``; a target that cannot answer is an
    entry with its error, not a failure of the listing. ``down``: targets the listing could not reach,
    and why; they are not asked again (with ssh's retries, that would be the same wait twice)."""
    from snapsync.policy.schema import LocalTarget, SshTarget
    from snapsync.protocol import dataset_key
    from snapsync.replication.peer import Peer
    from snapsync.replication.transport import transport_for

    out: list[Held] = []
    for name in group.targets:
        target = policy.targets.get(name)
        if not isinstance(target, (SshTarget, LocalTarget)):
            continue
        if down and name in down:
            out += [Held(name, ds, {}, error=down[name]) for ds in group.datasets]
            continue
        paths = {f"{group.name}/{dataset_key(ds)}": ds for ds in group.datasets}
        peer = Peer(transport_for(name, target), "receive")
        try:
            with peer.connected():
                answered = peer.sizes(list(paths))
        except SnapsyncError as e:
            out += [Held(name, ds, {}, error=str(e)) for ds in group.datasets]
            continue
        out += [Held(name, ds, *answered[path]) for path, ds in paths.items()]
    return out
