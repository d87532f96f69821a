"""How to start the far end of a session: ``snapsync serve`` over ssh, or as a local subprocess.

A transport only builds an argv and classifies how a dead session died (worth retrying or not); it
moves bytes it never looks at and knows nothing about snapshots or retention. Every word of the
remote command is quoted with :func:`shlex.quote`, because ssh hands the command line to the remote
user's shell when no forced command is configured.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass

from snapsync.policy_models import LocalTarget, SshTarget

_TRANSIENT = re.compile(
    r"connection (refused|timed out|reset|closed)|timed out|no route to host|network is unreachable|"
    r"broken pipe|connection to .* closed|kex_exchange_identification|temporary failure|"
    r"host is down|lost connection|server_alive|Timeout, server",
    re.I,
)


@dataclass(frozen=True)
class SshTransport:
    name: str
    host: str
    user: str
    port: int
    path: str
    command: tuple[str, ...]
    identity_file: str | None = None
    ssh_options: tuple[str, ...] = ()

    @classmethod
    def from_target(cls, name: str, target: SshTarget) -> SshTransport:
        return cls(
            name, target.host, target.user, target.port, target.path, target.command,
            target.identity_file, target.ssh_options,
        )

    def argv(self, role: str) -> list[str]:
        argv = ["ssh"]
        for option in self.ssh_options:  # first, so the user's choice wins over our defaults
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
        remote = [*self.command, "serve", "--root", self.path, "--role", role]
        return [*argv, "--", self.host, " ".join(shlex.quote(w) for w in remote)]

    def describe(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def transient(self, returncode: int, stderr: str) -> bool:
        """ssh exits 255 for its own errors; only network-shaped ones are worth another try."""
        return returncode == 255 and bool(_TRANSIENT.search(stderr))


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

    def transient(self, returncode: int, stderr: str) -> bool:
        return False


Transport = SshTransport | LocalTransport
