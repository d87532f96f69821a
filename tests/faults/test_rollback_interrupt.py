"""A rollback stopped at any step, on real btrfs, by a real SIGKILL of the real command (the test-only
``SNAPSYNC_TEST_KILL_AT`` hook, read from the environment at each step the journal passes) or by an
I/O error (an immutable directory or file). From every step both ways out converge: running the
rollback again finishes it (the rolled-back data, the safety snapshot there and held, pruning keeps
it), and ``rollback --abort`` puts every dataset back byte for byte, the same subvolume, with the
safety snapshot held and the journal gone. ``check`` is CRITICAL in between and OK after. An abort
stopped at any of its own steps converges the same two ways."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import btrfsutil
import pytest

from tests.conftest import make_subvolume
from tests.replication.helpers import snapsync, tree_digest, write_policy

pytestmark = pytest.mark.btrfs

ROLLBACK_STEPS = [
    "journal written", "safety snapshot taken", "safety held app", "safety held db", "safety verified",
    "writable snapshot made app", "moved aside app", "rolled back app",
    "writable snapshot made db", "moved aside db", "rolled back db",
]
"""Every step of a rollback of the group (app, db), in order; the first test checks a real run passes exactly these."""

MIDWAY = "moved aside db"
"""Where the abort tests stop the rollback: app swapped, db moved aside and not yet replaced."""

ABORT_STEPS = [
    "abort started", "rolled-back state moved away app", "put back app", "undone app", "put back db", "undone db",
]
"""Every step of ``--abort`` from MIDWAY, in order."""


class Site:
    """Group app = two subvolumes, snapshots ``first`` (v1) and ``second`` (v2), live state v3 not snapshotted."""

    def __init__(self, root: Path, tmp_path: Path) -> None:
        self.persist = root / "persist"
        self.app = make_subvolume(self.persist / "app")
        self.db = make_subvolume(self.persist / "db")
        self.policy = write_policy(tmp_path / "p.toml", [self.app, self.db], {})
        self.state = Path(os.environ["SNAPSYNC_STATE_DIR"])
        self.first = self.take("v1")
        self.second = self.take("v2")
        self.fill("v3")
        (self.app / "v1.bin").unlink()  # the live state also lost a file since the last snapshot
        self.before = self.live()
        self.uuids = self.ids()
        self.at_first = {ds.name: tree_digest(self.snapshot_dir(ds, self.first)) for ds in self.datasets}

    @property
    def datasets(self) -> tuple[Path, Path]:
        return self.app, self.db

    def fill(self, version: str) -> None:
        for ds in self.datasets:
            (ds / "data.txt").write_text(f"{ds.name} {version}\n")
            (ds / "sub").mkdir(exist_ok=True)
            (ds / "sub" / f"{version}.bin").write_bytes(os.urandom(96 * 1024))
            (ds / f"{version}.bin").write_bytes(os.urandom(32 * 1024))

    def take(self, version: str) -> str:
        self.fill(version)
        time.sleep(1.05)  # snapshot names carry the second
        return str(self.json("snapshot")["groups"][0]["snapshot"])

    def cli(self, *args: str, kill_at: str | None = None, verbose: bool = False) -> subprocess.CompletedProcess[str]:
        env = {"SNAPSYNC_TEST_KILL_AT": kill_at} if kill_at else None
        return snapsync(*(["-v"] if verbose else []), "-p", str(self.policy), *args, env=env)

    def json(self, *args: str) -> dict[str, Any]:
        proc = self.cli(*args, "--json")
        assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def killed(self, *args: str, at: str) -> None:
        proc = self.cli(*args, kill_at=at)
        assert proc.returncode == -9, f"{args} was not killed at {at!r}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"

    def live(self) -> dict[str, dict[str, str]]:
        return {ds.name: tree_digest(ds) for ds in self.datasets}

    def ids(self) -> dict[str, str]:
        return {ds.name: btrfsutil.subvolume_info(ds).uuid.hex() for ds in self.datasets}

    def snapshot_dir(self, ds: Path, name: str) -> Path:
        return self.persist / ".snapsync" / ds.name / name

    def journal(self) -> dict[str, Any] | None:
        path = self.state / "rollback" / "app.json"
        return json.loads(path.read_text()) if path.exists() else None

    def safety(self) -> str:
        journal = self.journal()
        assert journal is not None
        return str(journal["safety"])

    def holds(self) -> dict[str, dict[str, list[str]]]:
        """Per dataset, every snapshot `list` shows and its holds."""
        listed = self.json("list", "--local")["groups"][0]["datasets"]
        return {Path(e["dataset"]).name: {s["name"]: s["holds"] for s in e["snapshots"]} for e in listed}

    def assert_safety_held(self, safety: str) -> None:
        for ds, snaps in self.holds().items():
            assert f"safety:{safety}" in snaps.get(safety, []), f"{ds}: {safety} not held: {snaps}"

    def check(self) -> tuple[int, str]:
        proc = self.cli("check", "--local", "--no-ping")
        return proc.returncode, proc.stdout

    def assert_critical(self) -> None:
        code, text = self.check()
        assert code == 2 and text.startswith("SNAPSYNC CRITICAL") and "rollback of group app" in text, text
        assert "snapsync rollback app --abort" in text, text

    def assert_ok(self) -> None:
        code, text = self.check()
        assert code == 0 and text.startswith("SNAPSYNC OK"), text

    def leftovers(self) -> list[str]:
        """What a rollback or an abort leaves beside the datasets."""
        return sorted(p.name for p in self.persist.iterdir() if p.name not in ("app", "db", ".snapsync"))


@pytest.fixture
def site(btrfs_root: Path, tmp_path: Path) -> Site:
    return Site(btrfs_root, tmp_path)


def steps_of(stderr: str) -> list[str]:
    return re.findall(r"rollback step: (.+)$", stderr, re.MULTILINE)


def test_these_are_every_step_of_a_rollback_and_of_its_abort(site: Site) -> None:
    done = site.cli("rollback", "app", site.first, verbose=True)
    assert done.returncode == 0, done.stderr
    assert steps_of(done.stderr) == ROLLBACK_STEPS

    site.fill("v4")
    time.sleep(1.05)
    site.killed("rollback", "app", site.second, at=MIDWAY)
    undone = site.cli("rollback", "app", "--abort", verbose=True)
    assert undone.returncode == 0, undone.stderr
    assert steps_of(undone.stderr) == ABORT_STEPS


def _finished(site: Site, report: dict[str, Any], safety: str, before: dict[str, dict[str, str]]) -> None:
    """A finished rollback to ``first``: its data live, the state before kept aside and as the held safety snapshot."""
    assert report["safety_snapshot"] == safety and report["safety_held_on"] == [str(site.app), str(site.db)], report
    assert site.live() == site.at_first
    for ds in site.datasets:
        assert tree_digest(site.snapshot_dir(ds, safety)) == before[ds.name]
        assert tree_digest(Path(report["aside"][str(ds)])) == before[ds.name]
    site.assert_safety_held(safety)
    assert site.journal() is None
    assert not [n for n in site.leftovers() if n.startswith(".")]  # no prepared writable snapshot left


@pytest.mark.parametrize("step", ROLLBACK_STEPS)
def test_a_rollback_killed_at_each_step_is_aborted_or_finished(site: Site, step: str) -> None:
    swapped = {ds.name for ds in site.datasets if ROLLBACK_STEPS.index(step) >= ROLLBACK_STEPS.index(f"rolled back {ds.name}")}

    # Stopped, then undone with --abort: everything as before, the same subvolumes, the safety snapshot held.
    site.killed("rollback", "app", site.first, at=step)
    first_safety = site.safety()
    site.assert_critical()
    undone = site.json("rollback", "app", "--abort")
    assert undone["aborted"] and undone["snapshot"] == site.first
    assert site.live() == site.before and site.ids() == site.uuids
    assert site.journal() is None
    kept = {Path(ds).name: Path(where) for ds, where in undone["kept"].items()}
    assert set(kept) == swapped  # a state that was live is kept, never deleted
    for name, where in kept.items():
        assert where.name == f"{name}.aborted-rollback.{first_safety}" and tree_digest(where) == site.at_first[name]
    assert site.leftovers() == sorted(p.name for p in kept.values())
    if step == "journal written":
        assert undone["safety_held_on"] == [] and undone["safety_snapshot"] == ""
        assert all(first_safety not in snaps for snaps in site.holds().values())
    else:
        assert undone["safety_held_on"] == [str(site.app), str(site.db)] and undone["safety_snapshot"] == first_safety
        assert f"snapsync release app {first_safety}" in " ".join(undone["notes"])
        site.assert_safety_held(first_safety)
        for ds in site.datasets:
            assert tree_digest(site.snapshot_dir(ds, first_safety)) == site.before[ds.name]
    site.assert_ok()
    third = site.json("snapshot")["groups"][0]["snapshot"]
    assert third and all(tree_digest(site.snapshot_dir(ds, third)) == site.before[ds.name] for ds in site.datasets)
    assert site.cli("run").returncode == 0

    # Stopped again at the same step, then finished by running the same rollback again.
    for path in kept.values():
        btrfsutil.delete_subvolume(path)
    site.killed("rollback", "app", site.first, at=step)
    safety = site.safety()
    assert safety != first_safety
    site.assert_critical()
    finished = site.json("rollback", "app", site.first)
    notes = " ".join(finished["notes"])
    assert "finishing the interrupted rollback" in notes
    if step == "journal written":
        assert f"took safety snapshot {safety}" in notes and "had not taken it" in notes
    if step in ("safety snapshot taken", "safety held app"):
        assert f"safety snapshot {safety} was not held; held it now" in notes
    _finished(site, finished, safety, site.before)
    site.assert_ok()

    site.policy.write_text(site.policy.read_text().replace("keep_last = 100", "keep_last = 1"))
    pruned = site.json("prune")["groups"][0]
    assert safety not in pruned["deleted"] and first_safety not in pruned["deleted"]
    site.assert_safety_held(safety)
    if step != "journal written":
        site.assert_safety_held(first_safety)


@pytest.mark.parametrize("route", ["abort again", "rollback again"])
@pytest.mark.parametrize("step", ABORT_STEPS)
def test_an_abort_killed_at_each_step_converges_by_either_command(site: Site, step: str, route: str) -> None:
    site.killed("rollback", "app", site.first, at=MIDWAY)
    safety = site.safety()
    site.killed("rollback", "app", "--abort", at=step)
    site.assert_critical()
    kept_app = site.persist / f"app.aborted-rollback.{safety}"
    if route == "abort again":
        undone = site.json("rollback", "app", "--abort")
        assert site.live() == site.before and site.ids() == site.uuids
        assert undone["safety_held_on"] == [str(site.app), str(site.db)]
        assert site.leftovers() == [kept_app.name] and tree_digest(kept_app) == site.at_first["app"]
    else:
        finished = site.json("rollback", "app", site.first)
        _finished(site, finished, safety, site.before)
        if kept_app.exists():  # the abort had moved app's rolled-back state away: kept, and said so
            assert finished["kept"] == {str(site.app): str(kept_app)}
            assert tree_digest(kept_app) == site.at_first["app"]
    assert site.journal() is None
    site.assert_safety_held(safety)
    site.assert_ok()
    assert site.cli("snapshot").returncode == 0


@contextmanager
def immutable(path: Path) -> Iterator[None]:
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_io_error_at_the_safety_snapshot_claims_nothing_and_the_rerun_takes_it(site: Site) -> None:
    with immutable(site.persist / ".snapsync" / "db"):
        failed = site.cli("rollback", "app", site.first)
        assert failed.returncode == 1 and "snapshot failed" in failed.stderr, failed.stderr
        safety = site.safety()
        assert all(safety not in snaps for snaps in site.holds().values())  # app's half was removed again
        site.assert_critical()
        again = site.cli("rollback", "app", site.first, "--json")
        assert again.returncode == 1 and "safety_snapshot" not in again.stdout
        assert site.live() == site.before and site.ids() == site.uuids  # nothing was swapped without it
    finished = site.json("rollback", "app", site.first)
    assert f"took safety snapshot {safety}" in " ".join(finished["notes"])
    _finished(site, finished, safety, site.before)
    site.assert_ok()


def test_an_io_error_at_the_hold_leaves_nothing_unheld_and_nothing_swapped(site: Site) -> None:
    holds = site.persist / ".snapsync" / "db" / ".holds.json"
    holds.write_text("{}")
    with immutable(holds):
        failed = site.cli("rollback", "app", site.first)
        assert failed.returncode == 1 and ".holds.json" in failed.stderr, failed.stderr
        safety = site.safety()
        again = site.cli("rollback", "app", site.first)
        assert again.returncode == 1 and ".holds.json" in again.stderr, again.stderr
        assert site.live() == site.before and site.ids() == site.uuids  # not swapped while db's is unheld
        site.assert_critical()
    finished = site.json("rollback", "app", site.first)
    assert f"{site.db}: safety snapshot {safety} was not held; held it now" in " ".join(finished["notes"])
    _finished(site, finished, safety, site.before)
    site.assert_ok()


def test_an_io_error_at_the_first_swap_is_finished_or_aborted(site: Site) -> None:
    with immutable(site.persist):
        failed = site.cli("rollback", "app", site.first)
        assert failed.returncode == 1 and "rolled back so far: nothing" in failed.stderr, failed.stderr
        assert "--abort" in failed.stderr and "\n" not in failed.stderr.strip()
        safety = site.safety()
        site.assert_safety_held(safety)
        site.assert_critical()
    undone = site.json("rollback", "app", "--abort")
    assert undone["safety_held_on"] == [str(site.app), str(site.db)]
    assert site.live() == site.before and site.ids() == site.uuids and site.leftovers() == []
    site.assert_ok()

    with immutable(site.persist):
        assert site.cli("rollback", "app", site.first).returncode == 1
    safety = site.safety()
    _finished(site, site.json("rollback", "app", site.first), safety, site.before)


def test_abort_refuses_what_it_cannot_undo_with_one_line_and_changes_nothing(site: Site) -> None:
    nothing = site.cli("rollback", "app", "--abort")
    assert nothing.returncode == 2 and "no interrupted rollback of group app to abort" in nothing.stderr
    assert "\n" not in nothing.stderr.strip()
    bare = site.cli("rollback", "app")
    assert bare.returncode == 2 and "--abort" in bare.stderr

    site.killed("rollback", "app", site.first, at="rolled back app")
    wrong = site.cli("rollback", "app", site.second, "--abort")
    assert wrong.returncode == 2 and f"was to {site.first}, not {site.second}" in wrong.stderr
    before = (site.leftovers(), site.live(), site.journal())
    plan = site.json("rollback", "app", "--abort", "--dry-run")
    assert plan["dry_run"] and not plan["aborted"]
    assert [s.split(": ", 1)[1].split(" ", 2)[:2] for s in plan["steps"]] == [["moved", "the"], ["put", "back"], ["as", "it"]]
    assert (site.leftovers(), site.live(), site.journal()) == before

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], cwd=site.app)
    try:
        busy = site.cli("rollback", "app", "--abort")
        assert busy.returncode == 2 and f"pid {proc.pid}" in busy.stderr and "\n" not in busy.stderr.strip()
    finally:
        proc.kill()
        proc.wait()

    os.rename(site.app, site.persist / "app.mine")  # somebody put other data in app's place by hand
    make_subvolume(site.app, "somebody else's\n")
    before = (site.leftovers(), site.live(), site.journal())
    refused = site.cli("rollback", "app", "--abort")
    assert refused.returncode == 2 and "\n" not in refused.stderr.strip(), refused.stderr
    assert "cannot undo the interrupted rollback of group app safely" in refused.stderr
    assert "is not the state the rollback put in place" in refused.stderr and "nothing was changed" in refused.stderr
    assert (site.leftovers(), site.live(), site.journal()) == before
    site.assert_critical()
