"""The receiving side every filesystem implements: what serve, pulls, local targets and restores receive into.

A receiver is rooted at a *place* (a directory on btrfs, a ZFS dataset) and keeps copies of a
source's snapshots at ``<place>/<rel>``; ``rel`` is a relative path it validates itself and never
lets leave the place. The sending host is never trusted: a receiver keeps exactly the one snapshot
it was asked for, with the identity it was asked for, or nothing. What differs between filesystems
is declared in ``capabilities`` (those of the filesystem's source backend); callers read them and
never the type. :func:`snapsync.backends.receiver_for` makes one for a place, and the contract suite
in ``tests/contract/`` runs unchanged against every receiver.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

from snapsync.errors import BackendError

if TYPE_CHECKING:
    from snapsync.backends.base import Capabilities, StorageBackend


@dataclass(frozen=True)
class Copy:
    """One copy at a receiving place, as ``list`` carries it over the wire.

    ``received_uuid`` is the source snapshot's identity (btrfs: the sender's subvolume uuid, ZFS: the
    snapshot guid), what replication matches on; ``uuid`` is the copy's own. ``partial`` marks a
    receive that never committed (btrfs; ZFS keeps a resume token instead).
    """

    name: str
    uuid: str
    received_uuid: str | None
    read_only: bool
    partial: bool
    created: datetime

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "received_uuid": self.received_uuid,
            "read_only": self.read_only,
            "partial": self.partial,
            "created": self.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Copy:
        return cls(
            name=str(data["name"]),
            uuid=str(data["uuid"]),
            received_uuid=None if data.get("received_uuid") is None else str(data["received_uuid"]),
            read_only=bool(data["read_only"]),
            partial=bool(data["partial"]),
            created=datetime.strptime(str(data["created"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC),
        )


class PartialDelete(BackendError):
    """A delete that left some of its copies: the message names each one left and why, ``deleted``
    what did go, so a caller counts only copies that are gone (``serve`` sends both back)."""

    def __init__(self, message: str, deleted: list[str]) -> None:
        super().__init__(message)
        self.deleted = deleted


class PartialReceive(BackendError):
    """A chained receive that stopped part way (a cut stream, a refused snapshot): ``received`` are the
    copies that arrived complete and were checked before it stopped, so the sender can hold the newest
    of them as its base (``serve`` sends them back beside the error)."""

    def __init__(self, message: str, received: list[str]) -> None:
        super().__init__(message)
        self.received = received


class Receiver(Protocol):
    """Copies below one place.

    Every method raises :class:`~snapsync.errors.BackendError` (or a subclass) for failures it
    understands, and :class:`~snapsync.protocol.Refused` for a ``rel`` or name it will not accept
    and for what its filesystem or its append-only mode does not do. An *append-only* receiver
    (``receiver_for(place, append_only=True)``, ``serve --append-only``) never destroys or rolls back
    a copy that arrived complete: ``delete`` is refused, and so is a forced receive where force would
    roll back; ``delete_partials`` stays allowed, as it removes no complete copy.
    """

    kind: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def check_root(self) -> None:
        """Raise BackendError (the reason and how to fix it) unless the place exists on this
        filesystem and can receive. Cheap and side-effect free: preflight and serve call it."""
        ...

    def listing(self, rel: str) -> tuple[list[Copy], str | None]:
        """What sits under ``rel`` by name, and the resume token of its interrupted receive (always
        None without ``capabilities.resumable_receive``); ``([], None)`` where nothing arrived yet.

        Besides the copies, whatever else occupies a copy's name is listed, flagged: ``received_uuid``
        None (it did not arrive by receive), ``read_only`` False (made writable since), ``partial`` (a
        receive that never committed). In no particular order: callers sort by snapshot name.
        """
        ...

    def copies(self, rel: str) -> list[Copy]:
        """``listing(rel)``'s copies."""
        ...

    def receive(
        self, rel: str, name: str, guid: str, stdin: int, compress: str = "none", force: bool = False,
        then: Sequence[tuple[str, str]] = (),
    ) -> dict[str, object]:
        """Receive the stream on descriptor ``stdin`` (``compress``: ``none`` or ``zstd``) as ``rel``'s
        copy ``name``; answers ``{"name", "path", "removed_partials", "received"}``.

        ``then`` (only with ``capabilities.chained_send``; refused otherwise): further ``(name, guid)``
        whose streams follow in the same input, each built on the one before. Each is checked and
        committed on its own as it would be alone, in order; if the input stops or one is refused,
        those committed stay and :class:`PartialReceive` names them. ``name`` and ``path`` are the last's.

        MUST keep the copy only if the stream is of a snapshot named ``name`` carrying ``guid``, full
        or built on one of ``rel``'s own copies (never on anything else of this host; a full stream
        that would replace ``rel``'s copies is refused); MUST refuse a ``name`` that exists. On any
        refusal or failure MUST leave nothing of the stream, except the resume state of an interrupted
        receive where ``capabilities.resumable_receive``. ``force`` lets the receive roll ``rel`` back
        to the stream's base where the filesystem needs that.
        """
        ...

    def resume(self, rel: str, stdin: int, compress: str = "none") -> dict[str, object]:
        """Finish ``rel``'s interrupted receive from the stream the source made of its resume token
        (``StorageBackend.resume_argv``); answers like ``receive``. MUST accept only the continuation
        of the snapshot that receive was of; BackendError when there is nothing to resume; Refused
        without ``capabilities.resumable_receive``."""
        ...

    def delete_partials(self, rel: str, names: list[str]) -> list[str]:
        """Remove what interrupted receives left: the partial copies among ``names`` and their staging,
        or ``rel``'s resume state (whatever ``names``), so the next receive starts afresh; returns what
        went. MUST NOT remove a copy that arrived complete."""
        ...

    def delete(self, rel: str, names: list[str], allow_writable: bool = False) -> list[str]:
        """Destroy the named copies of ``rel`` and return them; names not there are ignored.

        MUST destroy only copies that arrived by receive, never the dataset or anything else under a
        copy's name: what the filesystem can tell did not arrive by receive (a subvolume made on this
        host), or was made writable (unless ``allow_writable``), is refused. A copy refused (by this
        check or by the filesystem: a hold, a clone, a send reading it) MUST NOT keep the others:
        every other one is destroyed, then :class:`PartialDelete` names each copy left with its
        reason and carries exactly the names destroyed (a prune that stopped at the first refusal
        would never get past it, and one that reported its plan would count copies still there).
        """
        ...

    def source(self, rel: str, backend: StorageBackend) -> tuple[str, StorageBackend]:
        """What ``serve --role send`` rooted at this place offers as ``rel``: the dataset id and the
        backend that lists, sends and holds its snapshots. Copies of ``rel`` that ``backend`` (the
        place's source backend) cannot serve as they are come with a backend that serves them as
        snapshots (a host restoring from its backup host pulls them); anything else is the dataset
        ``rel`` below the place, with ``backend``. Refused if ``rel`` leaves the place; whether the
        dataset exists is for the backend's ``check_dataset`` to say."""
        ...
