"""Offsite on real OpenZFS: a zfs group uploaded to a dir target, verified, restored into a dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapsync.errors import IntegrityError
from snapsync.offsite.upload import open_archive
from snapsync.policy.schema import DirTarget
from snapsync.recovery.restore import restore, verify
from snapsync.offsite.sealing import create_key_file

from test_zfs import POOL, Site, digest, fill, mounted_copy, prop, snapshot_dir, space, zfs  # noqa: F401  (space: the fixture)

pytestmark = pytest.mark.skipif(not POOL, reason="needs SNAPSYNC_ZFS_POOL (runs inside the vm-tests guest)")


def offsite_site(space: str, tmp_path: Path) -> tuple[str, Site, DirTarget]:
    src = f"{space}/src"
    zfs("create", src)
    (tmp_path / "nas").mkdir()
    create_key_file(tmp_path / "offsite.key")
    site = Site([src], f"{space}/backup")
    site.text = site.text.replace('targets = ["usb"]', 'targets = ["off"]') + "\n".join([
        "[targets.off]", 'type = "dir"', f'path = "{tmp_path / "nas"}"', f'key_file = "{tmp_path / "offsite.key"}"',
        'chunk_size = "1M"', "full_every = 10",
    ]) + "\n"
    target = site.runner().policy.targets["off"]
    assert isinstance(target, DirTarget)
    return src, site, target


def test_a_zfs_chain_uploads_and_restores_into_a_dataset_byte_identical(space: str, tmp_path: Path) -> None:
    src, site, target = offsite_site(space, tmp_path)
    names = []
    for seed in range(3):
        fill(src, seed, size=1_500_000)
        report = site.step()
        assert report.targets[0].ok, report.to_json()
        names.append(report.snapshot)
    sent = [s.base for s in report.targets[0].sent]
    assert sent == [names[1]]  # the third upload is incremental from the second

    archive = open_archive(target)
    assert verify(archive, "off").ok
    zfs("create", "-o", "canmount=off", f"{space}/restore")
    restored = restore(archive, "off", "app", f"{space}/restore")
    assert restored.snapshot == names[-1] and restored.datasets[0].received == names
    copy = f"{space}/restore/app/" + "/".join(src.split("/"))
    assert zfs("get", "-H", "-o", "value", "canmount", copy).strip() == "noauto"
    where = mounted_copy(copy)
    for name in names:
        assert digest(where / ".zfs" / "snapshot" / name) == digest(snapshot_dir(src, name))


def test_a_damaged_chunk_stops_the_restore_and_leaves_no_partial_receive(space: str, tmp_path: Path) -> None:
    src, site, target = offsite_site(space, tmp_path)
    for seed in range(2):
        fill(src, seed, size=1_500_000)
        assert site.step().targets[0].ok
    chunk = sorted((tmp_path / "nas").rglob("chunk-000001"))[-1]
    data = bytearray(chunk.read_bytes())
    data[100] ^= 1
    chunk.write_bytes(bytes(data))
    zfs("create", "-o", "canmount=off", f"{space}/restore")
    with pytest.raises(IntegrityError, match="chunk-000001"):
        restore(open_archive(target), "off", "app", f"{space}/restore")
    copy = f"{space}/restore/app/" + "/".join(src.split("/"))
    token = zfs("get", "-H", "-o", "value", "receive_resume_token", copy, check=False).strip()
    assert token in ("-", "")  # no half-received state left behind
    snapshots = zfs("list", "-H", "-t", "snapshot", "-o", "name", "-r", f"{space}/restore").split()
    assert len(snapshots) == 1  # the full stream arrived; the damaged incremental did not


def test_drills_of_a_zfs_group_pass_from_offsite_and_a_local_target_and_clean_up(space: str, tmp_path: Path) -> None:
    import sqlite3

    from snapsync.backends.zfs import ZfsBackend
    from snapsync.recovery.drill import drill

    src, site, _ = offsite_site(space, tmp_path)
    mountpoint = Path(prop(src, "mountpoint"))
    with sqlite3.connect(mountpoint / "app.db") as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(100)])
    conn.close()
    site.text = site.text.replace('targets = ["off"]', f'targets = ["off", "usb"]\n[[groups.app.hooks]]\ntype = "sqlite"\ndatabases = ["{mountpoint}/app.db"]')
    fill(src, 1)
    report = site.step()
    assert all(t.ok for t in report.targets), report.to_json()
    runner = site.runner()
    group = runner.policy.groups["app"]
    for target in ("off", "usb"):
        result = drill(runner.policy, group, target, ZfsBackend(), site.clock.now(), scratch_parent=str(tmp_path))
        assert result.ok, result.to_json()
        checks = {c.name: c for c in result.checks}
        assert checks[f"files {src}"].detail.endswith("identical to the source snapshot")
        assert checks[f"sqlite {mountpoint}/app.db"].detail == "integrity_check ok"
    leftovers = zfs("list", "-H", "-o", "name", "-r", POOL).split()
    assert not [d for d in leftovers if "snapsync-drill" in d]


def test_levelled_uploads_skip_what_retention_drops_and_restore_on_zfs(space: str, tmp_path: Path) -> None:
    """A day's first upload is sent from the day before's first (zfs send -i over the snapshots between),
    the later ones of a day are pruned once the next day comes, and each kept one restores byte for byte."""
    from datetime import timedelta

    from snapsync.plan.offsite import chain

    src, site, target = offsite_site(space, tmp_path)
    site.text = site.text.replace("full_every = 10", 'full_every = "365d"') + "[targets.off.retention]\nkeep_last = 1\nhourly = 0\ndaily = 7\n"
    names = []
    for seed, gap in enumerate([timedelta(0), timedelta(hours=2), timedelta(hours=3), timedelta(hours=20), timedelta(hours=1)]):
        site.clock.advance(gap)
        fill(src, seed, size=600_000)
        report = site.step(prune=True)
        assert report.targets[0].ok, report.to_json()
        names.append(report.snapshot)
    archive = open_archive(target)
    assert verify(archive, "off").ok
    state = next(iter(archive.survey("app").datasets.values()))
    stored = {n: m.stored() for n, m in state.stored.items()}
    assert sorted(stored) == [names[0], names[3], names[4]]  # the first day's later uploads went
    assert stored[names[3]].parent == names[0] and stored[names[4]].parent == names[3]
    zfs("create", "-o", "canmount=off", f"{space}/restore")
    copy = f"{space}/restore/app/" + "/".join(src.split("/"))
    assert [s.name for s in chain(names[4], stored) or []] == [names[0], names[3], names[4]]
    for name in (names[3], names[4]):
        assert restore(archive, "off", "app", f"{space}/restore", snapshot=name).snapshot == name
    listed = zfs("list", "-H", "-t", "snapshot", "-o", "name", "-d", "1", copy).split()
    assert [n.split("@")[1] for n in listed] == [names[0], names[3], names[4]]
    where = mounted_copy(copy)
    for name in (names[3], names[4]):
        assert digest(where / ".zfs" / "snapshot" / name) == digest(snapshot_dir(src, name))
