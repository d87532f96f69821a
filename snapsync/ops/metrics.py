"""Prometheus metrics for node_exporter's textfile collector.

A textfile is a snapshot of state, not a stream of events: a failed run must not erase when the
last good one was. So every command folds its reports into a small remembered state
(``<state dir>/metrics-*.json``, one per textfile), and the textfile is rendered from all of it. ``observe_*`` and
``families`` are pure (data and a time in, data out); ``record_*`` do the file I/O, atomically.
Timestamps are exported rather than ages where an alert needs them: ``time() - ts`` in PromQL
keeps counting while snapsync does not run. Every series carries a ``policy`` label (the policy file's
stem): node_exporter drops a series two textfiles share, silently, so two policies on one host must
never write the same one. Reference: docs/monitoring.md.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import socket
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from snapsync import __version__
from snapsync.plan.naming import parse_snapshot_name
from snapsync.host.safefs import private_dir, write_atomic
from snapsync.host.state import read_json, state_dir, write_json

if TYPE_CHECKING:
    from snapsync.recovery.drill import DrillReport
    from snapsync.policy.loader import Policy
    from snapsync.ops.runner import GroupReport
    from snapsync.replication.replicate import TargetReport

log = logging.getLogger("snapsync")

State = dict[str, Any]


def _newest(prefix: str, names: Iterable[str | None]) -> float | None:
    times = [t for t in (parse_snapshot_name(prefix, n) for n in names if n) if t is not None]
    return max(times).timestamp() if times else None


def observe_run(
    state: State, command: str, reports: Sequence[GroupReport], started: datetime, finished: datetime,
    prefixes: dict[str, str], error: str | None = None,
) -> State:
    """Fold one command's reports into the state; ``error`` when the command failed as a whole."""
    state = {k: dict(v) for k, v in state.items()}
    ok = error is None and all(r.ok for r in reports)
    commands = state.setdefault("commands", {})
    commands[command] = _fold_command(commands.get(command, {}), ok, error, started, finished)
    groups, targets = state.setdefault("groups", {}), state.setdefault("targets", {})
    for r in reports:
        if r.dry_run:
            continue
        groups[r.group] = _fold_group(groups.get(r.group, {}), r, prefixes.get(r.group, "snapsync"), finished)
        for t in r.targets:
            if not t.dry_run:
                key = f"{t.group}/{t.target}"
                targets[key] = _fold_target(targets.get(key, {}), t, finished)
    return state


def _fold_command(
    before: Mapping[str, Any], ok: bool, error: str | None, started: datetime, finished: datetime
) -> dict[str, Any]:
    cmd = dict(before)
    cmd.update(last_run=finished.timestamp(), ok=ok, duration=(finished - started).total_seconds())
    if ok:
        cmd["last_success"] = finished.timestamp()
    if error is not None:
        cmd["failures"] = cmd.get("failures", 0) + 1
    return cmd


def _fold_group(before: Mapping[str, Any], r: GroupReport, prefix: str, finished: datetime) -> dict[str, Any]:
    """The source side of one group; each target has its own entry."""
    g = dict(before)
    g["ok"] = not r.errors
    if not r.errors:
        g["last_success"] = finished.timestamp()
    kept = [d.name for d in r.plan.kept] if r.plan is not None else []
    newest = _newest(prefix, [r.snapshot, *kept, *(t.newest_source for t in r.targets if t.direction == "push")])
    if newest is not None and (r.plan is not None or newest >= g.get("newest_snapshot", 0)):
        g["newest_snapshot"] = newest  # a prune plan lists every snapshot: then it may also go back
    if r.plan is not None:
        g["kept"] = len(kept)
        g["deleted_total"] = g.get("deleted_total", 0) + len(r.deleted)
    failures = dict(g.get("failures", {}))
    for kind in r.failures:
        failures[kind] = failures.get(kind, 0) + 1
    g["failures"] = failures
    if r.hooks:
        g["hooks"] = [
            {"index": h.index, "type": h.kind, "ok": h.status == "ok", "seconds": h.seconds, "paused": h.paused_seconds}
            for h in r.hooks
        ]
    return g


