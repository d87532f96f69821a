"""The postgres hook on ZFS, inside the guest: PGDATA and its WAL in two datasets of one group.

ZFS snapshots both datasets in one txg, so the pair is one instant even though the WAL lives apart
from the data directory (`initdb -X`). Under a continuous insert load, every group snapshot is cloned
(both datasets), started as a second server, and must recover with every transaction that committed
before the snapshot, and a clean pg_amcheck.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from snapsync.clock import ManualClock
from snapsync.policy.loader import parse_policy
from snapsync.ops.runner import Runner
from tests.hooks.pg import PG_BIN, Server, Writer, as_postgres, chown_postgres, pg_unavailable

POOL = os.environ.get("SNAPSYNC_ZFS_POOL", "")
pytestmark = pytest.mark.skipif(not POOL or pg_unavailable() is not None,
                                reason="needs SNAPSYNC_ZFS_POOL and PostgreSQL 15 (the vm-tests guest has both)")
SNAPSHOTS = 5


def zfs(*args: str) -> None:
    subprocess.run(["zfs", *args], check=True, capture_output=True)


@pytest.fixture
def pg_on_zfs() -> Iterator[tuple[str, str, Server]]:
    tag = uuid.uuid4().hex[:6]
    top = Path(f"/srv/pg-{tag}")
    data_ds, wal_ds = f"{POOL}/pg-{tag}/data", f"{POOL}/pg-{tag}/wal"
    zfs("create", "-o", f"mountpoint={top}", f"{POOL}/pg-{tag}")
    zfs("create", data_ds)
    zfs("create", wal_ds)
    for d in (top, top / "data", top / "wal"):
        chown_postgres(d)
    (top / "sock").mkdir()
    chown_postgres(top / "sock")
    as_postgres(str(PG_BIN / "initdb"), "-D", str(top / "data" / "pg"), "-X", str(top / "wal" / "pg_wal"),
                "-U", "postgres", "--auth=trust", "--data-checksums", "-N", timeout=600)
    server = Server(top / "data" / "pg", top / "sock", 54400)
    server.start()
    try:
        yield data_ds, wal_ds, server
    finally:
        server.stop()
        subprocess.run(["zfs", "destroy", "-r", "-f", f"{POOL}/pg-{tag}"], capture_output=True)


def restored(data_ds: str, wal_ds: str, snapshot: str, committed_before: int) -> int:
    """Clone both datasets at ``snapshot``, point the data directory at the cloned WAL, start, count."""
    import psycopg

    tag = uuid.uuid4().hex[:6]
    top = Path(f"/srv/clone-{tag}")
    zfs("create", "-o", f"mountpoint={top}", "-o", "canmount=off", f"{POOL}/clone-{tag}")
    zfs("clone", "-o", f"mountpoint={top}/data", f"{data_ds}@{snapshot}", f"{POOL}/clone-{tag}/data")
    zfs("clone", "-o", f"mountpoint={top}/wal", f"{wal_ds}@{snapshot}", f"{POOL}/clone-{tag}/wal")
    try:
        data = top / "data" / "pg"
        (data / "postmaster.pid").unlink(missing_ok=True)
        (data / "pg_wal").unlink()  # initdb -X made it a symlink to the live WAL
        (data / "pg_wal").symlink_to(top / "wal" / "pg_wal")
        (top / "sock").mkdir()
        chown_postgres(top / "sock")
        server = Server(data, top / "sock", 54401)
        server.start()
        try:
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                row = conn.execute("SELECT count(*) FROM ledger WHERE id <= %s", [committed_before]).fetchone()
            amcheck = as_postgres(str(PG_BIN / "pg_amcheck"), "-h", str(top / "sock"), "-p", "54401", "-U", "postgres",
                                  "--install-missing", "--heapallindexed", "--all", check=False, timeout=600)
            assert amcheck.returncode == 0, amcheck.stdout + amcheck.stderr
            assert "database system was interrupted" in server.log(), server.log()
            return int(row[0]) if row else -1
        finally:
            server.stop()
    finally:
        subprocess.run(["zfs", "destroy", "-r", "-f", f"{POOL}/clone-{tag}"], capture_output=True)


def test_pgdata_and_wal_in_two_datasets_restore_from_every_group_snapshot(pg_on_zfs: tuple[str, str, Server]) -> None:
    data_ds, wal_ds, server = pg_on_zfs
    text = "\n".join([
        "version = 1", "[defaults.retention]", "keep_last = 100", "[groups.db]", 'backend = "zfs"',
        f'datasets = ["{data_ds}", "{wal_ds}"]', 'interval = "1m"', "[[groups.db.hooks]]", 'type = "postgres"',
        f'dsn = "{server.dsn}"', 'timeout = "60s"',
    ]) + "\n"
    clock = ManualClock(datetime(2026, 11, 26, tzinfo=UTC))
    runner = Runner(parse_policy(text, "<test>"), clock)
    taken = []
    with Writer(server.dsn) as writer:
        for _ in range(SNAPSHOTS):
            before = writer.committed_now()
            (report,) = runner.run(list(runner.policy.groups.values()), take=True, only_due=False, prune=False)
            assert report.ok and report.snapshot, report.to_json()
            taken.append((report.snapshot, before))
            clock.advance(timedelta(minutes=1))
        assert writer.error is None
    assert taken[-1][1] > taken[0][1]
    for name, before in taken:
        assert restored(data_ds, wal_ds, name, before) == before, name
