"""The stall each hook adds to a write workload: PostgreSQL commit latency with and without snapshots.

A real PostgreSQL 15 (data and WAL in one scratch btrfs subvolume) takes single-row autocommit
INSERTs from one client as fast as it can; every commit's latency is recorded. Phases, in one run,
each ``--seconds`` long:

    baseline          no snapshots
    snapshot only     a group snapshot every ``--every`` seconds, no hook
    checkpoint hook   the same with the postgres hook, mode = "checkpoint"
    backup hook       the same with mode = "backup" (pg_backup_start/stop around the snapshot)

Printed per phase: commits, p50, p99 and max commit latency, and the p99 added over the baseline.
Needs root (loop btrfs) and PostgreSQL 15.

    .venv/bin/python bench/hooks.py [--seconds 10] [--every 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import btrfsutil  # noqa: E402

from snapsync.clock import ManualClock  # noqa: E402
from snapsync.policy import parse_policy  # noqa: E402
from snapsync.runner import Runner  # noqa: E402
from snapsync.scratch import scratch_btrfs  # noqa: E402
from tests.hooks.pg import init_server, pg_unavailable  # noqa: E402
from tests.sshd import free_port  # noqa: E402


def policy(subvolume: Path, dsn: str, hook: str | None) -> str:
    text = (f'version = 1\n[defaults.retention]\nkeep_last = 1000\n[groups.db]\nbackend = "btrfs"\n'
            f'datasets = ["{subvolume}"]\ninterval = "1m"\n')
    if hook:
        text += f'[[groups.db.hooks]]\ntype = "postgres"\ndsn = "{dsn}"\nmode = "{hook}"\n'
    return text


def measure(dsn: str, seconds: float, snapshot: Callable[[], None] | None, every: float) -> dict[str, float]:
    import psycopg

    latencies: list[float] = []
    stop = threading.Event()

    def write() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                started = time.perf_counter()
                conn.execute("INSERT INTO bench VALUES (DEFAULT, %s)", ["x" * 200])
                latencies.append(time.perf_counter() - started)

    thread = threading.Thread(target=write)
    thread.start()
    snaps = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if snapshot is not None:
            snapshot()
            snaps += 1
        time.sleep(every)
    stop.set()
    thread.join()
    ms = sorted(x * 1000 for x in latencies)
    return {
        "commits": len(ms),
        "snapshots": snaps,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[int(len(ms) * 0.99)],
        "max_ms": ms[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reason = pg_unavailable()
    if reason:
        sys.exit(f"bench/hooks.py: {reason}")
    import psycopg

    base = Path(tempfile.mkdtemp(prefix="snapsync-bench-hooks-", dir="/var/tmp"))
    base.chmod(0o755)
    results: dict[str, dict[str, float]] = {}
    with scratch_btrfs("2G", parent=str(base), label="bench-hooks") as mnt:
        for d in (mnt.parent, mnt):
            d.chmod(0o755)
        subvolume = mnt / "postgresql"
        btrfsutil.create_subvolume(subvolume)
        server = init_server(subvolume, free_port())
        try:
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE bench (id bigserial PRIMARY KEY, payload text)")
            clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
            for phase, hook in (("baseline", None), ("snapshot only", None), ("checkpoint hook", "checkpoint"),
                                ("backup hook", "backup")):
                print(f"{phase} ...", file=sys.stderr, flush=True)
                runner = Runner(parse_policy(policy(subvolume, server.dsn, hook), "<bench>"), clock)
                group = runner.policy.groups["db"]

                def snapshot() -> None:
                    (report,) = runner.run([group], take=True, only_due=False, prune=False)
                    assert report.ok, report.to_json()
                    clock.advance(timedelta(minutes=1))

                results[phase] = measure(server.dsn, args.seconds, None if phase == "baseline" else snapshot, args.every)
        finally:
            server.stop()
    if args.json:
        print(json.dumps(results, indent=1))
        return
    base_p99 = results["baseline"]["p99_ms"]
    print(f"PostgreSQL 15 commit latency, {args.seconds:g} s per phase, a snapshot every {args.every:g} s (same run)")
    print(f"{'phase':18}{'commits':>9}{'snaps':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'p99 added':>11}")
    for phase, r in results.items():
        added = r["p99_ms"] - base_p99
        print(f"{phase:18}{r['commits']:>9.0f}{r['snapshots']:>7.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['max_ms']:>9.1f}{added:>+11.2f}")


if __name__ == "__main__":
    main()
