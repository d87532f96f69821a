"""A send that fails part way never counts as uploaded, and the next run converges."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from snapsync.backends.btrfs import BtrfsBackend
from snapsync.clock import ManualClock
from snapsync.offsite.upload import open_archive
from snapsync.policy.loader import parse_policy
from snapsync.recovery.restore import restore, verify
from snapsync.ops.runner import Runner
from snapsync.offsite.sealing import create_key_file
from tests.conftest import make_subvolume
from tests.replication.helpers import tree_digest, write_policy

pytestmark = pytest.mark.btrfs


def test_a_send_that_exits_non_zero_after_some_chunks_is_not_uploaded_then_redone(
    btrfs_root: Path, target_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = make_subvolume(btrfs_root / "app")
    (app / "data.bin").write_bytes(Path("/dev/urandom").open("rb").read(3 << 20))
    nas = btrfs_root / "nas"
    nas.mkdir()
    create_key_file(tmp_path / "k")
    path = write_policy(tmp_path / "p.toml", [app], {"nas": f'type = "dir"\npath = "{nas}"\nkey_file = "{tmp_path / "k"}"\nchunk_size = "1M"'})
    policy = parse_policy(path.read_text(), source=str(path))
    runner = Runner(policy, ManualClock(datetime(2026, 6, 1, tzinfo=UTC)))
    runner.run(policy.groups.values(), take=True, only_due=False, prune=False)

    real = BtrfsBackend.send_argv
    broken = ["sh", "-c", "head -c 2500000 /dev/urandom; echo 'ERROR: send ioctl failed' >&2; exit 3"]
    monkeypatch.setattr(BtrfsBackend, "send_argv", lambda self, *a: broken)
    (report,) = runner.run(policy.groups.values(), take=False, only_due=False, prune=True, replicate=True)
    (target,) = report.targets
    assert not target.ok and "exited 3" in target.errors[0] and "send ioctl failed" in target.errors[0]
    assert not list(nas.rglob("manifest.json"))
    assert len(list(nas.rglob("chunk-*"))) == 3  # 2.5 MB in 1 MiB chunks were stored before the exit status...
    assert list(nas.rglob("progress.json"))  # ...and recorded, so a later run could continue them

    monkeypatch.setattr(BtrfsBackend, "send_argv", real)
    (report,) = runner.run(policy.groups.values(), take=False, only_due=False, prune=True, replicate=True)
    (target,) = report.targets
    assert target.ok, target.errors
    assert any("cannot continue the unfinished upload (the stream's bytes differ); starting it again" in n for n in target.notes)
    assert not list(nas.rglob("progress.json"))
    archive = open_archive(policy.targets["nas"])  # type: ignore[arg-type]
    assert verify(archive, "nas").ok
    done = restore(archive, "nas", "app", str(target_root))
    (copy,) = list((target_root / "app").rglob(done.snapshot))
    assert tree_digest(copy) == tree_digest(app)
