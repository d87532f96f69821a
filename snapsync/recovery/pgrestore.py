"""``snapsync restore-db``: one PostgreSQL database back as a snapshot had it, the rest of the server untouched.

Rolling back a group takes the whole cluster back (every database, and the service's other files);
a bad migration in one application's database asks for less. The postgres hook's ``dump`` mode leaves
a ``pg_dump -Fc`` of each database in every snapshot (:func:`snapsync.ops.hooks.dump_databases`); this
module puts one of them back into the live server:

1. find the dump: in the local snapshot (the backend's ``snapshot_files``), or, ``--from`` a target, in
   a copy of the group restored into a throwaway place first (the backend's ``scratch``, as a drill);
2. check it: ``pg_restore --list`` reads it, and it is a dump of that database;
3. restore it into a new database, ``<db>_snapsync_restore``, made like the live one (owner, encoding,
   locale, tablespace, privileges, per-database settings) and marked as snapsync's by its comment,
   with ``pg_restore --single-transaction --exit-on-error``: all of it or nothing;
4. verify it: every table of the dump is there;
5. swap the names in one transaction: the live database becomes ``<db>_before_<time>`` (kept, to
   compare or go back to; drop it when satisfied), the restored one becomes ``<db>``.

Nothing touches the live database before step 5, and step 5 is one transaction: an interruption at any
point (even SIGKILL) leaves the live database as it was, or restored. A work database an interrupted
run left is recognised by its comment and replaced by the next run. Sessions still connected to the
database stop the swap (the service must be stopped: a restore under a running application races
with it) unless ``terminate``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from snapsync.backends.base import StorageBackend
from snapsync.errors import BackendError, IntegrityError, SnapsyncError, UsageError
from snapsync.ops.hooks import (
    RESTORE_WORK_MARK,
    PgServer,
    dump_file,
    pg_executable,
    pg_program,
    read_dump_manifest,
    run_client,
    server_binaries,
    side_server,
)
from snapsync.policy.schema import Group, Policy, PostgresHook

WORK_MARK = RESTORE_WORK_MARK
PG_NAME_MAX = 63
RENAME_ATTEMPTS = 3


@dataclass
class DbRestoreReport:
    group: str
    snapshot: str
    database: str
    source: str
    """"local" (this host's snapshot) or the target it was restored from."""
    dry_run: bool
    dump: str = ""
    """The dump read, as the policy names its place (``<dump_dir>/<file>``)."""
    dumped_at: str | None = None
    stale: str | None = None
    """Set when the dump at this snapshot had failed and the previous one is what the snapshot holds."""
    tables: int = 0
    work: str = ""
    kept_as: str | None = None
    """The live database's new name, or None when there was none (it had been dropped)."""
    steps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group, "snapshot": self.snapshot, "database": self.database, "source": self.source,
            "dry_run": self.dry_run, "ok": True, "dump": self.dump, "dumped_at": self.dumped_at, "stale": self.stale,
            "tables": self.tables, "work": self.work, "kept_as": self.kept_as, "steps": self.steps,
            "notes": self.notes, "seconds": round(self.seconds, 3),
        }


def derived_name(database: str, suffix: str) -> str:
    """``<database><suffix>``, or, where that would pass PostgreSQL's 63 bytes (and be cut short by the
    server, maybe onto another database's name), ``snapsync_<hash of database><suffix>``."""
    name = database + suffix
    if len(name.encode()) <= PG_NAME_MAX:
        return name
    return f"snapsync_{hashlib.sha256(database.encode()).hexdigest()[:16]}{suffix}"


def postgres_hooks(group: Group, index: int | None) -> list[tuple[int, PostgresHook]]:
    """The group's postgres hooks that leave something to restore one database from (``dump``, or
    ``data_dir`` for the cluster's files), or the one ``--hook`` names."""
    hooks = [(i, h) for i, h in enumerate(group.hooks) if isinstance(h, PostgresHook) and (h.dump is not None or h.data_dir is not None)]
    if index is not None:
        hooks = [(i, h) for i, h in hooks if i == index]
        if not hooks:
            raise UsageError(f"group {group.name}: hooks[{index}] is not a postgres hook with dump or data_dir")
    if not hooks:
        raise UsageError(
            f"group {group.name} has no postgres hook with dump (or data_dir), so snapsync cannot tell where its "
            f"databases are (docs/consistency.md: set dump and dump_dir; runbooks/database-restore.md for the manual way)"
        )
    return hooks


