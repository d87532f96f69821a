"""``snapsync demo``: the real runner, on a real (throwaway) btrfs, with a simulated clock.

Everything a user's cron would do happens for real — snapshots, retention, deletion — only time is
simulated, so weeks of hourly runs fit in a few seconds. A foreign snapshot made by hand at the start
shows that snapsync never touches what it did not create.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from string import Template

import btrfsutil
from rich.console import Console
from rich.progress import Progress

from snapsync.clock import ManualClock
from snapsync.errors import EXIT_OK, EXIT_PARTIAL
from snapsync.policy import Policy, parse_policy
from snapsync.render import render_reports
from snapsync.runner import GroupReport, Runner
from snapsync.scratch import scratch_btrfs, signals_raise

START = datetime(2026, 9, 15, tzinfo=UTC)
FOREIGN = "before-upgrade (manual)"


def demo_policy(root: Path) -> Policy:
    text = files("snapsync").joinpath("data/demo.toml").read_text()
    return parse_policy(Template(text).substitute(root=json.dumps(str(root))[1:-1]), source="<demo policy>")


def _populate(policy: Policy) -> None:
    for group in policy.groups.values():
        for dataset in group.datasets:
            path = Path(dataset)
            path.parent.mkdir(parents=True, exist_ok=True)
            btrfsutil.create_subvolume(path)
            (path / "state.log").write_text(f"{path.name} created\n")


def run_demo(days: int, console: Console, as_json: bool = False) -> int:
    with signals_raise(), scratch_btrfs("512M", label="snapsync-demo") as root:
        policy = demo_policy(root)
        _populate(policy)
        clock = ManualClock(START)
        runner = Runner(policy, clock)
        forge = policy.groups["forge"]
        foreign = Path(runner.backend(forge).snapshot_home(forge.datasets[0])) / FOREIGN
        foreign.parent.mkdir(parents=True, exist_ok=True)
        btrfsutil.create_snapshot(forge.datasets[0], foreign, read_only=True)

        taken = deleted = 0
        failures: list[str] = []
        hours = days * 24
        with Progress(console=console, transient=True, disable=as_json) as progress:
            task = progress.add_task(f"simulating {days} days of hourly runs", total=hours)
            for _ in range(hours):
                for dataset in forge.datasets:
                    with open(Path(dataset) / "state.log", "a") as f:
                        f.write(f"{clock.now().isoformat()}\n")
                for report in runner.run(policy.groups.values(), take=True, only_due=True, prune=True):
                    taken += report.snapshot is not None
                    deleted += len(report.deleted)
                    failures += [f"{report.group}: {e}" for e in report.errors]
                clock.advance(timedelta(hours=1))
                progress.advance(task)

        final = runner.run(policy.groups.values(), take=False, only_due=False, prune=True, dry_run=True)
        on_disk = {g.name: {d: len(runner.backend(g).list_snapshots(d)) for d in g.datasets} for g in policy.groups.values()}
        foreign_kept = foreign.exists()
        summary = {
            "simulated": {"start": START.isoformat(), "end": clock.now().isoformat(), "days": days},
            "taken": taken,
            "deleted": deleted,
            "foreign_snapshot_untouched": foreign_kept,
            "snapshots_on_disk": on_disk,
            "groups": [r.to_json() for r in final],
            "errors": failures,
        }
        if as_json:
            print(json.dumps(summary))
        else:
            _print(console, days, root, taken, deleted, final, on_disk, foreign_kept, failures)
    if not as_json:
        console.print("cleaned up: unmounted and deleted the demo filesystem")
    return EXIT_OK if not failures and foreign_kept else EXIT_PARTIAL


def _print(
    console: Console,
    days: int,
    root: Path,
    taken: int,
    deleted: int,
    final: list[GroupReport],
    on_disk: dict[str, dict[str, int]],
    foreign_kept: bool,
    failures: list[str],
) -> None:
    console.print(f"[bold]snapsync demo[/]: btrfs on a loop device at {root}")
    console.print(
        f"simulated {days} days of hourly `snapsync run` from {START:%Y-%m-%d} "
        f"to {START + timedelta(days=days):%Y-%m-%d} (retention calendar: Europe/Berlin; DST ends 2026-10-25)"
    )
    console.print(f"took {taken} group snapshots, pruned {deleted}; what retention keeps now, and why:\n")
    render_reports(console, final, explain=True)
    console.print()
    for group, datasets in on_disk.items():
        for dataset, count in datasets.items():
            console.print(f"on disk: {group}: {dataset}: {count} snapshots")
    console.print(f"foreign snapshot {FOREIGN!r}: {'untouched' if foreign_kept else '[red]MISSING[/]'}")
    for failure in failures:
        console.print(f"[red]error:[/] {failure}")
