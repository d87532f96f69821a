"""The runner on real btrfs with a simulated clock: what is on disk must be what retention planned."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import btrfsutil

from snapsync.backends.btrfs import BtrfsBackend
from snapsync.clock import ManualClock
from snapsync.plan.naming import parse_snapshot_name
from snapsync.policy.loader import Policy, parse_policy
from snapsync.plan.retention import plan_prune
from snapsync.ops.runner import Runner
from tests.conftest import make_subvolume

START = datetime(2026, 10, 20, tzinfo=UTC)


def _policy(root: Path, body: str) -> Policy:
    return parse_policy(body.replace("$root", json.dumps(str(root))[1:-1]), source="test.toml")


def _on_disk(backend: BtrfsBackend, dataset: str) -> list[str]:
    return [s.name for s in backend.list_snapshots(dataset)]


POLICY = """
version = 1
[defaults]
timezone = "Europe/Berlin"
[defaults.retention]
keep_last = 2
hourly = 6
daily = 5
weekly = 2
monthly = 0
yearly = 0
[groups.app]
backend = "btrfs"
datasets = ["$root/persist/db", "$root/persist/app files", "$root/persist/ünï"]
interval = "1h"
[groups.slow]
backend = "btrfs"
datasets = ["$root/persist/media"]
interval = "1d"
"""


def test_simulated_weeks_leave_exactly_the_planned_snapshots(btrfs_root: Path) -> None:
    policy = _policy(btrfs_root, POLICY)
    for group in policy.groups.values():
        for ds in group.datasets:
            make_subvolume(Path(ds), f"{ds}\n")
    clock = ManualClock(START)
    runner = Runner(policy, clock)
    taken: dict[str, list[str]] = {"app": [], "slow": []}
    for _ in range(24 * 14):
        for report in runner.run(policy.groups.values(), take=True, only_due=True, prune=True):
            assert report.ok, report.errors
            if report.snapshot:
                taken[report.group].append(report.snapshot)
        clock.advance(timedelta(minutes=60))

    assert len(taken["app"]) == 24 * 14
    assert len(taken["slow"]) == 14
    backend = BtrfsBackend()
    now = clock.now()
    for name, group in policy.groups.items():

        class Snap:
            def __init__(self, n: str) -> None:
                self.name = n
                created = parse_snapshot_name("snapsync", n)
                assert created is not None
                self.created = created

        expected = {d.name for d in plan_prune([Snap(n) for n in taken[name]], group.retention, now).kept}
        for ds in group.datasets:
            assert set(_on_disk(backend, ds)) == expected, ds
    assert 6 + 5 <= len(_on_disk(backend, policy.groups["app"].datasets[0])) <= 6 + 5 + 2 + 2 + 1


def test_foreign_snapshots_are_never_touched(btrfs_root: Path) -> None:
    policy = _policy(btrfs_root, POLICY.replace("keep_last = 2", "keep_last = 1").replace("hourly = 6", "hourly = 1"))
    db = policy.groups["app"].datasets[0]
    for ds in policy.groups["app"].datasets:
        make_subvolume(Path(ds))
    backend = BtrfsBackend()
    home = Path(backend.snapshot_home(db))
    home.mkdir(parents=True)
    foreign = ["manual", "snapsync_not-a-time", "other_2020-01-01T00:00:00Z", "snapsync_2020-01-01T00:00:00"]
    for name in foreign:
        btrfsutil.create_snapshot(db, home / name, read_only=True)
    (home / "a plain directory").mkdir()
    clock = ManualClock(START)
    runner = Runner(policy, clock)
    for _ in range(30):
        reports = runner.run([policy.groups["app"]], take=True, only_due=True, prune=True)
        assert all(r.ok for r in reports)
        clock.advance(timedelta(hours=1))
    names = set(_on_disk(backend, db))
    assert set(foreign) <= names
    assert (home / "a plain directory").is_dir()
    ours = names - set(foreign)
    assert 1 <= len(ours) < 30


def test_snapshot_is_not_repeated_within_its_interval_slot(btrfs_root: Path) -> None:
    policy = _policy(btrfs_root, POLICY)
    make_subvolume(Path(policy.groups["slow"].datasets[0]))
    clock = ManualClock(START + timedelta(hours=5, seconds=3))
    runner = Runner(policy, clock)
    slow = [policy.groups["slow"]]
    first = runner.run(slow, take=True, only_due=True, prune=False)
    clock.advance(timedelta(hours=18))
    second = runner.run(slow, take=True, only_due=True, prune=False)
    clock.advance(timedelta(hours=1))
    third = runner.run(slow, take=True, only_due=True, prune=False)
    assert first[0].snapshot and second[0].snapshot is None and third[0].snapshot


def test_one_failing_group_does_not_stop_the_others(btrfs_root: Path) -> None:
    policy = _policy(btrfs_root, POLICY)
    make_subvolume(Path(policy.groups["slow"].datasets[0]))
    runner = Runner(policy, ManualClock(START))
    reports = {r.group: r for r in runner.run(policy.groups.values(), take=True, only_due=True, prune=True)}
    assert not reports["app"].ok and "does not exist" in reports["app"].errors[0]
    assert reports["slow"].ok and reports["slow"].snapshot
    assert _on_disk(BtrfsBackend(), policy.groups["slow"].datasets[0]) == [reports["slow"].snapshot]
    for ds in policy.groups["app"].datasets:
        assert not Path(BtrfsBackend().snapshot_home(ds)).exists()


def _daily_history(policy: Policy, days: int) -> tuple[Runner, str]:
    """``days`` daily snapshots of the "slow" group, none pruned; the runner's clock is a day past the last."""
    ds = policy.groups["slow"].datasets[0]
    make_subvolume(Path(ds))
    clock = ManualClock(START)
    runner = Runner(policy, clock)
    for _ in range(days):
        runner.run([policy.groups["slow"]], take=True, only_due=True, prune=False)
        clock.advance(timedelta(days=1))
    return runner, ds


