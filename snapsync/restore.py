"""Getting offsite copies back: ``snapsync restore`` replays a chain, ``snapsync verify`` checks the archive.

Restore checks before it writes anything: every manifest in the chain authenticates, each links to
its parent by identity, and every chunk object exists with the size its manifest records. Then each
stream of the chain (the full one first) is replayed through the same receiving code replication
uses (:mod:`snapsync.store` for btrfs, :mod:`snapsync.zfs_store` for ZFS), so a restored copy lands
exactly like a replicated one: ``<to>/<group>/<dataset key>/<snapshot>``, committed only after
receive succeeded and the identity matched. Every segment is authenticated before its bytes reach
``receive``; a copy whose stream later fails a check is deleted again.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from snapsync.archive import Archive, DatasetState, Manifest
from snapsync.chunks import replay_chunk
from snapsync.errors import BackendError, IntegrityError, SnapsyncError, UsageError
from snapsync.offsite_plan import chain
from snapsync.store import Copy
from snapsync.streams import Meter, widen


_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class Receiver(Protocol):
    """The receiving side replication uses: :class:`~snapsync.store.BtrfsStore` or ``ZfsStore``."""

    def check_root(self) -> None: ...

    def copies(self, rel: str) -> list[Copy]: ...

    def receive(self, rel: str, name: str, guid: str, stdin: int, compress: str = "none", force: bool = False) -> dict[str, object]: ...

    def delete(self, rel: str, names: list[str], allow_writable: bool = False) -> list[str]: ...

    def delete_partials(self, rel: str, names: list[str]) -> list[str]: ...

    def listing(self, rel: str) -> tuple[list[Copy], str | None]: ...


@dataclass
class DatasetRestore:
    dataset: str
    source: str
    chain: list[str]
    received: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    bytes: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "dataset": self.dataset, "source": self.source, "chain": self.chain,
            "received": self.received, "already_present": self.present, "bytes": self.bytes,
        }


@dataclass
class RestoreReport:
    target: str
    group: str
    snapshot: str
    to: str
    dry_run: bool
    datasets: list[DatasetRestore] = field(default_factory=list)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    """Damage elsewhere in the group (other snapshots' records), reported; it did not block this restore."""

    @property
    def bytes(self) -> int:
        return sum(d.bytes for d in self.datasets)

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target, "group": self.group, "snapshot": self.snapshot, "to": self.to,
            "dry_run": self.dry_run, "ok": True, "datasets": [d.to_json() for d in self.datasets],
            "bytes": self.bytes, "seconds": round(self.seconds, 3), "problems": self.problems,
        }


def choose_snapshot(group: str, states: dict[str, DatasetState], wanted: str | None) -> str:
    """The requested snapshot, or the newest one every dataset of the group has complete."""
    if not states:
        raise UsageError(f"group {group!r} has nothing stored on this target")
    names = [set(s.stored) for s in states.values()]
    common = set.intersection(*names)
    if wanted is not None:
        if wanted not in common:
            missing = [d for d, s in states.items() if wanted not in s.stored]
            raise UsageError(f"{group}@{wanted}: not stored for {', '.join(missing)}")
        return wanted
    if not common:
        raise UsageError(f"group {group!r}: no snapshot is stored complete for all of its datasets")
    first = next(iter(states.values())).stored
    return max(common, key=lambda n: (first[n].created, n))


def check_chain(archive: Archive, state: DatasetState, name: str) -> list[Manifest]:
    """The manifests to replay for ``name``, full first, with every chunk object present at its size."""
    links = chain(name, {n: m.stored() for n, m in state.stored.items()})
    if links is None:
        raise IntegrityError(f"{archive.name(state.stored[name].directory())}: its chain back to a full upload is incomplete")
    manifests = [state.stored[s.name] for s in links]
    for m in manifests:
        files = state.objects.get(m.snapshot, {})
        for i, record in enumerate(m.chunks):
            key = m.chunk_key(i)
            size = files.get(key.rpartition("/")[2])
            if size is None:
                raise IntegrityError(f"{archive.name(key)}: missing")
            if size != record.size:
                raise IntegrityError(f"{archive.name(key)}: {size} bytes, the manifest records {record.size}")
    return manifests


def _destination(to: str, backend: str) -> Receiver:
    if backend == "btrfs":
        if not to.startswith("/"):
            raise UsageError(f"--to {to!r}: a btrfs group restores into a directory on btrfs (an absolute path)")
        from snapsync.store import BtrfsStore

        return BtrfsStore(to)
    if to.startswith("/"):
        raise UsageError(f"--to {to!r}: a zfs group restores below a ZFS dataset (a name like pool/restore)")
    from snapsync.zfs_store import ZfsStore

    return ZfsStore(to)


