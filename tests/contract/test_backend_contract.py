"""The StorageBackend contract (snapsync/backends/base.py), checked against every backend."""

from __future__ import annotations

from datetime import UTC
from typing import TYPE_CHECKING

import pytest

from snapsync.errors import BackendError, DatasetMissing

if TYPE_CHECKING:
    from tests.contract.conftest import BackendEnv

NAME = "snapsync_2026-11-26T12:00:00Z"
LATER = "snapsync_2026-11-26T13:00:00Z"


def test_never_snapshotted_dataset_lists_nothing(env: BackendEnv) -> None:
    ds = env.new_dataset("fresh")
    assert env.backend.list_snapshots(ds) == []


def test_group_snapshot_captures_every_dataset_under_one_name(env: BackendEnv) -> None:
    a, b = env.new_dataset("a"), env.new_dataset("b")
    env.write(a, "f", "alpha")
    env.write(b, "f", "beta")
    taken = env.backend.snapshot_group([a, b], NAME)
    env.write(a, "f", "changed after the snapshot")
    assert [(s.dataset, s.name) for s in taken] == [(a, NAME), (b, NAME)]
    for ds, expected in ((a, "alpha"), (b, "beta")):
        (snap,) = env.backend.list_snapshots(ds)
        assert snap.name == NAME and snap.read_only and snap.kind == "snapshot"
        assert snap.created.tzinfo is not None and snap.created.utcoffset() == UTC.utcoffset(None)
        assert env.read(snap, "f") == expected
    guids = {s.guid for s in taken}
    assert len(guids) == 2 and all(guids)


def test_existing_name_is_refused_without_side_effects(env: BackendEnv) -> None:
    a, b = env.new_dataset("a"), env.new_dataset("b")
    env.backend.snapshot_group([b], NAME)
    with pytest.raises(BackendError, match="already exists"):
        env.backend.snapshot_group([a, b], NAME)
    assert env.backend.list_snapshots(a) == []
    assert [s.name for s in env.backend.list_snapshots(b)] == [NAME]


def test_group_snapshot_is_all_or_nothing(env: BackendEnv) -> None:
    a, b = env.new_dataset("a"), env.new_dataset("b")
    with pytest.raises(BackendError):
        env.backend.snapshot_group([a, b, env.missing_dataset], NAME)
    assert env.backend.list_snapshots(a) == []
    assert env.backend.list_snapshots(b) == []


def test_missing_dataset_is_reported(env: BackendEnv) -> None:
    with pytest.raises(DatasetMissing, match="does not exist"):
        env.backend.check_dataset(env.missing_dataset)


def test_listing_is_sorted_and_includes_foreign_snapshots(env: BackendEnv) -> None:
    ds = env.new_dataset("d")
    env.backend.snapshot_group([ds], LATER)
    env.backend.snapshot_group([ds], "manual-before-upgrade")
    env.backend.snapshot_group([ds], NAME)
    snaps = env.backend.list_snapshots(ds)
    assert {s.name for s in snaps} == {NAME, LATER, "manual-before-upgrade"}
    keys = [(s.created, s.name) for s in snaps]
    assert keys == sorted(keys)


def test_destroy_removes_only_the_named_and_is_idempotent(env: BackendEnv) -> None:
    ds = env.new_dataset("d")
    for name in (NAME, LATER, "keep-me"):
        env.backend.snapshot_group([ds], name)
    env.backend.destroy(ds, [NAME])
    env.backend.destroy(ds, [NAME, "never-existed"])
    assert sorted(s.name for s in env.backend.list_snapshots(ds)) == sorted([LATER, "keep-me"])


def test_destroy_refuses_what_is_not_a_read_only_snapshot(env: BackendEnv) -> None:
    if env.plant_intruder is None:
        pytest.skip("this filesystem cannot hold a writable object in its snapshot namespace")
    ds = env.new_dataset("d")
    env.plant_intruder(ds, NAME)
    with pytest.raises(BackendError, match="refusing"):
        env.backend.destroy(ds, [NAME])
    assert NAME in {s.name for s in env.backend.list_snapshots(ds)}


def test_each_dataset_has_its_own_snapshot_home(env: BackendEnv) -> None:
    a, b = env.new_dataset("same"), env.new_dataset("other")
    assert env.backend.snapshot_home(a) != env.backend.snapshot_home(b)


@pytest.mark.parametrize("leaf", ["with space", "nön-ascii ünïcödé", "dash-.dot"])
def test_awkward_dataset_names(env: BackendEnv, leaf: str) -> None:
    if not env.name_ok(leaf):
        pytest.skip(f"{leaf!r} is not a valid dataset name on this filesystem")
    ds = env.new_dataset(leaf)
    env.write(ds, "f", leaf)
    env.backend.snapshot_group([ds], NAME)
    (snap,) = env.backend.list_snapshots(ds)
    assert env.read(snap, "f") == leaf
    env.backend.destroy(ds, [NAME])
    assert env.backend.list_snapshots(ds) == []