def test_dry_run_changes_nothing(btrfs_root: Path) -> None:
    policy = _policy(btrfs_root, POLICY)
    runner, ds = _daily_history(policy, 10)
    before = _on_disk(BtrfsBackend(), ds)
    (report,) = runner.run([policy.groups["slow"]], take=True, only_due=True, prune=True, dry_run=True)
    assert report.snapshot is not None and report.plan is not None and report.plan.removed
    assert _on_disk(BtrfsBackend(), ds) == before


def test_prune_refuses_while_the_clock_is_behind_a_snapshot(btrfs_root: Path) -> None:
    policy = _policy(btrfs_root, POLICY.replace("keep_last = 2", "keep_last = 1"))
    _, ds = _daily_history(policy, 8)
    before = _on_disk(BtrfsBackend(), ds)
    stepped_back = Runner(policy, ManualClock(START + timedelta(days=3, hours=1)))
    (report,) = stepped_back.run([policy.groups["slow"]], take=True, only_due=True, prune=True)
    assert not report.ok and "dated after the clock" in report.errors[0]
    assert report.snapshot is None
    assert _on_disk(BtrfsBackend(), ds) == before


def test_a_snapshot_in_a_second_that_already_has_one_waits_for_the_next(btrfs_root: Path) -> None:
    """Names carry the second: a second `snapshot` in the same second (or after a rollback's safety snapshot
    took the next free second) waits for a second of its own instead of failing; a stopped clock cannot wait."""
    from snapsync.clock import SystemClock
    from snapsync.ops.runner import GroupReport

    data = make_subvolume(btrfs_root / "persist" / "app", "v1")
    policy = _policy(btrfs_root, f'version = 1\n[groups.app]\nbackend = "btrfs"\ndatasets = ["{data}"]\n')
    group = policy.groups["app"]
    runner = Runner(policy, SystemClock())
    taken = []
    for _ in range(3):  # milliseconds apart: the same second
        report = GroupReport("app")
        runner.snapshot(group, report, only_if_due=False)
        assert report.snapshot and not report.errors, report.to_json()
        taken.append(report.snapshot)
    assert len(set(taken)) == 3 and taken == sorted(taken)
    assert all(parse_snapshot_name("snapsync", n) <= SystemClock().now() for n in taken)  # never dated ahead of the clock

    stopped = Runner(policy, ManualClock(parse_snapshot_name("snapsync", taken[-1])))
    report = GroupReport("app")
    try:
        stopped.snapshot(group, report, only_if_due=False)
    except Exception as e:  # noqa: BLE001 (the backend's refusal, as before)
        assert "already exists" in str(e)
    else:
        raise AssertionError("a clock that does not move took a second snapshot of the same name")
