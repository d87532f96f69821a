"""Benches measure snapsync as it runs installed: from byte-compiled modules.

pip and Nix install the ``.pyc`` files with the package. A checkout has them only where Python could
write them, and with ``PYTHONDONTWRITEBYTECODE`` set (as on the development and CI machines) every
process compiles again each module whose ``.pyc`` is missing or older than its source: about 100 ms of
every command and 40 ms of every ``serve`` session here, which no installed snapsync pays.
"""

from __future__ import annotations

import compileall
import sys
from pathlib import Path


def compile_checkout(repo: Path) -> None:
    """Write current ``.pyc`` files for ``repo``'s package (the flag stops imports writing them, not this)."""
    if not compileall.compile_dir(str(repo / "snapsync"), quiet=1):
        sys.exit(f"bench: cannot byte-compile {repo / 'snapsync'}")
