"""Replication throughput: snapsync against raw ``btrfs send | btrfs receive`` pipes and btrbk, same data.

One source btrfs holds the dataset (libs.md section 5 mix: large random files, 64 KiB random files,
log-like text; 1625 MiB by default). Two snapshots are taken once with ``snapsync snapshot``: S1, then
S2 after changing about 5% of the data. Every contestant sends exactly those bytes, full (S1) then
incremental (S1 -> S2), into a fresh scratch btrfs of its own:

    raw local      bash -c 'btrfs send S | btrfs receive DIR'
    snapsync local snapsync replicate, local target (the client starts `snapsync serve` itself)
    raw ssh        bash -c 'btrfs send S | ssh root@127.0.0.1 btrfs receive DIR' (a test sshd)
    snapsync ssh   snapsync replicate, ssh target, `snapsync serve` as the key's forced command
    btrbk          btrbk resume (transfer only: its snapshot is taken untimed by `btrbk snapshot`)

btrbk takes its own snapshots, of a writable copy of S1 that gets the same change; its stream is
measured separately. Every timing is the whole command's wall time plus a final ``btrfs filesystem
sync`` of the target; snapsync's includes Python start-up and its list/receive/prune sessions, as a
user would see. Contestants are interleaved (raw, snapsync, raw, snapsync, btrbk) per round; the
table shows each round and the median. Goals: snapsync >= 0.95x the throughput of the matching raw
pipe, and the snapsync client process's peak RSS (its own VmHWM, read at exit) < 150 MB.
Runs vary by +-15% on a 2-core VM; read the ratios, not the third digit. Needs root, sshd, btrfs.

    .venv/bin/python bench/replicate.py [--size 1625M] [--rounds 2] [--quick] [--cold] [--json]
    .venv/bin/python bench/replicate.py --zfs [--size 48M] [--rounds 2]   # inside a ZFS guest

``--zfs`` boots one vm-tests guest (real OpenZFS 2.3 under QEMU TCG) and runs bench/replicate_zfs.py
there: snapsync against raw ``zfs send | zfs receive`` on the same snapshots in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bytecode import compile_checkout  # noqa: E402
import btrfsutil  # noqa: E402

from snapsync.backends.scratch import _bytes, scratch_btrfs  # noqa: E402
from tests.sshd import Sshd, free_port, keygen, sshd_unavailable  # noqa: E402

GOAL_RATIO = 0.95
GOAL_RSS_MB = 150.0
GOAL_NOOP_LOCAL = 0.15
GOAL_NOOP_SSH = 1.5
MB = 1_000_000
MIB = 1 << 20
SMALL_FILE = 64 << 10
CHANGE_SEED = 5

# libs.md section 5 recipe, scaled: of 1625 MiB, 750 in 3 random files, 125 in 64 KiB random files,
# 750 in 10 log-like text files.
BIG_SHARE, SMALL_SHARE = 750 / 1625, 125 / 1625

HWM_WRAPPER = """\
import atexit, os, runpy
def _hwm():
    with open('/proc/self/status') as f:
        kb = next(line.split()[1] for line in f if line.startswith('VmHWM:'))
    with open(os.environ['SNAPSYNC_BENCH_HWM'], 'w') as f:
        f.write(kb)
atexit.register(_hwm)
runpy.run_module('snapsync', run_name='__main__', alter_sys=True)
"""
"""Runs the snapsync CLI and writes the process's own peak RSS (kB) at exit, children excluded."""


@contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP as KeyboardInterrupt, so every scratch filesystem is cleaned up."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- data


def _log_messages() -> list[str]:
    rng = random.Random(7)
    verbs = ["GET", "POST", "PUT", "DELETE"]
    paths = ["/api/v1/items", "/api/v1/users", "/login", "/static/app.js", "/healthz", "/api/v2/search"]
    levels = ["INFO"] * 6 + ["DEBUG"] * 3 + ["WARN", "ERROR"]
    out = []
    for _ in range(512):
        out.append(
            f"{rng.choice(levels)} app[{rng.randint(1000, 9999)}]: {rng.choice(verbs)} {rng.choice(paths)}"
            f"?id={rng.randint(1, 99999)} status={rng.choice([200, 200, 200, 201, 304, 404, 500])}"
            f" ms={rng.randint(1, 900)} ua=\"Mozilla/5.0 (X11; Linux x86_64)\""
        )
    return out


MESSAGES = _log_messages()


def log_text(rng: random.Random, nbytes: int, epoch: int) -> Iterator[bytes]:
    """Log-like lines (timestamps, a few hundred message shapes, request ids), ~1 MiB per chunk."""
    done, t = 0, float(epoch)
    while done < nbytes:
        lines, size = [], 0
        stamp_for, stamp = -1, ""
        while size < MIB:
            t += rng.random() * 0.02
            sec = int(t)
            if sec != stamp_for:
                stamp_for, stamp = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            line = f"{stamp}.{int(t * 1000) % 1000:03d}Z web{rng.getrandbits(3)} {MESSAGES[rng.getrandbits(9)]} req={rng.getrandbits(32):08x}\n"
            lines.append(line)
            size += len(line)
        chunk = "".join(lines).encode()[: nbytes - done]
        done += len(chunk)
        yield chunk


