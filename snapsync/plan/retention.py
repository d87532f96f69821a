"""Which snapshots to keep: a pure function of snapshots, rules and an injected ``now``.

Retention is the code that destroys data, so it has to be predictable and testable without a pool or a
clock: no I/O (apart from zoneinfo reading the tz database), no ``datetime.now()``, and every kept
snapshot carries the rules that kept it. Semantics, with worked examples: ``docs/retention.md``.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from snapsync.policy.durations import format_duration

_BucketKey = int | tuple[int, int]


@dataclass(frozen=True)
class RetentionRules:
    """One policy. A count of 0 or ``keep_within=None`` switches that rule off; ``timezone`` sets the calendar."""

    keep_last: int = 0
    keep_within: timedelta | None = None
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        """Reject nonsense at construction, so a bad policy fails before anything is planned."""
        for rule in ("keep_last", "hourly", "daily", "weekly", "monthly", "yearly"):
            if getattr(self, rule) < 0:
                raise ValueError(f"{rule} must be 0 or more, got {getattr(self, rule)}")
        if self.keep_within is not None and self.keep_within <= timedelta(0):
            raise ValueError(f"keep_within must be longer than zero, got {self.keep_within}")
        _zone(self.timezone)


class Dated(Protocol):
    """Anything with a name and an aware creation time (read-only properties so frozen types fit)."""

    @property
    def name(self) -> str: ...

    @property
    def created(self) -> datetime: ...


@dataclass(frozen=True)
class Decision:
    """One snapshot's verdict; ``reasons`` name every rule that kept it, so dry runs explain themselves."""

    name: str
    created: datetime
    keep: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class PrunePlan:
    """Every snapshot's decision, oldest first; the runner deletes ``removed`` and nothing else."""

    now: datetime
    decisions: tuple[Decision, ...]

    @property
    def kept(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.keep)

    @property
    def removed(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if not d.keep)

    @property
    def future(self) -> tuple[Decision, ...]:
        """Snapshots dated after ``now``: kept, but a sign of clock trouble worth reporting."""
        return tuple(d for d in self.decisions if "future" in d.reasons)

    def to_json(self) -> list[dict[str, object]]:
        """The ``--dry-run --json`` shape: times in UTC so output does not depend on the host zone."""
        return [
            {"name": d.name, "created": _utc_text(d.created), "keep": d.keep, "reasons": list(d.reasons)}
            for d in self.decisions
        ]


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(f"unknown time zone {name!r}: use an IANA name such as 'Europe/Berlin'") from exc


def _utc(moment: datetime, what: str) -> datetime:
    """Normalise to UTC: aware datetimes sharing a ZoneInfo compare by wall clock, wrong in a repeated hour."""
    if moment.utcoffset() is None:
        raise ValueError(f"{what}: datetime {moment.isoformat()} has no time zone")
    return moment.astimezone(timezone.utc)


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _offset_seconds(local: datetime) -> int:
    offset = local.utcoffset()
    assert offset is not None
    return offset.days * 86400 + offset.seconds


def _hour_key(local: datetime) -> _BucketKey:
    """UTC start of the local hour, plus the offset: the repeated hour at DST end is two buckets."""
    offset = _offset_seconds(local)
    return ((local.toordinal() * 24 + local.hour) * 3600 - offset, offset)


def _week_key(local: datetime) -> _BucketKey:
    ordinal = local.toordinal()
    return ordinal - (ordinal + 6) % 7


