"""`snapsync serve` as a real process: raw bytes in on stdin, one JSON line and an exit status out.

Refusals are checked against a served root on a real btrfs, directly and through a real sshd with
the key confined to a forced command. Tests that only send requests the server must refuse share
one module-wide btrfs (one mount instead of dozens); tests that change the filesystem get their own
``target_root``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import btrfsutil
import pytest

from snapsync.protocol import MAX_REQUEST
from snapsync.backends.scratch import scratch_btrfs
from tests.conftest import _require_btrfs
from tests.sshd import Sshd

SNAPSYNC = [sys.executable, "-m", "snapsync"]
NAME = "app_2026-03-01T12:00:00Z"
GUID = "0123456789abcdef0123456789abcdef"
TIMEOUT = 15


@dataclass
class Answer:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def json(self) -> dict[str, Any]:
        lines = self.stdout.splitlines()
        assert len(lines) == 1 and self.stdout.endswith(b"\n"), f"expected one JSON line, got {self.stdout!r} / {self.stderr}"
        data: dict[str, Any] = json.loads(lines[0])
        return data


def serve(root: Path, raw: bytes, role: str = "receive", *extra: str) -> Answer:
    proc = subprocess.run(
        [*SNAPSYNC, "serve", "--root", str(root), "--role", role, *extra],
        input=raw, capture_output=True, timeout=TIMEOUT,
    )
    return Answer(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


def request(op: str, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "op": op, **fields}).encode() + b"\n"


def assert_refused(answer: Answer, match: str = "") -> dict[str, Any]:
    assert "Traceback" not in answer.stderr
    data = answer.json
    assert answer.returncode == 2, (answer.returncode, data, answer.stderr)
    assert data["ok"] is False and data["kind"] == "refused" and data["v"] == 1
    assert match in data["error"], data["error"]
    assert "refused" in answer.stderr  # the reason is logged on the server side too
    return data


def assert_not_done(answer: Answer, match: str = "") -> dict[str, Any]:
    """Refused (2) or failed (1): either way an answer, no traceback, and ``match`` in the error."""
    assert "Traceback" not in answer.stderr
    data = answer.json
    assert answer.returncode in (1, 2), (answer.returncode, data)
    assert data["ok"] is False and data["kind"] == ("refused" if answer.returncode == 2 else "failed")
    assert match in data["error"], data["error"]
    return data


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Like ``target_root``, once per module: only for requests that must not change anything."""
    _require_btrfs()
    with scratch_btrfs("256M", parent=str(tmp_path_factory.mktemp("serve")), label="snapsync-serve") as mnt:
        root = mnt / "backups"
        root.mkdir()
        yield root
        assert sorted(os.listdir(root)) == [], "a refused request left something in the served root"
        assert [p for p, _ in btrfsutil.SubvolumeIterator(mnt)] == []


# --- refusals, straight into the process -------------------------------------------------------

OTHER_ROLE = [
    ("receive", request("send", path="g/d", name=NAME)),
    ("receive", request("hold", path="g/d", tag="t", names=[NAME])),
    ("send", request("delete", path="g/d", names=[NAME])),
    ("send", request("receive", path="g/d", name=NAME, guid=GUID)),
]


@pytest.mark.parametrize(("role", "raw"), OTHER_ROLE, ids=["send-to-receive", "hold-to-receive", "delete-to-send", "receive-to-send"])
def test_other_role_verbs_are_refused(shared_root: Path, role: str, raw: bytes) -> None:
    op = json.loads(raw)["op"]
    assert_refused(serve(shared_root, raw, role), f"operation '{op}' is not allowed for role '{role}'")


@pytest.mark.parametrize("op", ["exec", "rm", "shell", ""])
def test_unknown_verbs_are_refused(shared_root: Path, op: str) -> None:
    assert_refused(serve(shared_root, request(op), "receive"), "is not allowed for role 'receive'")


