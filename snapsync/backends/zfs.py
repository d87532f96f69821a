"""ZFS backend: snapshots, holds and bookmarks of datasets, through libzfs_core where it has the call.

libzfs_core (Debian's python3-pyzfs) does snapshot, hold, release, bookmark and destroy in-process,
which matters where each ``zfs`` command costs seconds (an emulated guest) and because
``lzc_snapshot`` of many datasets is one ioctl, one txg. It cannot list or read properties, so
listing always uses ``zfs list -H -p``. Without pyzfs (or with ``SNAPSYNC_ZFS_LZC=0``) the same
operations go through the ``zfs`` command; both paths are tested in the guest.

Hold tags of ours are stored as ``snapsync:<tag>`` so they never collide with another tool's; a
foreign hold is reported as ``zfs:<tag>`` and pins the snapshot, but snapsync never releases it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from snapsync.backends import FILESYSTEMS
from snapsync.backends.base import Adoption, Capabilities, Scratch, SnapshotInfo, SnapshotSizes
from snapsync.backends.usage import Holder, holders, mounts
from snapsync.errors import BackendError, CommandFailed, DatasetMissing, UsageError

if TYPE_CHECKING:
    from snapsync.backends.receiver import Receiver

HOLD_PREFIX = "snapsync:"
FOREIGN_PREFIX = "zfs:"
ZFS_TIMEOUT = 600.0
LIST_FIELDS = "name,guid,createtxg,creation,userrefs"
_FORBIDDEN = set("@#/,%\0\n\t")


def check_snapshot_name(name: str) -> None:
    """A snapshot name must be one ZFS component; ``,`` would split a batched destroy."""
    if not name or set(name) & _FORBIDDEN or len(name) > 200:
        raise BackendError(f"refusing snapshot name {name!r}: not a plain ZFS snapshot name")


def pool_of(dataset: str) -> str:
    return dataset.split("/", 1)[0]


def zfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one ``zfs`` command (argv, never a shell); CommandFailed carries its stderr."""
    argv = ["zfs", *args]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=ZFS_TIMEOUT)
    except FileNotFoundError as e:
        raise BackendError("the zfs command is not installed (zfsutils-linux)") from e
    except subprocess.TimeoutExpired as e:
        raise BackendError(f"{' '.join(argv[:3])}: no answer within {ZFS_TIMEOUT:g}s") from e
    if check and result.returncode != 0:
        raise CommandFailed(argv, result.returncode, result.stderr)
    return result


def _missing(stderr: str) -> bool:
    return "does not exist" in stderr


def _lzc() -> Any:
    """libzfs_core, or None when pyzfs is missing or switched off with SNAPSYNC_ZFS_LZC=0."""
    if os.environ.get("SNAPSYNC_ZFS_LZC", "1") == "0":
        return None
    try:
        import libzfs_core  # type: ignore[import-not-found]
        import libzfs_core.exceptions  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return None
    return libzfs_core


def _lzc_failure(error: Exception) -> tuple[set[str], str]:
    """The kinds (exception class names) and a message of a libzfs_core failure; a batch
    operation raises one exception carrying each dataset's own error in ``errors``."""
    parts = list(getattr(error, "errors", None) or [error])
    return {type(p).__name__ for p in parts}, "; ".join(f"{type(p).__name__}: {p}" for p in parts)


def parse_listing(text: str) -> list[SnapshotInfo]:
    """Rows of ``zfs list -H -p -o name,guid,createtxg,creation,userrefs`` as SnapshotInfo (no holds)."""
    infos = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) != 5:
            continue
        full, guid, txg, creation, _ = fields
        bookmark = "#" in full
        dataset, _, name = full.partition("#" if bookmark else "@")
        infos.append(
            SnapshotInfo(
                dataset=dataset,
                name=name,
                created=datetime.fromtimestamp(int(creation), UTC),
                guid=guid,
                location=full,
                txg=int(txg),
                kind="bookmark" if bookmark else "snapshot",
            )
        )
    return infos


