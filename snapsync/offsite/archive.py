"""The offsite archive's layout: which object holds what, and reading it back as authenticated manifests.

Layout below the store's root (a directory, or a bucket's prefix)::

    <group>/<dataset key>/<snapshot>/chunk-000000 ...   sealed pieces of the send stream, in order
    <group>/<dataset key>/<snapshot>/progress.json      while an upload is under way (authenticated)
    <group>/<dataset key>/<snapshot>/manifest.json      written last: the upload is complete
    <group>/head.json                                   after each upload: the newest per dataset, sequenced

A snapshot counts as stored only when its manifest exists and authenticates; a directory with chunks
and a ``progress.json`` is an upload that can be continued; anything else there is debris from an
interrupted run and is deleted by the next one. The dataset key is the one replication uses
(:func:`snapsync.protocol.dataset_key`), so a person browsing the bucket finds the source's paths.

Whoever can write to the store can plant, delete and put back objects, but not make one that
authenticates. So a record that fails authentication is reported and skipped, never trusted and
never a reason to stop; and the head record, with the uploading host's own copy of it in the state
directory, makes deleting the newest uploads or putting an older head back visible (:meth:`Archive.findings`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from snapsync.errors import IntegrityError
from snapsync.offsite.objectstore import Missing, ObjectStore, valid_key
from snapsync.plan.offsite import PartialUpload, Stored
from snapsync.offsite.sealing import ForeignRecord, Key, shown, sign, unseal
from snapsync.host.state import read_json, state_dir, write_json

FORMAT = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
HEAD = "head.json"
CHUNK = "chunk-{:06d}"
GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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
    sequence: int | None = None
    """The number of the head record written right after this manifest; None before heads existed."""
    archive: str | None = None
    """The id of the archive (minted with its first head) this upload belongs to."""

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
        } | ({} if self.sequence is None else {"sequence": self.sequence, "archive": self.archive})

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
                sequence=None if data.get("sequence") is None else _count(data["sequence"]),
                archive=None if data.get("archive") is None else str(data["archive"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IntegrityError(f"{name}: malformed manifest ({shown(str(e), 80)})") from None


def _count(value: object) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"{value!r} is not a sequence number")
    return value


@dataclass(frozen=True)
class Newest:
    snapshot: str
    guid: str


@dataclass(frozen=True)
class Head:
    """A group's newest upload per dataset, numbered by a sequence that only grows.

    Written after every upload, after its manifest, and sealed like one. Deleting the newest
    uploads leaves a head naming what is gone; putting an older head back lowers its number below
    what the uploading host remembers, and usually below a remaining manifest's.
    """

    group: str
    archive: str
    """Minted with the first head: two archives in one place over time (rotated disks) are told apart."""
    sequence: int
    host: str
    written: datetime
    newest: Mapping[str, Newest]
    """Dataset key -> its newest upload. Only the newest: pruning older uploads never contradicts it."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "kind": "head", "group": self.group, "archive": self.archive,
            "sequence": self.sequence, "host": self.host, "written": time_text(self.written),
            "newest": {ds: {"snapshot": n.snapshot, "guid": n.guid} for ds, n in sorted(self.newest.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], name: str) -> Head:
        if data.get("format") != FORMAT or data.get("kind") != "head":
            raise IntegrityError(f"{name}: not a head record this version reads")
        try:
            return cls(
                group=str(data["group"]), archive=str(data["archive"]), sequence=_count(data["sequence"]),
                host=str(data["host"]), written=_time(str(data["written"])),
                newest={str(ds): Newest(str(n["snapshot"]), str(n["guid"])) for ds, n in dict(data["newest"]).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IntegrityError(f"{name}: malformed head record ({shown(str(e), 80)})") from None

    def names(self) -> str:
        return ", ".join(f"{ds}@{n.snapshot}" for ds, n in sorted(self.newest.items())) or "nothing yet"


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


@dataclass
class Survey:
    """A group as found in the store: what authenticated, and what did not (named, skipped)."""

    group: str
    datasets: dict[str, DatasetState] = field(default_factory=dict)
    head: Head | None = None
    problems: list[str] = field(default_factory=list)
    """Objects that failed authentication or do not belong to the layout: reported, never trusted."""
    foreign: list[ForeignRecord] = field(default_factory=list)
    authentic: int = 0
    """Records that authenticated: one is enough to know the key file is the right one."""
    strays: list[str] = field(default_factory=list)
    """Keys with no place in the layout, or beside a manifest that does not list them."""

    def manifests(self) -> Iterator[Manifest]:
        for state in self.datasets.values():
            yield from state.stored.values()

    def scope(self) -> dict[str, DatasetState]:
        """The group's datasets as a restore sees them: those the head names (and any uploaded since
        it was written); without a head, every dataset with an authentic record. A directory of junk
        is no dataset, and one the group no longer has does not hold a restore back."""
        if self.head is None:
            return {ds: s for ds, s in self.datasets.items() if s.stored or s.partial}
        later = {m.dataset for m in self.manifests() if m.sequence is not None and m.sequence > self.head.sequence}
        return {ds: self.datasets.get(ds) or DatasetState() for ds in sorted({*self.head.newest, *later})}

    def orphans(self, name: Callable[[str], str]) -> list[str]:
        """Objects no manifest accounts for: an interrupted prune or upload, or a deleted manifest."""
        out = []
        for ds, state in sorted(self.datasets.items()):
            for snapshot, keys in sorted(state.debris.items()):
                out.append(
                    f"{name(snapshot_dir(self.group, ds, snapshot))}: {len(keys)} object(s) without a manifest "
                    f"(an interrupted prune or upload, or a deleted manifest); the next upload deletes them"
                )
        out += [f"{name(k)}: not part of any upload (planted, or left by another program)" for k in self.strays]
        return out


@dataclass
class Findings:
    hidden: list[str] = field(default_factory=list)
    """Uploads that should be there and are not, or a head that went backwards: a rollback."""
    notes: list[str] = field(default_factory=list)
    """Worth saying, not a rollback: no head yet (an archive from before heads), a head behind a manifest."""


def _printable(text: str) -> str:
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _untrusted(key: str) -> str:
    """An object key as listed, for a message: anybody with write access chose it. Control characters
    are escaped, and brackets (never in a key snapsync writes) percent-encoded, so it can fake no
    second line and no terminal markup."""
    return _printable(key).replace("[", "%5B").replace("]", "%5D")


class Archive:
    """A store plus the host's key: reads and writes manifests and heads; the chunks are :mod:`snapsync.offsite.chunks`' job."""

    def __init__(self, store: ObjectStore, key: Key) -> None:
        self.store = store
        self.key = key

    def name(self, key: str) -> str:
        return f"{self.store.describe().rstrip('/')}/{_untrusted(key)}"

    def groups(self) -> list[str]:
        return sorted({g for k in self.store.list("") if "/" in k and GROUP.fullmatch(g := k.split("/", 1)[0])})

    def survey(self, group: str) -> Survey:
        """Read the head, then list the group and authenticate every manifest and progress record.

        The head is read first: an upload finishing meanwhile adds a manifest the listing shows,
        never a head naming a manifest the listing missed. Whatever fails is named in ``problems``
        and left out; deciding what that means (a wrong key, a rollback) is :meth:`trust`'s and
        :meth:`findings`' job.
        """
        survey = Survey(group)
        head_key = f"{group}/{HEAD}"
        try:
            survey.head = self.read_head(group)
            survey.authentic += 1
        except Missing:
            pass
        except IntegrityError as e:
            self._reject(survey, e)
        layout: dict[str, dict[str, dict[str, int]]] = {}
        for key, size in self.store.list(f"{group}/").items():
            rest = key[len(group) + 1:]
            dataset, _, tail = rest.rpartition("/")
            dataset, _, snapshot = dataset.rpartition("/")
            if not dataset or not snapshot or not valid_key(key):
                if key != head_key:
                    survey.strays.append(key)
                continue
            layout.setdefault(dataset, {}).setdefault(snapshot, {})[tail] = size
        for dataset, snapshots in sorted(layout.items()):
            state = survey.datasets[dataset] = DatasetState(objects=snapshots)
            for snapshot, files in sorted(snapshots.items()):
                where = snapshot_dir(group, dataset, snapshot)
                try:
                    if MANIFEST in files:
                        m = state.stored[snapshot] = self.read(where + MANIFEST, group, dataset, snapshot)
                        known = {MANIFEST, PROGRESS, *(CHUNK.format(i) for i in range(len(m.chunks)))}
                        survey.strays += [where + f for f in sorted(files) if f not in known]
                    elif PROGRESS in files:
                        state.partial[snapshot] = self.read(where + PROGRESS, group, dataset, snapshot)
                    else:
                        state.debris[snapshot] = [where + f for f in files]
                        continue
                    survey.authentic += 1
                except Missing:
                    continue  # deleted since the listing (a prune): as if never listed
                except IntegrityError as e:
                    self._reject(survey, e)
        return survey

    def _reject(self, survey: Survey, error: IntegrityError) -> None:
        survey.problems.append(_printable(str(error)))
        if isinstance(error, ForeignRecord):
            survey.foreign.append(error)

    def trust(self, surveys: Sequence[Survey]) -> None:
        """Raise :class:`WrongKey` when it is the key file that is wrong, not the archive.

        One planted record must not make the archive unusable, so a record naming another key
        counts for nothing while anything authenticates. Only when nothing does, some record looks
        like a real one of another key (junk does not), and this host never wrote here with the key
        it has, is it the key file; the message names the key most records were made with.
        """
        if any(s.authentic for s in surveys):
            return
        foreign = [f for s in surveys for f in s.foreign if f.key_id is not None]
        if not foreign or any(r.get("key_id") == self.key.key_id for r in self._records_here()):
            return
        ids = Counter(f.key_id for f in foreign)
        raise next(f for f in foreign if f.key_id == ids.most_common(1)[0][0]).wrong_key

    def findings(self, survey: Survey) -> Findings:
        """What the head, the manifests and this host's record of its uploads say about a rollback."""
        out = Findings()
        where = self.name(f"{survey.group}/{HEAD}")
        head = survey.head
        manifests = list(survey.manifests())
        sequenced = [m for m in manifests if m.sequence is not None]
        records = self.remembered(survey.group)
        if head is None:
            known = [records[m.archive] for m in sequenced if m.archive in records] or list(records.values())
            if known:
                top = max(known, key=lambda h: h.sequence)
                out.hidden.append(
                    f"{where}: missing, but this host wrote head #{top.sequence} here ({top.names()}): deleted"
                    + (", with what it named?" if manifests else
                       ", and nothing is stored (the archive was emptied, or this is a new disk or bucket in its place)")
                )
            elif sequenced:
                top_m = max(sequenced, key=lambda m: m.sequence or 0)
                out.hidden.append(
                    f"{where}: missing, though uploads here were made with one (up to #{top_m.sequence}, "
                    f"{top_m.dataset}@{top_m.snapshot}): deleted?"
                )
            elif manifests:
                out.notes.append(
                    f"{where}: none yet (uploads made before snapsync wrote head records); the next upload writes one, "
                    f"until then hiding the newest uploads cannot be detected"
                )
            return out
        for ds, newest in sorted(head.newest.items()):
            m = survey.datasets.get(ds, DatasetState()).stored.get(newest.snapshot)
            if m is None:
                out.hidden.append(
                    f"{where}: head #{head.sequence} names {ds}@{newest.snapshot} as the newest upload, and it has "
                    f"no authentic manifest (deleted, hidden or tampered with)"
                )
            elif m.guid != newest.guid:
                out.hidden.append(
                    f"{where}: head #{head.sequence} names {ds}@{newest.snapshot} with identity {newest.guid}, "
                    f"the manifest there has {m.guid}"
                )
        mine = records.get(head.archive)
        if mine is not None and mine.sequence > head.sequence:
            out.hidden.append(
                f"{where}: head #{head.sequence} ({head.names()}) is older than head #{mine.sequence} this host "
                f"wrote ({mine.names()}): an old head was put back, the archive was rolled back"
            )
        elif mine is not None and mine.sequence == head.sequence and dict(mine.newest) != dict(head.newest):
            out.hidden.append(f"{where}: head #{head.sequence} is not the one this host wrote ({mine.names()})")
        others = sorted({str(m.archive) for m in sequenced if m.archive != head.archive})
        if others:
            out.hidden.append(
                f"{where}: belongs to archive {head.archive}, manifests here to {', '.join(others)}: "
                f"a head or uploads copied in from another archive"
            )
        ahead = [m for m in sequenced if (m.sequence or 0) > head.sequence]
        if ahead and not out.hidden:
            top_m = max(ahead, key=lambda m: m.sequence or 0)
            out.notes.append(
                f"{where}: head #{head.sequence} is older than the manifest of {top_m.dataset}@{top_m.snapshot} "
                f"(#{top_m.sequence}): an upload stopped before it wrote the head, or an older head was put back; "
                f"the next upload writes a new one"
            )
        return out

    def read_head(self, group: str) -> Head:
        key = f"{group}/{HEAD}"
        name = self.name(key)
        head = Head.from_json(unseal(self.key, self.store.get(key), name), name)
        if head.group != group:
            raise IntegrityError(f"{name}: the head of group {shown(head.group)} (moved or swapped from another place)")
        return head

    def write_head(self, head: Head) -> None:
        """Into the archive, then into this host's record: a crash between leaves the record behind, never ahead."""
        self.store.put(f"{head.group}/{HEAD}", sign(self.key, head.to_json()))
        path = self._record_path(head.group)
        record = read_json(path) or {}
        archives = record.get("archives") if isinstance(record.get("archives"), dict) else {}
        assert isinstance(archives, dict)
        archives[head.archive] = head.to_json() | {"key_id": self.key.key_id}
        write_json(path, {"place": self.store.identity(), "group": head.group, "archives": archives})

    def remembered(self, group: str) -> dict[str, Head]:
        """The heads this host wrote for ``group`` in this place, per archive id, made with this key."""
        record = read_json(self._record_path(group)) or {}
        out = {}
        archives = record.get("archives")
        if record.get("place") == self.store.identity() and isinstance(archives, dict):
            for archive, data in archives.items():
                if isinstance(data, dict) and data.get("key_id") == self.key.key_id:
                    try:
                        out[str(archive)] = Head.from_json(data, "local record")
                    except IntegrityError:
                        continue
        return out

    def remembered_groups(self) -> list[str]:
        """Groups this host uploaded to this place with this key: an emptied group is still checked."""
        return sorted({
            str(r.get("group")) for r in self._records_here()
            if isinstance(r.get("group"), str) and self.remembered(str(r["group"]))
        })

    def _record_path(self, group: str) -> Path:
        digest = hashlib.sha256(f"{self.store.identity()}\0{group}".encode()).hexdigest()[:32]
        return state_dir() / "offsite" / f"{digest}.json"

    def _records_here(self) -> list[dict[str, Any]]:
        """Every archive entry of this host's records for this place (any group, any key)."""
        directory = state_dir() / "offsite"
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return []
        out = []
        for name in names:
            record = read_json(directory / name) if name.endswith(".json") else None
            archives = record.get("archives") if record else None
            if record and record.get("place") == self.store.identity() and isinstance(archives, dict):
                out += [dict(a) | {"group": record.get("group")} for a in archives.values() if isinstance(a, dict)]
        return out

    def read(self, key: str, group: str, dataset: str, snapshot: str) -> Manifest:
        name = self.name(key)
        manifest = Manifest.from_json(unseal(self.key, self.store.get(key), name), name)
        if (manifest.group, manifest.dataset, manifest.snapshot) != (group, dataset, snapshot):
            raise IntegrityError(
                f"{name}: describes {_printable(f'{manifest.group}/{manifest.dataset}/{manifest.snapshot}')[:200]} "
                f"(moved or swapped from another place)"
            )
        if manifest.complete != key.endswith(MANIFEST):
            raise IntegrityError(f"{name}: a {'complete' if manifest.complete else 'progress'} record in the wrong place")
        return manifest

    def write(self, manifest: Manifest) -> None:
        name = MANIFEST if manifest.complete else PROGRESS
        self.store.put(manifest.directory() + name, sign(self.key, manifest.to_json()))
