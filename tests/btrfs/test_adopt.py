"""`snapsync adopt` on real btrfs: a plain directory, as impermanence keeps a service's state under
/persist/system/var/lib, becomes a subvolume in place with every attribute kept, atomically, refused
while in use (a bind mount of it included), and finished by a rerun after a SIGKILL at any step."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import btrfsutil
import pytest

from snapsync.backends.btrfs_adopt import STEPS
from tests.conftest import make_subvolume

pytestmark = pytest.mark.btrfs

_GETFLAGS, _SETFLAGS = 0x80086601, 0x40086602
NOCOW, IMMUTABLE = 0x00800000, 0x10


def snapsync(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapsync", "-p", "/nonexistent/policy.toml", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, check=False,
    )


def _flags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return int(struct.unpack("I", fcntl.ioctl(fd, _GETFLAGS, bytes(4)))[0])
    finally:
        os.close(fd)


def _chattr(path: Path, flag: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        current = struct.unpack("I", fcntl.ioctl(fd, _GETFLAGS, bytes(4)))[0]
        fcntl.ioctl(fd, _SETFLAGS, struct.pack("I", current | flag))
    finally:
        os.close(fd)


def _acl(path: Path, spec: str, default: bool = False) -> None:
    """An ACL as setfacl sets it; without setfacl, the same xattr written directly."""
    if shutil.which("setfacl"):
        subprocess.run(["setfacl", *(["-d"] if default else []), "-m", spec, str(path)], check=True)
        return
    _, uid, perms = spec.split(":")
    bits = sum(b for c, b in zip("rwx", (4, 2, 1)) if c in perms)
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    entries = [(0x01, (mode >> 6) & 7, 0xFFFFFFFF), (0x02, bits, int(uid)), (0x04, (mode >> 3) & 7, 0xFFFFFFFF),
               (0x10, 7, 0xFFFFFFFF), (0x20, mode & 7, 0xFFFFFFFF)]
    value = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(path, "system.posix_acl_default" if default else "system.posix_acl_access", value)


def populate(d: Path) -> None:
    """Everything a service's state can hold, each attribute a copy could lose."""
    (d / "repos" / "a.git").mkdir(parents=True)
    (d / "repos" / "a.git" / "HEAD").write_text("ref: refs/heads/main\n")
    owned = d / "owned"
    owned.write_text("uid 1234, gid 5678\n")
    os.chown(owned, 1234, 5678)
    setuid = d / "helper"
    setuid.write_bytes(b"#!/bin/sh\n")
    os.chmod(setuid, 0o4755)
    shared = d / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    sticky = d / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    _acl(shared, "u:999:rwx")
    _acl(shared, "u:998:rx", default=True)
    _acl(owned, "u:997:rw")
    os.setxattr(owned, "user.origin", b"forgejo")
    os.setxattr(shared, "user.note", b"a directory's xattr")
    (d / "blob").write_bytes(os.urandom(16 << 20))
    os.link(d / "blob", d / "repos" / "blob-link")
    sparse = d / "sparse.img"
    with sparse.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(os.urandom(1 << 20))
    os.symlink("owned", d / "link")
    os.symlink("/nowhere/at/all", d / "dangling")
    os.mkfifo(d / "fifo")
    here = os.getcwd()
    os.chdir(d)  # a socket's path is limited to 108 bytes
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind("socket")
    finally:
        os.chdir(here)
    os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    journal = d / "journal"
    journal.mkdir()
    _chattr(journal, NOCOW)  # as journald and databases set it: a copy must share blocks all the same
    (journal / "system.journal").write_bytes(os.urandom(1 << 20))  # nocow, from its directory
    (d / "archived.tmp").write_bytes(os.urandom(1 << 20))
    os.rename(d / "archived.tmp", journal / "archived.journal")  # a copy-on-write file in a nocow directory
    image = d / "vm.img"
    image.touch()
    _chattr(image, NOCOW)  # and a nocow file in a copy-on-write one
    image.write_bytes(os.urandom(1 << 20))
    frozen = d / "frozen"
    frozen.write_text("chattr +i\n")
    _chattr(frozen, IMMUTABLE)
    os.utime(owned, ns=(1_000_000_000_123_456_789, 1_100_000_000_987_654_321))
    os.utime(d / "link", ns=(1_200_000_000_000_000_001, 1_300_000_000_000_000_001), follow_symlinks=False)
    os.utime(d / "repos" / "a.git", ns=(1_400_000_000_000_000_000, 1_500_000_000_000_000_000))
    os.utime(d, ns=(1_600_000_000_000_000_000, 1_700_000_000_000_000_000))


