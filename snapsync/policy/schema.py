"""The policy file's tables as frozen pydantic models: what each key may hold and what it defaults to.

Groups and targets inherit from ``[defaults]`` while they are validated (the validated ``Defaults`` is
passed as pydantic's validation context), so every field of a validated ``Group`` is concrete and no
caller ever merges defaults again. Pure: no I/O beyond the time zone database. Turning validation errors
into one-line messages, and reading files, is ``snapsync.policy.loader``'s job. Reference: ``docs/policy.md``.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import cache
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, available_timezones

import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainSerializer,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema, core_schema

from snapsync.backends import policy_form, with_form
from snapsync.policy.durations import format_duration, parse_duration
from snapsync.plan.retention import RetentionRules
from snapsync.policy.units import SIZE, format_size, parse_size

POLICY_VERSION = 1
BUILTIN_RETENTION = RetentionRules(hourly=48, daily=30, weekly=8, monthly=12, yearly=3)


class Problem(ValueError):
    """A validation problem at a key below the value pydantic is validating.

    pydantic locates an error at the value whose validator raised it; a cross-check on a whole group or
    policy knows better (``datasets[2]``), so it names the rest of the path here.
    """

    def __init__(self, problem: str, *at: str | int) -> None:
        super().__init__(problem)
        self.at = at


def show(value: object) -> str:
    """A value as a sysadmin wrote it in TOML, for "got ..." in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, int) and value.bit_length() > 64:
        return f"a number of {value.bit_length()} bits"
    if isinstance(value, str):
        if len(value) <= 80:
            return repr(value)
        start = repr(value[:60])
        return f"{start[:-1]}...{start[-1]} ({len(value)} characters)"
    return str(value)


def did_you_mean(word: str, choices: list[str]) -> str:
    if len(word) > 100:
        return ""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _matching(pattern: str, what: str, rule: str) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise ValueError(f"invalid {what} {show(value)}: {rule}")
        return value

    return AfterValidator(check)


def _duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a duration like '90m', '36h' or '1d12h', got {show(value)}")
    return parse_duration(value)


@cache
def _zones() -> frozenset[str]:
    return frozenset(available_timezones())


def _zone(name: str) -> str:
    """Loading the one zone named is ~0.1 ms; listing them all (for the error's suggestions) is ~30 ms
    a run. Names the listing leaves out (the tz database's ``posix/`` and ``right/`` copies, its
    ``localtime`` and ``posixrules`` files) are decided by the listing, as before."""
    if name and name not in ("localtime", "posixrules") and name.split("/", 1)[0] not in ("posix", "right"):
        try:
            ZoneInfo(name)
            return name
        except (ValueError, OSError, KeyError):  # ZoneInfoNotFoundError is a KeyError
            pass
    if name in _zones():
        return name
    by_case = {z.lower(): z for z in _zones()}
    if name.lower() in by_case:
        raise ValueError(f"unknown time zone {show(name)}; did you mean {by_case[name.lower()]!r}?")
    raise ValueError(f"unknown time zone {show(name)}{did_you_mean(name, sorted(_zones()))}")


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    return value


PATH_MAX = 4095
NAME_MAX = 255


def _one_line(value: str) -> str:
    """Paths, names and hosts end up in argv, logs and terminals: a newline, an escape or a bidi
    override there can forge output or hide what a path really is; the length is the kernel's limit."""
    _no_nul(value)
    if not value.isprintable():
        raise ValueError(f"must not contain control or invisible characters (newlines, escapes), got {show(value)}")
    if len(value.encode()) > PATH_MAX:
        raise ValueError(f"longer than {PATH_MAX} bytes: {show(value)}")
    return value


def _components(value: str) -> str:
    for part in value.split("/"):
        if len(part.encode()) > NAME_MAX:
            raise ValueError(f"has a component longer than {NAME_MAX} bytes: {show(value)}")
    return value


def _absolute_path(value: str) -> str:
    """Absolute and normalized, so that one directory has one spelling when datasets are compared."""
    _components(_one_line(value))
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {show(value)}")
    parts = value.split("/")
    if ".." in parts:
        raise ValueError(f"must not contain '..': {show(value)}")
    return "/" + "/".join(p for p in parts if p not in ("", "."))


