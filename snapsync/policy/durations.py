"""Durations as people write them in policy files: ``90m``, ``36h``, ``7d``, ``2w``, ``1d12h``.

Only fixed-length units: a "month" or "year" is a calendar period, not a duration, and retention
counts those as buckets, so they are deliberately not accepted here. At most ``MAX_DURATION`` (100
years): every duration is added to or subtracted from a date or turned into a timeout somewhere, and
beyond that Python's dates and the kernel's timers overflow.
"""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"([0-9]+)([smhdw])")
_WHOLE = re.compile(r"(?:[0-9]+[smhdw])+")
MAX_DURATION = timedelta(days=36500)
"""100 years."""


def parse_duration(text: str) -> timedelta:
    """Parse ``1d12h`` style text; raise ValueError with a message fit for a policy error."""
    shown = repr(text[:40])
    if len(text) > 40:
        shown = f"{shown[:-1]}...{shown[-1]}"
    compact = text.strip(" \t\r\n").lower().replace(" ", "")
    if not compact or not _WHOLE.fullmatch(compact):
        raise ValueError(
            f"invalid duration {shown}: use a number and a unit s, m, h, d or w, e.g. '90m', '36h', '1d12h'"
        )
    seconds = 0
    for n, u in _PART.findall(compact):
        digits = n.lstrip("0") or "0"
        if len(digits) > 12:  # over 100 years in any unit, and int() refuses thousands of digits
            raise ValueError(f"invalid duration {shown}: at most 100 years ('36500d')")
        seconds += int(digits) * _UNITS[u]
    if seconds <= 0:
        raise ValueError(f"invalid duration {shown}: must be longer than zero")
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"invalid duration {shown}: at most 100 years ('36500d')")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """The shortest ``1d12h`` form of a duration; inverse of :func:`parse_duration`."""
    seconds = int(delta.total_seconds())
    if seconds <= 0:
        return "0s"
    out = []
    for unit, size in sorted(_UNITS.items(), key=lambda kv: -kv[1]):
        n, seconds = divmod(seconds, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)
