"""Sizes and rates as people write them in policy files: ``64M``, ``10M`` (bytes per second).

K, M and G are powers of 1024. The policy parses them once, at load; everything after that works
with the number of bytes.
"""

from __future__ import annotations

import re

SIZE = re.compile(r"[0-9]{1,12}[KMG]?")
"""At most twelve digits: a terabyte per second is well inside, and int() never sees thousands of digits."""
_UNITS = {"G": 1 << 30, "M": 1 << 20, "K": 1 << 10}


def parse_size(text: str) -> int:
    """``"4M"`` -> 4194304. ``text`` must match :data:`SIZE` (the schema checks that first, for its message)."""
    if text[-1:] in _UNITS:
        return int(text[:-1]) * _UNITS[text[-1]]
    return int(text)


def format_size(size: int) -> str:
    """The shortest exact ``4M`` form of a size; inverse of :func:`parse_size`."""
    for unit, factor in _UNITS.items():
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)
