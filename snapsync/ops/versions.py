"""`snapsync versions PATH`: every distinct version of a file or directory across the local snapshots.

A path is found in the group dataset whose files hold it (the longest ``files_root`` that contains
it), then looked up in each snapshot of that dataset, newest first, through the backend's
``snapshot_files``. Identical versions collapse into one: same type, size and modification time,
as httm judges them. Nothing is followed out of a snapshot: every directory on the way must be a
directory of the snapshot itself, never a symlink, so a snapshot cannot point the lookup elsewhere.
:func:`distinct` is pure; :func:`find_versions` does the lookups.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from snapsync.backends.binds import binds_of, under
from snapsync.errors import UsageError

if TYPE_CHECKING:
    from snapsync.ops.runner import Runner
    from snapsync.policy.loader import Group, Policy

LIVE = "(live)"


@dataclass(frozen=True)
class Version:
    snapshot: str
    """The snapshot the version is seen in, or ``(live)`` for the dataset as it is now."""
    taken: datetime | None
    path: str
    kind: str
    size: int
    mtime_ns: int
    also_in: tuple[str, ...] = ()
    """Older snapshots holding the same version, collapsed into this one."""

    @property
    def mtime(self) -> datetime:
        return datetime.fromtimestamp(self.mtime_ns / 1e9, UTC)

    def same(self, other: Version) -> bool:
        return (self.kind, self.size, self.mtime_ns) == (other.kind, other.size, other.mtime_ns)

    def to_json(self) -> dict[str, object]:
        return {
            "snapshot": self.snapshot, "taken": self.taken.strftime("%Y-%m-%dT%H:%M:%SZ") if self.taken else None,
            "path": self.path, "kind": self.kind, "size": self.size,
            "mtime": self.mtime.isoformat(timespec="seconds").replace("+00:00", "Z"), "also_in": list(self.also_in),
        }


@dataclass(frozen=True)
class Found:
    group: str
    dataset: str
    relative: str
    versions: list[Version]


def distinct(seen: Sequence[Version]) -> list[Version]:
    """Newest first in, newest first out: a run of identical versions becomes its newest, naming the others."""
    out: list[Version] = []
    for version in seen:
        if out and out[-1].same(version):
            last = out[-1]
            out[-1] = Version(last.snapshot, last.taken, last.path, last.kind, last.size, last.mtime_ns, (*last.also_in, version.snapshot))
        else:
            out.append(version)
    return out


def _kind(mode: int) -> str:
    return "directory" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "symlink" if stat.S_ISLNK(mode) else "other"


def lookup(root: Path, relative: PurePosixPath) -> os.stat_result | None:
    """``relative`` inside ``root``, each directory on the way a real directory of it (no symlink followed)."""
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


def locate(policy: Policy, runner: Runner, path: str) -> tuple[Group, str, PurePosixPath]:
    """The group and dataset whose live files hold ``path``, and the path relative to them: as written,
    through symlinks, or through a bind mount of the dataset (impermanence shows ``/persist/forgejo``
    at ``/var/lib/forgejo``, and that is the path people know)."""
    roots = [(group, dataset, root) for group in policy.groups.values()
             for dataset in group.datasets if (root := runner.backend(group).files_root(dataset)) is not None]
    for wanted in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        best: tuple[int, Group, str, PurePosixPath] | None = None
        for group, dataset, root in roots:
            if under(wanted, root) and (best is None or len(root) > best[0]):
                best = (len(root), group, dataset, _rest(wanted, root))
        if best is not None:
            return best[1], best[2], best[3]
    wanted = os.path.abspath(path)
    for group, dataset, root in roots:
        for bind in binds_of(root):
            if under(wanted, bind.point):
                return group, dataset, PurePosixPath(bind.sub) / _rest(wanted, bind.point)
    raise UsageError(f"{path}: not inside any dataset of the policy's groups (nor a bind mount of one)")


def _rest(path: str, top: str) -> PurePosixPath:
    return PurePosixPath(path[len(top.rstrip("/")):].lstrip("/"))


def find_versions(policy: Policy, runner: Runner, path: str) -> Found:
    group, dataset, relative = locate(policy, runner, path)
    backend = runner.backend(group)
    seen: list[Version] = []
    root = backend.files_root(dataset)
    live = lookup(Path(root), relative) if root is not None else None
    if live is not None:
        seen.append(_version(LIVE, None, str(Path(root or "") / relative), live))
    snapshots = [s for s in backend.list_snapshots(dataset) if s.kind == "snapshot"]
    for snap in sorted(snapshots, key=lambda s: (s.created, s.name), reverse=True):
        files = backend.snapshot_files(dataset, snap.name)
        st = lookup(files, relative) if files is not None else None
        if st is not None:
            seen.append(_version(snap.name, snap.created, str(files / relative) if files else "", st))
    return Found(group.name, dataset, relative.as_posix(), distinct(seen))


def _version(snapshot: str, taken: datetime | None, path: str, st: os.stat_result) -> Version:
    return Version(snapshot, taken, path, _kind(st.st_mode), st.st_size, st.st_mtime_ns)
