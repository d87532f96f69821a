"""The backend registry: one entry per filesystem, the only place a filesystem is chosen.

A policy names a group's filesystem (``backend = "btrfs"``); a receiving place is named by its
form (an absolute path is a btrfs directory, anything else a ZFS dataset). Everything outside this
package asks the objects these functions return, and their :class:`~snapsync.backends.base.Capabilities`,
never the filesystem's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from snapsync.backends.base import Capabilities

if TYPE_CHECKING:
    from snapsync.backends.base import StorageBackend
    from snapsync.backends.receiver import Receiver
    from snapsync.policy.loader import Group


@dataclass(frozen=True)
class PolicyForm:
    """What a group of this filesystem writes in the policy file: facts the schema applies, so that
    the policy never tests a filesystem's name."""

    dataset: Literal["path", "name"]
    """A dataset is an absolute path (a subvolume) or a pool-rooted name (``tank/persist``)."""
    called: str
    """What its datasets are called in messages: "subvolumes"."""
    snapshot_dir: bool
    """Snapshots live in a directory the group names (``snapshot_dir``), not inside the dataset."""
    stream_modes: bool
    """Streams can be sent raw or as stored compressed (``send_raw``, ``send_compressed``)."""
    atomic_unit: Callable[[str], str] | None
    """Where the filesystem has ``atomic_group_snapshot``: datasets sharing a unit are snapshotted
    at one instant (ZFS: a pool)."""
    unit_called: str = ""
    """What a unit is called in messages: "pool"."""


@dataclass(frozen=True)
class Filesystem:
    """One filesystem snapsync supports: how to make its source backend and its receiver, and what
    its groups write in the policy file."""

    capabilities: Capabilities
    """What it can do (its source backend and its receiver declare these): data here, so that
    the policy can read them without loading a filesystem's library."""
    source: Callable[[Group], StorageBackend]
    place_source: Callable[[str | None], StorageBackend]
    """The source backend for datasets below a place (``serve --role send``), given btrfs's snapshot_dir."""
    receiver: Callable[..., Receiver]
    owns_place: Callable[[str], bool]
    """Whether a receiving place (``--root``, ``into``, a local target's path) is of this filesystem."""
    places: str
    """How such a place is written, for errors: "into a directory on btrfs (an absolute path)"."""
    policy: PolicyForm


def _btrfs_source(group: Group) -> StorageBackend:
    from snapsync.backends.btrfs import BtrfsBackend

    return BtrfsBackend(snapshot_dir=group.snapshot_dir)


def _zfs_source(group: Group) -> StorageBackend:
    from snapsync.backends.zfs import ZfsBackend

    return ZfsBackend(raw=group.send_raw, compressed=group.send_compressed)


def _btrfs_place_source(snapshot_dir: str | None) -> StorageBackend:
    from snapsync.backends.btrfs import BtrfsBackend

    return BtrfsBackend(snapshot_dir=snapshot_dir)


def _zfs_place_source(snapshot_dir: str | None) -> StorageBackend:
    from snapsync.backends.zfs import ZfsBackend

    return ZfsBackend()


def _btrfs_receiver(root: str, append_only: bool = False, stall: float | None = None) -> Receiver:
    from snapsync.backends.btrfs_receiver import BtrfsReceiver

    return BtrfsReceiver(root, append_only=append_only, stall=stall)


def _zfs_receiver(root: str, append_only: bool = False, stall: float | None = None) -> Receiver:
    from snapsync.backends.zfs_receiver import ZfsReceiver

    return ZfsReceiver(root, append_only=append_only, stall=stall)


FILESYSTEMS: dict[str, Filesystem] = {
    "btrfs": Filesystem(
        Capabilities(atomic_group_snapshot=False, holds=False, bookmarks=False, resumable_receive=False, chained_send=True),
        _btrfs_source, _btrfs_place_source, _btrfs_receiver, lambda place: place.startswith("/"),
        "into a directory on btrfs (an absolute path)",
        PolicyForm("path", "subvolumes", snapshot_dir=True, stream_modes=False, atomic_unit=None),
    ),
    "zfs": Filesystem(
        Capabilities(
            atomic_group_snapshot=True, holds=True, bookmarks=True, resumable_receive=True,
            rollback_copy="clone, promoted", rollback_sets_newer_aside=True,
        ),
        _zfs_source, _zfs_place_source, _zfs_receiver, lambda place: not place.startswith("/"),
        "below a ZFS dataset (a name like pool/restore)",
        PolicyForm("name", "datasets", snapshot_dir=False, stream_modes=True, atomic_unit=lambda d: d.split("/")[0], unit_called="pool"),
    ),
}


def policy_form(name: str) -> PolicyForm | None:
    """The policy facts of the filesystem a group names; None for a name no filesystem has."""
    fs = FILESYSTEMS.get(name)
    return fs.policy if fs is not None else None


def with_form(want: Callable[[PolicyForm], bool]) -> list[str]:
    """The filesystems whose policy form satisfies ``want``, for messages ("only to btrfs groups")."""
    return [name for name, fs in FILESYSTEMS.items() if want(fs.policy)]


def backend_for(group: Group) -> StorageBackend:
    return FILESYSTEMS[group.backend].source(group)


def filesystem_of_place(place: str) -> str:
    """The filesystem a receiving place belongs to, by its form."""
    return next(name for name, fs in FILESYSTEMS.items() if fs.owns_place(place))


def receiver_for(place: str, *, append_only: bool = False, stall: float | None = None) -> Receiver:
    """The receiving side rooted at ``place`` (a directory on btrfs or a ZFS dataset)."""
    return FILESYSTEMS[filesystem_of_place(place)].receiver(place, append_only=append_only, stall=stall)


def source_for_place(place: str, snapshot_dir: str | None = None) -> StorageBackend:
    """The source backend for datasets below a place (``serve --role send``); ``snapshot_dir`` is
    where btrfs keeps their snapshots."""
    return FILESYSTEMS[filesystem_of_place(place)].place_source(snapshot_dir)
