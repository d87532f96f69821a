#!/usr/bin/env bash
# Install snapsync on Debian/Ubuntu as root: system packages, a virtualenv in ./.venv (editable, with
# the test extras), and /usr/local/bin/snapsync pointing into it. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (snapshots, loop devices and apt need it)" >&2
  exit 2
fi

export DEBIAN_FRONTEND=noninteractive
# zstd and openssh-client are used by replication; openssh-server (sshd) and postgresql (the hook
# tests' PostgreSQL 15) only by the test suite, which starts its own servers with private configs;
# prometheus (promtool), nix-bin (nix-instantiate) and systemd (systemd-analyze) check deploy/;
# prometheus-node-exporter is scraped by the metrics test, acl (setfacl) writes the ACLs adopt must keep.
apt_packages=(btrfs-progs libbtrfsutil-dev gcc python3-dev python3-venv util-linux mount zstd openssh-client openssh-server postgresql prometheus prometheus-node-exporter nix-bin systemd acl)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The test suite starts its own node_exporter on a private port; a freshly installed package must
  # not leave one listening on every interface.
  if [[ " ${missing[*]} " == *" prometheus-node-exporter "* ]] && command -v systemctl >/dev/null; then
    systemctl disable --now prometheus-node-exporter >/dev/null 2>&1 || true
  fi
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "install.sh: snapsync needs Python >= 3.11 ($python is $("$python" -V 2>&1))" >&2
  exit 2
}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# An editable install writes no bytecode, and where PYTHONDONTWRITEBYTECODE is set no import does either:
# every snapsync process would compile its modules again (about 0.1 s a command, 40 ms a serve session).
.venv/bin/python -m compileall -q snapsync >/dev/null
ln -sf "$PWD/.venv/bin/snapsync" /usr/local/bin/snapsync
echo "install.sh: installed $(.venv/bin/snapsync --version) -> /usr/local/bin/snapsync"
