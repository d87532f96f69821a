"""One booted guest: qemu under TCG, driven over a multiplexed ssh connection.

Each guest boots from the shared cached image with ``snapshot=on`` (writes go to a throwaway
overlay), gets its own blank data disks (``/dev/disk/by-id/virtio-zfsN`` inside), and forwards a
host loopback port to its sshd. Guests reach each other only through the host: guest A talks to
guest B at 10.0.2.2:<B's port>.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from image import Image

BOOT_TIMEOUT = float(os.environ.get("SNAPSYNC_VM_BOOT_TIMEOUT", "300"))
HOST_FROM_GUEST = "10.0.2.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Result:
    argv: str
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> Result:
        if self.returncode != 0:
            raise AssertionError(f"guest command failed ({self.returncode}): {self.argv}\n{self.stdout[-4000:]}\n{self.stderr[-4000:]}")
        return self


@dataclass
class Machine:
    name: str
    image: Image
    workdir: Path
    disks: int = 2
    disk_size: str = "512M"
    memory: str = "2048"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    boot_seconds: float = 0.0
    zfs_version: str = ""

    @property
    def console(self) -> Path:
        return self.workdir / f"{self.name}.console.log"

    @property
    def control(self) -> Path:
        return self.workdir / f"{self.name}.ssh"

    def boot(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "qemu64",
            "-m", self.memory, "-smp", "2", "-display", "none", "-vga", "none", "-no-reboot",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", "root=/dev/vda rw console=ttyS0 quiet panic=-1",
            "-drive", f"file={self.image.root},format=raw,if=none,id=root,snapshot=on,cache=unsafe",
            "-device", "virtio-blk-pci,drive=root",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
            "-serial", f"file:{self.console}",
        ]
        for i in range(self.disks):
            disk = self.workdir / f"{self.name}-disk{i}.raw"
            with open(disk, "wb") as f:
                f.truncate(_bytes(self.disk_size))
            argv += ["-drive", f"file={disk},format=raw,if=none,id=d{i},cache=unsafe",
                     "-device", f"virtio-blk-pci,drive=d{i},serial=zfs{i}"]
        started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.workdir / f"{self.name}.qemu.log", "wb"), start_new_session=True)
        while True:
            text = self.console.read_text(errors="replace") if self.console.exists() else ""
            ready = [line for line in text.splitlines() if "READY zfs=" in line]
            if ready:
                self.zfs_version = ready[0].split("=", 1)[1].strip()
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"guest {self.name} exited ({self.proc.returncode}) before READY; console:\n{text[-3000:]}")
            if time.monotonic() - started > BOOT_TIMEOUT:
                self.stop()
                raise RuntimeError(f"guest {self.name} not ready within {BOOT_TIMEOUT:g}s; console:\n{text[-3000:]}")
            time.sleep(0.5)
        self._open_master()
        self.boot_seconds = time.monotonic() - started

    def ssh_argv(self) -> list[str]:
        return [
            "ssh", "-p", str(self.port), "-i", str(self.image.key), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", f"ControlPath={self.control}", "-o", "ControlMaster=auto", "-o", "ControlPersist=yes",
            "-o", "ServerAliveInterval=15", "root@127.0.0.1",
        ]

    def _open_master(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            result = subprocess.run([*self.ssh_argv(), "true"], capture_output=True, timeout=120)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"ssh into {self.name} failed: {result.stderr.decode(errors='replace')}")
            time.sleep(1)

    def run(self, command: str | list[str], *, input: bytes | None = None, timeout: float = 900, env: dict[str, str] | None = None) -> Result:
        """Run a command in the guest (a list is quoted for the guest's shell, a string is shell)."""
        script = command if isinstance(command, str) else shlex.join(command)
        if env:
            script = "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + "; " + script
        result = subprocess.run([*self.ssh_argv(), script], input=input, capture_output=True, timeout=timeout)
        return Result(script, result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"))

    def put_tree(self, source: Path, dest: str, exclude: tuple[str, ...] = ()) -> None:
        """Copy a directory into the guest as a tar stream over the existing ssh connection."""
        with tempfile.TemporaryFile() as buf:
            with tarfile.open(fileobj=buf, mode="w") as tar:
                tar.add(source, arcname=".", filter=lambda ti: None if any(part in exclude for part in Path(ti.name).parts) else ti)
            buf.seek(0)
            self.run(f"rm -rf {shlex.quote(dest)} && mkdir -p {shlex.quote(dest)} && tar -x -C {shlex.quote(dest)}",
                     input=buf.read()).check()

    def stop(self) -> None:
        subprocess.run([*self.ssh_argv()[:-1], "-O", "exit", "root@127.0.0.1"], capture_output=True)
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for disk in self.workdir.glob(f"{self.name}-disk*.raw"):
            disk.unlink()


def _bytes(size: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
