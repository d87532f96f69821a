"""Push replication end to end: real btrfs on both sides, a real sshd with a forced command."""

from __future__ import annotations

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
