"""``snapsync drill``: prove a backup restores, by restoring it somewhere harmless and checking it.

A backup nobody has restored is a hope. A drill restores a group's newest snapshot from a target
(offsite or another host) into a throwaway place (a sparse loop btrfs; on ZFS a scratch dataset in
the group's pool), then checks what a person would, on a writable copy of what was restored:

* files: every file of the restored copy against the source snapshot, when this host still has it;
* SQLite (the group's sqlite hooks): ``PRAGMA integrity_check`` on each database, with its WAL
  applied as the application would see it;
* PostgreSQL (a postgres hook with ``data_dir``): a throwaway server started on a writable copy of
  the restored PGDATA, as the data's owner, on a private socket, that must recover and answer the
  hook's ``check_query``.

The result is recorded (``$SNAPSYNC_STATE_DIR/drills/<group>.<target>.json``, default
``/var/lib/snapsync``) for monitoring, and everything restored is deleted afterwards.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import btrfsutil

from snapsync.backends.base import StorageBackend
from snapsync.errors import SnapsyncError, UsageError
from snapsync.policy.loader import Group, Policy
from snapsync.policy.schema import PostgresHook, SqliteHook
from snapsync.protocol import dataset_key
from snapsync.recovery.restore import restore_from
from snapsync.backends.scratch import scratch_btrfs
from snapsync.host.state import state_dir, write_json


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class DrillReport:
    group: str
    target: str
    started: datetime
    snapshot: str | None = None
    seconds: float = 0.0
    restored_bytes: int = 0
    checks: list[Check] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group, "target": self.target, "ok": self.ok, "snapshot": self.snapshot,
            "started": self.started.isoformat(), "seconds": round(self.seconds, 3),
            "restored_bytes": self.restored_bytes, "checks": [c.to_json() for c in self.checks], "error": self.error,
        }


def record(report: DrillReport) -> Path:
    """Write the result atomically, where monitoring reads it."""
    path = state_dir() / "drills" / f"{report.group}.{report.target}.json"
    write_json(path, report.to_json())
    return path


def _digest(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                out[rel] = "-> " + os.readlink(path)
                continue
            if not stat.S_ISREG(mode):  # a FIFO or a device node: never opened, compared by type
                out[rel] = f"type {stat.S_IFMT(mode):o}"
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


def compare_files(restored: Path, source: Path | None, dataset: str) -> Check:
    if source is None or not source.is_dir():
        return Check(f"files {dataset}", True, "the source no longer has this snapshot: compared nothing, the stream checks stand")
    got, want = _digest(restored), _digest(source)
    if got == want:
        return Check(f"files {dataset}", True, f"{len(got)} files identical to the source snapshot")
    differ = sorted(k for k in got.keys() & want.keys() if got[k] != want[k])
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    parts = [f"{len(differ)} differ ({', '.join(differ[:5])})" if differ else "",
             f"{len(missing)} missing ({', '.join(missing[:5])})" if missing else "",
             f"{len(extra)} extra ({', '.join(extra[:5])})" if extra else ""]
    return Check(f"files {dataset}", False, "; ".join(p for p in parts if p))


def _inside(path: str, datasets: list[str]) -> tuple[str, str] | None:
    """The dataset holding ``path``, and the path relative to it."""
    best = max((d for d in datasets if path == d or path.startswith(d.rstrip("/") + "/")), key=len, default=None)
    return None if best is None else (best, os.path.relpath(path, best))


def check_sqlite(database: str, copy: Path) -> Check:
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


def drill(
    policy: Policy,
    group: Group,
    target_name: str,
    backend: StorageBackend,
    now: datetime,
    *,
    scratch_parent: str | None = None,
    progress: Callable[[str, int | None], Callable[[int], None] | None] | None = None,
) -> DrillReport:
    report = DrillReport(group.name, target_name, now)
    started = time.monotonic()
    try:
        with _scratch(group, backend, scratch_parent) as (where, writable, scratch):
            restored = restore_from(policy, target_name, group.name, where, progress=progress)
            report.snapshot = restored.snapshot
            report.restored_bytes = restored.bytes
            copies = {ds: writable(ds, restored.snapshot) for ds in group.datasets}
            for ds, copy in copies.items():
                report.checks.append(compare_files(copy, _source_snapshot(backend, ds, restored.snapshot), ds))
            roots = {ds: _where_mounted(backend, ds) for ds in group.datasets}
            for hook in group.hooks:
                report.checks += _hook_checks(hook, roots, copies, scratch)
    except SnapsyncError as e:
        report.error = str(e)
    except OSError as e:
        report.error = f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}".lstrip(": ")
    report.seconds = time.monotonic() - started
    record(report)
    return report


def _source_snapshot(backend: StorageBackend, dataset: str, name: str) -> Path | None:
    """Where this host still has the snapshot's files, to compare against."""
    if backend.kind == "btrfs":
        path = Path(backend.snapshot_home(dataset)) / name
    else:
        from snapsync.backends.zfs import zfs

        answer = zfs("get", "-H", "-o", "value", "mountpoint", dataset, check=False).stdout.strip()
        path = Path(answer) / ".zfs" / "snapshot" / name if answer.startswith("/") else Path("/nonexistent")
    return path if path.is_dir() else None


