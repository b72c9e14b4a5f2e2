#!/usr/bin/env bash
# Installs Docker Compose v2 (`docker compose`, the CLI plugin) for tests/test_docker.py's compose test.
# Debian 12 packages only Compose v1 (docker-compose 1.29, which rejects compose.yaml's top-level
# `name:`), so the plugin comes from Debian trixie's docker-compose package: a Go binary that needs
# only libc >= 2.34 (bookworm has 2.36). The .deb is checked against the sha256 pinned below and only
# its plugin binary is installed (no dpkg database entry, no trixie dependencies) into
# /usr/local/lib/docker/cli-plugins, a directory the docker CLI searches. Idempotent: nothing is
# downloaded when that version is already installed. amd64 only: elsewhere it installs nothing and
# says so, and the compose test fails naming this script.
set -euo pipefail

VERSION=2.26.1-4
URL="http://deb.debian.org/debian/pool/main/d/docker-compose/docker-compose_${VERSION}_amd64.deb"
SHA256=47681197cb2b1ab88206b42a1a92fc75f50d9530a6322d03494a473eed0408ea
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
PLUGIN="$PLUGIN_DIR/docker-compose"

arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
if [ "$arch" != amd64 ] && [ "$arch" != x86_64 ]; then
  echo "install-compose: $arch is not amd64: Compose v2 not installed ($PLUGIN missing)," \
       "so tests/test_docker.py's compose test will fail" >&2
  exit 0
fi
if [ -x "$PLUGIN" ] && [ "$("$PLUGIN" version --short 2>/dev/null || true)" = "$VERSION" ]; then
  exit 0
fi

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
deb="$tmp/docker-compose.deb"
if command -v curl >/dev/null 2>&1; then
  curl -fsS --retry 3 -o "$deb" "$URL"
elif command -v wget >/dev/null 2>&1; then
  wget -q -O "$deb" "$URL"
else
  echo "install-compose: neither curl nor wget: apt-get install curl (scripts/install-deps.sh does)" >&2
  exit 1
fi
echo "$SHA256  $deb" | sha256sum -c --quiet -
dpkg-deb -x "$deb" "$tmp/root"
$SUDO install -d -m 0755 "$PLUGIN_DIR"
$SUDO install -m 0755 "$tmp/root/usr/libexec/docker/cli-plugins/docker-compose" "$PLUGIN"
"$PLUGIN" version --short | grep -qx "$VERSION"
if [ -x /usr/bin/docker ]; then
  /usr/bin/docker compose version   # the client the tests use finds the plugin
fi
