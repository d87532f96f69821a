"""A hostile ZFS send stream against ``ZfsReceiver``: which ``zfs`` commands run, and which never do.

Against a fake ``zfs`` on PATH that keeps a tiny pool in a JSON file: this proves the commands
snapsync builds (the ``-o``/``-x`` of every receive, no ``-F`` on an append-only store), that a
stream is refused from its first record before any ``zfs receive`` or ``zfs create`` runs, and that
what a receive created is destroyed again, one named dataset or snapshot at a time, never ``-r``.
That real OpenZFS does what these commands say is proven in the guest:
``vm-tests/guest/test_zfs_security.py``.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapsync.protocol import Refused
from snapsync.backends.zfs_receiver import (
    BEGIN_SIZE, EXCLUDED, Stalled, StoreRefused, ZfsReceiver, check_single, parse_begin,
)

ROOT = "tank/backup"
NAME = "snapsync_2026-11-26T12:00:00Z"
GUID = 1234567890123
MAGIC = 0x2F5BACBAC

FAKE = r'''#!PYTHON
"""A pool of a few datasets in a JSON file, enough for ZfsReceiver's commands."""
import json, os, struct, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ZFS_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
path = os.environ["FAKE_ZFS_STATE"]
state = json.load(open(path))
ds, snaps, props = state["datasets"], state["snapshots"], state["props"]
def save():
    json.dump(state, open(path, "w"))
def missing(name):
    sys.exit(f"cannot open '{name}': dataset does not exist")
def below(name, top):
    return name == top or name.startswith(top + "/")
if args[0] == "list":
    names = [a for a in args[1:] if "/" in a or a in ds]
    if "-r" in args or "-d" in args:
        top = args[-1]
        if top not in ds:
            missing(top)
        for d in sorted(ds):
            if below(d, top) and ("-r" in args or d == top):
                if "-d" in args:
                    print(f"{d}\t1\t1\t1790000000\t0\t{ds[d] or '-'}")
                else:
                    print(f"{d}\t1\t{ds[d] or '-'}")
        for s, g in sorted(snaps.items()):
            d = s.partition("@")[0]
            if below(d, top) and ("-r" in args or d == top):
                print(f"{s}\t{g}\t1\t1790000000\t0\t-" if "-d" in args else f"{s}\t{g}\t-")
    else:
        gone = [n for n in args[4:] if n not in ds]
        for n in args[4:]:
            if n in ds:
                print(n)
        if gone:
            missing(gone[0])
elif args[0] == "create":
    ds[args[-1]] = None
    save()
elif args[0] == "destroy":
    if args[1].startswith("-"):
        sys.exit("the fake refuses every destroy flag")
    target = args[1]
    if "@" in target:
        d, _, names = target.partition("@")
        for n in names.split(","):
            snaps.pop(f"{d}@{n}", None)
    else:
        if any(below(d, target) and d != target for d in ds) or any(s.startswith(target + "@") for s in snaps):
            sys.exit(f"cannot destroy '{target}': filesystem has children")
        ds.pop(target)
    save()
elif args[0] == "get":
    for n in args[6:]:
        for p, (v, src) in props.get(n, {}).items():
            print(f"{n}\t{p}\t{src}\t{v}")
        if "@" not in n and "keylocation" not in props.get(n, {}):
            print(f"{n}\tkeylocation\tdefault\tnone")
elif args[0] == "receive" and args[1] == "-A":
    ds[args[2]] = None
    save()
