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
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from snapsync.backends.base import SnapshotInfo, StorageBackend
from snapsync.backends.usage import Holder
from snapsync.errors import SnapsyncError, UsageError
from snapsync.host.state import read_json, state_dir, write_json
from snapsync.plan.holds import is_safety_tag, is_target_tag, safety_tag, tag_subject, target_tag
from snapsync.plan.naming import parse_snapshot_name, snapshot_name
from snapsync.policy.loader import Group


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


def _plan_path(group: str) -> Path:
    return state_dir() / "rollback" / f"{group}.json"


def unfinished(group: str) -> str | None:
    """The snapshot an interrupted rollback of ``group`` was returning to; None when none is unfinished.

    Until it is finished a dataset of the group may be missing (moved aside, not yet replaced):
    whatever fails for that reason says so and how to finish (``check``, ``snapshot``, ``run``).
    """
    try:
        pending = read_json(_plan_path(group))
    except SnapsyncError:
        return None
    return str(pending["snapshot"]) if pending and pending.get("snapshot") else None


def unfinished_text(group: str, snapshot: str) -> str:
    return f"an interrupted rollback of group {group} to {snapshot} is unfinished; run `snapsync rollback {group} {snapshot}` to finish it"


def _taken_path() -> Path:
    return state_dir() / "rollback" / "safety.json"


def _taken() -> dict[str, list[str]]:
    """The safety snapshots taken per dataset and not yet released: where a rollback leaves its safety
    snapshot aside (ZFS), on a dataset whose name only this record knows."""
    data = (read_json(_taken_path()) or {}).get("taken")
    if not isinstance(data, dict):
        return {}
    return {str(ds): [str(n) for n in names] for ds, names in data.items() if isinstance(names, list)}


def _record(datasets: Sequence[str], safety: str, *, taken: bool) -> None:
    record = _taken()
    for ds in datasets:
        names = [n for n in record.get(ds, []) if n != safety] + ([safety] if taken else [])
        if names:
            record[ds] = names
        else:
            record.pop(ds, None)
    write_json(_taken_path(), {"taken": record})


def rollback(
    group: Group,
    backend: StorageBackend,
    snapshot: str,
    now: datetime,
    *,
    force: bool = False,
    dry_run: bool = False,
) -> RollbackReport:
    """Roll ``group`` back to ``snapshot`` (see the module docstring).

    The plan (safety snapshot, where each dataset goes aside) is written to the state directory
    before anything changes and removed when all is done; a run after a crash finds it and finishes
    the same rollback instead of starting another.
    """
    if parse_snapshot_name(group.prefix, snapshot) is None:
        raise UsageError(f"{snapshot!r} is not one of group {group.name}'s snapshots (prefix {group.prefix!r})")
    pending = read_json(_plan_path(group.name))
    if pending is not None and pending.get("snapshot") != snapshot:
        raise UsageError(f"{unfinished_text(group.name, str(pending.get('snapshot')))} first")
    if pending is not None:
        return _resume(group, backend, snapshot, pending, dry_run)
    listings = {ds: {s.name: s for s in backend.list_snapshots(ds)} for ds in group.datasets}
    missing = [ds for ds, snaps in listings.items() if snapshot not in snaps]
    if missing:
        raise UsageError(f"group {group.name}: no snapshot {snapshot} of {', '.join(missing)} (`snapsync list {group.name}`)")
    safety = snapshot_name(group.prefix, now)
    while any(safety in snaps for snaps in listings.values()):  # a snapshot taken this very second
        now += timedelta(seconds=1)
        safety = snapshot_name(group.prefix, now)
    report = RollbackReport(group.name, snapshot, dry_run, safety)
    report.holders = backend.in_use(group.datasets)
    if report.holders and not force:
        lines = "; ".join(h.describe() for h in report.holders[:8])
        more = f" (and {len(report.holders) - 8} more)" if len(report.holders) > 8 else ""
        raise Busy(f"group {group.name} is in use: {lines}{more}; {_stop_hint(report.holders)}, or pass --force")
    if report.holders:
        report.notes.append("in use, rolled back anyway (--force): " + "; ".join(h.describe() for h in report.holders))
    report.steps.append(
        f"take safety snapshot {safety} of {', '.join(group.datasets)}, held as {safety_tag(safety)} "
        f"until `snapsync release {group.name} {safety}`"
    )
    for ds in group.datasets:
        report.aside[ds] = aside_name(ds, safety)
        report.steps.append(f"move {ds} aside to {report.aside[ds]}")
        report.steps.append(f"put {snapshot}'s state in place at {ds} ({backend.capabilities.rollback_copy})")
    report.notes += _target_notes(group, backend, listings, snapshot)
    if dry_run:
        return report
    write_json(_plan_path(group.name), {"snapshot": snapshot, "safety": safety, "aside": report.aside})
    _record(group.datasets, safety, taken=True)
    backend.snapshot_group(group.datasets, safety)
    for ds in group.datasets:
        backend.set_holds(ds, safety_tag(safety), [safety])
    return _swap_all(group, backend, snapshot, report)


