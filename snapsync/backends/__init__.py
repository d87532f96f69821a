"""The backend registry: one entry per filesystem, the only place a filesystem is chosen.

A policy names a group's filesystem (``backend = "btrfs"``); a receiving place is named by its
form (an absolute path is a btrfs directory, anything else a ZFS dataset). Everything outside this
package asks the objects these functions return, and their :class:`~snapsync.backends.base.Capabilities`,
never the filesystem's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from snapsync.backends.base import StorageBackend
    from snapsync.backends.receiver import Receiver
    from snapsync.policy.loader import Group


@dataclass(frozen=True)
class Filesystem:
    """One filesystem snapsync supports: how to make its source backend and its receiver."""

    source: Callable[[Group], StorageBackend]
    receiver: Callable[..., Receiver]
    owns_place: Callable[[str], bool]
    """Whether a receiving place (``--root``, ``into``, a local target's path) is of this filesystem."""


def _btrfs_source(group: Group) -> StorageBackend:
    from snapsync.backends.btrfs import BtrfsBackend

    return BtrfsBackend(snapshot_dir=group.snapshot_dir)


def _zfs_source(group: Group) -> StorageBackend:
    from snapsync.backends.zfs import ZfsBackend

    return ZfsBackend(raw=group.send_raw, compressed=group.send_compressed)


def _btrfs_receiver(root: str, append_only: bool = False, stall: float | None = None) -> Receiver:
    from snapsync.backends.btrfs_receiver import BtrfsReceiver

    return BtrfsReceiver(root, stall=stall)


def _zfs_receiver(root: str, append_only: bool = False, stall: float | None = None) -> Receiver:
    from snapsync.backends.zfs_receiver import ZfsReceiver

    return ZfsReceiver(root, append_only=append_only, stall=stall)


FILESYSTEMS: dict[str, Filesystem] = {
    "btrfs": Filesystem(_btrfs_source, _btrfs_receiver, lambda place: place.startswith("/")),
    "zfs": Filesystem(_zfs_source, _zfs_receiver, lambda place: not place.startswith("/")),
}


def backend_for(group: Group) -> StorageBackend:
    return FILESYSTEMS[group.backend].source(group)


def filesystem_of_place(place: str) -> str:
    """The filesystem a receiving place belongs to, by its form."""
    return next(name for name, fs in FILESYSTEMS.items() if fs.owns_place(place))


def receiver_for(place: str, *, append_only: bool = False, stall: float | None = None) -> Receiver:
    """The receiving side rooted at ``place`` (a directory on btrfs or a ZFS dataset)."""
    return FILESYSTEMS[filesystem_of_place(place)].receiver(place, append_only=append_only, stall=stall)
