"""Moving a send stream between processes without copying it through Python.

Processes are connected by handing one's stdout pipe to the next as stdin; where snapsync must see
the bytes go by (progress, byte counts, a rate limit) it moves them with ``os.splice`` between
1 MiB pipes, so the data stays in the kernel. Every process's exit status is collected and checked;
the error names the side that failed first, with the tail of its stderr.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO

from snapsync.errors import CommandFailed, TransientError

PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def widen(fd: int) -> None:
    """Raise a pipe's capacity to 1 MiB; fewer, larger splices. Not fatal if the limit forbids it."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass


@dataclass
class Proc:
    """A child process whose stderr goes to a temporary file, so it can never block on a full pipe."""

    argv: list[str]
    popen: subprocess.Popen[bytes]
    errfile: IO[bytes]
    label: str = ""

    @classmethod
    def start(
        cls,
        argv: Sequence[str],
        *,
        stdin: int | IO[bytes] | None = None,
        stdout: int | IO[bytes] | None = None,
        label: str = "",
        env: dict[str, str] | None = None,
    ) -> Proc:
        errfile = tempfile.TemporaryFile(prefix="snapsync-stderr-")
        try:
            popen = subprocess.Popen(
                list(argv), stdin=stdin, stdout=stdout, stderr=errfile, close_fds=True, env=env,
                start_new_session=False,
            )
        except OSError as e:
            errfile.close()
            raise CommandFailed(argv, 127, f"cannot start: {e.strerror or e}") from e
        return cls(list(argv), popen, errfile, label or argv[0])

    def stderr_tail(self, limit: int = 4096) -> str:
        self.errfile.seek(0, os.SEEK_END)
        size = self.errfile.tell()
        self.errfile.seek(max(0, size - limit))
        return self.errfile.read().decode(errors="replace")

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.errfile.close()


@contextmanager
def reaped(proc: Proc) -> Iterator[Proc]:
    """Whatever happens while its output is read, the process is gone afterwards: killed and waited
    for on any error (a reader that stopped must not leave a sender blocked), and its pipe and
    stderr file closed."""
    try:
        yield proc
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if proc.popen.stdout is not None:
            proc.popen.stdout.close()
        proc.close()


def cut_off(returncode: int, stderr: str) -> bool:
    """The process only died because its reader went away: SIGPIPE (or a shell's 128+13), or EPIPE."""
    return returncode in (-signal.SIGPIPE, 128 + signal.SIGPIPE) or "Broken pipe" in stderr


def _io(proc: Proc) -> int:
    """Bytes the process has read and written so far (``/proc/<pid>/io``); -1 once it is gone."""
    try:
        with open(f"/proc/{proc.popen.pid}/io") as f:
            fields = dict(line.split(": ", 1) for line in f.read().splitlines())
        return int(fields["rchar"]) + int(fields["wchar"])
    except (OSError, KeyError, ValueError):
        return -1


class Stalled(TransientError):
    """A pipeline moved no byte for longer than allowed: the peer feeding it went silent."""


def _wait_moving(procs: Sequence[Proc], stall: float) -> list[int]:
    """Wait for every process, killing the pipeline when none of them read or wrote a byte for
    ``stall`` seconds. The bytes never pass through Python: progress is read from the kernel."""
    last = [_io(p) for p in procs]
    quiet_since = time.monotonic()
    step = min(1.0, stall / 4)
    while running := [p for p in procs if p.popen.poll() is None]:
        try:
            running[-1].popen.wait(step)  # returns the moment it exits: no fixed sleep per stream
            continue
        except subprocess.TimeoutExpired:
            pass
        now = [_io(p) for p in procs]
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= stall:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            raise Stalled(f"{procs[0].label}: no data for {stall:g}s; the sending side stalled or vanished, stopped")
    return [p.wait() for p in procs]


def finish(procs: Sequence[Proc], *, timeout: float | None = None, stall: float | None = None) -> None:
    """Wait for every process; raise :class:`CommandFailed` for the one that failed first.

    A process killed by SIGPIPE (or exiting with EPIPE) usually only reports that the next one died,
    so a "real" failure elsewhere in the pipeline is preferred over it. With ``stall``, a pipeline
    that moves nothing for that many seconds is killed (:class:`Stalled`).
    """
    try:
        codes = _wait_moving(procs, stall) if stall else [p.wait(timeout) for p in procs]
    except BaseException:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        raise
    failed = [(p, c) for p, c in zip(procs, codes) if c != 0]
    if not failed:
        return
    real = [(p, c) for p, c in failed if not cut_off(c, p.stderr_tail())]
    proc, code = (real or failed)[0]
    raise CommandFailed([proc.label, *proc.argv[1:]], code, proc.stderr_tail())


@dataclass
class Meter:
    """Bytes moved so far, for progress and reports; ``tick`` is called at most every ``every`` seconds.

    ``rate_limit`` is in bytes per second (the policy parsed it at load); None or 0 means unlimited.
    """

    tick: Callable[[int], None] | None = None
    every: float = 0.5
    rate_limit: int | None = None
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    _last: float = 0.0
    _first: float = 0.0

    def add(self, n: int) -> None:
        now = time.monotonic()
        if not self.bytes:
            self._first = now  # the limit's clock starts with the stream, not with the session's set-up
        self.bytes += n
        if self.rate_limit:
            ahead = self.bytes / self.rate_limit - (now - self._first)
            if ahead > 0:
                time.sleep(ahead)
                now = time.monotonic()
        if self.tick is not None and now - self._last >= self.every:
            self._last = now
            self.tick(self.bytes)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


def pump(src: int, dst: int, meter: Meter) -> None:
    """Splice everything from pipe ``src`` to pipe ``dst`` until EOF, counting bytes.

    Raises BrokenPipeError when the reader went away; the caller then learns why from exit statuses.
    """
    widen(src)
    widen(dst)
    chunk = PIPE_SIZE if not meter.rate_limit else max(4096, min(PIPE_SIZE, meter.rate_limit // 10))
    while True:
        try:
            n = os.splice(src, dst, chunk)
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            raise
        if n == 0:
            return
        meter.add(n)
