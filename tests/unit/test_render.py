"""What the command line prints, rendered as on a terminal: one unit system throughout."""

from __future__ import annotations

import io
import re
import time

from rich.console import Console

from snapsync.cli.render import render_target, send_progress
from snapsync.replication.replicate import Sent, TargetReport


def test_progress_and_reports_speak_binary_units() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=150)
    with send_progress(console) as factory:
        tick = factory("nas: app 12:00", 8 << 20)
        for done in range(0, 8 << 20, 1 << 20):
            tick(done)
            time.sleep(0.02)
    report = TargetReport("app", "nas", sent=[Sent("/x", "s", None, 3 << 20, 1.0)])
    render_target(console, report)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", console.file.getvalue())  # type: ignore[attr-defined]
    rates = re.findall(r"\d[\d.]* ?([kKMG]i?B)/s", text)
    assert rates and all(u.endswith("iB") for u in rates), rates
    assert "3.0 MiB at 3.0 MiB/s" in text


def test_the_timeline_puts_each_rules_keepers_on_its_own_line() -> None:
    from dataclasses import dataclass
    from datetime import UTC, datetime, timedelta

    from snapsync.cli.render import timeline_rows
    from snapsync.plan.retention import RetentionRules, plan_prune

    @dataclass(frozen=True)
    class Snap:
        name: str
        created: datetime

    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    snaps = [Snap(f"s{i:02d}", now - timedelta(days=59 - i)) for i in range(60)]  # one a day for 60 days, the last today
    plan = plan_prune(snaps, RetentionRules(keep_last=2, daily=5, weekly=3), now, pinned={"s10": ["target:nas"]})
    rows = dict(timeline_rows(plan, width=60))
    assert list(rows) == ["newest", "keep_last", "daily", "weekly", "held", "deleted"]
    assert all(len(line) == 60 for line in rows.values())
    assert rows["newest"] == "·" * 59 + "●"
    assert rows["daily"].count("●") == 5 and rows["daily"].endswith("●" * 5)
    assert rows["weekly"].count("●") == 3
    assert rows["held"].index("●") == 10
    assert rows["deleted"].count("×") == len(plan.removed) and rows["deleted"][0] == "×"
    assert timeline_rows(plan_prune([], RetentionRules(keep_last=1), now)) == []
