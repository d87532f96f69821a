"""Application hooks around a group's snapshot: what makes the bytes on disk worth restoring.

Each hook is a context manager entered, in policy order, right before the group's snapshot and left,
in reverse order, right after it, whatever happened in between (an error, a signal turned into an
exception by the CLI). Leaving is where the dangerous states end: a frozen cgroup is thawed, backup
mode is stopped, a SQLite write lock is released, a command's ``post`` runs. Leaving is never cut
short: a further SIGINT, SIGTERM or SIGHUP that arrives meanwhile waits until every hook is left (each
step bounded by its hook's timeout). Two further guards cover snapsync being killed outright, where
no ``finally`` runs:

- a frozen cgroup has a dead-man switch, a detached ``snapsync thaw`` process started before the
  freeze that thaws it after ``max_pause`` unless it is killed first;
- PostgreSQL's non-exclusive backup mode (the only kind since PostgreSQL 15) ends by itself when the
  session that started it disconnects, which a killed process does.

A hook that fails on the way in either aborts the snapshot (``on_failure = "abort"``, the default:
better no snapshot than one that claims a consistency it lacks) or is reported and the snapshot taken
anyway (``"continue"``).

Hooks run as root, so every program one runs must be as safe from other users as the policy file:
``trusted_program`` refuses a program that anyone but root (or the running user) could change, or
swap for another, before it is run (and ``snapsync.policy.loader.load_policy`` refuses the policy).

Each hook kind also knows what its application needs of a restored copy (:func:`check_restored`,
run by drills): SQLite's integrity check, a PostgreSQL server that recovers and answers.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from snapsync.errors import SnapsyncError
from snapsync.policy.schema import CommandHook, FreezeHook, Hook, PostgresHook, SqliteHook

log = logging.getLogger("snapsync")
UNIFIED_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class HookFailed(SnapsyncError):
    """A hook could not make its application consistent (or could not undo what it did)."""


class UntrustedProgram(HookFailed):
    """A program a hook would run, or a directory that decides which file that is, is not root's alone."""


