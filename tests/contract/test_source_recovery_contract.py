"""The recovery half of the StorageBackend contract (snapsync/backends/base.py): what rollback,
restore in place and drills ask of a backend, checked against every backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from snapsync.backends import receiver_for
from snapsync.errors import BackendError
from snapsync.plan.holds import safety_tag
from snapsync.recovery.rollback import aside_name, release

if TYPE_CHECKING:
    from snapsync.backends.receiver import Receiver
    from tests.contract.conftest import BackendEnv

NAME = "snapsync_2026-11-26T12:00:00Z"
SAFETY = "snapsync_2026-11-26T13:00:00Z"


def _root(env: BackendEnv, dataset: str) -> Path:
    root = env.backend.files_root(dataset)
    assert root is not None, f"{dataset}: no directory with its files"
    return Path(root)


def _send(env: BackendEnv, dataset: str, name: str, receiver: Receiver, rel: str) -> None:
    """A full send of ``dataset@name`` into ``receiver`` at ``rel``, as a restore does it."""
    (snap,) = [s for s in env.backend.list_snapshots(dataset) if s.name == name]
    proc = subprocess.Popen(env.backend.send_argv(dataset, name, None), stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        receiver.receive(rel, name, snap.guid, proc.stdout.fileno())
    finally:
        proc.stdout.close()
        proc.wait()
    assert proc.returncode == 0


def test_exists_tells_an_occupied_place_from_an_empty_one(env: BackendEnv) -> None:
    ds = env.new_dataset("d")
    assert env.backend.exists(ds)
    assert not env.backend.exists(env.missing_dataset)


def test_files_root_is_where_the_live_files_are(env: BackendEnv) -> None:
    ds = env.new_dataset("d")
    env.write(ds, "f", "live")
    assert (_root(env, ds) / "f").read_text() == "live"


@pytest.mark.parametrize("how", ["cwd", "open file"])
def test_in_use_names_a_process_using_the_dataset(env: BackendEnv, how: str) -> None:
    ds = env.new_dataset("d")
    env.write(ds, "f", "data")
    assert env.backend.in_use([ds]) == []
    root = _root(env, ds)
    code = "import sys, time; f = open(sys.argv[1]); print('ready', flush=True); time.sleep(600)"
    argv = [sys.executable, "-c", code, str(root / "f")]
    proc = subprocess.Popen(argv, cwd=root if how == "cwd" else "/", stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        found = [h for h in env.backend.in_use([ds]) if h.pid == proc.pid]
        assert found and found[0].kind == "process", env.backend.in_use([ds])
        assert found[0].describe().startswith(f"pid {proc.pid} (")
    finally:
        proc.kill()
        proc.wait()
    assert not [h for h in env.backend.in_use([ds]) if h.pid == proc.pid]


def test_snapshot_files_reads_a_file_as_the_snapshot_has_it(env: BackendEnv) -> None:
    ds = env.new_dataset("d")
    env.write(ds, "f", "before")
    env.backend.snapshot_group([ds], NAME)
    env.write(ds, "f", "after")
    files = env.backend.snapshot_files(ds, NAME)
    assert files is not None and (files / "f").read_text() == "before"
    assert env.backend.snapshot_files(ds, "never-taken") is None


def test_snapshot_sizes_count_every_snapshot_or_say_why_not(env: BackendEnv) -> None:
    ds = env.new_dataset("d")
    env.write(ds, "f", "x" * 100_000)
    env.backend.snapshot_group([ds], NAME)
    sizes = env.backend.snapshot_sizes(ds)
    if sizes.note is None or sizes.sizes:  # counted (ZFS; btrfs with quotas on)
        assert set(sizes.sizes) == {NAME}
        assert all(isinstance(v, int) and v >= 0 for v in sizes.sizes[NAME].values()) and "referenced" in sizes.sizes[NAME]
    else:  # not counted (btrfs without quotas): the note says how to have them
        assert "enable" in sizes.note
    assert env.backend.snapshot_sizes(env.missing_dataset).sizes == {}


def test_scratch_gives_a_writable_copy_without_setuid_or_devices_and_leaves_nothing(env: BackendEnv, tmp_path: Path) -> None:
    ds = env.new_dataset("d")
    env.write(ds, "f", "restored")
    env.backend.snapshot_group([ds], NAME)
    rel = "group/d"
    parent = tmp_path / "scratch"
    parent.mkdir()
    with env.backend.scratch("snapsync-contract", [ds], str(parent)) as scratch:
        place = scratch.place
        _send(env, ds, NAME, receiver_for(place), rel)
        copy = scratch.writable(rel, NAME)
        assert (copy / "f").read_text() == "restored"
        (copy / "f").write_text("changed in the copy")
        flags = os.statvfs(copy).f_flag
        assert flags & os.ST_NOSUID and flags & os.ST_NODEV
        (scratch.directory / "server.log").write_text("a check's own file")
        assert env.backend.exists(place) and scratch.directory.is_dir()
    assert not copy.exists() and not scratch.directory.exists()
    assert not env.backend.exists(place)
    assert not list(parent.iterdir())
    files = env.backend.snapshot_files(ds, NAME)
    assert files is not None and (files / "f").read_text() == "restored"


def test_restore_in_place_receives_a_snapshot_and_makes_the_dataset_live(env: BackendEnv) -> None:
    source = env.new_dataset("d")
    env.write(source, "f", "from the backup")
    env.backend.snapshot_group([source], NAME)
    place = env.missing_dataset
    assert not env.backend.restored_in_place(place, NAME)
    receiver, rel = env.backend.restore_receiver(place, create=True)
    _send(env, source, NAME, receiver, rel)
    env.backend.finish_in_place(place, NAME)
    assert env.backend.exists(place)
    assert (_root(env, place) / "f").read_text() == "from the backup"
    env.write(place, "f", "writable again")
    assert NAME in {s.name for s in env.backend.list_snapshots(place)}
    assert env.backend.restored_in_place(place, NAME)
    other = env.new_dataset("other")
    assert not env.backend.restored_in_place(other, NAME)


def test_release_removes_the_safety_hold_wherever_the_rollback_left_it(env: BackendEnv) -> None:
    ds = env.new_dataset("d")
    env.write(ds, "f", "old")
    env.backend.snapshot_group([ds], NAME)
    env.write(ds, "f", "new")
    env.backend.snapshot_group([ds], SAFETY)
    tag = safety_tag(SAFETY)
    env.backend.set_holds(ds, tag, [SAFETY])
    aside = aside_name(ds, SAFETY)
    env.backend.rollback(ds, NAME, aside)
    assert (_root(env, ds) / "f").read_text() == "old"
    keeper = aside if env.backend.capabilities.rollback_sets_newer_aside else ds
    (safety,) = [s for s in env.backend.list_snapshots(keeper) if s.name == SAFETY and s.kind == "snapshot"]  # ZFS also bookmarks it
    assert tag in safety.holds
    with pytest.raises(BackendError, match="held by"):
        env.backend.destroy(keeper, [SAFETY])

    release(env.backend, [ds], SAFETY)
    for place in (ds, aside):
        assert not [s for s in env.backend.list_snapshots(place) if tag in s.holds]
    env.backend.destroy(keeper, [SAFETY])
    assert SAFETY not in {s.name for s in env.backend.list_snapshots(keeper) if s.kind == "snapshot"}


def test_check_rollback_refuses_what_rollback_would_and_changes_nothing(env: BackendEnv) -> None:
    """A group is checked whole before its first dataset is touched: the check must see every refusal."""
    ds = env.new_dataset("d")
    env.write(ds, "f", "old")
    env.backend.snapshot_group([ds], NAME)
    aside = aside_name(ds, SAFETY)
    env.backend.check_rollback(ds, NAME, aside)
    with pytest.raises(BackendError, match="no snapshot"):
        env.backend.check_rollback(ds, "snapsync_2020-01-01T00:00:00Z", aside)
    inner = env.new_dataset("d/inner")
    with pytest.raises(BackendError) as refused:
        env.backend.check_rollback(ds, NAME, aside)
    assert inner in str(refused.value) or "inner" in str(refused.value)
    with pytest.raises(BackendError):
        env.backend.rollback(ds, NAME, aside)
    assert env.backend.exists(ds) and not env.backend.exists(aside)
    assert (_root(env, ds) / "f").read_text() == "old"


def test_delete_aside_deletes_only_a_rollbacks_aside(env: BackendEnv) -> None:
    ds = env.new_dataset("d")
    other = env.new_dataset("d.pre-rollbackish")
    env.write(ds, "f", "old")
    env.backend.snapshot_group([ds], NAME)
    env.write(ds, "f", "new")
    aside = aside_name(ds, SAFETY)
    for wrong in (other, env.new_dataset("e")):
        with pytest.raises(BackendError, match="not a state a rollback"):
            env.backend.delete_aside(ds, wrong)
        assert env.backend.exists(wrong)
    env.backend.rollback(ds, NAME, aside)
    env.backend.delete_aside(ds, aside)
    assert not env.backend.exists(aside)
    assert (_root(env, ds) / "f").read_text() == "old"
    assert NAME in {s.name for s in env.backend.list_snapshots(ds)}


def test_a_bind_mount_of_a_dataset_follows_every_rollback(env: BackendEnv, tmp_path: Path) -> None:
    """Impermanence's bind mounts, on either filesystem: re-pointed with the swap, and again with the next."""
    from datetime import UTC, datetime

    from snapsync.policy.loader import load_policy
    from snapsync.recovery.rollback import rollback

    ds = env.new_dataset("svc")
    root = _root(env, ds)
    (root / "data").mkdir()
    (root / "data" / "f").write_text("old")
    env.backend.snapshot_group([ds], NAME)
    (root / "data" / "f").write_text("new")
    point = tmp_path / "var-lib-svc"
    point.mkdir()
    subprocess.run(["mount", "--bind", str(root / "data"), str(point)], check=True)
    policy = tmp_path / "p.toml"
    policy.write_text(f'version = 1\nhost = "src"\n[groups.g]\nbackend = "{env.backend.kind}"\ndatasets = ["{ds}"]\n')

    def shows_live() -> bool:
        live = _root(env, ds) / "data"
        return (live.stat().st_dev, live.stat().st_ino) == (point.stat().st_dev, point.stat().st_ino)

    safeties: list[str] = []
    try:
        group = load_policy(str(policy)).groups["g"]
        report = rollback(group, env.backend, NAME, datetime(2026, 11, 26, 13, tzinfo=UTC))
        safeties.append(report.safety)
        assert (point / "f").read_text() == "old" and report.rebound and shows_live()
        (point / "f").write_text("after")
        assert (_root(env, ds) / "data" / "f").read_text() == "after"  # the live dataset took the write, no aside
        env.backend.snapshot_group([ds], "snapsync_2026-11-26T15:00:00Z")
        (point / "f").write_text("newer")
        again = rollback(group, env.backend, "snapsync_2026-11-26T15:00:00Z", datetime(2026, 11, 26, 16, tzinfo=UTC))
        safeties.append(again.safety)
        assert (point / "f").read_text() == "after" and again.rebound and shows_live()
    finally:
        for safety in safeties:  # held snapshots would outlive the test's datasets
            release(env.backend, [ds], safety)
        while any(line.split()[4] == str(point) for line in Path("/proc/self/mountinfo").read_text().splitlines()):
            subprocess.run(["umount", "--lazy", str(point)], check=True)
