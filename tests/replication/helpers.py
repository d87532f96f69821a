"""Shared by the replication tests: a policy writer, tree checksums and the CLI as a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from snapsync.protocol import dataset_key


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every regular file below ``root``, by relative path (plus symlink targets)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".snapsync")
        for f in sorted(filenames):
            p = Path(dirpath) / f
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_policy(path: Path, datasets: list[Path], targets: dict[str, str], *, group: str = "app",
                 retention: str = "keep_last = 100", interval: str = "1m") -> Path:
    names = ", ".join(f'"{t}"' for t in targets)
    body = [
        "version = 1",
        'host = "src"',
        "[defaults]",
        f'interval = "{interval}"',
        "[defaults.retention]",
        retention,
        f"[groups.{group}]",
        'backend = "btrfs"',
        "datasets = [" + ", ".join(f'"{d}"' for d in datasets) + "]",
        f"targets = [{names}]",
    ]
    for name, table in targets.items():
        body += [f"[targets.{name}]", table]
    path.write_text("\n".join(body) + "\n")
    return path


def snapsync(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
             check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "snapsync", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "SNAPSYNC_RETRY_WAIT": "0.1", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snapsync {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_json(*args: str, env: dict[str, str] | None = None, expect: int | None = 0) -> dict[str, Any]:
    proc = snapsync(*args, "--json", env=env)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(f"exit {proc.returncode}, expected {expect}:\n{proc.stdout}\n{proc.stderr}")
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def copies_dir(target_root: Path, group: str, dataset: Path) -> Path:
    return target_root / group / dataset_key(str(dataset))


def copies(target_root: Path, group: str, dataset: Path) -> list[str]:
    d = copies_dir(target_root, group, dataset)
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []
