"""Rollback on real OpenZFS: clone + promote + renames, nothing destroyed, the target's history handled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from snapsync.backends.zfs import ZfsBackend
from snapsync.errors import UsageError
from snapsync.recovery.rollback import rollback

from test_zfs import POOL, Site, fill, prop, space, zfs  # noqa: F401  (space: the fixture)

pytestmark = pytest.mark.skipif(not POOL, reason="needs SNAPSYNC_ZFS_POOL (runs inside the vm-tests guest)")


def names(dataset: str) -> list[str]:
    return [n.split("@", 1)[1] for n in zfs("list", "-H", "-t", "snapshot", "-o", "name", "-s", "createtxg", dataset).split()]


def test_rollback_promotes_a_clone_keeps_every_snapshot_and_the_target_continues_incrementally(space: str) -> None:
    app, db = f"{space}/app", f"{space}/db"
    for ds in (app, db):
        zfs("create", ds)
    site = Site([app, db], f"{space}/backup")
    taken = []
    for seed in range(3):
        for ds in (app, db):
            fill(ds, seed)
        report = site.step()
        assert report.targets[0].ok, report.to_json()
        taken.append(report.snapshot)
    mountpoint = prop(app, "mountpoint")
    group = site.runner().policy.groups["app"]
    done = rollback(group, ZfsBackend(), taken[0], site.clock.now())
    for ds in (app, db):
        assert (Path(prop(ds, "mountpoint")) / "state.txt").read_text() == "state 0\n"
        assert names(ds) == [taken[0]]  # the clone owns the history up to the snapshot...
        aside = done.aside[ds]
        assert names(aside) == [taken[1], taken[2], done.safety]  # ...the old state keeps the rest
        assert prop(aside, "canmount") == "noauto" and prop(aside, "mounted") == "no"
        assert f"safety:{done.safety}" in zfs("holds", "-H", f"{aside}@{done.safety}")
        assert "target:" not in zfs("holds", "-H", *(f"{aside}@{n}" for n in names(aside)))
    assert prop(app, "mountpoint") == mountpoint and prop(app, "mounted") == "yes"
    assert any("diverged" in n for n in done.notes)

    fill(app, 9)
    refused = site.step()
    assert not refused.targets[0].ok and "diverged" in " ".join(refused.targets[0].errors).lower()
    site.text = site.text.replace('type = "local"', 'type = "local"\non_diverged = "rollback"')
    fill(app, 10)
    report = site.step()
    (target,) = report.targets
    assert target.ok, target.to_json()
    assert all(s.base is not None for s in target.sent)  # incremental from the rolled-back-to snapshot


def test_rollback_is_refused_while_a_process_is_in_the_mountpoint(space: str) -> None:
    app = f"{space}/app"
    zfs("create", app)
    site = Site([app], f"{space}/backup")
    fill(app, 1)
    first = site.step(replicate=False).snapshot
    fill(app, 2)
    site.step(replicate=False)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], cwd=prop(app, "mountpoint"))
    try:
        group = site.runner().policy.groups["app"]
        with pytest.raises(UsageError, match=f"pid {proc.pid}"):
            rollback(group, ZfsBackend(), first, site.clock.now())
        assert (Path(prop(app, "mountpoint")) / "state.txt").read_text() == "state 2\n"
    finally:
        proc.kill()
        proc.wait()
