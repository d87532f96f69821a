"""The command line: parse, call, render. The only place that turns errors into exit codes.

Exit codes: 0 ok, 1 partial failure (some group failed; the others were done), 2 bad input or
usage (nothing was done), 3 another run holds the policy's lock, 128 + N stopped by signal N
(SIGINT 130, SIGTERM 143, SIGHUP 129), after the same cleanup for all three.

No ``from __future__ import annotations`` here: typer reads every command's annotations at each
start, and as strings each would be compiled and evaluated again (about 5% of a short command).
Names imported only for type checking are quoted.
"""

import inspect
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, Literal, NoReturn, cast

import typer
from rich.console import Console
from rich.markup import escape

from snapsync import __version__
from snapsync.errors import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, SnapsyncError

if TYPE_CHECKING:
    from snapsync.backends.base import SnapshotInfo, SnapshotSizes
    from snapsync.ops.held import Held
    from snapsync.policy.loader import Group, Policy
    from snapsync.policy.schema import DirTarget, S3Target
    from snapsync.replication.replicate import ProgressFactory, TargetReport
    from snapsync.recovery.restore import Landing
    from snapsync.ops.runner import GroupReport, Runner, TargetHoldings

DEFAULT_POLICY = "/etc/snapsync/policy.toml"
EPILOG = ("Exit codes: 0 ok, 1 partial failure, 2 bad input or usage, 3 locked by another run, "
          "128+N stopped by signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP).")

app = typer.Typer(
    name="snapsync",
    help="Consistency-group snapshots of btrfs subvolumes and ZFS datasets, with GFS retention.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
policy_app = typer.Typer(help="Validate and show policy files.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")

PIPE_WIDTH = 10_000
"""Columns for output that is not a terminal: a pipe or a file gets whole lines and whole table
cells (rich would wrap text mid-phrase and cut cells short at 80 columns)."""


def _width(stream: IO[str]) -> int | None:
    try:
        return None if stream.isatty() else PIPE_WIDTH
    except (AttributeError, ValueError):  # a closed or unusual stream: rich's default
        return None


out = Console(highlight=False, width=_width(sys.stdout))
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", "-n", help="Show what would be done; change nothing.")]


def _completion_policy(ctx: typer.Context) -> "Policy | None":
    """The policy a command line names, for completing its words; nothing at all when it cannot be read."""
    from snapsync.policy.loader import load_policy

    root = ctx.find_root()
    path = root.params.get("policy") or os.environ.get("SNAPSYNC_POLICY") or DEFAULT_POLICY
    try:
        return load_policy(path, on_this_host=False)
    except Exception:  # noqa: BLE001 (a shell is asking: an error would land in the middle of the user's line)
        return None


def _complete_groups(ctx: typer.Context, incomplete: str) -> list[str]:
    policy = _completion_policy(ctx)
    return [g for g in policy.groups if g.startswith(incomplete)] if policy else []


def _complete_targets(ctx: typer.Context, incomplete: str) -> list[str]:
    policy = _completion_policy(ctx)
    return [t for t in policy.targets if t.startswith(incomplete)] if policy else []


def _complete_snapshots(ctx: typer.Context, incomplete: str) -> list[str]:
    """Snapshot names of the group already on the line (this host's snapshots: root only on btrfs)."""
    policy = _completion_policy(ctx)
    group = policy.groups.get(str(ctx.params.get("group"))) if policy else None
    if policy is None or group is None:
        return []
    try:
        listing = _runner(policy).raw_listing(group)
    except Exception:  # noqa: BLE001 (as above)
        return []
    names = sorted({s.name for snaps in listing.values() for s in snaps if s.kind == "snapshot"}, reverse=True)
    return [n for n in names if n.startswith(incomplete)]


GroupsArg = Annotated[
    list[str] | None,
    typer.Argument(help="Groups to act on (default: all groups).", show_default=False, autocompletion=_complete_groups),
]
LockTimeoutOpt = Annotated[
    float, typer.Option("--lock-timeout", help="Seconds to wait for another run to finish before exiting 3.")
]


class State:
    policy_path: str = DEFAULT_POLICY
    quiet: bool = False


@dataclass
class Options:
    """Global options a command's error handling needs, as the context object: :func:`main` hands
    one in and reads ``debug`` when a command fails unexpectedly; a command reads it from its ``ctx``."""

    debug: bool = False


def _version(value: bool) -> None:
    if value:
        out.print(f"snapsync {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    policy: Annotated[
        str,
        typer.Option("--policy", "-p", envvar="SNAPSYNC_POLICY", help="Policy file.", show_envvar=True),
    ] = DEFAULT_POLICY,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every step to stderr.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only problems: groups and targets that failed or warn (for cron mail).")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of internal errors.")] = False,
    log_format: Annotated[
        Literal["text", "json"],
        typer.Option("--log-format", envvar="SNAPSYNC_LOG_FORMAT", help="Log lines as text or JSON (one per event).", show_envvar=True),
    ] = "text",
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    from snapsync.host.logs import setup

    State.policy_path = policy
    State.quiet = quiet
    ctx.ensure_object(Options).debug = debug
    setup(log_format, logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)


def _load(path: str | None = None, check_programs: bool = True) -> "Policy":
    from snapsync.policy.loader import load_policy

    return load_policy(path or State.policy_path, check_programs)


def _runner(policy: "Policy", progress: "ProgressFactory | None" = None) -> "Runner":
    from snapsync.clock import SystemClock
    from snapsync.ops.runner import Runner

    return Runner(policy, SystemClock(), progress=progress)


@contextmanager
def _progress(as_json: bool) -> "Iterator[ProgressFactory | None]":
    """Progress bars on a terminal; nothing under cron, systemd or --json."""
    if as_json or not err.is_terminal:
        yield None
        return
    from snapsync.cli.render import send_progress

    with send_progress(err) as factory:
        yield factory


def _finish(reports: "list[GroupReport]", as_json: bool, explain: bool = False, timeline: bool = False) -> int:
    from snapsync.cli.render import render_reports

    if as_json:
        print(json.dumps({"groups": [r.to_json() for r in reports]}))
    else:
        shown = [r for r in reports if not r.ok or r.warnings] if State.quiet else reports
        render_reports(out, shown, explain=explain, timeline=timeline)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_PARTIAL


