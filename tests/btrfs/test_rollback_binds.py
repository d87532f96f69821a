"""Rollback on an impermanence host, on real btrfs with real bind mounts: every service directory is
a bind mount of a directory under ``/persist``, as impermanence makes them. After a rollback the
service's path shows the snapshot's data and takes writes into the live dataset, never into the
state moved aside; a stop at any bind step converges by rerunning or aborting; what cannot be made
right (a mount inside the data) is refused before anything changes, --force or not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapsync.backends.usage import mounts
from tests.conftest import make_subvolume
from tests.replication.helpers import snapsync, write_policy

pytestmark = pytest.mark.btrfs


class Host:
    """``/persist`` with subvolumes app and db; ``/var/lib/app`` a bind of app, ``/var/lib/db`` a
    read-only bind of a plain directory inside db (impermanence's per-service directories)."""

    def __init__(self, root: Path, tmp_path: Path) -> None:
        self.persist = root / "persist"
        self.app = make_subvolume(self.persist / "app", "app v1\n")
        self.db = make_subvolume(self.persist / "db")
        (self.db / "data").mkdir()
        (self.db / "data" / "data.txt").write_text("db v1\n")
        self.policy = write_policy(tmp_path / "p.toml", [self.app, self.db], {})
        self.var = tmp_path / "var" / "lib"
        self.service_app, self.service_db = self.var / "app", self.var / "db"
        for point in (self.service_app, self.service_db):
            point.mkdir(parents=True)
        self.mount("--bind", str(self.app), str(self.service_app))
        self.mount("--bind", str(self.db / "data"), str(self.service_db))
        self.mount("-o", "remount,bind,ro,nosuid", str(self.service_db))
        self.first = self.take("v1")
        (self.service_app / "data.txt").write_text("app v2\n")
        (self.db / "data" / "data.txt").write_text("db v2\n")
        self.second = self.take("v2")

    @staticmethod
    def mount(*args: str) -> None:
        subprocess.run(["mount", *args], check=True)

    def take(self, version: str) -> str:
        time.sleep(1.05)  # snapshot names carry the second
        return str(self.json("snapshot")["groups"][0]["snapshot"])

    def cli(self, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
        return snapsync("-p", str(self.policy), *args, env={"SNAPSYNC_TEST_KILL_AT": kill_at} if kill_at else None)

    def json(self, *args: str, code: int = 0) -> dict[str, Any]:
        proc = self.cli(*args, "--json")
        assert proc.returncode == code, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def seen(self) -> tuple[str, str]:
        """What the services see."""
        return (self.service_app / "data.txt").read_text(), (self.service_db / "data.txt").read_text()

    def shows_live(self) -> bool:
        """Both service paths are the live datasets' directories (device and inode), not an aside's."""
        pairs = [(self.service_app, self.app), (self.service_db, self.db / "data")]
        return all((os.stat(a).st_dev, os.stat(a).st_ino) == (os.stat(b).st_dev, os.stat(b).st_ino) for a, b in pairs)

    def flags(self, point: Path) -> set[str]:
        (found,) = [m for m in mounts() if m.point == str(point)]
        return set(found.options.split(","))

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.persist.iterdir() if p.name not in ("app", "db", ".snapsync"))


@pytest.fixture
def host(btrfs_root: Path, tmp_path: Path) -> Iterator[Host]:
    made = Host(btrfs_root, tmp_path)
    yield made
    for point in (made.service_db, made.service_app):
        while any(m.point == str(point) for m in mounts()):
            subprocess.run(["umount", "--lazy", str(point)], check=True)


def test_the_service_paths_show_the_snapshot_and_new_writes_land_in_the_live_dataset(host: Host) -> None:
    assert host.seen() == ("app v2\n", "db v2\n")
    report = host.json("rollback", "app", host.first)
    assert host.seen() == ("app v1\n", "db v1\n")
    assert host.shows_live()
    assert sorted(report["rebound"]) == sorted([
        f"{host.service_app}: bind mount of {host.app}", f"{host.service_db}: bind mount of {host.db / 'data'}",
    ])
    assert {"ro", "nosuid"} <= host.flags(host.service_db)  # the read-only bind stays read-only
    with pytest.raises(OSError):
        (host.service_db / "x").write_text("x")

    (host.service_app / "data.txt").write_text("app v3, written after the rollback\n")
    assert (host.app / "data.txt").read_text() == "app v3, written after the rollback\n"
    aside = Path(report["aside"][str(host.app)])
    assert (aside / "data.txt").read_text() == "app v2\n"  # the aside took nothing

    # --delete-aside is refused while anything shows an aside, then deletes them
    peek = host.var / "peek"
    peek.mkdir()
    host.mount("--bind", str(aside), str(peek))
    try:
        refused = host.cli("release", "app", report["safety_snapshot"], "--delete-aside")
        assert refused.returncode == 2 and f"not deleting" in refused.stderr and str(peek) in refused.stderr, refused.stderr
        assert aside.exists()
    finally:
        subprocess.run(["umount", str(peek)], check=True)
    done = host.json("release", "app", report["safety_snapshot"], "--delete-aside")
    assert sorted(done["deleted_asides"]) == sorted(report["aside"].values())
    assert host.leftovers() == []
    assert host.seen() == ("app v3, written after the rollback\n", "db v1\n")


def test_dry_run_shows_the_plan_while_the_service_runs_and_changes_nothing(host: Host) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], cwd=host.service_db)
    try:
        time.sleep(0.2)
        plan = host.json("rollback", "app", host.first, "--dry-run", code=2)
        assert plan["dry_run"] and not plan["ok"]
        assert any(f"re-point bind mount {host.service_app} at {host.app}" in s for s in plan["steps"])
        assert any(f"re-point bind mount {host.service_db} at {host.db / 'data'}" in s for s in plan["steps"])
        (why,) = plan["blocked"]
        assert f"pid {proc.pid}" in why and "--force" in why
        text = host.cli("rollback", "app", host.first, "--dry-run")
        assert text.returncode == 2 and "would roll app back" in text.stdout and f"pid {proc.pid}" in text.stderr
        refused = host.cli("rollback", "app", host.first)
        assert refused.returncode == 2 and f"pid {proc.pid}" in refused.stderr
        assert host.seen() == ("app v2\n", "db v2\n") and host.leftovers() == []
    finally:
        proc.kill()
        proc.wait()