def _inside(path: str, roots: dict[str, str | None]) -> tuple[str, str] | None:
    """The dataset whose live files hold ``path``, and the path relative to them."""
    found = [(ds, root) for ds, root in roots.items() if root is not None and (path == root or path.startswith(root.rstrip("/") + "/"))]
    if not found:
        return None
    ds, root = max(found, key=lambda f: len(f[1] or ""))
    assert root is not None
    return ds, os.path.relpath(path, root)


@dataclass(frozen=True)
class SnapshotView:
    """A snapshot's files as the policy names them, and room beside them."""

    locate: Callable[[str], Path | None]
    """A path as the policy names it -> the same file in the snapshot (None outside the group's data)."""
    scratch: Path
    """A directory for throwaway files (a side server's socket, a dump) that the data's owner can reach."""
    writable: bool
    """Whether the located files may be changed (a restored copy) or must be copied first (the snapshot itself)."""


@contextmanager
def snapshot_files(
    policy: Policy,
    group: Group,
    backend: StorageBackend,
    snapshot: str,
    source: str | None,
    scratch_parent: str | None = None,
    progress: Callable[[str, int | None], Callable[[int], None] | None] | None = None,
) -> Iterator[SnapshotView]:
    """``snapshot`` of ``group``: this host's, or, from target ``source``, a copy of the group restored
    into a throwaway place for as long as the context lasts (as a drill does)."""
    from snapsync.protocol import dataset_key
    from snapsync.recovery.restore import restore_from

    roots = {ds: backend.files_root(ds) for ds in group.datasets}
    if source is None:
        def local(path: str) -> Path | None:
            hit = _inside(path, roots)
            if hit is None:
                return None
            files = backend.snapshot_files(hit[0], snapshot)
            if files is None:
                raise UsageError(
                    f"{group.name}@{snapshot}: no such snapshot of {hit[0]} on this host "
                    f"(`snapsync list {group.name}`; or restore it from a target with --from)"
                )
            return files / hit[1]

        room = Path(tempfile.mkdtemp(prefix="snapsync-db-", dir=scratch_parent or "/var/tmp"))
        try:
            room.chmod(0o711)  # a side server's owner passes through to its own directories
            yield SnapshotView(local, room, writable=False)
        finally:
            shutil.rmtree(room, ignore_errors=True)
        return
    if source not in policy.targets and source not in policy.pulls:  # before any scratch is made
        raise UsageError(f"{policy.source}: no target {source!r} (targets: {', '.join(sorted(policy.targets)) or 'none'})")
    with backend.scratch(f"snapsync-restore-db-{group.name}", group.datasets, scratch_parent) as scratch:
        restored = restore_from(policy, source, group.name, scratch.place, snapshot, progress=progress)
        copies = {ds: scratch.writable(f"{group.name}/{dataset_key(ds)}", restored.snapshot) for ds in group.datasets}

        def copied(path: str) -> Path | None:
            hit = _inside(path, roots)
            return None if hit is None else copies[hit[0]] / hit[1]

        yield SnapshotView(copied, scratch.directory, writable=True)


