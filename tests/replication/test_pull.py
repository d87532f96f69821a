"""Pull: a backup host fetches from a source that only offers `snapsync serve --role send`."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.conftest import make_subvolume
from tests.replication.helpers import copies, copies_dir, run_json, snapsync, tree_digest, write_policy
from tests.sshd import SNAPSYNC, Sshd


def test_pull_full_then_incremental_and_holds_on_the_source(
    btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path
) -> None:
    data = make_subvolume(btrfs_root / "persist" / "var" / "lib" / "forgejo", "repo v1")
    (data / "blob.bin").write_bytes(os.urandom(2_000_000))
    source_policy = write_policy(tmp_path / "source.toml", [data], {}, retention="keep_last = 1")
    sshd.authorize(sshd.forced(btrfs_root / "persist", "send"))
    backup_policy = tmp_path / "backup.toml"
    backup_policy.write_text(sshd.pull_policy("forge", btrfs_root / "persist", [data], target_root, 'compress = "zstd"\n'))

    snapsync("-p", str(source_policy), "snapshot", check=True)
    first = run_json("-p", str(backup_policy), "replicate")
    [report] = first["groups"]
    [pulled] = report["targets"]
    assert pulled["direction"] == "pull" and [s["kind"] for s in pulled["sent"]] == ["full"]

    time.sleep(1.1)
    (data / "more.txt").write_text("repo v2")
    snapsync("-p", str(source_policy), "snapshot", check=True)
    second = run_json("-p", str(backup_policy), "replicate")
    [pulled] = second["groups"][0]["targets"]
    assert [s["kind"] for s in pulled["sent"]] == ["incremental"]

    snapdir = btrfs_root / "persist" / "var" / "lib" / ".snapsync" / "forgejo"
    names = copies(target_root, "forge", data)
    assert names == sorted(p.name for p in snapdir.iterdir() if not p.name.startswith("."))
    for name in names:
        assert tree_digest(copies_dir(target_root, "forge", data) / name) == tree_digest(snapdir / name)

    # the source's own pruning keeps what the puller needs, and says why
    listing = run_json("-p", str(source_policy), "list")
    [snaps] = [d["snapshots"] for d in listing["groups"][0]["datasets"]]
    assert [s["holds"] for s in snaps][-1] == ["pull:backup.forge"]
    time.sleep(1.1)
    snapsync("-p", str(source_policy), "snapshot", check=True)
    pruned = run_json("-p", str(source_policy), "prune")
    decisions = {d["name"]: d for d in pruned["groups"][0]["plan"]}
    assert "replication base for backup.forge (pulls from here)" in decisions[names[-1]]["reasons"]
    assert decisions[names[-1]]["keep"]


def test_send_role_refuses_receive_and_delete(btrfs_root: Path, sshd: Sshd, tmp_path: Path) -> None:
    from snapsync.replication.peer import Peer
    from snapsync.replication.transport import SshTransport
    from snapsync.errors import RemoteRefused
    import pytest

    sshd.authorize(sshd.forced(btrfs_root, "send"))
    peer = Peer(SshTransport("src", "127.0.0.1", "root", sshd.port, str(btrfs_root), tuple(SNAPSYNC),
                             str(sshd.client_key), tuple(sshd.ssh_options())), "receive")
    with pytest.raises(RemoteRefused, match="not allowed for role 'send'"):
        peer.delete("x", ["snapsync_2026-01-01T00:00:00Z"])
    with pytest.raises(RemoteRefused, match="pull:"):
        peer.hold("x", "target:nas", [])
