"""A plain directory on btrfs made a subvolume in place (``snapsync adopt``), crash-safely.

The files go into a new subvolume beside the directory with ``cp --reflink=always``, which shares
every data block instead of copying it (no space used, no byte loop here). The copy is then compared
with the original entry by entry (type, mode, owner, size, allocated blocks, mtime, xattrs and with
them ACLs, file attributes, link targets, device numbers, hard links) and only then swapped in by
one ``renameat2(RENAME_EXCHANGE)``: the path names a whole directory at every instant. The original
stays beside it as ``NAME.snapsync-adopt-old`` until its owner deletes it: it shares its blocks with
the copy, so it costs next to no space until the service rewrites them, and it is the way back from
anything a comparison cannot see.

A journal beside the directory (``.NAME.snapsync-adopt``) records the phase reached, so that a run
after a stop at any step finishes the job:

- ``copy``: the new subvolume (``.NAME.snapsync-adopt-new``) is ours and was never used: deleted and
  made again;
- ``swap``: it was verified and its uuid recorded. Not swapped yet: compared again first (a service
  may have run since), copied again if the original changed. Swapped: only moving the original
  aside and removing the journal are left.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import shlex
import signal
import stat
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Literal

import btrfsutil

from snapsync.backends.base import Adoption
from snapsync.backends.usage import Mount, aliases, mounts
from snapsync.errors import BackendError, LockedError, UnsafePath, UsageError
from snapsync.host.safefs import (
    check_private,
    fd_path,
    read_file,
    remove,
    sync_dir,
    write_atomic,
)

log = logging.getLogger("snapsync.ops.adopt")

OLD_SUFFIX = ".snapsync-adopt-old"
STEPS = ("journal written", "subvolume made", "copied", "verified", "swapped", "original kept", "done")
"""Each step an adopt completes, in order; ``SNAPSYNC_TEST_KILL_AT="adopt: <step>"`` stops it there."""

_READ_ONLY = 1
_GETFLAGS, _SETFLAGS = 0x80086601, 0x40086602
_NOCOW = 0x00800000
_ATTRIBUTES = 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x80 | 0x400 | 0x10000 | _NOCOW
"""chattr attributes a copy keeps: compress, sync, immutable, append-only, nodump, noatime,
nocompress, dirsync, nocow."""
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_SHOWN = 5
_CALLED = "subvolume"

Phase = Literal["fresh", "recopy", "swap", "finish", "clear", "adopted"]


@dataclass(frozen=True)
class _Names:
    parent: str
    name: str

    @property
    def path(self) -> str:
        return os.path.join(self.parent, self.name)

    @property
    def new(self) -> str:
        return f".{self.name}.snapsync-adopt-new"

    @property
    def old(self) -> str:
        return f"{self.name}{OLD_SUFFIX}"

    @property
    def journal(self) -> str:
        return f".{self.name}.snapsync-adopt"

    def shown(self, entry: str) -> str:
        return os.path.join(self.parent, entry)


def _step(step: str, path: str) -> None:
    """A step is done: logged, and SIGKILLed here when ``$SNAPSYNC_TEST_KILL_AT`` names it (tests only)."""
    log.info("adopt step: %s %s", step, path, extra={"event": "adopt-step", "step": step, "path": path})
    if os.environ.get("SNAPSYNC_TEST_KILL_AT") == f"adopt: {step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _home(path: str, table: list[Mount]) -> Mount | None:
    """The mount ``path`` is on: the longest mount point above it."""
    real = os.path.realpath(path)
    above = [m for m in table if real == m.point or real.startswith(m.point.rstrip("/") + "/")]
    return max(reversed(above), key=lambda m: len(m.point), default=None)


def _names(path: str) -> _Names | None:
    """The directory's resolved parent and its name; None when the parent is not on btrfs."""
    absolute = os.path.abspath(path)
    name = os.path.basename(absolute)
    if not name:
        raise UsageError(f"{path}: the root directory cannot be adopted")
    parent = os.path.realpath(os.path.dirname(absolute))
    home = _home(parent, mounts())
    if home is None or home.fstype != "btrfs":
        return None
    names = _Names(parent, name)
    if len(names.new.encode()) > 255:
        raise UsageError(f"{path}: the name is too long to make room for {names.new} beside it")
    return names