def _resume(group: Group, backend: StorageBackend, snapshot: str, plan: dict[str, Any], dry_run: bool) -> RollbackReport:
    report = RollbackReport(group.name, snapshot, dry_run, str(plan.get("safety", "")))
    report.aside = {str(k): str(v) for k, v in dict(plan.get("aside", {})).items()}
    report.notes.append(f"finishing the interrupted rollback to {snapshot} (safety snapshot {report.safety})")
    for ds in group.datasets:
        state = "done" if backend.exists(report.aside.get(ds, "")) and backend.exists(ds) else "to do"
        report.steps.append(f"{ds}: {state}")
    if dry_run:
        return report
    return _swap_all(group, backend, snapshot, report)


def _swap_all(group: Group, backend: StorageBackend, snapshot: str, report: RollbackReport) -> RollbackReport:
    done: list[str] = []
    for ds in group.datasets:
        aside = report.aside[ds]
        if not (backend.exists(aside) and backend.exists(ds)):
            try:
                backend.rollback(ds, snapshot, aside)
            except SnapsyncError as e:
                raise type(e)(
                    f"{e}; rolled back so far: {', '.join(done) or 'nothing'} (safety snapshot {report.safety} holds "
                    f"the state of all); fix the cause and run `snapsync rollback {group.name} {snapshot}` again to finish"
                ) from e
        done.append(ds)
        if backend.capabilities.rollback_sets_newer_aside:
            # The newer snapshots went aside with the old state; they are no target's base any more.
            tags = {t for snap in backend.list_snapshots(aside) for t in snap.holds if is_target_tag(t)}
            for tag in sorted(tags):
                backend.set_holds(aside, tag, [])
    _plan_path(group.name).unlink(missing_ok=True)
    return report


def _target_notes(
    group: Group, backend: StorageBackend, listings: dict[str, dict[str, SnapshotInfo]], snapshot: str
) -> list[str]:
    """What the targets keep as base, and which will see a diverged history (where newer snapshots go aside)."""
    when = parse_snapshot_name(group.prefix, snapshot)
    assert when is not None
    notes = []
    for target in group.targets:
        held = sorted({
            n for snaps in listings.values() for n, s in snaps.items() if target_tag(target) in s.holds
        })
        if not held:
            continue
        newer = [n for n in held if (parse_snapshot_name(group.prefix, n) or when) > when]
        if backend.capabilities.rollback_sets_newer_aside and newer:
            notes.append(
                f"target {target}: its base {', '.join(held)} is newer than {snapshot} and moves aside with the old "
                f"state; its next send is refused as diverged unless on_diverged = \"rollback\" for it (which "
                f"drops its copies newer than {snapshot} and continues incrementally)"
            )
        else:
            notes.append(f"target {target}: base {', '.join(held)} stays; replication continues incrementally")
    return notes


def _safety_held(backend: StorageBackend, place: str, *, aside: bool = False) -> set[str]:
    """The safety snapshots held at ``place``; for an aside, none if there is no such dataset (any more)."""
    try:
        snapshots = backend.list_snapshots(place)
    except SnapsyncError:
        if not aside:
            raise
        return set()
    return {tag_subject(tag) for s in snapshots for tag in s.holds if is_safety_tag(tag)}


def _holding(backend: StorageBackend, ds: str, safety: str) -> list[str]:
    """Where ``safety`` is held for ``ds``: on it, or aside with the old state (where newer snapshots go)."""
    places = [ds] if safety in _safety_held(backend, ds) else []
    aside = aside_name(ds, safety)
    if backend.capabilities.rollback_sets_newer_aside and safety in _safety_held(backend, aside, aside=True):
        places.append(aside)
    return places


def held_safety(backend: StorageBackend, datasets: Sequence[str]) -> list[str]:
    """Every safety snapshot a rollback still holds for ``datasets``, wherever it left it."""
    taken = _taken()
    names = set()
    for ds in datasets:
        names |= _safety_held(backend, ds)
        if backend.capabilities.rollback_sets_newer_aside:
            for safety in taken.get(ds, []):
                names |= _safety_held(backend, aside_name(ds, safety), aside=True)
    return sorted(names)


def release(backend: StorageBackend, datasets: Sequence[str], safety: str) -> list[str]:
    """``snapsync release``: drop a rollback's hold on its safety snapshot, so retention may prune it,
    wherever the rollback left that snapshot; returns the datasets it was released for.

    A name that is no safety snapshot held there (a typo, a second release, an ordinary snapshot) is
    refused with the ones that are: reporting success would leave the real one held for ever.
    """
    holding = {ds: _holding(backend, ds, safety) for ds in datasets}
    if not any(holding.values()):
        held = held_safety(backend, datasets)
        there = f"the safety snapshots held there: {', '.join(held)}" if held else "no safety snapshot is held there"
        raise UsageError(f"{safety!r} is not a safety snapshot held for {', '.join(datasets)}; {there}")
    for places in holding.values():
        for place in places:
            backend.set_holds(place, safety_tag(safety), [])
    try:
        _record(datasets, safety, taken=False)
    except (OSError, SnapsyncError):
        pass  # the record only names asides for the list above, which checks every name it has anyway
    return [ds for ds, places in holding.items() if places]