def _fold_target(before: Mapping[str, Any], t: TargetReport, finished: datetime) -> dict[str, Any]:
    tt = dict(before)
    tt.update(group=t.group, target=t.target, direction=t.direction, ok=t.ok, last_duration=t.seconds)
    tt["last_sent_bytes"] = t.bytes_sent
    tt["sent_bytes_total"] = tt.get("sent_bytes_total", 0) + t.bytes_sent
    tt["sent_total"] = tt.get("sent_total", 0) + len(t.sent)
    if t.ok:
        tt["last_success"] = finished.timestamp()
    else:
        tt["failures_total"] = tt.get("failures_total", 0) + 1
    if t.newest_common_time is not None:
        tt["newest_copy"] = t.newest_common_time.timestamp()
    if t.lag is not None:
        tt["lag"] = t.lag.total_seconds()
    if t.prune is not None:
        tt["kept"] = len(t.prune.kept)
        tt["deleted_total"] = tt.get("deleted_total", 0) + len(t.pruned)
    return tt


def observe_drills(state: State, reports: Sequence[DrillReport], finished: datetime) -> State:
    state = {k: dict(v) for k, v in state.items()}
    drills = state.setdefault("drills", {})
    for r in reports:
        d = dict(drills.get(f"{r.group}/{r.target}", {}))
        d.update(group=r.group, target=r.target, ok=r.ok, last_run=finished.timestamp(), duration=r.seconds,
                 restored_bytes=r.restored_bytes)
        if r.ok:
            d["last_success"] = finished.timestamp()
        else:
            d["failures_total"] = d.get("failures_total", 0) + 1
        drills[f"{r.group}/{r.target}"] = d
    return state


Limits = Mapping[tuple[str, str], tuple[float, float]]
"""(group, target or "") -> (warn_after, crit_after) in seconds: the policy's, so alerts agree with `check`."""

GT = ("group", "target")
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    # name: (gauge or counter, labels besides "policy", help); docs/monitoring.md lists them for people.
    "snapsync_info": ("gauge", ("version", "host"), "snapsync's version and the host it runs on."),
    "snapsync_textfile_written_timestamp_seconds": ("gauge", (), "When snapsync last wrote this file."),
    "snapsync_snapshot_warn_after_seconds": ("gauge", ("group",), "The policy's warn_after for the group's newest snapshot."),
    "snapsync_snapshot_crit_after_seconds": ("gauge", ("group",), "The policy's crit_after for the group's newest snapshot."),
    "snapsync_target_warn_after_seconds": ("gauge", GT, "The policy's warn_after for the target's newest copy."),
    "snapsync_target_crit_after_seconds": ("gauge", GT, "The policy's crit_after for the target's newest copy."),
    "snapsync_last_run_timestamp_seconds": ("gauge", ("command",), "When the command last finished."),
    "snapsync_last_run_success": ("gauge", ("command",), "1 if the command's last run succeeded for every group and target."),
    "snapsync_last_run_duration_seconds": ("gauge", ("command",), "How long the command's last run took."),
    "snapsync_last_success_timestamp_seconds": ("gauge", ("command",), "When the command last succeeded everywhere."),
    "snapsync_command_failures": ("counter", ("command",), "Runs of the command that failed as a whole (an internal error)."),
    "snapsync_group_ok": ("gauge", ("group",), "1 if the group's last run had no error on this host (snapshot, hooks, pruning)."),
    "snapsync_group_last_success_timestamp_seconds": ("gauge", ("group",), "When a run last finished the group without error on this host."),
    "snapsync_newest_snapshot_timestamp_seconds": ("gauge", ("group",), "When the group's newest snapshot was taken."),
    "snapsync_newest_snapshot_age_seconds": ("gauge", ("group",), "Age of the group's newest snapshot when this file was written."),
    "snapsync_snapshots_kept": ("gauge", GT, "Snapshots retention keeps, here (target \"\") or on a target."),
    "snapsync_snapshots_deleted": ("counter", GT, "Snapshots pruned, here (target \"\") or on a target."),
    "snapsync_failures": ("counter", (*GT, "kind"), "Failed steps, by kind (snapshot, hook, prune, replicate, pull, drill)."),
    "snapsync_hook_ok": ("gauge", ("group", "hook", "type"), "1 if the hook succeeded in the group's last snapshot."),
    "snapsync_hook_duration_seconds": ("gauge", ("group", "hook", "type"), "How long the hook took."),
    "snapsync_hook_paused_seconds": ("gauge", ("group", "hook", "type"), "How long a freeze hook kept the application frozen."),
    "snapsync_target_ok": ("gauge", (*GT, "direction"), "1 if the last replication to (or pull from) the target had no error."),
    "snapsync_target_last_success_timestamp_seconds": ("gauge", GT, "When replication to the target last succeeded."),
    "snapsync_target_newest_copy_timestamp_seconds": ("gauge", GT, "When the newest snapshot the target holds of every dataset was taken."),
    "snapsync_target_lag_seconds": ("gauge", GT, "How far the target's newest copy is behind the source's newest snapshot."),
    "snapsync_target_last_duration_seconds": ("gauge", GT, "How long the last replication to the target took."),
    "snapsync_target_last_sent_bytes": ("gauge", GT, "Bytes sent to the target in the last run."),
    "snapsync_sent_bytes": ("counter", GT, "Bytes of snapshot streams sent to the target."),
    "snapsync_sent_snapshots": ("counter", GT, "Snapshot streams sent to the target."),
    "snapsync_drill_ok": ("gauge", GT, "1 if the last restore drill from the target passed."),
    "snapsync_drill_last_run_timestamp_seconds": ("gauge", GT, "When the last restore drill finished."),
    "snapsync_drill_last_success_timestamp_seconds": ("gauge", GT, "When a restore drill from the target last passed."),
    "snapsync_drill_duration_seconds": ("gauge", GT, "How long the last drill took."),
    "snapsync_drill_restored_bytes": ("gauge", GT, "Bytes the last drill restored."),
}


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Family:
    """One metric family as the text format shows it (a counter's samples end in ``_total``)."""

    name: str
    kind: str
    doc: str
    labels: tuple[str, ...]
    samples: list[Sample] = field(default_factory=list)

    def add(self, values: Sequence[str], value: float) -> None:
        name = f"{self.name}_total" if self.kind == "counter" else self.name
        self.samples.append(Sample(name, dict(zip(self.labels, values, strict=True)), value))