def _snapshot_dir(value: str) -> str:
    _components(_one_line(value))
    if ".." in value.split("/"):
        raise ValueError(f"must not contain '..': {show(value)}")
    if posixpath.normpath(value) in (".", "/"):
        raise ValueError(f"{show(value)} would put snapshots next to or over the subvolumes; name a directory")
    return _absolute_path(value) if value.startswith("/") else posixpath.normpath(value)


def _zfs_dataset(value: str) -> str:
    _one_line(value)
    if len(value.encode()) > NAME_MAX:
        raise ValueError(f"a zfs dataset name is at most {NAME_MAX} bytes: {show(value)}")
    if value.startswith("/"):
        raise ValueError(f"a zfs dataset is a name like 'rpool/persist/postgresql', not a path: {show(value)}")
    if "@" in value or "#" in value:
        raise ValueError(f"must not contain '@' or '#' (they name snapshots and bookmarks): {show(value)}")
    if "" in value.split("/"):
        raise ValueError(f"has an empty component (a '//' or a '/' at the end): {show(value)}")
    return value


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"a port is between 1 and 65535, got {show(value)}")
    return value


def _argv(value: object) -> object:
    if isinstance(value, str):
        raise ValueError(
            f"expected a list of arguments like ['systemctl', 'stop', 'x'], got {show(value)}; "
            "commands never run through a shell"
        )
    return value


Duration = Annotated[
    timedelta, BeforeValidator(_duration), PlainSerializer(format_duration, return_type=str, when_used="json")
]


def _rate(value: object) -> int:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {show(value)}")
    if not SIZE.fullmatch(value):
        raise ValueError(f"invalid rate limit {show(value)}: use bytes per second with an optional K, M or G, e.g. '10M'")
    return parse_size(value)


RateLimit = Annotated[int, BeforeValidator(_rate), PlainSerializer(format_size, return_type=str, when_used="json")]
"""Bytes per second, written like ``10M``; parsed here once, so every sender reads a number."""
MAX_COUNT = 100_000
Count = Annotated[int, Strict(), Field(ge=0, le=MAX_COUNT)]
Port = Annotated[int, Strict(), AfterValidator(_port)]
Text = Annotated[str, Field(min_length=1), AfterValidator(_no_nul)]
Line = Annotated[str, Field(min_length=1), AfterValidator(_one_line)]
"""A name, a host or a path: one line of visible characters, at most PATH_MAX bytes."""
AbsolutePath = Annotated[str, AfterValidator(_absolute_path)]
Argv = Annotated[tuple[Text, ...], BeforeValidator(_argv), Field(min_length=1)]
TimeZone = Annotated[str, AfterValidator(_zone)]
SnapshotDir = Annotated[str, Field(min_length=1), AfterValidator(_snapshot_dir)]
Name = Annotated[
    str,
    _matching(
        r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}",
        "name",
        "use up to 100 letters, digits, '_', '.' and '-', starting with a letter or digit",
    ),
]
Prefix = Annotated[
    str,
    _matching(
        r"[A-Za-z0-9][A-Za-z0-9.-]{0,99}",
        "prefix",
        "use up to 100 letters, digits, '.' and '-', starting with a letter or digit "
        "(no '_': it separates the prefix from the time in snapshot names)",
    ),
]
SystemdUnit = Annotated[
    str,
    _matching(r"[A-Za-z0-9:_.@\\-]+\.(service|scope|slice)", "unit", "expected a unit like 'forgejo.service'"),
]
Cgroup = Annotated[AbsolutePath, _matching(r"/sys/fs/cgroup/.+", "cgroup", "expected a path in /sys/fs/cgroup/")]
Url = Annotated[str, _matching(r"https?://[^\s/]+\S*", "URL", "expected http://... or https://...")]


