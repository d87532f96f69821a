"""A far end that answers in another role than the one needed, or with an answer of the wrong shape,
fails that target (or pull, or restore) with one line, never the run.

The case that once crashed every command: a backup host whose key was authorized with
`--role send` (as runbooks/host-died.md said for restores): `list`, `replicate` and `run` died with
`internal error: KeyError: 'uuid'`, aborting every group and target. Here through a real sshd with
the key's forced command in the wrong role, and through a forced command that answers anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from snapsync.errors import BackendError
from snapsync.replication.peer import Peer, UnexpectedAnswer
from tests.conftest import make_subvolume
from tests.replication.helpers import copies, run_json, snapsync, write_policy
from tests.sshd import SNAPSYNC, Sshd

pytestmark = pytest.mark.btrfs


def one_line(text: str) -> str:
    assert "\n" not in text.strip() and text.strip(), text
    return text


def site(btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path, *, run: bool = True) -> tuple[Path, Path, Path, Path]:
    """A group with targets `nas` (ssh, an honest receive role) and `usb` (a local disk), replicated
    once to both unless ``run`` is false."""
    data = make_subvolume(btrfs_root / "data", "v1\n")
    nas, usb = target_root / "nas", target_root / "usb"
    nas.mkdir()
    usb.mkdir()
    sshd.authorize(sshd.forced(nas))
    policy = write_policy(tmp_path / "p.toml", [data], {
        "nas": sshd.target_table(nas), "usb": f'type = "local"\npath = "{usb}"',
    })
    if run:
        run_json("-p", str(policy), "run")
    return data, nas, usb, policy


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["target"]: t for g in result["groups"] for t in g["targets"]}


@pytest.mark.parametrize("empty", [False, True], ids=["with-copies", "empty-root"])
def test_a_backup_host_answering_as_send_fails_that_target_alone(
    btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path, empty: bool
) -> None:
    data, nas, usb, policy = site(btrfs_root, target_root, sshd, tmp_path)
    if empty:
        nas = target_root / "new-nas"
        nas.mkdir()
        policy.write_text(policy.read_text().replace(f'path = "{target_root / "nas"}"', f'path = "{nas}"'))
    sshd.authorize(sshd.forced(nas, "send"))  # host-died.md, as it once read, for the restore
    (data / "data.txt").write_text("v2\n")
    time.sleep(1.05)
    run_json("-p", str(policy), "snapshot")
    wanted = "the backup host answers as role send; its authorized_keys line for this host must use --role receive"

    for command in (["replicate"], ["run"], ["list"]):
        proc = snapsync("-p", str(policy), *command, "--json")
        assert proc.returncode == 1, (command, proc.stdout, proc.stderr)
        assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        result = json.loads(proc.stdout)
        by_target = targets(result)
        assert by_target["usb"]["ok"] and not by_target["usb"]["errors"], by_target["usb"]
        (error,) = by_target["nas"]["errors"]
        assert wanted in one_line(error), error
    source = sorted(p.name for p in (data.parent / ".snapsync" / "data").iterdir() if not p.name.startswith("."))
    assert len(source) >= 2 and copies(usb, "app", data) == source  # the new snapshots still reached the other target
    assert copies(target_root / "nas", "app", data) == source[:1]  # and nothing was sent to, or deleted on, nas
    text = snapsync("-p", str(policy), "replicate")
    assert text.returncode == 1 and wanted in text.stdout + text.stderr and "internal error" not in text.stderr

    sshd.authorize(sshd.forced(nas))  # switched back: replication carries on
    assert targets(run_json("-p", str(policy), "replicate"))["nas"]["ok"]


def test_a_pull_source_answering_as_receive_fails_that_pull_alone(
    btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path
) -> None:
    data = make_subvolume(btrfs_root / "persist" / "data", "v1\n")
    source = write_policy(tmp_path / "src.toml", [data], {})
    run_json("-p", str(source), "snapshot")
    policy = tmp_path / "backup.toml"
    policy.write_text(sshd.pull_policy("forge", btrfs_root / "persist", [data], target_root))
    sshd.authorize(sshd.forced(btrfs_root / "persist", "receive"))
    proc = snapsync("-p", str(policy), "replicate", "--json")
    assert proc.returncode == 1 and "internal error" not in proc.stderr, proc.stderr
    (pull,) = json.loads(proc.stdout)["groups"][0]["targets"]
    (error,) = pull["errors"]
    assert "the source host answers as role receive" in one_line(error) and "--role send" in error, error

    sshd.authorize(sshd.forced(btrfs_root / "persist", "send"))
    run_json("-p", str(policy), "replicate")
    assert len(copies(target_root, "forge", data)) == 1


# --- answers of any shape, from a forced command that says whatever it is told --------------------

FAKE = """\
import json, os, sys
line = b""
while not line.endswith(b"\\n"):
    chunk = os.read(0, 1)
    if not chunk:
        break
    line += chunk
