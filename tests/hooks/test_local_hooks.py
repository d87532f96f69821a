"""The sqlite, freeze and command hooks for real: SQLite under concurrent writers, a cgroup v2 freezer
around a writer that updates two subvolumes in lock-step, commands that fail or hang."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from snapsync.backends.btrfs import BtrfsBackend
from snapsync.clock import ManualClock
from snapsync.policy.loader import parse_policy
from snapsync.ops.runner import GroupReport, Runner
from tests.conftest import make_subvolume

START = datetime(2026, 11, 26, tzinfo=UTC)
UNIFIED = Path("/sys/fs/cgroup/unified")


def run_group(datasets: list[Path], hooks: str, clock: ManualClock) -> GroupReport:
    text = "\n".join([
        "version = 1", "[defaults]", 'interval = "1m"', "[defaults.retention]", "keep_last = 100",
        "[groups.app]", 'backend = "btrfs"', "datasets = [" + ", ".join(f'"{d}"' for d in datasets) + "]", hooks,
    ])
    runner = Runner(parse_policy(text, "<test>"), clock)
    (report,) = runner.run(list(runner.policy.groups.values()), take=True, only_due=False, prune=False)
    clock.advance(timedelta(minutes=1))
    return report


def spawn(code: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], start_new_session=True)


SQLITE_WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
me = int(sys.argv[2])
n = 0
while True:
    n += 1
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t VALUES (?, ?, ?)", (me, n, "y" * 300))
    db.execute("COMMIT")
    with open(sys.argv[3], "w") as f:
        f.write(str(n))
"""


def test_sqlite_snapshots_under_concurrent_writers_are_intact(btrfs_root: Path, tmp_path: Path) -> None:
    data = make_subvolume(btrfs_root / "persist" / "hass")
    db = data / "home-assistant_v2.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (writer int, n int, pad text, PRIMARY KEY (writer, n))")
    progress = [tmp_path / f"w{i}" for i in range(3)]
    writers = [spawn(SQLITE_WRITER, str(db), str(i), str(progress[i])) for i in range(3)]
    clock = ManualClock(START)
    try:
        while not all(p.exists() for p in progress):
            time.sleep(0.05)
        results = []
        for _ in range(10):
            before = [int(p.read_text() or 0) for p in progress]
            report = run_group([data], f'[[groups.app.hooks]]\ntype = "sqlite"\ndatabases = ["{db}"]\nbusy_timeout = "10s"', clock)
            assert report.ok and report.snapshot, report.to_json()
            results.append((report.snapshot, before))
            time.sleep(0.05)
    finally:
        for w in writers:
            w.kill()
            w.wait()
    snapdir = BtrfsBackend().snapshot_path(str(data))
    for name, before in results:
        copy = tmp_path / f"{name}.db"
        for suffix in ("", "-wal"):  # what a restore brings back: the database and its WAL, if any
            if (snapdir / name / (db.name + suffix)).exists():
                (tmp_path / (copy.name + suffix)).write_bytes((snapdir / name / (db.name + suffix)).read_bytes())
        with sqlite3.connect(copy) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            for writer, n in enumerate(before):
                found = conn.execute("SELECT count(*) FROM t WHERE writer = ? AND n <= ?", (writer, n)).fetchone()[0]
                assert found == n, f"{name}: writer {writer} had committed {n}, the copy has {found}"


