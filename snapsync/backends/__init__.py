"""The backend registry: one factory per ``backend =`` value a policy may name."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from snapsync.backends.base import StorageBackend
    from snapsync.policy import Group


def _btrfs(group: Group) -> StorageBackend:
    from snapsync.backends.btrfs import BtrfsBackend

    return BtrfsBackend(snapshot_dir=group.snapshot_dir)


def _zfs(group: Group) -> StorageBackend:
    from snapsync.backends.zfs import ZfsBackend

    return ZfsBackend(raw=group.send_raw, compressed=group.send_compressed)


BACKENDS: dict[str, Callable[[Group], StorageBackend]] = {"btrfs": _btrfs, "zfs": _zfs}


def backend_for(group: Group) -> StorageBackend:
    return BACKENDS[group.backend](group)
