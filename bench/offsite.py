"""Offsite throughput and memory: snapsync against the same bytes moved raw with boto3, same server, same run.

One scratch btrfs holds a dataset of random data (incompressible: the worst case for snapsync, which
compresses, encrypts and hashes every byte, and gains nothing from compression). One snapshot is
taken with ``snapsync snapshot``. Then, against one S3 endpoint (moto's server on loopback, in this
process, started once):

    upload    snapsync replicate (s3 target: 64 MiB chunks, zstd, AES-256-GCM, manifests)
              vs  btrfs send | boto3 upload_fileobj (multipart, boto3's defaults), in this process
    restore   snapsync restore (download, authenticate, decompress, btrfs receive)
              vs  boto3 get_object, its body streamed into btrfs receive

Timings are wall clock of the whole command (snapsync's include Python start-up, listing and
manifests) plus a final ``btrfs filesystem sync``. Peak RSS is the snapsync process's own high-water
mark (``wait4``'s ``ru_maxrss``), not the server's: moto keeps every object in this process's memory.
Goals: throughput >= 0.8x of raw boto3 both ways; peak RSS < 200 MB for a 2 GiB stream. moto is the
bottleneck on this machine (about 60 MB/s), so read the ratios, not the absolute MB/s.

    .venv/bin/python bench/offsite.py [--size 2048M] [--rounds 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bytecode import compile_checkout  # noqa: E402
from bench.replicate import HWM_WRAPPER  # noqa: E402
from snapsync.backends.scratch import scratch_btrfs  # noqa: E402
from snapsync.policy.units import parse_size  # noqa: E402
from snapsync.offsite.sealing import create_key_file  # noqa: E402

ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


def run_rss(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the snapsync CLI; returns its own peak RSS in bytes (VmHWM at exit, children excluded) and stdout.

    (``wait4``'s ru_maxrss would not do: a forked child starts with this process's high-water mark,
    and this process holds moto's objects.)
    """
    with tempfile.NamedTemporaryFile("r") as hwm:
        proc = subprocess.run(
            [sys.executable, "-c", HWM_WRAPPER, *args], env={**env, "SNAPSYNC_BENCH_HWM": hwm.name, "PYTHONPATH": str(REPO)},
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"snapsync {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return int(hwm.read()) * 1024, proc.stdout


def sync(path: Path) -> None:
    subprocess.run(["btrfs", "filesystem", "sync", str(path)], check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("2048M"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    compile_checkout(REPO)

    import boto3
    from boto3.s3.transfer import TransferConfig
    from moto.server import ThreadedMotoServer

    os.environ.update(ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    fs_size = f"{(args.size * (2 + 2 * args.rounds) + (1 << 30)) >> 20}M"  # source + two restores per round
    results: dict[str, list[float]] = {k: [] for k in ("up_snapsync", "up_raw", "down_snapsync", "down_raw")}
    rss: dict[str, list[int]] = {"upload": [], "restore": []}
    stream_bytes = stored_bytes = 0
    try:
        with scratch_btrfs(fs_size, label="snapsync-bench-offsite") as root:
            data = root / "data"
            subprocess.run(["btrfs", "subvolume", "create", str(data)], check=True, capture_output=True)
            left, i = args.size, 0
            while left > 0:
                n = min(left, 256 << 20)
                with open(data / f"random-{i}.bin", "wb") as f:
                    f.write(os.urandom(n))
                left -= n
                i += 1
            sync(root)
            key = root / "offsite.key"
            create_key_file(key)
            env = {**os.environ, **ENV}
            snapsync = [sys.executable, "-m", "snapsync"]
            for r in range(args.rounds):
                bucket = f"bench-{r}"
                client.create_bucket(Bucket=bucket)
                policy = root / f"policy-{r}.toml"
                policy.write_text(
                    f'version = 1\nhost = "bench"\n[groups.g]\nbackend = "btrfs"\ndatasets = ["{data}"]\n'
                    f'targets = ["off"]\ninterval = "1m"\n[targets.off]\ntype = "s3"\nendpoint_url = "{endpoint}"\n'
                    f'bucket = "{bucket}"\nkey_file = "{key}"\n'
                )
                if r == 0:
                    subprocess.run([*snapsync, "--policy", str(policy), "snapshot"], env=env, check=True, capture_output=True)
                    snap = next((root / ".snapsync" / "data").iterdir())
                    stream_bytes = 0
                started = time.monotonic()
                peak, out = run_rss(["--policy", str(policy), "replicate", "--json"], env)
                seconds = time.monotonic() - started
                sent = json.loads(out)["groups"][0]["targets"][0]
                assert sent["ok"], sent
                results["up_snapsync"].append(seconds)
                rss["upload"].append(peak)
                stored_bytes = sum(
                    o["Size"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="g/")
                    for o in page.get("Contents", ())
                )

                started = time.monotonic()
                send = subprocess.Popen(["btrfs", "send", "-q", str(snap)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                assert send.stdout is not None
                client.upload_fileobj(send.stdout, bucket, "raw/stream", Config=TransferConfig())
                if send.wait() != 0:
                    raise SystemExit("btrfs send failed")
                results["up_raw"].append(time.monotonic() - started)
                stream_bytes = client.head_object(Bucket=bucket, Key="raw/stream")["ContentLength"]

                dest = root / f"restore-{r}"
                dest.mkdir()
                started = time.monotonic()
                peak, _ = run_rss(["--policy", str(policy), "restore", "g", "--from", "off", "--to", str(dest), "--json"], env)
                sync(root)
                seconds = time.monotonic() - started
                results["down_snapsync"].append(seconds)
                rss["restore"].append(peak)

                raw_dest = root / f"raw-{r}"
                raw_dest.mkdir()
                started = time.monotonic()
                receive = subprocess.Popen(["btrfs", "receive", "-e", str(raw_dest)], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
                assert receive.stdin is not None
                body = client.get_object(Bucket=bucket, Key="raw/stream")["Body"]
                while piece := body.read(1 << 20):
                    receive.stdin.write(piece)
                receive.stdin.close()
                if receive.wait() != 0:
                    raise SystemExit("btrfs receive failed")
                sync(root)
                results["down_raw"].append(time.monotonic() - started)
    finally:
        server.stop()

    med = {k: statistics.median(v) for k, v in results.items()}
    mb = stream_bytes / 1e6
    summary: dict[str, Any] = {
        "stream_bytes": stream_bytes,
        "stored_bytes": stored_bytes,
        "rounds": args.rounds,
        "seconds": results,
        "upload_mb_s": {"snapsync": mb / med["up_snapsync"], "raw_boto3": mb / med["up_raw"]},
        "restore_mb_s": {"snapsync": mb / med["down_snapsync"], "raw_boto3": mb / med["down_raw"]},
        "upload_ratio": med["up_raw"] / med["up_snapsync"],
        "restore_ratio": med["down_raw"] / med["down_snapsync"],
        "peak_rss_mb": {k: max(v) / 1e6 for k, v in rss.items()},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"stream {stream_bytes / 2**20:.0f} MiB of random data, stored as {stored_bytes / 2**20:.0f} MiB; "
          f"moto server on loopback; medians of {args.rounds} round(s)")
    print(f"{'':10} {'snapsync':>12} {'raw boto3':>12} {'ratio':>7}   goal")
    print(f"{'upload':10} {summary['upload_mb_s']['snapsync']:>8.1f} MB/s {summary['upload_mb_s']['raw_boto3']:>7.1f} MB/s "
          f"{summary['upload_ratio']:>7.2f}   >= 0.8")
    print(f"{'restore':10} {summary['restore_mb_s']['snapsync']:>8.1f} MB/s {summary['restore_mb_s']['raw_boto3']:>7.1f} MB/s "
          f"{summary['restore_ratio']:>7.2f}   >= 0.8")
    print(f"peak RSS of the snapsync process: upload {summary['peak_rss_mb']['upload']:.0f} MB, "
          f"restore {summary['peak_rss_mb']['restore']:.0f} MB   (goal < 200 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
