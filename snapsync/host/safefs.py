"""Files of ours in directories that other users may reach, opened so that no symlink of theirs counts.

snapsync runs as root and writes next to data it does not own: ``.snapsync/`` sits in the directory
above a backed-up subvolume (a home directory, say), the metrics textfile in a directory shared with
node_exporter, locks in ``/run``. Whoever can write to such a directory could plant a symlink where
root is about to write. So directories snapsync owns are opened component by component with
``O_NOFOLLOW`` and must belong to the running user and be writable by nobody else; files in them are
opened relative to the directory's descriptor, created with ``O_EXCL`` and renamed into place.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from snapsync.errors import UnsafePath

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def lookup(root: Path, relative: PurePosixPath) -> os.stat_result | None:
    """``relative`` inside ``root`` without following a symlink on the way (each directory a real one of
    ``root``, the last component not followed either): a snapshot, another user's tree, cannot point
    the lookup elsewhere. None where it is not there."""
    at = root
    for part in relative.parts[:-1]:
        at = at / part
        try:
            if not stat.S_ISDIR(os.lstat(at).st_mode):
                return None
        except OSError:
            return None
    try:
        return os.lstat(at / relative.parts[-1]) if relative.parts else os.lstat(root)
    except OSError:
        return None


KINDS = ("directory", "file", "symlink", "other")


def kind_of(mode: int) -> str:
    return "directory" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "symlink" if stat.S_ISLNK(mode) else "other"


def check_private(st: os.stat_result, path: Path | str, what: str = "directory") -> None:
    """Owned by the running user and not writable by group or others, or refused with one line."""
    if st.st_uid != os.geteuid():
        raise UnsafePath(f"{path}: {what} is owned by uid {st.st_uid}, not {os.geteuid()}; refusing to use it")
    if st.st_mode & 0o022:
        raise UnsafePath(
            f"{path}: {what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it"
        )


def _open_child(parent: int, name: str, path: Path, create: bool, mode: int) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(f"{path}: not a directory (a symlink or a file); refusing to use it") from e
        raise
    try:
        os.mkdir(name, mode, dir_fd=parent)
        made = True
    except FileExistsError:
        made = False  # made by a concurrent run; opened and checked below like any other
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(f"{path}: not a directory (a symlink or a file); refusing to use it") from e
        raise
    if made:
        os.fchmod(fd, mode)  # the mode asked for, whatever the umask (a unit's UMask=0077 would hide metrics)
    return fd


def open_private_dir(path: Path | str, own: int = 1, create: bool = False, mode: int = 0o700) -> int:
    """A descriptor of ``path``; its last ``own`` components are snapsync's and checked.

    The components above are reached as the administrator configured them (they may be symlinks,
    as on NixOS). The owned ones are opened without following symlinks, created with ``mode`` when
    ``create`` (missing ones only), and must pass :func:`check_private`. Raises FileNotFoundError
    when one is missing and ``create`` is false.
    """
    path = Path(os.path.abspath(path))
    parts = path.parts
    own = max(0, min(own, len(parts) - 1))
    base = Path(*parts[: len(parts) - own])
    if create:
        base.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        current = base
        for name in parts[len(parts) - own :]:
            current = current / name
            child = _open_child(fd, name, current, create, mode)
            os.close(fd)
            fd = child
            check_private(os.fstat(fd), current)
        return fd
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def private_dir(path: Path | str, own: int = 1, create: bool = False, mode: int = 0o700) -> Iterator[int]:
    try:
        fd = open_private_dir(path, own, create, mode)
    except (FileNotFoundError, UnsafePath):
        raise
    except OSError as e:  # EACCES, EROFS, ENOSPC: one line naming the place, not an internal error
        raise UnsafePath(f"{path}: cannot use this directory: {e.strerror or e}") from e
    try:
        yield fd
    finally:
        os.close(fd)


def fd_path(dirfd: int, name: str = "") -> str:
    """A path through the descriptor, for calls that take only paths (the btrfs library): it cannot be
    redirected by renaming or replacing the directory's ancestors."""
    return f"/proc/self/fd/{dirfd}/{name}" if name else f"/proc/self/fd/{dirfd}"


def read_file(dirfd: int, name: str, limit: int = 1 << 20) -> bytes | None:
    """A regular file's bytes (at most ``limit``), or None when absent; a symlink or anything else
    in its place is refused."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePath(f"{name}: is a symlink; refusing to read it") from e
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(f"{name}: not a regular file; refusing to read it")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafePath(f"{name}: larger than {limit} bytes; refusing to read it")
    return data


def sync_dir(dirfd: int) -> None:
    os.fsync(dirfd)


def write_atomic(dirfd: int, name: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``name`` in the directory with ``data``: a fresh temporary file (``O_EXCL``, never a
    planted one), fsynced, then renamed over; a crash leaves the old file or the new one."""
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dirfd)
        except OSError:
            pass  # the write's own error (a full disk, say) is the one to report, not the cleanup's
        raise
    sync_dir(dirfd)


def create_empty(dirfd: int, name: str, mode: int = 0o600, sync: bool = True) -> None:
    """A new empty file (a marker); one that is already there must be a regular file of ours.

    ``sync=False`` leaves the directory's fsync to the caller, who makes several and syncs once."""
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)
    except FileExistsError:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{name}: not a regular file; refusing to use it") from None
        check_private(st, name, "file")
        return
    try:
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if sync:
        sync_dir(dirfd)


def remove(dirfd: int, name: str) -> bool:
    """Unlink a file entry (never following it); False when it was not there."""
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        return False
    sync_dir(dirfd)
    return True
