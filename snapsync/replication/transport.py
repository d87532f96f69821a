"""How to start the far end of a session: ``snapsync serve`` over ssh, or as a local subprocess.

A transport only builds an argv and classifies how a dead session died (worth retrying or not); it
moves bytes it never looks at and knows nothing about snapshots or retention. Every word of the
remote command is quoted with :func:`shlex.quote`, because ssh hands the command line to the remote
user's shell when no forced command is configured.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from snapsync.policy.schema import LocalTarget, SshTarget

_TRANSIENT = re.compile(
    r"connection (refused|timed out|reset|closed)|timed out|no route to host|network is unreachable|"
    r"broken pipe|connection to .* closed|kex_exchange_identification|temporary failure|"
    r"host is down|lost connection|server_alive|Timeout, server",
    re.I,
)
# Connection sharing is snapsync's alone: a user's ControlPersist would detach a master that outlives the run.
_SHARING = frozenset({"controlmaster", "controlpath", "controlpersist"})
# snapsync-ssh-<pid namespace>-<pid>-<start time>-<random>: which run made the directory.
_CONTROL_DIR = re.compile(r"snapsync-ssh-(\d+)-(\d+)-(\d+)-[^/]+")
# A unix socket path is at most 107 bytes, and ssh binds a name 17 bytes longer before renaming it.
_SOCKET_MAX = 90
_MASTER_WAIT = 10.0
_PR_SET_PDEATHSIG = 1


def _option_key(option: str) -> str:
    return re.split(r"[=\s]", option.strip(), maxsplit=1)[0].lower()


def _started(pid: int | str) -> str | None:
    """A process's start time (clock ticks since boot), which tells it from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> str | None:
    """This process, as the sweep of a later run recognises it: pid namespace, pid, start time."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    started = _started(os.getpid())
    return None if started is None else f"{namespace}-{os.getpid()}-{started}"


def sweep_control_dirs(top: str) -> list[str]:
    """Remove the socket directories of runs that died without cleaning up (SIGKILL, a power cut).

    Only directories of this user, from this pid namespace, whose owning process is gone (no process
    with that pid, or one started at another time) are removed: a live run's directory never is.
    Their masters died with their owners (see :meth:`SshTransport.multiplexed`).
    """
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
        entries = list(os.scandir(top))
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = _CONTROL_DIR.fullmatch(entry.name)
        if match is None or match[1] != namespace or _started(match[2]) == match[3]:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _dies_with(owner: int) -> Callable[[], None]:
    """Runs in the forked child before exec: SIGTERM when the thread that started it is gone, by
    whatever means (SIGKILL included), even if this process ignores SIGTERM (ssh keeps an ignored
    signal ignored). The parent may have died already before the prctl took."""
    libc = ctypes.CDLL(None, use_errno=True)  # looked up in the parent; the child only calls it
    prctl, reset = libc.prctl, libc.signal

    def preexec() -> None:
        reset(int(signal.SIGTERM), 0)  # SIG_DFL
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != owner:
            os._exit(1)

    return preexec


@dataclass
class SshTransport:
    name: str
    host: str
    user: str
    port: int
    path: str
    command: tuple[str, ...]
    identity_file: str | None = None
    ssh_options: tuple[str, ...] = ()
    control_path: str | None = field(default=None, repr=False)
    _directory: str | None = field(default=None, repr=False)
    _master: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _master_since: float = field(default=0.0, repr=False)

    @classmethod
    def from_target(cls, name: str, target: SshTarget) -> SshTransport:
        return cls(
            name, target.host, target.user, target.port, target.path, target.command,
            target.identity_file, target.ssh_options,
        )

    def _ssh(self) -> list[str]:
        argv = ["ssh"]
        for option in self.ssh_options:  # first, so the user's choice wins over our defaults
            if _option_key(option) not in _SHARING:
                argv += ["-o", option]
        argv += [
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=15",
            "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=4",
            "-T", "-x", "-e", "none",
            "-p", str(self.port),
            "-l", self.user,
        ]
        if self.identity_file:
            argv += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        return argv

    def argv(self, role: str) -> list[str]:
        """A session's command: over this run's master when it is up, else a connection of its own
        (never a master that ssh's own configuration might make persistent)."""
        control = self.control_path if self._master_up() else None
        argv = [*self._ssh(), "-o", f"ControlPath={control or 'none'}", "-o", "ControlMaster=no"]
        remote = [*self.command, "serve", "--root", self.path, "--role", role]
        return [*argv, "--", self.host, " ".join(shlex.quote(w) for w in remote)]

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @contextmanager
    def multiplexed(self) -> Iterator[None]:
        """One ssh connection for every session of a run, ended with the run however it ends.

        A session costs ~0.3 s with its own key exchange and ~0.07 s over the master. The master is
        this process's child, in its process group, never detached (``ControlPersist=no``), and gets
        SIGTERM from the kernel when the thread that started it exits, so a SIGKILLed run takes its
        connection and the far end's sessions with it. The socket directory is named after this
        process; the next run removes it if this one could not (:func:`sweep_control_dirs`).
        """
        if self._directory is not None:
            yield  # already shared by an outer block
            return
        top = tempfile.gettempdir()
        sweep_control_dirs(top)
        owner = _owner()
        directory = tempfile.mkdtemp(prefix=f"snapsync-ssh-{owner}-" if owner else "snapsync-ssh-", dir=top)
        control = os.path.join(directory, "master")
        self._directory = directory
        self.control_path = control if len(os.fsencode(control)) <= _SOCKET_MAX else None
        try:
            yield
        finally:
            self.control_path = None
            self._directory = None
            self._stop_master()
            shutil.rmtree(directory, ignore_errors=True)

    def _master_up(self) -> bool:
        """Whether sessions can go over the master now; starts one if there is none or it died.

        The first session (and the first after a lost connection) connects on its own while the
        master comes up beside it, so a host that cannot be reached fails as fast as before; later
        sessions wait for a master still authenticating, up to ``_MASTER_WAIT`` from its start.
        """
        control = self.control_path
        if control is None:
            return False
        master = self._master
        if master is None or master.poll() is not None:
            self._start_master(control)
            return False
        while not os.path.exists(control):
            if master.poll() is not None or time.monotonic() >= self._master_since + _MASTER_WAIT:
                return False
            time.sleep(0.01)
        return True

    def _start_master(self, control: str) -> None:
        try:
            os.unlink(control)  # a killed master's socket: a new master would refuse to bind over it
        except FileNotFoundError:
            pass
        argv = [
            *self._ssh(), "-o", f"ControlPath={control}", "-o", "ControlMaster=yes", "-o", "ControlPersist=no",
            "-N", "--", self.host,
        ]
        self._master_since = time.monotonic()
        try:
            self._master = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                close_fds=True, preexec_fn=_dies_with(os.getpid()),
            )
        except OSError:
            self._master = None  # sessions then connect on their own and say why ssh cannot start

    def _stop_master(self) -> None:
        master, self._master = self._master, None
        if master is None or master.poll() is not None:
            return
        master.terminate()  # ssh closes the connection and removes its socket
        try:
            master.wait(10)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()

    def transient(self, returncode: int, stderr: str) -> bool:
        """ssh exits 255 for its own errors: network-shaped ones are worth another try, and so is a
        255 without a word, which is how a session over a master whose connection dropped ends.
        Authentication and configuration errors say what they are and are not retried."""
        return returncode == 255 and (not stderr.strip() or bool(_TRANSIENT.search(stderr)))


@dataclass(frozen=True)
class LocalTransport:
    """A target on this host: the same server, started directly, so both paths run the same code."""

    name: str
    path: str

    @classmethod
    def from_target(cls, name: str, target: LocalTarget) -> LocalTransport:
        return cls(name, target.path)

    def argv(self, role: str) -> list[str]:
        return [sys.executable, "-m", "snapsync", "serve", "--root", self.path, "--role", role]

    def describe(self) -> str:
        return self.path

    @contextmanager
    def multiplexed(self) -> Iterator[None]:
        yield

    def transient(self, returncode: int, stderr: str) -> bool:
        return False


Transport = SshTransport | LocalTransport


def transport_for(name: str, target: SshTarget | LocalTarget) -> Transport:
    """How to reach a target (or a pull's source): ssh, or the server started locally."""
    if isinstance(target, LocalTarget):
        return LocalTransport.from_target(name, target)
    return SshTransport.from_target(name, target)