def restore_database(
    policy: Policy,
    group: Group,
    backend: StorageBackend,
    snapshot: str,
    database: str,
    now: datetime,
    *,
    source: str | None = None,
    into: str | None = None,
    hook_index: int | None = None,
    terminate: bool = False,
    dry_run: bool = False,
    scratch_parent: str | None = None,
    progress: Callable[[str, int | None], Callable[[int], None] | None] | None = None,
) -> DbRestoreReport:
    """Restore ``database`` as ``snapshot`` of ``group`` holds its dump into the live server (the
    dumping hook's, or ``into``, a libpq connection string); see the module's docstring."""
    started = time.monotonic()
    hooks = postgres_hooks(group, hook_index)
    report = DbRestoreReport(group.name, snapshot, database, source or "local", dry_run)
    with snapshot_files(policy, group, backend, snapshot, source, scratch_parent, progress) as view:
        found: list[tuple[int, PostgresHook, Path]] = []
        for i, hook in hooks:
            directory = None if hook.dump_dir is None else view.locate(hook.dump_dir)
            if directory is not None and (directory / dump_file(database)).is_file():
                found.append((i, hook, directory))
        if len(found) > 1:
            which = " and ".join(f"hooks[{i}]" for i, _, _ in found)
            raise UsageError(f"database {database!r} is dumped by {which} of group {group.name}; pick one with --hook")
        if found:
            _, hook, directory = found[0]
            entry = read_dump_manifest(directory).get(database, {})
            report.dump = f"{hook.dump_dir}/{dump_file(database)}"
            report.dumped_at = str(entry["dumped_at"]) if entry.get("dumped_at") else None
            if entry.get("failed"):
                report.stale = str(entry["failed"])
                report.notes.append(f"the dump taken for this snapshot failed ({report.stale}); this is the one before it, of {report.dumped_at}")
            load_dump(PgServer.of(hook, into), hook, database, directory / dump_file(database), now, report, terminate=terminate)
        else:
            hook, data = _cluster_files(group, snapshot, database, hooks, view)
            report.dump = f"{hook.data_dir} (no dump of {database} in this snapshot: dumped from its cluster, started on a side port)"
            with _dumped_from_cluster(hook, data, database, view) as dumped:
                load_dump(PgServer.of(hook, into), hook, database, dumped, now, report, terminate=terminate)
    report.seconds = time.monotonic() - started
    return report


@contextmanager
def _side_server(data: Path, room: Path) -> Iterator[tuple[Path, int]]:
    try:
        with side_server(data, room, "-c default_transaction_read_only=on") as where:
            yield where
    except SnapsyncError as e:
        if str(e).startswith("the server did not start") and "Permission denied" in str(e):  # a private directory above
            raise SnapsyncError(f"{e} (the data's owner must be able to reach {room}: choose --scratch elsewhere)") from e
        raise


def _cluster_files(
    group: Group, snapshot: str, database: str, hooks: list[tuple[int, PostgresHook]], view: SnapshotView
) -> tuple[PostgresHook, Path]:
    """The hook, and the data directory in the snapshot, to dump ``database`` from when no dump has it."""
    clusters = [(i, h, d) for i, h in hooks if h.data_dir is not None and (d := view.locate(h.data_dir)) is not None
                and (d / "PG_VERSION").is_file()]
    if not clusters:
        places = ", ".join(str(h.dump_dir) for _, h in hooks if h.dump_dir) or "no dump_dir"
        raise UsageError(
            f"{group.name}@{snapshot} holds no dump of database {database!r} (looked in {places}) and no "
            f"PostgreSQL data directory to dump it from (set data_dir on the postgres hook)"
        )
    if len(clusters) > 1:
        which = " and ".join(f"hooks[{i}]" for i, _, _ in clusters)
        raise UsageError(f"{group.name}@{snapshot} holds several clusters ({which}); pick one with --hook")
    _, hook, data = clusters[0]
    return hook, data


