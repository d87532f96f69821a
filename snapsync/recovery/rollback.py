"""``snapsync rollback GROUP SNAPSHOT``: return every dataset of a group to one snapshot, together.

Nothing is destroyed. Before touching anything a *safety snapshot* of the current state is taken
and held (``safety:<name>``) until ``snapsync release``; each dataset's current state is moved
aside (btrfs: the subvolume is renamed, ZFS: the dataset, after a clone of the snapshot was
promoted) and the snapshot's state takes its place. Every snapshot stays, so the targets' bases
stay too: btrfs targets continue incrementally from the newest common snapshot; a ZFS target that
already holds snapshots newer than the chosen one sees a diverged history (the report names it).

A dataset in use (a process with a file, directory or mapping in it, through any mount of it, or a
mount inside it) is refused unless ``--force``, with the processes, their systemd units and what to
stop. Only the group's own datasets are touched: NixOS rolls ``/`` back at boot by itself.

A journal in the state directory says how far a rollback got. Whatever stopped it (a kill, an I/O
error), running it again finishes it: the safety snapshot is first made sure of on every dataset
(taken where it is missing and the dataset still untouched, held where the hold is missing), then
the datasets not yet swapped are. ``rollback GROUP --abort`` instead puts every dataset back as it
was, keeping the safety snapshot held. Both can themselves be stopped at any step and run again.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from snapsync.backends.base import SnapshotInfo, StorageBackend
from snapsync.backends.binds import Bind, binds_of, namespace_refusal, rebind
from snapsync.backends.usage import Holder
from snapsync.errors import SnapsyncError, UsageError
from snapsync.host.state import read_json, state_dir, write_json
from snapsync.recovery.pending import journal_path
from snapsync.plan.holds import is_safety_tag, is_target_tag, safety_tag, tag_subject, target_tag
from snapsync.plan.naming import parse_snapshot_name, snapshot_name
from snapsync.policy.loader import Group

log = logging.getLogger(__name__)
KILL_AT = "SNAPSYNC_TEST_KILL_AT"


def reached(step: str) -> None:
    """A step of a rollback (or of its abort) is done: logged (``-v``), and, for tests only, the
    process is SIGKILLed here when ``$SNAPSYNC_TEST_KILL_AT`` names the step, so tests/faults can stop
    a real run at every step. The backends' rollback methods call their own copy of this."""
    log.info("rollback step: %s", step)
    if os.environ.get(KILL_AT) == step:
        os.kill(os.getpid(), signal.SIGKILL)


PLANNED, HELD = "planned", "held"
"""The journal's phases: nothing is sure yet; the safety snapshot is taken and held on every
dataset, and only now may a dataset be swapped. ``"aborting": true`` beside them: an ``--abort``
is putting every dataset back."""


def _leaf(dataset: str) -> str:
    return dataset.rstrip("/").rpartition("/")[2]


class Busy(UsageError):
    """The group's data is in use; nothing was done."""


@dataclass
class RollbackReport:
    group: str
    snapshot: str
    dry_run: bool
    safety: str = ""
    steps: list[str] = field(default_factory=list)
    holders: list[Holder] = field(default_factory=list)
    aside: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    safety_on: list[str] = field(default_factory=list)
    """The datasets whose safety snapshot was seen there and held when the run ended: all a report may claim."""
    kept: dict[str, str] = field(default_factory=dict)
    """States an interrupted ``--abort`` moved away (they were in place, and may have been used)."""
    binds: dict[str, list[Bind]] = field(default_factory=dict)
    """Per dataset, the bind mounts of it elsewhere, re-pointed at the rolled-back state."""
    blocked: list[str] = field(default_factory=list)
    """Why a real run would refuse now (a dry run shows the plan anyway)."""
    rebound: list[str] = field(default_factory=list)
    """The bind mounts this run re-pointed."""
    blocked_exit: int = 0
    """The exit code a real run would refuse with now (0: none); a dry run exits with it after its plan."""

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group, "snapshot": self.snapshot, "dry_run": self.dry_run, "ok": not self.blocked,
            "safety_snapshot": self.safety if self.safety_on or self.dry_run else "", "safety_held_on": self.safety_on,
            "steps": self.steps, "blocked": self.blocked, "rebound": self.rebound,
            "binds": {ds: [b.to_json() for b in bs] for ds, bs in self.binds.items() if bs},
            "aside": self.aside, "kept": self.kept, "notes": self.notes, "in_use": [h.to_json() for h in self.holders],
        }


