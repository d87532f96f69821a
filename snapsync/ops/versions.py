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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from snapsync.backends.binds import binds_of, under
from snapsync.errors import SnapsyncError, UsageError
from snapsync.host.safefs import kind_of, lookup
from snapsync.plan.naming import parse_snapshot_name

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
    target: str | None = None
    """The target whose copy holds it; None for this host."""

    @property
    def mtime(self) -> datetime:
        try:
            return datetime.fromtimestamp(self.mtime_ns / 1e9, UTC)
        except (OverflowError, OSError, ValueError):  # set by hand beyond what a date can say
            return datetime.max.replace(tzinfo=UTC) if self.mtime_ns > 0 else datetime.min.replace(tzinfo=UTC)

    def same(self, other: Version) -> bool:
        return (self.kind, self.size, self.mtime_ns) == (other.kind, other.size, other.mtime_ns)

    def to_json(self) -> dict[str, object]:
        return {
            "snapshot": self.snapshot, "taken": self.taken.strftime("%Y-%m-%dT%H:%M:%SZ") if self.taken else None,
            "path": self.path, "kind": self.kind, "size": self.size,
            "mtime": self.mtime.isoformat(timespec="seconds").replace("+00:00", "Z"), "also_in": list(self.also_in), "target": self.target,
        }


@dataclass(frozen=True)
class Found:
    group: str
    dataset: str
    relative: str
    versions: list[Version]
    notes: list[str] = field(default_factory=list)
    """Targets that could not be asked, or not read in place, and why."""


def distinct(seen: Sequence[Version]) -> list[Version]:
    """Newest first in, newest first out: a run of identical versions becomes its newest, naming the
    others (or its newest on this host, when a target's copy is newer still)."""
    out: list[Version] = []
    for version in seen:
        if out and out[-1].same(version):
            last = out[-1]
            if last.target is not None and version.target is None:  # read it here rather than over the network
                out[-1] = replace(version, also_in=(*last.also_in, last.snapshot))
            else:
                out[-1] = replace(last, also_in=(*last.also_in, version.snapshot))
        else:
            out.append(version)
    return out


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


def find_versions(policy: Policy, runner: Runner, path: str, targets: Sequence[str] | None = ()) -> Found:
    """This host's versions, and those the copies on ``targets`` hold (None: every target of the
    group), asked through ``serve``'s ``stat`` as a restore reads them; one list by the time each
    snapshot was taken."""
    group, dataset, relative = locate(policy, runner, path)
    targets = group.targets if targets is None else targets
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
            seen.append(_version(snap.name, parse_snapshot_name(group.prefix, snap.name) or snap.created, str(files / relative) if files else "", st))
    notes: list[str] = []
    for target in targets:
        seen += _on_target(policy, group, dataset, relative, target, notes)
    seen.sort(key=lambda v: (v.taken is None, v.taken or datetime.min.replace(tzinfo=UTC), v.target is None), reverse=True)
    return Found(group.name, dataset, relative.as_posix(), distinct(seen), notes)


def _on_target(policy: Policy, group: Group, dataset: str, relative: PurePosixPath, target: str, notes: list[str]) -> list[Version]:
    """What ``target``'s copies of ``dataset`` hold at ``relative``; a target that cannot say is a note, not a failure."""
    from snapsync.policy.schema import LocalTarget, SshTarget
    from snapsync.protocol import dataset_key
    from snapsync.replication.peer import Peer
    from snapsync.replication.transport import transport_for

    where = policy.targets.get(target)
    if where is None:
        raise UsageError(f"{policy.source}: no target {target!r} (targets: {', '.join(sorted(policy.targets)) or 'none'})")
    if not isinstance(where, (SshTarget, LocalTarget)):
        notes.append(f"{target}: an offsite archive keeps streams, not files; restore {group.name} --from {target} --path ... reads one")
        return []
    try:
        seen, unreadable = Peer(transport_for(target, where), "send", restore=True).stat(f"{group.name}/{dataset_key(dataset)}", relative.as_posix())
    except SnapsyncError as e:
        notes.append(str(e))  # it names the target
        return []
    if unreadable:
        notes.append(f"{target}: {unreadable} copies are not mounted there (ZFS keeps copies unmounted); "
                     f"restore {group.name}@SNAPSHOT --from {target} --path ... reads them")
    return [Version(f"{target}:{s.name}", taken, f"{target}:{group.name}@{s.name}", s.kind, s.size, s.mtime_ns, target=target)
            for s in seen if (taken := parse_snapshot_name(group.prefix, s.name)) is not None]  # a copy's own time is when it arrived


def _version(snapshot: str, taken: datetime | None, path: str, st: os.stat_result) -> Version:
    return Version(snapshot, taken, path, kind_of(st.st_mode), st.st_size, st.st_mtime_ns)
