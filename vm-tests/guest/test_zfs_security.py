"""A hostile sending host against the receiving host, on real OpenZFS 2.3 (run inside the guest).

The hostile streams are made for real by ``zfs send`` in the guest: a dataset with
``mountpoint=<tmp>/etc``, ``sharenfs``/``sharesmb=on``, ``exec``/``setuid``/``devices=on``,
``refreservation=64M`` and a forged ``snapsync:backup_label`` (on the dataset and its snapshot), a
child dataset with ``canmount=on`` and its own mountpoint, a hold, an encrypted dataset with a
``keylocation`` file; sent with ``-p``, ``-R``, ``-R -h``, ``-w -p`` and ``-R -I``. Each is fed to
the receive path every receiving role uses: ``ZfsReceiver.receive`` (restores, drills), ``snapsync
serve --role receive`` as a process with a request line (push targets, local targets, pulls), a
real pull from a source host whose send role answers with the hostile stream, and a restore in
place from such a backup host. Afterwards ``zfs mount -a`` and ``zfs share -a`` run, and nothing
may be mounted, shared or reserved below the receiving root or at the hostile paths, and a refused
receive must leave nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from snapsync.backends.zfs import ZfsBackend
from snapsync.clock import ManualClock
from snapsync.replication.peer import Peer
from snapsync.policy.loader import parse_policy
from snapsync.recovery.restore import InPlace, restore_from_peer
from snapsync.ops.runner import Runner
from snapsync.backends.zfs_receiver import BEGIN_SIZE, StoreRefused, ZfsReceiver, parse_begin

from test_zfs import POOL, Site, fill, prop, replicated_once, space, zfs  # noqa: F401  (space: the fixture)

pytestmark = pytest.mark.skipif(not POOL, reason="needs SNAPSYNC_ZFS_POOL (runs inside the vm-tests guest)")

NAME = "snapsync_2026-11-26T12:00:00Z"
LATER = "snapsync_2026-11-26T13:00:00Z"
REPO = Path(__file__).resolve().parents[2]
SNAPSYNC = [sys.executable, "-m", "snapsync"]


@dataclass
class Streams:
    """Hostile streams as files, and the guids their snapshots carry."""

    dir: Path
    hostile: Path  # where the hostile mountpoints point: nothing may ever be mounted below it
    guid: dict[str, str]

    def file(self, kind: str) -> Path:
        return self.dir / f"{kind}.stream"


def _set(dataset: str, *assignments: str) -> None:
    for a in assignments:
        zfs("set", a, dataset, check=False)  # sharenfs/sharesmb: set, though this guest cannot share
        assert prop(dataset, a.partition("=")[0]) == a.partition("=")[2] or a.startswith("refreservation"), a


@pytest.fixture(scope="module")
def streams() -> Iterator[Streams]:
    """Build every hostile stream once, then destroy the source (streams are files): nothing of it
    stays mounted at the hostile paths, so whatever is mounted there later came from a receive."""
    work = Path(tempfile.mkdtemp(prefix="snapsync-hostile-"))
    hostile = work / "paths"
    src = f"{POOL}/hostile-{uuid.uuid4().hex[:6]}"
    key = work / "key"
    key.write_text("correct horse battery staple\n")
    guid: dict[str, str] = {}
    try:
        zfs("create", "-o", f"mountpoint={hostile}/etc", src)
        _set(src, "sharenfs=on", "sharesmb=on", "exec=on", "setuid=on", "devices=on", "refreservation=64M",
             "snapsync:backup_label=forged", "snapsync:rollback-mountpoint=/etc")
        zfs("create", "-o", "canmount=on", "-o", f"mountpoint={hostile}/evil-child", f"{src}/child", check=False)
        assert prop(f"{src}/child", "mounted") == "yes"  # created; only sharing it (inherited sharenfs) failed
        fill(src, 1)
        fill(f"{src}/child", 2)
        zfs("snapshot", "-r", f"{src}@{NAME}")
        zfs("set", "snapsync:backup_label=forged-snap", f"{src}@{NAME}")
        zfs("hold", "hostile", f"{src}@{NAME}", f"{src}/child@{NAME}")
        fill(src, 3)
        zfs("snapshot", "-r", f"{src}@{LATER}")
        secret = f"{POOL}/hostile-secret-{uuid.uuid4().hex[:6]}"
        zfs("create", "-o", "encryption=on", "-o", "keyformat=passphrase", "-o", f"keylocation=file://{key}", secret)
        fill(secret, 4)
        zfs("snapshot", f"{secret}@{NAME}")
        guid[NAME] = prop(f"{src}@{NAME}", "guid")
        guid[LATER] = prop(f"{src}@{LATER}", "guid")
        guid["secret"] = prop(f"{secret}@{NAME}", "guid")
        sends = {
            "plain": f"zfs send '{src}@{NAME}'",
            "plain-incremental": f"zfs send -i @{NAME} '{src}@{LATER}'",
            "p": f"zfs send -p '{src}@{NAME}'",
            "R": f"zfs send -R '{src}@{NAME}'",
            "R-h": f"zfs send -R -h '{src}@{NAME}'",
            "R-I": f"zfs send -R -I @{NAME} '{src}@{LATER}'",
            "p-incremental": f"zfs send -p -i @{NAME} '{src}@{LATER}'",
            "raw-p": f"zfs send -w -p '{secret}@{NAME}'",
        }
        for kind, command in sends.items():
            subprocess.run(f"{command} > '{work}/{kind}.stream'", shell=True, check=True)
        for h in (f"{src}@{NAME}", f"{src}/child@{NAME}"):
            zfs("release", "hostile", h)
        zfs("destroy", "-r", src)
        zfs("destroy", "-r", secret)
        yield Streams(work, hostile, guid)
    finally:
        subprocess.run(["zfs", "destroy", "-r", "-f", src], capture_output=True)
        subprocess.run(f"rm -rf '{work}'", shell=True)


def tree(root: str) -> list[str]:
    return sorted(zfs("list", "-H", "-o", "name", "-t", "all", "-r", root).split("\n")[:-1])


def assert_host_untouched(root: str, hostile: Path) -> None:
    """After ``zfs mount -a`` and ``zfs share -a``: nothing below ``root`` is mounted, shared or
    reserved, carries a snapsync property it did not get from here, and nothing is mounted at the
    hostile paths."""
    subprocess.run(["zfs", "mount", "-a"], capture_output=True)
    subprocess.run(["zfs", "share", "-a"], capture_output=True)
    rows = zfs("get", "-r", "-H", "-p", "-o", "name,property,value,source",
               "mounted,mountpoint,sharenfs,sharesmb,refreservation,reservation,canmount,keylocation,"
               "snapsync:backup_label,snapsync:rollback-mountpoint", root)
    root_mountpoint = prop(root, "mountpoint")
    for line in rows.splitlines():
        name, key, value, source = line.split("\t")
        if "@" in name or (name == root and key in ("mounted", "canmount")):
            continue  # the root is the administrator's; what arrives below it is the question
        assert source != "received", line
        if key == "mounted":
            assert value == "no", f"{name} got mounted: {rows}"
        elif key == "mountpoint":
            assert value in ("none", "legacy") or value == root_mountpoint or value.startswith(root_mountpoint + "/"), line
        elif key in ("sharenfs", "sharesmb"):
            assert value == "off", line
        elif key in ("refreservation", "reservation"):
            assert value in ("0", "none"), line
        elif key == "keylocation":
            assert value in ("none", "prompt"), line
        elif key.startswith("snapsync:"):
            assert value == "-", line
    mounts = Path("/proc/mounts").read_text()
    assert str(hostile) not in mounts, mounts
    assert not [m for m in mounts.splitlines() if m.split()[0].startswith(root + "/")], mounts
    exports = Path("/etc/exports.d/zfs.exports")
    if exports.exists():
        text = exports.read_text()
        assert str(hostile) not in text and root_mountpoint not in text, text


def request(op: str, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "op": op, **fields}).encode() + b"\n"


def serve(root: str, data: bytes, *extra: str) -> dict[str, Any]:
    done = subprocess.run([*SNAPSYNC, "serve", "--root", root, "--role", "receive", *extra], input=data,
                          capture_output=True, timeout=600, cwd=REPO)
    lines = done.stdout.splitlines()
    assert len(lines) == 1, (done.stdout, done.stderr)
    answer: dict[str, Any] = json.loads(lines[0])
    answer["returncode"] = done.returncode
    return answer


def receive_via(how: str, root: str, rel: str, stream: Path, name: str, guid: str, force: bool = False) -> str | None:
    """Feed ``stream`` to the real receiving code; the refusal text, or None if it was received."""
    if how == "store":
        with open(stream, "rb") as f:
            try:
                ZfsReceiver(root).receive(rel, name, guid, f.fileno(), force=force)
            except StoreRefused as e:
                return str(e)
        return None
    answer = serve(root, request("receive", path=rel, name=name, guid=guid, force=force) + stream.read_bytes())
    if answer["ok"]:
        return None
    assert answer["kind"] == "refused" and answer["returncode"] == 2, answer
    return str(answer["error"])


REL = "app/tank/hostile"


# --- hostile streams into a new copy ----------------------------------------------------------


@pytest.mark.parametrize("how", ["store", "serve"])
@pytest.mark.parametrize("kind", ["p", "R", "R-h", "raw-p"])
def test_a_hostile_replication_stream_is_refused_and_leaves_nothing(space: str, streams: Streams, kind: str, how: str) -> None:
    root = f"{space}/backup"
    before = tree(root)
    guid = streams.guid["secret" if kind == "raw-p" else NAME]
    refused = receive_via(how, root, REL, streams.file(kind), NAME, guid)
    assert refused is not None and "replication stream" in refused, refused
    assert tree(root) == before, "a refused receive left something behind (an empty parent?)"
    assert_host_untouched(root, streams.hostile)


@pytest.mark.parametrize("how", ["store", "serve"])
@pytest.mark.parametrize("kind", ["R-I", "p-incremental"])
def test_a_hostile_incremental_replication_stream_changes_nothing_on_an_existing_copy(
    space: str, streams: Streams, kind: str, how: str
) -> None:
    root = f"{space}/backup"
    assert receive_via(how, root, REL, streams.file("plain"), NAME, streams.guid[NAME]) is None
    before = tree(root)
    refused = receive_via(how, root, REL, streams.file(kind), LATER, streams.guid[LATER], force=True)
    assert refused is not None and "replication stream" in refused, refused
    assert tree(root) == before
    assert_host_untouched(root, streams.hostile)


def test_the_plain_stream_of_the_hostile_dataset_lands_with_safe_properties(space: str, streams: Streams) -> None:
    """What snapsync itself sends (no -p) carries no properties; the copy gets this host's."""
    root = f"{space}/backup"
    assert receive_via("serve", root, REL, streams.file("plain"), NAME, streams.guid[NAME]) is None
    assert receive_via("store", root, REL, streams.file("plain-incremental"), LATER, streams.guid[LATER]) is None
    copy = ZfsReceiver(root).dataset(REL)
    assert [n.partition("@")[2] for n in tree(copy) if "@" in n] == [NAME, LATER]
    assert prop(copy, "canmount") == "noauto"
    assert zfs("get", "-H", "-o", "source", "mountpoint", copy).strip().startswith("inherited from")
    assert_host_untouched(root, streams.hostile)