@dataclass
class AbortReport:
    """What ``rollback GROUP --abort`` did (or would do): every dataset back as it was."""

    group: str
    snapshot: str
    dry_run: bool
    safety: str = ""
    safety_on: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rebound: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group, "snapshot": self.snapshot, "aborted": not self.dry_run, "dry_run": self.dry_run,
            "ok": True, "safety_snapshot": self.safety if self.safety_on else "", "safety_held_on": self.safety_on,
            "steps": self.steps, "kept": self.kept, "notes": self.notes, "rebound": self.rebound,
        }


def aside_name(dataset: str, safety: str) -> str:
    """Where the current state goes: beside the dataset, named after the safety snapshot."""
    return f"{dataset.rstrip('/')}.pre-rollback.{safety}"


def kept_name(dataset: str, safety: str) -> str:
    """Where ``--abort`` keeps a state the rollback had already put in place: it was live, so may hold new writes."""
    return f"{dataset.rstrip('/')}.aborted-rollback.{safety}"


def _stop_hint(found: list[Holder]) -> str:
    units = sorted({h.unit for h in found if h.unit and not h.unit.endswith(".scope")})
    if units:
        return f"stop them first: systemctl stop {' '.join(units)}"
    return "stop them first (or pass --force)"


def _plan_path(group: str) -> Path:
    return journal_path(group)


def _taken_path() -> Path:
    return state_dir() / "rollback" / "safety.json"


def _taken() -> dict[str, list[str]]:
    """The safety snapshots taken per dataset and not yet released: where a rollback leaves its safety
    snapshot aside (ZFS), on a dataset whose name only this record knows."""
    data = (read_json(_taken_path()) or {}).get("taken")
    if not isinstance(data, dict):
        return {}
    return {str(ds): [str(n) for n in names] for ds, names in data.items() if isinstance(names, list)}


def _record(datasets: Sequence[str], safety: str, *, taken: bool) -> None:
    record = _taken()
    for ds in datasets:
        names = [n for n in record.get(ds, []) if n != safety] + ([safety] if taken else [])
        if names:
            record[ds] = names
        else:
            record.pop(ds, None)
    write_json(_taken_path(), {"taken": record})


