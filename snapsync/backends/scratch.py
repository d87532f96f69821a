"""A throwaway btrfs filesystem in a file, for the demo, the tests and the benchmarks.

``mount -o loop`` sets the loop device to auto-clear, so unmounting also frees the device; the
cleanup runs on every exit path, including Ctrl-C and SIGTERM (the CLI turns stop signals into KeyboardInterrupt).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from snapsync.errors import SnapsyncError


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SnapsyncError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _unmount(mountpoint: Path) -> None:
    for attempt in range(20):
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode == 0:
            return
        if not os.path.ismount(mountpoint):
            return
        time.sleep(0.1 * (attempt + 1))
    subprocess.run(["umount", "--lazy", str(mountpoint)], capture_output=True)


@contextmanager
def scratch_btrfs(size: str = "512M", parent: str | None = None, label: str = "snapsync") -> Iterator[Path]:
    """Yield the mount point of a fresh btrfs on a loop device; always unmount and delete it."""
    if os.geteuid() != 0:
        raise SnapsyncError("a scratch btrfs needs root (mkfs.btrfs on a file, mount -o loop)")
    for tool in ("mkfs.btrfs", "mount", "umount"):
        if shutil.which(tool) is None:
            raise SnapsyncError(f"{tool} not found: install btrfs-progs (apt-get install btrfs-progs)")
    workdir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=parent))
    image, mountpoint = workdir / "btrfs.img", workdir / "mnt"
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(_bytes(size))
        _run(["mkfs.btrfs", "-q", "-f", "-L", label, str(image)])
        mountpoint.mkdir()
        _run(["mount", "-o", "loop,nosuid,nodev", str(image), str(mountpoint)])  # restored setuid files stay inert
        mounted = True
        yield mountpoint
    finally:
        if mounted:
            _unmount(mountpoint)
        shutil.rmtree(workdir, ignore_errors=True)


def create_subvolume(path: Path) -> None:
    """An empty subvolume at ``path``, as an administrator makes a dataset (the demo's, the benchmarks')."""
    import btrfsutil

    try:
        btrfsutil.create_subvolume(path)
    except btrfsutil.BtrfsUtilError as e:
        raise SnapsyncError(f"{path}: cannot create a subvolume: {e.strerror or e}") from e


def _bytes(size: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1].upper()] if size[-1].upper() in units else int(size)
