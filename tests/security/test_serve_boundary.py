"""The forced-command server against a hostile client: symlinks planted inside the served root,
deletes of what never arrived by receive, destructive flags under ``--append-only``, a request
line that never ends and a stream that stalls. Every case runs the real ``snapsync serve``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import btrfsutil

from snapsync.backends.btrfs import BtrfsBackend
from tests.conftest import make_subvolume
from tests.security.helpers import receive_snapshot

SERVE = [sys.executable, "-m", "snapsync", "serve"]
KEY = "g/persist/app"


def serve(root: Path, raw: bytes, *extra: str, role: str = "receive", timeout: float = 60) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([*SERVE, "--root", str(root), "--role", role, *extra], input=raw, capture_output=True, timeout=timeout)
    lines = proc.stdout.splitlines()
    assert len(lines) >= 1, (proc.stdout, proc.stderr)
    return proc.returncode, json.loads(lines[0])


def req(op: str, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "op": op, **fields}).encode() + b"\n"


def received_copy(btrfs_root: Path, root: Path, name: str) -> str:
    src = btrfs_root / "src"
    if not src.exists():
        make_subvolume(src, "v")
    btrfsutil.create_snapshot(src, btrfs_root / name, read_only=True)
    receive_snapshot(root, KEY, btrfs_root / name)
    return name


def test_append_only_refuses_a_forced_receive_and_every_delete(btrfs_root: Path, target_root: Path) -> None:
    for name in ("S2", "S3", "S4"):
        received_copy(btrfs_root, target_root, name)
    btrfsutil.create_snapshot(btrfs_root / "src", btrfs_root / "S5", read_only=True)  # force is no rollback on btrfs
    stream = subprocess.run(["btrfs", "send", "-q", str(btrfs_root / "S5")], capture_output=True, check=True).stdout
    guid = btrfsutil.subvolume_info(btrfs_root / "S5").uuid.hex()
    _, answer = serve(target_root, req("receive", path=KEY, name="S5", guid=guid, compress="none", force=True) + stream, "--append-only")
    assert answer["ok"] is True, answer
    for flags in ({"allow_writable": False, "partial": False}, {"allow_writable": True, "partial": False}):
        _, answer = serve(target_root, req("delete", path=KEY, names=["S2", "S3", "S4"], **flags), "--append-only")
        assert answer["ok"] is False and "append-only" in answer["error"]
    _, answer = serve(target_root, req("delete", path=KEY, names=["S2", "S3", "S4"], allow_writable=False, partial=True), "--append-only")
    assert answer["ok"] is True and answer["deleted"] == []
    assert sorted(p.name for p in (target_root / KEY).iterdir() if not p.name.startswith(".")) == ["S2", "S3", "S4", "S5"]


def test_only_received_copies_are_ever_deleted(btrfs_root: Path, target_root: Path) -> None:
    """``allow_writable`` lets a diverged copy go; it never reaches a subvolume that somebody made
    on the backup host (no received_uuid), writable or read-only."""
    received_copy(btrfs_root, target_root, "S1")
    made = make_subvolume(target_root / KEY / "made-here", "local data")
    btrfsutil.create_snapshot(made, target_root / KEY / "made-ro", read_only=True)
    for name in ("made-here", "made-ro"):
        for allow in (False, True):
            _, answer = serve(target_root, req("delete", path=KEY, names=[name], allow_writable=allow, partial=False))
            assert answer["ok"] is False and "did not arrive by receive" in answer["error"], answer
    assert (made / "data.txt").read_text() == "local data"
    btrfsutil.set_subvolume_read_only(target_root / KEY / "S1", False)  # a received copy changed on the target
    _, answer = serve(target_root, req("delete", path=KEY, names=["S1"], allow_writable=False, partial=False))
    assert answer["ok"] is False and "made writable" in answer["error"]
    _, answer = serve(target_root, req("delete", path=KEY, names=["S1"], allow_writable=True, partial=False))
    assert answer["ok"] is True and answer["deleted"] == ["S1"]


def test_send_role_never_follows_a_symlink_out_of_the_root(btrfs_root: Path, tmp_path: Path) -> None:
    served = btrfs_root / "served"
    data = make_subvolume(served / "persist" / "app", "v")
    outside = make_subvolume(btrfs_root / "elsewhere" / "db", "secret")
    backend = BtrfsBackend()
    backend.snapshot_group([str(outside)], "snapsync_2026-12-01T00:00:00Z")
    (served / "persist" / ".snapsync").mkdir(mode=0o700)
    os.symlink(backend.snapshot_path(str(outside)), served / "persist" / ".snapsync" / "app")
    os.symlink(btrfs_root / "elsewhere", served / "escape")
    for raw in (
        req("hold", path="persist/app", tag="pull:h.p", names=["snapsync_2026-12-01T00:00:00Z"]),
        req("list", paths=["persist/app"]),
        req("send", path="persist/app", name="snapsync_2026-12-01T00:00:00Z", compress="none"),
        req("hold", path="escape/db", tag="pull:h.p", names=["snapsync_2026-12-01T00:00:00Z"]),
        req("send", path="escape/db", name="snapsync_2026-12-01T00:00:00Z", compress="none"),
        req("list", paths=["escape/db"]),
        req("sizes", paths=["escape/db"]),
        req("stat", path="escape/db", file="data.txt"),
        req("stat", path="persist/app", file="data.txt"),
    ):
        _, answer = serve(served, raw, role="send")
        assert answer["ok"] is False, (raw, answer)
        assert "\n" not in answer["error"]
    assert not (backend.snapshot_path(str(outside)) / ".holds.json").exists()
    assert data.exists()


def test_a_request_line_that_never_ends_is_given_up(target_root: Path) -> None:
    proc = subprocess.Popen(
        [*SERVE, "--root", str(target_root), "--role", "receive", "--stall-timeout", "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(b'{"v": 1, "op": "list", "paths": [')
    proc.stdin.flush()  # the line is never finished and the connection stays open
    assert proc.stdout is not None
    started = time.monotonic()
    answer = json.loads(proc.stdout.readline())
    assert answer["ok"] is False and "no complete request line within 2s" in answer["error"], answer
    assert time.monotonic() - started < 20
    proc.stdin.close()
    assert proc.wait(10) == 2


def test_a_stalled_stream_is_stopped_and_releases_the_lock(btrfs_root: Path, target_root: Path) -> None:
    received_copy(btrfs_root, target_root, "S1")
    btrfsutil.create_snapshot(btrfs_root / "src", btrfs_root / "S2", read_only=True)
    stream = subprocess.run(["btrfs", "send", "-q", str(btrfs_root / "S2")], capture_output=True, check=True).stdout
    guid = btrfsutil.subvolume_info(btrfs_root / "S2").uuid.hex()
    stalled = subprocess.Popen(
        [*SERVE, "--root", str(target_root), "--role", "receive", "--stall-timeout", "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert stalled.stdin is not None
    stalled.stdin.write(req("receive", path=KEY, name="S2", guid=guid, compress="none", force=False) + stream[: len(stream) // 2])
    stalled.stdin.flush()  # and then nothing more, with the connection left open
    started = time.monotonic()
    assert stalled.stdout is not None
    line = stalled.stdout.readline()
    waited = time.monotonic() - started
    answer = json.loads(line)
    assert answer["ok"] is False and "no data for 2s" in answer["error"], answer
    assert waited < 20
    stalled.stdin.close()
    stalled.wait(10)
    code, answer = serve(target_root, req("receive", path=KEY, name="S2", guid=guid, compress="none", force=False) + stream)
    assert answer["ok"] is True, answer
    assert not any((target_root / KEY / ".incoming").iterdir())


def test_stat_reads_only_where_a_restore_could_and_follows_nothing_out(btrfs_root: Path, target_root: Path) -> None:
    """``versions --targets`` asks the backup host for a file in each copy: only a key that may read the
    copies back gets an answer, a symlink inside a copy leads nowhere, and no path leaves the copy."""
    src = make_subvolume(btrfs_root / "src", "v")
    (src / "etc").mkdir()
    (src / "etc" / "app.ini").write_text("port = 3000\n")
    (btrfs_root / "elsewhere").mkdir()
    (btrfs_root / "elsewhere" / "secret").write_text("not in any copy\n")
    os.symlink(btrfs_root / "elsewhere", src / "out")  # a link inside the copy, to outside it
    btrfsutil.create_snapshot(src, btrfs_root / "S1", read_only=True)
    receive_snapshot(target_root, KEY, btrfs_root / "S1")

    code, answer = serve(target_root, req("stat", path=KEY, file="etc/app.ini"))
    assert code == 2 and answer["ok"] is False and "--allow-restore" in answer["error"]  # a receive-only key reads nothing back
    code, answer = serve(target_root, req("stat", path=KEY, file="etc/app.ini"), "--allow-restore")
    assert code == 0 and answer["found"] == [
        {"name": "S1", "created": answer["found"][0]["created"], "kind": "file", "size": 12,
         "mtime_ns": (src / "etc" / "app.ini").stat().st_mtime_ns}]
    _, answer = serve(target_root, req("stat", path=KEY, file="out/secret"), "--allow-restore")
    assert answer["ok"] is True and answer["found"] == []  # the link is not followed
    _, answer = serve(target_root, req("stat", path=KEY, file="out"), "--allow-restore")
    assert [f["kind"] for f in answer["found"]] == ["symlink"]
    for bad in ("../S1/etc/app.ini", "/etc/passwd", "etc/../../x", "etc//app.ini", "etc/\x00", "a" * 256, "x/" * 2100, 7, ""):
        code, answer = serve(target_root, req("stat", path=KEY, file=bad), "--allow-restore")
        assert code == 2 and answer["ok"] is False and "file" in answer["error"], bad
    code, answer = serve(target_root, req("stat", path="../outside", file="etc/app.ini"), "--allow-restore")
    assert code == 2 and answer["ok"] is False
    code, answer = serve(target_root, req("stat", path=KEY, file="etc/app.ini", follow=True), "--allow-restore")
    assert code == 2 and "unknown request field" in answer["error"]