def _go_float(value: float) -> str:
    """A value as Prometheus (Go) prints it: exponents from 10^7 on, as prometheus_client does."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    s = repr(value)
    dot = s.find(".")
    if value > 0 and dot > 6:
        return f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.") + f"e+{dot - 1:02d}"
    return s


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def exposition(fams: Iterable[Family]) -> bytes:
    """The Prometheus text format (version 0.0.4) that node_exporter's textfile collector reads.

    Written here rather than with prometheus_client: importing that package loads its HTTP server,
    WSGI and process collectors, about a sixth of a short command's start-up. The tests hold this
    byte for byte to prometheus_client's ``generate_latest`` and read it back with its parser."""
    out: list[str] = []
    for f in fams:
        shown = f"{f.name}_total" if f.kind == "counter" else f.name
        doc = f.doc.replace("\\", "\\\\").replace("\n", "\\n")
        out += [f"# HELP {shown} {doc}\n", f"# TYPE {shown} {f.kind}\n"]
        for s in f.samples:
            labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(s.labels.items()))
            out.append(f"{s.name}{{{labels}}} {_go_float(s.value)}\n" if labels else f"{s.name} {_go_float(s.value)}\n")
    return "".join(out).encode()


def families(state: State, now: datetime, host: str, limits: Limits | None = None, *, policy: str) -> list[Family]:
    """Every metric family the textfile holds, from the remembered state at ``now``; ``policy`` labels each series."""
    fams: dict[str, Family] = {}

    def emit(name: str, labels: Sequence[str], value: float | None) -> None:
        if value is None:
            return
        if name not in fams:
            kind, names, doc = METRICS[name]
            fams[name] = Family(name, kind, doc, ("policy", *names))
        fams[name].add([policy, *labels], float(value))

    emit("snapsync_info", [__version__, host], 1)
    emit("snapsync_textfile_written_timestamp_seconds", [], now.timestamp())
    for (group, target), (warn, crit) in sorted((limits or {}).items()):
        kind = "target" if target else "snapshot"
        labels = [group, target] if target else [group]
        emit(f"snapsync_{kind}_warn_after_seconds", labels, warn)
        emit(f"snapsync_{kind}_crit_after_seconds", labels, crit)
    for command, c in sorted(state.get("commands", {}).items()):
        emit("snapsync_last_run_timestamp_seconds", [command], c["last_run"])
        emit("snapsync_last_run_success", [command], c["ok"])
        emit("snapsync_last_run_duration_seconds", [command], c["duration"])
        emit("snapsync_last_success_timestamp_seconds", [command], c.get("last_success"))
        emit("snapsync_command_failures", [command], c.get("failures", 0))
    for group, g in sorted(state.get("groups", {}).items()):
        emit("snapsync_group_ok", [group], g["ok"])
        emit("snapsync_group_last_success_timestamp_seconds", [group], g.get("last_success"))
        if "newest_snapshot" in g:
            emit("snapsync_newest_snapshot_timestamp_seconds", [group], g["newest_snapshot"])
            emit("snapsync_newest_snapshot_age_seconds", [group], max(0.0, now.timestamp() - g["newest_snapshot"]))
        if "kept" in g:
            emit("snapsync_snapshots_kept", [group, ""], g["kept"])
            emit("snapsync_snapshots_deleted", [group, ""], g.get("deleted_total", 0))
        for kind, n in sorted(g.get("failures", {}).items()):
            emit("snapsync_failures", [group, "", kind], n)
        for h in g.get("hooks", []):
            labels = [group, str(h["index"]), h["type"]]
            emit("snapsync_hook_ok", labels, h["ok"])
            emit("snapsync_hook_duration_seconds", labels, h["seconds"])
            emit("snapsync_hook_paused_seconds", labels, h.get("paused"))
    for _, t in sorted(state.get("targets", {}).items()):
        labels = [t["group"], t["target"]]
        emit("snapsync_target_ok", [*labels, t["direction"]], t["ok"])
        emit("snapsync_target_last_success_timestamp_seconds", labels, t.get("last_success"))
        emit("snapsync_target_newest_copy_timestamp_seconds", labels, t.get("newest_copy"))
        emit("snapsync_target_lag_seconds", labels, t.get("lag"))
        emit("snapsync_target_last_duration_seconds", labels, t["last_duration"])
        emit("snapsync_target_last_sent_bytes", labels, t["last_sent_bytes"])
        emit("snapsync_sent_bytes", labels, t["sent_bytes_total"])
        emit("snapsync_sent_snapshots", labels, t["sent_total"])
        emit("snapsync_failures", [*labels, "pull" if t["direction"] == "pull" else "replicate"], t.get("failures_total", 0))
        if "kept" in t:
            emit("snapsync_snapshots_kept", labels, t["kept"])
            emit("snapsync_snapshots_deleted", labels, t.get("deleted_total", 0))
    for _, d in sorted(state.get("drills", {}).items()):
        labels = [d["group"], d["target"]]
        emit("snapsync_drill_ok", labels, d["ok"])
        emit("snapsync_drill_last_run_timestamp_seconds", labels, d["last_run"])
        emit("snapsync_drill_last_success_timestamp_seconds", labels, d.get("last_success"))
        emit("snapsync_drill_duration_seconds", labels, d["duration"])
        emit("snapsync_drill_restored_bytes", labels, d["restored_bytes"])
        emit("snapsync_failures", [*labels, "drill"], d.get("failures_total", 0))
    return list(fams.values())


