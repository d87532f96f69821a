"""Getting offsite copies back: ``snapsync restore`` replays a chain, ``snapsync verify`` checks the archive.

Restore checks before it writes anything: every manifest in the chain authenticates, each links to
its parent by identity, and every chunk object exists with the size its manifest records. Then each
stream of the chain (the full one first) is replayed through the same receiving code replication
uses (the :class:`~snapsync.backends.receiver.Receiver` of the group's filesystem), so a restored copy lands
exactly like a replicated one: ``<to>/<group>/<dataset key>/<snapshot>``, committed only after
receive succeeded and the identity matched. Every segment is authenticated before its bytes reach
``receive``; a copy whose stream later fails a check is deleted again.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn, Protocol

from snapsync.backends import FILESYSTEMS, filesystem_of_place, receiver_for
from snapsync.offsite.archive import Archive, DatasetState, Manifest
from snapsync.offsite.chunks import replay_chunk
from snapsync.errors import BackendError, IntegrityError, SnapsyncError, UsageError
from snapsync.backends.base import StorageBackend
from snapsync.plan.naming import parse_snapshot_name
from snapsync.plan.offsite import chain
from snapsync.replication.peer import Peer
from snapsync.policy.schema import Group, Policy
from snapsync.host.streams import Meter, finish, pump, reaped, widen

if TYPE_CHECKING:
    from snapsync.backends.receiver import Receiver
    from snapsync.replication.replicate import ProgressFactory


_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
log = logging.getLogger("snapsync")


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


def _destination(to: str, filesystem: str) -> Receiver:
    """The receiver at ``to``, which must be a place of the group's own filesystem."""
    if filesystem_of_place(to) != filesystem:
        raise UsageError(f"--to {to!r}: a {filesystem} group restores {FILESYSTEMS[filesystem].places}")
    return receiver_for(to)


class Landing(Protocol):
    """Where restored streams go: a receiving root (``--to``), or the group's own places (``--in-place``)."""

    description: str

    def prepare(self, keys: dict[str, str], dry_run: bool, snapshot: str) -> None:
        """``keys``: dataset key -> the dataset it came from. Refuse before anything is written."""
        ...

    def receiver(self, key: str) -> tuple[Receiver, str]: ...

    def finish(self, key: str, name: str) -> None: ...


class ToRoot:
    """Copies land as on a replication target: ``<to>/<group>/<dataset key>/<snapshot>``."""

    def __init__(self, to: str, group: str, filesystem: str) -> None:
        self.store = _destination(to, filesystem)
        self.group = group
        self.description = to

    def prepare(self, keys: dict[str, str], dry_run: bool, snapshot: str) -> None:
        if not dry_run:
            self.store.check_root()

    def receiver(self, key: str) -> tuple[Receiver, str]:
        return self.store, f"{self.group}/{key}"

    def finish(self, key: str, name: str) -> None:
        pass


class InPlace:
    """Bare-metal recovery: each dataset is restored where the policy has it, so the policy takes over.

    Each snapshot is received as one of the dataset's own snapshots (with the source's identity, so
    replication continues incrementally from it) and the dataset is made live from it: see
    :meth:`~snapsync.backends.base.StorageBackend.restore_receiver` and ``finish_in_place``. A
    dataset that already exists is refused: this fills empty places only.
    """

    def __init__(self, group: Group, backend: StorageBackend) -> None:
        self.group = group
        self.backend = backend
        self.description = "the group's own datasets"
        self.places: dict[str, str] = {}
        self.receivers: dict[str, tuple[Receiver, str]] = {}
        self.done: set[str] = set()

    def prepare(self, keys: dict[str, str], dry_run: bool, snapshot: str) -> None:
        for key, source in keys.items():
            if source not in self.group.datasets:
                raise UsageError(
                    f"the backup of {source} is not a dataset of group {self.group.name} in this policy; "
                    f"restore it --to a directory instead"
                )
            self.places[key] = source
        # Already restored by an earlier, interrupted run of this restore: carry on with the others.
        self.done = {key for key, source in self.places.items() if self.backend.restored_in_place(source, snapshot)}
        for key, source in self.places.items():
            if key not in self.done and self.backend.exists(source):
                raise UsageError(
                    f"{source} already exists; --in-place restores into empty places only (move it aside, "
                    f"use `snapsync rollback`, or restore --to somewhere else)"
                )
        self.receivers = {key: self.backend.restore_receiver(source, create=not dry_run) for key, source in self.places.items()}

    def receiver(self, key: str) -> tuple[Receiver, str]:
        return self.receivers[key]

    def finish(self, key: str, name: str) -> None:
        if key not in self.done:
            self.backend.finish_in_place(self.places[key], name)