@contextmanager
def _parent(names: _Names) -> Iterator[int]:
    """The directory's parent as a descriptor: every step goes through it, so renaming the
    directories above cannot redirect one; only root may change it, or a swap could be raced."""
    try:
        fd = os.open(names.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"{names.parent}: {e.strerror or e}") from None
    try:
        try:
            check_private(os.fstat(fd), names.parent)
        except UnsafePath as e:
            raise UsageError(f"{e}: adopt swaps entries only where nobody else can rename them") from None
        yield fd
    finally:
        os.close(fd)


def _lstat(parent: int, entry: str) -> os.stat_result | None:
    try:
        return os.stat(entry, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _subvolume(parent: int, entry: str) -> btrfsutil.SubvolumeInfo | None:
    st = _lstat(parent, entry)
    if st is None or not stat.S_ISDIR(st.st_mode) or not btrfsutil.is_subvolume(fd_path(parent, entry)):
        return None
    return btrfsutil.subvolume_info(fd_path(parent, entry))


def _journal(parent: int, names: _Names) -> dict[str, object] | None:
    try:
        raw = read_file(parent, names.journal)
        data = None if raw is None else json.loads(raw)
    except (OSError, ValueError) as e:
        raise BackendError(f"{names.shown(names.journal)}: unreadable adopt journal: {e}") from e
    if raw is not None and (not isinstance(data, dict) or data.get("phase") not in ("copy", "swap")):
        raise BackendError(f"{names.shown(names.journal)}: not an adopt journal; look at it and remove it")
    return data


def _write_journal(parent: int, names: _Names, phase: str, uuid: str | None = None) -> None:
    data = {"version": 1, "directory": names.name, "phase": phase, "subvolume": uuid}
    try:
        write_atomic(parent, names.journal, json.dumps(data).encode())
    except OSError as e:
        raise BackendError(f"{names.shown(names.journal)}: cannot write: {e.strerror or e}") from e


def _check_directory(parent: int, names: _Names) -> None:
    """Refuse what a copy cannot carry (not a directory, a mount point, subvolumes inside) and a
    name the original could not be kept under."""
    path = names.path
    if _lstat(parent, names.old) is not None:
        raise UsageError(f"{names.shown(names.old)} exists (from an earlier adopt?); look at it and rename it away first")
    st = _lstat(parent, names.name)
    if st is None:
        raise UsageError(f"{path}: does not exist")
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{path}: is a symlink (to {os.readlink(names.name, dir_fd=parent)}); adopt the directory where it lives")
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path}: not a directory")
    table = mounts()
    on = [m for m in table if m.point == path]
    if on:
        elsewhere = [a for a in aliases(path, table) if a != path]
        where = f"; adopt it where it lives ({', '.join(elsewhere[:3])})" if elsewhere else "; unmount it first"
        raise UsageError(f"{path}: is a mount point ({on[-1].fstype} {on[-1].source}, root {on[-1].root}){where}")
    inside = _subvolumes_below(path, table)
    if inside:
        more = f" and {len(inside) - _SHOWN} more" if len(inside) > _SHOWN else ""
        raise UsageError(
            f"{path}: contains subvolumes ({', '.join(inside[:_SHOWN])}{more}); a copy cannot take them along: "
            "leave it a directory and list those subvolumes as datasets (or exclude them)"
        )


def _subvolumes_below(path: str, table: list[Mount]) -> list[str]:
    """Subvolumes anywhere below the directory: the directories on a device of their own that
    nothing is mounted on (one stat per directory, none per file)."""
    device = os.lstat(path).st_dev
    points = {m.point for m in table}
    found = []
    for root, dirs, _ in os.walk(path):
        entered = []
        for d in dirs:
            inner = os.path.join(root, d)
            if os.lstat(inner).st_dev == device:
                entered.append(d)
            elif inner not in points and btrfsutil.is_subvolume(inner):
                found.append(inner)
        dirs[:] = entered
    return sorted(found)


