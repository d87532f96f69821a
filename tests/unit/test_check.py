"""`snapsync check`'s judgement, with an injected clock: thresholds, precedence, the one line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from snapsync.ops.check import Finding, Status, Thresholds, judge_age, judge_copy, judge_drill, judge_source, summary, thresholds, verdict
from snapsync.plan.groups import GroupListing, GroupSnapshot
from snapsync.policy.loader import parse_policy

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
LIMITS = Thresholds(timedelta(hours=2), timedelta(hours=4))
H = timedelta(hours=1)


@pytest.mark.parametrize(("age", "status"), [
    (timedelta(0), Status.OK), (2 * H - timedelta(seconds=1), Status.OK), (2 * H, Status.WARNING),
    (4 * H - timedelta(seconds=1), Status.WARNING), (4 * H, Status.CRITICAL), (400 * H, Status.CRITICAL),
])
def test_age_against_thresholds(age: timedelta, status: Status) -> None:
    assert judge_age(age, LIMITS) == status


def snap(name: str, hours_ago: float, *datasets: str) -> GroupSnapshot:
    return GroupSnapshot(name, NOW - timedelta(hours=hours_ago), datasets)


def test_the_source_is_judged_by_its_newest_complete_snapshot() -> None:
    listing = GroupListing((snap("a", 5, "/x", "/y"), snap("b", 3, "/x", "/y"), snap("c", 0.5, "/x")), ())
    finding = judge_source("db", ("/x", "/y"), listing, LIMITS, NOW)
    assert (finding.status, finding.age, finding.detail) == (Status.WARNING, 3 * H, "newest snapshot 3h old (warn 2h)")
    empty = judge_source("db", ("/x",), GroupListing((), ()), LIMITS, NOW)
    assert (empty.status, empty.detail) == (Status.CRITICAL, "no complete snapshot")
    future = GroupListing((snap("a", 1, "/x"), snap("z", -3, "/x")), ())
    assert judge_source("db", ("/x",), future, LIMITS, NOW).age == H  # a snapshot from the future proves nothing


def test_a_copy_that_cannot_be_asked() -> None:
    unknown = judge_copy("db", "nas", NOW - H, ["connection refused"], LIMITS, NOW)
    assert (unknown.status, unknown.detail) == (Status.UNKNOWN, "cannot ask: connection refused")
    never = judge_copy("db", "nas", None, ["connection refused"], LIMITS, NOW)
    assert never.status == Status.UNKNOWN
    known_bad = judge_copy("db", "nas", NOW - 5 * H, ["connection\nrefused"], LIMITS, NOW)
    assert known_bad.status == Status.CRITICAL
    assert known_bad.detail == "cannot ask (connection refused); its newest copy was already 5h old (crit 4h)"


def test_a_copy_that_answered_with_an_error() -> None:
    diverged = judge_copy("db", "usb", NOW - H, ["diverged"], LIMITS, NOW, reached=True)
    assert (diverged.status, diverged.detail) == (Status.WARNING, "newest copy 1h old (warn 2h), and: diverged")
    assert judge_copy("db", "usb", NOW - 5 * H, ["full"], LIMITS, NOW, reached=True).status == Status.CRITICAL
    assert judge_copy("db", "usb", None, ["no common base"], LIMITS, NOW, reached=True).status == Status.CRITICAL
    assert judge_copy("db", "usb", None, [], LIMITS, NOW).detail == "holds no copy yet"


def test_verdict_ranks_unknown_between_warning_and_critical() -> None:
    def f(s: Status) -> Finding:
        return Finding("g", None, "snapshot", s, "")
    assert verdict([f(Status.OK), f(Status.WARNING)]) == Status.WARNING
    assert verdict([f(Status.WARNING), f(Status.UNKNOWN)]) == Status.UNKNOWN
    assert verdict([f(Status.UNKNOWN), f(Status.CRITICAL), f(Status.OK)]) == Status.CRITICAL
    assert verdict([]) == Status.UNKNOWN


def test_summary_is_one_line_worst_first_with_perfdata() -> None:
    findings = [
        judge_copy("db", "nas", NOW - timedelta(minutes=30), [], LIMITS, NOW),
        judge_copy("db", "b2", NOW - 3 * H, [], LIMITS, NOW),
        judge_copy("web", "it's", None, ["refused"], LIMITS, NOW),
    ]
    line = summary(findings)
    assert line == (
        "SNAPSYNC UNKNOWN - web->it's: cannot ask: refused; db->b2: newest copy 3h old (warn 2h); 1 of 3 fresh, oldest 30m"
        " | 'db->nas'=1800s;7200;14400;0 'db->b2'=10800s;7200;14400;0"
    )
    assert summary([]).startswith("SNAPSYNC UNKNOWN - nothing to check")
    assert summary(findings[:1]) == "SNAPSYNC OK - all fresh (1 checked, oldest 30m) | 'db->nas'=1800s;7200;14400;0"


def test_a_failed_drill_warns_until_one_passes() -> None:
    record = {"ok": False, "started": "2026-11-26T03:00:00+00:00", "error": None,
              "checks": [{"check": "files /x", "ok": True, "detail": "ok"}, {"check": "sqlite /x/a.db", "ok": False, "detail": "malformed"}]}
    finding = judge_drill("db", "nas", record)
    assert finding is not None and finding.status == Status.WARNING
    assert finding.detail == "last drill (2026-11-26T03:00:00+00:00) failed: sqlite /x/a.db: malformed"
    assert finding.subject == "db drill from nas"
    assert judge_drill("db", "nas", {"ok": True}) is None


def test_thresholds_of_targets_and_pulls() -> None:
    policy = parse_policy("""
version = 1
[defaults]
interval = "6h"
[groups.db]
backend = "zfs"
datasets = ["tank/db"]
targets = ["nas", "b2", "usb"]
[targets.nas]
type = "ssh"
host = "nas"
path = "tank/backup"
[targets.b2]
type = "ssh"
host = "b2"
path = "x"
warn_after = "2d"
[targets.usb]
type = "ssh"
host = "usb"
path = "x"
warn_after = "1d"
crit_after = "10d"
[pulls.far]
host = "far"
path = "/srv"
datasets = ["/srv/a"]
into = "/backup/far"
""", "p.toml")
    group = policy.groups["db"]
    assert thresholds(policy, group, "nas") == Thresholds(12 * H, 24 * H)
    assert thresholds(policy, group, "b2") == Thresholds(48 * H, 96 * H)
    assert thresholds(policy, group, "usb") == Thresholds(24 * H, 240 * H)
    assert thresholds(policy, None, "far") == Thresholds(12 * H, 24 * H)
