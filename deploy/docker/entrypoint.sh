#!/bin/sh
# The image's entry point (under tini): `docker run IMAGE [SUBCOMMAND] [ARGS...]`.
#   (nothing), run ...           -> edge-agent run --config /etc/edge-agent/agent.yaml ...
#   --log-format json (options)  -> the same, options passed to `run`
#   check-config, ctl ...        -> that edge-agent subcommand with the mounted config (unless --config is given)
#   health, --version, --help    -> edge-agent as is (health reads $EDGE_AGENT_HEALTH_FILE)
#   anything else                -> run as a command (e.g. `docker run --rm -it IMAGE sh`)
set -eu
CONFIG=${EDGE_AGENT_CONFIG:-/etc/edge-agent/agent.yaml}
[ "$#" -gt 0 ] || set -- run
case "$1" in
  health|--version|--help|-h) exec edge-agent "$@" ;;
  -*) set -- run "$@" ;;
esac
case "$1" in
  run|check-config|ctl)
    sub=$1; shift
    for arg in "$@"; do
      case "$arg" in --config|--config=*) exec edge-agent "$sub" "$@" ;; esac
    done
    exec edge-agent "$sub" --config "$CONFIG" "$@" ;;
  *) exec "$@" ;;
esac
