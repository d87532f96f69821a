"""Carries out the pure plans for a timer's run: snapshot, prune, replicate, offsite, through the backends.

Each group is independent: a failure in one is recorded in its report and the others go on, so a
USB disk that is not plugged in does not stop the snapshots of everything else (exit status 1).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from snapsync.backends import backend_for
from snapsync.backends.base import SnapshotInfo, StorageBackend
from snapsync.clock import Clock
from snapsync.errors import BackendError, DatasetMissing, SnapsyncError, UsageError
from snapsync.ops.hooks import HookReport, Hooks, Moment
from snapsync.plan.naming import snapshot_name
from snapsync.plan.groups import GroupListing, is_due, merge_listing, plan_group_prune
from snapsync.plan.holds import is_pull_tag, is_safety_tag, is_target_tag, pull_tag, tag_subject, target_tag
from snapsync.policy.loader import Group, Policy
from snapsync.policy.schema import DirTarget, LocalTarget, S3Target, SshTarget
from snapsync.protocol import dataset_key
from snapsync.replication.replicate import DatasetLink, LocalSource, ProgressFactory, Replication, Settings, TargetReport
from snapsync.plan.retention import PrunePlan
from snapsync.replication.transport import LocalTransport, SshTransport, transport_for

if TYPE_CHECKING:
    from snapsync.offsite.upload import Offsite

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
    released: list[str] = field(default_factory=list)
    targets: list[TargetReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """The kind of each error (snapshot, hook, replicate, pull, prune), for metrics."""
    hooks: list[HookReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(t.ok for t in self.targets)

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "snapshot": self.snapshot,
            "not_due": self.not_due,
            "deleted": self.deleted,
            "plan": self.plan.to_json() if self.plan is not None else None,
            "released_holds": self.released,
            "targets": [t.to_json() for t in self.targets],
            "hooks": [h.to_json() for h in self.hooks],
            "errors": self.errors,
        }


@dataclass
class TargetHoldings:
    """What the targets of one group (or the source of one pull) hold, as `list` and `check` ask it."""

    targets: list[TargetReport]
    """One per target asked, in the group's order: copies held, lag, what the next run would send."""
    errors: list[str]
    """Why the targets not in ``targets`` could not be asked (their replication could not even start)."""


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


def select_targets(policy: Policy, names: Sequence[str]) -> list[str]:
    """Check target (and pull) names; returns the pulls to run: those named, or all when none are.

    Unknown names exit 2 before anything is done.
    """
    unknown = [n for n in names if n not in policy.targets and n not in policy.pulls]
    if unknown:
        known = ", ".join([*policy.targets, *policy.pulls]) or "none"
        raise UsageError(f"{policy.source}: no target or pull named {', '.join(map(repr, unknown))} (known: {known})")
    return [n for n in policy.pulls if not names or n in names]


