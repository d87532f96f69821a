"""How long plan_prune takes on 100,000 snapshots, next to the floor any calendar retention pays.

The floor is converting the same timestamps into the calendar zone and sorting them; the goal is a plan
in under a second, so a host with years of five-minute snapshots never waits on retention (zrepl#480).
Run from the repo root: ``python3 bench/retention.py``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from snapsync.plan.retention import RetentionRules, plan_prune  # noqa: E402

COUNT = 100_000
RUNS = 5
GOAL_SECONDS = 1.0
ZONE = "Europe/Berlin"
RULES = RetentionRules(
    keep_last=10, keep_within=timedelta(days=2), hourly=48, daily=14, weekly=8, monthly=12, yearly=5, timezone=ZONE
)


@dataclass(frozen=True)
class Snap:
    name: str
    created: datetime


def median_seconds(work: Callable[[], object]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    snaps = [Snap(f"auto-{i:06d}", start + timedelta(minutes=5 * i)) for i in range(COUNT)]
    snaps.reverse()
    now = snaps[0].created + timedelta(minutes=1)
    zone = ZoneInfo(ZONE)

    baseline = median_seconds(lambda: sorted(s.created.astimezone(zone).timestamp() for s in snaps))
    plan = plan_prune(snaps, RULES, now)
    elapsed = median_seconds(lambda: plan_prune(snaps, RULES, now))

    span = snaps[0].created - snaps[-1].created
    print(f"{COUNT:,} snapshots every 5 min over {span.days} days, {ZONE}, kept {len(plan.kept)}")
    print(f"baseline (convert to zone + sort): {baseline * 1000:8.1f} ms  (median of {RUNS})")
    ratio = f"{elapsed / baseline:.1f}x baseline"
    print(f"plan_prune:                        {elapsed * 1000:8.1f} ms  (median of {RUNS}, {ratio})")
    print(f"goal: < {GOAL_SECONDS:.0f} s  {'PASS' if elapsed < GOAL_SECONDS else 'MISS'}")


if __name__ == "__main__":
    main()
