"""Rolling a group back on real btrfs: together, nothing destroyed, refused while in use, and
replication continues incrementally afterwards."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import make_subvolume
from tests.replication.helpers import copies, copies_dir, run_json, snapsync, write_policy

pytestmark = pytest.mark.btrfs


@pytest.fixture
def site(btrfs_root: Path, target_root: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """Group "app" of two subvolumes replicating to a local target; returns (policy, app, db)."""
    app = make_subvolume(btrfs_root / "persist" / "app", "app v1\n")
    db = make_subvolume(btrfs_root / "persist" / "db", "db v1\n")
    policy = write_policy(tmp_path / "p.toml", [app, db], {"usb": f'type = "local"\npath = "{target_root}"'})
    return policy, app, db


def step(policy: Path, app: Path, db: Path, version: str) -> str:
    (app / "data.txt").write_text(f"app {version}\n")
    (db / "data.txt").write_text(f"db {version}\n")
    time.sleep(1.05)  # snapshot names carry the second
    name = run_json("-p", str(policy), "snapshot")["groups"][0]["snapshot"]
    sent = run_json("-p", str(policy), "replicate")["groups"][0]["targets"][0]["sent"]
    assert sent
    return str(name)


Start = Callable[[Path], "subprocess.Popen[bytes]"]


@pytest.fixture
def sleeper() -> Iterator[Start]:
    """Start a process whose working directory is inside the data (a service that is still running)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(cwd: Path) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], cwd=cwd)
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_rollback_returns_every_dataset_keeps_everything_and_replication_continues_incrementally(
    site: tuple[Path, Path, Path], target_root: Path
) -> None:
    policy, app, db = site
    first = step(policy, app, db, "v1")
    second = step(policy, app, db, "v2")

    report = run_json("-p", str(policy), "rollback", "app", first)
    safety = report["safety_snapshot"]
    assert (app / "data.txt").read_text() == "app v1\n" and (db / "data.txt").read_text() == "db v1\n"
    for ds in (app, db):
        aside = Path(report["aside"][str(ds)])
        assert aside.parent == ds.parent and (aside / "data.txt").read_text() == f"{ds.name} v2\n"
    listed = run_json("-p", str(policy), "list", "--local")["groups"][0]["datasets"]
    for entry in listed:
        names = {s["name"]: s for s in entry["snapshots"]}
        assert {first, second, safety} <= names.keys()  # nothing destroyed
        assert f"safety:{safety}" in names[safety]["holds"]

    (app / "data.txt").write_text("app v3 after rollback\n")
    time.sleep(1.05)
    third = run_json("-p", str(policy), "snapshot")["groups"][0]["snapshot"]
    sent = run_json("-p", str(policy), "replicate")["groups"][0]["targets"][0]["sent"]
    assert {s["name"]: s["kind"] for s in sent if s["name"] == third} == {third: "incremental"}
    assert all(s["kind"] == "incremental" for s in sent)
    assert (copies_dir(target_root, "app", app) / third / "data.txt").read_text() == "app v3 after rollback\n"
    assert (copies_dir(target_root, "app", db) / third / "data.txt").read_text() == "db v1\n"

    policy.write_text(policy.read_text().replace("keep_last = 100", "keep_last = 1"))
    pruned = run_json("-p", str(policy), "prune")["groups"][0]
    assert safety not in pruned["deleted"]  # held until released


def test_release_lets_retention_take_the_safety_snapshot(site: tuple[Path, Path, Path]) -> None:
    policy, app, db = site
    first = step(policy, app, db, "v1")
    step(policy, app, db, "v2")
    safety = run_json("-p", str(policy), "rollback", "app", first)["safety_snapshot"]
    assert snapsync("-p", str(policy), "release", "app", safety).returncode == 0
    policy.write_text(policy.read_text().replace("keep_last = 100", "keep_last = 1"))
    time.sleep(1.05)
    run_json("-p", str(policy), "snapshot")
    pruned = run_json("-p", str(policy), "prune", "app")["groups"][0]
    assert safety in pruned["deleted"]


def test_rollback_is_refused_while_a_process_uses_the_data_even_through_a_bind_mount(
    site: tuple[Path, Path, Path], sleeper: Start, tmp_path: Path
) -> None:
    policy, app, db = site
    first = step(policy, app, db, "v1")
    step(policy, app, db, "v2")
    proc = sleeper(app)
    refused = snapsync("-p", str(policy), "rollback", "app", first)
    assert refused.returncode == 2
    line = refused.stderr.strip()
    assert "\n" not in line and f"pid {proc.pid} (python" in line and str(app) in line and "--force" in line
    proc.kill()
    proc.wait()

    alias = tmp_path / "var-lib-db"
    alias.mkdir()
    subprocess.run(["mount", "--bind", str(db), str(alias)], check=True)
    try:
        # a bind mount alone does not block: it is re-pointed (tests/btrfs/test_rollback_binds.py); a process using it does
        other = sleeper(alias)
        refused = snapsync("-p", str(policy), "rollback", "app", first, "--json")
        assert refused.returncode == 2 and f"pid {other.pid}" in refused.stdout and str(alias) in refused.stdout
        names = {p.name for p in app.parent.iterdir()}
        assert not [n for n in names if ".pre-rollback." in n]  # nothing was done
        assert (db / "data.txt").read_text() == "db v2\n"
        forced = run_json("-p", str(policy), "rollback", "app", first, "--force")
        assert [h["pid"] for h in forced["in_use"] if h["kind"] == "process"] == [other.pid]
        assert any("in use, rolled back anyway (--force)" in n for n in forced["notes"])
        assert (db / "data.txt").read_text() == "db v1\n"
        other.kill()
        other.wait()
    finally:
        subprocess.run(["umount", "--lazy", str(alias)], check=True)