def test_held_snapshot_is_refused_until_the_hold_moves(env: BackendEnv) -> None:
    ds = env.new_dataset("d")
    env.backend.snapshot_group([ds], NAME)
    env.backend.snapshot_group([ds], LATER)
    env.backend.set_holds(ds, "target:nas", [NAME])
    held = {s.name: s.holds for s in env.backend.list_snapshots(ds) if s.kind == "snapshot"}
    assert held == {NAME: ("target:nas",), LATER: ()}
    with pytest.raises(BackendError, match="held") as refused:
        env.backend.destroy(ds, [NAME])
    assert NAME in str(refused.value) and "\n" not in str(refused.value)
    assert {s.name for s in env.backend.list_snapshots(ds) if s.kind == "snapshot"} == {NAME, LATER}
    env.backend.set_holds(ds, "target:nas", [LATER])
    env.backend.destroy(ds, [NAME])
    (left,) = [s for s in env.backend.list_snapshots(ds) if s.kind == "snapshot"]
    assert (left.name, left.holds) == (LATER, ("target:nas",))
    env.backend.set_holds(ds, "target:nas", [])
    assert all(not s.holds for s in env.backend.list_snapshots(ds))


def test_one_held_snapshot_does_not_keep_the_others(env: BackendEnv) -> None:
    """The held one stays and is named; every other one named goes (a prune must get past a hold)."""
    ds = env.new_dataset("d")
    names = [NAME, LATER, "snapsync_2026-11-26T14:00:00Z", "snapsync_2026-11-26T15:00:00Z"]
    for name in names:
        env.backend.snapshot_group([ds], name)
    env.backend.set_holds(ds, "target:nas", [LATER])
    with pytest.raises(BackendError, match="held by target:nas") as refused:
        env.backend.destroy(ds, names[:3])
    assert LATER in str(refused.value) and NAME not in str(refused.value)
    assert [s.name for s in env.backend.list_snapshots(ds) if s.kind == "snapshot"] == [LATER, names[3]]


def test_one_refused_snapshot_does_not_keep_the_others(env: BackendEnv) -> None:
    if env.plant_intruder is None:
        pytest.skip("this filesystem cannot hold a writable object in its snapshot namespace")
    ds = env.new_dataset("d")
    env.plant_intruder(ds, NAME)
    env.backend.snapshot_group([ds], LATER)
    with pytest.raises(BackendError, match="refusing") as refused:
        env.backend.destroy(ds, [NAME, LATER])
    assert NAME in str(refused.value) and LATER not in str(refused.value)
    assert [s.name for s in env.backend.list_snapshots(ds)] == [NAME]


def test_nested_datasets_are_named_and_left_out_of_snapshots(env: BackendEnv) -> None:
    """Only the outermost nested ones: each carries what is nested in it. Snapshots are not nested data."""
    outer = env.new_dataset("outer")
    inner = env.new_dataset("outer/inner")
    deep = env.new_dataset("outer/inner/deep")
    env.write(inner, "f", "the inner dataset's data")
    assert env.backend.nested(outer) == [inner]
    assert env.backend.nested(inner) == [deep]
    assert env.backend.nested(deep) == []
    (snap,) = env.backend.snapshot_group([outer], NAME)
    with pytest.raises(OSError):
        env.read(snap, "inner/f")  # why the policy must list or exclude it: no snapshot of outer has it
    env.backend.snapshot_group([inner], NAME)
    assert env.backend.nested(outer) == [inner]


def test_nested_of_a_missing_dataset_is_reported(env: BackendEnv) -> None:
    with pytest.raises(DatasetMissing, match="does not exist"):
        env.backend.nested(env.missing_dataset)


def test_a_dataset_is_adopted_already_and_a_directory_in_it_is_adopted_or_refused_with_how(env: BackendEnv) -> None:
    from pathlib import Path

    from snapsync.errors import UsageError

    ds = env.new_dataset("d")
    root = env.backend.files_root(ds)
    assert root is not None
    found = env.backend.adoption(root)
    assert found is not None and found.state == "adopted"
    service = Path(root) / "service"
    (service / "sub").mkdir(parents=True)
    (service / "sub" / "f").write_text("state")
    try:
        planned = env.backend.adoption(str(service))
    except UsageError as e:  # a filesystem without an in-place conversion: how to do it by hand, one line
        assert "\n" not in str(e) and str(service) in str(e)
        assert (service / "sub" / "f").read_text() == "state"
        return
    assert planned is not None and planned.state == "directory" and planned.steps
    done = env.backend.adopt(str(service))
    assert done.kept is not None and (Path(done.kept) / "sub" / "f").read_text() == "state"
    assert (service / "sub" / "f").read_text() == "state"
    assert env.backend.nested(ds) == [str(service)]
    again = env.backend.adoption(str(service))
    assert again is not None and again.state == "adopted"
