"""The receiving side of replication on btrfs: copies of a source's snapshots below a root directory.

Layout: ``<root>/<group>/<dataset key>/<snapshot>``, see :func:`snapsync.protocol.dataset_key`.
Before ``btrfs receive`` starts, a marker file ``.receiving/<snapshot>`` is written (and synced); it
is removed only after receive exited 0 and the new subvolume is read-only with the expected
received_uuid. Removing the marker is the commit point: a copy with a marker is by construction a
partial one (the next receive deletes it), and a copy without one was complete when it arrived; if
it is writable now, somebody changed it, and it is user data, not debris. (A received subvolume
cannot simply be renamed into place: btrfs refuses to move a read-only subvolume, EROFS.)

Used in-process for ``local`` targets and by ``snapsync serve`` for ssh targets; knows nothing about
policies or retention.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import btrfsutil

from snapsync.errors import BackendError, CommandFailed
from snapsync.lock import file_lock
from snapsync.protocol import Refused, check_name, check_path
from snapsync.streams import Proc, finish

MARKERS = ".receiving"
LOCK = ".lock"
_READ_ONLY = 1
_NO_UUID = bytes(16)
RECEIVE_LOCK_TIMEOUT = 120.0


@dataclass(frozen=True)
class Copy:
    """One subvolume in a dataset directory (or a partial in ``.incoming``)."""

    name: str
    uuid: str
    received_uuid: str | None
    read_only: bool
    partial: bool
    created: datetime

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "received_uuid": self.received_uuid,
            "read_only": self.read_only,
            "partial": self.partial,
            "created": self.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Copy:
        return cls(
            name=str(data["name"]),
            uuid=str(data["uuid"]),
            received_uuid=None if data.get("received_uuid") is None else str(data["received_uuid"]),
            read_only=bool(data["read_only"]),
            partial=bool(data["partial"]),
            created=datetime.strptime(str(data["created"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC),
        )


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


def _markers(directory: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(directory / MARKERS) if e.is_file(follow_symlinks=False)}
    except FileNotFoundError:
        return set()


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mark(directory: Path, name: str) -> None:
    markers = directory / MARKERS
    markers.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(markers / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _sync_dir(markers)


def _unmark(directory: Path, name: str) -> None:
    try:
        os.unlink(directory / MARKERS / name)
    except FileNotFoundError:
        return
    _sync_dir(directory / MARKERS)


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


class BtrfsStore:
    """Copies below ``root``; every path a caller passes is relative and validated again here."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def directory(self, rel: str) -> Path:
        """The dataset directory for ``rel``, refusing anything that resolves outside the root."""
        check_path(rel)
        path = self.root / rel
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
            raise Refused(f"{rel}: resolves outside the served root {self.root}")
        return path

    def check_root(self) -> None:
        if not self.root.is_dir():
            raise BackendError(f"target root {self.root} does not exist (create it, on a btrfs filesystem)")
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
        """Delete partial copies (those with a marker), all or only ``names``; then their markers."""
        removed = []
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
        self, rel: str, name: str, guid: str, stdin: int, compress: str = "none", force: bool = False
    ) -> dict[str, object]:
        """Receive one stream from ``stdin`` (an fd) as ``name``; it must carry the identity ``guid``.

        Returns what happened, including partial copies of earlier attempts that were removed first.
        ``force`` (roll the target back) needs nothing here: btrfs receives into a new subvolume, and
        the planner deletes the diverged copies before.
        """
        check_name(name)
        self.check_root()
        directory = self.directory(rel)
        with self._locked(directory):
            removed = self._discard(directory)
            if os.path.lexists(directory / name):
                raise BackendError(f"{rel}/{name} already exists on the target")
            before = {n for n, _ in _subvolumes(directory)}
            _mark(directory, name)
            procs: list[Proc] = []
            try:
                feed: int = stdin
                if compress == "zstd":
                    procs.append(Proc.start(["zstd", "-d", "-q", "-c"], stdin=stdin, stdout=-1, label="zstd -d (target)"))
                    assert procs[0].popen.stdout is not None
                    feed = procs[0].popen.stdout.fileno()
                procs.append(Proc.start(["btrfs", "receive", "-e", str(directory)], stdin=feed, stdout=subprocess.DEVNULL, label="btrfs receive"))
                if compress == "zstd":
                    assert procs[0].popen.stdout is not None
                    procs[0].popen.stdout.close()
                finish(procs)
                self._verify(directory, before, name, guid)
                _unmark(directory, name)
            except BaseException:
                for extra in {n for n, _ in _subvolumes(directory)} - before - {name}:
                    _mark(directory, extra)
                try:
                    self._discard(directory)
                except BackendError:
                    pass  # the receive's own error matters more; the next receive cleans up
                raise
            finally:
                for p in procs:
                    p.close()
        return {"name": name, "path": f"{rel}/{name}", "removed_partials": removed}

    def _verify(self, directory: Path, before: set[str], name: str, guid: str) -> None:
        arrived = {n: i for n, i in _subvolumes(directory) if n not in before}
        info = arrived.get(name)
        if info is None or len(arrived) != 1:
            found = ", ".join(arrived) or "nothing"
            raise BackendError(f"btrfs receive created {found}, not {name}; refusing the stream")
        copy = _copy(name, info, partial=True)
        if not copy.read_only or copy.received_uuid != guid:
            raise BackendError(
                f"received {name} is incomplete (read_only={copy.read_only}, received_uuid={copy.received_uuid}, "
                f"expected {guid}); discarded"
            )

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
        """Delete copies by name. Writable ones are user data: only with ``allow_writable``.

        Only subvolumes that arrived by receive (a received_uuid, or writable after a change) are
        ours to delete; anything else in the directory was put there by someone else.
        """
        for name in names:
            check_name(name)
        directory = self.directory(rel)
        deleted: list[str] = []
        if not directory.is_dir():
            return deleted
        with self._locked(directory):
            markers = _markers(directory)
            for name in names:
                path = directory / name
                if not os.path.lexists(path):
                    continue
                if name in markers:
                    raise BackendError(f"refusing to delete {rel}/{name}: a receive is (or was) in progress")
                if path.is_symlink() or not btrfsutil.is_subvolume(path):
                    raise BackendError(f"refusing to delete {rel}/{name}: not a btrfs subvolume")
                copy = _copy(name, btrfsutil.subvolume_info(path), partial=False)
                if not copy.read_only and not allow_writable:
                    raise BackendError(f"refusing to delete {rel}/{name}: it was made writable (changed on the target)")
                if copy.read_only and copy.received_uuid is None:
                    raise BackendError(f"refusing to delete {rel}/{name}: not a received copy")
                _delete(path)
                deleted.append(name)
        return deleted