BAD_PATH_REQUESTS = {
    "list-dotdot": ("receive", request("list", paths=[".."]), "'..' component"),
    "list-dotdot-nested": ("receive", request("list", paths=["g/../../../etc"]), "'..' component"),
    "delete-dotdot": ("receive", request("delete", path="..", names=["etc"]), "'..' component"),
    "receive-dotdot": ("receive", request("receive", path="../escape", name=NAME, guid=GUID), "'..' component"),
    "send-dotdot": ("send", request("send", path="../../etc", name="passwd"), "'..' component"),
    "list-etc": ("receive", request("list", paths=["/etc"]), "is absolute"),
    "delete-etc": ("receive", request("delete", path="/etc", names=["passwd"]), "is absolute"),
    "receive-tmp": ("receive", request("receive", path="/tmp/x", name=NAME, guid=GUID), "is absolute"),
    "hold-etc": ("send", request("hold", path="/etc", tag="t", names=["passwd"]), "is absolute"),
    "list-receiving": ("receive", request("list", paths=["g/d/.receiving"]), "component '.receiving'"),
    "delete-name-with-slash": ("receive", request("delete", path="g", names=["../etc"]), "is not a snapshot name"),
}


@pytest.mark.parametrize(("role", "raw", "match"), BAD_PATH_REQUESTS.values(), ids=BAD_PATH_REQUESTS.keys())
def test_paths_leaving_the_root_are_refused(shared_root: Path, role: str, raw: bytes, match: str) -> None:
    assert_refused(serve(shared_root, raw, role), match)


METACHARACTERS = ["g;touch {c}", "g|touch {c}", "$(touch {c})", "`touch {c}`", "g&touch {c}", "g>{c}", "g {c}",
                  "g\ntouch {c}", "g'{c}", 'g"{c}', "g/*", "g\x00{c}"]


@pytest.mark.parametrize("template", METACHARACTERS, ids=[repr(m[:3]) for m in METACHARACTERS])
def test_shell_metacharacters_in_paths_are_refused(shared_root: Path, tmp_path: Path, template: str) -> None:
    canary = tmp_path / "pwned"
    raw = request("receive", path=template.format(c=canary), name=NAME, guid=GUID)
    assert_refused(serve(shared_root, raw), "characters outside")
    assert not canary.exists()


@pytest.mark.parametrize("template", ["$(touch {c})", "a;touch {c}", "`touch {c}`"])
def test_shell_metacharacters_in_names_are_refused(shared_root: Path, tmp_path: Path, template: str) -> None:
    canary = tmp_path / "pwned"
    assert_refused(serve(shared_root, request("delete", path="g", names=[template.format(c=canary)])), "is not a snapshot name")
    assert not canary.exists()


def test_oversized_request_without_newline_is_refused_unread(shared_root: Path) -> None:
    # a megabyte with no newline: refused after MAX_REQUEST + 1 bytes, the rest never read (no hang)
    assert_refused(serve(shared_root, b"x" * (1 << 20)), f"request longer than {MAX_REQUEST} bytes")


def test_oversized_request_with_newline_is_refused(shared_root: Path) -> None:
    raw = request("list", paths=["g/" + "a" * 200] * 400)
    assert MAX_REQUEST < len(raw) < 2 * MAX_REQUEST and raw.count(b"\n") == 1
    assert_refused(serve(shared_root, raw), f"request longer than {MAX_REQUEST} bytes")


def _padded_hello(total: int) -> bytes:
    """A valid hello request line of exactly ``total`` bytes, newline included."""
    raw = b'{"v":1,"op":"hello"}'
    return raw + b" " * (total - 1 - len(raw)) + b"\n"


def test_request_of_exactly_max_request_bytes_is_served(shared_root: Path) -> None:
    answer = serve(shared_root, _padded_hello(MAX_REQUEST))
    assert answer.returncode == 0 and answer.json["ok"] is True


def test_request_one_byte_over_max_request_is_refused(shared_root: Path) -> None:
    assert_refused(serve(shared_root, _padded_hello(MAX_REQUEST + 1)), "longer than")


