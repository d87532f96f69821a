#!/usr/bin/env bash
# Build the ZFS test guest: Debian bookworm, cloud kernel, OpenZFS 2.3 from bookworm-backports built
# by DKMS inside the chroot (never on the host: the host kernel must not load modules).
#
#   build.sh OUTDIR PUBKEY   ->  OUTDIR/{root.img,vmlinuz,initrd.img,zfs-version}
#
# The recipe is this file plus files/; vm-tests/vm.py hashes both to key the image cache.
set -euo pipefail
out=$1
pubkey=$2
here=$(cd "$(dirname "$0")" && pwd)
mirror=${SNAPSYNC_VM_MIRROR:-http://deb.debian.org/debian}
security=${SNAPSYNC_VM_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

rootfs="$out/rootfs"
rm -rf "$rootfs"
mkdir -p "$out"

packages=(
  linux-image-cloud-amd64 linux-headers-cloud-amd64 initramfs-tools systemd-sysv udev kmod dbus
  iproute2 procps openssh-server openssh-client python3 python3-venv python3-pyzfs zfsutils-linux
  btrfs-progs libbtrfsutil1 mbuffer pv zstd coreutils postgresql-15
)
IFS=,

# Hooks receive the chroot as $1 (pitfall 3 of notes/zfs-vm.md); each is a self-contained script.
mmdebstrap --mode=root --variant=minbase \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --setup-hook="$here/hooks/setup.sh \"\$1\"" \
  --essential-hook="$here/hooks/guard-modprobe.sh \"\$1\"" \
  --customize-hook="$here/hooks/customize.sh \"\$1\" \"$here/files\" \"$pubkey\"" \
  --include="${packages[*]}" \
  bookworm "$rootfs" \
  "deb $mirror bookworm main contrib" \
  "deb $mirror bookworm-updates main" \
  "deb $security bookworm-security main" \
  "deb $mirror bookworm-backports contrib"
unset IFS

cp -L "$rootfs/vmlinuz" "$out/vmlinuz"
cp -L "$rootfs/initrd.img" "$out/initrd.img"
cp "$rootfs/etc/snapsync-zfs-version" "$out/zfs-version"
rm -f "$out/root.img"
mkfs.ext4 -q -L root -d "$rootfs" "$out/root.img" 1900M
rm -rf "$rootfs"
echo "build.sh: image ready in $out (OpenZFS $(cat "$out/zfs-version"))"
