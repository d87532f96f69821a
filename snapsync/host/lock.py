"""One lock per policy file, so two cron runs never prune or snapshot the same groups at once.

An ``fcntl`` lock dies with its process, so a killed run never leaves a stale lock behind; the
holder's pid is written into the file so the "locked" message can name it.

Locks live in a directory only the running user can write (``/run/snapsync`` for root), never in a
shared sticky one like ``/run/lock``: there another user could create the directory first, plant a
symlink for root to truncate, or hold the lock forever so that every run gives up quietly. The
directory and the lock file are opened without following symlinks and must be the running user's.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from snapsync.errors import LockedError, UnsafePath
from snapsync.host.safefs import check_private, private_dir


def lock_dir() -> Path:
    configured = os.environ.get("SNAPSYNC_LOCK_DIR")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/run/snapsync")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "snapsync" if runtime else Path(f"/tmp/snapsync-{os.geteuid()}")


def lock_path(policy_source: str) -> Path:
    digest = hashlib.sha256(os.path.realpath(policy_source).encode()).hexdigest()[:16]
    return lock_dir() / f"policy-{digest}.lock"


@contextmanager
def file_lock(path: Path, timeout: float, what: str) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``path`` for the block; wait up to ``timeout`` seconds.

    ``what`` names the thing being protected in the "locked" message.
    """
    with private_dir(path.parent, own=1, create=True) as dirfd:
        try:
            fd = os.open(path.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
        except OSError as e:
            raise UnsafePath(f"{path}: cannot open the lock file ({e.strerror}); a symlink or another file is in its place") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{path}: the lock file is not a regular file; refusing to use it")
        check_private(st, path, "lock file")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise LockedError(
                        f"another snapsync process (pid {holder}) holds the lock for {what} ({path}); "
                        f"gave up after {timeout:g}s"
                    ) from None
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the flock is the lock, the pid only names its holder to a waiter
        yield path
    finally:
        os.close(fd)


def policy_lock(policy_source: str, timeout: float) -> AbstractContextManager[Path]:
    """The lock every changing run of one policy file holds, so two cron runs never overlap."""
    return file_lock(lock_path(policy_source), timeout, policy_source)
