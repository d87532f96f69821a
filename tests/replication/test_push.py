"""Push replication end to end: real btrfs on both sides, a real sshd with a forced command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import btrfsutil

from tests.conftest import make_subvolume
from tests.replication.helpers import copies, copies_dir, run_json, snapsync, tree_digest, write_policy
from tests.sshd import Sshd


def _fill(path: Path, seed: int, files: int = 5, size: int = 200_000) -> None:
    for i in range(files):
        (path / f"f{i}.bin").write_bytes(os.urandom(size) if seed else bytes(size))


def test_full_then_incremental_over_ssh(btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path) -> None:
    data = make_subvolume(btrfs_root / "persist" / "app")
    _fill(data, 1)
    sshd.authorize(sshd.forced(target_root))
    policy = write_policy(tmp_path / "p.toml", [data], {"nas": sshd.target_table(target_root)})

    snapsync("-p", str(policy), "snapshot", check=True)
    first = run_json("-p", str(policy), "replicate")
    sent = first["groups"][0]["targets"][0]["sent"]
    assert [s["kind"] for s in sent] == ["full"]

    (data / "new.txt").write_text("second")
    os.utime(data)
    import time
    time.sleep(1.1)
    snapsync("-p", str(policy), "snapshot", check=True)
    second = run_json("-p", str(policy), "replicate")
    sent2 = second["groups"][0]["targets"][0]["sent"]
    assert [s["kind"] for s in sent2] == ["incremental"]
    assert sent2[0]["bytes"] < sent[0]["bytes"] / 10

    names = copies(target_root, "app", data)
    assert len(names) == 2
    src_dir = btrfs_root / "persist" / ".snapsync" / "app"
    for name in names:
        copy = copies_dir(target_root, "app", data) / name
        assert tree_digest(copy) == tree_digest(src_dir / name)
        info = btrfsutil.subvolume_info(copy)
        assert info.flags & 1
        assert info.received_uuid == btrfsutil.subvolume_info(src_dir / name).uuid


def test_list_shows_what_each_target_has_and_its_lag(
    btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path
) -> None:
    import time

    data = make_subvolume(btrfs_root / "persist" / "app", "v1")
    usb = btrfs_root / "usb"
    usb.mkdir()
    sshd.authorize(sshd.forced(target_root))
    policy = write_policy(tmp_path / "p.toml", [data], {
        "nas": sshd.target_table(target_root, compress='"zstd"'),
        "usb": f'type = "local"\npath = "{usb}"',
    })
    snapsync("-p", str(policy), "snapshot", check=True)
    run_json("-p", str(policy), "replicate")
    time.sleep(1.1)
    snapsync("-p", str(policy), "snapshot", check=True)
    run_json("-p", str(policy), "replicate", "usb")  # only usb is up to date now

    listing = run_json("-p", str(policy), "list")
    [group] = listing["groups"]
    state = {t["target"]: t for t in group["targets"]}
    first, second = sorted(s["name"] for s in group["datasets"][0]["snapshots"])
    assert state["usb"]["have"] == {str(data): [first, second]} and state["usb"]["lag_seconds"] == 0
    assert state["nas"]["have"] == {str(data): [first]} and state["nas"]["lag_seconds"] >= 1
    assert len(state["nas"]["planned"]) == 1 and "incremental" in state["nas"]["planned"][0]
    human = snapsync("-p", str(policy), "list")
    assert human.returncode == 0
    assert "-> nas: 1 copy" in human.stdout and "1 to send" in human.stdout
    assert "-> usb: 2 copies" in human.stdout and "up to date" in human.stdout
    assert copies(target_root, "app", data) == [first]  # listing changed nothing
    local_only = run_json("-p", str(policy), "list", "--local")
    assert local_only["groups"][0]["targets"] == []


def test_transient_errors_are_retried_permanent_ones_fail_fast(
    btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path
) -> None:
    data = make_subvolume(btrfs_root / "persist" / "app", "v1")
    policy = write_policy(tmp_path / "p.toml", [data], {"nas": sshd.target_table(target_root)})
    snapsync("-p", str(policy), "snapshot", check=True)
    env = {"SNAPSYNC_RETRY_ATTEMPTS": "3", "SNAPSYNC_RETRY_WAIT": "0.05"}

    sshd.authorize()  # nobody may log in: a permanent error
    denied = snapsync("-p", str(policy), "-v", "replicate", env=env)
    assert denied.returncode == 1
    assert "Permission denied" in denied.stdout and "retrying" not in denied.stderr

    sshd.stop()  # connection refused: worth retrying, then reported
    refused = snapsync("-p", str(policy), "-v", "replicate", env=env)
    assert refused.returncode == 1
    assert "target unreachable" in refused.stdout and "Connection refused" in refused.stdout
    assert "retrying (attempt 2 of 3)" in refused.stderr and "retrying (attempt 3 of 3)" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_policy_check_warns_about_an_unplugged_local_target(btrfs_root: Path, tmp_path: Path) -> None:
    data = make_subvolume(btrfs_root / "persist" / "app", "v1")
    policy = write_policy(tmp_path / "p.toml", [data], {"usb": 'type = "local"\npath = "/mnt/not-plugged-in"'})
    proc = snapsync("policy", "check", str(policy))
    assert proc.returncode == 0
    assert "warning: targets.usb.path: target root /mnt/not-plugged-in does not exist" in proc.stderr


def test_a_target_found_down_is_not_tried_again_by_the_next_group(
    btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path
) -> None:
    """Two groups, one dead host: the first group retries it, the second is told at once (not 2 x the retries)."""
    app = make_subvolume(btrfs_root / "persist" / "app", "v1")
    db = make_subvolume(btrfs_root / "persist" / "db", "v1")
    policy = write_policy(tmp_path / "p.toml", [app], {"nas": sshd.target_table(target_root)})
    policy.write_text(policy.read_text() + f'[groups.db]\nbackend = "btrfs"\ndatasets = ["{db}"]\ntargets = ["nas"]\n')
    snapsync("-p", str(policy), "snapshot", check=True)
    sshd.stop()
    env = {"SNAPSYNC_RETRY_ATTEMPTS": "3", "SNAPSYNC_RETRY_WAIT": "0.05"}
    done = snapsync("-p", str(policy), "-v", "replicate", "--json", env=env)
    assert done.returncode == 1, done.stderr
    reports = {g["group"]: g["targets"][0] for g in json.loads(done.stdout)["groups"]}
    first, second = (reports[g] for g in ("app", "db"))
    assert not first["ok"] and "Connection refused" in " ".join(first["errors"])
    assert not second["ok"] and "unreachable earlier in this run, not tried again" in " ".join(second["errors"])
    assert second["newest_source"] == first["newest_source"] is not None  # its lag is reported as a failed attempt's would be
    assert done.stderr.count("retrying (attempt 2 of 3)") == 1  # the first group's retries only