def _hour_label(local: datetime) -> str:
    offset = _offset_seconds(local)
    hours, minutes = divmod(abs(offset) // 60, 60)
    sign = "-" if offset < 0 else "+"
    return f"hourly {local.date().isoformat()}T{local.hour:02d}{sign}{hours:02d}:{minutes:02d}"


def _week_label(local: datetime) -> str:
    year, week, _ = local.isocalendar()
    return f"weekly {year}-W{week:02d}"


_Bucketing = tuple[str, Callable[[datetime], _BucketKey], Callable[[datetime], str]]
_BUCKETS: tuple[_Bucketing, ...] = (
    ("hourly", _hour_key, _hour_label),
    ("daily", datetime.toordinal, lambda t: f"daily {t.date().isoformat()}"),
    ("weekly", _week_key, _week_label),
    ("monthly", lambda t: t.year * 12 + t.month - 1, lambda t: f"monthly {t.year:04d}-{t.month:02d}"),
    ("yearly", lambda t: t.year, lambda t: f"yearly {t.year:04d}"),
)


PERIODS = ("yearly", "monthly", "weekly", "daily", "hourly")
"""Calendar periods from the longest; a month and a week do not nest, and the month counts first."""


def boundary_level(earlier: datetime, later: datetime, timezone: str = "UTC") -> int:
    """1 + the index in :data:`PERIODS` of the longest period whose start lies between the two times
    (1: a new year, ..., 5: a new hour), or ``len(PERIODS) + 1`` when they share an hour; in the
    calendar :func:`plan_prune` keeps by, so the first snapshot of a period, the one GFS keeps, is
    also the one that starts it."""
    zone = _zone(timezone)
    a, b = _utc(earlier, "earlier").astimezone(zone), _utc(later, "later").astimezone(zone)
    keys = {rule: key for rule, key, _ in _BUCKETS}
    for level, rule in enumerate(PERIODS, start=1):
        if keys[rule](a) != keys[rule](b):
            return level
    return len(PERIODS) + 1


def _representatives(locals_: Sequence[datetime], key: Callable[[datetime], _BucketKey], count: int) -> list[int]:
    """Index of the oldest snapshot in each of the ``count`` latest periods that have one.

    Periods are ordered by time (``locals_`` is in UTC order, and every period is one interval),
    never by their keys: where DST ends inside a local hour (Pacific/Chatham, 03:45) the hour after
    the change has the same UTC-aligned start as the one before it.
    """
    first: dict[_BucketKey, int] = {}
    for index, local in enumerate(locals_):
        first.setdefault(key(local), index)
    return sorted(first.values())[-count:]


def plan_prune(
    snapshots: Iterable[Dated],
    rules: RetentionRules,
    now: datetime,
    pinned: Mapping[str, Sequence[str]] | None = None,
) -> PrunePlan:
    """Decide keep/remove for every snapshot, with the reasons, as of ``now`` (the caller's clock)."""
    now_utc = _utc(now, "now")
    entries: list[tuple[datetime, str, Dated]] = []
    names: set[str] = set()
    for snap in snapshots:
        if snap.name in names:
            raise ValueError(f"duplicate snapshot name {snap.name!r}")
        names.add(snap.name)
        entries.append((_utc(snap.created, snap.name), snap.name, snap))
    entries.sort()

    reasons: list[list[str]] = [[] for _ in entries]
    past = bisect_right(entries, now_utc, key=lambda e: e[0])
    if past:
        reasons[past - 1].append("newest")
    for index in range(max(0, past - rules.keep_last), past):
        reasons[index].append("keep_last")
    if rules.keep_within is not None:
        label = f"keep_within {format_duration(rules.keep_within)}"
        for index in range(bisect_left(entries, now_utc - rules.keep_within, key=lambda e: e[0]), past):
            reasons[index].append(label)
    if any(getattr(rules, rule) for rule, _, _ in _BUCKETS):
        zone = _zone(rules.timezone)
        locals_ = [utc.astimezone(zone) for utc, _, _ in entries[:past]]
        for rule, key, label_of in _BUCKETS:
            if count := getattr(rules, rule):
                for index in _representatives(locals_, key, count):
                    reasons[index].append(label_of(locals_[index]))
    for index in range(past, len(entries)):
        reasons[index].append("future")
    if pinned:
        for index, (_, name, _) in enumerate(entries):
            reasons[index].extend(pinned.get(name, ()))

    return PrunePlan(
        now=now,
        decisions=tuple(
            Decision(name=name, created=snap.created, keep=bool(why), reasons=tuple(why))
            for (_, name, snap), why in zip(entries, reasons)
        ),
    )
