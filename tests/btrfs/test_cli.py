"""The installed command, run as a user would run it, against real btrfs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapsync.host.lock import policy_lock
from tests.conftest import interruptible, make_subvolume


def snapsync(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snapsync", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def _write_policy(tmp_path: Path, root: Path, extra: str = "") -> Path:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f"""
version = 1
[defaults.retention]
keep_last = 2
daily = 3
[groups.web]
backend = "btrfs"
datasets = [{json.dumps(str(root / "persist" / "web data"))}]
[groups.db]
backend = "btrfs"
datasets = [{json.dumps(str(root / "persist" / "pg"))}, {json.dumps(str(root / "persist" / "wal"))}]
{extra}
"""
    )
    policy.chmod(0o600)
    return policy


@pytest.fixture
def setup(tmp_path: Path, btrfs_root: Path) -> tuple[Path, Path]:
    for leaf in ("web data", "pg", "wal"):
        make_subvolume(btrfs_root / "persist" / leaf, leaf)
    return _write_policy(tmp_path, btrfs_root), btrfs_root


@pytest.mark.parametrize("command", [[], ["snapshot"], ["prune"], ["list"], ["run"], ["check"], ["policy", "check"], ["demo"]])
def test_every_command_documents_itself(command: list[str]) -> None:
    proc = snapsync(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    if command in (["prune"],):
        assert "--explain" in proc.stdout and "--dry-run" in proc.stdout and "--json" in proc.stdout
    if command == []:
        assert "Exit codes" in proc.stdout and "--policy" in proc.stdout


def test_version() -> None:
    proc = snapsync("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("snapsync ")


def test_snapshot_list_prune_round_trip(setup: tuple[Path, Path]) -> None:
    policy, root = setup
    taken = snapsync("-p", str(policy), "snapshot", "--json")
    assert taken.returncode == 0, taken.stderr
    names = {g["group"]: g["snapshot"] for g in json.loads(taken.stdout)["groups"]}
    assert set(names) == {"web", "db"} and all(names.values())

    listed = json.loads(snapsync("-p", str(policy), "list", "--json").stdout)
    db = next(g for g in listed["groups"] if g["group"] == "db")
    assert [[s["name"] for s in d["snapshots"]] for d in db["datasets"]] == [[names["db"]], [names["db"]]]
    assert all(s["read_only"] and s["ours"] for d in db["datasets"] for s in d["snapshots"])

    explained = snapsync("-p", str(policy), "prune", "--dry-run", "--explain", "--json", "db")
    assert explained.returncode == 0, explained.stderr
    (group,) = json.loads(explained.stdout)["groups"]
    assert group["dry_run"] and group["plan"] == [
        {"name": names["db"], "created": names["db"].split("_", 1)[1], "keep": True,
         "reasons": group["plan"][0]["reasons"]}
    ]
    assert "newest" in group["plan"][0]["reasons"]

    human = snapsync("-p", str(policy), "prune", "--dry-run", "--explain", "db")
    assert human.returncode == 0 and "newest" in human.stdout and names["db"] in human.stdout


def test_run_takes_due_snapshots_once(setup: tuple[Path, Path]) -> None:
    policy, _ = setup
    first = json.loads(snapsync("-p", str(policy), "run", "--json").stdout)
    second = json.loads(snapsync("-p", str(policy), "run", "--json").stdout)
    assert all(g["snapshot"] for g in first["groups"])
    assert all(g["snapshot"] is None and g["not_due"] for g in second["groups"])
    assert all(g["next_due"] > g["not_due"].split("_", 1)[1] for g in second["groups"])  # the next slot, after the newest
    third = snapsync("-p", str(policy), "run")
    assert third.returncode == 0 and third.stdout.count("next due ") == 2, third.stdout
    quiet = snapsync("-p", str(policy), "--quiet", "run")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""  # nothing wrong: nothing for cron to mail


def test_missing_dataset_is_one_line_and_exit_2(tmp_path: Path, btrfs_root: Path) -> None:
    policy = _write_policy(tmp_path, btrfs_root)
    proc = snapsync("policy", "check", str(policy))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"{policy}: groups.web.datasets[0]:" in proc.stderr and "does not exist" in proc.stderr
    syntax = snapsync("policy", "check", "--syntax-only", str(policy))
    assert syntax.returncode == 0, syntax.stderr


def test_policy_check_prints_the_resolved_policy(setup: tuple[Path, Path]) -> None:
    policy, _ = setup
    proc = snapsync("-p", str(policy), "policy", "check", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["policy"]["groups"]["db"]["retention"]["daily"] == 3
    assert any("atomically" in w for w in data["warnings"])


def test_bad_usage_exits_2(setup: tuple[Path, Path]) -> None:
    policy, _ = setup
    unknown = snapsync("-p", str(policy), "snapshot", "nope")
    assert unknown.returncode == 2 and "no group named 'nope'" in unknown.stderr
    missing = snapsync("-p", "/nonexistent/policy.toml", "list")
    assert missing.returncode == 2 and "/nonexistent/policy.toml" in missing.stderr
    assert "Traceback" not in unknown.stderr + missing.stderr
    flag = snapsync("prune", "--no-such-flag")
    assert flag.returncode == 2


def test_second_run_waits_then_exits_3(setup: tuple[Path, Path], tmp_path: Path) -> None:
    policy, _ = setup
    env = {"SNAPSYNC_LOCK_DIR": str(tmp_path / "locks")}
    os.environ.update(env)
    try:
        with policy_lock(str(policy), timeout=1):
            started = time.monotonic()
            proc = snapsync("-p", str(policy), "run", "--lock-timeout", "1.5", env=env)
            waited = time.monotonic() - started
    finally:
        del os.environ["SNAPSYNC_LOCK_DIR"]
    assert proc.returncode == 3, proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr and "gave up after 1.5s" in proc.stderr
    assert waited >= 1.5
    after = snapsync("-p", str(policy), "run", "--lock-timeout", "1", env=env)
    assert after.returncode == 0, after.stderr


def _demo_mounts() -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if "snapsync-demo" in line]


def test_demo_runs_and_cleans_up(btrfs_root: Path) -> None:
    proc = snapsync("demo", "--days", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["taken"] == 3 * 24 + 3 * 6
    assert result["foreign_snapshot_untouched"] and not result["errors"]
    assert not _demo_mounts()


def test_demo_cleans_up_on_ctrl_c(btrfs_root: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapsync", "demo", "--days", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible,
    )
    deadline = time.monotonic() + 30
    while not _demo_mounts() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _demo_mounts(), "the demo never mounted its filesystem"
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert not _demo_mounts()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert "snapsync-demo" not in loops


MALFORMED = {
    "missing key": ('version = 1\n[groups.a]\ndatasets = ["/x"]\n', "groups.a.backend: missing required key"),
    "wrong type": ('version = 1\n[groups.a]\nbackend = "btrfs"\ndatasets = ["/x"]\n[groups.a.retention]\ndaily = "seven"\n',
                   "groups.a.retention.daily: expected an integer"),
    "unknown key": ('version = 1\n[groups.a]\nbackend = "btrfs"\ndatasets = ["/x"]\nintervall = "1h"\n',
                    "did you mean 'interval'"),
    "bad duration": ('version = 1\n[groups.a]\nbackend = "btrfs"\ndatasets = ["/x"]\ninterval = "1 fortnight"\n',
                     "groups.a.interval: invalid duration"),
    "unknown zone": ('version = 1\n[defaults]\ntimezone = "Europe/Berlinn"\n[groups.a]\nbackend = "btrfs"\ndatasets = ["/x"]\n',
                     "unknown time zone 'Europe/Berlinn'"),
    "duplicate group": ('version = 1\n[groups.a]\nbackend = "btrfs"\ndatasets = ["/x"]\n[groups.a]\nbackend = "btrfs"\n',
                        "invalid TOML"),
    "not toml": ("version = = 1\n", "invalid TOML"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_policies_give_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    text, expected = MALFORMED[case]
    policy = tmp_path / "bad policy.toml"
    policy.write_text(text)
    for argv in (["policy", "check", str(policy)], ["-p", str(policy), "run"], ["-p", str(policy), "prune", "--dry-run"]):
        proc = snapsync(*argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert proc.stdout == "" and "Traceback" not in proc.stderr
        assert proc.stderr.count("\n") == 1 and str(policy) in proc.stderr and expected in proc.stderr, proc.stderr
    as_json = json.loads(snapsync("policy", "check", "--json", str(policy)).stdout)
    assert as_json["exit_code"] == 2 and expected in as_json["error"]


def test_hooks_from_a_world_writable_policy_are_refused(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'version = 1\n[groups.a]\nbackend = "btrfs"\ndatasets = ["/x"]\n'
        '[[groups.a.hooks]]\ntype = "command"\npre = ["/bin/true"]\n'
    )
    policy.chmod(0o666)
    proc = snapsync("-p", str(policy), "run")
    assert proc.returncode == 2 and "world-writable" in proc.stderr and "chmod go-w" in proc.stderr


def test_piped_output_is_whole_and_a_reader_that_stops_early_ends_nothing(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """In a pipe no line is wrapped and no cell cut short; `| head` leaves the command's status 0 and
    stderr empty; a run whose reader is gone still does all its work."""
    policy, root = setup
    long_dataset = root / "persist" / ("a-dataset-with-a-name-long-enough-to-pass-eighty-columns-" * 2).rstrip("-")
    make_subvolume(long_dataset, "long")
    policy.write_text(policy.read_text() + f"[groups.long]\nbackend = \"btrfs\"\ndatasets = [{json.dumps(str(long_dataset))}]\n")
    assert snapsync("-p", str(policy), "snapshot").returncode == 0

    listed = snapsync("-p", str(policy), "list")
    assert listed.returncode == 0, listed.stderr
    assert str(long_dataset) in listed.stdout  # not wrapped at 80 columns
    assert "…" not in listed.stdout  # no cell cut short

    for args in (["list"], ["list", "--json"]):
        piped = subprocess.run(f"{sys.executable} -m snapsync -p {policy} {' '.join(args)} | head -c 1 >/dev/null; "
                               "echo ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
        assert piped.stdout.strip() == "0" and piped.stderr == "", (args, piped.stdout, piped.stderr)

    marker = tmp_path / "post-ran"
    hook = f'[[groups.long.hooks]]\ntype = "command"\npre = ["/bin/sh", "-c", "sleep 0.5"]\npost = ["/bin/touch", "{marker}"]\n'
    policy.write_text(policy.read_text() + hook)
    before = len(list((root / "persist" / ".snapsync").rglob("snapsync_*")))
    closed = subprocess.run(f"{sys.executable} -m snapsync -p {policy} snapshot | true; echo ${{PIPESTATUS[0]}}",
                            shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120)
    assert closed.stdout.strip() == "0" and closed.stderr == "", closed.stdout + closed.stderr
    assert marker.exists()
    assert len(list((root / "persist" / ".snapsync").rglob("snapsync_*"))) > before


def test_a_group_line_has_no_empty_status_text(setup: tuple[Path, Path]) -> None:
    policy, _ = setup
    done = snapsync("-p", str(policy), "replicate")
    assert done.returncode == 0, done.stderr
    assert done.stdout and not any(line.rstrip().endswith("ok:") for line in done.stdout.splitlines()), done.stdout


def test_help_texts_are_reflowed_not_broken_where_the_source_breaks() -> None:
    """The terminal wraps help text; a docstring's own line breaks do not show ("every manifest is / authenticated")."""
    from snapsync.cli.app import _reflow, app, policy_app

    for typer_app in (app, policy_app):
        for info in typer_app.registered_commands:
            doc = info.callback.__doc__ if info.callback else None
            if doc:
                assert all("\n" not in p for p in _reflow(doc).split("\n\n")), info.name
    wide = subprocess.run([sys.executable, "-m", "snapsync", "restore", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "300"}, timeout=60)
    assert "every manifest is authenticated and every chunk object checked" in wide.stdout, wide.stdout


