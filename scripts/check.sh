#!/usr/bin/env bash
# Lint (ruff), types (mypy --strict) and the whole pytest suite, on an installed checkout
# (`make check`; scripts/test.sh installs everything first, then runs this).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check edge_agent tests bench
.venv/bin/mypy
# Two passes. Most tests only wait on real parts (FFmpeg, brokers, S3), so they run on two workers;
# the tests marked `serial` (chaos, power cuts, weak links, broker failover, the 50-agent fleets,
# the Docker image) assert timing bounds or load the machine themselves, so they run alone after.
# Both passes always run; the exit status is the first failure's. Each lists its slowest tests, so a
# CI log shows where the suite's time budget (20 minutes) goes.
status=0
.venv/bin/pytest -q -n 2 -m "not serial" --durations=10 "$@" || status=$?
.venv/bin/pytest -q -m serial --durations=15 "$@" || { rc=$?; [ "$status" -ne 0 ] || status=$rc; }
exit "$status"
