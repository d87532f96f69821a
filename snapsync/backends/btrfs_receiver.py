"""The receiving side of replication on btrfs: copies of a source's snapshots below a root directory.

Layout: ``<root>/<group>/<dataset key>/<snapshot>``, see :func:`snapsync.protocol.dataset_key`.
Before ``btrfs receive`` starts, a marker file ``.receiving/<snapshot>`` is written (and synced); it
is removed only after receive exited 0 and the new subvolume is read-only with the expected
received_uuid, in its place. Removing the marker is the commit point: a copy with a marker is by
construction a partial one (the next receive deletes it), and a copy without one was complete when
it arrived; if it is writable now, somebody changed it, and it is user data, not debris.

The stream comes from another host and is not trusted: ``btrfs receive`` follows the paths, ``..``
and symlinks the stream names. So it runs chrooted (``-C``) in an empty staging directory,
``.incoming/<snapshot>``, where the only thing it can reach is the subvolume it creates. Only after
the result is checked (one read-only subvolume, the expected received_uuid, a parent among this
dataset's own copies) is it moved into place: made writable for the instant of a rename (btrfs
refuses to move a read-only subvolume to another directory, EROFS), then read-only again.

Used in-process for ``local`` targets and by ``snapsync serve`` for ssh targets; knows nothing about
policies or retention.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import btrfsutil

from snapsync.backends.base import Capabilities, StorageBackend
from snapsync.backends.btrfs import BtrfsBackend, CopiesBackend
from snapsync.backends.receiver import Copy, PartialDelete, PartialReceive
from snapsync.errors import BackendError, CommandFailed, UnsafePath
from snapsync.host.lock import file_lock
from snapsync.protocol import Refused, check_name, check_path
from snapsync.host.safefs import create_empty, fd_path, private_dir, remove, sync_dir
from snapsync.host.streams import Proc, finish

MARKERS = ".receiving"
STAGING = ".incoming"
LOCK = ".lock"
_READ_ONLY = 1
_NO_UUID = bytes(16)
RECEIVE_LOCK_TIMEOUT = 120.0


def _subvolumes(directory: Path) -> Iterator[tuple[str, btrfsutil.SubvolumeInfo]]:
    if not directory.is_dir():
        return
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            if btrfsutil.is_subvolume(entry.path):
                yield entry.name, btrfsutil.subvolume_info(entry.path)
        except btrfsutil.BtrfsUtilError as e:
            raise BackendError(f"{entry.path}: {e.strerror or e}") from e


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _markers(directory: Path) -> set[str]:
    try:
        with private_dir(directory / MARKERS, own=1) as fd:
            return {e.name for e in os.scandir(fd_path(fd)) if e.is_file(follow_symlinks=False)}
    except FileNotFoundError:
        return set()


def _mark(directory: Path, names: Sequence[str]) -> None:
    """Markers for every copy a receive may create, durable before it starts: one directory sync
    for a whole chain (an empty file has no data of its own to sync)."""
    with private_dir(directory / MARKERS, own=1, create=True) as fd:
        for name in names:
            create_empty(fd, name, sync=False)
        sync_dir(fd)


def _unmark(directory: Path, name: str) -> None:
    try:
        with private_dir(directory / MARKERS, own=1) as fd:
            remove(fd, name)
    except FileNotFoundError:
        return


def _mount_point(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _remove_dir(parent: int, name: str) -> None:
    """Remove a directory a hostile stream may have filled, however deep: subvolumes are deleted as
    such, symlinks never followed; iterative, so no depth can exhaust the stack."""
    stack = [(parent, name, os.open(name, _DIR, dir_fd=parent))]
    try:
        while stack:
            up, entry_name, fd = stack[-1]
            descended = False
            for entry in os.scandir(fd_path(fd)):
                if not entry.is_dir(follow_symlinks=False):
                    os.unlink(entry.name, dir_fd=fd)
                elif btrfsutil.is_subvolume(fd_path(fd, entry.name)):
                    _delete(Path(fd_path(fd, entry.name)))
                else:
                    stack.append((fd, entry.name, os.open(entry.name, _DIR, dir_fd=fd)))
                    descended = True
                    break
            if not descended:
                stack.pop()
                os.close(fd)
                os.rmdir(entry_name, dir_fd=up)
    finally:
        for _, _, fd in stack:
            os.close(fd)


def _clear_staging(directory: Path, names: list[str] | None = None) -> None:
    """Remove staging directories (all, or those of ``names``) with everything in them."""
    try:
        incoming = os.open(directory / STAGING, _DIR)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UnsafePath(f"{directory / STAGING}: not a directory of snapsync's; refusing") from e
    try:
        for entry in list(os.scandir(fd_path(incoming))):
            if names is not None and entry.name not in names:
                continue
            if entry.is_dir(follow_symlinks=False):
                _remove_dir(incoming, entry.name)
            else:
                os.unlink(entry.name, dir_fd=incoming)
    finally:
        os.close(incoming)


def _copy(name: str, info: btrfsutil.SubvolumeInfo, partial: bool) -> Copy:
    return Copy(
        name=name,
        uuid=info.uuid.hex(),
        received_uuid=None if info.received_uuid == _NO_UUID else info.received_uuid.hex(),
        read_only=bool(info.flags & _READ_ONLY),
        partial=partial,
        created=datetime.fromtimestamp(info.otime, UTC),
    )


def _delete(path: Path) -> None:
    try:
        btrfsutil.delete_subvolume(path)
    except btrfsutil.BtrfsUtilError as e:
        raise BackendError(f"{path}: delete failed: {e.strerror or e}") from e


def _identities(directory: Path) -> set[bytes]:
    """The uuids and received uuids of the dataset's copies: what a received copy may be made from."""
    own: set[bytes] = set()
    for _, info in _subvolumes(directory):
        own |= {info.uuid, info.received_uuid}
    own.discard(_NO_UUID)
    return own


