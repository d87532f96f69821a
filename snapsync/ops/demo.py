"""``snapsync demo``: the real runner, on a real (throwaway) btrfs, with a simulated clock.

Everything a user's cron would do happens for real — snapshots, retention, deletion — only time is
simulated, so weeks of hourly runs fit in a few seconds. A foreign snapshot made by hand at the start
shows that snapsync never touches what it did not create.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from string import Template

from rich.console import Console
from rich.progress import Progress

from snapsync.clock import ManualClock
from snapsync.errors import EXIT_OK, EXIT_PARTIAL
from snapsync.policy.loader import Policy, parse_policy
from snapsync.policy.schema import DirTarget
from snapsync.cli.render import render_reports, render_target_state
from snapsync.replication.replicate import Sent
from snapsync.ops.runner import GroupReport, Runner
from snapsync.backends.scratch import create_subvolume, scratch_btrfs
from snapsync.offsite.sealing import create_key_file

START = datetime(2026, 9, 15, tzinfo=UTC)
FOREIGN = "before-upgrade (manual)"


PLUGGED_IN_HOURS = 24
"""The backup disk is plugged in for the last day only: its first run catches up on weeks of history
(one full send, then every snapshot incrementally), the later ones send one snapshot each."""
OFFSITE_HOURS = 73
"""The offsite directory is reachable from Berlin midnight three days before the end (23:00 UTC): its
first upload is the newest snapshot as a full stream, then one incremental per snapshot, with a new
chain every day."""


def _toml(path: Path) -> str:
    return json.dumps(str(path))[1:-1]


def demo_policy(root: Path, usb: Path) -> Policy:
    text = files("snapsync").joinpath("data/demo.toml").read_text()
    return parse_policy(Template(text).substitute(root=_toml(root), usb=_toml(usb)), source="<demo policy>")


def _populate(policy: Policy) -> None:
    for group in policy.groups.values():
        for dataset in group.datasets:
            path = Path(dataset)
            path.parent.mkdir(parents=True, exist_ok=True)
            create_subvolume(path)
            (path / "state.log").write_text(f"{path.name} created\n")


def run_demo(days: int, console: Console, as_json: bool = False) -> int:
    with scratch_btrfs("512M", label="snapsync-demo") as root, \
            scratch_btrfs("512M", label="snapsync-demo-usb") as usb:
        policy = demo_policy(root, usb)
        (usb / "drhorrible").mkdir()
        (usb / "offsite").mkdir()
        create_key_file(root / "offsite.key")
        _populate(policy)
        clock = ManualClock(START)
        runner = Runner(policy, clock)
        forge = policy.groups["forge"]
        runner.backend(forge).snapshot_group(forge.datasets[:1], FOREIGN)
        foreign = Path(runner.backend(forge).snapshot_home(forge.datasets[0])) / FOREIGN

        taken = deleted = 0
        sends: list[Sent] = []
        uploads: list[Sent] = []
        failures: list[str] = []
        hours = days * 24
        with Progress(console=console, transient=True, disable=as_json) as progress:
            task = progress.add_task(f"simulating {days} days of hourly runs", total=hours)
            for hour in range(hours):
                for dataset in forge.datasets:
                    with open(Path(dataset) / "state.log", "a") as f:
                        f.write(f"{clock.now().isoformat()}\n")
                reachable = [name for name, since in (("usb", PLUGGED_IN_HOURS), ("offsite", OFFSITE_HOURS)) if hour >= hours - since]
                for report in runner.run(
                    policy.groups.values(), take=True, only_due=True, prune=True, replicate=bool(reachable),
                    targets=reachable,
                ):
                    taken += report.snapshot is not None
                    deleted += len(report.deleted)
                    failures += [f"{report.group}: {e}" for e in report.errors]
                    for t in report.targets:
                        (uploads if t.target == "offsite" else sends).extend(t.sent)
                        failures += [f"{report.group} -> {t.target}: {e}" for e in t.errors]
                clock.advance(timedelta(hours=1))
                progress.advance(task)

        final = runner.run(
            policy.groups.values(), take=False, only_due=False, prune=True, dry_run=True, replicate=True,
            prune_targets=False,
        )
        offsite = _offsite_check(policy, runner, usb, uploads, failures)
        on_disk = {g.name: {d: len(runner.backend(g).list_snapshots(d)) for d in g.datasets} for g in policy.groups.values()}
        foreign_kept = foreign.exists()
        summary = {
            "simulated": {"start": START.isoformat(), "end": clock.now().isoformat(), "days": days},
            "taken": taken,
            "deleted": deleted,
            "foreign_snapshot_untouched": foreign_kept,
            "snapshots_on_disk": on_disk,
            "replicated": {
                "sends": len(sends),
                "full": sum(1 for x in sends if x.base is None),
                "bytes": sum(x.bytes for x in sends),
                "targets": [t.to_json() for r in final for t in r.targets],
            },
            "offsite": offsite,
            "groups": [r.to_json() for r in final],
            "errors": failures,
        }
        if as_json:
            print(json.dumps(summary))
        else:
            _print(console, days, root, taken, deleted, final, on_disk, foreign_kept, failures)
            _print_replication(console, sends, final)
            _print_offsite(console, offsite)
    if not as_json:
        console.print("cleaned up: unmounted and deleted the demo filesystem")
    return EXIT_OK if not failures and foreign_kept else EXIT_PARTIAL


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()
    }


def _offsite_check(policy: Policy, runner: Runner, usb: Path, uploads: list[Sent], failures: list[str]) -> dict[str, object]:
    """What a sysadmin should do after setting up offsite: verify the archive, and restore from it."""
    from snapsync.offsite.upload import open_archive
    from snapsync.protocol import dataset_key
    from snapsync.recovery.restore import restore, verify

    target = policy.targets["offsite"]
    assert isinstance(target, DirTarget)
    archive = open_archive(target)
    checked = verify(archive, "offsite")
    failures += [f"offsite verify: {p}" for p in checked.problems]
    (usb / "restored").mkdir()
    restored = restore(archive, "offsite", "forge", str(usb / "restored"))
    forge = policy.groups["forge"]
    identical = all(
        _digest(usb / "restored" / "forge" / dataset_key(ds) / restored.snapshot)
        == _digest(Path(runner.backend(forge).snapshot_home(ds)) / restored.snapshot)
        for ds in forge.datasets
    )
    if not identical:
        failures.append("offsite restore: restored files differ from the source snapshot")
    return {
        "uploads": len(uploads),
        "full": sum(1 for u in uploads if u.base is None),
        "verify": checked.to_json(),
        "restore": restored.to_json(),
        "restored_identical": identical,
    }


def _print_offsite(console: Console, offsite: dict[str, object]) -> None:
    checked = offsite["verify"]
    restored = offsite["restore"]
    assert isinstance(checked, dict) and isinstance(restored, dict)
    console.print(
        f"\n[bold]offsite[/] (an encrypted archive in a directory, reachable for the last {OFFSITE_HOURS} hours, "
        f"a new chain every day): {offsite['uploads']} uploads, {offsite['full']} of them full; "
        f"verify read all {checked['chunks_read']} chunks of the {checked['manifests']} uploads retention kept: "
        f"{'[green]ok[/]' if checked['ok'] else '[red]FAILED[/]'}"
    )
    chains = ", ".join(str(len(d["chain"])) for d in restored["datasets"])
    console.print(
        f"restored forge@{restored['snapshot']} from it (chains of {chains} streams) into a fresh directory: "
        f"{'[green]byte-identical[/] to the source snapshot' if offsite['restored_identical'] else '[red]DIFFERENT[/]'}"
    )


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


def _print_replication(console: Console, sends: list[Sent], final: list[GroupReport]) -> None:
    full = sum(1 for s in sends if s.base is None)
    size = sum(s.bytes for s in sends)
    console.print(
        f"\n[bold]replication[/] to the USB disk (a second btrfs, plugged in for the last {PLUGGED_IN_HOURS} hours): "
        f"{len(sends)} sends, {full} full (the first of each dataset) and {len(sends) - full} incremental, "
        f"{size / 1024:.0f} KiB in all; each copy checked read-only with the sender's uuid before it counts"
    )
    for report in final:
        console.print(f"[bold]{report.group}[/]:")
        for t in report.targets:
            render_target_state(console, t)