def test_forced_past_a_running_process_no_mount_is_left_on_the_old_data(host: Host) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], cwd=host.service_app)
    try:
        time.sleep(0.2)
        report = host.json("rollback", "app", host.first, "--force")
        assert [h["pid"] for h in report["in_use"] if h["kind"] == "process"] == [proc.pid]
        assert host.seen() == ("app v1\n", "db v1\n") and host.shows_live()
        # the process itself still has the old state open: that is what --force means, and it is said
        assert Path(f"/proc/{proc.pid}/cwd/data.txt").read_text() == "app v2\n"
        assert any("rolled back anyway (--force)" in n and "stay in the state moved aside" in n for n in report["notes"])
    finally:
        proc.kill()
        proc.wait()


def test_a_mount_inside_the_data_is_refused_with_the_commands_even_with_force(host: Host) -> None:
    cache = host.app / "cache"
    cache.mkdir()
    host.mount("-t", "tmpfs", "tmpfs", str(cache))
    try:
        for extra in ([], ["--force"]):
            refused = host.cli("rollback", "app", host.first, *extra)
            line = refused.stderr.strip()
            assert refused.returncode == 2 and "\n" not in line, line
            assert f"umount {cache}" in line and "--force does not change this" in line
        assert host.seen() == ("app v2\n", "db v2\n") and host.leftovers() == []
    finally:
        subprocess.run(["umount", str(cache)], check=True)


def test_a_nested_subvolume_in_the_last_dataset_is_refused_before_the_first_changes(host: Host) -> None:
    make_subvolume(host.db / "machines", "inner\n")
    plan = host.json("rollback", "app", host.first, "--dry-run", code=1)
    assert any("contains subvolumes" in why for why in plan["blocked"])
    refused = host.cli("rollback", "app", host.first)
    assert refused.returncode == 1 and "contains subvolumes" in refused.stderr
    assert host.seen() == ("app v2\n", "db v2\n") and host.leftovers() == []
    assert not (Path(os.environ["SNAPSYNC_STATE_DIR"]) / "rollback" / "app.json").exists()
    # so nothing is stuck: with the nested subvolume gone the same rollback runs
    import btrfsutil

    btrfsutil.delete_subvolume(host.db / "machines")
    host.json("rollback", "app", host.first)
    assert host.seen() == ("app v1\n", "db v1\n")


BIND_STEPS = ["bind unmounted {app}", "bind mounted {app}", "rolled back app", "bind unmounted {db}", "bind mounted {db}"]


@pytest.mark.parametrize("route", ["finish", "abort"])
@pytest.mark.parametrize("step", BIND_STEPS)
def test_killed_at_each_bind_step_both_ways_out_leave_no_service_on_an_aside(host: Host, step: str, route: str) -> None:
    at = step.format(app=host.service_app, db=host.service_db)
    killed = host.cli("rollback", "app", host.first, kill_at=at)
    assert killed.returncode == -9, killed.stderr
    if route == "finish":
        host.json("rollback", "app", host.first)
        assert host.seen() == ("app v1\n", "db v1\n")
    else:
        undone = host.json("rollback", "app", "--abort")
        assert undone["aborted"]
        assert host.seen() == ("app v2\n", "db v2\n")
    assert host.shows_live()
    assert {"ro", "nosuid"} <= host.flags(host.service_db)
    assert not (Path(os.environ["SNAPSYNC_STATE_DIR"]) / "rollback" / "app.json").exists()


def test_a_hand_edited_bind_entry_in_the_journal_is_one_line_and_changes_nothing(host: Host) -> None:
    killed = host.cli("rollback", "app", host.first, kill_at="safety verified")
    assert killed.returncode == -9
    path = Path(os.environ["SNAPSYNC_STATE_DIR"]) / "rollback" / "app.json"
    plan = json.loads(path.read_text())
    plan["binds"][str(host.app)] = [{"sub": ""}]
    path.write_text(json.dumps(plan))
    refused = host.cli("rollback", "app", host.first)
    line = refused.stderr.strip()
    assert refused.returncode == 2 and "\n" not in line and "bind mount entry" in line, refused.stderr
    assert host.seen() == ("app v2\n", "db v2\n") and host.shows_live()