class ZfsBackend:
    kind: ClassVar[str] = "zfs"
    capabilities: ClassVar[Capabilities] = FILESYSTEMS["zfs"].capabilities

    def __init__(self, *, raw: bool = False, compressed: bool = True, use_lzc: bool | None = None) -> None:
        self.raw = raw
        self.compressed = compressed
        self.lzc = _lzc() if use_lzc in (None, True) else None
        self._encrypted: dict[str, bool] = {}

    def snapshot_home(self, dataset: str) -> str:
        return dataset

    def check_dataset(self, dataset: str) -> None:
        self.check_datasets([dataset])

    def check_datasets(self, datasets: Sequence[str]) -> None:
        """One ``zfs list`` for all of them; DatasetMissing names the first that is absent."""
        for dataset in datasets:
            if not dataset or set(dataset) & (_FORBIDDEN - {"/"}) or dataset.startswith("/"):
                raise DatasetMissing(f"{dataset}: not a ZFS dataset name")
        result = zfs("list", "-H", "-p", "-o", "name,type", *datasets, check=False)
        types = dict(line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line)
        for dataset in datasets:
            if dataset not in types:
                if _missing(result.stderr) or not result.stderr:
                    raise DatasetMissing(f"{dataset}: does not exist")
                raise DatasetMissing(f"{dataset}: {result.stderr.strip()}")
            if types[dataset] not in ("filesystem", "volume"):
                raise DatasetMissing(f"{dataset}: is a {types[dataset]}, not a filesystem or volume")

    def list_snapshots(self, dataset: str) -> list[SnapshotInfo]:
        result = zfs("list", "-H", "-p", "-t", "snapshot,bookmark", "-o", LIST_FIELDS, "-d", "1", dataset, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                return []
            raise BackendError(f"{dataset}: cannot list snapshots: {result.stderr.strip()}")
        infos = parse_listing(result.stdout)
        held_rows = [line.split("\t")[0] for line in result.stdout.splitlines() if line.split("\t")[-1] not in ("0", "-")]
        holds = self._holds(held_rows)
        infos = [replace(s, holds=tuple(sorted(holds[s.location]))) if s.location in holds else s for s in infos]
        infos.sort(key=lambda s: (s.created, s.name, s.kind))
        return infos

    def snapshot_sizes(self, dataset: str) -> SnapshotSizes:
        result = zfs("list", "-H", "-p", "-t", "snapshot", "-o", "name,used,written,referenced", "-d", "1", dataset, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                return SnapshotSizes({})
            raise BackendError(f"{dataset}: cannot read snapshot sizes: {result.stderr.strip()}")
        sizes: dict[str, dict[str, int]] = {}
        for line in result.stdout.splitlines():
            fields = line.split("\t")
            if len(fields) == 4 and "@" in fields[0] and all(f.isdigit() for f in fields[1:]):
                sizes[fields[0].split("@", 1)[1]] = dict(zip(("used", "written", "referenced"), map(int, fields[1:]), strict=True))
        return SnapshotSizes(sizes)

    def _holds(self, snapshots: Sequence[str]) -> dict[str, list[str]]:
        """Hold tags per full snapshot name, ours without their prefix, foreign ones marked."""
        raw: dict[str, list[str]] = {}
        if not snapshots:
            return raw
        if self.lzc is not None:
            for snap in snapshots:
                raw[snap] = [t.decode() for t in self.lzc.lzc_get_holds(snap.encode())]
        else:
            for line in zfs("holds", "-H", *snapshots).stdout.splitlines():
                fields = line.split("\t")
                if len(fields) >= 2:
                    raw.setdefault(fields[0], []).append(fields[1])
        return {s: [t[len(HOLD_PREFIX):] if t.startswith(HOLD_PREFIX) else FOREIGN_PREFIX + t for t in tags]
                for s, tags in raw.items()}

    def _describe(self, fulls: Sequence[str]) -> list[SnapshotInfo]:
        result = zfs("list", "-H", "-p", "-t", "snapshot", "-o", LIST_FIELDS, *fulls)
        by_name = {s.location: s for s in parse_listing(result.stdout)}
        return [by_name[f] for f in fulls]

    def snapshot_group(self, datasets: Sequence[str], name: str) -> list[SnapshotInfo]:
        """One atomic snapshot per pool (ZFS cannot snapshot across pools in one txg)."""
        check_snapshot_name(name)
        self.check_datasets(datasets)
        by_pool: dict[str, list[str]] = {}
        for dataset in datasets:
            by_pool.setdefault(pool_of(dataset), []).append(f"{dataset}@{name}")
        existing = zfs("list", "-H", "-o", "name", "-t", "snapshot", *(f for fs in by_pool.values() for f in fs), check=False)
        if existing.stdout.strip():
            taken = ", ".join(existing.stdout.splitlines()[:3])
            raise BackendError(f"snapshot {name} already exists ({taken})")
        created: list[str] = []
        try:
            for fulls in by_pool.values():
                self._snapshot(fulls)
                created += fulls
        except BaseException:
            if created:
                self._destroy_fulls(created)
            raise
        return self._describe([f"{d}@{name}" for d in datasets])

    def _snapshot(self, fulls: Sequence[str]) -> None:
        if self.lzc is not None:
            try:
                self.lzc.lzc_snapshot([f.encode() for f in fulls])
            except self.lzc.exceptions.ZFSError as e:
                kinds, details = _lzc_failure(e)
                if "SnapshotExists" in kinds:
                    raise BackendError(f"snapshot already exists: {details}") from e
                raise BackendError(f"snapshot {', '.join(fulls)} failed: {details}") from e
            return
        try:
            zfs("snapshot", *fulls)
        except CommandFailed as e:
            if "already exists" in e.stderr:
                raise BackendError(f"snapshot already exists: {e.stderr.strip()}") from e
            raise

    def _destroy_fulls(self, fulls: Sequence[str]) -> None:
        if not fulls:
            return
        if self.lzc is not None:
            try:
                self.lzc.lzc_destroy_snaps([f.encode() for f in fulls], False)
            except self.lzc.exceptions.ZFSError as e:
                raise BackendError(f"destroy of {', '.join(fulls)} failed: {_lzc_failure(e)[1]}") from e
            return
        by_dataset: dict[str, list[str]] = {}
        for full in fulls:
            dataset, _, name = full.partition("@")
            by_dataset.setdefault(dataset, []).append(name)
        for dataset, names in by_dataset.items():
            zfs("destroy", f"{dataset}@{','.join(names)}")

    def exists(self, dataset: str) -> bool:
        return zfs("list", "-H", "-o", "name", dataset, check=False).returncode == 0

    def rollback(self, dataset: str, name: str, aside: str) -> None:
        """Clone ``name``, promote the clone, and swap it in by renames; nothing is destroyed.

        After the promotion the clone owns every snapshot up to ``name`` and the old dataset (now at
        ``aside``, unmounted, ``canmount=noauto``) keeps the newer ones, holds included. A local
        ``mountpoint`` moves to the new dataset. A call after a stop at any step finishes, and one
        after the swap only makes sure the new dataset is mounted as the old one was.
        """
        check_snapshot_name(name)
        parent, _, leaf = dataset.rpartition("/")
        if not parent:
            raise BackendError(f"{dataset}: a pool's root dataset cannot be swapped; roll back a child dataset")
        if aside.rpartition("/")[0] != parent:
            raise BackendError(f"{aside}: must be beside {dataset}")
        fresh = f"{parent}/{leaf}.rollback-new"
        if not self.exists(dataset):
            if self.exists(fresh) and self.exists(aside):
                self._swap_in(fresh, dataset, aside)
                return
            raise DatasetMissing(f"{dataset}: does not exist")
        if self.exists(aside):
            if self._origin(aside) == f"{dataset}@{name}":  # swapped before a stop: only settling is left
                self._settle(dataset, aside)
                return
            raise BackendError(f"{aside} already exists; not renaming {dataset} over it")
        self._refuse_swap(dataset)
        if self.exists(fresh):
            if self._origin(dataset) == f"{fresh}@{name}":
                self._swap_in(fresh, dataset, aside)  # promoted before a crash: only the swap is left
                return
            if self._origin(fresh) != f"{dataset}@{name}":
                raise BackendError(f"{fresh} exists and is not snapsync's clone of {dataset}@{name}; look at it and rename it away")
            zfs("destroy", fresh)  # our clone from an attempt that died before promoting: nothing of value
        zfs("clone", "-o", "canmount=noauto", f"{dataset}@{name}", fresh)
        self._rollback_step(f"clone made {leaf}")
        zfs("promote", fresh)
        self._rollback_step(f"promoted {leaf}")
        self._swap_in(fresh, dataset, aside)

    @staticmethod
    def _refuse_swap(dataset: str) -> None:
        """What makes ``dataset`` impossible to swap by renames: children (they would move aside too),
        a legacy mount (outside ZFS's control)."""
        children = zfs("list", "-H", "-o", "name", "-r", "-d", "1", dataset).stdout.split()[1:]
        if children:
            raise BackendError(
                f"{dataset} has child datasets ({', '.join(children[:3])}); a rollback would move them aside too: "
                f"roll back datasets without children (list the children in the group instead)"
            )
        mountpoint, mounted = zfs("get", "-H", "-o", "value", "mountpoint,mounted", dataset).stdout.split()
        if mountpoint == "legacy" and mounted == "yes":
            raise BackendError(
                f"{dataset} is mounted with mountpoint=legacy (outside ZFS's control): unmount it, run the "
                f"rollback again, and mount it again afterwards"
            )

    def check_rollback(self, dataset: str, name: str, aside: str) -> None:
        """Everything ``rollback`` would refuse, checked without changing anything."""
        check_snapshot_name(name)
        parent = dataset.rpartition("/")[0]
        if not parent:
            raise BackendError(f"{dataset}: a pool's root dataset cannot be swapped; roll back a child dataset")
        if aside.rpartition("/")[0] != parent:
            raise BackendError(f"{aside}: must be beside {dataset}")
        if not self.exists(dataset):
            raise DatasetMissing(f"{dataset}: does not exist")
        fresh = f"{parent}/{dataset.rpartition('/')[2]}.rollback-new"
        promoted = self.exists(fresh) and self._origin(dataset) == f"{fresh}@{name}"  # a stopped attempt's clone owns it now
        if not promoted and not self.exists(f"{dataset}@{name}"):
            raise BackendError(f"{dataset}: no snapshot {name}")
        if self.exists(aside):
            raise BackendError(f"{aside} already exists; not renaming {dataset} over it")
        self._refuse_swap(dataset)

    def delete_aside(self, dataset: str, aside: str) -> None:
        """The old dataset, with the newer snapshots that went aside with it, destroyed; refused when
        it is not a rollback's aside of ``dataset`` or still holds a held snapshot (ZFS refuses those)."""
        parent, _, leaf = dataset.rpartition("/")
        if aside.rpartition("/")[0] != parent or not aside.rpartition("/")[2].startswith(f"{leaf}.pre-rollback."):
            raise BackendError(f"{aside}: not a state a rollback of {dataset} moved aside")
        held = [s.name for s in self.list_snapshots(aside) if s.kind == "snapshot" and s.holds]
        if held:
            raise BackendError(f"{aside}: {', '.join(held)} still held; release them first")
        result = zfs("destroy", "-r", aside, check=False)
        if result.returncode != 0:
            raise BackendError(f"{aside}: cannot be destroyed: {result.stderr.strip()}")

    @staticmethod
    def _rollback_step(step: str) -> None:
        """A step of a rollback or of its undo is done: logged, and SIGKILLed here when
        ``$SNAPSYNC_TEST_KILL_AT`` names it, which only tests set (see recovery.rollback.reached)."""
        import logging
        import signal

        logging.getLogger("snapsync.recovery.rollback").info("rollback step: %s", step)
        if os.environ.get("SNAPSYNC_TEST_KILL_AT") == step:
            os.kill(os.getpid(), signal.SIGKILL)

    @staticmethod
    def _origin(dataset: str) -> str:
        """The snapshot ``dataset`` is a clone of (``-`` for none), by its current name."""
        return zfs("get", "-H", "-o", "value", "origin", dataset).stdout.strip()

    @staticmethod
    def _local(dataset: str, prop: str) -> str | None:
        """A property's value when it is set on ``dataset`` itself, else None."""
        value, _, source = zfs("get", "-H", "-o", "value,source", prop, dataset).stdout.rstrip("\n").partition("\t")
        return value if source == "local" else None

    def _swap_in(self, fresh: str, dataset: str, aside: str) -> None:
        leaf = dataset.rpartition("/")[2]
        if self.exists(dataset):
            if self._local(dataset, "snapsync:rollback-canmount") is None:  # not yet saved by a stopped attempt
                value = self._local(dataset, "mountpoint")
                canmount = zfs("get", "-H", "-o", "value", "canmount", dataset).stdout.strip()
                zfs("set", f"snapsync:rollback-mountpoint={value if value is not None else '-'}", dataset)
                zfs("set", f"snapsync:rollback-canmount={canmount}", dataset)
            if zfs("get", "-H", "-o", "value", "mounted", dataset).stdout.strip() == "yes":
                zfs("unmount", dataset)
            zfs("set", "canmount=noauto", dataset)
            self._rollback_step(f"unmounted {leaf}")
            zfs("rename", "-u", dataset, aside)
            self._rollback_step(f"moved aside {leaf}")
        zfs("rename", "-u", fresh, dataset)
        self._rollback_step(f"renamed in {leaf}")
        self._settle(dataset, aside)

    def _settle(self, dataset: str, aside: str) -> None:
        """The swapped-in dataset takes the old one's local ``mountpoint`` and ``canmount`` and is mounted
        as it was; the old one keeps no mountpoint. Each step checks first, so a repeat changes nothing."""
        saved = {
            key: zfs("get", "-H", "-o", "value", f"snapsync:rollback-{key}", aside).stdout.strip()
            for key in ("mountpoint", "canmount")
        }
        if saved["mountpoint"] not in ("-", ""):
            if self._local(dataset, "mountpoint") != saved["mountpoint"]:
                zfs("set", f"mountpoint={saved['mountpoint']}", dataset)
            if self._local(aside, "mountpoint") != "none":
                zfs("set", "mountpoint=none", aside)
        canmount = saved["canmount"] if saved["canmount"] in ("on", "off", "noauto") else "on"
        zfs("set", f"canmount={canmount}", dataset)
        if canmount == "on" and zfs("get", "-H", "-o", "value", "mounted", dataset).stdout.strip() != "yes":
            zfs("mount", dataset)

    def undo_rollback(self, dataset: str, name: str, aside: str, kept: str, *, dry_run: bool = False) -> list[str]:
        """Put ``dataset`` back as it was before an interrupted ``rollback(dataset, name, aside)``;
        returns what it did (or, with ``dry_run``, would do).

        The old dataset returns to its name and is promoted again (it owns all its snapshots), with its
        own ``mountpoint`` and ``canmount``, mounted as before. The prepared clone, never mounted, is
        destroyed; a clone already swapped in was live and may hold new writes, so it goes to ``kept``
        (unmounted, ``canmount=noauto``, ``mountpoint=none``) and stays. Every state is checked before the first change;
        a call after a stop at any step (or a rollback) continues.
        """
        check_snapshot_name(name)
        parent, _, leaf = dataset.rpartition("/")
        if not parent or aside.rpartition("/")[0] != parent or kept.rpartition("/")[0] != parent:
            raise BackendError(f"{aside} and {kept}: must be beside {dataset}")
        fresh = f"{parent}/{leaf}.rollback-new"
        live, moved, prepared = self.exists(dataset), self.exists(aside), self.exists(fresh)
        old = aside if moved else dataset
        if live and moved:
            if self._origin(aside) != f"{dataset}@{name}":
                raise BackendError(
                    f"{dataset} is not the clone the rollback put in place and {aside} exists: look at both, keep the "
                    f"one you want at {dataset} and rename the other away"
                )
            if self.exists(kept):
                raise BackendError(f"{kept} already exists; rename it away")
        elif not live and not moved:
            raise BackendError(f"{dataset} and {aside} are both missing: there is nothing to put back")
        if prepared and f"{fresh}@{name}" != self._origin(old) and self._origin(fresh) != f"{dataset}@{name}":
            raise BackendError(f"{fresh} exists and is not snapsync's clone of {dataset}@{name}; look at it and rename it away")
        done = []
        if live and moved:
            done.append(f"{dataset}: moved the clone put in place (it may have been used) to {kept}")
            if not dry_run:
                if zfs("get", "-H", "-o", "value", "mounted", dataset).stdout.strip() == "yes":
                    zfs("unmount", dataset)
                zfs("set", "canmount=noauto", dataset)
                zfs("rename", "-u", dataset, kept)
                self._rollback_step(f"rolled-back state moved away {leaf}")
        if moved:
            done.append(f"{dataset}: put back from {aside}")
            if not dry_run:
                zfs("rename", "-u", aside, dataset)
                self._rollback_step(f"put back {leaf}")
        where = old if dry_run else dataset  # the old dataset, after the renames above
        origin = f"{kept}@{name}" if dry_run and live and moved else self._origin(where)
        if origin in (f"{fresh}@{name}", f"{kept}@{name}"):
            done.append(f"{dataset}: promoted again (it owns its snapshots up to {name} again)")
            if not dry_run:
                zfs("promote", dataset)
                self._rollback_step(f"promoted back {leaf}")
        if not dry_run and self.exists(kept) and zfs("get", "-H", "-o", "value", "mountpoint", kept).stdout.strip() != "none":
            zfs("set", "mountpoint=none", kept)  # never mounted over the dataset it was, nor anywhere by itself
        if prepared:
            done.append(f"{dataset}: destroyed the prepared clone {fresh} (never mounted)")
            if not dry_run:
                zfs("destroy", fresh)
        if self._local(where, "snapsync:rollback-canmount") is not None:
            done.append(f"{dataset}: its own mountpoint and canmount back, mounted as before")
            if not dry_run:
                self._unsettle(dataset)
        return done or [f"{dataset}: as it was"]

    def _unsettle(self, dataset: str) -> None:
        """The properties the swap saved on the old dataset, applied to it again; the saved copies go last."""
        saved = {
            key: zfs("get", "-H", "-o", "value", f"snapsync:rollback-{key}", dataset).stdout.strip()
            for key in ("mountpoint", "canmount")
        }
        if saved["mountpoint"] not in ("-", ""):
            if self._local(dataset, "mountpoint") != saved["mountpoint"]:
                zfs("set", f"mountpoint={saved['mountpoint']}", dataset)
        elif self._local(dataset, "mountpoint") is not None:
            zfs("inherit", "mountpoint", dataset)
        canmount = saved["canmount"] if saved["canmount"] in ("on", "off", "noauto") else "on"
        zfs("set", f"canmount={canmount}", dataset)
        if canmount == "on" and zfs("get", "-H", "-o", "value", "mounted", dataset).stdout.strip() != "yes":
            zfs("mount", dataset)
        zfs("inherit", "snapsync:rollback-mountpoint", dataset)
        zfs("inherit", "snapsync:rollback-canmount", dataset)

    def destroy(self, dataset: str, names: Sequence[str]) -> None:
        """Batched destroy of the existing snapshots that are not held; then one error naming each held one.

        A batch fails whole when one of it cannot go (a hold or a clone that appeared since the
        listing): then each is destroyed alone, so one refusal never keeps the others.
        """
        for name in names:
            check_snapshot_name(name)
        present = {s.name: s for s in self.list_snapshots(dataset) if s.kind == "snapshot"}
        doomed = [n for n in dict.fromkeys(names) if n in present]
        left = [
            f"refusing to destroy {dataset}@{n}: held by {', '.join(present[n].holds)} (still needed by its holder)"
            for n in doomed if present[n].holds
        ]
        free = [f"{dataset}@{n}" for n in doomed if not present[n].holds]
        try:
            self._destroy_fulls(free)
        except BackendError:
            for full in free:
                try:
                    self._destroy_fulls([full])
                except BackendError as e:
                    left.append(str(e) if full in str(e) else f"{full}: {e}")
        if left:
            raise BackendError("; ".join(left))

    def set_holds(self, dataset: str, tag: str, names: Sequence[str]) -> None:
        """``tag`` now holds exactly ``names``; each held snapshot also gets a bookmark of its name.

        The bookmark outlives the snapshot, so if the hold is ever released (the target removed from
        the group) and the snapshot pruned, the same target can still resume incrementally. When the
        hold moves forward, the bookmark of the snapshot it leaves is removed; releasing a tag
        entirely keeps its bookmarks.
        """
        for name in names:
            check_snapshot_name(name)
        listing = self.list_snapshots(dataset)
        snaps = {s.name: s for s in listing if s.kind == "snapshot"}
        bookmarks = {s.name for s in listing if s.kind == "bookmark"}
        current = {n for n, s in snaps.items() if tag in s.holds}
        wanted = set(names)
        missing = wanted - set(snaps)
        if missing:
            raise BackendError(f"{dataset}: cannot hold {', '.join(sorted(missing))}: no such snapshot")
        zfs_tag = HOLD_PREFIX + tag
        add = sorted(wanted - current)
        drop = sorted(current - wanted)
        for name in add:
            if name not in bookmarks:
                self._bookmark(dataset, name)
        self._hold([f"{dataset}@{n}" for n in add], zfs_tag)
        self._release([f"{dataset}@{n}" for n in drop], zfs_tag)
        if wanted:
            others = {n for n, s in snaps.items() for t in s.holds if t != tag}
            self._destroy_bookmarks(dataset, [n for n in drop if n in bookmarks and n not in others])

    def lost_holds(self, dataset: str) -> dict[str, list[str]]:
        """Always empty: a held snapshot cannot be destroyed, and a released one leaves its bookmark."""
        return {}

    def drop_bookmarks(self, dataset: str, names: Sequence[str]) -> None:
        for name in names:
            check_snapshot_name(name)
        present = {s.name for s in self.list_snapshots(dataset) if s.kind == "bookmark"}
        self._destroy_bookmarks(dataset, [n for n in dict.fromkeys(names) if n in present])

    def _bookmark(self, dataset: str, name: str) -> None:
        if self.lzc is not None:
            try:
                self.lzc.lzc_bookmark({f"{dataset}#{name}".encode(): f"{dataset}@{name}".encode()})
                return
            except self.lzc.exceptions.ZFSError as e:
                raise BackendError(f"bookmark {dataset}#{name} failed: {_lzc_failure(e)[1]}") from e
        zfs("bookmark", f"{dataset}@{name}", f"{dataset}#{name}")

    def _destroy_bookmarks(self, dataset: str, names: Iterable[str]) -> None:
        fulls = [f"{dataset}#{n}" for n in names]
        if not fulls:
            return
        if self.lzc is not None:
            try:
                self.lzc.lzc_destroy_bookmarks([f.encode() for f in fulls])
            except self.lzc.exceptions.ZFSError as e:
                raise BackendError(f"destroying bookmarks {', '.join(fulls)} failed: {_lzc_failure(e)[1]}") from e
            return
        for full in fulls:
            zfs("destroy", full)

    def _hold(self, fulls: Sequence[str], tag: str) -> None:
        if not fulls:
            return
        if self.lzc is not None:
            try:
                self.lzc.lzc_hold({f.encode(): tag.encode() for f in fulls})
            except self.lzc.exceptions.ZFSError as e:
                kinds, details = _lzc_failure(e)
                if kinds != {"HoldExists"}:
                    raise BackendError(f"hold {tag} on {', '.join(fulls)} failed: {details}") from e
            return
        zfs("hold", tag, *fulls)

    def _release(self, fulls: Sequence[str], tag: str) -> None:
        if not fulls:
            return
        if self.lzc is not None:
            try:
                self.lzc.lzc_release({f.encode(): [tag.encode()] for f in fulls})
            except self.lzc.exceptions.ZFSError as e:
                raise BackendError(f"release {tag} on {', '.join(fulls)} failed: {_lzc_failure(e)[1]}") from e
            return
        zfs("release", tag, *fulls)

    def annotate(self, dataset: str, name: str, key: str, text: str) -> None:
        """A user property ``snapsync:<key>`` on the snapshot: it goes wherever the snapshot goes."""
        check_snapshot_name(name)
        zfs("set", f"snapsync:{key}={text}", f"{dataset}@{name}")

    def annotation(self, dataset: str, name: str, key: str) -> str | None:
        check_snapshot_name(name)
        value = zfs("get", "-H", "-p", "-o", "value", f"snapsync:{key}", f"{dataset}@{name}").stdout.rstrip("\n")
        return None if value == "-" else value

    def encrypted(self, dataset: str) -> bool:
        if dataset not in self._encrypted:
            value = zfs("get", "-H", "-p", "-o", "value", "encryption", dataset).stdout.strip()
            self._encrypted[dataset] = value not in ("off", "-", "")
        return self._encrypted[dataset]

    def send_flags(self, dataset: str) -> list[str]:
        """Raw for encrypted datasets (the target never sees the key) or when the policy asks;
        otherwise compressed blocks travel as they are on disk (``-c``) unless turned off."""
        if self.raw or self.encrypted(dataset):
            return ["-w"]
        return ["-c"] if self.compressed else []

    def send_argv(self, dataset: str, name: str, base: str | None) -> list[str]:
        """``zfs send`` of ``dataset@name``; ``base`` is a snapshot name, or ``#name`` for a bookmark."""
        check_snapshot_name(name)
        argv = ["zfs", "send", *self.send_flags(dataset)]
        if base is not None:
            bookmark = base.startswith("#")
            check_snapshot_name(base[1:] if bookmark else base)
            argv += ["-i", f"{dataset}#{base[1:]}" if bookmark else f"{dataset}@{base}"]
        return argv + [f"{dataset}@{name}"]

    def chain_argv(self, dataset: str, names: Sequence[str], base: str) -> list[str]:
        raise BackendError("ZFS sends one snapshot per stream here (capabilities.chained_send is off)")

    def resume_argv(self, token: str) -> list[str]:
        """Continue an interrupted send from the receiver's ``receive_resume_token``."""
        return ["zfs", "send", "-t", token]

    def token_target(self, token: str) -> tuple[str, str, str]:
        """The dataset, snapshot name and guid a resume token continues, from ``zfs send -nvt``."""
        result = zfs("send", "-n", "-v", "-t", token, check=False)
        fields = {}
        for line in (result.stdout + result.stderr).splitlines():
            key, sep, value = line.strip().partition(" = ")
            if sep:
                fields[key] = value.strip()
        if "toname" not in fields or "toguid" not in fields:
            raise BackendError(f"cannot read the resume token: {result.stderr.strip() or 'no toname in it'}")
        dataset, _, name = fields["toname"].partition("@")
        return dataset, name, str(int(fields["toguid"], 0))

    def estimate(self, dataset: str, name: str, base: str | None) -> int | None:
        """Stream size from ``zfs send -nP`` (a dry run that reads only metadata)."""
        argv = self.send_argv(dataset, name, base)
        result = subprocess.run([argv[0], argv[1], "-n", "-P", *argv[2:]], capture_output=True, text=True)
        for line in result.stdout.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == "size" and fields[1].isdigit():
                return int(fields[1])
        return None

    def in_use(self, datasets: Sequence[str]) -> list[Holder]:
        """A dataset is used where it is mounted: found in mountinfo, so legacy mounts count too."""
        table = mounts()
        wanted = set(datasets)
        points = [m.point for m in table if m.fstype == "zfs" and m.source in wanted]
        return holders(points, table) if points else []

    def files_root(self, dataset: str) -> str | None:
        """The ``mountpoint`` property; None for ``none``, ``legacy`` or a dataset that is not there."""
        answer = zfs("get", "-H", "-o", "value", "mountpoint", dataset, check=False).stdout.strip()
        return answer if answer.startswith("/") else None

    def snapshot_files(self, dataset: str, name: str) -> Path | None:
        """``<mountpoint>/.zfs/snapshot/<name>``, which ZFS mounts on first access."""
        check_snapshot_name(name)
        root = self.files_root(dataset)
        path = Path(root) / ".zfs" / "snapshot" / name if root is not None else None
        return path if path is not None and path.is_dir() else None

    @contextmanager
    def scratch(self, label: str, datasets: Sequence[str], parent: str | None) -> Iterator[Scratch]:
        """A dataset ``<label>-<pid>`` in the pool of the first dataset, destroyed recursively at the
        end; writable copies are its clones (setuid=off, devices=off) mounted below a temporary directory."""
        from snapsync.backends.zfs_receiver import ZfsReceiver, zfs_component

        pool = pool_of(datasets[0])
        for stale in zfs("list", "-H", "-o", "name", "-d", "1", pool).stdout.splitlines():
            if stale.startswith(f"{pool}/{label}-"):
                zfs("destroy", "-R", "-f", stale, check=False)  # left by a scratch whose process was killed
        base = f"{pool}/{label}-{os.getpid()}"
        top = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=parent or "/var/tmp"))
        try:
            top.chmod(0o755)
            zfs("create", "-o", "canmount=off", "-o", "mountpoint=none", base)
            store = ZfsReceiver(base)

            def writable(rel: str, name: str) -> Path:
                check_snapshot_name(name)
                where = top / rel.replace("/", "_")
                clone = f"{base}/rw-{zfs_component(rel.replace('/', '_'))}"
                zfs("clone", "-o", f"mountpoint={where}", "-o", "setuid=off", "-o", "devices=off", f"{store.dataset(rel)}@{name}", clone)
                return where

            directory = top / "scratch"
            directory.mkdir()
            directory.chmod(0o755)
            yield Scratch(base, directory, writable)
        finally:
            zfs("destroy", "-R", "-f", base, check=False)
            shutil.rmtree(top, ignore_errors=True)

    def restore_receiver(self, dataset: str, *, create: bool = False) -> tuple[Receiver, str]:
        """Received in place below its parent dataset: the dataset itself arrives by receive."""
        from snapsync.backends.zfs_receiver import ZfsReceiver

        parent, _, leaf = dataset.rpartition("/")
        return ZfsReceiver(parent), leaf

    def restored_in_place(self, dataset: str, name: str) -> bool:
        """The dataset arrived by receive (no resume token left) and holds the snapshot ``name``."""
        if not self.exists(dataset):
            return False
        token = zfs("get", "-H", "-o", "value", "receive_resume_token", dataset, check=False).stdout.strip()
        return token in ("-", "") and any(s.name == name for s in self.list_snapshots(dataset))

    def finish_in_place(self, dataset: str, name: str) -> None:
        """Received with ``canmount=noauto``: now it may mount, and is mounted."""
        zfs("set", "canmount=on", dataset)
        if zfs("get", "-H", "-o", "value", "mounted", dataset).stdout.strip() != "yes":
            zfs("mount", dataset)

    def nested(self, dataset: str) -> list[str]:
        """The child filesystems and volumes of ``dataset``: each is a dataset of its own, which a
        snapshot of its parent (without ``-r``, as snapsync takes them) does not contain. Only the
        children: a grandchild is in its parent's place, reported when that one is a dataset."""
        result = zfs("list", "-H", "-o", "name", "-d", "1", "-t", "filesystem,volume", dataset, check=False)
        if result.returncode != 0:
            if _missing(result.stderr):
                raise DatasetMissing(f"{dataset}: does not exist")
            raise BackendError(f"{dataset}: cannot list its child datasets: {result.stderr.strip()}")
        return sorted(name for name in result.stdout.splitlines() if name and name != dataset)

    def adoption(self, path: str) -> Adoption | None:
        """Refused with the commands that do it by hand: ZFS has no way to make a directory a
        dataset in place (a new dataset needs a copy of the data, which blocks cannot be shared for)."""
        import shlex

        real = os.path.realpath(path)
        home = max(
            (m for m in mounts() if real == m.point or real.startswith(m.point.rstrip("/") + "/")),
            key=lambda m: len(m.point), default=None,
        )
        if home is None or home.fstype != "zfs":
            return None
        if home.point == real and home.root == "/":
            return Adoption(real, "adopted", notes=(f"it is ZFS dataset {home.source}",))
        if home.point == real:
            raise UsageError(f"{real}: is a mount point (a bind mount of {home.root} in {home.source}); adopt the directory where it lives")
        if not os.path.isdir(real):
            raise UsageError(f"{path}: not a directory")
        leaf = "".join(c if c.isascii() and (c.isalnum() or c in "_.:-") else "_" for c in os.path.basename(real))
        child, new, old = f"{home.source}/{leaf}", f"{real}.new", f"{real}.snapsync-adopt-old"
        q = shlex.quote
        raise UsageError(
            f"{real} is a directory in ZFS dataset {home.source}, which cannot become a dataset in place; with what "
            f"uses it stopped: zfs create -o mountpoint={q(new)} {q(child)} && cp -a {q(real)}/. {q(new)}/ && "
            f"mv {q(real)} {q(old)} && zfs set mountpoint={q(real)} {q(child)}; then check it and delete {q(old)}"
        )

    def adopt(self, path: str) -> Adoption:
        found = self.adoption(path)
        if found is None:
            raise UsageError(f"{path}: not on ZFS")
        return found