def _inspect(parent: int, names: _Names) -> tuple[Phase, str | None]:
    """How far an adopt of the directory got, from its journal and what is there; every state
    that is not one an adopt leaves is refused, naming what to look at."""
    journal = _journal(parent, names)
    here, new = _subvolume(parent, names.name), _subvolume(parent, names.new)
    unexpected = (
        f"{names.path}: an adopt was begun ({names.shown(names.journal)}) but what is there is not what it leaves; "
        f"look at {names.path}, {names.shown(names.new)} and {names.shown(names.old)}, keep what you want at "
        f"{names.path} and remove the journal"
    )
    if journal is None:
        if here is not None:
            return "adopted", None
        if _lstat(parent, names.new) is not None:
            raise UsageError(f"{names.shown(names.new)} exists but no adopt of {names.path} was begun: not ours to delete; look at it and remove it")
        _check_directory(parent, names)
        return "fresh", None
    uuid = journal.get("subvolume")
    if journal["phase"] == "copy":
        if here is not None or (_lstat(parent, names.new) is not None and (new is None or new.flags & _READ_ONLY)):
            raise BackendError(unexpected)
        _check_directory(parent, names)
        return "recopy", None
    if here is not None and here.uuid.hex() == uuid:
        if _lstat(parent, names.new) is not None:
            if _lstat(parent, names.old) is not None:
                raise BackendError(unexpected)
            return "finish", str(uuid)
        return "clear", str(uuid)
    if new is not None and new.uuid.hex() == uuid:
        _check_directory(parent, names)
        return "swap", str(uuid)
    raise BackendError(unexpected)


def _plan(names: _Names, phase: Phase) -> Adoption:
    path, new, old = names.path, names.shown(names.new), names.shown(names.old)
    copy = (
        f"make the subvolume {new} and copy {path} into it sharing every block (cp --reflink=always: no data is copied)",
        "compare the copy with the original: types, modes, owners, sizes, allocated blocks, mtimes, xattrs and ACLs, "
        "file attributes, links, device numbers, hard links",
    )
    swap = (f"swap them in one atomic rename: {path} becomes the subvolume", f"keep the original directory at {old}")
    steps: tuple[str, ...]
    if phase == "adopted":
        return Adoption(path, "adopted", kept=old if os.path.lexists(old) else None, called=_CALLED)
    if phase == "fresh":
        return Adoption(path, "directory", copy + swap, touches_live=True, kept=old, called=_CALLED)
    if phase == "recopy":
        steps = (f"delete {new}, the copy a stopped adopt left unfinished", *copy, *swap)
    elif phase == "swap":
        steps = (f"compare {new}, the copy a stopped adopt verified, with the original again (copy again if it changed)", *swap)
    elif phase == "finish":
        steps = (f"move the original directory from {new} to {old}", "remove the journal")
    else:
        steps = ("remove the journal (the subvolume is in place, the original at " + old + ")",)
    return Adoption(path, "interrupted", steps, touches_live=phase in ("recopy", "swap"), kept=old, called=_CALLED)


def adoption(path: str) -> Adoption | None:
    names = _names(path)
    if names is None:
        return _mount_root(path)
    with _parent(names) as parent:
        return _plan(names, _inspect(parent, names)[0])


def _mount_root(path: str) -> Adoption | None:
    """A btrfs mounted right at ``path``, in a directory of another filesystem: a subvolume mounted
    there is adopted already; a directory bind-mounted there is adopted where it lives."""
    real = os.path.realpath(path)
    table = mounts()
    on = [m for m in table if m.point == real]
    if not on or on[-1].fstype != "btrfs":
        return None
    if btrfsutil.is_subvolume(real):
        return Adoption(real, "adopted", called=_CALLED)
    elsewhere = [a for a in aliases(real, table) if a != real]
    raise UsageError(
        f"{real}: is a mount point (a bind mount of {on[-1].root} on {on[-1].source}); adopt the directory where it "
        f"lives{' (' + ', '.join(elsewhere[:3]) + ')' if elsewhere else ''}"
    )


