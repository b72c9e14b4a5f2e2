#!/usr/bin/env bash
# "See it work": one end-to-end recording on this machine, with real parts on free ports.
#
#   bash scripts/demo.sh              # install deps, record ~8 s, upload, download, ffprobe, clean up
#   DEMO_KEEP=1 bash scripts/demo.sh  # same, but leave everything running to send commands by hand
#   bash scripts/demo.sh stop         # stop what a DEMO_KEEP=1 run left running
#
# Environment: DEMO_SECONDS (recording length, default 8), DEMO_SKIP_INSTALL=1 (skip install-deps.sh).
#
# Parts, all on 127.0.0.1 and free ports, all logging into demo-run/ (gitignored):
#   mosquitto (broker) - tests/camsim.py (GStreamer RTSP camera simulator, mount cam1) -
#   weed mini (SeaweedFS S3, keys demo/demosecret) - edge-agent (device demo-01, prefix edge).
# Every wait is bounded; any failure prints which step failed plus the log tails and exits non-zero.
# An EXIT trap stops every process this script started (unless DEMO_KEEP=1 and the demo succeeded).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN="$ROOT/demo-run"
PIDS="$RUN/pids"          # "name pid" lines, for cleanup and for `demo.sh stop`
DEVICE=demo-01
PREFIX=edge
CAM=cam1
TASK="demo-$(date +%H%M%S)"
SECONDS_TO_RECORD=${DEMO_SECONDS:-8}
KEEP=${DEMO_KEEP:-0}
S3_KEY=demo
S3_SECRET=demosecret
BUCKET=demo
PY="$ROOT/.venv/bin/python"

say()  { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
  printf '\nDEMO FAILED: %s\n' "$*" >&2
  show_logs >&2
  exit 1
}
show_logs() {
  local f
  for f in "$RUN"/agent.log "$RUN"/mosquitto.log "$RUN"/camsim.log "$RUN"/seaweedfs.log; do
    [ -s "$f" ] || continue
    printf -- '--- last 25 lines of %s ---\n' "${f#"$ROOT"/}"
    tail -n 25 "$f"
  done
}

# True while pid $1 runs (a zombie, e.g. an orphan its new parent has not reaped yet, counts as gone).
alive() {
  local st
  [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null || return 1
  st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }
  [ "${st%% *}" != Z ]
}

# Direct children of a pid, from /proc (no procps needed).
children_of() {
  local parent=$1 stat rest fields
  for stat in /proc/[0-9]*/stat; do
    rest=$(cat "$stat" 2>/dev/null) || continue
    rest=${rest##*) }
    read -r -a fields <<<"$rest"
    [ "${fields[1]:-}" = "$parent" ] && { d=${stat#/proc/}; echo "${d%/stat}"; }
  done
  return 0
}

# Stop one process started by this script: SIGTERM its process group (each part runs in its own
# session), wait up to $2 seconds, then SIGKILL. Descendants that left the group (the agent runs
# FFmpeg in a session of its own) are collected first and killed afterwards if they outlive it.
stop_part() {
  local name=$1 pid=$2 wait_s=$3 kids=() k i t0=$SECONDS
  alive "$pid" || return 0
  # children and grandchildren (FFmpeg is a child of the agent)
  for k in $(children_of "$pid"); do kids+=("$k"); for i in $(children_of "$k"); do kids+=("$i"); done; done
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < wait_s * 10; i++)); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then
    printf '    %s (pid %s) ignored SIGTERM for %ss: killing it\n' "$name" "$pid" "$wait_s" >&2
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  for k in "${kids[@]}"; do
    if alive "$k"; then
      printf '    leftover child %s of %s: killing it\n' "$k" "$name" >&2
      kill -KILL "$k" 2>/dev/null || true
    fi
  done
  wait "$pid" 2>/dev/null || true
  printf '    stopped %s (pid %s) in %ss\n' "$name" "$pid" "$((SECONDS - t0))"
}

# Stop everything in $PIDS, newest first (the agent before the parts it depends on).
stop_all() {
  [ -f "$PIDS" ] || return 0
  local name pid lines=()
  mapfile -t lines < <(tac "$PIDS")
  for line in "${lines[@]}"; do
    read -r name pid <<<"$line"
    case $name in agent) stop_part "$name" "$pid" 60 ;; *) stop_part "$name" "$pid" 10 ;; esac
  done
  rm -f "$PIDS"
}

if [ "${1:-}" = "stop" ]; then
  if [ -f "$PIDS" ]; then
    say "Stopping the demo's processes"
    stop_all
    info "stopped"
  else
    info "nothing to stop (no $PIDS)"
  fi
  exit 0
