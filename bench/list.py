"""`snapsync list --json` over 10,000 btrfs snapshots, beside `btrfs subvolume list` on the same filesystem.

Needs root (a scratch btrfs on a loop device). Both commands run as whole processes, so Python's start-up
counts against snapsync, as it would for a user. Warm = page cache as left by the previous run; cold =
after `echo 3 > /proc/sys/vm/drop_caches`. Goal: snapsync within 2x of the baseline.

    python3 bench/list.py [--snapshots 10000] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bytecode import compile_checkout  # noqa: E402
import btrfsutil  # noqa: E402

from snapsync.backends.scratch import scratch_btrfs  # noqa: E402


def timed(argv: list[str], cold: bool) -> float:
    if cold:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    compile_checkout(Path(__file__).resolve().parent.parent)

    with scratch_btrfs("2G", label="snapsync-bench") as mnt:
        dataset = mnt / "persist" / "data"
        dataset.parent.mkdir()
        btrfsutil.create_subvolume(dataset)
        (dataset / "file").write_text("x" * 4096)
        home = mnt / "persist" / ".snapsync" / "data"
        home.mkdir(parents=True)
        t0 = time.perf_counter()
        for i in range(args.snapshots):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_700_000_000 + i * 3600))
            btrfsutil.create_snapshot(dataset, home / f"snapsync_{stamp}", read_only=True)
        made = time.perf_counter() - t0
        policy = mnt.parent / "policy.toml"
        policy.write_text(f'version = 1\n[groups.data]\nbackend = "btrfs"\ndatasets = [{json.dumps(str(dataset))}]\n')

        check = subprocess.run(
            [sys.executable, "-m", "snapsync", "-p", str(policy), "list", "--json"], capture_output=True, text=True, check=True
        )
        listed = len(json.loads(check.stdout)["groups"][0]["datasets"][0]["snapshots"])
        assert listed == args.snapshots, f"snapsync listed {listed}, expected {args.snapshots}"

        ours = [sys.executable, "-m", "snapsync", "-p", str(policy), "list", "--json"]
        base = ["btrfs", "subvolume", "list", str(mnt)]
        print(f"{args.snapshots} read-only snapshots created in {made:.1f}s; median of {args.runs} runs each")
        print(f"{'':6} {'btrfs subvolume list':>22} {'snapsync list --json':>22} {'ratio':>7}  goal <= 2.0x")
        for cold in (False, True):
            b = statistics.median(timed(base, cold) for _ in range(args.runs))
            o = statistics.median(timed(ours, cold) for _ in range(args.runs))
            ratio = o / b
            verdict = "PASS" if ratio <= 2.0 else "MISS"
            label = "cold" if cold else "warm"
            print(f"{label:6} {b * 1000:>19.0f} ms {o * 1000:>19.0f} ms {ratio:>6.2f}x  {verdict}")
        from snapsync.backends.btrfs import BtrfsBackend

        backend = BtrfsBackend()
        inproc = []
        for _ in range(args.runs):
            t = time.perf_counter()
            json.dumps([s.to_json() for s in backend.list_snapshots(str(dataset))])
            inproc.append(time.perf_counter() - t)
        b = statistics.median(timed(base, False) for _ in range(args.runs))
        i = statistics.median(inproc)
        print(f"{'in-process listing + JSON (no start-up)':40} {i * 1000:>6.0f} ms  {i / b:.2f}x of the warm baseline")
        startup = statistics.median(timed(ours[:-2] + ["--version"], False) for _ in range(args.runs))
        bare = statistics.median(timed([sys.executable, "-c", "pass"], False) for _ in range(args.runs))
        print(f"{'snapsync start-up (--version)':40} {startup * 1000:>6.0f} ms")
        print(f"{'bare python start-up':40} {bare * 1000:>6.0f} ms")


if __name__ == "__main__":
    main()
