"""Checks of a valid policy against this machine: do the datasets exist, do snapshot dirs collide.

Kept apart from ``snapsync.policy.loader`` so that parsing stays pure and a policy can be validated on a
machine that does not have the datasets (``policy check --syntax-only``).
"""

from __future__ import annotations

from collections.abc import Callable

from snapsync.backends import backend_for, policy_form, receiver_for
from snapsync.backends.base import StorageBackend
from snapsync.errors import PolicyError, SnapsyncError
from snapsync.policy.loader import Group, Policy


def check_datasets(policy: Policy, backends: Callable[[Group], StorageBackend] = backend_for) -> None:
    """Raise PolicyError (exit 2) for the first dataset that cannot be snapshotted here."""
    seen: dict[str, str] = {}
    for group in policy.groups.values():
        key = f"groups.{group.name}"
        try:
            backend = backends(group)
        except SnapsyncError as e:
            raise PolicyError(policy.source, f"{key}.backend", str(e)) from e
        for i, dataset in enumerate(group.datasets):
            try:
                backend.check_dataset(dataset)
            except SnapsyncError as e:
                raise PolicyError(policy.source, f"{key}.datasets[{i}]", str(e)) from e
            home = backend.snapshot_home(dataset)
            if home in seen:
                raise PolicyError(
                    policy.source,
                    f"{key}.datasets[{i}]",
                    f"{dataset}: its snapshots would live in {home}, like those of {seen[home]}; "
                    "set snapshot_dir so that each dataset has its own",
                )
            seen[home] = dataset


def receiving_warnings(policy: Policy) -> list[str]:
    """Local receiving places that are not usable right now: warnings, since a USB disk that is
    not plugged in is normal; replication reports the target as failed until it is."""
    places = [(f"targets.{n}.path", t.path) for n, t in policy.targets.items() if t.type == "local"]
    places += [(f"pulls.{n}.into", p.into) for n, p in policy.pulls.items()]
    warnings = []
    for key, path in places:
        try:
            receiver_for(path).check_root()
        except SnapsyncError as e:
            warnings.append(f"{key}: {e}")
    return warnings + offsite_warnings(policy)


def offsite_warnings(policy: Policy) -> list[str]:
    """Offsite targets that cannot work from here yet: no key file, no directory. Buckets are not
    contacted (``policy check`` works offline); the first run reports them."""
    from snapsync.offsite.objectstore import DirStore
    from snapsync.policy.schema import DirTarget, S3Target
    from snapsync.offsite.sealing import Key

    warnings = []
    for name, target in policy.targets.items():
        if not isinstance(target, (DirTarget, S3Target)):
            continue
        try:
            Key.load(target.key_file)
        except SnapsyncError as e:
            warnings.append(f"targets.{name}.key_file: {e}")
        if isinstance(target, DirTarget):
            try:
                DirStore(target.path).check()
            except SnapsyncError as e:
                warnings.append(f"targets.{name}.path: {e}")
    return warnings



SHOWN_NESTED = 20


def nested_warnings(policy: Policy, group: Group, backend: StorageBackend) -> list[str]:
    """One line per dataset of ``group`` holding nested datasets that no group lists and no
    ``exclude`` covers: their files are in none of its snapshots (neither btrfs nor ZFS snapshots
    recurse). Said by `policy check` and by every snapshot; a failure to look is said too."""
    return [line for _, line, _ in _nested(policy, group, backend) if line]


def _nested(policy: Policy, group: Group, backend: StorageBackend) -> list[tuple[int, str, list[str]]]:
    """(position in datasets, the warning or "", every nested dataset found there)."""
    form = policy_form(group.backend)
    called = form.called if form is not None else "datasets"
    listed = {d for g in policy.groups.values() if g.backend == group.backend for d in g.datasets}
    excluded = [e for g in policy.groups.values() if g.backend == group.backend for e in g.exclude]
    found: list[tuple[int, str, list[str]]] = []
    for i, dataset in enumerate(group.datasets):
        try:
            inside = backend.nested(dataset)
        except SnapsyncError as e:
            found.append((i, f"{dataset}: cannot tell which {called} are nested in it: {e}", []))
            continue
        left = [n for n in inside if n not in listed and not any(n == e or n.startswith(e + "/") for e in excluded)]
        line = ""
        if left:
            names = ", ".join(left[:SHOWN_NESTED]) + (f" (and {len(left) - SHOWN_NESTED} more)" if len(left) > SHOWN_NESTED else "")
            line = (
                f"{dataset} has nested {called} that its snapshots leave out: {names}; list each as a dataset of a "
                f"group to back it up, or in groups.{group.name}.exclude to leave it out on purpose"
            )
        found.append((i, line, inside))
    return [f for f in found if f[1] or f[2]]


def nested_policy_warnings(policy: Policy, backends: Callable[[Group], StorageBackend] = backend_for) -> list[str]:
    """`policy check`: the nested datasets every snapshot would warn about, by key, and each
    ``exclude`` entry that covers none (it leaves nothing out: plain directories are in the snapshots)."""
    warnings: list[str] = []
    seen: dict[str, list[str]] = {}
    for group in policy.groups.values():
        try:
            backend = backends(group)
        except SnapsyncError:
            continue  # check_datasets reported it
        for i, line, inside in _nested(policy, group, backend):
            if line:
                warnings.append(f"groups.{group.name}.datasets[{i}]: {line}")
            seen.setdefault(group.backend, []).extend(inside)
    for group in policy.groups.values():
        form = policy_form(group.backend)
        called = form.called if form is not None else "datasets"
        nested = seen.get(group.backend, [])
        for i, entry in enumerate(group.exclude):
            if not any(n == entry or n.startswith(entry + "/") for n in nested):
                warnings.append(
                    f"groups.{group.name}.exclude[{i}]: no nested {called} at or below {entry}: it leaves nothing "
                    "out (plain directories are in the snapshots)"
                )
    return warnings
