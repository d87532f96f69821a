"""Pruning that cannot delete everything it planned, on real btrfs: the text, the JSON and
``snapsync_snapshots_deleted_total`` say only what is gone from disk, one refusal never keeps the
other snapshots, and the next ordinary run converges."""

from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import btrfsutil
import pytest

from snapsync.backends.btrfs import BtrfsBackend
from snapsync.clock import ManualClock
from snapsync.ops.runner import Runner
from snapsync.plan.holds import pull_tag
from snapsync.policy.loader import load_policy
from tests.conftest import make_subvolume
from tests.promtext import Metrics
from tests.replication.helpers import (
    copies,
    copies_dir,
    run_json,
    snapsync,
    write_policy,
)

pytestmark = pytest.mark.btrfs


def _history(policy: Path, hours: list[float]) -> list[str]:
    """Snapshots taken ``hours`` ago (negative: in the future), by the real runner on a moved clock."""
    taken = []
    for h in hours:
        loaded = load_policy(str(policy))
        clock = ManualClock(datetime.now(UTC).replace(microsecond=0) - timedelta(hours=h))
        (report,) = Runner(loaded, clock).run(list(loaded.groups.values()), take=True, only_due=False, prune=False)
        assert report.ok and report.snapshot, report.errors
        taken.append(report.snapshot)
    return taken


def _on_disk(datasets: list[Path]) -> dict[str, set[str]]:
    backend = BtrfsBackend()
    return {str(ds): {s.name for s in backend.list_snapshots(str(ds))} for ds in datasets}


def _gone(before: dict[str, set[str]], after: dict[str, set[str]]) -> set[str]:
    """Group snapshots that were somewhere before and are nowhere now."""
    was = set().union(*before.values())
    return {n for n in was if not any(n in names for names in after.values())}


def _deleted_metric(tmp_path: Path) -> float:
    return Metrics(tmp_path / "snapsync-state" / "metrics" / "snapsync.prom").one(
        "snapsync_snapshots_deleted_total", group="app", target=""
    )


