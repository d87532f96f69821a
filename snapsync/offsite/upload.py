"""Uploads a group's snapshots to an offsite target (``dir`` or ``s3``) and prunes it by chains.

The decisions are :mod:`snapsync.plan.offsite`'s; this module lists both sides, runs each send, and
commits in an order that survives a crash at any instant:

1. the snapshot (and its parent) are held on the source, so pruning cannot take them mid-upload;
2. chunks are stored one by one, each followed by an authenticated ``progress.json``;
3. only after the send exited 0 and the byte counts agree is ``manifest.json`` written, then
   ``progress.json`` deleted, then the group's ``head.json`` (and this host's record of it)
   advanced to name it, then the holds moved to the new bases (one per level, see
   :func:`~snapsync.plan.offsite.plan_uploads`).

Pruning deletes a snapshot's manifest first (it stops counting at that instant) and then its
chunks, newest first, so the archive never holds a manifest whose parent is gone.
"""

from __future__ import annotations

import io
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import cast

from snapsync.offsite.archive import (
    CHUNK, HEAD, MANIFEST, PROGRESS, Archive, DatasetState, Head, Manifest, Newest, Survey, snapshot_dir,
)
from snapsync.backends.base import SnapshotInfo, StorageBackend
from snapsync.offsite.chunks import RawSource, StreamChanged, store_chunk
from snapsync.errors import BackendError, SnapsyncError, StoreError
from snapsync.offsite.objectstore import DirStore, ObjectStore, S3Store
from snapsync.plan.holds import target_tag
from snapsync.plan.offsite import StorePrunePlan, Upload, plan_store_prune, plan_uploads
from snapsync.plan.snapshots import SnapshotId, our_snapshots
from snapsync.policy.schema import DirTarget, Group, S3Target
from snapsync.protocol import dataset_key
from snapsync.replication.replicate import ProgressFactory, Sent, TargetReport
from snapsync.offsite.sealing import CIPHER, Key
from snapsync.host.streams import Meter, Proc, finish, reaped, widen

log = logging.getLogger("snapsync")
OffsiteTarget = DirTarget | S3Target


def open_store(target: OffsiteTarget) -> ObjectStore:
    if isinstance(target, DirTarget):
        return DirStore(target.path)
    return S3Store(
        target.bucket,
        prefix=target.prefix,
        endpoint_url=target.endpoint_url,
        region=target.region,
        storage_class=target.storage_class,
        profile=target.profile,
        credentials_file=target.credentials_file,
    )


def open_archive(target: OffsiteTarget, key_file: str | None = None) -> Archive:
    return Archive(open_store(target), Key.load(key_file or target.key_file))


def source_snaps(prefix: str, snaps: Sequence[SnapshotInfo]) -> list[SnapshotId]:
    """Our snapshots, with the identity their send stream carries (as replication uses it); bookmarks
    cannot be sent, and an offsite chain never starts from one."""
    return [s for s in our_snapshots(prefix, snaps) if s.kind == "snapshot"]


