"""One factory per backend; every test in this folder runs unchanged against each of them.

A backend joins the suite by adding a factory to FACTORIES. SNAPSYNC_CONTRACT_BACKENDS selects which
run (default: btrfs; the ZFS guest runs this same suite with ``zfs,zfs-cli``: libzfs_core, and the
``zfs`` command alone). ZFS needs a pool: SNAPSYNC_ZFS_POOL names one the suite may create datasets in.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from snapsync.backends.base import SnapshotInfo, StorageBackend


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