@pytest.fixture
def two_datasets(btrfs_root: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    datasets = [make_subvolume(btrfs_root / "persist" / leaf, leaf) for leaf in ("db", "files")]
    return write_policy(tmp_path / "p.toml", datasets, {}, retention="keep_last = 1", interval="1h"), datasets


def test_a_refused_snapshot_is_reported_and_the_others_are_deleted(two_datasets: tuple[Path, list[Path]], tmp_path: Path) -> None:
    policy, datasets = two_datasets
    s1, s2, s3, s4 = _history(policy, [4, 3, 2, 1])
    btrfsutil.set_subvolume_read_only(Path(BtrfsBackend().snapshot_home(str(datasets[0]))) / s1, False)

    before = _on_disk(datasets)
    pruned = run_json("-p", str(policy), "prune", expect=1)
    after = _on_disk(datasets)
    (group,) = pruned["groups"]
    assert after == {str(datasets[0]): {s1, s4}, str(datasets[1]): {s4}}  # the refusal kept nothing else
    assert set(group["deleted"]) == _gone(before, after) == {s2, s3}
    assert _deleted_metric(tmp_path) == 2
    (error,) = group["errors"]
    assert s1 in error and "writable" in error and s2 not in error and "\n" not in error

    # Run again as text: nothing more can go, and the text says so.
    text = snapsync("-p", str(policy), "prune")
    assert text.returncode == 1, text.stdout + text.stderr
    assert "deleted 0 of 1" in text.stdout and re.search(rf"not deleted {s1}\b", text.stdout)
    assert not re.search(rf"^\s*deleted {s1}", text.stdout, re.MULTILINE)
    assert _on_disk(datasets) == after
    assert _deleted_metric(tmp_path) == 2

    # The error says why; once that is undone, the next ordinary run converges.
    btrfsutil.set_subvolume_read_only(Path(BtrfsBackend().snapshot_home(str(datasets[0]))) / s1, True)
    pruned = run_json("-p", str(policy), "prune")
    assert pruned["groups"][0]["deleted"] == [s1] and pruned["groups"][0]["errors"] == []
    assert _on_disk(datasets) == {str(ds): {s4} for ds in datasets}
    assert _deleted_metric(tmp_path) == 3


PULLER = pull_tag("nas", "app")


class _HoldAppears(BtrfsBackend):
    """A pulling host's session moving its hold onto a snapshot between prune's plan and its delete."""

    def __init__(self, late: str) -> None:
        super().__init__()
        self.late = late

    def destroy(self, dataset: str, names: list[str]) -> None:  # type: ignore[override]
        if self.late in names:
            self.set_holds(dataset, PULLER, [self.late])
        super().destroy(dataset, names)


def test_a_hold_that_appears_mid_prune_keeps_only_its_snapshot(two_datasets: tuple[Path, list[Path]]) -> None:
    policy, datasets = two_datasets
    s1, s2, s3, s4 = _history(policy, [4, 3, 2, 1])
    loaded = load_policy(str(policy))
    backend = _HoldAppears(late=s1)
    runner = Runner(loaded, ManualClock(datetime.now(UTC)), backends=lambda _: backend)

    before = _on_disk(datasets)
    (report,) = runner.run(list(loaded.groups.values()), take=False, only_due=False, prune=True)
    after = _on_disk(datasets)
    assert after == {str(ds): {s1, s4} for ds in datasets}
    assert set(report.deleted) == _gone(before, after) == {s2, s3}
    assert report.failures == ["prune", "prune"] and all(f"held by {PULLER}" in e and s1 in e for e in report.errors)

    # The next ordinary prune sees the hold and keeps the snapshot without an error; once the hold
    # moves on (the puller's next session), the one after deletes it.
    plain = Runner(loaded, ManualClock(datetime.now(UTC)))
    (report,) = plain.run(list(loaded.groups.values()), take=False, only_due=False, prune=True)
    assert report.ok and report.deleted == [] and _on_disk(datasets) == after
    for ds in datasets:
        BtrfsBackend().set_holds(str(ds), PULLER, [])
    (report,) = plain.run(list(loaded.groups.values()), take=False, only_due=False, prune=True)
    assert report.ok and report.deleted == [s1]
    assert _on_disk(datasets) == {str(ds): {s4} for ds in datasets}


def test_with_a_snapshot_dated_in_the_future_the_report_says_only_what_went(
    two_datasets: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    policy, datasets = two_datasets
    _history(policy, [4, 3, 2, -2])

    before = _on_disk(datasets)
    text = snapsync("-p", str(policy), "prune")
    after = _on_disk(datasets)
    gone = _gone(before, after)
    counted = re.search(r"deleted (\d+)", text.stdout)
    assert counted is not None and int(counted.group(1)) == len(gone), text.stdout
    listed = set(re.findall(r"^\s*deleted (\S+)$", text.stdout, re.MULTILINE))
    assert listed == gone, text.stdout
    assert _deleted_metric(tmp_path) == len(gone)

    before = after
    pruned = run_json("-p", str(policy), "prune", expect=None)
    after = _on_disk(datasets)
    assert set(pruned["groups"][0]["deleted"]) == _gone(before, after)


def test_target_pruning_counts_what_went_and_gets_past_a_refusal(btrfs_root: Path, target_root: Path, tmp_path: Path) -> None:
    datasets = [make_subvolume(btrfs_root / "persist" / leaf, leaf) for leaf in ("db", "files")]
    (datasets[0] / "big").write_bytes(os.urandom(4 << 20))
    usb = f'type = "local"\npath = "{target_root}"\n[targets.usb.retention]\nkeep_last = 1'
    policy = write_policy(tmp_path / "p.toml", datasets, {"usb": usb}, interval="1h")
    names = []
    for h in (4, 3, 2, 1):
        loaded = load_policy(str(policy))
        clock = ManualClock(datetime.now(UTC).replace(microsecond=0) - timedelta(hours=h))
        (report,) = Runner(loaded, clock).run(
            list(loaded.groups.values()), take=True, only_due=False, prune=False, replicate=True, prune_targets=False
        )
        assert report.ok, (report.errors, [t.errors for t in report.targets])
        names.append(report.snapshot)
    s1, s2, _, s4 = names
    # Somebody reads one copy with btrfs send (a restore from the target) while the target prunes:
    # the kernel refuses to delete a subvolume during a send.
    reading = subprocess.Popen(["btrfs", "send", "-q", str(copies_dir(target_root, "app", datasets[0]) / s2)],
                               stdout=subprocess.PIPE)

    def held() -> dict[str, set[str]]:
        return {str(ds): set(copies(target_root, "app", ds)) for ds in datasets}

    try:
        assert reading.stdout is not None and reading.stdout.read(1)  # started; blocks once the pipe is full
        before = held()
        proc = snapsync("-p", str(policy), "replicate", "--json")
        after = held()
    finally:
        reading.kill()
        reading.wait()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (usb_report,) = json.loads(proc.stdout)["groups"][0]["targets"]
    went = {f"{ds}: {n}" for ds in before for n in before[ds] - after[ds]}
    assert after[str(datasets[1])] == {s4}  # a failure on one dataset does not keep the other's
    assert s1 not in after[str(datasets[0])] and s2 in after[str(datasets[0])]
    assert set(usb_report["pruned"]) == went
    (error,) = usb_report["errors"]
    assert s2 in error and "\n" not in error
    m = Metrics(tmp_path / "snapsync-state" / "metrics" / "snapsync.prom")
    assert m.one("snapsync_snapshots_deleted_total", group="app", target="usb") == len(went)

    done = run_json("-p", str(policy), "replicate")
    (usb_report,) = done["groups"][0]["targets"]
    assert usb_report["errors"] == [] and held() == {str(ds): {s4} for ds in datasets}
    m = Metrics(tmp_path / "snapsync-state" / "metrics" / "snapsync.prom")
    assert m.one("snapsync_snapshots_deleted_total", group="app", target="usb") == 6
