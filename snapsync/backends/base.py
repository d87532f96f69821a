"""The one interface every filesystem backend implements, and the guarantees callers may rely on.

Differences between filesystems are declared as data (:class:`Capabilities`), never discovered with
``isinstance``: the runner asks ``backend.capabilities.atomic_group_snapshot`` and acts on the answer.
The contract suite in ``tests/contract/`` runs unchanged against every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

if TYPE_CHECKING:
    from snapsync.backends.receiver import Receiver
    from snapsync.backends.usage import Holder


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
    rollback_copy: str = "writable snapshot"
    """What a rollback puts in the dataset's place, as its plan names it: a writable snapshot of the
    snapshot (btrfs), a promoted clone of it (ZFS: ``"clone, promoted"``)."""
    chained_send: bool = False
    """Several snapshots of a dataset go in one stream, each built on the one before, into one
    receive (btrfs: consecutive ``btrfs send -p`` streams, which one ``btrfs receive`` takes in
    turn): a catch-up of N snapshots costs one session, not N."""
    rollback_sets_newer_aside: bool = False
    """A rollback leaves the snapshots newer than the one it returns to, its safety snapshot among
    them, with the old state it moves aside (ZFS: the promoted clone takes only the older ones); a
    target whose base is one of them sees a diverged history. Otherwise every snapshot stays the
    dataset's."""


@dataclass(frozen=True)
class Scratch:
    """A throwaway place to restore into and check what arrived (a drill); see :meth:`StorageBackend.scratch`."""

    place: str
    """Where restores land: an empty receiving place (a directory on btrfs, a ZFS dataset)."""
    directory: Path
    """For what checks need beside the copies (a database server's socket and log); the data's owner
    can reach it."""
    writable: Callable[[str, str], Path]
    """``writable(rel, name)``: a writable, mounted copy of the copy ``name`` received at ``<place>/<rel>``."""


@dataclass(frozen=True)
class SnapshotSizes:
    """Bytes per snapshot, in the terms of the filesystem that counts them (see :meth:`StorageBackend.snapshot_sizes`)."""

    sizes: dict[str, dict[str, int]]
    """Snapshot name -> figure -> bytes: ZFS ``used``, ``written``, ``referenced``; btrfs ``exclusive``,
    ``shared``, ``referenced`` (from its quota groups)."""
    note: str | None = None
    """Why there are none, or why they may be off, and what to do about it."""


