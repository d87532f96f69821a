"""Rollback on an impermanence host as NixOS makes it, in the guest (systemd is PID 1): the service's
directory is a systemd mount unit binding a directory of a ZFS dataset under /persist, and a real
service unit writes there every 0.2 s. Refused (and planned by --dry-run) while the service runs;
stopped, the rollback re-points the bind, the mount unit stays active, and once the service starts
again its writes land in the live dataset and none in the state moved aside."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_zfs import POOL, prop, space, zfs  # noqa: F401  (space: the fixture)
from test_zfs_operate import sh

pytestmark = pytest.mark.skipif(not POOL, reason="needs SNAPSYNC_ZFS_POOL (runs inside the vm-tests guest)")
UNITS = Path("/run/systemd/system")


def cli(policy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapsync", "-p", str(policy), *args], capture_output=True, text=True, timeout=600)


def answer(policy: Path, *args: str, code: int = 0) -> dict[str, object]:
    done = cli(policy, *args, "--json")
    assert done.returncode == code, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    data: dict[str, object] = json.loads(done.stdout)
    return data


class Host:
    def __init__(self, space: str, tmp_path: Path) -> None:
        tag = uuid.uuid4().hex[:6]
        self.dataset = f"{space}/svc"
        zfs("create", "-o", f"mountpoint=/persist-{tag}/system/var/lib/svc", self.dataset)
        self.data = Path(prop(self.dataset, "mountpoint")) / "data"
        self.data.mkdir()
        (self.data / "state.txt").write_text("v1\n")
        self.where = Path(f"/var/lib/svc{tag}")
        self.mount = f"var-lib-svc{tag}.mount"
        self.service = f"svc{tag}.service"
        (UNITS / self.mount).write_text(f"[Mount]\nWhat={self.data}\nWhere={self.where}\nType=none\nOptions=bind,nosuid\n")
        # the heartbeat is renamed into place: a stop between truncating and writing it must not empty it
        (UNITS / self.service).write_text(
            f"[Unit]\nRequiresMountsFor={self.where}\n[Service]\n"
            f"ExecStart=/bin/sh -c 'cd {self.where} && while :; do date +%%s.%%N > heartbeat.new && mv heartbeat.new heartbeat; sleep 0.2; done'\n"
        )
        sh("systemctl", "daemon-reload")
        sh("systemctl", "start", self.mount, self.service)
        self.policy = tmp_path / "policy.toml"
        self.policy.write_text(
            f'version = 1\nhost = "guest"\n[defaults]\ninterval = "1m"\n[defaults.retention]\nkeep_last = 10\n'
            f'[groups.svc]\nbackend = "zfs"\ndatasets = ["{self.dataset}"]\n'
        )
        self.first = str(answer(self.policy, "snapshot")["groups"][0]["snapshot"])  # type: ignore[index]
        (self.where / "state.txt").write_text("v2\n")

    def active(self, unit: str) -> str:
        return sh("systemctl", "is-active", unit, check=False).stdout.strip()

    def close(self) -> None:
        sh("systemctl", "stop", self.service, self.mount, check=False)
        for unit in (self.service, self.mount):
            (UNITS / unit).unlink(missing_ok=True)
        sh("systemctl", "daemon-reload")


@pytest.fixture
def host(space: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    monkeypatch.setenv("SNAPSYNC_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SNAPSYNC_LOCK_DIR", str(tmp_path / "locks"))
    made = Host(space, tmp_path)
    try:
        yield made
    finally:
        made.close()


def test_rollback_under_a_systemd_bind_mount_shows_the_snapshot_and_writes_land_live(host: Host) -> None:
    plan = answer(host.policy, "rollback", "svc", host.first, "--dry-run", code=2)
    assert any(f"re-point bind mount {host.where}" in str(s) for s in plan["steps"])  # type: ignore[attr-defined]
    assert host.service in " ".join(map(str, plan["blocked"]))  # type: ignore[arg-type]
    assert (host.where / "state.txt").read_text() == "v2\n"

    sh("systemctl", "stop", host.service)
    stopped = time.time()
    report = answer(host.policy, "rollback", "svc", host.first)
    assert report["rebound"], report
    assert host.active(host.mount) == "active"
    assert (host.where / "state.txt").read_text() == "v1\n"
    assert "nosuid" in sh("findmnt", "-no", "OPTIONS", str(host.where)).stdout

    sh("systemctl", "start", host.service)
    time.sleep(1.5)
    sh("systemctl", "stop", host.service)
    live = Path(prop(host.dataset, "mountpoint")) / "data"
    assert float((live / "heartbeat").read_text()) > stopped  # the service wrote into the live dataset
    aside = str(report["aside"][host.dataset])  # type: ignore[index]
    peek = Path(f"/mnt/aside-{uuid.uuid4().hex[:6]}")
    zfs("set", f"mountpoint={peek}", aside)
    zfs("mount", aside)
    try:
        assert float((peek / "data" / "heartbeat").read_text()) < stopped  # and nothing after the rollback aside
        assert (peek / "data" / "state.txt").read_text() == "v2\n"
    finally:
        zfs("unmount", aside)
    done = answer(host.policy, "release", "svc", str(report["safety_snapshot"]), "--delete-aside")
    assert done["deleted_asides"] == [aside]
    assert subprocess.run(["zfs", "list", aside], capture_output=True).returncode != 0
