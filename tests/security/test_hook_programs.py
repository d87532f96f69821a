"""Programs that hooks run as root: refused when anyone but root could change which file runs.

The policy file itself must be root's and not group/world-writable; these tests hold every program a
hook runs (command hooks' pre and post, systemctl for a freeze hook's unit) to the same rule, through
the installed CLI: the program file, its script interpreter, each directory on the way (symlinks
followed) and each PATH directory searched before it. The attacks are real: a user (``nobody``) swaps
the script, or plants one earlier on PATH, and the canary it would write must not appear.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapsync.ops.hooks import Hooks, Moment, UntrustedProgram, trusted_program
from snapsync.policy.schema import CommandHook
from tests.conftest import make_subvolume

NOBODY = 65534


def snapsync(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapsync", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def safe(tmp_path: Path) -> Iterator[Path]:
    """A directory that only root can change, all the way up to /. pytest's tmp_path is below /tmp,
    which anyone can write to, so every program in it is refused, rightly."""
    if os.geteuid() != 0:
        if os.environ.get("SNAPSYNC_REQUIRE_BTRFS") == "1":
            pytest.fail("the hook program tests need root (chown, setpriv)")
        pytest.skip("needs root")
    path = Path(tempfile.mkdtemp(prefix="snapsync-hook-test-", dir="/run"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def script(path: Path, canary: Path, mode: int = 0o755, uid: int = 0, shebang: str = "#!/bin/sh") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{shebang}\necho ran >> {canary}\n")
    path.chmod(mode)
    os.chown(path, uid, 0)
    return path


def policy(tmp_path: Path, dataset: Path | str, *argv: str, freeze_unit: str | None = None) -> Path:
    hooks = f'[[groups.app.hooks]]\ntype = "command"\npre = {json.dumps(list(argv))}\n' if argv else ""
    if freeze_unit:
        hooks += f'[[groups.app.hooks]]\ntype = "freeze"\nunit = "{freeze_unit}"\n'
    path = tmp_path / "policy.toml"
    path.write_text(f'version = 1\n[groups.app]\nbackend = "btrfs"\ndatasets = ["{dataset}"]\n{hooks}')
    path.chmod(0o644)
    return path


def refused(policy_file: Path, key: str, *expected: str, env: dict[str, str] | None = None) -> str:
    """policy check, run and snapshot: the same one line naming the policy, the hook's key and the fault; exit 2."""
    lines = set()
    for command in (["policy", "check"], ["run"], ["snapshot"]):
        done = snapsync("-p", str(policy_file), *command, env=env)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert done.stdout == "" and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        lines.add(done.stderr)
    (line,) = lines
    assert line.startswith(f"snapsync: error: {policy_file}: {key}: "), line
    for part in expected:
        assert part in line, line
    return line


