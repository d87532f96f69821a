"""Stopping snapsync as a user or systemd does: SIGINT, SIGTERM, SIGHUP to the real command on real
btrfs, while a hook hangs. Whatever stops it, a started pre's post runs, no hook process survives, a
frozen application is thawed at once (by snapsync, or by its watchdog when that is signalled too),
the exit status is 128 + the signal's number, the lock is free and the next ordinary run converges."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from snapsync.backends.btrfs import BtrfsBackend
from snapsync.host.lock import lock_path, policy_lock
from tests.conftest import interruptible, make_subvolume

UNIFIED = Path("/sys/fs/cgroup/unified")
WAIT = 90.0  # the machine may be busy: generous, and only ever waited out on failure


@pytest.fixture(autouse=True)
def _private_lock_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SNAPSYNC_LOCK_DIR", str(tmp_path / "locks"))


def until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (pid 1 here may never reap orphans)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def pgrep(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found if int(p) != os.getpid()]


def snapsync(policy: Path, *args: str, cgroup: Path | None = None) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "snapsync", "-p", str(policy), *args]
    if cgroup is not None:  # the way systemd starts a unit: everything it forks stays in the unit's cgroup
        argv = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *argv]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=interruptible)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=WAIT)
    return proc.returncode, out, err


class App:
    """A group with one dataset and hooks whose pre hangs while ``hang`` exists, leaving pids behind."""

    def __init__(self, tmp_path: Path, btrfs_root: Path, freeze: Path | None = None, max_pause: str = "120s",
                 before: tuple[str, ...] = (), post: bool = True) -> None:
        self.dir = tmp_path / "hook"
        self.dir.mkdir()
        self.dataset = make_subvolume(btrfs_root / "persist" / "app", "data")
        self.sleep = f"{random.randint(1000, 9999)}.{random.randint(100000, 999999)}"  # an argv no other process has
        d = self.dir
        pre = (f"echo $$ > {d}/pre.pid; if [ -e {d}/hang ]; then sleep {self.sleep} & echo $! > {d}/child.pid; wait; fi; "
               f"while [ -e {d}/hold ]; do sleep 0.05; done")
        lines = ["version = 1", "[groups.app]", 'backend = "btrfs"', f'datasets = ["{self.dataset}"]', 'interval = "1m"']
        if freeze is not None:
            lines += ["[[groups.app.hooks]]", 'type = "freeze"', f'cgroup = "{freeze}"', f'max_pause = "{max_pause}"']
        lines += [*before, "[[groups.app.hooks]]", 'type = "command"', f"pre = {json.dumps(['sh', '-c', pre])}", 'timeout = "60s"']
        if post:
            lines.append(f"post = {json.dumps(['sh', '-c', f'echo $SNAPSYNC_PHASE >> {d}/post.log'])}")
        self.policy = tmp_path / "policy.toml"
        self.policy.write_text("\n".join(lines) + "\n")
        self.policy.chmod(0o600)

    def pid(self, name: str) -> int:
        """The pid the hook wrote, 0 (no process) while it is still being written."""
        path = self.dir / f"{name}.pid"
        return int(path.read_text().strip() or 0) if path.exists() else 0

    def posts(self) -> list[str]:
        log = self.dir / "post.log"
        return log.read_text().split() if log.exists() else []

    def snapshots(self) -> list[str]:
        return [s.name for s in BtrfsBackend().list_snapshots(str(self.dataset))]

    def hook_processes_gone(self) -> None:
        for name in ("pre", "child"):
            assert self.pid(name), f"the hook never wrote {name}.pid"
            until(lambda: not alive(self.pid(name)), f"the hook's {name} process is gone", 10)
        assert pgrep(f"sleep {self.sleep}") == [], "the hanging hook's child survived"

    def converges(self) -> None:
        """The lock is free (no wait allowed) and ordinary runs work again: a snapshot, its post, exit 0."""
        (self.dir / "hang").unlink(missing_ok=True)
        posts = len(self.posts())
        code, out, err = finish(snapsync(self.policy, "snapshot", "--lock-timeout", "0", "--json"))
        assert code == 0, err
        (group,) = json.loads(out)["groups"]
        assert group["snapshot"] in self.snapshots() and all(h["status"] == "ok" for h in group["hooks"]), group
        assert len(self.posts()) == posts + 1
        code, _, err = finish(snapsync(self.policy, "run", "--lock-timeout", "0"))
        assert code == 0, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_during_a_hanging_pre_runs_post_and_kills_the_hook(btrfs_root: Path, tmp_path: Path, signum: signal.Signals) -> None:
    app = App(tmp_path, btrfs_root)
    (app.dir / "hang").touch()
    run = snapsync(app.policy, "run")
    try:
        until(lambda: alive(app.pid("child")), "the pre hook hangs")
        run.send_signal(signum)
        code, _, err = finish(run)
    finally:
        run.kill()
    assert code == 128 + signum, err
    assert f"interrupted by {signum.name}" in err
    assert app.posts() == ["post"], "a started pre's post must run"
    app.hook_processes_gone()
    assert app.snapshots() == []
    app.converges()


def test_post_after_a_signal_is_bounded_by_its_timeout_and_not_cut_by_a_second_signal(btrfs_root: Path, tmp_path: Path) -> None:
    """systemd sends SIGTERM then SIGHUP (SendSIGHUP=yes); a person presses Ctrl-C twice. The post
    that restarts a service gets its whole timeout, and no more: one that hangs is killed there."""
    hang = f"{random.randint(1000, 9999)}.{random.randint(100000, 999999)}"
    d = tmp_path / "hook"
    post = f"echo started >> {d}/post.log; sleep 1; echo done >> {d}/post.log; sleep {hang}"
    restart = ("[[groups.app.hooks]]", 'type = "command"', f"post = {json.dumps(['sh', '-c', post])}", 'timeout = "5s"')
    app = App(tmp_path, btrfs_root, before=restart, post=False)
    (d / "hang").touch()
    run = snapsync(app.policy, "run")
    try:
        until(lambda: alive(app.pid("child")), "the pre hook hangs")
        run.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        until(lambda: app.posts() == ["started"], "the post runs")
        run.send_signal(signal.SIGHUP)
        code, _, err = finish(run)
        took = time.monotonic() - stopped
    finally:
        run.kill()
    assert code == 128 + signal.SIGTERM, err
    assert app.posts() == ["started", "done"], "the second signal cut the post short"
    assert "post command" in err and "killed after 5s" in err, err
    assert 5 <= took < 5 + WAIT / 3, took
    assert pgrep(f"sleep {hang}") == [], "the hanging post's child survived"
    app.hook_processes_gone()


@pytest.mark.parametrize("command", [
    ["run"], ["snapshot"], ["replicate"], ["rollback", "app", "snapsync_2026-01-01T00:00:00Z"],
    ["restore", "app", "--from", "nowhere", "--to", "/nonexistent"],
], ids=lambda c: c[0])
def test_sigterm_stops_every_changing_command_like_sigint(btrfs_root: Path, tmp_path: Path, command: list[str]) -> None:
    """Each command waiting for the policy's lock (held here) stops cleanly on SIGTERM, not by dying of it."""
    app = App(tmp_path, btrfs_root)
    with policy_lock(str(app.policy), 0):
        proc = snapsync(app.policy, *command, *(["--lock-timeout", "600"] if command[0] not in ("restore",) else []))
        try:
            lock = str(lock_path(str(app.policy)))

            def waiting() -> bool:
                try:
                    return any(os.readlink(fd) == lock for fd in Path(f"/proc/{proc.pid}/fd").iterdir())
                except FileNotFoundError:  # an fd closed while looking
                    return False

            until(waiting, f"snapsync {command[0]} waits for the lock")
            proc.send_signal(signal.SIGTERM)
            code, _, err = finish(proc)
        finally:
            proc.kill()
    assert code == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err
    assert app.posts() == []  # no hook ran: nothing was started, nothing was left


