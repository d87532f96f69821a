"""The receiving side of replication on ZFS: copies of a source's snapshots below a root dataset.

Layout: ``<root>/<group>/<dataset key>@<snapshot>``, the key of :func:`snapsync.protocol.dataset_key`
with the characters ZFS refuses in names (``%+=@``) escaped by :func:`zfs_component`.

ZFS commits a received snapshot atomically: until ``zfs receive`` finishes, the snapshot does not
exist. An interrupted ``receive -s`` leaves a ``receive_resume_token`` on the dataset instead of a
partial copy; the next run resumes from it (``zfs send -t``) rather than starting over. Streams are
received unmounted (``-u``, ``canmount=noauto``) so nothing on the target writes to them, and with
``-F`` only when the target's policy allows rollback. A received snapshot keeps the source's guid,
which is what the planner matches on.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from snapsync.backends.zfs import LIST_FIELDS, check_snapshot_name, zfs
from snapsync.errors import BackendError, CommandFailed
from snapsync.protocol import Refused, check_name, check_path
from snapsync.store import Copy
from snapsync.streams import Proc, finish

_ESCAPES = {":": ":3A", "%": ":", "+": ":2B", "=": ":3D", "@": ":40"}
_DATASET = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.: -]*(/[A-Za-z0-9_.: -]+)*")


def is_dataset_name(name: str) -> bool:
    return _DATASET.fullmatch(name) is not None


def zfs_component(part: str) -> str:
    """A dataset-key component as a ZFS name component (bijective: ``:`` is escaped first)."""
    return "".join(_ESCAPES.get(c, c) for c in part)


class ZfsStore:
    """Copies below the dataset ``root``; every path a caller passes is relative and validated here."""

    def __init__(self, root: str) -> None:
        if not is_dataset_name(root):
            raise BackendError(f"target root {root!r} is not a ZFS dataset name")
        self.root = root

    def dataset(self, rel: str) -> str:
        check_path(rel)
        return self.root + "/" + "/".join(zfs_component(p) for p in rel.split("/"))

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

    def _make_parents(self, dataset: str) -> None:
        """Create the datasets between the root and ``dataset`` with ``canmount=off`` (``zfs create
        -p`` would ignore ``-o`` for them and mount each one)."""
        parts = dataset[len(self.root) + 1 :].split("/")[:-1]
        prefixes = [f"{self.root}/{'/'.join(parts[: i + 1])}" for i in range(len(parts))]
        if not prefixes:
            return
        existing = set(zfs("list", "-H", "-o", "name", *prefixes, check=False).stdout.splitlines())
        for prefix in prefixes:
            if prefix not in existing:
                zfs("create", "-o", "canmount=off", prefix)

    def _receive_argv(self, dataset: str, force: bool) -> list[str]:
        return ["zfs", "receive", "-s", "-u", *(["-F"] if force else []), "-o", "canmount=noauto", dataset]

    def _run_receive(self, dataset: str, stdin: int, compress: str, force: bool) -> None:
        procs: list[Proc] = []
        try:
            feed = stdin
            if compress == "zstd":
                procs.append(Proc.start(["zstd", "-d", "-q", "-c"], stdin=stdin, stdout=-1, label="zstd -d (target)"))
                assert procs[0].popen.stdout is not None
                feed = procs[0].popen.stdout.fileno()
            procs.append(Proc.start(self._receive_argv(dataset, force), stdin=feed, label="zfs receive"))
            if compress == "zstd":
                assert procs[0].popen.stdout is not None
                procs[0].popen.stdout.close()
            finish(procs)
        finally:
            for p in procs:
                p.close()

    def receive(self, rel: str, name: str, guid: str, stdin: int, compress: str = "none", force: bool = False) -> dict[str, object]:
        """Receive one stream as ``name``; it must arrive with the source's ``guid``."""
        check_name(name)
        check_snapshot_name(name)
        dataset = self.dataset(rel)
        before, token, exists = self._state(dataset)
        if token is not None:
            raise BackendError(f"{dataset} has an interrupted receive; resume or abort it first")
        if any(c.name == name for c in before):
            raise BackendError(f"{rel}@{name} already exists on the target")
        if not exists:  # a full receive creates the dataset, below parents that must exist
            self.check_root()
            self._make_parents(dataset)
        self._run_receive(dataset, stdin, compress, force)
        arrived = zfs("list", "-H", "-p", "-o", "guid", f"{dataset}@{name}", check=False).stdout.strip()
        if arrived != guid:
            raise BackendError(f"zfs receive into {dataset} did not produce {name} with guid {guid} (found {arrived or 'nothing'})")
        return {"name": name, "path": f"{rel}/{name}", "removed_partials": []}

    def resume(self, rel: str, stdin: int, compress: str = "none") -> dict[str, object]:
        """Finish an interrupted receive from a stream the source produced with ``zfs send -t``."""
        dataset = self.dataset(rel)
        before, token = self._listing(dataset)
        if token is None:
            raise BackendError(f"{dataset}: nothing to resume (no receive_resume_token)")
        self._run_receive(dataset, stdin, compress, force=False)
        after = self.copies(rel)
        new = sorted({c.name for c in after} - {c.name for c in before})
        if len(new) != 1:
            raise BackendError(f"resumed receive into {dataset} produced {new or 'nothing'}, expected one snapshot")
        return {"name": new[0], "path": f"{rel}/{new[0]}", "removed_partials": []}

    def delete_partials(self, rel: str, names: list[str]) -> list[str]:
        """Abandon an interrupted receive (``zfs receive -A``): its resume token no longer fits."""
        dataset = self.dataset(rel)
        if self._listing(dataset)[1] is None:
            return []
        zfs("receive", "-A", dataset)
        return ["(resumable receive state)"]

    def delete(self, rel: str, names: list[str], allow_writable: bool = False) -> list[str]:
        """Destroy copies by name in one batched ``zfs destroy``; held ones make it fail whole."""
        for name in names:
            check_name(name)
            check_snapshot_name(name)
        dataset = self.dataset(rel)
        present = {c.name for c in self._listing(dataset)[0]}
        doomed = [n for n in dict.fromkeys(names) if n in present]
        if not doomed:
            return []
        try:
            zfs("destroy", f"{dataset}@{','.join(doomed)}")
        except CommandFailed as e:
            raise BackendError(f"cannot destroy copies in {dataset}: {e.stderr.strip()}") from e
        return doomed

