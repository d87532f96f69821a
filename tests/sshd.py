"""A real OpenSSH server on 127.0.0.1 for replication tests: its own host key, config and authorized_keys.

Each test gets its own ``sshd`` process (started in ~50 ms) so forced commands can differ per test;
the key pair is made once per session. Nothing here touches the machine's own ssh configuration.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SNAPSYNC = [sys.executable, "-m", "snapsync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "snapsync-test", "-f", str(path)], check=True)
    return path


@dataclass
class Sshd:
    """A running sshd; ``authorize`` rewrites authorized_keys, which sshd rereads per connection."""

    directory: Path
    port: int
    client_key: Path
    proc: subprocess.Popen[bytes] | None = None
    known_hosts: Path = field(init=False)

    def __post_init__(self) -> None:
        self.known_hosts = self.directory / "known_hosts"

    @property
    def authorized_keys(self) -> Path:
        return self.directory / "authorized_keys"

    def authorize(self, *lines: str) -> None:
        self.authorized_keys.write_text("".join(line.rstrip("\n") + "\n" for line in lines))
        self.authorized_keys.chmod(0o600)

    def public_key(self) -> str:
        return Path(f"{self.client_key}.pub").read_text().strip()

    def forced(self, root: Path | str, role: str = "receive", *extra: str, wrapper: str = "") -> str:
        """An authorized_keys line running snapsync serve as a forced command (as `authorize` prints)."""
        command = " ".join([*SNAPSYNC, "serve", "--root", str(root), "--role", role, *extra])
        if wrapper:
            command = wrapper.replace("{}", command)
        return f'command="{command}",restrict {self.public_key()}'

    def ssh_options(self) -> list[str]:
        return [f"UserKnownHostsFile={self.known_hosts}", "StrictHostKeyChecking=accept-new", "LogLevel=ERROR"]

    def target_table(self, root: Path | str, **extra: str) -> str:
        """A [targets.NAME] body for a policy file pointing at this server."""
        options = ", ".join(f'"{o}"' for o in self.ssh_options())
        command = ", ".join(f'"{w}"' for w in SNAPSYNC)
        body = (
            f'type = "ssh"\nhost = "127.0.0.1"\nport = {self.port}\nuser = "root"\n'
            f'identity_file = "{self.client_key}"\nssh_options = [{options}]\n'
            f'path = "{root}"\ncommand = [{command}]\n'
        )
        return body + "".join(f"{k} = {v}\n" for k, v in extra.items())

    def pull_policy(self, name: str, path: Path | str, datasets: list[Path], into: Path | str, extra: str = "") -> str:
        """A backup host's policy pulling ``datasets`` below ``path`` from this server into ``into``."""
        options = ", ".join(f'"{o}"' for o in self.ssh_options())
        command = ", ".join(f'"{w}"' for w in SNAPSYNC)
        listed = ", ".join(f'"{d}"' for d in datasets)
        return (
            f'version = 1\nhost = "backup"\n[pulls.{name}]\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'identity_file = "{self.client_key}"\nssh_options = [{options}]\ncommand = [{command}]\n'
            f'path = "{path}"\ndatasets = [{listed}]\ninto = "{into}"\n{extra}'
            f"[pulls.{name}.retention]\nkeep_last = 10\n"
        )

    def start(self) -> None:
        host_key = self.directory / "host_ed25519"
        if not host_key.exists():
            keygen(host_key)
        config = self.directory / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\nPidFile {self.directory}/sshd.pid\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nLogLevel ERROR\nMaxStartups 100:30:200\nMaxSessions 50\n"
            f"SetEnv PYTHONPATH={REPO}\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
            stderr=open(self.directory / "sshd.log", "ab"),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sshd exited: {(self.directory / 'sshd.log').read_text()}")
                time.sleep(0.05)
        raise RuntimeError("sshd did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def sshd_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")):
        return "sshd not installed (apt install openssh-server)"
    return None
