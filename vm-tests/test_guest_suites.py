"""The suites that run inside a guest against real OpenZFS 2.3: the backend contract (the same file
the host runs against btrfs) and the ZFS-specific tests in ``guest/``.

Both guests work through one queue of pieces of these suites, largest first. A guest is one busy CPU
under emulation, and CI runs the host suite beside the vm-tests on a 2-core machine: there the second
guest joins when the host suite is done (``.ci/run`` creates the file named by ``SNAPSYNC_VM_JOIN``),
so the vm-tests' tail uses the core the host suite gave back instead of starving it. Without that
variable both guests start at once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO, guest_pytest
from machine import Machine

ZFS_CANNOT = ("cannot hold a writable object in its snapshot namespace", "is not a valid dataset name on this filesystem")
JOIN_POLL = 5.0


@dataclass(frozen=True)
class Piece:
    """One pytest run in a guest: ``args`` and environment, and how long it took last time measured
    (seconds under TCG, only to put the longest first)."""

    name: str
    args: str
    env: tuple[tuple[str, str], ...] = ()
    estimate: int = 0


GUEST_FILES = {
    "rollback": (["test_zfs_rollback.py"], 480),
    "operate": (["test_zfs_operate.py", "test_systemd_units.py", "test_impermanence_rollback.py", "test_zfs_postgres.py"], 350),
    "streams": (["test_zfs_security.py", "test_zfs_offsite.py", "test_zfs_bare_metal.py"], 365),
}
"""The ZFS-specific files in pieces of similar length, each run in name order as one session ran them all
before; a file named nowhere runs in piece ``zfs``."""


def pieces(select: str = "") -> list[Piece]:
    named = {f for files, _ in GUEST_FILES.values() for f in files}
    rest = sorted(p.name for p in (REPO / "vm-tests" / "guest").glob("test_*.py") if p.name not in named)
    out = [Piece(f"contract {b}", f"tests/contract {select}", (("SNAPSYNC_CONTRACT_BACKENDS", b),), 390) for b in ("zfs", "zfs-cli")]
    out += [Piece(name, " ".join(f"vm-tests/guest/{f}" for f in sorted(files)) + f" {select}", (), est) for name, (files, est) in GUEST_FILES.items()]
    out.append(Piece("zfs", " ".join(f"vm-tests/guest/{f}" for f in rest) + f" {select}", (), 250))
    return sorted(out, key=lambda p: -p.estimate)


def _collected_here(path: str) -> int:
    """How many tests the same suite has on the host (one backend): both sides run the same file."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", path],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "SNAPSYNC_CONTRACT_BACKENDS": "btrfs"})
    match = re.search(r"(\d+) tests? collected", done.stdout)
    assert match, done.stdout[-2000:]
    return int(match.group(1))


def _count(word: str, output: str) -> int:
    match = re.search(rf"(\d+) {word}", output)
    return int(match.group(1)) if match else 0


def _joined(first: bool) -> bool:
    """Whether a guest may take work now: the first always, the second once the host suite is done."""
    flag = os.environ.get("SNAPSYNC_VM_JOIN")
    return first or not flag or Path(flag).exists()


def run_pieces(machines: tuple[Machine, ...], todo: list[Piece]) -> dict[str, tuple[str, str, float]]:
    """Every piece run once, each guest taking the next as it finishes one: name -> (guest, output, seconds).
    A failed piece is recorded with its output; the others still run."""
    queue, lock, done = list(todo), threading.Lock(), {}

    def work(machine: Machine, first: bool) -> None:
        while not _joined(first):
            with lock:
                if not queue:
                    return
            time.sleep(JOIN_POLL)
        while True:
            with lock:
                if not queue:
                    return
                piece = queue.pop(0)
            started = time.monotonic()
            try:
                out = guest_pytest(machine, piece.args.strip(), dict(piece.env), allow_empty=bool(os.environ.get("SNAPSYNC_GUEST_SELECT")))
            except BaseException as e:  # noqa: BLE001 (pytest.fail's exception too: reported below, per piece)
                out = f"FAILED: {e}"
            with lock:
                done[piece.name] = (machine.name, out, time.monotonic() - started)

    threads = [threading.Thread(target=work, args=(m, i == 0)) for i, m in enumerate(machines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done


def test_guest_suites(guests: tuple[Machine, Machine]) -> None:
    """``SNAPSYNC_GUEST_SELECT`` (e.g. ``-k bookmark``) narrows every piece while working on one guest test."""
    select = os.environ.get("SNAPSYNC_GUEST_SELECT", "")
    todo = pieces(select)
    done = run_pieces(guests, todo)
    for name, (guest, out, seconds) in sorted(done.items()):
        print(f"--- {name} in guest {guest}: {seconds:.0f} s\n{out[-3000:]}")
    assert set(done) == {p.name for p in todo}
    failed = [name for name, (_, out, _) in done.items() if out.startswith("FAILED:")]
    assert not failed, "\n".join(done[n][1][-3000:] for n in failed)
    if select:  # a narrowed run: the counts below are for the whole suites
        return
    per_backend = _collected_here("tests/contract")
    for backend in ("zfs", "zfs-cli"):
        out = done[f"contract {backend}"][1]
        skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
        assert all(any(reason in line for reason in ZFS_CANNOT) for line in skipped), skipped
        assert _count("passed", out) + _count("skipped", out) == per_backend, f"expected {per_backend} contract tests:\n{out[-1500:]}"
    assert all(_count("passed", done[p.name][1]) > 0 for p in todo if not p.name.startswith("contract"))
