"""Rollback on real OpenZFS: clone + promote + renames, nothing destroyed, the target's history handled; a
rollback or its ``--abort`` killed at any step converges by running either again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from snapsync.backends.zfs import ZfsBackend
from snapsync.errors import UsageError
from snapsync.recovery.pending import unfinished
from snapsync.recovery.rollback import rollback

from test_zfs import POOL, Site, digest, fill, prop, space, zfs  # noqa: F401  (space: the fixture)

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


# --- Interrupted rollbacks: a real SIGKILL at every step, then finished or aborted -------------------
#
# The command runs in a forked child (``cli.app.main``, the real command's code in a real process that
# the test-only SNAPSYNC_TEST_KILL_AT hook SIGKILLs at the step): a fresh Python costs seconds under
# emulation. The generic two-dataset interplay is enumerated on btrfs (tests/faults); here every step of
# the ZFS backend's own rollback and undo, on a dataset with a local mountpoint.

STEPS = [
    "journal written", "safety snapshot taken", "safety held app", "safety verified",
    "clone made app", "promoted app", "unmounted app", "moved aside app", "renamed in app", "rolled back app",
]
"""Every step of a ZFS rollback of one dataset, in order (checked against a real run)."""
UNDO_SWAPPED = ["abort started", "rolled-back state moved away app", "put back app", "promoted back app", "undone app"]
"""Every step of ``--abort`` after the clone was swapped in and mounted."""
ABORT_CASES = [("rolled back app", s) for s in UNDO_SWAPPED] + [("moved aside app", s) for s in ("put back app", "promoted back app")]
EVERY_STEP = os.environ.get("SNAPSYNC_VM_EVERY_STEP") == "1"
"""Each kill point costs minutes under emulation: by default the guest kills at the steps where ZFS differs
from btrfs (the safety snapshot held, the clone promoted, it swapped in) and the abort's ZFS step; the
btrfs fault tier kills at every step. ``SNAPSYNC_VM_EVERY_STEP=1`` kills here at every step too."""
KILLED_AT = STEPS if EVERY_STEP else ["safety held app", "promoted app", "renamed in app"]
ABORTS_KILLED_AT = ABORT_CASES if EVERY_STEP else [("rolled back app", "promoted back app")]


def cli(policy: Path, *args: str, kill_at: str | None = None) -> tuple[int, str, str]:
    """``snapsync -p POLICY ARGS`` in a forked child: exit status (-9 when killed), stdout, stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                sys.stdout = os.fdopen(os.dup(out.fileno()), "w")
                sys.stderr = os.fdopen(os.dup(err.fileno()), "w")
                if kill_at:
                    os.environ["SNAPSYNC_TEST_KILL_AT"] = kill_at
                from snapsync.cli.app import main

                main(["-p", str(policy), *args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return code, out.read().decode(), err.read().decode()


class Interrupted:
    """Group app (one dataset, a local mountpoint): snapshots ``first`` (state 1) and ``second``
    (state 2), the live state 3 newer than both; ``with_target`` replicates them to a local target."""

    def __init__(self, space: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, datasets: tuple[str, ...] = ("app",)) -> None:
        monkeypatch.setenv("SNAPSYNC_STATE_DIR", str(tmp_path / "state"))
        monkeypatch.setenv("SNAPSYNC_LOCK_DIR", str(tmp_path / "locks"))
        self.datasets = [f"{space}/{leaf}" for leaf in datasets]
        for ds in self.datasets:
            zfs("create", "-o", f"mountpoint=/srv/{space.rpartition('/')[2]}-{ds.rpartition('/')[2]}", ds)
        self.site = Site(self.datasets, f"{space}/backup")
        self.policy = tmp_path / "policy.toml"
        self.policy.write_text(self.site.text)
        self.journal_path = tmp_path / "state" / "rollback" / "app.json"
        self.taken = []
        for seed in (1, 2):
            for ds in self.datasets:
                fill(ds, seed, size=16 * 1024)
            self.taken.append(str(self.site.step(replicate=len(datasets) > 1).snapshot))
        self.first, self.second = self.taken
        for ds in self.datasets:
            fill(ds, 3, size=16 * 1024)
        self.before = self.live()
        self.guids = {ds: prop(ds, "guid") for ds in self.datasets}
        self.mountpoints = {ds: prop(ds, "mountpoint") for ds in self.datasets}

    def run(self, *args: str, kill_at: str | None = None, expect: int = 0) -> str:
        code, out, err = cli(self.policy, *args, kill_at=kill_at)
        assert code == (-9 if kill_at else expect), f"{args} (kill at {kill_at}): exit {code}\n{out}\n{err}"
        return err if "-v" in args else out

    def json(self, *args: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run(*args, "--json"))
        return data

    def safety(self) -> str:
        return str(json.loads(self.journal_path.read_text())["safety"])

    def live(self) -> dict[str, dict[str, str]]:
        for ds in self.datasets:
            assert prop(ds, "mounted") == "yes", f"{ds} is not mounted"
        return {ds: digest(Path(prop(ds, "mountpoint"))) for ds in self.datasets}

    def held_at(self, ds: str, safety: str) -> list[str]:
        """Where ``ds``'s safety snapshot is held: on it, or aside with the old state."""
        places = [ds, f"{ds}.pre-rollback.{safety}"]
        return [p for p in places if f"snapsync:safety:{safety}" in zfs("holds", "-H", f"{p}@{safety}", check=False)]

    def beside(self, ds: str) -> list[str]:
        return [n for n in zfs("list", "-H", "-o", "name", "-r", "-d", "1", ds.rpartition("/")[0]).split() if n.startswith(f"{ds}.")]

    def assert_as_before(self, safety: str | None) -> None:
        """Every dataset the very one it was, with its data, mountpoint, snapshots and the safety snapshot held."""
        assert self.live() == self.before
        for ds in self.datasets:
            assert prop(ds, "guid") == self.guids[ds] and prop(ds, "mountpoint") == self.mountpoints[ds]
            assert prop(ds, "origin") == "-" and prop(ds, "canmount") == "on"
            assert names(ds)[:2] == [self.first, self.second]
            assert not [n for n in self.beside(ds) if ".rollback-new" in n or ".pre-rollback." in n]
            if safety is not None:
                assert self.held_at(ds, safety) == [ds]
        assert not self.journal_path.exists()

    def assert_finished(self, report: dict[str, Any], safety: str) -> None:
        """Rolled back to ``first``, mounted where it was; the safety snapshot aside with the old state, held."""
        assert report["safety_snapshot"] == safety and report["safety_held_on"] == self.datasets, report
        for ds in self.datasets:
            assert prop(ds, "mounted") == "yes" and prop(ds, "mountpoint") == self.mountpoints[ds]
            assert (Path(prop(ds, "mountpoint")) / "state.txt").read_text() == "state 1\n"
            assert self.held_at(ds, safety) == [f"{ds}.pre-rollback.{safety}"] and names(ds) == [self.first]
            assert not [n for n in self.beside(ds) if ".rollback-new" in n]
        assert not self.journal_path.exists()

    def drop_kept(self, report: dict[str, Any]) -> None:
        for ds, kept in report["kept"].items():
            assert prop(kept, "origin") == f"{ds}@{self.first}" and prop(kept, "mounted") == "no"
            assert prop(kept, "canmount") == "noauto" and prop(kept, "mountpoint") == "none"
            zfs("destroy", kept)


def steps_of(stderr: str) -> list[str]:
    return re.findall(r"rollback step: (.+)$", stderr, re.MULTILINE)


def test_these_are_every_step_of_a_zfs_rollback_and_of_its_abort(space: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    group = Interrupted(space, tmp_path, monkeypatch)
    group.run("rollback", "app", group.first, kill_at="rolled back app")
    assert steps_of(group.run("-v", "rollback", "app", "--abort")) == UNDO_SWAPPED
    assert steps_of(group.run("-v", "rollback", "app", group.first)) == STEPS


@pytest.mark.parametrize("step", KILLED_AT)
def test_a_zfs_rollback_killed_at_each_step_is_aborted_or_finished(
    space: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    group = Interrupted(space, tmp_path, monkeypatch)
    group.run("rollback", "app", group.first, kill_at=step)
    first_safety = group.safety()
    assert unfinished("app") == group.first  # what `check` reads to go CRITICAL
    undone = group.json("rollback", "app", "--abort")
    group.assert_as_before(None if step == "journal written" else first_safety)
    assert list(undone["kept"]) == (group.datasets if step in ("renamed in app", "rolled back app") else [])
    group.drop_kept(undone)

    group.run("rollback", "app", group.first, kill_at=step)
    safety = group.safety()
    finished = group.json("rollback", "app", group.first)
    assert "finishing the interrupted rollback" in " ".join(finished["notes"])
    group.assert_finished(finished, safety)
    assert unfinished("app") is None


@pytest.mark.parametrize("route", ["abort again", "rollback again"])
@pytest.mark.parametrize(("start", "step"), ABORTS_KILLED_AT)
def test_a_zfs_abort_killed_at_each_step_converges_by_either_command(
    space: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start: str, step: str, route: str
) -> None:
    group = Interrupted(space, tmp_path, monkeypatch)
    group.run("rollback", "app", group.first, kill_at=start)
    safety = group.safety()
    group.run("rollback", "app", "--abort", kill_at=step)
    assert unfinished("app") == group.first
    if route == "abort again":
        undone = group.json("rollback", "app", "--abort")
        group.assert_as_before(safety)
        assert list(undone["kept"]) == (group.datasets if start == "rolled back app" else [])
        group.drop_kept(undone)
    else:
        group.assert_finished(group.json("rollback", "app", group.first), safety)


def test_an_interrupted_zfs_rollback_of_two_datasets_with_a_target_is_aborted_and_finished_truthfully(
    space: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """app swapped in, db's clone promoted and db moved aside (the target's holds released on app's old
    state): `check` CRITICAL; --abort puts both back with the target's base held again, pruning keeps
    the safety snapshot, replication continues incrementally; stopped again later, running it finishes."""
    group = Interrupted(space, tmp_path, monkeypatch, ("app", "db"))
    app, db = group.datasets
    assert "snapsync:target:usb" in zfs("holds", "-H", f"{app}@{group.second}")
    group.run("rollback", "app", group.first, kill_at="moved aside db")
    safety = group.safety()
    assert "target:" not in zfs("holds", "-H", f"{app}.pre-rollback.{safety}@{group.second}", check=False)
    critical = group.run("check", "--local", "--no-ping", expect=2)
    assert critical.startswith("SNAPSYNC CRITICAL") and "snapsync rollback app --abort" in critical, critical

    undone = group.json("rollback", "app", "--abort")
    group.assert_as_before(safety)
    assert list(undone["kept"]) == [app] and f"snapsync release app {safety}" in " ".join(undone["notes"])
    group.drop_kept(undone)
    for ds in (app, db):
        assert "snapsync:target:usb" in zfs("holds", "-H", f"{ds}@{group.second}")  # the target's base, held again
    assert group.run("check", "--local", "--no-ping").startswith("SNAPSYNC OK")
    group.policy.write_text(group.policy.read_text().replace("keep_last = 100", "keep_last = 1", 1))
    pruned = group.json("prune")["groups"][0]["deleted"]
    assert group.first in pruned and safety not in pruned and group.second not in pruned
    assert group.held_at(app, safety) == [app] and group.held_at(db, safety) == [db]
    group.policy.write_text(group.policy.read_text().replace("keep_last = 1", "keep_last = 100", 1))
    group.run("snapshot")
    sent = group.json("replicate")["groups"][0]["targets"][0]["sent"]
    assert sent and all(s["kind"] == "incremental" for s in sent), sent

    group.run("rollback", "app", group.second, kill_at="rolled back db")
    safety = group.safety()
    finished = group.json("rollback", "app", group.second)
    assert finished["safety_snapshot"] == safety and finished["safety_held_on"] == [app, db]
    for ds in (app, db):
        assert (Path(prop(ds, "mountpoint")) / "state.txt").read_text() == "state 2\n"
        assert prop(ds, "mountpoint") == group.mountpoints[ds] and group.held_at(ds, safety) == [f"{ds}.pre-rollback.{safety}"]
    old = group.run("check", "--local", "--no-ping", expect=2)  # the newer snapshots went aside: the newest is second
    assert "newest snapshot" in old and "rollback" not in old, old
    group.run("snapshot")
    assert group.run("check", "--local", "--no-ping").startswith("SNAPSYNC OK")
