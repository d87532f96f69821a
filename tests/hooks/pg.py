"""A real PostgreSQL 15 server for the hook tests: data directory (and WAL) inside one btrfs subvolume.

Also the checks a restored snapshot must pass: start a second server on a writable clone of the
snapshot, let it recover, and ask it whether every transaction committed before the snapshot is there.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import btrfsutil
import pytest

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def pg_unavailable() -> str | None:
    if not (PG_BIN / "postgres").exists():
        return "PostgreSQL 15 server not installed (apt-get install postgresql-15)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user"
    return None


def as_postgres(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def chown_postgres(path: Path) -> None:
    entry = pwd.getpwnam("postgres")
    os.chown(path, entry.pw_uid, entry.pw_gid)


@dataclass
class Server:
    data: Path
    socket_dir: Path
    port: int

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port={self.port} user=postgres dbname=postgres"

    def start(self) -> None:
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.data.parent / f"server-{self.port}.log"),
                    "-w", "-t", "120", "-o", f"-p {self.port} -k {self.socket_dir} -c listen_addresses=''", "start")

    def stop(self) -> None:
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def log(self) -> str:
        path = self.data.parent / f"server-{self.port}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def init_server(subvolume: Path, port: int) -> Server:
    chown_postgres(subvolume)
    data = subvolume / "data"
    socket_dir = subvolume.parent / f"sock-{port}"
    socket_dir.mkdir(exist_ok=True)
    chown_postgres(socket_dir)
    as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--data-checksums", "-N")
    with open(data / "postgresql.conf", "a") as conf:
        conf.write("fsync = on\nsynchronous_commit = on\nmax_wal_size = 64MB\nmin_wal_size = 32MB\nshared_buffers = 16MB\n")
    server = Server(data, socket_dir, port)
    server.start()
    return server


@dataclass
class Writer:
    """Commits one row per transaction, forever, and remembers which ids had committed when."""

    dsn: str
    committed: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS ledger (id bigint PRIMARY KEY, payload text NOT NULL)")
            conn.execute("CREATE INDEX IF NOT EXISTS ledger_payload ON ledger (payload)")

    def _loop(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                n = 0
                while not self.stop.is_set():
                    n += 1
                    conn.execute("INSERT INTO ledger VALUES (%s, %s)", [n, f"row {n} " + "x" * 200])
                    self.committed.append(n)  # only after the commit returned
        except BaseException as e:
            self.error = e

    def __enter__(self) -> Writer:
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while len(self.committed) < 50:
            assert time.monotonic() < deadline and self.error is None, self.error
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(30)

    def committed_now(self) -> int:
        """The highest id whose commit had returned by now (ids commit in order)."""
        return self.committed[-1] if self.committed else 0


def check_restored(snapshot: Path, scratch: Path, port: int, committed_before: int) -> dict[str, object]:
    """Start a server on a writable clone of ``snapshot``; return what it recovered and found."""
    import psycopg

    clone = scratch / f"clone-{port}"
    btrfsutil.create_snapshot(snapshot, clone)
    try:
        (clone / "data" / "postmaster.pid").unlink(missing_ok=True)
        socket_dir = scratch / f"sock-{port}"
        socket_dir.mkdir(exist_ok=True)
        chown_postgres(socket_dir)
        server = Server(clone / "data", socket_dir, port)
        server.start()
        try:
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                row = conn.execute("SELECT count(*), coalesce(max(id), 0) FROM ledger WHERE id <= %s", [committed_before]).fetchone()
                assert row is not None
                present, highest = int(row[0]), int(row[1])
            amcheck = as_postgres(str(PG_BIN / "pg_amcheck"), "-h", str(socket_dir), "-p", str(port), "-U", "postgres",
                                  "--install-missing", "--heapallindexed", "--all", check=False)
            return {"present": present, "highest": highest, "amcheck": amcheck.returncode, "amcheck_out": amcheck.stdout + amcheck.stderr,
                    "log": server.log()}
        finally:
            server.stop()
    finally:
        btrfsutil.delete_subvolume(clone)
        shutil.rmtree(scratch / f"sock-{port}", ignore_errors=True)


@contextmanager
def pg_cluster(size: str = "1G") -> Iterator[tuple[Path, Server]]:
    """A running server whose data directory is ``<subvolume>/data``, the subvolume on a fresh loop btrfs
    (``<mnt>/persist/postgresql``) in a directory the postgres user can traverse."""
    from snapsync.backends.scratch import scratch_btrfs
    from tests.conftest import _require_btrfs
    from tests.sshd import free_port

    reason = pg_unavailable()
    if reason:
        if os.environ.get("SNAPSYNC_REQUIRE_BTRFS") == "1":  # CI: a missing tier is a failure
            pytest.fail(f"PostgreSQL tier required but unavailable: {reason}")
        pytest.skip(reason)
    _require_btrfs()
    base = Path(tempfile.mkdtemp(prefix="snapsync-pg-", dir="/var/tmp"))  # postgres must traverse it
    base.chmod(0o755)
    try:
        with scratch_btrfs(size, parent=str(base), label="snapsync-pg") as mnt:
            for d in (mnt.parent, mnt):
                d.chmod(0o755)
            (mnt / "persist").mkdir()
            subvolume = mnt / "persist" / "postgresql"
            btrfsutil.create_subvolume(subvolume)
            server = init_server(subvolume, free_port())
            try:
                yield subvolume, server
            finally:
                server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
