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
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

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
        return postgres(hook, report)
    if isinstance(hook, SqliteHook):
        return sqlite(hook, report)
    if isinstance(hook, FreezeHook):
        return freeze(hook, report)
    return command(hook, moment, report)


# --- the programs hooks run ------------------------------------------------------------------------


def hook_programs(hook: Hook) -> list[tuple[tuple[str | int, ...], str]]:
    """Every program ``hook`` runs, by the key under the hook that names it; postgres and sqlite run none."""
    if isinstance(hook, CommandHook):
        return [((phase, 0), argv[0]) for phase, argv in (("pre", hook.pre), ("post", hook.post)) if argv]
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
def postgres(hook: PostgresHook, report: HookReport) -> Iterator[None]:
    """CHECKPOINT right before the snapshot, or backup mode held across it on one connection."""
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
        with _SignalsHeld(interrupted=isinstance(sys.exc_info()[1], KeyboardInterrupt)):
            try:
                early = frozen and (path / "cgroup.freeze").read_text().strip() == "0"
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
    if isinstance(hook, PostgresHook) and hook.data_dir is not None:
        data = locate(hook.data_dir)
        if data is None:
            return [Check(f"postgres {hook.data_dir}", False, "data_dir is not inside any dataset of the group")]
        return [check_postgres(hook, data, scratch)]
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


def _pg_bin(data: Path) -> Path:
    version = (data / "PG_VERSION").read_text().strip()
    candidates = [Path(f"/usr/lib/postgresql/{version}/bin")] + [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")]
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(found).parent)
    for c in candidates:
        if (c / "pg_ctl").exists() and (c / "postgres").exists():
            return c
    raise SnapsyncError(f"no PostgreSQL {version} server binaries here (pg_ctl); install them to drill this group")


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
    owner = data.stat()
    sock = scratch / f"pg-sock-{os.getpid()}"
    sock.mkdir(mode=0o700, exist_ok=True)
    sock.chmod(0o700)  # trust authentication below: only the owner (and root) may reach the socket
    os.chown(sock, owner.st_uid, owner.st_gid)
    hba = sock / "pg_hba.conf"
    hba.write_text("local all all trust\n")
    os.chown(hba, owner.st_uid, owner.st_gid)
    (data / "postmaster.pid").unlink(missing_ok=True)  # the source's; its pid means nothing here
    port = _free_port()
    try:
        binaries = _pg_bin(data)
    except SnapsyncError as e:
        return Check(name, False, str(e))
    log = scratch / "pg-drill.log"
    log.touch()
    os.chown(log, owner.st_uid, owner.st_gid)
    options = (
        f"-p {port} -k {sock} -c listen_addresses='' -c unix_socket_permissions=0700 -c hba_file={hba} "
        f"-c archive_mode=off"
    )

    def pg_ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binaries / "pg_ctl"), "-D", str(data), *args], user=owner.st_uid, group=owner.st_gid,
            extra_groups=[], capture_output=True, text=True, timeout=600,
        )

    started = time.monotonic()
    run = pg_ctl("-l", str(log), "-w", "-t", "300", "-o", options, "start")
    try:
        if run.returncode != 0:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            return Check(name, False, f"the server did not start: {tail or run.stderr.strip()}")
        user = hook.user or "postgres"
        dbname = hook.dbname or "postgres"
        try:
            with psycopg.connect(host=str(sock), port=port, user=user, dbname=dbname, autocommit=True, connect_timeout=30) as conn:
                row = conn.execute(hook.check_query).fetchone()
        except psycopg.Error as e:
            return Check(name, False, f"check query failed: {str(e).strip().splitlines()[0]}")
        return Check(name, True, f"started in {time.monotonic() - started:.1f}s; {hook.check_query!r} answered {row!r}")
    finally:
        pg_ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(sock, ignore_errors=True)
