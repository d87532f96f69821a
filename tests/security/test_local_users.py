"""An unprivileged local user against snapsync running as root: every plant is made by a real
process running as ``nobody`` (``setpriv``), and root's run must refuse with one line naming the
path, without writing through the plant.

The places a user can reach: a lock directory, the directory above a backed-up subvolume (a home
directory) where ``.snapsync/`` lives, a shared metrics textfile directory, the state directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import btrfsutil
import pytest

from snapsync.backends.btrfs import BtrfsBackend
from snapsync.errors import UnsafePath
from snapsync.host.lock import file_lock, lock_dir
from snapsync.ops.metrics import write_textfile
from snapsync.host.state import write_json
from tests.conftest import make_subvolume
from tests.replication.helpers import snapsync, write_policy

NOBODY = 65534


def as_nobody(*argv: str) -> None:
    """Run one command as the unprivileged user, for real (the test's directories are opened for
    traversal so that it can reach the places it plants in)."""
    for arg in argv:
        if arg.startswith("/"):
            for parent in Path(arg).parents:
                if parent == Path("/"):
                    break
                if parent.exists() and parent.stat().st_uid == 0:
                    parent.chmod(parent.stat().st_mode | 0o001)
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to play the local user")
    subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv], check=True, capture_output=True)


def victim(tmp_path: Path) -> Path:
    """A root-only file the attacker would like root to overwrite."""
    path = tmp_path / "root-only"
    path.write_text("precious\n")
    path.chmod(0o600)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shared_dir(path: Path, mode: int = 0o1777) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    os.chmod(path.parent, 0o755)
    return path


def test_root_locks_live_in_a_private_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SNAPSYNC_LOCK_DIR", raising=False)
    assert lock_dir() == Path("/run/snapsync")


def test_a_lock_directory_made_by_another_user_is_refused(tmp_path: Path) -> None:
    shared = shared_dir(tmp_path / "run-lock")
    as_nobody("mkdir", "-m", "0777", str(shared / "snapsync"))
    with pytest.raises(UnsafePath, match="owned by uid 65534"):
        with file_lock(shared / "snapsync" / "policy.lock", 1.0, "test"):
            pass


def test_a_planted_lock_symlink_is_never_followed(tmp_path: Path) -> None:
    target = victim(tmp_path)
    before = digest(target)
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    os.symlink(target, locks / "policy.lock")
    with pytest.raises(UnsafePath, match="symlink"):
        with file_lock(locks / "policy.lock", 1.0, "test"):
            pass
    assert digest(target) == before


def test_cli_run_with_a_foreign_lock_directory_fails_loudly(btrfs_root: Path, tmp_path: Path) -> None:
    """Not exit 3 (another run holds the lock, which units treat as fine): an error monitoring sees."""
    data = make_subvolume(btrfs_root / "persist" / "app", "v0")
    policy = write_policy(tmp_path / "p.toml", [data], {})
    shared = shared_dir(tmp_path / "run-lock")
    as_nobody("mkdir", "-m", "0700", str(shared / "snapsync"))
    proc = snapsync("-p", str(policy), "run", env={"SNAPSYNC_LOCK_DIR": str(shared / "snapsync")})
    assert proc.returncode not in (0, 3), proc
    assert "owned by uid 65534" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (btrfs_root / "persist" / ".snapsync").exists()


def _home(btrfs_root: Path) -> tuple[Path, Path]:
    """A directory owned by the user, holding two subvolumes that root backs up as two groups."""
    home = btrfs_root / "home" / "alice"
    home.mkdir(parents=True)
    proj = make_subvolume(home / "proj", "mine")
    other = make_subvolume(btrfs_root / "srv" / "other", "theirs")
    os.chown(home, NOBODY, NOBODY)
    return proj, other


def test_a_user_cannot_point_snapshot_dir_into_another_group(btrfs_root: Path, tmp_path: Path) -> None:
    proj, other = _home(btrfs_root)
    backend = BtrfsBackend()
    backend.snapshot_group([str(other)], "snapsync_2026-12-01T00:00:00Z")
    other_dir = backend.snapshot_path(str(other))
    listed = sorted(os.listdir(other_dir))
    as_nobody("mkdir", str(proj.parent / ".snapsync"))
    as_nobody("ln", "-s", str(other_dir), str(proj.parent / ".snapsync" / "proj"))
    with pytest.raises(UnsafePath, match=r"\.snapsync: directory is owned by uid 65534"):
        backend.snapshot_group([str(proj)], "snapsync_2026-12-01T01:00:00Z")
    assert sorted(os.listdir(other_dir)) == listed


def test_a_symlinked_snapshot_dir_is_refused_even_below_roots_own_dir(btrfs_root: Path) -> None:
    """``.snapsync`` is root's, but a ``<name>`` symlink inside it (left from anywhere) is not followed."""
    proj, other = _home(btrfs_root)
    backend = BtrfsBackend()
    backend.snapshot_group([str(other)], "snapsync_2026-12-01T00:00:00Z")
    other_dir = backend.snapshot_path(str(other))
    snapdir = proj.parent / ".snapsync"
    snapdir.mkdir(mode=0o700)
    os.symlink(other_dir, snapdir / "proj")
    with pytest.raises(UnsafePath, match="symlink"):
        backend.snapshot_group([str(proj)], "snapsync_2026-12-01T01:00:00Z")
    with pytest.raises(UnsafePath, match="symlink"):
        backend.set_holds(str(proj), "target:nas", ["snapsync_2026-12-01T00:00:00Z"])
    assert backend.list_snapshots(str(other))[0].holds == ()
    assert sorted(os.listdir(other_dir)) == ["snapsync_2026-12-01T00:00:00Z"]


