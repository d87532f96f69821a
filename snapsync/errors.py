"""Every error snapsync raises on purpose, each carrying its exit code and a one-line message.

The CLI maps these to exit codes in one place (``snapsync.cli.app``); nothing else prints tracebacks.

    SnapsyncError                 exit 1  (partial failure: some work done, some failed)
    ├── UsageError                exit 2  (bad input: nothing was done)
    │   └── PolicyError           exit 2  "FILE: key.path: what was wrong"
    ├── LockedError               exit 3  (another run holds the policy's lock)
    └── BackendError              exit 1  (a filesystem operation failed)
        ├── DatasetMissing
        ├── CommandFailed         (a subprocess exited non-zero; carries its stderr tail)
        ├── TransientError        (worth retrying: connection refused, timeouts)
        ├── RemoteRefused         (the far end's snapsync serve refused the request)
        ├── StoreError            (object storage refused: no bucket, access denied)
        └── IntegrityError        (an offsite object is missing, corrupt, tampered with)
            └── WrongKey          (the key file is not the one the backups were made with)
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3


class SnapsyncError(Exception):
    exit_code = EXIT_PARTIAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(SnapsyncError):
    exit_code = EXIT_USAGE


def printable(text: str, limit: int = 1000) -> str:
    """``text`` with control and other invisible characters escaped as ``repr`` escapes them, cut at ``limit``.

    Messages quote what a policy file, a path or another host said; a newline, a carriage return or a
    terminal escape in there must not fake a second line, hide the first or recolour the terminal.
    Letters of every script stay as they are.
    """
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


class PolicyError(UsageError):
    """A policy file is malformed; the message always names the file and the key path, on one line."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file = printable(file)
        self.key = key = printable(key, limit=200)
        self.problem = problem = printable(problem)
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")


class LockedError(SnapsyncError):
    exit_code = EXIT_LOCKED


class BackendError(SnapsyncError):
    pass


class DatasetMissing(BackendError):
    pass


class UnsafePath(BackendError):
    """A path snapsync would write through is not its own: a symlink, or owned or writable by
    another user. Refused, never worked around: it may be somebody's attempt to redirect root."""


class CommandFailed(BackendError):
    """A subprocess failed; the message carries the argv and the tail of its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = " | ".join(stderr.strip().splitlines()[-5:])
        super().__init__(f"{argv[0]} exited {returncode}: {tail or '(no stderr)'}")


class TransientError(BackendError):
    """A failure that may go away by itself (the network, a busy peer); retried with backoff."""


class RemoteRefused(BackendError):
    """``snapsync serve`` on the other side refused a request: a permanent error, never retried."""


class StoreError(BackendError):
    """Object storage (or the directory standing in for it) refused for good; not retried."""


class IntegrityError(BackendError):
    """An offsite object is missing, truncated, corrupt or not what its manifest says; names the object."""


class WrongKey(IntegrityError):
    """The key file differs from the one the backups were made with: bad input, nothing can be decrypted."""

    exit_code = EXIT_USAGE
