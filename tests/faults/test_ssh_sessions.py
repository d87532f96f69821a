"""A replicate over ssh stopped by SIGKILL, SIGTERM or SIGINT leaves nothing of its connection behind,
and a connection lost mid-stream is retried over a fresh master.

Everything is counted, not assumed: the run's ssh processes (by this test's sshd port), the far end's
sessions and servers, the btrfs processes on both sides (by this test's paths), control sockets and
``snapsync-ssh-*`` directories (in this test's own TMPDIR). The policy asks for ``ControlPersist=yes``
and ``ControlMaster=auto``, which once kept a master alive forever.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapsync.replication.transport import sweep_control_dirs
from tests.conftest import make_subvolume
from tests.replication.helpers import copies, copies_dir, run_json, snapsync, tree_digest, write_policy
from tests.sshd import Sshd

pytestmark = pytest.mark.btrfs


@dataclass
class Site:
    data: Path
    target: Path
    policy: Path
    sshd: Sshd
    tmp: Path
    """The runs' TMPDIR: short (a socket path has 107 bytes) and this test's alone."""

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "TMPDIR": str(self.tmp), **extra}

    def start(self, *args: str, **env: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "snapsync", "-p", str(self.policy), *args, "replicate", "--no-prune", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env(**env),
        )

    def snapshot(self) -> str:
        return str(run_json("-p", str(self.policy), "snapshot", env={"TMPDIR": str(self.tmp)})["groups"][0]["snapshot"])

    def receiving(self) -> bool:
        markers = copies_dir(self.target, "app", self.data) / ".receiving"
        return markers.is_dir() and any(markers.iterdir())

    def leftovers(self) -> list[str]:
        """Every process of these runs still alive: ssh to this sshd, the far end's sessions, btrfs on
        either side (children of snapsync or of serve)."""
        assert self.sshd.proc is not None
        below_sshd = _descendants(self.sshd.proc.pid) - {self.sshd.proc.pid}
        found = []
        for pid, argv in _processes():
            line = " ".join(argv)
            ours = (argv[0] == "ssh" and f"-p {self.sshd.port} " in line) or pid in below_sshd
            ours = ours or str(self.target) in line or str(self.data.parent) in line or str(self.tmp) in line
            if ours and pid != os.getpid():
                found.append(f"{pid} {line}")
        return found

    def control_dirs(self) -> list[Path]:
        return sorted(self.tmp.glob("snapsync-ssh-*"))

    def sockets(self) -> list[Path]:
        return [p for p in self.tmp.rglob("*") if stat.S_ISSOCK(p.lstat().st_mode)]

    def converged(self, name: str) -> None:
        assert copies(self.target, "app", self.data) == [name]
        copy = copies_dir(self.target, "app", self.data) / name
        assert tree_digest(copy) == tree_digest(self.data.parent / ".snapsync" / "app" / name)


def _processes() -> Iterator[tuple[int, list[str]]]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if raw:
                yield int(entry), raw.rstrip(b"\0").decode(errors="replace").split("\0")


def _descendants(root: int) -> set[int]:
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found = {root}
    while more := {pid for pid, ppid in parent.items() if ppid in found and pid not in found}:
        found |= more
    return found


def _masters(site: Site) -> list[int]:
    return [
        pid for pid, argv in _processes()
        if argv[0] == "ssh" and "ControlMaster=yes" in argv and any(str(site.tmp) in a for a in argv)
    ]


def _until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.05)


@pytest.fixture
def site(btrfs_root: Path, target_root: Path, sshd: Sshd, tmp_path: Path) -> Iterator[Site]:
    data = make_subvolume(btrfs_root / "persist" / "app")
    (data / "seed.bin").write_bytes(os.urandom(4 << 20))
    sshd.authorize(sshd.forced(target_root))
    table = sshd.target_table(target_root, rate_limit='"1M"').replace(
        "ssh_options = [", 'ssh_options = ["ControlPersist=yes", "ControlMaster auto", '
    )
    policy = write_policy(tmp_path / "p.toml", [data], {"nas": table})
    tmp = Path(tempfile.mkdtemp(prefix="ssf-", dir="/tmp"))
    try:
        yield Site(data, target_root, policy, sshd, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _in_stream(site: Site, proc: subprocess.Popen[str]) -> None:
    """Wait until the stream flows over the run's master (a rate-limited full send of 4 MiB)."""
    _until(lambda: proc.poll() is not None or (site.receiving() and _masters(site)), 120, "a stream under way")
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_stopped_replicate_leaves_no_ssh_process_socket_or_directory(site: Site, signum: signal.Signals) -> None:
    name = site.snapshot()
    proc = site.start()
    _in_stream(site, proc)
    [owned] = site.control_dirs()
    assert site.sockets()

    proc.send_signal(signum)
    proc.communicate(timeout=120)
    _until(lambda: not site.leftovers(), 30, f"the run's processes gone: {site.leftovers()}")
    if signum == signal.SIGKILL:
        assert site.control_dirs() == [owned]  # nobody was left to remove it: the next run does
    else:
        assert site.control_dirs() == [] and site.sockets() == []

    site.policy.write_text(site.policy.read_text().replace('rate_limit = "1M"\n', ""))
    again = snapsync("-p", str(site.policy), "replicate", "--no-prune", "--json", env={"TMPDIR": str(site.tmp)})
    assert again.returncode == 0, again.stdout + again.stderr
    site.converged(name)
    assert site.control_dirs() == [] and site.sockets() == []
    _until(lambda: not site.leftovers(), 30, f"the next run's processes gone: {site.leftovers()}")


