"""`snapsync check`: is every copy fresh enough? Judged like a Nagios plugin.

``assess`` gathers the facts (lists snapshots, asks each target what it holds through the runner's
``target_holdings``, reads drill records); everything else is pure, turning ages and thresholds into
OK/WARNING/CRITICAL/UNKNOWN and one line. A target that cannot be asked is UNKNOWN, unless what
snapsync last knew of it (the hold it keeps on the source for that target) is already past
critical: the copy there can only be older than that.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from snapsync.policy.durations import format_duration
from snapsync.errors import SnapsyncError
from snapsync.plan.groups import GroupListing
from snapsync.host.state import read_json, state_dir
from snapsync.recovery.pending import unfinished, unfinished_text

if TYPE_CHECKING:
    from snapsync.policy.loader import Group, Policy
    from snapsync.ops.runner import Runner, TargetHoldings
    from snapsync.replication.replicate import TargetReport


class Status(IntEnum):
    """Nagios plugin exit codes."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3

    @property
    def severity(self) -> int:
        """For the overall verdict: UNKNOWN may hide a CRITICAL, so it outranks WARNING."""
        return {Status.OK: 0, Status.WARNING: 1, Status.UNKNOWN: 2, Status.CRITICAL: 3}[self]


@dataclass(frozen=True)
class Thresholds:
    warn: timedelta
    crit: timedelta


@dataclass(frozen=True)
class Finding:
    group: str
    target: str | None
    what: str
    """snapshot (the source), copy (a target, or a pulled copy here), drill, rollback (one left unfinished)."""
    status: Status
    detail: str
    age: timedelta | None = None
    thresholds: Thresholds | None = None

    @property
    def subject(self) -> str:
        if self.what == "drill":
            return f"{self.group} drill from {self.target}"
        if self.what == "pulled":
            return f"{self.group}<-{self.target}"
        return self.group if self.target is None else f"{self.group}->{self.target}"

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group, "target": self.target, "what": self.what, "status": self.status.name,
            "detail": self.detail, "age_seconds": None if self.age is None else int(self.age.total_seconds()),
            "warn_seconds": None if self.thresholds is None else int(self.thresholds.warn.total_seconds()),
            "crit_seconds": None if self.thresholds is None else int(self.thresholds.crit.total_seconds()),
        }


def judge_age(age: timedelta, limits: Thresholds) -> Status:
    if age >= limits.crit:
        return Status.CRITICAL
    return Status.WARNING if age >= limits.warn else Status.OK


def approx(age: timedelta) -> str:
    """``2d3h`` rather than ``2d3h14m9s``: the largest unit and the next one, which is what a reader takes in."""
    seconds = max(0, int(age.total_seconds()))
    for big, small in ((86400, 3600), (3600, 60), (60, 1)):
        if seconds >= big:
            return format_duration(timedelta(seconds=seconds - seconds % small))
    return f"{seconds}s"


def _age_text(age: timedelta, limits: Thresholds, status: Status) -> str:
    limit = {Status.CRITICAL: f" (crit {format_duration(limits.crit)})", Status.WARNING: f" (warn {format_duration(limits.warn)})"}
    return f"{approx(age)} old{limit.get(status, '')}"


def judge_source(group: str, datasets: Sequence[str], listing: GroupListing, limits: Thresholds, now: datetime) -> Finding:
    """The newest snapshot that every dataset of the group has: a partial one is not a backup of the group."""
    complete = [s for s in listing.snapshots if set(datasets) <= set(s.datasets) and s.created <= now]
    if not complete:
        return Finding(group, None, "snapshot", Status.CRITICAL, "no complete snapshot", thresholds=limits)
    age = now - complete[-1].created
    status = judge_age(age, limits)
    return Finding(group, None, "snapshot", status, f"newest snapshot {_age_text(age, limits, status)}", age, limits)


def judge_future(group: str, listing: GroupListing, now: datetime) -> Finding | None:
    """Snapshots dated after the clock: it was wrong when they were taken, or it is wrong now.

    They are never sent nor a base, and retention refuses to prune past them, so this is CRITICAL
    until someone decides which clock was right.
    """
    future = [s for s in listing.snapshots if s.created > now]
    if not future:
        return None
    ahead = approx(future[-1].created - now)
    names = ", ".join(s.name for s in future)
    return Finding(
        group, None, "clock", Status.CRITICAL,
        f"{names} dated up to {ahead} after the clock: not replicated, and pruning waits; if the clock is right now, "
        f"replicate, then delete them with `snapsync prune {group} --future`; else fix the clock",
    )


def judge_copy(
    group: str, target: str, newest: datetime | None, errors: Sequence[str], limits: Thresholds, now: datetime,
    what: str = "copy", reached: bool = False,
) -> Finding:
    """``newest``: when the target's newest complete copy was taken; from the last good run when it could
    not be asked. A target that answered but refused or failed (a diverged copy, a full disk) is at
    least WARNING, and CRITICAL when it holds no usable copy."""
    age = None if newest is None else now - newest
    if errors and reached:
        reason = _one_line(errors[0])
        if age is None:
            return Finding(group, target, what, Status.CRITICAL, f"no usable copy: {reason}", thresholds=limits)
        status = max(judge_age(age, limits), Status.WARNING, key=lambda s: s.severity)
        return Finding(group, target, what, status, f"newest copy {_age_text(age, limits, status)}, and: {reason}", age, limits)
    if errors:
        reason = _one_line(errors[0])
        if age is not None and judge_age(age, limits) == Status.CRITICAL:
            text = f"cannot ask ({reason}); its newest copy was already {_age_text(age, limits, Status.CRITICAL)}"
            return Finding(group, target, what, Status.CRITICAL, text, age, limits)
        return Finding(group, target, what, Status.UNKNOWN, f"cannot ask: {reason}", age, limits)
    if age is None:
        return Finding(group, target, what, Status.CRITICAL, "holds no copy yet", thresholds=limits)
    status = judge_age(age, limits)
    return Finding(group, target, what, status, f"newest copy {_age_text(age, limits, status)}", age, limits)


