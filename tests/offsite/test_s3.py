"""Offsite to a real S3 endpoint (moto's server on loopback) from real btrfs, and back.

Snapshots are taken by the real runner on loop-mounted btrfs; uploads go over HTTP to the moto
server; restores replay the chains into a second, fresh btrfs, and files are compared byte for byte
with the source snapshots.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from snapsync.clock import ManualClock
from snapsync.errors import IntegrityError
from snapsync.offsite.upload import open_archive
from snapsync.policy.loader import Policy, parse_policy
from snapsync.policy.schema import S3Target
from snapsync.recovery.restore import restore, verify
from snapsync.ops.runner import Runner
from tests.conftest import make_subvolume
from tests.offsite.conftest import SECRET_KEY, Bucket, s3_table
from tests.replication.helpers import snapsync, tree_digest, write_policy

pytestmark = pytest.mark.btrfs
T0 = datetime(2026, 5, 1, tzinfo=UTC)


def policy_for(tmp_path: Path, datasets: list[Path], table: str, retention: str = "keep_last = 100") -> Policy:
    path = write_policy(tmp_path / "policy.toml", datasets, {"off": table}, retention=retention, interval="1h")
    return parse_policy(path.read_text(), source=str(path))


def change(root: Path, rng: random.Random, step: int) -> None:
    """One hour of a service's life: appends, rewrites, new files, deletions, renames."""
    with open(root / "log.txt", "a") as f:
        f.write(f"step {step}: " + "lorem ipsum " * 2000 + "\n")
    (root / f"blob-{step}.bin").write_bytes(rng.randbytes(rng.randint(1000, 600_000)))
    if step % 3 == 0 and (root / f"blob-{step - 2}.bin").exists():
        (root / f"blob-{step - 2}.bin").unlink()
    if step % 4 == 1:
        (root / "state.db").write_bytes(rng.randbytes(300_000))
    if step % 5 == 2 and (root / f"blob-{step - 1}.bin").exists():
        (root / f"blob-{step - 1}.bin").rename(root / f"moved-{step}.bin")


def snapshot_path(runner: Runner, policy: Policy, dataset: Path, name: str) -> Path:
    group = policy.groups["app"]
    return Path(runner.backend(group).snapshot_home(str(dataset))) / name


def restored_path(to: Path, dataset: Path, name: str) -> Path:
    from snapsync.protocol import dataset_key

    return to / "app" / dataset_key(str(dataset)) / name


def run_hour(runner: Runner, policy: Policy, clock: ManualClock) -> list[object]:
    reports = runner.run(policy.groups.values(), take=True, only_due=True, prune=True, replicate=True)
    clock.advance(timedelta(hours=1))
    targets = [t for r in reports for t in r.targets]
    assert all(r.ok for r in reports), [r.errors for r in reports] + [t.errors for t in targets]  # type: ignore[attr-defined]
    return targets


def test_full_and_ten_incrementals_restore_byte_identical_onto_a_fresh_btrfs(
    btrfs_root: Path, target_root: Path, bucket: Bucket, key_file: Path, tmp_path: Path
) -> None:
    rng = random.Random(6)
    app = make_subvolume(btrfs_root / "persist" / "app")
    db = make_subvolume(btrfs_root / "persist" / "db")
    (app / "big.bin").write_bytes(rng.randbytes(12 << 20))  # several chunks, and multipart uploads
    policy = policy_for(tmp_path, [app, db], s3_table(bucket, key_file, chunk_size="4M", full_every=100))
    clock = ManualClock(T0)
    runner = Runner(policy, clock)
    kinds = []
    for step in range(11):
        change(app, rng, step)
        change(db, rng, step)
        (target,) = run_hour(runner, policy, clock)
        kinds += [s.base is None for s in target.sent]  # type: ignore[attr-defined]
    assert kinds == [True, True] + [False] * 20  # one full per dataset, then incrementals only

    names = sorted(target.have[str(app)])  # type: ignore[attr-defined]
    assert len(names) == 11
    objects = bucket.keys("homelab/app/")
    assert any(k.endswith("/chunk-000003") for k in objects)  # the first full spans several chunks
    assert not [k for k in objects if k.endswith("progress.json")]

    archive = open_archive(policy.targets["off"])  # type: ignore[arg-type]
    report = restore(archive, "off", "app", str(target_root))
    assert report.snapshot == names[-1]
    assert [len(d.received) for d in report.datasets] == [11, 11]
    for ds in (app, db):
        assert tree_digest(restored_path(target_root, ds, names[-1])) == tree_digest(snapshot_path(runner, policy, ds, names[-1]))

    older = target_root.parent / "older"
    older.mkdir()
    report = restore(archive, "off", "app", str(older), snapshot=names[4])
    assert [len(d.received) for d in report.datasets] == [5, 5]
    assert tree_digest(restored_path(older, app, names[4])) == tree_digest(snapshot_path(runner, policy, app, names[4]))
    assert tree_digest(restored_path(older, app, names[4])) != tree_digest(restored_path(target_root, app, names[-1]))

    again = restore(archive, "off", "app", str(target_root))
    assert [d.present for d in again.datasets] == [names, names] and again.bytes == 0