fi
[ $# -eq 0 ] || { echo "usage: $0 [stop]   (env: DEMO_KEEP=1, DEMO_SECONDS=N, DEMO_SKIP_INSTALL=1)" >&2; exit 2; }

SUCCESS=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$KEEP" = 1 ] && [ "$SUCCESS" = 1 ]; then
    return 0
  fi
  if [ -f "$PIDS" ]; then
    say "Cleaning up"
    stop_all
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "demo interrupted (SIGINT)" >&2; exit 130' INT
trap 'echo "demo interrupted (SIGTERM)" >&2; exit 143' TERM

# ------------------------------------------------------------------------------------------ install
if [ "${DEMO_SKIP_INSTALL:-0}" != 1 ]; then
  say "Installing dependencies (scripts/install-deps.sh; idempotent)"
  bash scripts/install-deps.sh || die "scripts/install-deps.sh failed"
fi
for tool in mosquitto mosquitto_sub mosquitto_pub ffmpeg ffprobe /usr/bin/python3 "$PY" "$ROOT/.venv/bin/edge-agent" "$ROOT/.venv/bin/weed"; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (run: bash scripts/install-deps.sh)"
done

# ---------------------------------------------------------------------------------------- work dir
if [ -f "$PIDS" ]; then
  say "A previous demo left processes running; stopping them first"
  stop_all
fi
rm -rf "$RUN"
mkdir -p "$RUN/mosquitto-data" "$RUN/s3-data" "$RUN/recordings"
: >"$PIDS"

# Start "$@" in its own session, logging to $RUN/<name>.log; records "name pid" in $PIDS.
LAST_PID=
start_part() {
  local name=$1; shift
  setsid "$@" </dev/null >>"$RUN/$name.log" 2>&1 &
  LAST_PID=$!
  echo "$name $LAST_PID" >>"$PIDS"
}

# wait_until SECONDS WHAT PID COMMAND...: polls COMMAND every 0.2 s; fails early if PID exits.
wait_until() {
  local timeout=$1 what=$2 pid=$3; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    [ -z "$pid" ] || alive "$pid" || die "$what: the process exited (pid $pid)"
    [ "$SECONDS" -lt "$deadline" ] || die "$what: not done within ${timeout}s"
    sleep 0.2
  done
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Free ports: mqtt, rtsp, then five for SeaweedFS whose +10000 gRPC neighbours are free as well.
read -r MQTT_PORT RTSP_PORT S3_PORT MASTER_PORT VOLUME_PORT FILER_PORT ADMIN_PORT < <("$PY" - <<'EOF'
import random, socket
def free(p):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            return False
        return True
taken, out, rng = set(), [], random.Random()
while len(out) < 7:
    p = rng.randrange(20000, 45535)
    need = [p] if len(out) < 2 else [p, p + 10000]
    if any(q in taken for q in need) or not all(free(q) for q in need):
        continue
    taken.update(need); out.append(p)
print(*out)
EOF
)
[ -n "${ADMIN_PORT:-}" ] || die "could not pick free ports"

# --------------------------------------------------------------------------------------- mosquitto
say "Starting Mosquitto on 127.0.0.1:$MQTT_PORT"
{
  echo "listener $MQTT_PORT 127.0.0.1"
  echo "set_tcp_nodelay true"
  echo "allow_anonymous true"
  echo "persistence true"
  echo "persistence_location $RUN/mosquitto-data/"
  echo "autosave_interval 5"
  echo "connection_messages false"  # the demo polls retained topics with short-lived clients
  echo "log_dest stderr"
  echo "log_type error"; echo "log_type warning"; echo "log_type notice"; echo "log_type information"
  [ "$(id -u)" -ne 0 ] || echo "user root"  # else it drops to 'mosquitto', which cannot write demo-run/
} >"$RUN/mosquitto.conf"
start_part mosquitto mosquitto -c "$RUN/mosquitto.conf"
MOSQ_PID=$LAST_PID
wait_until 15 "Mosquitto to accept connections" "$MOSQ_PID" tcp_open "$MQTT_PORT"

# Record every message under edge/# for the summary and for debugging (demo-run/mqtt.log).
start_part mqtt-monitor mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT" -V mqttv5 -v -t "$PREFIX/#"

# ----------------------------------------------------------------------------------- camera (RTSP)
say "Starting the camera simulator on rtsp://127.0.0.1:$RTSP_PORT/$CAM"
start_part camsim /usr/bin/python3 -u tests/camsim.py --port "$RTSP_PORT" --mounts "$CAM"
CAM_PID=$LAST_PID
camsim_ready() { grep -q READY "$RUN/camsim.log" && tcp_open "$RTSP_PORT"; }
wait_until 20 "camera simulator to print READY" "$CAM_PID" camsim_ready

# --------------------------------------------------------------------------------------- S3 server
say "Starting SeaweedFS S3 (weed mini) on 127.0.0.1:$S3_PORT"
start_part seaweedfs env AWS_ACCESS_KEY_ID="$S3_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET" \
  "$ROOT/.venv/bin/weed" mini -dir="$RUN/s3-data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -s3.port="$S3_PORT" -master.port="$MASTER_PORT" -volume.port="$VOLUME_PORT" -filer.port="$FILER_PORT" \
  -admin.ui=false -admin.port="$ADMIN_PORT" -s3.port.iceberg=0 -s3.port.lance=0 \
  -webdav=false -master.telemetry=false
S3_PID=$LAST_PID
s3_ready() {
  "$PY" - "$S3_PORT" "$S3_KEY" "$S3_SECRET" <<'EOF'
import sys, urllib3
from minio import Minio
http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=0.5, read=2), retries=False)
Minio(f"127.0.0.1:{sys.argv[1]}", access_key=sys.argv[2], secret_key=sys.argv[3], secure=False,
      region="us-east-1", http_client=http).list_buckets()
EOF
}
wait_until 60 "SeaweedFS S3 to answer list_buckets" "$S3_PID" s3_ready