def rollback(
    group: Group,
    backend: StorageBackend,
    snapshot: str,
    now: datetime,
    *,
    force: bool = False,
    dry_run: bool = False,
) -> RollbackReport:
    """Roll ``group`` back to ``snapshot`` (see the module docstring).

    The plan (safety snapshot, where each dataset goes aside, the targets' holds) is journaled in the
    state directory before anything changes and removed when all is done; a run after a crash finds
    it and finishes the same rollback instead of starting another.
    """
    if parse_snapshot_name(group.prefix, snapshot) is None:
        raise UsageError(f"{snapshot!r} is not one of group {group.name}'s snapshots (prefix {group.prefix!r})")
    pending = read_json(_plan_path(group.name))
    if pending is not None and pending.get("snapshot") != snapshot:
        other = str(pending.get("snapshot"))
        raise UsageError(
            f"an interrupted rollback of group {group.name} to {other} is unfinished; finish it first with "
            f"`snapsync rollback {group.name} {other}`, or undo it with `snapsync rollback {group.name} --abort`"
        )
    if pending is not None:
        return _resume(group, backend, snapshot, pending, force, dry_run)
    listings = {ds: {s.name: s for s in backend.list_snapshots(ds)} for ds in group.datasets}
    missing = [ds for ds, snaps in listings.items() if snapshot not in snaps]
    if missing:
        raise UsageError(f"group {group.name}: no snapshot {snapshot} of {', '.join(missing)} (`snapsync list {group.name}`)")
    safety = snapshot_name(group.prefix, now)
    while any(safety in snaps for snaps in listings.values()):  # a snapshot taken this very second
        now += timedelta(seconds=1)
        safety = snapshot_name(group.prefix, now)
    report = RollbackReport(group.name, snapshot, dry_run, safety)
    report.holders = backend.in_use(group.datasets)
    report.binds = {ds: _binds(backend, ds) for ds in group.datasets}
    report.steps.append(
        f"take safety snapshot {safety} of {', '.join(group.datasets)}, held as {safety_tag(safety)} "
        f"until `snapsync release {group.name} {safety}`"
    )
    for ds in group.datasets:
        report.aside[ds] = aside_name(ds, safety)
        report.steps.append(f"move {ds} aside to {report.aside[ds]}")
        report.steps.append(f"put {snapshot}'s state in place at {ds} ({backend.capabilities.rollback_copy})")
        report.steps += [f"re-point bind mount {b.point} at {b.shows(ds)} (it would show the state moved aside)" for b in report.binds[ds]]
    report.notes += _target_notes(group, backend, listings, snapshot)
    refusals = _refusals(group, backend, snapshot, report.aside, report.holders, report.binds, force)
    report.blocked = [str(e) for e in refusals]
    report.blocked_exit = refusals[0].exit_code if refusals else 0
    if dry_run:
        return report
    if refusals:
        raise _joined(refusals)
    if any(h.kind == "process" for h in report.holders):
        report.notes.append(
            "in use, rolled back anyway (--force): " + "; ".join(h.describe() for h in report.holders if h.kind == "process")
            + " (their open files and directories stay in the state moved aside: restart them)"
        )
    held = {
        ds: tags for ds, snaps in listings.items()
        if (tags := _tags_holding(snaps.values(), is_target_tag))
    }
    plan = {
        "snapshot": snapshot, "safety": safety, "aside": report.aside, "phase": PLANNED, "holds": held,
        "binds": {ds: [b.to_json() for b in bs] for ds, bs in report.binds.items()},
    }
    write_json(_plan_path(group.name), plan)
    _record(group.datasets, safety, taken=True)
    reached("journal written")
    backend.snapshot_group(group.datasets, safety)
    reached("safety snapshot taken")
    for ds in group.datasets:
        backend.set_holds(ds, safety_tag(safety), [safety])
        reached(f"safety held {_leaf(ds)}")
    report.safety_on = list(group.datasets)
    _set_phase(group.name, plan, HELD)
    reached("safety verified")
    return _swap_all(group, backend, snapshot, report, force)


def _binds(backend: StorageBackend, ds: str) -> list[Bind]:
    root = backend.files_root(ds)
    return binds_of(root) if root is not None and backend.exists(ds) else []


def _journaled_binds(group: str, plan: dict[str, Any]) -> dict[str, list[Bind]]:
    """The binds the journal recorded before anything changed (none in a journal from before binds were)."""
    found = plan.get("binds") or {}
    try:
        return {str(ds): [Bind.from_json(b) for b in bs] for ds, bs in found.items() if isinstance(bs, list)}
    except (KeyError, TypeError, AttributeError) as e:
        raise UsageError(
            f"the journal of the interrupted rollback ({_plan_path(group)}) has a bind mount entry "
            f"that is not one snapsync wrote ({e!r}): look at the mounts, then fix or move the journal away"
        ) from e


