"""Host side of the vm-tests: build (or reuse) the guest image, boot two guests, install snapsync.

The guests boot once per session (about 30 s each under TCG) and are reset between tests by
destroying and recreating datasets, never by rebooting. ``guest/`` holds tests that run *inside* a
guest (pytest there, against real OpenZFS); the host never collects them.

Without qemu or root the whole folder skips with the reason, unless SNAPSYNC_REQUIRE_VM=1 (CI),
where that is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from image import Image, ensure_image, unavailable  # noqa: E402
from machine import Machine  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
collect_ignore = [] if os.environ.get("SNAPSYNC_IN_GUEST") == "1" else ["guest"]
GUEST_REPO = "/root/snapsync"
GUEST_VENV = "/opt/snapsync"
POOL = "tank"


def _require() -> None:
    reason = unavailable()
    if reason:
        if os.environ.get("SNAPSYNC_REQUIRE_VM") == "1":
            pytest.fail(f"vm-tests required but cannot run: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def image() -> Image:
    _require()
    return ensure_image()


def build_wheels(out: Path) -> Path:
    """snapsync and its dependencies as wheels for the guest's Python 3.11 (the guest has no network)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(out), str(REPO), "pytest>=8", "hypothesis>=6.100"],
        check=True, capture_output=True,
    )
    return out


def _install(machine: Machine, wheels: Path) -> None:
    machine.put_tree(wheels, "/root/wheels")
    machine.put_tree(REPO, GUEST_REPO, exclude=(".git", ".venv", "__pycache__", ".mypy_cache", ".pytest_cache", ".hypothesis"))
    machine.run(
        f"python3 -m venv --system-site-packages {GUEST_VENV} && "
        f"{GUEST_VENV}/bin/pip install -q --no-index --find-links /root/wheels snapsync pytest hypothesis && "
        f"ln -sf {GUEST_VENV}/bin/snapsync /usr/local/bin/snapsync",
        timeout=900,
    ).check()
    machine.run(f"zpool create -f -O mountpoint=/{POOL} -O compression=lz4 {POOL} /dev/disk/by-id/virtio-zfs0").check()


@pytest.fixture(scope="session")
def guests(image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Machine, Machine]]:
    """Two booted guests with snapsync installed and a pool ``tank`` each: two hosts."""
    workdir = tmp_path_factory.mktemp("guests")
    attach = os.environ.get("SNAPSYNC_VM_ATTACH")
    if attach:  # development: reuse two running, installed guests ("PORT_A,PORT_B")
        ports = [int(p) for p in attach.split(",")]
        yield Machine("alpha", image, workdir, port=ports[0]), Machine("beta", image, workdir, port=ports[1])
        return
    wheels = build_wheels(tmp_path_factory.mktemp("wheels"))
    machines = (Machine("alpha", image, workdir), Machine("beta", image, workdir))
    errors: list[BaseException] = []

    def bring_up(m: Machine) -> None:
        try:
            m.boot()
            _install(m, wheels)
        except BaseException as e:  # reported below, after both threads ended
            errors.append(e)

    threads = [threading.Thread(target=bring_up, args=(m,)) for m in machines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        for m in machines:
            print(f"vm-tests: guest {m.name} ready in {m.boot_seconds:.0f} s (OpenZFS {m.zfs_version})", file=sys.stderr)
        yield machines
    finally:
        for m in machines:
            m.stop()


@pytest.fixture
def alpha(guests: tuple[Machine, Machine]) -> Machine:
    return guests[0]


@pytest.fixture
def beta(guests: tuple[Machine, Machine]) -> Machine:
    return guests[1]


def guest_pytest(machine: Machine, args: str, env: dict[str, str] | None = None, allow_empty: bool = False) -> str:
    """Run pytest inside the guest on the project tree; fail here with its output if it fails
    (``allow_empty``: a selection that matches nothing there is not a failure)."""
    environment = {"SNAPSYNC_IN_GUEST": "1", "SNAPSYNC_ZFS_POOL": POOL, **(env or {})}
    result = machine.run(
        f"cd {GUEST_REPO} && {GUEST_VENV}/bin/python -m pytest -p no:cacheprovider -q -rs --durations=12 {args}",
        env=environment, timeout=3600,
    )
    if result.returncode != 0 and not (allow_empty and result.returncode == 5):
        pytest.fail(f"pytest in guest {machine.name} failed ({result.returncode}):\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}")
    summary = os.environ.get("SNAPSYNC_VM_SUMMARY")
    if summary:  # vm-tests/run prints what ran inside the guests, not only the host-side count
        last = [line for line in result.stdout.splitlines() if " in " in line and ("passed" in line or "failed" in line)]
        with open(summary, "a") as f:
            f.write(f"  in guest {machine.name}: pytest {args}: {last[-1].strip('= ') if last else '?'}\n")
    return result.stdout