# ------------------------------------------------------------------------------------------ agent
CONFIG="$RUN/agent.yaml"
cat >"$CONFIG" <<EOF
# Written by scripts/demo.sh for this run only.
device_id: $DEVICE
mqtt:
  host: 127.0.0.1
  port: $MQTT_PORT
  topic_prefix: $PREFIX
cameras:
  $CAM:
    url: rtsp://127.0.0.1:$RTSP_PORT/$CAM
    rtsp_transport: tcp
    max_seconds: 600
recording:
  output_dir: $RUN/recordings
  max_seconds: 600
storage:
  type: minio
  endpoint: 127.0.0.1:$S3_PORT
  access_key: $S3_KEY
  secret_key: $S3_SECRET
  bucket: $BUCKET
  secure: false
  delete_local_after_upload: true
  presign_seconds: 3600
  download_url: retained   # the demo downloads via the retained status; the default is replies only
  min_free_bytes: 0
EOF
"$ROOT/.venv/bin/edge-agent" check-config --config "$CONFIG" >/dev/null || die "the demo config is invalid"

say "Starting the agent (edge-agent run --config demo-run/agent.yaml)"
PYTHONUNBUFFERED=1 start_part agent "$ROOT/.venv/bin/edge-agent" run --config "$CONFIG"
AGENT_PID=$LAST_PID

SUB=(mosquitto_sub -h 127.0.0.1 -p "$MQTT_PORT")
PUB=(mosquitto_pub -h 127.0.0.1 -p "$MQTT_PORT" -q 1)