def test_a_planted_holds_temp_file_is_never_written_through(btrfs_root: Path, tmp_path: Path) -> None:
    proj, _ = _home(btrfs_root)
    target = victim(tmp_path)
    before = digest(target)
    as_nobody("mkdir", "-p", str(proj.parent / ".snapsync" / "proj"))
    as_nobody("ln", "-s", str(target), str(proj.parent / ".snapsync" / "proj" / ".holds.json.tmp"))
    with pytest.raises(UnsafePath):
        BtrfsBackend().set_holds(str(proj), "target:nas", ["x"])
    assert digest(target) == before


def test_holds_are_written_fresh_even_where_a_temp_name_is_taken(btrfs_root: Path, tmp_path: Path) -> None:
    """Root's own directory: a leftover (or planted by an earlier root-owned process) ``.tmp``
    symlink is ignored, the temporary file is always a new one."""
    data = make_subvolume(btrfs_root / "persist" / "app", "v0")
    backend = BtrfsBackend()
    backend.snapshot_group([str(data)], "snapsync_2026-12-01T00:00:00Z")
    directory = backend.snapshot_path(str(data))
    target = victim(tmp_path)
    before = digest(target)
    os.symlink(target, directory / ".holds.json.tmp")
    backend.set_holds(str(data), "target:nas", ["snapsync_2026-12-01T00:00:00Z"])
    assert digest(target) == before
    assert backend.list_snapshots(str(data))[0].holds == ("target:nas",)


def test_metrics_refuse_a_shared_textfile_directory(tmp_path: Path) -> None:
    textfiles = shared_dir(tmp_path / "textfiles")
    target = victim(tmp_path)
    before = digest(target)
    for n in range(64):
        as_nobody("ln", "-s", str(target), str(textfiles / f".snapsync.prom.{n}.tmp"))
    as_nobody("ln", "-s", str(target), str(textfiles / "snapsync.prom"))
    with pytest.raises(UnsafePath, match="writable by group or others"):
        write_textfile(textfiles / "snapsync.prom", {}, __import__("datetime").datetime.now(__import__("datetime").UTC), "h", policy="p")
    assert digest(target) == before


def test_metrics_replace_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    textfiles = tmp_path / "textfiles"
    textfiles.mkdir(mode=0o755)
    target = victim(tmp_path)
    before = digest(target)
    os.symlink(target, textfiles / "snapsync.prom")
    write_textfile(textfiles / "snapsync.prom", {}, datetime.now(UTC), "h", policy="p")
    assert digest(target) == before
    assert not (textfiles / "snapsync.prom").is_symlink()
    assert oct((textfiles / "snapsync.prom").stat().st_mode & 0o777) == oct(0o644)


def test_state_refuses_a_directory_of_another_user(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    with pytest.raises(UnsafePath, match="owned by uid 65534"):
        write_json(state / "drills.json", {"x": 1})


def test_snapshot_through_the_cli_names_the_planted_path(btrfs_root: Path, tmp_path: Path) -> None:
    proj, _ = _home(btrfs_root)
    as_nobody("mkdir", str(proj.parent / ".snapsync"))
    policy = write_policy(tmp_path / "p.toml", [proj], {})
    proc = snapsync("-p", str(policy), "snapshot", "app", env={"SNAPSYNC_LOCK_DIR": str(tmp_path / "locks")})
    assert proc.returncode == 1, proc
    assert ".snapsync: directory is owned by uid 65534" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert not any(btrfsutil.is_subvolume(p) for p in (proj.parent / ".snapsync").iterdir())


def test_metrics_stay_readable_by_node_exporter_under_a_strict_umask(tmp_path: Path) -> None:
    """The units run with UMask=0077; the textfile directory snapsync creates must still be 0755."""
    from datetime import UTC, datetime

    old = os.umask(0o077)
    try:
        write_textfile(tmp_path / "state" / "metrics" / "snapsync.prom", {}, datetime.now(UTC), "h", policy="p")
    finally:
        os.umask(old)
    (tmp_path / "state").chmod(0o755)
    assert oct((tmp_path / "state" / "metrics").stat().st_mode & 0o777) == oct(0o755)
    as_nobody("cat", str(tmp_path / "state" / "metrics" / "snapsync.prom"))