@contextmanager
def _dumped_from_cluster(hook: PostgresHook, data: Path, database: str, view: SnapshotView) -> Iterator[Path]:
    """A ``pg_dump -Fc`` of ``database`` from the snapshot's own cluster: a server started on a
    writable copy of its data directory (the snapshot stays as it was), on a private socket and a
    free port, read-only, stopped and removed afterwards (also in a dry run: it changes nothing live)."""
    copy = data
    if not view.writable:
        copy = view.scratch / "data"
        done = subprocess.run(["cp", "-a", "--reflink=auto", str(data), str(copy)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BackendError(f"cannot copy {data} to {copy}: {' '.join(done.stderr.split())[:300]}")
    target = view.scratch / dump_file(database)
    with _side_server(copy, view.scratch) as (sock, port):
        program = pg_executable(hook, "pg_dump") if hook.bin_dir else str(server_binaries(copy) / "pg_dump")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            server = PgServer({"host": str(sock), "port": str(port), "user": hook.user or "postgres"}, 30)
            conninfo, env = server.client(database)
            code, stderr = run_client([program, "--format=custom", "--no-password", f"--dbname={conninfo}"], program, env, None, stdout=fd)
        finally:
            os.close(fd)
        if code != 0:
            raise BackendError(f"pg_dump of {database} from the snapshot's cluster failed (exit {code}): {' '.join(stderr.split())}")
    yield target


@dataclass(frozen=True)
class _Database:
    """What the live database is made of, beside its data: a restored copy is made the same."""

    oid: int
    owner: str
    encoding: str
    collate: str
    ctype: str
    provider: str
    locale: str | None
    tablespace: str
    connlimit: int
    comment: str | None


def _toc(hook: PostgresHook, path: Path) -> tuple[str, str]:
    """``pg_restore --create --list`` of the dump: its table of contents; and the program to restore with."""
    executable = pg_executable(hook, "pg_restore")
    done = subprocess.run(
        [pg_program(hook, "pg_restore"), "--create", "--list", str(path)], executable=executable,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False,
    )
    if done.returncode != 0:
        raise IntegrityError(f"{path}: pg_restore cannot read it: {' '.join(done.stderr.split())[:300]}")
    return done.stdout, executable


def _toc_database(toc: str) -> str | None:
    found = re.search(r"^;\s+dbname: (.*)$", toc, re.M)
    return found.group(1) if found else None


def _toc_owner(toc: str, database: str) -> str | None:
    found = re.search(rf"^\d+; \d+ \d+ DATABASE - {re.escape(database)} (.+)$", toc, re.M)
    return found.group(1) if found else None


def _toc_tables(toc: str) -> int:
    return len(re.findall(r"^\d+; \d+ \d+ TABLE (?!DATA )", toc, re.M))


def load_dump(
    server: PgServer, hook: PostgresHook, database: str, path: Path, now: datetime, report: DbRestoreReport,
    *, terminate: bool = False,
) -> None:
    """Steps 2-5 of the module's docstring, for the dump at ``path``."""
    import psycopg

    toc, executable = _toc(hook, path)
    dumped = _toc_database(toc)
    if dumped != database:
        raise IntegrityError(f"{path}: a dump of database {dumped!r}, not {database!r}")
    report.tables = _toc_tables(toc)
    work = derived_name(database, "_snapsync_restore")
    stamp = now.astimezone(UTC).strftime("%Y%m%dt%H%M%Sz")
    before = derived_name(database, f"_before_{stamp}")
    report.work = work
    maintenance = "template1" if database == "postgres" else "postgres"
    try:
        conn = server.connect(maintenance)
    except psycopg.Error as e:
        raise BackendError(f"cannot connect to PostgreSQL: {_message(e)}") from e
    with conn:
        try:
            live = _describe(conn, database)
            leftover = _describe(conn, work)
            if leftover is not None and not (leftover.comment or "").startswith(WORK_MARK):
                raise UsageError(f"a database {work!r} exists that snapsync did not make; rename or drop it, then run this again")
            if live is not None and not terminate:
                _refuse_sessions(conn, database)
            if _describe(conn, before) is not None:
                raise UsageError(f"a database {before!r} exists already; wait a second and run this again")
            report.kept_as = before if live is not None else None
            plan = [
                *([f"drop {work}, the work copy an interrupted run left"] if leftover else []),
                (f"create {work} like {database if live else 'the dump says'} and restore {report.tables} table(s) into it "
                 f"with pg_restore --single-transaction"),
                f"check every table of the dump is in {work}",
                *([f"disconnect the sessions on {database}"] if terminate and live else []),
                (f"in one transaction: rename {database} to {before}, {work} to {database}" if live
                 else f"rename {work} to {database} (there is no live {database})"),
            ]
            if report.dry_run:
                report.steps = plan
                return
            if leftover is not None:
                _drop(conn, work)
                report.steps.append(f"dropped {work}, the work copy an interrupted run left")
            _create_like(conn, work, live, _toc_owner(toc, database), database, report)
            report.steps.append(f"created {work}")
        except psycopg.Error as e:
            raise BackendError(f"PostgreSQL: {_message(e)}") from e
        target, env = server.client(work)
        argv = [pg_program(hook, "pg_restore"), "--single-transaction", "--exit-on-error", "--no-password",
                f"--dbname={target}", str(path)]
        code, stderr = run_client(argv, executable, env, None)
        if code != 0:
            _drop_quietly(conn, work)
            raise BackendError(f"pg_restore of {path} into {work} failed (exit {code}; {database} is untouched): {' '.join(stderr.split())}")
        report.steps.append(f"restored {path} into {work}")
        try:
            with server.connect(work) as check:
                present = _count_tables(check)
        except psycopg.Error as e:
            raise BackendError(f"cannot check {work}: {_message(e)}") from e
        if present != report.tables:
            raise IntegrityError(
                f"{work} has {present} table(s), the dump {report.tables}; {database} is untouched, {work} is left to look at "
                f"(the next run replaces it)"
            )
        report.steps.append(f"checked {work}: all {present} table(s) of the dump are there")
        try:
            _swap(conn, database, work, before, live, terminate, report)
        except psycopg.Error as e:
            raise BackendError(f"the swap failed, {database} is untouched: {_message(e)}") from e


def _message(error: Exception) -> str:
    return " ".join(str(error).split())


def _ident(*names: str) -> Any:
    from psycopg import sql

    return sql.SQL(".").join(sql.Identifier(n) for n in names)


def _describe(conn: Any, name: str) -> _Database | None:
    version = conn.info.server_version
    provider = "d.datlocprovider" if version >= 150000 else "'c'"
    locale = "d.datlocale" if version >= 170000 else "d.daticulocale" if version >= 150000 else "NULL"
    row = conn.execute(
        f"""SELECT d.oid, pg_get_userbyid(d.datdba), pg_encoding_to_char(d.encoding), d.datcollate, d.datctype,
                   {provider}::text, {locale}, t.spcname, d.datconnlimit, shobj_description(d.oid, 'pg_database')
            FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace WHERE d.datname = %s""",
        [name],
    ).fetchone()
    return None if row is None else _Database(*row)


def _sessions(conn: Any, database: str) -> list[str]:
    rows = conn.execute(
        "SELECT pid, usename, application_name, client_addr FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        [database],
    ).fetchall()
    return [f"pid {pid} {user or '?'}{f' ({app})' if app else ''}{f' from {addr}' if addr else ''}" for pid, user, app, addr in rows]


def _refuse_sessions(conn: Any, database: str) -> None:
    if sessions := _sessions(conn, database):
        more = f" and {len(sessions) - 3} more" if len(sessions) > 3 else ""
        raise UsageError(
            f"{database} is in use ({'; '.join(sessions[:3])}{more}): stop the service that uses it "
            f"(e.g. systemctl stop <service>) and run this again, or pass --terminate to disconnect them"
        )


def _drop(conn: Any, name: str) -> None:
    from psycopg import sql

    force = sql.SQL(" WITH (FORCE)") if conn.info.server_version >= 130000 else sql.SQL("")
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}{}").format(_ident(name), force))


def _drop_quietly(conn: Any, name: str) -> None:
    """After a failed restore the work copy goes; if it cannot, the next run drops it (it is marked)."""
    import psycopg

    try:
        _drop(conn, name)
    except psycopg.Error:
        pass


def _create_like(conn: Any, work: str, live: _Database | None, dump_owner: str | None, database: str, report: DbRestoreReport) -> None:
    """``work``, empty, made like ``live`` (or, with none, owned as the dump says): what pg_restore
    without ``--create`` leaves out, since it restores into an existing database."""
    from psycopg import sql

    options: list[sql.Composable] = [sql.SQL("TEMPLATE template0")]
    if live is not None:
        options += [sql.SQL("ENCODING {}").format(sql.Literal(live.encoding)),
                    sql.SQL("LC_COLLATE {} LC_CTYPE {}").format(sql.Literal(live.collate), sql.Literal(live.ctype))]
        if live.provider == "i":
            options.append(sql.SQL("LOCALE_PROVIDER icu ICU_LOCALE {}").format(sql.Literal(live.locale)))
        elif live.provider == "b":
            options.append(sql.SQL("LOCALE_PROVIDER builtin BUILTIN_LOCALE {}").format(sql.Literal(live.locale)))
        options.append(sql.SQL("TABLESPACE {}").format(_ident(live.tablespace)))
        options.append(sql.SQL("CONNECTION LIMIT {}").format(sql.Literal(live.connlimit)))
    owner = live.owner if live is not None else dump_owner
    if owner is not None and conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [owner]).fetchone() is None:
        report.notes.append(f"role {owner!r}, the database's owner in the dump, does not exist here; {database} is owned by the user restoring it")
        owner = None
    if owner is not None:
        options.append(sql.SQL("OWNER {}").format(_ident(owner)))
    conn.execute(sql.SQL("CREATE DATABASE {} {}").format(_ident(work), sql.SQL(" ").join(options)))
    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(_ident(work), sql.Literal(WORK_MARK + database)))
    if live is not None:
        _copy_privileges(conn, live, work)
        _copy_settings(conn, live, work, report)


