"""``snapsync rollback GROUP SNAPSHOT``: return every dataset of a group to one snapshot, together.

Nothing is destroyed. Before touching anything a *safety snapshot* of the current state is taken
and held (``safety:<name>``) until ``snapsync release``; each dataset's current state is moved
aside (btrfs: the subvolume is renamed, ZFS: the dataset, after a clone of the snapshot was
promoted) and the snapshot's state takes its place. Every snapshot stays, so the targets' bases
stay too: btrfs targets continue incrementally from the newest common snapshot; a ZFS target that
already holds snapshots newer than the chosen one sees a diverged history (the report names it).

A dataset in use (a process with a file, directory or mapping in it, through any mount of it, or a
mount inside it) is refused unless ``--force``, with the processes, their systemd units and what to
stop. Only the group's own datasets are touched: NixOS rolls ``/`` back at boot by itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from snapsync.backends.base import SnapshotInfo, StorageBackend
from snapsync.errors import SnapsyncError, UsageError
from snapsync.naming import parse_snapshot_name, snapshot_name
from snapsync.policy import Group
from snapsync.usage import Holder, holders

SAFETY = "safety"


class Busy(UsageError):
    """The group's data is in use; nothing was done."""


@dataclass
class RollbackReport:
    group: str
    snapshot: str
    dry_run: bool
    safety: str = ""
    steps: list[str] = field(default_factory=list)
    holders: list[Holder] = field(default_factory=list)
    aside: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group, "snapshot": self.snapshot, "dry_run": self.dry_run, "ok": True,
            "safety_snapshot": self.safety, "steps": self.steps, "aside": self.aside, "notes": self.notes,
            "in_use": [h.to_json() for h in self.holders],
        }


def aside_name(dataset: str, safety: str) -> str:
    """Where the current state goes: beside the dataset, named after the safety snapshot."""
    return f"{dataset.rstrip('/')}.pre-rollback.{safety}"


def _stop_hint(found: list[Holder]) -> str:
    units = sorted({h.unit for h in found if h.unit and not h.unit.endswith(".scope")})
    if units:
        return f"stop them first: systemctl stop {' '.join(units)}"
    return "stop them first (or pass --force)"


def rollback(
    group: Group,
    backend: StorageBackend,
    snapshot: str,
    now: datetime,
    *,
    force: bool = False,
    dry_run: bool = False,
) -> RollbackReport:
    if parse_snapshot_name(group.prefix, snapshot) is None:
        raise UsageError(f"{snapshot!r} is not one of group {group.name}'s snapshots (prefix {group.prefix!r})")
    listings = {ds: {s.name: s for s in backend.list_snapshots(ds)} for ds in group.datasets}
    missing = [ds for ds, snaps in listings.items() if snapshot not in snaps]
    if missing:
        raise UsageError(f"group {group.name}: no snapshot {snapshot} of {', '.join(missing)} (`snapsync list {group.name}`)")
    safety = snapshot_name(group.prefix, now)
    report = RollbackReport(group.name, snapshot, dry_run, safety)
    report.holders = holders(group.datasets) if backend.kind == "btrfs" else _zfs_holders(group.datasets)
    if report.holders and not force:
        lines = "; ".join(h.describe() for h in report.holders[:8])
        more = f" (and {len(report.holders) - 8} more)" if len(report.holders) > 8 else ""
        raise Busy(f"group {group.name} is in use: {lines}{more}; {_stop_hint(report.holders)}, or pass --force")
    if report.holders:
        report.notes.append("in use, rolled back anyway (--force): " + "; ".join(h.describe() for h in report.holders))
    report.steps.append(
        f"take safety snapshot {safety} of {', '.join(group.datasets)}, held as {SAFETY}:{safety} "
        f"until `snapsync release {group.name} {safety}`"
    )
    for ds in group.datasets:
        report.aside[ds] = aside_name(ds, safety)
        report.steps.append(f"move {ds} aside to {report.aside[ds]}")
        report.steps.append(f"put {snapshot}'s state in place at {ds}" + (" (writable snapshot)" if backend.kind == "btrfs" else " (clone, promoted)"))
    report.notes += _target_notes(group, backend, listings, snapshot)
    if dry_run:
        return report
    backend.snapshot_group(group.datasets, safety)
    for ds in group.datasets:
        backend.set_holds(ds, f"{SAFETY}:{safety}", [safety])
    done: list[str] = []
    for ds in group.datasets:
        try:
            backend.rollback(ds, snapshot, report.aside[ds])
        except SnapsyncError as e:
            raise type(e)(
                f"{e}; rolled back so far: {', '.join(done) or 'nothing'} (their previous state is beside them, "
                f"and safety snapshot {safety} holds the state of all); fix the cause and run the same rollback again"
            ) from e
        done.append(ds)
        if backend.kind == "zfs":
            # The newer snapshots went aside with the old state; they are no target's base any more.
            tags = {t for snap in backend.list_snapshots(report.aside[ds]) for t in snap.holds if t.startswith("target:")}
            for tag in sorted(tags):
                backend.set_holds(report.aside[ds], tag, [])
    return report


def _zfs_holders(datasets: Sequence[str]) -> list[Holder]:
    """ZFS datasets are used through their mountpoints."""
    from snapsync.backends.zfs import zfs

    paths = []
    for ds in datasets:
        answer = zfs("get", "-H", "-o", "value", "mounted,mountpoint", ds, check=False).stdout.split()
        if len(answer) == 2 and answer[0] == "yes" and answer[1].startswith("/"):
            paths.append(answer[1])
    return holders(paths) if paths else []


def _target_notes(
    group: Group, backend: StorageBackend, listings: dict[str, dict[str, SnapshotInfo]], snapshot: str
) -> list[str]:
    """What the targets keep as base, and which will see a diverged history (ZFS)."""
    when = parse_snapshot_name(group.prefix, snapshot)
    assert when is not None
    notes = []
    for target in group.targets:
        held = sorted({
            n for snaps in listings.values() for n, s in snaps.items() if f"target:{target}" in s.holds
        })
        if not held:
            continue
        newer = [n for n in held if (parse_snapshot_name(group.prefix, n) or when) > when]
        if backend.kind == "zfs" and newer:
            notes.append(
                f"target {target}: its base {', '.join(held)} is newer than {snapshot} and moves aside with the old "
                f"state; its next send is refused as diverged unless on_diverged = \"rollback\" for it (which "
                f"drops its copies newer than {snapshot} and continues incrementally)"
            )
        else:
            notes.append(f"target {target}: base {', '.join(held)} stays; replication continues incrementally")
    return notes
