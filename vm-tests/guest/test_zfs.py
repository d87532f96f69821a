"""ZFS-specific behaviour, run inside the guest against real OpenZFS 2.3 (pool from SNAPSYNC_ZFS_POOL).

Replication here goes to a local target (another dataset tree on the same pool), through the same
``snapsync serve`` session and planner as an ssh target; the two-guest ssh tests live on the host
side (``vm-tests/test_zfs_replication.py``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from snapsync.backends.zfs import ZfsBackend
from snapsync.clock import ManualClock
from snapsync.policy.loader import parse_policy
from snapsync.protocol import dataset_key
from snapsync.ops.runner import GroupReport, Runner
from snapsync.backends.zfs_receiver import zfs_component

POOL = os.environ.get("SNAPSYNC_ZFS_POOL", "")
pytestmark = pytest.mark.skipif(not POOL, reason="needs SNAPSYNC_ZFS_POOL (runs inside the vm-tests guest)")
START = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def zfs(*args: str, check: bool = True) -> str:
    result = subprocess.run(["zfs", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"zfs {' '.join(args)}: {result.stderr}")
    return result.stdout


def prop(dataset: str, name: str) -> str:
    return zfs("get", "-H", "-p", "-o", "value", name, dataset).strip()


def fill(dataset: str, seed: int, size: int = 256 * 1024) -> None:
    mountpoint = Path(prop(dataset, "mountpoint"))
    (mountpoint / f"f{seed}.bin").write_bytes(os.urandom(size))  # incompressible: stream size ~ size
    (mountpoint / "state.txt").write_text(f"state {seed}\n")


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def snapshot_dir(dataset: str, name: str) -> Path:
    return Path(prop(dataset, "mountpoint")) / ".zfs" / "snapshot" / name


@pytest.fixture
def space() -> Iterator[str]:
    """A fresh parent dataset per test (``<pool>/t-xxxx``), destroyed afterwards with everything in it."""
    parent = f"{POOL}/t-{uuid.uuid4().hex[:6]}"
    zfs("create", parent)
    zfs("create", "-o", "canmount=off", f"{parent}/backup")
    yield parent
    subprocess.run(["zfs", "destroy", "-r", "-f", parent], capture_output=True)


class Site:
    """One host's policy (a zfs group replicating to a local target) and a runner on a manual clock."""

    def __init__(self, datasets: list[str], target_root: str, extra: str = "", retention: str = "keep_last = 100") -> None:
        self.datasets = datasets
        self.target_root = target_root
        self.clock = ManualClock(START)
        self.text = "\n".join([
            "version = 1", 'host = "alpha"', "[defaults]", 'interval = "1m"', "[defaults.retention]", retention,
            "[groups.app]", 'backend = "zfs"',
            "datasets = [" + ", ".join(f'"{d}"' for d in datasets) + "]",
            'targets = ["usb"]', extra,
            "[targets.usb]", 'type = "local"', f'path = "{target_root}"', "[targets.usb.retention]", "keep_last = 100",
        ]) + "\n"

    def runner(self, text: str | None = None) -> Runner:
        return Runner(parse_policy(text or self.text, "<test>"), self.clock)

    def step(self, *, take: bool = True, replicate: bool = True, prune: bool = False, text: str | None = None) -> GroupReport:
        runner = self.runner(text)
        (report,) = runner.run(list(runner.policy.groups.values()), take=take, only_due=False, prune=prune, replicate=replicate)
        self.clock.advance(timedelta(minutes=1))
        return report

    def copy(self, dataset: str) -> str:
        return f"{self.target_root}/app/" + "/".join(zfs_component(p) for p in dataset_key(dataset).split("/"))


