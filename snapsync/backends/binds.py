"""Bind mounts of a dataset, re-pointed when a rollback swaps the dataset.

Impermanence bind-mounts every service directory from ``/persist`` into place at boot. A bind mount
holds the directory it was made from, not its path: once a rollback renames the old state aside,
``/var/lib/forgejo`` would go on showing (and taking writes into) the state moved aside. So a
rollback records the binds of each dataset before it changes anything, and after each swap (and each
undo) re-points every one: unmount it, bind the same path inside the dataset again, with the same
per-mount flags. Each step checks first, so a rerun after a stop anywhere converges. Both
filesystems alike: a bind mount is the host's, not the filesystem's.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from snapsync.backends.usage import Mount, mounts
from snapsync.errors import BackendError, UsageError

KEPT_FLAGS = ("ro", "nosuid", "nodev", "noexec", "noatime")
"""Per-mount flags a bind can carry apart from its filesystem's: a read-only bind must stay read-only."""


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


@dataclass(frozen=True)
class Bind:
    """A mount showing a dataset's files (or a directory in them) somewhere else."""

    point: str
    sub: str
    """The directory inside the dataset it shows, relative ("" for the dataset's root)."""
    source: str
    fstype: str
    flags: tuple[str, ...] = ()

    def shows(self, root: str) -> str:
        return os.path.join(root, self.sub) if self.sub else root

    def to_json(self) -> dict[str, object]:
        return {"point": self.point, "sub": self.sub, "source": self.source, "fstype": self.fstype, "flags": list(self.flags)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Bind:
        flags = data.get("flags") or []
        return cls(
            str(data["point"]), str(data.get("sub", "")), str(data["source"]), str(data["fstype"]),
            tuple(str(f) for f in flags) if isinstance(flags, list) else (),
        )


def _flags(point: str, table: list[Mount] | None = None) -> tuple[str, ...] | None:
    """The per-mount flags of the topmost mount at ``point``; None when nothing is mounted there."""
    here = [m for m in (mounts() if table is None else table) if m.point == point]
    return tuple(o for o in here[-1].options.split(",") if o in KEPT_FLAGS) if here else None


def home_of(path: str, table: list[Mount]) -> tuple[Mount, str] | None:
    """The mount ``path`` is reached through, and ``path`` as a path inside that mount's filesystem."""
    real = os.path.realpath(path)
    home = max((m for m in table if under(real, m.point)), key=lambda m: len(m.point), default=None)
    if home is None:
        return None
    rest = real[len(home.point.rstrip("/")):] if home.point != "/" else real
    return home, (home.root.rstrip("/") + rest) or "/"


def binds_of(root: str, table: list[Mount] | None = None) -> list[Bind]:
    """Every mount elsewhere that shows ``root`` (a dataset's files) or a directory inside it: the
    mounts of the same filesystem whose root lies in the dataset, other than the dataset's own mount
    and mounts inside the dataset's own path (those are no view of it, and a rollback refuses them).
    Sorted shallowest point first, the order they are mounted in again."""
    table = mounts() if table is None else table
    found = home_of(root, table)
    if found is None:
        return []
    home, inside = found
    real = os.path.realpath(root)
    out = {}
    for m in table:
        if (m.source, m.fstype) != (home.source, home.fstype) or under(m.point, real):
            continue
        if under(m.root, inside):
            sub = m.root[len(inside.rstrip("/")):].strip("/")
            out[m.point] = Bind(m.point, sub, m.source, m.fstype, _flags(m.point, table) or ())
    return sorted(out.values(), key=lambda b: (b.point.count("/"), b.point))


def _same(a: str, b: str) -> bool:
    try:
        x, y = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BackendError(f"{shlex.join(argv)} failed: {(proc.stderr or proc.stdout).strip() or f'exit {proc.returncode}'}")


def other_namespace() -> bool:
    """Whether this process sees other mounts than init (a unit with PrivateMounts=, ProtectSystem=):
    binds changed here would not be the ones the services see."""
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/1/ns/mnt")
    except OSError:
        return False


def rebind(bind: Bind, root: str, *, lazy: bool = False, step: Callable[[str], None] = lambda _: None) -> str | None:
    """Make ``bind.point`` show ``bind.sub`` of ``root`` (the dataset's files as they are now), with
    its flags; returns what was done, None when it already did. An old mount there is unmounted
    first: lazily only with ``lazy`` (a forced rollback, whose processes keep their old files)."""
    source = bind.shows(root)
    table = mounts()
    src = home_of(source, table)
    if src is None or (src[0].source, src[0].fstype) != (bind.source, bind.fstype) or not os.path.isdir(source):
        raise BackendError(
            f"{source}: is not on {bind.fstype} {bind.source} (not mounted?); the bind mount at {bind.point} "
            f"cannot be pointed at it: mount it, then run the command again"
        )
    # A btrfs mount names its device, which a rename keeps; a ZFS mount names its dataset, which a
    # rename changes: the old bind then shows <dataset>.pre-rollback.<name> (or another name the
    # rollback gives it beside the dataset), still the recorded bind.
    here = [m for m in table if m.point == bind.point]
    if here and _same(bind.point, source):
        flags = _flags(bind.point) or ()
        if set(bind.flags) <= set(flags):
            return None
        _run(["mount", "-o", ",".join(("remount", "bind", *bind.flags)), "--", bind.point])
        return f"{bind.point}: flags {','.join(bind.flags)} set again"
    if here:
        top = here[-1]
        if top.fstype != bind.fstype or not (top.source == bind.source or top.source.startswith(bind.source + ".")):
            raise BackendError(
                f"{bind.point}: {top.fstype} {top.source} is mounted there now, not the bind mount of the data "
                f"({bind.fstype} {bind.source}); unmount it, then run the command again"
            )
        proc = subprocess.run(["umount", "--", bind.point], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            if not lazy:
                raise BackendError(
                    f"{bind.point}: cannot be unmounted to show the rolled-back state: {proc.stderr.strip()} "
                    f"(stop what uses it, then run the command again)"
                )
            _run(["umount", "--lazy", "--", bind.point])
        step(f"bind unmounted {bind.point}")
    if not os.path.isdir(bind.point):
        raise BackendError(f"{bind.point}: the bind mount's directory is gone; make it (mkdir) and run the command again")
    _run(["mount", "--bind", "--", source, bind.point])
    step(f"bind mounted {bind.point}")
    if bind.flags:
        _run(["mount", "-o", ",".join(("remount", "bind", *bind.flags)), "--", bind.point])
    return f"{bind.point}: bind mount of {source}"


def namespace_refusal(points: list[str]) -> UsageError | None:
    """Why bind mounts at ``points`` cannot be re-pointed from here, if they cannot."""
    if points and other_namespace():
        return UsageError(
            f"this process runs in a mount namespace of its own (a unit with PrivateMounts= or ProtectSystem=?), "
            f"so it cannot re-point the bind mounts the services see ({', '.join(points)}); run it from a root shell"
        )
    return None
