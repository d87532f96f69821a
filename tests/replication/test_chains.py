"""Catching up: pending snapshots go to a target in one stream and one receive session (a chain),
each copy built on the one before, locally and over ssh, with the source's hold on the newest. A
week offline is one session per dataset and target, not one per snapshot."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import btrfsutil
import pytest

from snapsync.backends.btrfs import BtrfsBackend
from snapsync.clock import ManualClock
from snapsync.plan.naming import snapshot_name
from tests.conftest import make_subvolume
from tests.replication.helpers import copies, copies_dir, snapsync, tree_digest, write_policy
from tests.sshd import Sshd

PENDING = 6


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_pending_snapshots_go_in_one_stream_each_built_on_the_one_before(
    btrfs_root: Path, target_root: Path, tmp_path: Path, request: pytest.FixtureRequest, where: str
) -> None:
    data = make_subvolume(btrfs_root / "persist" / "app")
    (data / "seed.bin").write_bytes(os.urandom(500_000))
    if where == "ssh":
        sshd: Sshd = request.getfixturevalue("sshd")
        sshd.authorize(sshd.forced(target_root))
        table = sshd.target_table(target_root)
    else:
        table = f'type = "local"\npath = "{target_root}"'
    policy = write_policy(tmp_path / "p.toml", [data], {"nas": table})
    backend, clock = BtrfsBackend(), ManualClock(datetime(2026, 11, 1, tzinfo=UTC))
    names = []
    for i in range(PENDING + 1):  # the first goes alone (full), the rest pile up as on a host offline for a while
        (data / f"f{i}.bin").write_bytes(os.urandom(100_000))
        clock.advance(timedelta(hours=1))
        names.append(snapshot_name("snapsync", clock.now()))
        backend.snapshot_group([str(data)], names[-1])
        if i == 0:
            assert snapsync("-p", str(policy), "replicate", "--json").returncode == 0
    done = snapsync("-v", "-p", str(policy), "replicate", "--no-prune", "--json")
    assert done.returncode == 0, done.stderr
    sent = json.loads(done.stdout)["groups"][0]["targets"][0]["sent"]
    assert [(s["name"], s["base"]) for s in sent] == list(zip(names[1:], names[:-1]))
    assert sum(s["bytes"] for s in sent) > PENDING * 100_000
    assert len(re.findall(r"sent in one stream \(6 snapshots", done.stderr)) == 1, done.stderr
    assert not re.search(r": \S+ \S+ sent \(", done.stderr)  # no snapshot went in a session of its own

    home = backend.snapshot_path(str(data))
    assert copies(target_root, "app", data) == names
    uuids = {n: btrfsutil.subvolume_info(copies_dir(target_root, "app", data) / n).uuid for n in names}
    for before, name in zip(names, names[1:]):
        copy = copies_dir(target_root, "app", data) / name
        assert btrfsutil.subvolume_info(copy).parent_uuid == uuids[before]  # built on the one before
        assert tree_digest(copy) == tree_digest(home / name)
    held = [s.name for s in backend.list_snapshots(str(data)) if "target:nas" in s.holds]
    assert held == [names[-1]]
