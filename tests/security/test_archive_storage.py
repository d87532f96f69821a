"""The archive storage boundary: whoever can write to the bucket or the share, but has no key.

Each test plays that party against a real archive (real btrfs sends, a ``dir`` target, and one case
on S3 through moto's server): it plants junk, tampers with records, deletes the newest uploads and
puts old head records back, then runs ``verify``, ``restore`` and uploads the way a sysadmin does,
through the CLI or the real code path. What must hold: junk never blocks the archive nor blames the
key, and no tampering leaves ``verify`` saying ok or ``restore`` quietly handing back an older state.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from snapsync.offsite.archive import Archive
from snapsync.clock import ManualClock
from snapsync.errors import SnapsyncError
from snapsync.offsite.upload import open_archive
from snapsync.policy.loader import Policy, parse_policy
from snapsync.protocol import dataset_key
from snapsync.replication.replicate import TargetReport
from snapsync.recovery.restore import restore, verify
from snapsync.ops.runner import Runner
from snapsync.offsite.sealing import Key, create_key_file, sign
from tests.conftest import make_subvolume
from tests.offsite.conftest import Bucket, bucket, s3_endpoint, s3_env, s3_table  # noqa: F401 - fixtures
from tests.replication.helpers import snapsync, tree_digest, write_policy

pytestmark = pytest.mark.btrfs
T0 = datetime(2026, 5, 1, tzinfo=UTC)
JUNK = b'{"key_id":"0123456789abcdef","mac":"xy"}'


@dataclass
class Site:
    """A group of two datasets uploading hourly to a ``dir`` target, on a simulated clock."""

    tmp: Path
    policy_path: Path
    policy: Policy
    nas: Path
    datasets: list[Path]
    runner: Runner
    clock: ManualClock
    rng: random.Random
    heads: list[bytes] = field(default_factory=list)
    """head.json as each hour left it."""

    @property
    def group_dir(self) -> Path:
        return self.nas / "app"

    @property
    def state(self) -> Path:
        return Path(os.environ["SNAPSYNC_STATE_DIR"])

    def dataset_dir(self, index: int) -> Path:
        return self.group_dir / dataset_key(str(self.datasets[index]))

    def names(self, index: int = 0) -> list[str]:
        return sorted(p.name for p in self.dataset_dir(index).iterdir() if (p / "manifest.json").exists())

    def archive(self) -> Archive:
        return open_archive(self.policy.targets["nas"])  # type: ignore[arg-type]

    def hour(self) -> TargetReport:
        for ds in self.datasets:
            with open(ds / "log.txt", "a") as log:
                log.write(f"{self.clock.now()}\n" * 50)
            (ds / f"blob-{len(self.heads)}.bin").write_bytes(self.rng.randbytes(20_000))
        (report,) = self.runner.run(self.policy.groups.values(), take=True, only_due=True, prune=True, replicate=True)
        self.clock.advance(timedelta(hours=1))
        (target,) = report.targets
        assert report.ok and target.ok, (report.errors, target.errors)
        self.heads.append((self.group_dir / "head.json").read_bytes())
        return target

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return snapsync("--policy", str(self.policy_path), *args)

    def freeze(self) -> Callable[[], None]:
        """Remember the archive and this host's state; the function returned puts both back."""
        saved = self.tmp / f"pristine-{len(self.heads)}"
        shutil.copytree(self.nas, saved / "nas", symlinks=True)
        shutil.copytree(self.state, saved / "state", symlinks=True)

        def thaw() -> None:
            for live, name in ((self.nas, "nas"), (self.state, "state")):
                shutil.rmtree(live)
                shutil.copytree(saved / name, live, symlinks=True)

        return thaw