def restore(
    archive: Archive,
    target: str,
    group: str,
    to: str | Landing,
    snapshot: str | None = None,
    dry_run: bool = False,
    progress: Callable[[str, int | None], Callable[[int], None] | None] | None = None,
    verify_first: bool = False,
    accept_rollback: bool = False,
) -> RestoreReport:
    """Restore ``group`` (at ``snapshot``, default the newest complete one) below ``to``.

    ``verify_first`` reads and checks every chunk of the chains before receiving anything (twice
    the download); without it a damaged object stops the restore at that stream, after the
    streams before it were received complete. When the archive's newest uploads are missing (its
    head, or this host's record of it, says so), the newest that is left is restored only when
    ``snapshot`` names it or ``accept_rollback`` is given: never an older state in silence.
    """
    if not _GROUP.fullmatch(group):
        raise UsageError(f"{group!r} is not a group name")
    started = time.monotonic()
    survey = archive.survey(group)  # damage elsewhere in the group must not block this restore
    archive.trust([survey])
    findings = archive.findings(survey)
    states = survey.scope()
    if findings.hidden and snapshot is None and not accept_rollback:
        _refuse_an_older_state(group, states, findings.hidden)
    problems = [*survey.problems, *survey.orphans(archive.name), *findings.hidden, *findings.notes]
    name = choose_snapshot(group, states, snapshot)
    plans = _chains(archive, states, name, problems)
    if verify_first:
        _read_every_chunk(archive, plans)
    backends = {m.backend for ms in plans.values() for m in ms}
    if len(backends) != 1:
        raise IntegrityError(f"group {group!r} mixes backends in the archive ({', '.join(sorted(backends))})")
    landing = ToRoot(to, group, backends.pop()) if isinstance(to, str) else to
    landing.prepare({ds: ms[-1].source for ds, ms in plans.items()}, dry_run, name)
    report = RestoreReport(target, group, name, landing.description, dry_run, problems=problems)
    for ds, manifests in plans.items():
        report.datasets.append(_replay_chain(archive, landing, ds, manifests, dry_run, progress))
        if not dry_run:
            landing.finish(ds, name)
    report.seconds = time.monotonic() - started
    return report


def _refuse_an_older_state(group: str, states: dict[str, DatasetState], hidden: list[str]) -> NoReturn:
    """The archive's newest uploads are missing: restoring what is left would go back in time unasked."""
    more = f" (and {len(hidden) - 1} more)" if len(hidden) > 1 else ""
    try:
        left = f"the newest left is {group}@{choose_snapshot(group, states, None)}: name it to restore it anyway"
    except UsageError:
        left = "nothing else is left"
    raise IntegrityError(f"{hidden[0]}{more}; not restoring an older snapshot in its place ({left})")


def _chains(archive: Archive, states: dict[str, DatasetState], name: str, problems: list[str]) -> dict[str, list[Manifest]]:
    """Per dataset, the manifests to replay for ``name``; a broken chain names what else is unreadable."""
    try:
        return {ds: check_chain(archive, state, name) for ds, state in states.items()}
    except IntegrityError as e:
        if problems:
            raise IntegrityError(f"{e} (unreadable: {'; '.join(problems)})") from None
        raise


def _read_every_chunk(archive: Archive, plans: dict[str, list[Manifest]]) -> None:
    for manifests in plans.values():
        for m in manifests:
            for i in range(len(m.chunks)):
                replay_chunk(archive.store, archive.key, m, i, archive.name(m.chunk_key(i)), None)


def _replay_chain(
    archive: Archive,
    landing: Landing,
    ds: str,
    manifests: list[Manifest],
    dry_run: bool,
    progress: Callable[[str, int | None], Callable[[int], None] | None] | None,
) -> DatasetRestore:
    """Receive one dataset's chain, skipping the streams whose copies are already there complete."""
    item = DatasetRestore(ds, manifests[-1].source, [m.snapshot for m in manifests])
    store, rel = landing.receiver(ds)
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
    return item


def restore_from_peer(
    peer: Peer,
    target: str,
    group: Group,
    landing: Landing,
    snapshot: str | None = None,
    dry_run: bool = False,
    progress: Callable[[str, int | None], Callable[[int], None] | None] | None = None,
) -> RestoreReport:
    """Restore from another host's copies (an ssh or local target): one full send of the snapshot
    per dataset, served by ``snapsync serve`` on the backup host: the receive role of this host's key
    with ``--allow-restore``, or a send-role key on the same root (docs/replication.md)."""
    from snapsync.protocol import dataset_key

    started = time.monotonic()
    keys = {dataset_key(ds): ds for ds in group.datasets}
    paths = {key: f"{group.name}/{key}" for key in keys}
    with peer.connected():
        listed = peer.readable(list(paths.values()))
        names = []
        for key, path in paths.items():
            ours = {n for n in listed.get(path, ()) if parse_snapshot_name(group.prefix, n) is not None}
            if not ours:
                raise UsageError(f"{target} has no copies of {keys[key]} (group {group.name})")
            names.append(ours)
        common = set.intersection(*names)
        if snapshot is not None and snapshot not in common:
            raise UsageError(f"{group.name}@{snapshot}: not on {target} for every dataset of the group")
        if not common:
            raise UsageError(f"{target}: no snapshot of group {group.name} is there for all of its datasets")
        name = snapshot or max(common, key=lambda n: (parse_snapshot_name(group.prefix, n), n))
        landing.prepare(keys, dry_run, name)
        report = RestoreReport(target, group.name, name, landing.description, dry_run)
        for key, path in paths.items():
            item = DatasetRestore(key, keys[key], [name])
            report.datasets.append(item)
            store, rel = landing.receiver(key)
            if not dry_run and any(c.name == name and c.read_only and not c.partial for c in store.copies(rel)):
                item.present.append(name)
            elif not dry_run:
                proc, header = peer.open_send(path, name, None, "none")
                meter = Meter(tick=progress(f"restore {keys[key]} {name.rpartition('_')[2]}", None) if progress else None)
                with reaped(proc):
                    assert proc.popen.stdout is not None
                    _pumped(store, rel, name, header["guid"], proc.popen.stdout.fileno(), meter, proc.kill)
                    finish([proc])
                item.received.append(name)
                item.bytes = meter.bytes
            if not dry_run:
                landing.finish(key, name)
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
        except (SnapsyncError, OSError):
            pass  # the receive's own error says what happened (a full disk, say); the next restore cleans up
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


