#!/usr/bin/env bash
# Install pyfuse3 3.5.0 with casfs's patches (third_party/pyfuse3/README.md): inode-fh
# (no-open mode) and failover (serving a handed-over /dev/fuse descriptor).
# Idempotent: does nothing when the patched build is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PATCHES="inode-fh failover"
FAILOVER_API=1
if python3 -c "import pyfuse3, sys; sys.exit(0 if getattr(pyfuse3, 'INODE_FH_WITHOUT_OPEN', False) and getattr(pyfuse3, 'FAILOVER_API', 0) == $FAILOVER_API else 1)" 2>/dev/null; then
  exit 0
fi
VERSION=3.5.0
SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
  -d "$work" "pyfuse3==$VERSION" 2>&1 | grep -v -E "^WARNING: (Running pip as|Location)" || true
sdist="$work/pyfuse3-$VERSION.tar.gz"
[ -f "$sdist" ] || { echo "install_pyfuse3: could not download the pyfuse3 $VERSION sdist" >&2; exit 1; }
echo "$SHA256  $sdist" | sha256sum -c --quiet - \
  || { echo "install_pyfuse3: pyfuse3-$VERSION.tar.gz does not match its pinned sha256" >&2; exit 1; }
tar xzf "$sdist" -C "$work"
for name in $PATCHES; do
  patch -s -p1 -d "$work/pyfuse3-$VERSION" < "third_party/pyfuse3/$name.patch"
done
python3 -m pip install -q --disable-pip-version-check "$work/pyfuse3-$VERSION" 2>&1 \
  | grep -v -E "^WARNING: (Running pip as|Location)" || true
python3 -c "import pyfuse3; assert pyfuse3.INODE_FH_WITHOUT_OPEN and pyfuse3.FAILOVER_API == $FAILOVER_API" \
  || { echo "install_pyfuse3: the patched pyfuse3 did not install" >&2; exit 1; }
