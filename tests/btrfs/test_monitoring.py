"""Monitoring on real btrfs: the metrics textfile after real runs (a failed one too), `snapsync check`
against fresh, stale and unreachable copies, the healthchecks ping, and the log lines."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from snapsync import __version__
from snapsync.clock import ManualClock
from snapsync.plan.naming import parse_snapshot_name
from snapsync.policy.loader import load_policy
from snapsync.ops.runner import Runner
from tests.conftest import make_subvolume
from tests.promtext import Metrics
from tests.replication.helpers import run_json, snapsync, write_policy
from tests.sshd import free_port

pytestmark = pytest.mark.btrfs

NO_RETRY = {"SNAPSYNC_RETRY_ATTEMPTS": "1"}


def textfile(tmp_path: Path) -> Path:
    return tmp_path / "snapsync-state" / "metrics" / "snapsync.prom"


def stamp(name: str) -> float:
    when = parse_snapshot_name("snapsync", name)
    assert when is not None
    return when.timestamp()


def with_hook(policy: Path, argv: str) -> None:
    text = policy.read_text().replace("[targets.", f'[[groups.app.hooks]]\ntype = "command"\npre = {argv}\n[targets.', 1)
    policy.write_text(text)


def test_metrics_after_good_and_failed_runs(btrfs_root: Path, target_root: Path, tmp_path: Path) -> None:
    app = make_subvolume(btrfs_root / "persist" / "app", "v1\n")
    policy = write_policy(tmp_path / "p.toml", [app], {"usb": f'type = "local"\npath = "{target_root}"'},
                          interval="1s", retention="keep_last = 2")
    with_hook(policy, '["true"]')

    before = datetime.now(UTC).timestamp()
    first = run_json("-p", str(policy), "run")
    after = datetime.now(UTC).timestamp() + 1
    (group,) = first["groups"]
    (usb,) = group["targets"]
    m = Metrics(textfile(tmp_path))
    assert m.policy == "p"  # the policy file's stem labels every series (Metrics checks that each has it)
    assert m.one("snapsync_info", version=__version__, host="src") == 1
    assert m.one("snapsync_last_run_success", command="run") == 1
    last_ok = m.one("snapsync_last_success_timestamp_seconds", command="run")
    assert before - 1 <= last_ok <= after
    assert m.one("snapsync_group_ok", group="app") == 1
    assert m.one("snapsync_newest_snapshot_timestamp_seconds", group="app") == stamp(group["snapshot"])
    assert m.one("snapsync_sent_bytes_total", group="app", target="usb") == usb["bytes_sent"] > 0
    assert m.one("snapsync_sent_snapshots_total", group="app", target="usb") == 1
    assert m.one("snapsync_target_newest_copy_timestamp_seconds", group="app", target="usb") == stamp(group["snapshot"])
    assert m.one("snapsync_target_lag_seconds", group="app", target="usb") == 0
    assert m.one("snapsync_snapshots_kept", group="app", target="") == len([d for d in group["plan"] if d["keep"]]) == 1
    assert m.one("snapsync_hook_ok", group="app", hook="0", type="command") == 1
    group_ok_at = m.one("snapsync_group_last_success_timestamp_seconds", group="app")

    # Three more good runs, a second apart: retention (keep_last = 2) deletes on both sides.
    sent_bytes = usb["bytes_sent"]
    for _ in range(3):
        (app / "data.txt").write_text(f"v{datetime.now(UTC).timestamp()}\n")
        time.sleep(1.1)
        report = run_json("-p", str(policy), "run")
        sent_bytes += report["groups"][0]["targets"][0]["bytes_sent"]
    m = Metrics(textfile(tmp_path))
    assert m.one("snapsync_snapshots_deleted_total", group="app", target="") == 2
    assert m.one("snapsync_snapshots_kept", group="app", target="") == 2
    assert m.one("snapsync_snapshots_deleted_total", group="app", target="usb") == 2
    assert m.one("snapsync_sent_bytes_total", group="app", target="usb") == sent_bytes
    assert m.one("snapsync_sent_snapshots_total", group="app", target="usb") == 4
    newest = m.one("snapsync_newest_snapshot_timestamp_seconds", group="app")
    last_ok = m.one("snapsync_last_success_timestamp_seconds", command="run")
    group_ok_at = m.one("snapsync_group_last_success_timestamp_seconds", group="app")

    # A failed run: the hook fails (snapshot skipped), and a second target cannot be reached.
    text = policy.read_text().replace('pre = ["true"]', 'pre = ["false"]').replace('targets = ["usb"]', 'targets = ["usb", "gone"]')
    policy.write_text(text + f'[targets.gone]\ntype = "ssh"\nhost = "127.0.0.1"\nport = {free_port()}\npath = "/srv"\n')
    time.sleep(1.1)
    failed = run_json("-p", str(policy), "run", env=NO_RETRY, expect=1)
    assert failed["groups"][0]["snapshot"] is None
    m = Metrics(textfile(tmp_path))
    assert m.one("snapsync_last_run_success", command="run") == 0
    assert m.one("snapsync_last_success_timestamp_seconds", command="run") == last_ok  # not forgotten
    assert m.one("snapsync_last_run_timestamp_seconds", command="run") > last_ok
    assert m.one("snapsync_group_ok", group="app") == 0
    assert m.one("snapsync_group_last_success_timestamp_seconds", group="app") == group_ok_at
    assert m.one("snapsync_failures_total", group="app", target="", kind="hook") == 1
    assert m.one("snapsync_hook_ok", group="app", hook="0", type="command") == 0
    assert m.one("snapsync_newest_snapshot_timestamp_seconds", group="app") == newest
    assert m.one("snapsync_target_ok", group="app", target="gone", direction="push") == 0
    assert m.one("snapsync_failures_total", group="app", target="gone", kind="replicate") == 1
    assert m.get("snapsync_target_last_success_timestamp_seconds", group="app", target="gone") is None
    assert m.one("snapsync_target_ok", group="app", target="usb", direction="push") == 1
    assert m.one("snapsync_failures_total", group="app", target="usb", kind="replicate") == 0

    # prune and replicate write their own command's series; a dry run writes nothing.
    mtime = textfile(tmp_path).stat().st_mtime_ns
    run_json("-p", str(policy), "prune", "--dry-run")
    assert textfile(tmp_path).stat().st_mtime_ns == mtime
    run_json("-p", str(policy), "prune")
    run_json("-p", str(policy), "replicate", "usb")
    m = Metrics(textfile(tmp_path))
    assert m.one("snapsync_last_run_success", command="prune") == 1
    assert m.one("snapsync_last_run_success", command="replicate") == 1
    assert m.one("snapsync_last_run_success", command="run") == 0
    assert [p.name for p in textfile(tmp_path).parent.iterdir()] == ["snapsync.prom"]  # no temporary file left

    # The unreachable target is removed from the policy: its series go with it, its alerts stop.
    assert m.get("snapsync_target_ok", group="app", target="gone", direction="push") == 0
    policy.write_text(policy.read_text().replace('targets = ["usb", "gone"]', 'targets = ["usb"]'))
    run_json("-p", str(policy), "prune")
    m = Metrics(textfile(tmp_path))
    assert m.get("snapsync_target_ok", group="app", target="gone", direction="push") is None
    assert m.get("snapsync_failures_total", group="app", target="gone", kind="replicate") is None
    assert m.one("snapsync_target_ok", group="app", target="usb", direction="push") == 1
    assert textfile(tmp_path).stat().st_mode & 0o777 == 0o644  # node_exporter is another user


def test_the_textfile_goes_where_the_policy_says_and_a_failure_to_write_it_fails_no_backup(
    btrfs_root: Path, tmp_path: Path
) -> None:
    app = make_subvolume(btrfs_root / "persist" / "app", "v1\n")
    policy = write_policy(tmp_path / "p.toml", [app], {})
    custom = tmp_path / "node-exporter" / "snapsync.prom"
    policy.write_text(policy.read_text().replace("targets = []\n", "") + f'[monitoring]\ntextfile = "{custom}"\n')
    taken = run_json("-p", str(policy), "snapshot")["groups"][0]["snapshot"]
    assert Metrics(custom).one("snapsync_newest_snapshot_timestamp_seconds", group="app") == stamp(taken)
    assert not textfile(tmp_path).exists()

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    policy.write_text(policy.read_text().replace(str(custom), str(blocked / "snapsync.prom")))
    time.sleep(1.1)
    proc = snapsync("-p", str(policy), "snapshot", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["groups"][0]["snapshot"]
    assert "warning: could not write metrics:" in proc.stderr and "a-file" in proc.stderr


def test_two_policy_files_of_one_name_writing_beside_each_other_are_told(btrfs_root: Path, tmp_path: Path) -> None:
    """Their series would carry the same policy label, and node_exporter would drop one of each pair."""
    textfiles = tmp_path / "textfiles"
    policies = {}
    for name in ("one", "two", "other"):
        (tmp_path / name).mkdir()
        data = make_subvolume(btrfs_root / name, "v1\n")
        stem = "other" if name == "other" else "policy"
        policy = write_policy(tmp_path / name / f"{stem}.toml", [data], {})
        policy.write_text(policy.read_text().replace("targets = []\n", "") + f'[monitoring]\ntextfile = "{textfiles / name}.prom"\n')
        policies[name] = policy
    first = snapsync("-p", str(policies["one"]), "snapshot", check=True)
    assert "warning" not in first.stderr
    second = snapsync("-p", str(policies["two"]), "snapshot", check=True)  # the backup itself succeeds
    (line,) = second.stderr.splitlines()
    assert line == (f"snapsync: warning: metrics: {textfiles / 'one.prom'} also holds series of a policy named 'policy' and "
                    "node_exporter drops the series both files have; rename one of the policy files"), line
    assert snapsync("-p", str(policies["other"]), "snapshot", check=True).stderr == ""
    assert [Metrics(textfiles / f"{n}.prom").policy for n in ("one", "two", "other")] == ["policy", "policy", "other"]


def test_two_policies_sharing_one_textfile_are_told(btrfs_root: Path, tmp_path: Path) -> None:
    """Both left out ``[monitoring] textfile``: the second would silently replace the first's series."""
    policies = []
    for name in ("databases", "web"):
        data = make_subvolume(btrfs_root / name, "v1\n")
        policy = write_policy(tmp_path / f"{name}.toml", [data], {}, group=name)
        policy.write_text(policy.read_text().replace("targets = []\n", ""))
        policies.append(policy)
    assert snapsync("-p", str(policies[0]), "snapshot", check=True).stderr == ""
    second = snapsync("-p", str(policies[1]), "snapshot", check=True)  # the backup itself succeeds
    (line,) = second.stderr.splitlines()
    assert line == (f"snapsync: warning: metrics: {textfile(tmp_path)} was written by the policy 'databases' too; two "
                    "policies sharing a textfile hide each other's series: give each its own [monitoring] textfile"), line
    assert Metrics(textfile(tmp_path)).policy == "web"
    time.sleep(1.05)  # snapshot names carry the second
    assert snapsync("-p", str(policies[1]), "snapshot", check=True).stderr == ""  # its own file again: quiet


