"""`snapsync adopt`: plain directories made datasets of their own, in place, so that a group can list them.

On an impermanence host the per-service directories under ``/persist/system/var/lib`` are usually
plain directories, which cannot be snapshotted alone. The filesystem's backend does the work (btrfs:
a copy sharing every block into a new subvolume, compared, swapped in by one atomic rename; ZFS: a
refusal with the commands that do it by hand). This module picks the backend for each path and
refuses before anything changes when any path is bad input or in use; a rerun after a stop finishes.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from snapsync.backends import FILESYSTEMS
from snapsync.backends.base import Adoption, StorageBackend
from snapsync.backends.usage import Holder, aliases, mounts
from snapsync.errors import SnapsyncError, UsageError
from snapsync.policy.loader import Policy

log = logging.getLogger("snapsync.ops.adopt")


class Busy(UsageError):
    """A directory is in use; nothing was done."""


@dataclass
class AdoptReport:
    """One path of `snapsync adopt`: what was found, what was (or would be) done."""

    adoption: Adoption
    dry_run: bool
    holders: list[Holder] = field(default_factory=list)
    """What uses the directory now (a dry run lists it; a run refuses)."""
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, object]:
        return {
            **self.adoption.to_json(), "dry_run": self.dry_run, "ok": self.ok, "error": self.error,
            "adopted": self.ok and (self.adoption.state == "adopted" or not self.dry_run),
            "in_use": [h.to_json() for h in self.holders], "notes": [*self.adoption.notes, *self.notes],
        }


def _backends() -> list[StorageBackend]:
    return [fs.place_source(None) for fs in FILESYSTEMS.values()]


def plan(path: str, backends: Sequence[StorageBackend] | None = None) -> tuple[StorageBackend, Adoption]:
    """The backend whose filesystem ``path`` is on, and what adopting it takes; UsageError (exit 2)
    for anything that is not a directory it can adopt."""
    if not os.path.lexists(path):
        raise UsageError(f"{path}: does not exist")
    if os.path.islink(path):
        raise UsageError(f"{path}: is a symlink (to {os.readlink(path)}); adopt the directory where it lives")
    if not os.path.isdir(path):
        raise UsageError(f"{path}: not a directory")
    for backend in backends if backends is not None else _backends():
        found = backend.adoption(path)
        if found is not None:
            return backend, found
    real = os.path.realpath(path)
    home = max((m for m in mounts() if _under(real, m.point)), key=lambda m: len(m.point), default=None)
    on = f"on {home.fstype}" if home is not None else "on an unknown filesystem"
    raise UsageError(f"{path}: {on}; snapsync makes datasets only on {' and '.join(FILESYSTEMS)}")


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def users(backend: StorageBackend, path: str) -> list[Holder]:
    """Who uses the directory: the backend's ``in_use``, less the processes it found only by the
    device number, which for a plain directory is its whole subvolume's (every service's files)."""
    shown = aliases(path)
    return [h for h in backend.in_use([path]) if h.kind == "mount" or any(_under(h.path, a) for a in shown)]


def busy_message(path: str, found: Sequence[Holder]) -> str:
    """Why the directory is busy, and the exact commands around the adopt: stop the units, unmount
    the bind mounts of it (an impermanence host has one for every service), and afterwards both back."""
    units = sorted({h.unit for h in found if h.kind == "process" and h.unit and not h.unit.endswith(".scope")})
    pids = sorted({str(h.pid) for h in found if h.kind == "process" and h.pid is not None and h.unit not in units})
    try:
        me = os.stat(path)
    except OSError:
        me = None

    def shows_it(point: str) -> bool:
        try:
            st = os.stat(point)
        except OSError:
            return False
        return me is not None and (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino)

    points = list(dict.fromkeys(h.path for h in found if h.kind == "mount"))
    binds = [p for p in points if shows_it(p)]
    others = [p for p in points if p not in binds]
    q = shlex.quote
    before, after = [], []
    if units:
        before.append(f"systemctl stop {' '.join(units)}")
    if pids:
        before.append(f"kill {' '.join(pids)}")
    if points:
        before.append(f"umount {' '.join(q(p) for p in reversed(points))}")
    after += [f"mount --bind {q(path)} {q(p)}" for p in binds]
    if others:
        after.append(f"mount {' '.join(q(p) for p in others)} again as before")
    if units:
        after.append(f"systemctl start {' '.join(units)}")
    what = "; ".join(h.describe() for h in found[:8]) + (f" (and {len(found) - 8} more)" if len(found) > 8 else "")
    then = f"; afterwards: {' && '.join(after)}" if after else ""
    return f"{path} is in use: {what}; first: {' && '.join(before)}; then run snapsync adopt again{then}"


def policy_notes(policy: Policy | None, path: str) -> list[str]:
    """What the policy needs once ``path`` is a dataset: a nested dataset is in none of its
    parent's snapshots, so until a group lists it, it is backed up nowhere."""
    if policy is None:
        return [f"list {path} as a dataset of a group in the policy, or nothing backs it up"]
    listing = [g.name for g in policy.groups.values() if path in g.datasets]
    if listing:
        return [f"group {listing[0]} lists {path}: its next snapshot takes it"]
    inside = [(g.name, d) for g in policy.groups.values() for d in g.datasets if path.startswith(d.rstrip("/") + "/")]
    if inside:
        group, dataset = inside[-1]
        return [
            f"{path} is inside {dataset} (group {group}), whose snapshots leave it out once it is a dataset of "
            f"its own: add it to groups.{group}.datasets (or another group's) to keep backing it up"
        ]
    return [f"list {path} as a dataset of a group in {policy.source}, or nothing backs it up"]


def adopt(
    paths: Sequence[str], *, dry_run: bool, policy: Policy | None = None,
    backends: Sequence[StorageBackend] | None = None,
) -> list[AdoptReport]:
    """Every path checked and planned first: bad input (exit 2) and use (Busy, exit 2; a dry run
    lists it) refuse before anything changes. Then each is adopted; one that fails is reported
    and the others go on."""
    chosen = [plan(p, backends) for p in dict.fromkeys(paths)]
    reports = []
    for backend, found in chosen:
        holders = users(backend, found.path) if found.touches_live else []
        notes = policy_notes(policy, found.path) if found.state != "adopted" else []
        reports.append(AdoptReport(found, dry_run, holders, notes))
    busy = [r for r in reports if r.holders]
    if busy and not dry_run:
        raise Busy("; ".join(busy_message(r.adoption.path, r.holders) for r in busy))
    if dry_run:
        return reports
    for report, (backend, found) in zip(reports, chosen):
        if found.state == "adopted":
            continue
        try:
            report.adoption = backend.adopt(found.path)
        except SnapsyncError as e:
            report.error = str(e)
            log.error("adopt %s failed: %s", found.path, e, extra={"event": "adopt-failed", "path": found.path})
            continue
        log.info("adopted %s", found.path, extra={"event": "adopted", "path": found.path})
    return reports
