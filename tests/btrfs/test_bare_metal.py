"""Bare-metal recovery on real btrfs: the host's disk is replaced by an empty one, the group comes
back in place from a backup host or from offsite, and replication resumes incrementally."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import make_subvolume
from tests.replication.helpers import copies_dir, run_json, snapsync, tree_digest, write_policy

if TYPE_CHECKING:
    from tests.sshd import Sshd

pytestmark = pytest.mark.btrfs


class Disk:
    """A host's /persist: a loop btrfs mounted at a fixed place, which can be swapped for a new, empty one."""

    def __init__(self, where: Path, images: Path) -> None:
        self.where, self.images, self.count = where, images, 0
        where.mkdir()
        self.replace()

    def replace(self) -> None:
        if self.count:
            subprocess.run(["umount", str(self.where)], check=True)
        self.count += 1
        image = self.images / f"disk{self.count}.img"
        subprocess.run(["truncate", "-s", "256M", str(image)], check=True)
        subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(self.where)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", str(self.where)], check=True)


def backed_up(p: list[str], app: Path, *versions: str) -> None:
    """One snapshot per version of app/data.txt, each replicated (or uploaded) at once."""
    for version in versions:
        (app / "data.txt").write_text(f"{version}\n")
        run_json(*p, "snapshot")
        run_json(*p, "replicate")
        time.sleep(1.05)


@pytest.fixture
def disk(btrfs_root: Path, tmp_path: Path) -> Iterator[Disk]:
    d = Disk(tmp_path / "persist", tmp_path)
    yield d
    d.close()


def test_a_host_restored_in_place_from_its_backup_host_replicates_incrementally_afterwards(
    disk: Disk, target_root: Path, tmp_path: Path
) -> None:
    app = make_subvolume(disk.where / "app", "v1\n")
    db = make_subvolume(disk.where / "db", "db v1\n")
    policy = write_policy(tmp_path / "p.toml", [app, db], {"usb": f'type = "local"\npath = "{target_root}"'})
    p = ["-p", str(policy)]
    backed_up(p, app, "v1", "v2")
    before = {ds: tree_digest(ds) for ds in (app, db)}

    disk.replace()  # the disk died; a new, empty one is mounted where /persist was
    assert not app.exists()
    done = run_json(*p, "restore", "app", "--from", "usb", "--in-place")
    assert [d["received"] for d in done["datasets"]] == [[done["snapshot"]]] * 2
    assert {ds: tree_digest(ds) for ds in (app, db)} == before
    assert (app / "data.txt").read_text() == "v2\n"

    (app / "data.txt").write_text("v3 on the new disk\n")
    run_json(*p, "snapshot")
    sent = run_json(*p, "replicate")["groups"][0]["targets"][0]["sent"]
    assert sent and all(s["kind"] == "incremental" and s["base"] == done["snapshot"] for s in sent)
    newest = sent[0]["name"]
    assert (copies_dir(target_root, "app", app) / newest / "data.txt").read_text() == "v3 on the new disk\n"

    again = snapsync(*p, "restore", "app", "--from", "usb", "--in-place")
    assert again.returncode == 2 and "already exists; --in-place restores into empty places only" in again.stderr


def test_a_host_restored_in_place_from_offsite_uploads_incrementally_afterwards(
    disk: Disk, target_root: Path, tmp_path: Path
) -> None:
    app = make_subvolume(disk.where / "app", "v1\n")
    key = tmp_path / "offsite.key"
    snapsync("keygen", str(key), check=True)
    nas = target_root / "nas"
    nas.mkdir()
    policy = write_policy(tmp_path / "p.toml", [app], {"nas": f'type = "dir"\npath = "{nas}"\nkey_file = "{key}"'})
    p = ["-p", str(policy)]
    backed_up(p, app, "v1", "v2")

    disk.replace()
    done = run_json(*p, "restore", "app", "--from", "nas", "--in-place")
    assert done["datasets"][0]["received"] == done["datasets"][0]["chain"] and len(done["datasets"][0]["chain"]) == 2
    assert (app / "data.txt").read_text() == "v2\n"

    (app / "data.txt").write_text("v3\n")
    run_json(*p, "snapshot")
    (target,) = run_json(*p, "replicate")["groups"][0]["targets"]
    assert [s["kind"] for s in target["sent"]] == ["incremental"] and target["sent"][0]["base"] == done["snapshot"]
    assert run_json(*p, "verify", "nas")["ok"]


def test_restore_needs_exactly_one_destination(disk: Disk, target_root: Path, tmp_path: Path) -> None:
    app = make_subvolume(disk.where / "app", "v1\n")
    policy = write_policy(tmp_path / "p.toml", [app], {"usb": f'type = "local"\npath = "{target_root}"'})
    for extra in ([], ["--to", "/tmp", "--in-place"]):
        proc = snapsync("-p", str(policy), "restore", "app", "--from", "usb", *extra)
        assert proc.returncode == 2 and "exactly one of --to" in proc.stderr


