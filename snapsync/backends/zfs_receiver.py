"""The receiving side of replication on ZFS: copies of a source's snapshots below a root dataset.

Layout: ``<root>/<group>/<dataset key>@<snapshot>``, the key of :func:`snapsync.protocol.dataset_key`
with the characters ZFS refuses in names (``%+=@``) escaped by :func:`zfs_component`.

ZFS commits a received snapshot atomically: until ``zfs receive`` finishes, the snapshot does not
exist. An interrupted ``receive -s`` leaves a ``receive_resume_token`` on the dataset instead of a
partial copy; the next run resumes from it (``zfs send -t``) rather than starting over. Streams are
received unmounted (``-u``, ``canmount=noauto``) so nothing on the target writes to them, and with
``-F`` only when the target's policy allows rollback (never on an append-only store). A received
snapshot keeps the source's guid, which is what the planner matches on.

The sending host is not trusted here (every receive snapsync runs: ``serve --role receive``, local
targets, pulls, restores from a backup host or offsite, drills). Three layers keep a stream from
acting on this host beyond adding its one snapshot:

1. **Before anything lands**, the stream's first record (``DRR_BEGIN``) is read and checked:
   it must be a single-snapshot stream (``DMU_SUBSTREAM``, never a ``zfs send -R/-I/-p/-h/-b``
   compound stream, which could create other datasets, rename or destroy them, carry properties
   and holds), of a filesystem, not a clone stream, naming the snapshot asked for with the guid
   asked for, full exactly when the dataset does not exist yet and otherwise built on one of its
   copies. The record and the rest of the stream are then spliced into ``zfs receive`` (kernel to
   kernel, never through a Python byte loop).
2. ``zfs receive`` runs with ``-h`` (no holds), ``-o canmount=noauto`` and ``-x`` for every
   property that acts on this host (:data:`EXCLUDED`), so even a stream that carried them could
   not set them.
3. **After** the receive, exactly one new snapshot with the expected name and guid, no new child
   dataset, no property with source ``received`` and a harmless ``keylocation`` must be there;
   otherwise everything this receive created (found by comparing listings taken before and after,
   never by a recursive destroy of what was there before) is destroyed again, including parents
   :meth:`ZfsReceiver._make_parents` created for it.
"""

from __future__ import annotations

import errno
import os
import re
import select
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

from snapsync.backends.base import Capabilities, StorageBackend
from snapsync.backends.receiver import Copy, PartialDelete
from snapsync.backends.zfs import LIST_FIELDS, ZfsBackend, check_snapshot_name, zfs
from snapsync.errors import BackendError
from snapsync.protocol import Refused, check_name, check_path
from snapsync.host.streams import PIPE_SIZE, Proc, Stalled, finish, widen

_ESCAPES = {":": ":3A", "%": ":", "+": ":2B", "=": ":3D", "@": ":40"}
_DATASET = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.: -]*(/[A-Za-z0-9_.: -]+)*")

# dmu_replay_record_t (include/sys/zfs_ioctl.h): drr_type and drr_payloadlen, then the union, whose
# largest member (drr_checksum: 34 pad words and a zio_cksum_t) makes every record 312 bytes.
BEGIN_SIZE = 312
DRR_BEGIN = 0
DMU_BACKUP_MAGIC = 0x2F5BACBAC
DMU_SUBSTREAM = 1
DMU_COMPOUNDSTREAM = 2
DMU_OST_ZVOL = 1
DMU_OST_ZFS = 2
DRR_FLAG_CLONE = 1 << 0
FEATURE_RESUMING = 1 << 20
FEATURE_RAW = 1 << 24
_BEGIN = "IIQQQIIQQ256s"  # drr_type, payloadlen, magic, versioninfo, creation_time, objset type, flags, toguid, fromguid, toname