def _refusals(
    group: Group, backend: StorageBackend, snapshot: str, aside: dict[str, str], holders: list[Holder],
    binds: dict[str, list[Bind]], force: bool, check: Sequence[str] | None = None,
) -> list[SnapsyncError]:
    """Every reason not to start now, each the error a real run raises (a dry run lists them): all
    found before the first change, so a group is never left half rolled back by a refusal.

    A bind mount of the data is no reason: it is re-pointed. A mount inside the data is, always
    (it would stay on the state moved aside, --force or not); processes are, unless ``force``.
    ``check``: the datasets the backend checks (those not swapped yet, when finishing).
    """
    points = {b.point for bs in binds.values() for b in bs}
    errors: list[SnapsyncError] = []
    inside = [h for h in holders if h.kind == "mount" and h.path not in points]
    if inside:
        q = " ".join(shlex.quote(h.path) for h in reversed(inside))
        errors.append(Busy(
            f"group {group.name}: {'; '.join(h.describe() for h in inside)}; a rollback would leave it on the state "
            f"moved aside (--force does not change this): first `umount {q}`, then roll back, then mount it again"
        ))
    processes = [h for h in holders if h.kind == "process"]
    if processes and not force:
        errors.append(_busy(group.name, processes))
    for ds in group.datasets if check is None else check:
        try:
            backend.check_rollback(ds, snapshot, aside[ds])
        except SnapsyncError as e:
            errors.append(e)
    elsewhere = namespace_refusal(sorted(points))
    if elsewhere is not None:
        errors.append(elsewhere)
    return errors


def _joined(errors: list[SnapsyncError]) -> SnapsyncError:
    if len(errors) == 1:
        return errors[0]
    joined = type(errors[0])("; ".join(str(e) for e in errors) + "; nothing was changed")
    joined.exit_code = errors[0].exit_code
    return joined


def _repoint(ds: str, binds: list[Bind], root: str | None, force: bool, done: list[str]) -> None:
    """Every bind mount of ``ds`` shows its state now (after a swap, or after an undo)."""
    if not binds:
        return
    if root is None:
        raise SnapsyncError(f"{ds}: is not mounted, so its bind mounts ({', '.join(b.point for b in binds)}) cannot be re-pointed; mount it and run the command again")
    for bind in binds:
        what = rebind(bind, root, lazy=force, step=reached)
        if what:
            done.append(what)


def _set_phase(group: str, plan: dict[str, Any], phase: str) -> None:
    plan["phase"] = phase
    write_json(_plan_path(group), plan)


def _tags_holding(snaps: Iterable[SnapshotInfo], wanted: Callable[[str], bool]) -> dict[str, list[str]]:
    """Per tag that ``wanted`` accepts, the snapshots of one dataset it holds."""
    tags: dict[str, list[str]] = {}
    for snap in snaps:
        for tag in snap.holds:
            if wanted(tag) and snap.kind == "snapshot":
                tags.setdefault(tag, []).append(snap.name)
    return tags


def _busy(group: str, found: list[Holder]) -> Busy:
    lines = "; ".join(h.describe() for h in found[:8])
    more = f" (and {len(found) - 8} more)" if len(found) > 8 else ""
    return Busy(f"group {group} is in use: {lines}{more}; {_stop_hint(found)}, or pass --force")


def _state(backend: StorageBackend, ds: str, aside: str, kept: str) -> str:
    """How far the swap of ``ds`` got, as the filesystem shows it."""
    here, moved = backend.exists(ds), backend.exists(aside)
    if here and moved:
        return "rolled back"
    if here:
        return "not rolled back yet"
    if moved:
        return "moved aside, not yet replaced"
    return f"missing (the state put in place was moved to {kept})" if backend.exists(kept) else "missing"


