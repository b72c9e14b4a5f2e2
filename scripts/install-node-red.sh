#!/usr/bin/env bash
# Installs Node-RED (4.x) into .node-red/ under the repository for the Node-RED example flow and its
# integration test (tests/test_node_red.py). Needs Node.js >= 18.5 and npm. Idempotent: does nothing
# when a matching Node-RED is already installed there. Quiet unless something fails.
#
#   bash scripts/install-node-red.sh            # node-red@4 (the newest 4.x)
#   NODE_RED_VERSION=4.1.8 bash scripts/install-node-red.sh
#
# Run it: node .node-red/node_modules/node-red/red.js --port 1880 --userDir <dir>
set -euo pipefail
cd "$(dirname "$0")/.."

SPEC=${NODE_RED_VERSION:-4}
PREFIX=.node-red
PKG="$PREFIX/node_modules/node-red/package.json"

for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "install-node-red: '$tool' not found (install Node.js >= 18.5)" >&2; exit 1; }
done

installed=""
[ -f "$PKG" ] && installed=$(node -p "require('./$PKG').version" 2>/dev/null || true)
# Already there if the installed version matches the spec: "4" matches 4.x.y, "4.1" 4.1.y, "4.1.8" exactly.
if [ -n "$installed" ] && { [ "$installed" = "$SPEC" ] || [ "${installed#"$SPEC".}" != "$installed" ]; } \
   && [ -f "$PREFIX/node_modules/node-red/red.js" ]; then
  exit 0
fi

mkdir -p "$PREFIX"
[ -f "$PREFIX/package.json" ] || printf '{\n  "name": "edge-agent-node-red",\n  "private": true\n}\n' >"$PREFIX/package.json"
npm install --prefix "$PREFIX" --no-audit --no-fund --no-update-notifier --loglevel=error \
  --save-exact "node-red@$SPEC" >/dev/null
node -e "require('./$PKG')" >/dev/null