@pytest.fixture
def cgroup() -> Iterator[Path]:
    if not (UNIFIED / "cgroup.procs").exists():
        pytest.skip("no cgroup v2 hierarchy at /sys/fs/cgroup/unified")
    path = UNIFIED / f"snapsync-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    (path / "cgroup.freeze").write_text("0")
    for pid in (path / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while (path / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    path.rmdir()


LOCKSTEP = """
import os, sys
a, b = sys.argv[1], sys.argv[2]
n = 0
while True:
    n += 1
    for path in (a, b):  # each file replaced atomically, a first: at any instant b == a or b == a - 1
        with open(path + ".tmp", "w") as f:
            f.write(str(n))
        os.rename(path + ".tmp", path)
"""


def frozen(path: Path) -> bool:
    return "frozen 1" in (path / "cgroup.events").read_text()


def start_in(cgroup: Path, code: str, *args: str) -> subprocess.Popen[bytes]:
    proc = spawn(code, *args)
    (cgroup / "cgroup.procs").write_text(str(proc.pid))
    return proc


def test_freeze_makes_a_multi_subvolume_btrfs_group_agree(btrfs_root: Path, cgroup: Path) -> None:
    a = make_subvolume(btrfs_root / "persist" / "a")
    b = make_subvolume(btrfs_root / "persist" / "b")
    writer = start_in(cgroup, LOCKSTEP, str(a / "n"), str(b / "n"))
    clock = ManualClock(START)
    try:
        while not (b / "n").exists():
            time.sleep(0.01)
        hook = f'[[groups.app.hooks]]\ntype = "freeze"\ncgroup = "{cgroup}"\nmax_pause = "10s"'
        reports = [run_group([a, b], hook, clock) for _ in range(10)]
    finally:
        writer.kill()
        writer.wait()
    backend = BtrfsBackend()
    values = []
    for report in reports:
        assert report.ok and report.snapshot, report.to_json()
        (h,) = report.hooks
        assert h.status == "ok" and h.paused_seconds is not None
        left = (backend.snapshot_path(str(a)) / report.snapshot / "n").read_text()
        right = (backend.snapshot_path(str(b)) / report.snapshot / "n").read_text()
        values.append((left, right))
    # One instant for both subvolumes: the writer's own invariant holds in every snapshot pair
    # (sequential snapshots without the freeze let b run ahead of a or fall behind by many steps).
    assert all(int(left) - int(right) in (0, 1) for left, right in values), values
    assert len({left for left, _ in values}) > 1, "the writer did not run between snapshots"
    assert not frozen(cgroup)


def test_a_hanging_hook_is_killed_and_the_application_thawed(btrfs_root: Path, cgroup: Path, tmp_path: Path) -> None:
    a = make_subvolume(btrfs_root / "persist" / "a")
    writer = start_in(cgroup, LOCKSTEP, str(a / "n"), str(tmp_path / "n"))
    marker = tmp_path / "grandchild-alive"
    hang = f'["sh", "-c", "(sleep 30; touch {marker}) & sleep 30"]'
    hooks = (f'[[groups.app.hooks]]\ntype = "freeze"\ncgroup = "{cgroup}"\nmax_pause = "20s"\n'
             f'[[groups.app.hooks]]\ntype = "command"\npre = {hang}\ntimeout = "1s"')
    try:
        report = run_group([a], hooks, ManualClock(START))
    finally:
        writer.kill()
        writer.wait()
    assert report.snapshot is None and not report.ok
    assert "killed after 1s" in " ".join(report.errors) and "snapshot skipped" in " ".join(report.errors)
    assert [h.status for h in report.hooks] == ["ok", "failed"]
    assert not frozen(cgroup)
    assert BtrfsBackend().list_snapshots(str(a)) == []
    leftover = subprocess.run(["pgrep", "-f", f"touch {marker}"], capture_output=True, text=True)
    assert leftover.stdout == "", "the hook's background child survived the timeout"


def test_a_killed_snapsync_leaves_nothing_frozen(btrfs_root: Path, cgroup: Path, tmp_path: Path) -> None:
    a = make_subvolume(btrfs_root / "persist" / "a")
    writer = start_in(cgroup, LOCKSTEP, str(a / "n"), str(tmp_path / "n"))
    policy = tmp_path / "p.toml"
    policy.write_text("\n".join([
        "version = 1", "[groups.app]", 'backend = "btrfs"', f'datasets = ["{a}"]', 'interval = "1m"',
        "[[groups.app.hooks]]", 'type = "freeze"', f'cgroup = "{cgroup}"', 'max_pause = "3s"',
        "[[groups.app.hooks]]", 'type = "command"', 'pre = ["sleep", "60"]', 'timeout = "60s"',
    ]) + "\n")
    policy.chmod(0o600)
    run = subprocess.Popen([sys.executable, "-m", "snapsync", "-p", str(policy), "snapshot"], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not frozen(cgroup):
            assert time.monotonic() < deadline, "never froze"
            time.sleep(0.02)
        os.killpg(run.pid, signal.SIGKILL)  # snapsync and its hook command die; no finally runs
        run.wait()
        assert frozen(cgroup)
        deadline = time.monotonic() + 15
        while frozen(cgroup):
            assert time.monotonic() < deadline, "the watchdog did not thaw the cgroup"
            time.sleep(0.1)
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("on_failure", ["abort", "continue"])
def test_failing_pre_command_aborts_or_continues_by_policy(btrfs_root: Path, tmp_path: Path, on_failure: str) -> None:
    a = make_subvolume(btrfs_root / "persist" / "a")
    env_dump = tmp_path / "env"
    pre = f'["sh", "-c", "env | grep ^SNAPSYNC_ > {env_dump}; echo db is down >&2; exit 3"]'
    post = f'["touch", "{tmp_path / "post-ran"}"]'
    hooks = f'[[groups.app.hooks]]\ntype = "command"\npre = {pre}\npost = {post}\non_failure = "{on_failure}"'
    report = run_group([a], hooks, ManualClock(START))
    assert not report.ok and "exited 3: db is down" in " ".join(report.errors)
    env = dict(line.split("=", 1) for line in env_dump.read_text().splitlines())
    assert env["SNAPSYNC_GROUP"] == "app" and env["SNAPSYNC_DATASETS"] == str(a) and env["SNAPSYNC_PHASE"] == "pre"
    assert env["SNAPSYNC_SNAPSHOT"].startswith("snapsync_2026-11-26T00:00:00Z"[:20])
    snaps = BtrfsBackend().list_snapshots(str(a))
    assert (tmp_path / "post-ran").exists()  # post always follows a started pre: it undoes what pre did
    if on_failure == "abort":
        assert report.snapshot is None and snaps == []
    else:
        assert report.snapshot and [s.name for s in snaps] == [report.snapshot]