@dataclass(frozen=True)
class Recipe:
    big_files: int
    big_size: int
    small_files: int
    text_files: int
    text_size: int

    @classmethod
    def scaled(cls, total: int) -> Recipe:
        return cls(
            big_files=3,
            big_size=int(total * BIG_SHARE / 3) // 4096 * 4096,
            small_files=max(16, int(total * SMALL_SHARE) // SMALL_FILE),
            text_files=10,
            text_size=int(total * (1 - BIG_SHARE - SMALL_SHARE) / 10),
        )

    @property
    def total(self) -> int:
        return self.big_files * self.big_size + self.small_files * SMALL_FILE + self.text_files * self.text_size

    def describe(self) -> str:
        return (
            f"{self.total / MIB:,.0f} MiB: {self.big_files}x{self.big_size / MIB:.0f} MiB random, "
            f"{self.small_files}x64 KiB random, {self.text_files}x{self.text_size / MIB:.1f} MiB log-like text"
        )


def build(root: Path, recipe: Recipe) -> None:
    for d in ("big", "small", "logs"):
        (root / d).mkdir()
    for i in range(recipe.big_files):
        with open(root / "big" / f"blob{i}.bin", "wb") as f:
            left = recipe.big_size
            while left:
                n = min(8 * MIB, left)
                f.write(os.urandom(n))
                left -= n
    for i in range(recipe.small_files):
        (root / "small" / f"f{i:05d}.bin").write_bytes(os.urandom(SMALL_FILE))
    rng = random.Random(1)
    for i in range(recipe.text_files):
        with open(root / "logs" / f"app{i}.log", "wb") as f:
            for chunk in log_text(rng, recipe.text_size, 1_767_225_600 + i * 86_400):
                f.write(chunk)


def apply_change(root: Path, recipe: Recipe) -> int:
    """About 5% of the data, byte-identical wherever it is applied: an in-place overwrite inside one large
    file, a quarter of the small files rewritten, text appended to every log. Returns bytes written."""
    rng = random.Random(CHANGE_SEED)
    written = 0
    overwrite = int(recipe.total * 0.02) // 4096 * 4096
    with open(sorted((root / "big").iterdir())[0], "r+b") as f:
        f.seek(recipe.big_size // 4 // 4096 * 4096)
        left = overwrite
        while left:
            n = min(4 * MIB, left)
            f.write(rng.randbytes(n))
            left -= n
    written += overwrite
    smalls = sorted((root / "small").iterdir())
    for p in rng.sample(smalls, round(len(smalls) * 0.24)):
        p.write_bytes(rng.randbytes(SMALL_FILE))
        written += SMALL_FILE
    append = int(recipe.total * 0.011 / recipe.text_files)
    for i, p in enumerate(sorted((root / "logs").iterdir())):
        with open(p, "ab") as f:
            for chunk in log_text(rng, append, 1_767_312_000 + i * 86_400):
                f.write(chunk)
        written += append
    return written


# ----------------------------------------------------------------------------------------- processes


def run(argv: list[str], *, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run in its own process group, so an interrupt kills the whole pipeline (and only it)."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate()
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}:\n{out[-2000:]}\n{err[-2000:]}")
    return done


def sh(script: str) -> list[str]:
    return ["bash", "-c", "set -o pipefail; " + script]


def fs_sync(path: Path) -> None:
    run(["btrfs", "filesystem", "sync", str(path)])


def settle(cold: bool) -> None:
    """Untimed: flush what the previous run left dirty (and with --cold, empty the page cache)."""
    os.sync()
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def stream_bytes(snap: Path, parent: Path | None = None) -> tuple[int, float]:
    p = f"-p {shlex.quote(str(parent))} " if parent else ""
    t = time.perf_counter()
    out = run(sh(f"btrfs send -q {p}{shlex.quote(str(snap))} | wc -c")).stdout
    return int(out.strip()), time.perf_counter() - t


def delete_subvolumes(paths: list[Path], mount: Path) -> None:
    for p in paths:
        if p.exists():
            run(["btrfs", "subvolume", "delete", str(p)])
    run(["btrfs", "subvolume", "sync", str(mount)])


def received_ok(copy: Path, source: Path) -> bool:
    info = btrfsutil.subvolume_info(copy)
    return bool(info.flags & 1) and info.received_uuid == btrfsutil.subvolume_info(source).uuid


# ------------------------------------------------------------------------------------------- context


@dataclass
class Bench:
    work: Path
    src: Path
    data: Path
    s1: Path
    s2: Path
    recipe: Recipe
    sshd: Sshd
    raw_key: Path
    target_size: str
    cold: bool
    btrbk: str | None
    load_start: float = field(default_factory=lambda: os.getloadavg()[0])
    notes: list[str] = field(default_factory=list)

    @property
    def bt(self) -> Path:
        return self.src / "bt"

    @property
    def bt_snaps(self) -> Path:
        return self.src / "btrbk_snaps"

    def policy(self, name: str, target: str | None) -> Path:
        """One btrfs group over the dataset, replicating to target ``name`` (none: snapshots only)."""
        body = (
            "version = 1\n[defaults.retention]\nkeep_last = 100\n[groups.bench]\nbackend = \"btrfs\"\n"
            f"datasets = [{json.dumps(str(self.data))}]\n"
        )
        if target is not None:
            body += f"targets = [\"{name}\"]\n[targets.{name}]\n{target}\n"
        path = self.work / f"policy-{name}.toml"
        path.write_text(body)
        return path

    def ssh_argv(self) -> list[str]:
        argv = ["ssh"]
        for o in self.sshd.ssh_options():
            argv += ["-o", o]
        return argv + ["-o", "BatchMode=yes", "-T", "-x", "-e", "none", "-p", str(self.sshd.port),
                       "-i", str(self.raw_key), "-o", "IdentitiesOnly=yes", "root@127.0.0.1"]

    def authorize(self, root: Path) -> None:
        """The snapsync key may only run `snapsync serve --root ROOT`; the raw key is unrestricted."""
        raw = Path(f"{self.raw_key}.pub").read_text().strip()
        self.sshd.authorize(self.sshd.forced(root), raw)


@dataclass
class Timing:
    seconds: float
    stream: int
    rss_kb: int | None = None
    tree_kb: int | None = None
    reported: dict[str, Any] | None = None


def timed(b: Bench, target: Path, argv: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    settle(b.cold)
    t = time.perf_counter()
    out = run(argv, env=env).stdout
    fs_sync(target)
    return time.perf_counter() - t, out


# ---------------------------------------------------------------------------------------- contestants


def raw_pipe(b: Bench, mnt: Path, over_ssh: bool, sizes: dict[str, int]) -> dict[str, Timing]:
    root = mnt / "backups"
    recv = f"{shlex.join(b.ssh_argv())} btrfs receive {shlex.quote(str(root))}" if over_ssh else \
        f"btrfs receive {shlex.quote(str(root))}"
    if over_ssh:
        b.authorize(root)
    q1, q2 = shlex.quote(str(b.s1)), shlex.quote(str(b.s2))
    full, _ = timed(b, mnt, sh(f"btrfs send -q {q1} | {recv}"))
    incr, _ = timed(b, mnt, sh(f"btrfs send -q -p {q1} {q2} | {recv}"))
    assert received_ok(root / b.s2.name, b.s2), f"raw pipe: {root / b.s2.name} is not a complete copy of S2"
    # The floor of a run with nothing to send: reach the target (ssh: `ssh host true`) and list it once.
    reach = f"{shlex.join(b.ssh_argv())} true; " if over_ssh else ""
    noop, _ = timed(b, mnt, sh(f"{reach}btrfs subvolume list {shlex.quote(str(root))} >/dev/null"))
    return {"full": Timing(full, sizes["full"]), "incremental": Timing(incr, sizes["incremental"]), "noop": Timing(noop, 0)}


def snapsync_replicate(b: Bench, mnt: Path, over_ssh: bool, sizes: dict[str, int]) -> dict[str, Timing]:
    root = mnt / "backups"
    if over_ssh:
        b.authorize(root)
        policy = b.policy("ssh", b.sshd.target_table(root))
    else:
        policy = b.policy("local", f'type = "local"\npath = {json.dumps(str(root))}')
    hidden = b.s2.with_name(f"hidden-{b.s2.name}")
    out: dict[str, Timing] = {}
    for kind in ("full", "incremental", "noop"):  # noop: nothing left to send, the fixed cost of a run
        hwm, tree = b.work / "hwm", b.work / "tree"
        for f in (hwm, tree):
            f.unlink(missing_ok=True)
        argv = [sys.executable, "-c", HWM_WRAPPER, "-p", str(policy), "replicate", "--json"]
        if Path("/usr/bin/time").exists():
            argv = ["/usr/bin/time", "-f", "%M", "-o", str(tree), *argv]
        env = {**os.environ, "SNAPSYNC_BENCH_HWM": str(hwm), "PYTHONPATH": str(REPO)}
        if kind == "full":  # S2 out of sight, so this run sends S1 alone (a name not ours is foreign)
            os.rename(b.s2, hidden)
        try:
            seconds, stdout = timed(b, mnt, argv, env)
        finally:
            if hidden.exists():
                os.rename(hidden, b.s2)
        report = json.loads(stdout)["groups"][0]["targets"][0]
        sent = report["sent"]
        expected = [] if kind == "noop" else [kind]
        assert report["ok"] and [s["kind"] for s in sent] == expected, f"snapsync {kind}: unexpected report {report}"
        stream = sizes.get(kind, 0)
        if sent and sent[0]["bytes"] != stream:
            b.notes.append(f"snapsync {kind} reported {sent[0]['bytes']:,} bytes; `btrfs send | wc -c` gave {stream:,}")
        out[kind] = Timing(
            seconds, stream, rss_kb=int(hwm.read_text()),
            tree_kb=int(tree.read_text().split()[-1]) if tree.exists() else None, reported=sent[0] if sent else None,
        )
    copy = root / "bench" / str(b.data).lstrip("/") / b.s2.name
    assert received_ok(copy, b.s2), f"snapsync: {copy} is not a complete copy of S2"
    return out


def btrbk_reset(b: Bench) -> None:
    """A writable copy of S1 for btrbk to snapshot, with none of its own snapshots yet."""
    old = sorted(b.bt_snaps.iterdir()) if b.bt_snaps.exists() else []
    delete_subvolumes([*old, b.bt], b.src)
    b.bt_snaps.mkdir(exist_ok=True)
    btrfsutil.create_snapshot(b.s1, b.bt)


def btrbk_run(b: Bench, mnt: Path, sizes: dict[str, int]) -> dict[str, Timing]:
    assert b.btrbk is not None
    root = mnt / "backups"
    conf = b.work / "btrbk.conf"
    conf.write_text(
        "timestamp_format long-iso\nsnapshot_preserve_min all\ntarget_preserve_min all\n"
        f"snapshot_dir {b.bt_snaps.name}\nvolume {b.src}\n  subvolume {b.bt.name}\n    target {root}\n"
    )
    btrbk_reset(b)
    out: dict[str, Timing] = {}
    for kind, mark in (("full", "***"), ("incremental", ">>>")):
        if kind == "incremental":
            apply_change(b.bt, b.recipe)
            fs_sync(b.src)
            time.sleep(1.1)  # btrbk names have 1-second resolution
        run([b.btrbk, "-c", str(conf), "snapshot"])
        seconds, stdout = timed(b, mnt, [b.btrbk, "-c", str(conf), "resume"])
        received = [ln for ln in stdout.splitlines() if ln.startswith(("*** /", ">>> /"))]
        assert len(received) == 1 and received[0].startswith(mark), f"btrbk {kind}: unexpected summary {received}"
        out[kind] = Timing(seconds, 0)
    snaps = sorted(b.bt_snaps.iterdir())
    assert len(snaps) == 2 and received_ok(root / snaps[1].name, snaps[1]), "btrbk: second copy incomplete"
    if "btrbk full" not in sizes:
        sizes["btrbk full"] = stream_bytes(snaps[0])[0]
        sizes["btrbk incremental"] = stream_bytes(snaps[1], snaps[0])[0]
    out["full"].stream, out["incremental"].stream = sizes["btrbk full"], sizes["btrbk incremental"]
    return out


# ----------------------------------------------------------------------------------------------- main


CONTESTANTS: list[tuple[str, str | None, Callable[..., dict[str, Timing]], tuple[Any, ...]]] = [
    ("raw local pipe", None, raw_pipe, (False,)),
    ("snapsync local", "raw local pipe", snapsync_replicate, (False,)),
    ("raw ssh pipe", None, raw_pipe, (True,)),
    ("snapsync ssh", "raw ssh pipe", snapsync_replicate, (True,)),
    ("btrbk resume", None, btrbk_run, ()),
]


def setup(args: argparse.Namespace, stack: ExitStack) -> tuple[Bench, dict[str, int], dict[str, float]]:
    recipe = Recipe.scaled(_bytes(args.size))
    work = Path(tempfile.mkdtemp(prefix="snapsync-bench-repl-", dir=args.tmp))
    stack.callback(shutil.rmtree, work, ignore_errors=True)
    src_size = f"{max(1024, int(recipe.total * 2.6 / MIB) + 512)}M"
    src = stack.enter_context(scratch_btrfs(src_size, parent=str(work), label="bench-src"))
    data = src / "data"
    btrfsutil.create_subvolume(data)
    say(f"building {recipe.describe()} ...")
    t = time.perf_counter()
    build(data, recipe)
    fs_sync(src)
    say(f"  built in {time.perf_counter() - t:.0f}s")

    key = keygen(work / "snapsync_key")
    raw_key = keygen(work / "raw_key")
    (work / "sshd").mkdir()
    sshd = Sshd(work / "sshd", free_port(), key)
    sshd.start()
    stack.callback(sshd.stop)

    b = Bench(
        work=work, src=src, data=data, s1=src, s2=src, recipe=recipe, sshd=sshd, raw_key=raw_key,
        target_size=f"{max(1024, int(recipe.total * 1.4 / MIB) + 768)}M", cold=args.cold,
        btrbk=None if args.no_btrbk else shutil.which("btrbk"),
    )
    snap_policy = b.policy("snap", None)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run([sys.executable, "-m", "snapsync", "-p", str(snap_policy), "snapshot"], env=env)
    time.sleep(1.1)
    changed = apply_change(data, recipe)
    fs_sync(src)
    run([sys.executable, "-m", "snapsync", "-p", str(snap_policy), "snapshot"], env=env)
    home = src / ".snapsync" / "data"
    snaps = sorted(p for p in home.iterdir() if p.name.startswith("snapsync_"))
    assert len(snaps) == 2, snaps
    b.s1, b.s2 = snaps
    say(f"S1 {b.s1.name}, S2 {b.s2.name} ({changed / MIB:.0f} MiB changed, {changed / recipe.total:.1%})")
    full, t_full = stream_bytes(b.s1)
    incr, t_incr = stream_bytes(b.s2, b.s1)
    sizes = {"full": full, "incremental": incr}
    send_only = {"full": t_full, "incremental": t_incr}
    return b, sizes, send_only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1625M", help="dataset size, e.g. 1625M or 2G (default 1625M)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 96 MiB of data, one round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; 1 with --quick)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every timed run")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the untimed warm-up transfer (the first transfer after set-up runs slow here)")
    parser.add_argument("--no-btrbk", action="store_true", help="leave btrbk out")
    parser.add_argument("--tmp", default="/var/tmp", help="where the scratch filesystems' image files go")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--zfs", action="store_true", help="run the ZFS comparison inside a vm-tests guest instead")
    parser.add_argument("--catch-up", type=int, default=None, metavar="N",
                        help="instead: N small pending snapshots to one local target, against a raw chain into one receive")
    args = parser.parse_args()
    for checkout in {REPO, Path(os.environ.get("SNAPSYNC_BENCH_REPO", REPO))}:
        compile_checkout(checkout)
    if args.zfs:
        zfs_in_guest(args)
        return
    if args.catch_up:
        catch_up(args.catch_up, args.rounds or 3, args.tmp, args.json)
        return
    if args.quick:
        args.size = "96M"
    rounds = args.rounds or (1 if args.quick else 2)
    reason = sshd_unavailable()
    if reason:
        sys.exit(f"bench/replicate.py: {reason}")

    load_start = os.getloadavg()[0]
    with signals_raise(), ExitStack() as stack:
        b, sizes, send_only = setup(args, stack)
        b.load_start = load_start
        warmup = None
        if not args.no_warmup:
            say("warm-up: one untimed raw local transfer ...")
            with scratch_btrfs(b.target_size, parent=str(b.work), label="bench-dst") as mnt:
                (mnt / "backups").mkdir()
                warmup = raw_pipe(b, mnt, False, sizes)["full"].seconds
        contestants = [c for c in CONTESTANTS if c[2] is not btrbk_run or b.btrbk]
        results: dict[str, list[dict[str, Timing]]] = {name: [] for name, *_ in contestants}
        for r in range(rounds):
            for name, _, fn, extra in contestants:
                say(f"round {r + 1}/{rounds}: {name} ...")
                with scratch_btrfs(b.target_size, parent=str(b.work), label="bench-dst") as mnt:
                    (mnt / "backups").mkdir()
                    res = fn(b, mnt, *extra, sizes)
                results[name].append(res)
                say("  " + ", ".join(f"{k} {t.seconds:.2f}s" for k, t in res.items()))
        report = summarize(b, args, rounds, sizes, send_only, results, contestants)
        report["warmup_seconds"] = None if warmup is None else round(warmup, 3)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)


