"""Shared fixtures. Real btrfs only: a file-backed filesystem on a loop device, always unmounted.

Tests that need root skip without it, unless SNAPSYNC_REQUIRE_BTRFS=1 (CI sets it), where a skip
would hide a missing tier and so fails instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from typing import TYPE_CHECKING

import pytest

from snapsync.backends.scratch import scratch_btrfs

if TYPE_CHECKING:
    from tests.sshd import Sshd


@pytest.fixture(autouse=True)
def _quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries keep their count, but back off in milliseconds: tests wait for nothing."""
    monkeypatch.setenv("SNAPSYNC_RETRY_WAIT", "0.05")


@pytest.fixture(autouse=True)
def _private_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Drill results and unfinished rollbacks go to the test's own directory, not /var/lib/snapsync."""
    monkeypatch.setenv("SNAPSYNC_STATE_DIR", str(tmp_path / "snapsync-state"))


def _btrfs_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for loop-mounted btrfs"
    if shutil.which("mkfs.btrfs") is None:
        return "mkfs.btrfs not installed"
    return None


@pytest.fixture
def btrfs_root(tmp_path: Path) -> Iterator[Path]:
    """The mount point of a fresh 256 MiB btrfs."""
    reason = _btrfs_unavailable()
    if reason:
        if os.environ.get("SNAPSYNC_REQUIRE_BTRFS") == "1":
            pytest.fail(f"btrfs tier required but unavailable: {reason}")
        pytest.skip(reason)
    with scratch_btrfs("256M", parent=str(tmp_path), label="snapsync-test") as mnt:
        yield mnt


def interruptible() -> None:
    """``preexec_fn`` for a command a test stops with SIGINT, as a terminal's Ctrl-C would: a job started
    in the background by a non-interactive shell (a detached CI run) inherits SIGINT ignored, and
    Python then never raises KeyboardInterrupt, as the user's shell would not have set it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def make_subvolume(path: Path, content: str = "") -> Path:
    import btrfsutil

    path.parent.mkdir(parents=True, exist_ok=True)
    btrfsutil.create_subvolume(path)
    if content:
        (path / "data.txt").write_text(content)
    return path


def _require_btrfs() -> None:
    reason = _btrfs_unavailable()
    if reason:
        if os.environ.get("SNAPSYNC_REQUIRE_BTRFS") == "1":
            pytest.fail(f"btrfs tier required but unavailable: {reason}")
        pytest.skip(reason)


@pytest.fixture
def target_root(tmp_path: Path) -> Iterator[Path]:
    """A second, separate btrfs (the receiving host's disk), 256 MiB, with a root directory for copies."""
    _require_btrfs()
    with scratch_btrfs("256M", parent=str(tmp_path), label="snapsync-target") as mnt:
        root = mnt / "backups"
        root.mkdir()
        yield root


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.sshd import keygen

    return keygen(tmp_path_factory.mktemp("sshkey") / "id_ed25519")


@pytest.fixture
def sshd(tmp_path: Path, client_key: Path) -> Iterator[Sshd]:
    """A real sshd on 127.0.0.1 for this test; authorize keys with ``sshd.authorize(...)``."""
    from tests.sshd import Sshd, free_port, sshd_unavailable

    reason = sshd_unavailable()
    if reason:
        if os.environ.get("SNAPSYNC_REQUIRE_BTRFS") == "1":
            pytest.fail(f"ssh tier required but unavailable: {reason}")
        pytest.skip(reason)
    directory = tmp_path / "sshd"
    directory.mkdir()
    server = Sshd(directory, free_port(), client_key)
    server.start()
    try:
        yield server
    finally:
        server.stop()
