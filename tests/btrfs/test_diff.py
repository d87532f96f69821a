"""`snapsync diff`: what changed between two snapshots, or since one, on real btrfs; the pure comparison."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from snapsync.ops.diff import Entry, compare
from tests.btrfs.test_cli import snapsync
from tests.btrfs.test_versions import _take, three_datasets

F, D = stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755


def e(ino: int, mode: int = F, size: int = 1, mtime: int = 1, uid: int = 0) -> Entry:
    return Entry(ino, mode, uid, 0, size, mtime)


def test_compare_tells_renames_from_removals_and_directory_times_from_changes() -> None:
    old = {"a": e(1), "b": e(2), "d": e(3, D, 10, 5), "d/x": e(4), "gone": e(5), "moved": e(6), "dir": e(7, D), "dir/in": e(8)}
    new = {"a": e(1, size=2), "b": e(2), "d": e(3, D, 99, 9), "d/x": e(4, uid=7), "added": e(9), "elsewhere": e(6),
           "renamed-dir": e(7, D), "renamed-dir/in": e(8, mtime=3)}
    c = compare(old, new)
    assert c.added == ["added"] and c.removed == ["gone"]
    assert c.modified == ["a", "d/x", "renamed-dir/in"]  # d's size and time follow its entries: not itself a change
    assert c.renamed == [("dir", "renamed-dir"), ("moved", "elsewhere")]  # dir/in went with its directory
    assert not compare(old, old)
    replaced = compare({"f": e(1)}, {"f": e(2)})  # the same name, another file
    assert replaced.modified == ["f"] and not replaced.added and not replaced.removed


def test_diff_between_snapshots_and_since_one(tmp_path: Path, btrfs_root: Path) -> None:
    policy, data = three_datasets(tmp_path, btrfs_root)
    (data / "keep.txt").write_text("same\n")
    (data / "edit.txt").write_text("v1\n")
    (data / "old-name.txt").write_text("moves\n")
    (data / "drop.txt").write_text("goes\n")
    (data / "mode.sh").write_text("#!/bin/sh\n")
    first = _take(policy)
    (data / "edit.txt").write_text("v2, longer\n")
    os.rename(data / "old-name.txt", data / "new-name.txt")
    (data / "drop.txt").unlink()
    (data / "new.txt").write_text("new\n")
    os.chmod(data / "mode.sh", 0o755)
    second = _take(policy)
    (data / "later.txt").write_text("after the second\n")

    done = snapsync("-p", str(policy), "diff", "web", first, second, "--json")
    assert done.returncode == 0, done.stderr
    (ds,) = json.loads(done.stdout)["datasets"]
    assert ds["added"] == ["new.txt"] and ds["removed"] == ["drop.txt"]
    assert ds["modified"] == ["edit.txt", "mode.sh"] and ds["renamed"] == [{"from": "old-name.txt", "to": "new-name.txt"}]

    since = json.loads(snapsync("-p", str(policy), "diff", "web", second, "--json").stdout)["datasets"][0]
    assert since["added"] == ["later.txt"] and not since["removed"] and not since["modified"] and not since["renamed"]

    text = snapsync("-p", str(policy), "diff", "web", first, second)
    assert text.returncode == 0 and "R old-name.txt -> new-name.txt" in text.stdout and "+ new.txt" in text.stdout
    missing = snapsync("-p", str(policy), "diff", "web", "snapsync_2000-01-01T00:00:00Z")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
