"""``snapsync drill``: prove a backup restores, by restoring it somewhere harmless and checking it.

A backup nobody has restored is a hope. A drill restores a group's newest snapshot from a target
(offsite or another host) into a throwaway place (a sparse loop btrfs; on ZFS a scratch dataset in
the group's pool), then checks what a person would, on a writable copy of what was restored. From
an ssh target it reads through the target's own key, as ``restore`` does: a key whose line on the
backup host may only receive fails the drill with one line naming ``--allow-restore``
(:meth:`~snapsync.replication.peer.Peer.readable`). The checks:

* files: every file of the restored copy against the source snapshot, when this host still has it;
* SQLite (the group's sqlite hooks): ``PRAGMA integrity_check`` on each database, with its WAL
  applied as the application would see it;
* PostgreSQL (a postgres hook with ``data_dir``): a throwaway server started on a writable copy of
  the restored PGDATA, as the data's owner, on a private socket, that must recover and answer the
  hook's ``check_query``.

The throwaway place and the copies are the backend's (:meth:`StorageBackend.scratch`), the checks of
each hook live with the hook (:func:`snapsync.ops.hooks.check_restored`).

The result is recorded (``$SNAPSYNC_STATE_DIR/drills/<group>.<target>.json``, default
``/var/lib/snapsync``) for monitoring, and everything restored is deleted afterwards.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from snapsync.backends.base import StorageBackend
from snapsync.errors import SnapsyncError
from snapsync.host.state import state_dir, write_json
from snapsync.ops.hooks import Check, check_restored
from snapsync.policy.loader import Group, Policy
from snapsync.protocol import dataset_key
from snapsync.recovery.restore import restore_from


@dataclass
class DrillReport:
    group: str
    target: str
    started: datetime
    snapshot: str | None = None
    seconds: float = 0.0
    restored_bytes: int = 0
    checks: list[Check] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group, "target": self.target, "ok": self.ok, "snapshot": self.snapshot,
            "started": self.started.isoformat(), "seconds": round(self.seconds, 3),
            "restored_bytes": self.restored_bytes, "checks": [c.to_json() for c in self.checks], "error": self.error,
        }


def record(report: DrillReport) -> Path:
    """Write the result atomically, where monitoring reads it."""
    path = state_dir() / "drills" / f"{report.group}.{report.target}.json"
    write_json(path, report.to_json())
    return path


def _digest(root: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for directory, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                out[rel] = "-> " + os.readlink(path)
                continue
            if not stat.S_ISREG(mode):  # a FIFO or a device node: never opened, compared by type
                out[rel] = f"type {stat.S_IFMT(mode):o}"
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            out[rel] = h.hexdigest()
    return out


def compare_files(restored: Path, source: Path | None, dataset: str) -> Check:
    if source is None or not source.is_dir():
        return Check(f"files {dataset}", True, "the source no longer has this snapshot: compared nothing, the stream checks stand")
    got, want = _digest(restored), _digest(source)
    if got == want:
        return Check(f"files {dataset}", True, f"{len(got)} files identical to the source snapshot")
    differ = sorted(k for k in got.keys() & want.keys() if got[k] != want[k])
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    parts = [f"{len(differ)} differ ({', '.join(differ[:5])})" if differ else "",
             f"{len(missing)} missing ({', '.join(missing[:5])})" if missing else "",
             f"{len(extra)} extra ({', '.join(extra[:5])})" if extra else ""]
    return Check(f"files {dataset}", False, "; ".join(p for p in parts if p))


def _inside(path: str, datasets: list[str]) -> tuple[str, str] | None:
    """The dataset holding ``path``, and the path relative to it."""
    best = max((d for d in datasets if path == d or path.startswith(d.rstrip("/") + "/")), key=len, default=None)
    return None if best is None else (best, os.path.relpath(path, best))


def _locator(roots: dict[str, str | None], copies: dict[str, Path]) -> Callable[[str], Path | None]:
    """Maps a path of the live system (as a hook names it) to the same file in the restored copies;
    ``roots``: dataset -> where its live files are seen, ``copies``: dataset -> its writable copy."""
    seen: dict[str, str] = {}
    for ds, root in roots.items():
        if root is not None:
            seen.setdefault(root, ds)

    def locate(path: str) -> Path | None:
        found = _inside(path, list(seen))
        return None if found is None else copies[seen[found[0]]] / found[1]

    return locate


def drill(
    policy: Policy,
    group: Group,
    target_name: str,
    backend: StorageBackend,
    now: datetime,
    *,
    scratch_parent: str | None = None,
    progress: Callable[[str, int | None], Callable[[int], None] | None] | None = None,
) -> DrillReport:
    report = DrillReport(group.name, target_name, now)
    started = time.monotonic()
    try:
        with backend.scratch(f"snapsync-drill-{group.name}", group.datasets, scratch_parent) as scratch:
            restored = restore_from(policy, target_name, group.name, scratch.place, progress=progress)
            report.snapshot = restored.snapshot
            report.restored_bytes = restored.bytes
            copies = {ds: scratch.writable(f"{group.name}/{dataset_key(ds)}", restored.snapshot) for ds in group.datasets}
            for ds, copy in copies.items():
                report.checks.append(compare_files(copy, backend.snapshot_files(ds, restored.snapshot), ds))
            locate = _locator({ds: backend.files_root(ds) for ds in group.datasets}, copies)
            for hook in group.hooks:
                report.checks += check_restored(hook, locate, scratch.directory)
    except SnapsyncError as e:
        report.error = str(e)
    except OSError as e:
        report.error = f"{getattr(e, 'filename', '') or ''}: {e.strerror or e}".lstrip(": ")
    report.seconds = time.monotonic() - started
    record(report)
    return report
