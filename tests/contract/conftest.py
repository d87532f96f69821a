"""One factory per backend; every test in this folder runs unchanged against each of them.

A backend joins the suite by adding a factory to FACTORIES (the source half) and one to RECEIVING (a
receiving place of the same filesystem, fed by that source). SNAPSYNC_CONTRACT_BACKENDS selects which
run (default: btrfs; the ZFS guest runs this same suite with ``zfs,zfs-cli``: libzfs_core, and the
``zfs`` command alone). ZFS needs a pool: SNAPSYNC_ZFS_POOL names one the suite may create datasets in.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from snapsync.backends import receiver_for
from snapsync.backends.base import SnapshotInfo, StorageBackend
from snapsync.backends.receiver import Receiver


@dataclass
class BackendEnv:
    backend: StorageBackend
    new_dataset: Callable[[str], str]
    """Create an empty dataset whose last name component is the argument; return its dataset id."""
    missing_dataset: str
    write: Callable[[str, str, str], None]
    """write(dataset, file name, text) into the live dataset."""
    read: Callable[[SnapshotInfo, str], str]
    """read(snapshot, file name) from inside a snapshot."""
    plant_intruder: Callable[[str, str], None] | None
    """Put something that is NOT a read-only snapshot under that name in the dataset's snapshot
    namespace, or None where the filesystem cannot have such a thing."""
    name_ok: Callable[[str], bool] = field(default=lambda leaf: True)
    """Whether the filesystem allows this dataset name at all (ZFS names are ASCII only)."""


@contextmanager
def _btrfs_env(request: pytest.FixtureRequest) -> Iterator[BackendEnv]:
    root: Path = request.getfixturevalue("btrfs_root")
    import btrfsutil

    from snapsync.backends.btrfs import BtrfsBackend

    backend = BtrfsBackend()
    top = root / "persist"
    top.mkdir()

    def new_dataset(leaf: str) -> str:
        path = top / leaf
        btrfsutil.create_subvolume(path)
        return str(path)

    def write(dataset: str, name: str, text: str) -> None:
        (Path(dataset) / name).write_text(text)

    def read(snap: SnapshotInfo, name: str) -> str:
        return (Path(snap.location) / name).read_text()

    def plant_intruder(dataset: str, name: str) -> None:
        home = Path(backend.snapshot_home(dataset))
        home.mkdir(parents=True, exist_ok=True)
        btrfsutil.create_subvolume(home / name)

    yield BackendEnv(backend, new_dataset, str(top / "does-not-exist"), write, read, plant_intruder)


def _zfs(*args: str) -> str:
    return subprocess.run(["zfs", *args], check=True, capture_output=True, text=True).stdout


def _zfs_env(use_lzc: bool) -> Callable[[pytest.FixtureRequest], AbstractContextManager[BackendEnv]]:
    @contextmanager
    def make(request: pytest.FixtureRequest) -> Iterator[BackendEnv]:
        from snapsync.backends.zfs import ZfsBackend

        pool = os.environ.get("SNAPSYNC_ZFS_POOL")
        if not pool:
            pytest.skip("SNAPSYNC_ZFS_POOL is not set (the vm-tests guest sets it)")
        backend = ZfsBackend(use_lzc=use_lzc)
        if use_lzc and backend.lzc is None:
            pytest.fail("libzfs_core (python3-pyzfs) is not importable")
        parent = f"{pool}/contract-{uuid.uuid4().hex[:8]}"
        _zfs("create", parent)

        def new_dataset(leaf: str) -> str:
            _zfs("create", f"{parent}/{leaf}")
            return f"{parent}/{leaf}"

        def mountpoint(dataset: str) -> Path:
            return Path(_zfs("get", "-H", "-o", "value", "mountpoint", dataset).strip())

        def write(dataset: str, name: str, text: str) -> None:
            (mountpoint(dataset) / name).write_text(text)

        def read(snap: SnapshotInfo, name: str) -> str:
            return (mountpoint(snap.dataset) / ".zfs" / "snapshot" / snap.name / name).read_text()

        try:
            yield BackendEnv(
                backend, new_dataset, f"{parent}/does-not-exist", write, read, None,
                name_ok=lambda leaf: re.fullmatch(r"[A-Za-z0-9_.: -]+", leaf) is not None,
            )
        finally:
            subprocess.run(["zfs", "destroy", "-r", parent], capture_output=True)

    return make


FACTORIES: dict[str, Callable[[pytest.FixtureRequest], AbstractContextManager[BackendEnv]]] = {
    "btrfs": _btrfs_env,
    "zfs": _zfs_env(use_lzc=True),
    "zfs-cli": _zfs_env(use_lzc=False),
}
SELECTED = os.environ.get("SNAPSYNC_CONTRACT_BACKENDS", "btrfs").split(",")


@pytest.fixture(params=SELECTED)
def env(request: pytest.FixtureRequest) -> Iterator[BackendEnv]:
    with FACTORIES[request.param](request) as made:
        yield made


# --- the receiving half ---------------------------------------------------------------------------

_RECEIVE = "import sys; from snapsync.backends import receiver_for; receiver_for(sys.argv[1]).receive(*sys.argv[2:5], 0)"


@dataclass
class ReceiverEnv:
    """A receiving place and the source (of the same filesystem) whose real streams it receives."""

    source: BackendEnv
    place: str
    missing_place: str
    """A place that does not exist (its parent does)."""
    leftovers: Callable[[str], list[str]]
    """What interrupted receives left at ``<place>/<rel>``: staging, markers, resume state."""
    plant_foreign: Callable[[str, str], None]
    """Put something that did not arrive by receive under a copy's name at ``<place>/<rel>``."""
    foreign_present: Callable[[str, str], bool]
    refuse_delete: Callable[[str, str], Callable[[], None]]
    """Make the copy ``name`` at ``<place>/<rel>`` one the filesystem will not destroy, even with
    ``allow_writable``, as a person or another program on the target can; returns what undoes it."""
    tmp: Path

    def receiver(self, **options: Any) -> Receiver:
        return receiver_for(self.place, **options)

    def _stream_file(self, dataset: str, name: str, base: str | None) -> Path:
        path = self.tmp / f"{uuid.uuid4().hex}.stream"
        with path.open("wb") as out:
            subprocess.run(self.source.backend.send_argv(dataset, name, base), stdout=out, check=True)
        return path

    @contextmanager
    def stream(self, dataset: str, name: str, base: str | None = None) -> Iterator[int]:
        """A descriptor reading the source backend's real send stream of ``name`` (from ``base``)."""
        with self._stream_file(dataset, name, base).open("rb") as f:
            yield f.fileno()

    @contextmanager
    def command(self, argv: list[str]) -> Iterator[int]:
        """A descriptor reading what ``argv`` writes (a resumed send)."""
        path = self.tmp / f"{uuid.uuid4().hex}.stream"
        with path.open("wb") as out:
            subprocess.run(argv, stdout=out, check=True)
        with path.open("rb") as f:
            yield f.fileno()

    def interrupt(self, rel: str, snap: SnapshotInfo, base: str | None = None) -> None:
        """Receive ``snap`` in a process of its own that dies (SIGKILL) halfway through the stream,
        as a host does that crashes mid-receive: what it leaves is the filesystem's, not a cleanup's."""
        data = self._stream_file(snap.dataset, snap.name, base).read_bytes()
        proc = subprocess.Popen(
            [sys.executable, "-c", _RECEIVE, self.place, rel, snap.name, snap.guid],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        assert proc.stdin is not None
        proc.stdin.write(data[: len(data) // 2])
        proc.stdin.flush()
        proc.kill()
        proc.stdin.close()
        proc.wait()
        _wait_for_group(proc.pid)


def _wait_for_group(pgid: int, timeout: float = 60.0) -> None:
    """Until every process of the group has exited (zombies count as exited: init may be slow to reap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive = True
                break
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"the receiving processes of group {pgid} are still running after {timeout:g}s")


@contextmanager
def _btrfs_receiving(request: pytest.FixtureRequest, source: BackendEnv) -> Iterator[ReceiverEnv]:
    import btrfsutil

    place: Path = request.getfixturevalue("target_root")  # a btrfs of its own, like a backup disk

    def leftovers(rel: str) -> list[str]:
        return sorted(
            f"{d}/{e}" for d in (".incoming", ".receiving") if (place / rel / d).is_dir() for e in os.listdir(place / rel / d)
        )

    def plant_foreign(rel: str, name: str) -> None:
        """A read-only snapshot made on this host: it looks like a copy in every way but its origin."""
        made = place.parent / f"made-here-{name}"
        btrfsutil.create_subvolume(made)
        btrfsutil.create_snapshot(made, place / rel / name, read_only=True)

    def foreign_present(rel: str, name: str) -> bool:
        return (place / rel / name).is_dir() and bool(btrfsutil.is_subvolume(place / rel / name))

    def refuse_delete(rel: str, name: str) -> Callable[[], None]:
        """Changed on the target (writable, a file written) with a subvolume made inside it: the
        receiver refuses the first, the kernel the second (a subvolume with children, ENOTEMPTY)."""
        copy = place / rel / name
        btrfsutil.set_subvolume_read_only(copy, False)
        (copy / "changed-on-the-target").write_text("user data")
        btrfsutil.create_subvolume(copy / "nested")
        return lambda: btrfsutil.delete_subvolume(copy / "nested")

    yield ReceiverEnv(
        source, str(place), str(place / "does-not-exist"), leftovers, plant_foreign, foreign_present, refuse_delete,
        request.getfixturevalue("tmp_path"),
    )


@contextmanager
def _zfs_receiving(request: pytest.FixtureRequest, source: BackendEnv) -> Iterator[ReceiverEnv]:
    pool = os.environ["SNAPSYNC_ZFS_POOL"]
    place = f"{pool}/contract-recv-{uuid.uuid4().hex[:8]}"
    _zfs("create", "-o", "canmount=off", place)

    def leftovers(rel: str) -> list[str]:
        done = subprocess.run(["zfs", "get", "-H", "-o", "value", "receive_resume_token", f"{place}/{rel}"],
                              capture_output=True, text=True)
        return [] if done.returncode != 0 or done.stdout.strip() in ("-", "") else ["receive_resume_token"]

    def plant_foreign(rel: str, name: str) -> None:
        _zfs("create", "-o", "canmount=off", f"{place}/{rel}/{name}")  # a dataset where ZFS has no other place for it

    def foreign_present(rel: str, name: str) -> bool:
        return subprocess.run(["zfs", "list", "-H", f"{place}/{rel}/{name}"], capture_output=True).returncode == 0

    def refuse_delete(rel: str, name: str) -> Callable[[], None]:
        """A user hold, as ``zfs hold`` by an administrator (or a pulling host's session) makes it."""
        full = f"{place}/{rel}@{name}"
        _zfs("hold", "kept-by-hand", full)

        def undo() -> None:
            _zfs("release", "kept-by-hand", full)

        return undo

    try:
        yield ReceiverEnv(
            source, place, f"{pool}/contract-missing-{uuid.uuid4().hex[:8]}", leftovers, plant_foreign, foreign_present,
            refuse_delete, request.getfixturevalue("tmp_path"),
        )
    finally:
        subprocess.run(["zfs", "destroy", "-r", place], capture_output=True)


RECEIVING: dict[str, Callable[[pytest.FixtureRequest, BackendEnv], AbstractContextManager[ReceiverEnv]]] = {
    "btrfs": _btrfs_receiving,
    "zfs": _zfs_receiving,
    "zfs-cli": _zfs_receiving,
}


@pytest.fixture(params=SELECTED)
def receiving(request: pytest.FixtureRequest) -> Iterator[ReceiverEnv]:
    with FACTORIES[request.param](request) as source, RECEIVING[request.param](request, source) as made:
        yield made
