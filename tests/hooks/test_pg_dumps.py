"""The postgres hook's dump mode and `snapsync restore-db`, against a real PostgreSQL 15 whose data lives
in a btrfs subvolume: three databases (outline, pocket-id, forgejo) dumped before every snapshot, all
three changed afterwards, and outline alone brought back, from this host's snapshot and from a target,
the other two untouched; restore-db killed at each step leaves the live database as it was, and a rerun
converges. The policy checks of the new keys are here too."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from snapsync.backends.btrfs import BtrfsBackend
from snapsync.errors import PolicyError
from snapsync.ops.hooks import check_dumps
from snapsync.policy.loader import parse_policy
from tests.hooks.pg import PG_BIN, Server, as_postgres, pg_cluster
from tests.replication.helpers import snapsync

DATABASES = ("outline", "pocket-id", "forgejo")


@pytest.fixture
def pg() -> Iterator[tuple[Path, Server]]:
    with pg_cluster("3G") as cluster:  # sparse; a killed restore-db's pg_restore goes on writing a while
        yield cluster


def connect(server: Server, database: str) -> Any:
    return psycopg.connect(f"host={server.socket_dir} port={server.port} user=postgres dbname='{database}'", autocommit=True)


def sql(server: Server, database: str, query: str, args: list[object] | None = None) -> list[tuple[Any, ...]]:
    with connect(server, database) as conn:
        cur = conn.execute(query, args)
        return cur.fetchall() if cur.description else []


def seed(server: Server, rows: int = 0) -> None:
    """Each database with an owner role of its own, per-database privileges and a setting (which a
    restored copy must keep), and a table of items in version v1."""
    for db in DATABASES:
        role = db.replace("-", "_")
        sql(server, "postgres", f'CREATE ROLE "{role}" LOGIN')
        sql(server, "postgres", f'CREATE DATABASE "{db}" OWNER "{role}"')
        sql(server, "postgres", f'REVOKE CONNECT ON DATABASE "{db}" FROM PUBLIC')
        sql(server, "postgres", f'GRANT CONNECT ON DATABASE "{db}" TO "{role}"')
        sql(server, "postgres", f'ALTER DATABASE "{db}" SET search_path TO app, public')
        sql(server, db, f'CREATE SCHEMA app AUTHORIZATION "{role}"')
        sql(server, db, "CREATE TABLE app.items (id int PRIMARY KEY, body text NOT NULL)")
        sql(server, db, "INSERT INTO app.items SELECT i, %s || i FROM generate_series(1, 3) i", [f"{db} v1 #"])
        if rows and db == "outline":
            sql(server, db, "CREATE TABLE app.bulk (id int, pad text)")
            sql(server, db, "INSERT INTO app.bulk SELECT i, md5(i::text) || repeat('x', 200) FROM generate_series(1, %s) i", [rows])


def change_all(server: Server) -> None:
    for db in DATABASES:
        sql(server, db, "UPDATE app.items SET body = replace(body, 'v1', 'v2')")
        sql(server, db, "INSERT INTO app.items VALUES (4, %s)", [f"{db} v2 #4"])


def items(server: Server, db: str) -> list[tuple[Any, ...]]:
    return sql(server, db, "SELECT id, body FROM app.items ORDER BY id")


def oids(server: Server) -> dict[str, int]:
    return {str(n): int(o) for n, o in sql(server, "postgres", "SELECT datname, oid FROM pg_database")}


def write_policy(path: Path, subvolume: Path, server: Server, *, dump: str = '"all"', targets: str = "", extra: str = "") -> Path:
    path.write_text(f"""
