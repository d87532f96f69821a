"""The cached guest image: built once per recipe, shared by every test session afterwards.

The cache key is a hash of the recipe (``image/``) and the harness's public key, so editing the
recipe builds a new image and an unchanged recipe never rebuilds. The cache lives outside the repo
(``SNAPSYNC_VM_CACHE``, default ``/var/cache/snapsync-vm-tests``) so clean clones and CI runs share it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RECIPE = Path(__file__).resolve().parent / "image"
WANT_ZFS = "2.3"
HOST_TOOLS = ("qemu-system-x86_64", "mmdebstrap", "mkfs.ext4", "ssh", "ssh-keygen")


@dataclass(frozen=True)
class Image:
    root: Path
    kernel: Path
    initrd: Path
    key: Path
    zfs_version: str


def cache_dir() -> Path:
    return Path(os.environ.get("SNAPSYNC_VM_CACHE", "/var/cache/snapsync-vm-tests"))


def unavailable() -> str | None:
    """Why guests cannot run here, or None."""
    if os.geteuid() != 0:
        return "building the guest image needs root (mmdebstrap --mode=root)"
    missing = [t for t in HOST_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing host tools: {', '.join(missing)} (apt-get install qemu-system-x86 mmdebstrap e2fsprogs openssh-client)"
    return None


def harness_key() -> Path:
    """The ssh key the harness logs into guests with; generated once per cache."""
    key = cache_dir() / "key" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "snapsync-vm-tests", "-f", str(key)], check=True)
    return key


def recipe_hash(pubkey: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in RECIPE.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(RECIPE)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    digest.update(pubkey.read_bytes())
    return digest.hexdigest()[:16]


def ensure_image(log: Path | None = None) -> Image:
    """Return the cached image for the current recipe, building it first if needed (8-14 min)."""
    key = harness_key()
    pub = key.with_suffix(".pub")
    out = cache_dir() / "images" / recipe_hash(pub)
    if not (out / "root.img").exists():
        tmp = out.with_name(out.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log = log or tmp.with_name(out.name + ".build.log")
        started = time.monotonic()
        print(f"vm-tests: building guest image {out.name} (8-14 min; log {log})", file=sys.stderr, flush=True)
        with open(log, "wb") as f:
            result = subprocess.run([str(RECIPE / "build.sh"), str(tmp), str(pub)], stdout=f, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"guest image build failed (exit {result.returncode}), log {log}:\n" + "\n".join(tail))
        version = (tmp / "zfs-version").read_text().strip()
        if not version.startswith(WANT_ZFS):
            raise RuntimeError(f"guest image has OpenZFS {version}, expected {WANT_ZFS}.x (is bookworm-backports pinned?)")
        tmp.rename(out)
        for old in out.parent.iterdir():
            if old.name != out.name and not old.name.startswith(out.name):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        print(f"vm-tests: image built in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return Image(out / "root.img", out / "vmlinuz", out / "initrd.img", key, (out / "zfs-version").read_text().strip())


if __name__ == "__main__":
    reason = unavailable()
    if reason:
        sys.exit(f"vm-tests: cannot build: {reason}")
    image = ensure_image()
    print(f"{image.root} (OpenZFS {image.zfs_version})")
