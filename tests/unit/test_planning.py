"""Pure group planning: names, due slots, and merging per-dataset listings into group snapshots."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapsync.backends.base import SnapshotInfo
from snapsync.plan.naming import parse_snapshot_name, snapshot_name
from snapsync.plan.groups import is_due, merge_listing, next_due

T = datetime(2026, 11, 26, 12, 0, 3, tzinfo=UTC)


def test_names_round_trip_and_sort_by_time() -> None:
    times = [T + timedelta(hours=h, seconds=s) for h in (0, 1, 25) for s in (0, 59)]
    names = [snapshot_name("snapsync", t) for t in times]
    assert names == sorted(names)
    assert [parse_snapshot_name("snapsync", n) for n in names] == times
    assert snapshot_name("nas-1", T) == "nas-1_2026-11-26T12:00:03Z"


def test_names_are_always_utc() -> None:
    from zoneinfo import ZoneInfo

    berlin = T.astimezone(ZoneInfo("Europe/Berlin"))
    assert snapshot_name("p", berlin) == snapshot_name("p", T)
    with pytest.raises(ValueError):
        snapshot_name("p", datetime(2026, 1, 1))


@pytest.mark.parametrize(
    "name",
    ["snapsync_2026-11-26T12:00:03", "snapsync_2026-13-26T12:00:03Z", "snapsyncx_2026-11-26T12:00:03Z",
     "xsnapsync_2026-11-26T12:00:03Z", "snapsync_2026-11-26T12:00:03Z.partial", "manual"],
)
def test_foreign_names_do_not_parse(name: str) -> None:
    assert parse_snapshot_name("snapsync", name) is None


def test_prefix_with_regex_characters_is_literal() -> None:
    assert parse_snapshot_name("a.b", "a.b_2026-11-26T12:00:03Z") == T
    assert parse_snapshot_name("a.b", "axb_2026-11-26T12:00:03Z") is None


@pytest.mark.parametrize(
    ("newest", "now", "due"),
    [
        (None, T, True),
        (T, T + timedelta(minutes=59, seconds=50), False),
        (datetime(2026, 11, 26, 12, 0, 3, tzinfo=UTC), datetime(2026, 11, 26, 13, 0, 1, tzinfo=UTC), True),
        (datetime(2026, 11, 26, 12, 0, 3, tzinfo=UTC), datetime(2026, 11, 26, 12, 59, 59, tzinfo=UTC), False),
        (datetime(2026, 11, 26, 11, 59, 59, tzinfo=UTC), datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC), True),
    ],
)
def test_hourly_slots(newest: datetime | None, now: datetime, due: bool) -> None:
    assert is_due(newest, timedelta(hours=1), now) is due


def test_daily_slot_is_utc_midnight() -> None:
    day = timedelta(days=1)
    assert not is_due(datetime(2026, 11, 26, 0, 0, 5, tzinfo=UTC), day, datetime(2026, 11, 26, 23, 59, tzinfo=UTC))
    assert is_due(datetime(2026, 11, 26, 23, 59, tzinfo=UTC), day, datetime(2026, 11, 27, 0, 0, 1, tzinfo=UTC))


def _snap(ds: str, name: str, kind: str = "snapshot") -> SnapshotInfo:
    return SnapshotInfo(dataset=ds, name=name, created=T, guid=name + ds, location=f"{ds}/{name}", kind=kind)  # type: ignore[arg-type]


def test_merge_groups_names_across_datasets_and_separates_foreign() -> None:
    a1, a2 = "snapsync_2026-11-26T10:00:00Z", "snapsync_2026-11-26T11:00:00Z"
    listing = merge_listing(
        "snapsync",
        {"a": [_snap("a", a1), _snap("a", a2), _snap("a", "manual")], "b": [_snap("b", a2), _snap("b", a1, "bookmark")]},
    )
    assert [(s.name, s.datasets) for s in listing.snapshots] == [(a1, ("a",)), (a2, ("a", "b"))]
    assert sorted(s.name for s in listing.foreign) == sorted([a1, "manual"])
    assert listing.newest_before(T) is not None
    assert listing.newest_before(datetime(2026, 11, 26, 10, 30, tzinfo=UTC)).name == a1  # type: ignore[union-attr]
    assert listing.newest_before(datetime(2020, 1, 1, tzinfo=UTC)) is None


def test_a_snapshot_dated_in_the_future_does_not_block_new_ones() -> None:
    future = "snapsync_2038-01-01T00:00:00Z"
    listing = merge_listing("snapsync", {"a": [_snap("a", future)]})
    newest = listing.newest_before(T)
    assert newest is None and is_due(None, timedelta(hours=1), T)


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
       st.sampled_from([timedelta(minutes=15), timedelta(hours=1), timedelta(hours=6), timedelta(days=1), timedelta(days=7)]))
def test_next_due_is_the_first_moment_a_run_takes_a_snapshot(newest: datetime, interval: timedelta) -> None:
    due = next_due(newest, interval)
    assert newest < due <= newest + interval
    assert is_due(newest, interval, due)
    assert not is_due(newest, interval, due - timedelta(microseconds=1))