GOAL_CATCH_UP = 0.9
GOAL_CATCH_UP_ZFS = 0.8


def catch_up(n: int, rounds: int, tmp: str, as_json: bool) -> None:
    """A host back after N hours offline: N small snapshots (64 KiB changed each) pending for a
    target that holds the one before them. Raw: ``btrfs send -p`` of each from the one before, one
    after the other into one ``btrfs receive``. snapsync: ``replicate --no-prune``. Each round gets
    two fresh targets seeded (untimed) with the base; the same N snapshots go to every target."""
    from datetime import UTC, datetime, timedelta

    from snapsync.backends.btrfs import BtrfsBackend
    from snapsync.plan.naming import snapshot_name

    load = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": os.environ.get("SNAPSYNC_BENCH_REPO", str(REPO))}  # another checkout: before/after
    with signals_raise(), ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="snapsync-bench-catchup-", dir=tmp))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        os.chdir(work)  # `python -m` puts the working directory first on the path: no checkout here shadows PYTHONPATH
        env["SNAPSYNC_STATE_DIR"], env["SNAPSYNC_LOCK_DIR"] = str(work / "state"), str(work / "locks")
        src = stack.enter_context(scratch_btrfs("1G", parent=str(work), label="bench-src"))
        data = src / "data"
        btrfsutil.create_subvolume(data)
        for i in range(64):
            (data / f"seed{i}.bin").write_bytes(os.urandom(128 << 10))
        backend, when = BtrfsBackend(), datetime(2026, 1, 1, tzinfo=UTC)
        names = [snapshot_name("snapsync", when)]
        backend.snapshot_group([str(data)], names[0])
        home = backend.snapshot_path(str(data))
        targets = []
        for r in range(rounds):
            pair = {}
            for who in ("raw", "snapsync"):
                mnt = stack.enter_context(scratch_btrfs("512M", parent=str(work), label=f"bench-dst-{who}-{r}"))
                (mnt / "backups").mkdir()
                pair[who] = mnt
            policy = work / f"policy-{r}.toml"
            policy.write_text(
                'version = 1\n[defaults.retention]\nkeep_last = 1000\n[groups.bench]\nbackend = "btrfs"\n'
                f'datasets = [{json.dumps(str(data))}]\ntargets = ["usb"]\n[targets.usb]\ntype = "local"\n'
                f'path = "{pair["snapsync"] / "backups"}"\n'
            )
            run([sys.executable, "-m", "snapsync", "-p", str(policy), "replicate", "--no-prune"], env=env)
            run(sh(f"btrfs send -q {shlex.quote(str(home / names[0]))} | btrfs receive -q {shlex.quote(str(pair['raw'] / 'backups'))}"))
            targets.append((pair, policy))
        rng = random.Random(3)
        for i in range(n):
            (data / f"seed{rng.randrange(64)}.bin").write_bytes(os.urandom(64 << 10))
            when += timedelta(hours=1)
            names.append(snapshot_name("snapsync", when))
            backend.snapshot_group([str(data)], names[-1])
        chain = " ".join(shlex.quote(str(home / x)) for x in names)
        raw_script = 'p=$1; shift; for s do btrfs send -q -p "$p" "$s" || exit; p=$s; done'
        times: dict[str, list[float]] = {"raw": [], "snapsync": []}
        stream = int(run(sh(f"sh -c {shlex.quote(raw_script)} sh {chain} | wc -c")).stdout)
        for r, (pair, policy) in enumerate(targets):
            for who in (("raw", "snapsync") if r % 2 == 0 else ("snapsync", "raw")):
                settle(False)
                t = time.perf_counter()
                if who == "raw":
                    run(sh(f"sh -c {shlex.quote(raw_script)} sh {chain} | btrfs receive -q {shlex.quote(str(pair['raw'] / 'backups'))}"))
                else:
                    out = run([sys.executable, "-m", "snapsync", "-p", str(policy), "replicate", "--no-prune", "--json"], env=env).stdout
                    assert len(json.loads(out)["groups"][0]["targets"][0]["sent"]) == n, out[-2000:]
                fs_sync(pair[who])
                times[who].append(time.perf_counter() - t)
            say(f"round {r + 1}: raw {times['raw'][-1]:.2f}s, snapsync {times['snapsync'][-1]:.2f}s")
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["raw"] / med["snapsync"]
        result = {
            "catch_up": n, "rounds": rounds, "stream_bytes": stream, "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2), "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "median": {k: round(v, 3) for k, v in med.items()}, "ratio": round(ratio, 2), "goal": GOAL_CATCH_UP,
            "verdict": "PASS" if ratio >= GOAL_CATCH_UP else "MISS",
        }
    if as_json:
        print(json.dumps(result))
        return
    print(f"catch-up of {n} snapshots ({stream / MB:.1f} MB of streams), local target, {rounds} rounds, load {result['load_before']} -> {result['load_after']}")
    print(f"raw chain into one receive {med['raw']:.2f}s   snapsync replicate {med['snapsync']:.2f}s   "
          f"throughput ratio {ratio:.2f}x (goal >= {GOAL_CATCH_UP}x): {result['verdict']}")


