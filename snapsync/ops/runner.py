"""Carries out the pure plans for a timer's run: snapshot, prune, replicate, offsite, through the backends.

Each group is independent: a failure in one is recorded in its report and the others go on, so a
USB disk that is not plugged in does not stop the snapshots of everything else (exit status 1).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING

from snapsync.backends import backend_for
from snapsync.backends.base import SnapshotInfo, StorageBackend
from snapsync.clock import Clock
from snapsync.errors import BackendError, DatasetMissing, SnapsyncError, UsageError
from snapsync.ops.hooks import HookReport, Hooks, Moment
from snapsync.plan.naming import parse_snapshot_name, snapshot_name
from snapsync.plan.groups import GroupListing, is_due, merge_listing, next_due, plan_group_prune
from snapsync.plan.holds import (
    Held,
    Leftovers,
    is_pull_tag,
    is_safety_tag,
    is_target_tag,
    leftovers,
    lost_hold_pins,
    pull_tag,
    tag_subject,
    target_tag,
)
from snapsync.policy.loader import Group, Policy
from snapsync.policy.schema import DirTarget, LocalTarget, S3Target, SshTarget
from snapsync.protocol import dataset_key
from snapsync.replication.replicate import DatasetLink, LocalSource, ProgressFactory, Replication, Settings, TargetReport
from snapsync.plan.retention import PrunePlan
from snapsync.replication.transport import LocalTransport, SshTransport, transport_for

if TYPE_CHECKING:
    from snapsync.offsite.upload import Offsite

log = logging.getLogger("snapsync")
FREE_NAME_WAIT = 4
"""Seconds a snapshot waits at most for a name of its own (see :meth:`Runner._free_name`)."""


@dataclass
class GroupReport:
    """What happened to one group in one command; rendered by the CLI as a table or JSON."""

    group: str
    dry_run: bool = False
    snapshot: str | None = None
    not_due: str | None = None
    next_due: datetime | None = None
    plan: PrunePlan | None = None
    deleted: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    targets: list[TargetReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    """The kind of each error (snapshot, hook, replicate, pull, prune), for metrics."""
    hooks: list[HookReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """What is wrong but did not fail the run: nested datasets the snapshot left out."""

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
            "next_due": self.next_due.strftime("%Y-%m-%dT%H:%M:%SZ") if self.next_due else None,
            "deleted": self.deleted,
            "plan": self.plan.to_json() if self.plan is not None else None,
            "released_holds": self.released,
            "targets": [t.to_json() for t in self.targets],
            "hooks": [h.to_json() for h in self.hooks],
            "errors": self.errors,
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class HoldReview:
    """One dataset's holds as pruning will treat them (see :meth:`Runner.review_holds`)."""

    stale: dict[str, str]
    """Tags the next prune releases, with the reason."""
    pins: dict[str, list[str]]
    """Why each pinned snapshot is kept."""
    lost: dict[str, list[str]]
    """Holds recorded on snapshots that were deleted by hand, by tag."""
    leftovers: Leftovers

    def why(self, snap: SnapshotInfo) -> list[str]:
        """What keeps (or will drop) one snapshot or bookmark, for `list`."""
        if snap.kind == "bookmark":
            if snap.name in self.leftovers.drop_bookmarks:
                return [f"goes at the next prune: {self.leftovers.drop_bookmarks[snap.name]}"]
            kept = self.leftovers.kept_bookmarks.get(snap.name)
            return [kept] if kept else []
        whys = list(self.pins.get(snap.name, []))
        whys += [f"{t}: released at the next prune ({self.stale[t]})" for t in snap.holds if t in self.stale]
        return whys


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
        self._unreachable: dict[str, str] = {}
        """ssh and local targets that could not be reached in this run (one ``run`` or ``target_holdings``),
        after every retry: the run's other groups do not try them again."""

    def backend(self, group: Group) -> StorageBackend:
        if group.name not in self._backends:
            self._backends[group.name] = self._make_backend(group)
        return self._backends[group.name]

    def raw_listing(self, group: Group) -> dict[str, list[SnapshotInfo]]:
        backend = self.backend(group)
        return {dataset: backend.list_snapshots(dataset) for dataset in group.datasets}

    def listing(self, group: Group) -> GroupListing:
        return merge_listing(group.prefix, self.raw_listing(group))

    def _free_name(self, group: Group, now: datetime, name: str) -> str:
        """``name``, or when a snapshot of the group already has it (one taken this very second: a run a
        moment ago, or a rollback's safety snapshot, which takes the next free second), the name of a
        later second, waited for: names carry the second, and a snapshot is never dated ahead of the clock.
        A clock that does not move (the demo's, the tests') gets ``name`` back, and the backend refuses it."""
        for _ in range(FREE_NAME_WAIT):
            taken = {s.name for snaps in self.raw_listing(group).values() for s in snaps}
            if name not in taken:
                return name
            time.sleep(1.0 - time.time() % 1.0 + 0.01)
            later = self.clock.now()
            if later <= now:
                return name
            now, name = later, snapshot_name(group.prefix, later)
        return name

    def snapshot(self, group: Group, report: GroupReport, *, only_if_due: bool) -> None:
        now = self.clock.now()
        name = snapshot_name(group.prefix, now)
        if only_if_due:
            newest = self.listing(group).newest_before(now)
            if not is_due(newest.created if newest else None, group.interval, now):
                report.not_due = newest.name if newest else None
                report.next_due = next_due(newest.created, group.interval) if newest else None
                return
        name = self._free_name(group, now, name)
        if report.dry_run:
            for dataset in group.datasets:  # what snapshot_group checks first: the dry run fails where the run would
                self.backend(group).check_dataset(dataset)
            report.snapshot = name
            self._nested(group, report)
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
        self._nested(group, report)

    def _nested(self, group: Group, report: GroupReport) -> None:
        """Every snapshot says what it left out: nested datasets the policy neither lists nor excludes."""
        from snapsync.ops.preflight import nested_warnings

        for line in nested_warnings(self.policy, group, self.backend(group)):
            report.warnings.append(line)
            log.warning("group %s: %s", group.name, line, extra={"event": "nested-left-out", "group": group.name})

    def review_holds(self, group: Group, raw: Mapping[str, Sequence[SnapshotInfo]]) -> dict[str, HoldReview]:
        """Per dataset: which holds and bookmarks have outlived their use, and why each snapshot is pinned.

        Nothing is changed here: ``prune`` acts on it, ``list`` shows it.
        """
        backend = self.backend(group)
        now = self.clock.now()
        holders = [target_tag(t) for t in group.targets]
        reviews: dict[str, HoldReview] = {}
        for dataset, snaps in raw.items():
            entries = held_entries(group.prefix, snaps)
            lost_names = backend.lost_holds(dataset)
            lost = {tag: _newest_time(group.prefix, names) for tag, names in lost_names.items()}
            tags = {tag for e in entries for tag in e.holds} | set(lost)
            stale = {tag: "target no longer configured for this group" for tag in tags if _pin_reason(group, tag) is None}
            left = leftovers(entries, holders, {t: w for t, w in lost.items() if t not in stale}, now, group.hold_expiry)
            stale |= left.release
            pins: dict[str, list[str]] = {}
            for e in entries:
                for tag in e.holds:
                    reason = None if tag in stale else _pin_reason(group, tag)
                    if reason is not None and reason not in pins.setdefault(e.name, []):
                        pins[e.name].append(reason)
            reasons_for = {
                tag: f"{_pin_reason(group, tag)}; its held {', '.join(lost_names[tag])} was deleted by hand, "
                f"so every older snapshot is kept until it replicates again"
                for tag in lost if tag not in stale
            }
            for name, whys in lost_hold_pins(entries, lost, reasons_for).items():
                pins.setdefault(name, []).extend(w for w in whys if w not in pins.get(name, []))
            reviews[dataset] = HoldReview(stale, pins, lost_names, left)
        return reviews

    def replication_pins(self, group: Group, report: GroupReport, raw: Mapping[str, Sequence[SnapshotInfo]]) -> dict[str, list[str]]:
        """Pins for the group's own pruning: every snapshot a target (or a pulling host) still needs.

        Holds and bookmarks that have outlived their use go here, each reported: a target the group
        no longer lists, a pulling host that stopped fetching (``hold_expiry``), a bookmark no
        holder can need. A hold whose snapshot was deleted by hand pins every older snapshot until
        its holder's next replication finds the base both sides still share.
        """
        pinned: dict[str, list[str]] = {}
        backend = self.backend(group)
        for dataset, review in self.review_holds(group, raw).items():
            for tag, why in sorted(review.stale.items()):
                if not report.dry_run:
                    backend.set_holds(dataset, tag, [])
                report.released.append(f"{dataset}: {tag} ({why})")
            for name, whys in review.pins.items():
                pinned.setdefault(name, []).extend(w for w in whys if w not in pinned.get(name, []))
            doomed = sorted(review.leftovers.drop_bookmarks)
            if doomed:
                if not report.dry_run:
                    backend.drop_bookmarks(dataset, doomed)
                report.released += [f"{dataset}: bookmark #{n} ({review.leftovers.drop_bookmarks[n]})" for n in doomed]
        return pinned

    def prune(self, group: Group, report: GroupReport, *, drop_future: bool = False) -> None:
        if drop_future:
            self._drop_future(group, report)
        raw = self.raw_listing(group)
        listing = merge_listing(group.prefix, raw)
        if drop_future and report.dry_run:  # what the run would leave once they are deleted
            now = self.clock.now()
            listing = replace(listing, snapshots=tuple(s for s in listing.snapshots if s.created <= now))
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
        report.deleted += [d.name for d in plan.removed if d.name not in left]

    def _drop_future(self, group: Group, report: GroupReport) -> None:
        """Delete the snapshots dated after the clock, asked for by name of the option.

        One still held is refused: a target or pulling host holding it may have a copy, which its
        next replication on the right clock deletes while the source still has the original (and
        moves the hold back); deleting the original first would make that copy a divergence.
        """
        now = self.clock.now()
        backend = self.backend(group)
        for dataset, snaps in self.raw_listing(group).items():
            future = [e for e in held_entries(group.prefix, snaps) if e.kind == "snapshot" and e.created > now]
            for e in future:
                if e.holds:
                    report.errors.append(
                        f"prune --future {dataset}: {e.name} is held by {', '.join(e.holds)}; replicate first "
                        f"(that deletes the target's copy of it and moves the hold back), then run this again"
                    )
                    report.failures.append("prune")
            names = [e.name for e in future if not e.holds]
            if not names:
                continue
            if report.dry_run:
                report.deleted += [n for n in names if n not in report.deleted]
                continue
            try:
                backend.destroy(dataset, names)
            except SnapsyncError as e:
                report.errors.append(f"prune --future {dataset}: {e}")
                report.failures.append("prune")
            still = self._still_there(backend, dataset, names, report)
            gone = [n for n in names if n not in still]
            report.deleted += [n for n in gone if n not in report.deleted]
            if gone:
                log.warning("group %s: deleted %s of %s, dated after the clock", group.name, gone, dataset, extra={
                    "event": "pruned-future", "group": group.name, "dataset": dataset, "snapshots": gone})

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
            down = self._unreachable.get(name)
            done = _timed(lambda: replication.run(dry_run=report.dry_run, prune=prune, down=down))
            if done.unreachable is not None:
                self._unreachable[name] = done.unreachable
            report.targets.append(done)

    def target_holdings(self, groups: Iterable[Group], *, pulls: Sequence[str] = ()) -> dict[str, TargetHoldings]:
        """What every target of each group holds, and what each pull fetched here, by group or pull name.

        Both sides are listed and compared as replication would (lag, the steps a run would take), and
        nothing is changed: no snapshot, send, hold or prune, on either side.
        """
        self._unreachable = {}
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
        drop_future: bool = False,
    ) -> list[GroupReport]:
        """Snapshot (all groups first, so they share an instant as closely as possible), replicate, prune.

        Pruning comes last, so it sees the holds replication just moved forward.
        """
        self._unreachable = {}
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
                    self._guard(report, "prune", lambda: self.prune(group, report, drop_future=drop_future))
        return [r for _, r in reports] + pulled

    @staticmethod
    def _guard(report: GroupReport, what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except SnapsyncError as e:
            text = str(e)
            if isinstance(e, DatasetMissing):
                from snapsync.recovery.pending import unfinished, unfinished_text

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


def held_entries(prefix: str, snaps: Iterable[SnapshotInfo]) -> list[Held]:
    """Our snapshots and bookmarks of one dataset, with their holds, as the leftover rules take them."""
    return [
        Held(s.name, when, s.kind, s.holds)
        for s in snaps
        if (when := parse_snapshot_name(prefix, s.name)) is not None
    ]


def _newest_time(prefix: str, names: Iterable[str]) -> datetime | None:
    times = [parse_snapshot_name(prefix, n) for n in names]
    return None if any(t is None for t in times) or not times else max(t for t in times if t is not None)


def _timed(step: Callable[[], TargetReport]) -> TargetReport:
    started = time.monotonic()
    report = step()
    report.seconds = time.monotonic() - started
    return report
