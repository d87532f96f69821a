"""A year of hourly snapshots in Europe/Berlin, checked against Berlin time worked out by hand.

The expectation never touches zoneinfo: local time comes from the EU rule (UTC+1; UTC+2 from the last
Sunday of March 01:00 UTC until the last Sunday of October 01:00 UTC) and buckets from plain date
arithmetic, so a zone-handling bug in the implementation cannot hide in the expectation as well.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

import pytest

from snapsync.plan.retention import PrunePlan, RetentionRules, plan_prune

START = datetime(2026, 1, 1, tzinfo=timezone.utc)
END = datetime(2027, 1, 1, tzinfo=timezone.utc)
RULES = RetentionRules(hourly=48, daily=14, weekly=8, monthly=12, yearly=2, timezone="Europe/Berlin")


@dataclass(frozen=True)
class Snap:
    name: str
    created: datetime


def last_sunday(year: int, month: int) -> date:
    last = date(year, month + 1, 1) - timedelta(days=1)
    return last - timedelta(days=(last.weekday() + 1) % 7)


def berlin(utc: datetime) -> tuple[datetime, int]:
    """Naive Berlin wall-clock time and the offset in hours, by the EU rule."""
    naive = utc.replace(tzinfo=None)
    summer_from = datetime.combine(last_sunday(naive.year, 3), datetime.min.time()) + timedelta(hours=1)
    summer_until = datetime.combine(last_sunday(naive.year, 10), datetime.min.time()) + timedelta(hours=1)
    offset = 2 if summer_from <= naive < summer_until else 1
    return naive + timedelta(hours=offset), offset


def iso_week(day: date) -> tuple[int, int]:
    """ISO year and week: the week belongs to the year of its Thursday."""
    thursday = day - timedelta(days=day.weekday()) + timedelta(days=3)
    return thursday.year, (thursday - date(thursday.year, 1, 1)).days // 7 + 1


Bucketing = Callable[[datetime, int], tuple[Hashable, str]]
HAND_BUCKETS: dict[str, Bucketing] = {
    "hourly": lambda t, o: ((t.date(), t.hour, o), f"hourly {t:%Y-%m-%dT%H}+0{o}:00"),
    "daily": lambda t, o: (t.date(), f"daily {t:%Y-%m-%d}"),
    "weekly": lambda t, o: (iso_week(t.date()), "weekly {}-W{:02d}".format(*iso_week(t.date()))),
    "monthly": lambda t, o: ((t.year, t.month), f"monthly {t:%Y-%m}"),
    "yearly": lambda t, o: (t.year, f"yearly {t.year}"),
}


def hourly_run(start: datetime = START, end: datetime = END) -> list[Snap]:
    hours = int((end - start) / timedelta(hours=1))
    times = [start + timedelta(hours=i) for i in range(hours)]
    return [Snap(f"{t:%Y-%m-%dT%H:%MZ}", t) for t in times]


def expected_reasons(snapshots: list[Snap], rules: RetentionRules) -> dict[str, list[str]]:
    """Oldest snapshot of each of the N latest periods, with periods in the order they first appear."""
    reasons: dict[str, list[str]] = {snapshots[-1].name: ["newest"]}
    for rule, bucket in HAND_BUCKETS.items():
        first: dict[Hashable, tuple[str, str]] = {}
        for snap in snapshots:
            key, label = bucket(*berlin(snap.created))
            first.setdefault(key, (snap.name, label))
        count: int = getattr(rules, rule)
        for name, label in list(first.values())[-count:] if count else []:
            reasons.setdefault(name, []).append(label)
    return reasons


def reasons_by_name(plan: PrunePlan) -> dict[str, list[str]]:
    return {d.name: list(d.reasons) for d in plan.kept}


def test_hand_rule_agrees_with_known_2026_switches() -> None:
    assert (last_sunday(2026, 3), last_sunday(2026, 10)) == (date(2026, 3, 29), date(2026, 10, 25))
    assert berlin(datetime(2026, 3, 29, 0, 59)) == (datetime(2026, 3, 29, 1, 59), 1)
    assert berlin(datetime(2026, 3, 29, 1, 0)) == (datetime(2026, 3, 29, 3, 0), 2)
    assert berlin(datetime(2026, 10, 25, 0, 59)) == (datetime(2026, 10, 25, 2, 59), 2)
    assert berlin(datetime(2026, 10, 25, 1, 0)) == (datetime(2026, 10, 25, 2, 0), 1)


def test_year_of_hourly_snapshots_matches_the_hand_computed_plan() -> None:
    snapshots = hourly_run()
    plan = plan_prune(snapshots, RULES, END)
    assert reasons_by_name(plan) == expected_reasons(snapshots, RULES)
    assert len(plan.decisions) == 8760


def test_last_snapshot_of_2026_utc_is_already_2027_in_berlin() -> None:
    plan = plan_prune(hourly_run(), RULES, END)
    assert plan.decisions[-1].reasons == (
        "newest",
        "hourly 2027-01-01T00+01:00",
        "daily 2027-01-01",
        "monthly 2027-01",
        "yearly 2027",
    )
    assert reasons_by_name(plan)["2026-01-01T00:00Z"] == ["yearly 2026"]
    assert "weekly 2026-W53" in reasons_by_name(plan)["2026-12-27T23:00Z"]


@pytest.fixture(scope="module")
def everything() -> PrunePlan:
    """Counts large enough that every hour and day of the year is a kept period."""
    return plan_prune(hourly_run(), RetentionRules(hourly=10_000, daily=1_000, timezone="Europe/Berlin"), END)


def labels_on(plan: PrunePlan, prefix: str) -> list[str]:
    return [r for d in plan.decisions for r in d.reasons if r.startswith(prefix)]


def test_fall_back_day_has_two_separate_two_oclock_hours(everything: PrunePlan) -> None:
    reasons = reasons_by_name(everything)
    assert reasons["2026-10-25T00:00Z"] == ["hourly 2026-10-25T02+02:00"]
    assert reasons["2026-10-25T01:00Z"] == ["hourly 2026-10-25T02+01:00"]
    assert len(labels_on(everything, "hourly 2026-10-25T")) == 25


def test_spring_forward_day_has_23_hours_and_no_two_oclock(everything: PrunePlan) -> None:
    hours = labels_on(everything, "hourly 2026-03-29T")
    assert len(hours) == 23
    assert not [h for h in hours if h.startswith("hourly 2026-03-29T02")]
    assert reasons_by_name(everything)["2026-03-29T01:00Z"] == ["hourly 2026-03-29T03+02:00"]


def test_ordinary_day_has_24_hours(everything: PrunePlan) -> None:
    assert len(labels_on(everything, "hourly 2026-07-14T")) == 24


@pytest.mark.parametrize(
    "day, first_snapshot",
    [
        ("2026-01-15", "2026-01-14T23:00Z"),
        ("2026-03-29", "2026-03-28T23:00Z"),
        ("2026-03-30", "2026-03-29T22:00Z"),
        ("2026-07-01", "2026-06-30T22:00Z"),
        ("2026-10-25", "2026-10-24T22:00Z"),
        ("2026-10-26", "2026-10-25T23:00Z"),
    ],
)
def test_daily_buckets_follow_local_midnight(everything: PrunePlan, day: str, first_snapshot: str) -> None:
    daily = {r: d.name for d in everything.decisions for r in d.reasons if r.startswith("daily ")}
    assert daily[f"daily {day}"] == first_snapshot
    assert len(daily) == 366  # 2026-01-01 .. 2027-01-01: the last UTC hour is already 1 January in Berlin