def test_an_interrupted_in_place_restore_continues_with_the_datasets_still_missing(
    disk: Disk, target_root: Path, tmp_path: Path
) -> None:
    import btrfsutil

    app = make_subvolume(disk.where / "app", "app v1\n")
    db = make_subvolume(disk.where / "db", "db v1\n")
    policy = write_policy(tmp_path / "p.toml", [app, db], {"usb": f'type = "local"\npath = "{target_root}"'})
    p = ["-p", str(policy)]
    run_json(*p, "run")
    disk.replace()
    done = run_json(*p, "restore", "app", "--from", "usb", "--in-place")
    # as if the run had died after the first dataset: the second, and its received copy, are not there
    btrfsutil.delete_subvolume(db)
    btrfsutil.delete_subvolume(disk.where / ".snapsync" / "db" / done["snapshot"])
    (app / "data.txt").write_text("app v1, written after the restore\n")

    again = run_json(*p, "restore", "app", "--from", "usb", "--in-place")
    by_source = {d["source"]: d for d in again["datasets"]}
    assert by_source[str(app)]["already_present"] == [done["snapshot"]] and by_source[str(db)]["received"] == [done["snapshot"]]
    assert (app / "data.txt").read_text() == "app v1, written after the restore\n"  # never overwritten
    assert (db / "data.txt").read_text() == "db v1\n"


def test_bare_metal_restore_over_ssh_from_the_backup_hosts_send_role(
    disk: Disk, target_root: Path, tmp_path: Path, sshd: Sshd
) -> None:
    """The backup host authorizes the rebuilt host's key for `serve --role send` over its receiving
    root (runbooks/host-died.md); the restore is a one-shot pull over ssh, then the usual receive key
    takes over again and replication is incremental."""
    app = make_subvolume(disk.where / "app", "v1\n")
    sshd.authorize(sshd.forced(target_root))
    policy = write_policy(tmp_path / "p.toml", [app], {"nas": sshd.target_table(target_root)})
    p = ["-p", str(policy)]
    backed_up(p, app, "v1", "v2")

    disk.replace()
    sshd.authorize(sshd.forced(target_root, "send"))
    done = run_json(*p, "restore", "app", "--from", "nas", "--in-place")
    assert done["datasets"][0]["received"] == [done["snapshot"]] and done["bytes"] > 0
    assert (app / "data.txt").read_text() == "v2\n"

    sshd.authorize(sshd.forced(target_root))
    (app / "data.txt").write_text("v3\n")
    run_json(*p, "snapshot")
    sent = run_json(*p, "replicate")["groups"][0]["targets"][0]["sent"]
    assert [(s["kind"], s["base"]) for s in sent] == [("incremental", done["snapshot"])]


def test_every_group_comes_back_in_place_with_one_command(disk: Disk, target_root: Path, tmp_path: Path) -> None:
    app = make_subvolume(disk.where / "app", "v1\n")
    db = make_subvolume(disk.where / "db", "db v1\n")
    scratch = make_subvolume(disk.where / "scratch", "not backed up\n")
    policy = write_policy(tmp_path / "p.toml", [app], {"usb": f'type = "local"\npath = "{target_root}"'})
    policy.write_text(policy.read_text() + f'[groups.db]\nbackend = "btrfs"\ndatasets = ["{db}"]\ntargets = ["usb"]\n'
                      f'[groups.scratch]\nbackend = "btrfs"\ndatasets = ["{scratch}"]\n')
    p = ["-p", str(policy)]
    backed_up(p, app, "v1", "v2")
    before = {ds: tree_digest(ds) for ds in (app, db)}

    disk.replace()
    planned = run_json(*p, "restore", "--all", "--from", "usb", "--in-place", "--dry-run")
    assert [(g["group"], g.get("skipped")) for g in planned["groups"]] == [("app", None), ("db", None), ("scratch", "does not replicate to usb")]
    assert not app.exists() and not db.exists()
    done = run_json(*p, "restore", "--all", "--from", "usb", "--in-place")
    assert all(g["ok"] for g in done["groups"])
    assert {ds: tree_digest(ds) for ds in (app, db)} == before and not scratch.exists()

    again = run_json(*p, "restore", "--all", "--from", "usb", "--in-place")  # run twice (a cut first run): nothing fetched again
    assert [d["received"] for g in again["groups"][:2] for d in g["datasets"]] == [[], []]
    (app / "data.txt").write_text("v3 on the new disk\n")
    run_json(*p, "snapshot", "app")
    run_json(*p, "replicate")  # usb's newest of app is now one the live app was not restored from
    refused = snapsync(*p, "restore", "--all", "--from", "usb", "--in-place", "--json")
    assert refused.returncode == 1  # app lives again: refused for that group, reported, the others still done
    assert [g["ok"] for g in __import__("json").loads(refused.stdout)["groups"]] == [False, True, True]
    assert (app / "data.txt").read_text() == "v3 on the new disk\n"
    for args in (["app", "--all", "--from", "usb", "--in-place"], ["--all", "--from", "usb", "--to", str(tmp_path)]):
        assert snapsync(*p, "restore", *args).returncode == 2