def _act(
    command_name: str,
    groups: list[str] | None,
    *,
    take: bool,
    only_due: bool,
    prune: bool,
    dry_run: bool,
    as_json: bool,
    lock_timeout: float,
    explain: bool = False,
    replicate: bool = False,
    targets: list[str] | None = None,
    prune_targets: bool = True,
    drop_future: bool = False,
    timeline: bool = False,
) -> int:
    """Load, select, run under the policy's lock (a dry run changes nothing, so it takes none), record
    metrics, render."""
    from snapsync.clock import SystemClock
    from snapsync.host.lock import policy_lock
    from snapsync.host.logs import log_reports
    from snapsync.ops.metrics import record_run
    from snapsync.ops.runner import select_groups, select_targets

    policy = _load()
    selected = select_groups(policy, groups or []) if policy.groups or groups else []
    pulls = select_targets(policy, targets or []) if replicate and not groups else []

    def go() -> "list[GroupReport]":
        with _progress(as_json) as progress:
            return _runner(policy, progress).run(
                selected, take=take, only_due=only_due, prune=prune, dry_run=dry_run,
                replicate=replicate, targets=targets, prune_targets=prune_targets, pulls=pulls,
                drop_future=drop_future,
            )

    if dry_run:
        reports = go()
    else:
        with policy_lock(policy.source, lock_timeout):
            started = SystemClock().now()
            try:
                reports = go()
            except Exception as e:
                record_run(policy, command_name, [], started, SystemClock().now(), error=f"{type(e).__name__}: {e}")
                raise
            record_run(policy, command_name, reports, started, SystemClock().now())
        log_reports(command_name, reports)
    return _finish(reports, as_json, explain=explain, timeline=timeline)


@app.command()
def snapshot(
    groups: GroupsArg = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    lock_timeout: LockTimeoutOpt = 60.0,
) -> int:
    """Take a snapshot of the given groups now, whether due or not (one name across each group)."""
    return _act("snapshot", groups, take=True, only_due=False, prune=False, dry_run=dry_run, as_json=as_json, lock_timeout=lock_timeout)


@app.command()
def prune(
    groups: GroupsArg = None,
    dry_run: DryRunOpt = False,
    explain: Annotated[bool, typer.Option("--explain", help="Show every snapshot and each rule that kept it.")] = False,
    timeline: Annotated[
        bool, typer.Option("--timeline", help="Show what each rule keeps on a calendar line, oldest snapshot to now.")
    ] = False,
    future: Annotated[bool, typer.Option(
        "--future", help="Also delete the snapshots dated after the clock (taken while it was wrong); fix the clock first."
    )] = False,
    as_json: JsonOpt = False,
    lock_timeout: LockTimeoutOpt = 60.0,
) -> int:
    """Delete the snapshots that no retention rule keeps. Foreign snapshots are never touched.

    A snapshot dated after the clock stops pruning (the clock stepped back); ``--future`` deletes
    such snapshots after their replication holds are released, then prunes as usual.
    """
    return _act(
        "prune", groups, take=False, only_due=False, prune=True, dry_run=dry_run, as_json=as_json,
        lock_timeout=lock_timeout, explain=explain, drop_future=future, timeline=timeline,
    )


@app.command()
def run(
    dry_run: DryRunOpt = False,
    explain: Annotated[bool, typer.Option("--explain", help="Show the retention decision for every snapshot.")] = False,
    as_json: JsonOpt = False,
    lock_timeout: LockTimeoutOpt = 60.0,
) -> int:
    """What cron or the systemd timer calls: snapshot what is due, replicate to every target, prune both sides."""
    return _act(
        "run", None, take=True, only_due=True, prune=True, dry_run=dry_run, as_json=as_json,
        lock_timeout=lock_timeout, explain=explain, replicate=True,
    )


@app.command()
def diff(
    group: Annotated[str, typer.Argument(help="The group.", autocompletion=_complete_groups)],
    old: Annotated[str, typer.Argument(help="The snapshot to compare from.", autocompletion=_complete_snapshots)],
    new: Annotated[
        str | None, typer.Argument(help="The snapshot to compare to (default: the data as it is now).", autocompletion=_complete_snapshots)
    ] = None,
    as_json: JsonOpt = False,
) -> int:
    """What changed in each dataset of GROUP from snapshot OLD to snapshot NEW, or to now: paths added,
    removed, modified (content, size, time, mode or owner) and renamed (the same file under another name)."""
    from snapsync.ops.diff import diff_group

    policy = _load(check_programs=False)
    changes = diff_group(policy, _runner(policy), group, old, new)
    if as_json:
        print(json.dumps({"group": group, "from": old, "to": new or "now",
                          "datasets": [{"dataset": ds, **c.to_json()} for ds, c in changes.items()]}))
    else:
        from snapsync.cli.render import render_diff

        render_diff(out, group, old, new or "now", changes)
    return EXIT_OK


