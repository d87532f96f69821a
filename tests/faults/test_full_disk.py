"""A full source filesystem (a real loop btrfs filled until ENOSPC): replication with nothing to send
succeeds, a hold that cannot move is one line in each target's report (never an internal error, never
the end of the other targets), no temporary file is left, and once there is room the next ordinary
run converges."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapsync.backends.btrfs import HOLDS_FILE, BtrfsBackend
from snapsync.host.safefs import private_dir, write_atomic
from tests.conftest import _require_btrfs, make_subvolume
from tests.replication.helpers import (
    copies,
    copies_dir,
    run_json,
    snapsync,
    tree_digest,
    write_policy,
)

pytestmark = pytest.mark.btrfs


@pytest.fixture
def small_btrfs(tmp_path: Path) -> Iterator[Path]:
    """A 128 MiB btrfs in mixed mode: data and metadata share the space, so one big file fills both."""
    _require_btrfs()
    image, mnt = tmp_path / "small.img", tmp_path / "small"
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    subprocess.run(["mkfs.btrfs", "-q", "-f", "-M", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)


def fill(mnt: Path) -> Path:
    """Write until the filesystem says ENOSPC, and prove that not even an empty file fits any more."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 20, 4096):
            with pytest.raises(OSError) as full:
                while True:
                    os.write(fd, b"\xa5" * chunk)
            assert full.value.errno == errno.ENOSPC
        os.fsync(fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        (mnt / "probe").touch()
    assert full.value.errno == errno.ENOSPC
    return filler


def make_room(filler: Path) -> None:
    filler.unlink()
    os.sync()


def holds(home: Path) -> dict[str, list[str]]:
    data: dict[str, list[str]] = json.loads((home / HOLDS_FILE).read_text())
    return data


def leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in home.iterdir() if p.name.endswith(".tmp"))


def test_a_full_source_fails_only_the_hold_and_converges(small_btrfs: Path, target_root: Path, tmp_path: Path) -> None:
    app = make_subvolume(small_btrfs / "persist" / "app", "v1\n")
    home = Path(BtrfsBackend().snapshot_home(str(app)))
    roots = {name: target_root / name for name in ("one", "two")}
    for root in roots.values():
        root.mkdir()
    policy = write_policy(
        tmp_path / "p.toml", [app], {name: f'type = "local"\npath = "{root}"' for name, root in roots.items()}, interval="1s"
    )
    first = run_json("-p", str(policy), "run")
    s1 = first["groups"][0]["snapshot"]
    assert holds(home) == {"target:one": [s1], "target:two": [s1]}

    # Full, with nothing to send: the holds do not change, so nothing is written and all is well.
    filler = fill(small_btrfs)
    written = (home / HOLDS_FILE).stat().st_mtime_ns
    idle = run_json("-p", str(policy), "replicate")
    assert [(t["target"], t["ok"], t["sent"]) for t in idle["groups"][0]["targets"]] == [("one", True, []), ("two", True, [])]
    assert (home / HOLDS_FILE).stat().st_mtime_ns == written

    # A new snapshot, then full again: both targets get their copy; the hold cannot move on either,
    # and each says so in one line of its own report.
    make_room(filler)
    (app / "data.txt").write_text("v2\n")
    time.sleep(1.1)
    s2 = run_json("-p", str(policy), "snapshot")["groups"][0]["snapshot"]
    filler = fill(small_btrfs)
    proc = snapsync("-p", str(policy), "replicate", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "internal error" not in proc.stderr
    targets = json.loads(proc.stdout)["groups"][0]["targets"]
    assert [t["target"] for t in targets] == ["one", "two"]
    for t in targets:
        assert [s["name"] for s in t["sent"]] == [s2]
        (error,) = t["errors"]
        assert str(home / HOLDS_FILE) in error and "No space left on device" in error and "\n" not in error
    for root in roots.values():
        assert copies(root, "app", app) == [s1, s2]
    assert holds(home) == {"target:one": [s1], "target:two": [s1]}  # still the base both really share
    assert leftovers(home) == []

    # Room again: the next ordinary run moves the holds, sends nothing, and every copy is the source's.
    make_room(filler)
    done = run_json("-p", str(policy), "replicate")
    assert [(t["ok"], t["sent"]) for t in done["groups"][0]["targets"]] == [(True, []), (True, [])]
    assert holds(home) == {"target:one": [s2], "target:two": [s2]}
    for root in roots.values():
        for name in (s1, s2):
            assert tree_digest(copies_dir(root, "app", app) / name) == tree_digest(home / name)
    assert leftovers(home) == []


def test_a_write_that_runs_out_of_room_leaves_no_temporary_file(small_btrfs: Path) -> None:
    """The temporary file was created, its data did not fit: it goes, and the old file stays."""
    directory = small_btrfs / "state"
    with private_dir(directory, create=True) as fd:
        write_atomic(fd, "file.json", b"old")
        filler = fill(small_btrfs)
        filler.unlink()
        os.sync()
        with pytest.raises(OSError) as full:
            write_atomic(fd, "file.json", b"\x5a" * (160 << 20))
    assert full.value.errno == errno.ENOSPC
    assert sorted(p.name for p in directory.iterdir()) == ["file.json"]
    assert (directory / "file.json").read_bytes() == b"old"


def test_a_restore_onto_a_disk_that_fills_up_is_one_line_and_leaves_nothing(small_btrfs: Path, btrfs_root: Path, tmp_path: Path) -> None:
    """The place being restored into fills up mid-stream: the receive's own "No space left" is the error
    (exit 1, one line, no traceback: the cleanup after it needs no room, not even for a lock's pid),
    nothing half-received stays, and with room again the same command restores it."""
    app = make_subvolume(btrfs_root / "app")
    (app / "big.bin").write_bytes(os.urandom(160 << 20))  # more than the small disk holds
    key = tmp_path / "k"
    snapsync("keygen", str(key), check=True)
    store = tmp_path / "store"
    store.mkdir()
    policy = write_policy(tmp_path / "p.toml", [app], {"nas": f'type = "dir"\npath = "{store}"\nkey_file = "{key}"'})
    assert run_json("--policy", str(policy), "run")["groups"][0]["targets"][0]["ok"]
    to = small_btrfs / "restore"
    to.mkdir()
    proc = snapsync("--policy", str(policy), "restore", "app", "--from", "nas", "--to", str(to))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "No space left on device" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not [p for p in to.rglob("*") if p.is_dir() and (p / "big.bin").exists()]  # no half copy under any name


def test_a_lock_is_taken_on_a_full_disk(small_btrfs: Path) -> None:
    """The flock is the lock; the pid written into the file only names the holder. On a disk with no
    room left that write fails, and the lock (a cleanup after a failed receive takes one) still holds."""
    from snapsync.host.lock import file_lock

    lock = small_btrfs / "locks" / "receiving"
    with file_lock(lock, 1, "a test"):
        pass
    os.truncate(lock, 0)
    fill(small_btrfs)
    fd = os.open(lock, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as full:
            os.pwrite(fd, b"123\n", 0)
    finally:
        os.close(fd)
    assert full.value.errno == errno.ENOSPC
    with file_lock(lock, 1, "a test") as held:
        assert held == lock
