"""Operating snapsync on a real systemd host: the shipped units run sandboxed and do their job on ZFS
and on btrfs (setuid and setgid files included), the metrics are readable by another user, and a
receiving account needs no root, only the `zfs allow` permissions the NixOS module delegates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_zfs import POOL, fill, prop, space, zfs  # noqa: F401  (space: the fixture)

pytestmark = pytest.mark.skipif(not POOL, reason="needs SNAPSYNC_ZFS_POOL (runs inside the vm-tests guest)")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SNAPSYNC = "/usr/local/bin/snapsync"
UNITS = ["snapsync.service", "snapsync.timer", "snapsync-drill.service", "snapsync-drill.timer",
         "snapsync-check.service", "snapsync-check.timer"]


def sh(*argv: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done  # type: ignore[no-any-return]


def metrics(path: Path) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(path.read_text()) for s in family.samples
    }


def snapshots(dataset: str) -> list[str]:
    out = zfs("list", "-H", "-t", "snapshot", "-o", "name", "-s", "createtxg", "-r", dataset)
    return [line.split("@", 1)[1] for line in out.split()]


@pytest.fixture
def systemd_host(space: str) -> Iterator[str]:
    """The shipped units in /etc/systemd/system, a policy in /etc/snapsync; all removed afterwards."""
    if shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        pytest.fail("the guest is supposed to boot systemd")
    state = Path("/var/lib/snapsync")
    shutil.rmtree(state, ignore_errors=True)
    for unit in UNITS:
        shutil.copy(DEPLOY / "systemd" / unit, f"/etc/systemd/system/{unit}")
    Path("/etc/snapsync").mkdir(exist_ok=True)
    sh("systemctl", "daemon-reload")
    try:
        yield space
    finally:
        sh("systemctl", "disable", "--now", *[u for u in UNITS if u.endswith(".timer")], check=False)
        for unit in UNITS:
            Path(f"/etc/systemd/system/{unit}").unlink(missing_ok=True)
        sh("systemctl", "daemon-reload")
        sh("systemctl", "reset-failed", check=False)
        shutil.rmtree("/etc/snapsync", ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def host_policy(backend: str, dataset: object, target_path: object) -> None:
    """/etc/snapsync/policy.toml, where the units look: one group replicating to a local target."""
    Path("/etc/snapsync/policy.toml").write_text(
        f'version = 1\n[groups.app]\nbackend = "{backend}"\ndatasets = ["{dataset}"]\ntargets = ["usb"]\n'
        f'[targets.usb]\ntype = "local"\npath = "{target_path}"\n'
    )


def start(unit: str) -> tuple[str, str]:
    """Start a oneshot unit and wait for it; its result and its journal."""
    sh("systemctl", "start", unit, check=False)
    result = sh("systemctl", "show", unit, "-p", "Result", "--value").stdout.strip()
    journal = sh("journalctl", "-u", unit, "-o", "cat", "--no-pager").stdout
    return result, journal


def test_the_shipped_units_run_sandboxed_under_systemd(systemd_host: str) -> None:
    space = systemd_host
    app = f"{space}/app"
    zfs("create", app)
    fill(app, 1)
    host_policy("zfs", app, f"{space}/backup")
    verified = sh("systemd-analyze", "verify", *[f"/etc/systemd/system/{u}" for u in UNITS], check=False)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr

    result, journal = start("snapsync.service")
    assert result == "success", journal
    (taken,) = snapshots(app)
    assert snapshots(f"{space}/backup/app") == [taken]
    assert f"took snapshot {taken}" in journal and "run: app -> usb ok (1 sent," in journal

    textfile = Path("/var/lib/snapsync/metrics/snapsync.prom")
    m = metrics(textfile)
    assert m[("snapsync_last_run_success", frozenset({("command", "run"), ("policy", "policy")}))] == 1
    assert m[("snapsync_sent_snapshots_total", frozenset({("group", "app"), ("target", "usb"), ("policy", "policy")}))] == 1
    # node_exporter runs as its own user: it must be able to read the file through the state directory
    assert sh("runuser", "-u", "nobody", "--", "cat", str(textfile)).stdout == textfile.read_text()

    result, journal = start("snapsync-check.service")
    assert result == "success" and "SNAPSYNC OK - all fresh (2 checked" in journal, journal

    result, journal = start("snapsync-drill.service")
    assert result == "success", journal
    assert "app from usb: ok" in journal
    m = metrics(textfile)
    assert m[("snapsync_drill_ok", frozenset({("group", "app"), ("target", "usb"), ("policy", "policy")}))] == 1

    sh("systemctl", "enable", "--now", "snapsync.timer", "snapsync-drill.timer", "snapsync-check.timer")
    timers = sh("systemctl", "list-timers", "--all", "--no-pager").stdout
    assert all(f"snapsync{s}.timer" in timers for s in ("", "-drill", "-check")), timers
    assert sh("systemctl", "show", "snapsync.timer", "-p", "Persistent", "--value").stdout.strip() == "yes"
    assert sh("systemctl", "show", "snapsync.timer", "-p", "RandomizedDelayUSec", "--value").stdout.strip() == "5min"


@pytest.fixture
def btrfs_mount() -> Iterator[Path]:
    """A loop-mounted btrfs outside /tmp and /var/tmp (the units have private ones)."""
    tag = uuid.uuid4().hex[:6]
    image, mnt = Path(f"/root/btrfs-{tag}.img"), Path(f"/mnt/btrfs-{tag}")
    sh("truncate", "-s", "400M", str(image))
    sh("mkfs.btrfs", "-q", str(image))
    mnt.mkdir()
    sh("mount", "-o", "loop", str(image), str(mnt))
    try:
        yield mnt
    finally:
        sh("umount", str(mnt), check=False)
        mnt.rmdir()
        image.unlink()


def test_the_shipped_units_snapshot_replicate_and_drill_btrfs_with_setuid_files(systemd_host: str, btrfs_mount: Path) -> None:
    app = btrfs_mount / "persist" / "app"
    app.parent.mkdir()
    sh("btrfs", "subvolume", "create", str(app))
    (app / "journal").mkdir()
    (app / "journal").chmod(0o2755)  # like /var/log/journal
    shutil.copy("/bin/true", app / "tool")
    (app / "tool").chmod(0o4755)
    (btrfs_mount / "backup").mkdir()
    host_policy("btrfs", app, btrfs_mount / "backup")
    result, journal = start("snapsync.service")
    assert result == "success", journal
    (copy,) = [p for p in (btrfs_mount / "backup").rglob("snapsync_*") if p.is_dir() and (p / "tool").exists()]
    assert (copy / "tool").stat().st_mode & 0o7777 == 0o4755
    assert (copy / "journal").stat().st_mode & 0o7777 == 0o2755
    result, journal = start("snapsync-drill.service")
    assert result == "success" and "app from usb: ok" in journal, journal


def module_permissions() -> list[str]:
    """The permissions deploy/nixos/module.nix delegates to a receiving account (not append-only)."""
    text = (DEPLOY / "nixos" / "module.nix").read_text()
    match = re.search(r'zfsPermissions = \[([^\]]*)\]\s*\+\+ (?:lib\.)?optionals \(!rcv\.appendOnly\) \[([^\]]*)\]', text)
    assert match, "module.nix: zfsPermissions not found"
    return re.findall(r'"([a-z]+)"', match.group(1) + match.group(2))


@pytest.fixture
def receiver(space: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An unprivileged account that may only run `snapsync serve --role receive` below <space>/backup."""
    user = f"ss-{uuid.uuid4().hex[:6]}"
    sh("useradd", "--system", "--create-home", "--shell", "/bin/bash", user)
    try:
        sh("zfs", "allow", "-u", user, ",".join(module_permissions()), f"{space}/backup")
        key = tmp_path / "id_ed25519"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        line = sh(SNAPSYNC, "authorize", f"{key}.pub", "--root", f"{space}/backup", "--command", SNAPSYNC).stdout
        home = Path(f"/home/{user}")
        (home / ".ssh").mkdir(mode=0o700)
        (home / ".ssh" / "authorized_keys").write_text(line)
        sh("chown", "-R", f"{user}:", str(home / ".ssh"))
        yield user, key
    finally:
        sh("pkill", "-u", user, check=False)
        sh("userdel", "-r", user, check=False)


