"""The metrics state and textfile, pure: what a failed run keeps, what accumulates, what Prometheus reads."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from snapsync import __version__
from snapsync.recovery.drill import DrillReport
from snapsync.ops.hooks import Check, HookReport
from snapsync.host.logs import JsonFormatter, TextFormatter
from snapsync.ops.metrics import METRICS, Family, _policy_of, exposition, observe_drills, observe_run, write_textfile
from snapsync.replication.replicate import Sent, TargetReport
from snapsync.ops.runner import GroupReport
from tests.promtext import Metrics

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
PREFIXES = {"db": "snapsync"}


def good(at: datetime) -> GroupReport:
    name = f"snapsync_{at.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    target = TargetReport("db", "nas", sent=[Sent("/x", name, None, 1000, 1.0)], newest_source=name,
                          newest_common=name, newest_common_time=at, lag=timedelta(0), seconds=2.5, reached=True)
    return GroupReport("db", snapshot=name, targets=[target], hooks=[HookReport(0, "postgres", seconds=0.2)])


def test_a_failed_run_keeps_the_last_success_and_counts_the_failure(tmp_path: Path) -> None:
    state = observe_run({}, "run", [good(T0)], T0, T0 + timedelta(seconds=5), PREFIXES)
    failed = GroupReport("db", errors=["hook 0 (postgres) failed: refused (snapshot skipped)"], failures=["hook"],
                         hooks=[HookReport(0, "postgres", status="failed", message="refused")],
                         targets=[TargetReport("db", "nas", errors=["target unreachable: x"])])
    later = T0 + timedelta(hours=1)
    state = observe_run(state, "run", [failed], later, later + timedelta(seconds=9), PREFIXES)
    state = observe_run(state, "run", [good(T0 + 2 * timedelta(hours=1))], later, later + timedelta(hours=1), PREFIXES)
    state = observe_run(state, "run", [failed], later, later + timedelta(hours=2), PREFIXES)
    json.dumps(state)  # it is stored as JSON
    path = tmp_path / "snapsync.prom"
    write_textfile(path, state, later + timedelta(hours=2), "host1", policy="db")
    m = Metrics(path)
    assert m.one("snapsync_info", version=__version__, host="host1") == 1
    assert m.one("snapsync_last_run_success", command="run") == 0
    assert m.one("snapsync_last_success_timestamp_seconds", command="run") == (later + timedelta(hours=1)).timestamp()
    assert m.one("snapsync_failures_total", group="db", target="", kind="hook") == 2
    assert m.one("snapsync_failures_total", group="db", target="nas", kind="replicate") == 2
    assert m.one("snapsync_sent_bytes_total", group="db", target="nas") == 2000
    assert m.one("snapsync_target_last_sent_bytes", group="db", target="nas") == 0
    assert m.one("snapsync_newest_snapshot_timestamp_seconds", group="db") == (T0 + 2 * timedelta(hours=1)).timestamp()
    assert m.one("snapsync_newest_snapshot_age_seconds", group="db") == 3600
    assert m.one("snapsync_hook_ok", group="db", hook="0", type="postgres") == 0
    assert m.one("snapsync_target_last_success_timestamp_seconds", group="db", target="nas") == (later + timedelta(hours=1)).timestamp()


def test_dry_runs_change_nothing_and_drills_are_remembered(tmp_path: Path) -> None:
    dry = GroupReport("db", dry_run=True, snapshot="snapsync_2026-11-26T12:00:00Z")
    assert observe_run({}, "run", [dry], T0, T0, PREFIXES)["groups"] == {}
    ok = DrillReport("db", "nas", T0, "s", 12.0, 4096, [Check("files /x", True, "identical")])
    bad = DrillReport("db", "nas", T0, "s", 3.0, 0, [], error="chunk damaged")
    state = observe_drills(observe_drills({}, [ok], T0), [bad], T0 + timedelta(days=1))
    path = tmp_path / "d.prom"
    write_textfile(path, state, T0 + timedelta(days=1), "h", policy="db")
    m = Metrics(path)
    assert m.one("snapsync_drill_ok", group="db", target="nas") == 0
    assert m.one("snapsync_drill_last_success_timestamp_seconds", group="db", target="nas") == T0.timestamp()
    assert m.one("snapsync_failures_total", group="db", target="nas", kind="drill") == 1


def record(msg: str, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("snapsync", logging.WARNING, __file__, 1, msg, (), None)
    r.__dict__.update(extra)
    return r


def test_log_lines_stay_one_line() -> None:
    text = TextFormatter().format(record("stderr said:\nline two\r\n"))
    assert text == "snapsync: warning: stderr said:\\nline two\\r\\n"
    hostile = TextFormatter().format(record("peer said: \x1b[2J\x1b]0;owned\x07 \u202egnp.exe"))
    assert hostile == "snapsync: warning: peer said: \\x1b[2J\\x1b]0;owned\\x07 \\u202egnp.exe"
    entry = json.loads(JsonFormatter().format(record("sent\nit", event="sent", group="db", bytes=5)))
    assert (entry["msg"], entry["event"], entry["group"], entry["bytes"], entry["level"]) == ("sent\nit", "sent", "db", 5, "warning")
    assert "\n" not in JsonFormatter().format(record("a\nb"))


def test_what_the_policy_no_longer_has_is_forgotten() -> None:
    from snapsync.ops.metrics import forget

    state = observe_run({}, "run", [good(T0)], T0, T0, PREFIXES)
    state = observe_drills(state, [DrillReport("db", "nas", T0, "s", 1.0, 1, [Check("files /x", True, "ok")])], T0)
    kept = forget(state, {"db": (("nas",), 1)})
    assert kept == state
    no_hooks = forget(state, {"db": (("nas",), 0)})
    assert no_hooks["groups"]["db"]["hooks"] == [] and no_hooks["targets"] and no_hooks["drills"]
    no_target = forget(state, {"db": ((), 1)})
    assert no_target["targets"] == {} and no_target["drills"] == {} and no_target["groups"]["db"]["hooks"]
    assert forget(state, {"web": ((), 0)}) == {"commands": state["commands"], "groups": {}, "targets": {}, "drills": {}}


def test_a_command_that_failed_as_a_whole_is_counted() -> None:
    state = observe_run({}, "run", [good(T0)], T0, T0, PREFIXES)
    state = observe_run(state, "run", [], T0, T0 + timedelta(hours=1), PREFIXES, error="RuntimeError: boom")
    assert state["commands"]["run"]["failures"] == 1 and state["commands"]["run"]["ok"] is False
    assert state["commands"]["run"]["last_success"] == T0.timestamp()
    assert state["groups"]["db"]["ok"] is True  # nothing was learnt about the group


def test_fail_goes_on_the_path() -> None:
    from snapsync.ops.ping import ping_url

    assert ping_url("https://hc-ping.com/abc", healthy=False) == "https://hc-ping.com/abc/fail"
    assert ping_url("https://hc.example/ping/abc/?rid=1", healthy=False) == "https://hc.example/ping/abc/fail?rid=1"
    assert ping_url("https://hc.example/ping/abc?rid=1", healthy=True) == "https://hc.example/ping/abc?rid=1"


def test_the_newest_snapshot_follows_a_prune_plan_back_after_one_was_deleted_by_hand() -> None:
    from snapsync.plan.retention import Decision, PrunePlan

    state = observe_run({}, "run", [good(T0 + timedelta(hours=2))], T0, T0, PREFIXES)
    older = f"snapsync_{T0.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    pruned = GroupReport("db", plan=PrunePlan(T0 + timedelta(hours=3), (Decision(older, T0, True, ("keep_last",)),)))
    assert observe_run(state, "prune", [pruned], T0, T0, PREFIXES)["groups"]["db"]["newest_snapshot"] == T0.timestamp()
    replicated = GroupReport("db", targets=[TargetReport("db", "nas", newest_source=older)])
    assert observe_run(state, "replicate", [replicated], T0, T0, PREFIXES)["groups"]["db"]["newest_snapshot"] == (T0 + timedelta(hours=2)).timestamp()


label_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12) | st.sampled_from(['a"b', "a\\b", "a\nb", "\\n", '\\"'])
values = st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0, 1.0, 1e7, 9999999.0, 1796529128.25, 1e-9, float("inf"), float("-inf")]) | st.integers(-(10**12), 10**12).map(float)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(METRICS)), st.lists(st.tuples(label_text, label_text, label_text, label_text, values), max_size=4)),
                max_size=6, unique_by=lambda t: t[0]))
def test_the_textfile_is_byte_for_byte_what_prometheus_client_writes(chosen: list[tuple[str, list[tuple[str, str, str, str, float]]]]) -> None:
    """The hand-written exposition against the library's own: same help, type lines, label order, escaping, floats."""
    ours, theirs = [], []
    for name, rows in chosen:
        kind, labels, doc = METRICS[name]
        names = ("policy", *labels)
        mine = Family(name, kind, doc, names)
        lib = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=names)
        for row in rows:
            values_, value = list(row[: len(names)]), row[4]
            mine.add(values_, value)
            lib.add_metric(values_, value)
        ours.append(mine)
        theirs.append(lib)

    class Collected(Collector):
        def collect(self) -> Iterator[Metric]:
            return iter(theirs)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collected())
    assert exposition(ours) == generate_latest(registry)


