"""Shared fixtures. Real btrfs only: a file-backed filesystem on a loop device, always unmounted.

Tests that need root skip without it, unless SNAPSYNC_REQUIRE_BTRFS=1 (CI sets it), where a skip
would hide a missing tier and so fails instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapsync.scratch import scratch_btrfs


def _btrfs_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for loop-mounted btrfs"
    if shutil.which("mkfs.btrfs") is None:
        return "mkfs.btrfs not installed"
    return None


@pytest.fixture
def btrfs_root(tmp_path: Path) -> Iterator[Path]:
    """The mount point of a fresh 256 MiB btrfs."""
    reason = _btrfs_unavailable()
    if reason:
        if os.environ.get("SNAPSYNC_REQUIRE_BTRFS") == "1":
            pytest.fail(f"btrfs tier required but unavailable: {reason}")
        pytest.skip(reason)
    with scratch_btrfs("256M", parent=str(tmp_path), label="snapsync-test") as mnt:
        yield mnt


def make_subvolume(path: Path, content: str = "") -> Path:
    import btrfsutil

    path.parent.mkdir(parents=True, exist_ok=True)
    btrfsutil.create_subvolume(path)
    if content:
        (path / "data.txt").write_text(content)
    return path