def test_zstd_compressed_streams_are_received_and_checked_alike(space: str, streams: Streams) -> None:
    """The first record is read after ``zstd -d``: a compressed replication goes through, a
    compressed hostile stream is refused the same way."""
    src, site, _ = replicated_once(space, target='compress = "zstd"')
    fill(src, 2)
    report = site.step()
    assert report.targets[0].ok, report.targets[0].errors
    assert [s.to_json()["kind"] for s in report.targets[0].sent] == ["incremental"]
    root = f"{space}/backup"
    before = tree(root)
    packed = subprocess.run(["zstd", "-q", "-c", str(streams.file("R"))], capture_output=True, check=True).stdout
    answer = serve(root, request("receive", path=REL, name=NAME, guid=streams.guid[NAME], compress="zstd") + packed)
    assert answer["kind"] == "refused" and "replication stream" in answer["error"], answer
    assert tree(root) == before
    assert_host_untouched(root, streams.hostile)


# --- each layer on its own, as if the other had a hole -----------------------------------------


def test_the_receive_options_alone_keep_a_p_streams_properties_off_this_host(space: str, streams: Streams) -> None:
    """``zfs receive`` with the store's options, given the -p stream directly (no first-record
    check): no property of the stream takes effect on the dataset."""
    root = f"{space}/backup"
    store = ZfsReceiver(root)
    copy = store.dataset("app/direct")
    zfs("create", "-o", "canmount=off", f"{root}/app")
    data = streams.file("p").read_bytes()
    argv = store._receive_argv(copy, False, parse_begin(data[:BEGIN_SIZE]), NAME)
    subprocess.run(argv, input=data, check=True, capture_output=True)
    sources = dict(line.split("\t") for line in zfs(
        "get", "-H", "-o", "property,source", "mountpoint,sharenfs,sharesmb,exec,setuid,devices,refreservation,"
        "reservation,snapsync:backup_label,snapsync:rollback-mountpoint", copy).splitlines())
    assert "received" not in sources.values() and "local" not in sources.values(), sources
    assert prop(copy, "refreservation") == "0" and prop(copy, "snapsync:backup_label") == "-"
    # what -x cannot reach: the snapshot's own properties. The check after the receive catches it:
    assert zfs("get", "-H", "-o", "source", "snapsync:backup_label", f"{copy}@{NAME}").strip() == "received"
    zfs("destroy", "-r", f"{root}/app")
    assert_host_untouched(root, streams.hostile)


