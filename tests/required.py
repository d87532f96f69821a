"""What a tier needs from the machine: CI installs all of it (install.sh), so there a missing piece
fails the tier instead of skipping it and hiding that it never ran."""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest


def missing(what: str, how: str = "install.sh installs it") -> NoReturn:
    if os.environ.get("CI") == "true" or os.environ.get("SNAPSYNC_REQUIRE_BTRFS") == "1":
        pytest.fail(f"{what} is missing ({how})")
    pytest.skip(f"{what} is missing ({how})")


def tool(name: str, path: str | None = None) -> str:
    """The program's path, looked up on PATH (or ``path``)."""
    found = shutil.which(name) or (shutil.which(name, path=path) if path else None)
    if found is None:
        missing(name)
    return found