class _SignalsHeld:
    """Stop signals wait while undoing what a hook did (a post, a thaw, a kill): a second Ctrl-C, or
    systemd's SIGTERM followed by SIGHUP, must not cut a cleanup short.

    On leaving, a held signal is delivered again to the handler it would have met, unless the block
    is already being left because of an interrupt (``interrupted``, or a KeyboardInterrupt raised in
    it): that one is on its way out already. Outside the main thread, where no handler can be set,
    nothing is held.
    """

    def __init__(self, interrupted: bool = False) -> None:
        self.interrupted = interrupted
        self.pending: list[int] = []
        self.previous: dict[int, Any] = {}

    def _hold(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            handler = signal.getsignal(signum)
            if handler is not None and handler != signal.SIG_IGN:
                self.previous[signum] = signal.signal(signum, self._hold)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        interrupted = self.interrupted or (kind is not None and issubclass(kind, KeyboardInterrupt))
        if self.pending and not interrupted:
            signal.raise_signal(self.pending[0])


class _Unwinding(ExitStack):
    """The hooks entered so far, left in reverse order with stop signals held, so every one is left."""

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> bool | None:
        with _SignalsHeld(interrupted=kind is not None and issubclass(kind, KeyboardInterrupt)):
            return super().__exit__(kind, value, tb)


@dataclass
class HookReport:
    """One hook's outcome in one run; rendered in the group's report and, later, as metrics."""

    index: int
    kind: str
    status: str = "ok"
    """ok, failed (on the way in), cleanup-failed (on the way out)."""
    seconds: float = 0.0
    message: str | None = None
    paused_seconds: float | None = None
    """freeze: how long the application was frozen."""
    backup_label: str | None = None
    """postgres backup mode: the backup_label pg_backup_stop returned, for point-in-time recovery."""

    def to_json(self) -> dict[str, object]:
        return {
            "hook": self.index,
            "type": self.kind,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "message": self.message,
            "paused_seconds": None if self.paused_seconds is None else round(self.paused_seconds, 3),
            "backup_label": self.backup_label,
        }


@dataclass(frozen=True)
class Moment:
    """What a hook may know about the snapshot it surrounds."""

    group: str
    snapshot: str
    datasets: tuple[str, ...]


@dataclass
class Hooks:
    """The hooks of one group for one snapshot; ``around()`` is the context to take the snapshot in."""

    hooks: Sequence[Hook]
    moment: Moment
    reports: list[HookReport] = field(default_factory=list)

    @contextmanager
    def around(self) -> Iterator[bool]:
        """Enter every hook; yield whether the snapshot may be taken; leave them all afterwards.

        Yields False when a hook with ``on_failure = "abort"`` failed; the hooks already entered
        are left (thawed, backup stopped) before the caller sees it.
        """
        try:
            with _Unwinding() as stack:
                proceed = True
                for index, hook in enumerate(self.hooks):
                    report = HookReport(index, hook.type)
                    self.reports.append(report)
                    started = time.monotonic()
                    try:
                        stack.enter_context(_enter(hook, self.moment, report))
                    except HookFailed as e:
                        report.status, report.message = "failed", str(e)
                    finally:
                        report.seconds = time.monotonic() - started
                    if report.status == "failed":
                        log.error("group %s: %s hook failed: %s", self.moment.group, hook.type, report.message, extra={
                            "event": "hook-failed", "group": self.moment.group, "hook": report.index, "type": hook.type})
                        if hook.on_failure == "abort":
                            proceed = False
                            break
                yield proceed
        finally:  # also when interrupted, where no report is rendered: the log says what was not undone
            for report in self.reports:
                if report.status == "cleanup-failed":
                    log.error("group %s: %s hook: %s", self.moment.group, report.kind, report.message, extra={
                        "event": "hook-cleanup-failed", "group": self.moment.group, "hook": report.index, "type": report.kind})

    @property
    def failed(self) -> list[HookReport]:
        return [r for r in self.reports if r.status != "ok"]


def _enter(hook: Hook, moment: Moment, report: HookReport) -> Any:
    if isinstance(hook, PostgresHook):
        return postgres(hook, report, moment)
    if isinstance(hook, SqliteHook):
        return sqlite(hook, report)
    if isinstance(hook, FreezeHook):
        return freeze(hook, report)
    return command(hook, moment, report)


# --- the programs hooks run ------------------------------------------------------------------------


def hook_programs(hook: Hook) -> list[tuple[tuple[str | int, ...], str]]:
    """Every program ``hook`` runs, by the key under the hook that names it; sqlite runs none, postgres
    only pg_dump (with ``dump``)."""
    if isinstance(hook, CommandHook):
        return [((phase, 0), argv[0]) for phase, argv in (("pre", hook.pre), ("post", hook.post)) if argv]
    if isinstance(hook, PostgresHook) and hook.dump is not None:
        return [(("bin_dir",) if hook.bin_dir else ("dump",), pg_program(hook, "pg_dump"))]
    if isinstance(hook, FreezeHook) and hook.unit is not None:
        return [(("unit",), "systemctl")]
    return []


def trusted_program(program: str, env: Mapping[str, str] | None = None, _depth: int = 0) -> str | None:
    """SECURITY SENSITIVE: the file ``program`` runs as, or None if there is none.

    Looked up like exec does (in ``env``'s PATH for a bare name, through symlinks), and refused with
    UntrustedProgram unless the file, its script interpreter, every directory looked in on the way and
    every PATH directory searched before it belong to root or the running user and are writable by no
    one else: whoever can change any of them can run commands as root. The one exception is a
    group-writable sticky directory owned by root, like /nix/store, where others can only add names:
    the entry looked up there must be root's (or ours) too.
    """
    harm = "whoever can change it can run commands as root"
    if "/" in program:
        if not program.startswith("/"):
            raise UntrustedProgram(f"{program}: a relative path runs whatever the current directory holds; use an absolute path")
        try:
            real, st = _walk(program)
        except _Unsafe as e:
            raise UntrustedProgram(f"{program}: directory {e}: {harm}") from None
        return None if st is None else _trusted_file(program, real, st, env, _depth)
    for directory in os.get_exec_path(dict(env) if env is not None else None):
        if not directory.startswith("/"):
            entry = f"the relative directory {directory!r}" if directory else "an empty entry"
            raise UntrustedProgram(f"{program}: PATH holds {entry}, which is wherever snapsync runs; use an absolute path")
        try:
            real, st = _walk(os.path.join(directory, program))
            if st is not None and stat.S_ISREG(st.st_mode) and os.access(real, os.X_OK):
                return _trusted_file(program, real, st, env, _depth)
            if st is not None:  # there but not a program: exec goes on searching, and so may an intruder's
                _walk(directory, adds_too=True)
        except _Unsafe as e:
            raise UntrustedProgram(
                f"{program}: looked up in PATH, where directory {e}: {harm}; use an absolute path or fix PATH"
            ) from None
    return None


class _Unsafe(Exception):
    """A directory on the way is not root's (or ours) alone; the message says which and why."""


def _trusted_file(program: str, real: str, st: os.stat_result, env: Mapping[str, str] | None, depth: int) -> str:
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedProgram(f"{program}: {real} is not a regular file")
    if faults := _faults(st):
        fix = f"chown root:root {shlex.quote(real)} && chmod go-w {shlex.quote(real)}"
        raise UntrustedProgram(
            f"{program}: {real} is {faults}: whoever can change it can run commands as root; fix with: {fix}"
        )
    if depth < 4:  # the kernel's limit of nested interpreters
        for interpreter in _interpreters(real):
            try:
                trusted_program(interpreter, env, depth + 1)
            except UntrustedProgram as e:
                raise UntrustedProgram(f"{program}: its interpreter {e}") from None
    return real


def _interpreters(path: str) -> list[str]:
    """A script's ``#!`` interpreter, and for ``#!/usr/bin/env NAME`` also NAME: programs that run too."""
    try:
        with open(path, "rb") as f:
            line = f.read(256).split(b"\n", 1)[0]
    except OSError:
        return []
    words = line[2:].decode("utf-8", "replace").split() if line.startswith(b"#!") else []
    if words and os.path.basename(words[0]) == "env":
        return words[:1] + [w for w in words[1:] if not w.startswith("-") and "=" not in w][:1]
    return words[:1]


def _walk(path: str, adds_too: bool = False) -> tuple[str, os.stat_result | None]:
    """Follow an absolute ``path`` as the kernel does, checking each directory looked in on the way.

    Returns the real path and its lstat, or None for the lstat when nothing is there (and no one else
    could put anything there). ``adds_too``: the directory ``path`` names must not even take new names.
    """
    parts = [p for p in reversed(path.split("/")) if p not in ("", ".")]
    current, links = "/", 0
    try:
        st = os.lstat(current)
        while parts:
            name = parts.pop()
            if name == "..":
                current = os.path.dirname(current)
                continue
            entry = os.path.join(current, name)
            try:
                st = os.lstat(entry)
            except FileNotFoundError:
                _check_directory(current, None)
                return entry, None
            _check_directory(current, st)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > 40:
                    raise UntrustedProgram(f"{path}: too many levels of symbolic links")
                target = os.readlink(entry)
                parts += [p for p in reversed(target.split("/")) if p not in ("", ".")]
                current = "/" if target.startswith("/") else current
                continue
            current = entry
            if parts and not stat.S_ISDIR(st.st_mode):
                return entry, None
        if adds_too and (faults := _faults(st)):
            raise _Unsafe(f"{current} is {faults}")
    except OSError as e:
        raise UntrustedProgram(f"{path}: cannot check {current}: {e.strerror or e}") from None
    return current, st


def _check_directory(directory: str, entry: os.stat_result | None) -> None:
    """``directory`` decides what its child ``entry`` is (None: a missing one): only root or we may change it."""
    st = os.lstat(directory)
    if not (faults := _faults(st)):
        return
    mode = stat.S_IMODE(st.st_mode)
    only_adds = st.st_uid == 0 and mode & stat.S_ISVTX and not mode & stat.S_IWOTH
    if not (only_adds and entry is not None and entry.st_uid in _owners()):
        raise _Unsafe(f"{directory} is {faults}")


def _owners() -> tuple[int, ...]:
    return (0, os.geteuid())


def _faults(st: os.stat_result) -> str:
    mode = stat.S_IMODE(st.st_mode)
    faults = []
    if st.st_uid not in _owners():
        faults.append(f"owned by uid {st.st_uid}")
    writable = [who for who, bit in (("group", stat.S_IWGRP), ("world", stat.S_IWOTH)) if mode & bit]
    if writable:
        faults.append(f"{'- and '.join(writable)}-writable (mode {mode:04o})")
    return " and ".join(faults)


# --- postgres --------------------------------------------------------------------------------------


def _conninfo(hook: PostgresHook) -> dict[str, Any]:
    timeout = max(1, int(hook.timeout.total_seconds()))
    if hook.dsn is not None:
        return {"conninfo": hook.dsn, "connect_timeout": timeout}
    parts = {k: v for k, v in (("host", hook.host), ("port", hook.port), ("user", hook.user), ("dbname", hook.dbname)) if v is not None}
    return {"conninfo": "", "connect_timeout": timeout, **parts}


@contextmanager
def postgres(hook: PostgresHook, report: HookReport, moment: Moment | None = None) -> Iterator[None]:
    """The dumps (with ``dump``), then CHECKPOINT right before the snapshot, or backup mode held across
    it on one connection. A failed dump fails the hook (its ``on_failure`` decides about the snapshot)
    after the other databases were dumped and the checkpoint done."""
    try:
        import psycopg
    except ImportError as e:
        raise HookFailed("the postgres hook needs psycopg (pip install 'psycopg[binary]')") from e
    timeout_ms = int(hook.timeout.total_seconds() * 1000)
    try:
        conn = psycopg.connect(**_conninfo(hook), autocommit=True)
    except psycopg.Error as e:
        raise HookFailed(f"cannot connect to PostgreSQL: {_pg_message(e)}") from e
    with conn:
        try:
            conn.execute(f"SET statement_timeout = {timeout_ms}")
            if hook.dump is not None:
                try:
                    report.message = dump_databases(hook, conn, moment.snapshot if moment else None)
                except HookFailed as e:
                    report.status, report.message = "failed", str(e)
            if hook.mode == "checkpoint":
                conn.execute("CHECKPOINT")
            else:
                conn.execute("SELECT pg_backup_start(%s, true)", ["snapsync"])
        except psycopg.Error as e:
            raise HookFailed(f"{'CHECKPOINT' if hook.mode == 'checkpoint' else 'pg_backup_start'} failed: {_pg_message(e)}") from e
        try:
            yield
        finally:
            if hook.mode == "backup":
                try:
                    row = conn.execute("SELECT labelfile FROM pg_backup_stop(false)").fetchone()
                    report.backup_label = None if row is None else str(row[0])
                except psycopg.Error as e:
                    report.status, report.message = "cleanup-failed", f"pg_backup_stop failed: {_pg_message(e)}"


def _pg_message(error: Exception) -> str:
    return " ".join(str(error).split())


# --- postgres: dumps -------------------------------------------------------------------------------

DUMP_MANIFEST = "snapsync-dumps.json"
"""In ``dump_dir``: which databases were dumped when, so a restore can say how old the dump it reads is."""
DUMP_SUFFIX = ".dump"


def dump_file(database: str) -> str:
    """The file a database's dump is kept in: its name, %-escaped where a file name could not hold it."""
    return quote(database, safe="") + DUMP_SUFFIX


def pg_program(hook: PostgresHook, name: str) -> str:
    """``pg_dump``/``pg_restore`` as the hook names them: in ``bin_dir``, else looked up in PATH."""
    return os.path.join(hook.bin_dir, name) if hook.bin_dir else name


def pg_executable(hook: PostgresHook, name: str) -> str:
    """The path to run ``name`` by, once :func:`trusted_program` passed it and everything it leads to,
    or HookFailed saying why not. It is the path as found, not where its symlinks lead: Debian's
    ``/usr/bin/pg_dump`` is a link to one wrapper that picks the program by the name it was run as."""
    program = pg_program(hook, name)
    found = trusted_program(program)
    if found is None:
        where = f"in bin_dir {hook.bin_dir}" if hook.bin_dir else "in PATH (set bin_dir to PostgreSQL's bin directory)"
        raise HookFailed(f"{name} not found {where}")
    return program if "/" in program else shutil.which(program) or found


@dataclass(frozen=True)
class PgServer:
    """Where a PostgreSQL server is reached: the hook's connection (or ``--into``'s), for any of its
    databases, by psycopg or by a client program (the password goes in the environment, never argv)."""

    params: Mapping[str, str]
    timeout: int

    @classmethod
    def of(cls, hook: PostgresHook, dsn: str | None = None) -> PgServer:
        from psycopg.conninfo import conninfo_to_dict

        timeout = max(1, int(hook.timeout.total_seconds()))
        if dsn is not None or hook.dsn is not None:
            params = {k: str(v) for k, v in conninfo_to_dict(dsn if dsn is not None else hook.dsn or "").items() if v is not None}
        else:
            parts = (("host", hook.host), ("port", hook.port), ("user", hook.user), ("dbname", hook.dbname))
            params = {k: str(v) for k, v in parts if v is not None}
        return cls(params, timeout)

    def connect(self, dbname: str) -> Any:
        import psycopg
        from psycopg.conninfo import make_conninfo

        conninfo = make_conninfo(**{**self.params, "dbname": dbname, "connect_timeout": str(self.timeout)})
        return psycopg.connect(conninfo, autocommit=True)

    def client(self, dbname: str) -> tuple[str, dict[str, str]]:
        """``--dbname`` for pg_dump or pg_restore, and the environment to run it in."""
        from psycopg.conninfo import make_conninfo

        params = {**self.params, "dbname": dbname, "connect_timeout": str(self.timeout)}
        password = params.pop("password", None)
        env = {**os.environ, **({"PGPASSWORD": password} if password else {})}
        return make_conninfo(**params), env


def run_client(
    argv: Sequence[str], executable: str, env: Mapping[str, str], timeout: float | None, stdout: int | None = None
) -> tuple[int, str]:
    """A PostgreSQL client program in its own session, killed with its group after ``timeout`` (None:
    none) or when snapsync is interrupted; returns its exit status and the last lines of its stderr."""
    proc: subprocess.Popen[str] | None = None
    try:
        with _SignalsHeld():  # an interrupt inside Popen would leave a child no one knows to kill
            proc = subprocess.Popen(list(argv), executable=executable, env=dict(env), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL if stdout is None else stdout, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True, preexec_fn=_dies_with_us(os.getpid()))
        _, stderr = proc.communicate(timeout=timeout)
    except BaseException as e:
        if proc is not None:
            with _SignalsHeld(interrupted=isinstance(e, KeyboardInterrupt)):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            return -signal.SIGKILL, f"killed after {e.timeout:g}s"
        if isinstance(e, OSError) and proc is None:
            return 127, e.strerror or str(e)
        raise
    return proc.returncode, " | ".join(stderr.strip().splitlines()[-3:]) or "(no output)"


def _dies_with_us(owner: int) -> Callable[[], None]:
    """Runs in the child before exec: SIGKILL when the thread that started it is gone, SIGKILL
    included, so a killed snapsync leaves no pg_dump or pg_restore writing on for hours (what they
    wrote is never used: a dump's temporary file, a work database, both replaced by the next run)."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up in the parent; the child only calls it

    def preexec() -> None:
        prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != owner:
            os._exit(1)

    return preexec


RESTORE_WORK_MARK = "snapsync restore-db: work copy of "
"""The comment of the database ``snapsync restore-db`` restores into before the swap: only a database
carrying it is ever dropped by a restore, and none carrying it is dumped."""


def list_databases(conn: Any) -> list[str]:
    """Every database one can connect to, templates aside: what ``dump = "all"`` dumps (not the work
    copy of a restore that was killed, which the next restore replaces)."""
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE NOT datistemplate AND datallowconn "
        "AND NOT starts_with(coalesce(shobj_description(oid, 'pg_database'), ''), %s) ORDER BY datname",
        [RESTORE_WORK_MARK],
    ).fetchall()
    return [str(r[0]) for r in rows]


def dump_databases(hook: PostgresHook, conn: Any, snapshot: str | None) -> str:
    """``pg_dump -Fc`` of each database of the hook into ``dump_dir``; returns what was done.

    Each dump is written to a temporary name, fsynced and renamed over the previous one, so the
    directory (and every snapshot of it) holds only complete dumps; a dump that fails leaves the
    previous one in place and the manifest says how old it is. The directory is root's, 0700, the
    dumps 0600. Dumps of databases no longer dumped are removed once the others are in place.
    """
    import psycopg

    from snapsync.host.safefs import private_dir, read_file, write_atomic

    assert hook.dump is not None and hook.dump_dir is not None
    started = time.monotonic()
    executable = pg_executable(hook, "pg_dump")
    try:
        databases = list_databases(conn) if hook.dumps_all else list(hook.dump)
        version = str(conn.execute("SHOW server_version").fetchone()[0])
    except psycopg.Error as e:
        raise HookFailed(f"cannot list the databases to dump: {_pg_message(e)}") from e
    server = PgServer.of(hook)
    if not os.path.isdir(os.path.dirname(hook.dump_dir)):  # a dataset not mounted: never make it a plain directory
        raise HookFailed(f"dump_dir {hook.dump_dir}: {os.path.dirname(hook.dump_dir)} is not a directory")
    try:
        with private_dir(hook.dump_dir, own=1, create=True, mode=0o700) as dirfd:
            _refuse_links(dirfd, hook.dump_dir)
            os.fchmod(dirfd, 0o700)
            for name in os.listdir(dirfd):
                if name.startswith(".") and name.endswith(".partial"):  # a dump killed outright
                    os.unlink(name, dir_fd=dirfd)
            previous = _manifest(read_file(dirfd, DUMP_MANIFEST))
            entries: dict[str, dict[str, object]] = {}
            failed: list[str] = []
            for database in databases:
                try:
                    entries[database] = _dump_one(hook, server, executable, dirfd, database)
                except HookFailed as e:
                    failed.append(f"{database}: {e}")
                    if database in previous:
                        entries[database] = {**previous[database], "failed": str(e)}
            manifest = {"format": 1, "snapshot": snapshot, "server_version": version, "databases": entries}
            write_atomic(dirfd, DUMP_MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
            wanted = {dump_file(d) for d in databases}
            for name in os.listdir(dirfd):
                if name.endswith(DUMP_SUFFIX) and not name.startswith(".") and name not in wanted:
                    os.unlink(name, dir_fd=dirfd)
            os.fsync(dirfd)
    except (OSError, SnapsyncError) as e:
        raise HookFailed(f"dump_dir {hook.dump_dir}: {getattr(e, 'strerror', None) or e}") from e
    if failed:
        kept = " (the previous dump is kept)" if any(d in previous for d in databases) else ""
        raise HookFailed(f"pg_dump failed for {len(failed)} of {len(databases)} database(s){kept}: {'; '.join(failed)}")
    size = sum(int(str(e.get("bytes", 0))) for e in entries.values())
    return f"dumped {len(databases)} database(s), {size} bytes, in {time.monotonic() - started:.1f}s"


def _refuse_links(dirfd: int, path: str) -> None:
    """The directory opened must be ``path`` itself: one reached through a symlink on the way (which
    whoever owns a directory above could plant) would put root's dumps, and their cleanup, elsewhere."""
    real = os.readlink(f"/proc/self/fd/{dirfd}")
    if real != path:
        raise HookFailed(f"dump_dir {path} is reached through a symbolic link (it is {real}); name the real path")


def _manifest(raw: bytes | None) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(raw or b"{}")
        entries = data.get("databases", {}) if isinstance(data, dict) else {}
    except ValueError:
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict)} if isinstance(entries, dict) else {}