class Offsite:
    def __init__(
        self,
        *,
        group: Group,
        target_name: str,
        target: OffsiteTarget,
        backend: StorageBackend,
        archive: Archive | None = None,
        now: Callable[[], datetime],
        progress: ProgressFactory | None = None,
        host: str | None = None,
    ) -> None:
        self.group = group
        self.target_name = target_name
        self.target = target
        self.backend = backend
        self._archive = archive
        self.now = now
        self.progress = progress
        self.host = host or socket.gethostname().split(".")[0]
        self.hold_tag = target_tag(target_name)
        self._states: dict[str, DatasetState] = {}
        self._keys: dict[str, str] = {}
        self._archive_id = ""
        self._sequence = 0

    @property
    def archive(self) -> Archive:
        if self._archive is None:
            self._archive = open_archive(self.target)
        return self._archive

    def run(self, *, dry_run: bool = False, prune: bool = True) -> TargetReport:
        report = TargetReport(self.group.name, self.target_name, "push", dry_run, max_lag=self.target.max_lag)
        try:
            self._run(report, dry_run, prune)
        except SnapsyncError as e:
            report.errors.append(str(e))
        return report

    def _run(self, report: TargetReport, dry_run: bool, prune: bool) -> None:
        archive = self.archive
        archive.store.check()
        sources = {ds: source_snaps(self.group.prefix, self.backend.list_snapshots(ds)) for ds in self.group.datasets}
        survey = archive.survey(self.group.name)
        archive.trust([survey])
        report.reached = True
        states = survey.datasets
        self._same_host(survey)
        report.notes += survey.problems
        findings = archive.findings(survey)
        report.notes += findings.notes
        for problem in findings.hidden:
            log.warning("%s -> %s: %s", self.group.name, self.target_name, problem,
                        extra={"event": "offsite-rollback", "group": self.group.name, "target": self.target_name})
            report.errors.append(problem if dry_run else f"{problem}; uploading again what the source still has")
        keys = {ds: dataset_key(ds) for ds in self.group.datasets}
        self._states, self._keys = states, keys
        self._start_head(survey)
        if not dry_run:
            stale = archive.store.clean_incomplete(f"{self.group.name}/")
            if stale:
                report.notes.append(f"removed {stale} unfinished object upload(s) left by an interrupted run")
            if survey.head is None:
                self._write_head()  # before any upload: from now on a missing head is never innocent
        for ds in self.group.datasets:
            state = states.setdefault(keys[ds], DatasetState())
            try:
                self._dataset(ds, keys[ds], sources[ds], state, report, dry_run)
            except SnapsyncError as e:
                report.errors.append(f"{ds}: {e}")
        self._drop_future(report, sources, states, keys, dry_run)
        self._lag(report, sources, states, keys)
        if prune and self.target.retention is not None and not report.errors:
            self._prune(report, states, keys, dry_run)
        report.have = {
            ds: [m.snapshot for m in sorted(states[keys[ds]].stored.values(), key=lambda m: (m.created, m.snapshot))]
            for ds in self.group.datasets
        }

    def _start_head(self, survey: Survey) -> None:
        """Which archive this is and the number the next head gets: above every one seen anywhere."""
        sequenced = [m for m in survey.manifests() if m.sequence is not None and m.archive]
        if survey.head is not None:
            self._archive_id = survey.head.archive
        elif sequenced:
            self._archive_id = str(max(sequenced, key=lambda m: m.sequence or 0).archive)
        else:
            self._archive_id = os.urandom(8).hex()
        mine = self.archive.remembered(self.group.name).get(self._archive_id)
        self._sequence = max([
            0, *(m.sequence or 0 for m in sequenced),
            *([survey.head.sequence] if survey.head is not None else []),
            *([mine.sequence] if mine is not None else []),
        ])

    def _write_head(self) -> None:
        """The group's newest upload per dataset, under the next number."""
        newest = {}
        for ds in self.group.datasets:
            stored = self._states.get(self._keys[ds], DatasetState()).stored
            if stored:
                m = max(stored.values(), key=lambda m: (m.created, m.snapshot))
                newest[self._keys[ds]] = Newest(m.snapshot, m.guid)
        self._sequence += 1
        self.archive.write_head(
            Head(self.group.name, self._archive_id, self._sequence, self.host, self.now().astimezone(UTC), newest)
        )

    def _same_host(self, survey: Survey) -> None:
        """Two hosts uploading one group to one place would prune each other's chains: refuse."""
        found = [(m.host, self.archive.name(m.directory())) for state in survey.datasets.values()
                 for m in [*state.stored.values(), *state.partial.values()]]
        if survey.head is not None:
            found.append((survey.head.host, self.archive.name(f"{self.group.name}/{HEAD}")))
        for host, where in found:
            if host and host != self.host:
                raise StoreError(
                    f"{where}: uploaded by host {host!r}, this is {self.host!r}; "
                    f"give each host its own prefix (or path), or set host = {host!r} in the policy if "
                    f"this host took its place"
                )

    def _dataset(
        self, ds: str, key: str, source: list[SnapshotId], state: DatasetState, report: TargetReport, dry_run: bool
    ) -> None:
        plan = plan_uploads(
            source,
            [m.stored() for m in state.stored.values()],
            [m.partial() for m in state.partial.values()],
            self.target.full_every,
            self.now(),
            (self.target.retention or self.group.retention).timezone,
            self.target.chains == "levelled",
        )
        report.notes += [f"{ds}: {n}" for n in plan.notes]
        for name in plan.discard:
            report.planned.append(f"{ds}: delete the unfinished upload of {name}")
        for name in state.debris:
            report.planned.append(f"{ds}: delete leftovers of {name}")
        for up in plan.uploads:
            kind = "full" if up.full else f"incremental {up.parent} ->"
            resumed = f" (continuing after chunk {up.resume_from})" if up.resume_from else ""
            report.planned.append(f"{ds}: upload {kind} {up.name}{resumed}")
        report.pending += len(plan.uploads)
        if dry_run:
            return
        for name in plan.discard:
            self._delete_snapshot(state, key, name)
            state.partial.pop(name, None)
            report.removed_partials.append(f"{ds}: {name}")
        for name in list(state.debris):
            self._delete_snapshot(state, key, name)
            del state.debris[name]
        if plan.bases and not plan.uploads:
            self.backend.set_holds(ds, self.hold_tag, list(plan.bases))
        by_name = {s.name: s for s in source}
        held = list(plan.bases)
        for up in plan.uploads:
            parent = by_name.get(up.parent) if up.parent else None
            self.backend.set_holds(ds, self.hold_tag, list(dict.fromkeys([*held, *(n for n in (up.parent, up.name) if n)])))
            manifest = self._upload(ds, key, up, state, parent.guid if parent else None, report)
            state.stored[up.name] = manifest
            state.partial.pop(up.name, None)
            state.objects[up.name] = {MANIFEST: 0} | {CHUNK.format(i): c.size for i, c in enumerate(manifest.chunks)}
            self._write_head()
            held = list(up.bases)
            self.backend.set_holds(ds, self.hold_tag, held)
            report.pending -= 1

    def _fresh(self, ds: str, key: str, up: Upload, parent_guid: str | None) -> Manifest:
        return Manifest(
            group=self.group.name, dataset=key, source=ds, host=self.host, snapshot=up.name, created=up.created,
            guid=up.guid, parent=up.parent, parent_guid=parent_guid, backend=self.group.backend,
            compression=self.target.compress, cipher=CIPHER, chunk_size=self.target.chunk_size, chunks=(),
            complete=False,
        )

    def _upload(
        self, ds: str, key: str, up: Upload, state: DatasetState, parent_guid: str | None, report: TargetReport
    ) -> Manifest:
        progress = state.partial.get(up.name) if up.resume_from else None
        files = state.objects.get(up.name, {})
        if progress is not None and (
            progress.chunk_size != self.target.chunk_size
            or progress.compression != self.target.compress
            or any(files.get(CHUNK.format(i)) != c.size for i, c in enumerate(progress.chunks))
        ):
            progress = None  # settings changed, or a recorded chunk is not in the store as recorded
        if progress is None:
            if up.name in state.objects:
                self._delete_snapshot(state, key, up.name)
            progress = self._fresh(ds, key, up, parent_guid)
        try:
            return self._send(ds, up, progress, report)
        except StreamChanged as e:
            report.notes.append(f"{ds}: {up.name}: cannot continue the unfinished upload ({e}); starting it again")
            self._delete_snapshot(state, key, up.name)
            return self._send(ds, up, self._fresh(ds, key, up, parent_guid), report)

    def _send(self, ds: str, up: Upload, manifest: Manifest, report: TargetReport) -> Manifest:
        archive = self.archive
        tick = None
        if self.progress is not None:
            label = f"{self.target_name}: {os.path.basename(ds.rstrip('/')) or '/'} {up.name.rpartition('_')[2]}"
            tick = self.progress(label, self.backend.estimate(ds, up.name, up.parent))
        meter = Meter(tick=tick, rate_limit=self.target.rate_limit)
        done = len(manifest.chunks)
        proc = Proc.start(self.backend.send_argv(ds, up.name, up.parent), stdout=-1, label=f"{self.backend.kind} send")
        with reaped(proc):
            assert proc.popen.stdout is not None
            widen(proc.popen.stdout.fileno())
            source = RawSource(cast(io.RawIOBase, io.FileIO(proc.popen.stdout.fileno(), closefd=False)), meter)
            for stored in manifest.chunks:
                source.skip(stored)
            while True:
                record = store_chunk(source, archive.store, archive.key, manifest, len(manifest.chunks), self.target.compress_level)
                if record is None:
                    break
                manifest = replace(manifest, chunks=(*manifest.chunks, record))
                archive.write(manifest)
            finish([proc])
        if source.bytes != manifest.raw_bytes:
            raise BackendError(f"{ds}: {up.name}: read {source.bytes} bytes from send, the chunks hold {manifest.raw_bytes}")
        final = replace(
            manifest, complete=True, uploaded=self.now(), sequence=self._sequence + 1, archive=self._archive_id
        )
        archive.write(final)
        archive.store.delete([manifest.directory() + PROGRESS])
        if tick is not None:
            tick(meter.bytes)
        report.sent.append(Sent(ds, up.name, up.parent, meter.bytes, meter.seconds))  # skipped chunks are not metered
        if done:
            report.notes.append(f"{ds}: {up.name}: continued the unfinished upload after {done} stored chunk(s)")
        log.info(
            "%s -> %s: %s %s uploaded (%s, %d raw bytes as %d stored, %d chunk(s)%s)",
            self.group.name, self.target_name, ds, up.name, "full" if up.full else f"incremental from {up.parent}",
            final.raw_bytes, final.stored_bytes, len(final.chunks), f", {done} kept from before" if done else "",
            extra={"event": "uploaded", "group": self.group.name, "target": self.target_name, "dataset": ds,
                   "snapshot": up.name, "base": up.parent, "bytes": final.raw_bytes, "stored_bytes": final.stored_bytes,
                   "chunks": len(final.chunks), "seconds": round(meter.seconds, 3)},
        )
        return final

    def _delete_snapshot(self, state: DatasetState, key: str, name: str) -> None:
        """The manifest first (the snapshot stops counting), then progress, then the chunks."""
        files = state.objects.pop(name, {})
        where = snapshot_dir(self.group.name, key, name)
        first = [where + f for f in (MANIFEST, PROGRESS) if f in files]
        if first:
            self.archive.store.delete(first)
        rest = [where + f for f in files if f not in (MANIFEST, PROGRESS)]
        if rest:
            self.archive.store.delete(rest)

    def _drop_future(
        self, report: TargetReport, sources: dict[str, list[SnapshotId]], states: dict[str, DatasetState],
        keys: dict[str, str], dry_run: bool,
    ) -> None:
        """Delete uploads dated after the clock whose original the source still has and nothing builds on.

        They were uploaded while the clock was ahead; kept, they would stop the store's pruning until
        that date. The source's original stays (``snapsync prune --future`` is the way to drop it).
        """
        now = self.now()
        for ds in self.group.datasets:
            state = states.get(keys[ds])
            if state is None:
                continue
            originals = {s.name: s.guid for s in sources[ds]}
            parents = {m.stored().parent for m in state.stored.values()}
            doomed = [
                m.snapshot for m in state.stored.values()
                if m.created > now and originals.get(m.snapshot) == m.guid and m.snapshot not in parents
            ]
            for name in sorted(doomed):
                report.planned.append(f"{ds}: delete the upload of {name}, dated after this host's clock (the source keeps it)")
                if dry_run:
                    continue
                self._delete_snapshot(state, keys[ds], name)
                state.stored.pop(name, None)
                report.notes.append(f"{ds}: deleted the upload of {name} (dated after this host's clock)")

    def _lag(
        self,
        report: TargetReport,
        sources: dict[str, list[SnapshotId]],
        states: dict[str, DatasetState],
        keys: dict[str, str],
    ) -> None:
        now = self.now()
        past = {ds: [s for s in snaps if s.created <= now] for ds, snaps in sources.items()}
        newest = [s[-1] for s in past.values() if s]
        if not newest:
            return
        top = max(newest, key=lambda s: (s.created, s.name))
        report.newest_source = top.name
        commons = []
        for ds in self.group.datasets:
            guids = {s.name: s.guid for s in sources[ds]}
            stored = [m for m in states[keys[ds]].stored.values() if guids.get(m.snapshot) == m.guid]
            if not stored:
                report.notes.append(f"{ds}: nothing uploaded to {self.target_name} yet")
                return
            commons.append(max(stored, key=lambda m: (m.created, m.snapshot)))
        oldest = min(commons, key=lambda m: (m.created, m.snapshot))
        report.newest_common = oldest.snapshot
        report.newest_common_time = oldest.created
        report.lag = top.created - oldest.created
        if report.lagging:
            report.notes.append(f"{self.target_name} lags behind the source by more than max_lag")

    def _prune(
        self, report: TargetReport, states: dict[str, DatasetState], keys: dict[str, str], dry_run: bool
    ) -> None:
        assert self.target.retention is not None
        by_key = {keys[ds]: ds for ds in self.group.datasets}
        plan: StorePrunePlan = plan_store_prune(
            {k: [m.stored() for m in states[k].stored.values()] for k in by_key},
            self.target.retention,
            self.now(),
        )
        report.prune = plan.plan
        for k, names in plan.broken.items():
            report.notes.append(f"{by_key[k]}: incomplete chain(s) in the store, cannot be restored: {', '.join(names)}")
        if plan.plan.future:
            raise BackendError(
                "uploads dated after this host's clock (" + ", ".join(d.name for d in plan.plan.future) + "); not pruning"
            )
        if dry_run:
            return
        for k, names in plan.delete.items():
            for name in names:
                self._delete_snapshot(states[k], k, name)
                states[k].stored.pop(name, None)
                report.pruned.append(f"{by_key[k]}: {name}")