def _resume(
    group: Group, backend: StorageBackend, snapshot: str, plan: dict[str, Any], force: bool, dry_run: bool
) -> RollbackReport:
    safety = str(plan.get("safety", ""))
    report = RollbackReport(group.name, snapshot, dry_run, safety)
    report.aside = {str(k): str(v) for k, v in dict(plan.get("aside", {})).items()}
    missing = [ds for ds in group.datasets if ds not in report.aside]
    if not safety or missing:
        raise UsageError(
            f"the journal of the interrupted rollback of group {group.name} ({_plan_path(group.name)}) does not "
            f"name {'the safety snapshot' if not safety else ', '.join(missing)}: look at the datasets and move it away"
        )
    report.notes.append(f"finishing the interrupted rollback to {snapshot} (safety snapshot {safety})")
    for ds in group.datasets:
        report.steps.append(f"{ds}: found {_state(backend, ds, report.aside[ds], kept_name(ds, safety))}")
    if dry_run:
        return report
    if plan.get("aborting"):
        _undo_all(group, backend, snapshot, plan, force, report.kept, rebound=report.rebound)
        report.notes.append("an interrupted --abort had begun: every dataset was put back as it was first, then rolled back")
        plan.pop("aborting")
    untouched = [ds for ds in group.datasets if backend.exists(ds) and not backend.exists(report.aside[ds])]
    report.holders = backend.in_use(untouched) if untouched else []
    report.binds = _journaled_binds(group.name, plan)
    refusals = _refusals(group, backend, snapshot, report.aside, report.holders, report.binds, force, check=untouched)
    if refusals:
        raise _joined(refusals)
    report.safety_on = _secure_safety(group, backend, plan, report.notes)
    _set_phase(group.name, plan, HELD)
    reached("safety verified")
    return _swap_all(group, backend, snapshot, report, force)


def _safety_at(backend: StorageBackend, ds: str, aside: str, safety: str) -> dict[str, bool]:
    """Where the safety snapshot of ``ds`` is (on it, or aside with the old state), and whether it is held there."""
    found = {}
    for place in (ds, aside):
        try:
            snaps = backend.list_snapshots(place)
        except SnapsyncError:
            if place == ds:
                raise
            snaps = []
        for s in snaps:
            if s.name == safety and s.kind == "snapshot":
                found[place] = safety_tag(safety) in s.holds
    return found


def _secure_safety(group: Group, backend: StorageBackend, plan: dict[str, Any], notes: list[str]) -> list[str]:
    """Before any further swap: the safety snapshot exists on every dataset and is held, wherever it is.

    Missing on a dataset not yet touched, it is taken now (its state is still the one before the
    rollback); missing on one already swapped, nothing can take it any more, and the report says
    where that state is kept instead. Returns the datasets whose safety snapshot is there and held.
    """
    safety, aside = str(plan["safety"]), dict(plan["aside"])
    tag = safety_tag(safety)
    untaken: list[str] = []
    lost: list[str] = []
    held_on: list[str] = []
    for ds in group.datasets:
        found = _safety_at(backend, ds, aside[ds], safety)
        if not found:
            (untaken if backend.exists(ds) and not backend.exists(aside[ds]) else lost).append(ds)
            continue
        for place, held in found.items():
            if not held:
                backend.set_holds(place, tag, [safety])
                reached(f"safety held {_leaf(ds)}")
                notes.append(f"{ds}: safety snapshot {safety} was not held; held it now as {tag}")
        held_on.append(ds)
    if untaken:
        _record(untaken, safety, taken=True)
        backend.snapshot_group(untaken, safety)
        reached("safety snapshot taken")
        for ds in untaken:
            backend.set_holds(ds, tag, [safety])
            reached(f"safety held {_leaf(ds)}")
        why = "the interrupted run had not taken it" if plan.get("phase", PLANNED) == PLANNED else "it was missing (deleted by hand?)"
        notes.append(f"took safety snapshot {safety} of {', '.join(untaken)} now ({why}), held as {tag}")
        held_on += untaken
    for ds in lost:
        notes.append(
            f"{ds}: its safety snapshot {safety} is missing (deleted by hand?) and it was already rolled back; "
            f"its state from before the rollback is kept at {aside[ds]}"
        )
    return [ds for ds in group.datasets if ds in held_on]


