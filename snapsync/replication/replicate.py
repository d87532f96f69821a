"""Carries out replication plans: lists both sides, plans with :mod:`snapsync.plan.replication`, sends.

One :class:`Replication` moves one group's datasets to one target (push) or from one source host
(pull). The snapshot source and the receiving side are interchangeable parts: locally a backend and
``btrfs send``; remotely a :class:`~snapsync.replication.peer.Peer` session. Receiving always goes through
``snapsync serve`` (over ssh, or as a local subprocess for a local target or a pull), so every copy
is committed the same way (see :mod:`snapsync.backends.btrfs_receiver`).

Safety rules kept here: the source is only ever read (apart from the hold that marks the base a
target needs, moved forward only after the target confirmed a copy); a conflict stops that dataset
and is reported; transient failures are retried with backoff, then reported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from tenacity import Retrying

from snapsync.backends.base import SnapshotInfo, StorageBackend
from snapsync.policy.durations import format_duration
from snapsync.errors import BackendError, RemoteRefused, SnapsyncError, TransientError
from snapsync.plan.naming import parse_snapshot_name
from snapsync.replication.peer import Peer
from snapsync.plan.groups import group_snapshots
from snapsync.policy.schema import LocalTarget, SshTarget
from snapsync.plan.replication import (
    DeletePartial,
    DropFutureCopy,
    ReplicationPlan,
    Resume,
    RollbackTarget,
    SendFull,
    SendIncremental,
    Step,
    TargetSnapshot,
    plan_replication,
)
from snapsync.plan.retention import PrunePlan, RetentionRules, plan_prune
from snapsync.plan.snapshots import SnapshotId, our_snapshots
from snapsync.retry import retrying
from snapsync.backends.receiver import Copy, PartialDelete, PartialReceive
from snapsync.host.streams import Meter, Proc

log = logging.getLogger("snapsync")



class SnapshotSource(Protocol):
    """Where snapshots come from: this host's backend (push) or a remote ``serve --role send`` (pull)."""

    def snapshots(self, datasets: Sequence[str]) -> dict[str, list[SnapshotInfo]]:
        """Every snapshot of each dataset, ours and foreign; one round trip for a remote source."""
        ...

    def start_send(self, dataset: str, name: str | None, base: str | None, compress: str, token: str | None = None) -> list[Proc]:
        """A running pipeline whose last process's stdout is the (possibly compressed) stream.

        ``base`` is a snapshot name or ``#name`` for a ZFS bookmark; with a ZFS resume ``token`` the
        stream continues an interrupted send instead (``name`` and ``base`` are then unused).
        """
        ...

    def start_chain(self, dataset: str, names: Sequence[str], base: str, compress: str) -> list[Proc] | None:
        """A pipeline writing the streams of ``names`` in turn, each built on the one before (the first
        on ``base``), for one chained receive; None where this source sends one snapshot per stream."""
        ...

    def hold(self, dataset: str, tag: str, names: Sequence[str]) -> None: ...

    def lost(self, dataset: str, tag: str) -> list[str]:
        """Snapshots ``tag`` held that were deleted behind snapsync's back: the target had them."""
        ...

    def estimate(self, dataset: str, name: str, base: str | None) -> int | None: ...

    def connected(self) -> AbstractContextManager[None]: ...


