"""Snapshot names: ``<prefix>_<YYYY-MM-DDTHH:MM:SSZ>``, always UTC, so names sort by time.

A name that does not match the group's prefix exactly is foreign: snapsync never prunes it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from functools import lru_cache

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def snapshot_name(prefix: str, when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("snapshot times must be timezone-aware")
    return f"{prefix}_{when.astimezone(UTC).strftime(TIME_FORMAT)}"


@lru_cache(maxsize=64)
def _pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"_(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")


def parse_snapshot_name(prefix: str, name: str) -> datetime | None:
    """The UTC time encoded in ``name``, or None when the name is not one of ours."""
    m = _pattern(prefix).fullmatch(name)
    if not m:
        return None
    try:
        return datetime.fromisoformat(m.group(1))  # the pattern pins the format; this checks the calendar
    except ValueError:
        return None