def zfs_in_guest(args: argparse.Namespace) -> None:
    """Boot one guest, install snapsync there, run bench/replicate_zfs.py, print its figures."""
    sys.path.insert(0, str(REPO / "vm-tests"))
    from conftest import _install, build_wheels  # type: ignore[import-not-found]
    from image import ensure_image, unavailable  # type: ignore[import-not-found]
    from machine import Machine  # type: ignore[import-not-found]

    reason = unavailable()
    if reason:
        sys.exit(f"bench/replicate.py --zfs: {reason}")
    size_mib = _bytes(args.size) >> 20 if args.size != "1625M" else 48
    rounds = args.rounds or 2
    with tempfile.TemporaryDirectory(prefix="snapsync-bench-zfs-") as tmp:
        work = Path(tmp)
        say("building or reusing the guest image ...")
        machine = Machine("bench", ensure_image(), work, disks=1, disk_size=f"{max(1024, size_mib * 8)}M")
        try:
            say("booting the guest and installing snapsync ...")
            machine.boot()
            _install(machine, build_wheels(work / "wheels"))
            extra = f" --catch-up {args.catch_up}" if args.catch_up else ""
            say(f"running bench/replicate_zfs.py --size {size_mib} --rounds {rounds}{extra} in the guest ...")
            result = machine.run(f"cd /root/snapsync && /opt/snapsync/bin/python bench/replicate_zfs.py --size {size_mib} --rounds {rounds}{extra}",
                                 timeout=3600).check()
        finally:
            machine.stop()
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["guest"] = {"zfs": machine.zfs_version, "boot_seconds": round(machine.boot_seconds, 1)}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    if args.catch_up:
        med = report["median"]
        print(f"ZFS in a QEMU TCG guest (OpenZFS {machine.zfs_version}): catch-up of {args.catch_up} snapshots "
              f"({report['stream_bytes'] / MB:.1f} MB of streams), {rounds} round(s)")
        print(f"raw zfs send -I into one receive {med['raw']:.2f}s   snapsync replicate {med['snapsync']:.2f}s   "
              f"ratio {report['ratio']:.2f}x (goal >= {GOAL_CATCH_UP_ZFS}x): {'PASS' if report['ratio'] >= GOAL_CATCH_UP_ZFS else 'MISS'}")
        return
    med, ratio, stream = report["median"], report["ratio"], report["stream_bytes"]
    print(f"ZFS in a QEMU TCG guest (OpenZFS {machine.zfs_version}), {size_mib} MiB random data, {rounds} round(s), medians:")
    print(f"{'':14}{'stream':>10}{'raw s':>9}{'snapsync s':>12}{'its stream s':>14}{'ratio':>8}{'w/o fixed':>11}{'stream only':>13}")
    for kind in ("full", "incremental"):
        print(f"{kind:14}{stream[kind] / MB:>8.1f}MB{med['raw'][kind]:>9.2f}{med['snapsync'][kind]:>12.2f}"
              f"{med['snapsync'][f'stream_{kind}']:>14.2f}{ratio[kind]['whole_run']:>8.2f}"
              f"{ratio[kind]['without_fixed_cost']:>11.2f}{ratio[kind]['stream_only']:>13.2f}")
    print(f"snapsync fixed cost (a replicate with nothing to send): {med['snapsync']['noop']:.2f} s")
    print("Ratios are raw time / snapsync time (1.0 = as fast as the raw pipe); absolute speeds under TCG mean nothing.")