def build(btrfs_root: Path, tmp_path: Path, *, hours: int, full_every: int = 100, retention: str = "") -> Site:
    datasets = [make_subvolume(btrfs_root / "persist" / n, f"{n}\n") for n in ("app", "db")]
    nas = btrfs_root / "nas"
    nas.mkdir()
    key = tmp_path / "offsite.key"
    create_key_file(key)
    table = f'type = "dir"\npath = "{nas}"\nkey_file = "{key}"\nchunk_size = "1M"\nfull_every = {full_every}'
    if retention:
        table += f"\n[targets.nas.retention]\n{retention}"
    path = write_policy(tmp_path / "policy.toml", datasets, {"nas": table}, interval="1h")
    policy = parse_policy(path.read_text(), source=str(path))
    clock = ManualClock(T0)
    site = Site(tmp_path, path, policy, nas, datasets, Runner(policy, clock), clock, random.Random(15))
    for _ in range(hours):
        site.hour()
    return site


def verify_json(site: Site, expect: int) -> dict[str, object]:
    proc = site.cli("verify", "nas", "--json")
    assert proc.returncode == expect, proc.stdout + proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def one_line_failure(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line, line
    return line


def restored(site: Site, to: Path, what: str = "app", *extra: str) -> dict[str, object]:
    """Every restore of a test goes to one place: copies already there are not fetched again."""
    proc = site.cli("restore", what, "--from", "nas", "--to", str(to), "--json", *extra)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def test_a_40_byte_junk_manifest_blocks_nothing_and_blames_no_key(btrfs_root: Path, target_root: Path, tmp_path: Path) -> None:
    site = build(btrfs_root, tmp_path, hours=3)
    newest = site.names()[-1]
    foreign = Key(os.urandom(32), "elsewhere")
    ds = dataset_key(str(site.datasets[0]))
    planted = {
        "x/junk/manifest.json": JUNK,  # the file, at the top of the archive
        "app/x/junk/manifest.json": JUNK,  # a made-up dataset in the group
        f"app/{ds}/junk/manifest.json": JUNK,  # a made-up snapshot in a real dataset
        f"app/{ds}/snapsync_2099-01-01T00:00:00Z/manifest.json": sign(foreign, {"snapshot": "a real-looking record"}),
        "app/head.json.bak": JUNK,
    }
    assert len(JUNK) == 40
    for step, (rel, data) in enumerate(planted.items()):
        (site.nas / rel).parent.mkdir(parents=True, exist_ok=True)
        (site.nas / rel).write_bytes(data)
        checked = verify_json(site, expect=1)
        problems = checked["problems"]
        assert isinstance(problems, list) and any(rel in p for p in problems), problems
        assert not any("made with key" in p or "use the key file" in p for p in problems)
        assert checked["manifests"] == 6 and checked["chunks_read"] == checked["chunks"]
        done = restored(site, target_root)
        assert done["snapshot"] == newest
        assert any(rel in p for p in done["problems"]) == rel.startswith("app/")  # type: ignore[attr-defined]
    copy = target_root / "app" / ds / newest
    assert tree_digest(copy) == tree_digest(Path(site.runner.backend(site.policy.groups["app"]).snapshot_home(str(site.datasets[0]))) / newest)

    sly = site.group_dir / "x" / "[/]ju\x1b[2Jnk\n" / "manifest.json"  # a fake second line, a screen wipe, markup
    sly.parent.mkdir(parents=True)
    sly.write_bytes(JUNK)
    proc = site.cli("verify", "nas")
    assert proc.returncode == 1 and "internal error" not in proc.stderr and "\x1b" not in proc.stdout, proc.stdout + proc.stderr
    assert "%5B/%5Dju\\x1b%5B2Jnk\\n/manifest.json: not authentic" in proc.stdout.replace("\n", ""), proc.stdout
    proc = site.cli("restore", "app", "--from", "nas", "--to", str(target_root))
    assert proc.returncode == 0 and "\x1b" not in proc.stderr, proc.stdout + proc.stderr

    proc = site.cli("snapshot")
    assert proc.returncode == 0, proc.stderr
    proc = site.cli("replicate", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (target,) = json.loads(proc.stdout)["groups"][0]["targets"]
    assert [s["kind"] for s in target["sent"]] == ["incremental", "incremental"]
    assert all(any(rel in n for n in target["notes"]) for rel in planted if rel.startswith(f"app/{ds}/")), target["notes"]
    assert all((site.nas / rel).exists() for rel in planted)  # evidence is left for a person to look at


def test_a_wrong_key_is_still_named_as_such_even_with_junk_around(btrfs_root: Path, tmp_path: Path) -> None:
    site = build(btrfs_root, tmp_path, hours=2)
    (site.group_dir / "x" / "junk").mkdir(parents=True)
    (site.group_dir / "x" / "junk" / "manifest.json").write_bytes(JUNK)
    other = tmp_path / "other.key"
    create_key_file(other)
    for args in (["verify", "nas"], ["restore", "app", "--from", "nas", "--to", str(tmp_path), "--dry-run"]):
        line = one_line_failure(site.cli(*args, "--key-file", str(other)), code=2)
        assert "made with key" in line and str(other) in line and "use the key file these backups were made with" in line
        assert "0123456789abcdef" not in line


def test_an_archive_whose_every_record_was_replaced_is_tampered_with_not_a_wrong_key(btrfs_root: Path, tmp_path: Path) -> None:
    """Real-looking records of another key everywhere: this host's record says it wrote here with its key."""
    site = build(btrfs_root, tmp_path, hours=2)
    forger = Key(os.urandom(32), "forger")
    for record in [*site.group_dir.rglob("manifest.json"), site.group_dir / "head.json"]:
        record.write_bytes(sign(forger, {k: v for k, v in json.loads(record.read_bytes()).items() if k not in ("mac", "key_id")}))
    checked = verify_json(site, expect=1)
    assert sum("not authentic" in p for p in checked["problems"]) == 5  # type: ignore[attr-defined]
    assert any("missing, but this host wrote head #" in p for p in checked["problems"])  # type: ignore[attr-defined]
    line = one_line_failure(site.cli("restore", "app", "--from", "nas", "--to", str(tmp_path), "--dry-run"))
    assert "made with key" not in line and "this host wrote head #" in line and "nothing else is left" in line
    shutil.rmtree(site.state / "offsite")  # a rebuilt host knows nothing: then it is the key file
    assert "made with key" in one_line_failure(site.cli("verify", "nas"), code=2)


def test_a_manifest_with_a_broken_mac_is_reported_and_the_others_stay_usable(
    btrfs_root: Path, target_root: Path, tmp_path: Path
) -> None:
    site = build(btrfs_root, tmp_path, hours=3, full_every=0)  # every upload full: each stands alone
    names = site.names()
    manifest = site.dataset_dir(1) / names[1] / "manifest.json"
    body = json.loads(manifest.read_bytes())
    body["mac"] = ("0" if body["mac"][0] != "0" else "1") + body["mac"][1:]
    manifest.write_text(json.dumps(body))

    checked = verify_json(site, expect=1)
    (problem,) = checked["problems"]  # type: ignore[misc]
    assert str(manifest.relative_to(site.nas)) in problem and "failed authentication" in problem
    done = restored(site, target_root)
    assert done["snapshot"] == names[2] and any("failed authentication" in p for p in done["problems"])  # type: ignore[attr-defined]
    assert restored(site, target_root, f"app@{names[0]}")["snapshot"] == names[0]
    line = one_line_failure(site.cli("restore", f"app@{names[1]}", "--from", "nas", "--to", str(target_root)), code=2)
    assert f"app@{names[1]}: not stored for" in line

    newest = site.dataset_dir(0) / names[2] / "manifest.json"
    newest.write_bytes(newest.read_bytes().replace(b'"complete":true', b'"complete":false'))
    line = one_line_failure(site.cli("restore", "app", "--from", "nas", "--to", str(target_root / "again")))
    assert f"names {dataset_key(str(site.datasets[0]))}@{names[2]} as the newest upload" in line
    assert "not restoring an older snapshot in its place" in line


HIDINGS = {
    "the newest manifest of one dataset": lambda s: (s.dataset_dir(0) / s.names(0)[-1] / "manifest.json").unlink(),
    "the newest manifests": lambda s: [(s.dataset_dir(i) / s.names(i)[-1] / "manifest.json").unlink() for i in (0, 1)],
    "the newest snapshot directory of one dataset": lambda s: shutil.rmtree(s.dataset_dir(1) / s.names(1)[-1]),
    "the two newest snapshot directories": lambda s: [
        shutil.rmtree(s.dataset_dir(i) / n) for i in (0, 1) for n in s.names(i)[-2:]
    ],
    "the head": lambda s: (s.group_dir / "head.json").unlink(),
    "the head, put back as it was two uploads ago": lambda s: (s.group_dir / "head.json").write_bytes(s.heads[-3]),
    "everything newer than an old head, and that head put back": lambda s: [
        *[shutil.rmtree(s.dataset_dir(i) / n) for i in (0, 1) for n in s.names(i)[-2:]],
        (s.group_dir / "head.json").write_bytes(s.heads[-3]),
    ],
}


def test_hiding_the_newest_uploads_is_detected_by_verify_restore_and_the_next_upload(
    btrfs_root: Path, target_root: Path, tmp_path: Path
) -> None:
    site = build(btrfs_root, tmp_path, hours=4)
    names = site.names()
    assert verify_json(site, expect=0)["warnings"] == []
    thaw = site.freeze()
    for what, hide in HIDINGS.items():
        hide(site)
        checked = verify_json(site, expect=1)
        assert any("head" in p for p in checked["problems"]), (what, checked)  # type: ignore[attr-defined]
        line = one_line_failure(site.cli("restore", "app", "--from", "nas", "--to", str(target_root)))
        assert "head" in line and "not restoring an older snapshot in its place" in line, (what, line)
        assert not (target_root / "app").exists(), what
        thaw()

    HIDINGS["the two newest snapshot directories"](site)
    line = one_line_failure(site.cli("restore", "app", "--from", "nas", "--to", str(target_root)))
    assert f"the newest left is app@{names[1]}: name it to restore it anyway" in line
    monitored = json.loads(site.cli("check", "--json").stdout)
    (copy,) = [c for c in monitored["checks"] if c.get("target") == "nas"]
    assert copy["status"] != "OK" and "as the newest upload" in copy["detail"], copy
    older = restored(site, target_root, f"app@{names[1]}")  # named explicitly: allowed, and said
    assert older["snapshot"] == names[1] and any("as the newest upload" in p for p in older["problems"])  # type: ignore[attr-defined]
    accepted = restored(site, target_root, "app", "--accept-rollback")  # or accepted for the newest left
    assert accepted["snapshot"] == names[1] and any("as the newest upload" in p for p in accepted["problems"])  # type: ignore[attr-defined]
    proc = site.cli("replicate", "--json")
    assert proc.returncode == 1
    (target,) = json.loads(proc.stdout)["groups"][0]["targets"]
    assert any("as the newest upload" in e and "uploading again what the source still has" in e for e in target["errors"])
    assert len(target["sent"]) == 4  # the source still had them: the archive is whole again
    assert verify_json(site, expect=0)["problems"] == []
    assert restored(site, target_root)["snapshot"] == names[-1]


def test_orphan_chunks_are_reported_never_deleted_by_verify_and_cleaned_by_the_next_upload(
    btrfs_root: Path, target_root: Path, tmp_path: Path
) -> None:
    site = build(btrfs_root, tmp_path, hours=2)
    names = site.names()
    orphan = site.dataset_dir(0) / "snapsync_2026-04-01T00:00:00Z" / "chunk-000000"
    orphan.parent.mkdir()
    shutil.copy(site.dataset_dir(0) / names[0] / "chunk-000000", orphan)
    extra = site.dataset_dir(1) / names[0] / "chunk-000099"
    extra.write_bytes(b"not listed in the manifest")
    checked = verify_json(site, expect=1)
    problems = checked["problems"]
    assert any(str(orphan.parent.relative_to(site.nas)) in p and "without a manifest" in p for p in problems)  # type: ignore[attr-defined]
    assert any(str(extra.relative_to(site.nas)) in p and "not part of any upload" in p for p in problems)  # type: ignore[attr-defined]
    assert orphan.exists() and extra.exists()
    done = restored(site, target_root)
    assert done["snapshot"] == names[-1] and any("without a manifest" in p for p in done["problems"])  # type: ignore[attr-defined]
    site.hour()
    assert not orphan.parent.exists()


def test_an_archive_from_before_head_records_warns_then_the_first_upload_writes_one(
    btrfs_root: Path, target_root: Path, tmp_path: Path
) -> None:
    site = build(btrfs_root, tmp_path, hours=2)
    key = Key.load(tmp_path / "offsite.key")
    for manifest in site.group_dir.rglob("manifest.json"):  # what the previous version wrote
        body = {k: v for k, v in json.loads(manifest.read_bytes()).items() if k not in ("sequence", "archive", "mac", "key_id")}
        manifest.write_bytes(sign(key, body))
    (site.group_dir / "head.json").unlink()
    shutil.rmtree(site.state / "offsite")

    checked = verify_json(site, expect=0)
    (warning,) = checked["warnings"]  # type: ignore[misc]
    assert "none yet" in warning and "the next upload writes one" in warning
    assert restored(site, target_root)["snapshot"] == site.names()[-1]
    site.hour()
    assert (site.group_dir / "head.json").exists()
    again = verify_json(site, expect=0)
    assert again["warnings"] == [] and again["problems"] == []
    (site.dataset_dir(0) / site.names(0)[-1] / "manifest.json").unlink()
    assert any("as the newest upload" in p for p in verify_json(site, expect=1)["problems"])  # type: ignore[attr-defined]


def test_many_honest_uploads_with_offsite_pruning_verify_clean_and_restore(
    btrfs_root: Path, target_root: Path, tmp_path: Path
) -> None:
    site = build(btrfs_root, tmp_path, hours=0, full_every=3, retention="keep_last = 2\nhourly = 3")
    pruned = 0
    for _ in range(12):
        target = site.hour()
        pruned += len(target.pruned)
        report = verify(site.archive(), "nas")
        assert report.ok and report.warnings == [], (report.problems, report.warnings)
    assert pruned >= 10 and len(site.names()) < 12
    done = restored(site, target_root)
    assert done["snapshot"] == site.names()[-1]
    site.hour()
    site.hour()
    assert verify_json(site, expect=0)["warnings"] == []
    assert restored(site, target_root)["snapshot"] == site.names()[-1]


def _objects(site: Site) -> list[Path]:
    return sorted(p for p in site.group_dir.rglob("*") if p.is_file())


def _tamper(site: Site, rng: random.Random) -> str:
    """One random act of somebody with write access to the share: what it was, for the failure message."""
    kind = rng.choice(["delete", "delete", "rmdir", "old head", "corrupt", "truncate", "swap"])
    objects = _objects(site)
    victim = rng.choice(objects)
    if kind == "delete":
        victim.unlink()
    elif kind == "rmdir":
        directory = rng.choice(sorted({p.parent for p in objects if p.name != "head.json"}))
        shutil.rmtree(directory)
        victim = directory
    elif kind == "old head":
        old = rng.randrange(len(site.heads) - 1)
        (site.group_dir / "head.json").write_bytes(site.heads[old])
        victim = site.group_dir / f"head.json (#{old + 1})"
    elif kind == "corrupt":
        data = bytearray(victim.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        victim.write_bytes(bytes(data))
    elif kind == "truncate":
        data = victim.read_bytes()
        victim.write_bytes(data[: rng.randrange(len(data))])
    else:
        manifests = [p for p in objects if p.name == "manifest.json"]
        a, b = rng.sample(manifests, 2)
        a_data, b_data = a.read_bytes(), b.read_bytes()
        a.write_bytes(b_data)
        b.write_bytes(a_data)
        victim = a
    return f"{kind} {victim.relative_to(site.nas)}"


def _detected(site: Site, target_root: Path) -> tuple[bool, bool]:
    archive = site.archive()
    checked = not verify(archive, "nas").ok
    try:
        restore(archive, "nas", "app", str(target_root), dry_run=True, verify_first=True)
    except SnapsyncError:
        return checked, True
    return checked, False


def test_random_tampering_trials_are_all_detected(btrfs_root: Path, target_root: Path, tmp_path: Path) -> None:
    """The issue's trial, repeated: 40 seeded rounds of 1-3 deletions, replays and corruptions."""
    site = build(btrfs_root, tmp_path, hours=4)
    assert _detected(site, target_root) == (False, False)
    thaw = site.freeze()
    rng = random.Random(20261205)
    missed = []
    for trial in range(40):
        acts = [_tamper(site, rng) for _ in range(rng.randint(1, 3))]
        by_verify, by_restore = _detected(site, target_root)
        if not (by_verify and by_restore):
            missed.append((trial, acts, by_verify, by_restore))
        if not any(a.startswith("old head") for a in acts):  # everything but a replay shows in the archive alone
            shutil.rmtree(site.state / "offsite")
            by_verify, by_restore = _detected(site, target_root)
            if not (by_verify and by_restore):
                missed.append((trial, [*acts, "(without this host's record)"], by_verify, by_restore))
        thaw()
    assert missed == []


def test_on_s3_junk_is_skipped_and_a_hidden_newest_upload_is_caught(
    btrfs_root: Path, target_root: Path, bucket: Bucket, tmp_path: Path
) -> None:
    app = make_subvolume(btrfs_root / "app", "v0\n")
    key_file = tmp_path / "offsite.key"
    create_key_file(key_file)
    path = write_policy(tmp_path / "policy.toml", [app], {"off": s3_table(bucket, key_file, chunk_size="1M")}, interval="1h")
    policy = parse_policy(path.read_text(), source=str(path))
    clock = ManualClock(T0)
    runner = Runner(policy, clock)
    for step in range(3):
        (app / "data.txt").write_text(f"v{step}\n")
        (report,) = runner.run(policy.groups.values(), take=True, only_due=True, prune=True, replicate=True)
        assert report.ok and report.targets[0].ok
        clock.advance(timedelta(hours=1))
    archive = open_archive(policy.targets["off"])  # type: ignore[arg-type]
    bucket.write("homelab/app/x/junk/manifest.json", JUNK)
    checked = verify(archive, "off")
    assert any("app/x/junk/manifest.json" in p and "not authentic" in p for p in checked.problems), checked.problems
    names = sorted({k.split("/")[-2] for k in bucket.keys("homelab/app/") if k.endswith("/manifest.json") and "/x/junk/" not in k})
    done = restore(archive, "off", "app", str(target_root))
    assert done.snapshot == names[-1] and any("x/junk/manifest.json" in p for p in done.problems)

    newest = next(k for k in bucket.keys("homelab/app/") if names[-1] in k and k.endswith("manifest.json"))
    bucket.client.delete_object(Bucket=bucket.name, Key=newest)
    assert any("as the newest upload" in p for p in verify(archive, "off").problems)
    with pytest.raises(SnapsyncError, match="not restoring an older snapshot in its place") as info:
        restore(archive, "off", "app", str(target_root / "x"))
    assert "\n" not in str(info.value)
    accepted = restore(archive, "off", "app", str(target_root), accept_rollback=True)
    assert accepted.snapshot == names[-2] and any("as the newest upload" in p for p in accepted.problems)
    (report,) = runner.run(policy.groups.values(), take=False, only_due=False, prune=True, replicate=True)
    assert any("uploading again" in e for e in report.targets[0].errors) and len(report.targets[0].sent) == 1
    assert verify(archive, "off").problems == [next(p for p in checked.problems if "x/junk/manifest.json" in p)]