# Properties a stream must never decide on the receiving host, each excluded with ``-x``: the
# effective value is then this host's (inherited from the root, or the default), exactly as if the
# stream had carried none. ``canmount`` is set instead (``-o canmount=noauto``): a copy is never
# mounted by a receive, ``zfs mount -a`` or zfs-mount.service. For the non-inheritable
# reservations ``-x`` drops them from the stream's properties. ``exec``/``setuid``/``devices`` are
# excluded rather than forced off: an in-place restore then gets what a new dataset there would get,
# and an administrator who wants every copy ``nosuid,noexec,nodev`` sets that once on the root.
EXCLUDED = (
    "mountpoint", "sharenfs", "sharesmb", "exec", "setuid", "devices", "refreservation", "reservation",
    "snapsync:backup_label", "snapsync:rollback-mountpoint", "snapsync:rollback-canmount",
)
# Encryption properties cannot be set or excluded on a raw receive (zfs refuses the command); a raw
# stream cannot carry keylocation outside a compound stream, and a raw encryption root always
# arrives with keylocation=prompt. Checked after the receive either way.
EXCLUDED_UNLESS_RAW = ("keylocation",)
SAFE_KEYLOCATIONS = ("none", "prompt", "-", "")


def is_dataset_name(name: str) -> bool:
    return _DATASET.fullmatch(name) is not None


def zfs_component(part: str) -> str:
    """A dataset-key component as a ZFS name component (bijective: ``:`` is escaped first)."""
    return "".join(_ESCAPES.get(c, c) for c in part)


class StoreRefused(BackendError, Refused):
    """A stream or an operation this store will not carry out; nothing of it was kept.

    A :class:`~snapsync.protocol.Refused` (``serve`` answers ``kind: refused``) that is also a
    :class:`~snapsync.errors.BackendError` (restore and drills report it like any failed receive).
    """


@dataclass(frozen=True)
class StreamBegin:
    """The ``DRR_BEGIN`` record that opens every ZFS send stream, and its bytes as they came."""

    hdrtype: int
    features: int
    objset_type: int
    flags: int
    toguid: int
    fromguid: int
    toname: str
    payloadlen: int
    record: bytes

    @property
    def snapshot(self) -> str:
        return self.toname.partition("@")[2]

    @property
    def raw(self) -> bool:
        return bool(self.features & FEATURE_RAW)

    @property
    def resuming(self) -> bool:
        return bool(self.features & FEATURE_RESUMING)


def parse_begin(record: bytes) -> StreamBegin:
    """Decode a stream's first record (either byte order); :class:`StoreRefused` if it is not one."""
    if len(record) != BEGIN_SIZE:
        raise StoreRefused(f"not a ZFS send stream: it ended after {len(record)} bytes, before its first record was complete")
    for order in "<>":
        fields = struct.unpack_from(order + _BEGIN, record)
        if fields[2] == DMU_BACKUP_MAGIC:
            break
    else:
        raise StoreRefused("not a ZFS send stream: its first record lacks the send-stream magic number")
    drr_type, payloadlen, _, versioninfo, _, objset_type, flags, toguid, fromguid, rawname = fields
    if drr_type != DRR_BEGIN:
        raise StoreRefused(f"not a ZFS send stream: its first record is of type {drr_type}, not BEGIN")
    name, nul, _ = rawname.partition(b"\0")
    try:
        toname = name.decode("ascii")
    except UnicodeDecodeError:
        toname = ""
    if not nul or not toname.isprintable():
        raise StoreRefused("not a ZFS send stream: the snapshot name in its first record is malformed")
    return StreamBegin(
        hdrtype=versioninfo & 0x3, features=(versioninfo >> 2) & 0x3FFFFFFF, objset_type=objset_type, flags=flags,
        toguid=toguid, fromguid=fromguid, toname=toname, payloadlen=payloadlen, record=record,
    )


