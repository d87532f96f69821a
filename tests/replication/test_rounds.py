"""Twenty rounds of snapshot -> replicate -> prune with different retention on each side.

In-process runner with a simulated clock (hours pass in microseconds), real btrfs on both sides, a
real sshd and a local target. After every round each copy on each target must be byte-identical to
what the source held when that snapshot was taken, and retention must hold on every side.
"""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from snapsync.backends.btrfs import BtrfsBackend
from snapsync.clock import ManualClock
from snapsync.plan.naming import parse_snapshot_name
from snapsync.policy.loader import parse_policy
from snapsync.plan.retention import RetentionRules, plan_prune
from snapsync.ops.runner import Runner
from tests.conftest import make_subvolume
from tests.replication.helpers import copies, copies_dir, tree_digest, write_policy
from tests.sshd import Sshd

START = datetime(2026, 11, 1, tzinfo=UTC)


def _mutate(rng: random.Random, data: Path) -> None:
    files = sorted(data.glob("*.bin"))
    for f in rng.sample(files, k=min(len(files), rng.randint(0, 2))):
        f.unlink()
    for _ in range(rng.randint(1, 3)):
        (data / f"r{rng.randrange(10**6)}.bin").write_bytes(rng.randbytes(rng.randint(1, 300_000)))
    with open(data / "log.txt", "a") as log:
        log.write(f"line {rng.random()}\n" * rng.randint(1, 500))


def test_twenty_rounds(btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path) -> None:
    rng = random.Random(20261126)
    a = make_subvolume(btrfs_root / "persist" / "db", "db")
    b = make_subvolume(btrfs_root / "persist" / "files", "files")
    local_root = btrfs_root / "usb"
    local_root.mkdir()
    sshd.authorize(sshd.forced(target_root))
    ssh_table = sshd.target_table(target_root) + "[targets.nas.retention]\nkeep_last = 4\nhourly = 0\ndaily = 3\n"
    local_table = 'type = "local"\npath = "' + str(local_root) + '"\n[targets.usb.retention]\nkeep_last = 6\n'
    path = write_policy(tmp_path / "p.toml", [a, b], {"nas": ssh_table, "usb": local_table},
                        retention="keep_last = 2\nhourly = 3", interval="1h")
    policy = parse_policy(path.read_text(), str(path))
    clock = ManualClock(START)
    runner = Runner(policy, clock)
    backend = BtrfsBackend()
    digests: dict[tuple[str, str], dict[str, str]] = {}
    rules = {
        "nas": RetentionRules(keep_last=4, daily=3, timezone="UTC"),
        "usb": RetentionRules(keep_last=6, timezone="UTC"),
    }
    for round_ in range(20):
        clock.advance(timedelta(hours=rng.choice([1, 1, 2, 5, 13, 26])))
        for data in (a, b):
            _mutate(rng, data)
        [report] = runner.run(policy.groups.values(), take=True, only_due=True, prune=True, replicate=True)
        assert report.ok, (round_, report.to_json())
        assert report.snapshot is not None
        for data in (a, b):
            snap = backend.snapshot_path(str(data)) / report.snapshot
            digests[(str(data), report.snapshot)] = tree_digest(snap)
        sent = {t.target: t.sent for t in report.targets}
        if round_ > 0:  # every later round is incremental, one snapshot per dataset
            assert all(s.base is not None for ts in sent.values() for s in ts), sent

        for target, root in (("nas", target_root), ("usb", local_root)):
            for data in (a, b):
                names = copies(root, "app", data)
                assert report.snapshot in names  # the newest always arrives
                for name in names:
                    assert tree_digest(copies_dir(root, "app", data) / name) == digests[(str(data), name)]
                # target retention: exactly what a plan over the copies keeps (newest pinned as base)
                dated = [_Dated(n) for n in names]
                plan = plan_prune(dated, rules[target], clock.now(), {report.snapshot: ["base"]})
                assert not plan.removed, (target, [d.name for d in plan.removed])
        source_names = [s.name for s in backend.list_snapshots(str(a))]
        assert report.snapshot in source_names
        assert len(source_names) <= 2 + 3 + 1  # keep_last + hourly (+ the pinned base, which is the newest)
    # the targets kept more history than the source
    assert len(copies(local_root, "app", a)) > len(backend.list_snapshots(str(a)))


class _Dated:
    def __init__(self, name: str) -> None:
        self.name = name
        when = parse_snapshot_name("snapsync", name)
        assert when is not None
        self.created = when
