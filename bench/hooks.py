"""The stall each hook adds to a write workload: commit latency with and without snapshots, same run.

A writer process commits single-row INSERTs as fast as it can and records every commit's latency.
Two workloads, each data set in its own scratch btrfs subvolume, phases of ``--seconds`` each:

    postgres  (a real PostgreSQL 15, data and WAL in the subvolume)
        baseline, snapshot only, checkpoint hook, backup hook
    sqlite    (a WAL-mode database in the subvolume; the writer runs in its own cgroup v2)
        baseline, snapshot only, sqlite hook, freeze hook (the writer's cgroup)

"snapshot only" takes the same group snapshot every ``--every`` seconds without a hook. Printed per
phase: commits, p50, p99 and max commit latency, and the p99 added over the baseline. A snapshot
every second is far more often than any real schedule: read the figures as an upper bound.
Needs root (loop btrfs, cgroups) and PostgreSQL 15.

    .venv/bin/python bench/hooks.py [--seconds 8] [--every 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import btrfsutil  # noqa: E402

from snapsync.clock import ManualClock  # noqa: E402
from snapsync.policy.loader import parse_policy  # noqa: E402
from snapsync.ops.runner import Runner  # noqa: E402
from snapsync.backends.scratch import scratch_btrfs  # noqa: E402
from tests.hooks.pg import init_server, pg_unavailable  # noqa: E402
from tests.sshd import free_port  # noqa: E402


WRITER = """
import signal, sys, time
kind, target, out = sys.argv[1:4]
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
if kind == "postgres":
    import psycopg
    conn = psycopg.connect(target, autocommit=True)
    sql, args = "INSERT INTO bench VALUES (DEFAULT, %s)", ["x" * 200]
else:
    import sqlite3
    conn = sqlite3.connect(target, timeout=60, isolation_level=None)
    sql, args = "INSERT INTO bench (payload) VALUES (?)", ("x" * 200,)
latencies = []
while not stop:
    started = time.perf_counter()
    conn.execute(sql, args)
    latencies.append(time.perf_counter() - started)
with open(out, "w") as f:
    f.write("\\n".join(map(repr, latencies)))
"""


def policy(subvolume: Path, hook: str) -> str:
    return (f'version = 1\n[defaults.retention]\nkeep_last = 1000\n[groups.db]\nbackend = "btrfs"\n'
            f'datasets = ["{subvolume}"]\ninterval = "1m"\n{hook}')


def measure(kind: str, target: str, seconds: float, snapshot: Callable[[], None] | None, every: float,
            cgroup: Path | None, work: Path) -> dict[str, float]:
    out = work / f"latencies-{uuid.uuid4().hex[:6]}"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, kind, target, str(out)])
    if cgroup is not None:
        (cgroup / "cgroup.procs").write_text(str(writer.pid))
    time.sleep(0.5)  # connected and writing
    snaps = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if snapshot is not None:
            snapshot()
            snaps += 1
        time.sleep(every)
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(60) == 0, f"{kind} writer failed"
    ms = sorted(float(x) * 1000 for x in out.read_text().split())
    return {"commits": len(ms), "snapshots": snaps, "p50_ms": statistics.median(ms),
            "p99_ms": ms[int(len(ms) * 0.99)], "max_ms": ms[-1]}


def phases(kind: str, target: str, subvolume: Path, hooks: dict[str, str], args: argparse.Namespace,
           cgroup: Path | None, work: Path) -> dict[str, dict[str, float]]:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    results = {}
    for phase, hook in {"baseline": None, "snapshot only": "", **hooks}.items():
        print(f"{kind}: {phase} ...", file=sys.stderr, flush=True)
        snapshot = None
        if hook is not None:
            runner = Runner(parse_policy(policy(subvolume, hook), "<bench>"), clock)
            group = runner.policy.groups["db"]

            def snapshot() -> None:
                (report,) = runner.run([group], take=True, only_due=False, prune=False)
                assert report.ok, report.to_json()
                clock.advance(timedelta(minutes=1))

        results[phase] = measure(kind, target, args.seconds, snapshot, args.every, cgroup, work)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--every", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reason = pg_unavailable()
    if reason:
        sys.exit(f"bench/hooks.py: {reason}")
    unified = Path("/sys/fs/cgroup/unified")
    if not (unified / "cgroup.procs").exists():
        unified = Path("/sys/fs/cgroup")
    import psycopg

    base = Path(tempfile.mkdtemp(prefix="snapsync-bench-hooks-", dir="/var/tmp"))
    base.chmod(0o755)
    cgroup = unified / f"snapsync-bench-{uuid.uuid4().hex[:6]}"
    cgroup.mkdir()
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        with scratch_btrfs("2G", parent=str(base), label="bench-hooks") as mnt:
            for d in (mnt.parent, mnt):
                d.chmod(0o755)
            pg_data = mnt / "postgresql"
            btrfsutil.create_subvolume(pg_data)
            server = init_server(pg_data, free_port())
            try:
                with psycopg.connect(server.dsn, autocommit=True) as conn:
                    conn.execute("CREATE TABLE bench (id bigserial PRIMARY KEY, payload text)")
                pg_hook = '[[groups.db.hooks]]\ntype = "postgres"\ndsn = "' + server.dsn + '"\nmode = "{}"\n'
                results["postgres"] = phases("postgres", server.dsn, pg_data, {
                    "checkpoint hook": pg_hook.format("checkpoint"), "backup hook": pg_hook.format("backup"),
                }, args, None, base)
            finally:
                server.stop()
            app = mnt / "app"
            btrfsutil.create_subvolume(app)
            db = app / "app.db"
            import sqlite3

            with sqlite3.connect(db) as conn:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("CREATE TABLE bench (id integer PRIMARY KEY, payload text)")
            results["sqlite"] = phases("sqlite", str(db), app, {
                "sqlite hook": f'[[groups.db.hooks]]\ntype = "sqlite"\ndatabases = ["{db}"]\n',
                "freeze hook": f'[[groups.db.hooks]]\ntype = "freeze"\ncgroup = "{cgroup}"\n',
            }, args, cgroup, base)
    finally:
        (cgroup / "cgroup.freeze").write_text("0")
        for pid in (cgroup / "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.2)
        cgroup.rmdir()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"commit latency, {args.seconds:g} s per phase, a snapshot every {args.every:g} s, one run")
    print(f"{'workload':10}{'phase':16}{'commits':>9}{'snaps':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'p99 added':>11}")
    for kind, rows in results.items():
        base_p99 = rows["baseline"]["p99_ms"]
        for phase, r in rows.items():
            print(f"{kind:10}{phase:16}{r['commits']:>9.0f}{r['snapshots']:>7.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                  f"{r['max_ms']:>9.1f}{r['p99_ms'] - base_p99:>+11.2f}")


if __name__ == "__main__":
    main()
