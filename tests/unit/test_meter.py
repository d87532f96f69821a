"""The rate limit holds from a stream's first byte, however long the session took to start."""

from __future__ import annotations

import pytest

from snapsync.host import streams
from snapsync.host.streams import Meter


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(streams.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(streams.time, "sleep", fake.sleep)
    return fake


def test_set_up_time_does_not_become_a_burst(clock: FakeTime) -> None:
    meter = Meter(rate_limit=64 * 1024)
    clock.now += 30  # ssh, serve's start-up and listings before the first byte
    for _ in range(24):
        meter.add(64 * 1024)
    assert clock.now - 1030 == pytest.approx(24.0)  # 24 x 64 KiB at 64 KiB/s: 24 s, not 0


def test_no_limit_never_sleeps(clock: FakeTime) -> None:
    meter = Meter()
    for _ in range(100):
        meter.add(1 << 20)
    assert clock.slept == [] and meter.bytes == 100 << 20
