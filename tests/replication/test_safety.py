"""Never break the chain, never destroy a target's data silently: pins, holds, conflicts, partials."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import btrfsutil
import pytest

from snapsync.backends.btrfs import BtrfsBackend
from snapsync.clock import ManualClock
from snapsync.errors import BackendError
from snapsync.policy.loader import parse_policy
from snapsync.ops.runner import GroupReport, Runner
from tests.conftest import make_subvolume
from tests.replication.helpers import copies, copies_dir, snapsync, tree_digest, write_policy
from tests.sshd import Sshd

START = datetime(2026, 11, 1, tzinfo=UTC)


class Rig:
    def __init__(self, data: Path, target: Path, policy_path: Path) -> None:
        self.data = data
        self.target = target
        self.policy_path = policy_path
        self.clock = ManualClock(START)
        self.backend = BtrfsBackend()
        self.reload()

    def reload(self) -> None:
        self.policy = parse_policy(self.policy_path.read_text(), str(self.policy_path))
        self.runner = Runner(self.policy, self.clock)

    def step(self, hours: int = 1, **kw: bool) -> GroupReport:
        self.clock.advance(timedelta(hours=hours))
        (self.data / f"{self.clock.now():%H%M%d}.txt").write_text(str(self.clock.now()))
        args = {"take": True, "only_due": True, "prune": True, "replicate": True} | kw
        [report] = self.runner.run(self.policy.groups.values(), **args)
        return report

    def source(self) -> list[str]:
        return [s.name for s in self.backend.list_snapshots(str(self.data))]

    def target_copies(self) -> list[str]:
        return copies(self.target, "app", self.data)


@pytest.fixture
def rig(btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path) -> Rig:
    data = make_subvolume(btrfs_root / "persist" / "app", "v0")
    sshd.authorize(sshd.forced(target_root))
    table = sshd.target_table(target_root, max_lag='"3h"') + "[targets.nas.retention]\nkeep_last = 50\n"
    policy = write_policy(tmp_path / "p.toml", [data], {"nas": table}, retention="keep_last = 1", interval="1h")
    return Rig(data, target_root, policy)


def test_unreachable_target_keeps_its_base_and_is_reported(rig: Rig, sshd: Sshd) -> None:
    first = rig.step()
    assert first.ok, first.to_json()
    base = first.snapshot
    sshd.stop()
    for hours in range(5):
        report = rig.step()
        [t] = report.targets
        assert not t.ok and "unreachable" in t.errors[0]
        assert report.plan is not None
        # keep_last = 1 would keep only the newest; the base survives, pinned, with the reason
        assert base in rig.source()
        decision = {d.name: d for d in report.plan.decisions}[base]
        assert decision.keep and "replication base for nas" in decision.reasons
    assert len(rig.source()) == 2  # the newest and the base: nothing else piles up
    assert t.lagging and t.held_back == [base]
    assert "holding back" in " ".join(t.notes)
    # the btrfs backend refuses to destroy a held snapshot even if asked directly
    with pytest.raises(BackendError, match="held by target:nas"):
        rig.backend.destroy(str(rig.data), [base])
    sshd.start()
    caught_up = rig.step()
    assert caught_up.ok, caught_up.to_json()
    [t] = caught_up.targets
    assert [s.base for s in t.sent] == [base, *[s.name for s in t.sent][:-1]]  # incremental chain from the base
    assert t.lag == timedelta(0) and not t.lagging
    assert base not in rig.source()  # released: the next prune was free to take it


def test_prune_explain_names_the_target(rig: Rig) -> None:
    assert rig.step().ok
    assert rig.step(replicate=False).ok  # a newer snapshot that nas does not have yet
    proc = snapsync("-p", str(rig.policy_path), "prune", "--explain", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "kept: replication base for nas" in proc.stdout


def test_diverged_target_is_refused_then_rolled_back_on_request(rig: Rig) -> None:
    rig.policy_path.write_text(rig.policy_path.read_text().replace("keep_last = 1\n", "keep_last = 5\n", 1))
    rig.reload()
    assert rig.step().ok
    second = rig.step()
    assert second.ok
    lost = second.snapshot
    assert lost is not None
    # the source is rolled back behind the target's back: its newest snapshot disappears
    snapdir = rig.backend.snapshot_path(str(rig.data))
    rig.backend.set_holds(str(rig.data), "target:nas", [])
    btrfsutil.delete_subvolume(snapdir / lost)
    third = rig.step()
    [t] = third.targets
    assert not t.ok
    assert "diverged" in t.errors[0] and lost in t.errors[0] and third.snapshot in t.errors[0]
    assert lost in rig.target_copies() and third.snapshot not in rig.target_copies()

    rig.policy_path.write_text(rig.policy_path.read_text().replace('max_lag = "3h"', 'max_lag = "3h"\non_diverged = "rollback"'))
    rig.reload()
    fourth = rig.step()
    assert fourth.ok, fourth.to_json()
    [t] = fourth.targets
    assert t.rolled_back and lost in t.rolled_back[0]
    assert lost not in rig.target_copies() and fourth.snapshot in rig.target_copies()


def test_copy_made_writable_on_target_is_user_data(rig: Rig) -> None:
    first = rig.step()
    assert first.ok
    copy = copies_dir(rig.target, "app", rig.data) / str(first.snapshot)
    subprocess.run(["btrfs", "property", "set", "-f", str(copy), "ro", "false"], check=True)
    (copy / "edited-on-target.txt").write_text("precious")
    report = rig.step()
    [t] = report.targets
    assert not t.ok
    assert "none of them is a copy" in t.errors[0] or "diverged" in t.errors[0]
    assert (copy / "edited-on-target.txt").read_text() == "precious"


def test_partial_copy_is_removed_and_resent(rig: Rig) -> None:
    assert rig.step(replicate=False).ok
    name = rig.source()[-1]
    directory = copies_dir(rig.target, "app", rig.data)
    directory.mkdir(parents=True)
    btrfsutil.create_subvolume(directory / name)  # what a killed btrfs receive leaves behind
    (directory / ".receiving").mkdir()
    (directory / ".receiving" / name).touch()
    report = rig.step(take=False)
    [t] = report.targets
    assert t.ok, t.to_json()
    assert t.removed_partials == [f"{rig.data}: {name}"]
    info = btrfsutil.subvolume_info(directory / name)
    assert info.flags & 1 and info.received_uuid != bytes(16)
    assert tree_digest(directory / name) == tree_digest(rig.backend.snapshot_path(str(rig.data)) / name)


def test_foreign_subvolume_on_target_is_never_touched(rig: Rig) -> None:
    directory = copies_dir(rig.target, "app", rig.data)
    directory.mkdir(parents=True)
    btrfsutil.create_subvolume(directory / "my-own-stuff")
    for _ in range(3):
        assert rig.step().ok
    assert "my-own-stuff" in rig.target_copies()


def test_removed_target_releases_its_hold(rig: Rig) -> None:
    assert rig.step().ok
    held = [s for s in rig.backend.list_snapshots(str(rig.data)) if s.holds]
    assert [s.holds for s in held] == [("target:nas",)]
    rig.policy_path.write_text(rig.policy_path.read_text().replace('targets = ["nas"]', "targets = []"))
    rig.reload()
    report = rig.step()
    assert report.ok
    assert report.released and "target:nas" in report.released[0]
    assert not any(s.holds for s in rig.backend.list_snapshots(str(rig.data)))


def test_a_hold_snapsync_did_not_place_pins_and_is_never_released(rig: Rig) -> None:
    first = rig.step()
    assert first.ok and first.snapshot
    rig.backend.set_holds(str(rig.data), "zfs:keep", [first.snapshot])  # how the zfs backend reports a foreign hold
    for _ in range(3):
        report = rig.step()
        assert report.ok and not report.released
    assert report.plan is not None
    decision = {d.name: d for d in report.plan.decisions}[first.snapshot]
    assert decision.keep and any("held by zfs:keep" in r for r in decision.reasons)
    held = {s.name: s.holds for s in rig.backend.list_snapshots(str(rig.data))}
    assert "zfs:keep" in held[first.snapshot]
