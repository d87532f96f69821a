"""btrfs backend: read-only snapshots of subvolumes in a snapshot directory beside each subvolume.

Metadata goes through libbtrfsutil (``btrfsutil``), which talks ioctls directly; nothing here shells
out. btrfs cannot snapshot several subvolumes in one operation, so a group snapshot is a sequence
(``atomic_group_snapshot = False``) and the application hooks or a freeze must provide consistency.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import btrfsutil

from snapsync.backends import FILESYSTEMS
from snapsync.backends.base import Adoption, Capabilities, Scratch, SnapshotInfo, SnapshotSizes
from snapsync.backends.usage import Holder, holders, mounts
from snapsync.errors import BackendError, DatasetMissing
from snapsync.host.safefs import fd_path, private_dir, read_file, write_atomic

if TYPE_CHECKING:
    from snapsync.backends.receiver import Receiver

_NO_UUID = bytes(16)
_READ_ONLY = 1
HOLDS_FILE = ".holds.json"


def _uuid(raw: bytes) -> str | None:
    return None if raw == _NO_UUID else raw.hex()


def _check_name(name: str) -> None:
    """Names come from our own formatter, but a path component is a security boundary."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise BackendError(f"refusing snapshot name {name!r}: not a single path component")


def _write(home: int, directory: Path, name: str, data: bytes) -> None:
    """A file of ours beside the snapshots; a full or read-only filesystem is one line naming it."""
    try:
        write_atomic(home, name, data)
    except OSError as e:
        raise BackendError(f"{directory / name}: cannot write: {e.strerror or e}") from e


def _refusal(path: str, hold: str | None, dataset_uuid: bytes | None) -> str | None:
    """Why the entry at ``path`` must not be deleted as a snapshot, or None when it may."""
    if hold is not None:
        return f"held by {hold} (still needed by its holder)"
    if os.path.islink(path) or not btrfsutil.is_subvolume(path):
        return "not a btrfs subvolume"
    info = btrfsutil.subvolume_info(path)
    if not info.flags & _READ_ONLY:
        return "writable subvolume, not a read-only snapshot"
    if dataset_uuid is not None and info.uuid == dataset_uuid:
        return "it is the dataset itself"
    return None


