"""One factory per backend; every test in this folder runs unchanged against each of them.

A backend joins the suite by adding a factory to FACTORIES. SNAPSYNC_CONTRACT_BACKENDS selects which
run (default: btrfs; the ZFS guest runs this same suite with ``zfs``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


def _btrfs_env(root: Path) -> BackendEnv:
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

    return BackendEnv(backend, new_dataset, str(top / "does-not-exist"), write, read, plant_intruder)


FACTORIES: dict[str, Callable[[Path], BackendEnv]] = {"btrfs": _btrfs_env}
SELECTED = os.environ.get("SNAPSYNC_CONTRACT_BACKENDS", "btrfs").split(",")


@pytest.fixture(params=SELECTED)
def env(request: pytest.FixtureRequest) -> Iterator[BackendEnv]:
    kind = request.param
    if kind == "btrfs":
        root = request.getfixturevalue("btrfs_root")
        yield FACTORIES[kind](root)
    else:
        yield FACTORIES[kind](Path(request.getfixturevalue("tmp_path")))
