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


def test_each_target_says_what_its_copies_hold_there(tmp_path: Path, btrfs_root: Path, target_root: Path) -> None:
    """The figures come from the target's own filesystem (serve's sizes), a target without quotas says
    how to turn them on, and a target that cannot answer is a line, not a failed listing."""
    from tests.btrfs.test_cli import _write_policy
    from tests.conftest import make_subvolume

    for leaf in ("web data", "pg", "wal"):
        make_subvolume(btrfs_root / "persist" / leaf, leaf)
    policy = _write_policy(tmp_path, btrfs_root, f'[targets.usb]\ntype = "local"\npath = "{target_root}"\n')
    policy.write_text(policy.read_text().replace('[groups.web]\n', '[groups.web]\ntargets = ["usb"]\n'))
    data = btrfs_root / "persist" / "web data"
    (data / "big.bin").write_bytes(os.urandom(3 << 20))
    _take(policy)
    (data / "big.bin").unlink()
    (data / "small.bin").write_bytes(os.urandom(1 << 20))
    _take(policy)
    assert snapsync("-p", str(policy), "replicate", "--no-prune").returncode == 0

    off = json.loads(snapsync("-p", str(policy), "list", "--sizes", "--json", "web").stdout)["groups"][0]
    (held,) = off["held"]
    assert held["target"] == "usb" and len(held["copies"]) == 0 and "btrfs quota enable" in held["note"] and held["error"] is None

    subprocess.run(["btrfs", "quota", "enable", str(target_root)], check=True)
    subprocess.run(["btrfs", "quota", "rescan", "-w", str(target_root)], check=True, capture_output=True)
    (held,) = json.loads(snapsync("-p", str(policy), "list", "--sizes", "--json", "web").stdout)["groups"][0]["held"]
    assert len(held["copies"]) == 2 and held["total_exact"] is False
    assert held["total"] >= 3 << 20  # the big file is in the first copy alone there
    text = snapsync("-p", str(policy), "list", "--sizes", "web")
    assert text.returncode == 0 and "usb: " in text.stdout and "2 copies hold" in text.stdout, text.stdout

    policy.write_text(policy.read_text().replace(f'path = "{target_root}"', f'path = "{target_root}-unplugged"'))
    down = snapsync("-p", str(policy), "list", "--sizes", "--json", "web")
    (held,) = json.loads(down.stdout)["groups"][0]["held"]
    assert held["error"] and "unplugged" in held["error"] and held["copies"] == {}
