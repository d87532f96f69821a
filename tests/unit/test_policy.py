"""The policy layer: every malformed file yields one located, one-line error; valid files resolve fully."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import tomli_w
from hypothesis import given
from hypothesis import strategies as st

from snapsync.policy.durations import format_duration
from snapsync.policy.units import format_size, parse_size
from snapsync.errors import EXIT_USAGE, PolicyError
from snapsync.policy.loader import (
    DEFAULT_POLICY_PATH,
    BUILTIN_RETENTION,
    CommandHook,
    FreezeHook,
    Group,
    Policy,
    PostgresHook,
    S3Target,
    SshTarget,
    load_policy,
    parse_policy,
    policy_warnings,
)
from snapsync.plan.retention import RetentionRules

SRC = "/etc/snapsync/policy.toml"
POLICIES = sorted((Path(__file__).parents[2] / "policies").glob("*.toml"))

GROUP = """
[groups.app]
backend = "btrfs"
datasets = ["/persist/var/lib/app"]
"""
BASE = "version = 1\n" + GROUP


def with_defaults(defaults: str) -> str:
    return "version = 1\n" + defaults + GROUP

SSH_TARGET = """
[targets.nas]
type = "ssh"
host = "nas.home.arpa"
path = "/srv/snapsync"
"""


def rejected(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, SRC)
    return caught.value


MALFORMED = [
    # (id, policy text, key path, distinctive part of the problem)
    ("invalid TOML", "version = = 1", "", "invalid TOML: "),
    ("table declared twice", BASE + '[groups.app]\nbackend = "zfs"\n', "", "Cannot declare ('groups', 'app') twice (at line 6"),
    ("empty file", "", "", "no groups defined"),
    ("only comments", "# nothing yet\n", "", "no groups defined"),
    ("no groups", "version = 1\n", "groups", "no groups defined"),
    ("empty groups table", "version = 1\n[groups]\n", "groups", "no groups defined"),
    ("version missing", BASE.replace("version = 1\n", ""), "version", "missing required key"),
    ("version 2", BASE.replace("version = 1", "version = 2"), "version", "unsupported policy version 2"),
    ("version string", BASE.replace("version = 1", 'version = "1"'), "version", "expected an integer, got '1'"),
    ("unknown top-level key", 'hots = "q"\n' + BASE, "hots", "unknown key 'hots'; did you mean 'host'?"),
    ("group instead of groups", BASE.replace("[groups.app]", "[group.app]"), "group", "did you mean 'groups'?"),
    ("source is not a key", 'source = "x"\n' + BASE, "source", "unknown key 'source'"),
    ("backend missing", BASE.replace('backend = "btrfs"\n', ""), "groups.app.backend", "missing required key"),
    ("backend unknown", BASE.replace('"btrfs"', '"btfrs"'), "groups.app.backend", "expected 'btrfs' or 'zfs', got 'btfrs'; did you mean 'btrfs'?"),
    ("datasets missing", BASE.replace('datasets = ["/persist/var/lib/app"]\n', ""), "groups.app.datasets", "missing required key"),
    ("datasets empty", BASE.replace('["/persist/var/lib/app"]', "[]"), "groups.app.datasets", "must not be empty"),
    ("datasets a string", BASE.replace('["/persist/var/lib/app"]', '"/persist/var/lib/app"'), "groups.app.datasets", "expected a list, got '/persist/var/lib/app'"),
    ("btrfs relative path", BASE.replace('"/persist/var/lib/app"', '"var/lib/app"'), "groups.app.datasets[0]", "must be an absolute path"),
    ("btrfs dotdot", BASE.replace('"/persist/var/lib/app"', '"/persist/../etc"'), "groups.app.datasets[0]", "must not contain '..'"),
    ("btrfs NUL", BASE.replace('"/persist/var/lib/app"', '"/persist/a\\u0000b"'), "groups.app.datasets[0]", "NUL"),
    ("duplicate dataset after normalizing", BASE.replace('["/persist/var/lib/app"]', '["/persist/a", "/persist//a/"]'), "groups.app.datasets[1]", "duplicate dataset '/persist/a' (also datasets[0])"),
    ("zfs path", 'version = 1\n[groups.z]\nbackend = "zfs"\ndatasets = ["/rpool/x"]\n', "groups.z.datasets[0]", "not a path"),
    ("zfs snapshot name", 'version = 1\n[groups.z]\nbackend = "zfs"\ndatasets = ["rpool/x@now"]\n', "groups.z.datasets[0]", "must not contain '@' or '#'"),
    ("zfs empty component", 'version = 1\n[groups.z]\nbackend = "zfs"\ndatasets = ["rpool//x"]\n', "groups.z.datasets[0]", "empty component"),
    ("zfs snapshot_dir", 'version = 1\n[groups.z]\nbackend = "zfs"\ndatasets = ["rpool/x"]\nsnapshot_dir = "s"\n', "groups.z.snapshot_dir", "only to btrfs"),
    ("same dataset in two groups", BASE + '[groups.other]\nbackend = "btrfs"\ndatasets = ["/srv", "/persist/var/lib/app/"]\n', "groups.other.datasets[1]", "already in group 'app'"),
    ("group name", BASE + '[groups."my app"]\nbackend = "btrfs"\ndatasets = ["/srv"]\n', 'groups."my app"', "invalid name 'my app'"),
    ("group name key", BASE + 'name = "other"\n', "groups.app.name", "unknown key 'name'"),
    ("group not a table", "version = 1\n[groups]\napp = 5\n", "groups.app", "expected a table, got 5"),
    ("unknown group key", BASE + 'intervall = "1h"\n', "groups.app.intervall", "unknown key 'intervall'; did you mean 'interval'?"),
    ("unknown key, nothing close", BASE + "colour = 3\n", "groups.app.colour", "unknown key 'colour'"),
    ("bad duration", BASE + 'interval = "1 fortnight"\n', "groups.app.interval", "invalid duration '1 fortnight'"),
    ("zero duration", BASE + 'interval = "0h"\n', "groups.app.interval", "must be longer than zero"),
    ("duration as a number", BASE + "interval = 3600\n", "groups.app.interval", "expected a duration like '90m'"),
    ("unknown time zone", BASE + 'timezone = "Mars/Olympus"\n', "groups.app.timezone", "unknown time zone 'Mars/Olympus'"),
    ("time zone typo", with_defaults('[defaults]\ntimezone = "Europe/Berln"\n'), "defaults.timezone", "unknown time zone 'Europe/Berln'; did you mean 'Europe/Berlin'?"),
    ("time zone case", BASE + 'timezone = "europe/berlin"\n', "groups.app.timezone", "did you mean 'Europe/Berlin'?"),
    ("time zone as a path", BASE + 'timezone = "../../etc/passwd"\n', "groups.app.timezone", "unknown time zone '../../etc/passwd'"),
    ("time zone dot-dot", BASE + 'timezone = "Europe/../Europe/Berlin"\n', "groups.app.timezone", "unknown time zone 'Europe/../Europe/Berlin'"),
    ("time zone copy outside the listing", BASE + 'timezone = "posix/Europe/Berlin"\n', "groups.app.timezone", "unknown time zone 'posix/Europe/Berlin'"),
    ("prefix underscore", BASE + 'prefix = "snap_sync"\n', "groups.app.prefix", "invalid prefix 'snap_sync'"),
    ("snapshot_dir dotdot", BASE + 'snapshot_dir = "../snaps"\n', "groups.app.snapshot_dir", "must not contain '..'"),
    ("snapshot_dir dot", BASE + 'snapshot_dir = "."\n', "groups.app.snapshot_dir", "name a directory"),
    ("unknown defaults key", with_defaults('[defaults]\nintervl = "1h"\n'), "defaults.intervl", "did you mean 'interval'?"),
    ("retention typo", BASE + "[groups.app.retention]\ndailly = 7\n", "groups.app.retention.dailly", "unknown key 'dailly'; did you mean 'daily'?"),
    ("retention word", BASE + '[groups.app.retention]\ndaily = "seven"\n', "groups.app.retention.daily", "expected an integer, got 'seven'"),
    ("retention float", BASE + "[groups.app.retention]\ndaily = 7.5\n", "groups.app.retention.daily", "expected an integer, got 7.5"),
    ("retention bool", BASE + "[groups.app.retention]\ndaily = true\n", "groups.app.retention.daily", "expected an integer, got true"),
    ("retention negative", BASE + "[groups.app.retention]\nhourly = -1\n", "groups.app.retention.hourly", "must be 0 or more, got -1"),
    ("defaults retention negative", with_defaults("[defaults.retention]\nweekly = -2\n"), "defaults.retention.weekly", "must be 0 or more"),
    ("retention keep_within", BASE + '[groups.app.retention]\nkeep_within = "forever"\n', "groups.app.retention.keep_within", "invalid duration 'forever'"),
    ("retention keeps nothing", BASE + "[groups.app.retention]\nhourly = 0\ndaily = 0\nweekly = 0\nmonthly = 0\nyearly = 0\n", "groups.app.retention", "retention keeps only the newest snapshot; set keep_last = 1"),
    ("retention empty defaults", with_defaults("[defaults.retention]\n"), "groups.app.retention", "keeps only the newest snapshot"),
    ("retention not a table", BASE + "retention = 7\n", "groups.app.retention", "expected a table, got 7"),
    ("warn_after not past interval", BASE + 'interval = "1d"\nwarn_after = "12h"\n', "groups.app.warn_after", "12h is not longer than interval (1d)"),
    ("crit_after before warn_after", BASE + 'warn_after = "6h"\ncrit_after = "3h"\n', "groups.app.crit_after", "3h is not longer than warn_after (6h)"),
    ("crit_after under default warn", with_defaults('[defaults]\ncrit_after = "1h"\n'), "groups.app.crit_after", "1h is not longer than warn_after (2h)"),
    ("warn_after bad duration", BASE + 'warn_after = "later"\n', "groups.app.warn_after", "invalid duration 'later'"),
    ("target crit before warn", BASE + SSH_TARGET + 'warn_after = "1d"\ncrit_after = "1d"\n', "targets.nas.crit_after", "1d is not longer than warn_after (1d)"),
    ("target crit under the group's warn", BASE + 'targets = ["nas"]\nwarn_after = "2d"\n' + SSH_TARGET + 'crit_after = "1d"\n', "targets.nas.crit_after", "1d is not longer than warn_after (2d, from group 'app')"),
    ("monitoring ping_url", BASE + '[monitoring]\nping_url = "hc-ping.com/x"\n', "monitoring.ping_url", "expected http://... or https://..."),
    ("monitoring textfile relative", BASE + '[monitoring]\ntextfile = "snapsync.prom"\n', "monitoring.textfile", "absolute path"),
    ("monitoring unknown key", BASE + '[monitoring]\npingurl = "https://x"\n', "monitoring.pingurl", "did you mean 'ping_url'?"),
    ("hook type missing", BASE + '[[groups.app.hooks]]\ndsn = "x"\n', "groups.app.hooks[0].type", "missing required key (one of 'postgres', 'sqlite', 'freeze', 'command')"),
    ("hook type unknown", BASE + '[[groups.app.hooks]]\ntype = "postgress"\n', "groups.app.hooks[0].type", "unknown type 'postgress'; expected one of 'postgres'"),
    ("hook unknown key", BASE + '[[groups.app.hooks]]\ntype = "postgres"\ndns = "x"\n', "groups.app.hooks[0].dns", "did you mean 'dsn'?"),
    ("postgres mode", BASE + '[[groups.app.hooks]]\ntype = "postgres"\nmode = "pause"\n', "groups.app.hooks[0].mode", "expected 'checkpoint' or 'backup', got 'pause'"),
    ("postgres dsn and host", BASE + '[[groups.app.hooks]]\ntype = "postgres"\ndsn = "postgresql://"\nhost = "h"\n', "groups.app.hooks[0].dsn", "either dsn or host/port/user/dbname"),
    ("postgres port", BASE + '[[groups.app.hooks]]\ntype = "postgres"\nport = 0\n', "groups.app.hooks[0].port", "between 1 and 65535, got 0"),
    ("second hook bad", BASE + '[[groups.app.hooks]]\ntype = "postgres"\n[[groups.app.hooks]]\ntype = "sqlite"\ndatabases = []\n', "groups.app.hooks[1].databases", "must not be empty"),
    ("sqlite relative", BASE + '[[groups.app.hooks]]\ntype = "sqlite"\ndatabases = ["db.sqlite"]\n', "groups.app.hooks[0].databases[0]", "absolute path"),
    ("sqlite busy_timeout", BASE + '[[groups.app.hooks]]\ntype = "sqlite"\ndatabases = ["/x.db"]\nbusy_timeout = "soon"\n', "groups.app.hooks[0].busy_timeout", "invalid duration 'soon'"),
    ("freeze neither", BASE + '[[groups.app.hooks]]\ntype = "freeze"\n', "groups.app.hooks[0]", "exactly one of unit or cgroup"),
    ("freeze both", BASE + '[[groups.app.hooks]]\ntype = "freeze"\nunit = "a.service"\ncgroup = "/sys/fs/cgroup/a"\n', "groups.app.hooks[0]", "exactly one of unit or cgroup"),
    ("freeze unit", BASE + '[[groups.app.hooks]]\ntype = "freeze"\nunit = "forgejo"\n', "groups.app.hooks[0].unit", "expected a unit like 'forgejo.service'"),
    ("freeze cgroup", BASE + '[[groups.app.hooks]]\ntype = "freeze"\ncgroup = "/tmp/x"\n', "groups.app.hooks[0].cgroup", "in /sys/fs/cgroup/"),
    ("command neither", BASE + '[[groups.app.hooks]]\ntype = "command"\n', "groups.app.hooks[0]", "needs pre, post or both"),
    ("command string", BASE + '[[groups.app.hooks]]\ntype = "command"\npre = "systemctl stop app"\n', "groups.app.hooks[0].pre", "never run through a shell"),
    ("command empty argv", BASE + '[[groups.app.hooks]]\ntype = "command"\npost = []\n', "groups.app.hooks[0].post", "must not be empty"),
    ("command on_failure", BASE + '[[groups.app.hooks]]\ntype = "command"\npre = ["true"]\non_failure = "ignore"\n', "groups.app.hooks[0].on_failure", "expected 'abort' or 'continue'"),
    ("hooks not a list", BASE + 'hooks = "freeze"\n', "groups.app.hooks", "expected a list"),
    ("unknown target", BASE + 'targets = ["nass"]\n' + SSH_TARGET, "groups.app.targets[0]", "unknown target 'nass' (targets: nas); did you mean 'nas'?"),
    ("target without targets", BASE + 'targets = ["nas"]\n', "groups.app.targets[0]", "unknown target 'nas' (targets: none defined)"),
    ("target listed twice", BASE + 'targets = ["nas", "nas"]\n' + SSH_TARGET, "groups.app.targets[1]", "listed twice"),
    ("target type missing", BASE + '[targets.nas]\nhost = "h"\n', "targets.nas.type", "missing required key (one of 'ssh', 'local', 'dir', 's3')"),
    ("target type unknown", BASE + '[targets.nas]\ntype = "sftp"\n', "targets.nas.type", "unknown type 'sftp'"),
    ("ssh host missing", BASE + '[targets.nas]\ntype = "ssh"\npath = "/srv"\n', "targets.nas.host", "missing required key"),
    ("ssh port range", BASE + SSH_TARGET + "port = 70000\n", "targets.nas.port", "between 1 and 65535, got 70000"),
    ("ssh port string", BASE + SSH_TARGET + 'port = "22"\n', "targets.nas.port", "expected an integer, got '22'"),
    ("ssh user typo", BASE + SSH_TARGET + 'usr = "backup"\n', "targets.nas.usr", "did you mean 'user'?"),
    ("ssh password", BASE + SSH_TARGET + 'password = "hunter2"\n', "targets.nas.password", "credentials never go in the policy file"),
    ("s3 secret", BASE + '[targets.b2]\ntype = "s3"\nbucket = "b"\nsecret_access_key = "x"\n', "targets.b2.secret_access_key", "credentials never go in the policy file; use the environment or a credentials file"),
    ("s3 access key", BASE + '[targets.b2]\ntype = "s3"\nbucket = "b"\naccess_key = "x"\n', "targets.b2.access_key", "credentials never go"),
    ("s3 bucket missing", BASE + '[targets.b2]\ntype = "s3"\n', "targets.b2.bucket", "missing required key"),
    ("s3 endpoint", BASE + '[targets.b2]\ntype = "s3"\nbucket = "b"\nendpoint_url = "s3.example.com"\n', "targets.b2.endpoint_url", "expected http://"),
    ("s3 token file is fine but a token is not", BASE + '[targets.b2]\ntype = "s3"\nbucket = "b"\nsession_token = "x"\n', "targets.b2.session_token", "credentials never go"),
    ("s3 storage class", BASE + '[targets.b2]\ntype = "s3"\nbucket = "b"\nstorage_class = "DEEP_ARCHIVE"\n', "targets.b2.storage_class", "'STANDARD'"),
    ("offsite full_every", BASE + '[targets.usb]\ntype = "dir"\npath = "/mnt/usb"\nfull_every = "monthly"\n', "targets.usb.full_every", "invalid duration"),
    ("offsite full_every negative", BASE + '[targets.usb]\ntype = "dir"\npath = "/mnt/usb"\nfull_every = -1\n', "targets.usb.full_every", "0 or more"),
    ("offsite chunk size", BASE + '[targets.usb]\ntype = "dir"\npath = "/mnt/usb"\nchunk_size = "64k"\n', "targets.usb.chunk_size", "expected a size like '64M'"),
    ("offsite chunk too small", BASE + '[targets.usb]\ntype = "dir"\npath = "/mnt/usb"\nchunk_size = "512K"\n', "targets.usb.chunk_size", "between '1M' and '1G' of stream, got '512K'"),
    ("offsite rollback", BASE + '[targets.usb]\ntype = "dir"\npath = "/mnt/usb"\non_diverged = "rollback"\n', "targets.usb.on_diverged", "never roll back"),
    ("offsite key file relative", BASE + '[targets.usb]\ntype = "dir"\npath = "/mnt/usb"\nkey_file = "offsite.key"\n', "targets.usb.key_file", "absolute"),
    ("dir relative", BASE + '[targets.off]\ntype = "dir"\npath = "offsite"\n', "targets.off.path", "absolute path"),
    ("local path empty", BASE + '[targets.usb]\ntype = "local"\npath = ""\n', "targets.usb.path", "must not be empty"),
    ("target compress", BASE + SSH_TARGET + 'compress = "gzip"\n', "targets.nas.compress", "expected 'none' or 'zstd', got 'gzip'"),
    ("target on_diverged", BASE + SSH_TARGET + 'on_diverged = "overwrite"\n', "targets.nas.on_diverged", "expected 'refuse' or 'rollback'"),
    ("target rate_limit", BASE + SSH_TARGET + 'rate_limit = "10MB"\n', "targets.nas.rate_limit", "invalid rate limit '10MB'"),
    ("target max_lag", BASE + SSH_TARGET + 'max_lag = "1 day"\n', "targets.nas.max_lag", "invalid duration '1 day'"),
    ("target retention typo", BASE + SSH_TARGET + "[targets.nas.retention]\nmonthy = 3\n", "targets.nas.retention.monthy", "did you mean 'monthly'?"),
    ("target retention nothing", with_defaults("[defaults.retention]\nkeep_last = 1\n") + SSH_TARGET + "[targets.nas.retention]\nkeep_last = 0\n", "targets.nas.retention", "keeps only the newest snapshot"),
    ("target name", BASE + '[targets."-nas"]\ntype = "local"\npath = "/mnt"\n', "targets.-nas", "invalid name '-nas'"),
    ("target name with a dot", BASE + '[targets."."]\ntype = "local"\npath = "/mnt"\n', 'targets."."', "invalid name '.'"),
]


@pytest.mark.parametrize(("text", "key", "fragment"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_policy_gives_one_located_line(text: str, key: str, fragment: str) -> None:
    error = rejected(text)
    assert (error.file, error.key) == (SRC, key)
    assert fragment in error.problem
    assert str(error) == (f"{SRC}: {key}: {error.problem}" if key else f"{SRC}: {error.problem}")
    assert "\n" not in str(error)
    assert "pydantic" not in str(error) and "Traceback" not in str(error) and "Value error" not in str(error)
    assert error.exit_code == EXIT_USAGE


def test_several_problems_report_the_first_by_location_and_count_the_rest() -> None:
    error = rejected(BASE + 'prefix = "a_b"\ninterval = "soon"\ntimezone = "Nowhere"\n')
    assert error.key == "groups.app.interval"
    assert error.problem.endswith(" (and 2 more problems)")
    assert rejected(BASE + 'prefix = "a_b"\ninterval = "soon"\n').problem.endswith(" (and 1 more problem)")


def test_list_indices_sort_numerically() -> None:
    datasets = ", ".join(f'"/d{i}"' for i in range(12)).replace('"/d2"', '"d2"').replace('"/d10"', '"d10"')
    assert rejected(BASE.replace('["/persist/var/lib/app"]', f"[{datasets}]")).key == "groups.app.datasets[2]"


RICH = """\
version = 1
host = "q"

