"""The runbooks are executable truth: every ```sh block of each runbook runs, in order, in one bash
session, against a rig that is in the runbook's situation (real btrfs, a real S3 server), and the
result is checked here as the runbook's "Check" section says.

Blocks marked ```console (systemd, the backup host's authorized_keys) are for real hosts and are
not run; a block marked ``from=X`` runs only in variant X.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.btrfs.test_bare_metal import Disk, disk  # noqa: F401  (disk: the fixture)
from tests.conftest import make_subvolume
from tests.offsite.conftest import Bucket, bucket, key_file, s3_endpoint, s3_env, s3_table  # noqa: F401
from tests.replication.helpers import copies, run_json, write_policy

pytestmark = pytest.mark.btrfs
RUNBOOKS = Path(__file__).resolve().parents[2] / "runbooks"
BLOCK = re.compile(r"^[ \t]*```sh([^\n]*)\n(.*?)^[ \t]*```", re.M | re.S)


def blocks(name: str, variant: str | None = None) -> list[str]:
    out = []
    for info, body in BLOCK.findall((RUNBOOKS / name).read_text()):
        wanted = re.search(r"from=(\w+)", info)
        if wanted is None or wanted.group(1) == variant:
            out.append("\n".join(line.strip() for line in body.splitlines()))
    assert out, f"{name} has no runnable blocks"
    return out


def run_book(name: str, env: dict[str, str], variant: str | None = None) -> str:
    """All runnable blocks in one bash session (variables carry over), failing on the first error."""
    script = "set -euxo pipefail\n" + "\n".join(blocks(name, variant))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
    proc = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PATH": path, "SNAPSYNC_RETRY_WAIT": "0.05", **env},
    )
    assert proc.returncode == 0, f"{name} ({variant}) failed:\n{script}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def test_every_runbook_is_exercised_here() -> None:
    tested = {m.group(1) for m in re.finditer(r'run_book\("([\w-]+\.md)"', Path(__file__).read_text())}
    assert tested == {p.name for p in RUNBOOKS.glob("*.md")} - {"README.md"}


@pytest.mark.parametrize("variant", ["nas", "offsite"])
def test_host_died(disk: Disk, target_root: Path, bucket: Bucket, tmp_path: Path, variant: str) -> None:  # noqa: F811
    forgejo = make_subvolume(disk.where / "forgejo", "repos v1\n")
    pg = make_subvolume(disk.where / "postgresql", "tables v1\n")
    key = tmp_path / "var-lib-snapsync" / "offsite.key"
    subprocess.run([sys.executable, "-m", "snapsync", "keygen", str(key)], check=True, capture_output=True)
    backup = tmp_path / "paper-copy.key"
    shutil.copy(key, backup)
    policy = write_policy(tmp_path / "policy.toml", [forgejo, pg], {
        "nas": f'type = "local"\npath = "{target_root}"',
        "offsite": s3_table(bucket, key),
    }, group="forge")
    for version in ("v2", "v3"):
        time.sleep(1.05)
        (forgejo / "data.txt").write_text(f"repos {version}\n")
        run_json("-p", str(policy), "snapshot")
        run_json("-p", str(policy), "replicate")

    disk.replace()
    key.unlink()  # the host's disk took its key with it
    out = run_book("host-died.md", {"SNAPSYNC_POLICY": str(policy), "KEY_BACKUP": str(backup), "OFFSITE_KEY": str(key)}, variant)
    assert (forgejo / "data.txt").read_text() == "repos v3\n" and (pg / "data.txt").read_text() == "tables v1\n"
    assert "in sync: ['nas', 'offsite']" in out


def test_service_data_lost(btrfs_root: Path, target_root: Path, tmp_path: Path) -> None:
    forgejo = make_subvolume(btrfs_root / "persist" / "forgejo", "repos v1\n")
    pg = make_subvolume(btrfs_root / "persist" / "postgresql", "tables v1\n")
    policy = write_policy(tmp_path / "policy.toml", [forgejo, pg], {"nas": f'type = "local"\npath = "{target_root}"'}, group="forge")
    good = run_json("-p", str(policy), "run")["groups"][0]["snapshot"]
    time.sleep(1.05)
    (forgejo / "data.txt").unlink()  # the bad migration
    (pg / "data.txt").write_text("garbage\n")
    run_json("-p", str(policy), "run")
    scratch = btrfs_root / "scratch"  # single files come back through a receive: a btrfs place

    out = run_book("service-data-lost.md", {"SNAPSYNC_POLICY": str(policy), "SNAPSHOT": good, "SCRATCH": str(scratch)})
    assert (forgejo / "data.txt").read_text() == "repos v1\n" and (pg / "data.txt").read_text() == "tables v1\n"
    assert "previous state kept as snapsync_" in out
    listed = run_json("-p", str(policy), "list", "--local")["groups"][0]["datasets"]
    assert not [h for d in listed for s in d["snapshots"] for h in s["holds"] if h.startswith("safety:")]  # released
    assert list((scratch / "restore" / "forge").rglob(good))


def test_backup_host_died(btrfs_root: Path, target_root: Path, tmp_path: Path) -> None:
    forgejo = make_subvolume(btrfs_root / "persist" / "forgejo", "repos v1\n")
    policy = write_policy(tmp_path / "policy.toml", [forgejo], {"nas": f'type = "local"\npath = "{target_root}"'}, group="forge")
    for _ in range(2):
        run_json("-p", str(policy), "snapshot")
        run_json("-p", str(policy), "replicate")
        time.sleep(1.05)
    for copy in (target_root / "forge").rglob("snapsync_*"):
        subprocess.run(["btrfs", "subvolume", "delete", str(copy)], check=True, capture_output=True)
    shutil.rmtree(target_root / "forge")  # a new, empty backup disk

    run_book("backup-host-died.md", {"SNAPSYNC_POLICY": str(policy)})
    assert len(copies(target_root, "forge", forgejo)) == 2


def test_offsite_key_lost(btrfs_root: Path, bucket: Bucket, tmp_path: Path) -> None:  # noqa: F811
    forgejo = make_subvolume(btrfs_root / "persist" / "forgejo", "repos v1\n")
    key = tmp_path / "offsite.key"
    subprocess.run([sys.executable, "-m", "snapsync", "keygen", str(key)], check=True, capture_output=True)
    policy = write_policy(tmp_path / "policy.toml", [forgejo], {"offsite": s3_table(bucket, key)}, group="forge")
    run_json("-p", str(policy), "run")
    key.unlink()

    out = run_book("offsite-key-lost.md", {"SNAPSYNC_POLICY": str(policy), "OFFSITE_KEY": str(key)})
    assert "exit 2 (expected: the key is gone)" in out
    assert any(k.startswith("homelab-2/forge/") and k.endswith("manifest.json") for k in bucket.keys())


def test_target_diverged(btrfs_root: Path, target_root: Path, tmp_path: Path) -> None:
    from snapsync.backends.btrfs import BtrfsBackend

    forgejo = make_subvolume(btrfs_root / "persist" / "forgejo", "repos v1\n")
    policy = write_policy(tmp_path / "policy.toml", [forgejo], {"nas": f'type = "local"\npath = "{target_root}"'}, group="forge")
    names = []
    for _ in range(2):
        names.append(run_json("-p", str(policy), "snapshot")["groups"][0]["snapshot"])
        run_json("-p", str(policy), "replicate")
        time.sleep(1.05)
    backend = BtrfsBackend()
    backend.set_holds(str(forgejo), "target:nas", [])
    subprocess.run(["btrfs", "subvolume", "delete", str(Path(backend.snapshot_home(str(forgejo))) / names[1])], check=True, capture_output=True)
    (forgejo / "data.txt").write_text("repos v2\n")
    run_json("-p", str(policy), "snapshot")
    refused = run_json("-p", str(policy), "replicate", expect=1)["groups"][0]["targets"][0]
    assert "diverged" in " ".join(refused["errors"]).lower()

    out = run_book("target-diverged.md", {"SNAPSYNC_POLICY": str(policy)})
    assert "nas is in sync" in out
    assert names[1] not in copies(target_root, "forge", forgejo)
    assert 'on_diverged = "rollback"' not in policy.read_text()
