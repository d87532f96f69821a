"""The runbooks are executable truth: every ```sh block of each runbook runs, in order, in one bash
session, against a rig that is in the runbook's situation (real btrfs, a real S3 server), and the
result is checked here as the runbook's "Check" section says.

Blocks marked ```console (systemd, the backup host's authorized_keys) are for real hosts and are
not run; a block marked ``from=X`` runs only in variant X. Every runbook runs with the backup host
``nas`` as a local disk and as a real sshd: there the key's ``authorized_keys`` line is the one
docs/replication.md sets up until the runbook is followed, then the one the runbook's own
``snapsync authorize`` line prints (its role and options), as an operator following it would have.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.btrfs.test_bare_metal import Disk, disk  # noqa: F401  (disk: the fixture)
from tests.conftest import make_subvolume
from tests.offsite.conftest import Bucket, bucket, key_file, s3_endpoint, s3_env, s3_table  # noqa: F401
from tests.replication.helpers import copies, run_json, write_policy
from tests.sshd import Sshd

pytestmark = pytest.mark.btrfs
RUNBOOKS = Path(__file__).resolve().parents[2] / "runbooks"
SETUP = RUNBOOKS.parent / "docs" / "replication.md"
BLOCK = re.compile(r"^[ \t]*```sh([^\n]*)\n(.*?)^[ \t]*```", re.M | re.S)
AUTHORIZE = re.compile(r"snapsync authorize\b([^\n>]*)")


def authorized(text: str) -> list[str] | None:
    """The ``serve`` options (``--role`` and flags) of the first ``snapsync authorize`` line in ``text``."""
    found = AUTHORIZE.search(text)
    if found is None:
        return None
    words = found.group(1).split()
    flags = [w for w in words if w.startswith("--") and w not in ("--role", "--root", "--command")]
    return ["--role", words[words.index("--role") + 1], *flags]


@dataclass
class Nas:
    """The backup host ``nas``: a local disk, or another host behind a real sshd."""

    root: Path
    sshd: Sshd | None

    def table(self) -> str:
        return f'type = "local"\npath = "{self.root}"' if self.sshd is None else self.sshd.target_table(self.root)

    def authorize(self, options: list[str]) -> None:
        if self.sshd is not None:
            assert options[:1] == ["--role"], options
            self.sshd.authorize(self.sshd.forced(self.root, options[1], *options[2:]))

    def follow(self, runbook: str) -> None:
        """The key's line as the runbook says to write it, if it says."""
        options = authorized((RUNBOOKS / runbook).read_text())
        if options is not None:
            self.authorize(options)


@pytest.fixture(params=["local", "ssh"])
def nas(request: pytest.FixtureRequest, target_root: Path) -> Nas:
    if request.param == "local":
        return Nas(target_root, None)
    backup = Nas(target_root, request.getfixturevalue("sshd"))
    setup = authorized(SETUP.read_text())
    assert setup is not None and setup[:2] == ["--role", "receive"], setup
    backup.authorize(setup)
    return backup


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
def test_host_died(disk: Disk, nas: Nas, bucket: Bucket, tmp_path: Path, variant: str) -> None:  # noqa: F811
    forgejo = make_subvolume(disk.where / "forgejo", "repos v1\n")
    pg = make_subvolume(disk.where / "postgresql", "tables v1\n")
    key = tmp_path / "var-lib-snapsync" / "offsite.key"
    subprocess.run([sys.executable, "-m", "snapsync", "keygen", str(key)], check=True, capture_output=True)
    backup = tmp_path / "paper-copy.key"
    shutil.copy(key, backup)
    policy = write_policy(tmp_path / "policy.toml", [forgejo, pg], {
        "nas": nas.table(),
        "offsite": s3_table(bucket, key),
    }, group="forge")
    for version in ("v2", "v3"):
        time.sleep(1.05)
        (forgejo / "data.txt").write_text(f"repos {version}\n")
        run_json("-p", str(policy), "snapshot")
        run_json("-p", str(policy), "replicate")

    disk.replace()
    key.unlink()  # the host's disk took its key with it
    nas.follow("host-died.md")
    out = run_book("host-died.md", {"SNAPSYNC_POLICY": str(policy), "KEY_BACKUP": str(backup), "OFFSITE_KEY": str(key)}, variant)
    assert (forgejo / "data.txt").read_text() == "repos v3\n" and (pg / "data.txt").read_text() == "tables v1\n"
    assert "in sync: ['nas', 'offsite']" in out
    assert re.search(r"forge from nas: .*ok", out) and re.search(r"forge from offsite: .*ok", out), out


def test_service_data_lost(btrfs_root: Path, nas: Nas, tmp_path: Path) -> None:
    forgejo = make_subvolume(btrfs_root / "persist" / "forgejo", "repos v1\n")
    pg = make_subvolume(btrfs_root / "persist" / "postgresql", "tables v1\n")
    policy = write_policy(tmp_path / "policy.toml", [forgejo, pg], {"nas": nas.table()}, group="forge")
    good = run_json("-p", str(policy), "run")["groups"][0]["snapshot"]
    time.sleep(1.05)
    (forgejo / "data.txt").unlink()  # the bad migration
    (pg / "data.txt").write_text("garbage\n")
    run_json("-p", str(policy), "run")
    scratch = btrfs_root / "scratch"  # single files come back through a receive: a btrfs place
    service = tmp_path / "var" / "lib" / "forgejo"  # impermanence: the service sees a bind mount of /persist
    service.mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(forgejo), str(service)], check=True)
    try:
        nas.follow("service-data-lost.md")
        out = run_book("service-data-lost.md", {"SNAPSYNC_POLICY": str(policy), "SNAPSHOT": good, "SCRATCH": str(scratch)})
        assert (service / "data.txt").read_text() == "repos v1\n" and service.stat().st_dev == forgejo.stat().st_dev
    finally:
        subprocess.run(["umount", "--lazy", str(service)], check=True)
    assert (forgejo / "data.txt").read_text() == "repos v1\n" and (pg / "data.txt").read_text() == "tables v1\n"
    assert "previous state kept as snapsync_" in out and "no mount shows an old state" in out
    assert not [p for p in forgejo.parent.iterdir() if ".pre-rollback." in p.name]  # deleted by the runbook's release
    listed = run_json("-p", str(policy), "list", "--local")["groups"][0]["datasets"]
    assert not [h for d in listed for s in d["snapshots"] for h in s["holds"] if h.startswith("safety:")]  # released
    assert list((scratch / "restore" / "forge").rglob(good))