[defaults]
prefix = "auto"
timezone = "Europe/Berlin"
interval = "90m"
snapshot_dir = "/persist/.snapshots/"

[defaults.retention]
keep_last = 2
daily = 10
weekly = 3

[groups.pg]
backend = "btrfs"
datasets = ["/persist/var/lib/postgresql/", "/persist/var/lib/my app/./data", "/persist/var/lib/grünkohl"]
targets = ["nas", "b2"]

[groups.pg.retention]
daily = 0
monthly = 6
keep_within = "36h"

[[groups.pg.hooks]]
type = "postgres"
user = "postgres"

[[groups.pg.hooks]]
type = "freeze"
cgroup = "/sys/fs/cgroup/system.slice/postgresql.service"

[groups.media]
backend = "zfs"
datasets = ["rpool/persist/outline"]
interval = "1d"
timezone = "UTC"
prefix = "media-1"

[[groups.media.hooks]]
type = "command"
pre = ["systemctl", "stop", "outline.service"]

[targets.nas]
type = "ssh"
host = "nas.home.arpa"
path = "tank/backup/q"

[targets.nas.retention]
monthly = 24

[targets.b2]
type = "s3"
bucket = "offsite"
compress = "zstd"
rate_limit = "10M"
max_lag = "2d"
"""


def test_defaults_are_merged_into_every_group() -> None:
    policy = parse_policy(RICH, SRC)
    pg, media = policy.groups["pg"], policy.groups["media"]
    assert isinstance(pg, Group) and pg.name == "pg" and policy.source == SRC and policy.host == "q"
    assert (pg.prefix, pg.timezone, pg.interval, pg.snapshot_dir) == (
        "auto",
        "Europe/Berlin",
        timedelta(minutes=90),
        "/persist/.snapshots",
    )
    assert (media.prefix, media.timezone, media.interval, media.snapshot_dir) == ("media-1", "UTC", timedelta(days=1), None)
    assert pg.datasets == ("/persist/var/lib/postgresql", "/persist/var/lib/my app/data", "/persist/var/lib/grünkohl")
    assert pg.targets == ("nas", "b2") and media.targets == ()


def test_retention_merges_per_key_over_defaults_and_takes_the_group_time_zone() -> None:
    policy = parse_policy(RICH, SRC)
    assert policy.groups["pg"].retention == RetentionRules(
        keep_last=2, keep_within=timedelta(hours=36), daily=0, weekly=3, monthly=6, timezone="Europe/Berlin"
    )
    assert policy.groups["media"].retention == RetentionRules(keep_last=2, daily=10, weekly=3, timezone="UTC")
    assert policy.targets["nas"].retention == RetentionRules(keep_last=2, daily=10, weekly=3, monthly=24, timezone="Europe/Berlin")
    assert policy.targets["b2"].retention == policy.defaults.retention


def test_present_defaults_retention_replaces_the_built_in_one() -> None:
    assert parse_policy(BASE, SRC).groups["app"].retention == BUILTIN_RETENTION
    assert BUILTIN_RETENTION == RetentionRules(hourly=48, daily=30, weekly=8, monthly=12, yearly=3)
    rules = parse_policy(with_defaults("[defaults.retention]\ndaily = 7\n"), SRC).groups["app"].retention
    assert rules == RetentionRules(daily=7)


def test_check_thresholds_default_from_the_interval_and_inherit() -> None:
    group = parse_policy(BASE + 'interval = "6h"\n', SRC).groups["app"]
    assert (group.warn_after, group.crit_after) == (timedelta(hours=12), timedelta(hours=24))
    group = parse_policy(with_defaults('[defaults]\nwarn_after = "3h"\n'), SRC).groups["app"]
    assert (group.warn_after, group.crit_after) == (timedelta(hours=3), timedelta(hours=6))
    group = parse_policy(with_defaults('[defaults]\nwarn_after = "3h"\n') + 'crit_after = "1d"\n', SRC).groups["app"]
    assert (group.warn_after, group.crit_after) == (timedelta(hours=3), timedelta(days=1))


def test_keep_last_one_alone_is_accepted() -> None:
    text = BASE + "[groups.app.retention]\nkeep_last = 1\nhourly = 0\ndaily = 0\nweekly = 0\nmonthly = 0\nyearly = 0\n"
    assert parse_policy(text, SRC).groups["app"].retention == RetentionRules(keep_last=1)


def test_hooks_and_targets_get_their_defaults() -> None:
    policy = parse_policy(RICH, SRC)
    postgres, freeze = policy.groups["pg"].hooks
    assert postgres == PostgresHook(type="postgres", user="postgres", mode="checkpoint", timeout=timedelta(seconds=30))
    assert isinstance(freeze, FreezeHook) and freeze.max_pause == timedelta(seconds=30)
    (command,) = policy.groups["media"].hooks
    assert command == CommandHook(type="command", pre=("systemctl", "stop", "outline.service"))
    assert (command.timeout, command.on_failure, command.post) == (timedelta(seconds=60), "abort", None)
    nas, b2 = policy.targets["nas"], policy.targets["b2"]
    assert isinstance(nas, SshTarget) and isinstance(b2, S3Target)
    assert (nas.user, nas.port, nas.command, nas.ssh_options, nas.on_diverged, nas.compress) == (
        "root", 22, ("snapsync",), (), "refuse", "none"
    )
    assert (b2.compress, b2.rate_limit, b2.max_lag) == ("zstd", 10 << 20, timedelta(days=2))
    assert nas.rate_limit is None  # unlimited


@pytest.mark.parametrize(("text", "size"), [("100", 100), ("4K", 4096), ("4M", 4 << 20), ("1G", 1 << 30)])
def test_sizes_and_rates_are_parsed_into_bytes(text: str, size: int) -> None:
    assert parse_size(text) == size and format_size(size) == text


def test_rate_limit_is_a_number_once_loaded_and_its_text_in_the_output() -> None:
    target = parse_policy(BASE + SSH_TARGET + 'rate_limit = "4M"\n', SRC).targets["nas"]
    assert target.rate_limit == 4 << 20
    assert parse_policy(BASE + SSH_TARGET + 'rate_limit = "4M"\n', SRC).normalized()["targets"]["nas"]["rate_limit"] == "4M"


def test_normalized_is_resolved_json() -> None:
    data = parse_policy(RICH, SRC).normalized()
    assert set(data) == {"version", "host", "defaults", "groups", "targets", "monitoring"}
    pg = data["groups"]["pg"]
    assert "name" not in pg and pg["interval"] == "1h30m" and pg["snapshot_dir"] == "/persist/.snapshots"
    assert (pg["warn_after"], pg["crit_after"]) == ("3h", "6h")
    assert data["monitoring"] == {"ping_timeout": "10s"}
    assert pg["retention"] == {"keep_last": 2, "keep_within": "1d12h", "hourly": 0, "daily": 0, "weekly": 3, "monthly": 6, "yearly": 0}
    assert pg["hooks"][0] == {"type": "postgres", "user": "postgres", "mode": "checkpoint", "timeout": "30s", "on_failure": "abort", "check_query": "SELECT 1"}
    assert "snapshot_dir" not in data["groups"]["media"]
    assert data["targets"]["b2"]["max_lag"] == "2d"
    assert data["defaults"]["retention"] == {"keep_last": 2, "hourly": 0, "daily": 10, "weekly": 3, "monthly": 0, "yearly": 0}


@pytest.mark.parametrize("text", [BASE, RICH, *(p.read_text() for p in POLICIES)], ids=["base", "rich", *(p.name for p in POLICIES)])
def test_to_toml_round_trips(text: str) -> None:
    policy = parse_policy(text, SRC)
    again = parse_policy(policy.to_toml(), SRC)
    assert again.normalized() == policy.normalized()
    assert again == policy


counts = st.integers(min_value=0, max_value=1000)
durations = st.integers(min_value=1, max_value=10**7).map(lambda s: timedelta(seconds=s))


@given(
    defaults=st.dictionaries(st.sampled_from(["keep_last", "hourly", "daily", "weekly", "monthly", "yearly"]), counts),
    group=st.dictionaries(st.sampled_from(["hourly", "daily", "weekly"]), counts),
    keep_within=st.none() | durations,
    interval=durations,
)
def test_round_trip_property(
    defaults: dict[str, int], group: dict[str, int], keep_within: timedelta | None, interval: timedelta
) -> None:
    group_retention: dict[str, object] = {"keep_last": 1, **group}
    if keep_within is not None:
        group_retention["keep_within"] = format_duration(keep_within)
    text = (
        with_defaults(tomli_w.dumps({"defaults": {"retention": defaults}}))
        + f'interval = "{format_duration(interval)}"\n'
        + tomli_w.dumps({"groups": {"app": {"retention": group_retention}}})
    )
    policy = parse_policy(text, SRC)
    assert policy.groups["app"].interval == interval
    assert policy.groups["app"].retention.keep_within == keep_within
    assert parse_policy(policy.to_toml(), SRC) == policy


@pytest.mark.parametrize("path", POLICIES, ids=[p.name for p in POLICIES])
def test_every_example_policy_parses_without_warnings(path: Path) -> None:
    policy = parse_policy(path.read_text(), str(path))
    assert (policy.groups or policy.pulls) and policy.host == path.stem
    assert policy_warnings(policy) == []


PULL = 'version = 1\n[pulls.src]\nhost = "src"\npath = "/persist"\ninto = "/srv/in"\n'


@pytest.mark.parametrize(
    ("datasets", "key", "problem"),
    [
        ('["/srv/other"]', "pulls.src.datasets[0]", "is not below path '/persist'"),
        ('["/persist/a b"]', "pulls.src.datasets[0]", "component 'a b' cannot be requested"),
        ('["/persist/.hidden"]', "pulls.src.datasets[0]", "component '.hidden' cannot be requested"),
        ("[]", "pulls.src.datasets", ""),
    ],
)
def test_pull_datasets_must_be_requestable(datasets: str, key: str, problem: str) -> None:
    with pytest.raises(PolicyError) as raised:
        parse_policy(PULL + f"datasets = {datasets}\n", SRC)
    assert raised.value.key == key and problem in raised.value.problem


def test_a_policy_of_pulls_only_is_valid() -> None:
    policy = parse_policy(PULL + 'datasets = ["/persist/var/lib/headscale"]\n[pulls.src.retention]\ndaily = 90\n', SRC)
    pull = policy.pulls["src"]
    assert not policy.groups and pull.relative("/persist/var/lib/headscale") == "var/lib/headscale"
    assert (pull.user, pull.port, pull.command, pull.retention.daily, pull.retention.keep_last) == (
        "root", 22, ("snapsync",), 90, policy.defaults.retention.keep_last
    )


def test_examples_exist() -> None:
    assert {p.stem for p in POLICIES} >= {"drhorrible", "q", "ursula", "raishan"}


def test_group_can_be_validated_outside_a_file_with_built_in_defaults() -> None:
    group = Group.model_validate({"name": "g", "backend": "btrfs", "datasets": ["/a/"], "interval": "2h"})
    assert (group.datasets, group.prefix, group.timezone) == (("/a",), "snapsync", "UTC")
    assert (group.snapshot_dir, group.retention) == (".snapsync", BUILTIN_RETENTION)
    rules = RetentionRules(keep_last=5)
    assert Group.model_validate({"name": "g", "backend": "zfs", "datasets": ["p/a"], "retention": rules}).retention is rules


def test_models_are_frozen() -> None:
    policy = parse_policy(BASE, SRC)
    with pytest.raises(ValueError):
        setattr(policy.groups["app"], "prefix", "x")
    assert DEFAULT_POLICY_PATH == "/etc/snapsync/policy.toml"
    assert isinstance(policy, Policy)


HOOKED = BASE + '[[groups.app.hooks]]\ntype = "freeze"\nunit = "app.service"\n'


def write(tmp_path: Path, text: str, mode: int = 0o644, uid: int = 0) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    os.chmod(path, mode)
    os.chown(path, uid, 0)
    return path


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@needs_root
@pytest.mark.parametrize(
    ("mode", "uid", "fault"),
    [
        (0o666, 0, "is group- and world-writable (mode 0666)"),
        (0o664, 0, "group-writable (mode 0664)"),
        (0o646, 0, "is world-writable (mode 0646)"),
        (0o644, 65534, "owned by uid 65534"),
        (0o664, 65534, "owned by uid 65534 and group-writable (mode 0664)"),
    ],
)
def test_hooks_are_refused_from_a_file_others_can_write(tmp_path: Path, mode: int, uid: int, fault: str) -> None:
    path = write(tmp_path, HOOKED, mode, uid)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    error = caught.value
    assert (error.file, error.key) == (str(path), "")
    assert error.problem.startswith("defines hooks (commands run as root) but is ")
    assert fault in error.problem
    assert error.problem.endswith(f"; fix with: chown root:root {path} && chmod go-w {path}")


def rejected_load(path: Path) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return caught.value


@needs_root
def test_hooks_from_a_root_owned_private_file_are_fine(tmp_path: Path) -> None:
    path = write(tmp_path, HOOKED, 0o600)
    policy = load_policy(str(path))
    assert policy.source == str(path) and policy.groups["app"].hooks


@needs_root
def test_without_hooks_a_writable_file_is_fine(tmp_path: Path) -> None:
    assert load_policy(write(tmp_path, BASE, 0o666, 65534)).groups["app"].hooks == ()


def test_missing_file(tmp_path: Path) -> None:
    error = rejected_load(tmp_path / "nope.toml")
    assert error.file == str(tmp_path / "nope.toml") and "cannot read the policy file: No such file" in error.problem


def test_directory_and_non_utf8(tmp_path: Path) -> None:
    assert "cannot read the policy file" in rejected_load(tmp_path).problem
    path = tmp_path / "latin1.toml"
    path.write_bytes(BASE.encode() + b'host = "m\xfcnchen"\n')
    assert rejected_load(path).problem.startswith("invalid TOML: not UTF-8 (byte 0xfc")


def test_load_reports_parse_errors_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(BASE + "[groups.app.retention]\ndaily = -1\n")
    assert str(rejected_load(path)) == f"{path}: groups.app.retention.daily: must be 0 or more, got -1"


BTRFS_PAIR = 'version = 1\n[groups.x]\nbackend = "btrfs"\ndatasets = ["/a", "/b"]\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE, []),
        (
            BTRFS_PAIR,
            ["group 'x': btrfs cannot snapshot several subvolumes atomically; add a freeze hook (or an application hook) if they must agree"],
        ),
        (BTRFS_PAIR + '[[groups.x.hooks]]\ntype = "freeze"\nunit = "x.service"\n', []),
        (
            BTRFS_PAIR + '[[groups.x.hooks]]\ntype = "sqlite"\ndatabases = ["/a/db"]\n',
            ["group 'x': btrfs cannot snapshot several subvolumes atomically; add a freeze hook (or an application hook) if they must agree"],
        ),
        ('version = 1\n[groups.z]\nbackend = "zfs"\ndatasets = ["rpool/a", "rpool/b/c"]\n', []),
        (
            'version = 1\n[groups.z]\nbackend = "zfs"\ndatasets = ["tank/a", "rpool/b", "tank/c"]\n',
            ["group 'z': datasets in pools rpool, tank cannot be snapshotted atomically (one snapshot per pool)"],
        ),
        (BASE + SSH_TARGET, ["target 'nas' is not used by any group"]),
    ],
    ids=["single", "btrfs-pair", "btrfs-pair-frozen", "btrfs-pair-app-hook", "zfs-one-pool", "zfs-two-pools", "unused-target"],
)
def test_policy_warnings(text: str, expected: list[str]) -> None:
    assert policy_warnings(parse_policy(text, SRC)) == expected


KEYS = ["version", "host", "defaults", "groups", "targets", "app", "nas", "retention", "hooks", "type", "backend",
        "datasets", "interval", "timezone", "daily", "keep_within", "postgres", "ssh", "s3", "btrfs", "zfs", "path"]
scalars = st.one_of(st.integers(-3, 3), st.booleans(), st.floats(allow_nan=False), st.sampled_from(KEYS + ["/a", "1h", ""]))
toml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=12,
)


@given(data=st.dictionaries(st.sampled_from(KEYS), toml_values, max_size=5))
def test_any_document_gives_a_policy_or_one_policy_error(data: dict[str, object]) -> None:
    try:
        text = tomli_w.dumps(data)
    except (TypeError, ValueError):
        return
    try:
        parse_policy(text, SRC)
    except PolicyError as e:
        assert str(e).startswith(f"{SRC}: ") and "\n" not in str(e)