def test_an_upload_killed_mid_chunk_continues_at_the_last_complete_chunk(
    btrfs_root: Path, target_root: Path, bucket: Bucket, key_file: Path, tmp_path: Path, s3_env: dict[str, str]
) -> None:
    app = make_subvolume(btrfs_root / "app")
    (app / "data.bin").write_bytes(os.urandom(10 << 20))
    table = s3_table(bucket, key_file, chunk_size="1M", rate_limit="2M")
    policy = write_policy(tmp_path / "p.toml", [app], {"off": table})
    snapsync("--policy", str(policy), "snapshot", check=True)

    proc = subprocess.Popen(
        [sys.executable, "-m", "snapsync", "--policy", str(policy), "replicate"],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            chunks = [k for k in bucket.keys("homelab/") if "/chunk-" in k]
            if len(chunks) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            pytest.fail("the upload did not store 3 chunks within a minute")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = {k: v["ETag"] for k, v in bucket.keys("homelab/").items() if "/chunk-" in k}
    assert not [k for k in bucket.keys("homelab/") if k.endswith("manifest.json")]  # not counted as uploaded

    policy.write_text(policy.read_text().replace('rate_limit = "2M"\n', ""))
    out = snapsync("--policy", str(policy), "replicate", "--json", check=True)
    (target,) = json.loads(out.stdout)["groups"][0]["targets"]
    assert any("continued the unfinished upload after" in n for n in target["notes"]), target
    (sent,) = target["sent"]
    (note,) = [n for n in target["notes"] if "continued the unfinished upload after" in n]
    kept = int(note.split("after ")[1].split(" ")[0])
    snapshot = btrfs_root / ".snapsync" / "app" / sent["name"]
    stream = subprocess.run(["btrfs", "send", "-q", str(snapshot)], capture_output=True, check=True).stdout
    assert sent["bytes"] == len(stream) - kept * (1 << 20)  # only what was missing, counted once
    after = {k: v["ETag"] for k, v in bucket.keys("homelab/").items() if "/chunk-" in k}
    stored_before = sorted(before)[:-1]  # the newest one may have been rewritten if it was cut
    assert all(after[k] == before[k] for k in stored_before)

    out = snapsync("--policy", str(policy), "restore", "app", "--from", "off", "--to", str(target_root), "--json", check=True)
    restored = json.loads(out.stdout)
    path = restored_path(target_root, app, restored["snapshot"])
    assert tree_digest(path) == tree_digest(app)


def _three_uploads(btrfs_root: Path, bucket: Bucket, key_file: Path, tmp_path: Path) -> tuple[Policy, list[str]]:
    rng = random.Random(3)
    app = make_subvolume(btrfs_root / "app")
    policy = policy_for(tmp_path, [app], s3_table(bucket, key_file, chunk_size="1M"))
    clock = ManualClock(T0)
    runner = Runner(policy, clock)
    for step in range(3):
        (app / f"f{step}").write_bytes(rng.randbytes(2_500_000))
        run_hour(runner, policy, clock)
    names = sorted({k.split("/")[-2] for k in bucket.keys("homelab/app/")})
    return policy, names


def _damage(bucket: Bucket, names: list[str], how: str) -> str:
    keys = sorted(bucket.keys("homelab/app/"))
    chunk = next(k for k in keys if names[2] in k and k.endswith("chunk-000001"))
    if how == "flip":
        data = bytearray(bucket.read(chunk))
        data[len(data) // 2] ^= 0x40
        bucket.write(chunk, bytes(data))
        return chunk
    if how == "truncate":
        bucket.write(chunk, bucket.read(chunk)[:-1000])
        return chunk
    if how == "manifest":
        manifest = next(k for k in keys if names[1] in k and k.endswith("manifest.json"))
        text = json.loads(bucket.read(manifest))
        text["chunks"][0]["raw"] += 1
        bucket.write(manifest, json.dumps(text).encode())
        return manifest
    assert how == "swap"
    donor = next(k for k in keys if names[1] in k and k.endswith("chunk-000001"))
    bucket.write(chunk, bucket.read(donor))
    return chunk


@pytest.mark.parametrize("how", ["flip", "truncate", "manifest", "swap"])
def test_damage_in_the_bucket_is_detected_and_named(
    btrfs_root: Path, target_root: Path, bucket: Bucket, key_file: Path, tmp_path: Path, how: str
) -> None:
    policy, names = _three_uploads(btrfs_root, bucket, key_file, tmp_path)
    archive = open_archive(policy.targets["off"])  # type: ignore[arg-type]
    assert verify(archive, "off").ok
    damaged = _damage(bucket, names, how)
    shown = damaged.removeprefix("homelab/")

    report = verify(archive, "off")
    assert not report.ok
    assert any(shown in p for p in report.problems), report.problems

    with pytest.raises(IntegrityError, match=shown.replace("+", r"\+")):
        restore(archive, "off", "app", str(target_root), verify_first=True)
    assert not (target_root / "app").exists()  # verify_first: nothing written at all

    with pytest.raises(IntegrityError, match=shown.replace("+", r"\+")):
        restore(archive, "off", "app", str(target_root))
    app_copies = list((target_root / "app").rglob("snapsync_*")) if (target_root / "app").exists() else []
    assert names[2] not in {p.name for p in app_copies}  # the damaged stream never becomes a copy
    leftovers = [p for p in (target_root / "app").rglob(".receiving/*")] if (target_root / "app").exists() else []
    assert not leftovers


def test_a_wrong_key_gives_a_clear_error_and_exit_2(
    btrfs_root: Path, target_root: Path, bucket: Bucket, key_file: Path, tmp_path: Path
) -> None:
    policy, _ = _three_uploads(btrfs_root, bucket, key_file, tmp_path)
    path = tmp_path / "policy.toml"
    other = tmp_path / "other.key"
    assert snapsync("keygen", str(other)).returncode == 0
    proc = snapsync("--policy", str(path), "restore", "app", "--from", "off", "--to", str(target_root), "--key-file", str(other))
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "made with key" in line and str(other) in line and "Traceback" not in proc.stderr
    proc = snapsync("--policy", str(path), "verify", "off", "--key-file", str(other))
    assert proc.returncode == 2 and "made with key" in proc.stderr
    assert not (target_root / "app").exists()


def test_bucket_retention_deletes_whole_chains_and_never_the_newest(
    btrfs_root: Path, bucket: Bucket, key_file: Path, tmp_path: Path
) -> None:
    app = make_subvolume(btrfs_root / "app")
    table = s3_table(bucket, key_file, full_every=3) + "\n[targets.off.retention]\nkeep_last = 2"
    policy = policy_for(tmp_path, [app], table)
    clock = ManualClock(T0)
    runner = Runner(policy, clock)
    archive = open_archive(policy.targets["off"])  # type: ignore[arg-type]
    seen: list[list[str]] = []
    for step in range(10):
        (app / "f").write_text(f"{step}\n" * 1000)
        (target,) = run_hour(runner, policy, clock)
        seen.append([n.rpartition("T")[2][:2] for n in target.have[str(app)]])  # type: ignore[attr-defined]
        report = verify(archive, "off")
        assert report.ok, report.problems
    # chains: 00F 01 02 03 | 04F 05 06 07 | 08F 09 ; keep_last = 2 keeps the two newest, and their bases
    assert seen[3] == ["00", "01", "02", "03"]
    assert seen[4] == ["00", "01", "02", "03", "04"]  # 04 is a new full: 03 still counts as the second newest
    assert seen[5] == ["04", "05"]  # the whole first chain went at once
    assert seen[7] == ["04", "05", "06", "07"]
    assert seen[9] == ["08", "09"]
    kept = [k for k in bucket.keys("homelab/app/") if k != "homelab/app/head.json"]
    assert all(k.split("/")[-2].endswith(("08:00:00Z", "09:00:00Z")) for k in kept)


def test_throttling_and_server_errors_are_retried(
    btrfs_root: Path, bucket: Bucket, key_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.offsite.flaky import FlakyProxy

    app = make_subvolume(btrfs_root / "app")
    (app / "f").write_bytes(os.urandom(3 << 20))
    with FlakyProxy(bucket.endpoint, fail_every=4) as proxy:
        table = s3_table(bucket, key_file, chunk_size="1M").replace(bucket.endpoint, proxy.url)
        policy = policy_for(tmp_path, [app], table)
        runner = Runner(policy, ManualClock(T0))
        with caplog.at_level("WARNING", logger="snapsync"):
            (report,) = runner.run(policy.groups.values(), take=True, only_due=False, prune=True, replicate=True)
        assert report.ok and report.targets[0].ok, report.targets[0].errors
        assert verify(open_archive(policy.targets["off"]), "off").ok  # type: ignore[arg-type]
        assert proxy.failed >= 4
    assert "SlowDown (HTTP 503)" in caplog.text or "InternalError (HTTP 500)" in caplog.text
    assert "retrying" in caplog.text
    assert SECRET_KEY not in caplog.text


def test_permanent_errors_fail_with_the_reason_and_no_secret(
    btrfs_root: Path, bucket: Bucket, key_file: Path, tmp_path: Path
) -> None:
    app = make_subvolume(btrfs_root / "app")
    table = s3_table(bucket, key_file).replace(f'bucket = "{bucket.name}"', 'bucket = "no-such-bucket"')
    path = write_policy(tmp_path / "p.toml", [app], {"off": table})
    proc = snapsync("--policy", str(path), "-v", "run", "--json")
    assert proc.returncode == 1
    (target,) = json.loads(proc.stdout)["groups"][0]["targets"]
    assert target["errors"] == [f"bucket 'no-such-bucket' does not exist at {bucket.endpoint}"]
    assert SECRET_KEY not in proc.stdout + proc.stderr
    assert "retrying" not in proc.stderr  # permanent: not retried


def test_dry_run_plans_without_touching_the_bucket(btrfs_root: Path, bucket: Bucket, key_file: Path, tmp_path: Path) -> None:
    app = make_subvolume(btrfs_root / "app", "x")
    path = write_policy(tmp_path / "p.toml", [app], {"off": s3_table(bucket, key_file)})
    snapsync("--policy", str(path), "snapshot", check=True)
    proc = snapsync("--policy", str(path), "replicate", "--dry-run", "--json", check=True)
    (target,) = json.loads(proc.stdout)["groups"][0]["targets"]
    assert target["dry_run"] and target["pending"] == 1
    assert any("upload full" in p for p in target["planned"])
    assert bucket.keys() == {}


def test_s3_target_is_parsed_with_credentials_outside_the_policy(tmp_path: Path) -> None:
    policy = parse_policy(
        'version = 1\n[targets.b2]\ntype = "s3"\nbucket = "x"\nendpoint_url = "https://s3.eu-central-003.backblazeb2.com"\n'
        'credentials_file = "/etc/snapsync/b2.credentials"\nprofile = "b2"\nstorage_class = "STANDARD_IA"\n'
        '[groups.g]\nbackend = "btrfs"\ndatasets = ["/persist/a"]\ntargets = ["b2"]\n',
        source="p.toml",
    )
    target = policy.targets["b2"]
    assert isinstance(target, S3Target) and target.credentials_file == "/etc/snapsync/b2.credentials"


def test_levelled_chains_free_what_retention_drops_and_every_kept_snapshot_restores(
    btrfs_root: Path, target_root: Path, bucket: Bucket, key_file: Path, tmp_path: Path
) -> None:
    """45 days of daily runs under q.toml's offsite rules: a week's first upload is sent from the week
    before's, a month's from the month before's, so the days of past weeks go while everything kept
    still restores, each byte for byte as the source had it, from at most 1 + 1 + 5 + 6 streams."""
    from snapsync.plan.offsite import chain

    rng = random.Random(21)
    app = make_subvolume(btrfs_root / "app")
    (app / "base.bin").write_bytes(rng.randbytes(2 << 20))
    rules = "keep_last = 1\nhourly = 0\ndaily = 7\nweekly = 4\nmonthly = 12\nyearly = 3"
    policy = policy_for(tmp_path, [app], s3_table(bucket, key_file, chunk_size="1M") + f"\n[targets.off.retention]\n{rules}")
    clock = ManualClock(datetime(2026, 4, 20, 3, tzinfo=UTC))  # a Monday, eleven days before May
    runner = Runner(policy, clock)
    archive = open_archive(policy.targets["off"])  # type: ignore[arg-type]
    for day in range(45):
        change(app, rng, day)
        runner.run(policy.groups.values(), take=True, only_due=False, prune=True, replicate=True)
        clock.advance(timedelta(days=1))
    report = verify(archive, "off")
    assert report.ok, report.problems
    state = next(iter(archive.survey("app").datasets.values()))
    stored = {n: m.stored() for n, m in state.stored.items()}
    assert sum(1 for s in stored.values() if s.parent is None) == 1 and len(stored) <= 7 + 4 + 2 + 6
    by_day = {n[len("snapsync_"):][:10]: n for n in stored}
    assert stored[by_day["2026-05-01"]].parent == by_day["2026-04-20"]  # May's first, from April's (the full)
    assert stored[by_day["2026-05-25"]].parent == by_day["2026-05-18"]  # a Monday, from the Monday before
    assert "2026-05-26" not in by_day or stored[by_day["2026-05-26"]].parent == by_day["2026-05-25"]
    for name in sorted(stored):
        links = chain(name, stored)
        assert links is not None and len(links) <= 1 + 1 + 5 + 6
        place = target_root / name.replace(":", "-")
        place.mkdir()
        restored = restore(archive, "off", "app", str(place), snapshot=name)
        assert [len(d.received) for d in restored.datasets] == [len(links)]
        assert tree_digest(restored_path(place, app, name)) == tree_digest(snapshot_path(runner, policy, app, name))