class LocalSource:
    def __init__(self, backend: StorageBackend) -> None:
        self.backend = backend

    def snapshots(self, datasets: Sequence[str]) -> dict[str, list[SnapshotInfo]]:
        return {d: self.backend.list_snapshots(d) for d in datasets}

    def start_send(self, dataset: str, name: str | None, base: str | None, compress: str, token: str | None = None) -> list[Proc]:
        if token is not None:
            argv = self.backend.resume_argv(token)
        else:
            assert name is not None
            argv = self.backend.send_argv(dataset, name, base)
        return self._pipeline(argv, compress)

    def start_chain(self, dataset: str, names: Sequence[str], base: str, compress: str) -> list[Proc] | None:
        if not self.backend.capabilities.chained_send or base.startswith("#"):
            return None
        return self._pipeline(self.backend.chain_argv(dataset, names, base), compress)

    def _pipeline(self, argv: list[str], compress: str) -> list[Proc]:
        send = Proc.start(argv, stdout=-1, label=f"{self.backend.kind} send")
        if compress != "zstd":
            return [send]
        assert send.popen.stdout is not None
        try:
            zstd = Proc.start(["zstd", "-1", "-T0", "-q", "-c"], stdin=send.popen.stdout, stdout=-1, label="zstd")
        except BaseException:
            send.kill()
            send.wait()
            raise
        send.popen.stdout.close()
        return [send, zstd]

    def hold(self, dataset: str, tag: str, names: Sequence[str]) -> None:
        self.backend.set_holds(dataset, tag, names)

    def lost(self, dataset: str, tag: str) -> list[str]:
        return self.backend.lost_holds(dataset).get(tag, [])

    def connected(self) -> AbstractContextManager[None]:
        return nullcontext()

    def estimate(self, dataset: str, name: str, base: str | None) -> int | None:
        return self.backend.estimate(dataset, name, base)


class RemoteSource:
    """A source host running ``snapsync serve --role send``; datasets are paths below its root."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def snapshots(self, datasets: Sequence[str]) -> dict[str, list[SnapshotInfo]]:
        raw = self.peer.list_paths(datasets)
        return {d: [SnapshotInfo.from_json(d, s) for s in raw.get(d, [])] for d in datasets}

    def start_send(self, dataset: str, name: str | None, base: str | None, compress: str, token: str | None = None) -> list[Proc]:
        proc, _ = self.peer.open_send(dataset, name, base, compress, token)
        return [proc]

    def start_chain(self, dataset: str, names: Sequence[str], base: str, compress: str) -> list[Proc] | None:
        return None  # a send session hands out one snapshot

    def hold(self, dataset: str, tag: str, names: Sequence[str]) -> None:
        self.peer.hold(dataset, tag, names)

    def lost(self, dataset: str, tag: str) -> list[str]:
        """Not asked over the wire: a pull plans from what both sides list (its base is their newest common)."""
        return []

    def connected(self) -> AbstractContextManager[None]:
        return self.peer.connected()

    def estimate(self, dataset: str, name: str, base: str | None) -> int | None:
        return None


@dataclass
class Sent:
    dataset: str
    name: str
    base: str | None
    bytes: int
    seconds: float

    def to_json(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "name": self.name,
            "kind": "full" if self.base is None else "incremental",
            "base": self.base,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class TargetReport:
    """What happened between one group and one target; rendered by the CLI, or as JSON."""

    group: str
    target: str
    direction: Literal["push", "pull"] = "push"
    dry_run: bool = False
    planned: list[str] = field(default_factory=list)
    pending: int = 0
    """Sends the plan called for (all of them, in a dry run or when a step failed)."""
    sent: list[Sent] = field(default_factory=list)
    removed_partials: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None
    newest_source: str | None = None
    newest_common: str | None = None
    lag: timedelta | None = None
    max_lag: timedelta | None = None
    held_back: list[str] = field(default_factory=list)
    prune: PrunePlan | None = None
    pruned: list[str] = field(default_factory=list)
    have: dict[str, list[str]] = field(default_factory=dict)
    """Complete copies on the target per dataset, after this run (what `list` shows)."""
    newest_common_time: datetime | None = None
    """When ``newest_common`` was taken: how fresh the target's copy of the whole group is."""
    seconds: float = 0.0
    reached: bool = False
    """The target answered (its listing came back), whatever went wrong afterwards."""
    unreachable: str | None = None
    """Why the target could not be reached, after every retry: the rest of the run does not try it again."""

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def lagging(self) -> bool:
        return self.max_lag is not None and self.lag is not None and self.lag > self.max_lag

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes for s in self.sent)

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group,
            "target": self.target,
            "direction": self.direction,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "skipped": self.skipped,
            "planned": self.planned,
            "pending": self.pending,
            "sent": [s.to_json() for s in self.sent],
            "bytes_sent": self.bytes_sent,
            "removed_partials": self.removed_partials,
            "rolled_back": self.rolled_back,
            "newest_source": self.newest_source,
            "newest_common": self.newest_common,
            "newest_common_time": None if self.newest_common_time is None else self.newest_common_time.isoformat(),
            "lag_seconds": None if self.lag is None else int(self.lag.total_seconds()),
            "seconds": round(self.seconds, 3),
            "reached": self.reached,
            "max_lag_seconds": None if self.max_lag is None else int(self.max_lag.total_seconds()),
            "lagging": self.lagging,
            "held_back": self.held_back,
            "notes": self.notes,
            "errors": self.errors,
            "prune": None if self.prune is None else self.prune.to_json(),
            "pruned": self.pruned,
            "have": self.have,
        }


