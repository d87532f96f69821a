"""Properties of plan_prune that must hold for any snapshots, rules and clock, checked with hypothesis."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from snapsync.plan.retention import PrunePlan, RetentionRules, plan_prune

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
BASE = datetime(2026, 3, 1, tzinfo=timezone.utc)
TYPICAL_GAPS = [0, 60, 17 * 60, 3600, 5 * 3600, 86400, 3 * 86400, 9 * 86400, 40 * 86400]
GAPS = st.sampled_from(TYPICAL_GAPS) | st.integers(1, 200_000)
COUNTS = st.integers(0, 5)
FAST = settings(max_examples=150, deadline=None)


@dataclass(frozen=True)
class Snap:
    name: str
    created: datetime


@st.composite
def snapshot_sets(draw: st.DrawFn, min_size: int = 0, max_size: int = 30) -> list[Snap]:
    """Clustered and sparse times (ties included), names unrelated to time order, input order shuffled."""
    gaps = draw(st.lists(GAPS, min_size=min_size, max_size=max_size))
    moment = BASE + timedelta(seconds=draw(st.integers(0, 300 * 86400)))
    times = []
    for gap in gaps:
        moment += timedelta(seconds=gap)
        times.append(moment)
    names = draw(st.permutations([f"s{i:03d}" for i in range(len(times))]))
    return draw(st.permutations([Snap(n, t) for n, t in zip(names, times)]))


rules_strategy = st.builds(
    RetentionRules,
    keep_last=COUNTS,
    keep_within=st.none() | st.integers(1, 30 * 86400).map(lambda s: timedelta(seconds=s)),
    hourly=COUNTS,
    daily=COUNTS,
    weekly=COUNTS,
    monthly=COUNTS,
    yearly=COUNTS,
    timezone=st.sampled_from(ZONES),
)


def now_near(snaps: Sequence[Snap], shift_seconds: int) -> datetime:
    """A clock near the newest snapshot: sometimes before it, so future snapshots occur."""
    return max((s.created for s in snaps), default=BASE) + timedelta(seconds=shift_seconds)


SHIFTS = st.integers(-3 * 86400, 3 * 86400)


def kept(plan: PrunePlan) -> dict[str, tuple[str, ...]]:
    return {d.name: d.reasons for d in plan.kept}


def survivors(snaps: Sequence[Snap], plan: PrunePlan) -> list[Snap]:
    names = {d.name for d in plan.kept}
    return [s for s in snaps if s.name in names]


@FAST
@given(snapshot_sets(), rules_strategy, SHIFTS)
def test_one_decision_per_snapshot_sorted_and_keep_iff_reasons(
    snaps: list[Snap], rules: RetentionRules, shift: int
) -> None:
    plan = plan_prune(snaps, rules, now_near(snaps, shift))
    assert sorted(d.name for d in plan.decisions) == sorted(s.name for s in snaps)
    order = [(d.created, d.name) for d in plan.decisions]
    assert order == sorted(order)
    assert all(d.keep == bool(d.reasons) for d in plan.decisions)
    assert set(plan.kept) | set(plan.removed) == set(plan.decisions)


@FAST
@given(snapshot_sets(min_size=1), rules_strategy, SHIFTS)
def test_never_empty_and_the_newest_is_always_kept(snaps: list[Snap], rules: RetentionRules, shift: int) -> None:
    now = now_near(snaps, shift)
    plan = plan_prune(snaps, rules, now)
    assert plan.kept
    past = [s for s in snaps if s.created <= now]
    if past:
        newest = max(past, key=lambda s: (s.created, s.name))
        assert [d.name for d in plan.decisions if "newest" in d.reasons] == [newest.name]
        assert kept(plan)[newest.name][0] == "newest"
    else:
        assert all(d.reasons[0] == "future" for d in plan.decisions)
    assert {d.name for d in plan.future} == {s.name for s in snaps if s.created > now}


@FAST
@given(snapshot_sets(), rules_strategy, SHIFTS)
def test_planning_the_kept_set_again_keeps_all_of_it_for_the_same_reasons(
    snaps: list[Snap], rules: RetentionRules, shift: int
) -> None:
    now = now_near(snaps, shift)
    first = plan_prune(snaps, rules, now)
    second = plan_prune(survivors(snaps, first), rules, now)
    assert second.removed == ()
    assert kept(second) == kept(first)


@FAST
@given(snapshot_sets(), rules_strategy, SHIFTS)
def test_input_order_does_not_matter(snaps: list[Snap], rules: RetentionRules, shift: int) -> None:
    now = now_near(snaps, shift)
    assert plan_prune(snaps, rules, now) == plan_prune(reversed(snaps), rules, now)


@FAST
@given(snapshot_sets(), rules_strategy, SHIFTS, st.lists(COUNTS, min_size=6, max_size=6), st.integers(0, 86400))
def test_more_permissive_rules_never_keep_fewer(
    snaps: list[Snap], rules: RetentionRules, shift: int, extra: list[int], extra_within: int
) -> None:
    wider = replace(
        rules,
        keep_last=rules.keep_last + extra[0],
        hourly=rules.hourly + extra[1],
        daily=rules.daily + extra[2],
        weekly=rules.weekly + extra[3],
        monthly=rules.monthly + extra[4],
        yearly=rules.yearly + extra[5],
        keep_within=(rules.keep_within or timedelta(0)) + timedelta(seconds=extra_within) or None,
    )
    now = now_near(snaps, shift)
    assert set(kept(plan_prune(snaps, rules, now))) <= set(kept(plan_prune(snaps, wider, now)))


@FAST
@given(
    snapshot_sets(min_size=1),
    snapshot_sets(),
    COUNTS.map(lambda n: n + 1),
    st.sampled_from(ZONES),
    SHIFTS,
    st.integers(0, 90 * 86400),
)
def test_daily_representative_stays_until_n_newer_days_have_snapshots(
    snaps: list[Snap], later: list[Snap], count: int, zone: str, shift: int, advance: int
) -> None:
    """Daily-only policy, N days. Kept as ``daily X`` at ``now``; then prune, add snapshots newer than all
    existing ones and plan again at a later ``now``: it is still ``daily X`` exactly while fewer than N
    local days after X hold a (non-future) snapshot."""
    rules = RetentionRules(daily=count, timezone=zone)
    now = now_near(snaps, shift)
    first = plan_prune(snaps, rules, now)
    newest = max(s.created for s in snaps)
    added = [Snap(f"new-{s.name}", newest + timedelta(seconds=1) + (s.created - BASE)) for s in later]
    after = [*survivors(snaps, first), *added]
    later_now = max(now, now_near(after, shift)) + timedelta(seconds=advance)
    second = kept(plan_prune(after, rules, later_now))

    def local_day(moment: datetime) -> date:
        return moment.astimezone(ZoneInfo(zone)).date()

    for decision in first.kept:
        label = next((r for r in decision.reasons if r.startswith("daily ")), None)
        if label is None:
            continue
        day = local_day(decision.created)
        assert label == f"daily {day.isoformat()}"
        newer_days = {local_day(s.created) for s in after if s.created <= later_now and local_day(s.created) > day}
        assert (label in second.get(decision.name, ())) == (len(newer_days) < count)


def prune_incrementally(
    batches: Sequence[tuple[datetime, Sequence[Snap]]], rules: RetentionRules, pins: Mapping[str, Sequence[str]]
) -> PrunePlan:
    """What the runner does: each run sees what earlier runs left, plus what arrived since."""
    alive: list[Snap] = []
    plan = PrunePlan(now=BASE, decisions=())
    for now, batch in batches:
        plan = plan_prune([*alive, *batch], rules, now, pins)
        alive = survivors([*alive, *batch], plan)
    return plan


@settings(max_examples=100, deadline=None)
@given(snapshot_sets(min_size=1, max_size=40), rules_strategy, st.data())
def test_pruning_run_by_run_keeps_what_one_plan_over_everything_keeps(
    snaps: list[Snap], rules: RetentionRules, data: st.DataObject
) -> None:
    """Same property as the 90-day simulation, for arbitrary arrivals: batches in any order (late arrivals
    older than what is already there, snapshots dated after the run's clock), any clock that never goes
    backwards, fixed pins; the last run finds nothing new, as a timer-driven runner often does."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(snaps)), max_size=10)))
    batches_of_snaps = [snaps[a:b] for a, b in zip([0, *cuts], [*cuts, len(snaps)])]
    steps = data.draw(st.lists(st.integers(0, 3 * 86400), min_size=len(cuts) + 1, max_size=len(cuts) + 1))
    now = min(s.created for s in snaps) + timedelta(seconds=data.draw(SHIFTS))
    batches = []
    for batch, step in zip(batches_of_snaps, steps):
        now += timedelta(seconds=step)
        batches.append((now, batch))
    batches.append((now, []))
    pinned = data.draw(st.lists(st.sampled_from([s.name for s in snaps]), max_size=3))
    pins = {name: ["replication base"] for name in pinned}

    assert kept(prune_incrementally(batches, rules, pins)) == kept(plan_prune(snaps, rules, now, pins))


def test_ninety_days_of_hourly_runs_keep_what_one_plan_would() -> None:
    """Snapshot every hour for 90 days in Europe/Berlin (across the October switch), prune after each one,
    and compare with a single plan over every snapshot ever taken, at the end.

    This holds exactly, reasons included, not just approximately. Two facts give it:
    (1) whatever a run removes, a later run (same rules and pins, clock not earlier) would remove too:
        keep_within and keep_last only get stricter as time and snapshots are added; a snapshot that is
        not the oldest of its period never becomes the oldest by additions; and a period outside the N
        latest periods with a snapshot stays outside, because period order depends only on the calendar;
    (2) removing snapshots that a plan removes does not change that plan: the N latest periods each keep
        their oldest snapshot, so the same periods stay the latest N with the same representatives, and
        the keep_last and newest snapshots are still there.
    So every run's survivors are exactly what a one-shot plan at that run's clock keeps. It breaks if the
    clock goes backwards or pins are added for snapshots already removed (see the next test).
    """
    start = datetime(2026, 9, 1, tzinfo=timezone.utc)
    rules = RetentionRules(
        keep_last=3,
        keep_within=timedelta(hours=6),
        hourly=24,
        daily=7,
        weekly=4,
        monthly=3,
        yearly=1,
        timezone="Europe/Berlin",
    )
    times = [start + timedelta(hours=i) for i in range(90 * 24)]
    snaps = [Snap(f"{t:%Y-%m-%dT%H:%MZ}", t) for t in times]
    pins = {snaps[0].name: ["replication base for nas"]}
    batches = [(s.created + timedelta(minutes=5), [s]) for s in snaps]

    incremental = kept(prune_incrementally(batches, rules, pins))
    assert incremental == kept(plan_prune(snaps, rules, batches[-1][0], pins))
    assert incremental[snaps[0].name] == ("monthly 2026-09", "yearly 2026", "replication base for nas")
    assert incremental["2026-10-31T23:00Z"] == ("monthly 2026-11",)
    assert len(incremental) <= 1 + 3 + 6 + 24 + 7 + 4 + 3 + 1


def test_incremental_pruning_needs_a_clock_that_does_not_go_backwards() -> None:
    """The clock steps back an hour after a run: the one-shot plan would keep 10:00 (then the newest, with
    11:00 in the future), but the earlier run already removed it. Hence the runner's monotonic-clock rule."""
    a, b = Snap("a", BASE + timedelta(hours=10)), Snap("b", BASE + timedelta(hours=11))
    rules = RetentionRules()
    batches = [(BASE + timedelta(hours=11, minutes=30), [a, b]), (BASE + timedelta(hours=10, minutes=30), [])]
    assert kept(prune_incrementally(batches, rules, {})) == {"b": ("future",)}
    assert kept(plan_prune([a, b], rules, batches[-1][0])) == {"a": ("newest",), "b": ("future",)}
