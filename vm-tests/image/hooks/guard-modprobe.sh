#!/bin/sh
# The build chroot shares the host kernel, and zfsutils-linux's postinst runs `modprobe zfs`.
# Divert modprobe to a guard that loads nothing (query modes still work). customize.sh removes it
# before update-initramfs, which copies modprobe into the initrd.
set -eu
chroot "$1" dpkg-divert --local --rename --divert /sbin/modprobe.real --add /sbin/modprobe
cat > "$1/sbin/modprobe" <<'GUARD'
#!/bin/sh
for a in "$@"; do
  case "$a" in
    --show-depends|-D|--dry-run|-n|--showconfig|-c|--resolve-alias|-R) exec /sbin/modprobe.real "$@" ;;
  esac
done
echo "modprobe guard (image build): not loading $*" >&2
exit 0
GUARD
chmod 755 "$1/sbin/modprobe"