def describe(top: Path) -> dict[str, object]:
    """Every entry as a copy must keep it: kind, mode, owner, mtime, size, allocated blocks, data,
    xattrs (ACLs are xattrs), link targets, device numbers, file attributes and hard-link groups."""
    entries: dict[str, object] = {}
    inodes: dict[int, list[str]] = {}
    for root, dirs, files in os.walk(top):
        for name in [".", *dirs, *files] if Path(root) == top else [*dirs, *files]:
            path = Path(root) / name if name != "." else top
            rel = os.path.relpath(path, top)
            st = path.lstat()
            entry: dict[str, object] = {
                "type": stat.S_IFMT(st.st_mode), "mode": oct(st.st_mode), "owner": (st.st_uid, st.st_gid),
                "mtime": st.st_mtime_ns,
                "xattrs": {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(os.listxattr(path, follow_symlinks=False))},
            }
            if stat.S_ISREG(st.st_mode):
                entry |= {"size": st.st_size, "blocks": st.st_blocks, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                          "flags": _flags(path) & (NOCOW | IMMUTABLE)}
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode):
                entry["rdev"] = st.st_rdev
            elif stat.S_ISDIR(st.st_mode):
                entry["flags"] = _flags(path) & NOCOW
            entries[rel] = entry
    for names in inodes.values():
        for rel in names:
            entries[rel] = {**entries[rel], "links": sorted(names)}  # type: ignore[dict-item]
    return entries


@pytest.fixture
def service(btrfs_root: Path) -> Path:
    """/persist (a subvolume, the dataset) with the plain directory system/var/lib/forgejo in it."""
    persist = make_subvolume(btrfs_root / "persist")
    d = persist / "system" / "var" / "lib" / "forgejo"
    d.mkdir(parents=True)
    populate(d)
    return d


def beside(d: Path) -> list[str]:
    return sorted(os.listdir(d.parent))


def assert_adopted(d: Path, before: dict[str, object]) -> None:
    assert btrfsutil.is_subvolume(d)
    assert describe(d) == before
    old = d.parent / f"{d.name}.snapsync-adopt-old"
    assert not btrfsutil.is_subvolume(old) and describe(old) == before
    assert beside(d) == sorted([d.name, old.name])


def test_adopt_keeps_every_attribute_and_the_original(service: Path) -> None:
    before = describe(service)
    assert before["sparse.img"]["blocks"] * 512 <= 2 << 20  # type: ignore[index]
    os.sync()  # written data is counted as used once it is allocated
    free = os.statvfs(service).f_bavail * os.statvfs(service).f_frsize
    done = snapsync("adopt", str(service))
    assert done.returncode == 0, done.stderr
    assert f"adopted {service}: it is a subvolume now" in done.stdout
    assert f"rm -rf --one-file-system {service}.snapsync-adopt-old" in done.stdout
    assert_adopted(service, before)
    os.sync()
    used = free - os.statvfs(service).f_bavail * os.statvfs(service).f_frsize
    assert used < 8 << 20, f"the copy took {used} bytes: blocks were copied, not shared"
    again = snapsync("adopt", str(service))
    assert again.returncode == 0 and f"{service}: already a subvolume" in again.stdout, again.stdout + again.stderr


def test_dry_run_changes_nothing(service: Path) -> None:
    before, listing = describe(service), beside(service)
    shown = snapsync("adopt", "--dry-run", str(service))
    assert shown.returncode == 0, shown.stderr
    assert f"would adopt {service}:" in shown.stdout and "swap them in one atomic rename" in shown.stdout
    as_json = snapsync("adopt", "--dry-run", "--json", str(service))
    assert as_json.returncode == 0, as_json.stderr
    (entry,) = json.loads(as_json.stdout)["paths"]
    assert entry["state"] == "directory" and entry["dry_run"] and not entry["adopted"] and entry["steps"]
    assert not btrfsutil.is_subvolume(service)
    assert describe(service) == before and beside(service) == listing


