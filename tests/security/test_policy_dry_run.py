"""A dry run checks the datasets as the real run does: it must never say "would take" where the run fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_subvolume


def snapsync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapsync", *args], capture_output=True, text=True, timeout=120)


def bad_datasets(root: Path) -> dict[str, Path]:
    (root / "plain").mkdir()
    (root / "file").write_text("x")
    os.symlink(root / "nowhere", root / "dangling")
    return {"missing": root / "missing", "plain": root / "plain", "file": root / "file", "dangling": root / "dangling"}


@pytest.mark.parametrize("kind", ["missing", "plain", "file", "dangling"])
def test_dry_runs_fail_where_the_real_run_fails(kind: str, btrfs_root: Path, tmp_path: Path) -> None:
    good = make_subvolume(btrfs_root / "good", "data")
    bad = bad_datasets(btrfs_root)[kind]
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'version = 1\n[groups.good]\nbackend = "btrfs"\ndatasets = ["{good}"]\n'
        f'[groups.bad]\nbackend = "btrfs"\ndatasets = ["{bad}"]\n'
    )
    check = snapsync("-p", str(policy), "policy", "check")
    assert check.returncode == 2 and check.stderr.count("\n") == 1 and "groups.bad.datasets[0]" in check.stderr

    dry = {cmd: snapsync("-p", str(policy), cmd, "--dry-run", "--json") for cmd in ("run", "snapshot")}
    assert not (btrfs_root / ".snapsync").exists(), "a dry run took a snapshot"
    real = {cmd: snapsync("-p", str(policy), cmd, "--json") for cmd in ("snapshot", "run")}
    for cmd in ("run", "snapshot"):
        assert dry[cmd].returncode == real[cmd].returncode == 1, (dry[cmd].stderr, real[cmd].stderr)
        would = {g["group"]: g for g in json.loads(dry[cmd].stdout)["groups"]}
        did = {g["group"]: g for g in json.loads(real[cmd].stdout)["groups"]}
        assert would["bad"]["snapshot"] is None and not would["bad"]["ok"]
        assert would["bad"]["errors"] == did["bad"]["errors"] != []
        assert str(bad) in would["bad"]["errors"][0]
        assert would["good"]["ok"] and would["good"]["snapshot"]


def test_a_dry_run_of_a_good_group_still_changes_nothing(btrfs_root: Path, tmp_path: Path) -> None:
    good = make_subvolume(btrfs_root / "good", "data")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'version = 1\n[groups.good]\nbackend = "btrfs"\ndatasets = ["{good}"]\n')
    for cmd in ("run", "snapshot"):
        done = snapsync("-p", str(policy), cmd, "--dry-run")
        assert done.returncode == 0 and "would take" in done.stdout, done.stderr
    assert not (btrfs_root / ".snapsync").exists()