def _cut_master(site: Site) -> None:
    for pid in _masters(site):
        os.kill(pid, signal.SIGKILL)


def _cut_at_the_server(site: Site) -> None:
    """Kill sshd's side of every connection (not the commands it runs): the link is gone."""
    assert site.sshd.proc is not None
    for pid in _descendants(site.sshd.proc.pid) - {site.sshd.proc.pid}:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sshd:"):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.mark.parametrize("cut", [_cut_master, _cut_at_the_server], ids=["master-killed", "server-side-killed"])
def test_a_connection_lost_mid_stream_is_retried_over_a_fresh_master(site: Site, cut: Callable[[Site], None]) -> None:
    name = site.snapshot()
    proc = site.start("-v", SNAPSYNC_RETRY_ATTEMPTS="4", SNAPSYNC_RETRY_WAIT="1")
    _in_stream(site, proc)
    [first] = _masters(site)
    cut(site)
    _until(lambda: proc.poll() is not None or set(_masters(site)) - {first}, 120, "a fresh master")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert "ssh connection lost (exit 255)" in err and "retrying (attempt 2 of 4)" in err, err
    assert "Traceback" not in err
    site.converged(name)
    assert site.control_dirs() == [] and site.sockets() == []
    _until(lambda: not site.leftovers(), 30, f"the run's processes gone: {site.leftovers()}")


def test_the_sweep_removes_only_directories_of_dead_runs(tmp_path: Path) -> None:
    """A live run's directory stays (this process, and one with a reused pid's start time wrong is
    gone); so does another user's, one from another pid namespace and anything not named like ours."""
    namespace = os.stat("/proc/self/ns/pid").st_ino
    started = Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19]
    child = subprocess.Popen(["true"])
    child.wait()
    live = tmp_path / f"snapsync-ssh-{namespace}-{os.getpid()}-{started}-live"
    dead = tmp_path / f"snapsync-ssh-{namespace}-{child.pid}-1-dead"
    reused = tmp_path / f"snapsync-ssh-{namespace}-{os.getpid()}-{int(started) + 1}-reused"
    foreign_ns = tmp_path / f"snapsync-ssh-{namespace + 1}-{child.pid}-1-elsewhere"
    other_user = tmp_path / f"snapsync-ssh-{namespace}-{child.pid}-1-nobody"
    unrelated = tmp_path / "snapsync-ssh-abcdefgh"
    for d in (live, dead, reused, foreign_ns, other_user, unrelated):
        d.mkdir()
        (d / "master").write_text("")
    os.chown(other_user, 65534, 65534)
    link = tmp_path / f"snapsync-ssh-{namespace}-{child.pid}-1-link"
    link.symlink_to(live)

    removed = sweep_control_dirs(str(tmp_path))
    assert sorted(removed) == sorted([str(dead), str(reused)])
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in (live, foreign_ns, other_user, unrelated, link)}
    assert (live / "master").exists()
