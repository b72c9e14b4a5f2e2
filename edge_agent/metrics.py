"""Prometheus text exposition of the agent's telemetry, served on the LAN when enabled.

The HTTP thread never touches agent state: the agent thread publishes an immutable snapshot
(`Agent.metrics_snapshot`) after every state change, and the handler renders whatever it reads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

# telemetry key -> (metric name, type, help)
GAUGES: dict[str, tuple[str, str, str]] = {
    "uptime_seconds": ("edge_agent_uptime_seconds", "gauge", "Seconds since the agent started"),
    "cameras_configured": ("edge_agent_cameras_configured", "gauge", "Cameras in agent.yaml"),
    "cameras_recording": ("edge_agent_cameras_recording", "gauge", "Cameras with a task starting/recording/stopping"),
    "queue_length": ("edge_agent_upload_queue_length", "gauge", "Recordings waiting for upload"),
    "bytes_pending": ("edge_agent_upload_bytes_pending", "gauge", "Bytes waiting for upload"),
    "disk_free_bytes": ("edge_agent_disk_free_bytes", "gauge", "Free bytes in the output directory"),
    "disk_below_floor": ("edge_agent_disk_below_floor", "gauge", "1 when new starts are refused for disk space"),
    "ffmpeg_restarts": ("edge_agent_ffmpeg_restarts_total", "counter", "FFmpeg restarts by the watchdog"),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(snapshot: Mapping[str, Any]) -> str:
    """The Prometheus text format (0.0.4) of a telemetry snapshot plus per-camera recording state."""
    lines = [
        "# HELP edge_agent_info Agent version and device", "# TYPE edge_agent_info gauge",
        f'edge_agent_info{{device="{_escape(str(snapshot.get("device_id", "")))}",'
        f'version="{_escape(str(snapshot.get("version", "")))}"}} 1',
    ]  # fmt: skip
    for key, (name, kind, help_text) in GAUGES.items():
        value = snapshot.get(key)
        if value is None:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {float(value):g}"]
    cameras: Mapping[str, str] = snapshot.get("camera_status", {})
    if cameras:
        lines += ["# HELP edge_agent_camera_recording 1 while the camera's task is starting/recording/stopping",
                  "# TYPE edge_agent_camera_recording gauge"]  # fmt: skip
        for cam, status in sorted(cameras.items()):
            active = 1 if status in ("starting", "recording", "stopping") else 0
            lines.append(f'edge_agent_camera_recording{{camera="{_escape(cam)}",status="{_escape(status)}"}} {active}')
    return "\n".join(lines) + "\n"


class MetricsServer:
    """`GET /metrics` on host:port in a daemon thread; `stop()` shuts it down (bounded)."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                body = render(snapshot()).encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics: " + format, *args)  # noqa: G003

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