def check_single(begin: StreamBegin) -> None:
    """Refuse what snapsync never sends: compound streams, clone streams, anything but a filesystem."""
    if begin.hdrtype == DMU_COMPOUNDSTREAM:
        raise StoreRefused(
            f"the stream of {begin.toname} is a replication stream (zfs send -R, -I, -p, -h or -b): it can create "
            f"other datasets and carry properties and holds; snapsync receives single-snapshot streams only"
        )
    if begin.hdrtype != DMU_SUBSTREAM:
        raise StoreRefused(f"the stream of {begin.toname} has an unknown header type {begin.hdrtype}")
    if begin.flags & DRR_FLAG_CLONE:
        raise StoreRefused(
            f"the stream of {begin.toname} is a clone stream: it would build on a snapshot of another dataset on this host"
        )
    if begin.objset_type == DMU_OST_ZVOL:
        raise StoreRefused(
            f"the stream of {begin.toname} is a volume: snapsync receives filesystems only (a received volume "
            f"would appear as a block device on this host)"
        )
    if begin.objset_type != DMU_OST_ZFS:
        raise StoreRefused(f"the stream of {begin.toname} is of object set type {begin.objset_type}, not a filesystem")
    if begin.toname.count("@") != 1 or not begin.snapshot:
        raise StoreRefused(f"the stream names {begin.toname!r}, not a snapshot")


def _read_exactly(fd: int, size: int, stall: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        _wait_readable(fd, stall)
        chunk = os.read(fd, size - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _wait_readable(fd: int, stall: float | None) -> None:
    if stall is None:
        return
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    if not poller.poll(int(stall * 1000)):
        raise Stalled(f"no data from the sending side for {stall:g}s; receive stopped")


def _forward(src: int, dst: int, stall: float | None) -> None:
    """Everything from ``src`` into the pipe ``dst`` with ``splice`` (inside the kernel) until EOF.

    Raises BrokenPipeError when the reader (``zfs receive``) went away; its exit status says why.
    """
    widen(dst)
    spliced = True
    while True:
        _wait_readable(src, stall)
        if spliced:
            try:
                n = os.splice(src, dst, PIPE_SIZE)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                spliced = False  # a descriptor splice cannot read (rare): copy instead
                continue
        else:
            data = os.read(src, PIPE_SIZE)
            n = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view):]
        if n == 0:
            return


@dataclass
class _Tree:
    """A dataset, its descendants and all their snapshots, from one ``zfs list -r``."""

    datasets: set[str]
    snapshots: dict[str, str]
    token: str | None

    def snapshots_of(self, dataset: str) -> dict[str, str]:
        return {full: guid for full, guid in self.snapshots.items() if full.partition("@")[0] == dataset}


