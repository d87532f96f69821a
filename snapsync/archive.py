"""The offsite archive's layout: which object holds what, and reading it back as authenticated manifests.

Layout below the store's root (a directory, or a bucket's prefix)::

    <group>/<dataset key>/<snapshot>/chunk-000000 ...   sealed pieces of the send stream, in order
    <group>/<dataset key>/<snapshot>/progress.json      while an upload is under way (authenticated)
    <group>/<dataset key>/<snapshot>/manifest.json      written last: the upload is complete

A snapshot counts as stored only when its manifest exists and authenticates; a directory with chunks
and a ``progress.json`` is an upload that can be continued; anything else there is debris from an
interrupted run and is deleted by the next one. The dataset key is the one replication uses
(:func:`snapsync.protocol.dataset_key`), so a person browsing the bucket finds the source's paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from snapsync.errors import IntegrityError, WrongKey
from snapsync.objectstore import ObjectStore
from snapsync.offsite_plan import PartialUpload, Stored
from snapsync.sealing import Key, sign, unseal

FORMAT = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
CHUNK = "chunk-{:06d}"


def _time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def time_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ChunkRecord:
    raw: int
    raw_sha256: str
    size: int
    sha256: str
    salt: str
    """The chunk object's own random salt: binds this record to exactly one sealed object, so an
    object left by an earlier attempt at the same place is refused before any of it is decrypted."""

    def to_json(self) -> dict[str, object]:
        return {"raw": self.raw, "raw_sha256": self.raw_sha256, "size": self.size, "sha256": self.sha256, "salt": self.salt}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChunkRecord:
        return cls(int(data["raw"]), str(data["raw_sha256"]), int(data["size"]), str(data["sha256"]), str(data["salt"]))


@dataclass(frozen=True)
class Manifest:
    """What one uploaded snapshot is: enough to check every byte and to replay it in order."""

    group: str
    dataset: str
    """The dataset key (its place in the archive)."""
    source: str
    """The dataset on the host that uploaded it."""
    snapshot: str
    created: datetime
    guid: str
    parent: str | None
    parent_guid: str | None
    backend: str
    compression: str
    cipher: str
    chunk_size: int
    chunks: tuple[ChunkRecord, ...]
    host: str = ""
    complete: bool = True
    uploaded: datetime | None = None

    @property
    def raw_bytes(self) -> int:
        return sum(c.raw for c in self.chunks)

    @property
    def stored_bytes(self) -> int:
        return sum(c.size for c in self.chunks)

    def directory(self) -> str:
        return snapshot_dir(self.group, self.dataset, self.snapshot)

    def chunk_key(self, index: int) -> str:
        return self.directory() + CHUNK.format(index)

    def place(self, index: int) -> bytes:
        """Associated data for a chunk's segments: binds them to this snapshot and position."""
        return "\0".join(("snapsync-chunk", self.group, self.dataset, self.snapshot, str(index))).encode()

    def stored(self) -> Stored:
        return Stored(self.snapshot, self.created, self.guid, self.parent, self.parent_guid)

    def partial(self) -> PartialUpload:
        return PartialUpload(self.snapshot, self.guid, self.parent, len(self.chunks))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "group": self.group,
            "dataset": self.dataset,
            "source": self.source,
            "host": self.host,
            "snapshot": self.snapshot,
            "created": time_text(self.created),
            "guid": self.guid,
            "parent": self.parent,
            "parent_guid": self.parent_guid,
            "backend": self.backend,
            "compression": self.compression,
            "cipher": self.cipher,
            "chunk_size": self.chunk_size,
            "chunks": [c.to_json() for c in self.chunks],
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.stored_bytes,
            "complete": self.complete,
            "uploaded": None if self.uploaded is None else time_text(self.uploaded),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], name: str) -> Manifest:
        if data.get("format") != FORMAT:
            raise IntegrityError(f"{name}: format {data.get('format')!r} is not one this version reads ({FORMAT})")
        try:
            return cls(
                group=str(data["group"]),
                dataset=str(data["dataset"]),
                source=str(data["source"]),
                host=str(data.get("host", "")),
                snapshot=str(data["snapshot"]),
                created=_time(str(data["created"])),
                guid=str(data["guid"]),
                parent=None if data["parent"] is None else str(data["parent"]),
                parent_guid=None if data["parent_guid"] is None else str(data["parent_guid"]),
                backend=str(data["backend"]),
                compression=str(data["compression"]),
                cipher=str(data["cipher"]),
                chunk_size=int(data["chunk_size"]),
                chunks=tuple(ChunkRecord.from_json(c) for c in data["chunks"]),
                complete=bool(data["complete"]),
                uploaded=None if data.get("uploaded") is None else _time(str(data["uploaded"])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"{name}: malformed manifest ({e})") from None


def snapshot_dir(group: str, dataset: str, snapshot: str) -> str:
    return f"{group}/{dataset}/{snapshot}/"


@dataclass
class DatasetState:
    """One dataset's part of the archive, as listed and authenticated."""

    stored: dict[str, Manifest] = field(default_factory=dict)
    partial: dict[str, Manifest] = field(default_factory=dict)
    debris: dict[str, list[str]] = field(default_factory=dict)
    """Snapshot directories with neither manifest nor progress: leftovers, keys to delete."""
    objects: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per snapshot: file name -> size, as the store listed them."""


class Archive:
    """A store plus the host's key: reads and writes manifests; the chunks are :mod:`snapsync.chunks`' job."""

    def __init__(self, store: ObjectStore, key: Key) -> None:
        self.store = store
        self.key = key

    def name(self, key: str) -> str:
        return f"{self.store.describe().rstrip('/')}/{key}"

    def groups(self) -> list[str]:
        return sorted({k.split("/", 1)[0] for k in self.store.list("") if "/" in k})

    def scan(self, group: str, problems: list[str] | None = None) -> dict[str, DatasetState]:
        """List a group and authenticate every manifest and progress record in it.

        Raises :class:`IntegrityError` (or :class:`WrongKey`) on the first one that fails, so nothing
        is planned on an archive snapsync cannot trust; with a ``problems`` list (verify), records
        each failure there instead and leaves that snapshot out.
        """
        layout: dict[str, dict[str, dict[str, int]]] = {}
        for key, size in self.store.list(f"{group}/").items():
            rest = key[len(group) + 1:]
            dataset, _, tail = rest.rpartition("/")
            dataset, _, snapshot = dataset.rpartition("/")
            if not dataset or not snapshot:
                continue
            layout.setdefault(dataset, {}).setdefault(snapshot, {})[tail] = size
        states: dict[str, DatasetState] = {}
        for dataset, snapshots in sorted(layout.items()):
            state = states[dataset] = DatasetState(objects=snapshots)
            for snapshot, files in sorted(snapshots.items()):
                where = snapshot_dir(group, dataset, snapshot)
                try:
                    if MANIFEST in files:
                        state.stored[snapshot] = self.read(where + MANIFEST, group, dataset, snapshot)
                    elif PROGRESS in files:
                        state.partial[snapshot] = self.read(where + PROGRESS, group, dataset, snapshot)
                    else:
                        state.debris[snapshot] = [where + f for f in files]
                except IntegrityError as e:
                    if problems is None or isinstance(e, WrongKey):
                        raise
                    problems.append(str(e))
        return states

    def read(self, key: str, group: str, dataset: str, snapshot: str) -> Manifest:
        name = self.name(key)
        manifest = Manifest.from_json(unseal(self.key, self.store.get(key), name), name)
        if (manifest.group, manifest.dataset, manifest.snapshot) != (group, dataset, snapshot):
            raise IntegrityError(
                f"{name}: describes {manifest.group}/{manifest.dataset}/{manifest.snapshot} "
                f"(moved or swapped from another place)"
            )
        if manifest.complete != key.endswith(MANIFEST):
            raise IntegrityError(f"{name}: a {'complete' if manifest.complete else 'progress'} record in the wrong place")
        return manifest

    def write(self, manifest: Manifest) -> None:
        name = MANIFEST if manifest.complete else PROGRESS
        self.store.put(manifest.directory() + name, sign(self.key, manifest.to_json()))
