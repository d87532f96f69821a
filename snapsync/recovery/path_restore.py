"""Restore one file or directory, not a whole group: from a snapshot on this host, or from a target.

The path is named as it lives now (``/persist/forgejo/repos/x.git``); the group's dataset that holds
it and the snapshot (default: the newest that holds the path) give the source, read through the
backend's ``snapshot_files`` without following a symlink out of the snapshot. ``cp -a
--reflink=auto`` copies it (shared blocks where the filesystem can, with modes, owners, timestamps,
xattrs, ACLs and hard links) into a hidden name in the destination directory, which one rename then
makes visible: a cut leaves a hidden leftover, never a half copy under the real name, and the next
restore of that path removes it (once its process is gone). An existing
file or directory of that name is refused, or with ``overwrite`` renamed aside and kept.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from snapsync.errors import BackendError, UsageError
from snapsync.host.safefs import lookup, sync_dir
from snapsync.ops.versions import locate

if TYPE_CHECKING:
    from snapsync.ops.runner import Runner
    from snapsync.policy.loader import Group, Policy
    from snapsync.replication.replicate import ProgressFactory


HIDDEN = ".snapsync-restore-"


@dataclass(frozen=True)
class PathRestore:
    group: str
    dataset: str
    snapshot: str
    source: str
    to: str
    aside: str | None
    dry_run: bool

    def to_json(self) -> dict[str, object]:
        return {"group": self.group, "dataset": self.dataset, "snapshot": self.snapshot, "source": self.source,
                "to": self.to, "kept_aside": self.aside, "dry_run": self.dry_run}


@dataclass(frozen=True)
class _Wanted:
    dataset: str
    relative: PurePosixPath
    destination: Path
    aside: Path | None


def _wanted(policy: Policy, runner: Runner, group_name: str, paths: Sequence[str], to: str, now: datetime, overwrite: bool,
            whole: str) -> tuple[Group, list[_Wanted]]:
    """Every path checked before anything is copied: in the group, not a whole dataset, a free place
    (or one to set aside) in ``to``, no two paths landing on one name."""
    if not paths:
        raise UsageError("no --path given")
    wanted: list[_Wanted] = []
    group: Group | None = None
    for path in paths:
        group, dataset, relative = locate(policy, runner, path)
        if group.name != group_name:
            raise UsageError(f"{path}: in group {group.name}'s dataset {dataset}, not in group {group_name}")
        if not relative.parts:
            raise UsageError(f"{path}: the whole dataset; restore the group ({whole}) instead")
        destination = _destination(Path(to), relative)
        if any(w.destination == destination for w in wanted):
            raise UsageError(f"{path}: another --path lands on {destination} too")
        wanted.append(_Wanted(dataset, relative, destination, _aside(destination, now, overwrite)))
    assert group is not None
    return group, wanted


def restore_path(
    policy: Policy, runner: Runner, group_name: str, snapshot: str | None, paths: Sequence[str], to: str, now: datetime,
    *, overwrite: bool = False, dry_run: bool = False,
) -> list[PathRestore]:
    """Each path from the newest snapshot of its dataset that holds it (or from ``snapshot``)."""
    group, wanted = _wanted(policy, runner, group_name, paths, to, now, overwrite, f"restore {group_name} --from ... --to/--in-place")
    backend = runner.backend(group)
    planned: list[tuple[_Wanted, str, Path]] = []
    for w in wanted:
        names = sorted((s for s in backend.list_snapshots(w.dataset) if s.kind == "snapshot"), key=lambda s: (s.created, s.name), reverse=True)
        chosen: tuple[str, Path] | None = None
        for snap in names:
            if snapshot is not None and snap.name != snapshot:
                continue
            files = backend.snapshot_files(w.dataset, snap.name)
            if files is not None and lookup(files, w.relative) is not None:
                chosen = (snap.name, files)
                break
            if snapshot is not None:
                raise UsageError(f"{w.relative}: not in snapshot {snapshot} of {w.dataset}")
        if chosen is None:
            raise UsageError(f"{w.relative}: " + (f"no snapshot {snapshot} of {w.dataset}" if snapshot else f"in no snapshot of {w.dataset}"))
        planned.append((w, chosen[0], chosen[1] / w.relative))
    done = []
    for w, name, source in planned:
        if not dry_run:
            _copy(source, w.destination, w.aside)
        done.append(PathRestore(group.name, w.dataset, name, str(source), str(w.destination), str(w.aside) if w.aside else None, dry_run))
    return done


def restore_path_from(
    policy: Policy, runner: Runner, source: str, group_name: str, snapshot: str | None, paths: Sequence[str], to: str,
    now: datetime, *, overwrite: bool = False, key_file: str | None = None, scratch_parent: str | None = None,
    progress: ProgressFactory | None = None,
) -> list[PathRestore]:
    """The same from a target (another host, or offsite): the group's snapshot is restored once into the
    backend's throwaway place (as a drill does), the paths copied out of writable copies of it, and the
    place removed, whatever happens."""
    from snapsync.protocol import dataset_key
    from snapsync.recovery.restore import restore_from

    group, wanted = _wanted(policy, runner, group_name, paths, to, now, overwrite, f"restore {group_name} --from {source} --to/--in-place")
    backend = runner.backend(group)
    done = []
    with backend.scratch(f"snapsync-restore-{group.name}", group.datasets, scratch_parent) as scratch:
        restored = restore_from(policy, source, group.name, scratch.place, snapshot, progress=progress, key_file=key_file)
        copies: dict[str, Path] = {}
        for w in wanted:
            if w.dataset not in copies:
                copies[w.dataset] = scratch.writable(f"{group.name}/{dataset_key(w.dataset)}", restored.snapshot)
            if lookup(copies[w.dataset], w.relative) is None:
                raise UsageError(f"{w.relative}: not in {group.name}@{restored.snapshot} on {source}; nothing restored")
        for w in wanted:
            _copy(copies[w.dataset] / w.relative, w.destination, w.aside)
            done.append(PathRestore(group.name, w.dataset, restored.snapshot, f"{source}:{group.name}@{restored.snapshot}:{w.relative}",
                                    str(w.destination), str(w.aside) if w.aside else None, False))
    return done


def _aside(destination: Path, now: datetime, overwrite: bool) -> Path | None:
    if not os.path.lexists(destination):
        return None
    if not overwrite:
        raise UsageError(f"{destination} exists; nothing restored (--overwrite renames it aside and keeps it)")
    aside = destination.with_name(f"{destination.name}.before-restore-{now.strftime('%Y%m%dT%H%M%SZ')}")
    if os.path.lexists(aside):
        raise UsageError(f"{aside} exists too; nothing restored")
    return aside


def _destination(to: Path, relative: PurePosixPath) -> Path:
    if not to.is_dir():
        raise UsageError(f"--to {to}: not a directory")
    return to / relative.name


def _leftovers(destination: Path) -> list[Path]:
    """Hidden copies of ``destination`` that a restore killed mid-copy left (its process is gone)."""
    prefix = f".{destination.name}{HIDDEN}"
    out = []
    for entry in os.scandir(destination.parent):
        pid = entry.name[len(prefix):] if entry.name.startswith(prefix) else ""
        if pid.isdigit() and pid.isascii() and (int(pid) == os.getpid() or not _alive(int(pid))):
            out.append(Path(entry.path))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _copy(source: Path, destination: Path, aside: Path | None) -> None:
    for leftover in _leftovers(destination):
        _remove(leftover)  # hidden, never the real name: what a killed restore of this path left
    hidden = destination.with_name(f".{destination.name}{HIDDEN}{os.getpid()}")
    done = subprocess.run(["cp", "-a", "--reflink=auto", "--", str(source), str(hidden)], capture_output=True, text=True)
    if done.returncode != 0:
        _remove(hidden)
        raise BackendError(f"cp -a {source} {hidden}: {done.stderr.strip() or f'exit {done.returncode}'}")
    synced = subprocess.run(["sync", "-f", str(hidden)], capture_output=True, text=True)  # the data, before the name shows it
    if synced.returncode != 0:
        _remove(hidden)
        raise BackendError(f"sync -f {hidden}: {synced.stderr.strip() or f'exit {synced.returncode}'}")
    if aside is not None:
        os.rename(destination, aside)
    os.rename(hidden, destination)
    fd = os.open(destination.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sync_dir(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