elif args[0] == "receive":
    data = sys.stdin.buffer.read()
    with open(os.environ["FAKE_ZFS_LOG"] + ".stream", "wb") as f:
        f.write(data)
    toguid = struct.unpack_from("<Q", data, 40)[0]
    target = args[-1]
    if "@" not in target:  # a resume: the snapshot is named by the stream
        target += "@" + data[56:312].split(b"\0")[0].decode().partition("@")[2]
    d, _, name = target.partition("@")
    how = os.environ.get("FAKE_RECEIVE", "ok")
    if how == "fail":
        sys.exit("cannot receive: invalid backup stream")
    ds.setdefault(d, None)
    if how == "partial":
        ds[d] = "1-abc-def-0123"
        save()
        sys.exit("cannot receive: stream ended prematurely")
    snaps[target] = str(999 if how == "wrongguid" else toguid)
    if how == "child":
        ds[d + "/evil"] = None
        snaps[d + "/evil@" + name] = "42"
    if how == "prop":
        props.setdefault(d, {})["mountpoint"] = ["/etc", "received"]
    if how == "keylocation":  # what a raw -p stream does: a local keylocation, not a received one
        props.setdefault(d, {})["keylocation"] = ["file:///etc/shadow", "local"]
    if how == "snapprop":  # a multi-line value, as PostgreSQL's backup_label is
        props.setdefault(target, {})["snapsync:backup_label"] = ["START WAL\nforged\tlabel", "received"]
    save()
elif args[0] == "send":
    print(os.environ.get("FAKE_TOKEN", "resume token contents:\nnvlist version: 0\n"))