MALFORMED = {
    "garbage": b"rm -rf /; echo pwned\n",
    "truncated": b'{"v":1,"op":"hello"\n',
    "single-quotes": b"{'v':1,'op':'hello'}\n",
    "bad-utf8": b'{"v":1,"op":"\xff\xfe"}\n',
    "two-objects": b'{"v":1,"op":"hello"}{"v":1,"op":"hello"}\n',
    "blank-line": b"\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_json_is_refused(shared_root: Path, raw: bytes) -> None:
    assert_refused(serve(shared_root, raw), "malformed request")


@pytest.mark.parametrize("raw", [b"[]\n", b'"hello"\n', b"null\n"], ids=["array", "string", "null"])
def test_json_that_is_not_an_object_is_refused(shared_root: Path, raw: bytes) -> None:
    assert_refused(serve(shared_root, raw), "expected a JSON object")


@pytest.mark.parametrize("raw", [b'{"op":"hello"}\n', b'{"v":2,"op":"hello"}\n', b'{"v":"1","op":"hello"}\n'])
def test_wrong_protocol_version_is_refused(shared_root: Path, raw: bytes) -> None:
    assert_refused(serve(shared_root, raw), "not supported (this server speaks 1)")


def test_unknown_fields_are_refused(shared_root: Path) -> None:
    raw = request("delete", path="g", names=[NAME], recursive=True)
    assert_refused(serve(shared_root, raw), "unknown request field(s): recursive")


def test_empty_input_is_refused(shared_root: Path) -> None:
    assert_refused(serve(shared_root, b""), "no request (empty input)")


def test_request_without_trailing_newline_is_refused(shared_root: Path) -> None:
    assert_refused(serve(shared_root, b'{"v":1,"op":"hello"}'), "not terminated by a newline")


@pytest.mark.parametrize("raw", [b'{"v":1,"op":[]}\n', b'{"v":1,"op":{"x":1}}\n'], ids=["list", "object"])
def test_unhashable_op_is_refused(shared_root: Path, raw: bytes) -> None:
    assert_refused(serve(shared_root, raw), "is not allowed")


def test_deeply_nested_json_is_refused(shared_root: Path) -> None:
    raw = b'{"v":1,"op":"hello","x":' + b"[" * 30000 + b"]" * 30000 + b"}\n"
    assert len(raw) < MAX_REQUEST
    assert_refused(serve(shared_root, raw))


def test_missing_served_root_is_refused(tmp_path: Path) -> None:
    assert_refused(serve(tmp_path / "nope", request("hello")), "does not exist")


# --- positive answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["receive", "send"])
def test_hello_answers_protocol_version_and_role(shared_root: Path, role: str) -> None:
    answer = serve(shared_root, request("hello"), role)
    assert answer.returncode == 0
    data = answer.json
    assert data["ok"] is True and data["v"] == 1 and data["protocol"] == 1
    assert data["role"] == role and data["root"] == str(shared_root) and data["append_only"] is False
    assert serve(shared_root, request("hello"), role, "--append-only").json["append_only"] is True


def test_list_of_a_nonexistent_path_is_empty(shared_root: Path) -> None:
    answer = serve(shared_root, request("list", paths=["app/persist/nothing", "other"]))
    assert answer.returncode == 0
    assert answer.json["paths"] == {"app/persist/nothing": [], "other": []}
    assert not (shared_root / "app").exists()  # listing creates nothing


# --- symlinks out of the root --------------------------------------------------------------------


def _etc_state() -> tuple[list[str], int]:
    return sorted(os.listdir("/etc")), os.stat("/etc").st_mtime_ns


def _stream(mnt: Path, tmp_path: Path, name: str = NAME) -> tuple[bytes, str]:
    """A full btrfs send stream of a read-only snapshot called ``name``, and its uuid (the guid)."""
    src = mnt / "src"
    if not src.exists():
        btrfsutil.create_subvolume(src)
        (src / "data.txt").write_text("payload\n")
    (mnt / "snaps").mkdir(exist_ok=True)
    snap = mnt / "snaps" / name
    btrfsutil.create_snapshot(src, snap, read_only=True)
    out = tmp_path / f"{name}.stream"
    subprocess.run(["btrfs", "send", "-q", "-f", str(out), str(snap)], check=True, capture_output=True)
    return out.read_bytes(), btrfsutil.subvolume_info(snap).uuid.hex()


def _subvolumes(mnt: Path) -> set[str]:
    return {p for p, _ in btrfsutil.SubvolumeIterator(mnt)}


def test_symlink_to_etc_inside_root_is_not_followed(target_root: Path, tmp_path: Path) -> None:
    mnt = target_root.parent
    stream, guid = _stream(mnt, tmp_path)
    before_subvolumes = _subvolumes(mnt)
    (target_root / "evil").symlink_to("/etc")
    before = _etc_state()
    attempts = [
        ("receive", request("list", paths=["evil/x"])),
        ("receive", request("list", paths=["evil"])),
        ("receive", request("receive", path="evil/x", name=NAME, guid=guid) + stream),
        ("receive", request("receive", path="evil", name=NAME, guid=guid) + stream),
        ("receive", request("delete", path="evil", names=["passwd", "hostname"], allow_writable=True)),
        ("receive", request("delete", path="evil/x", names=[NAME], partial=True)),
        ("send", request("list", paths=["evil"])),
        ("send", request("send", path="evil", name="passwd")),
        ("send", request("hold", path="evil/x", tag="t", names=[NAME])),
    ]
    for role, raw in attempts:
        answer = serve(target_root, raw, role)
        assert_not_done(answer)
        assert answer.json["error"], raw[:80]
    assert _etc_state() == before
    for leftover in ("x", ".receiving", ".lock", NAME):
        assert not os.path.lexists(f"/etc/{leftover}")
    assert _subvolumes(mnt) == before_subvolumes  # no subvolume was received anywhere


def test_symlink_to_a_directory_on_the_same_btrfs_outside_root_is_not_followed(target_root: Path, tmp_path: Path) -> None:
    # the dangerous case: btrfs receive *could* create a subvolume there, and a copy there could be deleted
    mnt = target_root.parent
    stream, guid = _stream(mnt, tmp_path)
    stream2, guid2 = _stream(mnt, tmp_path, "app_2026-03-02T12:00:00Z")
    outside = mnt / "outside" / "ds"
    outside.mkdir(parents=True)
    subprocess.run(["btrfs", "receive", "-q", str(outside)], input=stream, check=True, capture_output=True)
    assert btrfsutil.subvolume_info(outside / NAME).received_uuid.hex() == guid
    (target_root / "link").symlink_to(outside)
    (target_root / "rel").symlink_to("../outside")
    before = _subvolumes(mnt)

    for rel in ("link", "rel/ds"):
        assert_not_done(serve(target_root, request("delete", path=rel, names=[NAME])), "outside the served root")
        assert_not_done(serve(target_root, request("list", paths=[rel])), "outside the served root")
    answer = serve(target_root, request("receive", path="rel/ds", name="app_2026-03-02T12:00:00Z", guid=guid2) + stream2)
    assert_not_done(answer, "outside the served root")
    assert _subvolumes(mnt) == before
    assert sorted(os.listdir(outside)) == [NAME]


# --- delete: only received copies, only inside the root -----------------------------------------


def test_receive_then_delete_a_received_copy(target_root: Path, tmp_path: Path) -> None:
    """The positive control for the delete refusals below: a received copy can be listed and deleted."""
    stream, guid = _stream(target_root.parent, tmp_path)
    answer = serve(target_root, request("receive", path="g/ds", name=NAME, guid=guid) + stream)
    assert answer.returncode == 0, answer.stderr
    assert answer.json == {"v": 1, "ok": True, "name": NAME, "path": f"g/ds/{NAME}", "removed_partials": [], "received": [NAME]}
    [copy] = serve(target_root, request("list", paths=["g/ds"])).json["paths"]["g/ds"]
    assert copy["name"] == NAME and copy["received_uuid"] == guid and copy["read_only"] and not copy["partial"]

    appended = serve(target_root, request("delete", path="g/ds", names=[NAME]), "receive", "--append-only")
    assert_refused(appended, "append-only")
    bypass = serve(target_root, request("delete", path="g/ds", names=[NAME], partial=True), "receive", "--append-only")
    assert bypass.returncode == 0 and bypass.json["deleted"] == []  # partial=true deletes only uncommitted copies
    assert (target_root / "g" / "ds" / NAME).exists()

    deleted = serve(target_root, request("delete", path="g/ds", names=[NAME, "absent"]))
    assert deleted.returncode == 0 and deleted.json["deleted"] == [NAME]
    assert not (target_root / "g" / "ds" / NAME).exists()


def test_delete_refuses_what_did_not_arrive_by_receive(target_root: Path) -> None:
    mnt = target_root.parent
    ds = target_root / "g" / "ds"
    ds.mkdir(parents=True)
    btrfsutil.create_subvolume(ds / "writable")
    btrfsutil.create_subvolume(mnt / "src")
    btrfsutil.create_snapshot(mnt / "src", ds / "handmade", read_only=True)
    (ds / "plain").mkdir()

    cases = {
        "writable": "it did not arrive by receive",
        "handmade": "it did not arrive by receive",
        "plain": "not a btrfs subvolume",
    }
    for name, why in cases.items():
        assert_not_done(serve(target_root, request("delete", path="g/ds", names=[name])), f"refusing to delete g/ds/{name}: {why}")
        assert_not_done(serve(target_root, request("delete", path="g/ds", names=[name]), "receive", "--append-only"))
        gone = serve(target_root, request("delete", path="g/ds", names=[name], partial=True))
        assert gone.returncode == 0 and gone.json["deleted"] == []
    assert sorted(os.listdir(ds)) == [".lock", "handmade", "plain", "writable"]
    assert btrfsutil.subvolume_info(ds / "handmade").flags & 1


def test_delete_accepts_nothing_outside_root(target_root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / NAME).mkdir()
    for raw in [
        request("delete", path=str(victim), names=[NAME]),
        request("delete", path="../../victim", names=[NAME]),
        request("delete", path="/etc", names=["passwd"]),
        request("delete", path="g", names=[f"../../{victim.name}"]),
        request("delete", path="g", names=[str(victim / NAME)]),
    ]:
        assert_refused(serve(target_root, raw))
    assert (victim / NAME).is_dir()


# --- through a real sshd with a forced command ------------------------------------------------


def _ssh_argv(sshd: Sshd, key: Path, *options: str) -> list[str]:
    argv = ["ssh", "-T", "-o", "BatchMode=yes"]
    for o in sshd.ssh_options():
        argv += ["-o", o]
    return [*argv, "-i", str(key), "-p", str(sshd.port), *options, "root@127.0.0.1"]


def _run(argv: list[str], stdin: bytes) -> Answer:
    proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=TIMEOUT)
    return Answer(proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


def ssh(sshd: Sshd, command: str | list[str], stdin: bytes = b"", *options: str) -> Answer:
    """A fresh ssh connection with the sshd fixture's key."""
    return _run(_ssh_argv(sshd, sshd.client_key, *options) + ([command] if isinstance(command, str) else command), stdin)


@dataclass
class Connection:
    """One authenticated ssh connection (a ControlMaster); every call opens a new session on it, and
    sshd applies the key's forced command to each session, as it would on a fresh connection."""

    sshd: Sshd
    key: Path
    control: Path

    def __call__(self, command: str | list[str], stdin: bytes = b"", *options: str) -> Answer:
        argv = _ssh_argv(self.sshd, self.key, "-o", f"ControlPath={self.control}", "-o", "ControlMaster=no", *options)
        return _run(argv + ([command] if isinstance(command, str) else command), stdin)


@pytest.fixture(scope="module")
def forced(shared_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Connection]]:
    """A module-wide sshd where one key is forced to `serve --role receive` and another to `--role send`,
    both below ``shared_root``; one multiplexed connection per key keeps each request ~100 ms."""
    from tests.sshd import free_port, keygen, sshd_unavailable

    reason = sshd_unavailable()
    if reason:
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("forced-sshd")
    keys = {role: keygen(directory / f"id_{role}") for role in ("receive", "send")}
    server = Sshd(directory, free_port(), keys["receive"])
    server.start()
    masters: dict[str, Connection] = {}
    try:
        lines = []
        for role, key in keys.items():
            line = server.forced(shared_root, role)
            lines.append(line.replace(server.public_key(), Path(f"{key}.pub").read_text().strip()))
        server.authorize(*lines)
        for role, key in keys.items():
            control = directory / f"cm-{role}"
            subprocess.run(
                _ssh_argv(server, key, "-M", "-N", "-f", "-o", f"ControlPath={control}"),
                check=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            masters[role] = Connection(server, key, control)
        yield masters
    finally:
        for conn in masters.values():
            subprocess.run(_ssh_argv(server, conn.key, "-o", f"ControlPath={conn.control}", "-O", "exit"),
                           capture_output=True, timeout=TIMEOUT)
        server.stop()


INJECTIONS = [
    "rm -rf {c}; echo pwned",
    "echo pwned && rm -rf {c}",
    "$(rm -rf {c}) echo pwned",
    "/bin/sh -c 'rm -rf {c}; echo pwned'",
    "snapsync serve --root / --role receive; rm -rf {c}; echo pwned",
]


@pytest.mark.parametrize("role", ["receive", "send"])
@pytest.mark.parametrize("command", INJECTIONS, ids=["semicolon", "and", "subshell", "sh-c", "own-serve"])
def test_ssh_ignores_the_requested_command(forced: dict[str, Connection], tmp_path: Path, command: str, role: str) -> None:
    canary = tmp_path / "canary"
    canary.write_text("still here")
    answer = forced[role](command.format(c=canary))
    assert_refused(answer, "no request (empty input)")
    assert canary.read_text() == "still here"
    assert b"pwned" not in answer.stdout and "pwned" not in answer.stderr


@pytest.mark.parametrize("role", ["receive", "send"])
def test_ssh_serves_the_request_not_the_command(forced: dict[str, Connection], shared_root: Path, tmp_path: Path,
                                                role: str) -> None:
    canary = tmp_path / "canary"
    canary.write_text("still here")
    hello = forced[role](f"rm -rf {canary}; echo pwned", request("hello"))
    assert hello.returncode == 0 and hello.json["role"] == role and hello.json["root"] == str(shared_root)
    assert canary.read_text() == "still here" and b"pwned" not in hello.stdout


SSH_REFUSALS = {
    "garbage": ("receive", b"rm -rf /\n", "malformed request"),
    "no-newline": ("receive", b'{"v":1,"op":"hello"}', "not terminated by a newline"),
    "oversized": ("receive", b"x" * (MAX_REQUEST + 10), f"request longer than {MAX_REQUEST} bytes"),
    "send-to-receive": ("receive", request("send", path="g", name=NAME), "not allowed for role 'receive'"),
    "delete-to-send": ("send", request("delete", path="g", names=[NAME]), "not allowed for role 'send'"),
    "receive-to-send": ("send", request("receive", path="g", name=NAME, guid=GUID), "not allowed for role 'send'"),
    "dotdot": ("receive", request("list", paths=["../../etc"]), "'..' component"),
    "absolute": ("send", request("send", path="/etc", name="passwd"), "is absolute"),
    "metachar": ("receive", request("receive", path="g;id", name=NAME, guid=GUID), "characters outside"),
}


@pytest.mark.parametrize(("role", "raw", "match"), SSH_REFUSALS.values(), ids=SSH_REFUSALS.keys())
def test_ssh_refusals(forced: dict[str, Connection], role: str, raw: bytes, match: str) -> None:
    assert_refused(forced[role]("echo pwned", raw), match)


def test_ssh_subsystems_and_forwarding_are_not_available(forced: dict[str, Connection]) -> None:
    sftp = forced["receive"]("sftp", b"", "-s")
    assert sftp.returncode != 0  # no sftp server: either the forced command refuses, or no such subsystem
    if sftp.stdout:
        assert_refused(sftp, "no request")
    tunnel = forced["receive"]([], b"", "-W", f"127.0.0.1:{forced['receive'].sshd.port}")  # `restrict`: no forwarding
    assert tunnel.returncode != 0 and b"SSH-2.0" not in tunnel.stdout
    assert "refused" in tunnel.stderr or "prohibited" in tunnel.stderr, tunnel.stderr


def test_authorize_line_works_as_forced_command(target_root: Path, sshd: Sshd, client_key: Path) -> None:
    snapsync_bin = Path(sys.executable).parent / "snapsync"
    if not snapsync_bin.exists():
        pytest.skip("no snapsync entry point next to the interpreter")
    out = subprocess.run(
        [*SNAPSYNC, "authorize", "--role", "receive", "--root", str(target_root), "--command", str(snapsync_bin),
         f"{client_key}.pub"], capture_output=True, text=True, timeout=TIMEOUT, check=True,
    ).stdout
    sshd.authorize(out)
    hello = ssh(sshd, "echo pwned", request("hello"))
    assert hello.returncode == 0 and hello.json["role"] == "receive" and hello.json["root"] == str(target_root)
    assert b"pwned" not in hello.stdout


# --- snapsync authorize -----------------------------------------------------------------------


def authorize(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SNAPSYNC, "authorize", *args], capture_output=True, text=True, timeout=TIMEOUT)