def state_path(policy: Policy) -> Path:
    """One state per textfile: two policies on a host, each with its own textfile, keep apart."""
    tag = hashlib.sha256(str(textfile_path(policy)).encode()).hexdigest()[:12]
    return state_dir() / f"metrics-{tag}.json"


def policy_label(policy: Policy) -> str:
    """The policy file's stem: the schema's ``host`` names the machine, which two policies on it share.
    The stem is the same however the file is named on the command line, and through a symlink (NixOS)."""
    return PurePath(policy.source).stem


def textfile_path(policy: Policy) -> Path:
    return Path(policy.monitoring.textfile) if policy.monitoring.textfile else state_dir() / "metrics" / "snapsync.prom"


def policy_limits(policy: Policy) -> dict[tuple[str, str], tuple[float, float]]:
    from snapsync.ops.check import thresholds

    out: dict[tuple[str, str], tuple[float, float]] = {}
    for group in policy.groups.values():
        out[(group.name, "")] = (group.warn_after.total_seconds(), group.crit_after.total_seconds())
        for name in group.targets:
            t = thresholds(policy, group, name)
            out[(group.name, name)] = (t.warn.total_seconds(), t.crit.total_seconds())
    for name in policy.pulls:
        t = thresholds(policy, None, name)
        out[(name, name)] = (t.warn.total_seconds(), t.crit.total_seconds())  # a pull reports as group and target
    return out


def write_textfile(
    path: Path, state: State, now: datetime, host: str, limits: Limits | None = None, *, policy: str
) -> None:
    """Atomically: a temporary file beside it (not ``*.prom``, so the collector never reads it half
    written), renamed over. Mode 0644 whatever the umask: node_exporter runs as another user. The
    directory must be root's alone (see :mod:`snapsync.host.safefs`): a shared one is refused."""
    data = exposition(families(state, now, host, limits, policy=policy))
    with private_dir(path.parent, own=1, create=True, mode=0o755) as dirfd:
        write_atomic(dirfd, path.name, data, mode=0o644)


