"""Who is using a dataset right now: processes with files, directories or mappings in it, and mounts.

Rolling a dataset back under a running service corrupts the service's view of its data, so rollback
asks first. A path is used through every place it is visible: on NixOS with impermanence,
``/persist/var/lib/forgejo`` is bind-mounted at ``/var/lib/forgejo`` and Forgejo only ever opens the
latter. So the dataset's aliases are found in ``/proc/self/mountinfo`` (every mount of the same
filesystem whose root covers the dataset, or lies inside it), and each process's ``cwd``, ``root``,
``exe``, open files and memory maps are matched against all of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_UNIT = re.compile(r"/([^/]+\.(?:service|scope))$")


@dataclass(frozen=True)
class Mount:
    root: str
    """The path inside the filesystem that is mounted (for btrfs: from the top level, subvolumes included)."""
    point: str
    source: str
    fstype: str
    options: str = ""
    """The per-mount options (``rw,nosuid,relatime``), not the filesystem's."""


@dataclass(frozen=True)
class Holder:
    """A process (or a mount) that keeps a dataset busy, and the systemd unit to stop, if any."""

    kind: str
    """"process" or "mount"."""
    what: str
    path: str
    pid: int | None = None
    unit: str | None = None

    def describe(self) -> str:
        if self.kind == "mount":
            return f"{self.path} is a mount point ({self.what})"
        unit = f", unit {self.unit}" if self.unit else ""
        return f"pid {self.pid} ({self.what}{unit}) uses {self.path}"

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "what": self.what, "path": self.path, "pid": self.pid, "unit": self.unit}


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    out = []
    for line in Path(mountinfo).read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 2:
            out.append(Mount(_unescape(fields[3]), _unescape(fields[4]), tail[1], tail[0], fields[5] if len(fields) > 5 else ""))
    return out


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def aliases(path: str, table: list[Mount] | None = None) -> list[str]:
    """Every place ``path`` (a directory) is visible at: itself, and through other mounts of its filesystem."""
    table = mounts() if table is None else table
    real = os.path.realpath(path)
    home = max((m for m in table if _under(real, m.point)), key=lambda m: len(m.point), default=None)
    if home is None:
        return [real]
    inside = home.root.rstrip("/") + real[len(home.point.rstrip("/")):] if home.point != "/" else home.root.rstrip("/") + real
    inside = inside or "/"
    found = {real}
    for m in table:
        if (m.source, m.fstype) != (home.source, home.fstype):
            continue
        if _under(inside, m.root):
            rest = inside[len(m.root.rstrip("/")):]
            found.add((m.point.rstrip("/") + rest) or "/")
        elif _under(m.root, inside):
            found.add(m.point)
    return sorted(found)


def _unit(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        match = _UNIT.search(line.rpartition(":")[2])
        if match:
            return match.group(1)
    return None


def _links(pid: int) -> Iterator[str]:
    base = f"/proc/{pid}"
    for name in ("cwd", "root", "exe"):
        try:
            yield os.readlink(f"{base}/{name}")
        except OSError:
            pass
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            yield os.readlink(f"{base}/fd/{fd}")
        except OSError:
            pass
    try:
        with open(f"{base}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    yield parts[5].rstrip("\n")
    except OSError:
        pass


def _devices(paths: Iterable[str]) -> set[int]:
    out = set()
    for p in paths:
        try:
            out.add(os.stat(p).st_dev)
        except OSError:
            pass
    return out


def _uses_device(pid: int, devices: set[int]) -> str | None:
    """A path this process holds on one of ``devices``, seen from its own mount namespace.

    Each btrfs subvolume and each mounted ZFS dataset has a device number of its own, so this finds
    users that path matching cannot see: a container or a unit with a private bind of the data.
    """
    base = f"/proc/{pid}"
    names = ["cwd", "root"]
    try:
        names += [f"fd/{fd}" for fd in os.listdir(f"{base}/fd")]
    except OSError:
        pass
    for name in names:
        try:
            if os.stat(f"{base}/{name}").st_dev in devices:
                return os.readlink(f"{base}/{name}")
        except OSError:
            continue
    wanted = {f"{os.major(d):02x}:{os.minor(d):02x}" for d in devices}
    try:
        with open(f"{base}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[3] in wanted:
                    return parts[5].rstrip("\n")
    except OSError:
        pass
    return None


def holders(paths: Iterable[str], table: list[Mount] | None = None, ignore: Iterable[int] = ()) -> list[Holder]:
    """Processes and mounts using any of ``paths``; this process is ignored.

    A mount *of* the data somewhere else (a bind mount, as impermanence makes) counts too: after a
    rollback it would still show the old state, and writes through it would land in the state set
    aside. So does a mount inside the data.
    """
    table = mounts() if table is None else table
    paths = [os.path.realpath(p) for p in paths]
    tops = sorted({a for p in paths for a in aliases(p, table)})
    devices = _devices(paths)
    skip = {os.getpid(), *ignore}
    found: list[Holder] = []
    for m in table:
        for top in tops:
            if m.point == top and top not in paths:
                found.append(Holder("mount", f"a mount of the data ({m.fstype} {m.source}, root {m.root})", m.point))
            elif m.point != top and _under(m.point, top):
                found.append(Holder("mount", f"{m.fstype} from {m.source}", m.point))
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        used = next((link for link in (x.removesuffix(" (deleted)") for x in _links(pid)) if any(_under(link, t) for t in tops)), None)
        used = used or _uses_device(pid, devices)
        if used is not None:
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                comm = "?"
            found.append(Holder("process", comm, used, pid, _unit(pid)))
    return found