def test_a_process_in_another_mount_namespace_is_found_by_device(site: tuple[Path, Path, Path]) -> None:
    """A container or a unit with a private bind mount sees other paths; its files are still on the dataset."""
    policy, app, db = site
    first = step(policy, app, db, "v1")
    script = f"mkdir -p /tmp/ns-view && mount --bind {db} /tmp/ns-view && cd /tmp/ns-view && exec sleep 600"
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not os.readlink(f"/proc/{proc.pid}/cwd").endswith("ns-view"):
            time.sleep(0.05)
        refused = snapsync("-p", str(policy), "rollback", "app", first)
        assert refused.returncode == 2 and f"pid {proc.pid} (sleep" in refused.stderr, refused.stderr
    finally:
        proc.kill()
        proc.wait()


def test_dry_run_shows_every_step_and_changes_nothing(site: tuple[Path, Path, Path]) -> None:
    policy, app, db = site
    first = step(policy, app, db, "v1")
    step(policy, app, db, "v2")
    before = sorted(p.name for p in app.parent.iterdir())
    plan = run_json("-p", str(policy), "rollback", "app", first, "--dry-run")
    assert plan["dry_run"] and len(plan["steps"]) == 1 + 2 * 2
    assert any("base" in n and "continues incrementally" in n for n in plan["notes"])
    assert sorted(p.name for p in app.parent.iterdir()) == before
    assert (app / "data.txt").read_text() == "app v2\n"


def test_bad_rollback_input_is_one_line_exit_2(site: tuple[Path, Path, Path]) -> None:
    policy, app, db = site
    step(policy, app, db, "v1")
    for args, message in [
        (["rollback", "nope", "snapsync_2026-01-01T00:00:00Z"], "no group named 'nope'"),
        (["rollback", "app", "snapsync_2020-01-01T00:00:00Z"], "no snapshot snapsync_2020-01-01T00:00:00Z"),
        (["rollback", "app", "before-upgrade"], "is not one of group app's snapshots"),
    ]:
        proc = snapsync("-p", str(policy), *args)
        assert proc.returncode == 2 and message in proc.stderr and "\n" not in proc.stderr.strip(), proc.stderr


def test_a_rollback_that_died_between_its_renames_is_finished_by_running_it_again(
    site: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    from snapsync.backends.btrfs import BtrfsBackend
    from snapsync.policy.loader import load_policy
    from snapsync.recovery.rollback import rollback

    policy, app, db = site
    first = step(policy, app, db, "v1")
    second = step(policy, app, db, "v2")
    group = load_policy(str(policy)).groups["app"]
    real = os.rename
    calls: list[str] = []

    def dies_at_the_fourth_rename(a: str | os.PathLike[str], b: str | os.PathLike[str], **fds: int) -> None:
        if str(a).endswith(".tmp"):  # a small file written atomically (holds, the rollback's plan)
            return real(a, b, **fds)
        calls.append(str(a))
        if len(calls) == 4:  # app swapped; db moved aside, its new state not yet in place
            raise OSError(5, "Input/output error (simulated crash)")
        real(a, b, **fds)

    monkeypatch.setattr(os, "rename", dies_at_the_fourth_rename)
    with pytest.raises(Exception, match="simulated crash"):
        rollback(group, BtrfsBackend(), first, datetime.now(UTC))
    monkeypatch.setattr(os, "rename", real)
    assert not db.exists() and (app / "data.txt").read_text() == "app v1\n"  # the one instant without db
    other = snapsync("-p", str(policy), "rollback", "app", second)
    assert other.returncode == 2 and f"an interrupted rollback of group app to {first} is unfinished" in other.stderr
    finish = f"an interrupted rollback of group app to {first} is unfinished; run `snapsync rollback app {first}` to finish it"
    check = snapsync("-p", str(policy), "check", "--no-ping")
    assert check.returncode == 2 and check.stdout.startswith("SNAPSYNC CRITICAL") and finish in check.stdout, check.stdout
    taken = snapsync("-p", str(policy), "snapshot")
    assert taken.returncode == 1 and "does not exist" in taken.stderr and finish in taken.stderr, taken.stderr

    finished = run_json("-p", str(policy), "rollback", "app", first)
    assert any("finishing the interrupted rollback" in n for n in finished["notes"])
    assert finished["safety_held_on"] == [str(app), str(db)] and finished["safety_snapshot"]
    assert (app / "data.txt").read_text() == "app v1\n" and (db / "data.txt").read_text() == "db v1\n"
    assert [p for p in app.parent.iterdir() if p.name.startswith("db.pre-rollback.")]
    again = run_json("-p", str(policy), "rollback", "app", first, "--dry-run")
    assert not any("interrupted" in n for n in again["notes"])  # the plan is gone once finished


def test_a_subvolume_with_nested_subvolumes_is_not_rolled_back(site: tuple[Path, Path, Path]) -> None:
    policy, app, db = site
    first = step(policy, app, db, "v1")
    make_subvolume(app / "nested", "inner\n")
    proc = snapsync("-p", str(policy), "rollback", "app", first)
    assert proc.returncode == 1 and "contains subvolumes" in proc.stderr and (app / "nested" / "data.txt").exists()
    assert not [p for p in app.parent.iterdir() if ".pre-rollback." in p.name]
