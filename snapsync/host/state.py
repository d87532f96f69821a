"""Where snapsync keeps what it must remember between runs: drill results, an unfinished rollback.

``$SNAPSYNC_STATE_DIR``, default ``/var/lib/snapsync`` (on NixOS with impermanence, persist it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from snapsync.host.safefs import private_dir, write_atomic


def state_dir() -> Path:
    return Path(os.environ.get("SNAPSYNC_STATE_DIR", "/var/lib/snapsync"))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically, and durably: a crash leaves the old file or the new one. The directory must be
    the running user's alone; nothing is written through a symlink (see :mod:`snapsync.host.safefs`)."""
    with private_dir(path.parent, own=1, create=True, mode=0o755) as dirfd:
        write_atomic(dirfd, path.name, (json.dumps(data, indent=1) + "\n").encode())


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