version = 1
[defaults]
interval = "1m"
[defaults.retention]
keep_last = 100
[groups.db]
backend = "btrfs"
datasets = ["{subvolume}"]
targets = [{'"nas"' if targets else ''}]
[[groups.db.hooks]]
type = "postgres"
dsn = "{server.dsn}"
dump = {dump}
dump_dir = "{subvolume}/dumps"
bin_dir = "{PG_BIN}"
{extra}
{targets}
""")
    path.chmod(0o600)
    return path


def cli(policy: Path, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = snapsync("-p", str(policy), *args)
    assert done.returncode == expect, f"snapsync {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def take(policy: Path) -> str:
    report = json.loads(cli(policy, "snapshot", "--json").stdout)["groups"][0]
    assert report["snapshot"], report
    return str(report["snapshot"])


def test_outline_alone_comes_back_from_the_snapshot_pocket_id_and_forgejo_untouched(pg: tuple[Path, Server], tmp_path: Path) -> None:
    subvolume, server = pg
    seed(server)
    policy = write_policy(tmp_path / "policy.toml", subvolume, server)
    snapshot = take(policy)

    home = subvolume / "dumps"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 and home.stat().st_uid == 0
    snapdir = BtrfsBackend().snapshot_path(str(subvolume)) / snapshot
    for db in DATABASES:
        dump = snapdir / "dumps" / f"{db}.dump"
        assert stat.S_IMODE(dump.stat().st_mode) == 0o600 and dump.stat().st_uid == 0, dump
    manifest = json.loads((snapdir / "dumps" / "snapsync-dumps.json").read_text())
    assert set(manifest["databases"]) >= set(DATABASES) and manifest["snapshot"] == snapshot
    assert not [p for p in (snapdir / "dumps").iterdir() if p.name.endswith(".partial")]
    hook = parse_policy(policy.read_text(), str(policy)).groups["db"].hooks[0]
    assert hook.type == "postgres"
    checked = check_dumps(hook, snapdir / "dumps")  # what a drill checks of a restored copy
    assert checked.ok, checked.detail

    change_all(server)
    before = oids(server)
    new = {db: items(server, db) for db in DATABASES}
    with connect(server, "outline"):  # the service still connected: refused, nothing changed
        refused = cli(policy, "restore-db", "db", snapshot, "outline", expect=2)
    assert "outline is in use" in refused.stderr and "--terminate" in refused.stderr, refused.stderr
    assert oids(server) == before

    planned = cli(policy, "restore-db", "db", snapshot, "outline", "--dry-run").stdout
    assert "would restore database outline" in planned and "rename outline to outline_before_" in planned, planned
    assert oids(server) == before

    done = cli(policy, "restore-db", "db", snapshot, "outline", "--json")
    report = json.loads(done.stdout)
    assert report["ok"] and report["tables"] == 1 and report["kept_as"].startswith("outline_before_"), report

    assert items(server, "outline") == [(i, f"outline v1 #{i}") for i in (1, 2, 3)]
    for db in ("pocket-id", "forgejo"):
        assert items(server, db) == new[db]  # the new data, in the very same database
    after = oids(server)
    assert {db: after[db] for db in ("pocket-id", "forgejo")} == {db: before[db] for db in ("pocket-id", "forgejo")}
    assert after["outline"] != before["outline"] and after[report["kept_as"]] == before["outline"]
    assert items(server, report["kept_as"]) == new["outline"]  # the state it replaced, kept
    assert "outline_snapsync_restore" not in after
    # what pg_restore without --create leaves out, made like the live database
    made = "SELECT pg_get_userbyid(datdba), datacl::text[], encoding, datcollate, dattablespace FROM pg_database WHERE datname = %s"
    row = sql(server, "postgres", made, ["outline"])[0]
    assert row == sql(server, "postgres", made, [report["kept_as"]])[0] and row[0] == "outline", row
    assert "=T/outline" in row[1]  # PUBLIC may no longer connect, as on the live database
    assert sql(server, "outline", "SHOW search_path") == [("app, public",)]
    with pytest.raises(psycopg.OperationalError, match="does not have CONNECT privilege"):
        psycopg.connect(f"host={server.socket_dir} port={server.port} user=forgejo dbname=outline").close()


def test_from_a_target_the_local_snapshot_gone(pg: tuple[Path, Server], tmp_path: Path, target_root: Path) -> None:
    subvolume, server = pg
    seed(server)
    policy = write_policy(tmp_path / "policy.toml", subvolume, server, targets=f'[targets.nas]\ntype = "local"\npath = "{target_root}"')
    snapshot = take(policy)
    cli(policy, "replicate")
    (drill,) = json.loads(cli(policy, "drill", "--json").stdout)["drills"]  # the copy on nas carries readable dumps
    dumps = [c for c in drill["checks"] if c["check"].startswith("postgres dumps")]
    assert drill["ok"] and len(dumps) == 1 and dumps[0]["ok"], drill
    assert all(db in dumps[0]["detail"] for db in DATABASES) and "readable" in dumps[0]["detail"], dumps
    change_all(server)
    new_forgejo = items(server, "forgejo")
    as_postgres(str(PG_BIN / "psql"), "-h", str(server.socket_dir), "-p", str(server.port), "-U", "postgres", "-c", 'DROP DATABASE "pocket-id"')

    done = cli(policy, "restore-db", "db", snapshot, "pocket-id", "--from", "nas", "--scratch", str(tmp_path))
    assert "from nas" in done.stdout or "(nas:" in done.stdout, done.stdout
    assert items(server, "pocket-id") == [(i, f"pocket-id v1 #{i}") for i in (1, 2, 3)]  # dropped, and back
    assert items(server, "forgejo") == new_forgejo
    owner = sql(server, "postgres", "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'pocket-id'")
    assert owner == [("pocket_id",)]  # no live one to copy: the owner the dump names


def test_a_failed_dump_fails_the_hook_and_keeps_the_previous_dump(pg: tuple[Path, Server], tmp_path: Path) -> None:
    subvolume, server = pg
    seed(server)
    policy = write_policy(tmp_path / "policy.toml", subvolume, server, dump='["outline", "forgejo"]')
    take(policy)
    dumps = subvolume / "dumps"
    first = (dumps / "forgejo.dump").read_bytes()
    (dumps / ".outline.dump.partial").write_bytes(b"half a dump from a run killed outright")
    write_policy(policy, subvolume, server, dump='["outline", "forgejo", "nope"]')
    sql(server, "postgres", 'ALTER DATABASE "forgejo" RENAME TO "forgejo-moved"')
    failed = json.loads(cli(policy, "snapshot", "--json", expect=1).stdout)["groups"][0]
    assert failed["snapshot"] is None  # on_failure = "abort": no snapshot claims dumps it lacks
    (hook,) = failed["hooks"]
    assert hook["status"] == "failed" and "2 of 3" in hook["message"] and "nope" in hook["message"], hook
    assert (dumps / "forgejo.dump").read_bytes() == first  # the previous dump, kept
    assert not [p for p in dumps.iterdir() if p.name.endswith(".partial")]
    manifest = json.loads((dumps / "snapsync-dumps.json").read_text())["databases"]
    assert "failed" in manifest["forgejo"] and "failed" not in manifest["outline"] and "nope" not in manifest

    sql(server, "postgres", 'ALTER DATABASE "forgejo-moved" RENAME TO "forgejo"')
    write_policy(policy, subvolume, server, dump='["outline", "forgejo", "nope"]', extra='on_failure = "continue"')
    went = json.loads(cli(policy, "snapshot", "--json", expect=1).stdout)["groups"][0]
    assert went["snapshot"] and went["hooks"][0]["status"] == "failed"
    write_policy(policy, subvolume, server, dump='["outline"]')
    take(policy)
    assert sorted(p.name for p in dumps.iterdir()) == ["outline.dump", "snapsync-dumps.json"]  # forgejo's: no longer dumped


@pytest.mark.parametrize("step", ["created", "restoring"])
def test_restore_db_killed_midway_leaves_the_live_database_and_a_rerun_converges(
    pg: tuple[Path, Server], tmp_path: Path, step: str
) -> None:
    subvolume, server = pg
    seed(server, rows=400_000)  # enough that pg_restore takes a while
    policy = write_policy(tmp_path / "policy.toml", subvolume, server, dump='["outline"]')
    snapshot = take(policy)
    change_all(server)
    sql(server, "outline", "DELETE FROM app.bulk WHERE id % 2 = 0")
    before = oids(server)["outline"]
    new = items(server, "outline")

    proc = subprocess.Popen([sys.executable, "-m", "snapsync", "-p", str(policy), "restore-db", "db", snapshot, "outline"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wanted = {
        "created": "SELECT 1 FROM pg_database WHERE datname = 'outline_snapsync_restore'",
        "restoring": "SELECT 1 FROM pg_stat_activity WHERE datname = 'outline_snapsync_restore' AND application_name = 'pg_restore'",
    }[step]
    deadline = time.monotonic() + 120
    while not sql(server, "postgres", wanted):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.monotonic() + 10  # its pg_restore dies with it, not writing on for hours
    while sql(server, "postgres", "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg_restore'"):
        assert time.monotonic() < deadline, "pg_restore outlived restore-db"
        time.sleep(0.05)

    assert oids(server)["outline"] == before and items(server, "outline") == new  # the live database, as it was
    assert sql(server, "outline", "SELECT count(*) FROM app.bulk") == [(200_000,)]
    done = cli(policy, "restore-db", "db", snapshot, "outline")
    assert "dropped outline_snapsync_restore, the work copy an interrupted run left" in done.stdout, done.stdout
    assert items(server, "outline") == [(i, f"outline v1 #{i}") for i in (1, 2, 3)]
    assert sql(server, "outline", "SELECT count(*) FROM app.bulk") == [(400_000,)]
    names = set(oids(server))
    assert "outline_snapsync_restore" not in names and len([n for n in names if n.startswith("outline_before_")]) == 1


def test_a_database_of_ours_is_never_dropped_unless_marked(pg: tuple[Path, Server], tmp_path: Path) -> None:
    subvolume, server = pg
    seed(server)
    policy = write_policy(tmp_path / "policy.toml", subvolume, server, dump='["outline"]')
    snapshot = take(policy)
    sql(server, "postgres", 'CREATE DATABASE "outline_snapsync_restore"')
    refused = cli(policy, "restore-db", "db", snapshot, "outline", expect=2)
    assert "that snapsync did not make" in refused.stderr
    missing = cli(policy, "restore-db", "db", snapshot, "forgejo", expect=2)
    assert "holds no dump of database 'forgejo'" in missing.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and len(missing.stderr.strip().splitlines()) == 1


POLICY = """version = 1
[groups.db]
backend = "btrfs"
datasets = ["/persist/system/var/lib/postgresql"]
[[groups.db.hooks]]
type = "postgres"
"""


@pytest.mark.parametrize(("keys", "where", "problem"), [
    ('dump = "outline"\ndump_dir = "/persist/system/var/lib/postgresql/dumps"', "hooks[0].dump", 'expected "all" or a list'),
    ('dump = ["a", "a"]\ndump_dir = "/persist/system/var/lib/postgresql/dumps"', "hooks[0].dump[1]", "listed twice"),
    ('dump = []\ndump_dir = "/persist/system/var/lib/postgresql/dumps"', "hooks[0].dump", "non-empty"),
    (f'dump = ["{"x" * 64}"]\ndump_dir = "/persist/system/var/lib/postgresql/dumps"', "hooks[0].dump[0]", "at most 63 bytes"),
    ('dump = ["a"]', "hooks[0].dump_dir", "missing required key"),
    ('dump_dir = "/persist/system/var/lib/postgresql/dumps"', "hooks[0].dump", "need dump"),
    ('dump = ["a"]\ndump_dir = "/persist/dumps"', "hooks[0].dump_dir", "not inside any dataset of the group"),
    ('dump = ["a"]\ndump_dir = "/persist/system/var/lib/postgresql"', "hooks[0].dump_dir", "a dataset itself"),
    ('dump = ["a"]\ndump_dir = "/persist/system/var/lib/postgresql/15/d"\ndata_dir = "/persist/system/var/lib/postgresql/15"',
     "hooks[0].dump_dir", "inside data_dir"),
    ('dump = "all"\ndump_dir = "relative"', "hooks[0].dump_dir", "absolute path"),
])
def test_dump_keys_are_checked(keys: str, where: str, problem: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse_policy(POLICY + keys, "policy.toml")
    assert f"policy.toml: groups.db.{where}: " in str(e.value) and problem in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_dump_all_round_trips() -> None:
    policy = parse_policy(POLICY + 'dump = "all"\ndump_dir = "/persist/system/var/lib/postgresql/dumps"', "p")
    hook = policy.groups["db"].hooks[0]
    assert hook.type == "postgres" and hook.dumps_all and hook.dump_limit.total_seconds() == 1800
    again = parse_policy(policy.to_toml(), "p").groups["db"].hooks[0]
    assert again == hook and 'dump = "all"' in policy.to_toml()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_snapshot_run_stopped_mid_dump_leaves_the_previous_dump_and_no_half_one(
    pg: tuple[Path, Server], tmp_path: Path, sig: signal.Signals
) -> None:
    subvolume, server = pg
    seed(server, rows=400_000)
    policy = write_policy(tmp_path / "policy.toml", subvolume, server, dump='["outline"]')
    first = take(policy)
    dumps = subvolume / "dumps"
    previous = (dumps / "outline.dump").read_bytes()
    change_all(server)

    proc = subprocess.Popen([sys.executable, "-m", "snapsync", "-p", str(policy), "snapshot", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not sql(server, "postgres", "SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg_dump'"):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig)
    assert (dumps / "outline.dump").read_bytes() == previous  # the complete previous dump, never a half one
    if sig == signal.SIGTERM:  # its pg_dump killed and its temporary file gone on the way out
        assert not [p for p in dumps.iterdir() if p.name.endswith(".partial")]
    listed = json.loads(cli(policy, "list", "--local", "--json").stdout)["groups"][0]["datasets"][0]["snapshots"]
    assert [s["name"] for s in listed] == [first]

    again = take(policy)  # a dump killed outright leaves a temporary file: the next run sweeps it first
    copy = BtrfsBackend().snapshot_path(str(subvolume)) / again / "dumps"
    assert sorted(p.name for p in copy.iterdir()) == ["outline.dump", "snapsync-dumps.json"]
    assert (copy / "outline.dump").read_bytes() != previous


def test_without_dumps_outline_comes_back_from_the_snapshots_cluster(pg: tuple[Path, Server], tmp_path: Path) -> None:
    """A group snapshotted before `dump` was set: the snapshot's own cluster is started on a side port
    from a copy, outline dumped from it and restored as from a dump; the snapshot stays as it was."""
    subvolume, server = pg
    seed(server)
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
version = 1
[groups.db]
backend = "btrfs"
datasets = ["{subvolume}"]
interval = "1m"
[[groups.db.hooks]]
type = "postgres"
dsn = "{server.dsn}"
data_dir = "{subvolume}/data"
""")
    policy.chmod(0o600)
    snapshot = take(policy)
    change_all(server)
    before = oids(server)
    new = {db: items(server, db) for db in DATABASES}

    private = cli(policy, "restore-db", "db", snapshot, "outline", "--dry-run", "--scratch", str(tmp_path), expect=1).stderr
    assert "must be able to reach" in private and "--scratch" in private, private  # /tmp/pytest-of-root is 0700
    room = subvolume.parent.parent  # where the postgres user can go
    planned = cli(policy, "restore-db", "db", snapshot, "outline", "--dry-run", "--scratch", str(room)).stdout
    assert "dumped from its cluster" in planned and oids(server) == before, planned
    done = cli(policy, "restore-db", "db", snapshot, "outline", "--scratch", str(room))
    assert "dumped from its cluster, started on a side port" in done.stdout, done.stdout
    assert items(server, "outline") == [(i, f"outline v1 #{i}") for i in (1, 2, 3)]
    for db in ("pocket-id", "forgejo"):
        assert items(server, db) == new[db] and oids(server)[db] == before[db]
    assert sql(server, "outline", "SHOW search_path") == [("app, public",)]
    assert not list(room.glob("snapsync-db-*")) and not list(tmp_path.glob("snapsync-db-*"))  # all gone
    snapdir = BtrfsBackend().snapshot_path(str(subvolume)) / snapshot
    assert (snapdir / "data" / "postmaster.pid").exists()  # the snapshot itself untouched (read-only)
