"""The shipped units stopped by systemd mid-run, in the guest (systemd is PID 1 there): ``systemctl
stop`` while a group's freeze hook holds a real unit frozen and its ``pre`` hook hangs. The unit must
stop well within ``TimeoutStopSec`` with its ``post`` run, the application thawed, no process of the
unit left and the reason in the journal; the same when the timer started the run; and the next
start converges."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_zfs import POOL, fill, space, zfs  # noqa: F401  (space: the fixture)
from test_zfs_operate import sh, snapshots, systemd_host  # noqa: F401  (systemd_host: the fixture)

pytestmark = pytest.mark.skipif(not POOL, reason="needs SNAPSYNC_ZFS_POOL (runs inside the vm-tests guest)")

SERVICE = "snapsync.service"
TIMER_DROPIN = Path("/etc/systemd/system/snapsync.timer.d/soon.conf")
WAIT = 180.0  # TCG: Python starts about 20 times slower than on a real host


@dataclass
class Scene:
    """The group's dataset, the application unit its freeze hook freezes, and where the hooks leave marks."""

    app: str
    unit: str
    cgroup: Path
    marks: Path

    def frozen(self) -> bool:
        events = dict(line.split(" ", 1) for line in (self.cgroup / "cgroup.events").read_text().splitlines())
        return events["frozen"].strip() == "1"

    def posts(self) -> list[str]:
        path = self.marks / "post.ran"
        return path.read_text().split() if path.exists() else []


def show(unit: str, prop: str) -> str:
    return sh("systemctl", "show", unit, "-p", prop, "--value").stdout.strip()


def seconds(span: str) -> float:
    """A duration as systemctl shows it ("5min"), in seconds."""
    out = sh("systemd-analyze", "timespan", span).stdout
    return int(out.partition("\u03bcs:")[2].split()[0]) / 1e6


def cursor() -> str:
    """Now, as journalctl's ``--since`` takes it (the whole second: one cycle ends seconds before the next starts)."""
    return f"@{int(time.time())}"


def journal(since: str) -> str:
    return sh("journalctl", "-u", SERVICE, f"--since={since}", "-o", "cat", "--no-pager").stdout


def wait_for(what: str, done: Callable[[], object], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s; {SERVICE}: {show(SERVICE, 'ActiveState')}\n"
                                 f"{sh('journalctl', '-u', SERVICE, '-n', '30', '-o', 'cat', '--no-pager').stdout}")
        time.sleep(0.2)


def unit_pids() -> set[int]:
    group = show(SERVICE, "ControlGroup")
    if not group:
        return set()
    pids: set[int] = set()
    for procs in Path("/sys/fs/cgroup" + group).rglob("cgroup.procs"):
        pids |= {int(p) for p in procs.read_text().split()}
    return pids


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def scene(systemd_host: str) -> Iterator[Scene]:  # noqa: F811  (the fixture)
    """A ZFS group with a freeze hook (a real transient unit) and a command hook that hangs in ``pre``
    while ``marks/hang`` exists; the policy is where the units look."""
    app = f"{systemd_host}/app"
    zfs("create", app)
    fill(app, 1)
    tag = uuid.uuid4().hex[:6]
    unit = f"snapsync-test-app-{tag}.service"
    marks = Path(f"/root/units-{tag}")
    marks.mkdir()
    sh("systemd-run", f"--unit={unit}", "--quiet", "/bin/sleep", "infinity")
    pre = f"echo $$ > {marks}/pre.pid; if [ -e {marks}/hang ]; then /bin/sleep 600 & echo $! > {marks}/child.pid; wait; fi"
    policy = Path("/etc/snapsync/policy.toml")
    policy.write_text(f"""version = 1
[groups.app]
backend = "zfs"
datasets = ["{app}"]
interval = "1m"
[[groups.app.hooks]]
type = "freeze"
unit = "{unit}"
max_pause = "10m"
[[groups.app.hooks]]
type = "command"
pre = ["/bin/sh", "-c", "{pre}"]
post = ["/bin/sh", "-c", "echo $SNAPSYNC_PHASE >> {marks}/post.ran"]
timeout = "4m"
""")
    policy.chmod(0o600)
    made = Scene(app, unit, Path("/sys/fs/cgroup" + show(unit, "ControlGroup")), marks)
    assert (made.cgroup / "cgroup.freeze").is_file() and not made.frozen()
    try:
        yield made
    finally:
        sh("systemctl", "stop", SERVICE, "snapsync.timer", check=False)
        if (made.cgroup / "cgroup.freeze").is_file():
            (made.cgroup / "cgroup.freeze").write_text("0")
        sh("systemctl", "stop", unit, check=False)
        if TIMER_DROPIN.exists():
            shutil.rmtree(TIMER_DROPIN.parent)
            sh("systemctl", "daemon-reload")
        shutil.rmtree(marks, ignore_errors=True)


