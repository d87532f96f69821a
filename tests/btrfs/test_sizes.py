"""`list --sizes` on real btrfs: quota groups when they are on, and how to turn them on when they are off."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.btrfs.test_cli import snapsync
from tests.btrfs.test_versions import _take, three_datasets


def test_snapshot_sizes_come_from_quota_groups_and_their_absence_is_explained(tmp_path: Path, btrfs_root: Path) -> None:
    policy, data = three_datasets(tmp_path, btrfs_root)
    (data / "big.bin").write_bytes(os.urandom(2 << 20))
    first = _take(policy)
    (data / "big.bin").unlink()  # only the first snapshot holds it now
    second = _take(policy)

    off = snapsync("-p", str(policy), "list", "--local", "--sizes", "--json", "web")
    assert off.returncode == 0, off.stderr
    (ds,) = json.loads(off.stdout)["groups"][0]["datasets"]
    assert "quotas are off" in ds["sizes_note"] and "btrfs quota enable" in ds["sizes_note"]
    assert all(s["sizes"] is None for s in ds["snapshots"])
    plain = json.loads(snapsync("-p", str(policy), "list", "--local", "--json", "web").stdout)["groups"][0]["datasets"][0]
    assert "sizes_note" not in plain and all("sizes" not in s for s in plain["snapshots"])  # only when asked

    subprocess.run(["btrfs", "quota", "enable", str(btrfs_root)], check=True)
    subprocess.run(["btrfs", "quota", "rescan", "-w", str(btrfs_root)], check=True, capture_output=True)
    on = json.loads(snapsync("-p", str(policy), "list", "--local", "--sizes", "--json", "web").stdout)["groups"][0]["datasets"][0]
    by_name = {s["name"]: s["sizes"] for s in on["snapshots"]}
    assert by_name[first]["exclusive"] >= 2 << 20  # deleting it alone frees the file
    assert by_name[second]["exclusive"] < 1 << 20
    assert all(v["referenced"] == v["exclusive"] + v["shared"] for v in by_name.values())
    text = snapsync("-p", str(policy), "list", "--local", "--sizes", "web")
    assert text.returncode == 0 and "exclusive" in text.stdout and "2.0 MiB" in text.stdout
