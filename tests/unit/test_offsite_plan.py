"""Offsite planning: what is uploaded as full or incremental, and retention that never breaks a chain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from snapsync.plan.offsite import (
    NEWEST,
    PartialUpload,
    Stored,
    chain,
    plan_store_prune,
    plan_uploads,
)
from snapsync.plan.groups import GroupSnapshot
from snapsync.plan.retention import RetentionRules
from snapsync.plan.retention import plan_prune as plain_prune
from snapsync.plan.snapshots import SnapshotId

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def snap(hour: int, guid: str | None = None) -> SnapshotId:
    return SnapshotId(f"s{hour:04d}", T0 + timedelta(hours=hour), guid or f"g{hour}")


def stored(hour: int, parent: int | None, guid: str | None = None) -> Stored:
    return Stored(
        f"s{hour:04d}", T0 + timedelta(hours=hour), guid or f"g{hour}",
        None if parent is None else f"s{parent:04d}", None if parent is None else f"g{parent}",
    )


def test_an_empty_store_gets_the_newest_snapshot_as_a_full_upload() -> None:
    plan = plan_uploads([snap(0), snap(1), snap(2)], [], [], 5)
    assert [(u.name, u.parent) for u in plan.uploads] == [("s0002", None)]
    assert plan.bases == ()


def test_a_snapshot_dated_after_now_is_neither_uploaded_nor_a_base() -> None:
    now = T0 + timedelta(hours=3)
    plan = plan_uploads([snap(0), snap(1), snap(900)], [stored(0, None)], [], 5, now)
    assert [(u.name, u.parent) for u in plan.uploads] == [("s0001", "s0000")] and plan.bases == ("s0000",)
    assert any("s0900" in n and "after this host's clock" in n for n in plan.notes)
    # Uploaded while the clock was ahead: the chain goes on from the newest real upload.
    plan = plan_uploads([snap(0), snap(1), snap(2), snap(900)], [stored(0, None), stored(1, 0), stored(900, 1)], [], 5, now)
    assert [(u.name, u.parent) for u in plan.uploads] == [("s0002", "s0001")] and plan.bases == ("s0000", "s0001")


def test_newer_snapshots_follow_incrementally_until_a_new_chain_is_due_by_count() -> None:
    plan = plan_uploads([snap(h) for h in range(8)], [stored(0, None), stored(1, 0)], [], 3)
    assert plan.bases == ("s0000", "s0001")  # the full starts the month: the next month's first upload starts from it
    assert [(u.name, u.parent) for u in plan.uploads] == [
        ("s0002", "s0001"), ("s0003", "s0002"), ("s0004", None), ("s0005", "s0004"),
        ("s0006", "s0005"), ("s0007", "s0006"),
    ]


def test_a_new_chain_is_due_by_the_age_of_its_full_upload() -> None:
    plan = plan_uploads([snap(h) for h in range(0, 72, 12)], [stored(0, None)], [], timedelta(days=1))
    assert [(u.name, u.parent) for u in plan.uploads] == [
        ("s0012", "s0000"), ("s0024", None), ("s0036", "s0024"), ("s0048", None), ("s0060", "s0048"),
    ]


def test_a_stored_snapshot_is_no_base_when_the_source_has_another_one_of_that_name() -> None:
    plan = plan_uploads([snap(0, guid="other"), snap(1)], [stored(0, None)], [], 10)
    assert [(u.name, u.parent) for u in plan.uploads] == [("s0001", None)]
    assert plan.bases == () and "not the snapshot stored" in plan.notes[0]


def test_a_base_gone_from_the_source_starts_a_new_chain_without_deleting_anything() -> None:
    plan = plan_uploads([snap(5)], [stored(0, None), stored(1, 0)], [], 10)
    assert [(u.name, u.parent) for u in plan.uploads] == [("s0005", None)]
    assert not plan.discard


def test_an_unfinished_upload_of_the_same_stream_is_continued_others_are_discarded() -> None:
    partials = [PartialUpload("s0002", "g2", "s0001", 3), PartialUpload("s0009", "g9", None, 1)]
    plan = plan_uploads([snap(h) for h in range(4)], [stored(0, None), stored(1, 0)], partials, 10)
    assert [(u.name, u.resume_from) for u in plan.uploads] == [("s0002", 3), ("s0003", 0)]
    assert plan.discard == ("s0009",)


def test_an_unfinished_upload_with_another_parent_starts_again() -> None:
    plan = plan_uploads([snap(0), snap(1), snap(2)], [stored(0, None), stored(1, 0)], [PartialUpload("s0002", "g2", None, 2)], 10)
    assert plan.uploads[0].resume_from == 0 and plan.discard == ("s0002",)


def test_chain_walks_back_to_the_full_upload_and_refuses_a_gap_or_a_wrong_identity() -> None:
    store = {s.name: s for s in [stored(0, None), stored(1, 0), stored(2, 1)]}
    assert [s.name for s in chain("s0002", store) or []] == ["s0000", "s0001", "s0002"]
    del store["s0001"]
    assert chain("s0002", store) is None
    assert chain("s0001", {"s0001": stored(1, 0), "s0000": stored(0, None, guid="x")}) is None


def test_prune_keeps_the_chain_of_every_kept_snapshot_and_deletes_whole_old_chains() -> None:
    history = [stored(0, None), stored(1, 0), stored(2, 1), stored(3, None), stored(4, 3), stored(5, 4)]
    plan = plan_store_prune({"d": history}, RetentionRules(keep_last=1), T0 + timedelta(hours=6))
    assert plan.delete == {"d": ("s0002", "s0001", "s0000")}
    reasons = {d.name: d.reasons for d in plan.plan.decisions}
    assert NEWEST in reasons["s0005"]
    assert any("base of s0004" in r for r in reasons["s0003"])


def test_prune_deletes_the_tail_of_a_chain_nothing_depends_on() -> None:
    history = [stored(0, None), stored(1, 0), stored(2, 1), stored(3, None)]
    rules = RetentionRules(keep_within=timedelta(hours=1), daily=1)
    plan = plan_store_prune({"d": history}, rules, T0 + timedelta(hours=3, minutes=30))
    kept = {d.name for d in plan.plan.kept}
    assert "s0003" in kept
    for name in kept:
        assert chain(name, {s.name: s for s in history}) is not None
        assert all(link.name in kept for link in chain(name, {s.name: s for s in history}) or [])


def test_broken_chains_are_reported_and_left_alone() -> None:
    history = [stored(1, 0), stored(2, 1), stored(3, None)]
    plan = plan_store_prune({"d": history}, RetentionRules(keep_last=1), T0 + timedelta(hours=4))
    assert plan.broken == {"d": ("s0001", "s0002")}
    assert "d" not in plan.delete


rules_strategy = st.builds(
    RetentionRules,
    keep_last=st.integers(0, 4),
    keep_within=st.one_of(st.none(), st.integers(1, 72).map(lambda h: timedelta(hours=h))),
    hourly=st.integers(0, 12),
    daily=st.integers(0, 7),
    weekly=st.integers(0, 3),
    monthly=st.integers(0, 2),
)


@settings(max_examples=300, deadline=None)
@given(
    rules=rules_strategy,
    full_every=st.one_of(st.integers(0, 6), st.integers(1, 96).map(lambda h: timedelta(hours=h))),
    gaps=st.lists(st.integers(1, 30), min_size=1, max_size=60),
    datasets=st.integers(1, 3),
    misses=st.sets(st.tuples(st.integers(0, 2), st.integers(0, 59)), max_size=20),
    late=st.lists(st.integers(0, 8), min_size=3, max_size=3),
)
def test_retention_in_the_store_never_orphans_an_incremental(
    rules: RetentionRules, full_every: timedelta | int, gaps: list[int], datasets: int, misses: set[tuple[int, int]],
    late: list[int],
) -> None:
    """Simulate runs: each snapshot is uploaded as planned, then the store is pruned, every time.

    A dataset may join the group late (``late``) or miss a run (``misses``: its upload failed that
    time), so the datasets' chains start at different snapshots. After every prune, each stored snapshot's chain is complete, each dataset's newest upload
    is there, and everything the plain retention rules would keep is still there.
    """
    store: dict[str, dict[str, Stored]] = {f"d{i}": {} for i in range(datasets)}
    source: list[SnapshotId] = []
    hour = 0
    for run, gap in enumerate(gaps):
        hour += gap
        source.append(snap(hour))
        now = T0 + timedelta(hours=hour, minutes=5)
        for index, (ds, have) in enumerate(store.items()):
            if (index, run) in misses or run < late[index]:
                continue
            plan = plan_uploads(source, list(have.values()), [], full_every)
            for up in plan.uploads:
                parent = have.get(up.parent) if up.parent else None
                have[up.name] = Stored(up.name, up.created, up.guid, up.parent, parent.guid if parent else None)
        before = {ds: dict(h) for ds, h in store.items()}
        pruned = plan_store_prune({ds: list(h.values()) for ds, h in store.items()}, rules, now)
        for ds, names in pruned.delete.items():
            for name in names:
                del store[ds][name]
        assert not pruned.broken
        for index, (ds, have) in enumerate(store.items()):
            if (index, run) not in misses and run >= late[index]:
                assert source[-1].name in have
            for name in have:
                assert chain(name, have) is not None, f"{name} lost part of its chain"
        # what the rules alone keep, over the group (as local pruning decides), is all still there
        names = {n: s for h in before.values() for n, s in h.items()}
        wanted = plain_prune([GroupSnapshot(n, s.created, ()) for n, s in names.items()], rules, now).kept
        for ds, have in store.items():
            assert {d.name for d in wanted if d.name in before[ds]} <= have.keys()


def test_each_upload_starts_from_the_newest_one_of_a_period_at_least_as_long() -> None:
    """Levelled chains: a month's first upload from the month before's, a week's from the week before's,
    a day's from the day before's, one within a day from the one before it."""
    day = [SnapshotId(f"d{d:03d}", T0 + timedelta(days=d), f"g{d}") for d in range(40)]  # T0 is Sunday 2026-03-01
    extra = SnapshotId("d008-noon", T0 + timedelta(days=8, hours=12), "gn")
    source = sorted([*day, extra], key=lambda s: s.created)
    store: dict[str, Stored] = {}
    for upto in range(1, len(source) + 1):
        plan = plan_uploads(source[:upto], list(store.values()), [], timedelta(days=365))
        for up in plan.uploads:
            parent = store.get(up.parent) if up.parent else None
            store[up.name] = Stored(up.name, up.created, up.guid, up.parent, parent.guid if parent else None)
    parents = {s.name: s.parent for s in store.values()}
    assert parents["d000"] is None and parents["d001"] == "d000"  # Monday: a new week, from the full
    assert parents["d002"] == "d001" and parents["d007"] == "d006" and parents["d008"] == "d001"  # Mondays chain; days follow
    assert parents["d008-noon"] == "d008" and parents["d009"] == "d008"  # a day's later upload is no day's base
    assert parents["d031"] == "d000"  # 2026-04-01: a new month, from March's first
    assert max(len(chain(n, store) or []) for n in store) <= 1 + 1 + 5 + 6 + 1


def _year(full_every: timedelta, days: int = 365) -> tuple[dict[str, Stored], int]:
    """A year of daily snapshots uploaded each day and pruned with policies/q.toml's offsite rules; the
    source keeps a week of its own plus what the offsite target holds. Returns the store and the
    longest chain ever restored from."""
    rules = RetentionRules(keep_last=1, daily=7, weekly=4, monthly=12, yearly=3, timezone="Europe/Berlin")
    store: dict[str, Stored] = {}
    source: list[SnapshotId] = []
    longest = 0
    for d in range(days):
        source.append(SnapshotId(f"s{d:03d}", T0 + timedelta(days=d, hours=3), f"g{d}"))
        plan = plan_uploads(source, list(store.values()), [], full_every, source[-1].created, "Europe/Berlin")
        for up in plan.uploads:
            parent = store.get(up.parent) if up.parent else None
            store[up.name] = Stored(up.name, up.created, up.guid, up.parent, parent.guid if parent else None)
        held = set(plan.uploads[-1].bases if plan.uploads else plan.bases)
        source = [s for s in source if s.name in held or s.created > source[-1].created - timedelta(days=7)]
        pruned = plan_store_prune({"d": list(store.values())}, rules, source[-1].created + timedelta(minutes=5))
        for name in pruned.delete.get("d", ()):
            del store[name]
        assert all(chain(n, store) is not None for n in store)
        longest = max(longest, *(len(chain(n, store) or []) for n in store))
    return store, longest


def test_a_year_holds_one_full_and_the_steps_between_what_retention_keeps() -> None:
    """With a full a year, a year of daily uploads under GFS keeps one full, every kept snapshot restores
    from at most 1 + 12 + 5 + 6 streams, and little is stored that retention does not ask for itself."""
    store, longest = _year(timedelta(days=365))
    fulls = [s for s in store.values() if s.parent is None]
    assert len(fulls) == 1
    assert longest <= 1 + 12 + 5 + 6
    wanted = plain_prune([GroupSnapshot(n, s.created, ()) for n, s in store.items()],
                         RetentionRules(keep_last=1, daily=7, weekly=4, monthly=12, yearly=3, timezone="Europe/Berlin"),
                         max(s.created for s in store.values()) + timedelta(minutes=5)).kept
    assert len(store) <= len(wanted) + 6  # pinned beyond the rules: at most a week's chain
    old, _ = _year(timedelta(days=30))
    assert len([s for s in old.values() if s.parent is None]) >= 12  # a full a month: what the issue measured


def test_an_unfinished_levelled_upload_is_continued_from_the_same_base() -> None:
    """A killed upload of a day's first snapshot (sent from the day before's first, not from the upload
    just before it) is planned again with the same base, so its stored chunks are kept and continued."""
    day0, noon0, day1 = (SnapshotId(n, T0 + delta, f"g-{n}") for n, delta in
                         (("d0", timedelta(0)), ("d0-noon", timedelta(hours=12)), ("d1", timedelta(days=1))))
    store = [Stored("d0", day0.created, day0.guid), Stored("d0-noon", noon0.created, noon0.guid, "d0", day0.guid)]
    first = plan_uploads([day0, noon0, day1], store, [], timedelta(days=365))
    assert [(u.name, u.parent) for u in first.uploads] == [("d1", "d0")]
    again = plan_uploads([day0, noon0, day1], store, [PartialUpload("d1", day1.guid, "d0", 4)], timedelta(days=365))
    assert [(u.name, u.parent, u.resume_from) for u in again.uploads] == [("d1", "d0", 4)] and again.discard == ()
