"""The Receiver contract (snapsync/backends/receiver.py), checked against every receiver with real
streams of real snapshots, made by the source backend of the same filesystem."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from datetime import UTC
from typing import TYPE_CHECKING

import pytest

from snapsync.backends import receiver_for
from snapsync.backends.base import SnapshotInfo
from snapsync.backends.receiver import PartialDelete, PartialReceive
from snapsync.errors import BackendError, DatasetMissing
from snapsync.protocol import Refused

if TYPE_CHECKING:
    from tests.contract.conftest import ReceiverEnv

REL = "app/src"
A, B, C = "snapsync_2026-11-26T12:00:00Z", "snapsync_2026-11-26T13:00:00Z", "snapsync_2026-11-26T14:00:00Z"


def snapshot(env: ReceiverEnv, ds: str, name: str, size: int = 0) -> SnapshotInfo:
    env.source.write(ds, name, os.urandom(size // 2).hex() if size else name)
    (snap,) = env.source.backend.snapshot_group([ds], name)
    return snap


def chain(env: ReceiverEnv, *names: str, size: int = 0) -> tuple[str, list[SnapshotInfo]]:
    ds = env.source.new_dataset("src")
    return ds, [snapshot(env, ds, n, size) for n in names]


def received(env: ReceiverEnv, snaps: list[SnapshotInfo], rel: str = REL) -> None:
    receiver, base = env.receiver(), None
    for snap in snaps:
        with env.stream(snap.dataset, snap.name, base) as fd:
            assert receiver.receive(rel, snap.name, snap.guid, fd)["name"] == snap.name
        base = snap.name


def identities(env: ReceiverEnv, rel: str = REL) -> list[tuple[str, str | None]]:
    """The copies that arrived by receive, by name, with the identity each carries."""
    return sorted((c.name, c.received_uuid) for c in env.receiver().copies(rel) if c.received_uuid is not None)


def test_full_then_incremental_arrive_with_the_sources_identity(receiving: ReceiverEnv) -> None:
    _, (a, b) = chain(receiving, A, B)
    received(receiving, [a, b])
    assert identities(receiving) == [(A, a.guid), (B, b.guid)]


def test_listing_shapes(receiving: ReceiverEnv) -> None:
    receiver = receiving.receiver()
    assert receiver.listing("app/never") == ([], None) and receiver.copies("app/never") == []
    _, snaps = chain(receiving, A, B)
    received(receiving, snaps)
    copies, token = receiver.listing(REL)
    assert token is None and copies == receiver.copies(REL)
    assert sorted(c.name for c in copies) == [A, B]
    for copy in copies:
        assert copy.read_only and not copy.partial and copy.uuid
        assert copy.created.utcoffset() == UTC.utcoffset(None)
        assert type(copy).from_json(copy.to_json()).to_json() == copy.to_json()


def test_a_stream_of_another_snapshot_or_identity_is_refused_and_leaves_nothing(receiving: ReceiverEnv) -> None:
    receiver = receiving.receiver()
    _, (a, b) = chain(receiving, A, B)
    for name, guid in ((B, b.guid), (A, b.guid)):
        with receiving.stream(a.dataset, A) as fd, pytest.raises(BackendError):
            receiver.receive(REL, name, guid, fd)
        assert receiver.listing(REL) == ([], None) and receiving.leftovers(REL) == []
    received(receiving, [a])


def test_an_incremental_on_a_base_the_receiver_lacks_is_refused(receiving: ReceiverEnv) -> None:
    receiver = receiving.receiver()
    _, (a, b, c) = chain(receiving, A, B, C)
    with receiving.stream(b.dataset, B, A) as fd, pytest.raises(BackendError):
        receiver.receive(REL, B, b.guid, fd)  # nothing there yet to build on
    assert receiver.listing(REL) == ([], None)
    received(receiving, [a])
    with receiving.stream(c.dataset, C, B) as fd, pytest.raises(BackendError):
        receiver.receive(REL, C, c.guid, fd)
    assert identities(receiving) == [(A, a.guid)] and receiving.leftovers(REL) == []


def test_receiving_a_name_that_exists_is_refused(receiving: ReceiverEnv) -> None:
    receiver = receiving.receiver()
    _, (a,) = chain(receiving, A)
    received(receiving, [a])
    before = receiver.copies(REL)
    with receiving.stream(a.dataset, A) as fd, pytest.raises(BackendError, match="already exists"):
        receiver.receive(REL, A, a.guid, fd)
    assert receiver.copies(REL) == before


def test_an_interrupted_receive_resumes_where_resumable_and_is_refused_elsewhere(receiving: ReceiverEnv) -> None:
    receiver = receiving.receiver()
    _, (a,) = chain(receiving, A, size=8 << 20)
    if not receiver.capabilities.resumable_receive:
        with receiving.stream(a.dataset, A) as fd, pytest.raises(Refused):
            receiver.resume(REL, fd)
        assert receiver.listing(REL) == ([], None)
        return
    receiving.interrupt(REL, a)
    copies, token = receiver.listing(REL)
    assert copies == [] and token is not None
    with receiving.command(receiving.source.backend.resume_argv(token)) as fd:
        assert receiver.resume(REL, fd)["name"] == A
    assert receiver.listing(REL)[1] is None
    assert identities(receiving) == [(A, a.guid)]


def test_delete_partials_clears_an_interrupted_receive_and_keeps_complete_copies(receiving: ReceiverEnv) -> None:
    receiver = receiving.receiver()
    ds, (a,) = chain(receiving, A)
    b = snapshot(receiving, ds, B, size=8 << 20)
    received(receiving, [a])
    receiving.interrupt(REL, b, base=A)
    assert receiving.leftovers(REL) != []
    receiver.delete_partials(REL, [B])
    assert receiving.leftovers(REL) == [] and identities(receiving) == [(A, a.guid)]
    with receiving.stream(ds, B, A) as fd:
        receiver.receive(REL, B, b.guid, fd)
    assert identities(receiving) == [(A, a.guid), (B, b.guid)]


def test_delete_destroys_only_the_named_copies_and_nothing_that_did_not_arrive_by_receive(receiving: ReceiverEnv) -> None:
    receiver = receiving.receiver()
    _, (a, b) = chain(receiving, A, B)
    received(receiving, [a, b])
    receiving.plant_foreign(REL, C)
    try:
        assert C not in receiver.delete(REL, [C])
    except BackendError:
        pass  # refused outright: as good as left alone
    assert receiving.foreign_present(REL, C)
    assert receiver.delete(REL, [A, "never-existed"]) == [A]
    assert identities(receiving) == [(B, b.guid)] and receiving.foreign_present(REL, C)


@pytest.mark.parametrize("allow_writable", [False, True], ids=["prune", "rollback"])
def test_one_refused_copy_keeps_no_other_and_the_answer_names_what_went(receiving: ReceiverEnv, allow_writable: bool) -> None:
    receiver = receiving.receiver()
    _, (a, b, c) = chain(receiving, A, B, C)
    received(receiving, [a, b, c])
    undo = receiving.refuse_delete(REL, B)
    with pytest.raises(PartialDelete) as refused:
        receiver.delete(REL, [A, B, C], allow_writable=allow_writable)
    assert refused.value.deleted == [A, C]
    error = str(refused.value)
    assert B in error and A not in error and C not in error and "\n" not in error
    assert [copy.name for copy in receiver.copies(REL)] == [B]
    with pytest.raises(PartialDelete) as again:  # nothing more can go, and the answer says so
        receiver.delete(REL, [A, B, C], allow_writable=allow_writable)
    assert again.value.deleted == [] and B in str(again.value)
    undo()
    assert receiver.delete(REL, [A, B, C], allow_writable=True) == [B] and receiver.copies(REL) == []


def test_an_append_only_receiver_never_destroys_a_complete_copy(receiving: ReceiverEnv) -> None:
    ds, (a, b) = chain(receiving, A, B)
    received(receiving, [a, b])
    c = snapshot(receiving, ds, C)
    receiver = receiving.receiver(append_only=True)
    with pytest.raises(Refused):
        receiver.delete(REL, [A])
    with receiving.stream(ds, C, A) as fd:  # forced: where force rolls back, it would take B
        try:
            receiver.receive(REL, C, c.guid, fd, force=True)
        except Refused:
            pass
    assert receiver.delete_partials(REL, []) == []
    assert {(A, a.guid), (B, b.guid)} <= set(identities(receiving))


def test_the_copies_are_a_source_for_the_send_role(receiving: ReceiverEnv) -> None:
    receiver = receiving.receiver()
    _, (a, b) = chain(receiving, A, B)
    received(receiving, [a, b])
    dataset, backend = receiver.source(REL, receiving.source.backend)
    backend.check_dataset(dataset)
    snaps = [s for s in backend.list_snapshots(dataset) if s.kind == "snapshot"]
    assert [(s.name, s.received_guid or s.guid) for s in snaps] == [(A, a.guid), (B, b.guid)]
    dataset, backend = receiver.source("app/never", receiving.source.backend)
    with pytest.raises(DatasetMissing):
        backend.check_dataset(dataset)


def test_check_root_fails_on_a_missing_place(receiving: ReceiverEnv) -> None:
    receiving.receiver().check_root()
    with pytest.raises(BackendError):
        receiver_for(receiving.missing_place).check_root()


@pytest.mark.parametrize("rel", ["../outside", "/absolute", "app/../../outside"])
def test_a_path_that_leaves_the_place_is_refused(receiving: ReceiverEnv, rel: str) -> None:
    receiver = receiving.receiver()
    with open(os.devnull, "rb") as null:
        calls: list[Callable[[], object]] = [
            lambda: receiver.listing(rel), lambda: receiver.receive(rel, A, "1", null.fileno()),
            lambda: receiver.resume(rel, null.fileno()), lambda: receiver.delete(rel, [A]),
            lambda: receiver.delete_partials(rel, [A]), lambda: receiver.source(rel, receiving.source.backend),
        ]
        for call in calls:
            with pytest.raises(Refused):
                call()


D = "snapsync_2026-11-26T15:00:00Z"


def _chain_stream(env: ReceiverEnv, ds: str, names: list[str], base: str, cut: float | None = None) -> int:
    """The source's one-command chain of ``names`` from ``base`` (cut to that share of its bytes)."""
    path = env.tmp / "chain.stream"
    with path.open("wb") as out:
        subprocess.run(env.source.backend.chain_argv(ds, names, base), stdout=out, check=True)
    if cut is not None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])
    return os.open(path, os.O_RDONLY)