def _copy_privileges(conn: Any, live: _Database, work: str) -> None:
    """GRANT/REVOKE on the database itself, as the live one has them (NULL: the defaults, as work has)."""
    from psycopg import sql

    rows = conn.execute(
        """SELECT coalesce(r.rolname, 'PUBLIC'), a.grantee = 0, a.privilege_type, a.is_grantable
           FROM pg_database d, aclexplode(d.datacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee WHERE d.oid = %s""",
        [live.oid],
    ).fetchall()
    if not rows:
        return
    with conn.transaction():
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(_ident(work)))
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(_ident(work), _ident(live.owner)))
        for role, public, privilege, grantable in rows:
            conn.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}{}").format(
                sql.SQL(privilege), _ident(work), sql.SQL("PUBLIC") if public else _ident(role),
                sql.SQL(" WITH GRANT OPTION") if grantable else sql.SQL(""),
            ))


def _copy_settings(conn: Any, live: _Database, work: str, report: DbRestoreReport) -> None:
    """``ALTER DATABASE ... SET`` (also per role) as the live one has them, each value taken as the
    server parses it (``FROM CURRENT`` after setting it locally), never re-quoted by hand."""
    import psycopg
    from psycopg import sql

    rows = conn.execute(
        "SELECT r.rolname, s.setconfig FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole WHERE s.setdatabase = %s",
        [live.oid],
    ).fetchall()
    for role, settings in rows:
        for setting in settings or ():
            name, _, value = str(setting).partition("=")
            target = (sql.SQL("ALTER ROLE {} IN DATABASE {}").format(_ident(role), _ident(work)) if role
                      else sql.SQL("ALTER DATABASE {}").format(_ident(work)))
            try:
                with conn.transaction():
                    conn.execute("SELECT set_config(%s, %s, true)", [name, value])
                    conn.execute(sql.SQL("{} SET {} FROM CURRENT").format(target, _ident(*name.split("."))))
            except psycopg.Error as e:
                report.notes.append(f"setting {setting!r}{f' for role {role}' if role else ''} not copied: {_message(e)}")