def _dump_one(hook: PostgresHook, server: PgServer, executable: str, dirfd: int, database: str) -> dict[str, object]:
    """One database into ``<dump_dir>/<name>.dump``, through a temporary file renamed over it when complete."""
    name = dump_file(database)
    partial = f".{name}.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
    done = False
    try:
        os.fchmod(fd, 0o600)
        target, env = server.client(database)
        lock_wait = max(1000, int(hook.timeout.total_seconds() * 1000))
        argv = [pg_program(hook, "pg_dump"), "--format=custom", "--no-password", f"--lock-wait-timeout={lock_wait}", f"--dbname={target}"]
        limit = hook.dump_limit.total_seconds()
        code, stderr = run_client(argv, executable, env, limit, stdout=fd)
        if code != 0:
            raise HookFailed(f"pg_dump exited {code}: {' '.join(stderr.split())}")
        os.fsync(fd)
        size = os.fstat(fd).st_size
        os.rename(partial, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        done = True
    finally:
        os.close(fd)
        if not done:
            try:
                os.unlink(partial, dir_fd=dirfd)
            except OSError:
                pass
    os.fsync(dirfd)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return {"file": name, "dumped_at": now, "bytes": size}


def read_dump_manifest(directory: Path) -> dict[str, dict[str, object]]:
    """The manifest's entries (database -> file, dumped_at, bytes, failed) in a copy of ``dump_dir``."""
    try:
        return _manifest((directory / DUMP_MANIFEST).read_bytes())
    except FileNotFoundError:
        return {}


def check_dumps(hook: PostgresHook, directory: Path | None) -> Check:
    """Every dump in a restored copy of ``dump_dir`` is there and readable (``pg_restore --list``)."""
    name = f"postgres dumps {hook.dump_dir}"
    if directory is None:
        return Check(name, False, "dump_dir is not inside any dataset of the group: no copy carries the dumps")
    entries = read_dump_manifest(directory)
    if not entries:
        return Check(name, False, f"no {DUMP_MANIFEST} in the restored copy: no dump was taken before this snapshot")
    missing = [d for d in (hook.dump or ()) if d not in entries]
    try:
        executable = pg_executable(hook, "pg_restore")
    except HookFailed as e:
        return Check(name, False, str(e))
    bad = list(missing)
    for database in entries:
        path = directory / dump_file(database)
        if not path.is_file():
            bad.append(f"{database} (file missing)")
            continue
        code, stderr = run_client([pg_program(hook, "pg_restore"), "--list", str(path)], executable, os.environ, 600)
        if code != 0:
            bad.append(f"{database} ({stderr})")
    stale = [d for d, e in entries.items() if e.get("failed")]
    if bad:
        return Check(name, False, f"unreadable or missing: {', '.join(bad)}")
    note = f"; stale (their last dump failed): {', '.join(stale)}" if stale else ""
    return Check(name, not stale, f"{len(entries)} dump(s) readable: {', '.join(entries)}{note}")


# --- sqlite ----------------------------------------------------------------------------------------


@contextmanager
def sqlite(hook: SqliteHook, report: HookReport) -> Iterator[None]:
    """Hold each database's write lock across the snapshot, after checkpointing what can be.

    ``BEGIN IMMEDIATE`` (waiting up to ``busy_timeout`` for the current writer) keeps every writer out
    until the snapshot is taken, so the database file and its WAL in the snapshot agree: a restore
    opens them like after a crash, with nothing half-written. Before that, ``wal_checkpoint(TRUNCATE)``
    moves the WAL into the main file so the restore has little to replay; it gets at most a second,
    because busy writers can starve a checkpoint, and when it cannot finish the WAL simply carries
    the rest (the write lock is what makes the pair consistent).
    """
    timeout = hook.busy_timeout.total_seconds()
    connections: list[sqlite3.Connection] = []
    partial: list[str] = []
    try:
        for path in hook.databases:
            if not os.path.exists(path):
                raise HookFailed(f"sqlite database {path} does not exist")
            conn = sqlite3.connect(path, timeout=min(timeout, 1.0), isolation_level=None)
            connections.append(conn)
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if busy:
                    partial.append(path)
                conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise HookFailed(f"{path}: {e} (no write lock within {timeout:g}s)") from e
        if partial:
            report.message = f"checkpoint incomplete (busy writers), the WAL carries the rest: {', '.join(partial)}"
        yield
    finally:
        for conn in connections:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            finally:
                conn.close()


# --- freeze ----------------------------------------------------------------------------------------


def cgroup_dir(hook: FreezeHook) -> Path:
    """The cgroup v2 directory to freeze: the policy's path, or the unit's ControlGroup."""
    if hook.cgroup is not None:
        return Path(hook.cgroup)
    assert hook.unit is not None
    argv = ["systemctl", "show", "--property=ControlGroup", "--value", hook.unit]
    try:
        done = subprocess.run(argv, executable=trusted_program(argv[0]), capture_output=True, text=True, timeout=30)
    except OSError as e:
        raise HookFailed(f"unit {hook.unit}: cannot run systemctl: {e.strerror or e}") from e
    group = done.stdout.strip()
    if done.returncode != 0 or not group:
        raise HookFailed(f"unit {hook.unit}: no control group (is it running?) {done.stderr.strip()}")
    for root in UNIFIED_ROOTS:
        path = Path(root + group)
        if (path / "cgroup.freeze").exists():
            return path
    raise HookFailed(f"unit {hook.unit}: cgroup {group} has no cgroup v2 freezer")


def _set_frozen(path: Path, frozen: bool) -> None:
    (path / "cgroup.freeze").write_text("1" if frozen else "0")


def _frozen(path: Path) -> bool:
    for line in (path / "cgroup.events").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "frozen":
            return value.strip() == "1"
    return False


def _start_watchdog(path: Path, max_pause: float) -> subprocess.Popen[bytes]:
    """``snapsync thaw PATH MAX_PAUSE`` in its own session, born with the stop signals blocked: from
    its first instruction a SIGTERM (``systemctl stop`` signals the whole unit) waits for
    :func:`thaw_after`, which thaws at once, instead of ending it before it could thaw."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "snapsync", "thaw", str(path), f"{max_pause:g}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextmanager
def freeze(hook: FreezeHook, report: HookReport) -> Iterator[None]:
    """Freeze the cgroup, wait until the kernel says every task stopped, thaw after the snapshot.

    A detached watchdog (``snapsync thaw PATH SECONDS``) is started first: if snapsync dies while the
    application is frozen, the watchdog thaws it after ``max_pause``, or at once when it is told to
    stop. It is killed after the thaw. Anything that thawed the cgroup before the snapshot was done
    (the watchdog, by signal or after ``max_pause``; a person) makes the hook ``cleanup-failed``: the
    snapshot did not get the single instant it claims.
    """
    path = cgroup_dir(hook)
    if not (path / "cgroup.freeze").exists():
        raise HookFailed(f"{path}: not a cgroup v2 directory with a freezer (cgroup.freeze missing)")
    max_pause = hook.max_pause.total_seconds()
    watchdog: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    frozen = False
    try:
        with _SignalsHeld():  # an interrupt before the assignment would leave the watchdog to thaw a later freeze
            watchdog = _start_watchdog(path, max_pause)
        if _frozen(path):
            log.warning("%s was already frozen (a run that died before thawing?); it is thawed after this snapshot", path)
        _set_frozen(path, True)
        deadline = started + min(max_pause / 2, 10.0)
        while not _frozen(path):
            if time.monotonic() > deadline:
                raise HookFailed(f"{path}: tasks did not freeze within {deadline - started:.1f}s (stuck in the kernel?)")
            time.sleep(0.005)
        frozen = True
        yield
    finally:
        interrupted = isinstance(sys.exc_info()[1], KeyboardInterrupt)
        with _SignalsHeld(interrupted=interrupted):
            try:
                # Stopped by a signal, no snapshot follows: the watchdog thawing first is no inconsistency.
                early = frozen and not interrupted and (path / "cgroup.freeze").read_text().strip() == "0"
                _set_frozen(path, False)
            except OSError as e:
                report.status, report.message = "cleanup-failed", f"thaw of {path} failed: {e}; the watchdog thaws it within {max_pause:g}s"
            else:
                if watchdog is not None:
                    watchdog.kill()
                if early:
                    report.status, report.message = "cleanup-failed", (
                        f"{path} was thawed before the snapshot was done (its watchdog stopped, or max_pause "
                        f"{max_pause:g}s passed): the snapshot may not be consistent")
            if watchdog is not None:
                watchdog.wait()
            report.paused_seconds = time.monotonic() - started


def thaw_after(path: str, seconds: float) -> int:
    """``snapsync thaw``: the freeze hook's dead-man switch. Thaws unconditionally after ``seconds``,
    or at once on SIGTERM, SIGHUP or SIGINT: whoever stops it (``systemctl stop`` signals the whole
    unit, this process too) must not leave the application frozen. The snapshot run kills it with
    SIGKILL after its own thaw."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # already blocked when started by freeze()
    received = signal.sigtimedwait(STOP_SIGNALS, seconds)
    try:
        _set_frozen(Path(path), False)
    except OSError as e:
        print(f"snapsync thaw: {path}: {e}", file=sys.stderr)
        return 1
    if received is None:
        print(f"snapsync thaw: thawed {path} after {seconds:g}s (the snapshot run did not)", file=sys.stderr)
        return 0
    name = signal.Signals(received.si_signo).name
    print(f"snapsync thaw: thawed {path} on {name}", file=sys.stderr)
    return 128 + received.si_signo


# --- command ---------------------------------------------------------------------------------------


def _run_command(argv: Sequence[str], hook: CommandHook, moment: Moment, phase: str) -> None:
    env = {
        **os.environ,
        "SNAPSYNC_GROUP": moment.group,
        "SNAPSYNC_SNAPSHOT": moment.snapshot,
        "SNAPSYNC_DATASETS": "\n".join(moment.datasets),
        "SNAPSYNC_PHASE": phase,
    }
    timeout = hook.timeout.total_seconds()
    try:
        executable = trusted_program(argv[0], env)
    except UntrustedProgram as e:
        raise HookFailed(f"{phase} command {shlex.join(argv)} refused: {e}") from e
    proc: subprocess.Popen[str] | None = None
    try:
        with _SignalsHeld():  # an interrupt inside Popen would leave a child no one knows to kill
            proc = subprocess.Popen(list(argv), executable=executable, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        _, stderr = proc.communicate(timeout=timeout)
    except BaseException as e:  # the timeout, or snapsync itself interrupted: take the whole group down
        if proc is not None:
            with _SignalsHeld(interrupted=isinstance(e, KeyboardInterrupt)):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:  # the group is gone already (systemd signalled it too)
                    pass
                proc.wait()
        if isinstance(e, subprocess.TimeoutExpired):
            raise HookFailed(f"{phase} command {shlex.join(argv)} killed after {timeout:g}s") from e
        if isinstance(e, OSError) and proc is None:
            raise HookFailed(f"{phase} command {shlex.join(argv)}: {e.strerror or e}") from e
        raise
    if proc.returncode != 0:
        tail = " | ".join(stderr.strip().splitlines()[-3:]) or "(no output)"
        raise HookFailed(f"{phase} command {shlex.join(argv)} exited {proc.returncode}: {tail}")


@contextmanager
def command(hook: CommandHook, moment: Moment, report: HookReport) -> Iterator[None]:
    """``pre`` before the snapshot; ``post`` after it, or after the snapshot was skipped, whenever
    ``pre`` was started, even if it failed or snapsync was interrupted while it ran (its process
    group is killed first): post is where a stopped service is started again. Stop signals wait
    while post runs, which its ``timeout`` bounds."""
    in_pre = True
    try:
        if hook.pre is not None:
            try:
                _run_command(hook.pre, hook, moment, "pre")
            except HookFailed as e:
                report.status, report.message = "failed", str(e)
        in_pre = False
        yield
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        if in_pre:
            report.status, report.message = "failed", "pre command interrupted" if interrupted else f"pre command: {e!r}"
            log.warning("group %s: %s; running its post", moment.group, report.message, extra={
                "event": "hook-interrupted", "group": moment.group, "hook": report.index, "type": hook.type})
        _post(hook, moment, report, interrupted)
        raise
    _post(hook, moment, report)


def _post(hook: CommandHook, moment: Moment, report: HookReport, interrupted: bool = False) -> None:
    if hook.post is None:
        return
    with _SignalsHeld(interrupted):
        try:
            _run_command(hook.post, hook, moment, "post")
        except HookFailed as e:
            report.status, report.message = "cleanup-failed", str(e)


# --- after a restore: does the application's data work? -------------------------------------------


@dataclass
class Check:
    """One check of a restored copy (a drill's): what was checked, whether it passed, and what was seen."""

    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


def check_restored(hook: Hook, locate: Callable[[str], Path | None], scratch: Path) -> list[Check]:
    """What ``hook``'s application needs of a restored copy, checked on a writable one.

    ``locate`` maps a path as the policy names it (on the live system) to the same file in the copy,
    or None outside the restored datasets; ``scratch`` holds a server's socket and log. Hooks whose
    application leaves nothing to check on disk (freeze, command) check nothing.
    """
    if isinstance(hook, SqliteHook):
        return [_sqlite_restored(db, locate(db)) for db in hook.databases]
    if isinstance(hook, PostgresHook):
        checks = []
        if hook.data_dir is not None:
            data = locate(hook.data_dir)
            if data is None:
                checks.append(Check(f"postgres {hook.data_dir}", False, "data_dir is not inside any dataset of the group"))
            else:
                checks.append(check_postgres(hook, data, scratch))
        if hook.dump_dir is not None:
            checks.append(check_dumps(hook, locate(hook.dump_dir)))
        return checks
    return []


def _sqlite_restored(database: str, copy: Path | None) -> Check:
    if copy is None:
        return Check(f"sqlite {database}", False, "not inside any dataset of the group")
    return check_sqlite(database, copy)


def check_sqlite(database: str, copy: Path) -> Check:
    """``PRAGMA integrity_check`` on the copy, with its WAL applied as the application would see it."""
    if not copy.is_file():
        return Check(f"sqlite {database}", False, "missing from the restored copy")
    try:
        with sqlite3.connect(f"file:{copy}?mode=rw", uri=True, timeout=5) as conn:
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        conn.close()
    except sqlite3.Error as e:
        return Check(f"sqlite {database}", False, f"cannot open: {e}")
    ok = rows == ["ok"]
    return Check(f"sqlite {database}", ok, "integrity_check ok" if ok else "; ".join(rows[:5]))


def server_binaries(data: Path) -> Path:
    """The directory of the PostgreSQL server programs (pg_ctl, postgres, pg_dump) of ``data``'s version."""
    version = (data / "PG_VERSION").read_text().strip()
    candidates = [Path(f"/usr/lib/postgresql/{version}/bin")] + [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")]
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(found).parent)
    for c in candidates:
        if (c / "pg_ctl").exists() and (c / "postgres").exists():
            return c
    raise SnapsyncError(f"no PostgreSQL {version} server binaries here (pg_ctl); install them to drill this group")


SOCKET_PATH_MAX = 107
"""The longest path a Unix socket can be bound to (sun_path less its NUL)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_postgres(hook: PostgresHook, data: Path, scratch: Path) -> Check:
    """Start a server on ``data`` (a writable copy) as its owner, run the check query, stop it."""
    import psycopg

    name = f"postgres {hook.data_dir}"
    if not (data / "PG_VERSION").exists():
        return Check(name, False, f"{hook.data_dir} is not a PostgreSQL data directory in the restored copy")
    started = time.monotonic()
    try:
        with side_server(data, scratch) as (sock, port):
            user = hook.user or "postgres"
            dbname = hook.dbname or "postgres"
            try:
                with psycopg.connect(host=str(sock), port=port, user=user, dbname=dbname, autocommit=True, connect_timeout=30) as conn:
                    row = conn.execute(hook.check_query).fetchone()
            except psycopg.Error as e:
                return Check(name, False, f"check query failed: {str(e).strip().splitlines()[0]}")
            return Check(name, True, f"started in {time.monotonic() - started:.1f}s; {hook.check_query!r} answered {row!r}")
    except SnapsyncError as e:
        return Check(name, False, str(e))


@contextmanager
def side_server(data: Path, scratch: Path, options: str = "") -> Iterator[tuple[Path, int]]:
    """A throwaway server on ``data`` (a writable copy of a data directory) as its owner, on a private
    socket in ``scratch`` with trust authentication, no archiving and a free port; yields the socket
    directory and the port, and stops it (immediate) whatever happens. SnapsyncError when it cannot start."""
    owner = data.stat()
    sock = scratch / f"pg-sock-{os.getpid()}"
    if len(str(sock / ".s.PGSQL.65535").encode()) > SOCKET_PATH_MAX:  # the server could not bind it
        sock = Path(tempfile.mkdtemp(prefix="snapsync-pg-", dir="/tmp"))
    sock.mkdir(mode=0o700, exist_ok=True)
    sock.chmod(0o700)  # trust authentication below: only the owner (and root) may reach the socket
    os.chown(sock, owner.st_uid, owner.st_gid)
    try:
        hba = sock / "pg_hba.conf"
        hba.write_text("local all all trust\n")
        os.chown(hba, owner.st_uid, owner.st_gid)
        (data / "postmaster.pid").unlink(missing_ok=True)  # the source's; its pid means nothing here
        port = _free_port()
        binaries = server_binaries(data)
        log = scratch / "pg-drill.log"
        log.touch()
        os.chown(log, owner.st_uid, owner.st_gid)
        settings = (
            f"-p {port} -k {sock} -c listen_addresses='' -c unix_socket_permissions=0700 -c hba_file={hba} "
            f"-c archive_mode=off {options}"
        ).strip()

        def pg_ctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(binaries / "pg_ctl"), "-D", str(data), *args], user=owner.st_uid, group=owner.st_gid,
                extra_groups=[], capture_output=True, text=True, timeout=600, check=False,
            )

        run = pg_ctl("-l", str(log), "-w", "-t", "300", "-o", settings, "start")
        try:
            if run.returncode != 0:
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
                raise SnapsyncError(f"the server did not start: {tail or run.stderr.strip()}")
            yield sock, port
        finally:
            pg_ctl("-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(sock, ignore_errors=True)