def revision() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def startup_seconds() -> float:
    times = []
    for _ in range(3):
        t = time.perf_counter()
        run([sys.executable, "-m", "snapsync", "--version"], env={**os.environ, "PYTHONPATH": str(REPO)})
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def summarize(b: Bench, args: argparse.Namespace, rounds: int, sizes: dict[str, int], send_only: dict[str, float],
              results: dict[str, list[dict[str, Timing]]], contestants: list[Any]) -> dict[str, Any]:
    rows = []
    medians: dict[tuple[str, str], float] = {}
    for kind in ("full", "incremental"):
        for name, baseline, *_ in contestants:
            runs = [res[kind] for res in results[name]]
            med = statistics.median(t.seconds for t in runs)
            medians[(name, kind)] = med
            row: dict[str, Any] = {
                "contestant": name, "kind": kind, "stream_bytes": runs[0].stream,
                "seconds": [round(t.seconds, 3) for t in runs], "median_seconds": round(med, 3),
                "mb_per_s": round(runs[0].stream / med / MB, 1),
            }
            if baseline is not None:
                base = medians[(baseline, kind)]
                row["baseline"] = baseline
                row["ratio"] = round(base / med, 3)
                row["ratio_per_round"] = [
                    round(rb[kind].seconds / rs[kind].seconds, 3) for rb, rs in zip(results[baseline], results[name])
                ]
                row["pass"] = base / med >= GOAL_RATIO
                row["client_rss_mb"] = round(max(t.rss_kb or 0 for res in results[name] for t in res.values()) / 1024, 1)
                row["tree_rss_mb"] = round(max(t.tree_kb or 0 for t in runs) / 1024, 1) if runs[0].tree_kb else None
                row["snapsync_reported"] = [t.reported for t in runs]
            rows.append(row)
    rss = max(r["client_rss_mb"] for r in rows if "client_rss_mb" in r)
    noop = {name: round(statistics.median(res["noop"].seconds for res in results[name]), 3)
            for name in results if results[name] and "noop" in results[name][0]}
    noop_goals = []
    for name, baseline, *_ in contestants:
        if baseline is None or name not in noop or baseline not in noop:
            continue
        if "ssh" in name:  # the goal: <= 1.5x one `ssh host true` plus one listing of the target
            ratio = noop[name] / noop[baseline]
            noop_goals.append({"contestant": name, "seconds": noop[name], "floor_seconds": noop[baseline],
                               "goal": f"<= {GOAL_NOOP_SSH}x ssh true + listing", "value": f"{ratio:.2f}x", "pass": ratio <= GOAL_NOOP_SSH})
        else:
            noop_goals.append({"contestant": name, "seconds": noop[name], "floor_seconds": noop[baseline],
                               "goal": f"<= {GOAL_NOOP_LOCAL} s", "value": f"{noop[name]:.2f} s", "pass": noop[name] <= GOAL_NOOP_LOCAL})
    return {
        "dataset": b.recipe.describe(), "dataset_bytes": b.recipe.total, "rounds": rounds,
        "cache": "cold (dropped before each run)" if b.cold else "warm", "cpus": os.cpu_count(),
        "stream_bytes": sizes, "send_only_mb_per_s": {k: round(sizes[k] / v / MB, 1) for k, v in send_only.items()},
        "rows": rows, "noop_seconds": noop, "noop_goals": noop_goals, "goal_ratio": GOAL_RATIO, "goal_rss_mb": GOAL_RSS_MB,
        "peak_client_rss_mb": rss, "rss_pass": rss < GOAL_RSS_MB, "notes": b.notes,
        "snapsync_revision": revision(), "loadavg_start": b.load_start, "loadavg_end": os.getloadavg()[0], "startup_seconds": round(startup_seconds(), 3),
    }


