"""What the security tests share: an honest copy received the way every receive runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import btrfsutil

from snapsync.backends.btrfs_receiver import BtrfsReceiver


def receive_snapshot(root: Path, rel: str, snapshot: Path) -> None:
    """``btrfs send`` of a real read-only snapshot into ``BtrfsReceiver(root)`` at ``rel``, as its name."""
    r, w = os.pipe()
    sender = subprocess.Popen(["btrfs", "send", "-q", str(snapshot)], stdout=w)
    os.close(w)
    try:
        BtrfsReceiver(root).receive(rel, snapshot.name, btrfsutil.subvolume_info(snapshot).uuid.hex(), r)
    finally:
        os.close(r)
        assert sender.wait() == 0
