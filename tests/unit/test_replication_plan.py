"""Pure replication planning: worked cases in a compact notation, then a send/receive simulation."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from snapsync.plan.replication import (
    DeletePartial,
    Diverged,
    DropFutureCopy,
    NoCommonBase,
    ReplicationPlan,
    Resume,
    RollbackTarget,
    SendFull,
    SendIncremental,
    TargetSnapshot,
    plan_replication,
    replication_pins,
    target_pins,
)
from snapsync.plan.snapshots import SnapshotId

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(n: int) -> datetime:
    """The time in the n-th snapshot's name; the plan reads only the order of the list."""
    return T0 + timedelta(hours=n)


def src(spec: str) -> list[SnapshotId]:
    """``"#a:1 b:2"``: bookmark a (guid 1), then snapshot b (guid 2), oldest first."""
    return [
        SnapshotId(w.lstrip("#").split(":")[0], at(i), w.split(":")[1], kind="bookmark" if w[0] == "#" else "snapshot")
        for i, w in enumerate(spec.split())
    ]


def tgt(spec: str) -> list[TargetSnapshot]:
    """``"a:1 b:-~ c:3*"``: ``-`` no source guid, ``~`` incomplete, ``*`` modified after receive."""
    out = []
    for w in spec.split():
        name, rest = w.split(":")
        guid = rest.rstrip("~*")
        out.append(TargetSnapshot(name, None if guid == "-" else guid, "~" not in rest, "*" in rest))
    return out


def show(plan: ReplicationPlan) -> list[str]:
    out = []
    for step in plan.steps:
        match step:
            case DeletePartial(name):
                out.append(f"del {name}")
            case DropFutureCopy(name):
                out.append(f"drop {name}")
            case Resume(token):
                out.append(f"resume {token}")
            case SendFull(snap):
                out.append(f"full {snap.name}")
            case SendIncremental(base, snap):
                out.append(f"inc {'#' if base.kind == 'bookmark' else ''}{base.name}>{snap.name}")
            case RollbackTarget(to, destroys):
                out.append(f"rollback {to} -{','.join(destroys)}")
    return out


def plan(source: str, target: str, **kw: object) -> ReplicationPlan:
    return plan_replication(src(source), tgt(target), **kw)  # type: ignore[arg-type]


def test_first_replication_is_full_of_oldest_then_incrementals() -> None:
    p = plan("a:1 b:2 c:3", "")
    assert show(p) == ["full a", "inc a>b", "inc b>c"]
    assert p.base is None and p.conflict is None


def test_up_to_date_and_one_behind() -> None:
    assert show(plan("a:1 b:2 c:3", "a:1 b:2 c:3")) == []
    assert plan("a:1 b:2 c:3", "a:1 b:2 c:3").base == "c"
    assert show(plan("a:1 b:2 c:3", "a:1 b:2")) == ["inc b>c"]
    assert show(plan("b:2 c:3", "a:1 b:2")) == ["inc b>c"]


def test_base_is_found_by_identity_not_by_name() -> None:
    renamed = plan("a:1 b:2 c:3", "old-b:2")
    assert (renamed.base, show(renamed)) == ("b", ["inc b>c"])
    impostor = plan("a:1 b:2 c:3", "b:2 c:9")
    assert impostor.base == "b"
    assert impostor.conflict == Diverged("b", ("c",), ("c",))


def test_bookmark_serves_as_base_but_is_never_sent() -> None:
    assert show(plan("#a:1 b:2 #c:3 d:4", "a:1")) == ["inc #a>b", "inc b>d"]
    assert show(plan("#a:1", "a:1")) == []
    assert show(plan("a:1 #a:1 b:2", "a:1")) == ["inc a>b"]
    assert show(plan("#a:1 b:2", "")) == ["full b"]


def test_partial_receive_is_deleted_first_and_ignored_as_base() -> None:
    assert show(plan("a:1 b:2", "a:1 b:-~")) == ["del b", "inc a>b"]
    assert show(plan("a:1 b:2", "a:2~")) == ["del a", "full a", "inc a>b"]


def test_writable_changed_copy_is_not_a_base_and_not_deleted_silently() -> None:
    p = plan("a:1 b:2 c:3", "a:1 b:-*")
    assert p.steps == () and p.conflict == Diverged("a", ("b",), ("b", "c"))
    assert isinstance(plan("a:1", "a:1*").conflict, NoCommonBase)


def test_diverged_target_is_refused_with_names() -> None:
    p = plan("a:1 b:2 c:3", "a:1 b:2 x:7 y:8")
    assert p.steps == ()
    assert p.conflict == Diverged("b", ("x", "y"), ("c",))
    text = p.conflict.message()
    assert "'b'" in text and "x, y" in text and "c" in text and 'on_diverged = "rollback"' in text


def test_diverged_target_rolls_back_when_asked() -> None:
    p = plan("a:1 b:2 c:3", "a:1 old-b:2 x:7~ y:8", on_diverged="rollback")
    assert show(p) == ["del x", "rollback old-b -y", "inc b>c"]
    assert p.conflict is None


def test_no_common_base_is_refused_not_overwritten() -> None:
    p = plan("a:1 b:2", "a:9 z:8")
    assert p.steps == () and p.base is None
    assert p.conflict == NoCommonBase(("a", "z"))
    assert "a, z" in p.conflict.message() and "Delete" in p.conflict.message()


