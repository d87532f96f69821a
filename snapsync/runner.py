"""Carries out the pure plans against real backends: the only module that touches filesystems.

Each group is independent: a failure in one is recorded in its report and the others go on, so a
USB disk that is not plugged in does not stop the snapshots of everything else (exit status 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from snapsync.backends import backend_for
from snapsync.backends.base import SnapshotInfo, StorageBackend
from snapsync.clock import Clock
from snapsync.errors import BackendError, SnapsyncError, UsageError
from snapsync.naming import snapshot_name
from snapsync.planning import GroupListing, is_due, merge_listing, plan_group_prune
from snapsync.policy import Group, Policy
from snapsync.retention import PrunePlan

log = logging.getLogger("snapsync")


@dataclass
class GroupReport:
    """What happened to one group in one command; rendered by the CLI as a table or JSON."""

    group: str
    dry_run: bool = False
    snapshot: str | None = None
    not_due: str | None = None
    plan: PrunePlan | None = None
    deleted: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "snapshot": self.snapshot,
            "not_due": self.not_due,
            "deleted": self.deleted,
            "plan": self.plan.to_json() if self.plan is not None else None,
            "errors": self.errors,
        }


class ClockBehind(BackendError):
    """The clock is behind the group's newest snapshot: pruning now could drop what it should keep."""


def select_groups(policy: Policy, names: Sequence[str]) -> list[Group]:
    """The named groups in the order given, or all groups in policy order; unknown names exit 2."""
    if not names:
        return list(policy.groups.values())
    unknown = [n for n in names if n not in policy.groups]
    if unknown:
        known = ", ".join(policy.groups) or "none"
        raise UsageError(f"{policy.source}: no group named {', '.join(map(repr, unknown))} (groups: {known})")
    return [policy.groups[n] for n in dict.fromkeys(names)]


class Runner:
    def __init__(
        self,
        policy: Policy,
        clock: Clock,
        backends: Callable[[Group], StorageBackend] = backend_for,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self._make_backend = backends
        self._backends: dict[str, StorageBackend] = {}

    def backend(self, group: Group) -> StorageBackend:
        if group.name not in self._backends:
            self._backends[group.name] = self._make_backend(group)
        return self._backends[group.name]

    def raw_listing(self, group: Group) -> dict[str, list[SnapshotInfo]]:
        backend = self.backend(group)
        return {dataset: backend.list_snapshots(dataset) for dataset in group.datasets}

    def listing(self, group: Group) -> GroupListing:
        return merge_listing(group.prefix, self.raw_listing(group))

    def snapshot(self, group: Group, report: GroupReport, *, only_if_due: bool) -> None:
        if group.hooks:
            log.warning(
                "group %s: %d hook(s) declared, but this version of snapsync does not run hooks yet; "
                "the snapshot is crash-consistent only",
                group.name, len(group.hooks),
            )
        now = self.clock.now()
        name = snapshot_name(group.prefix, now)
        if only_if_due:
            newest = self.listing(group).newest_before(now)
            if not is_due(newest.created if newest else None, group.interval, now):
                report.not_due = newest.name if newest else None
                return
        if report.dry_run:
            report.snapshot = name
            return
        self.backend(group).snapshot_group(group.datasets, name)
        report.snapshot = name
        log.info("group %s: took snapshot %s of %d dataset(s)", group.name, name, len(group.datasets))

    def prune(self, group: Group, report: GroupReport, pinned: Mapping[str, Sequence[str]] | None = None) -> None:
        listing = self.listing(group)
        plan = plan_group_prune(listing, group.retention, self.clock.now(), pinned)
        report.plan = plan
        if plan.future:
            # Pruning is only equivalent to one plan over all history while the clock moves forward
            # (docs/retention.md); a snapshot from "the future" means it stepped back, so wait.
            future = ", ".join(d.name for d in plan.future)
            raise ClockBehind(
                f"group {group.name}: snapshot(s) dated after the clock ({future}); refusing to prune "
                f"until the clock passes them (fix the clock, or delete them by hand if they are bogus)"
            )
        if report.dry_run:
            return
        backend = self.backend(group)
        doomed = {d.name for d in plan.removed}
        per_dataset: dict[str, list[str]] = {}
        for snap in listing.snapshots:
            if snap.name in doomed:
                for dataset in snap.datasets:
                    per_dataset.setdefault(dataset, []).append(snap.name)
        for dataset, names in per_dataset.items():
            try:
                backend.destroy(dataset, names)
            except SnapsyncError as e:
                report.errors.append(f"prune {dataset}: {e}")
                continue
            log.info("group %s: pruned %d snapshot(s) of %s", group.name, len(names), dataset)
        report.deleted = [d.name for d in plan.removed]

    def run(
        self,
        groups: Iterable[Group],
        *,
        take: bool,
        only_due: bool,
        prune: bool,
        dry_run: bool = False,
    ) -> list[GroupReport]:
        """Snapshot (all groups first, so they share an instant as closely as possible), then prune."""
        reports: list[tuple[Group, GroupReport]] = []
        for group in groups:
            report = GroupReport(group.name, dry_run=dry_run)
            reports.append((group, report))
            if take:
                self._guard(report, "snapshot", lambda: self.snapshot(group, report, only_if_due=only_due))
        if prune:
            for group, report in reports:
                if report.ok:
                    self._guard(report, "prune", lambda: self.prune(group, report))
        return [r for _, r in reports]

    @staticmethod
    def _guard(report: GroupReport, what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except SnapsyncError as e:
            report.errors.append(f"{what}: {e}")
            log.error("group %s: %s failed: %s", report.group, what, e)