@dataclass(frozen=True)
class Settings:
    """The target's side of the policy, as far as moving and pruning copies goes."""

    retention: RetentionRules | None
    on_diverged: Literal["refuse", "rollback"] = "refuse"
    compress: Literal["none", "zstd"] = "none"
    rate_limit: int | None = None
    max_lag: timedelta | None = None

    @classmethod
    def of(cls, target: SshTarget | LocalTarget) -> Settings:
        """A target's (or a pull's, which is an ssh target too) replication keys."""
        return cls(
            retention=target.retention,
            on_diverged=target.on_diverged,
            compress=target.compress,
            rate_limit=target.rate_limit,
            max_lag=target.max_lag,
        )


ProgressFactory = Callable[[str, int | None], Callable[[int], None] | None]
"""(description, estimated bytes) -> a callback taking bytes so far, or None for no progress."""


def describe(step: Step) -> str:
    if isinstance(step, SendFull):
        return f"full send {step.snapshot.name} (no common base on the target)"
    if isinstance(step, SendIncremental):
        return f"incremental {step.base.name} -> {step.snapshot.name}"
    if isinstance(step, DeletePartial):
        return f"delete partial copy {step.name} left by an interrupted receive"
    if isinstance(step, DropFutureCopy):
        return f"delete the copy of {step.name}, dated after this host's clock (the source keeps it)"
    if isinstance(step, RollbackTarget):
        return f"roll target back to {step.to}, destroying {', '.join(step.destroys)}"
    return f"resume receive ({step.token[:16]}...)"


def ours(prefix: str, name: str) -> datetime | None:
    return parse_snapshot_name(prefix, name)


def _chain(steps: Sequence[Step]) -> list[SendIncremental]:
    """The incrementals at the head of ``steps`` that each build on the one before: one chain."""
    chain: list[SendIncremental] = []
    for step in steps:
        if not isinstance(step, SendIncremental) or (chain and step.base.name != chain[-1].snapshot.name):
            break
        chain.append(step)
    return chain


def _send_base(step: SendFull | SendIncremental) -> str | None:
    """The base as a send names it: a snapshot, or ``#name`` for a ZFS bookmark."""
    if isinstance(step, SendFull):
        return None
    return f"#{step.base.name}" if step.base.kind == "bookmark" else step.base.name


def _copies(listing: dict[str, list[dict[str, Any]]], path: str) -> list[Copy]:
    """A receiver's copies of one dataset, from its wire form."""
    return [Copy.from_json(c) for c in listing.get(path, [])]


def target_entries(prefix: str, copies: Sequence[Copy]) -> list[TargetSnapshot]:
    """Our copies oldest first; partials (in ``.incoming``) are listed whatever their name."""
    entries: list[tuple[datetime, TargetSnapshot]] = []
    partials: list[TargetSnapshot] = []
    for c in copies:
        if c.partial:
            partials.append(TargetSnapshot(c.name, c.received_uuid, complete=False))
            continue
        when = ours(prefix, c.name)
        if when is None:
            continue
        complete = c.read_only and c.received_uuid is not None
        entries.append((when, TargetSnapshot(c.name, c.received_uuid, complete=complete, writable_changed=not complete)))
    entries.sort(key=lambda x: (x[0], x[1].name))
    return partials + [t for _, t in entries]