def _complete(policy: Path, line: str) -> list[str]:
    """What bash completion offers for the last word of ``line`` (as the script --show-completion prints asks)."""
    words = ["snapsync", "-p", str(policy), *line.split()] + ([""] if line.endswith(" ") else [])
    done = subprocess.run([sys.executable, "-m", "snapsync"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "_SNAPSYNC_COMPLETE": "complete_bash", "COMP_WORDS": " ".join(words),
                               "COMP_CWORD": str(len(words) - 1)})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout.split()


def test_shell_completion_offers_the_policys_groups_targets_and_snapshots(setup: tuple[Path, Path]) -> None:
    policy, _ = setup
    policy.write_text(policy.read_text() + '[targets.usb]\ntype = "local"\npath = "/mnt/usb"\n'
                      '[targets.nas]\ntype = "local"\npath = "/mnt/nas"\n')
    taken = json.loads(snapsync("-p", str(policy), "snapshot", "--json", "db").stdout)["groups"][0]["snapshot"]
    assert sorted(_complete(policy, "list ")) == ["db", "web"]
    assert _complete(policy, "prune w") == ["web"]
    assert sorted(_complete(policy, "replicate ")) == ["nas", "usb"]
    assert _complete(policy, "rollback db ") == [taken]
    assert _complete(policy.with_name("absent.toml"), "list ") == []  # no policy: nothing offered, nothing printed
    shown = snapsync("--show-completion", "bash")  # named: detecting the shell from the parent process fails under a CI runner
    assert shown.returncode == 0 and "_SNAPSYNC_COMPLETE" in shown.stdout