def old_history(policy: Path, hours: float, replicate: bool = True) -> None:
    """Snapshots (and copies) taken ``hours`` ago, by the real runner on a clock set back."""
    clock = ManualClock(datetime.now(UTC) - timedelta(hours=hours))
    Runner(load_policy(str(policy)), clock).run(
        list(load_policy(str(policy)).groups.values()), take=True, only_due=False, prune=False, replicate=replicate,
    )


def check(policy: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, dict[str, object]]:
    text = snapsync("-p", str(policy), "check", *args, env={**NO_RETRY, **(env or {})})
    lines = text.stdout.splitlines()
    assert len(lines) == 1, text.stdout + text.stderr
    as_json = snapsync("-p", str(policy), "check", "--json", "--no-ping", *args, env={**NO_RETRY, **(env or {})})
    assert as_json.returncode == text.returncode
    data = json.loads(as_json.stdout)
    assert data["exit_code"] == text.returncode
    return text.returncode, lines[0], data


@pytest.fixture
def site(btrfs_root: Path, target_root: Path, tmp_path: Path) -> Path:
    """interval 1h: warn after 2h, critical after 4h."""
    app = make_subvolume(btrfs_root / "persist" / "app", "v1\n")
    return write_policy(tmp_path / "p.toml", [app], {"usb": f'type = "local"\npath = "{target_root}"'}, interval="1h")