class BtrfsBackend:
    kind: ClassVar[str] = "btrfs"
    capabilities: ClassVar[Capabilities] = FILESYSTEMS["btrfs"].capabilities

    def __init__(self, snapshot_dir: str | None = ".snapsync") -> None:
        self.snapshot_dir = snapshot_dir or ".snapsync"

    def snapshot_path(self, dataset: str) -> Path:
        """Where ``dataset``'s snapshots live: ``<parent>/<snapshot_dir>/<basename>``, or
        ``<snapshot_dir>/<basename>`` when snapshot_dir is absolute."""
        subvol = Path(dataset)
        base = Path(self.snapshot_dir)
        if not base.is_absolute():
            base = subvol.parent / base
        return base / (subvol.name or "root")

    def snapshot_home(self, dataset: str) -> str:
        return str(self.snapshot_path(dataset))

    OWNED_LEVELS: ClassVar[int] = 2

    def _home(self, dataset: str, create: bool = False) -> AbstractContextManager[int]:
        """The snapshot directory's descriptor: ``<snapshot_dir>/<name>`` are ours, reached without
        following symlinks and refused unless root's alone (the directory above a subvolume may
        belong to a user who could otherwise point them at another group's snapshots)."""
        return private_dir(self.snapshot_path(dataset), own=self.OWNED_LEVELS, create=create)

    def check_dataset(self, dataset: str) -> None:
        path = Path(dataset)
        if not path.exists():
            raise DatasetMissing(f"{dataset}: does not exist")
        try:
            if not btrfsutil.is_subvolume(path):
                raise DatasetMissing(f"{dataset}: is a directory, not a btrfs subvolume")
        except btrfsutil.BtrfsUtilError as e:
            if e.btrfsutilerror == btrfsutil.ERROR_NOT_BTRFS:
                raise DatasetMissing(f"{dataset}: is not on a btrfs filesystem") from e
            raise DatasetMissing(f"{dataset}: {e.strerror or e}") from e
        probe = self.snapshot_path(dataset).parent
        while not probe.exists():
            probe = probe.parent
        try:
            btrfsutil.subvolume_id(probe)
        except btrfsutil.BtrfsUtilError as e:
            raise DatasetMissing(
                f"{dataset}: snapshot directory {self.snapshot_path(dataset)} is not on btrfs; "
                "set snapshot_dir to a directory on the same filesystem"
            ) from e

    def _info(
        self, dataset: str, name: str, info: btrfsutil.SubvolumeInfo, path: Path | str, holds: tuple[str, ...] = ()
    ) -> SnapshotInfo:
        return SnapshotInfo(
            holds=holds,
            dataset=dataset,
            name=name,
            created=datetime.fromtimestamp(info.otime, UTC),
            guid=info.uuid.hex(),
            location=str(path),
            read_only=bool(info.flags & _READ_ONLY),
            parent_guid=_uuid(info.parent_uuid),
            received_guid=_uuid(info.received_uuid),
            txg=info.otransid,
        )

    def _children(self, directory: Path) -> Iterator[tuple[str, btrfsutil.SubvolumeInfo]]:
        """Subvolumes directly inside ``directory``, from one walk of the subvolume tree.

        Opening each snapshot instead costs ~100 us per snapshot on a cold cache (a tree read per
        subvolume root); the tree walk reads only the root tree, like ``btrfs subvolume list``.
        """
        try:
            root = directory
            while not btrfsutil.is_subvolume(root):
                root = root.parent
            rel = directory.relative_to(root).as_posix()
            prefix = "" if rel == "." else rel + "/"
            with btrfsutil.SubvolumeIterator(root, info=True) as it:
                for path, info in it:
                    if path.startswith(prefix) and "/" not in path[len(prefix) :]:
                        yield path[len(prefix) :], info
        except (OSError, btrfsutil.BtrfsUtilError) as e:
            raise BackendError(f"{directory}: cannot list snapshots: {e.strerror or e}") from e

    def list_snapshots(self, dataset: str) -> list[SnapshotInfo]:
        directory = self.snapshot_path(dataset)
        try:
            with self._home(dataset) as home:
                holds = self._read_holds(home, directory)
        except FileNotFoundError:
            return []
        base = f"{directory}/"
        held: dict[str, list[str]] = {}
        for tag, names in holds.items():
            for name in names:
                held.setdefault(name, []).append(tag)
        snaps = [
            self._info(dataset, rel, info, base + rel, tuple(sorted(held.get(rel, ()))))
            for rel, info in self._children(directory)
        ]
        snaps.sort(key=lambda s: (s.created, s.name))
        return snaps

    def snapshot_sizes(self, dataset: str) -> SnapshotSizes:
        """From the quota groups (``btrfs qgroup show --raw``): each snapshot's level-0 qgroup, whose
        exclusive bytes are what deleting it alone would free."""
        directory = self.snapshot_path(dataset)
        if not directory.is_dir() and not os.path.isdir(dataset):
            return SnapshotSizes({})
        ids = {rel: info.id for rel, info in self._children(directory)} if directory.is_dir() else {}
        done = subprocess.run(["btrfs", "qgroup", "show", "--raw", "--", str(directory if directory.is_dir() else dataset)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            if "not enabled" in done.stderr or "quotas not enabled" in done.stderr.lower():
                return SnapshotSizes({}, f"btrfs quotas are off on {dataset}'s filesystem, so snapshot sizes are unknown: "
                                         f"`btrfs quota enable --simple MOUNTPOINT` (kernel 6.7+) or `btrfs quota enable MOUNTPOINT`")
            raise BackendError(f"{dataset}: btrfs qgroup show: {done.stderr.strip() or f'exit {done.returncode}'}")
        groups: dict[int, tuple[int, int]] = {}
        for line in done.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0].startswith("0/") and fields[1].isdigit() and fields[2].isdigit():
                groups[int(fields[0][2:])] = (int(fields[1]), int(fields[2]))
        sizes = {rel: {"exclusive": groups[i][1], "shared": groups[i][0] - groups[i][1], "referenced": groups[i][0]}
                 for rel, i in ids.items() if i in groups}
        stale = "inconsistent" in done.stderr.lower() or "rescan" in done.stderr.lower()
        return SnapshotSizes(sizes, "btrfs reports its quota numbers as inconsistent: `btrfs quota rescan -w MOUNTPOINT`" if stale else None)

    def _read_holds(self, home: int, directory: Path) -> dict[str, list[str]]:
        try:
            raw = read_file(home, HOLDS_FILE)
            if raw is None:
                return {}
            data = json.loads(raw)
        except (OSError, ValueError) as e:
            raise BackendError(f"{directory / HOLDS_FILE}: unreadable holds file: {e}") from e
        if not isinstance(data, dict):
            raise BackendError(f"{directory / HOLDS_FILE}: unreadable holds file: not a JSON object")
        return {str(k): [str(n) for n in v] for k, v in data.items() if isinstance(v, list)}

    def set_holds(self, dataset: str, tag: str, names: Sequence[str]) -> None:
        """Emulate ZFS holds in a JSON file beside the snapshots: ``tag`` now holds exactly ``names``.

        Kept with the snapshots (on /persist, not in /var/lib) so a reinstall or an impermanent root
        does not forget which snapshot a target still needs. Written atomically, and only when the
        holds change: a run with nothing to send must not fail because the filesystem is full.
        """
        with self._home(dataset, create=True) as home:
            directory = self.snapshot_path(dataset)
            before = self._read_holds(home, directory)
            holds = dict(before)
            if names:
                holds[tag] = sorted(set(names))
            else:
                holds.pop(tag, None)
            if holds != before:
                _write(home, directory, HOLDS_FILE, json.dumps(holds, indent=1, sort_keys=True).encode())

    def lost_holds(self, dataset: str) -> dict[str, list[str]]:
        """Entries of the holds file whose snapshot was deleted (``btrfs subvolume delete`` ignores it)."""
        directory = self.snapshot_path(dataset)
        try:
            with self._home(dataset) as home:
                holds = self._read_holds(home, directory)
        except FileNotFoundError:
            return {}
        present = {rel for rel, _ in self._children(directory)} if holds else set()
        lost = {tag: [n for n in names if n not in present] for tag, names in holds.items()}
        return {tag: names for tag, names in lost.items() if names}

    def drop_bookmarks(self, dataset: str, names: Sequence[str]) -> None:
        if names:
            raise BackendError(f"{dataset}: btrfs has no bookmarks ({', '.join(names)})")

    def send_argv(self, dataset: str, name: str, base: str | None) -> list[str]:
        """``btrfs send`` of one snapshot, incremental from ``base`` when given (both read-only)."""
        _check_name(name)
        directory = self.snapshot_path(dataset)
        argv = ["btrfs", "send", "-q"]
        if base is not None:
            _check_name(base)
            argv += ["-p", str(directory / base)]
        return argv + [str(directory / name)]

    CHAIN: ClassVar[str] = 'p=$1; shift; for s do btrfs send -q -p "$p" "$s" || exit; p=$s; done'
    """Each snapshot's stream from the one before, in turn; names are arguments, never script."""

    def chain_argv(self, dataset: str, names: Sequence[str], base: str) -> list[str]:
        """``btrfs send -p`` per snapshot, one after the other into one pipe: one ``btrfs receive``
        takes the streams in turn. (``btrfs send -p B S1 S2`` would build every one on B, and ``-c``
        lets btrfs pick the parent: explicit parents keep each stream what the receiver checks.)"""
        for name in (base, *names):
            _check_name(name)
        directory = self.snapshot_path(dataset)
        return ["sh", "-c", self.CHAIN, "sh", *(str(directory / n) for n in (base, *names))]

    def _annotation_name(self, name: str, key: str) -> str:
        _check_name(name)
        _check_name(key)
        return f".{name}.{key}"

    def annotate(self, dataset: str, name: str, key: str, text: str) -> None:
        """A file ``.<snapshot>.<key>`` beside the snapshot (a read-only snapshot cannot take it)."""
        with self._home(dataset, create=True) as home:
            _write(home, self.snapshot_path(dataset), self._annotation_name(name, key), text.encode())

    def annotation(self, dataset: str, name: str, key: str) -> str | None:
        try:
            with self._home(dataset) as home:
                raw = read_file(home, self._annotation_name(name, key))
        except FileNotFoundError:
            return None
        return None if raw is None else raw.decode(errors="replace")

    def resume_argv(self, token: str) -> list[str]:
        raise BackendError("btrfs has no resumable send; an interrupted receive is deleted and sent again")

    def token_target(self, token: str) -> tuple[str, str, str]:
        raise BackendError("btrfs has no resume tokens; an interrupted receive is deleted and sent again")

    def estimate(self, dataset: str, name: str, base: str | None) -> int | None:
        """Bytes in a full send, roughly (file sizes); None for incrementals, which only btrfs knows."""
        location = self.snapshot_path(dataset) / name
        if base is not None or not location.is_dir():
            return None
        total = 0
        for root, _, files in os.walk(location):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_size
                except OSError:
                    pass
        return total

    def snapshot_group(self, datasets: Sequence[str], name: str) -> list[SnapshotInfo]:
        _check_name(name)
        for dataset in datasets:
            self.check_dataset(dataset)
            if os.path.lexists(self.snapshot_path(dataset) / name):
                raise BackendError(f"{dataset}: snapshot {name} already exists")
        created: list[Path] = []
        try:
            for dataset in datasets:
                target = self.snapshot_path(dataset) / name
                with self._home(dataset, create=True) as home:
                    try:
                        btrfsutil.create_snapshot(dataset, fd_path(home, name), read_only=True)
                    except btrfsutil.BtrfsUtilError as e:
                        raise BackendError(f"{dataset}: snapshot failed: {e.strerror or e}") from e
                created.append(target)
        except BaseException:
            for path in reversed(created):
                try:
                    btrfsutil.delete_subvolume(path)
                except btrfsutil.BtrfsUtilError:
                    pass  # the error being raised is the one the user needs; a leftover is listed
            raise
        return [self._info(d, name, btrfsutil.subvolume_info(p), p) for d, p in zip(datasets, created)]

    def rollback(self, dataset: str, name: str, aside: str) -> None:
        """Move the subvolume aside and put a writable snapshot of ``name`` in its place.

        The new subvolume is made under a temporary name first, so the only instant without a
        subvolume at ``dataset`` is between two renames; a call after a crash there finds the
        temporary one and finishes, and a call after the swap finds it done.
        """
        _check_name(name)
        path, target = Path(dataset), Path(aside)
        fresh = f".{path.name}.rollback-{name}"
        if target.parent != path.parent:
            raise BackendError(f"{aside}: must be beside {dataset}")
        with self._rollback_dir(path, name, "rollback to") as (parent, home):
            self._rollback_in(parent, home, path, name, target.name, fresh)

    @contextmanager
    def _rollback_dir(self, path: Path, name: str, what: str) -> Iterator[tuple[int, int]]:
        """The dataset's directory and its snapshot directory as descriptors; failures as one line."""
        try:
            parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise DatasetMissing(f"{path}: its directory cannot be opened: {e.strerror or e}") from e
        try:
            with self._home(str(path)) as home:
                yield parent, home
        except FileNotFoundError as e:
            raise BackendError(f"{path}: no snapshot {name} in {self.snapshot_path(str(path))}") from e
        except btrfsutil.BtrfsUtilError as e:
            raise BackendError(f"{path}: {what} {name} failed: {e.strerror or e}") from e
        except OSError as e:
            raise BackendError(f"{path}: {what} {name} failed: {e.strerror or e}") from e
        finally:
            os.close(parent)

    @staticmethod
    def _rollback_step(step: str) -> None:
        """A step of a rollback or of its undo is done: logged, and SIGKILLed here when
        ``$SNAPSYNC_TEST_KILL_AT`` names it, which only tests/faults set (see recovery.rollback.reached)."""
        import logging
        import signal

        logging.getLogger("snapsync.recovery.rollback").info("rollback step: %s", step)
        if os.environ.get("SNAPSYNC_TEST_KILL_AT") == step:
            os.kill(os.getpid(), signal.SIGKILL)

    @staticmethod
    def _copy_of(entry: str, snapshot: str) -> bool:
        """Whether ``entry`` is a writable snapshot of ``snapshot``: what a rollback prepares and puts in place."""
        if os.path.islink(entry) or not os.path.isdir(entry) or not btrfsutil.is_subvolume(entry):
            return False
        info = btrfsutil.subvolume_info(entry)
        return not info.flags & _READ_ONLY and info.parent_uuid == btrfsutil.subvolume_info(snapshot).uuid

    def _rollback_in(self, parent: int, home: int, path: Path, name: str, aside: str, fresh: str) -> None:
        """The rollback's steps, every one through descriptors of the dataset's directory and of its
        checked snapshot directory: renaming either one's ancestors cannot redirect them."""
        here = path.name

        def at(entry: str) -> str:
            return fd_path(parent, entry)

        snapshot = fd_path(home, name)
        if not os.path.isdir(snapshot) or not btrfsutil.is_subvolume(snapshot):
            raise BackendError(f"{path}: no snapshot {name} in {self.snapshot_path(str(path))}")
        if not os.path.lexists(at(here)):
            if os.path.lexists(at(fresh)) and os.path.lexists(at(aside)):  # crashed between the renames
                os.rename(fresh, here, src_dir_fd=parent, dst_dir_fd=parent)
                return
            raise DatasetMissing(f"{path}: does not exist")
        if os.path.lexists(at(aside)):
            if self._copy_of(at(here), snapshot):  # swapped before a crash: nothing is left to do
                return
            raise BackendError(f"{path.parent / aside} already exists; not moving {path} over it")
        refusal = self._refusal(path, at(here))
        if refusal:
            raise BackendError(refusal)
        if os.path.lexists(at(fresh)):
            btrfsutil.delete_subvolume(at(fresh))  # a writable snapshot of ours, from an attempt that died
        btrfsutil.create_snapshot(snapshot, at(fresh), read_only=False)
        self._rollback_step(f"writable snapshot made {here}")
        os.rename(here, aside, src_dir_fd=parent, dst_dir_fd=parent)
        self._rollback_step(f"moved aside {here}")
        os.rename(fresh, here, src_dir_fd=parent, dst_dir_fd=parent)

    @staticmethod
    def _refusal(path: Path, live: str) -> str | None:
        """Why the subvolume at ``live`` (reached as ``path``) cannot be swapped by renames, if it cannot."""
        if any(m.point == os.path.realpath(path) for m in mounts()):  # not ismount: every subvolume has a device of its own
            return (
                f"{path} is a mount point of its own (a subvolume mounted by subvol=): it cannot be renamed aside; "
                f"roll back subvolumes inside it, or mount the filesystem's top level and name the dataset there"
            )
        nested = [str(p) for p, _ in btrfsutil.SubvolumeIterator(live, top=0)] if btrfsutil.is_subvolume(live) else []
        if nested:
            return (
                f"{path} contains subvolumes ({', '.join(nested[:3])}); a rollback would move them aside too: "
                f"roll back subvolumes without nested ones (list those in the group instead)"
            )
        return None

    def check_rollback(self, dataset: str, name: str, aside: str) -> None:
        """Everything ``rollback`` would refuse, checked without changing anything."""
        _check_name(name)
        path = Path(dataset)
        if Path(aside).parent != path.parent:
            raise BackendError(f"{aside}: must be beside {dataset}")
        with self._rollback_dir(path, name, "rollback to") as (parent, home):
            snapshot = fd_path(home, name)
            if not os.path.isdir(snapshot) or not btrfsutil.is_subvolume(snapshot):
                raise BackendError(f"{path}: no snapshot {name} in {self.snapshot_path(dataset)}")
            here = fd_path(parent, path.name)
            if not os.path.lexists(here):
                raise DatasetMissing(f"{path}: does not exist")
            if os.path.lexists(fd_path(parent, Path(aside).name)):
                raise BackendError(f"{aside} already exists; not moving {path} over it")
            refusal = self._refusal(path, here)
            if refusal:
                raise BackendError(refusal)

    def delete_aside(self, dataset: str, aside: str) -> None:
        """A writable subvolume beside the dataset, with no subvolume inside it, deleted; anything else refused."""
        path, target = Path(dataset), Path(aside)
        if target.parent != path.parent or not target.name.startswith(f"{path.name}.pre-rollback."):
            raise BackendError(f"{aside}: not a state a rollback of {dataset} moved aside")
        try:
            parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise BackendError(f"{path.parent}: cannot be opened: {e.strerror or e}") from e
        try:
            here = fd_path(parent, target.name)
            if os.path.islink(here) or not os.path.isdir(here) or not btrfsutil.is_subvolume(here):
                raise BackendError(f"{aside}: not a subvolume; not deleting it")
            if btrfsutil.subvolume_info(here).flags & _READ_ONLY:
                raise BackendError(f"{aside}: a read-only snapshot, not a state moved aside; not deleting it")
            if any(True for _ in btrfsutil.SubvolumeIterator(here, top=0)):
                raise BackendError(f"{aside}: contains subvolumes; delete them first")
            btrfsutil.delete_subvolume(here)
        except btrfsutil.BtrfsUtilError as e:
            raise BackendError(f"{aside}: cannot be deleted: {e.strerror or e}") from e
        finally:
            os.close(parent)

    def undo_rollback(self, dataset: str, name: str, aside: str, kept: str, *, dry_run: bool = False) -> list[str]:
        """Put ``dataset`` back as it was before an interrupted ``rollback(dataset, name, aside)``;
        returns what it did (or, with ``dry_run``, would do).

        The state moved aside returns; the prepared writable snapshot, never in use, is deleted; a
        state already put in place was live and may hold new writes, so it goes to ``kept`` and
        stays. Every state is checked before the first change, and anything that is not what a
        rollback leaves is refused. A call after a stop at any step (or a rollback) continues.
        """
        _check_name(name)
        path = Path(dataset)
        if Path(aside).parent != path.parent or Path(kept).parent != path.parent:
            raise BackendError(f"{aside} and {kept}: must be beside {dataset}")
        with self._rollback_dir(path, name, "undoing the rollback to") as (parent, home):
            return self._undo_in(parent, home, path, name, Path(aside).name, Path(kept).name, dry_run)

    def _undo_in(self, parent: int, home: int, path: Path, name: str, aside: str, kept: str, dry_run: bool) -> list[str]:
        here, fresh = path.name, f".{path.name}.rollback-{name}"
        beside = path.parent

        def at(entry: str) -> str:
            return fd_path(parent, entry)

        snapshot = fd_path(home, name)
        if not os.path.isdir(snapshot) or not btrfsutil.is_subvolume(snapshot):
            raise BackendError(f"{path}: no snapshot {name} in {self.snapshot_path(str(path))}")
        live, moved = os.path.lexists(at(here)), os.path.lexists(at(aside))
        prepared = os.path.lexists(at(fresh))
        if live and moved:
            if not self._copy_of(at(here), snapshot):
                raise BackendError(
                    f"{path} is not the state the rollback put in place and {beside / aside} exists: look at both, "
                    f"keep the one you want at {path} and rename the other away"
                )
            if os.path.lexists(at(kept)):
                raise BackendError(f"{beside / kept} already exists; rename it away")
        elif not live and not moved:
            raise BackendError(f"{path} and {beside / aside} are both missing: there is nothing to put back")
        if prepared and not self._copy_of(at(fresh), snapshot):
            raise BackendError(f"{beside / fresh} is not a writable snapshot of {name}; look at it and rename it away")
        done = []
        if live and moved:
            done.append(f"{path}: moved the state put in place (it may have been used) to {beside / kept}")
            if not dry_run:
                os.rename(here, kept, src_dir_fd=parent, dst_dir_fd=parent)
                self._rollback_step(f"rolled-back state moved away {here}")
        if moved:
            done.append(f"{path}: put back from {beside / aside}")
            if not dry_run:
                os.rename(aside, here, src_dir_fd=parent, dst_dir_fd=parent)
                self._rollback_step(f"put back {here}")
        if prepared:
            done.append(f"{path}: deleted the prepared writable snapshot {beside / fresh} (never in use)")
            if not dry_run:
                btrfsutil.delete_subvolume(at(fresh))
        return done or [f"{path}: as it was"]

    def destroy(self, dataset: str, names: Sequence[str]) -> None:
        """Delete read-only snapshots by name, each reached through the checked directory's
        descriptor, so no rename of the directories above can point the delete elsewhere.

        A refusal or failure stops only its own name: every other one is deleted, then one error
        names each one left and why (a prune that stopped at the first would never get past it).
        """
        directory = self.snapshot_path(dataset)
        for name in names:
            _check_name(name)
        dataset_uuid = btrfsutil.subvolume_info(dataset).uuid if os.path.exists(dataset) else None
        try:
            with self._home(dataset) as home:
                left = self._destroy_in(home, directory, dataset_uuid, names)
        except FileNotFoundError:
            return
        if left:
            raise BackendError("; ".join(left))

    def _destroy_in(self, home: int, directory: Path, dataset_uuid: bytes | None, names: Sequence[str]) -> list[str]:
        """Deletes what it may; returns one line per name it left, saying why."""
        held = {n: tag for tag, ns in self._read_holds(home, directory).items() for n in ns}
        notes = [
            n for n in os.listdir(fd_path(home))
            if n.startswith(".") and n != HOLDS_FILE and not os.path.isdir(fd_path(home, n))
        ]
        left: list[str] = []
        for name in dict.fromkeys(names):
            path, shown = fd_path(home, name), directory / name
            if not os.path.lexists(path):
                continue
            try:
                why = _refusal(path, held.get(name), dataset_uuid)
                if why is None:
                    btrfsutil.delete_subvolume(path)
            except (OSError, btrfsutil.BtrfsUtilError) as e:
                left.append(f"{shown}: delete failed: {e.strerror or e}")
                continue
            if why is not None:
                left.append(f"refusing to delete {shown}: {why}")
                continue
            for note in notes:
                if note.startswith(f".{name}."):
                    try:
                        os.unlink(note, dir_fd=home)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        left.append(f"{shown} deleted, but its note {note} stays: {e.strerror or e}")
        return left

    def exists(self, dataset: str) -> bool:
        return os.path.lexists(dataset)

    def in_use(self, datasets: Sequence[str]) -> list[Holder]:
        """A subvolume is used through its path and every mount that shows it (see usage.py)."""
        return holders(datasets)

    def files_root(self, dataset: str) -> str | None:
        return dataset

    def snapshot_files(self, dataset: str, name: str) -> Path | None:
        _check_name(name)
        path = self.snapshot_path(dataset) / name
        return path if path.is_dir() else None

    @contextmanager
    def scratch(self, label: str, datasets: Sequence[str], parent: str | None) -> Iterator[Scratch]:
        """A sparse loop btrfs mounted nosuid,nodev; writable copies are writable snapshots in it."""
        from snapsync.backends.scratch import scratch_btrfs

        with scratch_btrfs(self._scratch_size(datasets), parent=parent or "/var/tmp", label=label) as mnt:
            root, directory = mnt / "restore", mnt / "scratch"
            root.mkdir()
            directory.mkdir()
            for path in (mnt.parent, mnt, directory):
                path.chmod(0o755)  # a database server runs as the data's owner, not root, and must get there

            def writable(rel: str, name: str) -> Path:
                _check_name(name)
                copy = directory / f"rw-{rel.replace('/', '_')}"
                btrfsutil.create_snapshot(root / rel / name, copy, read_only=False)
                return copy

            yield Scratch(str(root), directory, writable)

    def _scratch_size(self, datasets: Sequence[str]) -> str:
        """A sparse scratch file big enough for the newest snapshots twice (restored plus writable copies)."""
        total = 0
        for ds in datasets:
            snaps = [s for s in self.list_snapshots(ds) if s.kind == "snapshot"]
            if snaps:
                total += self.estimate(ds, snaps[-1].name, None) or 0
        return f"{max(512, (total * 3) // (1 << 20) + 256)}M"

    def restore_receiver(self, dataset: str, *, create: bool = False) -> tuple[Receiver, str]:
        """Received into the snapshot directory, as a copy with the source's identity."""
        from snapsync.backends.btrfs_receiver import BtrfsReceiver

        home = self.snapshot_path(dataset)
        if create:
            home.mkdir(parents=True, exist_ok=True, mode=0o700)
        return BtrfsReceiver(home.parent), home.name

    def restored_in_place(self, dataset: str, name: str) -> bool:
        """The subvolume is a writable snapshot of the received copy ``name`` in its own snapshot directory."""
        if not os.path.lexists(dataset):
            return False
        try:
            parent = btrfsutil.subvolume_info(dataset).parent_uuid
        except btrfsutil.BtrfsUtilError:
            return False
        return any(
            s.name == name and s.guid == parent.hex() and s.received_guid
            for s in self.list_snapshots(dataset)
        )

    def finish_in_place(self, dataset: str, name: str) -> None:
        """The subvolume is created as a writable snapshot of the received copy."""
        _check_name(name)
        home = self.snapshot_path(dataset)
        if os.path.lexists(dataset):
            raise BackendError(
                f"{dataset} appeared while it was being restored (a unit's StateDirectory=, tmpfiles?); the "
                f"restored snapshot is in {home}: move {dataset} away and run the restore again"
            )
        btrfsutil.create_snapshot(home / name, dataset, read_only=False)

    def nested(self, dataset: str) -> list[str]:
        """Writable subvolumes whose nearest enclosing subvolume is ``dataset``, from one walk of its
        subvolume tree. Read-only ones are snapshots or received copies (snapsync's own snapshot
        directories among them), not live data."""
        self.check_dataset(dataset)
        try:
            top = btrfsutil.subvolume_id(dataset)
            with btrfsutil.SubvolumeIterator(dataset, info=True) as it:
                found = [
                    os.path.join(dataset, rel) for rel, info in it
                    if info.parent_id == top and not info.flags & _READ_ONLY
                ]
        except (OSError, btrfsutil.BtrfsUtilError) as e:
            raise BackendError(f"{dataset}: cannot list the subvolumes inside it: {e.strerror or e}") from e
        return sorted(found)

    def adoption(self, path: str) -> Adoption | None:
        from snapsync.backends.btrfs_adopt import adoption

        return adoption(path)

    def adopt(self, path: str) -> Adoption:
        """A new subvolume beside the directory, a reflink copy, a comparison, one atomic swap; the
        original is kept beside it (see btrfs_adopt)."""
        from snapsync.backends.btrfs_adopt import adopt

        return adopt(path)


class CopiesBackend(BtrfsBackend):
    """A receiving root's copies directory (``<root>/<group>/<dataset key>``) seen as a dataset whose
    snapshots are the copies themselves: what a backup host serves when a host is restored from it."""

    OWNED_LEVELS: ClassVar[int] = 1

    def snapshot_path(self, dataset: str) -> Path:
        return Path(dataset)

    def check_dataset(self, dataset: str) -> None:
        if not Path(dataset).is_dir():
            raise DatasetMissing(f"{dataset}: no copies here")

    def set_holds(self, dataset: str, tag: str, names: Sequence[str]) -> None:
        raise BackendError("copies on a backup host are not held by the hosts restoring from them")