def judge_drill(group: str, target: str, record: Mapping[str, Any]) -> Finding | None:
    """A drill that failed last time says the copies may not restore: worth a WARNING until one passes."""
    if record.get("ok", True):
        return None
    reason = record.get("error") or next((f"{c.get('check')}: {c.get('detail')}" for c in record.get("checks", []) if not c.get("ok")), "failed")
    return Finding(group, target, "drill", Status.WARNING, f"last drill ({record.get('started', '?')}) failed: {_one_line(str(reason))}")


def verdict(findings: Sequence[Finding]) -> Status:
    return max((f.status for f in findings), key=lambda s: s.severity, default=Status.UNKNOWN)


def summary(findings: Sequence[Finding]) -> str:
    """One line: the verdict, what is wrong (worst first), how much is fine; Nagios perfdata after ``|``."""
    status = verdict(findings)
    if not findings:
        return "SNAPSYNC UNKNOWN - nothing to check (no groups or targets selected)"
    bad = sorted((f for f in findings if f.status != Status.OK), key=lambda f: -f.status.severity)
    good = [f for f in findings if f.status == Status.OK]
    parts = [f"{f.subject}: {f.detail}" for f in bad]
    if good:
        oldest = max((f.age for f in good if f.age is not None), default=None)
        tail = "" if oldest is None else f", oldest {approx(oldest)}"
        parts.append(f"{len(good)} of {len(findings)} fresh{tail}" if bad else f"all fresh ({len(good)} checked{tail})")
    perf = " ".join(_perfdata(f) for f in findings if f.age is not None and f.thresholds is not None)
    return f"SNAPSYNC {status.name} - {'; '.join(parts)}" + (f" | {perf}" if perf else "")


def _perfdata(f: Finding) -> str:
    assert f.age is not None and f.thresholds is not None
    label = f.subject.replace("'", "_")
    return (
        f"'{label}'={int(f.age.total_seconds())}s;{int(f.thresholds.warn.total_seconds())};"
        f"{int(f.thresholds.crit.total_seconds())};0"
    )


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:300]


def thresholds(policy: Policy, group: Group | None, target: str) -> Thresholds:
    return Thresholds(*policy.freshness(group.name if group else None, target))


def assess(
    policy: Policy, runner: Runner, groups: Sequence[Group], pulls: Sequence[str], local: bool, now: datetime,
) -> list[Finding]:
    """Every finding for the selected groups (and pulls): source, each target, each failed drill."""
    held = {} if local else runner.target_holdings(groups, pulls=pulls)
    findings: list[Finding] = []
    for group in groups:
        if (target := unfinished(group.name)) is not None:
            findings.append(Finding(group.name, None, "rollback", Status.CRITICAL, unfinished_text(group.name, target)))
        findings += _source_findings(runner, group, now)
        for name in [] if local else group.targets:
            holdings = held.get(group.name)
            report = next((t for t in holdings.targets if t.target == name), None) if holdings else None
            findings.append(_copy_finding(group.name, name, holdings, report, thresholds(policy, group, name), now))
        findings += _drill_findings(group)
    for name in [] if local else pulls:
        holdings = held.get(name)
        report = holdings.targets[0] if holdings and holdings.targets else None
        limits = thresholds(policy, None, name)
        findings.append(_copy_finding(name, policy.pulls[name].host, holdings, report, limits, now, "pulled"))
    return findings


def _source_findings(runner: Runner, group: Group, now: datetime) -> list[Finding]:
    limits = Thresholds(group.warn_after, group.crit_after)
    try:
        listing = runner.listing(group)
    except SnapsyncError as e:
        return [Finding(group.name, None, "snapshot", Status.CRITICAL, f"cannot list: {_one_line(str(e))}")]
    future = judge_future(group.name, listing, now)
    return [judge_source(group.name, group.datasets, listing, limits, now), *([future] if future else [])]


def _copy_finding(
    group: str, target: str, holdings: TargetHoldings | None, report: TargetReport | None, limits: Thresholds,
    now: datetime, what: str = "copy",
) -> Finding:
    """A target's (or a pull's) copies as the holdings query found them; a target it has no report of
    takes the error that kept it from being asked."""
    if report is None:
        errors = (holdings.errors if holdings else []) or ["not asked"]
        return judge_copy(group, target, None, errors, limits, now, what)
    return judge_copy(group, target, report.newest_common_time, report.errors, limits, now, what, report.reached)


def _drill_findings(group: Group) -> list[Finding]:
    records = ((name, read_json(state_dir() / "drills" / f"{group.name}.{name}.json")) for name in group.targets)
    return [f for name, record in records if record and (f := judge_drill(group.name, name, record)) is not None]
