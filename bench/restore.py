"""Time to restore a group: from a peer (a receiving root, as a backup host has it) and from offsite,
each beside the raw receive of the same stream, in the same run.

One scratch btrfs holds a group of one dataset (half random data, half log-like text; 512 MiB by
default). It is snapshotted once and replicated to a local target (the "peer": copies laid out as
on a backup host, served back by ``snapsync serve --role send``) and uploaded to a ``dir`` offsite
target (chunked, zstd, AES-256-GCM). Then, each into a fresh directory, timed with a final
``btrfs filesystem sync``:

    peer      snapsync restore --from nas      vs  btrfs send COPY | btrfs receive    (the same copy)
    offsite   snapsync restore --from offsite  vs  btrfs receive -f STREAM            (the same stream,
                                                   written to a file beforehand, untimed)

snapsync's times include Python start-up, listing, authentication of every manifest and segment,
decompression and the identity check after receive.

    .venv/bin/python bench/restore.py [--size 512M] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bytecode import compile_checkout  # noqa: E402
from snapsync.backends.scratch import scratch_btrfs  # noqa: E402
from snapsync.policy.units import parse_size  # noqa: E402
from snapsync.offsite.sealing import create_key_file  # noqa: E402


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def timed(argv: list[str], sync: Path, **kwargs: object) -> float:
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, **kwargs)  # type: ignore[call-overload]
    sh("btrfs", "filesystem", "sync", str(sync))
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("512M"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    compile_checkout(REPO)
    fs = f"{(args.size * (6 + 5 * args.rounds)) // (1 << 20) + 2048}M"  # sparse: source, copies, stream, 4 restores a round
    snapsync = [sys.executable, "-m", "snapsync"]
    results: dict[str, list[float]] = {"peer": [], "peer_raw": [], "offsite": [], "offsite_raw": []}
    with scratch_btrfs(fs, label="snapsync-bench-restore") as root:
        data = root / "persist" / "app"
        data.parent.mkdir()
        sh("btrfs", "subvolume", "create", str(data))
        rng = random.Random(7)
        half = args.size // 2
        for i in range(0, half, 64 << 20):
            (data / f"random-{i >> 20}.bin").write_bytes(os.urandom(min(64 << 20, half - i)))
        line = b"2026-11-26T10:00:00Z INFO request handled path=/api/v1/repos status=200 took=%dms\n"
        with open(data / "app.log", "wb") as f:
            written = 0
            while written < half:
                chunk = b"".join(line % rng.randint(1, 999) for _ in range(20000))
                f.write(chunk)
                written += len(chunk)
        (root / "nas").mkdir()
        (root / "offsite").mkdir()
        create_key_file(root / "offsite.key")
        policy = root / "policy.toml"
        policy.write_text(
            f'version = 1\nhost = "bench"\n[groups.g]\nbackend = "btrfs"\ndatasets = ["{data}"]\n'
            f'targets = ["nas", "offsite"]\ninterval = "1m"\n'
            f'[targets.nas]\ntype = "local"\npath = "{root / "nas"}"\n'
            f'[targets.offsite]\ntype = "dir"\npath = "{root / "offsite"}"\nkey_file = "{root / "offsite.key"}"\n'
        )
        p = ["--policy", str(policy)]
        sh(*snapsync, *p, "snapshot")
        sh(*snapsync, *p, "replicate")
        snap = next((root / "persist" / ".snapsync" / "app").glob("snapsync_*"))
        copy = next((root / "nas" / "g").rglob(snap.name))
        stream = root / "stream.bin"
        with open(stream, "wb") as f:
            subprocess.run(["btrfs", "send", "-q", str(snap)], stdout=f, check=True)
        stream_bytes = stream.stat().st_size
        stored = sum(f.stat().st_size for f in (root / "offsite").rglob("*") if f.is_file())
        for r in range(args.rounds):
            for kind in ("peer", "peer_raw", "offsite", "offsite_raw"):
                dest = root / f"{kind}-{r}"
                dest.mkdir()
                if kind == "peer":
                    seconds = timed([*snapsync, *p, "restore", "g", "--from", "nas", "--to", str(dest)], root)
                elif kind == "offsite":
                    seconds = timed([*snapsync, *p, "restore", "g", "--from", "offsite", "--to", str(dest)], root)
                elif kind == "peer_raw":
                    seconds = timed(["bash", "-c", f'btrfs send -q "{copy}" | btrfs receive -e "{dest}"'], root)
                else:
                    seconds = timed(["btrfs", "receive", "-e", "-f", str(stream), str(dest)], root)
                results[kind].append(seconds)
    med = {k: statistics.median(v) for k, v in results.items()}
    mb = stream_bytes / 1e6
    summary = {
        "stream_bytes": stream_bytes, "offsite_stored_bytes": stored, "rounds": args.rounds, "seconds": results,
        "peer_ratio": med["peer_raw"] / med["peer"], "offsite_ratio": med["offsite_raw"] / med["offsite"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"group of one dataset, stream {stream_bytes / 2**20:.0f} MiB (offsite: {stored / 2**20:.0f} MiB stored); "
          f"medians of {args.rounds} round(s)")
    print(f"{'restore from':14} {'snapsync':>16} {'raw receive':>16} {'ratio':>6}")
    for kind in ("peer", "offsite"):
        print(f"{kind:14} {med[kind]:>6.2f}s {mb / med[kind]:>5.0f} MB/s {med[kind + '_raw']:>6.2f}s "
              f"{mb / med[kind + '_raw']:>5.0f} MB/s {summary[kind + '_ratio']:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