def test_a_chain_arrives_in_one_receive_each_copy_built_on_the_one_before(receiving: ReceiverEnv) -> None:
    receiver = receiving.receiver()
    ds, (a, b, c, d) = chain(receiving, A, B, C, D)
    received(receiving, [a])
    if not receiver.capabilities.chained_send:
        _refuses_chains(receiving, ds, b, c)
        return
    fd = _chain_stream(receiving, ds, [B, C, D], A)
    try:
        answer = receiver.receive(REL, B, b.guid, fd, then=[(C, c.guid), (D, d.guid)])
    finally:
        os.close(fd)
    assert answer["received"] == [B, C, D] and answer["name"] == D
    assert identities(receiving) == [(A, a.guid), (B, b.guid), (C, c.guid), (D, d.guid)]
    assert receiving.leftovers(REL) == []


def _refuses_chains(env: ReceiverEnv, ds: str, b: SnapshotInfo, c: SnapshotInfo) -> None:
    """Where a filesystem takes one snapshot per stream, a chain is refused before anything lands."""
    before = identities(env)
    with env.stream(ds, B, A) as fd, pytest.raises(Refused):
        env.receiver().receive(REL, B, b.guid, fd, then=[(C, c.guid)])
    assert identities(env) == before and env.leftovers(REL) == []


