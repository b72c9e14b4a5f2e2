#!/usr/bin/env bash
# The one test command (README, CI): installs everything a bare Debian 12 needs, then runs
# lint (ruff), types (mypy --strict) and the whole pytest suite against real parts (scripts/check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/install-node-red.sh   # a real Node-RED for tests/test_node_red.py (npm, into .node-red/)
exec bash scripts/check.sh "$@"