def forget(state: State, groups: Mapping[str, tuple[Sequence[str], int]]) -> State:
    """Drop what the policy no longer has: ``groups`` maps each group (and pull) to its targets and
    its number of hooks. A removed target must not keep an alert firing forever."""
    state = {k: dict(v) for k, v in state.items()}
    for name in [g for g in state.get("groups", {}) if g not in groups]:
        del state["groups"][name]
    for name, g in state.get("groups", {}).items():
        if "hooks" in g:
            g = state["groups"][name] = dict(g)
            g["hooks"] = [h for h in g["hooks"] if h["index"] < groups[name][1]]
    for section in ("targets", "drills"):
        for key, entry in list(state.get(section, {}).items()):
            if entry["target"] not in groups.get(entry["group"], ((), 0))[0]:
                del state[section][key]
    return state


def _shape(policy: Policy) -> dict[str, tuple[Sequence[str], int]]:
    shape: dict[str, tuple[Sequence[str], int]] = {g.name: (g.targets, len(g.hooks)) for g in policy.groups.values()}
    return shape | {name: ((name,), 0) for name in policy.pulls}  # a pull reports as group and target


def _record(policy: Policy, now: datetime, fold: Callable[[State], State]) -> None:
    """Metrics never fail a backup: any problem with them is logged, and the command's exit status stands."""
    try:
        path = state_path(policy)
        state = forget(fold(read_json(path) or {}), _shape(policy))
        write_json(path, state)
        textfile, label = textfile_path(policy), policy_label(policy)
        host = policy.host or socket.gethostname().split(".")[0]
        before = _policy_of(_head(textfile))
        if before is not None and before != label:
            log.warning("metrics: %s was written by the policy %r too; two policies sharing a textfile hide each other's "
                        "series: give each its own [monitoring] textfile", textfile, before, extra={"event": "metrics-failed"})
        write_textfile(textfile, state, now, host, policy_limits(policy), policy=label)
    except Exception as e:  # noqa: BLE001 (the backup is done; its report must still be shown)
        log.warning("could not write metrics: %s", e, extra={"event": "metrics-failed"})
        return
    for other in _same_policy_beside(textfile, label):
        log.warning("metrics: %s also holds series of a policy named %r and node_exporter drops the series both files have; "
                    "rename one of the policy files", other, label, extra={"event": "metrics-failed"})


def _same_policy_beside(textfile: Path, label: str) -> list[Path]:
    """Other textfiles in the collector's directory with series of the same ``policy`` label: two policy
    files of one name in different directories would collide again, and node_exporter says nothing."""
    found = []
    for other in sorted(textfile.parent.glob("*.prom")):
        if other.name != textfile.name and _policy_of(_head(other)) == label:
            found.append(other)
    return found


def _head(path: Path) -> bytes:
    """The start of a textfile (``snapsync_info`` comes first); empty when absent, unreadable or not a
    regular file (unreadable: node_exporter reports that itself, as ``node_textfile_scrape_error``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)  # a fifo must not hang the run
    except OSError:
        return b""
    try:
        return os.read(fd, 65536) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return b""
    finally:
        os.close(fd)


_LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')
_INFO = re.compile(r'snapsync_info\{((?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*)\} \S+$')


def _policy_of(head: bytes) -> str | None:
    """The ``policy`` label of the ``snapsync_info`` sample in the start of a textfile, if there is one: the
    line as :func:`exposition` writes it (another program's file, or a line cut short, has none)."""
    for line in head.decode(errors="replace").split("\n"):
        if line.startswith("snapsync_info{"):
            whole = _INFO.match(line)
            if whole is None:
                return None
            labels = {k: re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], v) for k, v in _LABEL.findall(whole[1])}
            return labels.get("policy")
    return None


def record_run(
    policy: Policy, command: str, reports: Sequence[GroupReport], started: datetime, finished: datetime,
    error: str | None = None,
) -> None:
    prefixes = {name: g.prefix for name, g in policy.groups.items()}
    prefixes |= {name: p.prefix or policy.defaults.prefix for name, p in policy.pulls.items()}
    _record(policy, finished, lambda state: observe_run(state, command, reports, started, finished, prefixes, error))


def record_drills(policy: Policy, reports: Sequence[DrillReport], finished: datetime) -> None:
    _record(policy, finished, lambda state: observe_drills(state, reports, finished))