def _swap_all(group: Group, backend: StorageBackend, snapshot: str, report: RollbackReport, force: bool) -> RollbackReport:
    """Swap every dataset in turn; one already swapped is only checked (and finished, where the backend
    had steps left after the swap, such as mounting), so a rerun after a stop at any step converges."""
    done: list[str] = []
    for ds in group.datasets:
        aside = report.aside[ds]
        try:
            backend.rollback(ds, snapshot, aside)
            _repoint(ds, report.binds.get(ds, []), backend.files_root(ds), force, report.rebound)
        except SnapsyncError as e:
            kept = ", ".join(report.safety_on) or "no dataset"
            failed = SnapsyncError(
                f"{e}; rolled back so far: {', '.join(done) or 'nothing'} (safety snapshot {report.safety} holds the "
                f"state of {kept}); fix the cause and run `snapsync rollback {group.name} {snapshot}` again to finish, "
                f"or `snapsync rollback {group.name} --abort` to undo it"
            )
            failed.exit_code = e.exit_code
            raise failed from e
        done.append(ds)
        if backend.capabilities.rollback_sets_newer_aside:
            # The newer snapshots went aside with the old state; they are no target's base any more.
            tags = _tags_holding(backend.list_snapshots(aside), is_target_tag)
            for tag in sorted(tags):
                backend.set_holds(aside, tag, [])
        reached(f"rolled back {_leaf(ds)}")
    for ds in group.datasets:
        kept = kept_name(ds, report.safety)
        if backend.exists(kept):
            report.kept[ds] = kept
            report.notes.append(f"{ds}: the state an interrupted --abort moved away is kept at {kept}; delete it when sure")
    _plan_path(group.name).unlink(missing_ok=True)
    return report


def _undoer(backend: StorageBackend) -> Callable[..., list[str]]:
    """The backend's ``undo_rollback``, which ``--abort`` needs."""
    return backend.undo_rollback


def _undo_all(
    group: Group, backend: StorageBackend, snapshot: str, plan: dict[str, Any], force: bool, kept: dict[str, str],
    *, dry_run: bool = False, rebound: list[str] | None = None,
) -> list[str]:
    """Put every dataset back as it was before the rollback; returns what was (or would be) done.

    Every dataset is checked before the first change: a state that cannot be undone safely is
    refused with nothing changed. A state the rollback had put in place was live and may hold new
    writes, so it is moved to :func:`kept_name`, never deleted. Each step can be stopped; running
    ``--abort`` (or the rollback) again continues from there.
    """
    undo = _undoer(backend)
    rebound = [] if rebound is None else rebound
    safety, aside = str(plan["safety"]), dict(plan["aside"])
    steps: list[str] = []
    for ds in group.datasets:
        try:
            steps += undo(ds, snapshot, aside[ds], kept_name(ds, safety), dry_run=True)
        except SnapsyncError as e:
            raise UsageError(
                f"cannot undo the interrupted rollback of group {group.name} safely: {e}; nothing was changed"
            ) from e
    binds = _journaled_binds(group.name, plan)
    steps += [f"re-point bind mount {b.point} at {b.shows(ds)}" for ds in group.datasets for b in binds.get(ds, [])]
    live = [ds for ds in group.datasets if backend.exists(ds) and backend.exists(aside[ds])]
    found = backend.in_use(live) if live else []
    refusals = _refusals(group, backend, snapshot, aside, found, binds, force, check=())
    if refusals:
        raise _joined(refusals)
    if dry_run:
        return steps
    plan["aborting"] = True
    write_json(_plan_path(group.name), plan)
    reached("abort started")
    recorded = dict(plan.get("holds") or {})
    for ds in group.datasets:
        try:
            undo(ds, snapshot, aside[ds], kept_name(ds, safety))
            _repoint(ds, binds.get(ds, []), backend.files_root(ds), force, rebound)
            if backend.capabilities.rollback_sets_newer_aside:
                _restore_holds(backend, ds, dict(recorded.get(ds) or {}))
        except SnapsyncError as e:
            failed = SnapsyncError(
                f"{e}; the undo of the rollback of group {group.name} stopped at {ds}: fix the cause and run "
                f"`snapsync rollback {group.name} --abort` again to finish it"
            )
            failed.exit_code = e.exit_code
            raise failed from e
        reached(f"undone {_leaf(ds)}")
        if backend.exists(kept_name(ds, safety)):
            kept[ds] = kept_name(ds, safety)
    return steps