@pytest.mark.parametrize("fault", ["a wrong identity in the middle", "a cut stream"])
def test_a_chain_that_stops_keeps_the_copies_before_and_names_them(receiving: ReceiverEnv, fault: str) -> None:
    receiver = receiving.receiver()
    ds, (a, b, c, d) = chain(receiving, A, B, C, D, size=2 << 20)
    received(receiving, [a])
    if not receiver.capabilities.chained_send:
        _refuses_chains(receiving, ds, b, c)
        return
    then = [(C, b.guid if fault.startswith("a wrong") else c.guid), (D, d.guid)]
    fd = _chain_stream(receiving, ds, [B, C, D], A, cut=0.5 if fault == "a cut stream" else None)
    try:
        with pytest.raises(PartialReceive) as stopped:
            receiver.receive(REL, B, b.guid, fd, then=then)
    finally:
        os.close(fd)
    assert stopped.value.received == [B]
    assert identities(receiving) == [(A, a.guid), (B, b.guid)]
    assert receiving.leftovers(REL) == []  # no staging, no marker: C and D were never copies
    with receiving.stream(ds, C, B) as fd2:  # and the next run goes on from B
        receiver.receive(REL, C, c.guid, fd2)
    assert identities(receiving)[-1] == (C, c.guid)


def test_a_chain_stream_carrying_a_snapshot_not_asked_for_keeps_nothing(receiving: ReceiverEnv) -> None:
    """A hostile sender slipping one more subvolume into a chain: the whole stream is refused."""
    receiver = receiving.receiver()
    ds, (a, b, c, _) = chain(receiving, A, B, C, D)
    received(receiving, [a])
    if not receiver.capabilities.chained_send:
        _refuses_chains(receiving, ds, b, c)
        return
    fd = _chain_stream(receiving, ds, [B, C, D], A)
    try:
        with pytest.raises(BackendError, match="refusing the stream") as refused:
            receiver.receive(REL, B, b.guid, fd, then=[(C, c.guid)])
    finally:
        os.close(fd)
    assert not isinstance(refused.value, PartialReceive)
    assert identities(receiving) == [(A, a.guid)] and receiving.leftovers(REL) == []