def test_the_textfile_reads_back_with_prometheus_clients_parser(tmp_path: Path) -> None:
    state = observe_run({}, "run", [good(T0)], T0, T0 + timedelta(seconds=3), PREFIXES)
    path = tmp_path / "m.prom"
    write_textfile(path, state, T0 + timedelta(minutes=1), 'h"o\\st\n', policy="p\\q")
    m = Metrics(path)
    assert m.policy == "p\\q"
    assert m.one("snapsync_info", version=__version__, host='h"o\\st\n') == 1
    assert m.one("snapsync_sent_bytes_total", group="db", target="nas") == 1000
    assert m.one("snapsync_textfile_written_timestamp_seconds") == (T0 + timedelta(minutes=1)).timestamp()


@settings(max_examples=200, deadline=None)
@given(label_text, label_text)
def test_the_policy_of_a_textfile_is_read_back_from_its_info_line(policy: str, host: str) -> None:
    info = Family("snapsync_info", "gauge", "doc", ("policy", "version", "host"))
    info.add([policy, __version__, host], 1)
    text = exposition([info])
    assert _policy_of(text) == policy
    assert _policy_of(text.rstrip(b"\n")[:-4]) is None  # a line cut short names no policy


def test_a_hostile_info_line_is_read_in_linear_time() -> None:
    for hostile in ('snapsync_info{a="' + '\\"' * 20000, 'snapsync_info{' + 'a="",' * 10000 + 'b', 'snapsync_info{' + 'a' * 60000):
        assert _policy_of(hostile.encode()) is None