@app.command()
def versions(
    path: Annotated[str, typer.Argument(help="A file or directory inside one of the policy's datasets.")],
    targets: Annotated[bool, typer.Option("--targets", help="Also the copies on the group's targets (ssh and local; read as a restore reads them).")] = False,
    target: Annotated[
        list[str] | None, typer.Option("--target", "-t", help="Only this target's copies (repeatable; implies --targets).",
                                       autocompletion=_complete_targets)
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every distinct version of PATH in this host's snapshots, newest first, beside the live one.

    Each line says where the version can be read (the path inside the snapshot), its size and
    modification time; a run of snapshots holding the same version (type, size and modification
    time) shows once, with how many more hold it. With --targets, the copies on other hosts too: a
    version this host pruned long ago may still be there.
    """
    from snapsync.ops.versions import find_versions

    policy = _load(check_programs=False)
    found = find_versions(policy, _runner(policy), path, target or (None if targets else ()))
    if as_json:
        print(json.dumps({"group": found.group, "dataset": found.dataset, "path": found.relative,
                          "versions": [v.to_json() for v in found.versions], "notes": found.notes}))
        return
    from snapsync.cli.render import render_versions

    render_versions(out, found)


@app.command()
def replicate(
    targets: Annotated[
        list[str] | None,
        typer.Argument(help="Targets to replicate to (default: every target of each group).", show_default=False,
                       autocompletion=_complete_targets),
    ] = None,
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="Only these groups (repeatable).", autocompletion=_complete_groups)
    ] = None,
    no_prune: Annotated[bool, typer.Option("--no-prune", help="Do not apply the targets' retention afterwards.")] = False,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    lock_timeout: LockTimeoutOpt = 60.0,
) -> int:
    """Send every snapshot a target lacks, incrementally from the newest common one; then prune the target.

    Conflicts (a diverged target, no common base) stop that target and are explained; nothing is
    overwritten unless the target's policy says on_diverged = "rollback".
    """
    return _act(
        "replicate", group, take=False, only_due=False, prune=False, dry_run=dry_run, as_json=as_json,
        lock_timeout=lock_timeout, replicate=True, targets=targets, prune_targets=not no_prune,
    )


@app.command()
def serve(
    root: Annotated[str, typer.Option("--root", help="Everything served lives below this directory (btrfs) or dataset (zfs, no leading /).")],
    role: Annotated[Literal["receive", "send"], typer.Option("--role", help="receive: accept copies; send: hand out snapshots.")],
    snapshot_dir: Annotated[str, typer.Option("--snapshot-dir", help="send role: where snapshots live, as in the policy.")] = ".snapsync",
    append_only: Annotated[bool, typer.Option("--append-only", help="receive role: refuse to delete copies.")] = False,
    stall_timeout: Annotated[float, typer.Option("--stall-timeout", min=0.1, max=86400, help="Give up on a request line or a stream that moves nothing for this many seconds.")] = 600.0,
    allow_restore: Annotated[bool, typer.Option("--allow-restore", help="receive role: also send the copies back (restore, drill).")] = False,
) -> int:
    """The far end of replication, for an ssh forced command (see `snapsync authorize`). Reads one
    request on stdin; speaks a small versioned protocol; runs no shell."""
    from snapsync.replication.serve import serve as run_serve

    return run_serve(root, role, snapshot_dir, append_only, stall_timeout, allow_restore)


@app.command()
def authorize(
    keyfile: Annotated[Path, typer.Argument(help="The client's public key file (e.g. id_ed25519.pub).")],
    root: Annotated[str, typer.Option("--root", help="The directory (btrfs) or dataset (zfs) this key may use.")],
    role: Annotated[Literal["receive", "send"], typer.Option("--role")] = "receive",
    command: Annotated[str, typer.Option("--command", help="Path of snapsync on this host.")] = "snapsync",
    append_only: Annotated[bool, typer.Option("--append-only", help="receive role: the key may add copies, never delete.")] = False,
    allow_restore: Annotated[bool, typer.Option("--allow-restore", help="receive role: the key may also read its copies back (restore, drill).")] = False,
) -> int:
    """Print the authorized_keys line that confines KEYFILE to `snapsync serve` in ROLE below ROOT."""
    from snapsync.errors import UsageError
    from snapsync.replication.serve import authorized_keys_line

    from snapsync.backends.zfs_receiver import is_dataset_name

    if not root.startswith("/") and not is_dataset_name(root):
        raise UsageError(f"--root must be an absolute path (btrfs) or a ZFS dataset name (zfs), got {root!r}")
    try:
        lines = [ln for ln in keyfile.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    except OSError as e:
        raise UsageError(f"{keyfile}: {e.strerror or e}") from None
    if len(lines) != 1 or not lines[0].split()[0].startswith(("ssh-", "ecdsa-", "sk-")) or len(lines[0].split()) < 2:
        raise UsageError(f"{keyfile}: not a single ssh public key (expected a line like 'ssh-ed25519 AAAA... comment')")
    if allow_restore and role != "receive":
        raise UsageError("--allow-restore is an option of the receive role (the send role hands out snapshots already)")
    argv = [command, "serve", "--root", root, "--role", role] + (["--append-only"] if append_only else [])
    argv += ["--allow-restore"] if allow_restore else []
    out.print(authorized_keys_line(lines[0], argv), markup=False, highlight=False, soft_wrap=True)
    return EXIT_OK


@app.command(hidden=True)
def thaw(
    path: Annotated[str, typer.Argument(help="cgroup v2 directory")],
    seconds: Annotated[float, typer.Argument(help="thaw after this many seconds")],
) -> int:
    """The freeze hook's dead-man switch (started by snapsync itself): thaw PATH after SECONDS."""
    from snapsync.ops.hooks import thaw_after

    return thaw_after(path, seconds)


@app.command("list")
def list_(
    groups: GroupsArg = None,
    local: Annotated[bool, typer.Option("--local", help="Do not ask the targets what they have.")] = False,
    sizes: Annotated[
        bool, typer.Option("--sizes", help="What each snapshot costs (ZFS used/written/referenced; btrfs exclusive/shared, quotas on), and what each target holds.")
    ] = False,
    as_json: JsonOpt = False,
) -> int:
    """List every snapshot of each group's datasets, ours and foreign; then what each target holds and its lag."""
    from snapsync.ops.runner import select_groups

    policy = _load()
    runner = _runner(policy)
    selected = select_groups(policy, groups or []) if policy.groups or groups else []
    pull_names = [] if groups else list(policy.pulls)
    held = {} if local else runner.target_holdings(selected, pulls=pull_names)
    listed = [_list_group(runner, group, held.get(group.name), as_json, sizes) for group in selected]
    pulls = [t for name in pull_names if name in held for t in held[name].targets]
    return _list_end(listed, pulls, as_json)


def _list_group(
    runner: "Runner", group: "Group", holdings: "TargetHoldings | None", as_json: bool, sizes: bool = False
) -> tuple[dict[str, object], bool]:
    """One group of `list`: its JSON entry, and whether it is all well; rendered as it goes unless ``as_json``."""
    from snapsync.cli.render import render_held, render_listing, render_target_state
    from snapsync.plan.naming import parse_snapshot_name

    targets = holdings.targets if holdings is not None else []
    entry: dict[str, object] = {"group": group.name, "backend": group.backend, "datasets": [], "errors": []}
    entry["targets"] = [t.to_json() for t in targets]
    try:
        listing = runner.raw_listing(group)
    except SnapsyncError as e:
        entry["errors"] = [str(e)]
        if not as_json:
            err.print(f"[bold]{group.name}[/]: [red]error:[/] {e}")
        return entry, False
    try:
        reviews = runner.review_holds(group, listing)
    except SnapsyncError as e:
        reviews = {}
        cast(list[str], entry["errors"]).append(f"cannot tell why holds are kept: {e}")
    now = runner.clock.now()

    def why(ds: str, snap: "SnapshotInfo") -> list[str]:
        when = parse_snapshot_name(group.prefix, snap.name)
        future = ["dated after the clock: never sent, pruning waits (see `snapsync check`)"] if when and when > now else []
        return future + (reviews[ds].why(snap) if ds in reviews else [])

    costs: "dict[str, SnapshotSizes]" = {}
    held: "list[Held]" = []
    if sizes:
        try:
            costs = {ds: runner.backend(group).snapshot_sizes(ds) for ds in listing}
        except SnapsyncError as e:
            cast(list[str], entry["errors"]).append(f"cannot tell snapshot sizes: {e}")
        if holdings is not None:
            from snapsync.ops.held import held_on_targets

            down = {t.target: "; ".join(t.errors) or "not reached" for t in targets if not t.reached}
            held = held_on_targets(runner.policy, group, down)
            entry["held"] = [h.to_json() for h in held]
    entry["datasets"] = [
        {
            "dataset": ds,
            "snapshots": [
                {**s.to_json(), "ours": parse_snapshot_name(group.prefix, s.name) is not None, "why": why(ds, s)}
                | ({"sizes": costs[ds].sizes.get(s.name)} if ds in costs else {})
                for s in snaps
            ],
            "lost_holds": reviews[ds].lost if ds in reviews else {},
        } | ({"sizes_note": costs[ds].note} if ds in costs else {})
        for ds, snaps in listing.items()
    ]
    if not as_json:
        render_listing(out, group.name, group.backend, listing, group.prefix, why, costs if sizes else None)
        for ds, review in reviews.items():
            for tag, names in review.lost.items():
                out.print(f"  {ds}: hold {tag} was on {', '.join(names)}, deleted by hand; older snapshots kept "
                          f"until it replicates again", highlight=False)
        for t in targets:
            render_target_state(out, t)
            for h in held:
                if h.target == t.target:
                    render_held(out, h)
    return entry, all(t.ok for t in targets)


def _list_end(listed: list[tuple[dict[str, object], bool]], pulls: "list[TargetReport]", as_json: bool) -> int:
    """The pulls (after every group), or the whole listing as JSON; the exit status of `list`."""
    from snapsync.cli.render import render_target_state

    if as_json:
        print(json.dumps({"groups": [entry for entry, _ in listed], "pulls": [t.to_json() for t in pulls]}))
    else:
        for t in pulls:
            render_target_state(out, t)
    return EXIT_OK if all(ok for _, ok in listed) and all(t.ok for t in pulls) else EXIT_PARTIAL


@app.command()
def check(
    ctx: typer.Context,
    groups: GroupsArg = None,
    local: Annotated[bool, typer.Option("--local", help="Judge this host's snapshots only; do not ask the targets.")] = False,
    no_ping: Annotated[bool, typer.Option("--no-ping", help="Do not ping [monitoring] ping_url.")] = False,
    as_json: JsonOpt = False,
) -> int:
    """Monitoring plugin: is the newest snapshot, here and on every target, fresh enough?

    Each group's newest complete snapshot is judged against its warn_after/crit_after; each target
    is asked what it holds (the target's own thresholds, else the group's); a failed restore drill
    warns. Prints one line (Nagios format, with perfdata) and exits 0 OK, 1 WARNING, 2 CRITICAL,
    3 UNKNOWN (a target that cannot be asked). Pings [monitoring] ping_url, with /fail when not OK
    or WARNING. Takes no lock and changes nothing.
    """
    import os

    from snapsync.ops.check import Status, assess, summary, verdict
    from snapsync.clock import SystemClock
    from snapsync.ops.ping import ping
    from snapsync.ops.runner import select_groups
    from snapsync.retry import attempts as retry_attempts

    with retry_attempts(2):  # a monitoring plugin has a deadline
        try:
            policy = _load()
            selected = select_groups(policy, groups or []) if policy.groups or groups else []
            pulls = [] if groups else list(policy.pulls)
            findings = assess(policy, _runner(policy), selected, pulls, local, SystemClock().now())
        except Exception as e:  # a monitoring plugin answers in its own terms, whatever broke
            if ctx.ensure_object(Options).debug:
                raise
            # a policy that does not load is the operator's to fix now; anything else leaves the verdict unknown
            status = Status.CRITICAL if isinstance(e, SnapsyncError) and e.exit_code == EXIT_USAGE else Status.UNKNOWN
            reason = str(e) if isinstance(e, SnapsyncError) else f"internal error: {type(e).__name__}: {e}"
            line = f"SNAPSYNC {status.name} - {' '.join(reason.split())}"
            findings = []
            policy = None
        else:
            status = verdict(findings)
            line = summary(findings)
        pinged: str | None = None
        url = os.environ.get("SNAPSYNC_PING_URL") or (policy.monitoring.ping_url if policy is not None else None)
        if url and not no_ping:
            timeout = policy.monitoring.ping_timeout.total_seconds() if policy is not None else 10.0
            try:
                ping(url, status in (Status.OK, Status.WARNING), line, timeout)
                pinged = "ok"
            except SnapsyncError as e:
                pinged = str(e)
                err.print(f"snapsync: warning: {e}", markup=False)
    if as_json:
        print(json.dumps({
            "status": status.name, "exit_code": int(status), "summary": line,
            "checks": [f.to_json() for f in findings], "ping": pinged,
        }))
    else:
        print(line)
    return int(status)


@policy_app.command("check")
def policy_check(
    file: Annotated[str | None, typer.Argument(help="Policy file (default: --policy).", show_default=False)] = None,
    syntax_only: Annotated[
        bool, typer.Option("--syntax-only", help="Only parse and validate (a policy for another machine): do not look at the datasets, the hook programs or the file's owner and mode here.")
    ] = False,
    as_json: JsonOpt = False,
) -> int:
    """Validate a policy file and print it fully resolved (defaults merged in).

    Also checks that every dataset exists here and can be snapshotted, unless --syntax-only.
    """
    from snapsync.policy.loader import policy_warnings
    from snapsync.ops.preflight import check_datasets, nested_policy_warnings, receiving_warnings

    policy = _load(file, check_programs=not syntax_only)
    warnings = policy_warnings(policy)
    if not syntax_only:
        check_datasets(policy)
        warnings += nested_policy_warnings(policy) + receiving_warnings(policy)
    if as_json:
        print(json.dumps({"policy": policy.normalized(), "warnings": warnings}))
    else:
        from rich.markup import escape

        from snapsync.errors import printable

        out.print(policy.to_toml(), end="", markup=False, emoji=False)
        for w in warnings:
            err.print(f"[yellow]warning:[/] {escape(printable(w))}", emoji=False)
        err.print(f"{printable(policy.source)}: ok", markup=False, emoji=False)
    return EXIT_OK


def _offsite_target(policy: "Policy", name: str) -> "DirTarget | S3Target":
    from snapsync.errors import UsageError
    from snapsync.policy.schema import DirTarget, S3Target  # noqa: F811

    target = policy.targets.get(name)
    if target is None:
        raise UsageError(f"{policy.source}: no target {name!r} (targets: {', '.join(sorted(policy.targets)) or 'none'})")
    if not isinstance(target, (DirTarget, S3Target)):
        raise UsageError(
            f"target {name!r} is type {target.type!r}; verify reads offsite targets (dir, s3) "
            f"(copies on ssh and local targets are snapshots: check them with `snapsync drill --target {name}`)"
        )
    return target


KeyFileOpt = Annotated[
    str | None, typer.Option("--key-file", help="The offsite key (default: the target's key_file from the policy).")
]


@app.command()
def restore(
    what: Annotated[
        str | None,
        typer.Argument(metavar="GROUP[@SNAPSHOT]", help="The group, and a snapshot (default: the newest complete one).", autocompletion=_complete_groups),
    ] = None,
    every_group: Annotated[
        bool, typer.Option("--all", help="With --in-place: every group of the policy that replicates to --from, one after the other (rebuild a host).")
    ] = False,
    source: Annotated[
        str | None,
        typer.Option("--from", help="The target to restore from: offsite (dir, s3) or another host (ssh, local).", autocompletion=_complete_targets),
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="Where copies land: a directory on btrfs, or a ZFS dataset (pool/restore).")] = None,
    path: Annotated[
        list[str] | None,
        typer.Option("--path", help="Only this file or directory, named as it lives now, into the --to directory: from a snapshot here, "
                                    "or --from a target (repeatable, like restic's --include)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="With --path: rename what is in the way aside (kept), instead of refusing.")
    ] = False,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Restore each dataset where the policy has it (bare-metal recovery); they must not exist.")
    ] = False,
    key_file: KeyFileOpt = None,
    verify_first: Annotated[
        bool, typer.Option("--verify-first", help="Offsite: read and check every chunk before receiving anything (downloads twice).")
    ] = False,
    accept_rollback: Annotated[
        bool, typer.Option("--accept-rollback", help="Offsite: restore the newest snapshot left even when the archive's newest uploads are missing.")
    ] = False,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> int:
    """Bring a group back from a target: into TO/GROUP/DATASET/SNAPSHOT, or --in-place. With --path, one
    file or directory instead, copied into TO with its metadata: from a snapshot on this host, or with
    --from out of the group restored into a throwaway place that is removed afterwards.

    From offsite, the chain (full, then each incremental) is replayed; every manifest is
    authenticated and every chunk object checked before anything is written, and every segment
    before it reaches receive. From another host, one full send of the snapshot per dataset. After
    --in-place the policy takes over: the next run replicates incrementally from the restored
    snapshot. Copies already present are not fetched again.
    """
    from snapsync.errors import UsageError
    from snapsync.host.lock import policy_lock
    from snapsync.recovery.restore import InPlace, restore_from
    from snapsync.ops.runner import select_groups

    if every_group:
        if what is not None or path is not None or to is not None or not in_place or source is None:
            raise UsageError("--all restores every group --in-place --from one target: no GROUP, no --path, no --to")
        return _restore_all(source, key_file, verify_first, accept_rollback, dry_run, as_json)
    if what is None:
        raise UsageError("restore needs a GROUP (or --all with --in-place)")
    if path is not None:
        return _restore_path(what, source, to, path, overwrite, in_place, dry_run, as_json, key_file)
    if source is None:
        raise UsageError("restore needs --from TARGET (a group from a target), or --path PATH (one path from a snapshot here)")
    if (to is None) == (not in_place):
        raise UsageError("restore needs exactly one of --to PATH|DATASET and --in-place")
    policy = _load()
    group, _, snapshot = what.partition("@")
    landing: str | Landing
    if in_place:
        (chosen,) = select_groups(policy, [group])
        landing = InPlace(chosen, _runner(policy).backend(chosen))
    else:
        assert to is not None
        landing = to
    with policy_lock(policy.source, 60.0), _progress(as_json) as progress:  # no prune may run meanwhile
        report = restore_from(
            policy, source, group, landing, snapshot or None, dry_run, progress, key_file, verify_first, accept_rollback
        )
    if as_json:
        print(json.dumps(report.to_json()))
        return EXIT_OK
    verb = "would restore" if dry_run else "restored"
    out.print(f"{verb} {group}@{report.snapshot} from {source} into {report.to} ({report.bytes} bytes, {report.seconds:.1f}s)", markup=False)
    for d in report.datasets:
        out.print(
            f"  {d.source}: chain of {len(d.chain)} ({', '.join(d.chain)}); received {len(d.received)}, "
            f"already there {len(d.present)}", markup=False,
        )
    for problem in report.problems:
        err.print(f"[yellow]warning:[/] elsewhere in the archive: {escape(problem)}")
    return EXIT_OK


def _restore_all(source: str, key_file: str | None, verify_first: bool, accept_rollback: bool, dry_run: bool, as_json: bool) -> int:
    """Every group that replicates to ``source``, in place, in policy order; one that fails does not stop the others."""
    from snapsync.host.lock import policy_lock
    from snapsync.recovery.restore import InPlace, restore_from

    policy = _load()
    runner = _runner(policy)
    results: list[dict[str, object]] = []
    with policy_lock(policy.source, 60.0), _progress(as_json) as progress:
        for group in policy.groups.values():
            if source not in group.targets:
                results.append({"group": group.name, "ok": True, "skipped": f"does not replicate to {source}"})
                continue
            try:
                report = restore_from(policy, source, group.name, InPlace(group, runner.backend(group)), None, dry_run,
                                      progress, key_file, verify_first, accept_rollback)
            except SnapsyncError as e:
                results.append({"group": group.name, "ok": False, "error": str(e)})
                continue
            results.append({"group": group.name, "ok": True, **report.to_json()})
    if as_json:
        print(json.dumps({"groups": results}))
    else:
        verb = "would restore" if dry_run else "restored"
        for r in results:
            if r.get("skipped"):
                out.print(f"{r['group']}: skipped: {r['skipped']}", markup=False)
            elif not r["ok"]:
                out.print(f"{r['group']}: FAILED: {r['error']}", markup=False)
            else:
                out.print(f"{r['group']}: {verb} {r['snapshot']} from {source} in place", markup=False)
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_PARTIAL


def _restore_path(
    what: str, source: str | None, to: str | None, paths: list[str], overwrite: bool, in_place: bool, dry_run: bool, as_json: bool,
    key_file: str | None,
) -> int:
    from snapsync.clock import SystemClock
    from snapsync.errors import UsageError
    from snapsync.recovery.path_restore import restore_path

    if in_place:
        raise UsageError("--path restores into the --to directory, not --in-place")
    if to is None:
        raise UsageError("--path needs --to DIRECTORY")
    if source is not None and dry_run:
        raise UsageError("--path --from has no dry run: it restores the group into a throwaway place first")
    from snapsync.host.lock import policy_lock
    from snapsync.recovery.path_restore import restore_path_from

    policy = _load(check_programs=False)
    group, _, snapshot = what.partition("@")
    with policy_lock(policy.source, 60.0), _progress(as_json) as progress:  # no prune takes the snapshot away meanwhile
        if source is None:
            done = restore_path(policy, _runner(policy), group, snapshot or None, paths, to, SystemClock().now(),
                                overwrite=overwrite, dry_run=dry_run)
        else:
            done = restore_path_from(policy, _runner(policy), source, group, snapshot or None, paths, to, SystemClock().now(),
                                     overwrite=overwrite, key_file=key_file, progress=progress)
    if as_json:
        print(json.dumps({"paths": [d.to_json() for d in done]}))
        return EXIT_OK
    verb = "would restore" if dry_run else "restored"
    for d in done:
        out.print(f"{verb} {d.source} ({d.group}@{d.snapshot}) to {d.to}", markup=False)
        if d.aside:
            out.print(f"  what was at {d.to} {'would be' if dry_run else 'is'} kept at {d.aside}", markup=False)
    return EXIT_OK


@app.command("restore-db")
def restore_db(
    group: Annotated[str, typer.Argument(help="The group whose postgres hook dumps the database.")],
    snapshot: Annotated[str, typer.Argument(help="The snapshot whose dump to restore (see `snapsync list GROUP`).")],
    database: Annotated[str, typer.Argument(help="The one database to bring back; the server's others are not touched.")],
    source: Annotated[
        str | None, typer.Option("--from", help="Read the snapshot from this target (offsite or another host) instead of this host's.")
    ] = None,
    into: Annotated[
        str | None, typer.Option("--into", help="Restore into this server (a libpq connection string) instead of the hook's.")
    ] = None,
    hook: Annotated[int | None, typer.Option("--hook", min=0, help="Which hook's dumps (its index in the group), when several dump it.")] = None,
    terminate: Annotated[
        bool, typer.Option("--terminate", help="Disconnect the sessions still on the database before the swap (default: refuse).")
    ] = False,
    scratch: Annotated[str | None, typer.Option("--scratch", help="With --from: directory for the throwaway filesystem (default /var/tmp).")] = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    lock_timeout: LockTimeoutOpt = 60.0,
) -> int:
    """Bring ONE PostgreSQL database back from a snapshot's dump (the postgres hook's dump mode).

    The dump is restored into a new database, checked, and then swapped in for the live one in one
    transaction; the live one is kept as DATABASE_before_TIME. Nothing else on the server changes, and
    an interruption leaves the live database as it was (run it again). Stop the service using the
    database first, or pass --terminate.
    """
    from contextlib import nullcontext

    from snapsync.clock import SystemClock
    from snapsync.host.lock import policy_lock
    from snapsync.ops.runner import select_groups
    from snapsync.recovery.pgrestore import restore_database

    policy = _load()
    (chosen,) = select_groups(policy, [group])
    backend = _runner(policy).backend(chosen)
    locked = source is not None or not dry_run  # a copy being read from a target must not be pruned meanwhile
    with policy_lock(policy.source, lock_timeout) if locked else nullcontext(), _progress(as_json) as progress:
        report = restore_database(
            policy, chosen, backend, snapshot, database, SystemClock().now(), source=source, into=into, hook_index=hook,
            terminate=terminate, dry_run=dry_run, scratch_parent=scratch, progress=progress,
        )
    if as_json:
        print(json.dumps(report.to_json()))
        return EXIT_OK
    verb = "would restore" if dry_run else "restored"
    dumped = f", dumped {report.dumped_at}" if report.dumped_at else ""
    out.print(f"{verb} database {database} from {group}@{snapshot} ({report.source}: {report.dump}{dumped}):", markup=False, soft_wrap=True)
    for step in report.steps:
        out.print(f"  - {step}", markup=False, soft_wrap=True)
    for note in report.notes:
        out.print(f"  note: {note}", markup=False, soft_wrap=True)
    if not dry_run and report.kept_as:
        out.print(f"the previous state is kept as database {report.kept_as}; when satisfied: DROP DATABASE \"{report.kept_as}\"", markup=False, soft_wrap=True)
    return EXIT_OK


@app.command()
def verify(
    target_name: Annotated[str, typer.Argument(metavar="TARGET", help="The offsite target (dir or s3).", autocompletion=_complete_targets)],
    group: Annotated[list[str] | None, typer.Option("--group", "-g", help="Only these groups (repeatable).")] = None,
    sample: Annotated[int | None, typer.Option("--sample", min=0, help="Read only N random chunks (default: all).")] = None,
    key_file: KeyFileOpt = None,
    as_json: JsonOpt = False,
) -> int:
    """Check an offsite archive without restoring: manifests authenticate, chains are whole, every chunk
    object exists at its size; and every chunk (or a random sample) decrypts and hashes as recorded."""
    from snapsync.offsite.upload import open_archive
    from snapsync.recovery.restore import verify as run_verify

    from snapsync.host.lock import policy_lock

    policy = _load()
    target = _offsite_target(policy, target_name)
    with policy_lock(policy.source, 60.0), _progress(as_json) as progress:  # a prune meanwhile would make chunks vanish mid-check
        report = run_verify(open_archive(target, key_file), target_name, group or None, sample, progress=progress)
    if as_json:
        print(json.dumps(report.to_json()))
    else:
        state = "[green]ok[/]" if report.ok else "[red]FAILED[/]"
        out.print(
            f"{target_name}: {state}: {report.manifests} manifest(s) in {len(report.groups)} group(s), "
            f"{report.chunks_read} of {report.chunks} chunk(s) read ({report.bytes_read} bytes)"
        )
        for problem in report.problems:
            out.print(f"  [red]problem:[/] {escape(problem)}", markup=True, highlight=False)
    return EXIT_OK if report.ok else EXIT_PARTIAL


@app.command()
def keygen(
    path: Annotated[Path, typer.Argument(help="Where to write the new key (refuses to overwrite).")],
) -> int:
    """Create an offsite encryption key (mode 0600). Back it up somewhere that is not this host:
    without it, nothing uploaded with it can be restored."""
    from snapsync.offsite.sealing import create_key_file

    key = create_key_file(path)
    out.print(f"wrote {path} (key id {key.key_id}); back it up now, e.g. print it or store it in a password manager")
    return EXIT_OK


@app.command()
def drill(
    groups: GroupsArg = None,
    target: Annotated[
        list[str] | None,
        typer.Option("--target", "-t", help="Only these targets (repeatable; default: every target of each group).", autocompletion=_complete_targets),
    ] = None,
    scratch: Annotated[str | None, typer.Option("--scratch", help="Directory for the throwaway filesystem (default /var/tmp; sparse).")] = None,
    as_json: JsonOpt = False,
    lock_timeout: LockTimeoutOpt = 60.0,
) -> int:
    """Restore test: restore each group's newest snapshot from each target into a throwaway
    filesystem, compare files with the source snapshot, check SQLite databases and start PostgreSQL
    on the copy; record the result for monitoring, clean up. Exit 1 if any drill failed."""
    from snapsync.clock import SystemClock
    from snapsync.recovery.drill import drill as run_drill
    from snapsync.host.lock import policy_lock
    from snapsync.ops.runner import select_groups, select_targets

    policy = _load()
    selected = select_groups(policy, groups or [])
    if target:
        select_targets(policy, target)
    runner = _runner(policy)
    reports = []
    from snapsync.host.logs import log_drills
    from snapsync.ops.metrics import record_drills

    with policy_lock(policy.source, lock_timeout), _progress(as_json) as progress:
        for group in selected:
            for name in group.targets:
                if target and name not in target:
                    continue
                reports.append(run_drill(policy, group, name, runner.backend(group), SystemClock().now(), scratch_parent=scratch, progress=progress))
        record_drills(policy, reports, SystemClock().now())
    log_drills(reports)
    if as_json:
        print(json.dumps({"drills": [r.to_json() for r in reports]}))
    else:
        for r in reports:
            state = "[green]ok[/]" if r.ok else "[red]FAILED[/]"
            out.print(f"[bold]{r.group}[/] from {r.target}: {state} ({r.snapshot or 'no snapshot'}, {r.seconds:.1f}s)")
            if r.error:
                out.print(f"  [red]error:[/] {r.error}", highlight=False)
            for c in r.checks:
                out.print(f"  {'ok ' if c.ok else '[red]BAD[/]'} {c.name}: {c.detail}", highlight=False)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_PARTIAL


@app.command()
def rollback(
    group: Annotated[str, typer.Argument(help="The group to roll back.", autocompletion=_complete_groups)],
    snapshot: Annotated[
        str | None,
        typer.Argument(help="The snapshot to return to (see `snapsync list GROUP`); not needed with --abort.", autocompletion=_complete_snapshots),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Roll back (or abort) even while processes use the data (they keep their old files; bind mounts are re-pointed either way).")] = False,
    abort: Annotated[
        bool, typer.Option("--abort", help="Undo an interrupted rollback: every dataset back as it was, the safety snapshot kept.")
    ] = False,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
    lock_timeout: LockTimeoutOpt = 60.0,
) -> int:
    """Return every dataset of GROUP to SNAPSHOT, together, destroying nothing.

    Takes a held safety snapshot of the current state first and moves the current state aside;
    re-points the bind mounts of the data (impermanence) at the rolled-back state; refuses while
    processes use the data (naming the units to stop) unless --force, and a mount inside it always.
    Run it again to finish one that was interrupted, or pass --abort to undo that one instead.
    """
    from contextlib import nullcontext

    from snapsync.clock import SystemClock
    from snapsync.errors import UsageError
    from snapsync.host.lock import policy_lock
    from snapsync.recovery.rollback import abort as run_abort
    from snapsync.recovery.rollback import rollback as run_rollback
    from snapsync.ops.runner import select_groups

    if snapshot is None and not abort:
        raise UsageError(f"name the snapshot to return to (`snapsync list {group}`), or pass --abort to undo an interrupted rollback")
    policy = _load()
    (chosen,) = select_groups(policy, [group])
    backend = _runner(policy).backend(chosen)
    with nullcontext() if dry_run else policy_lock(policy.source, lock_timeout):
        if abort:
            undone = run_abort(chosen, backend, snapshot, force=force, dry_run=dry_run)
        else:
            assert snapshot is not None
            report = run_rollback(chosen, backend, snapshot, SystemClock().now(), force=force, dry_run=dry_run)
    if abort:
        if as_json:
            print(json.dumps(undone.to_json()))
            return EXIT_OK
        out.print(f"{'would undo' if dry_run else 'undid'} the interrupted rollback of {group} to {undone.snapshot}:", markup=False)
        for step in undone.steps:
            out.print(f"  - {step}", markup=False)
        for note in undone.notes:
            out.print(f"  note: {note}", markup=False)
        return EXIT_OK
    if as_json:
        print(json.dumps(report.to_json()))
        return report.blocked_exit
    out.print(f"{'would roll' if dry_run else 'rolled'} {group} back to {snapshot}:", markup=False)
    for step in report.steps:
        out.print(f"  - {step}", markup=False)
    for what in report.rebound:
        out.print(f"  re-pointed: {what}", markup=False)
    for note in report.notes:
        out.print(f"  note: {note}", markup=False)
    for why in report.blocked:
        err.print(f"snapsync: a rollback now would be refused: {why}", markup=False, soft_wrap=True)
    if not dry_run:
        safety = (
            f" and as safety snapshot {report.safety} (held on {', '.join(report.safety_on)}); when satisfied: "
            f"snapsync release {group} {report.safety} --delete-aside" if report.safety_on else "; no safety snapshot is held"
        )
        out.print(f"the previous state is kept beside each dataset ({', '.join(report.aside.values())}){safety}", markup=False)
    return report.blocked_exit


@app.command()
def release(
    group: Annotated[str, typer.Argument(help="The group.", autocompletion=_complete_groups)],
    snapshot: Annotated[str, typer.Argument(help="The safety snapshot a rollback took.", autocompletion=_complete_snapshots)],
    delete_aside: Annotated[
        bool, typer.Option("--delete-aside", help="Also delete the states that rollback moved aside (refused while anything uses them).")
    ] = False,
    as_json: JsonOpt = False,
) -> int:
    """Release a rollback's safety snapshot, so retention may prune it like any other.

    With --delete-aside, the states the rollback moved aside (DATASET.pre-rollback.SNAPSHOT) are
    deleted too, after checking that no process and no mount (a bind mount left on one) uses them.
    """
    from snapsync.host.lock import policy_lock
    from snapsync.ops.runner import select_groups
    from snapsync.plan.holds import safety_tag
    from snapsync.recovery.rollback import delete_asides
    from snapsync.recovery.rollback import release as run_release

    policy = _load()
    (chosen,) = select_groups(policy, [group])
    backend = _runner(policy).backend(chosen)
    deleted: list[str] = []
    with policy_lock(policy.source, 60.0):
        if delete_aside:
            delete_asides(backend, chosen.datasets, snapshot, dry_run=True)  # refused, while in use, before the release
        released = run_release(backend, chosen.datasets, snapshot)
        if delete_aside:
            deleted = delete_asides(backend, chosen.datasets, snapshot)
    if as_json:
        print(json.dumps({"group": group, "safety_snapshot": snapshot, "released_on": released, "deleted_asides": deleted}))
        return EXIT_OK
    out.print(f"released {safety_tag(snapshot)} on {len(released)} dataset(s) of {group}", markup=False)
    for aside in deleted:
        out.print(f"deleted {aside}", markup=False)
    return EXIT_OK


@app.command()
def adopt(
    paths: Annotated[list[str], typer.Argument(metavar="PATH", help="Plain directories to make datasets of their own.", show_default=False)],
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> int:
    """Turn plain directories into btrfs subvolumes in place, so that a group can list them.

    Each directory's files are copied into a new subvolume beside it sharing every block
    (cp --reflink=always: no data is copied), compared with the original (modes, owners, ACLs,
    xattrs, hard links, holes, timestamps), and swapped in by one atomic rename; the original is
    kept as PATH.snapsync-adopt-old until you delete it. Refuses while anything uses a directory,
    printing the commands to stop its services and unmount its bind mounts (and to undo that
    afterwards). Run it again to finish one that was stopped. On ZFS it prints how to do it by hand.
    """
    from snapsync.ops.adopt import adopt as run_adopt
    from snapsync.ops.adopt import busy_message

    try:
        policy: Policy | None = _load(check_programs=False)
    except SnapsyncError:
        policy = None  # adopt needs no policy; with one, it says what the policy needs next
    reports = run_adopt(paths, dry_run=dry_run, policy=policy)
    if as_json:
        print(json.dumps({"dry_run": dry_run, "paths": [r.to_json() for r in reports]}))
        return EXIT_OK if all(r.ok for r in reports) else EXIT_PARTIAL
    for r in reports:
        a = r.adoption
        if a.state == "adopted" and not a.steps:
            kept = f" (its original directory is still at {a.kept})" if a.kept else ""
            out.print(f"{a.path}: already a {a.called}{kept}", markup=False, soft_wrap=True)
        elif r.error is not None:
            err.print(f"snapsync: error: {a.path}: not adopted: {r.error}", markup=False, soft_wrap=True)
        else:
            verb = ("would finish" if dry_run else "finished") + " the stopped adopt of" if a.state == "interrupted" else (
                "would adopt" if dry_run else "adopted")
            out.print(f"{verb} {a.path}" + ("" if dry_run else f": it is a {a.called} now") + (":" if dry_run else ""), markup=False, soft_wrap=True)
            for step in a.steps if dry_run else ():
                out.print(f"  - {step}", markup=False, soft_wrap=True)
        if dry_run and r.holders:
            out.print(f"  in use now, so adopt would refuse: {busy_message(a.path, r.holders)}", markup=False, soft_wrap=True)
        for note in (*a.notes, *r.notes) if r.error is None else ():
            out.print(f"  note: {note}", markup=False, soft_wrap=True)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_PARTIAL


@app.command()
def demo(
    days: Annotated[int, typer.Option(min=1, max=400, help="Simulated days of hourly runs.")] = 45,
    as_json: JsonOpt = False,
) -> int:
    """Self-contained demo on a throwaway file-backed btrfs (needs root).

    Simulates DAYS of hourly `snapsync run` with an injected clock on an embedded policy, then prints
    what retention kept and why. Everything is unmounted and deleted afterwards, also on Ctrl-C.
    """
    from snapsync.ops.demo import run_demo

    return run_demo(days=days, console=out, as_json=as_json)


def _fail(message: str, code: int, as_json: bool) -> NoReturn:
    from snapsync.errors import printable

    if as_json:
        print(json.dumps({"error": message, "exit_code": code}))
    else:
        err.print(f"snapsync: error: {printable(message, limit=4000)}", markup=False, emoji=False)
    sys.exit(code)


class _Stopped:
    """The signal that stopped this run, for the exit status (typer turns every interrupt into 130)."""

    signum: int | None = None


def _interrupt(signum: int, frame: object) -> None:
    _Stopped.signum = signum
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _stop_like_sigint() -> None:
    """SIGTERM (systemd's stop) and SIGHUP (a lost terminal) take SIGINT's way out: an exception that
    every ``finally`` sees, so hooks' posts run, children are killed, locks released, cgroups thawed.
    A signal the caller ignores (``nohup``, a background job) stays ignored."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(signum, _interrupt)


def _stopped() -> NoReturn:
    signum = _Stopped.signum or signal.SIGINT
    try:
        err.print(f"snapsync: interrupted by {signal.Signals(signum).name}")
    except OSError:  # the terminal that sent SIGHUP is gone
        pass
    sys.exit(128 + signum)


class _Stdout:
    """Standard output that a reader who stopped reading cannot break: ``snapsync list | head`` ends
    quietly with the command's own status, and a ``run`` whose output nobody reads any more still
    finishes its work (post hooks above all). From the first EPIPE on, output goes to /dev/null."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._reader_gone()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._reader_gone()

    def _reader_gone(self) -> None:
        self.gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self.stream.fileno())  # what the stream still holds drains there at exit
        finally:
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _reflow(doc: str) -> str:
    """A docstring's paragraphs as single lines: the terminal wraps them, not the source's line breaks."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(doc))
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def _reflow_help() -> None:
    for typer_app in (app, policy_app):
        for info in typer_app.registered_commands:
            if info.callback is not None and info.callback.__doc__:
                info.callback.__doc__ = _reflow(info.callback.__doc__)


def main(argv: list[str] | None = None) -> NoReturn:
    _reflow_help()
    stdout = sys.stdout
    sys.stdout = cast(IO[str], _Stdout(stdout))
    try:
        _run(argv)
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


def _run(argv: list[str] | None) -> NoReturn:
    args = sys.argv[1:] if argv is None else argv
    _stop_like_sigint()
    as_json = "--json" in args
    options = Options()
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name="snapsync", standalone_mode=False, obj=options)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _stopped()
    except SnapsyncError as e:
        _fail(str(e), e.exit_code, as_json)
    except typer.TyperException as e:  # click's usage errors, as vendored by typer
        e.show()  # type: ignore[attr-defined]
        sys.exit(EXIT_USAGE)
    except Exception as e:
        if options.debug:
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", EXIT_PARTIAL, as_json)
    if rv == 130:  # typer's word for a KeyboardInterrupt, whichever signal raised it
        _stopped()
    sys.exit(rv if isinstance(rv, int) else EXIT_OK)