Writable = Callable[[str, str], Path]


@contextmanager
def _scratch(group: Group, backend: StorageBackend, parent: str | None) -> Iterator[tuple[str, Writable, Path]]:
    """Where to restore (a directory or a dataset), a function giving a writable, mounted copy of a
    restored snapshot, and a scratch directory; all of it removed afterwards.

    btrfs: a sparse loop filesystem. ZFS: a dataset in the pool of the group's first dataset,
    destroyed recursively at the end; copies are cloned and mounted below a temporary directory.
    """
    if backend.kind == "btrfs":
        with scratch_btrfs(_estimate(group, backend), parent=parent or "/var/tmp", label=f"snapsync-drill-{group.name}") as mnt:
            root, scratch = mnt / "restore", mnt / "scratch"
            root.mkdir()
            scratch.mkdir()
            for path in (mnt.parent, mnt, scratch):
                path.chmod(0o755)  # a database server runs as the data's owner, not root, and must get there

            def btrfs_copy(ds: str, name: str) -> Path:
                rw = scratch / f"rw-{dataset_key(ds).replace('/', '_')}"
                btrfsutil.create_snapshot(root / group.name / dataset_key(ds) / name, rw, read_only=False)
                return rw

            yield str(root), btrfs_copy, scratch
        return
    from snapsync.backends.zfs import pool_of, zfs
    from snapsync.backends.zfs_receiver import ZfsReceiver

    pool = pool_of(group.datasets[0])
    for stale in zfs("list", "-H", "-o", "name", "-d", "1", pool).stdout.split():
        if stale.startswith(f"{pool}/snapsync-drill-{group.name}-"):
            zfs("destroy", "-R", "-f", stale, check=False)  # left by a drill that was killed
    base = f"{pool}/snapsync-drill-{group.name}-{os.getpid()}"
    mounts = Path(tempfile.mkdtemp(prefix="snapsync-drill-", dir=parent or "/var/tmp"))
    mounts.chmod(0o755)
    zfs("create", "-o", "canmount=off", "-o", "mountpoint=none", base)
    try:
        store = ZfsReceiver(base)

        def zfs_copy(ds: str, name: str) -> Path:
            where = mounts / dataset_key(ds).replace("/", "_")
            clone = f"{base}/rw-{dataset_key(ds).replace('/', '_')}"
            zfs("clone", "-o", f"mountpoint={where}", "-o", "setuid=off", "-o", "devices=off", f"{store.dataset(f'{group.name}/{dataset_key(ds)}')}@{name}", clone)
            return where

        scratch = mounts / "scratch"
        scratch.mkdir()
        scratch.chmod(0o755)
        yield base, zfs_copy, scratch
    finally:
        zfs("destroy", "-R", "-f", base, check=False)
        shutil.rmtree(mounts, ignore_errors=True)


def _where_mounted(backend: StorageBackend, dataset: str) -> str:
    """The directory a hook's paths are written against: the subvolume, or the ZFS mountpoint."""
    if backend.kind == "btrfs":
        return dataset
    from snapsync.backends.zfs import zfs

    return str(zfs("get", "-H", "-o", "value", "mountpoint", dataset, check=False).stdout.strip())


def _hook_checks(hook: object, roots: dict[str, str], copies: dict[str, Path], scratch: Path) -> list[Check]:
    """SQLite and PostgreSQL checks on the writable copies (``roots``: dataset -> where its files are
    seen; ``copies``: dataset -> its restored copy)."""

    def inside(path: str) -> tuple[str, str] | None:
        found = _inside(path, [r for r in roots.values() if r.startswith("/")])
        if found is None:
            return None
        dataset = next(ds for ds, r in roots.items() if r == found[0])
        return dataset, found[1]

    if isinstance(hook, SqliteHook):
        checks = []
        for db in hook.databases:
            where = inside(db)
            if where is None:
                checks.append(Check(f"sqlite {db}", False, "not inside any dataset of the group"))
                continue
            ds, rel = where
            checks.append(check_sqlite(db, copies[ds] / rel))
        return checks
    if isinstance(hook, PostgresHook) and hook.data_dir is not None:
        where = inside(hook.data_dir)
        if where is None:
            return [Check(f"postgres {hook.data_dir}", False, "data_dir is not inside any dataset of the group")]
        ds, rel = where
        return [check_postgres(hook, copies[ds] / rel, scratch)]
    return []


def _estimate(group: Group, backend: StorageBackend) -> str:
    """A sparse scratch file big enough for the newest snapshot twice (restored plus writable copies)."""
    total = 0
    for ds in group.datasets:
        snaps = [s for s in backend.list_snapshots(ds) if s.kind == "snapshot"]
        if snaps:
            total += backend.estimate(ds, snaps[-1].name, None) or 0
    return f"{max(512, (total * 3) // (1 << 20) + 256)}M"
