"""The one interface every filesystem backend implements, and the guarantees callers may rely on.

Differences between filesystems are declared as data (:class:`Capabilities`), never discovered with
``isinstance``: the runner asks ``backend.capabilities.atomic_group_snapshot`` and acts on the answer.
The contract suite in ``tests/contract/`` runs unchanged against every backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Literal, Protocol


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; planners and the runner branch on these, not on the backend's type."""

    atomic_group_snapshot: bool
    """All datasets of a group are captured at one instant (ZFS: one txg per pool)."""
    holds: bool
    """A snapshot can be protected against destruction by a named hold (ZFS)."""
    bookmarks: bool
    """A destroyed snapshot can leave a bookmark that still serves as an incremental source (ZFS)."""
    resumable_receive: bool
    """An interrupted receive leaves a resume token instead of a partial copy (ZFS)."""


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot (or bookmark) as the filesystem reports it.

    Identity fields are what replication matches on, never the name: for btrfs ``guid`` is the
    subvolume uuid, ``parent_guid`` the uuid of the subvolume it was taken from and ``received_guid``
    the sender's uuid when it arrived by ``btrfs receive``; for ZFS ``guid`` is the snapshot guid and
    ``txg`` its createtxg.
    """

    dataset: str
    name: str
    created: datetime
    guid: str
    location: str
    read_only: bool = True
    parent_guid: str | None = None
    received_guid: str | None = None
    txg: int | None = None
    kind: Literal["snapshot", "bookmark"] = "snapshot"
    holds: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "created": self.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "guid": self.guid,
            "parent_guid": self.parent_guid,
            "received_guid": self.received_guid,
            "txg": self.txg,
            "read_only": self.read_only,
            "location": self.location,
            "holds": list(self.holds),
        }


class StorageBackend(Protocol):
    """A filesystem that can take, list and destroy snapshots of its datasets.

    A *dataset* is a btrfs subvolume path or a ZFS dataset name; a snapshot is addressed by
    ``(dataset, name)``. Every method raises :class:`snapsync.errors.BackendError` (or a subclass)
    for failures it understands and never leaves a half-done group behind.
    """

    kind: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def check_dataset(self, dataset: str) -> None:
        """Raise DatasetMissing (with the reason) unless ``dataset`` exists and can be snapshotted."""
        ...

    def snapshot_home(self, dataset: str) -> str:
        """Where ``dataset``'s snapshots live (a directory, or the ZFS dataset itself). Two datasets
        sharing a home would prune each other's snapshots, so preflight refuses that."""
        ...

    def list_snapshots(self, dataset: str) -> list[SnapshotInfo]:
        """Every snapshot of ``dataset`` in the backend's snapshot namespace, ours and foreign,
        sorted by creation (then name). A dataset that has never been snapshotted yields []."""
        ...

    def snapshot_group(self, datasets: Sequence[str], name: str) -> list[SnapshotInfo]:
        """Snapshot every dataset under the same ``name``, read-only.

        MUST be all-or-nothing: if any dataset fails, the snapshots this call created are removed
        before the error is raised. MUST be one atomic operation when
        ``capabilities.atomic_group_snapshot`` is true. MUST refuse (without side effects) if
        ``name`` already exists on any of the datasets.
        """
        ...

    def set_holds(self, dataset: str, tag: str, names: Sequence[str]) -> None:
        """Make ``tag`` hold exactly ``names`` (releasing what it held before); [] releases the tag.

        Holds record which snapshot a target still needs as its incremental base; ``list_snapshots``
        reports them in ``SnapshotInfo.holds`` and pruning pins them. ZFS uses real holds.
        """
        ...

    def send_argv(self, dataset: str, name: str, base: str | None) -> list[str]:
        """The command that writes snapshot ``name`` as a stream to stdout, incremental from ``base``."""
        ...

    def resume_argv(self, token: str) -> list[str]:
        """The command that continues an interrupted send from a receiver's resume token (ZFS);
        backends without ``capabilities.resumable_receive`` raise BackendError."""
        ...

    def estimate(self, dataset: str, name: str, base: str | None) -> int | None:
        """Roughly how many bytes the send of ``name`` (from ``base``) will be, for progress; None if unknown."""
        ...

    def annotate(self, dataset: str, name: str, key: str, text: str) -> None:
        """Keep ``text`` with snapshot ``name`` (PostgreSQL's backup_label), removed with it."""
        ...

    def annotation(self, dataset: str, name: str, key: str) -> str | None:
        """What ``annotate`` stored, or None."""
        ...

    def rollback(self, dataset: str, name: str, aside: str) -> None:
        """Make ``dataset`` the state of snapshot ``name`` again, keeping the current state at ``aside``.

        MUST NOT destroy any snapshot (newer ones are replication bases and history); MUST leave the
        dataset either as it was or rolled back, and a repeated call after a crash finishes the job.
        """
        ...

    def destroy(self, dataset: str, names: Sequence[str]) -> None:
        """Destroy the named snapshots of ``dataset``.

        MUST refuse anything that is not a read-only snapshot of this backend's namespace (never the
        dataset itself, never a writable subvolume). Names that no longer exist are ignored, so a
        prune that was interrupted can simply run again.
        """
        ...
