"""ZFS replication inside the vm-tests guest: snapsync against a raw ``zfs send | zfs receive`` pipe.

Runs *inside* a guest (``bench/replicate.py --zfs`` boots one and runs this there); needs a pool
(``--pool``, default tank). Under TCG every number is slow; only the ratios mean anything.

One source dataset gets ``--size`` of random files (incompressible), snapshot S1, then about 10% of
it rewritten and S2. Per round, in alternating order, each contestant gets a fresh destination:

    raw       sh -c 'zfs send -c S1 | zfs receive -s -u DST'   (incremental: send -c -i S1 S2)
    snapsync  snapsync replicate --json, local target DST (full: S2 is renamed aside meanwhile)

Same flags both sides (compressed send, resumable unmounted receive). The fixed cost of a snapsync
run (Python start-up, listings, holds and bookmarks, each ``zfs`` command costing seconds here) is
measured separately as a ``replicate`` with nothing to send, so the table shows the whole-run
ratio, the ratio with that fixed cost taken out, and the ratio of the raw pipe to snapsync's own
stream seconds (from ``zfs send`` start to the receiving session's answer).

``--catch-up N``: instead, N small snapshots pending (a host that was away), per round, against
``zfs send -c -I`` of the same N into one ``zfs receive``. Both destinations get the base untimed first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

S1, S2, HIDDEN = "snapsync_2026-01-01T00:00:00Z", "snapsync_2026-01-01T01:00:00Z", "aside"


def sh(script: str) -> str:
    return subprocess.run(["sh", "-c", script], check=True, capture_output=True, text=True).stdout


def timed(script: str) -> float:
    sh("sync")
    started = time.monotonic()
    sh(script)
    return time.monotonic() - started


def fill(directory: Path, size: int, files: int = 8) -> None:
    for i in range(files):
        (directory / f"f{i}.bin").write_bytes(os.urandom(size // files))


def change(directory: Path, size: int) -> None:
    """Overwrite about 10% in place, spread over the files."""
    files = sorted(directory.glob("f*.bin"))
    for f in files:
        with open(f, "r+b") as handle:
            handle.seek(len(f.read_bytes()) // 3)
            handle.write(os.urandom(size // 10 // len(files)))


def policy(path: Path, source: str, target_root: str) -> None:
    path.write_text("\n".join([
        "version = 1", 'host = "bench"', "[defaults]", 'interval = "1d"', "[defaults.retention]", "keep_last = 10000",
        "[groups.bench]", 'backend = "zfs"', f'datasets = ["{source}"]', 'targets = ["dst"]',
        "[targets.dst]", 'type = "local"', f'path = "{target_root}"',
    ]) + "\n")


def snapsync_run(policy_file: Path) -> tuple[float, float, int]:
    """Wall seconds of one ``replicate``, the seconds its stream took (snapsync's own figure), bytes."""
    sh("sync")
    started = time.monotonic()
    out = subprocess.run(["snapsync", "-p", str(policy_file), "replicate", "--json"], check=True, capture_output=True, text=True).stdout
    seconds = time.monotonic() - started
    sent = json.loads(out)["groups"][0]["targets"][0]["sent"]
    return seconds, sum(float(s["seconds"]) for s in sent), sum(int(s["bytes"]) for s in sent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pool", default="tank")
    parser.add_argument("--size", type=int, default=48, help="MiB of random data (default 48)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--catch-up", type=int, default=None, metavar="N")
    args = parser.parse_args()
    if args.catch_up:
        catch_up(args.pool, args.catch_up, args.rounds)
        return
    size = args.size << 20
    base = f"{args.pool}/bench"
    src = f"{base}/src"
    subprocess.run(["zfs", "destroy", "-r", base], capture_output=True)
    sh(f"zfs create -p {src}")
    mount = Path(sh(f"zfs get -H -o value mountpoint {src}").strip())
    fill(mount, size)
    sh(f"zfs snapshot {src}@{S1}")
    change(mount, size)
    sh(f"zfs snapshot {src}@{S2}")
    stream = {
        "full": int(sh(f"zfs send -c {src}@{S1} | wc -c")),
        "incremental": int(sh(f"zfs send -c -i {src}@{S1} {src}@{S2} | wc -c")),
    }
    pol = Path("/root/bench-zfs.toml")
    results: dict[str, dict[str, list[float]]] = {"raw": {"full": [], "incremental": []},
                                                 "snapsync": {"full": [], "incremental": [], "noop": [],
                                                              "stream_full": [], "stream_incremental": []}}
    for r in range(args.rounds):
        order = ["raw", "snapsync"] if r % 2 == 0 else ["snapsync", "raw"]
        for who in order:
            dst = f"{base}/{who}-{r}"
            sh(f"zfs create -o canmount=off {dst}")
            if who == "raw":
                results["raw"]["full"].append(timed(f"zfs send -c {src}@{S1} | zfs receive -s -u -o canmount=noauto {dst}/copy"))
                results["raw"]["incremental"].append(
                    timed(f"zfs send -c -i {src}@{S1} {src}@{S2} | zfs receive -s -u -o canmount=noauto {dst}/copy"))
            else:
                policy(pol, src, dst)
                sh(f"zfs rename {src}@{S2} {src}@{HIDDEN}")
                for kind in ("full", "incremental"):
                    if kind == "incremental":
                        sh(f"zfs rename {src}@{HIDDEN} {src}@{S2}")
                    seconds, streaming, sent = snapsync_run(pol)
                    assert sent > 0
                    results["snapsync"][kind].append(seconds)
                    results["snapsync"][f"stream_{kind}"].append(streaming)
                seconds, _, sent = snapsync_run(pol)
                assert sent == 0
                results["snapsync"]["noop"].append(seconds)
            sh(f"zfs destroy -r {dst}")
            sh(f"zfs release -r snapsync:target:dst {src}@{S1} {src}@{S2} 2>/dev/null || true")
    sh(f"zfs destroy -r {base}")
    medians = {who: {k: statistics.median(v) for k, v in kinds.items()} for who, kinds in results.items()}
    noop = medians["snapsync"]["noop"]
    report = {"stream_bytes": stream, "rounds": results, "median": medians, "ratio": {}}
    for kind in ("full", "incremental"):
        raw, ours = medians["raw"][kind], medians["snapsync"][kind]
        report["ratio"][kind] = {
            "whole_run": round(raw / ours, 3),
            "without_fixed_cost": round(raw / max(ours - noop, 1e-6), 3),
            "stream_only": round(raw / max(medians["snapsync"][f"stream_{kind}"], 1e-6), 3),
        }
    print(json.dumps(report))


def catch_up(pool: str, n: int, rounds: int) -> None:
    """N pending snapshots per round: raw ``send -I`` into one receive, against one snapsync replicate."""
    base = f"{pool}/bench"
    src, raw_dst, ours_dst = f"{base}/src", f"{base}/raw", f"{base}/snapsync"
    subprocess.run(["zfs", "destroy", "-r", base], capture_output=True)
    sh(f"zfs create -p {src}")
    sh(f"zfs create -o canmount=off {raw_dst}")
    sh(f"zfs create -o canmount=off {ours_dst}")
    mount = Path(sh(f"zfs get -H -o value mountpoint {src}").strip())
    fill(mount, 4 << 20)
    taken = 0

    def snapshot() -> str:
        nonlocal taken
        name = time.strftime("snapsync_%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_767_225_600 + 3600 * taken))
        (mount / f"change-{taken}.txt").write_text(f"{taken}\n" * 1000)
        sh(f"zfs snapshot {src}@{name}")
        taken += 1
        return name

    first = snapshot()
    sh(f"zfs send -c {src}@{first} | zfs receive -s -u -o canmount=noauto {raw_dst}/copy")
    pol = Path("/root/bench-zfs-catch-up.toml")
    policy(pol, src, ours_dst)
    snapsync_run(pol)
    last, times, streams = first, {"raw": [], "snapsync": []}, []
    for r in range(rounds):
        names = [snapshot() for _ in range(n)]
        streams.append(int(sh(f"zfs send -c -I {src}@{last} {src}@{names[-1]} | wc -c")))
        for who in (["raw", "snapsync"] if r % 2 == 0 else ["snapsync", "raw"]):
            if who == "raw":
                times["raw"].append(timed(f"zfs send -c -I {src}@{last} {src}@{names[-1]} | zfs receive -s -u {raw_dst}/copy"))
            else:
                seconds, _, sent = snapsync_run(pol)
                assert sent > 0
                times["snapsync"].append(seconds)
        last = names[-1]
    med = {k: statistics.median(v) for k, v in times.items()}
    sh(f"for s in $(zfs list -H -o name -t snapshot {src}); do zfs release snapsync:target:dst $s 2>/dev/null; done; "
       f"zfs destroy -r {base}")
    print(json.dumps({"catch_up": n, "rounds": times, "median": med, "stream_bytes": statistics.median(streams),
                      "ratio": round(med["raw"] / med["snapsync"], 3)}))


if __name__ == "__main__":
    main()