@pytest.mark.parametrize(("hours", "code", "word"), [(0.25, 0, "OK"), (3, 1, "WARNING"), (5, 2, "CRITICAL")])
def test_check_judges_the_age_of_snapshots_and_copies(site: Path, hours: float, code: int, word: str) -> None:
    old_history(site, hours)
    rc, line, data = check(site)
    assert rc == code and line.startswith(f"SNAPSYNC {word} - "), line
    checks = {(c["group"], c["target"]): c for c in data["checks"]}  # type: ignore[union-attr]
    assert set(checks) == {("app", None), ("app", "usb")}
    assert all(c["status"] == word for c in checks.values())
    assert abs(checks[("app", "usb")]["age_seconds"] - hours * 3600) < 120
    assert "'app'=" in line and ";7200;14400;0" in line  # perfdata: age, warn, crit, min
    if code:
        assert f"app: newest snapshot {int(hours)}h" in line and "app->usb: newest copy" in line


def test_check_finds_a_stale_target_behind_a_fresh_source(site: Path) -> None:
    old_history(site, 3)
    run_json("-p", str(site), "snapshot")  # fresh here; the target still holds the 3h old copy
    rc, line, _ = check(site)
    assert rc == 1 and line.startswith("SNAPSYNC WARNING - app->usb: newest copy 3h"), line
    assert "(warn 2h)" in line and "1 of 2 fresh" in line
    assert check(site, "--local")[0] == 0
    site.write_text(site.read_text().replace('type = "local"', 'type = "local"\nwarn_after = "6h"'))
    assert check(site)[0] == 0  # the target's own threshold


