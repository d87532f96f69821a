"""`snapsync versions PATH` on real btrfs snapshots: distinct versions, newest first, nothing followed out."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from snapsync.ops.versions import Version, distinct
from tests.btrfs.test_cli import _write_policy, snapsync
from tests.conftest import make_subvolume


def test_runs_of_identical_versions_collapse_into_their_newest() -> None:
    def v(snap: str, size: int, mtime: int) -> Version:
        return Version(snap, None, f"/{snap}/f", "file", size, mtime)

    got = distinct([v("live", 3, 30), v("s4", 3, 30), v("s3", 2, 20), v("s2", 2, 20), v("s1", 3, 30)])
    assert [(x.snapshot, x.also_in) for x in got] == [("live", ("s4",)), ("s3", ("s2",)), ("s1", ())]  # the same again later is a version again
    assert distinct([]) == []


def _take(policy: Path) -> str:
    done = snapsync("-p", str(policy), "snapshot", "--json", "web")
    assert done.returncode == 0, done.stderr
    time.sleep(1.1)  # snapshot names are to the second
    return str(json.loads(done.stdout)["groups"][0]["snapshot"])


def test_every_distinct_version_of_a_file_newest_first(tmp_path: Path, btrfs_root: Path) -> None:
    for leaf in ("web data", "pg", "wal"):
        make_subvolume(btrfs_root / "persist" / leaf, leaf)
    policy = _write_policy(tmp_path, btrfs_root)
    data = btrfs_root / "persist" / "web data"
    target = data / "site" / "index.html"
    target.parent.mkdir()
    target.write_text("one\n")
    first = _take(policy)
    target.write_text("two, longer\n")
    os.utime(target, (1_800_000_000, 1_800_000_000))
    second = _take(policy)
    third = _take(policy)  # nothing changed: the same version as the second
    target.write_text("three\n")

    done = snapsync("-p", str(policy), "versions", str(target), "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["group"] == "web" and found["path"] == "site/index.html"
    versions = found["versions"]
    assert [v["snapshot"] for v in versions] == ["(live)", third, first]
    assert versions[1]["also_in"] == [second] and versions[1]["size"] == len("two, longer\n")
    assert versions[1]["mtime"] == "2027-01-15T08:00:00Z"
    assert Path(versions[2]["path"]).read_text() == "one\n"  # where the old version can be read

    text = snapsync("-p", str(policy), "versions", str(target))
    assert text.returncode == 0 and first in text.stdout and "1 more" in text.stdout

    directory = json.loads(snapsync("-p", str(policy), "versions", str(target.parent), "--json").stdout)["versions"]
    assert directory and all(v["kind"] == "directory" for v in directory)

    outside = snapsync("-p", str(policy), "versions", "/etc/passwd")
    assert outside.returncode == 2 and len(outside.stderr.strip().splitlines()) == 1 and "not inside any dataset" in outside.stderr


def test_a_symlink_in_a_snapshot_is_not_followed_out_of_it(tmp_path: Path, btrfs_root: Path) -> None:
    for leaf in ("web data", "pg", "wal"):
        make_subvolume(btrfs_root / "persist" / leaf, leaf)
    policy = _write_policy(tmp_path, btrfs_root)
    data = btrfs_root / "persist" / "web data"
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key").write_text("not yours\n")
    (data / "conf").symlink_to(outside)  # in the snapshot, conf/ leads out of it
    _take(policy)
    (data / "conf").unlink()
    (data / "conf").mkdir()
    (data / "conf" / "key").write_text("mine\n")
    versions = json.loads(snapsync("-p", str(policy), "versions", str(data / "conf" / "key"), "--json").stdout)["versions"]
    assert [v["snapshot"] for v in versions] == ["(live)"]  # the snapshot's conf is a symlink: no version there