def _restore_holds(backend: StorageBackend, ds: str, recorded: dict[str, list[str]]) -> None:
    """The targets' holds the swap released on the old state, back on it (added to what they hold now)."""
    snaps = backend.list_snapshots(ds)
    names = {s.name for s in snaps if s.kind == "snapshot"}
    now = _tags_holding(snaps, is_target_tag)
    for tag, held in sorted(recorded.items()):
        wanted = set(now.get(tag, [])) | (set(held) & names)
        if wanted != set(now.get(tag, [])):
            backend.set_holds(ds, tag, sorted(wanted))


def abort(
    group: Group, backend: StorageBackend, snapshot: str | None = None, *, force: bool = False, dry_run: bool = False
) -> AbortReport:
    """``snapsync rollback GROUP --abort``: undo an interrupted rollback (see :func:`_undo_all`).

    The safety snapshot stays, held, where it was taken; the journal goes last, so until then
    ``check`` still says a rollback is unfinished.
    """
    plan = read_json(_plan_path(group.name))
    if plan is None or not plan.get("snapshot"):
        raise UsageError(f"no interrupted rollback of group {group.name} to abort (a finished rollback is undone by rolling back to its safety snapshot)")
    target = str(plan["snapshot"])
    if snapshot is not None and snapshot != target:
        raise UsageError(f"the interrupted rollback of group {group.name} was to {target}, not {snapshot}; nothing was changed")
    safety = str(plan.get("safety", ""))
    aside = dict(plan.get("aside") or {})
    if not safety or any(ds not in aside for ds in group.datasets):
        raise UsageError(
            f"the journal of the interrupted rollback of group {group.name} ({_plan_path(group.name)}) does not name "
            f"every dataset's place aside: it cannot be undone safely; look at the datasets, then move the journal away"
        )
    report = AbortReport(group.name, target, dry_run, safety)
    report.steps = _undo_all(group, backend, target, plan, force, report.kept, dry_run=dry_run, rebound=report.rebound)
    if dry_run:
        return report
    tag = safety_tag(safety)
    for ds in group.datasets:
        found = _safety_at(backend, ds, aside[ds], safety)
        for place, held in found.items():
            if not held:
                backend.set_holds(place, tag, [safety])
        if found:
            report.safety_on.append(ds)
    if report.safety_on:
        report.notes.append(
            f"safety snapshot {safety} is kept, held as {tag} on {', '.join(report.safety_on)}; "
            f"when it is no longer needed: snapsync release {group.name} {safety}"
        )
    else:
        _record(group.datasets, safety, taken=False)
        report.notes.append("the rollback had not taken its safety snapshot yet: there is none to keep")
    for ds, where in report.kept.items():
        report.notes.append(f"{ds}: the state the rollback had put in place (it may have been used) is kept at {where}; delete it when sure")
    _plan_path(group.name).unlink(missing_ok=True)
    return report


def _target_notes(
    group: Group, backend: StorageBackend, listings: dict[str, dict[str, SnapshotInfo]], snapshot: str
) -> list[str]:
    """What the targets keep as base, and which will see a diverged history (where newer snapshots go aside)."""
    when = parse_snapshot_name(group.prefix, snapshot)
    assert when is not None
    notes = []
    for target in group.targets:
        held = sorted({
            n for snaps in listings.values() for n, s in snaps.items() if target_tag(target) in s.holds
        })
        if not held:
            continue
        newer = [n for n in held if (parse_snapshot_name(group.prefix, n) or when) > when]
        if backend.capabilities.rollback_sets_newer_aside and newer:
            notes.append(
                f"target {target}: its base {', '.join(held)} is newer than {snapshot} and moves aside with the old "
                f"state; its next send is refused as diverged unless on_diverged = \"rollback\" for it (which "
                f"drops its copies newer than {snapshot} and continues incrementally)"
            )
        else:
            notes.append(f"target {target}: base {', '.join(held)} stays; replication continues incrementally")
    return notes


