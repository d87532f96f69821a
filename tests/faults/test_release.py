"""`snapsync release GROUP NAME` after a real rollback on btrfs: only a safety snapshot that is held is
released; a typo, a second release or an ordinary snapshot's name fails with exit 2 and names the
safety snapshots there are, and the real one stays held until it is released by its name."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import make_subvolume
from tests.replication.helpers import run_json, snapsync, write_policy

pytestmark = pytest.mark.btrfs


def _snapshot(policy: Path, app: Path, db: Path, version: str) -> str:
    (app / "data.txt").write_text(f"app {version}\n")
    (db / "data.txt").write_text(f"db {version}\n")
    time.sleep(1.05)  # snapshot names carry the second
    return str(run_json("-p", str(policy), "snapshot")["groups"][0]["snapshot"])


def _safety_holds(policy: Path) -> dict[str, set[str]]:
    """Per dataset, the safety snapshots `list` shows as held."""
    listed = run_json("-p", str(policy), "list", "--local")["groups"][0]["datasets"]
    return {
        entry["dataset"]: {s["name"] for s in entry["snapshots"] if f"safety:{s['name']}" in s["holds"]}
        for entry in listed
    }


def test_release_refuses_what_is_not_a_held_safety_snapshot_and_lists_those_that_are(
    btrfs_root: Path, target_root: Path, tmp_path: Path
) -> None:
    app = make_subvolume(btrfs_root / "persist" / "app", "app v1\n")
    db = make_subvolume(btrfs_root / "persist" / "db", "db v1\n")
    policy = write_policy(tmp_path / "p.toml", [app, db], {"usb": f'type = "local"\npath = "{target_root}"'})
    first = _snapshot(policy, app, db, "v1")
    _snapshot(policy, app, db, "v2")
    safety = run_json("-p", str(policy), "rollback", "app", first)["safety_snapshot"]
    time.sleep(1.05)
    second_safety = run_json("-p", str(policy), "rollback", "app", first)["safety_snapshot"]
    both = {safety, second_safety}
    assert _safety_holds(policy) == {str(app): both, str(db): both}

    typo = next(t for d in "0123456789" if (t := f"{safety[:-2]}{d}Z") not in both)  # one wrong digit
    for wrong in (typo, first, "nonsense"):
        refused = snapsync("-p", str(policy), "release", "app", wrong)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        line = refused.stderr.strip()
        assert "\n" not in line and f"{wrong!r} is not a safety snapshot held" in line
        assert f"the safety snapshots held there: {', '.join(sorted(both))}" in line
    assert _safety_holds(policy) == {str(app): both, str(db): both}  # nothing was released

    released = snapsync("-p", str(policy), "release", "app", safety)
    assert released.returncode == 0, released.stderr
    assert f"released safety:{safety} on 2 dataset(s) of app" in released.stdout
    assert _safety_holds(policy) == {str(app): {second_safety}, str(db): {second_safety}}

    again = snapsync("-p", str(policy), "release", "app", safety)
    assert again.returncode == 2
    assert f"the safety snapshots held there: {second_safety}" in again.stderr

    assert snapsync("-p", str(policy), "release", "app", second_safety).returncode == 0
    last = snapsync("-p", str(policy), "release", "app", second_safety)
    assert last.returncode == 2 and "no safety snapshot is held there" in last.stderr
    assert _safety_holds(policy) == {str(app): set(), str(db): set()}
