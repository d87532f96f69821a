"""Hold tags: which party a hold on a source snapshot belongs to.

A hold pins the snapshot a target or a pulling host still needs as its incremental base, so
pruning keeps it. The tag says whose it is: ``target:<target>`` for a push target of this host,
``pull:<host>.<pull>`` for another host pulling from this one. Every tag is made and read here.
"""

from __future__ import annotations

TARGET = "target:"
PULL = "pull:"


def target_tag(target: str) -> str:
    return f"{TARGET}{target}"


def pull_tag(host: str, pull: str) -> str:
    return f"{PULL}{host}.{pull}"


def is_target_tag(tag: str) -> bool:
    return tag.startswith(TARGET)


def is_pull_tag(tag: str) -> bool:
    return tag.startswith(PULL)


SAFETY = "safety:"


def safety_tag(snapshot: str) -> str:
    """A rollback's hold on the safety snapshot it took, until ``snapsync release``."""
    return f"{SAFETY}{snapshot}"


def is_safety_tag(tag: str) -> bool:
    return tag.startswith(SAFETY)


def tag_subject(tag: str) -> str:
    """Whom a tag names: the target, ``<host>.<pull>``, or the safety snapshot."""
    return tag.partition(":")[2]