def test_authorize_allow_restore(client_key: Path) -> None:
    line = authorize("--role", "receive", "--root", "/srv/x", "--append-only", "--allow-restore", f"{client_key}.pub").stdout
    assert line.startswith('command="snapsync serve --root /srv/x --role receive --append-only --allow-restore",restrict ')
    refused = authorize("--role", "send", "--root", "/srv/x", "--allow-restore", f"{client_key}.pub")
    assert refused.returncode == 2 and "--allow-restore is an option of the receive role" in refused.stderr


def test_authorize_prints_one_forced_command_line(client_key: Path) -> None:
    key = Path(f"{client_key}.pub").read_text().strip()
    proc = authorize("--role", "receive", "--root", "/srv/x", f"{client_key}.pub")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and proc.stdout.endswith("\n")
    line = proc.stdout.rstrip("\n")
    assert line.startswith('command="') and ",restrict " in line and line.endswith(key)
    command = line[len('command="'):line.index('",restrict ')]
    assert command == "snapsync serve --root /srv/x --role receive"
    appended = authorize("--role", "send", "--root", "/srv/x", "--append-only", f"{client_key}.pub").stdout
    assert appended.startswith('command="snapsync serve --root /srv/x --role send --append-only",restrict ')


def test_authorize_quotes_a_root_with_spaces(client_key: Path) -> None:
    proc = authorize("--root", "/srv/my backups", f"{client_key}.pub")
    assert proc.returncode == 0 and "--root '/srv/my backups' --role receive" in proc.stdout