def test_resume_token_comes_alone_and_asks_for_replan() -> None:
    p = plan("a:1 b:2 c:3", "a:1", resume_token="1-abc")
    assert show(p) == ["resume 1-abc"]
    assert p.needs_replan and p.base == "a"


def test_pins() -> None:
    assert replication_pins(src("a:1 b:2 c:3"), tgt("x:1 y:2"), "nas") == {"b": ["replication base for nas"]}
    assert target_pins(src("a:1 b:2 c:3"), tgt("x:1 y:2"), "laptop") == {"y": ["replication base from laptop"]}
    assert replication_pins(src("a:1"), tgt(""), "nas") == {}
    assert replication_pins(src("a:1"), tgt("a:1~"), "nas") == {}
    assert replication_pins(src("#a:1 b:2"), tgt("a:1"), "nas") == {}
    assert target_pins(src("#a:1 b:2"), tgt("a:1"), "laptop") == {"a": ["replication base from laptop"]}


def _receive(target: list[TargetSnapshot], p: ReplicationPlan) -> int:
    """A strict ZFS-like receiver: an incremental needs its base as the target's newest copy."""
    fulls = 0
    for step in p.steps:
        match step:
            case SendFull(snap):
                assert not target, "full send over existing copies"
                fulls += 1
            case SendIncremental(base, snap):
                assert target and target[-1].source_guid == base.guid, "incremental without its base"
            case _:
                raise AssertionError(f"unexpected step {step}")
        assert snap.kind == "snapshot"
        target.append(TargetSnapshot(f"{snap.name}@t", snap.guid))
    return fulls


@settings(max_examples=300, deadline=None)
@given(st.data(), st.booleans())
def test_simulation_never_loses_history_or_resends_full(data: st.DataObject, bookmarks: bool) -> None:
    source: list[SnapshotId] = []
    target: list[TargetSnapshot] = []
    counter = itertools.count()
    fulls = 0
    kinds = ["create", "create", "prune", "prune_target", "replicate"]
    ops = data.draw(st.lists(st.sampled_from(kinds), max_size=40))
    for op in ops + ["replicate"]:
        if op == "create":
            n = next(counter)
            source.append(SnapshotId(f"s{n}", at(n), f"g{n}"))
        elif op == "prune":
            pinned = replication_pins(source, target, "t")
            for i, snap in enumerate(source):
                if snap.kind == "snapshot" and data.draw(st.booleans()):
                    if bookmarks and data.draw(st.booleans()):
                        source[i] = SnapshotId(snap.name, snap.created, snap.guid, kind="bookmark")
                    elif snap.name not in pinned:
                        source[i] = SnapshotId("", snap.created, "", kind="bookmark")
            source = [s for s in source if s.name]
        elif op == "prune_target":
            pinned = target_pins(source, target, "s")
            target = [t for t in target if t.name in pinned or not data.draw(st.booleans())]
        else:
            p = plan_replication(source, target)
            assert p.conflict is None, p.conflict.message()
            older = source[: [s.name for s in source].index(p.base) + 1] if p.base else []
            fulls += _receive(target, p)
            held = {t.source_guid for t in target}
            assert all(s.guid in held for s in source if s.kind == "snapshot" and s not in older)
            assert plan_replication(source, target).steps == ()
    assert fulls <= 1


def test_a_snapshot_dated_after_now_is_never_sent_nor_a_base() -> None:
    # c is the 3rd snapshot (at(2)); the clock reads at(1): c was taken while the clock was wrong.
    p = plan("a:1 b:2 c:3", "a:1", now=at(1))
    assert show(p) == ["inc a>b"] and p.base == "a" and p.future == ("c",)
    # Already sent while the clock was ahead: its copy goes (the source keeps it), the base is b again.
    p = plan("a:1 b:2 c:3 d:4", "a:1 b:2 c:3", now=at(1))
    assert show(p) == ["drop c"] and p.base == "b" and p.conflict is None and p.future == ("c", "d")
    # A real snapshot taken after the clock was fixed sorts before the future one, and is sent.
    future_first = [*src("a:1 b:2"), SnapshotId("n", at(1) + timedelta(minutes=30), "9"), SnapshotId("f", at(9), "3")]
    p = plan_replication(future_first, tgt("a:1 b:2 f:3"), now=at(2))
    assert show(p) == ["drop f", "inc b>n"] and p.future == ("f",)
    # Without a clock nothing is in the future (the old behaviour, for callers that plan offline).
    assert show(plan("a:1 b:2 c:3", "a:1")) == ["inc a>b", "inc b>c"]


def test_copies_the_source_sent_and_lost_are_history_not_a_divergence() -> None:
    # c was the held base and was deleted by hand on the source; the target still has it.
    assert plan("a:1 b:2 d:4", "a:1 b:2 c:3").conflict is not None
    p = plan("a:1 b:2 d:4", "a:1 b:2 c:3", sent_before=["c"])
    assert show(p) == ["inc b>d"] and p.base == "b" and p.conflict is None
    # Copies after the lost one are still a divergence: the source never sent them.
    p = plan("a:1 b:2 d:4", "a:1 b:2 c:3 x:7", sent_before=["c"])
    assert isinstance(p.conflict, Diverged) and p.conflict.target_only == ("x",)
