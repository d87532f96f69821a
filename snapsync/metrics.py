"""Prometheus metrics for node_exporter's textfile collector.

A textfile is a snapshot of state, not a stream of events: a failed run must not erase when the
last good one was. So every command folds its reports into a small remembered state
(``<state dir>/metrics.json``), and the textfile is rendered from all of it. ``observe_*`` and
``families`` are pure (data and a time in, data out); ``record_*`` do the file I/O, atomically.
Timestamps are exported rather than ages where an alert needs them: ``time() - ts`` in PromQL
keeps counting while snapsync does not run. Reference: docs/monitoring.md.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from snapsync import __version__
from snapsync.naming import parse_snapshot_name
from snapsync.state import read_json, state_dir, write_json

if TYPE_CHECKING:
    from snapsync.drill import DrillReport
    from snapsync.policy import Policy
    from snapsync.runner import GroupReport

log = logging.getLogger("snapsync")

State = dict[str, Any]


def _ts(when: datetime | None) -> float | None:
    return None if when is None else when.timestamp()


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
    cmd = dict(state.setdefault("commands", {}).get(command, {}))
    cmd.update(last_run=finished.timestamp(), ok=ok, duration=(finished - started).total_seconds())
    if ok:
        cmd["last_success"] = finished.timestamp()
    if error is not None:
        cmd["failures"] = cmd.get("failures", 0) + 1
    state["commands"][command] = cmd
    groups, targets = state.setdefault("groups", {}), state.setdefault("targets", {})
    for r in reports:
        if r.dry_run:
            continue
        prefix = prefixes.get(r.group, "snapsync")
        g = dict(groups.get(r.group, {}))
        g["ok"] = not r.errors  # the source side; each target has its own
        if not r.errors:
            g["last_success"] = finished.timestamp()
        kept = [d.name for d in r.plan.kept] if r.plan is not None else []
        newest = _newest(prefix, [r.snapshot, *kept, *(t.newest_source for t in r.targets if t.direction == "push")])
        if newest is not None and newest >= g.get("newest_snapshot", 0):
            g["newest_snapshot"] = newest
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
        groups[r.group] = g
        for t in r.targets:
            if t.dry_run:
                continue
            key = f"{t.group}/{t.target}"
            tt = dict(targets.get(key, {}))
            tt.update(group=t.group, target=t.target, direction=t.direction, ok=t.ok, last_duration=t.seconds)
            tt["last_sent_bytes"] = t.bytes_sent
            tt["sent_bytes_total"] = tt.get("sent_bytes_total", 0) + t.bytes_sent
            tt["sent_total"] = tt.get("sent_total", 0) + len(t.sent)
            if t.ok and t.skipped is None:
                tt["last_success"] = finished.timestamp()
            if not t.ok:
                tt["failures_total"] = tt.get("failures_total", 0) + 1
            if t.newest_common_time is not None:
                tt["newest_copy"] = t.newest_common_time.timestamp()
            if t.lag is not None:
                tt["lag"] = t.lag.total_seconds()
            if t.prune is not None:
                tt["kept"] = len(t.prune.kept)
                tt["deleted_total"] = tt.get("deleted_total", 0) + len(t.pruned)
            targets[key] = tt
    return state


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


def families(state: State, now: datetime, host: str, limits: Limits | None = None) -> list[Metric]:
    """Every metric family the textfile holds, from the remembered state at ``now``."""
    fams: dict[str, Metric] = {}

    def gauge(name: str, doc: str, labels: Sequence[str]) -> GaugeMetricFamily:
        return fams.setdefault(name, GaugeMetricFamily(name, doc, labels=labels))  # type: ignore[return-value]

    def counter(name: str, doc: str, labels: Sequence[str]) -> CounterMetricFamily:
        return fams.setdefault(name, CounterMetricFamily(name, doc, labels=labels))  # type: ignore[return-value]

    gauge("snapsync_info", "snapsync's version and the host it runs on.", ["version", "host"]).add_metric([__version__, host], 1)
    gauge("snapsync_textfile_written_timestamp_seconds", "When snapsync last wrote this file.", []).add_metric([], now.timestamp())
    for (group, target), (warn, crit) in sorted((limits or {}).items()):
        if target:
            gauge("snapsync_target_warn_after_seconds", "The policy's warn_after for the target's newest copy.", ["group", "target"]).add_metric([group, target], warn)
            gauge("snapsync_target_crit_after_seconds", "The policy's crit_after for the target's newest copy.", ["group", "target"]).add_metric([group, target], crit)
        else:
            gauge("snapsync_snapshot_warn_after_seconds", "The policy's warn_after for the group's newest snapshot.", ["group"]).add_metric([group], warn)
            gauge("snapsync_snapshot_crit_after_seconds", "The policy's crit_after for the group's newest snapshot.", ["group"]).add_metric([group], crit)
    for command, c in sorted(state.get("commands", {}).items()):
        gauge("snapsync_last_run_timestamp_seconds", "When the command last finished.", ["command"]).add_metric([command], c["last_run"])
        gauge("snapsync_last_run_success", "1 if the command's last run succeeded for every group and target.", ["command"]).add_metric([command], float(c["ok"]))
        gauge("snapsync_last_run_duration_seconds", "How long the command's last run took.", ["command"]).add_metric([command], c["duration"])
        if "last_success" in c:
            gauge("snapsync_last_success_timestamp_seconds", "When the command last succeeded everywhere.", ["command"]).add_metric([command], c["last_success"])
        counter("snapsync_command_failures", "Runs of the command that failed as a whole (bad policy, lock, crash).", ["command"]).add_metric([command], c.get("failures", 0))
    for group, g in sorted(state.get("groups", {}).items()):
        gauge("snapsync_group_ok", "1 if the group's last run had no error on this host (snapshot, hooks, pruning); targets have their own.", ["group"]).add_metric([group], float(g["ok"]))
        if "last_success" in g:
            gauge("snapsync_group_last_success_timestamp_seconds", "When a run last finished the group without error on this host.", ["group"]).add_metric([group], g["last_success"])
        if "newest_snapshot" in g:
            gauge("snapsync_newest_snapshot_timestamp_seconds", "When the group's newest snapshot was taken.", ["group"]).add_metric([group], g["newest_snapshot"])
            gauge("snapsync_newest_snapshot_age_seconds", "Age of the group's newest snapshot when this file was written.", ["group"]).add_metric([group], max(0.0, now.timestamp() - g["newest_snapshot"]))
        if "kept" in g:
            gauge("snapsync_snapshots_kept", "Snapshots retention keeps, on the source or a target.", ["group", "target"]).add_metric([group, ""], g["kept"])
            counter("snapsync_snapshots_deleted", "Snapshots pruned, on the source or a target.", ["group", "target"]).add_metric([group, ""], g.get("deleted_total", 0))
        for kind, n in sorted(g.get("failures", {}).items()):
            counter("snapsync_failures", "Failed steps, by kind (snapshot, hook, replicate, pull, prune, drill).", ["group", "target", "kind"]).add_metric([group, "", kind], n)
        for h in g.get("hooks", []):
            labels = [group, str(h["index"]), h["type"]]
            gauge("snapsync_hook_ok", "1 if the hook succeeded in the group's last snapshot.", ["group", "hook", "type"]).add_metric(labels, float(h["ok"]))
            gauge("snapsync_hook_duration_seconds", "How long the hook took.", ["group", "hook", "type"]).add_metric(labels, h["seconds"])
            if h.get("paused") is not None:
                gauge("snapsync_hook_paused_seconds", "How long a freeze hook kept the application frozen.", ["group", "hook", "type"]).add_metric(labels, h["paused"])
    for _, t in sorted(state.get("targets", {}).items()):
        labels = [t["group"], t["target"]]
        gauge("snapsync_target_ok", "1 if the last replication to (or pull from) the target had no error.", ["group", "target", "direction"]).add_metric([*labels, t["direction"]], float(t["ok"]))
        if "last_success" in t:
            gauge("snapsync_target_last_success_timestamp_seconds", "When replication to the target last succeeded.", ["group", "target"]).add_metric(labels, t["last_success"])
        if "newest_copy" in t:
            gauge("snapsync_target_newest_copy_timestamp_seconds", "When the newest snapshot the target holds of every dataset was taken.", ["group", "target"]).add_metric(labels, t["newest_copy"])
        if "lag" in t:
            gauge("snapsync_target_lag_seconds", "How far the target's newest copy is behind the source's newest snapshot.", ["group", "target"]).add_metric(labels, t["lag"])
        gauge("snapsync_target_last_duration_seconds", "How long the last replication to the target took.", ["group", "target"]).add_metric(labels, t["last_duration"])
        gauge("snapsync_target_last_sent_bytes", "Bytes sent to the target in the last run.", ["group", "target"]).add_metric(labels, t["last_sent_bytes"])
        counter("snapsync_sent_bytes", "Bytes of snapshot streams sent to the target.", ["group", "target"]).add_metric(labels, t["sent_bytes_total"])
        counter("snapsync_sent_snapshots", "Snapshot streams sent to the target.", ["group", "target"]).add_metric(labels, t["sent_total"])
        counter("snapsync_failures", "Failed steps, by kind (snapshot, hook, replicate, pull, prune, drill).", ["group", "target", "kind"]).add_metric([*labels, "pull" if t["direction"] == "pull" else "replicate"], t.get("failures_total", 0))
        if "kept" in t:
            gauge("snapsync_snapshots_kept", "Snapshots retention keeps, on the source or a target.", ["group", "target"]).add_metric(labels, t["kept"])
            counter("snapsync_snapshots_deleted", "Snapshots pruned, on the source or a target.", ["group", "target"]).add_metric(labels, t.get("deleted_total", 0))
    for _, d in sorted(state.get("drills", {}).items()):
        labels = [d["group"], d["target"]]
        gauge("snapsync_drill_ok", "1 if the last restore drill from the target passed.", ["group", "target"]).add_metric(labels, float(d["ok"]))
        gauge("snapsync_drill_last_run_timestamp_seconds", "When the last restore drill finished.", ["group", "target"]).add_metric(labels, d["last_run"])
        if "last_success" in d:
            gauge("snapsync_drill_last_success_timestamp_seconds", "When a restore drill from the target last passed.", ["group", "target"]).add_metric(labels, d["last_success"])
        gauge("snapsync_drill_duration_seconds", "How long the last drill took.", ["group", "target"]).add_metric(labels, d["duration"])
        gauge("snapsync_drill_restored_bytes", "Bytes the last drill restored.", ["group", "target"]).add_metric(labels, d["restored_bytes"])
        counter("snapsync_failures", "Failed steps, by kind (snapshot, hook, replicate, pull, prune, drill).", ["group", "target", "kind"]).add_metric([*labels, "drill"], d.get("failures_total", 0))
    return list(fams.values())


class _Families(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


def state_path() -> Path:
    return state_dir() / "metrics.json"


def textfile_path(policy: Policy) -> Path:
    return Path(policy.monitoring.textfile) if policy.monitoring.textfile else state_dir() / "metrics" / "snapsync.prom"


def policy_limits(policy: Policy) -> dict[tuple[str, str], tuple[float, float]]:
    from snapsync.check import thresholds

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


def write_textfile(path: Path, state: State, now: datetime, host: str, limits: Limits | None = None) -> None:
    """Atomically: a temporary file beside it (not ``*.prom``, so the collector never reads it half
    written), renamed over. Mode 0644 whatever the umask: node_exporter runs as another user."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families(state, now, host, limits)))
    data = generate_latest(registry)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True)
        path.parent.chmod(0o755)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _save(policy: Policy, state: State, now: datetime) -> None:
    """Metrics never fail a backup: a problem writing them is logged, and the command's exit status stands."""
    try:
        write_json(state_path(), state)
        write_textfile(textfile_path(policy), state, now, policy.host or socket.gethostname().split(".")[0], policy_limits(policy))
    except OSError as e:
        log.warning("could not write metrics: %s", e, extra={"event": "metrics-failed"})


def record_run(
    policy: Policy, command: str, reports: Sequence[GroupReport], started: datetime, finished: datetime,
    error: str | None = None,
) -> None:
    prefixes = {name: g.prefix for name, g in policy.groups.items()}
    prefixes |= {name: p.prefix or policy.defaults.prefix for name, p in policy.pulls.items()}
    state = observe_run(read_json(state_path()) or {}, command, reports, started, finished, prefixes, error)
    _save(policy, state, finished)


def record_drills(policy: Policy, reports: Sequence[DrillReport], finished: datetime) -> None:
    _save(policy, observe_drills(read_json(state_path()) or {}, reports, finished), finished)
