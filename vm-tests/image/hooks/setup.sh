#!/bin/sh
# Prefer bookworm-backports (contrib only is enabled there) so OpenZFS 2.3 wins over bookworm's 2.1.
set -eu
mkdir -p "$1/etc/apt/preferences.d"
cat > "$1/etc/apt/preferences.d/backports" <<'PIN'
Package: *
Pin: release n=bookworm-backports
Pin-Priority: 500
PIN
