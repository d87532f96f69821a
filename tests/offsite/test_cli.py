"""The offsite commands as a sysadmin runs them, on a dir target (a NAS share or USB disk)."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from tests.conftest import make_subvolume
from tests.replication.helpers import run_json, snapsync, tree_digest, write_policy

pytestmark = pytest.mark.btrfs


@pytest.fixture
def nas_site(btrfs_root: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A group of one dataset with a dir target on a directory of the same btrfs; returns (policy, dataset, nas)."""
    app = make_subvolume(btrfs_root / "persist" / "app", "v1\n")
    nas = btrfs_root / "nas"
    nas.mkdir()
    key = tmp_path / "offsite.key"
    assert snapsync("keygen", str(key)).returncode == 0
    table = f'type = "dir"\npath = "{nas}"\nkey_file = "{key}"\nchunk_size = "1M"'
    extra = '[targets.ssh]\ntype = "ssh"\nhost = "backup.lan"\npath = "/backups"'
    policy = write_policy(tmp_path / "policy.toml", [app], {"nas": table})
    policy.write_text(policy.read_text() + extra + "\n")
    return policy, app, nas


def test_keygen_writes_a_private_key_once(tmp_path: Path) -> None:
    path = tmp_path / "k"
    proc = snapsync("keygen", str(path))
    assert proc.returncode == 0 and "key id" in proc.stdout and "back it up" in proc.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = snapsync("keygen", str(path))
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_run_uploads_then_verify_list_and_restore(nas_site: tuple[Path, Path, Path], target_root: Path) -> None:
    policy, app, nas = nas_site
    p = ["--policy", str(policy)]
    first = run_json(*p, "run")
    (target,) = first["groups"][0]["targets"]
    assert target["target"] == "nas" and target["ok"] and target["sent"][0]["kind"] == "full"
    (app / "data.txt").write_text("v2\n")
    time.sleep(1.1)  # snapshot names carry the second
    second = run_json(*p, "snapshot")
    assert second["groups"][0]["snapshot"]
    up = run_json(*p, "replicate")
    assert [s["kind"] for s in up["groups"][0]["targets"][0]["sent"]] == ["incremental"]

    checked = run_json(*p, "verify", "nas")
    assert checked["ok"] and checked["manifests"] == 2 and checked["chunks_read"] == checked["chunks"] == 2
    sampled = run_json(*p, "verify", "nas", "--sample", "1")
    assert sampled["chunks_read"] == 1

    listed = run_json(*p, "list")
    (state,) = [t for t in listed["groups"][0]["targets"] if t["target"] == "nas"]
    assert len(state["have"][str(app)]) == 2 and state["lag_seconds"] == 0

    plan = run_json(*p, "restore", "app", "--from", "nas", "--to", str(target_root), "--dry-run")
    assert plan["dry_run"] and len(plan["datasets"][0]["chain"]) == 2 and not (target_root / "app").exists()
    done = run_json(*p, "restore", "app", "--from", "nas", "--to", str(target_root))  # stdout is JSON only
    candidates = list((target_root / "app").rglob(done["snapshot"]))
    assert len(candidates) == 1
    assert tree_digest(candidates[0]) == tree_digest(app)
    again = run_json(*p, "restore", f"app@{done['snapshot']}", "--from", "nas", "--to", str(target_root))
    assert again["bytes"] == 0 and len(again["datasets"][0]["already_present"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["restore", "app", "--from", "nope", "--to", "/tmp"], "no target 'nope'"),
        (["verify", "ssh"], "verify reads offsite targets"),
        (["restore", "ghost", "--from", "nas", "--to", "/tmp"], "group 'ghost' has nothing stored"),
        (["restore", "app", "--from", "nas", "--to", "pool/restore"], None),
        (["restore", "app", "--from", "nas", "--to", "/tmp", "--key-file", "/nonexistent/k"], "key file does not exist"),
    ],
)
def test_bad_restore_and_verify_input_is_one_line_exit_2(nas_site: tuple[Path, Path, Path], args: list[str], message: str | None) -> None:
    policy, _, _ = nas_site
    run_json("--policy", str(policy), "run")
    proc = snapsync("--policy", str(policy), *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in proc.stderr
    if message:
        assert message in line
    else:
        assert "restores into a directory on btrfs" in line


def test_restore_from_an_unreachable_host_is_one_line_exit_1(nas_site: tuple[Path, Path, Path]) -> None:
    policy, _, _ = nas_site
    proc = snapsync("--policy", str(policy), "restore", "app", "--from", "ssh", "--to", "/tmp")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "\n" not in proc.stderr.strip() and "target ssh (root@backup.lan:22)" in proc.stderr


def test_verify_reports_a_damaged_chunk_with_exit_1(nas_site: tuple[Path, Path, Path]) -> None:
    policy, _, nas = nas_site
    run_json("--policy", str(policy), "run")
    (chunk,) = nas.rglob("chunk-000000")
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"\0")
    proc = snapsync("--policy", str(policy), "verify", "nas", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert not report["ok"] and any("chunk-000000" in p for p in report["problems"])


def test_a_second_host_uploading_the_same_group_to_the_same_place_is_refused(nas_site: tuple[Path, Path, Path]) -> None:
    policy, _, nas = nas_site
    run_json("--policy", str(policy), "run")
    before = sorted(p.relative_to(nas) for p in nas.rglob("*"))
    other = policy.with_name("other.toml")
    other.write_text(policy.read_text().replace('host = "src"', 'host = "other"'))
    result = run_json("--policy", str(other), "run", expect=1)
    (target,) = [t for t in result["groups"][0]["targets"] if t["target"] == "nas"]
    assert "uploaded by host 'src', this is 'other'; give each host its own prefix" in target["errors"][0]
    assert sorted(p.relative_to(nas) for p in nas.rglob("*")) == before  # nothing uploaded, nothing pruned


def test_policy_check_warns_about_a_missing_key_and_directory(btrfs_root: Path, tmp_path: Path) -> None:
    app = make_subvolume(btrfs_root / "app")
    table = f'type = "dir"\npath = "{tmp_path}/unmounted"\nkey_file = "{tmp_path}/none.key"\nfull_every = 6'
    policy = write_policy(tmp_path / "p.toml", [app], {"nas": table})
    result = run_json("--policy", str(policy), "policy", "check")
    warnings = result["warnings"]
    assert any(w.startswith("targets.nas.key_file:") and "snapsync keygen" in w for w in warnings), warnings
    assert any(w.startswith("targets.nas.path:") and "is the disk or share mounted?" in w for w in warnings), warnings
    nas = result["policy"]["targets"]["nas"]
    assert nas["full_every"] == 6 and nas["chunk_size"] == 64 << 20


def test_damage_to_an_old_upload_does_not_block_restoring_the_newest(btrfs_root: Path, target_root: Path, tmp_path: Path) -> None:
    app = make_subvolume(btrfs_root / "app", "v0\n")
    nas = btrfs_root / "nas"
    nas.mkdir()
    key = tmp_path / "k"
    snapsync("keygen", str(key), check=True)
    policy = write_policy(tmp_path / "p.toml", [app], {"nas": f'type = "dir"\npath = "{nas}"\nkey_file = "{key}"\nfull_every = 0'})
    for step in range(3):
        (app / "data.txt").write_text(f"v{step}\n")
        run_json("--policy", str(policy), "snapshot")
        run_json("--policy", str(policy), "replicate")
        time.sleep(1.1)
    oldest = sorted(nas.rglob("manifest.json"))[0]
    oldest.write_text(oldest.read_text().replace('"complete":true', '"complete":false'))
    checked = run_json("--policy", str(policy), "verify", "nas", expect=1)
    assert any(str(oldest.relative_to(nas)) in p for p in checked["problems"])
    done = run_json("--policy", str(policy), "restore", "app", "--from", "nas", "--to", str(target_root))
    assert done["problems"] and (app / "data.txt").read_text() == "v2\n"
    (copy,) = list((target_root / "app").rglob(done["snapshot"]))
    assert (copy / "data.txt").read_text() == "v2\n"


def test_a_full_share_is_a_one_line_error_and_local_pruning_still_runs(btrfs_root: Path, tmp_path: Path) -> None:
    import subprocess

    full = tmp_path / "tiny"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    try:
        app = make_subvolume(btrfs_root / "app")
        (app / "big.bin").write_bytes(b"\xa5" * 10 + bytes(range(256)) * 12000)
        (app / "noise.bin").write_bytes(Path("/dev/urandom").open("rb").read(3 << 20))
        key = tmp_path / "k"
        snapsync("keygen", str(key), check=True)
        policy = write_policy(tmp_path / "p.toml", [app], {"nas": f'type = "dir"\npath = "{full}"\nkey_file = "{key}"'})
        proc = snapsync("--policy", str(policy), "run", "--json")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
        (group,) = json.loads(proc.stdout)["groups"]
        assert group["snapshot"] and group["plan"] is not None  # the snapshot was taken and local pruning ran
        (target,) = group["targets"]
        assert "No space left on device" in target["errors"][0] and "\n" not in target["errors"][0]
        assert not list(full.rglob("manifest.json")) and not list(full.rglob(".part-*"))
    finally:
        subprocess.run(["umount", str(full)], check=True)


def _tty(argv: list[str]) -> str:
    """What a terminal shows of a command: run under script(1), which gives it a pseudo-terminal."""
    import shlex
    import subprocess
    import sys

    line = shlex.join([sys.executable, "-m", "snapsync", *argv])
    done = subprocess.run(["script", "-qefc", line, "/dev/null"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "COLUMNS": "120", "TERM": "xterm"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_a_terminal_sees_progress_and_a_pipe_sees_whole_lines_only(nas_site: tuple[Path, Path, Path]) -> None:
    policy, app, _ = nas_site
    (app / "big.bin").write_bytes(__import__("os").urandom(6 << 20))
    p = ["--policy", str(policy)]
    ran = _tty([*p, "run"])
    plain = __import__("re").sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", ran)
    assert "\x1b[" in ran and "nas: app" in plain and "app: ok: took" in plain  # the upload's progress bar, then the report
    (app / "more.bin").write_bytes(__import__("os").urandom(1 << 20))
    time.sleep(1.1)
    piped_run = snapsync(*p, "snapshot")
    assert piped_run.returncode == 0 and "\x1b[" not in piped_run.stdout + piped_run.stderr
    on_tty = _tty([*p, "verify", "nas"])
    assert "nas: verify" in on_tty and "MiB" in on_tty  # the progress bar, in the units of everything else
    assert "\x1b[" in on_tty  # drawn, then cleared
    piped = snapsync(*p, "verify", "nas")
    assert piped.returncode == 0 and "nas: verify" not in piped.stdout + piped.stderr and "\x1b[" not in piped.stdout + piped.stderr
    assert all(len(line) < 200 for line in piped.stdout.splitlines())
    listed = _tty([*p, "list"])
    assert "app" in listed and "nas" in listed


def test_one_path_comes_back_from_offsite_and_from_another_host(nas_site: tuple[Path, Path, Path], target_root: Path, tmp_path: Path) -> None:
    """Through a throwaway place: the group restored there, the path copied out with its metadata, the place gone."""
    import os
    import subprocess

    policy, app, _ = nas_site
    policy.write_text(policy.read_text().replace('targets = ["nas"]', 'targets = ["nas", "usb"]')
                      + f'[targets.usb]\ntype = "local"\npath = "{target_root}"\n')
    (app / "etc").mkdir()
    (app / "etc" / "app.ini").write_text("[server]\nport = 3000\n")
    os.chown(app / "etc" / "app.ini", 1000, 1000)
    os.setxattr(app / "etc" / "app.ini", "user.origin", b"backup")
    p = ["--policy", str(policy)]
    run_json(*p, "run")
    want = tree_digest(app / "etc")
    (app / "etc" / "app.ini").write_text("broken by hand\n")

    mounts_before = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout
    for source in ("nas", "usb"):
        out = tmp_path / f"from-{source}"
        out.mkdir()
        done = run_json(*p, "restore", "app", "--from", source, "--path", str(app / "etc"), "--to", str(out))
        assert done["paths"][0]["source"].startswith(f"{source}:app@")
        assert tree_digest(out / "etc") == want
        assert os.getxattr(out / "etc" / "app.ini", "user.origin") == b"backup" and (out / "etc" / "app.ini").stat().st_uid == 1000
    assert subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True).stdout == mounts_before  # the throwaway place is gone
    refused = snapsync(*p, "restore", "app", "--from", "nas", "--path", str(app / "etc"), "--to", str(tmp_path / "from-nas"))
    assert refused.returncode == 2 and "exists; nothing restored" in refused.stderr