def print_table(rep: dict[str, Any]) -> None:
    rounds = rep["rounds"]
    print(f"dataset {rep['dataset']}; {rep['cache']} cache; {rep['cpus']} CPUs; {rounds} interleaved round(s); "
          f"1-min load {rep['loadavg_start']:.2f} at start, {rep['loadavg_end']:.2f} at end")
    warm = rep["warmup_seconds"]
    print(f"snapsync {rep['snapsync_revision']}; " + (
        f"warm-up (untimed raw local full, discarded): {warm:.2f}s" if warm is not None else "no warm-up"))
    so = rep["send_only_mb_per_s"]
    print(f"stream: full {rep['stream_bytes']['full']:,} B, incremental {rep['stream_bytes']['incremental']:,} B; "
          f"`btrfs send | wc -c` alone: {so['full']} / {so['incremental']} MB/s")
    cols = "".join(f"{f'round {i + 1}':>9}" for i in range(rounds))
    print(f"{'':15} {'':5} {'stream MB':>10}{cols} {'median':>8} {'MB/s':>7} {'vs raw':>8}  goal >= {rep['goal_ratio']}x")
    for row in rep["rows"]:
        secs = "".join(f"{s:>8.2f}s" for s in row["seconds"])
        kind = "full" if row["kind"] == "full" else "incr"
        line = (f"{row['contestant']:15} {kind:5} {row['stream_bytes'] / MB:>10.1f}{secs} {row['median_seconds']:>7.2f}s"
                f" {row['mb_per_s']:>7.1f}")
        if "ratio" in row:
            per = "/".join(f"{r:.2f}" for r in row["ratio_per_round"])
            line += f" {row['ratio']:>6.3f}x  {'PASS' if row['pass'] else 'MISS'} (rounds {per})"
        print(line)
    print("times: whole command + `btrfs filesystem sync` of the target; btrbk = `btrbk resume` (transfer only)")
    for row in rep["rows"]:
        if "ratio" in row:
            verdict = "PASS" if row["pass"] else "MISS"
            print(f"goal {row['contestant']} {row['kind']} >= {rep['goal_ratio']}x {row['baseline']}: "
                  f"{row['ratio']:.3f}x {verdict}")
    tree = [r["tree_rss_mb"] for r in rep["rows"] if r.get("tree_rss_mb")]
    extra = f"; largest process in its tree, /usr/bin/time %M: {max(tree):.1f} MB" if tree else ""
    print(f"goal snapsync client peak RSS < {rep['goal_rss_mb']:.0f} MB: {rep['peak_client_rss_mb']:.1f} MB "
          f"{'PASS' if rep['rss_pass'] else 'MISS'} (VmHWM of the python process{extra})")
    own = [r for r in rep["rows"] if r.get("snapsync_reported")]
    print("snapsync's own stream seconds (JSON sent[].seconds, median) vs wall: " + ", ".join(
        f"{r['contestant'].split()[1]} {r['kind'][:4]} "
        f"{statistics.median(s['seconds'] for s in r['snapsync_reported']):.2f}/{r['median_seconds']:.2f}s"
        for r in own
    ))
    print("fixed cost: replicate with nothing to send " + ", ".join(
        f"{name.split()[1]} {sec:.2f}s" for name, sec in rep["noop_seconds"].items() if name.startswith("snapsync")
    ) + f"; `snapsync --version` start-up {rep['startup_seconds']:.2f}s")
    for g in rep["noop_goals"]:
        print(f"goal {g['contestant']} with nothing to send {g['goal']}: {g['seconds']:.2f} s (floor {g['floor_seconds']:.2f} s), "
              f"{g['value']} {'PASS' if g['pass'] else 'MISS'}")
    for note in rep["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        say("interrupted; scratch filesystems removed")
        sys.exit(130)
