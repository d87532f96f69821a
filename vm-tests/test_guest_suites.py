"""The suites that run inside a guest against real OpenZFS 2.3: the backend contract (the same file
the host runs against btrfs) and the ZFS-specific tests in ``guest/``."""

from __future__ import annotations

import re

from conftest import guest_pytest
from machine import Machine


def _passed(output: str) -> int:
    match = re.search(r"(\d+) passed", output)
    return int(match.group(1)) if match else 0


def test_contract_suite_against_zfs_with_libzfs_core_and_cli_only(alpha: Machine) -> None:
    out = guest_pytest(alpha, "tests/contract", {"SNAPSYNC_CONTRACT_BACKENDS": "zfs,zfs-cli"})
    print(out[-1500:])
    assert _passed(out) >= 2 * 12, out[-1500:]


def test_zfs_specific_suite(alpha: Machine) -> None:
    out = guest_pytest(alpha, "vm-tests/guest")
    print(out[-1500:])
    assert _passed(out) > 0 and " failed" not in out, out[-1500:]
