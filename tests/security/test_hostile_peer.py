"""The same boundary in the other direction: a compromised source that this host pulls from, and a
compromised backup host that this host restores from. Both answer as the real send role would and
then send a stream that tries to write outside the copy; this host must refuse it, change nothing
outside, and leave no partial copy or half-restored dataset."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import btrfsutil

from tests.conftest import make_subvolume
from tests.replication.helpers import copies, run_json, snapsync, tree_digest, write_policy
from tests.sshd import Sshd

PEER = Path(__file__).with_name("hostile_peer.py")


def hostile(sshd: Sshd, root: Path, outside: Path) -> str:
    return sshd.forced(root, "send", wrapper=f"{sys.executable} {PEER} {outside} -- {{}}")


def canary(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched\n")
    return outside


def test_a_compromised_backup_host_cannot_write_outside_a_restore(
    btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path
) -> None:
    outside = canary(tmp_path)
    app = make_subvolume(btrfs_root / "persist" / "app", "v1\n")
    sshd.authorize(sshd.forced(target_root))
    policy = write_policy(tmp_path / "p.toml", [app], {"nas": sshd.target_table(target_root)})
    p = ["-p", str(policy)]
    run_json(*p, "snapshot")
    run_json(*p, "replicate")
    before = tree_digest(outside)

    sshd.authorize(hostile(sshd, target_root, outside))
    restored = tmp_path / "restored"
    proc = snapsync(*p, "restore", "app", "--from", "nas", "--to", str(restored))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc
    assert tree_digest(outside) == before
    assert not any(
        btrfsutil.is_subvolume(os.path.join(d, n)) for d, dirs, _ in os.walk(restored) for n in dirs
    ) if restored.exists() else True

    for snap in list((btrfs_root / "persist" / ".snapsync" / "app").iterdir()):
        if btrfsutil.is_subvolume(snap):
            btrfsutil.delete_subvolume(snap)
    btrfsutil.delete_subvolume(app)
    proc = snapsync(*p, "restore", "app", "--from", "nas", "--in-place")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc
    assert tree_digest(outside) == before
    assert not app.exists()
    leftovers = [e for e in os.listdir(btrfs_root / "persist" / ".snapsync" / "app") if not e.startswith(".")]
    assert leftovers == []
    assert not any((btrfs_root / "persist" / ".snapsync" / "app" / ".incoming").iterdir())


def test_a_compromised_source_cannot_write_outside_what_this_host_pulls(
    btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path
) -> None:
    outside = canary(tmp_path)
    data = make_subvolume(btrfs_root / "persist" / "forgejo", "repo v1")
    source_policy = write_policy(tmp_path / "source.toml", [data], {})
    snapsync("-p", str(source_policy), "snapshot", check=True)
    sshd.authorize(hostile(sshd, btrfs_root / "persist", outside))
    backup_policy = tmp_path / "backup.toml"
    backup_policy.write_text(sshd.pull_policy("forge", btrfs_root / "persist", [data], target_root))
    before = tree_digest(outside)
    report = run_json("-p", str(backup_policy), "replicate", expect=1)
    [pulled] = report["groups"][0]["targets"]
    assert pulled["sent"] == [] and pulled["errors"], pulled
    assert tree_digest(outside) == before
    assert copies(target_root, "forge", data) == []
    shutil.rmtree(outside)