class Runner:
    def __init__(
        self,
        policy: Policy,
        clock: Clock,
        backends: Callable[[Group], StorageBackend] = backend_for,
        progress: ProgressFactory | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.progress = progress
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
        now = self.clock.now()
        name = snapshot_name(group.prefix, now)
        if only_if_due:
            newest = self.listing(group).newest_before(now)
            if not is_due(newest.created if newest else None, group.interval, now):
                report.not_due = newest.name if newest else None
                return
        if report.dry_run:
            for dataset in group.datasets:  # what snapshot_group checks first: the dry run fails where the run would
                self.backend(group).check_dataset(dataset)
            report.snapshot = name
            return
        hooks = Hooks(group.hooks, Moment(group.name, name, tuple(group.datasets)))
        try:
            with hooks.around() as proceed:
                if proceed:
                    self.backend(group).snapshot_group(group.datasets, name)
                    report.snapshot = name
        finally:
            report.hooks = hooks.reports
            for failed in hooks.failed:
                if failed.status == "cleanup-failed":
                    what = "after the snapshot"
                else:
                    what = "snapshot skipped" if report.snapshot is None else f"snapshot {name} taken anyway"
                report.errors.append(f"hook {failed.index} ({failed.kind}) {failed.status}: {failed.message} ({what})")
                report.failures.append("hook")
        if report.snapshot is None:
            return
        for hook in hooks.reports:
            if hook.backup_label is not None:
                self.backend(group).annotate(group.datasets[0], name, "backup_label", hook.backup_label)
        log.info("group %s: took snapshot %s of %d dataset(s)", group.name, name, len(group.datasets), extra={
            "event": "snapshot", "group": group.name, "snapshot": name, "datasets": len(group.datasets)})

    def replication_pins(self, group: Group, report: GroupReport, raw: Mapping[str, Sequence[SnapshotInfo]]) -> dict[str, list[str]]:
        """Pins for the group's own pruning: every snapshot a target (or a pulling host) still needs.

        Holds of targets the group no longer lists are stale: they are released (and reported) so a
        removed target does not pin snapshots forever.
        """
        pinned: dict[str, list[str]] = {}
        stale: dict[tuple[str, str], None] = {}
        for dataset, snaps in raw.items():
            for snap in snaps:
                for tag in snap.holds:
                    reason = _pin_reason(group, tag)
                    if reason is None:
                        stale[(dataset, tag)] = None
                        continue
                    reasons = pinned.setdefault(snap.name, [])
                    if reason not in reasons:
                        reasons.append(reason)
        for dataset, tag in stale:
            if not report.dry_run:
                self.backend(group).set_holds(dataset, tag, [])
            report.released.append(f"{dataset}: {tag} (target no longer configured for this group)")
        return pinned

    def prune(self, group: Group, report: GroupReport) -> None:
        raw = self.raw_listing(group)
        listing = merge_listing(group.prefix, raw)
        pinned = self.replication_pins(group, report, raw)
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
        left: set[str] = set()
        for dataset, names in per_dataset.items():
            try:
                backend.destroy(dataset, names)
                gone = names
            except SnapsyncError as e:
                report.errors.append(f"prune {dataset}: {e}")
                report.failures.append("prune")
                still = self._still_there(backend, dataset, names, report)
                left |= still
                gone = [n for n in names if n not in still]
            if gone:
                log.info("group %s: pruned %d snapshot(s) of %s", group.name, len(gone), dataset, extra={
                    "event": "pruned", "group": group.name, "dataset": dataset, "snapshots": gone})
        report.deleted = [d.name for d in plan.removed if d.name not in left]

    @staticmethod
    def _still_there(backend: StorageBackend, dataset: str, names: Sequence[str], report: GroupReport) -> set[str]:
        """Which of ``names`` a destroy that failed left: the report counts only what is gone."""
        try:
            present = {s.name for s in backend.list_snapshots(dataset) if s.kind == "snapshot"}
        except SnapsyncError as e:
            report.errors.append(f"prune {dataset}: cannot tell what was deleted, so none is counted: {e}")
            return set(names)
        return present & set(names)

    def replication(self, group: Group, target_name: str) -> Replication | None:
        target = self.policy.targets[target_name]
        if not isinstance(target, (SshTarget, LocalTarget)):
            return None
        transport = transport_for(target_name, target)
        from snapsync.replication.peer import Peer

        return Replication(
            group=group.name,
            target=target_name,
            prefix=group.prefix,
            links=[DatasetLink(ds, f"{group.name}/{dataset_key(ds)}") for ds in group.datasets],
            source=LocalSource(self.backend(group)),
            sink=Peer(transport, "receive"),
            settings=Settings.of(target),
            hold_tag=target_tag(target_name),
            now=self.clock.now,
            progress=self.progress,
        )

    def pull(self, name: str, report: GroupReport, prune: bool) -> None:
        """Fetch from a source host into a local directory: the same replication, the other way round."""
        from snapsync.replication.peer import Peer
        from snapsync.replication.replicate import RemoteSource

        pull = self.policy.pulls[name]
        here = self.policy.host or socket.gethostname().split(".")[0]
        replication = Replication(
            group=name,
            target=name,
            prefix=pull.prefix or self.policy.defaults.prefix,
            links=[DatasetLink(pull.relative(ds), f"{name}/{dataset_key(ds)}") for ds in pull.datasets],
            source=RemoteSource(Peer(SshTransport.from_target(name, pull), "send")),
            sink=Peer(LocalTransport(name, pull.into), "receive"),
            settings=Settings.of(pull),
            hold_tag=pull_tag(here, name),
            now=self.clock.now,
            direction="pull",
            progress=self.progress,
        )
        report.targets.append(_timed(lambda: replication.run(dry_run=report.dry_run, prune=prune)))

    def offsite(self, group: Group, target_name: str) -> Offsite:
        from snapsync.offsite.upload import Offsite

        target = self.policy.targets[target_name]
        assert isinstance(target, (DirTarget, S3Target))
        return Offsite(
            group=group, target_name=target_name, target=target, backend=self.backend(group),
            now=self.clock.now, progress=self.progress, host=self.policy.host,
        )

    def replicate(self, group: Group, report: GroupReport, targets: Sequence[str] | None, prune: bool) -> None:
        for name in group.targets:
            if targets and name not in targets:
                continue
            if isinstance(self.policy.targets[name], (DirTarget, S3Target)):
                offsite = self.offsite(group, name)
                report.targets.append(_timed(lambda: offsite.run(dry_run=report.dry_run, prune=prune)))
                continue
            replication = self.replication(group, name)
            assert replication is not None
            report.targets.append(_timed(lambda: replication.run(dry_run=report.dry_run, prune=prune)))

    def target_holdings(self, groups: Iterable[Group], *, pulls: Sequence[str] = ()) -> dict[str, TargetHoldings]:
        """What every target of each group holds, and what each pull fetched here, by group or pull name.

        Both sides are listed and compared as replication would (lag, the steps a run would take), and
        nothing is changed: no snapshot, send, hold or prune, on either side.
        """
        found: dict[str, TargetHoldings] = {}
        for group in groups:
            report = GroupReport(group.name, dry_run=True)
            self._guard(report, "replicate", lambda: self.replicate(group, report, None, prune=False))
            found[group.name] = TargetHoldings(report.targets, report.errors)
        for name in pulls:
            report = GroupReport(name, dry_run=True)
            self._guard(report, "pull", lambda: self.pull(name, report, prune=False))
            found[name] = TargetHoldings(report.targets, report.errors)
        return found

    def run(
        self,
        groups: Iterable[Group],
        *,
        take: bool,
        only_due: bool,
        prune: bool,
        dry_run: bool = False,
        replicate: bool = False,
        targets: Sequence[str] | None = None,
        prune_targets: bool = True,
        pulls: Sequence[str] = (),
    ) -> list[GroupReport]:
        """Snapshot (all groups first, so they share an instant as closely as possible), replicate, prune.

        Pruning comes last, so it sees the holds replication just moved forward.
        """
        reports: list[tuple[Group, GroupReport]] = []
        for group in groups:
            report = GroupReport(group.name, dry_run=dry_run)
            reports.append((group, report))
            if take:
                self._guard(report, "snapshot", lambda: self.snapshot(group, report, only_if_due=only_due))
        if replicate:
            for group, report in reports:
                self._guard(report, "replicate", lambda: self.replicate(group, report, targets, prune_targets))
        pulled = []
        for name in pulls:
            report = GroupReport(name, dry_run=dry_run)
            pulled.append(report)
            self._guard(report, "pull", lambda: self.pull(name, report, prune_targets))
        if prune:
            for group, report in reports:
                if not report.errors:  # a failed target must not stop pruning: its base is pinned
                    self._guard(report, "prune", lambda: self.prune(group, report))
        return [r for _, r in reports] + pulled

    @staticmethod
    def _guard(report: GroupReport, what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except SnapsyncError as e:
            text = str(e)
            if isinstance(e, DatasetMissing):
                from snapsync.recovery.rollback import unfinished, unfinished_text

                if (target := unfinished(report.group)) is not None:
                    text += f" ({unfinished_text(report.group, target)})"
            report.errors.append(f"{what}: {text}")
            report.failures.append(what)
            log.error("group %s: %s failed: %s", report.group, what, text, extra={"event": f"{what}-failed", "group": report.group})


def _pin_reason(group: Group, tag: str) -> str | None:
    """Why a hold keeps a snapshot; None for the hold of a target the group no longer lists."""
    name = tag_subject(tag)
    if is_target_tag(tag):
        return f"replication base for {name}" if name in group.targets else None
    if is_pull_tag(tag):
        return f"replication base for {name} (pulls from here)"
    if is_safety_tag(tag):
        return f"safety snapshot of a rollback (release with `snapsync release {group.name} {name}`)"
    return f"held by {tag} (not snapsync's hold; release it yourself)"


def _timed(step: Callable[[], TargetReport]) -> TargetReport:
    started = time.monotonic()
    report = step()
    report.seconds = time.monotonic() - started
    return report