@dataclass(frozen=True)
class Adoption:
    """A plain directory on its way to being a dataset of its own (``snapsync adopt``): what is
    there now, and what is left to do, in order (see :meth:`StorageBackend.adoption`)."""

    path: str
    state: Literal["directory", "interrupted", "adopted"]
    """A plain directory; one an adopt stopped on (running it again finishes); a dataset already."""
    steps: tuple[str, ...] = ()
    touches_live: bool = False
    """Whether a step left changes what is at ``path``, so nothing may use it meanwhile."""
    kept: str | None = None
    """Where the original directory stays once the dataset took its place."""
    notes: tuple[str, ...] = ()
    called: str = "dataset"
    """What the filesystem calls a dataset, for messages: "subvolume"."""

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path, "state": self.state, "steps": list(self.steps), "kept": self.kept,
            "notes": list(self.notes),
        }


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

    @classmethod
    def from_json(cls, dataset: str, data: dict[str, Any]) -> SnapshotInfo:
        """The inverse of :meth:`to_json`, for listings that came over the wire (``dataset`` is the
        name the asking side uses)."""
        return cls(
            dataset=dataset,
            name=str(data["name"]),
            created=datetime.strptime(str(data["created"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC),
            guid=str(data["guid"]),
            location=str(data.get("location", "")),
            read_only=bool(data.get("read_only", True)),
            parent_guid=data.get("parent_guid"),
            received_guid=data.get("received_guid"),
            txg=data.get("txg"),
            kind=data.get("kind", "snapshot"),
            holds=tuple(data.get("holds", ())),
        )


class StorageBackend(Protocol):
    """A filesystem that can take, list and destroy snapshots of its datasets, roll them back and
    give recovery (restore in place, drills) the places and copies it needs.

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

    def lost_holds(self, dataset: str) -> dict[str, list[str]]:
        """Holds recorded on snapshots that no longer exist, by tag: a held snapshot deleted by hand.

        The tag's holder still had that snapshot as its base, so an older one may be the base now;
        pruning keeps those until its next replication moves the hold (``set_holds``). A backend
        whose held snapshots cannot be destroyed returns ``{}``.
        """
        ...

    def drop_bookmarks(self, dataset: str, names: Sequence[str]) -> None:
        """Destroy the named bookmarks of ``dataset`` (never a snapshot); names already gone are ignored.

        Called only with bookmarks ``list_snapshots`` reported, once no holder can need them.
        """
        ...

    def send_argv(self, dataset: str, name: str, base: str | None) -> list[str]:
        """The command that writes snapshot ``name`` as a stream to stdout, incremental from ``base``."""
        ...

    def chain_argv(self, dataset: str, names: Sequence[str], base: str) -> list[str]:
        """One command writing the streams of ``names`` in turn, each incremental from the one before
        (the first from ``base``), to stdout; only where ``capabilities.chained_send``."""
        ...

    def resume_argv(self, token: str) -> list[str]:
        """The command that continues an interrupted send from a receiver's resume token (ZFS);
        backends without ``capabilities.resumable_receive`` raise BackendError."""
        ...

    def token_target(self, token: str) -> tuple[str, str, str]:
        """The snapshot a resume token continues, as ``(dataset, name, guid)``: what a send role checks
        against the dataset it serves before it resumes. Backends without
        ``capabilities.resumable_receive`` raise BackendError."""
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

    def check_rollback(self, dataset: str, name: str, aside: str) -> None:
        """Raise what ``rollback(dataset, name, aside)`` would refuse (nested datasets, a dataset that
        cannot be renamed, an occupied ``aside``), changing nothing: a group is checked whole before
        its first dataset is touched."""
        ...

    def delete_aside(self, dataset: str, aside: str) -> None:
        """Delete the state a finished rollback of ``dataset`` moved to ``aside`` (with, on ZFS, the
        snapshots that went with it), once the user is sure. MUST refuse anything that is not such a
        state beside ``dataset``, and a state with a held snapshot; the caller checks it is unused."""
        ...

    def undo_rollback(self, dataset: str, name: str, aside: str, kept: str, *, dry_run: bool = False) -> list[str]:
        """Put ``dataset`` back as it was before an interrupted rollback to ``name`` (``rollback --abort``).

        The state moved ``aside`` returns to its place; a rolled-back state that was already live is
        kept as ``kept``, never destroyed. Returns what was (or, with ``dry_run``, would be) done.
        MUST be safe to repeat after a crash at any point.
        """
        ...

    def destroy(self, dataset: str, names: Sequence[str]) -> None:
        """Destroy the named snapshots of ``dataset``.

        MUST refuse anything that is not a read-only snapshot of this backend's namespace (never the
        dataset itself, never a writable subvolume). Names that no longer exist are ignored, so a
        prune that was interrupted can simply run again. A held, refused or failing name MUST NOT
        keep the others: every other one is destroyed, then one BackendError names each one left
        and why. Returning means every named snapshot is gone; after an error, only a new listing
        says which went.
        """
        ...

    # --- recovery: what rollback, restore in place and drills need --------------------------------

    def exists(self, dataset: str) -> bool:
        """Whether anything occupies ``dataset``'s place (a dataset, or on btrfs any file or directory).

        Restore in place refuses an occupied place; a rollback resumed after a crash reads from it
        which datasets were already swapped. MUST NOT raise for a place that is simply empty.
        """
        ...

    def in_use(self, datasets: Sequence[str]) -> list[Holder]:
        """Processes and mounts using any of ``datasets`` now, wherever their files are visible (bind
        mounts of them, mounts inside them, a process's cwd, root, open files or mappings); this
        process does not count. A rollback refuses while anything is listed."""
        ...

    def files_root(self, dataset: str) -> str | None:
        """The directory where ``dataset``'s live files are seen, which paths in the policy (a hook's
        databases) are written against; None when the dataset has no such directory."""
        ...

    def snapshot_sizes(self, dataset: str) -> SnapshotSizes:
        """What each of ``dataset``'s snapshots costs: on ZFS always; on btrfs only where quotas (or
        simple quotas) are on, and the note says how to turn them on otherwise."""
        ...

    def snapshot_files(self, dataset: str, name: str) -> Path | None:
        """A directory to read snapshot ``name``'s files from, or None when there is none (the
        snapshot is gone, or the dataset is not mounted)."""
        ...

    def scratch(self, label: str, datasets: Sequence[str], parent: str | None) -> AbstractContextManager[Scratch]:
        """A throwaway place, big enough to restore the newest snapshots of ``datasets`` into and to
        check them on writable copies (a drill).

        MUST remove everything it made when the context ends, whatever ended it; what a scratch
        killed outright left in shared space (a pool) goes when the next one of the same ``label``
        starts. Restored data comes from elsewhere: the copies MUST ignore setuid bits and device
        nodes. ``parent`` is a directory for its files (default ``/var/tmp``).
        """
        ...

    def restore_receiver(self, dataset: str, *, create: bool = False) -> tuple[Receiver, str]:
        """The receiver, and the path below its place, that make a received copy one of ``dataset``'s
        own snapshots (restore in place): it keeps the sender's identity, so replication continues
        incrementally from it. ``create`` readies the place for the first receive (not in a dry run)."""
        ...

    def restored_in_place(self, dataset: str, name: str) -> bool:
        """Whether ``dataset`` is what :meth:`finish_in_place` made of its received snapshot ``name``
        (an interrupted restore got that far), as opposed to somebody's data in that place."""
        ...

    def finish_in_place(self, dataset: str, name: str) -> None:
        """Make ``dataset`` live again: the writable, mounted state of its received snapshot ``name``.

        MUST NOT replace anything that appeared at ``dataset`` meanwhile (a unit's StateDirectory=):
        that is refused, with where the restored snapshot is.
        """
        ...

    # --- what a dataset's snapshots leave out, and plain directories made datasets ----------------

    def nested(self, dataset: str) -> list[str]:
        """The datasets inside ``dataset`` whose files its snapshots do not contain (neither btrfs nor
        a ZFS snapshot without ``-r`` recurses), sorted: only the outermost ones, since each carries
        what is nested in it. btrfs: writable subvolumes below it (read-only ones are snapshots or
        received copies, not live data); ZFS: its child filesystems and volumes.

        The policy must list each as a dataset of some group or exclude it; else every snapshot
        warns. Raises DatasetMissing for a dataset that is not there.
        """
        ...

    def adoption(self, path: str) -> Adoption | None:
        """What turning the plain directory ``path`` into a dataset in place takes, without doing it;
        None when ``path`` is not on this backend's filesystem.

        Raises UsageError for a path that cannot be adopted, with what to do instead (a filesystem
        that has no such conversion says how to make the dataset by hand).
        """
        ...

    def adopt(self, path: str) -> Adoption:
        """Make ``path`` a dataset in place, with the same files, ownership, modes, ACLs, xattrs,
        hard links, holes and timestamps; returns what was done. The caller has made sure nothing
        uses it.

        MUST keep ``path`` a whole directory throughout (one atomic swap) and the original until the
        copy is verified; after a stop at any step a repeated call finishes, or undoes what was half
        done, without losing anything.
        """
        ...
