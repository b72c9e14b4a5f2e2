"""Prometheus text exposition of the agent's telemetry, served on the LAN when enabled.

The HTTP thread never touches agent state: the agent thread publishes an immutable snapshot
(`Agent.metrics_snapshot`) after every state change, and the handler renders whatever it reads.

Anyone on the LAN can open sockets to the endpoint (50 idle ones used to hold 50 threads for
ever), so what clients can hold is bounded: at most `max_connections` connections are served at
once (a handler thread and a deadline timer each; a connection over the cap is closed at once,
without a thread), and each connection lives at most `timeout` seconds in total (an idle socket,
or one that drips a byte now and then, is closed then). A scrape answers in milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.tasks import ACTIVE_STATUSES

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
            active = 1 if status in ACTIVE_STATUSES else 0
            lines.append(f'edge_agent_camera_recording{{camera="{_escape(cam)}",status="{_escape(status)}"}} {active}')
    return "\n".join(lines) + "\n"


def _cut(conn: socket.socket) -> None:
    """Wakes a handler blocked on ``conn`` (its read returns EOF); harmless once it is closed."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, but at most ``max_connections`` of them, each cut after ``timeout`` s.

    The per-socket timeout (the handler's ``timeout``) ends a connection that goes quiet; the
    deadline timer also ends one that keeps sending a byte just before each timeout would fire.
    """

    daemon_threads = True
    request_queue_size = 32  # listen backlog: a burst of connects is accepted (and refused) at once

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_connections: int,
        timeout: float,
    ) -> None:
        super().__init__(address, handler)
        self.connection_timeout = timeout
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self.active = 0  # connections being served now
        self.refused = 0  # connections closed at once for being over the cap

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            full = self.active >= self.max_connections
            if full:
                self.refused += 1
            else:
                self.active += 1
        if full:
            log.debug("metrics: connection from %s closed: %d already open", client_address, self.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        deadline = threading.Timer(self.connection_timeout, _cut, (request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._release()

    def _release(self) -> None:
        with self._lock:
            self.active -= 1

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr; a client that resets its connection is not news.
        log.debug("metrics: connection from %s failed", client_address, exc_info=True)


class MetricsServer:
    """`GET /metrics` on host:port in a daemon thread; `stop()` shuts it down (bounded).

    ``timeout`` bounds each connection's whole life and ``max_connections`` the connections (and
    so threads) served at once; see the module docstring.
    """

    def __init__(
        self,
        host: str,
        port: int,
        snapshot: Callable[[], Mapping[str, Any]],
        *,
        timeout: float = 5.0,
        max_connections: int = 8,
    ) -> None:
        conn_timeout = timeout

        class Handler(BaseHTTPRequestHandler):
            # StreamRequestHandler.setup() puts this on the socket: no read or write waits longer.
            timeout = conn_timeout

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

        self._server = _BoundedHTTPServer((host, port), Handler, max_connections=max_connections, timeout=timeout)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def active_connections(self) -> int:
        """Connections being served now (each holds a thread)."""
        return self._server.active

    @property
    def refused_connections(self) -> int:
        """Connections closed at once because ``max_connections`` were already open."""
        return self._server.refused

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