def test_refused_while_a_process_uses_it(service: Path) -> None:
    before, listing = describe(service), beside(service)
    holder = subprocess.Popen(["sleep", "600"], cwd=service / "repos")
    try:
        refused = snapsync("adopt", str(service))
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.count("\n") == 1 and f"pid {holder.pid} (sleep" in refused.stderr
        assert f"kill {holder.pid}" in refused.stderr
        shown = snapsync("adopt", "--dry-run", str(service))  # a dry run shows the plan and what is in the way
        assert shown.returncode == 0 and "in use now, so adopt would refuse" in shown.stdout
    finally:
        holder.kill()
        holder.wait()
    assert describe(service) == before and beside(service) == listing
    assert snapsync("adopt", str(service)).returncode == 0


def test_a_process_elsewhere_on_the_same_subvolume_does_not_count(service: Path) -> None:
    other = service.parent / "postgresql"
    other.mkdir()
    holder = subprocess.Popen(["sleep", "600"], cwd=other)
    try:
        done = snapsync("adopt", str(service))
        assert done.returncode == 0, done.stderr
    finally:
        holder.kill()
        holder.wait()


def test_bind_mount_of_it_is_refused_with_the_commands_then_adopted(service: Path, tmp_path: Path) -> None:
    """Impermanence bind-mounts each persisted directory into place: after a swap that mount would
    still show the original, and the service would write there. So: refuse, say exactly what to do."""
    before = describe(service)
    into = tmp_path / "var" / "lib" / "forgejo"
    into.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(service), str(into)], check=True)
    try:
        refused = snapsync("adopt", str(service))
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"{into} is a mount point (a mount of the data" in refused.stderr
        assert f"umount {into}" in refused.stderr and f"mount --bind {service} {into}" in refused.stderr
        assert not btrfsutil.is_subvolume(service) and describe(service) == before
        at_the_mount = snapsync("adopt", str(into))
        assert at_the_mount.returncode == 2 and f"adopt the directory where it lives ({service}" in at_the_mount.stderr
    finally:
        subprocess.run(["umount", str(into)], check=True)
    done = snapsync("adopt", str(service))  # the commands it gave: unmount, adopt, mount again
    assert done.returncode == 0, done.stderr
    subprocess.run(["mount", "--bind", str(service), str(into)], check=True)
    try:
        (into / "written-after").write_text("through the bind mount\n")
        assert (service / "written-after").read_text() == "through the bind mount\n"
        assert not (service.parent / f"{service.name}.snapsync-adopt-old" / "written-after").exists()
    finally:
        subprocess.run(["umount", str(into)], check=True)


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_is_finished_by_a_rerun(service: Path, step: str) -> None:
    before = describe(service)
    killed = snapsync("adopt", str(service), env={"SNAPSYNC_TEST_KILL_AT": f"adopt: {step}"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert describe(service) == before  # the path always names a whole copy: the original or the verified one
    if step != "done":
        shown = snapsync("adopt", "--dry-run", str(service))
        assert shown.returncode == 0 and "would finish the stopped adopt of" in shown.stdout, shown.stdout + shown.stderr
    rerun = snapsync("adopt", str(service))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert_adopted(service, before)


def test_changes_after_a_stopped_copy_are_copied_again(service: Path) -> None:
    killed = snapsync("adopt", str(service), env={"SNAPSYNC_TEST_KILL_AT": "adopt: verified"})
    assert killed.returncode == -9
    (service / "written-since").write_text("the service ran after the crash\n")  # e.g. a reboot started it
    before = describe(service)
    rerun = snapsync("adopt", str(service))
    assert rerun.returncode == 0, rerun.stderr
    assert "changed after a stopped adopt copied it" in rerun.stdout
    assert btrfsutil.is_subvolume(service) and describe(service) == before


def test_bad_input_is_one_line_and_exit_2(service: Path, tmp_path: Path) -> None:
    file = service / "owned"
    link = service.parent / "forgejo-link"
    link.symlink_to(service)
    holding = service.parent / "docker"
    make_subvolume(holding / "btrfs" / "subvolumes" / "abc")
    elsewhere = tmp_path / "not-btrfs"
    elsewhere.mkdir()
    open_parent = service.parent / "shared-by-all"
    (open_parent / "app").mkdir(parents=True)
    open_parent.chmod(0o777)  # whoever can rename entries there could race the swap
    cases = {
        str(open_parent / "app"): "writable by group or others",
        str(service.parent / "missing"): "does not exist",
        str(file): "not a directory",
        str(link): "is a symlink",
        str(holding): "contains subvolumes",
    }
    if os.stat(tmp_path).st_dev != os.stat(service).st_dev and not btrfsutil.is_subvolume(tmp_path):
        try:
            btrfsutil.subvolume_id(tmp_path)
        except btrfsutil.BtrfsUtilError:
            cases[str(elsewhere)] = "snapsync makes datasets only on"
    for path, said in cases.items():
        refused = snapsync("adopt", path)
        assert refused.returncode == 2, (path, refused.stdout, refused.stderr)
        assert refused.stderr.count("\n") == 1 and said in refused.stderr, (path, refused.stderr)
    # one bad path among good ones: nothing is done to any
    refused = snapsync("adopt", str(service), str(file))
    assert refused.returncode == 2 and not btrfsutil.is_subvolume(service)
    subvolume = service.parent.parent / "already"
    make_subvolume(subvolume)
    already = snapsync("adopt", str(subvolume))
    assert already.returncode == 0 and f"{subvolume}: already a subvolume" in already.stdout


def test_adopt_says_what_the_policy_needs(service: Path, tmp_path: Path) -> None:
    persist = service.parents[3]
    policy = tmp_path / "policy.toml"
    policy.write_text(f'version = 1\n[groups.system]\nbackend = "btrfs"\ndatasets = ["{persist}"]\n')
    shown = subprocess.run(
        [sys.executable, "-m", "snapsync", "-p", str(policy), "adopt", "--dry-run", str(service)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"{service} is inside {persist} (group system), whose snapshots leave it out" in shown.stdout
    assert "groups.system.datasets" in shown.stdout


def test_the_comparison_sees_what_a_copy_lost(service: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check that gates the swap: each attribute a faulty copy could lose is named."""
    from snapsync.backends import btrfs_adopt
    from snapsync.backends.btrfs_adopt import _differences, _Names

    monkeypatch.setattr(btrfs_adopt, "_SHOWN", 100)

    shutil.rmtree(service / "journal")  # plain cp cannot clone these, nor copy chattr +i: the adopt's own job
    (service / "vm.img").unlink()
    subprocess.run(["chattr", "-i", str(service / "frozen")], check=True)
    copy = service.parent / "copy"
    subprocess.run(["cp", "-a", "--reflink=always", str(service), str(copy)], check=True)
    names = _Names(str(service.parent), service.name)
    assert _differences(str(service), str(copy), names) == ([], [])
    os.chmod(copy / "helper", 0o755)
    os.removexattr(copy / "owned", "user.origin")
    os.unlink(copy / "repos" / "blob-link")
    (copy / "repos" / "blob-link").write_bytes((copy / "blob").read_bytes())
    with (copy / "sparse.img").open("r+b") as f:
        f.write(os.urandom(1 << 20))  # a hole filled: same size, more blocks
    os.utime(copy / "repos" / "a.git", ns=(0, 0))
    (copy / "extra").write_text("only in the copy\n")
    found, _ = _differences(str(service), str(copy), names)
    text = "; ".join(found)
    for said in ("helper: mode", "owned: xattrs", "blob-link: hard links", "repos/a.git: mtime", "extra: only in the copy"):
        assert said in text, text
    (copy / "extra").unlink()
    os.chmod(copy / "helper", 0o4755)
    os.setxattr(copy / "owned", "user.origin", b"forgejo")
    os.unlink(copy / "repos" / "blob-link")
    os.link(copy / "blob", copy / "repos" / "blob-link")
    os.utime(copy / "repos" / "a.git", ns=(1_400_000_000_000_000_000, 1_500_000_000_000_000_000))
    os.utime(copy / "repos", ns=(os.stat(service / "repos").st_atime_ns, os.stat(service / "repos").st_mtime_ns))
    os.utime(copy, ns=(os.stat(service).st_atime_ns, os.stat(service).st_mtime_ns))
    os.utime(copy / "sparse.img", ns=(os.stat(service / "sparse.img").st_atime_ns, os.stat(service / "sparse.img").st_mtime_ns))
    os.sync()
    found, _ = _differences(str(service), str(copy), names)
    assert found == [f"{service}/sparse.img: allocated blocks differ"]
