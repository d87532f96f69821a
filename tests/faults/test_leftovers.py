"""States made by a wrong clock or by hand, on real btrfs with a real local target: a snapshot dated
in the future, a held base deleted by hand, a pulling host that went away, a target that left the
policy. Each is reproduced, then converged by ordinary runs with byte-identical copies, the right
holds and reports that say what happened."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from snapsync.backends.btrfs import BtrfsBackend
from snapsync.clock import ManualClock
from snapsync.ops.runner import GroupReport, Runner
from snapsync.plan.holds import pull_tag, target_tag
from snapsync.policy.loader import load_policy
from tests.conftest import make_subvolume
from tests.replication.helpers import copies, copies_dir, run_json, snapsync, tree_digest, write_policy

pytestmark = pytest.mark.btrfs

USB = target_tag("usb")


def _at(policy: Path, when: datetime, *, take: bool = True, replicate: bool = False, prune: bool = False) -> GroupReport:
    """One run of the real runner on a moved clock (the host's clock as it was then)."""
    loaded = load_policy(str(policy))
    (report, *_) = Runner(loaded, ManualClock(when.replace(microsecond=0))).run(
        list(loaded.groups.values()), take=take, only_due=False, prune=prune, replicate=replicate
    )
    assert report.ok, (report.errors, [t.errors for t in report.targets])
    return report


def _holds(dataset: Path) -> dict[str, list[str]]:
    return {s.name: list(s.holds) for s in BtrfsBackend().list_snapshots(str(dataset)) if s.holds}


def _snapshots(dataset: Path) -> list[str]:
    return [s.name for s in BtrfsBackend().list_snapshots(str(dataset))]


def _same(dataset: Path, target_root: Path, name: str) -> bool:
    snap = Path(BtrfsBackend().snapshot_home(str(dataset))) / name
    return tree_digest(snap) == tree_digest(copies_dir(target_root, "app", dataset) / name)


@pytest.fixture
def setup(btrfs_root: Path, target_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    dataset = make_subvolume(btrfs_root / "persist" / "db", "v1")
    usb = f'type = "local"\npath = "{target_root}"\n[targets.usb.retention]\nkeep_last = 100'
    return write_policy(tmp_path / "p.toml", [dataset], {"usb": usb}, retention="keep_last = 1"), dataset


def test_a_snapshot_from_a_wrong_clock_is_never_a_base_and_check_says_what_to_do(
    setup: tuple[Path, Path], target_root: Path
) -> None:
    policy, dataset = setup
    now = datetime.now(UTC)
    s1 = _at(policy, now - timedelta(hours=3), replicate=True).snapshot
    (dataset / "data").write_text("v2")
    # The clock jumps a year ahead for one run: the snapshot is taken and sent, the hold moves there.
    wrong = now + timedelta(days=365)
    future = _at(policy, wrong, replicate=True).snapshot
    assert future and _holds(dataset) == {future: [USB]} and future in copies(target_root, "app", dataset)

    # Deleting it now would turn the target's copy into a divergence: refused while it is held.
    refused = snapsync("-p", str(policy), "prune", "--future")
    assert refused.returncode == 1 and "replicate first" in refused.stdout and future in _snapshots(dataset)

    # Back on the right clock: the copy of the future snapshot is dropped (the source keeps it), the
    # hold returns to the newest real common snapshot, and the reports say why.
    out = run_json("-p", str(policy), "replicate")
    (usb,) = out["groups"][0]["targets"]
    assert usb["ok"] and usb["newest_common"] == s1 and usb["newest_source"] == s1, usb
    assert any(future in n and "after this host's clock" in n for n in usb["notes"]), usb["notes"]
    assert copies(target_root, "app", dataset) == [s1] and _holds(dataset) == {s1: [USB]}
    assert future in _snapshots(dataset)

    # check goes CRITICAL and says what to do; list names it too.
    check = snapsync("-p", str(policy), "check")
    assert check.returncode == 2, check.stdout + check.stderr
    assert future in check.stdout and "snapsync prune app --future" in check.stdout
    listed = snapsync("-p", str(policy), "list", env={"COLUMNS": "400"})
    assert listed.returncode == 0 and "after this host's clock" in listed.stdout, listed.stdout

    # Real snapshots keep flowing, incrementally from the real base, never from the future one.
    (dataset / "data").write_text("v3")
    s3 = run_json("-p", str(policy), "snapshot")["groups"][0]["snapshot"]
    out = run_json("-p", str(policy), "replicate")
    (usb,) = out["groups"][0]["targets"]
    assert [(s["name"], s["base"]) for s in usb["sent"]] == [(s3, s1)], usb
    assert _holds(dataset) == {s3: [USB]} and _same(dataset, target_root, s3)
    # Target pruning works again: no copy dated after the clock stops it.
    assert usb["errors"] == [] and usb["prune"] is not None and copies(target_root, "app", dataset) == [s1, s3]

    # Pruning waits for the clock; --future deletes it on request, after which check is OK.
    pruned = snapsync("-p", str(policy), "prune")
    assert pruned.returncode == 1 and "dated after the clock" in pruned.stdout + pruned.stderr
    out = run_json("-p", str(policy), "prune", "--future")
    assert future in out["groups"][0]["deleted"] and out["groups"][0]["ok"], out
    assert _snapshots(dataset) == [s3]
    check = snapsync("-p", str(policy), "check")
    assert check.returncode == 0, check.stdout


def test_a_held_base_deleted_by_hand_pins_the_older_ones_until_replication_finds_the_common_one(
    setup: tuple[Path, Path], target_root: Path
) -> None:
    policy, dataset = setup
    now = datetime.now(UTC)
    taken = []
    for i, hours in enumerate((4, 3, 2)):
        (dataset / "data").write_text(f"v{i}")
        taken.append(_at(policy, now - timedelta(hours=hours), replicate=True).snapshot)
    s1, s2, s3 = taken
    assert _holds(dataset) == {s3: [USB]} and copies(target_root, "app", dataset) == [s1, s2, s3]

    # Someone deletes the held snapshot by hand, then a new one is taken before any replicate.
    subprocess.run(["btrfs", "subvolume", "delete", str(Path(BtrfsBackend().snapshot_home(str(dataset))) / s3)],
                   check=True, capture_output=True)
    (dataset / "data").write_text("v4")
    s4 = _at(policy, now - timedelta(hours=1)).snapshot

    # An ordinary prune (keep_last = 1) must not delete the real common base, and says why.
    out = run_json("-p", str(policy), "prune")
    group = out["groups"][0]
    assert group["ok"] and group["deleted"] == [], group
    kept = {d["name"]: d["reasons"] for d in group["plan"] if d["keep"]}
    assert set(kept) == {s1, s2, s4} and any("deleted by hand" in r for r in kept[s2]), kept

    # list does not pretend the target was never replicated to.
    listed = run_json("-p", str(policy), "list")
    assert "never replicated" not in str(listed), listed
    (entry,) = listed["groups"][0]["datasets"]
    assert entry["lost_holds"] == {USB: [s3]}
    why = {s["name"]: " ".join(s["why"]) for s in entry["snapshots"]}
    assert "deleted by hand" in why[s2] and "deleted by hand" in why[s1] and why[s4] == "", why

    # The next replicate continues incrementally from the newest snapshot both sides share (no
    # conflict over the target's copy of the deleted one) and moves the hold there.
    out = run_json("-p", str(policy), "replicate", "--no-prune")
    (usb,) = out["groups"][0]["targets"]
    assert [(s["name"], s["base"]) for s in usb["sent"]] == [(s4, s2)], usb
    assert any(s3 in n and "deleted on the source" in n for n in usb["notes"]), usb["notes"]
    assert _holds(dataset) == {s4: [USB]} and BtrfsBackend().lost_holds(str(dataset)) == {}
    assert _same(dataset, target_root, s4)

    # Now pruning converges as usual.
    out = run_json("-p", str(policy), "prune")
    assert sorted(out["groups"][0]["deleted"]) == sorted([s1, s2]) and _snapshots(dataset) == [s4]


def test_a_pulling_host_that_stopped_fetching_loses_its_hold_and_the_reason_is_reported(
    setup: tuple[Path, Path]
) -> None:
    policy, dataset = setup
    now = datetime.now(UTC)
    gone, fresh = pull_tag("old-nas", "app"), pull_tag("nas", "app")
    s1 = _at(policy, now - timedelta(days=40)).snapshot
    s2 = _at(policy, now - timedelta(days=35)).snapshot
    s3 = _at(policy, now - timedelta(hours=1)).snapshot
    assert s1 and s2 and s3
    backend = BtrfsBackend()
    backend.set_holds(str(dataset), gone, [s1])  # has not fetched s2, there for 35 days
    backend.set_holds(str(dataset), fresh, [s3])

    listed = run_json("-p", str(policy), "list")
    why = {s["name"]: " ".join(s["why"]) for s in listed["groups"][0]["datasets"][0]["snapshots"]}
    assert "released at the next prune" in why[s1] and "pulls from here" in why[s3], why
    dry = run_json("-p", str(policy), "prune", "--dry-run")
    assert any(gone in r and "has not pulled for 4w2d" in r for r in dry["groups"][0]["released_holds"]), dry
    assert _holds(dataset) == {s1: [gone], s3: [fresh]}  # a dry run changes nothing

    out = run_json("-p", str(policy), "prune")
    group = out["groups"][0]
    assert [r for r in group["released_holds"] if gone in r] and not [r for r in group["released_holds"] if fresh in r]
    assert sorted(group["deleted"]) == sorted([s1, s2]) and _holds(dataset) == {s3: [fresh]}


def test_a_target_that_left_the_policy_leaves_no_hold_even_when_its_base_was_deleted_by_hand(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    policy, dataset = setup
    now = datetime.now(UTC)
    s1 = _at(policy, now - timedelta(hours=2), replicate=True).snapshot
    s2 = _at(policy, now - timedelta(hours=1), replicate=True).snapshot
    subprocess.run(["btrfs", "subvolume", "delete", str(Path(BtrfsBackend().snapshot_home(str(dataset))) / s2)],
                   check=True, capture_output=True)
    assert BtrfsBackend().lost_holds(str(dataset)) == {USB: [s2]}
    policy.write_text(policy.read_text().replace('targets = ["usb"]', "targets = []"))

    out = run_json("-p", str(policy), "prune")
    group = out["groups"][0]
    assert any(USB in r and "no longer configured" in r for r in group["released_holds"]), group
    assert BtrfsBackend().lost_holds(str(dataset)) == {} and _snapshots(dataset) == [s1]


def test_an_upload_made_while_the_clock_was_ahead_does_not_stop_the_offsite_chain(btrfs_root: Path, tmp_path: Path) -> None:
    dataset = make_subvolume(btrfs_root / "persist" / "app", "v1")
    nas = btrfs_root / "nas"
    nas.mkdir()
    key = tmp_path / "offsite.key"
    assert snapsync("keygen", str(key)).returncode == 0
    table = f'type = "dir"\npath = "{nas}"\nkey_file = "{key}"\n[targets.nas.retention]\nkeep_last = 100'
    policy = write_policy(tmp_path / "p.toml", [dataset], {"nas": table}, retention="keep_last = 100")
    now = datetime.now(UTC)
    s1 = _at(policy, now - timedelta(hours=2), replicate=True).snapshot
    (dataset / "data").write_text("v2")
    future = _at(policy, now + timedelta(days=365), replicate=True).snapshot
    stored = run_json("-p", str(policy), "list")["groups"][0]["targets"][0]["have"]
    assert stored == {str(dataset): [s1, future]}, stored

    (dataset / "data").write_text("v3")
    s3 = run_json("-p", str(policy), "snapshot")["groups"][0]["snapshot"]
    out = run_json("-p", str(policy), "replicate")
    (nas_report,) = out["groups"][0]["targets"]
    assert nas_report["ok"] and nas_report["prune"] is not None, nas_report
    assert [(s["name"], s["base"]) for s in nas_report["sent"]] == [(s3, s1)], nas_report
    assert nas_report["have"] == {str(dataset): [s1, s3]} and nas_report["newest_source"] == s3
    assert any(future in n and "after this host's clock" in n for n in nas_report["notes"])
    assert _holds(dataset) == {s1: [target_tag("nas")], s3: [target_tag("nas")]}  # s1, the full, is the base of the next month's first upload