def test_a_receiving_account_needs_no_root_with_the_modules_zfs_delegation(
    space: str, receiver: tuple[str, Path], tmp_path: Path
) -> None:
    user, key = receiver
    app = f"{space}/app"
    zfs("create", app)
    policy = tmp_path / "policy.toml"
    policy.write_text(f"""
version = 1
[groups.app]
backend = "zfs"
datasets = ["{app}"]
targets = ["nas"]
[targets.nas]
type = "ssh"
host = "127.0.0.1"
user = "{user}"
identity_file = "{key}"
ssh_options = ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null"]
path = "{space}/backup"
[targets.nas.retention]
keep_last = 2
hourly = 0
daily = 0
weekly = 0
monthly = 0
yearly = 0
""")
    env = {**os.environ, "SNAPSYNC_STATE_DIR": str(tmp_path / "state")}
    taken = []
    for seed in range(4):
        fill(app, seed)
        done = sh(SNAPSYNC, "-p", str(policy), "snapshot", "--json", env=env)
        taken.append(re.search(r'"snapshot": "([^"]+)"', done.stdout).group(1))  # type: ignore[union-attr]
        sh(SNAPSYNC, "-p", str(policy), "replicate", env=env)
        sh("sleep", "1")
    copy = f"{space}/backup/app/{app}"
    assert snapshots(copy) == taken[-2:]  # received full, then incrementally; pruned by the account
    assert prop(f"{copy}@{taken[-1]}", "guid") == prop(f"{app}@{taken[-1]}", "guid")
    assert prop(copy, "mounted") == "no"
    # What the account cannot do: touch anything outside its root.
    outside = sh("runuser", "-u", user, "--", "zfs", "snapshot", f"{app}@intruder", check=False)
    assert outside.returncode != 0 and "permission denied" in outside.stderr.lower()
