"""The data path's building blocks with real processes and pipes (no btrfs needed)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from snapsync.errors import CommandFailed
from snapsync.host.streams import Meter, Proc, finish, pump


def test_pump_moves_every_byte_and_counts_them(tmp_path: Path) -> None:
    payload = os.urandom(5 * 1024 * 1024 + 17)
    (tmp_path / "in").write_bytes(payload)
    source = Proc.start(["cat", str(tmp_path / "in")], stdout=subprocess.PIPE)
    sink = Proc.start(["sha256sum"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert source.popen.stdout and sink.popen.stdin and sink.popen.stdout
    ticks: list[int] = []
    meter = Meter(tick=ticks.append, every=0.0)
    pump(source.popen.stdout.fileno(), sink.popen.stdin.fileno(), meter)
    sink.popen.stdin.close()
    digest = sink.popen.stdout.read().split()[0].decode()
    finish([source, sink])
    assert meter.bytes == len(payload)
    assert ticks == sorted(ticks) and ticks[-1] == len(payload)
    assert digest == hashlib.sha256(payload).hexdigest()


def test_rate_limit_holds_the_average_down() -> None:
    n = 3 * 1024 * 1024
    source = Proc.start(["head", "-c", str(n), "/dev/zero"], stdout=subprocess.PIPE)
    sink = Proc.start(["wc", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert source.popen.stdout and sink.popen.stdin and sink.popen.stdout
    meter = Meter(rate_limit=2 << 20)
    started = time.monotonic()
    pump(source.popen.stdout.fileno(), sink.popen.stdin.fileno(), meter)
    elapsed = time.monotonic() - started
    sink.popen.stdin.close()
    assert int(sink.popen.stdout.read()) == n
    finish([source, sink])
    # 3 MiB at 2 MiB/s cannot finish in under ~1.5 s (a lower bound only: never flaky on slow machines)
    assert elapsed >= 1.4


def test_finish_blames_the_real_failure_not_the_broken_pipe() -> None:
    source = Proc.start(["sh", "-c", "yes | head -c 10000000"], stdout=subprocess.PIPE, label="sender")
    assert source.popen.stdout
    sink = Proc.start(["sh", "-c", "head -c 10 >/dev/null; echo 'disk on fire' >&2; exit 3"],
                      stdin=source.popen.stdout, label="receiver")
    source.popen.stdout.close()
    with pytest.raises(CommandFailed, match="receiver exited 3: disk on fire"):
        finish([source, sink])


def test_unstartable_command_is_a_clear_error() -> None:
    with pytest.raises(CommandFailed, match="cannot start"):
        Proc.start(["/nonexistent/btrfs", "send"])


def test_pipe_capacity_is_widened() -> None:
    import fcntl

    r, w = os.pipe()
    try:
        from snapsync.host.streams import widen

        widen(r)
        assert fcntl.fcntl(r, 1032) >= 1 << 20  # F_GETPIPE_SZ
    finally:
        os.close(r)
        os.close(w)
