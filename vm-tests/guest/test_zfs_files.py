"""The everyday file questions on real OpenZFS: what each snapshot costs (zfs's own figures), every
version of a file through ``.zfs/snapshot``, what changed between snapshots, one path restored, and
what the target's copies hold there."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from snapsync.backends.zfs import ZfsBackend
from snapsync.ops.diff import diff_group
from snapsync.ops.held import held_on_targets
from snapsync.ops.versions import find_versions
from snapsync.recovery.path_restore import restore_path

from test_zfs import POOL, Site, prop, space, zfs  # noqa: F401  (space: the fixture)

pytestmark = pytest.mark.skipif(not POOL, reason="needs SNAPSYNC_ZFS_POOL (runs inside the vm-tests guest)")


def test_sizes_versions_diff_and_one_path_back_on_zfs(space: str, tmp_path: Path) -> None:
    src = f"{space}/src"
    zfs("create", src)
    root = Path(prop(src, "mountpoint"))
    site = Site([src], f"{space}/backup")
    (root / "big.bin").write_bytes(os.urandom(2 << 20))
    (root / "app.ini").write_text("port = 1\n")
    first = site.step(replicate=False).snapshot
    (root / "big.bin").unlink()
    (root / "app.ini").write_text("port = 2, changed\n")
    os.rename(root / "app.ini", root / "renamed.ini")
    second = site.step(replicate=False).snapshot
    assert first and second

    sizes = ZfsBackend().snapshot_sizes(src)
    assert sizes.note is None and set(sizes.sizes) == {first, second}
    assert sizes.sizes[first]["used"] >= 2 << 20 and set(sizes.sizes[first]) == {"used", "written", "referenced"}

    runner = site.runner()
    found = find_versions(runner.policy, runner, str(root / "app.ini"))
    assert [v.snapshot for v in found.versions] == [first]  # gone from now and from the second: renamed
    assert Path(found.versions[0].path).read_text() == "port = 1\n"  # read through .zfs/snapshot

    changes = diff_group(runner.policy, runner, "app", first, second)[src]
    assert changes.removed == ["big.bin"] and changes.renamed == [("app.ini", "renamed.ini")] and changes.modified == ["renamed.ini"]

    out = tmp_path / "out"
    out.mkdir()
    (done,) = restore_path(runner.policy, runner, "app", first, [str(root / "app.ini")], str(out), datetime.now(UTC))
    assert done.snapshot == first and (out / "app.ini").read_text() == "port = 1\n"

    assert site.step(take=False).targets[0].ok
    (held,) = held_on_targets(runner.policy, runner.policy.groups["app"])
    assert held.error is None and set(held.copies) == {first, second} and held.total is not None
    total, exact = held.total
    assert exact and 2 << 20 <= total <= int(prop(site.copy(src), "used")) + (1 << 20)  # written summed: each block once
    there = find_versions(runner.policy, runner, str(root / "renamed.ini"), None)
    assert [(v.snapshot, v.also_in) for v in there.versions] == [("(live)", (second,))]  # the target's copies stay unmounted:
    assert any(n.startswith("usb: 2 copies are not mounted") for n in there.notes), there.notes  # not read in place, and said so