# --- freeze ---------------------------------------------------------------------------------------


@pytest.fixture
def cgroups() -> Iterator[Callable[[str], Path]]:
    """Fresh cgroup v2 directories; each thawed, emptied and removed afterwards."""
    if not (UNIFIED / "cgroup.procs").exists():
        pytest.skip("no cgroup v2 hierarchy at /sys/fs/cgroup/unified, so no freezer to test")
    made: list[Path] = []

    def make(role: str) -> Path:
        path = UNIFIED / f"snapsync-test-{role}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        made.append(path)
        return path

    yield make
    for path in made:
        (path / "cgroup.freeze").write_text("0")
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        until(lambda: not (path / "cgroup.procs").read_text().strip(), f"{path} is empty", 10)
        path.rmdir()


def frozen(path: Path) -> bool:
    return "frozen 1" in (path / "cgroup.events").read_text()


def watchdogs(path: Path) -> list[int]:
    return pgrep(f"snapsync thaw {path} ")


@pytest.fixture
def application(cgroups: Callable[[str], Path]) -> Iterator[Path]:
    """A running process in its own cgroup: what the freeze hook stops."""
    path = cgroups("app")
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    (path / "cgroup.procs").write_text(str(proc.pid))
    yield path
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("who", ["snapsync", "unit"])
def test_sigterm_while_frozen_thaws_at_once(btrfs_root: Path, tmp_path: Path, application: Path,
                                             cgroups: Callable[[str], Path], who: str) -> None:
    """``snapsync``: only snapsync gets SIGTERM. ``unit``: every process of its unit does, watchdog
    and hook included, as ``systemctl stop`` does with the default KillMode. max_pause is far away:
    only a thaw on the way out can explain an application running again."""
    app = App(tmp_path, btrfs_root, freeze=application, max_pause="600s")
    (app.dir / "hang").touch()
    unit = cgroups("unit")
    run = snapsync(app.policy, "run", cgroup=unit)
    try:
        until(lambda: frozen(application) and alive(app.pid("child")), "frozen, with the pre hook hanging")
        assert watchdogs(application), "no watchdog while frozen"
        if who == "snapsync":
            run.send_signal(signal.SIGTERM)
        else:
            for pid in (unit / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGTERM)
        code, _, err = finish(run)
    finally:
        run.kill()
    assert code == 128 + signal.SIGTERM, err
    assert not frozen(application)
    assert app.posts() == ["post"]
    app.hook_processes_gone()
    until(lambda: not (unit / "cgroup.procs").read_text().strip(), "nothing of the unit is left", 10)
    assert watchdogs(application) == []
    app.converges()
    assert not frozen(application)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signalled_watchdog_thaws_at_once_and_the_run_says_so(btrfs_root: Path, tmp_path: Path, application: Path,
                                                                signum: signal.Signals) -> None:
    app = App(tmp_path, btrfs_root, freeze=application, max_pause="600s")
    (app.dir / "hold").touch()
    run = snapsync(app.policy, "snapshot", "--json")
    try:
        until(lambda: frozen(application) and alive(app.pid("pre")), "frozen, with the pre hook holding")
        (watchdog,) = watchdogs(application)
        os.kill(watchdog, signum)
        until(lambda: not frozen(application), "the watchdog thawed", 20)
        until(lambda: not alive(watchdog), "the watchdog exited", 20)
        (app.dir / "hold").unlink()
        code, out, err = finish(run)
    finally:
        run.kill()
    assert code == 1, err
    (group,) = json.loads(out)["groups"]
    freeze, command = group["hooks"]
    assert freeze["status"] == "cleanup-failed" and "thawed before the snapshot was done" in freeze["message"], freeze
    assert command["status"] == "ok" and app.posts() == ["post"]
    assert not frozen(application)
    app.converges()