def _count_tables(conn: Any) -> int:
    """Tables a dump has entries for: ordinary and partitioned ones in user schemas, not an extension's."""
    row = conn.execute(
        """SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')"""
    ).fetchone()
    return int(row[0])


def _swap(conn: Any, database: str, work: str, before: str, live: _Database | None, terminate: bool, report: DbRestoreReport) -> None:
    """The one change to the live database: both renames in one transaction, retried while sessions
    that were just disconnected come back."""
    import psycopg
    from psycopg import sql

    for attempt in range(RENAME_ATTEMPTS):
        if live is not None:
            if terminate:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", [database])
            else:
                _refuse_sessions(conn, database)
        try:
            with conn.transaction():
                if live is not None:
                    conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(_ident(database), _ident(before)))
                    note = f"snapsync restore-db: {database} as it was before {report.group}@{report.snapshot} was restored into it"
                    conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(_ident(before), sql.Literal(note)))
                conn.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(_ident(work), _ident(database)))
                comment = live.comment if live is not None else None
                conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(_ident(database), sql.Literal(comment)))
        except psycopg.errors.ObjectInUse:
            if attempt + 1 == RENAME_ATTEMPTS:
                raise
            continue
        break
    report.steps.append(
        f"renamed {database} to {before} and {work} to {database}" if live is not None else f"renamed {work} to {database}"
    )
