"""One lock per policy file, so two cron runs never prune or snapshot the same groups at once.

An ``fcntl`` lock dies with its process, so a killed run never leaves a stale lock behind; the
holder's pid is written into the file so the "locked" message can name it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from snapsync.errors import LockedError


def lock_dir() -> Path:
    configured = os.environ.get("SNAPSYNC_LOCK_DIR")
    if configured:
        return Path(configured)
    return Path("/run/lock/snapsync") if os.access("/run/lock", os.W_OK) else Path("/tmp/snapsync-locks")


def lock_path(policy_source: str) -> Path:
    digest = hashlib.sha256(os.path.realpath(policy_source).encode()).hexdigest()[:16]
    return lock_dir() / f"policy-{digest}.lock"


@contextmanager
def file_lock(path: Path, timeout: float, what: str) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``path`` for the block; wait up to ``timeout`` seconds.

    ``what`` names the thing being protected in the "locked" message.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def policy_lock(policy_source: str, timeout: float) -> AbstractContextManager[Path]:
    """The lock every changing run of one policy file holds, so two cron runs never overlap."""
    return file_lock(lock_path(policy_source), timeout, policy_source)
