"""Whether a rollback of a group is unfinished, read from its journal.

``check``, ``snapshot`` and ``run`` ask on every run (a dataset of the group may be missing until it
is finished), so this stays apart from :mod:`snapsync.recovery.rollback` and what it loads.
"""

from __future__ import annotations

from pathlib import Path

from snapsync.errors import SnapsyncError
from snapsync.host.state import read_json, state_dir


def journal_path(group: str) -> Path:
    return state_dir() / "rollback" / f"{group}.json"


def unfinished(group: str) -> str | None:
    """The snapshot an interrupted rollback of ``group`` was returning to; None when none is unfinished.

    Until it is finished a dataset of the group may be missing (moved aside, not yet replaced):
    whatever fails for that reason says so and how to finish (``check``, ``snapshot``, ``run``).
    """
    try:
        pending = read_json(journal_path(group))
    except SnapsyncError:
        return None
    return str(pending["snapshot"]) if pending and pending.get("snapshot") else None


def unfinished_text(group: str, snapshot: str) -> str:
    return (
        f"an interrupted rollback of group {group} to {snapshot} is unfinished; run `snapsync rollback {group} {snapshot}` "
        f"to finish it (or `snapsync rollback {group} --abort` to undo it)"
    )