def _holds_same_data(directory: Path, parent_uuid: bytes, own: set[bytes]) -> bool:
    """Whether the subvolume a received copy was snapshotted from is one of this dataset's copies
    (``own``: :func:`_identities`), or a subvolume elsewhere on the filesystem carrying the same
    identity as one of them (btrfs picks any subvolume with the parent's received_uuid: a restore
    next to an earlier one, say). Anything else would let a stream read another root's data."""
    if parent_uuid in own:
        return True
    mount = Path(os.path.abspath(directory))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    with btrfsutil.SubvolumeIterator(mount, top=5, info=True) as subvolumes:
        for _, info in subvolumes:
            if info.uuid == parent_uuid:
                return bool({info.uuid, info.received_uuid} & own)
    return False


class BtrfsReceiver:
    """Copies below ``root``; every path a caller passes is relative and validated again here.

    ``append_only``: :meth:`delete` is refused (a forced receive needs no rollback here, so it is
    received like any other). ``stall``: a stream that delivers no byte for that many seconds is stopped.
    """

    kind: ClassVar[str] = BtrfsBackend.kind
    capabilities: ClassVar[Capabilities] = BtrfsBackend.capabilities

    def __init__(self, root: str | os.PathLike[str], *, append_only: bool = False, stall: float | None = None) -> None:
        self.root = Path(root)
        self.append_only = append_only
        self.stall = stall

    def directory(self, rel: str) -> Path:
        """The dataset directory for ``rel``, refusing anything that resolves outside the root."""
        check_path(rel)
        path = self.root / rel
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
            raise Refused(f"{rel}: resolves outside the served root {self.root}")
        return path

    def source(self, rel: str, backend: StorageBackend) -> tuple[str, StorageBackend]:
        """A dataset directory (a plain directory of copies, not a subvolume) is served by a backend
        whose snapshots are the copies; a subvolume below the root by ``backend``."""
        directory = self.directory(rel)
        if directory.is_dir() and not btrfsutil.is_subvolume(directory):
            return str(directory), CopiesBackend()
        return str(directory), backend

    def check_root(self) -> None:
        if not self.root.is_dir():
            raise BackendError(
                f"target root {self.root} does not exist (create it on a btrfs filesystem, as a subvolume: "
                f"btrfs subvolume create {self.root})"
            )
        try:
            btrfsutil.subvolume_id(self.root)
        except btrfsutil.BtrfsUtilError as e:
            raise BackendError(f"target root {self.root} is not on a btrfs filesystem: {e.strerror or e}") from e

    def copies(self, rel: str) -> list[Copy]:
        """Every subvolume in the dataset directory by name; ``partial`` where a receive never committed."""
        directory = self.directory(rel)
        markers = _markers(directory)
        return [_copy(n, i, partial=n in markers) for n, i in _subvolumes(directory)]

    def listing(self, rel: str) -> tuple[list[Copy], str | None]:
        """Copies and resume token; btrfs has no resumable receive, so never a token."""
        return self.copies(rel), None

    @contextmanager
    def _locked(self, directory: Path) -> Iterator[None]:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with file_lock(directory / LOCK, RECEIVE_LOCK_TIMEOUT, f"receiving into {directory}"):
            yield

    def _discard(self, directory: Path, names: list[str] | None = None) -> list[str]:
        """Delete partial copies (those with a marker), all or only ``names``, and what their
        receives left in staging; then their markers."""
        removed = []
        _clear_staging(directory, names)
        for name in sorted(_markers(directory)):
            if names is not None and name not in names:
                continue
            path = directory / name
            if os.path.lexists(path):
                if path.is_symlink() or not btrfsutil.is_subvolume(path):
                    raise BackendError(f"{path}: marked as a partial receive but not a subvolume; not touching it")
                _delete(path)
                removed.append(name)
            _unmark(directory, name)
        return removed

    def receive(
        self, rel: str, name: str, guid: str, stdin: int, compress: str = "none", force: bool = False,
        then: Sequence[tuple[str, str]] = (),
    ) -> dict[str, object]:
        """Receive the stream from ``stdin`` (an fd) as ``name``; it must carry the identity ``guid``.
        With ``then``, the streams of those snapshots follow, each built on the one before, into the
        same ``btrfs receive``: each is checked and moved into place (its marker removed) on its own,
        in order, so a cut keeps the ones that arrived whole (:class:`PartialReceive`).

        Returns what happened, including partial copies of earlier attempts that were removed first.
        ``force`` (roll the target back) needs nothing here: btrfs receives into a new subvolume, and
        the planner deletes the diverged copies before.
        """
        chain = [(check_name(name), guid), *((check_name(n), g) for n, g in then)]
        names = [n for n, _ in chain]
        self.check_root()
        directory = self.directory(rel)
        committed: list[str] = []
        with self._locked(directory):
            removed = self._discard(directory)
            for n in names:
                if os.path.lexists(directory / n):
                    raise BackendError(f"{rel}/{n} already exists on the target")
            _mark(directory, names)
            procs: list[Proc] = []
            try:
                with private_dir(directory, own=1) as home:
                    with private_dir(directory / STAGING, own=1, create=True) as incoming:
                        os.mkdir(name, 0o700, dir_fd=incoming)
                        staging = os.open(name, _DIR, dir_fd=incoming)
                    try:
                        feed: int = stdin
                        if compress == "zstd":
                            procs.append(Proc.start(["zstd", "-d", "-q", "-c"], stdin=stdin, stdout=-1, label="zstd -d (target)"))
                            assert procs[0].popen.stdout is not None
                            feed = procs[0].popen.stdout.fileno()
                        argv = self._receive_argv(directory / STAGING / name, chained=bool(then))
                        procs.append(Proc.start(argv, stdin=feed, stdout=subprocess.DEVNULL, label="btrfs receive"))
                        if compress == "zstd":
                            assert procs[0].popen.stdout is not None
                            procs[0].popen.stdout.close()
                        stopped: CommandFailed | None = None
                        try:
                            finish(procs, stall=self.stall)
                        except CommandFailed as e:
                            if "not reachable from inside the root subvol" in e.stderr:
                                raise BackendError(
                                    f"btrfs receive: the stream's parent is not reachable from inside the root subvol {self.root} "
                                    "(btrfs found a copy of it outside this root first: keep each source's copies in one root "
                                    "per filesystem); refused"
                                ) from e
                            if not then:
                                raise
                            stopped = e
                        self._check_staged(staging, names, partial_ok=stopped is not None)
                        own = _identities(directory)  # once: each copy of a chain adds its own below
                        for n, g in chain:
                            try:
                                self._verify(directory, staging, n, g, own)
                            except BackendError as e:
                                if not committed:
                                    raise stopped or e from None
                                raise PartialReceive(f"{stopped or e}; received {', '.join(committed)} before it", committed) from e
                            own |= self._move_into_place(home, staging, n, g)
                            _unmark(directory, n)
                            committed.append(n)
                    finally:
                        os.close(staging)
                _clear_staging(directory, [name])
            except BaseException:
                try:
                    _clear_staging(directory, [name])  # a chain's staging is named after its first, kept or not
                    self._discard(directory, [n for n in names if n not in committed])
                except Exception:
                    pass  # the receive's own error matters more; the next receive cleans up
                raise
            finally:
                for p in procs:
                    p.close()
        last = committed[-1]
        return {"name": last, "path": f"{rel}/{last}", "removed_partials": removed, "received": committed}

    def _receive_argv(self, staging: Path, chained: bool = False) -> list[str]:
        """``btrfs receive`` chrooted into ``staging``, in a private mount namespace where the
        filesystem is mounted ``nodev,nosuid``: a stream may create device nodes (a backup of /dev
        holds them) but never open one, so it cannot write to a disk of this host through a node
        it made. When the root is a subvolume of its own, that subvolume is the mount btrfs resolves
        parents and clone sources against, so a stream can build on nothing outside the root (btrfs
        finds both through the filesystem-wide UUID tree, which no chroot confines)."""
        receive = ["btrfs", "receive", *([] if chained else ["-e"]), "-C", str(staging)]  # -e stops at a stream's end
        isolated = self.isolated()
        script = 'mount -o remount,bind,nodev,nosuid -- "$1" && shift && exec "$@"'
        if isolated:
            script = 'mount --bind -- "$1" "$1" && ' + script
        mount = self.root if isolated else _mount_point(staging)
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "sh", str(mount), *receive]

    def isolated(self) -> bool:
        """Whether receives below this root are confined to it (the root is a subvolume, not the
        filesystem's top level): then no stream can clone or snapshot another root's copies."""
        try:
            return bool(btrfsutil.is_subvolume(self.root)) and btrfsutil.subvolume_id(self.root) != 5
        except btrfsutil.BtrfsUtilError:
            return False

    @staticmethod
    def _check_staged(staging: int, names: list[str], partial_ok: bool) -> None:
        """The staging directory holds nothing but subvolumes asked for: all of them, or (a stream
        that stopped) at least one. Anything else refuses the whole stream before a copy is kept."""
        found = sorted(os.listdir(fd_path(staging)))  # a new open: btrfs lists only entries older than the fd
        wanted = set(names)
        if not found or not set(found) <= wanted or (not partial_ok and len(found) != len(wanted)):
            what = " and ".join(names) if len(names) < 3 else f"{names[0]} .. {names[-1]} ({len(names)})"
            raise BackendError(f"btrfs receive created {', '.join(found) or 'nothing'}, not the subvolume {what}; refusing the stream")

    def _verify(self, directory: Path, staging: int, name: str, guid: str, own: set[bytes]) -> None:
        """Staged ``name`` is one read-only subvolume carrying ``guid``, made from nothing or from one
        of this dataset's own copies."""
        path = fd_path(staging, name)
        if not os.path.lexists(path) or not stat.S_ISDIR(os.lstat(path).st_mode) or not btrfsutil.is_subvolume(path):
            raise BackendError(f"btrfs receive did not create the subvolume {name}; refusing the stream")
        info = btrfsutil.subvolume_info(path)
        copy = _copy(name, info, partial=True)
        if not copy.read_only or copy.received_uuid != guid:
            raise BackendError(
                f"received {name} is incomplete (read_only={copy.read_only}, received_uuid={copy.received_uuid}, "
                f"expected {guid}); discarded"
            )
        if info.parent_uuid != _NO_UUID and not _holds_same_data(directory, info.parent_uuid, own):
            raise BackendError(
                f"received {name} was made from subvolume {info.parent_uuid.hex()}, which is not a copy in {directory}; "
                "a stream may only build on this dataset's own copies: refused"
            )

    def _move_into_place(self, home: int, staging: int, name: str, guid: str) -> set[bytes]:
        """Returns the placed copy's identities, which the next copy of a chain may be made from."""
        staged = fd_path(staging, name)
        btrfsutil.set_subvolume_read_only(staged, False)
        os.rename(name, name, src_dir_fd=staging, dst_dir_fd=home)
        placed = fd_path(home, name)
        btrfsutil.set_subvolume_read_only(placed, True)
        copy = _copy(name, btrfsutil.subvolume_info(placed), partial=True)
        if not copy.read_only or copy.received_uuid != guid:
            raise BackendError(f"{name}: lost its identity while moved into place (received_uuid={copy.received_uuid}); discarded")
        os.fsync(home)
        return {bytes.fromhex(copy.uuid), bytes.fromhex(guid)}

    def resume(self, rel: str, stdin: int, compress: str = "none") -> dict[str, object]:
        raise Refused("resumable receive is a ZFS feature; this btrfs target has nothing to resume")

    def delete_partials(self, rel: str, names: list[str]) -> list[str]:
        """Delete leftovers of interrupted receives (only copies that still carry a marker)."""
        for name in names:
            check_name(name)
        directory = self.directory(rel)
        if not directory.is_dir():
            return []
        with self._locked(directory):
            return self._discard(directory, names)

    def delete(self, rel: str, names: list[str], allow_writable: bool = False) -> list[str]:
        """Delete copies by name. Writable ones were changed on the target: only with ``allow_writable``.

        Only subvolumes that arrived by receive (they carry a received_uuid) are ours to delete,
        whatever the flags; anything else in the directory was put there by someone else. A copy
        refused or failing stops only its own name; :class:`PartialDelete` then says which went.
        """
        if self.append_only:
            raise Refused("this store is append-only: it never deletes a copy; prune on the target itself")
        for name in names:
            check_name(name)
        directory = self.directory(rel)
        deleted: list[str] = []
        left: list[str] = []
        if not directory.is_dir():
            return deleted
        with self._locked(directory):
            markers = _markers(directory)
            for name in dict.fromkeys(names):
                path = directory / name
                if not os.path.lexists(path):
                    continue
                try:
                    why = _not_deletable(path, name in markers, allow_writable)
                    if why is None:
                        btrfsutil.delete_subvolume(path)
                except (OSError, btrfsutil.BtrfsUtilError) as e:
                    left.append(f"{rel}/{name}: delete failed: {e.strerror or e}")
                    continue
                if why is not None:
                    left.append(f"refusing to delete {rel}/{name}: {why}")
                    continue
                deleted.append(name)
        if left:
            raise PartialDelete("; ".join(left), deleted)
        return deleted


def _not_deletable(path: Path, marked: bool, allow_writable: bool) -> str | None:
    """Why the subvolume at ``path`` is no copy of ours to delete, or None."""
    if marked:
        return "a receive is (or was) in progress"
    if path.is_symlink() or not btrfsutil.is_subvolume(path):
        return "not a btrfs subvolume"
    copy = _copy(path.name, btrfsutil.subvolume_info(path), partial=False)
    if copy.received_uuid is None:
        return "it did not arrive by receive (no received_uuid), so it is somebody's data, not a copy of ours"
    if not copy.read_only and not allow_writable:
        return "it was made writable (changed on the target)"
    return None