def stopped_mid_hook(scene: Scene, start: list[str]) -> None:
    """Start the run (``start``), wait until the application is frozen and ``pre`` hangs, stop the
    unit; check what the stop left."""
    (scene.marks / "hang").touch()
    for mark in ("pre.pid", "child.pid"):
        (scene.marks / mark).unlink(missing_ok=True)
    posts = len(scene.posts())
    since = cursor()
    sh(*start)
    wait_for("the pre hook hanging", lambda: (scene.marks / "child.pid").is_file() and (scene.marks / "child.pid").read_text().strip())
    assert scene.frozen(), "the freeze hook comes first: the application is frozen while pre runs"
    hook = [int((scene.marks / m).read_text()) for m in ("pre.pid", "child.pid")]
    running = unit_pids()
    assert set(hook) <= running and int(show(SERVICE, "MainPID")) in running
    assert any(" thaw " in command_line(p) for p in running), "the freeze watchdog runs in the unit's cgroup"

    began = time.monotonic()
    sh("systemctl", "stop", SERVICE, timeout=600)
    took = time.monotonic() - began
    limit = seconds(show(SERVICE, "TimeoutStopUSec"))
    text = journal(since)
    assert took < limit, f"stop took {took:.0f}s (TimeoutStopSec {limit:g}s)\n{text}"
    assert "timed out" not in text and "SIGKILL" not in text, text  # snapsync finished; systemd did not have to kill
    assert show(SERVICE, "ActiveState") in ("inactive", "failed") and show(SERVICE, "MainPID") == "0"
    assert show(SERVICE, "ExecMainStatus") == "143", text
    assert "pre command interrupted; running its post" in text and "interrupted by SIGTERM" in text, text
    assert "Stopped snapsync.service" in text, text

    assert scene.posts()[posts:] == ["post"], f"post ran {scene.posts()} (before: {posts})\n{text}"
    assert (scene.cgroup / "cgroup.freeze").read_text().strip() == "0" and not scene.frozen(), text
    assert show(scene.unit, "ActiveState") == "active"  # thawed, not killed
    assert unit_pids() == set() and not [p for p in running | set(hook) if alive(p)], text
    assert snapshots(scene.app) == []  # stopped before the snapshot: none half-made


def test_systemctl_stop_mid_hook_runs_post_thaws_and_leaves_nothing_then_runs_converge(scene: Scene) -> None:
    stopped_mid_hook(scene, ["systemctl", "start", "--no-block", SERVICE])

    # The same run started by the timer (as on a real host), stopped the same way.
    TIMER_DROPIN.parent.mkdir(exist_ok=True)
    TIMER_DROPIN.write_text("[Timer]\nOnActiveSec=1s\nRandomizedDelaySec=0\nAccuracySec=1s\n")
    sh("systemctl", "daemon-reload")
    stopped_mid_hook(scene, ["systemctl", "start", "snapsync.timer"])
    assert show("snapsync.timer", "LastTriggerUSec") not in ("", "n/a")

    # The next ordinary start converges: the snapshot is taken, pre and post ran, nothing stays frozen.
    (scene.marks / "hang").unlink()
    since = cursor()
    sh("systemctl", "start", SERVICE, timeout=600)
    text = journal(since)
    assert show(SERVICE, "Result") == "success" and show(SERVICE, "ExecMainStatus") == "0", text
    (taken,) = snapshots(scene.app)
    assert f"took snapshot {taken}" in text, text
    assert scene.posts()[-1:] == ["post"] and len(scene.posts()) == 3
    assert not scene.frozen() and show(scene.unit, "ActiveState") == "active"
    assert unit_pids() == set()