# The current retained message on a topic ('' if none within 2 s).
retained() { "${SUB[@]}" -C 1 -W 2 -t "$1" 2>/dev/null || true; }
json_field() { "$PY" -c 'import json,sys
try: print(json.loads(sys.stdin.read()).get(sys.argv[1], ""))
except Exception: print("")' "$1"; }

# wait_status WANT TIMEOUT: polls the retained camera status until its "status" is WANT.
STATUS_JSON=
wait_status() {
  local want=$1 timeout=$2 deadline=$((SECONDS + $2)) status=
  while :; do
    alive "$AGENT_PID" || die "the agent exited while waiting for status '$want'"
    STATUS_JSON=$(retained "$PREFIX/$DEVICE/$CAM/status")
    status=$(printf '%s' "$STATUS_JSON" | json_field status)
    [ "$status" = "$want" ] && return 0
    if [ "$status" = failed ]; then
      die "task failed while waiting for '$want': $STATUS_JSON"
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "status did not become '$want' within ${timeout}s (last: ${STATUS_JSON:-none})"
    sleep 0.5
  done
}

say "Waiting for the agent to publish retained 'online' on $PREFIX/$DEVICE/status"
deadline=$((SECONDS + 30))
while :; do
  alive "$AGENT_PID" || die "the agent exited during startup"
  avail=$("${SUB[@]}" -C 1 -W 20 -t "$PREFIX/$DEVICE/status" 2>/dev/null || true)
  [ "$avail" = online ] && break
  [ "$SECONDS" -lt "$deadline" ] || die "no retained 'online' from the agent within 30s (got: ${avail:-nothing})"
  sleep 0.5
done
info "agent is online"

# ------------------------------------------------------------------------------------------ record
say "Publishing start (task $TASK) on $PREFIX/$DEVICE/$CAM/cmd"
"${PUB[@]}" -t "$PREFIX/$DEVICE/$CAM/cmd" \
  -m "{\"action\":\"start\",\"task_name\":\"$TASK\",\"request_id\":\"demo-start\"}" ||
  die "mosquitto_pub (start) failed"
wait_status recording 30
info "recording: $STATUS_JSON"

say "Recording for ${SECONDS_TO_RECORD}s"
for ((i = 0; i < SECONDS_TO_RECORD; i++)); do
  alive "$AGENT_PID" || die "the agent exited while recording"
  sleep 1
done

say "Publishing stop"
"${PUB[@]}" -t "$PREFIX/$DEVICE/$CAM/cmd" \
  -m "{\"action\":\"stop\",\"task_name\":\"$TASK\",\"request_id\":\"demo-stop\"}" ||
  die "mosquitto_pub (stop) failed"
wait_status uploaded 60

say "Retained status on $PREFIX/$DEVICE/$CAM/status"
printf '%s\n' "$STATUS_JSON" | "$PY" -m json.tool || printf '%s\n' "$STATUS_JSON"

say "Status flow of task $TASK (from demo-run/mqtt-monitor.log)"
sleep 0.5  # let the monitor flush the last messages
"$PY" - "$RUN/mqtt-monitor.log" "$PREFIX/$DEVICE/$CAM/tasks/$TASK" <<'EOF' || true
import json, sys
seen = []
with open(sys.argv[1], errors="replace") as fh:
    for line in fh:
        topic, _, payload = line.rstrip("\n").partition(" ")
        if topic != sys.argv[2]:
            continue
        try:
            status = json.loads(payload).get("status")
        except ValueError:
            continue
        if status and (not seen or seen[-1] != status):
            seen.append(status)
print("    " + (" -> ".join(seen) if seen else "(no task messages captured)"))
EOF

# ---------------------------------------------------------------------------------------- download
URL=$(printf '%s' "$STATUS_JSON" | json_field download_url)
[ -n "$URL" ] || die "the 'uploaded' status has no download_url: $STATUS_JSON"
say "Downloading download_url to demo-run/demo.mp4"
if command -v curl >/dev/null 2>&1; then
  curl -fsS --max-time 60 -o "$RUN/demo.mp4" "$URL" || die "download of $URL failed"
else
  "$PY" -c 'import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], "wb") as f:
    f.write(r.read())' "$URL" "$RUN/demo.mp4" || die "download of $URL failed"
fi
info "$(stat -c %s "$RUN/demo.mp4") bytes"

say "ffprobe demo-run/demo.mp4"
probe=$(timeout 30 ffprobe -v error -select_streams v:0 \
  -show_entries stream=codec_name,width,height:format=duration -of default=noprint_wrappers=1 \
  "$RUN/demo.mp4") || die "ffprobe could not read demo-run/demo.mp4"
printf '%s\n' "$probe" | sed 's/^/    /'
duration=$(printf '%s\n' "$probe" | sed -n 's/^duration=//p')
"$PY" -c 'import sys; d=float(sys.argv[1]); sys.exit(0 if d >= 1.0 else 1)' "${duration:-0}" ||
  die "the recording is too short (duration ${duration:-unknown})"

SUCCESS=1
say "DEMO OK: recorded ${duration}s of $(printf '%s\n' "$probe" | sed -n 's/^codec_name=//p') from $CAM, uploaded to bucket '$BUCKET', downloaded to demo-run/demo.mp4"

if [ "$KEEP" = 1 ]; then
  cat <<EOF

Everything is still running (DEMO_KEEP=1). Logs are in demo-run/*.log; all MQTT traffic in demo-run/mqtt-monitor.log.
  Watch:   mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -v -t '$PREFIX/#'
  Start:   mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -q 1 -t $PREFIX/$DEVICE/$CAM/cmd -m '{"action":"start","task_name":"t1","request_id":"r1"}'
  Stop:    mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -q 1 -t $PREFIX/$DEVICE/$CAM/cmd -m '{"action":"stop","task_name":"t1","request_id":"r2"}'
  Status:  mosquitto_pub -h 127.0.0.1 -p $MQTT_PORT -q 1 -t $PREFIX/$DEVICE/$CAM/cmd -m '{"action":"status","request_id":"r3"}'
  Replies: mosquitto_sub -h 127.0.0.1 -p $MQTT_PORT -v -t $PREFIX/$DEVICE/$CAM/reply
  S3:      http://127.0.0.1:$S3_PORT  (access key $S3_KEY, secret $S3_SECRET, bucket $BUCKET)
  Camera:  rtsp://127.0.0.1:$RTSP_PORT/$CAM
Stop everything with:  bash scripts/demo.sh stop
EOF
fi
