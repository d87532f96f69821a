"""`snapsync diff GROUP A [B]`: what changed in each dataset between two snapshots, or since one.

Both sides are read as trees through the backend's ``snapshot_files`` (and ``files_root`` for now),
never following a symlink. btrfs and ZFS keep a file's inode number across snapshots, so a path that
left one side and appeared on the other with the same inode is a rename, not a removal and an
addition. A directory counts as modified only when its mode or owner changed: its size and time
change whenever an entry in it does, which the entries themselves already say. :func:`compare` is
pure; :func:`diff_group` reads the trees.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from snapsync.errors import UsageError

if TYPE_CHECKING:
    from snapsync.ops.runner import Runner
    from snapsync.policy.loader import Policy

NOW = "now"


@dataclass(frozen=True)
class Entry:
    ino: int
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: str | None = None
    """Where a symlink points."""

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass
class Changes:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"added": self.added, "removed": self.removed, "modified": self.modified,
                "renamed": [{"from": a, "to": b} for a, b in self.renamed]}

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.modified or self.renamed)


def _changed(a: Entry, b: Entry) -> bool:
    if stat.S_IFMT(a.mode) != stat.S_IFMT(b.mode) or (a.mode, a.uid, a.gid) != (b.mode, b.uid, b.gid):
        return True
    if a.is_dir:
        return False
    return (a.size, a.mtime_ns, a.target) != (b.size, b.mtime_ns, b.target) or a.ino != b.ino


def compare(old: dict[str, Entry], new: dict[str, Entry]) -> Changes:
    """Paths (relative, ``/``-separated) of the old tree against the new one."""
    changes = Changes()
    gone = {p: e for p, e in old.items() if p not in new}
    came = {p: e for p, e in new.items() if p not in old}
    by_inode = {(e.ino, stat.S_IFMT(e.mode)): p for p, e in came.items()}
    moved: set[str] = set()
    for path, entry in sorted(gone.items()):
        match = by_inode.get((entry.ino, stat.S_IFMT(entry.mode)))
        if match is not None and match not in moved:
            moved.add(match)
            changes.renamed.append((path, match))
            if _changed(entry, came[match]):
                changes.modified.append(match)
        else:
            changes.removed.append(path)
    changes.added = sorted(p for p in came if p not in moved)
    changes.modified = sorted(changes.modified + [p for p in old if p in new and _changed(old[p], new[p])])
    renamed_dirs = [(a, b) for a, b in changes.renamed if old[a].is_dir]
    changes.renamed = [(a, b) for a, b in changes.renamed if not any(_below(a, d) and _below(b, e) for d, e in renamed_dirs)]
    return changes


def _below(path: str, directory: str) -> bool:
    return path.startswith(directory + "/")


def read_tree(root: Path) -> dict[str, Entry]:
    """Every path below ``root`` (not ``root`` itself), by lstat: symlinks are entries, never followed,
    and a directory of another filesystem or subvolume (another device: inode numbers of their own) is
    an entry whose contents belong to that dataset, not this one."""
    tree: dict[str, Entry] = {}
    device = os.lstat(root).st_dev
    todo = [("", root)]
    while todo:
        rel, directory = todo.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for item in entries:
            path = f"{rel}{item.name}"
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue
            target = os.readlink(item.path) if stat.S_ISLNK(st.st_mode) else None
            tree[path] = Entry(st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, target)
            if stat.S_ISDIR(st.st_mode) and st.st_dev == device:
                todo.append((f"{path}/", Path(item.path)))
    return tree


def diff_group(policy: Policy, runner: Runner, group_name: str, old: str, new: str | None) -> dict[str, Changes]:
    """Per dataset of the group, the changes from snapshot ``old`` to snapshot ``new`` (None: the live data)."""
    group = policy.groups.get(group_name)
    if group is None:
        raise UsageError(f"no group {group_name!r} in {policy.source}")
    backend = runner.backend(group)
    out: dict[str, Changes] = {}
    for dataset in group.datasets:
        sides = []
        for name in (old, new):
            root = backend.files_root(dataset) if name is None else backend.snapshot_files(dataset, name)
            if root is None:
                what = "its live files" if name is None else f"snapshot {name}"
                raise UsageError(f"{dataset}: {what} cannot be read here (see `snapsync list {group_name}`)")
            sides.append(read_tree(Path(root)))
        if new is None:
            ignore = _snapshot_home_below(backend.snapshot_home(dataset), backend.files_root(dataset))
            sides = [{p: e for p, e in side.items() if not (p == ignore or (ignore and _below(p, ignore)))} for side in sides]
        out[dataset] = compare(sides[0], sides[1])
    return out


def _snapshot_home_below(home: str, root: str | None) -> str | None:
    """Where the dataset keeps its snapshots, relative to its live files, when that is inside them."""
    if root is None:
        return None
    try:
        return Path(home).relative_to(root).as_posix()
    except ValueError:
        return None
