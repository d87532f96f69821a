"""`snapsync versions PATH` on real btrfs snapshots: distinct versions, newest first, nothing followed out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from snapsync.ops.versions import Version, distinct
from tests.btrfs.test_cli import _write_policy, snapsync
from tests.conftest import make_subvolume


def test_runs_of_identical_versions_collapse_into_their_newest() -> None:
    def v(snap: str, size: int, mtime: int) -> Version:
        return Version(snap, None, f"/{snap}/f", "file", size, mtime)

    got = distinct([v("live", 3, 30), v("s4", 3, 30), v("s3", 2, 20), v("s2", 2, 20), v("s1", 3, 30)])
    assert [(x.snapshot, x.also_in) for x in got] == [("live", ("s4",)), ("s3", ("s2",)), ("s1", ())]  # the same again later is a version again
    assert distinct([]) == []
    there = Version("nas:s5", None, "nas:g@s5", "file", 3, 30, target="nas")
    (one,) = distinct([there, v("s4", 3, 30)])
    assert (one.snapshot, one.also_in) == ("s4", ("nas:s5",))  # the same version here is the one to read


def three_datasets(tmp_path: Path, btrfs_root: Path) -> tuple[Path, Path]:
    """test_cli's three datasets and policy; returns the policy and group web's dataset."""
    for leaf in ("web data", "pg", "wal"):
        make_subvolume(btrfs_root / "persist" / leaf, leaf)
    return _write_policy(tmp_path, btrfs_root), btrfs_root / "persist" / "web data"


def _take(policy: Path) -> str:
    done = snapsync("-p", str(policy), "snapshot", "--json", "web")
    assert done.returncode == 0, done.stderr
    time.sleep(1.1)  # snapshot names are to the second
    return str(json.loads(done.stdout)["groups"][0]["snapshot"])


def test_every_distinct_version_of_a_file_newest_first(tmp_path: Path, btrfs_root: Path) -> None:
    policy, data = three_datasets(tmp_path, btrfs_root)
    target = data / "site" / "index.html"
    target.parent.mkdir()
    target.write_text("one\n")
    first = _take(policy)
    target.write_text("two, longer\n")
    os.utime(target, (1_800_000_000, 1_800_000_000))
    second = _take(policy)
    third = _take(policy)  # nothing changed: the same version as the second
    target.write_text("three\n")

    done = snapsync("-p", str(policy), "versions", str(target), "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["group"] == "web" and found["path"] == "site/index.html"
    versions = found["versions"]
    assert [v["snapshot"] for v in versions] == ["(live)", third, first]
    assert versions[1]["also_in"] == [second] and versions[1]["size"] == len("two, longer\n")
    assert versions[1]["mtime"] == "2027-01-15T08:00:00Z"
    assert Path(versions[2]["path"]).read_text() == "one\n"  # where the old version can be read

    text = snapsync("-p", str(policy), "versions", str(target))
    assert text.returncode == 0 and first in text.stdout and "1 more" in text.stdout

    directory = json.loads(snapsync("-p", str(policy), "versions", str(target.parent), "--json").stdout)["versions"]
    assert directory and all(v["kind"] == "directory" for v in directory)

    outside = snapsync("-p", str(policy), "versions", "/etc/passwd")
    assert outside.returncode == 2 and len(outside.stderr.strip().splitlines()) == 1 and "not inside any dataset" in outside.stderr


def test_a_symlink_in_a_snapshot_is_not_followed_out_of_it(tmp_path: Path, btrfs_root: Path) -> None:
    policy, data = three_datasets(tmp_path, btrfs_root)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key").write_text("not yours\n")
    (data / "conf").symlink_to(outside)  # in the snapshot, conf/ leads out of it
    _take(policy)
    (data / "conf").unlink()
    (data / "conf").mkdir()
    (data / "conf" / "key").write_text("mine\n")
    versions = json.loads(snapsync("-p", str(policy), "versions", str(data / "conf" / "key"), "--json").stdout)["versions"]
    assert [v["snapshot"] for v in versions] == ["(live)"]  # the snapshot's conf is a symlink: no version there


def _meta(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a restore must keep, per path below ``root``: type, mode, owner, size, mtime, inode links
    within the tree (as groups of names), xattrs (ACLs among them), and the data."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for path in sorted([root, *root.rglob("*")]):
        st = os.lstat(path)
        rel = path.relative_to(root).as_posix()
        inodes.setdefault(st.st_ino, []).append(rel)
        xattrs = {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(os.listxattr(path, follow_symlinks=False))}
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else os.readlink(path) if path.is_symlink() else b""
        out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size if not path.is_dir() else 0, st.st_mtime_ns, tuple(xattrs.items()), data)
    out["(hard links)"] = tuple(sorted(tuple(v) for v in inodes.values() if len(v) > 1))
    return out


def test_one_directory_comes_back_from_a_snapshot_with_all_its_metadata(tmp_path: Path, btrfs_root: Path) -> None:
    policy, data = three_datasets(tmp_path, btrfs_root)
    site = data / "site"
    (site / "sub").mkdir(parents=True)
    (site / "a.txt").write_text("alpha\n")
    os.link(site / "a.txt", site / "sub" / "a-again.txt")
    (site / "b.bin").write_bytes(os.urandom(200_000))
    (site / "link").symlink_to("a.txt")
    os.chown(site / "b.bin", 1234, 5678)
    os.chmod(site / "b.bin", 0o640)
    os.setxattr(site / "a.txt", "user.note", b"kept")
    subprocess.run(["setfacl", "-m", "u:4321:rw", str(site / "b.bin")], check=True)
    os.utime(site / "sub", (1_700_000_000, 1_700_000_000))
    before = _meta(site)
    taken = _take(policy)
    shutil.rmtree(site)  # lost
    out = tmp_path / "out"
    out.mkdir()

    done = snapsync("-p", str(policy), "restore", f"web@{taken}", "--path", str(site), "--to", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert [d["snapshot"] for d in json.loads(done.stdout)["paths"]] == [taken]
    assert _meta(out / "site") == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no hidden leftover

    again = snapsync("-p", str(policy), "restore", "web", "--path", str(site), "--to", str(out))
    assert again.returncode == 2 and "exists; nothing restored" in again.stderr and _meta(out / "site") == before
    (out / "site" / "a.txt").write_text("changed since\n")
    over = snapsync("-p", str(policy), "restore", "web", "--path", str(site / "a.txt"), "--to", str(out / "site"), "--overwrite", "--json")
    assert over.returncode == 0, over.stderr
    kept = Path(json.loads(over.stdout)["paths"][0]["kept_aside"])
    assert kept.read_text() == "changed since\n" and (out / "site" / "a.txt").read_text() == "alpha\n"

    for args, word in ((["--in-place"], "not --in-place"), ([], "--to")):
        refused = snapsync("-p", str(policy), "restore", "web", "--path", str(site), *args)
        assert refused.returncode == 2 and word in refused.stderr, refused.stderr
    wrong = snapsync("-p", str(policy), "restore", "db", "--path", str(site), "--to", str(out))
    assert wrong.returncode == 2 and "in group web" in wrong.stderr

    (site.parent / "two.txt").write_text("two\n")
    (site.parent / "three.txt").write_text("three\n")
    both = _take(policy)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "three.txt").write_text("in the way\n")
    blocked = snapsync("-p", str(policy), "restore", "web", "--path", str(site.parent / "two.txt"), "--path", str(site.parent / "three.txt"),
                       "--to", str(fresh))
    assert blocked.returncode == 2 and not (fresh / "two.txt").exists()  # every path checked before any is copied
    (fresh / "three.txt").unlink()
    many = snapsync("-p", str(policy), "restore", f"web@{both}", "--path", str(site.parent / "two.txt"), "--path",
                    str(site.parent / "three.txt"), "--to", str(fresh), "--json")
    assert many.returncode == 0, many.stderr
    assert len(json.loads(many.stdout)["paths"]) == 2 and (fresh / "two.txt").read_text() == "two\n" and (fresh / "three.txt").read_text() == "three\n"


def test_a_path_is_found_through_a_bind_mount_as_impermanence_shows_it(tmp_path: Path, btrfs_root: Path) -> None:
    """/var/lib/web is /persist/web data/state bind-mounted: versions and restore --path take either name."""
    policy, data = three_datasets(tmp_path, btrfs_root)
    state = data / "state"
    state.mkdir()
    (state / "app.db").write_text("rows v1\n")
    shown = tmp_path / "var-lib-web"
    shown.mkdir()
    subprocess.run(["mount", "--bind", str(state), str(shown)], check=True)
    try:
        taken = _take(policy)
        (shown / "app.db").write_text("rows v2, after the snapshot\n")
        found = json.loads(snapsync("-p", str(policy), "versions", str(shown / "app.db"), "--json").stdout)
        assert found["group"] == "web" and found["path"] == "state/app.db"
        assert [v["snapshot"] for v in found["versions"]] == ["(live)", taken]
        out = tmp_path / "out"
        out.mkdir()
        done = snapsync("-p", str(policy), "restore", "web", "--path", str(shown / "app.db"), "--to", str(out))
        assert done.returncode == 0, done.stderr
        assert (out / "app.db").read_text() == "rows v1\n"
    finally:
        subprocess.run(["umount", str(shown)], check=True)


def test_a_version_pruned_here_is_found_on_a_target_and_comes_back_from_it(tmp_path: Path, btrfs_root: Path, target_root: Path) -> None:
    """--targets asks each target's copies (``serve``'s read-only stat); the version only the target still
    holds is listed with where it is, and a path restore from that target gives it back byte for byte."""
    import btrfsutil

    for leaf in ("web data", "pg", "wal"):
        make_subvolume(btrfs_root / "persist" / leaf, leaf)
    policy = _write_policy(tmp_path, btrfs_root, f'[targets.usb]\ntype = "local"\npath = "{target_root}"\n')
    policy.write_text(policy.read_text().replace('[groups.web]\n', '[groups.web]\ntargets = ["usb"]\n'))
    data = btrfs_root / "persist" / "web data"
    conf = data / "conf" / "app.ini"
    conf.parent.mkdir()
    conf.write_text("port = 3000\n")
    os.setxattr(conf, "user.origin", b"first")
    os.chown(conf, 1000, 1000)
    want = _meta(conf.parent)
    first = _take(policy)
    conf.write_text("port = 3001, changed\n")
    second = _take(policy)
    assert snapsync("-p", str(policy), "replicate", "--no-prune").returncode == 0
    listed = json.loads(snapsync("-p", str(policy), "versions", str(conf), "--json").stdout)["versions"]
    btrfsutil.delete_subvolume(Path(next(v["path"] for v in listed if v["snapshot"] == first)).parent.parent)  # pruned here

    here = json.loads(snapsync("-p", str(policy), "versions", str(conf), "--json").stdout)
    assert [v["snapshot"] for v in here["versions"]] == ["(live)"]  # live is the second version; the first is gone here
    found = snapsync("-p", str(policy), "versions", str(conf), "--targets", "--json")
    assert found.returncode == 0, found.stderr
    versions = json.loads(found.stdout)["versions"]
    assert [(v["snapshot"], v["target"], v["also_in"]) for v in versions] == [
        ("(live)", None, [second, f"usb:{second}"]), (f"usb:{first}", "usb", [])]
    assert versions[1]["size"] == len("port = 3000\n") and versions[1]["path"] == f"usb:web@{first}"
    text = snapsync("-p", str(policy), "versions", str(conf), "-t", "usb")
    assert text.returncode == 0 and f"usb:{first}" in text.stdout and "--from TARGET" in text.stdout

    out = tmp_path / "out"
    out.mkdir()
    done = snapsync("-p", str(policy), "restore", f"web@{first}", "--from", "usb", "--path", str(conf.parent), "--to", str(out))
    assert done.returncode == 0, done.stderr
    assert _meta(out / "conf") == want  # data, owner, mode, mtime and xattrs as they were in the first snapshot

    unknown = snapsync("-p", str(policy), "versions", str(conf), "--target", "nas")
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1 and "no target 'nas'" in unknown.stderr
    policy.write_text(policy.read_text().replace(f'path = "{target_root}"', f'path = "{target_root}-unplugged"'))  # a note, not a failure
    gone = json.loads(snapsync("-p", str(policy), "versions", str(conf), "--targets", "--json").stdout)
    assert [v["snapshot"] for v in gone["versions"]] == ["(live)"] and gone["notes"] and gone["notes"][0].startswith("target usb (")


def test_what_a_killed_restore_left_is_removed_by_the_next(tmp_path: Path, btrfs_root: Path) -> None:
    """A restore killed mid-copy leaves only a hidden ``.NAME.snapsync-restore-PID``; the next restore of
    that path removes it once that process is gone, and leaves one whose process still runs."""
    policy, data = three_datasets(tmp_path, btrfs_root)
    (data / "site").mkdir()
    (data / "site" / "index.html").write_text("home\n")
    _take(policy)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["sleep", "60"])
    dead.kill()
    dead.wait()
    running = subprocess.Popen(["sleep", "60"])
    try:
        for pid in (dead.pid, running.pid):
            (out / f".site.snapsync-restore-{pid}").mkdir()
            (out / f".site.snapsync-restore-{pid}" / "half.html").write_text("ho")
        (out / ".other.snapsync-restore-1").mkdir()  # another path's: not this restore's to judge
        done = snapsync("-p", str(policy), "restore", "web", "--path", str(data / "site"), "--to", str(out))
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in out.iterdir()) == sorted([".other.snapsync-restore-1", f".site.snapsync-restore-{running.pid}", "site"])
        assert (out / "site" / "index.html").read_text() == "home\n"
    finally:
        running.kill()
        running.wait()
