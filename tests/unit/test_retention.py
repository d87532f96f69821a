"""Hand-worked retention examples: each expected value below was worked out on paper from docs/retention.md."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from snapsync.plan.retention import PrunePlan, RetentionRules, plan_prune

BERLIN = ZoneInfo("Europe/Berlin")


@dataclass(frozen=True)
class Snap:
    name: str
    created: datetime


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def snaps(*stamps: str) -> list[Snap]:
    """Snapshots named after their own UTC time, so expectations read as times."""
    return [Snap(s, at(s)) for s in stamps]


def kept(plan: PrunePlan) -> dict[str, tuple[str, ...]]:
    return {d.name: d.reasons for d in plan.kept}


def test_empty_input_gives_empty_plan() -> None:
    plan = plan_prune([], RetentionRules(daily=7), at("2026-11-24T12:00Z"))
    assert plan.decisions == () and plan.kept == () and plan.removed == () and plan.to_json() == []


def test_without_rules_only_the_newest_survives() -> None:
    stamps = snaps("2026-11-24T09:00Z", "2026-11-24T10:00Z", "2026-11-24T08:00Z")
    plan = plan_prune(stamps, RetentionRules(), at("2026-11-24T12:00Z"))
    assert kept(plan) == {"2026-11-24T10:00Z": ("newest",)}
    assert [d.name for d in plan.removed] == ["2026-11-24T08:00Z", "2026-11-24T09:00Z"]


def test_keep_last_counts_the_newest() -> None:
    plan = plan_prune(
        snaps("2026-11-24T08:00Z", "2026-11-24T09:00Z", "2026-11-24T10:00Z", "2026-11-24T11:00Z"),
        RetentionRules(keep_last=2),
        at("2026-11-24T12:00Z"),
    )
    assert kept(plan) == {"2026-11-24T10:00Z": ("keep_last",), "2026-11-24T11:00Z": ("newest", "keep_last")}


def test_keep_within_is_inclusive_and_measured_from_now() -> None:
    plan = plan_prune(
        snaps("2026-11-22T11:59Z", "2026-11-22T12:00Z", "2026-11-23T12:00Z"),
        RetentionRules(keep_within=timedelta(days=2)),
        at("2026-11-24T12:00Z"),
    )
    assert kept(plan) == {
        "2026-11-22T12:00Z": ("keep_within 2d",),
        "2026-11-23T12:00Z": ("newest", "keep_within 2d"),
    }


def test_keep_within_label_uses_the_policy_duration_form() -> None:
    rules = RetentionRules(keep_within=timedelta(hours=36))
    plan = plan_prune(snaps("2026-11-24T11:00Z"), rules, at("2026-11-24T12:00Z"))
    assert kept(plan) == {"2026-11-24T11:00Z": ("newest", "keep_within 1d12h")}


def test_hourly_keeps_oldest_of_each_hour_and_skips_empty_hours() -> None:
    stamps = snaps("2026-11-24T10:05Z", "2026-11-24T10:40Z", "2026-11-24T11:10Z", "2026-11-24T13:20Z")
    now = at("2026-11-24T13:30Z")
    assert kept(plan_prune(stamps, RetentionRules(hourly=3), now)) == {
        "2026-11-24T10:05Z": ("hourly 2026-11-24T10+00:00",),
        "2026-11-24T11:10Z": ("hourly 2026-11-24T11+00:00",),
        "2026-11-24T13:20Z": ("newest", "hourly 2026-11-24T13+00:00"),
    }
    assert "2026-11-24T10:05Z" not in kept(plan_prune(stamps, RetentionRules(hourly=2), now))


def test_weekend_off_does_not_wipe_daily_history() -> None:
    """Twice a day Mon-Fri, nothing at the weekend, planned Monday noon: 3 dailies = Mon, Fri, Thu."""
    days = ["2026-11-16", "2026-11-17", "2026-11-18", "2026-11-19", "2026-11-20"]
    stamps = snaps(*[f"{d}T{h}Z" for d in days for h in ("09:00", "17:00")], "2026-11-23T09:00Z")
    plan = plan_prune(stamps, RetentionRules(daily=3), at("2026-11-23T12:00Z"))
    assert kept(plan) == {
        "2026-11-19T09:00Z": ("daily 2026-11-19",),
        "2026-11-20T09:00Z": ("daily 2026-11-20",),
        "2026-11-23T09:00Z": ("newest", "daily 2026-11-23"),
    }


def test_representative_is_the_oldest_and_later_arrivals_do_not_change_it() -> None:
    rules = RetentionRules(daily=1)
    morning = snaps("2026-11-24T09:00Z", "2026-11-24T17:00Z")
    evening = [*morning, *snaps("2026-11-24T20:00Z")]
    assert kept(plan_prune(morning, rules, at("2026-11-24T18:00Z")))["2026-11-24T09:00Z"] == ("daily 2026-11-24",)
    assert kept(plan_prune(evening, rules, at("2026-11-24T21:00Z"))) == {
        "2026-11-24T09:00Z": ("daily 2026-11-24",),
        "2026-11-24T20:00Z": ("newest",),
    }


def test_daily_follows_local_midnight_of_the_policy_zone() -> None:
    """23:30Z on the 23rd is 00:30 on the 24th in Berlin (UTC+1 in November)."""
    stamps = snaps("2026-11-23T22:00Z", "2026-11-23T23:30Z", "2026-11-24T10:00Z")
    now = at("2026-11-24T12:00Z")
    assert kept(plan_prune(stamps, RetentionRules(daily=2, timezone="Europe/Berlin"), now)) == {
        "2026-11-23T22:00Z": ("daily 2026-11-23",),
        "2026-11-23T23:30Z": ("daily 2026-11-24",),
        "2026-11-24T10:00Z": ("newest",),
    }
    assert kept(plan_prune(stamps, RetentionRules(daily=2), now)) == {
        "2026-11-23T22:00Z": ("daily 2026-11-23",),
        "2026-11-24T10:00Z": ("newest", "daily 2026-11-24"),
    }


def test_iso_weeks_across_the_year_boundary() -> None:
    """2026 starts on a Thursday, so it has a week 53: Mon 2026-12-28 .. Sun 2027-01-03."""
    stamps = snaps(
        "2025-12-29T12:00Z", "2026-12-28T12:00Z", "2026-12-31T12:00Z", "2027-01-01T12:00Z", "2027-01-04T12:00Z"
    )
    plan = plan_prune(stamps, RetentionRules(weekly=3), at("2027-01-04T13:00Z"))
    assert kept(plan) == {
        "2025-12-29T12:00Z": ("weekly 2026-W01",),
        "2026-12-28T12:00Z": ("weekly 2026-W53",),
        "2027-01-04T12:00Z": ("newest", "weekly 2027-W01"),
    }


def test_dec_31_and_jan_1_share_week_53() -> None:
    stamps = snaps("2026-12-31T12:00Z", "2027-01-01T12:00Z")
    plan = plan_prune(stamps, RetentionRules(weekly=5), at("2027-01-02T00:00Z"))
    assert kept(plan) == {"2026-12-31T12:00Z": ("weekly 2026-W53",), "2027-01-01T12:00Z": ("newest",)}


def test_monthly_and_yearly() -> None:
    months = [f"{y}-{m:02d}-15T12:00Z" for y in (2024, 2025, 2026) for m in range(1, 13)]
    stamps = snaps(*[m for m in months if "2024-01" <= m[:7] <= "2026-09"])
    plan = plan_prune(stamps, RetentionRules(monthly=3, yearly=2), at("2026-11-24T00:00Z"))
    assert kept(plan) == {
        "2025-01-15T12:00Z": ("yearly 2025",),
        "2026-01-15T12:00Z": ("yearly 2026",),
        "2026-07-15T12:00Z": ("monthly 2026-07",),
        "2026-08-15T12:00Z": ("monthly 2026-08",),
        "2026-09-15T12:00Z": ("newest", "monthly 2026-09"),
    }


def test_monthly_uses_the_local_calendar() -> None:
    """22:30Z on 30 September is 00:30 on 1 October in Berlin (UTC+2 in summer)."""
    stamps = snaps("2026-09-30T21:00Z", "2026-09-30T22:30Z", "2026-10-05T00:00Z")
    plan = plan_prune(stamps, RetentionRules(monthly=2, timezone="Europe/Berlin"), at("2026-10-06T00:00Z"))
    assert kept(plan) == {
        "2026-09-30T21:00Z": ("monthly 2026-09",),
        "2026-09-30T22:30Z": ("monthly 2026-10",),
        "2026-10-05T00:00Z": ("newest",),
    }


def test_future_snapshots_are_kept_and_left_out_of_counting() -> None:
    """If the future day counted, daily=1 would pick it and 11-24 would lose its daily; so would keep_last."""
    stamps = snaps("2026-11-23T10:00Z", "2026-11-24T10:00Z", "2026-11-24T12:00Z", "2026-11-25T10:00Z")
    plan = plan_prune(stamps, RetentionRules(keep_last=1, daily=1), at("2026-11-24T12:00Z"))
    assert kept(plan) == {
        "2026-11-24T10:00Z": ("daily 2026-11-24",),
        "2026-11-24T12:00Z": ("newest", "keep_last"),
        "2026-11-25T10:00Z": ("future",),
    }
    assert [d.name for d in plan.future] == ["2026-11-25T10:00Z"]


def test_all_future_means_all_kept_and_none_newest() -> None:
    stamps = snaps("2026-11-25T10:00Z", "2026-11-26T10:00Z")
    plan = plan_prune(stamps, RetentionRules(daily=1), at("2026-11-24T00:00Z"))
    assert kept(plan) == {"2026-11-25T10:00Z": ("future",), "2026-11-26T10:00Z": ("future",)}


def test_pinned_reasons_come_last_and_unknown_pins_are_ignored() -> None:
    stamps = snaps("2026-11-20T10:00Z", "2026-11-22T10:00Z", "2026-11-24T10:00Z", "2026-11-25T10:00Z")
    pins = {
        "2026-11-20T10:00Z": ["replication base for nas"],
        "2026-11-24T10:00Z": ["replication base for usb", "hold: restore"],
        "2026-11-25T10:00Z": ["replication base for nas"],
        "gone": ["replication base for s3"],
    }
    plan = plan_prune(stamps, RetentionRules(keep_last=1), at("2026-11-24T12:00Z"), pinned=pins)
    assert kept(plan) == {
        "2026-11-20T10:00Z": ("replication base for nas",),
        "2026-11-24T10:00Z": ("newest", "keep_last", "replication base for usb", "hold: restore"),
        "2026-11-25T10:00Z": ("future", "replication base for nas"),
    }
    assert [d.name for d in plan.removed] == ["2026-11-22T10:00Z"]
    assert "gone" not in {d.name for d in plan.decisions}


def test_reasons_come_in_the_documented_order() -> None:
    rules = RetentionRules(
        keep_last=1, keep_within=timedelta(days=1), hourly=1, daily=1, weekly=1, monthly=1, yearly=1
    )
    pins = {"2026-11-24T10:00Z": ["pin"]}
    plan = plan_prune(snaps("2026-11-24T10:00Z"), rules, at("2026-11-24T12:00Z"), pinned=pins)
    assert plan.decisions[0].reasons == (
        "newest",
        "keep_last",
        "keep_within 1d",
        "hourly 2026-11-24T10+00:00",
        "daily 2026-11-24",
        "weekly 2026-W48",
        "monthly 2026-11",
        "yearly 2026",
        "pin",
    )


def test_order_is_by_instant_even_when_inputs_share_a_zone_across_fall_back() -> None:
    """02:30+02:00 is 00:30Z, 02:15+01:00 is 01:15Z; a wall-clock comparison would get both wrong."""
    first = Snap("first", datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN))
    second = Snap("second", datetime(2026, 10, 25, 2, 15, tzinfo=BERLIN, fold=1))
    now = datetime(2026, 10, 25, 2, 20, tzinfo=BERLIN, fold=1)
    plan = plan_prune([second, first], RetentionRules(), now)
    assert [(d.name, d.reasons) for d in plan.decisions] == [("first", ()), ("second", ("newest",))]
    assert plan.future == ()


def test_ties_on_time_are_ordered_by_name() -> None:
    stamps = [*snaps("2026-11-24T10:00Z"), Snap("a", at("2026-11-24T10:00Z"))]
    plan = plan_prune(stamps, RetentionRules(), at("2026-11-24T12:00Z"))
    assert [d.name for d in plan.decisions] == ["2026-11-24T10:00Z", "a"]
    assert kept(plan) == {"a": ("newest",)}


@pytest.mark.parametrize(
    "stamps, now",
    [
        ([Snap("naive", datetime(2026, 11, 24, 10))], at("2026-11-24T12:00Z")),
        (snaps("2026-11-24T10:00Z"), datetime(2026, 11, 24, 12)),
        (snaps("2026-11-24T10:00Z", "2026-11-24T10:00Z"), at("2026-11-24T12:00Z")),
    ],
    ids=["naive-created", "naive-now", "duplicate-name"],
)
def test_bad_input_raises_value_error(stamps: list[Snap], now: datetime) -> None:
    with pytest.raises(ValueError):
        plan_prune(stamps, RetentionRules(), now)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"daily": -1},
        {"keep_last": -1},
        {"keep_within": timedelta(0)},
        {"timezone": "Mars/Olympus"},
        {"timezone": ""},
    ],
)
def test_bad_rules_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetentionRules(**kwargs)  # type: ignore[arg-type]


def test_decisions_keep_the_created_value_as_given() -> None:
    local = Snap("s", datetime(2026, 11, 24, 11, 0, tzinfo=BERLIN))
    plan = plan_prune([local], RetentionRules(), at("2026-11-24T12:00Z"))
    assert plan.decisions[0].created is local.created


def test_to_json_shape() -> None:
    stamps = [
        Snap("b", datetime(2026, 7, 1, 0, 0, tzinfo=BERLIN)),
        Snap("a", at("2026-07-01T08:00:00.250000+00:00")),
    ]
    plan = plan_prune(stamps, RetentionRules(), at("2026-07-02T00:00Z"))
    out = plan.to_json()
    assert out == [
        {"name": "b", "created": "2026-06-30T22:00:00Z", "keep": False, "reasons": []},
        {"name": "a", "created": "2026-07-01T08:00:00.250000Z", "keep": True, "reasons": ["newest"]},
    ]
    assert json.loads(json.dumps(out)) == out


def test_hours_are_ordered_by_time_where_dst_ends_inside_an_hour() -> None:
    """Pacific/Chatham leaves DST at 03:45 local (+13:45 -> +12:45): local 03:05 (DST) is earlier
    than the 02:50 after the change, and ``hourly = 1`` keeps the later one."""
    from datetime import UTC as utc

    from snapsync.plan.retention import RetentionRules as Rules, plan_prune as plan

    @dataclass(frozen=True)
    class Snap:
        name: str
        created: datetime

    before = Snap("before-change", datetime(2026, 4, 4, 13, 20, tzinfo=utc))  # 03:05 +13:45
    after = Snap("after-change", datetime(2026, 4, 4, 14, 5, tzinfo=utc))  # 02:50 +12:45
    assert before.created.astimezone(ZoneInfo("Pacific/Chatham")).hour == 3
    assert after.created.astimezone(ZoneInfo("Pacific/Chatham")).hour == 2
    result = plan([before, after], Rules(hourly=1, timezone="Pacific/Chatham"), datetime(2026, 4, 4, 14, 30, tzinfo=utc))
    reasons = {d.name: d.reasons for d in result.decisions}
    assert any(r.startswith("hourly") for r in reasons["after-change"])
    assert not any(r.startswith("hourly") for r in reasons["before-change"])