def adopt(path: str) -> Adoption:
    names = _names(path)
    if names is None:
        found = _mount_root(path)
        if found is None:
            raise UsageError(f"{path}: not on btrfs")
        return found
    with _parent(names) as parent:
        try:
            fcntl.flock(parent, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{names.parent}: another snapsync adopt is working in this directory") from None
        try:
            return _adopt_in(parent, names)
        except (OSError, btrfsutil.BtrfsUtilError) as e:
            raise BackendError(
                f"{names.path}: adopt failed: {e.strerror or e}; running it again finishes or undoes what was begun"
            ) from e


def _adopt_in(parent: int, names: _Names) -> Adoption:
    """The steps left from the phase reached; the caller holds the directory's lock."""
    phase, _ = _inspect(parent, names)
    planned = _plan(names, phase)
    if phase == "adopted":
        return planned
    notes: list[str] = []
    if phase in ("fresh", "recopy"):
        notes = _copy_and_verify(parent, names, fresh=phase == "fresh")
    elif phase == "swap":
        differences, notes = _differences(fd_path(parent, names.name), fd_path(parent, names.new), names)
        if differences:
            notes = _copy_and_verify(parent, names, fresh=False)
            notes.insert(0, f"{names.path} changed after a stopped adopt copied it (did a service run?): copied again")
    if phase in ("fresh", "recopy", "swap"):
        _swap(parent, names)
    _finish(parent, names, phase)
    kept = names.shown(names.old)
    notes.append(
        f"the original directory is kept at {kept}, sharing its blocks with the subvolume; when satisfied: "
        f"rm -rf --one-file-system {shlex.quote(kept)}"
    )
    return replace(planned, kept=kept, notes=tuple(notes))


def _copy_and_verify(parent: int, names: _Names, *, fresh: bool) -> list[str]:
    """The copy, made and compared; its uuid is recorded (phase swap) once it matches. Anything
    failing before that removes the copy and the journal: the directory is as it was."""
    _write_journal(parent, names, "copy")  # first: from here on the copy is disposable, even a verified one
    _step("journal written", names.path)
    try:
        if not fresh:
            _discard(parent, names)
        btrfsutil.create_subvolume(fd_path(parent, names.new))
        _step("subvolume made", names.path)
        src, dst = _through(parent, names.name), _through(parent, names.new)
        _mirror_attributes(src, dst, before=True)
        done = subprocess.run(
            ["cp", "--recursive", "--no-dereference", "--preserve=mode,ownership,timestamps,links,xattr",
             "--reflink=always", "--one-file-system", "--no-target-directory", "--", src, dst],
            capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            said = " | ".join(done.stderr.replace(_through(parent, ""), names.parent + "/").strip().splitlines()[-3:])
            hint = (
                " (a file whose nocow attribute, chattr +C, differs from its directory's while it has several hard "
                "links cannot share its blocks: give it its directory's attribute)" if "clone" in said else ""
            )
            raise BackendError(f"{names.path}: copying into {names.shown(names.new)} failed: {said}{hint}")
        _mirror_attributes(src, dst, before=False)
        _step("copied", names.path)
        differences, notes = _differences(src, dst, names)
        if differences:
            raise BackendError(
                f"{names.path}: the copy differs from the original, so nothing was swapped ({'; '.join(differences)}); "
                "is something writing to it?"
            )
        _syncfs(parent)
        uuid = btrfsutil.subvolume_info(fd_path(parent, names.new)).uuid.hex()
        _write_journal(parent, names, "swap", uuid)
    except BaseException:
        try:
            _discard(parent, names)
            remove(parent, names.journal)
        except (OSError, btrfsutil.BtrfsUtilError):
            pass  # the journal stays: the next run removes the copy; the error being raised is the one to see
        raise
    _step("verified", names.path)
    return notes


def _discard(parent: int, names: _Names) -> None:
    """Delete the copy: a writable subvolume of ours that nothing ever used."""
    if _subvolume(parent, names.new) is not None:
        btrfsutil.delete_subvolume(fd_path(parent, names.new))


def _swap(parent: int, names: _Names) -> None:
    _rename2(parent, names, names.name, names.new, _RENAME_EXCHANGE)
    sync_dir(parent)
    _step("swapped", names.path)


def _finish(parent: int, names: _Names, phase: Phase) -> None:
    if phase != "clear":
        _rename2(parent, names, names.new, names.old, _RENAME_NOREPLACE)
        sync_dir(parent)
        _step("original kept", names.path)
    remove(parent, names.journal)
    _step("done", names.path)


_libc = ctypes.CDLL(None, use_errno=True)


def _rename2(parent: int, names: _Names, source: str, target: str, flags: int) -> None:
    if _libc.renameat2(parent, source.encode(), parent, target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise BackendError(f"{names.shown(source)}: renaming it to {target} failed: {os.strerror(err)}")


def _syncfs(fd: int) -> None:
    """The copy on disk before it is recorded as verified: a crash after that must find it whole."""
    if _libc.syncfs(fd) != 0:
        raise BackendError(f"syncfs: {os.strerror(ctypes.get_errno())}")


def _through(parent: int, entry: str) -> str:
    """A path through this process's descriptor that a child process (cp) can follow too."""
    return f"/proc/{os.getpid()}/fd/{parent}/{entry}"


# --- file attributes (chattr) ---------------------------------------------------------------------


def _flags(path: str) -> int | None:
    """A regular file's or directory's chattr attributes that a copy keeps; None for other entries,
    which are never opened (opening a device can act: a watchdog starts, a tape rewinds)."""
    if not stat.S_ISREG(os.lstat(path).st_mode) and not stat.S_ISDIR(os.lstat(path).st_mode):
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) and not stat.S_ISDIR(os.fstat(fd).st_mode):
            return None
        return int(struct.unpack("I", fcntl.ioctl(fd, _GETFLAGS, bytes(4)))[0]) & _ATTRIBUTES
    finally:
        os.close(fd)


def _set_flags(path: str, wanted: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        current = int(struct.unpack("I", fcntl.ioctl(fd, _GETFLAGS, bytes(4)))[0])
        if current & _ATTRIBUTES != wanted:
            fcntl.ioctl(fd, _SETFLAGS, struct.pack("I", (current & ~_ATTRIBUTES) | wanted))
    finally:
        os.close(fd)


def _walk(top: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` of one subvolume: mount points and nested subvolumes are not entered."""
    device = os.lstat(top).st_dev
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(root, d)).st_dev == device]
        yield root, dirs, files


def _mirror_attributes(src: str, dst: str, *, before: bool) -> None:
    """The copy's chattr attributes made the original's.

    Before the copy, only nocow (chattr +C, set by journald, databases): blocks can be shared only
    between files that agree on it, a new file takes its directory's, and it can be changed only on
    an empty file. So directories, and files alone in disagreeing with their directory, are made
    first with the original's. After the copy, every other attribute (immutable, append-only, ...).
    """
    if before:
        _set_flags(dst, (_flags(src) or 0) & _NOCOW)
    for root, dirs, files in _walk(src):
        rel = os.path.relpath(root, src)
        here = (_flags(root) or 0) & _NOCOW
        for entry in dirs + files:
            original = os.path.join(root, entry)
            flags = _flags(original)
            if flags is None:
                continue
            copy = os.path.normpath(os.path.join(dst, rel, entry))
            if not before:
                _set_flags(copy, flags)
                continue
            if flags & _NOCOW == here:
                continue
            st = os.lstat(original)
            if stat.S_ISDIR(st.st_mode):
                os.makedirs(copy, mode=0o700, exist_ok=True)
            elif st.st_nlink == 1:
                os.makedirs(os.path.dirname(copy), mode=0o700, exist_ok=True)
                os.close(os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            else:
                continue
            _set_flags(copy, flags & _NOCOW)


# --- the comparison -------------------------------------------------------------------------------


def _xattrs(path: str) -> dict[str, bytes]:
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(os.listxattr(path, follow_symlinks=False))}


def _differences(src: str, dst: str, names: _Names) -> tuple[list[str], list[str]]:
    """What differs between the original and its copy (the first few, and how many), and notes on
    what a copy within the directory cannot carry (hard links to files outside it)."""
    found: list[str] = []
    links: dict[int, int] = {}
    back: dict[int, int] = {}
    seen: dict[int, int] = {}
    nlinks: dict[int, tuple[int, str, str]] = {}
    outside = 0

    def shown(rel: str) -> str:
        return names.path if rel == "." else os.path.join(names.path, rel)

    def compare(rel: str, a: os.stat_result, b: os.stat_result, pa: str, pb: str) -> None:
        if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
            found.append(f"{shown(rel)}: a different kind of file")
            return
        fields = [("mode", oct(a.st_mode), oct(b.st_mode)), ("owner", (a.st_uid, a.st_gid), (b.st_uid, b.st_gid)),
                  ("mtime", a.st_mtime_ns, b.st_mtime_ns)]
        if not stat.S_ISDIR(a.st_mode):
            fields.append(("size", a.st_size, b.st_size))
        if stat.S_ISREG(a.st_mode):
            fields.append(("allocated blocks", a.st_blocks, b.st_blocks))
        if stat.S_ISLNK(a.st_mode):
            fields.append(("link target", os.readlink(pa), os.readlink(pb)))
        if stat.S_ISCHR(a.st_mode) or stat.S_ISBLK(a.st_mode):
            fields.append(("device number", a.st_rdev, b.st_rdev))
        fields.append(("xattrs or ACLs", _xattrs(pa), _xattrs(pb)))
        fields.append(("file attributes", _flags(pa), _flags(pb)))
        for what, x, y in fields:
            if x != y:
                found.append(f"{shown(rel)}: {what} differ")
        if not stat.S_ISDIR(a.st_mode) and a.st_nlink > 1:
            if links.setdefault(a.st_ino, b.st_ino) != b.st_ino or back.setdefault(b.st_ino, a.st_ino) != a.st_ino:
                found.append(f"{shown(rel)}: hard links differ")
            seen[a.st_ino] = seen.get(a.st_ino, 0) + 1
            if seen[a.st_ino] == 1:
                nlinks[a.st_ino] = (a.st_nlink, pb, rel)
        elif not stat.S_ISDIR(a.st_mode) and b.st_nlink != 1:
            found.append(f"{shown(rel)}: hard links differ")

    compare(".", os.lstat(src), os.lstat(dst), src, dst)
    for root, dirs, files in _walk(src):
        rel = os.path.relpath(root, src)
        copy = os.path.normpath(os.path.join(dst, rel))
        theirs = set(os.listdir(copy))
        mine = set(os.listdir(root))
        device = os.lstat(src).st_dev
        entered = set(dirs)
        for entry in sorted(mine ^ theirs):
            found.append(f"{shown(os.path.normpath(os.path.join(rel, entry)))}: {'missing from' if entry in mine else 'only in'} the copy")
        for entry in sorted(mine & theirs):
            pa, pb = os.path.join(root, entry), os.path.join(copy, entry)
            a, b = os.lstat(pa), os.lstat(pb)
            if stat.S_ISDIR(a.st_mode) and entry not in entered and a.st_dev != device:
                continue  # a mount point: what is mounted there is not the directory's
            compare(os.path.normpath(os.path.join(rel, entry)), a, b, pa, pb)
    for ino, (nlink, copy, rel) in nlinks.items():
        count = seen[ino]
        if os.lstat(copy).st_nlink != count:
            found.append(f"{shown(rel)}: hard links differ")
        if nlink > count:
            outside += 1
    notes = [f"{outside} file(s) had hard links outside {names.path}: their copies are separate files"] if outside else []
    more = [f"and {len(found) - _SHOWN} more"] if len(found) > _SHOWN else []
    return found[:_SHOWN] + more, notes