def test_backup_host_died(btrfs_root: Path, nas: Nas, tmp_path: Path) -> None:
    target_root = nas.root
    forgejo = make_subvolume(btrfs_root / "persist" / "forgejo", "repos v1\n")
    policy = write_policy(tmp_path / "policy.toml", [forgejo], {"nas": nas.table()}, group="forge")
    for _ in range(2):
        run_json("-p", str(policy), "snapshot")
        run_json("-p", str(policy), "replicate")
        time.sleep(1.05)
    for copy in (target_root / "forge").rglob("snapsync_*"):
        subprocess.run(["btrfs", "subvolume", "delete", str(copy)], check=True, capture_output=True)
    shutil.rmtree(target_root / "forge")  # a new, empty backup disk

    nas.follow("backup-host-died.md")
    out = run_book("backup-host-died.md", {"SNAPSYNC_POLICY": str(policy)})
    assert len(copies(target_root, "forge", forgejo)) == 2
    assert re.search(r"forge from nas: .*ok", out), out


def test_offsite_key_lost(btrfs_root: Path, nas: Nas, bucket: Bucket, tmp_path: Path) -> None:  # noqa: F811
    forgejo = make_subvolume(btrfs_root / "persist" / "forgejo", "repos v1\n")
    key = tmp_path / "offsite.key"
    subprocess.run([sys.executable, "-m", "snapsync", "keygen", str(key)], check=True, capture_output=True)
    policy = write_policy(tmp_path / "policy.toml", [forgejo], {"offsite": s3_table(bucket, key), "nas": nas.table()}, group="forge")
    run_json("-p", str(policy), "run")
    key.unlink()

    nas.follow("offsite-key-lost.md")
    out = run_book("offsite-key-lost.md", {"SNAPSYNC_POLICY": str(policy), "OFFSITE_KEY": str(key)})
    assert "exit 2 (expected: the key is gone)" in out
    assert any(k.startswith("homelab-2/forge/") and k.endswith("manifest.json") for k in bucket.keys())
    assert run_json("-p", str(policy), "replicate", "nas")["groups"][0]["targets"][0]["ok"]


def test_target_diverged(btrfs_root: Path, nas: Nas, tmp_path: Path) -> None:
    from snapsync.backends.btrfs import BtrfsBackend

    target_root = nas.root
    forgejo = make_subvolume(btrfs_root / "persist" / "forgejo", "repos v1\n")
    policy = write_policy(tmp_path / "policy.toml", [forgejo], {"nas": nas.table()}, group="forge")
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

    nas.follow("target-diverged.md")
    out = run_book("target-diverged.md", {"SNAPSYNC_POLICY": str(policy)})
    assert "nas is in sync" in out
    assert names[1] not in copies(target_root, "forge", forgejo)
    assert 'on_diverged = "rollback"' not in policy.read_text()


@pytest.mark.parametrize("variant", ["local", "nas"])
def test_database_restore(nas: Nas, tmp_path: Path, variant: str) -> None:
    from tests.hooks.pg import PG_BIN, pg_cluster
    from tests.hooks.test_pg_dumps import DATABASES, items, oids, seed, sql

    with pg_cluster() as (subvolume, server):
        seed(server)
        policy = write_policy(tmp_path / "policy.toml", [subvolume], {"nas": nas.table()}, group="forge")
        policy.write_text(policy.read_text() + (
            f'[[groups.forge.hooks]]\ntype = "postgres"\ndsn = "{server.dsn}"\ndump = "all"\n'
            f'dump_dir = "{subvolume}/snapsync-dumps"\nbin_dir = "{PG_BIN}"\n'
        ))
        good = run_json("-p", str(policy), "run")["groups"][0]["snapshot"]
        sql(server, "pocket-id", "DELETE FROM app.items")  # the bad migration
        sql(server, "forgejo", "INSERT INTO app.items VALUES (4, 'forgejo v2 #4')")  # newer data elsewhere
        time.sleep(1.05)
        run_json("-p", str(policy), "run")
        before = oids(server)
        kept = {db: items(server, db) for db in DATABASES if db != "pocket-id"}

        nas.follow("database-restore.md")
        out = run_book("database-restore.md", {
            "SNAPSYNC_POLICY": str(policy), "SNAPSHOT": good,
            "PGHOST": str(server.socket_dir), "PGPORT": str(server.port), "PGUSER": "postgres",
        }, variant)
        assert items(server, "pocket-id") == [(i, f"pocket-id v1 #{i}") for i in (1, 2, 3)]
        after = oids(server)
        for db, rows in kept.items():
            assert items(server, db) == rows and after[db] == before[db]  # untouched
        assert "the damaged state is kept as database pocket-id_before_" in out, out
        assert not [n for n in after if n.startswith("pocket-id_")]  # checked, then dropped
