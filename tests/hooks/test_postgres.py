"""The postgres hook against a real PostgreSQL 15 under a continuous write load, data and WAL in one
btrfs subvolume: every snapshot, cloned and started as a second server, recovers, passes pg_amcheck
and holds every transaction that committed before the snapshot was taken."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from snapsync.backends.btrfs import BtrfsBackend
from snapsync.clock import ManualClock
from snapsync.policy.loader import parse_policy
from snapsync.ops.runner import Runner
from tests.hooks.pg import Server, Writer, check_restored, pg_cluster
from tests.sshd import free_port

START = datetime(2026, 11, 26, tzinfo=UTC)


@pytest.fixture
def pg() -> Iterator[tuple[Path, Server]]:
    with pg_cluster() as cluster:
        yield cluster


def runner_for(subvolume: Path, server: Server, mode: str) -> Runner:
    text = f"""
version = 1
[defaults]
interval = "1m"
[defaults.retention]
keep_last = 100
[groups.db]
backend = "btrfs"
datasets = ["{subvolume}"]
[[groups.db.hooks]]
type = "postgres"
dsn = "{server.dsn}"
mode = "{mode}"
timeout = "20s"
"""
    return Runner(parse_policy(text, "<test>"), ManualClock(START))


@pytest.mark.parametrize("mode", ["checkpoint", "backup"])
def test_every_snapshot_under_load_restores_and_holds_what_was_committed(pg: tuple[Path, Server], mode: str) -> None:
    subvolume, server = pg
    runner = runner_for(subvolume, server, mode)
    clock = runner.clock
    assert isinstance(clock, ManualClock)
    group = runner.policy.groups["db"]
    taken: list[tuple[str, int]] = []
    with Writer(server.dsn) as writer:
        for _ in range(10):
            before = writer.committed_now()
            (report,) = runner.run([group], take=True, only_due=False, prune=False)
            assert report.ok, report.to_json()
            assert report.snapshot and [h.status for h in report.hooks] == ["ok"]
            taken.append((report.snapshot, before))
            clock.advance(timedelta(minutes=1))
        assert writer.error is None
        total = writer.committed_now()
    assert total > taken[-1][1] > taken[0][1]  # the load really ran across all snapshots
    backend = BtrfsBackend()
    snapdir = backend.snapshot_path(str(subvolume))
    for name, before in taken:
        if mode == "backup":
            # Kept for point-in-time recovery with archived WAL: the backup ends at pg_backup_stop,
            # after the snapshot, so the label alone (without the archive) cannot be replayed to its
            # end. The atomic snapshot itself starts by crash recovery, like the checkpoint mode.
            label = backend.annotation(str(subvolume), name, "backup_label")
            assert label and "START WAL LOCATION" in label and "LABEL: snapsync" in label
        result = check_restored(snapdir / name, subvolume.parent.parent, free_port(), before)
        assert result["present"] == before, f"{name}: committed before the snapshot {before}, found {result['present']}\n{result['log']}"
        assert result["amcheck"] == 0, result["amcheck_out"]
        assert "database system was interrupted" in str(result["log"]), result["log"]  # it recovered, as after a crash


def test_a_hook_hanging_after_backup_mode_is_killed_and_backup_mode_ended(pg: tuple[Path, Server]) -> None:
    subvolume, server = pg
    text = f"""
version = 1
[groups.db]
backend = "btrfs"
datasets = ["{subvolume}"]
interval = "1m"
[[groups.db.hooks]]
type = "postgres"
dsn = "{server.dsn}"
mode = "backup"
[[groups.db.hooks]]
type = "command"
pre = ["sleep", "30"]
timeout = "1s"
"""
    runner = Runner(parse_policy(text, "<test>"), ManualClock(START))
    (report,) = runner.run(list(runner.policy.groups.values()), take=True, only_due=False, prune=False)
    assert report.snapshot is None and "killed after 1s" in " ".join(report.errors)
    backup, hang = report.hooks
    assert (backup.status, hang.status) == ("ok", "failed")
    assert backup.backup_label and "START WAL LOCATION" in backup.backup_label  # pg_backup_stop ran on the way out
