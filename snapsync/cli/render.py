"""Human output: rich tables for terminals, plain text when piped. JSON output is built elsewhere
(each report's ``to_json``) so that the two can never disagree about the facts."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from rich.table import Table

from snapsync.backends.base import SnapshotInfo, SnapshotSizes
from snapsync.ops.hooks import HookReport
from snapsync.plan.naming import parse_snapshot_name
from snapsync.policy.durations import format_duration
from snapsync.replication.replicate import ProgressFactory, TargetReport
from snapsync.plan.retention import Decision, PrunePlan
from snapsync.ops.runner import GroupReport
from snapsync.ops.diff import Changes
from snapsync.ops.held import Held
from snapsync.ops.versions import Found


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def render_target(console: Console, t: TargetReport) -> None:
    status = "[yellow]skipped[/]" if t.skipped else "[green]ok[/]" if t.ok else "[red]FAILED[/]"
    arrow = "->" if t.direction == "push" else "<-"
    parts: list[str] = []
    if t.skipped:
        parts.append(t.skipped)
    if t.dry_run and t.planned:
        parts.append(f"would do {len(t.planned)} step(s)")
    if t.sent:
        full = sum(1 for s in t.sent if s.base is None)
        seconds = sum(s.seconds for s in t.sent) or 1e-9
        kinds = f"{full} full, {len(t.sent) - full} incremental" if full else f"{len(t.sent)} incremental"
        parts.append(f"sent {len(t.sent)} ({kinds}), {_size(t.bytes_sent)} at {_size(int(t.bytes_sent / seconds))}/s")
    elif not t.skipped and t.ok and not t.dry_run:
        parts.append("up to date")
    if t.lag is not None:
        parts.append(f"lag {format_duration(t.lag)}" if t.lag.total_seconds() else "lag 0")
    if t.pruned:
        parts.append(f"pruned {len(t.pruned)} on target")
    console.print(f"  {arrow} [bold]{t.target}[/]: {status}" + (": " + "; ".join(parts) if parts else ""))
    if t.dry_run:
        for step in t.planned:
            console.print(f"     would: {step}", highlight=False)
    for line in t.removed_partials:
        console.print(f"     removed partial copy {line}", highlight=False)
    for line in t.rolled_back:
        console.print(f"     [yellow]rolled back (destroyed on target)[/] {line}", highlight=False)
    _notes_and_errors(console, t)
    if t.prune is not None and t.dry_run:
        for d in t.prune.removed:
            console.print(f"     would delete on target {d.name}", highlight=False)


def render_target_state(console: Console, t: TargetReport) -> None:
    """One target in `list`: what it holds, how far behind it is, what the next run would send."""
    arrow = "->" if t.direction == "push" else "<-"
    if t.skipped:
        console.print(f"  {arrow} [bold]{t.target}[/]: [yellow]{t.skipped}[/]")
        return
    held = [n for names in t.have.values() for n in names]
    newest = max(held, default=None)
    parts = [f"{len(set(held))} cop{'y' if len(set(held)) == 1 else 'ies'}" + (f", newest {newest}" if newest else "")]
    if t.lag is not None:
        lag = format_duration(t.lag) if t.lag.total_seconds() else "0 (up to date)"
        parts.append(f"lag {lag}" + (" [red](over max_lag)[/]" if t.lagging else ""))
    if t.pending:
        parts.append(f"{t.pending} to send")
    status = "" if t.ok else "[red]FAILED[/]: "
    console.print(f"  {arrow} [bold]{t.target}[/]: {status}" + "; ".join(parts))
    _notes_and_errors(console, t)


def _notes_and_errors(console: Console, t: TargetReport) -> None:
    for note in t.notes:
        console.print(f"     [yellow]note:[/] {note}", highlight=False)
    for e in t.errors:
        console.print(f"     [red]error:[/] {e}", highlight=False)


class _Speed(ProgressColumn):
    """The transfer rate in the units of every other figure snapsync prints (MiB/s, not rich's MB/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{_size(int(speed))}/s", style="progress.data.speed")


@contextmanager
def send_progress(console: Console) -> Iterator[ProgressFactory]:
    """Progress bars for sends, on a terminal only; the factory hands out one callback per send."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        _Speed(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )

    def factory(description: str, estimate: int | None) -> Callable[[int], None]:
        task = progress.add_task(description, total=estimate)

        def tick(done: int) -> None:
            total = progress.tasks[task].total
            if total is not None and done > total:
                progress.update(task, total=done)
            progress.update(task, completed=done)

        return tick

    with progress:
        yield factory


def _plan_table(title: str, plan: PrunePlan, explain: bool, left: frozenset[str] = frozenset()) -> Table:
    """``left``: what the plan would delete but is still there (a refusal, or pruning never ran)."""
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("snapshot", no_wrap=True)
    table.add_column("action", no_wrap=True)
    if explain:
        table.add_column("why", overflow="fold")
    for d in reversed(plan.decisions):
        action = "[green]keep[/]" if d.keep else "[red]not deleted[/]" if d.name in left else "[red]delete[/]"
        row = [d.name, action]
        if explain:
            row.append("kept: " + ", ".join(d.reasons) if d.keep and d.reasons else "-")
        table.add_row(*row)
    return table


def _hook(h: HookReport) -> str:
    paused = f", paused {h.paused_seconds:.2f}s" if h.paused_seconds is not None else ""
    return f"{h.kind} {h.status} ({h.seconds:.2f}s{paused})"


def render_reports(console: Console, reports: Sequence[GroupReport], *, explain: bool = False, timeline: bool = False) -> None:
    for r in reports:
        would = "would " if r.dry_run else ""
        delete = "delete" if r.dry_run else "deleted"
        parts: list[str] = []
        if r.snapshot:
            parts.append(f"{would}take {r.snapshot}" if r.dry_run else f"took {r.snapshot}")
        if r.hooks:
            parts.append("hooks " + ", ".join(_hook(h) for h in r.hooks))
        elif r.not_due is not None:
            when = f"; next due {r.next_due.strftime('%Y-%m-%d %H:%M:%SZ')}" if r.next_due else ""
            parts.append(f"not due (newest {r.not_due}{when})")
        if r.plan is not None:
            planned = len(r.plan.removed)
            done = planned if r.dry_run else len(r.deleted)
            parts.append(f"keep {len(r.plan.kept)}, {would}{delete} {done}" + (f" of {planned}" if done != planned else ""))
            if r.plan.future:
                parts.append(f"{len(r.plan.future)} dated in the future (kept)")
        status = "[red]FAILED[/]" if r.errors else "[green]ok[/]"  # a target's failure is on its own line
        console.print(f"[bold]{r.group}[/]: {status}" + (": " + "; ".join(parts) if parts else ""))
        for err in r.errors:
            console.print(f"  [red]error:[/] {err}", highlight=False)
        for warning in r.warnings:
            console.print(f"  [yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
        for t in r.targets:
            render_target(console, t)
        for line in r.released:
            console.print(f"  released stale hold {line}", highlight=False)
        if r.plan is not None and timeline:
            render_timeline(console, f"  {r.group}", r.plan)
        if r.plan is not None and (explain or r.plan.removed):
            left = frozenset() if r.dry_run else frozenset(d.name for d in r.plan.removed) - set(r.deleted)
            if explain:
                console.print(_plan_table(f"  {r.group}", r.plan, explain=True, left=left))
            else:
                for d in r.plan.removed:
                    line = f"[red]not deleted[/] {d.name}" if d.name in left else f"{would}{delete} {d.name}"
                    console.print(f"  {line}", highlight=False)


def render_listing(
    console: Console, group: str, backend: str, listing: dict[str, list[SnapshotInfo]], prefix: str,
    why: Callable[[str, SnapshotInfo], list[str]] = lambda _d, _s: [],
    sizes: dict[str, SnapshotSizes] | None = None,
) -> None:
    """Every snapshot and bookmark, ours and foreign, with who holds it and why it is kept (and with
    ``sizes``, what each costs)."""
    for dataset, snaps in listing.items():
        cost = sizes.get(dataset) if sizes is not None else None
        figures = sorted({k for v in cost.sizes.values() for k in v}, key=SIZE_ORDER.index) if cost else []
        console.print(f"{group} ({backend}) {dataset}", markup=False, highlight=False, soft_wrap=True)  # a title would wrap to the table
        table = Table(show_edge=False, pad_edge=False)
        table.add_column("snapshot", no_wrap=True)
        table.add_column("created (fs)", no_wrap=True)
        for col in ("ro", "id", "ours", *figures, "held by"):
            table.add_column(col, justify="right" if col in figures else "left")
        table.add_column("why kept")
        for s in snaps:
            ours = parse_snapshot_name(prefix, s.name) is not None
            counted = cost.sizes.get(s.name, {}) if cost else {}
            table.add_row(
                f"#{s.name}" if s.kind == "bookmark" else s.name,
                s.created.strftime("%Y-%m-%d %H:%M:%SZ"),
                "yes" if s.read_only else "[red]no[/]",
                s.guid[:8],
                "yes" if ours else "[dim]foreign[/]",
                *(_size(counted[f]) if f in counted else "" for f in figures),
                ", ".join(s.holds),
                escape("; ".join(why(dataset, s))),
            )
        if not snaps:
            table.add_row("(no snapshots)", *[""] * (6 + len(figures)))
        console.print(table)
        if cost is not None and cost.note:
            console.print(f"  {cost.note}", markup=False, highlight=False, soft_wrap=True)


def render_held(console: Console, held: Held) -> None:
    """One line per dataset: what the target's copies of it take there."""
    where = f"  {held.target}: {held.dataset}:"
    if held.error:
        console.print(f"{where} sizes unknown: {held.error}", markup=False, highlight=False, soft_wrap=True)
        return
    total = held.total
    if total is None:
        said = "sizes not counted there" if held.note or held.copies else "no copies"
    else:
        said = f"{len(held.copies)} copies hold {_size(total[0])}" + ("" if total[1] else " or more (blocks the copies share are not counted)")
    console.print(f"{where} {said}" + (f"; {held.note}" if held.note else ""), markup=False, highlight=False, soft_wrap=True)


def render_versions(console: Console, found: Found) -> None:
    console.print(f"{found.group}: {found.dataset}: {found.relative}", markup=False, highlight=False, soft_wrap=True)
    for note in found.notes:
        console.print(f"  note: {note}", markup=False, highlight=False, soft_wrap=True)
    if not found.versions:
        console.print("  in no snapshot, and not there now", highlight=False)
        return
    table = Table(show_edge=False, pad_edge=False)
    for col in ("snapshot", "modified", "size", "kind", "same in", "read it at"):
        table.add_column(col, no_wrap=col != "read it at")
    for v in found.versions:
        table.add_row(v.snapshot, v.mtime.strftime("%Y-%m-%d %H:%M:%SZ"), _size(v.size), v.kind,
                      f"{len(v.also_in)} more" if v.also_in else "", escape(v.path))
    console.print(table)
    if any(v.target for v in found.versions):
        console.print(f"  a target's version comes back with: snapsync restore {found.group}@SNAPSHOT --from TARGET --path PATH --to DIR",
                      markup=False, highlight=False, soft_wrap=True)


SIZE_ORDER = ("used", "written", "exclusive", "shared", "referenced")

TIMELINE_RULES = ("newest", "keep_last", "keep_within", "hourly", "daily", "weekly", "monthly", "yearly")


def timeline_rows(plan: PrunePlan, width: int = 60) -> list[tuple[str, str]]:
    """The plan on one calendar line per rule, oldest snapshot at the left and now at the right: ``●`` where
    the rule keeps a snapshot, ``×`` on the last line where one goes; ``held`` is every other reason (holds,
    a replication base, a rollback's safety snapshot). Snapshots dated after now are left out."""
    shown = [d for d in plan.decisions if "future" not in d.reasons]
    if not shown:
        return []
    start, end = shown[0].created, max(plan.now, shown[-1].created)
    span = (end - start).total_seconds() or 1.0

    def column(d: Decision) -> int:
        return min(width - 1, int((d.created - start).total_seconds() / span * (width - 1)))

    rows: dict[str, list[str]] = {}
    for d in shown:
        if not d.keep:
            rows.setdefault("deleted", ["·"] * width)[column(d)] = "×"
            continue
        for reason in d.reasons:
            rule = reason.split(" ", 1)[0]
            rows.setdefault(rule if rule in TIMELINE_RULES else "held", ["·"] * width)[column(d)] = "●"
    order = [*TIMELINE_RULES, "held", "deleted"]
    return [(rule, "".join(rows[rule])) for rule in order if rule in rows]


def render_timeline(console: Console, title: str, plan: PrunePlan, width: int = 60) -> None:
    rows = timeline_rows(plan, width)
    if not rows:
        return
    shown = [d for d in plan.decisions if "future" not in d.reasons]
    left, right = shown[0].created.strftime("%Y-%m-%d %H:%M"), max(plan.now, shown[-1].created).strftime("%Y-%m-%d %H:%M")
    console.print(f"{title}: what each rule keeps, {left} to {right} (UTC)", markup=False, highlight=False, soft_wrap=True)
    for rule, line in rows:
        console.print(f"  {rule:>11} {line}", markup=False, highlight=False, soft_wrap=True)


def render_diff(console: Console, group: str, old: str, new: str, changes: dict[str, Changes]) -> None:
    """Per dataset a count line, then one line per path: + - M R, by path."""
    for dataset, c in changes.items():
        counts = f"{len(c.added)} added, {len(c.removed)} removed, {len(c.modified)} modified, {len(c.renamed)} renamed"
        console.print(f"{group}: {dataset}: {old} -> {new}: " + (counts if c else "no change"), markup=False, highlight=False, soft_wrap=True)
        lines = [(p, "+") for p in c.added] + [(p, "-") for p in c.removed] + [(p, "M") for p in c.modified]
        lines += [(f"{a} -> {b}", "R") for a, b in c.renamed]
        for text, mark in sorted(lines):
            console.print(f"  {mark} {text}", markup=False, highlight=False, soft_wrap=True)
