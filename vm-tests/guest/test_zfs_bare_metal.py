"""Bare-metal recovery on real OpenZFS: a group's datasets destroyed, restored in place from the
backup host (a local target here, served by `snapsync serve --role send`) or from offsite, and the
next replication is incremental."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapsync.backends.zfs import ZfsBackend
from snapsync.offsite.upload import open_archive
from snapsync.replication.peer import Peer
from snapsync.policy.schema import DirTarget
from snapsync.recovery.restore import InPlace, restore, restore_from_peer
from snapsync.offsite.sealing import create_key_file
from snapsync.replication.transport import LocalTransport

from test_zfs import POOL, Site, fill, prop, space, zfs  # noqa: F401  (space: the fixture)

pytestmark = pytest.mark.skipif(not POOL, reason="needs SNAPSYNC_ZFS_POOL (runs inside the vm-tests guest)")


def lose(dataset: str) -> None:
    """The disk died: the dataset and all its snapshots are gone (holds released first)."""
    backend = ZfsBackend()
    for snap in backend.list_snapshots(dataset):
        for tag in snap.holds:
            if tag.startswith("target:"):
                backend.set_holds(dataset, tag, [])
    zfs("destroy", "-r", dataset)


@pytest.mark.parametrize("source", ["usb", "off"])
def test_a_zfs_group_restored_in_place_replicates_incrementally_afterwards(space: str, tmp_path: Path, source: str) -> None:
    zfs("create", f"{space}/host")
    app = f"{space}/host/app"
    zfs("create", app)
    (tmp_path / "nas").mkdir()
    create_key_file(tmp_path / "k")
    site = Site([app], f"{space}/backup")
    site.text = site.text.replace('targets = ["usb"]', 'targets = ["usb", "off"]') + "\n".join([
        "[targets.off]", 'type = "dir"', f'path = "{tmp_path / "nas"}"', f'key_file = "{tmp_path / "k"}"',
    ]) + "\n"
    for seed in range(2):
        fill(app, seed)
        report = site.step()
        assert all(t.ok for t in report.targets), report.to_json()
    newest = report.snapshot
    lose(app)

    runner = site.runner()
    group = runner.policy.groups["app"]
    landing = InPlace(group, ZfsBackend())
    if source == "usb":
        done = restore_from_peer(Peer(LocalTransport("usb", f"{space}/backup"), "send"), "usb", group, landing)
    else:
        target = runner.policy.targets["off"]
        assert isinstance(target, DirTarget)
        done = restore(open_archive(target), "off", "app", landing)
    assert done.snapshot == newest
    assert prop(app, "mounted") == "yes" and (Path(prop(app, "mountpoint")) / "state.txt").read_text() == "state 1\n"

    fill(app, 2)
    after = site.step()
    for t in after.targets:
        assert t.ok, t.to_json()
        assert [s.base for s in t.sent] == [newest], t.to_json()  # incremental from the restored snapshot