answers = json.load(open(sys.argv[1]))
op = json.loads(line)["op"]
sys.stdout.write(answers.get(op, answers.get("*", "")))
sys.exit(0)
"""

GOOD_COPY = {"name": "app_2026-03-01T12:00:00Z", "uuid": "u", "received_uuid": "r", "read_only": True, "partial": False,
             "created": "2026-03-01T12:00:00Z"}
MALFORMED: dict[str, Any] = {
    "no-paths": {"v": 1, "ok": True},
    "paths-a-list": {"v": 1, "ok": True, "paths": [GOOD_COPY]},
    "entries-a-dict": {"v": 1, "ok": True, "paths": {"P": GOOD_COPY}},
    "entry-a-string": {"v": 1, "ok": True, "paths": {"P": ["app_2026-03-01T12:00:00Z"]}},
    "entry-missing-uuid": {"v": 1, "ok": True, "paths": {"P": [{k: v for k, v in GOOD_COPY.items() if k != "uuid"}]}},
    "bad-date": {"v": 1, "ok": True, "paths": {"P": [{**GOOD_COPY, "created": "yesterday"}]}},
    "snapshot-entries-unsaid": {"v": 1, "ok": True, "paths": {"P": [
        {"name": "app_2026-03-01T12:00:00Z", "created": "2026-03-01T12:00:00Z", "guid": "g"}]}},
    "role-a-list": {"v": 1, "ok": True, "role": ["receive"], "paths": {}},
    "role-unknown": {"v": 1, "ok": True, "role": "admin", "paths": {}},
    "role-says-receive-entries-are-snapshots": {"v": 1, "ok": True, "role": "receive", "paths": {"P": [
        {"name": "app_2026-03-01T12:00:00Z", "created": "2026-03-01T12:00:00Z", "guid": "g"}]}},
    "resume-a-string": {"v": 1, "ok": True, "paths": {}, "resume": "token"},
    "error-with-newline": {"v": 1, "ok": False, "kind": "failed", "error": "first\nsecond\x1b[31m"},
    "not-json": "<html>502</html>",
    "a-json-list": [1, 2],
}


def fake_line(sshd: Sshd, tmp_path: Path, answers: dict[str, Any]) -> str:
    script = tmp_path / "fake_serve.py"
    script.write_text(FAKE)
    table = tmp_path / "answers.json"
    table.write_text(json.dumps({op: a if isinstance(a, str) else json.dumps(a) + "\n" for op, a in answers.items()}))
    return f'command="{sys.executable} {script} {table}",restrict {sshd.public_key()}'


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_answer_fails_that_target_with_one_line(
    btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path, answer: Any
) -> None:
    data, _, usb, policy = site(btrfs_root, target_root, sshd, tmp_path, run=False)
    key = f"app/{str(data).lstrip('/')}"
    if isinstance(answer, dict) and isinstance(answer.get("paths"), dict):
        answer = {**answer, "paths": {key if p == "P" else p: v for p, v in answer["paths"].items()}}
    sshd.authorize(fake_line(sshd, tmp_path, {"list": answer}))
    proc = snapsync("-p", str(policy), "run", "--json")
    assert proc.returncode == 1 and "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    by_target = targets(json.loads(proc.stdout))
    assert by_target["usb"]["ok"], by_target["usb"]
    (error,) = by_target["nas"]["errors"]
    assert one_line(error).isprintable() and "target nas" in error, error
    assert len(copies(usb, "app", data)) == 1


class Fixed:
    """A transport to a process that prints one fixed answer, for the answers only a peer sees."""

    name = "fake"

    def __init__(self, tmp_path: Path, answers: dict[str, Any]) -> None:
        script = tmp_path / "fake_serve.py"
        script.write_text(FAKE)
        self.table = tmp_path / "answers.json"
        self.table.write_text(json.dumps({op: a if isinstance(a, str) else json.dumps(a) + "\n" for op, a in answers.items()}))
        self.script = script

    def argv(self, role: str) -> list[str]:
        return [sys.executable, str(self.script), str(self.table)]

    def describe(self) -> str:
        return "fake"

    def multiplexed(self) -> Any:
        from contextlib import nullcontext

        return nullcontext()

    def transient(self, returncode: int, stderr: str) -> bool:
        return False


@pytest.mark.parametrize(("op", "answer", "call"), [
    ("delete", {"v": 1, "ok": True}, lambda p: p.delete("P", ["n"])),
    ("delete", {"v": 1, "ok": True, "deleted": "n"}, lambda p: p.delete("P", ["n"])),
    ("delete", {"v": 1, "ok": True, "deleted": [1]}, lambda p: p.delete("P", ["n"])),
    ("send", {"v": 1, "ok": True}, lambda p: p.open_send("P", "n", None, "none")),
    ("send", {"v": 1, "ok": True, "name": "n", "guid": 7}, lambda p: p.open_send("P", "n", None, "none")),
    ("list", {"v": 1, "ok": True, "role": "receive", "restore": False, "paths": {}}, lambda p: p.readable(["P"])),
], ids=["delete-no-list", "delete-a-string", "delete-not-names", "send-no-header", "send-guid-a-number", "read-no-restore"])
def test_every_answer_a_caller_reads_is_checked(tmp_path: Path, op: str, answer: Any, call: Any) -> None:
    restore = op in ("send", "list")
    peer = Peer(Fixed(tmp_path, {op: answer}), "send" if restore else "receive", restore=restore)  # type: ignore[arg-type]
    with pytest.raises(UnexpectedAnswer) as raised:
        call(peer)
    assert isinstance(raised.value, BackendError)
    one_line(str(raised.value))


# --- the server says its role, and what a receive key that may restore can do --------------------


def serve(root: Path, op: str, *extra: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [*SNAPSYNC, "serve", "--root", str(root), *extra], capture_output=True, timeout=30,
        input=json.dumps({"v": 1, "op": op, **fields}).encode() + b"\n",
    )
    assert b"Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout.splitlines()[0])


def test_a_receive_key_that_may_restore_reads_its_copies_and_nothing_more(
    btrfs_root: Path, target_root: Path, tmp_path: Path
) -> None:
    data = make_subvolume(btrfs_root / "data", "v1\n")
    policy = write_policy(tmp_path / "p.toml", [data], {"usb": f'type = "local"\npath = "{target_root}"'})
    run_json("-p", str(policy), "run")
    (name,) = copies(target_root, "app", data)
    path = f"app/{str(data).lstrip('/')}"

    code, hello = serve(target_root, "hello", "--role", "receive", "--allow-restore", "--append-only")
    assert code == 0 and (hello["role"], hello["restore"], hello["append_only"]) == ("receive", True, True)
    assert serve(target_root, "hello", "--role", "receive")[1]["restore"] is False
    code, listed = serve(target_root, "list", "--role", "receive", "--allow-restore", paths=[path])
    assert code == 0 and listed["role"] == "receive" and listed["restore"] is True and listed["paths"][path][0]["name"] == name

    code, refused = serve(target_root, "send", "--role", "receive", path=path, name=name)
    assert code == 2 and "not allowed for role 'receive'" in refused["error"] and "--allow-restore" in refused["error"]
    assert refused["role"] == "receive" and refused["restore"] is False
    proc = subprocess.run(
        [*SNAPSYNC, "serve", "--root", str(target_root), "--role", "receive", "--allow-restore", "--append-only"],
        input=json.dumps({"v": 1, "op": "send", "path": path, "name": name}).encode() + b"\n", capture_output=True, timeout=60,
    )
    header, _, stream = proc.stdout.partition(b"\n")
    assert proc.returncode == 0 and json.loads(header)["name"] == name and stream.startswith(b"btrfs-stream")

    code, answer = serve(target_root, "hold", "--role", "receive", "--allow-restore", "--append-only",
                         path=path, tag="pull:x.y", names=[name])
    assert code == 2 and "not allowed for role 'receive'" in answer["error"]
    code, answer = serve(target_root, "delete", "--role", "receive", "--allow-restore", "--append-only", path=path, names=[name])
    assert code == 2 and "append-only" in answer["error"]
    assert copies(target_root, "app", data) == [name]
    assert not list(target_root.rglob(".holds.json"))

    code, answer = serve(target_root, "hello", "--role", "send", "--allow-restore")
    assert code == 2 and "--allow-restore is an option of the receive role" in answer["error"]