def restore(
    archive: Archive,
    target: str,
    group: str,
    to: str,
    snapshot: str | None = None,
    dry_run: bool = False,
    progress: Callable[[str, int | None], Callable[[int], None] | None] | None = None,
    verify_first: bool = False,
) -> RestoreReport:
    """Restore ``group`` (at ``snapshot``, default the newest complete one) below ``to``.

    ``verify_first`` reads and checks every chunk of the chains before receiving anything (twice
    the download); without it a damaged object stops the restore at that stream, after the
    streams before it were received complete.
    """
    if not _GROUP.fullmatch(group):
        raise UsageError(f"{group!r} is not a group name")
    started = time.monotonic()
    problems: list[str] = []
    states = archive.scan(group, problems)  # damage elsewhere in the group must not block this restore
    name = choose_snapshot(group, states, snapshot)
    try:
        plans = {ds: check_chain(archive, state, name) for ds, state in states.items()}
    except IntegrityError as e:
        if problems:
            raise IntegrityError(f"{e} (unreadable: {'; '.join(problems)})") from None
        raise
    if verify_first:
        for manifests in plans.values():
            for m in manifests:
                for i in range(len(m.chunks)):
                    replay_chunk(archive.store, archive.key, m, i, archive.name(m.chunk_key(i)), None)
    backends = {m.backend for ms in plans.values() for m in ms}
    if len(backends) != 1:
        raise IntegrityError(f"group {group!r} mixes backends in the archive ({', '.join(sorted(backends))})")
    store = _destination(to, backends.pop())
    report = RestoreReport(target, group, name, to, dry_run, problems=problems)
    if not dry_run:
        store.check_root()
    for ds, manifests in plans.items():
        item = DatasetRestore(ds, manifests[-1].source, [m.snapshot for m in manifests])
        report.datasets.append(item)
        rel = f"{group}/{ds}"
        have = {} if dry_run else {c.name: c for c in store.copies(rel) if not c.partial}
        for m in manifests:
            copy = have.get(m.snapshot)
            if copy is not None and copy.received_uuid == m.guid and copy.read_only:
                item.present.append(m.snapshot)
                continue
            if dry_run:
                continue
            tick = progress(f"restore {ds} {m.snapshot.rpartition('_')[2]}", m.raw_bytes) if progress else None
            item.bytes += _replay(archive, m, store, rel, Meter(tick=tick))
            item.received.append(m.snapshot)
    report.seconds = time.monotonic() - started
    return report


def _replay(archive: Archive, manifest: Manifest, store: Receiver, rel: str, meter: Meter) -> int:
    """One stream into ``receive``: a thread feeds a pipe while the store's receive reads it.

    The receiving process exits whatever the feeder does (a short stream fails or is refused by the
    store's checks), and closing the read end afterwards unblocks a feeder stuck on a full pipe.
    """
    _, token = store.listing(rel)
    if token is not None:
        raise BackendError(
            f"{rel} at the destination has an interrupted receive that this restore did not start; "
            f"finish or abort it (zfs receive -A) first"
        )
    read_end, write_end = os.pipe()
    widen(write_end)
    failure: list[BaseException] = []
    moved = [0]

    def feed() -> None:
        try:
            with open(write_end, "wb", buffering=0) as out:
                def write(data: bytes) -> None:
                    out.write(data)
                    meter.add(len(data))
                for i in range(len(manifest.chunks)):
                    moved[0] += replay_chunk(archive.store, archive.key, manifest, i, archive.name(manifest.chunk_key(i)), write)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            failure.append(e)

    feeder = threading.Thread(target=feed, name="snapsync-restore-feed", daemon=True)
    feeder.start()
    try:
        store.receive(rel, manifest.snapshot, manifest.guid, read_end)
    except SnapsyncError as e:
        os.close(read_end)
        read_end = -1
        feeder.join()
        try:
            store.delete_partials(rel, [manifest.snapshot])  # ZFS keeps a resumable partial; drop it
        except SnapsyncError:
            pass
        if failure and not isinstance(failure[0], BrokenPipeError):
            raise failure[0] from e
        raise
    finally:
        if read_end >= 0:
            os.close(read_end)
        feeder.join()
    if failure:
        store.delete(rel, [manifest.snapshot])
        raise failure[0]
    return moved[0]


@dataclass
class VerifyReport:
    target: str
    groups: list[str] = field(default_factory=list)
    manifests: int = 0
    chunks: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target, "ok": self.ok, "groups": self.groups, "manifests": self.manifests,
            "chunks": self.chunks, "chunks_read": self.chunks_read, "bytes_read": self.bytes_read,
            "problems": self.problems,
        }


def verify(
    archive: Archive, target: str, groups: list[str] | None = None, sample: int | None = None,
    rng: random.Random | None = None,
) -> VerifyReport:
    """Authenticate every manifest, check every chain and object size; read all chunks or a sample."""
    report = VerifyReport(target)
    report.groups = groups or archive.groups()
    every: list[tuple[Manifest, int]] = []
    for group in report.groups:
        states = archive.scan(group, report.problems)
        if not states and groups:
            report.problems.append(f"group {group!r}: nothing stored")
        for state in states.values():
            for name, m in sorted(state.stored.items()):
                report.manifests += 1
                try:
                    check_chain(archive, state, name)
                except IntegrityError as e:
                    report.problems.append(str(e))
                    continue
                every += [(m, i) for i in range(len(m.chunks))]
    unique = [(m.chunk_key(i), (m, i)) for m, i in every]
    report.chunks = len(unique)
    chosen = unique if sample is None else (rng or random.Random()).sample(unique, min(sample, len(unique)))
    for key, (m, i) in chosen:
        try:
            replay_chunk(archive.store, archive.key, m, i, archive.name(key), None)
        except IntegrityError as e:
            report.problems.append(str(e))
            continue
        report.chunks_read += 1
        report.bytes_read += m.chunks[i].size
    return report
