"""Command construction of the ZFS backend and store, against a fake ``zfs`` on PATH.

This proves only which commands snapsync runs and how it reads their output; that ZFS behaves as
assumed is proven in the guest (vm-tests/), never here.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapsync.backends.zfs import ZfsBackend, check_snapshot_name, parse_listing
from snapsync.errors import BackendError, DatasetMissing
from snapsync.protocol import dataset_key
from snapsync.backends.zfs_receiver import StoreRefused, ZfsReceiver, zfs_component

FAKE = r'''#!PYTHON
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ZFS_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
snaps = json.loads(os.environ.get("FAKE_ZFS_SNAPS", "[]"))
if args[0] == "list" and "name,type" in args:
    missing = [a for a in args[4:] if "missing" in a]
    for a in args[4:]:
        if a not in missing:
            print(f"{a}\tfilesystem")
    if missing:
        sys.exit(f"cannot open '{missing[0]}': dataset does not exist")
elif args[0] == "list" and "-d" in args:
    for row in snaps:
        print("\t".join(row))
elif args[0] == "list" and args[1:5] == ["-H", "-o", "name", "-t"]:
    sys.exit("cannot open: dataset does not exist")
elif args[0] == "list":
    for i, full in enumerate(a for a in args if "@" in a):
        print(f"{full}\t{1000 + i}\t77\t1790000000\t0")
elif args[0] == "snapshot" and any("fail" in a for a in args):
    sys.exit("cannot create snapshot: out of space")
elif args[0] == "get" and "encryption" in args:
    print("aes-256-gcm" if "secret" in args[-1] else "off")
'''


@pytest.fixture
def fake_zfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "zfs"
    script.write_text(FAKE.replace("PYTHON", sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "zfs.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ZFS_LOG", str(log))
    return log


def calls(log: Path, sub: str | None = None) -> list[list[str]]:
    out = [json.loads(line) for line in log.read_text().splitlines()]
    return [c for c in out if sub is None or c[0] == sub]


def cli() -> ZfsBackend:
    return ZfsBackend(use_lzc=False)


def test_a_group_in_one_pool_is_one_snapshot_command(fake_zfs: Path) -> None:
    taken = cli().snapshot_group(["tank/a", "tank/b c"], "snap_1")
    assert calls(fake_zfs, "snapshot") == [["snapshot", "tank/a@snap_1", "tank/b c@snap_1"]]
    assert [(s.dataset, s.name, s.txg) for s in taken] == [("tank/a", "snap_1", 77), ("tank/b c", "snap_1", 77)]


def test_a_group_across_pools_is_one_command_per_pool_and_undone_on_failure(fake_zfs: Path) -> None:
    with pytest.raises(BackendError):
        cli().snapshot_group(["tank/a", "fail/b"], "snap_1")
    assert calls(fake_zfs, "snapshot") == [["snapshot", "tank/a@snap_1"], ["snapshot", "fail/b@snap_1"]]
    assert calls(fake_zfs, "destroy") == [["destroy", "tank/a@snap_1"]]


def test_a_missing_dataset_is_reported_before_any_snapshot(fake_zfs: Path) -> None:
    with pytest.raises(DatasetMissing, match="tank/missing: does not exist"):
        cli().snapshot_group(["tank/a", "tank/missing"], "snap_1")
    assert calls(fake_zfs, "snapshot") == []


def _rows(*names: str, held: str = "") -> str:
    return json.dumps([[f"tank/a@{n}", "1", "1", "1790000000", "1" if n == held else "0"] for n in names])


def test_destroy_is_one_batched_command_for_the_snapshots_that_exist(fake_zfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_ZFS_SNAPS", _rows("s1", "s2", "s3"))
    cli().destroy("tank/a", ["s1", "gone", "s3"])
    assert calls(fake_zfs, "destroy") == [["destroy", "tank/a@s1,s3"]]


def test_destroy_leaves_a_held_snapshot_and_destroys_the_others(fake_zfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_ZFS_SNAPS", _rows("s1", "s2", "s3", held="s2"))
    fake_holds = fake_zfs.parent / "bin" / "zfs"
    fake_holds.write_text(fake_holds.read_text() + 'if args[0] == "holds":\n    print("tank/a@s2\\tsnapsync:target:nas\\tThu Nov 26 2026")\n')
    with pytest.raises(BackendError, match="refusing to destroy tank/a@s2: held by target:nas") as refused:
        cli().destroy("tank/a", ["s1", "s2", "s3"])
    assert "s1" not in str(refused.value) and "s3" not in str(refused.value)
    assert calls(fake_zfs, "destroy") == [["destroy", "tank/a@s1,s3"]]


def test_a_batch_that_fails_whole_is_destroyed_one_by_one(fake_zfs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hold or clone that appears after the listing fails the batch; the others still go."""
    monkeypatch.setenv("FAKE_ZFS_SNAPS", _rows("s1", "s2", "s3"))
    fake = fake_zfs.parent / "bin" / "zfs"
    fake.write_text(fake.read_text() + 'if args[0] == "destroy" and "s2" in args[1]:\n    sys.exit("cannot destroy snapshot tank/a@s2: dataset is busy")\n')
    with pytest.raises(BackendError, match="tank/a@s2: dataset is busy") as refused:
        cli().destroy("tank/a", ["s1", "s2", "s3"])
    assert "s1" not in str(refused.value) and "s3" not in str(refused.value)
    assert calls(fake_zfs, "destroy") == [
        ["destroy", "tank/a@s1,s2,s3"], ["destroy", "tank/a@s1"], ["destroy", "tank/a@s2"], ["destroy", "tank/a@s3"],
    ]


