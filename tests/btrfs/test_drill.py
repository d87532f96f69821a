"""Restore drills on real btrfs: pass on good backups, fail loudly on a damaged one, and a PostgreSQL
group restored from offsite starts and answers its check query."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import make_subvolume
from tests.promtext import Metrics
from tests.replication.helpers import copies_dir, run_json, snapsync, write_policy
from tests.sshd import Sshd

pytestmark = pytest.mark.btrfs


@pytest.fixture
def scratch_parent() -> Iterator[Path]:
    """Like /var/tmp: a place a database server (not root) can reach."""
    base = Path(tempfile.mkdtemp(prefix="snapsync-drill-test-", dir="/var/tmp"))
    base.chmod(0o755)
    yield base
    base.rmdir()


@pytest.fixture
def state(tmp_path: Path) -> dict[str, str]:
    return {"SNAPSYNC_STATE_DIR": str(tmp_path / "state")}


def sqlite_site(btrfs_root: Path, target_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    app = make_subvolume(btrfs_root / "persist" / "hass", "config\n")
    db = app / "home-assistant_v2.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE states (id INTEGER PRIMARY KEY, value TEXT)")
        conn.executemany("INSERT INTO states (value) VALUES (?)", [(f"v{i}",) for i in range(500)])
    conn.close()
    os.mkfifo(app / "spool.fifo")  # a mail spool's FIFO: compared by type, never opened
    key = tmp_path / "offsite.key"
    snapsync("keygen", str(key), check=True)
    nas = target_root / "nas"
    nas.mkdir()
    policy = write_policy(tmp_path / "p.toml", [app], {
        "usb": f'type = "local"\npath = "{target_root}"',
        "nas": f'type = "dir"\npath = "{nas}"\nkey_file = "{key}"',
    })
    policy.write_text(policy.read_text().replace(
        "[targets.usb]", f'[[groups.app.hooks]]\ntype = "sqlite"\ndatabases = ["{db}"]\n[targets.usb]'
    ))
    run_json("-p", str(policy), "run")
    return policy, app


def test_drills_pass_on_good_backups_and_are_recorded(
    btrfs_root: Path, target_root: Path, tmp_path: Path, scratch_parent: Path, state: dict[str, str]
) -> None:
    policy, app = sqlite_site(btrfs_root, target_root, tmp_path)
    result = run_json("-p", str(policy), "drill", "--scratch", str(scratch_parent), env=state)
    drills = {d["target"]: d for d in result["drills"]}
    assert set(drills) == {"usb", "nas"}
    for d in drills.values():
        assert d["ok"], d
        checks = {c["check"]: c for c in d["checks"]}
        assert checks[f"files {app}"]["detail"].endswith("files identical to the source snapshot")
        assert checks[f"sqlite {app}/home-assistant_v2.db"]["detail"] == "integrity_check ok"
        recorded = json.loads((Path(state["SNAPSYNC_STATE_DIR"]) / "drills" / f"app.{d['target']}.json").read_text())
        assert recorded["ok"] and recorded["snapshot"] == d["snapshot"]
    assert not [m for m in Path("/proc/mounts").read_text().splitlines() if "snapsync-drill" in m]
    assert list(scratch_parent.iterdir()) == []  # cleaned up
    metrics = Metrics(Path(state["SNAPSYNC_STATE_DIR"]) / "metrics" / "snapsync.prom")
    for name, d in drills.items():
        assert metrics.one("snapsync_drill_ok", group="app", target=name) == 1
        assert metrics.one("snapsync_drill_restored_bytes", group="app", target=name) == d["restored_bytes"] > 0
        assert metrics.one("snapsync_drill_last_success_timestamp_seconds", group="app", target=name) > 0
        assert metrics.one("snapsync_failures_total", group="app", target=name, kind="drill") == 0


def test_a_drill_fails_loudly_on_a_changed_copy_and_on_a_damaged_chunk(
    btrfs_root: Path, target_root: Path, tmp_path: Path, scratch_parent: Path, state: dict[str, str]
) -> None:
    policy, app = sqlite_site(btrfs_root, target_root, tmp_path)
    (copy,) = [p for p in copies_dir(target_root, "app", app).iterdir() if not p.name.startswith(".")]
    subprocess.run(["btrfs", "property", "set", "-f", "-ts", str(copy), "ro", "false"], check=True)
    (copy / "data.txt").write_text("bit rot\n")
    subprocess.run(["btrfs", "property", "set", "-ts", str(copy), "ro", "true"], check=True)
    chunk = next((target_root / "nas").rglob("chunk-000000"))
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 1
    chunk.write_bytes(bytes(data))

    proc = snapsync("-p", str(policy), "drill", "--scratch", str(scratch_parent), "--json", env=state)
    assert proc.returncode == 1
    drills = {d["target"]: d for d in json.loads(proc.stdout)["drills"]}
    usb = {c["check"]: c for c in drills["usb"]["checks"]}
    assert not drills["usb"]["ok"] and not usb[f"files {app}"]["ok"] and "data.txt" in usb[f"files {app}"]["detail"]
    assert not drills["nas"]["ok"] and "chunk-000000" in drills["nas"]["error"]
    assert usb[f"sqlite {app}/home-assistant_v2.db"]["ok"]
    text = snapsync("-p", str(policy), "--log-format", "json", "drill", "--scratch", str(scratch_parent), "--target", "usb", env=state)
    assert text.returncode == 1 and "FAILED" in text.stdout and "1 differ (data.txt)" in text.stdout
    (event,) = [e for e in map(json.loads, text.stderr.splitlines()) if e.get("event") == "drill"]
    assert (event["group"], event["target"], event["ok"], event["level"]) == ("app", "usb", False, "warning")
    assert "1 differ (data.txt)" in event["msg"]
    metrics = Metrics(Path(state["SNAPSYNC_STATE_DIR"]) / "metrics" / "snapsync.prom")
    assert metrics.one("snapsync_drill_ok", group="app", target="usb") == 0
    assert metrics.one("snapsync_failures_total", group="app", target="usb", kind="drill") == 2
    assert metrics.one("snapsync_failures_total", group="app", target="nas", kind="drill") == 1
    assert metrics.get("snapsync_drill_last_success_timestamp_seconds", group="app", target="usb") is None
    checked = snapsync("-p", str(policy), "check", env=state)
    assert checked.returncode == 1, checked.stdout
    assert "app drill from usb: last drill" in checked.stdout and "app drill from nas: last drill" in checked.stdout


def test_a_postgres_group_restored_from_offsite_starts_and_answers_its_check_query(
    tmp_path: Path, scratch_parent: Path, state: dict[str, str]
) -> None:
    from snapsync.backends.scratch import scratch_btrfs
    from tests.hooks.pg import Writer, init_server, pg_unavailable

    if pg_unavailable():
        if os.environ.get("SNAPSYNC_REQUIRE_BTRFS") == "1":
            pytest.fail(f"postgres tier required: {pg_unavailable()}")
        pytest.skip(pg_unavailable() or "")
    base = Path(tempfile.mkdtemp(prefix="snapsync-pg-drill-", dir="/var/tmp"))
    base.chmod(0o755)
    try:
        with scratch_btrfs("1G", parent=str(base), label="snapsync-pg-drill") as mnt:
            mnt.parent.chmod(0o755)
            mnt.chmod(0o755)
            pg = make_subvolume(mnt / "postgresql")
            server = init_server(pg, 55433)
            try:
                with Writer(server.dsn) as writer:
                    key = tmp_path / "offsite.key"
                    snapsync("keygen", str(key), check=True)
                    nas = tmp_path / "nas"
                    nas.mkdir()
                    policy = write_policy(tmp_path / "p.toml", [pg], {"nas": f'type = "dir"\npath = "{nas}"\nkey_file = "{key}"'})
                    policy.write_text(policy.read_text().replace("[targets.nas]", "\n".join([
                        "[[groups.app.hooks]]", 'type = "postgres"', f'dsn = "{server.dsn}"',
                        f'data_dir = "{server.data}"', 'check_query = "SELECT count(*) FROM ledger"', "[targets.nas]",
                    ])))
                    committed = writer.committed_now()  # committed before the snapshot was taken
                    run_json("-p", str(policy), "run")
            finally:
                server.stop()
            result = run_json("-p", str(policy), "drill", "--scratch", str(scratch_parent), env=state)
    finally:
        base.rmdir()
    (d,) = result["drills"]
    checks = {c["check"]: c for c in d["checks"]}
    pg_check = checks[f"postgres {server.data}"]
    assert d["ok"] and pg_check["ok"], d
    answered = int(pg_check["detail"].rpartition("(")[2].rstrip(",)"))
    assert answered >= committed > 0  # every transaction committed before the snapshot survived


def test_a_database_missing_from_the_backup_fails_the_drill(
    btrfs_root: Path, target_root: Path, tmp_path: Path, scratch_parent: Path, state: dict[str, str]
) -> None:
    policy, app = sqlite_site(btrfs_root, target_root, tmp_path)
    policy.write_text(policy.read_text().replace("home-assistant_v2.db", "never-existed.db"))
    proc = snapsync("-p", str(policy), "drill", "--target", "usb", "--scratch", str(scratch_parent), "--json", env=state)
    assert proc.returncode == 1
    (d,) = json.loads(proc.stdout)["drills"]
    checks = {c["check"]: c for c in d["checks"]}
    assert checks[f"sqlite {app}/never-existed.db"] == {"check": f"sqlite {app}/never-existed.db", "ok": False, "detail": "missing from the restored copy"}


def test_a_drill_from_an_ssh_push_target_reads_through_the_receive_key_that_may_restore(
    btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path, scratch_parent: Path, state: dict[str, str]
) -> None:
    """The weekly drill of an ssh backup host: with the documented receive line it can read its copies
    back; without --allow-restore it fails with one line naming it, and `check` says the same."""
    app = make_subvolume(btrfs_root / "persist" / "app", "config\n")
    (app / "blob.bin").write_bytes(os.urandom(300_000))
    sshd.authorize(sshd.forced(target_root, "receive", "--append-only"))  # a receive key, no restore
    policy = write_policy(tmp_path / "p.toml", [app], {"nas": sshd.target_table(target_root)})
    run_json("-p", str(policy), "run", env=state)

    proc = snapsync("-p", str(policy), "drill", "--scratch", str(scratch_parent), "--json", env=state)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (d,) = json.loads(proc.stdout)["drills"]
    assert not d["ok"] and d["checks"] == [] and "\n" not in d["error"], d
    assert "may only receive copies, not read them back: add --allow-restore" in d["error"], d["error"]
    checked = snapsync("-p", str(policy), "check", env=state)
    assert checked.returncode == 1 and "--allow-restore" in checked.stdout, checked.stdout
    restored = snapsync("-p", str(policy), "restore", "app", "--from", "nas", "--to", str(btrfs_root / "r"), env=state)
    assert restored.returncode == 1 and "--allow-restore" in restored.stderr and len(restored.stderr.strip().splitlines()) == 1
    assert list(scratch_parent.iterdir()) == []

    sshd.authorize(sshd.forced(target_root, "receive", "--append-only", "--allow-restore"))
    (d,) = run_json("-p", str(policy), "drill", "--scratch", str(scratch_parent), env=state)["drills"]
    assert d["ok"] and d["restored_bytes"] > 300_000, d
    assert {c["check"]: c["detail"] for c in d["checks"]}[f"files {app}"].endswith("files identical to the source snapshot")
    checked = snapsync("-p", str(policy), "check", env=state)
    assert checked.returncode == 0, checked.stdout
    (btrfs_root / "r").mkdir()
    run_json("-p", str(policy), "restore", "app", "--from", "nas", "--to", str(btrfs_root / "r"), env=state)
    assert (copies_dir(btrfs_root / "r", "app", app) / d["snapshot"] / "blob.bin").read_bytes() == (app / "blob.bin").read_bytes()
    time.sleep(1.05)
    (app / "config.txt").write_text("v2\n")
    run_json("-p", str(policy), "run", env=state)  # the same line still receives

    sshd.authorize(sshd.forced(target_root, "send"))  # or a send-role line on the same root
    (d,) = run_json("-p", str(policy), "drill", "--scratch", str(scratch_parent), env=state)["drills"]
    assert d["ok"], d
    assert not [m for m in Path("/proc/mounts").read_text().splitlines() if "snapsync-drill" in m]
    assert list(scratch_parent.iterdir()) == []