def replicated_once(space: str, retention: str = "keep_last = 100", target: str = "") -> tuple[str, Site, str]:
    """``<space>/src`` with some data, replicated once to the local target; returns it, the site and
    the snapshot (now the target's base). ``target`` adds keys to ``[targets.usb]``."""
    src = f"{space}/src"
    zfs("create", src)
    fill(src, 1)
    site = Site([src], f"{space}/backup", retention=retention)
    site.text = site.text.replace("[targets.usb.retention]", f"{target}\n[targets.usb.retention]")
    report = site.step()
    assert report.targets[0].ok and report.snapshot, report.to_json()
    return src, site, report.snapshot


def mounted_copy(copy: str) -> Path:
    """Mount a received copy (received with canmount=noauto) to read its snapshots."""
    where = Path("/mnt") / uuid.uuid4().hex[:8]
    zfs("set", f"mountpoint={where}", copy)
    zfs("mount", copy)
    return where


@pytest.mark.parametrize("use_lzc", [True, False], ids=["libzfs_core", "cli"])
def test_group_of_two_datasets_is_one_txg(space: str, use_lzc: bool) -> None:
    a, b = f"{space}/a", f"{space}/b"
    zfs("create", a)
    zfs("create", b)
    backend = ZfsBackend(use_lzc=use_lzc)
    assert (backend.lzc is not None) == use_lzc
    taken = backend.snapshot_group([a, b], "snapsync_2026-11-26T12:00:00Z")
    txgs = {s.txg for s in taken}
    assert len(txgs) == 1, f"createtxg differ: {[(s.dataset, s.txg) for s in taken]}"
    assert {int(prop(f"{d}@snapsync_2026-11-26T12:00:00Z", "createtxg")) for d in (a, b)} == txgs


def test_cut_stream_resumes_from_token_with_identical_data(space: str) -> None:
    src = f"{space}/src"
    zfs("create", src)
    fill(src, 1, size=2 * 1024 * 1024)
    site = Site([src], f"{space}/backup")
    first = site.step()
    assert [s.to_json()["kind"] for s in first.targets[0].sent] == ["full"]
    fill(src, 2, size=2 * 1024 * 1024)
    second_name = site.step(replicate=False).snapshot
    assert second_name
    copy = site.copy(src)
    base = first.snapshot
    cut = subprocess.run(
        f"zfs send -c -i {src}@{base} {src}@{second_name} | head -c 600000 | zfs receive -s -u {copy}",
        shell=True, capture_output=True, text=True,
    )
    assert cut.returncode != 0
    token = prop(copy, "receive_resume_token")
    assert token not in ("-", "")

    report = site.step(take=False)
    target = report.targets[0]
    assert target.ok, target.errors
    assert [(s.name, s.base) for s in target.sent] == [(second_name, "(resumed)")]
    assert target.sent[0].bytes < 2 * 1024 * 1024, "resume sent the whole stream again"
    assert prop(copy, "receive_resume_token") in ("-", "")
    assert prop(f"{copy}@{second_name}", "guid") == prop(f"{src}@{second_name}", "guid")
    where = mounted_copy(copy)
    assert digest(where / ".zfs" / "snapshot" / second_name) == digest(snapshot_dir(src, second_name))


def test_hold_keeps_the_base_from_pruning(space: str) -> None:
    src, site, base = replicated_once(space, retention="keep_last = 1")
    assert zfs("holds", "-H", f"{src}@{base}").split("\t")[1] == "snapsync:target:usb"
    offline = site.text.replace(f'path = "{site.target_root}"', f'path = "{space}/not-plugged-in"')
    for seed in (2, 3):
        fill(src, seed)
        report = site.step(prune=True, text=offline)
        assert not report.targets[0].ok
    names = [s.name for s in ZfsBackend().list_snapshots(src) if s.kind == "snapshot"]
    assert base in names, "pruning destroyed the replication base"
    kept = {d.name: d for d in report.plan.kept} if report.plan else {}
    assert "replication base for usb" in " ".join(kept[base].reasons)
    assert len(names) == 2  # the base and the newest (keep_last = 1); the middle one went
    with pytest.raises(AssertionError, match="dataset is busy|holds"):
        zfs("destroy", f"{src}@{base}")


