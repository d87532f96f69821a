"""The receiving side every filesystem implements: what serve, pulls, local targets and restores receive into.

A receiver is rooted at a *place* (a directory on btrfs, a ZFS dataset) and keeps copies of a
source's snapshots at ``<place>/<rel>``. The sending host is never trusted: a receiver accepts
exactly the one snapshot it was asked for, with the guid it was asked for, or leaves nothing.
The contract suite in ``tests/contract/`` runs unchanged against every receiver.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from snapsync.backends.base import Capabilities
from snapsync.backends.btrfs_receiver import Copy


class Receiver(Protocol):
    kind: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def check_root(self) -> None:
        """Raise BackendError (with the reason) unless the place exists and can receive."""
        ...

    def copies(self, rel: str) -> list[Copy]:
        """Every copy of ``rel`` that arrived complete, oldest first."""
        ...

    def listing(self, rel: str) -> tuple[list[Copy], str | None]:
        """Copies and the resume token of an interrupted receive (None without ``resumable_receive``)."""
        ...

    def receive(self, rel: str, name: str, guid: str, stdin: int, compress: str = "none", force: bool = False) -> dict[str, object]:
        """Receive one stream from ``stdin`` as ``rel``'s copy ``name``; it must carry ``guid``."""
        ...

    def resume(self, rel: str, stdin: int, compress: str = "none") -> dict[str, object]:
        """Finish an interrupted receive; refused (Refused) without ``resumable_receive``."""
        ...

    def delete_partials(self, rel: str, names: list[str]) -> list[str]:
        """Remove what interrupted receives left of ``names`` (or the resume state); returns what went."""
        ...

    def delete(self, rel: str, names: list[str], allow_writable: bool = False) -> list[str]:
        """Destroy copies by name; only copies that arrived by receive, never anything else."""
        ...
