"""The suites that run inside a guest against real OpenZFS 2.3: the backend contract (the same file
the host runs against btrfs) and the ZFS-specific tests in ``guest/``."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO, guest_pytest
from machine import Machine


def _collected_here(path: str) -> int:
    """How many tests the same suite has on the host (one backend): both sides run the same file."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", path],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "SNAPSYNC_CONTRACT_BACKENDS": "btrfs"})
    match = re.search(r"(\d+) tests? collected", done.stdout)
    assert match, done.stdout[-2000:]
    return int(match.group(1))


def _passed(output: str) -> int:
    match = re.search(r"(\d+) passed", output)
    return int(match.group(1)) if match else 0


ZFS_CANNOT = ("cannot hold a writable object in its snapshot namespace", "is not a valid dataset name on this filesystem")


def test_contract_suite_against_zfs_with_libzfs_core_and_cli_only(alpha: Machine) -> None:
    select = os.environ.get("SNAPSYNC_GUEST_SELECT", "")
    out = guest_pytest(alpha, f"tests/contract {select}".strip(), {"SNAPSYNC_CONTRACT_BACKENDS": "zfs,zfs-cli"})
    print(out[-5000:])
    if select:  # a narrowed run: the count below is for the whole suite
        return
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert all(any(reason in line for reason in ZFS_CANNOT) for line in skipped), skipped
    per_backend = _collected_here("tests/contract")
    skipped_count = int(m.group(1)) if (m := re.search(r"(\d+) skipped", out)) else 0
    assert _passed(out) + skipped_count == 2 * per_backend, f"expected {per_backend} tests per backend:\n{out[-1500:]}"


def test_zfs_specific_suite(alpha: Machine) -> None:
    """``SNAPSYNC_GUEST_SELECT`` (e.g. ``-k bookmark``) narrows it while working on one guest test."""
    out = guest_pytest(alpha, f"vm-tests/guest {os.environ.get('SNAPSYNC_GUEST_SELECT', '')}".strip())
    print(out[-5000:])
    assert _passed(out) > 0 and " failed" not in out, out[-1500:]