'''


def begin(
    *, toname: str = f"tank/src@{NAME}", toguid: int = GUID, fromguid: int = 0, hdrtype: int = 1, objset: int = 2,
    flags: int = 0, features: int = 0x4, order: str = "<", payload: bytes = b"",
) -> bytes:
    """A DRR_BEGIN record as ``zfs send`` writes it (``include/sys/zfs_ioctl.h``), plus payload."""
    versioninfo = (features << 2) | hdrtype
    record = struct.pack(order + "IIQQQIIQQ256s", 0, len(payload), MAGIC, versioninfo, 1790000000, objset, flags,
                         toguid, fromguid, toname.encode())
    record += b"\0" * (BEGIN_SIZE - len(record))
    return record + payload


@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pool]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "zfs"
    script.write_text(FAKE.replace("PYTHON", sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    p = Pool(tmp_path / "zfs.log", tmp_path / "state.json")
    p.log.touch()
    p.write({"datasets": {"tank": None, ROOT: None}, "snapshots": {}, "props": {}})
    monkeypatch.setenv("FAKE_ZFS_LOG", str(p.log))
    monkeypatch.setenv("FAKE_ZFS_STATE", str(p.path))
    yield p


class Pool:
    def __init__(self, log: Path, path: Path) -> None:
        self.log = log
        self.path = path

    def write(self, state: dict[str, Any]) -> None:
        self.path.write_text(json.dumps(state))

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.path.read_text())
        return data

    def calls(self, sub: str | None = None) -> list[list[str]]:
        out = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [c for c in out if sub is None or c[0] == sub]

    def existing(self, *snapshots: tuple[str, str]) -> None:
        state = self.state()
        for full, guid in snapshots:
            state["datasets"][full.partition("@")[0]] = None
            state["snapshots"][full] = guid
        for d in list(state["datasets"]):
            parts = d.split("/")
            for i in range(1, len(parts)):
                state["datasets"].setdefault("/".join(parts[:i]), None)
        self.write(state)


def fed(data: bytes) -> int:
    """A pipe that carries ``data`` and then ends, as serve's stdin would."""
    read_end, write_end = os.pipe()

    def write() -> None:
        try:
            with open(write_end, "wb") as f:
                f.write(data)
        except BrokenPipeError:
            pass

    threading.Thread(target=write, daemon=True).start()
    return read_end


def receive(store: ZfsReceiver, data: bytes, rel: str = "app/tank/src", name: str = NAME, guid: int | str = GUID,
            force: bool = False) -> dict[str, object]:
    fd = fed(data)
    try:
        return store.receive(rel, name, str(guid), fd, force=force)
    finally:
        os.close(fd)


COPY = f"{ROOT}/app/tank/src"


# --- the command line -------------------------------------------------------------------------


def test_every_receive_excludes_what_acts_on_the_receiving_host() -> None:
    argv = ZfsReceiver(ROOT)._receive_argv(COPY, False, parse_begin(begin()), NAME)
    assert argv[:5] == ["zfs", "receive", "-s", "-u", "-h"] and "-F" not in argv
    assert argv[-1] == f"{COPY}@{NAME}"  # the snapshot name is ours, never the stream's
    options = list(zip(argv[5:-1:2], argv[6:-1:2]))
    assert options[0] == ("-o", "canmount=noauto")
    excluded = [v for o, v in options if o == "-x"]
    for prop in ("mountpoint", "sharenfs", "sharesmb", "exec", "setuid", "devices", "refreservation", "reservation",
                 "keylocation", "snapsync:backup_label", "snapsync:rollback-mountpoint", "snapsync:rollback-canmount"):
        assert prop in excluded
    names = [v.partition("=")[0] for _, v in options]
    assert len(names) == len(set(names)), "zfs refuses a property given twice"


def test_a_raw_stream_does_not_exclude_keylocation_which_zfs_refuses_for_raw() -> None:
    raw = parse_begin(begin(features=0x4 | (1 << 24)))
    argv = ZfsReceiver(ROOT)._receive_argv(COPY, False, raw, NAME)
    assert "keylocation" not in argv and all(p in argv for p in EXCLUDED)


def test_force_is_minus_F_and_impossible_on_an_append_only_store() -> None:
    assert "-F" in ZfsReceiver(ROOT)._receive_argv(COPY, True)
    with pytest.raises(StoreRefused, match="append-only"):
        ZfsReceiver(ROOT, append_only=True)._receive_argv(COPY, True)
    assert isinstance(StoreRefused("x"), Refused)  # serve answers kind "refused", exit 2


# --- the first record -------------------------------------------------------------------------


def test_both_byte_orders_parse() -> None:
    little, big = parse_begin(begin()), parse_begin(begin(order=">"))
    assert little == parse_begin(begin()) and (big.toguid, big.toname, big.hdrtype) == (GUID, f"tank/src@{NAME}", 1)


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (begin(hdrtype=2), "replication stream"),
        (begin(flags=1), "clone stream"),
        (begin(objset=1), "volume"),
        (begin(objset=3), "not a filesystem"),
        (begin(toname="tank/src"), "not a snapshot"),
        (begin(toname="tank/src@a@b"), "not a snapshot"),
        (b"\x00" * 312, "magic"),
        (os.urandom(400), "magic"),
        (b"short", "ended after 5 bytes"),
    ],
    ids=["compound", "clone", "volume", "objset", "no-snapshot", "two-at", "zeros", "random", "short"],
)
def test_what_snapsync_never_sends_is_refused_by_its_first_record(record: bytes, match: str) -> None:
    with pytest.raises(StoreRefused, match=match):
        check_single(parse_begin(record[:BEGIN_SIZE]))


@pytest.mark.parametrize(
    ("record", "match"),
    [
        (begin(hdrtype=2), "replication stream"),
        (begin(toname="tank/src@other"), "not of a snapshot named"),
        (begin(toguid=GUID + 1), "carries guid"),
        (begin(fromguid=77), "is incremental"),
        (os.urandom(4096), "not a ZFS send stream"),
        (b"", "ended after 0 bytes"),
    ],
    ids=["compound", "other-name", "other-guid", "incremental-for-nothing", "junk", "empty"],
)
def test_a_refused_stream_runs_no_receive_and_creates_nothing(pool: Pool, record: bytes, match: str) -> None:
    before = pool.state()
    with pytest.raises(StoreRefused, match=match):
        receive(ZfsReceiver(ROOT), record + (os.urandom(1000) if record else b""))
    assert pool.calls("receive") == [] and pool.calls("create") == [] and pool.calls("destroy") == []
    assert pool.state() == before  # not even an empty parent


def test_a_full_stream_for_an_existing_copy_and_a_foreign_base_are_refused(pool: Pool) -> None:
    pool.existing((f"{COPY}@old", "55"))
    with pytest.raises(StoreRefused, match="full stream that would replace it"):
        receive(ZfsReceiver(ROOT), begin())
    with pytest.raises(StoreRefused, match="does not have"):
        receive(ZfsReceiver(ROOT), begin(fromguid=56))
    assert pool.calls("receive") == []


# --- after the receive ------------------------------------------------------------------------


def test_a_good_full_stream_lands_below_new_parents(pool: Pool) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    done = receive(ZfsReceiver(ROOT), begin() + payload)
    assert done["name"] == NAME
    assert pool.state()["snapshots"] == {f"{COPY}@{NAME}": str(GUID)}
    assert [c[-1] for c in pool.calls("create")] == [f"{ROOT}/app", f"{ROOT}/app/tank"]
    assert Path(str(pool.log) + ".stream").read_bytes() == begin() + payload  # every byte, in order


@pytest.mark.parametrize("how", ["wrongguid", "child", "prop", "snapprop", "keylocation"])
def test_what_a_full_receive_created_is_destroyed_when_it_fails_verification(pool: Pool, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    monkeypatch.setenv("FAKE_RECEIVE", how)
    before = pool.state()
    with pytest.raises(StoreRefused, match="refused the stream"):
        receive(ZfsReceiver(ROOT), begin())
    assert pool.state()["datasets"] == before["datasets"] and pool.state()["snapshots"] == {}
    destroys = pool.calls("destroy")
    assert all(not a.startswith("-") for c in destroys for a in c[1:]), destroys  # never -r, -R or -f
    assert destroys[-2:] == [["destroy", f"{ROOT}/app/tank"], ["destroy", f"{ROOT}/app"]]  # the parents it made, last


@pytest.mark.parametrize("how", ["wrongguid", "child", "prop", "snapprop"])
def test_an_incremental_that_fails_verification_loses_only_its_own_snapshot(pool: Pool, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    pool.existing((f"{COPY}@old", "55"), (f"{ROOT}/other@keep", "66"))
    monkeypatch.setenv("FAKE_RECEIVE", how)
    with pytest.raises(StoreRefused):
        receive(ZfsReceiver(ROOT), begin(fromguid=55))
    state = pool.state()
    assert state["snapshots"] == {f"{COPY}@old": "55", f"{ROOT}/other@keep": "66"}
    assert COPY in state["datasets"] and f"{ROOT}/other" in state["datasets"]
    assert ["destroy", COPY] not in pool.calls("destroy")


def test_an_administrators_keylocation_on_a_copy_does_not_block_incrementals(pool: Pool) -> None:
    pool.existing((f"{COPY}@s1", "1"))
    state = pool.state()
    state["props"][COPY] = {"keylocation": ["file:///root/copy.key", "local"]}
    pool.write(state)
    assert receive(ZfsReceiver(ROOT), begin(fromguid=1))["name"] == NAME
    assert pool.calls("destroy") == []


def test_a_failed_full_receive_leaves_no_empty_parent(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_RECEIVE", "fail")
    before = pool.state()
    with pytest.raises(Exception, match="invalid backup stream"):
        receive(ZfsReceiver(ROOT), begin())
    assert pool.state() == before


def test_an_interrupted_receive_keeps_its_resumable_state_and_parents(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_RECEIVE", "partial")
    with pytest.raises(Exception, match="prematurely"):
        receive(ZfsReceiver(ROOT), begin())
    state = pool.state()
    assert state["datasets"][COPY] and f"{ROOT}/app/tank" in state["datasets"]


def test_a_stalled_sender_is_stopped_and_leaves_nothing(pool: Pool) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(Stalled, match="no data"):
            ZfsReceiver(ROOT, stall=0.3).receive("app/tank/src", NAME, str(GUID), read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert pool.calls("receive") == [] and pool.calls("create") == []


def test_a_compressed_compound_stream_is_refused_too(pool: Pool) -> None:
    packed = subprocess.run(["zstd", "-q", "-c"], input=begin(hdrtype=2) + b"x" * 5000, capture_output=True, check=True).stdout
    fd = fed(packed)
    try:
        with pytest.raises(StoreRefused, match="replication stream"):
            ZfsReceiver(ROOT).receive("app/tank/src", NAME, str(GUID), fd, compress="zstd")
    finally:
        os.close(fd)
    assert pool.calls("receive") == []


# --- append-only ------------------------------------------------------------------------------


def test_an_append_only_store_refuses_force_and_delete_and_destroys_nothing(pool: Pool) -> None:
    pool.existing((f"{COPY}@s1", "1"), (f"{COPY}@s2", "2"))
    store = ZfsReceiver(ROOT, append_only=True)
    with pytest.raises(StoreRefused, match="append-only"):
        receive(store, begin(fromguid=1), force=True)
    with pytest.raises(StoreRefused, match="append-only"):
        store.delete("app/tank/src", ["s1", "s2"])
    assert pool.calls("receive") == [] and pool.calls("destroy") == []
    done = receive(store, begin(fromguid=2))  # appending is what it is for
    assert done["name"] == NAME and "-F" not in pool.calls("receive")[0]


def test_an_append_only_store_may_abandon_an_interrupted_receive(pool: Pool) -> None:
    """``receive -A`` discards only a receive that never completed; refusing it would leave the copy
    stuck for good once the source can no longer continue that stream."""
    pool.existing((f"{COPY}@s1", "1"))
    state = pool.state()
    state["datasets"][COPY] = "1-abc-def-0123"
    pool.write(state)
    assert ZfsReceiver(ROOT, append_only=True).delete_partials("app/tank/src", []) == ["(resumable receive state)"]
    assert pool.calls("receive") == [["receive", "-A", COPY]]


# --- resume -----------------------------------------------------------------------------------


def test_a_resume_stream_must_continue_the_interrupted_receive(pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    pool.existing((f"{COPY}@s1", "1"))
    state = pool.state()
    state["datasets"][COPY] = "1-abc-def-0123"
    pool.write(state)
    monkeypatch.setenv("FAKE_TOKEN", f"resume token contents:\n\ttoguid = {hex(GUID)}\n\ttoname = tank/src@{NAME}\n")
    store = ZfsReceiver(ROOT)
    for record, match in [
        (begin(fromguid=1), "does not continue"),
        (begin(fromguid=1, features=0x4 | (1 << 20), toguid=GUID + 1), "continues"),
        (begin(fromguid=1, features=0x4 | (1 << 20), hdrtype=2), "replication stream"),
    ]:
        fd = fed(record)
        try:
            with pytest.raises(StoreRefused, match=match):
                store.resume("app/tank/src", fd)
        finally:
            os.close(fd)
    assert pool.calls("receive") == []
    fd = fed(begin(fromguid=1, features=0x4 | (1 << 20)))
    try:
        assert store.resume("app/tank/src", fd)["name"] == NAME
    finally:
        os.close(fd)


# --- through serve ----------------------------------------------------------------------------


def test_serve_answers_refused_for_a_replication_stream(pool: Pool) -> None:
    request = json.dumps({"v": 1, "op": "receive", "path": "app/tank/src", "name": NAME, "guid": str(GUID)}).encode() + b"\n"
    done = subprocess.run([sys.executable, "-m", "snapsync", "serve", "--root", ROOT, "--role", "receive"],
                          input=request + begin(hdrtype=2) + b"\0" * 4096, capture_output=True, timeout=60)
    answer = json.loads(done.stdout)
    assert done.returncode == 2 and answer["ok"] is False and answer["kind"] == "refused", done
    assert "replication stream" in answer["error"]
    assert pool.calls("receive") == [] and pool.calls("create") == []
