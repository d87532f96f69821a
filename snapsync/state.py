"""Where snapsync keeps what it must remember between runs: drill results, an unfinished rollback.

``$SNAPSYNC_STATE_DIR``, default ``/var/lib/snapsync`` (on NixOS with impermanence, persist it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def state_dir() -> Path:
    return Path(os.environ.get("SNAPSYNC_STATE_DIR", "/var/lib/snapsync"))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically, and durably: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