def test_bookmark_is_the_incremental_source_after_its_snapshot_was_pruned(space: str) -> None:
    src, site, base = replicated_once(space, retention="keep_last = 1")
    without_target = site.text.replace('targets = ["usb"]', "targets = []")
    fill(src, 2)
    report = site.step(replicate=False, prune=True, text=without_target)
    assert any("target:usb" in r for r in report.released)
    snaps = ZfsBackend().list_snapshots(src)
    assert base not in {s.name for s in snaps if s.kind == "snapshot"}
    assert base in {s.name for s in snaps if s.kind == "bookmark"}

    again = site.step(take=False)
    target = again.targets[0]
    assert target.ok, target.errors
    assert [(s.base, s.to_json()["kind"]) for s in target.sent] == [(f"#{base}", "incremental")]


def test_raw_send_of_an_encrypted_dataset(space: str, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("correct horse battery staple\n")
    secret = f"{space}/secret"
    zfs("create", "-o", "encryption=on", "-o", "keyformat=passphrase", "-o", f"keylocation=file://{key}", secret)
    fill(secret, 7)
    site = Site([secret], f"{space}/backup")
    report = site.step()
    assert report.targets[0].ok, report.targets[0].errors
    copy = site.copy(secret)
    assert prop(copy, "encryption") == "aes-256-gcm"
    assert prop(copy, "keystatus") == "unavailable", "the target could read the data: the stream was not raw"
    zfs("load-key", "-L", f"file://{key}", copy)
    where = mounted_copy(copy)
    assert digest(where / ".zfs" / "snapshot" / report.snapshot) == digest(snapshot_dir(secret, report.snapshot))


def test_names_with_spaces_replicate_and_prune(space: str) -> None:
    src = f"{space}/app data"
    zfs("create", src)
    fill(src, 3)
    site = Site([src], f"{space}/backup")
    first = site.step()
    assert first.targets[0].ok, first.targets[0].errors
    copy = site.copy(src)
    assert " " not in copy.split("/backup/", 1)[1] and ":20" in copy
    between = copy[len(f"{space}/backup/"):].split("/")[:-1]
    for i in range(len(between)):
        assert prop(f"{space}/backup/" + "/".join(between[: i + 1]), "canmount") == "off"
    assert prop(copy, "canmount") == "noauto" and prop(copy, "mounted") == "no"
    fill(src, 4)
    second = site.step()
    assert [s.to_json()["kind"] for s in second.targets[0].sent] == ["incremental"]
    assert zfs("list", "-H", "-o", "name", "-t", "snapshot", copy).split() == [f"{copy}@{first.snapshot}", f"{copy}@{second.snapshot}"]


def test_cli_only_backend_replicates_too(space: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPSYNC_ZFS_LZC", "0")
    src = f"{space}/src"
    zfs("create", src)
    site = Site([src], f"{space}/backup")
    fill(src, 5)
    site.step()
    fill(src, 6)
    report = site.step()
    assert [s.to_json()["kind"] for s in report.targets[0].sent] == ["incremental"]
    assert zfs("holds", "-H", f"{src}@{report.snapshot}").split("\t")[1] == "snapsync:target:usb"


def test_a_resume_token_the_source_cannot_serve_is_abandoned_then_sent_afresh(space: str) -> None:
    src, site, base = replicated_once(space)
    fill(src, 2, size=1024 * 1024)
    doomed = site.step(replicate=False).snapshot
    copy = site.copy(src)
    subprocess.run(f"zfs send -i {src}@{base} {src}@{doomed} | head -c 300000 | zfs receive -s -u {copy}",
                   shell=True, capture_output=True)
    assert prop(copy, "receive_resume_token") not in ("-", "")
    zfs("destroy", f"{src}@{doomed}")  # the snapshot the token continues is gone
    fill(src, 3)
    report = site.step()
    target = report.targets[0]
    assert target.ok, target.errors
    assert any("abandoned" in n for n in target.notes), target.notes
    assert [(s.base, s.name) for s in target.sent] == [(base, report.snapshot)]
    assert prop(copy, "receive_resume_token") in ("-", "")


def test_send_role_refuses_a_token_for_a_snapshot_outside_its_root(space: str) -> None:
    from snapsync.protocol import Refused
    from snapsync.replication.serve import Server

    inside, outside = f"{space}/served/app", f"{space}/private"
    zfs("create", "-p", inside)
    zfs("create", outside)
    fill(outside, 1, size=1024 * 1024)
    zfs("snapshot", f"{outside}@secret")
    sink = f"{space}/backup/private"
    subprocess.run(f"zfs send {outside}@secret | head -c 200000 | zfs receive -s -u {sink}", shell=True, capture_output=True)
    token = prop(sink, "receive_resume_token")
    assert token not in ("-", "")
    server = Server(f"{space}/served", "send")
    with pytest.raises(Refused, match="not a snapshot of"):
        server._resume_send(server._dataset("app"), token)


@pytest.mark.parametrize("on_diverged", ["refuse", "rollback"])
def test_diverged_target_is_refused_or_rolled_back_by_policy(space: str, on_diverged: str) -> None:
    src, site, base = replicated_once(space, target=f'on_diverged = "{on_diverged}"')
    copy = site.copy(src)
    zfs("snapshot", f"{copy}@snapsync_2026-11-26T12:00:30Z")  # a copy the source never had
    fill(src, 2)
    report = site.step()
    target = report.targets[0]
    copies = zfs("list", "-H", "-o", "name", "-t", "snapshot", copy).split()
    if on_diverged == "refuse":
        assert not target.ok and "diverged" in " ".join(target.errors)
        assert f"{copy}@snapsync_2026-11-26T12:00:30Z" in copies
    else:
        assert target.ok, target.errors
        assert target.rolled_back and [(s.base, s.name) for s in target.sent] == [(base, report.snapshot)]
        assert copies == [f"{copy}@{base}", f"{copy}@{report.snapshot}"]


def test_a_removed_targets_bookmark_goes_once_hold_expiry_has_passed(space: str) -> None:
    src, site, base = replicated_once(space, retention="keep_last = 1")
    without_target = site.text.replace('targets = ["usb"]', "targets = []")
    fill(src, 2)
    report = site.step(replicate=False, prune=True, text=without_target)
    assert any("target:usb" in r for r in report.released)
    assert base in {s.name for s in ZfsBackend().list_snapshots(src) if s.kind == "bookmark"}

    site.clock.advance(timedelta(days=31))
    report = site.step(replicate=False, prune=True, text=without_target)
    assert report.ok, report.errors
    assert any(f"bookmark #{base}" in r and "needs it" in r for r in report.released), report.released
    assert [s for s in ZfsBackend().list_snapshots(src) if s.kind == "bookmark"] == []


def test_a_snapshot_sent_while_the_clock_was_ahead_does_not_stop_the_chain(space: str) -> None:
    src, site, s1 = replicated_once(space)
    site.clock.advance(timedelta(days=365))
    fill(src, 2)
    ahead = site.step()
    assert ahead.targets[0].ok and ahead.snapshot
    future = ahead.snapshot
    site.clock = ManualClock(START + timedelta(minutes=5))  # the clock is fixed
    fill(src, 3)
    report = site.step()
    target = report.targets[0]
    assert target.ok, target.errors
    assert [(s.name, s.base) for s in target.sent] == [(report.snapshot, s1)]
    copies = [s.name for s in ZfsBackend().list_snapshots(site.copy(src)) if s.kind == "snapshot"]
    assert copies == [s1, report.snapshot] and future not in copies
    held = {s.name: s.holds for s in ZfsBackend().list_snapshots(src) if s.holds}
    assert held == {report.snapshot: ("target:usb",)}, held
