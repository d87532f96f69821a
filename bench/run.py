"""An hourly `snapsync run` on a host shaped like the example policies, beside a shell script doing the
same raw commands, same data, same run.

The host: 4 groups, 9 btrfs subvolumes (forge: forgejo, postgresql; home: home-assistant, mosquitto,
zigbee2mqtt; net: headscale, adguard; id: pocket-id, outline), each a few MiB, replicating to a local
target (a second scratch btrfs) and an ssh target (a third, behind a test sshd whose key runs
`snapsync serve` as its forced command), `keep_last = 3` everywhere. Each round changes every dataset
a little (one 64 KiB file rewritten, 4 KiB appended to a log), then times, in alternating order:

    snapsync  snapsync run --json (snapshot, replicate to both targets, prune every side)
    script    one bash script: per dataset `btrfs subvolume snapshot -r`, `btrfs send -p | btrfs
              receive` into the local target and `btrfs send -p | ssh ... btrfs receive` into the
              ssh one (one ssh per command, as such scripts do), then `btrfs subvolume delete` of
              what keep_last = 3 drops on the source and both targets

Each time is the command's wall time plus a `btrfs filesystem sync` of both targets. Goal: snapsync
<= 1.3x the script (median over the rounds). Runs vary by +-15% on a 2-core VM; read the ratio.
Needs root, sshd, btrfs.

    .venv/bin/python bench/run.py [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bytecode import compile_checkout  # noqa: E402
import btrfsutil  # noqa: E402

from snapsync.backends.scratch import scratch_btrfs  # noqa: E402
from tests.sshd import Sshd, free_port, keygen  # noqa: E402

GOAL = 1.3
KEEP = 3
GROUPS = {
    "forge": ["forgejo", "postgresql"],
    "home": ["home-assistant", "mosquitto", "zigbee2mqtt"],
    "net": ["headscale", "adguard"],
    "id": ["pocket-id", "outline"],
}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def fill(ds: Path) -> None:
    for i in range(24):
        (ds / f"blob{i:02d}.bin").write_bytes(os.urandom(64 << 10))
    (ds / "app.log").write_bytes(os.urandom(256 << 10).hex().encode())


def change(ds: Path, round_: int) -> None:
    (ds / f"blob{round_ % 24:02d}.bin").write_bytes(os.urandom(64 << 10))
    with open(ds / "app.log", "ab") as f:
        f.write(os.urandom(2 << 10).hex().encode())


class Host:
    def __init__(self, work: Path, stack: ExitStack) -> None:
        self.work = work
        self.src = stack.enter_context(scratch_btrfs("1G", parent=str(work), label="bench-run-src"))
        self.usb = stack.enter_context(scratch_btrfs("1G", parent=str(work), label="bench-run-usb"))
        self.nas = stack.enter_context(scratch_btrfs("1G", parent=str(work), label="bench-run-nas"))
        self.datasets = {g: [self.src / "persist" / d for d in ds] for g, ds in GROUPS.items()}
        (self.src / "persist").mkdir()
        for ds in self.all():
            btrfsutil.create_subvolume(ds)
            fill(ds)
        for side in (self.usb, self.nas):
            for name in ("snapsync", "script"):
                (side / name).mkdir()
        key, self.raw_key = keygen(work / "snapsync_key"), keygen(work / "raw_key")
        (work / "sshd").mkdir()
        self.sshd = Sshd(work / "sshd", free_port(), key)
        self.sshd.start()
        stack.callback(self.sshd.stop)
        self.sshd.authorize(self.sshd.forced(self.nas / "snapsync"), Path(f"{self.raw_key}.pub").read_text().strip())
        self.policy = work / "policy.toml"
        lines = ['version = 1', 'host = "bench"', "[defaults]", 'interval = "1s"', "[defaults.retention]", f"keep_last = {KEEP}"]
        for group, paths in self.datasets.items():
            lines += [f"[groups.{group}]", 'backend = "btrfs"', f"datasets = {json.dumps([str(p) for p in paths])}",
                      'targets = ["usb", "nas"]']
        lines += ["[targets.usb]", 'type = "local"', f'path = "{self.usb / "snapsync"}"', "[targets.nas]",
                  self.sshd.target_table(self.nas / "snapsync")]
        self.policy.write_text("\n".join(lines) + "\n")
        self.script_snaps = self.src / "script-snaps"
        self.script_snaps.mkdir()
        self.taken: dict[str, list[str]] = {ds.name: [] for ds in self.all()}

    def all(self) -> list[Path]:
        return [ds for paths in self.datasets.values() for ds in paths]

    def ssh(self) -> str:
        options = " ".join(f"-o {shlex.quote(o)}" for o in self.sshd.ssh_options())
        return (f"ssh {options} -o BatchMode=yes -o IdentitiesOnly=yes -T -x -p {self.sshd.port} "
                f"-i {shlex.quote(str(self.raw_key))} root@127.0.0.1")

    def script(self, name: str) -> str:
        """The raw commands of one hourly run, as one bash script."""
        ssh, q = self.ssh(), shlex.quote
        lines = ["set -euo pipefail"]
        for ds in self.all():
            home = self.script_snaps / ds.name
            usb, nas = self.usb / "script" / ds.name, self.nas / "script" / ds.name
            new = home / name
            prev = self.taken[ds.name][-1] if self.taken[ds.name] else None
            parent = f"-p {q(str(home / prev))} " if prev else ""
            lines += [
                f"mkdir -p {q(str(home))} {q(str(usb))}",
                f"btrfs subvolume snapshot -r {q(str(ds))} {q(str(new))} >/dev/null",
                f"btrfs send -q {parent}{q(str(new))} | btrfs receive -q {q(str(usb))}",
                f"{ssh} mkdir -p {q(str(nas))}",
                f"btrfs send -q {parent}{q(str(new))} | {ssh} btrfs receive -q {q(str(nas))}",
            ]
            self.taken[ds.name].append(name)
            for old in self.taken[ds.name][:-KEEP]:
                lines += [
                    f"btrfs subvolume delete {q(str(home / old))} >/dev/null",
                    f"btrfs subvolume delete {q(str(usb / old))} >/dev/null",
                    f"{ssh} btrfs subvolume delete {q(str(nas / old))} >/dev/null",
                ]
            self.taken[ds.name] = self.taken[ds.name][-KEEP:]
        return "\n".join(lines) + "\n"

    def sync(self) -> None:
        for side in (self.usb, self.nas):
            run(["btrfs", "filesystem", "sync", str(side)])


def timed(host: Host, argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    os.sync()
    start = time.perf_counter()
    out = run(argv, env)
    host.sync()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tmp", default="/var/tmp")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    compile_checkout(Path(os.environ.get("SNAPSYNC_BENCH_REPO", REPO)))
    load = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": os.environ.get("SNAPSYNC_BENCH_REPO", str(REPO)), "SNAPSYNC_STATE_DIR": "", "SNAPSYNC_LOCK_DIR": ""}
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="snapsync-bench-run-", dir=args.tmp))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        os.chdir(work)  # `python -m` puts the working directory first on the path: no checkout here shadows PYTHONPATH
        env["SNAPSYNC_STATE_DIR"], env["SNAPSYNC_LOCK_DIR"] = str(work / "state"), str(work / "locks")
        host = Host(work, stack)
        snapsync = [sys.executable, "-m", "snapsync", "-p", str(host.policy), "run", "--json"]
        say("priming: a full first run of each, untimed")
        run(snapsync, env)
        run(["bash", "-c", host.script(time.strftime("raw_%Y%m%dT%H%M%S"))])
        times: dict[str, list[float]] = {"snapsync": [], "script": []}
        for n in range(args.rounds):
            time.sleep(1.05)  # snapshot names carry the second
            for ds in host.all():
                change(ds, n)
            order = ["snapsync", "script"] if n % 2 == 0 else ["script", "snapsync"]
            for who in order:
                if who == "snapsync":
                    seconds, out = timed(host, snapsync, env)
                    report = json.loads(out)
                    assert all(t["ok"] for g in report["groups"] for t in g["targets"]), out[-2000:]
                else:
                    seconds, _ = timed(host, ["bash", "-c", host.script(f"raw_{n:04d}_{time.time_ns()}")])
                times[who].append(seconds)
            say(f"round {n + 1}: snapsync {times['snapsync'][-1]:.2f}s, script {times['script'][-1]:.2f}s")
        for ds in host.all():  # the script really kept what keep_last keeps
            assert len(list((host.usb / "script" / ds.name).iterdir())) == min(KEEP, args.rounds + 1)
        med = {who: statistics.median(ts) for who, ts in times.items()}
        ratio = med["snapsync"] / med["script"]
        result = {
            "rounds": args.rounds, "groups": len(GROUPS), "datasets": len(host.all()), "keep_last": KEEP,
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
            "seconds": {who: [round(t, 3) for t in ts] for who, ts in times.items()},
            "median": {who: round(t, 3) for who, t in med.items()}, "ratio": round(ratio, 2), "goal": GOAL,
            "verdict": "PASS" if ratio <= GOAL else "MISS",
        }
    if args.json:
        print(json.dumps(result))
        return
    print(f"hourly run, {result['groups']} groups / {result['datasets']} datasets, local + ssh target, keep_last = {KEEP}")
    print(f"load average before {result['load_before']}, after {result['load_after']}")
    print(f"{'contestant':<10} {'median':>8}  rounds")
    for who in ("script", "snapsync"):
        print(f"{who:<10} {med[who]:>7.2f}s  {' '.join(f'{t:.2f}' for t in times[who])}")
    print(f"snapsync / script = {ratio:.2f}x (goal <= {GOAL}x): {result['verdict']}")


if __name__ == "__main__":
    main()
