"""Human output: rich tables for terminals, plain text when piped. JSON output is built elsewhere
(each report's ``to_json``) so that the two can never disagree about the facts."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from snapsync.backends.base import SnapshotInfo
from snapsync.naming import parse_snapshot_name
from snapsync.retention import PrunePlan
from snapsync.runner import GroupReport


def _plan_table(title: str, plan: PrunePlan, explain: bool) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("snapshot", no_wrap=True)
    table.add_column("action", no_wrap=True)
    if explain:
        table.add_column("kept by")
    for d in reversed(plan.decisions):
        action = "[green]keep[/]" if d.keep else "[red]delete[/]"
        row = [d.name, action]
        if explain:
            row.append(", ".join(d.reasons) if d.reasons else "-")
        table.add_row(*row)
    return table


def render_reports(console: Console, reports: Sequence[GroupReport], *, explain: bool = False) -> None:
    for r in reports:
        would = "would " if r.dry_run else ""
        delete = "delete" if r.dry_run else "deleted"
        parts: list[str] = []
        if r.snapshot:
            parts.append(f"{would}take {r.snapshot}" if r.dry_run else f"took {r.snapshot}")
        elif r.not_due is not None:
            parts.append(f"not due (newest {r.not_due})")
        if r.plan is not None:
            removed = len(r.plan.removed)
            parts.append(f"keep {len(r.plan.kept)}, {would}{delete} {removed}")
            if r.plan.future:
                parts.append(f"{len(r.plan.future)} dated in the future (kept)")
        status = "[green]ok[/]" if r.ok else "[red]FAILED[/]"
        console.print(f"[bold]{r.group}[/]: {status}: " + "; ".join(parts))
        for err in r.errors:
            console.print(f"  [red]error:[/] {err}", highlight=False)
        if r.plan is not None and (explain or r.plan.removed):
            if explain:
                console.print(_plan_table(f"  {r.group}", r.plan, explain=True))
            else:
                for d in r.plan.removed:
                    console.print(f"  {would}{delete} {d.name}", highlight=False)


def render_listing(console: Console, group: str, backend: str, listing: dict[str, list[SnapshotInfo]], prefix: str) -> None:
    for dataset, snaps in listing.items():
        table = Table(title=f"{group} ({backend}) {dataset}", title_justify="left", show_edge=False, pad_edge=False)
        table.add_column("snapshot", no_wrap=True)
        table.add_column("created (fs)", no_wrap=True)
        for col in ("ro", "id", "ours"):
            table.add_column(col)
        for s in snaps:
            ours = parse_snapshot_name(prefix, s.name) is not None
            table.add_row(
                s.name,
                s.created.strftime("%Y-%m-%d %H:%M:%SZ"),
                "yes" if s.read_only else "[red]no[/]",
                s.guid[:8],
                "yes" if ours else "[dim]foreign[/]",
            )
        if not snaps:
            table.add_row("(no snapshots)", "", "", "", "")
        console.print(table)