BAD_KEYS = {
    "garbage": "not a key at all\n",
    "empty": "",
    "two-keys": "ssh-ed25519 AAAAC3Nza one\nssh-ed25519 AAAAC3Nzb two\n",
    "private-key": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
}


@pytest.mark.parametrize("content", BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_authorize_rejects_a_bad_key_file(tmp_path: Path, content: str) -> None:
    keyfile = tmp_path / "key.pub"
    keyfile.write_text(content)
    proc = authorize("--root", "/srv/x", str(keyfile))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("snapsync: error: ") and "Traceback" not in proc.stderr
    assert "not a single ssh public key" in proc.stderr


@pytest.mark.parametrize("path", ["missing.pub"], ids=["missing"])
def test_authorize_rejects_an_unreadable_key_file(tmp_path: Path, path: str) -> None:
    proc = authorize("--root", "/srv/x", str(tmp_path / path))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("snapsync: error: ") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("root", ["srv//x", "~/backups", "tank/a@b", "./x"])
def test_authorize_rejects_a_root_that_is_neither_path_nor_dataset(client_key: Path, root: str) -> None:
    proc = authorize("--root", root, f"{client_key}.pub")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--root must be an absolute path (btrfs) or a ZFS dataset name" in proc.stderr and proc.stderr.count("\n") == 1


def test_authorize_accepts_a_zfs_dataset_root(client_key: Path) -> None:
    proc = authorize("--root", "tank/backup", f"{client_key}.pub")
    assert proc.returncode == 0, proc.stderr
    assert 'serve --root tank/backup --role receive",restrict ssh-' in proc.stdout


def test_authorize_root_needing_escapes_is_bad_input(client_key: Path) -> None:
    proc = authorize("--root", '/srv/x"y', f"{client_key}.pub")
    assert proc.stdout == "" and "would need escaping" in proc.stderr
    assert proc.returncode == 2


def test_zfs_only_requests_are_refused_by_a_btrfs_server(shared_root: Path) -> None:
    assert_refused(serve(shared_root, request("resume", path="g/d"), "receive"), "resumable receive is a ZFS feature")
    assert_refused(serve(shared_root, request("send", path="g/d", token="1-ab-cd-ef"), "send"), "resume tokens are a ZFS feature")


def test_a_root_that_is_neither_a_path_nor_a_dataset_is_refused(tmp_path: Path) -> None:
    answer = serve(Path("bad name!"), request("hello"), "receive")
    assert_refused(answer, "is not a ZFS dataset name")