@pytest.mark.parametrize(
    ("dataset", "raw", "compressed", "base", "argv"),
    [
        ("tank/a", False, True, None, ["zfs", "send", "-c", "tank/a@s2"]),
        ("tank/a", False, False, "s1", ["zfs", "send", "-i", "tank/a@s1", "tank/a@s2"]),
        ("tank/a", True, True, "#s1", ["zfs", "send", "-w", "-i", "tank/a#s1", "tank/a@s2"]),
        ("tank/secret", False, True, "s1", ["zfs", "send", "-w", "-i", "tank/secret@s1", "tank/secret@s2"]),
    ],
    ids=["compressed-full", "plain-incremental", "raw-from-bookmark", "encrypted-is-always-raw"],
)
def test_send_argv(fake_zfs: Path, dataset: str, raw: bool, compressed: bool, base: str | None, argv: list[str]) -> None:
    assert ZfsBackend(raw=raw, compressed=compressed, use_lzc=False).send_argv(dataset, "s2", base) == argv


@pytest.mark.parametrize("name", ["", "a,b", "a@b", "a#b", "a/b", "a%b", "x" * 201])
def test_names_that_would_change_a_zfs_command_are_refused(name: str) -> None:
    with pytest.raises(BackendError, match="refusing snapshot name"):
        check_snapshot_name(name)


def test_parse_listing_reads_snapshots_and_bookmarks() -> None:
    rows = "tank/a b@s1\t11\t5\t1790000000\t2\ntank/a b#s1\t11\t5\t1790000000\t-\n"
    snap, mark = parse_listing(rows)
    assert (snap.dataset, snap.name, snap.kind, snap.guid, snap.txg) == ("tank/a b", "s1", "snapshot", "11", 5)
    assert (mark.name, mark.kind, mark.guid, mark.location) == ("s1", "bookmark", "11", "tank/a b#s1")


ZFS_COMPONENT = re.compile(r"[A-Za-z0-9_.: -]+")


@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=4))
def test_store_names_are_valid_zfs_components_and_distinct(parts: list[str]) -> None:
    dataset = "/" + "/".join(parts)
    components = [zfs_component(p) for p in dataset_key(dataset).split("/")]
    assert all(ZFS_COMPONENT.fullmatch(c) for c in components), components


@given(st.text(min_size=1, max_size=12), st.text(min_size=1, max_size=12))
def test_distinct_datasets_get_distinct_zfs_copies(a: str, b: str) -> None:
    if dataset_key("/" + a) != dataset_key("/" + b):
        assert zfs_component(dataset_key("/" + a)) != zfs_component(dataset_key("/" + b))


def test_store_receive_argv_names_the_snapshot_and_excludes_what_acts_on_the_host() -> None:
    argv = ZfsReceiver("tank/backup")._receive_argv("tank/backup/app/a", False, None, "s2")
    assert argv[:7] == ["zfs", "receive", "-s", "-u", "-h", "-o", "canmount=noauto"]
    assert argv[-1] == "tank/backup/app/a@s2"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-x"][:3] == ["mountpoint", "sharenfs", "sharesmb"]
    assert ZfsReceiver("tank/backup")._receive_argv("tank/backup/app/a", True)[5] == "-F"
    with pytest.raises(StoreRefused, match="append-only"):
        ZfsReceiver("tank/backup", append_only=True)._receive_argv("tank/backup/app/a", True)
