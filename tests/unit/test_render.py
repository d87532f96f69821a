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