@pytest.mark.parametrize("kind", ["p", "R", "R-h", "raw-p"])
def test_the_check_after_the_receive_alone_destroys_what_a_stream_created(
    space: str, streams: Streams, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the first-record check ever let a replication stream through, the verification after the
    receive must still find what it did and destroy exactly that, parents included."""
    import snapsync.backends.zfs_receiver as zs

    root = f"{space}/backup"
    zfs("create", "-o", "canmount=off", f"{root}/app")
    zfs("create", "-o", "canmount=noauto", f"{root}/app/neighbour")
    zfs("snapshot", f"{root}/app/neighbour@{NAME}")
    before = tree(root)
    guid = streams.guid["secret" if kind == "raw-p" else NAME]
    real = zs.parse_begin

    def lenient(record: bytes) -> zs.StreamBegin:  # a parser that sees a single stream with the right guid
        parsed = real(record)
        return zs.StreamBegin(zs.DMU_SUBSTREAM, parsed.features, zs.DMU_OST_ZFS, 0, int(guid), 0, parsed.toname,
                              parsed.payloadlen, parsed.record)

    monkeypatch.setattr(zs, "parse_begin", lenient)
    if kind.startswith("R"):  # zfs refuses a replication stream into a snapshot name: receive into the dataset
        argv = zs.ZfsReceiver._receive_argv
        monkeypatch.setattr(zs.ZfsReceiver, "_receive_argv", lambda self, d, f, s=None, n=None: argv(self, d, f, s, None))
    with open(streams.file(kind), "rb") as f, pytest.raises(zs.BackendError) as failed:
        ZfsReceiver(root).receive("app/tank/hostile", NAME, guid, f.fileno())
    assert tree(root) == before, f"{failed.value}"
    assert "refused the stream received into" in str(failed.value), failed.value
    assert_host_untouched(root, streams.hostile)


# --- a stream that is not the one named -------------------------------------------------------


@pytest.mark.parametrize("how", ["store", "serve"])
@pytest.mark.parametrize("case", ["other-name", "other-guid", "junk", "header-then-junk"])
def test_a_stream_that_is_not_the_snapshot_named_leaves_nothing(space: str, streams: Streams, case: str, how: str, tmp_path: Path) -> None:
    root = f"{space}/backup"
    plain = streams.file("plain")
    name, guid, stream = NAME, streams.guid[NAME], plain
    if case == "other-name":
        name = "snapsync_2026-11-26T12:30:00Z"
    elif case == "other-guid":
        guid = str(int(guid) ^ 1)
    elif case == "junk":
        stream = tmp_path / "junk"
        stream.write_bytes(os.urandom(200_000))
    else:  # a real first record, then garbage: zfs receive itself fails
        stream = tmp_path / "cut"
        stream.write_bytes(plain.read_bytes()[:BEGIN_SIZE + 4096] + os.urandom(100_000))
    before = tree(root)
    if case != "header-then-junk":
        assert receive_via(how, root, REL, stream, name, guid) is not None
        assert tree(root) == before
    else:
        if how == "serve":
            answer = serve(root, request("receive", path=REL, name=name, guid=guid) + stream.read_bytes())
            assert not answer["ok"], answer
        else:
            with open(stream, "rb") as f, pytest.raises(Exception):
                ZfsReceiver(root).receive(REL, name, guid, f.fileno())
        after = tree(root)
        copy = ZfsReceiver(root).dataset(REL)
        if copy in after:  # zfs kept a resumable state: no snapshot, a token, never mounted
            assert not [n for n in after if "@" in n]
            assert prop(copy, "receive_resume_token") not in ("-", "")
        else:
            assert after == before, "a failed receive left an empty parent"
    assert_host_untouched(root, streams.hostile)


# --- append-only --------------------------------------------------------------------------------


@contextmanager
def diverged_copy(space: str) -> Iterator[tuple[str, str, Path, str]]:
    """A copy holding S1..S4, and an incremental S1 -> S5 from a source that was rolled back to S1:
    receiving it with force (-F) would destroy S2, S3 and S4."""
    src, root = f"{space}/src", f"{space}/backup"
    zfs("create", src)
    store = ZfsReceiver(root)
    copy = store.dataset("app/src")
    names = [f"snapsync_2026-11-26T1{i}:00:00Z" for i in range(1, 6)]
    for i, n in enumerate(names[:4]):
        fill(src, i)
        zfs("snapshot", f"{src}@{n}")
        if i == 0:
            zfs("create", "-p", "-o", "canmount=off", copy.rpartition("/")[0])
            subprocess.run(f"zfs send '{src}@{n}' | zfs receive -u -o canmount=noauto '{copy}'", shell=True, check=True)
        else:
            subprocess.run(f"zfs send -i @{names[i - 1]} '{src}@{n}' | zfs receive -u '{copy}'", shell=True, check=True)
    zfs("rollback", "-r", f"{src}@{names[0]}")
    fill(src, 9)
    zfs("snapshot", f"{src}@{names[4]}")
    stream = Path(tempfile.mkstemp(prefix="snapsync-diverged-")[1])
    subprocess.run(f"zfs send -i @{names[0]} '{src}@{names[4]}' > '{stream}'", shell=True, check=True)
    try:
        yield copy, names[4], stream, prop(f"{src}@{names[4]}", "guid")
    finally:
        stream.unlink()


def test_an_append_only_store_refuses_force_and_destroys_nothing(space: str) -> None:
    with diverged_copy(space) as (copy, name, stream, guid):
        kept = tree(copy)
        assert len([n for n in kept if "@" in n]) == 4
        store = ZfsReceiver(f"{space}/backup", append_only=True)
        for force in (True, False):
            with open(stream, "rb") as f, pytest.raises(Exception) as failed:
                store.receive("app/src", name, guid, f.fileno(), force=force)
            if force:
                assert isinstance(failed.value, StoreRefused) and "append-only" in str(failed.value)
            assert tree(copy) == kept, f"force={force}: {failed.value}"
        with pytest.raises(StoreRefused, match="append-only"):
            store.delete("app/src", [n.partition("@")[2] for n in kept if "@" in n])
        assert tree(copy) == kept


def test_an_append_only_server_asked_with_force_destroys_nothing(space: str) -> None:
    with diverged_copy(space) as (copy, name, stream, guid):
        kept = tree(copy)
        for force in (True, False):
            answer = serve(f"{space}/backup", request("receive", path="app/src", name=name, guid=guid, force=force)
                           + stream.read_bytes(), "--append-only")
            assert not answer["ok"], answer
            assert tree(copy) == kept, f"force={force}: {answer}"
        names = [n.partition("@")[2] for n in kept if "@" in n]
        answer = serve(f"{space}/backup", request("delete", path="app/src", names=names, allow_writable=True), "--append-only")
        assert not answer["ok"] and tree(copy) == kept, answer


# --- the other direction: a pull, and a restore from a backup host --------------------------------


HOSTILE_SOURCE = r'''
import json, os, sys
stream, name, guid = sys.argv[1:4]
line = b""
while not line.endswith(b"\n"):
    byte = os.read(0, 1)
    if not byte:
        break
    line += byte
req = json.loads(line)
def say(**fields):
    sys.stdout.buffer.write(json.dumps({"v": 1, "ok": True, **fields}).encode() + b"\n")
    sys.stdout.buffer.flush()
snap = {"name": name, "guid": guid, "created": "2026-11-26T12:00:00Z", "read_only": True, "kind": "snapshot", "holds": []}
if req["op"] == "hello":
    say(protocol=1, role="send", backend="zfs", root="x", append_only=False, version="x")
elif req["op"] == "list":
    say(paths={p: [snap] for p in req["paths"]})
elif req["op"] == "hold":
    say(held=req["names"])
elif req["op"] == "send":
    say(name=name, guid=guid)
    with open(stream, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
'''


@dataclass(frozen=True)
class HostileHost:
    """A transport to a compromised host: whatever it is asked, it answers with ``stream``."""

    name: str
    script: str
    stream: str
    snapshot: str
    guid: str

    def argv(self, role: str) -> list[str]:
        return [sys.executable, self.script, self.stream, self.snapshot, self.guid]

    def describe(self) -> str:
        return f"hostile host {self.name}"

    @contextmanager
    def multiplexed(self) -> Iterator[None]:
        yield

    def transient(self, returncode: int, stderr: str) -> bool:
        return False


def hostile_host(tmp_path: Path, streams: Streams, kind: str) -> HostileHost:
    script = tmp_path / "hostile_source.py"
    script.write_text(HOSTILE_SOURCE)
    return HostileHost("evil", str(script), str(streams.file(kind)), NAME, streams.guid[NAME])


@pytest.mark.parametrize("kind", ["R", "p"])
def test_a_pull_from_a_compromised_source_gets_nothing_onto_this_host(
    space: str, streams: Streams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The pulling host receives through its own ``serve --role receive`` (the real pull code); the
    source host's send role is replaced by one that answers every send with a hostile stream."""
    import snapsync.ops.runner

    into = f"{space}/pulled"
    zfs("create", "-o", "canmount=off", into)
    host = hostile_host(tmp_path, streams, kind)
    monkeypatch.setattr(snapsync.ops.runner.SshTransport, "from_target", classmethod(lambda cls, name, target: host))
    policy = parse_policy("\n".join([
        "version = 1", 'host = "backup"',
        "[pulls.evil]", 'host = "evil.example"', 'path = "tank/src"', 'datasets = ["tank/src/app"]', f'into = "{into}"',
    ]) + "\n", "<test>")
    before = tree(into)
    (report,) = Runner(policy, ManualClock(datetime(2026, 11, 26, 13, 0, tzinfo=UTC))).run(
        [], take=False, only_due=False, prune=False, replicate=True, pulls=["evil"])
    text = json.dumps(report.to_json())
    assert not report.targets[0].ok and "replication stream" in text, text
    assert tree(into) == before
    assert_host_untouched(into, streams.hostile)


@pytest.mark.parametrize("kind", ["R-h", "p"])
def test_a_restore_in_place_from_a_compromised_backup_host_gets_nothing_onto_this_host(
    space: str, streams: Streams, tmp_path: Path, kind: str
) -> None:
    zfs("create", f"{space}/host")
    app = f"{space}/host/app"
    site = Site([app], f"{space}/backup")
    group = site.runner().policy.groups["app"]
    before = tree(f"{space}/host")
    with pytest.raises(StoreRefused, match="replication stream"):
        restore_from_peer(Peer(hostile_host(tmp_path, streams, kind), "send"), "evil", group,  # type: ignore[arg-type]
                          InPlace(group, ZfsBackend()))
    assert tree(f"{space}/host") == before
    assert_host_untouched(f"{space}/host", streams.hostile)
