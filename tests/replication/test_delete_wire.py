"""A delete over the wire that goes on past one refusal says which copies went."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import btrfsutil
import pytest

from snapsync.backends import receiver_for
from snapsync.backends.btrfs import BtrfsBackend
from snapsync.backends.receiver import PartialDelete
from snapsync.replication.peer import Peer
from snapsync.replication.transport import LocalTransport
from tests.conftest import make_subvolume

pytestmark = pytest.mark.btrfs

NAMES = ["snapsync_2026-11-26T12:00:00Z", "snapsync_2026-11-26T13:00:00Z", "snapsync_2026-11-26T14:00:00Z"]


def three_copies(btrfs_root: Path, target_root: Path, tmp_path: Path) -> None:
    ds = make_subvolume(btrfs_root / "src", "x")
    backend, receiver, base = BtrfsBackend(), receiver_for(str(target_root)), None
    for name in NAMES:
        (ds / name).write_text(name)
        (snap,) = backend.snapshot_group([str(ds)], name)
        stream = tmp_path / f"{name}.stream"
        with stream.open("wb") as out:
            subprocess.run(backend.send_argv(str(ds), name, base), stdout=out, check=True)
        with stream.open("rb") as f:
            receiver.receive("g/ds", name, snap.guid, f.fileno())
        base = name
    btrfsutil.set_subvolume_read_only(target_root / "g" / "ds" / NAMES[1], False)


def test_the_answer_names_what_went_and_the_refusal(btrfs_root: Path, target_root: Path, tmp_path: Path) -> None:
    three_copies(btrfs_root, target_root, tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "snapsync", "serve", "--root", str(target_root), "--role", "receive"],
        input=json.dumps({"v": 1, "op": "delete", "path": "g/ds", "names": NAMES}).encode() + b"\n",
        capture_output=True,
    )
    answer = json.loads(proc.stdout)
    assert proc.returncode == 1 and answer["ok"] is False and answer["kind"] == "failed"
    assert answer["deleted"] == [NAMES[0], NAMES[2]] and NAMES[1] in answer["error"]


def test_the_peer_raises_with_what_went(btrfs_root: Path, target_root: Path, tmp_path: Path) -> None:
    three_copies(btrfs_root, target_root, tmp_path)
    peer = Peer(LocalTransport("usb", str(target_root)), "receive")
    with pytest.raises(PartialDelete) as refused:
        peer.delete("g/ds", NAMES)
    assert refused.value.deleted == [NAMES[0], NAMES[2]] and NAMES[1] in str(refused.value)