def _pumped(store: Receiver, rel: str, name: str, guid: str, source: int, meter: Meter, stop: Callable[[], None]) -> None:
    """Receive from ``source`` through a pipe that a thread fills with ``splice``, counting bytes.

    ``stop`` ends the sending side when receive fails, so the feeder never waits on a stalled peer.
    """
    read_end, write_end = os.pipe()
    failure: list[BaseException] = []

    def feed() -> None:
        try:
            pump(source, write_end, meter)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            failure.append(e)
        finally:
            os.close(write_end)

    feeder = threading.Thread(target=feed, name="snapsync-restore-pump", daemon=True)
    feeder.start()
    try:
        store.receive(rel, name, guid, read_end)
    except BaseException:
        stop()
        raise
    finally:
        os.close(read_end)
        feeder.join()
    if failure and not isinstance(failure[0], BrokenPipeError):
        store.delete(rel, [name])
        raise failure[0]


def restore_from(
    policy: Policy,
    source: str,
    group: str,
    landing: str | Landing,
    snapshot: str | None = None,
    dry_run: bool = False,
    progress: Callable[[str, int | None], Callable[[int], None] | None] | None = None,
    key_file: str | None = None,
    verify_first: bool = False,
    accept_rollback: bool = False,
) -> RestoreReport:
    """Restore from any kind of target: offsite replays the chain, another host sends its copy."""
    from snapsync.policy.schema import DirTarget, S3Target

    target = policy.targets.get(source) or policy.pulls.get(source)
    if target is None:
        raise UsageError(f"{policy.source}: no target {source!r} (targets: {', '.join(sorted(policy.targets)) or 'none'})")
    if isinstance(target, (DirTarget, S3Target)):
        from snapsync.offsite.upload import open_archive

        return restore(
            open_archive(target, key_file), source, group, landing, snapshot, dry_run, progress, verify_first, accept_rollback
        )
    from snapsync.ops.runner import select_groups
    from snapsync.replication.transport import transport_for

    (chosen,) = select_groups(policy, [group])
    if isinstance(landing, str):
        landing = ToRoot(landing, chosen.name, chosen.backend)
    return restore_from_peer(Peer(transport_for(source, target), "send", restore=True), source, chosen, landing, snapshot, dry_run, progress)


@dataclass
class VerifyReport:
    target: str
    groups: list[str] = field(default_factory=list)
    manifests: int = 0
    chunks: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Worth knowing, not damage: an archive from before head records, a head an upload left behind."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target, "ok": self.ok, "groups": self.groups, "manifests": self.manifests,
            "chunks": self.chunks, "chunks_read": self.chunks_read, "bytes_read": self.bytes_read,
            "problems": self.problems, "warnings": self.warnings,
        }


def verify(
    archive: Archive, target: str, groups: list[str] | None = None, sample: int | None = None,
    rng: random.Random | None = None, progress: ProgressFactory | None = None,
) -> VerifyReport:
    """Authenticate every manifest, check every chain and object size, the head against the manifests and
    this host's record of its uploads; read all chunks or a sample. Nothing is deleted or repaired."""
    report = VerifyReport(target)
    report.groups = groups or sorted({*archive.groups(), *archive.remembered_groups()})
    every: list[tuple[Manifest, int]] = []
    surveys = [archive.survey(group) for group in report.groups]
    archive.trust(surveys)
    for group, survey in zip(report.groups, surveys):
        findings = archive.findings(survey)
        report.problems += [*survey.problems, *findings.hidden, *survey.orphans(archive.name)]
        report.warnings += findings.notes
        states = survey.datasets
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
    tick = progress(f"{target}: verify {len(chosen)} chunks", sum(m.chunks[i].size for _, (m, i) in chosen)) if progress else None
    checked = 0
    for key, (m, i) in chosen:
        checked += m.chunks[i].size
        try:
            replay_chunk(archive.store, archive.key, m, i, archive.name(key), None)
        except IntegrityError as e:
            report.problems.append(str(e))
            continue
        finally:
            if tick is not None:
                tick(checked)
        report.chunks_read += 1
        report.bytes_read += m.chunks[i].size
    for warning in report.warnings:
        log.warning("%s: %s", target, warning)
    return report
