"""Offsite storage over a simulated year: snapsync's archive against a restic repository, same data, same rules, one run.

One scratch btrfs holds a dataset of incompressible files. Each simulated day, a share of them is
rewritten (``--change``, 1% by default; ``--hot`` of those rewrites fall on a hot 5% of the files,
as a database's pages do, the rest anywhere), snapsync takes the day's snapshot and uploads it, and
restic backs up the same read-only snapshot (bind-mounted at one path, so restic finds its parent)
with ``--time`` set to the day. Both prune with the offsite retention of ``policies/q.toml``
(keep_last 1, daily 7, weekly 4, monthly 12, yearly 3): snapsync at every run, restic ``forget``
daily and ``prune`` weekly and at the end. snapsync runs in this process on an injected clock.

Three archives are filled side by side, in one ``dir`` target each for snapsync:

    levelled    snapsync's default: chains = "levelled", full_every = "365d"
    levelled90  the same with a full every 90 days: shorter restores, more storage
    linear      what snapsync did before (each upload from the one before), full_every = "30d"
    restic      restic backup / forget / prune, same rules

At the end: archive bytes and objects, upload seconds per day (mean and max) and bytes uploaded in
the year, and the restore of the oldest and the newest snapshot each archive keeps (seconds, streams
replayed), and of the one whose chain is longest (the slowest to restore), each restored tree checked
against what the bench wrote that day. Goals: levelled <= 1.3x restic's bytes; its slowest restore
within 1.2x of linear's.

    .venv/bin/python bench/offsite_storage.py [--days 365] [--size 128M] [--change 0.01] [--hot 0.0] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bytecode import compile_checkout  # noqa: E402
from snapsync.backends.scratch import scratch_btrfs  # noqa: E402
from snapsync.policy.units import parse_size  # noqa: E402

START = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)
FILE = 256 << 10
KEEP = {"last": 1, "hourly": 0, "daily": 7, "weekly": 4, "monthly": 12, "yearly": 3}
VARIANTS = {
    "levelled": 'full_every = "365d"\nchains = "levelled"',
    "levelled90": 'full_every = "90d"\nchains = "levelled"',
    "linear": 'full_every = "30d"\nchains = "linear"',
}
RESTIC_ENV = {"RESTIC_PASSWORD": "bench", "TZ": "UTC", "RESTIC_CACHE_DIR": ""}


def policy_text(data: Path, stores: Path, key: Path) -> str:
    rules = "\n".join(f"{'keep_last' if k == 'last' else k} = {v}" for k, v in KEEP.items())
    targets = []
    for name, extra in VARIANTS.items():
        targets.append(f'[targets.{name}]\ntype = "dir"\npath = "{stores / name}"\nkey_file = "{key}"\n{extra}\n'
                       f'[targets.{name}.retention]\n{rules}\n')
    return (f'version = 1\nhost = "bench"\n[defaults]\ntimezone = "UTC"\ninterval = "1h"\n'
            f'[groups.data]\nbackend = "btrfs"\ndatasets = ["{data}"]\ntargets = {json.dumps(list(VARIANTS))}\n'
            f'[groups.data.retention]\nkeep_last = 2\n' + "\n".join(targets))


def tree_bytes(root: Path) -> tuple[int, int]:
    total = count = 0
    for path in root.rglob("*"):
        if path.is_file():
            total += path.stat().st_size
            count += 1
    return total, count


def digest(hashes: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in sorted(hashes.items())).encode()).hexdigest()


def tree_digest(root: Path) -> str:
    return digest({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.is_file()})


def restic(repo: Path, *args: str, capture: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["restic", "-r", str(repo), "--no-cache", "-q", *args], capture_output=capture, text=True,
                          env={**os.environ, **RESTIC_ENV})
    if proc.returncode != 0:
        raise SystemExit(f"restic {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--size", type=parse_size, default=parse_size("128M"))
    parser.add_argument("--change", type=float, default=0.01, help="share of the data rewritten each day")
    parser.add_argument("--hot", type=float, default=0.0, help="share of each day's rewrites that fall on a hot 5%% of the files")
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("restic") is None:
        raise SystemExit("restic is not installed (apt install restic)")
    compile_checkout(REPO)
    import logging

    logging.disable(logging.WARNING)
    from snapsync.clock import ManualClock
    from snapsync.offsite.sealing import create_key_file
    from snapsync.ops.runner import Runner
    from snapsync.policy.loader import parse_policy

    rng = random.Random(args.seed)
    files = max(1, args.size // FILE)
    hot = list(range(max(1, files // 20)))
    per_day = max(1, round(files * args.change))
    with tempfile.TemporaryDirectory(prefix="snapsync-offsite-storage-") as tmp, \
            scratch_btrfs(f"{max(1 << 30, args.size * 6)}", parent=tmp, label="bench-src") as mnt, \
            scratch_btrfs(f"{max(4 << 30, args.size * 16)}", parent=tmp, label="bench-restore") as landing:
        top = Path(tmp)
        data, stores, view, repo = mnt / "data", top / "stores", top / "view", top / "restic"
        subprocess.run(["btrfs", "subvolume", "create", str(data)], check=True, capture_output=True)
        for d in (stores, view, *(stores / v for v in VARIANTS)):
            d.mkdir()
        key = top / "offsite.key"
        create_key_file(key)
        os.environ["SNAPSYNC_STATE_DIR"] = str(top / "state")
        policy = parse_policy(policy_text(data, stores, key), "<bench>")
        restic(repo, "init")
        hashes: dict[str, str] = {}

        def write(index: int) -> None:
            blob = rng.randbytes(FILE)
            (data / f"f{index:06d}").write_bytes(blob)
            hashes[f"f{index:06d}"] = hashlib.sha256(blob).hexdigest()

        for i in range(files):
            write(i)
        day_digest: dict[str, str] = {}
        seconds: dict[str, list[float]] = {v: [] for v in [*VARIANTS, "restic"]}
        sent: dict[str, int] = dict.fromkeys([*VARIANTS, "restic"], 0)
        restic_ids: dict[str, str] = {}
        started = time.monotonic()
        clock = ManualClock(START)
        for day in range(args.days):
            if day:
                for _ in range(per_day):
                    write(rng.choice(hot) if rng.random() < args.hot else rng.randrange(files))
            if day:
                clock.advance(timedelta(days=1))
            runner = Runner(policy, clock)
            (report,) = runner.run(list(policy.groups.values()), take=True, only_due=False, prune=True, replicate=True)
            if not report.ok:
                raise SystemExit(f"day {day}: {json.dumps(report.to_json())}")
            name = str(report.snapshot)
            day_digest[name] = digest(hashes)
            for t in report.targets:
                seconds[t.target].append(sum(s.seconds for s in t.sent))
                sent[t.target] += sum(s.bytes for s in t.sent)
            snap = runner.backend(policy.groups["data"]).snapshot_files(str(data), name)
            assert snap is not None
            subprocess.run(["mount", "--bind", "-o", "ro", str(snap), str(view)], check=True)
            try:
                t0 = time.monotonic()
                out = restic(repo, "backup", "--json", "--host", "bench", "--tag", name, "--time",
                             (START + timedelta(days=day)).strftime("%Y-%m-%d %H:%M:%S"), str(view)).stdout
                seconds["restic"].append(time.monotonic() - t0)
            finally:
                subprocess.run(["umount", str(view)], check=True)
            summary = [json.loads(line) for line in out.splitlines() if '"summary"' in line][-1]
            sent["restic"] += int(summary.get("data_added", 0))
            restic_ids[name] = summary["snapshot_id"]
            keep = [f"--keep-{k}={v}" for k, v in KEEP.items() if v]
            restic(repo, "forget", *keep, *(["--prune"] if day % 7 == 6 or day == args.days - 1 else []))
            if not args.json and day % 30 == 29:
                print(f"  day {day + 1}: {time.monotonic() - started:.0f} s", file=sys.stderr)

        rows: dict[str, dict[str, Any]] = {}
        from snapsync.offsite.upload import open_archive
        from snapsync.plan.offsite import chain
        from snapsync.recovery.restore import restore_from

        for target in VARIANTS:
            size, objects = tree_bytes(stores / target)
            archive = open_archive(policy.targets[target], str(key))  # type: ignore[arg-type]
            survey = archive.survey("data")
            state = next(iter(survey.datasets.values()))
            stored = {n: m.stored() for n, m in state.stored.items()}
            kept = sorted(stored.values(), key=lambda s: s.created)
            restores = {}
            longest = max(kept, key=lambda k: (len(chain(k.name, stored) or []), k.created))
            for which, snap in (("oldest", kept[0]), ("newest", kept[-1]), ("longest", longest)):
                place = landing / f"{target}-{which}"
                place.mkdir()
                t0 = time.monotonic()
                restore_from(policy, target, "data", str(place), snap.name)
                elapsed = time.monotonic() - t0
                restored = next(p for p in place.rglob(snap.name) if p.is_dir())
                restores[which] = {"snapshot": snap.name, "seconds": round(elapsed, 2), "streams": len(chain(snap.name, stored) or []),
                                   "checked": tree_digest(restored) == day_digest[snap.name]}
                for copy in sorted((p for p in place.rglob("snapsync_*") if p.is_dir()), reverse=True):
                    subprocess.run(["btrfs", "subvolume", "delete", str(copy)], check=True, capture_output=True)
                subprocess.run(["btrfs", "subvolume", "sync", str(landing)], check=True, capture_output=True)  # the space, back
            rows[target] = {"bytes": size, "objects": objects, "snapshots": len(stored),
                            "fulls": sum(1 for s in stored.values() if s.parent is None), "restore": restores}
        size, objects = tree_bytes(repo)
        listed = json.loads(restic(repo, "snapshots", "--json").stdout)
        listed.sort(key=lambda s: s["time"])
        restores = {}
        for which, snap in (("oldest", listed[0]), ("newest", listed[-1]), ("longest", listed[-1])):
            place = landing / f"restic-{which}"
            t0 = time.monotonic()
            restic(repo, "restore", snap["id"], "--target", str(place))
            elapsed = time.monotonic() - t0
            restored = next(p for p in place.rglob("*") if p.is_dir() and (p / "f000000").exists())
            tag = snap.get("tags", ["?"])[0]
            restores[which] = {"snapshot": tag, "seconds": round(elapsed, 2), "streams": 1, "checked": tree_digest(restored) == day_digest.get(tag)}
        rows["restic"] = {"bytes": size, "objects": objects, "snapshots": len(listed), "fulls": None, "restore": restores}
        for target, row in rows.items():
            row["upload_mean_s"] = round(statistics.mean(seconds[target]), 3)
            row["upload_max_s"] = round(max(seconds[target]), 3)
            row["uploaded_bytes"] = sent[target]
        ratio = rows["levelled"]["bytes"] / rows["restic"]["bytes"]
        slowest = rows["levelled"]["restore"]["longest"]["seconds"] / max(rows["linear"]["restore"]["longest"]["seconds"], 0.01)
        result = {"days": args.days, "data_bytes": files * FILE, "change": args.change, "hot": args.hot, "rows": rows,
                  "ratio_to_restic": round(ratio, 2), "storage_goal": "PASS" if ratio <= 1.3 else "MISS",
                  "restore_vs_linear": round(slowest, 2), "restore_goal": "PASS" if slowest <= 1.2 else "MISS",
                  "all_checked": all(r["restore"][w]["checked"] for r in rows.values() for w in ("oldest", "newest", "longest")),
                  "seconds": round(time.monotonic() - started)}
    if args.json:
        print(json.dumps(result))
        return 0
    mib = 1 << 20
    print(f"offsite storage, {args.days} days, {files * FILE / mib:.0f} MiB of data, {args.change:.1%} rewritten a day "
          f"({args.hot:.0%} of it on a hot 5%), q.toml's offsite retention; {result['seconds']} s")
    print(f"{'':11} {'archive':>10} {'objects':>8} {'kept':>5} {'fulls':>5} {'uploaded':>10} {'upload/day':>16} "
          f"{'restore oldest':>22} {'restore newest':>22} {'longest chain kept':>22}")
    for target, row in rows.items():
        r = row["restore"]
        print(f"{target:11} {row['bytes'] / mib:8.0f} M {row['objects']:8d} {row['snapshots']:5d} {row['fulls'] if row['fulls'] is not None else '-':>5} "
              f"{row['uploaded_bytes'] / mib:8.0f} M {row['upload_mean_s']:6.2f} s (max {row['upload_max_s']:5.2f})"
              + "".join(f" {r[w]['seconds']:7.2f} s, {r[w]['streams']:2d} streams{'' if r[w]['checked'] else ' WRONG'}" for w in ("oldest", "newest", "longest")))
    print(f"levelled / restic archive: {result['ratio_to_restic']}x (goal <= 1.3x) {result['storage_goal']}")
    print(f"levelled / linear restore of each one's longest kept chain: {result['restore_vs_linear']}x (goal <= 1.2x) {result['restore_goal']}")
    print("every restored tree matches what was written that day" if result["all_checked"] else "A RESTORED TREE DIFFERS")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