def test_a_group_writable_script_is_refused(safe: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    hook = script(safe / "hook.sh", canary, mode=0o775)
    line = refused(policy(tmp_path, "/nonexistent", str(hook)), "groups.app.hooks[0].pre[0]",
                   f"{hook} is group-writable (mode 0775)", "can run commands as root",
                   f"chown root:root {hook} && chmod go-w {hook}")
    assert line.count(str(hook)) >= 2
    assert not canary.exists()


def test_a_script_owned_by_another_user_is_refused(safe: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    hook = script(safe / "hook.sh", canary, uid=NOBODY)
    refused(policy(tmp_path, "/nonexistent", str(hook), "--flag"), "groups.app.hooks[0].pre[0]",
            f"{hook} is owned by uid {NOBODY}")
    assert not canary.exists()


def test_a_script_in_a_world_writable_directory_is_refused_before_anyone_swaps_it(safe: Path, tmp_path: Path) -> None:
    """The script itself is root's 0755; the 0777 directory lets nobody rename another file over it."""
    canary, evil_canary = tmp_path / "canary", safe / "evil-ran"
    drop = safe / "drop"
    drop.mkdir()
    drop.chmod(0o777)
    hook = script(drop / "hook.sh", canary)
    policy_file = policy(tmp_path, "/nonexistent", str(hook))
    refused(policy_file, "groups.app.hooks[0].pre[0]", f"directory {drop} is group- and world-writable (mode 0777)")

    swap = ("printf '#!/bin/sh\\ntouch {c}\\n' > {d}/evil && chmod 755 {d}/evil && mv -f {d}/evil {d}/hook.sh"
            .format(c=evil_canary, d=drop))
    attack = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sh", "-c", swap],
                            capture_output=True, text=True)
    assert attack.returncode == 0, attack.stderr
    assert hook.stat().st_uid == NOBODY, "the attack did not replace the script: the test proves nothing"
    refused(policy_file, "groups.app.hooks[0].pre[0]", f"directory {drop} is group- and world-writable")
    assert not evil_canary.exists() and not canary.exists()


def test_a_script_below_tmp_is_refused_though_tmp_is_sticky(tmp_path: Path) -> None:
    hook = script(tmp_path / "hook.sh", tmp_path / "canary")
    policy_file = policy(tmp_path, "/nonexistent", str(hook))
    refused(policy_file, "groups.app.hooks[0].pre[0]", "directory /tmp is group- and world-writable (mode 1777)")
    elsewhere = snapsync("-p", str(policy_file), "policy", "check", "--syntax-only")  # a policy for another machine
    assert elsewhere.returncode == 0, elsewhere.stderr


def test_symlinks_are_followed_and_each_directory_on_the_way_counts(safe: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    unsafe = safe / "unsafe"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    real = script(unsafe / "real.sh", canary)
    (safe / "link-to-unsafe").symlink_to(real)
    refused(policy(tmp_path, "/nonexistent", str(safe / "link-to-unsafe")), "groups.app.hooks[0].pre[0]",
            f"directory {unsafe} is group- and world-writable")

    good = script(safe / "bin" / "good.sh", canary)
    (unsafe / "link-to-good").symlink_to(good)  # whoever writes `unsafe` can point the link elsewhere
    refused(policy(tmp_path, "/nonexistent", str(unsafe / "link-to-good")), "groups.app.hooks[0].pre[0]",
            f"directory {unsafe} is group- and world-writable")

    (safe / "hop").symlink_to(unsafe / "link-to-good")  # a safe link whose middle hop lies in `unsafe`
    refused(policy(tmp_path, "/nonexistent", str(safe / "hop")), "groups.app.hooks[0].pre[0]", str(unsafe))


def test_a_scripts_interpreter_counts_too(safe: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    interpreters = safe / "interp"
    interpreters.mkdir()
    shutil.copy("/bin/sh", interpreters / "sh")
    interpreters.chmod(0o777)
    hook = script(safe / "hook.sh", canary, shebang=f"#!{interpreters}/sh")
    refused(policy(tmp_path, "/nonexistent", str(hook)), "groups.app.hooks[0].pre[0]",
            f"directory {interpreters} is group- and world-writable")

    via_env = script(safe / "env-hook", canary, shebang="#!/usr/bin/env -S my-interp -x")
    (interpreters / "my-interp").symlink_to("/bin/sh")
    refused(policy(tmp_path, "/nonexistent", str(via_env)), "groups.app.hooks[0].pre[0]",
            "my-interp: looked up in PATH", env={"PATH": f"{interpreters}:/usr/bin:/bin"})


def test_a_writable_directory_earlier_on_path_is_refused(safe: Path, tmp_path: Path) -> None:
    """`true` is fine in /usr/bin, but anyone could drop their own `true` into the directory before it."""
    planted = safe / "planted"
    planted.mkdir()
    planted.chmod(0o1777)
    evil_canary = safe / "evil-ran"
    env = {"PATH": f"{planted}:/usr/bin:/bin"}
    refused(policy(tmp_path, "/nonexistent", "true"), "groups.app.hooks[0].pre[0]",
            f"true: looked up in PATH, where directory {planted} is group- and world-writable", "use an absolute path",
            env=env)
    refused(policy(tmp_path, "/nonexistent", freeze_unit="app.service"), "groups.app.hooks[0].unit",
            "systemctl: looked up in PATH", env=env)
    script(planted / "true", evil_canary, uid=NOBODY)
    refused(policy(tmp_path, "/nonexistent", "true"), "groups.app.hooks[0].pre[0]", str(planted), env=env)
    assert not evil_canary.exists()
    refused(policy(tmp_path, "/nonexistent", "true"), "groups.app.hooks[0].pre[0]", "PATH holds an empty entry",
            env={"PATH": ":/usr/bin"})


def test_a_relative_program_path_is_refused(tmp_path: Path) -> None:
    refused(policy(tmp_path, "/nonexistent", "./backup.sh"), "groups.app.hooks[0].pre[0]",
            "a relative path runs whatever the current directory holds")


def test_a_sticky_root_owned_group_writable_store_is_accepted_like_nix_store(safe: Path, tmp_path: Path) -> None:
    """/nix/store is 1775 root:nixbld: the group may add names but never replace root's entries."""
    store = safe / "store"
    store.mkdir()
    os.chown(store, 0, NOBODY)
    store.chmod(0o1775)
    hook = script(store / "abc-hook" / "bin" / "hook", tmp_path / "canary")
    assert trusted_program(str(hook)) == str(hook)
    planted = store / "def-planted"
    planted.mkdir()
    os.chown(planted, NOBODY, NOBODY)
    theirs = script(planted / "hook", tmp_path / "canary")
    with pytest.raises(UntrustedProgram, match=f"directory {store} is group-writable"):
        trusted_program(str(theirs))


def test_a_root_owned_0755_script_is_accepted_and_runs(safe: Path, tmp_path: Path, btrfs_root: Path) -> None:
    canary = tmp_path / "canary"
    hook = script(safe / "bin" / "hook.sh", canary)
    (safe / "bin" / "via-link").symlink_to("hook.sh")
    app = make_subvolume(btrfs_root / "app")
    policy_file = policy(tmp_path, app, str(safe / "bin" / "via-link"), "pre")
    checked = snapsync("-p", str(policy_file), "policy", "check")
    assert checked.returncode == 0, checked.stderr
    taken = snapsync("-p", str(policy_file), "snapshot")
    assert taken.returncode == 0, taken.stderr
    assert canary.read_text() == "ran\n"
    assert hook.stat().st_uid == 0


def test_a_program_made_unsafe_after_loading_is_refused_when_the_hook_runs(safe: Path, tmp_path: Path) -> None:
    """The check is repeated right before exec, and the file checked is the file executed."""
    canary = tmp_path / "canary"
    hook = script(safe / "hook.sh", canary)
    command = CommandHook(type="command", pre=(str(hook),))
    hook.chmod(0o777)
    hooks = Hooks([command], Moment("app", "snapsync_2026-01-01T00:00:00Z", ("/x",)))
    with hooks.around() as proceed:
        assert not proceed
    (report,) = hooks.reports
    assert report.status == "failed" and "refused" in str(report.message) and "world-writable" in str(report.message)
    assert not canary.exists()