class _Table(BaseModel):
    """A TOML table: unknown keys are errors, since a typo must never silently become a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RetentionTable(_Table):
    """A ``retention`` table as written: a key left out is inherited, see ``_Merged``."""

    keep_last: Count | None = None
    keep_within: Duration | None = None
    hourly: Count | None = None
    daily: Count | None = None
    weekly: Count | None = None
    monthly: Count | None = None
    yearly: Count | None = None


def retention_table(rules: RetentionRules) -> dict[str, object]:
    """Rules as a complete ``retention`` table (the time zone is the group's, not a retention key)."""
    table: dict[str, object] = {"keep_last": rules.keep_last}
    if rules.keep_within is not None:
        table["keep_within"] = format_duration(rules.keep_within)
    table |= {k: getattr(rules, k) for k in ("hourly", "daily", "weekly", "monthly", "yearly")}
    return table


def keeps_only_newest(rules: RetentionRules) -> bool:
    counts = (rules.keep_last, rules.hourly, rules.daily, rules.weekly, rules.monthly, rules.yearly)
    return rules.keep_within is None and not any(counts)


def inherited(info: ValidationInfo) -> Defaults:
    """The ``[defaults]`` that parse_policy validated first; the built-in ones outside a file."""
    return info.context if isinstance(info.context, Defaults) else _BUILTIN_DEFAULTS


@dataclass(frozen=True)
class _Merged:
    """Validate a ``retention`` table and merge it per key over a base: ``[defaults.retention]`` unless given.

    The table's time zone is its owner's ``timezone`` key if it has one, else the defaults'.
    """

    base: RetentionRules | None = None
    require_keep: bool = True

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.with_info_wrap_validator_function(
            self._merge,
            handler.generate_schema(RetentionTable),
            serialization=core_schema.plain_serializer_function_ser_schema(retention_table),
        )

    def _merge(
        self, value: object, handler: core_schema.ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> RetentionRules:
        if isinstance(value, RetentionRules):
            return value
        table: RetentionTable = handler(value)
        base = inherited(info).retention if self.base is None else self.base
        timezone = info.data["timezone"] if "timezone" in info.data else inherited(info).timezone
        rules = replace(base, timezone=timezone, **table.model_dump(exclude_none=True))
        if self.require_keep and keeps_only_newest(rules):
            raise ValueError("retention keeps only the newest snapshot; set keep_last = 1 to say that on purpose")
        return rules


Retention = Annotated[RetentionRules, _Merged()]


class Defaults(_Table):
    """The ``[defaults]`` table: what groups leave out, and the retention base of groups and targets."""

    prefix: Prefix = "snapsync"
    timezone: TimeZone = "UTC"
    interval: Duration = timedelta(hours=1)
    snapshot_dir: SnapshotDir = ".snapsync"
    warn_after: Duration | None = None
    crit_after: Duration | None = None
    hold_expiry: Duration = timedelta(days=30)
    retention: Annotated[RetentionRules, _Merged(base=RetentionRules(), require_keep=False)] = Field(
        default_factory=lambda: retention_table(BUILTIN_RETENTION), validate_default=True
    )


_BUILTIN_DEFAULTS = Defaults()


class _Hook(_Table):
    on_failure: Literal["abort", "continue"] = "abort"
    """abort: a hook that fails on the way in skips the group's snapshot; continue: take it anyway."""


PG_NAME_MAX = 63
"""PostgreSQL's longest identifier in bytes (NAMEDATALEN - 1): a longer name is silently truncated by the server."""


def _database_names(value: object) -> object:
    """``dump = "all"`` (held as the empty tuple, which the file cannot say) or a list of database
    names; a bare name is a list of one written wrongly."""
    if value == "all" or value == ():
        return ()
    if isinstance(value, str):
        raise ValueError(f'expected "all" or a list of database names like ["outline", "forgejo"], got {show(value)}')
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f'expected "all" or a non-empty list of database names, got {show(value)}')
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise Problem(f"expected a database name, got {show(name)}", i)
        try:
            _one_line(name)
        except ValueError as e:
            raise Problem(str(e), i) from None
        if len(name.encode()) > PG_NAME_MAX:
            raise Problem(f"a PostgreSQL database name is at most {PG_NAME_MAX} bytes: {show(name)}", i)
        if name in value[:i]:
            raise Problem(f"database {name!r} is listed twice", i)
    return tuple(value)


DatabaseNames = Annotated[
    tuple[str, ...], BeforeValidator(_database_names), PlainSerializer(lambda v: list(v) or "all", return_type=object)
]


class PostgresHook(_Hook):
    """PostgreSQL: a CHECKPOINT before the snapshot (or backup mode around it), so recovery replays little WAL;
    and, with ``dump``, a ``pg_dump -Fc`` of each database into the group's data, so one database can come back alone."""

    type: Literal["postgres"]
    dsn: Text | None = None
    host: Line | None = None
    port: Port | None = None
    user: Line | None = None
    dbname: Line | None = None
    mode: Literal["checkpoint", "backup"] = "checkpoint"
    timeout: Duration = timedelta(seconds=30)
    data_dir: AbsolutePath | None = None
    """PGDATA, inside one of the group's datasets: ``snapsync drill`` starts a throwaway server on its restored copy."""
    check_query: Text = "SELECT 1"
    """What a drill runs against that server; it must succeed (e.g. a count of a table that matters)."""
    dump: DatabaseNames | None = None
    """Databases to ``pg_dump`` right before each snapshot; ``()`` for ``"all"`` (every one but the
    templates, listed at each dump): read it through :attr:`dumps_all`."""
    dump_dir: AbsolutePath | None = None
    """Where the dumps go, inside one of the group's datasets, so every copy of the snapshot carries them."""
    dump_timeout: Duration | None = None
    """How long one database's pg_dump may take before it is killed (and the hook fails); see :attr:`dump_limit`."""
    bin_dir: AbsolutePath | None = None
    """The directory of ``pg_dump`` and ``pg_restore`` (default: looked up in PATH); they must be at
    least the server's version."""

    @model_validator(mode="after")
    def _dsn_or_parts(self) -> PostgresHook:
        if self.dsn is not None and any(v is not None for v in (self.host, self.port, self.user, self.dbname)):
            raise Problem("set either dsn or host/port/user/dbname, not both", "dsn")
        return self

    @model_validator(mode="after")
    def _dump_where(self) -> PostgresHook:
        if self.dump is not None and self.dump_dir is None:
            raise Problem("missing required key: dump needs a dump_dir inside one of the group's datasets", "dump_dir")
        if self.dump is None and (self.dump_dir is not None or self.dump_timeout is not None):
            raise Problem('dump_dir and dump_timeout need dump: name the databases to dump, or "all"', "dump")
        if self.dump_dir is not None and self.data_dir is not None and _below(self.dump_dir, self.data_dir, or_same=True):
            raise Problem(f"{show(self.dump_dir)} is inside data_dir, which belongs to the server; put the dumps beside it", "dump_dir")
        return self

    @property
    def dumps_all(self) -> bool:
        return self.dump == ()

    @property
    def dump_limit(self) -> timedelta:
        return self.dump_timeout or timedelta(minutes=30)

    def outside(self, datasets: tuple[str, ...]) -> str | None:
        """Why ``dump_dir`` is not strictly inside one of ``datasets`` (paths), or None when it is:
        a dump outside the group's data would travel with no copy."""
        if self.dump_dir is None or any(_below(self.dump_dir, d) for d in datasets):
            return None
        if self.dump_dir in datasets:
            return f"{show(self.dump_dir)} is a dataset itself; name a directory inside it (snapsync makes it root's, 0700)"
        return f"{show(self.dump_dir)} is not inside any dataset of the group, so no snapshot would carry the dumps"


def _below(path: str, directory: str, or_same: bool = False) -> bool:
    return (or_same and path == directory) or path.startswith(directory.rstrip("/") + "/")


def _hook_in_group(hook: Any, info: ValidationInfo) -> Any:
    """Cross-checks of a hook against its group's datasets (validated before the hooks)."""
    form = policy_form(str(info.data.get("backend", "")))
    datasets: tuple[str, ...] = info.data.get("datasets") or ()
    paths = form is not None and form.dataset == "path" and bool(datasets)
    if isinstance(hook, PostgresHook) and paths and (problem := hook.outside(datasets)) is not None:
        raise Problem(problem, "dump_dir")
    return hook


class SqliteHook(_Hook):
    """SQLite databases kept from writing across the snapshot, waiting up to busy_timeout for a writer."""

    type: Literal["sqlite"]
    databases: tuple[AbsolutePath, ...] = Field(min_length=1)
    busy_timeout: Duration = timedelta(seconds=10)


class FreezeHook(_Hook):
    """A unit or cgroup frozen across the snapshot: consistency for any application, at the cost of a pause."""

    type: Literal["freeze"]
    unit: SystemdUnit | None = None
    cgroup: Cgroup | None = None
    max_pause: Duration = timedelta(seconds=30)

    @model_validator(mode="after")
    def _one_target(self) -> FreezeHook:
        if (self.unit is None) == (self.cgroup is None):
            raise ValueError("a freeze hook needs exactly one of unit or cgroup")
        return self


class CommandHook(_Hook):
    """Programs run as root before and/or after the snapshot, as argv lists: never through a shell."""

    type: Literal["command"]
    pre: Argv | None = None
    post: Argv | None = None
    timeout: Duration = timedelta(seconds=60)

    @model_validator(mode="after")
    def _something_to_run(self) -> CommandHook:
        if self.pre is None and self.post is None:
            raise ValueError("a command hook needs pre, post or both")
        return self


Hook = Annotated[
    PostgresHook | SqliteHook | FreezeHook | CommandHook, Field(discriminator="type"), AfterValidator(_hook_in_group)
]

_CREDENTIAL_KEY = re.compile(r"secret|passw|token|credential|session|access.?key|key.?id|api.?key|^key$", re.I)


class _Target(_Table):
    """Settings every kind of target has; the kind-specific keys live in the subclasses."""

    type: str
    retention: Retention = Field(default_factory=dict, validate_default=True)
    max_lag: Duration | None = None
    on_diverged: Literal["refuse", "rollback"] = "refuse"
    compress: Literal["none", "zstd"] = "none"
    rate_limit: RateLimit | None = None
    warn_after: Duration | None = None
    """`snapsync check`: the newest copy here may be this old before WARNING (default: the group's)."""
    crit_after: Duration | None = None

    @model_validator(mode="after")
    def _ordered_thresholds(self) -> Any:
        _check_thresholds(self.warn_after, self.crit_after)
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, data: Any) -> Any:
        """Policy files are meant to be shared and committed; a secret in one leaks."""
        for key in data if isinstance(data, dict) else ():
            if _CREDENTIAL_KEY.search(str(key)) and not str(key).endswith("_file"):
                raise Problem(
                    "credentials never go in the policy file; use the environment or a credentials file", key
                )
        return data


