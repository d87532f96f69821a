"""Which holds and bookmarks have outlived their use, from one dataset's listing alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from snapsync.plan.holds import Held, leftovers, lost_hold_pins, pull_tag, target_tag

NOW = datetime(2026, 6, 1, tzinfo=UTC)
USB, NAS = target_tag("usb"), pull_tag("nas", "app")
DAY = timedelta(days=1)


def snap(name: str, days_ago: float, *holds: str) -> Held:
    return Held(name, NOW - days_ago * DAY, "snapshot", holds)


def mark(name: str, days_ago: float) -> Held:
    return Held(name, NOW - days_ago * DAY, "bookmark")


def test_a_bookmark_goes_once_every_holder_holds_something_newer() -> None:
    entries = [mark("a", 39), mark("b", 35), snap("b", 35), snap("c", 1, USB)]
    result = leftovers(entries, [USB], {}, NOW, 30 * DAY)
    assert set(result.drop_bookmarks) == {"a", "b"} and result.kept_bookmarks == {}
    # The bookmark of the held snapshot stays: it is what survives the snapshot.
    result = leftovers([*entries, mark("c", 1)], [USB], {}, NOW, 30 * DAY)
    assert set(result.drop_bookmarks) == {"a", "b"} and "usb" in result.kept_bookmarks["c"]


def test_a_holder_that_holds_nothing_or_lost_its_base_keeps_every_bookmark() -> None:
    entries = [mark("a", 9), snap("c", 1, USB)]
    assert "offsite holds nothing" in leftovers(entries, [USB, target_tag("offsite")], {}, NOW, None).kept_bookmarks["a"]
    lost = leftovers(entries, [USB], {USB: NOW - 2 * DAY}, NOW, None)
    assert lost.drop_bookmarks == {} and "deleted by hand" in lost.kept_bookmarks["a"]


def test_with_no_holder_left_a_bookmark_goes_after_the_grace() -> None:
    result = leftovers([mark("a", 9), snap("c", 1)], [], {}, NOW, 30 * DAY)
    assert result.drop_bookmarks == {} and "added back within 4w2d" in result.kept_bookmarks["a"]
    result = leftovers([mark("a", 31), snap("c", 1)], [], {}, NOW, 30 * DAY)
    assert result.drop_bookmarks == {"a": "no target or pulling host of this group needs it"}


def test_a_pull_hold_expires_only_when_something_newer_waited_that_long() -> None:
    # Nothing newer to fetch: an idle source must not expire its pulling host's hold.
    assert leftovers([snap("a", 60, NAS)], [], {}, NOW, 30 * DAY).release == {}
    # Something newer, but not for long enough yet.
    assert leftovers([snap("a", 60, NAS), snap("b", 10)], [], {}, NOW, 30 * DAY).release == {}
    expired = leftovers([snap("a", 60, NAS), snap("b", 31), mark("a", 60)], [], {}, NOW, 30 * DAY)
    assert expired.release and "a" in expired.drop_bookmarks
    assert list(expired.release) == [NAS] and "nas.app has not pulled" in expired.release[NAS]
    assert "a" in expired.drop_bookmarks  # the released puller no longer needs its bookmark
    # Without an expiry, never; a snapshot dated in the future does not count as waiting.
    assert leftovers([snap("a", 60, NAS), snap("b", 31)], [], {}, NOW, None).release == {}
    assert leftovers([snap("a", 60, NAS), snap("b", -40)], [], {}, NOW, 30 * DAY).release == {}


def test_a_lost_hold_pins_every_older_snapshot_of_ours_only_for_a_holder_still_configured() -> None:
    entries = [snap("a", 9), snap("b", 5), snap("d", 1), mark("z", 20)]
    pins = lost_hold_pins(entries, {USB: NOW - 3 * DAY}, {USB: "base for usb"})
    assert pins == {"a": ["base for usb"], "b": ["base for usb"]}
    assert lost_hold_pins(entries, {USB: None}, {USB: "x"}).keys() == {"a", "b", "d"}
    assert lost_hold_pins(entries, {USB: NOW}, {}) == {}