def _safety_held(backend: StorageBackend, place: str, *, aside: bool = False) -> set[str]:
    """The safety snapshots held at ``place``; for an aside, none if there is no such dataset (any more)."""
    try:
        snapshots = backend.list_snapshots(place)
    except SnapsyncError:
        if not aside:
            raise
        return set()
    return {tag_subject(tag) for s in snapshots for tag in s.holds if is_safety_tag(tag)}


def _holding(backend: StorageBackend, ds: str, safety: str) -> list[str]:
    """Where ``safety`` is held for ``ds``: on it, or aside with the old state (where newer snapshots go)."""
    places = [ds] if safety in _safety_held(backend, ds) else []
    aside = aside_name(ds, safety)
    if backend.capabilities.rollback_sets_newer_aside and safety in _safety_held(backend, aside, aside=True):
        places.append(aside)
    return places


def held_safety(backend: StorageBackend, datasets: Sequence[str]) -> list[str]:
    """Every safety snapshot a rollback still holds for ``datasets``, wherever it left it."""
    taken = _taken()
    names = set()
    for ds in datasets:
        names |= _safety_held(backend, ds)
        if backend.capabilities.rollback_sets_newer_aside:
            for safety in taken.get(ds, []):
                names |= _safety_held(backend, aside_name(ds, safety), aside=True)
    return sorted(names)


def release(backend: StorageBackend, datasets: Sequence[str], safety: str) -> list[str]:
    """``snapsync release``: drop a rollback's hold on its safety snapshot, so retention may prune it,
    wherever the rollback left that snapshot; returns the datasets it was released for.

    A name that is no safety snapshot held there (a typo, a second release, an ordinary snapshot) is
    refused with the ones that are: reporting success would leave the real one held for ever.
    """
    holding = {ds: _holding(backend, ds, safety) for ds in datasets}
    if not any(holding.values()):
        held = held_safety(backend, datasets)
        there = f"the safety snapshots held there: {', '.join(held)}" if held else "no safety snapshot is held there"
        raise UsageError(f"{safety!r} is not a safety snapshot held for {', '.join(datasets)}; {there}")
    for places in holding.values():
        for place in places:
            backend.set_holds(place, safety_tag(safety), [])
    try:
        _record(datasets, safety, taken=False)
    except (OSError, SnapsyncError):
        pass  # the record only names asides for the list above, which checks every name it has anyway
    return [ds for ds, places in holding.items() if places]


def delete_asides(backend: StorageBackend, datasets: Sequence[str], safety: str, *, dry_run: bool = False) -> list[str]:
    """``release --delete-aside``: delete the states the rollback that took ``safety`` moved aside;
    returns them. Every one is checked unused first (no process, no mount still showing it: a bind
    mount left on it would be a service writing there), and all are refused with nothing deleted if
    any is in use."""
    asides = [(ds, aside_name(ds, safety)) for ds in datasets]
    found = [(ds, a) for ds, a in asides if backend.exists(a)]
    if not found:
        return []
    users = backend.in_use([a for _, a in found])
    if users:
        raise Busy(
            f"not deleting {', '.join(a for _, a in found)}: still in use: {'; '.join(h.describe() for h in users[:8])}; "
            f"a service may be writing there: stop it, re-point or unmount what shows it, then run this again"
        )
    if not dry_run:
        for ds, aside in found:
            backend.delete_aside(ds, aside)
            reached(f"deleted aside {_leaf(ds)}")
    return [a for _, a in found]