class ZfsReceiver:
    """Copies below the dataset ``root``; every path a caller passes is relative and validated here.

    ``append_only``: nothing is ever destroyed or rolled back (``receive(force=True)`` and
    :meth:`delete` raise :class:`StoreRefused`); abandoning an interrupted receive
    (:meth:`delete_partials`) stays allowed, as it removes no completed copy. ``stall``: a stream
    that delivers no byte for that many seconds is stopped (:class:`Stalled`).
    """

    kind: ClassVar[str] = ZfsBackend.kind
    capabilities: ClassVar[Capabilities] = ZfsBackend.capabilities

    def __init__(self, root: str, *, append_only: bool = False, stall: float | None = None) -> None:
        if not is_dataset_name(root):
            raise BackendError(f"target root {root!r} is not a ZFS dataset name")
        self.root = root
        self.append_only = append_only
        self.stall = stall

    def dataset(self, rel: str) -> str:
        check_path(rel)
        return self.root + "/" + "/".join(zfs_component(p) for p in rel.split("/"))

    def source(self, rel: str, backend: StorageBackend) -> tuple[str, StorageBackend]:
        """``rel`` below the root, or the copies of ``rel`` where their name needed escaping; ZFS
        copies are datasets like any other, so ``backend`` serves both."""
        dataset = f"{self.root}/{check_path(rel)}"
        copies = self.dataset(rel)
        if copies != dataset and zfs("list", "-H", "-o", "name", copies, check=False).returncode == 0:
            return copies, backend
        return dataset, backend

    def check_root(self) -> None:
        result = zfs("list", "-H", "-o", "name", self.root, check=False)
        if result.returncode != 0:
            raise BackendError(f"target root dataset {self.root} does not exist (zfs create -o canmount=off {self.root})")

    def _listing(self, dataset: str) -> tuple[list[Copy], str | None]:
        copies, token, _ = self._state(dataset)
        return copies, token

    def _state(self, dataset: str) -> tuple[list[Copy], str | None, bool]:
        """Copies, resume token and whether the dataset exists, from one ``zfs list``."""
        result = zfs(
            "list", "-H", "-p", "-t", "filesystem,volume,snapshot", "-o", LIST_FIELDS + ",receive_resume_token",
            "-d", "1", dataset, check=False,
        )
        if result.returncode != 0:
            if "does not exist" in result.stderr:
                return [], None, False
            raise BackendError(f"{dataset}: cannot list: {result.stderr.strip()}")
        copies, token = [], None
        for line in result.stdout.splitlines():
            full, guid, _, creation, _, resume = line.split("\t")
            if full == dataset:
                token = None if resume in ("-", "") else resume
            elif full.startswith(dataset + "@"):
                name = full.partition("@")[2]
                created = datetime.fromtimestamp(int(creation), UTC)
                copies.append(Copy(name, guid, guid, read_only=True, partial=False, created=created))
        return copies, token, True

    def listing(self, rel: str) -> tuple[list[Copy], str | None]:
        """The copies of ``rel`` and its resume token, from one ``zfs list``."""
        return self._listing(self.dataset(rel))

    def copies(self, rel: str) -> list[Copy]:
        return self._listing(self.dataset(rel))[0]

    def _tree(self, dataset: str) -> _Tree | None:
        """``dataset``, every dataset below it and all their snapshots; None if it does not exist."""
        result = zfs(
            "list", "-H", "-p", "-t", "filesystem,volume,snapshot", "-o", "name,guid,receive_resume_token",
            "-r", dataset, check=False,
        )
        if result.returncode != 0:
            if "does not exist" in result.stderr:
                return None
            raise BackendError(f"{dataset}: cannot list: {result.stderr.strip()}")
        tree = _Tree(set(), {}, None)
        for line in result.stdout.splitlines():
            fields = line.split("\t")
            if len(fields) != 3:
                continue
            full, guid, resume = fields
            if "@" in full:
                tree.snapshots[full] = guid
            else:
                tree.datasets.add(full)
                if full == dataset and resume not in ("-", ""):
                    tree.token = resume
        if dataset not in tree.datasets:
            return None
        return tree

    def _properties(self, *names: str) -> list[tuple[str, str, str, str]]:
        """(name, property, value, source) of every property of ``names``, user properties included."""
        if not names:
            return []
        out = zfs("get", "-H", "-p", "-o", "name,property,source,value", "all", *names).stdout
        rows = []
        for line in out.splitlines():  # the value last: a value with newlines only continues on lines skipped here
            fields = line.split("\t", 3)
            if len(fields) == 4 and fields[0] in names:
                rows.append((fields[0], fields[1], fields[3], fields[2]))
        return rows

    def _baseline(self, dataset: str) -> set[tuple[str, str, str]]:
        """What the checks after a receive compare with: the dataset's received properties and its
        keylocation (an administrator may have set one on a copy) before the stream came."""
        return {(n, p, v) for n, p, v, source in self._properties(dataset) if source == "received" or p == "keylocation"}

    def _make_parents(self, dataset: str) -> list[str]:
        """Create the datasets between the root and ``dataset`` with ``canmount=off`` (``zfs create
        -p`` would ignore ``-o`` for them and mount each one); returns those it created."""
        parts = dataset[len(self.root) + 1 :].split("/")[:-1]
        prefixes = [f"{self.root}/{'/'.join(parts[: i + 1])}" for i in range(len(parts))]
        if not prefixes:
            return []
        existing = set(zfs("list", "-H", "-o", "name", *prefixes, check=False).stdout.splitlines())
        created: list[str] = []
        try:
            for prefix in prefixes:
                if prefix not in existing:
                    zfs("create", "-o", "canmount=off", prefix)
                    created.append(prefix)
        except BaseException:
            self._remove_parents(created)
            raise
        return created

    def _remove_parents(self, created: Sequence[str]) -> list[str]:
        """Destroy parents this store created for a receive that kept nothing, deepest first; one that
        has children by now (another receive's) stays. Never recursive."""
        failures = []
        for prefix in reversed(created):
            result = zfs("destroy", prefix, check=False)
            if result.returncode != 0:
                failures.append(f"{prefix}: {result.stderr.strip()}")
        return failures

    def _check_force(self, force: bool) -> None:
        if force and self.append_only:
            raise StoreRefused(
                "this store is append-only: a forced receive (zfs receive -F, asked for by on_diverged = \"rollback\") "
                "could roll back or destroy copies; use on_diverged = \"refuse\" for this target"
            )

    def _receive_argv(self, dataset: str, force: bool, stream: StreamBegin | None = None, snapshot: str | None = None) -> list[str]:
        """``zfs receive`` into ``dataset`` (or exactly ``dataset@snapshot``) with the properties that
        act on this host excluded; ``force`` (``-F``, rollback) is refused on an append-only store."""
        self._check_force(force)
        argv = ["zfs", "receive", "-s", "-u", "-h", *(["-F"] if force else []), "-o", "canmount=noauto"]
        excluded = EXCLUDED if stream is not None and stream.raw else EXCLUDED + EXCLUDED_UNLESS_RAW
        for prop in excluded:
            argv += ["-x", prop]
        if snapshot is not None:
            check_snapshot_name(snapshot)
        return argv + [dataset if snapshot is None else f"{dataset}@{snapshot}"]

    def _run_receive(
        self,
        dataset: str,
        stdin: int,
        compress: str,
        force: bool,
        *,
        inspect: Callable[[StreamBegin], None] = check_single,
        prepare: Callable[[], None] | None = None,
        snapshot: str | None = None,
    ) -> StreamBegin:
        """Read the stream's first record, let ``inspect`` refuse it, run ``prepare`` (parents), then
        hand the record and the rest of the stream to ``zfs receive`` by splicing."""
        procs: list[Proc] = []
        receiver: Proc | None = None
        try:
            feed = stdin
            if compress == "zstd":
                procs.append(Proc.start(["zstd", "-d", "-q", "-c"], stdin=stdin, stdout=-1, label="zstd -d (target)"))
                assert procs[0].popen.stdout is not None
                feed = procs[0].popen.stdout.fileno()
            try:
                begin = parse_begin(_read_exactly(feed, BEGIN_SIZE, self.stall))
                inspect(begin)
            except BaseException:
                for p in procs:
                    p.kill()
                for p in procs:
                    p.wait()
                if procs and procs[0].popen.returncode not in (0, -9):
                    finish(procs)  # zstd's own complaint (not zstd data) says more than ours
                raise
            if prepare is not None:
                prepare()
            read_end, write_end = os.pipe()
            try:
                argv = self._receive_argv(dataset, force, begin, snapshot)
                receiver = Proc.start(argv, stdin=read_end, label="zfs receive")
            finally:
                os.close(read_end)
            cut = False
            try:
                os.write(write_end, begin.record)  # 312 bytes: always fits in an empty pipe
                _forward(feed, write_end, self.stall)
            except BrokenPipeError:
                cut = True  # zfs receive stopped reading: its exit status says why
            except BaseException:
                receiver.kill()
                for p in procs:
                    p.kill()
                raise
            finally:
                os.close(write_end)
            if cut:
                for p in procs:
                    p.kill()  # zstd would wait forever on a reader that is gone
                finish([receiver, *procs])
            else:
                finish([*procs, receiver])
            return begin
        finally:
            for p in [*procs, *([receiver] if receiver is not None else [])]:
                if p.popen.poll() is None:
                    p.kill()
                    p.wait()
                if p.popen.stdout is not None:
                    p.popen.stdout.close()
                p.close()

    def receive(
        self, rel: str, name: str, guid: str, stdin: int, compress: str = "none", force: bool = False,
        then: Sequence[tuple[str, str]] = (),
    ) -> dict[str, object]:
        """Receive one stream as ``name``; it must arrive with the source's ``guid``. No chains
        (``capabilities.chained_send`` is off): ``then`` is refused before the stream is read.

        Refused before anything lands unless the stream is a single snapshot ``name`` with ``guid``,
        full when the copy does not exist yet, else incremental from one of its snapshots. After the
        receive, anything unexpected (another snapshot, a child dataset, a received property) makes
        it destroy what it created and refuse.
        """
        check_name(name)
        check_snapshot_name(name)
        if then:
            raise Refused("this ZFS target receives one snapshot per stream; send the others one by one")
        self._check_force(force)  # before the stream is read
        dataset = self.dataset(rel)
        before = self._tree(dataset)
        if before is not None and before.token is not None:
            raise BackendError(f"{dataset} has an interrupted receive; resume or abort it first")
        if before is not None and f"{dataset}@{name}" in before.snapshots:
            raise BackendError(f"{rel}@{name} already exists on the target")
        had = set() if before is None else set(before.snapshots_of(dataset).values())
        before_props = set() if before is None else self._baseline(dataset)
        created: list[str] = []

        def inspect(begin: StreamBegin) -> None:
            check_single(begin)
            if begin.snapshot != name:
                raise StoreRefused(f"the stream is of {begin.toname}, not of a snapshot named {name}; refused")
            if not guid.isdigit() or begin.toguid != int(guid):
                raise StoreRefused(f"the stream of {begin.toname} carries guid {begin.toguid}, not {guid}; refused")
            if begin.resuming:
                raise StoreRefused(f"the stream of {begin.toname} continues an interrupted send; it was not asked for")
            if before is None and begin.fromguid != 0:
                raise StoreRefused(f"{dataset} does not exist, and the stream of {begin.toname} is incremental; refused")
            if before is not None and begin.fromguid == 0:
                raise StoreRefused(f"{dataset} exists, and the stream of {begin.toname} is a full stream that would replace it; refused")
            if before is not None and str(begin.fromguid) not in had:
                raise StoreRefused(
                    f"the stream of {begin.toname} builds on a snapshot (guid {begin.fromguid}) that {dataset} does not have; refused"
                )

        def prepare() -> None:
            if before is None:  # a full receive creates the dataset, below parents that must exist
                self.check_root()
                created.extend(self._make_parents(dataset))

        try:
            self._run_receive(dataset, stdin, compress, force, inspect=inspect, prepare=prepare, snapshot=name)
        except BaseException:
            self._after_failure(dataset, before, created)
            raise
        self._verify(dataset, before, before_props, created, name, guid)
        return {"name": name, "path": f"{rel}/{name}", "removed_partials": [], "received": [name]}

    def resume(self, rel: str, stdin: int, compress: str = "none") -> dict[str, object]:
        """Finish an interrupted receive from a stream the source produced with ``zfs send -t``."""
        dataset = self.dataset(rel)
        before = self._tree(dataset)
        if before is None or before.token is None:
            raise BackendError(f"{dataset}: nothing to resume (no receive_resume_token)")
        wanted = _token_target(before.token)
        before_props = self._baseline(dataset)

        def inspect(begin: StreamBegin) -> None:
            check_single(begin)
            if not begin.resuming:
                raise StoreRefused(f"the stream of {begin.toname} does not continue an interrupted send; refused")
            if wanted is not None and (begin.toname, begin.toguid) != wanted:
                raise StoreRefused(
                    f"the stream continues {begin.toname} (guid {begin.toguid}), but the interrupted receive into {dataset} "
                    f"is of {wanted[0]} (guid {wanted[1]}); refused"
                )

        begin = self._run_receive(dataset, stdin, compress, force=False, inspect=inspect)
        if not before.snapshots_of(dataset):  # a resumed full receive: the dataset is this receive's own
            before = _Tree(before.datasets - {dataset}, before.snapshots, None)
        self._verify(dataset, before, before_props, [], begin.snapshot, str(begin.toguid))
        return {"name": begin.snapshot, "path": f"{rel}/{begin.snapshot}", "removed_partials": []}

    def _verify(
        self, dataset: str, before: _Tree | None, before_props: set[tuple[str, str, str]], created: list[str], name: str, guid: str
    ) -> None:
        """Exactly ``dataset@name`` with ``guid`` arrived, and nothing else; else undo and refuse."""
        after = self._tree(dataset)
        problems = []
        expected = f"{dataset}@{name}"
        old = set() if before is None else set(before.snapshots)
        new = {full: g for full, g in (after.snapshots.items() if after else []) if full not in old}
        if set(new) != {expected}:
            problems.append(f"it produced {', '.join(sorted(new)) or 'no snapshot'}, expected {expected}")
        elif new[expected] != guid:
            problems.append(f"{expected} arrived with guid {new[expected]}, expected {guid}")
        children = sorted((after.datasets if after else set()) - {dataset} - (before.datasets if before else set()))
        if children:
            problems.append(f"it created other datasets: {', '.join(children)}")
        if after is not None and not problems:
            try:
                props = self._properties(dataset, expected)
            except BackendError as e:
                props = []
                problems.append(f"its properties cannot be read ({e})")
            received = {(n, p, v) for n, p, v, s in props if s == "received"} - before_props
            if received:
                problems.append("it set properties: " + ", ".join(f"{p}={_shown(v)} on {n}" for n, p, v in sorted(received)))
            keylocation = [(n, p, v) for n, p, v, _ in props if n == dataset and p == "keylocation"]
            if keylocation and keylocation[0] not in before_props and keylocation[0][2] not in SAFE_KEYLOCATIONS:
                problems.append(f"it set keylocation={_shown(keylocation[0][2])}")
        if not problems:
            return
        undone = self._undo(dataset, before, after, created)
        raise StoreRefused(f"refused the stream received into {dataset}: {'; '.join(problems)}; {undone}")

    def _undo(self, dataset: str, before: _Tree | None, after: _Tree | None, created: Sequence[str]) -> str:
        """Destroy exactly what appeared between ``before`` and ``after``: new snapshots of datasets
        that existed, new datasets (their snapshots first, deepest first), then the parents made for
        them. Each destroy names one dataset or snapshots of one dataset; never ``-r``."""
        gone, failures = [], []
        old_sets = set() if before is None else before.datasets
        old_snaps = set() if before is None else set(before.snapshots)
        if after is not None:
            new_sets = sorted(after.datasets - old_sets, key=lambda d: -d.count("/"))
            by_dataset: dict[str, list[str]] = {}
            for full in after.snapshots:
                if full not in old_snaps:
                    by_dataset.setdefault(full.partition("@")[0], []).append(full.partition("@")[2])
            order = [d for d in by_dataset if d not in new_sets] + [d for d in new_sets]
            for ds in order:
                names = by_dataset.get(ds, [])
                if names:
                    result = zfs("destroy", f"{ds}@{','.join(names)}", check=False)
                    if result.returncode != 0:
                        failures.append(f"{ds}@{','.join(names)}: {result.stderr.strip()}")
                        continue
                    gone += [f"{ds}@{n}" for n in names]
                if ds in new_sets:
                    result = zfs("destroy", ds, check=False)
                    if result.returncode != 0:
                        failures.append(f"{ds}: {result.stderr.strip()}")
                        continue
                    gone.append(ds)
        if not failures and (after is None or dataset not in after.datasets or dataset in gone):
            failures += self._remove_parents(created)
            gone += [p for p in created if not any(f.startswith(p + ":") for f in failures)]
        text = f"removed {', '.join(gone)}" if gone else "nothing of it was kept"
        if failures:
            text += f"; could not remove {'; '.join(failures)}: remove it by hand"
        return text

    def _after_failure(self, dataset: str, before: _Tree | None, created: list[str]) -> None:
        """A receive that failed (or was refused) keeps nothing but a resumable state: a snapshot that
        landed anyway is destroyed; a dataset it created is kept only while it carries a resume
        token; parents made for it go when the dataset did not stay."""
        try:
            after = self._tree(dataset)
            landed = after is not None and any(full not in (before.snapshots if before else {}) for full in after.snapshots)
            resumable = after is not None and after.token is not None and not landed
            if landed or (after is not None and before is None and not resumable):
                self._undo(dataset, before, after, created)
            elif after is None and created:
                self._remove_parents(created)
        except BackendError:
            pass  # the receive's own error is what the caller needs; the next run looks again

    def delete_partials(self, rel: str, names: list[str]) -> list[str]:
        """Abandon an interrupted receive (``zfs receive -A``): its resume token no longer fits.

        Allowed on an append-only store: it discards only the incomplete state of a receive that
        never finished (a completed snapshot is never touched), and refusing it would leave the
        copy unable to take any further snapshot.
        """
        dataset = self.dataset(rel)
        if self._listing(dataset)[1] is None:
            return []
        zfs("receive", "-A", dataset)
        return ["(resumable receive state)"]

    def delete(self, rel: str, names: list[str], allow_writable: bool = False) -> list[str]:
        """Destroy copies by name in one batched ``zfs destroy``. The batch fails whole when one of
        them cannot go (a hold, a clone): then each is destroyed alone, so one refusal keeps no other,
        and :class:`PartialDelete` names each one left and carries what went."""
        if self.append_only:
            raise StoreRefused("this store is append-only: it never destroys a copy; prune on the target itself")
        for name in names:
            check_name(name)
            check_snapshot_name(name)
        dataset = self.dataset(rel)
        present = {c.name for c in self._listing(dataset)[0]}
        doomed = [n for n in dict.fromkeys(names) if n in present]
        if not doomed:
            return []
        if zfs("destroy", f"{dataset}@{','.join(doomed)}", check=False).returncode == 0:
            return doomed
        still = {c.name for c in self._listing(dataset)[0]}
        deleted = [n for n in doomed if n not in still]
        left: list[str] = []
        for name in doomed:
            if name not in still:
                continue
            result = zfs("destroy", f"{dataset}@{name}", check=False)
            if result.returncode == 0:
                deleted.append(name)
                continue
            full, why = f"{dataset}@{name}", " ".join(result.stderr.split()) or f"zfs destroy exited {result.returncode}"
            holds = _holds(full)
            if holds:
                left.append(f"refusing to destroy {full}: held by {', '.join(holds)} (still needed by its holder)")
            else:
                left.append(why if full in why else f"cannot destroy {full}: {why}")
        if left:
            raise PartialDelete("; ".join(left), [n for n in doomed if n in deleted])
        return doomed


def _holds(full: str) -> list[str]:
    """The user holds on one snapshot, by tag (none when it cannot be asked)."""
    result = zfs("holds", "-H", full, check=False)
    return sorted(line.split("\t")[1] for line in result.stdout.splitlines() if line.count("\t") >= 2)


def _shown(value: str) -> str:
    """A value a stream chose, safe to put into a one-line message."""
    text = value.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 80 else text[:80] + "..."


def _token_target(token: str) -> tuple[str, int] | None:
    """The snapshot name and guid a resume token continues (``zfs send -nvt`` prints the token's
    contents before it looks for the snapshot, so this works on the receiving host too)."""
    try:
        dataset, name, guid = ZfsBackend(use_lzc=False).token_target(token)
    except BackendError:
        return None
    return f"{dataset}@{name}", int(guid)