class SshTarget(_Target):
    """Another host, reached with ssh, where ``command`` (snapsync) receives into ``path``."""

    type: Literal["ssh"]
    host: Line
    user: Line = "root"
    port: Port = 22
    identity_file: AbsolutePath | None = None
    ssh_options: tuple[Line, ...] = ()
    path: Line
    command: Argv = ("snapsync",)


class LocalTarget(_Target):
    """A filesystem on this host (a USB disk), receiving into ``path``: a directory or a dataset."""

    type: Literal["local"]
    path: Line


def _size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str) or not SIZE.fullmatch(value):
        raise ValueError(f"expected a size like '64M' (K, M and G are powers of 1024), got {show(value)}")
    return parse_size(value)


def _full_every(value: object) -> timedelta | int:
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '30d' or a number of incrementals, got {show(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a number of incrementals must be 0 or more, got {value}")
        if value > MAX_COUNT:
            raise ValueError(f"a number of incrementals must be {MAX_COUNT} or less, got {show(value)}")
        return value
    return _duration(value)


def _chunk_size(value: object) -> int:
    size = _size(value)
    if not (1 << 20) <= size <= (1 << 30):
        raise ValueError(f"a chunk is between '1M' and '1G' of stream, got {show(value)}")
    return size


ChunkSize = Annotated[int, BeforeValidator(_chunk_size)]
FullEvery = Annotated[
    timedelta | int,
    BeforeValidator(_full_every),
    PlainSerializer(lambda v: v if isinstance(v, int) else format_duration(v), return_type=object),
]
StorageClass = Literal[
    "STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "REDUCED_REDUNDANCY", "GLACIER_IR"
]
DEFAULT_KEY_FILE = "/var/lib/snapsync/offsite.key"


class _OffsiteTarget(_Target):
    """Snapshots stored as chunked, compressed, encrypted send streams (see docs/offsite.md)."""

    key_file: AbsolutePath = DEFAULT_KEY_FILE
    """This host's offsite key; back it up elsewhere, without it nothing uploaded can be restored."""
    full_every: FullEvery = timedelta(days=365)
    """A new full (a chain of its own) this often; between fulls each upload is an incremental."""
    chains: Literal["levelled", "linear"] = "levelled"
    """``levelled``: each upload starts from the newest upload of a period at least as long as its own,
    so retention frees what it drops; ``linear``: from the one before (shorter restores, more storage)."""
    chunk_size: ChunkSize = 64 << 20
    compress: Literal["none", "zstd"] = "zstd"
    compress_level: Annotated[int, Strict()] = Field(default=3, ge=1, le=19)

    @field_validator("on_diverged")
    @classmethod
    def _never_rolls_back(cls, value: str) -> str:
        if value != "refuse":
            raise ValueError("offsite targets never roll back; a source that diverged starts a new chain instead")
        return value


class DirTarget(_OffsiteTarget):
    """A plain directory holding snapshot streams as files (the offsite format), on any filesystem."""

    type: Literal["dir"]
    path: AbsolutePath


class S3Target(_OffsiteTarget):
    """An S3 bucket for streams in the offsite format; credentials come from the environment."""

    type: Literal["s3"]
    endpoint_url: Url | None = None
    bucket: Line
    prefix: Line | None = None
    region: Line | None = None
    storage_class: StorageClass | None = None
    profile: Line | None = None
    credentials_file: AbsolutePath | None = None
    """A shared credentials file (the AWS format); the secrets stay in it, not in the policy."""


Target = Annotated[SshTarget | LocalTarget | DirTarget | S3Target, Field(discriminator="type")]

_PLAIN_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@:-]*")


class Pull(SshTarget):
    """A host this one fetches from (pull): ssh to ``host``, where ``command`` runs
    ``snapsync serve --role send --root PATH``, and receive its ``datasets`` into ``into``.

    The retention, ``max_lag``, ``on_diverged``, ``compress`` and ``rate_limit`` keys mean what
    they mean for a target: they govern the copies kept here.
    """

    type: Literal["ssh"] = "ssh"
    path: Line
    """The root the source serves: a directory (btrfs) or a dataset name (zfs)."""
    datasets: tuple[Line, ...] = Field(min_length=1)
    into: Line
    """Where copies land here: a directory on btrfs, or a ZFS dataset name."""
    prefix: Prefix | None = None

    @field_validator("path", "into")
    @classmethod
    def _path_or_dataset(cls, value: str) -> str:
        return _absolute_path(value) if value.startswith("/") else _zfs_dataset(value)

    @model_validator(mode="after")
    def _datasets_inside_path(self) -> Pull:
        root = self.path.rstrip("/") + "/"
        for i, dataset in enumerate(self.datasets):
            if not dataset.startswith(root):
                raise Problem(f"{show(dataset)} is not below path {show(self.path)} (the root the source serves)", "datasets", i)
            for part in dataset[len(root) :].split("/"):
                if not _PLAIN_PART.fullmatch(part):
                    raise Problem(
                        f"{show(dataset)}: component {show(part)} cannot be requested from a source "
                        "(letters, digits and ._+=@:- only, not starting with a dot)",
                        "datasets", i,
                    )
        return self

    def relative(self, dataset: str) -> str:
        return dataset[len(self.path.rstrip("/")) + 1 :]


class Group(_Table):
    """A consistency group: datasets snapshotted together under one name, with one schedule and retention."""

    name: str
    backend: Literal["btrfs", "zfs"]
    datasets: tuple[str, ...] = Field(min_length=1)
    exclude: tuple[str, ...] = ()
    """Datasets nested in this group's datasets that are left out of every snapshot on purpose (a
    nested one is not in its parent's snapshots): each silences the warning for itself and for
    everything nested below it."""
    interval: Duration
    prefix: Prefix
    timezone: TimeZone
    snapshot_dir: SnapshotDir | None = None
    retention: Retention = Field(default_factory=dict, validate_default=True)
    hooks: tuple[Hook, ...] = ()
    targets: tuple[Name, ...] = ()
    send_raw: Annotated[bool, Strict()] = False
    """zfs: send raw (``-w``) streams even for unencrypted datasets; encrypted ones are always raw."""
    send_compressed: Annotated[bool, Strict()] = True
    """zfs: send blocks compressed as they are on disk (``-c``)."""
    warn_after: Duration
    """`snapsync check`: the newest snapshot may be this old before WARNING (default: twice the interval)."""
    crit_after: Duration
    """... and this old before CRITICAL (default: twice warn_after)."""
    hold_expiry: Duration
    """A pulling host's hold is released once it has not fetched for this long although there was
    something to fetch: a host that is gone must not pin snapshots forever."""

    @model_validator(mode="before")
    @classmethod
    def _inherit_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        """Fill the keys a group leaves out from ``[defaults]`` (retention merges per key, in ``_Merged``)."""
        if not isinstance(data, dict):
            return data
        defaults = inherited(info)
        fill: dict[str, object] = {
            "interval": defaults.interval,
            "prefix": defaults.prefix,
            "timezone": defaults.timezone,
            "hold_expiry": defaults.hold_expiry,
        }
        form = policy_form(str(data.get("backend", "")))
        if form is not None and form.snapshot_dir:
            fill["snapshot_dir"] = defaults.snapshot_dir
        data = fill | data
        warn, crit = data.get("warn_after", defaults.warn_after), data.get("crit_after", defaults.crit_after)
        try:
            interval = _duration(data["interval"])
            warn = 2 * interval if warn is None else _duration(warn)
        except (ValueError, TypeError, KeyError):  # a bad interval or warn_after is reported at its own key
            warn = None
        if warn is None:
            return {"warn_after": timedelta(0), "crit_after": timedelta(0)} | data
        return {"warn_after": warn, "crit_after": 2 * warn if crit is None else crit} | data

    @model_validator(mode="after")
    def _thresholds_after_interval(self) -> Group:
        if self.warn_after <= self.interval:
            raise Problem(
                f"{format_duration(self.warn_after)} is not longer than interval ({format_duration(self.interval)}): "
                "every check between two snapshots would warn", "warn_after",
            )
        _check_thresholds(self.warn_after, self.crit_after)
        return self

    @field_validator("datasets")
    @classmethod
    def _check_datasets(cls, datasets: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        form = policy_form(info.data.get("backend", ""))
        if form is None:
            return datasets
        check = _absolute_path if form.dataset == "path" else _zfs_dataset
        seen: dict[str, int] = {}
        for i, dataset in enumerate(datasets):
            try:
                dataset = check(dataset)
            except ValueError as e:
                raise Problem(str(e), i) from None
            if dataset in seen:
                raise Problem(f"duplicate dataset {show(dataset)} (also datasets[{seen[dataset]}])", i)
            seen[dataset] = i
        return tuple(seen)

    @field_validator("exclude")
    @classmethod
    def _inside_datasets(cls, exclude: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        """Written like the datasets, and strictly inside one of them: nothing else can be nested there."""
        form = policy_form(info.data.get("backend", ""))
        datasets = info.data.get("datasets")
        if form is None or datasets is None:
            return exclude
        check = _absolute_path if form.dataset == "path" else _zfs_dataset
        seen: dict[str, int] = {}
        for i, entry in enumerate(exclude):
            try:
                entry = check(entry)
            except ValueError as e:
                raise Problem(str(e), i) from None
            if entry in seen:
                raise Problem(f"duplicate entry {show(entry)} (also exclude[{seen[entry]}])", i)
            if not any(entry.startswith(d.rstrip("/") + "/") for d in datasets):
                raise Problem(
                    f"{show(entry)} is not inside any of the group's datasets; exclude names {form.called} "
                    "nested in them, which their snapshots leave out", i,
                )
            seen[entry] = i
        return tuple(seen)

    @field_validator("targets")
    @classmethod
    def _distinct_targets(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        for i, name in enumerate(targets):
            if name in targets[:i]:
                raise Problem(f"target {name!r} is listed twice", i)
        return targets

    @model_validator(mode="after")
    def _keys_of_the_filesystem(self) -> Group:
        """snapshot_dir, send_raw and send_compressed mean something only where the filesystem has them."""
        form = policy_form(self.backend)
        assert form is not None  # the backend's Literal let only known names through
        at = ("snapshot_dir",)
        if not form.snapshot_dir and self.snapshot_dir is not None:
            owners = " or ".join(with_form(lambda f: f.snapshot_dir))
            raise Problem(f"snapshot_dir applies only to {owners} groups ({self.backend} keeps snapshots in the dataset)", *at)
        if form.snapshot_dir and self.snapshot_dir is None:
            raise Problem("missing required key", *at)
        if not form.stream_modes and (self.send_raw or not self.send_compressed):
            key = "send_raw" if self.send_raw else "send_compressed"
            owners = " or ".join(with_form(lambda f: f.stream_modes))
            raise Problem(f"applies only to {owners} groups ({self.backend} streams have no raw or compressed mode)", key)
        return self


def _check_thresholds(warn: timedelta | None, crit: timedelta | None) -> None:
    if warn is not None and crit is not None and crit <= warn:
        raise Problem(
            f"{format_duration(crit)} is not longer than warn_after ({format_duration(warn)})", "crit_after"
        )


class Monitoring(_Table):
    """The ``[monitoring]`` table: where metrics go and whom `snapsync check` tells (docs/monitoring.md)."""

    textfile: AbsolutePath | None = None
    """Prometheus textfile (node_exporter's textfile collector); default ``<state dir>/metrics/snapsync.prom``."""
    ping_url: Url | None = None
    """A healthchecks-style URL `snapsync check` requests: as is when fresh, with ``/fail`` appended when not."""
    ping_timeout: Duration = timedelta(seconds=10)


def _check_version(version: int) -> int:
    if version != POLICY_VERSION:
        raise ValueError(f"unsupported policy version {show(version)}: this snapsync reads version {POLICY_VERSION}")
    return version


class Policy(_Table):
    """One host's policy file, validated and with every default resolved."""

    version: Annotated[int, Strict(), AfterValidator(_check_version)]
    source: str = Field(default="<policy>", exclude=True)
    host: Line | None = None
    defaults: Defaults = _BUILTIN_DEFAULTS
    groups: dict[Name, Group] = Field(default_factory=dict)
    targets: dict[Name, Target] = Field(default_factory=dict)
    pulls: dict[Name, Pull] = Field(default_factory=dict)
    monitoring: Monitoring = Monitoring()

    @model_validator(mode="before")
    @classmethod
    def _name_groups(cls, data: Any) -> Any:
        """A group's name is its table's name; a ``name`` key inside would be a second, conflicting one."""
        if not isinstance(data, dict) or not isinstance(data.get("groups"), dict):
            return data
        groups = {}
        for name, table in data["groups"].items():
            if isinstance(table, dict):
                if table.get("name", name) != name:
                    raise Problem("unknown key 'name' (a group is named by its table)", "groups", name, "name")
                table = table | {"name": name}
            groups[name] = table
        return data | {"groups": groups}

    @model_validator(mode="after")
    def _cross_check(self) -> Policy:
        if not self.groups and not self.pulls:
            raise Problem("no groups defined (and no pulls)", "groups")
        owner: dict[tuple[str, str], str] = {}
        for group in self.groups.values():
            for i, name in enumerate(group.targets):
                if name not in self.targets:
                    known = ", ".join(self.targets) or "none defined"
                    hint = did_you_mean(name, list(self.targets))
                    at = ("groups", group.name, "targets", i)
                    raise Problem(f"unknown target {name!r} (targets: {known}){hint}", *at)
            for name in group.targets:
                warn, crit = self.freshness(group.name, name)
                if crit <= warn:
                    raise Problem(
                        f"{format_duration(crit)} is not longer than warn_after ({format_duration(warn)}, "
                        f"from group {group.name!r})", "targets", name, "crit_after",
                    )
            for i, dataset in enumerate(group.datasets):
                other = owner.setdefault((group.backend, dataset), group.name)
                if other != group.name:
                    raise Problem(
                        f"dataset {show(dataset)} is already in group {other!r}; a dataset belongs to one group",
                        "groups", group.name, "datasets", i,
                    )
        return self

    def freshness(self, group: str | None, target: str) -> tuple[timedelta, timedelta]:
        """(warn_after, crit_after) for a target's copies of a group, or for a pull (``group`` None):
        the target's own, else the group's (a pull's: the defaults', else twice the interval)."""
        if group is not None:
            t: _Target = self.targets[target]
            base = (self.groups[group].warn_after, self.groups[group].crit_after)
        else:
            t = self.pulls[target]
            warn = self.defaults.warn_after or 2 * self.defaults.interval
            base = (warn, self.defaults.crit_after or 2 * warn)
        warn = t.warn_after or base[0]
        return warn, t.crit_after or (2 * warn if t.warn_after else base[1])

    def normalized(self) -> dict[str, Any]:
        """Fully resolved and JSON-serialisable; also a valid policy file (absent values are left out)."""
        exclude: dict[str, Any] = {"groups": {"__all__": {"name"}}}
        if not self.pulls:
            exclude["pulls"] = True
        return self.model_dump(mode="json", exclude_none=True, exclude=exclude)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.normalized())