@dataclass(frozen=True)
class DatasetLink:
    """One dataset of the group: ``ref`` names it at the source, ``path`` below the target's root."""

    ref: str
    path: str


class Replication:
    def __init__(
        self,
        *,
        group: str,
        target: str,
        prefix: str,
        links: Sequence[DatasetLink],
        source: SnapshotSource,
        sink: Peer,
        settings: Settings,
        hold_tag: str,
        now: Callable[[], datetime],
        direction: Literal["push", "pull"] = "push",
        progress: ProgressFactory | None = None,
    ) -> None:
        self.group = group
        self.target = target
        self.prefix = prefix
        self.links = list(links)
        self.source = source
        self.sink = sink
        self.settings = settings
        self.hold_tag = hold_tag
        self.now = now
        self.direction = direction
        self.progress = progress
        self._have: dict[str, dict[str, SnapshotId]] = {}
        """Complete copies on the target per dataset path, by name, kept current as steps succeed."""
        self._unsure: set[str] = set()
        """Dataset paths a chain was sent to: a retry lists them again, whatever the failure said."""
        self._no_chain = False
        """One snapshot per stream for the rest of this run: the source or the target has no chains."""
        self._rewound: set[str] = set()
        """Dataset paths whose newest copy was just dropped (dated after the clock): the next receive
        there rolls the live dataset back to the base first (a ZFS target still holds that state)."""

    def _retrying(self) -> Retrying:
        return retrying(f"{self.group} -> {self.target}")

    def run(self, *, dry_run: bool = False, prune: bool = True, down: str | None = None) -> TargetReport:
        """``down``: why the target was found unreachable earlier in this run; it is not tried again,
        and the report says so with the lag and the holds as a failed attempt would."""
        with self.source.connected(), self.sink.connected():
            return self._run(dry_run, prune, down)

    def _run(self, dry_run: bool, prune: bool, down: str | None = None) -> TargetReport:
        report = TargetReport(self.group, self.target, self.direction, dry_run, max_lag=self.settings.max_lag)
        try:
            sources: dict[str, list[SnapshotInfo]] = self._retrying()(self.source.snapshots, [link.ref for link in self.links])
        except SnapsyncError as e:
            report.errors.append(f"cannot list the source: {e}")
            return report
        if down is not None:
            report.unreachable = down
            report.errors.append(f"target unreachable earlier in this run, not tried again: {down}")
            self._lag(report, sources, {})
            return report
        try:
            listing, tokens = self._retrying()(self.sink.listing, [link.path for link in self.links])
        except SnapsyncError as e:
            if isinstance(e, TransientError):
                report.unreachable = str(e)
            report.errors.append(f"target unreachable: {e}" if isinstance(e, TransientError) else str(e))
            self._lag(report, sources, {})
            return report
        report.reached = True
        commons: dict[str, str | None] = {}
        for link in self.links:
            copies = _copies(listing, link.path)
            try:
                commons[link.path] = self._retrying()(
                    self._dataset, link, sources[link.ref], copies, tokens.get(link.path), report, dry_run
                )
            except SnapsyncError as e:
                report.errors.append(f"{link.ref}: {e}")
                commons[link.path] = None
        self._lag(report, sources, commons)
        if prune and self.settings.retention is not None and not report.errors:
            try:
                self._prune(report, commons, dry_run)
            except SnapsyncError as e:
                report.errors.append(f"prune on target: {e}")
        report.have = {link.ref: self._oldest_first(link) for link in self.links}
        return report

    def _oldest_first(self, link: DatasetLink) -> list[str]:
        have = self._have.get(link.path, {}).values()
        return [s.name for s in sorted(have, key=lambda s: (s.created, s.name))]

    def _listing(self, link: DatasetLink) -> tuple[list[Copy], str | None]:
        listing, tokens = self.sink.listing([link.path])
        return _copies(listing, link.path), tokens.get(link.path)

    def _plan(
        self, source: Sequence[SnapshotId], copies: Sequence[Copy], token: str | None, sent_before: Sequence[str] = ()
    ) -> ReplicationPlan:
        return plan_replication(
            source, target_entries(self.prefix, copies), token, on_diverged=self.settings.on_diverged,
            now=self.now(), sent_before=sent_before,
        )

    def _complete(self, copies: Sequence[Copy]) -> dict[str, SnapshotId]:
        """Our complete copies; each carries the identity of the source snapshot it copies."""
        have: dict[str, SnapshotId] = {}
        for c in copies:
            when = ours(self.prefix, c.name)
            if not c.partial and c.read_only and c.received_uuid and when is not None:
                have[c.name] = SnapshotId(c.name, when, c.received_uuid)
        return have

    def _dataset(
        self,
        link: DatasetLink,
        snaps: list[SnapshotInfo],
        copies: list[Copy],
        token: str | None,
        report: TargetReport,
        dry_run: bool,
    ) -> str | None:
        """Bring one dataset up to date; returns the name of the newest common snapshot afterwards."""
        if report.sent or report.removed_partials or link.path in self._unsure:  # a retry: the first attempt changed the target
            copies, token = self._listing(link)
        source = our_snapshots(self.prefix, snaps)
        lost = self.source.lost(link.ref, self.hold_tag)
        plan = self._plan(source, copies, token, lost)
        if plan.needs_replan:  # an interrupted ZFS receive: finish it first, then plan what remains
            copies = self._resume_first(link, plan, copies, report, dry_run)
            plan = self._plan(source, copies, None, lost)
        self._have[link.path] = self._complete(copies)
        if plan.future:
            note = (f"{link.ref}: {', '.join(plan.future)} dated after this host's clock: not sent and never a base "
                    f"(the clock was wrong when it was taken; see `snapsync check`)")
            if note not in report.notes:
                report.notes.append(note)
        if lost and plan.conflict is None:
            report.notes.append(
                f"{link.ref}: held base {', '.join(lost)} was deleted on the source; "
                + (f"continuing from {plan.base}, the newest snapshot both sides share" if plan.base else "no older common snapshot")
            )
        if plan.conflict is not None:
            raise BackendError(plan.conflict.message())
        report.planned += [f"{link.ref}: {describe(step)}" for step in plan.steps]
        report.pending += sum(isinstance(step, (SendFull, SendIncremental)) for step in plan.steps)
        if dry_run:
            for step in plan.steps:
                if isinstance(step, DropFutureCopy):
                    self._have[link.path].pop(step.name, None)
            return plan.base
        common = plan.base
        steps = list(plan.steps)
        while steps:
            chain = _chain(steps)
            if len(chain) > 1 and not self._no_chain:
                sent = self._send_chain(link, chain, report)
                if sent is not None:
                    common = sent
                    del steps[: len(chain)]
                    continue
            common = self._execute(link, steps.pop(0), report) or common
        if common is not None and common == plan.base:
            self.source.hold(link.ref, self.hold_tag, [common])
        return common

    def _resume_first(
        self, link: DatasetLink, plan: ReplicationPlan, copies: list[Copy], report: TargetReport, dry_run: bool
    ) -> list[Copy]:
        """Finish the interrupted receive the plan found; returns what the target holds afterwards."""
        for step in plan.steps:
            if not isinstance(step, Resume):
                continue
            report.planned.append(f"{link.ref}: {describe(step)}")
            report.pending += 1
            if not dry_run:
                self._resume(link, step.token, report)
                copies = self._listing(link)[0]
        return copies

    def _execute(self, link: DatasetLink, step: Step, report: TargetReport) -> str | None:
        """One step of the plan; returns the snapshot it made common, if it sent one."""
        have = self._have[link.path]
        if isinstance(step, DropFutureCopy):
            deleted = self.sink.delete(link.path, [step.name])
            for name in deleted:
                have.pop(name, None)
            if deleted:
                self._rewound.add(link.path)
            report.notes += [f"{link.ref}: deleted the target's copy of {n} (dated after this host's clock)" for n in deleted]
        elif isinstance(step, DeletePartial):
            removed = self.sink.delete(link.path, [step.name], partial=True)
            report.removed_partials += [f"{link.ref}: {n}" for n in removed]
        elif isinstance(step, RollbackTarget):
            try:
                deleted = self.sink.delete(link.path, list(step.destroys), allow_writable=True)
            except PartialDelete as e:  # the others went before it stopped: say so, then fail the step
                report.rolled_back += [f"{link.ref}: {n}" for n in e.deleted]
                for name in e.deleted:
                    have.pop(name, None)
                raise
            report.rolled_back += [f"{link.ref}: {n}" for n in deleted]
            for name in deleted:
                have.pop(name, None)
            log.warning("%s -> %s: rolled target back to %s, destroyed %s", self.group, self.target, step.to, deleted,
                        extra={"event": "target-rolled-back", "group": self.group, "target": self.target,
                               "dataset": link.ref, "snapshot": step.to, "destroyed": deleted})
        elif isinstance(step, (SendFull, SendIncremental)):
            self._send(link, step.snapshot, _send_base(step), report)
            have[step.snapshot.name] = step.snapshot
            self.source.hold(link.ref, self.hold_tag, [step.snapshot.name])
            return step.snapshot.name
        return None

    def _send(self, link: DatasetLink, snap: SnapshotId, base: str | None, report: TargetReport) -> None:
        what = f"{self.group} -> {self.target}: {link.ref} {snap.name}"
        tick = None
        if self.progress is not None:
            short = f"{self.target}: {os.path.basename(link.ref.rstrip('/')) or '/'} {snap.name.rpartition('_')[2]}"
            tick = self.progress(short, self.source.estimate(link.ref, snap.name, base))
        meter = Meter(tick=tick, rate_limit=self.settings.rate_limit)
        senders = self.source.start_send(link.ref, snap.name, base, self.settings.compress)
        force = self.settings.on_diverged == "rollback" or link.path in self._rewound
        response = self.sink.receive(link.path, snap.name, snap.guid, self.settings.compress, senders, meter, force)
        self._rewound.discard(link.path)
        if tick is not None:
            tick(meter.bytes)
        removed = response.get("removed_partials") or []
        report.removed_partials += [f"{link.ref}: {n}" for n in removed]
        report.sent.append(Sent(link.ref, snap.name, base, meter.bytes, meter.seconds))
        log.info("%s: %s sent (%d bytes, %.1fs)", what, "full" if base is None else f"incremental from {base}",
                 meter.bytes, meter.seconds, extra={
                     "event": "sent", "group": self.group, "target": self.target, "dataset": link.ref, "snapshot": snap.name,
                     "base": base, "bytes": meter.bytes, "seconds": round(meter.seconds, 3), "direction": self.direction})

    def _send_chain(self, link: DatasetLink, chain: list[SendIncremental], report: TargetReport) -> str | None:
        """Consecutive incrementals in one stream and one receive session; returns the newest sent, or
        None where the source or the target takes one snapshot per stream (then each goes alone).

        A chain that stops part way keeps what arrived whole: those are recorded and held like single
        sends, then the error goes on (a retry lists the target again and sends the rest)."""
        base = _send_base(chain[0])
        assert base is not None
        names = [s.snapshot.name for s in chain]
        senders = self.source.start_chain(link.ref, names, base, self.settings.compress)
        if senders is None:
            self._no_chain = True
            return None
        tick = None
        if self.progress is not None:
            short = f"{self.target}: {os.path.basename(link.ref.rstrip('/')) or '/'} {len(chain)} snapshots"
            sizes = [self.source.estimate(link.ref, s.snapshot.name, s.base.name) for s in chain]
            tick = self.progress(short, None if None in sizes else sum(s or 0 for s in sizes))
        meter = Meter(tick=tick, rate_limit=self.settings.rate_limit)
        first, rest = chain[0].snapshot, [(s.snapshot.name, s.snapshot.guid) for s in chain[1:]]
        force = self.settings.on_diverged == "rollback" or link.path in self._rewound
        self._unsure.add(link.path)
        try:
            response = self.sink.receive(link.path, first.name, first.guid, self.settings.compress, senders, meter, force, then=rest)
        except PartialReceive as e:
            self._chained(link, chain, e.received, meter, report)
            raise
        except RemoteRefused as e:
            if "then" not in str(e):
                raise
            self._no_chain = True  # a target whose serve predates chains: one snapshot per stream
            return None
        except SnapsyncError:
            self._chained(link, chain, self._arrived(link, chain), meter, report)
            raise
        self._rewound.discard(link.path)
        if tick is not None:
            tick(meter.bytes)
        report.removed_partials += [f"{link.ref}: {n}" for n in response.get("removed_partials") or []]
        return self._chained(link, chain, names, meter, report)

    def _arrived(self, link: DatasetLink, chain: list[SendIncremental]) -> list[str]:
        """After a chain failed without saying what arrived (the sender died, the connection dropped):
        the target's complete copies of it, by identity, if the target can still be asked."""
        try:
            have = self._complete(self._listing(link)[0])
        except SnapsyncError:
            return []
        return [s.snapshot.name for s in chain if s.snapshot.name in have and have[s.snapshot.name].guid == s.snapshot.guid]

    def _chained(self, link: DatasetLink, chain: list[SendIncremental], received: Sequence[str], meter: Meter, report: TargetReport) -> str | None:
        """Record the snapshots of a chain that arrived (the stream's bytes and time shared among them)
        and hold the newest: what a single send does for each."""
        arrived = [s for s in chain if s.snapshot.name in set(received)]
        have = self._have[link.path]
        for i, step in enumerate(arrived):
            share, extra = divmod(meter.bytes, len(arrived))
            report.sent.append(Sent(
                link.ref, step.snapshot.name, step.base.name, share + (extra if i == len(arrived) - 1 else 0),
                meter.seconds / len(arrived),
            ))
            have[step.snapshot.name] = step.snapshot
        if not arrived:
            return None
        newest = arrived[-1].snapshot.name
        self.source.hold(link.ref, self.hold_tag, [newest])
        log.info("%s -> %s: %s %s..%s sent in one stream (%d snapshots, %d bytes, %.1fs)", self.group, self.target, link.ref,
                 arrived[0].snapshot.name, newest, len(arrived), meter.bytes, meter.seconds, extra={
                     "event": "sent", "group": self.group, "target": self.target, "dataset": link.ref, "snapshot": newest,
                     "chain": [s.snapshot.name for s in arrived], "base": arrived[0].base.name, "bytes": meter.bytes,
                     "seconds": round(meter.seconds, 3), "direction": self.direction})
        return newest

    def _resume(self, link: DatasetLink, token: str, report: TargetReport) -> None:
        """Finish a ZFS receive that was interrupted, from the byte where it stopped.

        If the source can no longer produce the stream (the snapshot is gone), the token is useless:
        the target's partial state is abandoned and the caller plans ordinary sends instead. A
        connection failure keeps the token for the next attempt.
        """
        meter = Meter(rate_limit=self.settings.rate_limit)
        try:
            senders = self.source.start_send(link.ref, None, None, self.settings.compress, token=token)
            response = self.sink.resume(link.path, self.settings.compress, senders, meter)
        except TransientError:
            raise
        except SnapsyncError as e:
            self.sink.delete(link.path, [], partial=True)
            report.notes.append(f"{link.ref}: could not resume the interrupted receive ({e}); abandoned it")
            return
        name = str(response.get("name"))
        report.sent.append(Sent(link.ref, name, "(resumed)", meter.bytes, meter.seconds))
        log.info("%s -> %s: %s %s resumed (%d bytes)", self.group, self.target, link.ref, name, meter.bytes, extra={
            "event": "sent", "group": self.group, "target": self.target, "dataset": link.ref, "snapshot": name,
            "resumed": True, "bytes": meter.bytes, "seconds": round(meter.seconds, 3), "direction": self.direction})

    def _lag(self, report: TargetReport, sources: dict[str, list[SnapshotInfo]], commons: dict[str, str | None]) -> None:
        """How far the target is behind: newest source snapshot vs the oldest per-dataset common one.

        Where this run did not establish the common snapshot (target unreachable, a conflict), the
        hold from the last good run stands in for it: that is what stays pinned on the source.
        """
        now = self.now()
        everything = [
            s for link in self.links for s in our_snapshots(self.prefix, sources.get(link.ref, [])) if s.created <= now
        ]
        if not everything:
            return
        newest = max(everything, key=lambda s: (s.created, s.name)).name
        report.newest_source = newest
        common_names: list[str] = []
        for link in self.links:
            common = commons.get(link.path)
            if common is None:
                held = [
                    s.name for s in sources.get(link.ref, [])
                    if self.hold_tag in s.holds and (when := ours(self.prefix, s.name)) is not None and when <= now
                ]
                common = max(held, key=lambda n: (ours(self.prefix, n), n)) if held else None
            if common is None or ours(self.prefix, common) is None:
                report.notes.append(self._no_common(link))
                return
            common_names.append(common)
        oldest = min(common_names, key=lambda n: (ours(self.prefix, n), n))
        report.newest_common = oldest
        t_new, t_old = ours(self.prefix, newest), ours(self.prefix, oldest)
        assert t_new is not None and t_old is not None
        report.newest_common_time = t_old
        report.lag = t_new - t_old
        if report.lagging:
            report.held_back = sorted(set(common_names))
            report.notes.append(
                f"{self.target} lags {format_duration(report.lag)} behind (max_lag "
                f"{format_duration(report.max_lag or timedelta())}); holding back {', '.join(report.held_back)} "
                f"on the source until it catches up or is removed from the group"
            )

    def _no_common(self, link: DatasetLink) -> str:
        """Why no common snapshot is known: never replicated, or its held base was deleted by hand."""
        try:
            lost = self.source.lost(link.ref, self.hold_tag)
        except SnapsyncError:
            lost = []
        if lost:
            return (f"{link.ref}: replicated to {self.target} up to {', '.join(lost)}, which was deleted on the source; "
                    f"the next replicate continues from the newest snapshot both sides share")
        return f"{link.ref}: never replicated to {self.target}"

    def _prune(self, report: TargetReport, commons: dict[str, str | None], dry_run: bool) -> None:
        """Target retention over the group's complete copies; the newest common one is always kept."""
        assert self.settings.retention is not None
        pinned: dict[str, list[str]] = {}
        for link in self.links:
            common = commons.get(link.path)
            if common is not None:
                pinned.setdefault(common, []).append(f"replication base from {self._origin()}")
        copies = group_snapshots({link.path: self._have.get(link.path, {}).values() for link in self.links})
        plan = plan_prune(copies, self.settings.retention, self.now(), pinned)
        report.prune = plan
        if plan.future:
            raise BackendError(
                "copies dated after this host's clock (" + ", ".join(d.name for d in plan.future) + "); not pruning"
            )
        if dry_run:
            return
        doomed = {d.name for d in plan.removed}
        failed: list[str] = []
        for link in self.links:
            have = self._have.get(link.path, {})
            names = sorted(n for n in doomed if n in have)
            try:
                deleted = self.sink.delete(link.path, names)
            except PartialDelete as e:
                failed.append(f"{link.ref}: {e}")
                deleted = [n for n in e.deleted if n in names]
            except SnapsyncError as e:  # an older server does not say which went: the target's listing does
                failed.append(f"{link.ref}: {e}")
                deleted = self._gone(link, names)
            for name in deleted:
                have.pop(name, None)
            report.pruned += [f"{link.ref}: {n}" for n in deleted]
        if failed:
            raise BackendError("; ".join(failed))

    def _gone(self, link: DatasetLink, names: Sequence[str]) -> list[str]:
        """Which of ``names`` the target no longer holds; none when it cannot be asked."""
        try:
            still = {c.name for c in self._listing(link)[0]}
        except SnapsyncError:
            return []
        return [n for n in names if n not in still]

    def _origin(self) -> str:
        return "the source" if self.direction == "push" else self.target

