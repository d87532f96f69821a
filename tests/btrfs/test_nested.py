"""Subvolumes nested in a dataset are in none of its snapshots (btrfs snapshots do not recurse): on
real btrfs, `policy check` and every snapshot say so, naming them, until the policy lists or
excludes them. The layout is the README's NixOS example: docker and machined under /persist/var/lib."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import btrfsutil
import pytest

from tests.conftest import make_subvolume

pytestmark = pytest.mark.btrfs


def snapsync(policy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapsync", "-p", str(policy), *args], capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.fixture
def persist(btrfs_root: Path) -> Path:
    """/persist, a subvolume, with docker's and machined's subvolumes inside, and a read-only snapshot."""
    persist = make_subvolume(btrfs_root / "persist", "host state")
    (persist / "var" / "lib" / "forgejo").mkdir(parents=True)
    make_subvolume(persist / "var" / "lib" / "docker" / "btrfs" / "subvolumes" / "4f1c")
    make_subvolume(persist / "var" / "lib" / "docker" / "btrfs" / "subvolumes" / "9a2e")
    make_subvolume(persist / "var" / "lib" / "machines")
    make_subvolume(persist / "var" / "lib" / "machines" / "debian")  # nested in a nested one: its problem
    btrfsutil.create_snapshot(persist, persist / "snapper-ro", read_only=True)  # a snapshot: not live data
    return persist


def write(tmp_path: Path, persist: Path, group_extra: str = "", more: str = "") -> Path:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'version = 1\n[groups.system]\nbackend = "btrfs"\ndatasets = [{json.dumps(str(persist))}]\n{group_extra}\n{more}'
    )
    return policy


def nested_of(persist: Path) -> list[str]:
    lib = persist / "var" / "lib"
    return [str(lib / "docker" / "btrfs" / "subvolumes" / "4f1c"), str(lib / "docker" / "btrfs" / "subvolumes" / "9a2e"),
            str(lib / "machines")]


def test_policy_check_warns_naming_each_nested_subvolume(persist: Path, tmp_path: Path) -> None:
    checked = snapsync(write(tmp_path, persist), "policy", "check")
    assert checked.returncode == 0, checked.stderr
    (line,) = [ln for ln in checked.stderr.splitlines() if "nested" in ln]
    assert line.startswith("warning: groups.system.datasets[0]: ") and f"{persist} has nested subvolumes" in line
    for name in nested_of(persist):
        assert name in line
    assert "debian" not in line and "snapper-ro" not in line
    as_json = json.loads(snapsync(write(tmp_path, persist), "policy", "check", "--json").stdout)
    assert [w for w in as_json["warnings"] if "nested" in w] == [line.removeprefix("warning: ")]
    syntax = snapsync(write(tmp_path, persist), "policy", "check", "--syntax-only")
    assert "nested" not in syntax.stderr  # the syntax check looks at nothing on this machine


def test_every_snapshot_warns_in_text_json_and_the_log(persist: Path, tmp_path: Path) -> None:
    policy = write(tmp_path, persist)
    ran = snapsync(policy, "--log-format", "json", "run", "--json")  # the timer's command: due, so it snapshots
    assert ran.returncode == 0, ran.stderr
    (report,) = json.loads(ran.stdout)["groups"]
    (warning,) = report["warnings"]
    assert report["ok"] and report["snapshot"] and all(name in warning for name in nested_of(persist))
    (event,) = [json.loads(ln) for ln in ran.stderr.splitlines() if "nested-left-out" in ln]
    assert event["group"] == "system" and event["level"] == "warning" and warning in event["msg"]
    time.sleep(1.05)  # snapshot names carry the second
    taken = snapsync(policy, "snapshot")
    assert taken.returncode == 0, taken.stderr
    (line,) = [ln for ln in taken.stdout.splitlines() if "warning:" in ln]
    assert line.strip() == f"warning: {warning}"
    logged = [ln for ln in taken.stderr.splitlines() if "nested subvolumes" in ln]
    assert len(logged) == 1 and str(persist) in logged[0]
    not_due = json.loads(snapsync(policy, "run", "--json").stdout)["groups"][0]
    assert not_due["snapshot"] is None and not_due["warnings"] == []  # no snapshot, nothing left out


def test_listing_or_excluding_them_silences_the_warning(persist: Path, tmp_path: Path) -> None:
    lib = persist / "var" / "lib"
    machines = json.dumps(str(lib / "machines"))
    listed = f'[groups.machines]\nbackend = "btrfs"\ndatasets = [{machines}]\nexclude = [{json.dumps(str(lib / "machines" / "debian"))}]\n'
    policy = write(tmp_path, persist, f"exclude = [{json.dumps(str(lib / 'docker'))}]", listed)
    checked = snapsync(policy, "policy", "check")
    assert checked.returncode == 0, checked.stderr
    assert "nested" not in checked.stderr, checked.stderr
    taken = snapsync(policy, "snapshot", "--json")
    assert taken.returncode == 0, taken.stderr
    assert [g["warnings"] for g in json.loads(taken.stdout)["groups"]] == [[], []]


def test_exclude_is_validated(persist: Path, tmp_path: Path) -> None:
    outside = write(tmp_path, persist, 'exclude = ["/srv/elsewhere"]')
    refused = snapsync(outside, "policy", "check", "--syntax-only")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"snapsync: error: {outside}: groups.system.exclude[0]: '/srv/elsewhere' is not inside any of the group's "
        "datasets; exclude names subvolumes nested in them, which their snapshots leave out"
    )
    relative = snapsync(write(tmp_path, persist, 'exclude = ["var/lib/docker"]'), "policy", "check", "--syntax-only")
    assert relative.returncode == 2 and "groups.system.exclude[0]: must be an absolute path" in relative.stderr
    itself = snapsync(write(tmp_path, persist, f"exclude = [{json.dumps(str(persist))}]"), "policy", "check", "--syntax-only")
    assert itself.returncode == 2 and "is not inside any of the group's datasets" in itself.stderr
    twice = json.dumps(str(persist / "var" / "lib" / "docker"))
    dup = snapsync(write(tmp_path, persist, f"exclude = [{twice}, {twice}]"), "policy", "check", "--syntax-only")
    assert dup.returncode == 2 and "groups.system.exclude[1]: duplicate entry" in dup.stderr
    plain = json.dumps(str(persist / "var" / "lib" / "forgejo"))
    useless = snapsync(write(tmp_path, persist, f"exclude = [{plain}]"), "policy", "check")
    assert useless.returncode == 0, useless.stderr
    assert f"groups.system.exclude[0]: no nested subvolumes at or below {persist}/var/lib/forgejo: it leaves nothing out" in useless.stderr


def test_a_snapshot_really_leaves_them_out(persist: Path, tmp_path: Path) -> None:
    """What the warning is about, shown: the snapshot has an empty directory where the data was."""
    (persist / "var" / "lib" / "machines" / "image.raw").write_text("a container's disk\n")
    policy = write(tmp_path, persist)
    taken = json.loads(snapsync(policy, "snapshot", "--json").stdout)["groups"][0]["snapshot"]
    snap = persist.parent / ".snapsync" / "persist" / taken
    assert (snap / "data.txt").read_text() == "host state"
    assert (snap / "var" / "lib" / "machines").is_dir() and os.listdir(snap / "var" / "lib" / "machines") == []