def test_check_calls_a_target_it_cannot_ask_unknown(site: Path) -> None:
    port = free_port()
    site.write_text(site.read_text().replace('targets = ["usb"]', 'targets = ["usb", "nas"]')
                    + f'[targets.nas]\ntype = "ssh"\nhost = "127.0.0.1"\nport = {port}\npath = "/srv"\n')
    run_json("-p", str(site), "snapshot")
    run_json("-p", str(site), "replicate", "usb")
    rc, line, data = check(site)
    assert rc == 3 and line.startswith("SNAPSYNC UNKNOWN - app->nas: cannot ask: "), line
    assert f"127.0.0.1:{port}" in line and "2 of 3 fresh" in line
    nas = next(c for c in data["checks"] if c["target"] == "nas")  # type: ignore[union-attr]
    assert nas["status"] == "UNKNOWN" and nas["age_seconds"] is None


def test_check_calls_an_unreachable_target_critical_when_its_last_copy_is_already_too_old(
    site: Path, target_root: Path
) -> None:
    old_history(site, 5)  # replicated 5h ago; the source keeps a hold on that base for usb
    run_json("-p", str(site), "snapshot")
    target_root.rename(target_root.with_name("unplugged"))
    try:
        rc, line, _ = check(site)
    finally:
        target_root.with_name("unplugged").rename(target_root)
    assert rc == 2 and "app->usb: cannot ask (" in line and "its newest copy was already 5h" in line, line
    assert "1 of 2 fresh" in line


def test_check_asks_an_offsite_archive(btrfs_root: Path, target_root: Path, tmp_path: Path) -> None:
    app = make_subvolume(btrfs_root / "persist" / "app", "v1\n")
    key = tmp_path / "offsite.key"
    snapsync("keygen", str(key), check=True)
    share = target_root / "share"
    share.mkdir()
    policy = write_policy(tmp_path / "p.toml", [app], {"nas": f'type = "dir"\npath = "{share}"\nkey_file = "{key}"'}, interval="1h")
    old_history(policy, 3)
    run_json("-p", str(policy), "snapshot")
    rc, line, data = check(policy)
    assert rc == 1 and line.startswith("SNAPSYNC WARNING - app->nas: newest copy 3h old (warn 2h)"), line
    share.rename(target_root / "unmounted")  # the share is gone: an error, never an empty archive
    rc, line, _ = check(policy)
    assert rc == 3 and line.startswith("SNAPSYNC UNKNOWN - app->nas: cannot ask: "), line


