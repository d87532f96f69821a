"""Checks of a valid policy against this machine: do the datasets exist, do snapshot dirs collide.

Kept apart from ``snapsync.policy.loader`` so that parsing stays pure and a policy can be validated on a
machine that does not have the datasets (``policy check --syntax-only``).
"""

from __future__ import annotations

from collections.abc import Callable

from snapsync.backends import backend_for, receiver_for
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

