#!/bin/sh
# Inside the finished chroot: build OpenZFS with DKMS, keep only the modules, configure the guest.
set -eu
root=$1
files=$2
pubkey=$3
chr() { chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }

kver=$(ls "$root/lib/modules" | sort -V | tail -n1)
chr apt-get install -y --no-install-recommends zfs-dkms
test -f "$root/lib/modules/$kver/updates/dkms/zfs.ko" || chr dkms autoinstall -k "$kver"
mkdir -p "$root/lib/modules/$kver/extra/zfs"
cp "$root/lib/modules/$kver/updates/dkms/"*.ko "$root/lib/modules/$kver/extra/zfs/"
chr apt-mark manual zfsutils-linux python3-pyzfs
chr apt-get purge -y zfs-dkms dkms $(chr dpkg-query -W -f='${Package} ' 'linux-headers-*')
chr apt-get autoremove -y --purge -o APT::AutoRemove::RecommendsImportant=false \
  -o APT::AutoRemove::SuggestsImportant=false
chr depmod -a "$kver"
chr dpkg-query -W -f='${Version}' zfsutils-linux > "$root/etc/snapsync-zfs-version"

rm "$root/sbin/modprobe"
chr dpkg-divert --local --rename --remove /sbin/modprobe

cp -r "$files/." "$root/"
mkdir -p "$root/root/.ssh"
cp "$pubkey" "$root/root/.ssh/authorized_keys"
chmod 700 "$root/root/.ssh"
chmod 600 "$root/root/.ssh/authorized_keys"
echo zfsguest > "$root/etc/hostname"
for unit in zfs-load-module zfs-import-cache zfs-import-scan zfs-import.target zfs-mount zfs-share \
  zfs-zed zfs-volume-wait systemd-udev-settle apt-daily.timer apt-daily-upgrade.timer postgresql; do
  chr systemctl mask "$unit"
done
chr systemctl enable systemd-networkd snapsync-zfs-module snapsync-ready ssh
chr update-initramfs -c -k "$kver" 2>/dev/null || chr update-initramfs -u -k "$kver"
rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*