def test_check_with_a_broken_policy_is_one_critical_line(tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('version = 1\n[groups.app]\nbackend = "btrfs"\ndatasets = ["/x"]\nwarn_after = "soon"\n')
    proc = snapsync("-p", str(policy), "check")
    assert proc.returncode == 2
    assert proc.stdout.startswith("SNAPSYNC CRITICAL - ") and "groups.app.warn_after" in proc.stdout
    assert len(proc.stdout.splitlines()) == 1


class Pings(BaseHTTPRequestHandler):
    received: list[tuple[str, str]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        Pings.received.append((self.path, body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ping_server() -> Iterator[str]:
    Pings.received = []
    server = HTTPServer(("127.0.0.1", 0), Pings)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/ping/3f2a"
    server.shutdown()
    server.server_close()


def test_check_pings_success_and_failure(site: Path, ping_server: str) -> None:
    site.write_text(site.read_text() + f'[monitoring]\nping_url = "{ping_server}"\n')
    old_history(site, 5)
    stale = snapsync("-p", str(site), "check")
    old_history(site, 3)
    late = snapsync("-p", str(site), "check")
    run_json("-p", str(site), "run")
    fresh = snapsync("-p", str(site), "check")
    assert (stale.returncode, late.returncode, fresh.returncode) == (2, 1, 0)
    assert snapsync("-p", str(site), "check", "--no-ping").returncode == 0
    assert Pings.received == [
        ("/ping/3f2a/fail", stale.stdout.strip()), ("/ping/3f2a", late.stdout.strip()), ("/ping/3f2a", fresh.stdout.strip()),
    ]
    # the environment's URL wins over the policy's (it keeps the secret out of the file)
    assert snapsync("-p", str(site), "check", env={"SNAPSYNC_PING_URL": ping_server + "-env"}).returncode == 0
    assert Pings.received[-1][0] == "/ping/3f2a-env"


def test_ping_failure_warns_and_keeps_the_verdict(site: Path, tmp_path: Path) -> None:
    old_history(site, 5)
    site.write_text(site.read_text() + f'[monitoring]\nping_url = "http://127.0.0.1:{free_port()}/abc"\n')
    proc = snapsync("-p", str(site), "check", env=NO_RETRY)
    assert proc.returncode == 2 and proc.stdout.startswith("SNAPSYNC CRITICAL")
    assert "warning: ping 127.0.0.1:" in proc.stderr and "/abc" not in proc.stderr


def test_a_ping_to_a_server_that_answers_garbage_warns_and_keeps_the_verdict(site: Path) -> None:
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(b"garbage\r\n\r\n")
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    old_history(site, 5)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/abc"
    proc = snapsync("-p", str(site), "check", env={"SNAPSYNC_PING_URL": url, "SNAPSYNC_RETRY_ATTEMPTS": "2"})
    server.close()
    assert proc.returncode == 2 and proc.stdout.startswith("SNAPSYNC CRITICAL"), proc.stdout + proc.stderr
    assert "warning: ping 127.0.0.1:" in proc.stderr and "internal error" not in proc.stdout + proc.stderr


def test_a_check_that_breaks_is_unknown_not_warning(site: Path, tmp_path: Path) -> None:
    run_json("-p", str(site), "run")
    drills = tmp_path / "snapsync-state" / "drills"
    drills.mkdir(parents=True)
    (drills / "app.usb.json").write_text('{"ok": false, "checks": [1]}')  # a record in a shape check never wrote
    proc = snapsync("-p", str(site), "check")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith("SNAPSYNC UNKNOWN - internal error: AttributeError") and len(proc.stdout.splitlines()) == 1


def test_log_lines_are_one_per_event(site: Path) -> None:
    proc = snapsync("-p", str(site), "--log-format", "json", "-v", "run")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "snapshot" and "sent" in kinds and kinds[-2:] == ["run-group", "run-target"]
    sent = next(e for e in events if e["event"] == "sent")
    assert (sent["group"], sent["target"], sent["direction"]) == ("app", "usb", "push") and sent["bytes"] > 0
    assert all({"time", "level", "msg"} <= set(e) for e in events)
    time.sleep(1.1)  # snapshot names have one-second resolution
    text = snapsync("-p", str(site), "-v", "snapshot")
    assert text.stderr and all(line.startswith("snapsync: info: ") for line in text.stderr.splitlines())
